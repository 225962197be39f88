"""A run frozen past its lease while its POSTs are out (SIGSTOP, a suspended laptop or VM, a long
swap), and another run of the batch going on meanwhile.

Was: the other run took the ``submitting`` jobs back as soon as their leases ran out and, with
no webhook receiver, failed them at once as ``submit_unknown`` with the advice that waiting
would change nothing and ``rerun --failed-only`` sends them again. The user did; the frozen run
then went on and its jobs adopted fal's late answers: the same inputs billed twice, and both
batches said ``confirmed_duplicate_charges: 0``.

* A lapsed submit whose holder is a live process of this host is not taken over (its POST may
  still be answered): the reconciler leaves it, the progress line says whose POSTs it waits for,
  and once that process has ended it is taken over at once, as before. Another host's holder
  cannot be told alive: taken over as before, its advice saying so.
* A late answer for a job that failed for its unknown outcome and whose rerun was sent
  meanwhile is cancelled at fal first (free while queued: nothing paid twice); kept when fal ran
  it anyway, counted then as a confirmed duplicate charge on the original batch.

The live process is a real child (``sleep``), its pid put in the lease owner; the lease is made
to have run out by setting it in the past. No timing is asserted.
"""

from __future__ import annotations

import socket
import subprocess
import sys
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
from worker.steps.dead_leases import DeadLeases
from worker.steps.failures import NO_RECEIVER, NO_RECEIVER_ELSEWHERE
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


def _dead_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


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


def test_a_lapsed_submit_of_a_live_process_of_this_host_waits_until_it_ends(
    engine: Engine, made: list[Runtime], live_child: subprocess.Popen[bytes]
) -> None:
    rt = _runtime(engine, "http://127.0.0.1:9", made)
    batch_id = add_batch(engine, "frozen", [(T2V, {"prompt": "a lighthouse in fog"})])
    (job_id,) = dispatch(rt)
    frozen = _owner(live_child.pid)
    version = _post_out_lease_lapsed(engine, job_id, frozen)

    # Its POST may still be answered: not taken over, not failed, its lease left as it is (the
    # frozen process renews it and records fal's answer when it goes on: fenced by this version).
    assert reconcile(rt) == 0
    held = _job(engine, job_id)
    assert (held.state, held.version, held.lease_owner, held.error_type) == (
        S.SUBMITTING,
        version,
        frozen,
        None,
    )

    # The progress line of a run of the batch says whose POSTs it waits for.
    leases = DeadLeases(rt, batch_id)
    leases.take_back()
    note = leases.note()
    assert f"waiting for 1 submit(s) of {frozen}, a live process of this host" in note
    assert "its POSTs may still be answered" in note

    # Once that process has ended, its lapsed submit is taken over at once, as any dead one's.
    live_child.kill()
    live_child.wait()
    assert reconcile(rt) == 1
    after = _job(engine, job_id)
    assert (after.state, after.error_type) == (S.FAILED, "submit_unknown")
    assert any(f"held by {frozen}" in (e.reason or "") for e in _events(engine, job_id))
    assert NO_RECEIVER in (after.error or "")
    leases = DeadLeases(rt, batch_id)
    leases.take_back()
    assert leases.note() == ""


def test_a_lapsed_submit_of_another_host_is_taken_over_and_says_it_cannot_tell(
    engine: Engine, made: list[Runtime]
) -> None:
    """Whether a process of another host lives cannot be told from here: today's rule."""
    rt = _runtime(engine, "http://127.0.0.1:9", made)
    add_batch(engine, "elsewhere", [(T2V, {"prompt": "a lighthouse at dusk"})])
    (job_id,) = dispatch(rt)
    _post_out_lease_lapsed(engine, job_id, "another-host.example:4242:1")
    assert reconcile(rt) == 1
    after = _job(engine, job_id)
    assert (after.state, after.error_type) == (S.FAILED, "submit_unknown")
    assert NO_RECEIVER_ELSEWHERE in (after.error or "")
    assert "waiting would change nothing" not in (after.error or "")


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
    ("cancel_answer", "ran"),
    [
        (json_reply({"status": "CANCELLATION_REQUESTED"}, 202), False),  # still queued: free
        (json_reply({"status": "ALREADY_COMPLETED"}, 400), True),  # fal ran it: billed
    ],
    ids=["cancelled-while-queued", "already-completed"],
)
def test_a_late_answer_for_a_failed_job_whose_rerun_was_sent_is_never_a_silent_second_charge(
    engine: Engine, hostile: HostileProvider, made: list[Runtime], cancel_answer: object, ran: bool
) -> None:
    """The job failed for its unknown submit outcome (its process gone), ``rerun --failed-only``
    sent it again (accepted as SECOND), and then the first POST's answer (FIRST) comes after all
    (a journal, or the process that sent it going on). fal would render that input twice: the
    late request is cancelled at fal first; only when fal ran it anyway does the job keep it,
    and the original batch then counts a confirmed duplicate charge (before: it was adopted
    without a word, both batches saying ``confirmed_duplicate_charges: 0``)."""
    hostile.route("POST", rf"/{T2V}", json_reply(_submit_answer(hostile, SECOND)))
    cancel = rf"/{T2V}/requests/{FIRST}/cancel"
    hostile.route("PUT", cancel, cancel_answer)  # type: ignore[arg-type]
    database_url = engine.url.render_as_string(hide_password=False)
    rt = _runtime(engine, hostile.url, made, database_url=database_url)
    batch_id = add_batch(engine, "rerun-sent", [(T2V, {"prompt": "a paper crane"})])
    (job_id,) = dispatch(rt)
    _post_out_lease_lapsed(engine, job_id, _owner(_dead_pid()))
    assert reconcile(rt) == 1
    assert _job(engine, job_id).error_type == "submit_unknown"

    rerun = rerun_batch(batch_id, failed_only=True, settings=rt.settings)
    (again,) = dispatch(rt)
    assert _job(engine, again).rerun_of == job_id
    assert submit(rt, again) == "submitted"
    assert _job(engine, again).request_id == SECOND

    late = Accepted(job_id, 1, FIRST, None, None, None, None, running=False, submitted_at=utcnow())
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
    else:  # cancelled while it waited in fal's queue: not billed, nothing paid twice
        assert settled == "noted"
        assert (after.state, after.request_id, after.error_type) == (S.FAILED, None, "submit_unknown")
        assert after.confirmed_duplicate_charges == 0
        assert report["confirmed_duplicate_charges"] == 0
    assert rerun_report["confirmed_duplicate_charges"] == 0  # the rerun's own request is not the extra one
    assert hostile.count("POST", rf"/{T2V}") == 1  # the rerun's only: nothing sent again


def _events(engine: Engine, job_id: str) -> list[JobEvent]:
    with db.read_scope(engine) as session:
        events = list(store.job_events(session, job_id))
        for event in events:
            session.expunge(event)
        return events
