"""Changing a batch's budget is never silently ignored (issue #9, item 3).

Re-submitting a manifest applies its current ``budget.max_usd`` (lower, higher or removed), says
so on stderr and in ``submit --json`` (``budget_changed``), and the dispatcher — which reads the
cap from the batch row when it claims each job — honours the new value. ``rerun --max-usd`` gives
the new batch its own cap.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, counts

# 6 jobs × $0.20 = $1.20: a $5.00 cap lets every one through, a $1.00 cap exactly five.
SIX_JOBS = """\
name: sweep
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  num_frames: 81
matrix:
  seed: [1, 2, 3, 4, 5, 6]
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
{budget}"""


def _cap(wb: Wb) -> float | None:
    """The stored cap, as ``status`` reads it back from the batch row."""
    value: float | None = wb("status", "sweep", "--json").json()["budget_max_usd"]
    return value


def test_lowering_the_budget_and_submitting_again_applies_it(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    path = manifest("sweep", SIX_JOBS.format(budget="budget:\n  max_usd: 5.00\n"))
    first = wb("submit", path, "--json")
    assert first.code == 0, first.stderr
    assert first.json()["budget_changed"] is None
    assert _cap(wb) == 5.0

    path.write_text(SIX_JOBS.format(budget="budget:\n  max_usd: 1.00\n"))
    second = wb("submit", path, "--json")
    assert second.code == 0, second.stderr
    assert second.json()["budget_changed"] == {"from": 5.0, "to": 1.0}
    assert second.json()["budget_max_usd"] == 1.0
    assert "budget of batch sweep changed: $5.00 → $1.00" in second.stderr
    assert _cap(wb) == 1.0

    run = wb("run", path, "--json", "--no-progress")  # submits again (unchanged), then dispatches
    assert run.code == 1, run.stderr
    assert "changed" not in run.stderr
    report = run.json()
    assert report["budget_max_usd"] == 1.0
    assert report["counts"]["succeeded"] == 5
    assert report["counts"]["cancelled"] == 1
    assert report["cancelled_for_budget"] == 1
    assert sim.ledger()["accepted"] == 5  # the dispatcher used the new cap, not the first one
    assert Decimal(sim.ledger()["billed_usd"]) <= Decimal("1.00")


def test_removing_the_budget_removes_the_cap(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    path = manifest("sweep", SIX_JOBS.format(budget="budget:\n  max_usd: 0.50\n"))
    assert wb("submit", path).code == 0
    path.write_text(SIX_JOBS.format(budget=""))
    second = wb("submit", path, "--json")
    assert second.json()["budget_changed"] == {"from": 0.5, "to": None}
    assert "$0.50 → no cap" in second.stderr
    assert _cap(wb) is None
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 0, run.stderr
    assert run.json()["counts"]["succeeded"] == 6


def test_rerun_max_usd_gives_jobs_cancelled_by_the_cap_another_chance(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    path = manifest("sweep", SIX_JOBS.format(budget="budget:\n  max_usd: 0.60\n"))
    first = wb("run", path, "--json", "--no-progress")
    assert first.json()["counts"] == {**first.json()["counts"], "succeeded": 3, "cancelled": 3}
    assert "--max-usd AMOUNT" in wb("status", "sweep").stdout  # the advice names the option

    bad = wb("rerun", "sweep", "--failed-only", "--max-usd", "lots")
    assert bad.code == 2
    assert "--max-usd takes a positive amount" in bad.stderr
    assert counts(f"sqlite:///{tmp_path / 'wanbatch.db'}")[0] == 1  # no batch was made

    again = wb("rerun", "sweep", "--failed-only", "--max-usd", "1.00", "--json", "--no-progress")
    assert again.code == 0, again.stderr
    report = again.json()
    assert report["budget_max_usd"] == 1.0
    assert report["counts"]["succeeded"] == 3
    assert report["parent_batch"] == first.json()["batch"]


@pytest.mark.parametrize("cap", ["0.60", None])
def test_rerun_without_max_usd_keeps_the_parents_cap(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, cap: str | None
) -> None:
    budget = f"budget:\n  max_usd: {cap}\n" if cap else ""
    path = manifest("sweep", SIX_JOBS.format(budget=budget))
    assert wb("submit", path).code == 0
    rerun = wb("rerun", "sweep", "--json", "--no-progress")
    assert rerun.json()["budget_max_usd"] == (float(cap) if cap else None)
