"""A batch's schedule, priority and user pause (issue #12), stored on PostgreSQL and SQLite.

What the dispatcher reads (``store.batch_schedule``, ``store.scheduled_batches``) and what
``status`` shows (``batch_report``'s ``schedule_state`` in words, with an explicit ``now``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from jobs import store
from jobs.batches import batch_progress, batch_report, paused_schedule_text
from jobs.db import make_engine, migrate
from jobs.models import Batch, BatchState
from jobs.schedule import Schedule
from jobs.states import JobState

#: 13:00 in Berlin (UTC+1 in December): the 22:00-06:00 window opens in 9 hours.
NOON = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DEADLINE = datetime(2026, 12, 2, 5, 0, tzinfo=UTC)
NIGHT = Schedule(
    deadline=DEADLINE,
    window=(time(22, 0), time(6, 0)),
    timezone="Europe/Berlin",
)


def new_job(i: int) -> store.NewJob:
    return store.NewJob(
        key=f"{i:064x}",
        item_index=i,
        endpoint="fal-ai/wan-i2v",
        input={"prompt": f"item {i}", "resolution": "480p"},
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.20"),
    )


def make_batch(
    session: Session, name: str, n: int = 3, schedule: Schedule | None = None, priority: str = "normal"
) -> Batch:
    batch, created = store.get_or_create_batch(
        session,
        name=name,
        manifest_path="/m.yaml",
        manifest_sha256="0" * 64,
        budget_max_usd=None,
        schedule=schedule,
        priority=priority,
    )
    assert created
    store.add_jobs(session, batch.id, (new_job(i) for i in range(n)))
    session.commit()
    return batch


def reread(session: Session, batch_id: str) -> Batch:
    session.expire_all()
    return store.get_batch(session, batch_id)


def test_schedule_and_priority_are_stored_and_read_back(session: Session) -> None:
    batch = make_batch(session, "night", schedule=NIGHT, priority="low")
    stored = reread(session, batch.id)
    assert stored.schedule == NIGHT.as_json()
    assert store.batch_schedule(stored) == NIGHT
    assert (stored.priority, stored.paused_by_user) == ("low", False)


def test_an_empty_schedule_is_stored_as_null(session: Session) -> None:
    """NULL is "no schedule", so the dispatcher's list of held-back batches stays short."""
    plain = make_batch(session, "plain", schedule=Schedule(timezone="Europe/Berlin"))
    stored = reread(session, plain.id)
    assert stored.schedule is None
    assert store.batch_schedule(stored).is_empty()
    assert stored.priority == "normal"


def test_set_batch_schedule_replaces_and_clears(session: Session) -> None:
    batch = make_batch(session, "night", schedule=NIGHT)
    later = Schedule(not_before=NOON + timedelta(hours=3))
    store.set_batch_schedule(session, batch.id, later, "low")
    session.commit()
    stored = reread(session, batch.id)
    assert (store.batch_schedule(stored), stored.priority) == (later, "low")
    store.set_batch_schedule(session, batch.id, None, "normal")
    session.commit()
    stored = reread(session, batch.id)
    assert (stored.schedule, stored.priority) == (None, "normal")


def test_pause_flag_leaves_the_state_alone(session: Session) -> None:
    batch = make_batch(session, "b")
    store.set_batch_state(session, batch.id, BatchState.PAUSED, "account locked")
    store.set_paused_by_user(session, batch.id, True)
    session.commit()
    stored = reread(session, batch.id)
    assert (stored.paused_by_user, stored.state, stored.pause_reason) == (
        True,
        BatchState.PAUSED,
        "account locked",
    )
    store.set_paused_by_user(session, batch.id, False)
    session.commit()
    stored = reread(session, batch.id)
    assert (stored.paused_by_user, stored.state) == (False, BatchState.PAUSED)


def test_scheduled_batches_lists_scheduled_and_paused_ones_only(session: Session) -> None:
    make_batch(session, "plain")
    night = make_batch(session, "night", schedule=NIGHT)
    paused = make_batch(session, "paused")
    store.set_paused_by_user(session, paused.id, True)
    session.commit()
    assert [b.name for b in store.scheduled_batches(session)] == ["night", "paused"]
    store.set_paused_by_user(session, paused.id, False)
    store.set_batch_schedule(session, night.id, Schedule(), "normal")
    session.commit()
    assert store.scheduled_batches(session) == []


def _finish(session: Session, batch_id: str, state: str = "succeeded") -> None:
    session.execute(text("UPDATE jobs SET state = :s WHERE batch_id = :b"), {"s": state, "b": batch_id})
    session.commit()


def test_finished_batches_drop_out_of_what_every_round_reads(session: Session) -> None:
    """A nightly scheduled batch, once done, must not be read by every dispatch round (one per
    completion) and every tick forever after; nor a cancelled batch whose jobs all ended."""
    last_night = make_batch(session, "last-night", schedule=NIGHT)
    tonight = make_batch(session, "tonight", schedule=NIGHT)
    paused = make_batch(session, "paused-done")
    store.set_paused_by_user(session, paused.id, True)
    session.commit()
    _finish(session, last_night.id)
    _finish(session, paused.id, "cancelled")
    assert [b.name for b in store.scheduled_batches(session)] == ["tonight"]
    own = store.dispatch_batches(session, [last_night.id])  # a round's own batch: always read
    assert [b.name for b in own] == ["last-night", "tonight"]

    gave_up = make_batch(session, "gave-up")
    store.set_batch_state(session, gave_up.id, BatchState.CANCELLED)
    session.commit()
    assert store.cancelled_batches_with_work(session) == [gave_up.id]
    session.execute(text("UPDATE jobs SET state = 'queued' WHERE batch_id = :b"), {"b": gave_up.id})
    session.commit()
    assert store.cancelled_batches_with_work(session) == [gave_up.id]  # requests at fal to cancel
    _finish(session, gave_up.id, "cancelled")
    assert store.cancelled_batches_with_work(session) == []
    store.set_batch_state(session, tonight.id, BatchState.CANCELLED)
    session.commit()
    assert store.cancelled_batches_with_work(session) == [tonight.id]


def test_schedule_state_in_words(session: Session) -> None:
    batch = make_batch(session, "night", schedule=NIGHT, priority="low")
    report = batch_report(session, batch.id, now=NOON)
    assert report["schedule_state"] == "waiting for window (opens 22:00 Europe/Berlin, in 9h)"
    assert report["schedule"] == NIGHT.as_json()
    assert (report["priority"], report["paused_by_user"]) == ("low", False)

    store.set_paused_by_user(session, batch.id, True)
    session.commit()
    report = batch_report(session, batch.id, now=NOON)
    assert (report["schedule_state"], report["paused_by_user"]) == ("paused by user", True)
    assert report["state"] == "active"  # the pause is a flag, not a state

    store.set_paused_by_user(session, batch.id, False)
    session.commit()
    assert batch_report(session, batch.id, now=NOON + timedelta(hours=9, minutes=30))[
        "schedule_state"
    ].startswith("open until")


def test_past_deadline_counts_the_jobs_it_cancelled(session: Session) -> None:
    batch = make_batch(session, "night", n=4, schedule=NIGHT)
    job = next(store.jobs_of_batch(session, batch.id))
    store.fail_job(session, store.Fence.of(job, "test"), error="boom", error_type="model")
    cancelled = store.cancel_unsent_jobs(
        session, [batch.id], reason="deadline", error="deadline passed", error_type="deadline"
    )
    session.commit()
    assert cancelled == 3
    after = DEADLINE + timedelta(minutes=1)
    assert batch_report(session, batch.id, now=after)["schedule_state"] == "past deadline: 3 cancelled"


def test_no_schedule_state_without_a_schedule_or_when_finished(session: Session) -> None:
    plain = make_batch(session, "plain")
    assert batch_report(session, plain.id, now=NOON)["schedule_state"] == ""
    assert batch_report(session, plain.id, now=NOON)["schedule"] is None

    night = make_batch(session, "night", n=2, schedule=NIGHT)
    for job in list(store.jobs_of_batch(session, night.id)):
        store.fail_job(session, store.Fence.of(job, "test"), error="boom", error_type="model")
    session.commit()
    assert store.counts_by_state(session, night.id)[JobState.FAILED.value] == 2
    assert batch_report(session, night.id, now=NOON)["schedule_state"] == ""  # not "waiting"


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_batches_stored_before_the_upgrade_read_normal_and_not_paused(
    dialect: str, tmp_path: Path, new_pg_database: Callable[[], str]
) -> None:
    """Revision 0005's server defaults: an existing batch gets priority normal, no pause, no schedule."""
    url = f"sqlite:///{tmp_path / 'old.db'}" if dialect == "sqlite" else new_pg_database()
    engine = make_engine(url)
    try:
        migrate(engine, "0004")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO batches (id, name, manifest_path, manifest_sha256, created_at, state) "
                    "VALUES ('b0', 'old', '/m.yaml', :sha, :at, 'active')"
                ),
                {"sha": "0" * 64, "at": NOON.replace(tzinfo=None) if dialect == "sqlite" else NOON},
            )
        migrate(engine)
        with Session(engine) as session:
            old = store.get_batch(session, "old")
            assert (old.schedule, old.priority, old.paused_by_user) == (None, "normal", False)
            assert store.scheduled_batches(session) == []
    finally:
        engine.dispose()


def _moved(
    session: Session, batch_id: str, states: list[JobState], *, now: datetime, first_sent_ago: timedelta
) -> None:
    """The batch's jobs put in ``states`` (in item order), as a run that works on it (its
    heartbeat) leaves them at ``now``: every one sent ``first_sent_ago`` (the first submit), the
    finished ones a second before ``now``."""
    store.record_heartbeat(session, "run:1:", [batch_id], now)
    jobs = sorted(store.jobs_of_batch(session, batch_id), key=lambda j: j.item_index)
    for job, state in zip(jobs, states, strict=True):
        job.state = state
        if state != JobState.PENDING:
            job.submitted_at = now - first_sent_ago
        if state.terminal:
            job.finished_at = now - timedelta(seconds=1)
    session.commit()


def test_the_progress_line_forecasts_by_the_rules_of_status(session: Session) -> None:
    """``run``'s progress line promised "~0:00:45 left" for a batch its user paused, and for one
    whose window would not open again before its deadline (its waiting jobs ended cancelled).
    It forecasts by ``status``'s rules now, at ``status``'s pace: none while the batch is held
    back, and the schedule's caveat when sending stops before the work is done."""
    done, left = [JobState.SUCCEEDED] * 10, [JobState.RUNNING] + [JobState.PENDING] * 3
    night = make_batch(session, "night", n=14, schedule=NIGHT)
    at_night = NOON + timedelta(hours=10)  # 23:00 in Berlin: open until the deadline (in 7h)
    # 10 finished in the last 10 minutes: 1 a minute, 4 jobs left.
    _moved(session, night.id, done + left, now=at_night, first_sent_ago=timedelta(minutes=20))

    def forecast(batch_id: str, now: datetime) -> tuple[float | None, str | None]:
        current = batch_progress(session, batch_id, now=now)
        report = batch_report(session, batch_id, now=now)
        assert (current["eta_seconds"], current["eta_note"]) == (report["eta_seconds"], report["eta_note"])
        return current["eta_seconds"], current["eta_note"]

    assert forecast(night.id, at_night) == (240.0, None)  # 4 jobs left at 1 a minute
    # Two minutes before the deadline, at the same pace.
    near = DEADLINE - timedelta(minutes=2)
    _moved(session, night.id, done + left, now=near, first_sent_ago=timedelta(minutes=20))
    assert forecast(night.id, near) == (
        240.0,
        "the deadline comes first (in 2m): what is not sent by then, or still queued at fal, is cancelled",
    )

    store.set_paused_by_user(session, night.id, True)
    session.commit()
    assert forecast(night.id, near) == (None, None)  # was ~4 minutes: nothing is sent

    # A window that opens only after the deadline: closed for good, its waiting jobs never sent.
    over = make_batch(
        session,
        "too-late",
        n=14,
        schedule=Schedule(
            deadline=NOON + timedelta(hours=1), window=(time(22, 0), time(6, 0)), timezone="Europe/Berlin"
        ),
    )
    _moved(session, over.id, done + left, now=NOON, first_sent_ago=timedelta(minutes=20))
    assert batch_progress(session, over.id, now=NOON)["held"].startswith("closed: nothing opens before")
    assert forecast(over.id, NOON) == (None, None)


def test_the_progress_line_goes_by_the_pace_of_status_not_by_the_last_seconds(session: Session) -> None:
    """A night's audit: `run` printed "~0:00:18 left" with 4 jobs unfinished (2 queued at fal),
    two of them having finished within a second, while `status` said "~1m36s left at this pace,
    but the window closes first (in 41s)". The line measured its own pace (rich's 30-second
    sampling); it gives what `status` gives now: the pace of the last 10 minutes (here, since
    the first submit 47 s ago), and the window's caveat."""
    now = NOON + timedelta(hours=10, seconds=19)  # 23:00:19 in Berlin
    closing = Schedule(window=(time(22, 0), time(23, 1)), timezone="Europe/Berlin")  # closes in 41 s
    batch = make_batch(session, "eta", n=6, schedule=closing)
    states = [JobState.SUCCEEDED] * 2 + [JobState.RUNNING] * 2 + [JobState.QUEUED] * 2
    _moved(session, batch.id, states, now=now, first_sent_ago=timedelta(seconds=47))

    current = batch_progress(session, batch.id, now=now)
    report = batch_report(session, batch.id, now=now)
    assert current["eta_seconds"] == report["eta_seconds"] == 94.0  # 4 left at 2 in 47 s
    assert current["eta_note"] == report["eta_note"]
    assert current["eta_note"] == "the window closes first (in 41s): the rest waits for the next one"


def test_a_pause_says_the_schedule_that_holds_the_batch_back_too(session: Session) -> None:
    """Paused by its user, then its window closed: `status` said only "paused by user (`wanbatch
    resume` goes on)", and the user learnt after resuming that nothing is sent until the next
    night. The phase stays ``paused``; ``paused_schedule_state`` says what the schedule says."""
    batch = make_batch(session, "night", n=3, schedule=NIGHT)
    store.set_paused_by_user(session, batch.id, True)
    session.commit()

    report = batch_report(session, batch.id, now=NOON)  # 13:00 in Berlin: the window is closed
    assert (report["phase"], report["phase_reason"]) == ("paused", "by its user")
    assert report["schedule_state"] == "paused by user"
    closed = "waiting for window (opens 22:00 Europe/Berlin, in 9h)"
    assert report["paused_schedule_state"] == closed
    assert batch_progress(session, batch.id, now=NOON)["paused_schedule_state"] == closed
    assert paused_schedule_text(closed) == "its window is closed (opens 22:00 Europe/Berlin, in 9h)"
    later = "waiting until 2026-12-05 22:00 +01:00 (in 5h)"  # a not_before ahead
    assert paused_schedule_text(later) == "nothing is sent before 2026-12-05 22:00 +01:00 (in 5h)"

    at_night = NOON + timedelta(hours=10)  # open: resuming goes on at once
    report = batch_report(session, batch.id, now=at_night)
    assert report["paused_schedule_state"].startswith("open until the deadline")
    assert paused_schedule_text(report["paused_schedule_state"]) == ""

    store.set_paused_by_user(session, batch.id, False)
    session.commit()
    assert batch_report(session, batch.id, now=NOON)["paused_schedule_state"] == ""  # not paused
    unscheduled = make_batch(session, "plain", n=1)
    store.set_paused_by_user(session, unscheduled.id, True)
    session.commit()
    assert batch_report(session, unscheduled.id, now=NOON)["paused_schedule_state"] == ""


def test_a_finished_batch_its_user_paused_reads_as_done(session: Session) -> None:
    """Paused while its last jobs were at fal, then finished: ``status`` still said "paused by
    user" (and "`wanbatch resume` goes on", with nothing left to go on with). Nothing holds a
    finished batch back; the flag itself is still said by ``paused_by_user``."""
    batch = make_batch(session, "night", n=2)
    store.set_paused_by_user(session, batch.id, True)
    session.execute(text("UPDATE jobs SET state = 'succeeded' WHERE batch_id = :b"), {"b": batch.id})
    session.commit()
    report = batch_report(session, batch.id, now=NOON)
    assert (report["phase"], report["phase_reason"]) == ("done", None)
    assert (report["schedule_state"], report["paused_by_user"]) == ("", True)
    # The last line of the `run` that collected them: not "… · paused by user · succeeded:2".
    assert batch_progress(session, batch.id, now=NOON)["schedule_state"] == ""


def test_a_pause_past_the_deadline_gives_way_to_the_deadline(session: Session) -> None:
    """A batch paused overnight, read the next morning: ``status`` said "paused by user" (resume
    goes on) and nothing of the deadline, though resuming sends nothing and its unsent jobs end
    cancelled. The schedule's words come first once it will never send again."""
    batch = make_batch(session, "night", n=3, schedule=NIGHT)
    store.set_paused_by_user(session, batch.id, True)
    session.commit()
    assert batch_report(session, batch.id, now=NOON)["schedule_state"] == "paused by user"  # not over

    after = DEADLINE + timedelta(minutes=1)
    report = batch_report(session, batch.id, now=after)
    assert (report["phase"], report["phase_reason"]) == ("deadline", "past deadline: 0 cancelled")
    assert (report["schedule_state"], report["paused_by_user"]) == ("past deadline: 0 cancelled", True)

    # Before the deadline, but the window opens only after it: over too.
    late = make_batch(
        session,
        "too-late-paused",
        schedule=Schedule(
            deadline=NOON + timedelta(hours=1), window=(time(22, 0), time(6, 0)), timezone="Europe/Berlin"
        ),
    )
    store.set_paused_by_user(session, late.id, True)
    session.commit()
    report = batch_report(session, late.id, now=NOON)
    assert report["schedule_state"].startswith("closed: nothing opens before the deadline")
    assert (report["phase"], report["phase_reason"]) == ("waiting", report["schedule_state"])


def test_the_progress_line_gives_no_time_left_while_nothing_processes_the_batch(session: Session) -> None:
    """An audit: with a broker configured, `run` watched the workers, one of them was killed -9
    and none was left; its line kept a growing "~0:21:59 left", then "~0:42:20 left", while
    `status --json` said processing false and eta_seconds null. The line asked only what holds
    the batch back (a pause, the schedule), not whether anything processes it: it goes by
    status's one rule now (jobs.batches.batch_standing), and says why there is no forecast."""
    now = NOON + timedelta(hours=10)
    batch = make_batch(session, "orphan", n=14)
    states = [JobState.SUCCEEDED] * 10 + [JobState.RUNNING] * 2 + [JobState.PENDING] * 2
    _moved(session, batch.id, states, now=now, first_sent_ago=timedelta(minutes=20))

    live = batch_progress(session, batch.id, now=now)
    assert (live["processing"], live["standing"], live["eta_seconds"]) == (True, "", 240.0)

    later = now + timedelta(seconds=90)  # the last beat is 90 s old: nothing processes it
    current = batch_progress(session, batch.id, now=later)
    report = batch_report(session, batch.id, now=later)
    assert (report["processing"], report["eta_seconds"]) == (False, None)
    assert (current["processing"], current["eta_seconds"], current["eta_note"]) == (False, None, None)
    assert current["held"] == ""  # nothing holds it back: it is not moving, which the line says
    assert current["standing"] == "nothing is processing it (last seen 1m ago)"
