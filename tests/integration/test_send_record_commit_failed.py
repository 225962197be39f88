"""A submit whose send's record failed as it committed — a log that could not be synced to disk,
a reply the database never sent — while the record itself landed: the step saw the failure and
made no POST, so the job goes back as never sent as soon as the database answers.

Before, the job read "its POST may be out" (its input recorded) though nothing went: the
give-back after the outage left it alone for the reconciler, which called its outcome unknown
once its lease lapsed — by the default policy ``failed (submit_unknown)``, "possibly billed" —
for a request fal never saw. Found by injecting ``EIO`` into ``fdatasync`` under a real run
(``strace -e inject=fdatasync:error=EIO``): one to four jobs of twelve ended so.

The commit that lands and is heard failing is made here by a callback that runs once the unit
of work committed (:func:`jobs.db.after_commit`), on both databases.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any, NoReturn

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from jobs import db, store
from jobs.models import Job
from jobs.processes import process_prefix
from jobs.states import JobState
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.step_outage import GiveBack
from worker.steps import Runtime, dispatch, submit
from worker.steps.context import DOWNLOAD_QUEUE
from worker.steps.submit import RECORD_FAILED

KEY = "send-record-commit-key-6d1e"
PROMPT = {"prompt": "a paper boat", "resolution": "480p"}


def get(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id)


def _heard_failing() -> NoReturn:
    raise OperationalError("fdatasync", {}, sqlite3.OperationalError("disk I/O error: [Errno 5] I/O error"))


def record_heard_failing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The first send record commits, and then its commit is heard failing (its log's sync, its
    reply); every later one as usual. Returns the jobs it failed so."""
    real: Callable[..., Any] = store.record_send
    failed: list[str] = []

    def record_send(session: Any, fence: Any, **kwargs: Any) -> Any:
        taken = real(session, fence, **kwargs)
        if taken is not None and not failed:
            failed.append(fence.job_id)
            db.after_commit(session, _heard_failing)
        return taken

    monkeypatch.setattr(store, "record_send", record_send)
    return failed


def failed_record(
    engine: Engine, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> tuple[Runtime, FakeFal, str]:
    """A runtime whose first submit's send record landed, though the step saw it fail."""
    fal = FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    add_batch(engine, "record-failed", [("fal-ai/wan-22", PROMPT)])
    (job_id,) = dispatch(rt)
    failed = record_heard_failing(monkeypatch)
    with pytest.raises(OperationalError):
        submit(rt, job_id)
    assert failed == [job_id]
    landed = get(engine, job_id)
    assert landed.state == JobState.SUBMITTING
    assert landed.submitted_input is not None  # "its POST may be out", as the database reads
    assert fal.posts() == 0  # though none was made
    return rt, fal, job_id


def test_the_give_back_once_the_database_answers_sends_it_back_as_never_sent(
    engine: Engine, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt, fal, job_id = failed_record(engine, hostile, monkeypatch)
    try:
        assert rt.unsent.proof(job_id, get(engine, job_id).sent_at) is not None
        give_back = GiveBack()
        try:
            give_back.when_it_answers(rt, job_id)
            deadline = time.monotonic() + 30
            while get(engine, job_id).state != JobState.PENDING and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            give_back.stop(wait=True)
        job = get(engine, job_id)
        assert job.state == JobState.PENDING, (job.state, job.error)
        assert job.error_type == "not_sent"
        assert job.error == RECORD_FAILED
        assert job.submitted_input is None
        assert job.sent_at is None
        assert job.lease_owner is None
        assert len(rt.unsent) == 0

        # Sent once, when its turn comes again: one request at fal, no duplicate charge.
        assert dispatch(rt) == [job_id]
        submit(rt, job_id)
        sent = get(engine, job_id)
        assert sent.state == JobState.QUEUED, (sent.state, sent.error)
        assert fal.posts() == 1
        assert sent.possible_duplicate_charges == 0
    finally:
        rt.client.close()


def test_a_stopping_run_gives_it_back_as_never_sent(
    engine: Engine, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a run gives back as it stops (:func:`jobs.store.release_process_leases`), with the
    proof this process holds; without it, the send is in flight for the next run's reconciler."""
    rt, fal, job_id = failed_record(engine, hostile, monkeypatch)
    try:
        with db.session_scope(engine) as session:
            unproven = store.release_process_leases(session, process_prefix(), worker=rt.owner)
        assert (unproven.unsent, unproven.in_flight) == (0, 1)
        with db.session_scope(engine) as session:
            proven = store.release_process_leases(
                session,
                process_prefix(),
                queued_owner=DOWNLOAD_QUEUE,
                worker=rt.owner,
                proven_unsent=rt.unsent.noted(),
            )
        assert (proven.unsent, proven.in_flight) == (1, 0)
        job = get(engine, job_id)
        assert job.state == JobState.PENDING
        assert job.error_type == "not_sent"
        assert fal.posts() == 0
    finally:
        rt.client.close()


def test_a_proof_of_another_send_gives_nothing_back(
    engine: Engine, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proof names the send it was made for (its recorded time): a job whose recorded send is
    another one (sent again since, by this process or another) stays in flight."""
    rt, _fal, job_id = failed_record(engine, hostile, monkeypatch)
    try:
        noted = rt.unsent.noted([job_id])[job_id]
        other = store.ProvenUnsentSend(noted.sent_at.replace(year=2020), noted.why)
        with db.session_scope(engine) as session:
            got = store.release_step_jobs(
                session,
                [job_id],
                process_prefix(),
                queued_owner=DOWNLOAD_QUEUE,
                worker=rt.owner,
                proven_unsent={job_id: other},
            )
        assert (got.unsent, got.in_flight) == (0, 1)
        assert get(engine, job_id).state == JobState.SUBMITTING
    finally:
        rt.client.close()
