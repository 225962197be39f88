"""Celery's task events as Flower receives them: a receiver on the broker, in a thread."""

from __future__ import annotations

import threading
import time
from typing import Any

from worker.app import make_app

#: The event :meth:`EventTap.wait_listening` sends itself (no receiver of Celery's knows it).
PROBE = "wanbatch-tap-probe"


class EventTap:
    """Celery's event receiver on the broker, in a thread, as Flower listens."""

    def __init__(self, broker: str) -> None:
        self.app = make_app(broker)
        self.events: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.app.connection() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            self.ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def wait_listening(self, timeout: float = 15.0) -> None:
        """Until the receiver's queue is bound on the broker (an event published before is lost
        to it, as to Flower): a probe event is sent every 50 ms until one comes back."""
        deadline = time.monotonic() + timeout
        assert self.ready.wait(timeout), "the event receiver never connected"
        with self.app.events.default_dispatcher() as dispatcher:
            while not any(event["type"] == PROBE for event in list(self.events)):
                assert time.monotonic() < deadline, f"the event receiver heard nothing in {timeout} s"
                dispatcher.send(PROBE)
                time.sleep(0.05)

    def task_events(self) -> dict[str, set[str]]:
        """Task uuid -> the kinds of event seen for it."""
        seen: dict[str, set[str]] = {}
        for event in list(self.events):
            if event["type"].startswith("task-"):
                seen.setdefault(event["uuid"], set()).add(event["type"])
        return seen

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)
        self.app.close()
