"""The SQLite system of record is owner-only, and a bad database URL is one clear line (issue #9).

The database holds prompts and inline images (data URIs): another local user must not read it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from jobs.db import make_engine, migrate
from jobs.errors import ConfigError


@pytest.fixture
def lax_umask() -> Iterator[None]:
    """The common default umask (022), under which files come out world-readable."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("lax_umask")
def test_new_database_folder_file_and_wal_are_owner_only(tmp_path: Path) -> None:
    db = tmp_path / "state" / "wanbatch.db"
    engine = make_engine(f"sqlite:///{db}")
    try:
        migrate(engine)
        with engine.begin() as conn:  # a write keeps -wal and -shm around while connected
            conn.execute(text("CREATE TABLE probe (x TEXT)"))
            conn.execute(text("INSERT INTO probe VALUES ('a prompt')"))
        wal, shm = db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")
        assert wal.exists()
        assert shm.exists()
        assert _mode(db.parent) == 0o700
        assert _mode(db) == 0o600
        assert _mode(wal) == 0o600
        assert _mode(shm) == 0o600
    finally:
        engine.dispose()


@pytest.mark.usefixtures("lax_umask")
def test_an_existing_world_readable_database_is_tightened(tmp_path: Path) -> None:
    mine = tmp_path / "project"
    mine.mkdir()
    mine.chmod(0o755)
    db = mine / "old.db"
    db.touch(mode=0o644)
    db.chmod(0o644)
    leftover = db.with_name(db.name + "-journal")
    leftover.touch()
    leftover.chmod(0o644)
    make_engine(f"sqlite:///{db}").dispose()
    assert _mode(db) == 0o600
    assert _mode(leftover) == 0o600
    assert _mode(mine) == 0o755  # a folder the user already had is left alone


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        ("mysql://user@localhost/db", "unsupported database 'mysql'"),
        ("not a url at all", "not a database URL"),
        ("mysql://user:hunter2@localhost/db", "WANBATCH_DATABASE_URL"),
    ],
)
def test_unusable_urls_are_config_errors(url: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_engine(url)
    assert phrase in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_unreachable_database_is_a_config_error_without_the_password() -> None:
    from jobs.db import _engine_for

    with pytest.raises(ConfigError) as caught:
        _engine_for("postgresql://user:hunter2@127.0.0.1:1/x")
    message = str(caught.value)
    assert message.startswith("WANBATCH_DATABASE_URL postgresql://user:***@127.0.0.1:1/x: cannot open")
    assert "hunter2" not in message
    assert "\n" not in message


def test_an_uncreatable_sqlite_folder_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create the SQLite database"):
        make_engine(f"sqlite:///{blocker / 'sub' / 'wanbatch.db'}")


def test_a_bare_sqlite_error_while_opening_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit A7: ``sqlite:////dev/null`` raised a bare sqlite3 "disk I/O error" from a commit
    hook while the schema was made: an internal error instead of exit 2. The test raises that
    error itself: opening the real ``/dev/null`` as root lets SQLite change the device's mode
    (it did, on this machine: every later ``>/dev/null`` of other users failed)."""
    import sqlite3

    from jobs import db
    from jobs.settings import DatabaseSettings

    def broken(_engine: object, *_args: object, **_kwargs: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(db, "migrate", broken)
    url = f"sqlite:///{tmp_path / 'wanbatch.db'}"
    with pytest.raises(ConfigError, match="cannot open the database: disk I/O error"):
        db.open_engine(DatabaseSettings(database_url=url))


@pytest.mark.parametrize("query", ["", "?mode=ro"])
def test_a_sqlite_path_starting_with_a_tilde_is_in_the_home_folder(
    query: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sqlite:///~/x.db`` (from a .env file: no shell expands it) prepared ``$HOME/x.db`` while
    SQLite opened ``./~/x.db`` and failed ("unable to open database file")."""
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    engine = make_engine("sqlite:///~/state/x.db")
    try:
        migrate(engine)
    finally:
        engine.dispose()
    engine = make_engine(f"sqlite:///~/state/x.db{query}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM batches")).scalar() == 0
    finally:
        engine.dispose()
    assert (home / "state" / "x.db").is_file()
    assert not (elsewhere / "~").exists()


def test_a_sqlite_path_of_an_unknown_users_home_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'~no-such-user-wanbatch', whose home folder is unknown"):
        make_engine("sqlite:///~no-such-user-wanbatch/x.db")
