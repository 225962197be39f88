"""fal's status stream read as server-sent events, within bounds of size and time.

An event stream has no length: ``httpx_sse``'s ``iter_sse()`` buffers a line until its newline,
however long, so a ``/status/stream`` that sent ``data: aaaa…`` without end grew a worker to
1.6 GB while its job sat ``queued``. Here every event (its lines, and the one still arriving)
is held to :data:`MAX_EVENT_BYTES` and to the time any answer has to arrive whole
(``WANBATCH_READ_TIMEOUT``), the whole stream to :data:`MAX_STREAM_BYTES`; the bytes come from
:func:`~worker.fal.http.decoded_chunks`, so a compressed stream is inflated a bounded step at a
time. A stream over a bound raises, and the caller polls instead.

Parsing follows https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
for what fal's stream uses: ``data`` lines (joined by newlines), comments (fal's keep-alive),
and a blank line ending an event; other fields are ignored, as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

from jobs.errors import RetryableProviderError
from worker.fal.errors import ProviderProtocolError

#: The most bytes of one event (its ``data``, and a line still arriving): as for every answer
#: (:data:`worker.fal.client.MAX_ANSWER_BYTES`).
MAX_EVENT_BYTES = 1024 * 1024
#: The most bytes one status stream may send: a few hundred events of a few hundred bytes,
#: plus a keep-alive comment every 15 s, is what a job's stream holds; this is far more.
MAX_STREAM_BYTES = 16 * 1024 * 1024

_LINE_END = re.compile(rb"\r\n?|\n")


def event_data(
    chunks: Iterable[bytes],
    *,
    what: str,
    seconds: float | None,
    clock: Callable[[], float],
    max_event: int = MAX_EVENT_BYTES,
    max_stream: int = MAX_STREAM_BYTES,
) -> Iterator[str]:
    """The ``data`` of each event in the byte stream ``chunks`` (UTF-8; events without data left out).

    :class:`ProviderProtocolError` when an event (or a line of one) is over ``max_event`` bytes,
    or the stream over ``max_stream``; :class:`RetryableProviderError` when an event is not
    whole within ``seconds`` of its first byte (``None``: no bound) — the answer time every
    other answer has (:class:`worker.fal.client.AnswerBudget`). A keep-alive comment is an
    event of its own here: the time of the next starts after it.
    """
    pending = bytearray()  # the line still arriving
    skip_lf = False  # the last chunk ended in CR: a LF first in the next ends the same line
    data = bytearray()  # the event's data lines so far, joined by newlines
    has_data = False
    total = 0
    started: float | None = None  # when the first byte of the event under way arrived
    for chunk in chunks:
        total += len(chunk)
        if total > max_stream:
            raise ProviderProtocolError(f"fal {what}: the stream sent over {max_stream} bytes; left")
        start = 1 if skip_lf and chunk[:1] == b"\n" else 0
        skip_lf = False
        for end in _LINE_END.finditer(chunk, start):
            pending += chunk[start : end.start()]
            start = end.end()
            skip_lf = end.group() == b"\r" and start == len(chunk)
            line = bytes(pending)
            pending.clear()
            if not line:  # an event ends
                if has_data:
                    yield data.decode("utf-8", "replace")
                data, has_data, started = bytearray(), False, None
                continue
            if line.startswith(b":"):  # a comment: fal's keep-alive
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                data += b"\n" if has_data else b""
                data += value[1:] if value.startswith(b" ") else value
                has_data = True
        pending += chunk[start:]
        if len(data) + len(pending) > max_event:
            raise ProviderProtocolError(f"fal {what}: an event over {max_event} bytes; not read")
        if has_data or pending:
            # Taken after the lines above were handed on: the time the caller took is not the stream's.
            started = clock() if started is None else started
            if seconds is not None and clock() - started > seconds:
                raise RetryableProviderError(
                    f"fal {what}: an event not read whole within {seconds:g} s "
                    "(WANBATCH_READ_TIMEOUT); left unread"
                )
        else:
            started = None
