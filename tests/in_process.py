"""``wanbatch`` run in the test's own process, for tests that read its exit code and captured output.

In process, the command's module state is the test's (monkeypatched settings, caplog, capsys);
a subprocess (``tests.e2e.e2e_helpers.wanbatch``) is for what only a real process shows.
"""

from __future__ import annotations

import sys

import pytest

import cli
from cli import startup


def run_main(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``wanbatch *argv`` through :func:`cli.main`, as the console script runs it; its exit code.

    The start-up's GC pause (:mod:`cli.startup`) is switched off: in a test it would outlive the
    command and slow every later test.
    """
    monkeypatch.setattr(startup, "pause", lambda: None)
    monkeypatch.setattr(sys, "argv", ["wanbatch", *argv])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    return int(ended.value.code or 0)
