"""``status``'s forecast says when the schedule stops sending before the work left is done."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

from jobs.listing import eta_beyond_schedule
from jobs.schedule import Schedule

NOW = datetime(2026, 12, 1, 22, 37, 32, tzinfo=UTC)


def test_a_window_closing_before_the_work_is_done_is_said() -> None:
    window = Schedule(window=(time(22, 37), time(22, 38)))  # closes in 28 s
    assert eta_beyond_schedule(window, 100.0, NOW) == (
        "the window closes first (in 28s): the rest waits for the next one"
    )
    assert eta_beyond_schedule(window, 20.0, NOW) is None  # done before it closes


def test_a_deadline_before_the_work_is_done_is_said() -> None:
    deadline = Schedule(deadline=NOW + timedelta(minutes=2), window=(time(22, 0), time(23, 30)))
    assert eta_beyond_schedule(deadline, 600.0, NOW) == (
        "the deadline comes first (in 2m): what is not sent by then, or still queued at fal, is cancelled"
    )


def test_no_forecast_no_schedule_or_a_closed_one_say_nothing() -> None:
    assert eta_beyond_schedule(Schedule(), 600.0, NOW) is None
    assert eta_beyond_schedule(Schedule(window=(time(22, 37), time(22, 38))), None, NOW) is None
    closed = Schedule(window=(time(1, 0), time(2, 0)))
    assert eta_beyond_schedule(closed, 600.0, NOW) is None  # "waiting for window" says it already


def test_a_window_closing_with_none_before_the_deadline_says_the_rest_is_cancelled() -> None:
    # Closes in 28 s; the next window (tomorrow 22:37) comes after the deadline in an hour.
    last = Schedule(window=(time(22, 37), time(22, 38)), deadline=NOW + timedelta(hours=1))
    assert eta_beyond_schedule(last, 100.0, NOW) == (
        "the window closes first (in 28s) and nothing opens before the deadline: "
        "what is not sent by then is cancelled"
    )
    # A deadline after the next window opens: the rest does wait for it.
    later = Schedule(window=(time(22, 37), time(22, 38)), deadline=NOW + timedelta(days=2))
    assert eta_beyond_schedule(later, 100.0, NOW) == (
        "the window closes first (in 28s): the rest waits for the next one"
    )
