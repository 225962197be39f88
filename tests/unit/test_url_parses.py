"""How often httpx parses a URL for the calls of one job (issue #11): httpx looks at every
character of a URL string it is handed (about 250 Python calls a URL), so the fal client hands
it each URL once, and the submit's (the same for every job of an endpoint) once per process."""

from __future__ import annotations

import httpx
import httpx._urlparse
import httpx._urls
import pytest

from worker.fal import client as fal_client
from worker.fal.client import FalClient
from worker.fal.http import RetryPolicy
from worker.fal.models import RequestHandle

QUEUE = "https://queue.test"
EP = "fal-ai/wan-25-preview/image-to-video"
RID = "80e732af-0000-4000-8000-000000000001"
BASE = f"{QUEUE}/fal-ai/wan-25-preview/requests/{RID}"


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URLs httpx parses (``urlparse``: a string given, or the parts of one a query is merged
    into), but the empty one (a client's ``base_url``, built once: nothing to look at)."""
    seen: list[str] = []
    real = httpx._urlparse.urlparse

    def spy(url: str = "", **kwargs: str | None) -> httpx._urlparse.ParseResult:
        result = real(url, **kwargs)
        if url or any(kwargs.values()):
            seen.append(str(result))
        return result

    monkeypatch.setattr(httpx._urlparse, "urlparse", spy)
    monkeypatch.setattr(httpx._urls, "urlparse", spy)
    return seen


def client_answering(answer: httpx.Response) -> FalClient:
    return FalClient(
        queue_url=QUEUE,
        rest_url="https://rest.test",
        key=None,
        timeout=httpx.Timeout(5.0),
        transport=httpx.MockTransport(lambda request: answer),
        retry=RetryPolicy(attempts=1),
        sleep=lambda _s: None,
    )


def test_a_handle_with_fals_own_urls_parses_none(parsed: list[str]) -> None:
    handle = RequestHandle.trusted(
        QUEUE, EP, RID, status_url=f"{BASE}/status", response_url=BASE, cancel_url=f"{BASE}/cancel"
    )
    assert handle == RequestHandle.from_request_id(QUEUE, EP, RID)
    assert parsed == []


def test_urls_other_than_the_derived_ones_are_still_checked(parsed: list[str]) -> None:
    own = f"{QUEUE}/fal-ai/requests/{RID}"  # under the queue, not the derived layout: kept, once parsed
    handle = RequestHandle.trusted(
        QUEUE, EP, RID, status_url=f"{own}/status", response_url=own, cancel_url=f"{own}/cancel"
    )
    assert handle.response_url == own
    assert parsed  # looked at
    foreign = f"https://elsewhere.test/fal-ai/wan-25-preview/requests/{RID}"
    handle = RequestHandle.trusted(
        QUEUE, EP, RID, status_url=f"{foreign}/status", response_url=foreign, cancel_url=f"{foreign}/cancel"
    )
    assert handle == RequestHandle.from_request_id(QUEUE, EP, RID)


def test_a_handle_of_an_unknown_endpoint_shape_keeps_the_answers_urls_on_the_queue() -> None:
    """As before the derived handle was built first: not derivable, yet the answer's URLs are kept."""
    own = f"{QUEUE}/single/requests/{RID}"
    handle = RequestHandle.trusted(
        QUEUE, "single", RID, status_url=f"{own}/status", response_url=own, cancel_url=f"{own}/cancel"
    )
    assert handle.status_url == f"{own}/status"
    with pytest.raises(ValueError, match="not a fal endpoint id"):
        RequestHandle.trusted(QUEUE, "single", RID)


def test_the_submit_url_is_parsed_once_for_many_jobs(parsed: list[str]) -> None:
    cached = getattr(fal_client, "_parsed_url", None)  # parsed before, by another test: forgotten
    if cached is not None:
        cached.cache_clear()
    answer = httpx.Response(200, json={"request_id": RID, "status": "IN_QUEUE"})
    with client_answering(answer) as client:
        for _ in range(3):
            submitted = client.submit(EP, {"prompt": "p"})
            assert submitted.handle == RequestHandle.from_request_id(QUEUE, EP, RID)
    assert parsed.count(f"{QUEUE}/{EP}") == 1
    assert len(parsed) == 1


def test_the_status_stream_url_is_parsed_once(parsed: list[str]) -> None:
    body = 'data: {"status": "COMPLETED"}\n\n'
    answer = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())
    seen: list[httpx.URL] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return answer

    client = client_answering(answer)
    client._transport = httpx.MockTransport(record)
    with client:
        for logs in (False, True):
            assert [
                s.state
                for s in client.stream_status(RequestHandle.from_request_id(QUEUE, EP, RID), logs=logs)
            ] == ["COMPLETED"]
    assert [str(url) for url in seen] == [f"{BASE}/status/stream?logs=0", f"{BASE}/status/stream?logs=1"]
    assert parsed == [f"{BASE}/status/stream?logs=0", f"{BASE}/status/stream?logs=1"]


def test_status_streams_hold_connections_in_a_pool_of_their_own() -> None:
    """A stream holds its connection while its request runs: in the pool of the submits and
    results, httpcore looked at every held stream at each of their calls (issue #11)."""
    body = 'data: {"status": "COMPLETED"}\n\n'
    answer = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())
    client = client_answering(answer)
    handle = RequestHandle.from_request_id(QUEUE, EP, RID)
    assert [s.state for s in client.stream_status(handle)] == ["COMPLETED"]
    assert client._http is None  # the stream never built the other client
    streams = client.streams_http
    assert streams is not client.http
    client.close()
    assert streams.is_closed
    assert client.http.is_closed
    with FalClient(
        queue_url=QUEUE, rest_url="https://rest.test", key=None, timeout=httpx.Timeout(5.0)
    ) as real:
        pools = [http._transport._pool for http in (real.http, real.streams_http)]  # type: ignore[attr-defined]
        assert pools[0] is not pools[1]
