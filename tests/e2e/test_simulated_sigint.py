"""Ctrl-C (SIGINT) or SIGTERM of `wanbatch run --simulate` while requests run at its simulator.

The bug (audit): the embedded simulator's uvicorn waited ``timeout_graceful_shutdown`` for the
status streams the run still had open, then cancelled them, printing
``ERROR: Cancel N running task(s), timeout graceful shutdown exceeded`` and an
``Exception in ASGI application`` traceback per stream. Now the simulator ends its open
streams as it shuts down, before uvicorn's graceful timeout: nothing is cancelled, nothing printed.

The run is a real subprocess (signals need one). A hook installed before the CLI makes every
render of its simulator take a minute, and sends the process a real signal, through the real
handlers, once its third status stream is open: no timing to guess.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.e2e.e2e_helpers import Background, MakeManifest, subprocess_env

#: Runs the CLI with the embedded simulator's renders slowed to a minute, and a signal
#: (``WANBATCH_TEST_SIGNAL``) sent to this process once ``STREAMS`` status streams are open.
HOOKED = """
import asyncio, os, signal, sys
sys.argv[0] = "wanbatch"
sig = getattr(signal, os.environ.pop("WANBATCH_TEST_SIGNAL"))

import falsim
from falsim.app import SimulatorApp

started = falsim.running_simulator

def slow(options, *args, **kwargs):
    return started(options.updated({"latency_seconds": 60.0}), *args, **kwargs)

falsim.running_simulator = slow

stream = SimulatorApp._stream
opened = 0

async def counted(self, req, with_logs):
    global opened
    opened += 1
    if opened == %(streams)d:
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), sig)
    async for chunk in stream(self, req, with_logs):
        yield chunk

SimulatorApp._stream = counted
from cli import main
main()
"""
STREAMS = 3

MANIFEST = "name: simint\nendpoint: fal-ai/wan-22\nitems:\n" + "".join(
    f"  - prompt: interrupted simulation item {i}\n" for i in range(6)
)


class Hooked(Background):
    def command(self) -> list[str]:
        return [sys.executable, "-c", HOOKED % {"streams": STREAMS}]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_with_streams_open_at_the_simulator_prints_no_traceback(
    sig: signal.Signals, manifest: MakeManifest, e2e_env: Path
) -> None:
    env = subprocess_env("http://127.0.0.1:9", EMBEDDED_CONCURRENCY="4", TEST_SIGNAL=sig.name)
    argv = ["run", str(manifest("simint", MANIFEST)), "--simulate", "--no-progress"]
    proc = Hooked(argv, env, e2e_env, "run")
    try:
        code = proc.wait(60)
    finally:
        proc.kill()
    err = proc.stderr()
    assert code == 130, err
    assert "run the same command again to resume" in err
    assert "Traceback" not in err
    assert "Exception in ASGI application" not in err
    assert "timeout graceful shutdown exceeded" not in err
