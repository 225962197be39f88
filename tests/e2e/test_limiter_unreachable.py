"""The submit-rate limiter's Redis cannot be reached: say so, never wait in silence.

Before, `wanbatch run` with `WANBATCH_LIMITS_URL` on a port nobody listens on sent nothing and
never ended: every claimed job was given back every 5 s, with a warning per job, for ever. Now
`run`, `rerun` and `worker` ask the limiter once at start-up (exit 2, one line naming the
setting, password masked, nothing stored or sent), `doctor` checks it, and an outage mid-run
holds the jobs back (never failed, sent twice or past the rate), says so, and ends when Redis
answers again. The shared Redis (6379) is never stopped: the outage is a private
``redis-server`` on a free port.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from sqlalchemy.exc import OperationalError

from bench.distributed import wanbatch_command
from falsim.server import SimulatorHandle
from tests.chaos.chaos_harness import RedisServer
from tests.e2e.e2e_helpers import MakeManifest, Wb, assert_one_line, counts, db_rows, wanbatch
from tests.ports import unused_port
from tests.sliding_window import max_in_window

SMALL = """name: limiter-check
endpoint: fal-ai/wan-22
items:
  - prompt: one
  - prompt: two
"""


def _closed() -> str:
    """A Redis URL on a loopback port nobody listens on."""
    return f"redis://127.0.0.1:{unused_port()}/0"


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


@pytest.mark.parametrize("command", ["run", "run --simulate", "rerun"])
def test_an_unreachable_limiter_is_one_line_and_exit_2_before_anything_is_sent(
    command: str, wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = manifest("small", SMALL)
    if command == "rerun":
        assert wb("run", path, "--json", "--no-progress").code == 0  # a batch to rerun
    db = os.environ["WANBATCH_DATABASE_URL"]
    before = _stored(db)
    accepted = sim.ledger()["accepted"]
    url = _closed()
    monkeypatch.setenv("WANBATCH_LIMITS_URL", url)

    choices: dict[str, list[str | Path]] = {
        "run": [path],
        "run --simulate": [path, "--simulate"],
        "rerun": ["limiter-check"],
    }
    args = choices[command]
    result = wb(command.split()[0], *args, "--no-progress")

    assert result.code == 2
    line = _one_line(result.stderr)
    assert f"cannot reach the submit-rate limiter's Redis at {url} (WANBATCH_LIMITS_URL)" in line
    assert "Connection refused" in line
    assert "Traceback" not in result.stderr + result.stdout
    assert _stored(db) == before  # nothing stored
    assert sim.ledger()["accepted"] == accepted  # nothing sent


def test_the_limiter_password_is_not_printed_and_json_is_one_object(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = unused_port()
    monkeypatch.setenv("WANBATCH_LIMITS_URL", f"redis://:hunter2-secret@127.0.0.1:{port}/0")
    result = wb("run", manifest("small", SMALL), "--json")
    assert result.code == 2
    assert "hunter2-secret" not in result.stderr + result.stdout
    report = result.json()
    assert report["ok"] is False
    assert f"redis://:**@127.0.0.1:{port}/0 (WANBATCH_LIMITS_URL)" in report["error"]
    assert sim.ledger()["accepted"] == 0


def test_a_limiter_redis_that_refuses_writes_is_one_line_and_exit_2(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A limiter Redis that answers but refuses writes (a read-only replica): before, the
    start-up check (a read) passed, and `run` then warned and waited for ever, every job
    claimed and given back every 5 s. Now the check makes a write, as a submit would: one
    line saying what Redis refused and what to do, exit 2, nothing stored or sent; `doctor`
    says the same. A private ``redis-server`` (the shared one is never made read-only)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    admin = redis.Redis(port=server.port, socket_timeout=5)
    try:
        # A replica of a master nobody runs: it answers reads, and refuses every write.
        admin.execute_command("REPLICAOF", "127.0.0.1", str(unused_port()))
        monkeypatch.setenv("WANBATCH_LIMITS_URL", server.url)
        db = os.environ["WANBATCH_DATABASE_URL"]
        before = _stored(db)
        done = wanbatch("run", manifest("small", SMALL), "--no-progress", timeout=60)  # before: never ended
        where = f"{server.url} (WANBATCH_LIMITS_URL)"
        assert_one_line(
            done,
            f"the submit-rate limiter's Redis at {where} answers but refuses the limiter's script: ",
            "read only replica",
            "WANBATCH_LIMITS_URL",
            "nothing was sent",
        )
        assert "@user_script" not in done.stderr  # the Lua script's SHA and line are no help
        assert _stored(db) == before  # nothing stored
        assert sim.ledger()["accepted"] == 0  # nothing sent

        report = wb("doctor", "--json")
        assert report.code == 1
        limiter = next(c for c in report.json()["checks"] if c["name"] == "limiter")
        assert limiter["status"] == "fail"
        assert limiter["detail"].startswith(
            f"the submit-rate limiter's Redis at {where} answers but refuses the limiter's script: "
        )
        assert "read only replica" in limiter["detail"]
        assert "WANBATCH_LIMITS_URL" in limiter["fix"]
        assert "replica" in limiter["fix"]

        admin.execute_command("REPLICAOF", "NO", "ONE")  # writable: the same check passes
        report = wb("doctor", "--json")
        limiter = next(c for c in report.json()["checks"] if c["name"] == "limiter")
        assert (limiter["status"], limiter["detail"]) == ("ok", f"{where} answers")
    finally:
        admin.close()
        server.kill()


@pytest.mark.parametrize("which", ["limits", "broker"])
def test_a_worker_refuses_to_start_without_its_limiter(which: str, e2e_env: Path) -> None:
    """`wanbatch worker` asks the limiter before it starts Celery: one line, exit 2. The
    limiter is WANBATCH_LIMITS_URL, else the broker's Redis (its password masked)."""
    closed = unused_port()
    env = {**os.environ, "FAL_KEY": "worker-key-id:worker-key-secret"}
    if which == "limits":
        # Any broker that is not Redis: the limiter is WANBATCH_LIMITS_URL alone.
        env |= {"WANBATCH_BROKER_URL": f"amqp://127.0.0.1:{unused_port()}//"}
        env |= {"WANBATCH_LIMITS_URL": f"redis://127.0.0.1:{closed}/0"}
        where = f"redis://127.0.0.1:{closed}/0 (WANBATCH_LIMITS_URL)"
    else:
        env |= {"WANBATCH_BROKER_URL": f"redis://:hunter2-secret@127.0.0.1:{closed}/0"}
        where = f"redis://:**@127.0.0.1:{closed}/0 (WANBATCH_BROKER_URL)"
    done = subprocess.run(
        [*wanbatch_command(), "worker"],
        env=env,
        cwd=e2e_env,
        capture_output=True,
        text=True,
        timeout=120,  # before: Celery retried its connection for ever
        check=False,
    )
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert f"cannot reach the submit-rate limiter's Redis at {where}" in line
    assert "hunter2-secret" not in done.stderr + done.stdout


MANY = "name: outage\nendpoint: fal-ai/wan-22\nitems:\n" + "".join(
    f"  - prompt: job {i}\n" for i in range(12)
)
RATE = 2


def _wait_for(
    what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], err: Path, timeout: float = 90
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"the run ended while waiting for {what}:\n{err.read_text()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s:\n{err.read_text()}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_limiter_outage_mid_run_holds_jobs_back_and_the_run_ends_when_it_returns(
    sim: SimulatorHandle, manifest: MakeManifest, e2e_env: Path, tmp_path: Path
) -> None:
    redis_server = RedisServer(tmp_path / "redis")  # our own: the shared one is never stopped
    redis_server.start()
    path = manifest("outage", MANY)
    db = os.environ["WANBATCH_DATABASE_URL"]
    env = {
        **os.environ,
        "WANBATCH_LIMITS_URL": redis_server.url,
        "WANBATCH_SUBMIT_RATE": str(RATE),
        "PYTHONUNBUFFERED": "1",
    }
    err = e2e_env / "run.stderr"
    try:
        with err.open("wb") as sink:
            # stderr is a file: the progress goes out as plain lines, the limiter's note in them.
            proc = subprocess.Popen(
                [*wanbatch_command(), "run", str(path)],
                env=env,
                cwd=e2e_env,
                stdout=subprocess.DEVNULL,
                stderr=sink,
            )
        try:
            _wait_for("first submits", lambda: sim.ledger()["accepted"] >= 2, proc, err)
            redis_server.kill()
            down_at = time.monotonic()
            _wait_for("warning", lambda: "is unreachable" in err.read_text(), proc, err)
            _wait_for(
                "progress note", lambda: "limiter unreachable: submits held" in err.read_text(), proc, err
            )

            # Held back: nothing more is sent, and no job failed (they wait as pending).
            sent = sim.ledger()["accepted"]
            assert sent < 12
            time.sleep(2.0)
            assert sim.ledger()["accepted"] == sent
            states = {row[0] for row in db_rows(db, "SELECT state FROM jobs")}
            assert states <= {"pending", "queued", "running", "downloading", "succeeded"}, states

            redis_server.start()  # the same port: the limiter answers again
            down_for = time.monotonic() - down_at
            assert proc.wait(120) == 0, err.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    finally:
        redis_server.kill()

    stderr = err.read_text()
    assert "Traceback" not in stderr
    warnings = stderr.count("is unreachable")
    assert 1 <= warnings <= 1 + int(down_for // 30), stderr  # bounded: one per 30 s, not per job
    assert "answers again after" in stderr
    assert "sending resumes" in stderr
    ledger = sim.ledger()
    assert ledger["accepted"] == 12  # every job once: none lost, none sent twice
    assert ledger["duplicates"] == []
    assert max_in_window(ledger["submit_times"]) <= RATE  # never past the rate
    assert db_rows(db, "SELECT state, attempts, count(*) FROM jobs GROUP BY state, attempts") == [
        ("succeeded", 1, 12)
    ]
