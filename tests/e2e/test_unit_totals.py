"""`cost` and the Hugging Face dataset card of a batch that mixes endpoints billed per second
and per video: units are summed per unit, never into one number; money is summed."""

from __future__ import annotations

from pathlib import Path

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb

MIXED = """\
name: mixed-units
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
items:
  - prompt: a mountain
    image_url: images/landscape.jpg
  - prompt: a valley
    image_url: images/landscape.jpg
  - endpoint: fal-ai/wan-22
    prompt: a paper boat
    num_frames: 81
"""


def test_cost_and_card_of_mixed_units(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    run = wb("run", manifest("mixed", MIXED), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    batch = run.json()["batch"]

    cost = wb("cost", batch, "--json")
    assert cost.code == 0, cost.stderr
    total = cost.json()["total"]
    assert total["estimated_units"] is None  # not 1 + 5.0625
    assert total["actual_units"] is None
    assert total["estimated_units_by_unit"] == total["actual_units_by_unit"] == {"s": 5.0625, "unit": 1.0}
    lines = {line["endpoint"]: line for line in cost.json()["by_endpoint"]}
    assert (lines["fal-ai/wan-22"]["actual_units"], lines["fal-ai/wan-22"]["unit"]) == (5.0625, "s")
    assert (lines["fal-ai/wan-i2v"]["actual_units"], lines["fal-ai/wan-i2v"]["unit"]) == (1.0, "unit")

    folder = tmp_path / "hf"
    export = wb("export", batch, "--format", "hf", "-o", folder)
    assert export.code == 0, export.stderr
    card = (folder / "README.md").read_text()
    assert "(billing units: 5.0625 s + 1 unit)" in card
    assert "6.0625" not in card
