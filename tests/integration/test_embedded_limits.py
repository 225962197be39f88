"""Embedded runs sharing one database and one fal account with different global limits.

An audit had three people run ``wanbatch run`` on one PostgreSQL database with one ``FAL_KEY``:

* Bob ``WANBATCH_MAX_OUTSTANDING=40``, Alice the default 10: 21 requests at fal at once, and
  Alice's run told "the outstanding cap is full (21 of 10 …) … or raise
  WANBATCH_MAX_OUTSTANDING", naming nobody's 40 and inviting an arms race.
* Bob ``WANBATCH_SUBMIT_RATE=20``, Alice 5: 11 submits in one second.
* ``doctor`` said all was well, and that "the submit rate is kept in process".

Each dispatching process now publishes its own limits with its heartbeat and applies the
strictest of the live ones of its account (two runtimes in one process, told apart by their
owners, each beating through its own conductor).
"""

from __future__ import annotations

import threading

from sqlalchemy import Engine, select

from jobs import db, store
from jobs.cap_holds import cap_holds, cap_note
from jobs.models import ConductorHeartbeat
from jobs.states import JobState
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.conductor import Conductor
from worker.doctor import check_limiter
from worker.limits import LocalGCRA, api_key_rate, rate_keys
from worker.running import _CapWatch
from worker.steps import Runtime, dispatch

KEY = "embedded-limits-key-4c1d:9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d"
URL = "http://127.0.0.1:9"  # nothing is sent: the tests count what dispatch claims
T2V = "fal-ai/wan-22"


def _run(engine: Engine, owner: str, name: str, jobs: int, **limits: float) -> tuple[Runtime, str]:
    """An embedded run of a batch of its own (``jobs`` jobs), as another process (``owner``)."""
    batch_id = add_batch(
        engine, name, [(T2V, {"prompt": f"{name}{i}", "resolution": "480p"}) for i in range(jobs)]
    )
    settings = settings_for(URL, KEY, database_url=engine.url.render_as_string(hide_password=False), **limits)
    rt = make_runtime(engine, settings, batch_ids=frozenset({batch_id}))
    assert isinstance(rt.limiter, LocalGCRA)  # no limiter Redis: only the database is shared
    rt.owner = owner
    return rt, batch_id


def _beat(conductor: Conductor) -> None:
    """The conductor's heartbeat, due now."""
    conductor._next_beat = 0.0
    conductor._beat()


def _at_fal(engine: Engine) -> int:
    with db.read_scope(engine) as session:
        return store.count_in_states(session, [JobState.SUBMITTING])


def test_two_runs_apply_the_strictest_outstanding_cap_and_say_whose(engine: Engine) -> None:
    bob, _ = _run(engine, "bob-laptop:4242:", "bob", 50, max_outstanding=40)
    alice, alice_batch = _run(engine, "alice-laptop:1:", "alice", 20, max_outstanding=10)
    bobs, alices = Conductor(bob, stream=False), Conductor(alice, stream=False)
    _beat(bobs)
    _beat(alices)  # sees Bob's 40: keeps its 10
    _beat(bobs)  # sees Alice's 10: the account's cap is the strictest
    assert bob.settings.max_outstanding == 10
    assert bob.own_settings.max_outstanding == 40  # what it publishes is still its own
    with db.read_scope(engine) as session:
        published = {row.owner: row.limits for row in session.scalars(select(ConductorHeartbeat))}
    assert sorted(doc["max_outstanding"] for doc in published.values() if doc is not None) == [10, 40]

    sent = dispatch(bob)
    assert len(sent) == 10  # not 40: Alice's 10 is the account's limit
    assert dispatch(alice) == []  # full, of Bob's requests
    assert _at_fal(engine) == 10

    # Alice's run says whose setting differs instead of advising to raise hers.
    watch = _CapWatch(alice_batch, alice.settings, alice)
    with db.read_scope(engine) as session:
        note = cap_note(cap_holds(session, alice_batch, watch.scope, watch.check), alice_batch)
    assert "the outstanding cap is full (10 of 10, WANBATCH_MAX_OUTSTANDING)" in note
    assert "another run (bob-laptop pid 4242) runs with WANBATCH_MAX_OUTSTANDING=40" in note
    assert "or raise" not in note

    # Alice stops cleanly: Bob's own 40 applies again at its next beat.
    alices.close()
    _beat(bobs)
    assert bob.settings.max_outstanding == 40
    assert len(dispatch(bob)) == 30
    bobs.close()


def test_two_runs_apply_the_strictest_submit_rate(engine: Engine) -> None:
    bob, _ = _run(engine, "bob-laptop:4242:", "bob", 40, submit_rate=20.0, max_outstanding=100)
    alice, _ = _run(engine, "alice-laptop:1:", "alice", 40, submit_rate=5.0, max_outstanding=100)
    bobs, alices = Conductor(bob, stream=False), Conductor(alice, stream=False)
    _beat(alices)
    _beat(bobs)
    spacing = (1 + 0.05) / 5.0
    assert api_key_rate(bob.settings).interval == spacing  # the database's pacing slots
    assert isinstance(bob.limiter, LocalGCRA)
    assert [k.interval for k in rate_keys(bob.limiter.settings, T2V)] == [spacing]  # its own spacing
    # Its dispatch claims a second's submits at Alice's rate, not at its own 20/s.
    assert len(dispatch(bob)) <= 5
    bobs.close()
    alices.close()


def test_a_run_with_another_key_is_not_the_account(engine: Engine) -> None:
    bob, _ = _run(engine, "bob-laptop:4242:", "bob", 5, max_outstanding=40)
    other = settings_for(
        URL,
        "another-key-0000:1111222233334444555566667777",
        database_url=engine.url.render_as_string(hide_password=False),
        max_outstanding=2,
    )
    carol = make_runtime(engine, other, batch_ids=frozenset({add_batch(engine, "carol", [])}))
    carol.owner = "carol-laptop:7:"
    _beat(Conductor(carol, stream=False))
    _beat(Conductor(bob, stream=False))
    assert bob.settings.max_outstanding == 40  # another account's cap is not this one's
    assert bob.peer_limits == {}


def test_doctor_compares_the_live_runs_limits(engine: Engine) -> None:
    bob, _ = _run(engine, "bob-laptop:4242:", "bob", 1, max_outstanding=40, submit_rate=20.0)
    alice, _ = _run(engine, "alice-laptop:1:", "alice", 1, max_outstanding=10, submit_rate=5.0)
    agreed = check_limiter(alice.settings)
    assert agreed.status == "skip"
    assert "kept in process" not in agreed.detail
    assert "share the submit rate and the outstanding caps through it" in agreed.detail
    _beat(Conductor(bob, stream=False))
    _beat(Conductor(alice, stream=False))
    found = check_limiter(alice.settings)
    assert found.status == "fail", found
    assert "WANBATCH_MAX_OUTSTANDING (" in found.detail
    assert "run bob-laptop pid 4242: 40" in found.detail
    assert "run alice-laptop pid 1: 10" in found.detail
    assert "each applies the strictest, 10" in found.detail
    assert "WANBATCH_SUBMIT_RATE (" in found.detail


def test_a_tick_leader_that_loses_the_lead_applies_its_own_limits_again(engine: Engine) -> None:
    """The workers' tick leader applies the strictest limits of the live runs while it leads;
    once the lead is another worker's, it dispatches nothing and publishes nothing, so the strict
    copy must not stay: its submits (its spacing, its grants' intervals) and what it compares with
    the next leader's policy are its own settings again, not a run's it no longer hears of."""
    alice, _ = _run(engine, "alice-laptop:1:", "alice", 1, max_outstanding=10, submit_rate=5.0)
    own = settings_for(
        URL,
        KEY,
        database_url=engine.url.render_as_string(hide_password=False),
        max_outstanding=40,
        submit_rate=20.0,
    )
    leader = make_runtime(engine, own)  # no batch of its own: the workers' tick leader
    leader.owner = "vm:11452:"
    _beat(Conductor(alice, stream=False))
    workers = Conductor(leader, stream=False)
    _beat(workers)
    assert leader.settings.max_outstanding == 10  # leading beside Alice's run: the strictest
    assert leader.peer_limits

    # Another worker takes the lead: this one's next round finds it does not lead.
    workers.run(threading.Event(), on_progress=lambda: True, leads=lambda: False, resilient=True)
    assert leader.settings is leader.own_settings
    assert (leader.settings.max_outstanding, leader.settings.submit_rate) == (40, 20.0)
    assert isinstance(leader.limiter, LocalGCRA)
    assert leader.limiter.settings.submit_rate == 20.0
    assert leader.bucket is not None
    assert leader.bucket.rate == 20.0 / 1.05
    assert leader.peer_limits == {}
    workers.close()
