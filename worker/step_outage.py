"""A step (submit, download) the database failed, wherever it ran: an embedded ``run``'s threads
(:mod:`worker.embedded`) or a distributed worker's Celery task (:mod:`worker.tasks`).

A killed connection, a restart, a failover: no bug, so one warning line and no traceback; the
transaction that failed was rolled back, and every write is fenced, so the step's job is simply
taken up again. Not after its lease runs out (``WANBATCH_LEASE_SECONDS``, two minutes by default,
which the job's outstanding slot sat idle), but as soon as the database answers: :class:`GiveBack`
gives the job back then (:func:`jobs.store.release_step_jobs`) and tells the conductor, which
dispatches it again (or, for a download, the tick hands it on).

A database without wanbatch's tables (:func:`jobs.db.is_schema_missing`) is no bug either, and no
outage: one line, nothing given back (the command or the conductor that meets it too says what to
do). Nor is a schema older than this wanbatch's (``alembic downgrade`` under a running worker,
:func:`jobs.db.schema_behind`): the step leaves its job as it was — not given back, not counted as
a crash, not failed — for the version the schema is for (or this one, after an upgrade) to take up
once its lease runs out, and says so in one line; so does every later step of the process, which
no longer runs (:func:`left_for_schema`), while its conductor stops (a worker exits 2). Anything
else is a bug, left to the caller to report with its traceback.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping

from jobs import db, store
from jobs.processes import process_prefix
from worker.db_outage import FIRST_PAUSE_SECONDS, MAX_PAUSE_SECONDS
from worker.steps.context import DOWNLOAD_QUEUE, Runtime

log = logging.getLogger(__name__)

#: A job to give back: the runtime of the step that failed, and until when to try (its lease's
#: end, ``time.monotonic()``).
_Entry = tuple[Runtime, float]


#: What a step left for a schema older than this wanbatch's returns (:func:`left_for_schema`).
SCHEMA_BEHIND = "schema-behind"
#: ... for a database without wanbatch's tables, and for one that is unavailable.
SCHEMA_MISSING = "schema-missing"
DATABASE_UNAVAILABLE = "database-unavailable"
#: What a submit step returns when the database's disk is full (:func:`worker.steps.submit`):
#: nothing was sent, and the job may still be under this process's lease (its give-back was
#: refused too). The caller hands it to :meth:`GiveBack.when_it_answers` (:func:`after_full_disk`).
DATABASE_FULL = "database-full"

#: Guards ``Runtime.schema_behind_said``: the first step left for the schema says why.
_schema_lock = threading.Lock()


def left_for_schema(rt: Runtime, step: str, job_id: str) -> str:
    """The database's schema is older than this wanbatch's (``rt.schema_behind``): the step named
    ``step`` of ``job_id`` leaves the job as it was. Said in one line: the first in this process
    with the reason (a warning), every later one naming only its job. Returns
    :data:`SCHEMA_BEHIND`."""
    behind = rt.schema_behind
    with _schema_lock:
        first, rt.schema_behind_said = not rt.schema_behind_said, True
    extra = {"event": "step.schema_behind", "job_id": job_id}
    if first:
        log.warning(
            "%s of job %s: %s: the job is left as it was, for the version the schema is for (or "
            "this one, after an upgrade) to take up; this process works on the database no more",
            step,
            job_id,
            behind,
            extra=extra,
        )
    else:
        log.info(
            "%s of job %s not run: the database's schema is older than this wanbatch's; the job is "
            "left as it was",
            step,
            job_id,
            extra=extra,
        )
    return SCHEMA_BEHIND


def database_failed(
    give_back: GiveBack, rt: Runtime, step: str, job_id: str, exc: BaseException
) -> str | None:
    """Whether ``exc``, which ended the step named ``step`` of ``job_id``, was the database's
    doing, and if so say so in one line and return what became of the step: a schema older than
    this wanbatch's leaves the job as it was (:data:`SCHEMA_BEHIND`, :func:`left_for_schema`); an
    unavailable database has ``give_back`` give the job back once it answers
    (:data:`DATABASE_UNAVAILABLE`). None for anything else (a bug: the caller reports it, with
    its traceback)."""
    # Before the others: SQLite's "no such column" is an OperationalError, taken for an outage
    # (the job given back, on the older schema), PostgreSQL's for a bug (a crash file, a
    # traceback, a download's crash counted towards pausing its batch); a dropped table for "not
    # a wanbatch database".
    if db.is_schema_mismatch(exc) and (behind := rt.schema_behind or db.schema_behind(rt.engine)):
        rt.schema_behind = behind
        return left_for_schema(rt, step, job_id)
    if db.is_schema_missing(exc):
        log.error(
            "%s of job %s: the database has no such table (%s): it is not a wanbatch database, "
            "or its tables were dropped",
            step,
            job_id,
            db.database_problem(exc),
            extra={"event": "step.schema_missing"},
        )
        return SCHEMA_MISSING
    if not db.is_unavailable(exc):
        return None
    log.warning(
        "%s of job %s: the database is unavailable (%s); the job is taken up again once it answers",
        step,
        job_id,
        db.database_problem(exc),
        extra={"event": "step.database_unavailable"},
    )
    give_back.when_it_answers(rt, job_id)
    return DATABASE_UNAVAILABLE


def after_full_disk(give_back: GiveBack, rt: Runtime, job_id: str) -> None:
    """A step of ``job_id`` ended on the database's full disk (:func:`jobs.db.is_disk_full`, or
    the submit step's :data:`DATABASE_FULL`): its job may still be under this process's lease,
    the write that would have given it back refused too. ``give_back`` gives it back as soon as
    the disk takes writes again, as after any outage: before, nothing tried again, and the job
    sat ``submitting`` (or ``downloading``) until its lease ran out, a minute or two after space
    was freed, while the progress line said ``~0:00:00 left · submitting:2``. A job that was
    given back already (the write fitted) is left as it is (:func:`jobs.store.release_step_jobs`
    moves only a job not sent yet, fenced by its version, and this process's leases)."""
    give_back.when_it_answers(rt, job_id)


class GiveBack:
    """Gives back, as soon as the database answers again, the jobs whose step it failed.

    One thread of its own, started at the first job and ending when none is left, tries every
    pause (growing from :data:`~worker.db_outage.FIRST_PAUSE_SECONDS` to
    :data:`~worker.db_outage.MAX_PAUSE_SECONDS`) to give them all back in one unit of work: the
    step itself returns at once, so no worker thread (nor a Celery slot) waits for the database.
    A job is tried for as long as its lease lasts: past it, the lease has run out anyway and the
    tick's reconcile takes the job over. :meth:`stop` ends the tries (the run stops).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, _Entry] = {}
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._stopped = threading.Event()

    def when_it_answers(self, rt: Runtime, job_id: str) -> None:
        """Give ``job_id`` back once the database answers (nothing after :meth:`stop`)."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._jobs[job_id] = (rt, time.monotonic() + rt.settings.lease_seconds)
            if self._thread is None or self._pid != os.getpid():  # none yet, or the parent's (a fork)
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="wanbatch-give-back", daemon=True)
                self._thread.start()

    def stop(self, *, wait: bool) -> None:
        """No more tries (the jobs' leases run out by themselves); ``wait`` for a try under way."""
        self._stopped.set()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        pause = FIRST_PAUSE_SECONDS
        while not self._stopped.wait(pause):
            with self._lock:
                jobs = dict(self._jobs)
                if not jobs:  # all given back (or given up): a new job starts a new thread
                    self._thread = None
                    return
            pause = FIRST_PAUSE_SECONDS if self._try(jobs) else min(MAX_PAUSE_SECONDS, pause * 2)

    def _try(self, jobs: dict[str, _Entry]) -> bool:
        """Give ``jobs`` back, one unit of work per runtime; False while the database is still
        unavailable (the jobs whose lease is over are dropped then)."""
        for rt in {id(rt): rt for rt, _deadline in jobs.values()}.values():
            mine = {job_id: entry for job_id, entry in jobs.items() if entry[0] is rt}
            try:
                with db.session_scope(rt.engine) as session:
                    proven = rt.unsent.noted(mine)  # sends recorded as their commit failed
                    got = store.release_step_jobs(
                        session,
                        list(mine),
                        process_prefix(),
                        queued_owner=DOWNLOAD_QUEUE,
                        worker=rt.owner,
                        proven_unsent=proven,
                    )
            except Exception as exc:
                if db.is_unavailable(exc):
                    now = time.monotonic()
                    self._forget({job_id: e for job_id, e in mine.items() if e[1] <= now})
                    return False
                log.debug(
                    "could not give jobs %s back; their leases run out by themselves",
                    ", ".join(sorted(mine)),
                    exc_info=True,
                    extra={"event": "step.give_back_failed"},
                )
                self._forget(mine)
                continue
            self._forget(mine)
            for job_id in proven:
                rt.unsent.forget(job_id)  # given back, or moved on since: the note has served
            rt.unrecorded.writable()  # a write worked: a disk that was full has room again
            if got.unsent or got.released:  # none when a POST may be out: the reconciler's
                for job_id in sorted(mine):
                    rt.notify("freed", job_id)  # dispatch (and the tick, which hands downloads on) now
        return True

    def _forget(self, done: Mapping[str, _Entry]) -> None:
        """Drop ``done``'s jobs, unless a step failed one of them again since (a newer entry)."""
        with self._lock:
            for job_id, entry in done.items():
                if self._jobs.get(job_id) is entry:
                    del self._jobs[job_id]
