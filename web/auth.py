"""Who may read the dashboard and who may act on it: ``WANBATCH_SERVE_TOKEN`` and loopback.

``wanbatch serve`` is one app: fal's webhook receiver, which may face the internet (fal's
signature is its authentication), and the dashboard and ``/metrics``, which must not. The rule,
applied to every request by :class:`DashboardAuth` before any route runs:

* ``POST /webhooks/fal`` and ``GET /healthz`` pass untouched: they never need the token.
* Reading (``GET``/``HEAD``): a client that presents the token (``Authorization: Bearer …`` or
  the login form's cookie) may read from anywhere; a loopback client may read without it.
  Anyone else is sent to ``/login`` (browsers) or answered 401 when a token is configured, and
  403 when none is: without a token the dashboard answers loopback clients only.
* Acting (any other method: pause, resume, cancel, rerun): always needs the token, from
  loopback too; without one configured every action is 403 with a message saying to set
  ``WANBATCH_SERVE_TOKEN``. A browser's action must also come from the dashboard's own pages
  (the ``Origin``, else ``Referer``, names the host the request was sent to; the cookie is
  ``SameSite=Strict`` besides), so another site cannot make a logged-in browser act (CSRF).
* ``/login`` and ``/static/…`` (stylesheet and script, no data) are open to any client that may
  reach the app at all.

"Loopback" is strict: the peer address is a loopback address, no proxy header
(``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``) says the request came from further away, and
the ``Host`` header names a loopback host — a web page cannot rebind a DNS name of its own to
127.0.0.1 to read the dashboard through its visitor's browser.

The cookie holds an HMAC of the token, never the token itself; tokens are compared with
:func:`hmac.compare_digest`. Changing the token logs every browser out.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

#: The login cookie's name; its value is :func:`session_value` of the token.
SESSION_COOKIE = "wanbatch_session"
#: Requests that never need the token: ``(method, path)``.
PUBLIC_ROUTES = frozenset({("POST", "/webhooks/fal"), ("GET", "/healthz"), ("HEAD", "/healthz")})
#: Paths any client that may reach the app at all can use (the login form, its stylesheet).
OPEN_PREFIXES = ("/static/",)
OPEN_PATHS = frozenset({"/login", "/logout"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})

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


def session_value(token: str) -> str:
    """The cookie value that proves a browser logged in with ``token`` (an HMAC, not the token)."""
    return hmac.new(token.encode(), b"wanbatch dashboard session v1", hashlib.sha256).hexdigest()


def token_matches(given: str, token: str) -> bool:
    """Whether ``given`` is the token, in time that does not depend on where they differ."""
    return hmac.compare_digest(given.encode(), token.encode())


def _is_loopback_address(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _host_name(host_header: str) -> str:
    """``[::1]:8788`` → ``::1``; ``localhost:8788`` → ``localhost``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(scope: Scope, headers: Headers) -> bool:
    """Whether the request surely comes from this machine, to a loopback name (see module doc)."""
    client = scope.get("client")
    if not client or not _is_loopback_address(str(client[0])):
        return False
    if any(name in headers for name in _PROXY_HEADERS):
        return False
    host = _host_name(headers.get("host", ""))
    return host in _LOOPBACK_NAMES or _is_loopback_address(host)


def same_origin(headers: Headers) -> bool:
    """Whether ``Origin`` (else ``Referer``) names the host this request was sent to."""
    host = headers.get("host", "").strip().lower()
    source = headers.get("origin") or headers.get("referer")
    if not host or not source or source == "null":
        return False
    return urlsplit(source).netloc.lower() == host


def _cookie(headers: Headers, name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


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
        return self.authenticated or self.loopback

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


def access_of(scope: Scope, token: str | None) -> Access:
    """Who the request comes from, and whether it carries ``token``."""
    headers = Headers(scope=scope)
    loopback = is_loopback(scope, headers)
    if token is None:
        return Access(token_configured=False, loopback=loopback, authenticated=False)
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and given and token_matches(given.strip(), token):
        return Access(token_configured=True, loopback=loopback, authenticated=True, by_header=True)
    cookie = _cookie(headers, SESSION_COOKIE)
    authenticated = cookie is not None and hmac.compare_digest(cookie.encode(), session_value(token).encode())
    return Access(token_configured=True, loopback=loopback, authenticated=authenticated)


def _wants_html(headers: Headers) -> bool:
    return "text/html" in headers.get("accept", "")


class DashboardAuth:
    """ASGI middleware enforcing the rule of this module's docstring on every HTTP request.

    Pure ASGI (not ``BaseHTTPMiddleware``), so video responses stream and seek untouched.
    ``token`` is ``WANBATCH_SERVE_TOKEN``'s value, or None when it is not set.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if (method, path) in PUBLIC_ROUTES:
            await self.app(scope, receive, send)
            return
        access = access_of(scope, self.token)
        scope.setdefault("state", {})["access"] = access
        refusal = self._refusal(scope, access, method, path)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, access: Access, method: str, path: str) -> Response | None:
        """The answer that stops this request here, or None to let it through."""
        headers = Headers(scope=scope)
        client = scope.get("client")
        who = client[0] if client else "?"
        if not access.token_configured and not access.loopback:
            log.warning(
                "dashboard: refused %s %s from %s (no token configured)",
                method,
                path,
                who,
                extra={"event": "dashboard.refused", "status": 403},
            )
            return PlainTextResponse(LOOPBACK_ONLY, status_code=403)
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            if method not in SAFE_METHODS and path == "/login" and "origin" in headers:
                return None if same_origin(headers) else PlainTextResponse(CROSS_ORIGIN, status_code=403)
            return None
        if method in SAFE_METHODS:
            if access.can_read:
                return None
            return self._login_needed(headers, scope)
        if not access.token_configured:
            return PlainTextResponse(READ_ONLY, status_code=403)
        if not access.authenticated:
            return self._login_needed(headers, scope)
        if not access.by_header and not same_origin(headers):
            log.warning(
                "dashboard: refused cross-origin %s %s from %s",
                method,
                path,
                who,
                extra={"event": "dashboard.refused", "status": 403},
            )
            return PlainTextResponse(CROSS_ORIGIN, status_code=403)
        return None

    @staticmethod
    def _login_needed(headers: Headers, scope: Scope) -> Response:
        if scope["method"] in SAFE_METHODS and _wants_html(headers):
            query = scope.get("query_string", b"").decode("latin-1")
            target = scope["path"] + (f"?{query}" if query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        return PlainTextResponse(
            LOGIN_NEEDED,
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="wanbatch"'},
        )


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site, never another site (``//evil``)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
