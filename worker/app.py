"""The Celery app: transport only. The database is the system of record.

Messages carry a job id and nothing else, so a message that is lost, delayed or delivered
twice does no harm: every task re-reads its job and moves it with a fenced compare-and-set,
and the periodic tick (``worker.ticker``) finds any due work a lost message left behind.

The app is built by a function, never at import: :func:`get_app` makes one per broker URL (the
settings' ``WANBATCH_BROKER_URL``, or kombu's in-memory transport for the embedded mode) and
registers the tasks on it. So a command runs on the broker of the settings it was given — a
module-level app took the URL of whatever environment first imported it, for the whole process.

Settings, and why (Celery's configuration reference:
https://docs.celeryq.dev/en/stable/userguide/configuration.html):

* ``task_serializer``/``accept_content`` = JSON only: pickle would let anyone who can write to
  the broker run code in the worker
  (https://docs.celeryq.dev/en/stable/userguide/security.html#serializers).
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a task's message is acknowledged after
  it ran, so a worker killed mid-task (kill -9, OOM) leaves the message to be redelivered
  rather than lost. Redelivery is safe because steps are idempotent under the job's version.
* ``worker_prefetch_multiplier = 1``: a worker reserves one message per process, so a slow
  download does not hold other jobs' messages hostage
  (https://docs.celeryq.dev/en/stable/userguide/optimizing.html#prefetch-limits).
* ``visibility_timeout`` (Redis): how long an unacknowledged message stays invisible before
  Redis hands it to another worker. It must exceed the longest task (a large download at the
  read timeout) or tasks would run twice concurrently; 2 h is far above any step here, and a
  redelivery in between is harmless anyway
  (https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html#visibility-timeout).
* ``task_ignore_result``: results live in the database; no result backend is needed.
* ``broker_connection_retry_on_startup`` and unlimited ``broker_connection_max_retries``:
  a worker outlives a broker restart instead of exiting.
* ``worker_send_task_events`` + ``task_send_sent_event`` with a broker (distributed mode):
  workers publish task events (received, started, succeeded, failed, retried) and senders a
  ``task-sent`` event, so Flower (``celery --broker=$WANBATCH_BROKER_URL flower``) and
  ``celery events`` show the tasks live. A few small messages per task, on the broker only;
  the embedded mode has no broker to publish on, so there they stay off
  (https://docs.celeryq.dev/en/stable/userguide/monitoring.html#events).
  A worker publishes its task events in bunches, every :data:`TASK_EVENTS_FLUSH_SECONDS`
  (:class:`BatchedTaskEvents`), not one message per event; a sender its ``task-sent`` events
  likewise (:class:`SentEvents`).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from functools import cache
from typing import Any

from celery import Celery, bootsteps

from jobs.settings import BrokerSettings

VISIBILITY_TIMEOUT_SECONDS = 2 * 60 * 60
QUEUE = "wanbatch"

#: How often a worker publishes the task events it has buffered, all in one message.
TASK_EVENTS_FLUSH_SECONDS = 0.5
#: Buffered task events beyond this many are published at once by whoever adds one (a safety
#: valve against a burst; at 0.5 s a 2-core worker buffers a few dozen).
TASK_EVENTS_BUFFER_LIMIT = 1000


class BatchedTaskEvents(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Publishes a worker's task events in bunches, every :data:`TASK_EVENTS_FLUSH_SECONDS`.

    Celery's worker already buffers task events (``task-received``, ``-started``,
    ``-succeeded``…) and publishes each buffer as one ``task.multi`` message, which Celery's
    event receiver — Flower's, ``celery events``' — splits back into the events
    (``celery.worker.consumer.events``, ``celery.events.receiver``). But it flushes on the next
    turn of its event loop, so under load nearly every event went out alone: about three
    ``PUBLISH`` per task, each costing the worker a Redis round trip and a wake-up of its loop
    (3,138 publishes for the 800 tasks of the 400-job drain benchmark). This consumer bootstep
    (https://docs.celeryq.dev/en/stable/userguide/extending.html#consumer-bootsteps) replaces
    the flush-per-turn with a flush every :data:`TASK_EVENTS_FLUSH_SECONDS` on the worker's
    own timer, so the events are the same, only up to that much later; the buffer is also
    flushed when the consumer stops or shuts down. Worker events (``worker-online``,
    heartbeats) are not buffered by Celery and are unchanged.
    """

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        self.tref: Any = None
        super().__init__(parent, **kwargs)

    def start(self, parent: Any) -> None:
        dispatcher = parent.event_dispatcher
        # Celery buffers task events only with an event loop (the hub); otherwise, nothing to do.
        if dispatcher is None or not parent.hub or not dispatcher.buffer_group:
            return
        dispatcher.on_send_buffered = None  # no flush on the next loop turn: the timer flushes
        dispatcher.buffer_limit = TASK_EVENTS_BUFFER_LIMIT
        self.tref = parent.timer.call_repeatedly(TASK_EVENTS_FLUSH_SECONDS, _flush_task_events, (parent,))

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            parent.timer.cancel(self.tref)
            self.tref = None
        _flush_task_events(parent)

    shutdown = stop


def _flush_task_events(consumer: Any) -> None:
    dispatcher = consumer.event_dispatcher
    if dispatcher is not None and dispatcher.enabled:
        dispatcher.flush()


class SentEvents:
    """The ``task-sent`` events of one process's sends, published in bunches, every
    :data:`TASK_EVENTS_FLUSH_SECONDS`, as :class:`BatchedTaskEvents` publishes a worker's.

    Celery publishes a sender's ``task-sent`` event at once, beside the task's own message
    (``celery.app.amqp``: ``send_task_message`` calls its event dispatcher's ``publish``): a
    second Redis round trip per task, about a third of what handing a job to Celery costs the
    leader's conductor. Passed as the ``event_dispatcher`` option of ``apply_async`` (which
    ``send_task_message`` takes), this object buffers the event instead, in Celery's own event
    dispatcher's ``task`` group, whose flush sends the buffer as one ``task.multi`` message that
    every receiver (Flower, ``celery events``) splits back into the events. The events are the
    same, only up to that much later; what is buffered is flushed when the process exits.
    A process forked from this one starts its own buffer and connection.
    """

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._dispatcher: Any = None
        self._pid = 0

    def publish(self, type: str, fields: dict[str, Any], producer: Any = None, **_: Any) -> None:
        """What Celery calls to send the event (``EventDispatcher.publish``'s signature)."""
        with self._lock:
            if self._dispatcher is None or self._pid != os.getpid():
                self._open()
            self._dispatcher.send(type, **fields)  # buffered: its group is "task"

    def _open(self) -> None:
        """A dispatcher of our own (a connection of its own: only ever used under the lock) and
        the thread that flushes it. Called with the lock held."""
        self._dispatcher = self._app.events.Dispatcher(
            connection=self._app.connection_for_write(),
            buffer_group=["task"],
            buffer_limit=TASK_EVENTS_BUFFER_LIMIT,
        )
        self._pid = os.getpid()
        threading.Thread(target=self._flush_every, name="wanbatch-sent-events", daemon=True).start()
        atexit.register(self.flush)

    def _flush_every(self) -> None:
        """The flushing thread: for the life of the process (a daemon), never in a forked child."""
        pid = os.getpid()
        while pid == os.getpid():
            time.sleep(TASK_EVENTS_FLUSH_SECONDS)
            self.flush()

    def flush(self) -> None:
        """Publish what is buffered now (a broker that cannot be reached keeps it for the next)."""
        with self._lock:
            if self._dispatcher is not None and self._pid == os.getpid():
                self._dispatcher.flush()


_sent_events: dict[int, SentEvents] = {}


def sent_events(app: Celery) -> SentEvents:
    """``app``'s :class:`SentEvents` in this process."""
    found = _sent_events.get(id(app))
    if found is None:
        found = _sent_events[id(app)] = SentEvents(app)
    return found


def make_app(broker_url: str | None) -> Celery:
    """A configured app without tasks (enough to ping workers). Without a broker URL it uses
    kombu's in-memory transport (embedded)."""
    app = Celery("wanbatch", broker=broker_url or "memory://localhost/", set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT_SECONDS,
            "polling_interval": 0.05 if broker_url is None else 1.0,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=broker_url is not None,
        task_send_sent_event=broker_url is not None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    if broker_url is not None:
        app.steps["consumer"].add(BatchedTaskEvents)
    return app


@cache
def _app_for(broker_url: str | None) -> Celery:
    # Here, not at the top: the tasks bring the steps (the fal client, PyAV), which a process
    # that only pings workers or sends them messages (``run``'s watcher, ``status``) never needs.
    from worker.tasks import register_tasks

    app = make_app(broker_url)
    register_tasks(app)
    return app


def get_app(settings: BrokerSettings) -> Celery:
    """The app of ``settings``' broker with the tasks registered: one per broker URL and process."""
    return _app_for(settings.broker_url)


def run_worker(app: Celery, *, pool: str, concurrency: int | None, loglevel: str, quiet: bool) -> int:
    """Run a Celery worker consuming :data:`QUEUE` until it stops; its exit code.

    What ``celery worker -Q wanbatch --without-gossip --without-mingle`` does
    (``celery.bin.worker.worker``: drop privileges if asked, ``app.Worker(...).start()``), without
    going through Celery's command line: importing ``celery.bin.celery`` brings every Celery
    subcommand with it, ``click_repl`` and ``prompt_toolkit`` among them (the ``amqp`` shell),
    which was about a tenth of a worker's start-up CPU (measured: 190 ms against 18 ms on a
    2-core AMD EPYC). Gossip and mingle are off: workers share nothing but the database and the
    queue, and mingle's start-up round trip only syncs revoked-task lists, which wanbatch does
    not use (cancellation goes through the database).
    """
    from celery import concurrency as pools
    from celery.platforms import maybe_drop_privileges
    from celery.utils.log import mlevel

    pool_cls = pools.get_implementation(pool)  # "threads", "prefork", ...: Celery's aliases
    maybe_drop_privileges(uid=None, gid=None)  # Celery's check: a root worker is warned about
    options: dict[str, Any] = {}
    if concurrency:
        options["concurrency"] = concurrency
    worker = app.Worker(
        pool_cls=pool_cls,
        loglevel=mlevel(loglevel),  # a number, as Celery's ``-l`` option makes it
        queues=[QUEUE],
        without_gossip=True,
        without_mingle=True,
        quiet=quiet,
        **options,
    )
    worker.start()
    return int(worker.exitcode or 0)
