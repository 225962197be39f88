"""How the proxy and certificate variables are judged for what a command is about to reach, and
how a client built before a CA bundle was rotated comes to trust the new one
(``jobs.http_environment.environment_verdict``, ``worker.fal.http.current_ssl_context``).

Before: ``run`` refused a proxy variable httpx cannot use (``HTTPS_PROXY=ftp://…``) even when it
would reach no host a proxy carries (``--simulate``, a simulator on 127.0.0.1, a batch with
nothing left to send fal), and the fal client read the proxy variables when it was built, used
or not; a nonexistent ``SSL_CERT_DIR`` was refused though httpx builds its clients with it, and
a folder of certificates nobody hashed, with which OpenSSL verifies nothing either, was taken;
and a client already built kept trusting a rotated CA bundle's old CA for as long as it lived.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.x509.name import _ASN1Type

from falsim.tls import make_self_signed
from jobs.errors import ConfigError
from jobs.http_environment import cert_dir_problem, environment_verdict, require_usable
from worker.fal import http as fal_http
from worker.fal.client import FalClient
from worker.fal.http import build_http_client

_NAMES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssl_cert_file", "ssl_cert_dir")
_FAL = ["https://queue.fal.run", "https://rest.fal.ai"]
_LOOPBACK = ["http://127.0.0.1:8787", "http://localhost:8787", "http://[::1]:8787"]


@pytest.fixture(autouse=True)
def _no_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _NAMES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@dataclass
class Served:
    url: str
    #: The client ports of the connections it accepted, one per connection.
    connections: list[int] = field(default_factory=list)


@contextmanager
def _server(cert: Path | None = None, key: Path | None = None) -> Iterator[Served]:
    """An HTTP/1.1 server on loopback (HTTPS with ``cert``) answering every GET 200, keeping
    connections open, and counting them."""
    served = Served("")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with lock:
                served.connections.append(self.client_address[1])

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if cert is not None and key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    served.url = f"{scheme}://localhost:{server.server_address[1]}/"
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- proxies: only beyond loopback


@pytest.mark.parametrize(
    "env",
    [
        {"HTTPS_PROXY": "ftp://x:1"},
        {"all_proxy": "socks://127.0.0.1:1080/"},  # GNOME's own
        {"HTTP_PROXY": "http://user:pw@proxy:31z8"},
        {"NO_PROXY": "localhost,10.96.0.0/12,fd00::/8"},
    ],
    ids=repr,
)
def test_proxy_variables_are_judged_only_for_a_host_beyond_loopback(env: dict[str, str]) -> None:
    assert environment_verdict(env, reaches=[]) == ([], [])
    assert environment_verdict(env, reaches=_LOOPBACK) == ([], [])
    [refused] = environment_verdict(env, reaches=_FAL)[0]
    assert refused.startswith(f"{next(iter(env))}: ")
    assert environment_verdict(env, reaches=["http://127.0.0.1:1", "https://queue.fal.run"])[0] == [refused]
    assert environment_verdict(env)[0] == [refused]  # reaching anything: as before


def test_require_usable_refuses_a_proxy_variable_only_for_fal_beyond_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "ftp://x:1")
    assert require_usable(reaches=[]) == []
    assert require_usable(reaches=_LOOPBACK) == []
    with pytest.raises(ConfigError, match="HTTPS_PROXY: its scheme 'ftp'"):
        require_usable(reaches=_FAL)


def test_a_fal_client_on_loopback_reads_no_proxy_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``run --simulate``'s, or one pointed at ``wanbatch simulator`` on 127.0.0.1: nothing it
    reaches goes through a proxy, so a proxy variable httpx cannot use is none of its business
    (httpx raised ValueError building it, a ConfigError)."""
    monkeypatch.setenv("HTTPS_PROXY", "ftp://x:1")
    monkeypatch.setenv("HTTP_PROXY", "ftp://x:1")
    monkeypatch.setenv("ALL_PROXY", "socks4://x:1")
    with _server() as served:
        url = served.url.rstrip("/")
        with FalClient(queue_url=url, rest_url=url, key="k" * 20, timeout=httpx.Timeout(10)) as fal:
            assert fal.http.get(served.url).status_code == 200
            assert not fal.http.trust_env


def test_a_fal_client_reads_the_proxy_variables_when_it_first_calls_fal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A runtime builds its fal client whether or not it calls fal (``run`` of a batch whose jobs
    have all ended): the proxy variables are read, and one httpx cannot use refused, when the
    client is first used, not when it is built."""
    monkeypatch.setenv("HTTPS_PROXY", "ftp://x:1")
    fal = FalClient(queue_url=_FAL[0], rest_url=_FAL[1], key="k" * 20, timeout=httpx.Timeout(10))
    try:
        with pytest.raises(ConfigError, match="HTTPS_PROXY: its scheme 'ftp'"):
            fal.http  # noqa: B018 - the first use builds it
    finally:
        fal.close()
    unused = FalClient(queue_url=_FAL[0], rest_url=_FAL[1], key="k" * 20, timeout=httpx.Timeout(10))
    unused.close()  # closing one never used builds nothing


# ----------------------------------------------------------------------------- SSL_CERT_DIR


def _hash_name(cert: Path) -> str:
    """The name OpenSSL's hashed-folder lookup opens for ``cert`` (``openssl x509 -hash``): the
    first 4 bytes, little-endian, of the SHA-1 of its subject's canonical encoding (values in
    lower case as UTF8String, the outer SEQUENCE's header dropped)."""
    subject = x509.load_pem_x509_certificate(cert.read_bytes()).subject
    canon = x509.Name(
        [
            x509.NameAttribute(a.oid, " ".join(str(a.value).lower().split()), _type=_ASN1Type.UTF8String)
            for a in subject
        ]
    ).public_bytes()
    header = 2 if canon[1] < 0x80 else 2 + (canon[1] & 0x7F)
    return hashlib.sha1(canon[header:]).digest()[:4][::-1].hex() + ".0"


def _folders(tmp_path: Path, cert: Path) -> dict[str, str]:
    """``SSL_CERT_DIR`` values: none that exists, a folder with the CA under a name OpenSSL never
    opens, one with it under its hash, and a list of both kinds."""
    plain, hashed = tmp_path / "plain", tmp_path / "hashed"
    plain.mkdir()
    hashed.mkdir()
    shutil.copy(cert, plain / "ca.pem")
    shutil.copy(cert, hashed / _hash_name(cert))
    return {
        "missing": str(tmp_path / "nonexistent"),
        "unhashed": str(plain),
        "hashed": str(hashed),
        "list": f"{tmp_path / 'nonexistent'}:{plain}:{hashed}",
    }


def _verified(client: httpx.Client, url: str) -> bool:
    """Whether ``client`` verified the server at ``url`` (False: CERTIFICATE_VERIFY_FAILED)."""
    try:
        return client.get(url).status_code == 200
    except httpx.ConnectError as exc:
        if "CERTIFICATE_VERIFY_FAILED" not in str(exc):
            raise
        return False


def test_an_ssl_cert_dir_is_judged_as_openssl_verifies_with_it(tmp_path: Path) -> None:
    """httpx hands ``SSL_CERT_DIR`` to ``ssl.create_default_context(capath=…)``, which never
    fails: the client is built whatever the folder, and OpenSSL looks a server's CA up in it by
    hash at each handshake. A folder it finds no hashed certificate in verifies no HTTPS server
    (plain HTTP still works); one it does verifies the servers that CA signed."""
    cert, key = make_self_signed(tmp_path / "ca", "localhost")
    folders = _folders(tmp_path, cert)
    with _server(cert, key) as tls, _server() as plain, pytest.MonkeyPatch.context() as patch:
        for name, value in folders.items():
            patch.setenv("SSL_CERT_DIR", value)
            with build_http_client(timeout=httpx.Timeout(10)) as client:  # built, whatever the folder
                assert client.get(plain.url).status_code == 200
                verified = _verified(client, tls.url)
            assert verified is (cert_dir_problem(value) is None), name
    assert [n for n, v in folders.items() if cert_dir_problem(v) is None] == ["hashed", "list"]


def test_an_ssl_cert_dir_that_verifies_nothing_is_refused_only_for_https(tmp_path: Path) -> None:
    """Every request to an ``https://`` fal fails with it: refused. ``run --simulate`` (plain
    HTTP on loopback) makes none: a warning line, and it runs."""
    cert, _ = make_self_signed(tmp_path / "ca", "localhost")
    folders = _folders(tmp_path, cert)
    missing = {"SSL_CERT_DIR": folders["missing"]}
    [warning] = environment_verdict(missing, reaches=[])[1]
    assert warning.startswith(
        f"SSL_CERT_DIR: {folders['missing']!r} is no folder, so OpenSSL verifies no HTTPS"
    )
    assert environment_verdict(missing, reaches=["http://127.0.0.1:8787"]) == ([], [warning])
    assert environment_verdict(missing, reaches=_FAL) == ([warning], [])
    assert environment_verdict(missing, reaches=["https://127.0.0.1:8787"]) == ([warning], [])  # --tls
    unhashed = {"SSL_CERT_DIR": folders["unhashed"]}
    [refused] = environment_verdict(unhashed, reaches=_FAL)[0]
    assert "holds no hashed CA certificate" in refused
    assert "openssl rehash" in refused
    assert environment_verdict({"SSL_CERT_DIR": folders["list"]}, reaches=_FAL) == ([], [])
    # httpx reads SSL_CERT_DIR only without SSL_CERT_FILE
    assert environment_verdict({**missing, "SSL_CERT_FILE": str(cert)}, reaches=_FAL) == ([], [])


# ------------------------------------------------------------------- a CA bundle rotated in place


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The clock the trust's re-checks are counted on, moved by the test (``clock[0] += …``)."""
    now = [1000.0]
    monkeypatch.setattr(fal_http, "_trust_clock", lambda: now[0])
    return now


def _rotate(bundle: Path, cert: Path) -> None:
    """Rewrite ``bundle`` in place with ``cert``: a later mtime, as a rotation's would be."""
    was = bundle.stat()
    bundle.write_bytes(cert.read_bytes())
    os.utime(bundle, ns=(was.st_atime_ns, was.st_mtime_ns + 1_000_000_000))


def test_a_client_built_before_a_ca_bundle_rotation_trusts_the_new_ca_from_its_next_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    """A corporate proxy's CA rotated during an overnight render: the running worker's fal
    client failed every new connection until it was restarted. It now looks at the bundle again
    (one stat) when a new connection is made and it was last looked at over
    ``TRUST_RECHECK_SECONDS`` ago; connections already open are kept (the pool is not dropped)."""
    old_cert, old_key = make_self_signed(tmp_path / "old", "localhost")
    new_cert, new_key = make_self_signed(tmp_path / "new", "localhost")
    bundle = tmp_path / "bundle.pem"
    shutil.copy(old_cert, bundle)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    with (
        _server(old_cert, old_key) as old_server,
        _server(new_cert, new_key) as new_server,
        build_http_client(timeout=httpx.Timeout(10)) as client,
    ):
        assert client.get(old_server.url).status_code == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            client.get(new_server.url)  # the old CA did not sign it

        _rotate(bundle, new_cert)
        clock[0] += fal_http.TRUST_RECHECK_SECONDS / 2
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            client.get(new_server.url)  # not looked at again yet: no stat per connection

        clock[0] += fal_http.TRUST_RECHECK_SECONDS
        assert client.get(new_server.url).status_code == 200  # the same client, the new CA
        assert client.get(old_server.url).status_code == 200  # its open connection, kept
        assert len(old_server.connections) == 1
        assert len(new_server.connections) == 1  # the handshakes refused never reached it


def test_a_bundle_that_cannot_be_loaded_when_looked_at_again_leaves_the_trust_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: list[float]
) -> None:
    """Looked at half written (or removed) during a rotation: the connection is made with the
    trust loaded before, and the bundle is looked at again later."""
    old_cert, old_key = make_self_signed(tmp_path / "old", "localhost")
    new_cert, new_key = make_self_signed(tmp_path / "new", "localhost")
    bundle = tmp_path / "bundle.pem"
    shutil.copy(old_cert, bundle)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    with (
        _server(old_cert, old_key) as old_server,
        _server(new_cert, new_key) as new_server,
        build_http_client(timeout=httpx.Timeout(10)) as client,
    ):
        bundle.write_text("-----BEGIN CERTIFICATE-----\nhalf writ")
        clock[0] += fal_http.TRUST_RECHECK_SECONDS
        assert client.get(old_server.url).status_code == 200  # a new connection, the old trust
        _rotate(bundle, new_cert)
        clock[0] += fal_http.TRUST_RECHECK_SECONDS
        assert client.get(new_server.url).status_code == 200


@pytest.mark.parametrize("variable", [None, "SSL_CERT_FILE"])
def test_the_shared_context_is_the_one_httpx_would_build(
    variable: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It is built as :func:`httpx.create_ssl_context` builds it (rebuilt for a client's own
    variables when their files change), so it must trust and check what httpx's would."""
    if variable:
        cert, _ = make_self_signed(tmp_path, "localhost")
        monkeypatch.setenv(variable, str(cert))
    ours, theirs = fal_http.shared_ssl_context(), httpx.create_ssl_context()
    assert ours.cert_store_stats() == theirs.cert_store_stats()
    assert ours.get_ca_certs() == theirs.get_ca_certs()
    for setting in ("verify_mode", "check_hostname", "options", "minimum_version", "verify_flags"):
        assert getattr(ours, setting) == getattr(theirs, setting), setting
