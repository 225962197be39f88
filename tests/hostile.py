"""A misbehaving fal for tests: a tiny threaded HTTP/1.1 server on raw sockets.

A real HTTP framework would refuse to misbehave the way a broken gateway or CDN does (lie about
``Content-Length``, reset the connection, trickle a body — or its headers — byte by byte, never
end it), so this server writes the bytes itself. Each route maps ``(method, path regex)`` to a
*behaviour*, a callable that gets the recorded request and the socket and writes whatever it
likes. Every request is recorded, so a test can count how often a path was hit (e.g. exactly one POST)::

    with HostileProvider() as fal:
        fal.route("GET", r"/x/requests/[^/]+", sequence(reset(), json_reply({"video": ...})))
        ...
        assert fal.count("POST", r"/x.*") == 1

Connections are closed after every response (``Connection: close``), which keeps the parser
trivial and is something every client must cope with anyway.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import socket
import socketserver
import struct
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from http import HTTPStatus
from typing import Literal

__all__ = [
    "Behaviour",
    "HeaderDrip",
    "HostileProvider",
    "Recorded",
    "SlowReader",
    "compression_bomb",
    "drip",
    "drip_headers",
    "endless",
    "event_flood",
    "gzip_bomb",
    "json_reply",
    "nested_json",
    "raw_reply",
    "redirect",
    "reset",
    "sequence",
    "stale_stream",
    "traced_peak",
]


@dataclass
class Recorded:
    """One request as received: ``headers`` has lower-case names; ``query`` is the raw query string."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes = b""
    stop: threading.Event = field(default_factory=threading.Event, repr=False)


#: A behaviour answers one request by writing to the socket (or by not answering at all).
Behaviour = Callable[[Recorded, socket.socket], None]


def _head(status: int, headers: dict[str, str], content_length: int | None) -> bytes:
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", "Connection: close"]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def raw_reply(
    body: bytes,
    status: int = 200,
    headers: dict[str, str] | None = None,
    content_length: int | Literal["auto"] | None = "auto",
) -> Behaviour:
    """Answer with ``body``; ``content_length`` may lie (an int) or be omitted (``None``)."""
    length = len(body) if content_length == "auto" else content_length

    def behave(_req: Recorded, sock: socket.socket) -> None:
        sock.sendall(_head(status, headers or {}, length) + body)

    return behave


def json_reply(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Behaviour:
    """Answer with ``body`` as JSON."""
    return raw_reply(
        json.dumps(body).encode(), status, {"Content-Type": "application/json", **(headers or {})}
    )


def sequence(*behaviours: Behaviour) -> Behaviour:
    """The n-th call gets the n-th behaviour; the last one repeats forever."""
    if not behaviours:
        raise ValueError("sequence() needs at least one behaviour")
    counter = itertools.count()
    lock = threading.Lock()

    def behave(req: Recorded, sock: socket.socket) -> None:
        with lock:
            n = next(counter)
        behaviours[min(n, len(behaviours) - 1)](req, sock)

    return behave


def reset() -> Behaviour:
    """Close the connection abruptly (TCP RST via ``SO_LINGER`` 0) without answering."""

    def behave(_req: Recorded, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    return behave


def drip(
    body: bytes,
    chunk: int = 1,
    every: float = 0.5,
    headers: dict[str, str] | None = None,
    status: int = 200,
) -> Behaviour:
    """Send honest headers at once, then ``chunk`` bytes of ``body`` every ``every`` seconds."""

    def behave(req: Recorded, sock: socket.socket) -> None:
        sock.sendall(_head(status, {"Content-Type": "video/mp4", **(headers or {})}, len(body)))
        for start in range(0, len(body), chunk):
            if req.stop.wait(every):
                return
            sock.sendall(body[start : start + chunk])

    return behave


class HeaderDrip:
    """A behaviour: the status line at once, then a header one byte every ``every`` seconds for
    ``lasting`` seconds, never ending the headers; then the connection is closed. Each read gets
    its byte well inside any read timeout over ``every``, and httpcore reads up to 100 KiB of
    headers, so only a deadline over the whole exchange ends the client's wait before the
    server does. ``ended`` is set when a drip ran its whole course (the client waited it out);
    ``started`` when one began (the request arrived)."""

    def __init__(self, every: float = 0.5, lasting: float = 60.0, status: int = 200) -> None:
        self.every = every
        self.lasting = lasting
        self.status = status
        self.started = threading.Event()
        self.ended = threading.Event()

    def __call__(self, req: Recorded, sock: socket.socket) -> None:
        reason = HTTPStatus(self.status).phrase
        sock.sendall(f"HTTP/1.1 {self.status} {reason}\r\nX-Slow: ".encode("latin-1"))
        self.started.set()
        end = time.monotonic() + self.lasting
        while time.monotonic() < end:
            if req.stop.wait(self.every):
                return
            sock.sendall(b"a")  # OSError once the client hung up: the handler ends quietly
        self.ended.set()


def drip_headers(every: float = 0.5, lasting: float = 60.0, status: int = 200) -> HeaderDrip:
    """Headers that never end: a byte every ``every`` s for ``lasting`` s (:class:`HeaderDrip`)."""
    return HeaderDrip(every, lasting, status)


def endless(chunk: int = 65536) -> Behaviour:
    """A 200 with no length whose body never ends (until the client hangs up)."""

    def behave(req: Recorded, sock: socket.socket) -> None:
        sock.sendall(_head(200, {"Content-Type": "video/mp4"}, None))
        block = b"\0" * chunk
        while not req.stop.is_set():
            sock.sendall(block)

    return behave


@cache
def gzip_bomb(inflated: int, layers: int = 2) -> bytes:
    """``inflated`` zero bytes gzipped ``layers`` times: 200 MiB twice gzipped is under 1 KB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = b"\0" * (1 << 20)
    data = b"".join(
        packer.compress(block[: min(len(block), inflated - at)]) for at in range(0, inflated, len(block))
    )
    data += packer.flush()
    for _ in range(layers - 1):
        data = gzip.compress(data, 9)
    return data


def compression_bomb(
    inflated: int = 200 << 20, layers: int = 2, status: int = 200, content_type: str = "application/json"
) -> Behaviour:
    """A small body that inflates to ``inflated`` bytes, sent as ``Content-Encoding: gzip, gzip``
    (``layers`` codings): a client that inflates each chunk whole holds it all at once."""
    headers = {"Content-Type": content_type, "Content-Encoding": ", ".join(["gzip"] * layers)}
    return raw_reply(gzip_bomb(inflated, layers), status, headers)


def event_flood(total: int = 200 << 20, chunk: int = 65536) -> Behaviour:
    """A 200 ``text/event-stream`` whose one event never ends: ``data: `` then ``total`` bytes
    of ``a`` without a newline (until the client hangs up)."""

    def behave(req: Recorded, sock: socket.socket) -> None:
        sock.sendall(_head(200, {"Content-Type": "text/event-stream"}, None) + b"data: ")
        block = b"a" * chunk
        for _ in range(0, total, chunk):
            if req.stop.is_set():
                return
            sock.sendall(block)

    return behave


def stale_stream(
    first: bytes, repeat: bytes, every: float, hung_up: threading.Event | None = None
) -> Behaviour:
    """A 200 ``text/event-stream`` that stays open and never ends its request: ``first``, then
    ``repeat`` every ``every`` seconds (a keep-alive comment, an event that changes nothing),
    until the client hangs up — then ``hung_up`` is set — or the provider closes."""

    def behave(req: Recorded, sock: socket.socket) -> None:
        try:
            sock.sendall(_head(200, {"Content-Type": "text/event-stream"}, None) + first)
            while not req.stop.wait(every):
                sock.sendall(repeat)
        except OSError:
            if hung_up is not None:
                hung_up.set()
            raise

    return behave


def breaking_stream(first: bytes, after: float) -> Behaviour:
    """A 200 ``text/event-stream`` that sends ``first``, then hangs up ``after`` seconds later
    without ending its request (or when the provider closes): a stream that keeps breaking."""

    def behave(req: Recorded, sock: socket.socket) -> None:
        sock.sendall(_head(200, {"Content-Type": "text/event-stream"}, None) + first)
        req.stop.wait(after)

    return behave


@contextmanager
def traced_peak() -> Iterator[Callable[[], int]]:
    """The most memory Python held at once (bytes, :mod:`tracemalloc`: every thread's objects,
        zlib's output among them) from here on: ``with traced_peak() as peak: …``, then ``peak()``
    (inside or after the block)."""
    held = [0]

    def peak() -> int:
        if tracemalloc.is_tracing():
            held[0] = tracemalloc.get_traced_memory()[1]
        return held[0]

    tracemalloc.start()
    try:
        yield peak
    finally:
        peak()
        tracemalloc.stop()


def redirect(location: str, status: int = 302) -> Behaviour:
    """A redirect to ``location``."""
    return raw_reply(b"", status, {"Location": location})


def nested_json(depth: int = 100_000) -> Behaviour:
    """A 200 whose JSON object is nested ``depth`` levels deep (valid JSON, hostile to recursion)."""
    body = b'{"a":' * depth + b"1" + b"}" * depth
    return raw_reply(body, 200, {"Content-Type": "application/json"})


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        try:
            req = self._read_request(sock)
            if req is None:
                return
            self.server.owner._dispatch(req, sock)
        except OSError:
            pass  # the client hung up, or a behaviour reset the connection: both are the point

    @staticmethod
    def _read_request(sock: socket.socket) -> Recorded | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        path, _, query = target.partition("?")
        return Recorded(method.upper(), path, query, headers, rest[:length])


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: HostileProvider, host: str) -> None:
        self.owner = owner
        super().__init__((host, 0), _Handler)


class HostileProvider:
    """A threaded raw-socket HTTP/1.1 server on ``127.0.0.1:<free port>``; use as a context manager.

    Unrouted requests get a JSON 404. Later routes win over earlier ones, so a test can override
    a default route. ``requests`` lists every request received, in arrival order. ``host`` may be
    another loopback address (``127.0.0.3``, e.g. to play a cloud metadata service).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._server = _Server(self, host)
        self.host: str = host
        self.port: int = self._server.server_address[1]
        self.url: str = f"http://{self.host}:{self.port}"
        self.requests: list[Recorded] = []
        self._routes: list[tuple[str, re.Pattern[str], Behaviour]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def route(self, method: str, path_regex: str, behaviour: Behaviour) -> None:
        """Answer ``method`` requests whose path (no query) fully matches ``path_regex``."""
        with self._lock:
            self._routes.append((method.upper(), re.compile(path_regex), behaviour))

    def count(self, method: str, path_regex: str) -> int:
        """How many ``method`` requests had a path fully matching ``path_regex``."""
        pattern = re.compile(path_regex)
        with self._lock:
            return sum(1 for r in self.requests if r.method == method.upper() and pattern.fullmatch(r.path))

    def _dispatch(self, req: Recorded, sock: socket.socket) -> None:
        req.stop = self._stop
        with self._lock:
            self.requests.append(req)
            routes = list(reversed(self._routes))
        for method, pattern, behaviour in routes:
            if method == req.method and pattern.fullmatch(req.path):
                behaviour(req, sock)
                return
        json_reply({"detail": f"no route for {req.method} {req.path}"}, 404)(req, sock)

    def start(self) -> HostileProvider:
        """Serve in a daemon thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
            self._thread.daemon = True
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; trickling behaviours notice and stop writing."""
        self._stop.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> HostileProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, every: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value (a test helper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


class SlowReader:
    """A host on a slow uplink, seen from the client: a raw HTTP/1.1 server on
    ``127.0.0.1:<free port>`` that reads each request's body ``piece`` bytes every ``every``
    seconds (``piece=0``: never reads it, holding the connection), then answers with
    ``answer`` (a behaviour, as :class:`HostileProvider`'s routes). Its receive buffer is
    small, so the client's writes wait on the reading, as they would on a slow link (the
    client's own send buffer still takes a few MiB ahead). ``taken`` counts the body bytes
    read; ``done`` is set once a body was read whole. Use as a context manager."""

    def __init__(self, answer: Behaviour, piece: int = 64 * 1024, every: float = 0.02) -> None:
        self.answer = answer
        self.piece = piece
        self.every = every
        self.taken = 0
        self.done = threading.Event()
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # before listen: inherited
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(30)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(1)
                    if not chunk:
                        return
                    head += chunk
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                fields = (h.partition(":") for h in lines[1:] if h)
                headers = {k.strip().lower(): v.strip() for k, _, v in fields}
                length = int(headers.get("content-length", "0") or 0)
                if self.piece <= 0:  # reads nothing: the client's writes stall
                    self._stop.wait()
                    return
                got = 0
                while got < length:
                    if self._stop.wait(self.every):
                        return
                    chunk = conn.recv(min(self.piece, length - got))
                    if not chunk:
                        return
                    got += len(chunk)
                    self.taken += len(chunk)
                self.done.set()
                path, _, query = target.partition("?")
                request = Recorded(method.upper(), path, query, headers)
                request.stop = self._stop
                self.answer(request, conn)
            except OSError:
                pass  # the client hung up: the point of some tests

    def __enter__(self) -> SlowReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)
