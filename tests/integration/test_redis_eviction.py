"""A Redis that evicts keys (``maxmemory`` set, a ``maxmemory-policy`` other than ``noeviction``)
under the limiter or the broker.

Under ``allkeys-lru`` with another tenant writing fast, the limiter's rate key was evicted between
one token request and the next. A key this process saw, found missing, restarts one interval from
now (fail safe: a flush must not allow a burst), so every ask waited and no submit ever went out;
nothing said why, and ``doctor`` said the limiter was well. Now ``doctor`` fails such a Redis (and
``wanbatch worker`` warns of it as it starts), and the limiter says, at most once a minute, when
it finds its keys gone :data:`worker.limits.EVICTED_IN_A_ROW` grants in a row — never changing
what it grants.

Real private ``redis-server`` processes on free ports (never the shared one).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from bench.distributed import tail
from bench.distributed import wanbatch_command as wanbatch
from jobs.settings import Settings
from tests.chaos.chaos_harness import RedisServer
from tests.ports import unused_port
from worker.limits import RedisGCRA

ENDPOINT = "fal-ai/wan-i2v"
FIX = "set maxmemory-policy noeviction, as Celery's Redis broker needs"
EVICTED = "its keys are being evicted"
#: ``CONFIG`` disabled, as managed Redis services do: the policy is read from ``INFO memory``.
NO_CONFIG = ("--rename-command", "CONFIG", "")
#: Generous: a loaded CI host starts a worker slowly; nothing here waits this long when well.
DEADLINE_SECONDS = 90.0


@pytest.fixture
def tmp_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    started: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(started)}", args=args)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def _settings(**extra: object) -> Settings:
    return Settings(FAL_KEY=SecretStr("eviction-test-key-4b2e"), submit_rate=2.0, **extra)  # type: ignore[arg-type]


def _evict(client: redis.Redis[bytes], key: str, filler: redis.Redis[bytes]) -> int:
    """Another tenant writes until Redis evicts ``key`` (real eviction, never a DEL): how many
    values it wrote."""
    value = os.urandom(64 * 1024)
    for written in range(1, 2000):
        filler.set(f"tenant:{time.monotonic_ns()}:{written}", value)
        if not client.exists(key):
            return written
    pytest.fail(f"{key} was never evicted")


def test_rate_keys_evicted_again_and_again_are_said_once_a_minute_and_never_burst(
    tmp_redis: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = tmp_redis("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    client = redis.Redis(port=server.port)
    tenant = redis.Redis(port=server.port, db=5)  # another tenant of the same Redis
    limiter = RedisGCRA.from_url(_settings(limits_url=server.url), server.url)
    now = [1000.0]
    limiter.evictions.clock = lambda: now[0]
    try:
        with caplog.at_level(logging.WARNING, logger="worker.limits"):
            wait, _ = limiter.grant(ENDPOINT)
            assert wait == 0  # a first start: nothing to keep to
            (key,) = [k.decode() for k in client.keys("wanbatch:limits:*")]
            waits = []
            for _ in range(8):
                _evict(client, key, tenant)
                wait, _ = limiter.grant(ENDPOINT)
                waits.append(wait)
            said = [r.getMessage() for r in caplog.records if EVICTED in r.getMessage()]
            assert len(said) == 1, said  # after 3 in a row, then not again within the minute
            assert "allkeys-lru" in said[0]
            assert FIX in said[0]
            now[0] += 61.0
            _evict(client, key, tenant)
            waits.append(limiter.grant(ENDPOINT)[0])
            said = [r.getMessage() for r in caplog.records if EVICTED in r.getMessage()]
            assert len(said) == 2, said  # a minute on, still evicted: said again
        # The safety is unchanged: a key found missing never grants early, or in a burst.
        assert all(w > 0 for w in waits), waits
    finally:
        limiter.close()
        client.close()
        tenant.close()


def test_a_flush_now_and_then_is_not_taken_for_eviction(
    tmp_redis: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A flush (or a restart) loses the keys once; the grant after it writes them back, and the next
    finds them: no word of eviction, however many such flushes there are."""
    server = tmp_redis()
    client = redis.Redis(port=server.port)
    limiter = RedisGCRA.from_url(_settings(limits_url=server.url), server.url)
    limiter.evictions.clock = lambda: 1000.0
    try:
        with caplog.at_level(logging.WARNING, logger="worker.limits"):
            limiter.grant(ENDPOINT)
            for _ in range(6):
                client.flushall()
                assert limiter.grant(ENDPOINT)[0] > 0  # restored: one interval from now
                assert limiter.grant(ENDPOINT)[0] > 0  # found there
        assert not [r for r in caplog.records if EVICTED in r.getMessage()]
    finally:
        limiter.close()
        client.close()


def test_a_first_ask_per_endpoint_is_not_taken_for_eviction(
    tmp_redis: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Each endpoint with its own limit has its own key, first written by its first ask: a key this
    process never saw, found missing, is no key lost. Four endpoints asked once each, on a Redis
    that evicts nothing, once said that the keys were being evicted."""
    endpoints = ["fal-ai/wan-22", "fal-ai/wan-i2v", "fal-ai/wan-flf2v", "wan/v2.6/image-to-video"]
    server = tmp_redis()
    settings = _settings(limits_url=server.url, submit_rate_per_endpoint={e: 50.0 for e in endpoints})
    limiter = RedisGCRA.from_url(settings, server.url)
    limiter.evictions.clock = lambda: 1000.0
    try:
        with caplog.at_level(logging.WARNING, logger="worker.limits"):
            for endpoint in endpoints * 2:
                limiter.grant(endpoint)
        assert not [r.getMessage() for r in caplog.records if EVICTED in r.getMessage()]
        assert limiter.evictions.in_a_row == 0
    finally:
        limiter.close()


@pytest.mark.parametrize(
    ("args", "fails"),
    [
        (("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"), True),
        (("--maxmemory", "64mb", "--maxmemory-policy", "volatile-ttl"), True),  # the limiter's keys have TTLs
        (("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru", *NO_CONFIG), True),
        (("--maxmemory", "64mb"), False),  # noeviction: writes refused when full, nothing lost
        (("--maxmemory-policy", "allkeys-lru"), False),  # no maxmemory: nothing is ever evicted
    ],
    ids=["allkeys-lru", "volatile-ttl", "config-disabled", "noeviction", "no-maxmemory"],
)
def test_doctor_fails_a_limiter_redis_that_evicts_keys(
    tmp_redis: Callable[..., RedisServer], args: tuple[str, ...], fails: bool
) -> None:
    from worker.doctor import check_limiter

    server = tmp_redis(*args)
    check = check_limiter(_settings(limits_url=server.url))
    if not fails:
        assert check.status == "ok", check
        assert "evict" not in check.detail
        return
    policy = args[args.index("--maxmemory-policy") + 1]
    assert check.status == "fail", check
    assert policy in check.detail
    assert "64" in check.detail  # its maxmemory, named
    assert check.fix is not None
    assert FIX in check.fix


def test_doctor_fails_a_redis_broker_that_evicts_keys(tmp_redis: Callable[..., RedisServer]) -> None:
    """The broker's own Redis (its queues, no limiter there: ``WANBATCH_LIMITS_URL`` elsewhere)."""
    from worker.doctor import check_broker, check_limiter

    broker = tmp_redis("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-random")
    limits = tmp_redis()
    settings = _settings(broker_url=broker.url, limits_url=limits.url)
    check = check_broker(settings)
    assert check.status == "fail", check
    assert "allkeys-random" in check.detail
    assert check.fix is not None
    assert FIX in check.fix
    assert check_limiter(settings).status == "ok"


def test_a_worker_starting_on_a_redis_that_evicts_keys_warns_and_starts(
    tmp_redis: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = tmp_redis("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    nowhere = f"http://127.0.0.1:{unused_port()}"  # an idle worker calls no fal; if it did, not the real one
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_") and k != "FAL_KEY"},
        "WANBATCH_BROKER_URL": server.url,
        "WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'wanbatch.db'}",
        "WANBATCH_OUTPUT_DIR": str(tmp_path / "out"),
        "WANBATCH_FAL_QUEUE_URL": nowhere,
        "WANBATCH_FAL_REST_URL": nowhere,
        "FAL_KEY": "k-eviction-worker-test",
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [*wanbatch(), "worker", "--pool", "threads", "-c", "1", "--loglevel", "INFO"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while " ready." not in log.read_text(errors="replace"):
            assert worker.poll() is None, f"the worker ended:\n{tail(log)}"
            assert time.monotonic() < deadline, f"not ready within {DEADLINE_SECONDS:.0f}s:\n{tail(log)}"
            time.sleep(0.1)
        worker.send_signal(signal.SIGTERM)
        worker.wait(DEADLINE_SECONDS)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
    text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if "allkeys-lru" in line]
    assert len(lines) == 1, text  # one line: the broker and the limiter are the same Redis
    assert "WARNING" in lines[0]
    assert FIX in lines[0]
    assert "Traceback" not in text
