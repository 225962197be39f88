"""``wanbatch serve`` is a live process to the schema's upgrade guard (:mod:`web.heartbeat`).

Before: the guard read only heartbeats and job leases, and serve wrote neither, so a newer
wanbatch upgraded the schema (to 0039) under a running older serve, whose **Rerun failed** then
made a rerun of jobs the upgrade had dropped, which a worker sent and billed. ``serve`` is a real
process here: while it runs, the upgrade refuses in one line naming it; once it stopped (its row
deleted), the upgrade goes on. A serve that cannot write its row still serves, and says so.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text

from jobs.db import SCHEMA_HEAD, downgrade, migrate
from jobs.errors import ConfigError
from tests.web.test_serve_shutdown import _serve

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")

_PREVIOUS = f"{int(SCHEMA_HEAD) - 1:04d}"


def _beats(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT owner, scope FROM conductor_heartbeats"))]


def _version(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one())


def test_an_upgrade_waits_for_a_running_serve(
    sqlite_engine: Engine, output_dir: Path, tmp_path: Path
) -> None:
    database = Path(str(sqlite_engine.url.database))
    proc, _port, log = _serve(tmp_path, database, output_dir)
    name = f"{socket.gethostname()}:{proc.pid}"
    try:
        deadline = time.monotonic() + 60  # only so that a serve that never beats fails the test
        while (f"{name}:serve", "serve") not in _beats(sqlite_engine):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        downgrade(sqlite_engine, _PREVIOUS)  # as an older serve's database, for the newer guard
        with pytest.raises(ConfigError) as refused:
            migrate(sqlite_engine)
        said = str(refused.value)
        assert f"the database is at schema {_PREVIOUS} and this wanbatch needs {SCHEMA_HEAD}" in said
        assert f"1 wanbatch process is using it ({name}, last seen " in said, said
        assert _version(sqlite_engine) == _PREVIOUS
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert _beats(sqlite_engine) == []  # a clean stop deletes its row
    migrate(sqlite_engine)
    assert _version(sqlite_engine) == SCHEMA_HEAD
    assert "Traceback" not in log.read_text(errors="replace")


def test_a_serve_that_cannot_write_its_heartbeat_serves_and_says_so(
    sqlite_engine: Engine, output_dir: Path, tmp_path: Path
) -> None:
    """A read-only database (``mode=ro``; a read-only role alike): serve starts and answers, and
    its log says in one line that an upgrade cannot see it."""
    database = tmp_path / "ro.db"
    Path(str(sqlite_engine.url.database)).rename(database)
    database.chmod(0o444)
    proc, port, log = _serve(tmp_path, Path(f"{database}?mode=ro"), output_dir)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).status_code == 200  # the dashboard
        deadline = time.monotonic() + 60
        while "could not record" not in (said := log.read_text(errors="replace")):
            assert proc.poll() is None, said
            assert time.monotonic() < deadline, said
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = [line for line in said.splitlines() if "could not record" in line]
    assert len(lines) == 1, said
    assert "an upgrade of the schema by a newer wanbatch cannot see this serve" in lines[0]
    assert "Traceback" not in said
