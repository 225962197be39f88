"""A run frozen past its lease while its POSTs are out (SIGSTOP, a suspended laptop or VM, a long
swap), and another run of the batch going on meanwhile.

The other run takes the lapsed ``submitting`` jobs over (a frozen holder is not waited for: it may
never go on, and waiting on it held the batch's outstanding cap) and, with no webhook receiver,
fails them at once as ``submit_unknown`` with the advice to rerun them. Was: the user did, the
frozen run then went on and its jobs adopted fal's late answers: the same inputs billed twice, and
both batches said ``confirmed_duplicate_charges: 0``. Now:

* a late answer for such a job whose rerun was sent is cancelled at fal first (free while
  queued: nothing paid twice); kept when fal ran it anyway, counted then as a confirmed
  duplicate charge on the original batch;
* a late answer that comes before the rerun is sent is kept, and the rerun is cancelled before
  its POST (nothing paid twice).

The frozen holder is a real live child (``sleep``), its pid put in the lease owner; the lease is
made to have run out by setting it in the past. No timing is asserted.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.batches import batch_report, rerun_batch
from jobs.cost import cost_report
from jobs.models import Job, JobEvent, utcnow
from jobs.states import JobState
from tests.hostile import HostileProvider, json_reply
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.steps import Runtime, dispatch, reconcile, submit
from worker.steps.late_answers import settle_late_answer
from worker.steps.unrecorded import Accepted

S = JobState
T2V = "fal-ai/wan-22"
KEY = "b1c2d3e4-0000-4000-8000-000000000000:00112233445566778899aabbccddeeff"
FIRST = "0a6e4b1c-2d3f-4a5b-8c6d-7e8f9a0b1c2d"
SECOND = "1b7f5c2d-3e4a-4b6c-9d7e-8f9a0b1c2d3e"


@pytest.fixture
def live_child() -> Iterator[subprocess.Popen[bytes]]:
    """A live process of this host (not this one), stopped and reaped afterwards."""
    child = subprocess.Popen(["sleep", "300"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


@pytest.fixture
def made() -> Iterator[list[Runtime]]:
    runtimes: list[Runtime] = []
    yield runtimes
    for rt in runtimes:
        rt.submit_leases.close()
        rt.client.close()


def _runtime(engine: Engine, url: str, made: list[Runtime], **overrides: object) -> Runtime:
    settings = settings_for(url, KEY, submit_unknown_policy="fail", **overrides)
    rt = make_runtime(engine, settings)
    made.append(rt)
    return rt


def _owner(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}:1"


def _job(engine: Engine, job_id: str) -> Job:
    with db.read_scope(engine) as session:
        found = store.get_job(session, job_id)
        session.expunge(found)
        return found


def _post_out_lease_lapsed(engine: Engine, job_id: str, owner: str) -> int:
    """The claimed job as ``owner``'s submit left it: its POST recorded as sent, then frozen
    (or dead) past its lease, which has run out. Returns its version."""
    past = utcnow() - timedelta(minutes=5)
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        assert job.state == S.SUBMITTING
        assert store.update_job_fields(
            session,
            job_id,
            expected_version=job.version,
            submitted_input=dict(job.input),
            sent_at=past,
            lease_owner=owner,
            lease_expires_at=past + timedelta(seconds=30),
        )
        return job.version


def _submit_answer(provider: HostileProvider, request_id: str) -> dict[str, object]:
    base = f"{provider.url}/{T2V}/requests/{request_id}"
    return {
        "request_id": request_id,
        "status": "IN_QUEUE",
        "queue_position": 0,
        "status_url": f"{base}/status",
        "response_url": base,
        "cancel_url": f"{base}/cancel",
    }


@pytest.mark.parametrize(
    ("cancel_answer", "running", "ran"),
    [
        (json_reply({"status": "CANCELLATION_REQUESTED"}, 202), False, False),  # still queued: free
        (json_reply({"status": "CANCELLATION_REQUESTED"}, 202), True, False),  # running: billed
        (json_reply({"status": "ALREADY_COMPLETED"}, 400), False, True),  # fal ran it: billed
    ],
    ids=["cancelled-while-queued", "cancelled-while-running", "already-completed"],
)
def test_a_late_answer_for_a_failed_job_whose_rerun_was_sent_is_never_a_silent_second_charge(
    engine: Engine,
    hostile: HostileProvider,
    made: list[Runtime],
    live_child: subprocess.Popen[bytes],
    cancel_answer: object,
    running: bool,
    ran: bool,
) -> None:
    """The job failed for its unknown submit outcome (its holder frozen past its lease, taken
    over), ``rerun --failed-only`` sent it again (accepted as SECOND), and then the first POST's
    answer (FIRST) comes after all (the frozen process going on, or a journal). fal would render
    that input twice: the late request is cancelled at fal first; only when fal ran it anyway
    does the job keep it, and the original batch then counts a confirmed duplicate charge
    (before: it was adopted without a word, both batches saying
    ``confirmed_duplicate_charges: 0``)."""
    hostile.route("POST", rf"/{T2V}", json_reply(_submit_answer(hostile, SECOND)))
    cancel = rf"/{T2V}/requests/{FIRST}/cancel"
    hostile.route("PUT", cancel, cancel_answer)  # type: ignore[arg-type]
    database_url = engine.url.render_as_string(hide_password=False)
    rt = _runtime(engine, hostile.url, made, database_url=database_url)
    batch_id = add_batch(engine, "rerun-sent", [(T2V, {"prompt": "a paper crane"})])
    (job_id,) = dispatch(rt)
    _post_out_lease_lapsed(engine, job_id, _owner(live_child.pid))
    assert reconcile(rt) == 1  # taken over from the frozen (live) holder, not waited for
    assert _job(engine, job_id).error_type == "submit_unknown"

    rerun = rerun_batch(batch_id, failed_only=True, settings=rt.settings)
    (again,) = dispatch(rt)
    assert _job(engine, again).rerun_of == job_id
    assert submit(rt, again) == "submitted"
    assert _job(engine, again).request_id == SECOND

    late = Accepted(job_id, 1, FIRST, None, None, None, None, running=running, submitted_at=utcnow())
    settled = settle_late_answer(rt, late, T2V)
    assert hostile.count("PUT", cancel) == 1
    after = _job(engine, job_id)
    with db.read_scope(engine) as session:
        report = batch_report(session, batch_id)
        cost = cost_report(session, batch_id).total
        rerun_report = batch_report(session, rerun.batch_id)
    if ran:  # billed anyway: its video is kept, and the second charge is said
        assert settled == "adopted"
        assert (after.state, after.request_id) == (S.QUEUED, FIRST)
        assert after.confirmed_duplicate_charges == 1
        assert report["confirmed_duplicate_charges"] == cost.confirmed_duplicate_charges == 1
        history = [e.reason or "" for e in _events(engine, job_id)]
        assert any(f"its rerun, job {again}, was sent too" in reason for reason in history)
    elif running:  # cancelled while it ran: billed beside the rerun, no video: said all the same
        assert settled == "billed"
        assert (after.state, after.request_id, after.error_type) == (S.FAILED, None, "submit_unknown")
        assert after.confirmed_duplicate_charges == 1
        assert report["confirmed_duplicate_charges"] == cost.confirmed_duplicate_charges == 1
    else:  # cancelled while it waited in fal's queue: not billed, nothing paid twice
        assert settled == "noted"
        assert (after.state, after.request_id, after.error_type) == (S.FAILED, None, "submit_unknown")
        assert after.confirmed_duplicate_charges == 0
        assert report["confirmed_duplicate_charges"] == 0
    assert rerun_report["confirmed_duplicate_charges"] == 0  # the rerun's own request is not the extra one
    assert hostile.count("POST", rf"/{T2V}") == 1  # the rerun's only: nothing sent again


@pytest.mark.parametrize("claimed", [False, True], ids=["pending", "claimed-not-posted"])
def test_a_late_answer_kept_before_the_rerun_is_sent_cancels_the_rerun(
    engine: Engine,
    hostile: HostileProvider,
    made: list[Runtime],
    live_child: subprocess.Popen[bytes],
    claimed: bool,
) -> None:
    """The other order: the frozen run goes on and its late answer is kept (the job failed for
    its unknown outcome, nothing sent again yet) while ``rerun --failed-only`` already made the
    job's rerun, not sent yet (``claimed``: dispatched, its POST not out). Sent, it would render
    and bill the input twice with nothing said (before: it was sent all the same): it is
    cancelled before its POST, and a submit already on its way finds it moved on."""
    hostile.route("POST", rf"/{T2V}", json_reply(_submit_answer(hostile, SECOND)))
    database_url = engine.url.render_as_string(hide_password=False)
    rt = _runtime(engine, hostile.url, made, database_url=database_url)
    batch_id = add_batch(engine, "rerun-unsent", [(T2V, {"prompt": "a paper boat"})])
    (job_id,) = dispatch(rt)
    _post_out_lease_lapsed(engine, job_id, _owner(live_child.pid))
    assert reconcile(rt) == 1
    assert _job(engine, job_id).error_type == "submit_unknown"
    rerun = rerun_batch(batch_id, failed_only=True, settings=rt.settings)
    with db.read_scope(engine) as session:
        (again,) = [job.id for job in store.jobs_of_batch(session, rerun.batch_id)]
    if claimed:
        assert dispatch(rt) == [again]

    late = Accepted(job_id, 1, FIRST, None, None, None, None, running=False, submitted_at=utcnow())
    assert settle_late_answer(rt, late, T2V) == "adopted"
    after = _job(engine, job_id)
    assert (after.state, after.request_id, after.confirmed_duplicate_charges) == (S.QUEUED, FIRST, 0)
    cancelled = _job(engine, again)
    assert (cancelled.state, cancelled.error_type) == (S.CANCELLED, store.REPEAT_NOT_SENT_ERROR)
    assert dispatch(rt) == []  # nothing left to send
    if claimed:
        assert submit(rt, again) != "submitted"  # its submit message, handled late: not sent
    assert hostile.count("POST", rf"/{T2V}") == 0  # the input is sent (and billed) once: FIRST
    history = [e.reason or "" for e in _events(engine, job_id)]
    assert any(f"its rerun (job {again}), not sent yet, is cancelled" in reason for reason in history)


def _events(engine: Engine, job_id: str) -> list[JobEvent]:
    with db.read_scope(engine) as session:
        events = list(store.job_events(session, job_id))
        for event in events:
            session.expunge(event)
        return events
