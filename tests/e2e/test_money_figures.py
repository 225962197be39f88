"""Money figures that tell the truth: prices corrected after a submit, cap messages whose two
amounts round to one text, and money an export had hidden (possibly billed).

1. A price correction (``WANBATCH_PRICING_OVERRIDES``) made after ``submit`` was ignored for the
   stored jobs: ``estimate`` warned that about 3 of 10 jobs fit a $2.00 cap, ``run`` sent 9
   ("estimated $2.03") and the cap let about 2.3 times the money through. Jobs not yet sent are
   priced with the prices in force when they are submitted again, or when they are sent.
2. ``the estimate $1.01 exceeds budget.max_usd $1.01``: cents alone cannot tell two amounts
   apart that a cap compares; such messages show as many decimals as that takes.
3. ``status`` said "$1.00 possibly billed", the export said the same jobs were cancelled with no
   cost and nothing about it: each record has ``possibly_billed_usd``, and its error says that
   the job had been sent.
"""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl

# wan-2.2 at 480p: 5.0625 billing units a video, $0.04 a unit by the registry (an assumption it
# marks): $0.2025 a job; at a corrected $0.10 a unit, $0.50625.
W22 = """\
name: {name}
endpoint: fal-ai/wan-22
defaults:
  resolution: 480p
matrix:
  seed: [{seeds}]
items:
  - prompt: a harbour at dusk
budget:
  max_usd: {cap}
"""
CORRECTED = '{"fal-ai/wan-22": {"usd_per_unit": 0.10}}'


@pytest.fixture
def any_db(db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both dialects (a price table is found again by its stored JSON's text on each); through
    ``engine``, which empties the shared PostgreSQL database after."""
    monkeypatch.setenv("WANBATCH_DATABASE_URL", db_url)
    return db_url


def _w22(name: str, jobs: int, cap: str) -> str:
    return W22.format(name=name, seeds=", ".join(str(i) for i in range(1, jobs + 1)), cap=cap)


def test_a_price_corrected_after_submit_prices_the_jobs_not_sent_yet(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, any_db: str
) -> None:
    path = manifest("w22", _w22("w22", 10, "2.00"))
    assert wb("submit", path).code == 0
    monkeypatch.setenv("WANBATCH_PRICING_OVERRIDES", CORRECTED)
    estimate = wb("estimate", path)
    assert "only about 3 of 10 job(s) will run" in estimate.stderr

    run = wb("run", path, "--json", "--no-progress")

    assert run.code == 1, run.stderr  # the cap cancels the rest
    assert (
        "estimates of batch w22 changed with the prices in force: $2.03 → $5.06 "
        "(10 job(s) not sent yet priced again; jobs already sent keep theirs)"
    ) in " ".join(run.stderr.split())
    assert sim.ledger()["accepted"] == 3  # 3 × $0.50625 fit $2.00; before, 9 × $0.2025 did
    assert run.json()["counts"]["cancelled"] == 7
    records = export_jsonl(wb, "w22")
    assert {r["est_usd"] for r in records} == {0.50625}
    assert wb("status", "w22", "--json").json()["estimated_usd"] == 5.0625


def test_jobs_already_sent_keep_their_estimate_when_prices_change(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, any_db: str
) -> None:
    path = manifest("kept", _w22("kept", 2, "10"))
    assert wb("run", path, "--no-progress").code == 0
    path.write_text(_w22("kept", 4, "10"), encoding="utf-8")  # two more seeds
    monkeypatch.setenv("WANBATCH_PRICING_OVERRIDES", CORRECTED)

    submitted = wb("submit", path, "--json")

    assert submitted.code == 0, submitted.stderr
    assert "estimates of batch" not in submitted.stderr  # the new jobs were priced so at once
    assert submitted.json()["estimate_changed"] is None
    records = sorted(export_jsonl(wb, "kept"), key=lambda r: r["input"]["seed"])
    assert [r["est_usd"] for r in records] == [0.2025, 0.2025, 0.50625, 0.50625]


def test_the_prices_of_the_process_that_sends_count(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, any_db: str
) -> None:
    """A job is priced when it is sent by the prices of the process that decides to send it
    (in distributed mode a worker's ``WANBATCH_PRICING_OVERRIDES``), not only when the manifest is
    submitted again: ``run BATCH`` submits nothing."""
    path = manifest("by-name", _w22("by-name", 10, "2.00"))
    assert wb("submit", path).code == 0
    monkeypatch.setenv("WANBATCH_PRICING_OVERRIDES", CORRECTED)

    run = wb("run", "by-name", "--json", "--no-progress")

    assert sim.ledger()["accepted"] == 3
    assert run.json()["counts"]["cancelled"] == 7
    assert {r["est_usd"] for r in export_jsonl(wb, "by-name")} == {0.50625}


def test_cap_messages_tell_apart_two_amounts_one_cent_cannot(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    path = manifest("cents", _w22("cents", 5, "1.01"))  # 5 × $0.2025 = $1.0125

    estimate = wb("estimate", path)
    assert "the estimate $1.013 exceeds budget.max_usd $1.010" in " ".join(estimate.stderr.split())

    assert wb("run", path, "--no-progress").code == 1
    (cancelled,) = [r for r in export_jsonl(wb, "cents") if r["status"] == "cancelled"]
    assert cancelled["error"] == "budget: submitting would commit $1.013 of the batch's $1.010 cap"

    tiny = manifest("tiny", _w22("tiny", 1, "0.199999"))
    assert wb("run", tiny, "--no-progress").code == 1
    (only,) = export_jsonl(wb, "tiny")
    assert only["error"] == "budget: submitting would commit $0.203 of the batch's $0.200 cap"


# 10 jobs × $0.20; a $1.10 cap admits 5 at once.
I2V = """\
name: lost
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  image_url: images/landscape.jpg
matrix:
  seed: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
items:
  - prompt: a budget test
budget:
  max_usd: 1.10
"""


def test_an_export_carries_the_money_possibly_billed(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WANBATCH_SUBMIT_UNKNOWN_POLICY", "resubmit")
    sim.set_faults(submit_drop={"next": 5})  # fal accepts (and bills) the first 5; the answers are lost
    wb("run", manifest("lost", I2V), "--no-progress")
    status = wb("status", "lost", "--json").json()
    assert status["possibly_billed_usd"] == Decimal(sim.ledger()["billed_usd"]) == 1

    records = export_jsonl(wb, "lost")

    possibly = [r for r in records if r["possibly_billed_usd"] is not None]
    assert sum(Decimal(str(r["possibly_billed_usd"])) for r in possibly) == 1
    assert [r["possibly_billed_usd"] for r in possibly] == [0.2] * 5
    assert all(r["possibly_billed_usd"] is None for r in records if r not in possibly)
    for r in possibly:
        assert (r["status"], r["error_type"], r["cost_usd"]) == ("cancelled", "budget", None)
        assert "it had been sent: an earlier submit's outcome is unknown" in r["error"]
        assert "$0.20 possibly billed" in r["error"]
    never = [r for r in records if r not in possibly]
    assert never
    assert all("had been sent" not in r["error"] for r in never)

    table = wb("export", "lost", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(table.stdout)))
    assert sorted(row["possibly_billed_usd"] for row in rows) == [""] * 5 + ["0.2"] * 5
    parquet = tmp_path / "lost.parquet"
    assert wb("export", "lost", "--format", "parquet", "-o", parquet).code == 0
    column = pq.read_table(parquet, columns=["possibly_billed_usd"]).column(0)
    assert str(column.type) == "double"
    assert sorted(v for v in column.to_pylist() if v is not None) == [0.2] * 5
    folder = tmp_path / "hf"
    assert wb("export", "lost", "--format", "hf", "-o", folder, "--include", "failed").code == 0
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted((r["possibly_billed_usd"] or 0) for r in rows) == [0] * 5 + [0.2] * 5
