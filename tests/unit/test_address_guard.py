"""The address guard: which addresses a download (or an upload's PUT) may reach, and what a
download accepts as a video."""

from __future__ import annotations

import gzip
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import pytest

from jobs.errors import FinalProviderError, RetryableProviderError, StateConflict
from tests.hostile import HostileProvider, drip, json_reply, raw_reply, redirect
from tests.hostile_fal import sample_video
from worker.fal.client import FalClient
from worker.fal.errors import DownloadRefusedError
from worker.fal.http import RetryPolicy
from worker.fal.storage import (
    DownloadPolicy,
    FalStorage,
    allow_entry,
    download,
    guarded_client,
    internal_address_kind,
    is_video_container,
)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.3", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("100.64.0.1", "non-public"),
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
    ],
)
def test_internal_addresses_are_recognised(address: str, kind: str | None) -> None:
    assert internal_address_kind(address) == kind


#: One answer of ``socket.getaddrinfo`` (family, type, proto, canonical name, socket address).
AddressInfo = (
    tuple[Literal[socket.AddressFamily.AF_INET], socket.SocketKind, int, str, tuple[str, int]]
    | tuple[
        Literal[socket.AddressFamily.AF_INET6],
        socket.SocketKind,
        int,
        str,
        tuple[str, int, int, int] | tuple[int, bytes],
    ]
)


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
    """Answer getaddrinfo for made-up names (other names resolve as usual)."""
    real = socket.getaddrinfo

    def getaddrinfo(
        host: bytes | str | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[AddressInfo]:
        if isinstance(host, str) and host in answers:
            assert isinstance(port, int)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_every_address_of_a_name_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"cdn.example": ["93.184.216.34", "10.0.0.7"]})
    policy = DownloadPolicy()
    with pytest.raises(FinalProviderError, match=r"cdn\.example \(10\.0\.0\.7\): a private address"):
        policy.addresses("cdn.example", 443)
    assert DownloadPolicy(allowed_hosts=("*.example",)).addresses("cdn.example", 443) == [
        "93.184.216.34",
        "10.0.0.7",
    ]


def test_fal_origins_and_listed_hosts_may_be_internal() -> None:
    policy = DownloadPolicy.for_urls(["http://127.0.0.1:8000", "https://rest.fal.ai"], None)
    assert policy.addresses("127.0.0.1", 8000) == ["127.0.0.1"]
    with pytest.raises(FinalProviderError, match="loopback"):
        policy.check_host("127.0.0.3", 8000)
    strict = DownloadPolicy.for_urls(["https://queue.fal.run"], ["*.fal.media"])
    strict.check_host("v3.fal.media", 443)
    strict.check_host("queue.fal.run", 443, "https")
    with pytest.raises(FinalProviderError, match="not in the allow-list"):
        strict.check_host("example.com", 443)


def test_only_the_fal_urls_origins_are_trusted_not_every_port_of_their_host() -> None:
    """Before, the fal URL's *host* was trusted: with fal on 127.0.0.1:8000, a result URL
    could reach 127.0.0.1:6379 (Redis) or any other port of it."""
    policy = DownloadPolicy.for_urls(["http://127.0.0.1:8000", "https://rest.fal.ai"], None)
    assert policy.listed("127.0.0.1", 8000, "http")
    assert policy.listed("rest.fal.ai", 443, "https")
    assert not policy.listed("127.0.0.1", 6379)
    assert not policy.listed("127.0.0.1", 8000, "https")  # another origin (RFC 6454)
    assert not policy.listed("rest.fal.ai", 80, "http")
    with pytest.raises(FinalProviderError, match=r"127\.0\.0\.1: a loopback address"):
        policy.addresses("127.0.0.1", 6379)


@pytest.mark.parametrize(
    ("entry", "host", "port", "allowed"),
    [
        ("cdn.example", "cdn.example", 8443, True),  # a bare host: any port, as before
        ("cdn.example:8443", "cdn.example", 8443, True),
        ("cdn.example:8443", "cdn.example", 443, False),
        ("*.example:443", "v3.example", 443, True),
        ("*.example:443", "v3.example", 80, False),
        ("CDN.Example.:443", "cdn.example", 443, True),
        ("[::1]:9000", "::1", 9000, True),
        ("[::1]:9000", "::1", 9001, False),
        ("[::1]", "::1", 9001, True),
        ("::1", "::1", 9001, True),  # a bare IPv6 literal: its last group is not a port
    ],
)
def test_allow_list_entries_may_name_a_port(entry: str, host: str, port: int, allowed: bool) -> None:
    assert DownloadPolicy(allowed_hosts=(entry,)).listed(host, port) is allowed


def test_the_connection_goes_to_the_checked_address(
    monkeypatch: pytest.MonkeyPatch, hostile: HostileProvider, tmp_path: Path
) -> None:
    # A name no real DNS knows: the socket can only reach the server through our own resolution,
    # so the address checked is the address connected to (a rebinding answer is never consulted).
    fake_dns(monkeypatch, {"videos.example": [hostile.host]})
    video = sample_video()
    hostile.route("GET", r"/v\.mp4", raw_reply(video))
    policy = DownloadPolicy(allowed_hosts=("videos.example",))
    result = download(
        f"http://videos.example:{hostile.port}/v.mp4", tmp_path / "v.mp4", max_bytes=1 << 20, policy=policy
    )
    assert result.size == len(video)
    (get,) = hostile.requests
    assert get.headers["host"] == f"videos.example:{hostile.port}"
    assert get.headers["accept-encoding"] == "identity"
    # unlisted, the same name is refused before any connection
    with pytest.raises(FinalProviderError, match="loopback"):
        download(f"http://videos.example:{hostile.port}/v.mp4", tmp_path / "w.mp4", max_bytes=1 << 20)
    assert len(hostile.requests) == 1


def test_guarded_client_refuses_internal_addresses_on_its_own(hostile: HostileProvider) -> None:
    with guarded_client(DownloadPolicy(), httpx.Timeout(5)) as client, pytest.raises(FinalProviderError):
        client.get(hostile.url)
    assert hostile.requests == []


@pytest.mark.parametrize(
    ("head", "video"),
    [
        (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00", True),
        (b"\x00\x00\x00\x08wide\x00\x00\x00\x00mdat", True),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01", True),
        (b"<!DOCTYPE html><html>", False),
        (b'{"error": "denied"}', False),
        (b"", False),
    ],
)
def test_video_containers_are_recognised(head: bytes, video: bool) -> None:
    assert is_video_container(head) is video


def test_total_timeout_and_progress_abort_cleanly(hostile: HostileProvider, tmp_path: Path) -> None:
    video = sample_video()
    hostile.route("GET", r"/slow\.mp4", drip(video, chunk=64, every=0.05))
    policy = DownloadPolicy.for_urls([hostile.url], None)
    with pytest.raises(RetryableProviderError, match=r"longer than 0\.3 s"):
        download(
            f"{hostile.url}/slow.mp4", tmp_path / "a.mp4", max_bytes=1 << 20, policy=policy, total_timeout=0.3
        )

    def lost(_size: int) -> None:
        raise StateConflict("lease lost")

    with pytest.raises(StateConflict):
        download(
            f"{hostile.url}/slow.mp4", tmp_path / "b.mp4", max_bytes=1 << 20, policy=policy, progress=lost
        )
    assert list(tmp_path.iterdir()) == []  # neither attempt left a file behind


def test_an_error_body_that_trickles_ends_at_the_total_timeout(
    hostile: HostileProvider, tmp_path: Path
) -> None:
    """Before, the total time was checked for 2xx bodies only: a 500 whose page arrived a byte
    at a time held the download for as long as the page lasted (here 20 s)."""
    hostile.route("GET", r"/broken\.mp4", drip(b"x" * 400, chunk=1, every=0.05, status=500))
    policy = DownloadPolicy.for_urls([hostile.url], None)
    with pytest.raises(RetryableProviderError, match=r"longer than 0\.3 s"):
        download(
            f"{hostile.url}/broken.mp4",
            tmp_path / "a.mp4",
            max_bytes=1 << 20,
            policy=policy,
            total_timeout=0.3,
        )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- uploads

UPLOAD_KEY = "0b5c2d4e-1111-2222-3333-444455556666:abcdef0123456789abcdef0123456789"


@pytest.fixture
def internal() -> Iterator[HostileProvider]:
    """A service on another loopback address (a metadata endpoint's or Redis's stand-in)."""
    with HostileProvider(host="127.0.0.3") as server:
        yield server


def storage_at(fal: HostileProvider, upload_url: str, policy: DownloadPolicy | None = None) -> FalStorage:
    """fal's storage on ``fal`` (the configured fal URL), its initiate naming ``upload_url``."""
    file_url = "https://v3.fal.media/files/abc.png"
    fal.route(
        "POST", r"/storage/upload/initiate", json_reply({"upload_url": upload_url, "file_url": file_url})
    )
    client = FalClient(
        queue_url=fal.url,
        rest_url=fal.url,
        key=UPLOAD_KEY,
        timeout=httpx.Timeout(5.0),
        retry=RetryPolicy(attempts=3, base_delay=0.0),
        sleep=lambda _s: None,
    )
    return FalStorage(client) if policy is None else FalStorage(client, policy)


def puts(server: HostileProvider) -> list[str]:
    return [r.path for r in server.requests if r.method == "PUT"]


def test_an_upload_goes_to_fals_storage_without_the_key(hostile: HostileProvider) -> None:
    hostile.route("PUT", r"/signed/abc", raw_reply(b"", 200))
    storage = storage_at(hostile, f"{hostile.url}/signed/abc?sig=1")
    assert storage.upload_file(b"\x89PNG", "image/png", "a.png") == "https://v3.fal.media/files/abc.png"
    (put,) = [r for r in hostile.requests if r.method == "PUT"]
    assert put.body == b"\x89PNG"
    assert "authorization" not in put.headers


def test_an_upload_url_on_an_internal_address_is_refused(
    hostile: HostileProvider, internal: HostileProvider
) -> None:
    """Before, only the scheme of ``upload_url`` was checked: the image was PUT to the internal
    service (a blind SSRF with a body of the attacker's choosing, the user's image)."""
    storage = storage_at(hostile, f"{internal.url}/latest/meta-data/x")
    with pytest.raises(FinalProviderError, match=r"127\.0\.0\.3: a loopback address"):
        storage.upload_file(b"\x89PNG", "image/png", "a.png")
    assert internal.requests == []


def test_an_upload_url_whose_name_resolves_internal_is_refused_when_connecting(
    hostile: HostileProvider, internal: HostileProvider
) -> None:
    """The name is only judged when the socket connects: the guarded client's own check."""
    storage = storage_at(hostile, f"http://localhost:{hostile.port}/signed/abc")
    with pytest.raises(FinalProviderError, match=r"localhost \(127\.0\.0\.1\): a loopback address"):
        storage.upload_file(b"\x89PNG", "image/png", "a.png")
    assert puts(hostile) == []


def test_a_redirect_from_the_upload_host_is_not_followed(
    hostile: HostileProvider, internal: HostileProvider
) -> None:
    """Before, a 307 was followed with the PUT and its body, to wherever it pointed."""
    hostile.route("PUT", r"/signed/abc", redirect(f"{internal.url}/latest/meta-data/x", 307))
    storage = storage_at(hostile, f"{hostile.url}/signed/abc")
    with pytest.raises(FinalProviderError, match=r"redirect \(HTTP 307\); not followed"):
        storage.upload_file(b"\x89PNG", "image/png", "a.png")
    assert puts(hostile) == ["/signed/abc"]  # final: not asked again
    assert internal.requests == []


def test_an_upload_host_on_the_allow_list_may_be_internal(
    hostile: HostileProvider, internal: HostileProvider
) -> None:
    internal.route("PUT", r"/bucket/a\.png", raw_reply(b"", 200))
    policy = DownloadPolicy.for_urls([hostile.url], ["127.0.0.3"])
    storage = storage_at(hostile, f"{internal.url}/bucket/a.png", policy)
    storage.upload_file(b"\x89PNG", "image/png", "a.png")
    assert puts(internal) == ["/bucket/a.png"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_an_encoded_body_is_refused_not_inflated(
    hostile: HostileProvider, tmp_path: Path, encoding: str
) -> None:
    """Before, httpx decoded it although ``identity`` was asked for: 300 KB of gzip on the wire
    became a 300 MB file (here 10 KB become 10 MB)."""
    bomb = gzip.compress(sample_video() + b"\0" * (10 << 20))
    assert len(bomb) < 64 * 1024
    headers = {"Content-Type": "video/mp4", "Content-Encoding": encoding}
    hostile.route("GET", r"/v\.mp4", raw_reply(bomb, headers=headers))
    policy = DownloadPolicy.for_urls([hostile.url], None)
    with pytest.raises(FinalProviderError, match=f"sent a '{encoding}'-encoded body"):
        download(f"{hostile.url}/v.mp4", tmp_path / "v.mp4", max_bytes=1 << 30, policy=policy)
    assert list(tmp_path.iterdir()) == []


def test_identity_as_the_encoding_is_accepted(hostile: HostileProvider, tmp_path: Path) -> None:
    video = sample_video()
    hostile.route("GET", r"/v\.mp4", raw_reply(video, headers={"Content-Encoding": "identity"}))
    policy = DownloadPolicy.for_urls([hostile.url], None)
    result = download(f"{hostile.url}/v.mp4", tmp_path / "v.mp4", max_bytes=1 << 20, policy=policy)
    assert result.size == len(video)


def test_the_allow_list_adds_to_fals_media_hosts_never_replaces_them() -> None:
    """Before, setting WANBATCH_DOWNLOAD_ALLOWED_HOSTS made it the only list: fal's own media
    hosts were refused ("not in the allow-list") once any other host was listed."""
    policy = DownloadPolicy.for_urls(["https://queue.fal.run", "https://rest.fal.ai"], ["10.0.0.5"])
    for host in ("v3.fal.media", "v3b.fal.media", "fal.media", "storage.googleapis.com"):
        policy.check_host(host, 443, "https")
    policy.check_host("10.0.0.5", 443, "https")  # the listed host, as before
    with pytest.raises(DownloadRefusedError, match="not in the allow-list") as refused:
        policy.check_host("media.example", 8443, "https")
    assert refused.value.host == "media.example:8443"
    assert refused.value.setting == "WANBATCH_DOWNLOAD_ALLOWED_HOSTS=10.0.0.5,media.example:8443"
    assert str(refused.value).endswith(f"; to allow it: {refused.value.setting}")
    assert isinstance(refused.value, FinalProviderError)  # final for the exchange (an upload's PUT)


def test_fals_media_hosts_still_need_public_addresses_unless_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Added by default, not listed by the user: at an internal address (a fake-IP VPN's
    198.18.0.0/15) they are refused, naming the address, the range and the setting to give."""
    fake_dns(monkeypatch, {"v3.fal.media": ["198.18.0.7"], "v3b.fal.media": ["100.64.3.4"]})
    policy = DownloadPolicy.for_urls(["https://queue.fal.run"], ["media.example"])
    with pytest.raises(DownloadRefusedError) as refused:
        policy.addresses("v3.fal.media", 443)
    assert refused.value.address == "198.18.0.7"
    assert "v3.fal.media (198.18.0.7): a private address (the range fake-IP VPN" in str(refused.value)
    assert refused.value.setting == "WANBATCH_DOWNLOAD_ALLOWED_HOSTS=media.example,v3.fal.media"
    with pytest.raises(DownloadRefusedError, match=r"a non-public address \(carrier-grade NAT"):
        DownloadPolicy().addresses("v3b.fal.media", 443)
    listed = DownloadPolicy.for_urls(["https://queue.fal.run"], ["media.example", "v3.fal.media"])
    assert listed.addresses("v3.fal.media", 443) == ["198.18.0.7"]


@pytest.mark.parametrize(
    ("host", "port", "entry"),
    [
        ("v3.fal.media", 443, "v3.fal.media"),
        ("CDN.Example.", 80, "cdn.example"),
        ("localhost", 8123, "localhost:8123"),
        ("[::1]", 9000, "[::1]:9000"),
        ("::1", 443, "[::1]"),
    ],
)
def test_a_refusal_names_the_narrowest_entry_that_allows_the_host(host: str, port: int, entry: str) -> None:
    assert allow_entry(host, port) == entry
    # and the entry it names does allow it, at any address
    assert DownloadPolicy(allowed_hosts=(entry,)).listed(host, port)
