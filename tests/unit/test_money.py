"""One money rounding everywhere (half up to the cent for people) and one JSON money type."""

from __future__ import annotations

from decimal import Decimal

import pytest

from jobs.money import as_decimal, round_cents, usd_json, usd_text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("2.835"), "$2.84"),  # the case: status said $2.83, cost $2.84
        (2.835, "$2.84"),  # a float is read by its repr, not its binary value (2.83499…)
        ("2.835", "$2.84"),
        (Decimal("2.825"), "$2.83"),  # half up, not banker's rounding (which gives $2.82)
        (Decimal("2.8249999"), "$2.82"),
        (Decimal("0.005"), "$0.01"),
        (Decimal("0.0049"), "$0.00"),
        (0, "$0.00"),
        (Decimal("1234.5"), "$1,234.50"),
        (Decimal("-2.835"), "-$2.84"),
        (None, "$0.00"),
    ],
)
def test_usd_text_rounds_half_up_to_the_cent(value: Decimal | float | str | None, text: str) -> None:
    assert usd_text(value) == text


def test_round_cents_and_as_decimal() -> None:
    assert round_cents(Decimal("2.835")) == Decimal("2.84")
    assert round_cents(0.125) == Decimal("0.13")
    assert as_decimal(2.835) == Decimal("2.835")
    assert as_decimal(7) == Decimal(7)
    assert usd_text(None, none="-") == "-"


def test_json_money_is_a_number_rounded_half_up_to_the_micro_dollar() -> None:
    assert usd_json(None) is None
    value = usd_json(Decimal("2.8350005"))
    assert isinstance(value, float)
    assert value == 2.835001
    assert Decimal(str(usd_json(Decimal("0.1") * 3))) == Decimal("0.3")  # exact once read back
    assert usd_json(Decimal("12")) == 12.0


def test_a_rounding_note_names_only_the_columns_whose_lines_do_not_add_up() -> None:
    from cli.output import rounding_note

    assert rounding_note({"USD": ([Decimal("0.25"), Decimal("0.50")], Decimal("0.75"))}) is None
    note = rounding_note(
        {
            "estimated": ([Decimal("0.3025"), Decimal("0.375"), Decimal("0.405")], Decimal("1.0825")),
            "actual": ([Decimal("0.25"), None], Decimal("0.25")),
        }
    )
    assert note is not None
    assert "(estimated)" in note


@pytest.mark.parametrize(
    ("amounts", "texts"),
    [
        # Rounded to the cent each read "$1.01": "the estimate $1.01 exceeds budget.max_usd $1.01".
        ((Decimal("1.0125"), Decimal("1.01")), ("$1.013", "$1.010")),
        ((Decimal("0.2025"), Decimal("0.199999")), ("$0.203", "$0.200")),
        ((Decimal("1.00000001"), Decimal(1)), ("$1.00000001", "$1.00000000")),
        ((Decimal("1234.5"), Decimal("1234.501")), ("$1,234.500", "$1,234.501")),
        # Cents that already differ, or amounts that are equal, read as usd_text reads them.
        ((Decimal("2.03"), Decimal(2)), ("$2.03", "$2.00")),
        ((Decimal("1.01"), 1.01), ("$1.01", "$1.01")),
        ((Decimal("-0.2025"), Decimal("-0.199999")), ("-$0.203", "-$0.200")),
    ],
)
def test_usd_apart_shows_the_decimals_that_tell_two_amounts_apart(
    amounts: tuple[Decimal | float, ...], texts: tuple[str, ...]
) -> None:
    from jobs.money import usd_apart

    assert usd_apart(*amounts) == texts
