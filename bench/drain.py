"""Drain benchmark (issue #11): wanbatch embedded vs. the hand-written fal-client script.

Both clients drain the same job list against the same simulator, which runs over TLS in its
**own process** (so the clients' CPU is measured apart from fal's side). Each client runs in a
child process reaped with ``os.wait4``, which gives that child's own user+sys CPU time and peak
RSS (its own children included). The simulator's ledger gives the makespan (first accepted
submit → last completed run) and the recorded run times; a counting wrapper around the
simulator's ASGI app (bench-only, inside the simulator process) counts status calls.

Scenario ``drain``: N jobs, fixed model time L, account concurrency C: ideal = ceil(N/C) × L.
Scenario ``tail``: lognormal model times (median 2 s, σ 0.6): the reference is the makespan of
a zero-overhead client that keeps the C slots busy in submission order, computed from the run
times the simulator recorded in that very run.

    python -m bench.drain                          # both scenarios, issue #11's defaults
    python -m bench.drain --jobs 80 --scenario drain
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

from bench._common import ROOT, machine_summary, print_table, today

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


def _items(jobs: int) -> list[dict[str, Any]]:
    return [{"prompt": f"bench drain {i}", "seed": 1000 + i} for i in range(jobs)]


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


def run_wanbatch(
    sim: Simulator, tmp: Path, jobs: int, concurrency: int, fast: bool
) -> tuple[float, float, float, int]:
    """``wanbatch run`` on a fresh SQLite database; (wall, cpu s, rss MB, succeeded)."""
    work = Path(tempfile.mkdtemp(prefix="wanbatch-", dir=tmp))
    with (work / "items.jsonl").open("w") as f:
        for item in _items(jobs):
            f.write(json.dumps(item) + "\n")
    manifest = work / "manifest.yaml"
    manifest.write_text(
        f"name: bench-drain\nendpoint: {ENDPOINT}\n"
        'defaults:\n  resolution: 480p\n  aspect_ratio: "16:9"\n'
        "items_from: items.jsonl\nbudget:\n  max_usd: 100000\n"
    )
    env = {
        **os.environ,
        "FAL_KEY": KEY,
        "SSL_CERT_FILE": sim.ca_file,
        "WANBATCH_FAL_QUEUE_URL": sim.url,
        "WANBATCH_FAL_REST_URL": sim.url,
        "WANBATCH_DATABASE_URL": f"sqlite:///{work / 'wanbatch.db'}",
        "WANBATCH_OUTPUT_DIR": str(work / "outputs"),
        "WANBATCH_MAX_OUTSTANDING": str(concurrency),
        "WANBATCH_SUBMIT_RATE": "50",
    }
    if fast:
        env |= {"WANBATCH_TICK_INTERVAL": "0.1", "WANBATCH_POLL_MIN_INTERVAL": "0.1"}
    argv = [sys.executable, "-c", "import cli; cli.main()", "run", str(manifest), "--no-progress"]
    wall, cpu, rss, code, _ = _run_child(argv, env, work / "stderr.log")
    if code != 0:
        print(f"wanbatch run exited {code}; see {work / 'stderr.log'}", file=sys.stderr)
    succeeded = len(list((work / "outputs").rglob("*.mp4")))
    return wall, cpu, rss, succeeded


def run_handwritten(
    sim: Simulator, tmp: Path, jobs: int, concurrency: int
) -> tuple[float, float, float, int]:
    """``bench/handwritten.py`` routed to the simulator through fal_client's env vars."""
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
    argv.append(str(concurrency))
    wall, cpu, rss, code, out = _run_child(argv, env, work / "stderr.log")
    succeeded = 0
    if code == 0 and out.strip():
        succeeded = int(json.loads(out.strip().splitlines()[-1])["succeeded"])
    else:
        print(f"handwritten.py exited {code}; see {work / 'stderr.log'}", file=sys.stderr)
    return wall, cpu, rss, succeeded


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
    run: Callable[[], tuple[float, float, float, int]],
    jobs: int,
    concurrency: int,
    ideal: float | None,
) -> Row:
    sim.reset()
    print(f"running {name} …", file=sys.stderr, flush=True)
    wall, cpu, rss, succeeded = run()
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
        note=note,
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
            f"{r.makespan / r.reference:.2f}× ({r.reference:.1f} s)",
            f"{r.cpu_ms_per_job:.1f}",
            f"{r.peak_rss_mb:.0f}",
            "–" if r.status_per_job is None else f"{r.status_per_job:.1f}",
            f"{r.succeeded}/{r.jobs}",
            r.note,
        )
    return t


def scenario(
    title: str,
    reference_name: str,
    *,
    jobs: int,
    concurrency: int,
    latency: float,
    sigma: float,
    seed: int,
    fast_row: bool,
) -> None:
    ideal = None if sigma > 0 else math.ceil(jobs / concurrency) * latency
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as raw:
        tmp = Path(raw)
        sim = start_simulator(tmp, concurrency, latency, sigma, seed)
        try:
            rows = [
                measure(
                    "wanbatch run (defaults)",
                    sim,
                    lambda: run_wanbatch(sim, tmp, jobs, concurrency, fast=False),
                    jobs,
                    concurrency,
                    ideal,
                )
            ]
            if fast_row:
                rows.append(
                    measure(
                        "wanbatch run (tick 0.1, poll 0.1)",
                        sim,
                        lambda: run_wanbatch(sim, tmp, jobs, concurrency, fast=True),
                        jobs,
                        concurrency,
                        ideal,
                    )
                )
            rows.append(
                measure(
                    "handwritten (fal_client + Semaphore)",
                    sim,
                    lambda: run_handwritten(sim, tmp, jobs, concurrency),
                    jobs,
                    concurrency,
                    ideal,
                )
            )
        finally:
            sim.stop()
    print_table(table(title, rows, reference_name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=("drain", "tail", "all"), default="all")
    p.add_argument("--jobs", type=int, default=400, help="jobs in the drain scenario")
    p.add_argument("--concurrency", type=int, default=8, help="account concurrency (and wanbatch's cap)")
    p.add_argument("--latency", type=float, default=0.5, help="model time in the drain scenario (s)")
    p.add_argument("--tail-jobs", type=int, default=120)
    p.add_argument("--tail-median", type=float, default=2.0)
    p.add_argument("--tail-sigma", type=float, default=0.6)
    p.add_argument("--no-fast-row", action="store_true", help="skip the tick 0.1 / poll 0.1 wanbatch row")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--serve-sim", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--sigma", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_sim is not None:
        _serve_simulator(args.serve_sim, args.concurrency, args.latency, args.sigma, args.seed)
        return 0
    print(f"{today()} · {machine_summary()}")
    if args.scenario in ("drain", "all"):
        scenario(
            f"drain: {args.jobs} jobs, concurrency {args.concurrency}, model time {args.latency} s "
            f"(ideal = ceil(N/C) × L)",
            "ideal",
            jobs=args.jobs,
            concurrency=args.concurrency,
            latency=args.latency,
            sigma=0.0,
            seed=args.seed,
            fast_row=not args.no_fast_row,
        )
    if args.scenario in ("tail", "all"):
        scenario(
            f"tail: {args.tail_jobs} jobs, concurrency {args.concurrency}, lognormal model time "
            f"(median {args.tail_median} s, σ {args.tail_sigma})",
            "zero-overhead",
            jobs=args.tail_jobs,
            concurrency=args.concurrency,
            latency=args.tail_median,
            sigma=args.tail_sigma,
            seed=args.seed,
            fast_row=not args.no_fast_row,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
