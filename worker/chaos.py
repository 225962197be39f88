"""Crash points: let the chaos suite kill (or freeze) a worker at one exact step of a job.

``kill -9`` from outside lands wherever the process happens to be, which with fast steps is
almost always "idle, waiting for a message". The interesting windows are a few microseconds
wide — between the POST and the commit of its request id, between writing a file and
recording it — so the steps call :func:`crash_point` at those windows and the chaos suite
(``tests/chaos/``) turns them on per worker process:

* ``WANBATCH_CHAOS_CRASH_POINTS="before_post:0.1,after_post:0.2,mid_download:0.1"``: at each
  hit of a named point, with that probability, the process ends at once with
  ``os._exit(137)`` — what ``kill -9`` looks like (no ``finally``, no atexit, no flush, no
  Celery ack). 137 is the exit status a shell reports for SIGKILL.
* ``WANBATCH_CHAOS_STOP_POINTS="after_post:0.05"``: the process stops *itself* with
  ``SIGSTOP`` (a VM pause, a GC pause, a laptop lid) and runs on only when someone sends
  ``SIGCONT``; the suite's supervisor does so after the job's lease has expired, so the
  resumed worker is a zombie whose late writes must be fenced off.

Points used by :mod:`worker.steps`: ``before_post`` (lease taken, input recorded, POST not yet
sent), ``after_post`` (fal accepted, request id not yet committed), ``after_commit`` (request
id committed, task not yet acknowledged), ``mid_download`` (response headers of the video
received, temporary file created, body not yet read) and ``after_download`` (file renamed into
place, job not yet ``succeeded``).

With neither variable set (production) the plan is empty after the first call and each
:func:`crash_point` costs one global lookup and a falsy test.
"""

from __future__ import annotations

import os
import random
import signal
import threading

from jobs.chaos_points import POINTS, parse_points
from jobs.settings import ChaosSettings

__all__ = ["CRASH_EXIT_CODE", "POINTS", "crash_point", "parse_points"]

#: The exit status of a crash point: what a shell shows for a process killed by SIGKILL.
CRASH_EXIT_CODE = 137

_crash: dict[str, float] | None = None
_stop: dict[str, float] = {}
_lock = threading.Lock()
_rng = random.Random()


def _load() -> dict[str, float]:
    global _crash, _stop
    with _lock:
        if _crash is None:
            settings = ChaosSettings()  # its own section: a test-only knob of this process
            _stop = parse_points(settings.chaos_stop_points)
            _crash = parse_points(settings.chaos_crash_points)
        return _crash


def crash_point(name: str) -> None:
    """Die (or freeze) here with the configured probability; a no-op when chaos is off."""
    crash = _crash if _crash is not None else _load()
    if not crash and not _stop:
        return
    if _rng.random() < _stop.get(name, 0.0):
        os.kill(os.getpid(), signal.SIGSTOP)  # resumes here on SIGCONT
    if _rng.random() < crash.get(name, 0.0):
        os._exit(CRASH_EXIT_CODE)
