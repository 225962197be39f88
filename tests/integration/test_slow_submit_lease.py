"""A POST slower than the lease, against a fal that holds its answer back (the hostile provider,
released by the test) and the simulator's ``submit_slow`` fault.

Was: with ``WANBATCH_LEASE_SECONDS=30`` and fal answering after 45 s, the lease of the live
worker waiting for that answer ran out, the reconciler moved the job ``submitting`` →
``submit_unknown`` ("the worker was lost during the POST") → ``failed`` (no receiver: the
policy at once), and fal's answer — accepted, billed — was then dropped with a log line: the
paid video lost, ``rerun --failed-only`` paying again. Under ``resubmit`` the job was sent
again and ``status`` said ``confirmed_duplicate_charges: 0`` though the worker held the proof.

* The submit step renews its lease while the POST is in flight (fenced by version: a lease
  really taken over is never renewed back), in either deployment: a slow answer is recorded.
* A worker that did stall past its lease (the keeper stopped: as a SIGSTOP would) gets its late
  answer adopted while the job still waits for proof (``submit_unknown``); once the job moved
  on, the request is cancelled at fal, put on the job's history, and counted as a confirmed
  duplicate charge when fal bills it anyway.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine

from bench.distributed import (
    Scenario,
    batch_status,
    claimed_redis_db,
    environment,
    run_cli,
    start_workers,
    stop_processes,
    tail,
    write_manifest,
)
from cli.output import money_line
from falsim import SimulatorOptions, running_simulator
from jobs import billing, db, store
from jobs.batches import batch_report
from jobs.cost import cost_report
from jobs.models import BatchState, Job, utcnow
from jobs.states import JobState
from tests.hostile import Behaviour, HostileProvider, Recorded, json_reply, sequence
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.running import process_batch
from worker.steps import Runtime, dispatch, reconcile, submit
from worker.steps.keepalive import SubmitLeases
from worker.steps.late_answers import settle_late_answer
from worker.steps.unrecorded import Accepted

S = JobState
T2V = "fal-ai/wan-22"
KEY = "b1c2d3e4-0000-4000-8000-000000000000:00112233445566778899aabbccddeeff"
FIRST = "0a6e4b1c-2d3f-4a5b-8c6d-7e8f9a0b1c2d"
SECOND = "1b7f5c2d-3e4a-4b6c-9d7e-8f9a0b1c2d3e"
#: Long enough that the step's renewals (every third of it) never lapse on a busy host.
LEASE = 1.5


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


class HeldAnswer:
    """A POST behaviour: fal has the request (``received``), and answers only on ``release``."""

    def __init__(self, provider: HostileProvider, request_id: str, status: str = "IN_QUEUE") -> None:
        self.received = threading.Event()
        self.release = threading.Event()
        self._reply = json_reply({**_submit_answer(provider, request_id), "status": status})

    def __call__(self, req: Recorded, sock: socket.socket) -> None:
        self.received.set()
        self.release.wait(30)
        self._reply(req, sock)


def _until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _job(engine: Engine, job_id: str) -> Job:
    with db.read_scope(engine) as session:
        found = store.get_job(session, job_id)
        session.expunge(found)
        return found


def _history(engine: Engine, job_id: str) -> list[tuple[str, str, str]]:
    with db.read_scope(engine) as session:
        return [
            (str(e.from_state), str(e.to_state), e.reason or "") for e in store.job_events(session, job_id)
        ]


def _lease_passed(expiry: datetime) -> Callable[[], bool]:
    """True once the lease the step first took would have run out, had nobody renewed it."""
    return lambda: utcnow() > expiry


class SlowSubmit:
    """One job's submit step on a thread, its POST held at fal until the test releases it."""

    def __init__(self, rt: Runtime, job_id: str, held: HeldAnswer) -> None:
        self.rt, self.job_id, self.held = rt, job_id, held
        self.outcome: list[str] = []
        self._thread = threading.Thread(target=lambda: self.outcome.append(submit(rt, job_id)), daemon=True)

    def start(self, engine: Engine) -> datetime:
        """Start it; returns when the first lease it took runs out (fal has the request by then)."""
        self._thread.start()
        assert self.held.received.wait(30), "the POST never reached fal"
        expiry = _job(engine, self.job_id).lease_expires_at
        assert expiry is not None
        return expiry

    def answer(self) -> str:
        self.held.release.set()
        self._thread.join(30)
        assert self.outcome, "the submit step did not end"
        return self.outcome[0]


@pytest.fixture
def stepper() -> Iterator[list[Runtime]]:
    """Runtimes made by a test, their clients closed afterwards."""
    made: list[Runtime] = []
    yield made
    for rt in made:
        rt.submit_leases.close()
        rt.client.close()


def _runtimes(engine: Engine, url: str, made: list[Runtime], **overrides: object) -> tuple[Runtime, Runtime]:
    """The worker that submits, and another one whose tick reconciles (the distributed layout;
    embedded, both are one process: the same thing happens)."""
    settings = settings_for(url, KEY, lease_seconds=LEASE, **overrides)
    worker, leader = make_runtime(engine, settings), make_runtime(engine, settings)
    made += [worker, leader]
    return worker, leader


def test_a_post_slower_than_the_lease_keeps_its_lease_and_its_request(
    engine: Engine, hostile: HostileProvider, stepper: list[Runtime]
) -> None:
    held = HeldAnswer(hostile, FIRST)
    hostile.route("POST", rf"/{T2V}", held)
    worker, leader = _runtimes(engine, hostile.url, stepper, submit_unknown_policy="fail")
    add_batch(engine, "slow", [(T2V, {"prompt": "a lighthouse in fog"})])
    (job_id,) = dispatch(worker)
    step = SlowSubmit(worker, job_id, held)
    expiry = step.start(engine)

    _until("the first lease to run out", _lease_passed(expiry))
    assert reconcile(leader) == 0  # the POST is alive: not "lost during the POST"
    during = _job(engine, job_id)
    assert during.state == S.SUBMITTING
    assert during.lease_owner == worker.owner
    assert during.lease_expires_at is not None
    assert during.lease_expires_at > expiry  # renewed

    assert step.answer() == "submitted"
    after = _job(engine, job_id)
    assert (after.state, after.request_id, after.error_type) == (S.QUEUED, FIRST, None)
    assert ("submitting", "submit_unknown") not in [h[:2] for h in _history(engine, job_id)]
    assert hostile.count("POST", rf"/{T2V}") == 1
    assert worker.submit_leases.holding() == []


def test_a_lease_taken_over_is_never_renewed_back(engine: Engine, hostile: HostileProvider) -> None:
    """The renewal is fenced by the version the step took the lease at, and by its owner."""
    settings = settings_for(hostile.url, KEY, lease_seconds=0.3)
    rt = make_runtime(engine, settings)
    try:
        add_batch(engine, "fenced", [(T2V, {"prompt": "a quiet harbour"})])
        (job_id,) = dispatch(rt)
        now = utcnow()
        with db.session_scope(engine) as session:
            mine = store.take_lease(
                session, rt.fence(store.get_job(session, job_id)), now=now, lease_seconds=0.3, sent_at=now
            )
            assert mine is not None
            # Someone else took the job over (its claim bumps the version).
            other = store.Fence(job_id, S.SUBMITTING, mine.version, "another-worker")
            assert store.take_lease(session, other, now=now, lease_seconds=60) is not None
        taken = _job(engine, job_id).lease_expires_at
        leases = SubmitLeases(engine, 0.3)
        with leases.kept(mine) as held:
            _until("the renewal to find the lease gone", lambda: held.lost)
            assert leases.holding() == []
        assert _job(engine, job_id).lease_expires_at == taken  # theirs, untouched
    finally:
        rt.client.close()


def _stalled(worker: Runtime) -> None:
    """The worker renews nothing (as one stopped by SIGSTOP, or cut off from the database)."""
    worker.submit_leases.close()


def _cancel_route(hostile: HostileProvider, request_id: str, behaviour: Behaviour) -> str:
    path = rf"/{T2V}/requests/{request_id}/cancel"
    hostile.route("PUT", path, behaviour)
    return path


@pytest.mark.parametrize(
    ("cancel_answer", "billed"),
    [
        (json_reply({"status": "CANCELLATION_REQUESTED"}, 202), False),  # still queued: free
        (json_reply({"status": "ALREADY_COMPLETED"}, 400), True),  # fal ran it: billed
    ],
    ids=["cancelled-while-queued", "already-completed"],
)
def test_a_late_answer_for_a_failed_job_of_a_cancelled_batch_is_cancelled_first(
    engine: Engine, hostile: HostileProvider, stepper: list[Runtime], cancel_answer: Behaviour, billed: bool
) -> None:
    """The batch was cancelled: the user wants nothing more run, so the request a late answer
    proves is cancelled at fal first (free while it waits in fal's queue), and noted. One fal
    had already run (billed) is kept: the job adopts it and its video is fetched, no duplicate."""
    held = HeldAnswer(hostile, FIRST)
    hostile.route("POST", rf"/{T2V}", held)
    cancel = _cancel_route(hostile, FIRST, cancel_answer)
    worker, leader = _runtimes(engine, hostile.url, stepper, submit_unknown_policy="fail")
    batch_id = add_batch(engine, "stalled", [(T2V, {"prompt": "a lighthouse at dusk"})])
    (job_id,) = dispatch(worker)
    _stalled(worker)
    step = SlowSubmit(worker, job_id, held)
    expiry = step.start(engine)
    _until("the lease to run out", _lease_passed(expiry))
    assert reconcile(leader) == 1
    assert _job(engine, job_id).state == S.FAILED  # no receiver: the policy at once
    with db.session_scope(engine) as session:
        store.set_batch_state(session, batch_id, BatchState.CANCELLED, reason="cancelled by user")

    if billed:
        assert step.answer() == "adopted-late"
        assert hostile.count("PUT", cancel) == 1
        after = _job(engine, job_id)
        assert (after.state, after.request_id, after.attempts) == (S.QUEUED, FIRST, 1)
        assert after.confirmed_duplicate_charges == 0
        *_, adopted = _history(engine, job_id)
        assert adopted[:2] == ("failed", "queued")
        assert "late proof by the submit's answer" in adopted[2]
        assert "fal had already run it" in adopted[2]
        _assert_adopted_books(engine, batch_id, after.est_usd)
        return
    assert step.answer() == "orphaned"
    after = _job(engine, job_id)
    assert (after.state, after.error_type) == (S.FAILED, "submit_unknown")
    assert hostile.count("PUT", cancel) == 1
    *_, note = _history(engine, job_id)
    assert note[:2] == ("failed", "failed")  # moves nothing: the job stays failed, for good
    assert f"accepted as {FIRST}" in note[2]
    assert after.confirmed_duplicate_charges == 0
    with db.read_scope(engine) as session:
        assert batch_report(session, batch_id)["confirmed_duplicate_charges"] == 0
        assert store.request_known(session, job_id, FIRST)  # a webhook for it is not counted again
    _assert_books(engine, batch_id, after.est_usd, billed=False)

    # Observed again (a journal read again, the same answer twice): nothing more.
    assert settle_late_answer(leader, _accepted(job_id, FIRST), T2V) == "known"
    assert hostile.count("PUT", cancel) == 1
    _assert_books(engine, batch_id, after.est_usd, billed=False)
    # Nor does fal's webhook proving the same request count or bill it again.
    with db.session_scope(engine) as session:
        noted = store.note_duplicate_charge(
            session,
            job_id,
            FIRST,
            reason=f"webhook: accepted as {FIRST}",
            worker=None,
            outcome=billing.Outcome.SUCCEEDED,
            now=utcnow(),
        )
    assert noted == "known"
    _assert_books(engine, batch_id, after.est_usd, billed=False)


def test_a_late_answer_for_a_job_failed_for_its_unknown_outcome_is_kept(
    engine: Engine, hostile: HostileProvider, stepper: list[Runtime]
) -> None:
    """The policy failed the job (no receiver: at once), then fal's answer comes: fal has the
    request and bills it when it runs. The job adopts it (``failed`` → ``queued``) and goes on to
    fetch its video, as a webhook's late proof does — not cancelled, not a duplicate charge
    (before: cancelled at fal, or, once fal had run it, billed as a duplicate and the video lost)."""
    held = HeldAnswer(hostile, FIRST)
    hostile.route("POST", rf"/{T2V}", held)
    cancel = _cancel_route(hostile, FIRST, json_reply({"status": "ALREADY_COMPLETED"}, 400))
    worker, leader = _runtimes(engine, hostile.url, stepper, submit_unknown_policy="fail")
    batch_id = add_batch(engine, "kept", [(T2V, {"prompt": "a lighthouse at noon"})])
    (job_id,) = dispatch(worker)
    _stalled(worker)
    step = SlowSubmit(worker, job_id, held)
    expiry = step.start(engine)
    _until("the lease to run out", _lease_passed(expiry))
    assert reconcile(leader) == 1
    assert _job(engine, job_id).state == S.FAILED

    assert step.answer() == "adopted-late"
    assert hostile.count("PUT", cancel) == 0
    after = _job(engine, job_id)
    assert (after.state, after.request_id, after.attempts, after.error) == (S.QUEUED, FIRST, 1, None)
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (0, 0)
    assert after.next_attempt_at is not None  # polled like any request at fal
    *_, adopted = _history(engine, job_id)
    assert adopted[:2] == ("failed", "queued")
    proof = "late proof by the submit's answer, after the job failed for its unknown submit outcome"
    assert f"{proof}: attempt 1 accepted as {FIRST}" in adopted[2]
    _assert_adopted_books(engine, batch_id, after.est_usd)
    # Observed again (a journal read again): nothing more.
    assert settle_late_answer(leader, _accepted(job_id, FIRST), T2V) == "known"
    assert _job(engine, job_id).version == after.version
    assert hostile.count("POST", rf"/{T2V}") == 1


def _assert_adopted_books(engine: Engine, batch_id: str, est: Decimal) -> None:
    """The one job keeps the late request as its own: at fal, its estimate reserved and billed
    when it ends; nothing possibly billed, no duplicate charge, the running totals agreeing."""
    with db.read_scope(engine) as session:
        cost = cost_report(session, batch_id).total
        report = batch_report(session, batch_id)
        money = store.batch_money(session, batch_id)
        assert store.batch_spent_usd(session, batch_id) == money.spent_usd
    assert (money.spent_usd, money.reserved_usd, money.possibly_billed_usd) == (Decimal(0), est, Decimal(0))
    assert cost.confirmed_duplicate_charges == report["confirmed_duplicate_charges"] == 0
    assert cost.possibly_billed_usd == cost.wasted_usd == 0


@pytest.mark.parametrize("resend", ["waiting", "claimed"])
def test_a_late_answer_before_the_resend_went_out_is_kept_and_nothing_is_resent(
    engine: Engine, hostile: HostileProvider, stepper: list[Runtime], resend: str
) -> None:
    """``resubmit`` decided to send the job again (``retry_wait``), or a submit step claimed the
    resend but has not sent it; then fal's answer to the first attempt comes. The job keeps that
    request and the resend is dropped: one request, one charge (before: the resend went out too,
    a second paid request, and the first was counted as a confirmed duplicate charge)."""
    held = HeldAnswer(hostile, FIRST)
    hostile.route("POST", rf"/{T2V}", sequence(held, json_reply(_submit_answer(hostile, SECOND))))
    cancel = _cancel_route(hostile, FIRST, json_reply({"status": "ALREADY_COMPLETED"}, 400))
    worker, leader = _runtimes(engine, hostile.url, stepper, submit_unknown_policy="resubmit")
    batch_id = add_batch(engine, "not-resent", [(T2V, {"prompt": "a paper crane"})])
    (job_id,) = dispatch(worker)
    _stalled(worker)
    step = SlowSubmit(worker, job_id, held)
    expiry = step.start(engine)
    _until("the lease to run out", _lease_passed(expiry))
    assert reconcile(leader) == 1
    waiting = _job(engine, job_id)
    assert (waiting.state, waiting.resend_attempt, waiting.ambiguous_usd) == (
        S.RETRY_WAIT,
        2,
        waiting.est_usd,
    )
    if resend == "claimed":
        assert dispatch(leader) == [job_id]  # attempt 2 claimed, its POST not recorded as sent
        assert (_job(engine, job_id).state, _job(engine, job_id).attempts) == (S.SUBMITTING, 2)

    assert step.answer() == "adopted-late"
    after = _job(engine, job_id)
    assert (after.state, after.request_id, after.attempts, after.resend_attempt) == (S.QUEUED, FIRST, 1, None)
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (0, 0)
    assert after.lease_owner is None
    *_, adopted = _history(engine, job_id)
    assert adopted[:2] == (("submitting" if resend == "claimed" else "retry_wait"), "queued")
    assert f"before the resend went out: attempt 1 accepted as {FIRST}" in adopted[2]
    if resend == "claimed":  # the claimed resend's send finds the job moved: nothing goes out
        assert submit(leader, job_id) in ("lost-lease", "skipped")
    assert dispatch(leader) == []
    assert hostile.count("POST", rf"/{T2V}") == 1
    assert hostile.count("PUT", cancel) == 0
    _assert_adopted_books(engine, batch_id, after.est_usd)
    with db.read_scope(engine) as session:
        report = batch_report(session, batch_id)
    assert (report["possible_duplicate_charges"], report["confirmed_duplicate_charges"]) == (0, 0)


def _accepted(job_id: str, request_id: str) -> Accepted:
    return Accepted(job_id, 1, request_id, None, None, None, None, running=False, submitted_at=utcnow())


def _assert_books(engine: Engine, batch_id: str, est: Decimal, *, billed: bool) -> None:
    """The one job's late request in the batch's money: billed once at the job's estimate in
    actual and wasted (``cost``, ``status``), no longer possibly billed — or, fal's cancel answer
    saying it billed nothing, neither billed nor possibly billed any more (before: left "possibly
    billed", spent though fal said it billed nothing)."""
    with db.read_scope(engine) as session:
        cost = cost_report(session, batch_id).total
        short = store.batch_cost(session, batch_id)
        report = batch_report(session, batch_id)
        money = store.batch_money(session, batch_id)
        assert store.batch_spent_usd(session, batch_id) == money.spent_usd  # running totals moved too
    assert cost.confirmed_duplicate_charges == int(billed)
    assert (cost.actual_usd, cost.wasted_usd) == ((est, est) if billed else (0, 0))
    assert (short.actual_usd, short.wasted_usd) == (cost.actual_usd, cost.wasted_usd)
    assert cost.possibly_billed_usd == 0
    assert Decimal(str(report["spent_usd"])) == money.spent_usd == (est if billed else 0)


def test_a_late_answer_after_a_resubmit_is_a_confirmed_duplicate_charge(
    engine: Engine, hostile: HostileProvider, stepper: list[Runtime]
) -> None:
    held = HeldAnswer(hostile, FIRST)
    hostile.route("POST", rf"/{T2V}", sequence(held, json_reply(_submit_answer(hostile, SECOND))))
    cancel = _cancel_route(hostile, FIRST, json_reply({"status": "ALREADY_COMPLETED"}, 400))
    worker, leader = _runtimes(engine, hostile.url, stepper, submit_unknown_policy="resubmit")
    batch_id = add_batch(engine, "resent", [(T2V, {"prompt": "a paper boat"})])
    (job_id,) = dispatch(worker)
    _stalled(worker)
    step = SlowSubmit(worker, job_id, held)
    expiry = step.start(engine)
    _until("the lease to run out", _lease_passed(expiry))
    assert reconcile(leader) == 1
    assert _job(engine, job_id).state == S.RETRY_WAIT
    assert dispatch(leader) == [job_id]
    assert submit(leader, job_id) == "submitted"  # attempt 2, accepted as SECOND

    assert step.answer() == "orphaned"
    after = _job(engine, job_id)
    assert (after.state, after.request_id, after.attempts) == (S.QUEUED, SECOND, 2)  # keeps its own
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (1, 1)
    assert hostile.count("PUT", cancel) == 1
    *_, note = _history(engine, job_id)
    assert note[:2] == ("queued", "queued")
    assert f"late answer to attempt 1, after the job had moved on: accepted as {FIRST}" in note[2]
    with db.read_scope(engine) as session:
        report = batch_report(session, batch_id)
    assert (report["possible_duplicate_charges"], report["confirmed_duplicate_charges"]) == (1, 1)
    assert "1 confirmed duplicate charge(s)" in money_line(report)  # `status` says so too
    # Billed in the job's actual cost, no longer possibly billed (nor a possible duplicate).
    assert (after.actual_usd, after.ambiguous_usd) == (after.est_usd, Decimal(0))
    with db.read_scope(engine) as session:
        cost = cost_report(session, batch_id).total
    assert cost.actual_usd == after.est_usd
    assert cost.possibly_billed_usd == cost.possible_duplicate_usd == 0
    assert cost.confirmed_duplicate_charges == 1


def test_a_late_answer_while_a_worker_holds_the_resent_job_is_counted_and_left_possibly_billed(
    engine: Engine, hostile: HostileProvider, stepper: list[Runtime]
) -> None:
    """The resend's POST holds the job's lease (and would write the job's cost from what it
    read): the late request is counted and noted at once, its money left possibly billed."""
    held, resent = HeldAnswer(hostile, FIRST), HeldAnswer(hostile, SECOND)
    hostile.route("POST", rf"/{T2V}", sequence(held, resent))
    _cancel_route(hostile, FIRST, json_reply({"status": "ALREADY_COMPLETED"}, 400))
    worker, leader = _runtimes(engine, hostile.url, stepper, submit_unknown_policy="resubmit")
    batch_id = add_batch(engine, "held", [(T2V, {"prompt": "a kite over dunes"})])
    (job_id,) = dispatch(worker)
    _stalled(worker)
    step = SlowSubmit(worker, job_id, held)
    expiry = step.start(engine)
    _until("the lease to run out", _lease_passed(expiry))
    assert reconcile(leader) == 1
    assert dispatch(leader) == [job_id]  # attempt 2, leased to the leader's submit step
    resend = SlowSubmit(leader, job_id, resent)
    resend.start(engine)  # its POST is out (recorded as sent): a genuine second request

    assert step.answer() == "orphaned"
    during = _job(engine, job_id)
    assert (during.state, during.lease_owner, during.confirmed_duplicate_charges) == (
        S.SUBMITTING,
        leader.owner,
        1,
    )
    assert (during.actual_usd, during.ambiguous_usd) == (None, during.est_usd)
    *_, note = _history(engine, job_id)
    assert f"accepted as {FIRST}" in note[2]
    assert "possibly billed" in note[2]
    assert resend.answer() == "submitted"
    with db.read_scope(engine) as session:
        cost = cost_report(session, batch_id).total
    assert (cost.confirmed_duplicate_charges, cost.possibly_billed_usd) == (1, during.est_usd)


def test_a_late_answer_while_the_job_waits_for_proof_is_adopted(
    engine: Engine, hostile: HostileProvider, stepper: list[Runtime]
) -> None:
    """With a receiver the job waits in ``submit_unknown`` for proof; the answer is that proof:
    ``submit_unknown`` → ``queued`` by compare-and-set, nothing cancelled, nothing sent again."""
    held = HeldAnswer(hostile, FIRST)
    hostile.route("POST", rf"/{T2V}", held)
    worker, leader = _runtimes(
        engine,
        hostile.url,
        stepper,
        submit_unknown_policy="fail",
        webhook_url="https://hooks.example.test/webhooks/fal",
        submit_unknown_deadline=600.0,
    )
    add_batch(engine, "proved", [(T2V, {"prompt": "a harbour at dawn"})])
    (job_id,) = dispatch(worker)
    _stalled(worker)
    step = SlowSubmit(worker, job_id, held)
    expiry = step.start(engine)
    _until("the lease to run out", _lease_passed(expiry))
    assert reconcile(leader) == 1
    assert _job(engine, job_id).state == S.SUBMIT_UNKNOWN

    assert step.answer() == "submitted-late"
    after = _job(engine, job_id)
    assert (after.state, after.request_id, after.confirmed_duplicate_charges) == (S.QUEUED, FIRST, 0)
    assert ("submit_unknown", "queued", f"late answer: accepted as {FIRST}") in _history(engine, job_id)
    assert hostile.count("PUT", r".*/cancel") == 0
    assert hostile.count("POST", rf"/{T2V}") == 1


@pytest.mark.slow
def test_an_embedded_run_with_a_post_slower_than_the_lease_loses_nothing(tmp_path: Path) -> None:
    """The auditor's run, embedded: 16 jobs, the first POST answered four leases late."""
    options = SimulatorOptions(concurrency_limit=8, latency_seconds=0.1, latency_jitter=0.0, rng_seed=3)
    with running_simulator(options) as sim:
        settings = settings_for(
            sim.url,
            KEY,
            database_url=f"sqlite:///{tmp_path / 'w.db'}",
            output_dir=tmp_path / "out",
            lease_seconds=0.5,
            max_outstanding=4,
            submit_unknown_policy="fail",
        )
        engine = db.open_engine(settings)
        batch_id = add_batch(engine, "slow-post", [(T2V, {"prompt": f"a lighthouse {i}"}) for i in range(16)])
        sim.set_faults(submit_slow={"next": 1, "delay": 2.0})
        report, _stats = process_batch(batch_id, settings, show_progress=False)
        ledger = sim.ledger()
    assert ledger["faults"]["fired"].get("submit_slow") == 1
    assert report["counts"].get("succeeded") == 16, report["failures"]
    assert report["failures"] == []
    assert ledger["accepted"] == 16
    assert ledger["max_outstanding"] <= 4
    assert (report["possible_duplicate_charges"], report["confirmed_duplicate_charges"]) == (0, 0)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_distributed_workers_with_a_post_slower_than_the_lease_lose_nothing(
    new_pg_database: Callable[[], str], redis_url: str, tmp_path: Path
) -> None:
    """The auditor's run on two real ``wanbatch worker`` processes (prefork: the keeper runs in
    the pool child that sends), whichever of them leads the tick and reconciles."""
    scenario = Scenario(jobs=16, workers=2, concurrency=2, pool="prefork", cap=4, latency=0.1)
    manifest = write_manifest(tmp_path, scenario.jobs, name="slow-post")
    logs = tmp_path / "logs"
    logs.mkdir()
    options = SimulatorOptions(concurrency_limit=8, latency_seconds=scenario.latency, latency_jitter=0.0)
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as broker, running_simulator(options) as sim:
        env = environment(scenario, new_pg_database(), broker, sim.url, tmp_path / "out")
        env.update(WANBATCH_LEASE_SECONDS="1", WANBATCH_SUBMIT_UNKNOWN_POLICY="fail")
        procs = start_workers(scenario, env, tmp_path, logs)
        try:
            sim.set_faults(submit_slow={"next": 1, "delay": 4.0})
            batch_id = str(run_cli(["submit", str(manifest), "--json"], env, tmp_path)["batch"])
            deadline = time.monotonic() + 120
            report = batch_status(batch_id, env, tmp_path)
            while report["finished"] < scenario.jobs:
                assert time.monotonic() < deadline, (report["counts"], tail(logs / "worker-0.log"))
                time.sleep(0.5)
                report = batch_status(batch_id, env, tmp_path)
        finally:
            stop_processes(procs)
        ledger = sim.ledger()
    assert ledger["faults"]["fired"].get("submit_slow") == 1
    assert report["counts"]["succeeded"] == scenario.jobs, report["failures"]
    assert ledger["accepted"] == scenario.jobs
    assert ledger["max_outstanding"] <= scenario.cap
    assert (report["possible_duplicate_charges"], report["confirmed_duplicate_charges"]) == (0, 0)


def _cancelled_while_unknown(engine: Engine, batch_id: str) -> None:
    """``wanbatch cancel`` of the batch (:func:`jobs.batches.cancel_batch`'s moves): its job whose
    submit's outcome is unknown ends ``cancelled`` at once, with no request id."""
    with db.session_scope(engine) as session:
        store.set_batch_state(session, batch_id, BatchState.CANCELLED, reason="cancelled by user")
        cancelled = store.cancel_unsent(
            session, [batch_id], reason="batch cancelled", error="cancelled by user", error_type="cancelled"
        )
    assert cancelled.outcome_unknown == 1


@pytest.mark.parametrize(
    ("fal_says", "ran"),
    [
        ("IN_QUEUE", False),  # cancelled while still queued: free
        ("IN_PROGRESS", False),  # cancelled, but it was running: billed in full
        ("IN_QUEUE", True),  # fal had already run it to the end: billed, its video kept
    ],
    ids=["cancelled-while-queued", "cancelled-while-running", "already-completed"],
)
def test_a_late_answer_for_a_job_cancelled_while_its_outcome_was_unknown_is_its_own_request(
    engine: Engine, hostile: HostileProvider, stepper: list[Runtime], fal_says: str, ran: bool
) -> None:
    """With a receiver the job waits in ``submit_unknown`` for proof; the user cancels the batch
    (the job ends ``cancelled``, no request id, its estimate "possibly billed"); then fal's
    answer comes. That request is the job's only one: it is cancelled at fal first, as the
    cancel asked, and then is what fal's answer says — never a duplicate charge. Free while it
    waited in fal's queue (nothing possibly billed any more: before, left "possibly billed");
    billed in full once running; kept, its video fetched, when fal had already run it (before:
    a confirmed duplicate charge, billed, wasted, the paid video lost)."""
    held = HeldAnswer(hostile, FIRST, status=fal_says)
    hostile.route("POST", rf"/{T2V}", held)
    cancel_answer = (
        json_reply({"status": "ALREADY_COMPLETED"}, 400)
        if ran
        else json_reply({"status": "CANCELLATION_REQUESTED"}, 202)
    )
    cancel = _cancel_route(hostile, FIRST, cancel_answer)
    worker, leader = _runtimes(
        engine,
        hostile.url,
        stepper,
        submit_unknown_policy="fail",
        webhook_url="https://hooks.example.test/webhooks/fal",
        submit_unknown_deadline=600.0,
    )
    batch_id = add_batch(engine, "cancelled-unknown", [(T2V, {"prompt": "a lantern in fog"})])
    (job_id,) = dispatch(worker)
    _stalled(worker)
    step = SlowSubmit(worker, job_id, held)
    expiry = step.start(engine)
    _until("the lease to run out", _lease_passed(expiry))
    assert reconcile(leader) == 1
    assert _job(engine, job_id).state == S.SUBMIT_UNKNOWN
    _cancelled_while_unknown(engine, batch_id)
    cancelled = _job(engine, job_id)
    est = cancelled.est_usd
    assert (cancelled.state, cancelled.request_id, cancelled.ambiguous_usd) == (S.CANCELLED, None, est)

    if ran:
        assert step.answer() == "adopted-late"
        after = _job(engine, job_id)
        assert (after.state, after.request_id, after.attempts, after.error) == (S.QUEUED, FIRST, 1, None)
        *_, adopted = _history(engine, job_id)
        assert adopted[:2] == ("cancelled", "queued")
        assert f"attempt 1 accepted as {FIRST}" in adopted[2]
        assert "fal had already run it" in adopted[2]
        _assert_adopted_books(engine, batch_id, est)
    else:
        assert step.answer() == "orphaned"
        after = _job(engine, job_id)
        assert (after.state, after.request_id) == (S.CANCELLED, None)
        *_, note = _history(engine, job_id)
        assert note[:2] == ("cancelled", "cancelled")  # moves nothing
        assert f"accepted as {FIRST}" in note[2]
        bill = est if fal_says == "IN_PROGRESS" else Decimal(0)  # a cancel while running: in full
        assert (after.actual_usd or Decimal(0), after.ambiguous_usd) == (bill, Decimal(0))
        with db.read_scope(engine) as session:
            cost = cost_report(session, batch_id).total
            money = store.batch_money(session, batch_id)
            assert store.batch_spent_usd(session, batch_id) == money.spent_usd  # running totals too
            report = batch_report(session, batch_id)
        assert money.spent_usd == bill
        assert (cost.actual_usd, cost.possibly_billed_usd) == (bill, Decimal(0))
        assert cost.confirmed_duplicate_charges == report["confirmed_duplicate_charges"] == 0
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (0, 0)
    assert hostile.count("PUT", cancel) == 1  # the cancel asked for it: cancelled at fal first
    with db.read_scope(engine) as session:
        assert store.get_batch(session, batch_id).state == BatchState.CANCELLED
    # Observed again (a journal read again): nothing more. Nothing was sent again.
    assert settle_late_answer(leader, _accepted(job_id, FIRST), T2V) == "known"
    assert _job(engine, job_id).version == after.version
    assert dispatch(leader) == []
    assert hostile.count("POST", rf"/{T2V}") == 1
