"""A second `wanbatch run --simulate` of a batch a live process of this host is simulating.

The bug (audit): the second run's simulator was given a copy of the requests "at fal" when it
started, without looking whether a live run owned them; the first run went on sending, the
second simulator knew nothing of those requests and answered 404, and their jobs failed
`request_not_found` (7 of 12 in one try). Each simulation's simulator lives in its own process,
so two cannot share a batch: the second is refused (exit 2, one line naming the other process),
nothing changed. A killed run (`kill -9`) leaves its heartbeat and leases behind, but holds
nothing back: the next run takes over. A run for fal is not affected by a simulation of another
batch going on.

The first run is a real subprocess whose simulator renders for a minute (a hook installed
before the CLI), so it is reliably mid-batch; the others run in this process.
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import Background, MakeManifest, db_rows, subprocess_env, wait_for
from tests.in_process import run_main

#: Runs the CLI with the embedded simulator's renders slowed to a minute.
SLOW = """
import sys
sys.argv[0] = "wanbatch"
import falsim

started = falsim.running_simulator

def slow(options, *args, **kwargs):
    return started(options.updated({"latency_seconds": 60.0}), *args, **kwargs)

falsim.running_simulator = slow
from cli import main
main()
"""

JOBS = 4


def _manifest(items: int, budget: int) -> str:
    lines = "".join(f"  - prompt: twice simulated item {i}\n" for i in range(items))
    return f"name: twice\nendpoint: fal-ai/wan-22\nbudget: {{max_usd: {budget}}}\nitems:\n{lines}"


class Slow(Background):
    def command(self) -> list[str]:
        return [sys.executable, "-c", SLOW]


def _count(db: str, where: str) -> int:
    try:
        return int(db_rows(db, f"SELECT count(*) FROM jobs WHERE {where}")[0][0])
    except Exception:  # not migrated yet
        return 0


def _beats(db: str, prefix: str) -> int:
    try:
        return int(
            db_rows(db, f"SELECT count(*) FROM conductor_heartbeats WHERE owner LIKE '{prefix}%'")[0][0]
        )
    except Exception:  # not migrated yet
        return 0


def test_a_batch_simulated_by_a_live_process_is_refused_and_a_killed_one_taken_over(
    manifest: MakeManifest,
    e2e_env: Path,
    sim: SimulatorHandle,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = subprocess_env("http://127.0.0.1:9", LEASE_SECONDS="300")
    db = env["WANBATCH_DATABASE_URL"]
    path = manifest("twice", _manifest(JOBS, 10))
    first = Slow(["run", str(path), "--simulate", "--no-progress"], env, e2e_env, "first")
    pid = first.popen.pid
    try:
        wait_for(
            "the first run at work",
            lambda: (
                _beats(db, f"{socket.gethostname()}:{pid}:") > 0
                and _count(db, "state IN ('queued', 'running')") == JOBS
            ),
            first,
            step=0.1,
        )
        budget = db_rows(db, "SELECT budget_max_usd FROM batches")
        # An edited manifest (a job more, another budget) shows that nothing is stored.
        path.write_text(_manifest(JOBS + 1, 20))
        for ref in (str(path), "twice"):
            capsys.readouterr()
            assert run_main(["run", ref, "--simulate", "--no-progress"], monkeypatch) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            assert f"process {pid}" in err, err
            assert "nothing was changed" in err, err
            assert "Ctrl-C" in err, err
        assert _count(db, "1 = 1") == JOBS
        assert db_rows(db, "SELECT budget_max_usd FROM batches") == budget
        assert _count(db, "state IN ('failed', 'cancelled')") == 0

        # A run for fal of another batch meanwhile: not concerned.
        other = manifest("other", "name: other\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: for fal\n")
        assert run_main(["run", str(other), "--no-progress"], monkeypatch) == 0
        assert sim.ledger()["accepted"] == 1

        # Killed: its heartbeat and leases stay behind, its pid is gone; the next run takes over.
        first.popen.send_signal(signal.SIGKILL)
        first.popen.wait(10)
    finally:
        first.kill()
    assert _beats(db, f"{socket.gethostname()}:{pid}:") > 0
    capsys.readouterr()
    assert run_main(["run", str(path), "--simulate", "--no-progress"], monkeypatch) == 0, capsys.readouterr()
    assert _count(db, "batch_id = (SELECT id FROM batches WHERE name = 'twice') AND state = 'succeeded'") == (
        JOBS + 1
    )


#: Runs the CLI stopped for a minute once its batch is stored, before any work on it: a run still
#: starting, with neither a heartbeat nor a lease yet.
STARTING = """
import sys, time
sys.argv[0] = "wanbatch"
from cli import batch_commands

said = batch_commands._say_collecting

def starting(*args, **kwargs):
    print("stored", file=sys.stderr, flush=True)
    time.sleep(60)
    return said(*args, **kwargs)

batch_commands._say_collecting = starting
from cli import main
main()
"""


class Starting(Background):
    def command(self) -> list[str]:
        return [sys.executable, "-c", STARTING]


def test_a_run_still_starting_has_claimed_its_simulation(
    manifest: MakeManifest,
    e2e_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two runs started together both found nothing (the check came before either had a heartbeat
    or a lease) and both ran the batch, failing jobs with 404s: the first claims it as it stores it."""
    env = subprocess_env("http://127.0.0.1:9", LEASE_SECONDS="300")
    db = env["WANBATCH_DATABASE_URL"]
    path = manifest("twice", _manifest(JOBS, 10))
    first = Starting(["run", str(path), "--simulate", "--no-progress"], env, e2e_env, "starting")
    pid = first.popen.pid
    try:
        wait_for("the first run's batch stored", lambda: "stored" in first.stderr(), first, step=0.1)
        assert _count(db, "state = 'pending'") == JOBS  # nothing beats or is leased yet
        for ref in (str(path), "twice"):
            capsys.readouterr()
            assert run_main(["run", ref, "--simulate", "--no-progress"], monkeypatch) == 2
            err = capsys.readouterr().err
            assert f"being simulated by process {pid}" in err, err
        assert _count(db, "state = 'pending'") == JOBS
        first.popen.send_signal(signal.SIGKILL)
        first.popen.wait(10)
    finally:
        first.kill()
    # Its claim stays behind, its pid is gone: the next run takes over.
    capsys.readouterr()
    assert run_main(["run", "twice", "--simulate", "--no-progress"], monkeypatch) == 0, capsys.readouterr()
    assert _count(db, "state = 'succeeded'") == JOBS
    assert _beats(db, f"{socket.gethostname()}:") == 0  # a clean end leaves no claim


def test_cancel_simulate_leaves_the_requests_to_the_live_run_that_simulates_them(
    manifest: MakeManifest,
    e2e_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`cancel --simulate` of a batch a live run simulates started a simulator of its own, given a
    copy of the requests "at fal": those the run sent later were unknown there, answered 404, and
    their jobs failed "provider lost the request". It records the cancel, and that run cancels
    them at its own simulator, while this one watches until the batch ends."""
    env = subprocess_env("http://127.0.0.1:9", LEASE_SECONDS="300")
    db = env["WANBATCH_DATABASE_URL"]
    path = manifest("twice", _manifest(JOBS, 10))
    first = Slow(["run", str(path), "--simulate", "--no-progress"], env, e2e_env, "first")
    pid = first.popen.pid
    try:
        wait_for(
            "the first run at work",
            lambda: (
                _beats(db, f"{socket.gethostname()}:{pid}:") > 0
                and _count(db, "state IN ('queued', 'running')") == JOBS
            ),
            first,
            step=0.1,
        )
        capsys.readouterr()
        assert run_main(["cancel", "twice", "--simulate", "--no-progress"], monkeypatch) == 1
        err = capsys.readouterr().err
        assert f"being simulated by process {pid}" in err, err
        assert first.wait(60) == 1, first.stderr()
    finally:
        first.kill()
    assert _count(db, "state = 'cancelled'") == JOBS
    assert _count(db, "state = 'failed'") == 0
    assert "provider lost the request" not in first.stderr()
