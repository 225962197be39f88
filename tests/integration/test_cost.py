"""Cost truth and budget caps, checked against the simulator's billing ledger (not our own books).

* A mixed 5-endpoint batch with billed 422s and unbilled model errors: ``wanbatch cost`` equals
  the simulator's billed ledger to the cent, in total and per endpoint.
* A batch whose ``budget.max_usd`` is below its estimate spends no more than the cap (per the
  ledger), ends with the rest ``cancelled`` for budget, and ``status`` says so.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from cli import cli
from cli.output import daily_cap_origin, money_line
from falsim.ledger import LedgerReport
from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import batches, db, estimates, store
from jobs.billing import Outcome, classify_failure, load_rules
from jobs.cost import cost_report
from jobs.pricing import estimate_job, unit_symbol
from jobs.settings import Settings, get_settings
from jobs.states import JobState
from worker.running import process_batch

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"
CENT = Decimal("0.01")

MIXED = """
name: {name}
defaults:
  resolution: 480p
items:
  - {{endpoint: fal-ai/wan-i2v, prompt: a lake at dawn, image_url: images/landscape.jpg}}
  - {{endpoint: fal-ai/wan-i2v, prompt: a lake at dusk, image_url: images/landscape.jpg, resolution: 720p}}
  - {{endpoint: fal-ai/wan-i2v, prompt: a lake at noon, image_url: images/landscape.jpg, num_frames: 100}}
  - {{endpoint: fal-ai/wan-flf2v, prompt: day to night, start_image_url: images/landscape.jpg,
      end_image_url: images/night.jpg}}
  - {{endpoint: fal-ai/wan-flf2v, prompt: night to day, start_image_url: images/night.jpg,
      end_image_url: images/landscape.jpg, resolution: 720p}}
  - {{endpoint: fal-ai/wan-22, prompt: a paper boat in the rain}}
  - {{endpoint: fal-ai/wan-22, prompt: a paper boat in the sun, resolution: 720p}}
  - {{endpoint: fal-ai/wan-25-preview/image-to-video, prompt: clouds, image_url: images/landscape.jpg}}
  - {{endpoint: fal-ai/wan-25-preview/image-to-video, prompt: stars, image_url: images/night.jpg,
      resolution: 1080p, duration: "10"}}
  - {{endpoint: wan/v2.6/image-to-video, prompt: a slow pan, image_url: images/landscape.jpg,
      resolution: 720p}}
  - {{endpoint: wan/v2.6/image-to-video, prompt: a fast pan, image_url: images/night.jpg, resolution: 1080p}}
  - {{endpoint: fal-ai/wan-i2v, prompt: one more, image_url: images/square.png}}
"""


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(
        SimulatorOptions(latency_seconds=0.1, latency_jitter=0.0, concurrency_limit=40, rng_seed=7)
    ) as handle:
        yield handle


@pytest.fixture
def settings(
    sim: SimulatorHandle, new_pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    sim.reset()
    db = new_pg_database()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", db)  # for the CLI commands run in this process
    get_settings.cache_clear()
    yield Settings(
        database_url=db,
        FAL_KEY=SecretStr("cost-test-key-9b1e"),
        fal_queue_url=sim.url,
        fal_rest_url=sim.url,
        output_dir=tmp_path / "outputs",
        poll_min_interval=0.05,
        poll_max_interval=0.2,
        tick_interval=0.05,
        retry_base_delay=0,
        submit_rate=100,
        max_outstanding=20,
        max_attempts=5,
    )
    get_settings.cache_clear()


def _manifest(folder: Path, body: str) -> Path:
    shutil.copytree(EXAMPLES / "images", folder / "images", dirs_exist_ok=True)
    path = folder / "batch.yaml"
    path.write_text(body, encoding="utf-8")
    return path


def _billed_by_endpoint(ledger: LedgerReport) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for entry in ledger["entries"]:
        if entry["billed"]:
            out[entry["endpoint"]] = out.get(entry["endpoint"], Decimal(0)) + Decimal(entry["usd"])
    return out


def _cli_json(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, list(args), prog_name="wanbatch")
    assert result.exit_code == 0, result.output
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_billing_rules_are_data_and_cover_every_outcome() -> None:
    rules = load_rules()
    assert set(rules) == set(Outcome)
    assert rules[Outcome.SERVER_ERROR] == 0
    assert rules[Outcome.SUCCEEDED] == 1
    assert classify_failure(503, "runner_disconnected", {"inference_time": 2.0}) == Outcome.SERVER_ERROR
    assert classify_failure(422, None, {"inference_time": 0.3}) == Outcome.VALIDATION_ERROR_AFTER_INFERENCE
    assert classify_failure(422, None, {"inference_time": None}) == Outcome.VALIDATION_ERROR
    assert classify_failure(499, "client_cancelled", {"inference_time": None}) == Outcome.CANCELLED_IN_QUEUE


def test_cost_report_equals_the_simulators_billed_ledger(
    sim: SimulatorHandle, settings: Settings, tmp_path: Path
) -> None:
    path = _manifest(tmp_path, MIXED.format(name="cost-truth"))
    submitted = batches.submit_manifest(path, settings)
    # Two jobs whose input the runner rejects (422 after GPU time: billed), stored directly as
    # if validation had missed it — the case fal warns "may still be charged".
    engine = db.open_engine(settings)
    with db.session_scope(engine) as session:
        bad: list[store.NewJob] = []
        for i, (endpoint, resolved) in enumerate(
            [
                ("fal-ai/wan-i2v", {"image_url": "https://example.com/a.png", "resolution": "720p"}),
                ("fal-ai/wan-22", {"resolution": "480p"}),
            ]
        ):
            est = estimate_job(endpoint, resolved, settings)
            bad.append(store.NewJob(f"bad-{i}", 100 + i, endpoint, resolved, est.billing_units, est.usd))
        store.add_jobs(session, submitted.batch_id, bad)
    # Model errors: 3 runs die with a 503 (never billed; retried as new requests) and 1 ends in
    # a 400 from the model (final; not billed by the simulator, nor by our rules).
    sim.set_faults(model_error={"next": 3, "error_type": "runner_disconnected"})

    report, _stats = process_batch(submitted.batch_id, settings, show_progress=False)
    assert report["finished"] == report["total"] == 14

    ledger = sim.ledger()
    assert ledger["accepted"] >= 14 + 3  # the retried attempts are separate, unbilled requests
    assert sum(1 for e in ledger["entries"] if e["outcome"] == "invalid" and e["billed"]) == 2
    assert sum(1 for e in ledger["entries"] if e["outcome"] == "error" and not e["billed"]) == 3

    data = _cli_json("cost", submitted.batch_id, "--json")
    total = data["total"]
    billed = Decimal(ledger["billed_usd"])
    assert billed > 0
    # JSON money is a number (jobs.money.usd_json); read back through str it is exact.
    assert Decimal(str(total["actual_usd"])).quantize(CENT) == billed.quantize(CENT)
    assert Decimal(str(total["actual_usd"])) == billed  # exact, not just to the cent
    # Five endpoints bill in seconds or in per-video units: no one total of units, one per unit.
    assert total["actual_units"] is None
    billed_units: dict[str, Decimal] = {}
    for entry in ledger["entries"]:
        if entry["billed"]:
            unit = unit_symbol(entry["endpoint"])
            billed_units[unit] = billed_units.get(unit, Decimal(0)) + Decimal(entry["billing_units"])
    assert {u: Decimal(str(n)) for u, n in total["actual_units_by_unit"].items()} == billed_units
    by_endpoint: dict[str, Decimal] = {}
    for line in data["by_endpoint"]:
        by_endpoint[line["endpoint"]] = by_endpoint.get(line["endpoint"], Decimal(0)) + Decimal(
            str(line["actual_usd"])
        )
    assert by_endpoint == _billed_by_endpoint(ledger)
    assert len(by_endpoint) == 5
    resolutions = {(line["endpoint"], line["resolution"]) for line in data["by_endpoint"]}
    assert ("fal-ai/wan-i2v", "720p") in resolutions
    assert ("wan/v2.6/image-to-video", "1080p") in resolutions
    # The billed 422s are waste: paid for, no output.
    invalid_usd = sum((Decimal(e["usd"]) for e in ledger["entries"] if e["outcome"] == "invalid"), Decimal(0))
    assert Decimal(str(total["wasted_usd"])) == invalid_usd > 0
    assert total["failed"] == 2
    assert total["succeeded"] == 12
    # status carries the same truth, and the human table prints.
    status = _cli_json("status", submitted.batch_id, "--json")
    assert Decimal(str(status["actual_usd"])).quantize(CENT) == billed.quantize(CENT)
    assert Decimal(str(status["wasted_usd"])).quantize(CENT) == invalid_usd.quantize(CENT)
    table = CliRunner().invoke(cli, ["cost", "cost-truth"], prog_name="wanbatch")
    assert table.exit_code == 0
    assert "total" in table.stdout
    assert f"${billed:.2f}" in table.stdout


BUDGET = """
name: {name}
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  image_url: images/landscape.jpg
matrix:
  seed: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
items:
  - prompt: a budget test
budget:
  max_usd: {cap}
"""


def test_budget_cap_holds_per_the_ledger_and_status_says_so(
    sim: SimulatorHandle, settings: Settings, tmp_path: Path
) -> None:
    # 10 jobs × $0.20 = $2.00 estimated; the cap allows 7.
    path = _manifest(tmp_path, BUDGET.format(name="budget-cap", cap="1.50"))
    _report, totals = estimates.estimate_manifest(path, settings)
    assert totals.usd == Decimal("2.0")
    submitted = batches.submit_manifest(path, settings)
    report, _stats = process_batch(submitted.batch_id, settings, show_progress=False)

    ledger = sim.ledger()
    assert Decimal(ledger["billed_usd"]) <= Decimal("1.50")
    assert ledger["accepted"] == 7
    assert report["counts"]["succeeded"] == 7
    assert report["counts"]["cancelled"] == 3
    assert report["cancelled_for_budget"] == 3
    assert "3 job(s) cancelled: budget cap reached" in money_line(report)
    assert "--failed-only --max-usd AMOUNT`" in money_line(report)  # the batch's own cap: a new one helps
    assert report["cancelled_for_daily_budget"] == 0
    assert Decimal(str(report["spent_usd"])) == Decimal(ledger["billed_usd"])
    with db.session_scope(db.open_engine(settings)) as session:
        cancelled = list(store.jobs_of_batch(session, submitted.batch_id, states=[JobState.CANCELLED]))
        assert {j.error_type for j in cancelled} == {"budget"}
        assert all("cap" in (j.error or "") for j in cancelled)
        assert cost_report(session, submitted.batch_id).total.cancelled_for_budget == 3
    status = _cli_json("status", "budget-cap", "--json")
    assert status["cancelled_for_budget"] == 3


def test_daily_budget_spans_batches(sim: SimulatorHandle, settings: Settings, tmp_path: Path) -> None:
    daily = settings.model_copy(update={"daily_budget_usd": Decimal("1.00")})
    first = batches.submit_manifest(_manifest(tmp_path / "a", BUDGET.format(name="day-a", cap="10")), daily)
    process_batch(first.batch_id, daily, show_progress=False)
    second = batches.submit_manifest(_manifest(tmp_path / "b", BUDGET.format(name="day-b", cap="10")), daily)
    report, _ = process_batch(second.batch_id, daily, show_progress=False)
    ledger = sim.ledger()
    assert Decimal(ledger["billed_usd"]) <= Decimal("1.00")
    assert ledger["accepted"] == 5
    assert report["cancelled_for_budget"] == 10
    # The day's cap, not the batch's: its own error type, and advice a new --max-usd cannot follow.
    assert report["cancelled_for_daily_budget"] == 10
    advice = money_line(report)
    assert "--max-usd" not in advice
    assert "10 by today's cap (WANBATCH_DAILY_BUDGET_USD): raise it, or wait for the next UTC day" in advice
    with db.read_scope(db.open_engine(daily)) as session:
        cancelled = list(store.jobs_of_batch(session, second.batch_id, states=[JobState.CANCELLED]))
        kinds = {j.error_type for j in cancelled}
        whose = {j.error.split("; ", 1)[1] for j in cancelled if j.error}
    assert kinds == {"daily_budget"}
    # Most of the day's $1.00 is the first batch's: each refusal says whose.
    (held,) = whose
    assert held.endswith(" of it by other batches: day-a)")
    # Another shell, with no daily cap of its own, reads the batch: the cap in force was the run's.
    unset = settings.model_copy(update={"daily_budget_usd": None, "broker_url": None})
    where = daily_cap_origin(unset, report)
    assert where == (
        "the cap in force was $1.00 (the run's setting); this shell's is unset: "
        "raise it where the batch is run"
    )
    assert f"10 by today's cap (WANBATCH_DAILY_BUDGET_USD): {where}" in money_line(
        report, daily_cap_from=where
    )
    assert daily_cap_origin(daily.model_copy(update={"broker_url": None}), report) is None  # the run's own


@pytest.mark.parametrize("policy", ["fail", "resubmit"])
def test_budget_cap_holds_when_submit_answers_are_lost(
    sim: SimulatorHandle, settings: Settings, tmp_path: Path, policy: str
) -> None:
    # 10 jobs × $0.20; the cap admits 5 at once. fal accepts (and bills) the first 5 submits
    # but their answers are lost: each may have been billed, so each keeps counting against
    # the cap. Before, a failed or resent ambiguous submit freed its share and 5 more were
    # sent: fal billed $2.00 against a $1.10 cap while `status` said $1.00.
    ambiguous = settings.model_copy(update={"submit_unknown_policy": policy})
    path = _manifest(tmp_path, BUDGET.format(name=f"budget-lost-{policy}", cap="1.10"))
    submitted = batches.submit_manifest(path, ambiguous)
    sim.set_faults(submit_drop={"next": 5})
    report, _stats = process_batch(submitted.batch_id, ambiguous, show_progress=False)

    ledger = sim.ledger()
    assert ledger["accepted"] == 5
    assert Decimal(ledger["billed_usd"]) <= Decimal("1.10")
    # What fal may have billed is what the books say was spent, and it is said apart.
    assert Decimal(str(report["spent_usd"])) == Decimal(ledger["billed_usd"]) == Decimal("1.00")
    assert Decimal(str(report["possibly_billed_usd"])) == Decimal("1.00")
    assert report["cancelled_for_budget"] == (5 if policy == "fail" else 10)
    assert "$1.00 of it possibly billed" in money_line(report)
    with db.session_scope(db.open_engine(settings)) as session:
        assert store.batch_committed_usd(session, submitted.batch_id) == Decimal("1.00")
        assert cost_report(session, submitted.batch_id).total.possibly_billed_usd == Decimal("1.00")
    status = _cli_json("status", f"budget-lost-{policy}", "--json")
    assert status["possibly_billed_usd"] == 1.0
    # `cost` says it once: resent submits are among the possibly billed, not a second sum to add.
    table = CliRunner().invoke(cli, ["cost", f"budget-lost-{policy}"], prog_name="wanbatch")
    assert "possibly billed: up to $1.00 more than actual" in table.stdout
    assert table.stdout.count("more than actual") == 1


def test_cost_counts_jobs_not_sent_yet_apart_from_those_in_flight(settings: Settings, tmp_path: Path) -> None:
    batches.submit_manifest(_manifest(tmp_path, BUDGET.format(name="not-yet", cap="10")), settings)

    total = _cli_json("cost", "not-yet", "--json")["total"]
    status = _cli_json("status", "not-yet", "--json")

    assert (total["in_flight"], total["waiting"]) == (0, 10)
    assert total["in_flight"] == status["in_flight"]  # the two commands agree
    table = CliRunner().invoke(cli, ["cost", "not-yet"], prog_name="wanbatch")
    assert "10 job(s) not finished (10 not sent yet): actual is not final yet" in table.stdout


SUB_CENT = """
name: sub-cent
endpoint: fal-ai/wan-22
items:
  - {prompt: a fox, resolution: 480p, num_frames: 121}
  - {prompt: a fox, resolution: 580p, num_frames: 100}
  - {prompt: a fox, resolution: 720p}
"""


def test_cost_says_when_its_rounded_lines_do_not_add_up(settings: Settings, tmp_path: Path) -> None:
    """wan-2.2's prices have fractions of a cent ($0.3025, $0.375, $0.405): the lines read $0.30,
    $0.38 and $0.41 ($1.09), the exact total $1.0825 reads $1.08. Each is rounded as the README
    says; the table says why they do not add up."""
    batches.submit_manifest(_manifest(tmp_path, SUB_CENT), settings)
    table = CliRunner().invoke(cli, ["cost", "sub-cent"], prog_name="wanbatch")
    assert table.exit_code == 0, table.output
    for line in ("$0.30", "$0.38", "$0.41", "$1.08"):
        assert line in table.stdout
    assert "lines are rounded to the cent; the total is the exact sum, rounded (estimated)" in " ".join(
        table.stdout.split()
    )
