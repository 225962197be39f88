"""The dashboard's answer to a database error is the error's own: only a locked or unreachable
database is "unavailable" (503, see ``test_serve_hardening``); a value of the request the
database refuses is the request's (400, one line, one warning); any other database error is the
dashboard's (500, one line; the log has the traceback). Never a traceback, the fal key or the
database password in an answer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from jobs import store
from jobs.models import BatchState
from jobs.settings import Settings
from tests.web.web_helpers import FAL_KEY, HTML, JSON, TOKEN, app_for, client, mixed_batch, settings_for

BEARER = {"Authorization": f"Bearer {TOKEN}"}
#: The database URL's password (PostgreSQL's trust authentication never asks for it), which no
#: answer may show.
PASSWORD = "db-pass-5e0c7a91d2"


def _settings(engine: Engine, output_dir: Path) -> Settings:
    """The dashboard's settings, the database URL with :data:`PASSWORD` on PostgreSQL."""
    settings = settings_for(engine, output_dir, token=TOKEN)
    if engine.dialect.name == "postgresql":
        url = engine.url.set(password=PASSWORD).render_as_string(hide_password=False)
        settings = settings.model_copy(update={"database_url": url})
    return settings


def _one_line(answer: Any) -> str:
    body: str = answer.text
    assert "Traceback" not in body
    assert FAL_KEY not in body
    assert PASSWORD not in body
    if "<html" not in body:
        assert answer.headers["content-type"].startswith("text/plain")
        assert "\n" not in body.strip()
    return body


def _dashboard_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "web.app"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_value_postgresql_refuses_is_a_400_not_an_outage(
    engine: Engine, session: Session, output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL's text cannot hold NUL: a batch reference, filter or job id carrying one is a
    data error the same request meets again, so it is the request's (400), never "unavailable"."""
    batch_id = mixed_batch(session, items=10).batch.id
    session.commit()
    browser: TestClient = client(app_for(engine, _settings(engine, output_dir)))
    with caplog.at_level(logging.INFO):
        answers = [
            browser.get("/batches/ab%00cdef", headers=HTML),
            browser.get(f"/batches/{batch_id}?endpoint=fal-ai%00", headers=JSON),
            browser.get("/jobs/ab%00cd/video", headers=HTML),
            browser.post(f"/batches/{batch_id}%00/cancel", headers={**BEARER, **JSON}),
            browser.post(f"/batches/{batch_id}%00/pause", headers={**BEARER, **HTML}),
        ]
    for answer in answers:
        assert answer.status_code == 400, (answer.request.url, answer.text)
        body = _one_line(answer)
        assert "refuses a value of this request" in body
        assert "unavailable" not in body
    assert "<html" in answers[0].text
    assert "Bad request" in answers[0].text
    records = _dashboard_records(caplog)
    assert len(records) == len(answers)
    for record in records:
        assert record.levelno == logging.WARNING
        assert record.exc_info is None
        assert record.__dict__["event"] == "dashboard.request_refused"
        assert "NUL" in record.getMessage()
        assert "unavailable" not in record.getMessage()
    session.expire_all()  # what the dashboard's transactions left, not what this session read
    with session.begin():
        assert store.get_batch(session, batch_id).state == BatchState.ACTIVE
        assert not store.get_batch(session, batch_id).paused_by_user
    assert browser.get(f"/batches/{batch_id}", headers=HTML).status_code == 200


def test_any_other_database_error_is_a_500_logged_with_its_traceback(
    engine: Engine,
    session: Session,
    output_dir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A use case that breaks a constraint (a bug: here cancelling inserts a second batch of the
    same id) meets the driver's real integrity error: the dashboard's own failure, answered 500
    with one line, logged as an error with its traceback; what it did is rolled back."""
    batch_id = mixed_batch(session, items=10).batch.id
    session.commit()

    def broken(session: Session, batch_ids: list[str], **_kw: Any) -> int:
        twice = text("INSERT INTO batches SELECT * FROM batches WHERE id = :id")
        session.execute(twice, {"id": batch_ids[0]})
        return 0

    monkeypatch.setattr(store, "cancel_unsent_jobs", broken)
    browser: TestClient = client(app_for(engine, _settings(engine, output_dir)))
    with caplog.at_level(logging.INFO):
        answers = [
            browser.post(f"/batches/{batch_id}/cancel", headers={**BEARER, **JSON}),
            browser.post(f"/batches/{batch_id}/cancel", headers={**BEARER, **HTML}),
        ]
    for answer in answers:
        assert answer.status_code == 500, answer.text
        body = _one_line(answer)
        assert "the dashboard failed on a database error" in body
        assert "unavailable" not in body
    assert "<html" in answers[1].text
    records = _dashboard_records(caplog)
    assert len(records) == len(answers)
    for record in records:
        assert record.levelno == logging.ERROR
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], IntegrityError)
        assert record.__dict__["event"] == "dashboard.database_error"
        assert "unavailable" not in record.getMessage()
    session.expire_all()  # what the dashboard's transactions left, not what this session read
    with session.begin():
        assert store.get_batch(session, batch_id).state == BatchState.ACTIVE
