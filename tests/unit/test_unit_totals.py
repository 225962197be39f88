"""Billing units add up per unit only: seconds of video and per-video units are no one number."""

from __future__ import annotations

from decimal import Decimal

from jobs.cost import CostLine
from jobs.pricing import Totals, estimate_job, unit_symbol, units_text
from jobs.states import JobState
from jobs.store import JobMoney


def _money(endpoint: str, units: str, usd: str) -> JobMoney:
    return JobMoney(
        endpoint=endpoint,
        input={},
        state=JobState.SUCCEEDED,
        error_type=None,
        est_usd=Decimal(usd),
        est_units=Decimal(units),
        actual_usd=Decimal(usd),
        actual_units=Decimal(units),
        possible_duplicate_charges=0,
    )


def test_every_endpoint_names_its_unit() -> None:
    assert unit_symbol("fal-ai/wan-i2v") == unit_symbol("fal-ai/wan-flf2v") == "unit"
    assert unit_symbol("fal-ai/wan-25-preview/image-to-video") == unit_symbol("fal-ai/wan-22") == "s"
    assert unit_symbol("wan/v2.6/image-to-video") == "s"
    assert unit_symbol("fal-ai/gone") == "fal-ai/gone unit"  # never added to anyone else's


def test_units_text() -> None:
    assert units_text({"s": Decimal("15.0625"), "unit": Decimal(1)}) == "15.0625 s + 1 unit"
    assert units_text({"unit": 4.5}) == "4.5 units"
    assert units_text({"s": Decimal("10.000")}) == "10 s"
    assert units_text({}) == "0"


def test_estimate_totals_keep_unlike_units_apart() -> None:
    totals = Totals()
    totals.add(estimate_job("fal-ai/wan-i2v", {"resolution": "720p"}))
    totals.add(estimate_job("fal-ai/wan-25-preview/image-to-video", {"resolution": "720p", "duration": "10"}))
    assert totals.billing_units is None
    assert totals.by_unit == {"unit": Decimal(1), "s": Decimal(10)}
    assert totals.usd == Decimal("1.40")
    data = totals.as_dict()
    assert data["billing_units"] is None
    assert data["billing_units_by_unit"] == {"s": 10, "unit": 1}
    assert data["by_endpoint"]["fal-ai/wan-i2v"]["unit"] == "unit"
    single = Totals()
    single.add(estimate_job("fal-ai/wan-i2v", {"resolution": "480p"}))
    single.add(estimate_job("fal-ai/wan-flf2v", {"resolution": "720p"}))
    assert single.as_dict()["billing_units"] == 1.5  # one unit: the sum means something


def test_cost_totals_keep_unlike_units_apart() -> None:
    total = CostLine()
    total.add(_money("fal-ai/wan-i2v", "1", "0.40"))
    total.add(_money("fal-ai/wan-25-preview/image-to-video", "10", "1.00"))
    total.add(_money("fal-ai/wan-22", "5.0625", "0.405"))
    data = total.as_dict()
    assert data["estimated_units"] is None
    assert data["actual_units"] is None
    assert data["unit"] is None
    assert data["estimated_units_by_unit"] == data["actual_units_by_unit"] == {"s": 15.0625, "unit": 1.0}
    assert data["actual_usd"] == 1.805
    line = CostLine()
    line.add(_money("fal-ai/wan-22", "5.0625", "0.405"))
    assert (line.as_dict()["actual_units"], line.as_dict()["unit"]) == (5.0625, "s")
