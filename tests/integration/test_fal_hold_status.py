"""A process that cannot connect to fal holds its submits; ``status`` and the dashboard say so.

The gap (distributed-operator audit): the hold (``worker.steps.fal_reach``: one probe after a
pause growing from 1 s to 60 s) was said only on the holding process's own progress line. A
worker on another host held its submits and ``status`` (text and ``--json``) and the dashboard
showed the jobs ``pending`` with no reason. The hold is now recorded in the database
(``fal_holds``) when it begins, deleted when fal answers, and a row its process left behind
(it died holding) is not shown.

Driven through the real submit step against a closed loopback port; the database is real
(SQLite and PostgreSQL).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from jobs import db, store
from jobs.listing import FAL_HOLD_STALE_SECONDS, utc_clock
from jobs.models import EVERY_BATCH, FalHold, utcnow
from jobs.processes import process_prefix
from jobs.settings import get_settings
from tests.hostile import HostileProvider
from tests.hostile_fal import accept_submits
from tests.in_process import run_main
from tests.step_runtime import add_batch, make_runtime, settings_for
from tests.web.web_helpers import HTML, app_for, client
from tests.web.web_helpers import settings_for as web_settings_for
from worker.fal.client import FalClient
from worker.steps import dispatch, submit

KEY = "fal-hold-key-7c2e"
RID = "3c1d9e7a-5b2f-4e8d-a6c0-1f2e3d4c5b6a"
T2V = "fal-ai/wan-22"


def _status(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> str:
    """``wanbatch status *args`` on ``engine``'s database: its stdout."""
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.delenv("WANBATCH_BROKER_URL", raising=False)
    get_settings.cache_clear()
    capsys.readouterr()
    try:
        assert run_main(["status", *args], monkeypatch) == 0
    finally:
        get_settings.cache_clear()
    return capsys.readouterr().out


def _status_json(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], batch_id: str
) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(_status(engine, monkeypatch, capsys, batch_id, "--json"))
    return report


def _rows(engine: Engine) -> list[tuple[str, str]]:
    with db.read_scope(engine) as session:
        return [(r.owner, r.scope) for r in session.execute(select(FalHold.owner, FalHold.scope))]


def test_status_names_the_process_that_cannot_reach_fal_and_forgets_it_once_fal_answers(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = hostile.port
    hostile.close()  # nothing listens there any more: every connect is refused
    rt = make_runtime(engine, settings_for(f"http://127.0.0.1:{port}", KEY))  # a distributed worker's
    host, pid = socket.gethostname(), os.getpid()
    try:
        batch_id = add_batch(engine, "fal-hold", [(T2V, {"prompt": "a"}), (T2V, {"prompt": "b"})])
        first, second = dispatch(rt)
        assert submit(rt, first) == "fal-unreachable"
        assert rt.fal_reach.down
        assert _rows(engine) == [(process_prefix(), EVERY_BATCH)]  # recorded as the hold began
        assert submit(rt, second) == "fal-unreachable"  # held: not even tried, nothing written

        before = utcnow()
        report = _status_json(engine, monkeypatch, capsys, batch_id)
        (hold,) = report["fal_unreachable"]
        assert (hold["owner"], hold["host"], hold["pid"]) == (process_prefix(), host, pid)
        assert rt.fal_reach.since is not None
        assert hold["since"] == rt.fal_reach.since.isoformat()
        assert hold["pause_seconds"] >= 1
        assert "could not connect" in hold["error"]
        note = report["fal_unreachable_note"]
        # Dated when the hold began on another UTC day than status's now (between the two).
        said = {utc_clock(rt.fal_reach.since, now=at) for at in (before, utcnow())}
        whose = f"fal unreachable from {host} (pid {pid}) since"
        assert any(note.startswith(f"{whose} {at} (submits held, next probe in ") for at in said), note
        assert report["counts"]["pending"] == 2  # the jobs wait: now with a reason

        text = " ".join(_status(engine, monkeypatch, capsys, batch_id).split())
        assert f"fal unreachable from {host} (pid {pid}) since" in text
        assert "submits held, next probe in" in text
        every = " ".join(_status(engine, monkeypatch, capsys).split())  # the table of every batch
        assert f"fal unreachable from {host} (pid {pid})" in every

        # The dashboard's batch page says it too.
        page = client(app_for(engine, web_settings_for(engine, tmp_path / "out"))).get(
            f"/batches/{batch_id}", headers=HTML
        )
        assert page.status_code == 200
        assert 'data-testid="fal-unreachable"' in page.text
        assert f"fal unreachable from {host} (pid {pid}) since" in page.text

        # fal answers again (the network is back, at a new address): the probe ends the hold,
        # and its record with it.
        with HostileProvider() as fal:
            accept_submits(fal, RID, T2V)
            live = settings_for(fal.url, KEY)
            rt.client.close()
            rt.client, rt.settings = FalClient.from_settings(live), live
            time.sleep(rt.fal_reach.held_for())  # until the next probe may go (about a second)
            (again,) = dispatch(rt)
            assert submit(rt, again) == "submitted"
        assert rt.fal_reach.note() is None  # the hold is over
        assert _rows(engine) == []
        report = _status_json(engine, monkeypatch, capsys, batch_id)
        assert (report["fal_unreachable"], report["fal_unreachable_note"]) == ([], "")
        assert "fal unreachable" not in _status(engine, monkeypatch, capsys, batch_id)
        page = client(app_for(engine, web_settings_for(engine, tmp_path / "out"))).get(
            f"/batches/{batch_id}", headers=HTML
        )
        assert "fal-unreachable" not in page.text
    finally:
        rt.client.close()


def _dead_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_hold_left_by_a_process_that_died_or_went_silent_is_not_shown(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A process that died holding never deletes its row: on this host its pid tells it has
    ended; elsewhere the row, no longer renewed, goes stale. Neither is shown; a live holder on
    another host is, and a run's hold on its own batch says nothing of another batch."""
    batch_id = add_batch(engine, "fal-hold-stale", [(T2V, {"prompt": "a"})])
    other_batch = add_batch(engine, "fal-hold-other", [(T2V, {"prompt": "b"})])
    now = utcnow()
    dead = f"{socket.gethostname()}:{_dead_pid()}:"

    def hold(owner: str, scope: str, seen_at: Any) -> None:
        with db.session_scope(engine) as session:
            store.hold_fal(
                session,
                owner,
                {scope},
                since=seen_at - timedelta(minutes=5),
                next_probe_at=seen_at + timedelta(seconds=30),
                pause_seconds=60.0,
                error="could not connect (ConnectError): refused",
                now=seen_at,
            )

    hold(dead, EVERY_BATCH, now)  # died a moment ago, holding
    hold("gone-host:4242:", EVERY_BATCH, now - timedelta(seconds=FAL_HOLD_STALE_SECONDS + 5))  # silent
    hold("run-host:77:", other_batch, now)  # an embedded run of the other batch
    report = _status_json(engine, monkeypatch, capsys, batch_id)
    assert (report["fal_unreachable"], report["fal_unreachable_note"]) == ([], "")
    assert "fal unreachable" not in _status(engine, monkeypatch, capsys, batch_id)

    hold("live-host:99:", EVERY_BATCH, now)  # a worker elsewhere that keeps probing: shown
    (shown,) = _status_json(engine, monkeypatch, capsys, batch_id)["fal_unreachable"]
    assert (shown["owner"], shown["host"], shown["pid"]) == ("live-host:99:", "live-host", 99)
    other = _status_json(engine, monkeypatch, capsys, other_batch)
    assert [h["owner"] for h in other["fal_unreachable"]] == ["live-host:99:", "run-host:77:"]
    assert other["fal_unreachable_note"].startswith(
        "fal unreachable from live-host (pid 99) and 1 other process(es) since "
    )
