"""What a real ``wanbatch worker`` says when its Redis broker is killed (``kill -9``) under it.

The Redis broker is the limiter's Redis too (no ``WANBATCH_LIMITS_URL``), so a worker asked to stop
during the outage cannot delete its record there (:meth:`worker.peers.Announcer.withdraw`). It said
so twice: the ticker thread closes its conductor as it ends, and the worker's shutdown closes it
again to make sure (:meth:`worker.ticker.Ticker.shutdown`), each close trying the delete and saying
it failed. One record, one outage: one line.

Real processes: a private ``redis-server`` on a free port (killed by the test, never the shared
one), one worker on a SQLite database of its own, per pool.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from bench.distributed import tail
from bench.distributed import wanbatch_command as wanbatch
from tests.chaos.chaos_harness import RedisServer
from tests.ports import unused_port
from worker.limits import KEY_PREFIX

pytestmark = [pytest.mark.slow]

#: Generous: a loaded CI host starts a prefork worker slowly; nothing here waits this long when well.
DEADLINE_SECONDS = 90.0
RECORD_LEFT = "could not delete this worker's record"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _env(tmp_path: Path, broker: str) -> dict[str, str]:
    nowhere = f"http://127.0.0.1:{unused_port()}"  # an idle worker calls no fal; if it did, not the real one
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_") and k != "FAL_KEY"},
        "WANBATCH_BROKER_URL": broker,
        "WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'wanbatch.db'}",
        "WANBATCH_OUTPUT_DIR": str(tmp_path / "out"),
        "WANBATCH_FAL_QUEUE_URL": nowhere,
        "WANBATCH_FAL_REST_URL": nowhere,
        "FAL_KEY": "k-broker-outage-log-test",
        "PYTHONUNBUFFERED": "1",
    }


def _until(what: str, done: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not done():
        assert proc.poll() is None, f"the worker ended while waiting for {what}:\n{tail(log)}"
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_SECONDS:.0f}s:\n{tail(log)}"
        time.sleep(0.1)


def _has_record(url: str) -> bool:
    """Whether some worker's record is on the Redis at ``url`` (:func:`worker.peers.peers_key`)."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return any(client.hlen(key) for key in client.scan_iter(match=f"{KEY_PREFIX}*:workers"))
    finally:
        client.close()


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_worker_stopping_during_a_broker_outage_says_once_that_its_record_stays(
    tmp_path: Path, redis_server: RedisServer, pool: str
) -> None:
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [*wanbatch(), "worker", "--pool", pool, "-c", "1", "--loglevel", "INFO"],
            env=_env(tmp_path, redis_server.url),
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def said() -> str:
        return log.read_text(errors="replace")

    try:
        _until("ready line", lambda: " ready." in said(), worker, log)
        _until("record on the limiter's Redis", lambda: _has_record(redis_server.url), worker, log)

        redis_server.kill()  # SIGKILL: no goodbye to the clients
        _until("notice of the lost broker", lambda: "Connection to broker lost" in said(), worker, log)
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(timeout=DEADLINE_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker still runs {DEADLINE_SECONDS:.0f}s after SIGTERM:\n{tail(log)}")
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
    text = said()
    assert code == 0, tail(log)
    assert text.count(RECORD_LEFT) == 1, text
    assert "Traceback" not in text, text
