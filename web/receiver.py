"""The webhook receiver of ``wanbatch serve``: ``POST /webhooks/fal`` and ``GET /healthz``.

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
locked, unreachable or read-only: fal retries; 422 when the database refuses the delivery's data, which
sending it again cannot change; 500 for a failure of the receiver's own) and changes nothing;
rejections are counted and logged. A body is read within a deadline (408 when it is not all in
by then, a client gone mid-body is a rejection too) and all bodies held at once share a budget
(503 beyond it): :mod:`web.bodies`. What
``jsonb`` cannot hold (``\\u0000``, lone surrogates) is stored as U+FFFD
(:func:`jobs.storable.storable_json`), so no valid delivery is refused for it. ``GET /healthz``
answers the counts (``misrouted``: deliveries to ``…/webhooks/fal`` under a prefix a reverse
proxy did not strip, :class:`MisroutedWebhooks`), whether fal's signatures can be verified now
(keys held, or why not: every delivery is refused while there are none), and which database it
serves (a fingerprint that reveals no secret: a receiver of another database than the
submitters' refuses every delivery, which ``wanbatch doctor`` tells by comparing), and whether
that database is read-only (every delivery refused 503: ``ok`` is false then, and the answer a
503). Deliveries are verified and stored on threads of their own (:data:`RECEIVER_THREADS`), so
a flood of them never takes the threads the dashboard's pages run on.

The receiver only writes to the database: it needs no fal key and may run on any host that
reaches the database. The downloads of the jobs it completes are queued by the workers' tick
(or at once, when an ``enqueue_download`` is given, as an embedded run does).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from jobs import db
from jobs.digits import ascii_int
from jobs.errors import DatabaseReadOnlyError
from jobs.printable import one_line
from web import connections
from web.bodies import TOO_LARGE, BodyBudget, Refusal, declares_more_than, read_body
from worker import telemetry
from worker.fal.webhooks import JwksKeys, WebhookRejected, verify_delivery
from worker.steps.webhooks import (
    Inbox,
    binding_holds,
    database_fingerprint,
    receive,
    webhook_secret,
)

#: The receiver's log lines keep the logger they were always written by (``web.app``): log
#: filters and alerts select them by it.
log = logging.getLogger("web.app")

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
#: What a client is told when the database cannot be used (fal by the receiver, ``/healthz``,
#: and the dashboard's pages and actions); the log line says why.
DATABASE_UNAVAILABLE = "the database is unavailable (locked or unreachable): try again in a moment"
#: What fal and ``/healthz`` are told when the database is read-only (SQLite ``mode=ro`` or a file
#: the receiver's user may not write; PostgreSQL ``default_transaction_read_only``, a standby):
#: every delivery is refused (503: fal delivers it again, so a receiver given a database it may
#: write takes it then). The log line says why.
DATABASE_READ_ONLY = (
    "the database is read-only: this receiver cannot store deliveries until it is given one it may write"
)
#: What fal is told when the database refuses a verified delivery's data (a data error: the
#: same body again fails the same way, so a 4xx, not an outage's 503); the log line says what.
DELIVERY_NOT_STORABLE = "the database refuses this delivery's data: sending it again cannot help"
#: What fal is told when storing a delivery failed otherwise (our bug; the log has its traceback).
DELIVERY_NOT_STORED = "the receiver could not store this delivery (an error of the receiver: see its log)"
#: What a delivery whose URL lacks our token (or carries a wrong one) is told.
NOT_OURS = "the webhook URL does not carry this receiver's token for its job and attempt"
#: What a delivery signed for another fal account than ours is told
#: (:func:`worker.steps.accounts.account_verdict`).
FOREIGN_ACCOUNT = "the webhook is signed for another fal account than this receiver's"

#: Where the receiver listens: the path ``WANBATCH_WEBHOOK_URL`` ends in.
WEBHOOK_PATH = "/webhooks/fal"
#: What a POST to ``…/webhooks/fal`` under another prefix is told (404): a reverse proxy that does
#: not strip its prefix (``/wanbatch/webhooks/fal``) delivers there, where nothing listens.
NOT_THE_RECEIVER = (
    f"no receiver here: the receiver listens at {WEBHOOK_PATH} (a reverse proxy in front of it must "
    "strip its path prefix)"
)

#: How long after a delivery refused because the database is read-only ``/healthz`` still says
#: so (503), where the database's own setting does not tell (a folder its user may not write, a
#: file system remounted read-only for a while): fal's next retry says it again. Until a delivery
#: is stored, it was for ever — a database writable again still answered 503 (``doctor`` failed on
#: it), and a health check routing fal away from a receiver not ok let nothing clear it.
READ_ONLY_HOLD_SECONDS = 300.0

_JOB_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


class Counts:
    """Deliveries accepted and rejected by this process (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.accepted = 0
        self.rejected = 0
        #: When the last delivery was refused because the database is read-only (None: the last
        #: one was stored, or none was refused for it yet): :attr:`read_only`.
        self._read_only_at: float | None = None
        #: Of the rejected: POSTs to ``…/webhooks/fal`` under another prefix (:class:`MisroutedWebhooks`).
        self.misrouted = 0
        #: When a misrouted POST was last warned about (None: none yet), and how many came since.
        self._misrouted_warned_at: float | None = None
        self._misrouted_since = 0

    @property
    def read_only(self) -> bool:
        """The last delivery, within :data:`READ_ONLY_HOLD_SECONDS`, was refused because the
        database is read-only — ``/healthz`` says so even where the database's setting could not
        tell (a role that may not write, a file's folder)."""
        at = self._read_only_at
        return at is not None and self._clock() - at < READ_ONLY_HOLD_SECONDS

    def refused_read_only(self) -> None:
        self._read_only_at = self._clock()

    def stored(self) -> None:
        """A delivery was stored: the database takes writes (again)."""
        self._read_only_at = None

    def add_misrouted(self) -> int | None:
        """Count a misrouted POST. Whether to warn of it: how many came since the last warning
        (the ones told at INFO) when that was :data:`web.connections.LOG_INTERVAL` ago or more (or
        none was said yet), else None (within the interval: told at INFO only)."""
        with self._lock:
            self.rejected += 1
            self.misrouted += 1
            now = self._clock()
            said = self._misrouted_warned_at
            if said is not None and now - said < connections.LOG_INTERVAL:
                self._misrouted_since += 1
                return None
            self._misrouted_warned_at = now
            since, self._misrouted_since = self._misrouted_since, 0
            return since

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


class MisroutedWebhooks:
    """ASGI middleware: a ``POST`` whose path ends in ``/webhooks/fal`` under another prefix
    (``/wanbatch/webhooks/fal``: a reverse proxy that does not strip its prefix) is answered 404
    saying where the receiver listens, counted (``/healthz``'s ``rejected`` and ``misrouted``) and
    logged in one line naming the prefix to strip. It was taken for a dashboard request:
    "refused … (no token configured)", which pointed at ``WANBATCH_SERVE_TOKEN`` instead, and fal's
    every delivery was lost without a word about why. Runs before the dashboard's guard.

    That line is a warning for the first, and then at most once every
    :data:`web.connections.LOG_INTERVAL` (saying how many came meanwhile); the ones between are
    told at INFO: fal retries each delivery up to 10 times and a batch sends thousands, so a
    warning each flooded the log."""

    def __init__(self, app: ASGIApp, counts: Counts) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            trimmed = path.rstrip("/")
            if trimmed.endswith(WEBHOOK_PATH) and trimmed != WEBHOOK_PATH:
                await self.refused(scope, path, trimmed)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refused(self, scope: Scope, path: str, trimmed: str) -> Response:
        since = self.counts.add_misrouted()
        telemetry.count_webhook(accepted=False)
        client = scope.get("client")
        prefix = trimmed.removesuffix(WEBHOOK_PATH)
        if since is None:
            after = ""
        else:
            after = f"; the next ones within {connections.LOG_INTERVAL:g} s are logged at INFO"
            if since:
                after = f"; {since} more misrouted since the last warning{after}"
        log.log(
            logging.INFO if since is None else logging.WARNING,
            "webhook rejected (404) from %s: a webhook reached %s: the receiver listens at %s; make "
            "the proxy strip its prefix %s (or point WANBATCH_WEBHOOK_URL at %s)%s",
            one_line(str(client[0])) if client else "?",
            one_line(path)[:200],  # the client's text: a %0A must not forge a log line
            WEBHOOK_PATH,
            one_line(prefix)[:200],
            WEBHOOK_PATH,
            after,
            extra={"event": "webhook.misrouted", "status": 404},
        )
        return JSONResponse({"ok": False, "error": NOT_THE_RECEIVER}, status_code=404)


class WebhookReceiver:
    """fal's deliveries into ``inbox`` (verified with ``jwks``' keys), counted in ``counts``,
    their bodies held within ``budget``; and the health check that reports on all of it."""

    def __init__(self, engine: Engine, inbox: Inbox, jwks: JwksKeys) -> None:
        self.engine = engine
        self.inbox = inbox
        self.jwks = jwks
        self.counts = Counts()
        self.budget = BodyBudget()
        #: The receiver's own threads (:data:`RECEIVER_THREADS`), apart from the dashboard's.
        self.threads = anyio.CapacityLimiter(RECEIVER_THREADS)
        #: ``/healthz``'s database thread: a database that hangs holds one thread, no more.
        self.fingerprint_thread = anyio.CapacityLimiter(1)

    def routes(self) -> list[Route]:
        return [
            Route(WEBHOOK_PATH, self.fal_webhook, methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
        ]

    def reject(self, why: WebhookRejected, request: Request, detail: str = "") -> Response:
        """Count, log (with ``detail``, which the client is not told) and answer a rejection:
        every refusal is seen in ``/healthz``'s counts and in one log line, never silently."""
        self.counts.add(accepted=False)
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

    def not_stored(
        self, exc: DBAPIError | PoolTimeoutError | DatabaseReadOnlyError, request: Request
    ) -> Response:
        """A verified delivery the database did not take, answered for what stopped it: only a
        locked or unreachable database is "unavailable" (503: fal delivers it again later); a
        read-only one says so (503 as well, one warning line: a receiver given a database it may
        write takes the delivery again); a data error is the delivery's (422: retrying the same
        body cannot help); anything else is ours (500, with a traceback in the log; fal
        retries, and a fixed receiver takes it)."""
        if db.is_read_only(exc):
            self.counts.refused_read_only()
            said = (
                f"{exc.reason} ({exc.said})"
                if isinstance(exc, DatabaseReadOnlyError)
                else db.database_problem(exc)
            )
            return self.reject(WebhookRejected(DATABASE_READ_ONLY, 503), request, said)
        assert not isinstance(exc, DatabaseReadOnlyError)  # is_read_only said so of every one
        problem = db.database_problem(exc)
        if db.is_unavailable(exc):
            return self.reject(WebhookRejected(DATABASE_UNAVAILABLE, 503), request, problem)
        if isinstance(exc, DataError):
            return self.reject(WebhookRejected(DELIVERY_NOT_STORABLE, 422), request, problem)
        log.error("webhook not stored: %s", problem, exc_info=exc, extra={"event": "webhook.store_failed"})
        return self.reject(WebhookRejected(DELIVERY_NOT_STORED, 500), request, problem)

    async def fal_webhook(self, request: Request) -> Response:
        """``POST /webhooks/fal``: the body read within its bounds before anything else (a
        declared size beyond :data:`MAX_BODY_BYTES` refused before it takes any of the budget:
        nobody is authenticated yet, so nobody may hold the process's memory), then verified
        before it is stored, and stored before it is answered 2xx (:meth:`verified_then_stored`):
        a 2xx tells fal it need not deliver again, so it is said only of what is in the inbox."""
        if declares_more_than(request.headers.get("content-length"), MAX_BODY_BYTES):
            return self.reject(WebhookRejected(TOO_LARGE, 413), request)  # before taking any budget
        with self.budget.tab() as tab:
            body = await read_body(request, cap=MAX_BODY_BYTES, tab=tab)
            if isinstance(body, Refusal):
                return self.reject(WebhookRejected(body.reason, body.status), request)
            return await self.verified_then_stored(request, body)

    async def verified_then_stored(self, request: Request, body: bytes) -> Response:
        """A body read whole: verified (fal's signature: nothing unsigned touches the database),
        bound to its job (our token in its URL: fal signs every account's webhooks alike), its
        account checked and stored, and only then answered 2xx (or rejected, nothing stored).
        Both run on the receiver's own threads."""
        try:
            delivery = await anyio.to_thread.run_sync(
                verify_delivery, request.headers, body, self.jwks, limiter=self.threads
            )
        except WebhookRejected as exc:
            return self.reject(exc, request)
        job_id, attempt = _job_and_attempt(request)
        token = request.query_params.get("token")

        def bound_then_received() -> str | None:
            """None when stored; otherwise why it is refused (nothing stored)."""
            if not binding_holds(webhook_secret(self.engine), job_id, attempt, token):
                return NOT_OURS
            if receive(self.inbox, delivery, job_id=job_id, attempt=attempt) is None:
                return FOREIGN_ACCOUNT
            return None

        try:
            refused = await anyio.to_thread.run_sync(bound_then_received, limiter=self.threads)
        except (DBAPIError, PoolTimeoutError, DatabaseReadOnlyError) as exc:  # not stored
            return self.not_stored(exc, request)
        if refused is not None:  # signed by fal, but for a request some other account sent: nothing stored
            detail = f"job {job_id}, attempt {attempt}"
            if refused == FOREIGN_ACCOUNT:
                detail += f", fal account {delivery.user_id}"
            return self.reject(WebhookRejected(refused, 403), request, detail)
        self.counts.add(accepted=True)
        self.counts.stored()  # it took this one: writable again
        telemetry.count_webhook(accepted=True)
        return JSONResponse({"ok": True})

    def fingerprint(self) -> tuple[str, bool]:
        """The served database's fingerprint, read now (on a thread: it blocks), and whether
        it is read-only (:func:`jobs.db.read_only_reason`, or the last delivery refused so)."""
        # The secret is read once per process; the SELECT 1 is every time, so a database that
        # stopped answering since is reported as such, not as the one served a while ago.
        secret = webhook_secret(self.engine)
        db.probe(self.engine)
        read_only = self.counts.read_only or db.read_only_reason(self.engine) is not None
        return database_fingerprint(secret), read_only

    async def which_database(self) -> tuple[str | None, str | None]:
        """The database's fingerprint (:func:`worker.steps.webhooks.database_fingerprint`), or
        why it is not known: a receiver serving another database than the submitters' refuses
        every delivery (403), and this is how ``wanbatch doctor`` tells. Made the first time
        (the webhook secret, which the first delivery would make), then known; a ``SELECT 1``
        every time tells whether the database still answers, for at most
        :data:`HEALTHZ_DATABASE_WAIT` (one thread at most waits on a database that hangs)."""
        with anyio.move_on_after(HEALTHZ_DATABASE_WAIT):
            try:
                found = await anyio.to_thread.run_sync(
                    self.fingerprint, limiter=self.fingerprint_thread, abandon_on_cancel=True
                )
            except DatabaseReadOnlyError:  # no webhook secret yet, and none can be made
                return None, DATABASE_READ_ONLY
            except (DBAPIError, PoolTimeoutError) as exc:
                if db.is_read_only(exc):  # PostgreSQL's: no webhook secret yet, none can be made
                    return None, DATABASE_READ_ONLY
                if db.is_unavailable(exc):
                    return None, DATABASE_UNAVAILABLE
                log.warning(
                    "healthz: the database could not be read: %s",
                    db.database_problem(exc),
                    extra={"event": "healthz.database_error"},
                )
                return None, DATABASE_UNREADABLE
            fingerprint, read_only = found
            return fingerprint, DATABASE_READ_ONLY if read_only else None
        return None, DATABASE_SLOW

    async def healthz(self, _request: Request) -> Response:
        """``GET /healthz``: the process answers (``ok``), its counts, whether it can verify fal's
        signatures now, and which database it serves: without keys every delivery is refused
        (503), and with another database than the submitters' too (403), which the counts alone
        would show only once fal had retried in vain. Fetches the keys if a delivery would (none
        yet), for at most :data:`HEALTHZ_KEYS_WAIT` (a fetch still under way is reported as
        such); after a failed fetch, none again for 5 s, so asking often fetches no more often.
        The database is asked meanwhile (:meth:`which_database`), so a health check's few
        seconds cover both. A read-only database (:data:`DATABASE_READ_ONLY`) is the one answer
        that is not ``ok`` (a 503, ``database_read_only`` true): the receiver refuses every
        delivery, and no wait ends that. Public (no token), so it tells no secret and no
        database's words."""
        found: dict[str, Any] = {}

        async def keys_health() -> None:
            found["keys"] = await anyio.to_thread.run_sync(self.jwks.health, HEALTHZ_KEYS_WAIT)

        async def database() -> None:
            found["database"] = await self.which_database()

        async with anyio.create_task_group() as both:
            both.start_soon(keys_health)
            both.start_soon(database)
        keys = found["keys"]
        fingerprint_found, database_error = found["database"]
        read_only = database_error == DATABASE_READ_ONLY
        return JSONResponse(
            {
                "ok": not read_only,
                "accepted": self.counts.accepted,
                "rejected": self.counts.rejected,
                "misrouted": self.counts.misrouted,
                "can_verify_signatures": keys.can_verify,
                "signing_keys": keys.keys,
                "signing_keys_error": keys.error,
                "database": fingerprint_found,
                "database_error": database_error,
                "database_read_only": read_only,
            },
            status_code=503 if read_only else 200,
        )
