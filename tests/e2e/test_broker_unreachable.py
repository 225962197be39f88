"""A broker that cannot be reached, or one no worker listens on: say so within seconds (issue #9).

Before, `run` with WANBATCH_BROKER_URL pointing at a dead broker, or at a live one with no
`wanbatch worker`, waited silently forever. Now an unreachable broker is a usage error (exit 2,
one line, nothing submitted), and a broker without workers gets a warning that repeats while
`run` keeps waiting.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from bench.distributed import claimed_redis_db, wanbatch_command
from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, counts

#: Nothing listens on port 1 of the loopback: a refused connection, at once.
DEAD_BROKER = "redis://127.0.0.1:1/0"

SMALL = """name: broker-check
endpoint: fal-ai/wan-22
items:
  - prompt: one
  - prompt: two
"""


def _stored(db: str) -> tuple[int, int]:
    """(batches, jobs) in the database; (0, 0) when it was never even created."""
    try:
        return counts(db)
    except OperationalError:
        return 0, 0


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("command", ["run", "rerun"])
def test_an_unreachable_broker_is_one_line_and_exit_2(
    command: str,
    wb: Wb,
    sim: SimulatorHandle,
    manifest: MakeManifest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = manifest("small", SMALL)
    if command == "rerun":
        assert wb("run", path, "--json", "--no-progress").code == 0  # embedded: a batch to rerun
    db = os.environ["WANBATCH_DATABASE_URL"]
    before = _stored(db)
    accepted = sim.ledger()["accepted"]
    monkeypatch.setenv("WANBATCH_BROKER_URL", DEAD_BROKER)

    started = time.monotonic()
    result = wb(command, path if command == "run" else "broker-check", "--no-progress")
    took = time.monotonic() - started

    assert result.code == 2
    assert took < 10
    line = _one_line(result.stderr)
    assert "cannot reach the broker at redis://127.0.0.1:1/0" in line
    assert "WANBATCH_BROKER_URL" in line
    assert "Traceback" not in result.stderr + result.stdout
    assert _stored(db) == before  # nothing stored
    assert sim.ledger()["accepted"] == accepted  # nothing sent


def test_the_broker_password_is_not_printed(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_BROKER_URL", "redis://:hunter2-secret@127.0.0.1:1/0")
    result = wb("run", manifest("small", SMALL), "--no-progress")
    assert result.code == 2
    assert "hunter2-secret" not in result.stderr + result.stdout
    assert "redis://:**@127.0.0.1:1/0" in result.stderr


def test_a_json_run_with_an_unreachable_broker_prints_one_object(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_BROKER_URL", DEAD_BROKER)
    result = wb("run", manifest("small", SMALL), "--json")
    assert result.code == 2
    report = result.json()
    assert report["ok"] is False
    assert "cannot reach the broker" in report["error"]


def test_cancel_records_the_cancel_and_warns_when_the_broker_is_down(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert wb("submit", manifest("small", SMALL), "--json").code == 0
    monkeypatch.setenv("WANBATCH_BROKER_URL", DEAD_BROKER)
    result = wb("cancel", "broker-check", "--json")
    # The cancel is recorded (the workers carry out what is at fal when they run); the exit code
    # is its outcome, as embedded: 1, jobs ended cancelled.
    assert result.code == 1
    assert "cannot reach the broker" in result.stderr
    assert result.json()["state"] == "cancelled"
    assert result.json()["counts"]["cancelled"] == 2


def test_a_live_broker_without_workers_gets_a_warning_and_run_keeps_waiting(
    redis_url: str, sim: SimulatorHandle, manifest: MakeManifest, e2e_env: Path
) -> None:
    path = manifest("small", SMALL)
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as broker:
        env = {**os.environ, "WANBATCH_BROKER_URL": broker, "PYTHONUNBUFFERED": "1"}
        err_file = e2e_env / "run.stderr"
        with err_file.open("wb") as err:
            proc = subprocess.Popen(
                [*wanbatch_command(), "run", str(path), "--no-progress"],
                env=env,
                cwd=e2e_env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            deadline = time.monotonic() + 20
            while "no wanbatch worker answers" not in err_file.read_text():
                assert proc.poll() is None, err_file.read_text()
                assert time.monotonic() < deadline, f"no warning within 20 s:\n{err_file.read_text()}"
                time.sleep(0.2)
            time.sleep(1.0)
            assert proc.poll() is None  # a warning, not an exit: it keeps waiting for a worker
            stderr = err_file.read_text()
            assert "start `wanbatch worker`" in stderr
            assert "Traceback" not in stderr

            # Ctrl-C while waiting on workers: stops watching at once; the batch stays stored.
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    stderr = err_file.read_text()
    # No worker was seen: it does not claim they carry on (that contradicted the warning above).
    assert "the workers carry on" not in stderr
    assert (
        "; no wanbatch worker was seen alive lately, so nothing processes it until one starts "
        "(start `wanbatch worker`)"
    ) in " ".join(stderr.split())
    # The way on names the batch as every hint does (its name here), not by its 32-character id.
    assert "`wanbatch status broker-check` follows it" in stderr
    assert sim.ledger()["accepted"] == 0  # run itself sends nothing with a broker


@pytest.mark.parametrize(("found", "carry_on"), [(2, True), (0, False), (None, False)])
def test_on_ctrl_c_the_workers_carry_on_only_when_one_was_seen_alive(
    found: int | None, carry_on: bool
) -> None:
    """What `run` says when Ctrl-C stops it watching follows its latest look at the workers:
    some answered (and beat in this database), none did, or the broker could not be asked."""
    from jobs.models import utcnow
    from jobs.settings import Settings
    from worker.running import _WorkerWatch, stopped_watching

    said: list[str] = []
    watch = _WorkerWatch(
        Settings(broker_url=DEAD_BROKER),
        said.append,
        every=60.0,
        ask=lambda _s: found,
        heard=lambda _s: utcnow(),  # the workers that answer work on this database
    )
    watch.start()
    try:
        seen = watch.seen_alive_recently()
    finally:
        watch.stopping.set()
        watch.join(15)
    assert seen is carry_on
    assert ("the workers carry on with it" in stopped_watching("b1", workers_seen=seen)) is carry_on
    assert (
        "nothing processes it until one starts" in stopped_watching("b1", workers_seen=seen)
    ) is not carry_on


def test_a_ctrl_c_before_the_first_look_at_the_workers_ended_claims_none() -> None:
    from jobs.models import utcnow
    from jobs.settings import Settings
    from worker.running import _WorkerWatch

    answer = threading.Event()

    def slow_ping(_settings: object) -> int:
        answer.wait(30)
        return 1

    watch = _WorkerWatch(
        Settings(broker_url=DEAD_BROKER),
        lambda _line: None,
        every=60.0,
        ask=slow_ping,
        heard=lambda _s: utcnow(),
    )
    watch.start()
    try:
        assert watch.seen_alive_recently(wait=0.0) is False  # not seen (yet): not claimed
        answer.set()
        assert watch.seen_alive_recently(wait=30.0) is True
    finally:
        watch.stopping.set()
        watch.join(15)


def test_run_watching_the_workers_says_when_the_broker_goes_away() -> None:
    """A broker that stops answering while `run` waits on the workers is said at once (and every
    30 s), not left to look like a quiet batch."""
    from jobs.settings import Settings
    from worker.running import _WorkerWatch

    said: list[str] = []
    watch = _WorkerWatch(Settings(broker_url=DEAD_BROKER), said.append, every=60.0)
    watch.start()
    try:
        deadline = time.monotonic() + 30
        while not said:
            assert time.monotonic() < deadline, "no warning within 30 s"
            time.sleep(0.1)
    finally:
        watch.stopping.set()
        watch.join(15)
    assert said == [
        "warning: cannot reach the broker redis://127.0.0.1:1/0 (WANBATCH_BROKER_URL): no work reaches the "
        "workers until it is back (jobs already at fal finish there); still waiting"
    ]
