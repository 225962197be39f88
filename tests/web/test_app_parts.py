"""The parts ``wanbatch serve``'s app is wired from stand on their own: the webhook receiver
(:class:`web.receiver.WebhookReceiver`) on an app with nothing else, and the dashboard's answer
to a database error (:meth:`web.dashboard.Dashboard.database_error`,
:meth:`~web.dashboard.Dashboard.database_locked`) as its own, with the lines, statuses and log
records the whole app gives (``tests/web/test_database_errors.py``, ``test_serve_hardening.py``
and ``tests/integration/test_webhooks.py`` cover them through :func:`web.app.create_app`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

import web.app
import web.dashboard
import web.receiver
from falsim.webhooks import WebhookSigner, webhook_body
from jobs import db
from jobs.errors import DatabaseLockedError
from jobs.models import WebhookDelivery
from tests.web.web_helpers import JSON, settings_for
from web.dashboard import DASHBOARD_FAILED, REQUEST_NOT_STORABLE, Dashboard
from web.receiver import DATABASE_UNAVAILABLE, NOT_OURS, WebhookReceiver
from worker.fal.webhooks import JwksKeys
from worker.steps.webhooks import Inbox, database_fingerprint, webhook_secret


def _keys(signer: WebhookSigner) -> JwksKeys:
    """fal's signing keys, ``signer``'s, served by an in-process transport."""
    document = signer.jwks()
    return JwksKeys(
        "https://jwks.example.test/.well-known/jwks.json",
        transport=httpx.MockTransport(lambda _request: httpx.Response(200, json=document)),
    )


def test_the_receiver_alone_verifies_before_it_binds_and_stores(
    sqlite_engine: Engine, output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Mounted with nothing else (no dashboard, no auth), the receiver refuses an unsigned
    delivery for its signature before it looks at the URL's token, and a signed one whose URL
    carries no token of ours for its binding (403); each refusal counted, logged on one line by
    ``web.app`` as always, and nothing stored. ``/healthz`` reports both counts, the keys and
    the database it serves."""
    settings = settings_for(sqlite_engine, output_dir)
    signer = WebhookSigner()
    receiver = WebhookReceiver(sqlite_engine, Inbox(sqlite_engine, settings), _keys(signer))
    body = webhook_body("req-1", "gw-1", ok=True, payload={"seed": 7}, error=None)
    with TestClient(Starlette(routes=receiver.routes())) as http, caplog.at_level(logging.WARNING):
        unsigned = http.post("/webhooks/fal", params={"job_id": "j1", "attempt": "1"}, content=body)
        unbound = http.post(
            "/webhooks/fal",
            params={"job_id": "j1", "attempt": "1"},
            content=body,
            headers=signer.headers("req-1", "user-1", body),
        )
        health = http.get("/healthz").json()
    assert (unsigned.status_code, unsigned.json()) == (
        401,
        {"ok": False, "error": "missing X-Fal-Webhook-* headers"},
    )
    assert (unbound.status_code, unbound.json()) == (403, {"ok": False, "error": NOT_OURS})
    lines = [r.getMessage() for r in caplog.records if r.name == "web.app"]
    assert lines == [
        "webhook rejected (401) from testclient: missing X-Fal-Webhook-* headers",
        f"webhook rejected (403) from testclient: {NOT_OURS} (job j1, attempt 1)",
    ]
    assert (receiver.counts.accepted, receiver.counts.rejected) == (0, 2)
    with db.session_scope(sqlite_engine) as session:
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0
    assert health == {
        "ok": True,
        "accepted": 0,
        "rejected": 2,
        "misrouted": 0,
        "can_verify_signatures": True,
        "signing_keys": 1,
        "signing_keys_error": None,
        "database": database_fingerprint(webhook_secret(sqlite_engine)),
        "database_error": None,
        "database_read_only": False,
    }


def _failing(exc: Exception) -> Route:
    def fails(_request: Request) -> Response:
        raise exc

    return Route("/batches/{ref:str}/{action:str}", fails, methods=["POST"])


@pytest.mark.parametrize(
    ("exc", "status", "error", "level", "event"),
    [
        (
            OperationalError("SELECT 1", {}, Exception("database is locked")),
            503,
            DATABASE_UNAVAILABLE,
            logging.WARNING,
            "dashboard.database_unavailable",
        ),
        (
            DataError("SELECT 1", {}, Exception("value too long")),
            400,
            REQUEST_NOT_STORABLE,
            logging.WARNING,
            "dashboard.request_refused",
        ),
        (
            IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed")),
            500,
            DASHBOARD_FAILED,
            logging.ERROR,
            "dashboard.database_error",
        ),
        (
            DatabaseLockedError("the database is locked by session 42 (wanbatch run)"),
            503,
            "the database is locked by session 42 (wanbatch run)",
            logging.WARNING,
            "dashboard.database_locked",
        ),
    ],
    ids=["unavailable", "data error", "other", "lock waited"],
)
def test_the_dashboard_answers_its_own_database_errors(
    sqlite_engine: Engine,
    output_dir: Path,
    caplog: pytest.LogCaptureFixture,
    exc: Exception,
    status: int,
    error: str,
    level: int,
    event: str,
) -> None:
    """The dashboard's failure policy is the dashboard's: its handlers, on an app of their own,
    answer a script's action with the one JSON line and status the whole app gives, and log one
    line (by ``web.app``, as always) with its event."""
    dashboard = Dashboard(sqlite_engine, settings_for(sqlite_engine, output_dir))
    app = Starlette(
        routes=[_failing(exc)],
        exception_handlers={
            OperationalError: dashboard.database_error,
            DataError: dashboard.database_error,
            IntegrityError: dashboard.database_error,
            DatabaseLockedError: dashboard.database_locked,
        },
    )
    with TestClient(app) as http, caplog.at_level(logging.WARNING):
        answer = http.post("/batches/b1/pause", headers=JSON)
    assert (answer.status_code, answer.json()) == (status, {"ok": False, "error": error})
    (record,) = [r for r in caplog.records if r.name == "web.app"]
    assert (record.levelno, record.__dict__["event"], record.__dict__["status"]) == (level, event, status)
    assert record.getMessage().startswith("dashboard: POST /batches/b1/pause from testclient")


def test_the_app_module_still_offers_its_names() -> None:
    """What ``web.app`` offered before the receiver and the dashboard's error answers moved out
    of it is still importable from it, the same objects."""
    for name in web.app.__all__:
        assert hasattr(web.app, name), name
    assert web.app.DATABASE_UNAVAILABLE is web.receiver.DATABASE_UNAVAILABLE
    assert web.app.REQUEST_NOT_STORABLE is web.dashboard.REQUEST_NOT_STORABLE
    assert web.app.MAX_BODY_BYTES == web.receiver.MAX_BODY_BYTES
