"""``status`` names the jobs a gone process holds (distributed audit, finding B).

A worker killed -9 while it held a submit left the job leased to it for a lease's length:
``status`` said "1 in flight · ~0m02s left" and nothing of the dead holder, and only an
embedded run's progress line ever said whose lease it waits for, until when
(``jobs.listing.waiting_note``). ``status`` (text and ``--json``: ``dead_lease_holders``)
now names a holder that has ended (a pid of this host that no longer runs) or whose heartbeat
went stale, and when its jobs are taken over. A live holder, or one nothing says died (another
host, no heartbeat), is not named.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, update

from jobs import db, store
from jobs.listing import PROCESSING_STALE_SECONDS, utc_clock
from jobs.models import EVERY_BATCH, Job, utcnow
from jobs.settings import get_settings
from jobs.states import JobState
from tests.in_process import run_main
from tests.step_runtime import add_batch

T2V = "fal-ai/wan-22"


def _status(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> str:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.delenv("WANBATCH_BROKER_URL", raising=False)
    get_settings.cache_clear()
    capsys.readouterr()
    try:
        assert run_main(["status", *args], monkeypatch) == 0
    finally:
        get_settings.cache_clear()
    return capsys.readouterr().out


def _dead_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _lease(engine: Engine, batch_id: str, item: int, owner: str, until: datetime) -> None:
    """Job ``item`` of the batch, ``submitting`` (its POST may be out), leased to ``owner``."""
    with db.session_scope(engine) as session:
        job_id = sorted(store.jobs_of_batch(session, batch_id), key=lambda j: j.item_index)[item].id
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state=JobState.SUBMITTING.value, lease_owner=owner, lease_expires_at=until)
        )


def test_status_names_the_jobs_a_gone_process_holds_and_when_they_are_taken_over(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    batch_id = add_batch(engine, "dead-holder", [(T2V, {"prompt": p}) for p in "abcd"])
    now = utcnow()
    until = now + timedelta(minutes=2)
    stale = now - timedelta(seconds=PROCESSING_STALE_SECONDS + 40)
    with db.session_scope(engine) as session:
        # The workers' leader killed -9: its beat is stale; another worker leads and beats now.
        store.record_heartbeat(session, "wk-host:123:", [EVERY_BATCH], stale)
        store.record_heartbeat(session, "wk-host:124:", [EVERY_BATCH], now)
    _lease(engine, batch_id, 0, "wk-host:123:777", until)  # the killed leader's submit
    _lease(engine, batch_id, 1, "wk-host:124:778", until)  # the live leader's: not named
    _lease(engine, batch_id, 2, "far-host:55:1", until)  # no heartbeat, another host: nothing says it died

    report: dict[str, Any] = json.loads(_status(engine, monkeypatch, capsys, batch_id, "--json"))
    (dead,) = report["dead_lease_holders"]
    assert (dead["owner"], dead["host"], dead["pid"], dead["jobs"], dead["ended"]) == (
        "wk-host:123:777",
        "wk-host",
        123,
        1,
        False,
    )
    assert datetime.fromisoformat(dead["last_seen"]) == stale
    assert datetime.fromisoformat(dead["lease_until"]) == until
    note = report["dead_lease_holders_note"]
    assert note.startswith("1 job held by process 123@wk-host, not seen for ")
    # Dated when the lease ends on another UTC day than status's now (between ``now`` and this).
    said = {utc_clock(until, now=at) for at in (now, utcnow())}
    assert any(note.endswith(f": taken over at {at} when its lease ends") for at in said), note
    text = _status(engine, monkeypatch, capsys, batch_id)
    assert "1 job held by process 123@wk-host, not seen for" in " ".join(text.split())

    # A process of this host that has ended (killed before it ever beat): named too, in the
    # list of every batch as well.
    _lease(engine, batch_id, 3, f"{socket.gethostname()}:{_dead_pid()}:9", until)
    report = json.loads(_status(engine, monkeypatch, capsys, batch_id, "--json"))
    assert sorted(h["ended"] for h in report["dead_lease_holders"]) == [False, True]
    assert report["dead_lease_holders_note"].startswith("2 jobs held by process ")
    assert report["dead_lease_holders_note"].endswith("when their leases end")
    every = " ".join(_status(engine, monkeypatch, capsys).split())
    assert "2 jobs held by process" in every

    # Once its lease ends, nothing is said (the jobs are taken over).
    with db.session_scope(engine) as session:
        session.execute(update(Job).where(Job.batch_id == batch_id).values(lease_expires_at=now))
    report = json.loads(_status(engine, monkeypatch, capsys, batch_id, "--json"))
    assert (report["dead_lease_holders"], report["dead_lease_holders_note"]) == ([], "")


def test_a_holder_of_this_host_that_has_ended_is_said_to_have_however_lately_it_beat(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run of this host killed a moment ago (SIGKILL, a second Ctrl-C) beat 4 s before: status
    said "held by process PID@HOST, not seen for 4s", as of a process that may be alive, while
    its ``ended`` (and the progress line) said it had ended."""
    batch_id = add_batch(engine, "killed-run", [(T2V, {"prompt": p}) for p in "ab"])
    now = utcnow()
    host, pid = socket.gethostname(), _dead_pid()
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, f"{host}:{pid}:", [batch_id], now - timedelta(seconds=4))
    _lease(engine, batch_id, 0, f"{host}:{pid}:9", now + timedelta(minutes=2))

    report: dict[str, Any] = json.loads(_status(engine, monkeypatch, capsys, batch_id, "--json"))

    (dead,) = report["dead_lease_holders"]
    assert (dead["pid"], dead["ended"], dead["last_seen"] is not None) == (pid, True, True)
    assert report["dead_lease_holders_note"].startswith(
        f"1 job held by process {pid}@{host}, which has ended: "
    )
    text = " ".join(_status(engine, monkeypatch, capsys, batch_id).split())
    assert "which has ended: taken over at" in text
    assert "not seen for" not in text
