"""The ``Host`` and ``Origin`` a request names, read by one rule wherever a web surface of
wanbatch guards itself with them: ``serve``'s dashboard (:mod:`web.auth`) and the simulator's
control API (:mod:`falsim.app`).

Both answer a browser on this machine, and both must not answer a web page that only pretends
to be them: a page of another site that rebinds a DNS name of its own to 127.0.0.1 (its requests
then carry ``Host: that-name``), or that posts to them across sites (its requests carry its own
``Origin``). Only an address or a loopback name in ``Host`` cannot be an attacker's name.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from jobs.http_environment import is_loopback_address

#: Names of this machine that no DNS answer can give another address.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def host_name(host_header: str) -> str:
    """``[::1]:8788`` → ``::1``; ``localhost:8788`` → ``localhost`` (lower case)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback_host(name: str) -> bool:
    """Whether the host name ``name`` (:func:`host_name`) is a loopback address or name."""
    return name in LOOPBACK_NAMES or is_loopback_address(name)


def place(url: str) -> tuple[str, str, int | None] | None:
    """``https://Dash.example.com/x`` → ``("https", "dash.example.com", None)``; None for what
    names no host (``null``, ``http://[``, a port that is no number)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port


def names(origin: tuple[str, str, int | None], authority: str, port: int | None, scheme: str | None) -> bool:
    """Whether the page origin ``origin`` (:func:`place`) is the place ``authority`` (a ``Host``
    value) names: the same host and port; a port left out is the default one of ``scheme`` (the
    browser's, as a proxy says), else of the origin's own scheme."""
    found = place(f"//{authority}")
    if found is None:
        return False
    origin_scheme, origin_host, origin_port = origin
    _, host, explicit = found
    default = DEFAULT_PORTS.get(scheme or origin_scheme)
    wanted = explicit or port or default
    return host == origin_host and (origin_port or DEFAULT_PORTS.get(origin_scheme)) == wanted
