"""A path or value a message quotes stays on its one line: "Errors are one line" (README).

Audit: ``validate`` of an ``image_url`` holding line feeds (``"images/x\\n✓ all valid\\ny.jpg"``)
printed its one error as three lines, the middle one a forged ``✓ all valid``, and ``--json``
split it into three ``details`` entries. ``shown_path`` escaped nothing; ``printable`` (the
terminal's escaping) keeps line feeds, and the JSON ``details`` were split on every line
boundary :meth:`str.splitlines` knows (CR, NEL, U+2028, …).
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from jobs.errors import Issue
from jobs.fs import shown_path
from jobs.printable import shortened
from tests.in_process import run_main

#: Each line break the terminal or ``str.splitlines`` would break a line at, and how it is shown.
BREAKS = {
    "\n": "\\n",
    "\r": "\\x0d",
    "\r\n": "\\x0d\\n",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
    "\x85": "\\x85",
    "\x0b": "\\x0b",
    "\x1c": "\\x1c",
}
FORGED = "✓ all valid"


def _yaml_escaped(text: str) -> str:
    """``text`` for a YAML double-quoted scalar (``\\n``, ``\\u2028``, ``\\x85`` …)."""
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)


def _manifest(folder: Path, key: str, value: str) -> Path:
    path = folder / "nl3.yaml"
    head = "name: t-nl3\nendpoint: fal-ai/wan-i2v\nitems:\n  - prompt: hi\n"
    path.write_text(f'{head}    {key}: "{_yaml_escaped(value)}"\n', encoding="utf-8")
    return path


@pytest.mark.parametrize("brk", list(BREAKS), ids=[repr(b) for b in BREAKS])
def test_a_missing_image_path_with_line_breaks_is_one_error_line(
    brk: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _manifest(tmp_path, "image_url", f"images/x{brk}{FORGED}{brk}y.jpg")
    shown = f"images/x{BREAKS[brk]}{FORGED}{BREAKS[brk]}y.jpg"

    assert run_main(["validate", "nl3.yaml"], monkeypatch) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.split("\n")
    assert lines[-1] == ""  # the output ends with its last line's line feed
    error, summary = lines[:-1]
    # The path as written (README: `file not found: images/x\ny.jpg`), not as resolved.
    assert error.startswith(
        f"error nl3.yaml:5: item 0: field 'image_url': file not found: {shown} (allowed: "
    )
    assert summary == "✗ 1 error(s); nothing was submitted."
    assert not any(ch in err for ch in "\r\x0b\x1c\x85\u2028\u2029")

    assert run_main(["validate", "--json", "nl3.yaml"], monkeypatch) == 2
    out, _ = capsys.readouterr()
    assert out.count("\n") == 1
    payload = json.loads(out)
    [detail] = payload["details"]
    assert detail.startswith(f"nl3.yaml:5: item 0: field 'image_url': file not found: {shown} (allowed: ")
    [issue] = payload["issues"]
    assert issue["message"] == f"file not found: {shown}"
    assert issue["value"] == f"images/x{brk}{FORGED}{brk}y.jpg"  # the data, as written


def test_a_missing_items_from_file_with_a_line_feed_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nl3.yaml").write_text(
        'name: t-nl3\nendpoint: fal-ai/wan-22\nitems_from: "rows\\n✓ all valid\\n.jsonl"\n', encoding="utf-8"
    )
    assert run_main(["validate", "--json", "nl3.yaml"], monkeypatch) == 2
    [detail] = json.loads(capsys.readouterr().out)["details"]
    assert "rows\\n✓ all valid\\n.jsonl" in detail
    assert run_main(["validate", "nl3.yaml"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 2
    assert not any(line.startswith(FORGED) for line in err.splitlines())


def test_an_issue_is_one_line_whatever_its_message_quotes() -> None:
    """The guard under every issue line: a message that quotes a value raw stays one line."""
    issue = Issue("a\nb.yaml", 3, 0, "image_url", f"bad: x\n{FORGED}\u2028z", allowed="y\rz")
    assert (
        str(issue) == f"a\\nb.yaml:3: item 0: field 'image_url': bad: x\\n{FORGED}\\u2028z (allowed: y\\x0dz)"
    )


@pytest.mark.parametrize("brk", list(BREAKS), ids=[repr(b) for b in BREAKS])
def test_shown_paths_and_shortened_values_escape_line_breaks(brk: str) -> None:
    assert shown_path(f"/tmp/a{brk}b\x1b[2J") == f"/tmp/a{BREAKS[brk]}b\\x1b[2J"
    assert shown_path(Path(f"a{brk}b")) == f"a{BREAKS[brk]}b"
    assert shortened(f"seed=1{brk}{FORGED}") == f"seed=1{BREAKS[brk]}{FORGED}"
    cut = shown_path(f"/a{brk}" + "x" * 200 + f"{brk}b", limit=60)  # cut, then escaped
    assert cut.startswith(f"/a{BREAKS[brk]}xx")
    assert cut.endswith(f"x{BREAKS[brk]}b")
    assert "x…x" in cut


def test_a_rerun_names_a_changed_file_on_one_line(tmp_path: Path) -> None:
    """`rerun` lists each source file that changed on a line of its own: a file name with a line
    feed in it (a file that exists, so it validated) must not make two."""
    from jobs.rerun import _checked_sources
    from jobs.store import NewJob

    image = tmp_path / f"x\n{FORGED}\ny.png"
    image.write_bytes(b"now")
    row = NewJob(
        key="k",
        item_index=0,
        endpoint="fal-ai/wan-i2v",
        input={"prompt": "p", "image_url": str(image)},
        est_billing_units=Decimal(0),
        est_usd=Decimal(0),
        source_files={"image_url": {"sha256": "0" * 64}},
    )
    [line] = _checked_sources([row], tmp_path, ()).problems
    assert line.startswith(f"x\\n{FORGED}\\ny.png: changed since the batch was submitted")
