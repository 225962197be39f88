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
from tests.step_runtime import add_batch, make_runtime, settings_for
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
    assert _beats(engine) == {first: rt.owner, second: rt.owner}
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
        while _beats(engine) != {EVERY_BATCH: rt.owner} and utcnow() < deadline:
            stopping.wait(0.05)
        assert _beats(engine) == {EVERY_BATCH: rt.owner}
        with db.read_scope(engine) as session:
            assert store.last_heartbeat(session, batch_id) is not None
            assert store.last_heartbeats(session, [batch_id, "unknown"]).keys() == {batch_id, "unknown"}
    finally:
        stopping.set()
        runner.join(20)
        conductor.close()
    assert _beats(engine) == {}


def test_the_newest_beat_of_a_batch_counts_its_own_and_every_batch(engine: Engine) -> None:
    now = utcnow()
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "run:1:", ["b1"], now - timedelta(minutes=10))
        store.record_heartbeat(session, "worker:2:", [EVERY_BATCH], now - timedelta(minutes=2))
        store.record_heartbeat(session, "run:3:", ["b2"], now)
    with db.read_scope(engine) as session:
        beats = store.last_heartbeats(session, ["b1", "b2", "b3"])
        assert beats == {
            "b1": now - timedelta(minutes=2),
            "b2": now,
            "b3": now - timedelta(minutes=2),
        }
    with db.session_scope(engine) as session:
        store.drop_heartbeats(session, "worker:2:")
    with db.read_scope(engine) as session:
        assert store.last_heartbeats(session, ["b1", "b3"]) == {"b1": now - timedelta(minutes=10)}

    # A process that died a week ago left its row: the next beat of anyone forgets it.
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "died:4:", ["b4"], now - store.HEARTBEAT_KEPT - timedelta(seconds=1))
        store.record_heartbeat(session, "run:3:", ["b2"], now)
    with db.read_scope(engine) as session:
        assert store.last_heartbeats(session, ["b1", "b4"]) == {"b1": now - timedelta(minutes=10)}
