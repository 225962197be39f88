"""A broker the workers' leader cannot reach is an outage, like the database's: one warning line.

The bug (distributed-operator audit): while Redis was down the leader logged ``ERROR
worker.conductor: conductor round failed; going on after a pause`` with the chained
kombu/redis traceback about once a second (31 in 18 s). kombu's ``OperationalError`` was not
recognised as an outage. Here a real Celery app publishes to a Redis port nothing listens on.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from pathlib import Path

import kombu.exceptions
import pytest
import redis.exceptions
from sqlalchemy import Engine, select

from cli.output import progress_text
from jobs import batches, db
from jobs.listing import utc_clock
from jobs.models import ConductorHeartbeat, utcnow
from tests.ports import unused_port
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.app import make_app
from worker.broker_outage import BrokerOutage, broker_problem
from worker.conductor import Conductor
from worker.limits import LocalGCRA
from worker.tasks import SUBMIT_TASK, redis_epoch, register_tasks

KEY = "broker-outage-key-3f8a"
SECRET = "broker-pass-91c4"


def test_a_round_whose_hand_off_finds_the_broker_down_logs_one_warning_and_no_traceback(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = f"redis://:{SECRET}@127.0.0.1:{unused_port()}/0"  # nothing listens: connection refused
    app = make_app(broker)
    register_tasks(app)
    stopping = threading.Event()
    failed: list[BaseException] = []

    def hand_off(job_id: str) -> None:
        try:
            app.tasks[SUBMIT_TASK].apply_async((job_id,))
        except Exception as exc:
            failed.append(exc)
            if len(failed) == 1:  # a job for a later round to hand off: the loop must go on to it
                add_batch(engine, "broker-down-later", [("fal-ai/wan-22", {"prompt": "later"})])
            else:
                stopping.set()
            raise

    settings = settings_for("http://127.0.0.1:9", KEY, output_dir=tmp_path / "out", broker_url=broker)
    rt = make_runtime(engine, settings, enqueue_submit=hand_off)
    # The limiter elsewhere (as with WANBATCH_LIMITS_URL): on the broker's Redis it would fail
    # closed and nothing would be claimed; here the round's hand-off is what meets the outage.
    rt.limiter = LocalGCRA(settings)
    add_batch(engine, "broker-down", [("fal-ai/wan-22", {"prompt": "first"})])
    caplog.set_level(logging.DEBUG)
    guard = threading.Timer(60, stopping.set)  # never hang: the asserts below then fail
    guard.start()
    try:
        Conductor(rt, stream=False).run(stopping, leads=lambda: True, resilient=True)
    finally:
        guard.cancel()
        rt.client.close()

    assert len(failed) == 2  # the round after the first failure went on, and met it again
    assert broker_problem(failed[0]) is not None, repr(failed[0])
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    said = [r for r in caplog.records if getattr(r, "event", None) == "conductor.broker_unavailable"]
    assert len(said) == 1  # once, then at most every 30 s: not once per round
    text = said[0].getMessage()
    assert said[0].levelno == logging.WARNING
    assert "cannot be reached" in text
    assert SECRET not in text
    assert "127.0.0.1" in text


def test_the_broker_warning_repeats_at_most_every_interval() -> None:
    now = [0.0]
    outage = BrokerOutage("redis://127.0.0.1:6379/0", every=30.0, clock=lambda: now[0])
    said: list[float] = []
    logger = logging.getLogger("worker.broker_outage")

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.WARNING:
                said.append(now[0])

    handler = Count()
    logger.addHandler(handler)
    try:
        for second in range(0, 95, 1):
            now[0] = float(second)
            outage.failed("OperationalError: Error 111 connecting to 127.0.0.1:6379. Connection refused.")
            if second == 50:
                outage.answered()  # a round went through: the next failure is a new outage
    finally:
        logger.removeHandler(handler)
    assert said == [0.0, 30.0, 60.0, 90.0]


def _broker_down_since(engine: Engine) -> list[datetime | None]:
    with db.read_scope(engine) as session:
        return list(session.scalars(select(ConductorHeartbeat.broker_down_since)))


def _down() -> str:
    """What :func:`worker.tasks.redis_epoch` does when Redis does not answer: its client's error."""
    raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def test_the_epoch_of_a_redis_that_does_not_answer_raises_its_clients_error() -> None:
    epoch = redis_epoch(f"redis://127.0.0.1:{unused_port()}/0")  # nothing listens
    assert epoch is not None
    with pytest.raises(redis.exceptions.ConnectionError):
        epoch()


def test_an_idle_leader_records_the_broker_down_from_its_tick_and_the_tick_goes_on(
    engine: Engine, tmp_path: Path
) -> None:
    """The bug (stop 64's CI): a leader with nothing to hand on learnt of a broker that did not
    answer only from its next hand-off, so ``status`` did not name the broker meanwhile. Its
    tick asks the broker's epoch anyway: that it does not answer is enough."""
    down = [True]
    settings = settings_for(
        "http://127.0.0.1:9", KEY, output_dir=tmp_path / "out", broker_url="redis://127.0.0.1:6379/0"
    )
    rt = make_runtime(engine, settings)
    rt.limiter = LocalGCRA(settings)
    rt.broker_epoch = lambda: _down() if down[0] else "run-id-1"
    conductor = Conductor(rt, stream=False)
    try:
        conductor._tick(threading.Event())  # nothing to hand on: no round fails
        (since,) = _broker_down_since(engine)
        assert since is not None
        assert conductor.stats.ticks == 1
        down[0] = False
        conductor._tick(threading.Event())
        (cleared,) = _broker_down_since(engine)
        assert cleared is None
    finally:
        conductor.close()
        rt.client.close()


def test_status_names_the_broker_while_the_leader_cannot_reach_it_and_forgets_it_once_it_answers(
    engine: Engine, tmp_path: Path
) -> None:
    """The bug (distributed-operator audit, item 4): during a Redis outage ``status BATCH`` blamed
    the download backlog, gave an ETA and said nothing of the broker, while ``run`` said "cannot
    reach the broker". The leader records the outage on its heartbeat; ``status`` names it."""
    broker = f"redis://:{SECRET}@127.0.0.1:6379/0"
    down = [True]
    handed: list[str] = []
    stopping = threading.Event()

    def hand_off(job_id: str) -> None:
        if down[0]:
            stopping.set()  # the round's failure is handled, then the run ends
            raise kombu.exceptions.OperationalError(
                "Error 111 connecting to 127.0.0.1:6379. Connection refused."
            )
        handed.append(job_id)

    settings = settings_for("http://127.0.0.1:9", KEY, output_dir=tmp_path / "out", broker_url=broker)
    rt = make_runtime(engine, settings, enqueue_submit=hand_off)
    rt.limiter = LocalGCRA(settings)
    rt.broker_epoch = lambda: _down() if down[0] else "run-id-1"  # Redis's INFO: no answer while down
    batch_id = add_batch(
        engine, "broker-down-status", [("fal-ai/wan-22", {"prompt": str(i)}) for i in range(3)]
    )
    conductor = Conductor(rt, stream=False)
    guard = threading.Timer(60, stopping.set)  # never hang: the asserts below then fail
    guard.start()
    try:
        conductor.run(stopping, leads=lambda: True, resilient=True)
    finally:
        guard.cancel()

    (since,) = _broker_down_since(engine)
    assert since is not None
    now = utcnow()  # one now for the report and the words expected (dated past midnight)
    with db.read_scope(engine) as session:
        report = batches.batch_report(session, batch_id, now=now, broker_url=broker)
    assert report["broker_unreachable_since"] == since.isoformat()
    assert report["processing"] is True  # the leader still works: it is the broker that does not
    assert report["eta_seconds"] is None
    reason = report["phase_reason"] or ""
    assert reason.startswith("the workers cannot reach the broker (WANBATCH_BROKER_URL redis://")
    assert f"since {utc_clock(since, now=now)}: submits and downloads wait for it" in reason
    assert "127.0.0.1:6379" in reason
    assert SECRET not in reason
    assert "backlog" not in reason
    assert "no ETA: the workers cannot reach the broker" in progress_text(report, distributed=True)

    down[0] = False  # the broker answers again: the next tick clears it at once
    try:
        conductor._tick(threading.Event())
        (cleared,) = _broker_down_since(engine)
        assert cleared is None
        with db.read_scope(engine) as session:
            report = batches.batch_report(session, batch_id, broker_url=broker)
        assert report["broker_unreachable_since"] is None
        assert "broker" not in (report["phase_reason"] or "")
    finally:
        conductor.close()
        rt.client.close()
