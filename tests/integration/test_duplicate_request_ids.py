"""No two jobs of one fal queue ever hold the same request id, whichever path names it.

fal gives each accepted POST a request of its own, so a request id another job of the same
queue (``jobs.fal_origin``) holds is a provider protocol error: the job must not take the other
job's video and cost. The submit's own answer was checked; these are the other paths that give
a job a request id — every one goes through :func:`jobs.store.request_holder` (in
:func:`jobs.store.transition`): a journal of accepted submits, a late answer, the store's
adoptions themselves. Webhooks: ``tests/integration/test_webhooks.py``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update

from jobs import db, store
from jobs.errors import RequestHeldError
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.fal.models import RequestHandle, Submitted
from worker.steps import Runtime
from worker.steps.late_answers import settle_late_answer
from worker.steps.reconcile import adopt_unrecorded
from worker.steps.submit import _record_submission
from worker.steps.unrecorded import PREFIX, SUFFIX, Accepted, database_key, journal_folders

S = JobState
T2V = "fal-ai/wan-22"
HELD = "req-held"
#: Nothing listens there: a call to fal (a cancel) fails at once.
NOWHERE = "http://127.0.0.1:9"


@pytest.fixture
def rt(engine: Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a PostgreSQL run's journals: here
    settings = settings_for(
        NOWHERE,
        "test-key",
        database_url=db_url,
        submit_unknown_policy="fail",
        webhook_url="https://hooks.example.test/webhooks/fal",  # an unknown outcome waits for proof
    )
    runtime = make_runtime(engine, settings)
    yield runtime
    runtime.submit_leases.close()
    runtime.client.close()


def _job(engine: Engine, job_id: str) -> Job:
    with db.read_scope(engine) as session:
        found = store.get_job(session, job_id)
        session.expunge(found)
        return found


def _sent(engine: Engine, name: str, *, request_id: str | None = None, unknown: bool = False) -> Job:
    """The one job of a new batch ``name``, attempt 1 POSTed: ``queued`` as ``request_id``, or
    its answer not stored yet (``submitting``, input recorded), or
    ``submit_unknown`` when ``unknown``."""
    batch_id = add_batch(engine, name, [(T2V, {"prompt": f"a cat, {name}"})])
    now = utcnow()
    with db.session_scope(engine) as session:
        job = next(store.jobs_of_batch(session, batch_id))
        fence = store.Fence.of(job, "test-worker")
        lease = now + timedelta(seconds=60)
        assert store.mark_submitting(session, fence, attempt=1, api_key_id="k", lease_expires_at=lease)
        taken = store.take_lease(
            session,
            fence.moved(S.SUBMITTING),
            now=now,
            lease_seconds=60,
            submitted_input={"prompt": "a cat"},
            sent_at=now,
        )
        assert taken is not None
        if request_id is not None:
            assert store.mark_submitted(
                session, taken, running=False, request_id=request_id, gateway_request_id=None,
                status_url=None, response_url=None, cancel_url=None, submitted_at=now, next_poll_at=now,
            )  # fmt: skip
        elif unknown:
            assert store.mark_submit_unknown(session, taken, why="reset", due_at=now + timedelta(hours=1))
        job_id = job.id
    return _job(engine, job_id)


def _failed_for_unknown_outcome(engine: Engine, name: str) -> Job:
    job = _sent(engine, name, unknown=True)
    with db.session_scope(engine) as session:
        assert store.fail_job(
            session,
            store.Fence.of(job, "reconciler"),
            reason="submission outcome unknown: no webhook proved it",
            error="submission outcome unknown",
            error_type="submit_unknown",
        )
    return _job(engine, job.id)


def _accepted(job_id: str) -> Accepted:
    return Accepted(job_id, 1, HELD, None, None, None, None, running=False, submitted_at=utcnow())


def _notes(engine: Engine, job_id: str) -> list[str]:
    with db.read_scope(engine) as session:
        return [e.reason or "" for e in store.job_events(session, job_id) if e.from_state == e.to_state]


def _reasons(engine: Engine, job_id: str) -> list[str]:
    with db.read_scope(engine) as session:
        return [e.reason or "" for e in store.job_events(session, job_id)]


def test_the_store_never_gives_a_second_job_of_one_queue_a_request_another_holds(engine: Engine) -> None:
    """Every adoption refuses a request id another job of the job's fal queue holds, before it
    writes anything; a job of another queue holding the same id holds another request."""
    holder = _sent(engine, "holder", request_id=HELD)
    unknown = _sent(engine, "unknown", unknown=True)
    failed = _failed_for_unknown_outcome(engine, "failed")
    now = utcnow()
    common: dict[str, Any] = {"request_id": HELD, "gateway_request_id": None, "next_poll_at": now}
    with db.session_scope(engine) as session, pytest.raises(RequestHeldError) as raised:
        store.adopt_request(session, store.Fence.of(unknown, "w"), submitted_at=now, **common)
    assert (raised.value.job_id, raised.value.holder) == (unknown.id, holder.id)
    with db.session_scope(engine) as session, pytest.raises(RequestHeldError):
        store.adopt_late_proof(session, store.Fence.of(failed, "w"), attempt=1, reason="late", **common)
    for job in (unknown, failed, holder):
        assert _job(engine, job.id).version == job.version  # nothing written
    with db.session_scope(engine) as session:
        assert store.request_holder(session, unknown.id, HELD) == holder.id
        assert store.request_holder(session, holder.id, HELD) is None
        session.execute(update(Job).where(Job.id == holder.id).values(fal_origin="http://127.0.0.1:1"))
        session.execute(update(Job).where(Job.id == unknown.id).values(fal_origin="http://127.0.0.1:2"))
    with db.session_scope(engine) as session:  # another queue's request: taken
        assert store.adopt_request(session, store.Fence.of(unknown, "w"), submitted_at=now, **common)
    assert (_job(engine, unknown.id).state, _job(engine, unknown.id).request_id) == (S.QUEUED, HELD)


def test_an_accepted_submit_checks_its_request_in_its_own_update_on_sqlite(
    engine: Engine, statements: list[str]
) -> None:
    """On SQLite the move to ``queued`` refuses a request another job holds by itself (its
    UPDATE's ``NOT EXISTS``): one statement fewer per submit than a read of the holder first,
    and still nothing written when it is held; on PostgreSQL the advisory lock and the read
    come first, as before."""
    holder = _sent(engine, "holder", request_id=HELD)
    first = _sent(engine, "first")
    second = _sent(engine, "second")
    now = utcnow()

    def accept(job: Job, request_id: str) -> bool:
        with db.session_scope(engine) as session:
            return store.mark_submitted(
                session,
                store.Fence.of(job, "w"),
                running=False,
                request_id=request_id,
                gateway_request_id=None,
                status_url=None,
                response_url=None,
                cancel_url=None,
                submitted_at=now,
                next_poll_at=now,
            )

    statements.clear()
    assert accept(first, "a-request-of-its-own")
    reads = [s for s in statements if s.startswith("SELECT jobs.id FROM jobs WHERE jobs.request_id")]
    assert len(reads) == (0 if engine.dialect.name == "sqlite" else 1)
    with pytest.raises(RequestHeldError) as raised:
        accept(second, HELD)
    assert (raised.value.job_id, raised.value.holder) == (second.id, holder.id)
    assert _job(engine, second.id).version == second.version  # nothing written
    assert _job(engine, second.id).state == S.SUBMITTING
    assert not accept(first, "another")  # moved on already: no move, no error


@pytest.mark.parametrize("where", ["submit_unknown", "submitting"])
def test_a_journal_naming_a_request_another_job_holds_leaves_the_job_submit_unknown(
    engine: Engine, db_url: str, rt: Runtime, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """A ``wanbatch-accepted-*.jsonl`` journal left by a process that ended names, for a job
    waiting for its answer, a request id another job holds: the job does not take it (before,
    it adopted the other job's request, video and cost); it is (or stays) ``submit_unknown``,
    the clash on its history and in its error, and the journal is settled."""
    holder = _sent(engine, "holder", request_id=HELD)
    job = _sent(engine, "waiting", unknown=where == "submit_unknown")
    assert job.state == S(where)
    folder = journal_folders(db_url)[0]
    journal = folder / f"{PREFIX}{database_key(db_url)}-99999999-1{SUFFIX}"
    journal.write_text(_accepted(job.id).as_json() + "\n")
    try:
        caplog.set_level(logging.ERROR, logger="worker.steps.failures")
        assert adopt_unrecorded(rt) == 0
    finally:
        journal.unlink(missing_ok=True)
    after = _job(engine, job.id)
    assert (after.state, after.request_id) == (S.SUBMIT_UNKNOWN, None)
    clash = f"request id {HELD}, which job {holder.id} already holds"
    assert after.error is not None
    assert clash in after.error
    assert any(clash in reason for reason in _reasons(engine, job.id))
    assert not any(f"accepted as {HELD}" in reason for reason in _reasons(engine, job.id))
    assert _job(engine, holder.id).version == holder.version
    assert [r for r in caplog.records if getattr(r, "event", "") == "submit.duplicate_request"]
    assert adopt_unrecorded(rt) == 0  # read again (another process's copy): nothing more
    assert _job(engine, job.id).version == after.version


@pytest.mark.parametrize("where", ["failed for its unknown outcome", "cancelled"])
def test_a_late_answer_naming_a_request_another_job_holds_is_neither_taken_nor_cancelled(
    engine: Engine, rt: Runtime, where: str
) -> None:
    """A submit's late answer (its job moved on) names a request another job holds: not
    adopted by a job that failed for its unknown outcome (before: it took the other job's
    request), and never cancelled at fal nor billed to this job when it moved on otherwise
    (before: the other job's request was cancelled and put on this job's history)."""
    holder = _sent(engine, "holder", request_id=HELD)
    if where == "cancelled":
        job = _sent(engine, "moved", request_id="req-own")
        with db.session_scope(engine) as session:
            assert store.transition(session, job.id, S.QUEUED, S.CANCELLED, reason="cancelled by user")
        job = _job(engine, job.id)
    else:
        job = _failed_for_unknown_outcome(engine, "moved")
    assert settle_late_answer(rt, _accepted(job.id), T2V) == "held"
    after = _job(engine, job.id)
    assert (after.state, after.request_id, after.version) == (job.state, job.request_id, job.version)
    assert (after.confirmed_duplicate_charges, after.actual_usd) == (0, job.actual_usd)
    assert not any(f"accepted as {HELD}" in reason for reason in _reasons(engine, job.id))
    (note,) = _notes(engine, job.id)
    assert f"request id {HELD}, which job {holder.id} already holds" in note
    assert _job(engine, holder.id).version == holder.version


def test_a_late_answer_for_a_job_already_submit_unknown_naming_a_held_request_is_noted(
    engine: Engine, rt: Runtime
) -> None:
    """The submit's answer comes after the reconciler called its outcome unknown, and names a
    request another job holds: the job stays ``submit_unknown``, saying why (before: an
    "illegal job transition submit_unknown -> submit_unknown" crashed the submit step)."""
    holder = _sent(engine, "holder", request_id=HELD)
    job = _sent(engine, "late")
    stale = store.Fence.of(job, "test-worker")
    with db.session_scope(engine) as session:
        assert store.mark_submit_unknown(session, stale, why="the worker was lost", due_at=utcnow())
    submitted = Submitted(RequestHandle.from_request_id(NOWHERE, T2V, HELD), "IN_QUEUE")
    assert _record_submission(rt, stale, submitted, _accepted(job.id), T2V) == "duplicate-request"
    after = _job(engine, job.id)
    assert (after.state, after.request_id) == (S.SUBMIT_UNKNOWN, None)
    assert after.error is not None
    assert f"which job {holder.id} already holds" in after.error
    assert any("already holds" in note for note in _notes(engine, job.id))
    assert _job(engine, holder.id).version == holder.version
