"""Prometheus ``/metrics`` for ``wanbatch serve``: the work, from the database, at scrape time.

Two sources, one page:

* :class:`DatabaseCollector` reads the system of record when Prometheus scrapes
  (:func:`jobs.metrics.snapshot`: a handful of aggregate queries over the unfinished jobs and
  those finished lately; the sums of the rest are kept between scrapes,
  :class:`jobs.metrics.FinishedTotals`) — jobs
  by state, batches, submissions, retries, ambiguous submits, errors by type, duplicate
  charges, money, and duration histograms. Every deployment gets complete numbers this way,
  whichever processes did the work and however often they restarted. Several ``serve``
  replicas report the same numbers: scrape one, or aggregate them with ``max``, not ``sum``.
* this process's own registry (:mod:`worker.telemetry`): the webhook deliveries its receiver
  accepted and rejected (they live in this process only), with the usual ``process_*``
  metrics.

Each app gets a :class:`~prometheus_client.CollectorRegistry` of its own, so tests and several
apps in one process never share or double-register collectors. The queries run in a thread
(Starlette's threadpool), never on the event loop that receives webhooks. A database that does
not answer is ``wanbatch_database_up 0`` and the page still answers (200): the scrape shows the
outage instead of failing without a word. So is one another PostgreSQL session's lock holds
longer than ``WANBATCH_DATABASE_LOCK_WAIT`` (:func:`jobs.db.lock_waits_bounded`): an unbounded
scrape waited for the lock for ever, each holding a connection of the pool the dashboard and the
webhook receiver share, until the dashboard's pages too waited for a connection. And so is one
whose schema was downgraded under this serve (``alembic downgrade``, :func:`jobs.db.schema_behind`;
the dashboard answers 503): ``wanbatch_database_schema_current 0`` says why, and a warning line
which schema it is at (it said ``wanbatch_database_up 1``, the queries running on the older schema).

The metrics, their labels and meanings are listed in the README ("Metrics"); units are in the
names (``_seconds``, ``_usd``), counters end in ``_total``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobs import db
from jobs.errors import DatabaseLockedError
from jobs.metrics import FinishedTotals, Snapshot, snapshot
from jobs.money import usd_json
from jobs.printable import named_first_line
from jobs.settings import DatabaseSettings, Settings
from worker.telemetry import ProcessMetrics

log = logging.getLogger(__name__)

#: What each duration histogram measures (``wanbatch_job_<name>_seconds``).
DURATION_HELP = {
    "wait": "Seconds from a job's creation to its (last) submit: limits, budget, schedule and retry "
    "backoff, per finished job.",
    "fal": "Seconds from a job's (last) submit to fal reporting it completed: fal's queue plus the model "
    "run, as seen from here, per finished job.",
    "inference": "fal's own inference_time of each finished job's (last) request.",
    "download": "Seconds from fal reporting a job completed to its output stored (succeeded jobs that "
    "were sent).",
}

#: Why ``wanbatch_database_up`` may be 0 with a database that answers: its schema is not this
#: wanbatch's (downgraded under this serve, :func:`jobs.db.schema_behind`). Absent when the
#: database could not be read.
SCHEMA_CURRENT = "wanbatch_database_schema_current"
SCHEMA_CURRENT_HELP = (
    "1 when the database is at this wanbatch's schema; 0 when at another (downgraded under this "
    "serve: wanbatch_database_up is 0 too)."
)


class DatabaseCollector(Collector):
    """The work, read from the database when collected (see :mod:`jobs.metrics`)."""

    def __init__(self, engine: Engine, settings: DatabaseSettings | None = None) -> None:
        self.engine = engine
        #: Whose ``database_lock_wait`` bounds a scrape's lock waits (``serve``'s); None: unbounded
        #: (a benchmark or a test reading the numbers directly, nothing shared waits on it).
        self.settings = settings
        #: The sums of the jobs finished long ago, kept between scrapes (:class:`FinishedTotals`).
        self.finished = FinishedTotals()

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering must not query the database (and the names are not fixed ahead
        of a scrape for labels anyway)."""
        return []

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        bounded = (
            db.lock_waits_bounded(self.settings) if self.settings is not None else contextlib.nullcontext()
        )
        try:
            # Entered here, on the scrape's own threadpool thread (the bound follows the context).
            with bounded:
                # A schema downgraded under this serve (:func:`jobs.db.schema_behind`) is no
                # database this wanbatch can use, as the dashboard's 503 says, though the
                # scrape's queries may well still run on it (none reads the columns dropped).
                behind = db.revision_behind(self.engine)
                if behind is None:
                    with db.read_scope(self.engine, snapshot=True) as session:
                        snap = snapshot(session, self.finished)
        except DatabaseLockedError as exc:  # its connection given back: the pool is not drained
            log.warning("metrics: %s", exc, extra={"event": "metrics.database_locked"})
            yield _gauge("wanbatch_database_up", "1 when the last scrape could read the database.", 0)
            return
        except SQLAlchemyError as exc:
            reason = named_first_line(exc, limit=200)
            log.warning(
                "metrics: the database does not answer (%s)", reason, extra={"event": "metrics.database_down"}
            )
            yield _gauge("wanbatch_database_up", "1 when the last scrape could read the database.", 0)
            return
        if behind is not None:
            log.warning(
                "metrics: %s: %s", behind, db.SCHEMA_BEHIND_FIX, extra={"event": "metrics.schema_behind"}
            )
            yield _gauge("wanbatch_database_up", "1 when the last scrape could read the database.", 0)
            yield _gauge(SCHEMA_CURRENT, SCHEMA_CURRENT_HELP, 0)
            return
        yield _gauge("wanbatch_database_up", "1 when the last scrape could read the database.", 1)
        yield _gauge(
            "wanbatch_metrics_query_seconds",
            "Seconds the last scrape spent reading the database.",
            time.perf_counter() - started,
        )
        yield _gauge(SCHEMA_CURRENT, SCHEMA_CURRENT_HELP, 1)
        yield from _families(snap)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _families(snap: Snapshot) -> Iterator[Metric]:
    jobs = GaugeMetricFamily("wanbatch_jobs", "Jobs in each state, all batches.", labels=["state"])
    for state, n in snap.jobs.items():
        jobs.add_metric([state], n)
    yield jobs

    batches = GaugeMetricFamily(
        "wanbatch_batches",
        "Batches by state: active and paused (by the user, a refused account or a budget) with jobs "
        "left to finish; done (every job finished); cancelled.",
        labels=["state"],
    )
    for state, n in snap.batches.items():
        batches.add_metric([state], n)
    yield batches
    yield _gauge(
        "wanbatch_batches_unattended",
        "Batches with work left that no wanbatch process works on (a stopped run, no worker).",
        snap.unattended_batches,
    )

    yield CounterMetricFamily(
        "wanbatch_submits",
        "Submissions to fal counted on the jobs (every request sent), all batches.",
        value=snap.attempts,
    )
    yield CounterMetricFamily(
        "wanbatch_retries", "Attempts beyond each job's first (new submissions of a job).", value=snap.retries
    )
    yield CounterMetricFamily(
        "wanbatch_ambiguous_submits",
        "Times a job's submit ended with its outcome unknown (the job went to submit_unknown).",
        value=snap.ambiguous_submits,
    )
    yield CounterMetricFamily(
        "wanbatch_possible_duplicate_charges",
        "Submissions resent after an ambiguous outcome: fal may have billed each twice.",
        value=snap.possible_duplicate_charges,
    )
    yield CounterMetricFamily(
        "wanbatch_confirmed_duplicate_charges",
        "Extra requests fal proved it ran (a signed webhook, a submit's late answer): each was billed.",
        value=snap.confirmed_duplicate_charges,
    )

    errors = GaugeMetricFamily(
        "wanbatch_job_errors",
        "Jobs holding a recorded error, by state and error type (fal's error_type, or wanbatch's "
        "own such as budget, deadline, submit_unknown, download_failed).",
        labels=["state", "error_type"],
    )
    for (state, error_type), n in sorted(snap.errors.items()):
        errors.add_metric([state, error_type], n)
    yield errors

    money = {
        "estimated": "Estimated USD of every job (the sum of the estimates).",
        "spent": "USD billed for finished work (actual cost, plus the estimate of work fal finished "
        "whose cost is not recorded yet); "
        "as status' spent_usd.",
        "reserved": "USD estimated for requests fal holds or may hold right now.",
        "wasted": "USD billed that bought no output (failed or cancelled jobs, earlier attempts of "
        "succeeded ones); as cost's wasted_usd.",
    }
    for kind, doc in money.items():
        family = GaugeMetricFamily(f"wanbatch_{kind}_usd", doc + " By endpoint.", labels=["endpoint"])
        for endpoint, usd in sorted(snap.usd.items()):
            family.add_metric([endpoint], usd_json(getattr(usd, kind)) or 0.0)
        yield family

    for name, histogram in snap.durations.items():
        yield HistogramMetricFamily(
            f"wanbatch_job_{name}_seconds",
            DURATION_HELP[name],
            buckets=[(le, float(n)) for le, n in histogram.cumulative()],
            sum_value=histogram.total,
        )

    inbox = GaugeMetricFamily(
        "wanbatch_webhook_inbox",
        "Webhook deliveries of the database's inbox: ever stored, repeats of stored ones, ignored "
        "(counters: pruning applied deliveries takes nothing off them); unprocessed (still to apply).",
        labels=["kind"],
    )
    for kind, n in snap.webhook_inbox.items():
        inbox.add_metric([kind], n)
    yield inbox


def metrics_registry(engine: Engine, settings: DatabaseSettings | None = None) -> CollectorRegistry:
    """The registry ``/metrics`` renders: the database's numbers (their lock waits bounded by
    ``settings``, :class:`DatabaseCollector`) and this process's."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(engine, settings))
    registry.register(ProcessMetrics())
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def metrics_route(engine: Engine, settings: Settings) -> Route:
    """The ``GET /metrics`` route of the app serving ``engine``'s database (Prometheus' text
    format). ``settings`` is the app's; the auth middleware decides who may read it."""
    registry = metrics_registry(engine, settings)

    async def metrics(request: Request) -> Response:
        # Prometheus' text format, or OpenMetrics when the scraper asks for it (Accept header).
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        body = await run_in_threadpool(encoder, registry)
        return Response(body, headers={"Content-Type": content_type})

    return Route("/metrics", metrics, methods=["GET"])
