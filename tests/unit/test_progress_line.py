"""`run`'s progress line fits the terminal: count, money and elapsed time are never cut."""

from __future__ import annotations

import io
import re
import time
from datetime import UTC, datetime

import pytest
from rich.cells import cell_len
from rich.console import Console
from rich.progress import Task

from jobs import clock
from worker.progress_line import (
    PLAIN_EVERY_SECONDS,
    REFRESH_PER_SECOND,
    PlainProgress,
    batch_progress_display,
    counts_text,
    money_text,
    plain_line,
)

BUSY = {
    "pending": 50_000,
    "submitting": 10,
    "queued": 40,
    "running": 40,
    "downloading": 3,
    "succeeded": 41_234,
    "failed": 12,
}


def _render(width: int, description: str, total: int, done: int, money: str, counts: dict[str, int]) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=False, record=True)
    progress = batch_progress_display(console, disable=False)
    progress.add_task(description, total=total, completed=done, money=money, counts=counts)
    console.print(progress.get_renderable())
    return console.export_text().rstrip("\n")


@pytest.mark.parametrize("width", [60, 80, 100, 200])
@pytest.mark.parametrize(
    ("description", "total", "done", "money", "counts"),
    [
        ("jobs", 6, 6, money_text(1.8, 1.8), {"succeeded": 6}),
        (
            "jobs · waiting for window (opens 22:00 Europe/Berlin, in 3h20m)",
            100_000,
            41_234,
            money_text(12_345.675, 30_000),
            BUSY,
        ),
        ("jobs", 1_000, 7, money_text(0.2, 202.5), {"pending": 983, "running": 10, "succeeded": 7}),
    ],
)
def test_the_line_fits_and_keeps_what_matters(
    width: int, description: str, total: int, done: int, money: str, counts: dict[str, int]
) -> None:
    text = _render(width, description, total, done, money, counts)
    assert "\n" not in text
    assert cell_len(text.rstrip()) <= width
    assert f"{done}/{total}" in text
    assert money in text  # whole: never "$12,3…"
    assert re.search(r"\b\d+:\d\d:\d\d\b", text), text  # the elapsed time
    assert text.startswith("jobs")


def test_the_line_is_redrawn_as_often_as_it_can_change() -> None:
    progress = batch_progress_display(Console(file=io.StringIO(), force_terminal=True), disable=False)
    assert progress.live.refresh_per_second == REFRESH_PER_SECOND == 2  # rich's default is 10


def test_money_is_rounded_like_everywhere_else() -> None:
    assert money_text(2.835, 10) == "$2.84/$10.00"
    assert money_text(None, None) == "$0.00/$0.00"


def test_counts_shorten_then_cut() -> None:
    assert counts_text({"succeeded": 6, "running": 2}, 80) == "running:2 succeeded:6"
    assert counts_text({"succeeded": 6, "running": 2}, 12) == "run:2 ok:6"
    short = counts_text(BUSY, 20)
    assert cell_len(short) <= 20
    assert short.endswith("…")


def test_the_window_countdown_is_whole_at_80_columns() -> None:
    """While a batch waits for its window nothing moves: the countdown (why, and how long) is
    what the line is for, ahead of an empty bar and an unknown time left."""
    note = "jobs · waiting for window (opens 00:01 UTC, in 58m)"
    text = _render(80, note, 1, 0, money_text(0, 0.2), {"pending": 1})
    assert note in text
    assert "0/1" in text
    assert cell_len(text.rstrip()) <= 80


def test_a_long_zone_name_keeps_its_countdown_at_80_columns() -> None:
    from worker.running import compact_note

    note = compact_note("waiting for window (opens 10:00 Europe/Berlin, in 9h16m)")
    assert note == "window opens 10:00 Europe/Berlin, in 9h16m"
    text = _render(80, f"jobs · {note}", 1, 0, money_text(0, 0.2), {"pending": 1})
    assert f"jobs · {note}" in text
    assert compact_note("paused by user") == "paused by user"


# --------------------------------------------------------------------------- not a terminal


def _task(description: str, total: int, done: int, money: str, counts: dict[str, int]) -> Task:
    progress = batch_progress_display(Console(file=io.StringIO()), disable=True)
    task_id = progress.add_task(description, total=total, completed=done, money=money, counts=counts)
    return next(t for t in progress.tasks if t.id == task_id)


def test_the_plain_line_says_what_the_bar_says_without_terminal_codes() -> None:
    """Into a file (nohup, CI, ``2> log``) the line cannot be redrawn: it goes out as plain text,
    with the time, the count and share, the money whole, the elapsed time, the counts by state."""
    at = datetime(2026, 12, 2, 21, 5, tzinfo=UTC)
    line = plain_line(_task("jobs", 100_000, 41_234, money_text(12_345.675, 30_000), BUSY), now=at)
    assert line.startswith("2026-12-02T21:05:00Z jobs: 41234/100000 (41%) · $12,345.68/$30,000.00 · elapsed ")
    assert "succeeded:41234" in line  # the counts whole, however long
    assert "pending:50000" in line
    assert "no ETA yet" in line  # one sample: no pace to tell yet
    assert not {"\x1b", "\r", "\n", "━"} & set(line)

    waiting = "jobs · window opens 22:00 Europe/Berlin, in 3h20m"
    line = plain_line(_task(waiting, 2, 0, money_text(0, 1), {"pending": 2}), now=at)
    elapsed = r"elapsed \d+:\d\d:\d\d"
    countdown = "window opens 22:00 Europe/Berlin, in 3h20m"
    assert re.search(
        rf"jobs: 0/2 \(0%\) · \$0\.00/\$1\.00 · {elapsed} · no ETA yet · {countdown} · pending:2$", line
    )

    done = plain_line(_task("jobs", 6, 6, money_text(1.8, 1.8), {"succeeded": 6}), now=at)
    assert re.search(rf"jobs: 6/6 \(100%\) · \$1\.80/\$1\.80 · {elapsed} · succeeded:6$", done), done


def test_plain_lines_come_at_the_start_each_few_percent_at_least_each_minute_and_at_the_end() -> None:
    """The cadence, on a clock of our own: no line is decided by real time here."""
    plain = PlainProgress(step_percent=5, min_gap=10.0, every=60.0)
    assert plain.due(0.0, 0, 1000)  # the first refresh: what the run starts from
    assert not plain.due(5.0, 0, 1000)
    assert not plain.due(8.0, 49, 1000)  # under 5 % more
    assert not plain.due(9.0, 60, 1000)  # 5 % more, but a line 9 s ago: not yet
    assert plain.due(10.0, 60, 1000)  # 5 % more, and 10 s since the last line
    assert not plain.due(30.0, 99, 1000)  # still in the same 5 % step
    assert plain.due(31.0, 400, 1000)  # several steps at once: one line
    assert not plain.due(90.0, 400, 1000)
    assert plain.due(91.0, 400, 1000)  # nothing moved for a minute: a line all the same
    assert plain.due(91.5, 401, 1000, final=True)  # the end always gets its line
    unknown = PlainProgress()
    assert unknown.due(0.0, 0, None)
    assert not unknown.due(30.0, 0, None)
    assert unknown.due(PLAIN_EVERY_SECONDS, 0, None)


def test_a_plain_line_comes_at_once_when_an_alert_comes_and_when_it_goes() -> None:
    """The submit-rate limiter unreachable holds every job back: said at the next refresh, not
    up to a minute later, and once more when it answers again; never a line per refresh."""
    plain = PlainProgress(step_percent=5, min_gap=10.0, every=60.0)
    held = "limiter unreachable: submits held"
    assert plain.due(0.0, 0, 1000)
    assert plain.due(1.0, 0, 1000, alert=held)  # it came
    assert not plain.due(2.0, 0, 1000, alert=held)
    assert not plain.due(30.0, 0, 1000, alert=held)
    assert plain.due(31.0, 0, 1000)  # it went
    assert not plain.due(32.0, 0, 1000)


# --------------------------------------------------------------------------- the time left


def _paced(*, eta: float | None, held: bool) -> tuple[Task, Console]:
    """A task with a pace of its own (rich's: 2 jobs in 10 s, on a clock of ours), and the time
    left and hold that ``run`` computed (its fields ``eta`` and ``held``)."""
    clock = [0.0]
    console = Console(file=io.StringIO(), width=100, force_terminal=False, record=True)
    progress = batch_progress_display(console, disable=False)
    progress.get_time = lambda: clock[0]
    task_id = progress.add_task("jobs · paused by user", total=6, completed=0, money="$0.41/$1.22", counts={})
    progress.update(task_id, completed=1)
    clock[0] = 10.0
    progress.update(task_id, completed=2, counts={"pending": 4, "succeeded": 2}, eta=eta, held=held)
    task = next(t for t in progress.tasks if t.id == task_id)
    assert task.time_remaining  # rich would promise a time from this pace
    console.print(progress.get_renderable())
    return task, console


def test_a_held_batch_gets_no_time_left_whatever_its_pace() -> None:
    """A paused batch (or one whose window will not open before its deadline) showed "~0:00:45
    left" for jobs this run was never going to send: the line shows the time ``run`` computed by
    ``status``'s rules (the field ``eta``, None while held), never rich's own forecast."""
    task, console = _paced(eta=None, held=True)
    line = plain_line(task)
    assert " left" not in line
    assert "· no ETA · paused by user ·" in line
    text = console.export_text()
    assert " left" not in text
    assert "-:--:--" in text


def test_the_time_left_is_the_one_run_computed() -> None:
    task, console = _paced(eta=95.0, held=False)
    assert "· ~0:01:35 left ·" in plain_line(task)
    assert "~0:01:35 left" in console.export_text()


def test_the_plain_line_is_stamped_on_the_databases_clock() -> None:
    """The line's time is the database's, as the countdown beside it ("window opens 22:00 …, in
    3m") and every other stamp: a host 3 minutes behind the database stamped its own time."""
    host = time.time()
    steady = clock.steady()
    try:
        # This process measured its database 3 minutes ahead of this host.
        clock.take(host + 180.0, before=steady, after=steady, wall=host, say=False)
        line = plain_line(_task("jobs", 2, 0, money_text(0, 1), {"pending": 2}))
    finally:
        clock.reset()
    stamp = datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert 170 <= stamp.timestamp() - host <= 200, line
