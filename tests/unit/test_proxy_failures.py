"""fal's API behind a proxy that fails, and TLS that does not verify: what each call makes of it.

Before: a proxy that answered ``CONNECT`` with 502 (what Squid does when it cannot reach fal) or
407 made every submit a counted retry (``RetryableProviderError``: the batch failed in 18 s,
``3 failed (network_error): … fal submit: not sent, could not connect (ProxyError): 502 Bad
Gateway``) where a refused connection held the batch; and no line said it was the *proxy*
(``could not connect (ConnectError): [Errno -2] Name or service not known``) nor which CA bundle
a certificate was checked against. Everything here is on loopback: the proxy is the stand-in of
:mod:`tests.loopback_proxy`, fal's host (``fal.corp.example``) is only ever named to it.
"""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from falsim.tls import make_self_signed
from jobs.errors import AmbiguousSubmitError, RetryableProviderError
from tests.loopback_proxy import AUTH_REQUIRED, BAD_GATEWAY, loopback_proxy
from tests.ports import unused_port
from worker.fal.client import FalClient
from worker.fal.errors import FalUnreachableError, SendTrace
from worker.fal.http import RetryPolicy

FAL = "https://fal.corp.example"
FAL_AT = "fal.corp.example:443"
SECRET = "pr0xy-s3cret"
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file", "ssl_cert_dir")


@pytest.fixture(autouse=True)
def _no_proxy_of_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.lower() in _PROXY_VARIABLES:
            monkeypatch.delenv(name)


def _fal(url: str = FAL) -> FalClient:
    return FalClient(
        queue_url=url,
        rest_url=url,
        key="k",
        timeout=httpx.Timeout(5.0),
        retry=RetryPolicy(attempts=1, base_delay=0.0),
        sleep=lambda _s: None,
    )


def _behind(monkeypatch: pytest.MonkeyPatch, url: str) -> str:
    """``HTTPS_PROXY`` set to ``url`` with a user and password; the proxy's ``host:port``."""
    host_port = url.split("://", 1)[1]
    monkeypatch.setenv("HTTPS_PROXY", f"http://wanbatch:{SECRET}@{host_port}")
    return host_port


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ("502 Bad Gateway", f"answered 502 Bad Gateway: it could not reach {FAL_AT}"),
        ("503 Service Unavailable", f"answered 503 Service Unavailable: it could not reach {FAL_AT}"),
        (
            "407 Proxy Authentication Required",
            "answered 407 Proxy Authentication Required: set its user:password in HTTPS_PROXY",
        ),
        ("403 Forbidden", f"answered 403 Forbidden to the tunnel to {FAL_AT}: its policy refuses it"),
    ],
)
def test_a_submit_the_proxy_did_not_tunnel_is_unreached_and_names_the_proxy(
    monkeypatch: pytest.MonkeyPatch, answer: str, said: str
) -> None:
    """Nothing left this host: no submission (the job waits uncounted while it lasts, never a
    counted retry that fails the batch), and the line says which proxy did what."""
    with loopback_proxy(answer) as proxy:
        where = _behind(monkeypatch, proxy.url)
        with _fal() as client, pytest.raises(FalUnreachableError) as info:
            client.submit("fal-ai/wan-22", {"prompt": "p"})
    assert proxy.requests[0][0] == "CONNECT fal.corp.example:443 HTTP/1.1"
    text = str(info.value)
    assert text.startswith("fal submit: not sent, could not connect (ProxyError): ")
    assert f"the proxy {where} (HTTPS_PROXY) {said}" in text
    assert SECRET not in text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["status", "result", "cancel"])
def test_idempotent_calls_through_a_failing_proxy_are_retried_and_name_it(
    monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """Status, result and cancel are asked again, as for any network error (the request is
    still at fal): their line names the proxy."""
    with loopback_proxy(BAD_GATEWAY) as proxy:
        where = _behind(monkeypatch, proxy.url)
        with _fal() as client, pytest.raises(RetryableProviderError) as info:
            getattr(client, call)(client.handle("fal-ai/wan-22", "r1"))
    assert not isinstance(info.value, FalUnreachableError)
    text = str(info.value)
    assert f"the proxy {where} (HTTPS_PROXY) answered 502 Bad Gateway" in text, text
    assert SECRET not in text


@pytest.mark.timeout(60)
def test_a_proxy_that_refuses_the_connection_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    where = _behind(monkeypatch, f"http://127.0.0.1:{unused_port()}")
    with _fal() as client, pytest.raises(FalUnreachableError) as info:
        client.submit("fal-ai/wan-22", {"prompt": "p"})
    text = str(info.value)
    assert f"could not connect (ConnectError): the proxy {where} (HTTPS_PROXY) refused the connection" in text
    assert SECRET not in text
    with _fal() as client, pytest.raises(RetryableProviderError) as status:
        client.status(client.handle("fal-ai/wan-22", "r1"))
    assert f"the proxy {where} (HTTPS_PROXY) refused the connection" in str(status.value)


@pytest.mark.timeout(60)
def test_a_proxy_whose_name_does_not_resolve_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", f"http://wanbatch:{SECRET}@proxy.invalid:3128")
    with _fal() as client, pytest.raises(FalUnreachableError) as info:
        client.submit("fal-ai/wan-22", {"prompt": "p"})
    text = str(info.value)
    assert "the proxy proxy.invalid:3128 (ALL_PROXY): its name does not resolve" in text, text
    assert SECRET not in text


def test_a_fal_that_refuses_the_connection_is_not_called_a_proxy() -> None:
    """Without a proxy, the line is what it was."""
    with _fal(f"http://127.0.0.1:{unused_port()}") as client, pytest.raises(FalUnreachableError) as info:
        client.submit("fal-ai/wan-22", {"prompt": "p"})
    assert "proxy" not in str(info.value)
    assert "Connection refused" in str(info.value)


def test_the_connect_of_a_tunnel_is_not_the_requests_body() -> None:
    """httpcore traces the proxy's ``CONNECT`` like any request: its (empty) body "complete"
    said the submit's body went out, and a write that failed after the tunnel opened read as
    ambiguous (may be queued) although nothing of the request had left."""
    trace = SendTrace()
    for name in (
        "connection.connect_tcp.complete",
        "http11.send_request_headers.complete",
        "http11.send_request_body.complete",
        "http11.receive_response_headers.complete",
        "proxy.start_tls.started",
        "proxy.start_tls.complete",
        "http11.send_request_headers.started",
        "http11.send_request_headers.failed",
    ):
        trace(name, {})
    assert not trace.body_sent
    sent = SendTrace()
    for name in [*trace.events, "http11.send_request_body.complete"]:
        sent(name, {})
    assert sent.body_sent
    from worker.fal.errors import _submit_failure

    unsent = SendTrace()
    for name in ("http11.send_request_body.complete", "proxy.start_tls.complete"):
        unsent(name, {})
    assert not isinstance(_submit_failure(httpx.WriteError("broken pipe"), unsent), AmbiguousSubmitError)


# ------------------------------------------------------------------------------ certificates


@contextmanager
def _https_server(folder: Path) -> Iterator[int]:
    """An HTTPS server on 127.0.0.1 whose certificate no usual bundle holds; its port."""
    cert, key = make_self_signed(folder / "server")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(60)
def test_a_certificate_that_does_not_verify_names_the_ca_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy that re-signs TLS, or a bundle without the CA: the line names the bundle in use
    (``SSL_CERT_FILE``), not only the network and the proxy."""
    other, _ = make_self_signed(tmp_path / "other")  # a valid bundle, of another CA
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    with _https_server(tmp_path) as port, _fal(f"https://127.0.0.1:{port}") as client:
        with pytest.raises(RetryableProviderError) as submit:
            client.submit("fal-ai/wan-22", {"prompt": "p"})
        with pytest.raises(RetryableProviderError) as status:
            client.status(client.handle("fal-ai/wan-22", "r1"))
    assert not isinstance(submit.value, FalUnreachableError)  # a counted retry, as documented
    for failure in (submit.value, status.value):
        text = str(failure)
        assert "certificate verification failed" in text, text
        assert f"against SSL_CERT_FILE ({other})" in text, text


def test_the_ca_bundle_in_use_is_certifis_without_the_variables() -> None:
    from worker.fal.proxy_failure import ca_bundle

    assert ca_bundle({}).startswith("certifi's CA bundle (")
    assert ca_bundle({"SSL_CERT_DIR": "/etc/ssl/certs"}) == "SSL_CERT_DIR (/etc/ssl/certs)"


def test_no_proxy_no_words() -> None:
    from worker.fal.proxy_failure import proxy_failure

    assert proxy_failure(httpx.ConnectError("[Errno 111] Connection refused")) is None


# ------------------------------------------------------------------------------ doctor, JWKS


@pytest.mark.timeout(60)
def test_the_doctors_provider_check_names_the_proxy_and_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import SecretStr

    from jobs.settings import Settings
    from worker.doctor import check_provider

    settings = Settings.model_construct(fal_key=SecretStr("k-123:secret"), fal_queue_url=FAL)
    with loopback_proxy(AUTH_REQUIRED) as proxy:
        where = _behind(monkeypatch, proxy.url)
        check = check_provider(settings)
    assert check.status == "fail"
    assert check.detail == (
        f"cannot reach {FAL}: ProxyError: the proxy {where} (HTTPS_PROXY) answered 407 Proxy "
        "Authentication Required: set its user:password in HTTPS_PROXY"
    ), check.detail
    assert (
        check.fix == "set the proxy's user:password in the variable named above (fal's queue goes through it)"
    )
    assert SECRET not in check.detail + check.fix


@pytest.mark.timeout(60)
def test_the_doctors_provider_check_names_the_ca_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "check WANBATCH_FAL_QUEUE_URL, the network and any proxy (HTTPS_PROXY)" of a
    certificate that did not verify, and never SSL_CERT_FILE."""
    from pydantic import SecretStr

    from jobs.settings import Settings
    from worker.doctor import check_provider

    other, _ = make_self_signed(tmp_path / "other")
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    with _https_server(tmp_path) as port:
        settings = Settings.model_construct(
            fal_key=SecretStr("k-123:secret"), fal_queue_url=f"https://127.0.0.1:{port}"
        )
        check = check_provider(settings)
    assert check.status == "fail"
    assert "certificate verification failed" in check.detail
    assert f"against SSL_CERT_FILE ({other})" in check.detail
    assert (check.fix or "").startswith("point SSL_CERT_FILE at a PEM bundle holding the CA"), check.fix


@pytest.mark.timeout(60)
def test_the_jwks_fetch_says_why_it_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """It said ``could not be fetched: ProxyError`` (or ``ConnectError``), the reason dropped:
    serve's /healthz and the doctor's receiver check showed that."""
    from worker.fal.webhooks import JwksKeys

    with loopback_proxy(BAD_GATEWAY) as proxy:
        where = _behind(monkeypatch, proxy.url)
        health = JwksKeys("https://jwks.corp.example/.well-known/jwks.json", timeout=5.0).health()
    assert health.error == (
        f"fal's signing keys could not be fetched: ProxyError: the proxy {where} (HTTPS_PROXY) "
        "answered 502 Bad Gateway: it could not reach jwks.corp.example:443"
    ), health.error
    nowhere = unused_port()
    health = JwksKeys(f"http://127.0.0.1:{nowhere}/jwks.json", timeout=5.0).health()
    assert health.error == (
        "fal's signing keys could not be fetched: ConnectError: [Errno 111] Connection refused"
    ), health.error
