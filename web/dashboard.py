"""The dashboard of ``wanbatch serve``: server-rendered pages over the system of record.

* ``GET /`` — the batch list: progress, counts by state, spend against estimate and budget,
  pace (jobs per minute over the last 10 minutes) and ETA, schedule state.
* ``GET /batches/{batch}`` — one batch (by id, id prefix or name): its figures, its commonest
  failure reasons, and its jobs a page at a time, filtered by state and endpoint, each with its
  state, attempts, error, seed, cost, media check and an inline preview of its video. Its
  failed or cancelled jobs an earlier rerun covers (:mod:`jobs.rendered`) are named with that
  rerun, and "Rerun failed" offers only the others (none: no button).
* ``GET /jobs/{job}/video`` — a job's video: a local file is served (with HTTP ranges, so the
  player can seek) only from inside the output folder; an ``s3://`` output is a redirect to a
  short-lived presigned URL.
* ``POST /batches/{batch}/pause|resume|cancel|rerun-failed`` — the same use cases as the CLI's
  ``pause``, ``resume``, ``cancel`` and ``rerun --failed-only`` (:mod:`jobs.batches`,
  :mod:`jobs.store`), never SQL of their own. Browsers get a redirect back with a one-line
  message; other clients (``Accept`` without ``text/html``) get JSON.
* ``GET``/``POST /login``, ``POST /logout`` — the token form; who may do what is decided by
  :mod:`web.auth` before any of this runs.

Pages are fast on a 100,000-job batch because :mod:`jobs.listing` aggregates in SQL (one
``GROUP BY`` per page) and pages the job list by keyset. They refresh themselves every few
seconds (``static/dashboard.js`` swaps in the parts that changed, leaving a playing video alone).
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

import jinja2
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from jobs import batches, db, listing, store
from jobs.cap_holds import CapCheck
from jobs.digits import ascii_int
from jobs.errors import (
    DatabaseLockedError,
    DatabaseReadOnlyError,
    NotFoundError,
    UsageError,
    WanbatchError,
)
from jobs.fs import name_problem
from jobs.models import Batch, BatchState, utcnow
from jobs.money import usd_text
from jobs.printable import one_line, shell_ref
from jobs.processes import owner_gone, process_prefix
from jobs.redaction import masked_error
from jobs.rendered import RERUN_FAILED_STATES, RenderedBy, RerunBeing, going_on, rendered_how, rerun_covered
from jobs.rerun import rerun_batch, rerun_waits
from jobs.schedule import eta_text, format_age
from jobs.settings import Settings
from jobs.states import JobState
from jobs.url_secrets import mask_urls
from web.auth import (
    SESSION_MAX_AGE,
    Access,
    DatabaseRevocations,
    TokenGate,
    answers_json,
    carries_a_session_cookie,
    cookie_secret,
    safe_next,
    sent_over_https,
)
from web.bodies import Refusal, read_body
from web.receiver import DATABASE_UNAVAILABLE
from worker.here import process_here

log = logging.getLogger(__name__)
#: The lines of a page or action that failed on its database keep the logger they were always
#: written by (``web.app``): log filters and alerts select them by it.
failures_log = logging.getLogger("web.app")

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
#: One-line message shown once on the next page after an action (set by a redirect).
FLASH_COOKIE = "wanbatch_flash"
#: How often an open page refreshes its figures (seconds).
REFRESH_SECONDS = 5
#: Largest login form body read.
MAX_FORM_BYTES = 4096

#: Order of the progress bar's segments and of the state filter's chips: finished work first.
STATE_ORDER = (
    JobState.SUCCEEDED,
    JobState.FAILED,
    JobState.CANCELLED,
    JobState.DOWNLOADING,
    JobState.RUNNING,
    JobState.QUEUED,
    JobState.SUBMITTING,
    JobState.SUBMIT_UNKNOWN,
    JobState.CANCELLING,
    JobState.RETRY_WAIT,
    JobState.PENDING,
)
#: Every page carries these: no framing, no foreign scripts or styles, forms post here only.
#: Media may come from object storage (presigned S3 URLs), so media-src is open.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
        "img-src 'self' data:; "
        "media-src 'self' https: http:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
#: What a client is told when an action's write finds the database's disk full: 503 as for an
#: outage, but waiting alone does not end it; the log line says where (the client is not told
#: the database's place).
DATABASE_FULL = "the database's disk is full: free space on it, then try again; nothing was changed"
#: What a client is told when the database refuses a value its request carries: a data error,
#: the same request fails the same way, so a 400, not an outage's 503; the log line says what.
#: (A NUL in a reference or filter is not one: it is refused before any query, as naming nothing.)
REQUEST_NOT_STORABLE = "the database refuses a value of this request: the same request fails the same way"
#: What a client is told when a page or action failed on any other database error (a bug of the
#: dashboard's: the log has its traceback).
DASHBOARD_FAILED = "the dashboard failed on a database error (an error of the dashboard: see its log)"
#: What a client is told when an action, a login or a logout needs a write and the database is
#: read-only (SQLite ``mode=ro`` or a file serve's user may not write; PostgreSQL
#: ``default_transaction_read_only``, a standby): 503, the pages still read; the log line says why.
DATABASE_READ_ONLY = (
    "the database is read-only: the dashboard shows batches but cannot change them (pause, "
    "resume, cancel, rerun) or log anyone in until serve is given a database it may write; "
    "nothing was changed"
)


# --------------------------------------------------------------------------- formatting


def usd(value: Decimal | float | None) -> str:
    """Dollars and cents as every command writes them (:func:`jobs.money.usd_text`: half up,
    ``$2.835`` → ``$2.84``, thousands separated); "—" where there is no amount."""
    return usd_text(value, none="—")


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """``just now``, ``5m ago``, ``3h10m ago``: the durations ``status`` writes
    (:func:`jobs.schedule.format_age`, its "last seen 3m ago")."""
    if moment is None:
        return "—"
    seconds = ((now or utcnow()) - moment).total_seconds()
    return "just now" if seconds < 10 else f"{format_age(seconds)} ago"


def number(value: int | float | None) -> str:
    return "—" if value is None else f"{value:,}"


def rate(per_minute: float | None) -> str:
    """Jobs per minute, with the precision a glance needs."""
    if per_minute is None:
        return "—"
    return f"{per_minute:,.0f}/min" if per_minute >= 10 else f"{per_minute:.1f}/min"


def percent(part: float | Decimal, whole: float | Decimal) -> float:
    """``part`` of ``whole`` in percent, 0–100, for bar widths (0 when ``whole`` is 0).
    A figure to read uses :func:`share`: this one says 100 for twice the whole."""
    if whole <= 0:
        return 0.0
    return max(0.0, min(100.0, share(part, whole)))


def share(part: float | Decimal, whole: float | Decimal) -> float:
    """``part`` of ``whole`` in percent, as read: above 100 when ``part`` is more (a batch
    committed past its budget cap is ``198``, not the bar's full 100); 0 when ``whole`` is 0."""
    if whole <= 0:
        return 0.0
    return max(0.0, float(part) * 100.0 / float(whole))


def media_text(media: Mapping[str, Any] | None) -> str:
    """``848×480 · 81 f · 16 fps · 5.1 s`` from a probed video's JSON (``worker.probe.MediaInfo``:
    what is known of it; unknown keys are ignored, so an older or odd record never breaks a page)."""
    if not media:
        return ""
    parts = []
    if media.get("width") and media.get("height"):
        parts.append(f"{media['width']}×{media['height']}")
    if media.get("frames"):
        parts.append(f"{media['frames']} f")
    if media.get("fps"):
        parts.append(f"{float(media['fps']):g} fps")
    if media.get("duration_s"):
        parts.append(f"{float(media['duration_s']):.1f} s")
    return " · ".join(parts)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        usd=usd,
        # A forecast's time left as `status` writes it ("~5m15s left"), never in words of its own.
        eta_text=eta_text,
        ago=ago,
        number=number,
        rate=rate,
        media_text=media_text,
        going_on=going_on,
        # A time `status` writes ("14:02:11 UTC", dated when not on ``now``'s UTC day).
        utc_clock=listing.utc_clock,
    )
    env.globals.update(
        percent=percent, share=share, STATE_ORDER=[s.value for s in STATE_ORDER], static=_static_url()
    )
    return env


def _static_url() -> Callable[[str], str]:
    """``static("dashboard.css")`` → ``/static/dashboard.css?v=<hash>``: a new file, a new URL."""
    versions = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:10] for p in STATIC.iterdir() if p.is_file()
    }
    return lambda name: f"/static/{name}?v={versions.get(name, '0')}"


def _warn_unavailable(request: Request, event: str, what: str, *args: object) -> None:
    """The one warning line of a request answered 503 because of the database's state (a lock
    another session holds, a read-only database): method, path and client as every failure line
    of the dashboard names them, then ``what`` (a %-format of ``args``)."""
    client = one_line(request.client.host) if request.client else "?"
    failures_log.warning(
        "dashboard: %s %s from %s: " + what,
        request.method,
        one_line(request.url.path),
        client,
        *args,
        extra={"event": f"dashboard.{event}", "status": 503},
    )


# --------------------------------------------------------------------------- view models


@dataclass(frozen=True, slots=True)
class Filter:
    """The job list's filter and position, from (and back to) the batch page's query string."""

    states: tuple[JobState, ...] = ()
    endpoint: str | None = None
    per_page: int = listing.DEFAULT_PAGE_SIZE
    after: listing.Cursor | None = None
    before: listing.Cursor | None = None
    last: bool = False

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> Filter:
        """Whatever the query says that makes sense; anything else is ignored (a fresh list)."""
        known = {s.value: s for s in JobState}
        states = tuple(known[s] for s in query.get("state", "").split(",") if s in known)
        per = query.get("per", "")
        return cls(
            states=tuple(dict.fromkeys(states)),
            endpoint=query.get("endpoint") or None,
            per_page=int(per) if per in {str(n) for n in listing.PAGE_SIZES} else listing.DEFAULT_PAGE_SIZE,
            after=listing.Cursor.decode(query.get("after")),
            before=listing.Cursor.decode(query.get("before")),
            last=query.get("page") == "last",
        )

    def query(self, **changes: Any) -> str:
        """The query string of this filter with ``changes`` (``states=``, ``endpoint=``, ``per=``,
        ``after=``, ``before=``, ``last=``); a changed filter starts again at the first page."""
        states = changes.get("states", self.states)
        endpoint = changes.get("endpoint", self.endpoint)
        per = changes.get("per", self.per_page)
        params: dict[str, str] = {}
        if states:
            params["state"] = ",".join(JobState(s).value for s in states)
        if endpoint:
            params["endpoint"] = endpoint
        if per != listing.DEFAULT_PAGE_SIZE:
            params["per"] = str(per)
        if changes.get("after") is not None:
            params["after"] = changes["after"].encode()
        elif changes.get("before") is not None:
            params["before"] = changes["before"].encode()
        elif changes.get("last"):
            params["page"] = "last"
        return "?" + urlencode(params) if params else "?"


@dataclass(slots=True)
class Flash:
    """A one-line outcome of an action, shown once."""

    kind: str  # "ok" or "error"
    text: str

    def cookie(self) -> str:
        return quote(f"{self.kind}:{self.text}", safe="")

    @classmethod
    def from_cookie(cls, raw: str | None) -> Flash | None:
        if not raw:
            return None
        kind, _, text = unquote(raw).partition(":")
        return cls(kind if kind in ("ok", "error") else "ok", text[:2000]) if text else None


@dataclass(slots=True)
class Outcome:
    """What an action did: its message, the batch to show next and the JSON answer."""

    message: str
    batch_id: str
    data: dict[str, Any] = field(default_factory=dict)


def _session_attributes(request: Request) -> dict[str, Any]:
    """The login cookie's attributes, the same when it is set and when it is deleted:
    ``HttpOnly``, ``SameSite=Strict``, the whole site, ``Secure`` when the browser came over
    HTTPS (:func:`web.auth.sent_over_https`)."""
    return {
        "httponly": True,
        "samesite": "strict",
        "secure": sent_over_https(request.url.scheme, request.headers),
        "path": "/",
    }


def _access(request: Request) -> Access:
    found = getattr(request.state, "access", None)
    return found if isinstance(found, Access) else Access(False, False, False)


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


# --------------------------------------------------------------------------- the routes


class Dashboard:
    """The dashboard's pages and actions over ``engine``'s database."""

    def __init__(self, engine: Engine, settings: Settings, gate: TokenGate | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.env = _environment()
        if gate is None:
            secret = settings.serve_token
            gate = TokenGate(secret.get_secret_value() if secret is not None else None)
        if gate.secret is None:  # the key of the cookie's name: this database's secret
            gate.secret = lambda: cookie_secret(engine)
        if gate.revocations is None:  # logouts: this database's, read by every serve of it
            gate.revocations = DatabaseRevocations(engine)
        #: The token and its paced check, shared with :class:`web.auth.DashboardAuth`.
        self.gate = gate

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self._bounded(self.index), methods=["GET", "HEAD"]),
            Route("/batches/{ref:str}", self._bounded(self.batch_page), methods=["GET", "HEAD"]),
            Route("/batches/{ref:str}/{action:str}", self.act, methods=["POST"]),
            Route("/jobs/{job_id:str}/video", self._bounded(self.video), methods=["GET", "HEAD"]),
            Route("/login", self.login_form, methods=["GET", "HEAD"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]

    def _bounded(self, page: Callable[[Request], Response]) -> Callable[[Request], Response]:
        """``page`` with its reads waiting at most ``WANBATCH_DATABASE_LOCK_WAIT`` for a lock
        another PostgreSQL session holds (:func:`jobs.db.lock_waits_bounded`): then a 503 naming
        that session (:class:`~jobs.errors.DatabaseLockedError`, :meth:`database_locked`), not a
        request that hangs, and a thread of the pages' pool held, for as long as the lock."""

        def bounded(request: Request) -> Response:
            with db.lock_waits_bounded(self.settings):
                return page(request)

        return bounded

    # ---------------------------------------------------------------- rendering

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
        flash = Flash.from_cookie(request.cookies.get(FLASH_COOKIE))
        body = self.env.get_template(template).render(
            access=_access(request),
            flash=flash,
            now=utcnow(),
            refresh=REFRESH_SECONDS,
            path=request.url.path,
            **context,
        )
        response = HTMLResponse(body, status_code=status_code, headers=SECURITY_HEADERS)
        if flash is not None:
            response.delete_cookie(FLASH_COOKIE, path="/")
        return response

    def not_found(self, request: Request, message: str) -> Response:
        message = masked_error(message)  # it may quote the reference the URL gave (FAL_KEY typed there)
        if not _wants_html(request):
            return JSONResponse({"ok": False, "error": message}, status_code=404)
        return self.render(request, "error.html", status_code=404, title="Not found", message=message)

    def unavailable(self, request: Request, message: str) -> Response:
        """503: the database could not be used (locked, unreachable); a page for browsers."""
        return self.error(request, message, 503, "Unavailable")

    def error(self, request: Request, message: str, status_code: int, title: str) -> Response:
        """An error answered with one line: a page for browsers; for other clients one JSON
        object ``{"ok": false, "error": …}`` from an action (the format of its every answer,
        :func:`web.auth.answers_json`), plain text from anything else. Masked as the command
        line's errors are (:func:`jobs.redaction.masked_error`)."""
        message = masked_error(message)
        if answers_json(request.method, request.scope["path"], request.headers):
            return JSONResponse({"ok": False, "error": message}, status_code=status_code)
        if not _wants_html(request):
            return plain_error(message, status_code)
        return self.render(request, "error.html", status_code=status_code, title=title, message=message)

    async def database_error(self, request: Request, exc: Exception) -> Response:
        """A page or action that failed on a database error (the app's handler of
        :class:`~sqlalchemy.exc.DBAPIError` and of a pool timeout, the same outage), answered
        for what it was (as :meth:`web.receiver.WebhookReceiver.not_stored` answers a delivery):
        only a locked or unreachable database is "unavailable" (503, one warning: the same request
        may succeed in a moment), and a full disk says so (503, one warning naming the database:
        someone must free space); a data error is the request's (400, one warning: it carries a
        value the database refuses, and fails the same way again); a schema older than this
        wanbatch's (``alembic downgrade`` under a running serve: :func:`jobs.db.schema_behind`)
        says so (503, one warning; it was a 500 "the dashboard failed"); anything else is the
        dashboard's (500, one line; the log has the traceback). Never the database's words, which
        may name its host or file: they are logged."""
        assert isinstance(exc, DBAPIError | PoolTimeoutError)
        client = one_line(request.client.host) if request.client else "?"
        # The path and the database's words may carry the request's text: one line each, so a
        # %0A in the URL cannot forge a log line.
        where = (request.method, one_line(request.url.path), client, db.database_problem(exc))
        # A table or column missing: a schema downgraded under this serve says so (SQLite's "no
        # such column" is an OperationalError: before is_unavailable). Read as the start-up reads it.
        if db.is_schema_mismatch(exc) and (behind := await run_in_threadpool(db.schema_behind, self.engine)):
            failures_log.warning(
                "dashboard: %s %s from %s: %s: %s",
                *where[:3],
                behind,
                db.SCHEMA_BEHIND_FIX,
                extra={"event": "dashboard.schema_behind", "status": 503},
            )
            return self.unavailable(request, f"{behind}: {db.SCHEMA_BEHIND_FIX}")
        if db.is_disk_full(exc):  # before is_unavailable, which a full disk also is
            full = db.disk_full_error(self.settings.database_url, then="try again")
            failures_log.warning(
                "dashboard: %s %s from %s: %s: %s",
                *where[:3],
                full,
                where[3],
                extra={"event": "dashboard.database_full", "status": 503},
            )
            return self.unavailable(request, DATABASE_FULL)
        if db.is_unavailable(exc):
            failures_log.warning(
                "dashboard: %s %s from %s: the database is unavailable: %s",
                *where,
                extra={"event": "dashboard.database_unavailable", "status": 503},
            )
            return self.unavailable(request, DATABASE_UNAVAILABLE)
        if isinstance(exc, DataError):
            failures_log.warning(
                "dashboard: %s %s from %s: the database refuses a value of the request: %s",
                *where,
                extra={"event": "dashboard.request_refused", "status": 400},
            )
            return self.error(request, REQUEST_NOT_STORABLE, 400, "Bad request")
        failures_log.error(
            "dashboard: %s %s from %s failed on a database error: %s",
            *where,
            exc_info=exc,
            extra={"event": "dashboard.database_error", "status": 500},
        )
        return self.error(request, DASHBOARD_FAILED, 500, "Internal error")

    async def database_locked(self, request: Request, exc: Exception) -> Response:
        """A page whose read waited ``WANBATCH_DATABASE_LOCK_WAIT`` for a lock another session
        holds (:meth:`_bounded`, the app's handler of :class:`~jobs.errors.DatabaseLockedError`):
        503 with the line that names that session, as ``wanbatch status`` says it (one warning
        in the log)."""
        assert isinstance(exc, DatabaseLockedError)
        _warn_unavailable(request, "database_locked", "%s", exc)
        return self.unavailable(request, str(exc))

    async def database_read_only(self, request: Request, exc: Exception) -> Response:
        """An action, login or logout whose write the database refused because it is read-only
        (the app's handler of :class:`~jobs.errors.DatabaseReadOnlyError`, and :meth:`act`'s):
        503 with :data:`DATABASE_READ_ONLY` (a JSON object for an action a script calls, a page
        for a browser), one warning in the log saying why; never a 500 or a traceback. Not a
        409: nothing about the batch conflicts, and the same action succeeds once serve is given
        a database it may write."""
        assert isinstance(exc, DatabaseReadOnlyError)
        _warn_unavailable(
            request, "database_read_only", "the database is read-only (%s: %s)", exc.reason, exc.said
        )
        return self.error(request, DATABASE_READ_ONLY, 503, "Read-only")

    # ---------------------------------------------------------------- pages

    def index(self, request: Request) -> Response:
        page = ascii_int(request.query_params.get("page"), max_digits=9) or 1
        with db.read_scope(self.engine) as session:
            now = utcnow()
            found = listing.list_batches(session, page=page, now=now)
            shown = [(row.batch, row.totals) for row in found.rows]
            # One query for the page's batches past their deadline, not one per batch.
            schedule = batches.schedule_states(
                session, ((batch, _finished(totals)) for batch, totals in shown), now=now
            )
            # `status`'s forecast of each (jobs.batches.batch_forecast's rules, the batch page's):
            # no time left while the workers cannot reach the broker or nothing processes it.
            forecasts = batches.batch_forecasts(session, shown, now=now)
            rows = [
                ListedBatch.of(batch, totals, forecasts[batch.id], schedule[batch.id], now=now)
                for batch, totals in shown
            ]
        return self.render(
            request, "batches.html", listing=found, rows=rows, schedule=schedule, title="Batches"
        )

    def _silent_workers(self) -> tuple[dict[str, datetime], str]:
        """Workers whose record on the limiter's Redis went stale, when each was last seen
        (:func:`worker.peers.silent_since`), and the line saying the records could not be read
        ("" when they were); nothing without a broker (no workers)."""
        if not self.settings.broker_url:
            return {}, ""
        from worker.peers import read_records, silent_since, unread_warning
        from worker.steps.webhooks import database_fingerprint, webhook_secret

        records = read_records(self.settings, database_fingerprint(webhook_secret(self.engine)))
        return silent_since(records, utcnow()), unread_warning(records)

    def _caps(self) -> CapCheck:
        """How a run from this environment (or its workers, with a broker) counts the caps: its
        key, caps and fal queue, as ``status`` counts them."""
        from worker.limits import api_key_id

        origin = process_here(self.settings).origin
        return CapCheck.of(self.settings, api_key_id(self.settings), origin)

    def batch_page(self, request: Request) -> Response:
        wanted = Filter.parse(request.query_params)
        silent, workers_unread = self._silent_workers()
        with db.read_scope(self.engine) as session:
            try:
                batch = store.get_batch(session, request.path_params["ref"])
            except NotFoundError as exc:
                return self.not_found(request, str(exc))
            now = utcnow()
            summary = listing.batch_summary(session, batch.id, now=now)
            totals = summary.all
            jobs = listing.list_jobs(
                session,
                batch.id,
                states=wanted.states,
                endpoint=wanted.endpoint,
                after=wanted.after,
                before=wanted.before,
                last=wanted.last,
                limit=wanted.per_page,
            )
            # The forecast `status` and `run` give, by their rules (jobs.batches.batch_forecast):
            # what holds the batch back, that nothing processes it, or that the workers cannot
            # reach the broker; the time left and what the schedule cuts short of it.
            forecast = batches.batch_forecast(session, batch, totals, now=now)
            pace = listing.pace(totals, held=forecast.standing, now=now)  # its jobs per minute
            failures = store.failure_reasons(session, batch.id)
            # Processes that cannot connect to fal hold their submits: which, since when (as
            # `status` says; a hold left by a process of this host that has ended is not shown).
            fal_holds = (
                []
                if _finished(totals)
                else listing.fal_holds(session, batch.id, now=now, simulated=batch.simulated, gone=owner_gone)
            )
            # Jobs held by a process that is gone, and when they are taken over, as `status` says
            # (a worker killed on another host too, from its stale record on Redis: ``silent``).
            dead = (
                []
                if _finished(totals)
                else listing.read_dead_holders(
                    session, [batch.id], now=now, excluding=process_prefix(), gone=owner_gone, silent=silent
                )[batch.id]
            )
            rerun = RerunOffer.of(session, batch, totals, now=now)
            shown_schedule = batches.schedule_state(session, batch, finished=_finished(totals), now=now)
            # `status`'s words after "schedule:": for a batch its user paused, how it goes on, and
            # until when its window is closed too.
            schedule_words = batches.schedule_words(
                shown_schedule,
                batches.paused_schedule_state(shown_schedule, store.batch_schedule(batch), now),
                shell_ref(batch.name, batch.id),
            )
            # What `status` reads as the batch's state, decided where it decides it.
            phase, phase_reason = _phase(batch, totals, shown_schedule)
            context: dict[str, Any] = {
                "batch": batch,
                "summary": summary,
                "totals": totals,
                "pace": pace,
                "forecast": forecast,
                "schedule_state": shown_schedule,
                "schedule_words": schedule_words,
                "phase": phase,
                "phase_reason": phase_reason,
                "deadline_advice": _deadline_advice(batch, totals) if phase == "deadline" else "",
                "fal_holds": fal_holds,
                "fal_unreachable": listing.fal_hold_text(fal_holds, now=now),
                "dead_holders": listing.dead_holders_text(dead, now=now),
                # Jobs waiting for fal's webhook proof of their submit, until when, and what then:
                # `status`'s and `run`'s words (its forecast's time left never ends before).
                "proof_wait": forecast.proof_note(self.settings.submit_unknown_policy, now=now),
                # Requests sent with another API key or to another fal queue, waiting for a
                # process that has them: `status`'s and `run`'s words.
                "elsewhere_wait": batches.elsewhere_note(
                    session, batch, totals.counts, process_here(self.settings)
                ),
                # A cap (or the queue-wait back-off) holding its unsent jobs back, and whose jobs
                # fill it: `status`'s phase_reason, counted as a run from this environment counts.
                "cap_hold": batches.held_note(
                    session, batch, totals.counts, phase, self._caps(), beat=forecast.last_beat, now=now
                ),
                # Requests of a cancelled batch whose cancel a process gave up at fal: fal may
                # still run and bill them (`status`'s uncancelled_note).
                "uncancelled": batches.uncancelled_note(session, batch, totals.counts),
                "workers_unread": workers_unread,
                "failures": failures,
                "failures_split": batches.told_apart_by_sending(
                    (f.state, f.error_type, f.sent) for f in failures
                ),
                "children": listing.child_batches(session, batch.id),
                "parent": store.get_batch(session, batch.parent_batch_id) if batch.parent_batch_id else None,
                "jobs": jobs,
                "filter": wanted,
                "matching": summary.matching(wanted.states, wanted.endpoint),
                "actions": _actions(batch, totals, rerun, phase),
                "rerun": rerun,
                "title": batch.name,
            }
        return self.render(request, "batch.html", **context)

    def video(self, request: Request) -> Response:
        with db.read_scope(self.engine) as session:
            found = listing.job_output(session, request.path_params["job_id"])
        if found is None or not found[1]:
            return self.not_found(request, "no such job, or it has no video (yet)")
        output_path = found[1]
        from jobs.output_store import open_output_store

        outputs = open_output_store(self.settings)
        if output_path.startswith("s3://"):
            try:
                url = outputs.presigned_url(output_path)
            except WanbatchError as exc:  # its reason is masked already; masked again, whatever made it
                return plain_error(one_line(mask_urls(str(exc))), 502)
            if url is None:
                return self.not_found(request, "the video cannot be linked")
            return RedirectResponse(url, status_code=307)
        problem = name_problem(output_path)
        if problem is not None:  # not "not in the output folder": it is, under a name this locale lacks
            return self.not_found(request, f"the video's path cannot be opened by this server: {problem}")
        local = outputs.local_file(output_path)
        if local is None:  # a moved project's video, found (same bytes) under the output folder?
            from jobs import moved_outputs

            root = moved_outputs.local_root(self.settings.output_dir, self.settings.output_url)
            moved = moved_outputs.moved_video(self.engine, request.path_params["job_id"], output_path, root)
            local = None if moved is None else outputs.local_file(moved)
        if local is None:
            return self.not_found(
                request, "the video is not in the output folder (moved, deleted, or elsewhere)"
            )
        media_type = mimetypes.guess_type(local.name)[0] or "application/octet-stream"
        return FileResponse(
            local,
            media_type=media_type,
            headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    # ---------------------------------------------------------------- actions

    async def act(self, request: Request) -> Response:
        ref, action = request.path_params["ref"], request.path_params["action"]
        handlers: dict[str, Callable[[str], Outcome]] = {
            "pause": lambda r: self._pause(r, True),
            "resume": lambda r: self._pause(r, False),
            "cancel": self._cancel,
            "rerun-failed": self._rerun_failed,
        }
        handler = handlers.get(action)
        if handler is None:
            return self.not_found(request, f"no action {action!r}")
        client = one_line(request.client.host) if request.client else "?"
        try:
            outcome = await run_in_threadpool(handler, ref)
        except DatabaseReadOnlyError as exc:  # not the request's conflict (409): the database's
            return await self.database_read_only(request, exc)
        except WanbatchError as exc:
            # Not jobs.printable.first_line: the answer's JSON and the page quote it unescaped, as
            # the CLI's --json does (each escapes it its own way); the log line escapes it below.
            message = masked_error(str(exc).partition("\n")[0])  # as every error answer is
            log.info(
                "dashboard: %s of %s refused for %s: %s",
                action,
                one_line(ref),  # a reference from the URL: its line breaks must not forge log lines
                client,
                one_line(message),  # it may quote the reference
                extra={"event": "dashboard.action_refused", "action": action},
            )
            if not _wants_html(request):
                status = 404 if isinstance(exc, NotFoundError) else 409
                return JSONResponse({"ok": False, "error": message}, status_code=status)
            return self._back(f"/batches/{quote(ref, safe='')}", Flash("error", message))
        log.info(
            "dashboard: %s of %s by %s: %s",
            action,
            one_line(ref),
            client,
            outcome.message,
            extra={"event": "dashboard.action", "action": action, "batch_id": outcome.batch_id},
        )
        if not _wants_html(request):
            return JSONResponse({"ok": True, "message": outcome.message, **outcome.data})
        return self._back(f"/batches/{outcome.batch_id}", Flash("ok", outcome.message))

    @staticmethod
    def _back(target: str, flash: Flash) -> Response:
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            FLASH_COOKIE, flash.cookie(), max_age=60, path="/", httponly=True, samesite="strict"
        )
        return response

    def _pause(self, ref: str, paused: bool) -> Outcome:
        result = batches.set_paused(ref, paused, self.settings)
        return Outcome(result.message, result.batch_id, result.as_dict())

    def _cancel(self, ref: str) -> Outcome:
        """``wanbatch cancel`` without the processing that follows it there: the one use case
        (:func:`jobs.batches.cancel_batch`) records it; the jobs fal holds are cancelled there by
        whatever processes the batch, which the message names. A cancel that changes nothing (a
        finished batch, or one already cancelled with nothing left unsent) is refused (409)."""
        done = batches.cancel_batch(ref, self.settings, by="dashboard")
        label = f"{done.name} ({done.batch_id[:12]})"
        if done.finished:
            raise UsageError(f"batch {label} is finished: nothing to cancel")
        if not done.changed:
            raise UsageError(f"batch {label} is already cancelled{self._at_fal_words(done, 'still being ')}")
        if done.already_cancelled:  # a cancel stopped half-way: this one ended what it left unsent
            head = f"batch {label} was already cancelled; this ended what was left"
        else:
            head = f"cancelled batch {label}"
        message = f"{head}: {batches.cancelled_at_once(done.at_once)}{self._at_fal_words(done)}"
        return Outcome(message, done.batch_id, done.as_dict())

    def _at_fal_words(self, done: batches.CancelResult, being: str = "") -> str:
        """``; N job(s) fal holds are cancelled there by …``: who makes the calls to fal the
        dashboard does not make (empty when fal holds none)."""
        if not done.at_fal:
            return ""
        ref = shell_ref(done.name, done.batch_id)
        if done.simulated:  # at a --simulate run's simulator: no worker touches them
            return (
                f"; {done.at_fal} job(s) its simulator holds are {being}cancelled there by the "
                f"`wanbatch run --simulate` processing it, or by `wanbatch cancel {ref} --simulate`"
            )
        by = (
            "the workers"
            if self.settings.broker_url
            else f"the `wanbatch run` processing it, or by `wanbatch cancel {ref}`"
        )
        return f"; {done.at_fal} job(s) fal holds are {being}cancelled there by {by}"

    def _rerun_failed(self, ref: str) -> Outcome:
        """``wanbatch rerun BATCH --failed-only``: a new batch of the failed and cancelled jobs.

        The dashboard only stores it: workers (distributed) pick it up on their own; without a
        broker nothing runs it until ``wanbatch run NAME`` — the message says which.
        """
        with db.read_scope(self.engine) as session:
            batch = store.get_batch(session, ref)
            counts = store.counts_by_state(session, batch.id)
        if counts[JobState.FAILED.value] + counts[JobState.CANCELLED.value] == 0:
            raise UsageError(f"batch {batch.name} has no failed or cancelled job: nothing to rerun")
        # A simulation's rerun is a simulation: a button must never turn a rehearsal into spending.
        result = rerun_batch(batch.id, failed_only=True, settings=self.settings, simulated=batch.simulated)
        ref = shell_ref(result.name, result.batch_id)
        # It keeps its parent's window: while that is closed it waits, as `rerun` and `status` say
        # (jobs.rerun.rerun_waits: Schedule.waits), before anything sends it.
        if waits := rerun_waits(result, utcnow()):
            if result.simulated:
                sender = f"`wanbatch run {ref} --simulate` (a simulation)"
            elif self.settings.broker_url:
                sender = "the workers"
            else:
                sender = f"`wanbatch run {ref}` (no workers: no WANBATCH_BROKER_URL)"
            then = f"it {waits}; then {sender} sends it"
        elif result.simulated:
            then = f"a simulation: nothing sends it until `wanbatch run {ref} --simulate`"
        elif self.settings.broker_url:
            then = "the workers send it"
        else:
            then = f"nothing sends it until `wanbatch run {ref}` (no workers: no WANBATCH_BROKER_URL)"
        message = f"created batch {result.name} with {result.added} job(s) of {batch.name}: {then}"
        for warning in result.warnings:  # the jobs an earlier rerun rendered (or renders), left out
            message += f"; {warning}"
        return Outcome(message, result.batch_id, result.as_dict())

    # ---------------------------------------------------------------- login

    def login_form(self, request: Request) -> Response:
        return self.render(
            request, "login.html", title="Log in", next=safe_next(request.query_params.get("next")), error=""
        )

    async def login(self, request: Request) -> Response:
        body = await read_body(request, cap=MAX_FORM_BYTES)
        if isinstance(body, Refusal):
            client = one_line(request.client.host) if request.client else "?"
            log.warning(
                "dashboard: login form refused (%s) from %s: %s",
                body.status,
                client,
                body.reason,
                extra={"event": "dashboard.login_refused", "status": body.status},
            )
            return plain_error("the form is too large" if body.status == 413 else body.reason, body.status)
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        target = safe_next(form.get("next"))
        token = self.gate.token
        if token is None:
            return self.render(
                request,
                "login.html",
                status_code=403,
                title="Log in",
                next=target,
                error="WANBATCH_SERVE_TOKEN is not set on the server: there is nothing to log in with.",
            )
        if not await self.gate.check_token(form.get("token", "")):
            client = one_line(request.client.host) if request.client else "?"
            log.warning("dashboard: wrong token from %s", client, extra={"event": "dashboard.login_refused"})
            return self.render(
                request,
                "login.html",
                status_code=401,
                title="Log in",
                next=target,
                error="That is not the token.",
            )
        cookie = await self.gate.new_session()  # this login's own value, signed, issued now
        assert cookie is not None  # a token is configured
        name, value = cookie
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(name, value, max_age=SESSION_MAX_AGE, **_session_attributes(request))
        return response

    async def logout(self, request: Request) -> Response:
        """End this browser's login (the middleware checked the ``Origin``): on the server, for
        every ``serve`` of the database (:meth:`web.auth.TokenGate.end_session`: a copy of the
        cookie kept reads and acts no more), and in the browser (its cookie deleted).

        Only a cookie the request carries under this dashboard's name is deleted: a deletion
        names the cookie, and the name is for the browser that logged in. Whatever its value
        (a stale or damaged one goes too): a caller who sent the name already knew it."""
        response = RedirectResponse("/", status_code=303)
        if not carries_a_session_cookie(request.headers):
            return response
        name = await self.gate.cookie_name()
        if name is not None and name in request.cookies:
            try:
                await self.gate.end_session(request.cookies[name])
            except (DBAPIError, PoolTimeoutError, DatabaseReadOnlyError) as exc:
                # A role that may not write (a read-only serve), or no database: the browser's
                # cookie still goes, and the log says the copy of it is not ended.
                said = exc.said if isinstance(exc, DatabaseReadOnlyError) else db.database_problem(exc)
                log.warning(
                    "dashboard: logout could not end the session on the server (%s): the browser's "
                    "cookie is deleted, but a copy of it keeps working until it is 30 days old; "
                    "a new WANBATCH_SERVE_TOKEN ends every session",
                    said[:300],
                    extra={"event": "dashboard.logout_not_recorded"},
                )
            # With the attributes it was set with (HttpOnly, SameSite=Strict, Secure over HTTPS).
            response.delete_cookie(name, **_session_attributes(request))
        return response


def plain_error(message: str, status_code: int) -> Response:
    """A one-line plain-text answer (no page around it: the client is not a browser, or it broke)."""
    return Response(message, status_code=status_code, media_type="text/plain; charset=utf-8")


def _finished(totals: listing.Totals) -> bool:
    return totals.total > 0 and totals.finished == totals.total


def _phase(batch: Batch, totals: listing.Totals, schedule_state: str) -> tuple[str, str | None]:
    """What ``status`` reads as the batch's state, and why it is held back
    (:func:`jobs.batches.batch_phase`, given its :func:`jobs.batches.schedule_state`)."""
    return batches.batch_phase(
        state=batch.state,
        total=totals.total,
        finished=totals.finished,
        pause_reason=batch.pause_reason,
        paused_by_user=batch.paused_by_user,
        schedule_state=schedule_state,
    )


@dataclass(frozen=True, slots=True)
class ListedBatch:
    """A row of the batch list: its figures and the forecast ``status`` gives it, which the
    list says in the batch page's words (the ``eta`` macro of ``_macros.html``)."""

    batch: Batch
    totals: listing.Totals
    #: :func:`jobs.batches.batch_forecast`'s, by ``status``'s rules.
    forecast: batches.Forecast
    #: Its jobs finished per minute (:func:`jobs.listing.pace`).
    per_minute: float | None
    phase: str
    phase_reason: str | None

    @classmethod
    def of(
        cls,
        batch: Batch,
        totals: listing.Totals,
        forecast: batches.Forecast,
        schedule_state: str,
        *,
        now: datetime,
    ) -> ListedBatch:
        phase, reason = _phase(batch, totals, schedule_state)
        per_minute = listing.pace(totals, held=forecast.standing, now=now).per_minute
        return cls(batch, totals, forecast, per_minute, phase, reason)


@dataclass(frozen=True, slots=True)
class Action:
    """A button of the batch page: shown when it can change something."""

    name: str
    label: str
    style: str
    confirm: str = ""
    #: What the button does, in a sentence (its tooltip).
    title: str = ""


@dataclass(frozen=True, slots=True)
class RenderedRerun:
    """A rerun that rendered some of the batch's failed or cancelled jobs: where their videos are."""

    batch_id: str
    name: str
    jobs: int
    #: The command that lists the videos: ``wanbatch export NAME``, in backticks.
    export: str
    #: Made after the batch (:attr:`jobs.rendered.RenderedBy.since`).
    since: bool = False


@dataclass(frozen=True, slots=True)
class RerunOffer:
    """What "Rerun failed" (``rerun --failed-only``) would send now, and where the failed or
    cancelled jobs it would leave out are: rendered by an earlier rerun, or being rerun by an
    unfinished one. Decided by :func:`jobs.rendered.rerun_covered`, the very test ``rerun`` and
    ``status`` apply, so the page never offers a rerun that ``rerun`` refuses."""

    #: The batch's failed and cancelled jobs, of its manifest (``rerun --failed-only`` leaves
    #: out those the manifest no longer has).
    failed: int = 0
    #: Of them, those no rerun covers: what the button would send.
    left: int = 0
    rendered: list[RenderedRerun] = field(default_factory=list)
    pending: list[RerunBeing] = field(default_factory=list)

    @classmethod
    def of(cls, session: Session, batch: Batch, totals: listing.Totals, *, now: datetime) -> RerunOffer:
        failed = sum(totals.counts[s.value] - totals.not_in_manifest[s.value] for s in RERUN_FAILED_STATES)
        if not failed:  # nothing to rerun: the reruns are not even looked up
            return cls()
        covered = rerun_covered(session, batch, now=now)
        rendered: list[RenderedBy] = covered.rendered["reruns"]
        return cls(
            failed=failed,
            left=max(0, failed - covered.rendered["jobs"] - covered.pending["jobs"]),
            rendered=[
                RenderedRerun(
                    r["batch"],
                    r["name"],
                    r["jobs"],
                    f"`wanbatch export {shell_ref(r['name'], r['batch'])}`",
                    r["since"],
                )
                for r in rendered
            ],
            pending=list(covered.pending["reruns"]),
        )

    @property
    def rendered_jobs(self) -> int:
        return sum(r.jobs for r in self.rendered)

    @property
    def rendered_how(self) -> str:
        """How the page says the jobs were rendered (:func:`jobs.rendered.rendered_how`): not
        "since" by a rerun made before the batch."""
        return rendered_how(all(r.since for r in self.rendered))

    @property
    def covered(self) -> int:
        return self.failed - self.left


def _rerun_action(rerun: RerunOffer) -> Action | None:
    """The "Rerun failed" button when some failed or cancelled job is left to rerun, saying how
    many when an earlier rerun covers the others (``rerun --failed-only`` leaves those out); none
    when it covers them all (``rerun`` would refuse: the page says where they are instead)."""
    if not rerun.left:
        return None
    if not rerun.covered:
        return Action(
            "rerun-failed",
            "Rerun failed",
            "secondary",
            "Create a new batch with the failed and cancelled jobs of this one?",
        )
    return Action(
        "rerun-failed",
        f"Rerun {rerun.left:,} failed",
        "secondary",
        f"Create a new batch with {rerun.left:,} of the {rerun.failed:,} failed and cancelled jobs of "
        f"this one? The other {rerun.covered:,} are left out: an earlier rerun already rendered them, "
        "or is rendering them, with the same input.",
        f"{rerun.left:,} of the {rerun.failed:,} failed or cancelled jobs: an earlier rerun covers "
        "the others",
    )


def _deadline_advice(batch: Batch, totals: listing.Totals) -> str:
    """What a batch past its deadline needs, as ``status`` says it: nothing is sent any more
    (resuming a user's pause sends nothing), and what processing it does."""
    unsent = totals.waiting
    in_flight = totals.total - totals.finished - unsent
    simulate = " --simulate" if batch.simulated else ""  # only a --simulate run processes one
    paused = ", so resuming sends nothing" if batch.paused_by_user else ""
    return (
        f"Its deadline has passed: nothing more is sent{paused}. "
        f"`wanbatch run {shell_ref(batch.name, batch.id)}{simulate}` "
        f"{batches.deadline_run_words(in_flight=in_flight, unsent=unsent)}."
    )


def _actions(batch: Batch, totals: listing.Totals, rerun: RerunOffer, phase: str) -> list[Action]:
    """The buttons that make sense for ``batch`` as it is now (``phase``: :func:`batches.batch_phase`'s).

    Past its deadline (phase ``deadline``) neither Resume nor Pause: nothing is sent any more, paused
    or not, and the page says what goes on instead (:func:`_deadline_advice`)."""
    found: list[Action] = []
    done = _finished(totals)
    if batch.state != BatchState.CANCELLED and phase != "deadline":
        if batch.paused_by_user and not done:  # a finished batch has nothing left to go on with
            found.append(Action("resume", "Resume", "primary"))
        elif not done:
            found.append(Action("pause", "Pause", "secondary"))
    if (offer := _rerun_action(rerun)) is not None:
        found.append(offer)
    if batch.state != BatchState.CANCELLED and not done:
        found.append(
            Action(
                "cancel",
                "Cancel batch",
                "danger",
                "Cancel this batch? Jobs not yet sent are never sent; queued ones are cancelled at fal.",
            )
        )
    return found
