"""Wake-ups across processes (:func:`jobs.db.notify_events`, :class:`worker.notifications.EventListener`)
on the real PostgreSQL: delivered at commit, never on rollback, and heard again after the
listening connection was killed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine

from jobs.db import make_engine, notify_events, session_scope
from worker.notifications import EventListener

#: Long enough never to be reached when a notice is on its way; a missing one fails the test.
PATIENCE = 10.0


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def listener(pg_url: str) -> Iterator[EventListener]:
    with EventListener(pg_url) as listening:
        yield listening


def _notify(engine: Engine, *payloads: str, fail: bool = False) -> None:
    with session_scope(engine) as session:
        for payload in payloads:
            notify_events(session, payload)
        if fail:
            raise RuntimeError("roll back")


def test_a_committed_notice_reaches_a_listener_in_another_session(
    pg_engine: Engine, listener: EventListener
) -> None:
    assert listener.enabled
    _notify(pg_engine, "submitted:job-1", "done:job-2")
    heard = listener.wait(PATIENCE)
    while len(heard) < 2:
        more = listener.wait(PATIENCE)
        assert more, f"only {heard} arrived"
        heard += more
    assert heard == ["submitted:job-1", "done:job-2"]


def test_a_rolled_back_notice_is_never_delivered(pg_engine: Engine, listener: EventListener) -> None:
    with pytest.raises(RuntimeError):
        _notify(pg_engine, "done:rolled-back", fail=True)
    _notify(pg_engine, "done:committed")  # a marker: everything sent before it has arrived by then
    assert listener.wait(PATIENCE) == ["done:committed"]


def test_a_listener_whose_connection_was_killed_reconnects_and_hears_later_notices(
    pg_url: str, pg_engine: Engine, listener: EventListener
) -> None:
    killed = listener.backend_pid
    assert killed is not None
    with psycopg.connect(pg_url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (killed,)).fetchone() == (True,)
    assert listener.wait(PATIENCE) == []  # the loss is noticed, the connection opened again
    assert listener.reconnects == 1
    assert listener.backend_pid not in (None, killed)
    _notify(pg_engine, "freed:job-3")
    assert listener.wait(PATIENCE) == ["freed:job-3"]


def test_without_postgresql_there_is_nothing_to_hear(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        _notify(engine, "done:job-4")  # runs nothing on SQLite
    finally:
        engine.dispose()
    with EventListener(sqlite_url) as listening:
        assert not listening.enabled
        assert listening.backend_pid is None
        assert listening.wait(0.01) == []


def test_a_task_tells_the_leader_in_one_statement_without_a_transaction(
    pg_engine: Engine, listener: EventListener
) -> None:
    """A task whose tick leader runs in another process tells it over the database once its step
    has committed: one ``pg_notify`` in autocommit (no ``BEGIN``/``COMMIT`` round trips of a unit of
    work of its own), heard by the leader's listener; the pooled connection goes back to
    transactions for the next unit of work."""
    from sqlalchemy import event, text

    from worker.tasks import _notifier

    statuses: list[tuple[str, psycopg.pq.TransactionStatus]] = []

    @event.listens_for(pg_engine, "after_cursor_execute")
    def _status(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        statuses.append((statement.split("(")[0], conn.connection.dbapi_connection.info.transaction_status))

    _notifier(pg_engine)("submitted", "job-7")
    assert listener.wait(PATIENCE) == ["submitted:job-7"]
    with session_scope(pg_engine) as session:
        session.execute(text("SELECT 1"))
    idle, in_transaction = psycopg.pq.TransactionStatus.IDLE, psycopg.pq.TransactionStatus.INTRANS
    assert statuses == [("SELECT pg_notify", idle), ("SELECT 1", in_transaction)]
