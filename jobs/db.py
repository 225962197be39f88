"""Connecting to the system of record: engines, sessions, schema migrations and the locks
that serialise processes (:class:`AdvisoryLock`).

This module owns how wanbatch talks to a database *at all*; :mod:`jobs.store` owns *what* it
says. Two dialects are supported and tested:

* **SQLite** (the default, one host): WAL journal so readers never block the writer, a 30 s busy
  timeout so concurrent processes wait instead of failing, foreign keys on, and every
  transaction opened with ``BEGIN IMMEDIATE``. The last point is what makes compare-and-set and
  claiming safe there: a transaction that read first and wrote later could otherwise fail with
  ``SQLITE_BUSY_SNAPSHOT`` (or, worse, act on a stale read), whereas an immediate transaction
  holds the single write lock from its first statement, so transactions simply take turns.
* **PostgreSQL** (distributed workers): the psycopg 3 driver, ``pool_pre_ping`` so a database
  restart costs one failed checkout rather than a crashed worker, and row locks with
  ``SKIP LOCKED`` for claiming (in the store).

Any other URL is refused up front with a :class:`~jobs.errors.ConfigError` naming
``WANBATCH_DATABASE_URL`` (never with a driver's ``ModuleNotFoundError``).

The SQLite file holds prompts and inline images, so it is created owner-only: its folder 0700
when wanbatch creates it, the file itself 0600 before SQLite first opens it. SQLite gives the
``-wal``, ``-shm`` and ``-journal`` files it creates the database file's permissions
(``findCreateFileMode`` in its unix VFS), so they follow. A file left readable by an older
version is tightened on the next start (when this user owns it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from jobs.errors import ConfigError
from jobs.settings import DatabaseSettings

log = logging.getLogger(__name__)

#: How long a SQLite connection waits for the write lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Key of the PostgreSQL advisory lock that serialises concurrent ``migrate`` calls
#: (an arbitrary constant that fits PostgreSQL's signed 64-bit lock key).
_MIGRATE_LOCK_KEY = 0x5B9E1D0C2A7F4E31
#: Database backends wanbatch is tested against (see the module docstring).
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
_URL_HELP = "sqlite:///path/to/wanbatch.db or postgresql://user:password@host:5432/dbname"
#: Files SQLite keeps beside the database.
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def normalize_url(url: str | URL) -> URL:
    """The URL SQLAlchemy should use: plain ``postgresql://`` means psycopg 3 here.

    :class:`ConfigError` for something that is not a URL or names another database.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        # Not echoed: a mistyped URL may still hold a password.
        raise ConfigError(f"WANBATCH_DATABASE_URL is not a database URL (expected {_URL_HELP})") from None
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in SUPPORTED_BACKENDS:
        raise ConfigError(
            f"WANBATCH_DATABASE_URL names an unsupported database {parsed.get_backend_name()!r} "
            f"(supported: SQLite and PostgreSQL, e.g. {_URL_HELP})"
        )
    return parsed


def safe_url(url: str | URL) -> str:
    """The URL with its password masked, for messages (never the raw setting)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "(not a URL)"


def _prepare_sqlite_file(path: Path) -> None:
    """Create the database's folder (0700) and file (0600) before SQLite does; tighten old ones.

    The file is created empty (SQLite treats a zero-length file as a new database). ``O_EXCL``
    makes two processes starting together harmless: the second finds the file and moves on.
    """
    folder = path.parent
    try:
        if not folder.exists():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise ConfigError(
            f"WANBATCH_DATABASE_URL: cannot create the SQLite database {path}: {exc.strerror or exc}"
        ) from None
    for candidate in (path, *(path.with_name(path.name + side) for side in _SQLITE_SIDE_FILES)):
        _owner_only(candidate)


def _owner_only(path: Path) -> None:
    """Drop group/other permissions of a file this user owns (quietly skip anything else)."""
    try:
        info = path.stat()
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
            path.chmod(stat.S_IMODE(info.st_mode) & 0o700)
    except OSError:
        pass


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine configured for wanbatch's access patterns (see the module docstring).

    Extra keyword arguments go to :func:`sqlalchemy.create_engine` (tests use ``poolclass``).
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            _prepare_sqlite_file(Path(database).expanduser())
        engine = create_engine(parsed, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    try:
        return create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError, TypeError) as exc:  # a bad query option, a missing driver
        raise ConfigError(f"WANBATCH_DATABASE_URL {safe_url(parsed)} cannot be used: {exc}") from None


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event, not the sqlite3 module, decide when transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed transition survives power loss, not only a killed process.
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (the CLI prints them afterwards)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextlib.contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One unit of work: commit if the block succeeds, roll back if it raises."""
    session = session_factory(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _migrations_dir() -> Path:
    # Not importlib.resources: an editable install may expose the package as a namespace,
    # whose __path__ also lists a path-hook entry that is not a folder.
    import migrations

    for entry in migrations.__path__:
        if (Path(entry) / "env.py").is_file():
            return Path(entry)
    raise RuntimeError(f"migrations package has no env.py in {list(migrations.__path__)}")


def alembic_config() -> Config:
    """Alembic's configuration for the migrations shipped inside the installed package."""
    location = _migrations_dir()
    cfg = Config(str(location / "alembic.ini"))
    cfg.set_main_option("script_location", str(location))
    return cfg


def _current_heads(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (default: the newest). Safe on every CLI start.

    When the schema is already current this costs one small query. Otherwise the upgrade runs in
    a single transaction that first takes a lock — a PostgreSQL advisory lock, or SQLite's
    write lock — so processes starting together migrate one after the other, and the later ones
    find nothing left to do.
    """
    cfg = alembic_config()
    if revision == "head" and _current_heads(engine) == set(ScriptDirectory.from_config(cfg).get_heads()):
        return
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATE_LOCK_KEY})
        else:
            conn.execute(text("SELECT 1"))  # opens the transaction: BEGIN IMMEDIATE on SQLite
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()


def downgrade(engine: Engine, revision: str) -> None:
    """Move the schema down to ``revision`` (``"base"`` drops everything); for tests and operators."""
    cfg = alembic_config()
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATE_LOCK_KEY})
        else:
            conn.execute(text("SELECT 1"))
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
        conn.commit()


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    engine = make_engine(url)  # ConfigError for a URL that is not SQLite or PostgreSQL
    try:
        migrate(engine)
    except (DBAPIError, OSError) as exc:  # unreachable, refused, no such database, unwritable…
        engine.dispose()
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise ConfigError(
            f"WANBATCH_DATABASE_URL {safe_url(url)}: cannot open the database: "
            f"{reason[0] if reason else type(exc).__name__}"
        ) from None
    return engine


def open_engine(settings: DatabaseSettings | None = None) -> Engine:
    """The engine of the system of record, migrated to head (once per process and URL).

    Code passes its settings. Called bare, it reads ``WANBATCH_DATABASE_URL`` alone from the
    environment: that is the deploy one-liner ``python -c "from jobs.db import open_engine;
    open_engine()"`` (docker-compose's ``migrate`` service), which needs no other setting valid.
    :class:`ConfigError` (one line, exit 2) when the database cannot be reached or used.
    """
    return _engine_for((settings if settings is not None else DatabaseSettings()).database_url)


class AdvisoryLock:
    """A PostgreSQL session-level advisory lock, held on a connection of its own.

    Held until :meth:`release`, or until the connection dies: when the holder is killed (even
    by ``kill -9``) the server ends its session and frees the lock, with no TTL to tune and no
    clock to trust (https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS).
    The connection runs in autocommit: a session lock needs no transaction, and one left "idle in
    transaction" for as long as the lock is held would meet a server's idle timeout.
    """

    def __init__(self, engine: Engine, key: int) -> None:
        self.engine = engine
        self.key = key
        self._conn: Connection | None = None

    @property
    def held(self) -> bool:
        """Whether this process held the lock at the last :meth:`acquire`."""
        return self._conn is not None

    def acquire(self) -> bool:
        """Take the lock, or check that it is still ours; ``False`` while another session holds it.

        Raises SQLAlchemy's errors when the database cannot be reached (the caller decides what
        that means; :meth:`release` then forgets the dead connection).
        """
        if self._conn is not None:
            self._conn.execute(text("SELECT 1"))  # still alive, still ours
            return True
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
        except BaseException:
            conn.close()
            raise
        if got:
            self._conn = conn
        else:
            conn.close()
        return got

    def release(self) -> None:
        """Give the lock up: ending its session frees it.

        The connection is invalidated, not just closed: a plain close would hand the session,
        lock and all, back to the engine's pool, and nobody else could take the lock until this
        process exits.
        """
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:  # already gone: so is the lock
                log.debug("closing the advisory lock's connection failed", exc_info=True)
