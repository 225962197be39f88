"""Drain benchmark (issue #11): wanbatch, embedded and distributed, vs. the hand-written script.

All clients drain the same job list against the same simulator, which runs over TLS in its
**own process** (so the clients' CPU is measured apart from fal's side). The simulator's ledger
gives the makespan (first accepted submit → last completed run) and the recorded run times; a
counting wrapper around the simulator's ASGI app (bench-only, inside the simulator process)
counts status calls. The simulator is reset before each row.

Rows, each in child processes reaped with ``os.wait4`` (user+sys CPU and peak RSS, the
children they reaped included):

* ``wanbatch run (defaults)``: ``wanbatch run MANIFEST`` embedded, on a fresh SQLite database;
  ``WANBATCH_SUBMIT_RATE=50``, every other setting wanbatch's default — the outstanding cap too,
  which keeps a small queue waiting at fal beyond the account's running slots by design.
* ``wanbatch run (tick 0.1, poll 0.1)`` (``--no-fast-row`` skips it): the same with a 0.1 s tick
  and minimum poll interval.
* ``wanbatch, 2 distributed workers`` (``--no-distributed`` skips it): a fresh PostgreSQL database
  and an empty Redis DB of its own (claimed among 1..15, flushed afterwards, never another DB);
  ``wanbatch submit``, then ``--workers`` × ``wanbatch worker`` and ``wanbatch run BATCH``, which
  only watches in distributed mode; the workers get SIGTERM once it exits. CPU is the sum over
  **all** those processes (the workers' pool children included); peak RSS the sum of each
  concurrent process's own peak (see :mod:`bench._procs`: shared pages count in each).
* ``handwritten``: ``bench/handwritten.py``, asyncio + fal-client + a semaphore of C.

``--wanbatch-env KEY=VALUE`` (repeatable) adds a setting to every wanbatch process of every row.

``--startup-jobs K`` runs every row a second time with K jobs (taking turns as ever) and prints
each client's CPU split into start-up and a cost per further job: "CPU per job" at one size
mixes the two, and a client that starts heavier but costs less per job is ahead from some
batch size on.

``--profile DIR`` runs the embedded rows under ``py-spy record -r 100 -f raw`` (stacks in
``DIR/<scenario>-<row>.txt``; ``BENCH_PYSPY_ARGS="--gil -r 400"`` adds py-spy options, its own
rate replacing the default 100) and prints the
25 functions with the largest inclusive share of the busy samples. py-spy slows the process it
samples and its CPU is in the row's: **profiled figures are not to be reported**; measure
without ``--profile`` for RESULTS.md.

Scenario ``drain``: N jobs, fixed model time L, account concurrency C: ideal = ceil(N/C) × L.
Scenario ``tail``: lognormal model times (median 2 s, σ 0.6): the reference is the makespan of
a zero-overhead client that keeps the C slots busy in submission order, computed from the run
times the simulator recorded in that very run.

    python -m bench.drain                          # THE figures: both scenarios, every row
    python -m bench.drain --jobs 80 --scenario drain --no-fast-row
    python -m bench.drain --scenario drain --no-distributed --profile /tmp/prof
    python -m bench.drain --scenario drain --no-fast-row --repeat 3 --startup-jobs 8

Exit status 1 when a row broke (its figures show as nan, the other rows are still measured).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from rich.markup import escape
from rich.table import Table

from bench._common import ROOT, byte_compile, fresh_pg_database, machine_summary, print_table, today
from bench._procs import Child, GroupSampler, per_process_cpu, spawn, stop_all, total_usage
from bench._stacks import top_table

ENDPOINT = "fal-ai/wan-22"
KEY = "bench-drain-key"


# --------------------------------------------------------------------------- simulator child


def _kind(method: str, path: str) -> str:
    """What a request to the simulator is, for the counters."""
    if path.startswith("/files/"):
        return "download"
    if path.startswith("/_"):
        return "control"
    if path.endswith("/status/stream"):
        return "stream"
    if path.endswith("/status"):
        return "status"
    if path.endswith("/cancel"):
        return "cancel"
    if "/requests/" in path:
        return "result"
    return "submit" if method == "POST" else "other"


def _serve_simulator(info_file: Path, concurrency: int, latency: float, sigma: float, seed: int) -> None:
    """Run the TLS simulator in this process until stdin closes; write its URL and CA to ``info_file``.

    Bench-only instrumentation (``falsim`` itself is untouched): requests are counted by kind
    (``GET /_bench/counts``, reset by ``POST /_bench/reset``), and with ``sigma > 0`` each run
    lasts ``latency × exp(N(0, σ))`` (lognormal, median ``latency``) instead of ``latency``.
    """
    import falsim.server as server_mod
    from falsim import SimulatorOptions, running_simulator
    from falsim.engine import Engine

    counts: Counter[str] = Counter()
    original_build = server_mod.build_app

    def build_counting_app(engine: Engine, base_url: str) -> Any:
        inner = original_build(engine, base_url)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                path, method = scope["path"], scope["method"]
                if path.startswith("/_bench/"):
                    if method == "POST":
                        counts.clear()
                    body = json.dumps(dict(counts)).encode()
                    headers = [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ]
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                    return
                counts[_kind(method, path)] += 1
            await inner(scope, receive, send)

        return app

    server_mod.build_app = build_counting_app
    if sigma > 0:

        def lognormal(self: Engine, spec: Any) -> float:
            return latency * math.exp(self.rng.gauss(0.0, sigma))

        Engine._latency = lognormal  # type: ignore[method-assign]

    opts = SimulatorOptions(
        concurrency_limit=concurrency, latency_seconds=latency, latency_jitter=0.0, rng_seed=seed
    )
    with running_simulator(opts, tls=True) as sim:
        info_file.write_text(json.dumps({"url": sim.url, "ca_file": str(sim.ca_file)}))
        sys.stdin.read()  # the parent closes our stdin when it is done


@dataclass
class Simulator:
    proc: subprocess.Popen[str]
    url: str
    ca_file: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.ca_file, timeout=60)

    def reset(self) -> None:
        with self.client() as c:
            c.post("/_sim/reset").raise_for_status()
            c.post("/_bench/reset").raise_for_status()

    def ledger(self) -> dict[str, Any]:
        with self.client() as c:
            out: dict[str, Any] = c.get("/_sim/ledger").raise_for_status().json()
            return out

    def counts(self) -> dict[str, int]:
        with self.client() as c:
            out: dict[str, int] = c.get("/_bench/counts").raise_for_status().json()
            return out

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_simulator(tmp: Path, concurrency: int, latency: float, sigma: float, seed: int) -> Simulator:
    info = tmp / "sim.json"
    argv = [sys.executable, "-m", "bench.drain", "--serve-sim", str(info)]
    argv += ["--concurrency", str(concurrency), "--latency", str(latency), "--sigma", str(sigma)]
    argv += ["--seed", str(seed)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not info.exists() or not info.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the simulator process did not start")
        time.sleep(0.05)
    time.sleep(0.05)
    raw = json.loads(info.read_text())
    return Simulator(proc, raw["url"], raw["ca_file"])


# --------------------------------------------------------------------------- clients


#: What a client run gives: wall s, CPU s, peak RSS MB, videos on disk, a note for the table.
Measured = tuple[float, float, float, int, str]


@dataclass
class Row:
    client: str
    wall: float
    makespan: float
    reference: float
    cpu_ms_per_job: float
    peak_rss_mb: float
    succeeded: int
    jobs: int
    status_per_job: float | None
    note: str = ""
    broken: bool = False


def _items(jobs: int) -> list[dict[str, Any]]:
    return [{"prompt": f"bench drain {i}", "seed": 1000 + i} for i in range(jobs)]


def _tail(log: Path, lines: int = 15) -> str:
    """The end of a child's log, indented: the work folders are deleted with the scenario."""
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return "\n".join(f"  | {line}" for line in text.splitlines()[-lines:])


def _run_child(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, float, float, int, str]:
    """Run ``argv``; its wall time, CPU seconds (user+sys), peak RSS MB, exit status and stdout."""
    with log.open("w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode, out


@dataclass(frozen=True)
class WanbatchOptions:
    """How the wanbatch rows run: extra settings for all of them, the distributed row's services."""

    #: ``--wanbatch-env KEY=VALUE``: applied last, to every wanbatch process of every row.
    extra_env: dict[str, str]
    #: A PostgreSQL server (any database on it): the distributed row creates its own there.
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    #: A Redis server without a DB number: the distributed row claims an empty DB (1..15) there.
    redis_url: str = "redis://127.0.0.1:6379"
    workers: int = 2
    #: ``wanbatch worker --concurrency`` (None: the worker's own default, the CPU count).
    worker_concurrency: int | None = None
    #: Seconds the distributed row may take before it is abandoned as broken.
    timeout: float = 1800.0
    #: ``--profile DIR``: the embedded rows run under py-spy, which writes its stacks there.
    profile_dir: Path | None = None
    #: ``--repeat N``: every row N times, the clients taking turns; the table shows medians.
    repeat: int = 1
    #: ``--startup-jobs K``: every row also with K jobs, to split its CPU into start-up and per job.
    startup_jobs: int = 0


def _write_manifest(tmp: Path, jobs: int, prefix: str) -> tuple[Path, Path]:
    """A fresh work folder holding the bench manifest (``items_from`` JSONL); (folder, manifest)."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp))
    with (work / "items.jsonl").open("w") as f:
        for item in _items(jobs):
            f.write(json.dumps(item) + "\n")
    manifest = work / "manifest.yaml"
    manifest.write_text(
        f"name: bench-drain\nendpoint: {ENDPOINT}\n"
        'defaults:\n  resolution: 480p\n  aspect_ratio: "16:9"\n'
        "items_from: items.jsonl\nbudget:\n  max_usd: 100000\n"
    )
    return work, manifest


def _wanbatch_env(sim: Simulator, work: Path, opts: WanbatchOptions, **settings: str) -> dict[str, str]:
    """The environment of a wanbatch process: ours without any WANBATCH_* (a broker URL in the
    caller's shell would silently turn the embedded rows distributed), the simulator, the row's
    ``settings``, then ``--wanbatch-env``. The outstanding cap is wanbatch's default: it keeps a
    small queue waiting at fal beyond the running slots by design."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_") and k != "FAL_KEY"}
    env |= {
        "FAL_KEY": KEY,
        "SSL_CERT_FILE": sim.ca_file,
        "WANBATCH_FAL_QUEUE_URL": sim.url,
        "WANBATCH_FAL_REST_URL": sim.url,
        "WANBATCH_DATABASE_URL": f"sqlite:///{work / 'wanbatch.db'}",
        "WANBATCH_OUTPUT_DIR": str(work / "outputs"),
        "WANBATCH_SUBMIT_RATE": "50",
        "PYTHONUNBUFFERED": "1",
        **settings,
    }
    return env | opts.extra_env


def _profile_path(opts: WanbatchOptions, row: str) -> Path | None:
    if opts.profile_dir is None:
        return None
    slug = "".join(c if c.isalnum() else "-" for c in row.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return opts.profile_dir / f"{slug}.txt"


def embedded_command(
    sim: Simulator, tmp: Path, jobs: int, opts: WanbatchOptions, fast: bool = False
) -> tuple[list[str], dict[str, str], Path]:
    """``wanbatch run MANIFEST`` of ``jobs`` jobs on a fresh SQLite database: (argv, environment,
    its work folder, where the outputs go)."""
    work, manifest = _write_manifest(tmp, jobs, "wanbatch-")
    extra = {"WANBATCH_TICK_INTERVAL": "0.1", "WANBATCH_POLL_MIN_INTERVAL": "0.1"} if fast else {}
    env = _wanbatch_env(sim, work, opts, **extra)
    # ``python -m cli``: the command as the console script runs it (its own process, where
    # cli.startup also does without what only another program in the process could need).
    argv = [sys.executable, "-m", "cli", "run", str(manifest), "--no-progress"]
    return argv, env, work


def run_wanbatch(
    sim: Simulator, tmp: Path, jobs: int, opts: WanbatchOptions, fast: bool, profile: Path | None
) -> Measured:
    """``wanbatch run`` on a fresh SQLite database; (wall, cpu s, rss MB, succeeded).

    With ``profile``, under ``py-spy record`` (whose own CPU is then in the figures too).
    """
    argv, env, work = embedded_command(sim, tmp, jobs, opts, fast)
    if profile is not None:
        profile.parent.mkdir(parents=True, exist_ok=True)
        spy_args = os.environ.get("BENCH_PYSPY_ARGS", "").split()
        rate = [] if {"-r", "--rate"} & set(spy_args) else ["-r", "100"]
        argv = [
            "py-spy",
            "record",
            *rate,
            "-f",
            "raw",
            *spy_args,
            "-o",
            str(profile),
            "--",
            *argv,
        ]
    wall, cpu, rss, code, _ = _run_child(argv, env, work / "stderr.log")
    if code != 0:
        print(f"wanbatch run exited {code}; its log ends:\n{_tail(work / 'stderr.log')}", file=sys.stderr)
    succeeded = len(list((work / "outputs").rglob("*.mp4")))
    return wall, cpu, rss, succeeded, ""


def run_distributed(sim: Simulator, tmp: Path, jobs: int, opts: WanbatchOptions) -> Measured:
    """``wanbatch submit``, ``opts.workers`` × ``wanbatch worker``, ``wanbatch run BATCH`` (which only
    watches in distributed mode) on a fresh PostgreSQL database and a Redis DB of its own.

    Wall: from the submit to the watcher's exit. CPU: every wanbatch process (the submit, the
    workers with their pool children, the watcher); peak RSS: the sum of the per-process peaks of
    the processes that run together (workers, their children, the watcher), see :mod:`bench._procs`.
    The workers get SIGTERM once the watcher has seen the batch finish.
    """
    from bench.distributed import claimed_redis_db, wanbatch_command

    work, manifest = _write_manifest(tmp, jobs, "wanbatch-dist-")
    wanbatch = wanbatch_command()
    with (
        fresh_pg_database(opts.database_url, f"bench_drain_{os.getpid()}_") as database_url,
        claimed_redis_db(opts.redis_url) as broker_url,
    ):
        env = _wanbatch_env(
            sim, work, opts, WANBATCH_DATABASE_URL=database_url, WANBATCH_BROKER_URL=broker_url
        )
        t0 = time.perf_counter()
        _, submit_cpu, _, code, out = _run_child(
            [*wanbatch, "submit", str(manifest), "--json"], env, work / "submit.log"
        )
        if code != 0:
            raise RuntimeError(f"wanbatch submit exited {code}; its log ends:\n{_tail(work / 'submit.log')}")
        batch_id = str(json.loads(out)["batch"])
        worker_argv = [*wanbatch, "worker"]
        if opts.worker_concurrency:
            worker_argv += ["--concurrency", str(opts.worker_concurrency)]
        children: list[Child] = []
        with GroupSampler() as sampler:
            try:
                for n in range(opts.workers):
                    children.append(spawn(worker_argv, f"worker-{n}", env, work, work / f"worker-{n}.log"))
                    sampler.watch(children[-1])
                watcher = spawn(
                    [*wanbatch, "run", batch_id, "--no-progress"], "watcher", env, work, work / "watcher.log"
                )
                children.append(watcher)
                sampler.watch(watcher)
                _wait_watcher(watcher, children[:-1], work, opts.timeout)
                wall = time.perf_counter() - t0
            finally:
                sampler.sample()  # the last word on the workers' children before they go
                stop_all(children, grace=30)
        usage = total_usage(children, sampler, before=submit_cpu)
    if watcher.proc.returncode != 0:
        code, log = watcher.proc.returncode, _tail(work / "watcher.log")
        print(f"wanbatch run (watcher) exited {code}; its log ends:\n{log}", file=sys.stderr)
    if usage.killed:
        print(
            f"{usage.killed} wanbatch process(es) needed SIGKILL: their pool children's CPU may be missing",
            file=sys.stderr,
        )
    succeeded = len(list((work / "outputs").rglob("*.mp4")))
    split = ", ".join(f"{name} {cpu:.2f} s" for name, cpu in per_process_cpu(children, sampler).items())
    print(
        f"distributed: {usage.processes} wanbatch processes; CPU {usage.cpu_seconds:.1f} s "
        f"(submit {submit_cpu:.1f} s; after it: wait4 {usage.waited_seconds:.1f} s, "
        f"/proc samples {usage.sampled_seconds:.1f} s); by process, its children included: "
        f"submit {submit_cpu:.2f} s, {split} ({jobs} jobs)",
        file=sys.stderr,
    )
    return wall, usage.cpu_seconds, usage.peak_rss_mb, succeeded, f"{usage.processes} processes; "


def _wait_watcher(watcher: Child, workers: list[Child], work: Path, timeout: float) -> None:
    """Until the watcher exits; a worker that dies first, or the timeout, breaks the row."""
    deadline = time.monotonic() + timeout
    while not watcher.reap(block=False):
        for w in workers:
            if w.reap(block=False):
                log = _tail(work / f"{w.name}.log")
                raise RuntimeError(f"{w.name} exited {w.proc.returncode} early; its log ends:\n{log}")
        if time.monotonic() > deadline:
            log = _tail(work / "watcher.log")
            raise TimeoutError(
                f"the batch was not done after {timeout:.0f} s; the watcher's log ends:\n{log}"
            )
        time.sleep(0.1)


def handwritten_command(
    sim: Simulator, tmp: Path, jobs: int, concurrency: int
) -> tuple[list[str], dict[str, str], Path]:
    """``bench/handwritten.py`` on ``jobs`` jobs, routed to the simulator through fal_client's
    env vars: (argv, environment, its work folder)."""
    work = Path(tempfile.mkdtemp(prefix="handwritten-", dir=tmp))
    jobs_file = work / "jobs.jsonl"
    with jobs_file.open("w") as f:
        for item in _items(jobs):
            args = {**item, "resolution": "480p", "aspect_ratio": "16:9"}
            f.write(json.dumps({"endpoint": ENDPOINT, "arguments": args}) + "\n")
    env = {
        **os.environ,
        "FAL_KEY": KEY,
        "FAL_QUEUE_RUN_HOST": sim.url.removeprefix("https://"),
        "SSL_CERT_FILE": sim.ca_file,
    }
    argv = [sys.executable, str(ROOT / "bench" / "handwritten.py"), str(jobs_file), str(work / "out")]
    return [*argv, str(concurrency)], env, work


def run_handwritten(sim: Simulator, tmp: Path, jobs: int, concurrency: int) -> Measured:
    """The hand-written script (:func:`handwritten_command`)."""
    argv, env, work = handwritten_command(sim, tmp, jobs, concurrency)
    wall, cpu, rss, code, out = _run_child(argv, env, work / "stderr.log")
    succeeded = 0
    if code == 0 and out.strip():
        succeeded = int(json.loads(out.strip().splitlines()[-1])["succeeded"])
    else:
        print(f"handwritten.py exited {code}; its log ends:\n{_tail(work / 'stderr.log')}", file=sys.stderr)
    return wall, cpu, rss, succeeded, ""


# --------------------------------------------------------------------------- figures


def makespan(ledger: dict[str, Any]) -> float:
    """First accepted submit → last completed run, from the simulator's ledger."""
    entries = ledger["entries"]
    done = [e["completed_at"] for e in entries if e["completed_at"] is not None]
    if not entries or not done:
        return math.nan
    return float(max(done) - min(e["accepted_at"] for e in entries))


def zero_overhead_makespan(ledger: dict[str, Any], concurrency: int) -> float:
    """A client that reacts instantly: the recorded run times, in submission order, on C slots."""
    entries = sorted(ledger["entries"], key=lambda e: e["accepted_at"])
    runs = [e["completed_at"] - e["started_at"] for e in entries if e["completed_at"] and e["started_at"]]
    slots = [0.0] * concurrency
    for run in runs:
        heapq.heappush(slots, heapq.heappop(slots) + run)
    return max(slots)


def measure(
    name: str,
    sim: Simulator,
    run: Callable[[], Measured],
    jobs: int,
    concurrency: int,
    ideal: float | None,
) -> Row:
    sim.reset()
    print(f"running {name} …", file=sys.stderr, flush=True)
    broken = ""
    try:
        wall, cpu, rss, succeeded, extra = run()
    except (RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
        # One broken row (a worker that crashed, a service down) must not lose the others.
        print(f"{name} broke: {exc}", file=sys.stderr)
        wall, cpu, rss, succeeded, extra = math.nan, math.nan, math.nan, 0, ""
        broken = f"BROKEN ({type(exc).__name__}); "
    ledger, counts = sim.ledger(), sim.counts()
    span = makespan(ledger)
    reference = ideal if ideal is not None else zero_overhead_makespan(ledger, concurrency)
    status_calls = counts.get("status", 0) + counts.get("stream", 0)
    note = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k not in ("control",))
    return Row(
        client=name,
        wall=wall,
        makespan=span,
        reference=reference,
        cpu_ms_per_job=cpu * 1000 / jobs,
        peak_rss_mb=rss,
        succeeded=succeeded,
        jobs=jobs,
        status_per_job=status_calls / jobs,
        note=broken + extra + note,
        broken=bool(broken),
    )


def median_row(runs: list[Row]) -> Row:
    """One row for several runs of a client: the median of each figure, the worst of the rest.

    CPU per job varies by ±15 % between runs on a 2-core machine; one run per row cannot tell
    a 10 % change from noise. Makespan and its reference come from the run whose ratio is the
    median, so the ratio shown is a ratio one run really had.
    """
    if len(runs) == 1:
        return runs[0]
    ok = [r for r in runs if not r.broken] or runs
    by_ratio = sorted(ok, key=lambda r: r.makespan / r.reference if r.reference > 0 else math.inf)
    middle = by_ratio[(len(by_ratio) - 1) // 2]
    calls = [r.status_per_job for r in ok if r.status_per_job is not None]
    cpus = ", ".join(f"{r.cpu_ms_per_job:.1f}" for r in runs)
    return replace(
        middle,
        wall=statistics.median(r.wall for r in ok),
        cpu_ms_per_job=statistics.median(r.cpu_ms_per_job for r in ok),
        peak_rss_mb=max(r.peak_rss_mb for r in ok),
        succeeded=min(r.succeeded for r in runs),
        status_per_job=statistics.median(calls) if calls else None,
        note=f"median of {len(runs)} runs (CPU ms/job {cpus}); {middle.note}",
        broken=any(r.broken for r in runs),
    )


def table(title: str, rows: list[Row], reference_name: str) -> Table:
    t = Table(title=title, title_justify="left")
    for header in ("client", "wall (s)", "makespan (s)", f"makespan/{reference_name}"):
        t.add_column(header, justify="left" if header == "client" else "right")
    for header in ("CPU ms per job", "peak RSS MB", "status calls/job", "succeeded", "simulator requests"):
        t.add_column(header, justify="right" if header != "simulator requests" else "left")
    for r in rows:
        t.add_row(
            r.client,
            f"{r.wall:.1f}",
            f"{r.makespan:.1f}",
            f"{r.makespan / r.reference:.2f}× ({r.reference:.1f} s)" if r.reference > 0 else "–",
            f"{r.cpu_ms_per_job:.1f}",
            f"{r.peak_rss_mb:.0f}",
            "–" if r.status_per_job is None else f"{r.status_per_job:.1f}",
            f"{r.succeeded}/{r.jobs}",
            r.note,
        )
    return t


def scenario(
    name: str,
    title: str,
    reference_name: str,
    *,
    jobs: int,
    concurrency: int,
    latency: float,
    sigma: float,
    seed: int,
    fast_row: bool,
    distributed: bool,
    opts: WanbatchOptions,
    unpinned_row: bool = False,
) -> bool:
    """Measure every row of one scenario and print its table; False when a row broke."""
    ideal = None if sigma > 0 else math.ceil(jobs / concurrency) * latency
    profiles: list[tuple[str, Path]] = []

    def embedded(
        label: str, fast: bool, row_opts: WanbatchOptions = opts
    ) -> tuple[str, Callable[[int], Measured]]:
        profile = _profile_path(row_opts, f"{name} {label}")
        if profile is not None:
            profiles.append((label, profile))
            label += ", profiled"
        return label, lambda n: run_wanbatch(sim, tmp, n, row_opts, fast, profile)

    # No split of profiled rows: py-spy's CPU is in their figures, and a second run would
    # overwrite their stacks.
    small = opts.startup_jobs if 0 < opts.startup_jobs < jobs and opts.profile_dir is None else 0
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as raw:
        tmp = Path(raw)
        sim = start_simulator(tmp, concurrency, latency, sigma, seed)
        try:
            clients = [embedded("wanbatch run (defaults)", fast=False)]
            if fast_row:
                clients.append(embedded("wanbatch run (tick 0.1, poll 0.1)", fast=True))
            if unpinned_row:  # the same run with its threads wherever the kernel puts them
                unpinned = replace(opts, extra_env={**opts.extra_env, "WANBATCH_CPU_AFFINITY": "off"})
                clients.append(embedded("wanbatch run (CPU affinity off)", fast=False, row_opts=unpinned))
            if distributed:
                clients.append(
                    (
                        f"wanbatch, {opts.workers} distributed workers",
                        lambda n: run_distributed(sim, tmp, n, opts),
                    )
                )
            clients.append(
                (
                    "handwritten (fal_client + Semaphore)",
                    lambda n: run_handwritten(sim, tmp, n, concurrency),
                )
            )
            runs: dict[str, list[Row]] = {label: [] for label, _ in clients}
            small_runs: dict[str, list[Row]] = {label: [] for label, _ in clients}
            for _ in range(opts.repeat):  # the clients take turns: a drift of the host hits all
                for label, run in clients:
                    runs[label].append(measure(label, sim, partial(run, jobs), jobs, concurrency, ideal))
                    if small:
                        small_ideal = None if ideal is None else math.ceil(small / concurrency) * latency
                        small_runs[label].append(
                            measure(
                                f"{label} ({small} jobs)",
                                sim,
                                partial(run, small),
                                small,
                                concurrency,
                                small_ideal,
                            )
                        )
            rows = [median_row(runs[label]) for label, _ in clients]
        finally:
            sim.stop()
    t = table(title, rows, reference_name)
    notes = []
    if opts.extra_env:
        notes.append("every wanbatch row with " + " ".join(f"{k}={v}" for k, v in opts.extra_env.items()))
    if profiles:
        notes.append("profiled rows ran under py-spy: do not report their figures")
    t.caption = escape("; ".join(notes)) if notes else None
    print_table(t)
    if small:
        print_table(split_table(name, jobs, small, runs, small_runs))
    for label, profile in profiles:
        if profile.exists():
            print_table(top_table(profile, f"{name}: {label}, top 25 by inclusive share"))
        else:
            print(f"no profile written for {label} ({profile})", file=sys.stderr)
    return not any(r.broken for r in rows)


def split_cost(
    jobs: int, cpu_ms_per_job: float, small: int, small_cpu_ms_per_job: float
) -> tuple[float, float]:
    """A client's CPU as start-up plus a cost per job: (start-up seconds, ms per further job).

    From two runs of different sizes (``jobs`` and ``small`` jobs, the CPU per job of each): the
    per-job cost is the slope between them, the start-up what the small run cost beyond it.
    "CPU per job" at one size mixes the two; a client that starts heavier and then costs less per
    job is ahead on large batches only, and this says from which size on.
    """
    total, small_total = jobs * cpu_ms_per_job / 1000, small * small_cpu_ms_per_job / 1000
    per_job_ms = (total - small_total) / (jobs - small) * 1000
    return small_total - small * per_job_ms / 1000, per_job_ms


def split_table(
    name: str, jobs: int, small: int, runs: dict[str, list[Row]], small_runs: dict[str, list[Row]]
) -> Table:
    """Each client's start-up CPU and CPU per further job (medians over the repeats)."""
    t = Table(
        title=f"{name}: CPU as start-up + per job, from runs of {small} and {jobs} jobs (medians)",
        title_justify="left",
    )
    for header in ("client", "start-up CPU (s)", "CPU ms per further job", f"CPU ms per job at {jobs}"):
        t.add_column(header, justify="left" if header == "client" else "right")
    for label, big in runs.items():
        ok, small_ok = [r for r in big if not r.broken], [r for r in small_runs[label] if not r.broken]
        if not ok or not small_ok:
            t.add_row(label, "–", "–", "–")
            continue
        at_jobs = statistics.median(r.cpu_ms_per_job for r in ok)
        startup, per_job = split_cost(
            jobs, at_jobs, small, statistics.median(r.cpu_ms_per_job for r in small_ok)
        )
        t.add_row(label, f"{startup:.2f}", f"{per_job:.1f}", f"{at_jobs:.1f}")
    return t


def _key_value(raw: str) -> tuple[str, str]:
    key, sep, value = raw.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {raw!r}")
    return key, value


def _commit() -> str:
    """The commit measured, and whether the tree had uncommitted changes (for RESULTS.md)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {head}" + (" + uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=("drain", "tail", "all"), default="all")
    p.add_argument("--jobs", type=int, default=400, help="jobs in the drain scenario")
    p.add_argument("--concurrency", type=int, default=8, help="the account's concurrency at the simulator")
    p.add_argument("--latency", type=float, default=0.5, help="model time in the drain scenario (s)")
    p.add_argument("--tail-jobs", type=int, default=120)
    p.add_argument("--tail-median", type=float, default=2.0)
    p.add_argument("--tail-sigma", type=float, default=0.6)
    p.add_argument("--no-fast-row", action="store_true", help="skip the tick 0.1 / poll 0.1 wanbatch row")
    p.add_argument("--no-distributed", action="store_true", help="skip the distributed wanbatch row")
    p.add_argument(
        "--unpinned-row",
        action="store_true",
        help="add an embedded row with WANBATCH_CPU_AFFINITY=off (its threads spread over the CPUs), "
        "to measure what sharing one CPU saves",
    )
    p.add_argument(
        "--wanbatch-env",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra setting for every wanbatch process of every row (repeatable)",
    )
    p.add_argument("--workers", type=int, default=2, help="wanbatch workers in the distributed row")
    p.add_argument(
        "--worker-concurrency",
        type=int,
        default=None,
        help="wanbatch worker --concurrency (default: its own)",
    )
    p.add_argument(
        "--database-url",
        default=WanbatchOptions.database_url,
        help="PostgreSQL server for the distributed row (a database is created there and dropped)",
    )
    p.add_argument(
        "--redis-url",
        default=WanbatchOptions.redis_url,
        help="Redis server without a DB number (an empty DB 1..15 is claimed and flushed afterwards)",
    )
    p.add_argument(
        "--timeout", type=float, default=WanbatchOptions.timeout, help="seconds the distributed row may take"
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run the embedded wanbatch rows under py-spy (stacks to DIR) and print their hot spots; "
        "profiled figures are not to be reported",
    )
    p.add_argument("--seed", type=int, default=11)
    p.add_argument(
        "--repeat", type=int, default=1, help="run every row N times (clients taking turns); medians shown"
    )
    p.add_argument(
        "--startup-jobs",
        type=int,
        default=0,
        metavar="K",
        help="also run every row with K jobs, and show each client's start-up CPU and its CPU per "
        "further job (the slope between the two sizes)",
    )
    p.add_argument("--serve-sim", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--sigma", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_sim is not None:
        _serve_simulator(args.serve_sim, args.concurrency, args.latency, args.sigma, args.seed)
        return 0
    # `timeout`/kill: unwind through the finally blocks, so workers, database and Redis DB go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    opts = WanbatchOptions(
        extra_env=dict(args.wanbatch_env),
        database_url=args.database_url,
        redis_url=args.redis_url,
        workers=args.workers,
        worker_concurrency=args.worker_concurrency,
        timeout=args.timeout,
        profile_dir=args.profile.resolve() if args.profile else None,
        repeat=max(1, args.repeat),
        startup_jobs=max(0, args.startup_jobs),
    )
    common: dict[str, Any] = {
        "concurrency": args.concurrency,
        "seed": args.seed,
        "fast_row": not args.no_fast_row,
        "distributed": not args.no_distributed,
        "opts": opts,
        "unpinned_row": args.unpinned_row,
    }
    byte_compile()  # as installed: no wanbatch process compiles its modules from source
    print(f"{today()} · {machine_summary()} · {_commit()}")
    ok = True
    if args.scenario in ("drain", "all"):
        ok &= scenario(
            "drain",
            f"drain: {args.jobs} jobs, concurrency {args.concurrency}, model time {args.latency} s "
            f"(ideal = ceil(N/C) × L)",
            "ideal",
            jobs=args.jobs,
            latency=args.latency,
            sigma=0.0,
            **common,
        )
    if args.scenario in ("tail", "all"):
        ok &= scenario(
            "tail",
            f"tail: {args.tail_jobs} jobs, concurrency {args.concurrency}, lognormal model time "
            f"(median {args.tail_median} s, σ {args.tail_sigma})",
            "zero-overhead",
            jobs=args.tail_jobs,
            latency=args.tail_median,
            sigma=args.tail_sigma,
            **common,
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
