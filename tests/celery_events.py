"""Celery's task events as Flower receives them: a receiver on the broker, in a thread."""

from __future__ import annotations

import threading
from typing import Any

from worker.app import make_app


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
