"""Answers read within bounds however they are sent: compressed bodies are inflated a bounded
step at a time (:func:`worker.fal.http.decoded_chunks`), status-stream events are cut at their
size and time (:func:`worker.fal.sse.event_data`). The end-to-end cases, against a hostile fal,
are in ``tests/e2e/test_hostile_bombs.py``."""

from __future__ import annotations

import gzip
import itertools
import zlib
from collections.abc import Iterator

import httpx
import pytest

from jobs.errors import RetryableProviderError
from tests.hostile import gzip_bomb, traced_peak
from worker.fal.client import MAX_ANSWER_BYTES, FalClient, read_capped
from worker.fal.errors import ProviderProtocolError
from worker.fal.http import ACCEPT_ENCODING, INFLATE_STEP, build_http_client, decoded_chunks
from worker.fal.models import RequestHandle
from worker.fal.sse import event_data

BODY = b'{"status": "COMPLETED", "note": "' + b"x" * 300_000 + b'"}'


def _streamed(chunks: list[bytes], encoding: str | None) -> httpx.Response:
    """A response as ``Client.stream`` hands it over: headers in, body not read yet."""
    headers = {"Content-Encoding": encoding} if encoding is not None else {}
    return httpx.Response(200, headers=headers, content=iter(chunks))


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize(
    ("encoding", "wire"),
    [
        (None, BODY),
        ("identity", BODY),
        ("gzip", gzip.compress(BODY)),
        ("x-gzip", gzip.compress(BODY)),
        ("deflate", zlib.compress(BODY)),
        ("deflate", _raw_deflate(BODY)),  # sent raw, as some servers do
        ("gzip, gzip", gzip.compress(gzip.compress(BODY))),
        ("GZIP , identity", gzip.compress(BODY)),
    ],
    ids=["none", "identity", "gzip", "x-gzip", "deflate", "raw-deflate", "gzip-gzip", "case-identity"],
)
@pytest.mark.parametrize("piece", [1, 7, 65536])
def test_every_coding_asked_for_decodes_in_bounded_pieces(
    encoding: str | None, wire: bytes, piece: int
) -> None:
    pieces = list(decoded_chunks(_streamed(_pieces(wire, piece), encoding)))
    assert b"".join(pieces) == BODY
    if encoding not in (None, "identity"):
        assert max(map(len, pieces)) <= INFLATE_STEP


def test_a_body_that_inflates_to_hundreds_of_mb_is_inflated_only_as_far_as_it_is_read() -> None:
    bomb = gzip_bomb(200 << 20)  # made before memory is traced
    with traced_peak() as peak:
        pieces = decoded_chunks(_streamed([bomb], "gzip, gzip"))
        taken = sum(len(p) for p in itertools.islice(pieces, 40))
    assert taken == 40 * INFLATE_STEP
    assert peak() < 8 << 20, f"{peak() >> 20} MiB held at once"


@pytest.mark.parametrize(
    ("encoding", "words"),
    [
        ("br", "'br'-encoded body"),
        ("gzip, zstd", "'zstd'-encoded body"),
        ("gzip, gzip, gzip", "3 content codings"),
    ],
)
def test_a_coding_not_asked_for_is_refused_before_a_byte_is_read(encoding: str, words: str) -> None:
    with pytest.raises(httpx.DecodingError, match=words):
        decoded_chunks(_streamed([b"whatever"], encoding))


def test_a_body_that_is_not_what_its_coding_says_is_a_protocol_error() -> None:
    with pytest.raises(ProviderProtocolError, match="cannot be decoded: a 'gzip'-encoded body that is not"):
        read_capped(_streamed([b"not gzip at all"], "gzip"), "status")


def test_read_capped_stops_an_inflating_answer_at_the_cap() -> None:
    with traced_peak() as peak, pytest.raises(ProviderProtocolError, match="answer over 1048576 bytes"):
        read_capped(_streamed([gzip_bomb(64 << 20)], "gzip, gzip"), "result")
    assert peak() < 3 * MAX_ANSWER_BYTES


def test_every_call_to_fal_asks_for_the_codings_it_decodes() -> None:
    client = build_http_client(timeout=httpx.Timeout(1.0))
    assert client.headers["accept-encoding"] == ACCEPT_ENCODING == "gzip, deflate"
    client.close()


# ------------------------------------------------------------------------------ status stream


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _events(chunks: list[bytes], clock: Clock | None = None, **limits: int) -> list[str]:
    return list(event_data(chunks, what="status stream", seconds=5.0, clock=clock or Clock(), **limits))


@pytest.mark.parametrize("piece", [1, 2, 3, 64])
def test_events_are_split_on_every_line_end_wherever_the_chunks_break(piece: int) -> None:
    stream = (
        b": keep-alive\r\n\r\n"
        b"data: one\r\n\r\n"
        b"data:two\r\rdata: three\n"
        b"data: lines\nevent: status\nid: 7\n\n"
        b"data:\n\n"
        b"data: left open"
    )
    assert _events(_pieces(stream, piece)) == ["one", "two", "three\nlines", ""]


def test_an_event_over_the_cap_is_dropped_however_it_is_split() -> None:
    with pytest.raises(ProviderProtocolError, match="an event over 1000 bytes"):
        _events([b"data: " + b"a" * 600, b"\ndata: " + b"b" * 600 + b"\n"], max_event=1000)
    with pytest.raises(ProviderProtocolError, match="an event over 1000 bytes"):
        _events([b"data: " + b"a" * 500] * 3, max_event=1000)  # one line, no end


def test_a_stream_over_its_cap_is_left_though_each_event_is_small() -> None:
    flood = [b": keep-alive\n" * 100] * 20
    with pytest.raises(ProviderProtocolError, match="the stream sent over 20000 bytes"):
        _events(flood, max_stream=20_000)


def test_an_event_not_whole_within_the_read_timeout_is_given_up_on() -> None:
    clock = Clock()

    def drip() -> Iterator[bytes]:
        yield b'data: {"status": "IN_'
        for _ in range(10):
            clock.now += 1.0  # each piece in time for a read timeout: only the event's own bound ends it
            yield b"Q"

    with pytest.raises(RetryableProviderError, match=r"not read whole within 5 s"):
        list(event_data(drip(), what="status stream", seconds=5.0, clock=clock))


def test_keep_alive_comments_spaced_out_are_no_slow_event() -> None:
    clock = Clock()

    def quiet() -> Iterator[bytes]:
        for _ in range(10):
            clock.now += 4.0
            yield b": keep-alive\n\n"
        yield b"data: done\n\n"

    assert list(event_data(quiet(), what="status stream", seconds=5.0, clock=clock)) == ["done"]


def test_a_compressed_status_stream_is_read_event_by_event() -> None:
    events = b'data: {"status": "IN_PROGRESS"}\n\ndata: {"status": "COMPLETED"}\n\n'
    answer = httpx.Response(
        200,
        headers={"content-type": "text/event-stream", "content-encoding": "gzip"},
        content=iter(_pieces(gzip.compress(events), 5)),
    )
    base = "https://queue.fal.run/fal-ai/wan-22/requests/r1"
    with FalClient(
        queue_url="https://queue.fal.run",
        rest_url="https://rest.alpha.fal.ai",
        key="k",
        timeout=httpx.Timeout(5.0),
        transport=httpx.MockTransport(lambda _request: answer),
    ) as client:
        handle = RequestHandle("fal-ai/wan-22", "r1", f"{base}/status", base, f"{base}/cancel")
        assert [s.state for s in client.stream_status(handle)] == ["IN_PROGRESS", "COMPLETED"]


def test_a_status_stream_event_without_end_is_dropped_at_the_cap() -> None:
    def flood() -> Iterator[bytes]:
        yield b"data: "
        while True:
            yield b"a" * 65536

    answer = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=flood())
    base = "https://queue.fal.run/fal-ai/wan-22/requests/r1"
    with (
        FalClient(
            queue_url="https://queue.fal.run",
            rest_url="https://rest.alpha.fal.ai",
            key="k",
            timeout=httpx.Timeout(5.0),
            transport=httpx.MockTransport(lambda _request: answer),
        ) as client,
        traced_peak() as peak,
        pytest.raises(ProviderProtocolError, match="an event over 1048576 bytes"),
    ):
        list(
            client.stream_status(
                RequestHandle("fal-ai/wan-22", "r1", f"{base}/status", base, f"{base}/cancel")
            )
        )
    assert peak() < 3 * MAX_ANSWER_BYTES
