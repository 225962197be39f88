"""Downloads through ``WANBATCH_DOWNLOAD_PROXY``, and downloads that cannot connect at all.

Loopback only: a CDN stand-in on 127.0.0.1 named ``cdn.corp.example``, a name this machine does
not resolve and the stand-in proxy (:mod:`tests.loopback_proxy`) maps to 127.0.0.1."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpcore
import pytest

from jobs.errors import ConfigError, FinalProviderError, RetryableProviderError
from jobs.settings import Settings, get_settings
from tests.loopback_proxy import AUTH_REQUIRED, BAD_GATEWAY, loopback_proxy
from worker.fal import storage
from worker.fal.errors import DownloadUnreachedError
from worker.fal.storage import DownloadPolicy, download, internal_name, proxy_routes
from worker.steps.download_reach import PAUSE_AFTER_SECONDS, WARN_EVERY_SECONDS, DownloadReach

VIDEO = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 200
KEY = "key-id-1234:0123456789abcdef0123456789abcdef"


@pytest.fixture
def cdn() -> Iterator[tuple[int, list[dict[str, str]]]]:
    """A CDN stand-in on 127.0.0.1: ``/v.mp4`` is a video, ``/hop`` redirects to the internal
    metadata host; the headers of every request it gets are recorded."""
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(dict(self.headers.items()))
            if self.path == "/busy":  # the origin's own 503 (the proxy passes it on)
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", "http://metadata.google.internal/computeMetadata/v1/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(VIDEO)))
            self.end_headers()
            self.wfile.write(VIDEO)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_download_that_cannot_resolve_its_host_says_it_could_not_connect_and_where(
    cdn: tuple[int, list[dict[str, str]]], tmp_path: Path
) -> None:
    port, _ = cdn
    with pytest.raises(DownloadUnreachedError) as caught:
        download(f"http://cdn.corp.example:{port}/v.mp4", tmp_path / "v.mp4", max_bytes=10**6)
    assert caught.value.host == f"cdn.corp.example:{port}"
    assert caught.value.proxy is None
    assert "cannot resolve 'cdn.corp.example'" in str(caught.value)
    assert not (tmp_path / "v.mp4").exists()


def test_through_the_download_proxy_the_video_comes_and_no_key_goes(
    cdn: tuple[int, list[dict[str, str]]], tmp_path: Path
) -> None:
    port, seen = cdn
    with loopback_proxy() as proxy:
        policy = DownloadPolicy.for_urls(["https://queue.fal.run"], None, (KEY,), proxy.url)
        got = download(
            f"http://cdn.corp.example:{port}/v.mp4", tmp_path / "v.mp4", max_bytes=10**6, policy=policy
        )
    assert got.size == len(VIDEO)
    assert proxy.request_lines() == [f"GET http://cdn.corp.example:{port}/v.mp4 HTTP/1.1"]
    assert KEY not in proxy.text()
    assert all("authorization" not in (name.lower() for name in headers) for headers in seen)


def test_through_the_proxy_a_redirect_to_an_internal_name_is_refused_before_it_is_asked(
    cdn: tuple[int, list[dict[str, str]]], tmp_path: Path
) -> None:
    port, _ = cdn
    with loopback_proxy() as proxy, pytest.raises(FinalProviderError, match="internal name"):
        download(
            f"http://cdn.corp.example:{port}/hop",
            tmp_path / "v.mp4",
            max_bytes=10**6,
            policy=DownloadPolicy(proxy=proxy.url),
        )
    assert not any("metadata" in line for line in proxy.request_lines())


@pytest.mark.parametrize(
    "url",
    [
        "http://metadata/latest",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://printer.local/",
        "http://router.home.arpa/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/x.mp4",
        "http://[fd00::1]/x.mp4",
    ],
)
def test_through_the_proxy_internal_names_and_addresses_are_refused(url: str, tmp_path: Path) -> None:
    with loopback_proxy() as proxy, pytest.raises(FinalProviderError, match="refusing"):
        download(url, tmp_path / "v.mp4", max_bytes=10**6, policy=DownloadPolicy(proxy=proxy.url))
    assert proxy.requests == []


def test_through_the_proxy_a_name_that_resolves_here_to_an_internal_address_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(storage, "resolve", lambda host, port, timeout: ["10.1.2.3"])
    policy = DownloadPolicy(proxy="http://127.0.0.1:9")
    with pytest.raises(FinalProviderError, match=r"cdn\.example \(10\.1\.2\.3\): a private address"):
        policy.check_proxied("cdn.example", 443)
    # listed: taken whatever it resolves to
    DownloadPolicy(allowed_hosts=("cdn.example",), proxy="http://127.0.0.1:9").check_proxied(
        "cdn.example", 443
    )


def test_through_the_proxy_a_name_unknown_here_is_left_to_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown(host: str, port: int, timeout: float | None) -> list[str]:
        raise httpcore.ConnectError("no such name")

    monkeypatch.setattr(storage, "resolve", unknown)
    DownloadPolicy(proxy="http://127.0.0.1:9").check_proxied("v3.fal.media", 443)  # no refusal


def test_internal_names() -> None:
    assert internal_name("localhost")
    assert internal_name("vm")
    assert internal_name("db.internal")
    assert not internal_name("v3.fal.media")
    assert not internal_name("cdn.corp.example")


def test_a_proxy_that_refuses_says_which_without_its_password(
    cdn: tuple[int, list[dict[str, str]]], tmp_path: Path
) -> None:
    port, _ = cdn
    secret = "hunter2-long-password"
    for answer in (AUTH_REQUIRED, BAD_GATEWAY):
        with loopback_proxy(answer) as proxy:
            with_user = proxy.url.replace("http://", f"http://bob:{secret}@")
            for scheme in ("http", "https"):  # forwarded, and tunnelled (CONNECT)
                with pytest.raises(DownloadUnreachedError) as caught:
                    download(
                        f"{scheme}://cdn.corp.example:{port}/v.mp4",
                        tmp_path / "v.mp4",
                        max_bytes=10**6,
                        policy=DownloadPolicy(proxy=with_user),
                    )
                assert secret not in str(caught.value)
                assert caught.value.proxy == proxy.url.replace("http://", "http://bob:**@")
    # a proxy that is not there at all
    with pytest.raises(DownloadUnreachedError) as caught:
        download(
            f"https://cdn.corp.example:{port}/v.mp4",
            tmp_path / "v.mp4",
            max_bytes=10**6,
            policy=DownloadPolicy(proxy=f"http://bob:{secret}@127.0.0.1:9"),
        )
    assert secret not in str(caught.value)
    assert "through the download proxy http://bob:**@127.0.0.1:9" in str(caught.value)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("through", ["url", "env"])
def test_a_forwarding_proxy_that_cannot_reach_the_host_holds_the_download_never_a_try(
    through: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain-http download forwarded by the proxy (WANBATCH_DOWNLOAD_PROXY as a URL, or =env
    with HTTP_PROXY): the proxy's own 502 when it cannot connect to the host is no answer from
    the host, as its 502 to a CONNECT is not."""
    port = _closed_port()
    with loopback_proxy() as proxy:
        if through == "env":
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            monkeypatch.delenv("NO_PROXY", raising=False)
            monkeypatch.delenv("no_proxy", raising=False)
        policy = DownloadPolicy(proxy=proxy.url if through == "url" else "env")
        with pytest.raises(DownloadUnreachedError) as caught:
            download(
                f"http://cdn.corp.example:{port}/v.mp4", tmp_path / "v.mp4", max_bytes=10**6, policy=policy
            )
    assert proxy.request_lines() == [f"GET http://cdn.corp.example:{port}/v.mp4 HTTP/1.1"]
    assert caught.value.host == f"cdn.corp.example:{port}"
    assert caught.value.proxy == proxy.url
    assert "502 Bad Gateway" in str(caught.value)
    assert f"it could not reach cdn.corp.example:{port}" in str(caught.value)
    assert not (tmp_path / "v.mp4").exists()


def test_doctor_counts_the_proxys_own_gateway_error_as_not_reached() -> None:
    import httpx

    from worker.doctor import _unreachable
    from worker.fal.http import cut_off_at

    port = _closed_port()
    with loopback_proxy() as proxy:
        why = _unreachable(
            f"http://cdn.corp.example:{port}/",
            DownloadPolicy(proxy=proxy.url),
            httpx.Timeout(5.0),
            cut_off_at,
        )
    assert why is not None
    assert f"through the download proxy {proxy.url} " in why
    assert "502" in why


@pytest.mark.parametrize(
    "headers",
    [
        ("Via: 1.1 corp-proxy", "Proxy-Status: corp-proxy; error=dns_timeout"),
        ("Via: 1.1 corp-proxy (squid/6.6)", "X-Squid-Error: ERR_CONNECT_FAIL 111"),
    ],
)
def test_a_proxy_that_says_it_made_the_gateway_error_itself_holds_the_download(
    headers: tuple[str, ...], tmp_path: Path
) -> None:
    with (
        loopback_proxy("504 Gateway Timeout", headers=headers) as proxy,
        pytest.raises(DownloadUnreachedError, match="504 Gateway Timeout") as caught,
    ):
        download(
            "http://cdn.corp.example/v.mp4",
            tmp_path / "v.mp4",
            max_bytes=10**6,
            policy=DownloadPolicy(proxy=proxy.url),
        )
    assert headers[1].split(": ", 1)[1] in str(caught.value)


def test_the_hosts_own_gateway_error_forwarded_by_the_proxy_is_still_a_try(
    cdn: tuple[int, list[dict[str, str]]], tmp_path: Path
) -> None:
    """The host answered (503): the proxy passed it on (its Via added, as a proxy must), so it
    is an answer about the file, counted as any."""
    port, _ = cdn
    with loopback_proxy() as proxy, pytest.raises(RetryableProviderError) as caught:
        download(
            f"http://cdn.corp.example:{port}/busy",
            tmp_path / "v.mp4",
            max_bytes=10**6,
            policy=DownloadPolicy(proxy=proxy.url),
        )
    assert not isinstance(caught.value, DownloadUnreachedError)
    assert caught.value.status_code == 503
    # and a proxy's Proxy-Status that says it forwarded the host's answer
    forwarded = ("Proxy-Status: corp-proxy; fwd-status=502",)
    with (
        loopback_proxy(BAD_GATEWAY, headers=forwarded) as proxy,
        pytest.raises(RetryableProviderError) as caught,
    ):
        download(
            "http://cdn.corp.example/v.mp4",
            tmp_path / "v.mp4",
            max_bytes=10**6,
            policy=DownloadPolicy(proxy=proxy.url),
        )
    assert not isinstance(caught.value, DownloadUnreachedError)


def test_env_routes_follow_the_proxy_variables_and_no_proxy_and_never_proxy_loopback() -> None:
    environ = {"HTTPS_PROXY": "http://corp:3128", "NO_PROXY": "internal.example,10.0.0.0/8"}
    routes = proxy_routes("env", environ)
    assert routes["https://"] == "http://corp:3128"
    assert "http://" not in routes
    assert "all://" not in routes
    assert routes["all://*internal.example"] is None
    assert routes["all://10.0.0.0/8"] is None
    assert routes["all://localhost"] is None
    assert routes["all://127.0.0.0/8"] is None
    assert proxy_routes("env", {}) == {}  # no proxy variable: direct
    assert proxy_routes(None, environ) == {}  # unset: direct, whatever the environment says
    assert proxy_routes("http://p:1", {})["all://"] == "http://p:1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("env", "env"), (" ENV ", "env"), ("proxy.example:3128", "http://proxy.example:3128"), ("", None)],
)
def test_the_setting_takes_env_or_a_proxy_url(value: str, expected: str | None) -> None:
    settings = Settings(download_proxy=value)
    got = settings.download_proxy
    assert (got.get_secret_value() if got is not None else None) == expected
    assert "proxy.example" not in repr(settings)


@pytest.mark.parametrize(
    "value", ["ftp://u:s3cretpw@p:21", "http://u:s3cretpw@p:port", "http://u:s3cretpw@:3128"]
)
def test_a_bad_proxy_setting_is_named_and_never_echoed(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_DOWNLOAD_PROXY", value)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError) as caught:
            get_settings()
    finally:
        get_settings.cache_clear()
    assert "WANBATCH_DOWNLOAD_PROXY" in str(caught.value)
    assert "s3cretpw" not in str(caught.value)


def test_the_hold_doubles_its_pause_and_pauses_the_batch_once_the_outage_has_lasted() -> None:
    now = [0.0]
    reach = DownloadReach(clock=lambda: now[0])
    first = reach.failed()
    assert first.say
    assert not first.pause
    second = reach.failed()
    assert second.delay == 2 * first.delay
    assert not second.say
    now[0] = PAUSE_AFTER_SECONDS
    assert reach.failed().pause
    assert reach.answered() == PAUSE_AFTER_SECONDS
    again = reach.failed()
    assert again.delay == first.delay
    assert not again.pause
    assert again.say


def test_the_hold_gives_its_warning_once_per_outage_and_a_short_note_meanwhile() -> None:
    now = [0.0]
    reach = DownloadReach(clock=lambda: now[0])
    assert (reach.note(), reach.unshown()) == (None, None)
    reach.failed("v3.fal.media", "could not connect to v3.fal.media (…) — set WANBATCH_DOWNLOAD_PROXY")
    line = reach.unshown()
    assert line is not None
    assert line.startswith("warning: downloads cannot connect: could not connect to v3.fal.media")
    assert "WANBATCH_DOWNLOAD_PROXY" in line
    assert reach.unshown() is None  # once
    reach.failed("v3.fal.media", "again")
    assert reach.unshown() is None  # the same outage
    assert reach.note() == "downloads cannot connect to v3.fal.media: held, no try counted"
    reach.answered()
    assert (reach.note(), reach.unshown()) == (None, None)
    reach.failed("v3b.fal.media", "a new outage")
    assert "a new outage" in (reach.unshown() or "")


def test_the_hold_shows_the_latest_reason_when_it_changes_within_the_outage() -> None:
    """The run's output gave the outage's first reason only: a later, different one (the name
    resolves now, and the proxy refuses) was never shown, and the user went on fixing what was
    fixed. A changed reason is shown too, at most every WARN_EVERY_SECONDS; the same, never again."""
    now = [0.0]
    reach = DownloadReach(clock=lambda: now[0])
    resolve = "could not connect to v3.fal.media (ConnectError: Name or service not known) — check DNS"
    refused = "could not connect to v3.fal.media: the download proxy p:3128 refused it — set its password"
    reach.failed("v3.fal.media", resolve, "job-1")
    assert "Name or service not known" in (reach.unshown() or "")
    now[0] += 1
    reach.failed("v3.fal.media", refused, "job-1")
    assert reach.unshown() is None  # a reason changing again and again: not a line each time
    now[0] += WARN_EVERY_SECONDS
    reach.failed("v3.fal.media", refused, "job-1")
    line = reach.unshown()
    assert line is not None
    assert "refused it — set its password" in line
    assert "Name or service not known" not in line
    now[0] += WARN_EVERY_SECONDS
    reach.failed("v3.fal.media", refused, "job-1")
    assert reach.unshown() is None  # the same reason: said once
