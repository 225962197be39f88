"""Thin Celery tasks: a job id in, one step of the state machine out.

The logic is in :mod:`worker.steps`; a task only finds this process's runtime and calls the
step. The tasks are registered on an app by :func:`register_tasks` (called by
:func:`worker.app.get_app`), not by decorators at import: the app depends on the broker URL of
the settings a command runs with, which are not known when this module is imported. The
runtime is built lazily, in the process that runs the task — after a prefork worker has forked —
so no database connection or HTTP pool is ever shared across processes.

A task tells the tick leader what happened to its job (fal accepted it, or a slot came free).
When the leader is this very process — a threads-pool worker whose ticker leads (see
:func:`conduct_here`) — that is a call to its conductor, as in the embedded mode; otherwise a
PostgreSQL ``NOTIFY`` that the leader, wherever it runs, listens for.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from jobs import db, store
from jobs.errors import NotFoundError
from jobs.settings import REDIS_SCHEMES, Settings, get_settings
from worker import logs, steps
from worker.crash import crash_file
from worker.embedded import after_crash
from worker.runtime import build_runtime
from worker.step_outage import DATABASE_FULL, GiveBack, after_full_disk, database_failed, left_for_schema
from worker.steps import Runtime
from worker.steps.context import outcome_error
from worker.task_events import sent_events

if TYPE_CHECKING:
    from celery import Celery, Task

    from worker.conductor import Conductor
    from worker.fal.models import RequestHandle

log = logging.getLogger(__name__)

SUBMIT_TASK = "wanbatch.submit_job"
DOWNLOAD_TASK = "wanbatch.download_job"

#: A message for a job this worker's database does not hold (:func:`_not_in_this_database`) is
#: handed back to the broker after this pause — so a worker of the wrong database, which may
#: take the copy again, does not spin on it — at most this many times in all; the header counts.
HAND_BACK_PAUSE_SECONDS = 2.0
HAND_BACK_LIMIT = 10
HAND_BACK_HEADER = "wanbatch_handed_back"

_runtime: Runtime | None = None
_lock = threading.Lock()
#: The jobs of this process's tasks that the database failed, given back once it answers.
_give_back = GiveBack()


def task_runtime(app: Celery, settings: Settings, *, batch_ids: frozenset[str] | None = None) -> Runtime:
    """A runtime whose hand-offs (submit, download) are messages to ``app``'s tasks."""

    events = sent_events(app)  # the task-sent events, in bunches
    rt = build_runtime(
        settings=settings,
        enqueue_submit=hand_off(app, SUBMIT_TASK, events, settings.broker_url),
        enqueue_download=hand_off(app, DOWNLOAD_TASK, events, settings.broker_url),
        batch_ids=batch_ids,
    )
    rt.notify = _notifier(rt.engine)
    rt.on_accepted = _watch_here
    rt.broker_epoch = redis_epoch(settings.broker_url)
    return rt


def hand_off(app: Celery, name: str, events: object, broker_url: str | None) -> Callable[[str], None]:
    """What hands a job to ``app``'s task ``name``: one message carrying the job id, its
    ``task-sent`` event buffered in ``events`` (:func:`worker.task_events.sent_events`), with
    :func:`hand_off_options` for ``broker_url``'s broker."""
    task = app.tasks[name]
    options = hand_off_options(broker_url)

    def send(job_id: str) -> None:
        # argsrepr: what Celery's saferepr writes for a tuple of one short string, not computed by it
        task.apply_async((job_id,), event_dispatcher=events, argsrepr=repr((job_id,)), **options)

    return send


def hand_off_options(broker_url: str | None) -> dict[str, object]:
    """The ``apply_async`` options of a hand-off (a job id to a task) beyond Celery's defaults.

    ``kwargsrepr``: the ``"{}"`` Celery's ``saferepr`` writes for no keyword arguments, given
    rather than computed for every message (``argsrepr`` is given by the sender likewise).

    ``declare=[]`` on a Redis broker (and kombu's in-memory transport): Celery otherwise
    declares the task's queue before every publish (``send_task_message``'s ``declare=[queue]``),
    which kombu answers from its per-connection cache, but only after building a retrying
    wrapper around the check (``kombu.common._imaybe_declare``: about 200 Python calls, a fifth
    of a hand-off). Celery publishes a task on the default, nameless exchange, so on Redis the
    message is an ``LPUSH`` onto the queue's list, which the push creates; a declaration only
    records the queue's binding (``_kombu.binding.wanbatch``), which that publish never reads and
    every worker's consumer records itself when it starts consuming. On other brokers
    (RabbitMQ: a message published to a queue nobody declared is dropped) Celery's declaration
    stays. Delivery is unchanged: the same message, on the same list, acknowledged late.
    """
    options: dict[str, object] = {"kwargsrepr": "{}"}
    if broker_url is None or broker_url.startswith(REDIS_SCHEMES):
        options["declare"] = []
    return options


#: The marker of the broker's incarnation in a Redis broker's database: a random id, set when
#: missing (``SET NX``: of several workers setting it at once, one wins, and every one reads its
#: id), never expiring. A ``FLUSHALL``/``FLUSHDB``, or an eviction under a ``maxmemory-policy``
#: that evicts keys, takes it with the queued messages while the server's ``run_id`` stays.
BROKER_EPOCH_KEY = "wanbatch:broker-epoch"


def redis_epoch(url: str | None) -> Callable[[], str | None] | None:
    """For a Redis broker, a function giving its incarnation, ``RUN_ID MARKER``: the server's
    ``run_id``, a new random id at every start (https://redis.io/docs/latest/commands/info/), and
    the marker :data:`BROKER_EPOCH_KEY` of the broker's database, set anew when it is missing (a
    flush, an eviction: the queues went with it). None while it cannot be told: the marker
    missing and Redis refusing to write a new one (``maxmemory`` reached): unknown,
    not a new incarnation made of a marker nobody stored. A Redis that does not answer (refused,
    timed out) raises its client's error: the conductor then knows the broker is down even while
    it hands nothing on. None for any other broker (RabbitMQ keeps durable queues across
    restarts). The conductor tells a restart (a new ``run_id``) from a flush or an eviction (the
    marker alone new)."""
    if not url or not url.startswith(("redis://", "rediss://")):
        return None
    import uuid

    import redis

    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)

    def epoch() -> str | None:
        try:
            # The marker, then the run_id: a restart between the two reads is still read as a
            # restart (a new run_id), and the next tick's missing marker as one more loss (a
            # second hand-on: harmless). No MULTI: Redis refuses EXEC when out of memory, and a
            # Redis that refuses writes must still read as before.
            marker = client.get(BROKER_EPOCH_KEY)
            info = client.info("server")
            if marker is None:
                # Only when missing: a Redis that refuses writes (out of memory) reads as before.
                client.set(BROKER_EPOCH_KEY, uuid.uuid4().hex, nx=True)
                marker = client.get(BROKER_EPOCH_KEY)  # this one's, or the one another set first
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # down: the caller says so (Conductor._after_broker_restart)
        except redis.RedisError:  # answered but refused (out of memory): cannot tell
            return None
        run_id = info.get("run_id")
        if not run_id or marker is None:
            return None
        return f"{run_id} {marker.decode(errors='replace')}"

    return epoch


@dataclass(frozen=True)
class _Here:
    """The conductor of this process's ticker, and whether that ticker leads right now."""

    conductor: Conductor
    leads: Callable[[], bool]
    pid: int


_here: _Here | None = None


def conduct_here(conductor: Conductor | None, leads: Callable[[], bool] = lambda: False) -> None:
    """Make ``conductor`` (this process's ticker's; None: no more) the one tasks in this process
    tell directly while ``leads()`` says its ticker holds the leader lock.

    With a threads pool the tasks run in the process whose ticker may lead: telling its
    conductor is then a call, not a ``NOTIFY`` through the database that this same process
    would receive, and a job fal accepted is followed from its handle at once, without the read
    the notice would cost (:meth:`Conductor.watch_accepted`). Prefork children never see it
    (they are other processes: the pid check), nor does a process whose ticker does not lead;
    both go through the database. ``leads()`` may be a moment stale — a notice then reaches a
    conductor that no longer acts on it — which costs latency only: the new leader's tick finds
    the job, as it finds a lost ``NOTIFY``.
    """
    global _here
    _here = None if conductor is None else _Here(conductor, leads, os.getpid())


def _leader_here() -> Conductor | None:
    here = _here
    if here is None or here.pid != os.getpid() or not here.leads():
        return None
    return here.conductor


def _watch_here(job_id: str, handle: RequestHandle, batch_id: str) -> None:
    """The submit step's ``on_accepted``: the leader's conductor follows the request now, if it
    runs in this process (otherwise it learns of it from the notice, then reads the job)."""
    conductor = _leader_here()
    if conductor is not None:
        conductor.watch_accepted(job_id, handle, batch_id)


#: What a task tells the conductor through the database when it runs in another process.
_WORTH_TELLING = frozenset({"submitted", "freed"})


def _notifier(engine: Engine) -> Callable[[str, str], None]:
    """Tell the tick leader: its conductor directly when it is in this process (see
    :func:`conduct_here`), else over the database (PostgreSQL ``NOTIFY``).

    Best effort: a notice that cannot be sent only costs latency, the leader's tick finds the
    job anyway. On other databases (SQLite: one host) the tick is what finds it.
    """
    postgres = engine.dialect.name == "postgresql"

    def send(kind: str, job_id: str) -> None:
        conductor = _leader_here()
        if conductor is not None:
            conductor.notify(kind, job_id)
            return
        if not postgres or kind not in _WORTH_TELLING:
            return
        try:
            # After the step's commit: one autocommit statement, not a unit of work of its own.
            db.notify_now(engine, f"{kind}:{job_id}")
        except Exception:  # the database is down: the leader's tick will find the job
            log.debug(
                "could not notify the leader of %s %s",
                kind,
                job_id,
                exc_info=True,
                extra={"event": "notify.failed", "job_id": job_id},
            )

    return send


def runtime(app: Celery) -> Runtime:
    """This process's runtime: the one installed (embedded), else built on first use from the
    process settings — in a distributed worker, the worker's environment."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = task_runtime(app, get_settings())
        return _runtime


def built_runtime() -> Runtime | None:
    """This process's runtime if one was built or installed, without building one (a stopping
    worker's :func:`worker.running.worker_stop_watch` keeps its accepted submissions)."""
    return _runtime


def set_runtime(rt: Runtime | None) -> None:
    """Install a runtime (embedded mode shares the one its loop built)."""
    global _runtime
    with _lock:
        _runtime = rt


def _run(task: Task, job_id: str, step: Callable[[Runtime, str], str]) -> str:
    rt = runtime(task.app)
    with logs.job_context(job_id):  # every line the step logs names its job
        if rt.schema_behind is not None:  # downgraded under this worker, which stops: left as it is
            return left_for_schema(rt, step.__name__, job_id)
        try:
            outcome = step(rt, job_id)
        except NotFoundError as exc:
            if _holds_job(rt, job_id):  # something else was missing: a bug, bounded as every one
                after_crash(rt, step, job_id, exc, crash_file(exc, where=step.__name__))
                raise
            return _not_in_this_database(task, rt, job_id)
        except Exception as exc:
            # A killed connection, a restart, a failover: no bug, so one line and no traceback
            # (Celery logs a task that raises with its traceback), and the job is given back as
            # soon as the database answers, as in an embedded run; a schema downgraded under
            # this worker leaves the job as it was. Anything else raises: a bug.
            met = database_failed(_give_back, rt, step.__name__, job_id, exc)
            if met is None:
                # A bug: Celery logs it with its traceback; a download is given back, and its
                # batch paused if it recurs, never taken again for ever (worker.embedded).
                after_crash(rt, step, job_id, exc, crash_file(exc, where=step.__name__))
                raise
            return met
        if outcome == DATABASE_FULL:  # not sent; its lease may be held still: given back once there is room
            after_full_disk(_give_back, rt, job_id)
        logs.step_done(log, step.__name__, job_id, outcome, **outcome_error(rt, job_id, outcome))
    return outcome


def _holds_job(rt: Runtime, job_id: str) -> bool:
    """Whether this worker's database holds ``job_id`` (True when it cannot tell: the step's
    error is then reported as it was)."""
    try:
        with db.read_scope(rt.engine) as session:
            store.get_job(session, job_id)
    except NotFoundError:
        return False
    except Exception:
        return True
    return True


def _not_in_this_database(task: Task, rt: Runtime, job_id: str) -> str:
    """A message names a job this worker's database does not hold: no bug, but a worker given
    another ``WANBATCH_DATABASE_URL`` than the process that sent the message, on the same broker
    (jobs are never deleted). One warning line, no traceback, and the message goes back to the
    broker for a worker of the right database — acknowledged and dropped, its job would sit
    leased until ``WANBATCH_LEASE_SECONDS`` ran out.

    Handed back as a copy (carrying a count in a header), not by Celery's ``Reject(requeue=True)``:
    with ``task_acks_late`` that would requeue the message too, but Celery logs every rejection
    as a warning *with a traceback*, and a requeued message carries nothing to count with. The
    copy is sent after :data:`HAND_BACK_PAUSE_SECONDS` (this worker may take it again; the pause
    also keeps it from taking other messages meanwhile), at most :data:`HAND_BACK_LIMIT` times in
    all; then it is dropped, and the job's own deployment takes it up when its lease runs out.
    A copy is harmless: each step takes the job's lease fenced by its version.
    """
    handed_back = _handed_back(task)
    url = db.safe_url(rt.settings.database_url)
    where = f"this worker's WANBATCH_DATABASE_URL {url} does not hold job {job_id}"
    why = "it probably serves another database than the process that sent the message"
    extra = {"event": "task.job_not_in_database", "job_id": job_id}
    if handed_back >= HAND_BACK_LIMIT:
        log.warning(
            "%s — %s; the message was handed back %d times already: dropped (the job is taken up "
            "again when its lease runs out)",
            where,
            why,
            handed_back,
            extra=extra,
        )
        return "not-in-this-database"
    time.sleep(HAND_BACK_PAUSE_SECONDS)
    try:
        task.apply_async((job_id,), headers={HAND_BACK_HEADER: handed_back + 1})
    except Exception as exc:  # the broker is down: the lease brings the job back
        log.warning(
            "%s — %s; could not hand the message back to the broker (%s): the job is taken up "
            "again when its lease runs out",
            where,
            why,
            exc,
            extra=extra,
        )
        return "not-in-this-database"
    log.warning(
        "%s — %s; the message goes back to the broker for a worker of that database", where, why, extra=extra
    )
    return "not-in-this-database"


def _handed_back(task: Task) -> int:
    """How many times the message being run was handed back already (its header; 0 without)."""
    value = getattr(task.request, HAND_BACK_HEADER, None)
    try:
        return max(0, int(value)) if value is not None else 0
    except (TypeError, ValueError):
        return HAND_BACK_LIMIT  # not ours to trust: no more hand-backs


def submit_job(task: Task, job_id: str) -> str:
    """POST one claimed job to fal, once."""
    return _run(task, job_id, steps.submit)


def download_job(task: Task, job_id: str) -> str:
    """Fetch the result and video of one completed job."""
    return _run(task, job_id, steps.download)


def register_tasks(app: Celery) -> None:
    """Register the tasks on ``app`` only (``shared=False``: not on every app Celery finalizes)."""
    app.task(name=SUBMIT_TASK, bind=True, shared=False, lazy=False)(submit_job)
    app.task(name=DOWNLOAD_TASK, bind=True, shared=False, lazy=False)(download_job)
