"""A stand-in HTTP proxy on loopback: it records every request it is sent (request line and
headers) and answers each ``502 Bad Gateway``, as a corporate proxy that cannot reach the target
would (Squid answers a ``CONNECT`` so when fal is down), or another status line (``answer``:
``407 Proxy Authentication Required``, ``403 Forbidden``). A test sets ``HTTP_PROXY`` (or
``HTTPS_PROXY``) to it and checks what, if anything, went through it, and what was said of it."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Captured:
    """What the proxy was sent: one list of header lines (the request line first) per request."""

    url: str = ""
    requests: list[list[str]] = field(default_factory=list)

    def text(self) -> str:
        """Everything it saw, one line each (to search for a key)."""
        return "\n".join(line for request in self.requests for line in request)


@contextmanager
def capture_proxy(answer: str = "502 Bad Gateway") -> Iterator[Captured]:
    """A running stand-in proxy on 127.0.0.1 (a free port) answering every request with the
    status line ``answer``, stopped on exit."""
    extra = b'Proxy-Authenticate: Basic realm="corp"\r\n' if answer.startswith("407") else b""
    seen = Captured()
    lock = threading.Lock()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            lines: list[str] = []
            while True:
                line = self.rfile.readline(65536)
                if not line or line in (b"\r\n", b"\n"):
                    break
                lines.append(line.decode("latin-1").rstrip("\r\n"))
            with lock:
                seen.requests.append(lines)
            self.wfile.write(
                f"HTTP/1.1 {answer}\r\n".encode() + extra + b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )

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
