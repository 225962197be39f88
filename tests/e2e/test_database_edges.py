"""The database at two edges of a command: when a finished run reads its report, and when it is
not wanbatch's at all. Each is one line and exit 2, never "internal error" (exit 70).

* The run is over and the database is unavailable right then (a killed connection, a restart):
  the report was read once, unguarded, and its ``OperationalError`` ended the command as a bug.
  Now it is waited out like any round of the run, up to ``WANBATCH_LEASE_SECONDS``; past that,
  one line that says the run is over and how to read its outcome.
* A database whose tables are not there (a SQLite file put in place of wanbatch's, or its tables
  dropped) answered ``status`` or ``run`` with ``internal error: OperationalError: … no such
  table: batches``, and SQLite's "no such table" counted as an outage, waited out as one. Now
  start-up checks the tables, and a table that vanishes mid-command is the same one line.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any, NoReturn

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

import cli
from falsim.server import SimulatorHandle
from jobs import db
from jobs.batches import batch_report
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import MakeManifest, Wb
from tests.in_process import run_main
from worker import running

MANIFEST = "name: edges\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a lighthouse\n  - prompt: a harbour\n"
#: The tables of wanbatch's data: dropping them leaves the schema's version stamp behind.
DATA_TABLES = ("job_events", "webhook_deliveries", "batch_totals", "jobs", "uploads", "batches")


def _gone() -> OperationalError:
    """What a read meets when the database is unavailable (its file's folder vanished, here)."""
    return OperationalError("SELECT 1", {}, sqlite3.OperationalError("unable to open database file"))


def _report_read_fails(monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """The final report's read meets an unavailable database ``times`` times (-1: always)."""
    real = batch_report
    tries: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        tries.append(1)
        if times < 0 or len(tries) <= times:
            raise _gone()
        return real(*args, **kwargs)

    monkeypatch.setattr(running, "batch_report", flaky)
    return tries


def test_a_database_unavailable_as_the_run_ends_is_waited_out(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: the OperationalError escaped the command (exit 70, "internal error")."""
    tries = _report_read_fails(monkeypatch, times=2)
    run = wb("run", manifest("edges", MANIFEST), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    report = run.json()
    assert (report["total"], report["counts"]["succeeded"]) == (2, 2)
    assert len(tries) == 3


def test_a_database_gone_longer_than_a_lease_as_the_run_ends_is_one_line_exit_2(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_LEASE_SECONDS", "1")  # how long the report's read waits
    _report_read_fails(monkeypatch, times=-1)
    run = wb("run", manifest("edges", MANIFEST), "--json", "--no-progress")
    assert run.code == 2, run.stderr
    error = run.json()["error"]
    assert error.startswith("the database stopped answering: WANBATCH_DATABASE_URL sqlite:///")
    assert "unable to open database file" in error
    assert "is over, but its report could not be read: `wanbatch status " in error
    assert "Traceback" not in run.stderr


def _drop_data_tables() -> None:
    """What dropping wanbatch's tables (or a file put in place of its database) leaves."""
    path = db.sqlite_file(get_settings().database_url)
    assert path is not None
    with sqlite3.connect(path.path) as conn:
        conn.execute("PRAGMA foreign_keys = OFF")
        for table in DATA_TABLES:
            conn.execute(f"DROP TABLE {table}")
    db.close_engines()  # a new process: it starts by opening the database


NOT_OURS = "is not a wanbatch database, or its tables were dropped"


def test_status_and_run_on_a_database_without_its_tables_say_so_in_one_line(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """Was: ``internal error: OperationalError: (sqlite3.OperationalError) no such table: batches``."""
    path = manifest("edges", MANIFEST)
    assert wb("submit", path).code == 0
    _drop_data_tables()
    for args in (("status",), ("run", path, "--no-progress")):
        done = wb(*args)
        assert done.code == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("error: WANBATCH_DATABASE_URL sqlite:///")
        assert NOT_OURS in line
        assert "(no table batch_totals, batches, job_events, jobs, uploads, webhook_deliveries)" in line
    status = wb("status", "--json")
    assert status.code == 2
    assert NOT_OURS in json.loads(status.stdout)["error"]


def test_a_database_with_tables_of_its_own_is_refused_in_one_line(wb: Wb, manifest: MakeManifest) -> None:
    """Was: ``submit`` exited 0 and added wanbatch's tables to someone else's SQLite file."""
    path = db.sqlite_file(get_settings().database_url)
    assert path is not None
    path.path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path.path) as conn:
        conn.execute("CREATE TABLE x (a)")
    db.close_engines()  # a new process: it starts by opening the database
    done = wb("submit", manifest("edges", MANIFEST))
    assert done.code == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: WANBATCH_DATABASE_URL sqlite:///")
    assert "is not a wanbatch database: it holds tables of its own (x) and no wanbatch schema" in line
    with sqlite3.connect(path.path) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == [("x",)]
    doctor = wb("doctor", "--json")
    assert doctor.code == 1
    (check,) = [c for c in doctor.json()["checks"] if c["name"] == "database"]
    assert check["status"] == "fail"
    assert "not a wanbatch database: it holds tables of its own (x)" in check["detail"]


def _postgres_with(url: str, *statements: str) -> None:
    """Run ``statements`` in the PostgreSQL database at ``url``, as its superuser."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def test_a_postgresql_database_with_an_extensions_table_takes_wanbatch_in(
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    new_pg_database: Callable[[], str],
) -> None:
    """Was: PostGIS's ``spatial_ref_sys`` (a member of the ``postgis`` extension, plpgsql's here)
    made ``doctor`` fail and ``submit`` exit 2, "it holds tables of its own (spatial_ref_sys)".
    A table of another application beside it is still refused, and named alone."""
    url = new_pg_database()
    _postgres_with(
        url,
        "CREATE TABLE spatial_ref_sys (srid INTEGER PRIMARY KEY, auth_name VARCHAR(256))",
        "ALTER EXTENSION plpgsql ADD TABLE spatial_ref_sys",
    )
    monkeypatch.setenv("WANBATCH_DATABASE_URL", url)
    get_settings.cache_clear()

    def database_check() -> dict[str, Any]:
        capsys.readouterr()
        run_main(["doctor", "--json"], monkeypatch)
        (check,) = [c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "database"]
        return dict(check)

    check = database_check()
    assert check["status"] == "ok", check
    assert "empty (the first command creates the schema)" in check["detail"]
    submitted = run_main(["submit", str(manifest("edges", MANIFEST))], monkeypatch)
    assert submitted == 0, capsys.readouterr().err
    capsys.readouterr()
    assert run_main(["status", "edges", "--json"], monkeypatch) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 2
    check = database_check()
    current = f"{url}: reachable, schema {db.SCHEMA_HEAD} (current)"
    assert (check["status"], check["detail"]) == ("ok", current)

    other = new_pg_database()
    _postgres_with(
        other,
        "CREATE TABLE spatial_ref_sys (srid INTEGER PRIMARY KEY)",
        "ALTER EXTENSION plpgsql ADD TABLE spatial_ref_sys",
        "CREATE TABLE inventory (sku INTEGER)",
    )
    monkeypatch.setenv("WANBATCH_DATABASE_URL", other)
    get_settings.cache_clear()
    check = database_check()
    assert check["status"] == "fail"
    assert "it holds tables of its own (inventory) and no wanbatch schema" in check["detail"]
    assert run_main(["submit", str(manifest("edges", MANIFEST))], monkeypatch) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: WANBATCH_DATABASE_URL {other} is not a wanbatch database: ")
    assert "it holds tables of its own (inventory) and no wanbatch schema" in line


def test_a_table_dropped_while_a_command_runs_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Past the start-up check, wherever it is met (the run's conductor, a step, a read)."""

    def vanished(*_args: object, **_kwargs: object) -> NoReturn:
        raise OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: jobs"))

    monkeypatch.setattr(cli.cli, "main", vanished)
    assert run_main(["status", "--json"], monkeypatch) == 2
    out, err = capsys.readouterr()
    error = json.loads(out)["error"]
    assert err == f"error: {error}\n"
    assert error.startswith("WANBATCH_DATABASE_URL sqlite:///")
    assert f"{NOT_OURS} (no such table: jobs)" in error


def test_a_database_a_newer_wanbatch_migrated_is_one_line_exit_2_for_every_command(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """Was: ``internal error: CommandError: Can't locate revision identified by '0099'; please
    report it`` (exit 70, a crash file) from every command but ``doctor``; ``serve`` too."""
    path = manifest("edges", MANIFEST)
    assert wb("submit", path).code == 0
    target = db.sqlite_file(get_settings().database_url)
    assert target is not None
    with sqlite3.connect(target.path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099'")
    db.close_engines()  # a new process: it starts by opening the database
    for args in (
        ("status",),
        ("cost", "edges"),
        ("export", "edges"),
        ("run", path, "--no-progress"),
        ("serve",),
    ):
        done = wb(*args)
        assert done.code == 2, (args, done.stderr)
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("error: WANBATCH_DATABASE_URL sqlite:///"), line
        assert line.endswith(
            f"schema 0099 is not one this wanbatch knows (it expects {db.SCHEMA_HEAD}): a newer wanbatch "
            "migrated it; upgrade wanbatch on this host to the version that migrated the database"
        ), line
    with sqlite3.connect(target.path) as conn:  # nothing was migrated or written
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0099",)]
