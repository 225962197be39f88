"""Ctrl-C (SIGINT) and SIGTERM during `wanbatch run`: stop within seconds, resume cleanly (issue #9).

The bug: Ctrl-C during a download printed `Aborted!` and the process went on for 10+ minutes
(the embedded worker waited for its downloads, and the thread pool is joined at exit). Now the
first signal stops sending, gives the process's leases back and exits 130 with a line saying
that running again resumes; a second signal exits at once.

`wanbatch run` runs as a real subprocess (signals need one) against a simulator in this test
process, so its ledger — what fal accepted — is observable across the interrupted run and the
run that resumes it.

What a stopped run leaves behind holds no other batch's run back in silence (audit s26
"hostile", item 4): a `--simulate` run stopped during its downloads left every later embedded
run at `pending:1` for ever, saying nothing. The download backlog counted every batch's
downloads, though only a batch's own run makes them, and the outstanding cap counted the
requests a stopped simulation had left at its simulator, gone with its process (every
simulation sends the same key). Now the backlog counts the downloads a run makes, and a
simulation's caps its own batch only; a cap that does hold a run back is named, with whose jobs
fill it, on the progress line and in `status`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from falsim.storage import StoredFile
from tests.e2e.e2e_helpers import (
    Background,
    MakeManifest,
    db_rows,
    subprocess_env,
    wait_for,
    wanbatch_command,
)

JOBS = 8


def _manifest(manifest: MakeManifest) -> Path:
    items = "\n".join(f"  - prompt: interrupted item {i}" for i in range(JOBS))
    return manifest("sigint", f"name: sigint\nendpoint: fal-ai/wan-22\nitems:\n{items}\n")


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(
        SimulatorOptions(latency_seconds=0.1, latency_jitter=0.0, concurrency_limit=40, rng_seed=7)
    ) as handle:
        yield handle


@pytest.fixture
def stalled_downloads(sim: SimulatorHandle) -> Iterator[threading.Event]:
    """Video downloads from the simulator hang until the returned event is set."""
    gate = threading.Event()
    store = sim.engine.store
    original = store.get

    def slow_get(key: str) -> StoredFile | None:
        stored = original(key)
        if stored is None or not stored.content_type.startswith("video/"):
            return stored

        def read() -> bytes:
            gate.wait(120)
            return stored.read()

        return dataclasses.replace(stored, source=read)

    store.get = slow_get  # type: ignore[method-assign]
    try:
        yield gate
    finally:
        gate.set()
        store.get = original  # type: ignore[method-assign]


@pytest.fixture
def env(e2e_env: Path, sim: SimulatorHandle) -> dict[str, str]:
    """The subprocess's environment: this test's database and outputs, the test's simulator."""
    return subprocess_env(
        sim.url,
        MAX_OUTSTANDING="3",
        EMBEDDED_CONCURRENCY="3",
        LEASE_SECONDS="120",  # a lease left behind would stall the second run for 2 min
    )


class Proc(Background):
    """A `wanbatch` subprocess, and the prefix of the lease owner it writes (``host:pid:``)."""

    @property
    def owner_prefix(self) -> str:
        return f"{socket.gethostname()}:{self.popen.pid}:"


def _wait_for(what: str, check: Callable[[], bool], proc: Proc) -> None:
    wait_for(what, check, proc, step=0.1)  # each check queries the database: 10 a second is plenty


def _count(db: str, where: str) -> int:
    try:
        return int(db_rows(db, f"SELECT count(*) FROM jobs WHERE {where}")[0][0])
    except OperationalError:  # not migrated yet
        return 0


def _status(env: dict[str, str], cwd: Path, batch: str = "sigint") -> dict[str, Any]:
    """``wanbatch status BATCH --json``, run as a user would, from another process."""
    report: dict[str, Any] = json.loads(_status_of(env, cwd, batch, "--json").stdout)
    return report


def _status_of(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``wanbatch status ARGS`` from another process, as a user would ask."""
    done = subprocess.run(
        [*wanbatch_command(), "status", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def _signal_and_wait(proc: Proc, sig: signal.Signals, within: float) -> float:
    started = time.monotonic()
    proc.popen.send_signal(sig)
    try:
        proc.popen.wait(within)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {within}s after {sig.name}:\n{proc.stderr()}")
    return time.monotonic() - started


def test_ctrl_c_during_downloads_stops_in_seconds_and_the_next_run_resumes(
    manifest: MakeManifest,
    sim: SimulatorHandle,
    stalled_downloads: threading.Event,
    env: dict[str, str],
    e2e_env: Path,
) -> None:
    db = env["WANBATCH_DATABASE_URL"]
    path = _manifest(manifest)
    first = Proc(["run", str(path), "--no-progress"], env, e2e_env, "first")
    try:
        _wait_for("downloads to hang", lambda: _count(db, "state = 'downloading'") >= 2, first)
        # While it runs, the run says it works on its batch (`status` gives a forecast then).
        beats = db_rows(db, "SELECT owner, scope FROM conductor_heartbeats")
        assert [(owner.startswith(first.owner_prefix), scope) for owner, scope in beats] == [
            (True, _status(env, e2e_env)["batch"])
        ]
        assert _status(env, e2e_env)["processing"] is True
        took = _signal_and_wait(first, signal.SIGINT, within=10)
    finally:
        first.kill()
    assert first.popen.returncode == 130, first.stderr()
    assert took < 10
    err = first.stderr()
    assert "run the same command again to resume" in err
    assert "Aborted!" not in err
    assert "Traceback" not in err
    # Stopped: nothing works on the batch any more, and `status` says so at once, without a forecast.
    assert db_rows(db, "SELECT count(*) FROM conductor_heartbeats")[0][0] == 0
    stopped = _status(env, e2e_env)
    assert (stopped["processing"], stopped["eta_seconds"]) == (False, None)
    assert stopped["in_flight"] >= 2
    accepted_first = sim.ledger()["accepted"]
    assert 2 <= accepted_first < JOBS  # interrupted midway

    # Nothing of the dead process stays leased: its downloads are due at once for the next run,
    # and what it had claimed but not sent is pending again.
    held = _count(db, f"lease_owner LIKE '{first.owner_prefix}%' AND submitted_input IS NULL")
    assert held == 0
    assert _count(db, f"lease_owner LIKE '{first.owner_prefix}%' AND state <> 'submitting'") == 0
    assert _count(db, "state = 'submitting' AND submitted_input IS NULL") == 0
    assert _count(db, "lease_owner = 'download-queue'") == 0

    stalled_downloads.set()
    started = time.monotonic()
    second = Proc(["run", str(path), "--no-progress"], env, e2e_env, "second")
    second.wait(90)
    assert second.popen.returncode == 0, second.stderr()
    assert time.monotonic() - started < 60  # not held up by leases of the dead process
    assert _count(db, "state = 'succeeded'") == JOBS
    ledger = sim.ledger()
    assert ledger["accepted"] == JOBS  # each job sent exactly once across both runs
    assert ledger["duplicates"] == []
    assert len(list((Path(env["WANBATCH_OUTPUT_DIR"]) / "sigint").glob("*.mp4"))) == JOBS


def test_a_simulated_run_stopped_with_requests_at_fal_resumes_them(
    manifest: MakeManifest, env: dict[str, str], e2e_env: Path
) -> None:
    """`--simulate` runs its simulator inside the process: Ctrl-C takes it down with the
    requests it held. Real fal keeps them, so the next `--simulate` run gives them back to its
    own simulator: every job succeeds, none fails as a request fal lost."""
    db = env["WANBATCH_DATABASE_URL"]
    path = _manifest(manifest)
    at_fal = "state IN ('queued', 'running') AND request_id IS NOT NULL"
    first = Proc(["run", str(path), "--simulate", "--no-progress"], env, e2e_env, "sim-first")
    try:
        _wait_for("requests at fal", lambda: _count(db, at_fal) >= 2, first)
        _signal_and_wait(first, signal.SIGINT, within=10)
    finally:
        first.kill()
    assert first.popen.returncode == 130, first.stderr()
    left = _count(db, at_fal)
    assert left >= 1, "no request was left at fal: the test did not interrupt a run midway"

    second = Proc(["run", str(path), "--simulate", "--no-progress"], env, e2e_env, "sim-second")
    second.wait(90)
    assert second.popen.returncode == 0, second.stderr() + second.stdout()
    assert _count(db, "state = 'succeeded'") == JOBS
    assert _count(db, "state = 'failed'") == 0
    assert "lost the request" not in second.stdout() + second.stderr()
    # Each job was sent once: the requests left at fal were taken back, not sent again.
    assert _count(db, "attempts = 1") == JOBS


def test_a_second_sigterm_leaves_a_post_in_flight_to_the_reconciler(
    manifest: MakeManifest, sim: SimulatorHandle, env: dict[str, str], e2e_env: Path
) -> None:
    """A first SIGTERM waits for the answer of the POST in flight (up to WANBATCH_READ_TIMEOUT);
    a second one ends the wait on the spot. The job whose POST may have reached fal is not
    given back, and the last line says what that means and how to go on (it said only
    "interrupted again: exiting now")."""
    db = env["WANBATCH_DATABASE_URL"]
    sim.set_faults(submit_slow={"next": 1, "delay": 30})  # the first POST hangs at fal
    proc = Proc(["run", str(_manifest(manifest)), "--no-progress"], env, e2e_env, "term")
    try:
        _wait_for(
            "a POST in flight",
            lambda: _count(db, "state = 'submitting' AND submitted_input IS NOT NULL") >= 1,
            proc,
        )
        time.sleep(0.3)  # let the others move on
        proc.popen.send_signal(signal.SIGTERM)
        wait_for("the stop to wait for the answer", lambda: "waiting for 1 submit(s)" in proc.stderr(), proc)
        took = _signal_and_wait(proc, signal.SIGTERM, within=10)
    finally:
        proc.kill()
    assert proc.popen.returncode == 130, proc.stderr()
    assert took < 10
    err = " ".join(proc.stderr().split())
    assert (
        "waiting for 1 submit(s) already sent to fal to be answered (up to 60s; Ctrl-C again to exit "
        "now: fal may have accepted and billed them, and their outcome is settled after "
        "WANBATCH_LEASE_SECONDS (120s))"
    ) in err, err
    assert (
        "interrupted again: exiting now; 1 submit(s) were in flight: run the same command again to "
        "resume (fal may have accepted and billed them, and their outcome is settled after "
        "WANBATCH_LEASE_SECONDS (120s))"
    ) in err, err
    # The job whose POST may have reached fal is not given back: only the reconciler decides.
    in_flight = db_rows(
        db,
        "SELECT lease_owner, attempts FROM jobs WHERE state = 'submitting' AND submitted_input IS NOT NULL",
    )
    assert len(in_flight) == 1
    assert str(in_flight[0][0]).startswith(proc.owner_prefix)
    assert in_flight[0][1] == 1


def test_a_stop_waits_for_the_answers_of_the_posts_already_sent(
    manifest: MakeManifest, sim: SimulatorHandle, env: dict[str, str], e2e_env: Path
) -> None:
    """Audit: fal slow to answer 3 submits (10 s each), Ctrl-C 5 s into the run. The stop waited
    3 s and left them "still in flight"; the next run waited out the 120 s lease and failed them
    `submit_unknown` (no webhook receiver to prove anything), advising a rerun that pays them a
    second time: 3 videos billed, 3 request ids never recorded. Now the stop waits for those
    answers up to the POST's own read timeout (WANBATCH_READ_TIMEOUT), says so once, and records
    them: the next run goes on at once, each job sent and billed once."""
    db = env["WANBATCH_DATABASE_URL"]
    sim.set_faults(submit_slow={"next": 3, "delay": 8})  # past the old grace, within the read timeout
    path = _manifest(manifest)
    slow = {**env, "WANBATCH_READ_TIMEOUT": "30"}
    first = Proc(["run", str(path), "--no-progress"], slow, e2e_env, "answers")
    in_flight = "state = 'submitting' AND submitted_input IS NOT NULL"
    try:
        _wait_for("3 POSTs in flight", lambda: _count(db, in_flight) >= 3, first)
        _signal_and_wait(first, signal.SIGINT, within=40)
    finally:
        first.kill()
    assert first.popen.returncode == 130, first.stderr()
    err = " ".join(first.stderr().split())
    waiting = (
        "waiting for 3 submit(s) already sent to fal to be answered (up to 30s; Ctrl-C again to exit now:"
    )
    assert err.count(waiting) == 1, err
    assert "still in flight" not in err, err
    assert "run the same command again to resume" in err, err
    # Their answers are recorded: each job has its request id, nothing is left for the reconciler.
    assert _count(db, "state = 'submitting'") == 0
    sent = db_rows(db, "SELECT request_id FROM jobs WHERE submitted_input IS NOT NULL")
    assert len(sent) == sim.ledger()["accepted"] == 3
    assert all(request_id for (request_id,) in sent)

    started = time.monotonic()
    second = Proc(["run", str(path), "--no-progress"], env, e2e_env, "answers-second")
    assert second.wait(90) == 0, second.stderr() + second.stdout()
    assert time.monotonic() - started < 60  # not held up by the 120 s lease
    assert _count(db, "state = 'succeeded'") == JOBS
    assert _count(db, "error_type = 'submit_unknown'") == 0
    ledger = sim.ledger()
    assert (ledger["accepted"], ledger["billed_count"], ledger["duplicates"]) == (JOBS, JOBS, [])


def test_sighup_stops_as_sigterm_does_and_answers_in_flight_are_kept(
    manifest: MakeManifest, sim: SimulatorHandle, env: dict[str, str], e2e_env: Path
) -> None:
    """SIGHUP (the terminal or SSH session closed, the commonest interrupt) killed the run outright
    (exit 129): the answers to its POSTs in flight were lost, and the next run sat on
    `submitting:3` for a lease, then failed them `submit_unknown` though fal had accepted (and
    billed) them. Now it stops as SIGTERM does; a second SIGHUP (the kernel's, after the
    shell's) does not cut that short."""
    db = env["WANBATCH_DATABASE_URL"]
    sim.set_faults(submit_slow={"next": 3, "delay": 1.5})  # answered within the stop's grace
    path = _manifest(manifest)
    first = Proc(["run", str(path), "--no-progress"], env, e2e_env, "hup")
    in_flight = "state = 'submitting' AND submitted_input IS NOT NULL"
    try:
        _wait_for("3 POSTs in flight", lambda: _count(db, in_flight) >= 3, first)
        first.popen.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        assert first.popen.poll() is None, first.stderr()  # not killed outright
        took = _signal_and_wait(first, signal.SIGHUP, within=10)  # the second: ignored
    finally:
        first.kill()
    assert first.popen.returncode == 130, first.stderr()
    assert took < 10
    assert "run the same command again to resume" in first.stderr()
    assert _count(db, "state = 'submitting'") == 0  # answers recorded, nothing left to guess
    assert _count(db, f"lease_owner LIKE '{first.owner_prefix}%' AND state <> 'submitting'") == 0

    second = Proc(["run", str(path), "--no-progress"], env, e2e_env, "hup-second")
    assert second.wait(90) == 0, second.stderr() + second.stdout()
    assert _count(db, "state = 'succeeded'") == JOBS
    ledger = sim.ledger()
    assert ledger["accepted"] == JOBS  # each job sent exactly once across both runs
    assert ledger["duplicates"] == []


def test_a_sighup_ignored_by_the_parent_stays_ignored(
    manifest: MakeManifest, sim: SimulatorHandle, env: dict[str, str], e2e_env: Path
) -> None:
    """Under `nohup` (SIGHUP ignored) the run goes on through a hangup, to the end."""
    db = env["WANBATCH_DATABASE_URL"]
    sim.set_faults(submit_slow={"next": 1, "delay": 1.5})
    argv = [*wanbatch_command(), "run", str(_manifest(manifest)), "--no-progress"]
    ignore = (  # what `nohup` does before it starts the command
        "import signal, os, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
        "os.execvp(sys.argv[1], sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", ignore, *argv],
        env=env,
        cwd=e2e_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while _count(db, "state = 'submitting' AND submitted_input IS NOT NULL") < 1:
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGHUP)
        _out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert _count(db, "state = 'succeeded'") == JOBS


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_sigint_or_sigterm_ignored_by_the_parent_stays_ignored(
    manifest: MakeManifest, sim: SimulatorHandle, env: dict[str, str], e2e_env: Path, stop: signal.Signals
) -> None:
    """Started with the signal ignored (``cmd &`` in a script ignores SIGINT), the run goes on
    through it, to the end, as under `nohup` for SIGHUP. Was: ignored only until the run set its
    handlers, and from then on the same signal stopped it (exit 130), whichever came first."""
    db = env["WANBATCH_DATABASE_URL"]
    sim.set_faults(submit_slow={"next": 1, "delay": 1.5})
    argv = [*wanbatch_command(), "run", str(_manifest(manifest)), "--no-progress"]
    ignore = (  # what a shell does for a background job (SIGINT), or a parent ignoring SIGTERM
        f"import signal, os, sys; signal.signal({int(stop)}, signal.SIG_IGN); "
        "os.execvp(sys.argv[1], sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", ignore, *argv],
        env=env,
        cwd=e2e_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        # A POST on its way: the run's own handlers (if any) are installed by now.
        while _count(db, "state = 'submitting' AND submitted_input IS NOT NULL") < 1:
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(stop)
        _out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert _count(db, "state = 'succeeded'") == JOBS


def test_a_killed_runs_downloads_and_unsent_jobs_are_taken_back_at_once(
    manifest: MakeManifest,
    sim: SimulatorHandle,
    stalled_downloads: threading.Event,
    env: dict[str, str],
    e2e_env: Path,
) -> None:
    """After `kill -9` (or a second Ctrl-C, a crash) of a run for fal, the next run on the same
    host sat for WANBATCH_LEASE_SECONDS on the dead process's downloads, its progress line saying
    "held: download backlog full" with a forecast of seconds. Taking a dead process's leases back
    at once was done for `--simulate` runs only; now a run for fal takes back its downloads and
    status checks at once too (its lease here outlasts the second run's safety timeout)."""
    db = env["WANBATCH_DATABASE_URL"]
    env = {**env, "WANBATCH_MAX_DOWNLOAD_BACKLOG": "2"}  # the two stalled downloads hold the rest back
    path = _manifest(manifest)
    first = Proc(["run", str(path), "--no-progress"], env, e2e_env, "killed")
    try:
        # Its own downloads (leased to it): a completion a poll moved to `downloading` is
        # unleased for a moment, until the same tick hands its download on.
        hanging = f"lease_owner LIKE '{first.owner_prefix}%' AND state = 'downloading'"
        _wait_for(
            "downloads to hang, nothing being sent",
            lambda: _count(db, hanging) >= 2 and _count(db, "state = 'submitting'") == 0,
            first,
        )
        first.popen.send_signal(signal.SIGKILL)
        first.popen.wait(10)
    finally:
        first.kill()
    assert _count(db, hanging) >= 2
    stalled_downloads.set()

    second = Proc(["run", str(path)], {**env, "COLUMNS": "200"}, e2e_env, "after-kill")
    assert second.wait(90) == 0, second.stderr() + second.stdout()
    assert "a process of this host that has ended: taken back now" in " ".join(second.stderr().split())
    assert _count(db, "state = 'succeeded'") == JOBS
    ledger = sim.ledger()
    assert ledger["accepted"] == JOBS  # each job sent exactly once across both runs
    assert ledger["duplicates"] == []


def test_a_killed_runs_submit_in_flight_is_waited_for_aloud_never_resent(
    manifest: MakeManifest, sim: SimulatorHandle, env: dict[str, str], e2e_env: Path
) -> None:
    """A submit whose POST may be out when its run was killed is not taken back early, even
    from a process known to be gone: it waits for its lease, then the reconciler (fal may have
    accepted and billed it; never resent blindly). The progress line says so, whose and until
    when, with no forecast, instead of a cap's reason."""
    db = env["WANBATCH_DATABASE_URL"]
    # A backlog no drain fills (three downloads at once are 3 of 3 under the default, the
    # outstanding cap): the one thing that may hold the run back is the dead process's lease.
    # The lease outlasts the second run's start-up on a loaded machine (CI: 6 s did not — the
    # lease ran out before its first progress line, which then had nothing to wait for).
    env = {**env, "WANBATCH_LEASE_SECONDS": "15", "WANBATCH_MAX_DOWNLOAD_BACKLOG": "50"}
    sim.set_faults(submit_slow={"next": 1, "delay": 15})  # accepted at fal, the answer held
    path = _manifest(manifest)
    in_flight = "state = 'submitting' AND submitted_input IS NOT NULL"
    first = Proc(["run", str(path), "--no-progress"], env, e2e_env, "killed-post")
    try:
        _wait_for("a POST in flight", lambda: _count(db, in_flight) >= 1, first)
        first.popen.send_signal(signal.SIGKILL)
        first.popen.wait(10)
    finally:
        first.kill()
    assert _count(db, f"lease_owner LIKE '{first.owner_prefix}%' AND {in_flight}") >= 1

    second = Proc(["run", str(path)], {**env, "COLUMNS": "250"}, e2e_env, "after-kill-post")
    second.wait(90)
    err = " ".join(second.stderr().split())
    assert f"leased to {first.owner_prefix}" in err, err
    assert "(a process that has ended; submits whose outcome is checked then) until" in err, err
    assert "download backlog full" not in err
    # Its outcome stayed unknown: the policy (fail, the default) decided, nothing was sent twice.
    assert _count(db, "state = 'failed' AND error_type = 'submit_unknown'") >= 1
    assert sim.ledger()["duplicates"] == []
    assert _count(db, "attempts > 1") == 0


def test_a_second_signal_exits_at_once(
    manifest: MakeManifest, sim: SimulatorHandle, env: dict[str, str], e2e_env: Path
) -> None:
    db = env["WANBATCH_DATABASE_URL"]
    sim.set_faults(submit_slow={"next": 1, "delay": 30})  # keeps the first stop busy for its grace
    proc = Proc(["run", str(_manifest(manifest)), "--no-progress"], env, e2e_env, "twice")
    try:
        _wait_for(
            "a POST in flight",
            lambda: _count(db, "state = 'submitting' AND submitted_input IS NOT NULL") >= 1,
            proc,
        )
        beats = f"SELECT count(*) FROM conductor_heartbeats WHERE owner LIKE '{proc.owner_prefix}%'"
        assert db_rows(db, beats)[0][0] >= 1  # the run says it works on its batch
        proc.popen.send_signal(signal.SIGINT)
        # The first signal acted on: the run no longer says so (its conductor closed), and it now
        # waits for the POST in flight (held 30 s at fal; waited for up to WANBATCH_READ_TIMEOUT).
        wait_for("the first stop to begin", lambda: db_rows(db, beats)[0][0] == 0, proc, step=0.02)
        # The other submits' POSTs (answered at once) recorded, or their jobs given back unsent:
        # only the held one is still in flight (on a loaded machine their answers came later).
        wait_for(
            "one POST in flight",
            lambda: _count(db, "state = 'submitting' AND submitted_input IS NOT NULL") == 1,
            proc,
            step=0.02,
        )
        assert proc.popen.poll() is None, proc.stderr()
        _signal_and_wait(proc, signal.SIGINT, within=30)
    finally:
        proc.kill()
    # It exited on the spot, from the second signal's handler: not at the end of the first stop
    # (whose last words say how to resume). Judged by what it said, not by a wall clock.
    assert proc.popen.returncode == 130
    err = proc.stderr()
    again = "interrupted again: exiting now; 1 submit(s) were in flight: run the same command again"
    assert again in err, err
    assert "interrupted: nothing more is sent" not in err, err


def _json_line(text: str) -> dict[str, Any]:
    import json

    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    result: dict[str, Any] = json.loads(lines[0])
    return result


def test_interrupted_json_run_prints_one_object(
    manifest: MakeManifest, sim: SimulatorHandle, env: dict[str, str], e2e_env: Path
) -> None:
    db = env["WANBATCH_DATABASE_URL"]
    sim.update_options(latency_seconds=30.0)  # requests stay at fal
    proc = Proc(["run", str(_manifest(manifest)), "--json"], env, e2e_env, "json")
    try:
        _wait_for("requests at fal", lambda: _count(db, "state IN ('queued', 'running')") >= 3, proc)
        took = _signal_and_wait(proc, signal.SIGINT, within=10)
    finally:
        proc.kill()
    assert proc.popen.returncode == 130
    assert took < 10
    report = _json_line(proc.stdout())
    assert report["ok"] is False
    assert report["interrupted"] is True
    assert report["batch"]
    assert "run the same command again to resume" in proc.stderr()
    # Requests at fal stay tracked (the next run polls them); none is left leased.
    assert _count(db, "state IN ('queued', 'running')") == 3
    assert _count(db, "lease_owner IS NOT NULL") == 0


STOPPED = "name: c\nendpoint: fal-ai/wan-22\nitems:\n" + "".join(
    f"  - prompt: stopped {i}\n" for i in range(10)
)
LATER = "name: b\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: the later run\n"


def _stop_midway(args: list[str], env: dict[str, str], cwd: Path, where: str) -> None:
    """Start `wanbatch ARGS`, Ctrl-C it once a job of it is in ``where`` (SQL), and check that
    one is still there: nothing but that batch's own run moves it on."""
    db = env["WANBATCH_DATABASE_URL"]
    first = Proc(args, env, cwd, "stopped")
    try:
        _wait_for(where, lambda: _count(db, where) >= 1, first)
        _signal_and_wait(first, signal.SIGINT, within=10)
    finally:
        first.kill()
    assert first.popen.returncode == 130, first.stderr()
    assert _count(db, where) >= 1, "nothing was left: the test did not stop the run midway"


def _states(db: str, batch: str) -> dict[str, int]:
    rows = db_rows(
        db,
        "SELECT j.state, count(*) FROM jobs j JOIN batches b ON b.id = j.batch_id "
        f"WHERE b.name = '{batch}' GROUP BY j.state",
    )
    return {state: n for state, n in rows}


@pytest.mark.parametrize("left", ["downloading", "at its simulator"])
def test_a_simulation_stopped_midway_holds_no_later_run_back(
    left: str, manifest: MakeManifest, env: dict[str, str], e2e_env: Path
) -> None:
    db = env["WANBATCH_DATABASE_URL"]
    if left == "downloading":  # every download times out and waits for its retry, `downloading`
        stopped_env, where = {**env, "WANBATCH_DOWNLOAD_TIMEOUT": "0.000001"}, "state = 'downloading'"
    else:  # Ctrl-C while requests are queued or running at the run's own simulator
        stopped_env, where = env, "state IN ('queued', 'running')"
    _stop_midway(
        ["run", str(manifest("c", STOPPED)), "--simulate", "--no-progress"], stopped_env, e2e_env, where
    )
    left_over = _states(db, "c")

    # One stopped job is enough to fill caps of 1: before, the run below waited for ever.
    capped = {**env, "WANBATCH_MAX_OUTSTANDING": "1", "WANBATCH_MAX_DOWNLOAD_BACKLOG": "1"}
    later = Proc(["run", str(manifest("b", LATER)), "--simulate", "--no-progress"], capped, e2e_env, "later")
    later.wait(60)
    assert later.popen.returncode == 0, later.stderr()
    assert _states(db, "b") == {"succeeded": 1}
    assert _states(db, "c") == left_over  # left for `wanbatch run c --simulate`
    assert "held" not in later.stderr()


def test_a_cap_that_holds_a_run_back_is_named_with_whose_jobs_fill_it(
    manifest: MakeManifest, sim: SimulatorHandle, env: dict[str, str], e2e_env: Path
) -> None:
    """A request another batch left at fal fills an outstanding cap of 1 (fal's account is
    shared whatever the batch): the run says so, and what frees it, instead of a silent
    `pending:1`; `status` says the same; it goes on once that request ends."""
    env = {**env, "WANBATCH_MAX_OUTSTANDING": "1"}
    db = env["WANBATCH_DATABASE_URL"]
    sim.update_options(latency_seconds=600.0)  # c's request stays at fal
    _stop_midway(
        ["run", str(manifest("c", STOPPED)), "--no-progress"], env, e2e_env, "state IN ('queued', 'running')"
    )
    sim.update_options(latency_seconds=0.1)  # what is sent from now on finishes at once

    # stderr is a file: the progress goes out as plain lines, the cap's note in them
    later = Proc(["run", str(manifest("b", LATER))], env, e2e_env, "later")
    try:
        _wait_for("the cap's note", lambda: "held: outstanding cap full (1 of c)" in later.stderr(), later)
        said = (
            "submits held back: the outstanding cap is full (1 of 1, WANBATCH_MAX_OUTSTANDING): "
            "requests at fal (1 of batch c); sending resumes as fal finishes them"
        )
        assert said in later.stderr()  # once in full, when the hold begins
        report = _status(env, e2e_env, "b")
        assert (report["phase"], report["processing"]) == ("active", True)
        assert report["phase_reason"].startswith(said)
        assert said in _status_of(env, e2e_env, "b").stdout
        assert said in _status_of(env, e2e_env).stdout  # the list of every batch too
        assert _states(db, "b") == {"pending": 1}

        cancel = subprocess.run(
            [*wanbatch_command(), "cancel", "c", "--no-progress"],
            env=env,
            cwd=e2e_env,
            capture_output=True,
            timeout=90,
        )
        assert cancel.returncode in (0, 1), cancel.stderr
        later.wait(90)
    finally:
        later.kill()
    assert later.popen.returncode == 0, later.stderr()
    assert _states(db, "b") == {"succeeded": 1}


# --------------------------------------------------------------------------- hints that work when copied

#: Every download times out and waits for its retry: a run or cancel of a batch cannot end on
#: its own, so the Ctrl-C always comes while it works.
STALLED = {"WANBATCH_DOWNLOAD_TIMEOUT": "0.000001"}


def _copied(hint: str) -> list[str]:
    """The command a hint suggests, as a user would paste it into a shell: the argv to run."""
    words = shlex.split(hint)
    assert words[0] == "wanbatch", hint
    return [*wanbatch_command(), *words[1:]]


def _run_copied(hint: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _copied(hint), env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _interrupt_after_progress(args: list[str], env: dict[str, str], cwd: Path, name: str) -> str:
    """Start `wanbatch ARGS`, Ctrl-C it after its first progress line; its stderr."""
    proc = Proc(args, env, cwd, name)
    try:
        _wait_for("the first progress line", lambda: " jobs: " in proc.stderr(), proc)
        _signal_and_wait(proc, signal.SIGINT, within=10)
    finally:
        proc.kill()
    assert proc.popen.returncode == 130, proc.stderr()
    return proc.stderr()


def test_an_interrupted_simulated_rerun_suggests_a_command_that_resumes_it(
    manifest: MakeManifest, env: dict[str, str], e2e_env: Path
) -> None:
    """The hint named the new batch by its full id and left out `--simulate`: copied, it was
    refused (exit 2, "batch sigint-rerun-1 is a simulation …"). Now it is the batch's name (or
    12 characters of its id) and `--simulate`, and copied it finishes the batch."""
    db = env["WANBATCH_DATABASE_URL"]
    parent = subprocess.run(
        [*wanbatch_command(), "run", str(_manifest(manifest)), "--simulate", "--no-progress"],
        env=env,
        cwd=e2e_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert parent.returncode == 0, parent.stderr

    err = _interrupt_after_progress(["rerun", "sigint", "--simulate"], {**env, **STALLED}, e2e_env, "rerun")
    found = re.search(r"`(wanbatch run [^`]*)` resumes the new batch", err)
    assert found, err
    assert found.group(1) == "wanbatch run sigint-rerun-1 --simulate"
    assert _states(db, "sigint-rerun-1").get("succeeded", 0) < JOBS  # stopped midway

    resumed = _run_copied(found.group(1), env, e2e_env)
    assert resumed.returncode == 0, resumed.stderr
    assert _states(db, "sigint-rerun-1") == {"succeeded": JOBS}


def test_an_interrupted_simulated_cancel_suggests_a_command_that_finishes_it(
    manifest: MakeManifest, env: dict[str, str], e2e_env: Path
) -> None:
    """The hint repeated the batch as typed (`wanbatch cancel sig int`: two words to a shell)
    and left out `--simulate`. Now it is what `shell_ref` names (12 characters of the id, for a
    name the shell would split) and `--simulate`, and copied it finishes the cancel."""
    db = env["WANBATCH_DATABASE_URL"]
    path = manifest("spaced", _manifest(manifest).read_text().replace("name: sigint", 'name: "sig int"'))
    # The stalled download's retry comes 30 s later: its video was at the stopped run's simulator,
    # so the cancel's attempt fails it for good, and with the tests' retry delay of 0 (and then
    # with 5 s, in a CI run on a loaded machine) that attempt and the batch's end came before the
    # Ctrl-C. The copied command below waits for the rest of it.
    stalled = {**env, **STALLED, "WANBATCH_RETRY_BASE_DELAY": "30"}
    _stop_midway(["run", str(path), "--simulate", "--no-progress"], stalled, e2e_env, "state = 'downloading'")

    err = _interrupt_after_progress(["cancel", "sig int", "--simulate"], stalled, e2e_env, "cancel")
    found = re.search(r"run `(wanbatch cancel [^`]*)` again to finish cancelling", err)
    assert found, err
    batch_id = db_rows(db, "SELECT id FROM batches WHERE name = 'sig int'")[0][0]
    assert found.group(1) == f"wanbatch cancel {batch_id[:12]} --simulate"
    assert set(_states(db, "sig int")) - {"succeeded", "failed", "cancelled"}  # not finished yet

    finished = _run_copied(found.group(1), env, e2e_env)
    assert finished.returncode in (0, 1), finished.stderr  # 1: jobs were cancelled
    assert not set(_states(db, "sig int")) - {"succeeded", "failed", "cancelled"}
