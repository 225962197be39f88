"""Durability under fault injection: nothing lost, nothing paid twice (issue #5).

Each scenario runs a real batch through real ``wanbatch worker`` processes, a private Redis and
PostgreSQL (started, killed and restarted by the test) and the fal simulator, then checks the
invariants of :mod:`chaos_invariants` over the database, the simulator's ledger and the output
folder. Figures are printed (``pytest -rP`` shows them), written to ``chaos-report.json`` in the
test's folder and, with ``WANBATCH_CHAOS_REPORT=1``, appended to ``bench/RESULTS-chaos.md``.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.chaos.chaos_scenario import Context, ScenarioFindings, run

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

ALL_POINTS = "before_post:{p},after_post:{p},after_commit:{p},mid_download:{p},after_download:{p}"


def _assert_holds(findings: ScenarioFindings) -> None:
    figures = findings.figures
    assert not findings.violations, "\n".join(findings.violations[:30]) + "\n" + findings.worker_logs
    assert figures["lost"] == 0
    assert figures["stored"] == figures["jobs"]


def test_kill_9_at_every_step(tmp_path: Path) -> None:
    """≥ 300 jobs; workers die at each step (crash points) and from outside (SIGKILL of the
    whole process group every few seconds); a supervisor restarts them. Default policy ``fail``:
    an ambiguous submission is never sent again, so no job may be paid twice."""

    def kill_now_and_then(ctx: Context) -> None:
        while not ctx.sleep(ctx.rng.uniform(2.0, 4.0)):
            ctx.workers.kill_one(ctx.rng)

    findings = run(
        tmp_path,
        "kill-9",
        jobs=300,
        chaos=kill_now_and_then,
        env={"WANBATCH_CHAOS_CRASH_POINTS": ALL_POINTS.format(p=0.012)},
        timeout=200,
        seed=11,
    )
    _assert_holds(findings)
    figures = findings.figures
    assert figures["crash_point_exits"] > 0
    assert figures["external_kills"] > 0
    assert figures["duplicate_paid_submissions"] == 0
    assert figures["extra_accepted_submits"] == 0
    assert figures["states"].get("succeeded", 0) > 0


def test_redis_restarted_mid_run_loses_messages(tmp_path: Path) -> None:
    """Redis without persistence is killed and restarted twice mid-run: every queued and
    unacknowledged message is gone; the tick must find the work again from the database."""

    def restart_redis(ctx: Context) -> None:
        for fraction in (0.2, 0.55):
            if not ctx.wait_for_progress(fraction):
                ctx.notes.append("batch finished before a planned Redis restart")
                return
            ctx.notes.append(f"{ctx.broker_backlog()} messages in Redis when it was killed")
            ctx.redis.restart(down_seconds=1.5)

    findings = run(tmp_path, "redis-restart", jobs=150, chaos=restart_redis, seed=12)
    _assert_holds(findings)
    assert findings.figures["redis_restarts"] == 2
    assert findings.figures["duplicate_paid_submissions"] == 0
    assert findings.figures["extra_accepted_submits"] == 0


def test_postgres_crashed_mid_run(tmp_path: Path) -> None:
    """PostgreSQL is stopped with ``-m immediate`` (every connection dropped, transactions
    mid-flight aborted, crash recovery on restart) twice mid-run."""

    def crash_postgres(ctx: Context) -> None:
        for fraction in (0.2, 0.55):
            if not ctx.wait_for_progress(fraction):
                ctx.notes.append("batch finished before a planned PostgreSQL crash")
                return
            ctx.postgres.restart(down_seconds=2.0)

    findings = run(tmp_path, "postgres-crash", jobs=150, chaos=crash_postgres, seed=13)
    _assert_holds(findings)
    assert findings.figures["postgres_crashes"] == 2
    assert findings.figures["duplicate_paid_submissions"] == 0
    assert findings.figures["extra_accepted_submits"] == 0


SIM_FAULTS = {
    "submit_429": {"probability": 0.08},
    "submit_502": {"probability": 0.04},
    "submit_503": {"probability": 0.04},
    "submit_drop": {"probability": 0.04},
    "model_error": {"probability": 0.05},
    "download_error": {"probability": 0.05},
    "download_truncated": {"probability": 0.05},
    "status_502": {"probability": 0.05},
}


def test_simulator_faults(tmp_path: Path) -> None:
    """429 storms, 502/503s, model errors, connections dropped after an accepted submit,
    failed and truncated downloads, status 502s — with policy ``resubmit``: a dropped submit is
    sent again after the deadline, so a duplicate charge is possible, but never more than the
    number of drops, and every one is reported on its job."""

    def storm(ctx: Context) -> None:
        if not ctx.sleep(2.0):
            ctx.sim.set_faults(submit_429={"next": 40, "probability": 0.08})
            ctx.notes.append("429 storm: the next 40 submits refused")

    findings = run(
        tmp_path,
        "simulator-faults",
        jobs=200,
        chaos=storm,
        faults=SIM_FAULTS,
        env={"WANBATCH_SUBMIT_UNKNOWN_POLICY": "resubmit"},
        seed=14,
    )
    _assert_holds(findings)
    figures = findings.figures
    fired = figures["faults_fired"]
    # status_502 fires only on a status *poll*. Since status streams (issue #11) a run polls
    # only as the tick's safety net, often a handful of times in all, so whether one of them
    # meets the 5 % fault is chance; the 502 path itself is tested in test_simulator_faults.py.
    for kind in SIM_FAULTS.keys() - {"status_502"}:
        assert fired.get(kind, 0) > 0, f"fault {kind} never fired"
    drops = fired.get("submit_drop", 0)
    assert figures["duplicate_paid_submissions"] <= drops
    assert figures["extra_accepted_submits"] <= figures["reported_possible_duplicates"]


def test_paused_worker_is_fenced(tmp_path: Path) -> None:
    """Workers freeze (SIGSTOP) past their lease — at the worst moments (after the POST, mid
    download) by stopping themselves, and from outside while holding a lease — then resume
    (SIGCONT). Their late writes must be fenced: no state regression, no second POST."""

    def stop_lease_holders(ctx: Context) -> None:
        rng = random.Random(7)
        while not ctx.sleep(rng.uniform(3.0, 5.0)):
            leader = ctx.workers.leader_pid(ctx.postgres)
            others = [p for p in ctx.workers.pids() if p != leader]
            if others:
                ctx.workers.stop_one(rng.choice(others))

    stop_points = {"WANBATCH_CHAOS_STOP_POINTS": "after_post:0.04,mid_download:0.03,after_download:0.03"}
    findings = run(
        tmp_path,
        "sigstop",
        jobs=120,
        chaos=stop_lease_holders,
        per_worker_env={1: stop_points, 2: stop_points},
        resume_after=5.0,  # lease 3 s: the reconciler has taken the job over by then
        seed=15,
    )
    _assert_holds(findings)
    figures = findings.figures
    assert figures["self_stops"] + figures["external_stops"] > 0
    assert figures["resumes"] > 0
    assert figures["duplicate_paid_submissions"] == 0
    assert figures["extra_accepted_submits"] == 0
