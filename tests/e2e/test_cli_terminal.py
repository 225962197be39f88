"""What decides the layout is the stream and ``COLUMNS``, never a collapsed column (CLI audit).

``FORCE_COLOR=1`` (common in CI) made rich call any file a terminal: ``run``'s progress went into
``2> run.log`` as the live bar (cursor moves, carriage returns), not as the plain lines the README
promises when stderr is not a terminal. A ``COLUMNS`` narrower than the fixed columns made rich
squeeze them to nothing: ``COLUMNS=5 wanbatch status`` printed a rule and blank rows, 8 dropped
the money, and at 20 the headings of ``status NAME`` and ``cost NAME`` lost the batch's name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from jobs.money import usd_text
from tests.e2e.e2e_helpers import MakeManifest
from tests.in_process import run_main

SMALL = """\
name: {name}
items:
  - {{endpoint: fal-ai/wan-22, prompt: a paper boat in the rain}}
  - {{endpoint: fal-ai/wan-22, prompt: a lake at dawn}}
"""

NAME = "terminal-width-audit"


def _run_into_files(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, folder: Path, tag: str
) -> tuple[int, str, str]:
    """``wanbatch ARGV`` with stdout and stderr real files (not terminals): exit code, texts."""
    stdout_path, stderr_path = folder / f"{tag}.out", folder / f"{tag}.err"
    with stdout_path.open("w", encoding="utf-8") as out, stderr_path.open("w", encoding="utf-8") as err:
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        code = run_main(argv, monkeypatch)
    return code, stdout_path.read_text(encoding="utf-8"), stderr_path.read_text(encoding="utf-8")


def test_force_color_into_a_file_gives_plain_progress_lines(
    manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = manifest("small", SMALL.format(name=NAME))
    monkeypatch.setenv("FORCE_COLOR", "1")
    with monkeypatch.context() as streams:
        code, _out, err = _run_into_files(["run", "--simulate", str(path)], streams, tmp_path, "run")
    assert code == 0, err
    assert "\r" not in err, repr(err)  # no redraws
    assert "\x1b[" not in err, repr(err)  # no cursor moves
    lines = [line for line in err.splitlines() if " jobs: " in line]
    assert lines, err
    assert lines[-1].endswith("succeeded:2"), lines
    assert "2/2 (100%)" in lines[-1], lines


@pytest.fixture
def simulated_batch(
    manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = manifest("small", SMALL.format(name=NAME))
    assert run_main(["run", "--simulate", "--no-progress", str(path)], monkeypatch) == 0
    capsys.readouterr()


@pytest.mark.parametrize("columns", [1, 5, 6, 7, 8, 20, 40])
def test_a_narrow_terminal_never_loses_ids_counts_or_money(
    simulated_batch: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], columns: int
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    assert run_main(["status", "--json"], monkeypatch) == 0
    report = json.loads(capsys.readouterr().out)["batches"][0]
    assert run_main(["status"], monkeypatch) == 0
    listing = capsys.readouterr()
    assert listing.err == ""
    row = next((line for line in listing.out.splitlines() if line.startswith(report["batch"][:8])), None)
    assert row is not None, listing.out
    for cell in ("done", "2/2", usd_text(report["spent_usd"]), usd_text(report["estimated_usd"])):
        assert cell in row.split(), (cell, listing.out)
    assert row.split()[1].startswith(NAME[:4]), listing.out  # the name's start at least

    for command, lead in (["status", NAME], ""), (["cost", NAME], "cost of "):
        assert run_main(command, monkeypatch) == 0
        shown = capsys.readouterr().out
        heading = shown.splitlines()[0]
        assert heading.startswith(lead + NAME[:9]), (columns, shown)
        if command[0] == "cost":
            assert usd_text(report["spent_usd"]) in shown.split(), shown


def test_force_color_into_a_pipe_keeps_each_note_on_one_line(
    manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Into a pipe with no COLUMNS a note is one whole line (a script greps it); FORCE_COLOR made
    # it wrap at rich's stand-in 80 columns, the command to type cut in two.
    name = "a-batch-name-long-enough-that-its-note-runs-past-eighty-columns"
    assert run_main(["submit", str(manifest("long", SMALL.format(name=name)))], monkeypatch) == 0
    capsys.readouterr()
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert run_main(["status"], monkeypatch) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(f"`wanbatch run {name}`" in line for line in lines), lines


#: What a live display writes: cursor hidden, a frame redrawn over the line, a line erased above.
LIVE_CODES = ("\x1b[?25l", "\x1b[2K", "\x1b[1A", "\r")


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("command", ["validate", "estimate", "submit", "doctor"])
def test_force_color_into_a_file_draws_no_spinner(
    manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str, as_json: bool
) -> None:
    """``validate``, ``estimate``, ``submit`` and ``doctor`` drew rich's spinner into a file
    stderr when ``FORCE_COLOR`` was set (``--json`` too): the README's "colours on, never the
    live bar in a file" held for ``run`` only."""
    path = manifest("small", SMALL.format(name=NAME))
    argv = ["doctor", "--simulate"] if command == "doctor" else [command, str(path)]
    argv += ["--json"] if as_json else []
    monkeypatch.setenv("FORCE_COLOR", "1")
    with monkeypatch.context() as streams:
        code, out, err = _run_into_files(argv, streams, tmp_path, command)
    assert code in (0, 1), err  # doctor: 1 when a check fails here; the spinner is the point
    for live in LIVE_CODES:
        assert live not in err, (live, err)
    if as_json:
        json.loads(out)
