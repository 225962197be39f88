"""A batch's committed money, read for the budget check without summing its finished jobs.

``store.batch_committed_usd`` adds :class:`jobs.models.BatchTotals` (finished jobs' money, kept
by the transaction that finishes each job) to a sum over the few unfinished jobs. It must equal
``store.batch_money(...).committed_usd``, the sum over every job, after any sequence of moves the
lifecycle allows, whatever they bill, whether they commit or roll back, one by one or set-based.
"""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, insert, select, text

from jobs import db, store
from jobs.db import downgrade, make_engine, migrate
from jobs.models import Batch, BatchState, BatchTotals, Job, utcnow
from jobs.states import ALLOWED_TRANSITIONS, JobState
from tests.step_runtime import add_batch

S = JobState


def _both(engine: Engine, batch_id: str) -> tuple[Decimal, Decimal]:
    with db.read_scope(engine) as session:
        return store.batch_committed_usd(session, batch_id), store.batch_money(
            session, batch_id
        ).committed_usd


def _jobs(engine: Engine, batch_id: str) -> list[Job]:
    with db.read_scope(engine) as session:
        return list(store.jobs_of_batch(session, batch_id))


def test_the_running_total_equals_the_full_sum_through_every_kind_of_move(engine: Engine) -> None:
    rng = random.Random(11)
    batches = [
        add_batch(engine, f"totals-{b}", [("fal-ai/wan-22", {"prompt": f"{b}-{i}"}) for i in range(8)])
        for b in range(2)
    ]
    finished_kinds: set[tuple[JobState, bool]] = set()
    for step in range(240):
        if step % 60 == 59:  # now and then, a set-based cancel of what was never sent
            with db.session_scope(engine) as session:
                store.cancel_unsent_jobs(
                    session, [batches[0]], reason="cancel", error="cancelled", error_type="cancelled"
                )
        else:
            batch_id = rng.choice(batches)
            movable = [j for j in _jobs(engine, batch_id) if not j.state.terminal]
            if not movable:
                continue
            job = rng.choice(movable)
            new = rng.choice(sorted(ALLOWED_TRANSITIONS[job.state]))
            fields: dict[str, Any] = {}
            if rng.random() < 0.5:  # fal billed something (or reported no cost)
                fields["actual_usd"] = rng.choice(
                    [None, Decimal("0"), Decimal("0.25"), Decimal("0.31"), Decimal("1.7")]
                )
            rolled_back = rng.random() < 0.15
            session = db.session_factory(engine)()
            try:
                assert store.transition(
                    session, job.id, job.state, new, reason="test", expected_version=job.version, **fields
                )
                if rolled_back:
                    session.rollback()
                else:
                    session.commit()
            finally:
                session.close()
            if new.terminal and not rolled_back:
                finished_kinds.add((new, fields.get("actual_usd") is not None))
        for batch_id in batches:
            fast, full = _both(engine, batch_id)
            assert fast == full, (step, batch_id)
    # The walk did reach the cases that matter: each terminal state, billed and not.
    assert {S.SUCCEEDED, S.FAILED, S.CANCELLED} <= {state for state, _ in finished_kinds}
    assert any(billed for _, billed in finished_kinds)
    assert all(_both(engine, b)[0] > 0 for b in batches)


def test_a_set_based_cancel_counts_what_earlier_attempts_billed(engine: Engine) -> None:
    batch_id = add_batch(engine, "cancel-billed", [("fal-ai/wan-22", {"prompt": f"c{i}"}) for i in range(4)])
    first, second, *_ = _jobs(engine, batch_id)
    with db.session_scope(engine) as session:
        # Attempt 1 of ``first`` ran at fal and was billed; it waits to be sent again.
        assert store.transition(session, first.id, S.PENDING, S.SUBMITTING, expected_version=first.version)
        assert store.transition(session, first.id, S.SUBMITTING, S.QUEUED, expected_version=first.version + 1)
        assert store.transition(
            session,
            first.id,
            S.QUEUED,
            S.RETRY_WAIT,
            expected_version=first.version + 2,
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
    assert _both(engine, batch_id) == (Decimal("0.5"), Decimal("0.5"))
    with db.session_scope(engine) as session:
        assert (
            store.cancel_unsent_jobs(session, [batch_id], reason="r", error="e", error_type="cancelled") == 3
        )
    with db.read_scope(engine) as session:
        totals = session.get(BatchTotals, batch_id)
        assert totals is not None
        assert totals.finished_usd == Decimal("0.5")  # both billed jobs are finished now
    assert _both(engine, batch_id) == (Decimal("0.5"), Decimal("0.5"))


def test_a_rolled_back_finish_leaves_the_total_alone(engine: Engine) -> None:
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
    with db.read_scope(engine) as session:
        totals = session.get(BatchTotals, batch_id)
        assert totals is not None
        assert totals.finished_usd == 0


def test_the_budget_check_reads_no_pending_job_that_was_never_billed(tmp_path: Path) -> None:
    """On SQLite the query plan shows it: the pending jobs are found by the partial index."""
    engine = make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    migrate(engine)
    batch_id = add_batch(engine, "plan", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(50)])
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, sql: str, params: Any, _context: Any, _many: bool) -> None:
        seen.append((sql, params))

    event.listen(engine, "before_cursor_execute", record)
    with db.read_scope(engine) as session:
        store.batch_committed_usd(session, batch_id)
        event.remove(engine, "before_cursor_execute", record)
        ((sql, params),) = [(q, p) for q, p in seen if "batch_totals" in q]
        plan = session.connection().exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params).all()
    details = " | ".join(str(row[-1]) for row in plan)
    assert "ix_jobs_pending_billed" in details, details
    assert "SCAN" not in details.replace("SCAN CONSTANT ROW", ""), details
    engine.dispose()


def test_the_migration_fills_the_totals_of_existing_batches(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    migrate(engine, from_models=False)
    downgrade(engine, "0008")
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(Batch).values(
                id="b" * 32,
                name="old",
                manifest_path="old.yaml",
                manifest_sha256="0" * 64,
                created_at=now,
                state=BatchState.ACTIVE,
                priority="normal",
                paused_by_user=False,
                reuse_outputs=False,
            )
        )
        rows = [
            (S.SUCCEEDED, Decimal("0.3")),  # billed as reported
            (S.SUCCEEDED, None),  # no cost reported: its estimate (0.25)
            (S.FAILED, Decimal("0.05")),
            (S.CANCELLED, None),
            (S.QUEUED, None),  # not finished: not in the total
        ]
        for i, (state, actual) in enumerate(rows):
            conn.execute(
                insert(Job).values(
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
                    created_at=now,
                    updated_at=now,
                    possible_duplicate_charges=0,
                    confirmed_duplicate_charges=0,
                )
            )
    migrate(engine, from_models=False)
    with db.read_scope(engine) as session:
        assert session.scalar(select(BatchTotals.finished_usd)) == Decimal("0.6")
        assert (
            store.batch_committed_usd(session, "b" * 32) == store.batch_money(session, "b" * 32).committed_usd
        )
        assert session.execute(text("SELECT count(*) FROM batch_totals")).scalar() == 1
    engine.dispose()
