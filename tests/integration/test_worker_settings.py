"""Every worker publishes the settings that decide a job's outcome; ``doctor`` and ``status``
name a worker whose settings differ from the others' (:mod:`worker.peers`).

Before: only the tick leader published its limits, each worker compared them with its own and
said so in its own log alone. A worker started with ``WANBATCH_MEDIA_MISMATCH=fail`` beside
default ones failed (and deleted) videos the others flagged, and ``doctor`` said all was well.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import Engine

from jobs.settings import Settings, get_settings
from tests.in_process import run_main
from tests.step_runtime import FAST, make_runtime
from worker import conductor as conductor_module
from worker.conductor import Conductor
from worker.limits import RedisGCRA, api_key_id, leader_key, policy_key
from worker.peers import Peer, disagreements, peers_key

KEY = "peers-test-key-7c2e41"


@pytest.fixture
def peers_db(redis_db: str) -> Iterator[tuple[str, redis.Redis[bytes]]]:
    """A Redis database of the test's own (claimed: see ``tests/conftest.py``), and a client."""
    c = redis.Redis.from_url(redis_db)
    yield redis_db, c
    c.close()


def test_the_odd_worker_and_its_setting_are_named() -> None:
    def peer(owner: str, **shown: str) -> Peer:
        return Peer(owner, 0.0, {"WANBATCH_MEDIA_MISMATCH": "flag", "WANBATCH_MAX_ATTEMPTS": "3", **shown})

    agreeing = [peer("a:1:"), peer("b:2:")]
    assert disagreements(agreeing) == []
    (line,) = disagreements([*agreeing, peer("c:3:", WANBATCH_MEDIA_MISMATCH="fail")])
    assert line == "worker pid 3@c: WANBATCH_MEDIA_MISMATCH=fail, the others flag"
    # No majority: each value and its workers.
    (line,) = disagreements([peer("a:1:"), peer("b:2:", WANBATCH_MAX_ATTEMPTS="1")])
    assert line == "the workers disagree on WANBATCH_MAX_ATTEMPTS: 3 on worker pid 1@a; 1 on worker pid 2@b"
    # Another path to the same folder (a symlink) is the same output; another folder is not.
    here = Peer("a:1:", 0.0, {"WANBATCH_OUTPUT_DIR": "/x/linked"}, "/x/outputs")
    there = Peer("b:2:", 0.0, {"WANBATCH_OUTPUT_DIR": "/x/outputs"}, "/x/outputs")
    elsewhere = Peer("c:3:", 0.0, {"WANBATCH_OUTPUT_DIR": "/y/outputs"}, "/y/outputs")
    assert disagreements([here, there]) == []
    (line,) = disagreements([here, there, elsewhere])
    assert line.startswith("worker pid 3@c: WANBATCH_OUTPUT_DIR=/y/outputs, the others ")


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # the workers' database
def test_doctor_and_status_name_a_worker_whose_settings_differ_from_the_others(
    engine: Engine,
    peers_db: tuple[str, redis.Redis[bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from worker.doctor import check_limiter
    from worker.steps.webhooks import database_fingerprint, webhook_secret

    redis_db, redis_client = peers_db
    database = database_fingerprint(webhook_secret(engine))
    monkeypatch.setattr(conductor_module, "HEARTBEAT_SECONDS", 0.05)

    def worker_settings(**extra: object) -> Settings:
        given: dict[str, object] = {
            **FAST,
            "fal_queue_url": "https://queue.test",
            "fal_rest_url": "https://queue.test",
            "tick_interval": 600.0,
            "output_dir": tmp_path / "out",
            **extra,
        }
        return Settings(FAL_KEY=SecretStr(KEY), **given)  # type: ignore[arg-type]

    odd = worker_settings(
        media_mismatch="fail",
        max_attempts=1,
        output_dir=tmp_path / "elsewhere",
        fal_rest_url="https://proxy-user:proxy-pass-91@rest.test/;token=q-secret-55",  # no query: refused
    )
    plans = [("host-a", 101, worker_settings(), True), ("host-b", 102, worker_settings(), False)]
    plans.append(("host-c", 103, odd, False))
    stops: list[threading.Event] = []
    conductors: list[Conductor] = []
    limiters: list[RedisGCRA] = []
    runners: list[threading.Thread] = []
    try:
        for host, pid, settings, leads in plans:
            rt = make_runtime(engine, settings)
            rt.limiter = limiter = RedisGCRA.from_url(settings, redis_db, database=database)
            limiters.append(limiter)
            monkeypatch.setattr(conductor_module, "process_prefix", lambda h=host, p=pid: f"{h}:{p}:")
            conductor = Conductor(rt, stream=False)
            conductors.append(conductor)
            stops.append(threading.Event())
            runner = threading.Thread(
                target=conductor.run,
                args=(stops[-1],),
                kwargs={"leads": lambda leads=leads: leads, "resilient": True},
            )
            runner.start()
            runners.append(runner)
        deadline = time.monotonic() + 20
        while redis_client.hlen(peers_key(database)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        stored = redis_client.hgetall(peers_key(database))
        assert sorted(stored) == [b"host-a:101:", b"host-b:102:", b"host-c:103:"]
        raw = b" ".join(stored.values())
        for secret in (KEY, "proxy-pass-91", "proxy-user", "q-secret-55"):
            assert secret.encode() not in raw  # never a key, a password or a query in Redis

        # doctor, on a host whose own settings are the majority's: its limiter check fails.
        monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
        monkeypatch.setenv("WANBATCH_BROKER_URL", redis_db)
        monkeypatch.setenv("FAL_KEY", KEY)
        monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", "https://queue.test")
        monkeypatch.setenv("WANBATCH_FAL_REST_URL", "https://queue.test")
        monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "out"))
        get_settings.cache_clear()
        doctor = check_limiter(get_settings())
        assert doctor.status == "fail", doctor
        for said in (
            "worker pid 103@host-c: WANBATCH_MEDIA_MISMATCH=fail, the others flag",
            "worker pid 103@host-c: WANBATCH_MAX_ATTEMPTS=1, the others 3",
            f"worker pid 103@host-c: WANBATCH_OUTPUT_DIR={tmp_path / 'elsewhere'}, "
            f"the others {tmp_path / 'out'}",
            "worker pid 103@host-c: WANBATCH_FAL_REST_URL=https://rest.test, the others https://queue.test",
        ):
            assert said in doctor.detail
        assert "proxy-pass-91" not in doctor.detail
        assert "q-secret-55" not in doctor.detail

        # status prints it too.
        assert run_main(["status"], monkeypatch) == 0
        err = " ".join(capsys.readouterr().err.split())
        assert "worker pid 103@host-c: WANBATCH_MEDIA_MISMATCH=fail, the others flag" in err
        assert KEY not in err
        assert "proxy-pass-91" not in err

        # The odd worker stops cleanly: its record goes with it, and nothing is said any more.
        stops[2].set()
        conductors[2].wake()
        runners[2].join(20)
        conductors[2].close()
        assert redis_client.hexists(peers_key(database), "host-c:103:") == 0
        doctor = check_limiter(get_settings())
        assert doctor.status == "ok", doctor
        assert "WANBATCH_MEDIA_MISMATCH" not in doctor.detail
    finally:
        get_settings.cache_clear()
        for stop, conductor in zip(stops, conductors, strict=True):
            stop.set()
            conductor.wake()
        for runner in runners:
            runner.join(20)
        for conductor in conductors:
            conductor.close()
        redis_client.delete(
            peers_key(database), policy_key(api_key_id(plans[0][2]), database), leader_key(database)
        )
        for limiter in limiters:
            limiter.close()


def test_a_dead_workers_record_is_named_by_nothing(peers_db: tuple[str, redis.Redis[bytes]]) -> None:
    """A worker that died leaves its record behind: older than a leader's beats, it is not read."""
    from worker.peers import read_peers

    redis_db, redis_client = peers_db

    database = f"test-db-{uuid.uuid4().hex[:12]}"
    stale = 1_000_000 * 1000  # Redis' clock, µs: long ago
    fresh = int(time.time() * 1_000_000)
    body = '{"output_real": null, "settings": {"WANBATCH_MEDIA_MISMATCH": "%s"}}'
    try:
        redis_client.hset(peers_key(database), "dead:1:", f"{stale} " + body % "fail")
        redis_client.hset(peers_key(database), "live:2:", f"{fresh} " + body % "flag")
        settings = Settings(FAL_KEY=KEY, limits_url=redis_db)
        assert [peer.owner for peer in read_peers(settings, database)] == ["live:2:"]
    finally:
        redis_client.delete(peers_key(database))
