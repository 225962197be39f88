"""A small batch run embedded (``process_batch``, nothing shown) against a simulator of its own.

For tests that count what a run does while its jobs come and go at fal (reads, ticks): the
simulator's render time and account concurrency set how long the jobs wait and how often they
end.
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
from worker.running import process_batch


def drain_embedded(
    tmp_path: Path,
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    *,
    jobs: int,
    latency: float,
    concurrency: int,
    **settings: Any,
) -> tuple[dict[str, Any], float, float]:
    """Run ``jobs`` text-to-video jobs to their end; (the run's report, its wall seconds, when
    it started by ``time.monotonic()``). ``settings``: more of :class:`Settings` (the outstanding
    cap is ``concurrency`` unless given)."""
    options = SimulatorOptions(
        latency_seconds=latency, latency_jitter=0.0, concurrency_limit=concurrency, rng_seed=5
    )
    with running_simulator(options) as handle:
        monkeypatch.setenv("WANBATCH_DATABASE_URL", sqlite_url)
        get_settings.cache_clear()
        config = Settings(
            database_url=sqlite_url,
            FAL_KEY=SecretStr("embedded-drain-key-7c2d"),
            fal_queue_url=handle.url,
            fal_rest_url=handle.url,
            output_dir=tmp_path / "outputs",
            submit_rate=100,
            **{"max_outstanding": concurrency, **settings},
        )
        manifest = tmp_path / "drain.yaml"
        manifest.write_text(
            "name: drain\nendpoint: fal-ai/wan-22\ndefaults:\n  resolution: 480p\nitems:\n"
            + "".join(f"  - prompt: A render, take {i}\n" for i in range(jobs)),
            encoding="utf-8",
        )
        submitted = batches.submit_manifest(manifest, config)
        started = time.monotonic()
        report, _stats = process_batch(submitted.batch_id, config, show_progress=False, serve_metrics=False)
        wall = time.monotonic() - started
    get_settings.cache_clear()
    return dict(report), wall, started
