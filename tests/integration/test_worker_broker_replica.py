"""A ``wanbatch worker`` whose broker is a read-only replica of a Redis.

The bug (Redis review, item 4): ``WANBATCH_BROKER_URL`` pointed at a replica (its limiter on a
Redis of its own, so that the limiter's check passed) made Celery's start fail on the first write,
and the worker, taking that for an outage, started afresh and waited for the replica to take
writes, a warning every 30 s, for ever: a mistake in the configuration said as an outage. Now a
first start checks that the broker takes a write and ends with one line and exit 2, naming the
fix; only a worker started afresh (an outage under way) waits, and starts once it takes writes.

Real processes: private ``redis-server``s on free ports (never the shared one), a worker on a
SQLite database of its own.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bench.distributed import wanbatch_command as wanbatch
from tests.chaos.chaos_harness import RedisServer
from tests.integration.test_worker_broker_out_of_memory import (
    DEADLINE_SECONDS,
    _env,
    _kill,
    _start,
    _stop,
    _until,
)

pytestmark = [pytest.mark.slow]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, RedisServer]]:
    """A primary, its read-only replica (the broker), and the limiter's own Redis."""
    primary = RedisServer(tmp_path / "primary")
    primary.start()
    replica = RedisServer(tmp_path / "replica", args=("--replicaof", "127.0.0.1", str(primary.port)))
    limiter = RedisServer(tmp_path / "limiter")
    try:
        replica.start()
        limiter.start()
        yield primary, replica, limiter
    finally:
        for server in (limiter, replica, primary):
            server.kill()


def test_a_first_start_on_a_read_only_replica_ends_with_one_line_and_exit_2(
    tmp_path: Path, servers: tuple[RedisServer, RedisServer, RedisServer]
) -> None:
    _, replica, limiter = servers
    first = subprocess.run(
        [*wanbatch(), "worker", "-c", "1"],
        env=_env(tmp_path, replica.url, WANBATCH_LIMITS_URL=limiter.url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE_SECONDS,
        check=False,
    )
    assert first.returncode == 2, first.stderr
    lines = [line for line in first.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, first.stderr
    assert f"the broker at {replica.url} refuses writes (read-only replica)" in lines[0]
    assert "Point WANBATCH_BROKER_URL at the primary" in lines[0]
    assert "Traceback" not in first.stderr + first.stdout


def test_a_worker_started_afresh_on_a_replica_waits_until_it_takes_writes(
    tmp_path: Path, servers: tuple[RedisServer, RedisServer, RedisServer]
) -> None:
    from cli.service_commands import RESTARTED_ENV  # what a worker that starts itself afresh sets

    _, replica, limiter = servers
    log = tmp_path / "restarted.log"
    env = _env(tmp_path, replica.url, WANBATCH_LIMITS_URL=limiter.url, **{RESTARTED_ENV: "1"})
    worker = _start(tmp_path, env, log)

    def said() -> str:
        return log.read_text(errors="replace")

    waits = f"the broker at {replica.url} refuses writes (read-only replica)"
    try:
        _until("the wait for the broker", lambda: waits in said(), worker, log)
        assert " ready." not in said()
        client = redis.Redis(port=replica.port)
        try:
            client.execute_command("REPLICAOF", "NO", "ONE")  # promoted: it takes writes
        finally:
            client.close()
        _until("ready line", lambda: " ready." in said(), worker, log)
        code = _stop(worker, log)
    finally:
        _kill(worker)
    assert code == 0, said()
    assert "Traceback" not in said()
