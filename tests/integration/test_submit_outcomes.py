"""What a submit, a status, a result or an upload failure means for a job, against a hostile fal.

* A failure before the request left this process is not ambiguous: the job goes back to
  ``pending`` without spending an attempt — never "fal may have accepted (and billed) it".
* A lost answer after the request was sent is ambiguous; without a webhook receiver nothing
  can ever prove the outcome, so ``WANBATCH_SUBMIT_UNKNOWN_POLICY`` applies at once.
* 401/402/403 are about the account, wherever they come: the batch pauses with the reason,
  the job stays where it is, and requests already at fal are still polled.
* The key goes only to the configured queue: status/result/cancel URLs on another host, in a
  submit answer or an old database row, are never followed.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import Engine

from falsim import SimulatorOptions, running_simulator
from falsim.faults import FaultRule
from jobs import db, store
from jobs.batches import BatchReport, batch_report
from jobs.errors import ConfigError
from jobs.models import BatchState, Job, utcnow
from jobs.settings import Settings
from jobs.states import JobState
from tests.hostile import Behaviour, HostileProvider, json_reply, reset, sequence
from tests.hostile_fal import accept_submits, accepted_reply
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.fal.client import FalClient
from worker.limits import api_key_id
from worker.running import process_batch
from worker.steps import Runtime, cancel_jobs_of_cancelled_batches, dispatch, download, poll, submit

S = JobState
KEY = "8d3c1f0e-5a6b-4c7d-9e8f-0a1b2c3d4e5f:0f1e2d3c4b5a69788796a5b4c3d2e1f0"
RID = "6f9b2d4c-1a3e-4b5f-8c7d-9e0f1a2b3c4d"
T2V = "fal-ai/wan-22"
REQUESTS = rf"/{T2V}/requests/{RID}"


@pytest.fixture
def evil() -> Iterator[HostileProvider]:
    """A second server on another port: a host a hostile submit answer points at."""
    with HostileProvider() as provider:
        provider.route("GET", r"/.*", json_reply({"status": "COMPLETED"}))
        provider.route("PUT", r"/.*", json_reply({"status": "CANCELLATION_REQUESTED"}))
        yield provider


def accepted(fal: HostileProvider, urls_on: str | None = None) -> None:
    """fal accepts the submit as ``RID``; the answer's URLs point at ``urls_on`` when given."""
    accept_submits(fal, RID, T2V, urls_on)


def one_job(engine: Engine, rt: Runtime, payload: dict[str, Any] | None = None) -> tuple[str, str]:
    """A batch of one job, claimed for submitting: ``(batch_id, job_id)``."""
    batch_id = add_batch(engine, "outcomes", [(T2V, payload or {"prompt": "a lighthouse"})])
    (job_id,) = dispatch(rt)
    return batch_id, job_id


def poll_due(rt: Runtime) -> int:
    """Poll once the jobs just submitted are due (``poll_min_interval`` after their submit)."""
    time.sleep(rt.settings.poll_min_interval * 2)
    return poll(rt)


def history(engine: Engine, job_id: str) -> list[tuple[str, str]]:
    with db.session_scope(engine) as session:
        return [(str(e.from_state), str(e.to_state)) for e in store.job_events(session, job_id)]


def job(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        found = store.get_job(session, job_id)
        session.expunge(found)
        return found


def report(engine: Engine, batch_id: str) -> BatchReport:
    with db.session_scope(engine) as session:
        return batch_report(session, batch_id)


# ------------------------------------------------------------------------- never sent (item 5)


def test_a_closed_client_gives_the_job_back_unsent(engine: Engine, hostile: HostileProvider) -> None:
    accepted(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    _, job_id = one_job(engine, rt)
    rt.client.close()  # e.g. a run that ended while a submit task was still queued
    assert submit(rt, job_id) == "not-sent"
    after = job(engine, job_id)
    assert after.state == S.PENDING
    assert after.attempts == 0  # the attempt that never left is not counted
    assert "closed" in (after.error or "")
    assert ("submitting", "submit_unknown") not in history(engine, job_id)
    assert hostile.count("POST", r".*") == 0


def test_a_header_httpx_refuses_is_not_sent_either(engine: Engine, hostile: HostileProvider) -> None:
    accepted(hostile)
    settings = settings_for(hostile.url, KEY)
    # Settings strip and refuse such a key; a client built around them still must not call the
    # refusal "maybe accepted": h11 refuses the header before a byte of the request is written.
    client = FalClient(
        queue_url=hostile.url, rest_url=hostile.url, key=KEY + "\r", timeout=httpx.Timeout(5.0)
    )
    rt = make_runtime(engine, settings, client=client)
    try:
        _, job_id = one_job(engine, rt)
        assert submit(rt, job_id) == "not-sent"
    finally:
        client.close()
    after = job(engine, job_id)
    assert (after.state, after.attempts, after.error_type) == (S.PENDING, 0, "not_sent")
    assert ("submitting", "submit_unknown") not in history(engine, job_id)
    assert hostile.count("POST", r".*") == 0


I2V = "fal-ai/wan-i2v"


def _i2v_job(engine: Engine, image: Path) -> str:
    """A batch of one image-to-video job sending ``image`` (a local file); its id."""
    return add_batch(
        engine, "local-file", [(I2V, {"prompt": "p", "image_url": str(image), "resolution": "480p"})]
    )


def test_a_job_whose_file_is_gone_pauses_its_batch_unsent_and_uncounted(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """An input file gone when the job is to be sent (its folder moved, its disk not mounted)
    pauses the batch, naming the file, before anything is sent: the job goes back ``pending``
    without an attempt (README: exports) and cost nothing. It used to fail for good
    (``input_file``), every unsent job of a moved project with it."""
    accepted(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    try:
        batch_id = _i2v_job(engine, tmp_path / "gone.png")
        (job_id,) = dispatch(rt)
        assert job(engine, job_id).attempts == 1  # counted when claimed…
        assert submit(rt, job_id) == "input-missing"
        assert dispatch(rt) == []  # the batch is paused: nothing more is claimed
    finally:
        rt.client.close()
    after = job(engine, job_id)
    assert (after.state, after.error_type) == (S.PENDING, None)
    assert after.attempts == 0  # …and not any more: it never left
    assert (after.submitted_at, after.request_id) == (None, None)
    assert hostile.count("POST", r".*") == 0
    shown = report(engine, batch_id)
    assert shown["state"] == BatchState.PAUSED.value
    reason = shown["pause_reason"] or ""
    assert reason.startswith(f"input missing: media file '{tmp_path / 'gone.png'}' does not exist"), reason


def test_a_resend_whose_file_is_gone_keeps_only_the_attempt_sent(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """A job sent before (its answer lost, resubmitted by the policy) whose file is gone when it
    is to be sent again: the batch pauses; the first attempt stays counted, the one never sent
    does not, and it is no possible duplicate charge."""
    image = tmp_path / "still.png"
    Image.new("RGB", (64, 48), (20, 90, 160)).save(image)
    hostile.route("POST", rf"/{I2V}", reset())
    rt = make_runtime(engine, settings_for(hostile.url, KEY, submit_unknown_policy="resubmit"))
    try:
        _i2v_job(engine, image)
        (job_id,) = dispatch(rt)
        assert submit(rt, job_id) == "retry"  # the policy sent it again at once
        assert job(engine, job_id).state == S.RETRY_WAIT
        image.unlink()
        assert dispatch(rt) == [job_id]
        assert submit(rt, job_id) == "input-missing"
    finally:
        rt.client.close()
    after = job(engine, job_id)
    assert after.state == S.PENDING
    assert (after.attempts, after.possible_duplicate_charges) == (1, 0)
    assert after.submitted_at is not None  # the first attempt's POST went out
    assert hostile.count("POST", rf"/{I2V}") == 1


def test_a_connection_refused_is_given_back_unsent_uncounted_and_holds_the_submits(
    engine: Engine, hostile: HostileProvider
) -> None:
    """A closed loopback port: fal was never reached, so it is no submission — not counted
    against WANBATCH_MAX_ATTEMPTS, nothing possibly billed — and this process holds its
    submits until fal answers: a second job claimed meanwhile goes back without a POST."""
    port = hostile.port
    hostile.close()  # nothing listens there any more
    settings = settings_for(f"http://127.0.0.1:{port}", KEY).model_copy(update={"max_attempts": 1})
    rt = make_runtime(engine, settings)
    try:
        batch_id = add_batch(engine, "refused", [(T2V, {"prompt": "a"}), (T2V, {"prompt": "b"})])
        first, second = dispatch(rt)
        assert submit(rt, first) == "fal-unreachable"
        assert rt.fal_reach.down
        assert submit(rt, second) == "fal-unreachable"  # held: not even tried
    finally:
        rt.client.close()
    for job_id in (first, second):
        after = job(engine, job_id)
        assert after.state == S.PENDING  # not failed, though max_attempts is 1
        assert after.attempts == 0
        assert after.submitted_input is None
        assert (after.possible_duplicate_charges, after.ambiguous_usd) == (0, Decimal(0))
        assert ("submitting", "submit_unknown") not in history(engine, job_id)
    assert job(engine, first).error_type == "fal_unreachable"
    assert "could not connect" in (job(engine, first).error or "")
    totals = report(engine, batch_id)
    assert not totals["possibly_billed_usd"]
    assert totals["possible_duplicate_charges"] == 0
    note = rt.fal_reach.note() or ""
    assert note.startswith("fal unreachable since ")
    assert "retrying every 1s" in note


def test_a_submit_failure_without_fals_error_type_still_has_one(
    engine: Engine, hostile: HostileProvider
) -> None:
    """A gateway 503 to the last attempt fails the job; `status --json` named its type null
    (text showed "(error)"): it is the failure's kind now."""
    hostile.route("POST", rf"/{T2V}", json_reply({"detail": "upstream unavailable"}, status=503))
    settings = settings_for(hostile.url, KEY).model_copy(update={"max_attempts": 1})
    rt = make_runtime(engine, settings)
    try:
        _, job_id = one_job(engine, rt)
        # What happened, not the error's class: a retryable 503 to the last attempt ends the job.
        assert submit(rt, job_id) == "failed"
    finally:
        rt.client.close()
    after = job(engine, job_id)
    assert after.state == S.FAILED
    assert after.error_type == "http_503"


def test_the_runtime_refuses_to_start_without_a_key(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    batch_id = add_batch(engine, "keyless", [(T2V, {"prompt": "p"})])
    url = engine.url.render_as_string(hide_password=False)
    settings = Settings(
        database_url=url, fal_queue_url="http://127.0.0.1:9", fal_rest_url="http://127.0.0.1:9"
    )
    with pytest.raises(ConfigError, match="FAL_KEY is not set"):
        process_batch(batch_id, settings, show_progress=False)
    assert job(engine, _only_job(engine, batch_id)).version == 0  # nothing was claimed


def _only_job(engine: Engine, batch_id: str) -> str:
    with db.session_scope(engine) as session:
        (only,) = store.jobs_of_batch(session, batch_id)
        return only.id


# --------------------------------------------------------------------- ambiguous submits (item 6)


@pytest.mark.parametrize(
    ("policy", "webhook", "state", "outcome"),
    [
        ("fail", None, S.FAILED, "failed"),
        ("resubmit", None, S.RETRY_WAIT, "retry"),
        ("fail", "https://hooks.example/fal", S.SUBMIT_UNKNOWN, "ambiguous"),
    ],
)
def test_a_lost_answer_is_settled_at_once_without_a_receiver(
    engine: Engine,
    hostile: HostileProvider,
    policy: str,
    webhook: str | None,
    state: JobState,
    outcome: str,
) -> None:
    hostile.route("POST", rf"/{T2V}", reset())  # the whole request arrives; the answer never does
    settings = settings_for(
        hostile.url, KEY, submit_unknown_policy=policy, webhook_url=webhook, submit_unknown_deadline=600
    )
    rt = make_runtime(engine, settings)
    try:
        _, job_id = one_job(engine, rt)
        assert submit(rt, job_id) == outcome  # what became of it: a step line names that
    finally:
        rt.client.close()
    after = job(engine, job_id)
    assert hostile.count("POST", rf"/{T2V}") == 1
    assert ("submitting", "submit_unknown") in history(engine, job_id)  # the ambiguity is on record
    assert after.state == state
    if state == S.FAILED:
        assert "WANBATCH_WEBHOOK_URL" in (after.error or "")
        assert "may have accepted (and billed)" in (after.error or "")
    elif state == S.RETRY_WAIT:
        assert after.possible_duplicate_charges == 0  # counted when the resend goes out
        assert after.resend_attempt == after.attempts + 1
    else:  # a receiver may still prove it: wait for it, up to the deadline
        assert after.next_attempt_at is not None
        assert after.next_attempt_at > utcnow() + timedelta(seconds=500)


@pytest.mark.parametrize("status", [504, 502])
def test_a_gateway_answer_after_an_accepted_submit_is_not_sent_again(tmp_path: Path, status: int) -> None:
    """An audit: fal queued the submit, then its ingress answered nginx's "504 Gateway Time-out"
    page (no x-fal-request-id); wanbatch called it "not queued, gateway answered HTTP 504" and
    sent the job again 7 s later — two accepted requests, both billed, and ``run --json`` said
    possible_duplicate_charges 0. A gateway's 502/504 comes after it forwarded the POST, so the
    job is ``submit_unknown`` as after a read timeout: one accepted request per job, and without
    a receiver the default policy (``fail``) ends it saying why."""
    params = {} if status == 504 else {"status": 502}
    options = SimulatorOptions(
        latency_seconds=0.2, rng_seed=5, faults={"submit_504_after_accept": FaultRule(next=1, params=params)}
    )
    with running_simulator(options) as sim:
        settings = settings_for(
            sim.url, KEY, database_url=f"sqlite:///{tmp_path / 'g.db'}", output_dir=tmp_path / "out"
        )
        local = db.open_engine(settings)
        batch_id = add_batch(local, "g504", [(T2V, {"prompt": f"p{i}"}) for i in range(3)])
        result, _stats = process_batch(batch_id, settings, show_progress=False)
        ledger = sim.ledger()
    assert ledger["faults"]["fired"] == {"submit_504_after_accept": 1}
    assert ledger["accepted"] == 3  # exactly one accepted request per job
    assert sorted(Counter(e["input_sha256"] for e in ledger["entries"]).values()) == [1, 1, 1]
    assert (result["counts"]["succeeded"], result["counts"]["failed"]) == (2, 1), result["counts"]
    assert result["possible_duplicate_charges"] == 0
    (lost,) = [j for j in _jobs_of(local, batch_id) if j.state == S.FAILED]
    assert (lost.error_type, lost.request_id, lost.attempts) == ("submit_unknown", None, 1)
    assert "submission outcome unknown" in (lost.error or "")
    assert "WANBATCH_WEBHOOK_URL" in (lost.error or "")
    with db.session_scope(local) as session:
        moves = {
            (str(e.from_state), str(e.to_state)): e.reason or "" for e in store.job_events(session, lost.id)
        }
    why = f"the gateway answered HTTP {status} after the request was sent"
    assert why in moves[("submitting", "submit_unknown")]  # the ambiguity, and why, on record


def test_a_gateway_504_resent_by_the_resubmit_policy_is_a_possible_duplicate(tmp_path: Path) -> None:
    """Under ``WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit`` the job is sent again, as the policy
    says — and that resend is counted as a possible duplicate charge, no longer called 0."""
    options = SimulatorOptions(
        latency_seconds=0.2, rng_seed=5, faults={"submit_504_after_accept": FaultRule(next=1)}
    )
    with running_simulator(options) as sim:
        settings = settings_for(
            sim.url,
            KEY,
            database_url=f"sqlite:///{tmp_path / 'g.db'}",
            output_dir=tmp_path / "out",
            submit_unknown_policy="resubmit",
        )
        local = db.open_engine(settings)
        batch_id = add_batch(local, "g504", [(T2V, {"prompt": f"p{i}"}) for i in range(2)])
        result, _stats = process_batch(batch_id, settings, show_progress=False)
        ledger = sim.ledger()
    assert result["counts"]["succeeded"] == 2, result["counts"]
    assert ledger["accepted"] == 3  # the policy's resend: two requests for one input
    assert result["possible_duplicate_charges"] == 1
    (resent,) = [j for j in _jobs_of(local, batch_id) if j.attempts == 2]
    assert resent.possible_duplicate_charges == 1


def _jobs_of(engine: Engine, batch_id: str) -> list[Job]:
    with db.read_scope(engine) as session:
        found = list(store.jobs_of_batch(session, batch_id))
        for one in found:
            session.expunge(one)
    return found


def _resubmitting(engine: Engine, hostile: HostileProvider, *then: Behaviour) -> tuple[Runtime, str, str]:
    """A job whose first POST's answer was lost, moved to ``retry_wait`` by the ``resubmit``
    policy (no receiver): ``(runtime, batch id, job id)``. Later POSTs get ``then``."""
    hostile.route("POST", rf"/{T2V}", sequence(reset(), *then))
    rt = make_runtime(engine, settings_for(hostile.url, KEY, submit_unknown_policy="resubmit"))
    batch_id, job_id = one_job(engine, rt)
    assert submit(rt, job_id) == "retry"
    assert job(engine, job_id).state == S.RETRY_WAIT
    return rt, batch_id, job_id


def test_a_resend_cancelled_before_it_went_out_is_no_possible_duplicate(
    engine: Engine, hostile: HostileProvider
) -> None:
    """`possible_duplicate_charges` counts submissions *sent again* (CONTRACT): a job cancelled
    in ``retry_wait`` (a cancel, a budget, a deadline) never was."""
    rt, batch_id, job_id = _resubmitting(engine, hostile)
    try:
        with db.session_scope(engine) as session:
            store.set_batch_state(session, batch_id, BatchState.CANCELLED)
        assert cancel_jobs_of_cancelled_batches(rt) == 1
    finally:
        rt.client.close()
    after = job(engine, job_id)
    assert (after.state, after.possible_duplicate_charges) == (S.CANCELLED, 0)
    assert hostile.count("POST", rf"/{T2V}") == 1
    assert report(engine, batch_id)["possible_duplicate_charges"] == 0


def test_a_resend_counts_once_when_it_goes_out(engine: Engine, hostile: HostileProvider) -> None:
    """The resend counts when its POST is recorded as sent; a 429 that gives it back uncounts
    it, and it counts again, once, when the same attempt is sent and accepted."""
    rate_limited = json_reply({"detail": "slow down"}, 429)
    rt, batch_id, job_id = _resubmitting(engine, hostile, rate_limited, accepted_reply(hostile.url, RID))
    try:
        assert dispatch(rt) == [job_id]
        assert submit(rt, job_id) == "rate-limited"
        refused = job(engine, job_id)
        assert (refused.state, refused.possible_duplicate_charges) == (S.PENDING, 0)
        assert dispatch(rt) == [job_id]
        assert submit(rt, job_id) == "submitted"
    finally:
        rt.client.close()
    after = job(engine, job_id)
    assert (after.state, after.attempts, after.possible_duplicate_charges) == (S.QUEUED, 2, 1)
    assert hostile.count("POST", rf"/{T2V}") == 3
    assert report(engine, batch_id)["possible_duplicate_charges"] == 1


# ------------------------------------------------------------------ 401/402/403 pause (item 12)


def test_401_on_status_pauses_the_batch_and_polling_goes_on(engine: Engine, hostile: HostileProvider) -> None:
    accepted(hostile)
    hostile.route("GET", rf"{REQUESTS}/status", json_reply({"detail": "Invalid API key"}, 401))
    rt = make_runtime(engine, settings_for(hostile.url, KEY, poll_max_interval=0.2))
    try:
        batch_id, job_id = one_job(engine, rt)
        assert submit(rt, job_id) == "submitted"
        assert poll_due(rt) == 1
        after = job(engine, job_id)
        assert after.state == S.QUEUED  # the request is still at fal: the job stays with it
        assert after.lease_owner is None
        status = report(engine, batch_id)
        assert status["state"] == "paused"
        assert "401" in (status["pause_reason"] or "")
        assert "rejected" in (status["pause_reason"] or "")
        # The advice is `status`'s to give ("fix it, then `wanbatch run …` goes on"), once.
        assert "run the batch again" not in (status["pause_reason"] or "")

        # Polling a paused batch goes on (the request runs, and is billed, regardless).
        hostile.route("GET", rf"{REQUESTS}/status", json_reply({"status": "IN_PROGRESS"}, 202))
        time.sleep(0.25)
        assert poll(rt) == 1
        assert job(engine, job_id).state == S.RUNNING
    finally:
        rt.client.close()


def test_402_on_result_pauses_and_keeps_the_paid_output_waiting(
    engine: Engine, hostile: HostileProvider
) -> None:
    accepted(hostile)
    hostile.route("GET", rf"{REQUESTS}/status", json_reply({"status": "COMPLETED", "metrics": {}}))
    hostile.route("GET", REQUESTS, json_reply({"detail": "Exhausted balance"}, 402))
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    try:
        batch_id, job_id = one_job(engine, rt)
        assert submit(rt, job_id) == "submitted"
        poll_due(rt)
        assert job(engine, job_id).state == S.DOWNLOADING
        download(rt, job_id)
    finally:
        rt.client.close()
    after = job(engine, job_id)
    assert after.state == S.DOWNLOADING  # fal made (and billed) it: fetched once the account is back
    assert after.attempts == 1
    status = report(engine, batch_id)
    assert status["state"] == "paused"
    assert "402" in (status["pause_reason"] or "")


def test_a_request_fal_lost_fails_as_request_not_found(engine: Engine, hostile: HostileProvider) -> None:
    # fal's 404 carries no error type: the job ended `failed (error)` in `status`.
    accepted(hostile)
    hostile.route("GET", rf"{REQUESTS}/status", json_reply({"detail": "Request not found"}, 404))
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    try:
        _, lost = one_job(engine, rt)
        assert submit(rt, lost) == "submitted"
        poll_due(rt)
    finally:
        rt.client.close()
    assert (job(engine, lost).state, job(engine, lost).error_type) == (S.FAILED, "request_not_found")


def test_a_status_refused_for_good_without_fals_error_type_still_has_one(
    engine: Engine, hostile: HostileProvider
) -> None:
    """A status call fal refuses for good (a 410, no ``error_type`` of fal's) failed the job with
    ``error_type`` null: `status` showed "(error)" and ``status --json`` null, as submits did."""
    accepted(hostile)
    hostile.route("GET", rf"{REQUESTS}/status", json_reply({"detail": "Gone"}, 410))
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    try:
        _, lost = one_job(engine, rt)
        assert submit(rt, lost) == "submitted"
        poll_due(rt)
    finally:
        rt.client.close()
    assert (job(engine, lost).state, job(engine, lost).error_type) == (S.FAILED, "http_410")


def test_a_result_gone_fails_as_result_expired(engine: Engine, hostile: HostileProvider) -> None:
    accepted(hostile)
    hostile.route("GET", rf"{REQUESTS}/status", json_reply({"status": "COMPLETED", "metrics": {}}))
    hostile.route("GET", REQUESTS, json_reply({"detail": "Not found"}, 404))
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    try:
        _, gone = one_job(engine, rt)
        assert submit(rt, gone) == "submitted"
        poll_due(rt)
        download(rt, gone)
    finally:
        rt.client.close()
    after = job(engine, gone)
    assert (after.state, after.error_type) == (S.FAILED, "result_expired")


def test_403_on_upload_pauses_and_gives_the_job_back(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    hostile.route("POST", r"/storage/upload/initiate", json_reply({"detail": "User is locked"}, 403))
    image = tmp_path / "still.png"
    Image.new("RGB", (640, 480), (20, 90, 160)).save(image)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, inline_max_bytes=0))
    try:
        batch_id = add_batch(
            engine,
            "upload",
            [("fal-ai/wan-i2v", {"prompt": "p", "image_url": str(image), "resolution": "480p"})],
        )
        (job_id,) = dispatch(rt)
        assert submit(rt, job_id) == "account-locked"
    finally:
        rt.client.close()
    after = job(engine, job_id)
    assert (after.state, after.attempts) == (S.PENDING, 0)
    status = report(engine, batch_id)
    assert status["state"] == "paused"
    assert "403" in (status["pause_reason"] or "")
    assert hostile.count("POST", r"/fal-ai/.*") == 0  # nothing submitted while the account is refused
    with db.session_scope(engine) as session:
        assert store.get_batch(session, batch_id).state == BatchState.PAUSED


# ---------------------------------------------------------------- the key stays home (item 14)


def test_foreign_urls_in_a_submit_answer_never_get_the_key(
    engine: Engine, hostile: HostileProvider, evil: HostileProvider
) -> None:
    accepted(hostile, urls_on=evil.url)
    hostile.route("GET", rf"{REQUESTS}/status", json_reply({"status": "IN_QUEUE", "queue_position": 0}, 202))
    hostile.route("PUT", rf"{REQUESTS}/cancel", json_reply({"status": "CANCELLATION_REQUESTED"}, 202))
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    try:
        batch_id, job_id = one_job(engine, rt)
        assert submit(rt, job_id) == "submitted"
        poll_due(rt)
        with db.session_scope(engine) as session:
            store.set_batch_state(session, batch_id, BatchState.CANCELLED)
        assert cancel_jobs_of_cancelled_batches(rt) == 1
    finally:
        rt.client.close()
    assert [r for r in evil.requests if "authorization" in r.headers] == []
    assert evil.requests == []
    assert hostile.count("GET", rf"{REQUESTS}/status") == 1
    assert hostile.count("PUT", rf"{REQUESTS}/cancel") == 1
    assert all(r.headers.get("authorization") == f"Key {KEY}" for r in hostile.requests)
    stored = job(engine, job_id)
    assert stored.status_url == f"{hostile.url}/{T2V}/requests/{RID}/status"
    assert stored.state == S.CANCELLING


def test_stored_foreign_urls_are_not_followed(
    engine: Engine, hostile: HostileProvider, evil: HostileProvider
) -> None:
    hostile.route("GET", rf"{REQUESTS}/status", json_reply({"status": "IN_PROGRESS"}, 202))
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    batch_id = add_batch(engine, "old-row", [(T2V, {"prompt": "p"})])
    job_id = _only_job(engine, batch_id)
    base = f"{evil.url}/{T2V}/requests/{RID}"
    with db.session_scope(engine) as session:  # a row written before URLs were checked
        store.transition(session, job_id, S.PENDING, S.SUBMITTING)
        store.transition(
            session, job_id, S.SUBMITTING, S.QUEUED, request_id=RID, submitted_at=utcnow(),
            status_url=f"{base}/status", response_url=base, cancel_url=f"{base}/cancel",
        )  # fmt: skip
    try:
        assert poll(rt) == 1
    finally:
        rt.client.close()
    assert evil.requests == []
    assert hostile.count("GET", rf"{REQUESTS}/status") == 1
    assert job(engine, job_id).state == S.RUNNING


# ------------------------------------------------- distributed: whose key sent it, who was refused

OTHER_KEY = "0a1b2c3d-4e5f-4a6b-8c7d-9e8f0a1b2c3d:ffeeddccbbaa99887766554433221100"


def test_a_job_records_the_key_its_post_went_with_not_the_dispatchers(
    engine: Engine, hostile: HostileProvider
) -> None:
    """Distributed: the tick leader dispatches, another worker sends. The job's ``api_key_id``
    (per-key caps and accounting) is the key of the POST, the sending worker's."""
    accepted(hostile)
    leader = make_runtime(engine, settings_for(hostile.url, KEY))
    sender = make_runtime(engine, settings_for(hostile.url, OTHER_KEY))
    try:
        _, job_id = one_job(engine, leader)
        assert job(engine, job_id).api_key_id == api_key_id(leader.settings)  # dispatch's, for now
        assert submit(sender, job_id) == "submitted"
    finally:
        leader.client.close()
        sender.client.close()
    assert job(engine, job_id).api_key_id == api_key_id(sender.settings)
    assert api_key_id(sender.settings) != api_key_id(leader.settings)


def test_a_rejected_key_pause_names_the_worker_and_its_key_id(
    engine: Engine, hostile: HostileProvider
) -> None:
    """A worker with a wrong FAL_KEY pauses the batch: the reason says which worker (host:pid)
    and which key id, so the operator finds that worker rather than doubt a good key."""
    hostile.route("POST", rf"/{T2V}", json_reply({"detail": "Invalid API key"}, 401))
    rt = make_runtime(engine, settings_for(hostile.url, OTHER_KEY))
    try:
        batch_id, job_id = one_job(engine, rt)
        assert submit(rt, job_id) == "account-locked"
    finally:
        rt.client.close()
    reason = report(engine, batch_id)["pause_reason"] or ""
    assert "401" in reason
    assert f"{socket.gethostname()}:{os.getpid()}" in reason
    assert f"key id {api_key_id(rt.settings)}" in reason
