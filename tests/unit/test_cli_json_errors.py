"""With ``--json``, every way a command can fail prints the contract's ``{"ok": false, "error": …}``.

A command's own errors always did (:func:`cli.output.fail`); a usage mistake click caught, a path
nothing explained or a bug (exit 70) printed only their line on stderr, so a script reading a
command's stdout read nothing at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import pytest

import cli
from tests.in_process import run_main


def _boom(*_args: object, **_kwargs: object) -> NoReturn:
    raise RuntimeError("boom")


def test_a_usage_mistake_under_json_is_a_json_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["status", "--json", "--bogus"], monkeypatch) == 2
    out, err = capsys.readouterr()
    assert json.loads(out) == {
        "ok": False,
        "error": "No such option '--bogus' (see `wanbatch status --help`)",
    }
    assert err == "error: No such option '--bogus' (see `wanbatch status --help`)\n"


def test_without_json_stdout_stays_empty(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["status", "--bogus", "--", "--json"], monkeypatch) == 2  # after --: an argument
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: No such option '--bogus'")


def test_an_internal_error_under_json_is_a_json_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the crash report goes there
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setattr(cli.cli, "main", _boom)
    assert run_main(["status", "--json"], monkeypatch) == 70
    out, err = capsys.readouterr()
    error = json.loads(out)["error"]
    assert error.startswith("internal error: RuntimeError: boom; please report it (details in ")
    assert err == error + "\n"
    assert list(tmp_path.glob("wanbatch-crash-*.txt"))


class _InterruptingField:
    """A descriptor whose ``__set_name__`` is where Ctrl-C lands, as in a dataclass being defined."""

    def __set_name__(self, owner: type, name: str) -> None:
        raise KeyboardInterrupt


def _interrupted_while_importing(*_args: object, **_kwargs: object) -> NoReturn:
    type("Task", (), {"start_time": _InterruptingField()})  # Python wraps it in a RuntimeError
    raise AssertionError("not reached")


def test_ctrl_c_wrapped_by_python_on_its_way_up_is_interrupted_not_a_bug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """CI caught a Ctrl-C landing in ``rich.progress``'s dataclasses while ``run`` imported them:
    "internal error: RuntimeError: Error calling __set_name__ …", exit 70, a crash report."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setattr(cli.cli, "main", _interrupted_while_importing)
    assert run_main(["status", "--json"], monkeypatch) == 130
    out, err = capsys.readouterr()
    assert json.loads(out) == {"ok": False, "error": "interrupted"}
    assert err == "interrupted\n"
    assert not list(tmp_path.glob("wanbatch-crash-*.txt"))


def test_the_lines_under_an_error_are_its_details_under_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`rerun --json` refused for changed source files said so without naming them: only the
    first line of a message went into the JSON, while the terminal lists the files under it."""
    from cli.output import fail
    from jobs.errors import UsageError

    message = (
        "cannot rerun batch b: 2 source files differ …; render the new image:\n"
        "  images/a.png: missing (deleted or moved since the batch was submitted)\n"
        "\n"
        "  images/ b.png: changed since the batch was submitted\n"
    )
    with pytest.raises(SystemExit) as ended:
        fail(UsageError(message), as_json=True)
    assert ended.value.code == 2
    assert json.loads(capsys.readouterr().out) == {
        "ok": False,
        "error": "cannot rerun batch b: 2 source files differ …; render the new image",
        "details": [
            "images/a.png: missing (deleted or moved since the batch was submitted)",
            "images/ b.png: changed since the batch was submitted",  # only the indent is removed
        ],
    }

    with pytest.raises(SystemExit):
        fail(UsageError(message), as_json=False)
    assert " ".join(capsys.readouterr().err.split()) == "error: " + " ".join(message.split())

    with pytest.raises(SystemExit):
        fail(UsageError("one line"), as_json=True)
    assert json.loads(capsys.readouterr().out) == {"ok": False, "error": "one line"}
