"""``bench.drain``'s split of a client's CPU into start-up and a cost per job (``--startup-jobs``)."""

from __future__ import annotations

import pytest
from rich.console import Console

from bench.drain import Row, split_cost, split_table


def test_two_sizes_give_the_start_up_and_the_slope() -> None:
    # 1.0 s to start, then 12.5 ms a job: 8 jobs cost 1.1 s (137.5 ms each), 400 cost 6.0 s (15 ms each).
    startup, per_job = split_cost(400, 15.0, 8, 137.5)
    assert per_job == pytest.approx(12.5)
    assert startup == pytest.approx(1.0)


def test_a_client_without_start_up_costs_the_same_per_job_at_every_size() -> None:
    assert split_cost(400, 10.0, 8, 10.0) == pytest.approx((0.0, 10.0))


def _row(client: str, jobs: int, cpu: float, *, broken: bool = False) -> Row:
    return Row(client, 1.0, 1.0, 1.0, cpu, 50.0, jobs, jobs, 1.0, broken=broken)


def test_the_table_shows_medians_and_leaves_a_broken_client_blank() -> None:
    runs = {
        "a": [_row("a", 400, 15.0), _row("a", 400, 14.0), _row("a", 400, 99.0, broken=True)],
        "b": [_row("b", 400, 10.0)],
    }
    small = {"a": [_row("a", 8, 137.5), _row("a", 8, 120.0)], "b": [_row("b", 8, 1.0, broken=True)]}
    console = Console(width=200, record=True)
    console.print(split_table("drain", 400, 8, runs, small))
    text = console.export_text()
    row_a = next(line for line in text.splitlines() if line.startswith("│ a"))
    startup, per_job = split_cost(400, 14.5, 8, 128.75)  # the medians of the unbroken runs
    assert f"{startup:.2f}" in row_a
    assert f"{per_job:.1f}" in row_a
    row_b = next(line for line in text.splitlines() if line.startswith("│ b"))
    assert "–" in row_b
