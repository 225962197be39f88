"""The batch page says what ``wanbatch status`` says of a batch's schedule and forecast.

The page worked out its own forecast (what holds the batch back, without the broker) and its
own words for a rerun and a pause, and so disagreed with ``status`` and ``run``:

* of the jobs an unfinished rerun repeats it said "`wanbatch run NAME-rerun-1` goes on" while
  that rerun waited hours for its window;
* of a batch its user paused whose window is closed too it said only "paused by user";
* while the workers could not reach the broker it kept a time left, where ``status`` gave none.

Each is now read from the one place ``status`` reads it (:func:`jobs.batches.batch_forecast`,
:func:`jobs.batches.schedule_words`, :func:`jobs.rendered.going_on`), and compared with what
``status`` prints at the same instant.
"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta
from html import unescape as html_text
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine

import web.dashboard
from cli.output import _pending_line, report_ref
from jobs import batches, cap_holds, db, listing, store
from jobs.db import session_factory
from jobs.models import EVERY_BATCH, BatchState, FalHold, utcnow
from jobs.schedule import Schedule
from jobs.states import JobState
from tests.step_runtime import ended_beat_owner
from tests.web.web_helpers import HTML, JSON, TOKEN, app_for, client, logged_in, mixed_batch, settings_for
from worker.limits import api_key_id

BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """One ``now`` for the page and for ``status`` (the countdowns are then the same)."""
    now = utcnow()
    monkeypatch.setattr(web.dashboard, "utcnow", lambda: now)
    monkeypatch.setattr(batches, "utcnow", lambda: now)
    monkeypatch.setattr(cap_holds, "utcnow", lambda: now)  # the page's cap note (held_note)
    return now


def _closed_window(now: datetime) -> Schedule:
    """A daily window that opens two hours after ``now``, in UTC."""
    opens = (now + timedelta(hours=2)).time().replace(second=0, microsecond=0)
    return Schedule(window=(opens, time((opens.hour + 3) % 24, opens.minute)), timezone="UTC")


#: Where the page says it: the rerun's line, the "In flight" card's schedule line, the ETA.
RERUN, SCHEDULE, ETA = (
    r'data-testid="rerun-pending">(.*?)</p>',
    r'<div class="meta">\s*((?:schedule:|no schedule).*?)</div>',
    r'<div class="meta">\s*(ETA.*?)</div>',
)


def _said(html: str, where: str) -> str:
    """The text the page says ``where`` (a pattern: its group), on one line."""
    found = re.search(where, html, re.S)
    assert found is not None, where
    return " ".join(html_text(re.sub(r"<[^>]*>", "", found.group(1))).split())


def _report(engine: Engine, batch_id: str, now: datetime) -> batches.BatchReport:
    with db.read_scope(engine) as session:
        return batches.batch_report(session, batch_id, now=now)


def test_a_rerun_waiting_for_its_window_is_said_to_wait(
    sqlite_engine: Engine, output_dir: Path, frozen: datetime
) -> None:
    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session)
    browser = logged_in(client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))))
    page = f"/batches/{mixed.batch.id}"
    rerun = browser.post(f"{page}/rerun-failed", headers={**BEARER, **JSON}).json()
    assert (rerun["name"], rerun["total"]) == ("mixed-rerun-1", 6)
    with db.session_scope(sqlite_engine) as session:  # it kept its parent's window, closed now
        store.set_batch_schedule(session, rerun["batch"], _closed_window(frozen), "normal")

    shown = _said(browser.get(page, headers=HTML).text, RERUN)

    assert re.fullmatch(
        r"6 job\(s\) are being rerun in mixed-rerun-1: it waits for its window \(opens \d\d:\d\d UTC, "
        r"in [0-9hm]+\); then `wanbatch run mixed-rerun-1` sends them",
        shown,
    ), shown
    assert shown == _pending_line(_report(sqlite_engine, mixed.batch.id, frozen))  # status's words


def test_a_paused_batch_whose_window_is_closed_says_until_when(
    sqlite_engine: Engine, output_dir: Path, frozen: datetime
) -> None:
    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session)
        store.set_batch_schedule(session, mixed.batch.id, _closed_window(frozen), "normal")
        store.set_paused_by_user(session, mixed.batch.id, True)
        session.commit()
    browser = logged_in(client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))))

    shown = _said(browser.get(f"/batches/{mixed.batch.id}", headers=HTML).text, SCHEDULE)

    assert re.match(
        r"schedule: paused by user; its window is closed \(opens \d\d:\d\d UTC, in [0-9hm]+\): "
        r"`wanbatch resume mixed` goes on once it opens",
        shown,
    ), shown
    report = _report(sqlite_engine, mixed.batch.id, frozen)
    said = batches.schedule_words(
        report["schedule_state"], report["paused_schedule_state"], report_ref(report)
    )
    assert shown == f"schedule: {said} · priority normal", (shown, said)  # status's words


def test_no_time_left_while_the_workers_cannot_reach_the_broker(
    sqlite_engine: Engine, output_dir: Path, frozen: datetime
) -> None:
    with session_factory(sqlite_engine)() as work:
        mixed = mixed_batch(work)
    browser = logged_in(client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))))
    page = f"/batches/{mixed.batch.id}"
    before = _said(browser.get(page, headers=HTML).text, ETA)
    assert _report(sqlite_engine, mixed.batch.id, frozen)["eta_seconds"] is not None
    assert not before.startswith("ETA none"), before  # it moves: a time left, as status gives

    with session_factory(sqlite_engine)() as work:  # the workers' leader cannot reach the broker
        store.record_heartbeat(
            work, "worker-1:7:", [EVERY_BATCH], frozen, broker_down_since=frozen - timedelta(minutes=1)
        )
        work.commit()
    report = _report(sqlite_engine, mixed.batch.id, frozen)
    assert report["eta_seconds"] is None  # status: no forecast

    after = _said(browser.get(page, headers=HTML).text, ETA)

    assert after == f"ETA none — {batches.BROKER_UNREACHABLE}", after


def test_jobs_waiting_for_proof_of_their_submit_are_said_to_wait(
    sqlite_engine: Engine, output_dir: Path, frozen: datetime
) -> None:
    """An audit: a job whose submit's answer was lost waited ten minutes for fal's webhook proof,
    while the page's time left ran out in seconds and nothing said it waited. The page says what
    ``status`` says, with the policy configured, and its time left never ends before the wait."""
    until = frozen + timedelta(hours=2)
    with session_factory(sqlite_engine)() as work:
        mixed = mixed_batch(work)
        waiting = next(j for j in store.jobs_of_batch(work, mixed.batch.id) if not JobState(j.state).terminal)
        waiting.state, waiting.next_attempt_at = JobState.SUBMIT_UNKNOWN, until
        work.commit()
    settings = settings_for(sqlite_engine, output_dir, token=TOKEN, submit_unknown_policy="resubmit")
    html = (
        logged_in(client(app_for(sqlite_engine, settings)))
        .get(f"/batches/{mixed.batch.id}", headers=HTML)
        .text
    )

    shown = _said(html, r'data-testid="proof-wait">(.*?)</p>')

    with db.read_scope(sqlite_engine) as session:
        report = batches.batch_report(session, mixed.batch.id, now=frozen, policy="resubmit")
    assert shown == report["proof_wait_note"], shown  # status's words
    ends = listing.utc_clock(until, now=frozen)  # its date too when it ends after midnight
    said = f"1 job(s) wait for fal's webhook proof of their submit until {ends}"
    assert shown.startswith(said), shown
    assert "WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit" in shown
    eta = _said(html, ETA)
    assert re.match(r"ETA ~[12]h", eta), eta  # the wait's two hours, not the pace's minutes


def test_a_wait_for_proof_that_ends_tomorrow_names_its_date(
    sqlite_engine: Engine, output_dir: Path, frozen: datetime
) -> None:
    """A job waits for fal's webhook proof until 00:30 UTC tomorrow: the page names the date, as
    ``status`` does, not a bare "00:30:00 UTC" that reads as tonight's or tomorrow's."""
    until = (frozen + timedelta(days=1)).replace(hour=0, minute=30, second=0, microsecond=0)
    with session_factory(sqlite_engine)() as work:
        mixed = mixed_batch(work)
        waiting = next(j for j in store.jobs_of_batch(work, mixed.batch.id) if not JobState(j.state).terminal)
        waiting.state, waiting.next_attempt_at = JobState.SUBMIT_UNKNOWN, until
        work.commit()
    settings = settings_for(sqlite_engine, output_dir, token=TOKEN)
    browser = logged_in(client(app_for(sqlite_engine, settings)))
    html = browser.get(f"/batches/{mixed.batch.id}", headers=HTML).text

    shown = _said(html, r'data-testid="proof-wait">(.*?)</p>')

    with db.read_scope(sqlite_engine) as session:
        report = batches.batch_report(session, mixed.batch.id, now=frozen)
    assert shown == report["proof_wait_note"], shown  # status's words
    said = f"1 job(s) wait for fal's webhook proof of their submit until {until:%Y-%m-%d} 00:30:00 UTC"
    assert shown.startswith(said), shown


def test_a_hold_on_fal_since_yesterday_names_its_date(
    sqlite_engine: Engine, output_dir: Path, frozen: datetime
) -> None:
    """A worker that cannot connect to fal since yesterday (fal down overnight): the page's line
    and its tooltip name the date, as ``status`` does, not a bare time that reads as today's."""
    since = (frozen - timedelta(days=1)).replace(microsecond=0)
    with session_factory(sqlite_engine)() as work:
        mixed = mixed_batch(work)
        work.add(
            FalHold(
                owner="worker-3:4242:",
                scope=EVERY_BATCH,
                since=since,
                next_probe_at=frozen + timedelta(seconds=30),
                pause_seconds=60.0,
                error="could not connect (ConnectError): refused",
                seen_at=frozen,
            )
        )
        work.commit()
    settings = settings_for(sqlite_engine, output_dir, token=TOKEN)
    html = (
        logged_in(client(app_for(sqlite_engine, settings)))
        .get(f"/batches/{mixed.batch.id}", headers=HTML)
        .text
    )

    with db.read_scope(sqlite_engine) as session:
        report = batches.batch_report(session, mixed.batch.id, now=frozen)
    shown = _said(html, r'data-testid="fal-unreachable"[^>]*>(.*?)</p>')
    assert shown == report["fal_unreachable_note"], shown  # status's words
    dated = f"since {since:%Y-%m-%d %H:%M:%S} UTC"
    assert shown.startswith(f"fal unreachable from worker-3 (pid 4242) {dated} (submits held"), shown
    title = _said(html, r'data-testid="fal-unreachable" title="(.*?)"')
    assert title == f"worker-3 (pid 4242) {dated}: could not connect (ConnectError): refused", title


def test_requests_of_another_key_are_said_to_wait_for_a_process_with_it(
    sqlite_engine: Engine, output_dir: Path
) -> None:
    """A request sent with another API key stays queued here, asked about by no process of this
    key: the page says so in ``status``'s words, naming the key by its id, never the key."""
    other = "another-account-key-6d1f"
    settings = settings_for(sqlite_engine, output_dir, token=TOKEN)
    other_id = api_key_id(settings.model_copy(update={"fal_key": SecretStr(other)}))
    with session_factory(sqlite_engine)() as work:
        mixed = mixed_batch(work)
        waiting = next(j for j in store.jobs_of_batch(work, mixed.batch.id) if not JobState(j.state).terminal)
        waiting.state, waiting.request_id, waiting.api_key_id = JobState.QUEUED, "req-other", other_id
        waiting_id = waiting.id
        work.commit()
    html = (
        logged_in(client(app_for(sqlite_engine, settings)))
        .get(f"/batches/{mixed.batch.id}", headers=HTML)
        .text
    )

    shown = _said(html, r'data-testid="elsewhere-wait">(.*?)</p>')
    waits = (
        f"1 request(s) were sent with another API key (key id {other_id}) "
        "and wait for a process with that key"
    )
    assert shown == waits, shown
    assert other not in html

    # Once fal refused it to this key (a key of another account), the way to write it off is named.
    with session_factory(sqlite_engine)() as work:
        store.note_key_refused(
            work, waiting_id, "req-other", sent_with=other_id, key_id=api_key_id(settings), now=utcnow()
        )
        work.commit()
    html = (
        logged_in(client(app_for(sqlite_engine, settings)))
        .get(f"/batches/{mixed.batch.id}", headers=HTML)
        .text
    )
    shown = _said(html, r'data-testid="elsewhere-wait">(.*?)</p>')
    assert shown == (
        f"{waits} (fal does not know 1 of them for this key: "
        "`wanbatch cancel BATCH --abandon-other-key` writes them off)"
    ), shown


def test_requests_whose_cancel_was_given_up_are_named_as_status_names_them(
    sqlite_engine: Engine, output_dir: Path
) -> None:
    """A cancelled batch whose request's cancel a process gave up at fal (noted on the job's
    history): the page says, in ``status``'s words, that fal may still run and bill it."""
    settings = settings_for(sqlite_engine, output_dir, token=TOKEN)
    with session_factory(sqlite_engine)() as work:
        mixed = mixed_batch(work)
        waiting = next(j for j in store.jobs_of_batch(work, mixed.batch.id) if not JobState(j.state).terminal)
        waiting.state, waiting.request_id = JobState.QUEUED, "req-stuck"
        batch = store.get_batch(work, mixed.batch.id)
        batch.state = BatchState.CANCELLED
        work.flush()
        assert store.note_cancel_given_up(
            work, waiting.id, "req-stuck", error="HTTP 301 redirect", tries=5, worker="host:1:", now=utcnow()
        )
        work.commit()
    html = (
        logged_in(client(app_for(sqlite_engine, settings)))
        .get(f"/batches/{mixed.batch.id}", headers=HTML)
        .text
    )
    shown = _said(html, r'data-testid="uncancelled">(.*?)</p>')
    report = _report(sqlite_engine, mixed.batch.id, utcnow())
    assert report["uncancelled_note"]
    assert shown == report["uncancelled_note"], shown
    assert shown.startswith(
        "1 request(s) of this cancelled batch could not be cancelled at fal (request req-stuck"
    )


def test_a_batch_whose_run_was_killed_is_said_to_be_processed_by_nothing(
    sqlite_engine: Engine, output_dir: Path, frozen: datetime
) -> None:
    """A killed ``run`` (kill -9, a closed SSH session) leaves its heartbeat behind: for the minute
    it stayed fresh the page gave the batch a time left, and its headline blamed the outstanding
    cap. A beat of a process of this host that has ended tells only when the batch was last seen:
    the page says nothing processes it, as ``status`` does, and blames no cap. Another host's
    beat still counts until it goes stale."""
    import socket
    import subprocess
    import sys

    from sqlalchemy import update

    from jobs.models import Job

    settings = settings_for(sqlite_engine, output_dir, token=TOKEN, max_outstanding=2)
    with session_factory(sqlite_engine)() as work:
        killed = mixed_batch(work, "killed", processing=False)
        elsewhere = mixed_batch(work, "elsewhere", processing=False)
        work.execute(update(Job).values(api_key_id=api_key_id(settings)))  # both fill the cap
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait(30)  # a process of this host that has ended: the killed run
        store.record_heartbeat(
            work, ended_beat_owner(f"{socket.gethostname()}:{child.pid}:1"), [killed.batch.id], frozen
        )
        store.record_heartbeat(work, "otherhost:4242:1", [elsewhere.batch.id], frozen)
        work.commit()
    browser = logged_in(client(app_for(sqlite_engine, settings)))
    cap_hold = r'data-testid="cap-hold">(.*?)</p>'

    html = browser.get(f"/batches/{killed.batch.id}", headers=HTML).text
    idle = "nothing is processing it (last seen 0s ago)"
    assert _said(html, ETA) == f"ETA none — {idle}"
    assert re.search(cap_hold, html, re.S) is None
    report = _report(sqlite_engine, killed.batch.id, frozen)
    assert (report["processing"], report["eta_seconds"]) == (False, None)  # status agrees
    listed = browser.get("/", headers=HTML).text
    row = listed[listed.index(f"/batches/{killed.batch.id}") :]
    assert idle in html_text(re.sub(r"<[^>]*>", "", row[: row.index("</tr>")]))

    html = browser.get(f"/batches/{elsewhere.batch.id}", headers=HTML).text
    assert not _said(html, ETA).startswith("ETA none"), _said(html, ETA)
    assert _said(html, cap_hold).startswith("submits held back: the outstanding cap is full")
