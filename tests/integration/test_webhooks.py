"""fal's webhooks end to end: verification, the inbox, applying deliveries, ambiguous submits.

Deliveries are signed by the simulator's own :class:`falsim.webhooks.WebhookSigner`; the JWKS is
served over real loopback HTTP. The receiver is the real Starlette app (``web.app``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from click.testing import CliRunner
from sqlalchemy import Engine, func, inspect, select, text, update
from starlette.testclient import TestClient

from cli import cli
from cli.output import money_line
from falsim import SimulatorHandle, SimulatorOptions, running_simulator
from falsim.faults import FaultRule
from falsim.webhooks import WebhookSigner, webhook_body
from jobs import db, store
from jobs.batches import batch_report
from jobs.billing import Outcome, billed
from jobs.cost import cost_report
from jobs.errors import RetryableProviderError
from jobs.models import BatchState, Job, WebhookDelivery, utcnow
from jobs.rerun import NothingToRerun, rerun_batch
from jobs.settings import Settings, get_settings
from jobs.states import JobState
from tests.conftest import _admin_execute
from tests.step_runtime import add_batch, make_runtime, settings_for, wait_until
from web.app import DELIVERY_NOT_STORABLE, MAX_BODY_BYTES, create_app
from worker.fal.models import Status
from worker.fal.webhooks import JwksKeys, JwksUnavailable, signed_message
from worker.notifications import EventListener
from worker.running import process_batch
from worker.steps import Runtime, dispatch, download, poll, submit, webhooks
from worker.steps.accounts import signed_by_us, signer_of
from worker.steps.context import handle_of
from worker.steps.failures import cost_of_failure, settle, settle_unknown_submit
from worker.steps.poll import _next_poll, first_poll_at, record_completion
from worker.steps.schedule import WINDOW_CLOSED, end_unstarted
from worker.steps.submit import webhook_for
from worker.steps.webhooks import (
    ADOPTED_BEFORE_RESEND,
    ADOPTED_CANCELLED,
    ADOPTED_EARLIER,
    ADOPTED_LATE,
    ADOPTED_OWN,
    ADOPTED_RESTORED,
    ADOPTED_UNKNOWN_CANCELLED,
    ADOPTED_WINDOW,
    DEFERRED,
    FOREIGN,
    PRUNE_EVERY,
    STATUS_DUE,
    Inbox,
    apply_delivery,
    apply_pending,
    binding_token,
    database_fingerprint,
    prune_applied,
    webhook_secret,
)

S = JobState
HOOK_URL = "https://hooks.example.test/webhooks/fal"
RESULT = {"video": {"url": "https://v3.fal.media/files/x/out.mp4"}, "seed": 7}
#: What ``/healthz`` adds while the receiver holds the signer's one key.
VERIFIES = {"can_verify_signatures": True, "signing_keys": 1, "signing_keys_error": None}


def _serves(engine: Engine) -> dict[str, Any]:
    """What ``/healthz`` says of the database it serves: ``engine``'s fingerprint (writable)."""
    return {
        "database": database_fingerprint(webhook_secret(engine)),
        "database_error": None,
        "database_read_only": False,
    }


class JwksServer:
    """A loopback HTTP server publishing a JWKS (``doc``, changeable) or failing (``status``)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                payload = json.dumps(outer.doc).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/.well-known/jwks.json"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def signer() -> WebhookSigner:
    return WebhookSigner()


@pytest.fixture
def jwks(signer: WebhookSigner) -> Iterator[JwksServer]:
    server = JwksServer(signer.jwks())
    yield server
    server.close()


@pytest.fixture
def settings(jwks: JwksServer) -> Settings:
    return settings_for("http://127.0.0.1:9", "test-key", webhook_jwks_url=jwks.url)


@pytest.fixture
def client(engine: Engine, settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=engine)) as test_client:
        yield test_client


def _job(engine: Engine, batch_id: str) -> Job:
    with db.session_scope(engine) as session:
        job = next(store.jobs_of_batch(session, batch_id))
        session.expunge(job)
        return job


def _sent(
    engine: Engine, *, request_id: str | None, unknown: bool = False, name: str = "hooks", key: str = "k"
) -> Job:
    """One job, attempt 1 POSTed with API key id ``key``: ``queued`` as ``request_id``, or its
    answer not stored yet (``submitting``, input recorded), or ``submit_unknown`` when
    ``unknown``; in batch ``name``."""
    batch_id = add_batch(engine, name, [("fal-ai/wan-22", {"prompt": "a cat"})])
    job = _job(engine, batch_id)
    now = utcnow()
    with db.session_scope(engine) as session:
        fence = store.Fence.of(job, "test-worker")
        assert store.mark_submitting(
            session, fence, attempt=1, api_key_id=key, lease_expires_at=now + timedelta(seconds=60)
        )
        submitting = store.Fence(job.id, S.SUBMITTING, job.version + 1, "test-worker")
        taken = store.take_lease(
            session, submitting, now=now, lease_seconds=60, submitted_input={"prompt": "a cat"}
        )
        assert taken is not None
        if request_id is not None:
            assert store.mark_submitted(
                session, taken, running=False, request_id=request_id, gateway_request_id=None,
                status_url=None, response_url=None, cancel_url=None, submitted_at=now, next_poll_at=now,
            )  # fmt: skip
        elif unknown:
            assert store.mark_submit_unknown(session, taken, why="reset", due_at=now + timedelta(hours=1))
    return _job(engine, batch_id)


def _post(
    client: TestClient,
    signer: WebhookSigner,
    job: Job,
    request_id: str,
    *,
    attempt: int = 1,
    ok: bool = True,
    skew: float = 0.0,
    tamper: bool = False,
) -> int:
    body = webhook_body(request_id, request_id, ok, RESULT if ok else {"detail": "boom"}, None if ok else "x")
    headers = signer.headers(request_id, "user-1", body, skew=skew)
    if tamper:
        body = body.replace(b'"seed": 7', b'"seed": 8')
    params = hook_params(client.app.state.inbox.engine, job.id, attempt)  # type: ignore[attr-defined]
    response = client.post("/webhooks/fal", params=params, content=body, headers=headers)
    return int(response.status_code)


def hook_params(engine: Engine, job_id: str, attempt: int) -> dict[str, str]:
    """The query of the ``fal_webhook`` URL our submit of ``job_id``'s ``attempt`` gives fal."""
    url = webhook_for(settings_for("http://127.0.0.1:9", "k", webhook_url=HOOK_URL), engine, job_id, attempt)
    assert url is not None
    return dict(httpx.URL(url).params)


def _deliveries(engine: Engine) -> dict[str, int]:
    with db.session_scope(engine) as session:
        return store.delivery_counts(session)


def test_a_valid_delivery_completes_the_job(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    job = _sent(engine, request_id="req-1")
    assert _post(client, signer, job, "req-1") == 200
    after = _job(engine, job.batch_id)
    assert after.state == S.DOWNLOADING
    assert after.lease_owner is None  # no runtime here: the tick's schedule_downloads takes it
    assert _deliveries(engine) == {"stored": 1, "repeats": 0, "unprocessed": 0, "ignored": 0}
    assert client.get("/healthz").json() == {
        "ok": True,
        "accepted": 1,
        "rejected": 0,
        "misrouted": 0,
        **VERIFIES,
        **_serves(engine),
    }


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_applied_delivery_wakes_the_tick_leader_in_another_process(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    job = _sent(engine, request_id="req-1")
    with EventListener(engine.url.render_as_string(hide_password=False)) as listener:
        assert _post(client, signer, job, "req-1") == 200
        assert _post(client, signer, job, "req-1") == 200  # a repeat moves nothing: no notice
        with db.session_scope(engine) as session:
            db.notify_events(session, "marker:end")  # everything sent before it arrives first
        heard: list[str] = []
        while "marker:end" not in heard:
            more = listener.wait(10.0)
            assert more, f"only {heard} arrived"
            heard += more
    assert heard == [f"webhook:{job.id}", "marker:end"]


def test_forged_stale_and_tampered_deliveries_change_nothing(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    job = _sent(engine, request_id="req-1")
    assert _post(client, WebhookSigner(), job, "req-1") == 401  # another key
    assert _post(client, signer, job, "req-1", tamper=True) == 401
    assert _post(client, signer, job, "req-1", skew=-301) == 401
    assert _post(client, signer, job, "req-1", skew=400) == 401
    unsigned = client.post("/webhooks/fal", params={"job_id": job.id}, content=b"{}")
    assert unsigned.status_code == 401
    after = _job(engine, job.batch_id)
    assert (after.state, after.version) == (job.state, job.version)
    assert _deliveries(engine)["stored"] == 0
    assert client.get("/healthz").json()["rejected"] == 5


@pytest.mark.parametrize("ok", [True, False])
def test_a_delivery_holding_what_jsonb_cannot_is_stored_and_applied(
    engine: Engine, client: TestClient, signer: WebhookSigner, ok: bool
) -> None:
    """``\\u0000``, lone surrogates and ``NaN`` are valid to Python's ``json`` but refused by
    PostgreSQL's ``jsonb`` (on every try: it was answered 503 "database unavailable", so fal
    retried in vain and the lost submit it proved failed). Stored with U+FFFD (null for NaN),
    on both databases alike, and applied: here the proof of a lost submit."""
    job = _sent(engine, request_id=None, unknown=True)
    payload = {"a": "x\x00y", "b\ud800": ["\udfff", float("nan")], "detail": "boom"}
    body = webhook_body("req-nul", "req-nul", ok, payload, None if ok else "failed\x00 here")
    assert all(escape in body for escape in (b"\\u0000", b"\\ud800", b"\\udfff", b"NaN"))  # as sent
    headers = signer.headers("req-nul", "user-1", body)
    response = client.post(
        "/webhooks/fal", params=hook_params(engine, job.id, 1), content=body, headers=headers
    )
    assert (response.status_code, response.json()) == (200, {"ok": True})
    after = _job(engine, job.batch_id)
    # Adopted: the submit was lost. A failure waits for fal's status (its metrics decide the bill).
    assert (after.state, after.request_id) == (S.DOWNLOADING if ok else S.QUEUED, "req-nul")
    with db.session_scope(engine) as session:
        (stored,) = session.execute(text("SELECT body FROM webhook_deliveries")).scalars()
    stored = json.loads(stored) if isinstance(stored, str) else stored
    assert stored["payload"] == {"a": "x\ufffdy", "b\ufffd": ["\ufffd", None], "detail": "boom"}
    assert stored["error"] == (None if ok else "failed\ufffd here")
    assert _deliveries(engine) == {"stored": 1, "repeats": 0, "unprocessed": 0, "ignored": 0}


def test_a_delivery_with_numbers_no_database_holds_is_stored_with_them_null(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    """An integer of 5,000 digits (which Python's json refuses to convert: the delivery was
    refused as "not a fal webhook", 400, on every try) and ``1e999`` (read as infinity) in a
    signed body: stored as null and applied."""
    job = _sent(engine, request_id="req-1")
    body = webhook_body("req-1", "req-1", True, {"seed": "@huge@", "t": "@inf@"}, None)
    body = body.replace(b'"@huge@"', b"9" * 5000).replace(b'"@inf@"', b"1e999")
    headers = signer.headers("req-1", "user-1", body)
    params = hook_params(engine, job.id, 1)
    response = client.post("/webhooks/fal", params=params, content=body, headers=headers)
    assert (response.status_code, response.json()) == (200, {"ok": True})
    assert _job(engine, job.batch_id).state == S.DOWNLOADING
    with db.session_scope(engine) as session:
        (stored,) = session.execute(text("SELECT body FROM webhook_deliveries")).scalars()
    stored = json.loads(stored) if isinstance(stored, str) else stored
    assert stored["payload"] == {"seed": None, "t": None}


def test_a_delivery_the_database_refuses_is_not_called_database_unavailable(
    engine: Engine, client: TestClient, signer: WebhookSigner, caplog: pytest.LogCaptureFixture
) -> None:
    """A data error is no outage: fal is told what it is (4xx: retrying the same body cannot
    help), and the log line says what the database said."""
    job = _sent(engine, request_id="req-1")
    request_id = "r" * 300  # signed by fal, but longer than the inbox's request_id column holds
    body = webhook_body(request_id, "g", True, RESULT, None)
    headers = signer.headers(request_id, "user-1", body)
    with caplog.at_level(logging.WARNING, logger="web.app"):
        response = client.post(
            "/webhooks/fal", params=hook_params(engine, job.id, 1), content=body, headers=headers
        )
    if engine.dialect.name == "sqlite":  # SQLite keeps any length: nothing to refuse
        assert response.status_code == 200
        return
    assert response.status_code == 422
    assert response.json()["error"] == DELIVERY_NOT_STORABLE
    assert "unavailable" not in response.json()["error"]
    assert "value too long" in caplog.text
    assert _deliveries(engine)["stored"] == 0
    assert client.get("/healthz").json()["rejected"] == 1


def test_a_body_whose_request_id_differs_from_the_signed_one_is_refused(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    job = _sent(engine, request_id="req-1")
    body = webhook_body("req-other", "g", True, RESULT, None)
    response = client.post(
        "/webhooks/fal", params={"job_id": job.id}, content=body, headers=signer.headers("req-1", "u", body)
    )
    assert response.status_code == 400
    assert _job(engine, job.batch_id).version == job.version


def test_a_repeated_delivery_is_stored_and_applied_once(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    job = _sent(engine, request_id="req-1")
    for _ in range(3):
        assert _post(client, signer, job, "req-1") == 200
    assert _deliveries(engine) == {"stored": 1, "repeats": 2, "unprocessed": 0, "ignored": 0}
    with db.session_scope(engine) as session:
        moves = [e.to_state for e in store.job_events(session, job.id)]
    assert moves.count(S.DOWNLOADING) == 1


def test_a_webhook_before_the_submit_answer_was_stored_adopts_the_request(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    job = _sent(engine, request_id=None)
    assert job.state == S.SUBMITTING
    assert _post(client, signer, job, "req-early") == 200
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id) == (S.DOWNLOADING, "req-early")
    # The submit's answer arrives afterwards: its compare-and-set loses, and the ids agree.
    with db.session_scope(engine) as session:
        stale = store.Fence(job.id, S.SUBMITTING, job.version, "test-worker")
        now = utcnow()
        assert not store.mark_submitted(
            session, stale, running=False, request_id="req-early", gateway_request_id=None,
            status_url=None, response_url=None, cancel_url=None, submitted_at=now, next_poll_at=now,
        )  # fmt: skip


def test_an_ambiguous_submit_is_resolved_by_its_webhook(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    job = _sent(engine, request_id=None, unknown=True)
    assert job.state == S.SUBMIT_UNKNOWN
    assert _post(client, signer, job, "req-proof", attempt=2) == 200  # not this attempt's: no proof
    assert _job(engine, job.batch_id).state == S.SUBMIT_UNKNOWN
    assert _post(client, signer, job, "req-proof2") == 200
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.attempts) == (S.DOWNLOADING, "req-proof2", 1)


@pytest.mark.parametrize(("gateway", "kept"), [("gw-1", "gw-1"), ("gw/../x", None), ("test-key", None)])
def test_an_adopted_request_keeps_its_gateway_request_id_only_in_a_request_id_s_shape(
    engine: Engine, client: TestClient, signer: WebhookSigner, gateway: str, kept: str | None
) -> None:
    job = _sent(engine, request_id=None, unknown=True)
    body = webhook_body("req-proof", gateway, True, RESULT, None)  # "test-key": the receiver's key
    headers = signer.headers("req-proof", "user-1", body)
    params = hook_params(engine, job.id, 1)
    assert client.post("/webhooks/fal", params=params, content=body, headers=headers).status_code == 200
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.gateway_request_id) == (S.DOWNLOADING, "req-proof", kept)


def test_a_receiver_without_the_key_masks_a_key_of_fal_s_shape_echoed_bare(
    engine: Engine, jwks: JwksServer, signer: WebhookSigner
) -> None:
    echoed = "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c:00ff11ee22dd33cc44bb55aa66998877"  # some fal key
    keyless = settings_for("http://127.0.0.1:9", "", webhook_jwks_url=jwks.url)
    assert keyless.fal_key is None  # the receiver needs none
    job = _sent(engine, request_id="req-1")
    body = webhook_body("req-1", "req-1", False, {"detail": f"upstream said: {echoed}"}, f"refused {echoed}")
    with TestClient(create_app(keyless, engine=engine)) as client:
        response = client.post(
            "/webhooks/fal",
            params=hook_params(engine, job.id, 1),
            content=body,
            headers=signer.headers("req-1", "user-1", body),
        )
    assert response.status_code == 200
    # Applied: a failure waits for fal's status (whether it ran decides its bill), asked at once.
    after = _job(engine, job.batch_id)
    assert (after.state, after.version) == (S.QUEUED, job.version)
    assert after.next_attempt_at is not None
    assert after.next_attempt_at <= utcnow()
    with db.read_scope(engine) as session:
        assert session.scalar(select(WebhookDelivery.outcome)) == STATUS_DUE
    with engine.connect() as conn:
        stored = "\n".join(
            str(list(conn.execute(text(f'SELECT * FROM "{table}"'))))
            for table in inspect(conn).get_table_names()
        )
    assert "refused ***" in stored
    assert echoed.split(":")[1] not in stored


def test_a_second_request_for_one_attempt_is_a_confirmed_duplicate_charge(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    job = _sent(engine, request_id="req-1")
    assert _post(client, signer, job, "req-2") == 200
    assert _post(client, signer, job, "req-2", ok=False) == 200  # another body of it: counted once
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.confirmed_duplicate_charges) == (S.QUEUED, "req-1", 1)
    with db.session_scope(engine) as session:
        assert batch_report(session, job.batch_id)["confirmed_duplicate_charges"] == 1


def _succeeded(engine: Engine, request_id: str) -> Job:
    """One job whose request ``request_id`` fal finished and whose video was saved, billed its
    estimate (as the download step bills a success)."""
    job = _sent(engine, request_id=request_id)
    with db.session_scope(engine) as session:
        completed = store.mark_completed(
            session, store.Fence.of(job, "test-worker"), completed_at=utcnow(), provider_metrics=None
        )
        assert completed
        done = store.get_job(session, job.id)
        assert store.mark_succeeded(
            session,
            store.Fence.of(done, "test-worker"),
            output_path="out.mp4",
            output_sha256="0" * 64,
            output_bytes=1,
            **billed(Outcome.SUCCEEDED, done.est_billing_units, done.est_usd),
        )
    return _job(engine, job.batch_id)


def _outcomes(engine: Engine, request_id: str) -> list[str | None]:
    """What applying each stored delivery of ``request_id`` did, in the order received."""
    with db.read_scope(engine) as session:
        found = select(WebhookDelivery.outcome).where(WebhookDelivery.request_id == request_id)
        return list(session.scalars(found.order_by(WebhookDelivery.id)))


def test_a_proof_of_an_extra_request_after_the_job_succeeded_is_billed_once_and_on_its_history(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    """fal retries a webhook for two hours: the proof that it ran a request besides the job's
    own often comes after the job finished. It is a confirmed duplicate charge all the same,
    put on the job's history and billed in its actual (and wasted) cost, once however often
    (and in whatever body) it is delivered."""
    job = _succeeded(engine, "req-1")
    assert (job.state, job.actual_usd, job.confirmed_duplicate_charges) == (S.SUCCEEDED, job.est_usd, 0)
    assert _post(client, signer, job, "req-2") == 200
    assert _post(client, signer, job, "req-2") == 200  # the very same body again
    assert _post(client, signer, job, "req-2", ok=False) == 200  # another body of the same request
    assert _post(client, signer, job, "req-1") == 200  # the job's own request: nothing to do
    assert _outcomes(engine, "req-2") == ["duplicate-charge", "ignored: duplicate charge already counted"]
    assert _outcomes(engine, "req-1") == ["ignored: job already succeeded"]

    after = _job(engine, job.batch_id)
    assert (after.state, after.version, after.request_id) == (S.SUCCEEDED, job.version, "req-1")
    assert after.confirmed_duplicate_charges == 1
    assert after.actual_usd == 2 * job.est_usd
    assert after.actual_billing_units == 2 * job.est_billing_units
    with db.session_scope(engine) as session:
        notes = [e for e in store.job_events(session, job.id) if "accepted as req-2" in (e.reason or "")]
        report = batch_report(session, job.batch_id)
        cost = cost_report(session, job.batch_id).total
        # The finished jobs' running totals (what budget checks read) moved with the job.
        assert (
            store.batch_spent_usd(session, job.batch_id) == store.batch_money(session, job.batch_id).spent_usd
        )
    assert [(n.from_state, n.to_state) for n in notes] == [(S.SUCCEEDED, S.SUCCEEDED)]
    assert report["confirmed_duplicate_charges"] == 1
    assert Decimal(str(report["spent_usd"])) == 2 * job.est_usd
    assert (cost.actual_usd, cost.wasted_usd) == (2 * job.est_usd, job.est_usd)
    assert cost.possibly_billed_usd == 0
    assert cost.confirmed_duplicate_charges == 1


def test_a_proof_for_a_job_being_downloaded_waits_for_the_download_to_bill_the_job(
    engine: Engine, client: TestClient, settings: Settings, signer: WebhookSigner
) -> None:
    """A download bills the job from what it read when it took the job: a proof applied meanwhile
    would be overwritten by it. It waits in the inbox, and the tick applies it afterwards."""
    job = _sent(engine, request_id="req-1")
    with db.session_scope(engine) as session:
        assert store.mark_completed(
            session,
            store.Fence.of(job, "test-worker"),
            completed_at=utcnow(),
            provider_metrics=None,
            lease_owner="downloader",
            lease_expires_at=utcnow() + timedelta(minutes=5),
        )
        claimed = store.get_job(session, job.id)
        session.expunge(claimed)
    assert _post(client, signer, job, "req-2") == 200
    assert _outcomes(engine, "req-2") == [DEFERRED]
    with db.session_scope(engine) as session:  # the download ends, billing what it read
        assert store.mark_succeeded(
            session,
            store.Fence.of(claimed, "downloader"),
            output_path="out.mp4",
            output_sha256="0" * 64,
            output_bytes=1,
            **billed(
                Outcome.SUCCEEDED, claimed.est_billing_units, claimed.est_usd, prior_usd=claimed.actual_usd
            ),
        )
    with db.read_scope(engine) as session:
        (pending,) = store.unprocessed_deliveries(session)
    assert apply_delivery(Inbox(engine, settings), pending) == "duplicate-charge"
    after = _job(engine, job.batch_id)
    assert (after.state, after.confirmed_duplicate_charges) == (S.SUCCEEDED, 1)
    assert after.actual_usd == 2 * job.est_usd


def _failed_for_unknown_outcome(engine: Engine) -> Job:
    """One job whose attempt 1 went out and whose answer was lost, failed by
    ``WANBATCH_SUBMIT_UNKNOWN_POLICY=fail`` once no webhook proved it within the deadline (as
    :func:`worker.steps.failures.settle_unknown_submit` fails it): its estimate possibly billed."""
    job = _sent(engine, request_id=None, unknown=True)
    with db.session_scope(engine) as session:
        assert store.fail_job(
            session,
            store.Fence.of(job, "reconciler"),
            reason="submission outcome unknown: no webhook proved it within WANBATCH_SUBMIT_UNKNOWN_DEADLINE",
            error="submission outcome unknown (…): fal may have accepted (and billed) it",
            error_type="submit_unknown",
        )
    return _job(engine, job.batch_id)


def _money_agrees(engine: Engine, batch_id: str) -> Decimal:
    """The batch's spent money, once the running totals (what budgets read) agree with the jobs."""
    with db.read_scope(engine) as session:
        spent = store.batch_money(session, batch_id).spent_usd
        assert store.batch_spent_usd(session, batch_id) == spent
        return spent


def test_a_proof_after_the_deadline_failed_the_job_brings_its_paid_video_back(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    """The submit's answer was lost and the job failed at the deadline; then fal's webhook proves
    it ran that very request and finished it: fal billed it, so the job adopts the request and
    goes on to fetch its video (from the result the webhook carries), once however often the
    proof comes. Nothing is sent again, no duplicate charge is counted, and the money is counted
    once: what was "possibly billed" is billed."""
    job = _failed_for_unknown_outcome(engine)
    assert (job.state, job.ambiguous_usd, job.request_id) == (S.FAILED, job.est_usd, None)
    assert _money_agrees(engine, job.batch_id) == job.est_usd  # possibly billed, counted as spent

    assert _post(client, signer, job, "req-late") == 200
    assert _post(client, signer, job, "req-late") == 200  # fal's retry of the same delivery
    assert _outcomes(engine, "req-late") == [ADOPTED_LATE]

    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.attempts) == (S.DOWNLOADING, "req-late", 1)
    assert (after.error, after.error_type, after.finished_at) == (None, None, None)
    assert (after.provider_output, after.seed) == (RESULT, 7)  # the download needs no result call
    assert (after.confirmed_duplicate_charges, after.possible_duplicate_charges) == (0, 0)
    assert after.ambiguous_usd == 0
    assert _money_agrees(engine, job.batch_id) == job.est_usd
    with db.session_scope(engine) as session:
        moves = [(e.from_state, e.to_state) for e in store.job_events(session, job.id)]
        reasons = [e.reason or "" for e in store.job_events(session, job.id)]
    assert moves[-2:] == [(S.FAILED, S.QUEUED), (S.QUEUED, S.DOWNLOADING)]
    assert "late proof by webhook" in reasons[-2]
    assert "accepted as req-late" in reasons[-2]

    with db.session_scope(engine) as session:  # the download stores the video, billed once
        done = store.get_job(session, job.id)
        assert store.mark_succeeded(
            session,
            store.Fence.of(done, "downloader"),
            output_path="out.mp4",
            output_sha256="0" * 64,
            output_bytes=1,
            **billed(Outcome.SUCCEEDED, done.est_billing_units, done.est_usd, prior_usd=done.actual_usd),
        )
    finished = _job(engine, job.batch_id)
    assert (finished.state, finished.actual_usd) == (S.SUCCEEDED, job.est_usd)
    assert finished.ambiguous_usd == 0
    assert _money_agrees(engine, job.batch_id) == job.est_usd
    assert _post(client, signer, job, "req-late", ok=False) == 200  # another body, afterwards
    assert _job(engine, job.batch_id).version == finished.version
    with db.session_scope(engine) as session:
        cost = cost_report(session, job.batch_id).total
        report = batch_report(session, job.batch_id)
    assert cost.actual_usd == job.est_usd
    assert cost.wasted_usd == cost.possibly_billed_usd == 0
    assert (report["confirmed_duplicate_charges"], report["counts"]["succeeded"]) == (0, 1)


def _resend_waiting(engine: Engine, where: str) -> tuple[Job, store.Fence | None]:
    """One job whose attempt 1's answer was lost, sent again by ``WANBATCH_SUBMIT_UNKNOWN_POLICY=
    resubmit`` (as :func:`worker.steps.failures.settle_unknown_submit` decides it), its resend
    not gone out: ``waiting`` in ``retry_wait``, ``given back`` unsent to ``pending`` (a submit
    rate held it back), ``claimed`` by a submit step (``submitting`` attempt 2, its POST not
    recorded as sent: the fence that step holds is returned), or ``sent`` (its POST recorded as
    sent: out, a genuine second request)."""
    job = _sent(engine, request_id=None, unknown=True)
    now = utcnow()
    held: store.Fence | None = None
    with db.session_scope(engine) as session:
        assert store.retry_later(
            session,
            store.Fence.of(job, "reconciler"),
            reason="outcome unknown: resubmitting (possible duplicate charge)",
            possible_duplicate=True,
        )
        if where != "waiting":
            waiting = store.Fence.of(store.get_job(session, job.id), "sender")
            assert store.mark_submitting(
                session, waiting, attempt=2, api_key_id="k", lease_expires_at=now + timedelta(seconds=60)
            )
            held = store.Fence(job.id, S.SUBMITTING, waiting.version + 1, "sender")
        if where == "given back":
            assert held is not None
            assert store.give_back(session, held, reason="held back by the submit rate")
            held = None
        elif where == "sent":
            assert held is not None
            held = store.record_send(
                session,
                held,
                now=now,
                lease_seconds=60,
                submitted_input={"prompt": "a cat"},
                sent_at=now,
                api_key_id="k",
            )
            assert held is not None
    return _job(engine, job.batch_id), held


@pytest.mark.parametrize("where", ["waiting", "given back", "claimed"])
def test_a_proof_before_the_resend_went_out_is_kept_and_nothing_is_resent(
    engine: Engine, client: TestClient, signer: WebhookSigner, where: str
) -> None:
    """``resubmit`` decided to send the job again, and before the resend goes out fal's webhook
    proves it ran the first attempt: the job keeps that request (its video fetched from the
    webhook's result) and the resend is dropped — one request paid, counted once (before: the
    resend went out all the same, a second paid request, and the proof counted as a confirmed
    duplicate charge)."""
    job, claimed = _resend_waiting(engine, where)
    assert (job.request_id, job.resend_attempt, job.ambiguous_usd) == (None, 2, job.est_usd)
    assert _money_agrees(engine, job.batch_id) == job.est_usd  # possibly billed

    assert _post(client, signer, job, "req-first", attempt=1) == 200
    assert _post(client, signer, job, "req-first", attempt=1) == 200  # fal's retry of it
    assert _outcomes(engine, "req-first") == [ADOPTED_BEFORE_RESEND]
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.attempts) == (S.DOWNLOADING, "req-first", 1)
    assert (after.resend_attempt, after.error, after.lease_owner) == (None, None, None)
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (0, 0)
    assert (after.provider_output, after.seed) == (RESULT, 7)
    assert after.ambiguous_usd == 0
    assert _money_agrees(engine, job.batch_id) == job.est_usd  # billed now, not possibly
    with db.session_scope(engine) as session:
        events = store.job_events(session, job.id)
        if claimed is not None:  # the claimed resend's send finds the job moved: nothing goes out
            now = utcnow()
            assert (
                store.record_send(
                    session,
                    claimed,
                    now=now,
                    lease_seconds=60,
                    submitted_input={"prompt": "a cat"},
                    sent_at=now,
                    api_key_id="k",
                )
                is None
            )
    came_from = {"waiting": S.RETRY_WAIT, "given back": S.PENDING, "claimed": S.SUBMITTING}[where]
    assert (events[-2].from_state, events[-2].to_state) == (came_from, S.QUEUED)
    assert "before the resend went out: attempt 1 accepted as req-first" in (events[-2].reason or "")

    with db.session_scope(engine) as session:  # the download stores the video, billed once
        done = store.get_job(session, job.id)
        assert store.mark_succeeded(
            session,
            store.Fence.of(done, "downloader"),
            output_path="out.mp4",
            output_sha256="0" * 64,
            output_bytes=1,
            **billed(Outcome.SUCCEEDED, done.est_billing_units, done.est_usd, prior_usd=done.actual_usd),
        )
        cost = cost_report(session, job.batch_id).total
        report = batch_report(session, job.batch_id)
    assert _money_agrees(engine, job.batch_id) == job.est_usd
    assert (cost.actual_usd, cost.wasted_usd, cost.possibly_billed_usd) == (
        job.est_usd,
        Decimal(0),
        Decimal(0),
    )
    assert (report["possible_duplicate_charges"], report["confirmed_duplicate_charges"]) == (0, 0)


def test_a_proof_after_the_resend_went_out_is_a_duplicate_charge(
    engine: Engine, client: TestClient, settings: Settings, signer: WebhookSigner
) -> None:
    """Once the resend's POST is out, fal may run both: the proof of the first attempt is the
    confirmed duplicate charge it always was (applied when the sender lets go of the job)."""
    job, sending = _resend_waiting(engine, "sent")
    assert sending is not None
    assert _post(client, signer, job, "req-first", attempt=1) == 200
    assert _outcomes(engine, "req-first") == [DEFERRED]  # the sender holds the job
    with db.session_scope(engine) as session:
        now = utcnow()
        assert store.mark_submitted(
            session, sending, running=False, request_id="req-second", gateway_request_id=None,
            status_url=None, response_url=None, cancel_url=None, submitted_at=now, next_poll_at=now,
        )  # fmt: skip
        (pending,) = store.unprocessed_deliveries(session)
    assert apply_delivery(Inbox(engine, settings), pending) == "duplicate-charge"
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.attempts) == (S.QUEUED, "req-second", 2)
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (1, 1)


def _resend_unknown_too(engine: Engine, where: str) -> Job:
    """One job whose attempt 1's answer was lost, resent by ``resubmit`` as attempt 2, whose
    answer was lost too: ``submit_unknown`` at attempt 2, no request kept; or, past the deadline,
    ``resubmit`` decided to send it a third time (``retry_wait``), or ``fail`` failed it."""
    job, sending = _resend_waiting(engine, "sent")
    assert sending is not None
    with db.session_scope(engine) as session:
        assert store.mark_submit_unknown(
            session, sending, why="reset again", due_at=utcnow() + timedelta(hours=1)
        )
        unknown = store.Fence.of(store.get_job(session, job.id), "reconciler")
        if where == "resend decided":
            assert store.retry_later(session, unknown, reason="resubmitting", possible_duplicate=True)
        elif where == "failed":
            assert store.fail_job(
                session, unknown, error="submission outcome unknown", error_type=store.SUBMIT_UNKNOWN_ERROR
            )
    return _job(engine, job.batch_id)


def _succeed(engine: Engine, job_id: str) -> None:
    """The download stores the video of a job fal finished, billed as the download bills it."""
    with db.session_scope(engine) as session:
        done = store.get_job(session, job_id)
        assert done.state == S.DOWNLOADING
        assert store.mark_succeeded(
            session,
            store.Fence.of(done, "downloader"),
            output_path="out.mp4",
            output_sha256="0" * 64,
            output_bytes=1,
            **billed(Outcome.SUCCEEDED, done.est_billing_units, done.est_usd, prior_usd=done.actual_usd),
        )


@pytest.mark.parametrize("where", ["submit_unknown", "resend decided", "failed"])
def test_a_proof_of_an_earlier_attempt_is_kept_when_the_later_one_s_answer_was_lost_too(
    engine: Engine, client: TestClient, signer: WebhookSigner, where: str
) -> None:
    """Attempt 1's answer was lost, its resend (attempt 2) went out and its answer was lost too;
    then fal's webhook proves it ran attempt 1 and finished it. fal billed that one: the job
    keeps it and its video (from the webhook's result) and sends nothing more (before: counted
    as a confirmed duplicate charge, the paid video left in the inbox, and the deadline sent the
    job a third time or failed it). Attempt 2 stays a *possible* duplicate charge, until its own
    proof comes: then a confirmed one."""
    job = _resend_unknown_too(engine, where)
    assert (job.request_id, job.attempts, job.possible_duplicate_charges) == (None, 2, 1)

    assert _post(client, signer, job, "req-first", attempt=1) == 200
    assert _post(client, signer, job, "req-first", attempt=1) == 200  # fal's retry of it
    expected = ADOPTED_LATE if where == "failed" else ADOPTED_EARLIER
    assert _outcomes(engine, "req-first") == [expected]
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.attempts) == (S.DOWNLOADING, "req-first", 2)
    assert (after.error, after.error_type, after.lease_owner) == (None, None, None)
    assert (after.provider_output, after.seed) == (RESULT, 7)
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (1, 0)
    assert after.ambiguous_usd == job.est_usd  # attempt 2: possibly billed
    assert _money_agrees(engine, job.batch_id) == 2 * job.est_usd
    with db.session_scope(engine) as session:
        reasons = [e.reason or "" for e in store.job_events(session, job.id)]
    assert any("attempt 1 accepted as req-first" in r for r in reasons)

    _succeed(engine, job.id)
    finished = _job(engine, job.batch_id)
    assert (finished.state, finished.actual_usd, finished.ambiguous_usd) == (
        S.SUCCEEDED,
        job.est_usd,
        job.est_usd,
    )
    assert _money_agrees(engine, job.batch_id) == 2 * job.est_usd

    assert _post(client, signer, job, "req-second", attempt=2) == 200  # attempt 2 proved too
    assert _outcomes(engine, "req-second") == ["duplicate-charge"]
    proved = _job(engine, job.batch_id)
    assert (proved.possible_duplicate_charges, proved.confirmed_duplicate_charges) == (1, 1)
    assert (proved.actual_usd, proved.ambiguous_usd) == (2 * job.est_usd, Decimal(0))
    assert _money_agrees(engine, job.batch_id) == 2 * job.est_usd


def _resend_ended(engine: Engine, settings: Settings, where: str) -> tuple[Job, store.Fence | None]:
    """One job whose attempt 1's answer was lost, resent by ``resubmit`` as attempt 2, which fal
    accepted as ``req-second`` and then ended without a video, so the job waits to be sent yet
    again, keeping ``req-second`` (ended) as its request id: ``retry_wait`` after fal failed it
    retryably (a runner that died, a 503: unbilled), as the download step settles fal's verdict;
    ``pending`` after the batch's window closed and fal cancelled it in its queue; ``claimed``:
    the retry claimed by a submit step (``submitting`` attempt 3, its POST not recorded as sent:
    the fence that step holds is returned)."""
    job, sending = _resend_waiting(engine, "sent")
    assert sending is not None
    now = utcnow()
    held: store.Fence | None = None
    with db.session_scope(engine) as session:
        assert store.mark_submitted(
            session, sending, running=False, request_id="req-second", gateway_request_id=None,
            status_url=None, response_url=None, cancel_url=None, submitted_at=now, next_poll_at=now,
        )  # fmt: skip
        at_fal = store.get_job(session, job.id)
        if where == "pending":
            assert store.mark_cancelling(
                session, store.Fence.of(at_fal, "scheduler"), reason="window closed", error_type=WINDOW_CLOSED
            )
            cancelling = store.get_job(session, job.id)
            status = Status(state="COMPLETED", error_type="client_cancelled")
            assert end_unstarted(
                session, store.Fence.of(cancelling, "poller"), cancelling, status,
                why=WINDOW_CLOSED, how="cancelled at fal (client_cancelled)", now=now,
            )  # fmt: skip
        else:
            status = Status(state="COMPLETED", error="runner died", raw={"status": "ERROR"})
            assert record_completion(session, store.Fence.of(at_fal, "poller"), status, now=now) is False
            fetching = store.get_job(session, job.id)
            assert fetching.state == S.DOWNLOADING
            exc = RetryableProviderError("runner died", status_code=503)
            settle(session, make_runtime(engine, settings), store.Fence.of(fetching, "downloader"), exc,
                   **cost_of_failure(fetching, exc))  # fmt: skip
        if where == "claimed":
            waiting = store.Fence.of(store.get_job(session, job.id), "sender")
            assert store.mark_submitting(
                session, waiting, attempt=3, api_key_id="k", lease_expires_at=now + timedelta(seconds=60)
            )
            held = store.Fence(job.id, S.SUBMITTING, waiting.version + 1, "sender")
    return _job(engine, job.batch_id), held


@pytest.mark.parametrize("where", ["retry_wait", "pending", "claimed"])
def test_a_proof_of_an_earlier_attempt_is_kept_when_the_resend_ended_and_waits_to_go_again(
    engine: Engine, client: TestClient, settings: Settings, signer: WebhookSigner, where: str
) -> None:
    """Attempt 1's answer was lost; its resend (attempt 2) went out, fal accepted it and ended it
    without a video; the job waits to be sent a third time, still keeping attempt 2's ended
    request id. Then fal's webhook proves it ran attempt 1 and finished it: the job keeps that
    request and its video, and sends nothing more (before: counted as a confirmed duplicate
    charge, the paid video dropped, and attempt 3 sent and paid for)."""
    job, claimed = _resend_ended(engine, settings, where)
    came_from = {"retry_wait": S.RETRY_WAIT, "pending": S.PENDING, "claimed": S.SUBMITTING}[where]
    assert (job.state, job.request_id, job.resend_attempt) == (came_from, "req-second", 2)
    assert (job.possible_duplicate_charges, job.ambiguous_usd) == (1, job.est_usd)  # attempt 1's

    assert _post(client, signer, job, "req-first", attempt=1) == 200
    assert _post(client, signer, job, "req-first", attempt=1) == 200  # fal's retry of it
    assert _outcomes(engine, "req-first") == [ADOPTED_EARLIER]
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.attempts) == (S.DOWNLOADING, "req-first", 2)
    assert (after.error, after.error_type, after.lease_owner) == (None, None, None)
    assert after.resend_attempt is None  # no resend pending: attempt 3 is never sent
    assert (after.provider_output, after.seed) == (RESULT, 7)
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (1, 0)
    assert after.ambiguous_usd == 0  # attempt 1: billed now, not possibly
    with db.session_scope(engine) as session:
        events = store.job_events(session, job.id)
        if claimed is not None:  # the claimed retry's send finds the job moved: nothing goes out
            now = utcnow()
            assert store.record_send(
                session, claimed, now=now, lease_seconds=60, submitted_input={"prompt": "a cat"},
                sent_at=now, api_key_id="k",
            ) is None  # fmt: skip
    assert (events[-2].from_state, events[-2].to_state) == (came_from, S.QUEUED)
    assert "earlier attempt: attempt 1 accepted as req-first" in (events[-2].reason or "")

    _succeed(engine, job.id)
    finished = _job(engine, job.batch_id)
    assert (finished.state, finished.actual_usd, finished.ambiguous_usd) == (
        S.SUCCEEDED,
        job.est_usd,  # attempt 1's video; attempt 2 ended unbilled
        Decimal(0),
    )
    assert _money_agrees(engine, job.batch_id) == job.est_usd
    assert _post(client, signer, job, "req-second", attempt=2, ok=False) == 200  # its own end, late
    assert _outcomes(engine, "req-second") == ["ignored: an earlier request of the job"]
    assert _job(engine, job.batch_id).confirmed_duplicate_charges == 0


def _restored(engine: Engine, settings: Settings, where: str) -> tuple[Job, store.Fence | None]:
    """One job as a database restored from an older backup holds it, while fal holds a later
    attempt of it sent before the restore: ``pending`` (never sent, per this database),
    ``claimed`` by a dispatcher right now (``submitting`` attempt 1, its POST not recorded as
    sent: the fence that step holds is returned), or ``retry_wait`` (attempt 1 went out as
    ``req-1`` and failed retryably; attempt 2 is to be sent)."""
    if where == "retry_wait":
        job, held = _resend_ended_once(engine, settings), None
        return job, held
    batch_id = add_batch(engine, f"restored-{where}", [("fal-ai/wan-22", {"prompt": "a cat"})])
    job, held = _job(engine, batch_id), None
    if where == "claimed":
        with db.session_scope(engine) as session:
            fence = store.Fence.of(job, "sender")
            assert store.mark_submitting(
                session, fence, attempt=1, api_key_id="k", lease_expires_at=utcnow() + timedelta(seconds=60)
            )
            held = store.Fence(job.id, S.SUBMITTING, fence.version + 1, "sender")
    return _job(engine, batch_id), held


def _resend_ended_once(engine: Engine, settings: Settings) -> Job:
    """One job whose attempt 1 fal accepted as ``req-1`` and failed retryably (unbilled):
    ``retry_wait``, keeping ``req-1`` (ended)."""
    job = _sent(engine, request_id="req-1", name="restored-retry")
    now = utcnow()
    with db.session_scope(engine) as session:
        at_fal = store.get_job(session, job.id)
        status = Status(state="COMPLETED", error="runner died", raw={"status": "ERROR"})
        assert record_completion(session, store.Fence.of(at_fal, "poller"), status, now=now) is False
        fetching = store.get_job(session, job.id)
        exc = RetryableProviderError("runner died", status_code=503)
        settle(session, make_runtime(engine, settings), store.Fence.of(fetching, "downloader"), exc,
               **cost_of_failure(fetching, exc))  # fmt: skip
    return _job(engine, job.batch_id)


@pytest.mark.parametrize("where", ["pending", "claimed", "retry_wait"])
def test_a_proof_of_an_attempt_a_restored_database_never_sent_is_adopted_not_a_duplicate(
    engine: Engine,
    client: TestClient,
    settings: Settings,
    signer: WebhookSigner,
    where: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database was restored from a backup taken before the job's last attempt was sent;
    fal's webhook for that attempt comes late, its token valid (the backup holds the secret). A
    token is minted only for a submit about to be recorded as sent, so the database is behind
    fal: the job adopts the request (its attempts catch up, its video fetched from the result)
    and is never sent again; said once in a warning. Before: "a confirmed duplicate charge
    (billed)", the job left to be sent and billed again."""
    webhooks._restored_said.pop(engine, None)  # said once per process and engine: this test's
    job, claimed = _restored(engine, settings, where)
    came_from = {"pending": S.PENDING, "claimed": S.SUBMITTING, "retry_wait": S.RETRY_WAIT}[where]
    attempt = 2 if where == "retry_wait" else 1
    assert (job.state, job.attempts) == (came_from, attempt if where == "claimed" else attempt - 1)

    with caplog.at_level(logging.INFO, logger="worker.steps.webhooks"):
        assert _post(client, signer, job, "req-old", attempt=attempt) == 200
        assert _post(client, signer, job, "req-old", attempt=attempt) == 200  # fal's retry of it
    assert _outcomes(engine, "req-old") == [ADOPTED_RESTORED]
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.attempts) == (S.DOWNLOADING, "req-old", attempt)
    assert (after.error, after.lease_owner, after.resend_attempt) == (None, None, None)
    assert (after.provider_output, after.seed) == (RESULT, 7)
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (0, 0)
    assert after.submitted_at is not None
    restored = [r for r in caplog.records if getattr(r, "event", None) == "webhook.database_restored"]
    assert [r.levelno for r in restored] == [logging.WARNING]
    assert "looks restored from an older backup" in restored[0].getMessage()
    with db.session_scope(engine) as session:
        events = store.job_events(session, job.id)
        assert batch_report(session, job.batch_id)["confirmed_duplicate_charges"] == 0
        if claimed is not None:  # the dispatcher's send finds the job moved: nothing goes out
            now = utcnow()
            assert store.record_send(
                session, claimed, now=now, lease_seconds=60, submitted_input={"prompt": "a cat"},
                sent_at=now, api_key_id="k",
            ) is None  # fmt: skip
    assert (events[-2].from_state, events[-2].to_state) == (came_from, S.QUEUED)
    assert f"attempt {attempt}, which this database never recorded as sent" in (events[-2].reason or "")

    _succeed(engine, job.id)  # billed once, as the success it is
    finished = _job(engine, job.batch_id)
    assert (finished.state, finished.actual_usd, finished.confirmed_duplicate_charges) == (
        S.SUCCEEDED,
        job.est_usd,
        0,
    )
    assert _money_agrees(engine, job.batch_id) == job.est_usd


def test_a_failure_of_an_attempt_a_restored_database_never_sent_is_adopted_and_its_status_asked(
    engine: Engine, client: TestClient, settings: Settings, signer: WebhookSigner
) -> None:
    """fal reports the late attempt failed: it is the job's all the same (adopted, attempts
    caught up, never a duplicate charge), and its status is asked at once, as for any failure
    reported by webhook; the retry that follows is attempt 2, whose token is a new one."""
    job, _ = _restored(engine, settings, "pending")
    assert _post(client, signer, job, "req-old", attempt=1, ok=False) == 200
    assert _outcomes(engine, "req-old") == [ADOPTED_RESTORED]
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.attempts) == (S.QUEUED, "req-old", 1)
    assert after.next_attempt_at is not None
    assert after.next_attempt_at <= utcnow()  # its status due at once
    assert after.confirmed_duplicate_charges == 0


def test_a_restored_proof_does_not_take_a_submit_whose_post_is_out(
    engine: Engine, settings: Settings
) -> None:
    """A job whose POST of attempt 1 is recorded as sent is not behind fal: a proof of attempt 1
    is that POST's (adopted as its answer), and one of a later attempt falls to the other cases."""
    job = _sent(engine, request_id=None)
    assert (job.state, job.attempts, job.submitted_input is not None) == (S.SUBMITTING, 1, True)
    assert not store.restored_proof_adoptable(job, 1)
    assert not store.restored_proof_adoptable(job, 2)
    pending, _ = _restored(engine, settings, "pending")
    assert store.restored_proof_adoptable(pending, 1)
    assert not store.restored_proof_adoptable(pending, 0)


def test_a_restored_proof_racing_a_dispatcher_that_claims_the_job_wins_cleanly(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    """The proof comes while a dispatcher claims the very job (``pending`` → ``submitting``
    attempt 1, not committed yet): the adoption waits for it, finds the job moved, reads it
    again and adopts from ``submitting`` (the attempt not sent); the dispatcher's send then
    finds the job moved and sends nothing — one request, no duplicate charge. Before: the
    proof was counted as a confirmed duplicate charge and the job was sent again."""
    batch_id = add_batch(engine, "race", [("fal-ai/wan-22", {"prompt": "a cat"})])
    job = _job(engine, batch_id)
    answered: list[int] = []
    poster = threading.Thread(
        target=lambda: answered.append(_post(client, signer, job, "req-old", attempt=1))
    )
    with db.session_scope(engine) as session:  # the dispatcher's transaction
        fence = store.Fence.of(store.get_job(session, job.id), "sender")
        assert store.mark_submitting(
            session, fence, attempt=1, api_key_id="k", lease_expires_at=utcnow() + timedelta(seconds=60)
        )
        held = store.Fence(job.id, S.SUBMITTING, fence.version + 1, "sender")
        poster.start()
        _wait_blocked(engine)
    poster.join(60)
    assert answered == [200]
    assert _outcomes(engine, "req-old") == [ADOPTED_RESTORED]
    after = _job(engine, batch_id)
    assert (after.state, after.request_id, after.attempts) == (S.DOWNLOADING, "req-old", 1)
    assert after.confirmed_duplicate_charges == 0
    with db.session_scope(engine) as session:
        now = utcnow()
        assert store.record_send(
            session, held, now=now, lease_seconds=60, submitted_input={"prompt": "a cat"},
            sent_at=now, api_key_id="k",
        ) is None  # fmt: skip
        events = store.job_events(session, job.id)
    assert [(e.from_state, e.to_state) for e in events[:2]] == [
        (S.PENDING, S.SUBMITTING),
        (S.SUBMITTING, S.QUEUED),
    ]


def _wait_blocked(engine: Engine) -> None:
    """Until another connection waits for a lock this one holds (PostgreSQL), at most 10 s; on
    SQLite, whose writers take turns on the file, a moment for the other writer to get there."""
    if engine.dialect.name != "postgresql":
        time.sleep(0.5)
        return
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 10
    with engine.connect() as conn:
        while time.monotonic() < deadline and not conn.execute(waiting).scalar_one():
            time.sleep(0.05)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_database_restored_from_a_backup_taken_before_any_webhook_keeps_its_late_proofs(
    dialect: str,
    tmp_path: Path,
    new_pg_database: Any,
    settings: Settings,
    signer: WebhookSigner,
) -> None:
    """A project backs up its database before its first run with webhooks, runs (the receiver
    down: fal retries its webhooks), and is restored from the backup. The backup holds the
    webhook secret, made with the database, so the late webhooks' tokens hold and each proves
    its request: adopted, never sent again. Before: the secret was made at the first webhook URL,
    after the backup; the restored database made another, and refused every late webhook (403),
    the proof lost and the next run paying again."""
    if dialect == "sqlite":
        url, backup_url = f"sqlite:///{tmp_path / 'wb.db'}", f"sqlite:///{tmp_path / 'backup.db'}"
    else:
        url, backup_url = new_pg_database(), new_pg_database()
    original = db.make_engine(url)
    db.migrate(original)  # a new project's database
    batch_id = add_batch(original, "backed-up", [("fal-ai/wan-22", {"prompt": "a cat"})])
    job = _job(original, batch_id)
    original.dispose()
    if dialect == "sqlite":  # sqlite3's .backup
        with sqlite3.connect(tmp_path / "wb.db") as source, sqlite3.connect(tmp_path / "backup.db") as copy:
            source.backup(copy)
    else:  # the backup: a copy of the database as it is now
        backup_name = backup_url.rsplit("/", 1)[1]
        _admin_execute(f'DROP DATABASE "{backup_name}"')
        _admin_execute(f'CREATE DATABASE "{backup_name}" TEMPLATE "{url.rsplit("/", 1)[1]}"')
    original = db.make_engine(url)
    try:
        params = hook_params(original, job.id, 1)  # the run's submit: the URL fal calls back
    finally:
        original.dispose()
    restored = db.make_engine(backup_url)  # the database restored from the backup
    try:
        db.migrate(restored)
        body = webhook_body("req-old", "req-old", True, RESULT, None)
        with TestClient(create_app(settings, engine=restored)) as client:
            answer = client.post(
                "/webhooks/fal",
                params=params,
                content=body,
                headers=signer.headers("req-old", "user-1", body),
            )
        assert answer.status_code == 200
        assert _outcomes(restored, "req-old") == [ADOPTED_RESTORED]
        after = _job(restored, batch_id)
        assert (after.state, after.request_id, after.attempts) == (S.DOWNLOADING, "req-old", 1)
        assert after.confirmed_duplicate_charges == 0
    finally:
        restored.dispose()


@pytest.mark.parametrize("policy", ["resubmit", "fail"])
def test_the_deadline_keeps_a_stored_proof_of_an_earlier_attempt_instead_of_its_policy(
    engine: Engine, settings: Settings, policy: str
) -> None:
    """At the deadline of attempt 2's unknown submit, the policy neither resends nor fails a job
    whose inbox holds fal's success for attempt 1 (stored, not applied: it came in whatever
    order): the job keeps that request and its result, and nothing is sent again."""
    job = _resend_unknown_too(engine, "submit_unknown")
    body = json.loads(webhook_body("req-first", "req-first", True, RESULT, None))
    with db.session_scope(engine) as session:
        store.store_delivery(
            session,
            request_id="req-first",
            body_sha256="0" * 64,
            job_id=job.id,
            attempt=1,
            status="OK",
            body=body,
        )
    rt = make_runtime(
        engine, settings.model_copy(update={"submit_unknown_policy": policy, "max_attempts": 3})
    )
    with db.session_scope(engine) as session:
        assert settle_unknown_submit(session, rt, store.get_job(session, job.id), "no webhook proved it")
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.attempts, after.error) == (S.QUEUED, "req-first", 2, None)
    assert (after.provider_output, after.seed) == (RESULT, 7)
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (1, 0)
    assert after.ambiguous_usd == job.est_usd
    assert apply_pending(rt) == 1  # the stored delivery, applied now: the job's own request, done
    assert _job(engine, job.batch_id).state == S.DOWNLOADING
    assert _money_agrees(engine, job.batch_id) == 2 * job.est_usd


def _given_up(engine: Engine, seen: JobState) -> Job:
    """One job sent as ``req-A`` (seen ``seen`` at fal) that the poller failed after fal's
    malformed status answers, billed as a cancel (in fal's queue: nothing; running: in full)."""
    job = _sent(engine, request_id="req-A")
    with db.session_scope(engine) as session:
        if seen == S.RUNNING:
            assert store.mark_running(session, store.Fence.of(job, "poller"), next_poll_at=utcnow())
        polled = store.get_job(session, job.id)
        cancel = Outcome.CANCELLED_IN_QUEUE if seen == S.QUEUED else Outcome.CANCELLED_RUNNING
        cost: dict[str, Any] = billed(cancel, polled.est_billing_units, polled.est_usd)
        assert store.fail_job(
            session,
            store.Fence.of(polled, "poller"),
            error="fal's status answers broke its protocol 5 times",
            error_type="provider_protocol_error",
            download_attempts=5,
            **cost,
        )
    return _job(engine, job.batch_id)


@pytest.mark.parametrize("seen", [S.QUEUED, S.RUNNING])
def test_a_proof_of_a_request_the_poller_gave_up_on_brings_its_paid_video_back(
    engine: Engine, client: TestClient, signer: WebhookSigner, seen: JobState
) -> None:
    """After fal's malformed status answers the poller failed the job, billed as a cancel (in
    fal's queue: nothing; running: in full), its best-effort cancel may not have gone through.
    fal's signed webhook then proves it ran the request and finished it: the job adopts it back
    and fetches its video, billed once, as the success it is (before: ignored, the spend
    understated and the video lost)."""
    job = _given_up(engine, seen)
    failed = _job(engine, job.batch_id)
    assert _money_agrees(engine, job.batch_id) == (0 if seen == S.QUEUED else job.est_usd)

    assert _post(client, signer, job, "req-A") == 200
    assert _post(client, signer, job, "req-A") == 200  # fal's retry of it
    assert _outcomes(engine, "req-A") == [ADOPTED_OWN]
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.error, after.error_type) == (
        S.DOWNLOADING,
        "req-A",
        None,
        None,
    )
    assert (after.provider_output, after.seed, after.download_attempts) == (RESULT, 7, 0)
    assert after.confirmed_duplicate_charges == 0
    assert _money_agrees(engine, job.batch_id) == job.est_usd
    _succeed(engine, job.id)
    finished = _job(engine, job.batch_id)
    assert (finished.state, finished.actual_usd) == (S.SUCCEEDED, failed.est_usd)
    assert _money_agrees(engine, job.batch_id) == job.est_usd


def _cancelled_by_user(engine: Engine, seen: JobState, metrics: dict[str, Any]) -> Job:
    """One job sent as ``req-A`` (seen ``seen`` at fal) whose batch the user cancelled: our cancel
    went to fal, the job went ``cancelling``, and fal's status then said ``client_cancelled``
    (with ``metrics``): the poller ends it ``cancelled``, billed as a cancel."""
    job = _sent(engine, request_id="req-A")
    now = utcnow()
    with db.session_scope(engine) as session:
        store.set_batch_state(session, job.batch_id, BatchState.CANCELLED, reason="cancelled by user")
        if seen == S.RUNNING:
            assert store.mark_running(session, store.Fence.of(job, "poller"), next_poll_at=now)
        at_fal = store.get_job(session, job.id)
        assert store.mark_cancelling(session, store.Fence.of(at_fal, "canceller"), reason="cancel requested")
        cancelling = store.get_job(session, job.id)
        status = Status(
            state="COMPLETED",
            error="Request cancelled by client",
            error_type="client_cancelled",
            metrics=metrics,
        )
        assert record_completion(session, store.Fence.of(cancelling, "poller"), status, now=now) is False
    return _job(engine, job.batch_id)


@pytest.mark.parametrize(
    ("seen", "metrics"),
    [
        (S.QUEUED, {}),
        (S.QUEUED, {"inference_time": None}),
        (S.RUNNING, {}),
        (S.QUEUED, {"inference_time": 4.2}),
    ],
)
def test_a_proof_that_fal_ran_a_request_the_user_s_cancel_ended_bills_it_and_keeps_its_video(
    engine: Engine, client: TestClient, signer: WebhookSigner, seen: JobState, metrics: dict[str, Any]
) -> None:
    """``wanbatch cancel``: fal's status said our cancel ended the request (``client_cancelled``),
    so the job ended ``cancelled`` with a cancel's bill — nothing when it seemed to wait in fal's
    queue. fal's cancel of a running request is best effort, though: its signed webhook then
    proves it ran the request to the end, with a result (billed in full). The job adopts it and
    fetches its video, billed once as the success it is — as a request that finishes despite a
    cancel always is (before: "ignored: job already cancelled", the spend understated, the paid
    video lost)."""
    job = _cancelled_by_user(engine, seen, metrics)
    ran = seen == S.RUNNING or bool(metrics.get("inference_time"))
    cancel_bill = job.est_usd if ran else Decimal(0)
    assert (job.state, job.error, job.actual_usd) == (S.CANCELLED, "cancelled by user", cancel_bill)
    assert _money_agrees(engine, job.batch_id) == cancel_bill

    assert _post(client, signer, job, "req-A") == 200
    assert _post(client, signer, job, "req-A") == 200  # fal's retry of it
    assert _outcomes(engine, "req-A") == [ADOPTED_CANCELLED]  # stored once, applied once
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.error, after.error_type) == (
        S.DOWNLOADING,
        "req-A",
        None,
        None,
    )
    assert (after.provider_output, after.seed) == (RESULT, 7)
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (0, 0)
    assert _money_agrees(engine, job.batch_id) == job.est_usd  # counted once, in full

    _succeed(engine, job.id)
    finished = _job(engine, job.batch_id)
    assert (finished.state, finished.actual_usd) == (S.SUCCEEDED, job.est_usd)
    assert _money_agrees(engine, job.batch_id) == job.est_usd
    with db.read_scope(engine) as session:
        assert store.get_batch(session, job.batch_id).state == BatchState.CANCELLED  # still stops sending
        total = cost_report(session, job.batch_id).total  # what `wanbatch cost` reports
    assert (total.actual_usd, total.wasted_usd) == (job.est_usd, Decimal(0))
    assert (total.succeeded, total.cancelled) == (1, 0)


def test_a_failure_fal_reports_for_a_request_the_user_s_cancel_ended_leaves_the_job_cancelled(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    """Only a success is proof of a paid video: fal's webhook of the cancelled request's own end
    (an error) changes nothing."""
    job = _cancelled_by_user(engine, S.QUEUED, {})
    assert _post(client, signer, job, "req-A", ok=False) == 200
    assert _outcomes(engine, "req-A") == ["ignored: job already cancelled"]
    after = _job(engine, job.batch_id)
    assert (after.state, after.actual_usd) == (S.CANCELLED, Decimal(0))
    assert _money_agrees(engine, job.batch_id) == 0


def test_a_success_of_a_request_a_cancelled_job_waited_to_replace_leaves_the_job_cancelled(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    """A job `wanbatch cancel` ended while it waited to be sent again keeps the id of a request
    fal had ended otherwise (here a failure billed in full), not one our cancel ended: a webhook
    of that request changes nothing."""
    other = _sent(engine, request_id="req-B")
    with db.session_scope(engine) as session:
        queued = store.get_job(session, other.id)
        failure: dict[str, Any] = billed(
            Outcome.CLIENT_ERROR_AFTER_INFERENCE, queued.est_billing_units, queued.est_usd
        )
        assert store.retry_later(
            session, store.Fence.of(queued, "downloader"), reason="result gone", **failure
        )
        store.set_batch_state(session, other.batch_id, BatchState.CANCELLED, reason="cancelled by user")
        store.cancel_unsent_jobs(
            session,
            [other.batch_id],
            reason="batch cancelled",
            error="cancelled by user",
            error_type="cancelled",
        )
    assert _post(client, signer, other, "req-B") == 200
    assert _outcomes(engine, "req-B") == ["ignored: job already cancelled"]
    kept = _job(engine, other.batch_id)
    assert (kept.state, kept.request_id, kept.actual_usd) == (S.CANCELLED, "req-B", other.est_usd)


def _window_closed(engine: Engine, metrics: dict[str, Any]) -> Job:
    """One job sent as ``req-A`` whose batch's window closed while fal held it: the schedule's
    cancel went to fal, the job went ``cancelling`` (``window_closed``), and fal's status then
    said ``client_cancelled`` (with ``metrics``): the poller puts it back to wait for the next
    window — ``pending`` when it seemed to wait in fal's queue (unbilled), ``retry_wait`` when
    fal had started it (billed in full, as a cancel while running)."""
    job = _sent(engine, request_id="req-A")
    now = utcnow()
    with db.session_scope(engine) as session:
        at_fal = store.get_job(session, job.id)
        assert store.mark_cancelling(
            session,
            store.Fence.of(at_fal, "scheduler"),
            reason="window closed: cancel requested at fal: cancelled",
            error_type=WINDOW_CLOSED,
        )
        cancelling = store.get_job(session, job.id)
        status = Status(
            state="COMPLETED",
            error="Request cancelled by client",
            error_type="client_cancelled",
            metrics=metrics,
        )
        assert record_completion(session, store.Fence.of(cancelling, "poller"), status, now=now) is False
    return _job(engine, job.batch_id)


@pytest.mark.parametrize("where", ["waiting", "claimed", "cancelled"])
@pytest.mark.parametrize("metrics", [{}, {"inference_time": 4.2}])
def test_a_proof_that_fal_ran_a_request_a_window_end_cancelled_is_kept_and_nothing_is_resent(
    engine: Engine,
    client: TestClient,
    settings: Settings,
    signer: WebhookSigner,
    metrics: dict[str, Any],
    where: str,
) -> None:
    """A batch's window closed while fal held the job's request: our cancel went to fal, its
    status said the cancel ended it, and the job went back to wait for the next window. fal's
    cancel of a running request is best effort, though: its signed webhook then proves it ran
    that request to the end, with a result (billed in full). The job takes that request back
    and fetches its video, billed once — the window's cancel's bill taken back — and nothing is
    sent again; also when the next window's dispatch had claimed it (its POST not sent yet), or
    the user's cancel had ended it unsent meanwhile (before: "ignored: job already pending", the
    job sent again in the next window and paid twice, the paid video dropped)."""
    job = _window_closed(engine, metrics)
    ran = bool(metrics)
    cancel_bill = job.est_usd if ran else Decimal(0)
    waits = S.RETRY_WAIT if ran else S.PENDING
    assert (job.state, job.request_id, job.error_type) == (waits, "req-A", WINDOW_CLOSED)
    assert (job.actual_usd, job.counted_attempts) == (cancel_bill, 1 if ran else 0)
    assert _money_agrees(engine, job.batch_id) == cancel_bill
    claimed: store.Fence | None = None
    with db.session_scope(engine) as session:
        waiting = store.Fence.of(store.get_job(session, job.id), "sender")
        if where == "claimed":  # the next window opened: a submit step holds it, POST not sent
            now = utcnow()
            assert store.mark_submitting(
                session, waiting, attempt=2, api_key_id="k", lease_expires_at=now + timedelta(seconds=60)
            )
            claimed = waiting.moved(S.SUBMITTING)
        elif where == "cancelled":  # `wanbatch cancel` ended it while it waited: nothing sent
            store.set_batch_state(session, job.batch_id, BatchState.CANCELLED, reason="cancelled by user")
            store.cancel_unsent_jobs(
                session,
                [job.batch_id],
                reason="batch cancelled",
                error="cancelled by user",
                error_type="cancelled",
            )
    assert _money_agrees(engine, job.batch_id) == cancel_bill

    assert _post(client, signer, job, "req-A") == 200
    assert _post(client, signer, job, "req-A") == 200  # fal's retry of it
    assert _outcomes(engine, "req-A") == [ADOPTED_WINDOW]  # stored once, applied once
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.attempts) == (S.DOWNLOADING, "req-A", 1)
    assert (after.error, after.error_type, after.lease_owner) == (None, None, None)
    assert (after.provider_output, after.seed) == (RESULT, 7)
    assert (after.unstarted_requests, after.counted_attempts) == (0, 1)  # it ran
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (0, 0)
    assert _money_agrees(engine, job.batch_id) == job.est_usd  # counted once, in full
    with db.session_scope(engine) as session:
        events = store.job_events(session, job.id)
        if claimed is not None:  # the claimed resend's send finds the job moved: nothing goes out
            now = utcnow()
            assert store.record_send(
                session, claimed, now=now, lease_seconds=60, submitted_input={"prompt": "a cat"},
                sent_at=now, api_key_id="k",
            ) is None  # fmt: skip
    came_from = {"waiting": waits, "claimed": S.SUBMITTING, "cancelled": S.CANCELLED}[where]
    assert (events[-2].from_state, events[-2].to_state) == (came_from, S.QUEUED)
    assert "window's end was said to have ended it" in (events[-2].reason or "")
    handed: list[str] = []  # what a dispatch round sends: nothing
    assert dispatch(make_runtime(engine, settings, enqueue_submit=handed.append)) == []
    assert handed == []

    _succeed(engine, job.id)
    finished = _job(engine, job.batch_id)
    assert (finished.state, finished.actual_usd, finished.attempts) == (S.SUCCEEDED, job.est_usd, 1)
    assert _money_agrees(engine, job.batch_id) == job.est_usd
    with db.read_scope(engine) as session:
        total = cost_report(session, job.batch_id).total
        report = batch_report(session, job.batch_id)
    assert (total.actual_usd, total.wasted_usd, total.possibly_billed_usd) == (
        job.est_usd,
        Decimal(0),
        Decimal(0),
    )
    assert (total.succeeded, total.cancelled) == (1, 0)
    assert (report["confirmed_duplicate_charges"], report["possible_duplicate_charges"]) == (0, 0)
    assert _post(client, signer, job, "req-A", ok=False) == 200  # another body, afterwards
    assert _job(engine, job.batch_id).version == finished.version


@pytest.mark.parametrize("metrics", [{}, {"inference_time": 4.2}])
def test_a_proof_that_fal_ran_a_request_a_window_end_cancelled_after_the_job_was_sent_again_is_a_duplicate(
    engine: Engine, client: TestClient, signer: WebhookSigner, metrics: dict[str, Any]
) -> None:
    """The same proof after the next window sent the job again (``req-B``): fal ran and billed
    the job twice, a confirmed duplicate charge — counted once, on the job's history, billed in
    full in place of the window's cancel's bill, and wasted once the job keeps ``req-B``'s video
    (before: "ignored: an earlier request of the job", the spend understated, nothing reported)."""
    job = _window_closed(engine, metrics)
    cancel_bill = job.est_usd if metrics else Decimal(0)
    now = utcnow()
    with db.session_scope(engine) as session:
        waiting = store.Fence.of(store.get_job(session, job.id), "sender")
        assert store.mark_submitting(
            session, waiting, attempt=2, api_key_id="k", lease_expires_at=now + timedelta(seconds=60)
        )
        sending = store.record_send(
            session, waiting.moved(S.SUBMITTING), now=now, lease_seconds=60,
            submitted_input={"prompt": "a cat"}, sent_at=now, api_key_id="k",
        )  # fmt: skip
        assert sending is not None
        assert store.mark_submitted(
            session, sending, running=False, request_id="req-B", gateway_request_id=None,
            status_url=None, response_url=None, cancel_url=None, submitted_at=now, next_poll_at=now,
        )  # fmt: skip
    assert _money_agrees(engine, job.batch_id) == cancel_bill

    assert _post(client, signer, job, "req-A") == 200
    assert _post(client, signer, job, "req-A") == 200  # fal's retry of it: stored once
    assert _post(client, signer, job, "req-A", ok=False) == 200  # another body of it
    assert _outcomes(engine, "req-A") == ["duplicate-charge", "ignored: duplicate charge already counted"]
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.attempts) == (S.QUEUED, "req-B", 2)
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (0, 1)
    assert after.actual_usd == job.est_usd  # req-A, billed in full (once)
    assert _money_agrees(engine, job.batch_id) == job.est_usd
    with db.session_scope(engine) as session:
        notes = [e for e in store.job_events(session, job.id) if e.from_state == e.to_state]
    assert len(notes) == 1
    assert "confirmed duplicate charge" in (notes[0].reason or "")

    assert _post(client, signer, job, "req-B") == 200  # the resend finishes too
    _succeed(engine, job.id)
    finished = _job(engine, job.batch_id)
    assert (finished.state, finished.actual_usd, finished.confirmed_duplicate_charges) == (
        S.SUCCEEDED,
        2 * job.est_usd,
        1,
    )
    assert _money_agrees(engine, job.batch_id) == 2 * job.est_usd
    with db.read_scope(engine) as session:
        total = cost_report(session, job.batch_id).total
        report = batch_report(session, job.batch_id)
    assert (total.actual_usd, total.wasted_usd) == (2 * job.est_usd, job.est_usd)
    assert report["confirmed_duplicate_charges"] == 1


def test_a_proof_of_the_failed_job_s_own_request_keeps_a_duplicate_charge_billed_before_it(
    engine: Engine, client: TestClient, signer: WebhookSigner, caplog: pytest.LogCaptureFixture
) -> None:
    """Attempt 1's answer was lost, its resend (attempt 2) was accepted, and the poller gave up
    on fal's malformed status answers while it was queued (billed as a cancel in fal's queue:
    nothing). fal's webhook proves attempt 1 ran: a confirmed duplicate charge, billed on the
    failed job (a note ``failed`` → ``failed`` on its history). Then attempt 2's own success
    comes: the job adopts it back, taking back only its failure's bill (nothing) — not the
    duplicate charge's, which that note's ``failed`` passed off as a cancel while running."""
    job, sending = _resend_waiting(engine, "sent")
    assert sending is not None
    now = utcnow()
    with db.session_scope(engine) as session:
        assert store.mark_submitted(
            session, sending, running=False, request_id="req-second", gateway_request_id=None,
            status_url=None, response_url=None, cancel_url=None, submitted_at=now, next_poll_at=now,
        )  # fmt: skip
        queued = store.get_job(session, job.id)
        cancel: dict[str, Any] = billed(Outcome.CANCELLED_IN_QUEUE, queued.est_billing_units, queued.est_usd)
        assert store.fail_job(
            session,
            store.Fence.of(queued, "poller"),
            error="fal's status answers broke its protocol 5 times",
            error_type="provider_protocol_error",
            download_attempts=5,
            **cancel,
        )
    assert _post(client, signer, job, "req-first", attempt=1) == 200  # attempt 1 ran too
    assert _outcomes(engine, "req-first") == ["duplicate-charge"]
    noted = _job(engine, job.batch_id)
    assert (noted.state, noted.actual_usd, noted.confirmed_duplicate_charges) == (S.FAILED, job.est_usd, 1)
    assert _money_agrees(engine, job.batch_id) == job.est_usd

    with caplog.at_level(logging.WARNING, logger="worker.steps.webhooks"):
        assert _post(client, signer, job, "req-second", attempt=2) == 200  # its own request, done
    assert _outcomes(engine, "req-second") == [ADOPTED_OWN]
    said = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "webhook.adopted_own"]
    assert len(said) == 1
    assert "after the job failed (provider_protocol_error)" in said[0]
    back = _job(engine, job.batch_id)
    assert (back.state, back.request_id, back.actual_usd) == (S.DOWNLOADING, "req-second", job.est_usd)
    assert back.confirmed_duplicate_charges == 1
    _succeed(engine, job.id)
    finished = _job(engine, job.batch_id)
    assert (finished.state, finished.actual_usd) == (S.SUCCEEDED, 2 * job.est_usd)  # both fal ran
    assert _money_agrees(engine, job.batch_id) == 2 * job.est_usd


@pytest.mark.parametrize("why", ["failed", "not its last attempt", "kept a request"])
def test_a_late_proof_never_reopens_a_job_that_failed_otherwise(
    engine: Engine, client: TestClient, signer: WebhookSigner, why: str
) -> None:
    """Only a job failed for its unknown submit outcome comes back, and only for its last
    attempt's request finished at fal: a failure fal reports has no video to fetch, and a job
    that failed for another reason, or an earlier attempt's request, is the duplicate charge it
    always was."""
    kept = why == "kept a request"
    job = _sent(engine, request_id="req-1") if kept else _failed_for_unknown_outcome(engine)
    if kept:
        with db.session_scope(engine) as session:
            assert store.fail_job(
                session, store.Fence.of(job, "w"), error="model error", error_type="submit_unknown"
            )
    attempt = 0 if why == "not its last attempt" else 1
    assert _post(client, signer, job, "req-late", attempt=attempt, ok=why != "failed") == 200
    after = _job(engine, job.batch_id)
    assert after.state == S.FAILED
    assert after.confirmed_duplicate_charges == 1
    assert _outcomes(engine, "req-late") == ["duplicate-charge"]


def _job_now(engine: Engine, job_id: str) -> Job:
    with db.read_scope(engine) as session:
        found = store.get_job(session, job_id)
        session.expunge(found)
        return found


@pytest.mark.parametrize("where", ["submitting", "submit_unknown", "failed", "resend waiting", "queued"])
def test_a_webhook_naming_a_request_another_job_holds_is_acknowledged_and_ignored(
    engine: Engine, client: TestClient, signer: WebhookSigner, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """fal gives each accepted POST a request of its own: a webhook for one job's attempt that
    names a request another job holds is a provider protocol error. Before, the job adopted
    it (its answer lost, failed for that, or its resend pending: the other job's video stored
    twice, its cost counted twice) or counted it as a confirmed duplicate charge, billed."""
    holder = _sent(engine, request_id="req-1", name="holder")
    if where == "failed":
        job = _failed_for_unknown_outcome(engine)
    elif where == "resend waiting":
        job, _ = _resend_waiting(engine, "waiting")
    elif where == "queued":
        job = _sent(engine, request_id="req-own")
    else:
        job = _sent(engine, request_id=None, unknown=where == "submit_unknown")
    assert job.id != holder.id
    caplog.set_level(logging.ERROR, logger="worker.steps.webhooks")
    assert _post(client, signer, job, "req-1") == 200
    assert _outcomes(engine, "req-1") == [f"ignored: request held by job {holder.id}"]
    after = _job_now(engine, job.id)
    assert (after.state, after.request_id, after.version) == (job.state, job.request_id, job.version)
    assert after.confirmed_duplicate_charges == 0
    assert _job_now(engine, holder.id).version == holder.version
    (said,) = [r for r in caplog.records if getattr(r, "event", "") == "webhook.request_held"]
    assert f"which job {holder.id} already holds" in said.getMessage()


def test_the_deadline_takes_no_stored_proof_of_a_request_another_job_holds(
    engine: Engine, settings: Settings
) -> None:
    """A stored success naming a request another job holds proves nothing of this job's submit:
    at the deadline the policy applies (before, the job took the other job's request)."""
    holder = _sent(engine, request_id="req-1", name="holder")
    job = _sent(engine, request_id=None, unknown=True)
    body = json.loads(webhook_body("req-1", "req-1", True, RESULT, None))
    with db.session_scope(engine) as session:
        store.store_delivery(
            session,
            request_id="req-1",
            body_sha256="1" * 64,
            job_id=job.id,
            attempt=1,
            status="OK",
            body=body,
        )
    rt = make_runtime(engine, settings.model_copy(update={"submit_unknown_policy": "fail"}))
    with db.session_scope(engine) as session:
        assert settle_unknown_submit(session, rt, store.get_job(session, job.id), "no webhook proved it")
    after = _job_now(engine, job.id)
    assert (after.state, after.request_id, after.error_type) == (S.FAILED, None, "submit_unknown")
    assert _job_now(engine, holder.id).version == holder.version


def test_unknown_and_finished_jobs_are_acknowledged_and_ignored(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    job = _sent(engine, request_id="req-1")
    body = webhook_body("req-x", "g", True, RESULT, None)
    headers = signer.headers("req-x", "u", body)
    unknown = hook_params(engine, "f" * 32, 1)  # a job this database does not hold (deleted)
    assert client.post("/webhooks/fal", params=unknown, content=body, headers=headers).status_code == 200
    assert _post(client, signer, job, "req-1") == 200
    assert _post(client, signer, job, "req-1", ok=False) == 200  # a different body, job downloading
    assert _deliveries(engine)["ignored"] == 2


@pytest.mark.parametrize("state", ["submit_unknown", "queued"])
def test_a_delivery_for_another_accounts_request_naming_our_job_changes_nothing(
    engine: Engine, client: TestClient, signer: WebhookSigner, state: str
) -> None:
    """fal signs every account's webhooks with the same keys: another fal user can name our job
    in a ``fal_webhook`` URL of theirs. Without our token the delivery is refused (fal retries it
    a while, then gives up), stores nothing, adopts nothing and counts no duplicate charge."""
    unknown = state == "submit_unknown"
    job = _sent(engine, request_id=None if unknown else "req-1", unknown=unknown)
    body = webhook_body("their-req", "g", True, RESULT, None)
    headers = signer.headers("their-req", "their-user", body)
    ours = hook_params(engine, job.id, 1)
    forged = [
        {"job_id": job.id, "attempt": "1"},  # no token
        {**ours, "token": "0" * 32},  # a wrong one
        {**ours, "attempt": "2"},  # attempt 1's token, another attempt
        {**hook_params(engine, "f" * 32, 1), "job_id": job.id},  # another job's token
    ]
    for params in forged:
        assert client.post("/webhooks/fal", params=params, content=body, headers=headers).status_code == 403
    after = _job(engine, job.batch_id)
    assert (after.state, after.version, after.request_id) == (job.state, job.version, job.request_id)
    assert after.confirmed_duplicate_charges == 0
    assert _deliveries(engine)["stored"] == 0
    assert client.get("/healthz").json() == {
        "ok": True,
        "accepted": 0,
        "rejected": len(forged),
        "misrouted": 0,
        **VERIFIES,
        **_serves(engine),
    }


def _post_as(client: TestClient, signer: WebhookSigner, job: Job, request_id: str, user_id: str) -> int:
    """A success of ``request_id`` naming ``job``'s attempt 1 with its real token (one leaked from
    a proxy's access log, say), signed by fal for the account ``user_id``."""
    body = webhook_body(request_id, request_id, True, RESULT, None)
    headers = signer.headers(request_id, user_id, body)
    params = hook_params(client.app.state.inbox.engine, job.id, 1)  # type: ignore[attr-defined]
    return int(client.post("/webhooks/fal", params=params, content=body, headers=headers).status_code)


def _accounts(engine: Engine, signer: str | None = None) -> dict[str, str]:
    """The pinned accounts by API key id (of deliveries verified by ``signer``, or any)."""
    with db.session_scope(engine) as session:
        pins = store.fal_accounts(session)
    return {key: user for (key, by), user in pins.items() if signer is None or by == signer}


@pytest.mark.parametrize("pinned_by", ["learnt", "WANBATCH_FAL_USER_ID"])
def test_a_leaked_token_lets_no_other_fal_account_prove_or_charge_our_jobs(
    engine: Engine, settings: Settings, signer: WebhookSigner, pinned_by: str
) -> None:
    """fal signs every account's webhooks alike: another account that has one of our URLs, token
    included, gets genuine signatures for its own requests. Once our account is known (learnt from
    a delivery of a request our submit recorded, or set), such a delivery is refused (403) and
    changes nothing: no submit_unknown job adopts its request (nor fetches its video), and no
    duplicate charge is counted or billed on a job."""
    if pinned_by != "learnt":
        settings = settings.model_copy(update={"fal_user_id": "user-1"})
    with TestClient(create_app(settings, engine=engine)) as client:
        done = _sent(engine, request_id="req-1", name="done")
        unknown = _sent(engine, request_id=None, unknown=True, name="unknown")
        if pinned_by == "learnt":
            assert _post_as(client, signer, done, "req-1", "user-1") == 200  # its own request: ours
            assert _accounts(engine) == {"k": "user-1"}
        before = _job(engine, done.batch_id)
        assert _post_as(client, signer, unknown, "their-req", "their-user") == 403
        assert _post_as(client, signer, done, "their-req-2", "their-user") == 403
        still = _job(engine, unknown.batch_id)
        assert (still.state, still.version, still.request_id) == (S.SUBMIT_UNKNOWN, unknown.version, None)
        after = _job(engine, done.batch_id)
        assert (after.state, after.version, after.confirmed_duplicate_charges, after.actual_usd) == (
            before.state,
            before.version,
            0,
            before.actual_usd,
        )
        with db.session_scope(engine) as session:
            users = session.scalars(select(WebhookDelivery.request_id)).all()
        assert "their-req" not in users
        assert "their-req-2" not in users
        assert client.get("/healthz").json()["rejected"] == 2
        # Our own account's proof of the ambiguous submit is still taken.
        assert _post_as(client, signer, unknown, "req-proof", "user-1") == 200
        proved = _job(engine, unknown.batch_id)
        assert (proved.state, proved.request_id) == (S.DOWNLOADING, "req-proof")


def test_the_account_is_learnt_only_from_a_delivery_of_a_request_our_submit_recorded(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    """A delivery of a request we did not record proves nothing about whose account it is: the
    token alone binds it, and nothing is pinned. The first one of the job's own request pins
    the account of its API key (``jobs.api_key_id``), once: another account's own request can
    never be delivered signed for ours."""
    unknown = _sent(engine, request_id=None, unknown=True, name="unknown")
    assert _post_as(client, signer, unknown, "req-proof", "user-1") == 200
    assert _accounts(engine) == {}
    own = _sent(engine, request_id="req-own", name="own")
    assert _post_as(client, signer, own, "req-own", "user-1") == 200
    assert _accounts(engine) == {"k": "user-1"}
    other = _sent(engine, request_id="req-other", name="other")
    assert _post_as(client, signer, other, "req-other", "user-2") == 403  # pinned: not learnt again
    assert _accounts(engine) == {"k": "user-1"}
    assert _job(engine, other.batch_id).state == S.QUEUED


def test_a_delivery_of_another_account_stored_before_the_account_was_learnt_is_not_applied(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    """One stored before its key's account was learnt, but applied (or read as proof by the
    submit-unknown deadline) after, is checked against it then: ignored, the job left as it is."""
    unknown = _sent(engine, request_id=None, unknown=True, name="unknown")
    body = webhook_body("their-req", "their-req", True, RESULT, None)
    with db.session_scope(engine) as session:
        stored, _ = store.store_delivery(
            session, request_id="their-req", body_sha256="0" * 64, job_id=unknown.id, attempt=1,
            status="OK", body=json.loads(body), user_id="their-user",
        )  # fmt: skip
    own = _sent(engine, request_id="req-own", name="own")
    assert _post_as(client, signer, own, "req-own", "user-1") == 200  # learns user-1
    inbox: Inbox = client.app.state.inbox  # type: ignore[attr-defined]
    with db.session_scope(engine) as session:
        ours = partial(signed_by_us, session, inbox.settings)
        assert store.stored_proof(session, unknown.id, attempts=1, ours=ours) is None
    assert apply_delivery(inbox, stored) == FOREIGN
    still = _job(engine, unknown.batch_id)
    assert (still.state, still.request_id) == (S.SUBMIT_UNKNOWN, None)


def test_a_key_pinned_against_the_simulators_signer_still_takes_fals_own_deliveries(
    engine: Engine, settings: Settings, signer: WebhookSigner
) -> None:
    """The real ``FAL_KEY`` tried once against ``wanbatch simulator`` (``WANBATCH_FAL_QUEUE_URL``
    and ``WANBATCH_WEBHOOK_JWKS_URL`` at it) pins that key to the simulator's ``sim-user`` for the
    simulator's signer only: later, against fal's own JWKS, the genuine deliveries of our own
    account are taken and teach fal's account (before, every one was refused 403 for good)."""
    sim_keys = WebhookSigner()
    sim_jwks = JwksServer(sim_keys.jwks())
    try:
        simulated = settings.model_copy(update={"webhook_jwks_url": sim_jwks.url})
        with TestClient(create_app(simulated, engine=engine)) as sim_client:
            sim_job = _sent(engine, request_id="sim-req", name="sim", key="realkey")
            assert _post_as(sim_client, sim_keys, sim_job, "sim-req", "sim-user") == 200
    finally:
        sim_jwks.close()
    assert _accounts(engine, signer_of(simulated)) == {"realkey": "sim-user"}
    assert signer_of(simulated) != signer_of(settings)
    with TestClient(create_app(settings, engine=engine)) as client:
        real_job = _sent(engine, request_id="real-req", name="real", key="realkey")
        assert _post_as(client, signer, real_job, "real-req", "real-user") == 200
        assert _accounts(engine, signer_of(settings)) == {"realkey": "real-user"}
        unknown = _sent(engine, request_id=None, unknown=True, name="unknown", key="realkey")
        assert _post_as(client, signer, unknown, "their-req", "sim-user") == 403  # fal's pin judges it now
    assert _job(engine, real_job.batch_id).state == S.DOWNLOADING


def test_an_account_pinned_for_one_key_is_not_ours_for_another_keys_jobs(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    """Each key's jobs are judged by that key's own pin, never by the pool of every key's: a
    delivery signed for the account ``run --simulate``'s key was pinned to (or a test account's)
    is refused for a job of the real key."""
    sim_job = _sent(engine, request_id="sim-req", name="sim", key="simkey")
    assert _post_as(client, signer, sim_job, "sim-req", "sim-user") == 200
    real_job = _sent(engine, request_id="real-req", name="real", key="realkey")
    assert _post_as(client, signer, real_job, "real-req", "real-user") == 200
    assert _accounts(engine) == {"simkey": "sim-user", "realkey": "real-user"}
    victim = _sent(engine, request_id=None, unknown=True, name="victim", key="realkey")
    assert _post_as(client, signer, victim, "their-req", "sim-user") == 403
    still = _job(engine, victim.batch_id)
    assert (still.state, still.request_id) == (S.SUBMIT_UNKNOWN, None)


def test_a_delivery_of_an_earlier_attempt_sent_with_another_key_is_not_judged_by_the_latest_keys_pin(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    """A job whose attempt 1 went with key k1 (account A, not learnt) and whose attempt 2 with
    k2 (pinned to account B): attempt 1's genuine delivery, signed for A, is not refused for
    k2's pin (the database keeps only the latest attempt's key: the token binds it, as before),
    while attempt 2's, signed for anyone but B, is."""
    own = _sent(engine, request_id="b-req", name="b", key="k2")
    assert _post_as(client, signer, own, "b-req", "acct-B") == 200
    job = _sent(engine, request_id="a-req", name="a", key="k1")
    with db.session_scope(engine) as session:  # attempt 2, sent with the rotated key k2
        session.execute(
            update(Job).where(Job.id == job.id).values(attempts=2, api_key_id="k2", request_id="b-req-2")
        )
    assert _post_as(client, signer, job, "a-req", "acct-A") == 200
    assert _accounts(engine) == {"k2": "acct-B"}  # nothing learnt from an attempt of unknown key
    body = webhook_body("x-req", "x-req", True, RESULT, None)
    headers = signer.headers("x-req", "acct-A", body)
    params = hook_params(engine, job.id, 2)
    assert client.post("/webhooks/fal", params=params, content=body, headers=headers).status_code == 403


def test_the_token_is_the_databases_and_every_process_agrees_on_it(engine: Engine, db_url: str) -> None:
    """Made once per database: the submitting processes and the receiver (any host) share only
    the database, and each reads the same secret from it."""
    mine = hook_params(engine, "job-a", 3)
    with db.session_scope(engine) as session:
        stored = store.instance_secret(session, "webhook", lambda: "00" * 32)  # not made again
    assert mine["token"] == binding_token(bytes.fromhex(stored), "job-a", 3)
    assert mine["token"] != binding_token(bytes.fromhex(stored), "job-a", 4)
    assert len(mine["token"]) == 32
    assert stored != "00" * 32


def test_the_tick_applies_what_the_receiver_stored_but_did_not_apply(
    engine: Engine, settings: Settings
) -> None:
    job = _sent(engine, request_id="req-1")
    with db.session_scope(engine) as session:
        store.store_delivery(
            session, request_id="req-1", body_sha256="0" * 64, job_id=job.id, attempt=1,
            status="OK", body=json.loads(webhook_body("req-1", "g", True, RESULT, None)),
        )  # fmt: skip
    queued: list[str] = []
    rt = make_runtime(engine, settings)
    rt.enqueue_download = queued.append
    assert apply_pending(rt) == 1
    assert _job(engine, job.batch_id).state == S.DOWNLOADING
    assert queued == [job.id]
    assert apply_pending(rt) == 0


def test_keys_are_fetched_again_when_none_verifies_and_a_missing_jwks_refuses(
    signer: WebhookSigner, jwks: JwksServer
) -> None:
    keys = JwksKeys(jwks.url, refresh_min_seconds=0.0)
    message, rotated = signed_message("r", "u", "1", b"{}"), WebhookSigner()
    assert keys.verify(message, signer._key.sign(message))
    jwks.doc = {"keys": [*rotated.jwks()["keys"], {"kty": "RSA", "n": "x"}]}
    assert keys.verify(message, rotated._key.sign(message))
    assert keys.fetches == 2
    jwks.status = 500
    with pytest.raises(JwksUnavailable):
        JwksKeys(jwks.url).verify(message, signer._key.sign(message))


def test_an_unreachable_jwks_answers_503_and_stores_nothing(
    engine: Engine, client: TestClient, signer: WebhookSigner, jwks: JwksServer
) -> None:
    job = _sent(engine, request_id="req-1")
    jwks.status = 503
    assert _post(client, signer, job, "req-1") == 503
    assert _deliveries(engine)["stored"] == 0


def test_healthz_says_whether_signatures_can_be_verified(
    engine: Engine, settings: Settings, signer: WebhookSigner, jwks: JwksServer
) -> None:
    """Every delivery is refused (503) while fal's keys cannot be fetched: ``/healthz`` says so
    before fal has retried in vain, fetching the keys itself when it holds none (as the next
    delivery would), and says so again once they can be fetched."""
    jwks.status = 503
    keys = JwksKeys(jwks.url, failure_backoff=0.0)  # tried again at once (else after 5 s)
    with TestClient(create_app(settings, engine=engine, keys=keys)) as client:
        health = client.get("/healthz").json()
        assert health == {
            "ok": True,
            "accepted": 0,
            "rejected": 0,
            "misrouted": 0,
            "can_verify_signatures": False,
            "signing_keys": 0,
            "signing_keys_error": "fal's signing keys could not be fetched: HTTP 503",
            **_serves(engine),
        }
        assert _post(client, signer, _sent(engine, request_id="req-1"), "req-1") == 503  # as it said
        jwks.status = 200
        assert client.get("/healthz").json() == {
            "ok": True,
            "accepted": 0,
            "rejected": 1,
            "misrouted": 0,
            **VERIFIES,
            **_serves(engine),
        }
        assert keys.fetches == 3  # healthz, the delivery, healthz: one fetch each, none more


def test_with_a_receiver_polling_is_only_the_late_safety_net(settings: Settings) -> None:
    at = utcnow()
    without = settings.model_copy(update={"poll_min_interval": 2.0, "poll_max_interval": 30.0})
    assert first_poll_at(without, at) == at + timedelta(seconds=2)
    assert _next_poll(without, at, at + timedelta(seconds=20)) == at + timedelta(seconds=25)
    hooked = without.model_copy(
        update={"webhook_url": "https://hooks.example/fal", "webhook_poll_after": 30.0}
    )
    assert first_poll_at(hooked, at) == at + timedelta(seconds=30)
    later = at + timedelta(seconds=30)
    assert _next_poll(hooked, at, later) == later + timedelta(seconds=30)  # never more often
    assert _next_poll(hooked, at, at + timedelta(seconds=400)) == at + timedelta(seconds=430)


# ----------------------------------------------------------------------------- end to end


def _serve(app: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive(), "the receiver did not start"
        assert time.monotonic() < deadline, "the receiver did not start"
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_an_endless_chunked_body_is_refused_before_it_fills_memory(
    engine: Engine, settings: Settings
) -> None:
    """Without ``Content-Length`` nothing declares the size: the receiver counts as it reads and
    answers 413 once past ``MAX_BODY_BYTES``, long before an unsigned sender is done sending."""
    server, thread, url = _serve(create_app(settings, engine=engine))
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    answer = b""
    try:
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(
                b"POST /webhooks/fal HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
            conn.setblocking(False)
            while sent < 64 * MAX_BODY_BYTES and not answer:
                try:
                    sent += conn.send(chunk)
                except BlockingIOError:
                    time.sleep(0.01)
                except (BrokenPipeError, ConnectionResetError):
                    break
                with contextlib.suppress(BlockingIOError):
                    answer = conn.recv(4096)
            conn.setblocking(True)
            answer = answer or conn.recv(4096)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert answer.startswith(b"HTTP/1.1 413")
    assert sent < 8 * MAX_BODY_BYTES  # answered long before the sender was done
    assert _deliveries(engine)["stored"] == 0


@pytest.mark.slow
def test_dropped_submit_answers_are_resolved_by_webhooks_and_nobody_pays_twice(tmp_path: Path) -> None:
    options = SimulatorOptions(
        concurrency_limit=4,
        latency_seconds=0.2,
        rng_seed=11,
        faults={"submit_drop": FaultRule(probability=0.1)},
    )
    with running_simulator(options) as sim:
        base = settings_for(sim.url, "sim-key", database_url=f"sqlite:///{tmp_path / 'w.db'}")
        engine = db.open_engine(base)
        receiver = base.model_copy(update={"webhook_jwks_url": f"{sim.url}/.well-known/jwks.json"})
        server, thread, web_url = _serve(create_app(receiver, engine=engine))
        try:
            settings = base.model_copy(
                update={
                    "webhook_url": f"{web_url}/webhooks/fal",
                    "submit_unknown_deadline": 120.0,
                    "output_dir": tmp_path / "out",
                }
            )
            batch_id = add_batch(engine, "e2e", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(30)])
            report, _stats = process_batch(batch_id, settings, show_progress=False)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
        ledger = sim.ledger()
    assert report["counts"]["succeeded"] == 30, report["counts"]
    assert report["possible_duplicate_charges"] == 0
    assert ledger["faults"]["fired"].get("submit_drop", 0) >= 1
    paid = Counter(e["input_sha256"] for e in ledger["entries"])
    assert len(paid) == 30
    assert set(paid.values()) == {1}, "a job was paid twice"


def test_a_gateway_504_after_an_accepted_submit_is_adopted_by_proof_and_paid_once(tmp_path: Path) -> None:
    """An audit: fal queued the submit, then its ingress answered nginx's "504 Gateway Time-out"
    (no x-fal-request-id). wanbatch called it "not queued" and sent the job again 7 s later: two
    requests, both billed. Now the job waits in ``submit_unknown`` and fal's webhook proves the
    first request: it is adopted, its video fetched, paid once, and nothing is sent twice."""
    options = SimulatorOptions(
        concurrency_limit=4,
        latency_seconds=0.2,
        rng_seed=11,
        faults={"submit_504_after_accept": FaultRule(next=1)},
    )
    with running_simulator(options) as sim:
        base = settings_for(sim.url, "sim-key", database_url=f"sqlite:///{tmp_path / 'w.db'}")
        engine = db.open_engine(base)
        receiver = base.model_copy(update={"webhook_jwks_url": f"{sim.url}/.well-known/jwks.json"})
        server, thread, web_url = _serve(create_app(receiver, engine=engine))
        try:
            settings = base.model_copy(
                update={
                    "webhook_url": f"{web_url}/webhooks/fal",
                    "submit_unknown_deadline": 120.0,
                    "output_dir": tmp_path / "out",
                }
            )
            batch_id = add_batch(engine, "g504", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(3)])
            report, _stats = process_batch(batch_id, settings, show_progress=False)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
        ledger = sim.ledger()
    assert report["counts"]["succeeded"] == 3, report["counts"]
    assert report["possible_duplicate_charges"] == 0
    assert ledger["faults"]["fired"] == {"submit_504_after_accept": 1}
    assert ledger["accepted"] == 3  # one accepted request per job: nothing sent again
    paid = Counter(e["input_sha256"] for e in ledger["entries"] if e["billed"])
    assert sorted(paid.values()) == [1, 1, 1], "a job was paid twice"
    jobs = _jobs(engine, batch_id)
    (unseen,) = [e["request_id"] for e in ledger["entries"] if not e["client_saw_response"]]
    (proved,) = [j for j in jobs if j.request_id == unseen]
    assert (proved.state, proved.attempts, proved.possible_duplicate_charges) == (S.SUCCEEDED, 1, 0)
    with db.session_scope(engine) as session:
        moves = [(str(e.from_state), str(e.to_state)) for e in store.job_events(session, proved.id)]
    assert ("submitting", "submit_unknown") in moves
    assert ("submit_unknown", "queued") in moves


@pytest.mark.slow
def test_a_duplicate_charge_proved_after_the_run_is_counted_billed_and_on_its_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first submit's answer is lost, and its webhook cannot get through (the receiver is
    down): after ``WANBATCH_SUBMIT_UNKNOWN_DEADLINE`` the job is sent again and succeeds. Then
    the receiver comes up and fal's retries deliver the first request's webhook, twice
    (``webhook_duplicate``): the proof that fal ran and billed both requests. It is counted
    once, put on the job's history, and ``cost`` bills it in actual and wasted, as the
    simulator's ledger does, instead of calling it "possibly billed"."""
    options = SimulatorOptions(
        concurrency_limit=5,
        latency_seconds=0.2,
        rng_seed=11,
        faults={"submit_drop": FaultRule(next=1), "webhook_duplicate": FaultRule(probability=1.0)},
        webhook_attempts=200,
        webhook_retry_base_seconds=0.2,
        webhook_retry_max_seconds=0.5,
    )
    database_url = f"sqlite:///{tmp_path / 'w.db'}"
    monkeypatch.setenv("WANBATCH_DATABASE_URL", database_url)  # for `cost` run in this process
    get_settings.cache_clear()
    down = socket.socket()  # bound, not listening: fal's deliveries are refused until it serves
    down.bind(("127.0.0.1", 0))
    web_url = f"http://127.0.0.1:{down.getsockname()[1]}"
    with running_simulator(options) as sim:
        base = settings_for(sim.url, "sim-key", database_url=database_url)
        engine = db.open_engine(base)
        settings = base.model_copy(
            update={
                "webhook_url": f"{web_url}/webhooks/fal",
                "submit_unknown_deadline": 5.0,
                "submit_unknown_policy": "resubmit",
                "webhook_poll_after": 3.0,
                "output_dir": tmp_path / "out",
            }
        )
        batch_id = add_batch(engine, "late-proof", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(5)])
        report, _stats = process_batch(batch_id, settings, show_progress=False)
        assert report["counts"]["succeeded"] == 5, report["counts"]
        jobs = _jobs(engine, batch_id)
        (resent,) = [j for j in jobs if j.attempts == 2]
        billed_ids = {e["request_id"] for e in sim.ledger()["entries"] if e["billed"]}
        (extra,) = billed_ids - {j.request_id for j in jobs}  # attempt 1's: the job kept attempt 2's

        receiver = base.model_copy(update={"webhook_jwks_url": f"{sim.url}/.well-known/jwks.json"})
        server = uvicorn.Server(uvicorn.Config(create_app(receiver, engine=engine), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [down]}, daemon=True)
        thread.start()
        try:
            wait_until(lambda: _delivered_twice(sim, extra), step=lambda: None, timeout=60)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
        ledger = sim.ledger()
    assert _outcomes(engine, extra) == ["duplicate-charge"]  # delivered twice, stored and applied once
    assert _deliveries(engine)["repeats"] >= 1
    # Six requests billed for five jobs; each priced at its job's estimate (the simulator's own
    # price list is not ours), the extra one at the resent job's.
    assert sum(e["billed"] for e in ledger["entries"]) == 6
    billed_usd = sum((j.est_usd for j in jobs), resent.est_usd)
    after = _current(engine, resent.id)
    counts = (after.possible_duplicate_charges, after.confirmed_duplicate_charges)
    assert (after.state, counts) == (S.SUCCEEDED, (1, 1))  # the resend, and the proof it was billed
    assert after.actual_usd == 2 * resent.est_usd
    with db.session_scope(engine) as session:
        history = [e.reason for e in store.job_events(session, resent.id)]
        status = batch_report(session, batch_id)
        cost = cost_report(session, batch_id).total
        assert store.batch_spent_usd(session, batch_id) == billed_usd  # the running totals agree
    assert sum(f"accepted as {extra}" in (reason or "") for reason in history) == 1
    assert (status["possible_duplicate_charges"], status["confirmed_duplicate_charges"]) == (1, 1)
    assert (Decimal(str(status["spent_usd"])), status["possibly_billed_usd"]) == (billed_usd, 0)
    assert "1 confirmed duplicate charge(s)" in money_line(status)
    assert "possibly billed" not in money_line(status)
    assert (cost.actual_usd, cost.wasted_usd, cost.possibly_billed_usd) == (
        billed_usd,
        resent.est_usd,
        Decimal(0),
    )
    table = CliRunner().invoke(cli, ["cost", "late-proof"], prog_name="wanbatch")
    assert table.exit_code == 0, table.output
    assert "possibly billed" not in table.stdout
    assert "possible duplicate charges" not in table.stdout
    assert "1 confirmed duplicate charge(s)" in table.stdout
    get_settings.cache_clear()


@pytest.mark.slow
def test_a_video_proved_after_the_deadline_failed_its_job_is_fetched_beside_a_rerun_s(tmp_path: Path) -> None:
    """The first submit's answer is lost and its webhook cannot get through (the receiver is
    down): at ``WANBATCH_SUBMIT_UNKNOWN_DEADLINE`` the ``fail`` policy fails the job, and the user
    reruns it (``rerun --failed-only``), paying for it again. Then the receiver comes up and fal's
    retries deliver the proof that the first request ran: billed, so ``run NAME`` fetches its
    video into the job that failed — in the batch's own folder, the rerun's video untouched —
    and every request fal billed is counted once. The input was rendered and billed twice (the
    rerun's request and the proved one): the original batch counts it as a confirmed duplicate
    charge (before: both batches said 0, and nothing warned the user)."""
    options = SimulatorOptions(
        concurrency_limit=5,
        latency_seconds=0.2,
        rng_seed=11,
        faults={"submit_drop": FaultRule(next=1)},
        webhook_attempts=200,
        webhook_retry_base_seconds=0.2,
        webhook_retry_max_seconds=0.5,
    )
    down = socket.socket()  # bound, not listening: fal's deliveries are refused until it serves
    down.bind(("127.0.0.1", 0))
    web_url = f"http://127.0.0.1:{down.getsockname()[1]}"
    with running_simulator(options) as sim:
        base = settings_for(sim.url, "sim-key", database_url=f"sqlite:///{tmp_path / 'w.db'}")
        engine = db.open_engine(base)
        settings = base.model_copy(
            update={
                "webhook_url": f"{web_url}/webhooks/fal",
                "submit_unknown_deadline": 2.0,
                "webhook_poll_after": 3.0,
                "output_dir": tmp_path / "out",
            }
        )
        batch_id = add_batch(engine, "late", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(4)])
        report, _stats = process_batch(batch_id, settings, show_progress=False)
        assert (report["counts"]["succeeded"], report["counts"]["failed"]) == (3, 1), report["counts"]
        (lost,) = [j for j in _jobs(engine, batch_id) if j.state == S.FAILED]
        assert (lost.error_type, lost.request_id) == ("submit_unknown", None)
        (proved,) = {e["request_id"] for e in sim.ledger()["entries"]} - {
            j.request_id for j in _jobs(engine, batch_id)
        }

        rerun = rerun_batch(batch_id, failed_only=True, settings=settings)
        process_batch(rerun.batch_id, settings, show_progress=False)
        (again,) = _jobs(engine, rerun.batch_id)
        assert again.state == S.SUCCEEDED
        rerun_video = Path(again.output_path or "").read_bytes()

        receiver = base.model_copy(update={"webhook_jwks_url": f"{sim.url}/.well-known/jwks.json"})
        server = uvicorn.Server(uvicorn.Config(create_app(receiver, engine=engine), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [down]}, daemon=True)
        thread.start()
        try:
            wait_until(lambda: _outcomes(engine, proved) != [], step=lambda: None, timeout=60)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
        assert _outcomes(engine, proved) == [ADOPTED_LATE]
        assert _current(engine, lost.id).state == S.DOWNLOADING
        report, _stats = process_batch(batch_id, settings, show_progress=False)  # `run late` collects it
        ledger = sim.ledger()
    assert report["counts"]["succeeded"] == 4, report["counts"]
    after = _current(engine, lost.id)
    assert (after.state, after.request_id, after.attempts) == (S.SUCCEEDED, proved, 1)
    assert Path(after.output_path or "").parent.name == "late"  # its own batch's folder
    assert after.output_path != again.output_path
    assert Path(again.output_path or "").read_bytes() == rerun_video  # the rerun's video untouched
    assert _current(engine, again.id).output_sha256 == again.output_sha256
    # Five requests billed (four, and the rerun's): each counted once, none possibly billed.
    assert sum(e["billed"] for e in ledger["entries"]) == 5
    with db.session_scope(engine) as session:
        for batch, spent, twice in ((batch_id, 4 * lost.est_usd, 1), (rerun.batch_id, again.est_usd, 0)):
            status = batch_report(session, batch)
            assert store.batch_spent_usd(session, batch) == spent
            assert Decimal(str(status["spent_usd"])) == spent
            assert (status["possibly_billed_usd"], status["confirmed_duplicate_charges"]) == (0, twice)
        history = [e.reason or "" for e in store.job_events(session, lost.id)]
    assert sum("late proof by webhook" in reason for reason in history) == 1


def _jobs(engine: Engine, batch_id: str) -> list[Job]:
    with db.read_scope(engine) as session:
        jobs = list(store.jobs_of_batch(session, batch_id))
        for job in jobs:
            session.expunge(job)
    return jobs


def _delivered_twice(sim: SimulatorHandle, request_id: str) -> bool:
    """Whether both of the simulator's sends of ``request_id``'s webhook got their 2xx."""
    hooks = [w for w in sim.ledger()["webhooks"] if w["request_id"] == request_id]
    answered = [a for w in hooks for a in w["attempts"] if 200 <= a.get("status_code", 0) < 300]
    return len(answered) == 2


#: Jobs of the webhook-driven run, and the seed of its dropped deliveries: the simulator's fault
#: draws come from their own ``Random(seed + 1)`` and only ``webhook_drop`` draws, so seed 11
#: drops exactly 38 of the 200 deliveries (19 %).
WEBHOOK_RUN_JOBS = 200
WEBHOOK_RUN_SEED = 11


@pytest.mark.slow
def test_with_webhooks_a_200_job_run_barely_polls_and_finishes_despite_dropped_deliveries(
    tmp_path: Path,
) -> None:
    """Webhooks tell of completions; the poll comes ``webhook_poll_after`` after a submit, late
    enough that every job whose webhook arrived is never asked about, yet early enough that the
    run stays short. A request spends 0.2 s at fal (its first render: about 1.5 s on a busy
    2-CPU host; one video variant keeps that to a single encode), so a job whose webhook was
    dropped is found COMPLETED by its one poll."""
    jobs = WEBHOOK_RUN_JOBS
    options = SimulatorOptions(
        concurrency_limit=20,
        latency_seconds=0.2,
        rng_seed=WEBHOOK_RUN_SEED,
        faults={"webhook_drop": FaultRule(probability=0.2)},
        video_variants=1,
    )
    with running_simulator(options) as sim:
        base = settings_for(sim.url, "sim-key", database_url=f"sqlite:///{tmp_path / 'w.db'}")
        engine = db.open_engine(base)
        receiver = base.model_copy(update={"webhook_jwks_url": f"{sim.url}/.well-known/jwks.json"})
        app = create_app(receiver, engine=engine)
        server, thread, web_url = _serve(app)
        try:
            settings = base.model_copy(
                update={
                    "webhook_url": f"{web_url}/webhooks/fal",
                    "webhook_poll_after": 4.0,
                    "max_outstanding": 20,
                    "output_dir": tmp_path / "out",
                }
            )
            prompts = [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(jobs)]
            batch_id = add_batch(engine, "hooks-200", prompts)
            report, _stats = process_batch(batch_id, settings, show_progress=False)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
        ledger = sim.ledger()
    dropped = {w["request_id"] for w in ledger["webhooks"] if w["dropped"]}
    delivered = {w["request_id"] for w in ledger["webhooks"] if w["delivered"]}
    status_calls = ledger["calls"].get("status", 0) + ledger["calls"].get("stream", 0)
    print(
        f"{status_calls} status calls for {jobs} jobs ({status_calls / jobs:.3f}/job), {len(dropped)} dropped"
    )

    assert report["counts"]["succeeded"] == jobs, report["counts"]
    assert len(ledger["webhooks"]) == jobs
    assert 0.15 * jobs <= len(dropped) <= 0.25 * jobs  # the fault fired at about its 20 %
    assert ledger["faults"]["fired"]["webhook_drop"] == len(dropped)
    assert len(delivered) == jobs - len(dropped)
    assert app.state.counts.accepted >= len(delivered)
    # Only a poll can finish a job whose webhook was dropped; nothing else is polled.
    assert len(dropped) <= status_calls <= 0.2 * jobs
    paid = Counter(e["input_sha256"] for e in ledger["entries"])
    assert len(paid) == jobs
    assert set(paid.values()) == {1}, "a job was paid twice"


# ----------------------------------------------------------------------------- what fal billed
#
# fal's webhook body is ``{request_id, gateway_request_id, status, payload, error}``: no metrics.
# Whether a failed or cancelled request ran (and so what fal billed for it) is only in its status
# (``metrics.inference_time``), or in what we saw of it ourselves.


@dataclass
class Hooked:
    """A simulator whose webhooks reach a live receiver on the test's database, and a runtime
    that sends to it (polling only when a job is due: ``webhook_poll_after`` is far away)."""

    sim: SimulatorHandle
    rt: Runtime


@pytest.fixture
def hooked(engine: Engine, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Hooked]:
    """An account running one request at once, each for 30 s (a cancel stops a runner), unless
    the test passes its own :class:`SimulatorOptions` (indirect parametrization)."""
    options = getattr(request, "param", None) or SimulatorOptions(
        concurrency_limit=1, latency_seconds=30.0, latency_jitter=0.0, cancel_stops_running=True, rng_seed=5
    )
    with running_simulator(options) as sim:
        base = settings_for(sim.url, "sim-key", output_dir=tmp_path / "out")
        receiver = base.model_copy(update={"webhook_jwks_url": f"{sim.url}/.well-known/jwks.json"})
        server, thread, web_url = _serve(create_app(receiver, engine=engine))
        hooks = {"webhook_url": f"{web_url}/webhooks/fal", "webhook_poll_after": 600.0}
        rt = make_runtime(engine, base.model_copy(update=hooks))
        try:
            yield Hooked(sim, rt)
        finally:
            rt.client.close()
            server.should_exit = True
            thread.join(timeout=10)


def _sent_to_fal(hooked: Hooked, engine: Engine, inputs: list[dict[str, Any]]) -> list[Job]:
    """A batch of ``inputs`` for fal-ai/wan-22, each submitted once, in item order."""
    batch_id = add_batch(engine, "billed", [("fal-ai/wan-22", payload) for payload in inputs])
    claimed = dispatch(hooked.rt)
    assert len(claimed) == len(inputs)
    for job_id in claimed:
        assert submit(hooked.rt, job_id) == "submitted"
    with db.session_scope(engine) as session:
        jobs = list(store.jobs_of_batch(session, batch_id))
        for job in jobs:
            session.expunge(job)
    return jobs


def _delivery_applied(engine: Engine, request_id: str) -> bool:
    """Whether the receiver stored and applied a webhook of ``request_id``."""
    with db.read_scope(engine) as session:
        found = session.scalar(
            select(WebhookDelivery.id).where(
                WebhookDelivery.request_id == request_id, WebhookDelivery.processed_at.is_not(None)
            )
        )
    return found is not None


def _current(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        session.expunge(job)
        return job


def _settle(hooked: Hooked, engine: Engine, job_id: str) -> Job:
    """Run the steps a worker would (poll what is due, download what completed) until the job
    ends; the job as it ended."""

    def step() -> None:
        poll(hooked.rt)
        if _current(engine, job_id).state == S.DOWNLOADING:
            download(hooked.rt, job_id)

    wait_until(lambda: JobState(_current(engine, job_id).state).terminal, step=step)
    return _current(engine, job_id)


def _ledger_entry(sim: SimulatorHandle, request_id: str | None) -> dict[str, Any]:
    return next(dict(e) for e in sim.ledger()["entries"] if e["request_id"] == request_id)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("where", ["running", "queued"])
@pytest.mark.parametrize("first", ["our cancelling", "fal's webhook"])
def test_a_cancel_answered_by_webhook_ends_cancelled_and_billed_as_fal_billed(
    engine: Engine, hooked: Hooked, where: str, first: str
) -> None:
    """``wanbatch cancel`` with a receiver: the job ends ``cancelled``, with what fal billed —
    all of it when its request was running, nothing when it waited in fal's queue — whichever
    lands first, our ``queued`` → ``cancelling`` or fal's webhook of the cancelled request.

    In our records both jobs are ``queued`` (with a receiver nothing is polled before
    ``webhook_poll_after``), though at fal the first runs and the second waits behind it."""
    jobs = _sent_to_fal(hooked, engine, [{"prompt": "a boat"}, {"prompt": "a kite"}])

    def first_runs() -> bool:
        return _ledger_entry(hooked.sim, jobs[0].request_id)["started_at"] is not None

    wait_until(first_runs, step=lambda: None)
    job = jobs[0] if where == "running" else jobs[1]
    assert job.state == S.QUEUED
    fence = store.Fence.of(job, "cancel-step")  # read before the cancel, as the cancel step does
    with db.session_scope(engine) as session:
        store.set_batch_state(session, job.batch_id, BatchState.CANCELLED, reason="cancelled by user")
        if first == "our cancelling":
            assert store.mark_cancelling(session, fence, reason="cancel requested at fal")
    hooked.rt.client.cancel(handle_of(job, hooked.rt.settings.fal_queue_url))
    wait_until(lambda: _delivery_applied(engine, str(job.request_id)), step=lambda: None)
    if first == "fal's webhook":
        poll(hooked.rt)  # the tick's next poll can come before our own move lands
        with db.session_scope(engine) as session:
            store.mark_cancelling(session, fence, reason="cancel requested at fal")  # lands or not

    ended = _settle(hooked, engine, job.id)
    entry = _ledger_entry(hooked.sim, job.request_id)
    assert entry["outcome"] == "cancelled"
    assert entry["billed"] is (where == "running")
    assert (ended.state, ended.error_type) == (S.CANCELLED, "cancelled")
    assert ended.error == "cancelled by user"
    assert ended.actual_usd == (job.est_usd if where == "running" else 0)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    "hooked", [SimulatorOptions(concurrency_limit=2, latency_seconds=0.2, rng_seed=5)], indirect=True
)
def test_a_422_after_inference_reported_by_webhook_is_billed_as_fal_billed(
    engine: Engine, hooked: Hooked
) -> None:
    """fal's runner rejected the input after spending GPU time (422, "may still be charged"):
    its webhook says only ``Invalid status code: 422``; the status's inference time says it ran."""
    (job,) = _sent_to_fal(hooked, engine, [{"resolution": "480p"}])  # no prompt: the runner refuses it
    wait_until(lambda: _delivery_applied(engine, str(job.request_id)), step=lambda: None)

    ended = _settle(hooked, engine, job.id)
    entry = _ledger_entry(hooked.sim, job.request_id)
    assert (entry["outcome"], entry["billed"]) == ("invalid", True)
    assert ended.state == S.FAILED
    assert ended.actual_usd == job.est_usd


def test_a_legacy_cancel_billed_as_running_is_not_billed_twice_on_adoption(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    """A cancel recorded by an earlier version (no ``billed_as`` detail on the event) of a request
    seen running (``running`` -> ``cancelling`` -> ``cancelled``, billed in full), then proved run
    by fal: the whole cancel bill is taken back (``store.seen_running_since_submit``, the poller's
    rule), or the one request is billed twice."""
    job = _sent(engine, request_id="req-A")
    now = utcnow()
    with db.session_scope(engine) as session:
        store.set_batch_state(session, job.batch_id, BatchState.CANCELLED, reason="cancelled by user")
        assert store.mark_running(session, store.Fence.of(job, "poller"), next_poll_at=now)
        running = store.get_job(session, job.id)
        assert store.mark_cancelling(session, store.Fence.of(running, "canceller"), reason="cancel requested")
        cancelling = store.get_job(session, job.id)
        # What the previous version's record_completion wrote: seen running -> billed in full,
        # no ``billed_as`` detail on the event (no metrics in fal's answer).
        assert store.mark_cancelled(
            session,
            store.Fence.of(cancelling, "poller"),
            reason="cancelled at fal (client_cancelled)",
            error="cancelled by user",
            error_type="client_cancelled",
            completed_at=now,
            **billed(Outcome.CANCELLED_RUNNING, cancelling.est_billing_units, cancelling.est_usd),
        )
    cancelled = _job(engine, job.batch_id)
    assert (cancelled.state, cancelled.actual_usd) == (S.CANCELLED, cancelled.est_usd)

    assert _post(client, signer, cancelled, "req-A") == 200  # fal ran it to the end anyway
    adopted = _job(engine, job.batch_id)
    assert adopted.state == S.DOWNLOADING
    _succeed(engine, job.id)
    finished = _job(engine, job.batch_id)
    assert finished.state == S.SUCCEEDED
    # One request, billed once in full.
    assert finished.actual_usd == job.est_usd, f"billed {finished.actual_usd} for one request"
    assert _money_agrees(engine, job.batch_id) == job.est_usd


def _cancel_unsent(engine: Engine, batch_id: str) -> None:
    """``wanbatch cancel`` of the batch (:func:`jobs.batches.cancel_batch`'s moves): every job fal
    holds no request of we know ends ``cancelled`` at once."""
    with db.session_scope(engine) as session:
        store.set_batch_state(session, batch_id, BatchState.CANCELLED, reason="cancelled by user")
        store.cancel_unsent(
            session, [batch_id], reason="batch cancelled", error="cancelled by user", error_type="cancelled"
        )


@pytest.mark.parametrize("where", ["submit_unknown", "resend waiting", "resend given back"])
def test_a_proof_of_the_only_request_of_a_job_cancelled_with_its_outcome_unknown_keeps_its_video(
    engine: Engine, client: TestClient, signer: WebhookSigner, where: str
) -> None:
    """``wanbatch cancel`` while the job's submit outcome was unknown (its answer lost; or
    ``resubmit`` decided to send it again and had not): the job ends ``cancelled`` without a
    request id, its estimate "possibly billed". fal's signed webhook then proves it ran that
    request to the end — the only one the job sent. The job adopts it, fetches its video and is
    billed once in full; nothing is sent, the batch stays cancelled (before: a "confirmed
    duplicate charge", billed as wasted, the paid video dropped, and `rerun --failed-only`
    paying for it again)."""
    if where == "submit_unknown":
        job = _sent(engine, request_id=None, unknown=True)
    else:
        job, _ = _resend_waiting(engine, "waiting" if where == "resend waiting" else "given back")
    _cancel_unsent(engine, job.batch_id)
    cancelled = _job(engine, job.batch_id)
    est = cancelled.est_usd
    assert (cancelled.state, cancelled.request_id, cancelled.attempts) == (S.CANCELLED, None, 1)
    assert cancelled.ambiguous_usd == est
    assert _money_agrees(engine, job.batch_id) == est  # possibly billed, counted as spent

    assert _post(client, signer, cancelled, "req-A", attempt=1) == 200
    assert _post(client, signer, cancelled, "req-A", attempt=1) == 200  # fal's retry of it
    assert _outcomes(engine, "req-A") == [ADOPTED_UNKNOWN_CANCELLED]  # stored once, applied once
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.attempts, after.resend_attempt) == (
        S.DOWNLOADING,
        "req-A",
        1,
        None,
    )
    assert (after.error, after.error_type, after.ambiguous_usd) == (None, None, Decimal(0))
    assert (after.provider_output, after.seed) == (RESULT, 7)
    assert (after.possible_duplicate_charges, after.confirmed_duplicate_charges) == (0, 0)
    assert _money_agrees(engine, job.batch_id) == est  # counted once, in full
    with db.session_scope(engine) as session:
        moves = [(e.from_state, e.to_state) for e in store.job_events(session, job.id)]
    assert moves[-2:] == [(S.CANCELLED, S.QUEUED), (S.QUEUED, S.DOWNLOADING)]

    _succeed(engine, job.id)
    finished = _job(engine, job.batch_id)
    assert (finished.state, finished.request_id, finished.attempts) == (S.SUCCEEDED, "req-A", 1)
    assert (finished.actual_usd, finished.ambiguous_usd) == (est, Decimal(0))
    assert _money_agrees(engine, job.batch_id) == est
    with db.read_scope(engine) as session:
        assert store.get_batch(session, job.batch_id).state == BatchState.CANCELLED  # sends nothing
        total = cost_report(session, job.batch_id).total  # what `wanbatch cost` reports
        report = batch_report(session, job.batch_id)
        moves = [(e.from_state, e.to_state) for e in store.job_events(session, job.id)]
    assert (total.actual_usd, total.wasted_usd, total.possibly_billed_usd) == (est, Decimal(0), Decimal(0))
    assert (total.succeeded, total.cancelled, total.confirmed_duplicate_charges) == (1, 0, 0)
    assert (report["possible_duplicate_charges"], report["confirmed_duplicate_charges"]) == (0, 0)
    # Nothing was sent again: one POST (attempt 1, its outcome unknown), and the request the job
    # went on with is the one adopted from the cancel.
    assert [m for m in moves if m[1] == S.SUBMIT_UNKNOWN] == [(S.SUBMITTING, S.SUBMIT_UNKNOWN)]
    assert [m for m in moves if m[1] in (S.QUEUED, S.RUNNING)] == [(S.CANCELLED, S.QUEUED)]


def test_a_proof_of_an_earlier_request_of_a_job_cancelled_with_its_outcome_unknown_is_a_duplicate(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    """Attempt 1's answer was lost, ``resubmit`` sent attempt 2, whose answer was lost too, and
    the batch was cancelled. A proof that fal ran attempt 1 is of one of two requests the job
    sent: it stays a confirmed duplicate charge (billed, the job still cancelled). A proof of
    attempt 2, the job's last, is adopted: its video fetched, billed once; attempt 1 stays the
    one duplicate."""
    job = _resend_unknown_too(engine, "submit_unknown")
    _cancel_unsent(engine, job.batch_id)
    cancelled = _job(engine, job.batch_id)
    est = cancelled.est_usd
    assert (cancelled.state, cancelled.attempts, cancelled.possible_duplicate_charges) == (S.CANCELLED, 2, 1)
    assert cancelled.ambiguous_usd == 2 * est

    assert _post(client, signer, cancelled, "req-first", attempt=1) == 200
    assert _outcomes(engine, "req-first") == ["duplicate-charge"]
    duplicate = _job(engine, job.batch_id)
    assert (duplicate.state, duplicate.request_id, duplicate.confirmed_duplicate_charges) == (
        S.CANCELLED,
        None,
        1,
    )
    assert (duplicate.actual_usd, duplicate.ambiguous_usd) == (est, est)
    assert _money_agrees(engine, job.batch_id) == 2 * est

    assert _post(client, signer, cancelled, "req-second", attempt=2) == 200
    assert _outcomes(engine, "req-second") == [ADOPTED_UNKNOWN_CANCELLED]
    _succeed(engine, job.id)
    finished = _job(engine, job.batch_id)
    assert (finished.state, finished.request_id, finished.attempts) == (S.SUCCEEDED, "req-second", 2)
    assert (finished.possible_duplicate_charges, finished.confirmed_duplicate_charges) == (1, 1)
    assert (finished.actual_usd, finished.ambiguous_usd) == (2 * est, Decimal(0))
    assert _money_agrees(engine, job.batch_id) == 2 * est
    with db.read_scope(engine) as session:
        total = cost_report(session, job.batch_id).total
    assert (total.confirmed_duplicate_charges, total.wasted_usd) == (1, est)


def test_applied_deliveries_are_pruned_after_the_retention_and_the_counts_stay(
    engine: Engine,
    client: TestClient,
    signer: WebhookSigner,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The inbox only grew, and each `/metrics` scrape summed all of it. Applied deliveries of
    finished jobs are now pruned once older than WANBATCH_WEBHOOK_RETENTION, the counters the
    scrape reads are kept apart (pruning takes nothing off them), and within the retention a
    replay is still recognised as one."""
    # The PostgreSQL engine is the session's: forget when an earlier test pruned through it.
    monkeypatch.setattr("worker.steps.webhooks._pruned_at", {})
    job = _sent(engine, request_id="req-1")
    assert _post(client, signer, job, "req-1") == 200
    assert _post(client, signer, job, "req-1") == 200  # fal's retry: a repeat
    _succeed(engine, job.id)
    rt = make_runtime(engine, settings)
    assert prune_applied(rt, now=0.0) == 0  # within the retention: kept
    assert _post(client, signer, job, "req-1") == 200
    assert _deliveries(engine) == {"stored": 1, "repeats": 2, "unprocessed": 0, "ignored": 0}
    with db.session_scope(engine) as session:  # the retention has passed
        session.execute(update(WebhookDelivery).values(processed_at=utcnow() - timedelta(days=8)))
    assert prune_applied(rt, now=1.0) == 0  # once per PRUNE_EVERY per process
    assert prune_applied(rt, now=PRUNE_EVERY + 1.0) == 1
    with db.read_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0
    assert _deliveries(engine) == {"stored": 1, "repeats": 2, "unprocessed": 0, "ignored": 0}
    assert _current(engine, job.id).state == S.SUCCEEDED


def test_a_delivery_of_a_job_not_finished_is_kept_past_the_retention(
    engine: Engine, client: TestClient, signer: WebhookSigner
) -> None:
    job = _sent(engine, request_id="req-1")
    assert _post(client, signer, job, "req-1") == 200  # downloading: not finished
    with db.session_scope(engine) as session:
        session.execute(update(WebhookDelivery).values(processed_at=utcnow() - timedelta(days=8)))
        assert store.prune_deliveries(session, before=utcnow() - timedelta(days=7)) == 0


def _standing(engine: Engine, how: str) -> Job:
    """One job standing ``how``, its attempt 1 sent: ``queued`` as ``req-A``; ``submit_unknown``;
    its resend ``waiting``; ``cancelled`` with its outcome unknown; its resend's answer lost too;
    ``failed`` for its unknown outcome; failed by the poller, which ``gave up`` on ``req-A``;
    ``cancelled`` by the user's cancel of ``req-A``; back to wait after its ``window`` closed."""
    if how == "queued":
        return _sent(engine, request_id="req-A")
    if how == "submit_unknown":
        return _sent(engine, request_id=None, unknown=True)
    if how == "resend waiting":
        return _resend_waiting(engine, "waiting")[0]
    if how == "cancelled unknown":
        job = _sent(engine, request_id=None, unknown=True)
        _cancel_unsent(engine, job.batch_id)
        return _job(engine, job.batch_id)
    if how == "resend unknown too":
        return _resend_unknown_too(engine, "submit_unknown")
    if how == "failed unknown":
        return _failed_for_unknown_outcome(engine)
    if how == "gave up":
        return _given_up(engine, S.QUEUED)
    if how == "cancelled":
        return _cancelled_by_user(engine, S.QUEUED, {})
    assert how == "window"
    return _window_closed(engine, {})


#: A job's move: from, to, reason.
Move = tuple[JobState, JobState, str | None]


def _expected(job: Job, how: str, ok: bool) -> tuple[str, list[tuple[str, str, str]], JobState, list[Move]]:
    """What applying ``req-A`` (a success when ``ok``) to ``job`` standing ``how`` does: its
    outcome, the webhook lines it logs (level, event, message), the state the job ends in and
    the moves it makes."""
    j, e, fetched = job.id, job.error_type, "its video is fetched"
    done: Move = (S.QUEUED, S.DOWNLOADING, "completed at fal")
    due = (
        "INFO",
        "webhook.status_due",
        f"job {j}: fal reported req-A failed (x); its status says whether it ran: asked now",
    )
    if how == "queued":
        return ("completed", [], S.DOWNLOADING, [done]) if ok else (STATUS_DUE, [due], S.QUEUED, [])
    # How the job stands: its outcome, (level, event, message), the state it adopts req-A from,
    # the reason.
    adoptions: dict[str, tuple[str, tuple[str, str, str], JobState, str]] = {
        "submit_unknown": (
            "adopted",
            ("INFO", "webhook.adopted", f"job {j}: webhook proved fal accepted it as req-A"),
            S.SUBMIT_UNKNOWN,
            "proved by webhook: accepted as req-A",
        ),
        "resend waiting": (
            ADOPTED_BEFORE_RESEND,
            ("WARNING", "webhook.adopted_before_resend",
             f"job {j}: a webhook proved fal accepted attempt 1 as req-A before its resend went out: "
             "kept, not resent"),
            S.RETRY_WAIT,
            "proof by webhook before the resend went out: attempt 1 accepted as req-A; the resend is "
            "dropped, nothing is sent again",
        ),
        "cancelled unknown": (
            ADOPTED_UNKNOWN_CANCELLED,
            ("WARNING", "webhook.adopted_unknown_cancelled",
             f"job {j}: a webhook proved that fal ran its only request req-A (attempt 1, its outcome "
             f"unknown when the job was cancelled) to the end (billed): {fetched}"),
            S.CANCELLED,
            f"proof by webhook, after the job was cancelled with its submit's outcome unknown ({e}): "
            f"attempt 1 accepted as req-A and finished at fal (billed): {fetched}, nothing is sent",
        ),
        "resend unknown too": (
            ADOPTED_EARLIER,
            ("WARNING", "webhook.adopted_earlier",
             f"job {j}: a webhook proved fal ran its earlier attempt 1 as req-A (billed): kept, "
             "nothing is sent again"),
            S.SUBMIT_UNKNOWN,
            "proof by webhook of an earlier attempt: attempt 1 accepted as req-A and finished at fal "
            f"(billed): {fetched}, nothing is sent again",
        ),
        "failed unknown": (
            ADOPTED_LATE,
            ("WARNING", "webhook.adopted_late",
             f"job {j}: a webhook proved, after the job failed for its unknown submit outcome, that "
             f"fal ran it as req-A (billed): {fetched}"),
            S.FAILED,
            "late proof by webhook, after the job failed for its unknown submit outcome: attempt 1 "
            f"accepted as req-A and finished at fal (billed): {fetched}, nothing is sent again",
        ),
        "gave up": (
            ADOPTED_OWN,
            ("WARNING", "webhook.adopted_own",
             f"job {j}: a webhook proved, after the job failed ({e}), that fal ran its request req-A "
             f"(billed): {fetched}"),
            S.FAILED,
            f"proof by webhook, after the job failed ({e}): its request req-A finished at fal "
            f"(billed): {fetched}",
        ),
        "cancelled": (
            ADOPTED_CANCELLED,
            ("WARNING", "webhook.adopted_cancelled",
             f"job {j}: a webhook proved that fal ran its request req-A to the end (billed) though "
             f"our cancel was said to have ended it ({e}): {fetched}, billed in full"),
            S.CANCELLED,
            f"proof by webhook, after our cancel was said to have ended it ({e}): its request req-A "
            f"ran to the end at fal (billed): {fetched}",
        ),
        "window": (
            ADOPTED_WINDOW,
            ("WARNING", "webhook.adopted_window",
             f"job {j}: a webhook proved that fal ran its request req-A to the end (billed) though a "
             f"window's end was said to have ended it: {fetched}, nothing is sent again"),
            S.PENDING,
            f"proof by webhook, after a window's end was said to have ended it ({e}): its request "
            f"req-A ran to the end at fal (billed): {fetched}, nothing is sent again",
        ),
    }  # fmt: skip
    outcome, line, came_from, reason = adoptions[how]
    adopted: Move = (came_from, S.QUEUED, reason)
    if ok:
        return outcome, [line], S.DOWNLOADING, [adopted, done]
    return outcome, [line, due], S.QUEUED, [adopted]  # adopted, its status asked at once


@pytest.mark.parametrize(
    ("how", "ok"),
    [
        ("queued", True),
        ("queued", False),
        ("submit_unknown", True),
        ("submit_unknown", False),
        ("resend waiting", True),
        ("resend waiting", False),
        ("cancelled unknown", True),
        ("resend unknown too", True),
        ("failed unknown", True),
        ("gave up", True),
        ("cancelled", True),
        ("window", True),
    ],
)
def test_each_way_a_delivery_is_applied_says_so_in_its_own_line_and_moves_the_job_its_way(
    engine: Engine,
    client: TestClient,
    signer: WebhookSigner,
    caplog: pytest.LogCaptureFixture,
    how: str,
    ok: bool,
) -> None:
    """Each way a delivery of a job's request is applied — completed, asked for its status, or
    adopted in one of the ways an unknown or ended request is — stores its own outcome, logs its
    own line (its level, event and message, with the job's fields) and moves the job through its
    own states with its own reasons. A failure adopted before a resend went out, or as the
    proof of an ambiguous submit, is adopted and its status asked at once."""
    job = _standing(engine, how)
    outcome, lines, ends, expected_moves = _expected(job, how, ok)
    with db.read_scope(engine) as session:
        seen = len(store.job_events(session, job.id))
    with caplog.at_level(logging.INFO, logger="worker.steps.webhooks"):
        assert _post(client, signer, job, "req-A", ok=ok) == 200
    assert _outcomes(engine, "req-A") == [outcome]
    # The account's pin (``webhook.account_pinned``, an INFO line of ``worker.steps.accounts``)
    # is said by the first verified delivery of a job's own request whose key's account is not
    # known yet. Alone, that logger is at the root's WARNING and the line is dropped; in the full
    # suite an earlier in-process command set the root's level to INFO (worker/logs.py), and it is caught.
    # It is no way of applying a delivery, and has tests of its own.
    said = [
        r
        for r in caplog.records
        if str(getattr(r, "event", "")).startswith("webhook.")
        and getattr(r, "event", "") != "webhook.account_pinned"
    ]
    assert [(r.levelname, getattr(r, "event", ""), r.getMessage()) for r in said] == lines
    assert {(r.job_id, r.batch_id, r.request_id) for r in said} <= {(job.id, job.batch_id, "req-A")}  # type: ignore[attr-defined]
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id) == (ends, "req-A")
    kept = ok and how not in ("queued", "submit_unknown")  # an adoption's success keeps fal's result
    assert (after.provider_output is not None) == kept
    # A request adopted as the proof of an unknown outcome takes fal's gateway id with it.
    unknown = how in (
        "submit_unknown",
        "resend waiting",
        "cancelled unknown",
        "resend unknown too",
        "failed unknown",
    )
    assert after.gateway_request_id == ("req-A" if unknown else None)
    if not ok:  # its status asked at once
        assert after.next_attempt_at is not None
        assert after.next_attempt_at <= utcnow()
    with db.read_scope(engine) as session:
        moves = [(e.from_state, e.to_state, e.reason) for e in store.job_events(session, job.id)[seen:]]
    assert moves == expected_moves


def _cancelled_unknown(engine: Engine) -> Job:
    """One job ``wanbatch cancel`` ended while its submit's outcome was unknown (its answer lost)."""
    job = _sent(engine, request_id=None, unknown=True)
    _cancel_unsent(engine, job.batch_id)
    return _job(engine, job.batch_id)


def _window_ended_then_cancelled(engine: Engine) -> Job:
    """One job whose request a window's end was said to end (waiting for the next window), then
    ended unsent by ``wanbatch cancel`` of its batch."""
    job = _window_closed(engine, {})
    with db.session_scope(engine) as session:
        store.set_batch_state(session, job.batch_id, BatchState.CANCELLED, reason="cancelled by user")
        store.cancel_unsent_jobs(
            session,
            [job.batch_id],
            reason="batch cancelled",
            error="cancelled by user",
            error_type="cancelled",
        )
    return _job(engine, job.batch_id)


#: The failed or cancelled job a proof brings back, as each case leaves it: how it came to end
#: (its helper), the request the proof is of, and what applying it does.
_PROVEN: dict[str, tuple[Callable[[Engine], Job], str, str]] = {
    "submit_unknown": (_failed_for_unknown_outcome, "req-late", ADOPTED_LATE),
    "protocol error": (partial(_given_up, seen=S.RUNNING), "req-A", ADOPTED_OWN),
    "cancelled by user": (
        partial(_cancelled_by_user, seen=S.RUNNING, metrics={}),
        "req-A",
        ADOPTED_CANCELLED,
    ),
    "cancelled unknown": (_cancelled_unknown, "req-A", ADOPTED_UNKNOWN_CANCELLED),
    "window end, cancelled": (_window_ended_then_cancelled, "req-A", ADOPTED_WINDOW),
}


def _with_database(settings: Settings, engine: Engine) -> Settings:
    """``settings`` on ``engine``'s database: what ``rerun`` and a runtime open."""
    return settings.model_copy(update={"database_url": engine.url.render_as_string(hide_password=False)})


def _rerun_failed(engine: Engine, settings: Settings, job: Job) -> Job:
    """``wanbatch rerun BATCH --failed-only`` of ``job``'s batch: its one job, repeating ``job``,
    stored and not sent."""
    made = rerun_batch(job.batch_id, failed_only=True, settings=_with_database(settings, engine))
    again = _job(engine, made.batch_id)
    assert (again.rerun_of, again.state, again.attempts) == (job.id, S.PENDING, 0)
    return again


def _repeat_at(engine: Engine, again: Job, where: str) -> Job:
    """The rerun's pending job ``again`` left ``where``: ``pending``; ``claimed`` (dispatched,
    its POST not recorded as sent); ``sent`` (its POST recorded, accepted as ``req-rerun``)."""
    if where != "pending":
        now = utcnow()
        with db.session_scope(engine) as session:
            fence = store.Fence.of(again, "test-worker")
            lease = now + timedelta(seconds=60)
            assert store.mark_submitting(session, fence, attempt=1, api_key_id="k", lease_expires_at=lease)
            if where == "sent":
                submitting = store.Fence(again.id, S.SUBMITTING, again.version + 1, "test-worker")
                taken = store.record_send(
                    session, submitting, now=now, lease_seconds=60, submitted_input=dict(again.input),
                    sent_at=now, api_key_id="k",
                )  # fmt: skip
                assert taken is not None
                assert store.mark_submitted(
                    session, taken, running=False, request_id="req-rerun", gateway_request_id=None,
                    status_url=None, response_url=None, cancel_url=None, submitted_at=now, next_poll_at=now,
                )  # fmt: skip
    return _current(engine, again.id)


@pytest.mark.parametrize("where", ["pending", "claimed"])
@pytest.mark.parametrize("case", list(_PROVEN))
def test_a_proof_that_brings_a_job_s_video_back_ends_its_rerun_not_sent_yet_unsent(
    engine: Engine, client: TestClient, signer: WebhookSigner, settings: Settings, case: str, where: str
) -> None:
    """The job failed (its submit's outcome unknown; the poller gave up on fal's status) or was
    cancelled (fal said our cancel ended its request; its outcome unknown), and the user ran
    ``rerun BATCH --failed-only``: a new job repeating it, not sent yet (``claimed``: dispatched,
    its POST not out). Then fal's signed webhook proves fal ran the job's request to the end: the
    job adopts it and its video is fetched. Its repeat is ended unsent (``cancelled``,
    ``original_kept_late_request``), never POSTed, and ``status`` of the rerun says why (before:
    only a job failed for its unknown outcome did so; the others' repeats were sent, the input
    paid twice with nothing said)."""
    failed, request_id, outcome = _PROVEN[case]
    job = failed(engine)
    assert JobState(job.state).terminal
    again = _repeat_at(engine, _rerun_failed(engine, settings, job), where)

    assert _post(client, signer, job, request_id, attempt=1) == 200
    assert _outcomes(engine, request_id) == [outcome]
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.provider_output) == (S.DOWNLOADING, request_id, RESULT)
    assert after.confirmed_duplicate_charges == 0  # nothing paid twice
    ended = _current(engine, again.id)
    assert (ended.state, ended.error_type) == (S.CANCELLED, store.REPEAT_NOT_SENT_ERROR)
    assert (ended.sent_at, ended.submitted_at, ended.request_id) == (None, None, None)
    assert f"the job it repeats, {job.id}, keeps fal's request {request_id}" in (ended.error or "")
    with db.read_scope(engine) as session:
        reasons = [e.reason or "" for e in store.job_events(session, job.id)]
        report = batch_report(session, again.batch_id)
    assert f"its rerun (job {again.id}), not sent yet, is cancelled" in reasons[-2]
    (group,) = report["failures"]
    assert (group["error_type"], group["count"], group["sent"]) == (store.REPEAT_NOT_SENT_ERROR, 1, False)
    assert "gets its video from its own request after all" in (group["next_step"] or "")
    rt = make_runtime(engine, _with_database(settings, engine))
    assert dispatch(rt) == []  # nothing left to send
    if where == "claimed":
        assert submit(rt, again.id) != "submitted"  # its submit message, handled late: not sent
    assert _current(engine, again.id).sent_at is None  # never POSTed

    _succeed(engine, job.id)
    assert _job(engine, job.batch_id).state == S.SUCCEEDED


@pytest.mark.parametrize("case", list(_PROVEN))
def test_a_proof_that_comes_after_the_rerun_was_sent_leaves_the_rerun_and_counts_a_duplicate_charge(
    engine: Engine, client: TestClient, signer: WebhookSigner, settings: Settings, case: str
) -> None:
    """The rerun's job went out before the proof came: fal renders and bills the input twice.
    The rerun is left as it is (its own request, its own video), and the job the proof brings
    back counts one confirmed duplicate charge, said on its history."""
    failed, request_id, outcome = _PROVEN[case]
    job = failed(engine)
    again = _repeat_at(engine, _rerun_failed(engine, settings, job), "sent")
    assert (again.state, again.request_id) == (S.QUEUED, "req-rerun")

    assert _post(client, signer, job, request_id, attempt=1) == 200
    assert _outcomes(engine, request_id) == [outcome]
    after = _job(engine, job.batch_id)
    assert (after.state, after.request_id, after.confirmed_duplicate_charges) == (
        S.DOWNLOADING,
        request_id,
        1,
    )
    left = _current(engine, again.id)
    assert (left.state, left.request_id, left.version) == (S.QUEUED, "req-rerun", again.version)
    with db.read_scope(engine) as session:
        reasons = [e.reason or "" for e in store.job_events(session, job.id)]
        assert batch_report(session, job.batch_id)["confirmed_duplicate_charges"] == 1
    assert f"its rerun, job {again.id}, was sent too" in reasons[-2]


@pytest.mark.parametrize("case", list(_PROVEN))
def test_a_rerun_made_after_the_proof_brought_the_job_back_does_not_repeat_it(
    engine: Engine, client: TestClient, signer: WebhookSigner, settings: Settings, case: str
) -> None:
    """The other order: the proof comes first, and the job is on its way to its video (or has
    it): ``rerun --failed-only`` finds nothing failed to repeat, and stores nothing."""
    failed, request_id, outcome = _PROVEN[case]
    job = failed(engine)
    assert _post(client, signer, job, request_id, attempt=1) == 200
    assert _outcomes(engine, request_id) == [outcome]
    with pytest.raises(NothingToRerun):
        rerun_batch(job.batch_id, failed_only=True, settings=_with_database(settings, engine))
    _succeed(engine, job.id)
    with pytest.raises(NothingToRerun):
        rerun_batch(job.batch_id, failed_only=True, settings=_with_database(settings, engine))
    with db.read_scope(engine) as session:
        assert [b.id for b in store.list_batches(session)] == [job.batch_id]
