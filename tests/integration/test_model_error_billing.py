"""Model errors below HTTP 500 after GPU time are billed — by fal, by the simulator, and by us.

fal's FAQ (https://fal.ai/docs/model-apis/faq): "Server errors (HTTP 500+) are never charged.
Client-side errors like invalid inputs (HTTP 422) may still be charged if a runner spent GPU
time." A request that ends with fal's ``error_type`` ``bad_request`` (HTTP 400) after a runner
worked on it (its status reports ``metrics.inference_time``) is such an error. It used to count
$0 in wanbatch's books, so ``cost`` under-reported, and ``budget.max_usd`` let more jobs go to fal
than it had room for. Checked against the simulator's ledger, not against our own books.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import batches
from jobs.settings import Settings, get_settings
from tests.in_process import run_main
from worker.running import process_batch

FOUR = """
name: model-errors
endpoint: fal-ai/wan-22
defaults:
  resolution: 480p
items:
  - prompt: A paper boat drifting down a rainy street
  - prompt: A red kite over a green hill
  - prompt: A lighthouse in the fog at dusk
  - prompt: A fox crossing a snowy field
"""

# 5 jobs × $0.2025 (wan-22, 480p): a $0.41 cap has room for two.
CAPPED = """
name: model-errors-capped
endpoint: fal-ai/wan-22
budget:
  max_usd: 0.41
defaults:
  resolution: 480p
items:
  - prompt: A paper boat drifting down a rainy street
  - prompt: A red kite over a green hill
  - prompt: A lighthouse in the fog at dusk
  - prompt: A fox crossing a snowy field
  - prompt: A tram in the evening rain
"""
CAP = Decimal("0.41")


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(
        SimulatorOptions(latency_seconds=0.1, latency_jitter=0.0, concurrency_limit=4, rng_seed=11)
    ) as handle:
        yield handle


@pytest.fixture
def settings(
    sim: SimulatorHandle, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    sim.reset()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", sqlite_url)  # for the CLI commands run in this process
    get_settings.cache_clear()
    yield Settings(
        database_url=sqlite_url,
        FAL_KEY=SecretStr("model-error-key-4c2a"),
        fal_queue_url=sim.url,
        fal_rest_url=sim.url,
        output_dir=tmp_path / "outputs",
        poll_min_interval=0.05,
        poll_max_interval=0.2,
        tick_interval=0.05,
        retry_base_delay=0,
        submit_rate=100,
        max_outstanding=4,
        max_attempts=3,
    )
    get_settings.cache_clear()


def _manifest(folder: Path, body: str) -> Path:
    path = folder / "batch.yaml"
    path.write_text(body, encoding="utf-8")
    return path


def _cli_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str
) -> dict[str, Any]:
    capsys.readouterr()
    code = run_main([*argv, "--json"], monkeypatch)
    out = capsys.readouterr().out
    assert code in (0, 1), out
    parsed: dict[str, Any] = json.loads(out)
    return parsed


def test_bad_request_after_inference_is_billed_as_the_simulator_bills_it(
    sim: SimulatorHandle,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    submitted = batches.submit_manifest(_manifest(tmp_path, FOUR), settings)
    sim.set_faults(model_error={"next": 3, "error_type": "bad_request"})

    report, _stats = process_batch(submitted.batch_id, settings, show_progress=False)
    assert report["finished"] == report["total"] == 4

    ledger = sim.ledger()
    errors = [e for e in ledger["entries"] if e["outcome"] == "error"]
    assert len(errors) == 3
    assert all(e["status_code"] == 400 and e["error_type"] == "bad_request" for e in errors)
    assert all(e["billed"] for e in errors)  # the runner spent time on each: fal bills it
    errors_usd = sum((Decimal(e["usd"]) for e in errors), Decimal(0))
    assert errors_usd > 0

    cost = _cli_json(monkeypatch, capsys, "cost", submitted.batch_id)
    total = cost["total"]
    billed = Decimal(ledger["billed_usd"])
    assert total["failed"] == 3
    assert total["succeeded"] == 1
    assert Decimal(str(total["actual_usd"])) == billed > 0
    # The three failures bought no output: they are the waste, and they are not $0.
    assert Decimal(str(total["wasted_usd"])) == errors_usd

    status = _cli_json(monkeypatch, capsys, "status", submitted.batch_id)
    assert Decimal(str(status["spent_usd"])) == billed


def test_billed_model_errors_count_against_the_batch_budget(
    sim: SimulatorHandle,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # One request at fal at a time, each ending in a billed 400: the cap has room for two.
    capped = settings.model_copy(update={"max_outstanding": 1})
    submitted = batches.submit_manifest(_manifest(tmp_path, CAPPED), capped)
    sim.set_faults(model_error={"probability": 1.0, "error_type": "bad_request"})
    try:
        report, _stats = process_batch(submitted.batch_id, capped, show_progress=False)
    finally:
        sim.set_faults(model_error={"probability": 0.0})
    assert report["finished"] == report["total"] == 5

    ledger = sim.ledger()
    billed = Decimal(ledger["billed_usd"])
    assert 0 < billed <= CAP, ledger["billed_usd"]
    assert ledger["accepted"] == 2

    status = _cli_json(monkeypatch, capsys, "status", submitted.batch_id)
    assert Decimal(str(status["spent_usd"])) == billed
    assert status["counts"]["failed"] == 2
    assert status["counts"]["cancelled"] == 3
