"""A conductor whose jobs at fal are all followed by status streams ticks less often.

The streams bring every completion at once, and the round that applies it dispatches the next
job: the tick is only the safety net then, and in a 400-job drain each of its ticks found
nothing, at about 11 ms of CPU each (0.7 ms a job). After ``CALM_TICKS`` such ticks the interval
doubles up to ``CALM_TICK_FACTOR`` times the tick; a tick that finds anything to do brings it back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from falsim.options import SimulatorOptions
from falsim.server import running_simulator
from jobs import batches
from jobs.settings import Settings, get_settings
from worker.conductor import CALM_TICK_FACTOR, CALM_TICKS, Conductor, calm_interval
from worker.running import process_batch


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
    options = SimulatorOptions(latency_seconds=3.0, latency_jitter=0.0, concurrency_limit=2, rng_seed=9)
    with running_simulator(options) as handle:
        monkeypatch.setenv("WANBATCH_DATABASE_URL", sqlite_url)
        get_settings.cache_clear()
        settings = Settings(
            database_url=sqlite_url,
            FAL_KEY=SecretStr("calm-ticks-key-51f0"),
            fal_queue_url=handle.url,
            fal_rest_url=handle.url,
            output_dir=tmp_path / "outputs",
            submit_rate=100,
            max_outstanding=2,
            tick_interval=0.05,
        )
        manifest = tmp_path / "calm.yaml"
        manifest.write_text(
            "name: calm\nendpoint: fal-ai/wan-22\ndefaults:\n  resolution: 480p\nitems:\n"
            "  - prompt: A long render\n  - prompt: Another long render\n",
            encoding="utf-8",
        )
        submitted = batches.submit_manifest(manifest, settings)
        started = time.monotonic()
        report, _stats = process_batch(submitted.batch_id, settings, show_progress=False, serve_metrics=False)
        wall = time.monotonic() - started
    get_settings.cache_clear()
    assert report["counts"].get("succeeded") == 2, report["counts"]
    assert wall >= 3.0, wall
    # Three seconds at fal, a tick every 0.05 s: about 60 ticks before. Calm, after CALM_TICKS at
    # 0.05 s, then 0.1 s, then every 0.2 s: about 20 (more on a loaded machine, never 60).
    assert sum(ticks) >= CALM_TICKS, ticks
    assert len(ticks) <= 35, (len(ticks), wall)
