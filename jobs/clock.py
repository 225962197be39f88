"""The one clock wanbatch stamps and compares time with: the database's.

Every lease, retry, poll, heartbeat and deadline is written by one process and judged by others:
on a shared PostgreSQL database those may run on hosts whose clocks disagree, and a host 2 minutes
ahead saw another host's live leases as lapsed and took its submits over (paid twice). So every
process reads time on the database's timeline: :func:`utcnow` is this process's steady clock
(``CLOCK_BOOTTIME``, which also counts a suspend; else ``time.monotonic``) from an anchor taken
by asking PostgreSQL's ``clock_timestamp()`` (:func:`jobs.db.measure_clock`, the midpoint of the
round trip, :func:`take`). An engine measures on the first connection it hands out and again
every :data:`REMEASURE_SECONDS` (:func:`jobs.db.watch_clock`), so a step of this host's wall
clock (NTP correcting it, a VM resumed with a stale one) changes nothing.

SQLite has no server: the database is on this host, and so is every process sharing it; its
timeline is this host's wall clock (:data:`host_time`, as before anything is measured). A
backward step of that clock leaves the waits stamped before it too far ahead: the tick brings
them forward, once however many processes share the file, against a high-water mark kept in the
database (:func:`worker.steps.tick.catch_up_with_clock_step`). A backward step of a PostgreSQL
server's clock is left alone: waits stamped before it wait it out.

One process holds one measurement: a program that opens two PostgreSQL servers reads the clock of
the one measured last.

Hot paths call :func:`utcnow` many times per job: it reads one clock and does no I/O.

Times fal compares with its own clock (a webhook's signed timestamp) stay on this host's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

log = logging.getLogger(__name__)

#: This host's wall clock, in epoch seconds (tests shift it to play a skewed or stepped host).
host_time: Callable[[], float] = time.time


def _steady_source() -> Callable[[], float]:
    """A clock no wall-clock step moves: ``CLOCK_BOOTTIME`` where there is one (Linux; it goes
    on counting while the machine sleeps, ``CLOCK_MONOTONIC`` stops), else ``time.monotonic``."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return time.monotonic
    try:
        time.clock_gettime(boottime)
    except OSError:
        return time.monotonic
    return lambda: time.clock_gettime(boottime)


#: This process's steady clock (seconds, from an arbitrary origin).
steady: Callable[[], float] = _steady_source()

#: How often (s) an engine asks the database's clock again (at most; on a connection handed out).
REMEASURE_SECONDS = 30.0
#: A sample whose round trip took longer (s) is not taken once a good one is there: its midpoint
#: could be off by half of it.
MAX_ROUND_TRIP_SECONDS = 0.5
#: A measurement older than this (s) gives way to any new one, however slow its round trip.
STALE_SECONDS = 300.0
#: Past this difference (s) between this host's clock and the database's, it is said once (and
#: by ``doctor``).
SKEW_WARN_SECONDS = 5.0


class _Anchor(NamedTuple):
    #: The database's time at the moment measured (epoch seconds).
    database: float
    #: :data:`steady` at that moment.
    steady: float
    #: The database's clock minus this host's, then (s).
    offset: float
    #: The measurement's round trip (s).
    round_trip: float


#: The last measurement taken (None: none, this host's clock is the timeline).
_anchor: _Anchor | None = None
#: :data:`steady` when a measurement was last tried (one at a time is enough).
_tried_at: float | None = None
#: Whether the skew was said already (once per process).
_said = False
#: A backward step of SQLite's timeline smaller than this (s) is not one (a slew, a slow tick).
STEP_SECONDS = 2.0
#: How far (s) SQLite's timeline may run past its high-water mark (``clock_marks``) before a tick
#: raises it. Raised at every tick, the mark cost a write transaction a second (a WAL sync)
#: while a run only waited at fal; raised this rarely, it costs one every 10 s, and a step back
#: is measured at most this much short (the waits it moves are due that much late, never early).
#: A step back of more than ``STEP_SECONDS`` + this is always caught up; one between the two is
#: caught up when the mark happens to be fresh, as a step within a tick interval of the mark
#: (up to 8 s between two idle ticks) never was.
MARK_SLACK_SECONDS = 10.0


def utcnow() -> datetime:
    """The current time, aware and in UTC, on the database's clock: the only clock the schema uses."""
    anchor = _anchor
    if anchor is None:
        return datetime.fromtimestamp(host_time(), UTC)
    return datetime.fromtimestamp(anchor.database + (steady() - anchor.steady), UTC)


def naive_utc(moment: datetime) -> datetime:
    """``moment`` in UTC without a zone: one instant compares equal to itself whether a database
    handed it back aware (PostgreSQL) or naive in UTC (SQLite)."""
    return moment if moment.tzinfo is None else moment.astimezone(UTC).replace(tzinfo=None)


def offset() -> float | None:
    """The database's clock minus this host's (s) as last measured; None when not measured."""
    anchor = _anchor
    return None if anchor is None else anchor.offset


def reset() -> None:
    """Forget every measurement: this host's clock is the timeline again (tests, a new database)."""
    global _anchor, _tried_at, _said
    _anchor = None
    _tried_at = None
    _said = False


def said_elsewhere() -> None:
    """This process says the skew its own way (``doctor``'s ``clock`` check): no warning line."""
    global _said
    _said = True


def take(database: float, *, before: float, after: float, wall: float, say: bool = True) -> bool:
    """Take a sample: the database said ``database`` (epoch seconds) between :data:`steady`
    ``before`` and ``after``, this host's clock saying ``wall`` at their midpoint. A slow round
    trip is not taken when a good sample is there; whether it was."""
    global _anchor
    round_trip = max(0.0, after - before)
    current = _anchor
    if (
        current is not None
        and round_trip > MAX_ROUND_TRIP_SECONDS
        and round_trip > current.round_trip
        and before - current.steady < STALE_SECONDS
    ):
        return False
    _anchor = _Anchor(database, (before + after) / 2, database - wall, round_trip)
    if say:
        _say_skew(database - wall)
    return True


def due_for_measurement() -> bool:
    """Whether a connection handed out now should ask the database's clock (never asked yet, or
    not for :data:`REMEASURE_SECONDS`); marks it asked, so that one connection does."""
    global _tried_at
    moment = steady()
    last = _tried_at
    if _anchor is not None and last is not None and moment - last < REMEASURE_SECONDS:
        return False
    _tried_at = moment
    return True


def skew_text(seconds: float) -> str:
    """``"this host's clock is 2m00s ahead of the database's"`` for an offset (database minus host)."""
    side = "behind" if seconds > 0 else "ahead of"
    return f"this host's clock is {span(abs(seconds))} {side} the database's"


def span(seconds: float) -> str:
    """``"7s"``, ``"2m00s"``, ``"1h00m"``, ``"2d3h"``: a clock difference, rounded to the second."""
    total = max(0, math.floor(seconds + 0.5))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _say_skew(seconds: float) -> None:
    """Say once per process that this host's clock is off by more than :data:`SKEW_WARN_SECONDS`."""
    global _said
    if _said or abs(seconds) <= SKEW_WARN_SECONDS:
        return
    _said = True
    log.warning("%s; wanbatch uses the database's", skew_text(seconds), extra={"event": "clock.skew"})
