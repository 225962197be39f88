"""A distributed worker's task whose step the database failed gives its job back once it answers.

The bug: an embedded run's steps gave their job back as soon as the database answered again,
but a Celery task (``worker.tasks``) only logged its line and left the job leased until
``WANBATCH_LEASE_SECONDS`` ran out — two minutes in which its outstanding slot sat idle. Worse,
a submit's job is leased to the tick leader that dispatched it, often another process, so a
"give back this process's leases" could not have freed it anyway. Both deployments now share
:mod:`worker.step_outage`: one warning line, and the job back at once, whoever leased it.

The task runs as a Celery worker would run it (``submit_job`` / ``download_job``, this process's
runtime), with a step that fails as the database fails it; on SQLite and on PostgreSQL. On
PostgreSQL the outage is real (:func:`_down`): the test's own database refuses connections
(``ALLOW_CONNECTIONS false``) and its backends are terminated, so the real step meets psycopg's
own error, and the give-back psycopg's own refusals until the database allows connections again.
On SQLite the step is made to fail with SQLite's own error for a vanished folder (an open
connection to a file outlives its folder, so a real one cannot be had within a test).

A table that is gone is no outage: a submission fal accepted that cannot be recorded for that
reason is left to the journal at once, not retried for the lease plus
``WANBATCH_SUBMIT_UNKNOWN_DEADLINE`` (twelve minutes by default, which a run sat waiting).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from jobs import db, store
from jobs.db import make_engine, migrate
from jobs.models import Job
from jobs.states import JobState
from tests.conftest import PG_ADMIN_DSN
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, completion_heard, make_runtime, settings_for
from worker import step_outage, steps, tasks
from worker.steps import DOWNLOAD_QUEUE, Runtime, dispatch
from worker.steps.poll import apply_seen
from worker.steps.unrecorded import PREFIX

S = JobState
KEY = "step-outage-key-5b2c"
#: Who dispatched the job: the tick leader, in another process than the task's.
LEADER = "leader-host:4242:1"
JOB = ("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})


#: What the step's warning line quotes of the database's refusal, per dialect: SQLite's for a
#: vanished folder, and PostgreSQL's (through psycopg) for a database that allows no connections.
SAID = {
    "sqlite": "OperationalError: unable to open database file",
    "postgresql": "OperationalError: connection failed:",
}
REFUSED = "is not currently accepting connections"


def _unavailable() -> OperationalError:
    """What a step meets on SQLite when the database went away (the file's folder vanished)."""
    return OperationalError("SELECT 1", {}, sqlite3.OperationalError("unable to open database file"))


def _allow_connections(engine: Engine, allow: bool) -> None:
    """Let this test's own PostgreSQL database (never the shared server) take connections or
    not; when not, its open connections are ended too (``pg_terminate_backend``)."""
    name = engine.url.database
    assert name is not None
    assert name.startswith("wanbatch_t_"), name  # the run's own database
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}')
        if not allow:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
    if not allow:
        engine.dispose()  # the pool's (now dead) connections: the next unit of work connects anew


@contextlib.contextmanager
def _down(engine: Engine, monkeypatch: pytest.MonkeyPatch, step: str) -> Iterator[None]:
    """The database unavailable to the step named ``step`` while the block runs.

    PostgreSQL: for real, to every connection (the step's and the give-back's), until the block
    ends. SQLite: the step fails with SQLite's own error (the give-back finds the file)."""
    if engine.dialect.name == "sqlite":
        with monkeypatch.context() as patched:
            patched.setattr(steps, step, _failing(step, _unavailable()))
            yield
        return
    _allow_connections(engine, False)
    try:
        yield
    finally:
        _allow_connections(engine, True)


def _failing(name: str, exc: Exception) -> Callable[[Runtime, str], str]:
    """A step named ``name`` (as the real one) that fails with ``exc``."""

    def step(_rt: Runtime, _job_id: str) -> str:
        raise exc

    step.__name__ = name
    return step


@pytest.fixture
def worker_rt(
    engine: Engine, tmp_path: Path, hostile: HostileProvider
) -> Iterator[tuple[Runtime, list[str]]]:
    """This process's task runtime, and what it told the tick leader (``kind:job_id``)."""
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    told: list[str] = []
    rt.notify = lambda kind, job_id: told.append(f"{kind}:{job_id}")
    tasks.set_runtime(rt)
    yield rt, told
    tasks.set_runtime(None)


def _task() -> Any:
    """What Celery binds a task to: only its app is read (the runtime is installed)."""
    return SimpleNamespace(app=None)


def _job(engine: Engine, job_id: str) -> Job:
    with db.read_scope(engine) as session:
        return store.get_job(session, job_id)


def _until(engine: Engine, job_id: str, holds: Callable[[Job], bool]) -> Job:
    """The job once ``holds`` says so (the give-back runs on a thread of its own)."""
    deadline = time.monotonic() + 15
    while not holds(job := _job(engine, job_id)):
        assert time.monotonic() < deadline, f"never reached: {job.state} leased to {job.lease_owner}"
        time.sleep(0.02)
    return job


def _dispatched_by_leader(engine: Engine, tmp_path: Path, hostile: HostileProvider) -> str:
    """One job claimed for its submit by the tick leader of another process."""
    leader = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    leader.owner = LEADER
    add_batch(engine, "outage", [JOB])
    (job_id,) = dispatch(leader)
    assert _job(engine, job_id).lease_owner == LEADER
    return job_id


def test_a_submit_task_the_database_failed_gives_its_job_back_once_it_answers(
    engine: Engine,
    tmp_path: Path,
    hostile: HostileProvider,
    worker_rt: tuple[Runtime, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Was: left ``submitting``, leased to the leader, until the lease ran out."""
    _rt, told = worker_rt
    job_id = _dispatched_by_leader(engine, tmp_path, hostile)
    with _down(engine, monkeypatch, "submit"), caplog.at_level(logging.WARNING):
        assert tasks.submit_job(_task(), job_id) == "database-unavailable"
    back = _until(engine, job_id, lambda job: job.state == S.PENDING)
    assert (back.lease_owner, back.lease_expires_at) == (None, None)
    assert back.attempts == 0  # never sent: the attempt is not counted
    step_outage_done(tasks._give_back)  # it tells the conductor after its commit
    assert f"freed:{job_id}" in told  # the leader dispatches it again now
    (line,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.exc_info is None  # one line, no traceback
    assert "submit of job" in line.getMessage()
    assert SAID[engine.dialect.name] in line.getMessage()  # what the database (or psycopg) said
    if engine.dialect.name == "postgresql":
        assert REFUSED in line.getMessage()


def test_the_job_is_given_back_only_once_the_database_answers_again(
    engine: Engine,
    tmp_path: Path,
    hostile: HostileProvider,
    worker_rt: tuple[Runtime, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL: the give-back's tries are refused for as long as the database allows no
    connections. SQLite: its first two tries fail with SQLite's error."""
    _rt, told = worker_rt
    job_id = _dispatched_by_leader(engine, tmp_path, hostile)
    real = store.release_step_jobs
    tries: list[str] = []  # what each try of the give-back met

    def counted(*args: Any, **kwargs: Any) -> store.ReleasedLeases:
        if engine.dialect.name == "sqlite" and len(tries) < 2:
            tries.append("refused: " + db.database_problem(_unavailable()))
            raise _unavailable()
        try:
            got = real(*args, **kwargs)
        except Exception as exc:
            tries.append("refused: " + db.database_problem(exc))
            raise
        tries.append("given back")
        return got

    monkeypatch.setattr(store, "release_step_jobs", counted)
    with _down(engine, monkeypatch, "submit"):
        assert tasks.submit_job(_task(), job_id) == "database-unavailable"
        _poll(lambda: len(tries) >= 2, "the give-back never tried twice")
    _until(engine, job_id, lambda job: job.state == S.PENDING)
    step_outage_done(tasks._give_back)  # it tells the conductor after its commit: wait for that too
    *refused, given = tries
    assert given == "given back", tries
    assert len(refused) >= 2, tries
    assert all(f"refused: {SAID[engine.dialect.name]}" in one for one in refused), tries
    assert told == [f"freed:{job_id}"]


def test_a_submission_that_may_have_gone_out_is_left_to_the_reconciler(
    engine: Engine,
    tmp_path: Path,
    hostile: HostileProvider,
    worker_rt: tuple[Runtime, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt, told = worker_rt
    job_id = _dispatched_by_leader(engine, tmp_path, hostile)
    with db.session_scope(engine) as session:  # the POST's input recorded: it may be at fal
        job = store.get_job(session, job_id)
        taken = store.take_lease(
            session, store.Fence.of(job, rt.owner), now=job.updated_at, lease_seconds=60, submitted_input={}
        )
        assert taken is not None
    with _down(engine, monkeypatch, "submit"):
        assert tasks.submit_job(_task(), job_id) == "database-unavailable"
    step_outage_done(tasks._give_back)
    left = _job(engine, job_id)
    assert (left.state, left.lease_owner) == (S.SUBMITTING, rt.owner)
    assert told == []


def test_a_download_task_the_database_failed_hands_its_job_on_once_it_answers(
    engine: Engine,
    tmp_path: Path,
    hostile: HostileProvider,
    worker_rt: tuple[Runtime, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakeFal(hostile)
    rt, told = worker_rt
    add_batch(engine, "outage", [JOB])
    (job_id,) = dispatch(rt)
    assert steps.submit(rt, job_id) == "submitted"
    apply_seen(rt, [completion_heard(engine, rt, job_id)])  # a download message is queued
    assert _job(engine, job_id).lease_owner == DOWNLOAD_QUEUE
    with _down(engine, monkeypatch, "download"):
        assert tasks.download_job(_task(), job_id) == "database-unavailable"
    freed = _until(engine, job_id, lambda job: job.lease_owner is None)
    assert freed.state == S.DOWNLOADING  # the tick hands it on at once
    step_outage_done(tasks._give_back)  # it tells the conductor after its commit
    assert f"freed:{job_id}" in told


def test_a_task_failing_for_another_reason_still_raises_and_keeps_its_job(
    engine: Engine,
    tmp_path: Path,
    hostile: HostileProvider,
    worker_rt: tuple[Runtime, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug is Celery's to log with its traceback; the job's lease runs out for the reconciler."""
    job_id = _dispatched_by_leader(engine, tmp_path, hostile)
    monkeypatch.setattr(steps, "submit", _failing("submit", RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        tasks.submit_job(_task(), job_id)
    step_outage_done(tasks._give_back)
    kept = _job(engine, job_id)
    assert (kept.state, kept.lease_owner) == (S.SUBMITTING, LEADER)


def _poll(holds: Callable[[], bool], never: str) -> None:
    """Until ``holds`` (a bounded wait: fails with ``never`` after 15 s)."""
    deadline = time.monotonic() + 15
    while not holds():
        assert time.monotonic() < deadline, never
        time.sleep(0.02)


def step_outage_done(give_back: step_outage.GiveBack) -> None:
    """Until ``give_back`` has no job left to try (its thread ends then)."""
    deadline = time.monotonic() + 15
    while give_back._thread is not None:
        assert time.monotonic() < deadline, "the give-back never ended"
        time.sleep(0.02)


def test_an_accepted_submission_a_missing_table_refuses_is_left_to_the_journal_at_once(
    sqlite_url: str, tmp_path: Path, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: "the database is unreachable … retrying", once a second for a minute at the least."""
    engine = make_engine(sqlite_url)
    migrate(engine)
    try:
        FakeFal(hostile)
        settings = settings_for(
            hostile.url,
            KEY,
            database_url=sqlite_url,
            output_dir=tmp_path / "outputs",
            submit_unknown_deadline=0.0,  # an unreachable database would be tried for a minute
        )
        rt = make_runtime(engine, settings)
        add_batch(engine, "vanished", [JOB])
        (job_id,) = dispatch(rt)
        tries: list[int] = []

        def vanished(*_args: Any, **_kwargs: Any) -> bool:
            tries.append(1)
            raise OperationalError("UPDATE jobs", {}, sqlite3.OperationalError("no such table: jobs"))

        monkeypatch.setattr(store, "mark_submitted", vanished)
        assert steps.submit(rt, job_id) == "unrecorded"
        assert len(tries) == 1  # not tried again
        (journal,) = tmp_path.glob(f"{PREFIX}*")  # beside the database: the next run records it
        assert f'"job_id": "{job_id}"' in journal.read_text()
    finally:
        engine.dispose()
