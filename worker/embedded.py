"""The embedded deployment: a Celery worker inside this process, over kombu's memory transport.

With no ``WANBATCH_BROKER_URL``, ``wanbatch run`` still runs the very same Celery tasks, just
consumed by a thread-pool worker living in the CLI process (the shape of Celery's own
``contrib.testing`` worker, without its test-only hooks). One code path, two deployments.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from celery import Celery
from celery.worker import WorkController
from celery.worker import state as worker_state

log = logging.getLogger(__name__)


class _Controller(WorkController):  # type: ignore[misc]
    """A WorkController that tells us when its consumer is ready to take messages."""

    def __init__(self, *args: object, ready: threading.Event, **kwargs: object) -> None:
        self._ready = ready
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: object) -> None:
        self._ready.set()


class EmbeddedWorker:
    """Context manager: start an in-process worker with ``concurrency`` threads; stop it on exit."""

    def __init__(self, app: Celery, concurrency: int, *, start_timeout: float = 30.0) -> None:
        self.app = app
        self.concurrency = concurrency
        self.start_timeout = start_timeout
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._abandoned = False

    def __enter__(self) -> EmbeddedWorker:
        # The pool's threads look tasks up in Celery's current (else default) app, and a new
        # thread has no current app: make this one both, as Celery's own worker does
        # (``celery.app.trace.setup_worker_optimizations``). One embedded app per process.
        self.app.set_current()
        self.app.set_default()
        controller = _Controller(
            app=self.app,
            concurrency=self.concurrency,
            pool="threads",
            hostname="embedded@wanbatch",
            loglevel="WARNING",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            ready=self._ready,
        )
        self._thread = threading.Thread(target=controller.start, name="wanbatch-embedded-worker", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise RuntimeError("the embedded Celery worker did not start")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._abandoned:
            return  # the process is on its way out: never wait for the tasks left running
        self._stop()
        if self._thread is not None:
            self._thread.join(30)
            if self._thread.is_alive():
                log.warning("embedded worker did not stop within 30 s")
        worker_state.should_terminate = None

    def abandon(self, wait: float = 1.0) -> None:
        """Stop taking tasks now, and leave the running ones behind (Ctrl-C).

        A normal stop waits for every running task, and Celery's thread pool joins its threads
        (``ThreadPoolExecutor.shutdown``): a download in flight kept ``wanbatch run`` alive for
        minutes after Ctrl-C. Here queued tasks are dropped (their jobs' leases are given back by
        the caller) and running ones are not waited for beyond ``wait`` seconds; the caller then
        ends the process with ``os._exit``, which is what actually abandons them.
        """
        self._abandoned = True
        self._stop()
        if self._thread is not None:
            self._thread.join(wait)

    def _stop(self) -> None:
        worker_state.should_terminate = 0  # the documented way Celery's own embedded worker stops
        # Celery's synchronous consume loop waits up to 2 s for a message before it looks at
        # should_terminate (twice, around its finally). Two no-op messages wake it at once:
        # this turns a 4 s stop into ~0.1 s for every `wanbatch run`.
        from worker.app import QUEUE

        for _ in range(2):
            self.app.send_task("celery.accumulate", queue=QUEUE)
