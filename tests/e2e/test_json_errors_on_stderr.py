"""Under ``--json`` every failure says on stderr what it says without ``--json``, and prints its
object on stdout (README, Everyday use: the object carries "the same line as on stderr", and
``details`` are what an error "lists under it on stderr").

A command's own errors (:func:`cli.output.fail`: an unknown batch, ``export --json`` without
``-o``, a refused rerun) printed only the object, leaving stderr empty, while a usage mistake
click caught and a bug (exit 70) printed their ``error:`` line there too. Each case runs through
:func:`cli.main` (as the console script does), once with ``--json`` and once without, with
stdout and stderr read apart.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.e2e.e2e_helpers import EXAMPLES, Wb
from tests.in_process import run_main

QUICKSTART = EXAMPLES / "quickstart.yaml"


def _boom(*_args: object, **_kwargs: object) -> NoReturn:
    raise KeyError("no such thing")


def _a_bug_in_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug where ``status`` gathers its report: the safety net's exit 70."""
    monkeypatch.setattr("jobs.batches.status", _boom)


def _bad_manifest(folder: Path) -> Path:
    path = folder / "bad.yaml"
    body = "name: bad\nendpoint: fal-ai/wan-22\nbogus: 1\nitems:\n  - prompt: hi\n"
    path.write_text(body, encoding="utf-8")
    return path


#: (id, the command line without --json, its exit code, a bug to plant first)
CASES: list[tuple[str, list[str], int, Callable[[pytest.MonkeyPatch], None] | None]] = [
    ("status-unknown", ["status", "nope"], 2, None),
    ("pause-unknown", ["pause", "nope"], 2, None),
    ("resume-unknown", ["resume", "nope"], 2, None),
    ("cost-unknown", ["cost", "nope"], 2, None),
    ("diff-unknown", ["diff", "quickstart", "nope"], 2, None),
    ("rerun-unknown", ["rerun", "nope", "--no-progress"], 2, None),
    ("export-json-without-o", ["export", "quickstart"], 2, None),  # fine without --json
    ("usage-mistake", ["status", "--bogus"], 2, None),
    ("bad-value", ["export", "quickstart", "--format", "xml"], 2, None),
    ("manifest-issues", ["validate", "BAD"], 2, None),
    ("manifest-issues-submit", ["submit", "BAD"], 2, None),
    ("manifest-missing", ["validate", "/nonexistent.yaml"], 2, None),
    ("bug", ["status", "quickstart"], 70, _a_bug_in_status),
]


#: ``export --json``'s refusal without ``-o FILE`` (an export to stdout is fine without ``--json``).
JSON_NEEDS_O = "--json needs -o FILE: without it the records themselves go to standard output"


def _wanbatch(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    code = run_main(argv, monkeypatch)
    out, err = capsys.readouterr()
    return code, out, err


def _same_crash_file(text: str) -> str:
    """A bug's line names a crash file of its own each time."""
    return re.sub(r"\(details in [^)]*\)", "(details in FILE)", text)


@pytest.fixture
def stored(wb: Wb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch ``quickstart`` stored (never run); crash reports in the test's folder."""
    assert wb("submit", QUICKSTART).code == 0
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)


@pytest.mark.usefixtures("stored")
@pytest.mark.parametrize(("argv", "code", "plant"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_failure_under_json_says_on_stderr_what_it_says_without(
    argv: list[str],
    code: int,
    plant: Callable[[pytest.MonkeyPatch], None] | None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    e2e_env: Path,
) -> None:
    argv = [str(_bad_manifest(e2e_env)) if word == "BAD" else word for word in argv]
    if plant is not None:
        plant(monkeypatch)

    if argv == ["export", "quickstart"]:  # the records on stdout without --json; with it, -o is needed
        plain_code, plain_out, plain_err = code, "", f"error: {JSON_NEEDS_O}\n"
    else:
        plain_code, plain_out, plain_err = _wanbatch(argv, monkeypatch, capsys)
    json_code, json_out, json_err = _wanbatch([*argv, "--json"], monkeypatch, capsys)

    assert (plain_code, json_code) == (code, code)
    assert plain_out == ""
    assert plain_err.strip(), "no line on stderr without --json"
    assert "Traceback" not in plain_err + json_err
    assert _same_crash_file(json_err) == _same_crash_file(plain_err)  # was "" for a command's own errors
    (line,) = json_out.splitlines()
    obj: dict[str, Any] = json.loads(line)
    assert obj["ok"] is False
    if "issues" in obj:  # a manifest's: its issues, then how many errors, on stderr
        assert [i for i in json_err.splitlines() if i.startswith("error ")] == [
            f"error {detail}" for detail in obj["details"]
        ]
        assert json_err.splitlines()[-1] == "✗ 1 error(s); nothing was submitted."
        # "the same line as on stderr", without its glyph (it said "1 error(s) in manifest")
        assert obj["error"] == "1 error(s); nothing was submitted."
        return
    head, *under = json_err.rstrip("\n").split("\n")
    assert head.removeprefix("error: ") == obj["error"]  # "the same line as on stderr"
    assert [u.strip() for u in under if u.strip()] == obj.get("details", [])


def test_a_refused_rerun_lists_under_its_line_on_stderr_what_json_gives_as_details(
    wb: Wb, examples_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's case for ``details``: the source files a rerun refuses, one per line."""
    path = examples_copy / "quickstart.yaml"
    ran = wb("run", path, "--simulate", "--no-progress", "--json")
    assert ran.code == 0, ran.stderr
    shutil.copy(examples_copy / "images" / "night.jpg", examples_copy / "images" / "landscape.jpg")
    argv = ["rerun", "quickstart", "--simulate", "--no-progress"]

    plain_code, plain_out, plain_err = _wanbatch(argv, monkeypatch, capsys)
    json_code, json_out, json_err = _wanbatch([*argv, "--json"], monkeypatch, capsys)

    assert (plain_code, json_code, plain_out) == (2, 2, "")
    assert json_err == plain_err
    obj = json.loads(json_out)
    head, *under = json_err.rstrip("\n").split("\n")
    assert head == f"error: {obj['error']}:"
    assert obj["details"] == [u.strip() for u in under if u.strip()]
    assert obj["details"][0].startswith("images/landscape.jpg: changed since the batch was submitted")
