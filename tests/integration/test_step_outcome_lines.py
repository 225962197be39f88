"""A step's line says what happened to the job, and why: a job that failed for good is logged
``failed`` (not ``retry``), once, at WARNING (an embedded ``run`` logs warnings only), with its
``error`` and ``error_type``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import batches
from jobs.settings import Settings, get_settings
from worker.running import process_batch

SIX = "name: outcome-lines\nendpoint: fal-ai/wan-22\ndefaults:\n  resolution: 480p\nitems:\n" + "".join(
    f"  - prompt: A paper boat number {i}\n" for i in range(6)
)


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(
        SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0, concurrency_limit=4, rng_seed=5)
    ) as handle:
        yield handle


def test_a_job_that_failed_for_good_has_one_warning_line_saying_why(
    sim: SimulatorHandle,
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    settings = Settings(
        database_url=sqlite_url,
        FAL_KEY=SecretStr("outcome-lines-key-7d1e"),
        fal_queue_url=sim.url,
        fal_rest_url=sim.url,
        output_dir=tmp_path / "outputs",
        poll_min_interval=0.05,
        poll_max_interval=0.2,
        tick_interval=0.05,
        retry_base_delay=0,
        submit_rate=100,
        max_outstanding=4,
        max_attempts=2,
    )
    manifest = tmp_path / "batch.yaml"
    manifest.write_text(SIX, encoding="utf-8")
    submitted = batches.submit_manifest(manifest, settings)
    sim.set_faults(submit_503={"probability": 1.0})  # runner_scheduling_failure, retryable
    caplog.set_level(logging.WARNING)  # as an embedded `run` logs
    try:
        report, _stats = process_batch(submitted.batch_id, settings, show_progress=False)
    finally:
        get_settings.cache_clear()
    assert report["finished"] == report["total"] == 6
    steps = [r for r in caplog.records if getattr(r, "event", "").startswith("job.")]
    assert all(r.levelno == logging.WARNING and r.outcome == "failed" for r in steps)  # type: ignore[attr-defined]
    by_job = sorted(r.job_id for r in steps)  # type: ignore[attr-defined]
    assert len(by_job) == len(set(by_job)) == 6  # one line per failed job, no more
    for r in steps:
        assert r.event == "job.submit"  # type: ignore[attr-defined]
        assert r.error_type == "runner_scheduling_failure"  # type: ignore[attr-defined]
        assert r.error.startswith("after 2 attempt(s): HTTP 503")  # type: ignore[attr-defined]
        assert "runner_scheduling_failure" in r.getMessage()


@pytest.mark.parametrize(
    ("policy", "outcome", "level"), [("fail", "failed", logging.WARNING), ("resubmit", "retry", logging.INFO)]
)
def test_an_ambiguous_submit_the_policy_settles_at_once_is_logged_as_what_it_became(
    sim: SimulatorHandle,
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    policy: str,
    outcome: str,
    level: int,
) -> None:
    """The POST's answer is lost (the simulator queues the request, then resets the connection)
    and no webhook receiver is configured, so nothing can prove the outcome later:
    ``WANBATCH_SUBMIT_UNKNOWN_POLICY`` settles it at once. Its step line said ``ambiguous`` at
    INFO — under ``fail`` a job that had failed for good, which ``run`` (warnings only) never
    named. Now it is ``failed``, at WARNING, once, with ``error`` and ``error_type`` (as
    :func:`worker.steps.failures.settle`'s failures); under ``resubmit``, ``retry``."""
    monkeypatch.setenv("WANBATCH_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    settings = Settings(
        database_url=sqlite_url,
        FAL_KEY=SecretStr("outcome-lines-key-7d1e"),
        fal_queue_url=sim.url,
        fal_rest_url=sim.url,
        output_dir=tmp_path / "outputs",
        poll_min_interval=0.05,
        poll_max_interval=0.2,
        tick_interval=0.05,
        retry_base_delay=0,
        submit_rate=100,
        max_outstanding=4,
        max_attempts=2,
        submit_unknown_policy=policy,
    )
    assert not settings.webhook_url
    manifest = tmp_path / "batch.yaml"
    manifest.write_text(SIX, encoding="utf-8")
    submitted = batches.submit_manifest(manifest, settings)
    sim.set_faults(submit_drop={"probability": 1.0})
    caplog.set_level(logging.INFO)
    try:
        report, _stats = process_batch(submitted.batch_id, settings, show_progress=False)
    finally:
        get_settings.cache_clear()
    assert report["finished"] == report["total"] == 6
    assert report["counts"]["failed"] == 6
    steps = [r for r in caplog.records if getattr(r, "event", "") == "job.submit"]
    assert steps, caplog.text
    assert not [r for r in steps if r.outcome == "ambiguous"]  # type: ignore[attr-defined]
    firsts = [r for r in steps if r.outcome == outcome]  # type: ignore[attr-defined]
    assert firsts
    assert all(r.levelno == level for r in firsts)
    ended = [r for r in steps if r.outcome == "failed"]  # type: ignore[attr-defined]
    assert sorted(r.job_id for r in ended) == sorted({r.job_id for r in ended})  # type: ignore[attr-defined]
    assert len(ended) == 6  # one WARNING per job, whatever attempt it ended on
    for r in ended:
        assert r.levelno == logging.WARNING
        assert r.error_type == "submit_unknown"  # type: ignore[attr-defined]
        assert r.error.startswith("submission outcome unknown (")  # type: ignore[attr-defined]
        assert "WANBATCH_WEBHOOK_URL" in r.error  # type: ignore[attr-defined]
        assert "submit_unknown" in r.getMessage()
