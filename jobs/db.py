"""Connecting to the system of record: engines, sessions, schema migrations and the locks
that serialise processes (:class:`AdvisoryLock`).

This module owns how wanbatch talks to a database *at all*; :mod:`jobs.store` owns *what* it
says. Two dialects are supported and tested:

* **SQLite** (the default, one host): WAL journal so readers never block the writer, a 30 s busy
  timeout so concurrent processes wait instead of failing (for the write lock, a wait that a
  stopping process gives up: :func:`stop_waiting_for_lock`), foreign keys on, and every
  transaction opened with ``BEGIN IMMEDIATE``. The last point is what makes compare-and-set and
  claiming safe there: a transaction that read first and wrote later could otherwise fail with
  ``SQLITE_BUSY_SNAPSHOT`` (or, worse, act on a stale read), whereas an immediate transaction
  holds the single write lock from its first statement, so transactions simply take turns.
  A unit of work's commit is synced (``fdatasync`` of the ``-wal`` file) unless every row it
  changed was :func:`covered`: see :class:`_Durability`.
* **PostgreSQL** (distributed workers): the psycopg 3 driver, a pooled connection pinged before
  use when it sat idle in the pool (:func:`_ping_after_idle`) so a database restart costs one
  failed checkout rather than a crashed worker, and row locks with ``SKIP LOCKED`` for claiming
  (in the store).

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
import contextvars
import fcntl
import logging
import math
import os
import re
import sqlite3
import stat
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    column,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    table,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    InvalidatePoolError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from jobs import clock, fs
from jobs.batch_names import batch_name
from jobs.errors import ConfigError, DatabaseFullError, DatabaseLockedError, DatabaseReadOnlyError
from jobs.printable import first_line, named_first_line, one_line
from jobs.settings import SQLITE_DRIVER_OPTIONS, DatabaseSettings, home_expanded
from jobs.url_secrets import masked_url

if TYPE_CHECKING:
    import psycopg
    from alembic.config import Config

log = logging.getLogger(__name__)

#: How long a unit of work waits for this process's SQLite writer connection (a day: as long as
#: any, like the in-process write lock it stands beside; a nested write would wait forever).
WRITER_WAIT_SECONDS = 86400.0
#: How long a SQLite connection waits for the write lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: How long one wait in SQLite's own busy handler lasts on a connection that writes (the writer
#: engine's, :func:`_add_writer`): its ``BEGIN IMMEDIATE`` is tried again in Python until
#: :data:`SQLITE_BUSY_TIMEOUT_MS` have passed, and given up between two tries once the process
#: is stopping (:func:`stop_waiting_for_lock`). SQLite's handler is C code that nothing
#: interrupts (not even ``sqlite3.Connection.interrupt()``), and Python's ``sqlite3`` has no
#: busy-handler hook: this slice bounds how long a stop waits for it.
SQLITE_BUSY_SLICE_MS = 100
#: A pooled PostgreSQL connection idle longer than this is pinged before it is handed out.
PING_AFTER_IDLE_SECONDS = 1.0
#: How long opening a PostgreSQL connection may take, in seconds (libpq's ``connect_timeout``;
#: without it a server that does not answer, a partitioned network, holds a connect for psycopg's
#: own default of 130 s, or for as long as the OS retries SYNs, and with it every checkout).
PG_CONNECT_TIMEOUT_SECONDS = 10
#: TCP keepalives on this side of every PostgreSQL connection (libpq's ``keepalives*``): after
#: 30 s of silence, a probe every 10 s, and the connection declared dead after 3 unanswered, so
#: a connection waiting for an answer that a cut network will never bring fails in about a
#: minute instead of the OS default of two hours and more.
PG_CLIENT_KEEPALIVES: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
#: How long data sent on a PostgreSQL connection may stay unacknowledged before the connection is
#: dropped, in milliseconds (libpq's ``tcp_user_timeout``, Linux's ``TCP_USER_TIMEOUT``):
#: keepalives probe only an idle connection, and a statement or COMMIT sent into a partition
#: would otherwise be retransmitted for about 15 minutes (``tcp_retries2``) before failing.
PG_TCP_USER_TIMEOUT_MS = 30_000
#: The server's TCP keepalives for the session holding the tick leader's advisory lock
#: (:class:`AdvisoryLock`, ``SET`` on its session): a partitioned leader's session, and the lock
#: it holds, is ended by the server within about a minute, so a healthy worker can take over,
#: instead of living for the OS default of two hours and more. Set on that session, not for every
#: connection at start-up (libpq's ``options``), which connection poolers such as PgBouncer refuse.
PG_SERVER_KEEPALIVES: dict[str, int] = {
    "tcp_keepalives_idle": 30,
    "tcp_keepalives_interval": 10,
    "tcp_keepalives_count": 3,
}
#: Key of the PostgreSQL advisory lock that serialises concurrent ``migrate`` calls
#: (an arbitrary constant that fits PostgreSQL's signed 64-bit lock key).
_MIGRATE_LOCK_KEY = 0x5B9E1D0C2A7F4E31
#: Database backends wanbatch is tested against (see the module docstring).
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
_URL_HELP = "sqlite:///path/to/wanbatch.db or postgresql://user:password@host:5432/dbname"
#: Files SQLite keeps beside the database.
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
#: Execution option that marks a connection of :func:`read_scope` (a deferred BEGIN on SQLite).
_READ_ONLY_OPTION = "wanbatch_read_only"
#: Set on a SQLite connection's ``info`` while it holds this process's writer lock.
_WRITE_LOCK_HELD = "wanbatch_write_lock"
#: Execution option of the long-lived writer connection (:class:`_Writer`), whose units of work
#: hold the writer lock from their start: its BEGIN takes no lock, its COMMIT releases none.
_SCOPED_OPTION = "wanbatch_scoped_writer"
#: Set on a SQLite connection's pool record while it runs ``synchronous = NORMAL`` (the writer
#: connection's units sync themselves: :class:`_Durability`); any other use syncs as SQLite does.
_SYNC_NORMAL = "wanbatch_sync_normal"


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
    if parsed.get_backend_name() == "sqlite":
        parsed = _sqlite_options(_sqlite_home(parsed))
    return parsed


def _sqlite_home(parsed: URL) -> URL:
    """A SQLite path starting with ``~`` made the home folder's, as the folder settings are.

    A ``.env`` file or a quoted value reaches wanbatch unexpanded; the file was prepared in the
    home folder while SQLite, given the path as written, opened ``./~/…`` and failed. A ``~user``
    whose home is unknown is a :class:`ConfigError` (it names a folder nobody meant).
    """
    database = parsed.database or ""
    if not database.startswith("~"):
        return parsed
    try:
        expanded = home_expanded(Path(database))
    except ValueError as exc:  # it names a folder nobody meant
        raise ConfigError(f"WANBATCH_DATABASE_URL: the SQLite path {exc}") from None
    return parsed.set(database=str(expanded))


#: Query options SQLAlchemy's pysqlite dialect takes itself (its ``create_connect_args``).
_PYSQLITE_OPTIONS = frozenset(SQLITE_DRIVER_OPTIONS)


def _sqlite_options(parsed: URL) -> URL:
    """A SQLite URL with SQLite's own options (``?mode=ro``) on a plain path, made what it says.

    SQLAlchemy passes those on only in SQLite's ``file:`` URI form: on a plain path it ignored
    ``mode=ro`` (the database opened read-write) with a multi-line warning, or, with
    ``uri=true``, made a new file named ``wanbatch.db?mode=ro``. ``mode=ro`` becomes the URI
    form (a read-only database: reading commands work, writing ones are refused in one line, see
    :func:`_refuse_read_only_write`); any other option is a :class:`ConfigError`.
    """
    database = parsed.database or ""
    if database.startswith("file:"):  # SQLite's URI form already: its options are SQLite's
        return parsed
    options = {k: v for k, v in parsed.query.items() if k not in _PYSQLITE_OPTIONS}
    if not options:
        return parsed
    if options != {"mode": "ro"}:
        names = ", ".join(f"{k}={v}" if isinstance(v, str) else k for k, v in sorted(options.items()))
        raise ConfigError(
            f"WANBATCH_DATABASE_URL: SQLite option(s) {names} are not supported "
            "(mode=ro, a read-only database, is; e.g. sqlite:////path/to/wanbatch.db?mode=ro)"
        )
    query = {k: v for k, v in parsed.query.items() if k in _PYSQLITE_OPTIONS} | {"uri": "true"}
    return parsed.set(database=f"file:{quote(database)}?mode=ro", query=query)


def safe_url(url: str | URL) -> str:
    """The URL with its password (and any query value that looks secret, ``sslpassword=``)
    masked, for messages (never the raw setting): :func:`jobs.url_secrets.masked_url` over
    SQLAlchemy's rendering, with SQLAlchemy's mask."""
    try:
        return masked_url(make_url(url).render_as_string(hide_password=False), mask="***")
    except (ArgumentError, ValueError):
        return "(not a URL)"


def _prepare_sqlite_file(path: Path) -> bool:
    """Create the database's folder (0700) and file (0600) before SQLite does; tighten old ones.
    True when this call created the file.

    The file is created empty (SQLite treats a zero-length file as a new database). ``O_EXCL``
    makes two processes starting together harmless: the second finds the file and moves on.
    """
    if not path.name or path.is_dir():  # "sqlite:///.", "sqlite:////", a folder's name
        raise ConfigError(
            f"WANBATCH_DATABASE_URL: the SQLite path {path} names a folder, not a file: add the database "
            "file's name, e.g. sqlite:///path/to/wanbatch.db"
        )
    folder = path.parent
    created = False
    try:
        if not folder.exists():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            created = True
    except OSError as exc:
        raise ConfigError(
            f"WANBATCH_DATABASE_URL: cannot create the SQLite database {path}: {exc.strerror or exc}"
        ) from None
    for candidate in (path, *(path.with_name(path.name + side) for side in _SQLITE_SIDE_FILES)):
        _owner_only(candidate)
    return created


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
    return _built_engine(url, **kwargs)[0]


#: A relative SQLite path (the default database, ``./.wanbatch/wanbatch.db``) from a folder that
#: was deleted under the shell (``mkdir g && cd g && rmdir ../g``).
CURRENT_FOLDER_GONE = f"{fs.CURRENT_FOLDER_GONE}: {fs.current_folder_gone_fix('WANBATCH_DATABASE_URL')}"


def _require_current_folder(database: str) -> None:
    """:class:`ConfigError` (exit 2, one line) when the SQLite file ``database`` is relative to
    the current folder and that folder is gone: SQLAlchemy makes the path absolute
    (``os.path.abspath``) as the engine is made, and its ``FileNotFoundError`` was an internal
    error ("please report it"). An absolute path needs no current folder: nothing to check."""
    if fs.lost_with_current_folder(database):
        raise ConfigError(CURRENT_FOLDER_GONE) from None


def _built_engine(url: str | URL, **kwargs: Any) -> tuple[Engine, Path | None]:
    """:func:`make_engine`'s engine, and the SQLite database file it created (None: none, or
    one already there; :func:`_prepare_sqlite_file` creates it alone, ``O_EXCL``)."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        on_disk = bool(database) and database != ":memory:" and not database.startswith("file:")
        if on_disk:
            _require_current_folder(database)
        # The engine first (it opens nothing): a driver that is not installed is one line, and
        # no file is left behind for a database that cannot be opened.
        engine = _create_engine(parsed, **kwargs)
        created = None
        if on_disk:
            path = Path(database).expanduser()
            try:
                created = path if _prepare_sqlite_file(path) else None
            except ConfigError:
                engine.dispose()
                raise
        writers = _configure_sqlite(engine)
        if on_disk and "poolclass" not in kwargs:
            _add_writer(engine, parsed, writers)
        return engine, created
    if parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = _pg_bounded_args(parsed, kwargs.get("connect_args") or {})
    engine = _create_engine(parsed, **kwargs)
    if "pool_pre_ping" not in kwargs:
        _ping_after_idle(engine)
    if parsed.get_backend_name() == "postgresql":
        _bound_lock_waits(engine)
        watch_clock(engine)  # every stamp and comparison on the database's clock
        event.listen(engine, "handle_error", _refuse_read_only_write)  # a standby, a read-only role…
    return engine, None


#: What PostgreSQL's clock says, as epoch seconds (``clock_timestamp()``, not ``now()``).
_DATABASE_EPOCH = "SELECT extract(epoch FROM clock_timestamp())"


def measure_clock(dbapi_connection: Any, *, say: bool = True) -> bool:
    """Ask PostgreSQL's clock over ``dbapi_connection`` (a DB-API connection outside any
    transaction: asked in autocommit, as SQLAlchemy's ping is) and give the sample to
    :func:`jobs.clock.take` (``say``: a skew is said once); whether it was taken. Never raises: a
    connection that cannot answer keeps the last measurement, and what it failed for is the next
    statement's to say."""
    before_autocommit = getattr(dbapi_connection, "autocommit", True)
    try:
        if not before_autocommit:
            dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        try:
            w0, s0 = clock.host_time(), clock.steady()
            cursor.execute(_DATABASE_EPOCH)
            row = cursor.fetchone()
            s1, w1 = clock.steady(), clock.host_time()
        finally:
            cursor.close()
            if not before_autocommit:
                dbapi_connection.autocommit = before_autocommit
    except Exception:  # a failed measurement keeps the last one
        log.debug("could not read the database's clock", exc_info=True)
        return False
    if not row or row[0] is None:
        return False
    return clock.take(float(row[0]), before=s0, after=s1, wall=(w0 + w1) / 2, say=say)


def on_database_clock(engine: Engine) -> None:
    """Make sure this process reads time on ``engine``'s timeline (:mod:`jobs.clock`) before it
    judges something by it: a PostgreSQL engine is measured now when nothing is measured (an
    engine :func:`open_engine` opened before hands out no connection when asked for again, and
    :func:`jobs.clock.reset` forgets); SQLite's timeline is this host's clock already."""
    if engine.dialect.name == "postgresql" and clock.offset() is None:
        with engine.connect():  # the checkout measures (watch_clock)
            pass


def watch_clock(engine: Engine) -> None:
    """Keep this process on a PostgreSQL ``engine``'s clock (:mod:`jobs.clock`): measured on the
    first connection it hands out, again at most every :data:`jobs.clock.REMEASURE_SECONDS`."""

    @event.listens_for(engine, "checkout")
    def _measure_if_due(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if clock.due_for_measurement():
            measure_clock(dbapi_connection)


def pg_bounded_params(params: dict[str, Any]) -> dict[str, Any]:
    """libpq connection parameters ``params`` (what psycopg is given) with wanbatch's time bounds
    added: :data:`PG_CONNECT_TIMEOUT_SECONDS`, :data:`PG_CLIENT_KEEPALIVES` and
    :data:`PG_TCP_USER_TIMEOUT_MS`.

    What ``params`` already says wins (a ``?connect_timeout=`` in the URL), as does libpq's
    environment variable ``PGCONNECT_TIMEOUT``, which an explicit parameter would otherwise
    silence. No ``statement_timeout`` or ``lock_timeout``: exports, large inserts and migrations
    legitimately run, or wait for a lock, far longer than any bound that would help (the
    operator's reading commands bound their lock waits per transaction:
    :func:`lock_waits_bounded`). Nothing in ``options`` either: poolers refuse it (the leader's
    session gets the server's keepalives by ``SET``: :data:`PG_SERVER_KEEPALIVES`).
    """
    bounded = dict(params)
    if "connect_timeout" not in bounded and not os.environ.get("PGCONNECT_TIMEOUT"):
        bounded["connect_timeout"] = PG_CONNECT_TIMEOUT_SECONDS
    for key, value in PG_CLIENT_KEEPALIVES.items():
        bounded.setdefault(key, value)
    bounded.setdefault("tcp_user_timeout", PG_TCP_USER_TIMEOUT_MS)
    return bounded


def _pg_bounded_args(parsed: URL, connect_args: dict[str, Any]) -> dict[str, Any]:
    """``connect_args`` for :func:`sqlalchemy.create_engine` on PostgreSQL: the caller's, over the
    URL's own parameters, bounded (:func:`pg_bounded_params`). SQLAlchemy lets ``connect_args``
    replace the URL's parameters, so only what is added is returned beside the caller's."""
    try:
        _args, from_url = parsed.get_dialect()().create_connect_args(parsed)
    except (ArgumentError, ImportError, TypeError):  # create_engine says why, in one line
        return connect_args
    given = {**from_url, **connect_args}
    bounded = pg_bounded_params(given)
    return {**connect_args, **{k: v for k, v in bounded.items() if given.get(k) != v}}


#: When (``time.monotonic()``) a statement of this process last got its answer, on any engine.
_last_answer = 0.0


def _heard() -> None:
    """A unit of work that began a transaction committed on some engine of this process: the
    database answered (:func:`last_answer`). Noted there, not by a ``after_cursor_execute`` listener,
    which would turn off :func:`jobs.store.direct.run_reusable`'s direct statement path on every engine."""
    global _last_answer
    _last_answer = time.monotonic()


def last_answer() -> float:
    """When (``time.monotonic()``; 0.0: never) a unit of work of this process that began a
    transaction last committed, on any engine: a database that answered since a moment is not
    frozen, however slowly it accepts new connections (:func:`worker.running.database_silence`)."""
    return _last_answer


def _create_engine(parsed: URL, **kwargs: Any) -> Engine:
    """:func:`sqlalchemy.create_engine`; a :class:`ConfigError` for a URL it refuses (a bad query
    option, a driver that is not installed: ``sqlite+pysqlcipher://``, ``postgresql+asyncpg://``)."""
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError, TypeError) as exc:
        raise ConfigError(f"WANBATCH_DATABASE_URL {safe_url(parsed)} cannot be used: {exc}") from None
    if engine.dialect.is_async:  # sqlite+aiosqlite://: every query would fail ("greenlet_spawn")
        engine.dispose()
        raise ConfigError(
            f"WANBATCH_DATABASE_URL {safe_url(parsed)} cannot be used: {parsed.drivername} is an asyncio "
            f"driver; name the database without it (sqlite:///…, postgresql://…)"
        )
    return engine


@dataclass(frozen=True, slots=True)
class SqliteFile:
    """Where a SQLite URL keeps its database on disk, and what opening it creates."""

    #: The file (a relative path is relative to the working folder, as SQLite opens it).
    path: Path
    #: Opening creates the file when it is missing (``mode=ro`` and ``mode=rw`` do not).
    creates: bool
    #: ... and its missing folders: a plain path (:func:`_prepare_sqlite_file`); SQLite's URI
    #: form (``sqlite:///file:…``) creates the file only.
    makes_folders: bool
    #: SQLite's own URI options (``mode=ro`` among them: a plain path's becomes the URI form).
    options: tuple[tuple[str, str], ...] = ()


def sqlite_file(url: str | URL) -> SqliteFile | None:
    """The file a SQLite URL keeps its database in; None for PostgreSQL and an in-memory SQLite.

    Looks at nothing: :class:`ConfigError` for a URL :func:`normalize_url` refuses.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if not database or database == ":memory:":
        return None
    if not database.startswith("file:"):
        return SqliteFile(Path(database).expanduser(), creates=True, makes_folders=True)
    # SQLite's URI form: file:PATH?options, PATH percent-encoded, after an optional empty or
    # "localhost" authority (https://www.sqlite.org/uri.html).
    body, _, query = database.removeprefix("file:").partition("?")
    body = body.partition("#")[0]
    if body.startswith("//"):
        authority, slash, rest = body[2:].partition("/")
        if authority not in ("", "localhost"):
            return None  # SQLite refuses it: opening says so
        body = slash + rest
    options = tuple(parse_qsl(query.partition("#")[0], keep_blank_values=True))
    mode = dict(options).get("mode", "rwc")
    if not body or body == ":memory:" or mode == "memory":
        return None
    return SqliteFile(Path(unquote(body)), creates=mode == "rwc", makes_folders=False, options=options)


def read_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine that only reads the database, and creates and changes nothing, not even for
    SQLite: none of :func:`make_engine`'s preparations (no folder or file made, no permission
    tightened, no switch to WAL, no pragma), and the file opened with ``mode=rw``, so SQLite
    opens an existing database and never creates one (a missing file: "unable to open database
    file"). Read-write rather than ``mode=ro``: a read-only connection to a WAL database leaves
    the ``-wal`` and ``-shm`` files it had to create behind, the last read-write one removes them.
    What the caller runs on it is up to the caller: ``doctor`` runs only SELECTs.

    Extra keyword arguments go to :func:`sqlalchemy.create_engine`, as for :func:`make_engine`.
    """
    parsed = normalize_url(url)
    target = sqlite_file(parsed)
    if target is None:
        if parsed.get_backend_name() == "sqlite":  # in memory: there is no file to create
            return _create_engine(parsed, **kwargs)
        return make_engine(parsed, **kwargs)
    options = [(k, v) for k, v in target.options if k != "mode"] + [("mode", "rw")]
    database = f"file:{quote(str(target.path))}?{urlencode(options)}"
    query = {k: v for k, v in parsed.query.items() if k in _PYSQLITE_OPTIONS} | {"uri": "true"}
    return _create_engine(parsed.set(database=database, query=query), **kwargs)


def _ping_after_idle(engine: Engine) -> None:
    """Ping a pooled connection before handing it out when it sat in the pool for longer than
    :data:`PING_AFTER_IDLE_SECONDS`; a dead one invalidates the pool, as ``pool_pre_ping`` does.

    ``pool_pre_ping`` pings at every checkout: a round trip, and on psycopg two autocommit
    switches around it, before each unit of work, about 3 % of a distributed worker's CPU on the
    drain benchmark (a job takes about ten units). A connection that was answering a moment ago
    is almost surely alive. The ping is there for the ones that sat unused while the server
    restarted or a proxy or firewall dropped them, and those were idle. What is given up: a server
    that restarts within that second *and* is not asked anything while it is down (anything
    asked then fails and invalidates the pool) leaves a connection that fails its next statement
    once. Every unit of work already survives that, as it survives the server dying mid-statement.

    This is the checkout-event form of SQLAlchemy's pessimistic disconnect handling
    (https://docs.sqlalchemy.org/en/20/core/pooling.html#disconnect-handling-pessimistic): a
    ``DisconnectionError`` raised on checkout makes the pool connect anew; here its subclass
    ``InvalidatePoolError``, which also discards every connection made before it, as a failed
    pre-ping does. A connection's ``info`` is cleared when it is replaced, so a new one is never
    pinged.
    """
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _idle_from(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            record.info["wanbatch_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("wanbatch_idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
            return  # a new connection, or one in use a moment ago
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            if not dialect.is_disconnect(exc, dbapi_connection, None):
                raise
            # Like pool_pre_ping: the server went away, so every connection made before now is suspect.
            raise InvalidatePoolError(f"pooled connection found dead on checkout: {exc}") from exc


def _use_wal(cursor: Any) -> None:
    """Switch the database file to WAL (persistent: later connections find it already on).

    The switch needs the file to itself, and SQLite answers "database is locked" at once,
    without waiting in its busy handler, while another connection holds it — as when several
    processes open a new database together (``run`` and ``serve`` started side by side). So
    the switch is retried, with a short sleep, for as long as a busy write would wait.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode").fetchone()
            if mode is not None and str(mode[0]).lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


#: Set while this process is stopping (Ctrl-C, SIGTERM: :func:`stop_waiting_for_lock`).
_STOPPING = threading.Event()


#: How long a transaction a stopping process begins on PostgreSQL waits for a lock another
#: session holds (``lock_timeout``, :func:`stop_waiting_for_lock`), in seconds.
STOP_LOCK_WAIT_SECONDS = 3.0


def stop_waiting_for_lock() -> None:
    """This process is stopping: from now on a SQLite write that finds the write lock held by
    another process gives up within :data:`SQLITE_BUSY_SLICE_MS` ("database is locked",
    :func:`is_locked`) instead of waiting up to :data:`SQLITE_BUSY_TIMEOUT_MS` for it, and a
    PostgreSQL transaction it begins waits at most :data:`STOP_LOCK_WAIT_SECONDS` for a lock
    (``lock_timeout``, :func:`_bound_lock_waits`; SQLSTATE 55P03 then, :func:`is_lock_timeout`):
    another session's ``LOCK TABLE`` left open held a stop for ever, without a word. A write
    that finds the lock free still goes through: what a stopping run gives back is written
    whenever it can be. Safe to call from a signal handler (it only sets an event).

    Process-wide, unlike :func:`lock_waits_bounded`: a stop is the whole process's. Only the
    commands that stop on signals set it (:func:`worker.running.stop_on_signals`), and it is
    cleared when such a command begins, when it finishes, and when a stopped one hands control
    back to an in-process caller (:func:`cli.main`'s end; the command itself ends its process
    first): a running process's own work, and the long-lived ``serve`` and ``worker``, never
    carry this bound."""
    _STOPPING.set()


def wait_for_lock_again() -> None:
    """Undo :func:`stop_waiting_for_lock` (a stop that came too late to stop anything, or a
    new command in the same process: tests)."""
    _STOPPING.clear()


#: SQLite's primary result code for a lock another connection holds (``SQLITE_BUSY``:
#: "database is locked"; its extended codes keep it in the low byte).
_SQLITE_BUSY = 5


def is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` says SQLite's write lock was held by another connection for longer than
    this one would wait (``SQLITE_BUSY``, "database is locked"). This process's own writers
    take turns on a lock of their own before SQLite's (:func:`_configure_sqlite`), so the
    holder is another process: another ``wanbatch``, or any tool with a write transaction open
    on the file."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    code = getattr(orig, "sqlite_errorcode", 0) or 0
    return isinstance(orig, sqlite3.OperationalError) and code & 0xFF == _SQLITE_BUSY


def gave_up_on_lock(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that found SQLite's write lock held by another process, or a
    PostgreSQL transaction that waited out :data:`STOP_LOCK_WAIT_SECONDS` for another session's
    lock (:func:`is_lock_timeout`), while this one is stopping (:func:`stop_waiting_for_lock`):
    the stopping command's last line says so, once, rather than every part of its shutdown that
    met it."""
    return _STOPPING.is_set() and (is_locked(exc) or is_lock_timeout(exc))


def held_by_lock(exc: BaseException) -> bool:
    """Whether ``exc`` is a lock another process holds on the database and this one would not
    wait out: SQLite's write lock (:func:`is_locked`) or a PostgreSQL ``lock_timeout``
    (:func:`is_lock_timeout`)."""
    return is_locked(exc) or is_lock_timeout(exc)


def _begin(dbapi_connection: Any, sql: str) -> None:
    """Run ``sql`` (a BEGIN) on a sqlite3 connection; its errors wrapped as SQLAlchemy's own
    (``OperationalError`` for "database is locked"), as if SQLAlchemy had sent it.

    A ``BEGIN IMMEDIATE`` that finds the write lock taken is tried again until
    :data:`SQLITE_BUSY_TIMEOUT_MS` have passed since the first try, unless the process is
    stopping (:func:`stop_waiting_for_lock`): each try waits in SQLite's busy handler for as
    long as the connection's ``busy_timeout`` (:data:`SQLITE_BUSY_SLICE_MS` on the writer
    engine; the whole timeout elsewhere, so one try), and a stop is noticed between two tries.
    A deferred ``BEGIN`` takes no lock and is sent once."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            dbapi_connection.execute(sql)
            return
        except sqlite3.Error as exc:
            retry = sql == "BEGIN IMMEDIATE" and is_locked(exc)
            if not retry or _STOPPING.is_set() or time.monotonic() >= deadline:
                raise DBAPIError.instance(sql, (), exc, sqlite3.Error) from exc


#: A SQLite engine → the engine of its writer connection (:func:`_add_writer`).
_WRITER_ENGINES: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
#: A SQLite engine → this process's long-lived writer connection (:class:`_Writer`).
_WRITERS: weakref.WeakKeyDictionary[Engine, _Writer] = weakref.WeakKeyDictionary()


#: ``Session.info`` key of a :class:`_Writer` unit's :class:`_Covered` count.
_COVERED_KEY = "wanbatch_covered"


class _Covered:
    """The rows a unit of work on the writer connection changed inside :func:`covered` blocks,
    counted with SQLite's ``total_changes`` (every row an INSERT, UPDATE or DELETE touched on
    the connection, whichever way the statement was sent: :func:`jobs.store.direct.run_reusable`
    bypasses SQLAlchemy's statement events)."""

    __slots__ = ("changes", "dbapi", "depth")

    def __init__(self, dbapi: Any) -> None:
        self.dbapi = dbapi
        self.changes = 0
        self.depth = 0


@contextlib.contextmanager
def covered(session: Session) -> Iterator[None]:
    """Mark the writes of this block as needing no sync of their own (SQLite only).

    A write is *covered* when nothing outside the database acts on it before a later synced
    commit does, or when losing it to a power cut only makes wanbatch redo free work (ask a
    status again, fetch a result again). SQLite appends its write-ahead log in order, so the
    sync of a later commit makes every earlier one durable too
    (https://www.sqlite.org/wal.html; https://www.sqlite.org/pragma.html#pragma_synchronous:
    in WAL mode with ``NORMAL`` a commit not yet synced can be rolled back by a power loss,
    never corrupted). A unit of work is synced when it commits unless *every* row it changed
    was changed inside such a block: a write nobody classified syncs, as every commit did
    before. Nested blocks count once; outside a :func:`session_scope` on a SQLite file
    (PostgreSQL, a session of :func:`session_factory`) this does nothing."""
    count: _Covered | None = session.info.get(_COVERED_KEY)
    if count is None or count.depth:
        yield
        return
    before = count.dbapi.total_changes
    count.depth = 1
    try:
        yield
    finally:
        count.depth = 0
        count.changes += count.dbapi.total_changes - before


def in_covered(session: Session) -> bool:
    """Whether this is inside a :func:`covered` block of a unit of work on a SQLite file."""
    count: _Covered | None = session.info.get(_COVERED_KEY)
    return count is not None and count.depth > 0


class _Durability:
    """Which commits of a SQLite file's writer connection (:class:`_Writer`) are on disk.

    That connection runs with ``PRAGMA synchronous = NORMAL``: its commits are not synced by
    SQLite. A unit of work whose writes were not all :func:`covered` syncs the write-ahead log
    itself once it committed (:meth:`sync`), before it returns to its caller, which may then act
    on it outside the database (a POST to fal); a covered one only counts as written. SQLite
    decides a commit's sync before the transaction begins ("Safety level may not be changed
    inside a transaction"), when what the unit will write is not known yet: so the sync is
    ``fdatasync(2)`` on the ``-wal`` file, what ``synchronous = FULL`` runs at a WAL commit (on
    the inode: any descriptor of the file flushes the same pages). Syncs run outside the
    process's write lock, one at a time: a sync that began after a commit covers it, so units
    that commit together share one (a group commit).
    """

    def __init__(self) -> None:
        #: The ``-wal`` file (set when the writer connects: :meth:`_Writer._connect`).
        self.wal: Path | None = None
        #: Commits that changed rows, in the order they reached the log.
        self.committed = 0
        #: Every commit up to this one is on disk.
        self.synced = 0
        self._lock = threading.Lock()
        self._inode: tuple[int, int] | None = None

    def commit(self, count: _Covered, changed: int) -> int:
        """Count a unit's commit (under the process's write lock, so in log order); the commit
        number :meth:`sync` must reach before the unit returns, 0 when it needs none."""
        if changed <= 0:
            return 0
        self.committed += 1
        return self.committed if changed > count.changes else 0

    def sync(self, upto: int, *, log: bool = False) -> None:
        """Make every commit up to number ``upto`` durable (nothing when a sync that began after
        it is done already). ``log``: sync the log whatever this process's counts say, for the
        commits other processes made in it (:func:`sync_log`)."""
        with self._lock:
            if self.synced >= upto and not log:
                return
            target = self.committed
            self._sync_wal()
            self.synced = max(self.synced, target)

    def _sync_wal(self) -> None:
        if self.wal is None:  # never connected, so never committed
            return
        try:
            fd = os.open(self.wal, os.O_RDONLY)
        except FileNotFoundError:
            return  # checkpointed and removed: its pages are in the database file, synced
        except OSError as exc:  # out of file descriptors (EMFILE), say: the database's own trouble
            raise _sync_failed(exc) from exc
        try:
            sync_file(fd)
            seen = os.fstat(fd)
            inode = (seen.st_dev, seen.st_ino)
        except OSError as exc:
            raise _sync_failed(exc) from exc
        finally:
            os.close(fd)
        if inode != self._inode:
            # A log this process has not synced yet may have been created since: its name must
            # be on disk too (SQLite syncs a new log's folder the same way: unixSync).
            fs.sync_folder(self.wal.parent)
            self._inode = inode


def _sync_failed(exc: OSError) -> Exception:
    """A sync of the SQLite log that failed with ``exc`` (opening the log, or syncing it), as
    SQLite says its own I/O failures: an ``OperationalError`` ("disk I/O error"), which every
    caller takes for the database being unusable just now (:func:`is_unavailable`: the step gives
    its job back, an accepted submission is held and recorded later), never for a bug. Its
    ``errno`` stays in the cause (``EMFILE``: :func:`jobs.open_files.out_of_files`)."""
    failed = sqlite3.OperationalError(f"disk I/O error: {exc}")
    return DBAPIError.instance("fdatasync", (), failed, sqlite3.Error)


#: ``fdatasync(2)`` where there is one (Linux); ``fsync(2)`` elsewhere (macOS).
sync_file: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def sync_log(engine: Engine) -> None:
    """Make every commit in ``engine``'s SQLite file durable, whichever process made it: before
    ``run`` reports what the batch's jobs did, which other processes may have committed without a
    sync of their own (a worker's, or a second run's, success stored in a local folder) — this
    process's counts (:func:`sync_commits`) know nothing of those. One ``fdatasync`` of the log,
    also when this process never wrote; nothing on PostgreSQL."""
    writer = _WRITERS.get(engine)
    if writer is not None:
        writer.sync_log()


def sync_commits(engine: Engine) -> None:
    """Make every commit this process made on ``engine`` durable (see :func:`covered`), before
    something outside the database depends on commits that were not synced: a file renamed into
    place (``run``'s report reads other processes' commits too: :func:`sync_log`). One
    ``fdatasync`` at most, none when nothing waits for one; nothing on PostgreSQL, whose every
    commit is durable."""
    writer = _WRITERS.get(engine)
    if writer is not None:
        writer.durability.sync(writer.durability.committed)


class _Writer:
    """The one connection every :func:`session_scope` of this process writes a SQLite file on,
    kept open for the life of the engine, and the units of work that take turns on it.

    A unit of work that checked a connection out of a pool and gave it back paid about 110 µs
    of SQLAlchemy's CPU for it (the check-out, a :class:`~sqlalchemy.engine.Connection`, the
    check-in and its reset) — more than the BEGIN and COMMIT themselves, and every job commits
    several units. Here a unit holds the process's write lock (``writers``) from its start and
    binds its :class:`~sqlalchemy.orm.Session` to the connection (a session does not close a
    connection it was given). The lock is taken up front because the connection is shared: a
    session must find it free of another thread's transaction. A unit opened inside another
    one on the same thread runs on the same connection when the outer one has not begun its
    transaction yet (as it did with a pool); inside a begun transaction it would join it, so it
    raises instead (with a pool it waited forever).
    """

    def __init__(self, engine: Engine, writers: threading.Lock) -> None:
        self.engine = engine
        self.writers = writers
        self.durability = _Durability()
        self._connection: Connection | None = None
        self._pid = os.getpid()
        self._owner: int | None = None  # the thread whose unit of work holds ``writers``

    @contextlib.contextmanager
    def unit(self) -> Iterator[Session]:
        """One unit of work: commit if the block succeeds, roll back if it raises."""
        me = threading.get_ident()
        nested = self._owner == me
        if not nested:
            self.writers.acquire()
            self._owner = me
        upto = 0
        try:
            connection = self._connect()
            if nested and connection.in_transaction():
                raise RuntimeError("a unit of work was opened inside another one's transaction")
            count = _Covered(connection.connection.dbapi_connection)
            before = count.dbapi.total_changes
            try:
                session = Session(bind=connection, expire_on_commit=False)
                session.info[_COVERED_KEY] = count
                with _unit_of_work(session) as session:
                    yield session
                upto = self.durability.commit(count, count.dbapi.total_changes - before)
            finally:
                if connection.in_transaction() or connection.invalidated:
                    self._discard()  # a rollback that failed: the next unit starts afresh
        finally:
            if not nested:
                self._owner = None
                self.writers.release()
        if upto:  # outside the lock: the next writer commits meanwhile, a later sync covers both
            self.durability.sync(upto)

    def sync_log(self) -> None:
        """:func:`sync_log`: the log named as SQLite names it, asked of a connection of the pool
        when this process's writer never connected (its units set it: :meth:`_connect`)."""
        if self.durability.wal is None:
            raw = self.engine.raw_connection()
            try:
                dbapi = raw.driver_connection
                assert dbapi is not None  # just checked out
                main = dbapi.execute("PRAGMA database_list").fetchone()
            finally:
                raw.close()
            if not main or not main[2]:  # an in-memory database: no log on disk
                return
            self.durability.wal = Path(f"{main[2]}-wal")
        self.durability.sync(self.durability.committed, log=True)

    def _connect(self) -> Connection:
        connection = self._connection
        if connection is not None and self._pid != os.getpid():
            connection = self._connection = None  # a forked child never touches its parent's handle
        if connection is None or connection.closed or connection.invalidated:
            self._discard()
            connection = self.engine.connect().execution_options(**{_SCOPED_OPTION: True})
            # Its units sync the log themselves, when they must (_Durability): SQLite does not.
            dbapi = connection.connection.dbapi_connection
            assert dbapi is not None  # just connected
            dbapi.execute("PRAGMA synchronous = NORMAL")
            connection.connection.info[_SYNC_NORMAL] = True
            # The log is named after the database file as SQLite opened it (symbolic links
            # followed, a relative path made whole): https://www.sqlite.org/wal.html
            main = dbapi.execute("PRAGMA database_list").fetchone()
            self.durability.wal = Path(f"{main[2]}-wal")
            self._connection, self._pid = connection, os.getpid()
        return connection

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # gone already; the pool's reset does the rest
                connection.close()

    def close(self) -> None:
        """Close the connection (the engine is being disposed of); the next unit opens another."""
        if self._owner == threading.get_ident():
            self._discard()
            return
        with self.writers:
            self._discard()


def _add_writer(engine: Engine, url: URL, writers: threading.Lock) -> None:
    """Give ``engine`` one connection that every :func:`session_scope` of this process writes on.

    SQLite empties a connection's page cache whenever it begins a transaction after another
    connection has written (``pagerBeginReadTransaction`` → ``pager_reset`` in pager.c). With a
    pool of connections taken in turns by the steps' threads, nearly every unit of work began
    on a cold cache and read the pages it touched again, a system call each (on the drain
    benchmark the gain is within the machine's noise: ``bench/RESULTS.md``). This process's
    writers already take turns (the lock of :func:`_configure_sqlite`), so one connection costs
    them no concurrency, and the writes it makes never empty its own cache. Reads
    (:func:`read_scope`) keep the engine's pool and read a snapshot beside the writer, as
    before. The writer's engine shares ``writers``, so writes made on ``engine`` itself
    (``engine.begin()``) still take turns with it; it is disposed with ``engine``.

    The connection stays open between units of work (:class:`_Writer`); the writer's pool keeps
    a second one for sessions made with :func:`session_factory`, which take the lock when they
    begin, as before.
    """
    # The pool's wait stands in for the lock's, which never times out either.
    writer = create_engine(url, pool_size=2, max_overflow=0, pool_timeout=WRITER_WAIT_SECONDS)
    # Its transactions all begin with BEGIN IMMEDIATE, the one statement that waits for another
    # process's writer (in WAL the statements after it wait for nothing): it waits in slices.
    _configure_sqlite(writer, writers, busy_ms=SQLITE_BUSY_SLICE_MS)
    _WRITER_ENGINES[engine] = writer
    held = _WRITERS[engine] = _Writer(writer, writers)

    @event.listens_for(engine, "engine_disposed")
    def _dispose_writer(_engine: Engine) -> None:
        with contextlib.suppress(Exception):  # a log gone with its folder: nothing left to sync
            held.durability.sync(held.durability.committed)
        held.close()
        writer.dispose()


def _configure_sqlite(
    engine: Engine, writers: threading.Lock | None = None, *, busy_ms: int = SQLITE_BUSY_TIMEOUT_MS
) -> threading.Lock:
    """The pragmas, transaction handling and in-process write lock of a SQLite engine; that
    lock (``writers``, when given: shared with another engine on the same file). ``busy_ms``:
    how long one statement waits in SQLite's busy handler (see :func:`_begin`)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event, not the sqlite3 module, decide when transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
            _use_wal(cursor)
            # FULL: a committed transition survives power loss, not only a killed process.
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    # SQLite has one writer at a time. A writer that finds the lock taken sleeps in SQLite's
    # busy handler, in steps of 1 to 100 ms (sqliteDefaultBusyCallback), and is not woken
    # when the lock frees: with a few threads writing, most of a job's latency was spent
    # asleep there. Writers of this process first queue on a lock of their own, handed over
    # the moment the previous transaction ends; SQLite's busy handler is then only met by
    # writers of other processes (the CLI, the webhook receiver).
    writers = writers if writers is not None else threading.Lock()
    event.listen(engine, "handle_error", _refuse_read_only_write)

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A read_scope() reads only: a deferred BEGIN takes a WAL snapshot and never waits for
        # (or holds) the single write lock. Everything else takes the write lock up front.
        # Sent on the DBAPI connection: SQLAlchemy's execution machinery (a statement context,
        # events, a result) cost more than the BEGIN itself, and every unit of work begins.
        dbapi = connection.connection.dbapi_connection
        options = connection.get_execution_options()
        if options.get(_READ_ONLY_OPTION):
            _begin(dbapi, "BEGIN")
            return
        if options.get(_SCOPED_OPTION):  # its unit of work holds the lock already (_Writer)
            _begin(dbapi, "BEGIN IMMEDIATE")
            return
        if connection.connection.info.pop(_SYNC_NORMAL, False):  # the writer's, handed back
            dbapi.execute("PRAGMA synchronous = FULL")
        writers.acquire()
        connection.info[_WRITE_LOCK_HELD] = True
        try:
            _begin(dbapi, "BEGIN IMMEDIATE")
        except BaseException:
            _release_writers(connection.info)
            raise

    def _release_writers(info: dict[str, Any]) -> None:
        if info.pop(_WRITE_LOCK_HELD, False):
            writers.release()

    # SQLAlchemy's commit/rollback events fire *before* the DBAPI call; releasing there would
    # let the next writer in while SQLite still holds the lock. So the transaction is ended
    # here, then the lock handed over; SQLAlchemy's own commit()/rollback() that follows finds
    # no transaction open and does nothing (sqlite3 checks sqlite3_get_autocommit()).
    @event.listens_for(engine, "commit")
    def _on_commit(connection: Any) -> None:
        if connection.info.get(_WRITE_LOCK_HELD):
            connection.connection.dbapi_connection.commit()
            _release_writers(connection.info)

    @event.listens_for(engine, "rollback")
    def _on_rollback(connection: Any) -> None:
        # Invalidated (Ctrl-C inside a statement: SQLAlchemy drops the connection on a
        # BaseException): its DBAPI connection is closed, its transaction with it, and the
        # checkin below released the lock. Its ``info`` would raise PendingRollbackError, which
        # replaced the interruption with an internal error (exit 70 instead of 130).
        if connection.invalidated:
            return
        if connection.info.get(_WRITE_LOCK_HELD):
            try:
                connection.connection.dbapi_connection.rollback()
            finally:
                _release_writers(connection.info)

    @event.listens_for(engine.pool, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        # Whatever ended the transaction (an invalidated connection), a connection back in
        # the pool holds no write lock of this process any more.
        _release_writers(record.info)

    return writers


#: SQLite's primary result code for a write to a read-only database (``SQLITE_READONLY``; its
#: extended codes keep it in the low byte).
_SQLITE_READONLY = 8


#: Why a SQLite database refuses writes, as the error tells (:class:`DatabaseReadOnlyError`'s reason).
SQLITE_READ_ONLY_REASON = "WANBATCH_DATABASE_URL has mode=ro, or this user may not write its file"
#: Why a PostgreSQL database refuses writes (SQLSTATE ``read_only_sql_transaction``): the error
#: does not tell a standby from the setting.
PG_READ_ONLY_REASON = (
    "PostgreSQL's transaction_read_only is on: default_transaction_read_only for this role or "
    "database, or a standby server"
)


def _refuse_read_only_write(context: Any) -> None:
    """A write to a read-only database — SQLite (``?mode=ro``, or a file this user may not
    write) or PostgreSQL (``default_transaction_read_only = on`` for the role or database, or a
    hot standby: SQLSTATE ``read_only_sql_transaction``): one :class:`DatabaseReadOnlyError`
    line (exit 2), where it was an internal error. The statement failed, so nothing was written;
    its unit of work rolls back as for any error."""
    orig = context.original_exception
    if isinstance(orig, sqlite3.Error):
        if (getattr(orig, "sqlite_errorcode", 0) or 0) & 0xFF != _SQLITE_READONLY:
            return
        reason = SQLITE_READ_ONLY_REASON
    elif getattr(orig, "sqlstate", None) == _PG_READ_ONLY:
        reason = PG_READ_ONLY_REASON
    else:
        return
    raise DatabaseReadOnlyError(
        f"the database is read-only ({reason}) and this command writes to it; nothing was changed",
        reason=reason,
        said=named_first_line(orig),
    ) from None


#: PostgreSQL's SQLSTATE for a write in a read-only transaction (``read_only_sql_transaction``:
#: ``default_transaction_read_only = on``, or a hot standby).
_PG_READ_ONLY = "25006"


def is_read_only(exc: BaseException) -> bool:
    """Whether ``exc`` says the database refused a write because it is read-only: SQLite's or
    PostgreSQL's ``read_only_sql_transaction`` (``default_transaction_read_only = on``, a hot
    standby), which :func:`_refuse_read_only_write` makes a :class:`DatabaseReadOnlyError` on
    wanbatch's engines (the driver's error itself on any other). Not
    an outage that passes by waiting, nor a bug: nothing can be written until someone changes
    the database's setting or the URL."""
    if isinstance(exc, DatabaseReadOnlyError):
        return True
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(orig, sqlite3.Error):
        return (getattr(orig, "sqlite_errorcode", 0) or 0) & 0xFF == _SQLITE_READONLY
    return getattr(orig, "sqlstate", None) == _PG_READ_ONLY


_PG_READ_ONLY_NOW = text("SELECT current_setting('transaction_read_only'), pg_is_in_recovery()")


def read_only_reason(engine: Engine) -> str | None:
    """Why ``engine``'s database refuses every write, as far as can be told without writing
    (None: it takes writes, or nothing says it does not). SQLite: ``mode=ro`` in the URL, or a
    file this user may not write (its permissions, a read-only file system); PostgreSQL: the
    session's ``transaction_read_only`` (``default_transaction_read_only = on`` for the role or
    database, or a hot standby). Reads only (one short query on PostgreSQL, none on SQLite); the
    reason may name the file, so it is for a log line or the terminal, not a public answer.
    Raises what asking PostgreSQL raised."""
    if engine.dialect.name == "sqlite":
        return sqlite_read_only_reason(engine.url)
    if engine.dialect.name != "postgresql":
        return None
    with read_scope(engine) as session:
        read_only, standby = session.execute(_PG_READ_ONLY_NOW).one()
    if standby:
        return "the PostgreSQL server is a standby (in recovery): it takes no writes"
    if str(read_only).lower() == "on":
        return (
            "PostgreSQL's transaction_read_only is on "
            "(default_transaction_read_only for this role or database)"
        )
    return None


def sqlite_read_only_reason(url: str | URL) -> str | None:
    """Why the SQLite database of ``url`` refuses every write (:func:`read_only_reason`), from
    the URL as the user wrote it: ``mode=ro``, or a file this user may not write. None for a
    database that takes writes, or one that is not a SQLite file. For ``doctor``, whose own
    engine (:func:`read_engine`) opens the file ``mode=rw`` whatever the URL says."""
    target = sqlite_file(normalize_url(url))
    if target is None:
        return None
    if dict(target.options).get("mode") == "ro":
        return "WANBATCH_DATABASE_URL has mode=ro"
    if target.path.exists() and not os.access(target.path, os.W_OK):
        return f"this user may not write its file {target.path}"
    return None


def database_problem(exc: BaseException) -> str:
    """What the database (or its driver) said, on one line, for a log line: the driver's error
    type and the first line of its words (``AdminShutdown: terminating connection due to
    administrator command``, ``OperationalError: database is locked``), without SQLAlchemy's
    statement and parameters, control characters escaped (:func:`jobs.printable.one_line`: the
    words may quote a request's value); the type alone when it said nothing. The one way every
    process puts a database error in its logs (the conductor, the steps, the webhook receiver,
    the dashboard). :func:`jobs.printable.named_first_line` by its database name."""
    return named_first_line(exc)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database could not be used just now (locked, unreachable,
    restarting, a conflict), so the same work may well succeed later — as opposed to the
    database refusing what was sent (a data or integrity error: the same again fails the same
    way), which must not be reported as an outage.

    DB-API's own split: ``OperationalError`` ("errors related to the database's operation and
    not necessarily under the control of the programmer") and ``InterfaceError`` (the
    connection), or any error that invalidated the connection — but for a missing table
    (:func:`is_schema_missing`), which SQLite reports as an ``OperationalError`` too, though
    waiting never brings it back.

    Also SQLAlchemy's pool timeout (``QueuePool limit of size … reached``: not a DB-API error),
    which says every connection is taken by work the database is not finishing: a database
    that hangs, or a partition, holds them all until their TCP bounds
    (:data:`PG_TCP_USER_TIMEOUT_MS`) end them.

    And SQLite's "database disk image is malformed" (:func:`_sqlite_read_corrupt`), which a read
    the disk failed for a moment can end as.
    """
    if isinstance(exc, PoolTimeoutError):
        return True
    if is_schema_missing(exc):
        return False
    if isinstance(exc, OperationalError | InterfaceError) or _sqlite_read_corrupt(exc):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _sqlite_read_corrupt(exc: BaseException) -> bool:
    """Whether SQLite said ``database disk image is malformed`` (``SQLITE_CORRUPT``): what a
    read the disk failed for a moment can end as (an ``EIO`` injected into one ``pread`` of a
    run did), as well as a file damaged for good. Either way the environment's, never a bug of
    wanbatch's: waited out as any outage, and a file damaged for good keeps failing, the error's
    words in every line that says so."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if not isinstance(orig, sqlite3.DatabaseError):
        return False
    name = getattr(orig, "sqlite_errorname", None)  # Python 3.11+: the driver's own code's name
    return isinstance(name, str) and name.startswith("SQLITE_CORRUPT")


#: PostgreSQL's SQLSTATE ``undefined_table`` (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_PG_UNDEFINED_TABLE = "42P01"


def is_schema_missing(exc: BaseException) -> bool:
    """Whether ``exc`` says a table wanbatch uses is not in the database: the file is not a
    wanbatch database (another SQLite file put in its place), or its tables were dropped.
    SQLite's ``no such table`` (an ``OperationalError``, like an outage), PostgreSQL's
    ``undefined_table``. Not an outage: the same statement fails the same way until the
    database is replaced, so nothing should wait for it (:func:`schema_missing_error`)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(orig, sqlite3.OperationalError):
        return str(orig).startswith("no such table")
    return getattr(orig, "sqlstate", None) == _PG_UNDEFINED_TABLE


#: PostgreSQL's SQLSTATE for a column that is not there (``undefined_column``).
_PG_UNDEFINED_COLUMN = "42703"


def is_schema_mismatch(exc: BaseException) -> bool:
    """Whether ``exc`` says a table or column wanbatch uses is not in the database: PostgreSQL's
    ``undefined_table`` or ``undefined_column``, SQLite's ``no such table``, ``no such column``
    or ``has no column named``. The database's schema may then be older than this wanbatch's
    (downgraded under a running process: :func:`schema_behind` tells)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(orig, sqlite3.OperationalError):
        said = str(orig)
        return said.startswith(("no such table", "no such column")) or " has no column named " in said
    return getattr(orig, "sqlstate", None) in (_PG_UNDEFINED_TABLE, _PG_UNDEFINED_COLUMN)


def schema_behind(engine: Engine) -> str | None:
    """Why this wanbatch cannot work on the database now, when its schema is at a revision of
    this wanbatch's own older than :data:`SCHEMA_HEAD` (``alembic downgrade`` under a running
    process): its statements fail on every round, a column or table missing. Read as the
    start-up reads it (:func:`_current_schema`: two small queries); None when the schema is this
    version's, is none (no tables: :func:`schema_missing_error`'s case) or cannot be read."""
    try:
        heads, _tables = _current_schema(engine)
    except Exception:  # unreadable now: an outage, said by whatever met it
        return None
    if not heads or heads == {SCHEMA_HEAD}:
        return None
    from alembic.script import ScriptDirectory

    known = {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if heads - known:
        return newer_schema(heads)
    return (
        f"the database is at schema {', '.join(sorted(heads))}, older than this wanbatch's "
        f"{SCHEMA_HEAD} (downgraded under this process)"
    )


def revision_behind(engine: Engine) -> str | None:
    """:func:`schema_behind`, for a look taken again and again (a worker's every heartbeat, every
    ``/metrics`` scrape): one small query (the revision) while the schema is this version's, the
    full read only when it is not. None as well when the revision cannot be read (an outage:
    said by whatever meets it)."""
    try:
        with engine.connect() as conn:
            heads = {str(v) for v in conn.execute(text("SELECT version_num FROM alembic_version")).scalars()}
    except Exception:
        return None
    if not heads or heads == {SCHEMA_HEAD}:
        return None
    return schema_behind(engine)


#: What to do about a database downgraded under a running process (:func:`schema_behind`).
SCHEMA_BEHIND_FIX = (
    "stop this process (stop the newer processes before a downgrade), then start the version the "
    "schema is for, or any command of this one to upgrade it again"
)


def schema_missing_error(url: str | URL | None, missing: str) -> ConfigError:
    """The one line (exit 2) for a database without wanbatch's tables (:func:`is_schema_missing`);
    ``missing`` is what was found missing (the database's words, or the tables' names)."""
    where = f"WANBATCH_DATABASE_URL {safe_url(url)}" if url is not None else "the database"
    return ConfigError(
        f"{where} is not a wanbatch database, or its tables were dropped ({missing}): point "
        "WANBATCH_DATABASE_URL at wanbatch's database, or at a new, empty one (wanbatch creates "
        "its tables there)"
    )


#: SQLite's primary result code for a write that found no room (``SQLITE_FULL``: the disk is
#: full, or the database reached ``PRAGMA max_page_count``), and PostgreSQL's SQLSTATE
#: ``disk_full`` (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_SQLITE_FULL = 13
_PG_DISK_FULL = "53100"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the database's disk is full: a write was refused for want of space
    (SQLite's ``SQLITE_FULL``, PostgreSQL's ``disk_full``), and its transaction kept nothing.

    :func:`is_unavailable` says True for it too (it is an ``OperationalError``: the same work
    succeeds later), but unlike a restart or a dropped connection it does not pass by waiting
    a second: someone must free space. So nothing more should be claimed or sent meanwhile,
    while what only this process knows (an accepted request id) is kept until it can be
    written (:mod:`worker.steps.unrecorded`).
    """
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(orig, sqlite3.Error):
        return (getattr(orig, "sqlite_errorcode", 0) or 0) & 0xFF == _SQLITE_FULL
    return getattr(orig, "sqlstate", None) == _PG_DISK_FULL


def database_place(url: str | URL | None) -> str | None:
    """Where the database keeps its data, for a message: a SQLite file's absolute path, else
    the URL with its password masked (None without a URL)."""
    if url is None:
        return None
    try:
        target = sqlite_file(url)
    except ConfigError:
        return safe_url(url)
    return str(target.path.absolute()) if target is not None else safe_url(url)


def disk_full_error(
    url: str | URL | None, *, then: str = "run the command again; nothing was changed"
) -> DatabaseFullError:
    """The one line for a database whose disk is full (:func:`is_disk_full`): where, and what to
    do; ``then`` says what comes after freeing space (by default: the refused command again)."""
    where = database_place(url)
    on_server = ""
    with contextlib.suppress(ConfigError):
        on_server = "" if url is None or sqlite_file(url) is not None else " on the database server"
    place = f" ({where})" if where else ""
    return DatabaseFullError(
        f"the database's disk is full{place}: free space{on_server}, then {then}", where=where
    )


def failed_during_command_error(url: str | URL | None, exc: BaseException) -> ConfigError:
    """The one line for a database that failed under a command (:func:`is_unavailable`: an I/O
    error, a connection the server closed, a restart, a lock held past every wait), where it
    is, and what to do: the same command again once the database answers. Exit 2, as for a
    database that cannot be opened at all; no bug report, which could not fix it.

    A unit of work is stored whole or not at all, and which one is not always known: a commit
    whose reply was lost, or whose log could not be synced to disk (:class:`_Durability`), may
    have landed. Every command that writes is safe to run again (a manifest submitted twice adds
    no job, a cancel or a pause again changes nothing more), so the line says that, and no more.
    """
    where = database_place(url)
    place = f" ({where})" if where else ""
    then = "run the command again once the database answers"
    if _sqlite_read_corrupt(exc):  # a read the disk failed for a moment, or a file damaged for good
        then = (
            "run the command again; if it fails so again, the file is damaged: check its disk, then "
            "restore it from a backup or recover what it holds (`sqlite3 FILE .recover`)"
        )
    return ConfigError(
        f"the database failed during the command{place}: {database_problem(exc)}; what it was "
        f"writing is stored whole or not at all: {then}"
    )


def _no_room_beside(url: str | URL) -> bool:
    """Whether the folder of a SQLite database has (next to) no free space left: opening it
    then fails with "disk I/O error" (SQLite cannot create its ``-wal`` and ``-shm`` files)."""
    with contextlib.suppress(ConfigError):
        target = sqlite_file(url)
        if target is not None:
            free = free_bytes_beside(target.path)
            return free is not None and free < NO_ROOM_BYTES
    return False


def free_bytes_beside(path: Path) -> int | None:
    """The bytes this user may still write on the file system that holds ``path`` (a SQLite
    database, there or still to be created: its nearest folder that exists is asked); None when
    that cannot be told."""
    return fs.free_bytes_in(path.absolute().parent)


#: Less free space than this beside a SQLite database counts as a full disk: one that fails to
#: open, and for ``doctor`` (a write needs room for its journal, and a batch for its rows).
NO_ROOM_BYTES = 1 << 20


#: PostgreSQL's SQLSTATEs for a transaction the server ended to break a conflict, which the same
#: work run again settles: ``deadlock_detected`` and ``serialization_failure``
#: (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_CONFLICT_STATES = frozenset({"40P01", "40001"})


def is_transient_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` ended a transaction only because another one got in its way: a deadlock
    or serialization failure on PostgreSQL, SQLite's "database is locked" after its busy wait.
    Nothing of that transaction was kept; running the unit of work again is the remedy."""
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _CONFLICT_STATES:
        return True
    return isinstance(orig, sqlite3.OperationalError) and "locked" in str(orig)


# --------------------------------------------------------------------------- bounded lock waits

#: How long the transactions inside :func:`lock_waits_bounded` may wait for one lock, in seconds
#: (None outside it: as long as it takes). A context variable, not an engine's setting: one
#: process (``serve``) reads for the dashboard and writes for the webhook receiver on one engine.
_LOCK_WAIT: contextvars.ContextVar[float | None] = contextvars.ContextVar("wanbatch_lock_wait", default=None)
#: PostgreSQL's SQLSTATE ``lock_not_available``: a statement ``lock_timeout`` ended
#: (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_PG_LOCK_NOT_AVAILABLE = "55P03"
#: The longest ``lock_timeout`` PostgreSQL takes, in milliseconds (an int4 GUC).
_PG_MAX_LOCK_TIMEOUT_MS = 2_147_483_647
#: PostgreSQL's table lock modes, weakest first, and the modes each one waits for
#: (https://www.postgresql.org/docs/current/explicit-locking.html#TABLE-LOCK-COMPATIBILITY).
_LOCK_MODES = (
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
)
_LOCK_CONFLICTS: dict[str, frozenset[str]] = {
    "AccessShareLock": frozenset(_LOCK_MODES[7:]),
    "RowShareLock": frozenset(_LOCK_MODES[6:]),
    "RowExclusiveLock": frozenset(_LOCK_MODES[4:]),
    "ShareUpdateExclusiveLock": frozenset(_LOCK_MODES[3:]),
    "ShareLock": frozenset({"RowExclusiveLock", "ShareUpdateExclusiveLock", *_LOCK_MODES[5:]}),
    "ShareRowExclusiveLock": frozenset(_LOCK_MODES[2:]),
    "ExclusiveLock": frozenset(_LOCK_MODES[1:]),
    "AccessExclusiveLock": frozenset(_LOCK_MODES),
}
#: The table wanbatch only reads (a schema upgrade writes it, under a lock of its own).
_READ_ONLY_TABLE = "alembic_version"
#: Who holds (or queues for) a lock on one of wanbatch's tables (``:tables``, resolved by the
#: connection's ``search_path`` as wanbatch's own statements are) that would block what wanbatch
#: does with it, another session than this one: the lock's pid, table and mode from ``pg_locks``
#: (readable by every role), and what ``pg_stat_activity`` shows of that session (NULL where this
#: role may not see it). Blocking: ``ACCESS EXCLUSIVE`` (``LOCK TABLE``'s default, ``ALTER
#: TABLE``, ``DROP``, ``TRUNCATE``, ``VACUUM FULL``) holds back every read and write;
#: ``SHARE``, ``SHARE ROW EXCLUSIVE`` and ``EXCLUSIVE`` (``CREATE INDEX``, ``LOCK TABLE … IN
#: SHARE MODE``) every write (``run``'s, the workers', the webhook receiver's), but for
#: ``alembic_version``, which only an upgrade writes. Weaker locks (an open transaction's
#: ``ROW EXCLUSIVE``, ``VACUUM``'s ``SHARE UPDATE EXCLUSIVE``), row locks, and locks on tables
#: that are not wanbatch's (an ETL tool's ``CREATE TABLE``) hold back nothing wanbatch does.
#:
#: The sessions that hold back another one right now (``pg_blocking_pids`` of every session
#: waiting for a lock: a worker, ``run``, another command queued behind it) come first, then the
#: granted, the strongest and the longest held. Which session a bounded command itself waited for
#: is read while it waits (:class:`_LockWatcher`), not from this list.
_LOCK_HOLDERS = text(
    """
    WITH blocking AS (
        SELECT DISTINCT unnest(pg_blocking_pids(w.pid)) AS pid
        FROM pg_stat_activity w
        WHERE w.wait_event_type = 'Lock' AND w.pid <> pg_backend_pid()
    ), wanbatch AS (
        SELECT to_regclass(quote_ident(t.name))::oid AS oid, t.name = :read_only AS read_only
        FROM unnest(CAST(:tables AS text[])) AS t(name)
    )
    SELECT l.pid, c.relname, l.mode, l.granted, a.state, a.application_name,
           extract(epoch FROM statement_timestamp() - coalesce(a.xact_start, a.query_start))::float8
    FROM pg_locks l
    JOIN wanbatch t ON t.oid = l.relation
    JOIN pg_class c ON c.oid = l.relation
    LEFT JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'relation'
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.pid <> pg_backend_pid()
      AND (l.mode = 'AccessExclusiveLock'
           OR (NOT t.read_only AND l.mode IN ('ExclusiveLock', 'ShareRowExclusiveLock', 'ShareLock')))
    ORDER BY l.pid IN (SELECT pid FROM blocking) DESC, l.granted DESC, array_position(
        ARRAY['AccessExclusiveLock', 'ExclusiveLock', 'ShareRowExclusiveLock', 'ShareLock'], l.mode::text
    ), 7 DESC NULLS LAST
    LIMIT 5
    """
)
#: The sessions holding back each of the given backends (``:pids``) that waits for a lock right
#: now (``pg_blocking_pids``: those holding a lock it waits for, and those queued ahead of it for
#: one that would), each with its lock on the relation waited for (several rows: the caller picks)
#: and what ``pg_stat_activity`` shows of it. One row per waiter, blocker and lock.
_LOCK_BLOCKERS = text(
    """
    WITH waiting AS (
        SELECT w.pid AS waiter, w.locktype, w.mode AS wanted, w.relation, w.database,
               unnest(pg_blocking_pids(w.pid)) AS pid
        FROM pg_locks w
        WHERE w.pid = ANY(CAST(:pids AS integer[])) AND NOT w.granted
    )
    SELECT w.waiter, w.pid, w.locktype, w.wanted, c.relname, l.mode, l.granted, a.state,
           a.application_name,
           extract(epoch FROM statement_timestamp() - coalesce(a.xact_start, a.query_start))::float8
    FROM waiting w
    LEFT JOIN pg_class c ON c.oid = w.relation
    LEFT JOIN pg_locks l
           ON l.pid = w.pid AND w.locktype = 'relation' AND l.locktype = 'relation'
          AND l.relation = w.relation AND l.database = w.database
    LEFT JOIN pg_stat_activity a ON a.pid = w.pid
    """
)
#: How long :func:`lock_holders`' and the watcher's own reads may take or wait, in milliseconds:
#: they only explain a failure, and must not become a second wait.
_LOCK_LOOKUP_MS = 2000
#: How often the watcher looks at a bounded transaction's backend (:class:`_LockWatch`): a
#: quarter of its bound, so that a wait that lasts the bound is seen at least three times, but
#: within these limits, in seconds. A transaction shorter than that is never looked at.
_WATCH_EVERY_MIN = 0.02
_WATCH_EVERY_MAX = 2.0
#: How long the watcher keeps its thread and connections with nothing to watch, in seconds.
_WATCHER_IDLE_SECONDS = 5.0


def _bound_lock_waits(engine: Engine) -> None:
    """Give every transaction ``engine`` begins inside :func:`lock_waits_bounded` PostgreSQL's
    ``lock_timeout`` (``SET LOCAL``: that transaction only, so a pooled connection, and a
    transaction-pooling PgBouncer's server connection, keeps none of it; never libpq's startup
    ``options``, which poolers refuse), and have its backend watched while it runs
    (:class:`_LockWatcher`: its server pid, ``pg_backend_pid()``, asked in the same round trip),
    so that a wait that ends in ``lock_timeout`` names the session it waited for. Outside it
    nothing is sent: ``run``, the workers and the webhook receiver wait for a lock as long as it
    takes, as before — until the process is stopping (:func:`stop_waiting_for_lock`): from then
    on every transaction it begins, on any thread, waits at most :data:`STOP_LOCK_WAIT_SECONDS`
    (a transaction already waiting keeps its wait: the stop does not wait for it,
    :mod:`worker.running`)."""

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        seconds = _LOCK_WAIT.get()
        if _STOPPING.is_set():
            seconds = STOP_LOCK_WAIT_SECONDS if seconds is None else min(seconds, STOP_LOCK_WAIT_SECONDS)
        if seconds is None:
            return
        dbapi = connection.connection.dbapi_connection
        if dbapi is None or getattr(dbapi, "autocommit", False):  # no transaction to set it for
            return
        # Within PostgreSQL's range whatever the settings let through (they refuse more, by name:
        # jobs.settings.MAX_LOCK_WAIT_SECONDS): a refused SET would fail every bounded command.
        milliseconds = min(_PG_MAX_LOCK_TIMEOUT_MS, max(1, math.ceil(seconds * 1000)))
        sql = f"SET LOCAL lock_timeout = {milliseconds}"
        watch = _WATCH.get()
        if watch is not None:  # the server's pid (a pooler's libpq reports its own), same round trip
            sql += "; SELECT pg_backend_pid()"
        pid: int | None = None
        try:
            with dbapi.cursor() as cursor:
                cursor.execute(sql)
                if watch is not None:
                    if cursor.description is None:  # psycopg 3: the SET's result comes first
                        cursor.nextset()
                    row = cursor.fetchone()
                    pid = int(row[0]) if row else None
        except engine.dialect.loaded_dbapi.Error as exc:  # as if SQLAlchemy had sent it
            raise DBAPIError.instance(sql, (), exc, engine.dialect.loaded_dbapi.Error) from exc
        if watch is not None and pid is not None:
            connection.info[_WATCHED] = (watch, pid)
            watch.began(pid, engine.url)

    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def _on_end(connection: Any) -> None:
        if not connection.invalidated:  # else its info raises; the block's end forgets the pid
            _unwatch(connection.info)

    @event.listens_for(engine.pool, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        _unwatch(record.info)  # whatever ended its transaction


def _unwatch(info: dict[str, Any]) -> None:
    """The bounded transaction of the connection whose ``info`` this is has ended."""
    watched = info.pop(_WATCHED, None)
    if watched is not None:
        watched[0].ended(watched[1])


#: Where a connection keeps the watch of the bounded transaction it runs, and its server pid.
_WATCHED = "wanbatch_lock_watch"


def is_lock_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a PostgreSQL statement that gave up waiting for a lock (``lock_timeout``,
    set by :func:`lock_waits_bounded`): its transaction was rolled back, nothing of it kept."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    return getattr(orig, "sqlstate", None) == _PG_LOCK_NOT_AVAILABLE


@contextlib.contextmanager
def lock_waits_bounded(settings: DatabaseSettings) -> Iterator[None]:
    """Inside the block, a PostgreSQL transaction waits at most ``settings.database_lock_wait``
    seconds for a lock (``lock_timeout``); one that waited that long raises
    :class:`~jobs.errors.DatabaseLockedError` with one line naming the session it waited for
    (when the server says: read while it waited, :class:`_LockWatcher`). For the commands an
    operator runs to look (``status``, ``export``, the dashboard's pages): another session's
    ``LOCK TABLE jobs`` left open in ``psql``, or a migration's ``ALTER TABLE`` queued behind a
    long transaction, held them without a word, for ever. Not ``statement_timeout``: an export
    of a large batch rightly reads for a long time. Nothing changes on SQLite, whose busy wait
    (:data:`SQLITE_BUSY_TIMEOUT_MS`) bounds it.

    The bound follows the context (:mod:`contextvars`): threads the block starts itself do not
    inherit it (a pool's threads must enter it themselves)."""
    watch = _LockWatch(settings.database_lock_wait)
    token = _LOCK_WAIT.set(settings.database_lock_wait)
    watching = _WATCH.set(watch)
    try:
        yield
    except DBAPIError as exc:
        if not is_lock_timeout(exc):
            raise
        raise database_locked_error(settings.database_url, statement=exc.statement) from None
    finally:
        _WATCH.reset(watching)
        _LOCK_WAIT.reset(token)
        _WATCHER.forget(watch)


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Another session's lock that holds back, or would hold back, wanbatch (:func:`lock_holders`,
    :class:`_LockWatcher`); what the server would not show this role is None."""

    pid: int
    #: The table locked (None: a lock on no table, such as a transaction's own).
    table: str | None
    #: ``pg_locks``' mode (``AccessExclusiveLock``), or what the lock is in words (``row-level``)
    #: when it is not a table's.
    mode: str
    #: False: the session is queued for the lock, and every later request for the table behind it.
    granted: bool
    #: ``pg_stat_activity.state`` (``idle in transaction``, ``active``).
    state: str | None
    application: str | None
    #: How long its transaction has been open (or its statement running), in seconds.
    held_for: float | None

    @property
    def blocks_reads(self) -> bool:
        """Whether every read of its table waits for this lock (``ACCESS EXCLUSIVE``), not only
        the writes."""
        return self.mode == "AccessExclusiveLock"

    def said(self) -> str:
        """``pid 4242 holds an ACCESS EXCLUSIVE lock on table jobs (its transaction open for 3m,
        idle in transaction, application 'psql')``."""
        from jobs.schedule import format_age

        mode = self.mode
        if mode in _LOCK_CONFLICTS:
            mode = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", mode.removesuffix("Lock")).upper()
        verb = "holds" if self.granted else "is queued for"
        about = []
        if self.held_for is not None:
            about.append(f"its transaction open for {format_age(self.held_for)}")
        if self.state:
            about.append(self.state)
        if self.application:
            about.append(f"application {self.application!r}")
        more = f" ({', '.join(about)})" if about else ""
        article = "an" if mode[:1].upper() in "AEIOU" else "a"  # an ACCESS EXCLUSIVE, a SHARE
        on = f" on table {self.table}" if self.table else ""
        return one_line(f"pid {self.pid} {verb} {article} {mode} lock{on}{more}")


def lock_holders(engine: Engine) -> list[LockHolder]:
    """The other sessions holding, or queued for, a lock on one of wanbatch's tables that holds
    back what wanbatch does with it (:data:`_LOCK_HOLDERS`) in ``engine``'s PostgreSQL database:
    those that hold back a waiting session first, then the granted and strongest, then the
    longest held; none on SQLite, and none when they cannot be read (a role without the right, a
    server that does not answer in :data:`_LOCK_LOOKUP_MS`): this explains a wait, it never
    fails one."""
    if engine.dialect.name != "postgresql":
        return []
    from jobs.models import Base

    tables = sorted({*Base.metadata.tables, _READ_ONLY_TABLE})
    try:
        with engine.connect() as conn:
            conn.execute(text(f"SET LOCAL statement_timeout = {_LOCK_LOOKUP_MS}"))
            conn.execute(text(f"SET LOCAL lock_timeout = {_LOCK_LOOKUP_MS}"))
            rows = conn.execute(_LOCK_HOLDERS, {"tables": tables, "read_only": _READ_ONLY_TABLE}).all()
            conn.rollback()
    except Exception:  # a lookup that fails explains nothing, and is no new error
        log.debug("reading the database's lock holders failed", exc_info=True)
        return []
    return [
        LockHolder(
            pid=int(row[0]),
            table=str(row[1]),
            mode=str(row[2]),
            granted=bool(row[3]),
            state=row[4],
            application=row[5] or None,
            held_for=float(row[6]) if row[6] is not None else None,
        )
        for row in rows
    ]


def _blockers_by_waiter(rows: Iterable[Any]) -> dict[int, list[LockHolder]]:
    """:data:`_LOCK_BLOCKERS`' rows as each waiting backend's blockers: for each, the lock that
    holds the waiter back (one that conflicts with the mode it waits for, a granted one before
    one queued for, the strongest), those holding it before those queued ahead, the longest held
    first."""
    best: dict[tuple[int, int], tuple[tuple[bool, bool, int], LockHolder]] = {}
    for waiter, pid, locktype, wanted, relname, mode, granted, state, application, held_for in rows:
        if locktype == "relation" and mode is not None:
            rank = (
                mode in _LOCK_CONFLICTS.get(str(wanted), frozenset()),
                bool(granted),
                _strength(str(mode)),  # a mode no table lock has (SIReadLock): the weakest
            )
            said_mode, said_granted = str(mode), bool(granted)
        else:  # a row (a tuple, a transaction) or an object: what it is, held
            rank = (False, True, -1)
            said_mode = "row-level" if locktype in ("tuple", "transactionid") else str(locktype)
            said_granted = True
        holder = LockHolder(
            pid=int(pid),
            table=str(relname) if relname is not None else None,
            mode=said_mode,
            granted=said_granted,
            state=state,
            application=application or None,
            held_for=float(held_for) if held_for is not None else None,
        )
        key = (int(waiter), int(pid))
        if key not in best or rank > best[key][0]:
            best[key] = (rank, holder)
    found: dict[int, list[LockHolder]] = {}
    for (waiter, _pid), (_rank, holder) in best.items():
        found.setdefault(waiter, []).append(holder)
    for holders in found.values():
        holders.sort(key=lambda h: (not h.granted, -_strength(h.mode), -(h.held_for or 0.0)))
    return found


def _strength(mode: str) -> int:
    """How strong a table lock mode is (:data:`_LOCK_MODES`' order; -1: no table's)."""
    return _LOCK_MODES.index(mode) if mode in _LOCK_CONFLICTS else -1


class _LockWatch:
    """One :func:`lock_waits_bounded` block: the server pids of the transactions it began, and who
    held each back when the watcher (:class:`_LockWatcher`) last saw it wait for a lock.

    A ``lock_timeout`` ends the wait it bounds, so who held it back cannot be asked afterwards:
    asked then, the server could only list every strong lock there is, and an innocent session's
    (a ``LOCK TABLE`` on a table the command never read) was named instead. Asked while the
    command's own backend waits (``pg_blocking_pids`` of its pid), it names exactly the sessions
    it waited for."""

    def __init__(self, seconds: float) -> None:
        self.every = min(_WATCH_EVERY_MAX, max(_WATCH_EVERY_MIN, seconds / 4))
        self._guard = threading.Lock()
        #: Each open transaction's server pid → (its engine's URL, its generation, when to look next).
        self._open: dict[int, tuple[URL, int, float]] = {}
        #: Each pid's blockers at the last look (empty: it was not waiting then).
        self._seen: dict[int, list[LockHolder]] = {}
        self._generation = 0
        #: Each pid's latest transaction's generation (a look at an older one is ignored).
        self._latest: dict[int, int] = {}
        #: The pid last seen waiting (None: none, or it was not waiting when looked at again).
        self._waiting: int | None = None

    def began(self, pid: int, url: URL) -> None:
        """A transaction began on the backend ``pid``: look at it from :attr:`every` from now."""
        with self._guard:
            self._generation += 1
            self._latest[pid] = self._generation
            self._open[pid] = (url, self._generation, time.monotonic() + self.every)
            self._seen.pop(pid, None)
            if self._waiting == pid:
                self._waiting = None
        _WATCHER.watch(self)

    def ended(self, pid: int) -> None:
        """The transaction on ``pid`` ended (what was seen of it is kept: its error comes after)."""
        with self._guard:
            self._open.pop(pid, None)

    def due(self, now: float) -> tuple[list[tuple[int, int, URL]], float | None]:
        """The transactions to look at now (pid, generation, URL; each then next in
        :attr:`every`), and when the next one is due (None: nothing open)."""
        looks: list[tuple[int, int, URL]] = []
        soonest: float | None = None
        with self._guard:
            for pid, (url, generation, at) in list(self._open.items()):
                if at <= now:
                    looks.append((pid, generation, url))
                    at = now + self.every
                    self._open[pid] = (url, generation, at)
                soonest = at if soonest is None else min(soonest, at)
        return looks, soonest

    def saw(self, pid: int, generation: int, blockers: list[LockHolder]) -> None:
        """A look at ``pid`` (its transaction of ``generation``) found these blockers."""
        with self._guard:
            if self._latest.get(pid) != generation:
                return  # a transaction begun since on that backend: the look was the older one's
            self._seen[pid] = blockers
            if blockers:
                self._waiting = pid
            elif self._waiting == pid:
                self._waiting = None

    def blockers(self) -> list[LockHolder]:
        """Who held back the transaction last seen waiting (empty: none seen waiting)."""
        with self._guard:
            return list(self._seen.get(self._waiting, [])) if self._waiting is not None else []


class _LockWatcher:
    """The thread that looks at the backends of the bounded transactions (:class:`_LockWatch`)
    while they run, every :attr:`_LockWatch.every`, from connections of its own (one per
    database, pooled while it runs): one query for all of a database's due backends, reading
    who holds each back if it waits for a lock (:data:`_LOCK_BLOCKERS`). Started when a bounded
    transaction begins, ended once nothing was open for :data:`_WATCHER_IDLE_SECONDS`. A look
    that fails (the server refuses a connection) changes nothing: the command's line then names
    the session from :func:`lock_holders`, as before; so does one whose rows cannot be read
    (any error: said at debug level). The thread never ends on an error: should one escape a
    round all the same, it is said, and the next bounded transaction starts another."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: set[_LockWatch] = set()
        self._running = False

    def watch(self, watch: _LockWatch) -> None:
        with self._cond:
            self._watches.add(watch)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="wanbatch-lock-watch", daemon=True).start()
            self._cond.notify()

    def forget(self, watch: _LockWatch) -> None:
        with self._cond:
            self._watches.discard(watch)

    def _run(self) -> None:
        engines: dict[str, Engine] = {}
        idle_since: float | None = None
        ended = False  # ended idle (``_running`` reset then, under the lock)
        try:
            while True:
                with self._cond:
                    now = time.monotonic()
                    looks: dict[str, tuple[URL, list[tuple[_LockWatch, int, int]]]] = {}
                    soonest: float | None = None
                    for watch in self._watches:
                        due, at = watch.due(now)
                        for pid, generation, url in due:
                            key = url.render_as_string(hide_password=False)
                            looks.setdefault(key, (url, []))[1].append((watch, pid, generation))
                        if at is not None:
                            soonest = at if soonest is None else min(soonest, at)
                    if not looks:
                        if soonest is None:
                            idle_since = now if idle_since is None else idle_since
                            if now - idle_since >= _WATCHER_IDLE_SECONDS:
                                self._running = False
                                ended = True
                                return
                            soonest = idle_since + _WATCHER_IDLE_SECONDS
                        else:
                            idle_since = None
                        self._cond.wait(max(0.0, soonest - now))
                        continue
                    idle_since = None
                for key, (url, entries) in looks.items():
                    found = self._look(engines, key, url, sorted({pid for _w, pid, _g in entries}))
                    if found is None:
                        continue
                    for watch, pid, generation in entries:
                        watch.saw(pid, generation, found.get(pid, []))
        except Exception:  # never a traceback on stderr from a thread that only explains
            log.debug("the lock watcher stopped on an error", exc_info=True)
        finally:
            if not ended:
                with self._cond:
                    self._running = False
            for engine in engines.values():
                with contextlib.suppress(Exception):
                    engine.dispose()

    @staticmethod
    def _look(
        engines: dict[str, Engine], key: str, url: URL, pids: list[int]
    ) -> dict[int, list[LockHolder]] | None:
        """Who holds back each of ``pids`` that waits for a lock now; None: it could not be read."""
        try:
            engine = engines.get(key)
            if engine is None:
                engine = engines[key] = make_engine(url, pool_size=1, max_overflow=0)
            with engine.connect() as conn:
                conn.execute(text(f"SET LOCAL statement_timeout = {_LOCK_LOOKUP_MS}"))
                rows = conn.execute(_LOCK_BLOCKERS, {"pids": pids}).all()
                conn.rollback()
            return _blockers_by_waiter(rows)
        except Exception:  # a look that fails explains nothing, and is no new error
            log.debug("watching a bounded transaction's lock wait failed", exc_info=True)
            return None


#: The block of :func:`lock_waits_bounded` this context is in (None: none).
_WATCH: contextvars.ContextVar[_LockWatch | None] = contextvars.ContextVar(
    "wanbatch_lock_watch", default=None
)
_WATCHER = _LockWatcher()


def database_locked_error(
    url: str | URL, engine: Engine | None = None, statement: str | None = None
) -> DatabaseLockedError:
    """The one line for a statement that gave up waiting for a lock another session holds
    (:func:`is_lock_timeout`): who held it back (inside :func:`lock_waits_bounded`, the sessions
    its backend was seen waiting for, :class:`_LockWatch`; else, or when it was never seen
    waiting, :func:`lock_holders`, asked on ``engine``, else on a connection of its own to
    ``url``, narrowed to the tables ``statement`` names: :func:`_on_tables_of`), how long it
    waited, and what to do."""
    from sqlalchemy.pool import NullPool

    from jobs.schedule import format_age

    watch = _WATCH.get()
    holders = watch.blockers() if watch is not None else []
    if not holders and engine is not None:
        holders = lock_holders(engine)
    elif not holders:
        with contextlib.suppress(Exception):  # nothing to ask with: the line says less, no more
            asking = make_engine(url, poolclass=NullPool)
            try:
                holders = lock_holders(asking)
            finally:
                asking.dispose()
    if statement is not None and watch is not None and not watch.blockers():
        holders = _on_tables_of(statement, holders)
    if holders:
        who = holders[0].said()
        if len(holders) > 1:
            who += f", and {len(holders) - 1} more such lock(s)"
    else:
        who = "who holds the lock could not be read"
    seconds = _LOCK_WAIT.get()
    waited = (
        f"waiting {format_age(seconds)} (WANBATCH_DATABASE_LOCK_WAIT)"
        if seconds is not None
        else "waiting as long as the server's lock_timeout allows"
    )
    return DatabaseLockedError(
        f"the database is locked by another session: {who}; gave up after {waited}, nothing was "
        "changed: try again once that session has committed or rolled back",
        pid=holders[0].pid if holders else None,
    )


def _on_tables_of(statement: str, holders: list[LockHolder]) -> list[LockHolder]:
    """Of ``holders`` (every strong lock on a wanbatch table, :func:`lock_holders`), those on a
    table the statement that gave up names, when any is: the watcher (:class:`_LockWatcher`)
    did not see the wait (on a loaded machine its thread and connection can take longer to start
    than the wait lasts), and an innocent session's older lock on a table the statement never
    read was named first, with "and 1 more" after it. A lock on another table can still hold a
    statement back (a foreign key's check), so with none on its own tables all are kept."""
    named = [
        holder
        for holder in holders
        if holder.table is not None and re.search(rf'(?<!\w)"?{re.escape(holder.table)}"?(?!\w)', statement)
    ]
    return named or holders


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (the CLI prints them afterwards).

    One factory per engine, kept: a new ``sessionmaker`` is a new Session subclass, and
    SQLAlchemy's event system set every new class up again — a third of the CPU of a small
    transaction when each unit of work made its own.
    """
    factory = _FACTORIES.get(engine)
    if factory is None:
        factory = _FACTORIES[engine] = sessionmaker(bind=writer_engine(engine), expire_on_commit=False)
    return factory


def writer_engine(engine: Engine) -> Engine:
    """The engine the units of work of ``engine`` (:func:`session_scope`) write on: ``engine``
    itself, but for a SQLite file its one writer connection's (:func:`_add_writer`)."""
    return _WRITER_ENGINES.get(engine, engine)


_FACTORIES: weakref.WeakKeyDictionary[Engine, sessionmaker[Session]] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One unit of work: commit if the block succeeds, roll back if it raises.

    On a SQLite file, on this process's long-lived writer connection (:class:`_Writer`)."""
    writer = _WRITERS.get(engine)
    if writer is not None:
        with writer.unit() as scoped:
            yield scoped
        return
    with _unit_of_work(session_factory(engine)()) as session:
        yield session


@contextlib.contextmanager
def _unit_of_work(session: Session) -> Iterator[Session]:
    """``session`` as one unit of work: committed if the block succeeds, rolled back if it
    raises, closed either way."""
    session.info[_AFTER_COMMIT] = []
    try:
        yield session
        began = session.in_transaction()  # a block that sent nothing heard nothing
        session.commit()
        if began:
            _heard()
    except BaseException:
        session.rollback()
        raise
    finally:
        done = session.info.pop(_AFTER_COMMIT, [])
        session.close()
    for callback in done:  # reached only once the commit succeeded
        callback()


#: ``Session.info`` key of what :func:`after_commit` runs once the unit of work committed.
_AFTER_COMMIT = "wanbatch_after_commit"


def after_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run ``callback`` once ``session``'s unit of work (:func:`session_scope`) has committed;
    never if it rolls back. For what a step says it did ("recorded", "kept"): said before the
    commit, a commit the database then refuses (its disk is full) made the line false. A
    session that is no unit of work runs it at once, as before."""
    waiting = session.info.get(_AFTER_COMMIT)
    if waiting is None:
        callback()
    else:
        waiting.append(callback)


#: What :func:`probe` asks.
_PROBE = text("SELECT 1")


def probe(engine: Engine) -> None:
    """Ask the database something trivial (``SELECT 1`` in a :func:`read_scope`: no write lock
    on SQLite), to tell that it answers now; raises what asking raised. Bounded by the
    connection's own bounds only (:data:`PG_TCP_USER_TIMEOUT_MS`): a caller that must not wait
    that long waits for it on a thread of its own (``/healthz``)."""
    with read_scope(engine) as session:
        session.execute(_PROBE)


@contextlib.contextmanager
def read_scope(engine: Engine, *, snapshot: bool = False) -> Iterator[Session]:
    """A unit of work that only reads: never commits, and on SQLite never takes the write lock.

    :func:`session_scope` opens every SQLite transaction with ``BEGIN IMMEDIATE`` (see the module
    docstring), so even a lookup queues behind every writer of every process. A read needs none
    of that: here the transaction starts with a plain deferred ``BEGIN``, and in WAL mode it
    reads a snapshot while a writer holds the lock. On PostgreSQL this is an ordinary
    transaction. Objects read stay usable after the block (their loaded attributes are kept).

    ``snapshot``: every statement of the block reads the same snapshot of the database, so
    that what several statements read adds up (an export's rows, and the counts and money its
    dataset card states, of a batch that is still running). SQLite's deferred read transaction
    is one already (WAL: the snapshot of its first read, until it ends); on PostgreSQL an
    ordinary transaction is READ COMMITTED, each statement seeing what had committed when it
    started, so the block runs as one ``REPEATABLE READ`` read-only transaction instead.

    Nothing is written: autoflush is off and the transaction is rolled back, and changes left
    on the session's objects raise :class:`RuntimeError` (a bug: write in a session_scope).
    """
    session = Session(bind=engine, autoflush=False, expire_on_commit=False)
    try:
        # Marks this session's connection before its transaction begins (see _on_begin).
        options: dict[str, Any] = {_READ_ONLY_OPTION: True}
        if snapshot and engine.dialect.name == "postgresql":
            options.update(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        session.connection(execution_options=options)
        yield session
        if session.new or session.dirty or session.deleted:
            raise RuntimeError("read_scope is for reads only: changes were made and are discarded")
    finally:
        session.close()  # rolls the (read-only) transaction back without expiring what was read


def _migrations_dir() -> Path:
    # Not importlib.resources: an editable install may expose the package as a namespace,
    # whose __path__ also lists a path-hook entry that is not a folder.
    import migrations

    for entry in migrations.__path__:
        if (Path(entry) / "env.py").is_file():
            return Path(entry)
    raise RuntimeError(f"migrations package has no env.py in {list(migrations.__path__)}")


#: The newest migration (``migrations/versions``). A database already there is used without
#: loading Alembic and every migration script, a third of a second of each command's start;
#: ``tests/integration/test_migrations.py`` keeps this equal to Alembic's own head.
SCHEMA_HEAD = "0052"


def alembic_config() -> Config:
    """Alembic's configuration for the migrations shipped inside the installed package."""
    from alembic.config import Config

    location = _migrations_dir()
    cfg = Config(str(location / "alembic.ini"))
    cfg.set_main_option("script_location", str(location))
    return cfg


#: PostgreSQL: the tables on the search path — where the inspector looks, ``get_table_names()``
#: with no schema: every schema of ``search_path`` but ``pg_catalog`` — that are members of an
#: installed extension (PostGIS's ``spatial_ref_sys``, pg_partman's configuration tables): its
#: ``CREATE EXTENSION`` made them, not another application, and ``DROP EXTENSION`` takes them away
#: (https://www.postgresql.org/docs/current/catalog-pg-depend.html, ``deptype`` ``e``).
_EXTENSION_TABLES = text(
    "SELECT c.relname FROM pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass"
    " AND d.objid = c.oid AND d.objsubid = 0"
    " AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass AND d.deptype = 'e'"
    " WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'"
    " AND pg_catalog.pg_table_is_visible(c.oid) AND n.nspname <> 'pg_catalog'"
)


def _extension_tables(conn: Connection) -> set[str]:
    """The tables among the inspector's (:data:`_EXTENSION_TABLES`) that belong to a PostgreSQL
    extension; none on SQLite, which has no extensions of that kind."""
    if conn.dialect.name != "postgresql":
        return set()
    return {str(name) for name in conn.execute(_EXTENSION_TABLES).scalars()}


def _current_schema(engine: Engine) -> tuple[set[str], set[str]]:
    """The revisions the database is at (none for a new database) and its tables, read without
    Alembic.

    Without a revision, an extension's tables (:func:`_extension_tables`) are left out: a new
    database with PostGIS installed is still empty to wanbatch (:func:`foreign_tables`). At a
    revision they do not matter (only wanbatch's own are looked for), so the read of a current
    database stays two small queries."""
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        heads: set[str] = set()
        if "alembic_version" in tables:
            heads = {str(v) for v in conn.execute(text("SELECT version_num FROM alembic_version")).scalars()}
        if not heads and tables:
            tables -= _extension_tables(conn)
        return heads, tables


def _missing_tables(tables: set[str]) -> list[str]:
    """The models' tables that are not among ``tables`` (a database's), sorted."""
    from jobs.models import Base

    return sorted(set(Base.metadata.tables) - tables)


#: Tables a foreign database's refusal names (:func:`foreign_tables`); more are counted.
_FOREIGN_NAMED = 5


def foreign_tables(heads: set[str], tables: set[str]) -> list[str]:
    """The tables of a database that is no wanbatch database — no schema revision recorded, yet
    tables other than Alembic's empty version table — sorted; empty for wanbatch's and for a new,
    empty database (or one every migration was taken down from: ``downgrade base``). ``tables``
    are :func:`_current_schema`'s: a PostgreSQL extension's tables are not among them, so a
    database with only those (PostGIS's ``spatial_ref_sys``) is a new one.

    wanbatch has always recorded its revision in the transaction that created its tables (the
    migrations, then :func:`_create_from_models`), so every database it made has one: tables
    without it are someone else's, which the upgrade from nothing used to take over silently,
    adding wanbatch's tables beside them (or failed on a table of the same name, an internal
    error)."""
    return [] if heads else sorted(tables - {"alembic_version"})


def foreign_database(foreign: list[str]) -> str:
    """Why a database holding ``foreign`` tables (:func:`foreign_tables`) is not used (``doctor``'s
    words too)."""
    named = ", ".join(one_line(name) for name in foreign[:_FOREIGN_NAMED])
    more = f" and {len(foreign) - _FOREIGN_NAMED:,} more" if len(foreign) > _FOREIGN_NAMED else ""
    return (
        f"not a wanbatch database: it holds tables of its own ({named}{more}) and no wanbatch "
        "schema (wanbatch creates its tables only in a new, empty database)"
    )


#: What to do about a database that is not wanbatch's (``doctor`` says it too).
FOREIGN_DATABASE_FIX = "point WANBATCH_DATABASE_URL at wanbatch's database, or at a new, empty one"


def _require_own(engine: Engine, heads: set[str], tables: set[str]) -> None:
    """Raise :class:`ConfigError` (one line, exit 2) for a database with tables of its own and no
    wanbatch schema (:func:`foreign_tables`), before anything is created in it."""
    if foreign := foreign_tables(heads, tables):
        url = engine.url.set(drivername=engine.url.get_backend_name())  # as it was set: no driver
        why = foreign_database(foreign)
        raise ConfigError(f"WANBATCH_DATABASE_URL {safe_url(url)} is {why}: {FOREIGN_DATABASE_FIX}")


#: What to do about a database a newer wanbatch migrated (``doctor`` says it too).
NEWER_SCHEMA_FIX = "upgrade wanbatch on this host to the version that migrated the database"


def newer_schema(heads: Iterable[str]) -> str:
    """Why a database at revisions this wanbatch does not know cannot be used (``doctor``'s
    words too)."""
    return (
        f"schema {', '.join(sorted(heads))} is not one this wanbatch knows (it expects "
        f"{SCHEMA_HEAD}): a newer wanbatch migrated it"
    )


def _require_known(engine: Engine, cfg: Config, heads: set[str]) -> None:
    """Raise :class:`ConfigError` (one line, exit 2) when the database is at a revision none of
    this wanbatch's migrations is: a newer wanbatch migrated it. Alembic would fail with "Can't
    locate revision", an internal error of every command."""
    from alembic.script import ScriptDirectory

    known = {script.revision for script in ScriptDirectory.from_config(cfg).walk_revisions()}
    if heads - known:
        url = engine.url.set(drivername=engine.url.get_backend_name())  # as it was set: no driver
        raise ConfigError(f"WANBATCH_DATABASE_URL {safe_url(url)}: {newer_schema(heads)}; {NEWER_SCHEMA_FIX}")


def _require_tables(engine: Engine, tables: set[str]) -> None:
    """Raise :func:`schema_missing_error` unless ``tables`` has every table of the models: a
    database stamped at the head whose tables were dropped would otherwise fail at its first
    query, as an internal error (or, mid-run, as an outage waited out)."""
    if missing := _missing_tables(tables):
        url = engine.url.set(drivername=engine.url.get_backend_name())  # as it was set: no driver
        raise schema_missing_error(url, f"no table {', '.join(missing)}")


#: A process that works on batches beats every 10 s (``worker.conductor.HEARTBEAT_SECONDS``); one
#: silent this long has stopped (``status`` says so: :data:`jobs.listing.PROCESSING_STALE_SECONDS`,
#: which is this), and no longer keeps an upgrade of the schema waiting (:func:`live_processes`).
HEARTBEAT_STALE_SECONDS = 60.0

#: Processes a refused upgrade names (:func:`_require_unused`); more are counted.
_LIVE_NAMED = 5


@dataclass(frozen=True, slots=True)
class LiveProcess:
    """A wanbatch process that, as the database tells, works on it now (:func:`live_processes`)."""

    #: ``host:pid``.
    name: str
    #: Its last heartbeat, if it beat within :data:`HEARTBEAT_STALE_SECONDS`.
    seen_at: datetime | None
    #: Until when it holds jobs, if it holds any.
    lease_until: datetime | None


def live_processes(conn: Connection, tables: Iterable[str], *, now: datetime) -> list[LiveProcess]:
    """The wanbatch processes working on this database now, as far as the tables it has at its
    schema, whichever that is, can tell: a heartbeat (``conductor_heartbeats``, schema 0010 on)
    within :data:`HEARTBEAT_STALE_SECONDS`, or a job lease (``lease_owner``, every schema) not yet
    expired. Read with the columns every schema has, never with the models (an older schema
    lacks some of theirs).

    A process of this host that has ended (:func:`jobs.processes.owner_ended`) and this process
    itself are left out; one of another host counts while its rows say it lives (nothing here
    can ask that host). An owner that names no process (``download-queue``: a download handed to
    whichever worker takes it) is not one. Empty when nothing tells: a schema without heartbeats
    whose processes hold no lease at that moment (a run waiting on fal holds none)."""
    from jobs.models import UTCDateTime
    from jobs.processes import owner_ended, process_prefix

    names = set(tables)
    when = UTCDateTime()
    found: dict[str, tuple[datetime | None, datetime | None]] = {}
    mine = process_prefix()

    def note(owner: str, seen: datetime | None, until: datetime | None) -> None:
        host, _, rest = owner.partition(":")
        pid, sep, _ = rest.partition(":")
        if not host or not sep or not pid.isdigit() or owner.startswith(mine) or owner_ended(owner):
            return
        name = f"{host}:{pid}"
        was_seen, was_until = found.get(name, (None, None))
        found[name] = (_latest(was_seen, seen), _latest(was_until, until))

    if "conductor_heartbeats" in names:
        beats = table("conductor_heartbeats", column("owner", String()), column("seen_at", when))
        since = now - timedelta(seconds=HEARTBEAT_STALE_SECONDS)
        for owner, seen in conn.execute(
            select(beats.c.owner, func.max(beats.c.seen_at))
            .where(beats.c.seen_at >= since)
            .group_by(beats.c.owner)
        ):
            note(str(owner), seen, None)
    if "jobs" in names:
        jobs = table("jobs", column("lease_owner", String()), column("lease_expires_at", when))
        for owner, until in conn.execute(
            select(jobs.c.lease_owner, func.max(jobs.c.lease_expires_at))
            .where(jobs.c.lease_owner.isnot(None), jobs.c.lease_expires_at > now)
            .group_by(jobs.c.lease_owner)
        ):
            note(str(owner), None, until)
    return [LiveProcess(name, *found[name]) for name in sorted(found)]


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


def live_processes_said(live: list[LiveProcess], *, now: datetime) -> str:
    """``live`` in a few words: "2 wanbatch processes are using it (host:41, last seen 3s ago; …)"."""

    def one(process: LiveProcess) -> str:
        if process.seen_at is not None:
            ago = max(0, round((now - process.seen_at).total_seconds()))
            return f"{one_line(process.name)}, last seen {ago}s ago"
        assert process.lease_until is not None
        left = max(0, round((process.lease_until - now).total_seconds()))
        return f"{one_line(process.name)}, holding jobs for {left}s more"

    named = "; ".join(one(p) for p in live[:_LIVE_NAMED])
    more = f"; and {len(live) - _LIVE_NAMED:,} more" if len(live) > _LIVE_NAMED else ""
    counted = "1 wanbatch process is" if len(live) == 1 else f"{len(live):,} wanbatch processes are"
    return f"{counted} using it ({named}{more})"


def live_processes_fix(live: list[LiveProcess]) -> str:
    """What to do about an upgrade ``live`` processes hold back (``doctor`` says it too)."""
    them = "it" if len(live) == 1 else "them"
    return (
        f"stop {them} (a killed one counts until it has been silent {HEARTBEAT_STALE_SECONDS:.0f} s "
        "and its job leases expire), then run any command to upgrade the database"
    )


def _require_unused(engine: Engine, conn: Connection, heads: set[str], target: str) -> None:
    """Raise :class:`ConfigError` (one line, exit 2) when wanbatch processes work on the database
    whose schema is about to change (:func:`live_processes`), read under the schema's lock.

    Those are of an older version (one of this version would have upgraded it): the tables and
    columns they write would change under them. An older ``run`` whose database was upgraded
    behind it sent nothing more, printed nothing and never ended, while the new ``status``
    said nothing was processing its batch."""
    now = clock.utcnow()
    if live := live_processes(conn, inspect(conn).get_table_names(), now=now):
        url = engine.url.set(drivername=engine.url.get_backend_name())  # as it was set: no driver
        said, fix = live_processes_said(live, now=now), live_processes_fix(live)
        raise ConfigError(
            f"WANBATCH_DATABASE_URL {safe_url(url)}: the database is at schema {', '.join(sorted(heads))} "
            f"and this wanbatch needs {target}; {said}: {fix}"
        )


def migrate(engine: Engine, revision: str = "head", *, from_models: bool = True) -> None:
    """Bring the schema to ``revision`` (default: the newest). Safe on every CLI start.

    When the schema is already current this costs one small query. Otherwise the upgrade runs in
    a single transaction that first takes a lock — a PostgreSQL advisory lock, or SQLite's
    write lock — so processes starting together migrate one after the other, and the later ones
    find nothing left to do. Under that lock, a database that has a schema already is changed
    only while no wanbatch process works on it (:func:`_require_unused`): the later ones of
    processes starting together find it current, and never take the first one's fresh
    heartbeat for an older process.

    An empty database brought to the head is created from the models and stamped with
    :data:`SCHEMA_HEAD` (``from_models``; Alembic's recipe for a new database,
    https://alembic.sqlalchemy.org/en/latest/cookbook.html#building-an-up-to-date-database-from-scratch):
    the same schema as running every migration, which ``tests/integration/test_migrations.py``
    proves, without loading Alembic — a fifth of a second of a first run's start-up. The
    migration tests pass ``from_models=False`` to run the history itself.
    """
    heads, tables = _current_schema(engine)
    _require_own(engine, heads, tables)  # someone else's tables: never taken over
    if revision == "head":
        if heads == {SCHEMA_HEAD}:
            _require_tables(engine, tables)  # a schema at the head has every table
            return
        if not heads and from_models and _create_from_models(engine):
            return
    from alembic import command

    cfg = alembic_config()
    _require_known(engine, cfg, heads)
    target = SCHEMA_HEAD if revision == "head" else revision
    with engine.connect() as conn, references_unchecked(conn):
        _lock_schema(conn)
        if heads:  # read again under the lock: another process may have upgraded it since
            heads = {str(v) for v in conn.execute(text("SELECT version_num FROM alembic_version")).scalars()}
            if heads and heads != {target}:
                _require_unused(engine, conn, heads, target)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()


@contextlib.contextmanager
def references_unchecked(conn: Connection) -> Iterator[None]:
    """SQLite: foreign keys not enforced while the schema changes, on again after.

    Batch mode rebuilds a table by copying it and dropping the old one; with foreign keys on,
    that DROP fails as soon as any row of another table refers to it (a downgrade of ``jobs``
    with one job event stored). The pragma has to be set outside a transaction, so on the
    driver's connection before the change's transaction opens
    (https://alembic.sqlalchemy.org/en/latest/batch.html#dealing-with-referencing-foreign-keys).
    The rows copied are the rows dropped: nothing can dangle. :func:`migrate`, :func:`downgrade`
    and the ``alembic`` command line (``migrations/env.py``) all change the schema through it.
    """
    if conn.dialect.name != "sqlite":
        yield
        return
    raw = conn.connection.dbapi_connection
    assert raw is not None
    raw.execute("PRAGMA foreign_keys = OFF")
    try:
        yield
    finally:
        if conn.in_transaction():  # failed: a pragma inside the transaction would do nothing
            conn.rollback()
        raw.execute("PRAGMA foreign_keys = ON")


def _lock_schema(conn: Connection) -> None:
    """Open the schema change's transaction under a lock only one process holds at a time."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATE_LOCK_KEY})
    else:
        conn.execute(text("SELECT 1"))  # opens the transaction: BEGIN IMMEDIATE on SQLite


#: Alembic's version table, as ``alembic upgrade`` creates it.
_ALEMBIC_VERSION = Table(
    "alembic_version",
    MetaData(),
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


def _create_from_models(engine: Engine) -> bool:
    """Create the models' tables in a database that has none, stamped at :data:`SCHEMA_HEAD`;
    False (nothing done) when, under the lock, the database turns out to have tables (another
    process created them first: Alembic finds it at the head then) — a PostgreSQL extension's
    (:func:`_extension_tables`) do not count. A database with tables of
    its own was refused before (:func:`_require_own`): read outside the lock, the tables seen are
    committed ones, and wanbatch creates its own with their revision in one transaction."""
    from jobs.models import Base, InstanceSecret
    from jobs.store.instance_secrets import WEBHOOK_SECRET, new_secret_value

    with engine.connect() as conn:
        _lock_schema(conn)
        present = set(inspect(conn).get_table_names())
        if present - _extension_tables(conn):
            conn.rollback()
            return False
        # Under the lock, the tables read just now are all there is: no model's table is among
        # them (an extension's never has a wanbatch name), so none is looked up again one by one
        # (``checkfirst``: a PRAGMA or a catalogue query per table, 34 statements on SQLite).
        Base.metadata.create_all(conn, checkfirst=bool(present & set(Base.metadata.tables)))
        _ALEMBIC_VERSION.create(conn)
        conn.execute(_ALEMBIC_VERSION.insert().values(version_num=SCHEMA_HEAD))
        # The webhook secret now, as migration 0046 makes it for a database upgraded: every backup
        # then holds the secret its webhook tokens are keyed by (jobs.store.WEBHOOK_SECRET).
        made = {"name": WEBHOOK_SECRET, "value": new_secret_value(), "created_at": clock.utcnow()}
        conn.execute(insert(InstanceSecret).values(**made))
        conn.commit()
    return True


def downgrade(engine: Engine, revision: str) -> None:
    """Move the schema down to ``revision`` (``"base"`` drops everything); for tests and operators."""
    from alembic import command

    cfg = alembic_config()
    _require_known(engine, cfg, _current_schema(engine)[0])
    with engine.connect() as conn, references_unchecked(conn):
        _lock_schema(conn)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
        conn.commit()


def _opened_engine(url: str) -> Engine:
    """A new engine for ``url``, migrated to head (:func:`migrate`); :class:`ConfigError` else.

    A SQLite file this call created (:func:`_prepare_sqlite_file`) whose schema could not be
    created for want of space is removed again: a full disk left an empty ``wb.db`` behind. On
    an existing SQLite file, the side files the failed open made are removed
    (:func:`_remove_open_debris`), and inside :func:`only_reading` the database is read without
    them (:func:`_full_disk_reader`) rather than refused."""
    absent = _absent_side_files(url)
    engine, created = _built_engine(url)  # ConfigError for a URL that is not SQLite or PostgreSQL
    try:
        migrate(engine)
    except ConfigError:  # not a wanbatch database
        engine.dispose()
        raise
    # sqlite3.Error: raised bare from a commit hook (`/dev/null` as the file: "disk I/O error")
    except (DBAPIError, OSError, sqlite3.Error) as exc:  # unreachable, refused, no such database, unwritable…
        engine.dispose()
        if is_disk_full(exc) or (isinstance(exc, DBAPIError | sqlite3.Error) and _no_room_beside(url)):
            if created is not None:
                _remove_if_empty(created)
            else:
                _remove_open_debris(url, absent)
                if _ONLY_READING.get():
                    return _full_disk_reader(url)
            raise disk_full_error(url) from None
        if is_lock_timeout(exc):  # an operator's command bounded its wait (lock_waits_bounded)
            raise database_locked_error(url) from None
        reason = first_line(exc)
        if is_schema_missing(exc):  # a migration met a table dropped since
            raise schema_missing_error(url, reason) from None
        raise ConfigError(
            f"WANBATCH_DATABASE_URL {safe_url(url)}: cannot open the database: {reason}"
        ) from None
    return engine


def _remove_if_empty(path: Path) -> None:
    """Remove the database file this process created, and the side files SQLite left, while
    the database holds no table: no schema, no row, nobody's data (a full disk let none be
    committed; SQLite may have written its header page before the commit failed)."""
    if not _holds_no_table(path):
        return
    for candidate in (*(path.with_name(path.name + side) for side in _SQLITE_SIDE_FILES), path):
        with contextlib.suppress(OSError):
            candidate.unlink()


def _holds_no_table(path: Path) -> bool:
    """Whether the SQLite file ``path`` is empty, or a database without a single table (False
    when that cannot be told: it is then left as it is)."""
    try:
        if path.stat().st_size == 0:
            return True
        uri = f"file:{quote(str(path.absolute()))}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            return bool(conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0)
    except (OSError, sqlite3.Error):
        return False


# --------------------------------------------------------------------------- reading on a full disk

#: True inside :func:`only_reading`: this context only reads the database.
_ONLY_READING: contextvars.ContextVar[bool] = contextvars.ContextVar("wanbatch_only_reading", default=False)
#: The engines :func:`_full_disk_reader` made (:class:`_Engines` hands one out only to a reader).
_FULL_DISK_READERS: weakref.WeakSet[Engine] = weakref.WeakSet()


@contextlib.contextmanager
def only_reading() -> Iterator[None]:
    """Inside the block, this context only reads the database: the commands an operator runs
    to look (``status``, ``cost``, ``export``, ``diff``: :func:`cli.output.guarded_read`). A
    SQLite database that cannot be opened because its disk is full is then read without the
    ``-shm`` file SQLite needs room for (:func:`_full_disk_reader`), instead of refused: in WAL
    mode SQLite creates and grows ``-shm`` even to read (``SQLITE_IOERR_SHMSIZE``), and so does
    a ``mode=ro`` connection. Follows the context (:mod:`contextvars`), as
    :func:`lock_waits_bounded` does."""
    token = _ONLY_READING.set(True)
    try:
        yield
    finally:
        _ONLY_READING.reset(token)


#: SQLite's locks on a database file (https://www.sqlite.org/lockingv3.html; ``PENDING_BYTE``,
#: ``SHARED_FIRST`` and ``SHARED_SIZE`` in https://sqlite.org/src/file?name=src/os.h): every
#: connection holds a read lock on one byte of this range for as long as it has a WAL database
#: open; an exclusive lock on all of it is SQLite's "EXCLUSIVE", held by nobody else.
_SQLITE_SHARED_FIRST = 0x40000000 + 2
_SQLITE_SHARED_SIZE = 510


def _absent_side_files(url: str) -> frozenset[str]:
    """The side files (``-wal``, ``-shm``) missing beside the SQLite file of ``url`` now (none
    for PostgreSQL or an unusable URL): what an open that fails afterwards made itself."""
    with contextlib.suppress(ConfigError):
        target = sqlite_file(url)
        if target is not None:
            return frozenset(side for side in ("-wal", "-shm") if not os.path.lexists(f"{target.path}{side}"))
    return frozenset()


def _remove_open_debris(url: str, absent: frozenset[str]) -> None:
    """Remove the ``-wal`` and ``-shm`` files an open of ``url`` that failed for want of space
    left beside the database (an empty ``-wal``, a 3-byte ``-shm``: SQLite could create them
    but not grow the index), when they were ``absent`` before it and still hold nothing: an
    empty log, an index of zero bytes only (SQLite writes a header into one it uses).

    Only while no other connection has the database open: SQLite's own test before it deletes
    a WAL database's side files on close (``sqlite3WalClose``, https://sqlite.org/src/file?name=src/wal.c),
    an exclusive lock on the database file's shared-lock range, which every connection to a WAL
    database holds a part of (:data:`_SQLITE_SHARED_FIRST`); held while they are removed, so
    that no connection opens them meanwhile. A file that cannot be locked (this user may not
    write it) is left as it is."""
    target = sqlite_file(url)
    if target is None or not absent:
        return
    candidates = [Path(f"{target.path}{side}") for side in ("-wal", "-shm") if side in absent]
    candidates = [path for path in candidates if _holds_nothing(path)]
    if not candidates:
        return
    try:
        fd = os.open(target.path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _SQLITE_SHARED_SIZE, _SQLITE_SHARED_FIRST)
        except OSError:  # another connection has the database open: the files are its too
            return
        for path in candidates:
            if _holds_nothing(path):  # looked at again, under the lock
                with contextlib.suppress(OSError):
                    path.unlink()
    finally:
        os.close(fd)  # releases the lock


#: The largest side file :func:`_holds_nothing` reads through: a failed open leaves a few bytes.
_DEBRIS_BYTES = 1 << 16


def _holds_nothing(path: Path) -> bool:
    """Whether ``path`` is a regular file of zero bytes only (no more than :data:`_DEBRIS_BYTES`)."""
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > _DEBRIS_BYTES:
            return False
        return path.read_bytes().count(0) == info.st_size
    except OSError:
        return False


def _unread_log(path: Path) -> str | None:
    """Which file beside the SQLite database ``path`` holds changes that are not in the file
    itself (a non-empty ``-wal``, or a rollback ``-journal``: a process that ended without a
    checkpoint, or one still running); None when everything is in the file."""
    for side in ("-wal", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            if Path(f"{path}{side}").stat().st_size > 0:
                return f"{path.name}{side}"
    return None


def _full_disk_reader(url: str) -> Engine:
    """An engine that reads the SQLite database of ``url`` whose disk is full, for a context
    that only reads (:func:`only_reading`); the :func:`disk_full_error` line when it cannot.

    The file is opened ``mode=ro&immutable=1`` (https://www.sqlite.org/uri.html#uriimmutable):
    no locks, no ``-wal`` and no ``-shm``, so no room needed. That reads exactly what the
    database holds only while everything is in the file: no ``-wal`` with changes beside it.
    When there is one (a process that ended without a checkpoint, its ``-shm`` gone; or one
    still running), this refuses, saying so, rather than show an older database that the
    commands would present as the current one: reading the log needs the ``-shm`` index. A
    process that writes while this reads would change the file under an immutable reader, but
    on a full disk nothing can be written; freed space lets writers on again at once, and a
    command that meets a change mid-read is one a second later would not.

    The schema must be this version's (:data:`SCHEMA_HEAD`): nothing can be migrated. A write
    tried on it fails as SQLite's ``SQLITE_FULL`` would (:func:`is_disk_full`), where the disk
    would have refused it too."""
    target = sqlite_file(url)
    if target is None:
        raise disk_full_error(url) from None
    if (unread := _unread_log(target.path)) is not None:
        raise disk_full_error(
            url,
            then=(
                f"run the command again ({unread} holds changes not yet in the database file, and "
                f"reading them needs room for SQLite's {target.path.name}-shm); nothing was changed"
            ),
        ) from None
    parsed = normalize_url(url)
    options = [(k, v) for k, v in target.options if k not in ("mode", "immutable")]
    options += [("mode", "ro"), ("immutable", "1")]
    database = f"file:{quote(str(target.path))}?{urlencode(options)}"
    query = {k: v for k, v in parsed.query.items() if k in _PYSQLITE_OPTIONS} | {"uri": "true"}
    engine = _create_engine(parsed.set(database=database, query=query))
    _configure_full_disk_reader(engine)
    try:
        heads, tables = _current_schema(engine)
        if heads != {SCHEMA_HEAD}:  # older (no migration can run), newer, or none
            raise disk_full_error(url)
        if missing := _missing_tables(tables):
            raise schema_missing_error(url, f"no table {', '.join(missing)}")
    except ConfigError:
        engine.dispose()
        raise
    except (DBAPIError, OSError, sqlite3.Error):
        engine.dispose()
        raise disk_full_error(url) from None
    _FULL_DISK_READERS.add(engine)
    return engine


def _configure_full_disk_reader(engine: Engine) -> None:
    """A :func:`_full_disk_reader` engine's connections: transactions begun here (a deferred
    ``BEGIN``: there is no lock to take), nothing written (``query_only``), a write refused as
    the full disk would refuse it."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # as _configure_sqlite: the "begin" event begins
        dbapi_connection.execute("PRAGMA query_only = ON")

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        _begin(connection.connection.dbapi_connection, "BEGIN")

    @event.listens_for(engine, "handle_error")
    def _as_full(context: Any) -> None:
        orig = context.original_exception
        if (
            isinstance(orig, sqlite3.Error)
            and (getattr(orig, "sqlite_errorcode", 0) or 0) & 0xFF == _SQLITE_READONLY
        ):
            full = sqlite3.OperationalError("database or disk is full (read without room to write)")
            full.sqlite_errorcode = _SQLITE_FULL
            full.sqlite_errorname = "SQLITE_FULL"
            raise OperationalError(context.statement, context.parameters, full) from None


#: How long :func:`sqlite_holds_batch` waits for a lock before it gives up (and says "not known").
HOLDS_BATCH_WAIT_SECONDS = 0.5


def sqlite_holds_batch(path: Path, name: str) -> bool | None:
    """Whether the SQLite file ``path`` (another folder's default database,
    :mod:`jobs.database_home`) holds a batch named ``name``; None when that cannot be told (not
    SQLite, not wanbatch's, an old schema, locked, unreadable). One short read-only connection
    (``mode=ro``), nothing migrated or written. Without a ``-wal`` file beside it (no process has
    the database open: everything is in the file) also ``immutable=1``, else a read-only
    connection to a WAL database leaves an empty ``-wal`` and ``-shm`` behind, in another folder.
    Names are compared in NFC (how names are stored: :mod:`jobs.batch_names`): a database not
    yet upgraded to 0041 may hold the name in another spelling (NFD, as macOS gives it), and
    ``name`` is already NFC (the manifest's, normalised); so every stored name with a character
    beyond ASCII is read and compared normalised (a handful of rows)."""
    options = "mode=ro" if os.path.lexists(f"{path}-wal") else "mode=ro&immutable=1"
    uri = f"file:{quote(str(path.absolute()))}?{options}"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=HOLDS_BATCH_WAIT_SECONDS)) as conn:
            wanted = batch_name(name)
            rows = conn.execute(
                "SELECT name FROM batches WHERE name IN (?, ?) OR length(CAST(name AS BLOB)) != length(name)",
                (name, wanted),
            ).fetchall()
    except (sqlite3.Error, OSError, ValueError):
        return None
    return any(isinstance(stored, str) and batch_name(stored) == wanted for (stored,) in rows)


class _Engines:
    """The engines :func:`open_engine` opened, one per URL, the latest :data:`KEPT` of them.

    A process uses one database, so its engine (and its pool) is opened and migrated once. An
    engine dropped from here is disposed of — its pooled connections closed — not left to the
    garbage collector: an engine sits in reference cycles, and a collection frozen out
    (:func:`cli.startup.resume` freezes what the start-up built) kept a dropped engine's idle
    connections open for the life of the process (a test process opening many databases ran a
    PostgreSQL server out of connections). :meth:`cache_clear` forgets them all (tests: "a new
    process"); a disposed engine still in someone's hands opens new connections when used.
    """

    KEPT = 8

    def __init__(self) -> None:
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, url: str) -> Engine:
        with self._lock:
            engine = self._engines.get(url)
            if engine is not None and engine in _FULL_DISK_READERS and not _ONLY_READING.get():
                del self._engines[url]  # read-only, for reading on a full disk: open it afresh
                engine.dispose()
                engine = None
            if engine is not None:
                self._engines.move_to_end(url)
                return engine
        engine = _opened_engine(url)
        with self._lock:
            kept = self._engines.setdefault(url, engine)
            self._engines.move_to_end(url)
            dropped = [self._engines.popitem(last=False)[1] for _ in range(len(self._engines) - self.KEPT)]
        if kept is not engine:  # another thread opened it meanwhile
            dropped.append(engine)
        for old in dropped:
            old.dispose()
        return kept

    def cache_clear(self) -> None:
        """Dispose of every engine opened so far and forget them."""
        with self._lock:
            dropped = list(self._engines.values())
            self._engines.clear()
        for old in dropped:
            old.dispose()


_engine_for = _Engines()


def close_engines() -> None:
    """Close every database connection this process opened (its engines' pools) and forget them.

    A command calls it as it exits (:func:`cli._close_databases`): the last connection to a
    SQLite database closed checkpoints the write-ahead log into the file. Tests call it for "a
    new process". An engine still in someone's hands opens new connections when used."""
    _engine_for.cache_clear()


def open_engine(settings: DatabaseSettings | None = None) -> Engine:
    """The engine of the system of record, migrated to head (once per process and URL).

    Code passes its settings. Called bare, it reads ``WANBATCH_DATABASE_URL`` alone from the
    environment: that is the deploy one-liner ``python -c "from jobs.db import open_engine;
    open_engine()"`` (docker-compose's ``migrate`` service), which needs no other setting valid.
    :class:`ConfigError` (one line, exit 2) when the database cannot be reached or used.
    """
    return _engine_for((settings if settings is not None else DatabaseSettings()).database_url)


#: :data:`PG_SERVER_KEEPALIVES` set on a session (``set_config``: one statement, any role may).
_SERVER_KEEPALIVES_SET = text(
    "SELECT "
    + ", ".join(f"set_config('{name}', '{value}', false)" for name, value in PG_SERVER_KEEPALIVES.items())
)


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
            # The server probes this session as the client does (PG_SERVER_KEEPALIVES): cut off
            # from it, the holder's session (and the lock) ends within a minute, not hours.
            conn.execute(_SERVER_KEEPALIVES_SET)
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
        except BaseException:
            conn.close()
            raise
        if got:
            self._conn = conn
        else:
            conn.close()
        return got

    def release(self, *, unlock: bool = True) -> None:
        """Give the lock up: unlocked on its session, which then ends (``unlock=False``: just
        ended, for a connection that just failed, where a round trip could only wait).

        Unlocked first, and answered, so that whoever asks next finds it free: a server frees
        the lock of a closed connection only when that backend has exited, a moment after the
        client hung up. The connection is then invalidated, not just closed: a plain close would
        hand the session back to the engine's pool, and with it the lock if the unlock failed.
        """
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if unlock:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
        except Exception:  # the connection is gone, and so is the lock once its backend exits
            log.debug("unlocking the advisory lock failed", exc_info=True)
        try:
            conn.invalidate()
            conn.close()
        except Exception:  # already gone: so is the lock
            log.debug("closing the advisory lock's connection failed", exc_info=True)


#: SQLSTATE of a statement the role may not run (``pg_terminate_backend`` of another role's session).
_PG_INSUFFICIENT_PRIVILEGE = "42501"

#: The session holding a session-level advisory lock of one ``bigint`` key in this database:
#: ``pg_locks`` spells such a key as ``classid`` (its high 32 bits), ``objid`` (its low 32 bits)
#: and ``objsubid`` 1 (https://www.postgresql.org/docs/current/view-pg-locks.html); advisory
#: locks are per database, and another database's holder of the same key is none of ours.
_ADVISORY_HOLDER = text(
    "SELECT l.pid FROM pg_locks l "
    "JOIN pg_database d ON d.oid = l.database AND d.datname = current_database() "
    "JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.classid = CAST(:hi AS oid) AND l.objid = CAST(:lo AS oid) "
    "ORDER BY a.backend_start LIMIT 1"
)
#: Ends ``pid``'s session only while it still holds the lock: a holder that changed since it was
#: read (another worker took over meanwhile) is left alone. No row: it no longer holds it.
_TERMINATE_HOLDER = text(
    "SELECT pg_terminate_backend(l.pid) FROM pg_locks l "
    "JOIN pg_database d ON d.oid = l.database AND d.datname = current_database() "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.classid = CAST(:hi AS oid) AND l.objid = CAST(:lo AS oid) AND l.pid = :pid"
)


def _advisory_key_parts(key: int) -> dict[str, int]:
    """``key`` as ``pg_locks`` shows it: unsigned high and low 32 bits."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF}


#: Ends the session holding the advisory lock of a key (``classid``/``objid`` as above) while it
#: sits idle in its transaction for longer than ``:secs`` by the server's clock: a process frozen
#: mid-transaction (its kernel answers, nothing more ever comes).
_TERMINATE_STUCK = text(
    "SELECT pg_terminate_backend(l.pid) FROM pg_locks l "
    "JOIN pg_database d ON d.oid = l.database AND d.datname = current_database() "
    "JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.classid = CAST(:hi AS oid) AND l.objid = CAST(:lo AS oid) "
    "AND a.state LIKE 'idle in transaction%' AND a.state_change < now() - make_interval(secs => :secs)"
)


def terminate_stuck_holder(engine: Engine, key: int, idle_seconds: float) -> int | None:
    """End the session that holds the (transaction-level) advisory lock ``key`` if it has sat
    idle in its transaction for over ``idle_seconds``: how many were ended (0 or 1), None when
    this role may not (:func:`terminate_advisory_holder`). The tick leader frozen in the middle
    of a dispatch round holds the round's lock on a connection of its pool, not the leader
    lock's: left alone, its successor's first round would wait for it for ever."""
    try:
        with engine.connect() as conn:
            ended = conn.execute(_TERMINATE_STUCK, {**_advisory_key_parts(key), "secs": idle_seconds}).all()
            conn.commit()
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == _PG_INSUFFICIENT_PRIVILEGE:
            return None
        raise
    return sum(1 for (done,) in ended if done)


def advisory_lock_holder(engine: Engine, key: int) -> int | None:
    """The backend pid of the session that holds the session-level advisory lock ``key`` in
    this database (None: nobody does). One read of ``pg_locks`` and ``pg_stat_activity``,
    which any role may read; PostgreSQL only."""
    with engine.connect() as conn:
        pid = conn.execute(_ADVISORY_HOLDER, _advisory_key_parts(key)).scalar()
    return None if pid is None else int(pid)


def terminate_advisory_holder(engine: Engine, key: int, pid: int) -> bool | None:
    """End the session ``pid`` if it still holds the advisory lock ``key`` (the server then frees
    the lock as its backend exits): True when it was signalled, False when it no longer held the
    lock (or had already gone), None when this role may not end it. PostgreSQL 9.2 and later
    let a role end its own sessions; ending another role's needs membership in that role or the
    ``pg_signal_backend`` role, and a superuser's needs a superuser
    (https://www.postgresql.org/docs/current/functions-admin.html#FUNCTIONS-ADMIN-SIGNAL)."""
    try:
        with engine.connect() as conn:
            done = conn.execute(_TERMINATE_HOLDER, {**_advisory_key_parts(key), "pid": pid}).scalar()
            conn.commit()
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == _PG_INSUFFICIENT_PRIVILEGE:
            return None
        raise
    return bool(done)


# ----------------------------------------------------------------------------- events between processes

#: The PostgreSQL channel on which processes tell each other that a job moved (``kind:job_id``).
EVENTS_CHANNEL = "wanbatch_events"


def notify_events(bind: Session | Connection, payload: str) -> None:
    """Tell every process listening on :data:`EVENTS_CHANNEL` that something happened.

    PostgreSQL delivers the notice when ``bind``'s transaction commits, and never when it rolls
    back, so a listener that wakes up finds the change it was told about already visible. On
    any other database this does nothing: SQLite runs one host, where the process that made the
    change tells its own conductor directly, and the tick remains the safety net everywhere.
    """
    dialect = bind.dialect if isinstance(bind, Connection) else bind.get_bind().dialect
    if dialect.name == "postgresql":
        bind.execute(
            text("SELECT pg_notify(:channel, :payload)"), {"channel": EVENTS_CHANNEL, "payload": payload}
        )


def notify_now(engine: Engine, payload: str) -> None:
    """:func:`notify_events` for a change already committed: one statement in autocommit on a
    pooled connection, where a unit of work of its own took three round trips (``BEGIN``, the
    notice, ``COMMIT``). The notice is delivered at once; nothing is written. On any other
    database, nothing (as :func:`notify_events`). Raises SQLAlchemy's errors when the database
    cannot be reached (a notice is a hint: callers let it go)."""
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        notify_events(conn, payload)


def listen_events(url: str | URL, *, connect_timeout: float = 10.0) -> psycopg.Connection[Any] | None:
    """A dedicated psycopg connection (autocommit) that ``LISTEN``\\ s on :data:`EVENTS_CHANNEL`;
    None when ``url`` is not PostgreSQL (there is nothing to listen to).

    Not a pooled connection: it waits for notices for as long as the process lives, and a
    pool's pre-ping or recycling must never swap it for one that is not listening. The
    connection parameters are the ones SQLAlchemy's psycopg dialect derives from the URL, so a
    URL that works for the engine works here. Raises psycopg's errors when the database cannot
    be reached (:class:`worker.notifications.EventListener` retries).
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    import psycopg  # here: a SQLite-only process never pays for loading the driver

    _args, params = parsed.get_dialect()().create_connect_args(parsed)
    params = pg_bounded_params({"connect_timeout": max(1, round(connect_timeout)), **params})
    conn = psycopg.connect(**params, autocommit=True)
    try:
        conn.execute(f"LISTEN {EVENTS_CHANNEL}")
    except BaseException:
        conn.close()
        raise
    return conn
