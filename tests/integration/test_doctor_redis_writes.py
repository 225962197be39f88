"""``doctor`` fails a Redis broker, or a limiter's Redis, that answers but refuses writes.

The bug: only a ``wanbatch worker``'s first start wrote to its broker
(:func:`worker.broker_outage.check_writable`, exit 2). ``doctor`` only connected to it, so a
broker that was a read-only replica (``REPLICAOF`` another Redis) or full (``maxmemory`` reached
under ``noeviction``) was not found to be one: its broker check said the workers' ping failed,
or none answered, with the wrong fix ("run `wanbatch doctor` again", "start `wanbatch worker`").
Now the broker check writes once, as the worker does, and says what the worker refuses to start
with, in the same words. The limiter's Redis was already written to (its check script); that is
held here too.

Real private ``redis-server`` processes on free ports (never the shared one, whose configuration
no test changes); the database a SQLite file of the test's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from jobs.errors import ConfigError
from jobs.settings import Settings, get_settings
from tests.chaos.chaos_harness import RedisServer
from tests.in_process import run_main
from tests.ports import unused_port
from worker import doctor
from worker.broker_outage import check_writable

KEY = "doctor-writes-key-7c1d"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[dict[str, RedisServer]]:
    """A primary, its read-only replica, a Redis full to its 1 MB (``noeviction``), and one well."""
    started: list[RedisServer] = []

    def start(name: str, *args: str) -> RedisServer:
        server = RedisServer(tmp_path / name, args=args)
        started.append(server)
        server.start()
        return server

    try:
        primary = start("primary")
        replica = start(
            "replica", "--replicaof", "127.0.0.1", str(primary.port), "--replica-read-only", "yes"
        )
        full = start("full", "--maxmemory-policy", "noeviction")
        _fill(full)
        yield {"primary": primary, "replica": replica, "full": full, "well": start("well")}
    finally:
        for server in reversed(started):
            server.kill()


def _fill(server: RedisServer) -> None:
    """2 MB of values, then ``maxmemory 1mb`` (under ``noeviction``): full, by a margin no
    client's buffers come near. Written up to the limit instead, the few KB a connection's
    buffers take or free decided whether the next small write was refused."""
    client = redis.Redis(port=server.port)
    try:
        for n in range(32):
            client.set(f"filler:{n}", os.urandom(64 * 1024))
        client.config_set("maxmemory", "1mb")
        with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):  # OutOfMemoryError
            client.set("filler:one-more", b"1")
    finally:
        client.close()


def _settings(tmp_path: Path, broker: RedisServer, limiter: RedisServer) -> Settings:
    return Settings(
        FAL_KEY=SecretStr(KEY),
        broker_url=broker.url,
        limits_url=limiter.url,
        database_url=f"sqlite:///{tmp_path / 'wanbatch.db'}",
    )


def _worker_refusal(url: str) -> str:
    """What a ``wanbatch worker``'s first start on the broker at ``url`` ends with."""
    with pytest.raises(ConfigError) as refused:
        check_writable(url)
    return str(refused.value)


@pytest.mark.parametrize(
    ("broker", "cause", "fix"),
    [
        (
            "replica",
            "refuses writes (read-only replica) (ReadOnlyError: ",
            "point WANBATCH_BROKER_URL at the primary",
        ),
        (
            "full",
            "refuses writes (out of memory) (OutOfMemoryError: ",
            "give the broker's Redis memory to spare",
        ),
    ],
    ids=["replica", "full"],
)
def test_the_broker_check_fails_a_redis_broker_that_refuses_writes(
    tmp_path: Path, servers: dict[str, RedisServer], broker: str, cause: str, fix: str
) -> None:
    server = servers[broker]
    check = doctor.check_broker(_settings(tmp_path, server, servers["well"]))

    assert check.status == "fail", check
    assert check.detail.startswith(f"the broker at {server.url} {cause}"), check.detail
    assert "\n" not in check.detail
    assert check.fix is not None
    assert check.fix.startswith(fix), check.fix
    assert "`wanbatch worker` refuses to start with this one" in check.fix
    # The worker's words, reused: its refusal says the same cause and the same fix.
    said = _worker_refusal(server.url)
    assert said.startswith(f"{check.detail}. {fix[0].upper()}{fix[1:]}"), (said, check.detail)


@pytest.mark.parametrize("limiter", ["replica", "full"])
def test_the_limiter_check_fails_a_limiter_redis_that_refuses_writes(
    tmp_path: Path, servers: dict[str, RedisServer], limiter: str
) -> None:
    server = servers[limiter]
    check = doctor.check_limiter(_settings(tmp_path, servers["well"], server))

    assert check.status == "fail", check
    assert f"the submit-rate limiter's Redis at {server.url} (WANBATCH_LIMITS_URL) answers but refuses" in (
        check.detail
    )
    assert check.fix is not None
    assert "a primary, not a read-only replica" in check.fix
    assert "memory to spare" in check.fix


def test_the_broker_check_passes_a_broker_that_takes_writes_and_leaves_nothing(
    tmp_path: Path, servers: dict[str, RedisServer]
) -> None:
    """A primary takes the write (the check goes on to the workers: none here), and its probe key
    is gone within a second, as the worker's is."""
    primary = servers["primary"]
    check = doctor.check_broker(_settings(tmp_path, primary, servers["well"]))

    assert check.status == "fail", check  # for the workers alone
    assert "refuses writes" not in check.detail
    assert "no `wanbatch worker` does" in check.detail
    client = redis.Redis(port=primary.port)
    try:
        assert all(client.pttl(key) <= 1000 for key in client.keys("wanbatch:*"))
    finally:
        client.close()


def test_wanbatch_doctor_says_the_refusal_and_its_fix_and_exits_1(
    tmp_path: Path,
    servers: dict[str, RedisServer],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    replica = servers["replica"]
    monkeypatch.setenv("COLUMNS", "400")  # one line each, whatever the terminal
    monkeypatch.setenv("FAL_KEY", KEY)
    monkeypatch.setenv("WANBATCH_BROKER_URL", replica.url)
    monkeypatch.setenv("WANBATCH_LIMITS_URL", servers["well"].url)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'wanbatch.db'}")
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", f"http://127.0.0.1:{unused_port()}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    get_settings.cache_clear()
    capsys.readouterr()
    try:
        code = run_main(["doctor"], monkeypatch)
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr().out

    assert code == 1, out
    assert f"the broker at {replica.url} refuses writes (read-only replica)" in out
    assert "fix: point WANBATCH_BROKER_URL at the primary" in out
    assert "Traceback" not in out
    assert KEY not in out
