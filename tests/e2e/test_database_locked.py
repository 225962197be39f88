"""Another PostgreSQL session's lock on a wanbatch table no longer holds the operator's reading
commands in silence for ever.

The bug (audit "pglock"): with `LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE` left open in psql (as a
migration or a careless operator might), `wanbatch status`, `cost`, `export`, `diff`, `doctor` and
the dashboard's pages waited for it without a word, for as long as that transaction stayed open.

Now their PostgreSQL transactions carry `lock_timeout` (`WANBATCH_DATABASE_LOCK_WAIT`, `SET LOCAL`:
never the connection's startup `options`, which poolers refuse, nor `statement_timeout`), and a
wait that long ends in one line naming the session that holds the lock, exit 2 as for a database
that cannot be reached (`doctor`: a failed database check, exit 1; the dashboard: 503). `run`, the
workers and the webhook receiver keep waiting for as long as it takes (a failed lock wait there
would give jobs back, or end a run, for an ordinary pause).

Each test has a PostgreSQL database of its own, and holds the lock from a connection of its own.
The commands run as real subprocesses with a deadline: a command that hangs fails the test.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from jobs import db
from jobs.errors import DatabaseLockedError
from jobs.settings import MAX_LOCK_WAIT_SECONDS, DatabaseSettings
from tests.e2e.e2e_helpers import EXAMPLES, assert_one_line, wanbatch
from tests.web.web_helpers import JSON, client, settings_for
from web.app import create_app

pytestmark = pytest.mark.postgres

#: How long the commands wait for a lock here (short: the tests wait for it to end).
LOCK_WAIT = "0.5"
#: The wait of the tests that check which session a command names as the one it waited for: the
#: watcher (jobs.db._LockWatcher) must look at least once while the wait lasts, and on a loaded
#: machine (a CI run beside other work) its thread and connection took longer than 0.5 s to start,
#: so the fallback named every strong lock, the innocent's first.
WATCHED_WAIT = "3"
#: Longest a command may take here before the test calls it hung.
DEADLINE = 90.0


@pytest.fixture
def database(new_pg_database: Callable[[], str], e2e_env: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A PostgreSQL database of this test's own, with the quickstart batch submitted to it (no
    fal needed): the URL the commands use."""
    url = new_pg_database()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", url)
    monkeypatch.setenv("WANBATCH_DATABASE_LOCK_WAIT", LOCK_WAIT)
    done = wanbatch("submit", EXAMPLES / "quickstart.yaml", timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    return url


@pytest.fixture
def locked(database: str) -> Iterator[int]:
    """``jobs`` locked ACCESS EXCLUSIVE by a transaction left open (as in psql); its pid. Given
    up after :data:`DEADLINE` whatever happens, so that a command (or a dashboard request in
    this process) that waits for it fails its test instead of hanging it."""
    with psycopg.connect(database) as holder:
        holder.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        pid = holder.info.backend_pid
        release = threading.Timer(DEADLINE, holder.rollback)
        release.start()
        try:
            yield pid
        finally:
            release.cancel()
            holder.rollback()


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("status", "quickstart"),
        ("cost", "quickstart"),
        ("export", "quickstart", "--format", "jsonl"),
        ("diff", "quickstart", "quickstart"),
    ],
    ids=lambda args: "-".join(args[:2]),
)
def test_a_reading_command_names_the_lock_and_exits_2(args: tuple[str, ...], locked: int) -> None:
    done = wanbatch(*args, timeout=DEADLINE)
    line = assert_one_line(
        done,
        "error: the database is locked by another session",
        f"pid {locked} holds an ACCESS EXCLUSIVE lock on table jobs",
        "WANBATCH_DATABASE_LOCK_WAIT",
    )
    assert "internal error" not in line
    assert done.stdout == ""


def test_json_says_it_in_the_error_object(locked: int) -> None:
    done = wanbatch("status", "quickstart", "--json", timeout=DEADLINE)
    assert done.returncode == 2, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ok"] is False
    assert answer["error"].startswith("the database is locked by another session")
    assert f"pid {locked}" in answer["error"]


def test_the_same_command_works_once_the_lock_is_gone(database: str) -> None:
    with psycopg.connect(database) as holder:
        holder.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        assert wanbatch("status", "quickstart", timeout=DEADLINE).returncode == 2
        holder.rollback()
    done = wanbatch("status", "quickstart", "--json", timeout=DEADLINE)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total"] == 3


def test_doctor_fails_its_database_check_naming_the_session(locked: int) -> None:
    done = wanbatch("doctor", "--simulate", "--json", timeout=DEADLINE)
    assert done.returncode == 1, done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    database = checks["database"]
    assert database["status"] == "fail"
    assert "locked by another session" in database["detail"]
    assert f"pid {locked} holds an ACCESS EXCLUSIVE lock on table jobs" in database["detail"]
    assert "every command that reads or writes table jobs waits for it" in database["detail"]
    assert f"pg_terminate_backend({locked})" in database["fix"]


def test_the_dashboard_answers_503_with_the_reason(
    database: str, locked: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = db.make_engine(database)
    try:
        settings = settings_for(engine, tmp_path / "outputs", database_lock_wait=float(LOCK_WAIT))
        browser = client(create_app(settings, engine=engine))
        for path in ("/", "/batches/quickstart"):
            answer = browser.get(path, headers=JSON)
            assert answer.status_code == 503, answer.text
            assert "Traceback" not in answer.text
            assert "the database is locked by another session" in answer.text
            assert f"pid {locked}" in answer.text
        events = [r.__dict__.get("event") for r in caplog.records if r.levelname == "WARNING"]
        assert events == ["dashboard.database_locked"] * 2
    finally:
        engine.dispose()


def test_only_the_bounded_transactions_carry_lock_timeout(database: str) -> None:
    """``SET LOCAL``: the bound is the transaction's, so a pooled connection given back, and
    anything outside the block (``run``, the workers, the receiver), waits as before."""
    settings = DatabaseSettings(database_url=database, database_lock_wait=2.5)
    engine = db.make_engine(database, pool_size=1, max_overflow=0)
    try:
        with db.lock_waits_bounded(settings), db.read_scope(engine) as session:
            assert session.execute(text("SHOW lock_timeout")).scalar() == "2500ms"
        with db.read_scope(engine) as session:  # the same pooled connection
            assert session.execute(text("SHOW lock_timeout")).scalar() == "0"
        with db.session_scope(engine) as session:
            assert session.execute(text("SHOW lock_timeout")).scalar() == "0"
            assert session.execute(text("SHOW statement_timeout")).scalar() == "0"
    finally:
        engine.dispose()


def test_a_migration_queued_behind_a_long_read_is_named(database: str) -> None:
    """The usual way it happens: a migration's ALTER TABLE waits for a long transaction, and every
    read of the table queues behind the ALTER. The line names the queued session."""
    settings = DatabaseSettings(database_url=database, database_lock_wait=0.3)
    engine = db.make_engine(database)
    with psycopg.connect(database) as reader, psycopg.connect(database) as migrator:
        reader.execute("SELECT count(*) FROM jobs")  # its transaction stays open
        queued = threading.Thread(
            target=migrator.execute, args=("ALTER TABLE jobs ADD COLUMN pglock_test integer",), daemon=True
        )
        queued.start()
        try:
            _until_queued(database, migrator.info.backend_pid)
            with (
                pytest.raises(DatabaseLockedError) as raised,
                db.lock_waits_bounded(settings),
                db.read_scope(engine) as session,
            ):
                session.execute(text("SELECT count(*) FROM jobs"))
            assert raised.value.pid == migrator.info.backend_pid
            assert (
                f"pid {migrator.info.backend_pid} is queued for an ACCESS EXCLUSIVE lock on table jobs"
                in str(raised.value)
            )
        finally:
            reader.rollback()
            queued.join(DEADLINE)
            migrator.rollback()
            engine.dispose()


def _until_queued(url: str, pid: int) -> None:
    """Until ``pid`` waits for a lock (polled, with a generous deadline)."""
    deadline = time.monotonic() + DEADLINE
    with psycopg.connect(url, autocommit=True) as watcher:
        while True:
            row = watcher.execute(
                "SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted", (pid,)
            ).fetchone()
            if row is not None and row[0]:
                return
            assert time.monotonic() < deadline, f"pid {pid} never queued for its lock"
            time.sleep(0.02)


@pytest.mark.parametrize("case", ["migration-in-progress", "alembic_version-locked"])
def test_doctor_names_the_session_when_its_schema_read_waits(database: str, case: str) -> None:
    """Audit "review1": a lock held on what doctor reads before its lock lookup (the schema
    version, or ``jobs`` for the live processes that hold an upgrade back) was called "cannot
    connect", with the fix "start the database or fix WANBATCH_DATABASE_URL": the check's own
    ``except Exception`` caught the lock timeout before the bound could name the session."""
    with psycopg.connect(database, autocommit=True) as admin:
        head = admin.execute("SELECT version_num FROM alembic_version").fetchone()
        assert head is not None
    with psycopg.connect(database) as holder:
        if case == "migration-in-progress":  # the stored schema is the previous one, the migration runs
            holder.execute("UPDATE alembic_version SET version_num = %s", (f"{int(head[0]) - 1:04d}",))
            holder.commit()
            holder.execute("ALTER TABLE jobs ADD COLUMN review1_test integer")  # left uncommitted
            table = "jobs"
        else:
            holder.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
            table = "alembic_version"
        pid = holder.info.backend_pid
        release = threading.Timer(DEADLINE, holder.rollback)
        release.start()
        try:
            done = wanbatch("doctor", "--simulate", "--json", timeout=DEADLINE)
        finally:
            release.cancel()
            holder.rollback()
    assert done.returncode == 1, done.stderr
    check = {c["name"]: c for c in json.loads(done.stdout)["checks"]}["database"]
    assert check["status"] == "fail"
    assert "cannot connect" not in check["detail"]
    assert "locked by another session" in check["detail"]
    assert f"pid {pid} holds an ACCESS EXCLUSIVE lock on table {table}" in check["detail"]
    assert f"pg_terminate_backend({pid})" in check["fix"]


@pytest.mark.parametrize("seconds", [MAX_LOCK_WAIT_SECONDS, 30 * 86400.0])
def test_the_longest_lock_wait_is_one_postgresql_takes(database: str, seconds: float) -> None:
    """The settings' bound is PostgreSQL's (2147483647 ms); one they would refuse (built past
    them) is clamped, never an "invalid value for parameter lock_timeout" on every read."""
    settings = DatabaseSettings.model_construct(database_url=database, database_lock_wait=seconds)
    engine = db.make_engine(database)
    try:
        with db.lock_waits_bounded(settings), db.read_scope(engine) as session:
            shown = session.execute(text("SHOW lock_timeout")).scalar()
        assert shown == ("2147483s" if seconds == MAX_LOCK_WAIT_SECONDS else "2147483647ms")
    finally:
        engine.dispose()


def test_metrics_scrapes_give_up_and_leave_the_pool_to_the_dashboard(
    database: str, locked: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Audit "review1": ``/metrics`` was not bounded: each scrape under the lock waited for it for
    ever, holding a connection of the pool the dashboard and the webhook receiver share; once
    the pool was taken, the dashboard's pages waited for a connection instead of naming the
    session. Now a scrape gives up after the bound (``wanbatch_database_up 0``, still 200) and
    gives its connection back: more scrapes than the pool holds, then the dashboard's line."""
    engine = db.make_engine(database, pool_size=1, max_overflow=0, pool_timeout=DEADLINE)
    try:
        settings = settings_for(engine, tmp_path / "outputs", database_lock_wait=float(LOCK_WAIT))
        browser = client(create_app(settings, engine=engine))
        for _ in range(3):
            scrape = browser.get("/metrics")
            assert scrape.status_code == 200, scrape.text
            assert "wanbatch_database_up 0.0" in scrape.text
            assert "wanbatch_jobs{" not in scrape.text
        page = browser.get("/", headers=JSON)
        assert page.status_code == 503, page.text
        assert f"the database is locked by another session: pid {locked}" in page.text
        events = [r.__dict__.get("event") for r in caplog.records if r.levelname == "WARNING"]
        assert events.count("metrics.database_locked") == 3
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def test_the_session_that_blocks_another_is_named_before_an_innocent_one(database: str) -> None:
    """Audit "review1": the longest-held strong lock on any table was named (and its pid given to
    ``pg_terminate_backend``), a maintenance session's on ``webhook_deliveries`` that nobody
    waited for, while ``psql``'s ``LOCK TABLE jobs`` held back a worker. The blocker comes first."""
    engine = db.make_engine(database)
    with (
        psycopg.connect(database, application_name="maintenance") as innocent,
        psycopg.connect(database, application_name="psql") as blocker,
        psycopg.connect(database, application_name="worker") as waiter,
    ):
        innocent.execute("LOCK TABLE webhook_deliveries IN ACCESS EXCLUSIVE MODE")
        blocker.execute("SELECT pg_sleep(0.01)")  # its transaction younger than the innocent one's
        blocker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        waiting = threading.Thread(target=waiter.execute, args=("SELECT count(*) FROM jobs",), daemon=True)
        waiting.start()
        release = threading.Timer(DEADLINE, blocker.rollback)
        release.start()
        try:
            _until_queued(database, waiter.info.backend_pid)
            holders = db.lock_holders(engine)
            assert [h.pid for h in holders][:2] == [blocker.info.backend_pid, innocent.info.backend_pid]
            said = str(db.database_locked_error(database, engine))
            assert f"pid {blocker.info.backend_pid} holds an ACCESS EXCLUSIVE lock on table jobs" in said
        finally:
            release.cancel()
            blocker.rollback()
            waiting.join(DEADLINE)
            waiter.rollback()
            innocent.rollback()
            engine.dispose()


# --------------------------------------------------------------------------- whom the command waited for
# Audit "lock-holder": the session was looked up only once the command had given up (its own wait
# over), by ranking the strongest locks on any table. With nobody else waiting, an innocent
# session's older strong lock on a table the command never read (a maintenance `LOCK TABLE
# fal_accounts`, a `VACUUM FULL`) was named, and its pid handed to `pg_terminate_backend`, instead
# of the `LOCK TABLE jobs` the command waited for. Now the command's own backend is watched while it
# waits (`pg_blocking_pids` of its pid, from a second connection), and the line names that session.


@pytest.fixture
def innocent_and_blocker(database: str) -> Iterator[tuple[int, int]]:
    """An innocent session's ACCESS EXCLUSIVE lock on ``fal_accounts`` (which the reading commands
    never read), its transaction the older, then ``psql``'s on ``jobs``: (innocent pid, blocker pid)."""
    with (
        psycopg.connect(database, application_name="maintenance") as innocent,
        psycopg.connect(database, application_name="psql") as blocker,
    ):
        innocent.execute("LOCK TABLE fal_accounts IN ACCESS EXCLUSIVE MODE")
        innocent.execute("SELECT pg_sleep(0.05)")  # its transaction clearly the older one
        blocker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        releases = [threading.Timer(DEADLINE, session.rollback) for session in (innocent, blocker)]
        for release in releases:
            release.start()
        try:
            yield innocent.info.backend_pid, blocker.info.backend_pid
        finally:
            for release in releases:
                release.cancel()
            blocker.rollback()
            innocent.rollback()


@pytest.mark.parametrize(
    "args",
    [("status", "quickstart"), ("cost", "quickstart"), ("export", "quickstart", "--format", "jsonl")],
    ids=lambda args: args[0],
)
def test_the_command_names_the_session_it_waited_for_not_an_innocent_one(
    args: tuple[str, ...], innocent_and_blocker: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    innocent, blocker = innocent_and_blocker
    monkeypatch.setenv("WANBATCH_DATABASE_LOCK_WAIT", WATCHED_WAIT)
    done = wanbatch(*args, timeout=DEADLINE)
    line = assert_one_line(
        done,
        "error: the database is locked by another session: ",
        f"pid {blocker} holds an ACCESS EXCLUSIVE lock on table jobs",
        "application 'psql'",
        "(WANBATCH_DATABASE_LOCK_WAIT)",
    )
    assert f"pid {innocent}" not in line
    assert "more such lock" not in line  # the one session it waited for, no other


def test_the_bound_s_error_carries_the_blocker_s_pid(
    database: str, innocent_and_blocker: tuple[int, int]
) -> None:
    innocent, blocker = innocent_and_blocker
    settings = DatabaseSettings(database_url=database, database_lock_wait=float(WATCHED_WAIT))
    engine = db.make_engine(database)
    try:
        with (
            pytest.raises(DatabaseLockedError) as raised,
            db.lock_waits_bounded(settings),
            db.read_scope(engine) as session,
        ):
            session.execute(text("SELECT count(*) FROM jobs"))
    finally:
        engine.dispose()
    assert raised.value.pid == blocker
    assert f"pid {blocker} holds an ACCESS EXCLUSIVE lock on table jobs" in str(raised.value)
    assert f"pid {innocent}" not in str(raised.value)


def test_a_wait_on_the_innocent_table_names_the_innocent_session(
    database: str, innocent_and_blocker: tuple[int, int]
) -> None:
    """The same two locks, a read of ``fal_accounts``: now that one is the holder."""
    innocent, blocker = innocent_and_blocker
    settings = DatabaseSettings(database_url=database, database_lock_wait=float(WATCHED_WAIT))
    engine = db.make_engine(database)
    try:
        with (
            pytest.raises(DatabaseLockedError) as raised,
            db.lock_waits_bounded(settings),
            db.read_scope(engine) as session,
        ):
            session.execute(text("SELECT count(*) FROM fal_accounts"))
    finally:
        engine.dispose()
    assert raised.value.pid == innocent
    assert f"pid {innocent} holds an ACCESS EXCLUSIVE lock on table fal_accounts" in str(raised.value)
    assert f"pid {blocker}" not in str(raised.value)


def test_the_dashboard_names_the_session_its_page_waited_for(
    database: str, innocent_and_blocker: tuple[int, int], tmp_path: Path
) -> None:
    innocent, blocker = innocent_and_blocker
    engine = db.make_engine(database)
    try:
        settings = settings_for(engine, tmp_path / "outputs", database_lock_wait=float(LOCK_WAIT))
        answer = client(create_app(settings, engine=engine)).get("/batches/quickstart", headers=JSON)
    finally:
        engine.dispose()
    assert answer.status_code == 503, answer.text
    assert f"pid {blocker} holds an ACCESS EXCLUSIVE lock on table jobs" in answer.text
    assert f"pid {innocent}" not in answer.text


def _bounded_read(database: str, sql: str) -> DatabaseLockedError:
    settings = DatabaseSettings(database_url=database, database_lock_wait=float(LOCK_WAIT))
    engine = db.make_engine(database)
    try:
        with (
            pytest.raises(DatabaseLockedError) as raised,
            db.lock_waits_bounded(settings),
            db.read_scope(engine) as session,
        ):
            session.execute(text(sql))
    finally:
        engine.dispose()
    return raised.value


def test_a_serializable_session_s_lock_leaves_the_watcher_watching(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit "clock-review": a SERIALIZABLE session that read ``jobs`` holds a relation-level
    ``SIReadLock`` on it besides its ``LOCK TABLE``; ranking that mode raised ValueError in the
    watcher's thread (a traceback on stderr), whose flag stayed set: no watcher started again in
    that process, and every later bounded read named an innocent session. The mode is ranked the
    weakest, a look that fails is said at debug level, and the next read is watched again."""
    died: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", died.append)
    with psycopg.connect(database, application_name="etl-serializable") as etl:
        etl.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        etl.execute("SELECT count(*) FROM jobs")
        etl.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        serializable = etl.info.backend_pid
        release = threading.Timer(DEADLINE, etl.rollback)
        release.start()
        try:
            modes = {row[0] for row in etl.execute("SELECT mode FROM pg_locks WHERE pid = pg_backend_pid()")}
            assert "SIReadLock" in modes  # the row the watcher meets
            first = _bounded_read(database, "SELECT count(*) FROM jobs")
        finally:
            release.cancel()
            etl.rollback()
    assert first.pid == serializable
    assert f"pid {serializable} holds an ACCESS EXCLUSIVE lock on table jobs" in str(first)
    with (
        psycopg.connect(database, application_name="maintenance") as innocent,
        psycopg.connect(database, application_name="psql") as blocker,
    ):
        innocent.execute("LOCK TABLE fal_accounts IN ACCESS EXCLUSIVE MODE")
        innocent.execute("SELECT pg_sleep(0.05)")  # its transaction clearly the older one
        blocker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        pids = innocent.info.backend_pid, blocker.info.backend_pid
        releases = [threading.Timer(DEADLINE, session.rollback) for session in (innocent, blocker)]
        for release in releases:
            release.start()
        try:
            second = _bounded_read(database, "SELECT count(*) FROM jobs")
        finally:
            for release in releases:
                release.cancel()
            blocker.rollback()
            innocent.rollback()
    assert second.pid == pids[1], str(second)
    assert f"pid {pids[0]}" not in str(second)
    assert died == []  # no thread ended on an error


def test_a_lock_mode_no_table_lock_has_is_ranked_the_weakest() -> None:
    """The ranking itself: a ``SIReadLock`` row (or any mode PostgreSQL may add) is no error,
    and a strong lock of the same session is the one named."""
    wait = ("relation", "AccessShareLock", "jobs")  # what the waiter asks for, on which table
    rows = [
        (1, 7, *wait, "SIReadLock", True, "idle in transaction", "etl", 3.0),
        (1, 7, *wait, "AccessExclusiveLock", True, "idle in transaction", "etl", 3.0),
        (2, 8, *wait, "SIReadLock", True, "active", None, 1.0),
    ]
    found = db._blockers_by_waiter(rows)
    assert [(h.pid, h.mode) for h in found[1]] == [(7, "AccessExclusiveLock")]
    assert [(h.pid, h.mode) for h in found[2]] == [(8, "SIReadLock")]


# --------------------------------------------------------------------------- what doctor fails on
# Audit "lock-holder": doctor failed its database check on any strong lock on any table of the
# database, blocking someone or not: an ETL tool's uncommitted `CREATE TABLE` (an ACCESS EXCLUSIVE
# lock on its own new table), a `LOCK TABLE` on a table that is not wanbatch's, a SHARE lock on
# `alembic_version` (which wanbatch only reads, until an upgrade). Now it fails on what would block
# wanbatch: a lock on one of its tables that its reads or its workers' writes wait for.


def _doctor_database_check() -> dict[str, str]:
    done = wanbatch("doctor", "--simulate", "--json", timeout=DEADLINE)
    assert "Traceback" not in done.stderr, done.stderr
    checks: dict[str, dict[str, str]] = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    return checks["database"]


@pytest.mark.parametrize(
    "statements",
    [
        # an ordinary open transaction that wrote to jobs: a ROW EXCLUSIVE lock
        ["LOCK TABLE jobs IN ROW EXCLUSIVE MODE"],
        # VACUUM, ANALYZE, CREATE INDEX CONCURRENTLY: SHARE UPDATE EXCLUSIVE, no read or write waits
        ["LOCK TABLE jobs IN SHARE UPDATE EXCLUSIVE MODE"],
        # a table of someone else's in the same database
        ["LOCK TABLE operator_reports IN ACCESS EXCLUSIVE MODE"],
        # wanbatch only reads alembic_version (an upgrade writes it)
        ["LOCK TABLE alembic_version IN SHARE MODE"],
    ],
    ids=["row-exclusive-jobs", "share-update-exclusive-jobs", "other-table", "share-alembic"],
)
def test_doctor_passes_over_a_lock_that_blocks_nothing_wanbatch_does(
    database: str, statements: list[str]
) -> None:
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute("CREATE TABLE operator_reports (x integer)")
    with psycopg.connect(database, application_name="etl") as other:
        for statement in statements:
            other.execute(statement)
        release = threading.Timer(DEADLINE, other.rollback)
        release.start()
        try:
            check = _doctor_database_check()
        finally:
            release.cancel()
            other.rollback()
    assert check["status"] == "ok", check
    assert "locked" not in check["detail"]


@pytest.mark.parametrize(
    ("statement", "table", "mode"),
    [
        ("LOCK TABLE jobs IN SHARE MODE", "jobs", "a SHARE"),  # a plain CREATE INDEX
        ("LOCK TABLE batches IN EXCLUSIVE MODE", "batches", "an EXCLUSIVE"),
        (
            "LOCK TABLE webhook_deliveries IN SHARE ROW EXCLUSIVE MODE",
            "webhook_deliveries",
            "a SHARE ROW EXCLUSIVE",
        ),
    ],
    ids=["share-jobs", "exclusive-batches", "share-row-exclusive-webhook_deliveries"],
)
def test_doctor_fails_on_a_lock_the_workers_writes_would_wait_for(
    database: str, statement: str, table: str, mode: str
) -> None:
    """Nobody waits yet, and doctor's own reads go on: but the next write of that table (a
    worker's, ``run``'s, the webhook receiver's) would wait for as long as the session stays."""
    with psycopg.connect(database, application_name="psql") as holder:
        holder.execute(statement)
        pid = holder.info.backend_pid
        release = threading.Timer(DEADLINE, holder.rollback)
        release.start()
        try:
            check = _doctor_database_check()
        finally:
            release.cancel()
            holder.rollback()
    assert check["status"] == "fail", check
    assert f"locked by another session: pid {pid} holds {mode} lock on table {table}" in check["detail"]
    assert (
        f"the workers, `run` and the webhook receiver wait for it to write table {table}" in check["detail"]
    )
    assert "reads go on" in check["detail"]
    assert f"pg_terminate_backend({pid})" in check["fix"]


def test_a_wait_the_watcher_never_saw_names_the_lock_on_the_statement_s_table(
    database: str, innocent_and_blocker: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a loaded machine the watcher's thread and connection took longer to start than the wait
    lasted (CI: `export` named the innocent's older lock on ``fal_accounts``, "and 1 more"). The
    fallback now keeps the locks on the tables the statement that gave up names."""
    innocent, blocker = innocent_and_blocker
    monkeypatch.setattr(db._LockWatch, "began", lambda self, pid, url: None)  # never looked at
    settings = DatabaseSettings(database_url=database, database_lock_wait=float(LOCK_WAIT))
    engine = db.make_engine(database)
    try:
        with (
            pytest.raises(DatabaseLockedError) as raised,
            db.lock_waits_bounded(settings),
            db.read_scope(engine) as session,
        ):
            session.execute(text('SELECT count(*) FROM "jobs" WHERE jobs.id > 0'))
    finally:
        engine.dispose()
    assert raised.value.pid == blocker
    assert f"pid {blocker} holds an ACCESS EXCLUSIVE lock on table jobs" in str(raised.value)
    assert f"pid {innocent}" not in str(raised.value)
    assert "more such lock" not in str(raised.value)


def test_the_tables_of_a_statement_are_told_from_names_that_contain_them() -> None:
    def holder(table: str) -> db.LockHolder:
        return db.LockHolder(
            pid=1,
            table=table,
            mode="AccessExclusiveLock",
            granted=True,
            state=None,
            application=None,
            held_for=None,
        )

    holders = [holder("jobs"), holder("job_events"), holder("batches")]
    assert db._on_tables_of("SELECT * FROM job_events", holders) == [holders[1]]
    assert db._on_tables_of("SELECT jobs_total FROM batches", holders) == [holders[2]]
    assert db._on_tables_of('SELECT 1 FROM public."jobs"', holders) == [holders[0]]
    assert db._on_tables_of("SELECT 1 FROM fal_accounts", holders) == holders  # none: all kept
