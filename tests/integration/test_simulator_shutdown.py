"""Stopping the simulator with requests still running prints no traceback, and stops promptly.

Before: ``wanbatch simulator --fault submit_slow=5``, a submit held, then Ctrl-C: uvicorn waited
its graceful second, cancelled the request, and logged ``Exception in ASGI application`` with a
traceback ending in ``CancelledError: Task cancelled, timeout graceful shutdown exceeded`` (the
client got a bare 500); a second Ctrl-C printed two (the request's and the lifespan's).

The simulator is a real process here (``wanbatch simulator``), stopped by a real signal while a
request is held open: its output has no traceback, it ends within seconds with its documented
status (Ctrl-C: 130; SIGTERM: the signal's), and the held client is answered (an answer a fault
holds is sent as it stops; a request cut is answered 503). ``wanbatch serve``:
tests/web/test_serve_shutdown.py, with the helpers here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e.e2e_helpers import wanbatch_command

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

AUTH = {"Authorization": "Key x"}
#: What no stop may print.
NEVER = (
    "Traceback",
    "Exception in ASGI application",
    "ASGI callable returned",
    "Exception in 'lifespan' protocol",
)
#: A stop is prompt within this long (uvicorn's graceful wait for the simulator is 1 s).
PROMPT = 5.0


def _clean(said: str) -> None:
    for word in NEVER:
        assert word not in said, said


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    env.setdefault("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'unused.db'}")
    return env


def _stopped(proc: subprocess.Popen[str], sig: signal.Signals, *, twice: str | None = None) -> float:
    """Send ``sig`` and wait for the end; returns how long it took. ``twice``: the server's URL;
    a second ``sig`` (a forced exit) follows once the first is taken (:func:`_refused`)."""
    began = time.monotonic()
    proc.send_signal(sig)
    if twice is not None:
        _refused(twice, proc)
        proc.send_signal(sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail("still running 30 s after the signal")
    return time.monotonic() - began


def _refused(url: str, proc: subprocess.Popen[str]) -> None:
    """Wait until the server at ``url`` refuses new connections: the first thing uvicorn does once
    it has taken a stop signal (it closes its listening socket). A second signal sent sooner, a
    guessed while after the first, could come before the first was handled: the two are one
    then (Python runs a signal's handler once however often it came), and there is no forced
    exit to test."""
    place = urlsplit(url)
    deadline = time.monotonic() + 60
    while proc.poll() is None:
        try:
            socket.create_connection((place.hostname or "127.0.0.1", place.port or 80), timeout=10).close()
        except ConnectionRefusedError:
            return
        assert time.monotonic() < deadline, "the server still listens 60 s after the first signal"
        time.sleep(0.01)


def _read_by_now(url: str) -> None:
    """Wait until the server at ``url`` has read what was sent to it before this call, and given
    the request whose head that was to its handler: a request of our own on a new connection
    answered (``GET url``). Its event loop reads every connection with bytes waiting as it
    turns, and starts a request's handler as soon as its head is read; the new connection is
    accepted, read and answered only turns after the bytes sent before it arrived. A guessed
    while instead was too short on a loaded machine: the stop found the request not begun,
    closed its connection unanswered, and there was no request cut to test."""
    with httpx.Client(timeout=30) as client:
        assert client.get(url).status_code < 500


def _answer(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except OSError:
        pass
    finally:
        sock.close()
    return got


# ------------------------------------------------------------------ the simulator


@pytest.fixture
def simulator(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``wanbatch simulator --port 0`` with the faults the test names (``@pytest.mark.parametrize``
    of ``faults`` indirectly), its stderr in a file; yields the process and its URL."""
    faults: list[str] = getattr(request, "param", [])
    argv = [*wanbatch_command(), "simulator", "--port", "0", "--latency", "0.2"]
    for fault in faults:
        argv += ["--fault", fault]
    err = (tmp_path / "sim.stderr").open("w")
    proc = subprocess.Popen(argv, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("fal simulator listening on "), line
        yield proc, line.rsplit(" ", 1)[1].strip()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        err.close()


def _said(tmp_path: Path) -> str:
    return (tmp_path / "sim.stderr").read_text(errors="replace")


class _Call(threading.Thread):
    """One HTTP exchange on a thread of its own: ``result`` is the response, or the error."""

    def __init__(self, method: str, url: str, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.method, self.url, self.kwargs = method, url, kwargs
        self.result: httpx.Response | Exception | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=30, headers=AUTH) as client:
                self.result = client.request(self.method, self.url, **self.kwargs)
        except Exception as exc:
            self.result = exc


def _held(call: _Call, kind: str) -> _Call:
    """Start ``call`` and wait until the simulator's ``kind`` fault holds it in its handler (the
    fault's count of firings, read from ``/_sim/faults``), not for a guessed while: a request
    still on its way when the signal comes is another test."""
    base = call.url.split("/", 3)
    faults = f"{base[0]}//{base[2]}/_sim/faults"
    call.start()
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=10) as client:
        while client.get(faults).json()["fired"].get(kind, 0) < 1:
            assert call.is_alive(), call.result
            assert time.monotonic() < deadline, f"the {kind} fault never held the call"
            time.sleep(0.02)
    assert call.is_alive(), call.result
    return call


@pytest.mark.parametrize("simulator", [["submit_slow=30"]], indirect=True)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_held_submit_is_answered_when_the_simulator_stops(
    simulator: tuple[subprocess.Popen[str], str], tmp_path: Path, sig: signal.Signals
) -> None:
    proc, url = simulator
    call = _held(_Call("POST", f"{url}/fal-ai/wan-22", json={"prompt": "a"}), "submit_slow")
    took = _stopped(proc, sig)
    call.join(10)
    _clean(_said(tmp_path))
    assert took < PROMPT, took
    # Ctrl-C: 130, as every wanbatch command interrupted; SIGTERM: uvicorn ends by the signal.
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGTERM)
    # The request was queued: its answer, held by the fault, is sent at once, not cut to a 500.
    assert isinstance(call.result, httpx.Response), call.result
    assert call.result.status_code == 200, call.result.text
    assert call.result.json()["request_id"]


@pytest.mark.parametrize("simulator", [["status_slow=30"]], indirect=True)
def test_a_held_status_poll_is_answered_when_the_simulator_stops(
    simulator: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    proc, url = simulator
    with httpx.Client(timeout=10, headers=AUTH) as client:
        submitted = client.post(f"{url}/fal-ai/wan-22", json={"prompt": "a"}).json()
    call = _held(_Call("GET", submitted["status_url"]), "status_slow")
    took = _stopped(proc, signal.SIGINT)
    call.join(10)
    _clean(_said(tmp_path))
    assert took < PROMPT, took
    assert proc.returncode == 130
    assert isinstance(call.result, httpx.Response), call.result
    assert call.result.status_code in (200, 202), call.result.text


def test_an_open_status_stream_ends_when_the_simulator_stops(
    simulator: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    proc, url = simulator
    with httpx.Client(timeout=10, headers=AUTH) as client:
        client.post(f"{url}/_sim/options", json={"latency_seconds": 600}).raise_for_status()
        submitted = client.post(f"{url}/fal-ai/wan-22", json={"prompt": "a"}).json()
    events: list[str] = []
    opened = threading.Event()

    def read() -> None:
        with (
            httpx.Client(timeout=30, headers=AUTH) as client,
            client.stream("GET", submitted["status_url"] + "/stream") as answer,
        ):
            for line in answer.iter_lines():
                opened.set()
                events.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert opened.wait(10)
    took = _stopped(proc, signal.SIGINT)
    reader.join(10)
    assert not reader.is_alive()
    _clean(_said(tmp_path))
    assert took < PROMPT, took
    assert proc.returncode == 130
    assert any(e.startswith("data: ") for e in events), events


def _slow_upload(url: str) -> socket.socket:
    """A storage upload whose body stops arriving half-way: held in the simulator's handler until
    the server cuts it (no fault holds it, so the server's stop cannot answer it early)."""
    with httpx.Client(timeout=10, headers=AUTH) as client:
        key = urlsplit(
            client.post(f"{url}/storage/upload/initiate", json={"file_name": "a.png"}).json()["upload_url"]
        ).path
    place = urlsplit(url)
    sock = socket.create_connection((place.hostname or "127.0.0.1", place.port or 80))
    sock.sendall(f"PUT {key} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nhalf".encode())
    _read_by_now(f"{url}/_sim/faults")
    return sock


@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_a_request_cut_by_the_simulators_stop_is_answered_503(
    simulator: tuple[subprocess.Popen[str], str], tmp_path: Path, twice: bool
) -> None:
    """Once: uvicorn's graceful second passes, the request is cancelled. Twice: a forced exit
    cancels it and the lifespan as the event loop closes. Either way: one line, a 503."""
    proc, url = simulator
    sock = _slow_upload(url)
    took = _stopped(proc, signal.SIGINT, twice=url if twice else None)
    said = _said(tmp_path)
    _clean(said)
    assert took < PROMPT, took
    assert proc.returncode == 130
    answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {
        "detail": "the server stopped before this request was answered: send it again"
    }
    assert "PUT /storage/upload/" in said, said
    assert "answered 503" in said, said
