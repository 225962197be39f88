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
  its POST (nothing paid twice) — a rerun fal refused with 429 (given back, never accepted), one
  waiting to send again after an attempt fal accepted, and a sibling rerun (a second
  ``rerun --failed-only`` of the parent) too.

A resend of an unknown submit dropped for its earlier attempt's late answer keeps the start
timeout that attempt was sent with.

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
from jobs.batches import batch_report
from jobs.cost import cost_report
from jobs.models import Job, JobEvent, utcnow
from jobs.rerun import rerun_batch
from jobs.states import JobState
from tests.hostile import HostileProvider, json_reply
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.fal.models import Status
from worker.steps import Runtime, dispatch, reconcile, submit
from worker.steps.late_answers import settle_late_answer
from worker.steps.schedule import start_timeout_expired
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


#: What fal answers our cancel of the late request: it was still queued (free), running (billed),
#: or had already run (billed, its video kept); ``running``: the late answer said it runs.
late_cancel_answers = pytest.mark.parametrize(
    ("cancel_answer", "running", "ran"),
    [
        (json_reply({"status": "CANCELLATION_REQUESTED"}, 202), False, False),  # still queued: free
        (json_reply({"status": "CANCELLATION_REQUESTED"}, 202), True, False),  # running: billed
        (json_reply({"status": "ALREADY_COMPLETED"}, 400), False, True),  # fal ran it: billed
    ],
    ids=["cancelled-while-queued", "cancelled-while-running", "already-completed"],
)


@late_cancel_answers
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


def _failed_unknown(rt: Runtime, engine: Engine, owner: str, name: str) -> tuple[str, str]:
    """A one-job batch whose job failed for its unknown submit outcome (its holder frozen past
    its lease, taken over): ``(batch id, job id)``."""
    batch_id = add_batch(engine, name, [(T2V, {"prompt": f"a paper {name}"})])
    (job_id,) = dispatch(rt)
    _post_out_lease_lapsed(engine, job_id, owner)
    assert reconcile(rt) == 1
    assert _job(engine, job_id).error_type == "submit_unknown"
    return batch_id, job_id


def _only_job(engine: Engine, batch_id: str) -> str:
    with db.read_scope(engine) as session:
        (job_id,) = [job.id for job in store.jobs_of_batch(session, batch_id)]
        return job_id


def test_a_rerun_fal_refused_with_429_is_unsent_and_cancelled_when_the_late_answer_is_kept(
    engine: Engine, hostile: HostileProvider, made: list[Runtime], live_child: subprocess.Popen[bytes]
) -> None:
    """The rerun's POST was refused with 429 (nothing queued, nothing billed; given back to
    ``pending``): then the original's late answer is kept. The rerun is no request at fal: it is
    cancelled before it is sent again (was: the send recorded before the refused POST counted it
    as sent, so it was left to send — the input billed twice — and called a confirmed duplicate)."""
    database_url = engine.url.render_as_string(hide_password=False)
    rt = _runtime(engine, hostile.url, made, database_url=database_url)
    batch_id, job_id = _failed_unknown(rt, engine, _owner(live_child.pid), "kite")
    again = _only_job(engine, rerun_batch(batch_id, failed_only=True, settings=rt.settings).batch_id)
    hostile.route("POST", rf"/{T2V}", json_reply({"detail": "slow down"}, 429))
    assert dispatch(rt) == [again]
    assert submit(rt, again) == "rate-limited"
    refused = _job(engine, again)
    assert (refused.state, refused.request_id, refused.submitted_at) == (S.PENDING, None, None)
    assert (refused.sent_at, refused.submitted_input) == (None, None)  # fal never accepted it

    late = Accepted(job_id, 1, FIRST, None, None, None, None, running=False, submitted_at=utcnow())
    assert settle_late_answer(rt, late, T2V) == "adopted"
    after = _job(engine, job_id)
    assert (after.state, after.request_id, after.confirmed_duplicate_charges) == (S.QUEUED, FIRST, 0)
    cancelled = _job(engine, again)
    assert (cancelled.state, cancelled.error_type) == (S.CANCELLED, store.REPEAT_NOT_SENT_ERROR)
    hostile.route("POST", rf"/{T2V}", json_reply(_submit_answer(hostile, SECOND)))
    assert dispatch(rt) == []  # its 429 backoff over or not: nothing left to send
    assert hostile.count("POST", rf"/{T2V}") == 1  # the refused one only: the input is billed once
    assert hostile.count("PUT", rf"/{T2V}/requests/{FIRST}/cancel") == 0  # kept, not cancelled first


def test_a_rerun_waiting_to_send_again_after_an_accepted_attempt_is_cancelled_when_fal_ran_the_late_one(
    engine: Engine, hostile: HostileProvider, made: list[Runtime], live_child: subprocess.Popen[bytes]
) -> None:
    """The rerun was accepted (SECOND), fal failed it, and it waits to send its next attempt
    (``retry_wait``). The original's late answer is cancelled at fal first (the rerun was sent),
    but fal had already run it: the job keeps it and counts the duplicate charge. The rerun's next
    attempt is then cancelled before its POST (was: its earlier accepted request made it count
    as sent, so the next attempt went out: the input billed a third time)."""
    hostile.route("POST", rf"/{T2V}", json_reply(_submit_answer(hostile, SECOND)))
    cancel = rf"/{T2V}/requests/{FIRST}/cancel"
    hostile.route("PUT", cancel, json_reply({"status": "ALREADY_COMPLETED"}, 400))
    database_url = engine.url.render_as_string(hide_password=False)
    rt = _runtime(engine, hostile.url, made, database_url=database_url)
    batch_id, job_id = _failed_unknown(rt, engine, _owner(live_child.pid), "swan")
    again = _only_job(engine, rerun_batch(batch_id, failed_only=True, settings=rt.settings).batch_id)
    assert dispatch(rt) == [again]
    assert submit(rt, again) == "submitted"
    with db.session_scope(engine) as session:  # fal failed SECOND: the rerun is to send again, due now
        assert store.retry_later(session, rt.fence(store.get_job(session, again)), reason="fal: server error")

    late = Accepted(job_id, 1, FIRST, None, None, None, None, running=False, submitted_at=utcnow())
    assert settle_late_answer(rt, late, T2V) == "adopted"
    assert hostile.count("PUT", cancel) == 1
    after = _job(engine, job_id)
    assert (after.state, after.request_id, after.confirmed_duplicate_charges) == (S.QUEUED, FIRST, 1)
    cancelled = _job(engine, again)
    assert (cancelled.state, cancelled.error_type) == (S.CANCELLED, store.REPEAT_NOT_SENT_ERROR)
    assert dispatch(rt) == []
    assert hostile.count("POST", rf"/{T2V}") == 1  # SECOND only


def test_a_late_answer_of_a_rerun_cancels_the_unsent_sibling_rerun(
    engine: Engine, hostile: HostileProvider, made: list[Runtime], live_child: subprocess.Popen[bytes]
) -> None:
    """The parent's job failed for its unknown outcome, its first rerun's job too; the user ran
    ``rerun PARENT --failed-only`` again: a sibling rerun of the same job, not sent yet. Then the
    first rerun's late answer is kept: the sibling is cancelled before its POST (was: only reruns
    below the first rerun were looked at, so the sibling was sent — the input billed twice, with
    no duplicate charge said)."""
    hostile.route("POST", rf"/{T2V}", json_reply(_submit_answer(hostile, SECOND)))
    database_url = engine.url.render_as_string(hide_password=False)
    rt = _runtime(engine, hostile.url, made, database_url=database_url)
    parent, p1 = _failed_unknown(rt, engine, _owner(live_child.pid), "fox")
    rerun_batch(parent, failed_only=True, settings=rt.settings)
    (r1,) = dispatch(rt)
    _post_out_lease_lapsed(engine, r1, _owner(live_child.pid))
    assert reconcile(rt) == 1
    assert _job(engine, r1).error_type == "submit_unknown"
    r2 = _only_job(engine, rerun_batch(parent, failed_only=True, settings=rt.settings).batch_id)
    assert (_job(engine, r2).rerun_of, _job(engine, r2).state) == (p1, S.PENDING)

    late = Accepted(r1, 1, FIRST, None, None, None, None, running=False, submitted_at=utcnow())
    assert settle_late_answer(rt, late, T2V) == "adopted"
    assert (_job(engine, r1).state, _job(engine, r1).confirmed_duplicate_charges) == (S.QUEUED, 0)
    sibling = _job(engine, r2)
    assert (sibling.state, sibling.error_type) == (S.CANCELLED, store.REPEAT_NOT_SENT_ERROR)
    assert dispatch(rt) == []
    assert hostile.count("POST", rf"/{T2V}") == 0  # the input is billed once: FIRST
    assert _job(engine, p1).state == S.FAILED  # the job both repeat is left as it was


@pytest.mark.parametrize(
    "given_back", [None, "held", "refused"], ids=["claimed", "claimed-then-given-back", "refused-429"]
)
def test_a_resend_dropped_for_the_earlier_attempts_late_answer_keeps_its_start_timeout(
    engine: Engine,
    hostile: HostileProvider,
    made: list[Runtime],
    live_child: subprocess.Popen[bytes],
    given_back: str | None,
) -> None:
    """Attempt 1 was sent with a start timeout (a window was open) and its outcome stayed
    unknown; ``resubmit`` claimed its resend (``held``: and gave it back before its POST, as a
    rate hold does; ``refused``: sent it, carrying no start timeout as the schedule is gone, and
    fal refused it with 429). Attempt 1's late answer comes: the job keeps that request, and the
    start timeout it was sent with — so, with the schedule removed afterwards, fal's unbilled
    ``request_timeout`` of it is still no counted failure (was: claiming the resend forgot it;
    a resend refused with 429 left the refused POST's, none)."""
    url = engine.url.render_as_string(hide_password=False)
    rt = make_runtime(
        engine, settings_for(hostile.url, KEY, submit_unknown_policy="resubmit", database_url=url)
    )
    made.append(rt)
    add_batch(engine, "resend-adopted", [(T2V, {"prompt": "a lantern"})])
    (job_id,) = dispatch(rt)
    past = utcnow() - timedelta(minutes=5)
    closes = utcnow() + timedelta(minutes=30)
    with db.session_scope(engine) as session:  # attempt 1's POST, sent with a start timeout, then frozen
        job = store.get_job(session, job_id)
        assert store.update_job_fields(
            session,
            job_id,
            expected_version=job.version,
            submitted_input=dict(job.input),
            sent_at=past,
            start_timeout_at=closes,
            lease_owner=_owner(live_child.pid),
            lease_expires_at=past + timedelta(seconds=30),
        )
    assert reconcile(rt) == 1
    with db.session_scope(engine) as session:  # the resend is due now
        job = store.get_job(session, job_id)
        assert job.state == S.RETRY_WAIT
        assert store.update_job_fields(session, job_id, expected_version=job.version, next_attempt_at=None)
    assert dispatch(rt) == [job_id]  # the resend claimed: submitting, its POST not recorded
    if given_back == "held":
        with db.session_scope(engine) as session:
            assert store.give_back(session, rt.fence(store.get_job(session, job_id)), reason="held back")
        assert _job(engine, job_id).state == S.PENDING
    elif given_back == "refused":
        hostile.route("POST", rf"/{T2V}", json_reply({"detail": "slow down"}, 429))
        assert submit(rt, job_id) == "rate-limited"  # its POST recorded, carrying no start timeout
        refused = _job(engine, job_id)
        assert (refused.state, refused.sent_at, refused.start_timeout_at) == (S.PENDING, None, closes)

    late = Accepted(job_id, 1, FIRST, None, None, None, None, running=False, submitted_at=past)
    assert settle_late_answer(rt, late, T2V) == "adopted"
    kept = _job(engine, job_id)
    assert (kept.state, kept.request_id, kept.start_timeout_at) == (S.QUEUED, FIRST, closes)
    # The batch has no window or deadline (the schedule removed): fal ends FIRST unstarted at `closes`.
    timed_out = Status(state="COMPLETED", error="Request timed out", error_type="request_timeout")
    with db.session_scope(engine) as session:
        assert start_timeout_expired(
            session, rt.fence(store.get_job(session, job_id)), timed_out, now=utcnow()
        )
    requeued = _job(engine, job_id)
    assert (requeued.state, requeued.counted_attempts) == (S.PENDING, 0)  # not counted, sent again
    assert hostile.count("POST", rf"/{T2V}") == (1 if given_back == "refused" else 0)


def _events(engine: Engine, job_id: str) -> list[JobEvent]:
    with db.read_scope(engine) as session:
        events = list(store.job_events(session, job_id))
        for event in events:
            session.expunge(event)
        return events


def test_a_refused_post_with_no_request_left_at_fal_keeps_no_start_timeout(
    engine: Engine, hostile: HostileProvider, made: list[Runtime]
) -> None:
    """A first attempt's POST, carrying a start timeout, refused with 429 and given back: no
    request of the job is at fal, so it has no start timeout (was: the refused POST's stayed)."""
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    made.append(rt)
    add_batch(engine, "refused-first", [(T2V, {"prompt": "a kite"})])
    (job_id,) = dispatch(rt)
    now = utcnow()
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        sent = store.record_send(
            session,
            rt.fence(job),
            now=now,
            lease_seconds=60,
            submitted_input=dict(job.input),
            sent_at=now,
            api_key_id="k",
            start_timeout_at=now + timedelta(minutes=30),
        )
        assert sent is not None
        assert store.give_back(session, sent, reason="rate limited by fal")
    refused = _job(engine, job_id)
    assert (refused.state, refused.attempts, refused.sent_at, refused.start_timeout_at) == (
        S.PENDING,
        0,
        None,
        None,
    )


@late_cancel_answers
def test_a_late_answer_for_a_cancelled_job_whose_rerun_was_sent_is_a_confirmed_duplicate_charge(
    engine: Engine,
    hostile: HostileProvider,
    made: list[Runtime],
    live_child: subprocess.Popen[bytes],
    cancel_answer: object,
    running: bool,
    ran: bool,
) -> None:
    """As above, for a job a cancel ended while its submit's outcome was unknown (``wanbatch
    cancel`` of its batch): ``rerun --failed-only`` repeats cancelled jobs too, and sent it again
    (SECOND). The first POST's late answer (FIRST) is cancelled at fal first. When fal billed it
    anyway — the cancel stopped it while it ran, or it had already run — the input was billed
    twice: a confirmed duplicate charge on the original batch. Was: the request stopped while
    running was booked as the cancelled job's own (``confirmed_duplicate_charges: 0``), as if no
    rerun had been sent."""
    from jobs.batches import cancel_batch

    hostile.route("POST", rf"/{T2V}", json_reply(_submit_answer(hostile, SECOND)))
    cancel = rf"/{T2V}/requests/{FIRST}/cancel"
    hostile.route("PUT", cancel, cancel_answer)  # type: ignore[arg-type]
    database_url = engine.url.render_as_string(hide_password=False)
    # A receiver configured: the unknown outcome waits for its proof instead of failing at once.
    rt = _runtime(
        engine, hostile.url, made, database_url=database_url, webhook_url="https://hooks.example/webhooks/fal"
    )
    batch_id = add_batch(engine, "cancel-rerun-sent", [(T2V, {"prompt": "a paper kite"})])
    (job_id,) = dispatch(rt)
    _post_out_lease_lapsed(engine, job_id, _owner(live_child.pid))
    assert reconcile(rt) == 1
    assert _job(engine, job_id).state == S.SUBMIT_UNKNOWN
    cancel_batch(batch_id, rt.settings, by="cli")
    assert _job(engine, job_id).state == S.CANCELLED

    rerun = rerun_batch(batch_id, failed_only=True, settings=rt.settings)
    (again,) = dispatch(rt)
    assert _job(engine, again).rerun_of == job_id
    assert submit(rt, again) == "submitted"
    assert _job(engine, again).request_id == SECOND

    late = Accepted(job_id, 1, FIRST, None, None, None, None, running=running, submitted_at=utcnow())
    settled = settle_late_answer(rt, late, T2V)
    assert hostile.count("PUT", cancel) == 1  # cancelled at fal first: the job was cancelled
    after = _job(engine, job_id)
    with db.read_scope(engine) as session:
        report = batch_report(session, batch_id)
        rerun_report = batch_report(session, rerun.batch_id)
    history = [e.reason or "" for e in _events(engine, job_id)]
    if ran:  # billed anyway: its video is kept, and the second charge is said
        assert settled == "adopted"
        assert (after.state, after.request_id) == (S.QUEUED, FIRST)
        assert after.confirmed_duplicate_charges == 1
        assert report["confirmed_duplicate_charges"] == 1
        assert any(f"its rerun, job {again}, was sent too" in reason for reason in history)
    elif running:  # stopped while it ran: billed beside the rerun, no video
        assert settled == "billed"
        assert (after.state, after.request_id) == (S.CANCELLED, None)
        assert after.confirmed_duplicate_charges == 1
        assert report["confirmed_duplicate_charges"] == 1
        assert any(f"its rerun, job {again}, was sent" in reason for reason in history)
    else:  # stopped while it waited in fal's queue: not billed, nothing paid twice
        assert settled == "noted"
        assert (after.state, after.request_id) == (S.CANCELLED, None)
        assert after.confirmed_duplicate_charges == 0
        assert report["confirmed_duplicate_charges"] == 0
    assert rerun_report["confirmed_duplicate_charges"] == 0  # the rerun's own request is not the extra one
    assert hostile.count("POST", rf"/{T2V}") == 1  # the rerun's only: nothing sent again
