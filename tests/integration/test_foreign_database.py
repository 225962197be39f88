"""A worker whose database does not hold the job a message names hands the message back.

The bug (distributed-operator audit): a worker started with another ``WANBATCH_DATABASE_URL``
than the deployment whose broker it shares took that deployment's messages, logged each as a bug
(``raised unexpected: NotFoundError("no job ...")`` with a full traceback), and the message was
acknowledged: the job sat ``submitting``/``downloading`` until its lease ran out. Now: one
warning line naming this worker's (masked) database, and the message goes back to the broker
for a worker of the right database — a bounded number of times, so it cannot spin.

A real Celery worker (a thread, kombu's in-memory transport) runs the real task against a real
database that holds no such job.
"""

from __future__ import annotations

import logging
import time

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy import Engine

from tests.step_runtime import make_runtime, settings_for
from worker import tasks
from worker.app import make_app
from worker.tasks import HAND_BACK_HEADER, SUBMIT_TASK, register_tasks

KEY = "foreign-db-key-8e1d"
QUEUE = "wanbatch-foreign-database-test"
JOB_ID = "0f7c2d1e-job-of-another-database"


@pytest.fixture
def app() -> Celery:
    """An app on the in-memory broker, with a queue of its own (the transport is per process)."""
    app = make_app(None)
    app.conf.task_default_queue = QUEUE
    register_tasks(app)
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(QUEUE)
    return app


def _notes(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "task.job_not_in_database"]


def test_a_message_for_a_job_of_another_database_goes_back_to_the_broker(
    engine: Engine, app: Celery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", KEY))  # fal is never reached
    tasks.set_runtime(rt)
    monkeypatch.setattr(tasks, "HAND_BACK_PAUSE_SECONDS", 0.0)
    monkeypatch.setattr(tasks, "HAND_BACK_LIMIT", 3)
    caplog.set_level(logging.INFO)
    try:
        app.tasks[SUBMIT_TASK].apply_async((JOB_ID,))
        with start_worker(app, pool="solo", perform_ping_check=False, loglevel="INFO"):
            deadline = time.monotonic() + 20
            # Run once, handed back 3 times (each copy run again), the last copy dropped.
            while len(_notes(caplog)) < 4:
                assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
                time.sleep(0.02)
            time.sleep(0.2)  # a fifth run would show now
    finally:
        tasks.set_runtime(None)
        rt.client.close()

    notes = _notes(caplog)
    assert len(notes) == 4
    for note in notes:
        text = note.getMessage()
        assert note.levelno == logging.WARNING
        assert f"does not hold job {JOB_ID}" in text
        assert "WANBATCH_DATABASE_URL" in text
        assert "another database than the process that sent the message" in text
    assert all("goes back to the broker" in n.getMessage() for n in notes[:3])
    assert "handed back 3 times already: dropped" in notes[3].getMessage()
    # No traceback anywhere (Celery logs a task that raises, or rejects, with one), no error.
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    with app.connection_for_read() as conn:
        assert conn.default_channel.queue_declare(QUEUE, passive=True).message_count == 0


def test_the_hand_back_count_comes_from_the_message_header() -> None:
    class Request:
        pass

    class Task:
        request = Request()

    assert tasks._handed_back(Task()) == 0
    setattr(Task.request, HAND_BACK_HEADER, 2)
    assert tasks._handed_back(Task()) == 2
    setattr(Task.request, HAND_BACK_HEADER, "junk")
    assert tasks._handed_back(Task()) == tasks.HAND_BACK_LIMIT
