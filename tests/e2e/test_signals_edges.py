"""Signals at the edges: a Ctrl-C with a dead standard error, SIGTERM/SIGHUP during start-up.

Audit "cli" (signals):

- Ctrl-C while stderr could not be written exited 70 (``2>/dev/full``: an "internal error") or
  141 (stderr a pipe whose reader had gone: "the reader of standard output went away", though
  stdout was fine), instead of 130 — the README promises a dead stderr changes no exit code.
  Click's main writes an empty line to stderr on a KeyboardInterrupt; that write failed, and its
  OSError was taken for a bug or for stdout's. The same write put a stray blank line before
  ``interrupted`` in a log.
- SIGTERM or SIGHUP in the first second or two of ``run``, ``rerun`` or ``cancel`` killed the
  process by the signal (143, 129) without a word, though the README says they stop these
  commands as Ctrl-C does (exit 130): only SIGINT had a start-up handler. A SIGHUP ignored by the
  parent (``nohup``) stays ignored.

Timing margins as in ``test_early_sigint``/``test_sigint``: the start-up is waited for by what
the process has loaded or opened, not by a fixed sleep, so a loaded machine only makes it slower.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from tests.ports import unused_port

WANBATCH = Path(sys.executable).with_name("wanbatch")
#: Loaded by ``import click`` — after the entry module's start-up handlers.
MARKER = "_datetime."
MANIFEST = (
    "name: later\nendpoint: fal-ai/wan-22\n"
    "schedule:\n  not_before: 2099-01-01T00:00:00Z\nitems:\n  - prompt: hi\n"
)


def _command() -> list[str]:
    if WANBATCH.exists():
        return [str(WANBATCH)]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'wanbatch'; from cli import main; main()"]


def _shell_signals(ignored: tuple[signal.Signals, ...] = ()) -> Callable[[], None]:
    """What a shell gives a foreground command: SIGINT, SIGTERM, SIGHUP at their default
    (``ignored`` set to be ignored, as ``nohup`` does SIGHUP)."""

    def preexec() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)

    return preexec


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def _wait_for_marker(process: subprocess.Popen[Any]) -> None:
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


def _wait_for_port(process: subprocess.Popen[Any], port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"serve ended early (exit {process.returncode})"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("serve never listened")


def _serve(stderr: int | IO[Any]) -> tuple[subprocess.Popen[bytes], int]:
    port = unused_port()
    process = subprocess.Popen(
        [*_command(), "serve", "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        preexec_fn=_shell_signals(),
    )
    return process, port


# --- Ctrl-C with a standard error that cannot be written ------------------------------------


def test_ctrl_c_with_stderr_on_a_full_disk_exits_130(e2e_env: Path) -> None:
    with open("/dev/full", "wb") as full:
        process, port = _serve(stderr=full)
    try:
        _wait_for_port(process, port)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        _stop(process)


def test_ctrl_c_with_stderr_reader_gone_exits_130_not_141(e2e_env: Path) -> None:
    """``wanbatch serve 2>&1 >/dev/null | true``: stderr's reader is gone, stdout is fine."""
    read_end, write_end = os.pipe()
    try:
        process, port = _serve(stderr=write_end)
    finally:
        os.close(write_end)
    try:
        os.close(read_end)  # the reader goes away before anything is written
        _wait_for_port(process, port)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        _stop(process)


def test_ctrl_c_in_a_log_has_no_blank_line_before_interrupted(e2e_env: Path) -> None:
    log = e2e_env / "serve.log"
    with log.open("wb") as stderr:
        process, port = _serve(stderr=stderr)
    try:
        _wait_for_port(process, port)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        _stop(process)
    said = log.read_text()
    assert said.endswith("interrupted\n"), said
    assert "\n\ninterrupted" not in said, repr(said)
    assert not said.startswith("\n"), repr(said)


# --- SIGTERM and SIGHUP during the start-up of run, rerun, cancel ----------------------------


def _start(argv: list[str], ignored: tuple[signal.Signals, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*_command(), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_shell_signals(ignored),
    )


def _assert_interrupted(process: subprocess.Popen[str], out: str, err: str) -> None:
    assert "Traceback" not in err + out, err
    assert process.returncode == 130, (process.returncode, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("interrupted"), err


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_term_or_hup_during_run_start_up_is_one_line_and_exit_130(
    sig: signal.Signals, delay: float, e2e_env: Path
) -> None:
    manifest = e2e_env / "later.yaml"
    manifest.write_text(MANIFEST)
    process = _start(["run", "--simulate", str(manifest), "--no-progress"])
    try:
        _wait_for_marker(process)
        time.sleep(delay)
        process.send_signal(sig)
        out, err = process.communicate(timeout=60)
    finally:
        _stop(process)
    _assert_interrupted(process, out, err)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_term_or_hup_during_cancel_start_up_is_one_line_and_exit_130(
    sig: signal.Signals, e2e_env: Path
) -> None:
    process = _start(["cancel", "no-such-batch"])
    try:
        _wait_for_marker(process)  # the imports still have a good part of a second to go
        process.send_signal(sig)
        out, err = process.communicate(timeout=60)
    finally:
        _stop(process)
    _assert_interrupted(process, out, err)


def test_hup_ignored_by_nohup_stays_ignored_during_start_up(e2e_env: Path) -> None:
    manifest = e2e_env / "later.yaml"
    manifest.write_text(MANIFEST)
    process = _start(["run", "--simulate", str(manifest), "--no-progress"], ignored=(signal.SIGHUP,))
    try:
        _wait_for_marker(process)
        process.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        _stop(process)
    assert "Traceback" not in err + out, err
    assert process.returncode == 130, (process.returncode, err)
