"""A conductor says, every few seconds, which batches it works on; ``status`` reads that.

Jobs waiting at fal hold no lease, so without it a batch whose ``run`` was stopped (Ctrl-C, a
closed SSH session, a crash) looked as busy as one being processed, and ``status`` gave it a
forecast that nothing would meet. Both dialects (the ``engine`` fixture).
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, select

from jobs import batches, db, store
from jobs.models import EVERY_BATCH, ConductorHeartbeat, utcnow
from jobs.processes import beat_owner
from tests.step_runtime import add_batch, ended_beat_owner, make_runtime, settings_for
from worker import conductor as conductor_module
from worker.conductor import Conductor

KEY = "heartbeat-key-3c9d"
URL = "https://queue.test"


def _beats(engine: Engine) -> dict[str, str]:
    with db.read_scope(engine) as session:
        rows = session.execute(select(ConductorHeartbeat.scope, ConductorHeartbeat.owner))
        return {scope: owner for scope, owner in rows}


def _seen_at(engine: Engine) -> list[datetime]:
    with db.read_scope(engine) as session:
        return list(session.scalars(select(ConductorHeartbeat.seen_at)))


def test_a_conductor_beats_for_its_batches_at_its_pace_and_clears_on_close(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = add_batch(engine, "beat-a", [("fal-ai/wan-22", {"prompt": "a"})])
    second = add_batch(engine, "beat-b", [("fal-ai/wan-22", {"prompt": "b"})])
    rt = make_runtime(engine, settings_for(URL, KEY), batch_ids=frozenset({first, second}))
    conductor = Conductor(rt, stream=False)
    conductor.close()  # never beat: nothing to clear, and no error
    assert _beats(engine) == {}

    conductor = Conductor(rt, stream=False)
    conductor._beat()
    assert _beats(engine) == {first: beat_owner(rt.owner), second: beat_owner(rt.owner)}
    stamped = _seen_at(engine)
    conductor._beat()  # within HEARTBEAT_SECONDS: no write
    assert _seen_at(engine) == stamped
    monkeypatch.setattr(conductor_module, "HEARTBEAT_SECONDS", 0.0)
    conductor._next_beat = 1e-9  # due now
    conductor._beat()
    assert all(new > old for new, old in zip(sorted(_seen_at(engine)), sorted(stamped), strict=True))
    with db.read_scope(engine) as session:
        assert batches.batch_report(session, first)["processing"] is True

    conductor.close()
    assert _beats(engine) == {}
    conductor._beat()  # closed: a round still running must not put it back
    conductor.close()
    assert _beats(engine) == {}
    with db.read_scope(engine) as session:
        report = batches.batch_report(session, first)
    assert (report["processing"], report["processed_at"]) == (False, None)


def test_a_worker_leader_beats_for_every_batch_through_its_tick(engine: Engine) -> None:
    batch_id = add_batch(engine, "beat-every", [("fal-ai/wan-22", {"prompt": "x"})])
    rt = make_runtime(engine, settings_for(URL, KEY))  # no batch scope: a distributed worker
    conductor = Conductor(rt, stream=False)
    stopping = threading.Event()
    runner = threading.Thread(target=conductor.run, args=(stopping,), kwargs={"resilient": True})
    runner.start()
    try:
        deadline = utcnow() + timedelta(seconds=20)
        while _beats(engine) != {EVERY_BATCH: beat_owner(rt.owner)} and utcnow() < deadline:
            stopping.wait(0.05)
        assert _beats(engine) == {EVERY_BATCH: beat_owner(rt.owner)}
        with db.read_scope(engine) as session:
            assert store.last_heartbeat(session, batch_id) is not None
            # A batch that does not exist has no creation the workers' beat could cover.
            assert store.last_heartbeats(session, [batch_id, "unknown"]).keys() == {batch_id}
    finally:
        stopping.set()
        runner.join(20)
        conductor.close()
    assert _beats(engine) == {}


def test_the_leader_beats_between_ticks_when_its_ticks_are_far_apart(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``WANBATCH_TICK_INTERVAL=10`` an idle leader ticks every 80 s; beating only at ticks
    let its heartbeat pass a minute, and ``run``/``doctor``/``status`` then said no worker works
    on this database. Beats come at their own pace, whatever the tick's."""
    rt = make_runtime(engine, settings_for(URL, KEY, tick_interval=600.0))
    monkeypatch.setattr(conductor_module, "HEARTBEAT_SECONDS", 0.2)
    conductor = Conductor(rt, stream=False)
    stopping = threading.Event()
    runner = threading.Thread(target=conductor.run, args=(stopping,), kwargs={"resilient": True})
    runner.start()
    try:
        deadline = utcnow() + timedelta(seconds=20)
        while not _seen_at(engine) and utcnow() < deadline:  # the first tick's beat
            stopping.wait(0.05)
        (first,) = _seen_at(engine)
        while _seen_at(engine) == [first] and utcnow() < deadline:
            stopping.wait(0.05)
        (later,) = _seen_at(engine)
        assert later > first  # beaten again, ten minutes before the next tick
        assert conductor.stats.ticks == 1
    finally:
        stopping.set()
        runner.join(20)
        conductor.close()


def _created(engine: Engine, batch_id: str, at: datetime) -> None:
    """Backdate (or postdate) ``batch_id``'s creation."""
    with db.session_scope(engine) as session:
        store.get_batch(session, batch_id).created_at = at


def test_the_newest_beat_of_a_batch_counts_its_own_and_every_batch(engine: Engine) -> None:
    now = utcnow()
    b1, b3 = (add_batch(engine, name, [("fal-ai/wan-22", {"prompt": name})]) for name in ("b1", "b3"))
    for batch_id in (b1, b3):
        _created(engine, batch_id, now - timedelta(hours=1))
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "run:1:", [b1], now - timedelta(minutes=10))
        store.record_heartbeat(session, "worker:2:", [EVERY_BATCH], now - timedelta(minutes=2))
        store.record_heartbeat(session, "run:3:", ["b2"], now)
    with db.read_scope(engine) as session:
        beats = store.last_heartbeats(session, [b1, "b2", b3])
        assert beats == {
            b1: now - timedelta(minutes=2),
            "b2": now,
            b3: now - timedelta(minutes=2),
        }
    with db.session_scope(engine) as session:
        store.drop_heartbeats(session, "worker:2:")
    with db.read_scope(engine) as session:
        assert store.last_heartbeats(session, [b1, b3]) == {b1: now - timedelta(minutes=10)}

    # A process that died a week ago left its row: the next beat of anyone forgets it.
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "died:4:", ["b4"], now - store.HEARTBEAT_KEPT - timedelta(seconds=1))
        store.record_heartbeat(session, "run:3:", ["b2"], now)
    with db.read_scope(engine) as session:
        assert store.last_heartbeats(session, [b1, "b4"]) == {b1: now - timedelta(minutes=10)}


def _rows(engine: Engine) -> set[tuple[str, str]]:
    """Every heartbeat row, as ``(owner, scope)``."""
    with db.read_scope(engine) as session:
        return {
            (o, s) for o, s in session.execute(select(ConductorHeartbeat.owner, ConductorHeartbeat.scope))
        }


def test_a_workers_beat_from_before_a_batch_existed_is_no_last_seen(engine: Engine) -> None:
    """A worker that crashed 32 minutes ago left its every-batch beat; a batch created 2 minutes
    ago was said "nothing is processing it (last seen 32m ago)", ``processed_at`` before its
    ``created_at``: that beat said nothing of a batch that did not exist yet."""
    now = utcnow()
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "crashed:1:", [EVERY_BATCH], now - timedelta(minutes=32))
    batch_id = add_batch(engine, "late1", [("fal-ai/wan-22", {"prompt": "late"})])
    _created(engine, batch_id, now - timedelta(minutes=2))
    with db.read_scope(engine) as session:
        assert store.last_heartbeat(session, batch_id) is None
        report = batches.batch_report(session, batch_id, now=now)
    assert (report["processing"], report["processed_at"]) == (False, None)


def test_a_live_workers_beat_covers_a_batch_created_since_as_of_its_creation(engine: Engine) -> None:
    """Workers alive when a batch is created take it on at their next tick: processing at once
    (no "nothing is processing it" for the seconds until then), and processed since the batch's
    creation, never before. Should they have died meanwhile, their beat is no "last seen"."""
    now = utcnow()
    batch_id = add_batch(engine, "fresh", [("fal-ai/wan-22", {"prompt": "fresh"})])
    created = now - timedelta(seconds=5)
    _created(engine, batch_id, created)
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "worker:1:", [EVERY_BATCH], now - timedelta(seconds=8))
    with db.read_scope(engine) as session:
        alive = batches.batch_report(session, batch_id, now=now)
        dead = batches.batch_report(session, batch_id, now=now + timedelta(minutes=2))
    assert alive["processing"] is True
    assert alive["processed_at"] is not None
    assert datetime.fromisoformat(alive["processed_at"]) == created
    assert (dead["processing"], dead["processed_at"]) == (False, None)

    # A beat since the batch's creation counts as it is, alive or not.
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "worker:1:", [EVERY_BATCH], now - timedelta(seconds=1))
    with db.read_scope(engine) as session:
        later = batches.batch_report(session, batch_id, now=now + timedelta(minutes=2))
    assert later["processing"] is False
    assert later["processed_at"] is not None
    assert datetime.fromisoformat(later["processed_at"]) == now - timedelta(seconds=1)


def test_a_clean_stop_of_the_leader_leaves_no_last_seen_of_a_crashed_one(engine: Engine) -> None:
    """A worker crashed and left its every-batch row; another took over, processed the batch and
    was stopped cleanly (SIGTERM): its own row went, the crashed one's stayed, and ``status``
    said "last seen 32m ago" seconds after. The new leader's beat supersedes stale every-batch
    rows of others; a live peer's (SQLite: every worker leads) and a run's own rows stay."""
    now = utcnow()
    batch_id = add_batch(engine, "old", [("fal-ai/wan-22", {"prompt": "old"})])
    _created(engine, batch_id, now - timedelta(hours=1))
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "crashed:1:", [EVERY_BATCH], now - timedelta(minutes=32))
        store.record_heartbeat(session, "peer:2:", [EVERY_BATCH], utcnow())
        store.record_heartbeat(session, "run:3:", ["other"], now - timedelta(minutes=32))
    rt = make_runtime(engine, settings_for(URL, KEY))  # no batch scope: a distributed worker
    conductor = Conductor(rt, stream=False)
    conductor._beat()
    assert _rows(engine) == {
        (beat_owner(rt.owner), EVERY_BATCH),
        ("peer:2:", EVERY_BATCH),
        ("run:3:", "other"),
    }
    conductor.close()
    with db.session_scope(engine) as session:
        store.drop_heartbeats(session, "peer:2:")  # the peer stops cleanly too
    with db.read_scope(engine) as session:
        report = batches.batch_report(session, batch_id)
    assert (report["processing"], report["processed_at"]) == (False, None)


def test_workers_last_beat_is_the_every_batch_beat_only(engine: Engine) -> None:
    """What ``run`` and ``doctor`` read to tell workers of this database from workers of another
    one that answer on the same broker: a run's own beat is no worker's."""
    now = utcnow()
    with db.session_scope(engine) as session:
        assert store.workers_last_beat(session) is None
        store.record_heartbeat(session, "run:1:", ["b1"], now)
        assert store.workers_last_beat(session) is None
        store.record_heartbeat(session, "worker:2:", [EVERY_BATCH], now - timedelta(seconds=30))
        store.record_heartbeat(session, "worker:3:", [EVERY_BATCH], now - timedelta(seconds=3))
        assert store.workers_last_beat(session) == now - timedelta(seconds=3)


def test_a_worker_that_does_not_lead_beats_as_a_worker_and_clears_on_close(engine: Engine) -> None:
    """A worker that does not lead the ticks beats too (scope ``worker``: an upgrade of the schema
    names it), which says nothing of any batch; a clean stop deletes its row."""
    from jobs.models import WORKER_SCOPE

    batch_id = add_batch(engine, "beat-follower", [("fal-ai/wan-22", {"prompt": "f"})])
    rt = make_runtime(engine, settings_for(URL, KEY))
    conductor = Conductor(rt, stream=False)
    stopping = threading.Event()
    runner = threading.Thread(
        target=conductor.run, args=(stopping,), kwargs={"resilient": True, "leads": lambda: False}
    )
    runner.start()
    try:
        deadline = utcnow() + timedelta(seconds=20)
        while _beats(engine) != {WORKER_SCOPE: beat_owner(rt.owner)} and utcnow() < deadline:
            stopping.wait(0.05)
        assert _beats(engine) == {WORKER_SCOPE: beat_owner(rt.owner)}
        assert conductor.stats.ticks == 0
        with db.read_scope(engine) as session:
            assert store.last_heartbeat(session, batch_id) is None
            assert store.workers_last_beat(session) is None
    finally:
        stopping.set()
        runner.join(20)
        conductor.close()
    assert _beats(engine) == {}


def _ended_pid() -> int:
    """The pid of a process of this host that has ended (and was reaped)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(30)
    return child.pid


def test_a_fresh_beat_of_a_process_that_has_ended_is_only_a_last_sighting(engine: Engine) -> None:
    """A killed ``run`` leaves its heartbeat behind: for the minute it stayed fresh ``status`` said
    the batch was processed (and gave it an ETA). A beat of a process of this host that has ended
    now tells when the batch was last seen, never that it is processed; beats of a live process,
    of another host, and the workers' are read as before, in as many queries."""
    import os
    import socket

    from jobs import listing

    now = utcnow()
    killed, beside, elsewhere, by_workers = (
        add_batch(engine, name, [("fal-ai/wan-22", {"prompt": name})])
        for name in ("killed", "beside", "elsewhere", "by-workers")
    )
    for batch_id in (killed, beside, elsewhere, by_workers):
        _created(engine, batch_id, now - timedelta(hours=1))
    host = socket.gethostname()
    dead = ended_beat_owner(f"{host}:{_ended_pid()}:1")  # as the killed run wrote it
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, dead, [killed, beside], now - timedelta(seconds=2))
        store.record_heartbeat(
            session, beat_owner(f"{host}:{os.getpid()}:1"), [beside], now - timedelta(seconds=20)
        )
        store.record_heartbeat(session, "otherhost:4242:1", [elsewhere], now - timedelta(seconds=2))
    with db.read_scope(engine) as session:
        beats = listing.heartbeats(session, [killed, beside, elsewhere, by_workers], now=now)
        assert beats == {
            killed: store.BatchBeat(seen=now - timedelta(seconds=2), live=None),
            beside: store.BatchBeat(seen=now - timedelta(seconds=2), live=now - timedelta(seconds=20)),
            elsewhere: store.BatchBeat(seen=now - timedelta(seconds=2), live=now - timedelta(seconds=2)),
        }
        assert [listing.is_processing(beats.get(b), now=now) for b in (killed, beside, elsewhere)] == [
            False,
            True,  # the live process works on it beside the killed one
            True,  # another host's: the staleness decides, as before
        ]
        # The last sighting is unchanged (`status`'s "last seen 2s ago").
        assert store.last_heartbeats(session, [killed])[killed] == now - timedelta(seconds=2)
        report = batches.batch_report(session, killed, now=now)
        assert (report["processing"], report["eta_seconds"]) == (False, None)
        assert report["processed_at"] == (now - timedelta(seconds=2)).isoformat()

    # The workers' leader of this host, killed: no batch is processed by it any more.
    with db.session_scope(engine) as session:
        store.record_heartbeat(
            session,
            ended_beat_owner(f"{host}:{_ended_pid()}:leader"),
            [EVERY_BATCH],
            now - timedelta(seconds=1),
        )
    with db.read_scope(engine) as session:
        beats = listing.heartbeats(session, [killed, by_workers], now=now)
        assert beats[by_workers] == store.BatchBeat(seen=now - timedelta(seconds=1), live=None)
        assert beats[killed] == store.BatchBeat(seen=now - timedelta(seconds=1), live=None)
        assert not listing.is_processing(beats[by_workers], now=now)
        assert batches.batch_report(session, by_workers, now=now)["processing"] is False
