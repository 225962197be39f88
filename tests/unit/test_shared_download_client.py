"""One download client per runtime, shared by its threads: connections are reused, the guard holds.

Each download used to open its own client, so every video paid a new TCP connection and TLS
handshake (issue #11). Counted here on a small keep-alive server: concurrent downloads through
one :class:`SharedDownloadClient` open no more connections than downloads run at once, and a
pooled connection never carries a request for another host past the address guard.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs.db import make_engine
from jobs.errors import FinalProviderError
from tests.hostile_fal import sample_video
from tests.step_runtime import make_runtime, settings_for
from worker.fal.storage import DownloadPolicy, SharedDownloadClient, download
from worker.runtime import close_runtime
from worker.steps.download import download_client

TIMEOUT = httpx.Timeout(10.0, connect=5.0)


class KeepAliveServer:
    """An HTTP/1.1 server that keeps connections open and counts them (and the requests)."""

    def __init__(self, body: bytes) -> None:
        self.connections = 0
        self.requests = 0
        self.cookies_seen = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                with lock:
                    outer.connections += 1
                super().setup()

            def do_GET(self) -> None:
                with lock:
                    outer.requests += 1
                    outer.cookies_seen += "cookie" in self.headers
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Set-Cookie", "session=tracked; Path=/")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})

    def __enter__(self) -> KeepAliveServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def server() -> Iterator[KeepAliveServer]:
    with KeepAliveServer(sample_video()) as running:
        yield running


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, str]) -> None:
    """Resolve made-up names to the given addresses (other names as usual)."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_concurrent_downloads_share_connections(server: KeepAliveServer, tmp_path: Path) -> None:
    policy = DownloadPolicy.for_urls([f"http://127.0.0.1:{server.port}"], None)
    shared = SharedDownloadClient(policy, TIMEOUT)
    responses = 0

    def on_response(_response: httpx.Response) -> None:
        nonlocal responses
        responses += 1

    def fetch(n: int) -> int:
        return download(
            f"http://127.0.0.1:{server.port}/v{n}.mp4",
            tmp_path / f"v{n}.mp4",
            max_bytes=1 << 20,
            client=shared.get(),
            policy=policy,
            timeout=TIMEOUT,
            on_response=on_response,
            expect_video=True,
        ).size

    with ThreadPoolExecutor(max_workers=4) as pool:
        sizes = list(pool.map(fetch, range(12)))
    shared.close()
    assert sizes == [len(sample_video())] * 12
    assert (server.requests, responses) == (12, 12)
    assert 1 <= server.connections <= 4  # at most one per download running at once, not 12
    assert server.cookies_seen == 0  # nothing carried from one download to the next


def test_a_pooled_connection_never_serves_another_host(
    server: KeepAliveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both names lead to the same loopback server; only the fal host may be reached there.
    fake_dns(monkeypatch, {"fal.example": "127.0.0.1", "elsewhere.example": "127.0.0.1"})
    policy = DownloadPolicy.for_urls([f"http://fal.example:{server.port}"], None)
    shared = SharedDownloadClient(policy, TIMEOUT)
    client = shared.get()
    ok = download(
        f"http://fal.example:{server.port}/a.mp4",
        tmp_path / "a.mp4",
        max_bytes=1 << 20,
        client=client,
        policy=policy,
    )
    assert ok.size == len(sample_video())
    # An idle connection to 127.0.0.1:port is pooled, but for fal.example's origin only: the
    # other name needs a new connection, and the guard refuses its loopback address.
    with pytest.raises(FinalProviderError, match="loopback"):
        download(
            f"http://elsewhere.example:{server.port}/b.mp4",
            tmp_path / "b.mp4",
            max_bytes=1 << 20,
            client=client,
            policy=policy,
        )
    assert (server.connections, server.requests) == (1, 1)
    assert not (tmp_path / "b.mp4").exists()
    shared.close()


def test_a_closed_shared_client_refuses_and_closes_its_connections() -> None:
    shared = SharedDownloadClient(DownloadPolicy(), TIMEOUT)
    client = shared.get()
    assert shared.get() is client  # made once
    shared.close()
    shared.close()  # twice is harmless
    assert client.is_closed
    with pytest.raises(RuntimeError, match="closed"):
        shared.get()


def test_one_download_client_per_runtime_closed_with_it(sqlite_url: str, tmp_path: Path) -> None:
    engine = make_engine(sqlite_url)
    settings = settings_for("http://127.0.0.1:9", "k", output_dir=tmp_path)
    rt, other = make_runtime(engine, settings), make_runtime(engine, settings)
    shared = download_client(rt)
    assert download_client(rt) is shared
    assert download_client(other) is not shared
    client = shared.get()
    close_runtime(rt)
    assert client.is_closed
    assert rt.client.http.is_closed
    assert download_client(rt) is not shared  # a late download gets a fresh one
    close_runtime(rt)
    close_runtime(other)
    engine.dispose()
