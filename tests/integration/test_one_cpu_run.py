"""An embedded run's threads share one CPU (``WANBATCH_CPU_AFFINITY``, worker.one_cpu).

The run below looks, at each of its ticks, at the affinity of every thread of this process: the
run's own (the conductor's loop, the submit and download pools, the status streams) are pinned
to the run's CPU, the simulator's threads (started before the run) are not; after the run the
caller's affinity is what it was. ``off`` pins nothing. The batch drains either way."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import batches
from jobs.settings import Settings
from worker import one_cpu
from worker.running import process_batch

ALLOWED = frozenset(os.sched_getaffinity(0))

MANIFEST = """
name: {name}
endpoint: fal-ai/wan-22
defaults:
  resolution: 480p
matrix:
  seed: [1, 2, 3, 4, 5, 6]
items:
  - prompt: a paper boat on a pond
"""


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(
        SimulatorOptions(latency_seconds=0.3, latency_jitter=0.0, concurrency_limit=4, rng_seed=3)
    ) as handle:
        yield handle


def _settings(sim: SimulatorHandle, tmp_path: Path, affinity: str) -> Settings:
    sim.reset()
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'wanbatch.db'}",
        FAL_KEY=SecretStr("one-cpu-test-key-5c2d"),
        fal_queue_url=sim.url,
        fal_rest_url=sim.url,
        output_dir=tmp_path / "outputs",
        poll_min_interval=0.05,
        poll_max_interval=0.2,
        tick_interval=0.05,
        submit_rate=100,
        cpu_affinity=affinity,
    )


def _run(tmp_path: Path, settings: Settings, name: str) -> tuple[dict[str, set[int]], set[int]]:
    """Run a 6-job batch on a thread of its own; (each thread's affinity as its ticks saw it,
    by thread name — the threads the process had before the run under ``earlier: NAME``, as a
    resolver an earlier test's run started; the calling thread's affinity afterwards)."""
    path = tmp_path / "batch.yaml"
    path.write_text(MANIFEST.format(name=name), encoding="utf-8")
    seen: dict[str, set[int]] = {}
    after: list[set[int]] = []
    counts: list[int] = []

    def look() -> None:
        for thread in threading.enumerate():
            if thread.native_id is None:
                continue
            name = f"earlier: {thread.name}" if thread in earlier else thread.name
            try:
                seen.setdefault(name, set()).update(os.sched_getaffinity(thread.native_id))
            except OSError:
                continue

    def work() -> None:
        submitted = batches.submit_manifest(path, settings)
        report, _stats = process_batch(submitted.batch_id, settings, show_progress=False, serve_metrics=False)
        counts.append(report["counts"]["succeeded"])
        after.append(os.sched_getaffinity(0))

    original = one_cpu.SharedCpu.check
    # The process's threads, not the run's: the objects, never their idents — an earlier thread
    # that ends meanwhile leaves its ident to the next one started (the run's loop was taken for
    # an earlier thread: CI).
    earlier = set(threading.enumerate())

    def check(self: one_cpu.SharedCpu) -> bool:
        look()
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(one_cpu.SharedCpu, "check", check)
        if settings.cpu_affinity == "off":  # no SharedCpu, so no check: look from the conductor
            from worker.conductor import Conductor

            tick = Conductor._tick

            def looking_tick(self: Conductor, stopping: threading.Event) -> bool:
                look()
                return tick(self, stopping)

            patch.setattr(Conductor, "_tick", looking_tick)
        thread = threading.Thread(target=work, name="test-run")
        thread.start()
        thread.join(120)
    assert not thread.is_alive()
    assert counts == [6]
    return seen, after[0]


def test_the_runs_threads_share_one_cpu_and_others_are_left_alone(
    sim: SimulatorHandle, tmp_path: Path
) -> None:
    assert len(ALLOWED) >= 2, "this test needs 2 CPUs (CI has two)"
    seen, after = _run(tmp_path, _settings(sim, tmp_path, "auto"), "one-cpu")
    # the run's: started by it (the simulator's threads it started meanwhile are not)
    runs = {name: cpus for name, cpus in seen.items() if name.startswith("wanbatch-") or name == "test-run"}
    assert {"wanbatch-run-loop", "test-run"} <= set(runs)
    assert any(name.startswith("wanbatch-submit") for name in runs)
    # each of the run's threads stayed on one CPU, the same for all of them
    assert all(len(cpus) == 1 for cpus in runs.values()), runs
    assert len(set().union(*runs.values())) == 1, runs
    # The simulator's threads and pytest's, started before the run. Not those an earlier test's
    # run left behind (a stream reader idling out, the shared resolver): that run pinned them.
    others = {
        name: cpus
        for name, cpus in seen.items()
        if name not in runs and not name.startswith("earlier: wanbatch-")
    }
    assert others
    moved = {name: cpus for name, cpus in others.items() if cpus != set(ALLOWED)}
    assert not moved, moved
    assert after == set(ALLOWED)  # the caller's affinity back


def test_off_leaves_every_thread_where_the_kernel_puts_it(sim: SimulatorHandle, tmp_path: Path) -> None:
    seen, after = _run(tmp_path, _settings(sim, tmp_path, "off"), "no-pin")
    assert "wanbatch-run-loop" in seen
    assert all(cpus == set(ALLOWED) for cpus in seen.values()), seen
    assert after == set(ALLOWED)
