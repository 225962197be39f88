"""The ASGI app behind ``wanbatch serve``: fal's webhooks in; the dashboard, metrics and a
health check out. This module only wires them together: routes, middleware and state.

``POST /webhooks/fal`` and ``GET /healthz`` are the webhook receiver's
(:class:`web.receiver.WebhookReceiver`: a delivery verified before it is stored, stored before
it is answered 2xx; every rejection counted and logged). The receiver only writes to the
database: it needs no fal key and may run on any host that reaches the database.

The dashboard (``/``, :mod:`web.dashboard`) and Prometheus ``/metrics`` (:mod:`web.metrics`)
read the same database. :class:`web.auth.DashboardAuth` guards everything but the receiver and
``/healthz``: ``WANBATCH_SERVE_TOKEN``, once set, from every client and for every action, so the
receiver can face the internet while the dashboard stays private. A page or action that meets
a database error is answered by the dashboard for what it was
(:meth:`web.dashboard.Dashboard.database_error`, :meth:`~web.dashboard.Dashboard.database_locked`):
503 with one line for a locked or unreachable database (and for an action's write that finds
its disk full, or a read-only database: :meth:`~web.dashboard.Dashboard.database_read_only`),
400 for a value of the request the database refuses, 500 for anything else —
never "unavailable", never a traceback. The line is a page for a browser; for an action a
script calls (``POST /batches/REF/ACTION``), one JSON object ``{"ok": false, "error": …}``, the
format of its every answer. A batch reference, job id or endpoint filter no database can hold
(a NUL) never reaches one: it names nothing (404, or an empty list), on SQLite and PostgreSQL
alike.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable

import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp

from jobs import db
from jobs.asgi_shutdown import STOPPED, EndsCleanly
from jobs.errors import DatabaseLockedError, DatabaseReadOnlyError
from jobs.settings import Settings
from web.auth import DashboardAuth, ForwardedHeaders, TokenGate, trusted_proxies
from web.dashboard import DASHBOARD_FAILED, DATABASE_FULL, REQUEST_NOT_STORABLE, Dashboard
from web.heartbeat import ServeHeartbeat
from web.metrics import metrics_route
from web.receiver import (
    DATABASE_READ_ONLY,
    DATABASE_SLOW,
    DATABASE_UNAVAILABLE,
    DATABASE_UNREADABLE,
    DELIVERY_NOT_STORABLE,
    DELIVERY_NOT_STORED,
    FOREIGN_ACCOUNT,
    HEALTHZ_DATABASE_WAIT,
    HEALTHZ_KEYS_WAIT,
    MAX_BODY_BYTES,
    NOT_OURS,
    RECEIVER_THREADS,
    Counts,
    MisroutedWebhooks,
    WebhookReceiver,
)
from worker.fal.webhooks import JwksKeys
from worker.steps.webhooks import Inbox

log = logging.getLogger(__name__)

# What this module always offered, now defined by the receiver and the dashboard.
__all__ = [
    "DASHBOARD_FAILED",
    "DATABASE_FULL",
    "DATABASE_READ_ONLY",
    "DATABASE_SLOW",
    "DATABASE_UNAVAILABLE",
    "DATABASE_UNREADABLE",
    "DELIVERY_NOT_STORABLE",
    "DELIVERY_NOT_STORED",
    "FOREIGN_ACCOUNT",
    "HEALTHZ_DATABASE_WAIT",
    "HEALTHZ_KEYS_WAIT",
    "MAX_BODY_BYTES",
    "NOT_OURS",
    "RECEIVER_THREADS",
    "REQUEST_NOT_STORABLE",
    "Counts",
    "create_app",
]


class _WebApp(Starlette):
    """The app, whose outermost layer, outside even Starlette's error middleware, ends a request
    still running when the server stops with an answer, not a traceback
    (:class:`jobs.asgi_shutdown.EndsCleanly`: 503 and one warning line, or the connection of a
    response cut mid-body reset)."""

    def build_middleware_stack(self) -> ASGIApp:
        return EndsCleanly(super().build_middleware_stack(), body={"ok": False, "error": STOPPED})


def warn_if_read_only(engine: Engine) -> bool:
    """At ``serve``'s start (on a thread of its own): one warning line when its database is read-only
    (:func:`jobs.db.read_only_reason`), saying that fal's deliveries cannot be stored. It
    still starts: a read-only dashboard of a database it may not write is a use of its own.
    True when it warned; a database that cannot be asked now says nothing here (the heartbeat
    and ``/healthz`` say so)."""
    try:
        reason = db.read_only_reason(engine)
    except Exception:  # unreachable now: its own warnings say so
        return False
    if reason is None:
        return False
    log.warning(
        "serve: the database is read-only (%s): fal's webhook deliveries cannot be stored (each is "
        "answered 503, and /healthz says so); the dashboard and /metrics only read and work; give "
        "serve a database it may write to receive webhooks",
        reason,
        extra={"event": "serve.database_read_only"},
    )
    return True


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    keys: JwksKeys | None = None,
    enqueue_download: Callable[[str], None] | None = None,
    gate: TokenGate | None = None,
    heartbeat: bool = False,
) -> Starlette:
    """The receiver for ``settings``; ``keys`` default to ``WANBATCH_WEBHOOK_JWKS_URL``'s,
    ``gate`` (the dashboard's paced token check) to one of ``WANBATCH_SERVE_TOKEN``.
    ``heartbeat`` (``wanbatch serve``): from its start to its stop, the app records in the
    database that it uses it (:mod:`web.heartbeat`), in its lifespan: uvicorn ends the process
    by the signal that stopped it right after the lifespan's shutdown."""
    engine = engine if engine is not None else db.open_engine(settings)
    inbox = Inbox(engine, settings, enqueue_download=enqueue_download)
    jwks = keys or JwksKeys(settings.webhook_jwks_url, timeout=settings.connect_timeout)
    receiver = WebhookReceiver(engine, inbox, jwks)
    dashboard = Dashboard(engine, settings, gate)  # gate None: one of WANBATCH_SERVE_TOKEN
    gate = dashboard.gate

    @contextlib.asynccontextmanager
    async def beating(_app: Starlette) -> AsyncIterator[None]:
        # Asked beside, not awaited: a database that does not answer (a partitioned network:
        # libpq's connect_timeout) must not hold /healthz and the dashboard until it gives up.
        threading.Thread(target=warn_if_read_only, args=(engine,), name="read-only-look", daemon=True).start()
        beat = ServeHeartbeat(engine)
        beat.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(beat.stop)

    app = _WebApp(
        lifespan=beating if heartbeat else None,
        routes=[*receiver.routes(), metrics_route(engine, settings), *dashboard.routes()],
        # Outermost (inside _WebApp's EndsCleanly): the proxy headers of trusted proxies believed
        # (uvicorn's rewrite, done here so that DashboardAuth can still tell whether the peer
        # itself was such a proxy).
        middleware=[
            Middleware(ForwardedHeaders, allow_ips=trusted_proxies(settings.serve_forwarded_allow_ips)),
            # A delivery to …/webhooks/fal under a prefix no proxy stripped: a 404 that says so,
            # before the dashboard's guard takes it for a page request.
            Middleware(MisroutedWebhooks, counts=receiver.counts),
            Middleware(DashboardAuth, gate=gate, engine=engine),
        ],
        # A pool timeout (every connection held by work the database does not finish) is no
        # DBAPIError, but the same outage: 503, one line.
        exception_handlers={
            DBAPIError: dashboard.database_error,
            PoolTimeoutError: dashboard.database_error,
            DatabaseLockedError: dashboard.database_locked,
            # A login's or logout's write (the cookie's key made the first time): 503, one line.
            DatabaseReadOnlyError: dashboard.database_read_only,
        },
    )
    app.state.counts = receiver.counts
    app.state.body_budget = receiver.budget
    app.state.inbox = inbox
    app.state.gate = gate
    return app
