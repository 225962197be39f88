"""The ASGI app behind ``wanbatch serve``: fal's webhooks in; the dashboard, metrics and a
health check out.

``POST /webhooks/fal`` is the receiver ``WANBATCH_WEBHOOK_URL`` points at (fal calls the exact
``fal_webhook`` URL each submit gave it, job id, attempt and token in its query). A delivery is
verified (:func:`worker.fal.webhooks.verify_delivery`: fal's Ed25519 signature, a timestamp within
5 minutes, a body that matches), its URL's token checked (:func:`worker.steps.webhooks.binding_holds`:
fal signs every account's webhooks alike, so only the token shows that one of our submits named
that job and attempt) and its fal account (:func:`worker.steps.accounts.account_verdict`: a
leaked token must not let another account's request stand in for ours), stored in the inbox,
and only then answered 2xx; it is applied
to its job right away (:mod:`worker.steps.webhooks`; on PostgreSQL that also wakes the tick
leader, wherever it runs) and, should that fail, by the tick. A
rejected delivery is answered 4xx (503 when fal's keys cannot be fetched or the database is
locked or unreachable: fal retries; 422 when the database refuses the delivery's data, which
sending it again cannot change; 500 for a failure of the receiver's own) and changes nothing;
rejections are counted and logged. A body is read within a deadline (408 when it is not all in
by then, a client gone mid-body is a rejection too) and all bodies held at once share a budget
(503 beyond it): :mod:`web.bodies`. What
``jsonb`` cannot hold (``\\u0000``, lone surrogates) is stored as U+FFFD
(:func:`jobs.storable.storable_json`), so no valid delivery is refused for it. ``GET /healthz``
answers the counts, whether fal's signatures can be verified now (keys held, or why not:
every delivery is refused while there are none), and which database it serves (a fingerprint
that reveals no secret: a receiver of another database than the submitters' refuses every
delivery, which ``wanbatch doctor`` tells by comparing). Deliveries are verified and stored on threads
of their own (:data:`RECEIVER_THREADS`), so a flood of them never takes the threads the
dashboard's pages run on.

The dashboard (``/``, :mod:`web.dashboard`) and Prometheus ``/metrics`` (:mod:`web.metrics`)
read the same database. :class:`web.auth.DashboardAuth` guards everything but the receiver and
``/healthz``: ``WANBATCH_SERVE_TOKEN``, once set, from every client and for every action, so the
receiver can face the internet while the dashboard stays private. A page or action that meets
a locked or unreachable database is answered 503 with one line (and logs one warning), not an
internal error — an action whose write finds the database's disk full too, with a line that says
so (pages only read, and go on working); one whose request carries a value the database refuses
(a data error) 400 with one line (and one warning); any other database error 500 with one line
(logged as an error, with its traceback) — never "unavailable". The line is a page for a
browser; for an action a script calls (``POST /batches/REF/ACTION``), one JSON object
``{"ok": false, "error": …}``, the format of its every answer. A batch reference, job id or
endpoint filter no database can hold (a NUL) never reaches one: it names nothing (404, or an
empty list), on SQLite and PostgreSQL alike.

The receiver only writes to the database: it needs no fal key and may run on any host that
reaches the database. The downloads of the jobs it completes are queued by the workers' tick
(or at once, when an ``enqueue_download`` is given, as an embedded run does).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from jobs import db
from jobs.asgi_shutdown import STOPPED, EndsCleanly
from jobs.digits import ascii_int
from jobs.errors import DatabaseLockedError
from jobs.printable import one_line
from jobs.settings import Settings
from web.auth import DashboardAuth, ForwardedHeaders, TokenGate, trusted_proxies
from web.bodies import TOO_LARGE, BodyBudget, Refusal, declares_more_than, read_body
from web.dashboard import Dashboard
from web.heartbeat import ServeHeartbeat
from web.metrics import metrics_route
from worker import telemetry
from worker.fal.webhooks import JwksKeys, WebhookRejected, verify_delivery
from worker.steps.webhooks import (
    Inbox,
    binding_holds,
    database_fingerprint,
    receive,
    webhook_secret,
)

log = logging.getLogger(__name__)

#: Largest webhook body read (a Wan result is a few hundred bytes).
MAX_BODY_BYTES = 1024 * 1024
#: Threads the receiver verifies and stores deliveries on, at most, at once: a limiter of its
#: own, apart from Starlette's default one that the dashboard's pages run on, so a flood of
#: deliveries (or a locked database holding them) never leaves the dashboard without threads.
#: Deliveries beyond it wait their turn without holding a thread.
RECEIVER_THREADS = 8
#: Longest ``GET /healthz`` waits for fal's signing keys to be fetched (when none are held):
#: a container health check gives it a few seconds in all.
HEALTHZ_KEYS_WAIT = 2.0
#: Longest ``GET /healthz`` waits for the database to answer (a ``SELECT 1``, and the first time
#: which one it is), alongside the keys' wait, not after it.
HEALTHZ_DATABASE_WAIT = 2.0
#: What ``/healthz`` says when the database did not answer in time (the log says nothing: a
#: locked database is logged by the deliveries it holds up).
DATABASE_SLOW = "the database did not answer within 2 s (locked or unreachable)"
#: What ``/healthz`` says when reading the database failed otherwise; the log line says why (a
#: public endpoint is not told the database's words, which may name its host or file).
DATABASE_UNREADABLE = "the receiver could not read its database (see its log)"
#: What a client is told when the database cannot be used; the log line says why.
DATABASE_UNAVAILABLE = "the database is unavailable (locked or unreachable): try again in a moment"
#: What a dashboard client is told when an action's write finds the database's disk full: 503
#: as for an outage, but waiting alone does not end it; the log line says where (the client is
#: not told the database's place).
DATABASE_FULL = "the database's disk is full: free space on it, then try again; nothing was changed"
#: What a dashboard client is told when the database refuses a value its request carries: a data
#: error, the same request fails the same way, so a 400, not an outage's 503; the log line says
#: what. (A NUL in a reference or filter is not one: it is refused before any query, as naming
#: nothing.)
REQUEST_NOT_STORABLE = "the database refuses a value of this request: the same request fails the same way"
#: What a dashboard client is told when a page or action failed on any other database error (a
#: bug of the dashboard's: the log has its traceback).
DASHBOARD_FAILED = "the dashboard failed on a database error (an error of the dashboard: see its log)"
#: What fal is told when the database refuses a verified delivery's data (a data error: the
#: same body again fails the same way, so a 4xx, not an outage's 503); the log line says what.
DELIVERY_NOT_STORABLE = "the database refuses this delivery's data: sending it again cannot help"
#: What fal is told when storing a delivery failed otherwise (our bug; the log has its traceback).
DELIVERY_NOT_STORED = "the receiver could not store this delivery (an error of the receiver: see its log)"


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
    attempt = request.query_params.get("attempt")
    return (
        job_id if job_id and _JOB_ID.fullmatch(job_id) else None,
        ascii_int(attempt, max_digits=8),
    )


#: What a delivery whose URL lacks our token (or carries a wrong one) is told.
NOT_OURS = "the webhook URL does not carry this receiver's token for its job and attempt"
#: What a delivery signed for another fal account than ours is told
#: (:func:`worker.steps.accounts.account_verdict`).
FOREIGN_ACCOUNT = "the webhook is signed for another fal account than this receiver's"


class _WebApp(Starlette):
    """The app, whose outermost layer, outside even Starlette's error middleware, ends a request
    still running when the server stops with an answer, not a traceback
    (:class:`jobs.asgi_shutdown.EndsCleanly`: 503 and one warning line, or the connection of a
    response cut mid-body reset)."""

    def build_middleware_stack(self) -> ASGIApp:
        return EndsCleanly(super().build_middleware_stack(), body={"ok": False, "error": STOPPED})


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
    inbox = Inbox(
        engine,
        settings,
        enqueue_download=enqueue_download,
    )
    jwks = keys or JwksKeys(settings.webhook_jwks_url, timeout=settings.connect_timeout)
    counts = Counts()
    receiver_threads = anyio.CapacityLimiter(RECEIVER_THREADS)
    budget = BodyBudget()
    if gate is None:
        token = settings.serve_token
        gate = TokenGate(token.get_secret_value() if token is not None else None)
    dashboard = Dashboard(engine, settings, gate)

    def reject(why: WebhookRejected, request: Request, detail: str = "") -> Response:
        """Count, log (with ``detail``, which the client is not told) and answer a rejection."""
        counts.add(accepted=False)
        telemetry.count_webhook(accepted=False)
        client = one_line(request.client.host) if request.client else "?"  # X-Forwarded-For's, if trusted
        log.warning(
            "webhook rejected (%s) from %s: %s%s",
            why.status_code,
            client,
            why.reason,
            f" ({one_line(detail)})" if detail else "",  # the database's words may quote the body
            extra={"event": "webhook.rejected", "status": why.status_code},
        )
        return JSONResponse({"ok": False, "error": why.reason}, status_code=why.status_code)

    def not_stored(exc: DBAPIError | PoolTimeoutError, request: Request) -> Response:
        """A verified delivery the database did not take, answered for what stopped it: only a
        locked or unreachable database is "unavailable" (503: fal delivers it again later); a
        data error is the delivery's (422: retrying the same body cannot help); anything else
        is ours (500, with a traceback in the log; fal retries, and a fixed receiver takes it)."""
        problem = db.database_problem(exc)
        if db.is_unavailable(exc):
            return reject(WebhookRejected(DATABASE_UNAVAILABLE, 503), request, problem)
        if isinstance(exc, DataError):
            return reject(WebhookRejected(DELIVERY_NOT_STORABLE, 422), request, problem)
        log.error("webhook not stored: %s", problem, exc_info=exc, extra={"event": "webhook.store_failed"})
        return reject(WebhookRejected(DELIVERY_NOT_STORED, 500), request, problem)

    async def fal_webhook(request: Request) -> Response:
        if declares_more_than(request.headers.get("content-length"), MAX_BODY_BYTES):
            return reject(WebhookRejected(TOO_LARGE, 413), request)  # before taking any budget
        with budget.tab() as tab:
            body = await read_body(request, cap=MAX_BODY_BYTES, tab=tab)
            if isinstance(body, Refusal):
                return reject(WebhookRejected(body.reason, body.status), request)
            return await verified_then_stored(request, body)

    async def verified_then_stored(request: Request, body: bytes) -> Response:
        """A body read whole: verified, bound to its job and stored (or rejected)."""
        try:
            delivery = await anyio.to_thread.run_sync(
                verify_delivery, request.headers, body, jwks, limiter=receiver_threads
            )
        except WebhookRejected as exc:
            return reject(exc, request)
        job_id, attempt = _job_and_attempt(request)
        token = request.query_params.get("token")

        def bound_then_received() -> str | None:
            """None when stored; otherwise why it is refused (nothing stored)."""
            if not binding_holds(webhook_secret(engine), job_id, attempt, token):
                return NOT_OURS
            if receive(inbox, delivery, job_id=job_id, attempt=attempt) is None:
                return FOREIGN_ACCOUNT
            return None

        try:
            refused = await anyio.to_thread.run_sync(bound_then_received, limiter=receiver_threads)
        except (DBAPIError, PoolTimeoutError) as exc:  # not stored (every connection taken: unavailable)
            return not_stored(exc, request)
        if refused is not None:  # signed by fal, but for a request some other account sent: nothing stored
            detail = f"job {job_id}, attempt {attempt}"
            if refused == FOREIGN_ACCOUNT:
                detail += f", fal account {delivery.user_id}"
            return reject(WebhookRejected(refused, 403), request, detail)
        counts.add(accepted=True)
        telemetry.count_webhook(accepted=True)
        return JSONResponse({"ok": True})

    fingerprint_thread = anyio.CapacityLimiter(1)  # a database that hangs holds one thread, no more

    def fingerprint() -> str:
        # The secret is read once per process; the SELECT 1 is every time, so a database that
        # stopped answering since is reported as such, not as the one served a while ago.
        secret = webhook_secret(engine)
        db.probe(engine)
        return database_fingerprint(secret)

    async def which_database() -> tuple[str | None, str | None]:
        """The database's fingerprint (:func:`worker.steps.webhooks.database_fingerprint`), or
        why it is not known: a receiver serving another database than the submitters' refuses
        every delivery (403), and this is how ``wanbatch doctor`` tells. Made the first time
        (the webhook secret, which the first delivery would make), then known; a ``SELECT 1``
        every time tells whether the database still answers, for at most
        :data:`HEALTHZ_DATABASE_WAIT` (one thread at most waits on a database that hangs)."""
        with anyio.move_on_after(HEALTHZ_DATABASE_WAIT):
            try:
                found = await anyio.to_thread.run_sync(
                    fingerprint, limiter=fingerprint_thread, abandon_on_cancel=True
                )
            except (DBAPIError, PoolTimeoutError) as exc:
                if db.is_unavailable(exc):
                    return None, DATABASE_UNAVAILABLE
                log.warning(
                    "healthz: the database could not be read: %s",
                    db.database_problem(exc),
                    extra={"event": "healthz.database_error"},
                )
                return None, DATABASE_UNREADABLE
            return found, None
        return None, DATABASE_SLOW

    async def healthz(_request: Request) -> Response:
        """The process answers (``ok``), its counts, whether it can verify fal's signatures now,
        and which database it serves: without keys every delivery is refused (503), and with
        another database than the submitters' too (403), which the counts alone would show only
        once fal had retried in vain. Fetches the keys if a delivery would (none yet), for at
        most :data:`HEALTHZ_KEYS_WAIT` (a fetch still under way is reported as such); after a
        failed fetch, none again for 5 s, so asking often fetches no more often. The database
        is asked meanwhile (:func:`which_database`)."""
        found: dict[str, Any] = {}

        async def keys_health() -> None:
            found["keys"] = await anyio.to_thread.run_sync(jwks.health, HEALTHZ_KEYS_WAIT)

        async def database() -> None:
            found["database"] = await which_database()

        async with anyio.create_task_group() as both:
            both.start_soon(keys_health)
            both.start_soon(database)
        keys = found["keys"]
        fingerprint_found, database_error = found["database"]
        return JSONResponse(
            {
                "ok": True,
                "accepted": counts.accepted,
                "rejected": counts.rejected,
                "can_verify_signatures": keys.can_verify,
                "signing_keys": keys.keys,
                "signing_keys_error": keys.error,
                "database": fingerprint_found,
                "database_error": database_error,
            }
        )

    async def database_error(request: Request, exc: Exception) -> Response:
        """A dashboard page or action that failed on a database error, answered for what it was (as
        :func:`not_stored` answers a delivery): only a locked or unreachable database is
        "unavailable" (503, one warning: the same request may succeed in a moment), and a full
        disk says so (503, one warning naming the database: someone must free space); a data
        error is the request's (400, one warning: it carries a value the database refuses, and
        fails the same way again); a schema older than this wanbatch's (``alembic downgrade``
        under a running serve: :func:`jobs.db.schema_behind`) says so (503, one warning; it was
        a 500 "the dashboard failed"); anything else is the dashboard's (500, one line; the log
        has the traceback)."""
        assert isinstance(exc, DBAPIError | PoolTimeoutError)
        client = one_line(request.client.host) if request.client else "?"
        # The path and the database's words may carry the request's text: one line each, so a
        # %0A in the URL cannot forge a log line.
        where = (request.method, one_line(request.url.path), client, one_line(db.database_problem(exc)))
        # A table or column missing: a schema downgraded under this serve says so (SQLite's "no
        # such column" is an OperationalError: before is_unavailable). Read as the start-up reads it.
        if db.is_schema_mismatch(exc) and (
            behind := await anyio.to_thread.run_sync(db.schema_behind, engine)
        ):
            log.warning(
                "dashboard: %s %s from %s: %s: %s",
                *where[:3],
                behind,
                db.SCHEMA_BEHIND_FIX,
                extra={"event": "dashboard.schema_behind", "status": 503},
            )
            return dashboard.unavailable(request, f"{behind}: {db.SCHEMA_BEHIND_FIX}")
        if db.is_disk_full(exc):  # before is_unavailable, which a full disk also is
            full = db.disk_full_error(settings.database_url, then="try again")
            log.warning(
                "dashboard: %s %s from %s: %s: %s",
                *where[:3],
                full,
                where[3],
                extra={"event": "dashboard.database_full", "status": 503},
            )
            return dashboard.unavailable(request, DATABASE_FULL)
        if db.is_unavailable(exc):
            log.warning(
                "dashboard: %s %s from %s: the database is unavailable: %s",
                *where,
                extra={"event": "dashboard.database_unavailable", "status": 503},
            )
            return dashboard.unavailable(request, DATABASE_UNAVAILABLE)
        if isinstance(exc, DataError):
            log.warning(
                "dashboard: %s %s from %s: the database refuses a value of the request: %s",
                *where,
                extra={"event": "dashboard.request_refused", "status": 400},
            )
            return dashboard.error(request, REQUEST_NOT_STORABLE, 400, "Bad request")
        log.error(
            "dashboard: %s %s from %s failed on a database error: %s",
            *where,
            exc_info=exc,
            extra={"event": "dashboard.database_error", "status": 500},
        )
        return dashboard.error(request, DASHBOARD_FAILED, 500, "Internal error")

    async def database_locked(request: Request, exc: Exception) -> Response:
        """A dashboard page whose read waited ``WANBATCH_DATABASE_LOCK_WAIT`` for a lock another
        session holds (:func:`jobs.db.lock_waits_bounded`): 503 with the line that names that
        session, as ``wanbatch status`` says it (one warning in the log)."""
        assert isinstance(exc, DatabaseLockedError)
        client = one_line(request.client.host) if request.client else "?"
        log.warning(
            "dashboard: %s %s from %s: %s",
            request.method,
            one_line(request.url.path),
            client,
            exc,
            extra={"event": "dashboard.database_locked", "status": 503},
        )
        return dashboard.unavailable(request, str(exc))

    @contextlib.asynccontextmanager
    async def beating(_app: Starlette) -> AsyncIterator[None]:
        beat = ServeHeartbeat(engine)
        beat.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(beat.stop)

    app = _WebApp(
        lifespan=beating if heartbeat else None,
        routes=[
            Route("/webhooks/fal", fal_webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            metrics_route(engine, settings),
            *dashboard.routes(),
        ],
        # Outermost (inside _WebApp's EndsCleanly): the proxy headers of trusted proxies believed
        # (uvicorn's rewrite, done here so that DashboardAuth can still tell whether the peer
        # itself was such a proxy).
        middleware=[
            Middleware(ForwardedHeaders, allow_ips=trusted_proxies(settings.serve_forwarded_allow_ips)),
            Middleware(DashboardAuth, gate=gate, engine=engine),
        ],
        # A pool timeout (every connection held by work the database does not finish) is no
        # DBAPIError, but the same outage: 503, one line.
        exception_handlers={
            DBAPIError: database_error,
            PoolTimeoutError: database_error,
            DatabaseLockedError: database_locked,
        },
    )
    app.state.counts = counts
    app.state.body_budget = budget
    app.state.inbox = inbox
    app.state.gate = gate
    return app
