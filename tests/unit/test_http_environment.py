"""The proxy and certificate variables httpx reads: which ones the settings refuse, and how the
clients use the ones they take (``jobs.http_environment``, ``worker.fal.http``)."""

from __future__ import annotations

import os
import shutil
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from falsim.tls import make_self_signed
from jobs.errors import ConfigError
from jobs.http_environment import (
    construction_message,
    http_environment_problems,
    is_loopback_host,
    proxy_variables,
    require_usable,
)
from jobs.settings import get_settings
from tests.loopback_proxy import BAD_GATEWAY, loopback_proxy
from worker.fal.client import FalClient
from worker.fal.http import build_http_client, shared_ssl_context
from worker.fal.storage import DownloadPolicy, guarded_client

_NAMES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file", "ssl_cert_dir")


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _NAMES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_the_lower_case_variable_wins_and_cgi_ignores_http_proxy() -> None:
    env = {"HTTPS_PROXY": "ftp://upper", "https_proxy": "http://lower:1", "HTTP_PROXY": "http://h:1"}
    assert proxy_variables(env) == {
        "https": ("https_proxy", "http://lower:1"),
        "http": ("HTTP_PROXY", "http://h:1"),
    }
    assert http_environment_problems(env) == []
    assert "http" not in proxy_variables({**env, "REQUEST_METHOD": "GET"})
    assert proxy_variables({"HTTPS_PROXY": "http://x:1", "https_proxy": ""}) == {}  # empty lower unsets
    # urllib's second pass looks at the "_proxy" only: "HTTPS_proxy" is a lower-case name too
    assert proxy_variables({"HTTPS_PROXY": "ftp://x", "HTTPS_proxy": ""}) == {}


@pytest.mark.parametrize(
    "value",
    ["http://proxy:3128", "proxy:3128", "HTTPS://proxy", "socks5://u:p@proxy:1080", "socks5h://proxy"],
)
def test_proxy_urls_httpx_takes_are_taken(value: str) -> None:
    assert http_environment_problems({"ALL_PROXY": value}) == []


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("ftp://u:pw-secret@x:1", "scheme 'ftp'"),
        (" http://u:pw-secret@x:1", "scheme ''"),
        ("http://u:pw-secret@x:31z8", "its port is not a number"),
        ("http://u:pw-secret@[::1", "its port is not a number"),
        ("http://u:pw-secret@[::g]:1", "its host is neither"),
        ("http://u:pw-secret@x:1\n", "a control character"),
    ],
)
def test_proxy_urls_httpx_cannot_use_are_refused_without_their_value(value: str, phrase: str) -> None:
    [problem] = http_environment_problems({"HTTPS_PROXY": value})
    assert problem.startswith("HTTPS_PROXY: ")
    assert phrase in problem
    assert "pw-secret" not in problem


#: Environments whose verdict must be httpx's own: what the check refuses is exactly what makes
#: httpx's client construction raise (``trust_env``), nothing it takes.
_DIFFERENTIAL = [
    {"HTTPS_PROXY": "localhost:3128"},
    {"HTTPS_PROXY": "http://[::1]:3128"},
    {"HTTPS_PROXY": "HTTP://Proxy:3128"},
    {"HTTPS_PROXY": "http://p:3128 "},  # a trailing space: int() reads the port
    {"HTTPS_PROXY": "http://p:3128\n"},
    {"HTTPS_PROXY": " http://p:3128"},
    {"HTTPS_PROXY": "http://p:99999"},
    {"HTTPS_PROXY": "http://"},
    {"HTTPS_PROXY": "http://user:p@ss@proxy:3128"},
    {"HTTPS_PROXY": "http://p:31z8"},
    {"https_proxy": "http://good:3128", "HTTPS_PROXY": "ftp://bad"},
    {"https_proxy": "", "HTTPS_PROXY": "ftp://bad"},
    {"HTTPS_proxy": "", "HTTPS_PROXY": "ftp://bad"},
    {"HTTP_PROXY": "ftp://p", "REQUEST_METHOD": "GET"},
    {"ALL_PROXY": "socks4://p:1080"},
    {"ALL_PROXY": "socks4://p:1080", "NO_PROXY": "*"},
    {"ALL_PROXY": "socks4://p:1080", "no_proxy": "a.com, *"},
    {"all_proxy": "socks://127.0.0.1:1080/"},
    {"ALL_PROXY": "socks5h://p:1080"},
    {"NO_PROXY": "localhost,127.0.0.1,10.96.0.0/12,fd00::/8"},  # Kubernetes' IPv6 service network
    {"no_proxy": "::1/128", "HTTPS_PROXY": "http://p:3128"},
    {"NO_PROXY": "fd00::/8, *"},
    {"NO_PROXY": "fe80::1%eth0,::1,.svc,*.example.com,http://[::1]:8000"},
    {"NO_PROXY": "http://[::g]"},
]


@pytest.mark.parametrize("env", _DIFFERENTIAL, ids=lambda env: repr(env))
def test_the_check_refuses_what_httpx_refuses_and_nothing_else(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        httpx.Client().close()
        httpx_refuses = False
    except (ImportError, ValueError, httpx.InvalidURL):
        httpx_refuses = True
    assert bool(http_environment_problems()) is httpx_refuses, http_environment_problems()


def test_no_proxy_star_turns_every_proxy_variable_off() -> None:
    """httpx ignores HTTP(S)_PROXY and ALL_PROXY when an entry of NO_PROXY is ``*``."""
    env = {"ALL_PROXY": "socks4://proxy.example:1080", "HTTPS_PROXY": "ftp://x", "no_proxy": "localhost, *"}
    assert proxy_variables(env) == {}
    assert http_environment_problems(env) == []


def test_a_proxy_url_with_a_trailing_space_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``export HTTP_PROXY="$(cat proxy.txt)"`` leaves it: httpx takes it, and so do the commands."""
    with loopback_proxy(BAD_GATEWAY) as seen:
        monkeypatch.setenv("HTTP_PROXY", seen.url + " ")
        require_usable()
        with build_http_client(timeout=httpx.Timeout(10)) as client:
            assert client.get("http://example.invalid/").status_code == 502  # the stand-in's answer
    assert seen.requests[0][0] == "GET http://example.invalid/ HTTP/1.1"


def test_the_settings_load_whatever_the_proxy_variables_say(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings are every command's; only those that talk to fal check the variables."""
    monkeypatch.setenv("ALL_PROXY", "gopher://x:1")
    get_settings.cache_clear()
    try:
        get_settings()
        with pytest.raises(ConfigError, match="ALL_PROXY: its scheme 'gopher'"):
            require_usable()
    finally:
        get_settings.cache_clear()


def test_certificate_variables(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert http_environment_problems({"SSL_CERT_FILE": str(pem), "SSL_CERT_DIR": "/nonexistent"}) == []
    (tmp_path / "5ad8a5d6.0").write_bytes(pem.read_bytes())  # a certificate under its hash
    assert http_environment_problems({"SSL_CERT_DIR": f"/nonexistent:{tmp_path}"}) == []
    split = tmp_path / "split.pem"  # the block straddles two of the pieces the file is read in
    split.write_bytes(b"#" * (64 * 1024 - 10) + pem.read_bytes())
    assert http_environment_problems({"SSL_CERT_FILE": str(split)}) == []
    assert "is a folder" in http_environment_problems({"SSL_CERT_FILE": str(tmp_path)})[0]
    assert "is no folder" in http_environment_problems({"SSL_CERT_DIR": "/nonexistent"})[0]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("a.localhost", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("localhost.example", False),
        ("queue.fal.run", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def _pool_kind(client: httpx.Client, url: str) -> str:
    """The class of the connection pool a request for ``url`` goes out on (httpcore's
    ``ConnectionPool``, ``HTTPProxy`` or ``SOCKSProxy``)."""
    return type(getattr(client._transport_for_url(httpx.URL(url)), "_pool", None)).__name__


def _fal(queue_url: str, key: str) -> FalClient:
    return FalClient(queue_url=queue_url, rest_url="https://rest.fal.ai", key=key, timeout=httpx.Timeout(5))


def test_a_socks_proxy_carries_fal_but_neither_loopback_nor_downloads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``httpx[socks]``: fal's API goes through ``ALL_PROXY=socks5://…``; a fal URL on loopback
    (the simulator) goes directly; downloads ignore proxies (their address guard checks the
    address they connect to); and the key still goes to fal's configured origins only."""
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    with _fal("https://queue.fal.run", "k" * 20) as fal:
        assert _pool_kind(fal.http, "https://queue.fal.run/fal-ai/wan-22") == "SOCKSProxy"
        assert not fal._auth.trusts("https://v3.fal.media/x.mp4")
    with _fal("http://127.0.0.1:8787", "k" * 20) as sim:
        assert sim.http._transport_for_url(httpx.URL("http://127.0.0.1:8787/x")) is sim.http._transport
        assert _pool_kind(sim.http, "https://rest.fal.ai/x") == "SOCKSProxy"
    policy = DownloadPolicy.for_urls(["https://queue.fal.run"], None)
    with guarded_client(policy, httpx.Timeout(5)) as downloads:
        assert downloads._mounts == {}


def test_a_no_proxy_entry_httpx_cannot_read_is_named_with_its_variable() -> None:
    """An IPv6 network (``fd00::/8``, as Kubernetes clusters list theirs) passed the check, then
    httpx raised InvalidURL building the first client, and the line named five other variables."""
    [problem] = http_environment_problems({"NO_PROXY": "localhost,10.96.0.0/12,fd00::/8"})
    assert problem.startswith("NO_PROXY: its entry 'fd00::/8' is not a host httpx can read")
    assert "httpx takes no IPv6 network" in problem
    assert "NO_PROXY" in construction_message(httpx.InvalidURL("x"), {"NO_PROXY": ".example.com"})


@contextmanager
def _https_server(cert: Path, key: Path) -> Iterator[str]:
    """An HTTPS server on loopback answering every GET 200 with ``cert``; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"https://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("rotation", ["rewritten-in-place", "renamed-over"])
def test_a_ca_bundle_rotated_at_the_same_path_is_trusted_by_the_clients_built_after(
    rotation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``update-ca-certificates``, a re-mounted Kubernetes ConfigMap: the clients built after
    the bundle changed trusted the old one (the TLS context was cached by the path alone)."""
    old_cert, _ = make_self_signed(tmp_path / "old", "localhost")
    new_cert, new_key = make_self_signed(tmp_path / "new", "localhost")
    bundle = tmp_path / "bundle.pem"
    shutil.copy(old_cert, bundle)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    with _https_server(new_cert, new_key) as url:
        with build_http_client(timeout=httpx.Timeout(10)) as before, pytest.raises(httpx.ConnectError):
            before.get(url)  # the old CA did not sign the server's certificate
        if rotation == "renamed-over":
            staged = tmp_path / "bundle.pem.new"
            shutil.copy(new_cert, staged)
            staged.replace(bundle)
        else:
            was = bundle.stat()
            bundle.write_bytes(new_cert.read_bytes())
            # the same size, maybe the same clock tick: a later mtime, as a rotation's would be
            os.utime(bundle, ns=(was.st_atime_ns, was.st_mtime_ns + 1_000_000_000))
        with build_http_client(timeout=httpx.Timeout(10)) as after:
            assert after.get(url).status_code == 200
        assert shared_ssl_context() is shared_ssl_context()  # unchanged since: still one, shared
