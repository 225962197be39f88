"""A schema downgraded under a running process of a newer wanbatch (``alembic downgrade`` with
the workers left running), on SQLite and PostgreSQL.

Before: the conductor's every round failed on the missing column (``UndefinedColumn: column
jobs.not_in_manifest does not exist``; on SQLite "no such column", taken for an outage), logged
"conductor round failed; going on after a pause" with its traceback about once a second, and
its batches stalled silently. Now it reads the schema's revision as the start-up does, says in one
line that the database is at an older schema, and works on it no more: the run's loop ends with
that line (exit 2), and a worker's ticker stops the worker, which exits 2 with it.

Then: a worker that did not lead ran no round, so it met nothing and went on taking tasks on the
older schema until it took the lead; now every conductor looks at the schema's revision at its
heartbeat, leading or not. And a submit or download task queued before the downgrade met the
missing column on its own: a download's crashed (PostgreSQL: a traceback, a crash file, counted
towards pausing its batch; SQLite: "the database is unavailable" and its job given back, on the
older schema); now such a task leaves its job as it was, in one line, and so does every later
task of that worker (nothing is sent), which stops.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text

from jobs.db import SCHEMA_HEAD, downgrade, make_engine, migrate
from jobs.errors import SchemaBehindError
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, completion_heard, make_runtime, settings_for
from worker import steps, tasks
from worker import ticker as ticker_module
from worker.conductor import Conductor
from worker.steps import DOWNLOAD_QUEUE, dispatch
from worker.steps.poll import apply_seen
from worker.ticker import LEADER_LOCK_KEY, Ticker

URL = "https://queue.test"
KEY = "downgraded-key-7a2c"
#: Below 0039, ``jobs.not_in_manifest`` (which the conductor reads) is gone; a downgrade of one
#: step from the head may drop only what it never reads (0040's dashboard sessions).
_PREVIOUS = "0038"


@pytest.fixture(params=["sqlite", "postgresql"])
def downgraded(
    request: pytest.FixtureRequest, tmp_path: Path, new_pg_database: Callable[[], str]
) -> Iterator[Engine]:
    """A database of its own with a batch to work on, migrated by this version and then taken
    down one revision (as ``alembic downgrade`` by hand would, the processes still running)."""
    url = f"sqlite:///{tmp_path / 'd.db'}" if request.param == "sqlite" else new_pg_database()
    engine = make_engine(url)
    migrate(engine, from_models=False)
    add_batch(engine, "downgraded", [("fal-ai/wan-22", {"prompt": "p"})])
    yield engine
    engine.dispose()


def _said(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_workers_conductor_stops_in_one_line_on_a_schema_downgraded_under_it(
    downgraded: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    rt = make_runtime(downgraded, settings_for(URL, KEY))
    conductor = Conductor(rt, stream=False)
    downgrade(downgraded, _PREVIOUS)
    stopping = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            conductor.run(stopping, resilient=True)
        except BaseException as exc:
            failure.append(exc)

    runner = threading.Thread(target=run)
    with caplog.at_level(logging.INFO):
        runner.start()
        runner.join(30)  # only so that a conductor that goes on for ever fails the test
        stopping.set()
        runner.join(20)
    conductor.close()
    assert [type(e) for e in failure] == [SchemaBehindError], _said(caplog)
    said = str(failure[0])
    assert "\n" not in said
    assert said.startswith(
        f"the database is at schema {_PREVIOUS}, older than this wanbatch's {SCHEMA_HEAD} "
    )
    assert "stop the newer processes before a downgrade" in said
    assert not [r for r in _said(caplog) if r.exc_info or "conductor round failed" in r.getMessage()]


def test_a_workers_ticker_stops_the_worker_with_that_line(
    downgraded: Engine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ticker (a worker's conductor thread) says it in one warning line and stops its worker
    as SIGTERM does; ``wanbatch worker`` exits 2 with :attr:`Ticker.failure`."""
    stops: list[int] = []
    monkeypatch.setattr(ticker_module, "stop_this_worker", lambda: stops.append(1))
    rt = make_runtime(downgraded, settings_for(URL, KEY))
    downgrade(downgraded, _PREVIOUS)
    ticker = Ticker(lambda: rt, rt.settings.tick_interval)
    with caplog.at_level(logging.INFO):
        ticker.start()
        ticker.join(30)  # only so that a ticker that goes on for ever fails the test
        ticker.shutdown()
    assert stops == [1]
    assert isinstance(ticker.failure, SchemaBehindError)
    (line,) = [r for r in _said(caplog) if r.name == "worker.ticker"]
    assert line.getMessage() == f"{ticker.failure}; this worker stops"
    assert line.exc_info is None
    assert not [r for r in _said(caplog) if r.exc_info]


def _conduct(conductor: Conductor, **options: Any) -> list[BaseException]:
    """Run ``conductor`` (resilient, as a worker's) until it ends; what it raised."""
    stopping = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            conductor.run(stopping, resilient=True, **options)
        except BaseException as exc:
            failure.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    runner.join(30)  # only so that a conductor that goes on for ever fails the test
    stopping.set()
    runner.join(20)
    conductor.close()
    return failure


def test_a_worker_that_does_not_lead_stops_too(downgraded: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """Was: it ran no round, so it met no missing column, and went on for ever (taking tasks on
    the older schema) until it took the lead. Now its heartbeat looks at the schema's revision."""
    rt = make_runtime(downgraded, settings_for(URL, KEY))
    conductor = Conductor(rt, stream=False)
    downgrade(downgraded, _PREVIOUS)
    with caplog.at_level(logging.INFO):
        failure = _conduct(conductor, leads=lambda: False)
    assert [type(e) for e in failure] == [SchemaBehindError], _said(caplog)
    assert str(failure[0]).startswith(f"the database is at schema {_PREVIOUS}, older than this wanbatch's ")
    assert rt.schema_behind is not None  # the tasks of this process leave their jobs from now on
    assert not [r for r in _said(caplog) if r.exc_info]


#: Below 0040, ``dashboard_session_revocations`` is gone: a table no round of the conductor
#: reads, nor any of its writes; the schema still older than this wanbatch's.
_NOTHING_READ_DROPPED = "0039"


def test_a_downgrade_that_drops_nothing_the_rounds_read_is_seen_too(
    downgraded: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A leader whose rounds never meet what the downgrade dropped: its heartbeat says so."""
    rt = make_runtime(downgraded, settings_for(URL, KEY))
    conductor = Conductor(rt, stream=False)
    downgrade(downgraded, _NOTHING_READ_DROPPED)
    with caplog.at_level(logging.INFO):
        failure = _conduct(conductor)
    assert [type(e) for e in failure] == [SchemaBehindError], _said(caplog)
    assert f"the database is at schema {_NOTHING_READ_DROPPED}, older than" in str(failure[0])


def test_a_ticker_that_another_worker_leads_over_stops_its_worker(
    new_pg_database: Callable[[], str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL, where a worker leads only while it holds the advisory lock: another session
    holds it, as the leading worker would, and this worker's ticker stops its worker all the same."""
    stops: list[int] = []
    monkeypatch.setattr(ticker_module, "stop_this_worker", lambda: stops.append(1))
    url = new_pg_database()
    engine = make_engine(url)
    try:
        migrate(engine, from_models=False)
        rt = make_runtime(engine, settings_for(URL, KEY))
        dsn = url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, autocommit=True) as leader:
            assert leader.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,)).fetchone() == (True,)
            downgrade(engine, _PREVIOUS)
            ticker = Ticker(lambda: rt, rt.settings.tick_interval)
            with caplog.at_level(logging.INFO):
                ticker.start()
                ticker.join(30)  # only so that a ticker that goes on for ever fails the test
                ticker.shutdown()
    finally:
        engine.dispose()
    assert not [r for r in caplog.records if r.getMessage() == "this worker now leads the periodic tick"]
    assert stops == [1]
    assert isinstance(ticker.failure, SchemaBehindError)
    assert not [r for r in _said(caplog) if r.exc_info]


def _row(engine: Engine, job_id: str) -> tuple[Any, ...]:
    """The job as stored, read by its columns (this wanbatch's model reads those of its schema)."""
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT state, lease_owner, lease_expires_at, version, attempts, error, request_id "
                "FROM jobs WHERE id = :id"
            ),
            {"id": job_id},
        ).one()
    return tuple(row)


def test_queued_tasks_leave_their_jobs_as_they_were(
    downgraded: Engine, tmp_path: Path, hostile: HostileProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """A download and a submit queued (Celery) before the downgrade, run after it, by a worker
    whose conductor has not looked yet. Was: the download crashed on the missing column
    (PostgreSQL: Celery's traceback and a crash file, the crash counted towards pausing its batch;
    SQLite: "the database is unavailable", its job given back on the older schema), and the
    submit POSTed on the older schema. Now the download leaves its job as it was, in one line,
    and so does the submit, sending nothing: the version the schema is for (or this one, after
    an upgrade) takes them up once their leases run out."""
    fal = FakeFal(hostile)
    settings = settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs")
    rt = make_runtime(downgraded, settings)
    leader = make_runtime(downgraded, settings)
    leader.owner = "leader-host:4242:1"
    add_batch(downgraded, "queued", [(fal.endpoint, {"prompt": "a paper boat"})])  # and the fixture's
    done, to_send = dispatch(leader)  # their submit messages are queued
    assert steps.submit(rt, done) == "submitted"
    apply_seen(rt, [completion_heard(downgraded, rt, done)])  # its download message is queued
    before = {job_id: _row(downgraded, job_id) for job_id in (done, to_send)}
    assert before[done][:2] == ("downloading", DOWNLOAD_QUEUE)
    assert before[to_send][:2] == ("submitting", leader.owner)
    posts = hostile.count("POST", ".*")
    downgrade(downgraded, _PREVIOUS)
    tasks.set_runtime(rt)
    try:
        with caplog.at_level(logging.INFO):
            outcomes = [
                tasks.download_job(SimpleNamespace(app=None), done),
                tasks.submit_job(SimpleNamespace(app=None), to_send),
            ]
    finally:
        tasks.set_runtime(None)
    assert outcomes == ["schema-behind", "schema-behind"]
    assert {job_id: _row(downgraded, job_id) for job_id in (done, to_send)} == before
    assert hostile.count("POST", ".*") == posts  # nothing sent on the older schema
    assert rt.schema_behind is not None
    assert rt.schema_behind.startswith(
        f"the database is at schema {_PREVIOUS}, older than this wanbatch's {SCHEMA_HEAD}"
    )
    assert not [r for r in caplog.records if r.exc_info]
    lines = [r for r in caplog.records if r.__dict__.get("event") == "step.schema_behind"]
    assert [(r.levelno, r.__dict__["job_id"]) for r in lines] == [
        (logging.WARNING, done),
        (logging.INFO, to_send),
    ]
    assert rt.schema_behind in lines[0].getMessage()
    assert not [r for r in _said(caplog) if r not in lines]  # no "unavailable", no crash
