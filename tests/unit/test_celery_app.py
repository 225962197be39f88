"""The Celery app is built by a function, per broker URL, never at import (issue #10).

A module-level app took the broker URL of whatever environment first imported it: a test that
pointed ``WANBATCH_BROKER_URL`` at a dead broker before that import broke every later embedded
run of the process. Now each command gets the app of the settings it runs with.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from jobs.settings import Settings
from worker.app import get_app, make_app
from worker.tasks import DOWNLOAD_TASK, SUBMIT_TASK

DEAD_BROKER = "redis://127.0.0.1:1/0"


def test_each_broker_url_has_its_own_app_with_the_tasks() -> None:
    embedded = get_app(Settings(broker_url=None))
    distributed = get_app(Settings(broker_url=DEAD_BROKER))
    assert embedded is get_app(Settings(broker_url=None))
    assert embedded is not distributed
    assert embedded.conf.broker_url.startswith("memory://")
    assert distributed.conf.broker_url == DEAD_BROKER
    for app in (embedded, distributed):
        assert {SUBMIT_TASK, DOWNLOAD_TASK} <= set(app.tasks)
        assert app.tasks[SUBMIT_TASK].app is app


def test_tasks_are_registered_only_on_the_apps_that_asked() -> None:
    get_app(Settings(broker_url=None))
    assert SUBMIT_TASK not in make_app(None).tasks


def test_a_broker_set_before_the_first_import_does_not_leak_into_embedded_runs() -> None:
    code = (
        "import worker.app, worker.running, worker.tasks\n"
        "from jobs.settings import Settings\n"
        "print(worker.app.get_app(Settings(broker_url=None)).conf.broker_url)\n"
    )
    env = {**os.environ, "WANBATCH_BROKER_URL": DEAD_BROKER}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("memory://")


def test_a_second_ctrl_c_to_a_threads_worker_is_one_line_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Celery's cold shutdown kills the running tasks, which its threads pool cannot do: it raised
    NotImplementedError, logged with its traceback ("Error on stopping Pool"). Now one line."""
    from celery.concurrency import get_implementation
    from celery.concurrency.thread import TaskPool

    from worker.app import _cold_shutdown_safe

    pool_cls = _cold_shutdown_safe(get_implementation("threads"))
    assert issubclass(pool_cls, TaskPool)
    assert (pool_cls.__module__, pool_cls.__name__) == ("celery.concurrency.thread", "TaskPool")
    pool = pool_cls(limit=1)
    try:
        with caplog.at_level(logging.WARNING, logger="worker.app"):
            with pytest.raises(NotImplementedError):  # revoke --terminate: refused, as by Celery
                pool.terminate_job(4241, 15)
            pool.cancelling = True  # Celery's cold shutdown cancelling the running tasks
            pool.terminate_job(4242, 15)
            pool.terminate_job(4243, 15)  # said once per shutdown, not per task
    finally:
        pool.executor.shutdown()
    assert [r.__dict__.get("event") for r in caplog.records] == ["worker.cold_shutdown_waits"]
    assert "cannot be cut short" in caplog.records[0].getMessage()
    prefork = get_implementation("prefork")
    assert _cold_shutdown_safe(prefork) is prefork  # its children can be killed: left as it is
