"""No number of warnings hides an error: ``validate`` shows errors first, in text and ``--json``,
each with its file, line, item and field (10,005 duplicate rows used to bury the one bad row
behind "… and 5 more issues not shown")."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.e2e_helpers import Wb


@pytest.fixture
def dups_then_bad(e2e_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr("jobs.manifest.report.MAX_ISSUES", 5)
    rows = ['{"prompt": "p"}'] * 12 + ['{"prompt": "q", "resolution": "1080p"}']
    (e2e_env / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    path = e2e_env / "dtb.yaml"
    path.write_text("name: dtb\nendpoint: fal-ai/wan-22\nitems_from: rows.jsonl\nbudget:\n  max_usd: 5\n")
    return path


def test_text_output_shows_the_error_first(wb: Wb, dups_then_bad: Path) -> None:
    run = wb("validate", dups_then_bad)
    assert run.code == 2
    lines = run.stderr.splitlines()
    assert lines[0].startswith("error ")
    assert "rows.jsonl:13: item 12: field 'resolution': '1080p' is not one of" in lines[0]
    assert lines[-2].startswith("warning ")
    assert lines[-2].endswith("dtb.yaml: … and 6 more warnings not shown")
    assert lines[-1] == "✗ 1 error(s); nothing was submitted."


def test_json_output_keeps_every_error_located(wb: Wb, dups_then_bad: Path) -> None:
    run = wb("validate", dups_then_bad, "--json")
    assert run.code == 2
    issues = run.json()["issues"]
    errors = [i for i in issues if i["severity"] == "error"]
    assert len(errors) == 1
    assert Path(errors[0]["file"]).name == "rows.jsonl"
    assert {k: errors[0][k] for k in ("line", "item", "field")} == {
        "line": 13,
        "item": 12,
        "field": "resolution",
    }
    assert issues[0] == errors[0]
    assert issues[-1]["severity"] == "warning"
