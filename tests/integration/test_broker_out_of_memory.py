"""A Redis broker that answers but refuses writes (out of memory) is an outage for the leader.

The bug (Redis-out-of-memory audit, item 2): with the broker's Redis full (``maxmemory`` reached
under ``noeviction``) the leader's hand-off failed and it said "the broker … cannot be reached
(… command not allowed when used memory > 'maxmemory')" — the wrong words for a Redis that
answers — and recorded the outage on its heartbeat; but the very next tick asked Redis's
``INFO`` (the broker-restart check), which a full Redis still answers, and cleared it. ``status``
then said nothing of the broker (an ETA in text, ``broker_unreachable_since: null`` in JSON).

Now the outage of a broker that refuses writes ends only once a hand-off goes through again.
Real Redis: a private ``redis-server`` on a free port (never the shared one), made full with
``CONFIG SET maxmemory``; a real Celery app publishes to it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, select

from jobs import batches, db
from jobs.models import ConductorHeartbeat
from tests.chaos.chaos_harness import RedisServer
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.app import make_app
from worker.conductor import Conductor
from worker.limits import LocalGCRA
from worker.tasks import SUBMIT_TASK, redis_epoch, register_tasks

KEY = "broker-oom-key-5d1e"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _maxmemory(url: str, value: str) -> None:
    """``CONFIG SET maxmemory``: ``"1"`` makes every write fail (the server uses more than a
    byte; its policy is ``noeviction``), ``"0"`` lifts the limit."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.config_set("maxmemory", value)
    finally:
        client.close()


def _broker_down_since(engine: Engine) -> list[datetime | None]:
    with db.read_scope(engine) as session:
        return list(session.scalars(select(ConductorHeartbeat.broker_down_since)))


def test_a_broker_out_of_memory_is_said_so_and_stays_an_outage_until_a_hand_off_goes_through(
    engine: Engine, tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    broker = redis_server.url
    app = make_app(broker)
    register_tasks(app)
    stopping = threading.Event()
    failed: list[BaseException] = []
    handed: list[str] = []

    def hand_off(job_id: str) -> None:
        try:
            app.tasks[SUBMIT_TASK].apply_async((job_id,))
        except Exception as exc:
            failed.append(exc)
            stopping.set()  # the round's failure is handled, then the run ends
            raise
        handed.append(job_id)
        stopping.set()

    settings = settings_for("http://127.0.0.1:9", KEY, output_dir=tmp_path / "out", broker_url=broker)
    rt = make_runtime(engine, settings, enqueue_submit=hand_off)
    rt.limiter = LocalGCRA(settings)  # the limiter elsewhere: the hand-off is what meets the full Redis
    rt.broker_epoch = redis_epoch(broker)  # Redis's INFO, as a worker's runtime asks it
    conductor = Conductor(rt, stream=False)
    caplog.set_level(logging.DEBUG)
    guard = threading.Timer(60, stopping.set)  # never hang: the asserts below then fail
    guard.start()
    try:
        # The broker's incarnation is known (its marker key written) before Redis fills up: a
        # full Redis whose marker is gone is an incarnation unknown, which clears nothing either.
        assert rt.broker_epoch is not None
        assert rt.broker_epoch() is not None
        _maxmemory(broker, "1")
        batch_id = add_batch(engine, "broker-full", [("fal-ai/wan-22", {"prompt": "full"})])
        conductor.run(stopping, leads=lambda: True, resilient=True)

        assert len(failed) == 1, failed
        assert not handed
        said = [r for r in caplog.records if getattr(r, "event", None) == "conductor.broker_unavailable"]
        assert len(said) == 1
        text = said[0].getMessage()
        assert f"the broker at {broker} refuses writes (out of memory)" in text, text
        assert "cannot be reached" not in text
        assert "command not allowed when used memory > 'maxmemory'" in text
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
        (since,) = _broker_down_since(engine)
        assert since is not None

        # Still full: the next tick's INFO is answered (a full Redis answers reads), which is no
        # sign that it takes writes again. The outage stays, and so does what status says.
        assert rt.broker_epoch is not None
        assert rt.broker_epoch() is not None
        conductor._tick(threading.Event())
        assert _broker_down_since(engine) == [since]
        with db.read_scope(engine) as session:
            report = batches.batch_report(session, batch_id, broker_url=broker)
        assert report["broker_unreachable_since"] == since.isoformat()
        assert report["eta_seconds"] is None
        assert (report["phase_reason"] or "").startswith("the workers cannot reach the broker")

        # Room again: the first hand-off that goes through ends the outage.
        _maxmemory(broker, "0")
        add_batch(engine, "broker-room-again", [("fal-ai/wan-22", {"prompt": "room"})])
        stopping.clear()
        conductor.run(stopping, leads=lambda: True, resilient=True)
        assert len(handed) == 1
        assert _broker_down_since(engine) == [None]
        with db.read_scope(engine) as session:
            report = batches.batch_report(session, batch_id, broker_url=broker)
        assert report["broker_unreachable_since"] is None
    finally:
        guard.cancel()
        conductor.close()
        rt.client.close()
