"""A request fal no longer knows after our cancel: the job ends ``cancelled``, not ``failed``.

fal lists NOT_FOUND among a cancel's outcomes, and a request it cancelled may leave its queue:
its status then answers 404 "Request … not found". An audit's loopback proxy saw a job being
cancelled (``wanbatch cancel``) end ``failed / request_not_found`` ("provider lost the
request"), which ``rerun --failed-only`` would then have rendered again.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import Engine

from jobs import billing, db, store
from jobs.models import BatchState
from jobs.states import JobState
from tests.hostile import HostileProvider, json_reply
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, make_runtime, settings_for, wait_until
from worker.steps import cancel_jobs_of_cancelled_batches, dispatch, poll, submit

KEY = "cancel-not-found-key-52e0"
NOT_FOUND = json_reply({"detail": "Request r1 not found"}, 404)


def _state(engine: Engine, job_id: str) -> JobState:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id).state


def _make_due(engine: Engine, job_id: str) -> None:
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(
            session, job_id, expected_version=job.version, next_attempt_at=None, lease_expires_at=None
        )


@pytest.mark.parametrize(
    ("running", "cancel_found"),
    [(False, True), (True, True), (False, False)],
    ids=["queued", "running", "cancel-not-found"],
)
def test_a_cancelled_request_fal_no_longer_knows_ends_cancelled(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, running: bool, cancel_found: bool
) -> None:
    fal = FakeFal(hostile)
    base = re.escape(fal.base)
    state = {"status": "IN_PROGRESS" if running else "IN_QUEUE", "queue_position": 0}
    fal.on_status("r1", json_reply(state, 200 if running else 202))
    if cancel_found:  # else the cancel itself is answered 404 (NOT_FOUND): the job is cancelling too
        accepted = json_reply({"status": "CANCELLATION_REQUESTED"}, 202)
        hostile.route("PUT", rf"{base}/requests/r1/cancel", accepted)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    batch_id = add_batch(engine, "cancel-404", [("fal-ai/wan-22", {"prompt": "a paper boat"})])
    try:
        (job_id,) = dispatch(rt)
        assert submit(rt, job_id) == "submitted"
        if running:
            wait_until(lambda: _state(engine, job_id) == JobState.RUNNING, step=lambda: poll(rt))
        with db.session_scope(engine) as session:
            store.set_batch_state(session, batch_id, BatchState.CANCELLED, reason="cancelled by user")
        cancel_jobs_of_cancelled_batches(rt)
        assert _state(engine, job_id) == JobState.CANCELLING
        fal.on_status("r1", NOT_FOUND)  # fal removed the cancelled request from its queue
        _make_due(engine, job_id)
        poll(rt)
    finally:
        rt.client.close()
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.state == JobState.CANCELLED
    assert job.error_type != "request_not_found"
    assert job.error == "cancelled by user"
    with db.session_scope(engine) as session:
        last = store.job_events(session, job_id)[-1]
    assert last.reason is not None
    assert "no longer knows the request after our cancel" in last.reason
    # billed as any cancel fal confirmed: nothing in its queue, the cancel's share once it ran
    outcome = billing.Outcome.CANCELLED_RUNNING if running else billing.Outcome.CANCELLED_IN_QUEUE
    assert job.actual_usd == billing.billed(outcome, job.est_billing_units, job.est_usd)["actual_usd"]
    if not running:
        assert job.actual_usd == 0
    assert fal.posts() == 1


def test_a_request_fal_no_longer_knows_that_was_not_cancelled_still_fails(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    # Unchanged for a job nobody cancelled: fal lost its request.
    fal = FakeFal(hostile)
    fal.on_status("r1", NOT_FOUND)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    add_batch(engine, "lost-404", [("fal-ai/wan-22", {"prompt": "a paper boat"})])
    try:
        (job_id,) = dispatch(rt)
        assert submit(rt, job_id) == "submitted"
        wait_until(lambda: _state(engine, job_id) == JobState.FAILED, step=lambda: poll(rt))
    finally:
        rt.client.close()
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.error_type == "request_not_found"


def test_a_request_of_a_cancelled_batch_fal_no_longer_knows_before_cancelling_is_stored_ends_cancelled(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    # Our cancel was sent (fal removed the request), but the job's move to `cancelling` was not
    # stored yet (the cancel's answer came after the cancels' deadline, or a slow lane): the
    # poll's 404 is that cancel's answer, as a client_cancelled status would be, not a failure.
    fal = FakeFal(hostile)
    fal.on_status("r1", json_reply({"status": "IN_QUEUE", "queue_position": 0}, 202))
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    batch_id = add_batch(engine, "cancel-404-race", [("fal-ai/wan-22", {"prompt": "a paper boat"})])
    try:
        (job_id,) = dispatch(rt)
        assert submit(rt, job_id) == "submitted"
        with db.session_scope(engine) as session:
            store.set_batch_state(session, batch_id, BatchState.CANCELLED, reason="cancelled by user")
        fal.on_status("r1", NOT_FOUND)
        _make_due(engine, job_id)
        poll(rt)
    finally:
        rt.client.close()
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.state == JobState.CANCELLED, (job.state, job.error_type, job.error)
    assert job.error_type != "request_not_found"
    assert job.actual_usd == 0


#: fal's answers to a cancelled request's status: it ended the request at our cancel
#: (COMPLETED, ``client_cancelled``), or removed it from its queue (404).
CANCEL_ANSWERS = {
    "completed-client-cancelled": json_reply(
        {"status": "COMPLETED", "error": "Request cancelled by client", "error_type": "client_cancelled"}, 200
    ),
    "not-found": NOT_FOUND,
}


@pytest.mark.parametrize("answer", sorted(CANCEL_ANSWERS))
def test_a_cancelled_request_records_the_same_error_type_whatever_fal_answers(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, answer: str
) -> None:
    # The user's cancel is `cancelled` whether fal ended the request (client_cancelled) or forgot
    # it (404), as it is for the jobs the cancel ended before they were sent: status prints
    # "N cancelled: cancelled by user" for them all, not a line apart for fal's word.
    fal = FakeFal(hostile)
    fal.on_status("r1", json_reply({"status": "IN_QUEUE", "queue_position": 0}, 202))
    hostile.route(
        "PUT",
        rf"{re.escape(fal.base)}/requests/r1/cancel",
        json_reply({"status": "CANCELLATION_REQUESTED"}, 202),
    )
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    batch_id = add_batch(engine, f"cancel-{answer}", [("fal-ai/wan-22", {"prompt": "a paper boat"})])
    try:
        (job_id,) = dispatch(rt)
        assert submit(rt, job_id) == "submitted"
        with db.session_scope(engine) as session:
            store.set_batch_state(session, batch_id, BatchState.CANCELLED, reason="cancelled by user")
        cancel_jobs_of_cancelled_batches(rt)
        assert _state(engine, job_id) == JobState.CANCELLING
        fal.on_status("r1", CANCEL_ANSWERS[answer])
        _make_due(engine, job_id)
        poll(rt)
    finally:
        rt.client.close()
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert (job.state, job.error_type, job.error) == (JobState.CANCELLED, "cancelled", "cancelled by user")
    assert job.actual_usd == 0
