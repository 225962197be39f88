"""Committed money, read for the budget checks without summing the finished jobs.

``store.batch_committed_usd`` and ``store.committed_usd_today`` add :class:`jobs.models.BatchTotals`
(finished jobs' money by batch and UTC day of last submit, kept by the transaction that finishes
each job) to sums over the few unfinished jobs. They must equal ``store.batch_money(...)
.committed_usd`` and ``store.committed_usd_since(midnight)``, the sums over every job, after any
sequence of moves the lifecycle allows, whatever they bill and whenever they were sent, whether
they commit or roll back, one by one or set-based.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine, MetaData, Table, column, event, insert, inspect, select, table

from jobs import db, store
from jobs.batches import batch_progress, batch_report
from jobs.db import downgrade, make_engine, migrate
from jobs.models import Batch, BatchState, BatchTotals, Job, JobEvent, utcnow
from jobs.states import ALLOWED_TRANSITIONS, JobState
from tests.step_runtime import add_batch

S = JobState


def _batch(engine: Engine, batch_id: str) -> tuple[Decimal, Decimal]:
    """(the budget check's figure, the full sum) for a batch."""
    with db.read_scope(engine) as session:
        money = store.batch_money(session, batch_id)
        # The progress line's figures, read the same way, equal the full sums too.
        assert store.batch_spent_usd(session, batch_id) == money.spent_usd
        assert store.batch_estimated_usd(session, batch_id) == money.estimated_usd
        return store.batch_committed_usd(session, batch_id), money.committed_usd


def _today(engine: Engine) -> tuple[Decimal, Decimal]:
    """(the daily budget check's figure, the full sum) for today (UTC). The same figure by batch
    (whose spending a daily-cap refusal names) sums to it, every batch named once."""
    now = utcnow()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    with db.read_scope(engine) as session:
        fast = store.committed_usd_today(session, now)
        by_batch = store.committed_usd_today_by_batch(session, now)
        assert sum((s.usd for s in by_batch), Decimal(0)) == fast
        assert len({s.batch_id for s in by_batch}) == len(by_batch)
        assert [s.usd for s in by_batch] == sorted((s.usd for s in by_batch), reverse=True)
        return fast, store.committed_usd_since(session, midnight)


def _finished(engine: Engine, batch_id: str) -> Decimal:
    with db.read_scope(engine) as session:
        rows = session.scalars(select(BatchTotals.finished_usd).where(BatchTotals.batch_id == batch_id))
        return sum(rows, Decimal(0))


def _jobs(engine: Engine, batch_id: str) -> list[Job]:
    with db.read_scope(engine) as session:
        return list(store.jobs_of_batch(session, batch_id))


def _move(engine: Engine, job: Job, new: JobState, *, commit: bool = True, **fields: Any) -> None:
    session = db.session_factory(engine)()
    try:
        assert store.transition(
            session, job.id, job.state, new, reason="test", expected_version=job.version, **fields
        )
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


def test_the_running_totals_equal_the_full_sums_through_every_kind_of_move(engine: Engine) -> None:
    rng = random.Random(11)
    batches = [
        add_batch(engine, f"totals-{b}", [("fal-ai/wan-22", {"prompt": f"{b}-{i}"}) for i in range(8)])
        for b in range(2)
    ]
    finished_kinds: set[tuple[JobState, bool]] = set()
    today_seen = Decimal(0)
    for step in range(240):
        if step % 60 == 59:  # now and then, a set-based cancel of what was never sent
            with db.session_scope(engine) as session:
                store.cancel_unsent_jobs(
                    session, [batches[0]], reason="cancel", error="cancelled", error_type="cancelled"
                )
        else:
            movable = [j for j in _jobs(engine, rng.choice(batches)) if not j.state.terminal]
            if not movable:
                continue
            job = rng.choice(movable)
            new = rng.choice(sorted(ALLOWED_TRANSITIONS[job.state]))
            fields: dict[str, Any] = {}
            if new == S.SUBMITTING and rng.random() < 0.8:  # sent today, or a day or two ago
                fields["submitted_at"] = utcnow() - timedelta(days=rng.choice([0, 0, 1, 2]), seconds=1)
            if rng.random() < 0.5:  # fal billed something (or reported no cost)
                amounts = [None, Decimal(0), Decimal("0.25"), Decimal("0.31"), Decimal("1.7")]
                fields["actual_usd"] = rng.choice(amounts)
            committed = rng.random() >= 0.15
            _move(engine, job, new, commit=committed, **fields)
            if new.terminal and committed:
                finished_kinds.add((new, fields.get("actual_usd") is not None))
        for batch_id in batches:
            fast, full = _batch(engine, batch_id)
            assert fast == full, (step, batch_id)
        fast, full = _today(engine)
        assert fast == full, step
        today_seen = max(today_seen, fast)
    # The walk did reach the cases that matter: each terminal state, billed and not, on
    # several days (today, earlier, never sent).
    assert {S.SUCCEEDED, S.FAILED, S.CANCELLED} <= {state for state, _ in finished_kinds}
    assert any(billed for _, billed in finished_kinds)
    assert all(_batch(engine, b)[0] > 0 for b in batches)
    assert today_seen > 0
    with db.read_scope(engine) as session:
        days = set(session.scalars(select(BatchTotals.day)))
    assert len(days) >= 2, days


def test_a_set_based_cancel_counts_what_earlier_attempts_billed(engine: Engine) -> None:
    batch_id = add_batch(engine, "cancel-billed", [("fal-ai/wan-22", {"prompt": f"c{i}"}) for i in range(4)])
    first, second, *_ = _jobs(engine, batch_id)
    with db.session_scope(engine) as session:
        # Attempt 1 of ``first`` ran at fal and was billed; it waits to be sent again.
        fence = store.Fence.of(first)
        assert store.transition(
            session, first.id, S.PENDING, S.SUBMITTING, expected_version=fence.version, submitted_at=utcnow()
        )
        assert store.transition(session, first.id, S.SUBMITTING, S.QUEUED, expected_version=fence.version + 1)
        assert store.transition(
            session,
            first.id,
            S.QUEUED,
            S.RETRY_WAIT,
            expected_version=fence.version + 2,
            actual_usd=Decimal("0.4"),
        )
        assert store.transition(
            session,
            second.id,
            S.PENDING,
            S.CANCELLED,
            expected_version=second.version,
            actual_usd=Decimal("0.1"),
        )
    assert _batch(engine, batch_id) == (Decimal("0.5"), Decimal("0.5"))
    with db.session_scope(engine) as session:
        assert (
            store.cancel_unsent_jobs(session, [batch_id], reason="r", error="e", error_type="cancelled") == 3
        )
    assert _finished(engine, batch_id) == Decimal("0.5")  # both billed jobs are finished now
    assert _batch(engine, batch_id) == (Decimal("0.5"), Decimal("0.5"))
    assert _today(engine)[0] == _today(engine)[1] == Decimal("0.4")  # the one sent today


def test_a_rolled_back_finish_leaves_the_totals_alone(engine: Engine) -> None:
    batch_id = add_batch(engine, "rollback", [("fal-ai/wan-22", {"prompt": "r"})])
    (job,) = _jobs(engine, batch_id)
    session = db.session_factory(engine)()
    try:
        assert store.transition(
            session, job.id, S.PENDING, S.FAILED, expected_version=job.version, actual_usd=Decimal(3)
        )
        session.rollback()
        # The same session's next transaction must not carry the rolled-back money along.
        assert store.transition(session, job.id, S.PENDING, S.CANCELLED, expected_version=job.version)
        session.commit()
    finally:
        session.close()
    assert _finished(engine, batch_id) == 0


def test_submits_of_unknown_outcome_stay_counted_however_they_leave(engine: Engine) -> None:
    """A job leaving ``submit_unknown`` without proof (failed, resent, cancelled one by one or
    set-based) keeps its estimate as possibly billed: in the budget checks' figures, which stay
    equal to the full sums, while it waits as ``pending`` too (the partial index's other half)."""
    batch_id = add_batch(engine, "totals-unknown", [("fal-ai/wan-22", {"prompt": f"u{i}"}) for i in range(4)])
    jobs = _jobs(engine, batch_id)
    for job in jobs:
        _move(engine, job, S.SUBMITTING, submitted_at=utcnow())
    for job in _jobs(engine, batch_id):
        _move(engine, job, S.SUBMIT_UNKNOWN)
    failed, resent, cancelled, swept = _jobs(engine, batch_id)
    _move(engine, failed, S.FAILED, error_type="submit_unknown")
    _move(engine, resent, S.RETRY_WAIT)
    _move(engine, cancelled, S.CANCELLED)
    resent = next(j for j in _jobs(engine, batch_id) if j.id == resent.id)
    _move(engine, resent, S.SUBMITTING)
    resent = next(j for j in _jobs(engine, batch_id) if j.id == resent.id)
    _move(engine, resent, S.PENDING)  # given back before its POST: pending, its first submit unknown
    with db.session_scope(engine) as session:
        store.cancel_unsent_jobs(session, [], reason="cancel", error="cancelled", error_type="cancelled")
    fast, full = _batch(engine, batch_id)
    assert fast == full == Decimal("1.00")  # 3 left without proof + 1 still reserved, $0.25 each
    with db.session_scope(engine) as session:  # the last one swept set-based, with the pending one
        store.cancel_unsent_jobs(
            session, [batch_id], reason="cancel", error="cancelled", error_type="cancelled"
        )
    fast, full = _batch(engine, batch_id)
    assert fast == full == Decimal("1.00")
    today_fast, today_full = _today(engine)
    assert today_fast == today_full
    by_id = {j.id: j for j in _jobs(engine, batch_id)}
    assert [by_id[j.id].ambiguous_usd for j in (failed, resent, cancelled, swept)] == [Decimal("0.25")] * 4
    with db.read_scope(engine) as session:
        assert store.batch_money(session, batch_id).possibly_billed_usd == Decimal("1.00")


def test_a_simulations_submits_of_unknown_outcome_are_never_possibly_billed(engine: Engine) -> None:
    """A simulation's POST went to a ``--simulate`` run's own simulator, never to a provider that
    bills: leaving ``submit_unknown`` without proof (failed, resent, cancelled one by one or
    set-based) adds nothing "possibly billed" (``cost`` of it says "nothing was paid")."""
    batch_id = add_batch(
        engine, "totals-simulated", [("fal-ai/wan-22", {"prompt": f"s{i}"}) for i in range(4)]
    )
    with db.session_scope(engine) as session:
        session.get_one(Batch, batch_id).simulated = True
    for job in _jobs(engine, batch_id):
        _move(engine, job, S.SUBMITTING, submitted_at=utcnow())
    for job in _jobs(engine, batch_id):
        _move(engine, job, S.SUBMIT_UNKNOWN)
    failed, resent, cancelled, _swept = _jobs(engine, batch_id)
    _move(engine, failed, S.FAILED, error_type="submit_unknown")
    _move(engine, resent, S.RETRY_WAIT)
    _move(engine, cancelled, S.CANCELLED)
    with db.session_scope(engine) as session:
        store.cancel_unsent_jobs(
            session, [batch_id], reason="cancel", error="cancelled", error_type="cancelled"
        )
    assert all(j.ambiguous_usd == 0 for j in _jobs(engine, batch_id))
    fast, full = _batch(engine, batch_id)
    assert fast == full
    with db.read_scope(engine) as session:
        assert store.batch_money(session, batch_id).possibly_billed_usd == 0


def _attempt(engine: Engine, batch_id: str, *ends: tuple[JobState, dict[str, Any]]) -> None:
    """Send the batch's one job once more (claimed, its POST sent today, run at fal), then move
    it through ``ends`` (a state and what the move writes)."""
    sent: list[tuple[JobState, dict[str, Any]]] = [(S.SUBMITTING, {"submitted_at": utcnow()}), (S.QUEUED, {})]
    for new, fields in [*sent, (S.RUNNING, {}), *ends]:
        (job,) = _jobs(engine, batch_id)
        _move(engine, job, new, **fields)


@pytest.mark.parametrize("first_bill", [Decimal(0), Decimal("0.25")])
def test_a_retried_job_being_downloaded_counts_its_estimate_on_top_of_earlier_attempts(
    engine: Engine, first_bill: Decimal
) -> None:
    """A job whose first attempt failed (billed nothing: a model error; or in full: it ran) and
    whose second fal finished: while its video is fetched, ``actual_usd`` holds the first
    attempt's bill only (the second's is written when the download ends), and the job counts
    that plus its estimate — in the budget checks (the batch's, the day's), the full sums and
    what ``status`` shows — never less. It counted $0 with a free first attempt, and a budget
    cap let one more job in while the paid video was being fetched."""
    batch_id = add_batch(engine, "retried", [("fal-ai/wan-22", {"prompt": "r"})])
    _attempt(engine, batch_id, (S.RETRY_WAIT, {"actual_usd": first_bill}))
    assert _batch(engine, batch_id) == (first_bill, first_bill)
    _attempt(engine, batch_id, (S.DOWNLOADING, {}))
    (job,) = _jobs(engine, batch_id)
    assert (job.state, job.actual_usd) == (S.DOWNLOADING, first_bill)
    expected = first_bill + Decimal("0.25")
    assert _batch(engine, batch_id) == (expected, expected)
    assert _today(engine) == (expected, expected)
    with db.read_scope(engine) as session:
        assert store.batch_money(session, batch_id).spent_usd == expected
        assert batch_progress(session, batch_id)["spent_usd"] == float(expected)
        report = batch_report(session, batch_id)
    assert (report["spent_usd"], report["reserved_usd"]) == (float(expected), 0.0)
    # The download ends and bills the attempt: the same money, now the job's actual cost and
    # its batch's finished total.
    _move(engine, job, S.SUCCEEDED, actual_usd=expected)
    assert _batch(engine, batch_id) == (expected, expected)
    assert _today(engine) == (expected, expected)
    assert _finished(engine, batch_id) == expected


def test_the_budget_checks_read_no_pending_job_that_was_never_billed(tmp_path: Path) -> None:
    """On SQLite the query plans show it: every table is searched by an index, pending jobs by
    the partial one (a scan would read every job of the batch, or of the database)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    migrate(engine)
    batch_id = add_batch(engine, "plan", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(50)])
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, sql: str, params: Any, _context: Any, _many: bool) -> None:
        seen.append((sql, params))

    event.listen(engine, "before_cursor_execute", record)
    with db.read_scope(engine) as session:
        store.batch_committed_usd(session, batch_id)
        store.committed_usd_today(session, utcnow())
        event.remove(engine, "before_cursor_execute", record)
        plans = [
            " | ".join(
                str(row[-1]) for row in session.connection().exec_driver_sql(f"EXPLAIN QUERY PLAN {q}", p)
            )
            for q, p in seen
            if "batch_totals" in q
        ]
    assert len(plans) == 2
    for plan in plans:
        assert "ix_jobs_pending_billed" in plan, plan
        assert "SCAN jobs" not in plan, plan
        assert "SCAN batch_totals" not in plan, plan
    engine.dispose()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_migration_fills_the_totals_of_existing_batches(
    dialect: str, tmp_path: Path, new_pg_database: Callable[[], str]
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}" if dialect == "sqlite" else new_pg_database()
    engine = make_engine(url)
    migrate(engine, from_models=False)
    downgrade(engine, "0008")
    now = utcnow()
    yesterday = now - timedelta(days=1)
    # The batches table as of 0008 (the model's later columns, with their defaults, are not there yet).
    old_batches = table(
        "batches",
        *(column(name) for name in ("id", "name", "manifest_path", "manifest_sha256", "created_at")),
        *(column(name) for name in ("state", "priority", "paused_by_user", "reuse_outputs")),
    )
    with engine.begin() as conn:
        conn.execute(
            insert(old_batches).values(
                id="b" * 32,
                name="old",
                manifest_path="old.yaml",
                manifest_sha256="0" * 64,
                created_at=now,
                state=BatchState.ACTIVE.value,
                priority="normal",
                paused_by_user=False,
                reuse_outputs=False,
            )
        )
        rows: list[tuple[JobState, Decimal | None, datetime | None]] = [
            (S.SUCCEEDED, Decimal("0.3"), now),  # billed as reported
            (S.SUCCEEDED, None, now),  # no cost reported: its estimate (0.25)
            (S.FAILED, Decimal("0.05"), yesterday),
            (S.CANCELLED, Decimal("0.02"), None),  # never sent (day "")
            (S.CANCELLED, None, None),
            (S.QUEUED, None, now),  # not finished: not in the totals
        ]
        # The jobs table as of 0008: the model's columns that exist there, with their types and defaults.
        present = {c["name"] for c in inspect(conn).get_columns("jobs")}
        old_jobs = Table("jobs", MetaData(), *(c._copy() for c in Job.__table__.columns if c.name in present))
        for i, (state, actual, submitted_at) in enumerate(rows):
            conn.execute(
                insert(old_jobs).values(
                    id=f"{i:032x}",
                    batch_id="b" * 32,
                    job_key=f"{i:064x}",
                    item_index=i,
                    variant=0,
                    endpoint="fal-ai/wan-22",
                    input={},
                    state=state,
                    version=0,
                    attempts=1,
                    est_billing_units=Decimal(5),
                    est_usd=Decimal("0.25"),
                    actual_usd=actual,
                    submitted_at=submitted_at,
                    created_at=now,
                    updated_at=now,
                    possible_duplicate_charges=0,
                    confirmed_duplicate_charges=0,
                )
            )
    migrate(engine, from_models=False)
    with db.read_scope(engine) as session:
        by_day = {t.day: t.finished_usd for t in session.scalars(select(BatchTotals))}
        assert by_day == {
            now.astimezone(UTC).date().isoformat(): Decimal("0.55"),
            yesterday.astimezone(UTC).date().isoformat(): Decimal("0.05"),
            "": Decimal("0.02"),
        }
        assert (
            store.batch_committed_usd(session, "b" * 32) == store.batch_money(session, "b" * 32).committed_usd
        )
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        assert store.committed_usd_today(session, now) == store.committed_usd_since(session, midnight)
    engine.dispose()


def test_finishing_jobs_of_several_batches_at_once_never_deadlocks(engine: Engine) -> None:
    """Transactions that each finish jobs of three batches, in their own random order, from six
    threads: the totals rows are written at commit in key order, so on PostgreSQL no two
    transactions ever wait for each other's rows in a cycle (a deadlock would abort one)."""
    threads, rounds = 6, 12
    batches = [
        add_batch(
            engine, f"busy-{b}", [("fal-ai/wan-22", {"prompt": f"{b}-{i}"}) for i in range(threads * rounds)]
        )
        for b in range(3)
    ]
    jobs = {b: _jobs(engine, b) for b in batches}
    errors: list[BaseException] = []

    def finish(worker: int) -> None:
        rng = random.Random(worker)
        try:
            for r in range(rounds):
                mine = [jobs[b][worker * rounds + r] for b in batches]
                rng.shuffle(mine)
                with db.session_scope(engine) as session:
                    for job in mine:
                        assert store.transition(
                            session,
                            job.id,
                            S.PENDING,
                            S.FAILED,
                            expected_version=job.version,
                            actual_usd=Decimal("0.01"),
                        )
                        time.sleep(0.001)  # hold the job rows a while: let the transactions overlap
        except BaseException as exc:  # reported below, with the thread's own error
            errors.append(exc)

    pool = [threading.Thread(target=finish, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert errors == []
    for batch_id in batches:
        assert _finished(engine, batch_id) == Decimal("0.01") * threads * rounds
        assert _batch(engine, batch_id)[0] == _batch(engine, batch_id)[1]


def test_the_progress_line_reads_the_full_sums_and_sees_jobs_added_later(engine: Engine) -> None:
    """``run``'s progress line reads spent money like the budget check and keeps the estimate
    until the batch's number of jobs changes: the figures still equal the full report's."""
    batch_id = add_batch(engine, "progress-money", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(3)])
    first = _jobs(engine, batch_id)[0]
    _move(engine, first, S.CANCELLED, actual_usd=Decimal("0.31"))

    def shown() -> tuple[float | None, float | None]:
        with db.read_scope(engine) as session:
            current = batch_progress(session, batch_id)
            money = store.batch_money(session, batch_id)
        assert (current["spent_usd"], current["estimated_usd"]) == (
            float(money.spent_usd),
            float(money.estimated_usd),
        )
        return current["spent_usd"], current["estimated_usd"]

    assert shown() == (0.31, 0.75)
    with db.session_scope(engine) as session:  # the same batch takes more jobs (a longer manifest)
        store.add_jobs(
            session,
            batch_id,
            [
                store.NewJob(
                    key="f" * 64,
                    item_index=9,
                    endpoint="fal-ai/wan-22",
                    input={"prompt": "added"},
                    est_billing_units=Decimal(1),
                    est_usd=Decimal("0.50"),
                )
            ],
        )
    assert shown() == (0.31, 1.25)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_migration_dates_lost_answers_and_moves_their_money_to_that_day(
    dialect: str, tmp_path: Path, new_pg_database: Callable[[], str]
) -> None:
    """Jobs stored before 0017 whose last submit's answer was lost kept ``submitted_at`` NULL (or
    an earlier attempt's), and their money was booked under that day ("" for none): the
    upgrade dates them by the event that made the outcome unknown, and moves their money there,
    so the daily budget counts what they may have cost today."""
    url = f"sqlite:///{tmp_path / 'old.db'}" if dialect == "sqlite" else new_pg_database()
    engine = make_engine(url)
    migrate(engine, from_models=False)
    downgrade(engine, "0016")
    now = utcnow()
    today = now.astimezone(UTC).date().isoformat()
    yesterday = now - timedelta(days=1)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    earlier = midnight + (now - midnight) / 2  # today, whenever the test runs
    batch_id = "c" * 32
    with engine.begin() as conn:
        conn.execute(
            insert(cast(Table, Batch.__table__)).values(
                id=batch_id,
                name="before-0017",
                manifest_path="old.yaml",
                manifest_sha256="0" * 64,
                created_at=now,
                state=BatchState.ACTIVE.value,
            )
        )
        present = {c["name"] for c in inspect(conn).get_columns("jobs")}
        assert "sent_at" not in present
        old_jobs = Table("jobs", MetaData(), *(c._copy() for c in Job.__table__.columns if c.name in present))
        # (state, actual_usd, ambiguous_usd, submitted_at, when the outcome became unknown)
        rows: list[tuple[JobState, Decimal | None, Decimal, datetime | None, datetime | None]] = [
            (S.FAILED, None, Decimal("0.25"), None, earlier),  # never answered: was under ""
            (S.FAILED, Decimal("0.1"), Decimal("0.25"), yesterday, earlier),  # attempt 1 answered yesterday
            (S.RETRY_WAIT, None, Decimal("0.25"), None, earlier),  # resent: unfinished, not in totals
            (S.SUCCEEDED, Decimal("0.3"), Decimal(0), earlier, midnight),  # a late answer came after
            (S.CANCELLED, Decimal("0.02"), Decimal(0), None, None),  # never sent
        ]
        for i, (state, actual, ambiguous, submitted_at, unknown_at) in enumerate(rows):
            job_id = f"{i:032x}"
            conn.execute(
                insert(old_jobs).values(
                    id=job_id,
                    batch_id=batch_id,
                    job_key=f"{i:064x}",
                    item_index=i,
                    variant=0,
                    endpoint="fal-ai/wan-22",
                    input={},
                    state=state,
                    version=3,
                    attempts=1,
                    est_billing_units=Decimal(5),
                    est_usd=Decimal("0.25"),
                    actual_usd=actual,
                    ambiguous_usd=ambiguous,
                    submitted_at=submitted_at,
                    created_at=now,
                    updated_at=now,
                    possible_duplicate_charges=0,
                    confirmed_duplicate_charges=0,
                    rate_limited_submits=0,
                )
            )
            if unknown_at is not None:
                conn.execute(
                    insert(cast(Table, JobEvent.__table__)).values(
                        job_id=job_id,
                        at=unknown_at,
                        from_state=S.SUBMITTING,
                        to_state=S.SUBMIT_UNKNOWN,
                        version=2,
                        reason="submit outcome unknown: lost",
                    )
                )
        totals = cast(Table, BatchTotals.__table__)
        for day, usd in (
            ("", Decimal("0.27")),
            (yesterday.astimezone(UTC).date().isoformat(), Decimal("0.35")),
            (today, Decimal("0.3")),
        ):
            conn.execute(insert(totals).values(batch_id=batch_id, day=day, finished_usd=usd))
    migrate(engine, from_models=False)
    with db.read_scope(engine) as session:
        by_day = {t.day: t.finished_usd for t in session.scalars(select(BatchTotals))}
        assert by_day == {
            "": Decimal("0.02"),
            yesterday.astimezone(UTC).date().isoformat(): Decimal(0),
            today: Decimal("0.3") + Decimal("0.25") + Decimal("0.35"),
        }
        sent = {j.id: j.submitted_at for j in store.jobs_of_batch(session, batch_id)}
        assert list(sent.values()) == [earlier, earlier, earlier, earlier, None]
        assert (
            store.batch_committed_usd(session, batch_id) == store.batch_money(session, batch_id).committed_usd
        )
        assert store.committed_usd_today(session, now) == store.committed_usd_since(session, midnight)
        assert store.committed_usd_today(session, now) == Decimal("1.15")  # 0.9 finished + 0.25 waiting
    engine.dispose()
