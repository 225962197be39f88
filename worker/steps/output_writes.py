"""The local output files this process's download steps are writing right now, so that a run
that stops under control (Ctrl-C, the database's full disk, a database gone for too long) leaves
none of their temporary files behind.

A download streams into ``.<video>.v<version>-….part`` and its sidecar is written through
``.<video>.json.v<version>-….tmp`` (:func:`jobs.outputs.partial_tag`: the version of the job's
lease the attempt holds). Such a run used to end its process (``os._exit``: a download abandoned
on a worker thread would otherwise keep it alive) while they were being written: the files
stayed, until the next run swept them. Now :meth:`OutputWrites.stop` first tells every download
to stop at its next chunk (:meth:`OutputWrites.check`, called as the bytes stream in: the
download removes its own file on the way out), lets a step that has the whole video store it
and its sidecar, and after a short grace removes itself the files of an attempt still under way
(a stream that sends nothing any more): the attempt's own tag names them, never another's.

A video already renamed into place but without its sidecar yet is left: it is a paid video,
whole and checked, which the next run finds and keeps (:func:`worker.steps.download._downloaded_before`).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from jobs import outputs
from jobs.errors import StateConflict

#: How often :meth:`OutputWrites.stop` looks whether the downloads under way have ended.
_LOOK_SECONDS = 0.05


#: A ``wanbatch worker``'s warm shutdown as its prefork children see it (:func:`share_warm_shutdown`):
#: one byte of memory shared with them, 1 once the main process was asked to stop.
_warm_shutdown: mmap.mmap | None = None


def share_warm_shutdown() -> None:
    """In a ``wanbatch worker``'s main process, before Celery's pool forks its children: a fresh
    byte of memory they will share with it, for :func:`say_warm_shutdown` to set.

    A prefork child never hears of its worker's warm shutdown: Celery's children ignore SIGINT
    and SIGTERM goes to the main process alone, which closes the pool and waits for each child's
    running task (``celery/concurrency/prefork.py``: ``WORKER_SIGIGNORE``, ``TaskPool.on_stop``;
    https://docs.celeryq.dev/en/stable/userguide/workers.html#stopping-the-worker). Its runtime
    is its own, so the main process's :meth:`OutputWrites.end_waits` did not reach it: a try of
    its that had lost its lease waited up to ``WANBATCH_LEASE_SECONDS`` for the job's record, and
    the warm shutdown with it. An anonymous mapping is shared across ``fork``
    (https://docs.python.org/3/library/mmap.html: ``MAP_SHARED`` by default), and setting or
    reading one byte of it takes no lock: safe in a signal handler, never stuck on a child that
    died holding one."""
    global _warm_shutdown
    _warm_shutdown = mmap.mmap(-1, 1)


def say_warm_shutdown() -> None:
    """The worker was asked to stop: its prefork children's waits end at their next look
    (:meth:`OutputWrites.ended`). Safe from a signal handler; nothing without
    :func:`share_warm_shutdown` (a ``run``, a threads-pool worker's own runtime hears it directly)."""
    if _warm_shutdown is not None:
        _warm_shutdown[0] = 1


def _warm_shutdown_said() -> bool:
    """Whether this process's worker (its main process, for a prefork child) was asked to stop."""
    return _warm_shutdown is not None and _warm_shutdown[0] == 1


class RunStopped(StateConflict):
    """The run is stopping: a download under way ends at its next chunk, writing nothing more
    (a :class:`~jobs.errors.StateConflict`, as a lost lease: the step records nothing; the
    run gives the job back, or its lease runs out)."""


class Attempt:
    """The output files of one download attempt: where its video goes (and went), and the tag of
    its temporary files."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.videos: list[Path] = []

    def add(self, video: Path) -> None:
        """The attempt writes (or renamed its video) to ``video``: its temporary files are beside it."""
        if video not in self.videos:
            self.videos.append(video)


class OutputWrites:
    """The download attempts of this process under way, and whether its run is stopping."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        #: The process stops under control: a run's stop (:meth:`stop`), or a worker's warm
        #: shutdown (:meth:`end_waits`), which lets the downloads under way finish. A step that
        #: only waits for something it can do without ends its wait then (a try that lost its
        #: lease, waiting up to a lease for the job's record to tidy its second copy away: a warm
        #: shutdown waited for it, WANBATCH_LEASE_SECONDS, 120 s by default).
        self.ending = threading.Event()
        self._lock = threading.Lock()
        self._attempts: dict[int, Attempt] = {}
        self._ids = itertools.count()

    @contextlib.contextmanager
    def attempt(self, version: int) -> Iterator[Attempt]:
        """While a download step writes its outputs (its lease at ``version``)."""
        key = next(self._ids)
        attempt = Attempt(version)
        with self._lock:
            self._attempts[key] = attempt
        try:
            yield attempt
        finally:
            with self._lock:
                self._attempts.pop(key, None)

    def check(self, job_id: str) -> None:
        """:class:`RunStopped` once the run stops: a download under way ends at its next chunk."""
        if self.stopping.is_set():
            raise RunStopped(f"job {job_id}: the run stopped during its download")

    def under_way(self) -> int:
        """How many download attempts are writing outputs now."""
        with self._lock:
            return len(self._attempts)

    def end_waits(self) -> None:
        """The process stops, letting its downloads finish (a worker's warm shutdown): the steps
        that only wait end their waits (:attr:`ending`). Safe from a signal handler."""
        self.ending.set()

    def ended(self, within: float) -> bool:
        """Whether the process stops under control (:attr:`ending`), waiting up to ``within``
        seconds for it: for a step that only waits for something it can do without, looking
        again every ``within``. A prefork child also hears its worker's warm shutdown here (said
        by the main process: :func:`say_warm_shutdown`), at its next look."""
        if _warm_shutdown_said():
            self.ending.set()
        return self.ending.wait(within) or _warm_shutdown_said()

    def stop(self, grace: float) -> int:
        """The run stops: every download under way stops at its next chunk (removing its own
        temporary file); a step that has its whole video stores it meanwhile. Waits up to
        ``grace`` seconds for them to end, then removes the temporary files of those still under
        way (a stream that stalled). Returns how many files it removed itself."""
        self.stopping.set()
        self.ending.set()
        deadline = time.monotonic() + grace
        while self.under_way() and time.monotonic() < deadline:
            time.sleep(_LOOK_SECONDS)
        with self._lock:
            left = list(self._attempts.values())
        removed = 0
        for attempt in left:
            for video in list(attempt.videos):
                with contextlib.suppress(OSError):
                    removed += outputs.remove_attempt_partials(video, attempt.version)
        return removed
