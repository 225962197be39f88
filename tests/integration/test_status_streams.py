"""Status streams against the simulator: every completion reported, and connections reused.

A status stream closed unread after its COMPLETED event took its connection with it, so each
job paid a new TCP connection and TLS handshake (issue #11's drain profile). The watcher now
reads each stream to its end, and one connection serves stream after stream.
"""

from __future__ import annotations

import threading
from typing import Any

import httpcore
import httpx

from falsim.options import SimulatorOptions
from falsim.server import running_simulator
from tests.hostile import wait_for
from worker import watcher as watcher_module
from worker.fal.client import FalClient
from worker.fal.models import Status
from worker.watcher import StatusWatcher

T2V = "fal-ai/wan-22"
KEY = "8d3c1f0e-5a6b-4c7d-9e8f-0a1b2c3d4e5f:0f1e2d3c4b5a69788796a5b4c3d2e1f0"


class _CountingBackend(httpcore.SyncBackend):
    """The default network backend, counting the TCP connections it opens."""

    def __init__(self) -> None:
        self.connections = 0

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        self.connections += 1
        return super().connect_tcp(*args, **kwargs)


def _counting_transport(backend: _CountingBackend) -> httpx.HTTPTransport:
    transport = httpx.HTTPTransport()
    transport._pool = httpcore.ConnectionPool(network_backend=backend)  # httpx has no public hook
    return transport


def test_streams_followed_one_after_another_share_one_connection() -> None:
    options = SimulatorOptions(concurrency_limit=4, latency_seconds=0.05, latency_jitter=0.0)
    earlier = set(_watch_threads())  # an earlier test's watcher may still have an idle one
    with running_simulator(options) as sim:
        backend = _CountingBackend()
        client = FalClient(
            queue_url=sim.url,
            rest_url=sim.url,
            key=KEY,
            timeout=httpx.Timeout(10.0),
            transport=_counting_transport(backend),
        )
        ended: list[str] = []
        done = threading.Event()

        def on_status(job_id: str, _request_id: str, status: Status) -> None:
            if status.completed:
                ended.append(job_id)
                done.set()

        watcher = StatusWatcher(client, on_status, lambda *_: None, max_streams=4)
        try:
            for n in range(6):
                handle = client.submit(T2V, {"prompt": f"stream {n}", "resolution": "480p"}).handle
                done.clear()
                assert watcher.watch(f"job-{n}", handle)
                assert done.wait(10)
                assert wait_for(lambda: not watcher.watching(), timeout=10)  # the stream was read out
        finally:
            watcher.close()
            client.close()
    assert ended == [f"job-{n}" for n in range(6)]
    assert backend.connections == 1  # six submits and six streams, one after another, one connection
    assert len(set(_watch_threads()) - earlier) == 1  # and one thread read them all, one after another


def _watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wanbatch-watch"]


def test_concurrent_streams_get_a_thread_each_and_idle_threads_exit(monkeypatch: Any) -> None:
    """Five streams open at once get a thread each, in each of two rounds; idle threads leave.

    Timing-free: fal holds every request in its queue (no slot) until all five are followed, so
    the five streams are open together however slowly a loaded machine submits (with fal's
    latency alone, a slow submit let one request end before the next began, and fewer threads
    were needed)."""
    monkeypatch.setattr(watcher_module, "IDLE_THREAD_SECONDS", 2.0)
    assert wait_for(lambda: not _watch_threads(), timeout=10)  # none left by an earlier test
    options = SimulatorOptions(concurrency_limit=0, latency_seconds=0.3, latency_jitter=0.0)
    with running_simulator(options) as sim:
        client = FalClient(queue_url=sim.url, rest_url=sim.url, key=KEY, timeout=httpx.Timeout(10.0))
        ended: list[str] = []
        lock = threading.Lock()

        def on_status(job_id: str, _request_id: str, status: Status) -> None:
            if status.completed:
                with lock:
                    ended.append(job_id)

        watcher = StatusWatcher(client, on_status, lambda *_: None, max_streams=8)
        try:
            for rnd in range(2):
                sim.update_options(concurrency_limit=0)  # fal holds them all in its queue
                handles = [
                    client.submit(T2V, {"prompt": f"together {rnd} {n}", "resolution": "480p"}).handle
                    for n in range(5)
                ]
                for n, handle in enumerate(handles):
                    assert watcher.watch(f"job-{rnd}-{n}", handle)
                assert wait_for(lambda: len(watcher.watching()) == 5, timeout=30)
                assert wait_for(lambda: len(_watch_threads()) == 5, timeout=30)  # a thread each
                sim.update_options(concurrency_limit=8)  # fal runs them
                assert wait_for(lambda: not watcher.watching(), timeout=30)
            assert wait_for(lambda: not _watch_threads(), timeout=30)  # idle ones leave
            handle = client.submit(T2V, {"prompt": "after", "resolution": "480p"}).handle
            assert watcher.watch("job-after", handle)  # and a new stream still gets one
            assert wait_for(lambda: "job-after" in ended, timeout=30)
        finally:
            watcher.close()
            client.close()
    assert sorted(ended) == sorted([f"job-{r}-{n}" for r in range(2) for n in range(5)] + ["job-after"])
