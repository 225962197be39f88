"""Benchmark (issue #11): the budget checks of a dispatch round on a 100,000-job batch.

With a budget cap, every dispatch round that claims one of a batch's jobs asks what the batch
has committed; with ``WANBATCH_DAILY_BUDGET_USD``, what every batch committed today. Both used
to be sums over the jobs (``store.batch_money`` over the batch; ``store.committed_usd_since``
over every job ever stored, with no index to narrow it), once per round, so per completion. They
now add the finished jobs' running totals (``batch_totals``, by batch and day, kept as jobs
finish) to sums over the few unfinished jobs (``store.batch_committed_usd``,
``store.committed_usd_today``). Each pair is timed on the same data, and must agree.

The batch is halfway through, all sent today: 60 % succeeded (with costs), 2 % failed, 8 jobs
at fal, the rest pending. Its jobs are stored by :func:`jobs.store.add_jobs` and moved with
set-based SQL (as a night of transitions would leave them); the running totals are then
computed as migration 0009 fills them. Each figure is the median of ``--runs`` calls after a
warm-up.

Run from the repository root::

    python -m bench.budget                    # 100,000 jobs, SQLite and PostgreSQL
    python -m bench.budget --jobs 20000 --runs 21
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

from rich.table import Table

from bench._common import fresh_pg_database, machine_summary, print_table, today
from bench.expand import DEFAULT_DATABASE_URL
from jobs import db, store
from jobs.models import Job, utcnow

#: The running totals as migration 0009 fills them (every job here was sent today).
FILL_TOTALS = """
INSERT INTO batch_totals (batch_id, day, finished_usd)
SELECT batch_id, :day, SUM(CASE WHEN state = 'succeeded' THEN COALESCE(actual_usd, est_usd)
                                ELSE COALESCE(actual_usd, 0) END)
FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') GROUP BY batch_id
"""


def prepare(url: str, jobs: int) -> str:
    """A migrated database at ``url`` holding one half-done ``jobs``-job batch; its id."""
    from sqlalchemy import text, update

    engine = db.make_engine(url)
    db.migrate(engine)
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session,
            name="budget",
            manifest_path="budget.yaml",
            manifest_sha256="0" * 64,
            budget_max_usd=Decimal(10**6),
        )
        store.add_jobs(
            session,
            batch.id,
            (
                store.NewJob(
                    key=f"{i:064x}",
                    item_index=i,
                    endpoint="fal-ai/wan-22",
                    input={"prompt": f"clip {i}"},
                    est_billing_units=Decimal(5),
                    est_usd=Decimal("0.4"),
                )
                for i in range(jobs)
            ),
        )
        batch_id = batch.id
    with engine.begin() as conn:
        moves = [
            ("succeeded", "actual_usd = est_usd", 0, int(jobs * 0.6)),
            ("failed", "actual_usd = NULL", int(jobs * 0.6), int(jobs * 0.62)),
            ("running", "actual_usd = NULL", int(jobs * 0.62), int(jobs * 0.62) + 8),
        ]
        sent = store.utc_day(utcnow())
        for state, money, first, end in moves:
            conn.execute(
                text(f"UPDATE jobs SET state = :state, {money} WHERE item_index BETWEEN :first AND :last"),
                {"state": state, "first": first, "last": end - 1},
            )
        conn.execute(update(Job).where(Job.state != "pending").values(submitted_at=utcnow()))
        conn.execute(text(FILL_TOTALS), {"day": sent})
    with engine.connect() as conn:
        analyze = "VACUUM ANALYZE jobs" if engine.dialect.name == "postgresql" else "ANALYZE"
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(analyze))
    engine.dispose()
    return batch_id


def _median_ms(call: Callable[[], object], runs: int) -> float:
    call()  # warm-up: statements prepared, pages cached
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(url: str, batch_id: str, runs: int) -> list[tuple[str, float, float]]:
    """(check, full sum ms, running total ms) for the batch's and the day's checks, after
    making sure each pair gives the same money."""
    engine = db.make_engine(url)
    now = utcnow()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    pairs: list[tuple[str, Callable[[Any], Decimal], Callable[[Any], Decimal]]] = [
        (
            "batch cap",
            lambda session: store.batch_money(session, batch_id).committed_usd,
            lambda session: store.batch_committed_usd(session, batch_id),
        ),
        (
            "daily cap",
            lambda session: store.committed_usd_since(session, midnight),
            lambda session: store.committed_usd_today(session, now),
        ),
    ]
    figures = []
    try:
        with db.read_scope(engine) as session:
            for name, full, fast in pairs:
                if full(session) != fast(session):
                    raise SystemExit(f"{name}: the two sums differ: {full(session)} vs {fast(session)}")
                before = _median_ms(partial(full, session), runs)
                figures.append((name, before, _median_ms(partial(fast, session), runs)))
    finally:
        engine.dispose()
    return figures


@contextmanager
def _databases(pg_admin_url: str, folder: Path) -> Iterator[list[tuple[str, str]]]:
    with fresh_pg_database(pg_admin_url, "wanbatch_bench_") as pg_url:
        yield [("SQLite", f"sqlite:///{folder / 'budget.db'}"), ("PostgreSQL", pg_url)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs in the batch (default 100000)")
    parser.add_argument("--runs", type=int, default=11, help="measured calls per figure, after a warm-up")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="PostgreSQL server to use")
    args = parser.parse_args(argv)
    table = Table(
        title=f"budget checks per dispatch round, a {args.jobs:,}-job batch ({today()}, {machine_summary()})"
    )
    for column in ("database", "check", "sum over the jobs (before)", "running totals (now)", "faster"):
        table.add_column(column, justify="right" if column not in ("database", "check") else "left")
    with (
        tempfile.TemporaryDirectory(prefix="wanbatch-bench-budget-") as tmp,
        _databases(args.database_url, Path(tmp)) as databases,
    ):
        for name, url in databases:
            batch_id = prepare(url, args.jobs)
            for check, full, fast in measure(url, batch_id, args.runs):
                table.add_row(name, check, f"{full:.2f} ms", f"{fast:.3f} ms", f"{full / fast:.0f}×")
    print_table(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
