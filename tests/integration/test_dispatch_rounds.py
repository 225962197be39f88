"""What one dispatch round reads and writes (issue #11: a round runs on every completion).

* the in-flight counts the caps need come from one query, and agree with counting each;
* the claim reads whole jobs and writes no lease of its own: the one move of each job
  (``submitting``) is its only write, so its version grows by exactly one;
* in an embedded run dispatch leaves the submit a ticket of what it read; the submit starts
  from it without reading again, and a job changed in between is never sent;
* a round of the distributed leader (it works on every batch) reads the batches of the jobs it
  claimed in one query, as rows, never one ORM object per batch;
* the round reads the shared submit bucket with those counts, and its claim reads the columns
  of :class:`~jobs.models.JobRecord` only;
* a ``BEGIN`` SQLite refuses surfaces as SQLAlchemy's ``OperationalError``, as before it was
  sent on the DBAPI connection.
"""

from __future__ import annotations

import itertools
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from jobs import db, store
from jobs.models import JOB_RECORD_FIELDS, utcnow
from jobs.states import JobState
from tests.hostile import HostileProvider
from tests.hostile_fal import accept_submits
from tests.statement_log import recorded_statements
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for
from worker.steps import dispatch, submit

S = JobState
KEY = "8d3c1f0e-5a6b-4c7d-9e8f-0a1b2c3d4e5f:0f1e2d3c4b5a69788796a5b4c3d2e1f0"
RID = "6f9b2d4c-1a3e-4b5f-8c7d-9e0f1a2b3c4d"
T2V = "fal-ai/wan-22"


def _move(engine: Engine, job_id: str, *path: JobState, **fields: Any) -> None:
    with db.session_scope(engine) as session:
        for before, after in itertools.pairwise(path):
            assert store.transition(session, job_id, before, after, **fields)


def test_in_flight_agrees_with_counting_each_figure(engine: Engine) -> None:
    batch_id = add_batch(engine, "flight", [(T2V, {"prompt": f"p{i}"}) for i in range(9)])
    ids = job_ids(engine, batch_id)
    long_ago, just_now = utcnow() - timedelta(seconds=300), utcnow()
    _move(engine, ids[0], S.PENDING, S.SUBMITTING)  # at fal, key unknown yet: counted for every key
    _move(engine, ids[1], S.PENDING, S.SUBMITTING, api_key_id="mine")
    _move(engine, ids[1], S.SUBMITTING, S.QUEUED, submitted_at=long_ago, request_id="r1")
    _move(engine, ids[2], S.PENDING, S.SUBMITTING, api_key_id="mine")
    _move(engine, ids[2], S.SUBMITTING, S.QUEUED, submitted_at=just_now, request_id="r2")
    _move(engine, ids[3], S.PENDING, S.SUBMITTING, api_key_id="theirs")
    _move(engine, ids[3], S.SUBMITTING, S.QUEUED, submitted_at=long_ago, request_id="r3")
    _move(engine, ids[4], S.PENDING, S.SUBMITTING, api_key_id="mine")
    _move(engine, ids[4], S.SUBMITTING, S.QUEUED, S.RUNNING, request_id="r4")
    _move(engine, ids[5], S.PENDING, S.SUBMITTING, api_key_id="theirs")
    _move(engine, ids[5], S.SUBMITTING, S.QUEUED, S.RUNNING, S.DOWNLOADING, request_id="r5")
    _move(engine, ids[6], S.PENDING, S.SUBMITTING, S.RETRY_WAIT)
    _move(engine, ids[7], S.PENDING, S.CANCELLED)
    before = utcnow() - timedelta(seconds=60)
    with db.read_scope(engine) as session:
        flight = store.in_flight(
            session, scope=store.CapScope(api_key_id="mine"), sent_before=before, now=utcnow()
        )
        at_fal = [s for s in JobState if s.at_provider]
        assert flight.outstanding == store.count_in_states(session, at_fal, api_key_id="mine") == 4
        assert flight.downloading == store.count_in_states(session, [S.DOWNLOADING]) == 1
        assert flight.waiting_long == 1  # ids[1]: queued since long ago with this key
        assert flight.waiting_long == store.count_waiting_since(
            session, S.QUEUED, submitted_before=before, api_key_id="mine"
        )
        assert flight.retry_due  # ids[6]: due at once
        theirs = store.CapScope(api_key_id="theirs")
        assert store.in_flight(session, scope=theirs, sent_before=before, now=utcnow()).outstanding == 2


def test_a_round_claims_whole_jobs_and_moves_each_once(engine: Engine, statements: list[str]) -> None:
    batch_id = add_batch(engine, "round", [(T2V, {"prompt": "a"}), (T2V, {"prompt": "b"})])
    sent: list[str] = []
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", KEY), enqueue_submit=sent.append)
    statements.clear()
    claimed = dispatch(rt)
    assert claimed == sent == job_ids(engine, batch_id)
    updates = [s for s in statements if s.startswith(("UPDATE jobs", "WITH moved AS (UPDATE jobs"))]
    assert len(updates) == 2  # one move per job (→ submitting), no lease written before it
    assert not [s for s in statements if s.startswith("SELECT count(*) AS")]  # the caps: one query
    with db.read_scope(engine) as session:
        for job_id in claimed:
            job = store.get_job(session, job_id)
            assert (job.state, job.version, job.lease_owner) == (S.SUBMITTING, 1, rt.owner)
            assert [e.to_state for e in store.job_events(session, job_id)] == [S.SUBMITTING]


def test_a_round_reads_the_shared_rate_with_its_counts_and_claims_only_record_columns(engine: Engine) -> None:
    """Two statements less work a round (a pure speed change): the shared submit bucket comes
    with the in-flight counts, not in a statement of its own, and the claim reads the columns
    every use of a claimed job is typed by (:class:`jobs.models.JobRecord`), not all sixty."""
    add_batch(engine, "lean", [(T2V, {"prompt": "a"}), (T2V, {"prompt": "b"})])
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", KEY))
    with recorded_statements(engine) as seen:
        assert len(dispatch(rt)) == 2
    reads = [s for s in seen if s.startswith("SELECT") and "FROM submit_rate" in s]
    assert len(reads) == 1, reads
    assert "count(*) FILTER" in reads[0]
    (claim,) = [s for s in seen if s.startswith("SELECT") and "jobs.price_table" in s]
    read = claim[: claim.index(" FROM jobs")]
    assert all(f"jobs.{name}" in read for name in JOB_RECORD_FIELDS), read
    assert "jobs.provider_output" not in read
    assert "jobs.submitted_input" not in read


def test_a_leaders_round_reads_its_claims_batches_in_one_query(
    engine: Engine, statements: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = add_batch(engine, "first", [(T2V, {"prompt": "a", "seed": 1})])
    second = add_batch(engine, "second", [(T2V, {"prompt": "b"})])
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", KEY))  # every batch, as a leader
    assert rt.batch_ids is None

    def one_by_one(*_: Any) -> None:
        raise AssertionError("a batch loaded on its own")

    # Where get_batch is looked up: the package (callers outside the store) and the store's parts
    # that call it themselves (lock_batch; the simulated results' reads).
    for where in (store, store.batches, store.reading):
        monkeypatch.setattr(where, "get_batch", one_by_one)
    statements.clear()
    assert sorted(dispatch(rt)) == sorted(job_ids(engine, first) + job_ids(engine, second))
    reads = [s for s in statements if s.startswith("SELECT batches.")]
    assert len(reads) == 2  # the batches a round may hold back, then those of its claims


def test_the_submit_starts_from_the_ticket_dispatch_left(
    engine: Engine, hostile: HostileProvider, statements: list[str]
) -> None:
    accept_submits(hostile, RID, T2V)
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    tickets: dict[str, Any] = {}
    rt.submit_tickets = tickets
    add_batch(engine, "ticket", [(T2V, {"prompt": "a lighthouse", "seed": 7}), (T2V, {"prompt": "warm-up"})])
    job_id, warm_up = sorted(dispatch(rt), key=lambda j: tickets[j].input["prompt"])
    ticket = rt.submit_tickets[job_id]
    assert (ticket.fence.state, ticket.fence.version, ticket.attempt) == (S.SUBMITTING, 1, 1)
    assert ticket.input == {"prompt": "a lighthouse", "seed": 7}
    # The first answer a process hears from fal ends, once, the waits a dead process's hold of
    # fal left (worker.steps.fal_reach): a read of the holds, once per process, not per submit.
    accept_submits(hostile, "warm-up-request", T2V)
    assert submit(rt, warm_up) == "submitted"
    accept_submits(hostile, RID, T2V)
    statements.clear()
    assert submit(rt, job_id) == "submitted"
    assert job_id not in rt.submit_tickets  # used once
    # Nothing read again: the one lookup (and, on PostgreSQL, its lock) is whether another job
    # holds fal's request id (store.request_holder).
    holder = ("SELECT jobs.id FROM jobs WHERE jobs.request_id", "SELECT pg_advisory_xact_lock(hashtext(")
    assert not [s for s in statements if s.startswith("SELECT") and not s.startswith(holder)]
    assert hostile.count("POST", rf"/{T2V}") == 2
    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
        assert (job.state, job.request_id) == (S.QUEUED, RID)
        assert job.submitted_input == {"prompt": "a lighthouse", "seed": 7}


def test_a_job_changed_after_its_ticket_is_never_sent(engine: Engine, hostile: HostileProvider) -> None:
    accept_submits(hostile, RID, T2V)
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    rt.submit_tickets = {}
    add_batch(engine, "stale", [(T2V, {"prompt": "a lighthouse"})])
    (job_id,) = dispatch(rt)
    _move(engine, job_id, S.SUBMITTING, S.CANCELLED)  # e.g. `wanbatch cancel` in between
    assert submit(rt, job_id) == "lost-lease"
    assert hostile.count("POST", r".*") == 0
    with db.read_scope(engine) as session:
        assert store.get_job(session, job_id).state == S.CANCELLED


def test_a_refused_begin_is_sqlalchemys_operational_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 50)
    path = tmp_path / "locked.db"
    engine = db.make_engine(f"sqlite:///{path}")
    try:
        db.migrate(engine)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            with pytest.raises(OperationalError, match="locked"), db.session_scope(engine) as session:
                store.count_in_states(session, [S.PENDING])
        finally:
            other.execute("ROLLBACK")
            other.close()
        with db.session_scope(engine) as session:  # and the engine's own writers are not stuck
            assert store.count_in_states(session, [S.PENDING]) == 0
    finally:
        engine.dispose()


def test_the_distributed_leader_counts_every_keys_requests_against_the_cap(engine: Engine) -> None:
    """A worker with another FAL_KEY sends a job with its own key (``record_send``): the
    distributed leader's dispatch counts those requests too, so no account exceeds the cap."""
    batch_id = add_batch(engine, "keys", [(T2V, {"prompt": f"p{i}"}) for i in range(4)])
    ids = job_ids(engine, batch_id)
    for n, job_id in enumerate(ids[:2]):  # sent by a worker whose key is not the leader's
        _move(engine, job_id, S.PENDING, S.SUBMITTING, api_key_id="another-workers-key")
        _move(engine, job_id, S.SUBMITTING, S.QUEUED, request_id=f"k{n}")
    sent: list[str] = []
    settings = settings_for("http://127.0.0.1:9", KEY, max_outstanding=2)
    rt = make_runtime(engine, settings, enqueue_submit=sent.append)
    assert rt.batch_ids is None  # the workers' leader
    assert dispatch(rt) == sent == []  # the cap is full, whichever key the requests went with
    # An embedded run of its own batch still counts its own key's requests only (as before).
    own = make_runtime(
        engine, settings_for("http://127.0.0.1:9", KEY, max_outstanding=2), batch_ids=frozenset({batch_id})
    )
    assert own.cap_scope().every_key is False
