"""Deadlines over whole exchanges: connect, request, headers and body.

httpx's timeouts bound each wait for bytes (httpcore hands the read timeout to every read), so a
server that drip-feeds its response *headers*, a byte every half second, was never cut off:
httpcore reads up to 100 KiB of them. A download with a total timeout of 1 s ran 104 s against
one, and a fal answer's budget started only once the headers were in. Every server here drips
its headers for 60 s; each call must end at its own deadline, well before the server would have
given up (``HeaderDrip.ended`` still unset), with the timeout error naming that deadline.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpcore
import httpx
import pytest

from jobs.errors import AmbiguousSubmitError, RetryableProviderError
from tests.hostile import HeaderDrip, HostileProvider, SlowReader, drip_headers, json_reply
from tests.hostile_fal import FakeFal
from worker.fal.client import FalClient
from worker.fal.http import DeadlineBackend, RetryPolicy
from worker.fal.storage import DownloadPolicy, FalStorage, SharedDownloadClient, download
from worker.fal.webhooks import JwksKeys, JwksUnavailable

#: Each drip sends a byte every 0.2 s: inside every read timeout below, so no read times out.
EVERY = 0.2

#: connect 0.3 s + twice read 0.6 s: the most one exchange with fal may take here.
FAL_TIMEOUT = httpx.Timeout(0.6, connect=0.3)
FAL_DEADLINE = re.escape(
    "no whole answer within 1.5 s (WANBATCH_CONNECT_TIMEOUT + twice WANBATCH_READ_TIMEOUT)"
)


def _dripping() -> HeaderDrip:
    return drip_headers(every=EVERY, lasting=60.0)


def _fal(hostile: HostileProvider, attempts: int = 1) -> FalClient:
    return FalClient(
        queue_url=hostile.url,
        rest_url=hostile.url,
        key="k",
        timeout=FAL_TIMEOUT,
        retry=RetryPolicy(attempts=attempts, base_delay=0.0),
        sleep=lambda _s: None,
    )


def _cut_short(drip: HeaderDrip) -> None:
    """The server was dripping, and the client left before the drip ran its course."""
    assert drip.started.is_set()
    assert not drip.ended.is_set()


# ---------------------------------------------------------------------------------- downloads


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shared", [False, True], ids=["own-client", "shared-client"])
def test_a_download_whose_headers_drip_ends_at_its_total_timeout(
    hostile: HostileProvider, tmp_path: Path, shared: bool
) -> None:
    """The audit's case: total timeout 1 s, read timeout 2 s, a header byte every 0.2 s. Before,
    the attempt lasted as long as the server dripped (here 60 s; 104 s in the audit)."""
    drip = _dripping()
    hostile.route("GET", r"/v\.mp4", drip)
    policy = DownloadPolicy.for_urls([hostile.url], None)
    timeout = httpx.Timeout(2.0, connect=2.0)
    pool = SharedDownloadClient(policy, timeout)
    try:
        with pytest.raises(RetryableProviderError, match=r"longer than 1 s \(WANBATCH_DOWNLOAD_TIMEOUT\)"):
            download(
                f"{hostile.url}/v.mp4",
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
    _cut_short(drip)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


@pytest.mark.timeout(60)
def test_a_redirect_to_dripped_headers_ends_at_the_download_total_timeout(
    hostile: HostileProvider, tmp_path: Path
) -> None:
    """The deadline covers every hop: the drip is behind a redirect."""
    drip = _dripping()
    hostile.route("GET", r"/a\.mp4", json_reply({}, 302, {"Location": "/b.mp4"}))
    hostile.route("GET", r"/b\.mp4", drip)
    policy = DownloadPolicy.for_urls([hostile.url], None)
    with pytest.raises(RetryableProviderError, match=r"longer than 1 s"):
        download(
            f"{hostile.url}/a.mp4",
            tmp_path / "v.mp4",
            max_bytes=1 << 20,
            policy=policy,
            timeout=httpx.Timeout(2.0, connect=2.0),
            total_timeout=1.0,
        )
    _cut_short(drip)


# ---------------------------------------------------------------------------------- fal's API


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["status", "result"])
def test_a_fal_answer_whose_headers_drip_ends_at_the_exchange_deadline(
    hostile: HostileProvider, call: str
) -> None:
    """Before, the answer budget (the read timeout) started once the headers were in: a status
    or result answer dripping its headers held the call, and the job, as long as it dripped.
    Each try now ends at connect + twice read, and is asked again as any network error is."""
    fal = FakeFal(hostile)
    drip = _dripping()
    (fal.on_status if call == "status" else fal.on_result)("r1", drip)
    with (
        _fal(hostile, attempts=2) as client,
        pytest.raises(RetryableProviderError, match=FAL_DEADLINE) as info,
    ):
        getattr(client, call)(client.handle(fal.endpoint, "r1"))
    assert "ReadTimeout" in str(info.value)
    _cut_short(drip)
    path = rf"{re.escape(fal.base)}/requests/r1" + ("/status" if call == "status" else "")
    assert hostile.count("GET", path) == 2  # the client's bounded retry, each try cut off


@pytest.mark.timeout(60)
def test_a_submit_answer_whose_headers_drip_is_ambiguous_at_the_exchange_deadline(
    hostile: HostileProvider,
) -> None:
    """fal received the whole POST: an answer that never arrives leaves it possibly queued."""
    fal = FakeFal(hostile)
    drip = _dripping()
    hostile.route("POST", re.escape("/" + fal.endpoint), drip)
    with _fal(hostile) as client, pytest.raises(AmbiguousSubmitError, match=FAL_DEADLINE):
        client.submit(fal.endpoint, {"prompt": "p"})
    _cut_short(drip)
    assert fal.posts() == 1


@pytest.mark.timeout(60)
def test_a_status_stream_whose_headers_drip_ends_at_the_exchange_deadline(hostile: HostileProvider) -> None:
    fal = FakeFal(hostile)
    drip = _dripping()
    hostile.route("GET", rf"{re.escape(fal.base)}/requests/r1/status/stream", drip)
    with _fal(hostile) as client, pytest.raises(RetryableProviderError, match=FAL_DEADLINE):
        list(client.stream_status(client.handle(fal.endpoint, "r1")))
    _cut_short(drip)


@pytest.mark.timeout(60)
def test_an_upload_put_whose_answer_headers_drip_ends_at_the_exchange_deadline(
    hostile: HostileProvider,
) -> None:
    """The PUT goes through the guarded client (the address guard kept): the deadline holds there too."""
    drip = _dripping()
    hostile.route(
        "POST",
        r"/storage/upload/initiate",
        json_reply(
            {"upload_url": f"{hostile.url}/signed/abc", "file_url": "https://v3.fal.media/files/abc.png"}
        ),
    )
    hostile.route("PUT", r"/signed/abc", drip)
    with _fal(hostile) as client, pytest.raises(RetryableProviderError, match=FAL_DEADLINE):
        FalStorage(client).upload_file(b"\x89PNG", "image/png", "a.png")
    _cut_short(drip)


# ------------------------------------------------------------------- uploads on a slow uplink

#: connect 0.5 s + twice read 2 s: the exchange deadline of these uploads. Each read of the
#: host's body is 0.01 s apart, well inside every write timeout (2 s).
UPLOAD_TIMEOUT = httpx.Timeout(2.0, connect=0.5)
UPLOAD_DEADLINE = re.escape(
    "no whole answer within 4.5 s (WANBATCH_CONNECT_TIMEOUT + twice WANBATCH_READ_TIMEOUT), "
    "not counting the time spent sending the request"
)
#: 32 MiB read at a few MiB/s: sending takes far longer than the deadline, while the client's
#: send buffer (a few MiB on loopback) ahead of the host is read well within it.
BIG = b"\x89PNG" + b"\0" * (32 << 20)
#: The host's pace: up to 64 KiB every 0.01 s.
EVERY_READ = 0.01


def _upload(hostile: HostileProvider, host: SlowReader, data: bytes) -> str:
    hostile.route(
        "POST",
        r"/storage/upload/initiate",
        json_reply(
            {"upload_url": f"{host.url}/signed/abc", "file_url": "https://v3.fal.media/files/abc.png"}
        ),
    )
    with FalClient(
        queue_url=hostile.url,
        rest_url=hostile.url,
        key="k",
        timeout=UPLOAD_TIMEOUT,
        retry=RetryPolicy(attempts=1, base_delay=0.0),
        sleep=lambda _s: None,
    ) as client:
        # The slow host is fal's storage here (a loopback host no policy trusts otherwise).
        policy = DownloadPolicy.for_urls([hostile.url, host.url], None)
        return FalStorage(client, policy).upload_file(data, "image/png", "a.png")


@pytest.mark.timeout(120)
def test_a_large_upload_that_progresses_steadily_is_not_cut_off_by_the_exchange_deadline(
    hostile: HostileProvider,
) -> None:
    """The review's case: 20 MiB at 1.25 MiB/s failed after three whole sends, "no whole answer
    within 9 s", which the sending alone outlasted; it took 16 s and succeeded before."""
    with SlowReader(json_reply({}), every=EVERY_READ) as host:
        assert _upload(hostile, host, BIG) == "https://v3.fal.media/files/abc.png"
        assert host.done.is_set()
        assert host.taken == len(BIG)


@pytest.mark.timeout(120)
def test_an_answer_whose_headers_drip_after_a_slow_upload_still_ends_at_the_deadline(
    hostile: HostileProvider,
) -> None:
    """The time sending is not counted; the answer's is: headers dripped once the body is in
    end at the deadline, well before the drip would."""
    drip = _dripping()
    with (
        SlowReader(drip, every=EVERY_READ) as host,
        pytest.raises(RetryableProviderError, match=UPLOAD_DEADLINE),
    ):
        _upload(hostile, host, BIG)
    assert host.done.is_set()  # the whole body was sent first
    _cut_short(drip)


@pytest.mark.timeout(60)
def test_an_upload_the_host_stops_reading_ends_at_the_write_timeout_saying_so(
    hostile: HostileProvider,
) -> None:
    with (
        SlowReader(json_reply({}), piece=0) as host,
        pytest.raises(
            RetryableProviderError,
            match=re.escape("(WriteTimeout): sending the request: the server took none of it for 2 s"),
        ),
    ):
        _upload(hostile, host, BIG)
    assert host.taken == 0


# ---------------------------------------------------------------------------------- webhooks


@pytest.mark.timeout(60)
def test_a_jwks_whose_headers_drip_is_cut_off_by_the_fetch_deadline(hostile: HostileProvider) -> None:
    drip = _dripping()
    hostile.route("GET", r"/jwks", drip)
    keys = JwksKeys(f"{hostile.url}/jwks", timeout=2.0, deadline=1.0)
    with pytest.raises(JwksUnavailable, match=r"took over 1 s to arrive"):
        keys.verify(b"{}", b"\0" * 64)
    _cut_short(drip)


@pytest.mark.timeout(60)
def test_a_doctor_check_whose_headers_drip_ends_at_its_exchange_deadline(
    hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``wanbatch doctor``'s provider and receiver checks read their answers the same way."""
    from worker import doctor

    monkeypatch.setattr(doctor, "TIMEOUT", 0.6)
    monkeypatch.setattr(doctor, "EXCHANGE_SECONDS", 1.0)
    drip = _dripping()
    hostile.route("GET", r"/healthz", drip)
    with pytest.raises(httpx.ReadTimeout, match=r"no whole answer within 1 s"):
        doctor._get_capped(f"{hostile.url}/healthz", {})
    _cut_short(drip)


# ---------------------------------------------------------------------------------- plumbing


def test_every_connection_pool_of_fals_client_obeys_deadlines(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx has no parameter for the network backend: each pool it built, the proxy ones its
    environment variables mount included, is wrapped in place. A change of httpx's or httpcore's
    attributes must fail here, not leave production without deadlines."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with FalClient(
        queue_url="https://queue.fal.run", rest_url="https://rest.fal.ai", key="k", timeout=FAL_TIMEOUT
    ) as client:
        transports = [client.http._transport, *client.http._mounts.values()]
        pools = [t._pool for t in transports if isinstance(t, httpx.HTTPTransport)]
        assert len(pools) == 3  # direct, and the two proxies
        assert all(isinstance(pool._network_backend, DeadlineBackend) for pool in pools)
        assert any(isinstance(pool, httpcore.HTTPProxy) for pool in pools)
