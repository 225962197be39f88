"""A submit fal accepted whose record the database refuses — not an outage, not a full disk —
keeps its request id in the journal of accepted submissions (:mod:`worker.steps.unrecorded`).

Before, only an ``OperationalError`` (an outage, a full disk) kept it: any other failure of the
record after fal's answer — a constraint or a trigger refusing the write (``IntegrityError``), a
value out of range (``DataError``), a trigger's ``RAISE`` (``InternalError``), a schema
downgraded under the worker (``UndefinedColumn``), a bug on the way — escaped the step, and the
request id with it: the job was found ``submitting`` without it, its outcome "unknown", which a
resend policy pays twice. And a journal entry the database refused failed every round of the
reconciler, with a traceback.

Now every failure but a committed record keeps it, said in one line naming the error; this
process tries it again every ``REFUSED_RETRY_SECONDS`` and leaves its job alone meanwhile (never
"unknown", never sent again); the next run or worker on this host records a journal left
behind once the database takes it (an entry it still refuses stays in the file, the others
leave it); a schema older than this wanbatch's says what to do, and this process stops.

Real SQLite and PostgreSQL: a trigger refuses the UPDATE that writes the request id, a
downgrade drops a column the record reads, between fal's answer and the record.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from jobs import db, store
from jobs.db import SCHEMA_HEAD, downgrade, make_engine, migrate
from jobs.models import utcnow
from tests.hostile import HostileProvider, Recorded
from tests.hostile_fal import accept_submits, accepted_reply
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.steps import Runtime, dispatch, reconcile, submit
from worker.steps import unrecorded as unrecorded_module
from worker.steps.unrecorded import PREFIX, SUFFIX, Accepted, database_key, read_journal

T2V = "fal-ai/wan-22"
KEY = "unrecordable-key-5c1e"


@pytest.fixture(autouse=True)
def _journals_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL run's journals (and crash files) go to the temporary folder: this test's."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _journals(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{PREFIX}*{SUFFIX}"))


def _job(engine: Engine, job_id: str) -> tuple[str, str | None]:
    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
        return str(job.state), job.request_id


def _expire_lease(engine: Engine, job_id: str) -> None:
    """The job's lease ran out (as it does, minutes after its step gave up)."""
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET lease_expires_at = :past WHERE id = :id"),
            {"past": utcnow() - timedelta(hours=1), "id": job_id},
        )


def _refusing(engine: Engine, request_id: str | None = None, sqlstate: str = "23514") -> Callable[[], None]:
    """A trigger that refuses the UPDATE writing a request id to a job (that one only, when
    given): the database's own error (SQLite: ``RAISE(ABORT)``, an ``IntegrityError``;
    PostgreSQL: ``RAISE … USING ERRCODE = sqlstate``). Returns what drops it."""
    name = f"refuse_{uuid.uuid4().hex[:8]}"
    when = "NEW.request_id IS NOT NULL" if request_id is None else f"NEW.request_id = '{request_id}'"
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(
                text(
                    f"CREATE TRIGGER {name} BEFORE UPDATE ON jobs WHEN {when} "
                    "BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
                )
            )
        else:
            conn.execute(
                text(
                    f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    f"RAISE EXCEPTION 'refused by a test trigger' USING ERRCODE = '{sqlstate}'; END $$"
                )
            )
            conn.execute(
                text(
                    f"CREATE TRIGGER {name} BEFORE UPDATE ON jobs FOR EACH ROW WHEN ({when}) "
                    f"EXECUTE FUNCTION {name}()"
                )
            )

    def drop() -> None:
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.execute(text(f"DROP TRIGGER IF EXISTS {name}"))
            else:
                conn.execute(text(f"DROP TRIGGER IF EXISTS {name} ON jobs"))
                conn.execute(text(f"DROP FUNCTION IF EXISTS {name}()"))

    return drop


@pytest.fixture
def refusals(engine: Engine) -> Iterator[list[Callable[[], None]]]:
    """Triggers a test installs, dropped afterwards (the PostgreSQL database is shared)."""
    drops: list[Callable[[], None]] = []
    yield drops
    for drop in drops:
        drop()


def _runtime(engine: Engine, hostile: HostileProvider, url: str | None = None) -> Runtime:
    settings = settings_for(hostile.url, KEY, **({"database_url": url} if url else {}))
    return make_runtime(engine, settings)


def _events(
    caplog: pytest.LogCaptureFixture, event: str, level: int = logging.DEBUG
) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.__dict__.get("event") == event and r.levelno >= level]


def _loud(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_write_the_database_refuses_is_kept_and_recorded_once_it_takes_it(
    engine: Engine,
    db_url: str,
    hostile: HostileProvider,
    refusals: list[Callable[[], None]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Tried again at every reconcile (not every 30 s), to see it tried while still refused.
    monkeypatch.setattr(unrecorded_module, "REFUSED_RETRY_SECONDS", 0.0, raising=False)
    request_id = str(uuid.uuid4())
    accept_submits(hostile, request_id)
    rt = _runtime(engine, hostile, db_url)
    add_batch(engine, "refused", [(T2V, {"prompt": "a harbour at dawn"})])
    (job_id,) = dispatch(rt)
    drop = _refusing(engine)
    refusals.append(drop)

    with caplog.at_level(logging.DEBUG):
        assert submit(rt, job_id) == "unrecorded"  # was: IntegrityError out of the step, the id lost
    (line,) = _events(caplog, "submit.unrecorded", logging.ERROR)
    said = line.getMessage()
    assert "\n" not in said
    assert line.exc_info is None
    assert f"request {request_id}, which could not be recorded: the database refused the write (" in said
    assert "refused by a test trigger" in said
    (journal,) = _journals(tmp_path)
    assert f"kept in {journal}: " in said
    assert [e.request_id for e in read_journal(journal) or []] == [request_id]
    assert _job(engine, job_id) == ("submitting", None)
    assert (rt.unrecorded.note() or "").startswith(
        f"1 accepted submission(s) the database refused to record: kept in {journal}"
    )

    # Its lease runs out while the database still refuses: the reconciler leaves the job alone
    # (it was "the worker was lost during the POST", then failed or sent again by the policy),
    # tries the record again (every REFUSED_RETRY_SECONDS: here at once), quietly.
    _expire_lease(engine, job_id)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        reconcile(rt)
        reconcile(rt)
    assert _job(engine, job_id) == ("submitting", None)
    assert _loud(caplog) == []
    assert len(_events(caplog, "submit.unrecorded")) == 2  # tried, and said so at DEBUG only
    assert [e.request_id for e in read_journal(journal) or []] == [request_id]

    drop()  # the database takes it again
    with caplog.at_level(logging.DEBUG):
        assert reconcile(rt) == 1
    assert _job(engine, job_id) == ("queued", request_id)
    (adopted,) = _events(caplog, "submit.adopted")
    assert adopted.getMessage().endswith("recorded: recorded late by the process that sent it")
    assert _journals(tmp_path) == []
    assert rt.unrecorded.waiting() == []
    assert rt.unrecorded.note() is None
    assert hostile.count("POST", ".*") == 1  # nothing sent again


@pytest.mark.parametrize(
    ("sqlstate", "error"),
    [
        ("23514", "CheckViolation"),  # IntegrityError
        ("22003", "NumericValueOutOfRange"),  # DataError: a value out of range
        ("P0001", "RaiseException"),  # InternalError: a trigger's plain RAISE
        ("XX001", "DataCorrupted"),  # InternalError
        ("42501", "InsufficientPrivilege"),  # ProgrammingError
        ("0A000", "FeatureNotSupported"),  # NotSupportedError
    ],
)
def test_every_refusal_of_postgresql_keeps_the_accepted_id(
    pg_url: str,
    request: pytest.FixtureRequest,
    hostile: HostileProvider,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    sqlstate: str,
    error: str,
) -> None:
    from tests.conftest import _empty

    engine: Engine = request.getfixturevalue("_pg_engine")  # the run's database, migrated
    _empty(engine)
    request_id = str(uuid.uuid4())
    accept_submits(hostile, request_id)
    rt = _runtime(engine, hostile, pg_url)
    add_batch(engine, f"refused-{sqlstate}", [(T2V, {"prompt": "a lighthouse"})])
    (job_id,) = dispatch(rt)
    drop = _refusing(engine, sqlstate=sqlstate)
    try:
        with caplog.at_level(logging.INFO):
            assert submit(rt, job_id) == "unrecorded"
    finally:
        drop()
        _empty(engine)
    (line,) = _events(caplog, "submit.unrecorded", logging.ERROR)
    assert f"the database refused the write ({error}: refused by a test trigger)" in line.getMessage()
    (journal,) = _journals(tmp_path)
    assert [e.request_id for e in read_journal(journal) or []] == [request_id]


def _left_behind(folder: Path, url: str, entries: list[Accepted]) -> Path:
    """A journal a process that ended left (its pid beyond any Linux pid_max)."""
    path = folder / f"{PREFIX}{database_key(url)}-99999999-1{SUFFIX}"
    path.write_text("".join(e.as_json() + "\n" for e in entries))
    return path


def _sent(engine: Engine, rt: Runtime, job_id: str, request_id: str) -> Accepted:
    """``job_id`` as a process that sent it and ended leaves it: ``submitting``, its input
    recorded, its lease run out; and what fal answered it."""
    now = utcnow()
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.take_lease(
            session, rt.fence(job), now=now, lease_seconds=0.0, submitted_input=dict(job.input), sent_at=now
        )
    return Accepted(
        job_id=job_id,
        attempt=1,
        request_id=request_id,
        gateway_request_id=None,
        status_url=None,
        response_url=None,
        cancel_url=None,
        running=False,
        submitted_at=now,
    )


def test_a_journal_entry_the_database_refuses_stays_and_its_job_is_left_alone(
    engine: Engine,
    db_url: str,
    hostile: HostileProvider,
    refusals: list[Callable[[], None]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Was: the entry's IntegrityError failed the whole reconcile — every round of the
    conductor, with a traceback — and the other entries of the file were not recorded either."""
    monkeypatch.setattr(unrecorded_module, "SCAN_SECONDS", 0.0)  # every reconcile looks
    rt = _runtime(engine, hostile, db_url)
    add_batch(engine, "left", [(T2V, {"prompt": f"a quiet bay {i}"}) for i in range(2)])
    refused_job, taken_job = dispatch(rt)
    refused = _sent(engine, rt, refused_job, str(uuid.uuid4()))
    taken = _sent(engine, rt, taken_job, str(uuid.uuid4()))
    journal = _left_behind(tmp_path, db_url, [refused, taken])
    drop = _refusing(engine, refused.request_id)
    refusals.append(drop)

    with caplog.at_level(logging.DEBUG):
        assert reconcile(rt) == 1
        reconcile(rt)
    assert _job(engine, taken_job) == ("queued", taken.request_id)
    assert _job(engine, refused_job) == ("submitting", None)  # not "the worker was lost during the POST"
    assert read_journal(journal) == [refused]  # only the refused one stays
    assert [r.__dict__.get("event") for r in _loud(caplog)] == ["submit.unrecorded", "submit.adopted"]
    (line,) = _events(caplog, "submit.unrecorded", logging.WARNING)  # said once, not at every look
    assert line.levelno == logging.ERROR
    assert line.exc_info is None
    assert line.getMessage().startswith(
        f"{refused.line()} still cannot be recorded: the database refused the write ("
    )
    assert f"kept in {journal}, tried again every " in line.getMessage()

    drop()
    assert reconcile(rt) == 1
    assert _job(engine, refused_job) == ("queued", refused.request_id)
    assert _journals(tmp_path) == []
    assert hostile.count("POST", ".*") == 0


def test_a_bug_in_the_record_keeps_the_accepted_id(
    sqlite_url: str,
    hostile: HostileProvider,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a database error at all: the id is kept, the bug said in one line (its traceback in
    a crash file), and the record made by the reconciler's own way (``adopt_request``)."""
    engine = make_engine(sqlite_url)
    migrate(engine)
    try:
        request_id = str(uuid.uuid4())
        accept_submits(hostile, request_id)
        rt = _runtime(engine, hostile, sqlite_url)
        add_batch(engine, "bug", [(T2V, {"prompt": "a paper boat"})])
        (job_id,) = dispatch(rt)

        def broken(*_args: Any, **_kwargs: Any) -> bool:
            raise RuntimeError("a bug in the record")

        monkeypatch.setattr(store, "mark_submitted", broken)
        with caplog.at_level(logging.INFO):
            assert submit(rt, job_id) == "unrecorded"  # was: RuntimeError out of the step, the id lost
        (line,) = _events(caplog, "submit.unrecorded", logging.ERROR)
        said = line.getMessage()
        bug = "a bug: RuntimeError: a bug in the record (please report it; details in "
        assert f"which could not be recorded: {bug}" in said
        (crash,) = tmp_path.glob("wanbatch-crash-*.txt")
        assert "a bug in the record" in crash.read_text()
        (journal,) = _journals(tmp_path)
        assert [e.request_id for e in read_journal(journal) or []] == [request_id]

        assert reconcile(rt) == 0  # tried again only REFUSED_RETRY_SECONDS later
        assert _job(engine, job_id) == ("submitting", None)
        monkeypatch.setattr(unrecorded_module, "REFUSED_RETRY_SECONDS", 0.0, raising=False)
        rt.unrecorded.refused(rt.unrecorded.waiting()[0])  # as if that time had passed
        assert reconcile(rt) == 1
        assert _job(engine, job_id) == ("queued", request_id)
        assert _journals(tmp_path) == []
    finally:
        engine.dispose()


#: Below 0035, ``jobs.fal_origin`` is gone: the record of a submit reads it (``request_holder``).
_PREVIOUS = "0034"


@pytest.fixture(params=["sqlite", "postgresql"])
def own_database(
    request: pytest.FixtureRequest, tmp_path: Path, new_pg_database: Callable[[], str]
) -> Iterator[tuple[Engine, str]]:
    url = f"sqlite:///{tmp_path / 'd.db'}" if request.param == "sqlite" else new_pg_database()
    engine = make_engine(url)
    migrate(engine, from_models=False)
    yield engine, url
    engine.dispose()


def test_a_schema_downgraded_between_the_post_and_its_record(
    own_database: tuple[Engine, str],
    hostile: HostileProvider,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``alembic downgrade`` under a running worker, while fal was answering its submit. Was
    (PostgreSQL): ``UndefinedColumn`` out of the step, the id lost; (SQLite) "no such column"
    taken for an outage, retried for a minute and more. Now the id is kept at once, the line says
    what to do, and this process stops working on that database (``Runtime.schema_behind``);
    this version's next process records it once the schema is upgraded again."""
    engine, url = own_database
    request_id = str(uuid.uuid4())
    reply = accepted_reply(hostile.url, request_id)

    def downgraded_then_accepted(req: Recorded, sock: socket.socket) -> None:
        downgrade(engine, _PREVIOUS)
        reply(req, sock)

    hostile.route("POST", rf"/{T2V}", downgraded_then_accepted)
    rt = _runtime(engine, hostile, url)
    add_batch(engine, "downgraded", [(T2V, {"prompt": "a harbour at dusk"})])
    (job_id,) = dispatch(rt)

    with caplog.at_level(logging.INFO):
        assert submit(rt, job_id) == "unrecorded"
    assert rt.schema_behind is not None
    assert rt.schema_behind.startswith(
        f"the database is at schema {_PREVIOUS}, older than this wanbatch's {SCHEMA_HEAD}"
    )
    (line,) = _events(caplog, "submit.unrecorded", logging.ERROR)
    said = line.getMessage()
    assert f"which could not be recorded: {rt.schema_behind}; kept in " in said
    assert db.SCHEMA_BEHIND_FIX in said
    assert "this version's next run or worker on this host records it then" in said
    (journal,) = _journals(tmp_path)
    assert [e.request_id for e in read_journal(journal) or []] == [request_id]

    # The process stops (its conductor: SchemaBehindError); the schema is upgraded again; the
    # next process of this version on this host records the journal it left.
    journal.rename(journal.with_name(f"{PREFIX}{database_key(url)}-99999999-1{SUFFIX}"))
    migrate(engine)
    with caplog.at_level(logging.INFO):
        assert reconcile(_runtime(engine, hostile, url)) == 1
    assert _job(engine, job_id) == ("queued", request_id)
    assert _journals(tmp_path) == []
    assert hostile.count("POST", ".*") == 1
