"""``task-sent`` events go out in bunches (:class:`worker.task_events.SentEvents`); Flower gets each.

Celery published a sender's ``task-sent`` event at once, beside the task's own message: a second
broker round trip per task. Here the leader's sends (``worker.tasks.task_runtime``'s hand-offs)
buffer it; a receiver on the broker, as Flower's, must still see one event per task, with the
task's id and name, from far fewer messages.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery.events.dispatcher import EventDispatcher

from bench.distributed import claimed_redis_db
from tests.celery_events import EventTap
from tests.step_runtime import settings_for
from worker.app import make_app
from worker.runtime import close_runtime
from worker.task_events import TASK_EVENTS_FLUSH_SECONDS, sent_events
from worker.tasks import register_tasks, task_runtime

pytestmark = pytest.mark.redis

TASKS = 30


def test_task_sent_events_arrive_in_bunches_and_each_one_arrives(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    published: list[Any] = []
    real_publish = EventDispatcher._publish

    def counting(self: EventDispatcher, event: Any, *args: Any, **kwargs: Any) -> Any:
        published.append(event)
        return real_publish(self, event, *args, **kwargs)

    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as broker:
        tap = EventTap(broker)
        app = make_app(broker)
        try:
            tap.wait_listening()  # the receiver's queue is bound before the first event
            monkeypatch.setattr(EventDispatcher, "_publish", counting)  # the probes not counted
            events = sent_events(app)
            assert sent_events(app) is events  # one per app and process
            started = time.monotonic()
            ids = [
                app.send_task("wanbatch.submit_job", (f"job-{i}",), event_dispatcher=events).id
                for i in range(TASKS)
            ]
            sending = time.monotonic() - started
            deadline = time.monotonic() + 10 + TASK_EVENTS_FLUSH_SECONDS
            sent: dict[str, dict[str, Any]] = {}
            while len(sent) < TASKS and time.monotonic() < deadline:
                sent = {e["uuid"]: e for e in list(tap.events) if e["type"] == "task-sent"}
                time.sleep(0.05)
        finally:
            tap.stop()
            app.close()
    assert set(sent) == set(ids)
    assert {e["name"] for e in sent.values()} == {"wanbatch.submit_job"}
    assert all(e["queue"] == "wanbatch" for e in sent.values())
    # Bunches: the 30 events left as ``task.multi`` messages (lists), one per flush, not one
    # message each. Flushes come TASK_EVENTS_FLUSH_SECONDS apart: while the sends took
    # ``sending`` seconds, and one after them (a slow machine only makes the bound looser).
    assert all(isinstance(p, list) for p in published), published
    assert sum(len(p) for p in published) == TASKS
    assert 1 <= len(published) <= 2 + sending / TASK_EVENTS_FLUSH_SECONDS, (len(published), sending)


def test_the_workers_hand_offs_send_their_task_sent_events_in_bunches(
    redis_url: str, sqlite_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``task_runtime``'s hand-offs (what the leader's conductor, the tick and the steps call)
    pass :func:`worker.task_events.sent_events` to Celery as the event dispatcher."""
    seen: list[Any] = []
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as broker:
        app = make_app(broker)
        register_tasks(app)
        real = app.send_task

        def recording(*args: Any, **options: Any) -> Any:
            seen.append(options.get("event_dispatcher"))
            return real(*args, **options)

        monkeypatch.setattr(app, "send_task", recording)
        settings = settings_for(
            "https://queue.invalid", "k", database_url=sqlite_url, output_dir=str(tmp_path / "out")
        )
        rt = task_runtime(app, settings)
        try:
            rt.enqueue_submit("job-1")
            rt.enqueue_download("job-2")
        finally:
            close_runtime(rt)
            app.close()
    assert seen == [sent_events(app), sent_events(app)]
