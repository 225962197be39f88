"""``status`` and the dashboard name a worker gone from its stale record on Redis (:mod:`worker.peers`).

A worker that does not lead the ticks records no heartbeat in the database, and a pid on another
host cannot be looked up: killed -9, the jobs it held showed as "in flight" with nothing said
until their leases ended (minutes). Every worker writes its own record on the limiter's Redis at
each beat; one not refreshed for :data:`worker.peers.PEER_GONE_SECONDS` now names the jobs it
holds (``dead_lease_holders``, ``worker_record_stale``) and when they are taken over — reporting
only. A clean stop deletes the record for good (no later beat writes it back), so a stopped
worker is never named; a long-dead worker's record is pruned; a Redis that does not answer is
one warning line.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import Engine, update

from jobs import db, store
from jobs.listing import utc_clock
from jobs.models import EVERY_BATCH, Job, utcnow
from jobs.settings import Settings, get_settings
from jobs.states import JobState
from tests.in_process import run_main
from tests.step_runtime import FAST, add_batch, make_runtime
from tests.web.web_helpers import HTML, app_for, client, settings_for
from worker import conductor as conductor_module
from worker.conductor import Conductor
from worker.limits import RedisGCRA
from worker.peers import PEER_GONE_SECONDS, PEERS_KEEP_SECONDS, Announcer, peers_key

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

KEY = "dead-worker-test-key-4e1b"
T2V = "fal-ai/wan-22"
BODY = '{"output_real": null, "settings": {"WANBATCH_MEDIA_MISMATCH": "flag"}}'


@pytest.fixture
def peers_db(redis_db: str) -> Iterator[tuple[str, redis.Redis[bytes]]]:
    """A Redis database of the test's own (claimed: see ``tests/conftest.py``), and a client."""
    c = redis.Redis.from_url(redis_db)
    yield redis_db, c
    c.close()


def _redis_now_us(c: redis.Redis[bytes]) -> int:
    seconds, micros = c.time()
    return int(seconds) * 1_000_000 + int(micros)


def _lease(engine: Engine, batch_id: str, item: int, owner: str, until: datetime) -> None:
    with db.session_scope(engine) as session:
        job_id = sorted(store.jobs_of_batch(session, batch_id), key=lambda j: j.item_index)[item].id
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state=JobState.SUBMITTING.value, lease_owner=owner, lease_expires_at=until)
        )


def _status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[str, str]:
    get_settings.cache_clear()
    capsys.readouterr()
    try:
        assert run_main(["status", *args], monkeypatch) == 0
    finally:
        get_settings.cache_clear()
    done = capsys.readouterr()
    return done.out, done.err


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # the workers' database
def test_status_names_a_worker_whose_record_went_stale_and_prunes_a_long_dead_one(
    engine: Engine,
    peers_db: tuple[str, redis.Redis[bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from worker.steps.webhooks import database_fingerprint, webhook_secret

    redis_db, redis_client = peers_db
    database = database_fingerprint(webhook_secret(engine))
    key = peers_key(database)
    batch_id = add_batch(engine, "dead-worker", [(T2V, {"prompt": p}) for p in "abcd"])
    until = utcnow() + timedelta(minutes=5)
    _lease(engine, batch_id, 0, "host-c:4242:7", until)  # killed -9: its record went stale
    _lease(engine, batch_id, 1, "host-b:77:8", until)  # alive: its record is fresh
    _lease(engine, batch_id, 2, "host-d:99:1", until)  # no record, no heartbeat: nothing says it died
    _lease(engine, batch_id, 3, "host-e:55:2", until)  # stale record, fresh heartbeat: alive
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "host-e:55:", [EVERY_BATCH], utcnow())
    now_us = _redis_now_us(redis_client)
    stale_us = now_us - int((PEER_GONE_SECONDS + 30) * 1_000_000)
    ancient_us = now_us - (PEERS_KEEP_SECONDS + 60) * 1_000_000
    redis_client.hset(key, "host-c:4242:", f"{stale_us} {BODY}")
    redis_client.hset(key, "host-b:77:", f"{now_us} {BODY}")
    redis_client.hset(key, "host-e:55:", f"{stale_us} {BODY}")
    redis_client.hset(key, "host-z:1:", f"{ancient_us} {BODY}")  # died long ago
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("WANBATCH_BROKER_URL", redis_db)
    monkeypatch.setenv("FAL_KEY", KEY)
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "out"))
    try:
        before = utcnow()
        out, err = _status(monkeypatch, capsys, batch_id, "--json")
        report: dict[str, Any] = json.loads(out)
        (dead,) = report["dead_lease_holders"]
        assert (dead["owner"], dead["host"], dead["pid"], dead["jobs"]) == (
            "host-c:4242:7",
            "host-c",
            4242,
            1,
        )
        assert (dead["ended"], dead["worker_record_stale"]) == (False, True)
        assert datetime.fromisoformat(dead["lease_until"]) == until
        # When Redis last saw it, on this host's clock: before the staleness bound, never "now".
        seen = datetime.fromisoformat(dead["last_seen"])
        assert seen < utcnow() - timedelta(seconds=PEER_GONE_SECONDS)
        note = report["dead_lease_holders_note"]
        assert note.startswith("1 job held by process 4242@host-c, not seen for ")
        # Dated when the lease ends on another UTC day than status's now (between the two).
        ends = {utc_clock(until, now=at) for at in (before, utcnow())}
        assert any(note.endswith(f": taken over at {at} when its lease ends") for at in ends), note
        assert "could not read" not in err
        text, _ = _status(monkeypatch, capsys, batch_id)
        assert "1 job held by process 4242@host-c, not seen for" in " ".join(text.split())
        every, _ = _status(monkeypatch, capsys)
        assert "held by process 4242@host-c" in " ".join(every.split())

        # The dashboard's batch page says the same.
        settings = settings_for(engine, tmp_path / "out", broker_url=redis_db)
        page = client(app_for(engine, settings)).get(f"/batches/{batch_id}", headers=HTML)
        assert page.status_code == 200
        assert "1 job held by process 4242@host-c, not seen for" in page.text

        # The next worker's beat prunes the long-dead record (not the merely stale one).
        limiter = RedisGCRA.from_url(Settings(FAL_KEY=SecretStr(KEY)), redis_db, database=database)
        try:
            Announcer(limiter, "host-b:77:").announce()
        finally:
            limiter.close()
        assert sorted(redis_client.hkeys(key)) == [b"host-b:77:", b"host-c:4242:", b"host-e:55:"]

        # Redis does not answer: status still reports, with one line saying what it cannot tell.
        monkeypatch.setenv("WANBATCH_BROKER_URL", "redis://127.0.0.1:1/0")
        out, err = _status(monkeypatch, capsys, batch_id, "--json")
        assert json.loads(out)["dead_lease_holders"] == []
        said = [line for line in err.splitlines() if line.strip()]
        assert "Traceback" not in err
        joined = " ".join(err.split())
        assert joined.startswith("warning: could not read the workers' records on the limiter's Redis"), err
        assert "named only once its job leases end" in joined
        assert sum("warning:" in line for line in said) == 1, err
    finally:
        redis_client.delete(key)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_clean_stop_deletes_the_record_even_while_the_loop_still_beats(
    engine: Engine,
    peers_db: tuple[str, redis.Redis[bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker's shutdown closes its conductor from another thread, and waits for the loop only
    so long (``worker.ticker.STOP_WAIT_SECONDS``): a beat after the delete wrote the record back,
    to go stale, and ``status`` would have named a cleanly stopped worker gone."""
    redis_db, redis_client = peers_db
    database = f"test-db-{uuid.uuid4().hex[:12]}"
    key = peers_key(database)
    monkeypatch.setattr(conductor_module, "HEARTBEAT_SECONDS", 0.01)
    monkeypatch.setattr(conductor_module, "process_prefix", lambda: "host-s:321:")
    beats = threading.Semaphore(0)
    from worker.peers import announce_settings as announce

    def counted(announcer: Any) -> None:
        announce(announcer)
        beats.release()

    monkeypatch.setattr(conductor_module, "announce_settings", counted)
    given: dict[str, Any] = {**FAST, "tick_interval": 600.0, "output_dir": tmp_path / "o"}
    settings = Settings(FAL_KEY=SecretStr(KEY), **given)
    rt = make_runtime(engine, settings)
    rt.limiter = limiter = RedisGCRA.from_url(settings, redis_db, database=database)
    conductor = Conductor(rt, stream=False)
    stop = threading.Event()
    runner = threading.Thread(
        target=conductor.run, args=(stop,), kwargs={"leads": lambda: False, "resilient": True}
    )
    runner.start()
    try:
        assert beats.acquire(timeout=20)
        assert redis_client.hexists(key, "host-s:321:")
        conductor.close()  # the stop, while the loop goes on beating
        for _ in range(3):  # beats after the delete
            assert beats.acquire(timeout=20)
        assert not redis_client.hexists(key, "host-s:321:")
    finally:
        stop.set()
        conductor.wake()
        runner.join(20)
        conductor.close()
        limiter.close()
        redis_client.delete(key)


def test_a_clean_stop_deletes_the_record_when_redis_failed_the_first_try(
    peers_db: tuple[str, redis.Redis[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """Audit "review1": once ``withdraw`` acted on its first call only (to say "could not
    delete" once during an outage), a brief Redis failure at the ticker's close left the record,
    and the worker's shutdown, closing again a moment later with Redis back, no longer deleted
    it: ``status`` named a cleanly stopped worker silent until the record was pruned (an hour).
    Now the second call deletes it; the failure is still said once."""
    redis_db, redis_client = peers_db
    database = f"test-db-{uuid.uuid4().hex[:12]}"
    key = peers_key(database)
    limiter = RedisGCRA.from_url(Settings(FAL_KEY=SecretStr(KEY)), redis_db, database=database)
    real_hdel = limiter.client.hdel
    attempts: list[str | bytes] = []

    def hdel_failing_once(name: str | bytes, *keys: str | bytes) -> int:  # the real Redis, one blip in front
        attempts.append(name)
        if len(attempts) == 1:
            raise redis.ConnectionError("Connection reset by peer")
        return real_hdel(name, *keys)

    try:
        announcer = Announcer(limiter, "host-w:99:")
        announcer.announce()
        assert redis_client.hexists(key, "host-w:99:")
        limiter.client.hdel = hdel_failing_once  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="worker.peers"):
            announcer.withdraw()  # the ticker thread's close: the blip
            assert redis_client.hexists(key, "host-w:99:")
            announcer.withdraw()  # the worker's shutdown making sure: Redis answers
            announcer.withdraw()  # nothing left to do
        assert not redis_client.hexists(key, "host-w:99:")
        assert len(attempts) == 2
        assert announcer.announce() == []  # never written again
        assert not redis_client.hexists(key, "host-w:99:")
        said = [r for r in caplog.records if r.__dict__.get("event") == "peers.record_left"]
        assert len(said) == 1
    finally:
        limiter.client.hdel = real_hdel  # type: ignore[method-assign]
        limiter.close()
        redis_client.delete(key)
