"""Requests at another fal queue that nobody follows any more count while fal may still hold them.

Since the outstanding cap counted another queue's requests (``jobs.fal_origin``) only while a
live process followed their batch, a review found two faults:

- Overshoot. Process B's batch had 6 requests running at ``https://fal-egress.corp.example``, a
  proxy in front of the same fal account; A, at another queue URL with a cap of 8, rightly sent
  2 while B lived. B stopped cleanly (Ctrl-C deletes its heartbeats) and A's next round sent 6
  more: 14 at fal for a cap of 8, though fal goes on running B's 6 for minutes.
- Cost. Whether a request was followed was a correlated ``EXISTS`` on the heartbeats, evaluated
  for every in-flight row in every dispatch round (20,000 rows left at a stand-in: ``in_flight``
  went from 14 to 62 ms on SQLite, 22 to 68 ms on PostgreSQL).

Now an unfollowed request counts until ``store.UNFOLLOWED_SECONDS`` after it was last heard of
(its row's last change) or, still waiting to start, after its start timeout ends if later; a
followed one counts as long as it is at fal; and who follows what is read once per round (one
small query on the heartbeats), its batches bound into the counts.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, update

from jobs import batches, db, store
from jobs.cap_holds import CapCheck
from jobs.models import Job, utcnow
from tests.integration.test_queue_backoff_origins import (
    QUEUE,
    STAND_IN,
    S,
    _batch,
    _queued,
    _run_of,
    _settings,
)
from tests.statement_log import recorded_statements
from worker.here import queue_origin
from worker.limits import api_key_id
from worker.steps import dispatch

FAL_BY_OTHER_NAME = "https://fal-egress.corp.example"  # a proxy in front of fal: the same account
B = "host-b:4242:"
LONG_AGO = store.UNFOLLOWED_SECONDS + 120


def _phase_reason(engine: Engine, batch_id: str, max_outstanding: int) -> str | None:
    with db.read_scope(engine) as session:
        check = CapCheck.of(
            _settings(max_outstanding=max_outstanding), api_key_id(_settings()), queue_origin(QUEUE)
        )
        reason: str | None = batches.batch_report(session, batch_id, caps=check)["phase_reason"]
    return reason


def _heard(engine: Engine, ids: list[str], seconds_ago: float) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(Job).where(Job.id.in_(ids)).values(updated_at=utcnow() - timedelta(seconds=seconds_ago))
        )


def test_a_stopped_runs_requests_still_at_fal_keep_their_slots_for_a_while(engine: Engine) -> None:
    other, at_fal = _batch(engine, "other", 6)
    _queued(engine, at_fal, FAL_BY_OTHER_NAME, waited=30, state=S.RUNNING)  # fal renders them
    with db.session_scope(engine) as session:  # B is live ...
        store.record_heartbeat(session, B, [other], utcnow())
    mine, _pending = _batch(engine, "mine", 10)
    rt = _run_of(engine, mine, [], max_outstanding=8)
    assert len(dispatch(rt)) == 2
    # ... then B is stopped by Ctrl-C: a clean stop deletes its rows; fal still runs its 6.
    with db.session_scope(engine) as session:
        store.drop_heartbeats(session, B)
    rt.followed = None  # a round reads the heartbeats again within a second (FOLLOWED_REFRESH_SECONDS)
    assert dispatch(rt) == []  # before: 6 more, 14 at fal for a cap of 8
    assert rt.capped
    reason = _phase_reason(engine, mine, 8)
    assert reason is not None
    assert "the outstanding cap is full (8 of 8, WANBATCH_MAX_OUTSTANDING)" in reason
    assert "6 of batch other, 2 of this batch" in reason
    # Once fal would have ended them (the render bound since they were last heard of), they free
    # their slots: a stand-in's requests no longer hold later runs back for good.
    _heard(engine, at_fal, LONG_AGO)
    assert len(dispatch(rt)) == 6
    assert _phase_reason(engine, mine, 8) is None  # full of its own requests alone


def test_a_request_still_waiting_counts_until_its_start_timeout_has_ended(engine: Engine) -> None:
    """fal may start a queued request until its start timeout ends, and then run it: it counts
    until the render bound after that, however long ago it was last heard of."""
    _left, waiting = _batch(engine, "left", 4)
    _queued(engine, waiting[:2], STAND_IN, waited=LONG_AGO, heard=LONG_AGO, start_timeout=600)
    _queued(engine, waiting[2:], STAND_IN, waited=LONG_AGO, heard=LONG_AGO, start_timeout=-LONG_AGO)
    mine, _pending = _batch(engine, "mine", 10)
    assert len(dispatch(_run_of(engine, mine, [], max_outstanding=8))) == 6  # 2 of 8 still at fal


def test_followed_requests_count_however_old_unfollowed_ones_while_lately_heard_of(engine: Engine) -> None:
    own_beat, left = _batch(engine, "ownbeat", 3)  # old, and only the counting run beats for it
    _queued(engine, left, STAND_IN, waited=LONG_AGO, heard=LONG_AGO, state=S.RUNNING)
    followed, there = _batch(engine, "followed", 3)  # old, but another live process follows it
    _queued(engine, there, STAND_IN, waited=LONG_AGO, heard=LONG_AGO, state=S.RUNNING)
    _stopped, lately = _batch(engine, "stopped", 2)  # nobody follows it, heard of a minute ago
    _queued(engine, lately, FAL_BY_OTHER_NAME, waited=300, heard=60, state=S.RUNNING)
    mine, _pending = _batch(engine, "mine", 10)
    rt = _run_of(engine, mine, [], max_outstanding=12)
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, rt.beat_owner, [mine, own_beat], utcnow())  # as its conductor
        store.record_heartbeat(session, B, [followed], utcnow())
    assert len(dispatch(rt)) == 7  # 12 less 3 followed and 2 fal may still run (before: 9)


def test_who_follows_what_is_read_once_per_round_not_per_row(engine: Engine) -> None:
    """The counts bind the followed batches: no heartbeat look-up inside the in-flight counts."""
    _left, stuck = _batch(engine, "left", 50)
    _queued(engine, stuck, STAND_IN, waited=LONG_AGO, heard=LONG_AGO)
    with db.session_scope(engine) as session:
        for i in range(5):
            store.record_heartbeat(session, f"h{i}:1:", [f"b{i}"], utcnow())
    mine, _pending = _batch(engine, "mine", 3)
    rt = _run_of(engine, mine, [], max_outstanding_per_endpoint={"fal-ai/wan-22": 5})
    with recorded_statements(engine) as seen:
        assert len(dispatch(rt)) == 3
    beats = [s for s in seen if "conductor_heartbeats" in s]
    assert len(beats) == 1, beats  # one small query for the round (the caps and the per-endpoint cap)
    assert beats[0].startswith("SELECT DISTINCT conductor_heartbeats.scope FROM conductor_heartbeats")
