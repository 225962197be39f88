"""`wanbatch run` reacts to fal's events, not to its tick (issue #11).

With the tick and the polls set to 30 s, a batch can only finish promptly if completions are
learnt from the status streams and each one dispatches the next job at once. Each test counts
what happened (ticks, streams, status calls) rather than timing it: a run that fell back on
the tick would need one tick per wave of jobs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import Wb, write_manifest
from worker.conductor import Conductor, ConductorStats

SLOW_TICK = {
    "WANBATCH_TICK_INTERVAL": "30",
    "WANBATCH_POLL_MIN_INTERVAL": "30",
    "WANBATCH_POLL_MAX_INTERVAL": "60",
}


@pytest.fixture
def conductor_stats(monkeypatch: pytest.MonkeyPatch) -> list[ConductorStats]:
    """The stats of every conductor a command in this test ran."""
    seen: list[ConductorStats] = []
    original = Conductor.__init__

    def spy(self: Conductor, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        seen.append(self.stats)

    monkeypatch.setattr(Conductor, "__init__", spy)
    return seen


def _manifest(folder: Path, jobs: int) -> Path:
    items = "".join(f"  - prompt: event driven {i}\n    seed: {i}\n" for i in range(jobs))
    return write_manifest(folder, "events", f"name: events\nendpoint: fal-ai/wan-22\nitems:\n{items}")


def _drain_with_a_slow_tick(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, stats_seen: list[ConductorStats], jobs: int
) -> ConductorStats:
    """``wanbatch run`` of ``jobs`` jobs with the tick and polls at 30 s; every job succeeded, each
    dispatched once, and no more ticks than one at the start (and one per 30 s should a loaded
    machine make the run that long). Returns the run's conductor stats."""
    for name, value in SLOW_TICK.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    run = wb("run", _manifest(e2e_env, jobs), "--json", "--no-progress")
    took = time.monotonic() - started
    assert run.code == 0, run.stderr
    assert run.json()["counts"]["succeeded"] == jobs
    (stats,) = stats_seen
    assert stats.ticks <= 1 + int(took // 30), (stats, took)
    assert stats.dispatched == jobs
    return stats


def test_a_batch_drains_on_events_with_a_30s_tick(
    wb: Wb,
    sim: SimulatorHandle,
    e2e_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    conductor_stats: list[ConductorStats],
) -> None:
    monkeypatch.setenv("WANBATCH_MAX_OUTSTANDING", "4")  # 24 jobs in at least 6 waves of 4
    stats = _drain_with_a_slow_tick(wb, e2e_env, monkeypatch, conductor_stats, 24)
    assert stats.ticks < 6  # a run that waited on ticks would have needed one per wave
    assert stats.streams >= 24  # every request followed over its status stream …
    assert stats.status_calls == 0  # … so the safety-net poll never had to ask


def test_a_batch_held_by_its_download_backlog_drains_on_events(
    wb: Wb,
    sim: SimulatorHandle,
    e2e_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    conductor_stats: list[ConductorStats],
) -> None:
    """With a download backlog bound of 1, each download holds the next submit back; its end
    must send that job at once. It used to wait for the tick: one job per tick interval."""
    monkeypatch.setenv("WANBATCH_MAX_OUTSTANDING", "4")
    monkeypatch.setenv("WANBATCH_MAX_DOWNLOAD_BACKLOG", "1")
    stats = _drain_with_a_slow_tick(wb, e2e_env, monkeypatch, conductor_stats, 8)
    assert stats.ticks < 4  # waiting on ticks would have taken one per job


def test_a_stream_that_breaks_falls_back_to_polling(
    wb: Wb,
    sim: SimulatorHandle,
    e2e_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    conductor_stats: list[ConductorStats],
) -> None:
    """fal's stream may end early or fail; the job is then polled, never lost."""
    monkeypatch.setenv("WANBATCH_MAX_OUTSTANDING", "4")
    sim.set_faults({"status_stream_drop": {"probability": 1.0}})
    # Requests that outlast their streams' failures: with the session's 50 ms, a loaded machine
    # reopened a stream only after the request had finished, heard COMPLETED, and never polled.
    sim.update_options(latency_seconds=1.0)
    try:
        run = wb("run", _manifest(e2e_env, 6), "--json", "--no-progress")
    finally:
        sim.update_options(latency_seconds=0.05)
    assert run.code == 0, run.stderr
    assert run.json()["counts"]["succeeded"] == 6
    (stats,) = conductor_stats
    assert stats.status_calls >= 1  # the poller took over from the broken streams
