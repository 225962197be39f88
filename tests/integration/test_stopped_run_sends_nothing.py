"""A run that stops sends no new submit while it waits for the answers of those already out.

The stop now waits for fal's answers up to ``WANBATCH_READ_TIMEOUT`` (it waited 3 s, and the
answers that came later were lost: their jobs failed ``submit_unknown``, paid for). A submit step
that had got past its lease as the stop began would then have sent a new POST — billed, with
nobody waiting for its answer. It gives its job back unsent instead, due at once for the next run.
"""

from __future__ import annotations

import importlib
import io
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import Engine, text, update
from sqlalchemy.exc import OperationalError

from jobs import db, store
from jobs.errors import WanbatchError
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.hostile import HostileProvider, json_reply
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker import running
from worker.conductor import Conductor
from worker.db_outage import DatabaseUnavailableError
from worker.runtime import close_runtime
from worker.steps import Runtime, dispatch, submit
from worker.steps.reconcile import reconcile
from worker.steps.unrecorded import read_journal

#: The submit step's module (``worker.steps.submit`` is also the name of its function).
submit_step = importlib.import_module("worker.steps.submit")
T2V = "fal-ai/wan-22"
KEY = "4b2e9d1c-7a3f-4e5d-9c8b-1a2b3c4d5e6f:9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"


def test_a_claimed_job_goes_back_unsent_once_the_run_stops(engine: Engine, hostile: HostileProvider) -> None:
    hostile.route("POST", rf"/{T2V}", json_reply({"request_id": "never-used"}))
    batch_id = add_batch(engine, "stopping", [(T2V, {"prompt": "a lighthouse"})])
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    try:
        (job_id,) = dispatch(rt)
        assert rt.unrecorded.stop_sending() == 0  # Ctrl-C: nothing more goes out
        assert submit(rt, job_id) == "stopped"
    finally:
        rt.client.close()
    assert hostile.count("POST", rf"/{T2V}") == 0
    with db.read_scope(engine) as session:
        (job,) = store.jobs_of_batch(session, batch_id)
    unsent = (job.state, job.submitted_input, job.sent_at, job.lease_owner)
    assert unsent == (JobState.PENDING, None, None, None)
    assert job.attempts == 0  # not counted: nothing was sent


def test_a_step_that_meets_the_stop_records_no_send_a_failed_give_back_could_strand(
    engine: Engine, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: a step that met the stop recorded its send first (``record_send``: the exact input
    and ``sent_at``, which say "its POST may be out"), and only then, finding the run stopped,
    gave its job back. When that give-back did not land (the database stopped answering as the
    run stopped; or the process ended first), the job was left ``submitting`` with its input
    recorded though nothing went to fal: once its lease ran out the reconciler failed it
    ``submit_unknown`` ("possibly billed"), and ``rerun --failed-only`` paid for it. A step that
    finds the run stopped before it records the send gives its job back as never sent: should
    that give-back fail, the job reads as claimed but unsent, back to ``pending`` at once."""
    hostile.route("POST", rf"/{T2V}", json_reply({"request_id": "never-used"}))
    batch_id = add_batch(engine, "stopping-db-gone", [(T2V, {"prompt": "a harbour at dawn"})])
    rt = make_runtime(engine, settings_for(hostile.url, KEY))

    def unavailable(*_args: Any, **_kwargs: Any) -> bool:
        raise OperationalError("UPDATE jobs", {}, Exception("connection refused"))

    try:
        (job_id,) = dispatch(rt)
        assert rt.unrecorded.stop_sending() == 0  # Ctrl-C, as the database stops answering
        with monkeypatch.context() as gone:
            gone.setattr(store, "give_back", unavailable)
            with pytest.raises(OperationalError):
                submit(rt, job_id)
        assert hostile.count("POST", rf"/{T2V}") == 0
        with db.read_scope(engine) as session:
            (job,) = store.jobs_of_batch(session, batch_id)
        assert (job.state, job.submitted_input, job.sent_at) == (JobState.SUBMITTING, None, None)
        # Its lease runs out (the stopped process is gone): the reconciler sends it again later,
        # never calls it a submit of unknown outcome.
        with db.session_scope(engine) as session:
            session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow()))
        reconcile(rt)
    finally:
        rt.client.close()
    with db.read_scope(engine) as session:
        (job,) = store.jobs_of_batch(session, batch_id)
    assert (job.state, job.error_type, job.attempts) == (JobState.PENDING, None, 0)


def test_a_stop_that_comes_as_the_send_is_recorded_leaves_no_unsent_job_possibly_billed(
    engine: Engine, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop lands after the step's last look at it and before its send's record commits,
    and the database refuses the give-back (it stops answering as the run stops). The step
    found the run stopped only after its record committed and gave the job back then: that
    give-back failing left the job ``submitting`` with its input and ``sent_at`` recorded though
    nothing went to fal, failed ``submit_unknown`` ("possibly billed") by the next run's
    reconciler, and paid for by ``rerun --failed-only``. Now the step asks, before its record
    commits, in one step with the stop: the record is rolled back, nothing is sent, and the job
    reads as never sent (the next run sends it)."""
    hostile.route("POST", rf"/{T2V}", json_reply({"request_id": "never-used"}))
    batch_id = add_batch(engine, "stopping-mid-record", [(T2V, {"prompt": "a kite over dunes"})])
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    real_record_send = store.record_send
    in_flight: list[int] = []

    def stopped_then_recorded(*args: Any, **kwargs: Any) -> Any:
        in_flight.append(rt.unrecorded.stop_sending())  # Ctrl-C, as the record is written
        return real_record_send(*args, **kwargs)

    def unavailable(*_args: Any, **_kwargs: Any) -> bool:
        raise OperationalError("UPDATE jobs", {}, Exception("connection refused"))

    try:
        (job_id,) = dispatch(rt)
        monkeypatch.setattr(store, "record_send", stopped_then_recorded)
        monkeypatch.setattr(store, "give_back", unavailable)
        with pytest.raises(OperationalError):
            submit(rt, job_id)
        assert rt.unrecorded.in_flight() == 0
    finally:
        rt.client.close()
    assert in_flight == [0]  # nothing for the stop to wait for, nor to call sent to fal
    assert hostile.count("POST", rf"/{T2V}") == 0
    with db.read_scope(engine) as session:
        (job,) = store.jobs_of_batch(session, batch_id)
    assert (job.state, job.submitted_input, job.sent_at) == (JobState.SUBMITTING, None, None)


def test_a_stop_that_comes_once_the_send_is_recorded_lets_its_post_go_and_records_it(
    engine: Engine, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop lands once the step's record of its send committed: the POST goes (counted in
    flight, the stop waits for its answer) and its answer is recorded — never undone by a
    give-back that might not land, leaving a job "its POST may be out" though nothing went."""
    hostile.route("POST", rf"/{T2V}", json_reply({"request_id": "a1b2c3d4-0000-4000-8000-000000000001"}))
    batch_id = add_batch(engine, "stopping-after-record", [(T2V, {"prompt": "a kite over dunes"})])
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    real_send_now = submit_step._send_now
    in_flight: list[int] = []

    def recorded_then_stopped(*args: Any, **kwargs: Any) -> Any:
        in_flight.append(rt.unrecorded.stop_sending())  # Ctrl-C, right after the record committed
        return real_send_now(*args, **kwargs)

    try:
        (job_id,) = dispatch(rt)
        monkeypatch.setattr(submit_step, "_send_now", recorded_then_stopped)
        assert submit(rt, job_id) == "submitted"
    finally:
        rt.client.close()
    assert in_flight == [1]  # the stop waits for its answer (worker.running._wait_for_answers)
    assert hostile.count("POST", rf"/{T2V}") == 1
    with db.read_scope(engine) as session:
        (job,) = store.jobs_of_batch(session, batch_id)
    assert (job.state, job.request_id) == (JobState.QUEUED, "a1b2c3d4-0000-4000-8000-000000000001")


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_send_whose_record_waits_for_another_sessions_lock_at_the_stop_is_not_sent(
    engine: Engine, hostile: HostileProvider
) -> None:
    """Review: the step's POST was counted in flight from before its record's write, so a
    record waiting for another session's lock (``LOCK TABLE jobs``) at Ctrl-C was one of the
    "submit(s) already sent to fal" the stop waited for (up to ``WANBATCH_READ_TIMEOUT``) and
    said "fal may have accepted and billed" — fal had nothing — and once the lock went, the
    step recorded its send and POSTed, billed, after the run had stopped. Now that record rolls
    back when it finds the run stopped: nothing sent, nothing counted, the job back unsent."""
    hostile.route("POST", rf"/{T2V}", json_reply({"request_id": "never-used"}))
    batch_id = add_batch(engine, "stopping-locked", [(T2V, {"prompt": "a mill in the rain"})])
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    outcome: list[str] = []
    holder = engine.connect()
    try:
        (job_id,) = dispatch(rt)
        locked = holder.begin()
        holder.execute(text("LOCK TABLE jobs IN SHARE MODE"))  # another session's, before the stop
        step = threading.Thread(target=lambda: outcome.append(submit(rt, job_id)))
        step.start()
        # Any session of this database waiting for a lock: the step's (the holder waits for
        # nothing). Not by its query's text: a statement psycopg has prepared takes its locks at
        # Bind, before PostgreSQL reports the statement, so the text shown is still the previous
        # one ("BEGIN") while it waits.
        waiting = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        with engine.connect() as watch:
            deadline = time.monotonic() + 15
            while not watch.execute(text(waiting)).scalar() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert watch.execute(text(waiting)).scalar(), "the step's record never waited for the lock"
        assert rt.unrecorded.stop_sending() == 0  # Ctrl-C: nothing was sent to fal
        locked.rollback()  # the lock goes
        step.join(30)
        assert not step.is_alive()
    finally:
        holder.close()
        rt.client.close()
    assert outcome == ["stopped"]
    assert hostile.count("POST", rf"/{T2V}") == 0
    with db.read_scope(engine) as session:
        (job,) = store.jobs_of_batch(session, batch_id)
    unsent = (job.state, job.submitted_input, job.sent_at, job.lease_owner, job.attempts)
    assert unsent == (JobState.PENDING, None, None, None, 0)


def _sqlite_full() -> sqlite3.OperationalError:
    """SQLite's own SQLITE_FULL: a write past ``max_page_count``."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (b BLOB)")
        conn.execute("PRAGMA max_page_count = 1")
        with pytest.raises(sqlite3.OperationalError) as raised:
            conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
        return raised.value
    finally:
        conn.close()


@pytest.mark.parametrize("stop", ["database-gone", "disk-full"])
def test_a_run_stopped_by_its_database_sends_nothing_more_either(
    engine: Engine,
    db_url: str,
    tmp_path: Path,
    hostile: HostileProvider,
    monkeypatch: pytest.MonkeyPatch,
    stop: str,
) -> None:
    """A run that stops because its database stayed away past a lease (or its disk filled)
    abandons its steps as Ctrl-C does, but only Ctrl-C stopped sending: a submit step already
    under way (past the worker's abandon check) went on to POST — billed, after the run had
    decided to stop, for a job whose record the gone database could not take. Every stop path
    stops sending first now."""
    hostile.route("POST", rf"/{T2V}", json_reply({"request_id": "b2c3d4e5-0000-4000-8000-000000000002"}))
    batch_id = add_batch(engine, "stopped-by-db", [(T2V, {"prompt": "a tram at night"})])
    settings = settings_for(hostile.url, KEY, database_url=db_url, output_dir=tmp_path / "out")
    runtimes: list[Runtime] = []

    def database_stops(*_args: Any, conductor: Conductor | None = None, **_kwargs: Any) -> None:
        assert conductor is not None
        runtimes.append(conductor.rt)
        if stop == "disk-full":
            raise OperationalError("UPDATE jobs", {}, _sqlite_full())
        raise DatabaseUnavailableError("the database did not answer for 130s")

    monkeypatch.setattr(running, "_watch", database_stops)
    monkeypatch.setattr(running, "_give_back", lambda *_args, **_kwargs: "nothing given back")
    with pytest.raises(WanbatchError):
        running.process_batch(batch_id, settings, show_progress=False, serve_metrics=False)
    (rt,) = runtimes
    try:
        rt.unrecorded.writable()  # (the full disk's mark) the step below meets the stop, not it
        (job_id,) = dispatch(rt)  # a step under way as the run stopped: it had claimed its job
        assert submit(rt, job_id) == "stopped"
    finally:
        close_runtime(rt)
    assert hostile.count("POST", rf"/{T2V}") == 0


@pytest.mark.parametrize("stop", ["database-gone", "disk-full"])
def test_a_run_stopped_by_its_database_keeps_the_answers_of_submits_already_sent(
    engine: Engine,
    db_url: str,
    tmp_path: Path,
    hostile: HostileProvider,
    monkeypatch: pytest.MonkeyPatch,
    stop: str,
) -> None:
    """A run that stops because its database stayed away past a lease (or its disk filled)
    while a submit POST was on its way to fal ended at once: fal accepted (and billed) it, its
    answer was never read, and the next run found the job without a request id and settled it
    ``submit_unknown`` after the lease — paid again by ``rerun --failed-only``. Every stop now
    waits for those answers (up to ``WANBATCH_READ_TIMEOUT``, saying so once, as Ctrl-C's
    does), and one the database cannot take is kept in the journal, named on the last line."""
    request_id = "c3d4e5f6-0000-4000-8000-000000000003"
    arrived = threading.Event()
    answer = json_reply({"request_id": request_id})

    def answered_late(req: Any, sock: Any) -> None:  # fal takes its time to answer the submit
        arrived.set()
        time.sleep(2.0)
        answer(req, sock)

    hostile.route("POST", rf"/{T2V}", answered_late)
    batch_id = add_batch(engine, "stopped-in-flight", [(T2V, {"prompt": "a ferry in fog"})])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the journal goes (PostgreSQL)
    settings = settings_for(hostile.url, KEY, database_url=db_url, output_dir=tmp_path / "out")
    failure = (
        OperationalError("UPDATE jobs", {}, _sqlite_full())
        if stop == "disk-full"
        else OperationalError("UPDATE jobs", {}, Exception("connection refused"))
    )
    runtimes: list[Runtime] = []

    def cannot_record(*_args: Any, **_kwargs: Any) -> str:
        raise failure  # the database cannot take the answer either

    def database_stops(*_args: Any, conductor: Conductor | None = None, **_kwargs: Any) -> None:
        assert conductor is not None
        rt = conductor.rt
        runtimes.append(rt)
        assert dispatch(rt)  # handed to the run's submit threads, which POST it
        assert arrived.wait(30), "the submit never reached fal"
        monkeypatch.setattr(submit_step, "_record_submission", cannot_record)
        if stop == "disk-full":
            raise failure
        raise DatabaseUnavailableError("the database did not answer for 130s")

    monkeypatch.setattr(running, "_watch", database_stops)
    out = io.StringIO()
    console = Console(file=out, width=400, emoji=False, color_system=None)
    with pytest.raises(WanbatchError) as stopped:
        running.process_batch(batch_id, settings, console=console, show_progress=False, serve_metrics=False)
    (rt,) = runtimes
    said = " ".join(out.getvalue().split())
    assert said.count("waiting for 1 submit(s) already sent to fal to be answered (up to 60s;") == 1, said
    assert hostile.count("POST", rf"/{T2V}") == 1
    # The answer is kept in the journal, for the next run to record; the last line says so.
    journal = rt.unrecorded.journal.path
    assert journal is not None, said
    with db.read_scope(engine) as session:
        (job,) = store.jobs_of_batch(session, batch_id)
    assert [(e.job_id, e.request_id) for e in read_journal(journal) or []] == [(job.id, request_id)]
    line = " ".join(str(stopped.value).split())
    assert "1 accepted submission(s) could not be recorded (fal has them, and bills them): job " in line, line
    assert f"request {request_id}; kept in {journal}" in line, line
