"""Benchmark (issue #4): a batch processed by several ``wanbatch worker`` processes.

The scenario, shared with ``tests/integration/test_distributed.py``:

* a fresh PostgreSQL database and a Redis database of its own (a free DB number, claimed with a
  key and flushed afterwards), so runs in parallel never share a broker queue;
* the bundled fal simulator in this process, with a fixed model time (``--latency``, no jitter)
  and an account concurrency above the cap, so the cap — not fal's queue — is what limits;
* a manifest of ``--jobs`` jobs over all five endpoints (cheapest resolutions, local images,
  some seeds pinned), stored with the real ``wanbatch submit``;
* ``--workers`` real ``wanbatch worker`` processes (the worker's default Celery pool, threads, or
  ``--pool prefork``; ``--concurrency`` each) under
  ``WANBATCH_MAX_OUTSTANDING=--cap``, until ``status`` shows every job terminal.

Figures: wall time from the workers' start (their boot included) and the busy span (first
``submitting`` to last terminal event in the database, boot excluded), against the ideal
``ceil(N / cap) × model time``; status calls per job, counted by wrapping the simulator's ASGI
app (its ledger does not count them); the simulator ledger's accepted submits, duplicates
(the same input accepted twice) and the most requests it ever saw outstanding at once.

Run from the repository root::

    python -m bench.distributed                         # 200 jobs, 2 workers, cap 6, 0.2 s
    python -m bench.distributed --jobs 1000 --workers 3 --cap 20 --latency 1

Exit status 0 when every job succeeded with no duplicate and the cap held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import redis
import yaml
from sqlalchemy import select
from starlette.types import ASGIApp, Receive, Scope, Send

from bench._common import ROOT, byte_compile, fresh_pg_database, machine_summary, print_table, today

if TYPE_CHECKING:
    from falsim.ledger import LedgerReport
    from falsim.server import SimulatorHandle
    from jobs.batches import BatchReport

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
IMAGES = ROOT / "manifests" / "examples" / "images"
TERMINAL = ("succeeded", "failed", "cancelled")
#: The events that show who did what: the leader's tick dispatches (submitting) and notices
#: completion (downloading); submit tasks record ``queued``, download tasks ``succeeded``.
STEP_NAMES = ("submitting", "queued", "downloading", "succeeded")
#: Marks a Redis DB as taken by one run (so two runs never pick the same broker DB).
CLAIM_KEY = "wanbatch-bench:claim"


@dataclass(frozen=True)
class Scenario:
    """The knobs of one run. Defaults are issue #4's test: 200 jobs, 2 workers × 2, cap 6."""

    jobs: int = 200
    workers: int = 2
    concurrency: int = 2
    #: ``wanbatch worker --pool`` (None: the worker's default).
    pool: str | None = None
    cap: int = 6
    latency: float = 0.2
    #: fal's account limit in the simulator: above the cap, so wanbatch's cap is what binds.
    sim_concurrency: int = 8
    submit_rate: float = 50.0
    tick_interval: float = 0.1
    poll_min_interval: float = 0.1
    timeout: float = 240.0


@dataclass
class Outcome:
    """Everything a run observed; the test asserts on it, the benchmark prints it."""

    scenario: Scenario
    batch_id: str
    database_url: str
    output_dir: Path
    report: BatchReport
    ledger: LedgerReport
    requests: Counter[str]
    wall_seconds: float
    busy_seconds: float
    #: Median seconds of each step of a job's life (see ``STEPS``).
    step_seconds: dict[str, float]
    worker_logs: list[Path]
    #: pid of the process behind each JobEvent (from ``host:pid:thread``) -> events by state.
    events_by_pid: dict[str, Counter[str]] = field(default_factory=dict)
    worker_exit_codes: list[int | None] = field(default_factory=list)
    #: pid -> index of the ``wanbatch worker`` (0..workers-1) it belongs to, pool children included.
    worker_of_pid: dict[str, int] = field(default_factory=dict)

    def work_by_worker(self) -> dict[int, Counter[str]]:
        """JobEvent counts by state, per ``wanbatch worker`` (its main process and pool children)."""
        out: dict[int, Counter[str]] = {}
        for pid, counts in self.events_by_pid.items():
            index = self.worker_of_pid.get(pid)
            if index is not None:
                out.setdefault(index, Counter()).update(counts)
        return out

    @property
    def ideal_seconds(self) -> float:
        """Model time × the number of waves the cap allows: the floor of any scheduler."""
        return math.ceil(self.scenario.jobs / self.scenario.cap) * self.scenario.latency

    @property
    def status_calls(self) -> int:
        return self.requests["status"] + self.requests["status_stream"]


# --------------------------------------------------------------------------- services


@contextlib.contextmanager
def claimed_redis_db(base_url: str = DEFAULT_REDIS_URL) -> Iterator[str]:
    """A broker URL on an empty Redis DB (1..15) claimed for this run; flushed afterwards.

    Celery's queue name is fixed ("wanbatch"), so isolation is by DB number: a DB counts as free
    when it is empty, and ``SET NX`` of a claim key makes the choice race-free between runs.
    """
    numbers = list(range(1, 16))
    secrets.SystemRandom().shuffle(numbers)
    token = uuid.uuid4().hex
    for n in numbers:
        client = redis.Redis.from_url(f"{base_url}/{n}")
        try:
            if client.dbsize() == 0 and client.set(CLAIM_KEY, token, nx=True, ex=3600):
                break
        finally:
            client.close()
    else:
        raise RuntimeError(f"no empty Redis database among 1..15 at {base_url}")
    try:
        yield f"{base_url}/{n}"
    finally:
        client = redis.Redis.from_url(f"{base_url}/{n}")
        try:
            if client.get(CLAIM_KEY) == token.encode():
                client.flushdb()
        finally:
            client.close()


def classify(method: str, path: str) -> str:
    """What kind of fal call a simulator request is (for counting status calls and the rest)."""
    if path.startswith("/_sim/"):
        return "control"
    if path.startswith("/files/") or path.startswith("/storage/"):
        return "file"
    if method == "PUT" and path.endswith("/cancel"):
        return "cancel"
    if method == "POST":
        return "submit"
    if path.rstrip("/").endswith("/status"):
        return "status"
    if path.endswith("/status/stream"):
        return "status_stream"
    if "/requests/" in path:
        return "result"
    return "other"


class RequestCounter:
    """Counts the simulator's HTTP requests by :func:`classify` kind (thread-safe)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def wrap(self, app: ASGIApp) -> ASGIApp:
        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                kind = classify(scope["method"], scope["path"])
                with self._lock:
                    self.counts[kind] += 1
            await app(scope, receive, send)

        return counted

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)


@contextlib.contextmanager
def counting_simulator(scenario: Scenario) -> Iterator[tuple[SimulatorHandle, RequestCounter]]:
    """The simulator in a thread of this process, with every request counted by kind."""
    from falsim import server
    from falsim.options import SimulatorOptions

    counter = RequestCounter()
    original = server.build_app
    options = SimulatorOptions(
        concurrency_limit=scenario.sim_concurrency, latency_seconds=scenario.latency, latency_jitter=0.0
    )
    with (
        mock.patch.object(server, "build_app", lambda *a, **k: counter.wrap(original(*a, **k))),
        server.running_simulator(options) as sim,
    ):
        yield sim, counter


# --------------------------------------------------------------------------- manifest


#: Per endpoint: the cheapest resolution and which image fields it takes.
ENDPOINTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("fal-ai/wan-i2v", "480p", ("image_url",)),
    ("fal-ai/wan-flf2v", "480p", ("start_image_url", "end_image_url")),
    ("fal-ai/wan-22", "480p", ()),
    ("fal-ai/wan-25-preview/image-to-video", "480p", ("image_url",)),
    ("wan/v2.6/image-to-video", "720p", ("image_url",)),
)


def write_manifest(folder: Path, jobs: int, name: str = "distributed") -> Path:
    """A manifest of ``jobs`` distinct jobs cycling over all five endpoints; every third seeded."""
    images = folder / "images"
    shutil.copytree(IMAGES, images, dirs_exist_ok=True)
    pictures = ["images/landscape.jpg", "images/night.jpg"]
    items: list[dict[str, str | int]] = []
    for i in range(jobs):
        endpoint, resolution, image_fields = ENDPOINTS[i % len(ENDPOINTS)]
        item: dict[str, str | int] = {
            "endpoint": endpoint,
            "prompt": f"Shot {i}: clouds drift over the hills, slow pan",
            "resolution": resolution,
        }
        for k, fname in enumerate(image_fields):
            item[fname] = pictures[(i + k) % len(pictures)]
        if i % 3 == 0:
            item["seed"] = 1000 + i
        items.append(item)
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump({"name": name, "items": items}, sort_keys=False))
    return path


# --------------------------------------------------------------------------- processes


def wanbatch_command() -> list[str]:
    """The ``wanbatch`` console script of this interpreter, or an equivalent ``python -c``."""
    script = Path(sys.executable).with_name("wanbatch")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from cli import main; main()"]


def environment(
    scenario: Scenario, database_url: str, broker_url: str, sim_url: str, out: Path
) -> dict[str, str]:
    """The environment of every wanbatch subprocess: ours minus any WANBATCH_*, plus the scenario's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_") and k != "FAL_KEY"}
    env.update(
        WANBATCH_DATABASE_URL=database_url,
        WANBATCH_BROKER_URL=broker_url,
        WANBATCH_FAL_QUEUE_URL=sim_url,
        WANBATCH_FAL_REST_URL=sim_url,
        FAL_KEY="test-key",
        WANBATCH_OUTPUT_DIR=str(out),
        WANBATCH_MAX_OUTSTANDING=str(scenario.cap),
        WANBATCH_SUBMIT_RATE=str(scenario.submit_rate),
        WANBATCH_TICK_INTERVAL=str(scenario.tick_interval),
        WANBATCH_POLL_MIN_INTERVAL=str(scenario.poll_min_interval),
        PYTHONUNBUFFERED="1",
    )
    return env


def _wanbatch_stdout(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    """Run one ``wanbatch ...`` command and return its stdout; raise with its output on failure."""
    proc = subprocess.run(
        [*wanbatch_command(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"wanbatch {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> dict[str, Any]:
    """Run one ``wanbatch ... --json`` command and return its JSON; raise with its output on failure."""
    result: dict[str, Any] = json.loads(_wanbatch_stdout(args, env, cwd, timeout))
    return result


def batch_status(batch_id: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> BatchReport:
    """``wanbatch status BATCH --json``: the contract's status object (:class:`jobs.batches.BatchReport`)."""
    report: BatchReport = json.loads(_wanbatch_stdout(["status", batch_id, "--json"], env, cwd, timeout))
    return report


def start_workers(
    scenario: Scenario, env: dict[str, str], cwd: Path, logs: Path, command: list[str] | None = None
) -> list[subprocess.Popen[bytes]]:
    """``scenario.workers`` ``wanbatch worker`` processes, each logging to ``logs/worker-N.log``;
    ``command`` runs ``wanbatch`` another way than :func:`wanbatch_command` (the arguments follow it)."""
    procs: list[subprocess.Popen[bytes]] = []
    for n in range(scenario.workers):
        with (logs / f"worker-{n}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        *(command or wanbatch_command()),
                        "worker",
                        "--concurrency",
                        str(scenario.concurrency),
                        "--loglevel",
                        "INFO",
                        *(["--pool", scenario.pool] if scenario.pool else []),
                    ],
                    env=env,
                    cwd=cwd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its prefork children get signalled with it
                )
            )
    return procs


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float = 20.0) -> list[int | None]:
    """SIGTERM (Celery's warm shutdown), then SIGKILL the process group of any still alive."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # the pool children too, if the parent left any
        if p.poll() is None:
            p.wait(timeout=10)
    return [p.returncode for p in procs]


def process_groups(leaders: list[int]) -> dict[str, int]:
    """pid -> index in ``leaders`` of every live process in those process groups (Linux ``/proc``).

    Each worker runs in a session of its own, so its Celery pool children share its group id:
    this is how an event's pid is traced back to the ``wanbatch worker`` that wrote it.
    """
    wanted = {pid: i for i, pid in enumerate(leaders)}
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pgid = int(fields[2])  # after "comm)": state, ppid, pgrp
        if pgid in wanted:
            found[entry.name] = wanted[pgid]
    return found


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _crashes(logs: list[Path]) -> str:
    """The tasks that raised, from the workers' logs (what to look at when a run goes wrong)."""
    found = [
        f"{log.name}: {line.strip()}"
        for log in logs
        for line in log.read_text(errors="replace").splitlines()
        if "raised unexpected" in line or "Traceback" in line
    ]
    return "task errors:\n" + "\n".join(found[:20]) if found else "no task errors in the worker logs"


# --------------------------------------------------------------------------- the run


def wait_terminal(
    batch_id: str,
    database_url: str,
    procs: list[subprocess.Popen[bytes]],
    logs: list[Path],
    timeout: float,
    members: dict[str, int],
) -> BatchReport:
    """Poll the database (as ``status`` does) until every job is terminal; fail fast if a worker dies.

    Meanwhile ``members`` collects the pids of the workers' process groups (see
    :func:`process_groups`), so events can be attributed to workers afterwards.
    """
    from jobs.batches import status
    from jobs.settings import Settings

    settings = Settings(database_url=database_url)
    deadline = time.monotonic() + timeout
    report: BatchReport | None = None
    while time.monotonic() < deadline:
        members.update(process_groups([p.pid for p in procs]))
        report = status(batch_id, settings)[0]
        if report["total"] and sum(report["counts"].get(s, 0) for s in TERMINAL) == report["total"]:
            return report
        if report["counts"].get("submit_unknown"):  # nothing here loses a submit: a crashed task did
            raise RuntimeError(f"a job became submit_unknown: {report['counts']}; {_crashes(logs)}")
        for p, log in zip(procs, logs, strict=True):
            if p.poll() is not None:
                raise RuntimeError(f"worker {p.pid} exited {p.returncode} early; its log:\n{tail(log)}")
        time.sleep(0.2)
    raise TimeoutError(f"jobs not terminal after {timeout:.0f}s: {report and report['counts']}")


def events_by_pid(
    database_url: str, batch_id: str
) -> tuple[dict[str, Counter[str]], float, dict[str, float]]:
    """JobEvent counts per worker pid and state, the busy span (first submit to last terminal),
    and the median seconds of each step of a job's life (where the time goes)."""
    from jobs import db
    from jobs.db import open_engine
    from jobs.models import Job, JobEvent
    from jobs.settings import Settings
    from jobs.states import JobState

    engine = open_engine(Settings(database_url=database_url))
    by_pid: dict[str, Counter[str]] = {}
    first: datetime | None = None
    last: datetime | None = None
    with db.session_scope(engine) as session:
        rows = session.execute(
            select(JobEvent.job_id, JobEvent.worker, JobEvent.to_state, JobEvent.at)
            .order_by(JobEvent.id)
            .join(Job, Job.id == JobEvent.job_id)
            .where(Job.batch_id == batch_id)
        ).all()
    stamps: dict[str, dict[str, datetime]] = {}
    for job_id, worker, state, at in rows:
        name = JobState(state).value
        stamps.setdefault(job_id, {}).setdefault(name, at)
        pid = worker.split(":")[1] if worker and worker.count(":") >= 2 else str(worker)
        by_pid.setdefault(pid, Counter())[name] += 1
        if name == "submitting" and (first is None or at < first):
            first = at
        if name in TERMINAL and (last is None or at > last):
            last = at
    busy = (last - first).total_seconds() if first is not None and last is not None else float("nan")
    return by_pid, busy, step_medians(stamps)


#: (label, from state, to state): the steps of a job's life; "queued" is fal's acceptance.
STEPS = (
    ("dispatched → accepted by fal (Celery hop + POST)", "submitting", "queued"),
    ("accepted → completion noticed (model + poll lag)", "queued", "downloading"),
    ("completion noticed → downloaded", "downloading", "succeeded"),
)


def step_medians(stamps: dict[str, dict[str, datetime]]) -> dict[str, float]:
    """Median seconds per step over the jobs that went through it (first time each state was hit)."""
    out: dict[str, float] = {}
    for label, a, b in STEPS:
        spans = [(t[b] - t[a]).total_seconds() for t in stamps.values() if a in t and b in t]
        if spans:
            out[label] = statistics.median(spans)
    return out


def run_scenario(scenario: Scenario, workdir: Path, database_url: str, broker_url: str) -> Outcome:
    """Submit a generated manifest, process it with real workers, and collect what was observed."""
    out = workdir / "outputs"
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(workdir, scenario.jobs)
    with counting_simulator(scenario) as (sim, counter):
        env = environment(scenario, database_url, broker_url, sim.url, out)
        submitted = run_cli(["submit", str(manifest), "--json"], env, workdir)
        batch_id = str(submitted["batch"])
        log_paths = [logs / f"worker-{n}.log" for n in range(scenario.workers)]
        started = time.monotonic()
        procs = start_workers(scenario, env, workdir, logs)
        members: dict[str, int] = {}
        try:
            wait_terminal(batch_id, database_url, procs, log_paths, scenario.timeout, members)
            wall = time.monotonic() - started
        finally:
            codes = stop_processes(procs)
        report = batch_status(batch_id, env, workdir)
        ledger = sim.ledger()
        requests = counter.snapshot()
    by_pid, busy, steps = events_by_pid(database_url, batch_id)
    return Outcome(
        scenario=scenario,
        batch_id=batch_id,
        database_url=database_url,
        output_dir=out,
        report=report,
        ledger=ledger,
        requests=requests,
        wall_seconds=wall,
        busy_seconds=busy,
        step_seconds=steps,
        worker_logs=log_paths,
        events_by_pid=by_pid,
        worker_exit_codes=codes,
        worker_of_pid=members,
    )


# --------------------------------------------------------------------------- reporting


def figures(o: Outcome) -> list[tuple[str, str]]:
    """The table's rows, as (figure, value) strings."""
    s = o.scenario
    counts = {k: v for k, v in o.report["counts"].items() if v}
    return [
        ("jobs", str(s.jobs)),
        ("workers × concurrency", f"{s.workers} × {s.concurrency} ({s.pool or 'default pool'})"),
        ("cap (WANBATCH_MAX_OUTSTANDING)", str(s.cap)),
        ("model latency (s)", f"{s.latency:g}"),
        ("wall time from worker start (s)", f"{o.wall_seconds:.2f}"),
        ("busy span: first submit → last terminal (s)", f"{o.busy_seconds:.2f}"),
        ("ideal ceil(N / cap) × model time (s)", f"{o.ideal_seconds:.2f}"),
        ("ratio wall / ideal", f"{o.wall_seconds / o.ideal_seconds:.2f}"),
        ("ratio busy / ideal", f"{o.busy_seconds / o.ideal_seconds:.2f}"),
        *((f"median {label} (s)", f"{v:.3f}") for label, v in o.step_seconds.items()),
        ("status calls (GET …/status)", str(o.status_calls)),
        ("status calls per job", f"{o.status_calls / s.jobs:.2f}"),
        ("result calls / file downloads", f"{o.requests['result']} / {o.requests['file']}"),
        ("accepted submits (ledger)", str(o.ledger["accepted"])),
        ("duplicates (ledger)", str(len(o.ledger["duplicates"]))),
        ("max outstanding observed (ledger)", str(o.ledger["max_outstanding"])),
        ("final states", ", ".join(f"{k}={v}" for k, v in counts.items())),
        *(
            (f"worker {i}: {', '.join(STEP_NAMES)}", " / ".join(str(c[k]) for k in STEP_NAMES))
            for i, c in sorted(o.work_by_worker().items())
        ),
        ("worker exit codes", ", ".join(str(c) for c in o.worker_exit_codes)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=Scenario.jobs)
    parser.add_argument("--workers", type=int, default=Scenario.workers)
    parser.add_argument(
        "--concurrency", type=int, default=Scenario.concurrency, help="tasks at once per worker"
    )
    parser.add_argument("--pool", default=None, help="wanbatch worker --pool (default: the worker's own)")
    parser.add_argument("--cap", type=int, default=Scenario.cap, help="WANBATCH_MAX_OUTSTANDING")
    parser.add_argument("--latency", type=float, default=Scenario.latency, help="model time per request (s)")
    parser.add_argument(
        "--sim-concurrency", type=int, default=None, help="fal account limit (default: cap + 2)"
    )
    parser.add_argument("--timeout", type=float, default=Scenario.timeout)
    parser.add_argument(
        "--database-url", default=DEFAULT_DATABASE_URL, help="server to create the database on"
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="Redis server (without a DB number)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (manifest, outputs, logs)")
    args = parser.parse_args(argv)
    byte_compile()  # wanbatch processes start as installed (see bench._common.byte_compile)
    # `timeout`/Ctrl-C: unwind through the finally blocks so the workers and database go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scenario = Scenario(
        jobs=args.jobs,
        workers=args.workers,
        concurrency=args.concurrency,
        pool=args.pool,
        cap=args.cap,
        latency=args.latency,
        sim_concurrency=args.sim_concurrency or args.cap + 2,
        timeout=args.timeout,
    )
    workdir = Path(tempfile.mkdtemp(prefix="wanbatch-bench-dist-"))
    try:
        with (
            fresh_pg_database(args.database_url, "wanbatch_dist_") as db,
            claimed_redis_db(args.redis_url) as broker,
        ):
            outcome = run_scenario(scenario, workdir, db, broker)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work folder kept: {workdir}", file=sys.stderr)
    from rich.table import Table

    table = Table(title=f"Distributed processing — {today()}, {machine_summary()}", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in figures(outcome):
        table.add_row(name, value)
    print_table(table)
    ok = (
        outcome.report["counts"].get("succeeded", 0) == scenario.jobs
        and outcome.ledger["accepted"] == scenario.jobs
        and not outcome.ledger["duplicates"]
        and outcome.ledger["max_outstanding"] <= scenario.cap
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
