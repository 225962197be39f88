"""A local S3 for tests: moto's ``ThreadedMotoServer`` on a free loopback port, and a fault proxy.

:class:`MotoS3` starts moto in a thread of the test process (``with MotoS3() as s3:``), resets
its state (moto keeps buckets process-wide) and stops it at the end. :func:`aws_env` points
boto3 — and so wanbatch — at it with made-up credentials, away from any real AWS profile.

:class:`S3FaultProxy` stands between wanbatch and moto, forwarding every request, and answers
``403 AccessDenied`` to the ``PUT``\\ s whose path contains a given text (all of them, or only
the first *n* per key): a storage outage of the outputs' keys while the writability probe still
passes, i.e. an upload failure *during* a run, without touching wanbatch's code. It can refuse
``HEAD``\\ s too (credentials that may write but not read), answer chosen ``PUT``\\ s late (a slow
storage), or hold the first ``PUT`` of each chosen key until the test lets it fail.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httpx
import pytest

from tests.ports import unused_port

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: Made-up credentials, distinctive so that a leak is found by a plain substring search.
ACCESS_KEY = "AKIAWANBATCHTEST0001"
SECRET_KEY = "s3-secret-9c41e7d2-never-print-me"

#: Variables that would point boto3 at a real account or another endpoint.
_FOREIGN = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
)


def aws_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point boto3 at ``endpoint`` with the test credentials, isolated from ``~/.aws``."""
    for name in _FOREIGN:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


class MotoS3:
    """moto's S3 server on a free loopback port, fresh (reset) when it starts."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = unused_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: Any = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.running = False

    def __enter__(self) -> MotoS3:
        self._server.start()
        self.running = True
        httpx.post(f"{self.url}/moto-api/reset", timeout=10).raise_for_status()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the server (a test's "the storage went away"); idempotent."""
        if self.running:
            self._server.stop()
            self.running = False

    def client(self) -> S3Client:
        """A boto3 client of this server for the test's own checks (not wanbatch's)."""
        import boto3

        client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        return client


def keys(client: S3Client, bucket: str, prefix: str = "") -> list[str]:
    """Every key in ``bucket`` under ``prefix``, sorted."""
    found: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found += [obj["Key"] for obj in page.get("Contents", [])]
    return sorted(found)


def object_sha256(client: S3Client, bucket: str, key: str) -> str:
    """The SHA-256 (hex) of the object's bytes as the server returns them."""
    return hashlib.sha256(client.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()


def b64(sha256_hex: str) -> str:
    """A hex SHA-256 in the base64 form of S3's ``ChecksumSHA256``."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


@dataclass
class _Rules:
    refuse_text: str | None = None
    refuse_first: int | None = None  # None: every matching PUT
    refuse_heads: str | None = None  # HEADs whose path contains it are refused, every one
    delay_text: str | None = None  # PUTs whose path contains it are answered late
    delay_seconds: float = 0.0
    hold_text: str | None = None  # the first PUT per key whose path contains it waits, then 403
    key_limit: int | None = None  # PUTs of a longer key (bytes of UTF-8) get KeyTooLongError
    held: threading.Event = field(default_factory=threading.Event)  # set when one waits
    release: threading.Event = field(default_factory=threading.Event)  # lets it fail
    held_keys: set[str] = field(default_factory=set)
    puts: Counter[str] = field(default_factory=Counter)  # PUTs forwarded to the server, per key
    seen: Counter[str] = field(default_factory=Counter)
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def holds(self, method: str, path: str) -> bool:
        """Whether this is the first PUT of a held key (it then waits for :attr:`release`)."""
        if method != "PUT" or self.hold_text is None or self.hold_text not in path:
            return False
        key = path.split("?", 1)[0]
        with self.lock:
            if key in self.held_keys:
                return False
            self.held_keys.add(key)
        self.held.set()
        self.release.wait(60)
        return True

    def refuses(self, method: str, path: str) -> bool:
        if method == "HEAD" and self.refuse_heads is not None and self.refuse_heads in path:
            with self.lock:
                self.refused.append(path.split("?", 1)[0])
            return True
        if method != "PUT" or self.refuse_text is None or self.refuse_text not in path:
            return False
        key = path.split("?", 1)[0]
        with self.lock:
            self.seen[key] += 1
            refuse = self.refuse_first is None or self.seen[key] <= self.refuse_first
            if refuse:
                self.refused.append(key)
            return refuse


_ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied (injected by the test)</Message></Error>"
)
_KEY_TOO_LONG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>KeyTooLongError</Code>'
    b"<Message>Your key is too long</Message></Error>"
)
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class S3FaultProxy:
    """An HTTP proxy to an S3 server that refuses chosen uploads (see the module docstring)."""

    def __init__(self, upstream_port: int) -> None:
        self.rules = _Rules()
        rules, upstream = self.rules, upstream_port

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.command == "PUT" and rules.key_limit is not None:
                    # path-style: /bucket/key?query, the key percent-encoded
                    key = unquote(self.path.split("?", 1)[0]).split("/", 2)[-1]
                    if len(key.encode("utf-8")) > rules.key_limit:
                        self.send_response(400)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(_KEY_TOO_LONG)))
                        self.end_headers()
                        self.wfile.write(_KEY_TOO_LONG)
                        return
                if rules.holds(self.command, self.path) or rules.refuses(self.command, self.path):
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    if self.command == "HEAD":  # S3 answers a HEAD without a body
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_header("Content-Length", str(len(_ACCESS_DENIED)))
                    self.end_headers()
                    self.wfile.write(_ACCESS_DENIED)
                    return
                if self.command == "PUT":
                    with rules.lock:
                        rules.puts[self.path.split("?", 1)[0]] += 1
                conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                finally:
                    conn.close()
                if self.command == "PUT" and rules.delay_text is not None and rules.delay_text in self.path:
                    time.sleep(rules.delay_seconds)  # stored, and answered late
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in _HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                if self.command == "HEAD":
                    self.send_header("Content-Length", answer.getheader("Content-Length") or "0")
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def refuse_puts(self, containing: str, *, first: int | None = None) -> None:
        """Answer 403 to PUTs whose path contains ``containing``: every one, or the first
        ``first`` per key."""
        self.rules.refuse_text, self.rules.refuse_first = containing, first

    def delay_puts(self, containing: str, seconds: float) -> None:
        """Answer every PUT whose path contains ``containing`` ``seconds`` late (it is stored at
        once, as a slow storage's is before its answer comes)."""
        self.rules.delay_text, self.rules.delay_seconds = containing, seconds

    def hold_first_puts(self, containing: str) -> None:
        """Hold the first PUT of each key whose path contains ``containing`` (``rules.held`` is
        set when one arrives) until ``rules.release`` is set, then answer it 403; later PUTs of
        the key go through."""
        self.rules.hold_text = containing

    def limit_keys(self, max_bytes: int) -> None:
        """Answer ``400 KeyTooLongError`` to every PUT of a key longer than ``max_bytes`` bytes
        of UTF-8, as S3 does past 1024 (a storage with a shorter limit, for a test)."""
        self.rules.key_limit = max_bytes

    def refuse_heads(self, containing: str) -> None:
        """Answer 403 to every HEAD whose path contains ``containing`` (``""``: all of them):
        credentials that may write but not read."""
        self.rules.refuse_heads = containing

    def __enter__(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.rules.release.set()  # a PUT still held fails now
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
