"""Name lookups obey the exchange's deadline and the connect timeout.

``socket.create_connection`` (httpcore's connect) and the download guard called
``getaddrinfo`` with no timeout: a resolver that does not answer (a dead nameserver in
``resolv.conf``; glibc waits timeout × attempts × servers, a broken or hostile one longer) held
a submit, a status call, a download and its worker slot for as long as it took, past every
deadline. Here the resolver itself is the only stand-in (``socket.getaddrinfo`` patched: DNS is
no service of the project's); every server is a real one on loopback. A hung lookup answers
only once the test lets it (or after :data:`HANG` s): each call must end before that, saying
which name did not answer.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest

from jobs.errors import RetryableProviderError
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.loopback_proxy import BAD_GATEWAY, loopback_proxy
from worker.fal import http
from worker.fal.client import FalClient
from worker.fal.errors import FalUnreachableError
from worker.fal.http import RESOLVER_THREADS, RetryPolicy, cut_off_at, resolve
from worker.fal.storage import DownloadPolicy, SharedDownloadClient, download

#: The most a hung lookup waits for the test to let it answer: far past every deadline here.
HANG = 20.0
#: connect 0.3 s, read 0.6 s: a lookup gets the connect timeout, an exchange 1.5 s in all.
FAL_TIMEOUT = httpx.Timeout(0.6, connect=0.3)
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def _lookup_timed_out(name: str) -> str:
    return rf"the name lookup of '{re.escape(name)}' did not answer within [0-9.]+ s"


@dataclass
class Resolver:
    """The stand-in resolver: names in ``hung`` answer 127.0.0.1 only once ``release`` is set;
    names in ``prompt`` answer 127.0.0.1 at once; others resolve as usual."""

    hung: set[str]
    prompt: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    asked: list[str] = field(default_factory=list)
    answered: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def asked_for(self, name: str) -> int:
        with self.lock:
            return self.asked.count(name)


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[Resolver]:
    resolver = Resolver(hung={"slow.test", "proxy-slow.test"}, prompt={"named.test", "proxy.test"})
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name in resolver.hung or (isinstance(name, str) and name.startswith("hung-")):
            with resolver.lock:
                resolver.asked.append(name)
            resolver.release.wait(HANG)
            resolver.answered.set()
        elif name not in resolver.prompt:
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port)))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for variable in PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
        monkeypatch.delenv(variable.lower(), raising=False)
    # A resolver of this test's own: lookups hung by another test hold none of its threads.
    monkeypatch.setattr(http, "_RESOLVER", http._Resolver(RESOLVER_THREADS))
    try:
        yield resolver
    finally:
        resolver.release.set()  # the lingering lookups end


def _poll(condition: Callable[[], bool], cap: float = 30.0) -> None:
    """Wait until ``condition`` holds (at most ``cap`` s: a generous cap, not a timing check)."""
    end = time.monotonic() + cap
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def _fal(url: str) -> FalClient:
    return FalClient(
        queue_url=url,
        rest_url=url,
        key="k",
        timeout=FAL_TIMEOUT,
        retry=RetryPolicy(attempts=1, base_delay=0.0),
        sleep=lambda _s: None,
    )


# ---------------------------------------------------------------------------------- downloads


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shared", [False, True], ids=["own-client", "shared-client"])
def test_a_download_whose_name_lookup_hangs_ends_at_its_total_timeout(
    dns: Resolver, hostile: HostileProvider, tmp_path: Path, shared: bool
) -> None:
    """Before, the download waited for the resolver (here :data:`HANG` s; as long as it takes
    in production) although its total timeout was 1 s, then failed as too slow."""
    FakeFal(hostile)
    policy = DownloadPolicy(allowed_hosts=("slow.test",))
    timeout = httpx.Timeout(5.0, connect=5.0)
    pool = SharedDownloadClient(policy, timeout)
    try:
        with pytest.raises(RetryableProviderError, match=_lookup_timed_out("slow.test")) as info:
            download(
                f"http://slow.test:{hostile.port}/files/r1.mp4",
                tmp_path / "v.mp4",
                max_bytes=1 << 20,
                policy=policy,
                client=pool.get() if shared else None,
                timeout=timeout,
                total_timeout=1.0,
                expect_video=True,
            )
    finally:
        pool.close()
    assert not dns.answered.is_set()  # it ended while the resolver still had not answered
    assert "ConnectTimeout" in str(info.value)
    assert "\n" not in str(info.value)
    assert hostile.requests == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(60)
def test_a_download_from_a_name_connects_to_the_address_it_resolves_to(
    dns: Resolver, hostile: HostileProvider, tmp_path: Path
) -> None:
    """The lookup moved to a thread of its own; the guard still connects to what it checked."""
    fal = FakeFal(hostile)
    policy = DownloadPolicy(allowed_hosts=("named.test",))
    got = download(
        f"http://named.test:{hostile.port}/files/r1.mp4",
        tmp_path / "v.mp4",
        max_bytes=1 << 20,
        policy=policy,
        timeout=httpx.Timeout(5.0, connect=5.0),
        total_timeout=30.0,
        expect_video=True,
    )
    assert got.size == len(fal.video)
    assert dns.asked == []


# ---------------------------------------------------------------------------------- fal's API


@pytest.mark.timeout(60)
def test_a_status_call_whose_name_lookup_hangs_ends_at_the_connect_timeout(
    dns: Resolver, hostile: HostileProvider
) -> None:
    fal = FakeFal(hostile)
    with (
        _fal(f"http://slow.test:{hostile.port}") as client,
        pytest.raises(RetryableProviderError, match=_lookup_timed_out("slow.test")) as info,
    ):
        client.status(client.handle(fal.endpoint, "r1"))
    assert not dns.answered.is_set()
    assert "within 0.3 s" in str(info.value)  # the connect timeout, nearer than the deadline
    assert hostile.requests == []


@pytest.mark.timeout(60)
def test_a_submit_whose_name_lookup_hangs_is_not_sent(dns: Resolver, hostile: HostileProvider) -> None:
    """fal was not reached: a connect failure (not counted as an attempt), never ambiguous."""
    fal = FakeFal(hostile)
    with (
        _fal(f"http://slow.test:{hostile.port}") as client,
        pytest.raises(FalUnreachableError, match=_lookup_timed_out("slow.test")),
    ):
        client.submit(fal.endpoint, {"prompt": "p"})
    assert not dns.answered.is_set()
    assert fal.posts() == 0


@pytest.mark.timeout(60)
def test_fal_by_name_is_reached_at_the_address_it_resolves_to(
    dns: Resolver, hostile: HostileProvider
) -> None:
    fal = FakeFal(hostile)
    with _fal(f"http://named.test:{hostile.port}") as client:
        client.submit(fal.endpoint, {"prompt": "p"})
    assert fal.posts() == 1
    assert hostile.requests[0].headers.get("host") == f"named.test:{hostile.port}"


# ------------------------------------------------------------------------------------ proxies


@pytest.mark.timeout(60)
def test_a_proxy_named_by_host_name_is_still_used(dns: Resolver, monkeypatch: pytest.MonkeyPatch) -> None:
    with loopback_proxy(BAD_GATEWAY) as proxy:
        port = proxy.url.rsplit(":", 1)[1]
        monkeypatch.setenv("HTTP_PROXY", f"http://proxy.test:{port}")
        with _fal("http://fal.invalid") as client, pytest.raises(RetryableProviderError, match="502"):
            client.status(client.handle("fal-ai/wan-22", "r1"))
    assert proxy.requests
    assert proxy.requests[0][0].startswith("GET http://fal.invalid/")


@pytest.mark.timeout(60)
def test_a_proxy_whose_name_lookup_hangs_ends_at_the_connect_timeout(
    dns: Resolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy-slow.test:3128")
    with (
        _fal("http://fal.invalid") as client,
        pytest.raises(RetryableProviderError, match=_lookup_timed_out("proxy-slow.test")),
    ):
        client.status(client.handle("fal-ai/wan-22", "r1"))
    assert not dns.answered.is_set()


# ----------------------------------------------------------------------------------- resolver


@pytest.mark.timeout(60)
def test_the_nearest_deadline_bounds_a_lookup_with_no_timeout(dns: Resolver) -> None:
    with (
        cut_off_at(time.monotonic() + 0.2, "deadline") as cut,
        pytest.raises(httpcore.ConnectTimeout, match=_lookup_timed_out("slow.test")),
    ):
        resolve("slow.test", 80, None)
    assert cut is not None
    assert not dns.answered.is_set()


@pytest.mark.timeout(60)
def test_hung_lookups_hold_a_bounded_number_of_threads(dns: Resolver) -> None:
    """Callers of one hung name share its lookup; distinct hung names take at most
    :data:`RESOLVER_THREADS` threads, the rest queue (and time out) behind them."""

    def one(name: str) -> str:
        with pytest.raises(httpcore.ConnectTimeout, match=_lookup_timed_out(name)):
            resolve(name, 80, 0.2)
        return name

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, ["slow.test"] * 16))
    assert dns.asked_for("slow.test") == 1
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, [f"hung-{n}.test" for n in range(3 * RESOLVER_THREADS)]))
    assert http._RESOLVER.threads == RESOLVER_THREADS
    # slow.test, and the hung names that got a thread (each asks as soon as it runs)
    _poll(lambda: len(dns.asked) >= RESOLVER_THREADS)
    with dns.lock:
        assert len(dns.asked) == RESOLVER_THREADS
    # Once the resolver answers, the queued lookups run, and a name answers again.
    dns.release.set()
    assert resolve("named.test", 80, 30.0) == ["127.0.0.1"]


@pytest.mark.timeout(60)
def test_idle_lookup_threads_end_and_new_ones_start_when_needed(
    dns: Resolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "RESOLVER_IDLE_SECONDS", 0.05)
    assert resolve("named.test", 80, 30.0) == ["127.0.0.1"]
    _poll(lambda: http._RESOLVER.threads == 0)
    assert resolve("named.test", 443, 30.0) == ["127.0.0.1"]


def test_an_ipv6_answer_keeps_its_scope() -> None:
    assert http._address_of(("fe80::1", 443, 0, 2)) == "fe80::1%2"
    assert http._address_of(("2001:db8::1", 443, 0, 0)) == "2001:db8::1"
    assert http._address_of(("192.0.2.1", 443)) == "192.0.2.1"


# ------------------------------------------------------------ a lookup thread that cannot start


@pytest.fixture
def thread_starts(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Starting a lookup thread raises as under a pids limit or memory pressure ("can't start
    new thread") while ``failing`` is above 0 (counted down per failure); ``failed`` counts them."""
    counts = {"failing": 0, "failed": 0}
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == "wanbatch-resolver" and counts["failing"] > 0:
            counts["failing"] -= 1
            counts["failed"] += 1
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    return counts


@pytest.mark.timeout(60)
def test_a_lookup_thread_that_cannot_start_is_a_connect_error_not_a_poisoned_name(
    dns: Resolver, thread_starts: dict[str, int]
) -> None:
    """The lookup was registered and counted before its thread started: the RuntimeError
    escaped raw, and every later lookup of that name joined the dead one and timed out."""
    thread_starts["failing"] = 1
    with pytest.raises(httpcore.ConnectError, match=r"the name lookup of 'named\.test' could not start"):
        resolve("named.test", 80, 5.0)
    assert thread_starts["failed"] == 1
    assert http._RESOLVER.threads == 0
    assert resolve("named.test", 80, 30.0) == ["127.0.0.1"]  # threads start again: it answers


@pytest.mark.timeout(60)
def test_failed_thread_starts_are_not_counted_as_lookup_threads(
    dns: Resolver, thread_starts: dict[str, int]
) -> None:
    """More failures than :data:`RESOLVER_THREADS` left no thread to start for any name."""
    thread_starts["failing"] = RESOLVER_THREADS + 1
    for n in range(RESOLVER_THREADS + 1):
        with pytest.raises(httpcore.ConnectError, match=rf"the name lookup of 'n{n}\.test' could not start"):
            resolve(f"n{n}.test", 80, 5.0)
    assert http._RESOLVER.threads == 0
    assert resolve("named.test", 80, 30.0) == ["127.0.0.1"]


@pytest.mark.timeout(60)
def test_a_lookup_whose_thread_cannot_start_waits_for_a_running_one(
    dns: Resolver, thread_starts: dict[str, int]
) -> None:
    """With a lookup thread already running, a lookup whose own thread cannot start queues for
    it (as when every thread is taken) and is answered once that thread is free."""
    with pytest.raises(httpcore.ConnectTimeout):
        resolve("slow.test", 80, 0.2)  # holds the one thread until released
    thread_starts["failing"] = 1
    found = http._RESOLVER.lookup("named.test", 80)
    assert thread_starts["failed"] == 1
    assert http._RESOLVER.threads == 1
    dns.release.set()
    assert found.done.wait(30.0)
    assert found.answer == ["127.0.0.1"]


@pytest.mark.timeout(60)
def test_a_fal_call_when_no_lookup_thread_can_start_is_fal_unreachable(
    dns: Resolver, hostile: HostileProvider, thread_starts: dict[str, int]
) -> None:
    """End to end: one clear retryable error, then fal is reached by name again."""
    fal = FakeFal(hostile)
    thread_starts["failing"] = 1
    with (
        _fal(f"http://named.test:{hostile.port}") as client,
        pytest.raises(FalUnreachableError, match=r"the name lookup of 'named\.test' could not start"),
    ):
        client.submit(fal.endpoint, {"prompt": "p"})
    with _fal(f"http://named.test:{hostile.port}") as client:
        client.submit(fal.endpoint, {"prompt": "p"})
    assert fal.posts() == 1
