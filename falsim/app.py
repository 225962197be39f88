"""The simulator's HTTP surface: fal's queue API, its storage API, a JWKS, and a control API.

Routes (one server plays ``queue.fal.run``, ``rest.fal.ai`` and the CDN at once):

- ``POST /{endpoint id}[?fal_webhook=…]`` submit · ``GET /{owner}/{alias}/requests/{id}[/]`` result ·
  ``GET …/status[/]?logs=0|1|true|false`` · ``GET …/status/stream`` (SSE) · ``PUT …/cancel``;
  ``workflows/`` and ``comfy/`` ids keep one more leading segment.
- ``POST /storage/upload/initiate`` → ``PUT /storage/upload/{key}`` (fal's "initiate" upload),
  ``POST /storage/auth/token`` + ``POST /files/upload`` (fal_client's CDN v3 upload),
  ``GET /files/{key}/{name}`` serves uploads and outputs.
- ``GET /.well-known/jwks.json``: the webhook-signing public key.
- ``/_sim/…`` (no auth; its own host and pages only, :func:`control_refusal`): ``GET ledger``,
  ``GET|POST|DELETE faults``,
  ``GET|POST options``, ``POST reset``. ``POST /_sim/faults`` takes a JSON object
  ``{kind: {"probability": p, "next": n, ...params}}`` (kinds: :data:`falsim.faults.FAULTS`),
  adds or replaces those rules (``?replace=1``: drops the others first) and answers the active
  rules and fired counts, as ``GET`` does; an unknown kind or a bad rule is a 400 with the reason.
  ``DELETE`` clears every rule.

The control API has no key: what guards it is that only this machine's own clients (and fal's,
which send none of a browser's headers) reach it, not a web page one of its users has open. A
``Host`` that is no address and none of its names (a page's DNS name rebound to 127.0.0.1, which
could read the ledger's webhook URLs and their binding tokens) is refused 403; so is a request
whose ``Origin`` is not the simulator itself (another site's page posting rules), and a ``POST``
or ``DELETE`` whose body is said to be anything but JSON (415: a page can post ``text/plain``,
form or multipart bodies to any site without asking it first, never JSON).

Dropping a connection after a request was accepted needs the socket itself: the outermost
ASGI layer keeps uvicorn's own ``send`` in the scope, whose owner holds the transport; the
handler sets SO_LINGER 0 and aborts it, so the client sees a reset and no response at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from falsim.engine import COMPLETED, Engine, SimRequest
from jobs.asgi_shutdown import RAW_SEND
from jobs.endpoints import EndpointSpec, all_endpoints
from jobs.endpoints.registry import app_base
from jobs.host_header import host_name, is_loopback_host, names, place
from jobs.printable import one_line

log = logging.getLogger(__name__)

_NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

_NGINX_504 = (
    "<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
    "<center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


#: The ledger's name for a call on a request, by the path after the request id.
_CALLS = {"": "result", "status": "status", "status/stream": "stream", "cancel": "cancel"}


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def abort_connection(request: Request) -> None:
    """Reset the client's TCP connection now, before any response byte is written."""
    send = request.scope.get(RAW_SEND)
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:  # not uvicorn's h11/httptools cycle: nothing better than closing
        raise RuntimeError("cannot reach the connection's transport to drop it")
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _TruncatedResponse(Response):
    """Announces the full length, sends half the body, then resets the connection."""

    def __init__(self, data: bytes, content_type: str, request: Request) -> None:
        super().__init__(content=data, media_type=content_type)
        self._half = data[: len(data) // 2]
        self._request = request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self._half, "more_body": True})
        await asyncio.sleep(0.01)
        abort_connection(self._request)


class SimulatorApp:
    """Builds the Starlette app around one :class:`Engine`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._endpoints: dict[str, EndpointSpec] = {e.id: e for e in all_endpoints()}
        self.starlette = Starlette(
            routes=[
                Route("/.well-known/jwks.json", self.jwks, methods=["GET"]),
                Route("/_sim/ledger", self.sim_ledger, methods=["GET"]),
                Route("/_sim/faults", self.sim_faults, methods=["GET", "POST", "DELETE"]),
                Route("/_sim/options", self.sim_options, methods=["GET", "POST"]),
                Route("/_sim/reset", self.sim_reset, methods=["POST"]),
                Route("/storage/upload/initiate", self.upload_initiate, methods=["POST"]),
                Route("/storage/upload/{key}", self.upload_put, methods=["PUT"]),
                Route("/storage/auth/token", self.cdn_token, methods=["POST"]),
                Route("/files/upload", self.cdn_upload, methods=["POST"]),
                Route("/files/{key}/{name:path}", self.file_get, methods=["GET", "HEAD"]),
                Route("/{path:path}", self.queue, methods=["GET", "POST", "PUT"]),
            ],
            exception_handlers={ClientDisconnect: self._client_gone},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault(RAW_SEND, send)  # EndsCleanly's, when it wraps this app
            if scope["path"].startswith("/_sim/"):
                refused = control_refusal(scope["method"], Headers(scope=scope), self.own_hosts())
                if refused is not None:
                    status, detail = refused
                    log.warning("%s %s: %s", scope["method"], one_line(scope["path"])[:200], detail)
                    await _json(status, {"detail": detail})(scope, receive, send)
                    return
        await self.starlette(scope, receive, send)

    def own_hosts(self) -> frozenset[str]:
        """The names this simulator serves under, besides any address and loopback name: the
        host it was started on and its ``public_url``'s (``--public-url http://simulator:8787``)."""
        urls = (self.engine.served_url, self.engine.base_url, self.engine.options.public_url or "")
        found = (place(url) for url in urls if url)
        return frozenset(where[1] for where in found if where is not None)

    # -- helpers ---------------------------------------------------------------------------

    async def _client_gone(self, request: Request, _exc: Exception) -> Response:
        """The client went away while its request's body was read (a client under load gave up):
        nothing to answer, and no traceback; the server drops this response (nobody reads it)."""
        log.debug("client went away before sending %s %s's body", request.method, request.url.path)
        return Response(status_code=400)

    def _auth(self, request: Request) -> Response | None:
        """401 without ``Authorization: Key|Bearer <non-empty>``; 403 for a locked key."""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        opts = self.engine.options
        if scheme.lower() not in ("key", "bearer") or not key:
            return _json(401, {"detail": "No user found for Key ID and Secret"})
        if opts.accepted_keys is not None and key not in opts.accepted_keys:
            return _json(401, {"detail": "No user found for Key ID and Secret"})
        if key in opts.locked_keys:
            return _json(403, {"detail": "User is locked. Reason: Exhausted balance. Add funds to continue."})
        return None

    async def _hold(self, kind: str) -> None:
        """Hold the answer for the fault's ``delay``, or until the server begins to shut down
        (:meth:`Engine.close_streams`): then it is sent at once, as the streams end, rather than
        cut off once uvicorn's graceful wait has passed."""
        fault = self.engine.faults.fire(kind)
        if fault is None:
            return
        engine = self.engine
        loop = asyncio.get_running_loop()
        until = loop.time() + float(fault.get("delay", 30.0))
        while not engine.closing and (left := until - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(engine.changed.wait(), left)

    # -- queue API -------------------------------------------------------------------------

    async def queue(self, request: Request) -> Response:
        path = request.path_params["path"].strip("/")
        segments = path.split("/")
        denied = self._auth(request)
        if request.method == "POST":
            if path in self._endpoints:
                return denied or await self.submit(request, self._endpoints[path])
            if denied:
                return denied
            return _json(404, {"detail": f"Application '{path}' not found"})
        for index in (2, 3):
            if len(segments) > index + 1 and segments[index] == "requests":
                base = "/".join(segments[:index])
                if app_base(base) == base:
                    return denied or await self._request_op(request, base, segments[index + 1 :])
        if "requests" in segments[1:]:  # a request's path under no app's (a queue URL with a path)
            app = "/".join(segments[: segments.index("requests", 1)])
            return denied or _json(404, {"detail": f"Application '{app}' not found"})
        return denied or _json(404, {"detail": "Not Found"})

    async def submit(self, request: Request, spec: EndpointSpec) -> Response:
        engine = self.engine
        try:
            payload = json.loads(await request.body() or b"null")
        except ValueError:
            engine.ledger.reject(spec.id, 400, "invalid JSON body")
            return _json(400, {"detail": "Request body is not valid JSON", "error_type": "bad_request"})
        for kind, status in (
            ("submit_429", 429),
            ("submit_502", 502),
            ("submit_503", 503),
            ("submit_504_user", 504),
        ):
            if engine.faults.fire(kind) is None:
                continue
            engine.ledger.reject(spec.id, status, kind)
            if status == 502:
                return Response(_NGINX_502, status_code=502, media_type="text/html")
            if status == 429:
                return _json(429, {"detail": "Too many requests"})
            rid = engine.rng.getrandbits(64).to_bytes(8, "big").hex()
            if status == 503:
                unavailable = {
                    "detail": "Service temporarily unavailable",
                    "error_type": "runner_scheduling_failure",
                }
                return _json(
                    503,
                    unavailable,
                    {"x-fal-request-id": rid, "X-Fal-Error-Type": "runner_scheduling_failure"},
                )
            timed_out = {"detail": "Request timed out", "error_type": "request_timeout"}
            return _json(504, timed_out, {"x-fal-request-id": rid, "X-Fal-Request-Timeout-Type": "user"})

        headers = request.headers
        raw_timeout = headers.get("x-fal-request-start-timeout") or headers.get("x-fal-request-timeout")
        start_timeout: float | None = None
        if raw_timeout is not None:
            try:
                start_timeout = float(raw_timeout)
            except ValueError:
                start_timeout = None
            if start_timeout is None or start_timeout <= 0.1:
                detail = "X-Fal-Request-Start-Timeout must be a number greater than 0.1"
                return _json(400, {"detail": detail, "error_type": "bad_request"})
        store_io = None
        if "x-fal-store-io" in headers:
            store_io = headers["x-fal-store-io"].strip().lower() not in ("0", "false", "no")
        req = engine.submit(
            spec,
            payload,
            priority=headers.get("x-fal-queue-priority", "normal").strip().lower(),
            webhook_url=request.query_params.get("fal_webhook"),
            start_timeout=start_timeout,
            store_io=store_io,
            file_ttl=_lifecycle_seconds(headers.get("x-fal-object-lifecycle-preference")),
            fallbacks_disabled=headers.get("x-fal-disable-fallbacks", "").strip().lower()
            in ("1", "true", "yes"),
        )
        body: dict[str, Any] = {
            "request_id": req.request_id,
            "gateway_request_id": req.gateway_request_id,
            "status": req.state,
            **engine.urls(req),
        }
        if req.state == "IN_QUEUE":
            body["queue_position"] = engine.queue_position(req)
        after_accept = engine.faults.fire("submit_504_after_accept")
        if after_accept is not None:  # queued, but the ingress timed out waiting for the answer
            engine.ledger.mark_unseen(req.request_id)
            if int(after_accept.get("status", 504)) == 502:
                return Response(_NGINX_502, status_code=502, media_type="text/html")
            return Response(_NGINX_504, status_code=504, media_type="text/html")
        if engine.faults.fire("submit_drop") is not None:
            engine.ledger.mark_unseen(req.request_id)
            abort_connection(request)
            return Response(b"")
        await self._hold("submit_slow")
        return _json(200, body, {"x-fal-request-id": req.request_id})

    async def _request_op(self, request: Request, base: str, rest: list[str]) -> Response:
        rid = rest[0]
        tail = [s for s in rest[1:] if s]
        self.engine.ledger.count_call(_CALLS.get("/".join(tail), "other"))
        req = self.engine.get(rid, base)
        if request.method == "PUT" and tail == ["cancel"]:
            if req is None:
                return _json(404, {"status": "NOT_FOUND"})
            status, body = self.engine.cancel(req)
            return _json(status, body)
        if request.method != "GET":
            return _json(405, {"detail": "Method Not Allowed"})
        if req is None:
            return _json(404, {"detail": f"Request {rid} not found"})
        with_logs = request.query_params.get("logs", "0").strip().lower() in ("1", "true", "yes")
        if tail == []:
            status, body, headers = self.engine.result(req)
            return _json(status, body, headers)
        if tail == ["status"]:
            if self.engine.faults.fire("status_502") is not None:
                return Response(_NGINX_502, status_code=502, media_type="text/html")
            await self._hold("status_slow")
            body = self.engine.status_body(req, with_logs)
            return _json(200 if req.state == COMPLETED else 202, body)
        if tail == ["status", "stream"]:
            return StreamingResponse(
                self._stream(req, with_logs),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "x-fal-request-id": req.request_id},
            )
        return _json(404, {"detail": "Not Found"})

    async def _stream(self, req: SimRequest, with_logs: bool) -> AsyncIterator[bytes]:
        """SSE: an event per change (each carries only new log lines), keep-alive comments."""
        engine = self.engine
        last: tuple[Any, ...] | None = None
        sent_logs = 0
        drop = engine.faults.fire("status_stream_drop") is not None
        while True:
            changed = engine.changed
            key = (req.state, engine.queue_position(req), len(req.logs))
            if key != last:
                last = key
                body = engine.status_body(req, with_logs, logs_from=sent_logs)
                sent_logs = len(req.logs)
                yield f"data: {json.dumps(body)}\n\n".encode()
                if drop:
                    return
            if req.state == COMPLETED or engine.closing:
                return  # closing: the server shuts down (Engine.close_streams)
            try:
                await asyncio.wait_for(changed.wait(), engine.options.sse_keepalive_seconds)
            except TimeoutError:
                yield b": keep-alive\n\n"

    # -- storage ---------------------------------------------------------------------------

    async def upload_initiate(self, request: Request) -> Response:
        denied = self._auth(request)
        if denied:
            return denied
        try:
            meta = json.loads(await request.body() or b"{}")
        except ValueError:
            meta = {}
        name = str(meta.get("file_name") or "upload.bin")
        content_type = str(meta.get("content_type") or "application/octet-stream")
        key = self.engine.store.reserve(name, content_type)
        return _json(
            200,
            {
                "upload_url": f"{self.engine.base_url}/storage/upload/{key}",
                "file_url": self.engine.store.file_url(key, name),
            },
        )

    async def upload_put(self, request: Request) -> Response:
        stored = self.engine.store.complete(
            request.path_params["key"], await request.body(), request.headers.get("content-type")
        )
        if stored is None:
            return _json(404, {"detail": "Unknown upload"})
        return Response(status_code=200)

    async def cdn_token(self, request: Request) -> Response:
        denied = self._auth(request)
        if denied:
            return denied
        expires = datetime.now(UTC) + timedelta(hours=1)
        token = self.engine.rng.getrandbits(128).to_bytes(16, "big").hex()
        return _json(
            200,
            {
                "token": token,
                "token_type": "Bearer",
                "base_url": self.engine.base_url,
                "expires_at": expires.isoformat(),
            },
        )

    async def cdn_upload(self, request: Request) -> Response:
        denied = self._auth(request)
        if denied:
            return denied
        name = request.headers.get("x-fal-file-name") or "upload.bin"
        content_type = request.headers.get("content-type") or "application/octet-stream"
        stored = self.engine.store.put(await request.body(), name, content_type)
        return _json(200, {"access_url": self.engine.store.file_url(stored.key, name)})

    async def file_get(self, request: Request) -> Response:
        stored = self.engine.store.get(request.path_params["key"])
        if stored is None or unquote(request.path_params["name"]) != stored.name:
            return _json(404, {"detail": "File not found"})
        fault = self.engine.faults.fire("download_error")
        if fault is not None:
            return Response(b"simulated download failure", status_code=int(fault.get("status", 500)))
        if request.method == "HEAD":
            return Response(b"", media_type=stored.content_type, headers={"content-length": str(stored.size)})
        ledger = self.engine.ledger  # the one this GET began in (a reset makes another)
        ledger.download_began()
        try:
            await self._hold("download_slow")
            data = await run_in_threadpool(stored.read)  # a cache miss re-encodes: keep the loop free
        finally:
            ledger.download_ended()
        truncated = self.engine.faults.fire("download_truncated")
        if truncated is not None:
            if truncated.get("mode") == "short":
                return Response(data[: len(data) // 2], media_type=stored.content_type)
            return _TruncatedResponse(data, stored.content_type, request)
        return Response(data, media_type=stored.content_type)

    async def jwks(self, request: Request) -> Response:
        return _json(200, self.engine.signer.jwks())

    # -- control API -----------------------------------------------------------------------

    async def sim_ledger(self, request: Request) -> Response:
        return _json(200, self.engine.ledger_report())

    async def sim_faults(self, request: Request) -> Response:
        faults = self.engine.faults
        if request.method == "DELETE":
            faults.clear()
        elif request.method == "POST":
            replace = bool(request.query_params.get("replace"))
            return await _guarded(lambda body: faults.set(body, replace=replace), request, faults.snapshot)
        return _json(200, faults.snapshot())

    async def sim_options(self, request: Request) -> Response:
        if request.method == "POST":
            return await _guarded(self.engine.update_options, request, lambda: self.engine.options.as_dict())
        return _json(200, self.engine.options.as_dict())

    async def sim_reset(self, request: Request) -> Response:
        await self.engine.reset()
        return _json(200, {"reset": True})


async def _guarded(
    apply: Callable[[Any], None], request: Request, answer: Callable[[], Any] | None = None
) -> Response:
    try:
        body = json.loads(await request.body() or b"{}")
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")
        apply(body)
    except (ValueError, TypeError) as exc:
        return _json(400, {"detail": str(exc)})
    return _json(200, answer() if answer else {"ok": True})


#: What a control request's body may be said to be (any ``+json`` type too).
_JSON_TYPES = frozenset({"application/json"})


def _host_refusal(host: str, own: frozenset[str]) -> str | None:
    """Why ``host`` (a ``Host`` value) is not this simulator's, or None when it is: an address
    (no DNS answer makes one name another machine), a loopback name, or one of ``own``."""
    name = host_name(host)
    if not name:
        return "no Host header"
    if is_loopback_host(name) or name in own or _is_address(name):
        return None
    shown = sorted(own_name for own_name in own if not _is_address(own_name))
    allowed = f"an address, localhost or {', '.join(shown)}" if shown else "an address or localhost"
    return (
        f"Host {host[:200]!r} is not this simulator's ({allowed}): a web page's own DNS name "
        "pointed at this machine (DNS rebinding) is refused"
    )


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def control_refusal(method: str, headers: Headers, own: frozenset[str]) -> tuple[int, str] | None:
    """The status and one line that refuse a ``/_sim/…`` request a web page made (see the module
    doc), or None for one of this machine's own clients (``curl``, the tests, fal_client).
    ``own``: the names it serves under (:meth:`SimulatorApp.own_hosts`)."""
    host = headers.get("host", "")
    why = _host_refusal(host, own)
    if why is not None:
        return 403, f"refused: {why}"
    origin = headers.get("origin")
    if origin is not None:
        found = place(origin) if origin != "null" else None
        if found is None or not names(found, host, None, None):
            return 403, f"refused: Origin {origin[:200]!r} is not this simulator (another site's page)"
    content_type = headers.get("content-type")
    if method in ("POST", "DELETE", "PUT", "PATCH") and content_type is not None:
        media_type = content_type.split(";")[0].strip().lower()
        if media_type not in _JSON_TYPES and not media_type.endswith("+json"):
            said = repr(media_type[:100]) if media_type else "an empty Content-Type"
            detail = (
                f"/_sim/ takes a JSON body, not {said}: "
                "send Content-Type: application/json (curl: -H 'Content-Type: application/json')"
            )
            return 415, detail
    return None


def _lifecycle_seconds(raw: str | None) -> float | None:
    """``expiration_duration_seconds`` from ``X-Fal-Object-Lifecycle-Preference`` (None: keep)."""
    if not raw:
        return None
    try:
        pref = json.loads(raw)
    except ValueError:
        return None
    if isinstance(pref, dict) and isinstance(pref.get("expiration_duration_seconds"), int | float):
        return float(pref["expiration_duration_seconds"])
    return None
