"""A conductor whose jobs at fal are all followed by status streams ticks less often.

The streams bring every completion at once, and the round that applies it dispatches the next
job: the tick is only the safety net then, and in a 400-job drain each of its ticks found
nothing, at about 11 ms of CPU each (0.7 ms a job). After ``CALM_TICKS`` such ticks the interval
doubles up to ``CALM_TICK_FACTOR`` times the tick; a tick that finds anything to do brings it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.embedded_drain import drain_embedded
from worker.conductor import CALM_TICK_FACTOR, CALM_TICKS, Conductor, calm_interval


def test_the_interval_doubles_after_the_calm_ticks_up_to_its_bound() -> None:
    assert [calm_interval(1.0, c) for c in range(CALM_TICKS)] == [1.0] * CALM_TICKS
    grown = [calm_interval(1.0, c) for c in range(CALM_TICKS, CALM_TICKS + 4)]
    assert grown == [2.0, 4.0, 4.0, 4.0]
    assert CALM_TICK_FACTOR == 4
    assert calm_interval(0.05, 100) == pytest.approx(0.2)


def test_jobs_followed_by_streams_are_ticked_less_often(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks: list[bool] = []  # whether each tick was calm
    real_tick = Conductor._tick

    def counted(self: Conductor, *args: Any, **kwargs: Any) -> bool:
        idle = real_tick(self, *args, **kwargs)
        ticks.append(self.calm)
        return idle

    monkeypatch.setattr(Conductor, "_tick", counted)
    report, wall, _started = drain_embedded(
        tmp_path, sqlite_url, monkeypatch, jobs=2, latency=3.0, concurrency=2, tick_interval=0.05
    )
    assert report["counts"].get("succeeded") == 2, report["counts"]
    assert wall >= 3.0, wall
    # Three seconds at fal, a tick every 0.05 s: about 60 ticks before. Calm, after CALM_TICKS at
    # 0.05 s, then 0.1 s, then every 0.2 s: about 20 (more on a loaded machine, never 60).
    assert sum(ticks) >= CALM_TICKS, ticks
    assert len(ticks) <= 35, (len(ticks), wall)
