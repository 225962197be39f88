"""Benchmark (issue #14): one Prometheus scrape of ``/metrics`` on a 100,000-job database.

``/metrics`` of ``wanbatch serve`` reads the database at every scrape (:mod:`jobs.metrics`):
this measures what that costs as the database grows. A fresh PostgreSQL database
``wanbatch_bench_metrics_<random>`` gets, by SQL (seconds, not minutes), one batch of ``--jobs``
jobs spread over the states of a batch halfway through its night — 55 % succeeded, 3 % failed,
2 % cancelled, the rest at fal, downloading, waiting or pending — with their timestamps, fal's
``inference_time``, costs, error types, 1 in 7 retried, and a history of six events per job
(1 in 500 with a submit whose outcome was unknown), as many as a real run writes.

Printed: the whole scrape as Prometheus gets it (``generate_latest`` of the app's registry,
the process metrics included) and each of the store's queries on its own; the median of
``--runs`` runs after one warm-up (min and max too). Target: a scrape within 500 ms.

Run from the repository root::

    python -m bench.metrics                   # 100,000 jobs, PostgreSQL
    python -m bench.metrics --jobs 20000 --runs 5 --json

Exit status is 0 when the scrape meets the target, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from prometheus_client import generate_latest
from rich.table import Table
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from bench._common import fresh_pg_database, machine_summary, print_table, today
from bench.expand import DEFAULT_DATABASE_URL
from jobs import db, store
from jobs.metrics import DURATION_BUCKETS
from jobs.states import JobState
from web.metrics import metrics_registry

#: A scrape should answer well within Prometheus' default 10 s timeout; this is the bar here.
TARGET_MS = 500.0

_FILL = [
    """
    INSERT INTO batches (id, name, manifest_path, manifest_sha256, created_at, state, priority,
                         paused_by_user, reuse_outputs)
    VALUES ('bench0000000000000000000metrics', 'metrics-bench', 'bench.yaml', repeat('0', 64),
            now() - interval '3 hours', 'active', 'normal', false, false)
    """,
    """
    INSERT INTO jobs (id, batch_id, job_key, item_index, variant, endpoint, input, state, version,
        attempts, download_attempts, possible_duplicate_charges, confirmed_duplicate_charges,
        est_billing_units, est_usd, actual_billing_units, actual_usd, created_at, updated_at,
        submitted_at, completed_at, finished_at, provider_metrics, error_type, error, request_id)
    SELECT md5(i::text), 'bench0000000000000000000metrics', md5('key' || i), i, 0,
        (ARRAY['fal-ai/wan-i2v', 'fal-ai/wan-flf2v', 'fal-ai/wan-22',
               'fal-ai/wan-25-preview/image-to-video', 'wan/v2.6/image-to-video'])[1 + i % 5],
        jsonb_build_object('prompt', 'scene ' || i, 'resolution', '480p'),
        CASE WHEN i % 1000 < 550 THEN 'succeeded' WHEN i % 1000 < 580 THEN 'failed'
             WHEN i % 1000 < 600 THEN 'cancelled' WHEN i % 1000 < 630 THEN 'running'
             WHEN i % 1000 < 660 THEN 'queued' WHEN i % 1000 < 670 THEN 'downloading'
             WHEN i % 1000 < 680 THEN 'retry_wait' ELSE 'pending' END,
        6,
        CASE WHEN i % 1000 < 680 THEN 1 + (i % 7 = 0)::int ELSE 0 END,
        0, (i % 500 = 0)::int, 0, 5, 0.45,
        CASE WHEN i % 1000 < 550 THEN 5 END, CASE WHEN i % 1000 < 550 THEN 0.45 END,
        now() - interval '3 hours', now(),
        CASE WHEN i % 1000 < 680 THEN now() - interval '2 hours' + (i % 3600) * interval '1 second' END,
        CASE WHEN i % 1000 < 580 OR i % 1000 BETWEEN 660 AND 669
             THEN now() - interval '2 hours' + (i % 3600 + 40 + i % 90) * interval '1 second' END,
        CASE WHEN i % 1000 < 600
             THEN now() - interval '2 hours' + (i % 3600 + 45 + i % 90) * interval '1 second' END,
        CASE WHEN i % 1000 < 580 THEN jsonb_build_object('inference_time', 30 + (i % 90)) END,
        CASE WHEN i % 1000 BETWEEN 550 AND 569 THEN 'runner_disconnected'
             WHEN i % 1000 BETWEEN 570 AND 579 THEN 'request_timeout'
             WHEN i % 1000 BETWEEN 580 AND 599 THEN 'budget' END,
        CASE WHEN i % 1000 BETWEEN 550 AND 599 THEN 'failed or cancelled' END,
        CASE WHEN i % 1000 < 680 THEN 'req-' || i END
    FROM generate_series(1, :jobs) AS i
    """,
    """
    INSERT INTO job_events (job_id, at, from_state, to_state, version, reason)
    SELECT md5(i::text), now(), 'pending',
        CASE WHEN j = 1 AND i % 500 = 0 THEN 'submit_unknown'
             ELSE (ARRAY['submitting', 'queued', 'running', 'downloading', 'succeeded', 'succeeded'])[1 + j]
        END,
        j + 1, 'bench'
    FROM generate_series(1, :jobs) AS i, generate_series(0, 5) AS j
    """,
    "ANALYZE",
]


@dataclass
class Timing:
    """One measured thing: median, min and max in milliseconds."""

    what: str
    median_ms: float
    min_ms: float
    max_ms: float


def _time(what: str, runs: int, action: Callable[[], object]) -> Timing:
    action()  # warm-up: plans, caches, the first connection
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return Timing(what, statistics.median(times), min(times), max(times))


def fill(engine: Engine, jobs: int) -> None:
    with engine.begin() as conn:
        for statement in _FILL:
            conn.execute(text(statement), {"jobs": jobs})


def measure(engine: Engine, runs: int) -> list[Timing]:
    registry = metrics_registry(engine)
    timings = [_time("scrape (GET /metrics)", runs, lambda: generate_latest(registry))]

    def query(what: str, action: Callable[[Session], object]) -> Timing:
        def once() -> object:
            with db.read_scope(engine) as session:
                return action(session)

        return _time(what, runs, once)

    timings.append(query("job totals (state, endpoint, error)", store.job_totals))
    timings.append(query("batches by state", store.batch_states))
    timings.append(
        query("ambiguous submits (events)", lambda s: store.count_events_into(s, JobState.SUBMIT_UNKNOWN))
    )
    timings.append(query("webhook inbox", store.delivery_counts))
    for name in store.DURATIONS:
        timings.append(query(f"histogram {name}", _histogram_of(name)))
    return timings


def _histogram_of(name: str) -> Callable[[Session], object]:
    return lambda session: store.duration_histogram(session, name, DURATION_BUCKETS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--database", default=DEFAULT_DATABASE_URL, help="admin URL of the PostgreSQL server")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    with fresh_pg_database(args.database, "wanbatch_bench_metrics_") as url:
        engine = db.make_engine(url)
        db.migrate(engine)
        started = time.perf_counter()
        fill(engine, args.jobs)
        filled = time.perf_counter() - started
        timings = measure(engine, args.runs)
        engine.dispose()
    scrape = timings[0]
    ok = scrape.median_ms <= TARGET_MS
    if args.json:
        print(
            json.dumps({"jobs": args.jobs, "fill_seconds": filled, "timings": [asdict(t) for t in timings]})
        )
        return 0 if ok else 1
    table = Table(
        title=f"/metrics on {args.jobs:,} jobs ({args.jobs * 6:,} events), PostgreSQL — {today()}, "
        f"{machine_summary()}; median of {args.runs}"
    )
    for column in ("what", "median ms", "min ms", "max ms", "target"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for timing in timings:
        target = ("PASS" if ok else "FAIL") + f" ≤ {TARGET_MS:.0f}" if timing is scrape else ""
        table.add_row(
            timing.what, f"{timing.median_ms:.1f}", f"{timing.min_ms:.1f}", f"{timing.max_ms:.1f}", target
        )
    print_table(table)
    print(f"(the data took {filled:.1f} s to write)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
