"""``doctor``, a brokered ``run`` and a recorded change tell a frozen tick leader from workers
that serve another database.

Before: with the tick leader frozen (``kill -STOP``: its heartbeat stops, its lock stays) and the
other worker alive and beating here, ``doctor`` said "1 worker(s) answer a ping, but none works
on this database ... the workers likely use another WANBATCH_DATABASE_URL", and so did ``run``
while it waited: only the leader's beat (every batch) was read, never the others' (``worker``).
Now the others' beats are read too: workers that beat here while their leader does not are
named as such — the leader, and for how long it has been silent.

The database is a real SQLite file, the broker a Redis database of this test's own; only the
workers' ping replies are stood in for, at Celery's control level.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.app.control import Control

from bench.distributed import claimed_redis_db
from jobs import db, store
from jobs.models import EVERY_BATCH, WORKER_SCOPE, utcnow
from jobs.settings import Settings
from worker import doctor
from worker.running import _WorkerWatch, workers_warning

LEADER = "host-a:101:MainThread"
OTHER = "host-b:202:MainThread"


@pytest.fixture
def broker(redis_url: str) -> Iterator[str]:
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as url:
        yield url


def _answering(monkeypatch: pytest.MonkeyPatch, nodes: list[str]) -> None:
    def ping(_self: Control, *_a: Any, **_k: Any) -> list[dict[str, dict[str, str]]]:
        return [{node: {"ok": "pong"}} for node in nodes]

    monkeypatch.setattr(Control, "ping", ping)


def _beats(settings: Settings, *, leader_ago: float, other_ago: float | None) -> None:
    """The tick leader last beat ``leader_ago`` seconds ago; the other worker ``other_ago``
    (None: it never beat here)."""
    now = utcnow()
    with db.session_scope(db.open_engine(settings)) as session:
        store.record_heartbeat(session, LEADER, [EVERY_BATCH], now - timedelta(seconds=leader_ago))
        if other_ago is not None:
            store.record_heartbeat(session, OTHER, [WORKER_SCOPE], now - timedelta(seconds=other_ago))


def _settings(broker: str, tmp_path: Path) -> Settings:
    return Settings(broker_url=broker, database_url=f"sqlite:///{tmp_path / 'wanbatch.db'}")


def _watch_says(settings: Settings) -> tuple[list[str], bool, bool]:
    """What a brokered ``run``'s watch says at its first look (one worker answers), and whether
    it then counts the workers as seen alive here, and as serving another database."""
    said: list[str] = []
    spoke = threading.Event()

    def say(line: str) -> None:
        said.append(line)
        spoke.set()

    watch = _WorkerWatch(settings, say, every=60.0, ask=lambda _s: 1, grace=0.0)
    watch.start()
    try:
        assert spoke.wait(30)
        return said, watch.seen_alive_recently(), watch.seen_elsewhere()
    finally:
        watch.stopping.set()
        watch.join(15)


def test_a_frozen_leader_is_named_not_another_database(
    broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(broker, tmp_path)
    _beats(settings, leader_ago=200, other_ago=3)
    _answering(monkeypatch, ["wanbatch-101@host-a", "wanbatch-202@host-b"])

    check = doctor.check_broker(settings)
    assert check.status == "fail"
    assert "another WANBATCH_DATABASE_URL" not in check.detail + (check.fix or "")
    assert "none works on this database" not in check.detail
    assert "work on this database" in check.detail
    assert "tick leader (process 101@host-a) has not beaten for 3m" in check.detail
    assert "frozen" in check.detail
    assert "kill -CONT" in (check.fix or "")

    said, alive, elsewhere = _watch_says(settings)
    assert len(said) == 1
    assert "tick leader (process 101@host-a) has not beaten for 3m" in said[0]
    assert "another WANBATCH_DATABASE_URL" not in said[0]
    assert said[0].endswith("still waiting")
    assert (alive, elsewhere) == (True, False)  # Ctrl-C: the workers here carry on once one leads

    line = workers_warning(settings, 2, waiting=False)
    assert line is not None
    assert "tick leader (process 101@host-a)" in line
    assert line.endswith("it is carried out once one leads")


def test_no_worker_beating_here_is_still_another_database(
    broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(broker, tmp_path)
    _beats(settings, leader_ago=200, other_ago=200)  # every worker of this database stopped
    _answering(monkeypatch, ["wanbatch-9@elsewhere"])

    check = doctor.check_broker(settings)
    assert check.status == "fail"
    assert "none works on this database" in check.detail
    assert "another WANBATCH_DATABASE_URL" in (check.fix or "")
    said, alive, elsewhere = _watch_says(settings)
    assert "another WANBATCH_DATABASE_URL" in said[0]
    assert (alive, elsewhere) == (False, True)
    line = workers_warning(settings, 1)
    assert line is not None
    assert "another WANBATCH_DATABASE_URL" in line


def test_a_leader_that_beats_is_no_warning(
    broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(broker, tmp_path)
    _beats(settings, leader_ago=2, other_ago=None)
    _answering(monkeypatch, ["wanbatch-101@host-a"])
    assert doctor.check_broker(settings).status == "ok"
    assert workers_warning(settings, 1) is None


def test_status_names_the_frozen_leader_and_promises_no_takeover_time(tmp_path: Path) -> None:
    """``status`` of a batch the workers' frozen leader held: "nothing is processing it" names the
    leader (not "a worker on this database goes on", which one does, idle); a held job's lease
    end is not promised as a takeover time, for nothing takes it over while no process works."""
    from cli.output import idle_text
    from jobs.batches import status
    from jobs.listing import DeadHolder, dead_holders_text
    from tests.sample_inputs import INPUTS
    from tests.step_runtime import add_batch

    settings = _settings("redis://127.0.0.1:1/0", tmp_path)
    engine = db.open_engine(settings)
    batch_id = add_batch(engine, "night", [("fal-ai/wan-22", INPUTS["fal-ai/wan-22"])] * 2)
    _beats(settings, leader_ago=200, other_ago=3)
    (report,) = status(batch_id, settings, broker_url=settings.broker_url)
    assert report["processing"] is False
    assert "tick leader (process 101@host-a) has not beaten for 3m" in report["tick_leader_note"]
    line = idle_text(report, distributed=True)
    assert line.startswith("nothing is processing it")
    assert "tick leader (process 101@host-a)" in line
    assert "goes on" not in line

    _beats(settings, leader_ago=200, other_ago=200)  # no worker beats here: no leader to name
    (report,) = status(batch_id, settings, broker_url=settings.broker_url)
    assert report["tick_leader_note"] == ""
    assert idle_text(report, distributed=True).endswith("on this database (WANBATCH_DATABASE_URL) goes on")

    now = utcnow()
    held = [DeadHolder(LEADER, 1, now + timedelta(seconds=30), now - timedelta(seconds=200), False)]
    assert dead_holders_text(held, now=now).endswith("when its lease ends")
    idle = dead_holders_text(held, now=now, processing=False)
    assert "taken over once a process works on the batch again (its lease ends at " in idle
