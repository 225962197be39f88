"""The quick S3 reads (a dispatch round's look for sidecars) give up within seconds.

Review: the look used the output store's client, which connects within 10 s, waits 60 s for an
answer and tries 3 times, so each read of a storage that does not answer held its thread for
minutes. Against a loopback endpoint that accepts and never answers, a quick read fails (the
storage "cannot be asked") within its one try of 2 s to connect and 3 s to answer.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from jobs import output_store
from jobs.output_store import OutputReadError


@pytest.fixture
def silent_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3 endpoint on loopback that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "quick-read-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "quick-read-test")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    try:
        yield url
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def test_a_quick_read_of_a_silent_storage_gives_up_within_seconds(silent_endpoint: str) -> None:
    started = time.monotonic()
    with pytest.raises(OutputReadError):
        output_store.read_sidecar("s3://bucket/prefix/batch/000000-abc.mp4", quick=True)
    took = time.monotonic() - started
    assert took < 15, f"the quick read took {took:.1f} s"  # the default client: over 3 minutes
