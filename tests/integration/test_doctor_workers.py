"""``doctor``'s broker check names the workers that answer a ping, and says when each was last
seen (its record on the limiter's Redis, :mod:`worker.peers`); ``doctor --json`` lists them.

Before: the line said only "3 worker(s) answer a ping", so an operator of a distributed
deployment could not tell which hosts were up, nor whether one of them had stopped beating.

The broker and the limiter are the real shared Redis (a database number of this test's own);
only the workers' ping replies are stood in for, at Celery's control level.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.app.control import Control
from pydantic import SecretStr

from bench.distributed import claimed_redis_db
from jobs import db, store
from jobs.models import EVERY_BATCH, utcnow
from jobs.settings import Settings, get_settings
from tests.in_process import run_main
from tests.ports import unused_port
from worker import doctor, peers
from worker.limits import RedisGCRA
from worker.peers import Announcer, name_this_node, peers_key
from worker.steps.webhooks import database_fingerprint, webhook_secret

KEY = "doctor-workers-key-3b91"


@pytest.fixture
def broker(redis_url: str) -> Iterator[str]:
    """A Redis database of this test's own: the broker and the limiter's Redis."""
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as url:
        yield url


def _answering(monkeypatch: pytest.MonkeyPatch, nodes: list[str]) -> None:
    """The workers ``nodes`` answer the broker's ping (Celery's reply, one dict per worker)."""

    def ping(_self: Control, *_a: Any, **_k: Any) -> list[dict[str, dict[str, str]]]:
        return [{node: {"ok": "pong"}} for node in nodes]

    monkeypatch.setattr(Control, "ping", ping)


def _settings(broker: str, tmp_path: Path) -> tuple[Settings, str]:
    """Settings on ``broker`` and a SQLite database the workers beat in; its fingerprint."""
    settings = Settings(
        FAL_KEY=SecretStr(KEY), broker_url=broker, database_url=f"sqlite:///{tmp_path / 'wanbatch.db'}"
    )
    engine = db.open_engine(settings)
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "host-a:101:", [EVERY_BATCH], utcnow())
    return settings, database_fingerprint(webhook_secret(engine))


def _announce(settings: Settings, broker: str, database: str, owner: str) -> None:
    """A worker's beat writes its record, as ``wanbatch worker`` does every 10 s."""
    limiter = RedisGCRA.from_url(settings, broker, database=database)
    try:
        Announcer(limiter, owner).announce()
    finally:
        limiter.close()


def _record_aged(broker: str, database: str, owner: str, seconds: int) -> None:
    """A record last written ``seconds`` ago by Redis' clock (a worker that stopped beating)."""
    client = redis.Redis.from_url(broker)
    try:
        now_s, now_us = client.time()
        stamp = (now_s - seconds) * 1_000_000 + now_us
        body = json.dumps({"output_real": None, "settings": {}})
        client.hset(peers_key(database), owner, f"{stamp} {body}")
    finally:
        client.close()


@pytest.mark.redis
def test_the_broker_check_names_the_workers_and_when_each_was_last_seen(
    broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, database = _settings(broker, tmp_path)
    monkeypatch.setattr(peers, "_this_node", None)  # restored afterwards
    _announce(settings, broker, database, "host-a:101:")  # default node name: wanbatch-101@host-a
    name_this_node("render-1@host-b")  # `wanbatch worker --name render-1@host-b`
    _announce(settings, broker, database, "host-b:202:")
    _record_aged(broker, database, "host-d:404:", 5 * 60)  # beats no more, still answers
    _answering(
        monkeypatch, ["wanbatch-404@host-d", "wanbatch-303@host-c", "wanbatch-101@host-a", "render-1@host-b"]
    )

    check = doctor.check_broker(settings)
    assert check.status == "ok", check
    assert "4 worker(s) answer a ping, and work on this database (heartbeat" in check.detail
    named = check.detail.split("; the workers: ", 1)[1]
    assert re.fullmatch(
        r"render-1@host-b \(last seen \ds ago\), "
        r"wanbatch-101@host-a \(last seen \ds ago\), "
        r"wanbatch-303@host-c \(no record on the limiter's Redis for this database\), "
        r"wanbatch-404@host-d \(last seen 5m\d*s? ago\)",
        named,
    ), named
    listed = check.as_dict()["workers"]
    assert [w["node"] for w in listed] == [
        "render-1@host-b",
        "wanbatch-101@host-a",
        "wanbatch-303@host-c",
        "wanbatch-404@host-d",
    ]
    ages = [w["last_seen_seconds_ago"] for w in listed]
    assert ages[2] is None
    assert all(0 <= age < 10 for age in ages[:2]), ages
    assert 299 <= ages[3] < 310, ages

    # The pass/fail logic is the same: no heartbeat in this database fails, the workers named.
    other = Settings(FAL_KEY=SecretStr(KEY), broker_url=broker, database_url=f"sqlite:///{tmp_path / 'x.db'}")
    elsewhere = doctor.check_broker(other)
    assert elsewhere.status == "fail", elsewhere
    assert "4 worker(s) answer a ping, but none works on this database" in elsewhere.detail
    # Another database's records are not these workers': none of them is seen for it.
    assert elsewhere.detail.count("(no record on the limiter's Redis for this database)") == 4
    assert [w["node"] for w in elsewhere.as_dict()["workers"]] == [w["node"] for w in listed]
    # Without a broker nothing is asked: the check has no `workers`.
    assert "workers" not in doctor.check_broker(Settings(broker_url=None)).as_dict()


@pytest.mark.redis
def test_many_workers_are_counted_after_the_first_five_and_json_lists_them_all(
    broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, database = _settings(broker, tmp_path)
    nodes = [f"wanbatch-{100 + n}@host-{n}" for n in range(8)]
    for n in range(8):
        _announce(settings, broker, database, f"host-{n}:{100 + n}:")
    _answering(monkeypatch, nodes)

    check = doctor.check_broker(settings)
    assert check.status == "ok", check
    named = check.detail.split("; the workers: ", 1)[1]
    assert re.search(r", wanbatch-104@host-4 \(last seen \ds ago\) and 3 more$", named), named
    assert "wanbatch-105@host-5" not in check.detail

    # `doctor --json`: the broker check's `workers` lists every one; no other check has the key.
    monkeypatch.setenv("FAL_KEY", KEY)
    monkeypatch.setenv("WANBATCH_BROKER_URL", broker)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", f"http://127.0.0.1:{unused_port()}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    get_settings.cache_clear()
    capsys.readouterr()
    try:
        run_main(["doctor", "--json"], monkeypatch)
    finally:
        get_settings.cache_clear()
    body = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in body["checks"]}
    assert checks["broker"]["status"] == "ok", checks["broker"]
    assert [w["node"] for w in checks["broker"]["workers"]] == nodes
    assert all(0 <= w["last_seen_seconds_ago"] < 10 for w in checks["broker"]["workers"])
    assert all("workers" not in c for name, c in checks.items() if name != "broker")
