"""A stand-in corporate HTTP proxy on loopback, for tests (one server, two ways to answer).

* ``answer=None`` (the default): it forwards, as the only way out of a network where names
  outside it do not resolve: ``CONNECT`` tunnels and absolute-URI (forward) requests. Names
  ending in ``map_suffix`` (``.corp.example``) are reached at ``127.0.0.1`` — the proxy's own
  resolver knows them, this machine's does not. A target it cannot connect to is answered
  ``502 Bad Gateway`` (as Squid does), with no ``Via``; an answer it passes on gets the ``Via``
  a proxy adds (RFC 9110 §7.6.3). Adapted from the audit's ``/tmp/corpnet/proxy.py``.
* ``answer="502 Bad Gateway"`` (or any status line: ``407 Proxy Authentication Required``,
  ``403 Forbidden``): it answers every request with it and nothing else, as a proxy that cannot
  reach the target would (Squid answers a ``CONNECT`` so when fal is down), or one that refuses.

``auth``: the ``Proxy-Authorization`` it requires (``Basic …``), else it answers 407 (settable
while it runs). Whatever it answers, every request line and header it is sent is recorded, to
check what went through it and what never did. A test sets ``HTTP_PROXY``/``HTTPS_PROXY`` (or
``WANBATCH_DOWNLOAD_PROXY``) to its ``url``."""

from __future__ import annotations

import select
import socket
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

#: The answers tests ask for most.
BAD_GATEWAY = "502 Bad Gateway"
AUTH_REQUIRED = "407 Proxy Authentication Required"
#: What the forwarding proxy calls itself in the ``Via`` it adds to the answers it passes on.
VIA = "1.1 loopback-proxy"


@dataclass
class LoopbackProxy:
    """The running proxy: its URL, how it answers, and what it was sent (one list of header
    lines, the request line first, per request)."""

    url: str = ""
    answer: str | None = None
    auth: str | None = None
    #: Header lines of its own answers (``answer``): ``Proxy-Status: corp; error=dns_timeout``.
    headers: tuple[str, ...] = ()
    map_suffix: str = ".corp.example"
    requests: list[list[str]] = field(default_factory=list)

    def text(self) -> str:
        """Everything it saw, one line each (to search for a key)."""
        return "\n".join(line for request in self.requests for line in request)

    def request_lines(self) -> list[str]:
        return [request[0] for request in self.requests if request]

    def target(self, host: str) -> str:
        host = host.strip("[]")
        return "127.0.0.1" if host.endswith(self.map_suffix) else host


def _status(answer: str, headers: tuple[str, ...] = ()) -> bytes:
    extra = ['Proxy-Authenticate: Basic realm="corp"'] if answer.startswith("407") else []
    lines = [f"HTTP/1.1 {answer}", *extra, *headers, "Content-Length: 0", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


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


def _read_head(client: socket.socket) -> tuple[list[str], bytes] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode("latin-1").split("\r\n"), rest


def _header(lines: list[str], name: str) -> str | None:
    prefix = f"{name.lower()}:"
    return next(
        (line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith(prefix)), None
    )


def _tunnel(seen: LoopbackProxy, client: socket.socket, where: str) -> None:
    host, _, port = where.rpartition(":")
    try:
        upstream = socket.create_connection((seen.target(host), int(port)), timeout=5)
    except OSError:
        client.sendall(_status(BAD_GATEWAY))
        return
    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    _pipe(client, upstream)


def _forward(seen: LoopbackProxy, client: socket.socket, lines: list[str], rest: bytes) -> None:
    method, where, _ = lines[0].split(" ", 2)
    url = urlsplit(where)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    length = int(_header(lines, "content-length") or 0)
    while len(rest) < length:
        chunk = client.recv(65536)
        if not chunk:
            break
        rest += chunk
    try:
        upstream = socket.create_connection((seen.target(url.hostname or ""), url.port or 80), timeout=5)
    except OSError:
        client.sendall(_status(BAD_GATEWAY))
        return
    kept = [line for line in lines[1:] if not line.lower().startswith(("proxy-", "connection:"))]
    upstream.sendall(
        (f"{method} {path} HTTP/1.1\r\n" + "\r\n".join([*kept, "Connection: close"]) + "\r\n\r\n").encode(
            "latin-1"
        )
        + rest
    )
    status: bytes | None = b""  # the host's status line, until it has come whole: Via goes right after it
    try:
        while chunk := upstream.recv(65536):
            if status is not None:
                status += chunk
                if b"\r\n" not in status:
                    continue
                line, _, after = status.partition(b"\r\n")
                chunk, status = line + b"\r\nVia: " + VIA.encode() + b"\r\n" + after, None
            client.sendall(chunk)
    except OSError:
        pass
    finally:
        upstream.close()


@contextmanager
def loopback_proxy(
    answer: str | None = None, *, auth: str | None = None, headers: tuple[str, ...] = ()
) -> Iterator[LoopbackProxy]:
    """A running proxy on 127.0.0.1 (a free port), stopped on exit: forwarding when ``answer``
    is None, else answering every request with the status line ``answer`` (and ``headers``)."""
    seen = LoopbackProxy(answer=answer, auth=auth, headers=headers)
    lock = threading.Lock()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            client: socket.socket = self.request
            read = _read_head(client)
            if read is None:
                return
            lines, rest = read
            with lock:
                seen.requests.append(lines)
            if seen.auth is not None and _header(lines, "proxy-authorization") != seen.auth:
                client.sendall(_status(AUTH_REQUIRED))
                return
            if seen.answer is not None:
                client.sendall(_status(seen.answer, seen.headers))
                return
            method, where, _ = lines[0].split(" ", 2)
            if method == "CONNECT":
                _tunnel(seen, client, where)
            else:
                _forward(seen, client, lines, rest)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    seen.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()
