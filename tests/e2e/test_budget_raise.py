"""Raising a batch's budget does what its message says, and a rerun never doubles the cap.

An audit ran 20 jobs × $0.20 under ``max_usd: 1.00`` (5 sent, 15 cancelled for budget), raised
the manifest to ``max_usd: 2.00`` and ran it again: stderr said the new cap "applies to every job
not yet sent", yet the 15 stayed cancelled and nothing was sent; the advised ``rerun
--failed-only`` then made a batch with a fresh $2.00 cap, and fal billed $3.00 for a manifest
that said $2.00. Now the jobs the old cap cancelled unsent are pending again (said, with how
many), and a ``--failed-only`` rerun's default cap is what is left of its parent's.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from falsim.server import SimulatorHandle
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import MakeManifest, Wb

#: ``{n}`` jobs × $0.20.
SWEEP = """\
name: raise
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  num_frames: 81
matrix:
  seed: [{seeds}]
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
budget:
  max_usd: {cap}
"""


def _sweep(jobs: int, cap: str) -> str:
    return SWEEP.format(seeds=", ".join(str(i + 1) for i in range(jobs)), cap=cap)


def test_raising_the_cap_sends_the_jobs_it_cancelled_and_a_rerun_keeps_within_it(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    path = manifest("raise", _sweep(10, "1.00"))
    first = wb("run", path, "--json", "--no-progress")
    assert first.code == 1, first.stderr
    assert first.json()["counts"]["succeeded"] == 5
    assert first.json()["cancelled_for_budget"] == 5

    path.write_text(_sweep(10, "1.60"))
    second = wb("run", path, "--json", "--no-progress")
    assert "budget of batch raise changed: $1.00 → $1.60" in second.stderr
    assert "5 job(s) its old cap cancelled before sending them are pending again" in second.stderr
    report = second.json()
    assert report["counts"]["succeeded"] == 8  # 3 more fit under $1.60
    assert report["counts"]["cancelled"] == 2
    assert report["cancelled_for_budget"] == 2
    assert sim.ledger()["accepted"] == 8
    assert Decimal(sim.ledger()["billed_usd"]) == Decimal("1.60")

    # The cap the user set is spent: a rerun without --max-usd has nothing left to spend.
    rerun = wb("rerun", "raise", "--failed-only", "--json", "--no-progress")
    assert rerun.code == 2, rerun.stderr
    assert "what is left of batch raise's budget.max_usd" in rerun.stderr
    assert sim.ledger()["accepted"] == 8
    assert Decimal(sim.ledger()["billed_usd"]) == Decimal("1.60")


def test_lowering_the_cap_revives_nothing(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest) -> None:
    path = manifest("raise", _sweep(4, "0.40"))
    assert wb("run", path, "--no-progress").code == 1
    path.write_text(_sweep(4, "0.20"))
    again = wb("submit", path, "--json")
    assert again.code == 0, again.stderr
    assert again.json()["budget_revived"] == 0
    assert "pending again" not in again.stderr
    assert again.json()["counts"]["cancelled"] == 2


def test_a_failed_only_reruns_default_cap_is_what_is_left_of_its_parents(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = manifest("raise", _sweep(5, "1.00"))
    # Today's cap stops the batch at $0.60 while its own $1.00 cap has $0.40 left.
    monkeypatch.setenv("WANBATCH_DAILY_BUDGET_USD", "0.60")
    get_settings.cache_clear()
    first = wb("run", path, "--json", "--no-progress")
    assert first.json()["counts"]["succeeded"] == 3, first.stderr
    monkeypatch.delenv("WANBATCH_DAILY_BUDGET_USD")
    get_settings.cache_clear()
    rerun = wb("rerun", "raise", "--failed-only", "--json", "--no-progress")
    assert "its cap is $0.40: what is left of batch raise's $1.00" in rerun.stderr
    report = rerun.json()
    assert report["budget_max_usd"] == 0.4
    assert report["counts"]["succeeded"] == 2
    assert Decimal(sim.ledger()["billed_usd"]) == Decimal("1.00")  # the lineage stayed within $1.00


def test_a_plain_rerun_keeps_its_parents_cap(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest) -> None:
    """A plain rerun renders the whole batch again (a comparison run): a cap of its own, the
    parent's, not what the parent left of it."""
    path = manifest("raise", _sweep(3, "1.00"))
    first = wb("run", path, "--json", "--no-progress")
    assert first.code == 0, first.stderr  # 3 × $0.20: $0.60 spent, $0.40 left
    rerun = wb("rerun", "raise", "--json", "--no-progress")
    assert rerun.code == 0, rerun.stderr
    assert "what is left" not in rerun.stderr
    report = rerun.json()
    assert report["budget_max_usd"] == 1.0
    assert report["counts"]["succeeded"] == 3
    given = wb("rerun", "raise", "--failed-only", "--max-usd", "0.20", "--json", "--no-progress")
    assert "what is left" not in given.stderr
