"""Jobs a budget cancelled before they were sent export ``billing_units`` 0 beside ``cost_usd`` 0.

Export audit (session 34): every format showed ``cost_usd: 0.0`` and ``billing_units: null``
for them (CSV: ``0.0`` and an empty cell), while every other finished row had both. The store
now bills a job that ends unsent 0 units too (``tests/integration/test_unsent_billing_units.py``
covers each way of ending so), and migration 0025 mends the rows stored before.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl

#: Four $0.20 jobs under a $0.50 cap: two succeed, two are cancelled (budget) before being sent.
BUDGET = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  image_url: images/landscape.jpg
matrix:
  seed: [1, 2, 3, 4]
items:
  - prompt: budget
budget:
  max_usd: 0.5
"""


def test_jobs_cancelled_unsent_export_zero_units_in_every_format(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    run = wb("run", manifest("units-bud", BUDGET.format(name="units-bud")), "--json", "--no-progress")
    counts = run.json()["counts"]
    assert (counts["succeeded"], counts["cancelled"]) == (2, 2), run.stderr
    batch = run.json()["batch"]

    def billed(rows: list[dict[str, object]]) -> list[tuple[object, object, object]]:
        return sorted((str(r["status"]), r["cost_usd"], r["billing_units"]) for r in rows)

    expected = [("cancelled", 0.0, 0.0)] * 2 + [("succeeded", 0.2, 0.5)] * 2
    assert billed(export_jsonl(wb, batch)) == expected

    as_csv = wb("export", batch, "--format", "csv")
    assert as_csv.code == 0, as_csv.stderr
    cells = list(csv.DictReader(io.StringIO(as_csv.stdout)))  # an empty cell was the null
    numbers = [
        {**r, "cost_usd": float(r["cost_usd"]), "billing_units": float(r["billing_units"])} for r in cells
    ]
    assert billed(numbers) == expected

    target = tmp_path / "units.parquet"
    assert wb("export", batch, "--format", "parquet", "-o", target).code == 0
    assert billed(pq.read_table(target).to_pylist()) == expected

    folder = tmp_path / "hf"
    assert wb("export", batch, "--format", "hf", "-o", folder, "--include", "failed").code == 0
    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert billed([json.loads(line) for line in lines]) == expected
