"""Benchmark: ``wanbatch status`` with no batch (every batch) on a database of 2,000 batches.

A database a user has had for months: ``--batches`` (2,000) batches of ``--per-batch`` (200)
jobs each, 400,000 jobs in all, most of them finished long ago (95 % succeeded with costs, 3 %
failed, 2 % cancelled by the budget) and ``--active`` (500) still going: half succeeded, three
requests at fal and one download each, the rest pending — so the account's outstanding cap is
full and ``status`` names, for every active batch, the batches whose requests fill it.

One batch is stored by :func:`jobs.batches.submit_manifest` (a generated ``items_from``
manifest, as :mod:`bench.expand` writes it); the others are copies of it made in SQL, their jobs
then spread over the states above, and ``VACUUM ANALYZE`` does what autovacuum would. Timed,
each the median of ``--runs`` runs after a warm-up (min and max too):

* ``status (every batch)`` — :func:`jobs.batches.status` with no batch: what
  ``wanbatch status`` and ``status --json`` compute;
* each of its grouped reads on its own (``totals``: the counts and money per batch and state;
  ``failures``; ``cap holders``: the cap's holders named for every active batch …).

Run from the repository root::

    python -m bench.status_all
    python -m bench.status_all --batches 500 --per-batch 100 --active 100 --runs 3

``--database-url`` names the PostgreSQL server; a database ``wanbatch_bench_<random>`` is made
there for the run and dropped afterwards (``--in-place``: that database itself, which must be
empty; with ``--reuse``, one an earlier ``--in-place`` run filled, timed again as it is).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.table import Table

from bench._common import fresh_pg_database, machine_summary, print_table, today
from bench.expand import DEFAULT_DATABASE_URL, write_items, write_manifest

#: The key and fal queue the bench's requests were sent with, and its ``status`` counts by.
API_KEY_ID = "bench-key"
ORIGIN = "https://queue.fal.run"

#: Copies of the template batch: ids, names, and creation times an hour apart (oldest first),
#: the first ``:finished`` of them finished, the rest active.
_COPY_BATCHES = """
INSERT INTO batches (id, name, manifest_path, manifest_host, manifest_sha256, created_at,
                     parent_batch_id, budget_max_usd, state, pause_reason, schedule, priority,
                     paused_by_user, reuse_outputs, simulated, manifest_text, rerun_options)
SELECT substr(md5('batch-' || g), 1, 32), 'sweep-' || lpad(g::text, 5, '0'), b.manifest_path,
       b.manifest_host, b.manifest_sha256, now() - make_interval(hours => :batches - g),
       NULL, b.budget_max_usd, b.state, NULL, b.schedule, b.priority, false, b.reuse_outputs,
       false, b.manifest_text, NULL
FROM batches b, generate_series(1, :batches - 1) AS g
WHERE b.id = :template
"""

#: Every job of each copy: the template's columns, a new id and the copy's batch.
_COPY_JOBS = """
INSERT INTO jobs ({columns})
SELECT {values}
FROM jobs j, generate_series(1, :batches - 1) AS g
WHERE j.batch_id = :template
"""

#: The states: batches numbered below ``:finished`` (by name) are done; the others are active,
#: with three requests at fal (two running, one queued), one download and half still pending.
_SPREAD = """
UPDATE jobs AS j SET
    state = CASE
        WHEN b.n < :finished THEN CASE
            WHEN j.item_index % 100 < 95 THEN 'succeeded'
            WHEN j.item_index % 100 < 98 THEN 'failed'
            ELSE 'cancelled' END
        ELSE CASE
            WHEN j.item_index < :half THEN 'succeeded'
            WHEN j.item_index < :half + 2 THEN 'running'
            WHEN j.item_index < :half + 3 THEN 'queued'
            WHEN j.item_index < :half + 4 THEN 'downloading'
            ELSE 'pending' END
        END,
    attempts = CASE WHEN b.n < :finished OR j.item_index < :half + 4 THEN 1 ELSE 0 END,
    request_id = CASE WHEN b.n < :finished OR j.item_index < :half + 4 THEN 'req-' || j.id END,
    api_key_id = CASE WHEN b.n < :finished OR j.item_index < :half + 4 THEN :key END,
    fal_origin = CASE WHEN b.n < :finished OR j.item_index < :half + 4 THEN :origin END,
    submitted_at = CASE WHEN b.n < :finished OR j.item_index < :half + 4
        THEN b.created_at + make_interval(secs => j.item_index * 5) END,
    finished_at = CASE WHEN (b.n < :finished AND j.item_index % 100 < 98) OR j.item_index < :half
        THEN b.created_at + make_interval(secs => j.item_index * 5 + 90)
        WHEN b.n < :finished THEN b.created_at + make_interval(secs => 30) END,
    actual_usd = CASE WHEN (b.n < :finished AND j.item_index % 100 < 95) OR j.item_index < :half
        THEN j.est_usd END,
    seed = CASE WHEN (b.n < :finished AND j.item_index % 100 < 95) OR j.item_index < :half
        THEN (1000000 + j.item_index)::text END,
    output_path = CASE WHEN (b.n < :finished AND j.item_index % 100 < 95) OR j.item_index < :half
        THEN '/outputs/' || j.id || '.mp4' END,
    error_type = CASE WHEN b.n >= :finished THEN NULL
        WHEN j.item_index % 100 BETWEEN 95 AND 97 THEN 'runner_disconnected'
        WHEN j.item_index % 100 >= 98 THEN 'budget' END,
    error = CASE WHEN b.n >= :finished THEN NULL
        WHEN j.item_index % 100 BETWEEN 95 AND 97 THEN 'the model runner disconnected (runner_disconnected)'
        WHEN j.item_index % 100 >= 98 THEN 'not sent: the batch budget is reached' END
FROM (SELECT id, created_at, row_number() OVER (ORDER BY created_at, id) - 1 AS n FROM batches) AS b
WHERE j.batch_id = b.id
"""


def prepare(url: str, *, batches: int, per_batch: int, active: int, folder: Path) -> None:
    """Fill the empty database at ``url``: ``batches`` batches of ``per_batch`` jobs, the last
    ``active`` of them (by creation) active, the others finished."""
    from sqlalchemy import text

    from jobs.batches import submit_manifest
    from jobs.db import make_engine
    from jobs.settings import Settings

    started = time.perf_counter()
    settings = Settings(database_url=url, output_dir=folder / "outputs")
    items = write_items(folder, per_batch, "jsonl")
    template = submit_manifest(write_manifest(folder, items, f"sweep-{batches:05d}"), settings)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            columns = [
                str(row[0])
                for row in conn.execute(
                    text(
                        "SELECT column_name FROM information_schema.columns "
                        "WHERE table_name = 'jobs' AND table_schema = current_schema() "
                        "ORDER BY ordinal_position"
                    )
                )
            ]
            made = {
                "id": "substr(md5(j.id || '-' || g), 1, 32)",
                "batch_id": "substr(md5('batch-' || g), 1, 32)",
            }
            values = ", ".join(made.get(c, f"j.{c}") for c in columns)
            params = {"batches": batches, "template": template.batch_id}
            conn.execute(text(_COPY_BATCHES), params)
            conn.execute(text(_COPY_JOBS.format(columns=", ".join(columns), values=values)), params)
            # The template is the newest batch: it is active with the other copies made last.
            conn.execute(
                text(_SPREAD),
                {
                    "finished": batches - active,
                    "half": per_batch // 2,
                    "key": API_KEY_ID,
                    "origin": ORIGIN,
                },
            )
    finally:
        engine.dispose()
    _analyze(url)
    took = time.perf_counter() - started
    print(f"stored {batches:,} batches, {batches * per_batch:,} jobs in {took:.1f} s", file=sys.stderr)


def _analyze(url: str) -> None:
    """``VACUUM ANALYZE``, as autovacuum would after the big update (outside a transaction)."""
    import psycopg
    from sqlalchemy import make_url

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE jobs")
        conn.execute("VACUUM ANALYZE batches")


# --------------------------------------------------------------------------- measuring


def _caps(distributed: bool) -> Any:
    """The caps ``status`` counts by: the defaults' (10 at fal, 10 downloads) with this key and queue."""
    from jobs.cap_holds import CapCheck
    from jobs.settings import Settings

    defaults = Settings()
    return CapCheck(
        api_key_id=API_KEY_ID,
        max_outstanding=defaults.max_outstanding,
        download_backlog=defaults.download_backlog,
        per_endpoint={},
        distributed=distributed,
        origin=ORIGIN,
    )


def _timed(runs: int, call: Callable[[], object]) -> list[float]:
    """``call`` once to warm up, then ``runs`` times: each run's milliseconds."""
    call()
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        took.append((time.perf_counter() - started) * 1000)
    return took


def measure(url: str, runs: int) -> list[tuple[str, list[float]]]:
    """Each figure's runs (ms): ``status`` of every batch, then its heaviest reads on their own."""
    from jobs import batches, db, listing, store
    from jobs.cap_holds import HeldByScope, _cap_holds, cap_note
    from jobs.models import utcnow
    from jobs.settings import DatabaseSettings

    settings = DatabaseSettings(database_url=url)
    engine = db.open_engine(settings)
    with db.read_scope(engine) as session:
        every = store.list_batches(session)
        ids = [b.id for b in every]
        counts = store.cap_counts(session, API_KEY_ID, ORIGIN)
    embedded, workers = _caps(False), _caps(True)

    def read(what: Callable[[Any], object]) -> Callable[[], object]:
        def call() -> object:
            with db.read_scope(engine) as session:
                return what(session)

        return call

    def notes() -> None:
        """The cap notes of every batch with jobs in flight, from counts read once (no query)."""
        by_scope = HeldByScope(counts)
        for batch_id in sorted({c.batch_id for c in counts}):
            scope = store.CapScope.of(
                api_key_id=API_KEY_ID, batch_ids={batch_id}, simulated=False, origin=ORIGIN
            )
            cap_note(_cap_holds(by_scope.held(scope), batch_id, embedded, waiting=set), batch_id)

    return [
        (
            "status, every batch (a run's caps)",
            _timed(runs, lambda: batches.status(None, settings, embedded)),
        ),
        (
            "status, every batch (the workers' caps)",
            _timed(runs, lambda: batches.status(None, settings, workers)),
        ),
        (
            "totals of every batch",
            _timed(runs, read(lambda s: listing.totals_of_batches(s, ids, now=utcnow()))),
        ),
        ("failures of every batch", _timed(runs, read(lambda s: store.failure_reasons_of_batches(s, ids)))),
        ("cap holders of the active batches", _timed(runs, notes)),
    ]


def table(figures: list[tuple[str, list[float]]], *, batches: int, jobs: int, active: int) -> Table:
    out = Table(title=f"status of {batches:,} batches, {jobs:,} jobs ({active:,} active) — {today()}")
    out.add_column("what")
    for name in ("median ms", "min ms", "max ms"):
        out.add_column(name, justify="right")
    for what, runs in figures:
        out.add_row(what, f"{statistics.median(runs):,.0f}", f"{min(runs):,.0f}", f"{max(runs):,.0f}")
    out.caption = machine_summary()
    return out


@contextmanager
def _database(args: argparse.Namespace) -> Iterator[str]:
    if args.in_place:
        yield args.database_url
    else:
        with fresh_pg_database(args.database_url, "wanbatch_bench_") as url:
            yield url


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with _database(args) as url, tempfile.TemporaryDirectory() as folder:
        if not args.reuse:
            prepare(
                url, batches=args.batches, per_batch=args.per_batch, active=args.active, folder=Path(folder)
            )
        figures = measure(url, args.runs)
    print_table(table(figures, batches=args.batches, jobs=args.batches * args.per_batch, active=args.active))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--per-batch", type=int, default=200)
    parser.add_argument("--active", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument(
        "--in-place", action="store_true", help="use --database-url's (empty) database itself"
    )
    parser.add_argument("--reuse", action="store_true", help="with --in-place: time a database filled before")
    args = parser.parse_args(argv)
    if args.reuse and not args.in_place:
        parser.error("--reuse needs --in-place")
    if not 0 <= args.active <= args.batches or args.per_batch < 8:
        parser.error("--active must be within --batches, and --per-batch at least 8")
    return args


if __name__ == "__main__":
    sys.exit(main())
