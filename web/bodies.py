"""Reading a request's body without letting an anonymous sender hold the server's memory.

The webhook receiver and the login form read a body before anything authenticates its sender
(fal's signature is checked on the body; the login form carries the token). Read naively, a
sender could fill the process's memory: a chunked body is not declared, a slow one can trickle
for ever, many at once add up. :func:`read_body` bounds every one of those: a size cap (checked
as the chunks arrive), a total deadline for the whole body (a sender that goes silent is cut off
with 408, not waited on), and, for the receiver, a process-wide :class:`BodyBudget` of buffered
bytes (503 beyond it: fal retries). A client that disconnects mid-body is a refusal too (one log
line by the caller, never a traceback).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
from starlette.requests import ClientDisconnect, Request

#: Seconds a sender has to deliver a whole body (a webhook of at most 1 MiB, a login form): a
#: few seconds is plenty for either; a sender that goes silent is answered 408 after it.
BODY_DEADLINE = 10.0
#: Bytes of webhook bodies the receiver holds at once, in all: a flood of large, slow, unsigned
#: bodies is answered 503 beyond it instead of growing the process.
MAX_BUFFERED_BODY_BYTES = 32 * 1024 * 1024

TOO_LARGE = "the body is too large"
TOO_SLOW = "the body was not received in time"
DISCONNECTED = "the client disconnected before sending the whole body"
_DIGITS = re.compile(r"[0-9]+")
BUSY = "the receiver holds too many bodies at once: try again in a moment"


@dataclass(frozen=True)
class Refusal:
    """Why a body was not read, and the HTTP status that says so."""

    status: int
    reason: str


class BodyBudget:
    """The bytes of bodies being held by this process, capped at ``limit`` in all.

    Counted on the event loop only (every body is read there), so it needs no lock."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = MAX_BUFFERED_BODY_BYTES if limit is None else limit
        self.held = 0

    @contextmanager
    def tab(self) -> Iterator[Tab]:
        """A tab for one request's body: what it took is given back when the request is done."""
        tab = Tab(self)
        try:
            yield tab
        finally:
            self.held -= tab.taken


class Tab:
    """One request's share of a :class:`BodyBudget`."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.taken = 0

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes, or False (nothing taken) when the budget cannot."""
        if self.budget.held + size > self.budget.limit:
            return False
        self.budget.held += size
        self.taken += size
        return True


def declares_more_than(content_length: str | None, cap: int) -> bool:
    """Whether a ``Content-Length`` declares more than ``cap`` bytes. Any number of ASCII digits
    counts: 20 of them declare more than any cap, and are refused at once (413) rather than
    taken for "no length" and waited on until the deadline (408). Anything else (absent, not
    digits) declares nothing: the cap is then enforced as the chunks arrive."""
    if content_length is None or _DIGITS.fullmatch(content_length) is None:
        return False
    digits = content_length.lstrip("0") or "0"
    return len(digits) > len(str(cap)) or int(digits) > cap  # the length first: no 4,300-digit int()


async def read_body(
    request: Request, *, cap: int, deadline: float | None = None, tab: Tab | None = None
) -> bytes | Refusal:
    """The request's body, or the :class:`Refusal` that stopped reading it: past ``cap`` bytes
    (413), not all in within ``deadline`` seconds (408; default :data:`BODY_DEADLINE`), past the
    ``tab``'s budget (503), or the client gone (400, for the log: nobody reads the answer). A
    ``Content-Length`` beyond ``cap`` is refused (413) before any byte is read."""
    if declares_more_than(request.headers.get("content-length"), cap):
        return Refusal(413, TOO_LARGE)
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(BODY_DEADLINE if deadline is None else deadline) as scope:
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    return Refusal(413, TOO_LARGE)
                if tab is not None and not tab.take(len(chunk)):
                    return Refusal(503, BUSY)
                chunks.append(chunk)
        except ClientDisconnect:
            return Refusal(400, DISCONNECTED)
    if scope.cancelled_caught:
        return Refusal(408, TOO_SLOW)
    return b"".join(chunks)
