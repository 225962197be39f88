"""jobs.store against real PostgreSQL and SQLite: compare-and-set, fencing, claims, money, seeds."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from jobs import store
from jobs.db import session_factory
from jobs.errors import NotFoundError
from jobs.models import Batch, BatchState, Job, JobEvent
from jobs.schedule import Schedule
from jobs.states import JobState

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
BIG_SEED = 17454220438242315174  # a real fal seed, above 2**63 - 1


def new_job(i: int, usd: str = "0.40", units: str = "1") -> store.NewJob:
    return store.NewJob(
        key=f"{i:064x}",
        item_index=i,
        endpoint="fal-ai/wan-i2v",
        input={"prompt": f"item {i}", "resolution": "720p"},
        est_billing_units=Decimal(units),
        est_usd=Decimal(usd),
    )


def make_batch(session: Session, name: str = "b1", n: int = 3, **kw: object) -> Batch:
    batch, created = store.get_or_create_batch(
        session,
        name=name,
        manifest_path="/m.yaml",
        manifest_sha256="0" * 64,
        budget_max_usd=kw.get("budget", Decimal("25.00")),  # type: ignore[arg-type]
    )
    assert created
    store.add_jobs(session, batch.id, (new_job(i) for i in range(n)))
    session.commit()
    return batch


def first_job(session: Session, batch: Batch) -> Job:
    return next(store.jobs_of_batch(session, batch.id))


def events(session: Session, job_id: str) -> list[JobEvent]:
    return store.job_events(session, job_id)


# --------------------------------------------------------------------------- transitions


def test_transition_is_compare_and_set(session: Session) -> None:
    job = first_job(session, make_batch(session))
    assert (job.state, job.version) == (JobState.PENDING, 0)

    # Wrong expected state: nothing changes, no event.
    assert not store.transition(session, job.id, JobState.RETRY_WAIT, JobState.SUBMITTING)
    session.commit()
    assert store.get_job(session, job.id).version == 0
    assert events(session, job.id) == []

    assert store.transition(
        session, job.id, JobState.PENDING, JobState.SUBMITTING, reason="claimed", worker="w1"
    )
    session.commit()
    fresh = store.get_job(session, job.id)
    assert (fresh.state, fresh.version) == (JobState.SUBMITTING, 1)
    (event,) = events(session, job.id)
    assert (event.from_state, event.to_state, event.version, event.reason, event.worker) == (
        JobState.PENDING,
        JobState.SUBMITTING,
        1,
        "claimed",
        "w1",
    )
    # The same move again loses: the job is no longer pending.
    assert not store.transition(session, job.id, JobState.PENDING, JobState.SUBMITTING)
    assert len(events(session, job.id)) == 1


def test_a_move_and_its_event_are_one_statement_on_postgresql(
    session: Session, statements: list[str]
) -> None:
    """On PostgreSQL the event is written by the move's own statement (a data-modifying WITH),
    and only when the job moved; SQLite, which has no such WITH, sends a second INSERT."""
    job = first_job(session, make_batch(session))
    statements.clear()
    details = {"error": "boom", "nested": [1, {"a": None}]}
    assert store.transition(
        session, job.id, JobState.PENDING, JobState.SUBMITTING, reason="claimed", worker="w1", details=details
    )
    assert not store.transition(session, job.id, JobState.PENDING, JobState.SUBMITTING, reason="lost")
    assert not store.transition(
        session, job.id, JobState.SUBMITTING, JobState.PENDING, expected_version=0, reason="stale"
    )
    sent = [s for s in statements if not s.startswith(("BEGIN", "SAVEPOINT", "RELEASE"))]
    if session.connection().dialect.name == "postgresql":
        assert len(sent) == 3
        assert all(s.startswith("WITH moved AS (UPDATE jobs") for s in sent)
    else:
        assert [s.split(" (")[0].split(" SET")[0] for s in sent] == [
            "UPDATE jobs",
            "INSERT INTO job_events",
            "UPDATE jobs",
            "UPDATE jobs",
        ]
    session.commit()
    (event,) = events(session, job.id)
    assert (event.from_state, event.to_state, event.version, event.reason, event.worker, event.details) == (
        JobState.PENDING,
        JobState.SUBMITTING,
        1,
        "claimed",
        "w1",
        details,
    )
    assert event.at == store.get_job(session, job.id).updated_at


def test_submit_view_reads_the_job_and_its_batch_in_one_query(
    session: Session, statements: list[str]
) -> None:
    batch = make_batch(session)
    store.set_batch_schedule(session, batch.id, Schedule(deadline=T0), "low")
    job = first_job(session, batch)
    assert store.transition(session, job.id, JobState.PENDING, JobState.SUBMITTING, attempts=2)
    session.commit()
    statements.clear()
    view = store.submit_view(session, job.id)
    assert [s.split(" ")[0] for s in statements if not s.startswith("BEGIN")] == ["SELECT"]
    assert (view.id, view.state, view.version, view.endpoint, view.attempts, view.batch_id) == (
        job.id,
        JobState.SUBMITTING,
        1,
        "fal-ai/wan-i2v",
        2,
        batch.id,
    )
    assert (view.input, view.submitted_input, view.priority) == (job.input, None, "low")
    assert Schedule.from_json(view.schedule).deadline == T0
    assert store.take_lease(
        session, store.Fence.of(job), now=T0, lease_seconds=60, submitted_input={"prompt": "sent"}
    )
    session.commit()
    assert store.submit_view(session, job.id).submitted_input == {"prompt": "sent"}
    with pytest.raises(NotFoundError):
        store.submit_view(session, "nope")


def test_transition_updates_loaded_objects(session: Session) -> None:
    job = first_job(session, make_batch(session))
    assert store.transition(session, job.id, JobState.PENDING, JobState.SUBMITTING, attempts=1)
    assert job.state == JobState.SUBMITTING
    assert job.version == 1
    assert job.attempts == 1


def test_illegal_edge_raises_and_changes_nothing(session: Session) -> None:
    job = first_job(session, make_batch(session))
    with pytest.raises(ValueError, match="illegal job transition pending -> running"):
        store.transition(session, job.id, JobState.PENDING, JobState.RUNNING)
    with pytest.raises(ValueError, match="not settable"):
        store.transition(session, job.id, JobState.PENDING, JobState.SUBMITTING, version=99)
    session.commit()
    assert store.get_job(session, job.id).state == JobState.PENDING
    assert events(session, job.id) == []


def test_expected_version_fences_stale_writers(session: Session) -> None:
    job = first_job(session, make_batch(session))
    assert store.transition(session, job.id, JobState.PENDING, JobState.SUBMITTING, expected_version=0)
    # A zombie that still believes version 0: right state would be wrong version.
    assert store.transition(session, job.id, JobState.SUBMITTING, JobState.PENDING, expected_version=1)
    assert not store.transition(session, job.id, JobState.PENDING, JobState.SUBMITTING, expected_version=0)
    assert not store.update_job_fields(session, job.id, expected_version=0, request_id="zombie")
    assert store.update_job_fields(session, job.id, expected_version=2, request_id="req-1")
    session.commit()
    fresh = store.get_job(session, job.id)
    assert (fresh.state, fresh.version, fresh.request_id) == (JobState.PENDING, 2, "req-1")


def test_fields_and_terminal_bookkeeping(session: Session) -> None:
    job = first_job(session, make_batch(session))
    [claimed] = store.claim_jobs(
        session, states=[JobState.PENDING], limit=1, now=T0, owner="w1", lease_seconds=60
    )
    assert claimed.id == job.id
    v = claimed.version
    assert store.transition(
        session,
        job.id,
        JobState.PENDING,
        JobState.SUBMITTING,
        expected_version=v,
        attempts=store.incremented("attempts"),
        submitted_input={"prompt": "x"},
    )
    assert store.transition(
        session, job.id, JobState.SUBMITTING, JobState.QUEUED, request_id="r1", submitted_at=T0
    )
    assert store.transition(session, job.id, JobState.QUEUED, JobState.DOWNLOADING, completed_at=T0)
    assert store.transition(
        session,
        job.id,
        JobState.DOWNLOADING,
        JobState.SUCCEEDED,
        seed=BIG_SEED,
        actual_usd=Decimal("0.4"),
        details={"bytes": 10},
    )
    session.commit()
    done = store.get_job(session, job.id)
    assert done.state == JobState.SUCCEEDED
    assert done.attempts == 1
    assert done.finished_at is not None
    assert done.finished_at.tzinfo is not None
    assert done.lease_owner is None
    assert done.lease_expires_at is None
    assert done.submitted_at == T0
    assert done.version == v + 4
    assert [e.to_state for e in events(session, job.id)] == [
        JobState.SUBMITTING,
        JobState.QUEUED,
        JobState.DOWNLOADING,
        JobState.SUCCEEDED,
    ]
    assert events(session, job.id)[-1].details == {"bytes": 10}
    assert store.get_job(session, job.id).request_id == "r1"


# --------------------------------------------------------------------------- batches and jobs


def test_add_jobs_is_idempotent(session: Session) -> None:
    batch = make_batch(session, n=0)
    assert store.add_jobs(session, batch.id, (new_job(i) for i in range(5)), chunk=2) == (5, 0)
    assert store.add_jobs(session, batch.id, (new_job(i) for i in range(5)), chunk=2) == (0, 5)
    assert store.add_jobs(session, batch.id, (new_job(i) for i in range(3, 8))) == (3, 2)
    session.commit()
    assert session.scalar(select(func.count()).select_from(Job)) == 8
    assert [j.item_index for j in store.jobs_of_batch(session, batch.id)] == list(range(8))
    # The same keys in another batch are other jobs.
    other = make_batch(session, name="b2", n=0)
    assert store.add_jobs(session, other.id, (new_job(i) for i in range(5))) == (5, 0)


def test_get_or_create_batch_returns_existing(session: Session) -> None:
    batch = make_batch(session)
    again, created = store.get_or_create_batch(
        session, name="b1", manifest_path="/other.yaml", manifest_sha256="1" * 64, budget_max_usd=None
    )
    assert not created
    assert again.id == batch.id
    assert again.budget_max_usd == Decimal("25")


def test_get_batch_by_id_prefix_name(session: Session) -> None:
    batch = make_batch(session, name="tokyo-sweep")
    assert store.get_batch(session, batch.id).id == batch.id
    assert store.get_batch(session, batch.id[:6]).id == batch.id
    assert store.get_batch(session, "tokyo-sweep").id == batch.id
    with pytest.raises(NotFoundError, match="no batch 'nope'"):
        store.get_batch(session, "nope")
    with pytest.raises(NotFoundError):
        store.get_batch(session, batch.id[:5])  # too short to be a prefix
    # Two ids sharing a prefix: the prefix is ambiguous, the full ids still work.
    for suffix in ("a", "b"):
        session.add(
            Batch(id="abcdef" + suffix * 26, name=f"x{suffix}", manifest_path="m", manifest_sha256="0" * 64)
        )
    session.commit()
    with pytest.raises(NotFoundError, match="ambiguous"):
        store.get_batch(session, "abcdef")
    assert store.get_batch(session, "abcdefa").name == "xa"
    assert [b.name for b in store.list_batches(session)] == ["tokyo-sweep", "xa", "xb"]
    # A batch named as another's id prefix (as `status` shows ids): which one is meant is unknown.
    session.add(Batch(id="f" * 32, name="abcdefaa", manifest_path="m", manifest_sha256="0" * 64))
    session.commit()
    with pytest.raises(NotFoundError, match=r"'abcdefaa' is ambiguous: the name of batch ffffffff and an id"):
        store.get_batch(session, "abcdefaa")
    assert store.get_batch(session, "f" * 32).name == "abcdefaa"  # its full id still works
    assert store.get_batch(session, "abcdefa" + "a" * 25).name == "xa"


def test_counts_by_state_lists_every_state(session: Session) -> None:
    batch = make_batch(session, n=4)
    job = first_job(session, batch)
    assert store.transition(session, job.id, JobState.PENDING, JobState.CANCELLED)
    session.commit()
    counts = store.counts_by_state(session, batch.id)
    assert set(counts) == {s.value for s in JobState}
    assert counts["pending"] == 3
    assert counts["cancelled"] == 1
    assert sum(counts.values()) == 4
    assert store.count_in_states(session, [JobState.PENDING, JobState.CANCELLED], batch_id=batch.id) == 4
    assert [j.state for j in store.jobs_of_batch(session, batch.id, states=[JobState.CANCELLED])] == [
        JobState.CANCELLED
    ]


def test_batch_state(session: Session) -> None:
    batch = make_batch(session)
    store.set_batch_state(session, batch.id, BatchState.PAUSED, "account locked")
    session.commit()
    assert (store.get_batch(session, batch.id).state, batch.pause_reason) == (
        BatchState.PAUSED,
        "account locked",
    )
    store.set_batch_state(session, batch.id, BatchState.CANCELLED)
    store.set_batch_state(session, batch.id, BatchState.ACTIVE)  # cancelled is final
    session.commit()
    assert store.get_batch(session, batch.id).state == BatchState.CANCELLED


# --------------------------------------------------------------------------- claims and leases


def test_claim_respects_schedule_and_lease(session: Session) -> None:
    batch = make_batch(session, n=2)
    a, b = list(store.jobs_of_batch(session, batch.id))
    assert store.update_job_fields(
        session, b.id, expected_version=0, next_attempt_at=T0 + timedelta(seconds=5)
    )
    session.commit()

    got = store.claim_jobs(session, states=[JobState.PENDING], limit=10, now=T0, owner="w1", lease_seconds=30)
    session.commit()
    assert [j.id for j in got] == [a.id]  # b is not due yet
    assert got[0].lease_owner == "w1"
    assert got[0].version == 1
    assert got[0].lease_expires_at == T0 + timedelta(seconds=30)

    # 10 s later: a is still leased, b is due.
    got = store.claim_jobs(
        session,
        states=[JobState.PENDING],
        limit=10,
        now=T0 + timedelta(seconds=10),
        owner="w2",
        lease_seconds=300,
    )
    session.commit()
    assert [j.id for j in got] == [b.id]

    # w1 heartbeats a; w2 cannot extend what it does not hold.
    by_w1, by_w2 = (store.Fence(a.id, JobState.PENDING, 1, owner) for owner in ("w1", "w2"))
    assert store.extend_lease(session, by_w1, now=T0, lease_seconds=40)
    assert not store.extend_lease(session, by_w2, now=T0, lease_seconds=99)
    session.commit()
    none = store.claim_jobs(
        session,
        states=[JobState.PENDING],
        limit=10,
        now=T0 + timedelta(seconds=35),
        owner="w3",
        lease_seconds=30,
    )
    assert none == []

    # After expiry (w1 died), a is reclaimable; w1's old token is now worthless.
    got = store.claim_jobs(
        session,
        states=[JobState.PENDING],
        limit=10,
        now=T0 + timedelta(seconds=41),
        owner="w3",
        lease_seconds=30,
    )
    session.commit()
    assert [(j.id, j.lease_owner, j.version) for j in got] == [(a.id, "w3", 2)]
    assert not store.transition(session, a.id, JobState.PENDING, JobState.SUBMITTING, expected_version=1)
    assert store.transition(session, a.id, JobState.PENDING, JobState.SUBMITTING, expected_version=2)

    # Releasing gives a job back at once, or at a chosen time.
    assert store.release_lease(
        session, store.Fence(b.id, JobState.PENDING, 1), next_attempt_at=T0 + timedelta(minutes=5)
    )
    session.commit()
    assert (
        store.claim_jobs(
            session,
            states=[JobState.PENDING],
            limit=10,
            now=T0 + timedelta(minutes=1),
            owner="w4",
            lease_seconds=30,
        )
        == []
    )


def test_claim_only_active_batches_and_states(session: Session) -> None:
    active = make_batch(session, name="active", n=2)
    paused = make_batch(session, name="paused", n=2)
    store.set_batch_state(session, paused.id, BatchState.PAUSED)
    session.commit()
    got = store.claim_jobs(
        session,
        states=[JobState.PENDING],
        limit=10,
        now=T0,
        owner="w",
        lease_seconds=30,
        active_batches_only=True,
    )
    assert {j.batch_id for j in got} == {active.id}
    assert (
        store.claim_jobs(session, states=[JobState.QUEUED], limit=10, now=T0, owner="w", lease_seconds=30)
        == []
    )
    got = store.claim_jobs(
        session, states=[JobState.PENDING], limit=10, now=T0, owner="w", lease_seconds=30, batch_id=paused.id
    )
    assert len(got) == 2


def test_claim_due_reads_whole_jobs_and_the_moved_fence_holds(session: Session) -> None:
    """A dispatch round's claim reads every column as stored, leases nothing, and the fence
    :meth:`Fence.moved` gives after a move is exactly the one the next verb needs."""
    active = make_batch(session, name="active", n=3)
    paused = make_batch(session, name="paused", n=1)
    store.set_batch_state(session, paused.id, BatchState.PAUSED)
    session.commit()
    got = store.claim_due(
        session,
        states=[JobState.PENDING],
        limit=2,
        now=T0,
        batch_ids=[active.id, paused.id],
        active_batches_only=True,
    )
    assert [(j.batch_id, j.state, j.version, j.attempts) for j in got] == [
        (active.id, JobState.PENDING, 0, 0)
    ] * 2
    oldest = first_job(session, active)
    assert got[0].id == oldest.id
    assert (got[0].input, got[0].est_usd, got[0].endpoint) == (
        oldest.input,
        Decimal("0.40"),
        "fal-ai/wan-i2v",
    )
    assert oldest.lease_owner is None  # read, not leased

    fence = store.Fence.of(got[0], "w1")
    assert store.mark_submitting(session, fence, attempt=1, api_key_id="k", lease_expires_at=T0)
    held = fence.moved(JobState.SUBMITTING)
    assert (held.state, held.version) == (JobState.SUBMITTING, 1)
    assert store.take_lease(session, held, now=T0, lease_seconds=30) is not None  # the moved fence holds
    assert not store.mark_submitting(
        session, fence, attempt=1, api_key_id="k", lease_expires_at=T0
    )  # the old one not


def test_a_job_snapshot_holds_every_column_as_the_orm_reads_it(session: Session) -> None:
    """What the conductor hands a download (one Core query) is the job as loading it would give."""
    batch = make_batch(session, name="snap", n=2)
    job = first_job(session, batch)
    fence = store.Fence.of(job, "w1")
    assert store.mark_submitting(session, fence, attempt=1, api_key_id="k", lease_expires_at=T0)
    session.commit()
    snapshots = store.job_snapshots(session, [job.id, "missing"])
    assert list(snapshots) == [job.id]
    session.expire_all()
    loaded = store.get_job(session, job.id)
    snapshot = snapshots[job.id]
    for column in Job.__table__.columns:
        assert getattr(snapshot, column.key) == getattr(loaded, column.key), column.key
    assert snapshot.state == JobState.SUBMITTING
    assert snapshot.version == 1
    snapshot.provider_output = {"seed": 7}  # a step's own note: writes nothing
    session.expire_all()
    assert store.get_job(session, job.id).provider_output is None
    assert store.job_snapshots(session, []) == {}


def test_concurrent_claimers_never_share_a_job(engine: Engine) -> None:
    """Threads with their own connections claim until nothing is left: each job exactly once."""
    n_jobs, n_workers = 300, 6
    with session_factory(engine)() as setup:
        batch = make_batch(setup, n=n_jobs)
        batch_id = batch.id
    claims: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(n_workers)

    def worker(name: str) -> None:
        mine: list[str] = []
        try:
            start.wait()
            with session_factory(engine)() as sess:
                while True:
                    got = store.claim_jobs(
                        sess, states=[JobState.PENDING], limit=7, now=T0, owner=name, lease_seconds=300
                    )
                    ids = [j.id for j in got]
                    sess.commit()
                    if not ids:
                        break
                    mine.extend(ids)
                    time.sleep(0.001)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        claims[name] = mine

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    every = [job_id for ids in claims.values() for job_id in ids]
    assert len(every) == len(set(every)) == n_jobs
    assert sum(1 for ids in claims.values() if ids) > 1, "the claimers did not actually overlap"
    with session_factory(engine)() as check:
        owners = dict(check.execute(select(Job.id, Job.lease_owner).where(Job.batch_id == batch_id)).all())
    assert all(owners[job_id] == name for name, ids in claims.items() for job_id in ids)


def test_concurrent_batch_creation_on_postgresql(pg_url: str, request: pytest.FixtureRequest) -> None:
    """Two submitters create the same batch name at once: one row, both get it."""
    engine: Engine = request.getfixturevalue("_pg_engine")
    try:
        with session_factory(engine)() as first:
            mine, created = store.get_or_create_batch(
                first, name="race", manifest_path="m", manifest_sha256="0" * 64, budget_max_usd=None
            )
            assert created
            result: list[tuple[str, bool]] = []

            def second() -> None:
                with session_factory(engine)() as sess:
                    batch, made = store.get_or_create_batch(
                        sess, name="race", manifest_path="m", manifest_sha256="0" * 64, budget_max_usd=None
                    )
                    sess.commit()
                    result.append((batch.id, made))

            t = threading.Thread(target=second)
            t.start()
            time.sleep(0.3)  # the second insert now waits on the unique index
            first.commit()
            t.join(10)
        assert result == [(mine.id, False)]
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE job_events, jobs, uploads, batches CASCADE")


# --------------------------------------------------------------------------- exact values


def test_money_is_exact_decimal_including_sums(session: Session) -> None:
    batch = make_batch(session, n=0)
    # 1000 jobs of $0.10: binary floats would not add up to exactly 100.
    store.add_jobs(session, batch.id, (new_job(i, usd="0.1", units="7.5625") for i in range(1000)))
    session.commit()
    total = session.scalar(select(func.sum(Job.est_usd)).where(Job.batch_id == batch.id))
    assert isinstance(total, Decimal)
    assert total == Decimal("100")
    units = session.scalar(select(func.sum(Job.est_billing_units)))
    assert units == Decimal("7562.5")
    assert isinstance(units, Decimal)

    job = first_job(session, batch)
    assert job.est_usd == Decimal("0.1")
    assert isinstance(job.est_usd, Decimal)
    assert store.update_job_fields(session, job.id, expected_version=0, actual_usd=Decimal("0.253125001"))
    session.commit()
    assert store.get_job(session, job.id).actual_usd == Decimal("0.253125001")
    # More than 9 decimals: rounded half-even at nano-dollars, identically on both dialects.
    assert store.update_job_fields(session, job.id, expected_version=0, actual_usd=Decimal("0.0000000015"))
    session.commit()
    assert store.get_job(session, job.id).actual_usd == Decimal("0.000000002")
    with pytest.raises(Exception, match="money must be a Decimal"):
        store.update_job_fields(session, job.id, expected_version=0, actual_usd=0.1)
    session.rollback()


def test_batch_money(session: Session) -> None:
    batch = make_batch(session, n=0)
    store.add_jobs(session, batch.id, (new_job(i, usd="0.45") for i in range(4)))
    a, b, c, _d = list(store.jobs_of_batch(session, batch.id))
    # a: succeeded with a reported cost; b: succeeded, no cost reported (estimate counts);
    # c: queued at fal (reserved); d: pending (neither).
    for job, actual in ((a, Decimal("0.30")), (b, None)):
        assert store.transition(session, job.id, JobState.PENDING, JobState.SUBMITTING)
        assert store.transition(session, job.id, JobState.SUBMITTING, JobState.QUEUED)
        assert store.transition(session, job.id, JobState.QUEUED, JobState.DOWNLOADING)
        assert store.transition(session, job.id, JobState.DOWNLOADING, JobState.SUCCEEDED, actual_usd=actual)
    assert store.transition(session, c.id, JobState.PENDING, JobState.SUBMITTING)
    assert store.transition(session, c.id, JobState.SUBMITTING, JobState.QUEUED, possible_duplicate_charges=1)
    session.commit()
    money = store.batch_money(session, batch.id)
    assert money == store.BatchMoney(
        estimated_usd=Decimal("1.80"),
        spent_usd=Decimal("0.75"),
        reserved_usd=Decimal("0.45"),
        possible_duplicate_charges=1,
    )
    assert money.committed_usd == Decimal("1.20")
    empty = make_batch(session, name="empty", n=0)
    assert store.batch_money(session, empty.id) == store.BatchMoney(Decimal(0), Decimal(0), Decimal(0), 0)


@pytest.mark.parametrize("seed", [BIG_SEED, 2**64 - 1, 0, 42])
def test_seed_round_trips_exactly(session: Session, seed: int) -> None:
    job = first_job(session, make_batch(session))
    assert store.update_job_fields(session, job.id, expected_version=0, seed=seed)
    session.commit()
    session.expunge_all()
    assert store.get_job(session, job.id).seed == seed
    assert session.scalar(select(Job.seed).where(Job.id == job.id)) == seed


def test_timestamps_come_back_aware_utc(session: Session) -> None:
    job = first_job(session, make_batch(session))
    from zoneinfo import ZoneInfo

    tokyo = datetime(2026, 3, 1, 9, 0, tzinfo=ZoneInfo("Asia/Tokyo"))
    assert store.update_job_fields(session, job.id, expected_version=0, next_attempt_at=tokyo)
    session.commit()
    session.expunge_all()
    fresh = store.get_job(session, job.id)
    assert fresh.next_attempt_at == tokyo
    assert fresh.next_attempt_at is not None
    assert fresh.next_attempt_at.utcoffset() == timedelta(0)
    assert fresh.created_at.tzinfo is not None
    with pytest.raises(Exception, match="timezone-aware"):
        store.update_job_fields(session, job.id, expected_version=0, next_attempt_at=datetime(2026, 1, 1))


# --------------------------------------------------------------------------- uploads


def test_uploads_are_remembered_per_fal_until_they_expire(session: Session) -> None:
    sha, fal, sim = "ab" * 32, "https://rest.fal.ai:443", "http://127.0.0.1:8787"
    assert store.find_upload(session, fal, sha) is None
    store.record_upload(
        session,
        origin=fal,
        content_sha256=sha,
        provider_url="https://v3.fal.media/files/a.png",
        size_bytes=1234,
        content_type="image/png",
        now=T0,
    )
    session.commit()
    found = store.find_upload(session, fal, sha, now=T0)
    assert found is not None
    assert found.provider_url.endswith("a.png")
    assert found.size_bytes == 1234
    assert found.expires_at == T0 + store.UPLOAD_REUSE  # set, conservatively, when not given
    assert store.find_upload(session, sim, sha, now=T0) is None  # another fal never stored it
    assert store.find_upload(session, fal, sha, now=T0 + store.UPLOAD_REUSE) is None
    # The same content uploaded to another fal is remembered beside it.
    store.record_upload(
        session,
        origin=sim,
        content_sha256=sha,
        provider_url="http://127.0.0.1:8787/files/k/a.png",
        size_bytes=1234,
        content_type="image/png",
        now=T0,
    )
    session.commit()
    assert store.find_upload(session, fal, sha, now=T0) is not None
    # Re-uploading after expiry replaces the record (and forgets what expired meanwhile).
    later = T0 + timedelta(days=30)
    store.record_upload(
        session,
        origin=fal,
        content_sha256=sha,
        provider_url="https://v3.fal.media/files/b.png",
        size_bytes=1234,
        content_type="image/png",
        expires_at=later + timedelta(hours=1),
        now=later,
    )
    session.commit()
    again = store.find_upload(session, fal, sha, now=later)
    assert again is not None
    assert again.provider_url.endswith("b.png")
    assert store.find_upload(session, sim, sha, now=T0) is None  # expired by then: dropped
    # A URL fal could not download is forgotten.
    assert store.forget_uploads(session, ["https://v3.fal.media/files/b.png"]) == 1
    assert store.find_upload(session, fal, sha, now=later) is None


# --------------------------------------------------------------------------- scale


@pytest.mark.slow
@pytest.mark.postgres
def test_add_100k_jobs_quickly_on_postgresql(request: pytest.FixtureRequest) -> None:
    engine: Engine = request.getfixturevalue("_pg_engine")
    try:
        with session_factory(engine)() as sess:
            batch = make_batch(sess, name="big", n=0)
            started = time.perf_counter()
            added = store.add_jobs(sess, batch.id, (new_job(i) for i in range(100_000)))
            sess.commit()
            elapsed = time.perf_counter() - started
            assert added == (100_000, 0)
            again = store.add_jobs(sess, batch.id, (new_job(i) for i in range(100_000)))
            assert again == (0, 100_000)
            assert store.counts_by_state(sess, batch.id)["pending"] == 100_000
        print(f"\n100k jobs inserted in {elapsed:.2f}s")
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE job_events, jobs, uploads, batches CASCADE")


def test_batch_pulse_says_when_a_run_showing_nothing_must_read_in_full(session: Session) -> None:
    batch = make_batch(session, n=3)
    assert store.batch_pulse(session, "no-such-batch") is None
    pulse = store.batch_pulse(session, batch.id)
    assert pulse == store.BatchPulse("active", False, 3)
    assert pulse.goes_on
    jobs = list(store.jobs_of_batch(session, batch.id))
    for job in jobs[:2]:
        assert store.transition(session, job.id, JobState.PENDING, JobState.CANCELLED, reason="test")
    session.commit()
    assert store.batch_pulse(session, batch.id) == store.BatchPulse("active", False, 1)
    store.set_paused_by_user(session, batch.id, True)
    session.commit()
    assert not store.batch_pulse(session, batch.id).goes_on  # type: ignore[union-attr]
    store.set_paused_by_user(session, batch.id, False)
    store.set_batch_state(session, batch.id, BatchState.PAUSED)
    session.commit()
    assert not store.batch_pulse(session, batch.id).goes_on  # type: ignore[union-attr]
    store.set_batch_state(session, batch.id, BatchState.ACTIVE)
    assert store.transition(session, jobs[2].id, JobState.PENDING, JobState.CANCELLED, reason="test")
    session.commit()
    finished = store.batch_pulse(session, batch.id)
    assert finished == store.BatchPulse("active", False, 0)
    assert not finished.goes_on
