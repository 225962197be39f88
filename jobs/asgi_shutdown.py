"""A request still running when its server stops ends with an answer, not a traceback.

uvicorn stops in two ways that cancel the tasks of requests still running: once
``timeout_graceful_shutdown`` has passed (``Server.shutdown`` cancels each and says
``Cancel N running task(s), timeout graceful shutdown exceeded``), and on a second Ctrl-C (a
forced exit: the event loop's runner cancels every task left as it closes). uvicorn's
``run_asgi`` logs whatever the app raises, a :class:`asyncio.CancelledError` included, as
``Exception in ASGI application`` with its full traceback, and answers a bare 500; the lifespan,
cancelled on a forced exit, is logged with a traceback too (Starlette reports it as
``lifespan.shutdown.failed`` with the traceback's text).

:class:`EndsCleanly`, the outermost ASGI layer of each of our servers (``wanbatch serve``'s app,
:func:`web.app.create_app`; the simulator's, :func:`falsim.server.build_app`), takes that
cancellation where it arrives:

- a request whose response had not started is answered ``503`` with ``Connection: close`` and
  the server's own JSON body (:data:`STOPPED`), and logged in one warning line;
- one whose response had started (a video a client reads slowly, a stream) is cut: its
  connection is reset (the client sees a response cut short, never a short one that looks
  whole), or, where the connection cannot be reached (not uvicorn's HTTP protocol), its last
  chunk is sent;
- a lifespan ends quietly, its "failed" report not passed on.

The process goes on stopping as it would have: its exit status is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from jobs.printable import one_line

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)

#: The scope key under which :class:`EndsCleanly` keeps the server's own ``send``: its owner (the
#: request's cycle in uvicorn) holds the connection's transport, which an app that must reset a
#: connection reaches through it (the simulator's ``submit_drop``); the ``send`` an app is given
#: is a wrapper.
RAW_SEND = "wanbatch.raw_send"
#: What a request still running when the server stopped is told (with its server's own keys).
STOPPED = "the server stopped before this request was answered: send it again"


class EndsCleanly:
    """The outermost ASGI layer: a request or lifespan cancelled because the server stops ends
    without a traceback (see the module). ``body`` is the JSON object a request whose response
    had not started is answered with (status 503); by default ``{"detail": STOPPED}``.

    It must get uvicorn's own ``send`` (nothing between them but uvicorn's proxy-headers
    layer, which passes it on): that is how a response cut mid-body reaches its connection."""

    def __init__(self, app: ASGIApp, body: dict[str, Any] | None = None) -> None:
        self.app = app
        self._answer = json.dumps(body if body is not None else {"detail": STOPPED}).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._other(scope, receive, send)
            return
        scope.setdefault(RAW_SEND, send)
        started = completed = False

        async def tracked(message: Message) -> None:
            nonlocal started, completed
            await send(message)
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if completed:
                return
            if started:
                await _cut(send)
                return
            log.warning(
                "%s %s was still running when the server stopped: answered 503",
                one_line(str(scope.get("method", "?"))),
                one_line(str(scope.get("path", "?"))),
                extra={"event": "server.request_cut", "status": 503},
            )
            with contextlib.suppress(asyncio.CancelledError, Exception):  # the client gone meanwhile
                await send(
                    {
                        "type": "http.response.start",
                        "status": 503,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(self._answer)).encode()),
                            (b"connection", b"close"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": self._answer, "more_body": False})

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The lifespan (or a websocket): cancelled, it ends quietly. Starlette reports a
        lifespan that raised as ``lifespan.shutdown.failed`` with the traceback's text, which
        uvicorn logs: for a cancellation (a forced exit), that report is not passed on."""

        async def unless_cancelled(message: Message) -> None:
            task = asyncio.current_task()
            cancelled = task is not None and task.cancelling() > 0
            if cancelled and str(message.get("type", "")).endswith(".failed"):
                return
            await send(message)

        with contextlib.suppress(asyncio.CancelledError):
            await self.app(scope, receive, unless_cancelled)


#: How often a stopping server looks whether a second signal asked for a forced exit.
FORCED_EXIT_POLL_SECONDS = 0.1


class ForcedExitEndsShutdown:
    """A mixin for :class:`uvicorn.Server` (put it first): a forced exit (a second Ctrl-C) ends
    the graceful shutdown at once, on every Python.

    uvicorn's shutdown ends by waiting for its listening servers to close
    (``asyncio.Server.wait_closed``). Before CPython 3.12 that returned at once; since, it waits
    for every connection to close (https://github.com/python/cpython/issues/104344, and uvicorn's
    https://github.com/Kludex/uvicorn/pull/2145): a forced exit only ends uvicorn's own waiting
    loops, so a request still running (a webhook body still arriving, a video a client stopped
    reading) held ``wanbatch serve`` until the request's own deadline — 10 s of a second Ctrl-C
    doing nothing. Here the shutdown is stopped as soon as the forced exit is asked for; the
    event loop's runner then cancels what is still running, as it did before 3.12, and
    :class:`EndsCleanly` answers each such request (503) or cuts it."""

    force_exit: bool

    async def shutdown(self, sockets: Any = None) -> None:
        stopping = asyncio.ensure_future(super().shutdown(sockets=sockets))  # type: ignore[misc]
        try:
            while not stopping.done() and not self.force_exit:
                await asyncio.wait({stopping}, timeout=FORCED_EXIT_POLL_SECONDS)
        finally:
            if not stopping.done():
                stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping


async def _cut(send: Send) -> None:
    """End a response cut mid-body: reset its connection (uvicorn's cycle, the owner of its
    ``send``, holds the transport), and let uvicorn see the disconnect before the app returns,
    so it has nothing to report. Without a transport, the last chunk is sent instead."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        if transport is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        transport.abort()
        await asyncio.sleep(0)  # connection_lost, scheduled by abort(), runs first
