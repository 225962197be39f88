"""Translate fal's HTTP answers and httpx's transport errors into the jobs.errors provider tree.

This is the one edge where third-party failures become wanbatch errors. The classification is
per operation because the same symptom means different things: a read timeout on a status GET
is harmless (ask again), on the submit POST it means the request may be queued and billed.

Decisions (documented here because the worker's state machine depends on them):

* Submit 5xx **with** ``x-fal-request-id`` (or with fal's JSON error body): fal's own server
  answered, and a queue submit that was accepted answers 200 with a request id — so a 5xx is a
  definite "not queued". fal never bills 5xx ("Server errors (HTTP 500+) are never charged"),
  and the queue already retried server-side. It is :class:`RetryableProviderError` (the
  *caller* resubmits later within its attempt budget; the client itself never resends a
  submit).
* Submit 502/504 from a gateway (no ``x-fal-request-id``, a body that is not fal's JSON error:
  nginx's HTML page) is :class:`AmbiguousSubmitError`, as a read timeout after the request was
  sent (:func:`gateway_lost_answer`). A gateway answers so *after* it forwarded the request:
  nginx's 504 is its ``proxy_read_timeout`` expiring while it waited for the upstream's answer,
  its 502 an upstream that closed the connection or sent an answer it could not read
  (https://nginx.org/en/docs/http/ngx_http_proxy_module.html#proxy_read_timeout; RFC 9110
  §15.6.3 and §15.6.5, https://www.rfc-editor.org/rfc/rfc9110#section-15.6.3). fal may have
  queued it meanwhile, and nginx itself refuses to pass a POST it already sent on to another
  upstream for that reason (``proxy_next_upstream``'s ``non_idempotent``,
  https://nginx.org/en/docs/http/ngx_http_proxy_module.html#proxy_next_upstream). A 502 when
  nginx could not even connect looks the same, so it is ambiguous too: resending may pay twice
  (the queue notes, §6 and §10.5, warn of duplicate jobs from retried submits).
* Submit 503 (and 429) stay retryable, with or without the header: an ingress's 503 is said
  before any upstream took the request — nginx's ``limit_req``/``limit_conn`` refusal (their
  ``*_status`` default 503,
  https://nginx.org/en/docs/http/ngx_http_limit_req_module.html#limit_req_status), a load
  balancer with no healthy upstream — and RFC 9110 §15.6.4 makes 503 the server's "unable to
  handle the request", not a lost answer.
* Submit 504 with ``X-Fal-Request-Timeout-Type: user``: our own start timeout expired — final.
* Submit 200 without a usable ``request_id`` (or not JSON): fal said yes but we cannot tell to
  what. The request may be queued and billed, so it is :class:`AmbiguousSubmitError`.
* Result 404: the worker only asks for a result after COMPLETED, so a 404 means the result has
  expired (1 h, or 6 min for results ≥ 10 KB): :class:`ResultExpiredError`, final.
* Result call vs. request: a 429/408/409 or a 5xx without an error type (a gateway's 502/503,
  a server error that says nothing of the request) is a failure of the *call* — plain
  :class:`RetryableProviderError`, meaning "ask for the result again". fal's own verdict that
  the request failed transiently (an infrastructure ``error_type``, or ``X-Fal-Retryable:
  true``) is :class:`RequestFailedError`, the only result error that may lead to a new (billed)
  submission; a failed request's ``COMPLETED`` status also carries its error.
* An answer fal's protocol cannot produce (nested deeper than :data:`MAX_JSON_DEPTH`, an unknown
  status) is :class:`ProviderProtocolError`: asked again a bounded number of times by the caller.
  So is a redirect (any 3xx) from the queue or REST API (:func:`redirect_error`): fal answers
  status, result and cancel directly, and the client never follows one. A redirect whose
  location is no URL makes httpx fail before the answer is returned (:func:`malformed_redirect`):
  the same protocol error, its location not quoted; final for a download.
* httpx's transport errors are mapped in one context manager, :func:`map_transport_errors`: on
  an idempotent call they are retryable; on the submit POST, httpcore's ``trace`` tells whether
  the body went out — before that nothing can be queued (:class:`SubmitNotSentError`, or a
  retryable "not sent"), after it a lost answer is :class:`AmbiguousSubmitError`.
* FastAPI's list of field errors is put in words in one place, :func:`format_detail`.
* Every answer becomes values here (:func:`load_json` for JSON, :func:`_short` for the text of
  one that is not) as both databases can store them (:mod:`jobs.storable`): fal's text may hold
  a ``\\u0000``, a lone surrogate, ``NaN``, ``1e999`` (a float Python reads as infinity), which
  PostgreSQL refuses (a NUL in ``jsonb`` and in text columns, a surrogate anywhere: not even
  UTF-8, which SQLite's driver and the sidecar file refuse too; no infinity in ``json``). Stored
  as they came, they would fail the step on every try. A number that is no finite float, or an
  integer of more than :data:`MAX_JSON_DIGITS` digits (which Python would not even convert past
  4,300: the whole answer "not JSON"), is read as ``None``.

fal's queue protocol: https://docs.fal.ai/documentation/model-apis/inference/queue; its error types:
https://fal.ai/docs/documentation/model-apis/request-errors.
"""

from __future__ import annotations

import json
import math
import re
import ssl
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from jobs.errors import (
    AccountLockedError,
    AmbiguousSubmitError,
    FinalProviderError,
    ProviderError,
    RetryableProviderError,
    WanbatchError,
)
from jobs.open_files import out_of_files
from jobs.storable import storable_json, storable_text
from jobs.url_secrets import masked_url
from worker.fal.models import request_id_or_none
from worker.fal.proxy_failure import certificate_words, proxy_failure, target_of

#: fal's request-error types that are infrastructure failures: a new attempt may succeed, and
#: fal does not bill them (https://fal.ai/docs/documentation/model-apis/request-errors).
RETRYABLE_ERROR_TYPES = frozenset(
    {
        "request_timeout",
        "startup_timeout",
        "runner_scheduling_failure",
        "runner_connection_timeout",
        "runner_disconnected",
        "runner_connection_refused",
        "runner_connection_error",
        "runner_incomplete_response",
        "runner_server_error",
        "internal_error",
    }
)
CANCELLED_ERROR_TYPES = frozenset({"client_cancelled", "client_disconnected"})

#: Status codes fal's own clients retry (fal_client RETRY_CODES + ingress codes).
TRANSIENT_CODES = frozenset({408, 409, 429})
INGRESS_CODES = frozenset({502, 503, 504})

_NOT_READY = re.compile(
    r"in progress|in queue|in_queue|in_progress|not (yet )?(completed|complete|ready|finished|done)|still",
    re.IGNORECASE,
)
_MAX_TEXT = 300

#: The shape of an error type we keep. fal's are snake_case words (``request_timeout``,
#: ``runner_disconnected``, ``client_cancelled``, ``bad_request``:
#: https://fal.ai/docs/documentation/model-apis/request-errors); dots and hyphens are admitted
#: for other spellings, never a ``:``, a space or more than a label's length. An error type
#: is stored, grouped on in ``status``, exported and published as a metrics label, so one of
#: another shape (an echoed ``Authorization`` value, a page of text) is dropped.
ERROR_TYPE_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def error_type_or_none(value: object) -> str | None:
    """``value`` when it has an error type's shape (:data:`ERROR_TYPE_PATTERN`), else None."""
    return value if isinstance(value, str) and ERROR_TYPE_PATTERN.fullmatch(value) else None


class ResultNotReadyError(RetryableProviderError):
    """The result endpoint answered "not finished yet": poll status again before asking."""


class ResultExpiredError(FinalProviderError):
    """The result is gone (fal keeps results 1 h, or 6 min when ≥ 10 KB): it cannot be fetched."""


class RequestCancelledError(FinalProviderError):
    """The request ended because it was cancelled (``client_cancelled``/``client_disconnected``)."""


class DownloadIntegrityError(RetryableProviderError):
    """The downloaded bytes are not what fal described (size). Retryable: a CDN object still
    propagating or a cut response heals; the caller's download-attempt budget decides when the
    (already paid) output is given up on."""


class StartTimeoutError(FinalProviderError):
    """Our ``X-Fal-Request-Start-Timeout`` expired before a runner picked the request up."""


class RequestFailedError(RetryableProviderError):
    """fal's own verdict that the request failed in a way a new attempt may fix (an
    infrastructure ``error_type``, a 5xx from fal's app). The only result error that may lead to
    a new submission: a failure of the result *call* (network, gateway, 429) says nothing about
    the request and is plain :class:`RetryableProviderError` — ask for the result again."""


class SubmitNotSentError(WanbatchError):
    """The submit failed in this process before its request was written: a closed HTTP client,
    an input that cannot be encoded, a header httpx refuses. fal cannot have queued or billed
    anything, so the job may be given back as never sent (no attempt counted). Not a
    :class:`~jobs.errors.ProviderError`: fal never saw it."""


class FalUnreachableError(SubmitNotSentError):
    """The submit could not reach fal at all: the connection was refused or timed out, or no
    pooled connection was free (httpx ``ConnectError``, ``ConnectTimeout``, ``PoolTimeout``).
    Not a byte of the request left, so it is no submission: the job goes back uncounted, and
    the process holds its submits while fal stays unreachable (:mod:`worker.steps.fal_reach`)."""


#: httpx's failures that happen before any byte of a request is written: fal was not reached.
UNREACHED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: TLS failures that are the network's, not the certificate's: the peer closed the connection
#: mid-handshake (a load balancer restarting), as a refused connection would.
_TRANSIENT_TLS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def _tls_refused(exc: BaseException) -> bool:
    """Whether a connect failure is TLS refusing fal's certificate or handshake (httpx raises
    :class:`httpx.ConnectError` for those too, the :class:`ssl.SSLError` in its causes): a
    certificate that does not verify (a proxy re-signing TLS, a wrong ``SSL_CERT_FILE``) or a
    protocol mismatch is a setting, and waiting does not clear it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return not isinstance(current, _TRANSIENT_TLS)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def could_not_connect(exc: BaseException) -> bool:
    """Whether a transport error says fal was not reached at all, for a reason that may pass:
    a refused or timed-out connection, no pooled connection — not a TLS refusal, which stays
    a counted retry (:func:`_tls_refused`): held "until fal answers", a batch without a deadline
    would wait forever for a certificate to change."""
    return isinstance(exc, UNREACHED) and not _tls_refused(exc)


def unreached(exc: BaseException) -> bool:
    """Whether ``exc`` says fal could not be reached at all (nothing sent): a submit's
    :class:`FalUnreachableError`, or an upload's failure before anything reached fal's storage —
    a retryable network error caused by a connect failure (:func:`could_not_connect`) or by a
    proxy that did not open the tunnel (:class:`httpx.ProxyError`, whatever it answered: held as
    a submit's is, :func:`_submit_transport_failure`), or the download proxy's own gateway error
    to the PUT (:class:`DownloadUnreachedError`)."""
    if isinstance(exc, FalUnreachableError | DownloadUnreachedError):
        return True
    cause = exc.__cause__
    return (
        isinstance(exc, RetryableProviderError)
        and cause is not None
        and (could_not_connect(cause) or isinstance(cause, httpx.ProxyError))
    )


class DownloadUnreachedError(RetryableProviderError):
    """A download (or a redirect hop of it), or an upload's PUT, could not even connect: the
    host's name did not resolve, the connection was refused or timed out, TLS failed in the
    handshake, or the proxy it goes through refused the tunnel (:func:`cannot_connect`), asked
    for credentials (407) or answered a forwarded ``http://`` request with its own 502/503/504
    (:func:`worker.fal.storage.proxy_gateway_error`). No answer came from the host, so nothing
    is known of the file: a paid output is not given up over it, its
    download is held (:mod:`worker.steps.download_reach`), never counted as a try.

    ``host``: where it could not connect; ``proxy``: the proxy it went through, its credentials
    masked, or None (direct)."""

    def __init__(self, message: str, *, host: str, proxy: str | None = None) -> None:
        super().__init__(message)
        self.host = host
        self.proxy = proxy


class DownloadRefusedError(FinalProviderError):
    """The download policy (:class:`worker.fal.storage.DownloadPolicy`) refused where a download,
    a redirect hop of it, or an upload's PUT would go: a host left out of
    ``WANBATCH_DOWNLOAD_ALLOWED_HOSTS``, or one that is (or resolves to) a loopback, private,
    link-local… address, or an internal name through the download proxy. Nothing was
    connected to. Final for the exchange (asking again is refused the same way), but not for a
    paid video: a setting decides it, and a run after the user changes it downloads the video
    (:func:`worker.steps.download._download_refused` holds the job for that).

    ``why``: the refusal, without the setting (the message adds it);
    ``host``: the host as shown (``[v6]`` bracketed, the port when not the web's), which is
    also the allow-list entry that would allow it; ``address``: the address it resolved to
    that was refused, when that was the reason; ``setting``: ``WANBATCH_DOWNLOAD_ALLOWED_HOSTS=…``
    as it would allow it, the entries set so far kept."""

    def __init__(self, why: str, *, host: str, address: str | None, setting: str) -> None:
        super().__init__(f"{why}; to allow it: {setting}")
        self.why = why
        self.host = host
        self.address = address
        self.setting = setting


def cannot_connect(exc: BaseException) -> bool:
    """Whether a transport error says no HTTP exchange took place at all: httpx's connect
    failures (:data:`UNREACHED`, a TLS refusal included: a download is held for it, as a setting
    to fix, not given up) or a proxy that refused the tunnel (``ProxyError``: a 407 or a 502 to
    the ``CONNECT``)."""
    return isinstance(exc, (*UNREACHED, httpx.ProxyError))


class ProviderProtocolError(ProviderError):
    """fal answered with something its protocol cannot produce: an unknown status, a body nested
    absurdly deep, a result whose ``video`` is not an object. Neither "retry" nor "give up" is
    right at once: the caller asks again a bounded number of times, then fails the job."""


#: fal's status and result bodies are a few levels deep; anything far deeper is not fal's, and
#: would make json (and everything that walks the value later) recurse without bound.
MAX_JSON_DEPTH = 64


def parse_body(response: httpx.Response) -> Any:
    """The JSON body, or ``None`` when it is not JSON (an nginx HTML page, an empty body) or is
    nested deeper than :data:`MAX_JSON_DEPTH`. Never raises.

    Python's json parses integers exactly, so seeds above 2**53 survive.
    """
    try:
        return json_body(response, "answer")
    except ProviderProtocolError:
        return None


def json_body(response: httpx.Response, what: str) -> Any:
    """Like :func:`parse_body`, but a body nested too deep is :class:`ProviderProtocolError`
    (it is JSON, just not an answer fal can give), while ``None`` still means "not JSON"."""
    return load_json(response.content, what, status_code=response.status_code)


#: A ``\u0000`` or surrogate (``\ud800``) escape in JSON text: what :func:`json.loads` reads as
#: a NUL or a lone surrogate (an escaped pair is one character, but a text holding one is walked).
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_UNSTORABLE_ESCAPE_BYTES = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _may_be_unstorable(text: str | bytes) -> bool:
    """Whether :func:`parse_json` may read from ``text`` a string no database here can store
    (:mod:`jobs.storable`): one with such an escape, or raw, a NUL or a surrogate (in bytes a
    0xED byte starts one in UTF-8, which json decodes with ``surrogatepass``; a NUL byte is in
    every UTF-16/32 text it detects). Numbers need no such test: :func:`parse_json` reads none
    that cannot be stored. False: nothing there to make storable. Substring tests that run in
    C, the escapes' expression only after a backslash: every answer of fal's comes through
    here, and nearly none holds any of them (one regular expression for all of it took longer
    than parsing the answer).
    """
    if isinstance(text, bytes):
        return (
            b"\x00" in text
            or b"\xed" in text
            or (b"\\" in text and _UNSTORABLE_ESCAPE_BYTES.search(text) is not None)
        )
    return (
        "\x00" in text
        or ("\\" in text and _UNSTORABLE_ESCAPE.search(text) is not None)
        or (not text.isascii() and _SURROGATE.search(text) is not None)
    )


#: The most digits an integer in fal's answers is read with; a longer one is read as ``None``.
#: fal's integers (a seed, a queue position, a file size) have at most 20; Python refuses to
#: convert more than 4,300 (``sys.int_max_str_digits``), which made the whole answer "not JSON".
MAX_JSON_DIGITS = 40


def _whole_or_none(literal: str) -> int | None:
    """A JSON integer literal (``parse_int``), or ``None`` past :data:`MAX_JSON_DIGITS` digits
    (JSON has no leading zeros, so its length less a sign is its digits)."""
    return int(literal) if len(literal) - literal.startswith("-") <= MAX_JSON_DIGITS else None


def _finite_or_none(literal: str) -> float | None:
    """A JSON number literal with a fraction or exponent (``parse_float``), or ``None`` for one
    too large for a float (``1e999``), which Python reads as infinity."""
    value = float(literal)
    return value if math.isfinite(value) else None


def _no_constant(_literal: str) -> None:
    """``NaN``, ``Infinity``, ``-Infinity`` (``parse_constant``: no JSON, but Python reads them)."""


#: The decoder of :func:`parse_json`, built once and shared, as :func:`json.loads` shares its
#: own: given hooks, ``json.loads`` builds a decoder for every call, twice the time of a parse.
_DECODER = json.JSONDecoder(
    parse_int=_whole_or_none, parse_float=_finite_or_none, parse_constant=_no_constant
)


def parse_json(text: str | bytes) -> Any:
    """:func:`json.loads` for an answer of fal's, reading as ``None`` every number no database
    (nor a strict JSON reader of a sidecar) can hold: ``NaN``/``Infinity``, a number that
    overflows a float (``1e999``), an integer of more than :data:`MAX_JSON_DIGITS` digits.
    Bytes are decoded as :func:`json.loads` decodes them (UTF-8, -16 or -32, lone surrogates
    kept). Raises as it does (``ValueError``, ``UnicodeDecodeError`` among them: not JSON;
    ``RecursionError``: nested too deep)."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode(json.detect_encoding(text), "surrogatepass")
    return _DECODER.decode(text)


def load_json(text: str | bytes, what: str, *, status_code: int | None = None) -> Any:
    """Parse JSON from fal: ``None`` when it is not JSON, :class:`ProviderProtocolError` when it
    nests more than :data:`MAX_JSON_DEPTH` levels (json itself would hit ``RecursionError``).

    The value is storable (:func:`jobs.storable.storable_json`: NUL and lone surrogates as
    U+FFFD, in keys too; :func:`parse_json`: ``NaN``/``Infinity``, ``1e999`` and an integer of
    absurdly many digits as ``None``): every answer of fal's the client reads comes through
    here, and what it holds may be stored, written to a sidecar or printed.
    """
    try:
        value = parse_json(text)
    except RecursionError:
        value = _TOO_DEEP
    except (ValueError, UnicodeDecodeError):
        return None
    if value is _TOO_DEEP or (_may_nest_deeper(text, MAX_JSON_DEPTH) and _deeper_than(value, MAX_JSON_DEPTH)):
        raise ProviderProtocolError(
            f"fal {what}: the JSON body is nested more than {MAX_JSON_DEPTH} levels deep",
            status_code=status_code,
        )
    return storable_json(value) if _may_be_unstorable(text) else value


_TOO_DEEP = object()


def _may_nest_deeper(text: str | bytes, limit: int) -> bool:
    """Whether JSON ``text`` may nest lists/objects more than ``limit`` levels (False: it cannot).

    Each level opens with a ``[`` or ``{`` of its own, so a text with at most ``limit`` of them
    cannot nest deeper (those inside strings only count too many). Bytes in UTF-16 or -32 hold
    a ``0x5B``/``0x7B`` byte for each such character, and perhaps more. Counted in C: every
    status event and answer of fal's comes through :func:`load_json`, a few levels deep, and
    walking the parsed value in Python cost more than parsing it."""
    if isinstance(text, str):
        return text.count("[") + text.count("{") > limit
    return text.count(b"[") + text.count(b"{") > limit


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists/objects more than ``limit`` levels (iteratively: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _short(text: str) -> str:
    """``text`` (a provider's words for an error message) on one line, at most :data:`_MAX_TEXT`
    characters, and storable (:func:`jobs.storable.storable_text`): an answer that is not JSON
    (a gateway's page) reaches the job's ``error`` only through here."""
    text = storable_text(" ".join(text.split()))
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "…"


#: How many of FastAPI's field errors :func:`format_detail` spells out before "(+N more)".
DETAIL_ITEMS = 5


def format_detail(detail: object) -> str | None:
    """A provider's ``detail`` in one line — the one place it is formatted.

    A string is returned as given; FastAPI's list of field errors (``{loc, msg, type}``) becomes
    ``"loc: msg; …"`` with the leading ``body`` dropped from each location, shortened to a
    status line, at most :data:`DETAIL_ITEMS` of them then ``(+N more)``; anything else is
    ``None`` (the caller knows what else to say).
    """
    if isinstance(detail, str):
        return detail
    if not isinstance(detail, list):
        return None
    parts = []
    for item in detail[:DETAIL_ITEMS]:
        if isinstance(item, dict):
            where = item.get("loc")
            loc = ".".join(str(p) for p in where if p != "body") if isinstance(where, list) else ""
            msg = item.get("msg", item)
            parts.append(f"{loc}: {msg}" if loc else str(msg))
        else:
            parts.append(str(item))
    more = f" (+{len(detail) - DETAIL_ITEMS} more)" if len(detail) > DETAIL_ITEMS else ""
    return _short("; ".join(parts)) + more


def _describe(detail: object, response: httpx.Response) -> str:
    if isinstance(detail, str):
        return _short(detail)
    text = format_detail(detail)
    if text is not None:
        return text
    if detail is not None:
        return _short(json.dumps(detail, default=str))
    return _short(response.text) if response.content else response.reason_phrase


def _fields(response: httpx.Response) -> dict[str, Any]:
    """status_code, error_type, detail and request_id as fal gave them, but an error type or
    request id of a shape fal never sends (:func:`error_type_or_none`,
    :func:`~worker.fal.models.request_id_or_none`) is dropped. The body's ``error_type`` wins
    over the ``X-Fal-Error-Type`` header, as in fal_client's ``_raise_for_status``."""
    body = parse_body(response)
    detail: object = None
    error_type = error_type_or_none(response.headers.get("x-fal-error-type"))
    if isinstance(body, dict):
        detail = body.get("detail", body)
        error_type = error_type_or_none(body.get("error_type")) or error_type
    elif body is not None:
        detail = body
    elif response.content:
        detail = _short(response.text)
    return {
        "status_code": response.status_code,
        "error_type": error_type,
        "detail": detail,
        "request_id": request_id_or_none(response.headers.get("x-fal-request-id")),
    }


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds when it is a finite number (an HTTP date, ``inf`` or ``nan``
    is no hint). Callers cap it (``WANBATCH_RETRY_MAX_DELAY``): it is the provider's word."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _retryable_header(response: httpx.Response) -> bool | None:
    value = response.headers.get("x-fal-retryable")
    if value is None:
        return None
    value = value.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    return None


def is_user_start_timeout(response: httpx.Response) -> bool:
    """fal's answer when our start timeout expired: 504 + ``X-Fal-Request-Timeout-Type: user``."""
    return (
        response.status_code == 504
        and response.headers.get("x-fal-request-timeout-type", "").strip().lower() == "user"
    )


def is_ingress_error(response: httpx.Response) -> bool:
    """A 502/503/504 from the gateway or nginx (no ``x-fal-request-id``): fal's app did not write
    it. That is not "never reached fal": a gateway's 502/504 may follow a forwarded request
    (:func:`gateway_lost_answer`), harmless for a GET, ambiguous for the submit POST."""
    return response.status_code in INGRESS_CODES and "x-fal-request-id" not in response.headers


#: The gateway's answers that come after it forwarded the request: 502 (the upstream closed or
#: broke its answer) and 504 (it timed out waiting for it). See the module docstring.
GATEWAY_LOST_ANSWER_CODES = frozenset({502, 504})


def gateway_lost_answer(response: httpx.Response, fields: Mapping[str, Any] | None = None) -> bool:
    """Whether a submit's answer is a gateway's 502/504 that fal's app did not write (no
    ``x-fal-request-id``, no error type, a body that is not fal's JSON error — nginx's HTML
    page): the gateway forwarded the request and lost the answer, so fal may have queued it.
    ``fields``: :func:`_fields` of ``response``, when already read."""
    if response.status_code not in GATEWAY_LOST_ANSWER_CODES or not is_ingress_error(response):
        return False
    if is_user_start_timeout(response):
        return False
    fields = _fields(response) if fields is None else fields
    if fields["error_type"] is not None:
        return False
    body = parse_body(response)
    return not (isinstance(body, dict) and "detail" in body)


def _account_error(what: str, response: httpx.Response, fields: dict[str, Any]) -> AccountLockedError:
    reason = {401: "the API key was rejected", 402: "payment required", 403: "the account is refused"}
    text = reason.get(response.status_code, "the account is refused")
    return AccountLockedError(
        f"fal {what}: {text} (HTTP {response.status_code}): {_describe(fields['detail'], response)}",
        **fields,
    )


def redirect_error(what: str, response: httpx.Response) -> ProviderProtocolError | None:
    """The error for a redirect (any 3xx) from fal's queue or REST API, or None for another answer.

    fal's queue API answers status, result and cancel itself
    (https://docs.fal.ai/documentation/model-apis/inference/queue); fal's own async client does
    not follow redirects at all. A redirect is therefore not fal's protocol, and following one
    would send a call that trusts its answer (a result is stored as the job's output) to a host
    nobody checked — another port of fal's host, a cloud metadata address. So it is never
    followed: like any answer fal cannot give, the caller asks again a bounded number of times,
    then fails the job with this reason. The location is shown with its secrets masked
    (:func:`~jobs.url_secrets.masked_url`).
    """
    code = response.status_code
    if not 300 <= code < 400:
        return None
    location = response.headers.get("location")
    if location is None:
        where = "without a location"
    else:
        try:  # a relative location, shown whole (RFC 9110 §10.2.2)
            target = str(response.url.join(location))
        except (httpx.InvalidURL, RuntimeError):  # not a URL, or a response without its request
            target = location
        where = f"to {_short(masked_url(target))}"
    return ProviderProtocolError(
        f"fal {what}: HTTP {code} redirect {where}, not followed (fal's API does not redirect)",
        status_code=code,
        request_id=request_id_or_none(response.headers.get("x-fal-request-id")),
    )


def classify_submit(response: httpx.Response) -> ProviderError:
    """The error for a non-2xx answer to the submit POST (the client never resends it).

    A gateway's 502/504 (:func:`gateway_lost_answer`) is :class:`AmbiguousSubmitError`, the
    verdict of a read timeout after the request was sent: the job becomes ``submit_unknown``."""
    fields = _fields(response)
    code = response.status_code
    text = _describe(fields["detail"], response)
    if code in (401, 402, 403):
        return _account_error("submit", response, fields)
    if is_user_start_timeout(response):
        fields["error_type"] = fields["error_type"] or "start_timeout"
        return StartTimeoutError(f"fal submit: the start timeout expired (HTTP 504): {text}", **fields)
    if gateway_lost_answer(response, fields):
        return AmbiguousSubmitError(
            f"fal submit: the gateway answered HTTP {code} after the request was sent, so fal may "
            f"have queued it (the gateway lost its answer): {text}",
            **fields,
        )
    if code in TRANSIENT_CODES or code >= 500:
        where = "gateway" if is_ingress_error(response) else "fal"
        return RetryableProviderError(
            f"fal submit: not queued, {where} answered HTTP {code}: {text}",
            retry_after=_retry_after(response),
            **fields,
        )
    if code == 422:
        return FinalProviderError(f"fal submit: input rejected (HTTP 422): {text}", **fields)
    return FinalProviderError(f"fal submit: refused (HTTP {code}): {text}", **fields)


def classify_poll(what: str, response: httpx.Response) -> ProviderError:
    """The error for a non-2xx answer to a status GET (safe to repeat)."""
    redirected = redirect_error(what, response)
    if redirected is not None:
        return redirected
    fields = _fields(response)
    code = response.status_code
    text = _describe(fields["detail"], response)
    if code in (401, 402, 403):
        return _account_error(what, response, fields)
    if code in TRANSIENT_CODES or code >= 500:
        return RetryableProviderError(
            f"fal {what}: HTTP {code}: {text}", retry_after=_retry_after(response), **fields
        )
    if code == 404:
        return FinalProviderError(f"fal {what}: request not found (HTTP 404): {text}", **fields)
    return FinalProviderError(f"fal {what}: HTTP {code}: {text}", **fields)


def poll_should_retry(response: httpx.Response) -> bool:
    """Whether a status GET answer is a transient infrastructure hiccup worth asking again."""
    return response.status_code in TRANSIENT_CODES or response.status_code >= 500


def result_should_retry(response: httpx.Response) -> bool:
    """Whether a result GET answer is transient. A 5xx that carries fal's error type (or comes
    from fal's app, with ``x-fal-request-id``) is the model's replayed failure, not a hiccup."""
    if response.status_code in TRANSIENT_CODES:
        return True
    return is_ingress_error(response) and "x-fal-error-type" not in response.headers


def classify_result(response: httpx.Response) -> ProviderError:
    """The error for a non-2xx answer to the result GET: not ready, expired, or the replayed failure."""
    redirected = redirect_error("result", response)
    if redirected is not None:
        return redirected
    fields = _fields(response)
    code = response.status_code
    detail = fields["detail"]
    error_type = fields["error_type"]
    text = _describe(detail, response)
    if code in (401, 402, 403) and error_type is None:
        return _account_error("result", response, fields)
    if code == 404 and error_type is None:
        return ResultExpiredError(f"fal result expired or unknown (HTTP 404): {text}", **fields)
    if (
        400 <= code < 500
        and code != 422
        and error_type is None
        and isinstance(detail, str)
        and _NOT_READY.search(detail)
    ):
        return ResultNotReadyError(f"fal result not ready (HTTP {code}): {text}", **fields)
    override = _retryable_header(response)
    if error_type is None and override is None and (code in TRANSIENT_CODES or code >= 500):
        # The result *call* failed (rate limit, gateway, a server error that does not say what
        # became of the request): nothing is known about the request, so ask again. fal's own
        # verdict carries an error type (https://fal.ai/docs/documentation/model-apis/request-errors),
        # and a failed request's COMPLETED status carries its error.
        where = "the gateway answered " if is_ingress_error(response) else ""
        return RetryableProviderError(
            f"fal result: {where}HTTP {code}: {text}", retry_after=_retry_after(response), **fields
        )

    if error_type in CANCELLED_ERROR_TYPES:
        cls: type[ProviderError] = RequestCancelledError
        message = f"fal request cancelled ({error_type}, HTTP {code}): {text}"
    elif error_type in RETRYABLE_ERROR_TYPES or (error_type or "").startswith("runner_"):
        cls = RequestFailedError
        message = f"fal infrastructure failure ({error_type}, HTTP {code}), a new attempt may succeed: {text}"
    elif error_type is None and code >= 500:  # only with X-Fal-Retryable: fal's app speaking
        cls = RequestFailedError
        message = f"fal model failed (HTTP {code}), server errors are not billed: {text}"
    elif code == 422:
        cls = FinalProviderError
        message = f"fal model rejected the input (HTTP 422): {text}"
    else:
        kind = f"{error_type}, " if error_type else ""
        cls = FinalProviderError
        message = f"fal request failed ({kind}HTTP {code}): {text}"
    if override is True and not issubclass(cls, RetryableProviderError):
        cls = RequestFailedError
        message += " [X-Fal-Retryable: true]"
    elif override is False and issubclass(cls, RetryableProviderError):
        cls = FinalProviderError
        message += " [X-Fal-Retryable: false]"
    return cls(message, **fields)


def status_failure(error: str | None, error_type: str | None) -> ProviderError:
    """fal's verdict from a ``COMPLETED`` status that carries ``error``/``error_type``, classified
    as :func:`classify_result` would classify the replayed error: used when the result itself
    (with the full detail) cannot be fetched. fal documents that such a request failed."""
    error_type = error_type_or_none(error_type)
    text = _short(error or error_type or "no detail")
    fields: dict[str, Any] = {"error_type": error_type, "detail": error}
    if error_type in CANCELLED_ERROR_TYPES:
        return RequestCancelledError(f"fal request cancelled ({error_type}): {text}", **fields)
    if error_type in RETRYABLE_ERROR_TYPES or (error_type or "").startswith("runner_"):
        return RequestFailedError(
            f"fal infrastructure failure ({error_type}), a new attempt may succeed: {text}", **fields
        )
    kind = f" ({error_type})" if error_type else ""
    return FinalProviderError(f"fal request failed{kind}: {text}", **fields)


# ------------------------------------------------------------------ transport errors, mapped once


class SendTrace:
    """httpcore's ``trace`` extension for one request: which phases of sending it began or ended.

    Pass it as ``extensions={"trace": trace}``. Transports that do not report
    (``httpx.MockTransport``) leave it empty, and the mapping then falls back on what the
    exception's type says.
    """

    def __init__(self) -> None:
        self.events: list[str] = []

    def __call__(self, name: str, info: Mapping[str, Any]) -> None:
        self.events.append(name)

    @property
    def traced(self) -> bool:
        return bool(self.events)

    @property
    def body_sent(self) -> bool:
        """Whether every byte of the request was handed to the network (``*.send_request_body.complete``).

        Through an HTTP proxy's tunnel, the ``CONNECT`` request is traced too, its (empty) body
        "complete" before our request was even begun: only what follows the TLS handshake inside
        the tunnel (``proxy.start_tls``) is this request's. A proxy that refused the tunnel left
        nothing of it sent."""
        events = self.events
        for at in range(len(events) - 1, -1, -1):
            if events[at].startswith("proxy.start_tls."):
                events = events[at + 1 :]
                break
        return any(name.endswith("send_request_body.complete") for name in events)


@contextmanager
def map_transport_errors(what: str, *, submit: SendTrace | None = None) -> Iterator[None]:
    """The one place where httpx's transport errors become wanbatch errors (``raise … from exc``).

    Modelled on httpx's own ``map_httpcore_exceptions``
    (https://github.com/encode/httpx/blob/master/httpx/_transports/default.py): every call that
    talks to fal or its CDN runs inside it, and no caller repeats a ``try/except``.

    * An idempotent call (status, status stream, result, cancel, storage, download — ``submit``
      left ``None``): a transport failure is :class:`RetryableProviderError` (ask again later),
      except an unsupported URL scheme, a configuration error and final; httpx's
      ``TooManyRedirects`` is :class:`ProviderProtocolError`. Other exceptions pass.
    * The submit POST (``submit`` is the request's :class:`SendTrace`): *any* exception raised
      while sending means "not sent" or "ambiguous" depending on whether the body went out
      (:func:`_submit_failure`); fal can only queue a request whose body it received whole.
    """
    try:
        yield
    except Exception as exc:
        if malformed_redirect(exc):
            # First: httpx raises a RemoteProtocolError quoting the Location (a port made of
            # the key), or an InvalidURL, which is no HTTPError at all and escaped every caller
            # as an internal error (exit 70, on every run). An answer came: a redirect.
            raise _malformed_redirect_failure("submit" if submit is not None else what) from exc
        if submit is not None:
            raise _submit_failure(exc, submit) from exc
        if isinstance(exc, httpx.TransportError):
            raise _transport_failure(what, exc) from exc
        if isinstance(exc, httpx.TooManyRedirects):
            # Not a TransportError to httpx, so it escaped every caller as an internal error
            # (exit 70). The fal client follows no redirect; this keeps any call that does in
            # the provider's tree: an answer fal's protocol cannot produce.
            raise ProviderProtocolError(f"fal {what}: too many redirects, not followed") from exc
        raise


#: The start of httpx's message for a ``Location`` it cannot parse as a URL
#: (``Client._redirect_url``); the rest quotes the header, which a hostile host fills.
_BAD_LOCATION = "Invalid URL in location header"
#: httpx's functions that make a redirect's URL from its ``Location`` (``httpx._client``).
_REDIRECT_BUILDERS = frozenset({"_redirect_url", "_build_redirect_request"})


def malformed_redirect(exc: BaseException) -> bool:
    """Whether httpx raised ``exc`` making a redirect's target from a ``Location`` that is no
    usable URL. httpx builds the next request of every 3xx that has a Location, even when it
    follows none (``Response.next_request``): a location it cannot parse (``http://x:<text>/``)
    is a :class:`httpx.RemoteProtocolError` that quotes it; one without a host that is no path
    either (``data:text/plain,hi``, ``mailto:x``) an :class:`httpx.InvalidURL`, which is not
    even an :class:`httpx.HTTPError`. Another InvalidURL (a URL this process built) is not one."""
    if isinstance(exc, httpx.RemoteProtocolError):
        return str(exc).startswith(_BAD_LOCATION)
    if isinstance(exc, httpx.InvalidURL):
        frames = traceback.walk_tb(exc.__traceback__)
        return any(frame.f_code.co_name in _REDIRECT_BUILDERS for frame, _ in frames)
    return False


def _malformed_redirect_failure(what: str) -> ProviderError:
    """A redirect whose location is no URL (:func:`malformed_redirect`), told without its text
    (the server's, and it may hold anything, the key among it).

    The same verdict as for any redirect from fal's API (:func:`redirect_error`): an answer its
    protocol cannot produce, asked again a bounded number of times; to a download it is final
    (a redirect that leads nowhere will not lead anywhere next time); to the submit POST a
    refusal, as :func:`classify_submit` takes any 3xx."""
    if what == "download":
        return FinalProviderError("fal download: refusing a malformed redirect (its location is no URL)")
    if what == "submit":
        return FinalProviderError("fal submit: refused, a redirect to a malformed location, not followed")
    return ProviderProtocolError(
        f"fal {what}: redirect to a malformed location, not followed (fal's API does not redirect)"
    )


def _transport_failure(what: str, exc: httpx.TransportError) -> RetryableProviderError | FinalProviderError:
    """A transport failure on an idempotent call: try again later; an unsupported URL is final.
    A proxy's failure, or a certificate that does not verify, is said as such
    (:func:`transport_words`): the proxy by its host and port, the CA bundle by its variable."""
    if isinstance(exc, httpx.UnsupportedProtocol):
        return FinalProviderError(f"fal {what}: unsupported URL ({type(exc).__name__})")
    return RetryableProviderError(f"fal {what}: network error {transport_words(exc)}")


def transport_words(exc: BaseException) -> str:
    """What a transport error says, in one line, with its cause named when it is a setting's:
    ``the proxy 127.0.0.1:3128 (HTTPS_PROXY) answered 502 Bad Gateway: it could not reach
    queue.fal.run:443`` (:func:`~worker.fal.proxy_failure.proxy_failure`), ``(ConnectError):
    certificate verification failed (…) against SSL_CERT_FILE (/etc/corp-ca.pem): …``
    (:func:`~worker.fal.proxy_failure.certificate_words`), else ``(ConnectError): [Errno 111]
    Connection refused`` as before. Never a proxy's credentials."""
    name = type(exc).__name__
    proxy = proxy_failure(exc)
    if proxy is not None:
        return f"({name}): {proxy.describe(target_of(exc))}"
    certificate = certificate_words(exc)
    if certificate is not None:
        return f"({name}): {_short(certificate)}"
    return f"({name}): {_short(str(exc))}"


def _submit_transport_failure(exc: httpx.TransportError) -> WanbatchError:
    """A transport failure on the submit POST, judged by its type alone: was the request possibly sent?

    Connect errors and pool timeouts happen before a byte of the request leaves: fal was not
    reached, which is no submission (:class:`FalUnreachableError`: not counted as an attempt).
    So is a proxy that did not open the tunnel (:class:`httpx.ProxyError`: its ``CONNECT``
    answered 502, as Squid does when it cannot reach fal, or 407, a SOCKS refusal): the
    request never left this host, and the process holds its submits as for any outage. A 407
    (or 403) is the proxy's setting, not an outage, but holding is still right: nothing is sent
    or billed, the line says which proxy and what to set (``the proxy 10.0.0.5:3128
    (HTTPS_PROXY) answered 407 Proxy Authentication Required: set its user:password in
    HTTPS_PROXY``, in the log every 30 s, the progress line and ``status``), the jobs already
    at fal are collected as soon as the proxy lets the calls through, and a refusal fixed on the
    proxy's side (a locked account unlocked, a rule added) resumes the batch without a restart;
    failing the jobs would spend every attempt of the batch in seconds on a network error that
    is none. Once the request may have been written (write/read timeouts, resets, protocol
    errors), fal may have queued it: ambiguous, never resent blindly.
    """
    name = type(exc).__name__
    if could_not_connect(exc) and (short := out_of_files(exc)) is not None:  # not fal's doing
        return FalUnreachableError(f"fal submit: not sent, could not connect: {short[0]}: {short[1]}")
    proxy = proxy_failure(exc) if isinstance(exc, (*UNREACHED, httpx.ProxyError)) else None
    if proxy is not None and (could_not_connect(exc) or isinstance(exc, httpx.ProxyError)):
        return FalUnreachableError(
            f"fal submit: not sent, could not connect ({name}): {proxy.describe(target_of(exc))}"
        )
    if could_not_connect(exc):
        return FalUnreachableError(f"fal submit: not sent, could not connect ({name}): {_short(str(exc))}")
    if isinstance(exc, UNREACHED):  # TLS refused fal's certificate or handshake: a counted retry
        return RetryableProviderError(f"fal submit: not sent, TLS failed {transport_words(exc)}")
    if isinstance(exc, httpx.ProxyError):  # a proxy this process could not tell (no frame of it)
        return FalUnreachableError(f"fal submit: not sent, could not connect ({name}): {_short(str(exc))}")
    if isinstance(exc, httpx.UnsupportedProtocol):
        return FinalProviderError(f"fal submit: unsupported URL ({name})")
    return AmbiguousSubmitError(
        f"fal submit: the request may have been accepted but no answer came back ({name}): {_short(str(exc))}"
    )


def _submit_failure(exc: Exception, trace: SendTrace) -> WanbatchError:
    """What an exception raised while sending the submit POST means: not sent, or ambiguous.

    fal can only queue a request whose body it received whole. When the transport traced the
    send and the body never completed, nothing was queued — whatever the exception (a write
    error, a reset, a refused header). Only once the body went out is a lost answer ambiguous.
    """
    name = type(exc).__name__
    local = isinstance(exc, httpx.LocalProtocolError) or not isinstance(exc, httpx.HTTPError)
    if trace.traced and not trace.body_sent:
        if local:
            return SubmitNotSentError(f"fal submit: not sent, failed in this process ({name}): {exc}")
        translated = _submit_transport_failure(exc) if isinstance(exc, httpx.TransportError) else None
        if translated is None or isinstance(translated, AmbiguousSubmitError):
            return RetryableProviderError(
                f"fal submit: not sent, the connection failed before the request was written ({name}): {exc}"
            )
        return translated
    if trace.body_sent:
        if isinstance(exc, httpx.TransportError):
            return _submit_transport_failure(exc)
        return AmbiguousSubmitError(
            f"fal submit: the request was sent but its answer could not be read ({name}): {exc}"
        )
    # An untraced transport: only the exception's type can tell.
    if local:
        return SubmitNotSentError(f"fal submit: not sent, failed in this process ({name}): {exc}")
    if isinstance(exc, httpx.TransportError):
        return _submit_transport_failure(exc)
    return AmbiguousSubmitError(f"fal submit: the answer could not be read ({name}): {exc}")
