"""An embedded ``run``'s progress refresh reads the batch only when something may have changed.

The refresh (``worker.running._watch``) read the batch's counts, its caps' holders, the cancels
given up and the requests of other keys — some ten statements — at every look of the
conductor's loop (every 0.5 s): while the jobs waited minutes at fal for their renders, more
statements than the tick itself, for a line that did not change. It now reads when a step of
the run ended, the conductor applied statuses, dispatched or ticked to some effect, or a note of
the run's own changed; otherwise only every :data:`worker.running.REFRESH_UNCHANGED_SECONDS`
(what other processes change: a ``pause`` from another terminal).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

import worker.running
from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import batches, db, store
from jobs.db import open_engine
from jobs.settings import Settings, get_settings
from tests.embedded_drain import drain_embedded
from worker.running import process_batch

JOBS = 2
#: How long each job waits at fal (the simulator's render time).
LATENCY = 8.0
MANIFEST = "name: waiting\nendpoint: fal-ai/wan-22\ndefaults:\n  resolution: 480p\nitems:\n" + "".join(
    f"  - prompt: A slow render, take {i}\n" for i in range(JOBS)
)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(
        SimulatorOptions(latency_seconds=LATENCY, latency_jitter=0.0, concurrency_limit=JOBS, rng_seed=3)
    ) as handle:
        yield handle


@pytest.fixture
def settings(
    sim: SimulatorHandle, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    sim.reset()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    yield Settings(
        database_url=sqlite_url,
        FAL_KEY=SecretStr("refresh-key-7c2d"),
        fal_queue_url=sim.url,
        fal_rest_url=sim.url,
        output_dir=tmp_path / "outputs",
        submit_rate=100,
        max_outstanding=JOBS,
    )
    get_settings.cache_clear()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When each refresh read the batch's progress (``time.monotonic()``)."""
    seen: list[float] = []
    real = batches.batch_progress  # what worker.running imported

    def counted(*args: Any, **kwargs: Any) -> Any:
        seen.append(time.monotonic())
        return real(*args, **kwargs)

    monkeypatch.setattr("worker.running.batch_progress", counted)
    return seen


def _run(settings: Settings, tmp_path: Path) -> tuple[dict[str, Any], float]:
    manifest = tmp_path / "batch.yaml"
    manifest.write_text(MANIFEST, encoding="utf-8")
    submitted = batches.submit_manifest(manifest, settings)
    started = time.monotonic()
    report, _stats = process_batch(submitted.batch_id, settings, show_progress=False, serve_metrics=False)
    return dict(report), time.monotonic() - started


def test_waiting_at_fal_reads_the_batch_only_now_and_then(
    settings: Settings, tmp_path: Path, reads: list[float]
) -> None:
    report, wall = _run(settings, tmp_path)
    assert report["finished"] == report["total"] == JOBS
    assert report["counts"].get("succeeded") == JOBS, report["counts"]
    # Before: every 0.5 s of the wait, as the refresh's budget allowed (10 on a loaded machine,
    # up to 20). Now:
    # one per REFRESH_UNCHANGED_SECONDS of the wait, and one per moment something happened in
    # the run (the claims and submits, the requests starting and ending, the downloads).
    unchanged = wall / worker.running.REFRESH_UNCHANGED_SECONDS
    assert len(reads) <= unchanged + 5, (len(reads), wall)


def test_the_end_is_seen_without_waiting_for_the_safety_net(
    settings: Settings, tmp_path: Path, reads: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A safety net longer than the run: every read comes from something the run did, and the
    # batch's end (its last download ending) is seen at the next look, not a minute later.
    monkeypatch.setattr(worker.running, "REFRESH_UNCHANGED_SECONDS", 60.0)
    report, wall = _run(settings, tmp_path)
    assert report["finished"] == report["total"] == JOBS
    assert wall < 60.0, wall
    assert len(reads) <= 6, len(reads)


def test_a_run_showing_nothing_reads_in_full_only_when_its_end_is_in_sight(
    tmp_path: Path, sqlite_url: str, reads: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Jobs completing all the time: each completion changes what the run knows, so a run that
    # shows a progress line reads it again at every look (up to twice a second). Shown nothing
    # (--no-progress), the run reads one statement instead (jobs.store.batch_pulse) while the
    # batch is active with jobs unfinished: in full once at the start, at its end, and every
    # REFRESH_UNCHANGED_SECONDS (made longer than the run here).
    monkeypatch.setattr(worker.running, "REFRESH_UNCHANGED_SECONDS", 60.0)
    # Every look may read (a loaded machine's slow reads would otherwise space them out).
    monkeypatch.setattr(worker.running, "RefreshBudget", _NoBudget)
    pulses: list[float] = []
    real_pulse = store.batch_pulse

    def counted_pulse(*args: Any, **kwargs: Any) -> Any:
        pulses.append(time.monotonic())
        return real_pulse(*args, **kwargs)

    monkeypatch.setattr(store, "batch_pulse", counted_pulse)
    jobs = 16
    report, wall, started = drain_embedded(
        tmp_path, sqlite_url, monkeypatch, jobs=jobs, latency=0.4, concurrency=2
    )
    assert report["finished"] == report["total"] == jobs
    assert report["counts"].get("succeeded") == jobs, report["counts"]
    assert wall > 3.0, wall  # 8 rounds of 0.4 s at fal: many looks, many changes
    assert len(reads) <= 3, (len(reads), len(pulses), wall)  # in full: the start and the end
    assert len(pulses) >= 2, (len(pulses), wall)  # the other looks read the pulse
    # The end is seen at the next look (the pulse finds no unfinished job), not at the safety net.
    assert reads[-1] - started < wall, (reads, wall)


class _NoBudget(worker.running.RefreshBudget):
    """A refresh budget that lets every look read."""

    def due(self, now: float) -> bool:
        return True

    def spent(self, started: float, ended: float) -> None:
        pass


def test_the_progress_of_a_run_showing_nothing_decides_its_end_as_the_shown_one(
    settings: Settings, tmp_path: Path
) -> None:
    # A finished batch read both ways: the same state, counts, money and schedule (what decides
    # whether a run ends); the forecast and the notes, which only a display shows, left blank.
    report, _wall = _run(settings, tmp_path)
    engine = open_engine(settings)
    with db.read_scope(engine) as session:
        shown = batches.batch_progress(session, report["batch"])
        unshown = batches.batch_progress(session, report["batch"], shown=False)
    blank = {"standing", "processing", "eta_seconds", "eta_note", "proof_wait_note", "elsewhere_waiting_note"}
    assert {k: v for k, v in unshown.items() if k not in blank} == {
        k: v for k, v in shown.items() if k not in blank
    }
    assert (unshown["standing"], unshown["eta_seconds"], unshown["eta_note"]) == ("", None, None)
    assert unshown["finished"] == unshown["total"] == JOBS
