"""Saying, within bounds, that something this process needs cannot be reached.

An outage (the broker, the limiter's Redis, fal) fails every round, job and retry while it
lasts: one warning each would drown the log. :class:`OutageLog` keeps what it takes to say it
within bounds — when the outage began, when it was last said, how often it may be said again —
and tells its caller when to speak: the first failure at once, then at most every ``every``
seconds while failures go on, and its end once. The words, their level and their ``event``
stay the caller's (each has its own logger and its own remedy).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    """What :meth:`OutageLog.failed` makes of one failure."""

    #: When (the log's clock) it was seen.
    at: float
    #: Whether it began the outage (none was under way).
    began: bool
    #: Whether it is to be said now (a warning): the first of an outage, or the first once
    #: ``every`` seconds have passed since the last one said.
    due: bool
    #: Seconds since the outage began (0 for the failure that began it).
    lasted: float

    @property
    def for_how_long(self) -> str:
        """``" for 31s"`` to put after what is down, once it has lasted a second; else ``""``."""
        return f" for {self.lasted:.0f}s" if self.lasted >= 1 else ""


class OutageLog:
    """When an outage began and when it was last said, so that it is said within bounds.

    Every failure is :meth:`failed`, every answer :meth:`answered`. ``clock`` (monotonic
    seconds) may be replaced, in tests too. Thread-safe: many threads fail at once.

    ``new_outage_said_at_once``: whether the first failure after an answer is said at once
    (True: an answer is proof the outage is over), or only once ``every`` seconds have passed
    since the last warning, whatever outage it was of (False: for a caller whose "answered" is
    only "nothing failed this time", so that something that comes and goes is still said at
    most every ``every`` seconds).
    """

    def __init__(
        self,
        every: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        new_outage_said_at_once: bool = True,
    ) -> None:
        self.every = every
        self.clock = clock
        self.new_outage_said_at_once = new_outage_said_at_once
        self._lock = threading.Lock()
        #: Since when (``clock``) nothing answered; None while it answers.
        self.since: float | None = None
        self._said_at: float | None = None

    @property
    def down(self) -> bool:
        """Whether an outage is under way (a failure, and no answer since)."""
        return self.since is not None

    def failed(self) -> Failure:
        """A failure: begins an outage when none is under way; whether to say it now."""
        now = self.clock()
        with self._lock:
            began = self.since is None
            if self.since is None:
                self.since = now
            due = self._said_at is None or now - self._said_at >= self.every
            if due:
                self._said_at = now
            return Failure(at=now, began=began, due=due, lasted=now - self.since)

    def answered(self) -> float | None:
        """An answer: ends the outage under way. How long it lasted, for the one line that
        says it is over; None when none was (or another thread's answer ended it first)."""
        if not self.down:  # the usual case: no lock
            return None
        with self._lock:
            since, self.since = self.since, None
            if since is None:
                return None
            if self.new_outage_said_at_once:
                self._said_at = None
        return self.clock() - since
