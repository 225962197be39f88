"""The dashboard's read models (:mod:`jobs.listing`) on both dialects.

Its aggregates must equal the store's own (what ``status`` and ``cost`` print) to the cent, and
its keyset pages must walk a batch forwards and backwards, filtered or not, meeting every job
exactly once in item order.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from jobs import batches, listing, store
from jobs.listing import Cursor, Pace, Totals, pace
from jobs.models import BatchState, Job
from jobs.states import JobState
from tests.web.web_helpers import ENDPOINTS, make_batch, mixed_batch, new_job

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _forecasts(session: Session, found: listing.BatchList, now: datetime) -> dict[str, batches.Forecast]:
    """The batch list's forecasts, as the dashboard reads them (:func:`batches.batch_forecasts`)."""
    return batches.batch_forecasts(session, [(r.batch, r.totals) for r in found.rows], now=now)


def _listed(session: Session, batch_id: str, now: datetime | None = None) -> batches.Forecast:
    """The forecast the batch list gives ``batch_id`` at ``now``."""
    now = now or datetime.now(UTC)
    return _forecasts(session, listing.list_batches(session, now=now), now)[batch_id]


def test_summary_equals_the_stores_own_figures(session: Session) -> None:
    mixed = mixed_batch(session)
    other = mixed_batch(session, "other", items=7)  # another batch's jobs must not leak in
    summary = listing.batch_summary(session, mixed.batch.id)
    totals = summary.all
    money = store.batch_money(session, mixed.batch.id)
    cost = store.batch_cost(session, mixed.batch.id)
    assert totals.counts == store.counts_by_state(session, mixed.batch.id)
    assert (totals.estimated_usd, totals.spent_usd, totals.reserved_usd) == (
        money.estimated_usd,
        money.spent_usd,
        money.reserved_usd,
    )
    assert (totals.possible_duplicate_charges, totals.confirmed_duplicate_charges) == (
        money.possible_duplicate_charges,
        money.confirmed_duplicate_charges,
    )
    assert (totals.actual_usd, totals.wasted_usd, totals.cancelled_for_budget) == (
        cost.actual_usd,
        cost.wasted_usd,
        cost.cancelled_for_budget,
    )
    assert totals.media_mismatches == store.count_media_mismatches(session, mixed.batch.id)
    assert totals.first_submitted_at == store.first_submitted_at(session, mixed.batch.id)
    # The fixture's figures, so the comparison above cannot pass on two empty sums.
    assert totals.total == 31
    assert totals.counts["succeeded"] == 13
    assert totals.counts["failed"] == 3
    assert totals.wasted_usd == Decimal("0.35")  # 3 failed x 0.10 + item 1's 0.05 over its estimate
    assert totals.recent == 16  # succeeded and failed ones finished a minute or two ago
    assert totals.busy == 6
    assert totals.waiting == 6
    # Per endpoint: the filter's choices and match counts.
    assert set(summary.endpoints) == set(ENDPOINTS)
    assert sum(summary.endpoints.values()) == 31
    assert summary.matching([JobState.FAILED]) == 3
    assert summary.matching([JobState.FAILED, JobState.CANCELLED], ENDPOINTS[0]) == sum(
        1
        for j in mixed.jobs
        if j.endpoint == ENDPOINTS[0] and j.state in (JobState.FAILED, JobState.CANCELLED)
    )
    assert summary.counts("no/such-endpoint") == Totals().counts
    assert listing.batch_summary(session, other.batch.id).all.total == 8  # 7 items + a variant


def test_batch_list_aggregates_every_batch_shown_at_once(session: Session) -> None:
    mixed = mixed_batch(session)
    empty = make_batch(session, "empty", [])
    found = listing.list_batches(session)
    assert [r.batch.name for r in found.rows] == ["empty", "mixed"]  # newest first
    assert (found.total_batches, found.page, found.pages) == (2, 1, 1)
    row = next(r for r in found.rows if r.batch.id == mixed.batch.id)
    alone = listing.batch_summary(session, mixed.batch.id).all
    assert row.totals == alone
    now = datetime.now(UTC)
    per_minute = pace(row.totals, held="", now=now).per_minute
    assert per_minute is not None
    assert per_minute > 0
    forecast = _forecasts(session, found, now)[mixed.batch.id]
    assert forecast.eta_seconds is not None
    assert forecast.eta_seconds > 0
    blank = next(r for r in found.rows if r.batch.id == empty.id)
    assert blank.totals.total == 0
    assert pace(blank.totals, held="", now=now) == Pace(None, None, "")
    paged = listing.list_batches(session, page=2, per_page=1)
    assert [r.batch.name for r in paged.rows] == ["mixed"]
    assert paged.pages == 2
    assert listing.list_batches(session, page=99, per_page=1).page == 2  # clamped, never empty


def test_a_held_batch_gets_no_eta_as_in_status(session: Session) -> None:
    mixed = mixed_batch(session)
    assert _listed(session, mixed.batch.id).eta_seconds is not None
    store.set_paused_by_user(session, mixed.batch.id, True)
    session.commit()
    row = _listed(session, mixed.batch.id)
    assert row.standing == "paused by user"
    assert row.eta_seconds is None  # jobs still in flight, but the batch cannot finish while held
    report = batches.batch_report(session, mixed.batch.id)
    assert report["eta_seconds"] is None  # the dashboard and `status` agree
    store.set_batch_state(session, mixed.batch.id, BatchState.CANCELLED)
    session.commit()
    assert _listed(session, mixed.batch.id).standing == "cancelled"


def test_status_forecasts_as_the_dashboard_at_the_recent_pace(session: Session) -> None:
    mixed = mixed_batch(session)
    now = datetime.now(UTC)
    row = _listed(session, mixed.batch.id, now)
    report = batches.batch_report(session, mixed.batch.id, now=now)
    assert report["eta_seconds"] is not None
    assert report["eta_seconds"] == row.eta_seconds  # one forecast, wherever it is shown

    # Stopped overnight and resumed: first sent 8 hours ago, finishing jobs again for minutes.
    # The pace since the first submit would forecast most of a day; the recent pace does not.
    session.execute(
        update(Job)
        .where(Job.batch_id == mixed.batch.id, Job.submitted_at.is_not(None))
        .values(submitted_at=now - timedelta(hours=8))
    )
    session.commit()
    resumed = batches.batch_report(session, mixed.batch.id, now=now)
    left = resumed["total"] - resumed["finished"]
    assert resumed["eta_seconds"] is not None
    assert resumed["eta_seconds"] < 3600 < 8 * 3600 / resumed["finished"] * left


def test_a_batch_no_process_works_on_gets_no_eta_and_says_so(session: Session) -> None:
    stopped = mixed_batch(session, processing=False)  # its `run` was stopped: jobs wait at fal
    assert listing.list_batches(session).rows[0].totals.busy > 0
    row = _listed(session, stopped.batch.id)
    assert (row.standing, row.eta_seconds) == ("nothing is processing it", None)
    report = batches.batch_report(session, stopped.batch.id)
    assert (report["processing"], report["eta_seconds"]) == (False, None)  # `status` agrees

    now = datetime.now(UTC)
    store.record_heartbeat(session, "run:1:", [stopped.batch.id], now - timedelta(minutes=3))
    session.commit()
    row = _listed(session, stopped.batch.id, now)
    assert row.standing == "nothing is processing it (last seen 3m ago)"  # gone stale
    store.record_heartbeat(session, "worker:2:", ["*"], now)  # a distributed worker: every batch
    session.commit()
    row = _listed(session, stopped.batch.id, now)
    assert row.standing == ""
    assert row.eta_seconds is not None
    assert batches.batch_report(session, stopped.batch.id)["processing"] is True
    store.drop_heartbeats(session, "worker:2:")  # it stopped cleanly
    session.commit()
    assert batches.batch_report(session, stopped.batch.id)["processing"] is False

    finished = Totals(first_submitted_at=now)  # nothing left to do: nothing to process
    finished.counts.update(succeeded=3, failed=1)
    assert listing.idle_reason(finished, None, now=now) == ""


def test_pace_is_the_recent_rate_and_the_eta_follows_it() -> None:
    now = T0 + timedelta(hours=3)
    totals = Totals(first_submitted_at=T0, recent=50)
    totals.counts.update(succeeded=100, pending=400, running=10)
    moving = pace(totals, held="", now=now)
    assert moving.per_minute == 5.0  # 50 in the last 10 minutes, not 100 over 3 hours
    assert moving.eta_seconds == 410 / 5 * 60
    young = pace(Totals(first_submitted_at=now - timedelta(minutes=2), recent=10), held="", now=now)
    assert young.per_minute == 5.0  # a batch sent 2 minutes ago is judged over those 2 minutes
    held = Totals(first_submitted_at=T0, recent=0)
    held.counts.update(succeeded=10, pending=5)
    assert pace(held, held="waiting for window", now=now) == Pace(0.0, None, "waiting for window")
    stalled = Totals(first_submitted_at=T0, recent=0)
    stalled.counts.update(pending=5, running=1)
    assert pace(stalled, held="", now=now).eta_seconds is None  # no pace: no forecast
    done = Totals(first_submitted_at=T0, recent=3)
    done.counts.update(succeeded=3)
    assert pace(done, held="", now=now).eta_seconds == 0.0
    assert pace(Totals(), held="", now=now) == Pace(None, None, "")


def test_after_a_pause_the_eta_follows_the_pace_since_the_resume(session: Session) -> None:
    # The audit's repro: 600 jobs, the first sent 20 minutes ago; paused, the jobs in flight
    # finished 9 minutes ago; resumed 40 s ago, 60 jobs (30 s each) finished in the last 10 s and
    # 40 are in flight. The window's 10 minutes (or the first submit) said "~1h left"; it is ~40 s of work.
    now = datetime.now(UTC)
    batch = make_batch(session, "resumed", [new_job(i, endpoint=ENDPOINTS[0]) for i in range(600)])
    jobs = list(store.jobs_of_batch(session, batch.id))
    earlier = now - timedelta(minutes=20)
    for n, job in enumerate(jobs):
        values: dict[str, object] = {"state": JobState.PENDING}
        if n < 173:  # before the pause: long ago
            values = {"state": JobState.SUCCEEDED, "submitted_at": earlier, "finished_at": earlier}
        elif n < 200:  # in flight at the pause: finished just after it, 9 minutes ago
            at = now - timedelta(minutes=9, seconds=n - 173)
            values = {"state": JobState.SUCCEEDED, "submitted_at": earlier, "finished_at": at}
        elif n < 260:  # since the resume, 40 s ago: each took 30 s
            at = now - timedelta(seconds=10) + timedelta(seconds=(n - 200) / 6)
            values = {
                "state": JobState.SUCCEEDED,
                "submitted_at": at - timedelta(seconds=30),
                "finished_at": at,
            }
        elif n < 300:
            values = {"state": JobState.RUNNING, "submitted_at": now - timedelta(seconds=40)}
        session.execute(update(Job).where(Job.id == job.id).values(**values))
    store.record_heartbeat(session, "run-of-resumed:1:", [batch.id], now)
    session.commit()
    left = 600 - 260

    listed = _listed(session, batch.id, now)
    assert listed.eta_seconds is not None
    # 60 finishes in the ~40 s since the resume: ~90 jobs a minute, ~4 minutes for 340 jobs
    # (the window's 87 finishes over 10 minutes said 39 minutes).
    assert 120 < listed.eta_seconds < left / 60 * 40 * 1.5
    report = batches.batch_report(session, batch.id, now=now)
    assert report["eta_seconds"] == listed.eta_seconds  # status, the dashboard
    progress = batches.batch_progress(session, batch.id, now=now)
    assert progress["eta_seconds"] == listed.eta_seconds  # and the run's progress line agree
    summary = listing.batch_summary(session, batch.id, now=now).all
    assert summary.stretch is not None
    assert summary.stretch.finishes == 60
    assert summary.stretch.started_at == now - timedelta(seconds=40)


def test_a_stretch_of_work_starts_after_the_last_pause_in_the_finishes() -> None:
    now = T0 + timedelta(hours=1)
    assert listing.stretch_of([], now=now) is None
    # One job at a time, each five minutes: one stretch, the window's, whatever the spacing.
    slow = [(now - timedelta(minutes=m), now - timedelta(minutes=m + 5)) for m in (9, 4)]
    slow.append((now - timedelta(seconds=5), now - timedelta(minutes=4, seconds=5)))
    steady = listing.stretch_of(slow, now=now)
    assert steady == listing.Stretch(started_at=now - listing.THROUGHPUT_WINDOW, finishes=3)
    # A burst before a pause, then work again: the stretch starts when its first job was sent,
    # as long as jobs take (the median), never before the last finish before the pause.
    before: list[tuple[datetime, datetime | None]] = [
        (now - timedelta(minutes=8, seconds=s), None) for s in range(4, -1, -1)
    ]
    after: list[tuple[datetime, datetime | None]] = [
        (now - timedelta(seconds=s), now - timedelta(seconds=s + 20)) for s in (9, 6, 3, 1)
    ]
    resumed = listing.stretch_of(before + after, now=now)
    assert resumed == listing.Stretch(started_at=now - timedelta(seconds=9 + 20), finishes=4)
    # Jobs sent before the pause (a restarted run's recovered ones) start it no earlier than that.
    slow_ones: list[tuple[datetime, datetime | None]] = [(at, now - timedelta(minutes=30)) for at, _ in after]
    recovered = listing.stretch_of(before + slow_ones, now=now)
    assert recovered == listing.Stretch(started_at=now - timedelta(minutes=8), finishes=4)
    untimed = listing.stretch_of(before + [(now - timedelta(seconds=9), None)] * 3, now=now)
    assert untimed == listing.Stretch(started_at=now - timedelta(seconds=9), finishes=3)
    # More finishes in the window than were read: the pace of those read, from the first.
    capped = listing.stretch_of(after, now=now, capped=True)
    assert capped == listing.Stretch(started_at=now - timedelta(seconds=9), finishes=3)
    # The pace goes by the stretch, never before the first submit nor the window.
    totals = Totals(first_submitted_at=T0, recent=50, stretch=resumed)
    totals.counts.update(succeeded=100, pending=400, running=10)
    assert pace(totals, held="", now=now).per_minute == 4 / (29 / 60)
    young = Totals(first_submitted_at=now - timedelta(seconds=10), stretch=resumed)
    assert pace(young, held="", now=now).per_minute == 24.0
    # The host's clock went back an hour since the stamps (NTP): no pace, never "~0:00:00 left"
    # from a window cut to one second; a few seconds of skew between hosts is no such step.
    ahead = Totals(first_submitted_at=now + timedelta(hours=1) - timedelta(minutes=2), recent=5)
    ahead.counts.update(succeeded=5, pending=40, running=8)
    assert pace(ahead, held="", now=now) == listing.Pace(None, None, "")
    ahead.stretch = listing.Stretch(started_at=now + timedelta(minutes=59), finishes=5)
    assert pace(ahead, held="", now=now).eta_seconds is None
    skewed = Totals(first_submitted_at=now + timedelta(seconds=2), recent=5)
    skewed.counts.update(succeeded=5, pending=40, running=8)
    assert pace(skewed, held="", now=now).eta_seconds is not None


def _slept(now: datetime, *, sleep: timedelta) -> list[tuple[datetime, datetime | None]]:
    """The overnight audit's run, as its finishes (finish, submit) oldest first: 4 jobs in flight,
    each 60 s at fal, one finishing every 15 s; the laptop sleeps ``sleep`` (the run frozen, fal
    working on) and wakes 70 s before ``now``. The 4 jobs fal finished meanwhile are stamped as the
    run learns of them, at the resume (a second apart: their downloads); the 4 it sends then
    finished 10 s ago."""
    resumed = now - timedelta(seconds=70)
    froze = resumed - sleep
    finished: list[tuple[datetime, datetime | None]] = []
    for k in range(40):
        sent = froze - timedelta(seconds=15 * k + 1)
        at = sent + timedelta(seconds=60)
        learnt = (
            at if at < froze else resumed + timedelta(seconds=len([f for f in finished if f[0] >= resumed]))
        )
        if learnt >= now - listing.THROUGHPUT_WINDOW:
            finished.append((learnt, sent))
    finished += [(resumed + timedelta(seconds=60 + i), resumed + timedelta(seconds=i)) for i in range(4)]
    return sorted(finished, key=lambda f: f[0])


@pytest.mark.parametrize("sleep", [timedelta(minutes=3), timedelta(hours=8)])
def test_after_the_laptop_slept_the_pace_is_the_work_since_it_woke(sleep: timedelta) -> None:
    """Overnight audit: `kill -STOP` of the run for 3 minutes while fal went on, then `kill -CONT`:
    the ETA stayed ~2x too long until the batch ended ("~0:05:29 left" with 2:46 left). The jobs fal
    finished during the sleep were stamped at the resume, their submit-to-finish times held the
    sleep, and dated back by them the stretch began before the sleep: the frozen minutes were
    counted as work. The stretch now starts at the resume, less the time a job takes (60 s)."""
    now = T0 + timedelta(hours=12)
    resumed = now - timedelta(seconds=70)
    stretch = listing.stretch_of(_slept(now, sleep=sleep), now=now)
    assert stretch == listing.Stretch(started_at=resumed - timedelta(seconds=60), finishes=8)
    totals = Totals(first_submitted_at=T0, stretch=stretch)
    totals.counts.update(succeeded=300, pending=80, running=4)
    moving = pace(totals, held="", now=now)
    assert moving.per_minute is not None
    assert 3.5 < moving.per_minute <= 4.0  # 4 jobs a minute: 4 in flight, 60 s each (was 1.8, or 0.8)
    assert moving.eta_seconds is not None
    assert moving.eta_seconds < 84 / 3.5 * 60
    # Before any job sent since the resume finished, a job's time is the one before the sleep.
    early = listing.stretch_of(
        [f for f in _slept(now, sleep=sleep) if f[0] < now - timedelta(seconds=10)], now=now
    )
    assert early is not None
    if sleep < listing.THROUGHPUT_WINDOW:  # the finishes before it are in the window
        assert early == listing.Stretch(started_at=resumed - timedelta(seconds=60), finishes=4)


def test_after_the_laptop_slept_status_forecasts_from_the_resume(session: Session) -> None:
    """The same, through the store: the jobs' stamps as the run wrote them, and the batch summary."""
    now = datetime.now(UTC)
    finished = _slept(now, sleep=timedelta(minutes=3))
    batch = make_batch(
        session, "slept", [new_job(i, endpoint=ENDPOINTS[0]) for i in range(len(finished) + 20)]
    )
    for job, (at, sent) in zip(
        store.jobs_of_batch(session, batch.id), [*finished, *[(None, None)] * 20], strict=True
    ):
        values: dict[str, object] = {"state": JobState.PENDING}
        if at is not None:
            values = {"state": JobState.SUCCEEDED, "submitted_at": sent, "finished_at": at}
        session.execute(update(Job).where(Job.id == job.id).values(**values))
    session.commit()
    summary = listing.batch_summary(session, batch.id, now=now).all
    assert summary.stretch == listing.Stretch(started_at=now - timedelta(seconds=130), finishes=8)


def _walk_forward(session: Session, batch_id: str, limit: int, **filters: object) -> list[str]:
    seen: list[str] = []
    page = listing.list_jobs(session, batch_id, limit=limit, **filters)  # type: ignore[arg-type]
    assert not page.has_prev
    while True:
        seen += [r.id for r in page.rows]
        if not page.has_next:
            return seen
        page = listing.list_jobs(session, batch_id, limit=limit, after=page.last, **filters)  # type: ignore[arg-type]
        assert page.has_prev


def _walk_backward(session: Session, batch_id: str, limit: int, **filters: object) -> list[str]:
    seen: list[str] = []
    page = listing.list_jobs(session, batch_id, limit=limit, last=True, **filters)  # type: ignore[arg-type]
    assert not page.has_next
    while True:
        seen = [r.id for r in page.rows] + seen
        if not page.has_prev:
            return seen
        page = listing.list_jobs(session, batch_id, limit=limit, before=page.first, **filters)  # type: ignore[arg-type]
        assert page.has_next


@pytest.mark.parametrize("limit", [1, 4, 7, 50])
def test_keyset_pages_meet_every_job_once_in_item_order(session: Session, limit: int) -> None:
    mixed = mixed_batch(session)
    mixed_batch(session, "neighbour", items=5)
    expected = [j.id for j in mixed.jobs]  # jobs_of_batch: item order, then variant
    assert _walk_forward(session, mixed.batch.id, limit) == expected
    assert _walk_backward(session, mixed.batch.id, limit) == expected
    failed = [j.id for j in mixed.jobs if j.state == JobState.FAILED]
    assert _walk_forward(session, mixed.batch.id, limit, states=[JobState.FAILED]) == failed
    assert _walk_backward(session, mixed.batch.id, limit, states=[JobState.FAILED]) == failed
    wan22_done = [j.id for j in mixed.jobs if j.endpoint == ENDPOINTS[1] and j.state == JobState.SUCCEEDED]
    assert wan22_done  # item 3's second variant among them
    filters = {"states": [JobState.SUCCEEDED], "endpoint": ENDPOINTS[1]}
    assert _walk_forward(session, mixed.batch.id, limit, **filters) == wan22_done


def test_job_rows_carry_what_the_table_shows(session: Session) -> None:
    mixed = mixed_batch(session)
    rows = listing.list_jobs(session, mixed.batch.id, limit=50).rows
    assert [(r.item_index, r.variant) for r in rows[3:5]] == [(3, 0), (3, 1)]
    done = rows[1]
    assert (done.state, done.seed, done.actual_usd, done.attempts) == ("succeeded", 1001, Decimal("0.45"), 1)
    assert done.media is not None
    assert done.media["width"] == 848
    assert done.prompt == "a paper boat, take 1"
    assert rows[2].media_mismatch == "frame size 424x240, asked 848x480"
    failed = rows[5]
    assert failed.state == "failed"
    assert failed.error_type == "runner_disconnected"
    assert listing.list_jobs(session, mixed.batch.id, states=[JobState.CANCELLING]).rows == []
    assert listing.job_output(session, "nope") is None


def test_cursor_round_trips_and_refuses_garbage() -> None:
    cursor = Cursor(12, 3, "ab12cd")
    assert Cursor.decode(cursor.encode()) == cursor
    for bad in (
        "",
        None,
        "1.2",
        "a.0.x",
        "1.b.x",
        "1.2.",
        "1.2.x y",
        "1.2.x.y",
        "1" * 12 + ".0.x",
        "1.0." + "a" * 40,
    ):
        assert Cursor.decode(bad) is None


def test_child_batches_are_the_reruns(session: Session) -> None:
    parent = make_batch(session, "parent", [new_job(0, endpoint=ENDPOINTS[0])])
    child, _ = store.get_or_create_batch(
        session,
        name="parent-rerun-1",
        manifest_path="/m.yaml",
        manifest_sha256="0" * 64,
        budget_max_usd=None,
        parent_batch_id=parent.id,
    )
    session.commit()
    assert listing.child_batches(session, parent.id) == [(child.id, "parent-rerun-1")]
    assert listing.child_batches(session, child.id) == []
