"""The embedded deployment: the submit and download steps on thread pools inside ``wanbatch run``.

With no ``WANBATCH_BROKER_URL`` there is one process, so a message broker — even kombu's
in-memory one, which an earlier version ran a whole Celery worker over — only adds latency
(its consumer polled every 50 ms) and CPU (serialising, tracing and acknowledging every
hand-off). The steps themselves (:mod:`worker.steps`) are exactly those the distributed
workers' Celery tasks run; only the hand-off differs: a function call on a pool here, a
message there. Submits and downloads get pools of their own, so a slow download never holds
back the next submit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from jobs import db, store
from worker import logs, steps
from worker.db_outage import FIRST_PAUSE_SECONDS, MAX_PAUSE_SECONDS, database_problem
from worker.steps import Runtime
from worker.steps.context import DOWNLOAD_QUEUE, process_identity

log = logging.getLogger(__name__)

Step = Callable[[Runtime, str], str]


class InProcessWorker:
    """Runs ``submit`` and ``download`` for job ids handed to it, ``concurrency`` of each at once.

    Bind the runtime with :meth:`bind` (the runtime is built with this worker's hand-offs, so
    it exists only afterwards). Use as a context manager: leaving waits for running steps;
    :meth:`abandon` (Ctrl-C) drops queued ones and waits for none.
    """

    def __init__(self, concurrency: int) -> None:
        self._submits = ThreadPoolExecutor(concurrency, thread_name_prefix="wanbatch-submit")
        self._downloads = ThreadPoolExecutor(concurrency, thread_name_prefix="wanbatch-download")
        self._rt: Runtime | None = None
        self._accepting = threading.Event()
        self._accepting.set()
        self._stopped = threading.Event()  # the run stops: no step waits for the database any more

    def bind(self, rt: Runtime) -> None:
        """The runtime the steps run with."""
        self._rt = rt

    def submit(self, job_id: str) -> None:
        """Hand a claimed job to a submit thread (``Runtime.enqueue_submit``)."""
        self._hand(self._submits, steps.submit, job_id)

    def download(self, job_id: str) -> None:
        """Hand a completed job to a download thread (``Runtime.enqueue_download``)."""
        self._hand(self._downloads, steps.download, job_id)

    def _hand(self, pool: ThreadPoolExecutor, step: Step, job_id: str) -> None:
        if not self._accepting.is_set():
            return  # stopping: the job keeps its lease until given back or expired
        try:
            pool.submit(self._run, step, job_id)
        except RuntimeError:  # the pool shut down meanwhile (Ctrl-C): the tick finds the job again
            log.debug(
                "not handing %s to %s: stopping", job_id, step.__name__, extra={"event": "step.dropped"}
            )

    def _run(self, step: Step, job_id: str) -> None:
        rt = self._rt
        if not self._accepting.is_set() or rt is None:
            return
        with logs.job_context(job_id):  # every line the step logs names its job
            try:
                logs.step_done(log, step.__name__, job_id, step(rt, job_id))
            except Exception as exc:
                if db.is_disk_full(exc):  # no bug: `run` says where to free space, once
                    rt.unrecorded.mark_full()
                    log.info(
                        "%s of job %s stopped: the database's disk is full",
                        step.__name__,
                        job_id,
                        extra={"event": "step.database_full"},
                    )
                    return
                if not db.is_unavailable(exc):  # the job keeps its lease; the tick's reconcile takes it over
                    log.exception(
                        "%s of job %s failed", step.__name__, job_id, extra={"event": "step.failed"}
                    )
                    return
                # A killed connection, a restart, a failover: no bug (one line, no traceback), and
                # the transaction that failed was rolled back; every write is fenced, so the
                # step's job is simply taken up again.
                log.warning(
                    "%s of job %s: the database is unavailable (%s); the job is taken up again "
                    "once it answers",
                    step.__name__,
                    job_id,
                    database_problem(exc),
                    extra={"event": "step.database_unavailable"},
                )
                self._give_back_when_it_answers(rt, job_id)

    def _give_back_when_it_answers(self, rt: Runtime, job_id: str) -> None:
        """Give back the lease of a job whose step the database failed, as soon as the database
        answers again, so that the conductor takes it up at once rather than after the lease runs
        out (``WANBATCH_LEASE_SECONDS``, two minutes by default, which a run then sat waiting).

        A job not sent yet goes back to ``pending``; a download's lease is cleared for the tick
        to hand it on; a job whose POST may have gone out is left alone, for the reconciler
        (:func:`jobs.store.release_process_leases`). Tried with growing pauses for as long as
        the lease lasts: past it, the lease has run out anyway. Stops when the run stops."""
        deadline = time.monotonic() + rt.settings.lease_seconds
        pause = FIRST_PAUSE_SECONDS
        while not self._stopped.wait(pause):
            try:
                with db.session_scope(rt.engine) as session:
                    store.release_process_leases(
                        session,
                        process_identity(),
                        queued_owner=DOWNLOAD_QUEUE,
                        worker=rt.owner,
                        job_ids=[job_id],
                    )
            except Exception as exc:
                if db.is_unavailable(exc) and time.monotonic() < deadline:
                    pause = min(MAX_PAUSE_SECONDS, pause * 2)
                    continue
                log.debug(
                    "could not give job %s back; its lease runs out by itself",
                    job_id,
                    exc_info=True,
                    extra={"event": "step.give_back_failed"},
                )
                return
            rt.notify("freed", job_id)  # dispatch (and the tick, which hands downloads on) now
            return

    def abandon(self) -> None:
        """Stop taking work now; queued steps are dropped and running ones not waited for
        (the caller gives this process's leases back, then exits)."""
        self._accepting.clear()
        self._stopped.set()
        for pool in (self._submits, self._downloads):
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Wait for the steps already running, then stop the threads."""
        self._stopped.set()  # a step waiting for the database to give its job back stops waiting
        for pool in (self._submits, self._downloads):
            pool.shutdown(wait=True)

    def __enter__(self) -> InProcessWorker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._accepting.is_set():
            self.close()
