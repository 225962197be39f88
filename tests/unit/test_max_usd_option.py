"""``rerun --max-usd``: a number by a manifest's rule (``budget.max_usd``), plus ``$`` and
grouped thousands."""

from __future__ import annotations

from decimal import Decimal

import pytest

from jobs.batches import parse_usd
from jobs.errors import UsageError


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        ("25", "25"),
        ("25.00", "25.00"),
        ("$25", "25"),
        (".5", "0.5"),
        ("1e3", "1000"),
        ("1,000", "1000"),
        ("$12,345.50", "12345.50"),
        ("999,999,999.99", "999999999.99"),
    ],
)
def test_amounts_it_takes(text: str, amount: str) -> None:
    assert parse_usd(text) == Decimal(amount)


@pytest.mark.parametrize(
    "text",
    [
        "2,50",  # was $250: every comma was dropped
        "1,0000",
        "12,34,567",
        ",100",
        "1,,000",
        "1,000,",
        "1,000e3",
        "1_0",  # was $10 (Decimal() takes underscores)
        "1_000.0",
        "\u0663",  # ٣, was $3 (Decimal() takes any script's digits)
        "\u0661,\u0660\u0660\u0660",
        "1.5.0",
    ],
)
def test_amounts_it_refuses(text: str) -> None:
    with pytest.raises(UsageError) as refused:
        parse_usd(text)
    assert str(refused.value).startswith("--max-usd takes a positive amount of US dollars in ASCII digits")
