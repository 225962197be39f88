"""``wanbatch serve`` against connections that never send a whole request head, and against one
peer holding many connections.

Before: uvicorn counts every open connection toward ``serve``'s limit (100) and had no deadline
for a request's head, so 100 idle connections — or ones dripping a header a byte every few
seconds — held every slot for ever: each webhook delivery, ``/healthz`` and the dashboard got
503 meanwhile. Now a connection must send its head within ``web.connections.HEAD_DEADLINE``
(from its opening, and from the end of each response on a keep-alive connection) and one peer
may hold only ``SERVE_CONNECTIONS_PER_PEER`` open (the trusted proxies excepted). These tests run
the very server ``serve`` starts, with a short deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import web.connections
from cli.service_commands import SERVE_CONNECTIONS_PER_PEER, SERVE_LIMIT_CONCURRENCY
from jobs.settings import get_settings
from tests.ports import unused_port
from web.auth import trusted_peer
from web.connections import HEAD_TIMEOUT, PEER_LIMIT, PeerGuard, peer_key
from worker import telemetry

#: Longest a test waits for the server to do its part: only so that broken code fails the test
#: instead of hanging it; never reached when the code is right.
SAFETY = 30.0
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
#: The start of a head that a slow sender never finishes.
PARTIAL_HEAD = b"POST /webhooks/fal HTTP/1.1\r\nHost: x\r\nX-A: "


@contextlib.contextmanager
def _serving(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[int]:
    """``wanbatch serve --port 0`` as the command builds it, run in a thread; its port."""
    import uvicorn

    import cli
    from cli import startup

    started: dict[str, Any] = {}
    real_run = uvicorn.Server.run

    def capture(server: uvicorn.Server, sockets: list[Any]) -> None:
        started["server"], started["sockets"] = server, sockets

    monkeypatch.setattr(startup, "pause", lambda: None)
    monkeypatch.setattr(sys, "argv", ["wanbatch", "serve", "--port", "0"])
    monkeypatch.setattr(uvicorn.Server, "run", capture)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'serve.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", f"http://127.0.0.1:{unused_port()}/jwks.json")
    get_settings.cache_clear()
    with pytest.raises(SystemExit) as ended:
        cli.main()
    get_settings.cache_clear()
    assert ended.value.code == 0
    server: uvicorn.Server = started["server"]
    (sock,) = started["sockets"]
    thread = threading.Thread(target=real_run, args=(server,), kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + SAFETY
        while not server.started:
            assert thread.is_alive(), "`wanbatch serve` did not start"
            assert time.monotonic() < deadline, "`wanbatch serve` did not start"
            time.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=SAFETY)


def _ask(port: int, request: bytes, source: str = "127.0.0.1") -> bytes:
    """``request`` sent from ``source`` to ``127.0.0.1:port``; all it answered, up to the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=SAFETY, source_address=(source, 0)) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def _answered_in_the_end(port: int, source: str = "127.0.0.1") -> bytes:
    """``GET /healthz``, asked again while the server answers 503 (all its slots held), up to
    :data:`SAFETY`: the first other answer, else the last 503."""
    deadline = time.monotonic() + SAFETY
    while True:
        answer = _ask(port, HEALTHZ, source)
        if not answer.startswith(b"HTTP/1.1 503 ") or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def _closed_by_server(conn: socket.socket) -> bool:
    """Whether the server has closed ``conn`` (its end seen), without waiting."""
    conn.setblocking(False)
    try:
        while conn.recv(65536):
            pass
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True
    return True


def _wait_closed(conns: list[socket.socket], count: int) -> list[socket.socket]:
    """Wait (up to :data:`SAFETY`) until at least ``count`` of ``conns`` are closed by the
    server; those still open."""
    deadline = time.monotonic() + SAFETY
    while True:
        still_open = [c for c in conns if not _closed_by_server(c)]
        if len(conns) - len(still_open) >= count or time.monotonic() > deadline:
            return still_open
        time.sleep(0.05)


def _closed_total(reason: str) -> float:
    value = telemetry.registry().get_sample_value(
        "wanbatch_serve_connections_closed_total", {"reason": reason}
    )
    return value or 0.0


def test_idle_and_dripping_connections_beyond_the_limit_are_closed_and_serve_answers_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit's repro: more connections than the limit, half of them sending nothing, half a
    header a byte at a time (each byte well within the deadline), from loopback (a trusted
    proxy by default, so only the deadline helps). Each is closed at its head's deadline and
    ``/healthz`` is answered 200 again; before, 503 for ever."""
    monkeypatch.setattr(web.connections, "HEAD_DEADLINE", 0.5)
    before = _closed_total("head_timeout")
    flood: list[socket.socket] = []
    stop = threading.Event()
    with caplog.at_level(logging.WARNING), _serving(monkeypatch, tmp_path) as port:
        try:
            for _ in range(SERVE_LIMIT_CONCURRENCY // 2 + 10):
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=SAFETY))
            dripping = []
            for _ in range(SERVE_LIMIT_CONCURRENCY // 2 + 10):
                conn = socket.create_connection(("127.0.0.1", port), timeout=SAFETY)
                conn.sendall(PARTIAL_HEAD)
                dripping.append(conn)
            flood.extend(dripping)

            def drip() -> None:
                live = list(dripping)
                while live and not stop.wait(0.1):
                    for conn in list(live):
                        try:
                            conn.sendall(b"a")
                        except OSError:  # closed by the server
                            live.remove(conn)

            dripper = threading.Thread(target=drip, daemon=True)
            dripper.start()
            answer = _answered_in_the_end(port)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            assert _wait_closed(flood, len(flood)) == []
        finally:
            stop.set()
            for conn in flood:
                conn.close()
    assert _closed_total("head_timeout") - before >= len(flood)
    said = [r for r in caplog.records if r.name == "web.connections"]
    # One line for the whole flood (the rest summed up a minute later), never a traceback.
    assert len(said) == 1, [r.getMessage() for r in said]
    assert "from 127.0.0.1" in said[0].getMessage()
    assert "no whole request head within 0.5 s" in said[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def _response(conn: socket.socket) -> bytes:
    """One whole response (head and ``Content-Length`` body) read from ``conn``."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = conn.recv(65536)
        assert chunk, answer  # closed before a whole response
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    fields = dict(line.partition(b": ")[::2] for line in head.split(b"\r\n")[1:])
    length = int({k.lower(): v for k, v in fields.items()}[b"content-length"])
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, answer + body
        body += chunk
    return head + b"\r\n\r\n" + body


def test_the_deadline_is_for_heads_on_a_keep_alive_connection_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The deadline ends when a head is whole (a body has its own, 408), and starts again at the
    end of the response for the next head: any byte cancels uvicorn's own keep-alive timer, so
    dripping the next request's head held the connection for ever."""
    monkeypatch.setattr(web.connections, "HEAD_DEADLINE", 0.2)
    with (
        _serving(monkeypatch, tmp_path) as port,
        socket.create_connection(("127.0.0.1", port), timeout=SAFETY) as conn,
    ):
        conn.sendall(
            b"POST /webhooks/fal?job_id=j1&attempt=1&token=x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{"
        )
        time.sleep(1.0)  # past the head's deadline, well within the body's
        conn.sendall(b"}")
        answer = _response(conn)
        # Answered by the receiver (an unsigned delivery: a 4xx), not closed unanswered.
        assert answer.startswith(b"HTTP/1.1 4"), answer
        assert not answer.startswith(b"HTTP/1.1 408 "), answer
        conn.sendall(PARTIAL_HEAD)
        deadline = time.monotonic() + SAFETY
        closed = False
        while not closed and time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                conn.sendall(b"a")  # each byte within the deadline, never a whole head
            except OSError:  # closed by the server
                closed = True
            else:
                closed = _closed_by_server(conn)
                conn.setblocking(True)
        assert closed


def test_one_peer_cannot_take_every_slot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With loopback no trusted proxy, 127.0.0.1 holds at most its share (the rest of its
    connections closed at once, even with a head deadline longer than the test): 127.0.0.2 is
    answered while 127.0.0.1's connections are open."""
    monkeypatch.setattr(web.connections, "HEAD_DEADLINE", 3600.0)
    monkeypatch.setenv("WANBATCH_SERVE_FORWARDED_ALLOW_IPS", "10.0.0.7")
    monkeypatch.setattr(web.connections, "capped", lambda host: True)  # loopback stands for the internet
    before = _closed_total("peer_limit")
    flood: list[socket.socket] = []
    with caplog.at_level(logging.WARNING), _serving(monkeypatch, tmp_path) as port:
        try:
            for _ in range(SERVE_LIMIT_CONCURRENCY + 10):
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=SAFETY))
            answer = _answered_in_the_end(port, source="127.0.0.2")
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            still_open = _wait_closed(flood, len(flood) - SERVE_CONNECTIONS_PER_PEER)
            assert len(still_open) == SERVE_CONNECTIONS_PER_PEER
        finally:
            for conn in flood:
                conn.close()
    assert _closed_total("peer_limit") - before == len(flood) - SERVE_CONNECTIONS_PER_PEER
    said = [r for r in caplog.records if r.name == "web.connections"]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert (
        f"refused a connection from 127.0.0.1: it has {SERVE_CONNECTIONS_PER_PEER} open"
        in said[0].getMessage()
    )


def test_a_peers_share_and_the_trusted_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # Documentation addresses (203.0.113.0/24, 2001:db8::/32) stand for public ones here.
    monkeypatch.setattr(web.connections, "capped", lambda host: not host.startswith(("10.", "192.168.")))
    guard = PeerGuard(2, trusted_peer("10.0.0.7,192.168.0.0/16"))
    for _ in range(5):  # a trusted proxy: everything behind it comes from its address
        assert guard.admit("10.0.0.7") == (True, None)
        assert guard.admit("192.168.3.4") == (True, None)
    assert guard.admit(None) == (True, None)
    assert guard.admit("203.0.113.5") == (True, "203.0.113.5")
    assert guard.admit("::ffff:203.0.113.5") == (True, "203.0.113.5")
    assert guard.admit("203.0.113.5") == (False, None)
    guard.release("203.0.113.5")
    assert guard.admit("203.0.113.5") == (True, "203.0.113.5")
    # An IPv6 peer's share is its /64's.
    assert guard.admit("2001:db8::1") == (True, "2001:db8::/64")
    assert guard.admit("2001:db8::ffff:2") == (True, "2001:db8::/64")
    assert guard.admit("2001:db8::3") == (False, None)
    assert guard.admit("2001:db8:0:1::1") == (True, "2001:db8:0:1::/64")
    assert peer_key("not-an-address") == "not-an-address"
    for _ in range(2):
        guard.release("2001:db8::/64")
    guard.release("203.0.113.5")
    guard.release("203.0.113.5")
    guard.release("2001:db8:0:1::/64")
    assert guard.open == {}


def test_a_flood_is_one_line_a_minute_per_peer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(web.connections, "LOG_INTERVAL", 0.05)
    guard = PeerGuard(2, trusted_peer("10.0.0.7"))

    async def flood() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(3):
            guard.closed(loop, "203.0.113.5", HEAD_TIMEOUT)
        guard.closed(loop, "203.0.113.6", PEER_LIMIT)
        # The intervals end: one summing up, then one that finds nothing and sets no other.
        # Waited for (a guessed while could pass on a loaded machine before the second ran).
        deadline = loop.time() + 60
        while guard._logged:
            assert loop.time() < deadline, guard._logged
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.WARNING):
        asyncio.run(flood())
    said = sorted(r.getMessage() for r in caplog.records if r.name == "web.connections")
    assert len(said) == 3, said
    assert said[0].startswith("serve: closed 2 more connections from 203.0.113.5 in the last 0.05 s: ")
    assert said[1].startswith("serve: closed a connection from 203.0.113.5: no whole request head")
    assert said[2].startswith("serve: refused a connection from 203.0.113.6: it has 2 open already")
    assert guard._logged == {}


def test_only_public_addresses_have_a_share() -> None:
    """Behind a private, loopback or link-local peer are many clients: Docker's bridge gateway,
    which every client of the compose file's published port comes through (one client holding
    its 25 connections would have locked fal's deliveries out), a proxy on this host, a
    neighbour in the cluster. A public address has its share."""
    guard = PeerGuard(SERVE_CONNECTIONS_PER_PEER, trusted_peer(""))
    for peer in ("172.18.0.1", "127.0.0.1", "::1", "fd00::5", "169.254.1.1", "::ffff:10.1.2.3"):
        for _ in range(SERVE_CONNECTIONS_PER_PEER + 1):
            assert guard.admit(peer) == (True, None), peer
    for _ in range(SERVE_CONNECTIONS_PER_PEER):
        assert guard.admit("8.8.4.4") == (True, "8.8.4.4")
    assert guard.admit("::ffff:8.8.4.4") == (False, None)  # the same IPv4 client, dual-stack
    assert guard.admit("2a00:1450:4001:80b::200e") == (True, "2a00:1450:4001:80b::/64")


def test_a_trusted_proxy_reaching_a_dual_stack_listener_over_ipv4_has_no_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``serve --host ::`` sees an IPv4 proxy as ``::ffff:10.0.0.5``: it is the proxy named
    ``10.0.0.5`` all the same (before, it got a share of 25, its 26th connection refused)."""
    monkeypatch.setattr(web.connections, "capped", lambda host: True)
    guard = PeerGuard(SERVE_CONNECTIONS_PER_PEER, trusted_peer("10.0.0.5"))
    for _ in range(SERVE_CONNECTIONS_PER_PEER + 1):
        assert guard.admit("::ffff:10.0.0.5") == (True, None)
