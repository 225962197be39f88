"""Every command on a read-only database, SQLite (``?mode=ro``) and PostgreSQL (the session's
``default_transaction_read_only = on``), through the installed ``wanbatch``.

Before: on PostgreSQL every command that writes (``submit``, ``run``, ``rerun``, ``pause``,
``resume``, ``cancel``) was an internal error, exit 70, with a crash file ("please report it");
``run BATCH`` on SQLite said the read-only error after a warning line that it could not clear a
heartbeat it never stored; ``wanbatch worker`` started, and logged a traceback every round for
ever. Now each says, in one line (exit 2), that the database is read-only, why, and that nothing
was changed; the commands that only read work as on any database.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, update

from jobs import db, store
from jobs.db import make_engine, session_factory
from jobs.errors import DatabaseReadOnlyError
from jobs.models import Job
from jobs.moved_outputs import record_moves
from jobs.settings import Settings
from tests.e2e.e2e_helpers import EXAMPLES, Wb, assert_one_line, wanbatch
from tests.read_only import read_only_url
from tests.web.web_helpers import make_batch, new_job
from worker.celery_worker import _open_the_database

QUICKSTART = EXAMPLES / "quickstart.yaml"


def _why(engine: Engine) -> str:
    return "mode=ro" if engine.dialect.name == "sqlite" else "transaction_read_only"


def test_writing_commands_say_so_in_one_line_and_reading_ones_work(
    engine: Engine, tmp_path: Path, wb: Wb, monkeypatch: pytest.MonkeyPatch
) -> None:
    writable = {"WANBATCH_DATABASE_URL": engine.url.render_as_string(hide_password=False)}
    assert wanbatch("submit", QUICKSTART, env=writable).returncode == 0
    env = {
        "WANBATCH_DATABASE_URL": read_only_url(engine),
        "FAL_KEY": "ro-test-key:0000",
        "WANBATCH_FAL_QUEUE_URL": "http://127.0.0.1:9",  # nothing may be sent: nothing is
        "WANBATCH_FAL_REST_URL": "http://127.0.0.1:9",
    }
    writing = [
        ("submit", QUICKSTART),
        ("run", QUICKSTART, "--simulate"),
        ("run", "quickstart"),
        ("rerun", "quickstart"),
        ("pause", "quickstart"),
        ("cancel", "quickstart"),
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = list(pool.map(lambda args: wanbatch(*args, env=env, timeout=120), writing))
    for args, answer in zip(writing, done, strict=True):
        line = assert_one_line(answer, "the database is read-only", _why(engine), "nothing was changed")
        assert "internal error" not in line, (args, line)
    # The reading commands, in process (each would fail the test with its traceback).
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    db.close_engines()
    status = wb("status", "quickstart", "--json")
    assert status.code == 0, status.stderr
    assert (status.json()["state"], status.json()["counts"]["pending"]) == ("active", 3)  # unchanged
    assert wb("status", "--json").code == 0
    assert wb("cost", "quickstart").code == 0
    assert wb("export", "quickstart", "--format", "jsonl", "-o", tmp_path / "out.jsonl").code == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
    assert wb("diff", "quickstart", "quickstart", "--json").code == 1  # no videos: "different"
    # The doctor reads it too, and its database check fails naming why (the writing commands
    # above would each refuse): it was "ok, reachable".
    doctor = wb("doctor", "--simulate", "--json")
    (database,) = [check for check in doctor.json()["checks"] if check["name"] == "database"]
    assert database["status"] == "fail", database
    assert "but read-only: " in database["detail"], database
    assert _why(engine) in database["detail"], database


def test_a_worker_is_not_started_on_a_read_only_database(engine: Engine, tmp_path: Path) -> None:
    settings = Settings(
        database_url=read_only_url(engine), output_dir=tmp_path / "outputs", FAL_KEY=SecretStr("k:s")
    )
    try:
        with pytest.raises(DatabaseReadOnlyError) as refused:
            _open_the_database(settings)
    finally:
        db.close_engines()
    assert "the database is read-only" in str(refused.value)
    assert _why(engine) in str(refused.value)
    assert "it was not started" in str(refused.value)
    assert refused.value.exit_code == 2


def test_a_move_of_outputs_found_on_a_read_only_database_is_not_recorded_and_not_an_error(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Outputs found moved (an output folder moved with its videos) are recorded for the next
    reader; on a read-only database that write was a ``DatabaseReadOnlyError`` (SQLite) that failed
    the reading command — ``export``, ``diff``, a dashboard page — instead of the one warning."""
    with session_factory(engine)() as session:
        batch = make_batch(session, "moved", [new_job(0, endpoint="fal-ai/wan-i2v")])
        (job,) = store.jobs_of_batch(session, batch.id)
        session.execute(update(Job).where(Job.id == job.id).values(output_path="/old/v.mp4"))
        session.commit()
    ro = make_engine(read_only_url(engine))
    try:
        with caplog.at_level(logging.WARNING):
            assert record_moves(ro, [(job.id, "/old/v.mp4", "/new/v.mp4")]) is False
    finally:
        ro.dispose()
    assert [r.__dict__.get("event") for r in caplog.records] == ["outputs.move_not_recorded"]
    with session_factory(engine)() as session:
        assert store.get_job(session, job.id).output_path == "/old/v.mp4"
