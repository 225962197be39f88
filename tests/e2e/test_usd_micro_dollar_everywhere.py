"""One job's cost is one JSON number everywhere: half up to the micro-dollar (``usd_json``).

With a price of more than six decimals (``WANBATCH_PRICING_OVERRIDES``) a job's exact cost has
more places than JSON output shows. ``cost --json`` and ``status --json`` rounded it half up to
the micro-dollar (README, **Money**), but ``export`` (jsonl, csv, parquet, hf) wrote the exact
value and ``diff --json`` rounded half to even: three answers for one job. 97 frames at 16 fps
are 6.0625 s; at $0.097 a second that is $0.5880625 — 0.588063 half up, 0.588062 half even.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.e2e.e2e_helpers import FAST_ENV, MakeManifest
from tests.in_process import run_main

BODY = """\
name: micro
endpoint: fal-ai/wan-22
defaults:
  resolution: 480p
  num_frames: 97
items:
  - prompt: A paper boat in the rain
    seed: 7
"""

ROUNDED = 0.588063


def _json(
    argv: list[str], code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    assert run_main([*argv, "--json"], monkeypatch) == code
    return json.loads(capsys.readouterr().out)


def test_a_jobs_cost_is_the_same_micro_dollar_figure_in_every_output(
    manifest: MakeManifest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANBATCH_PRICING_OVERRIDES", '{"fal-ai/wan-22": {"usd_per_unit": 0.097}}')
    path = manifest("micro", BODY)

    estimate = _json(["estimate", str(path)], 0, monkeypatch, capsys)
    assert estimate["usd"] == ROUNDED
    batch = _json(["run", "--simulate", "--no-progress", str(path)], 0, monkeypatch, capsys)["batch"]

    cost = _json(["cost", batch], 0, monkeypatch, capsys)
    assert (cost["total"]["actual_usd"], cost["total"]["estimated_usd"]) == (ROUNDED, ROUNDED)
    status = _json(["status", batch], 0, monkeypatch, capsys)
    assert (status["spent_usd"], status["estimated_usd"]) == (ROUNDED, ROUNDED)

    jsonl = tmp_path / "micro.jsonl"
    assert run_main(["export", batch, "--format", "jsonl", "-o", str(jsonl)], monkeypatch) == 0
    (row,) = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert (row["cost_usd"], row["est_usd"]) == (ROUNDED, ROUNDED)

    table = tmp_path / "micro.csv"
    assert run_main(["export", batch, "--format", "csv", "-o", str(table)], monkeypatch) == 0
    with table.open(newline="", encoding="utf-8") as fh:
        (cells,) = list(csv.DictReader(fh))
    assert (cells["cost_usd"], cells["est_usd"]) == (str(ROUNDED), str(ROUNDED))

    parquet = tmp_path / "micro.parquet"
    assert run_main(["export", batch, "--format", "parquet", "-o", str(parquet)], monkeypatch) == 0
    (stored,) = pq.read_table(parquet, columns=["cost_usd", "est_usd"]).to_pylist()
    assert stored == {"cost_usd": ROUNDED, "est_usd": ROUNDED}

    diff = _json(["diff", batch, batch], 0, monkeypatch, capsys)
    (pair,) = diff["jobs"]
    assert (pair["a"]["cost_usd"], pair["b"]["cost_usd"]) == (ROUNDED, ROUNDED)
