"""Two workers on one database with FAL_KEYs of two fal accounts (keys audit, t4): a submit task
runs on any worker, so both keys sent; only the tick leader followed the requests, with its own
key, and fal answered it 404 about every request of the other account: those stayed queued,
billed, never downloaded, while the leader's cap counted them and held the batch's pending jobs
back. A worker whose key is not the one the live workers (or their tick leader) use now refuses
to start: one line, exit 2, naming both key ids, never a key."""

from __future__ import annotations

import uuid

import pytest
from pydantic import SecretStr

from jobs.errors import ConfigError
from jobs.settings import Settings
from worker.celery_worker import refuse_another_key
from worker.limits import RedisGCRA, api_key_id
from worker.peers import Announcer

KEY_A = "test-key-account-a-4c1f"
KEY_B = "test-key-account-b-90de"


def _settings(key: str, redis_url: str) -> Settings:
    return Settings(FAL_KEY=SecretStr(key), broker_url=redis_url)


def test_a_worker_with_another_accounts_key_is_refused_at_start(redis_url: str) -> None:
    database = f"test-accounts-{uuid.uuid4().hex[:12]}"  # this test's own records
    running = RedisGCRA.from_url(_settings(KEY_B, redis_url), redis_url, database=database)
    live = Announcer(running, "worker-b-host:4242:", node="wB@h")
    try:
        refuse_another_key(_settings(KEY_A, redis_url), database)  # nobody lives yet: it starts
        live.announce()
        with pytest.raises(ConfigError) as refused:
            refuse_another_key(_settings(KEY_A, redis_url), database)
        line = str(refused.value)
        assert "\n" not in line
        assert f"this worker's FAL_KEY (key id {api_key_id(_settings(KEY_A, redis_url))})" in line
        assert f"key id {api_key_id(_settings(KEY_B, redis_url))} (worker pid 4242@worker-b-host)" in line
        assert "the worker was not started" in line
        assert KEY_A not in line
        assert KEY_B not in line
        refuse_another_key(_settings(KEY_B, redis_url), database)  # the same key: it starts
        # its leader record alone (a leader of a version that wrote no worker record) also refuses
        live.withdraw()
        running.publish("leader-host:77:")
        with pytest.raises(ConfigError, match=r"the tick leader, leader-host:77"):
            refuse_another_key(_settings(KEY_A, redis_url), database)
    finally:
        live.withdraw()
        running.unpublish()
        running.close()
