"""Benchmark (issue #14): the dashboard and ``status BATCH --json`` on a 100,000-job batch, and
the CLI's start-up time.

A fresh PostgreSQL database ``wanbatch_bench_<random>`` gets one 100,000-job batch (a generated
``items_from`` manifest stored by :func:`jobs.batches.submit_manifest`, as :mod:`bench.expand`
does), whose jobs are then spread over the states a batch halfway through its night is in
(succeeded with outputs, costs and seeds; failed with several reasons; cancelled; at fal;
waiting; a quarter of the jobs on a second endpoint), plus a handful of small batches so the
batch list has rows to aggregate. ``VACUUM ANALYZE`` then does what autovacuum would.
``wanbatch serve``'s app (:func:`web.app.create_app`) is served by uvicorn on a loopback port
in this process and every page is fetched over HTTP, as a browser would:

* ``batch list`` — ``GET /``;
* ``batch page`` — ``GET /batches/ID`` as opened, filtered by state and by endpoint, a page from
  the middle (a keyset cursor) and the last page;
* ``status (in-process)`` — :func:`jobs.batches.status`, what ``status BATCH --json`` computes;
* ``status --json (process)`` — ``wanbatch status BATCH --json`` as a subprocess: interpreter
  start-up and imports included;
* ``--help`` / ``--version`` — ``wanbatch --help`` and ``wanbatch --version`` as subprocesses.

Each figure is the median of ``--runs`` runs after one warm-up run (min and max are shown too).
Target: 200 ms for every page and for ``status``; the CLI's own start-up is shown against the
issue's "well under half a second".

Run from the repository root::

    python -m bench.dashboard                 # 100,000 jobs, PostgreSQL
    python -m bench.dashboard --jobs 20000 --runs 5 --json

Exit status is 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

from bench._common import ROOT, byte_compile, fresh_pg_database, machine_summary, print_table, today
from bench.expand import DEFAULT_DATABASE_URL, write_items, write_manifest

#: Everything a user waits on here should answer within this (milliseconds).
TARGET_MS = 200.0
#: The CLI's ``--help``/``--version``: the issue's "well under half a second".
STARTUP_TARGET_MS = 500.0
#: The index the job list's keyset pagination walks (``jobs.listing``; migration 0008).
ITEM_ORDER_INDEX = "ix_jobs_batch_id_item_order"

#: Spreads the big batch's jobs over the states of a batch halfway through its night, by item
#: number (per mille): 55 % succeeded, 3 % failed (three reasons), 2 % cancelled, 3 % running,
#: 3 % queued, 1 % downloading, 1 % waiting to retry, the rest pending. Terminal jobs finished
#: over the last hour, so throughput and ETA have something to say.
_SPREAD = """
UPDATE jobs SET
    state = CASE
        WHEN item_index % 1000 < 550 THEN 'succeeded'
        WHEN item_index % 1000 < 580 THEN 'failed'
        WHEN item_index % 1000 < 600 THEN 'cancelled'
        WHEN item_index % 1000 < 630 THEN 'running'
        WHEN item_index % 1000 < 660 THEN 'queued'
        WHEN item_index % 1000 < 670 THEN 'downloading'
        WHEN item_index % 1000 < 680 THEN 'retry_wait'
        ELSE 'pending' END,
    attempts = CASE WHEN item_index % 1000 < 670 THEN 1 + (item_index % 7 = 0)::int ELSE 0 END,
    request_id = CASE WHEN item_index % 1000 < 670 THEN 'req-' || id END,
    submitted_at = CASE WHEN item_index % 1000 < 670
        THEN now() - make_interval(secs => 120 + (item_index % 3600)) END,
    finished_at = CASE WHEN item_index % 1000 < 600
        THEN now() - make_interval(secs => (item_index % 3600)) END,
    seed = CASE WHEN item_index % 1000 < 550 THEN (1000000 + item_index)::text END,
    output_path = CASE WHEN item_index % 1000 < 550 THEN :folder || '/' || id || '.mp4' END,
    output_sha256 = CASE WHEN item_index % 1000 < 550 THEN md5(id) || md5(id) END,
    actual_usd = CASE WHEN item_index % 1000 < 550 THEN est_usd END,
    actual_billing_units = CASE WHEN item_index % 1000 < 550 THEN est_billing_units END,
    media = CASE WHEN item_index % 1000 < 550
        THEN '{"width": 848, "height": 480, "frames": 81, "fps": 16.0, "duration_s": 5.0625,
               "codec": "h264"}'::jsonb END,
    media_mismatch = CASE WHEN item_index % 1000 = 7 THEN 'frame size 424x240, asked 848x480' END,
    endpoint = CASE WHEN item_index % 4 = 3 THEN 'fal-ai/wan-25-preview/image-to-video' ELSE endpoint END,
    error_type = CASE
        WHEN item_index % 1000 BETWEEN 550 AND 569 THEN 'runner_disconnected'
        WHEN item_index % 1000 BETWEEN 570 AND 574 THEN 'request_timeout'
        WHEN item_index % 1000 BETWEEN 575 AND 579 THEN 'content_policy_violation'
        WHEN item_index % 1000 BETWEEN 580 AND 599 THEN 'budget' END,
    error = CASE
        WHEN item_index % 1000 BETWEEN 550 AND 569 THEN 'the model runner disconnected (runner_disconnected)'
        WHEN item_index % 1000 BETWEEN 570 AND 574 THEN 'the request timed out at fal (request_timeout)'
        WHEN item_index % 1000 BETWEEN 575 AND 579 THEN 'fal refused the input: content policy violation'
        WHEN item_index % 1000 BETWEEN 580 AND 599 THEN 'not sent: the batch budget is reached' END
WHERE batch_id = :batch
"""


# --------------------------------------------------------------------------- the data


def prepare(url: str, jobs: int, folder: Path) -> tuple[str, list[str]]:
    """Store the big batch (``jobs`` jobs, spread over the states) and five small ones.

    Returns the big batch's id and its endpoints (to filter by).
    """
    from sqlalchemy import text

    from jobs.batches import submit_manifest
    from jobs.db import make_engine
    from jobs.settings import Settings

    settings = Settings(database_url=url, output_dir=folder / "outputs")
    items = write_items(folder, jobs, "jsonl")
    started = time.perf_counter()
    big = submit_manifest(write_manifest(folder, items, "night-sweep"), settings)
    print(f"stored {big.added:,} jobs in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    for number in range(5):
        small = write_items(folder / f"small-{number}", 40, "jsonl", seed=number)
        submit_manifest(write_manifest(small.parent, small, f"small-{number}"), settings)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(_SPREAD), {"batch": big.batch_id, "folder": str(folder / "outputs")})
            conn.execute(text("ANALYZE jobs"))
            endpoints = [row[0] for row in conn.execute(text("SELECT DISTINCT endpoint FROM jobs"))]
    finally:
        engine.dispose()
    return big.batch_id, endpoints


def _analyze(url: str) -> None:
    """``VACUUM ANALYZE jobs``, as autovacuum would after the big update (outside a transaction)."""
    import psycopg
    from sqlalchemy import make_url

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE jobs")
        conn.execute("VACUUM ANALYZE batches")


def _has_index(url: str) -> bool:
    from sqlalchemy import inspect

    from jobs.db import make_engine

    engine = make_engine(url)
    try:
        return any(ix["name"] == ITEM_ORDER_INDEX for ix in inspect(engine).get_indexes("jobs"))
    finally:
        engine.dispose()


def _cursor_at(url: str, batch_id: str, item_index: int) -> str:
    """The job list's cursor (``item.variant.id``) of the first job of ``item_index``."""
    from sqlalchemy import text

    from jobs.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT item_index, variant, id FROM jobs WHERE batch_id = :b AND item_index = :i "
                    "ORDER BY variant, id LIMIT 1"
                ),
                {"b": batch_id, "i": item_index},
            ).one()
    finally:
        engine.dispose()
    return f"{row[0]}.{row[1]}.{row[2]}"


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True, slots=True)
class Timing:
    """One measured thing: its runs in milliseconds and the target it is held to."""

    what: str
    runs_ms: list[float]
    target_ms: float | None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.runs_ms)

    @property
    def passed(self) -> bool | None:
        return None if self.target_ms is None else self.median <= self.target_ms


def _measure(
    what: str, call: Callable[[], object], runs: int, target: float | None, note: str = ""
) -> Timing:
    call()  # warm-up: caches, prepared statements, imports
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    print(f"  {what}: median {statistics.median(times):.1f} ms", file=sys.stderr)
    return Timing(what, times, target, note)


@contextmanager
def _serving(url: str, folder: Path) -> Iterator[str]:
    """``wanbatch serve``'s app for ``url`` under uvicorn on a free loopback port (this process)."""
    import socket

    import uvicorn

    from jobs.settings import Settings
    from web.app import create_app

    settings = Settings(database_url=url, output_dir=folder / "outputs")
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the dashboard did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _command() -> list[str]:
    """How a user starts wanbatch: the installed console script, else this interpreter."""
    found = shutil.which("wanbatch")
    return [found] if found else [sys.executable, "-c", "from cli import main; main()"]


def measure(url: str, batch_id: str, endpoints: list[str], runs: int, folder: Path) -> list[Timing]:
    """Every figure of the table, in the order it is printed."""
    import os

    import httpx

    from jobs.batches import status
    from jobs.settings import Settings

    found: list[Timing] = []
    middle = _cursor_at(url, batch_id, 50_000 if _jobs_of(url, batch_id) > 50_000 else 1)
    pages = [
        ("batch list  GET /", "/", TARGET_MS),
        ("batch page  GET /batches/ID", f"/batches/{batch_id}", TARGET_MS),
        ("  state=failed", f"/batches/{batch_id}?state=failed", TARGET_MS),
        (
            "  endpoint + state=succeeded",
            f"/batches/{batch_id}?state=succeeded&endpoint={endpoints[-1]}",
            TARGET_MS,
        ),
        ("  a page from the middle (keyset)", f"/batches/{batch_id}?after={middle}", TARGET_MS),
        ("  the last page, 200 per page", f"/batches/{batch_id}?page=last&per=200", TARGET_MS),
        ("/metrics", "/metrics", None),
    ]
    with _serving(url, folder) as base, httpx.Client(base_url=base, timeout=60) as client:
        for what, path, target in pages:

            def fetch(path: str = path) -> None:
                answer = client.get(path, headers={"Accept": "text/html"})
                if answer.status_code != 200:
                    raise RuntimeError(f"GET {path} answered {answer.status_code}: {answer.text[:200]}")

            found.append(_measure(what, fetch, runs, target))
    settings = Settings(database_url=url, output_dir=folder / "outputs")
    found.append(
        _measure("status BATCH --json (in-process)", lambda: status(batch_id, settings), runs, TARGET_MS)
    )
    env = {**os.environ, "WANBATCH_DATABASE_URL": url}
    command = _command()

    def run(*args: str) -> Callable[[], None]:
        def call() -> None:
            subprocess.run([*command, *args], env=env, cwd=ROOT, capture_output=True, check=True, timeout=120)

        return call

    found.append(
        _measure(
            "wanbatch status BATCH --json",
            run("status", batch_id, "--json"),
            runs,
            None,
            "a new process: start-up + imports + the query",
        )
    )
    found.append(_measure("wanbatch --help", run("--help"), runs, STARTUP_TARGET_MS))
    found.append(_measure("wanbatch --version", run("--version"), runs, STARTUP_TARGET_MS))
    return found


def _jobs_of(url: str, batch_id: str) -> int:
    from sqlalchemy import text

    from jobs.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(text("SELECT count(*) FROM jobs WHERE batch_id = :b"), {"b": batch_id}).one()[0]
            )
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- the table


def table(title: str, timings: list[Timing]) -> Table:
    out = Table(title=title, title_justify="left")
    out.add_column("what")
    for header in ("median (ms)", "min (ms)", "max (ms)", "runs"):
        out.add_column(header, justify="right")
    out.add_column("target")
    out.add_column("note")
    for t in timings:
        verdict = ""
        if t.passed is not None:
            verdict = f"{'[green]PASS[/]' if t.passed else '[bold red]FAIL[/]'} (≤ {t.target_ms:g} ms)"
        out.add_row(
            t.what,
            f"{t.median:,.1f}",
            f"{min(t.runs_ms):,.1f}",
            f"{max(t.runs_ms):,.1f}",
            str(len(t.runs_ms)),
            verdict,
            t.note,
        )
    return out


@contextmanager
def _database(args: argparse.Namespace) -> Iterator[str]:
    if args.in_place:
        yield args.database_url
        return
    with fresh_pg_database(args.database_url, "wanbatch_bench_") as url:
        yield url


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    byte_compile()  # the CLI's start-up as installed (see bench._common.byte_compile)
    with tempfile.TemporaryDirectory(prefix="wanbatch-bench-dashboard-") as tmp, _database(args) as url:
        folder = Path(tmp)
        for number in range(5):
            (folder / f"small-{number}").mkdir()
        batch_id, endpoints = prepare(url, args.jobs, folder)
        _analyze(url)
        indexed = _has_index(url)
        print(f"{ITEM_ORDER_INDEX}: {'present' if indexed else 'missing'}", file=sys.stderr)
        timings = measure(url, batch_id, endpoints, args.runs, folder)
    passed = all(t.passed is not False for t in timings)
    if args.json:
        print(
            json.dumps(
                {
                    "date": today(),
                    "machine": machine_summary(),
                    "jobs": args.jobs,
                    "item_order_index": indexed,
                    "timings": [asdict(t) | {"median_ms": t.median, "passed": t.passed} for t in timings],
                    "passed": passed,
                }
            )
        )
        return 0 if passed else 1
    title = (
        f"dashboard and status on a {args.jobs:,}-job batch, PostgreSQL "
        f"(index {ITEM_ORDER_INDEX}: {'yes' if indexed else 'no'})   ({today()}, {machine_summary()})"
    )
    print_table(table(title, timings))
    return 0 if passed else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs in the big batch (default 100000)")
    parser.add_argument("--runs", type=int, default=7, help="measured runs per figure, after a warm-up")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="PostgreSQL server to use")
    parser.add_argument("--in-place", action="store_true", help="use --database-url's database itself")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
