"""Shared plumbing for wanbatch's benchmarks: isolated phases, timing, peak memory, tables.

Why a fresh process per phase: ``ru_maxrss`` is a high-water mark that never goes down, so a
peak measured in a process that already ran another phase says nothing about this one. Each
phase therefore runs in its own interpreter (:func:`run_isolated`), does its imports and setup
first (timed and measured separately, so the baseline is visible), then the measured body, and
reports one JSON line back to the parent, which prints the table.

A benchmark module uses it like this::

    # in the child (e.g. ``python -m bench.expand --phase validate ...``)
    emit(measure_phase("validate", setup, body))

    # in the parent
    result = run_isolated([sys.executable, "-m", "bench.expand", "--phase", "validate", ...])
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import secrets
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

#: The repository root: children run with it as their working directory so ``-m bench.x`` works.
ROOT = Path(__file__).resolve().parent.parent
#: Prefix of the one stdout line that carries a child's result (anything else is passed through).
RESULT_MARKER = "@@bench-result@@ "
MB = 1024 * 1024

T = TypeVar("T")
#: A phase's own figures (jobs, rows, a batch id, …), JSON-ready.
Figures = dict[str, int | float | str]


#: wanbatch's own packages: what an install of wanbatch byte-compiles (see :func:`byte_compile`).
PACKAGES = ("cli", "jobs", "worker", "web", "falsim", "migrations")


def byte_compile() -> None:
    """Byte-compile wanbatch's packages in place, as ``pip install`` does for what it installs.

    A source checkout never run, or run under ``PYTHONDONTWRITEBYTECODE=1`` (as on this project's machines),
    has no ``__pycache__``: every wanbatch process then compiles every module it imports from
    source, about 0.08 s of CPU that no installed wanbatch pays — and that the hand-written
    script, whose libraries come byte-compiled from site-packages, does not pay either. The
    folders are git-ignored; Python still reads them under ``PYTHONDONTWRITEBYTECODE``. The
    compiled dataclass methods an installed wanbatch keeps in the user's cache folder (for this
    checkout: the file is keyed by the package's location) are written too
    (:func:`warm_method_cache`).
    """
    import compileall

    for package in PACKAGES:
        compileall.compile_dir(ROOT / package, quiet=1)
    warm_method_cache()


#: A process that is the ``wanbatch`` command (argv[0] says so: :func:`cli._launched_as_command`)
#: imports every module of the product, then writes the dataclass methods it compiled.
_WARM_METHODS = """
import importlib, pkgutil, sys
sys.argv[0] = "wanbatch"
import cli
from cli import startup
for name in %r:
    package = importlib.import_module(name)
    for module in pkgutil.walk_packages(package.__path__, name + "."):
        if module.name != "cli.__main__":
            importlib.import_module(module.name)
sys.dont_write_bytecode = False
startup.install_method_cache().save()
"""


def warm_method_cache() -> None:
    """Write the file of compiled dataclass methods (:class:`cli.startup.MethodCache`, in
    ``$XDG_CACHE_HOME/wanbatch`` or ``~/.cache/wanbatch``) that an installed wanbatch writes at its
    first command, as Python writes the .pyc files it imports;
    the same environment (``PYTHONDONTWRITEBYTECODE=1``) keeps every wanbatch process of a
    benchmark from writing it, so each would compile the methods again, as no second run of an
    installed wanbatch does. Every module of the product is imported for it, in a child process."""
    code = _WARM_METHODS % (tuple(p for p in PACKAGES if p != "migrations"),)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


@dataclass(slots=True)
class PhaseResult:
    """What one isolated phase measured. Memory in MiB, times in seconds."""

    name: str
    seconds: float
    #: Interpreter start-up to the end of setup (imports, engine, …): not part of ``seconds``.
    setup_seconds: float
    #: RSS high-water mark when setup finished: the floor the phase started from.
    baseline_rss_mb: float
    #: RSS high-water mark of the whole process (setup included): what a user's process peaks at.
    peak_rss_mb: float
    #: Peak of Python allocations during the body, when traced (slows the body: time is then indicative).
    tracemalloc_peak_mb: float | None = None
    #: Phase-specific figures (rows, jobs, …).
    data: Figures = field(default_factory=dict)

    @property
    def rss_growth_mb(self) -> float:
        """How much the phase itself raised the high-water mark above its setup baseline."""
        return self.peak_rss_mb - self.baseline_rss_mb

    def rate(self, key: str) -> float | None:
        """``data[key]`` per second of the body (e.g. rows/s), or None when not applicable."""
        count = self.data.get(key)
        if not isinstance(count, int | float) or self.seconds <= 0:
            return None
        return count / self.seconds

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PhaseResult:
        return cls(**raw)


@contextlib.contextmanager
def fresh_pg_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A new, empty PostgreSQL database ``<prefix><random>`` on ``admin_url``'s server (whose own
    database only runs CREATE/DROP DATABASE); its URL is yielded and it is dropped afterwards."""
    import psycopg  # here, not at the top: a benchmark's child phases import this module too
    from psycopg import sql
    from sqlalchemy import make_url

    admin = make_url(admin_url)
    name = f"{prefix}{secrets.token_hex(6)}"
    dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def peak_rss_mb() -> float:
    """This process's RSS high-water mark in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024


def measure_phase(
    name: str,
    setup: Callable[[], T],
    body: Callable[[T], Figures],
    *,
    trace: bool = False,
    started: float | None = None,
) -> PhaseResult:
    """Run ``setup`` then ``body(setup())`` in this process, timing and measuring the body.

    ``started`` is the ``time.perf_counter()`` of the interpreter's start (default: now), so the
    setup figure can include imports done before this call. Call it once per process.
    """
    begin = time.perf_counter() if started is None else started
    state = setup()
    setup_seconds = time.perf_counter() - begin
    baseline = peak_rss_mb()
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    data = body(state)
    seconds = time.perf_counter() - t0
    traced = None
    if trace:
        traced = tracemalloc.get_traced_memory()[1] / MB
        tracemalloc.stop()
    return PhaseResult(
        name=name,
        seconds=seconds,
        setup_seconds=setup_seconds,
        baseline_rss_mb=baseline,
        peak_rss_mb=peak_rss_mb(),
        tracemalloc_peak_mb=traced,
        data=data,
    )


def emit(result: PhaseResult) -> None:
    """Send a child's result to the parent (one marked JSON line on stdout)."""
    sys.stdout.write(RESULT_MARKER + json.dumps(asdict(result), default=str) + "\n")
    sys.stdout.flush()


def run_isolated(argv: Sequence[str], *, timeout: float = 1800) -> PhaseResult:
    """Run one phase in a fresh interpreter and return what it :func:`emit`-ted.

    The child's stderr goes straight to ours (progress, profiles); a child that fails or reports
    nothing raises ``RuntimeError`` with its exit code, so a broken phase never prints figures.
    """
    proc = subprocess.run(
        list(argv), cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False
    )
    found: PhaseResult | None = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            found = PhaseResult.from_dict(json.loads(line[len(RESULT_MARKER) :]))
        elif line.strip():
            print(line, file=sys.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"benchmark phase {' '.join(argv)!r} failed (exit {proc.returncode})")
    return found


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and how long it took, for the parent's own cheap steps (e.g. generating input)."""
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


# --------------------------------------------------------------------------- reporting


def machine_summary() -> str:
    """One line naming the machine, for tables and RESULTS.md (CPU count matters most here)."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class Target:
    """A budget one figure must stay within, e.g. ``Target("time", 20.0, "s")``."""

    what: str
    limit: float
    unit: str

    def check(self, value: float) -> bool:
        return value <= self.limit

    def describe(self, value: float) -> str:
        verdict = "[green]PASS[/]" if self.check(value) else "[bold red]FAIL[/]"
        return f"{verdict} (≤ {self.limit:g} {self.unit})"


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def phase_table(
    title: str,
    results: Sequence[PhaseResult],
    *,
    counts: Sequence[tuple[str, str]] = (("rows", "rows"),),
    rate_key: str = "rows",
    time_target: Target | None = None,
    memory_target: Target | None = None,
    targeted: Sequence[str] = (),
) -> Table:
    """A rich table of phases; phases named in ``targeted`` get PASS/FAIL against the targets.

    ``counts`` are ``(data key, header)`` pairs shown as columns; ``rate_key`` is the count
    divided by the phase's time for the throughput column.
    """
    table = Table(title=title, title_justify="left")
    table.add_column("phase")
    table.add_column("time (s)", justify="right")
    for _, header in counts:
        table.add_column(header, justify="right")
    table.add_column(f"{rate_key}/s", justify="right")
    table.add_column("peak RSS (MB)", justify="right")
    table.add_column("Δ over setup (MB)", justify="right")
    table.add_column("tracemalloc (MB)", justify="right")
    table.add_column("setup (s)", justify="right")
    table.add_column("time target")
    table.add_column("memory target")
    for r in results:
        rate = r.rate(rate_key)
        checked = r.name in targeted
        shown = [r.data.get(key) for key, _ in counts]
        table.add_row(
            r.name,
            fmt(r.seconds),
            *("–" if v is None else f"{v:,}" for v in shown),
            "–" if rate is None else f"{rate:,.0f}",
            fmt(r.peak_rss_mb, 1),
            fmt(r.rss_growth_mb, 1),
            fmt(r.tracemalloc_peak_mb, 1),
            fmt(r.setup_seconds),
            time_target.describe(r.seconds) if checked and time_target else "",
            memory_target.describe(r.peak_rss_mb) if checked and memory_target else "",
        )
    return table


def print_table(table: Table) -> None:
    """Print to stdout, wide enough not to wrap columns when piped to a file."""
    Console(width=max(160, Console().width)).print(table)
