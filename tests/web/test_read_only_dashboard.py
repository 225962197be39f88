"""The dashboard's actions, login and logout on a read-only database (SQLite ``mode=ro``;
PostgreSQL with ``default_transaction_read_only = on``).

Before: on PostgreSQL every action (pause, resume, cancel, rerun) was a 500 "the dashboard
failed" with a traceback logged as the dashboard's bug; on SQLite a 409 "Conflict", as if the
batch were in the way; a login whose cookie key was never made, and (SQLite) a logout, were a
500 with a traceback; a page requested with a login cookie while that key was never made, a 500
too. Now an action, or a login, is a 503 saying the database is read-only (one JSON object for
a script, a page for a browser), one warning line without a traceback; a logout deletes the
cookie with its one warning; the pages read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient

from jobs import store
from jobs.db import make_engine, session_factory
from tests.read_only import read_only_url, secret_removed
from tests.web.web_helpers import TOKEN, app_for, mixed_batch, settings_for
from web.auth import cookie_secret
from web.dashboard import DATABASE_READ_ONLY

HOST = "127.0.0.1:8788"
ORIGIN = f"http://{HOST}"
JSON = {"Accept": "application/json"}
HTML = {"Accept": "text/html"}
BEARER = {"Authorization": f"Bearer {TOKEN}", "Origin": ORIGIN}


def _read_only_browser(engine: Engine, output_dir: Path) -> TestClient:
    ro = make_engine(read_only_url(engine))
    settings = settings_for(ro, output_dir, token=TOKEN)
    app = app_for(ro, settings)
    return TestClient(
        app,
        client=("127.0.0.1", 50123),
        base_url=ORIGIN,
        follow_redirects=False,
        raise_server_exceptions=False,
    )


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("action", ["pause", "cancel", "rerun-failed"])
def test_an_action_on_a_read_only_database_is_503_saying_so(
    engine: Engine, output_dir: Path, action: str, caplog: pytest.LogCaptureFixture
) -> None:
    with session_factory(engine)() as session:
        batch = mixed_batch(session, items=10).batch
    browser = _read_only_browser(engine, output_dir)
    for accept in (JSON, HTML):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            answer = browser.post(f"/batches/{batch.id}/{action}", headers={**accept, **BEARER})
        assert answer.status_code == 503, answer.text
        if accept is JSON:
            assert answer.json() == {"ok": False, "error": DATABASE_READ_ONLY}
        else:
            assert answer.headers["content-type"].startswith("text/html")
            assert "the database is read-only" in answer.text
        (warning,) = _warnings(caplog)
        assert warning.levelno == logging.WARNING
        assert warning.exc_info is None
        assert "the database is read-only" in warning.getMessage()
        assert (
            "mode=ro" if engine.dialect.name == "sqlite" else "transaction_read_only"
        ) in warning.getMessage()
    with session_factory(engine)() as session:  # nothing changed
        again = store.get_batch(session, batch.id)
        assert (again.paused_by_user, again.state) == (False, batch.state)
        assert len(store.list_batches(session)) == 1


def test_the_pages_still_read(engine: Engine, output_dir: Path) -> None:
    with session_factory(engine)() as session:
        batch = mixed_batch(session, items=10).batch
    browser = _read_only_browser(engine, output_dir)
    assert browser.get("/", headers={**HTML, **BEARER}).status_code == 200
    assert browser.get(f"/batches/{batch.id}", headers={**HTML, **BEARER}).status_code == 200


def test_a_login_whose_cookie_key_cannot_be_made_is_503(
    engine: Engine, output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No serve that could write ever made the key of the cookie's name: a login cannot be given."""
    with secret_removed(engine, "dashboard_cookie"):
        browser = _read_only_browser(engine, output_dir)
        with caplog.at_level(logging.WARNING):
            answer = browser.post(
                "/login", data={"token": TOKEN, "next": "/"}, headers={**HTML, "Origin": ORIGIN}
            )
        assert answer.status_code == 503, answer.text
        assert "the database is read-only" in answer.text
        assert "set-cookie" not in answer.headers
        (warning,) = _warnings(caplog)
        assert warning.exc_info is None
        # A page asked for with a login cookie (of another serve, or stale): no credential (sent to
        # log in, as without one), not a 500; the token reads.
        stale = {"Cookie": "wanbatch_session_0badc0de=1.2.3"}
        page = browser.get("/", headers={**HTML, **stale})
        assert page.status_code == 303, page.text
        assert page.headers["location"].startswith("/login")
        assert browser.get("/", headers={**HTML, **stale, **BEARER}).status_code == 200


def test_a_logout_on_a_read_only_database_deletes_the_cookie(
    engine: Engine, output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cookie_secret(engine)  # made by a serve that could write
    browser = _read_only_browser(engine, output_dir)
    login = browser.post("/login", data={"token": TOKEN, "next": "/"}, headers={**HTML, "Origin": ORIGIN})
    assert login.status_code == 303, login.text
    with caplog.at_level(logging.WARNING):
        answer = browser.post("/logout", headers={**HTML, "Origin": ORIGIN})
    assert answer.status_code == 303, answer.text
    assert (
        "max-age=0" in answer.headers["set-cookie"].lower()
        or "expires=" in answer.headers["set-cookie"].lower()
    )
    warned = [r for r in caplog.records if r.__dict__.get("event") == "dashboard.logout_not_recorded"]
    assert len(warned) == 1
    assert warned[0].exc_info is None
