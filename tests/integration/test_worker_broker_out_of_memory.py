"""A real ``wanbatch worker`` outlives its Redis broker running out of memory.

The bug (Redis-out-of-memory audit, item 1): with the broker's Redis full (``maxmemory`` reached
under ``noeviction``) a task's acknowledgement (``ZREM unacked_index`` in a transaction) was
refused; Celery ended its worker (``CRITICAL celery.worker: Unrecoverable error:
server:OutOfMemoryError`` and some 70 traceback lines), ``wanbatch worker`` started afresh
(``os.execv``), and the new start's limiter check — the broker's Redis is the limiter's — turned
the outage into ``error: … refuses the limiter's script: command not allowed when used memory >
'maxmemory' … nothing was sent`` and exit 2: one worker fewer for good.

Now a worker started afresh waits for its Redis (a warning every 30 s) and starts once it takes
writes again; Celery's ending is one warning line. The first start still checks (exit 2): a
Redis that refuses the limiter then is a configuration to fix, not an outage under way.

Real processes: a private ``redis-server`` on a free port (never the shared one) made full with
``CONFIG SET maxmemory``, a worker on a SQLite database of its own.
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
from worker.app import make_app
from worker.tasks import SUBMIT_TASK, register_tasks

pytestmark = [pytest.mark.slow]

#: Generous: a loaded CI host starts a worker slowly; nothing here waits this long when well.
DEADLINE_SECONDS = 90.0
#: What the limiter's warning says of a Redis that answers but refuses its script.
LIMITER_REFUSES = "answers but refuses the limiter's script: command not allowed when used memory"
#: What the limiter's warning of an outage (a wait, not an error) ends with.
LIMITER_WAITS = "; nothing is submitted until it accepts it (jobs wait, none fails)"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _delivered(url: str) -> bool:
    """Whether the worker has taken the message: kombu's Redis transport keeps a message it
    delivered, not yet acknowledged, in its ``unacked`` hash (the worker no longer logs Celery's
    "Task … received" line at INFO)."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return bool(client.hlen("unacked"))
    finally:
        client.close()


def _maxmemory(url: str, value: str) -> None:
    """``"1"``: every write is refused (the server uses more than a byte, and evicts nothing);
    ``"0"``: no limit."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.config_set("maxmemory", value)
    finally:
        client.close()


def _env(tmp_path: Path, broker: str, **more: str) -> dict[str, str]:
    nowhere = f"http://127.0.0.1:{unused_port()}"  # no fal is called; if it were, not the real one
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WANBATCH_", "_WANBATCH_")) and k != "FAL_KEY"
    }
    return {
        **env,
        "WANBATCH_BROKER_URL": broker,  # the limiter's Redis too (no WANBATCH_LIMITS_URL)
        "WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'wanbatch.db'}",
        "WANBATCH_OUTPUT_DIR": str(tmp_path / "out"),
        "WANBATCH_FAL_QUEUE_URL": nowhere,
        "WANBATCH_FAL_REST_URL": nowhere,
        "FAL_KEY": "k-broker-oom-test",
        "PYTHONUNBUFFERED": "1",
        **more,
    }


def _start(tmp_path: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [*wanbatch(), "worker", "-c", "1", "--loglevel", "INFO"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _until(what: str, done: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not done():
        assert proc.poll() is None, f"the worker ended while waiting for {what}:\n{tail(log)}"
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_SECONDS:.0f}s:\n{tail(log)}"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], log: Path) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=DEADLINE_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker still runs {DEADLINE_SECONDS:.0f}s after SIGTERM:\n{tail(log)}")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_a_worker_whose_ack_a_full_redis_refuses_starts_afresh_and_waits_for_it(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    broker = redis_server.url
    log = tmp_path / "worker.log"
    worker = _start(tmp_path, _env(tmp_path, broker), log)

    def said() -> str:
        return log.read_text(errors="replace")

    try:
        _until("ready line", lambda: said().count(" ready.") == 1, worker, log)
        # A message for a job this worker's database does not hold: the task pauses 2 s before
        # it hands it back, and is acknowledged when it ends — by then Redis is full.
        app = make_app(broker)
        register_tasks(app)
        app.tasks[SUBMIT_TASK].apply_async(("0" * 32,))
        _until("task received", lambda: _delivered(broker), worker, log)
        _maxmemory(broker, "1")
        _until("restart", lambda: "restarting it" in said(), worker, log)
        _until("the restarted worker's wait", lambda: LIMITER_WAITS in said(), worker, log)
        assert worker.poll() is None  # waiting, not ended with exit 2
        _maxmemory(broker, "0")
        _until("second ready line", lambda: said().count(" ready.") == 2, worker, log)
        code = _stop(worker, log)
    finally:
        _kill(worker)
    text = said()
    assert code == 0, tail(log)
    assert "Traceback" not in text, text
    assert "Unrecoverable error" not in text, text
    stopped = [line for line in text.splitlines() if "the Celery worker stopped: the broker" in line]
    assert len(stopped) == 1, text
    assert " WARNING " in stopped[0]
    assert "refuses writes (out of memory)" in stopped[0]
    assert "nothing was sent" not in text  # no start-up error
    assert "accepts the limiter's script again" in text  # the wait's end is said


def test_a_restarted_worker_waits_for_a_full_redis_where_a_first_start_refuses_it(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    from cli.service_commands import RESTARTED_ENV  # what a worker that starts itself afresh sets

    broker = redis_server.url
    _maxmemory(broker, "1")
    first = subprocess.run(
        [*wanbatch(), "worker", "-c", "1"],
        env=_env(tmp_path, broker),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE_SECONDS,
        check=False,
    )
    assert first.returncode == 2, first.stderr  # a first start: the configuration is checked
    assert LIMITER_REFUSES in first.stderr

    log = tmp_path / "restarted.log"
    worker = _start(tmp_path, _env(tmp_path, broker, **{RESTARTED_ENV: "1"}), log)

    def said() -> str:
        return log.read_text(errors="replace")

    try:
        _until("the wait's warning", lambda: LIMITER_WAITS in said(), worker, log)
        assert worker.poll() is None
        assert " ready." not in said()
        _maxmemory(broker, "0")
        _until("ready line", lambda: " ready." in said(), worker, log)
        code = _stop(worker, log)
    finally:
        _kill(worker)
    text = said()
    assert code == 0, tail(log)
    assert LIMITER_REFUSES in text
    assert "Traceback" not in text, text


def test_a_worker_whose_broker_alone_is_full_refuses_a_first_start_and_waits_once_started_afresh(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The limiter on a Redis of its own (``WANBATCH_LIMITS_URL``): the limiter's check passes.
    A first start checks that the broker takes a write, as the limiter's check does for its
    Redis: one line and exit 2, as a full limiter's Redis is (Celery's start, which writes to
    the broker, once failed, started afresh every 3 s with a traceback, and then waited as if
    for an outage). A worker started afresh (an outage under way) waits for the broker to take
    writes (a warning every 30 s) before Celery starts."""
    from cli.service_commands import RESTARTED_ENV  # what a worker that starts itself afresh sets

    limiter = RedisServer(tmp_path / "limiter")
    limiter.start()
    broker = redis_server.url
    _maxmemory(broker, "1")
    waits = f"the broker at {broker} refuses writes (out of memory)"
    try:
        first = subprocess.run(
            [*wanbatch(), "worker", "-c", "1"],
            env=_env(tmp_path, broker, WANBATCH_LIMITS_URL=limiter.url),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=DEADLINE_SECONDS,
            check=False,
        )
        assert first.returncode == 2, first.stderr
        lines = [line for line in first.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, first.stderr
        assert waits in lines[0]
        assert "raise its maxmemory" in lines[0]

        log = tmp_path / "worker.log"
        env = _env(tmp_path, broker, WANBATCH_LIMITS_URL=limiter.url, **{RESTARTED_ENV: "1"})
        worker = _start(tmp_path, env, log)

        def said() -> str:
            return log.read_text(errors="replace")

        try:
            _until("the wait for the broker", lambda: f"{waits} (" in said(), worker, log)
            assert " ready." not in said()
            _maxmemory(broker, "0")
            _until("ready line", lambda: " ready." in said(), worker, log)
            code = _stop(worker, log)
        finally:
            _kill(worker)
    finally:
        limiter.kill()
    text = said()
    assert code == 0, tail(log)
    assert "Traceback" not in text, text
    assert "restarting it" not in text, text  # it waited before Celery started
    assert "this worker, started afresh, waits for it to take writes before it starts" in text
    assert f"the broker at {broker} takes writes again" in text
