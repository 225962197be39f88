"""A stand-in corporate proxy on loopback that actually forwards: ``CONNECT`` tunnels and
absolute-URI (forward) requests, as the only way out of a network where names outside it do not
resolve. Names ending in ``map_suffix`` (``.corp.example``) are reached at ``127.0.0.1`` — the
proxy's own resolver knows them, this machine's does not. Every request line and header it is
sent is recorded (to check what went through it, and what never did).

``mode``: ``ok`` (forward), ``407`` (asks for credentials it never accepts), ``502`` (cannot
reach anything); ``auth``: the ``Proxy-Authorization`` it requires (``Basic …``), else 407.
Adapted from the audit's ``/tmp/corpnet/proxy.py``."""

from __future__ import annotations

import select
import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Forwarded:
    """The running proxy: its URL and what it was sent (one list of header lines per request)."""

    url: str = ""
    mode: str = "ok"
    auth: str | None = None
    map_suffix: str = ".corp.example"
    requests: list[list[str]] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(line for request in self.requests for line in request)

    def request_lines(self) -> list[str]:
        return [request[0] for request in self.requests if request]


def _pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while True:
            ready, _, _ = select.select([a, b], [], [], 30)
            if not ready:
                return
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                (b if sock is a else a).sendall(data)
    except OSError:
        pass
    finally:
        a.close()
        b.close()


@contextmanager
def forward_proxy(mode: str = "ok", *, auth: str | None = None) -> Iterator[Forwarded]:
    """A running forwarding proxy on 127.0.0.1 (a free port), stopped on exit."""
    seen = Forwarded(mode=mode, auth=auth)
    lock = threading.Lock()

    def target(host: str) -> str:
        host = host.strip("[]")
        return "127.0.0.1" if host.endswith(seen.map_suffix) else host

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            client: socket.socket = self.request
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            with lock:
                seen.requests.append(lines)
            given = next(
                (
                    line.split(":", 1)[1].strip()
                    for line in lines[1:]
                    if line.lower().startswith("proxy-authorization:")
                ),
                None,
            )
            if seen.mode == "407" or (seen.auth is not None and given != seen.auth):
                client.sendall(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="corp"\r\n'
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
                return
            if seen.mode == "502":
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            method, where, _ = lines[0].split(" ", 2)
            if method == "CONNECT":
                host, _, port = where.rpartition(":")
                try:
                    upstream = socket.create_connection((target(host), int(port)), timeout=5)
                except OSError:
                    client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                    return
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                _pipe(client, upstream)
                return
            url = urlsplit(where)
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            while len(rest) < length:
                chunk = client.recv(65536)
                if not chunk:
                    break
                rest += chunk
            try:
                upstream = socket.create_connection((target(url.hostname or ""), url.port or 80), timeout=5)
            except OSError:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            kept = [line for line in lines[1:] if not line.lower().startswith(("proxy-", "connection:"))]
            upstream.sendall(
                (
                    f"{method} {path} HTTP/1.1\r\n" + "\r\n".join([*kept, "Connection: close"]) + "\r\n\r\n"
                ).encode("latin-1")
                + rest
            )
            try:
                while chunk := upstream.recv(65536):
                    client.sendall(chunk)
            except OSError:
                pass
            finally:
                upstream.close()

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    seen.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()
