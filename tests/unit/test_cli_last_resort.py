"""The last-resort handler of :func:`cli._main` ends a bug as one ``internal error`` line, exit 70,
even when its own helpers fail in turn.

An install with a too-old pydantic-settings (2.6: no ``NoDecode``) failed importing
``jobs.settings``; the handler asked :func:`cli._database_said` whether that was a database's
error, which imports ``jobs.db`` → ``jobs.settings`` again: the handler itself raised, and the
user got two chained tracebacks instead of the documented line.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import pytest

import cli
import jobs.redaction
import worker.crash
from tests.in_process import run_main

_IMPORT_FAILURE = "cannot import name 'NoDecode' from 'pydantic_settings'"


def _import_fails(*_args: object, **_kwargs: object) -> NoReturn:
    raise ImportError(_IMPORT_FAILURE)


@pytest.fixture(autouse=True)
def crash_reports_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the crash report goes there
    monkeypatch.setattr("tempfile.tempdir", None)


def test_a_failing_database_check_still_ends_as_an_internal_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # As with pydantic-settings 2.6: the settings cannot be imported, by the command nor by the
    # handler's check.
    monkeypatch.setattr(cli, "install_key_redaction", _import_fails)
    monkeypatch.setattr(cli, "_database_said", _import_fails)
    assert run_main(["status"], monkeypatch) == 70
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"internal error: ImportError: {_IMPORT_FAILURE}; please report it (details in ")
    assert len(list(tmp_path.glob("wanbatch-crash-*.txt"))) == 1


def test_a_failing_crash_report_still_ends_as_an_internal_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli.cli, "main", _import_fails)
    monkeypatch.setattr(worker.crash, "crash_file", _import_fails)
    monkeypatch.setattr(worker.crash, "summary", _import_fails)
    assert run_main(["status", "--json"], monkeypatch) == 70
    out, err = capsys.readouterr()
    assert err == "internal error: ImportError; please report it\n"
    assert out == '{"ok": false, "error": "internal error: ImportError; please report it"}\n'


def test_a_failing_masking_still_ends_as_an_internal_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The line cannot be masked: only the exception's type is printed (its message may hold a key).
    monkeypatch.setattr(cli.cli, "main", _import_fails)
    monkeypatch.setattr(jobs.redaction, "masked_error", _import_fails)
    assert run_main(["status"], monkeypatch) == 70
    out, err = capsys.readouterr()
    assert (out, err) == ("", "internal error: ImportError; please report it\n")
