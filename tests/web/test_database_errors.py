"""The dashboard's answer to a database error is the error's own: only a locked or unreachable
database is "unavailable" (503, see ``test_serve_hardening``), a full disk stops actions (503,
saying so) but no page; a value of the request the database refuses is the request's (400, one
line, one warning); any other database error is the dashboard's (500, one line; the log has the
traceback). Never a traceback, the fal key or the database password in an answer. A NUL in a
reference never reaches the database: it names nothing, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from jobs import store
from jobs.db import make_engine, migrate, session_factory
from jobs.models import BatchState
from jobs.settings import Settings
from tests import full_disk
from tests.conftest import PG_ADMIN_DSN
from tests.ports import unused_port
from tests.web.web_helpers import (
    FAL_KEY,
    HTML,
    JSON,
    TOKEN,
    app_for,
    client,
    logged_in,
    mixed_batch,
    settings_for,
)
from web.app import DATABASE_UNAVAILABLE, create_app

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
    """What ``answer`` says, checked to be one line and to leak nothing: a page for a browser,
    the ``error`` of one JSON object ``{"ok": false, "error": …}`` for a script's action (the
    format of its every answer, whatever broke), plain text for anything else."""
    body: str = answer.text
    assert "Traceback" not in body
    assert FAL_KEY not in body
    assert PASSWORD not in body
    if "<html" in body:
        return body
    if answer.request.method == "POST" and "text/html" not in answer.request.headers.get("accept", ""):
        assert answer.headers["content-type"].startswith("application/json"), body
        found = answer.json()
        assert found == {"ok": False, "error": found["error"]}
        error: str = found["error"]
        assert "\n" not in error
        return error
    assert answer.headers["content-type"].startswith("text/plain")
    assert "\n" not in body.strip()
    return body


def _dashboard_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "web.app"]


def test_a_nul_in_a_reference_names_nothing_on_every_database(
    engine: Engine, session: Session, output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL's text cannot hold NUL: a batch reference, job id or endpoint filter carrying
    one was a data error there (400) while SQLite found nothing (404). It names nothing on both:
    "no batch …" (404, or the batch page's flash), no such job, no job of that endpoint; no
    warning, and nothing changed."""
    batch_id = mixed_batch(session, items=10).batch.id
    session.commit()
    browser: TestClient = logged_in(client(app_for(engine, _settings(engine, output_dir))))
    with caplog.at_level(logging.INFO):
        page = browser.get("/batches/ab%00cdef", headers=HTML)
        as_json = browser.get(f"/batches/{batch_id}%00", headers=JSON)
        video = browser.get("/jobs/ab%00cd/video", headers=HTML)
        cancel = browser.post(f"/batches/{batch_id}%00/cancel", headers={**BEARER, **JSON})
        pause = browser.post(f"/batches/{batch_id}%00/pause", headers={**BEARER, **HTML})
        filtered = browser.get(f"/batches/{batch_id}?endpoint=fal-ai/wan-i2v%00", headers=HTML)
    assert page.status_code == 404, page.text
    assert "no batch &#39;ab\\x00cdef&#39;: give a batch name" in page.text
    assert "Not found" in page.text
    assert as_json.status_code == 404
    assert as_json.json()["error"].startswith(f"no batch '{batch_id}\\x00': give a batch name")
    assert video.status_code == 404, video.text
    assert cancel.status_code == 404, cancel.text
    assert cancel.json() == {"ok": False, "error": cancel.json()["error"]}
    assert cancel.json()["error"].startswith("no batch")
    assert pause.status_code == 303  # back to the batch page, which says "no batch"
    assert "no batch" in unquote(pause.cookies["wanbatch_flash"])
    assert filtered.status_code == 200, filtered.text
    assert 'id="j-' not in filtered.text  # no job row
    assert "0 matching jobs" in filtered.text
    for answer in (page, video, filtered):
        _one_line(answer)
    assert not [r for r in _dashboard_records(caplog) if r.levelno >= logging.WARNING]
    session.expire_all()  # what the dashboard's transactions left, not what this session read
    with session.begin():
        assert store.get_batch(session, batch_id).state == BatchState.ACTIVE
        assert not store.get_batch(session, batch_id).paused_by_user


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_value_postgresql_refuses_is_a_400_not_an_outage(
    engine: Engine,
    session: Session,
    output_dir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A value the database refuses (a data error: here a use case that sends a NUL, which no
    request can make it do any more) fails the same way again, so it is the request's (400),
    never "unavailable"; what the action did is rolled back."""
    batch_id = mixed_batch(session, items=10).batch.id
    session.commit()

    def refused(session: Session, *_args: Any, **_kw: Any) -> Any:
        return session.execute(text("SELECT CAST(:v AS text)"), {"v": "a\x00b"})

    monkeypatch.setattr(store, "failure_reasons", refused)
    monkeypatch.setattr(store, "cancel_unsent", refused)
    browser: TestClient = logged_in(client(app_for(engine, _settings(engine, output_dir))))
    with caplog.at_level(logging.INFO):
        answers = [
            browser.get(f"/batches/{batch_id}", headers=HTML),
            browser.post(f"/batches/{batch_id}/cancel", headers={**BEARER, **JSON}),
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


def test_while_the_disk_is_full_pages_work_and_actions_say_so(
    sqlite_engine: Engine, output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Reads need no space: every page (and ``/metrics``, a video) answers as usual while every
    write is refused for a full disk (SQLite's own ``SQLITE_FULL``). An action is 503, as for an
    outage, but with a line that says the disk is full (waiting alone does not end it; "locked or
    unreachable: try again in a moment" sent people waiting); the warning names the database.
    Once space is free, the same action works."""
    with session_factory(sqlite_engine)() as session:
        mixed = mixed_batch(session, items=10, output_dir=output_dir)
    batch_id, job_id = mixed.batch.id, next(iter(mixed.videos))
    database = sqlite_engine.url.database
    assert database is not None
    full_disk.prepare(database)
    browser: TestClient = client(app_for(sqlite_engine, _settings(sqlite_engine, output_dir)))
    pages = [
        "/",
        f"/batches/{batch_id}",
        f"/batches/{batch_id}?state=failed",
        "/metrics",
        f"/jobs/{job_id}/video",
    ]
    with full_disk.FullDisk().attached(Engine) as disk, caplog.at_level(logging.INFO):
        disk.full = True
        for path in pages:
            answer = browser.get(path, headers={**HTML, **BEARER})
            assert answer.status_code == 200, (path, answer.text)
        paused = browser.post(f"/batches/{batch_id}/pause", headers={**BEARER, **JSON})
        cancelled = browser.post(f"/batches/{batch_id}/cancel", headers={**BEARER, **HTML})
        disk.full = False
        again = browser.post(f"/batches/{batch_id}/pause", headers={**BEARER, **JSON})
    for answer in (paused, cancelled):
        assert answer.status_code == 503, answer.text
        body = html.unescape(_one_line(answer))
        assert "the database's disk is full: free space on it, then try again" in body
        assert "locked or unreachable" not in body
        assert database not in body  # where it is, is for the log
    assert "<html" in cancelled.text
    records = [r for r in _dashboard_records(caplog) if r.levelno >= logging.WARNING]
    assert [r.__dict__["event"] for r in records] == ["dashboard.database_full"] * 2
    assert all(r.exc_info is None and database in r.getMessage() for r in records)
    assert again.status_code == 200, again.text
    assert again.json()["ok"] is True


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

    monkeypatch.setattr(store, "cancel_unsent", broken)
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


def test_an_action_answers_json_when_the_database_is_gone(
    new_pg_database: Callable[[], str], output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The database dropped under a running dashboard: a script's action is 503 with one JSON
    object, the format of every other answer of the action API (never plain text); a browser's
    form post still gets the page; a page asked for without HTML stays one plain line."""
    url = new_pg_database()
    engine = make_engine(url)
    try:
        settings = settings_for(engine, output_dir, token=TOKEN)
        browser: TestClient = client(app_for(engine, settings))  # migrated while it was there
        with session_factory(engine)() as session:
            batch_id = mixed_batch(session, items=10).batch.id
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        with caplog.at_level(logging.WARNING):
            scripted = [
                browser.post(f"/batches/{batch_id}/{action}", headers={**BEARER, **JSON})
                for action in ("pause", "resume", "cancel", "rerun-failed")
            ]
            plain = browser.post(f"/batches/{batch_id}/pause", headers=BEARER)  # no Accept at all
            form = browser.post(f"/batches/{batch_id}/cancel", headers={**BEARER, **HTML})
            page = browser.get(f"/batches/{batch_id}", headers=BEARER)
    finally:
        engine.dispose()
    for answer in [*scripted, plain]:
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"].startswith("application/json"), answer.text
        assert answer.json() == {"ok": False, "error": DATABASE_UNAVAILABLE}
    assert form.status_code == 503
    assert "<html" in form.text
    assert DATABASE_UNAVAILABLE in html.unescape(form.text)
    assert page.status_code == 503
    assert page.headers["content-type"].startswith("text/plain")
    assert page.text == DATABASE_UNAVAILABLE
    events = {r.__dict__.get("event") for r in _dashboard_records(caplog)}
    assert events == {"dashboard.database_unavailable"}


def test_a_first_login_with_the_database_unreachable_is_a_503(
    new_pg_database: Callable[[], str], output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The login cookie's name and value are keyed by the database's secret, read (made, the
    first time) by a process's first login or first request carrying a cookie: with the
    database unreachable then (here PostgreSQL at a port nothing listens on, and a database
    dropped under a dashboard that served pages), the login, a cookie's request and a page are
    503 with one short line, never a 500 or a traceback, and each logs one warning on one line
    (the driver's first line, not its hint escaped onto it), nothing at ERROR."""
    closed = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{unused_port()}/wanbatch_gone"
    dropped = new_pg_database()
    migrated = make_engine(dropped)
    try:
        migrate(migrated, from_models=False)
        with session_factory(migrated)() as session:
            mixed_batch(session, items=10)
    finally:
        migrated.dispose()
    answers = []
    for url in (closed, dropped):
        engine = make_engine(url)
        try:
            settings = settings_for(engine, output_dir, token=TOKEN)
            browser = client(create_app(settings, engine=engine))
            if url == dropped:  # a dashboard that served pages, then lost its database
                assert browser.get("/", headers=BEARER).status_code == 200
                name = url.rsplit("/", 1)[1]
                with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            origin = {"Origin": "http://127.0.0.1:8788"}
            with caplog.at_level(logging.INFO):
                answers += [
                    browser.post("/login", data={"token": TOKEN}, headers={**HTML, **origin}),
                    browser.post("/login", data={"token": TOKEN}, headers=origin),
                    browser.get("/", headers={**HTML, "Cookie": "wanbatch_session_0123abcd=x"}),
                    browser.get("/", headers=BEARER),
                ]
        finally:
            engine.dispose()
    for answer in answers:
        assert answer.status_code == 503, (answer.request.url, answer.text)
        assert "set-cookie" not in answer.headers
        for leak in ("Traceback", PASSWORD, FAL_KEY, TOKEN):
            assert leak not in answer.text
        assert "database is unavailable" in html.unescape(answer.text)
        if "<html" not in answer.text:  # a script's login or page: one plain line
            assert answer.headers["content-type"].startswith("text/plain")
            assert "\n" not in answer.text.strip()
    assert "<html" in answers[0].text
    assert "<html" in answers[4].text
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    warnings = [r for r in caplog.records if r.name.startswith("web.") and r.levelno == logging.WARNING]
    assert len(warnings) == len(answers)
    for record in warnings:
        assert record.exc_info is None
        assert record.__dict__["event"] == "dashboard.database_unavailable"
        line = record.getMessage()
        assert "\\n" not in line, line
        assert "\n" not in line
        assert PASSWORD not in line


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_schema_downgraded_under_serve_is_a_one_line_503_naming_it(
    dialect: str,
    tmp_path: Path,
    new_pg_database: Callable[[], str],
    output_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``alembic downgrade`` under a running serve: every page failed on a missing column, a 500
    "the dashboard failed on a database error" with a traceback in the log (SQLite: "the
    database is unavailable"). It says which schema the database is at, and what to do."""
    from jobs.db import SCHEMA_HEAD, downgrade

    url = f"sqlite:///{tmp_path / 'd.db'}" if dialect == "sqlite" else new_pg_database()
    engine = make_engine(url)
    try:
        migrate(engine)
        with session_factory(engine)() as session:
            batch_id = mixed_batch(session, items=2, output_dir=output_dir).batch.id
            session.commit()
        browser = client(app_for(engine, settings_for(engine, output_dir)))
        downgrade(engine, "0038")
        with caplog.at_level(logging.INFO):
            answers = [browser.get("/", headers=HTML), browser.get(f"/batches/{batch_id}", headers=HTML)]
    finally:
        engine.dispose()
    for answer in answers:
        assert answer.status_code == 503, answer.text
        body = html.unescape(_one_line(answer))
        assert f"the database is at schema 0038, older than this wanbatch's {SCHEMA_HEAD}" in body, body
        assert "stop this process" in body
    records = _dashboard_records(caplog)
    assert [(r.levelno, r.exc_info, r.__dict__["event"]) for r in records] == [
        (logging.WARNING, None, "dashboard.schema_behind")
    ] * 2


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_metrics_say_a_schema_downgraded_under_serve_is_not_usable(
    dialect: str,
    tmp_path: Path,
    new_pg_database: Callable[[], str],
    output_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``alembic downgrade`` under a running serve: the dashboard answers 503, but ``/metrics``
    said ``wanbatch_database_up 1`` (its queries read no column the downgrade dropped). Now it
    says 0, ``wanbatch_database_schema_current 0`` says why, and one warning which schema."""
    from jobs.db import SCHEMA_HEAD, downgrade

    url = f"sqlite:///{tmp_path / 'd.db'}" if dialect == "sqlite" else new_pg_database()
    engine = make_engine(url)
    try:
        migrate(engine)
        browser = client(app_for(engine, settings_for(engine, output_dir)))
        before = browser.get("/metrics").text.splitlines()
        downgrade(engine, "0038")
        with caplog.at_level(logging.INFO):
            scrape = browser.get("/metrics")
    finally:
        engine.dispose()
    assert {"wanbatch_database_up 1.0", "wanbatch_database_schema_current 1.0"} <= set(before)
    assert scrape.status_code == 200
    after = scrape.text.splitlines()
    assert {"wanbatch_database_up 0.0", "wanbatch_database_schema_current 0.0"} <= set(after)
    assert not [line for line in after if line.startswith("wanbatch_jobs{")]  # no other database metric
    (line,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.__dict__["event"] == "metrics.schema_behind"
    assert line.exc_info is None
    assert f"the database is at schema 0038, older than this wanbatch's {SCHEMA_HEAD}" in line.getMessage()
