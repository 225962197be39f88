"""A hand-off (a job id to a task, worker.tasks.hand_off) costs the sender less than Celery's
defaults, for the very same message (issue #11: CPU per job in the distributed mode).

Celery declared the task's queue before every publish (kombu answers from its cache, but only
after building a retrying wrapper: about a fifth of a hand-off's Python calls) and computed the
message's ``argsrepr``/``kwargsrepr`` with its ``saferepr``; on a Redis broker (and kombu's
in-memory transport) the publish goes to the queue's list whichever, and the reprs are given.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.app import QUEUE, make_app
from worker.task_events import SentEvents
from worker.tasks import SUBMIT_TASK, hand_off, hand_off_options, register_tasks

JOB_ID = "0123456789abcdef0123456789abcdef"


def _drain(app: Any) -> list[Any]:
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue(QUEUE)
        got = []
        while queue.qsize():
            message = queue.get(block=False)
            got.append(message)
            message.ack()
        queue.close()
        return got


def test_a_hand_off_neither_declares_the_queue_nor_computes_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    import celery.app.amqp
    import kombu.messaging

    app = make_app(None)
    register_tasks(app)
    _drain(app)
    declared: list[Any] = []
    reprs: list[Any] = []
    real_declare, real_saferepr = kombu.messaging.Producer.maybe_declare, celery.app.amqp.saferepr

    def maybe_declare(self: Any, entity: Any, *args: Any, **kwargs: Any) -> Any:
        declared.append(entity)
        return real_declare(self, entity, *args, **kwargs)  # type: ignore[no-untyped-call]

    def saferepr(*args: Any, **kwargs: Any) -> Any:
        reprs.append(args)
        return real_saferepr(*args, **kwargs)

    monkeypatch.setattr(kombu.messaging.Producer, "maybe_declare", maybe_declare)
    monkeypatch.setattr(celery.app.amqp, "saferepr", saferepr)
    send = hand_off(app, SUBMIT_TASK, SentEvents(app), None)
    send(JOB_ID)
    send(JOB_ID)
    assert declared == []
    assert reprs == []
    messages = _drain(app)
    assert len(messages) == 2
    for message in messages:  # what Celery's defaults wrote: the same message
        assert message.headers["task"] == SUBMIT_TASK
        assert message.headers["argsrepr"] == f"('{JOB_ID}',)"
        assert message.headers["kwargsrepr"] == "{}"
        assert message.headers["ignore_result"] is True
        body = message.body
        args, kwargs, _embed = json.loads(body) if isinstance(body, (str, bytes)) else body
        assert (args, kwargs) == ([JOB_ID], {})


def test_the_reprs_given_are_what_celery_would_have_written() -> None:
    app = make_app(None)
    assert app.amqp.as_task_v2("id", SUBMIT_TASK, args=(JOB_ID,)).headers["argsrepr"] == repr((JOB_ID,))
    assert app.amqp.as_task_v2("id", SUBMIT_TASK, args=(JOB_ID,)).headers["kwargsrepr"] == "{}"


@pytest.mark.parametrize(
    ("url", "declares"),
    [
        (None, False),
        ("redis://redis.example:6379/3", False),
        ("rediss://redis.example:6380/0", False),
        ("amqp://guest@rabbit.example//", True),  # a queue nobody declared drops the message there
    ],
)
def test_the_queue_is_declared_by_celery_on_brokers_other_than_redis(url: str | None, declares: bool) -> None:
    options = hand_off_options(url)
    assert options["kwargsrepr"] == "{}"
    assert ("declare" not in options) is declares
