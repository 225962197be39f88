"""A thread that cannot start (``ulimit -u``, or no memory for its stack) is a resource limit.

Before: ``InProcessWorker._hand`` took CPython's ``RuntimeError("can't start new thread")`` for
its pool shut down (a debug line), and the run hung, its job claimed and never run; at start-up
the same error was an ``internal error`` (exit 70). The OS's refusal is simulated where CPython
meets it (:data:`tests.thread_start.START`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from cli.output import guarded
from jobs.thread_limit import CANT_START_THREAD, cannot_start_thread
from tests.thread_start import START
from worker.embedded import InProcessWorker

_real_start = getattr(threading, START)


def _refuse_submit_threads(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """:data:`~tests.thread_start.START` as it fails under ``ulimit -u`` — for a submit pool's thread only."""
    thread = getattr(function, "__self__", None)
    if isinstance(thread, threading.Thread) and thread.name.startswith("wanbatch-submit"):
        raise RuntimeError(CANT_START_THREAD)
    return _real_start(function, *args, **kwargs)


def test_the_error_is_told_apart_from_a_pool_shut_down() -> None:
    assert cannot_start_thread(RuntimeError(CANT_START_THREAD))
    assert not cannot_start_thread(RuntimeError("cannot schedule new futures after shutdown"))


def test_a_step_thread_that_cannot_start_stops_the_run_once(monkeypatch: pytest.MonkeyPatch) -> None:
    stops: list[None] = []
    worker = InProcessWorker(2)
    worker.on_thread_limit = lambda: stops.append(None)
    try:
        monkeypatch.setattr(threading, START, _refuse_submit_threads)
        worker.submit("job-1")
        worker.submit("job-2")
    finally:
        monkeypatch.undo()
        worker.abandon()
    assert worker.thread_limit is not None
    said = str(worker.thread_limit)
    assert "ulimit -u" in said
    assert "WANBATCH_EMBEDDED_CONCURRENCY" in said
    assert "threads in this process" in said
    assert worker.thread_limit.exit_code == 2
    assert stops == [None]  # once


def test_a_pool_shut_down_is_no_thread_limit() -> None:
    worker = InProcessWorker(1)
    worker.close()  # its pools shut down, as a stop leaves them
    worker.submit("job-1")
    assert worker.thread_limit is None


def test_a_command_that_cannot_start_a_thread_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def action() -> int:
        raise RuntimeError(CANT_START_THREAD)

    with pytest.raises(SystemExit) as ended:
        guarded(False, action)
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert "cannot start another thread" in err
    assert "ulimit -u" in err
    assert "internal error" not in err
