"""`run`'s progress line fits the terminal: count, money and elapsed time are never cut."""

from __future__ import annotations

import io
import re

import pytest
from rich.cells import cell_len
from rich.console import Console

from worker.progress_line import REFRESH_PER_SECOND, batch_progress_display, counts_text, money_text

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
