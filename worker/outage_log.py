"""Saying, within bounds, that something this process needs cannot be reached.

An outage (the broker, the limiter's Redis, fal) fails every round, job and retry while it
lasts: one warning each would drown the log. :class:`OutageLog` keeps what it takes to say it
within bounds — when the outage began, when it was last said, how often it may be said again —
and tells its caller when to speak: the first failure at once, then at most every ``every``
seconds while failures go on, and its end once. The words, their level and their ``event``
stay the caller's (each has its own logger and its own remedy).

A hold that every round finds again (dispatch holding submits back for fal's queue or the
download backlog) is such a state too: :class:`HoldLog` says it with the same bounds.
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

    def failed(self, *, news: bool = False) -> Failure:
        """A failure: begins an outage when none is under way; whether to say it now.

        ``news``: the caller has something new to say of it (a hold's figures changed
        materially: :class:`HoldLog`), so it is said now whenever the last line was."""
        now = self.clock()
        with self._lock:
            began = self.since is None
            if self.since is None:
                self.since = now
            due = news or self._said_at is None or now - self._said_at >= self.every
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


#: The shortest time between two lines of one hold (:class:`HoldLog`) whose figures did not change.
HOLD_SAID_EVERY_SECONDS = 60.0
#: How much a hold's figure must change, as a factor (either way), to be said at once
#: (:class:`HoldLog`): a tier raised from 2 to 10 at fal, not one request more or less.
MATERIAL_FACTOR = 2


@dataclass(frozen=True)
class Held:
    """What :meth:`HoldLog.holds` makes of one round that finds the hold."""

    #: Whether to say it now.
    due: bool
    #: Seconds since the hold began (0 for the round that began it).
    lasted: float

    @property
    def for_how_long(self) -> str:
        """``"; held back for 31s"`` to end its line with, once it has lasted a second; else ``""``."""
        return f"; held back for {self.lasted:.0f}s" if self.lasted >= 1 else ""


class HoldLog:
    """Says a hold that every dispatch round finds again within bounds: when it begins, when its
    ``figure`` (what the hold is sized by) changed by :data:`MATERIAL_FACTOR` or more since the
    line said last, and otherwise at most every ``every`` seconds while it lasts; its end once,
    and only when a line said it (a hold that came and went unsaid ends unsaid).

    An :class:`OutageLog` keeps the time (``new_outage_said_at_once=False``: a hold that flaps
    at the edge of its bound, a round on and a round off, is still said at most every ``every``
    seconds). One line per round was 57 a minute, 80,000 a day, for one unchanged state.
    """

    def __init__(
        self, every: float = HOLD_SAID_EVERY_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._lock = threading.Lock()
        self._outage = OutageLog(every, clock, new_outage_said_at_once=False)
        #: The figure of the last line said; None: no line said of the hold under way.
        self._said: int | None = None

    def holds(self, figure: int) -> Held:
        """A round found the hold, sized by ``figure``; whether to say it now."""
        with self._lock:
            said = self._said
            news = said is not None and _materially_apart(said, figure)
            failure = self._outage.failed(news=news)
            if failure.due:
                self._said = figure
            return Held(due=failure.due, lasted=failure.lasted)

    def ended(self) -> float | None:
        """A round found no hold: how long the one that ends lasted, for the line that says it
        is over; None when none was under way, or none of its lines was said."""
        with self._lock:
            lasted = self._outage.answered()
            said, self._said = self._said, None
        return lasted if said is not None else None

    def forget(self) -> None:
        """The rounds that find the hold stop here (another worker leads the tick now): nothing
        of it is kept, so that rounds here much later say what they find afresh. Kept, the next
        round (the lead back, hours on) said the end of a hold it stopped watching long before,
        "held back for 7200s", or went on with it as one hold."""
        with self._lock:
            old = self._outage
            self._outage = OutageLog(old.every, old.clock, new_outage_said_at_once=False)
            self._said = None


def _materially_apart(said: int, now: int) -> bool:
    """Whether ``now`` is :data:`MATERIAL_FACTOR` times ``said`` or more, or that much less."""
    low, high = sorted((said, now))
    return high >= MATERIAL_FACTOR * max(low, 1)
