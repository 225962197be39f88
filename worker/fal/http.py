"""The shared httpx plumbing of the fal client and storage: auth scoped to fal's origins,
explicit timeouts, and the bounded, jittered retry used for idempotent calls only.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from http.cookiejar import Cookie, CookieJar

import httpx

from jobs.settings import FalSettings

USER_AGENT = "wanbatch (httpx)"


def origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` with default ports made explicit, for same-origin checks."""
    parsed = httpx.URL(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    return (parsed.scheme, parsed.host, port)


def origin_text(url: str | httpx.URL) -> str:
    """``scheme://host:port`` of ``url``, the default port made explicit, an IPv6 host in
    brackets, and never its credentials, path or query: what the upload cache is keyed by."""
    scheme, host, port = origin(url)
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host.lower()}:{port}" if port is not None else f"{scheme}://{host.lower()}"


def with_body(response: httpx.Response, body: bytes, *, drop: Iterable[str]) -> httpx.Response:
    """A copy of the streamed ``response`` holding ``body`` (what was read of it), with its
    status, request and extensions, and its headers but those named in ``drop`` (any case):
    the ones the bytes read no longer match, such as ``Content-Encoding`` for a body httpx
    decoded. Repeated headers stay repeated, in order."""
    dropped = {name.lower() for name in drop}
    return httpx.Response(
        response.status_code,
        headers=[(k, v) for k, v in response.headers.multi_items() if k.lower() not in dropped],
        content=body,
        request=response.request,
        extensions=response.extensions,
    )


class FalKeyAuth(httpx.Auth):
    """Adds ``Authorization: Key …`` only to requests for fal's own origins.

    Signed upload URLs and CDN downloads live on other hosts; they must never see the key. The
    origins are the configured queue and REST URLs, fixed at construction: nothing a provider
    answers (a status URL on another host) can add one. The repr never shows the key.
    """

    def __init__(self, key: str | None, origins: Iterable[str]) -> None:
        self._key = key
        self._origins = frozenset(origin(u) for u in origins)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={'set' if self._key else 'unset'}, origins={len(self._origins)})"

    def trusts(self, url: str | httpx.URL) -> bool:
        """Whether ``url`` is on one of fal's configured origins (and so gets the key)."""
        try:
            return origin(url) in self._origins
        except httpx.InvalidURL:
            return False

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._key and origin(request.url) in self._origins:
            request.headers["Authorization"] = f"Key {self._key}"
        yield request


def timeout_from(settings: FalSettings) -> httpx.Timeout:
    """Explicit per-phase timeouts: a stalled TLS read must never hang a worker forever."""
    return httpx.Timeout(
        connect=settings.connect_timeout,
        read=settings.read_timeout,
        write=settings.read_timeout,
        pool=settings.connect_timeout,
    )


class NoCookies(CookieJar):
    """A cookie jar that keeps nothing: fal's queue API and its CDN need no cookies, and a
    client shared by many calls must carry nothing a provider set from one call to the next.

    Refusing by policy (``DefaultCookiePolicy(allowed_domains=[])``) would still parse every
    response's headers into cookies first (:meth:`CookieJar.make_cookies`), about 35 µs of CPU
    per response; this jar never looks at them.
    """

    def extract_cookies(self, response: object, request: object) -> None:
        return None

    def set_cookie(self, cookie: Cookie) -> None:
        return None


def build_http_client(
    *,
    timeout: httpx.Timeout,
    auth: httpx.Auth | None = None,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    """A sync client (Celery tasks are sync) that never follows redirects unless asked per call."""
    return httpx.Client(
        auth=auth,
        timeout=timeout,
        transport=transport,
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
        cookies=NoCookies(),
    )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff with ±50 % jitter, as fal's clients do, for idempotent calls.

    ``attempts`` counts the first try; 1 disables retrying.
    """

    attempts: int = 3
    base_delay: float = 0.25
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (0-based)."""
        return float(min(self.base_delay * 2.0**attempt, self.max_delay) * random.uniform(0.5, 1.5))


Sleep = Callable[[float], None]
DEFAULT_SLEEP: Sleep = time.sleep
