"""Benchmark: ``wanbatch validate``, ``estimate`` and ``submit`` of sweep manifests of 10k to 1M jobs.

Bulk-dataset users describe their jobs as a sweep: prompts × seeds × resolutions, half of the
prompts image-to-video with one of a few local images beside the manifest. This writes such a
manifest per size (an ``items_from`` JSONL of prompts, a ``matrix`` of seeds and resolutions),
then runs the real command, ``python -m cli <command> MANIFEST``, as a child process per row and
reads its figures from the kernel (``os.wait4``): wall time, CPU (user + system), peak RSS, jobs
per second. ``submit`` runs into a fresh SQLite file and into a fresh PostgreSQL database
``bench_bigmanifest_<random>`` on ``--database-url``'s server (dropped afterwards); each database
is migrated by a process of its own first, so the figures are a first submit's, not a migration's.
The rows stored are counted back, and the commands' exit status must be 0.

``--baseline PATH`` runs every command a second time, right before this checkout's, with the
wanbatch of another checkout (e.g. ``git archive`` of an earlier commit unpacked at PATH): the
two alternate, so a shared machine's load weighs on both alike.

``--resubmit`` adds, after each ``submit``, the same manifest submitted again with one item left
out (its middle prompt, ``seeds × 2`` jobs) into the same database: ``submit −1 item``, the
resubmit that marks (and drops) the jobs the manifest no longer has and numbers every other job
anew. Its row counts back the jobs marked ``not_in_manifest``, which must be that item's.

``--sizes 10k,100k`` is the default; ``--sizes 10k,100k,1m`` (or ``--million``) adds the million-job
case (several minutes a command on a 2-core machine). ``--profile DIR`` runs every command under
cProfile too (figures then inflated and not shown; ``DIR/<size>-<command>.prof``).

Run from the repository root: ``python -m bench.manifest_scale``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

from bench._common import (
    PACKAGES,
    ROOT,
    byte_compile,
    fmt,
    fresh_pg_database,
    machine_summary,
    print_table,
    today,
)

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: Size label -> (prompts, seeds); every prompt × seed runs at two resolutions.
SIZES: dict[str, tuple[int, int]] = {
    "10k": (50, 100),
    "100k": (500, 100),
    "1m": (500, 1000),
}
RESOLUTIONS = ("480p", "720p")
IMAGES = ("landscape.jpg", "night.jpg", "square.png")
SUBJECTS = (
    "a lighthouse at dusk",
    "a paper boat in a rainy gutter",
    "a fox crossing a snowy field",
    "neon signs reflected in puddles",
    "a hot-air balloon over vineyards",
    "waves breaking on black sand",
    "a cat asleep on a windowsill",
    "autumn leaves in a slow wind",
)
CAMERAS = ("slow dolly in", "static wide shot", "handheld tracking shot", "aerial orbit", "low angle")


def write_manifest(folder: Path, label: str, *, leave_out: int | None = None) -> tuple[Path, int]:
    """The sweep manifest of size ``label`` in ``folder`` (images copied in); and its job count.

    Even prompts are text-to-video (the manifest's ``fal-ai/wan-22``), odd ones image-to-video
    (``fal-ai/wan-i2v``, ``image_url`` one of three images in ``images/``). ``leave_out``: that
    prompt's row is left out of the ``items_from`` file (the same manifest, one item fewer)."""
    prompts, seeds = SIZES[label]
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in IMAGES:
        shutil.copy(ROOT / "manifests" / "examples" / "images" / name, images / name)
    with (folder / "prompts.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(prompts):
            if i == leave_out:
                continue
            row: dict[str, object] = {
                "prompt": f"{SUBJECTS[i % len(SUBJECTS)]}, {CAMERAS[i % len(CAMERAS)]}, take {i}",
            }
            if i % 2:
                row["endpoint"] = "fal-ai/wan-i2v"
                row["image_url"] = f"images/{IMAGES[(i // 2) % len(IMAGES)]}"
            fh.write(json.dumps(row) + "\n")
    seed_lines = "".join(f"    - {1000 + s}\n" for s in range(seeds))
    manifest = folder / f"sweep-{label}.yaml"
    manifest.write_text(
        f"name: bench-bigmanifest-{label}\n"
        "endpoint: fal-ai/wan-22\n"
        "defaults:\n"
        "  num_frames: 81\n"
        "  enable_prompt_expansion: false\n"
        "items_from: prompts.jsonl\n"
        "matrix:\n"
        "  seed:\n"
        f"{seed_lines}"
        f"  resolution: [{', '.join(RESOLUTIONS)}]\n"
        "budget:\n"
        "  max_usd: 100000000\n",
        encoding="utf-8",
    )
    kept = prompts - (leave_out is not None)
    return manifest, kept * seeds * len(RESOLUTIONS)


@dataclass(slots=True)
class Row:
    """One command on one manifest, as the kernel measured the child."""

    size: str
    code: str
    command: str
    jobs: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    status: int
    stored: int | None = None
    #: ``submit −1 item``: the jobs it marked ``not_in_manifest`` (counted back), and how many it should.
    left_out: int | None = None
    left_out_expected: int | None = None

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.wall_s if self.wall_s > 0 else 0.0


def run_command(
    argv: list[str], env: dict[str, str], timeout: float, code: Path = ROOT
) -> tuple[int, float, float, float, str]:
    """Run ``argv`` in ``code`` (``python -m`` puts its working directory first on the path: the
    checkout run is the one it starts in); (exit status, wall s, CPU s, peak RSS MiB, stderr
    tail) from ``os.wait4``."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    # Killed at the deadline even when it prints nothing (a resubmit stuck in one statement).
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    stderr_tail: list[str] = []
    try:
        for line in proc.stderr:  # drained as it comes: a full pipe would block the child
            stderr_tail = [*stderr_tail[-20:], line]
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    return (
        proc.returncode,
        wall,
        usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss / 1024,
        "".join(stderr_tail),
    )


def _env(database_url: str, code: Path = ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_")}
    env["WANBATCH_DATABASE_URL"] = database_url
    env["PYTHONPATH"] = str(code)
    env.pop("FAL_KEY", None)  # nothing here talks to fal
    return env


def migrate(database_url: str) -> None:
    """Bring a fresh database to the schema head in a process of its own (not in any figure)."""
    code = (
        "from jobs.settings import Settings\nfrom jobs.db import open_engine\n"
        f"open_engine(Settings(database_url={database_url!r}))\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(database_url), check=True)


def count_jobs(database_url: str, where: str = "") -> int:
    """Jobs stored (``where``: those matching it), read back independently of ``submit``'s own output."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM jobs {where}")).scalar_one())
    finally:
        engine.dispose()


@contextmanager
def databases(kind: str, admin_url: str, folder: Path) -> Iterator[str]:
    if kind == "sqlite":
        path = folder / "bench.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    with fresh_pg_database(admin_url, "bench_bigmanifest_") as url:
        yield url


def measure(args: argparse.Namespace, label: str, folder: Path) -> list[Row]:
    manifest, jobs = write_manifest(folder, label)
    rows: list[Row] = []
    unused_db = f"sqlite:///{folder / 'unused.db'}"
    codes = [("baseline", Path(args.baseline)), ("this", ROOT)] if args.baseline else [("this", ROOT)]

    def one(command: str, shown: str, url: str, code: tuple[str, Path]) -> Row:
        argv = [sys.executable]
        if args.profile:
            prof = Path(args.profile) / f"{label}-{code[0]}-{shown.replace(' ', '_')}.prof"
            argv += ["-m", "cProfile", "-o", str(prof)]
        argv += ["-m", "cli", command, str(manifest)]
        print(f"[{label}] {code[0]}: {shown} …", file=sys.stderr, flush=True)
        status, wall, cpu, rss, tail = run_command(argv, _env(url, code[1]), args.timeout, code[1])
        if status != 0:
            print(f"[{label}] {shown} exited {status}:\n{tail}", file=sys.stderr)
        return Row(label, code[0], shown, jobs, wall, cpu, rss, status)

    migrate(unused_db)
    for command in ("validate", "estimate"):
        rows.extend(one(command, command, unused_db, code) for code in codes)
    for kind in ("sqlite", "postgresql"):
        for code in codes:  # a fresh database each: both are first submits
            with databases(kind, args.database_url, folder) as url:
                migrate(url)
                row = one("submit", f"submit ({kind})", url, code)
                row.stored = count_jobs(url)
                rows.append(row)
                if args.resubmit:
                    prompts, seeds = SIZES[label]
                    write_manifest(folder, label, leave_out=prompts // 2)
                    try:
                        row = one("submit", f"submit −1 item ({kind})", url, code)
                    finally:
                        write_manifest(folder, label)  # the full manifest again for the next run
                    row.jobs = jobs  # the batch's jobs: the left-out item's are kept (marked)
                    row.stored = count_jobs(url)
                    row.left_out = count_jobs(url, "WHERE not_in_manifest")
                    row.left_out_expected = seeds * len(RESOLUTIONS)
                    rows.append(row)
    return rows


def render(rows: list[Row], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for header in (
        "jobs",
        "code",
        "command",
        "wall (s)",
        "CPU (s)",
        "peak RSS (MB)",
        "jobs/s",
        "rows stored",
        "left out",
        "exit",
    ):
        table.add_column(header, justify="left" if header in ("code", "command") else "right")
    for r in rows:
        table.add_row(
            f"{r.jobs:,}",
            r.code,
            r.command,
            fmt(r.wall_s),
            fmt(r.cpu_s),
            fmt(r.peak_rss_mb, 1),
            f"{r.jobs_per_s:,.0f}",
            "–" if r.stored is None else f"{r.stored:,}",
            "–" if r.left_out is None else f"{r.left_out:,}",
            str(r.status),
        )
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    byte_compile()
    if args.baseline:  # as an installed wanbatch is: its modules compiled once, not per process
        import compileall

        for package in PACKAGES:
            compileall.compile_dir(Path(args.baseline) / package, quiet=1)
    rows: list[Row] = []
    for label in args.sizes:
        with tempfile.TemporaryDirectory(prefix="wanbatch-bigmanifest-") as tmp:
            rows.extend(measure(args, label, Path(tmp)))
    problems = [f"{r.size} {r.code} {r.command} exited {r.status}" for r in rows if r.status != 0]
    problems += [
        f"{r.size} {r.code} {r.command} stored {r.stored:,} jobs, expected {r.jobs:,}"
        for r in rows
        if r.stored is not None and r.stored != r.jobs
    ]
    problems += [
        f"{r.size} {r.code} {r.command} marked {r.left_out:,} jobs not in its manifest, expected "
        f"{r.left_out_expected:,}"
        for r in rows
        if r.left_out is not None and r.left_out != r.left_out_expected
    ]
    if args.json:
        print(
            json.dumps(
                {
                    "date": today(),
                    "machine": machine_summary(),
                    "rows": [asdict(r) for r in rows],
                    "problems": problems,
                }
            )
        )
    else:
        print_table(render(rows, f"manifest_scale ({today()}, {machine_summary()})"))
        if args.profile:
            print(f"profiled run (figures inflated): profiles in {args.profile}")
        for problem in problems:
            print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.manifest_scale", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--sizes", default="10k,100k", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--million", action="store_true", help="add the 1,000,000-job case")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="PostgreSQL server to use")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per command")
    parser.add_argument(
        "--resubmit", action="store_true", help="also submit again with one item left out, timed"
    )
    parser.add_argument("--baseline", metavar="PATH", help="another checkout to run each command with too")
    parser.add_argument("--profile", metavar="DIR", help="run each command under cProfile, into DIR")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args(argv)
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    if args.million and "1m" not in sizes:
        sizes.append("1m")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    args.sizes = sizes
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    return args


if __name__ == "__main__":
    sys.exit(main())
