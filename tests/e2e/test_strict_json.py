"""Every ``--json`` object is strict JSON (RFC 8259): a non-finite number is the string ``"inf"``,
``"-inf"`` or ``"nan"``, never ``Infinity``/``NaN``, which JSON parsers other than Python's refuse.

A manifest's ``budget.max_usd: 1e999`` or a JSONL item's ``"seed": Infinity`` was quoted back as
``"value": Infinity`` in ``validate --json``.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import pytest

from cli.output import json_document
from tests.in_process import run_main


def _strict(text: str) -> dict[str, Any]:
    def refuse(constant: str) -> NoReturn:
        raise ValueError(f"not JSON: {constant}")

    document: dict[str, Any] = json.loads(text, parse_constant=refuse)
    return document


@pytest.mark.parametrize(
    ("manifest", "rows", "values"),
    [
        ("budget:\n  max_usd: 1e999\nitems:\n  - prompt: x\n", None, ["inf"]),
        ("items:\n  - prompt: x\n    seed: -1e999\n", None, ["-inf"]),
        (
            "items_from: rows.jsonl\n",
            '{"prompt": "z", "seed": Infinity}\n{"prompt": NaN}\n{"prompt": "y", "seed": -Infinity}\n',
            ["inf", "nan", "-inf"],
        ),
    ],
    ids=["budget-1e999", "seed--1e999", "jsonl-infinity-nan"],
)
def test_validate_json_quotes_non_finite_values_as_strings(
    manifest: str,
    rows: str | None,
    values: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("name: b\nendpoint: fal-ai/wan-22\n" + manifest)
    if rows is not None:
        (tmp_path / "rows.jsonl").write_text(rows)
    assert run_main(["validate", "--json", str(path)], monkeypatch) == 2
    document = _strict(capsys.readouterr().out)
    assert document["ok"] is False
    assert [issue["value"] for issue in document["issues"]] == values


def test_json_document_is_strict_wherever_the_number_is() -> None:
    document: dict[str, object] = {
        "a": float("nan"),
        "b": [float("-inf"), (Decimal("Infinity"), Decimal("-Infinity"), Decimal("NaN"))],
        "keyed": {float("inf"): {"c": 1.5}},
        "d": Decimal("2.50"),
    }
    text = json_document(document)
    assert _strict(text) == {
        "a": "nan",
        "b": ["-inf", ["inf", "-inf", "nan"]],
        "keyed": {"inf": {"c": 1.5}},
        "d": "2.50",
    }
    assert json_document({"e": Decimal("-Infinity")}) == '{"e": "-inf"}'  # no float: no walk
