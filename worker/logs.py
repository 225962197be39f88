"""Log output: text for people (the default), or one JSON object per line for machines.

``WANBATCH_LOG_FORMAT=json`` turns every log record of the process — wanbatch's own, Celery's,
httpx's, uvicorn's when it leaves logging to us — into one line of JSON on stderr::

    {"ts": "2026-05-01T22:14:03.512Z", "level": "warning", "logger": "worker.steps.submit",
     "event": "submit.not_sent", "message": "job 3f2a…: not sent (…); giving it back",
     "job_id": "3f2a…", "batch_id": "9c1e…"}

* ``event`` is always there and stable: the name a line of wanbatch's gives what happened
  (``extra={"event": "submit.not_sent"}``; the README lists them), else the logger's name — a
  message's text may change between releases, its event does not.
* ``job_id``, ``batch_id`` and ``request_id`` are there when the line is about a job: given
  explicitly (``extra=``), or from the job the thread is working on (:func:`job_context`, set by
  the steps), so even httpx's line about a status call says which job it was for.
* Other ``extra=`` fields are kept as they are (JSON-ready, else their ``str``); a traceback is
  one string field, ``exc``, so a line is never split.
* ``FAL_KEY`` never appears: the redaction of :mod:`worker.fal.redact` rewrites every record's
  message and traceback before any handler sees it, and this formatter redacts every string it
  writes once more (extra fields included), Authorization values by their shape too.

A text line of ``wanbatch worker`` (:func:`timestamp_text_lines`) starts with the time it was
logged, in UTC to the millisecond as the JSON lines' ``ts``::

    2026-05-01T22:14:03.512Z INFO celery.apps.worker: wanbatch-4242@worker-3 ready.

The other commands' text lines (warnings and errors amid a command's own output) have none.

The format is settled by :func:`configure_logging` (the CLI's entry point calls it before any
command runs). Unless told, it reads ``WANBATCH_LOG_FORMAT`` from the settings when the first
record is written, not before: ``wanbatch --help`` neither reads configuration nor imports more
than the standard library for its logging. A configuration that does not load means text (the
command itself then reports the configuration error).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from jobs.printable import printable

if TYPE_CHECKING:
    from worker.outage_log import OutageLog

#: The text format (the CLI's since its first version).
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
#: The text format of the long-running worker: each line starts with its time
#: (:meth:`TextFormatter.formatTime`: ISO 8601, UTC, milliseconds, as the JSON lines' ``ts``).
TIMESTAMPED_TEXT_FORMAT = "%(asctime)s " + TEXT_FORMAT
#: Fields about a job that a JSON line carries whenever they are known.
JOB_FIELDS = ("job_id", "batch_id", "request_id")

#: Attributes every ``LogRecord`` has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's copy of the message with terminal colours
}

_job: ContextVar[dict[str, str] | None] = ContextVar("wanbatch_log_job", default=None)
#: What the step working on the current job noted of a failure it did not store as the job's
#: error (:func:`note_error`): ``(error, error_type)``, for its step line.
_noted: ContextVar[tuple[str, str | None] | None] = ContextVar("wanbatch_log_noted", default=None)
#: What failed, when it was not the step itself (:func:`note_what_failed`): for its step line.
_what_failed: ContextVar[str | None] = ContextVar("wanbatch_log_what_failed", default=None)

#: Step outcomes that end the job (a failure, a cancellation): their line is a WARNING, so that a
#: process logging warnings only (an embedded ``run``) still says, once per job, how each ended.
TERMINAL_OUTCOMES = frozenset({"failed", "cancelled"})
#: Step outcomes after which the job's stored ``error`` and ``error_type`` say why: its step line
#: carries them (:func:`step_done`; the runner reads them, :func:`worker.steps.context.outcome_error`).
OUTCOMES_WITH_ERROR = TERMINAL_OUTCOMES | {"retry"}


@contextmanager
def job_context(job_id: str, **fields: str | None) -> Iterator[None]:
    """While the block runs, this thread's log lines are about job ``job_id`` (and ``fields``:
    ``batch_id``, ``request_id``). Steps run one job at a time per thread, so a context var
    set and reset around each step never leaks into the next job's lines."""
    token = _job.set({"job_id": job_id, **{k: v for k, v in fields.items() if v}})
    noted = _noted.set(None)
    what = _what_failed.set(None)
    try:
        yield
    finally:
        _what_failed.reset(what)
        _noted.reset(noted)
        _job.reset(token)


def annotate(**fields: str | None) -> None:
    """Add what the step learnt (``batch_id``, ``request_id``) to the current job's context."""
    current = _job.get()
    if current is not None:
        current.update({k: v for k, v in fields.items() if v})


def note_error(error: str, error_type: str | None) -> None:
    """The current job's step failed for ``error`` without storing it as the job's error (a
    download tried again later): its step line says it (:func:`step_done`)."""
    if _job.get() is not None:
        _noted.set((error, error_type))


def note_what_failed(what: str) -> None:
    """The current job's step ended on a failure of something else than the step: the download
    step reading fal's verdict that the render failed (a model error, a request fal refused:
    ``content_policy_violation``) — no download was tried. Its step line names ``what`` instead
    of "download failed" (:func:`step_done`); its event and outcome stay the step's."""
    if _job.get() is not None:
        _what_failed.set(what)


def noted_error() -> tuple[str, str | None] | None:
    """What :func:`note_error` noted for the current job's step, if anything."""
    return _noted.get()


def step_done(
    logger: logging.Logger,
    step: str,
    job_id: str,
    outcome: str,
    *,
    error: str | None = None,
    error_type: str | None = None,
    **fields: str | None,
) -> None:
    """The one line a step's run ends with, event ``job.<step>``, wherever it ran (an embedded
    thread pool or a Celery task): what the step did (``outcome``) and, for a failure, why —
    ``error`` and ``error_type`` as fields, the error in the message too (masked, as every
    line). INFO, but a WARNING for an outcome that ends the job (:data:`TERMINAL_OUTCOMES`), so
    that a process logging warnings only still names each job that failed or was cancelled,
    once. ``fields``: more about the job (``batch_id``) where no :func:`job_context` says it."""
    if error is None and (noted := noted_error()) is not None:
        error, error_type = noted
    extra: dict[str, Any] = {"event": f"job.{step}", "outcome": outcome, "job_id": job_id}
    extra.update({k: v for k, v in fields.items() if v})
    if error is not None or error_type is not None:
        extra.update(error=error, error_type=error_type)
    level = logging.WARNING if outcome in TERMINAL_OUTCOMES else logging.INFO
    done = f"{step} {outcome}"
    if (what := _what_failed.get()) is not None and outcome in OUTCOMES_WITH_ERROR:
        # Not the step's own failure (fal's result said the render failed): said as such.
        done = {"failed": what, "retry": f"{what}; it is sent again"}.get(outcome, f"{what}; {done}")
    if error is None:
        logger.log(level, "job %s: %s", job_id, done, extra=extra)
    else:
        logger.log(level, "job %s: %s (%s): %s", job_id, done, error_type, error, extra=extra)


def _redactor() -> Any:
    # Imported when the first JSON line is written: worker.fal pulls httpx in, which the CLI's
    # start-up (``--help``) must not pay for.
    from worker.fal.redact import redact_record, redact_value

    return redact_record, redact_value


def utc_timestamp(created: float) -> str:
    """``2026-05-01T22:14:03.512Z``: the time a record was made (``record.created``), ISO 8601 in
    UTC to the millisecond — one form for the JSON lines' ``ts`` and the worker's text lines."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring for its fields)."""

    def format(self, record: logging.LogRecord) -> str:
        redact_record, redact_value = _redactor()
        redact_record(record)  # renders the message once, masks the key in it and the traceback
        out: dict[str, Any] = {
            "ts": utc_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": None,
            "message": record.getMessage(),
        }
        for name, value in (_job.get() or {}).items():
            out[name] = value
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES and not name.startswith("_"):
                if value is None and name in JOB_FIELDS:
                    continue  # "not about a job" is said by leaving the field out
                out[name] = value
        if not out["event"]:
            out["event"] = record.name
        if record.exc_text:
            out["exc"] = record.exc_text
        elif record.exc_info and record.exc_info[0] is not None:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = record.stack_info
        safe = redact_value(out)
        return json.dumps(safe, default=lambda value: redact_value(str(value)), separators=(",", ":"))


class _Deferred(logging.Formatter):
    """Text or JSON, decided from the settings when the first record is formatted."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._chosen: logging.Formatter | None = None
        #: Whether text lines start with their time (:func:`timestamp_text_lines`).
        self.timestamps = False

    def format(self, record: logging.LogRecord) -> str:
        return self.resolved().format(record)

    def resolved(self) -> logging.Formatter:
        """The formatter chosen (from the settings, the first time it is asked for)."""
        if self._chosen is None:
            self._chosen = formatter_for(_configured_format(), timestamps=self.timestamps)
        return self._chosen


def _configured_format() -> str:
    from jobs.errors import WanbatchError
    from jobs.settings import get_settings

    try:
        return get_settings().log_format
    except WanbatchError:
        return "text"


def formatter_for(log_format: str, *, timestamps: bool = False) -> logging.Formatter:
    """The formatter of ``log_format`` (``text`` or ``json``); ``timestamps``: text lines start
    with their time (:data:`TIMESTAMPED_TEXT_FORMAT`; a JSON line always has its ``ts``)."""
    if log_format == "json":
        return JsonFormatter()
    return TextFormatter(TIMESTAMPED_TEXT_FORMAT if timestamps else TEXT_FORMAT)


class TextFormatter(logging.Formatter):
    """The text format, its lines safe for a terminal: a provider's words or a batch's name in a
    message cannot send control sequences to it (:func:`jobs.printable.printable`). The JSON
    format needs no such care: ``json.dumps`` escapes control characters."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """``%(asctime)s``: ISO 8601 in UTC to the millisecond (:func:`utc_timestamp`), not
        logging's local ``2026-05-01 22:14:03,512``, which names no zone; ``datefmt`` if given."""
        if datefmt:
            return super().formatTime(record, datefmt)
        return utc_timestamp(record.created)


def configure_logging(log_format: str | None = None, *, level: int = logging.WARNING) -> None:
    """Log to stderr at ``level`` in ``log_format`` (None: ``WANBATCH_LOG_FORMAT``, read when the
    first record is written). Like :func:`logging.basicConfig`, does nothing when the root
    logger has handlers already (a test's capture, an embedding application's own)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = _ConsoleHandler(sys.stderr)
    handler.setFormatter(_Deferred() if log_format is None else formatter_for(log_format))
    handler.addFilter(DatabaseCleanupErrors())
    root.addHandler(handler)
    root.setLevel(level)
    # Python's warnings (a library's deprecation notice) become records too, in the same format,
    # instead of free text on stderr between JSON lines.
    logging.captureWarnings(True)


class DatabaseCleanupErrors(logging.Filter):
    """SQLAlchemy's own report of a cleanup the database failed — ``Error closing cursor``,
    ``Exception during reset or similar``, ``Exception closing connection``, logged at ``ERROR``
    with the driver's traceback by its pool (``sqlalchemy.pool.impl.*``) — as one warning line,
    when what failed is the database's operation or connection (DB-API's ``OperationalError``,
    ``InterfaceError``: https://peps.python.org/pep-0249/#exceptions). SQLAlchemy handles these
    itself (the connection is discarded), and the unit of work it served reports the outage on
    its own line; its traceback was a third-party traceback amid a run's lines (a connection
    reset injected into a run on PostgreSQL showed one). Any other error keeps its traceback.
    A filter on the handler: the pools' loggers are made per pool, under names not known ahead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("sqlalchemy.") or record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or type(exc).__name__ not in _DBAPI_OUTAGES:
            return True
        said = " ".join(str(exc).split())
        _one_warning_line(
            record, "%s (%s: %s)", (record.getMessage(), type(exc).__name__, said), "database.cleanup_failed"
        )
        return True


#: DB-API's names for an error of the database's operation or of the connection (PEP 249): what
#: every driver (sqlite3, psycopg) raises for an outage, under its own module.
_DBAPI_OUTAGES = frozenset({"OperationalError", "InterfaceError"})


def timestamp_text_lines() -> None:
    """From now on, the text lines of this process's log start with their time
    (:data:`TIMESTAMPED_TEXT_FORMAT`), for a long-running process whose log is read hours later
    (``wanbatch worker``). JSON lines have their ``ts`` already and are left as they are.

    Changes the formatter :func:`configure_logging` installed on the root logger's handler (text
    chosen already, or still to be chosen from ``WANBATCH_LOG_FORMAT``); a handler of someone
    else's (a test's capture, an embedding application's) keeps its own format."""
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if isinstance(formatter, _Deferred):
            formatter.timestamps = True
            if isinstance(formatter._chosen, TextFormatter):
                formatter._chosen = formatter_for("text", timestamps=True)
        elif type(formatter) is TextFormatter and formatter._fmt == TEXT_FORMAT:
            handler.setFormatter(formatter_for("text", timestamps=True))


#: The loggers of Celery's two lines for every task a worker runs, both at ``INFO``:
#: ``celery.worker.strategy``'s "Task wanbatch.submit_job[<id>] received" and
#: ``celery.app.trace``'s "Task …[<id>] succeeded in 0.05s: 'submitted'".
CELERY_TASK_LINE_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def celery_task_lines_from_debug(level: int) -> None:
    """Celery's two ``INFO`` lines for every task (:data:`CELERY_TASK_LINE_LOGGERS`) only when
    the worker logs at ``DEBUG`` (``--loglevel`` is ``level``); what those loggers say at
    ``WARNING`` and above (a task that raised, with its traceback) is logged at any level.

    At the default ``INFO`` a worker already logs each step of each job once, in wanbatch's own
    line (``job.submit``, ``job.download``: the job, its batch and request, the outcome); Celery's
    pair per task said it again by task id, four lines per job, which were two fifths of a
    worker's log records (4 of 10 a job on the drain benchmark, ``python -m bench.drain``) and
    CPU on the consumer's own loop: Celery builds each line's context (the task's ``saferepr``'d
    return value, its run time) only when its logger is enabled for ``INFO``, which it asks once,
    as the worker starts (``celery.worker.strategy.default`` and ``celery.app.trace.build_tracer``:
    ``_does_info = logger.isEnabledFor(logging.INFO)``), so this must run before that. The task
    ids stay visible in the task events (Flower, ``celery events``) and at ``--loglevel DEBUG``.
    """
    if level <= logging.DEBUG:
        return
    for name in CELERY_TASK_LINE_LOGGERS:
        # Never below the worker's own level: at --loglevel ERROR their warnings stay out too.
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def celery_logs_through_ours() -> None:
    """Have the two loggers Celery's worker gives handlers of its own log through the root
    logger's handler instead, so that every line of a worker has one format: the time first in
    text (:func:`timestamp_text_lines`), one JSON object in JSON, secrets masked the same way.

    With ``worker_hijack_root_logger`` off (:func:`worker.app.make_app`) Celery leaves the root
    logger's handler alone, but still adds a ``StreamHandler`` of its own format
    (``worker_task_log_format``: ``[2026-05-01 22:14:03,512: WARNING/MainProcess] …``, local
    time without a zone, and plain text even under ``WANBATCH_LOG_FORMAT=json``) to
    ``celery.task`` (task loggers, made not to propagate) and to the ``multiprocessing`` logger
    (billiard's, at ``ERROR``) when it sets its logging up — in the worker's process, and again
    in each prefork child. The ``after_setup_logger`` and ``after_setup_task_logger`` signals it
    sends right after are the documented hook for changing what it set up
    (https://docs.celeryq.dev/en/stable/userguide/signals.html#logging-signals): their receivers
    drop those handlers and let the loggers propagate. The levels Celery set stay.

    Some of Celery's and kombu's lines are made quieter too: a prefork child killed mid-task is
    one warning line instead of an error with two tracebacks (:class:`_PoolChildLost`), an
    acknowledgement the broker did not take too (:class:`_UnacknowledgedForBroker`), Celery's
    worker stopping for the broker as well (:class:`StoppedForTheBroker`), a timer of
    kombu's that failed for the broker one warning line at most every 30 s
    (:class:`BrokerTimerErrors`), and the notice it writes at every broker connection loss about
    a setting wanbatch sets is dropped (:func:`_quiet_cancel_on_connection_loss_notice`)."""
    from celery.signals import after_setup_logger, after_setup_task_logger

    after_setup_logger.connect(_own_handlers_only, weak=False)  # once: the same receiver
    after_setup_task_logger.connect(_own_handlers_only, weak=False)
    request_log = logging.getLogger("celery.worker.request")
    if not any(isinstance(f, _PoolChildLost) for f in request_log.filters):
        request_log.addFilter(_PoolChildLost())
        request_log.addFilter(_UnacknowledgedForBroker())
    worker_log = logging.getLogger("celery.worker")
    if not any(isinstance(f, StoppedForTheBroker) for f in worker_log.filters):
        worker_log.addFilter(StoppedForTheBroker())
    for name in KOMBU_TIMER_LOGGERS:
        timer_log = logging.getLogger(name)
        if not any(isinstance(f, BrokerTimerErrors) for f in timer_log.filters):
            timer_log.addFilter(BrokerTimerErrors())
    _quiet_cancel_on_connection_loss_notice()


def _one_warning_line(record: logging.LogRecord, msg: str, args: tuple[object, ...], event: str) -> None:
    """Rewrite ``record`` (a library's ERROR or CRITICAL with a traceback) as one WARNING line,
    ``msg % args``, of log event ``event``: what Celery and kombu report of an outage, no bug."""
    record.msg, record.args = msg, args
    record.exc_info = None
    record.exc_text = None
    record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
    record.event = event


#: What a prefork child killed mid-task (``kill -9``, the OOM killer) is said as, instead of
#: Celery's ``Task handler raised error: WorkerLostError(…)`` and its two tracebacks.
POOL_CHILD_LOST = (
    "pool child %s mid-task; its message is requeued and the job's lease decides what happens to the job"
)


class _PoolChildLost(logging.Filter):
    """Celery logs a prefork child that died mid-task (its ``WorkerLostError``) as an ERROR with
    the traceback of where billiard noticed it (``billiard/pool.py``), twice over (the wrapped
    one and its cause): nothing in it says anything about the task. With ``task_acks_late`` and
    ``task_reject_on_worker_lost`` (:mod:`worker.app`) its message goes back to the queue, and the
    job's lease decides whether it runs again — so it is one WARNING line, without traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from billiard.exceptions import WorkerLostError  # type: ignore[import-untyped]

        candidates: list[object] = [record.exc_info[1] if record.exc_info else None]
        if isinstance(record.args, tuple):
            candidates += record.args
        # billiard wraps it at times (``ExceptionWithTraceback``, the original as ``exc``)
        lost = [getattr(c, "exc", c) for c in candidates]
        exc = next((c for c in lost if isinstance(c, WorkerLostError)), None)
        if exc is None:
            return True
        said = str(exc).strip()
        how = said.split("prematurely:", 1)[-1].split(" Job:", 1)[0].strip().rstrip(".")
        lost_how = f"killed by {how}" if how.startswith("signal") else f"lost ({how or said})"
        _one_warning_line(record, POOL_CHILD_LOST, (lost_how,), "worker.pool_child_lost")
        return True


#: A task's acknowledgement (or rejection) the broker did not take, instead of kombu's CRITICAL
#: line and traceback.
UNACKNOWLEDGED = (
    "the broker did not take the %s of message %s (%s); the message is delivered again, "
    "which the job's state makes harmless"
)


class _UnacknowledgedForBroker(logging.Filter):
    """kombu logs an acknowledgement the broker did not take (``Couldn't ack …``, from
    ``Message.ack_log_error``, with Celery's request logger) as CRITICAL with a traceback. A
    broker that cannot be reached or does not answer (a restart, a partition: the connection
    error of :func:`worker.broker_outage.broker_problem`) is an outage, no bug: the message is
    restored to the queue and runs again, as after any redelivery. One WARNING line then;
    anything else keeps kombu's line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(("Couldn't ack", "Couldn't reject")):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            exc = next((a for a in args if isinstance(a, BaseException)), None)
        from worker.broker_outage import broker_problem

        problem = broker_problem(exc) if exc is not None else None
        if problem is None:
            return True
        what = "acknowledgement" if record.msg.startswith("Couldn't ack") else "rejection"
        # A record rendered when it was made (the key's redaction renders every one) has no args
        # left: the message's id is read back from its text.
        rendered = _RENDERED_ACK.match(record.msg)
        message = args[0] if args else rendered.group("id") if rendered else "?"
        _one_warning_line(record, UNACKNOWLEDGED, (what, message, problem), "worker.ack_lost")
        return True


#: kombu's ``Couldn't ack %r, reason:%r`` once rendered: the message's id (its delivery tag).
_RENDERED_ACK = re.compile(r"Couldn't (?:ack|reject) '?(?P<id>[^',]*)'?, reason")


def _record_error(record: logging.LogRecord) -> BaseException | None:
    """The exception a record is about: its traceback's, else the first among its arguments."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None and isinstance(record.args, tuple):
        exc = next((a for a in record.args if isinstance(a, BaseException)), None)
    return exc


#: The loggers of kombu that log a periodic broker call of a worker that failed, with its
#: traceback: its event loop's and timer's (``Error in timer: …``), and its Redis transport's
#: (``maybe_refresh_binding_expiry: Redis error, will retry``).
KOMBU_TIMER_LOGGERS = ("kombu.asynchronous.hub", "kombu.asynchronous.timer", "kombu.transport.redis")
#: What a periodic broker call of kombu's that failed for the broker is said as (at most every
#: :data:`TIMER_ERROR_EVERY_SECONDS` per call), instead of kombu's line and its traceback.
BROKER_TIMER_FAILED = "a periodic broker call of kombu (%s) failed: the broker %s (%s); it is tried again%s"
#: The shortest time between two such lines of a process, for one kind of call.
TIMER_ERROR_EVERY_SECONDS = 30.0


def _periodic_call(record: logging.LogRecord) -> str | None:
    """Which periodic call of kombu's ``record`` says failed (``timer``, or the transport's method
    named first: ``maybe_refresh_binding_expiry``); None for any other line."""
    msg = record.msg
    if not isinstance(msg, str):
        return None
    if msg.startswith("Error in timer"):
        return "timer"
    if record.name == "kombu.transport.redis" and "will retry" in msg:
        name, colon, _ = msg.partition(":")
        return name.strip() if colon and name.strip().isidentifier() else "transport"
    return None


class BrokerTimerErrors(logging.Filter):
    """kombu logs a periodic call of a worker's that failed with its traceback: its event loop's
    timer entries (``ERROR kombu.asynchronous.hub: Error in timer: …``, about 35 lines — the
    Redis transport's restore of unacknowledged messages, a lock taken with ``SET … NX``, every
    few tens of seconds per worker) and its Redis transport's refresh of the queues' bindings
    (``WARNING kombu.transport.redis: maybe_refresh_binding_expiry: Redis error, will retry``,
    every second). While the broker cannot be reached or refuses writes (out of memory, a
    read-only replica) each of them fails, and the next one tries again: an outage, no bug. One
    WARNING line then, at most every :data:`TIMER_ERROR_EVERY_SECONDS` per kind of call (the
    others are dropped; the next line counts them), for a record whose error is such an outage
    (:func:`worker.broker_outage.broker_problem`: a connection error, or a write refused for
    memory or a replica). An error whose text differs from the last one said for that call is
    said at once, never held back. Any other error — another error reply of Redis' (``WRONGTYPE``,
    ``NOPERM``, ``NOSCRIPT``, a Lua script's error), a bug — keeps kombu's line and traceback."""

    def __init__(
        self, every: float = TIMER_ERROR_EVERY_SECONDS, clock: Callable[[], float] | None = None
    ) -> None:
        super().__init__()
        import time

        self.every = every
        self.clock = clock or time.monotonic
        self._logs: dict[str, OutageLog] = {}  # per kind of call
        self._held: dict[str, int] = {}
        self._shown: dict[str, str] = {}  # per kind of call: the error said last
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        call = _periodic_call(record)
        exc = _record_error(record) if call is not None else None
        if call is None or exc is None:
            return True
        from worker.broker_outage import broker_problem, broker_refusal, outage_words

        problem = broker_problem(exc)
        if problem is None:  # no outage: Redis answered with another error, or a bug
            return True
        from worker.outage_log import OutageLog

        with self._lock:
            # Nothing tells a periodic call's recovery: a failure is said once ``every`` has
            # passed, or at once when it is another error than the one said last.
            log = self._logs.get(call)
            if log is None or self._shown.get(call) != problem:
                log = self._logs[call] = OutageLog(self.every, self.clock, new_outage_said_at_once=False)
            if not log.failed().due:
                self._held[call] = self._held.get(call, 0) + 1
                return False
            self._shown[call] = problem
            held = self._held.pop(call, 0)
        more = f" ({held} more such line(s) held back since the last)" if held else ""
        words = outage_words(broker_refusal(exc))
        args = (call, words, problem, more)
        _one_warning_line(record, BROKER_TIMER_FAILED, args, "worker.broker_timer_failed")
        return True


#: What Celery's worker stopping for the broker is said as, instead of ``Unrecoverable error: …``
#: and its traceback.
STOPPED_FOR_THE_BROKER = (
    "the Celery worker stopped: the broker %s (%s); it starts afresh, and waits for the broker"
)


class StoppedForTheBroker(logging.Filter):
    """Celery logs what ended its worker as ``CRITICAL celery.worker: Unrecoverable error: …``
    with the traceback (some 70 lines). Some broker failures end it so: kombu's Redis
    transport raising on a closed channel, or Redis refusing the write of an acknowledgement
    (``ZREM unacked_index`` when it is out of memory, or a read-only replica). Those are an
    outage, and ``wanbatch worker`` starts afresh (waiting for the broker to take writes): one
    WARNING line then, naming the broker's error. Anything else keeps Celery's line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith("Unrecoverable error"):
            return True
        exc = _record_error(record)
        if exc is None:
            return True
        from worker.broker_outage import broker_problem, broker_refusal, outage_words

        problem = broker_problem(exc)
        if problem is None:
            return True
        said = outage_words(broker_refusal(exc))
        _one_warning_line(record, STOPPED_FOR_THE_BROKER, (said, problem), "worker.stopped_for_broker")
        return True


#: The start of Celery's notice about ``worker_cancel_long_running_tasks_on_connection_loss``
#: (``celery.worker.consumer.consumer.CANCEL_TASKS_BY_DEFAULT``).
CANCEL_NOTICE = "In Celery 5.1 we introduced an optional breaking change"


def _quiet_cancel_on_connection_loss_notice() -> None:
    """Drop Celery's 8-line ``CPendingDeprecationWarning`` ("In Celery 5.1 we introduced an
    optional breaking change…") that its consumer issues at every broker connection loss while
    ``worker_cancel_long_running_tasks_on_connection_loss`` is off — even when set off explicitly,
    as :mod:`worker.app` does. Off is wanbatch's choice, not a default left unset: cancelling
    running tasks on a connection loss would abandon submits mid-POST, and a task's message is
    redelivered after a connection loss anyway. Only that notice: Celery's other warnings stay.

    A filter on the ``py.warnings`` logger (warnings are log records in a worker:
    ``logging.captureWarnings``), not a ``warnings`` filter: Celery's logging set-up puts an
    ``always`` filter for its warning categories in front of any filter made before it."""
    logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, _CancelNotice) for f in logger.filters):
        logger.addFilter(_CancelNotice())


class _CancelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return CANCEL_NOTICE not in record.getMessage()


def _own_handlers_only(**_: object) -> None:
    """:func:`celery_logs_through_ours`'s receiver: Celery's stream handlers off ``celery.task``
    and ``multiprocessing``, which propagate to the root logger's handler again."""
    if not logging.getLogger().handlers:
        return  # nothing to propagate to: Celery's handlers stay (no line lost)
    for name in ("celery.task", "multiprocessing"):
        logger = logging.getLogger(name)
        celery_own = [h for h in logger.handlers if type(h) is logging.StreamHandler]
        for handler in celery_own:
            logger.removeHandler(handler)
        if celery_own:
            logger.propagate = True


def celery_console_as_log_lines(log_format: str) -> None:
    """Make the few lines Celery's worker writes straight to stdout/stderr log lines of
    ``log_format`` too: one JSON object each, or text with the time first (as
    :func:`timestamp_text_lines` makes the others), so the log says when a worker stopped.

    Its signal handlers announce a shutdown ("worker: Warm shutdown (MainProcess)") with
    ``celery.apps.worker.safe_say``, a bare ``os.write`` that bypasses logging on purpose (no
    lock may be taken in a signal handler). The replacement keeps that property — it formats
    one record and writes it with one ``os.write``, taking no lock — so the stream stays one
    line per record. The destination (Celery's choice of stdout or stderr) is kept.
    """
    import contextlib
    import os

    from celery.apps import worker as celery_worker

    formatter = formatter_for(log_format, timestamps=True)

    def say(msg: str, f: Any = sys.__stderr__) -> None:
        text = str(msg).strip()
        record = logging.LogRecord("celery.apps.worker", logging.WARNING, __file__, 0, text, None, None)
        record.event = "celery.signal"
        with contextlib.suppress(OSError, ValueError, AttributeError):  # best effort, as Celery's own
            os.write(f.fileno(), (formatter.format(record) + "\n").encode())

    celery_worker.safe_say = say


class _ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler :func:`configure_logging` installs: the console, the one sink
    :func:`console_job_end_cap` caps (a handler of someone else's is never capped)."""


#: How many job-ending step lines (a job failed or was cancelled: :data:`TERMINAL_OUTCOMES`) a
#: ``run`` writes to the console, in text, before it only counts them (:func:`console_job_end_cap`).
CONSOLE_JOB_END_LINES = 10


def is_job_end_line(record: logging.LogRecord) -> bool:
    """Whether ``record`` is a step line of a job that ended failed or cancelled (:func:`step_done`)."""
    event = getattr(record, "event", None)
    return (
        isinstance(event, str)
        and event.startswith("job.")
        and getattr(record, "outcome", None) in TERMINAL_OUTCOMES
    )


class _JobEndCap(logging.Filter):
    """Lets the first ``limit`` job-ending step lines through, counts the others (from any
    thread: the step pools log them)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.hidden = 0
        self._shown = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_job_end_line(record):
            return True
        with self._lock:
            if self._shown < self.limit:
                self._shown += 1
                return True
            self.hidden += 1
            return False


def _writes_text(handler: logging.Handler) -> bool:
    """Whether ``handler`` writes text lines (a JSON log, for machines, is never capped)."""
    formatter = handler.formatter
    if isinstance(formatter, _Deferred):
        formatter = formatter.resolved()
    return not isinstance(formatter, JsonFormatter)


@contextmanager
def console_job_end_cap(note: Callable[[int], str], limit: int = CONSOLE_JOB_END_LINES) -> Iterator[None]:
    """While the block runs, the console (the text stderr handler of :func:`configure_logging`)
    gets the first ``limit`` step lines of jobs that failed or were cancelled and no more; at
    the end, if it held any back, one line more, ``note(held_back)`` (what they were and which
    command lists them). A batch that fails wholesale (fal refusing every job) wrote one line per
    job beside the progress bar. Only the console: a JSON log and any other handler (an
    embedding application's, a test's capture) get every line, and so does the console for any
    other kind of line."""
    consoles = [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, _ConsoleHandler) and _writes_text(handler)
    ]
    cap = _JobEndCap(limit)
    for handler in consoles:
        handler.addFilter(cap)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(cap)
        if cap.hidden:
            record = logging.LogRecord(__name__, logging.WARNING, __file__, 0, note(cap.hidden), None, None)
            record.event = "log.job_lines_held_back"
            for handler in consoles:
                handler.handle(record)
