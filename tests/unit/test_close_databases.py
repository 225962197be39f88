"""The exit's closing of the database connections where no thread can start.

Before: under a memory limit (``ulimit -v``) ``cli._close_databases`` started its closing thread
unguarded, and a finished ``export`` ended with ~90 lines of traceback and exit 1. The OS's
refusal is simulated where CPython meets it (:data:`tests.thread_start.START`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest

import cli
from jobs import db
from jobs.thread_limit import CANT_START_THREAD
from tests.thread_start import START


def _no_thread(_function: Callable[..., Any], *_args: Any, **_kwargs: Any) -> int:
    raise RuntimeError(CANT_START_THREAD)


def test_the_connections_are_closed_without_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[None] = []
    monkeypatch.setattr(db, "close_engines", lambda: closed.append(None))
    before = signal.getsignal(signal.SIGINT)
    try:
        monkeypatch.setattr(threading, START, _no_thread)
        cli._close_databases()
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGINT, before)
    assert closed == [None]  # closed here, and no RuntimeError
