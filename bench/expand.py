"""Benchmark (issue #2): validate, expand and store a 100,000-item ``items_from`` manifest.

Target: ``wanbatch submit`` of a 100,000-job manifest in at most 20 s with a peak RSS of at
most 300 MB. The benchmark generates a text-to-video manifest (``fal-ai/wan-22``, so no image
files are involved and the figures measure wanbatch, not the disk), then runs the project's own
code path, each phase in a fresh interpreter so its peak memory is its own:

* ``validate``  — :func:`jobs.manifest.validate_manifest` (what ``wanbatch validate`` does);
* ``expand``    — expansion and pricing alone, no database (a diagnostic: where submit's time goes);
* ``submit``    — :func:`jobs.batches.submit_manifest`: validate, expand, price and insert;
* ``resubmit``  — the same call again, which must add 0 rows (idempotency) — and how long that takes.

By default a fresh PostgreSQL database ``wanbatch_bench_<random>`` is created on
``--database-url``'s server and dropped afterwards; ``--sqlite`` uses a temporary SQLite file.

Run from the repository root::

    python -m bench.expand                      # 100,000 JSONL items into PostgreSQL
    python -m bench.expand --format csv --sqlite --items 20000
    python -m bench.expand --tracemalloc --profile   # extra passes: Python-heap peaks, cProfile

Exit status is 0 when every target is met, 1 otherwise (2 for a broken run).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import csv
import io
import json
import pstats
import random
import secrets
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bench._common import (
    Figures,
    PhaseResult,
    Target,
    emit,
    fmt,
    fresh_pg_database,
    machine_summary,
    measure_phase,
    phase_table,
    print_table,
    run_isolated,
    timed,
    today,
)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
ENDPOINT = "fal-ai/wan-22"
TIME_TARGET = Target("time", 20.0, "s")
MEMORY_TARGET = Target("peak RSS", 300.0, "MB")
#: Phases a user runs as a command: they are held to the targets. ``expand`` is a diagnostic.
TARGETED = ("validate", "submit", "resubmit")
PHASES = ("validate", "expand", "submit", "resubmit")

_SUBJECTS = (
    "A red fox",
    "An old fisherman",
    "A paper boat",
    "A neon-lit tram",
    "Two hummingbirds",
    "A lighthouse keeper",
    "A glass jellyfish",
    "A marching band",
    "A lone astronaut",
    "A field of sunflowers",
)
_ACTIONS = (
    "drifts slowly",
    "turns toward the camera",
    "races through the frame",
    "dissolves into sparks",
    "dances in the rain",
    "waits patiently",
    "rises above the clouds",
)
_SETTINGS = (
    "in a misty pine forest at dawn",
    "on a rainy Tokyo street at night, reflections on wet asphalt",
    "across a frozen lake under the aurora",
    "inside an abandoned greenhouse, dust in the light beams",
    "along a crowded harbour at golden hour",
    "through a desert canyon, heat haze, long shadows",
)
_STYLES = ("cinematic, 35mm film", "slow motion, shallow depth of field", "handheld documentary", "")


# --------------------------------------------------------------------------- the input


def _item(rng: random.Random, index: int) -> dict[str, str | int]:
    """One realistic wan-22 item (~130 characters of prompt plus a few settings); all distinct."""
    style = rng.choice(_STYLES)
    prompt = f"{rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_SETTINGS)}"
    return {
        "prompt": f"{prompt}, {style}, take {index}" if style else f"{prompt}, take {index}",
        "seed": rng.randrange(2**31),
        "resolution": rng.choice(("480p", "580p", "720p")),
        "num_frames": rng.choice((81, 97, 121)),
        "aspect_ratio": rng.choice(("16:9", "9:16", "1:1")),
    }


def write_items(folder: Path, count: int, fmt_name: str, *, seed: int = 2) -> Path:
    """The ``items_from`` file: ``count`` items as JSONL or CSV (same content either way)."""
    rng = random.Random(seed)
    path = folder / f"items.{fmt_name}"
    with path.open("w", encoding="utf-8", newline="") as fh:
        if fmt_name == "csv":
            writer: csv.DictWriter[str] | None = None
            for i in range(count):
                row = _item(rng, i)
                if writer is None:
                    writer = csv.DictWriter(fh, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
        else:
            for i in range(count):
                fh.write(json.dumps(_item(rng, i), ensure_ascii=False) + "\n")
    return path


def write_manifest(folder: Path, items: Path, name: str) -> Path:
    """A manifest that only points at ``items`` (a fresh batch ``name`` per pass)."""
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        f"endpoint: {ENDPOINT}\n"
        "defaults:\n"
        "  frames_per_second: 16\n"
        "  enable_safety_checker: true\n"
        f"items_from: {items.name}\n",
        encoding="utf-8",
    )
    return path


# --------------------------------------------------------------------------- the database


@contextlib.contextmanager
def bench_database(args: argparse.Namespace, folder: Path) -> Iterator[str]:
    """A SQLAlchemy URL for one pass: a fresh database that is dropped afterwards.

    PostgreSQL: ``wanbatch_bench_<random>`` on the server of ``--database-url`` (whose own
    database is only used to run CREATE/DROP DATABASE), unless ``--in-place``, which uses that
    database as it is (each pass has its own batch name, so figures stay first-submit figures).
    """
    if args.sqlite:
        path = folder / f"bench-{secrets.token_hex(4)}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    if args.in_place:
        yield args.database_url
        return
    with fresh_pg_database(args.database_url, "wanbatch_bench_") as url:
        yield url


def count_rows(url: str, batch_id: str) -> int:
    """Jobs actually stored for the batch, read back independently of ``submit``'s own figures."""
    from sqlalchemy import text

    from jobs.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM jobs WHERE batch_id = :b"), {"b": batch_id}
                ).scalar_one()
            )
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- child phases


# Each phase imports wanbatch in its ``setup`` (timed apart from the body), so the modules are
# imported here for their types only.
if TYPE_CHECKING:
    from jobs.batches import SubmitResult
    from jobs.manifest import Manifest, ValidationReport
    from jobs.pricing import Estimate
    from jobs.settings import Settings
    from jobs.store import NewJob

State = TypeVar("State")


@dataclass(frozen=True)
class ChildArgs:
    """What a child phase needs: the manifest, the database URL and the measuring options."""

    manifest: Path
    url: str
    trace: bool
    profile: bool

    def measure(
        self, phase: str, setup: Callable[[], State], body: Callable[[State], Figures]
    ) -> PhaseResult:
        return measure_phase(phase, setup, _profiled(body) if self.profile else body, trace=self.trace)


def _phase_validate(phase: str, child: ChildArgs) -> PhaseResult:
    def setup() -> Callable[[Path], ValidationReport]:
        from jobs.manifest import validate_manifest

        return validate_manifest

    def body(validate: Callable[[Path], ValidationReport]) -> Figures:
        report = validate(child.manifest)
        if not report.ok:
            raise SystemExit(f"generated manifest is invalid: {report.errors[:3]}")
        return {"jobs": report.job_count, "warnings": len(report.warnings)}

    return child.measure(phase, setup, body)


@dataclass(frozen=True)
class _Expansion:
    """The expand phase's tools, imported by its setup."""

    load_manifest: Callable[[Path], Manifest]
    estimate_job: Callable[[str, Mapping[str, Any], Settings], Estimate]
    new_job: type[NewJob]
    settings: Settings


def _phase_expand(phase: str, child: ChildArgs) -> PhaseResult:
    """What submit does between validating and inserting: expand, price, build ``NewJob``s."""

    def setup() -> _Expansion:
        from jobs.manifest import load_manifest
        from jobs.pricing import estimate_job
        from jobs.settings import Settings
        from jobs.store import NewJob

        return _Expansion(
            load_manifest, estimate_job, NewJob, Settings(database_url="sqlite:///unused-by-this-phase.db")
        )

    def body(tools: _Expansion) -> Figures:
        rows = 0
        for spec in tools.load_manifest(child.manifest).jobs():
            est = tools.estimate_job(spec.endpoint, spec.input, tools.settings)
            tools.new_job(spec.key, spec.item_index, spec.endpoint, spec.input, est.billing_units, est.usd)
            rows += 1
        return {"jobs": rows}

    return child.measure(phase, setup, body)


def _phase_submit(phase: str, child: ChildArgs) -> PhaseResult:
    """``submit_manifest``; setup opens (and, on a fresh database, migrates) the engine first."""

    def setup() -> tuple[Callable[[Path, Settings], SubmitResult], Settings]:
        from jobs.batches import submit_manifest
        from jobs.db import open_engine
        from jobs.settings import Settings

        settings = Settings(database_url=child.url)
        open_engine(settings)  # migrations are a one-off per database: kept out of the figure
        return submit_manifest, settings

    def body(state: tuple[Callable[[Path, Settings], SubmitResult], Settings]) -> Figures:
        submit, settings = state
        result = submit(child.manifest, settings)
        return {
            "jobs": result.added + result.existing,
            "rows": result.added,
            "existing": result.existing,
            "total": result.total,
            "batch_id": result.batch_id,
        }

    return child.measure(phase, setup, body)


_CHILDREN: dict[str, Callable[[str, ChildArgs], PhaseResult]] = {
    "validate": _phase_validate,
    "expand": _phase_expand,
    "submit": _phase_submit,
    "resubmit": _phase_submit,
}


def _profiled(body: Callable[[State], Figures], top: int = 30) -> Callable[[State], Figures]:
    """``body`` under cProfile; the hottest functions go to stderr (times are then inflated)."""

    def wrapped(state: State) -> Figures:
        profiler = cProfile.Profile()
        result = profiler.runcall(body, state)
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).strip_dirs()
        stats.sort_stats("cumulative").print_stats(top)
        stats.sort_stats("tottime").print_stats(top)
        print(out.getvalue(), file=sys.stderr)
        return result

    return wrapped


def run_child(args: argparse.Namespace) -> None:
    child = ChildArgs(Path(args.manifest), args.url, trace=args.trace, profile=args.profile)
    emit(_CHILDREN[args.phase](args.phase, child))


# --------------------------------------------------------------------------- parent


@dataclass(slots=True)
class Pass:
    """One run of every phase on a fresh database."""

    label: str
    results: list[PhaseResult]
    stored_rows: int


def run_pass(
    args: argparse.Namespace, folder: Path, items: Path, *, label: str, trace: bool, profile: bool
) -> Pass:
    manifest = write_manifest(folder, items, f"bench-expand-{secrets.token_hex(4)}")
    results: list[PhaseResult] = []
    with bench_database(args, folder) as url:
        for phase in PHASES:
            argv = [sys.executable, "-m", "bench.expand", "--phase", phase, "--manifest", str(manifest)]
            argv += ["--url", url]
            argv += ["--trace"] if trace else []
            argv += ["--profile"] if profile else []
            print(f"[{label}] {phase} …", file=sys.stderr, flush=True)
            results.append(run_isolated(argv))
        stored = count_rows(url, str(results[-1].data["batch_id"]))
    return Pass(label, results, stored)


def _check(passes: list[Pass], items: int) -> list[str]:
    """Correctness of the run itself: every job stored once, and resubmitting added none."""
    problems = []
    first = {r.name: r for r in passes[0].results}
    if first["validate"].data["jobs"] != items:
        problems.append(f"validate counted {first['validate'].data['jobs']:,} jobs, expected {items:,}")
    if first["submit"].data["rows"] != items:
        problems.append(f"submit added {first['submit'].data['rows']:,} rows, expected {items:,}")
    if first["resubmit"].data["rows"] != 0:
        problems.append(f"resubmit added {first['resubmit'].data['rows']:,} rows, expected 0")
    if passes[0].stored_rows != items:
        problems.append(f"the database holds {passes[0].stored_rows:,} jobs, expected {items:,}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase:
        run_child(args)
        return 0

    backend = "SQLite (temp file)" if args.sqlite else "PostgreSQL"
    with tempfile.TemporaryDirectory(prefix="wanbatch-bench-") as tmp:
        folder = Path(tmp)
        items, gen_seconds = timed(lambda: write_items(folder, args.items, args.format))
        size_mb = items.stat().st_size / 1024 / 1024
        print(
            f"generated {args.items:,} {args.format} items ({size_mb:.1f} MB) in {gen_seconds:.2f} s",
            file=sys.stderr,
        )
        passes = [run_pass(args, folder, items, label="measure", trace=False, profile=False)]
        if args.tracemalloc:
            passes.append(run_pass(args, folder, items, label="tracemalloc", trace=True, profile=False))
        if args.profile:
            passes.append(run_pass(args, folder, items, label="profile", trace=False, profile=True))

    results = passes[0].results
    if args.tracemalloc:  # heap peaks come from their own (slower) pass
        for clean, traced in zip(results, passes[1].results, strict=True):
            clean.tracemalloc_peak_mb = traced.tracemalloc_peak_mb
    problems = _check(passes, args.items)
    by_name = {r.name: r for r in results}
    passed = not problems and all(
        TIME_TARGET.check(by_name[n].seconds) and MEMORY_TARGET.check(by_name[n].peak_rss_mb)
        for n in TARGETED
    )

    if args.json:
        print(
            json.dumps(
                {
                    "date": today(),
                    "machine": machine_summary(),
                    "backend": backend,
                    "items": args.items,
                    "format": args.format,
                    "phases": [asdict(r) for r in results],
                    "stored_rows": passes[0].stored_rows,
                    "problems": problems,
                    "passed": passed,
                }
            )
        )
        return 0 if passed else 1

    title = f"expand: {args.items:,} {args.format} items → {backend}   ({today()}, {machine_summary()})"
    print_table(
        phase_table(
            title,
            results,
            counts=(("jobs", "jobs"), ("rows", "rows inserted")),
            rate_key="jobs",
            time_target=TIME_TARGET,
            memory_target=MEMORY_TARGET,
            targeted=TARGETED,
        )
    )
    submit, validate, expand = by_name["submit"], by_name["validate"], by_name["expand"]
    insert = submit.seconds - validate.seconds - expand.seconds
    print(
        f"submit ≈ validate {fmt(validate.seconds)} s + expand/price {fmt(expand.seconds)} s "
        f"+ insert ≈ {fmt(insert)} s (derived; migrations {fmt(submit.setup_seconds)} s of setup, "
        "not counted)"
    )
    print(
        f"stored rows read back: {passes[0].stored_rows:,}; resubmit added "
        f"{by_name['resubmit'].data['rows']:,} and found {by_name['resubmit'].data['existing']:,} present"
    )
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("ALL TARGETS MET" if passed else "TARGETS MISSED")
    return 0 if passed else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.expand", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--items", type=int, default=100_000, help="items in the items_from file")
    parser.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="items_from format")
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="PostgreSQL server (a temporary database is created there and dropped)",
    )
    parser.add_argument("--in-place", action="store_true", help="use --database-url's database itself")
    parser.add_argument("--sqlite", action="store_true", help="use a temporary SQLite file instead")
    parser.add_argument("--tracemalloc", action="store_true", help="extra pass for Python-heap peaks")
    parser.add_argument("--profile", action="store_true", help="extra pass under cProfile (to stderr)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    # Internal: how the parent runs one phase in a fresh interpreter.
    parser.add_argument("--phase", choices=sorted(_CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.items < 1:
        parser.error("--items must be at least 1")
    return args


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        sys.exit(2)
