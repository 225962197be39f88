"""The batch list, the batch page and ``rerun-failed`` say what ``status`` and ``rerun`` say.

Leftovers of the dashboard decided or wrote things their own way:

* the batch list forecast by its own rule, without asking whether the workers can reach the
  broker: a time left while nothing could move, where ``status`` and the batch page gave none;
* both pages wrote a time left as "5 min 15 s" where ``status`` writes "~5m15s left";
* a page said "(no pace yet)" of a batch with a pace and nothing in flight, where ``status``
  says there is no ETA because nothing is in flight;
* "Rerun failed" said "the workers send it" of a rerun that waits hours for the window it kept,
  where ``rerun`` and ``status`` say until when it waits.

Each is compared with what ``status`` (or ``rerun``) says at the same instant.
"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta
from html import unescape as html_text
from pathlib import Path

import pytest
from sqlalchemy import Engine, update

import web.dashboard
from cli.output import _pending_line, progress_text
from jobs import batches, cap_holds, db, store
from jobs.db import session_factory
from jobs.listing import BUSY_STATES
from jobs.models import EVERY_BATCH, Job, utcnow
from jobs.rerun import rerun_wait_note
from jobs.schedule import Schedule, eta_text
from jobs.states import JobState
from tests.web.web_helpers import HTML, JSON, TOKEN, app_for, client, logged_in, mixed_batch, settings_for

BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """One ``now`` for the pages and for ``status`` (the forecasts are then the same)."""
    now = utcnow()
    monkeypatch.setattr(web.dashboard, "utcnow", lambda: now)
    monkeypatch.setattr(batches, "utcnow", lambda: now)
    monkeypatch.setattr(cap_holds, "utcnow", lambda: now)  # the page's cap note (held_note)
    return now


def _text(html: str) -> str:
    return " ".join(html_text(re.sub(r"<[^>]*>", "", html)).split())


def _listed_eta(html: str, batch_id: str) -> str:
    """What the batch list's ETA cell says of ``batch_id``."""
    row = re.search(rf'<tr id="b-{batch_id}">(.*?)</tr>', html, re.S)
    assert row is not None, batch_id
    cell = re.search(r'data-testid="eta">(.*?)</td>', row.group(1), re.S)
    assert cell is not None
    return _text(cell.group(1))


def _page_eta(html: str) -> str:
    """What the batch page's "Pace" card says after "ETA"."""
    found = re.search(r'<div class="meta">\s*ETA(.*?)</div>', html, re.S)
    assert found is not None
    return _text(found.group(1))


def _report(engine: Engine, batch_id: str, now: datetime) -> batches.BatchReport:
    with db.read_scope(engine) as session:
        return batches.batch_report(session, batch_id, now=now)


def test_the_list_gives_no_time_left_while_the_workers_cannot_reach_the_broker(
    sqlite_engine: Engine, output_dir: Path, frozen: datetime
) -> None:
    with session_factory(sqlite_engine)() as work:
        mixed = mixed_batch(work)
    browser = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir)))
    moving = _report(sqlite_engine, mixed.batch.id, frozen)
    assert moving["eta_seconds"] is not None
    assert _listed_eta(browser.get("/", headers=HTML).text, mixed.batch.id) == eta_text(moving["eta_seconds"])

    with session_factory(sqlite_engine)() as work:  # the workers' leader cannot reach the broker
        store.record_heartbeat(
            work, "worker-1:7:", [EVERY_BATCH], frozen, broker_down_since=frozen - timedelta(minutes=1)
        )
        work.commit()
    stuck = _report(sqlite_engine, mixed.batch.id, frozen)
    assert stuck["eta_seconds"] is None  # status: no forecast
    assert "no ETA: the workers cannot reach the broker" in progress_text(stuck)

    listed = _listed_eta(browser.get("/", headers=HTML).text, mixed.batch.id)
    page = _page_eta(browser.get(f"/batches/{mixed.batch.id}", headers=HTML).text)

    assert listed == f"none — {batches.BROKER_UNREACHABLE}", listed
    assert listed == page  # the list and the batch's page say the same


def test_a_time_left_reads_as_status_writes_it(
    sqlite_engine: Engine, output_dir: Path, frozen: datetime
) -> None:
    with session_factory(sqlite_engine)() as work:
        mixed = mixed_batch(work)
    browser = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir)))
    report = _report(sqlite_engine, mixed.batch.id, frozen)
    left = eta_text(report["eta_seconds"])
    assert re.fullmatch(r"~\d+m\d\ds left", left), left
    assert left in progress_text(report)  # status's words

    assert _listed_eta(browser.get("/", headers=HTML).text, mixed.batch.id) == left
    assert _page_eta(browser.get(f"/batches/{mixed.batch.id}", headers=HTML).text) == left


def test_nothing_in_flight_is_said_as_status_says_it(
    sqlite_engine: Engine, output_dir: Path, frozen: datetime
) -> None:
    """A batch that finishes jobs (it has a pace) but has nothing at fal now: ``status`` says no
    ETA because nothing is in flight; the page said "(no pace yet)"."""
    with session_factory(sqlite_engine)() as work:
        mixed = mixed_batch(work)
        work.execute(  # its jobs at fal are all back to be sent again
            update(Job)
            .where(Job.batch_id == mixed.batch.id, Job.state.in_([s.value for s in BUSY_STATES]))
            .values(state=JobState.PENDING.value)
        )
        work.commit()
    report = _report(sqlite_engine, mixed.batch.id, frozen)
    assert (report["in_flight"], report["processing"], report["eta_seconds"]) == (0, True, None)
    assert "no ETA: nothing in flight" in progress_text(report)
    browser = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir)))

    page = _page_eta(browser.get(f"/batches/{mixed.batch.id}", headers=HTML).text)
    listed = _listed_eta(browser.get("/", headers=HTML).text, mixed.batch.id)

    assert page == "none — nothing in flight", page
    assert listed == page


def test_rerun_failed_says_its_rerun_waits_for_its_window(
    sqlite_engine: Engine, output_dir: Path, frozen: datetime
) -> None:
    opens = (frozen + timedelta(hours=2)).time().replace(second=0, microsecond=0)
    closed = Schedule(window=(opens, time((opens.hour + 3) % 24, opens.minute)), timezone="UTC")
    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session)
        store.set_batch_schedule(session, mixed.batch.id, closed, "normal")
        session.commit()
    browser = logged_in(client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))))

    rerun = browser.post(f"/batches/{mixed.batch.id}/rerun-failed", headers={**BEARER, **JSON}).json()

    assert rerun["ok"], rerun
    waits = Schedule.from_json(rerun["schedule"]).waits(frozen)  # Schedule.waits: status's words
    assert re.fullmatch(r"waits for its window \(opens \d\d:\d\d UTC, in [0-9hm]+\)", waits), waits
    assert rerun["message"].startswith(
        f"created batch mixed-rerun-1 with 6 job(s) of mixed: it {waits}; then `wanbatch run "
        "mixed-rerun-1` (no workers: no WANBATCH_BROKER_URL) sends it"
    ), rerun["message"]
    # Its cap is what the parent left of its own (a --failed-only rerun goes on with its work).
    assert "rerun mixed-rerun-1: its cap is $47.60: what is left of batch mixed's $50.00" in rerun["message"]
    # `status` of the parent, and `rerun`'s own note on the new batch, say the same wait.
    assert f"it {waits}; then `wanbatch run mixed-rerun-1` sends them" in _pending_line(
        _report(sqlite_engine, mixed.batch.id, frozen)
    )
    result = batches.SubmitResult(
        batch_id=rerun["batch"], name="mixed-rerun-1", created=True, added=6, existing=0, total=6,
        counts={}, schedule=rerun["schedule"],
    )  # fmt: skip
    note = rerun_wait_note(result, frozen)
    assert note is not None
    assert note.startswith(f"batch mixed-rerun-1 {waits}; `--now` sends it now"), note
