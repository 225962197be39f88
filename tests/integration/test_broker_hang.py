"""A broker that is up but does not answer neither keeps a worker from stopping nor freezes the tick.

The bug (Celery audit): with Redis stopped (``kill -STOP``: a hung host, a partition that drops
packets), every broker call waited forever — kombu's Redis transport has no socket timeout by
default. A worker asked to stop (SIGTERM) said "Warm shutdown" and was still alive a minute
later, its main thread in the heartbeat's publish; the tick leader's ticker waited in a
hand-off's ``LPUSH`` while it kept the leader lock, so nothing ticked anywhere. With timeouts
alone, the heartbeat's publish, which Celery retries without limit, reconnected for ever and
never looked at the stop asked for.

Real processes: a private ``redis-server`` on a free port (stopped and resumed by the test,
never the shared one), two ``wanbatch worker`` processes on a PostgreSQL database of their own,
the simulator in the test process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from bench.distributed import Scenario, environment, tail
from bench.distributed import wanbatch_command as wanbatch
from falsim import SimulatorOptions, running_simulator
from tests.chaos.chaos_harness import RedisServer
from worker.app import BROKER_SOCKET_TIMEOUT_SECONDS, broker_transport_options

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

MANIFEST = "name: hang\nendpoint: fal-ai/wan-22\nitems:\n" + "".join(
    f"  - prompt: shot {n}\n" for n in range(8)
)
#: How long a worker asked to stop while the broker does not answer may take: each broker call
#: it makes on the way out waits up to BROKER_SOCKET_TIMEOUT_SECONDS (the heartbeat's last try,
#: ``worker-offline``, closing the connection), the ticker up to STOP_WAIT_SECONDS.
STOP_BOUND_SECONDS = 45.0


def test_redis_transport_options_bound_every_call() -> None:
    options = broker_transport_options("redis://127.0.0.1:6379/0")
    assert options["socket_timeout"] == BROKER_SOCKET_TIMEOUT_SECONDS
    assert options["socket_connect_timeout"] > 0
    assert options["socket_keepalive"] is True
    assert "socket_timeout" not in broker_transport_options(None)  # the in-memory transport


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        server.kill()


def _worker(env: dict[str, str], cwd: Path, log: Path, name: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [*wanbatch(), "worker", "-n", name, "--concurrency", "2", "--loglevel", "INFO"],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _beats(engine_url: str) -> list[tuple[str, datetime, datetime | None]]:
    engine = create_engine(engine_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT owner, seen_at, broker_down_since FROM conductor_heartbeats"))
            return [(r[0], r[1], r[2]) for r in rows]
    finally:
        engine.dispose()


def test_a_worker_stops_on_sigterm_and_the_leader_goes_on_while_redis_does_not_answer(
    new_pg_database: Callable[[], str], redis_server: RedisServer, tmp_path: Path
) -> None:
    (tmp_path / "manifest.yaml").write_text(MANIFEST)
    database = new_pg_database()
    scenario = Scenario(jobs=8, workers=2, cap=4, latency=3.0, sim_concurrency=4, submit_rate=20.0)
    with running_simulator(SimulatorOptions(concurrency_limit=4, latency_seconds=3.0)) as sim:
        env = environment(scenario, database, redis_server.url, sim.url, tmp_path / "outputs")
        env["WANBATCH_TICK_INTERVAL"] = "0.5"
        submitted = subprocess.run(
            [*wanbatch(), "submit", str(tmp_path / "manifest.yaml")],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        leader_log, other_log = tmp_path / "w1.log", tmp_path / "w2.log"
        leader = _worker(env, tmp_path, leader_log, "w1@%h")
        workers = [leader]
        try:
            deadline = time.monotonic() + 60
            while not _beats(database) and time.monotonic() < deadline:  # w1 leads first
                assert leader.poll() is None, tail(leader_log)
                time.sleep(0.2)
            ((owner, _, _),) = _beats(database)
            assert f":{leader.pid}:" in owner, owner
            other = _worker(env, tmp_path, other_log, "w2@%h")
            workers.append(other)
            while "w2@" not in other_log.read_text(errors="replace") or "ready." not in other_log.read_text(
                errors="replace"
            ):
                assert other.poll() is None, tail(other_log)
                assert time.monotonic() < deadline, tail(other_log)
                time.sleep(0.2)
            time.sleep(2.0)  # jobs at fal, the heartbeat publishing every 2 s

            assert redis_server.proc is not None
            redis_server.proc.send_signal(signal.SIGSTOP)  # up, accepting, never answering
            stopped_at = datetime.now(UTC)
            # Long enough for w2's heartbeat publish to have timed out: it is reconnecting now.
            time.sleep(BROKER_SOCKET_TIMEOUT_SECONDS + 3)
            other.send_signal(signal.SIGTERM)
            asked = time.monotonic()
            try:
                code = other.wait(timeout=STOP_BOUND_SECONDS)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"w2 still runs {STOP_BOUND_SECONDS:.0f}s after SIGTERM with Redis stopped:\n"
                    + tail(other_log)
                )
            took = time.monotonic() - asked
            assert code == 0, tail(other_log)

            # The leader went on: its heartbeat moved while Redis did not answer, and it says
            # the broker is down (status names it), instead of hanging in a hand-off — also when
            # every job was done before Redis stopped (a slow start of w2), nothing to hand on.
            # Waited for, not assumed done by the time w2 has stopped: a loaded machine makes it later.
            deadline = time.monotonic() + 90
            while True:
                ((owner, seen_at, down_since),) = _beats(database)
                if seen_at > stopped_at + timedelta(seconds=5) and down_since is not None:
                    break
                assert leader.poll() is None, tail(leader_log)
                if time.monotonic() > deadline:  # all of it: an assert's repr is cut short
                    pytest.fail(
                        f"leader's beat at {seen_at}, Redis stopped at {stopped_at}, "
                        f"broker down since {down_since}:\n{tail(leader_log)}"
                    )
                time.sleep(0.2)
            assert f":{leader.pid}:" in owner
            assert leader.poll() is None, tail(leader_log)
            assert seen_at > stopped_at + timedelta(seconds=5), (seen_at, stopped_at, tail(leader_log))
            assert down_since is not None, tail(leader_log)
        finally:
            if redis_server.proc is not None:
                redis_server.proc.send_signal(signal.SIGCONT)
            for proc in workers:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in workers:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        said = other_log.read_text(errors="replace")
        assert "Warm shutdown" in said
        assert "Traceback" not in said, said
        assert "Traceback" not in leader_log.read_text(errors="replace")
        assert took < STOP_BOUND_SECONDS
