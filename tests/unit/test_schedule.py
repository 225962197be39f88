"""jobs.schedule: not_before, deadline and daily windows, with explicit instants (no clock, no sleep).

Europe/Berlin changes on 2026-03-29 (02:00 CET → 03:00 CEST, 01:00 UTC) and on 2026-10-25
(03:00 CEST → 02:00 CET, 01:00 UTC); both nights are checked.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta, timezone

import pytest

from jobs.schedule import Schedule, format_age, format_duration, parse_instant, parse_window

BERLIN = "Europe/Berlin"
PLUS_ONE = timezone(timedelta(hours=1))
PLUS_TWO = timezone(timedelta(hours=2))


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def berlin_window(text: str, **kw: object) -> Schedule:
    return Schedule(window=parse_window(text), timezone=BERLIN, **kw)  # type: ignore[arg-type]


# -- parse_window --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("22:00-06:00", (time(22), time(6))),
        ("09:30-17:00", (time(9, 30), time(17))),
        (" 7:05 - 8:00 ", (time(7, 5), time(8))),
        ("23:00\u201301:00", (time(23), time(1))),
        ("00:00-23:59", (time(0), time(23, 59))),
    ],
)
def test_parse_window_accepts_two_wall_clock_times(text: str, expected: tuple[time, time]) -> None:
    assert parse_window(text) == expected


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("22:00", "not two times HH:MM-HH:MM"),
        ("22-06", "not two times HH:MM-HH:MM"),
        ("10pm-6am", "not two times HH:MM-HH:MM"),
        ("", "not two times HH:MM-HH:MM"),
        ("24:00-06:00", "24:00 is the end of a day, so only a window's end"),
        ("00:00-24:01", "24:01 is not a time of day .00:00 to 23:59, or 24:00 as the end of the day."),
        ("22:00-06:60", "06:60 is not a time of day"),
        ("22:00-22:00", "is empty: it starts and ends at the same time"),
        ("22:00-22:00", "to send at any time of day leave `window` out, or write 00:00-24:00"),
        ("7:00-07:00", "is empty"),
    ],
)
def test_parse_window_refuses_with_a_clear_message(text: str, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        parse_window(text)


# -- parse_instant -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "2026-12-01T22:00:00+01:00",
        "2026-12-01T21:00:00Z",
        "2026-12-01t21:00:00z",
        " 2026-12-01 22:00 +01:00 ",
        "2026-12-01T16:00:00-05:00",
        datetime(2026, 12, 1, 22, tzinfo=PLUS_ONE),
    ],
)
def test_parse_instant_reads_text_and_aware_datetimes(value: object) -> None:
    parsed = parse_instant(value)
    assert parsed == datetime(2026, 12, 1, 21, tzinfo=UTC)
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("2026-12-01T22:00:00", "'2026-12-01T22:00:00' has no UTC offset, so the instant is ambiguous"),
        (datetime(2026, 12, 1, 22), "has no UTC offset"),
        (date(2026, 12, 1), "2026-12-01 is a date without a time of day"),
        ("next tuesday", "'next tuesday' is not an ISO 8601 timestamp"),
        (1764622800, "expected an ISO 8601 timestamp, got int"),
    ],
)
def test_parse_instant_refuses_naive_and_malformed_values(value: object, phrase: str) -> None:
    with pytest.raises(ValueError, match=re.escape(phrase)):
        parse_instant(value)


# -- construction --------------------------------------------------------------------------------


def test_instants_are_kept_in_utc() -> None:
    schedule = Schedule(not_before=datetime(2026, 12, 1, 22, tzinfo=PLUS_ONE))
    assert schedule.not_before == utc(2026, 12, 1, 21)
    assert schedule.not_before is not None
    assert schedule.not_before.tzinfo is UTC


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"not_before": datetime(2026, 12, 1, 22)}, "not_before must be timezone-aware"),
        ({"deadline": datetime(2026, 12, 1, 22)}, "deadline must be timezone-aware"),
        ({"timezone": "Europe/Berlim"}, "unknown time zone 'Europe/Berlim'"),
        ({"timezone": "../etc/passwd"}, "unknown time zone"),
        ({"window": (time(6), time(6))}, "the window is empty"),
    ],
)
def test_an_unusable_schedule_is_refused(kwargs: dict[str, object], phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        Schedule(**kwargs)  # type: ignore[arg-type]


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        Schedule(deadline=utc(2026, 1, 1)).is_open(datetime(2026, 1, 1))


def test_empty_schedule_is_always_open_and_says_nothing() -> None:
    schedule = Schedule()
    now = utc(2026, 12, 1, 12)
    assert schedule.is_empty()
    assert Schedule(timezone=BERLIN).is_empty()
    assert schedule.is_open(now)
    assert not schedule.past_deadline(now)
    assert schedule.next_open(now) == now
    assert schedule.closes_at(now) is None
    assert schedule.describe(now) == ""


# -- not_before and deadline ---------------------------------------------------------------------


def test_not_before_opens_at_exactly_that_instant() -> None:
    schedule = Schedule(not_before=datetime(2026, 12, 1, 22, tzinfo=PLUS_ONE))
    assert not schedule.is_empty()
    assert not schedule.is_open(utc(2026, 12, 1, 20, 59, 59))
    assert schedule.next_open(utc(2026, 12, 1, 16)) == utc(2026, 12, 1, 21)
    assert schedule.is_open(utc(2026, 12, 1, 21))
    assert schedule.is_open(utc(2027, 6, 1))
    assert schedule.closes_at(utc(2026, 12, 1, 21)) is None


def test_deadline_closes_at_exactly_that_instant_for_good() -> None:
    deadline = datetime(2026, 12, 2, 6, tzinfo=PLUS_ONE)
    schedule = Schedule(deadline=deadline)
    assert schedule.is_open(utc(2026, 12, 2, 4, 59, 59))
    assert not schedule.past_deadline(utc(2026, 12, 2, 4, 59, 59))
    assert schedule.closes_at(utc(2026, 12, 2, 1)) == utc(2026, 12, 2, 5)
    for now in (utc(2026, 12, 2, 5), utc(2026, 12, 2, 5, 0, 1), utc(2027, 1, 1)):
        assert schedule.past_deadline(now)
        assert not schedule.is_open(now)
        assert schedule.next_open(now) is None
        assert schedule.closes_at(now) == now  # closed: nothing left to send in
        assert schedule.describe(now) == "past deadline"


def test_not_before_at_or_after_the_deadline_never_opens() -> None:
    at = utc(2026, 12, 1, 21)
    schedule = Schedule(not_before=at, deadline=at)
    assert schedule.next_open(utc(2026, 12, 1, 12)) is None
    assert not schedule.is_open(at - timedelta(hours=1))
    assert schedule.describe(utc(2026, 12, 1, 12)) == (
        "closed: nothing opens before the deadline 2026-12-01 21:00 +00:00"
    )


# -- windows -------------------------------------------------------------------------------------


def test_window_crossing_midnight_in_utc() -> None:
    schedule = Schedule(window=parse_window("22:00-06:00"))
    assert not schedule.is_open(utc(2026, 12, 1, 21, 59, 59))
    assert schedule.is_open(utc(2026, 12, 1, 22))
    assert schedule.is_open(utc(2026, 12, 2, 0))
    assert schedule.is_open(utc(2026, 12, 2, 5, 59, 59))
    assert not schedule.is_open(utc(2026, 12, 2, 6))
    assert not schedule.is_open(utc(2026, 12, 2, 12))
    assert schedule.next_open(utc(2026, 12, 2, 6)) == utc(2026, 12, 2, 22)
    assert schedule.next_open(utc(2026, 12, 2, 3)) == utc(2026, 12, 2, 3)
    assert schedule.closes_at(utc(2026, 12, 1, 23)) == utc(2026, 12, 2, 6)
    assert schedule.closes_at(utc(2026, 12, 2, 3)) == utc(2026, 12, 2, 6)  # opened the day before


def test_window_within_a_day() -> None:
    schedule = Schedule(window=parse_window("09:00-17:00"))
    assert not schedule.is_open(utc(2026, 12, 1, 8, 59))
    assert schedule.is_open(utc(2026, 12, 1, 9))
    assert not schedule.is_open(utc(2026, 12, 1, 17))
    assert schedule.next_open(utc(2026, 12, 1, 17)) == utc(2026, 12, 2, 9)
    assert schedule.next_open(utc(2026, 12, 1, 3)) == utc(2026, 12, 1, 9)
    assert schedule.closes_at(utc(2026, 12, 1, 12)) == utc(2026, 12, 1, 17)


def test_window_is_local_wall_clock_time() -> None:
    schedule = berlin_window("22:00-06:00")
    # Winter: CET, UTC+1.
    assert schedule.next_open(utc(2026, 12, 1, 12)) == utc(2026, 12, 1, 21)
    assert schedule.closes_at(utc(2026, 12, 1, 21)) == utc(2026, 12, 2, 5)
    # Summer: CEST, UTC+2.
    assert schedule.next_open(utc(2026, 7, 1, 12)) == utc(2026, 7, 1, 20)
    assert schedule.closes_at(utc(2026, 7, 1, 20)) == utc(2026, 7, 2, 4)


def test_berlin_spring_forward_night_is_seven_hours() -> None:
    schedule = berlin_window("22:00-06:00")
    opens, closes = utc(2026, 3, 28, 21), utc(2026, 3, 29, 4)  # 22:00 CET, 06:00 CEST
    assert schedule.next_open(utc(2026, 3, 28, 12)) == opens
    assert not schedule.is_open(opens - timedelta(seconds=1))
    assert schedule.is_open(opens)
    assert schedule.is_open(utc(2026, 3, 29, 1))  # 03:00 CEST, just after the change
    assert schedule.closes_at(opens) == closes
    assert closes - opens == timedelta(hours=7)
    assert not schedule.is_open(closes)
    assert schedule.next_open(closes) == utc(2026, 3, 29, 20)  # 22:00 CEST


def test_berlin_fall_back_night_is_nine_hours() -> None:
    schedule = berlin_window("22:00-06:00")
    opens, closes = utc(2026, 10, 24, 20), utc(2026, 10, 25, 5)  # 22:00 CEST, 06:00 CET
    assert schedule.next_open(utc(2026, 10, 24, 12)) == opens
    assert schedule.is_open(utc(2026, 10, 25, 0, 30))  # 02:30 CEST
    assert schedule.is_open(utc(2026, 10, 25, 1, 30))  # 02:30 CET, the hour that repeats
    assert schedule.closes_at(opens) == closes
    assert closes - opens == timedelta(hours=9)
    assert not schedule.is_open(closes)
    assert schedule.next_open(closes) == utc(2026, 10, 25, 21)  # 22:00 CET


def test_a_window_starting_in_the_spring_gap_opens_when_the_clocks_resume() -> None:
    schedule = berlin_window("02:30-04:00")
    assert not schedule.is_open(utc(2026, 3, 29, 0, 59, 59))
    assert schedule.next_open(utc(2026, 3, 29, 0)) == utc(2026, 3, 29, 1)  # 03:00 CEST
    assert schedule.closes_at(utc(2026, 3, 29, 1)) == utc(2026, 3, 29, 2)  # 04:00 CEST
    assert schedule.describe(utc(2026, 3, 29, 0, 15)) == (
        "waiting for window (opens 03:00 Europe/Berlin, in 45m)"
    )
    # Other days: 02:30 exists.
    assert schedule.next_open(utc(2026, 3, 29, 3)) == utc(2026, 3, 30, 0, 30)


def test_a_window_ending_in_the_spring_gap_ends_when_the_clocks_resume() -> None:
    schedule = berlin_window("23:00-02:30")
    assert schedule.closes_at(utc(2026, 3, 28, 23)) == utc(2026, 3, 29, 1)  # 03:00 CEST
    assert schedule.is_open(utc(2026, 3, 29, 0, 59, 59))
    assert not schedule.is_open(utc(2026, 3, 29, 1))


def test_a_window_inside_the_spring_gap_does_not_open_that_day() -> None:
    schedule = berlin_window("02:10-02:50")
    assert not schedule.is_open(utc(2026, 3, 29, 1))
    assert schedule.next_open(utc(2026, 3, 28, 23)) == utc(2026, 3, 30, 0, 10)  # 02:10 CEST next day
    assert schedule.next_open(utc(2026, 3, 28, 0)) == utc(2026, 3, 28, 1, 10)  # 02:10 CET day before


def test_ambiguous_fall_back_times_are_their_first_occurrence() -> None:
    start_ambiguous = berlin_window("02:30-03:30")
    opens = utc(2026, 10, 25, 0, 30)  # the first 02:30 (CEST)
    assert start_ambiguous.next_open(utc(2026, 10, 24, 23)) == opens
    assert start_ambiguous.closes_at(opens) == utc(2026, 10, 25, 2, 30)  # 03:30 CET: two hours
    end_ambiguous = berlin_window("01:00-02:30")
    assert end_ambiguous.closes_at(utc(2026, 10, 24, 23)) == utc(2026, 10, 25, 0, 30)
    assert not end_ambiguous.is_open(utc(2026, 10, 25, 1))  # the second 02:00 (CET)


def test_windows_that_touch_across_a_change_are_one_open_period() -> None:
    # 03:00-02:30 daily: on the spring-forward night 02:30 is 03:00, so there is no gap.
    schedule = berlin_window("03:00-02:30")
    assert schedule.is_open(utc(2026, 3, 29, 1))
    assert schedule.closes_at(utc(2026, 3, 29, 0)) == utc(2026, 3, 30, 0, 30)  # 02:30 CEST
    assert schedule.closes_at(utc(2026, 3, 30, 12)) == utc(2026, 3, 31, 0, 30)


# -- combinations --------------------------------------------------------------------------------


def overnight() -> Schedule:
    return berlin_window(
        "22:00-06:00",
        not_before=datetime(2026, 12, 1, 22, tzinfo=PLUS_ONE),
        deadline=datetime(2026, 12, 3, 6, tzinfo=PLUS_ONE),
    )


def test_not_before_inside_the_window_opens_at_not_before() -> None:
    schedule = berlin_window("20:00-06:00", not_before=datetime(2026, 12, 1, 22, tzinfo=PLUS_ONE))
    assert schedule.next_open(utc(2026, 12, 1, 12)) == utc(2026, 12, 1, 21)
    assert not schedule.is_open(utc(2026, 12, 1, 20))  # in the window, before not_before


def test_not_before_outside_the_window_waits_for_the_window() -> None:
    schedule = berlin_window("22:00-06:00", not_before=datetime(2026, 12, 1, 12, tzinfo=PLUS_ONE))
    assert schedule.next_open(utc(2026, 12, 1, 8)) == utc(2026, 12, 1, 21)


def test_the_window_or_the_deadline_closes_first() -> None:
    schedule = overnight()
    assert schedule.closes_at(utc(2026, 12, 1, 21)) == utc(2026, 12, 2, 5)  # window end
    assert schedule.next_open(utc(2026, 12, 2, 5)) == utc(2026, 12, 2, 21)
    early = berlin_window("22:00-06:00", deadline=datetime(2026, 12, 2, 3, tzinfo=PLUS_ONE))
    assert early.closes_at(utc(2026, 12, 1, 21)) == utc(2026, 12, 2, 2)  # deadline


def test_no_window_before_the_deadline_means_never() -> None:
    schedule = berlin_window("22:00-06:00", deadline=datetime(2026, 12, 1, 21, tzinfo=PLUS_ONE))
    now = utc(2026, 12, 1, 12)
    assert schedule.next_open(now) is None
    assert not schedule.past_deadline(now)
    assert schedule.describe(now) == "closed: nothing opens before the deadline 2026-12-01 21:00 +01:00"


# -- why_never_opens: a deadline that comes before the window opens -------------------------------


def test_why_never_opens_names_the_deadline_and_when_the_window_would_open() -> None:
    # 13:00 Berlin; the 22:00-23:00 window opens at 22:00, an hour after the 21:00 deadline.
    schedule = berlin_window("22:00-23:00", deadline=datetime(2026, 12, 1, 21, tzinfo=PLUS_ONE))
    assert schedule.why_never_opens(utc(2026, 12, 1, 12)) == (
        "deadline 2026-12-01T21:00+01:00 passes before the window 22:00-23:00 (Europe/Berlin) "
        "next opens, at 2026-12-01T22:00+01:00"
    )
    # Said in the schedule's zone, whatever offset the deadline was written with.
    in_utc = berlin_window("22:00-23:00", deadline=utc(2026, 12, 1, 20, 30, 15))
    assert in_utc.why_never_opens(utc(2026, 12, 1, 12)) == (
        "deadline 2026-12-01T21:30:15+01:00 passes before the window 22:00-23:00 (Europe/Berlin) "
        "next opens, at 2026-12-01T22:00+01:00"
    )


def test_why_never_opens_counts_from_not_before() -> None:
    # Tonight's window opens at 22:00, but not_before (23:30) is after it closes (23:00); the next
    # one opens tomorrow at 22:00, after the 06:00 deadline.
    schedule = berlin_window(
        "22:00-23:00",
        not_before=datetime(2026, 12, 2, 23, 30, tzinfo=PLUS_ONE),
        deadline=datetime(2026, 12, 3, 6, tzinfo=PLUS_ONE),
    )
    assert schedule.why_never_opens(utc(2026, 12, 1, 12)) == (
        "deadline 2026-12-03T06:00+01:00 passes before the window 22:00-23:00 (Europe/Berlin) "
        "first opens after not_before, at 2026-12-03T22:00+01:00"
    )


def test_why_never_opens_is_none_when_it_opens_in_time() -> None:
    now = utc(2026, 12, 1, 12)
    assert Schedule().why_never_opens(now) is None
    assert berlin_window("22:00-23:00").why_never_opens(now) is None  # no deadline
    assert overnight().why_never_opens(now) is None
    # Crossing midnight: opens at 22:00 and the 01:00 deadline cuts the night short; still sends.
    short_night = berlin_window("22:00-06:00", deadline=datetime(2026, 12, 2, 1, tzinfo=PLUS_ONE))
    assert short_night.why_never_opens(now) is None
    # Open right now, in the part after midnight of a window that opened the day before.
    assert short_night.why_never_opens(utc(2026, 12, 1, 23, 30)) is None
    # A deadline already past is said by the callers in their own words ("has already passed").
    assert short_night.why_never_opens(utc(2026, 12, 2, 0)) is None


def test_why_never_opens_a_window_inside_the_spring_gap() -> None:
    # 2026-03-29 in Berlin goes from 02:00 CET straight to 03:00 CEST: 02:00-02:30 never comes
    # that night, so the window next opens the night after, long past a 06:00 deadline.
    now = utc(2026, 3, 28, 12)
    in_gap = berlin_window("02:00-02:30", deadline=datetime(2026, 3, 29, 6, tzinfo=PLUS_TWO))
    assert in_gap.next_open(now) is None
    assert in_gap.why_never_opens(now) == (
        "deadline 2026-03-29T06:00+02:00 passes before the window 02:00-02:30 (Europe/Berlin) "
        "next opens, at 2026-03-30T02:00+02:00 "
        "(02:00-02:30 does not exist on 2026-03-29: the clocks skip it)"
    )
    # Partly in the gap: it opens when the clocks resume (03:00 CEST), before the deadline.
    across = berlin_window("02:00-03:30", deadline=datetime(2026, 3, 29, 6, tzinfo=PLUS_TWO))
    assert across.next_open(now) == utc(2026, 3, 29, 1)
    assert across.why_never_opens(now) is None
    # A deadline before the gap: that night's window is not what it missed, so the gap goes unsaid.
    early = berlin_window("02:00-02:30", deadline=datetime(2026, 3, 29, 1, 30, tzinfo=PLUS_ONE))
    assert early.why_never_opens(now) == (
        "deadline 2026-03-29T01:30+01:00 passes before the window 02:00-02:30 (Europe/Berlin) "
        "next opens, at 2026-03-30T02:00+02:00"
    )


def test_over_says_why_nothing_will_ever_be_sent_again() -> None:
    schedule = berlin_window("22:00-23:00", deadline=datetime(2026, 12, 2, 6, tzinfo=PLUS_ONE))
    assert schedule.over(utc(2026, 12, 1, 12)) is None  # tonight's window is still to come
    assert schedule.over(utc(2026, 12, 1, 21, 30)) is None  # open now
    assert schedule.over(utc(2026, 12, 1, 22, 30)) == (  # 23:30: the next window is after 06:00
        "nothing opens before its deadline 2026-12-02 06:00 +01:00"
    )
    assert schedule.over(utc(2026, 12, 2, 5)) == "its deadline 2026-12-02 06:00 +01:00 has passed"
    assert berlin_window("22:00-23:00").over(utc(2026, 12, 1, 22, 30)) is None  # no deadline
    assert Schedule().over(utc(2026, 12, 1)) is None


def test_closes_at_is_now_when_closed() -> None:
    now = utc(2026, 12, 1, 12)
    assert overnight().closes_at(now) == now


# -- describe ------------------------------------------------------------------------------------


def test_describe_waiting_until_not_before() -> None:
    assert overnight().describe(utc(2026, 12, 1, 16)) == "waiting until 2026-12-01 22:00 +01:00 (in 5h)"


def test_describe_waiting_for_the_window() -> None:
    schedule = overnight()
    assert schedule.describe(utc(2026, 12, 2, 17, 48)) == (
        "waiting for window (opens 22:00 Europe/Berlin, in 3h12m)"
    )
    assert schedule.describe(utc(2026, 12, 2, 20, 59, 40)) == (
        "waiting for window (opens 22:00 Europe/Berlin, in 20s)"
    )


def test_describe_open_until_the_window_end() -> None:
    assert overnight().describe(utc(2026, 12, 2, 2, 55)) == "open until 06:00 Europe/Berlin (in 2h05m)"


def test_describe_open_until_the_deadline() -> None:
    schedule = overnight()
    assert schedule.describe(utc(2026, 12, 3, 4, 15)) == (
        "open until the deadline 2026-12-03 06:00 +01:00 (in 45m)"
    )
    assert Schedule(deadline=utc(2026, 12, 3, 5)).describe(utc(2026, 12, 1, 5)) == (
        "open until the deadline 2026-12-03 05:00 +00:00 (in 2d)"
    )


def test_describe_open_without_an_end() -> None:
    assert Schedule(not_before=utc(2026, 1, 1)).describe(utc(2026, 12, 1)) == "open"


def test_describe_past_deadline() -> None:
    assert overnight().describe(utc(2026, 12, 3, 5)) == "past deadline"


def test_describe_shows_summer_offsets_and_seconds() -> None:
    schedule = Schedule(not_before=utc(2026, 7, 1, 20, 0, 30), timezone=BERLIN)
    assert (
        schedule.describe(utc(2026, 7, 1, 19, 15)) == "waiting until 2026-07-01 22:00:30 +02:00 (in 45m30s)"
    )
    west = Schedule(not_before=utc(2026, 7, 1, 20), timezone="America/New_York")
    assert west.describe(utc(2026, 7, 1, 19)) == "waiting until 2026-07-01 16:00 -04:00 (in 1h)"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.2, "1s"),
        (20, "20s"),
        (59, "59s"),
        (60, "1m"),
        (117, "1m57s"),  # said "1m": 57 seconds early
        (45 * 60 + 30, "45m30s"),
        (3599.5, "1h"),
        (3600, "1h"),
        (3 * 3600 + 12 * 60, "3h12m"),
        (3 * 3600 + 12 * 60 + 1, "3h13m"),  # rounded up, never early
        (2 * 3600 + 5 * 60, "2h05m"),
        (86400, "24h"),
        (24 * 3600 + 40 * 60, "24h40m"),  # said "1d": 40 minutes early
        (27 * 3600 + 30 * 60, "27h30m"),  # said "1d3h"
        (48 * 3600 - 30, "2d"),
        (2 * 86400 + 3 * 3600 + 59, "2d4h"),
        (-5, "0s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "1s"),
        (117, "1m"),
        (195, "3m"),
        (3 * 3600 + 300, "3h05m"),
        (24 * 3600 + 40 * 60, "1d"),
        (-5, "0s"),
    ],
)
def test_an_age_reads_at_least_so_long(seconds: float, text: str) -> None:
    """Ages ("last seen 3m ago", "created 3h05m ago") are "at least": what is below the second
    unit is dropped, as before; countdowns (:func:`format_duration`) are never early."""
    assert format_age(seconds) == text


# -- JSON ----------------------------------------------------------------------------------------


def test_as_json_and_back() -> None:
    schedule = overnight()
    data = schedule.as_json()
    assert data == {
        "not_before": "2026-12-01T21:00:00+00:00",
        "deadline": "2026-12-03T05:00:00+00:00",
        "window": "22:00-06:00",
        "timezone": BERLIN,
    }
    assert Schedule.from_json(data) == schedule
    assert Schedule.from_json(Schedule().as_json()) == Schedule()


@pytest.mark.parametrize("data", [None, {}])
def test_from_json_of_nothing_is_the_empty_schedule(data: dict[str, object] | None) -> None:
    assert Schedule.from_json(data).is_empty()


def test_from_json_reads_z_and_offsets() -> None:
    schedule = Schedule.from_json(
        {"deadline": "2026-12-02T06:00:00+01:00", "not_before": "2026-12-01T21:00Z"}
    )
    assert schedule.deadline == utc(2026, 12, 2, 5)
    assert schedule.not_before == utc(2026, 12, 1, 21)
    assert schedule.window is None
    assert schedule.timezone == "UTC"


@pytest.mark.parametrize(
    "stored",
    [
        {
            "not_before": "9999-12-31T00:00:00+00:00",
            "window": "22:00-06:00",
            "timezone": "Pacific/Kiritimati",
        },
        {"deadline": "9999-12-31T23:59:59+00:00", "window": "22:00-06:00", "timezone": "UTC"},
        {
            "not_before": "0001-01-02T00:00:00+00:00",
            "window": "01:00-02:00",
            "timezone": "Pacific/Kiritimati",
        },
    ],
)
def test_a_stored_schedule_out_of_range_is_read_and_answered_without_overflow(stored: dict[str, str]) -> None:
    # Stored by a version that let such instants through: reading it back, and every question
    # `status` and dispatch ask of it, must still work (an OverflowError there made `status`
    # and every other batch's `run` in the database fail).
    schedule = Schedule.from_json(stored)
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    assert isinstance(schedule.describe(now), str)
    schedule.is_open(now)
    schedule.closes_at(now)
    schedule.why_never_opens(now)
    schedule.over(now)


def test_parse_instant_bounds_new_instants_only_when_asked() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_instant("9999-12-31T00:00:00Z")
    assert parse_instant("9999-12-31T00:00:00Z", bounded=False).year == 9999
    assert parse_instant("2999-12-31T23:59:59Z").year == 2999


# -- 24:00, the end of the day -------------------------------------------------------------------


def test_a_window_may_end_at_24_00() -> None:
    """``24:00`` is the end of a day (ISO 8601): ``00:00-24:00`` was refused ("24:00 is not a time
    of day"), and its stand-in ``00:00-23:59`` left a nightly minute closed, in which fal timed
    out whatever was queued."""
    assert parse_window("22:00-24:00") == (time(22), time(0))  # until midnight
    assert parse_window("00:00-24:00") is None  # the whole day: no window
    until_midnight = berlin_window("22:00-24:00")
    assert until_midnight.is_open(utc(2026, 12, 1, 22, 59))  # 23:59 in Berlin
    assert not until_midnight.is_open(utc(2026, 12, 1, 23, 0))  # midnight
    # Any time of any day, DST nights included, as without a window.
    whole_day = Schedule(window=parse_window("00:00-24:00"), timezone=BERLIN)
    for moment in (utc(2026, 3, 29, 1, 30), utc(2026, 10, 25, 0, 59), utc(2026, 12, 1, 22, 59, 30)):
        assert whole_day.is_open(moment)


@pytest.mark.parametrize(
    ("text", "instant"),
    [
        ("2027-12-02T24:00:00Z", utc(2027, 12, 3)),
        ("2027-12-02T24:00Z", utc(2027, 12, 3)),
        ("2027-12-31t24:00:00.000+01:00", utc(2027, 12, 31, 23)),
        ("2027-12-02 24:00:00-05:00", utc(2027, 12, 3, 5)),
    ],
)
def test_an_instant_at_24_00_is_the_end_of_its_day(text: str, instant: datetime) -> None:
    """ISO 8601 allows 24:00 as the end of a day: it was refused as "not an ISO 8601 timestamp"."""
    assert parse_instant(text) == instant


def test_only_24_00_itself_is_the_end_of_a_day() -> None:
    with pytest.raises(ValueError, match="is not an ISO 8601 timestamp"):
        parse_instant("2027-12-02T24:01:00Z")


# -- a time without an offset, in the schedule's zone --------------------------------------------


@pytest.mark.parametrize(
    ("text", "zone", "advice"),
    [
        (
            "2027-12-02T06:00:00",
            BERLIN,
            "; in Europe/Berlin on 2027-12-02 06:00 that is +01:00: write 2027-12-02T06:00:00+01:00",
        ),
        (
            "2027-07-01T06:00",
            "America/New_York",
            "; in America/New_York on 2027-07-01 06:00 that is -04:00: write 2027-07-01T06:00-04:00",
        ),
        (
            "2027-03-28T02:30:00",
            BERLIN,
            "; in Europe/Berlin 2027-03-28 02:30 does not exist (that night the clocks go from 02:00 "
            "+01:00 straight to 03:00 +02:00): write a time outside that gap, such as "
            "2027-03-28T03:00:00+02:00",
        ),
        (
            "2027-10-31T02:30",
            BERLIN,
            "; in Europe/Berlin 2027-10-31 02:30 happens twice (that night the clocks show it first at "
            "+02:00, then again at +01:00): write 2027-10-31T02:30+02:00 or 2027-10-31T02:30+01:00",
        ),
    ],
)
def test_a_time_without_offset_is_refused_with_the_offset_it_has_in_the_zone(
    text: str, zone: str, advice: str
) -> None:
    """Refused all the same (explicit is right), but with the offset to write: the refusal said
    only "add one such as +01:00", whatever the zone and the date."""
    with pytest.raises(ValueError, match="has no UTC offset") as refused:
        parse_instant(text, timezone=zone)
    assert str(refused.value) == f"{text!r} has no UTC offset, so the instant is ambiguous{advice}"
    with pytest.raises(ValueError, match=r"\(local time in which zone\?\); add one such as \+01:00"):
        parse_instant(text)  # no zone: as before
