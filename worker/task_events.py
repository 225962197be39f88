"""Celery's task events, published in bunches rather than one broker message per event.

Flower and ``celery events`` follow the tasks through these events
(https://docs.celeryq.dev/en/stable/userguide/monitoring.html#events). A worker publishes
``task-received``, ``-started``, ``-succeeded``… (:class:`BatchedTaskEvents`, a consumer bootstep
of :mod:`worker.app`'s app); whoever queues a task, a ``task-sent`` (:class:`SentEvents`, passed
to ``apply_async`` by :func:`worker.tasks.task_runtime`'s hand-offs). Both flush every
:data:`TASK_EVENTS_FLUSH_SECONDS`, as one ``task.multi`` message that every receiver splits back
into the events.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from functools import cache
from typing import Any

from celery import Celery, bootsteps
from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher

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


class WorkerEventDispatcher(EventDispatcher):  # type: ignore[misc]  # Celery is untyped
    """Celery's event dispatcher, but a publish it retries (``retry=True``: the worker's
    heartbeat, ``worker-online``) stops retrying once the worker is asked to stop.

    Celery's heartbeat publishes with retries and no retry policy: kombu reconnects to the
    broker for as long as it takes (``Connection.ensure`` without ``max_retries``), checking
    nothing in between. With a Redis that accepts connections but does not answer (stopped, a
    hung host), the worker's main thread stayed in that loop, and SIGTERM's warm shutdown
    (Celery only sets a flag that loop never reads) never came: the worker outlived its stop by
    as long as the outage lasted, until Compose's SIGKILL. The retry policy given here has
    kombu call :func:`_stop_if_asked` at each failed attempt, which ends the loop with Celery's
    own ``WorkerShutdown`` (``WorkerTerminate`` after a cold stop) when a stop is pending, as
    Celery's consumer does while it reconnects (``ensure_connection``'s ``maybe_shutdown``). A
    retried publish that is not interrupted still retries as long as the broker is away.
    """

    def send(self, type: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("retry") and kwargs.get("retry_policy") is None:
            kwargs["retry_policy"] = {"errback": _stop_if_asked}
        return super().send(type, *args, **kwargs)


class WorkerEvents(Events):  # type: ignore[misc]  # Celery is untyped
    """``app.events`` of :func:`worker.app.make_app`'s app: its dispatchers are
    :class:`WorkerEventDispatcher`."""

    dispatcher_cls = f"{__name__}:WorkerEventDispatcher"


def _stop_if_asked(exc: BaseException, interval: float) -> None:
    """kombu's errback of a retried publish (each failed attempt to reach the broker): raise
    Celery's ``WorkerShutdown``/``WorkerTerminate`` when the worker was asked to stop (a signal
    sets the flag; :func:`celery.worker.state.maybe_shutdown` raises for it). Only on the main
    thread, where Celery's worker loop runs and expects them; another thread's publish (a
    task's, the ticker's) keeps its own bounds."""
    if threading.current_thread() is threading.main_thread():
        from celery.worker.state import maybe_shutdown

        maybe_shutdown()


@cache
def sent_events(app: Celery) -> SentEvents:
    """``app``'s :class:`SentEvents` in this process."""
    return SentEvents(app)
