"""Every worker publishes the settings that decide a job's outcome; ``doctor`` and ``status``
name a worker whose settings differ from the others' (:mod:`worker.peers`).

Before: only the tick leader published its limits, each worker compared them with its own and
said so in its own log alone. A worker started with ``WANBATCH_MEDIA_MISMATCH=fail`` beside
default ones failed (and deleted) videos the others flagged, and ``doctor`` said all was well.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import Engine

from jobs.settings import Settings, get_settings
from tests.in_process import run_main
from tests.step_runtime import FAST, make_runtime
from worker import conductor as conductor_module
from worker import limits as limits_module
from worker.conductor import Conductor
from worker.limits import Limits, RedisGCRA, api_key_id, leader_key, limits_changed, policy_key
from worker.peers import Peer, disagreements, global_disagreements, peer_warnings, peers_key

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


def test_a_global_limit_is_named_with_the_tick_leaders_value_in_force() -> None:
    """The tick leader applies the global limits for every worker: a worker with another value
    is no "each worker applies its own" split, and the value in force (the leader's) is named."""

    def peer(owner: str, outstanding: str = "8", rate: str = "2", backlog: str = "8") -> Peer:
        shown = {
            "WANBATCH_MEDIA_MISMATCH": "flag",
            "WANBATCH_MAX_OUTSTANDING": outstanding,
            "WANBATCH_SUBMIT_RATE": rate,
            "WANBATCH_MAX_DOWNLOAD_BACKLOG": backlog,
        }
        return Peer(owner, 0.0, shown)

    w1, w2, w3 = peer("vm:11452:"), peer("vm:11453:"), peer("vm:11460:", "20", "5", "20")
    assert disagreements([w1, w2, w3]) == []  # none of them is a per-worker setting
    assert global_disagreements([w1, w2, w3], "vm:11452:") == [
        "WANBATCH_MAX_OUTSTANDING: the tick leader's (vm:11452) value 8 applies to all workers; "
        "worker pid 11460@vm has 20",
        "WANBATCH_SUBMIT_RATE: the tick leader's (vm:11452) value 2 applies to all workers; "
        "worker pid 11460@vm has 5",
        "WANBATCH_MAX_DOWNLOAD_BACKLOG: the tick leader's (vm:11452) value 8 applies to all workers; "
        "worker pid 11460@vm has 20",
    ]
    # The odd one leads: its value is the one in force, the majority's is not.
    assert global_disagreements([w1, w2, w3], "vm:11460:")[0] == (
        "WANBATCH_MAX_OUTSTANDING: the tick leader's (vm:11460) value 20 applies to all workers; "
        "worker pid 11452@vm, worker pid 11453@vm have 8"
    )
    # No live leader known (between two), or one that published no record: no value is made up.
    assert global_disagreements([w1, w3], None)[0] == (
        "WANBATCH_MAX_OUTSTANDING: the tick leader's value applies to all workers (no live tick "
        "leader is known); worker pid 11452@vm has 8; worker pid 11460@vm has 20"
    )
    assert global_disagreements([w1, w3], "old:1:")[0].startswith(
        "WANBATCH_MAX_OUTSTANDING: the tick leader's (old:1) value applies to all workers (it published"
    )
    assert peer_warnings([w1, w3], None, leaderless=False) == []  # a worker's log, between two leaders
    (line,) = peer_warnings([w1, w2, w3], "vm:11452:")
    assert "Each worker applies its own" not in line
    assert line.startswith("the workers run with different global limits: WANBATCH_MAX_OUTSTANDING: ")
    # A per-worker setting beside them: its own line, as before.
    odd = Peer("vm:11460:", 0.0, {**w3.settings, "WANBATCH_MEDIA_MISMATCH": "fail"})
    per_worker, limits = peer_warnings([w1, w2, odd], "vm:11452:")
    assert "worker pid 11460@vm: WANBATCH_MEDIA_MISMATCH=fail, the others flag. Each worker" in per_worker
    assert "WANBATCH_MAX_OUTSTANDING" not in per_worker
    assert "the tick leader's (vm:11452) value 8 applies to all workers" in limits


def test_a_new_leaders_change_of_the_global_limits_is_worded_from_and_to() -> None:
    def limits(rate: float, outstanding: int, by: str) -> Limits:
        settings = Settings(FAL_KEY=SecretStr(KEY), submit_rate=rate, max_outstanding=outstanding)
        return Limits.of(settings, by)

    old, new = limits(2, 8, "vm:11452:"), limits(5, 20, "vm:11460:")
    assert limits_changed(new, old, live=False) == (
        "global limits changed with the new tick leader vm:11460: WANBATCH_SUBMIT_RATE 2 -> 5; "
        "WANBATCH_MAX_OUTSTANDING 8 -> 20 (the previous values were published by vm:11452, no longer "
        "live); the new leader's apply to every worker: give every worker the same settings"
    )
    assert limits_changed(limits(2, 8, "vm:11460:"), old, live=True) is None


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


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # the workers' database
def test_the_global_limits_in_force_are_the_leaders_and_a_new_leaders_change_is_said(
    engine: Engine,
    peers_db: tuple[str, redis.Redis[bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The audit's deployment: w1 (the leader) and w2 with WANBATCH_MAX_OUTSTANDING=8 and
    WANBATCH_SUBMIT_RATE=2, w3 with 20 and 5. Every worker, ``doctor`` and ``status`` said
    "each worker applies its own" and named no value in force (8); once the leader stopped and w3
    took over, the cap went from 8 to 20 and nothing said so."""
    from worker.doctor import check_limiter
    from worker.steps.webhooks import database_fingerprint, webhook_secret

    redis_db, redis_client = peers_db
    database = database_fingerprint(webhook_secret(engine))
    monkeypatch.setattr(conductor_module, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(limits_module, "_said", set())  # this test's lines, said once each

    def worker_settings(**extra: object) -> Settings:
        given: dict[str, object] = {
            **FAST,
            "fal_queue_url": "https://queue.test",
            "fal_rest_url": "https://queue.test",
            "tick_interval": 600.0,
            "output_dir": tmp_path / "out",
            "submit_rate": 2.0,
            "max_outstanding": 8,
            **extra,
        }
        return Settings(FAL_KEY=SecretStr(KEY), **given)  # type: ignore[arg-type]

    # w3 asks for the leader lock every 0.1 s (the others keep what they had at their start).
    plans = [("host-a:101:", worker_settings()), ("host-b:102:", worker_settings())]
    plans.append(("host-c:103:", worker_settings(submit_rate=5.0, max_outstanding=20, tick_interval=0.1)))
    leads = {"host-a:101:": True, "host-b:102:": False, "host-c:103:": False}
    # Each conductor's thread is its own process: it publishes and announces as that one.
    building: list[str] = []
    monkeypatch.setattr(
        conductor_module,
        "process_prefix",
        lambda: threading.current_thread().name.partition("/")[2] or building[-1],
    )
    stops: dict[str, threading.Event] = {}
    conductors: dict[str, Conductor] = {}
    runners: dict[str, threading.Thread] = {}
    limiters: list[RedisGCRA] = []
    policy = policy_key(api_key_id(plans[0][1]), database)

    def published_by() -> bytes | None:
        return redis_client.hget(policy, "by")

    def stop(owner: str) -> None:
        stops[owner].set()
        conductors[owner].wake()
        runners[owner].join(20)
        conductors[owner].close()

    def changes() -> list[str]:
        return [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "limits.changed"]

    try:
        with caplog.at_level(logging.WARNING):
            for owner, settings in plans:
                rt = make_runtime(engine, settings)
                rt.limiter = limiter = RedisGCRA.from_url(settings, redis_db, database=database)
                limiters.append(limiter)
                building.append(owner)
                conductors[owner] = conductor = Conductor(rt, stream=False)
                stops[owner] = threading.Event()
                runners[owner] = threading.Thread(
                    target=conductor.run,
                    args=(stops[owner],),
                    kwargs={"leads": lambda o=owner: leads[o], "resilient": True},
                    name=f"conductor/{owner}",
                )
                runners[owner].start()
            _wait_for(lambda: redis_client.hlen(peers_key(database)) == 3, "every worker's record")
            _wait_for(lambda: published_by() == b"host-a:101:", "w1's limits")

            monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
            monkeypatch.setenv("WANBATCH_BROKER_URL", redis_db)
            monkeypatch.setenv("FAL_KEY", KEY)
            monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", "https://queue.test")
            monkeypatch.setenv("WANBATCH_FAL_REST_URL", "https://queue.test")
            monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "out"))
            get_settings.cache_clear()
            in_force = (
                "WANBATCH_MAX_OUTSTANDING: the tick leader's (host-a:101) value 8 applies to all workers; "
                "worker pid 103@host-c has 20"
            )
            doctor = check_limiter(get_settings())
            assert doctor.status == "fail", doctor
            assert in_force in doctor.detail
            assert "WANBATCH_SUBMIT_RATE: the tick leader's (host-a:101) value 2 applies" in doctor.detail
            assert "Each worker applies its own" not in doctor.detail
            assert "WANBATCH_MAX_OUTSTANDING=20" not in doctor.detail
            assert run_main(["status"], monkeypatch) == 0
            assert in_force in " ".join(capsys.readouterr().err.split())
            said = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "limits.mismatch"]
            assert [line for line in said if in_force in line]  # the workers' logs say it too

            # w1 stops (SIGTERM: a clean stop takes its policy with it); w3 takes the lead.
            stop("host-a:101:")
            assert not redis_client.exists(policy)
            assert changes() == []
            leads["host-c:103:"] = True
            _wait_for(lambda: published_by() == b"host-c:103:", "w3's limits")
            at = redis_client.hget(policy, "at")
            _wait_for(lambda: redis_client.hget(policy, "at") != at, "w3's next beat")  # said once
            (line,) = changes()
            assert line.startswith(
                "global limits changed with the new tick leader host-c:103: WANBATCH_SUBMIT_RATE 2 -> 5; "
                "WANBATCH_MAX_OUTSTANDING 8 -> 20 (the previous values were published by host-a:101, "
                "no longer live)"
            )
            _wait_for(lambda: redis_client.hlen(peers_key(database)) == 2, "w1's record gone")
            doctor = check_limiter(get_settings())
            assert (
                "WANBATCH_MAX_OUTSTANDING: the tick leader's (host-c:103) value 20 applies to all workers; "
                "worker pid 102@host-b has 8"
            ) in doctor.detail
            said = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "limits.mismatch"]
            assert not [line for line in said if "no live tick leader is known" in line]  # nor between two
    finally:
        get_settings.cache_clear()
        for owner in stops:
            stops[owner].set()
            conductors[owner].wake()
        for runner in runners.values():
            runner.join(20)
        for conductor in conductors.values():
            conductor.close()
        redis_client.delete(peers_key(database), policy, policy + ":last", leader_key(database))
        for limiter in limiters:
            limiter.close()


def test_a_new_leader_after_an_older_version_compares_with_that_leader_s_limits(
    peers_db: tuple[str, redis.Redis[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling upgrade: leader A (this version) published, then B, of a version that keeps no
    copy of the limits published last, led; C (this version) takes over from B, live. The limits
    in force until C were B's: C compares with those and names B, never A's week-old copy."""
    url, _client = peers_db
    database = f"rolling-{uuid.uuid4().hex[:8]}"

    def limiter(rate: float, outstanding: int) -> RedisGCRA:
        settings = Settings(FAL_KEY=SecretStr(KEY), submit_rate=rate, max_outstanding=outstanding)
        return RedisGCRA.from_url(settings, url, database=database)

    a, b, c = limiter(2, 8), limiter(5, 20), limiter(5, 20)
    try:
        limits_module.publish_limits(a, "host-a:1:")
        # B publishes as a version without the copy did: the policy and the leader record only.
        flat = [part for pair in Limits.of(b.settings, "host-b:2:").fields().items() for part in pair]
        b._publish(keys=[b.policy, b.leader_record], args=[limits_module.POLICY_TTL_SECONDS, *flat])
        with caplog.at_level(logging.WARNING):
            limits_module.publish_limits(c, "host-c:3:")
        said = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "limits.changed"]
        assert said == []  # C's limits are B's, in force until now: nothing changed
    finally:
        for one in (a, b, c):
            one.close()
