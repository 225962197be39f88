"""The proxy and certificate variables httpx reads, checked before a command builds a client.

httpx (``trust_env=True``, its default) reads ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and
``NO_PROXY`` (any case, as :func:`urllib.request.getproxies` does) and ``SSL_CERT_FILE`` or
``SSL_CERT_DIR`` when a client is *constructed*, and raises there for a value it cannot use: a
proxy scheme it does not know (``ftp://``), a SOCKS proxy without ``socksio``, a ``NO_PROXY``
entry it cannot read as a host (an IPv6 network, ``fd00::/8``), a certificate file that is
missing or holds no certificate. wanbatch builds its clients deep inside a run (the simulator's,
fal's, the downloads'), so each of those was an internal error, exit 70, "please report it".
The commands that talk to fal (``run``, ``rerun``, ``cancel``, ``worker``, ``serve``,
``doctor``, ``simulator``) refuse them before they start (:func:`require_usable`): one line
naming the variable and what it may be, exit 2, nothing sent. The others (``status``,
``estimate``, ``export``…) build no client and never look: a proxy variable meant for other
programs (GNOME's ``all_proxy=socks://…``) is none of their business.

Each is refused only where it would make every request fail, for the URLs the command is about
to reach (``reaches``, :func:`environment_verdict`). The proxy variables are judged only when one
of them is beyond this machine's loopback: a request to loopback never goes through a proxy, and
a client that reaches nothing else reads none (``worker.fal.http.build_http_client``), so
``run --simulate``, a run against ``wanbatch simulator`` on ``127.0.0.1``, or a ``run`` of a
batch that has nothing left to send fal is never refused over one. A certificate file httpx
cannot load fails every client's construction: always refused. An ``SSL_CERT_DIR`` in which
OpenSSL finds no certificate (no such folder, or none named by a certificate's hash) builds a
client (httpx passes it to ``ssl.create_default_context(capath=…)``, and OpenSSL looks the
folders up only when it verifies a server) that verifies no HTTPS server at all: refused when
the command is about to reach an ``https://`` URL, a warning line otherwise.

The proxy variables are judged as httpx judges them, no stricter: the variables found by
:func:`urllib.request.getproxies_environment`'s rules, none at all when a ``NO_PROXY`` entry is
``*``, each value parsed by httpx's own URL parser (which takes a trailing space: ``int()``
reads the port) — httpx is imported for that, lazily; only the commands above, which load it
anyway, call this. ``tests/unit/test_http_environment.py`` compares the verdict with what
httpx's client construction does, so an httpx that reads them differently fails there.

A certificate file is looked at, not parsed (parsing the system bundle takes 0.15 s); one with
a certificate-looking block that OpenSSL still refuses is caught where the client is built
(``worker.fal.http``).

The values are never echoed: a proxy URL may carry a user and password. A certificate path is
(it is no secret, and it is what to look at), and so is a ``NO_PROXY`` entry (a host name).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from jobs.printable import printable

#: The proxy schemes httpx takes (``httpx.Proxy``); ``socks5``/``socks5h`` need ``socksio``,
#: which ``httpx[socks]`` (a dependency of wanbatch) installs.
PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
SOCKS_SCHEMES = ("socks5", "socks5h")
#: The ``*_proxy`` variables httpx mounts proxies for (``httpx._utils.get_environment_proxies``).
PROXY_KINDS = ("http", "https", "all")
#: Every variable this module checks, for messages that cannot name the one at fault.
VARIABLES = "HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY, SSL_CERT_FILE, SSL_CERT_DIR"
#: The PEM blocks OpenSSL loads from a CA file (``load_verify_locations(cafile=…)``): without
#: one it raises "no certificate or crl found".
_PEM_BLOCKS = (
    b"-----BEGIN CERTIFICATE-----",
    b"-----BEGIN TRUSTED CERTIFICATE-----",
    b"-----BEGIN X509 CERTIFICATE-----",
    b"-----BEGIN X509 CRL-----",
)
#: The most of a certificate file read to find a PEM block: far beyond any CA bundle.
_MAX_CERT_FILE_BYTES = 64 * 1024**2
#: How much of it is read at a time.
_PIECE_BYTES = 64 * 1024
_PROXY_EXAMPLE = "http://proxy.example:3128 (or https://, socks5://, socks5h://)"
#: The names OpenSSL's hashed-folder lookup (``X509_LOOKUP_hash_dir``, what ``capath`` sets up)
#: opens for a CA certificate: the subject name's hash, a dot, a sequence number. It never opens
#: any other file (``ca.pem`` in a folder nobody ran ``openssl rehash`` on is never read).
_HASHED_CERT_NAME = re.compile(r"[0-9a-f]{8}\.[0-9]+")


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (as ``httpx.URL.host`` gives it: lower case, an IPv6 address without
    brackets) names this machine's loopback: ``localhost`` (and ``*.localhost``, RFC 6761) or a
    loopback address, IPv4-mapped included. A proxy elsewhere cannot reach it: what wanbatch and
    its simulator send there goes directly, whatever the proxy variables say."""
    return host == "localhost" or host.endswith(".localhost") or is_loopback_address(host)


def is_loopback_address(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.0/8``, ``::1``, or IPv4-mapped
    ``::ffff:127.0.0.1``); a name is not: the dashboard judges a peer's address with this
    (:func:`web.auth.is_loopback`), where only the address says where a request came from."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def _environment_proxies(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``{"http"|"https"|"all"|"no"|…: (variable, value)}``, each with the variable it comes
    from: :func:`urllib.request.getproxies_environment` (what httpx reads on Linux) over
    ``environ``, rule for rule. Any ``*_proxy`` name counts in any case, an empty value is
    unset, ``HTTP_PROXY`` in upper case is ignored under CGI (``REQUEST_METHOD`` set,
    CVE-2016-1000110), and a name whose ``_proxy`` is in lower case (``https_proxy``,
    ``HTTPS_proxy``) wins over the others, its empty value unsetting them."""
    found: dict[str, tuple[str, str]] = {}
    for name, value in environ.items():  # first pass: any case
        if value and name.lower()[-6:] == "_proxy":
            found[name.lower()[:-6]] = (name, value)
    if "REQUEST_METHOD" in environ:
        found.pop("http", None)
    for name, value in environ.items():  # second pass: "_proxy" in lower case wins
        if name[-6:] == "_proxy":
            if value:
                found[name.lower()[:-6]] = (name, value)
            else:
                found.pop(name.lower()[:-6], None)
    return found


def proxy_variables(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``{"http"|"https"|"all": (variable, value)}``: the proxies httpx would mount, each with the
    variable it comes from (:func:`_environment_proxies`); none when ``NO_PROXY`` has a ``*``
    entry, which makes httpx ignore every proxy variable."""
    found = _environment_proxies(environ)
    if "*" in no_proxy_entries(environ):
        return {}
    return {kind: found[kind] for kind in PROXY_KINDS if kind in found}


def no_proxy_entries(environ: Mapping[str, str]) -> list[str]:
    """The entries of ``NO_PROXY`` (the variable :func:`_environment_proxies` picks), as httpx
    reads them: split at commas, each stripped, the empty ones dropped."""
    _name, value = _environment_proxies(environ).get("no", ("", ""))
    return [entry for entry in (part.strip() for part in value.split(",")) if entry]


def _invalid_url_reason(exc: Exception) -> str:
    """What httpx's :class:`~httpx.InvalidURL` says is wrong, in words that never repeat the
    value (its text quotes the host or port, which a URL with a password may have garbled)."""
    text = str(exc)
    if text.startswith("Invalid port"):
        return "its port is not a number"
    if text.startswith(("Invalid IPv4", "Invalid IPv6", "Invalid IDNA")):
        return "its host is neither a valid name nor a valid address"
    if "non-printable" in text:
        return "a control character is in it"
    if "too long" in text:
        return "it is too long"
    return "httpx cannot parse it"


def proxy_problem(value: str) -> str | None:
    """What makes ``value`` no proxy URL httpx can use, or None: exactly what httpx's client
    construction refuses (``httpx.Proxy`` and its transport). A value without ``://`` is an
    ``http://`` one, as httpx reads it; httpx's own parser reads the URL, so what it takes (a
    trailing space, a port it does not range-check) is taken here too."""
    import httpx

    url = value if "://" in value else f"http://{value}"
    try:
        scheme = httpx.URL(url).scheme
    except (httpx.InvalidURL, ValueError) as exc:
        return f"is not a URL httpx can read ({_invalid_url_reason(exc)}); write {_PROXY_EXAMPLE}"
    if scheme not in PROXY_SCHEMES:
        shown = scheme if scheme.isascii() and scheme.isprintable() and len(scheme) <= 20 else "another"
        return f"its scheme {shown!r} is not a proxy httpx can use; write {_PROXY_EXAMPLE}"
    if scheme in SOCKS_SCHEMES and importlib.util.find_spec("socksio") is None:
        return (
            "names a SOCKS proxy, but the socksio package is missing (wanbatch depends on "
            "httpx[socks]): reinstall wanbatch, or use an http:// proxy"
        )
    return None


def _is_address(entry: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    """``httpx._utils.is_ipv4_hostname``/``is_ipv6_hostname``: the part before any ``/`` parses."""
    try:
        kind(entry.split("/")[0])
    except ValueError:
        return False
    return True


def no_proxy_pattern(entry: str) -> str:
    """The mount key httpx makes of one ``NO_PROXY`` entry (``get_environment_proxies``): a URL
    as given, an IPv4 address or network and ``localhost`` for any scheme, an IPv6 one in
    brackets, any other name for itself and its subdomains."""
    if "://" in entry:
        return entry
    if _is_address(entry, ipaddress.IPv4Address) or entry.lower() == "localhost":
        return f"all://{entry}"
    if _is_address(entry, ipaddress.IPv6Address):
        return f"all://[{entry}]"
    return f"all://*{entry}"


def no_proxy_problem(entry: str) -> str | None:
    """What makes one ``NO_PROXY`` entry something httpx refuses (its mount key is no URL it can
    parse: ``httpx.InvalidURL`` when the client is built), or None."""
    import httpx

    try:
        httpx.URL(no_proxy_pattern(entry))
    except (httpx.InvalidURL, ValueError) as exc:
        shown = printable(entry[:60])
        if _is_address(entry, ipaddress.IPv6Address) and "/" in entry:
            reason = "httpx takes no IPv6 network"
        else:
            reason = _invalid_url_reason(exc)
        return (
            f"its entry {shown!r} is not a host httpx can read ({reason}): drop it (httpx takes "
            "host names such as .example.com, IP addresses, and IPv4 networks such as 10.0.0.0/8)"
        )
    return None


def cert_file_problem(path: str) -> str | None:
    """What makes ``path`` no ``SSL_CERT_FILE`` (a PEM file of CA certificates), or None."""
    target = Path(path)
    fix = "name a PEM file of CA certificates, such as /etc/ssl/certs/ca-certificates.crt, or unset it"
    if target.is_dir():
        return f"{path!r} is a folder (a folder of certificates goes in SSL_CERT_DIR): {fix}"
    try:
        found = _holds_pem_block(target)
    except FileNotFoundError:
        return f"{path!r} does not exist: {fix}"
    except OSError as exc:
        return f"{path!r} cannot be read ({exc.strerror or type(exc).__name__}): {fix}"
    if not found:
        return f"{path!r} holds no PEM certificate (no -----BEGIN CERTIFICATE----- line): {fix}"
    return None


def _holds_pem_block(path: Path) -> bool:
    """Whether the file holds a block OpenSSL loads (:data:`_PEM_BLOCKS`) in its first
    :data:`_MAX_CERT_FILE_BYTES`, read a piece at a time (a block split between two pieces is
    found: each piece is searched with the end of the one before). The first is found at once in
    any real bundle; never more than a piece is held."""
    overlap = max(len(block) for block in _PEM_BLOCKS)
    tail = b""
    read = 0
    with path.open("rb") as f:
        while read < _MAX_CERT_FILE_BYTES and (piece := f.read(_PIECE_BYTES)):
            read += len(piece)
            window = tail + piece
            if any(block in window for block in _PEM_BLOCKS):
                return True
            tail = window[-overlap:]
    return False


def cert_dir_problem(value: str) -> str | None:
    """What makes ``value`` an ``SSL_CERT_DIR`` OpenSSL verifies no server with, or None.

    OpenSSL takes a ``:``-separated list of folders and never complains about one (Python's
    ``load_verify_locations(capath=…)`` succeeds for a folder that does not exist): it looks a
    server's CA up in them by hash, at each verification. When no folder of the list holds a
    file named like a hashed certificate (:data:`_HASHED_CERT_NAME`), that lookup finds nothing
    and every HTTPS server fails verification (``CERTIFICATE_VERIFY_FAILED``); plain HTTP still
    works. A folder holding one is taken: which CAs it holds is no business of this check."""
    folders = [entry for entry in value.split(os.pathsep) if entry]
    if any(_holds_hashed_certificate(Path(entry)) for entry in folders):
        return None
    if any(Path(entry).is_dir() for entry in folders):
        what = (
            f"{value!r} holds no hashed CA certificate (a file named like 5ad8a5d6.0: "
            "run `openssl rehash` on it)"
        )
    else:
        what = f"{value!r} is no folder"
    return (
        f"{what}, so OpenSSL verifies no HTTPS server with it: name a folder of hashed CA certificates "
        "(such as /etc/ssl/certs), or unset it"
    )


def _holds_hashed_certificate(folder: Path) -> bool:
    """Whether ``folder`` holds a file OpenSSL's hashed lookup would open (stops at the first)."""
    try:
        with os.scandir(folder) as entries:
            return any(_HASHED_CERT_NAME.fullmatch(entry.name) for entry in entries)
    except (OSError, ValueError):
        return False


def beyond_loopback(urls: Iterable[str]) -> bool:
    """Whether one of ``urls`` names a host other than this machine's loopback
    (:func:`is_loopback_host`): one a proxy would carry. A URL that does not parse counts."""
    for url in urls:
        try:
            host = urlsplit(url).hostname
        except ValueError:
            return True
        if host is None or not is_loopback_host(host):
            return True
    return False


def _any_https(urls: Iterable[str]) -> bool:
    return any(url.lower().startswith("https://") for url in urls)


def proxy_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """``VARIABLE: what is wrong, what to write`` for each proxy or ``NO_PROXY`` variable httpx
    would refuse building a client that reads them (``trust_env``), in the order httpx reads them."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    for name, value in proxy_variables(env).values():
        if problem := proxy_problem(value):
            problems.append(f"{name}: {problem}")
    entries = no_proxy_entries(env)
    if "*" not in entries:  # else httpx mounts nothing for NO_PROXY either
        no_name = _environment_proxies(env)["no"][0] if entries else ""
        problems += [f"{no_name}: {problem}" for entry in entries if (problem := no_proxy_problem(entry))]
    return problems


def environment_verdict(
    environ: Mapping[str, str] | None = None,
    *,
    reaches: Iterable[str] | None = None,
    certificates: bool = True,
) -> tuple[list[str], list[str]]:
    """``(refused, warnings)``: ``VARIABLE: what is wrong, what to write`` for each variable that
    would make every request of a command fail, and for each that makes some fail only.

    ``reaches``: the URLs the command is about to talk to (fal's, a JWKS); None when it cannot
    say (every kind of host then counts). The proxy variables are judged only when one of them is
    beyond loopback (a client that reaches nothing else never reads them). A certificate file
    httpx cannot load is refused whatever is reached: every client's construction fails. An
    ``SSL_CERT_DIR`` that verifies nothing (:func:`cert_dir_problem`) is refused when one of them
    is ``https://``, else only warned of. ``certificates=False``: the proxy variables only."""
    env = os.environ if environ is None else environ
    urls = None if reaches is None else list(reaches)
    refused = proxy_problems(env) if urls is None or beyond_loopback(urls) else []
    warnings: list[str] = []
    if certificates:
        refused += _cert_file_problems(env)
        for problem in _cert_dir_problems(env):
            (refused if urls is None or _any_https(urls) else warnings).append(problem)
    return refused, warnings


def http_environment_problems(
    environ: Mapping[str, str] | None = None,
    *,
    certificates: bool = True,
    reaches: Iterable[str] | None = None,
) -> list[str]:
    """What :func:`environment_verdict` refuses: empty when all is well (or nothing is set).
    The product asks :func:`environment_verdict` itself; the tests ask this."""
    return environment_verdict(environ, reaches=reaches, certificates=certificates)[0]


def certificate_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """``SSL_CERT_FILE: …`` or ``SSL_CERT_DIR: …`` when the one httpx would read cannot be used."""
    env = os.environ if environ is None else environ
    return _cert_file_problems(env) + _cert_dir_problems(env)


def _cert_file_problems(env: Mapping[str, str]) -> list[str]:
    """``SSL_CERT_FILE: …`` when httpx reads it and cannot load it (it raises building a client)."""
    if (cert_file := env.get("SSL_CERT_FILE")) and (problem := cert_file_problem(cert_file)):
        return [f"SSL_CERT_FILE: {problem}"]
    return []


def _cert_dir_problems(env: Mapping[str, str]) -> list[str]:
    """``SSL_CERT_DIR: …`` when httpx reads it (only without ``SSL_CERT_FILE``) and OpenSSL
    verifies no server with it."""
    if env.get("SSL_CERT_FILE"):
        return []
    if (cert_dir := env.get("SSL_CERT_DIR")) and (problem := cert_dir_problem(cert_dir)):
        return [f"SSL_CERT_DIR: {problem}"]
    return []


def refused_line(problems: Iterable[str]) -> str:
    """The one line a :class:`~jobs.errors.ConfigError` says for ``problems`` (each
    ``VARIABLE: what is wrong, what to write``, as :func:`environment_verdict` words them)."""
    return f"invalid configuration: {'; '.join(problems)}"


def require_usable(*, reaches: Iterable[str] | None = None, certificates: bool = True) -> list[str]:
    """Raise the :class:`~jobs.errors.ConfigError` (:func:`refused_line`) for the variables
    :func:`environment_verdict` refuses in this process's environment and the URLs the command
    is about to talk to (``reaches``; None: any): what a command that talks to fal calls before
    it starts (and only such a command: see the module's docstring). Returns the warnings
    (:func:`environment_verdict`), for the command to print, each a ``warning:`` line."""
    from jobs.errors import ConfigError

    refused, warnings = environment_verdict(reaches=reaches, certificates=certificates)
    if refused:
        raise ConfigError(refused_line(refused))
    return warnings


def construction_message(exc: BaseException, environ: Mapping[str, str] | None = None) -> str:
    """The one line for ``exc``, which httpx raised building a client that reads the environment:
    the variables httpx raises for (:func:`proxy_problems`, an ``SSL_CERT_FILE`` it cannot load:
    never an ``SSL_CERT_DIR`` that verifies nothing, which raises nothing), else the certificate
    variable in use when it is an :class:`OSError` (``ssl.SSLError`` is one: a file with a certificate-looking
    block OpenSSL still refuses), else every variable it may have come from. Never a value that
    may hold a password (a proxy's): a certificate path only, and the exception's reason code."""
    env = os.environ if environ is None else environ
    if problems := proxy_problems(env) + _cert_file_problems(env):  # what httpx raises for
        return refused_line(problems)
    cert_name = (
        "SSL_CERT_FILE" if env.get("SSL_CERT_FILE") else "SSL_CERT_DIR" if env.get("SSL_CERT_DIR") else ""
    )
    if isinstance(exc, OSError) and cert_name:
        reason = getattr(exc, "reason", None) or exc.strerror or ""
        said = f"{type(exc).__name__}: {reason}" if isinstance(reason, str) and reason else type(exc).__name__
        return (
            f"invalid configuration: {cert_name}: OpenSSL cannot load {env[cert_name]!r} ({said[:120]}): "
            "name PEM CA certificates, such as /etc/ssl/certs/ca-certificates.crt, or unset it"
        )
    return (
        f"invalid configuration: httpx could not use the proxy or certificate variables ({VARIABLES}): "
        f"{type(exc).__name__}; check them, or unset them"
    )
