"""Ctrl-C in the first half second of any command: one line, exit 130, never a traceback.

The console script's imports take about half a second; a SIGINT during them used to surface as
a KeyboardInterrupt traceback from wherever it landed (click, dataclasses, pydantic_settings…)
or as "Aborted!" with exit 1. The entry module now installs a handler before its first import.

Each case starts the real console script (SIGINT at its default, as a shell leaves it), waits
until the process is past the interpreter's own start-up — a compiled module that only the
entry module's imports load is mapped (``/proc/PID/maps``); before that, Python itself turns
SIGINT into a KeyboardInterrupt and no code of ours has run — and then sends SIGINT after each
delay. The command is a ``run`` whose schedule opens in 2099, so it is still running at every
delay (or waiting, in its own interrupt handling, which exits 130 too): the assertions hold
whatever point of the start-up the signal reaches.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

WANBATCH = Path(sys.executable).with_name("wanbatch")
#: Loaded by ``import click`` — after the handler, which is the entry module's first statement.
MARKER = "_datetime."
MANIFEST = (
    "name: later\nendpoint: fal-ai/wan-22\n"
    "schedule:\n  not_before: 2099-01-01T00:00:00Z\nitems:\n  - prompt: hi\n"
)


def _command() -> list[str]:
    if WANBATCH.exists():
        return [str(WANBATCH)]
    # What the console script does: the handler is installed when ``cli`` is imported as ``wanbatch``.
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'wanbatch'; from cli import main; main()"]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_marker(process: subprocess.Popen[str]) -> None:
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if MARKER in maps.read_text():
                return
        except OSError:
            pass
        time.sleep(0.001)
    raise AssertionError(f"the command never loaded {MARKER} (exit {process.poll()})")


def _start_run(folder: Path, command: list[str] | None = None) -> subprocess.Popen[str]:
    """``run --simulate`` of a batch that waits for 2099, with the SIGINT a shell gives a command."""
    manifest = folder / "later.yaml"
    manifest.write_text(MANIFEST)
    return subprocess.Popen(
        [*(command or _command()), "run", "--simulate", str(manifest), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


#: ``python -m cli``, the same command (cli/__main__.py): its package import installs the handler.
BY_MODULE = [sys.executable, "-m", "cli"]


@pytest.mark.parametrize(
    ("delay", "command"),
    [*((d, None) for d in (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.45)), (0.0, BY_MODULE), (0.1, BY_MODULE)],
)
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(
    delay: float, command: list[str] | None, e2e_env: Path
) -> None:
    process = _start_run(e2e_env, command)
    try:
        _wait_for_marker(process)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in err + out, err
    assert "Aborted!" not in err, err
    assert process.returncode == 130, (process.returncode, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("interrupted"), err


def _batch_stored(db: Path) -> bool:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            return bool(conn.execute("SELECT count(*) FROM batches").fetchone()[0])
    except sqlite3.Error:
        return False


def test_once_run_is_running_its_resume_message_still_appears(e2e_env: Path, tmp_path: Path) -> None:
    """The early handler gives way to ``run``'s own: what was given back and how to resume."""
    process = _start_run(e2e_env)
    try:
        deadline = time.monotonic() + 60
        # run's own handling is in place before it stores anything: wait for the batch row.
        while not _batch_stored(tmp_path / "wanbatch.db") and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in err + out, err
    assert process.returncode == 130, (process.returncode, err)
    assert "run the same command again to resume" in err, err


def test_the_command_itself_gets_ctrl_c_as_python_gives_it() -> None:
    """The exit-on-the-spot handler covers the imports and the settings only: once a command runs,
    SIGINT is a KeyboardInterrupt again, so what the command holds is cleaned up on the way out
    (an export's temporary file; click answers it as "interrupted", 130)."""
    import cli

    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        assert cli._exit_on_interrupt() is signal.default_int_handler
        assert signal.getsignal(signal.SIGINT) is cli._exit_interrupted
        cli._interrupt_normally()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
