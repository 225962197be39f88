"""The fal queue client against httpx.MockTransport: every status code and error shape fal uses."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator

import httpx
import pytest

from jobs.endpoints import all_endpoints
from jobs.errors import (
    AccountLockedError,
    AmbiguousSubmitError,
    ConfigError,
    FinalProviderError,
    ProviderError,
    RetryableProviderError,
    UsageError,
)
from jobs.settings import Settings
from worker.fal.client import MAX_ANSWER_BYTES, STREAM_TAIL_EVENTS, FalClient
from worker.fal.errors import (
    FalUnreachableError,
    ProviderProtocolError,
    RequestCancelledError,
    RequestFailedError,
    ResultExpiredError,
    ResultNotReadyError,
    StartTimeoutError,
    SubmitNotSentError,
    format_detail,
    load_json,
    map_transport_errors,
    unreached,
)
from worker.fal.http import RetryPolicy
from worker.fal.models import CancelOutcome, RequestHandle

QUEUE = "https://queue.test"
REST = "https://rest.test"
KEY = "0b5c2d4e-1111-2222-3333-444455556666:abcdef0123456789abcdef0123456789"
EP = "fal-ai/wan-25-preview/image-to-video"
RID = "80e732af-0000-4000-8000-000000000001"
BASE = f"{QUEUE}/fal-ai/wan-25-preview/requests/{RID}"
HANDLE = RequestHandle(EP, RID, f"{BASE}/status", BASE, f"{BASE}/cancel")

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that records every request and answers from a script."""

    def __init__(self, *answers: httpx.Response | Exception | Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer) and not isinstance(answer, httpx.Response):
            return answer(request)
        return answer

    def count(self, method: str) -> int:
        return sum(1 for r in self.requests if r.method == method)


def make_client(recorder: Recorder, *, attempts: int = 3) -> FalClient:
    return FalClient(
        queue_url=QUEUE,
        rest_url=REST,
        key=KEY,
        timeout=httpx.Timeout(5.0),
        transport=httpx.MockTransport(recorder),
        retry=RetryPolicy(attempts=attempts, base_delay=0.0),
        sleep=lambda _s: None,
    )


def submitted_body(status: str = "IN_QUEUE", position: int | None = 3) -> dict[str, object]:
    body: dict[str, object] = {
        "request_id": RID,
        "gateway_request_id": "gw-" + RID,
        "status": status,
        "response_url": BASE,
        "status_url": f"{BASE}/status",
        "cancel_url": f"{BASE}/cancel",
    }
    if position is not None:
        body["queue_position"] = position
    return body


# ------------------------------------------------------------------------------------ submit


def test_submit_in_queue_sends_raw_input_key_headers_and_webhook() -> None:
    rec = Recorder(httpx.Response(200, json=submitted_body()))
    with make_client(rec) as client:
        sub = client.submit(
            EP,
            {"prompt": "a cat", "image_url": "https://x/y.png"},
            webhook_url="https://hooks.example/cb?job=1&x=2",
            priority="low",
            start_timeout=30,
            store_io=False,
            object_lifecycle={"expiration_duration_seconds": 3600},
            extra_headers={"X-Fal-No-Retry": "1", "Authorization": "Key stolen"},
        )
    req = rec.requests[0]
    assert req.method == "POST"
    assert req.url.path == "/fal-ai/wan-25-preview/image-to-video"
    assert req.url.params["fal_webhook"] == "https://hooks.example/cb?job=1&x=2"
    assert b"fal_webhook=https%3A%2F%2Fhooks.example%2Fcb%3Fjob%3D1%26x%3D2" in req.url.query
    assert json.loads(req.content) == {"prompt": "a cat", "image_url": "https://x/y.png"}
    assert req.headers["authorization"] == f"Key {KEY}"
    assert req.headers["x-fal-queue-priority"] == "low"
    assert req.headers["x-fal-request-start-timeout"] == "30"
    assert req.headers["x-fal-store-io"] == "0"
    assert json.loads(req.headers["x-fal-object-lifecycle-preference"]) == {
        "expiration_duration_seconds": 3600
    }
    assert req.headers["x-fal-no-retry"] == "1"
    assert sub.request_id == RID
    assert sub.gateway_request_id == "gw-" + RID
    assert sub.status == "IN_QUEUE"
    assert sub.queue_position == 3
    assert sub.handle == HANDLE
    assert (sub.status_url, sub.response_url, sub.cancel_url) == (f"{BASE}/status", BASE, f"{BASE}/cancel")


def test_submit_in_progress_without_queue_position() -> None:
    rec = Recorder(httpx.Response(200, json=submitted_body("IN_PROGRESS", None)))
    with make_client(rec) as client:
        sub = client.submit(EP, {"prompt": "x"})
    assert sub.status == "IN_PROGRESS"
    assert sub.queue_position is None
    assert "x-fal-queue-priority" not in rec.requests[0].headers
    assert rec.requests[0].url.query == b""


def test_submit_keeps_the_server_urls_only_on_the_queue_origin() -> None:
    # fal's own URLs (same origin, under the app root, naming this request) are used as given…
    body = submitted_body()
    body["status_url"] = f"{QUEUE}/fal-ai/wan-25-preview/x/requests/{RID}/status"
    body["response_url"] = f"{QUEUE}/fal-ai/wan-25-preview/x/requests/{RID}"
    body["cancel_url"] = f"{QUEUE}/fal-ai/wan-25-preview/x/requests/{RID}/cancel"
    rec = Recorder(httpx.Response(200, json=body), httpx.Response(202, json={"status": "IN_PROGRESS"}))
    with make_client(rec) as client:
        sub = client.submit(EP, {})
        client.status(sub)
    assert sub.status_url == body["status_url"]
    assert str(rec.requests[1].url).startswith(str(body["status_url"]))

    # …but a URL on another host (or port) is never followed: the key goes with status calls.
    body = submitted_body()
    body["status_url"] = f"http://127.0.0.1:9999/fal-ai/wan-25-preview/requests/{RID}/status"
    rec = Recorder(httpx.Response(200, json=body), httpx.Response(202, json={"status": "IN_PROGRESS"}))
    with make_client(rec) as client:
        sub = client.submit(EP, {})
        client.status(sub)
    assert sub.handle == HANDLE
    assert str(rec.requests[1].url).startswith(f"{BASE}/status")
    assert rec.requests[1].headers["authorization"] == f"Key {KEY}"


@pytest.mark.parametrize("request_id", ["../../admin", "a/b", "", "x" * 200, "id?x=1", ".."])
def test_submit_with_an_unusable_request_id_is_ambiguous(request_id: str) -> None:
    body = submitted_body()
    body["request_id"] = request_id
    rec = Recorder(httpx.Response(200, json=body))
    with make_client(rec) as client, pytest.raises(AmbiguousSubmitError, match="request id"):
        client.submit(EP, {})


@pytest.mark.parametrize(
    ("seconds", "header"),
    [
        (30, "30"),
        (59.9999, "59.999"),
        (123456.78, "123456.78"),  # not rounded up to 123457
        (1_234_567.8, "1234567.8"),  # not 1.23457e+06
        (7.0009, "7"),
        (9_999_995.0, "9999995"),  # not 1e+07: five seconds past the deadline
        (20 * 86400 + 0.5, "1728000.5"),
    ],
)
def test_the_start_timeout_header_is_fixed_point_and_never_past_the_deadline(
    seconds: float, header: str
) -> None:
    """The header bounds when fal may still start a request (a window's end, a deadline): it
    must never say more than is left, and is a plain decimal number, never an exponent form."""
    rec = Recorder(httpx.Response(200, json=submitted_body()))
    with make_client(rec) as client:
        client.submit(EP, {}, start_timeout=seconds)
    sent = rec.requests[0].headers["x-fal-request-start-timeout"]
    assert sent == header
    assert float(sent) <= seconds


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"priority": "high"}, "priority"),
        ({"start_timeout": 0.1}, "0.1"),
        ({"start_timeout": 0}, "0.1"),
        ({"start_timeout": 0.1004}, "0.1"),  # 0.100 once rounded down: fal would refuse it
        ({"start_timeout": float("inf")}, "finite"),
        ({"start_timeout": float("nan")}, "finite"),
    ],
)
def test_submit_rejects_bad_options_before_sending(kwargs: dict[str, object], match: str) -> None:
    rec = Recorder(httpx.Response(200, json=submitted_body()))
    with make_client(rec) as client, pytest.raises(UsageError, match=match):
        client.submit(EP, {}, **kwargs)  # type: ignore[arg-type]
    assert rec.requests == []


def test_submit_422_keeps_the_detail_list() -> None:
    detail = [{"loc": ["body", "duration"], "msg": "must be 5 or 10", "type": "value_error"}]
    rec = Recorder(httpx.Response(422, json={"detail": detail}))
    with make_client(rec) as client, pytest.raises(FinalProviderError) as info:
        client.submit(EP, {"duration": 7})
    err = info.value
    assert not isinstance(err, AccountLockedError)
    assert err.status_code == 422
    assert err.detail == detail
    assert "duration: must be 5 or 10" in str(err)


@pytest.mark.parametrize(
    ("code", "body"),
    [
        (401, {"detail": "Invalid API key"}),
        (402, {"detail": "Payment required"}),
        (403, {"detail": "User is locked. Reason: Exhausted balance. Add funds to continue."}),
    ],
)
def test_submit_account_errors(code: int, body: dict[str, object]) -> None:
    rec = Recorder(httpx.Response(code, json=body))
    with make_client(rec) as client, pytest.raises(AccountLockedError) as info:
        client.submit(EP, {})
    assert info.value.status_code == code
    assert info.value.detail == body["detail"]
    assert KEY not in str(info.value)
    assert KEY not in repr(info.value)
    assert rec.count("POST") == 1


@pytest.mark.parametrize("code", [408, 409, 429])
def test_submit_transient_codes_are_retryable_and_not_resent(code: int) -> None:
    rec = Recorder(httpx.Response(code, json={"detail": "slow down"}))
    with make_client(rec) as client, pytest.raises(RetryableProviderError) as info:
        client.submit(EP, {})
    assert info.value.status_code == code
    assert rec.count("POST") == 1


NGINX_502 = "<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>"
NGINX_504 = "<html><head><title>504 Gateway Time-out</title></head><body><center>nginx</center></body></html>"


@pytest.mark.parametrize(
    ("code", "body"), [(502, NGINX_502), (504, NGINX_504), (504, "gateway timeout"), (502, "")]
)
def test_submit_gateway_502_504_without_request_id_is_ambiguous(code: int, body: str) -> None:
    """A gateway answers 502/504 after it forwarded the POST (its timeout expired waiting for
    fal, or the connection broke): fal may have queued it, so it is never resent blindly."""
    rec = Recorder(httpx.Response(code, text=body, headers={"content-type": "text/html"}))
    with make_client(rec) as client, pytest.raises(AmbiguousSubmitError) as info:
        client.submit(EP, {})
    assert not isinstance(info.value, RetryableProviderError)
    assert info.value.status_code == code
    assert info.value.request_id is None
    assert "gateway" in str(info.value)
    assert "may have queued" in str(info.value)
    assert rec.count("POST") == 1


@pytest.mark.parametrize(
    "response",
    [
        # fal's own server wrote these: a 5xx from it says "not queued"
        httpx.Response(502, json={"detail": "bad gateway"}, headers={"x-fal-request-id": "fal-req-1"}),
        httpx.Response(504, text="upstream timed out", headers={"x-fal-request-id": "fal-req-2"}),
        httpx.Response(
            502, json={"detail": "Runner incomplete response", "error_type": "runner_incomplete_response"}
        ),
        httpx.Response(504, json={"detail": "Request timed out"}),
        httpx.Response(504, text="timed out", headers={"x-fal-error-type": "request_timeout"}),
        # an ingress 503 refuses before any upstream took the request
        httpx.Response(503, text="<html><center>nginx</center></html>"),
        httpx.Response(503, text="Service Unavailable"),
        httpx.Response(500, text="Internal Server Error"),
    ],
)
def test_submit_fal_5xx_and_ingress_503_stay_retryable(response: httpx.Response) -> None:
    rec = Recorder(response)
    with make_client(rec) as client, pytest.raises(RetryableProviderError) as info:
        client.submit(EP, {})
    assert "not queued" in str(info.value)
    assert rec.count("POST") == 1


def test_submit_503_with_request_id_is_retryable_with_the_id() -> None:
    rec = Recorder(
        httpx.Response(
            503,
            json={"detail": "Runner unavailable", "error_type": "runner_scheduling_failure"},
            headers={"x-fal-request-id": "fal-req-9"},
        )
    )
    with make_client(rec) as client, pytest.raises(RetryableProviderError) as info:
        client.submit(EP, {})
    assert info.value.request_id == "fal-req-9"
    assert info.value.error_type == "runner_scheduling_failure"
    assert rec.count("POST") == 1


def test_submit_504_user_start_timeout_is_final() -> None:
    rec = Recorder(
        httpx.Response(
            504, json={"detail": "Request timed out"}, headers={"X-Fal-Request-Timeout-Type": "user"}
        )
    )
    with make_client(rec) as client, pytest.raises(StartTimeoutError) as info:
        client.submit(EP, {}, start_timeout=5)
    assert isinstance(info.value, FinalProviderError)
    assert info.value.status_code == 504


def test_submit_other_4xx_is_final() -> None:
    rec = Recorder(httpx.Response(404, json={"detail": "Application 'nope' not found"}))
    with make_client(rec) as client, pytest.raises(FinalProviderError) as info:
        client.submit("fal-ai/nope", {})
    assert info.value.status_code == 404


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("connection refused"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.PoolTimeout("pool exhausted"),
    ],
)
def test_submit_that_could_not_connect_is_unreached_not_a_submission(exc: Exception) -> None:
    rec = Recorder(exc)
    with make_client(rec) as client, pytest.raises(FalUnreachableError) as info:
        client.submit(EP, {})
    assert isinstance(info.value, SubmitNotSentError)  # given back uncounted, never "maybe billed"
    assert not isinstance(info.value, ProviderError)
    assert isinstance(info.value.__cause__, httpx.TransportError)
    assert rec.count("POST") == 1


def _connect_error_from(cause: ssl.SSLError) -> httpx.ConnectError:
    """A connect error as httpx raises it for a TLS failure: the ``ssl`` error among its causes."""
    try:
        try:
            raise cause
        except ssl.SSLError as inner:
            raise httpx.ConnectError(str(inner)) from inner
    except httpx.ConnectError as exc:
        return exc


def test_submit_whose_tls_refused_fals_certificate_is_a_counted_retry_not_unreached() -> None:
    """httpx raises ConnectError for a certificate that does not verify, too (a proxy re-signing
    TLS, a wrong SSL_CERT_FILE): held "until fal answers", uncounted, a batch without a deadline
    waited forever for a setting to change. It is a counted retry, as before the hold."""
    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    rec = Recorder(_connect_error_from(verify))
    with make_client(rec) as client, pytest.raises(RetryableProviderError) as info:
        client.submit(EP, {})
    assert not isinstance(info.value, FalUnreachableError)
    assert "TLS failed" in str(info.value)
    assert not unreached(info.value)


def test_submit_whose_tls_handshake_was_cut_short_is_unreached() -> None:
    """The peer closing the connection mid-handshake is the network's, as a refused connection."""
    rec = Recorder(_connect_error_from(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")))
    with make_client(rec) as client, pytest.raises(FalUnreachableError):
        client.submit(EP, {})


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ReadTimeout("read timed out"),
        httpx.WriteTimeout("write timed out"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadError("[Errno 104] Connection reset by peer"),
        httpx.WriteError("broken pipe"),
    ],
)
def test_submit_possibly_sent_is_ambiguous_and_posted_exactly_once(exc: Exception) -> None:
    rec = Recorder(exc, httpx.Response(200, json=submitted_body()))
    with make_client(rec) as client, pytest.raises(AmbiguousSubmitError) as info:
        client.submit(EP, {"prompt": "x"})
    assert not isinstance(info.value, RetryableProviderError | FinalProviderError)
    assert rec.count("POST") == 1
    assert len(rec.requests) == 1


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, json={"status": "IN_QUEUE"}),
        httpx.Response(200, json={"request_id": ""}),
        httpx.Response(200, text="<html>ok</html>"),
        httpx.Response(200, json=["not", "an", "object"]),
    ],
)
def test_submit_success_without_request_id_is_ambiguous(response: httpx.Response) -> None:
    rec = Recorder(response)
    with make_client(rec) as client, pytest.raises(AmbiguousSubmitError):
        client.submit(EP, {})
    assert rec.count("POST") == 1


def test_submit_missing_urls_are_derived_from_the_request_id() -> None:
    rec = Recorder(httpx.Response(200, json={"request_id": RID, "status": "IN_QUEUE", "queue_position": 0}))
    with make_client(rec) as client:
        sub = client.submit(EP, {})
    assert sub.handle == HANDLE
    assert sub.queue_position == 0


# ------------------------------------------------------------------------------------ status


def test_status_in_queue_202_and_logs_param() -> None:
    rec = Recorder(
        httpx.Response(202, json={"status": "IN_QUEUE", "queue_position": 4, "response_url": BASE})
    )
    with make_client(rec) as client:
        status = client.status(HANDLE)
    assert status.state == "IN_QUEUE"
    assert status.queue_position == 4
    assert status.logs is None
    assert not status.completed
    req = rec.requests[0]
    assert req.method == "GET"
    assert req.url.path == f"/fal-ai/wan-25-preview/requests/{RID}/status"
    assert req.url.params["logs"] == "0"
    assert req.headers["authorization"] == f"Key {KEY}"


def test_status_in_progress_with_logs_list() -> None:
    logs = [{"message": "step 1", "level": "INFO", "timestamp": "2026-01-01T00:00:00Z"}]
    rec = Recorder(httpx.Response(202, json={"status": "IN_PROGRESS", "logs": logs}))
    with make_client(rec) as client:
        status = client.status(HANDLE, logs=True)
    assert rec.requests[0].url.params["logs"] == "1"
    assert status.state == "IN_PROGRESS"
    assert status.logs == logs


def test_status_in_progress_with_null_logs() -> None:
    rec = Recorder(httpx.Response(202, json={"status": "IN_PROGRESS", "logs": None}))
    with make_client(rec) as client:
        assert client.status(HANDLE).logs is None


def test_status_completed_ok_and_failed() -> None:
    ok = {"status": "COMPLETED", "logs": None, "metrics": {"inference_time": 41.5}}
    failed = {
        "status": "COMPLETED",
        "logs": [],
        "metrics": {},
        "error": "Request timed out",
        "error_type": "request_timeout",
    }
    rec = Recorder(httpx.Response(200, json=ok), httpx.Response(200, json=failed))
    with make_client(rec) as client:
        first = client.status(HANDLE)
        second = client.status(HANDLE)
    assert first.completed
    assert not first.failed
    assert first.metrics == {"inference_time": 41.5}
    assert second.completed
    assert second.failed
    assert (second.error, second.error_type) == ("Request timed out", "request_timeout")
    assert second.logs == []


def test_status_unknown_state_is_a_protocol_error() -> None:
    # neither retryable nor final: the poller asks again a bounded number of times, then fails
    rec = Recorder(httpx.Response(200, json={"status": "FAILED"}))
    with make_client(rec) as client, pytest.raises(ProviderProtocolError) as info:
        client.status(HANDLE)
    assert not isinstance(info.value, RetryableProviderError | FinalProviderError)
    assert "FAILED" in str(info.value)


def test_status_retries_transient_failures_then_succeeds() -> None:
    rec = Recorder(
        httpx.ConnectError("refused"),
        httpx.Response(502, text="<center>nginx</center>"),
        httpx.Response(202, json={"status": "IN_QUEUE", "queue_position": 1}),
    )
    with make_client(rec, attempts=3) as client:
        status = client.status(HANDLE)
    assert status.queue_position == 1
    assert rec.count("GET") == 3


def test_status_gives_up_after_the_bounded_retries() -> None:
    rec = Recorder(httpx.Response(429, json={"detail": "rate limited"}))
    sleeps: list[float] = []
    client = FalClient(
        queue_url=QUEUE,
        rest_url=REST,
        key=KEY,
        timeout=httpx.Timeout(5.0),
        transport=httpx.MockTransport(rec),
        retry=RetryPolicy(attempts=4, base_delay=0.1, max_delay=0.3),
        sleep=sleeps.append,
    )
    with client, pytest.raises(RetryableProviderError) as info:
        client.status(HANDLE)
    assert info.value.status_code == 429
    assert rec.count("GET") == 4
    assert len(sleeps) == 3
    assert all(0.05 <= s <= 0.45 for s in sleeps)


def test_status_404_is_final_and_not_retried() -> None:
    rec = Recorder(httpx.Response(404, json={"detail": "Request not found"}))
    with make_client(rec) as client, pytest.raises(FinalProviderError):
        client.status(HANDLE)
    assert rec.count("GET") == 1


# ------------------------------------------------------------------------------- stream status


def sse(*chunks: str) -> httpx.Response:
    return httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content="".join(chunks).encode()
    )


def test_stream_status_parses_events_and_skips_comments() -> None:
    body = (
        ": keep-alive\n\n",
        'data: {"status": "IN_QUEUE", "queue_position": 2}\n\n',
        ": ping\n\n",
        'data: {"status": "IN_PROGRESS", "logs": [{"message": "hi"}]}\n\n',
        'data: {"status": "COMPLETED", "logs": null, "metrics": {"inference_time": 1.0}}\n\n',
        'data: {"status": "IN_QUEUE", "queue_position": 9}\n\n',
    )
    rec = Recorder(sse(*body))
    with make_client(rec) as client:
        states = list(client.stream_status(HANDLE, logs=True))
    assert [s.state for s in states] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert states[0].queue_position == 2
    assert states[1].logs == [{"message": "hi"}]
    req = rec.requests[0]
    assert req.url.path == f"/fal-ai/wan-25-preview/requests/{RID}/status/stream"
    assert req.url.params["logs"] == "1"
    assert req.headers["accept"] == "text/event-stream"


def test_a_stream_asked_for_some_states_checks_the_others_and_leaves_them() -> None:
    body = (
        'data: {"status": "IN_QUEUE", "queue_position": 2}\n\n',
        f'data: {{"status": "IN_PROGRESS", "logs": [{{"message": "echo {KEY}"}}]}}\n\n',
        'data: {"status": "IN_QUEUE", "queue_position": 1}\n\n',
        'data: {"status": "COMPLETED", "logs": null}\n\n',
    )
    with make_client(Recorder(sse(*body))) as client:
        statuses = list(client.stream_status(HANDLE, states=("IN_PROGRESS",)))
    assert [s.state for s in statuses] == ["IN_PROGRESS", "COMPLETED"]  # COMPLETED always
    assert statuses[0].logs == [{"message": "echo ***"}]  # masked, as every status is
    assert KEY not in json.dumps(statuses[0].raw)
    # An event left is still read as every other is: a state fal has, in JSON.
    for event, error in (
        ('data: {"status": "WAITING"}\n\n', ProviderProtocolError),
        ('data: ["IN_QUEUE"]\n\n', ProviderProtocolError),
        ("data: {not json}\n\n", RetryableProviderError),
    ):
        with make_client(Recorder(sse(event))) as client, pytest.raises(error):
            list(client.stream_status(HANDLE, states=("IN_PROGRESS",)))


class _Tail(httpx.SyncByteStream):
    """An SSE body that notes whether it was read to its end."""

    def __init__(self, *events: str, endless: bool = False) -> None:
        self.events, self.endless, self.ended, self.sent = events, endless, False, 0

    def __iter__(self) -> Iterator[bytes]:
        for event in self.events:
            self.sent += 1
            yield event.encode()
        while self.endless:  # a server that goes on talking after COMPLETED
            self.sent += 1
            yield b'data: {"status": "COMPLETED"}\n\n'
        self.ended = True


def _tail_client(body: _Tail) -> FalClient:
    answer = httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)
    return make_client(Recorder(answer))


def test_after_completed_the_stream_is_read_to_its_end_for_the_next_request() -> None:
    body = _Tail('data: {"status": "IN_PROGRESS"}\n\n', 'data: {"status": "COMPLETED"}\n\n', ": bye\n\n")
    with _tail_client(body) as client:
        states = [s.state for s in client.stream_status(HANDLE)]  # asks on after COMPLETED
    assert states == ["IN_PROGRESS", "COMPLETED"]
    assert body.ended  # read to its end: its connection could go back to the pool


def test_a_consumer_that_stops_at_completed_reads_no_further() -> None:
    body = _Tail('data: {"status": "COMPLETED"}\n\n', 'data: {"status": "IN_QUEUE"}\n\n')
    with _tail_client(body) as client:
        for status in client.stream_status(HANDLE):
            assert status.completed
            break  # the watcher before issue #11's fix: the response is closed unread
    assert not body.ended


def test_a_stream_that_never_ends_after_completed_is_left_soon() -> None:
    body = _Tail('data: {"status": "COMPLETED"}\n\n', endless=True)
    with _tail_client(body) as client:
        assert [s.state for s in client.stream_status(HANDLE)] == ["COMPLETED"]
    assert not body.ended
    assert body.sent <= 2 + STREAM_TAIL_EVENTS


def test_stream_status_ending_early_is_retryable() -> None:
    rec = Recorder(sse('data: {"status": "IN_PROGRESS"}\n\n'))
    with make_client(rec) as client:
        stream = client.stream_status(HANDLE)
        assert next(stream).state == "IN_PROGRESS"
        with pytest.raises(RetryableProviderError, match="ended before COMPLETED"):
            next(stream)


def test_stream_status_http_error_is_classified() -> None:
    rec = Recorder(httpx.Response(403, json={"detail": "User is locked."}))
    with make_client(rec) as client, pytest.raises(AccountLockedError):
        list(client.stream_status(HANDLE))


def test_stream_status_that_is_not_an_event_stream_says_so() -> None:
    rec = Recorder(httpx.Response(200, json={"status": "IN_PROGRESS"}))
    with make_client(rec) as client, pytest.raises(RetryableProviderError, match="not an event stream"):
        list(client.stream_status(HANDLE))


def test_stream_status_network_error_is_retryable() -> None:
    rec = Recorder(httpx.ReadError("connection reset"))
    with make_client(rec) as client, pytest.raises(RetryableProviderError, match="network error"):
        list(client.stream_status(HANDLE))


def test_stream_status_events_are_read_as_a_database_can_store_them() -> None:
    # An event's data is text, not bytes: a NUL or lone surrogate escape, and NaN, read from it
    # become U+FFFD and None (jobs.storable), as in every other answer the client reads.
    body = (
        'data: {"status": "IN_PROGRESS", "logs": [{"message": "a\\u0000b\\ud800"}]}\n\n',
        'data: {"status": "COMPLETED", "metrics": {"inference_time": NaN}, "error": "x\\u0000",'
        ' "error_type": "internal_error"}\n\n',
    )
    with make_client(Recorder(sse(*body))) as client:
        running, completed = list(client.stream_status(HANDLE, logs=True))
    assert running.logs == [{"message": "a\ufffdb\ufffd"}]
    assert (completed.metrics, completed.error) == ({"inference_time": None}, "x\ufffd")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b'{"a\\u0000": ["\\uD800", NaN, -Infinity, 1.5]}', {"a\ufffd": ["\ufffd", None, None, 1.5]}),
        (b'"raw \xed\xa0\x80"', "raw \ufffd"),  # a surrogate encoded raw: json reads it too
        ('"\\udfff"'.encode("utf-16-le"), "\ufffd"),  # json detects UTF-16 and reads it
        ('{"s": "\ud800", "n": NaN}', {"s": "\ufffd", "n": None}),  # text, as an event's data
        (b'{"emoji": "\\ud83d\\ude00", "word": "NaN"}', {"emoji": "\U0001f600", "word": "NaN"}),
    ],
    ids=["escapes", "raw-bytes", "utf-16", "text", "whole-characters"],
)
def test_answers_are_read_as_a_database_can_store_them(text: str | bytes, value: object) -> None:
    assert load_json(text, "answer") == value


# ------------------------------------------------------------------------------------ result


def test_result_200_keeps_big_integer_seeds_exact() -> None:
    seed = 17454220438242315174
    raw = (
        f'{{"seed": {seed}, "actual_prompt": "a cat", "video": {{"url": "https://v3.fal.media/files/x.mp4",'
        ' "content_type": "video/mp4", "file_name": "x.mp4", "file_size": 1234}}'
    )
    rec = Recorder(httpx.Response(200, content=raw.encode(), headers={"x-fal-request-id": RID}))
    with make_client(rec) as client:
        out = client.result(HANDLE)
    assert out["seed"] == seed
    assert isinstance(out["seed"], int)
    assert out["video"]["file_size"] == 1234
    assert rec.requests[0].url.path == f"/fal-ai/wan-25-preview/requests/{RID}"


def test_result_before_completion_is_not_ready() -> None:
    rec = Recorder(httpx.Response(400, json={"detail": "Request is still in progress"}))
    with make_client(rec) as client, pytest.raises(ResultNotReadyError) as info:
        client.result(HANDLE)
    assert isinstance(info.value, RetryableProviderError)
    assert rec.count("GET") == 1


def test_result_422_replay_is_final_with_the_list() -> None:
    detail = [{"loc": ["body", "image_url"], "msg": "could not load image", "type": "image_load_error"}]
    rec = Recorder(httpx.Response(422, json={"detail": detail}))
    with make_client(rec) as client, pytest.raises(FinalProviderError) as info:
        client.result(HANDLE)
    assert info.value.detail == detail
    assert info.value.status_code == 422


@pytest.mark.parametrize(
    ("code", "error_type", "expected"),
    [
        # fal's own verdict that a new attempt may succeed: the only result error that resubmits
        (504, "request_timeout", RequestFailedError),
        (504, "startup_timeout", RequestFailedError),
        (503, "runner_scheduling_failure", RequestFailedError),
        (503, "runner_disconnected", RequestFailedError),
        (502, "runner_incomplete_response", RequestFailedError),
        (500, "runner_server_error", RequestFailedError),
        (500, "internal_error", RequestFailedError),
        (499, "client_cancelled", RequestCancelledError),
        (499, "client_disconnected", RequestCancelledError),
        (400, "bad_request", FinalProviderError),
    ],
)
def test_result_flat_error_is_classified_by_error_type(
    code: int, error_type: str, expected: type[ProviderError]
) -> None:
    rec = Recorder(
        httpx.Response(
            code,
            json={"detail": "something happened", "error_type": error_type},
            headers={"X-Fal-Error-Type": error_type, "x-fal-request-id": RID},
        )
    )
    with make_client(rec) as client, pytest.raises(ProviderError) as info:
        client.result(HANDLE)
    assert type(info.value) is expected
    assert info.value.error_type == error_type
    assert info.value.status_code == code
    assert info.value.request_id == RID
    assert rec.count("GET") == 1  # a replayed failure is an answer, not a hiccup


def test_result_error_type_from_header_only() -> None:
    rec = Recorder(
        httpx.Response(
            504, json={"detail": "Request timed out"}, headers={"X-Fal-Error-Type": "request_timeout"}
        )
    )
    with make_client(rec) as client, pytest.raises(RequestFailedError) as info:
        client.result(HANDLE)
    assert info.value.error_type == "request_timeout"


@pytest.mark.parametrize(
    ("code", "error_type", "header", "expected"),
    [
        (500, "internal_error", "false", FinalProviderError),
        (422, None, "true", RequestFailedError),
        (400, "bad_request", "true", RequestFailedError),
    ],
)
def test_result_x_fal_retryable_overrides(
    code: int, error_type: str | None, header: str, expected: type[ProviderError]
) -> None:
    body: dict[str, object] = {"detail": [{"loc": ["body"], "msg": "nsfw", "type": "content_policy"}]}
    headers = {"X-Fal-Retryable": header, "x-fal-request-id": RID}
    if error_type:
        body = {"detail": "boom", "error_type": error_type}
        headers["X-Fal-Error-Type"] = error_type
    rec = Recorder(httpx.Response(code, json=body, headers=headers))
    with make_client(rec) as client, pytest.raises(ProviderError) as info:
        client.result(HANDLE)
    assert type(info.value) is expected


def test_result_404_is_expired_and_final() -> None:
    rec = Recorder(httpx.Response(404, json={"detail": "Request not found"}))
    with make_client(rec) as client, pytest.raises(ResultExpiredError) as info:
        client.result(HANDLE)
    assert isinstance(info.value, FinalProviderError)
    assert "expired" in str(info.value)


def test_result_retries_gateway_errors() -> None:
    rec = Recorder(
        httpx.Response(503, text="<center>nginx</center>"),
        httpx.ReadTimeout("slow"),
        httpx.Response(200, json={"seed": 1}),
    )
    with make_client(rec) as client:
        assert client.result(HANDLE) == {"seed": 1}
    assert rec.count("GET") == 3


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(502, text="<center>nginx</center>"),
        httpx.Response(503, text="Service Unavailable"),
        httpx.Response(503, json={"detail": "Service Unavailable"}, headers={"x-fal-request-id": RID}),
        httpx.Response(429, json={"detail": "Too many requests"}),
        httpx.Response(200, text="<html>maintenance</html>"),
        httpx.ReadError("connection reset by peer"),
    ],
)
def test_result_call_failures_are_not_fal_verdicts(response: httpx.Response | Exception) -> None:
    # the call failed, not the request: retryable, but never a reason to submit again
    rec = Recorder(response, response, response)
    with make_client(rec) as client, pytest.raises(RetryableProviderError) as info:
        client.result(HANDLE)
    assert not isinstance(info.value, RequestFailedError)


def test_result_nested_absurdly_deep_is_a_protocol_error() -> None:
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    rec = Recorder(httpx.Response(200, content=deep))
    with make_client(rec) as client, pytest.raises(ProviderProtocolError, match="nested"):
        client.result(HANDLE)
    rec = Recorder(httpx.Response(200, content=deep))
    with make_client(rec) as client, pytest.raises(ProviderProtocolError, match="nested"):
        client.status(HANDLE)


# ------------------------------------------------------------------------------------ cancel


@pytest.mark.parametrize(
    ("response", "outcome"),
    [
        (httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"}), CancelOutcome.REQUESTED),
        (httpx.Response(200, json={"status": "CANCELLATION_REQUESTED"}), CancelOutcome.REQUESTED),
        (httpx.Response(400, json={"status": "ALREADY_COMPLETED"}), CancelOutcome.ALREADY_COMPLETED),
        (
            httpx.Response(400, json={"detail": f"Request {RID} is already completed."}),
            CancelOutcome.ALREADY_COMPLETED,
        ),
        (httpx.Response(404, json={"status": "NOT_FOUND"}), CancelOutcome.NOT_FOUND),
    ],
)
def test_cancel_outcomes(response: httpx.Response, outcome: CancelOutcome) -> None:
    rec = Recorder(response)
    with make_client(rec) as client:
        assert client.cancel(HANDLE) is outcome
    req = rec.requests[0]
    assert req.method == "PUT"
    assert req.url.path == f"/fal-ai/wan-25-preview/requests/{RID}/cancel"
    assert req.content == b""


def test_cancel_is_not_retried() -> None:
    rec = Recorder(httpx.Response(503, text="<center>nginx</center>"))
    with make_client(rec) as client, pytest.raises(RetryableProviderError):
        client.cancel(HANDLE)
    assert rec.count("PUT") == 1


# -------------------------------------------------------------------------------- redirects

INTERNAL = "http://169.254.169.254/latest/meta-data/creds"


def _moved(code: int = 302, location: str | None = f"{INTERNAL}?token=do-not-show&k={KEY}") -> httpx.Response:
    return httpx.Response(code, headers={} if location is None else {"Location": location})


@pytest.mark.parametrize("call", ["status", "result", "cancel", "stream"])
@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_from_the_queue_api_is_not_followed(call: str, code: int) -> None:
    """fal answers status, result and cancel itself: a 3xx is an answer its protocol cannot
    produce, never a hop to a host nobody checked (before, status and result followed it)."""
    rec = Recorder(_moved(code))
    with make_client(rec) as client:
        calls: dict[str, Callable[[RequestHandle], object]] = {
            "status": client.status,
            "result": client.result,
            "cancel": client.cancel,
            "stream": lambda handle: list(client.stream_status(handle)),
        }
        with pytest.raises(ProviderProtocolError) as info:
            calls[call](HANDLE)
    assert [r.url.host for r in rec.requests] == ["queue.test"]  # asked once, nowhere else
    message = str(info.value)
    assert f"HTTP {code} redirect to {INTERNAL}?token=" in message
    assert "not followed" in message
    assert "do-not-show" not in message  # masked
    assert KEY.split(":")[1] not in message
    assert info.value.status_code == code


def test_a_relative_redirect_names_the_whole_location_and_one_without_says_so() -> None:
    rec = Recorder(_moved(302, "/elsewhere"), _moved(304, None))
    with make_client(rec) as client:
        with pytest.raises(
            ProviderProtocolError, match=r"HTTP 302 redirect to https://queue\.test/elsewhere,"
        ):
            client.result(HANDLE)
        with pytest.raises(ProviderProtocolError, match=r"HTTP 304 redirect without a location"):
            client.status(HANDLE)
    assert len(rec.requests) == 2


def test_too_many_redirects_is_a_protocol_error_not_an_internal_one() -> None:
    """httpx's ``TooManyRedirects`` is no ``TransportError``: it escaped the mapping (exit 70)."""
    with (
        pytest.raises(ProviderProtocolError, match="fal status: too many redirects"),
        map_transport_errors("status"),
    ):
        raise httpx.TooManyRedirects("Exceeded maximum allowed redirects.")


@pytest.mark.parametrize("call", ["status", "result", "cancel", "stream"])
@pytest.mark.parametrize("location", ["data:text/plain,hi", "mailto:x", "http://x:{key}/"])
def test_a_redirect_to_no_url_is_a_protocol_error_that_quotes_nothing(call: str, location: str) -> None:
    """httpx makes the next request of every 3xx, followed or not: a location without a host
    that is no path either raised :class:`httpx.InvalidURL` (no ``HTTPError``, so it escaped
    as an internal error: exit 70 from ``run`` and ``cancel``), and one it cannot parse an
    error quoting it (here the key, as a port)."""
    rec = Recorder(_moved(302, location.format(key=KEY)))
    with make_client(rec) as client:
        calls: dict[str, Callable[[RequestHandle], object]] = {
            "status": client.status,
            "result": client.result,
            "cancel": client.cancel,
            "stream": lambda handle: list(client.stream_status(handle)),
        }
        with pytest.raises(ProviderProtocolError) as info:
            calls[call](HANDLE)
    what = "status stream" if call == "stream" else call
    assert str(info.value) == (
        f"fal {what}: redirect to a malformed location, not followed (fal's API does not redirect)"
    )
    assert len(rec.requests) == 1  # not retried by the client: the caller's bound applies


def test_a_submit_redirected_to_no_url_is_refused_without_quoting_it() -> None:
    rec = Recorder(_moved(302, f"http://x:{KEY}/"), _moved(307, "mailto:x"))
    with make_client(rec) as client:
        for _ in range(2):
            with pytest.raises(FinalProviderError) as info:
                client.submit(EP, {"prompt": "x", "image_url": "https://example.com/a.png"})
            assert str(info.value) == "fal submit: refused, a redirect to a malformed location, not followed"
            assert not isinstance(info.value, AmbiguousSubmitError)


# ----------------------------------------------------------------------------------- handles

EXPECTED_BASES = {
    "fal-ai/wan-i2v": "fal-ai/wan-i2v",
    "fal-ai/wan-flf2v": "fal-ai/wan-flf2v",
    "fal-ai/wan-22": "fal-ai/wan-22",
    "fal-ai/wan-25-preview/image-to-video": "fal-ai/wan-25-preview",
    "wan/v2.6/image-to-video": "wan/v2.6",
}


def test_from_request_id_covers_every_registry_endpoint() -> None:
    assert {e.id for e in all_endpoints()} == set(EXPECTED_BASES)


@pytest.mark.parametrize(("endpoint_id", "base"), sorted(EXPECTED_BASES.items()))
def test_from_request_id_drops_the_sub_path(endpoint_id: str, base: str) -> None:
    handle = RequestHandle.from_request_id(QUEUE + "/", endpoint_id, "rid-1")
    root = f"{QUEUE}/{base}/requests/rid-1"
    assert handle == RequestHandle(endpoint_id, "rid-1", f"{root}/status", root, f"{root}/cancel")
    rec = Recorder(httpx.Response(200, json={"status": "COMPLETED"}))
    with make_client(rec) as client:
        assert client.handle(endpoint_id, "rid-1") == handle


# ---------------------------------------------------------------------------------- settings


def test_from_settings_uses_key_urls_and_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    settings = Settings(
        FAL_KEY=KEY,
        fal_queue_url="http://sim.local:8000/",
        fal_rest_url="http://sim.local:8000",
        read_timeout=7,
    )
    rec = Recorder(httpx.Response(200, json={"request_id": "r1"}))
    with FalClient.from_settings(settings, transport=httpx.MockTransport(rec)) as client:
        sub = client.submit("wan/v2.6/image-to-video", {})
        assert client.http.timeout.read == 7
        assert client.http.timeout.connect == settings.connect_timeout
        assert KEY not in repr(client)
    assert str(rec.requests[0].url) == "http://sim.local:8000/wan/v2.6/image-to-video"
    assert rec.requests[0].headers["authorization"] == f"Key {KEY}"
    assert sub.status_url == "http://sim.local:8000/wan/v2.6/requests/r1/status"


def test_from_settings_without_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    settings = Settings()
    with pytest.raises(ConfigError, match="FAL_KEY"):
        FalClient.from_settings(settings)
    rec = Recorder(httpx.Response(202, json={"status": "IN_QUEUE", "queue_position": 0}))
    with FalClient.from_settings(
        settings, transport=httpx.MockTransport(rec), allow_missing_key=True
    ) as client:
        client.status(HANDLE)
    assert "authorization" not in rec.requests[0].headers


def test_key_is_only_sent_to_fal_origins() -> None:
    rec = Recorder(httpx.Response(200, json={"seed": 1}))
    other = RequestHandle(
        EP, RID, "https://elsewhere.test/s", "https://elsewhere.test/r", "https://elsewhere.test/c"
    )
    with make_client(rec) as client:
        client.result(other)
    assert "authorization" not in rec.requests[0].headers


# ------------------------------------------------------------------------------ error formatting


def test_format_detail_puts_fastapi_field_errors_in_one_line() -> None:
    detail: list[object] = [
        {"loc": ["body", "duration"], "msg": "must be 5 or 10", "type": "value_error"},
        {"loc": None, "msg": "no location"},
        7,
    ]
    detail += [{"loc": ["body", f"f{i}"], "msg": "bad"} for i in range(5)]
    text = format_detail(detail)
    assert text == "duration: must be 5 or 10; no location; 7; f0: bad; f1: bad (+3 more)"
    assert format_detail("as fal said it") == "as fal said it"
    assert format_detail({"other": "shape"}) is None
    assert format_detail(None) is None


@pytest.mark.parametrize("content", [b"null", b"[1, 2]", b"5", b'"text"'])
def test_a_result_that_is_json_but_not_an_object_is_a_protocol_error(content: bytes) -> None:
    # Not a gateway's passing page (retried for the hour fal keeps results): an answer fal never
    # gives, asked again a bounded number of times by the download step.
    rec = Recorder(httpx.Response(200, content=content, headers={"content-type": "application/json"}))
    with make_client(rec) as client, pytest.raises(ProviderProtocolError, match="not a JSON object"):
        client.result(HANDLE)


# ------------------------------------------------------------------------- bounded answers


class HugeBody:
    """A body of ``total`` bytes in 64 KiB chunks that counts how much of it was taken."""

    CHUNK = 64 * 1024

    def __init__(self, total: int, start: bytes = b"") -> None:
        self.total = total
        self.start = start
        self.taken = 0

    def __iter__(self) -> Iterator[bytes]:
        if self.start:
            self.taken += len(self.start)
            yield self.start
        while self.taken < self.total:
            self.taken += self.CHUNK
            yield b" " * self.CHUNK


#: Each fal call, with the answer code it gets; the body is MAX_ANSWER_BYTES many times over.
CAPPED_CALLS: list[tuple[str, int]] = [
    ("status", 200),
    ("status", 503),
    ("result", 200),
    ("result", 500),
    ("cancel", 202),
    ("cancel", 503),
    ("stream_status", 500),
]


@pytest.mark.parametrize(("call", "code"), CAPPED_CALLS, ids=[f"{c}-{n}" for c, n in CAPPED_CALLS])
def test_an_answer_over_the_cap_is_refused_unread(call: str, code: int) -> None:
    """Before, the whole body was read into memory (an endless one until the worker died);
    a valid 200 status padded to 16 MiB was even accepted."""
    bodies: list[HugeBody] = []

    def answer(_request: httpx.Request) -> httpx.Response:
        # valid JSON when read whole: only its size is wrong
        bodies.append(HugeBody(16 * MAX_ANSWER_BYTES, start=b'{"status": "COMPLETED", "pad": 1}'))
        return httpx.Response(code, content=bodies[-1])

    with make_client(Recorder(answer)) as client:
        ask: Callable[[], object] = (
            (lambda: list(client.stream_status(HANDLE)))
            if call == "stream_status"
            else (lambda: getattr(client, call)(HANDLE))
        )
        with pytest.raises(ProviderProtocolError) as info:
            ask()
    assert f"HTTP {code} with an answer over {MAX_ANSWER_BYTES} bytes; not read" in str(info.value)
    (body,) = bodies  # not retried: asked again it would be as large
    assert body.taken <= MAX_ANSWER_BYTES + HugeBody.CHUNK


def test_an_announced_length_over_the_cap_is_refused_before_reading() -> None:
    body = HugeBody(0, start=b'{"status": "COMPLETED"}')
    answer = httpx.Response(200, headers={"Content-Length": str(MAX_ANSWER_BYTES + 1)}, content=body)
    with make_client(Recorder(answer)) as client, pytest.raises(ProviderProtocolError, match="over"):
        client.status(HANDLE)
    assert body.taken == 0


def test_an_answer_just_under_the_cap_is_read_as_before() -> None:
    padded = json.dumps({"status": "COMPLETED", "pad": "x" * (MAX_ANSWER_BYTES - 100)}).encode()
    assert len(padded) <= MAX_ANSWER_BYTES
    with make_client(Recorder(httpx.Response(200, content=padded))) as client:
        assert client.status(HANDLE).completed


SUBMIT_CODES = [200, 503, 422]


@pytest.mark.parametrize("code", SUBMIT_CODES)
def test_a_submit_answer_over_the_cap_is_ambiguous_and_read_no_further(code: int) -> None:
    """Before, the submit answer was read whole (a 400 MiB one took the process to 2.1 GB).
    fal received the whole request, so an answer it cannot read leaves it maybe queued:
    ambiguous (submit_unknown), never "not queued" — a 503 page would otherwise be resent."""
    bodies: list[HugeBody] = []

    def answer(_request: httpx.Request) -> httpx.Response:
        bodies.append(HugeBody(16 * MAX_ANSWER_BYTES, start=json.dumps(submitted_body()).encode()[:-1]))
        return httpx.Response(code, content=bodies[-1])

    recorder = Recorder(answer)
    with make_client(recorder) as client, pytest.raises(AmbiguousSubmitError) as info:
        client.submit(EP, {"prompt": "p"})
    assert f"HTTP {code} with an answer over {MAX_ANSWER_BYTES} bytes" in str(info.value)
    assert "may be queued" in str(info.value)
    assert info.value.status_code == code
    (body,) = bodies
    assert body.taken <= MAX_ANSWER_BYTES + HugeBody.CHUNK
    assert recorder.count("POST") == 1


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class DrippedBody:
    """A body of ``start`` then single spaces, each arriving ``every`` (fake) seconds later:
    every read is well inside the read timeout, the answer never ends (ended after ``most``)."""

    def __init__(self, clock: FakeClock, start: bytes, every: float = 2.0, most: int = 1000) -> None:
        self.clock = clock
        self.start = start
        self.every = every
        self.most = most
        self.taken = 0

    def __iter__(self) -> Iterator[bytes]:
        yield self.start
        while self.taken < self.most:
            self.clock.now += self.every
            self.taken += 1
            yield b" "


def client_with_clock(recorder: Recorder, clock: FakeClock, *, attempts: int = 3) -> FalClient:
    return FalClient(
        queue_url=QUEUE,
        rest_url=REST,
        key=KEY,
        timeout=httpx.Timeout(30.0, read=5.0),
        transport=httpx.MockTransport(recorder),
        retry=RetryPolicy(attempts=attempts, base_delay=0.0),
        sleep=lambda _s: None,
        clock=clock,
    )


DRIPPED_CALLS: list[tuple[str, int, bytes]] = [
    ("status", 200, b'{"status": "COMPLETED"}'),
    ("result", 200, b'{"video": {"url": "https://v3.fal.media/files/x.mp4"}}'),
    ("cancel", 202, b'{"status": "CANCELLATION_REQUESTED"}'),
]


@pytest.mark.parametrize(("call", "code", "start"), DRIPPED_CALLS, ids=[c for c, _, _ in DRIPPED_CALLS])
def test_an_answer_dripped_in_forever_is_a_retryable_error_after_the_read_timeout(
    call: str, code: int, start: bytes
) -> None:
    """Before, a result answer that sent one space every 2 s (read timeout 5 s) was read for
    ever: the job stayed ``downloading``. Now the read timeout also bounds the whole answer."""
    clock = FakeClock()
    bodies: list[DrippedBody] = []

    def answer(_request: httpx.Request) -> httpx.Response:
        bodies.append(DrippedBody(clock, start))
        return httpx.Response(code, content=bodies[-1])

    recorder = Recorder(answer)
    with client_with_clock(recorder, clock) as client, pytest.raises(RetryableProviderError) as info:
        getattr(client, call)(HANDLE)
    assert f"HTTP {code} with an answer not read whole within 5 s (WANBATCH_READ_TIMEOUT)" in str(info.value)
    assert len(bodies) == (1 if call == "cancel" else 3)  # cancel is never retried; the others are
    assert all(body.taken == 3 for body in bodies)  # 6 s > 5 s: stopped at the third space


def test_a_dripped_submit_answer_is_ambiguous_and_posted_once() -> None:
    clock = FakeClock()
    body = DrippedBody(clock, json.dumps(submitted_body()).encode())
    recorder = Recorder(httpx.Response(200, content=body))
    with client_with_clock(recorder, clock) as client, pytest.raises(AmbiguousSubmitError) as info:
        client.submit(EP, {"prompt": "p"})
    assert "not read whole within 5 s" in str(info.value)
    assert "may be queued" in str(info.value)
    assert body.taken == 3
    assert recorder.count("POST") == 1


def test_an_answer_that_arrives_within_the_budget_is_read_as_before() -> None:
    clock = FakeClock()
    body = DrippedBody(clock, b'{"status": "COMPLETED"}', every=1.0, most=4)
    with client_with_clock(Recorder(httpx.Response(200, content=body)), clock) as client:
        assert client.status(HANDLE).completed
    assert body.taken == 4


# ------------------------------------------------------------------ what fal echoes in names

SECRET = KEY.split(":", 1)[1]


def _echoing(code: int, *, body_type: str | None = None, header_type: str | None = None) -> Handler:
    """fal (or anything on its path) answering ``code`` with the caller's own key echoed, taken
    from the Authorization header, where ``body_type``/``header_type`` name it: ``key`` for the
    key, ``secret`` for its secret half, ``request_id`` for ``x-fal-request-id`` = the key."""

    def answer(request: httpx.Request) -> httpx.Response:
        key = request.headers["authorization"].split(" ", 1)[1]
        echo = {"key": key, "secret": key.split(":", 1)[1]}
        body: dict[str, object] = {"detail": "invalid input"}
        headers: dict[str, str] = {}
        if body_type is not None:
            body["error_type"] = echo.get(body_type, body_type)
        if header_type == "request_id":
            headers["x-fal-request-id"] = key
        elif header_type is not None:
            headers["x-fal-error-type"] = echo.get(header_type, header_type)
        return httpx.Response(code, json=body, headers=headers)

    return answer


def _call(client: FalClient, call: str) -> object:
    """One submit, result or status call of ``client``."""
    if call == "submit":
        return client.submit(EP, {})
    if call == "result":
        return client.result(HANDLE)
    return client.status(HANDLE)


def _every_field(err: ProviderError) -> str:
    return repr((str(err), err.args, err.error_type, err.request_id, err.detail))


@pytest.mark.parametrize("call", ["submit", "result", "status"])
@pytest.mark.parametrize(
    ("body_type", "header_type"),
    [("key", None), ("secret", None), (None, "key"), (None, "secret"), (None, "request_id")],
)
def test_a_key_echoed_as_error_type_or_request_id_is_dropped(
    call: str, body_type: str | None, header_type: str | None
) -> None:
    rec = Recorder(_echoing(422, body_type=body_type, header_type=header_type))
    with make_client(rec) as client, pytest.raises(ProviderError) as info:
        _call(client, call)
    err = info.value
    assert (err.error_type, err.request_id) == (None, None)  # dropped: stored masked, it would name nothing
    assert SECRET not in _every_field(err)
    assert SECRET[:16] not in _every_field(err)
    assert info.value.detail == "invalid input"  # the rest of fal's answer is kept


def test_a_key_echoed_in_the_body_leaves_the_header_error_type_standing() -> None:
    rec = Recorder(_echoing(504, body_type="key", header_type="request_timeout"))
    with make_client(rec) as client, pytest.raises(RequestFailedError) as info:
        client.result(HANDLE)
    assert info.value.error_type == "request_timeout"


@pytest.mark.parametrize(
    "error_type", ["runner disconnected", "a:b", "x" * 65, "<script>", "type\n", "***"], ids=repr
)
def test_an_error_type_of_another_shape_is_dropped(error_type: str) -> None:
    rec = Recorder(httpx.Response(400, json={"detail": "boom", "error_type": error_type}))
    with make_client(rec) as client, pytest.raises(FinalProviderError) as info:
        client.result(HANDLE)
    assert info.value.error_type is None


@pytest.mark.parametrize("error_type", ["request_timeout", "runner_server_error", "bad_request", "x" * 64])
def test_error_types_of_fal_s_shape_are_kept(error_type: str) -> None:
    rec = Recorder(
        httpx.Response(
            400, json={"detail": "boom", "error_type": error_type}, headers={"x-fal-request-id": RID}
        )
    )
    with make_client(rec) as client, pytest.raises(ProviderError) as info:
        client.result(HANDLE)
    assert (info.value.error_type, info.value.request_id) == (error_type, RID)


def test_a_status_error_type_that_holds_the_key_is_dropped() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        key = request.headers["authorization"].split(" ", 1)[1]
        return httpx.Response(200, json={"status": "COMPLETED", "error": "failed", "error_type": key})

    with make_client(Recorder(answer)) as client:
        status = client.status(HANDLE)
    assert (status.error, status.error_type) == ("failed", None)


@pytest.mark.parametrize("gateway", ["key", "secret", "a/../b", "id with spaces", 7])
def test_a_gateway_request_id_that_echoes_the_key_or_is_no_id_is_dropped(gateway: object) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        key = request.headers["authorization"].split(" ", 1)[1]
        echo = {"key": key, "secret": key.split(":", 1)[1]}
        body = submitted_body()
        body["gateway_request_id"] = echo.get(gateway, gateway) if isinstance(gateway, str) else gateway
        return httpx.Response(200, json=body)

    with make_client(Recorder(answer)) as client:
        sub = client.submit(EP, {})
    assert sub.request_id == RID  # the submit itself stands: only the echo is not kept
    assert sub.gateway_request_id is None


def test_a_request_id_that_echoes_the_key_is_ambiguous_and_says_why() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        key = request.headers["authorization"].split(" ", 1)[1]
        return httpx.Response(
            200, json={**submitted_body(), "request_id": key}, headers={"x-fal-request-id": key}
        )

    with make_client(Recorder(answer)) as client, pytest.raises(AmbiguousSubmitError) as info:
        client.submit(EP, {})
    assert "holds the API key" in str(info.value)
    assert info.value.request_id is None
    assert SECRET not in _every_field(info.value)


def test_with_body_copies_a_response_with_its_body_and_the_headers_kept() -> None:
    """The one copy the client (read_capped) and storage (_error_prefix) both make."""
    from worker.fal.http import with_body

    request = httpx.Request("GET", "https://queue.fal.run/x")
    original = httpx.Response(
        422,
        headers=[("Content-Encoding", "gzip"), ("Link", "<a>"), ("link", "<b>"), ("X-Fal-Request-Id", "r1")],
        stream=httpx.ByteStream(b"ignored"),
        request=request,
        extensions={"http_version": b"HTTP/1.1"},
    )
    copy = with_body(original, b'{"detail": []}', drop=("content-encoding",))
    assert (copy.status_code, copy.request, copy.extensions) == (422, request, original.extensions)
    assert copy.content == b'{"detail": []}'
    assert "content-encoding" not in copy.headers
    assert copy.headers.get_list("link") == ["<a>", "<b>"]
    assert copy.headers["x-fal-request-id"] == "r1"
    dropped = with_body(original, b"", drop=("LINK", "content-encoding"))
    assert [k for k, _v in dropped.headers.multi_items()] == ["x-fal-request-id"]
