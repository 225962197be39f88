"""Who may read the dashboard and who may act on it: ``WANBATCH_SERVE_TOKEN`` and loopback.

``wanbatch serve`` is one app: fal's webhook receiver, which may face the internet (fal's
signature is its authentication), and the dashboard and ``/metrics``, which must not. The rule,
applied to every request by :class:`DashboardAuth` before any route runs:

* ``POST /webhooks/fal`` and ``GET /healthz`` pass untouched: they never need the token. Any
  other method on those paths is answered 405 (with ``Allow``) by the router, not refused here.
* Reading (``GET``/``HEAD``): once a token is configured, only a client that presents it
  (``Authorization: Bearer …`` or the login form's cookie) may read, from anywhere — loopback
  included: a reverse proxy on this host (nginx's default ``proxy_pass http://127.0.0.1:8788``,
  HAProxy without ``option forwardfor``) connects from 127.0.0.1 with a loopback ``Host`` and no
  forwarding header, so "loopback" cannot tell this machine's browser from the internet behind
  such a proxy. Everyone else is sent to ``/login`` (browsers) or answered 401. Without a token
  the dashboard answers loopback clients only (read-only), and anyone else 403.
* Acting (any other method: pause, resume, cancel, rerun): always needs the token, from
  loopback too; without one configured every action is 403 with a message saying to set
  ``WANBATCH_SERVE_TOKEN``. A browser's action must also come from the dashboard's own pages
  (the ``Origin``, else ``Referer``, names the host the request was sent to: the ``Host``, or a
  trusted proxy's ``X-Forwarded-Host``, :func:`origin_refusal`; the cookie is
  ``SameSite=Strict`` besides), so another site cannot make a logged-in browser act (CSRF).
* ``/login``, ``/logout`` and ``/static/…`` (stylesheet and script, no data) are open to any
  client that may reach the app at all; but a ``POST /login`` or ``POST /logout`` that sends an
  ``Origin`` (a browser's always does) must come from the dashboard's own pages
  (:func:`origin_refusal`), so another site can neither log a browser in nor out.

"Loopback" (which matters only while no token is configured) is strict: the peer address is a
loopback address, no proxy header (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``) says the
request came from further away, and the ``Host`` header names a loopback host — a web page
cannot rebind a DNS name of its own to 127.0.0.1 to read the dashboard through its visitor's
browser. A proxy on this host that adds none of those headers still looks like loopback: with
no token, everyone behind it reads; set one there.

Each login gets a cookie value of its own, never the token: its issue time and a random session
id, signed with an HMAC (:func:`session_value`); tokens and signatures are compared with
:func:`hmac.compare_digest`. The server refuses a value :data:`SESSION_MAX_AGE` after it was
issued (the browser forgets it then too), and ``POST /logout`` ends the session on the server:
its id goes into ``dashboard_session_revocations``, which every ``serve`` of the database reads,
so a copy of the cookie kept after a logout (a shared machine, a proxy's log) reads and acts no
more, through any of them. (It was one fixed HMAC of the token: the same for every login, and
good until the token changed, logout or not.) A logout ends that one login; other browsers stay
logged in. Changing the token ends every session at once.

Its name is the dashboard's own (:func:`session_cookie`), since browsers scope cookies by host,
not port: two dashboards on one host, each with its token, keep a cookie each, and neither takes
the other's for a guess. The name, and the key values are signed with (:func:`session_key`), are
HMACs of the token keyed by a random secret of the database (:data:`COOKIE_SECRET` in
``instance_secrets``): browsers send a host's cookies to every port of it, so any other web app
on this host receives them, and an HMAC keyed by the token alone would be an offline check of
token guesses, bypassing the pace below. Keyed by the database's secret, neither tells anything
about the token to anyone who cannot read the database. And the name is only ever sent to the
browser that logged in: ``POST /logout`` deletes the cookie only when the request carries it, and
no other answer names it. Changing the token logs every browser out: the old cookie has another
name, and its value would not verify under the new key.

Guessing stays slow (:class:`TokenGate`): the token a request brings (``Authorization: Bearer``,
the login form) is checked one request at a time, and a wrong one holds the next check back for
:data:`TOKEN_FAILURE_DELAY` — however many guesses are sent at once, at most one a second is
answered, in all. A wrong cookie of this dashboard's name waits its turn the same way; a cookie
of another name (another dashboard on this host, or this one's under an earlier token) is no
credential. Requests that bring no credential never wait.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast
from urllib.parse import quote

import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from jobs import db, store
from jobs.digits import ascii_int
from jobs.errors import DatabaseReadOnlyError
from jobs.host_header import host_name, is_loopback_host, names, place
from jobs.http_environment import is_loopback_address
from jobs.printable import first_line, one_line

log = logging.getLogger(__name__)

#: The login cookie's name begins so; :func:`session_cookie` of the token is the whole name, and
#: :func:`session_value` of a login the value.
SESSION_COOKIE_PREFIX = "wanbatch_session_"
#: The name, in ``instance_secrets``, of the database's random key of the cookie's name.
COOKIE_SECRET = "dashboard_cookie"  # noqa: S105 - the secret's name, not a secret
#: How long a login lasts (seconds): 30 days, browser restarts included. The browser keeps the
#: cookie so long, and the server refuses its value after it (the value says when it was issued).
SESSION_MAX_AGE = 30 * 24 * 60 * 60
#: How far ahead of this server's clock a login may say it was issued (seconds): another
#: ``serve`` of the database, whose clock runs a little ahead, issued it.
SESSION_CLOCK_SKEW = 5 * 60
#: Requests that never need the token: ``(method, path)``.
PUBLIC_ROUTES = frozenset({("POST", "/webhooks/fal"), ("GET", "/healthz"), ("HEAD", "/healthz")})
#: Their paths: any other method on them is passed on too, for the router to answer 405 with an
#: ``Allow`` header (they hold no data and act on nothing, so no method there needs the token).
PUBLIC_PATHS = frozenset(path for _method, path in PUBLIC_ROUTES)
#: Paths any client that may reach the app at all can use (the login form, its stylesheet).
OPEN_PREFIXES = ("/static/",)
OPEN_PATHS = frozenset({"/login", "/logout"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")

LOOPBACK_ONLY = (
    "the dashboard answers loopback clients only while WANBATCH_SERVE_TOKEN is not set "
    "(set it on the server to reach the dashboard from elsewhere)"
)
READ_ONLY = (
    "the dashboard is read-only: set WANBATCH_SERVE_TOKEN on the server (and log in) to pause, "
    "resume, cancel or rerun batches from here"
)
LOGIN_NEEDED = (
    "the dashboard needs WANBATCH_SERVE_TOKEN: send `Authorization: Bearer <token>` or log in at /login"
)
CROSS_ORIGIN = "refused: the request did not come from the dashboard's own pages (Origin/Referer check)"
NO_DATABASE = (
    "the login cookie cannot be checked: the database is unavailable (locked or unreachable): "
    "try again in a moment"
)
#: Seconds a wrong token (or cookie) holds the token check: guesses are one a second at most.
TOKEN_FAILURE_DELAY = 1.0


def session_key(token: str, secret: bytes) -> bytes:
    """The key login values are signed with: an HMAC of the token keyed by ``secret``, the
    database's :data:`COOKIE_SECRET` (:func:`cookie_secret`), never the token alone.

    Browsers send a host's cookies to every port of it: another web app on this host receives
    the value too. Were the key the token's alone, whoever holds a value could test token
    guesses offline, at no pace; keyed by the database's secret, a value tells nothing about the
    token to anyone who cannot read the database. A new token gives another key: every value
    signed under the old one fails (and has another name besides)."""
    return hmac.new(secret, b"wanbatch dashboard session key v3\0" + token.encode(), hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class SessionClaim:
    """What a login value says, once its signature checked out: when it was issued (seconds
    since the epoch) and its random id (what a logout revokes)."""

    issued: int
    session_id: str

    @property
    def expires(self) -> int:
        return self.issued + SESSION_MAX_AGE


def _mac(key: bytes, issued: int, session_id: str) -> str:
    message = b"wanbatch dashboard session v3\0" + f"{issued}.{session_id}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def session_value(key: bytes, *, issued: int, session_id: str) -> str:
    """The cookie value of one login: ``ISSUED.ID.MAC`` — its issue time (whole seconds since the
    epoch), its random id (:func:`new_session_id`) and an HMAC of both keyed by
    :func:`session_key`. It was one HMAC of the token: every login gave the same value, and a
    copy kept read and acted until the token changed. Now each login has its own, refused
    :data:`SESSION_MAX_AGE` after it was issued and once logged out (:class:`TokenGate`)."""
    return f"{issued}.{session_id}.{_mac(key, issued, session_id)}"


def new_session_id() -> str:
    """A login's random id: 128 bits, hex."""
    return secrets.token_hex(16)


_SESSION_VALUE = re.compile(r"([0-9]{1,12})\.([0-9a-f]{32})\.([0-9a-f]{64})")
#: The value every login was given before values were signed per login (an HMAC of the token):
#: no credential now, and no guess to pace either (:meth:`TokenGate.check_cookie`).
_FIXED_VALUE = re.compile(r"[0-9a-f]{64}")


def read_session(key: bytes, value: str) -> SessionClaim | None:
    """What ``value`` claims, if it is a login value signed with ``key`` (whatever its age);
    None for anything else: another key's (another token's or database's), changed, or no
    login value at all. The signature is compared in constant time."""
    found = _SESSION_VALUE.fullmatch(value)
    if found is None:
        return None
    issued, session_id, mac = int(found[1]), found[2], found[3]
    if not hmac.compare_digest(mac.encode(), _mac(key, issued, session_id).encode()):
        return None
    return SessionClaim(issued, session_id)


def is_fixed_value(value: str) -> bool:
    """Whether ``value`` has the shape of the one fixed value of before (see :data:`_FIXED_VALUE`)."""
    return _FIXED_VALUE.fullmatch(value) is not None


def session_cookie(token: str, secret: bytes) -> str:
    """The login cookie's name under ``token``: ``wanbatch_session_`` and the first 8 hex of an
    HMAC of the token keyed by ``secret``, the database's :data:`COOKIE_SECRET`
    (:func:`cookie_secret`).

    Browsers scope cookies by host, not port: under one fixed name, logging into a second
    dashboard on this host overwrote the first one's cookie, and each took the other's for a
    wrong guess (and paced every check behind it). The name tells them apart: two dashboards
    with different tokens have different names (on one database or two), and a new token gives
    a new name. It tells nothing about the token: the key is a random secret of the database,
    not the token (an HMAC keyed by the token would let whoever learned the name test token
    guesses offline, at no pace). The name is no credential either: the value is
    (:func:`session_value`). Its label is ``v3`` since the value is keyed by the secret too: a
    cookie of an earlier version is another dashboard's to this one (no credential, never paced),
    not a wrong one of its own that every request of that browser would wait a second for."""
    message = b"wanbatch dashboard cookie name v3\0" + token.encode()
    return SESSION_COOKIE_PREFIX + hmac.new(secret, message, hashlib.sha256).hexdigest()[:8]


def cookie_secret(engine: Engine) -> bytes:
    """The database's key of the cookie's name (:data:`COOKIE_SECRET`), made the first time any
    process asks for it (as the webhook secret is); every dashboard of the database, now and
    after a restart, names its cookie alike for one token."""
    with db.session_scope(engine) as session:
        value = store.instance_secret(session, COOKIE_SECRET, lambda: secrets.token_hex(32))
    return bytes.fromhex(value)


def token_matches(given: str, token: str) -> bool:
    """Whether ``given`` is the token, in time that does not depend on where they differ."""
    return hmac.compare_digest(given.encode(), token.encode())


def is_loopback(scope: Scope, headers: Headers) -> bool:
    """Whether the request surely comes from this machine, to a loopback name (see module doc)."""
    client = scope.get("client")
    if not client or not is_loopback_address(str(client[0])):
        return False
    if any(name in headers for name in _PROXY_HEADERS):
        return False
    return is_loopback_host(host_name(headers.get("host", "")))


def sent_over_https(scheme: str, headers: Headers) -> bool:
    """Whether the browser reached us over HTTPS, so the login cookie gets ``Secure``: the
    request's own scheme (uvicorn sets it from ``X-Forwarded-Proto`` for the proxies
    ``WANBATCH_SERVE_FORWARDED_ALLOW_IPS`` trusts), or any proxy's ``X-Forwarded-Proto: https``
    or ``Forwarded: proto=https``. Those headers are believed from anyone here: ``Secure`` only
    narrows where a cookie goes, and a client that lies about them only keeps its own cookie
    off plain HTTP."""
    if scheme == "https":
        return True
    forwarded_proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    if forwarded_proto == "https":
        return True
    first_hop = headers.get("forwarded", "").split(",")[0]
    pairs = (part.strip().partition("=") for part in first_hop.split(";"))
    return any(
        key.strip().lower() == "proto" and value.strip().strip('"').lower() == "https"
        for key, _, value in pairs
    )


#: uvicorn's own default for ``forwarded_allow_ips`` (when ``$FORWARDED_ALLOW_IPS`` is unset).
DEFAULT_TRUSTED_PROXIES = "127.0.0.1,::1"


def trusted_proxies(configured: str | None) -> str:
    """The proxies ``serve`` believes: ``WANBATCH_SERVE_FORWARDED_ALLOW_IPS``, else uvicorn's
    default (``$FORWARDED_ALLOW_IPS``, else this host's loopback)."""
    return configured or os.environ.get("FORWARDED_ALLOW_IPS", DEFAULT_TRUSTED_PROXIES)


#: Where IPv4-mapped IPv6 addresses (``::ffff:10.1.2.3``) live.
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _other_form(entry: str) -> str | None:
    """The same address or network written the other way: ``10.1.2.3`` → ``::ffff:10.1.2.3``,
    ``10.1.2.0/24`` → ``::ffff:10.1.2.0/120``, and back; None for anything else (an IPv6
    entry that maps no IPv4, ``*``, or what is no address, left to uvicorn as it is)."""
    try:
        network = ipaddress.ip_network(entry)
    except ValueError:
        return None
    if isinstance(network, ipaddress.IPv4Network):
        mapped = f"::ffff:{network.network_address}"
        return mapped if "/" not in entry else f"{mapped}/{96 + network.prefixlen}"
    if network.prefixlen >= 96 and network.subnet_of(_IPV4_MAPPED):
        address = network.network_address.ipv4_mapped
        return str(address) if "/" not in entry else f"{address}/{network.prefixlen - 96}"
    return None


def with_mapped_forms(allow_ips: str) -> str:
    """``allow_ips`` with every IPv4 entry's IPv4-mapped IPv6 form beside it (and every mapped
    entry's IPv4 form). A dual-stack listener (``serve --host ::``) reports an IPv4 peer as
    ``::ffff:10.1.2.3``, which uvicorn's :class:`ProxyHeadersMiddleware` never matches against
    ``10.1.2.3`` or ``10.1.2.0/24`` (it compares :mod:`ipaddress` objects, and an IPv6 address
    is never in an IPv4 set or network): the proxy went on being distrusted, so the client was
    the proxy's address and its ``X-Forwarded-*`` ignored. The same for a mapped address a
    proxy of a chain writes into ``X-Forwarded-For``."""
    entries = [entry.strip() for entry in allow_ips.split(",") if entry.strip()]
    if entries == ["*"]:
        return "*"
    found = list(entries)
    for entry in entries:
        other = _other_form(entry)
        if other is not None and other not in found:
            found.append(other)
    return ",".join(found)


def trusted_peer(allow_ips: str) -> Callable[[str | None], bool]:
    """Whether a peer's address is one of those ``allow_ips`` names (addresses, networks, a lone
    ``*``), written as IPv4 or IPv4-mapped IPv6 alike (:func:`with_mapped_forms`): the rule
    :class:`ForwardedHeaders` applies (uvicorn's own)."""
    proxy_headers = ProxyHeadersMiddleware(cast(Any, None), trusted_hosts=with_mapped_forms(allow_ips))
    return proxy_headers.trusted_hosts.__contains__


class ForwardedHeaders:
    """The proxy headers of the proxies ``allow_ips`` names, believed (outermost middleware).

    uvicorn's :class:`ProxyHeadersMiddleware` does the believing, as it did when ``serve`` let
    uvicorn apply it (``serve`` now turns uvicorn's off): the request's client becomes
    ``X-Forwarded-For``'s and its scheme ``X-Forwarded-Proto``'s. First, though, this notes in
    the request's state (``via_trusted_proxy``) whether the peer itself — the connection's other
    end, which that rewrite hides — is one of those proxies: only then is ``X-Forwarded-Host``
    believed as the host the browser sent the request to (:func:`origin_refusal`). An IPv4
    proxy is matched in its IPv4-mapped form too (``::ffff:10.1.2.3``, what a dual-stack
    listener reports): :func:`with_mapped_forms`."""

    def __init__(self, app: ASGIApp, allow_ips: str) -> None:
        # uvicorn types ASGI apps its own way; the two protocols are the same at run time.
        trusted_hosts = with_mapped_forms(allow_ips)
        proxy_headers = ProxyHeadersMiddleware(cast(Any, app), trusted_hosts=trusted_hosts)
        # The very rule the rewrite applies (addresses, networks, a lone `*`): one decision.
        self.trusted = proxy_headers.trusted_hosts
        self.app = cast(ASGIApp, proxy_headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            peer = str(client[0]) if client else None
            scope.setdefault("state", {})["via_trusted_proxy"] = peer in self.trusted
        await self.app(scope, receive, send)


def _first(headers: Headers, name: str) -> str:
    """The first hop's value of a proxy header (``a, b`` → ``a``), stripped."""
    return headers.get(name, "").split(",")[0].strip()


def origin_refusal(scope: Scope, headers: Headers) -> str | None:
    """Why this request did not come from the dashboard's own pages, or None when it did.

    ``Origin`` (else ``Referer``) must name the host the request was sent to: the ``Host``
    header, or — from a proxy ``WANBATCH_SERVE_FORWARDED_ALLOW_IPS`` trusts (see
    :class:`ForwardedHeaders`) — ``X-Forwarded-Host``, its port (else ``X-Forwarded-Port``, else
    the default of ``X-Forwarded-Proto``'s scheme) included. A proxy on this host that passes
    neither the browser's ``Host`` nor an ``X-Forwarded-Host`` on (nginx's default) cannot be
    told from a foreign page, and is refused with a line that says what to set. No origin,
    ``null``, or one that does not parse as a URL (such as ``http://[``) names no host."""
    host = headers.get("host", "").strip()
    source = headers.get("origin") or headers.get("referer") or ""
    origin = place(source) if source != "null" else None
    forwarded_host = _first(headers, "x-forwarded-host")
    trusted = bool(scope.get("state", {}).get("via_trusted_proxy"))
    if origin is not None:
        if host and names(origin, host, None, None):
            return None
        if forwarded_host and trusted:
            port = _first(headers, "x-forwarded-port")
            proto = _first(headers, "x-forwarded-proto").lower()
            if names(origin, forwarded_host, ascii_int(port, max_digits=5), proto or None):
                return None
    if not forwarded_host:
        forwarded = "no X-Forwarded-Host"
    elif trusted:
        forwarded = f"X-Forwarded-Host {forwarded_host!r}"
    else:
        forwarded = (
            f"X-Forwarded-Host {forwarded_host!r} ignored (its sender is no proxy "
            "WANBATCH_SERVE_FORWARDED_ALLOW_IPS trusts)"
        )
    seen = f"{'Origin' if headers.get('origin') else 'Referer'} {source[:200]!r}" if source else "no Origin"
    return one_line(
        f"{CROSS_ORIGIN}: {seen}, Host {host[:200]!r}, {forwarded[:300]}. Behind a reverse proxy, "
        "have it pass the browser's host on (nginx: `proxy_set_header Host $http_host;`, or "
        "`proxy_set_header X-Forwarded-Host $http_host;` from a proxy "
        "WANBATCH_SERVE_FORWARDED_ALLOW_IPS trusts)"
    )


def same_origin(scope: Scope, headers: Headers) -> bool:
    """Whether the request came from the dashboard's own pages (:func:`origin_refusal`)."""
    return origin_refusal(scope, headers) is None


def _cookie(headers: Headers, name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


def carries_a_session_cookie(headers: Headers) -> bool:
    """Whether the request carries a cookie named like a login cookie (this dashboard's or
    another's): only then is this dashboard's name worth knowing."""
    return any(
        part.strip().startswith(SESSION_COOKIE_PREFIX) and "=" in part
        for part in headers.get("cookie", "").split(";")
    )


@dataclass(frozen=True, slots=True)
class Access:
    """What the current request may do; routes read it as ``request.state.access``."""

    token_configured: bool
    loopback: bool
    #: The token came with the request (``Authorization: Bearer`` or the login cookie).
    authenticated: bool
    #: ... by the ``Authorization`` header (not sent by browsers on their own: no CSRF check).
    by_header: bool = False

    @property
    def can_read(self) -> bool:
        """With a token configured, only its bearer reads (a local proxy looks like loopback);
        without one, loopback clients do."""
        if self.token_configured:
            return self.authenticated
        return self.loopback

    @property
    def can_act(self) -> bool:
        return self.authenticated

    @property
    def why_read_only(self) -> str:
        """Why the buttons are disabled ("" when they are not)."""
        if self.can_act:
            return ""
        if not self.token_configured:
            return READ_ONLY
        return "log in with WANBATCH_SERVE_TOKEN to pause, resume, cancel or rerun batches"


class SessionRevocations(Protocol):
    """Where logouts are kept, for every ``serve`` of the database (:class:`DatabaseRevocations`)."""

    def revoked(self, session_id: str) -> bool: ...

    def revoke(self, claim: SessionClaim, now: float) -> None: ...


class DatabaseRevocations:
    """Logouts kept in the database (``dashboard_session_revocations``): a logout through one
    ``serve`` ends the session for every other one of the database too (several behind one
    proxy, or one restarted), which no process's memory could do."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def revoked(self, session_id: str) -> bool:
        with db.read_scope(self.engine) as session:
            return store.dashboard_session_revoked(session, session_id)

    def revoke(self, claim: SessionClaim, now: float) -> None:
        with db.session_scope(self.engine) as session:
            store.revoke_dashboard_session(
                session,
                claim.session_id,
                expires_at=datetime.fromtimestamp(claim.expires, UTC),
                now=datetime.fromtimestamp(now, UTC),
            )


class TokenGate:
    """``WANBATCH_SERVE_TOKEN`` and the one place a credential is checked against it, paced.

    A token (``Authorization: Bearer``, the login form) is checked under a lock, one check at
    a time, and a wrong one makes the next check wait until ``delay`` seconds after it: the
    verdicts on a thousand guesses sent at once come one a second. (Checking at once and only
    delaying the wrong answers would not do: a right token answered at once tells a guesser,
    without waiting for the others, that they were all wrong.) A wrong token's own answer waits
    ``delay`` too.

    A cookie's signature is checked at once (:func:`read_session`) — it is an HMAC, unguessable,
    and a browser sends it with every request — and a value that fails it then takes its turn
    and its ``delay`` like a wrong token. A value signed right is a login's, no guess, and is
    never paced: it is good while younger than :data:`SESSION_MAX_AGE` (by ``wall_clock``; one
    issued more than :data:`SESSION_CLOCK_SKEW` ahead of it is refused too) and not logged out
    (``revocations``, read from the database on a thread). The fixed value every login was
    given before (:func:`is_fixed_value`) is refused unpaced too: its browser is only sent to
    log in again. Only the cookie named :meth:`cookie_name` is one: a cookie minted under
    another token has another name (:func:`session_cookie`), and is no credential at all, never
    paced. That name and the signing key (:func:`session_key`) are keyed by the database's
    secret, which ``secret`` reads (once: both are then kept); :class:`web.dashboard.Dashboard`
    gives a gate without one its database's, and without ``revocations`` its database's
    (:class:`DatabaseRevocations`). A request that gives up while it waits frees the lock,
    never the pace: the time of the last failure is kept, not a task's sleep. While no
    credential fails, nothing waits; a request with no credential never does. The price: while
    guesses pour in, a right token (not a right cookie) waits its turn behind them.

    One lock per event loop (a server has one; the test client may start several).
    """

    def __init__(
        self,
        token: str | None,
        *,
        delay: float = TOKEN_FAILURE_DELAY,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        secret: Callable[[], bytes] | None = None,
        revocations: SessionRevocations | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.token = token or None
        #: Reads the key of the cookie's name (:func:`cookie_secret`); may touch the database.
        self.secret = secret
        #: Where logouts are kept (:class:`DatabaseRevocations`); touches the database.
        self.revocations = revocations
        #: The login cookie's name and the key its values are signed with, once the secret was read.
        self._named: tuple[str, bytes] | None = None
        self.delay = delay
        self._clock = clock
        self._sleep = sleep
        self._wall_clock = wall_clock
        #: No credential is checked before this (``clock`` time): ``delay`` after the last failure.
        self._not_before = float("-inf")
        self._guard = threading.Lock()
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def configured(self) -> bool:
        return self.token is not None

    def _named_now(self) -> tuple[str, bytes] | None:
        """The login cookie's name and signing key under this token (None without one), read on
        this thread: the first call reads the database's secret (:func:`cookie_secret`), later
        ones not."""
        if self.token is None:
            return None
        if self._named is None:
            if self.secret is None:
                raise RuntimeError("the token gate has no secret to name its cookie with")
            secret = self.secret()
            self._named = (session_cookie(self.token, secret), session_key(self.token, secret))
        return self._named

    async def _named_soon(self) -> tuple[str, bytes] | None:
        """:meth:`_named_now`, off the event loop when the database must be read."""
        if self._named is not None or self.token is None:
            return self._named
        return await anyio.to_thread.run_sync(self._named_now)

    def new_session_now(self) -> tuple[str, str] | None:
        """A new login's cookie, name and value (None without a token): its own random id, issued
        now (:func:`session_value`)."""
        named = self._named_now()
        if named is None:
            return None
        name, key = named
        return name, session_value(key, issued=int(self._wall_clock()), session_id=new_session_id())

    async def new_session(self) -> tuple[str, str] | None:
        """:meth:`new_session_now`, off the event loop when the database must be read."""
        await self._named_soon()
        return self.new_session_now()

    def cookie_name_now(self) -> str | None:
        """The login cookie's name under this token (None without one)."""
        named = self._named_now()
        return named[0] if named is not None else None

    async def cookie_name(self) -> str | None:
        """:meth:`cookie_name_now`, off the event loop when the database must be read."""
        named = await self._named_soon()
        return named[0] if named is not None else None

    def _revocations(self) -> SessionRevocations:
        if self.revocations is None:
            raise RuntimeError("the token gate has nowhere to keep logouts")
        return self.revocations

    def _fresh(self, claim: SessionClaim) -> bool:
        """Whether a login issued at ``claim.issued`` is still good by age (see the class doc)."""
        now = self._wall_clock()
        return claim.issued - SESSION_CLOCK_SKEW <= now < claim.expires

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        with self._guard:
            lock = self._locks.get(loop)
            if lock is None:
                lock = self._locks[loop] = asyncio.Lock()
            return lock

    async def _turn(self) -> None:
        """Wait (holding the lock) until the pace allows the next check."""
        wait = self._not_before - self._clock()
        if wait > 0:
            await self._sleep(wait)

    def _failed(self) -> None:
        self._not_before = self._clock() + self.delay

    async def check_token(self, given: str) -> bool:
        """Whether ``given`` is the token (always False when none is configured), paced."""
        if self.token is None:
            return False
        async with self._lock():
            await self._turn()
            if token_matches(given, self.token):
                return True
            self._failed()
        await self._sleep(self.delay)
        return False

    async def check_cookie(self, value: str) -> bool:
        """Whether ``value`` is a good login cookie of the token: signed with its key, younger
        than :data:`SESSION_MAX_AGE`, not logged out. A value that fails the signature is paced
        (see the class doc)."""
        named = await self._named_soon()
        if named is None:
            return False
        claim = read_session(named[1], value)
        if claim is not None:
            if not self._fresh(claim):
                return False
            revoked = await anyio.to_thread.run_sync(self._revocations().revoked, claim.session_id)
            return not revoked
        if is_fixed_value(value):
            return False
        async with self._lock():
            await self._turn()
            self._failed()
        await self._sleep(self.delay)
        return False

    async def end_session(self, value: str) -> bool:
        """Log the session of ``value`` out, for every ``serve`` of the database: True when it
        was a good login value of this token (signed, still of age), False for anything else
        (nothing to end: a changed or stale value is no credential already). Never paced: the
        caller sent this dashboard's cookie name, which only its own browser is told."""
        named = await self._named_soon()
        if named is None:
            return False
        claim = read_session(named[1], value)
        if claim is None or not self._fresh(claim):
            return False
        await anyio.to_thread.run_sync(self._revocations().revoke, claim, self._wall_clock())
        return True


async def access_of(scope: Scope, gate: TokenGate) -> Access:
    """Who the request comes from, and whether it carries the token (checked by ``gate``)."""
    headers = Headers(scope=scope)
    loopback = is_loopback(scope, headers)
    if not gate.configured:
        return Access(token_configured=False, loopback=loopback, authenticated=False)
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and given.strip() and await gate.check_token(given.strip()):
        return Access(token_configured=True, loopback=loopback, authenticated=True, by_header=True)
    # Only this dashboard's own cookie: another's (another token's name) is no credential. Its
    # name is looked up (the database's secret, the first time) only for a request carrying one.
    try:
        name = await gate.cookie_name() if carries_a_session_cookie(headers) else None
    except DatabaseReadOnlyError:
        # The cookie's key was never made, and a read-only database cannot keep one: no login
        # was ever given under it, so no cookie is a credential (the pages still read).
        name = None
    cookie = _cookie(headers, name) if name is not None else None
    authenticated = cookie is not None and await gate.check_cookie(cookie)
    return Access(token_configured=True, loopback=loopback, authenticated=authenticated)


def _is_action(path: str) -> bool:
    """``/batches/REF/ACTION``: a dashboard action (``web.dashboard``'s route)."""
    parts = path.strip("/").split("/")
    return len(parts) == 3 and parts[0] == "batches" and all(parts)


def _wants_html(headers: Headers) -> bool:
    return "text/html" in headers.get("accept", "")


def answers_json(method: str, path: str, headers: Headers) -> bool:
    """Whether a refusal or error of this request is one JSON object, ``{"ok": false, "error":
    …}``: an action (``POST /batches/REF/ACTION``) that a script calls, whatever refused or broke
    it (this middleware, the action, the database). A browser's form post (``Accept: text/html``)
    gets what a browser gets: a page or its flash; anything else is plain text."""
    return method not in SAFE_METHODS and _is_action(path) and not _wants_html(headers)


class DashboardAuth:
    """ASGI middleware enforcing the rule of this module's docstring on every HTTP request.

    Pure ASGI (not ``BaseHTTPMiddleware``), so video responses stream and seek untouched.
    ``gate`` holds ``WANBATCH_SERVE_TOKEN`` (shared with the login form, so both are paced
    together). ``/static/…`` is served without looking at credentials: it holds no data, and a
    stale cookie must not make a page's stylesheet wait.
    """

    def __init__(self, app: ASGIApp, gate: TokenGate, engine: Engine | None = None) -> None:
        self.app = app
        self.gate = gate
        #: The database, to tell a schema downgraded under this serve from an outage.
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if path in PUBLIC_PATHS:  # a route of them, or 405 from the router
            await self.app(scope, receive, send)
            return
        if path.startswith(OPEN_PREFIXES):
            headers = Headers(scope=scope)
            access = Access(self.gate.configured, is_loopback(scope, headers), authenticated=False)
        else:
            try:
                access = await access_of(scope, self.gate)
            except (DBAPIError, PoolTimeoutError) as exc:  # the cookie's name not known, no database to ask
                behind = None
                if self.engine is not None and isinstance(exc, DBAPIError) and db.is_schema_mismatch(exc):
                    # Its sessions' table gone (``alembic downgrade`` under this serve): said as
                    # the pages say it, not "try again in a moment", which never helps.
                    behind = await anyio.to_thread.run_sync(db.schema_behind, self.engine)
                await self._no_database(scope, exc, behind)(scope, receive, send)
                return
        scope.setdefault("state", {})["access"] = access
        refusal = self._refusal(scope, access, method, path)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, access: Access, method: str, path: str) -> Response | None:
        """The answer that stops this request here, or None to let it through.

        A refused action (``POST /batches/REF/ACTION``) from a client that does not ask for HTML
        is one JSON object, ``{"ok": false, "error": …}``, as the action's own refusals (409,
        404) are: a script calling the API reads one format whatever refused it."""
        headers = Headers(scope=scope)
        refused = self._refused_response(headers, method, path)
        client = scope.get("client")
        who = one_line(str(client[0])) if client else "?"  # X-Forwarded-For's, behind a trusted proxy
        # The decoded path is the client's text: a %0A in it must not start a forged log line.
        logged_path = one_line(path)
        if not access.token_configured and not access.loopback:
            log.warning(
                "dashboard: refused %s %s from %s (no token configured)",
                method,
                logged_path,
                who,
                extra={"event": "dashboard.refused", "status": 403},
            )
            return refused(LOOPBACK_ONLY, 403)
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            # A browser's login and logout alike: another site may not log it in or out.
            if method not in SAFE_METHODS and path in OPEN_PATHS and "origin" in headers:
                return self._cross_origin(scope, headers, method, logged_path, who, refused)
            return None
        if method in SAFE_METHODS:
            if access.can_read:
                return None
            return self._login_needed(headers, scope, refused)
        if not access.token_configured:
            return refused(READ_ONLY, 403)
        if not access.authenticated:
            return self._login_needed(headers, scope, refused)
        if not access.by_header:
            return self._cross_origin(scope, headers, method, logged_path, who, refused)
        return None

    def _no_database(self, scope: Scope, exc: DBAPIError | PoolTimeoutError, behind: str | None) -> Response:
        """503 for a request whose login cookie could not be checked: the cookie's name needs
        the database's secret (read once per process), and the database did not answer; or
        (``behind``: :func:`jobs.db.schema_behind`) its schema is older than this wanbatch's."""
        client = scope.get("client")
        refused = self._refused_response(Headers(scope=scope), scope["method"], scope["path"])
        if behind is not None:
            log.warning(
                "dashboard: %s %s from %s: %s: %s",
                scope["method"],
                one_line(scope["path"]),
                one_line(str(client[0])) if client else "?",
                behind,
                db.SCHEMA_BEHIND_FIX,
                extra={"event": "dashboard.schema_behind", "status": 503},
            )
            return refused(f"{behind}: {db.SCHEMA_BEHIND_FIX}", 503)
        log.warning(
            "dashboard: %s %s from %s: the login cookie cannot be checked: %s",
            scope["method"],
            one_line(scope["path"]),
            one_line(str(client[0])) if client else "?",
            first_line(exc, limit=300),  # the driver's first line (not its hint), as web.app logs it
            extra={"event": "dashboard.database_unavailable", "status": 503},
        )
        return refused(NO_DATABASE, 503)

    @staticmethod
    def _cross_origin(
        scope: Scope,
        headers: Headers,
        method: str,
        logged_path: str,
        who: str,
        refused: Callable[..., Response],
    ) -> Response | None:
        """403 for a request that did not come from the dashboard's own pages (CSRF), with the
        line saying what was seen and what a reverse proxy should send; None for one that did."""
        why = origin_refusal(scope, headers)
        if why is None:
            return None
        peer = "a trusted proxy" if scope.get("state", {}).get("via_trusted_proxy") else "an untrusted peer"
        log.warning(
            "dashboard: refused cross-origin %s %s from %s (via %s): %s",
            method,
            logged_path,
            who,
            peer,
            why,
            extra={"event": "dashboard.refused", "status": 403},
        )
        return refused(why, 403)

    @staticmethod
    def _refused_response(headers: Headers, method: str, path: str) -> Callable[..., Response]:
        """How this request is refused: JSON for an action a script calls, else plain text."""
        as_json = answers_json(method, path, headers)

        def refused(message: str, status: int, extra: dict[str, str] | None = None) -> Response:
            if as_json:
                return JSONResponse({"ok": False, "error": message}, status_code=status, headers=extra)
            return PlainTextResponse(message, status_code=status, headers=extra)

        return refused

    @staticmethod
    def _login_needed(headers: Headers, scope: Scope, refused: Callable[..., Response]) -> Response:
        if scope["method"] in SAFE_METHODS and _wants_html(headers):
            query = scope.get("query_string", b"").decode("latin-1")
            target = scope["path"] + (f"?{query}" if query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        return refused(LOGIN_NEEDED, 401, {"WWW-Authenticate": 'Bearer realm="wanbatch"'})


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site, never another site (``//evil``)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
