"""A malformed JSON Lines row is placed by the file's line and the row's own column.

The decoder counts from the row it was given, its line break included: a row cut short
(``{"prompt": "broken row", "seed": 5``) read ``prompts.jsonl:601: item 599: not valid JSON
(Expecting ',' delimiter: line 2 column 1 (char 35))``, a "line 2" of nothing the user has.
"""

from __future__ import annotations

from pathlib import Path

from jobs.manifest import validate_manifest

MANIFEST = "name: rows\nendpoint: fal-ai/wan-22\nitems_from: prompts.jsonl\n"


def _message(tmp_path: Path, rows: list[str]) -> str:
    (tmp_path / "prompts.jsonl").write_text("".join(row + "\n" for row in rows))
    (tmp_path / "m.yaml").write_text(MANIFEST)
    report = validate_manifest(tmp_path / "m.yaml")
    (issue,) = report.errors
    assert issue.line == len(rows)
    return issue.message


def test_a_row_cut_short_is_wrong_at_the_end_of_its_line(tmp_path: Path) -> None:
    message = _message(tmp_path, ['{"prompt": "fine"}', '{"prompt": "broken row", "seed": 5'])
    assert message == "not valid JSON (Expecting ',' delimiter at the end of the line)"


def test_a_row_wrong_in_its_middle_names_the_column(tmp_path: Path) -> None:
    message = _message(tmp_path, ['{"prompt": "fine"}', '{"prompt": "x",, "seed": 5}'])
    assert message == "not valid JSON (Expecting property name enclosed in double quotes at column 16)"


def test_a_byte_order_mark_on_a_later_line_is_refused_at_its_row(tmp_path: Path) -> None:
    """Only the file's first line may start with a BOM (it is skipped there); one at the start
    of another row is that row's error, in the decoder's words, at its first column."""
    message = _message(tmp_path, ['{"prompt": "fine"}', '\ufeff{"prompt": "after a BOM"}'])
    assert message == "not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig) at column 1)"
