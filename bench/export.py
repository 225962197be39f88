"""Benchmark (issue #13): ``wanbatch export`` throughput for a 100,000-job batch, per format.

The batch is built the way :mod:`bench.expand` builds its own (a generated ``items_from``
manifest through :func:`jobs.batches.submit_manifest`), then every job is marked succeeded with
plausible provider figures (request id, a 64-bit seed, prompt, output path, SHA-256, cost) by
one UPDATE, so the records are as wide as a real batch's. Each format then runs the project's
own code path in a fresh interpreter, so its peak RSS is its own:

* ``jsonl``   — :func:`jobs.export.records` into :func:`jobs.export.write_file`;
* ``parquet`` — the same records into :func:`jobs.dataset_export.write_parquet_file`;
* ``hf``      — (``--hf``) :func:`jobs.dataset_export.write_hf`: metadata, card and a hard link
  per video (every job's "video" is a hard link to one small file, so the disk is not measured).

By default a fresh PostgreSQL database ``wanbatch_bench_<random>`` is created on
``--database-url``'s server and dropped afterwards; ``--sqlite`` uses a temporary SQLite file.

Run from the repository root::

    python -m bench.export                  # 100,000 jobs, jsonl and parquet, PostgreSQL
    python -m bench.export --sqlite --jobs 20000 --hf

Memory is the point: exports stream, so peak RSS must not grow with the batch (target below).
Exit status is 0 when every target is met, 1 otherwise (2 for a broken run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench._common import (
    Figures,
    PhaseResult,
    Target,
    emit,
    machine_summary,
    measure_phase,
    phase_table,
    print_table,
    run_isolated,
    today,
)
from bench.expand import DEFAULT_DATABASE_URL, bench_database, write_items, write_manifest

MEMORY_TARGET = Target("peak RSS", 300.0, "MB")
FORMATS = ("jsonl", "parquet")

#: Marks every job succeeded with provider-like figures; portable between PostgreSQL and SQLite.
_SUCCEED = """
UPDATE jobs SET state = 'succeeded', attempts = 1, request_id = id, seed = '18446744073709551557',
    actual_prompt = 'An expanded prompt the provider actually used, about as long as a real one.',
    output_path = :folder || '/' || id || '.mp4', output_sha256 = :sha, output_bytes = 1048576,
    actual_usd = est_usd, actual_billing_units = est_billing_units,
    submitted_at = created_at, finished_at = created_at
WHERE batch_id = :batch
"""


# --------------------------------------------------------------------------- children


def _phase_prepare(args: argparse.Namespace) -> PhaseResult:
    """Submit the manifest and mark every job succeeded (with ``--hf``: a video link per job)."""

    def setup() -> None:
        return None

    def body(_: None) -> Figures:
        import os

        from sqlalchemy import text

        from jobs.batches import submit_manifest
        from jobs.db import open_engine
        from jobs.settings import Settings

        settings = Settings(database_url=args.url, output_dir=Path(args.videos))
        result = submit_manifest(Path(args.manifest), settings)
        engine = open_engine(settings)
        with engine.begin() as conn:
            conn.execute(text(_SUCCEED), {"folder": args.videos, "batch": result.batch_id, "sha": "0" * 64})
            ids = [
                row[0]
                for row in conn.execute(
                    text("SELECT id FROM jobs WHERE batch_id = :b"), {"b": result.batch_id}
                )
            ]
        if args.hf:
            one = Path(args.videos) / "one.mp4"
            one.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 1024)
            for job_id in ids:
                os.link(one, Path(args.videos) / f"{job_id}.mp4")
        return {"jobs": len(ids), "batch_id": result.batch_id}

    return measure_phase("prepare", setup, body)


def _phase_export(args: argparse.Namespace) -> PhaseResult:
    """One export of the batch in ``args.phase``'s format to a file (or folder) under ``args.out``."""
    from jobs import dataset_export, db, export
    from jobs.settings import Settings

    def setup() -> Settings:
        settings = Settings(database_url=args.url, output_dir=Path(args.videos))
        db.open_engine(settings)
        return settings

    def body(settings: Settings) -> Figures:
        target = Path(args.out) / f"export.{args.phase}"
        with db.session_scope(db.open_engine(settings)) as session:
            if args.phase == "hf":
                summary = dataset_export.write_hf(session, args.batch, settings.output_dir, target)
                return {"rows": summary.rows, "videos": summary.videos}
            rows = export.records(session, args.batch, settings.output_dir)
            if args.phase == "parquet":
                count = dataset_export.write_parquet_file(rows, target)
            else:
                count = export.write_file(rows, args.phase, target)
        return {"rows": count, "bytes": target.stat().st_size}

    return measure_phase(args.phase, setup, body)


# --------------------------------------------------------------------------- parent


def _child(phase: str, args: argparse.Namespace, **extra: str) -> PhaseResult:
    argv = [sys.executable, "-m", "bench.export", "--phase", phase, "--url", args.url]
    argv += ["--videos", args.videos, "--out", args.out]
    for key, value in extra.items():
        argv += [f"--{key}", value]
    argv += ["--hf"] if args.hf else []
    print(f"{phase} …", file=sys.stderr, flush=True)
    return run_isolated(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase == "prepare":
        emit(_phase_prepare(args))
        return 0
    if args.phase:
        emit(_phase_export(args))
        return 0

    formats = FORMATS + (("hf",) if args.hf else ())
    backend = "SQLite (temp file)" if args.sqlite else "PostgreSQL"
    with tempfile.TemporaryDirectory(prefix="wanbatch-bench-export-") as tmp:
        folder = Path(tmp)
        (folder / "videos").mkdir()
        (folder / "out").mkdir()
        items = write_items(folder, args.jobs, "jsonl")
        manifest = write_manifest(folder, items, "bench-export")
        with bench_database(args, folder) as url:
            args.url, args.videos, args.out = url, str(folder / "videos"), str(folder / "out")
            prepared = _child("prepare", args, manifest=str(manifest))
            batch = str(prepared.data["batch_id"])
            results = [_child(fmt_name, args, batch=batch) for fmt_name in formats]

    problems = [f"{r.name} exported {r.data['rows']:,} rows" for r in results if r.data["rows"] != args.jobs]
    passed = not problems and all(MEMORY_TARGET.check(r.peak_rss_mb) for r in results)
    if args.json:
        print(
            json.dumps(
                {
                    "date": today(),
                    "machine": machine_summary(),
                    "backend": backend,
                    "jobs": args.jobs,
                    "phases": [asdict(r) for r in results],
                    "problems": problems,
                    "passed": passed,
                }
            )
        )
        return 0 if passed else 1
    title = f"export: a {args.jobs:,}-job batch from {backend}   ({today()}, {machine_summary()})"
    print_table(
        phase_table(
            title,
            results,
            counts=(("rows", "records"), ("bytes", "bytes")),
            rate_key="rows",
            memory_target=MEMORY_TARGET,
            targeted=formats,
        )
    )
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("ALL TARGETS MET" if passed else "TARGETS MISSED")
    return 0 if passed else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.export", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs in the batch")
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="PostgreSQL server (a temporary database is created there and dropped)",
    )
    parser.add_argument("--in-place", action="store_true", help="use --database-url's database itself")
    parser.add_argument("--sqlite", action="store_true", help="use a temporary SQLite file instead")
    parser.add_argument("--hf", action="store_true", help="also the hf folder export (a link per job)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    # Internal: how the parent runs one phase in a fresh interpreter.
    parser.add_argument("--phase", choices=("prepare", "hf", *FORMATS), help=argparse.SUPPRESS)
    for name in ("url", "videos", "out", "manifest", "batch"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        sys.exit(2)
