"""The shared httpx plumbing of the fal client and storage: auth scoped to fal's origins,
explicit timeouts, deadlines over whole exchanges, and the bounded, jittered retry used for
idempotent calls only.

httpx's timeouts bound each network wait (https://www.python-httpx.org/advanced/timeouts/):
httpcore hands the read timeout to every ``read()`` of the socket, so a server that sends one
byte just inside it, forever, is never cut off — in its headers as much as in its body (httpcore
reads up to 100 KiB of headers). A per-request ``timeout`` is one number fixed for the whole
request, so it cannot shrink as a deadline nears. :func:`cut_off_at` sets a deadline over
everything the calling thread sends and reads until it is left (connect, TLS, request, headers,
body), and :class:`DeadlineBackend`, the network backend of every client here
(:func:`with_deadlines`), makes each wait ``min(timeout, time left)``: the exchange ends at its
deadline however the bytes trickle. The name lookup before a connect is such a wait too
(:func:`resolve`): ``getaddrinfo`` has no timeout of its own.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import logging
import os
import queue
import random
import socket
import ssl
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from http.cookiejar import Cookie, CookieJar
from pathlib import Path
from typing import Any, TypeVar

import httpcore
import httpx

from jobs.errors import ConfigError
from jobs.http_environment import beyond_loopback, construction_message, is_loopback_host
from jobs.settings import FalSettings
from worker.fal.origin import Origin, origin_of, url_origin

log = logging.getLogger(__name__)

USER_AGENT = "wanbatch (httpx)"

#: The content codings every call to fal asks for (``Accept-Encoding``), fixed here rather
#: than httpx's default, which grows with the decoders installed (brotli, zstandard).
#: :func:`decoded_chunks` inflates them a bounded step at a time.
ACCEPT_ENCODING = "gzip, deflate"
#: The most codings one body may be wrapped in: ``gzip, gzip`` is two.
MAX_CODINGS = 2
#: The most bytes one step of inflating produces: a reader counts (and stops) between steps.
INFLATE_STEP = 64 * 1024


def origin(url: str | httpx.URL) -> Origin:
    """``(scheme, host, port)`` with default ports made explicit, for same-origin checks
    (:mod:`worker.fal.origin`: a string is parsed there, as httpx would; ValueError when it
    does not parse)."""
    if isinstance(url, str):
        return url_origin(url)
    return origin_of(url.scheme, url.host, url.port)


def with_body(response: httpx.Response, body: bytes, *, drop: Iterable[str]) -> httpx.Response:
    """A copy of the streamed ``response`` holding ``body`` (what was read of it), with its
    status, request and extensions, and its headers but those named in ``drop`` (any case):
    the ones the bytes read no longer match, such as ``Content-Encoding`` for a body httpx
    decoded. Repeated headers stay repeated, in order."""
    dropped = {name.lower() for name in drop}
    headers = response.headers
    return httpx.Response(
        response.status_code,
        # Copied as they are when none is dropped (nearly always: ``Content-Encoding`` is rare):
        # decoding each header to a str and encoding it back cost more than the rest of the copy.
        headers=[(k, v) for k, v in headers.multi_items() if k.lower() not in dropped]
        if any(name in headers for name in dropped)
        else headers,
        content=body,
        request=response.request,
        extensions=response.extensions,
    )


def decoded_chunks(response: httpx.Response) -> Iterator[bytes]:
    """The body of the streamed ``response``, decoded, as it arrives, in pieces of at most
    :data:`INFLATE_STEP` bytes once inflated: a reader that counts them can stop a body at its
    cap however far it would inflate. :class:`httpx.DecodingError` for a body that cannot be
    decoded: a coding not asked for (:data:`ACCEPT_ENCODING`), more than :data:`MAX_CODINGS`
    of them, or bytes that are not what their coding says.

    httpx's own decoders (``Response.iter_bytes()``) inflate each chunk from the wire whole:
    1.8 KB of ``gzip`` of a ``gzip`` of zeros became 1 GiB in memory before any cap was
    checked. Here the raw bytes (``iter_raw()``) go through :func:`zlib.decompressobj`, whose
    ``max_length`` bounds each step (https://docs.python.org/3/library/zlib.html#zlib.Decompress.decompress);
    the steps are pulled one at a time, so nothing is inflated beyond what the reader takes.
    Unencoded bytes pass as they arrive (one network read each). A response read already (by a
    test's transport: the stream of one from ``Client.stream`` never is) is in memory, decoded.
    """
    if response.is_stream_consumed:
        return response.iter_bytes()
    codings = _codings(response)
    chunks: Iterator[bytes] = response.iter_raw()
    for coding in reversed(codings):  # listed in the order applied: undone last first
        chunks = _inflated(chunks, coding)
    return chunks


def _codings(response: httpx.Response) -> list[str]:
    """The body's content codings (RFC 9110 §8.4), in the order applied, ``identity`` left out."""
    listed = response.headers.get_list("content-encoding", split_commas=True)
    codings = [c.strip().lower() for c in listed if c.strip().lower() not in ("", "identity")]
    codings = ["gzip" if c == "x-gzip" else c for c in codings]
    refused = [c for c in codings if c not in ("gzip", "deflate")]
    if refused:
        raise httpx.DecodingError(f"a {refused[0][:40]!r}-encoded body (Content-Encoding), not asked for")
    if len(codings) > MAX_CODINGS:
        raise httpx.DecodingError(f"a body in {len(codings)} content codings (at most {MAX_CODINGS} read)")
    return codings


def _inflated(chunks: Iterator[bytes], coding: str) -> Iterator[bytes]:
    """``chunks`` of ``gzip`` or ``deflate`` data inflated, :data:`INFLATE_STEP` bytes at most a step.

    ``deflate`` is meant to be zlib-wrapped (RFC 9110 §8.4.1.2), but some servers send it raw:
    as httpx does, a body whose start is not zlib data is read again as raw deflate (its first
    bytes, however the chunks split them, are kept until the first are inflated)."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16 if coding == "gzip" else zlib.MAX_WBITS)
    start: bytes | None = b"" if coding == "deflate" else None  # what a raw reading would start from
    for chunk in itertools.chain(chunks, [b""]):  # the last, empty one takes what zlib still holds
        if start is not None:
            start = start + chunk if len(start) < 64 else None
        data = chunk
        while True:
            try:
                out = inflater.decompress(data, INFLATE_STEP)
            except zlib.error as exc:
                if start is None:
                    raise httpx.DecodingError(f"a {coding!r}-encoded body that is not ({exc})") from exc
                inflater, data, start = zlib.decompressobj(-zlib.MAX_WBITS), start, None
                continue
            if out:
                start = None
                yield out
            data = inflater.unconsumed_tail
            if not data and len(out) < INFLATE_STEP:  # all taken in, and nothing more held back
                break


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
        except ValueError:  # a URL that does not parse is on no origin of fal's
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


class _Refused(httpx.Cookies):
    """The cookies of a :class:`CookielessClient`: none, and no look at a response for any.

    httpx hands every response to ``client.cookies.extract_cookies``, which builds urllib's
    request and response stand-ins (a ``urllib.request.Request``, its URL parsed again) before
    the jar is even asked: about 50 µs of CPU per response, four or more per job, although
    :class:`NoCookies` then keeps nothing."""

    def __init__(self) -> None:
        super().__init__(NoCookies())

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


class CookielessClient(httpx.Client):
    """An :class:`httpx.Client` that neither keeps nor sends cookies (fal's queue API and its
    CDN need none; a client shared by many calls must carry nothing a provider set from one
    call to the next), and spends no CPU on the ``Set-Cookie`` headers of its responses."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("cookies", None)
        super().__init__(**kwargs)
        self._refused = _Refused()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._refused

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        return None  # kept empty


def direct_mounts(urls: Iterable[str]) -> dict[str, httpx.BaseTransport | None]:
    """httpx ``mounts`` that reach the origins of ``urls`` on this machine's loopback directly,
    whatever ``HTTP_PROXY``/``ALL_PROXY`` say (a mount of None is the client's own transport, as
    httpx mounts a ``NO_PROXY`` host). A proxy elsewhere cannot reach this machine's loopback: the
    in-process simulator of ``run --simulate`` went through ``HTTP_PROXY`` to the proxy's own
    127.0.0.1 (every job failed, http_502), and a plain-http proxy saw each request's key. Go's
    ``net/http`` never proxies loopback either. A URL that does not parse mounts nothing."""
    mounts: dict[str, httpx.BaseTransport | None] = {}
    for url in urls:
        try:
            scheme, host, port = origin(url)
        except ValueError:
            continue
        if is_loopback_host(host):
            shown = f"[{host}]" if ":" in host else host
            mounts[f"{scheme}://{shown}" + (f":{port}" if port is not None else "")] = None
    return mounts


@contextlib.contextmanager
def environment_checked() -> Iterator[None]:
    """Around the construction of a client that reads the environment (``trust_env``, or
    :func:`httpx.create_ssl_context`): httpx raises there for a proxy or certificate variable it
    cannot use (ImportError for SOCKS without ``socksio``, ValueError for an unknown proxy
    scheme, InvalidURL, an OSError or ``ssl.SSLError`` for ``SSL_CERT_FILE``) — one line naming
    the variable (:mod:`jobs.http_environment`), exit 2, never an internal error. The settings
    refuse those values already; this covers what they cannot see (a PEM block OpenSSL refuses)."""
    try:
        yield
    except (ImportError, ValueError, OSError, httpx.InvalidURL) as exc:
        raise ConfigError(construction_message(exc)) from None


#: What a TLS context was built from: the values of ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``.
_TrustKey = tuple[str | None, str | None]
#: The most seconds a client goes on trusting what it was built with after the CA bundle (or
#: folder) changed at the same path: a new connection looks at it again (one ``stat``) when it
#: was last looked at longer ago than this (:func:`current_ssl_context`), never on every request.
TRUST_RECHECK_SECONDS = 60.0
#: The clock :data:`TRUST_RECHECK_SECONDS` is counted on (tests move it).
_trust_clock = time.monotonic


@dataclass(slots=True)
class _Trust:
    """The TLS context last built for one value of those variables: the :func:`_trust_stamp` of
    what it was built from, and when that was last looked at (:data:`_trust_clock`)."""

    stamp: tuple[object, ...]
    context: ssl.SSLContext
    looked_at: float


_SSL_CONTEXTS: dict[_TrustKey, _Trust] = {}
#: The variables' values each context :func:`shared_ssl_context` built was built for: a client
#: holds the context it was built with, and :func:`current_ssl_context` finds the newest for them.
_CONTEXT_KEYS: weakref.WeakKeyDictionary[ssl.SSLContext, _TrustKey] = weakref.WeakKeyDictionary()
_SSL_CONTEXTS_LOCK = threading.Lock()


def _trust_stamp(cert_file: str | None, cert_dir: str | None) -> tuple[object, ...]:
    """What changes when the certificates those variables name do: ``(st_ino, st_size,
    st_mtime_ns)`` of ``SSL_CERT_FILE`` (a bundle rewritten in place, or replaced by a rename or
    a swapped symlink, as ``update-ca-certificates`` and a re-mounted Kubernetes ConfigMap do),
    else the ``st_mtime_ns`` of each ``SSL_CERT_DIR`` folder (a certificate added or removed).
    One that cannot be looked at counts as None (httpx then says why, building the context)."""

    def stat(path: str) -> tuple[int, int, int] | None:
        try:
            found = Path(path).stat()
        except (OSError, ValueError):
            return None
        return (found.st_ino, found.st_size, found.st_mtime_ns)

    if cert_file:  # httpx reads SSL_CERT_DIR only without it
        return (stat(cert_file),)
    if cert_dir:
        return tuple(
            found[2] if (found := stat(entry)) else None for entry in cert_dir.split(os.pathsep) if entry
        )
    return ()


def _build_ssl_context(key: _TrustKey) -> ssl.SSLContext:
    """:func:`httpx.create_ssl_context` for the variables' values ``key`` (this process's, when
    :func:`shared_ssl_context` asks; those a client was built with, when it is rebuilt), with the
    ALPN httpcore sets on it before each handshake of a client without HTTP/2 (none here has it):
    a context swapped in at the handshake (:func:`current_ssl_context`) offers the same."""
    cert_file, cert_dir = key
    if cert_file:
        context = ssl.create_default_context(cafile=cert_file)
    elif cert_dir:
        context = ssl.create_default_context(capath=cert_dir)
    else:
        context = httpx.create_ssl_context(trust_env=False)  # certifi's bundle
    context.set_alpn_protocols(["http/1.1"])
    _CONTEXT_KEYS[context] = key
    return context


def shared_ssl_context() -> ssl.SSLContext:
    """The TLS context this process's clients verify servers with (as :func:`httpx.create_ssl_context`
    makes it: certifi's CA bundle, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``), built once per value of
    those variables and content of what they name. Building one parses the whole bundle, about
    20 ms of CPU, and a run built four (the fal client, the downloads' and the uploads' guarded
    transports, each of which :class:`httpx.HTTPTransport` had already given one it then
    replaced) for the same trust. An :class:`ssl.SSLContext` is meant to be shared by many
    connections and threads (its settings are fixed here once made). A CA bundle rotated at the
    same path (:func:`_trust_stamp`) gets a new context, for the clients built after it and, at
    their next new connection, for those built before (:func:`current_ssl_context`). A variable
    httpx cannot use is a :class:`ConfigError` (:func:`environment_checked`), as when each
    client built its own."""
    key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    stamp = _trust_stamp(*key)
    with _SSL_CONTEXTS_LOCK:
        trust = _SSL_CONTEXTS.get(key)
        if trust is None or trust.stamp != stamp:
            with environment_checked():
                trust = _SSL_CONTEXTS[key] = _Trust(stamp, _build_ssl_context(key), _trust_clock())
        trust.looked_at = _trust_clock()
        return trust.context


def current_ssl_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """The context a new TLS connection verifies its server with, for a client built with
    ``context``: the newest :func:`shared_ssl_context` built for the same variables' values,
    once what they name changed (a corporate proxy's CA rotated in place during an overnight
    render: a long ``worker``, ``serve`` or ``run`` went on trusting only the old CA until it was
    restarted, every new connection failing verification). It looks (one ``stat``) at most every
    :data:`TRUST_RECHECK_SECONDS`; connections already open keep theirs, and no pool is dropped.
    A bundle that cannot be loaded now (half written, removed) leaves the trust as it was, looked
    at again later, with one warning. Any other context (a test's, a proxy's) is returned as is."""
    key = _CONTEXT_KEYS.get(context)
    if key is None:
        return context
    now = _trust_clock()
    with _SSL_CONTEXTS_LOCK:
        trust = _SSL_CONTEXTS.get(key)
        if trust is None:  # built before this process's first shared_ssl_context for it: none newer
            return context
        if now - trust.looked_at < TRUST_RECHECK_SECONDS:
            return trust.context
        trust.looked_at = now
        stamp = _trust_stamp(*key)
        if stamp != trust.stamp:
            try:
                trust.context = _build_ssl_context(key)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                log.warning(
                    "the CA certificates changed but cannot be loaded (%s); "
                    "new connections go on trusting the ones loaded before",
                    type(exc).__name__,
                    extra={"event": "tls.trust_unloadable"},
                )
            else:
                trust.stamp = stamp
                log.info(
                    "the CA certificates changed: new connections trust the new ones",
                    extra={"event": "tls.trust_reloaded"},
                )
        return trust.context


# ------------------------------------------------------------------------------------- deadlines


@dataclass(eq=False, slots=True)
class Cutoff:
    """A deadline over an exchange: ``at`` (``time.monotonic()``), ``reason`` (the words of the
    timeout raised there), and ``hit``, set once a network wait was cut short by it — how the
    caller tells its deadline from an ordinary timeout, and words its own error."""

    at: float
    reason: str
    hit: bool = False
    #: False: the time spent sending the request does not count (each write is bounded by
    #: its own timeout instead, so a large upload on a slow uplink that keeps progressing is
    #: never cut off), and the deadline moves on by it — what it bounds is the connect and the
    #: answer (:meth:`worker.fal.client.AnswerBudget.exchange`).
    counts_sending: bool = True


#: The deadlines in force for this thread's network waits (nested ones all apply: the nearest wins).
_CUTOFFS: ContextVar[tuple[Cutoff, ...]] = ContextVar("wanbatch_http_cutoffs", default=())


@contextmanager
def cut_off_at(at: float | None, reason: str, *, counts_sending: bool = True) -> Iterator[Cutoff | None]:
    """Every network wait of this thread inside the block (connect, TLS, each write and read,
    headers and body alike) ends by ``at`` (``time.monotonic()``; ``None``: no deadline, and
    the block yields ``None``), with an httpx timeout error whose text is ``reason``. Only
    clients whose backend is a :class:`DeadlineBackend` obey it (:func:`with_deadlines`).

    ``counts_sending=False``: the time spent writing the request (its body: an upload) is not
    counted (:attr:`Cutoff.counts_sending`), each write being bounded by the write timeout.

    A context variable, not client state: a shared client serves concurrent exchanges, each on
    its thread with its own deadline. Enter and leave it in one plain function (never across a
    ``yield``), so it never outlives the exchange it bounds."""
    if at is None:
        yield None
        return
    cut = Cutoff(at, reason, counts_sending=counts_sending)
    token = _CUTOFFS.set((*_CUTOFFS.get(), cut))
    try:
        yield cut
    finally:
        _CUTOFFS.reset(token)


_T = TypeVar("_T")

#: The most bytes one write sends before the time left is looked at again: the socket waits up
#: to the timeout for *each* ``send()`` of a large buffer, so one write of a whole upload could
#: otherwise run far past a deadline to a server that reads slowly.
WRITE_PIECE = 64 * 1024


def _within(
    wait: Callable[[float | None], _T],
    timeout: float | None,
    error: type[httpcore.TimeoutException],
    *,
    sending: bool = False,
) -> _T:
    """``wait(t)`` with ``t`` the shorter of ``timeout`` and the time left before the nearest
    deadline (:func:`cut_off_at`); one cut short by a deadline raises ``error`` with its reason.
    A deadline already past raises at once: a socket timeout of 0 would mean non-blocking.
    ``sending``: a write of the request, which deadlines that do not count sending leave alone."""
    cuts = _CUTOFFS.get()
    if sending:
        cuts = tuple(cut for cut in cuts if cut.counts_sending)
    if not cuts:
        return wait(timeout)
    nearest = min(cuts, key=lambda cut: cut.at)
    left = nearest.at - time.monotonic()
    if timeout is not None and timeout < left:
        return wait(timeout)
    if left <= 0:
        nearest.hit = True
        raise error(nearest.reason)
    try:
        return wait(left)
    except httpcore.TimeoutException as exc:
        nearest.hit = True
        raise error(nearest.reason) from exc


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every wait also ends at the thread's deadline (:func:`_within`)."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return _within(lambda t: self._inner.read(max_bytes, t), timeout, httpcore.ReadTimeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Each :data:`WRITE_PIECE` within the write timeout and the deadlines that count
        sending; the time it took moves on those that do not (:attr:`Cutoff.counts_sending`):
        a large upload to a host that reads it steadily, however slowly, is not cut off by a
        deadline meant for the answer, while one that stops reading fails at the write timeout,
        saying so."""
        for start in range(0, len(buffer), WRITE_PIECE):
            began = time.monotonic()
            try:
                _within(
                    functools.partial(self._write, buffer[start : start + WRITE_PIECE]),
                    timeout,
                    httpcore.WriteTimeout,
                    sending=True,
                )
            finally:
                spent = time.monotonic() - began
                for cut in _CUTOFFS.get():
                    if not cut.counts_sending:
                        cut.at += spent

    def _write(self, piece: bytes, timeout: float | None) -> None:
        try:
            self._inner.write(piece, timeout)
        except httpcore.WriteTimeout as exc:
            if timeout is None:
                raise
            raise httpcore.WriteTimeout(
                f"sending the request: the server took none of it for {timeout:g} s (the write timeout)"
            ) from exc

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # A CA bundle rotated since the client was built is trusted from its next connection on.
        context = current_ssl_context(ssl_context) if isinstance(ssl_context, ssl.SSLContext) else ssl_context
        tls = _within(
            lambda t: self._inner.start_tls(context, server_hostname, t), timeout, httpcore.ConnectTimeout
        )
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


#: The most threads that look names up (:func:`resolve`) at once in a process.
RESOLVER_THREADS = 8
#: How long a lookup thread with nothing to look up waits for more before it ends.
RESOLVER_IDLE_SECONDS = 30.0


class _Lookup:
    """One ``getaddrinfo`` of ``(host, port)``, asked by one caller or many: ``done`` is set once
    ``answer`` (its addresses) or ``error`` (what it raised) is in."""

    __slots__ = ("answer", "done", "error", "key")

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.done = threading.Event()
        self.answer: list[str] = []
        self.error: BaseException | None = None


class _Resolver:
    """Name lookups on at most ``threads`` daemon threads, started as needed, so a caller can
    stop waiting for one (:func:`resolve`) while it goes on.

    ``getaddrinfo`` cannot be interrupted: a lookup that hangs holds its thread until the
    resolver answers (glibc waits ``timeout × attempts`` per nameserver, and a hostile or broken
    one may never answer). Lookups of a name already being looked up join that one instead of
    taking another thread, and no more than ``threads`` run at once (the others queue): a hung
    resolver holds a bounded number of threads, however many exchanges wait on it. The threads
    are daemons, so a hung lookup never holds the process open at exit, and one left idle for
    :data:`RESOLVER_IDLE_SECONDS` ends. A thread that cannot be started ("can't start new
    thread": a pids limit, memory) is not counted: the lookup waits for a running thread if
    there is one, else it fails at once (:func:`resolve`: a connect error) and the next lookup
    of that name tries again."""

    def __init__(self, threads: int) -> None:
        self._most = threads
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], _Lookup] = {}
        self._queue: queue.SimpleQueue[_Lookup] = queue.SimpleQueue()
        self._threads = 0
        #: Lookups queued or taken by a thread that has not yet counted itself busy, and
        #: threads waiting for one (or counted so): their difference is what waits for a thread.
        self._queued = 0
        self._idle = 0

    def lookup(self, host: str, port: int) -> _Lookup:
        """The lookup of ``(host, port)``: the one under way, else a new one, queued."""
        key = (host, port)
        with self._lock:
            found = self._pending.get(key)
            if found is not None:
                return found
            found = _Lookup(key)
            if self._queued >= self._idle and self._threads < self._most:
                try:  # the thread waits for this lock before it takes a lookup
                    threading.Thread(target=self._serve, name="wanbatch-resolver", daemon=True).start()
                except Exception as exc:  # "can't start new thread": a pids limit, memory
                    if self._threads == 0:  # nothing would ever take it: it fails, alone
                        found.error = exc
                        found.done.set()
                        return found
                    # else it waits for one of the running threads, as when all are taken
                else:
                    self._threads += 1
            self._pending[key] = found
            self._queue.put(found)
            self._queued += 1
        return found

    @property
    def threads(self) -> int:
        """How many lookup threads this resolver runs (for tests and diagnostics)."""
        with self._lock:
            return self._threads

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                lookup = self._queue.get(timeout=RESOLVER_IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._queued <= self._idle:  # the other idle threads take what waits
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            host, port = lookup.key
            try:
                infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
                lookup.answer = list(dict.fromkeys(_address_of(info[4]) for info in infos))
            except BaseException as exc:  # handed to every caller waiting for it
                lookup.error = exc
            finally:
                with self._lock:
                    if self._pending.get(lookup.key) is lookup:
                        del self._pending[lookup.key]
                lookup.done.set()


def _address_of(sockaddr: tuple[Any, ...]) -> str:
    """The address of a ``getaddrinfo`` answer as a connect takes it: an IPv6 one with its
    scope (``fe80::1%2``), which the string alone leaves out."""
    address = str(sockaddr[0])
    if len(sockaddr) == 4 and sockaddr[3] and "%" not in address:
        return f"{address}%{sockaddr[3]}"
    return address


_RESOLVER = _Resolver(RESOLVER_THREADS)


def _fresh_resolver() -> None:
    """In a forked child (Celery's prefork pool), the parent's lookup threads do not exist."""
    global _RESOLVER
    _RESOLVER = _Resolver(RESOLVER_THREADS)


os.register_at_fork(after_in_child=_fresh_resolver)


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IP address (IPv6 with or without brackets or a scope): nothing to look up."""
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


def resolve(host: str, port: int, timeout: float | None) -> list[str]:
    """The addresses ``host`` resolves to (``getaddrinfo``, for a TCP connect), in its order,
    once each; waited for at most ``timeout`` and the time left before the thread's nearest
    deadline (:func:`cut_off_at`), whichever ends first.

    :class:`httpcore.ConnectTimeout` when the lookup does not answer by then (``the name
    lookup of 'HOST' did not answer within N s``; a deadline already past raises its own
    reason, as every wait does), :class:`httpcore.ConnectError` when it fails (an unknown name)
    or answers no address: the errors of a connect that failed, which every caller treats as
    transient. ``socket.create_connection`` looks the name up with no timeout at all: a dead
    nameserver held a submit, a download or a worker slot for as long as the resolver took,
    past every deadline. The lookup runs on a :class:`_Resolver` thread, which goes on after
    the caller stopped waiting: a lookup of that name asked meanwhile joins it, never asks again."""
    bound = timeout
    cuts = _CUTOFFS.get()
    if cuts:
        nearest = min(cuts, key=lambda cut: cut.at)
        left = nearest.at - time.monotonic()
        if left <= 0:
            nearest.hit = True
            raise httpcore.ConnectTimeout(nearest.reason)
        bound = left if bound is None else min(bound, left)
    lookup = _RESOLVER.lookup(host, port)
    if not lookup.done.wait(bound):
        raise httpcore.ConnectTimeout(f"the name lookup of {host!r} did not answer within {bound:.3g} s")
    if isinstance(lookup.error, RuntimeError):  # no lookup thread could be started
        raise httpcore.ConnectError(f"the name lookup of {host!r} could not start ({lookup.error})")
    if isinstance(lookup.error, (OSError, UnicodeError)):
        raise httpcore.ConnectError(str(lookup.error) or type(lookup.error).__name__) from lookup.error
    if lookup.error is not None:
        raise httpcore.ConnectError(f"the name lookup of {host!r} failed ({type(lookup.error).__name__})")
    if not lookup.answer:
        raise httpcore.ConnectError(f"the name lookup of {host!r} answered no address")
    return list(lookup.answer)


class DeadlineBackend(httpcore.NetworkBackend):
    """``inner`` (httpcore's socket backend by default) with every connect and every wait of
    its streams bounded by the thread's deadline too (:func:`cut_off_at`).

    Over httpcore's socket backend, a host name is looked up first (:func:`resolve`, within
    the connect timeout and the deadline), then each of its addresses is connected to in turn,
    as ``socket.create_connection`` does, each within the time left. TLS is unchanged: httpcore
    gives ``start_tls`` the origin's host name for SNI and certificate checks, never the address.
    A proxy's name is looked up the same way (the pools of proxies are wrapped too)."""

    def __init__(self, inner: httpcore.NetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        if not isinstance(self._inner, httpcore.SyncBackend) or is_ip_literal(host):
            # Another backend (a test's) reaches hosts its own way; an address needs no lookup.
            return _DeadlineStream(self._connect(host, port, timeout, local_address, socket_options))
        if timeout is None and not _CUTOFFS.get():  # nothing to end a lookup by: as httpcore does
            return _DeadlineStream(self._connect(host, port, timeout, local_address, socket_options))
        options = None if socket_options is None else list(socket_options)  # used once per address
        last: Exception | None = None
        for address in resolve(host, port, timeout):
            try:
                return _DeadlineStream(self._connect(address, port, timeout, local_address, options))
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    def _connect(
        self,
        host: str,
        port: int,
        timeout: float | None,
        local_address: str | None,
        socket_options: Iterable[Any] | None,
    ) -> httpcore.NetworkStream:
        return _within(
            lambda t: self._inner.connect_tcp(host, port, t, local_address, socket_options),
            timeout,
            httpcore.ConnectTimeout,
        )

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        stream = _within(
            lambda t: self._inner.connect_unix_socket(path, t, socket_options),
            timeout,
            httpcore.ConnectTimeout,
        )
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def with_deadlines(client: httpx.Client) -> httpx.Client:
    """``client``, its connections made through a :class:`DeadlineBackend`: the default
    transport's and those httpx mounted for the ``HTTP(S)_PROXY`` variables alike.

    httpx has no parameter for the network backend, and passing a transport of one's own
    turns its proxy variables off, so the backend of each httpcore pool httpx built is wrapped
    in place (the pool hands it to every connection it opens). A transport that is no
    :class:`httpx.HTTPTransport` (a test's) opens no socket and is left as it is; one already
    wrapped is not wrapped again. ``tests/unit/test_exchange_deadlines.py`` checks that every
    pool is reached, so an httpx that moves these attributes fails there, not in production.
    """
    transports = [client._transport, *client._mounts.values()]
    for transport in transports:
        if not isinstance(transport, httpx.HTTPTransport):
            continue
        pool = transport._pool
        backend = pool._network_backend
        if not isinstance(backend, DeadlineBackend):
            pool._network_backend = DeadlineBackend(backend)
    return client


def build_http_client(
    *,
    timeout: httpx.Timeout,
    auth: httpx.Auth | None = None,
    transport: httpx.BaseTransport | None = None,
    direct: Iterable[str] = (),
) -> httpx.Client:
    """A sync client (Celery tasks are sync) that never follows redirects unless asked per call,
    and whose exchanges end at their deadline (:func:`with_deadlines`).

    It honours the proxy and certificate variables (``trust_env``), but reaches the origins of
    ``direct`` (fal's configured URLs) on this machine's loopback without a proxy
    (:func:`direct_mounts`). When every one of them is on loopback (``run --simulate``'s
    simulator, a ``wanbatch simulator`` on 127.0.0.1), the client reaches nothing a proxy could
    and reads no proxy variable at all: one httpx cannot use (``HTTPS_PROXY=ftp://…``) refused
    such a run for nothing. A variable httpx cannot use is a :class:`ConfigError`
    (:func:`environment_checked`)."""
    direct = list(direct)
    with environment_checked():
        return with_deadlines(
            CookielessClient(
                auth=auth,
                timeout=timeout,
                transport=transport,
                verify=shared_ssl_context(),
                mounts=direct_mounts(direct),
                trust_env=not direct or beyond_loopback(direct),
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": ACCEPT_ENCODING},
            )
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
