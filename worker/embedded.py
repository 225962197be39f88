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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from jobs import db
from jobs.thread_limit import ThreadLimitError, cannot_start_thread, thread_limit_line
from worker import logs, steps
from worker.crash import crash_file, summary, traceback_text
from worker.step_outage import DATABASE_FULL, GiveBack, after_full_disk, database_failed
from worker.steps import Runtime
from worker.steps.context import outcome_error

log = logging.getLogger(__name__)

Step = Callable[[Runtime, str], str]


def _report_bug(step: str, job_id: str, exc: Exception) -> str | None:
    """A step that failed unexpectedly (a bug), in one line as ``run`` reports any bug: its
    traceback goes to an owner-only file the line names (:mod:`worker.crash`; one per kind of
    failure, not one per job), not onto the terminal under the progress bar. A JSON log line
    carries it too, as its ``exc`` field. Returns the file's name (None: it could not be written)."""
    name = crash_file(exc, where=step)
    where = f" (details in {name})" if name else ""
    log.error(
        "%s of job %s failed: %s; please report it%s",
        step,
        job_id,
        summary(exc),
        where,
        extra={"event": "step.failed", "exc": traceback_text(exc)},
    )
    return name


def after_crash(rt: Runtime, step: Step, job_id: str, exc: BaseException, details: str | None) -> None:
    """Bound what follows a crashed download (:func:`worker.steps.download.crashed`): the job is
    given back, and its batch paused once it keeps crashing — never taken again for ever, which
    hung the run. A submit that crashed is left to the reconciler (its POST may be out). Used by
    an embedded run's threads and a distributed worker's tasks alike."""
    if step is not steps.download:
        return
    try:
        steps.crashed(rt, job_id, exc, details)
    except Exception as again:  # the database failed too: the lease runs out, the job is taken again
        log.warning(
            "could not give back job %s after its download crashed: %s",
            job_id,
            summary(again),
            extra={"event": "step.crash_unhandled"},
        )


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
        self._give_back = GiveBack()  # jobs of steps the database failed, given back once it answers
        #: Set when a step's thread could not start (:meth:`_out_of_threads`): why the run stops.
        self.thread_limit: ThreadLimitError | None = None
        #: Called once then, from the thread that handed the job: the run stops (exit 2).
        self.on_thread_limit: Callable[[], None] | None = None
        self._limit_lock = threading.Lock()

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
        except RuntimeError as exc:
            if self._accepting.is_set() and cannot_start_thread(exc):
                self._out_of_threads(exc)
                return
            # the pool shut down meanwhile (Ctrl-C): the tick finds the job again
            log.debug(
                "not handing %s to %s: stopping", job_id, step.__name__, extra={"event": "step.dropped"}
            )

    def _out_of_threads(self, exc: BaseException) -> None:
        """A step's thread (or one a step needed) could not start while the pool still takes
        work: a resource limit
        (``ulimit -u``: :mod:`jobs.thread_limit`), not a stop. The job handed stays claimed, and
        nothing would ever run it: the run hung, silently. Noted once, and the run is asked to
        stop (``on_thread_limit``), which gives the jobs back and says :attr:`thread_limit` in
        one line (exit 2). A worker no run watches says it in a log line instead."""
        with self._limit_lock:
            if self.thread_limit is not None:
                return
            self.thread_limit = ThreadLimitError(thread_limit_line())
            self.thread_limit.__cause__ = exc
        if self.on_thread_limit is not None:
            self.on_thread_limit()
        else:
            log.error("%s", self.thread_limit, extra={"event": "step.thread_limit"})

    def _run(self, step: Step, job_id: str) -> None:
        rt = self._rt
        if not self._accepting.is_set() or rt is None:
            return
        try:
            self._step(rt, step, job_id)
        finally:  # whatever its outcome: `run`'s progress refresh reads the batch again
            rt.steps_ended.add()

    def _step(self, rt: Runtime, step: Step, job_id: str) -> None:
        with logs.job_context(job_id):  # every line the step logs names its job
            try:
                outcome = step(rt, job_id)
                if outcome == DATABASE_FULL:  # not sent; its lease may be held still
                    after_full_disk(self._give_back, rt, job_id)
                logs.step_done(log, step.__name__, job_id, outcome, **outcome_error(rt, job_id, outcome))
            except Exception as exc:
                if db.is_disk_full(exc):  # no bug: `run` says where to free space, once
                    rt.unrecorded.mark_full()
                    log.info(
                        "%s of job %s stopped: the database's disk is full",
                        step.__name__,
                        job_id,
                        extra={"event": "step.database_full"},
                    )
                    after_full_disk(self._give_back, rt, job_id)  # given back once there is room
                    return
                if db.gave_up_on_lock(exc) or (not self._accepting.is_set() and db.is_unavailable(exc)):
                    # Stopped with the run, whose last line says what became of its jobs (the
                    # database locked by another process, say): not once per step.
                    log.debug(
                        "%s of job %s stopped: the database is unavailable",
                        step.__name__,
                        job_id,
                        extra={"event": "step.database_unavailable"},
                    )
                    return
                if cannot_start_thread(exc):  # a thread the step needed (`ulimit -u`): no bug
                    self._out_of_threads(exc)  # the run stops and gives the job back
                    return
                # An unavailable database: one line, and the job is given back once it answers.
                if database_failed(self._give_back, rt, step.__name__, job_id, exc) is None:
                    # A bug: reported; a download is given back, its batch paused if it recurs.
                    after_crash(rt, step, job_id, exc, _report_bug(step.__name__, job_id, exc))

    def abandon(self) -> None:
        """Stop taking work now; queued steps are dropped and running ones not waited for
        (the caller gives this process's leases back, then exits)."""
        self._accepting.clear()
        self._give_back.stop(wait=False)
        for pool in (self._submits, self._downloads):
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Wait for the steps already running, then stop the threads."""
        for pool in (self._submits, self._downloads):
            pool.shutdown(wait=True)
        self._give_back.stop(wait=True)  # the run is over: a try under way ends, no other begins

    def __enter__(self) -> InProcessWorker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._accepting.is_set():
            self.close()
