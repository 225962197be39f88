"""The queue-wait back-off counts only requests this process sees move, and says when it holds.

An audit rehearsed a batch against a slow stand-in fal (its own queue URL), stopped it with six
requests left "at fal", and a minute later ran the real batch against another queue URL with
the same key: the run stayed ``pending:3`` for good and sent nothing. The back-off (keep only a
few requests waiting at fal once one has waited over ``WANBATCH_QUEUE_WAIT_BACKOFF``) counted the
stand-in's requests, which no process follows any more (nobody asks that queue about them), so
they stayed ``queued`` in the database and kept its room at 0; and the back-off was no named
hold, so ``run``, ``status`` (``phase_reason``) and the dashboard said nothing of it.

Now the back-off counts the requests of this process's own fal queue only (``Job.fal_origin``,
or none recorded); the outstanding cap counts another queue's requests of the key while a live
process follows their batch, and unfollowed only while fal could still hold them (see
test_unfollowed_requests_cap.py); and whenever the back-off lets nothing go it is named, with
its counts, in ``run``'s progress line, ``status`` and the dashboard's batch page.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, update

from jobs import batches, db, store
from jobs.cap_holds import CapCheck, cap_note
from jobs.models import Job, utcnow
from jobs.settings import get_settings
from jobs.states import JobState
from tests.in_process import run_main
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for
from tests.web.web_helpers import HTML, app_for, client, logged_in
from worker.here import queue_origin
from worker.limits import api_key_id
from worker.running import _CapWatch
from worker.steps import Runtime, dispatch

KEY = "test-key-queue-backoff-5a1e"
QUEUE = "http://127.0.0.1:18787"  # the real run's queue
STAND_IN = "http://127.0.0.1:18788"  # the rehearsal's stand-in, stopped: nobody follows it
TOKEN = "queue-backoff-dashboard-token-91f3"
S = JobState


def _settings(**overrides: Any) -> Any:
    return settings_for(
        QUEUE, KEY, **{"submit_rate": 1000, "max_outstanding": 10, "queue_wait_backoff": 60, **overrides}
    )


def _batch(engine: Engine, name: str, n: int) -> tuple[str, list[str]]:
    batch_id = add_batch(engine, name, [("fal-ai/wan-22", {"prompt": f"{name} {i}"}) for i in range(n)])
    return batch_id, job_ids(engine, batch_id)


def _queued(
    engine: Engine,
    ids: list[str],
    queue: str,
    *,
    waited: float,
    state: JobState = S.QUEUED,
    heard: float | None = None,
    start_timeout: float | None = None,
) -> None:
    """``ids`` sent with this key to ``queue`` ``waited`` seconds ago, now ``state`` at fal; last
    heard of (their rows' last change) ``heard`` seconds ago (None: now), their start timeout
    ending ``start_timeout`` seconds from now (None: none)."""
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id.in_(ids))
            .values(
                state=state,
                attempts=1,
                request_id=Job.id,
                submitted_at=now - timedelta(seconds=waited),
                api_key_id=api_key_id(_settings()),
                fal_origin=queue_origin(queue),
                updated_at=now - timedelta(seconds=heard or 0),
                start_timeout_at=None if start_timeout is None else now + timedelta(seconds=start_timeout),
            )
        )


def _run_of(engine: Engine, batch_id: str, sent: list[str], **overrides: Any) -> Runtime:
    """An embedded run of ``batch_id`` at :data:`QUEUE`; its claimed jobs go to ``sent``."""
    return make_runtime(
        engine, _settings(**overrides), enqueue_submit=sent.append, batch_ids=frozenset({batch_id})
    )


def test_requests_left_at_a_queue_nobody_follows_hold_no_run_back(engine: Engine) -> None:
    _rehearsal, stopped = _batch(engine, "rehearsal", 6)
    # left "at fal" by the rehearsal, stopped over store.UNFOLLOWED_SECONDS ago (tests/integration/
    # test_unfollowed_requests_cap.py: until then they count against the outstanding cap)
    gone = store.UNFOLLOWED_SECONDS + 120
    _queued(engine, stopped, STAND_IN, waited=gone, heard=gone)
    real, pending = _batch(engine, "realrun", 3)
    sent: list[str] = []
    rt = _run_of(engine, real, sent)
    assert sorted(dispatch(rt)) == sorted(pending)  # before: nothing, for good
    assert not rt.capped
    # Nor do they fill the outstanding cap (6 + 3 of 10 would leave 1) once fal would have ended them.
    more, _ids = _batch(engine, "more", 5)
    assert len(dispatch(_run_of(engine, more, []))) == 5  # 3 + 5 of 10 at this queue


def test_another_queues_requests_a_live_process_follows_count_in_the_cap_not_the_backoff(
    engine: Engine,
) -> None:
    """fal's concurrency is per account: the key's requests at another queue URL (fal itself,
    behind another URL) count against the outstanding cap while a live process follows them
    (their slots come back when they end). But how long they wait in that queue says nothing of
    this one: the back-off does not count them."""
    rehearsal, elsewhere = _batch(engine, "elsewhere", 6)
    _queued(engine, elsewhere, STAND_IN, waited=120)
    with db.session_scope(engine) as session:  # its run is alive, on that queue
        store.record_heartbeat(session, "other-host:4242:", [rehearsal], utcnow())
    real, _pending = _batch(engine, "realrun", 5)
    rt = _run_of(engine, real, [], max_outstanding=8)
    assert len(dispatch(rt)) == 2  # 6 of 8 followed elsewhere: 2 left, and no back-off
    assert dispatch(rt) == []
    assert rt.capped  # the cap is full now; said by status:
    with db.read_scope(engine) as session:
        check = CapCheck.of(_settings(max_outstanding=8), api_key_id(_settings()), queue_origin(QUEUE))
        report = batches.batch_report(session, real, caps=check)
    assert report["phase_reason"] is not None
    assert "the outstanding cap is full (8 of 8, WANBATCH_MAX_OUTSTANDING)" in report["phase_reason"]
    assert "6 of batch elsewhere, 2 of this batch" in report["phase_reason"]


def _status(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> str:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("FAL_KEY", KEY)
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", QUEUE)
    monkeypatch.setenv("WANBATCH_QUEUE_WAIT_BACKOFF", "60")
    monkeypatch.delenv("WANBATCH_BROKER_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "400")
    get_settings.cache_clear()
    capsys.readouterr()
    try:
        assert run_main(["status", *args], monkeypatch) == 0
    finally:
        get_settings.cache_clear()
    return capsys.readouterr().out


HELD = (
    "submits held back: 2 request(s) have waited in fal's queue over 60s (WANBATCH_QUEUE_WAIT_BACKOFF), "
    "so the account runs fewer at once than the cap: only 1 is kept waiting there (a quarter of the 1 "
    "fal runs, at least one) and 2 wait (2 of batch first); sending resumes as fal starts them, or set "
    "WANBATCH_QUEUE_WAIT_BACKOFF=0 to keep the full cap at fal"
)


def test_the_backoff_holding_jobs_back_is_named_by_run_status_and_the_dashboard(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _first, sent_first = _batch(engine, "first", 3)
    _queued(engine, sent_first[:2], QUEUE, waited=120)  # this queue's: they wait long at fal
    _queued(engine, sent_first[2:], QUEUE, waited=120, state=S.RUNNING)
    second, _pending = _batch(engine, "second", 3)
    rt = _run_of(engine, second, [])
    assert dispatch(rt) == []  # the back-off: 2 wait, 1 kept
    assert rt.capped

    # run: the progress line's note, and the full note said once
    watch = _CapWatch(second, _settings(), rt)
    with db.read_scope(engine) as session:
        holds = watch.holds(session, batches.batch_progress(session, second))
    assert cap_note(holds, second) == HELD
    assert cap_note(holds, second, short=True) == (
        "held: queue-wait backoff (2 waiting at fal over 60s: 2 of first; keeps 1)"
    )

    # status, one batch (--json and text) and every batch
    found = json.loads(_status(engine, monkeypatch, capsys, second, "--json"))
    assert found["phase"] == "active"
    assert found["phase_reason"] == HELD
    assert HELD in " ".join(_status(engine, monkeypatch, capsys, second).split())
    every = json.loads(_status(engine, monkeypatch, capsys, "--json"))
    (row,) = [b for b in every["batches"] if b["batch"] == second]
    assert row["phase_reason"] == HELD

    # the dashboard's batch page
    settings = _settings(
        database_url=engine.url.render_as_string(hide_password=False),
        output_dir=tmp_path,
        serve_token=SecretStr(TOKEN),
    )
    html = logged_in(client(app_for(engine, settings)), TOKEN).get(f"/batches/{second}", headers=HTML).text
    shown = re.search(r'data-testid="cap-hold">(.*?)</p>', html, re.S)
    assert shown is not None
    assert " ".join(unescape(shown.group(1)).split()) == HELD

    # Off, nothing holds and nothing is said.
    off = _run_of(engine, second, [], queue_wait_backoff=0)
    assert len(dispatch(off)) == 3
