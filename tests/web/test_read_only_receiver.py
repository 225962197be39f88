"""The webhook receiver on a read-only database (SQLite ``mode=ro``; PostgreSQL with
``default_transaction_read_only = on``).

Before: every delivery was refused with a 500 — on SQLite an uncaught ``ConfigError`` traceback
from Starlette (plain text, not counted), on PostgreSQL "an error of the receiver" logged as our
bug — while ``/healthz`` said ok. Now a delivery is refused 503 (fal delivers it again) saying
the database is read-only, counted, in one warning line without a traceback; ``/healthz`` says
so (not ok, a 503); ``serve`` warns at its start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, event

from falsim.webhooks import WebhookSigner, webhook_body
from jobs import db
from jobs.db import make_engine
from jobs.errors import DatabaseReadOnlyError
from tests.read_only import secret_removed
from tests.web.web_helpers import REMOTE, settings_for
from web.app import DATABASE_READ_ONLY, create_app, warn_if_read_only
from worker.fal.webhooks import JwksKeys
from worker.steps.webhooks import binding_token, database_fingerprint, webhook_secret


def _keys(signer: WebhookSigner) -> JwksKeys:
    doc = signer.jwks()
    return JwksKeys(
        "http://jwks.test/", transport=httpx.MockTransport(lambda _r: httpx.Response(200, json=doc))
    )


@pytest.fixture
def read_only(engine: Engine, tmp_path: Path) -> Iterator[Engine]:
    """An engine on ``engine``'s database that may not write to it: SQLite's ``mode=ro``, or a
    PostgreSQL session whose ``default_transaction_read_only`` is on (this session's setting:
    the shared server is not reconfigured)."""
    if engine.dialect.name == "sqlite":
        url = f"sqlite:///{engine.url.database}?mode=ro"
        ro = make_engine(url)
    else:
        ro = make_engine(engine.url.render_as_string(hide_password=False))

        @event.listens_for(ro, "connect")
        def _read_only_session(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("SET SESSION default_transaction_read_only = on")
            cursor.close()
            dbapi_connection.commit()

    yield ro
    ro.dispose()


def test_a_read_only_database_refuses_deliveries_503_and_healthz_says_so(
    engine: Engine, read_only: Engine, output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = webhook_secret(engine)  # made by a writer (a run), as before any delivery
    signer = WebhookSigner()
    app = create_app(settings_for(read_only, output_dir), engine=read_only, keys=_keys(signer))
    body = webhook_body("req-1", "req-1", True, {"video": {"url": "https://x/v.mp4"}}, None)
    headers = signer.headers("req-1", "user-1", body)
    token = binding_token(secret, "job-1", 1)

    async def main() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=REMOTE, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8788") as client:
            hook = await client.post(
                f"/webhooks/fal?job_id=job-1&attempt=1&token={token}", content=body, headers=headers
            )
            return hook, await client.get("/healthz")

    with caplog.at_level(logging.WARNING):
        hook, health = asyncio.run(main())
    assert hook.status_code == 503, hook.text  # fal delivers it again
    assert hook.json() == {"ok": False, "error": DATABASE_READ_ONLY}
    assert app.state.counts.rejected == 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].levelno == logging.WARNING
    assert warnings[0].exc_info is None
    assert "read-only" in warnings[0].getMessage()
    assert health.status_code == 503
    said = health.json()
    assert said["ok"] is False
    assert said["database_read_only"] is True
    assert said["database_error"] == DATABASE_READ_ONLY
    assert said["database"] == database_fingerprint(secret)  # it still says which one
    assert said["rejected"] == 1


def test_healthz_of_a_read_only_database_without_a_webhook_secret(
    engine: Engine, read_only: Engine, output_dir: Path
) -> None:
    """No secret yet (no run made one), and none can be made: said, not a 500."""
    with secret_removed(engine, "webhook"):
        app = create_app(settings_for(read_only, output_dir), engine=read_only, keys=_keys(WebhookSigner()))

        async def main() -> httpx.Response:
            transport = httpx.ASGITransport(app=app, client=REMOTE, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8788") as client:
                return await client.get("/healthz")

        health = asyncio.run(main())
    assert health.status_code == 503, health.text
    assert health.json()["database_error"] == DATABASE_READ_ONLY
    assert health.json()["database"] is None


def test_healthz_of_a_writable_database_is_ok(engine: Engine, output_dir: Path) -> None:
    app = create_app(settings_for(engine, output_dir), engine=engine, keys=_keys(WebhookSigner()))

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=REMOTE)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8788") as client:
            return await client.get("/healthz")

    health = asyncio.run(main())
    assert health.status_code == 200
    assert (health.json()["ok"], health.json()["database_read_only"]) == (True, False)


def test_serve_warns_at_its_start_that_deliveries_cannot_be_stored(
    engine: Engine, read_only: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert warn_if_read_only(engine) is False
        assert caplog.records == []
        assert warn_if_read_only(read_only) is True
    (line,) = [r.getMessage() for r in caplog.records]
    assert "the database is read-only" in line
    assert "webhook deliveries cannot be stored" in line
    assert ("mode=ro" if engine.dialect.name == "sqlite" else "transaction_read_only") in line


def test_a_file_this_user_may_not_write_is_read_only(tmp_path: Path, sqlite_engine: Engine) -> None:
    copy = tmp_path / "copy.db"
    sqlite_engine.dispose()
    shutil.copyfile(str(sqlite_engine.url.database), copy)
    ro = make_engine(f"sqlite:///{copy}")
    try:
        assert db.read_only_reason(ro) is None
        copy.chmod(0o444)
        reason = db.read_only_reason(ro)
        if os.geteuid() == 0:  # root writes any file: SQLite would too
            assert reason is None
        else:
            assert reason is not None
            assert "may not write its file" in reason
    finally:
        copy.chmod(0o644)
        ro.dispose()


def test_a_refusal_for_a_read_only_database_is_not_said_for_ever(
    engine: Engine, output_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery refused while the database was read-only (a file system remounted read-only
    for a while, a standby since promoted) made ``/healthz`` answer 503 "read-only" until a
    delivery was stored again: with nothing delivered since (the batch done, or a health check
    that routes fal's retries away from a receiver not ok), for ever, though the database takes
    writes again, and ``doctor`` failed saying so. Now it is said for a while after the refusal
    (:data:`web.receiver.READ_ONLY_HOLD_SECONDS`), then the database's own setting decides."""
    import web.receiver

    secret = webhook_secret(engine)
    signer = WebhookSigner()
    app = create_app(settings_for(engine, output_dir), engine=engine, keys=_keys(signer))
    body = webhook_body("req-1", "req-1", True, {"video": {"url": "https://x/v.mp4"}}, None)
    headers = signer.headers("req-1", "user-1", body)
    token = binding_token(secret, "job-1", 1)

    def read_only_now(*_a: Any, **_k: Any) -> None:
        raise DatabaseReadOnlyError("the database is read-only")

    async def main() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=REMOTE, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8788") as client:
            with monkeypatch.context() as patch:
                patch.setattr(web.receiver, "receive", read_only_now)
                hook = await client.post(
                    f"/webhooks/fal?job_id=job-1&attempt=1&token={token}", content=body, headers=headers
                )
            just_after = await client.get("/healthz")
            monkeypatch.setattr(web.receiver, "READ_ONLY_HOLD_SECONDS", 0.0, raising=False)
            return hook, just_after, await client.get("/healthz")

    hook, just_after, later = asyncio.run(main())
    assert hook.status_code == 503, hook.text
    assert just_after.status_code == 503  # just refused for it: said
    assert just_after.json()["database_read_only"] is True
    assert later.status_code == 200, later.text  # writable again, nothing delivered since
    assert (later.json()["ok"], later.json()["database_read_only"]) == (True, False)


def test_serve_answers_at_once_while_its_database_is_asked_whether_it_is_read_only(
    engine: Engine, output_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-only look at ``serve``'s start was awaited in its lifespan: a PostgreSQL server
    that does not answer (a partitioned network: libpq's connect_timeout, 10 s) held every
    request — ``/healthz`` and the dashboard included — until it gave up. Now it is asked beside."""
    import threading
    import time

    from starlette.testclient import TestClient

    asked = threading.Event()
    answer = threading.Event()

    def slow_reason(_engine: Engine) -> str | None:
        asked.set()
        answer.wait(10)
        return None

    monkeypatch.setattr(db, "read_only_reason", slow_reason)
    app = create_app(
        settings_for(engine, output_dir), engine=engine, keys=_keys(WebhookSigner()), heartbeat=True
    )
    started = time.monotonic()
    try:
        with TestClient(app, client=("127.0.0.1", 5000)) as http:
            took = time.monotonic() - started
            assert asked.wait(5)
            answer.set()
            assert http.get("/healthz").status_code == 200
    finally:
        answer.set()
    assert took < 5, took
