"""A throw-away self-signed certificate for serving the simulator over HTTPS, and how to trust it.

fal's own client hard-codes ``https://`` (``QUEUE_URL_FORMAT`` in fal_client's ``client.py``,
https://github.com/fal-ai/fal/tree/main/projects/fal_client), so ``wanbatch simulator --tls``
and the conformance tests serve the simulator over TLS, and clients trust this certificate
through ``SSL_CERT_FILE``: httpx (which fal_client and wanbatch both use) reads it, when its
``trust_env`` is on (the default), as the only CA file of the default SSL context
(``httpx._config.create_ssl_context``), instead of certifi's bundle.

What fal_client (1.0.x) takes from the environment, all read once, when it is imported:
``FAL_RUN_HOST`` (``fal.run``: its synchronous ``run``, which the simulator does not serve) and
``FAL_QUEUE_RUN_HOST`` (default ``queue.`` + ``FAL_RUN_HOST``: submit, status, result, cancel,
all of which it does serve), each a bare ``host[:port]`` put after ``https://``; plus
``FAL_KEY`` (or ``FAL_KEY_ID``/``FAL_KEY_SECRET``), read at each call. Its upload hosts
(``REST_URL``, ``CDN_URL``) are constants no variable changes, so its uploads cannot be pointed
at a simulator from outside (tests patch the module's constants).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shlex
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _subject_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def make_self_signed(directory: Path, host: str = "127.0.0.1", also: Iterable[str] = ()) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` for ``host`` (plus localhost, 127.0.0.1 and the host
    names in ``also``: a ``--public-url``'s, which clients check the certificate against) into
    ``directory``. The certificate is its own CA: ``cert.pem`` is the file a client trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wanbatch fal simulator")])
    now = dt.datetime.now(dt.UTC)
    alt: list[x509.GeneralName] = []
    for each in ("localhost", "127.0.0.1", host, *also):
        if each and (subject := _subject_name(each)) not in alt:
            alt.append(subject)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def no_proxy_settings(host: str) -> str:
    """``NO_PROXY=HOST no_proxy=HOST``: the simulator's host reached without a proxy, as httpx
    (fal_client's HTTP client) reads them, for a shell whose ``HTTPS_PROXY`` would otherwise
    carry fal_client's requests to a proxy that cannot reach this machine's simulator (it
    answers 502).

    httpx reads the variables through :func:`urllib.request.getproxies`, where a lower-case
    ``no_proxy`` already set wins over ``NO_PROXY``: both are set. The entry is the bare host
    (``httpx._utils.get_environment_proxies``): an IPv4 address or ``localhost`` matches that
    host on every port, a name that host and its subdomains, an IPv6 address is written without
    brackets (``::1``; ``[::1]`` makes httpx refuse to build any client, "Invalid port"). A
    ``host:port`` entry works with httpx but not with every other client, so none is given."""
    entry = shlex.quote(host)
    return f"NO_PROXY={entry} no_proxy={entry}"


def client_settings(url: str, ca_file: Path) -> list[str]:
    """The lines ``wanbatch simulator --tls`` prints after its URL: the CA file, then the
    ``export`` line for fal's own client and the one for wanbatch, each ready to paste (values
    quoted for a POSIX shell).

    ``url`` is the simulator's base URL as clients reach it (``https://host:port``, a
    ``--public-url`` when given). fal_client takes only a host (``FAL_QUEUE_RUN_HOST``), read
    at import; wanbatch takes full URLs (``WANBATCH_FAL_QUEUE_URL``/``WANBATCH_FAL_REST_URL``:
    one server plays both, storage uploads included) and has no CA setting of its own: its
    httpx clients read ``SSL_CERT_FILE`` as fal_client's do. Any key works (``FAL_KEY``); both
    clients refuse to start without one. fal_client's line also names the simulator's host in
    ``NO_PROXY`` (:func:`no_proxy_settings`): under ``HTTPS_PROXY`` fal_client would send it to
    the proxy; wanbatch reaches a loopback host directly, and is given it only for another host.
    """
    parts = urlsplit(url)
    host = parts.netloc
    ca = shlex.quote(str(ca_file))
    base = shlex.quote(url)
    direct = no_proxy_settings(parts.hostname or "")
    fal_client = f"FAL_QUEUE_RUN_HOST={shlex.quote(host)} SSL_CERT_FILE={ca} FAL_KEY=any-key {direct}"
    wanbatch = f"WANBATCH_FAL_QUEUE_URL={base} WANBATCH_FAL_REST_URL={base} SSL_CERT_FILE={ca}"
    if not _is_loopback(parts.hostname or ""):  # wanbatch reaches loopback directly on its own
        wanbatch += f" {direct}"
    return [
        f"CA certificate (self-signed, deleted when the simulator stops): {ca_file}",
        "fal's Python client (fal-client reads them at import; its uploads go to fal whatever is set):",
        f"  export {fal_client}",
        "wanbatch:",
        f"  export {wanbatch} FAL_KEY=any-key",
        "(SSL_CERT_FILE replaces the CAs httpx trusts in that shell: real fal is not reachable from it.)",
    ]
