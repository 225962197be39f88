"""Workers that answer the broker but work on another database: said, not waited on in silence.

Staging and production sharing one Redis, or a typo in one host's ``WANBATCH_DATABASE_URL``: the
workers answer the broker's ping, so `doctor` said all was well and `run` showed `0/16 …
pending:16` forever with no warning. What tells the workers of this database from the others is
their leader's heartbeat in it (``conductor_heartbeats``, every-batch scope). Also here: what
`status` says goes on with a batch nothing processes, by deployment (with a broker, `run` only
watches).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from jobs import db, store
from jobs.models import EVERY_BATCH, BatchState, utcnow
from jobs.settings import Settings, get_settings
from tests.e2e.e2e_helpers import MakeManifest, Wb
from worker import doctor, running
from worker.running import _WorkerWatch, elsewhere_warning, stopped_watching

#: Nothing listens on port 1 of the loopback (the ping itself is stood in for below).
BROKER = "redis://127.0.0.1:1/0"

TWO_JOBS = """name: night
endpoint: fal-ai/wan-22
items:
  - prompt: one
  - prompt: two
"""


def _beat(settings: Settings, at: datetime) -> None:
    """The workers' leader says, in ``settings``' database, that it works on every batch."""
    with db.session_scope(db.open_engine(settings)) as session:
        store.record_heartbeat(session, "worker:1:", [EVERY_BATCH], at)


def _watched(
    heard: Callable[[Settings], datetime | None], *, grace: float = 0.0, warns: bool = False
) -> tuple[_WorkerWatch, list[str]]:
    """A watch that found one worker answering, after its first look (and, when it ``warns``,
    after what it said of it)."""
    said: list[str] = []
    looked, spoke = threading.Event(), threading.Event()

    def say(line: str) -> None:
        said.append(line)
        spoke.set()

    watch = _WorkerWatch(
        Settings(broker_url=BROKER), say, every=60.0, ask=lambda _s: 1, heard=heard, grace=grace
    )
    original = watch._look

    def look() -> running._Look:
        found = original()
        looked.set()
        return found

    watch._look = look  # type: ignore[method-assign]
    watch.start()
    assert (spoke if warns else looked).wait(30)
    return watch, said


def _stop(watch: _WorkerWatch) -> None:
    watch.stopping.set()
    watch.join(15)
    assert not watch.is_alive()


def test_run_warns_when_the_workers_that_answer_never_beat_in_its_database() -> None:
    watch, said = _watched(lambda _s: None, warns=True)
    try:
        assert watch.seen_elsewhere() is True
        assert watch.seen_alive_recently() is False
    finally:
        _stop(watch)
    settings = Settings(broker_url=BROKER)
    assert said == [elsewhere_warning(settings, 1, None)]
    line = said[0]
    assert line.startswith(f"warning: 1 wanbatch worker(s) answer on the broker {BROKER}, but none works on ")
    assert db.safe_url(settings.database_url) in line
    assert "none ever" in line
    assert "another WANBATCH_DATABASE_URL" in line
    assert line.endswith("still waiting")
    # Ctrl-C then does not claim that the workers carry on with the batch.
    stopped = stopped_watching("b1", workers_seen=False, elsewhere=True)
    assert "the workers carry on" not in stopped
    assert "work on another database" in stopped
    assert "WANBATCH_DATABASE_URL" in stopped


def test_a_stale_beat_is_named_and_still_warned_about() -> None:
    """Workers stopped here long ago (the others answer the broker): since when, in the line."""
    watch, said = _watched(lambda _s: utcnow() - timedelta(minutes=5), warns=True)
    _stop(watch)
    assert len(said) == 1
    assert "(no worker heartbeat in it within the last minute; the last 5m" in said[0]


def test_no_warning_while_the_workers_beat_here_or_the_database_cannot_tell() -> None:
    fresh, said = _watched(lambda _s: utcnow() - timedelta(seconds=5))
    try:
        assert fresh.seen_alive_recently() is True
        assert fresh.seen_elsewhere() is False
    finally:
        _stop(fresh)

    def unreadable(_s: Settings) -> datetime | None:
        raise RuntimeError("the database is restarting")

    unknown, said_unknown = _watched(unreadable)
    try:
        assert unknown.seen_alive_recently() is True  # not known otherwise: not claimed
    finally:
        _stop(unknown)
    assert said == said_unknown == []


def test_workers_that_may_have_just_started_get_a_grace_before_the_warning() -> None:
    watch, said = _watched(lambda _s: None, grace=600.0)
    _stop(watch)
    assert said == []


def _pinged(monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    """The broker answers and ``workers`` workers answer its ping (stood in for)."""
    monkeypatch.setattr(running, "check_broker", lambda *_a, **_k: None)
    monkeypatch.setattr(running, "live_workers", lambda *_a, **_k: workers)
    nodes = [f"wanbatch-{n}@host" for n in range(workers)]
    monkeypatch.setattr(running, "worker_nodes", lambda *_a, **_k: nodes)


def test_doctor_fails_the_broker_when_the_workers_do_not_work_on_this_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _pinged(monkeypatch, 2)
    missing = Settings(broker_url=BROKER, database_url=f"sqlite:///{tmp_path / 'typo.db'}")
    check = doctor.check_broker(missing)
    assert check.status == "fail", check
    assert check.detail.startswith(
        f"{BROKER} answers; 2 worker(s) answer a ping, but none works on this database"
    )
    assert "(none ever)" in check.detail
    assert check.fix is not None
    assert "another WANBATCH_DATABASE_URL" in check.fix
    assert not (tmp_path / "typo.db").exists()  # the doctor creates nothing

    settings = Settings(broker_url=BROKER)  # the test's database, with wanbatch's tables
    db.open_engine(settings)
    check = doctor.check_broker(settings)
    assert (check.status, "(none ever)" in check.detail) == ("fail", True)
    _beat(settings, utcnow() - timedelta(minutes=10))
    check = doctor.check_broker(settings)
    assert (check.status, "(the last 10m" in check.detail) == ("fail", True)
    _beat(settings, utcnow())
    check = doctor.check_broker(settings)
    assert check.status == "ok", check
    assert "2 worker(s) answer a ping, and work on this database" in check.detail


def test_cancel_with_a_broker_warns_when_the_workers_work_elsewhere(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cancel` only records the cancel with a broker: the workers carry it out, these would not."""
    assert wb("submit", manifest("night", TWO_JOBS)).code == 0
    monkeypatch.setenv("WANBATCH_BROKER_URL", BROKER)
    get_settings.cache_clear()
    _pinged(monkeypatch, 1)
    result = wb("cancel", "night")
    said = " ".join(result.stderr.split())
    assert "1 wanbatch worker(s) answer on the broker" in said
    assert "but none works on this database" in said
    assert "it is carried out once one does" in said


def test_status_with_a_broker_says_a_worker_goes_on_not_run(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a broker `run` only watches: "`wanbatch run night`, or a worker, goes on" promised
    what it does not do."""
    assert wb("submit", manifest("night", TWO_JOBS)).code == 0
    embedded = " ".join(wb("status", "night").stdout.split())
    assert "nothing is processing it: `wanbatch run night`, or a worker, goes on" in embedded

    monkeypatch.setenv("WANBATCH_BROKER_URL", BROKER)
    human = " ".join(wb("status", "night").stdout.split())
    listed = " ".join(wb("status").stdout.split())
    assert wb("pause", "night").code == 0
    paused = " ".join(wb("status", "night").stdout.split())
    assert wb("resume", "night").code == 0
    with db.session_scope(db.open_engine(get_settings())) as session:
        batch_id = store.get_batch(session, "night").id
        store.set_batch_state(session, batch_id, BatchState.PAUSED, reason="fal refused the key (401)")
    refused = " ".join(wb("status", "night").stdout.split())

    worker = "a `wanbatch worker` on this database (WANBATCH_DATABASE_URL)"
    assert f"nothing is processing it: {worker} goes on" in human
    assert "`wanbatch run night`, or a worker" not in human
    assert "nothing is processing it: a `wanbatch worker` on this database" in listed
    assert f"nothing is processing it: after `wanbatch resume night`, {worker} goes on" in paused
    # Only a run ends a pause fal's refusal caused; the workers go on from there.
    assert f"nothing is processing it: `wanbatch run night` ends the pause, then {worker} goes on" in refused
