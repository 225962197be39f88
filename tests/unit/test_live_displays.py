"""Every live display (spinner, status, progress bar) asks :func:`jobs.printable.redraws` first.

``FORCE_COLOR=1`` (common in CI) makes rich's ``Console.is_terminal`` True of any file: the
spinners of ``validate``, ``estimate``, ``submit`` and ``doctor`` went into a log file or a pipe
(``\\x1b[?25l``, ``\\r\\x1b[2K`` frames) where ``run``'s bar, which asked the stream, did not.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from rich.console import Console

from jobs.printable import redraws

ROOT = Path(__file__).resolve().parents[2]


def test_a_file_is_not_redrawn_on_even_with_force_color(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    with (tmp_path / "log").open("w") as file:
        console = Console(file=file)
        assert console.is_terminal  # rich's answer, the one that misled
        assert not redraws(console)
    assert not redraws(Console(file=io.StringIO()))


def test_a_terminal_is_redrawn_on_unless_rich_may_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            assert redraws(Console(file=tty))
            monkeypatch.setenv("TTY_COMPATIBLE", "0")
            assert not redraws(Console(file=tty))
            monkeypatch.delenv("TTY_COMPATIBLE")
            monkeypatch.setenv("TERM", "dumb")
            assert not redraws(Console(file=tty))
    finally:
        os.close(leader)
        os.close(follower)


#: A live display made straight from a console, not through ``cli.output.working`` or ``redraws``.
_LIVE = re.compile(r"\b(?:err|out|console|self\.console)\.status\(|\bLive\(|\bProgress\(|\btrack\(")
#: Where one may be made: behind the test (the helper itself, and ``run``'s bar, whose caller asks).
_ALLOWED = {"cli/output.py": 1, "worker/progress_line.py": 1}


def test_no_live_display_skips_the_terminal_test() -> None:
    found: dict[str, int] = {}
    for folder in ("cli", "web", "worker", "jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            count = len(_LIVE.findall(path.read_text(encoding="utf-8")))
            if count:
                found[path.relative_to(ROOT).as_posix()] = count
    assert found == _ALLOWED, "make a live display through cli.output.working (or ask jobs.printable.redraws)"
