"""Shared helpers for the simulator's integration tests (real sockets, real httpx)."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from PIL import Image

AUTH = {"Authorization": "Key sim-test-key"}


def png_data_uri(width: int = 400, height: int = 400) -> str:
    """A small real PNG as a data URI."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wait_completed(client: httpx.Client, status_url: str, timeout: float = 15.0) -> dict[str, Any]:
    """Poll a status URL until COMPLETED; every intermediate answer must be a 202."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = client.get(status_url, params={"logs": 1})
        body = resp.json()
        if body["status"] == "COMPLETED":
            assert resp.status_code == 200
            return dict(body)
        assert resp.status_code == 202, resp.text
        assert body["status"] in ("IN_QUEUE", "IN_PROGRESS")
        time.sleep(0.02)
    raise AssertionError(f"{status_url} did not complete in {timeout}s")


def wait_in_progress(client: httpx.Client, status_url: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll a status URL until the request runs (``IN_PROGRESS``): a test that acts on a running
    request waits for it to run, not for a guessed while (too short on a loaded machine, the
    request is still queued; too long, it has completed)."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(status_url).json()
        if body["status"] == "IN_PROGRESS":
            return body
        assert body["status"] == "IN_QUEUE", f"{status_url} is {body['status']}, never seen running"
        assert time.monotonic() < deadline, f"{status_url} still queued after {timeout:.0f}s"
        time.sleep(0.02)


def verify_webhook(jwks: dict[str, Any], headers: httpx.Headers | dict[str, str], body: bytes) -> bool:
    """fal's scheme: Ed25519 over rid\\nuid\\nts\\nsha256hex(body), any key of the JWKS."""
    h = {k.lower(): v for k, v in dict(headers).items()}
    message = "\n".join(
        [
            h["x-fal-webhook-request-id"],
            h["x-fal-webhook-user-id"],
            h["x-fal-webhook-timestamp"],
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    signature = bytes.fromhex(h["x-fal-webhook-signature"])
    for key in jwks["keys"]:
        raw = base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
            return True
        except Exception:
            continue
    return False


@dataclass
class Receiver:
    """What a webhook receiver got; answers ``statuses`` in turn (then 200)."""

    url: str = ""
    #: The CA file of an HTTPS receiver (``webhook_receiver(tls=…)``), None for plain HTTP.
    ca_file: Path | None = None
    statuses: list[int] = field(default_factory=list)
    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    event: threading.Event = field(default_factory=threading.Event)


@contextmanager
def webhook_receiver(statuses: list[int] | None = None, *, tls: Path | None = None) -> Iterator[Receiver]:
    """A real HTTP server on loopback that records webhook deliveries; with ``tls`` (a folder),
    HTTPS at ``https://localhost:PORT/hook``, with a self-signed certificate made there
    (``ca_file``, for ``SSL_CERT_FILE``)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    rec = Receiver(statuses=list(statuses or []))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            rec.calls.append((dict(self.headers.items()), body))
            code = rec.statuses.pop(0) if rec.statuses else 200
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()
            if code == 200:
                rec.event.set()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    if tls is not None:
        import ssl

        from falsim.tls import make_self_signed

        rec.ca_file, key = make_self_signed(tls, "localhost")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(rec.ca_file, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        rec.url = f"https://localhost:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
