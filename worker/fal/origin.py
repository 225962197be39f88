"""The origin of a URL (scheme, host, port) read as httpx reads it, without loading httpx.

The one definition of an origin: the same-origin checks of the fal client (the key goes to
fal's origins only, status URLs must be on the queue's), the trusted origins of downloads, the
upload cache's key and the queue origin a request records (``Job.fal_origin``). ``status`` and a
``run`` that only watches workers compute that last one too, and load neither httpx nor the
steps (about 0.2 s of start-up): so the parsing is here, a copy of httpx's own
(``httpx._urlparse``, kept in step by ``tests/unit/test_url_origin.py``), reduced to what an
origin needs.

An origin is ``(scheme, host, port)``: the scheme in lower case; the host as ``httpx.URL.host``
gives it (lower case, an IPv6 address without its brackets, a non-ASCII host IDNA-encoded, and
one whose encoding starts with ``xn--`` decoded back); the port as written, the scheme's default
made explicit for ``http`` and ``https`` (``https://fal.run`` and ``https://fal.run:443`` are one
origin) and None for another scheme's default. Userinfo, path, query and fragment are no part of
it. A URL httpx refuses raises :class:`ValueError` here.
"""

from __future__ import annotations

import ipaddress
import re

#: ``(scheme, host, port)``, as :func:`url_origin` gives it.
Origin = tuple[str, str, int | None]

#: The port an ``http`` or ``https`` URL means when it names none: explicit in an origin.
DEFAULT_PORTS = {"http": 80, "https": 443}
#: The ports httpx drops as their scheme's default (WHATWG's list), as written or not.
_IMPLIED_PORTS = {"ftp": 21, "http": 80, "https": 443, "ws": 80, "wss": 443}

_MAX_URL_LENGTH = 65536
_URL = re.compile(
    r"(?:(?P<scheme>(?:[a-zA-Z][a-zA-Z0-9+.-]*)?):)?(?://(?P<authority>[^/?#]*))?(?P<path>[^?#]*)"
)
_AUTHORITY = re.compile(r"(?:(?P<userinfo>.*)@)?(?P<host>\[.*\]|[^:@]*):?(?P<port>.*)?")
_IPV4_STYLE = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$")
#: What an ASCII host keeps as is; any other character is percent-encoded (httpx: unreserved,
#: sub-delims and the WHATWG's extras).
_HOST_SAFE = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~" + "!$&'()*+,;=" + '"`{}%|\\'
)


def _host(host: str) -> str:
    """The host as ``httpx.URL.host`` gives it (see the module's docstring)."""
    if not host:
        return ""
    if _IPV4_STYLE.match(host):
        ipaddress.IPv4Address(host)  # AddressValueError, a ValueError, when it is not one
        return host
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])
        return host[1:-1]
    if host.isascii():
        encoded = "".join(c if c in _HOST_SAFE else f"%{ord(c):02X}" for c in host.lower())
    else:
        import idna  # only for a host that needs it: its tables are big

        encoded = idna.encode(host.lower()).decode("ascii")  # IDNAError is a ValueError
    if encoded.startswith("xn--"):
        import idna

        return str(idna.decode(encoded))
    return encoded


def _port(port: str | None, scheme: str) -> int | None:
    """The port as ``httpx.URL.port`` gives it: None when absent or the scheme's default."""
    if port is None or port == "":
        return None
    number = int(port)  # as httpx: " 80" and "8_0" are 80, "-1" is -1
    return None if number == _IMPLIED_PORTS.get(scheme) else number


def origin_of(scheme: str, host: str, port: int | None) -> Origin:
    """The origin of a URL httpx parsed into ``scheme``, ``host`` and ``port`` (its ``.scheme``,
    ``.host``, ``.port``): the scheme's default port made explicit for ``http`` and ``https``."""
    return (scheme, host, DEFAULT_PORTS.get(scheme) if port is None else port)


def url_origin(url: str) -> Origin:
    """The origin of ``url`` (see the module's docstring); ValueError when httpx refuses it."""
    if len(url) > _MAX_URL_LENGTH:
        raise ValueError("URL too long")
    if any(char.isascii() and not char.isprintable() for char in url):
        raise ValueError("a URL holds no control character")
    whole = _URL.match(url)
    parts = _AUTHORITY.match((whole["authority"] if whole else None) or "")
    if whole is None or parts is None:  # both always match (every part may be empty)
        raise ValueError(f"not a URL: {url[:80]!r}")
    scheme = (whole["scheme"] or "").lower()
    host = _host(parts["host"] or "")
    port = _port(parts["port"], scheme)
    path = whole["path"] or ""
    if parts["userinfo"] or host or port is not None:
        if path and not path.startswith("/"):
            raise ValueError("an absolute URL's path begins with '/'")
    elif not scheme and path.startswith(("//", ":")):
        raise ValueError("a relative URL's path begins with neither '//' nor ':'")
    return origin_of(scheme, host, port)


def origin_text(origin: Origin) -> str:
    """``scheme://host:port`` (``scheme://host`` without a port), an IPv6 host in brackets, the
    host in lower case: the form an origin is stored and shown in."""
    scheme, host, port = origin
    host = f"[{host.lower()}]" if ":" in host else host.lower()
    return f"{scheme}://{host}:{port}" if port is not None else f"{scheme}://{host}"


def url_origin_text(url: str) -> str:
    """:func:`origin_text` of ``url``'s origin: never its credentials, path or query."""
    return origin_text(url_origin(url))
