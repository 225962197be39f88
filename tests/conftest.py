"""Shared fixtures: real PostgreSQL, real SQLite, real Redis. Never mocks, never skips.

* ``pg_url`` — a fresh, uniquely named PostgreSQL database for this test run (created on the
  shared server at 127.0.0.1:5432 and dropped at the end), so parallel runs never collide.
* ``sqlite_url`` — a SQLite file in the test's ``tmp_path``.
* ``db_url`` — parametrized: each test using it runs once on SQLite and once on PostgreSQL.
* ``engine`` — migrated to head for ``db_url``. On PostgreSQL the run's database is migrated
  once and its tables are emptied around each test (truncated when anything is in them); on
  SQLite each test gets a copy of a migrated template file. Both are far cheaper than
  migrating per test.
* ``session`` — a session on ``engine`` (the test commits what it wants kept).
* ``new_pg_database`` — a factory for extra empty databases (migration tests up/downgrade them).
* ``redis_url`` / ``redis_namespace`` — the shared Redis, and a unique key prefix per test.
* ``redis_db`` — a whole Redis database of the test's own, claimed and flushed afterwards.

Redis databases, one rule: a test's keys live on database 0 under a prefix of its own
(``redis_namespace``), or on a whole database it claimed (``redis_db``, or
:func:`bench.distributed.claimed_redis_db` for a broker) — never on a database it names by
number, which another test's claim may hold and flush meanwhile (``pytest -n 4``);
``tests/test_quality.py`` enforces it.

A missing service is a failure with the reason, never a skip: a green run must mean the
real databases were exercised.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from jobs.db import make_engine, migrate, session_factory
from jobs.models import Base
from tests.hostile import HostileProvider
from tests.statement_log import recorded_statements

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_SERVER_URL = "postgresql://postgres@127.0.0.1:5432"
REDIS_URL = "redis://127.0.0.1:6379/0"
#: pytest-xdist's workers (``pytest -n 4``, the README's test command) were seen to start with
#: ``COLUMNS=80`` and ``LINES=24`` in their environment, which a plain ``pytest`` never has: the
#: commands the tests run would lay their output out for an 80-column terminal, in-process and in
#: every subprocess. Tests that mean a width set ``COLUMNS`` themselves (``monkeypatch.setenv``).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("COLUMNS", "LINES"):
        os.environ.pop(_name, None)

#: The suite interrupts and stops `wanbatch` (in process and as child processes) with SIGINT and
#: SIGTERM, and a run leaves a signal its parent ignored ignored (a background job of a script:
#: `pytest … &` in a non-interactive shell starts with SIGINT ignored, and so would every
#: process it starts). Those tests mean an ordinary terminal: give this process, and through it
#: every process it starts (a handler, unlike an ignore, is reset to the default by ``exec``),
#: the default dispositions. The tests of an inherited ignore set it up themselves.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pytest_configure(config: pytest.Config) -> None:
    """wanbatch's packages byte-compiled, and its dataclass methods cached, once, before the
    suite's processes start (in the first process alone: ``pytest -n 4``'s workers come after it),
    as an installed wanbatch has them after its first command (:func:`bench._common.byte_compile`).
    Under ``PYTHONDONTWRITEBYTECODE=1`` (this project's machines) a checkout never gets them, and
    each of the thousands of ``wanbatch`` processes the suite starts compiled every module it
    imports from source: about 0.5 s of CPU each, 0.75 s where 1.25 s does, minutes of the run."""
    if hasattr(config, "workerinput"):
        return
    from bench._common import byte_compile

    byte_compile()


@pytest.hookimpl(tryfirst=True)
def pytest_collection(session: pytest.Session) -> None:
    """No cyclic garbage collection while the tests are collected: importing ~480 test modules
    and rewriting their 14,000 asserts builds millions of short-lived AST nodes, and the
    collector's full passes over the growing heap took a third of the collection's CPU (6.5 of
    19 s a process, in each of the README's ``pytest -n 4``). Turned back on, with what was
    collected frozen, in :func:`pytest_collection_finish`."""
    gc.disable()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Collection's garbage collected once, what is left (modules, test items, fixtures'
    definitions: alive until the run ends) moved out of the collector's sight (:func:`gc.freeze`),
    and collection turned back on for the tests themselves: every later full pass skips those
    objects instead of walking them again (CPython's advice for a long-lived heap)."""
    gc.collect()
    gc.freeze()
    gc.enable()


#: Test files run before all others, longest single tests first. The suite's processes (``pytest
#: -n 4 --dist worksteal``) start on four contiguous quarters of the collection and take work from
#: the end of each other's: a long test is best started first, never met near the end, when the
#: other processes may have nothing left to do (a 55 s chaos scenario sorted late once kept one
#: process busy for the run's last minute). mypy (strict, the whole tree) is 30 s on a quiet 2-core
#: machine and 4-5 minutes on a busy one. These files all start on the first process, one after
#: another (about 9 of its 19 minutes); the others share the rest.
FIRST = (
    "tests/test_quality.py",
    "tests/test_architecture.py",
    "tests/chaos/test_chaos.py",
    "tests/integration/test_frozen_tick_leader.py",
    "tests/web/test_browser.py",
    "tests/integration/test_broker_hang.py",
    "tests/e2e/test_stop_watch_in_flight.py",
    "tests/e2e/test_simulated_kill.py",
    "tests/integration/test_limits_distributed.py",
    "tests/integration/test_distributed.py",
)


@pytest.hookimpl(trylast=True)  # after pytest groups the tests by their wider-scoped fixtures
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """:data:`FIRST`'s files first, in its order; every other test in its own order. Whole files
    move, so no module's tests are split apart (its module-scoped fixtures are still made once)."""
    place = {path: n for n, path in enumerate(FIRST)}
    items.sort(key=lambda item: place.get(item.nodeid.split("::", 1)[0], len(FIRST)))


#: Every table of the models, emptied after each PostgreSQL test: a table left out (as
#: ``conductor_heartbeats`` once was) carries one test's rows into the next.
#: What emptying the shared PostgreSQL database between tests truncates: every table but the
#: database's own secrets, which a real database never loses (processes cache them).
TABLES = tuple(table.name for table in Base.metadata.sorted_tables if table.name != "instance_secrets")


def _admin_execute(sql: str) -> None:
    try:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is required at {PG_ADMIN_DSN} (trust auth, user postgres) and is not "
            f"reachable: {exc}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def new_pg_database() -> Iterator[Callable[[], str]]:
    """Create empty, uniquely named databases on demand; all are dropped when the run ends."""
    created: list[str] = []

    def create() -> str:
        name = f"wanbatch_t_{uuid.uuid4().hex[:12]}"
        _admin_execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"{PG_SERVER_URL}/{name}"

    yield create
    _drop_databases(created)


#: How many databases :func:`_drop_databases` drops at once (a connection each, on a server
#: other runs share).
DROPS_AT_ONCE = 8


def _drop_databases(names: list[str]) -> None:
    """Drop the databases ``names`` (those that exist), ending their connections: together, not
    one after another. PostgreSQL (15) takes an immediate checkpoint for every DROP DATABASE and
    waits for it; drops waiting at once share one. One by one, the 20-30 databases a process of
    the suite makes took 60-100 s at its end on a busy machine (10 databases: 21-28 s one by
    one, 2.4-2.9 s together)."""
    with ThreadPoolExecutor(max_workers=DROPS_AT_ONCE) as pool:
        list(pool.map(lambda name: _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'), names))


@pytest.fixture(scope="session")
def pg_url(new_pg_database: Callable[[], str]) -> str:
    """This run's own PostgreSQL database (empty until ``engine`` migrates it)."""
    return new_pg_database()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file of this test's own."""
    return f"sqlite:///{tmp_path / 'wanbatch.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs the test on both dialects."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture(scope="session")
def _pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    migrate(engine, from_models=False)  # the tests run on the schema the migrations make
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine, from_models=False)  # the tests run on the schema the migrations make
    engine.dispose()  # closing the last connection checkpoints the WAL into the file we copy
    assert not path.with_name(path.name + "-wal").exists()
    return path


@pytest.fixture
def engine(db_url: str, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A migrated engine for ``db_url``, empty when the test starts and emptied after it."""
    if db_url.startswith("sqlite"):
        template: Path = request.getfixturevalue("_sqlite_template")
        shutil.copyfile(template, db_url.removeprefix("sqlite:///"))
        sqlite_engine = make_engine(db_url)
        yield sqlite_engine
        sqlite_engine.dispose()
        return
    pg_engine: Engine = request.getfixturevalue("_pg_engine")
    # Before the test too: a test on ``db_url`` alone (a whole run through ``process_batch``)
    # leaves its rows in this database, and which test comes next on a worker of ``pytest -n``
    # depends on the machine's load (a test counting every job found another's six).
    _empty(pg_engine)
    yield pg_engine
    _empty(pg_engine)


def _empty(pg_engine: Engine) -> None:
    """Every table of :data:`TABLES` empty and its sequences restarted, truncated only when
    something is there to truncate: a TRUNCATE makes new files for every table and index and
    takes a third of a second or more, twice for each of the hundreds of PostgreSQL tests
    (before and after), while the tables are mostly empty already (emptied after the test
    before). The tables are locked first as TRUNCATE locks them (a lock costs nothing, new
    files do): the check waits for whatever another connection still does in them, as the
    TRUNCATE did, and no row committed meanwhile escapes it."""
    with pg_engine.begin() as conn:
        conn.execute(text(f"LOCK TABLE {', '.join(TABLES)} IN ACCESS EXCLUSIVE MODE"))
        if conn.execute(_ANYTHING_TO_EMPTY).scalar_one():
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))


#: Whether any table of :data:`TABLES` has a row, or any sequence of the schema has been used
#: (``last_value`` is NULL until a sequence is read, and again once TRUNCATE restarts it).
_ANYTHING_TO_EMPTY = text(
    "SELECT "
    + " OR ".join(f"EXISTS (SELECT 1 FROM {table})" for table in TABLES)
    + " OR EXISTS (SELECT 1 FROM pg_sequences"
    " WHERE schemaname = current_schema() AND last_value IS NOT NULL)"
)


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session on ``engine``; rolled back and closed after the test."""
    with session_factory(engine)() as sess:
        yield sess
        sess.rollback()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis; fails the test (with the reason) when it does not answer PING."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required at {REDIS_URL} and is not reachable: {exc}", pytrace=False)
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_namespace(redis_url: str) -> Iterator[str]:
    """A unique key prefix for this test; its keys are deleted afterwards."""
    prefix = f"wanbatch-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[str]:
    """The URL of a Redis database of this test's own: empty, claimed for it alone (no other
    test's claim takes it meanwhile), and flushed afterwards (:func:`bench.distributed.claimed_redis_db`)."""
    from bench.distributed import claimed_redis_db

    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as url:
        yield url


@pytest.fixture(autouse=True)
def _fresh_verified_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no digests read by an earlier one in this process
    (``worker.steps.verified_outputs.VERIFIED`` is kept for the process by design). Two tests
    storing the same bytes at the same S3 path within one second see one stamp (an ETag and a
    ``LastModified`` of whole seconds), so the later one would find the earlier one's read and
    decide in a round it expects to defer. Patched only once dispatch is imported: a test that
    never imports it has nothing to reset, and none pays for the import."""
    dispatch = sys.modules.get("worker.steps.dispatch")
    if dispatch is not None:
        from worker.steps.verified_outputs import VerifiedOutputs

        monkeypatch.setattr(dispatch, "VERIFIED", VerifiedOutputs())


@pytest.fixture
def hostile() -> Iterator[HostileProvider]:
    """A started :class:`hostile.HostileProvider` (a misbehaving fal on 127.0.0.1), closed afterwards."""
    with HostileProvider() as provider:
        yield provider


@pytest.fixture
def statements(engine: Engine) -> Iterator[list[str]]:
    """Every statement ``engine`` runs while the test does (its first 60 characters): what a
    step reads and writes, asserted by the tests of issue #11's per-job work."""
    with recorded_statements(engine, 60) as seen:
        yield seen
