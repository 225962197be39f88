"""When a batch may send jobs: ``not_before``, ``deadline`` and a daily wall-clock ``window``.

A :class:`Schedule` is pure domain: it reads no clock (every question takes an aware ``now``, so
tests and the worker's injectable clock decide what time it is) and touches no database.

The window is wall-clock time in ``timezone`` (an IANA name), because "cheap hours from 22:00 to
06:00" is what a person means, whatever the UTC offset is that night. Each local day's window is
turned into two instants with :mod:`zoneinfo`:

- a wall-clock time that does not exist (spring forward skips it) becomes the next instant that
  does exist (the end of the gap), so a window starting in the gap opens when the clocks resume;
- a wall-clock time that happens twice (fall back) is its first occurrence.

So the night of a change is one hour shorter or longer in real time, as the clock on the wall
says. Windows whose instants touch (possible only across a change) count as one open period.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jobs.digits import foreign_digits
from jobs.printable import quoted

#: How many local days ahead a window is looked for (a zone may skip a whole day; none skips a week).
_SEARCH_DAYS = 8

#: ASCII digits only, as every number in a manifest: ``\d`` took ``٢٢:00-06:00`` as 22:00-06:00.
_WINDOW = re.compile(r"^\s*([0-9]{1,2}):([0-9]{2})\s*[-\u2013]\s*([0-9]{1,2}):([0-9]{2})\s*$")


def parse_window(text: str) -> tuple[time, time] | None:
    """``"22:00-06:00"`` → ``(time(22), time(6))``; an end before the start crosses midnight.

    ``24:00`` is the end of the day, as an end only (ISO 8601's): ``"22:00-24:00"`` is
    ``(time(22), time(0))``, until midnight, and ``"00:00-24:00"``, the whole day, is None: no
    window, sending at any time (the days' windows touch, DST or not).

    Raises :class:`ValueError` with a message fit for a user when the text is not two ``HH:MM``
    times, a time is not a time of day, or the window is empty (start equals end).
    """
    match = _WINDOW.match(text)
    if match is None:
        digits = "; write times with the ASCII digits 0-9" if foreign_digits(text) else ""
        raise ValueError(f"window {quoted(text)} is not two times HH:MM-HH:MM (such as 22:00-06:00){digits}")
    hours_a, minutes_a, hours_b, minutes_b = (int(g) for g in match.groups())
    if (hours_a, minutes_a) == (24, 0):
        raise ValueError(
            f"window {quoted(text)}: 24:00 is the end of a day, so only a window's end; a window from "
            "midnight starts at 00:00"
        )
    end_of_day = (hours_b, minutes_b) == (24, 0)
    for hours, minutes in ((hours_a, minutes_a), (hours_b, minutes_b)):
        if (hours > 23 or minutes > 59) and not (end_of_day and (hours, minutes) == (24, 0)):
            raise ValueError(
                f"window {quoted(text)}: {hours:02d}:{minutes:02d} is not a time of day (00:00 to 23:59, "
                "or 24:00 as the end of the day)"
            )
    start, end = time(hours_a, minutes_a), time(0 if end_of_day else hours_b, minutes_b)
    if end_of_day and start == end:
        return None  # 00:00-24:00: the whole day, every day
    if start == end:
        raise ValueError(
            f"window {quoted(text)} is empty: it starts and ends at the same time "
            "(a window covers start up to end, crossing midnight when end is earlier); "
            "to send at any time of day leave `window` out, or write 00:00-24:00"
        )
    return start, end


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; :class:`ValueError` when there is none by that name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {quoted(name)}") from None


def format_duration(seconds: float) -> str:
    """A short human duration, two units at most: ``"20s"``, ``"1m57s"``, ``"45m"``, ``"3h12m"``,
    ``"5h"``, ``"24h40m"``, ``"2d4h"``.

    Never early: what is not shown is rounded up into the smallest unit shown (seconds up to an
    hour, minutes up to two days, hours from then on), so something due in half a second is
    "1s", never "0s", and 1m57s is "1m57s", never "1m". A zero smallest unit is left out
    ("45m", "5h"). Hours up to two days (``"24h40m"``, not ``"1d"``: "in 1d" said of 24h40m was
    40 minutes early).
    """
    total = max(0, math.ceil(seconds))
    if total < 3600:
        minutes, secs = divmod(total, 60)
        if not minutes:
            return f"{secs}s"
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    in_minutes = -(-total // 60)
    if in_minutes < 48 * 60:
        hours, minutes = divmod(in_minutes, 60)
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    days, hours = divmod(-(-total // 3600), 24)
    return f"{days}d{hours}h" if hours else f"{days}d"


def format_age(seconds: float) -> str:
    """How long ago something was, or how long it has lasted: ``"20s"``, ``"3m"``, ``"3h05m"``,
    ``"2d3h"`` (``last seen 3m ago``, ``created 3h05m ago``, ``open for 45s``): the largest unit
    and the next, what is below dropped — an age is "at least", not a countdown (that is
    :func:`format_duration`, never early). Seconds round up, so an age never reads "0s"."""
    total = max(0, math.ceil(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def eta_text(seconds: float | None) -> str:
    """A forecast's time left as ``status``, ``run``'s progress line and the dashboard write it:
    ``~3m20s left``, ``~3h01m left``; empty when there is no forecast (None, or nothing left).
    The dashboard wrote its own ("3 min 20 s"), so the page and ``status`` read differently
    for the same batch at the same instant."""
    if seconds is None or seconds <= 0:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"~{hours}h{minutes:02d}m left" if hours else f"~{minutes}m{secs:02d}s left"


def _resolve(day: date, wall: time, tz: tzinfo) -> datetime:
    """The instant (UTC) the wall clock in ``tz`` shows ``wall`` on ``day``.

    Ambiguous (fall back): the first occurrence (``fold=0``). Nonexistent (spring forward): the
    first instant whose wall time is at or after ``wall``, which is the end of the gap.
    """
    naive = datetime.combine(day, wall)
    first = naive.replace(tzinfo=tz).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == naive:
        return first
    # In a gap: fold=1 maps with the offset after the change (earlier in UTC), fold=0 with the one
    # before (later); the gap's end lies between. Transitions fall on whole seconds, so a binary
    # search over POSIX seconds keeps "wall(lo) < wall <= wall(hi)" down to one second.
    lo = int(naive.replace(tzinfo=tz, fold=1).timestamp())
    hi = math.ceil(first.timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def _offset(delta: timedelta) -> str:
    """``+01:00`` (seconds too, for the odd historical offset that has them)."""
    sign = "-" if delta < timedelta() else "+"
    hours, rest = divmod(abs(int(delta.total_seconds())), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{sign}{hours:02d}:{minutes:02d}" + (f":{seconds:02d}" if seconds else "")


def _require_aware(value: datetime, what: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got the naive {value.isoformat()}")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _instant_or_none(value: object) -> datetime | None:
    # Stored schedules are read back as stored, even one an older version let through out of
    # range: a batch must never make `status` unreadable (its arithmetic copes, see _window_from).
    return None if value is None else parse_instant(value, bounded=False)


#: The instants a schedule may name: far enough apart for any real plan, and far enough inside
#: what ``datetime`` can hold (years 1 to 9999) that the window arithmetic — days before and
#: after an instant, in any time zone — never leaves it.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(3000, 1, 1, tzinfo=UTC)


#: ``…T24:00``, ``…T24:00:00``, ``…T24:00:00.000``: ISO 8601's end of a day (the next day's 00:00),
#: which ``datetime.fromisoformat`` refuses before Python 3.12's (hour must be in 0..23).
_END_OF_DAY = re.compile(r"^([0-9]{4}-[0-9]{2}-[0-9]{2})([T ])24:00(?::00(?:[.,]0+)?)?(?=$|[Z+-])")


def _from_iso(written: str) -> datetime:
    """``datetime.fromisoformat`` of ``written`` (upper-cased: YAML allows a lowercase t/z),
    ``24:00`` read as the end of its day; :class:`ValueError` when it is no ISO 8601 timestamp."""
    text = written.upper()
    end_of_day = _END_OF_DAY.match(text)
    if end_of_day is None:
        return datetime.fromisoformat(text)
    day, separator = end_of_day.groups()
    midnight = datetime.fromisoformat(f"{day}{separator}00:00{text[end_of_day.end() :]}")
    return midnight + timedelta(days=1)  # wall-clock arithmetic: the same offset, the next day


def _kind(value: object) -> str:
    """A wrong value named as its writer knows it: the YAML loader's own classes (``LList``,
    ``LMap``) mean nothing to them."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, bool):
        return f"true/false (a boolean) {value}"
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {quoted(value)}"


def parse_instant(value: object, *, bounded: bool = True, timezone: str | None = None) -> datetime:
    """An ISO 8601 timestamp with an offset or ``Z`` → an aware datetime in UTC.

    ``value`` is text (as written, or as stored by :meth:`Schedule.as_json`) or a datetime (some
    YAML loaders build one). ``24:00`` is the end of the day (ISO 8601): the next day's 00:00.
    A time without an offset is refused: it names a different instant in every time zone, and
    guessing the machine's zone would move a deadline by hours; ``timezone`` (the schedule's,
    when it is a zone) makes the refusal say which offset that local time has there.
    ``bounded``: refuse an instant before :data:`EARLIEST` or from :data:`LATEST` on.
    Raises :class:`ValueError` with a message fit for a user.
    """
    if isinstance(value, datetime):
        parsed = value
        written = value.isoformat()
    elif isinstance(value, date):
        raise ValueError(f"{value.isoformat()} is a date without a time of day and UTC offset")
    elif isinstance(value, str):
        written = value.strip()
        try:
            parsed = _from_iso(written)
        except ValueError:
            raise ValueError(f"{quoted(value)} is not an ISO 8601 timestamp") from None
    else:
        raise ValueError(f"expected an ISO 8601 timestamp, got {_kind(value)}")
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        advice = _offset_advice(written, parsed, timezone)
        if advice is None:
            advice = " (local time in which zone?); add one such as +01:00, or Z for UTC"
        raise ValueError(f"{quoted(written)} has no UTC offset, so the instant is ambiguous{advice}")
    years = f"a time from {EARLIEST.year} up to {LATEST.year} is allowed"
    out_of_range = f"{quoted(written)} is out of range: {years}"
    try:
        instant = parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 is before the first instant datetime holds
        raise ValueError(out_of_range) from None
    if bounded and not EARLIEST <= instant < LATEST:
        raise ValueError(out_of_range)
    return instant


def _offset_advice(written: str, naive: datetime, timezone: str | None) -> str | None:
    """Which offset the local time ``naive`` has in ``timezone``, as the advice that ends
    :func:`parse_instant`'s refusal of a time without one: ``"; in Europe/Berlin on 2027-12-02
    06:00 that is +01:00: write 2027-12-02T06:00:00+01:00"``; the local time the clocks skip
    that night (spring forward) or show twice (fall back) said so. None without a zone (or out
    of the years a zone's arithmetic holds)."""
    if timezone is None:
        return None
    try:
        tz = zone(timezone)
        first = naive.replace(tzinfo=tz, fold=0)
        second = naive.replace(tzinfo=tz, fold=1)
        before, after = first.utcoffset(), second.utcoffset()
        exists = first.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == naive
        gap_end = None if exists else _resolve(naive.date(), naive.time(), tz).astimezone(tz)
    except (ValueError, OverflowError):
        return None
    if before is None or after is None:  # pragma: no cover - a zone always has an offset
        return None
    local = f"{naive:%Y-%m-%d %H:%M}" + (f":{naive:%S}" if naive.second else "")
    if gap_end is not None:
        skipped_from = (gap_end - (after - before)).replace(tzinfo=None)
        resumed = gap_end.replace(tzinfo=None)
        return (
            f"; in {timezone} {local} does not exist (that night the clocks go from "
            f"{skipped_from:%H:%M} {_offset(before)} straight to {gap_end:%H:%M} {_offset(after)}): "
            f"write a time outside that gap, such as {resumed.isoformat()}{_offset(after)}"
        )
    if before != after:
        return (
            f"; in {timezone} {local} happens twice (that night the clocks show it first at "
            f"{_offset(before)}, then again at {_offset(after)}): write {written}{_offset(before)} or "
            f"{written}{_offset(after)}"
        )
    return f"; in {timezone} on {local} that is {_offset(before)}: write {written}{_offset(before)}"


@dataclass(frozen=True)
class Schedule:
    """When sending is allowed: ``not_before <= now < deadline``, and inside the daily window.

    Every field is optional; the empty schedule is always open. Instants are stored in UTC (the
    offset a user wrote is not kept: ``timezone`` says how to show them).
    """

    not_before: datetime | None = None
    deadline: datetime | None = None
    window: tuple[time, time] | None = None
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        # Refused here, not later: a naive instant cannot be compared, an empty window would
        # never open, an unknown zone would fail at the first question.
        for name in ("not_before", "deadline"):
            value = getattr(self, name)
            if value is not None:
                _require_aware(value, name)
                object.__setattr__(self, name, value.astimezone(UTC))
        if self.window is not None:
            start, end = self.window
            if start == end:
                raise ValueError("the window is empty: start equals end")
            object.__setattr__(self, "window", (start, end))
        zone(self.timezone)

    @property
    def tz(self) -> ZoneInfo:
        """The zone of ``window`` and of the times :meth:`describe` shows."""
        return ZoneInfo(self.timezone)

    def is_empty(self) -> bool:
        """No constraint at all (the time zone alone constrains nothing)."""
        return self.not_before is None and self.deadline is None and self.window is None

    def is_open(self, now: datetime) -> bool:
        """Whether a job may be sent at ``now``."""
        return self.next_open(now) == now

    def past_deadline(self, now: datetime) -> bool:
        """Whether the deadline has come: nothing is sent any more, ever."""
        _require_aware(now, "now")
        return self.deadline is not None and now >= self.deadline

    def next_open(self, now: datetime) -> datetime | None:
        """The first instant at or after ``now`` when sending is allowed (``now`` itself when open).

        None when it never opens again: the deadline has passed, or comes before the next window
        (or before ``not_before``).
        """
        if self.past_deadline(now):
            return None
        at = now if self.not_before is None or now >= self.not_before else self.not_before
        if self.window is not None:
            span = self._window_from(at)
            if span is None:  # pragma: no cover - every valid window opens within _SEARCH_DAYS
                return None
            at = span[0]
        if self.deadline is not None and at >= self.deadline:
            return None
        return at

    def why_never_opens(self, now: datetime) -> str | None:
        """Why the deadline comes before the schedule next opens (after ``not_before``, in the
        window), in words for a user; None when it opens in time, has no deadline, or the deadline
        has passed already (:meth:`past_deadline`, said by its callers in their own words).

        ``"deadline 2026-12-03T06:00+01:00 passes before the window 22:00-23:00 (Europe/Berlin)
        next opens, at 2026-12-03T22:00+01:00"``; a local day whose window the clocks skip
        (spring forward) is named, as that is where a user expected it to open.
        """
        if self.deadline is None or self.past_deadline(now) or self.next_open(now) is not None:
            return None
        deadline = self._iso(self.deadline)
        start = now if self.not_before is None or now >= self.not_before else self.not_before
        after = "first opens after not_before" if start != now else "next opens"
        if self.window is None:  # only not_before at or after the deadline gets here
            return f"deadline {deadline} is not after not_before {self._iso(start)}"
        window = f"the window {self._window_text()} ({self.timezone})"
        opens = replace(self, deadline=None).next_open(now)  # the same window arithmetic, uncut
        if opens is None:  # pragma: no cover - only an instant at the edge of datetime's years
            return f"deadline {deadline} comes and {window} never opens"
        skipped = [day.isoformat() for day in self._skipped_days(start, self.deadline)]
        gap = f" ({self._window_text()} does not exist on {', '.join(skipped)}: the clocks skip it)"
        return f"deadline {deadline} passes before {window} {after}, at {self._iso(opens)}" + (
            gap if skipped else ""
        )

    def over(self, now: datetime) -> str | None:
        """Why nothing will ever be sent again from ``now`` on, in words ("its deadline
        2026-12-02 06:00 +01:00 has passed", "nothing opens before its deadline …"); None while
        the schedule may still open."""
        if self.deadline is None or self.next_open(now) is not None:
            return None
        if self.past_deadline(now):
            return f"its deadline {self.stamp(self.deadline)} has passed"
        return f"nothing opens before its deadline {self.stamp(self.deadline)}"

    def closes_at(self, now: datetime) -> datetime | None:
        """While open: when sending must stop, the window's end or the deadline, whichever is first.

        None when the open period never ends (no window, no deadline). When not open, ``now``:
        sending must stop already, so a caller computing "seconds left" gets 0.
        """
        if not self.is_open(now):
            return now
        ends: list[datetime] = []
        if self.deadline is not None:
            ends.append(self.deadline)
        if self.window is not None:
            span = self._window_from(now)
            if span is not None:
                ends.append(span[1])
        return min(ends) if ends else None

    def describe(self, now: datetime) -> str:
        """The state in words, as ``status`` shows it; ``""`` for the empty schedule."""
        if self.is_empty():
            return ""
        if self.past_deadline(now):
            return "past deadline"
        if self.is_open(now):
            close = self.closes_at(now)
            if close is None:
                return "open"
            left = format_duration((close - now).total_seconds())
            if self.deadline is not None and close == self.deadline:
                return f"open until the deadline {self.stamp(close)} (in {left})"
            return f"open until {self._clock(close)} (in {left})"
        opening = self._opening(now)
        if opening is None and self.deadline is None:  # only an instant out of range gets here
            return "closed: its window never opens"
        if opening is None:
            assert self.deadline is not None
            return f"closed: nothing opens before the deadline {self.stamp(self.deadline)}"
        until, when = opening
        return f"waiting until {when}" if until else f"waiting for window ({when})"

    def waits(self, now: datetime) -> str:
        """While closed and due to open again, until when, in :meth:`describe`'s words about
        something that waits for it: ``"waits for its window (opens 22:00 Europe/Berlin, in
        23h57m)"``, ``"waits until 2026-12-05 22:00 +01:00 (in 5h)"`` for a ``not_before``
        ahead; ``""`` when open, empty, or never opening again (its deadline)."""
        if self.is_empty() or self.past_deadline(now) or self.is_open(now):
            return ""
        opening = self._opening(now)
        if opening is None:
            return ""
        until, when = opening
        return f"waits until {when}" if until else f"waits for its window ({when})"

    def _opening(self, now: datetime) -> tuple[bool, str] | None:
        """When a closed schedule next opens, in words: ``(True, "2026-12-05 22:00 +01:00 (in
        5h)")`` when ``not_before`` is what it waits for, else ``(False, "opens 22:00
        Europe/Berlin, in 23h57m")`` (its window); None when it never opens again."""
        opens = self.next_open(now)
        if opens is None:
            return None
        left = format_duration((opens - now).total_seconds())
        if self.not_before is not None and opens == self.not_before:
            return True, f"{self.stamp(opens)} (in {left})"
        return False, f"opens {self._clock(opens)}, in {left}"

    def as_json(self) -> dict[str, Any]:
        """The stored form (a batch's ``schedule`` column): ISO instants, ``"22:00-06:00"``."""
        return {
            "not_before": _iso(self.not_before),
            "deadline": _iso(self.deadline),
            "window": None if self.window is None else self._window_text(),
            "timezone": self.timezone,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Schedule:
        """The inverse of :meth:`as_json`; None or ``{}`` is the empty schedule."""
        if not data:
            return cls()
        window = data.get("window")
        return cls(
            not_before=_instant_or_none(data.get("not_before")),
            deadline=_instant_or_none(data.get("deadline")),
            window=None if window is None else parse_window(str(window)),
            timezone=str(data.get("timezone") or "UTC"),
        )

    # -- window arithmetic ----------------------------------------------------------------------

    def _occurrences(self, first_day: date) -> Iterator[tuple[datetime, datetime]]:
        """Each local day's window as instants, from ``first_day`` on; empty ones (a window
        entirely inside a spring-forward gap) left out, touching ones merged."""
        assert self.window is not None
        start, end = self.window
        tz = self.tz
        merged: tuple[datetime, datetime] | None = None
        for offset in range(_SEARCH_DAYS + 2):
            day = first_day + timedelta(days=offset)
            opens = _resolve(day, start, tz)
            closes = _resolve(day + timedelta(days=1) if end < start else day, end, tz)
            if closes <= opens:
                continue
            if merged is not None and opens <= merged[1]:
                merged = (merged[0], max(merged[1], closes))
                continue
            if merged is not None:
                yield merged
            merged = (opens, closes)
        if merged is not None:
            yield merged

    def _window_from(self, at: datetime) -> tuple[datetime, datetime] | None:
        """The first open window period ending after ``at``, its start clipped to ``at``."""
        # The window that started the local day before may still be open (crossing midnight).
        try:
            first_day = at.astimezone(self.tz).date() - timedelta(days=1)
            for opens, closes in self._occurrences(first_day):
                if closes > at:
                    return max(opens, at), closes
        except OverflowError:  # an instant at the edge of datetime's years (stored before the
            return None  # bounds of parse_instant): no window there
        return None  # pragma: no cover - see _SEARCH_DAYS

    def _skipped_days(self, start: datetime, end: datetime) -> list[date]:
        """The local days whose window, by the wall clock, starts from ``start`` up to ``end`` but
        lies entirely in a gap of the clocks (spring forward), so that it never opens that day
        (see :meth:`_occurrences`)."""
        assert self.window is not None
        opens_at, closes_at = self.window
        tz = self.tz
        first, last = (t.astimezone(tz).replace(tzinfo=None) for t in (start, end))
        day = first.date()
        skipped = []
        while datetime.combine(day, opens_at) < last:
            closing_day = day + timedelta(days=1) if closes_at < opens_at else day
            nominal = datetime.combine(day, opens_at) >= first
            if nominal and _resolve(closing_day, closes_at, tz) <= _resolve(day, opens_at, tz):
                skipped.append(day)
            day += timedelta(days=1)
        return skipped

    def _window_text(self) -> str:
        """``"22:00-06:00"``, as written in a manifest and stored."""
        assert self.window is not None
        return "-".join(t.strftime("%H:%M") for t in self.window)

    def _iso(self, instant: datetime) -> str:
        """``"2026-12-03T22:00+01:00"``: ISO 8601 in the schedule's zone, seconds only when set."""
        local = instant.astimezone(self.tz)
        return local.isoformat(timespec="auto" if local.second or local.microsecond else "minutes")

    def _clock(self, instant: datetime) -> str:
        """``"22:00 Europe/Berlin"``: the wall-clock time in the schedule's zone."""
        return f"{instant.astimezone(self.tz):%H:%M} {self.timezone}"

    def stamp(self, instant: datetime) -> str:
        """``"2026-12-01 22:00 +01:00"``: the date and time in the schedule's zone, with its offset."""
        local = instant.astimezone(self.tz)
        clock = f"{local:%H:%M:%S}" if local.second else f"{local:%H:%M}"
        return f"{local:%Y-%m-%d} {clock} {_offset(local.utcoffset() or timedelta())}"
