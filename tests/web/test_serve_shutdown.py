"""Stopping ``wanbatch serve`` with requests still running prints no traceback, and stops promptly.

Before: a second Ctrl-C (uvicorn's forced exit) with a webhook body still arriving logged
``Exception in ASGI application`` with a ``CancelledError`` traceback, and the lifespan's too (the
client got a bare 500); and a ``serve`` whose dashboard tab had stopped reading a video never
stopped on SIGTERM: uvicorn waited for that response for ever.

``wanbatch serve`` is a real process here, stopped by a real signal while a request is held
open: its log has no traceback, it ends promptly with its documented status (Ctrl-C: 130;
SIGTERM: the signal's), and a request cut is answered 503 (or, mid-body, its connection reset).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from jobs.db import session_factory
from tests.e2e.e2e_helpers import wanbatch_command
from tests.integration.test_simulator_shutdown import PROMPT, _answer, _clean, _env, _read_by_now, _stopped
from tests.web.web_helpers import mixed_batch

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")

#: ``serve``'s graceful wait for requests in progress (cli.service_commands'
#: SERVE_GRACEFUL_SHUTDOWN_SECONDS, as the README says).
GRACEFUL = 10


def _serve(tmp_path: Path, database: Path, output_dir: Path) -> tuple[subprocess.Popen[str], int, Path]:
    log = tmp_path / "serve.log"
    env = _env(
        tmp_path,
        WANBATCH_DATABASE_URL=f"sqlite:///{database}",
        WANBATCH_OUTPUT_DIR=str(output_dir),
    )
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*wanbatch_command(), "serve", "--port", "0"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    deadline = time.monotonic() + 60  # only so that a server that never starts fails the test
    while "Application startup complete" not in (said := log.read_text(errors="replace")):
        assert proc.poll() is None, said
        assert time.monotonic() < deadline, said
        time.sleep(0.05)
    found = re.search(r"running on http://127\.0\.0\.1:(\d+)", said)
    assert found, said
    return proc, int(found.group(1)), log


@pytest.fixture
def served(
    sqlite_engine: Engine, output_dir: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], int, Path, str]]:
    """``wanbatch serve`` of a batch with a video of 64 MiB; yields the process, its port, its
    log and the video's job id."""
    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session, output_dir=output_dir)
        session.commit()
    job_id, video = next(iter(mixed.videos.items()))
    with video.open("wb") as out:  # more than the socket buffers hold: its sending stalls
        out.truncate(64 * 1024 * 1024)
    database = Path(str(sqlite_engine.url.database))
    proc, port, log = _serve(tmp_path, database, output_dir)
    try:
        yield proc, port, log, job_id
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _connect(port: int, head: bytes) -> socket.socket:
    """A connection that has sent ``head``, once ``serve``'s handler has it (not a guessed while:
    on a loaded machine the stop then found no request begun, and cut nothing)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(head)
    _read_by_now(f"http://127.0.0.1:{port}/healthz")
    return sock


def _answering(sock: socket.socket) -> None:
    """Wait until the response on ``sock`` has begun (its first bytes are there, left unread)."""
    sock.settimeout(60)
    assert sock.recv(len(b"HTTP/1.1 "), socket.MSG_PEEK | socket.MSG_WAITALL) == b"HTTP/1.1 "


def test_serve_forced_to_stop_answers_a_delivery_still_arriving(
    served: tuple[subprocess.Popen[str], int, Path, str],
) -> None:
    """A second Ctrl-C (uvicorn's forced exit) with a webhook body still arriving."""
    proc, port, log, _job = served
    sock = _connect(port, b"POST /webhooks/fal HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    took = _stopped(proc, signal.SIGINT, twice=f"http://127.0.0.1:{port}")
    said = log.read_text(errors="replace")
    _clean(said)
    assert took < PROMPT, took
    assert proc.returncode == 130
    answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {
        "ok": False,
        "error": "the server stopped before this request was answered: send it again",
    }
    assert "POST /webhooks/fal was still running when the server stopped: answered 503" in said


@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_serve_stops_though_a_client_stopped_reading_a_video(
    served: tuple[subprocess.Popen[str], int, Path, str], twice: bool
) -> None:
    """A dashboard tab that paused its video holds a response mid-body: SIGTERM waits for it
    (uvicorn's graceful shutdown, bounded), then cuts it; a second Ctrl-C cuts it at once."""
    proc, port, log, job_id = served
    sock = _connect(port, f"GET /jobs/{job_id}/video HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    _answering(sock)  # mid-body: the video's sending stalls once the socket buffers are full
    sig = signal.SIGINT if twice else signal.SIGTERM
    took = _stopped(proc, sig, twice=f"http://127.0.0.1:{port}" if twice else None)
    said = log.read_text(errors="replace")
    _clean(said)
    assert took < (PROMPT if twice else GRACEFUL + PROMPT), took
    assert proc.returncode == (130 if twice else -signal.SIGTERM)
    sock.settimeout(10)
    with sock:
        head = sock.recv(4096)  # the rest, cut short, is not waited for: it trickles at 4 KiB
    assert head.startswith(b"HTTP/1.1 200 "), head
