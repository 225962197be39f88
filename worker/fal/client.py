"""fal's queue protocol over httpx: submit, status (poll or SSE), result, cancel.

Retry policy, in one place:

* ``submit`` is **never** retried here. fal documents no idempotency key, and a POST resent
  after a read timeout can queue (and bill) the same job twice — which fal_client does. Its
  errors tell the caller exactly what happened (see :mod:`worker.fal.errors`), and a failure
  *before the whole request was written* is never called ambiguous: httpcore's ``trace``
  extension reports when the body was sent, and until then nothing can have been queued
  (:class:`SubmitNotSentError`, or a retryable "not sent").
* ``status`` and ``result`` are idempotent GETs: they retry transport errors, 408/409/429 and
  gateway 5xx a few times with jittered backoff (:class:`RetryPolicy`) and then raise
  :class:`RetryableProviderError`; the caller's own polling loop is the outer retry.
* ``stream_status`` and ``cancel`` are not retried: a broken stream falls back to polling, and a
  cancel is a one-off decision the caller may repeat.

The client knows nothing of the database; it takes and returns plain values. Every error
and every body it hands back has the key scrubbed out (recursively, through ``detail`` lists),
so nothing a provider echoes can reach the database, ``status`` or an export. Every one of
them is also storable as it is: a ``\\u0000``, a lone surrogate or ``NaN`` in fal's answer, which
PostgreSQL would refuse on every try, is read as U+FFFD or null (:func:`~worker.fal.errors.load_json`).

Every answer's body is read through :func:`read_capped`: at most :data:`MAX_ANSWER_BYTES`, and
whole within the read timeout once its headers are in (:class:`AnswerBudget`). The whole
exchange (connect, request, headers, body) ends within the connect timeout plus twice the read
timeout (:meth:`AnswerBudget.exchange`): httpx's timeouts bound each read, so headers dripped a
byte at a time held a call, and the job it served, without end. A submit answer that cannot be
read so is ambiguous: fal received the request.

Status, result and cancel go to URLs built from the configured queue URL (see
:meth:`RequestHandle.trusted`), never to a host a submit answer names: those calls carry the key.
No call follows a redirect: fal's API answers directly, so a 3xx is an answer its protocol
cannot produce (:func:`~worker.fal.errors.redirect_error`), never a hop to an unchecked host.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from types import TracebackType
from typing import Any, Literal

import httpx
import httpx_sse

from jobs.digits import ascii_int
from jobs.errors import (
    AmbiguousSubmitError,
    ProviderError,
    RetryableProviderError,
    UsageError,
    WanbatchError,
)
from jobs.key_forms import holds_known_key
from jobs.settings import FalSettings
from jobs.url_secrets import masked_url
from worker import telemetry
from worker.fal.errors import (
    ProviderProtocolError,
    SendTrace,
    SubmitNotSentError,
    classify_poll,
    classify_result,
    classify_submit,
    error_type_or_none,
    json_body,
    load_json,
    map_transport_errors,
    parse_body,
    poll_should_retry,
    result_should_retry,
)
from worker.fal.http import (
    DEFAULT_SLEEP,
    Cutoff,
    FalKeyAuth,
    RetryPolicy,
    Sleep,
    build_http_client,
    cut_off_at,
    decoded_chunks,
    shared_ssl_context,
    timeout_from,
    with_body,
)
from worker.fal.models import (
    QUEUE_STATES,
    CancelOutcome,
    QueueState,
    RequestHandle,
    Status,
    Submitted,
    request_id_or_none,
    valid_request_id,
)
from worker.fal.redact import redact_json, redact_value
from worker.fal.sse import event_data

log = logging.getLogger(__name__)

Priority = Literal["normal", "low"]
HandleLike = RequestHandle | Submitted


def _handle(value: HandleLike) -> RequestHandle:
    return value.handle if isinstance(value, Submitted) else value


@functools.lru_cache(maxsize=64)
def _parsed_url(url: str) -> httpx.URL:
    """``url`` parsed by httpx, once per URL: a submit's (the queue URL and the endpoint) is the
    same for every job of an endpoint, and httpx looks at a URL a character at a time (about 250
    Python calls each time). An :class:`httpx.URL` is immutable, so one can be shared; one that
    does not parse raises every time (:class:`httpx.InvalidURL`), never cached."""
    return httpx.URL(url)


def start_timeout_header(seconds: float) -> str:
    """``X-Fal-Request-Start-Timeout`` for ``seconds`` left before a window closes or a deadline
    passes: fixed-point, rounded *down* to the millisecond. The header bounds when fal may still
    start the request, so it must never say more than is left: ``f"{s:g}"`` rounded to six
    significant digits (123456.78 s went out as ``123457``, 9,999,995 s as ``1e+07``, five seconds
    past the deadline) and wrote exponent forms fal documents nowhere (it says "number"; its own
    client sends ``str(float)``); trailing zeros are left off. fal refuses a value not above
    0.1 s, so none is sent."""
    if not math.isfinite(seconds):
        raise UsageError(f"fal start timeout must be a finite number of seconds, not {seconds!r}")
    millis = math.floor(seconds * 1000)
    if not millis > 100:
        raise UsageError(f"fal start timeout must be greater than 0.1 s, not {seconds!r}")
    return f"{millis // 1000}.{millis % 1000:03d}".rstrip("0").rstrip(".")


class FalClient:
    """A sync client for fal's queue API. Use as a context manager, or call :meth:`close`.

    ``key`` is sent as ``Authorization: Key …`` to the queue and REST origins only. The
    simulator needs none (``allow_missing_key=True`` in :meth:`from_settings`).
    """

    def __init__(
        self,
        *,
        queue_url: str,
        rest_url: str,
        key: str | None,
        timeout: httpx.Timeout,
        transport: httpx.BaseTransport | None = None,
        retry: RetryPolicy | None = None,
        sleep: Sleep = DEFAULT_SLEEP,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue_url = queue_url.rstrip("/")
        self.rest_url = rest_url.rstrip("/")
        self._key = key
        self._auth = FalKeyAuth(key, [self.queue_url, self.rest_url])
        self._timeout = timeout
        self._transport = transport
        self._http: httpx.Client | None = None
        self._streams_http: httpx.Client | None = None
        self._http_lock = threading.Lock()
        self._closed = False
        # The certificate variables now (one httpx cannot load is a ConfigError before anything
        # is claimed); the proxy variables when fal is first called (:attr:`http`).
        shared_ssl_context()
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        # The read timeout bounds each read; a body dripped a byte at a time never trips it, so
        # the same number of seconds also bounds the whole answer (:func:`read_capped`), and
        # the connect timeout plus twice that the whole exchange, headers included.
        self._answer_budget = AnswerBudget(timeout.read, clock, connect=timeout.connect)

    @classmethod
    def from_settings(
        cls,
        settings: FalSettings,
        *,
        key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        allow_missing_key: bool = False,
        retry: RetryPolicy | None = None,
        sleep: Sleep = DEFAULT_SLEEP,
    ) -> FalClient:
        """A client configured from :class:`FalSettings`; a missing FAL_KEY is a ConfigError unless
        ``allow_missing_key`` (the simulator), in which case any configured key is still sent."""
        if key is None:
            if allow_missing_key:
                key = settings.fal_key.get_secret_value() if settings.fal_key else None
            else:
                key = settings.require_fal_key()
        return cls(
            queue_url=settings.fal_queue_url,
            rest_url=settings.fal_rest_url,
            key=key or None,
            timeout=timeout_from(settings),
            transport=transport,
            retry=retry,
            sleep=sleep,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(queue_url={masked_url(self.queue_url)!r}, "
            f"rest_url={masked_url(self.rest_url)!r}, "
            f"key={'set' if self._key else 'unset'})"
        )

    @property
    def http(self) -> httpx.Client:
        """The HTTP client to fal (:func:`~worker.fal.http.build_http_client`), built when it is
        first used: a runtime that never calls fal (a ``run`` of a batch with nothing left to send
        there) reads no proxy variable, so one httpx cannot use refuses only what calls fal."""
        return self._http or self._built("_http")

    @property
    def streams_http(self) -> httpx.Client:
        """The HTTP client of the status streams: built as :attr:`http` is, with a pool of its own.

        A stream holds its connection for as long as its request runs at fal, so with the
        streams in the one pool every submit, result and cancel made httpcore look at all of
        them (and at each idle one again for each idle one) twice: about 500 Python calls a
        job at 8 jobs at fal. Apart, the calls that end quickly share a pool of a few
        connections, and the streams one of about as many as they are."""
        return self._streams_http or self._built("_streams_http")

    def _built(self, attr: Literal["_http", "_streams_http"]) -> httpx.Client:
        with self._http_lock:
            client: httpx.Client | None = getattr(self, attr)
            if client is None:
                client = build_http_client(
                    timeout=self._timeout,
                    auth=self._auth,
                    transport=self._transport,
                    direct=[self.queue_url, self.rest_url],
                )
                if self._closed:  # closed before its first use: closed all the same
                    client.close()
                setattr(self, attr, client)
            return client

    @property
    def timeout(self) -> httpx.Timeout:
        """The timeouts of its calls (those of :attr:`http`, without building it)."""
        return self._timeout

    def close(self) -> None:
        with self._http_lock:
            self._closed = True
            clients = (self._http, self._streams_http)
        for client in clients:
            if client is not None:
                client.close()

    def __enter__(self) -> FalClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def keys(self) -> tuple[str, ...]:
        """The key this client sends (none: empty), for a check of what fal's answers name
        (:class:`worker.fal.storage.DownloadPolicy`); never shown."""
        return (self._key,) if self._key else ()

    def holds_key(self, text: str) -> bool:
        """Whether ``text`` (a URL fal's answer names) holds this client's key, or one this
        process knows, in any form (:func:`jobs.key_forms.contains_key`)."""
        return holds_known_key(text, self.keys())

    def scrub(self, value: Any) -> Any:
        """``value`` (text, or JSON from fal) with the key masked wherever it appears."""
        return redact_value(value, [self._key] if self._key else [])

    def scrub_json(self, value: Any, text: str) -> Any:
        """:meth:`scrub` of ``value``, parsed from the JSON ``text`` fal sent: the text is looked
        at for the key rather than ``value`` rendered again (:func:`~jobs.redaction.redact_json`)."""
        return redact_json(value, text, [self._key] if self._key else [])

    @contextmanager
    def scrubbed(self) -> Iterator[None]:
        """No error leaving the client may carry the key, whatever fal echoed: its message and
        every provider-derived field (:meth:`_scrub_error`) are scrubbed here, before any
        caller can store or print them."""
        try:
            yield
        except WanbatchError as err:
            err.args = tuple(self.scrub(a) for a in err.args)
            if isinstance(err, ProviderError):
                self._scrub_error(err)
            raise

    def _scrub_error(self, err: ProviderError) -> None:
        """Mask the key in every field of ``err`` that fal's answer filled in: ``detail`` (a
        string, or FastAPI's list of field errors, walked recursively) is masked in place;
        ``error_type`` and ``request_id`` end up in the database, in ``status``, exports and
        metrics labels as they are, so one that held the key is dropped, not stored masked."""
        err.detail = self.scrub(err.detail)
        err.error_type = self._token(error_type_or_none(err.error_type))
        err.request_id = self._token(request_id_or_none(err.request_id))

    def _token(self, value: str | None) -> str | None:
        """``value`` unless the key is in it (then None: a name with ``***`` inside names nothing)."""
        return value if value is None or self.scrub(value) == value else None

    def handle(self, endpoint_id: str, request_id: str) -> RequestHandle:
        """The handle of a request submitted earlier (e.g. before a worker restart)."""
        return RequestHandle.from_request_id(self.queue_url, endpoint_id, request_id)

    # ------------------------------------------------------------------ submit

    def submit(
        self,
        endpoint_id: str,
        input: Mapping[str, Any],
        *,
        webhook_url: str | None = None,
        priority: Priority | None = None,
        start_timeout: float | None = None,
        store_io: bool | None = None,
        object_lifecycle: Mapping[str, Any] | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Submitted:
        """Queue one request. Sent exactly once: see the module docstring.

        Raises :class:`RetryableProviderError` (not queued; try later),
        :class:`FinalProviderError`/:class:`AccountLockedError` (refused) or
        :class:`AmbiguousSubmitError` (may be queued; do not resend blindly).
        """
        headers = self._submit_headers(priority, start_timeout, store_io, object_lifecycle, extra_headers)
        url = f"{self.queue_url}/{endpoint_id.strip('/')}"
        params = {"fal_webhook": webhook_url} if webhook_url else None
        trace = SendTrace()
        with self.scrubbed():
            if self.http.is_closed:
                raise SubmitNotSentError("fal submit: not sent, the HTTP client is closed")
            try:
                request = self.http.build_request(
                    "POST",
                    _parsed_url(url),
                    json=dict(input),
                    params=params,
                    headers=headers,
                    extensions={"trace": trace},
                )
            except Exception as exc:  # an input that is not JSON, a malformed URL: nothing left
                raise SubmitNotSentError(
                    f"fal submit: not sent, the request could not be built ({type(exc).__name__}: {exc})"
                ) from exc
            with (
                map_transport_errors("submit", submit=trace),
                telemetry.fal_request("submit") as call,
                self._answer_budget.exchange("submit"),
            ):
                answer = self._read_submit_answer(call.done(self.http.send(request, stream=True)))
            if isinstance(answer, ProviderError):
                raise AmbiguousSubmitError(
                    f"{answer}; the request may be queued", status_code=answer.status_code
                ) from answer
            response = answer
            if not response.is_success:
                raise classify_submit(response)
            try:
                return self._parse_submitted(endpoint_id, response)
            except WanbatchError:
                raise
            except Exception as exc:  # fal answered 2xx: whatever broke, it may be queued
                raise AmbiguousSubmitError(
                    f"fal submit: HTTP {response.status_code}, but the answer could not be read "
                    f"({type(exc).__name__}); the request may be queued",
                    status_code=response.status_code,
                ) from exc

    def _read_submit_answer(self, streamed: httpx.Response) -> httpx.Response | ProviderError:
        """The submit answer read like every other (:func:`read_capped`: at most
        :data:`MAX_ANSWER_BYTES`, within the answer budget), or the error saying why it was not.

        Returned, not raised: raised inside :func:`map_transport_errors` it would be judged by
        its type alone. Whatever the status line said, fal received the whole request, so an
        answer that cannot be read leaves it possibly queued (ambiguous, never resent)."""
        try:
            return read_capped(streamed, "submit", budget=self._answer_budget)
        except ProviderError as unread:
            return unread
        finally:
            streamed.close()

    @staticmethod
    def _submit_headers(
        priority: Priority | None,
        start_timeout: float | None,
        store_io: bool | None,
        object_lifecycle: Mapping[str, Any] | None,
        extra_headers: Mapping[str, str] | None,
    ) -> dict[str, str]:
        headers: dict[str, str] = {}
        if priority is not None:
            if priority not in ("normal", "low"):
                raise UsageError(f"fal queue priority must be 'normal' or 'low', not {priority!r}")
            headers["X-Fal-Queue-Priority"] = priority
        if start_timeout is not None:
            headers["X-Fal-Request-Start-Timeout"] = start_timeout_header(start_timeout)
        if store_io is not None:
            headers["X-Fal-Store-IO"] = "1" if store_io else "0"
        if object_lifecycle is not None:
            headers["X-Fal-Object-Lifecycle-Preference"] = json.dumps(dict(object_lifecycle))
        for name, value in (extra_headers or {}).items():
            if name.lower() != "authorization":  # the key is added by FalKeyAuth, nowhere else
                headers[name] = value
        return headers

    def _parse_submitted(self, endpoint_id: str, response: httpx.Response) -> Submitted:
        """The accepted submit, read from the answer with the key masked: every field of it may
        be stored (``gateway_request_id`` in the job and its sidecar), so none may carry the key."""
        raw = parse_body(response)
        body = self.scrub(raw)
        request_id = body.get("request_id") if isinstance(body, dict) else None
        if not isinstance(body, dict) or not isinstance(request_id, str) or not request_id:
            # fal said yes, to something we cannot identify: it may be queued and billed.
            raise AmbiguousSubmitError(
                f"fal submit: HTTP {response.status_code} without a request id; the request may be queued",
                status_code=response.status_code,
                request_id=self._token(request_id_or_none(response.headers.get("x-fal-request-id"))),
            )
        if isinstance(raw, dict) and raw.get("request_id") != request_id:  # masked: it held the key
            raise AmbiguousSubmitError(
                f"fal submit: HTTP {response.status_code} with a request id that holds the API key; "
                "the request may be queued",
                status_code=response.status_code,
            )
        if not valid_request_id(request_id):
            raise AmbiguousSubmitError(
                f"fal submit: HTTP {response.status_code} with a request id that cannot name a request "
                "in a URL; the request may be queued",
                status_code=response.status_code,
            )
        given = {name: body.get(name) for name in ("status_url", "response_url", "cancel_url")}
        handle = RequestHandle.trusted(
            self.queue_url,
            endpoint_id,
            request_id,
            **{name: value if isinstance(value, str) else None for name, value in given.items()},
        )
        if any(isinstance(v, str) and v != getattr(handle, k) for k, v in given.items()):
            log.warning(
                "fal submit %s: the answer's status/result/cancel URLs are not under %s; using %s",
                request_id,
                self.queue_url,
                handle.status_url,
                extra={"event": "fal.foreign_urls", "request_id": request_id},
            )
        state = body.get("status", "IN_QUEUE")
        position = body.get("queue_position")
        gateway = body.get("gateway_request_id")
        return Submitted(
            handle=handle,
            status=state if state in QUEUE_STATES else "IN_QUEUE",
            queue_position=position if isinstance(position, int) else None,
            gateway_request_id=self._token(request_id_or_none(gateway)),
        )

    # ------------------------------------------------------------------ status

    def status(self, handle: HandleLike, *, logs: bool = False) -> Status:
        """One status poll (202 while queued/running, 200 when COMPLETED; parsed from the body)."""
        h = _handle(handle)
        with self.scrubbed():
            response = self.send_idempotent(
                "GET",
                "status",
                h.status_url,
                params={"logs": "1" if logs else "0"},
                should_retry=poll_should_retry,
                classify=lambda r: classify_poll("status", r),
            )
            return _parse_status(self.scrub(json_body(response, "status")), h.request_id)

    def stream_status(
        self,
        handle: HandleLike,
        *,
        logs: bool = False,
        stop: Callable[[], bool] | None = None,
        states: Collection[str] | None = None,
    ) -> Iterator[Status]:
        """Statuses as fal pushes them over SSE, ending with (and including) COMPLETED.

        A stream that breaks or ends early raises :class:`RetryableProviderError`: poll instead.
        So does one that breaks a bound (:func:`worker.fal.sse.event_data`: an event over
        :data:`~worker.fal.sse.MAX_EVENT_BYTES`, the stream over
        :data:`~worker.fal.sse.MAX_STREAM_BYTES`, as :class:`ProviderProtocolError`; an event not
        whole within the read timeout): what it sent is dropped, never held.

        A consumer that asks for more after COMPLETED lets the stream be read to its end (fal
        closes the stream after COMPLETED, https://fal.ai/docs/inference-api/queue/status-stream),
        so its connection goes back to the pool: a response closed unread
        takes its connection with it, and every stream then paid a new TCP connection and TLS
        handshake (more CPU than the rest of the stream). A consumer that stops at COMPLETED
        closes the connection instead, as before.

        ``stop``: asked at every chunk the stream sends (keep-alives included); once it says
        True the statuses end there, without an error, and the connection is closed: the caller
        no longer needs the stream (its request was found ended another way, or it closed).

        ``states``: only statuses in these states are yielded, and COMPLETED, which ends the
        stream (None: every one). An event of another state is still read and checked — JSON, an
        object, a state fal has — and then left, neither masked nor made a :class:`Status`: a
        queued request's stream says little but its place in the queue, each time it moves.
        """
        h = _handle(handle)
        url = f"{h.status_url.rstrip('/')}/stream"
        query = {"logs": "1" if logs else "0"}
        if "?" not in url and "#" not in url:
            # The same request URL as with ``params``, parsed once rather than twice (httpx parses
            # it again to merge parameters in, a character at a time).
            url, params = f"{url}?logs={query['logs']}", None
        else:
            params = query
        with self.scrubbed(), map_transport_errors("status stream"), ExitStack() as held:
            # The headers within the exchange's deadline; the stream has no end, so its events
            # are bounded one by one (_stream_events), not by it. Entered and left before any
            # yield: the deadline never outlives this step of the generator.
            with self._answer_budget.exchange("status stream"):
                source = held.enter_context(
                    httpx_sse.connect_sse(self.streams_http, "GET", url, params=params)
                )
            response = source.response
            if not response.is_success:
                raise classify_poll(
                    "status stream",
                    read_capped(response, "status stream", budget=self._answer_budget),
                )
            content_type = response.headers.get("content-type", "").partition(";")[0]
            if "text/event-stream" not in content_type:
                raise RetryableProviderError(
                    f"fal status stream: not an event stream (Content-Type {content_type[:60]!r})",
                    request_id=h.request_id,
                )
            events = self._stream_events(response, stop)
            for data in events:
                if not data.strip():
                    continue
                body = load_json(data, "status stream")
                if body is None:
                    raise RetryableProviderError(
                        "fal status stream: an event was not JSON", request_id=h.request_id
                    )
                if states is not None and isinstance(body, dict):
                    state = body.get("status")
                    if state in QUEUE_STATES and state != "COMPLETED" and state not in states:
                        continue  # a known state the caller does not follow: checked, and left
                status = _parse_status(self.scrub_json(body, data), h.request_id)
                yield status
                if status.completed:
                    _read_to_end(events)
                    return
            if stop is not None and stop():
                return  # let go by the caller: the connection closes, unread
            raise RetryableProviderError(
                "fal status stream ended before COMPLETED; poll the status instead", request_id=h.request_id
            )

    def _stream_events(
        self, response: httpx.Response, stop: Callable[[], bool] | None = None
    ) -> Iterator[str]:
        """The data of each event of a status stream, each event and the stream bounded
        (:func:`worker.fal.sse.event_data`); an encoding that does not decode is a protocol error."""
        try:
            chunks = decoded_chunks(response)
            yield from event_data(
                chunks if stop is None else _until(stop, chunks),
                what="status stream",
                seconds=self._answer_budget.seconds,
                clock=self._answer_budget.clock,
            )
        except httpx.DecodingError as exc:
            raise _undecodable("status stream", response, exc) from None

    # ------------------------------------------------------------------ result

    def result(self, handle: HandleLike) -> dict[str, Any]:
        """The model's output JSON (integers parsed exactly: seeds may exceed 2**53).

        Raises :class:`~worker.fal.errors.ResultNotReadyError` before completion,
        :class:`~worker.fal.errors.ResultExpiredError` when fal no longer has it, and the
        model's replayed failure classified by ``error_type`` otherwise.
        """
        h = _handle(handle)
        with self.scrubbed():
            response = self.send_idempotent(
                "GET",
                "result",
                h.response_url,
                params=None,
                should_retry=result_should_retry,
                classify=classify_result,
            )
            body = self.scrub(json_body(response, "result"))
            if body is None and response.content.strip() != b"null":  # not JSON: a gateway's page
                raise RetryableProviderError(
                    f"fal result: HTTP {response.status_code} with a body that is not JSON",
                    status_code=response.status_code,
                    request_id=h.request_id,
                )
            if not isinstance(body, dict):
                # JSON, but `null`, a list, a number: no result fal makes. Asked again a few times
                # (WANBATCH_DOWNLOAD_ATTEMPTS), then the job fails, as for any malformed result —
                # not retried for the hour fal keeps results, as a passing gateway glitch is.
                raise ProviderProtocolError(
                    f"fal result: HTTP {response.status_code} with a body that is not a JSON object "
                    f"(a {type(body).__name__})",
                    status_code=response.status_code,
                    request_id=h.request_id,
                )
            return body

    # ------------------------------------------------------------------ cancel

    def cancel(self, handle: HandleLike) -> CancelOutcome:
        """Ask fal to cancel. Free while IN_QUEUE; best effort once running. Not retried."""
        h = _handle(handle)
        with self.scrubbed():
            with (
                map_transport_errors("cancel"),
                telemetry.fal_request("cancel") as call,
                self._answer_budget.exchange("cancel"),
                self.http.stream("PUT", h.cancel_url) as streamed,
            ):
                response = read_capped(call.done(streamed), "cancel", budget=self._answer_budget)
            body = parse_body(response)
            said = body.get("status") if isinstance(body, dict) else None
            if response.is_success:
                if said == "ALREADY_COMPLETED":
                    return CancelOutcome.ALREADY_COMPLETED
                if said == "NOT_FOUND":
                    return CancelOutcome.NOT_FOUND
                return CancelOutcome.REQUESTED
            if response.status_code == 404:
                return CancelOutcome.NOT_FOUND
            detail = body.get("detail") if isinstance(body, dict) else None
            if response.status_code == 400 and (said == "ALREADY_COMPLETED" or isinstance(detail, str)):
                return CancelOutcome.ALREADY_COMPLETED
            raise classify_poll("cancel", response)

    # ------------------------------------------------------------------ plumbing

    def send_idempotent(
        self,
        method: str,
        what: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        should_retry: Callable[[httpx.Response], bool] = poll_should_retry,
        classify: Callable[[httpx.Response], ProviderError] | None = None,
        via: httpx.Client | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send a request that is safe to repeat, with the bounded retry of :class:`RetryPolicy`.

        Returns a 2xx response or raises the classified error of the last try (scrubbed of the
        key: storage uploads come through here too). Only for calls whose repetition cannot
        queue or bill anything twice (never the submit POST).

        Redirects are never followed (a 3xx is an error, see the module docstring).
        ``via``: another client to send it through: a storage upload's PUT goes to a host
        fal's answer names, through the address guard of
        :func:`worker.fal.storage.guarded_client`, without the key.
        """
        with self.scrubbed():
            return self._send_with_retry(method, what, url, params, should_retry, classify, via, kwargs)

    def _send_with_retry(
        self,
        method: str,
        what: str,
        url: str,
        params: Mapping[str, str] | None,
        should_retry: Callable[[httpx.Response], bool],
        classify: Callable[[httpx.Response], ProviderError] | None,
        via: httpx.Client | None,
        kwargs: dict[str, Any],
    ) -> httpx.Response:
        classify = classify or (lambda r: classify_poll(what, r))
        http = via or self.http
        attempts = max(1, self.retry.attempts)
        last: ProviderError | None = None
        for attempt in range(attempts):
            try:
                with (
                    map_transport_errors(what),
                    telemetry.fal_request(what) as call,
                    # Connect, request, headers and body: all within the exchange's deadline.
                    self._answer_budget.exchange(what),
                    # Never followed: a 3xx is classified (see worker.fal.errors.redirect_error).
                    http.stream(method, url, params=params, follow_redirects=False, **kwargs) as streamed,
                ):
                    response = read_capped(call.done(streamed), what, budget=self._answer_budget)
            except RetryableProviderError as failure:  # a network error: ask again (a final one raises)
                last = failure
            else:
                if response.is_success:
                    return response
                error = classify(response)
                if not should_retry(response):
                    raise error
                last = error
            if attempt + 1 < attempts:
                delay = self.retry.delay(attempt)
                log.debug(
                    "fal %s: transient failure (%s), retrying in %.2fs",
                    what,
                    type(last).__name__,
                    delay,
                    extra={"event": "fal.retry"},
                )
                self._sleep(delay)
        assert last is not None
        raise last


#: The most of one answer from fal's queue and storage APIs (status, result, cancel, upload;
#: success or error) that is read. fal's answers are a few KiB; like the JWKS fetch
#: (:data:`worker.fal.webhooks.JWKS_MAX_BYTES`), a body without end must not fill the memory.
MAX_ANSWER_BYTES = 1024 * 1024


class AnswerBudget:
    """How long one answer's body may take to arrive whole, once its headers are in: ``seconds``
    (the client's read timeout, ``WANBATCH_READ_TIMEOUT``; ``None``: no bound) on ``clock``;
    and the whole exchange, from the connect to the body's end, ``connect`` (the connect
    timeout) plus twice ``seconds``, the time spent sending the request aside (:meth:`exchange`).

    httpx's read timeout bounds each read, not the answer: a body that sends one byte just
    inside it every time never ends, and held a job in ``downloading`` forever; headers dripped
    the same way did too (httpcore reads up to 100 KiB of them), before any body was read.
    """

    __slots__ = ("clock", "connect", "seconds")

    def __init__(
        self,
        seconds: float | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        connect: float | None = None,
    ) -> None:
        self.seconds = seconds
        self.clock = clock
        self.connect = connect

    def deadline(self) -> float | None:
        """When an answer whose reading starts now must be read whole."""
        return None if self.seconds is None else self.clock() + self.seconds

    def exchange_seconds(self) -> float | None:
        """The most one exchange may take, the sending of its request aside: the connect
        timeout, then the read timeout for the headers and once more for the body (``None``:
        no read timeout, no bound)."""
        return None if self.seconds is None else (self.connect or 0.0) + 2 * self.seconds

    def exchange(self, what: str) -> AbstractContextManager[Cutoff | None]:
        """A deadline (:func:`~worker.fal.http.cut_off_at`, real time: it bounds socket waits)
        over the exchange sent inside it, headers included: a wait past it fails as a read
        timeout would, saying which deadline it was.

        The time spent sending the request is not counted (``counts_sending=False``): an
        image upload of many MiB on a slow uplink takes as long as it takes while the host
        keeps reading it — each write still ends at the write timeout, ``WANBATCH_READ_TIMEOUT``
        — and the deadline bounds the connect and the answer, which a server cannot drip out
        past it."""
        seconds = self.exchange_seconds()
        if seconds is None:
            return cut_off_at(None, "")
        return cut_off_at(
            time.monotonic() + seconds,
            f"fal {what}: no whole answer within {seconds:g} s "
            "(WANBATCH_CONNECT_TIMEOUT + twice WANBATCH_READ_TIMEOUT), not counting the time spent "
            "sending the request",
            counts_sending=False,
        )


def read_capped(
    response: httpx.Response,
    what: str,
    limit: int = MAX_ANSWER_BYTES,
    *,
    budget: AnswerBudget | None = None,
) -> httpx.Response:
    """A copy of the streamed ``response`` with its body read, or :class:`ProviderProtocolError`
    when the body is over ``limit`` bytes (decoded; the rest is left unread) or cannot be
    decoded, or :class:`RetryableProviderError` when it is not read whole within ``budget`` (the
    caller's usual retry of a failed call applies, as for a read timeout).

    httpx's ``Response.read()`` (which ``Client.request`` calls) reads a body whole, with no
    size limit of its own; streaming and counting is how to bound it
    (https://www.python-httpx.org/quickstart/#streaming-responses). A compressed body is
    inflated a bounded step at a time (:func:`~worker.fal.http.decoded_chunks`), so the count
    stops a "zip bomb" at ``limit`` too. The copy drops ``Content-Encoding``, as its body is
    already decoded.
    """
    declared = ascii_int(response.headers.get("content-length"), max_digits=18)
    if declared is not None and declared > limit and "content-encoding" not in response.headers:
        raise _too_large(what, response, limit)
    deadline = budget.deadline() if budget is not None else None
    seconds = budget.seconds if budget is not None else None
    body = bytearray()
    # The clock between chunks (the budget's, a test's fake one) and, for a read that stalls,
    # the same seconds over each network wait of the body (real time).
    with cut_off_at(None if seconds is None else time.monotonic() + seconds, f"fal {what}: too slow") as cut:
        try:
            for chunk in decoded_chunks(response):
                body += chunk
                if len(body) > limit:
                    raise _too_large(what, response, limit)
                if deadline is not None and budget is not None and budget.clock() > deadline:
                    raise _too_slow(what, response, budget)
        except httpx.DecodingError as exc:
            raise _undecodable(what, response, exc) from None
        except httpx.TimeoutException:
            if cut is not None and cut.hit and budget is not None:
                raise _too_slow(what, response, budget) from None
            raise
    return with_body(response, bytes(body), drop=("content-encoding",))


def _too_large(what: str, response: httpx.Response, limit: int) -> ProviderProtocolError:
    """Not an answer fal gives: asked again a bounded number of times by the caller, then failed."""
    return ProviderProtocolError(
        f"fal {what}: HTTP {response.status_code} with an answer over {limit} bytes; not read",
        status_code=response.status_code,
    )


def _undecodable(what: str, response: httpx.Response, exc: httpx.DecodingError) -> ProviderProtocolError:
    """A body its ``Content-Encoding`` does not decode: asked again a bounded number of times, then failed."""
    return ProviderProtocolError(
        f"fal {what}: HTTP {response.status_code} with an answer that cannot be decoded: {exc}",
        status_code=response.status_code,
    )


def _too_slow(what: str, response: httpx.Response, budget: AnswerBudget) -> RetryableProviderError:
    """A body still arriving when the answer budget ran out: like a read timeout, for the whole answer."""
    return RetryableProviderError(
        f"fal {what}: HTTP {response.status_code} with an answer not read whole within "
        f"{budget.seconds:g} s (WANBATCH_READ_TIMEOUT); left unread",
        status_code=response.status_code,
    )


#: Events read after COMPLETED, at most, waiting for a status stream's end (fal ends it there).
STREAM_TAIL_EVENTS = 16


def _read_to_end(events: Iterator[Any]) -> None:
    """Read what a stream sends after its last status, up to its end: only a response read to
    its end leaves its connection reusable. A stream that goes on sending events is left after
    :data:`STREAM_TAIL_EVENTS` (closed with its connection); one that sends nothing more but
    keep-alive comments ends at the client's read timeout — the caller has its status already."""
    for _ in itertools.islice(events, STREAM_TAIL_EVENTS):
        pass


def _until(stop: Callable[[], bool], chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``chunks`` until ``stop()`` says True, asked as each arrives: a stream that sends only
    keep-alive comments yields no event to its reader, yet lets the reader stop."""
    for chunk in chunks:
        if stop():
            return
        yield chunk


def _parse_status(body: object, request_id: str) -> Status:
    """A status body as a :class:`Status`. A body that is not an object, or an unknown state, is
    :class:`ProviderProtocolError`: neither "try again" nor "give up" is safe at once for a
    request that may be running and billed, so the caller asks again a bounded number of times."""
    if not isinstance(body, dict):
        raise ProviderProtocolError("fal status: the body is not a JSON object", request_id=request_id)
    state = body.get("status")
    if state not in QUEUE_STATES:
        shown = repr(state) if len(repr(state)) <= 60 else repr(state)[:60] + "…"
        raise ProviderProtocolError(f"fal status: unknown status {shown}", request_id=request_id)
    known: QueueState = state
    position = body.get("queue_position")
    logs = body.get("logs")
    metrics = body.get("metrics")
    error = body.get("error")
    return Status(
        state=known,
        queue_position=position if isinstance(position, int) else None,
        logs=logs if isinstance(logs, list) else None,
        metrics=metrics if isinstance(metrics, dict) else {},
        error=error if isinstance(error, str) else (None if error is None else json.dumps(error)),
        error_type=error_type_or_none(body.get("error_type")),
        raw=body,
    )
