"""The ASGI app behind ``wanbatch serve``: fal's webhooks in; the dashboard, metrics and a
health check out.

``POST /webhooks/fal`` is the receiver ``WANBATCH_WEBHOOK_URL`` points at (fal calls the exact
``fal_webhook`` URL each submit gave it, job id and attempt in its query). A delivery is verified
(:func:`worker.fal.webhooks.verify_delivery`: fal's Ed25519 signature, a timestamp within
5 minutes, a body that matches), stored in the inbox, and only then answered 2xx; it is applied
to its job right away (:mod:`worker.steps.webhooks`; on PostgreSQL that also wakes the tick
leader, wherever it runs) and, should that fail, by the tick. A
rejected delivery is answered 4xx (503 when fal's keys cannot be fetched: fal retries) and
changes nothing; rejections are counted and logged. ``GET /healthz`` answers the counts.

The dashboard (``/``, :mod:`web.dashboard`) and Prometheus ``/metrics`` (:mod:`web.metrics`)
read the same database. :class:`web.auth.DashboardAuth` guards everything but the receiver and
``/healthz``: ``WANBATCH_SERVE_TOKEN`` from beyond loopback and for every action, so the
receiver can face the internet while the dashboard stays private.

The receiver only writes to the database: it needs no fal key and may run on any host that
reaches the database. The downloads of the jobs it completes are queued by the workers' tick
(or at once, when an ``enqueue_download`` is given, as an embedded run does).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jobs import db
from jobs.settings import Settings
from web.auth import DashboardAuth
from web.dashboard import dashboard_routes
from web.metrics import metrics_route
from worker import telemetry
from worker.fal.webhooks import JwksKeys, WebhookRejected, verify_delivery
from worker.steps.webhooks import Inbox, receive

log = logging.getLogger(__name__)

#: Largest webhook body read (a Wan result is a few hundred bytes).
MAX_BODY_BYTES = 1024 * 1024


async def _capped_body(request: Request) -> bytes | None:
    """The request's body, or None as soon as it grows past :data:`MAX_BODY_BYTES`.

    Read chunk by chunk: a body sent without ``Content-Length`` (chunked) is not declared, and
    ``request.body()`` would hold all of it in memory before its size could be checked — an
    unauthenticated sender (the signature is checked after) could fill the receiver's memory.
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


_JOB_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


class Counts:
    """Deliveries accepted and rejected by this process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.accepted = 0
        self.rejected = 0

    def add(self, *, accepted: bool) -> None:
        with self._lock:
            if accepted:
                self.accepted += 1
            else:
                self.rejected += 1


def _job_and_attempt(request: Request) -> tuple[str | None, int | None]:
    """The job id and attempt the ``fal_webhook`` URL carries (None for anything malformed)."""
    job_id = request.query_params.get("job_id")
    attempt = request.query_params.get("attempt", "")
    return (
        job_id if job_id and _JOB_ID.fullmatch(job_id) else None,
        int(attempt) if attempt.isdigit() and len(attempt) < 9 else None,
    )


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    keys: JwksKeys | None = None,
    enqueue_download: Callable[[str], None] | None = None,
) -> Starlette:
    """The receiver for ``settings``; ``keys`` default to ``WANBATCH_WEBHOOK_JWKS_URL``'s."""
    engine = engine if engine is not None else db.open_engine(settings)
    inbox = Inbox(
        engine,
        settings,
        enqueue_download=enqueue_download,
    )
    jwks = keys or JwksKeys(settings.webhook_jwks_url, timeout=settings.connect_timeout)
    counts = Counts()

    def reject(why: WebhookRejected, request: Request) -> Response:
        counts.add(accepted=False)
        telemetry.count_webhook(accepted=False)
        client = request.client.host if request.client else "?"
        log.warning(
            "webhook rejected (%s) from %s: %s",
            why.status_code,
            client,
            why.reason,
            extra={"event": "webhook.rejected", "status": why.status_code},
        )
        return JSONResponse({"ok": False, "error": why.reason}, status_code=why.status_code)

    async def fal_webhook(request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return reject(WebhookRejected("the body is too large", 413), request)
        body = await _capped_body(request)
        if body is None:
            return reject(WebhookRejected("the body is too large", 413), request)
        try:
            delivery = await run_in_threadpool(verify_delivery, request.headers, body, jwks)
        except WebhookRejected as exc:
            return reject(exc, request)
        job_id, attempt = _job_and_attempt(request)
        await run_in_threadpool(lambda: receive(inbox, delivery, job_id=job_id, attempt=attempt))
        counts.add(accepted=True)
        telemetry.count_webhook(accepted=True)
        return JSONResponse({"ok": True})

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"ok": True, "accepted": counts.accepted, "rejected": counts.rejected})

    token = settings.serve_token
    app = Starlette(
        routes=[
            Route("/webhooks/fal", fal_webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            metrics_route(engine, settings),
            *dashboard_routes(engine, settings),
        ],
        middleware=[Middleware(DashboardAuth, token=token.get_secret_value() if token else None)],
    )
    app.state.counts = counts
    app.state.inbox = inbox
    return app
