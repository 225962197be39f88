"""Issue #6 done-when: global limits hold across 4 real ``wanbatch worker`` processes.

Real PostgreSQL (fresh database), real Redis (broker and, by default, the limiter), four
worker processes, and the simulator whose ledger is the outside witness. Rate 5 submits/s,
cap 6 outstanding, 60 jobs of fixed model latency:

* no 1-second window (sliding, as fal would count) holds more than 5 accepted submits, and
  fal never holds more than 6 requests at once;
* with ``kill -9`` of one worker mid-run (lease 3 s), every job still ends (at most the
  victim's concurrency of them with an unknown submission outcome), the limits still hold, and
  once the lease is over submits go on at the limiter's pace: a dead worker's slots come back
  when its lease expires, and nothing starves. Judged by the median gap between submits, not
  by a wall-clock bound on the run: on two cores shared with the rest of the suite a stall of
  the witness (the simulator, in this process) is no fault of the limiter's.

How close a run comes to what the limits allow is a throughput figure, measured by
``python -m bench.distributed`` (its wall / ideal ratios), not asserted here. Worker helpers
come from ``bench/distributed.py`` (the issue #4 scenario).
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from bench.distributed import (
    TERMINAL,
    Scenario,
    batch_status,
    claimed_redis_db,
    environment,
    run_cli,
    start_workers,
    stop_processes,
    tail,
    write_manifest,
)
from falsim.ledger import EntryRecord, LedgerReport
from falsim.options import SimulatorOptions
from falsim.server import running_simulator
from jobs.batches import BatchReport
from jobs.models import EVERY_BATCH
from jobs.processes import owner_prefix
from tests.integration.sim_helpers import AUTH, png_data_uri, wait_completed
from tests.sample_inputs import INPUTS
from tests.sliding_window import max_in_window

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

RATE = 5.0
#: Grant → fal-receipt jitter the limiter leaves room for (``WANBATCH_SUBMIT_JITTER_ALLOWANCE``).
#: Here the witness (the simulator, rendering real videos in this test process), four workers,
#: PostgreSQL and Redis share two cores and one disk. Between its grant and its POST a submit
#: commits its lease to PostgreSQL (before the POST on purpose: a worker that dies while waiting
#: for a token must leave a job plainly "not sent"). Measured per submit (session 15): grant →
#: POST 2–12 ms and POST → receipt 1–17 ms under two CPU hogs, but grant → POST up to 45 ms with
#: a concurrent fsync loop, and in full-suite runs (PostgreSQL checkpointing other tests'
#: databases) one submit reached the witness ≥ 150 ms later than the next five: 6 receipts in
#: one second from grants 0.23 s apart (2 failures in 5 full runs at 0.15). A spread the
#: limiter cannot see is what the allowance is for; 0.3 left 69 ms per interval, ~350 ms over a
#: window. Since the suite runs in several processes (``pytest -n 4``), other tests' processes share
#: the two cores too: one run saw receipts 1.47 s apart, then 25 ms (6 in a second at 0.3). 0.5
#: leaves 100 ms per interval, ~500 ms over a window. The limiter's own spacing (Redis' clock) is
#: checked exactly in test_limits.py.
JITTER = 0.5
EFFECTIVE_RATE = RATE / (1 + JITTER)
CAP = 6
#: How long past ``kill_after`` the killer waits for the victim to hold a lease.
KILL_WAIT = 10.0
JOBS = 60
LATENCY = 0.5
SCENARIO = Scenario(
    jobs=JOBS,
    workers=4,
    concurrency=2,
    cap=CAP,
    latency=LATENCY,
    sim_concurrency=CAP + 2,  # fal's own limit above ours: our cap is what binds
    submit_rate=RATE,
    tick_interval=0.1,
    poll_min_interval=0.1,
    timeout=120.0,
)


def allowed_seconds(
    jobs: int = JOBS, rate: float = EFFECTIVE_RATE, cap: int = CAP, latency: float = LATENCY
) -> float:
    """The shortest first-submit → last-completion span the limits permit."""
    return max((jobs - 1) / rate, math.ceil(jobs / cap) * latency) + latency


def allowed_span(durations: list[float], rate: float = EFFECTIVE_RATE, cap: int = CAP) -> float:
    """The shortest first-submit → last-completion span the limits permit, given how long fal
    took for each request (in submission order): submit each as soon as both the rate and a
    free slot allow. On a loaded CI box the simulator's requests take longer than its nominal
    latency (it renders real videos), so the bound uses what they actually took."""
    starts: list[float] = []
    ends: list[float] = []
    for i, duration in enumerate(durations):
        t = 0.0 if i == 0 else starts[-1] + 1 / rate
        if i >= cap:
            t = max(t, sorted(ends)[i - cap])  # the (i-cap+1)-th completion frees a slot
        starts.append(t)
        ends.append(t + duration)
    return max(ends) - starts[0]


def completed_at(entry: EntryRecord) -> float:
    """When fal completed the request (every request of a finished run has completed)."""
    done = entry["completed_at"]
    assert done is not None, f"request {entry['request_id']} never completed at fal"
    return done


def max_outstanding(entries: list[EntryRecord]) -> int:
    """Most requests fal held at once, from the ledger's accept/complete times."""
    events = sorted(
        [(e["accepted_at"], 1) for e in entries]
        + [(done, -1) for e in entries if (done := e["completed_at"])],
        key=lambda ev: (ev[0], ev[1]),  # a completion at the same instant frees its slot first
    )
    held = best = 0
    for _, delta in events:
        held += delta
        best = max(best, held)
    return best


def _warm_up(url: str) -> None:
    """One request per endpoint first, so the simulator's own cold start (rendering the first
    videos of each geometry, in this process) does not stall its accept loop during the run and
    bunch the acceptance times it records — that would measure the simulator, not the limiter."""
    with httpx.Client(headers=AUTH, timeout=30) as client:
        for endpoint, body in INPUTS.items():
            payload = {k: (png_data_uri() if k.endswith("image_url") else v) for k, v in body.items()}
            resp = client.post(f"{url}/{endpoint}", json=payload)
            assert resp.status_code == 200, resp.text
            wait_completed(client, resp.json()["status_url"], timeout=30)


def _counts(engine: Engine, batch_id: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT state, count(*) FROM jobs WHERE batch_id = :b GROUP BY state"), {"b": batch_id}
        )
        return {str(state): int(n) for state, n in rows}


def _held_by(engine: Engine, pid: int) -> list[str]:
    """The states of the jobs a process of ``pid`` holds leases on (``host:pid:thread``)."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT state, lease_owner FROM jobs WHERE lease_owner IS NOT NULL"))
        return [
            str(state) for state, owner in rows if owner_prefix(owner) == f"{socket.gethostname()}:{pid}:"
        ]


def _wait_ready(procs: list[subprocess.Popen[bytes]], logs: Path, engine: Engine) -> None:
    """Until every worker said Celery's "ready." and one leads the ticks (its every-batch
    heartbeat, written at its first tick); a worker that exits fails the test with its log."""
    deadline = time.monotonic() + 120
    while True:
        for n, p in enumerate(procs):
            assert p.poll() is None, tail(logs / f"worker-{n}.log")
        ready = all(
            " ready." in (logs / f"worker-{n}.log").read_text(errors="replace") for n in range(len(procs))
        )
        if ready:
            with engine.connect() as conn:
                beats = conn.execute(
                    text("SELECT count(*) FROM conductor_heartbeats WHERE scope = :every"),
                    {"every": EVERY_BATCH},
                ).scalar_one()
            if beats:
                return
        assert time.monotonic() < deadline, "the workers never got ready:\n" + tail(logs / "worker-0.log")
        time.sleep(0.1)


@dataclass
class Run:
    report: BatchReport
    ledger: LedgerReport
    span: float
    killed_at: float | None
    #: The states of the jobs the killed worker held leases on when it was killed.
    victim_held: list[str]


def _run(
    workdir: Path,
    database_url: str,
    broker_url: str,
    *,
    kill_after: float | None = None,
    lease: float = 120.0,
) -> Run:
    out, logs = workdir / "outputs", workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(workdir, SCENARIO.jobs, name="limits")
    options = SimulatorOptions(
        concurrency_limit=SCENARIO.sim_concurrency, latency_seconds=LATENCY, latency_jitter=0.0
    )
    with running_simulator(options) as sim:
        _warm_up(sim.url)
        sim.reset()  # a fresh ledger: only the run is measured
        env = environment(SCENARIO, database_url, broker_url, sim.url, out)
        env.update(
            WANBATCH_LEASE_SECONDS=str(lease),
            WANBATCH_SUBMIT_JITTER_ALLOWANCE=str(JITTER),
            WANBATCH_POLL_MAX_INTERVAL="0.2",
            WANBATCH_POLL_MIN_INTERVAL="0.05",
            WANBATCH_TICK_INTERVAL="0.05",
        )
        procs = start_workers(SCENARIO, env, workdir, logs)
        killed_at: float | None = None
        engine = create_engine(database_url, poolclass=NullPool)
        try:
            _wait_ready(procs, logs, engine)  # workers up (the tick leader elected) before any job exists
            batch_id = str(run_cli(["submit", str(manifest), "--json"], env, workdir)["batch"])
            started = time.monotonic()
            held: list[str] = []
            while time.monotonic() - started < SCENARIO.timeout:
                if kill_after is not None and killed_at is None and time.monotonic() - started > kill_after:
                    # Mid-task: once the victim holds a job's lease (its tasks last milliseconds:
                    # a kill at a random moment mostly found it holding nothing, and tested no
                    # lease); past KILL_WAIT seconds more, whatever it holds.
                    victim = procs[1]
                    held = _held_by(engine, victim.pid)
                    if held or time.monotonic() - started > kill_after + KILL_WAIT:
                        os.killpg(victim.pid, signal.SIGKILL)  # the worker and its pool children
                        killed_at = time.time()
                    else:
                        time.sleep(0.005)
                        continue
                counts = _counts(engine, batch_id)  # one cheap query: no CPU taken from the run
                if sum(counts.get(s, 0) for s in TERMINAL) == JOBS:
                    break
                time.sleep(0.3)
            else:
                raise AssertionError(f"not finished in {SCENARIO.timeout}s: {counts}")
        finally:
            stop_processes(procs)
            engine.dispose()
        report = batch_status(batch_id, env, workdir)
        ledger = sim.ledger()
    entries = ledger["entries"]
    span = max(completed_at(e) for e in entries) - min(e["accepted_at"] for e in entries)
    return Run(report, ledger, span, killed_at, held)


@pytest.fixture
def broker(redis_url: str) -> Iterator[str]:
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as url:
        yield url


def _durations(run: Run) -> list[float]:
    entries = sorted(run.ledger["entries"], key=lambda e: e["accepted_at"])
    return [completed_at(e) - e["accepted_at"] for e in entries]


def _check_limits(run: Run, *, rate_window: float = 1.0, ambiguous_allowed: int = 0) -> None:
    """The limits held, as the simulator saw them; the rate over any ``rate_window`` seconds.

    Every job succeeded, but ``ambiguous_allowed``: submits a killed worker left between
    recording its lease and recording fal's answer. Nothing can tell whether fal has those
    (no webhook receiver here), so ``WANBATCH_SUBMIT_UNKNOWN_POLICY=fail`` ends them failed, as
    documented; the victim held at most its concurrency of them.
    """
    entries = run.ledger["entries"]
    accepted = [e["accepted_at"] for e in entries]
    gaps = [round(b - a, 3) for a, b in zip(sorted(accepted), sorted(accepted)[1:], strict=False)]
    assert max_in_window(accepted, rate_window) <= RATE * rate_window, gaps
    if rate_window == 1.0:
        assert run.ledger["max_submits_per_second"] <= RATE
    assert run.ledger["max_outstanding"] <= CAP
    assert max_outstanding(entries) <= CAP
    counts, failures = run.report["counts"], run.report["failures"]
    unknown = sum(f["count"] for f in failures if f["error_type"] == "submit_unknown")
    assert counts["succeeded"] + unknown == JOBS, (counts, failures)
    assert unknown <= ambiguous_allowed, failures
    assert run.ledger["duplicates"] == []


@pytest.fixture(scope="module")
def normal_run(
    new_pg_database: Callable[[], str], redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Run:
    """One run without faults, shared by the assertions below (it is the expensive part)."""
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as url:
        run = _run(tmp_path_factory.mktemp("limits"), new_pg_database(), url)
    accepted = [e["accepted_at"] for e in run.ledger["entries"]]
    bound = allowed_span(_durations(run))
    print(
        f"\nlimits run: span {run.span:.2f}s vs allowed {bound:.2f}s (ratio {run.span / bound:.3f}; "
        f"nominal {allowed_seconds():.2f}s); achieved {(JOBS - 1) / (max(accepted) - min(accepted)):.2f} "
        f"submits/s; max outstanding at fal {run.ledger['max_outstanding']}; "
        f"max in any 1 s window {max_in_window(accepted)}"
    )
    return run


def test_rate_and_cap_hold_across_four_workers(normal_run: Run) -> None:
    _check_limits(normal_run)
    assert normal_run.ledger["accepted"] == JOBS


def test_a_killed_worker_does_not_cost_throughput_after_its_lease(
    new_pg_database: Callable[[], str], broker: str, tmp_path: Path
) -> None:
    lease = 3.0
    run = _run(tmp_path, new_pg_database(), broker, kill_after=4.0, lease=lease)
    assert run.killed_at is not None
    bound = allowed_span(_durations(run))
    after = sorted(
        e["accepted_at"] for e in run.ledger["entries"] if e["accepted_at"] > run.killed_at + lease
    )
    gaps = [b - a for a, b in itertools.pairwise(after)]
    print(
        f"\nkill run: the victim held {run.victim_held or 'nothing'}; "
        f"span {run.span:.2f}s vs allowed {bound:.2f}s + lease {lease:.0f}s; "
        f"median gap after the lease {statistics.median(gaps) if gaps else math.inf:.3f}s "
        f"(the limiter's {1 / EFFECTIVE_RATE:.3f}s) over {len(after)} submits"
    )
    # The rate over 2 s windows, not 1 s: the witness (the simulator, in this test process)
    # timestamps a request when its event loop gets to it, and while the killed worker's jobs
    # come back it shares two cores with four processes, PostgreSQL and Redis. CI once saw 7
    # receipts within 1 s here: submits granted 0.23 s apart (the limiter's interval) that
    # reached the loop together. The 1-s bound is checked on the undisturbed run above; a
    # limiter that let two workers through at once would break the 2-s bound all the same.
    _check_limits(run, rate_window=2.0, ambiguous_allowed=SCENARIO.concurrency)
    # Full speed again once the lease is over: most submits follow each other at the limiter's
    # pace. The median gap, as tests/integration/test_limits.py judges a limiter: a moment in
    # which every process was starved moves a few gaps, not the median; a run that lost its
    # tick leader, or dispatched only as leases ran out, moves them all.
    assert len(after) >= JOBS // 3, (len(after), run.killed_at)
    assert statistics.median(gaps) <= 1.5 / EFFECTIVE_RATE, gaps
