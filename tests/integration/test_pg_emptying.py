"""The suite's own PostgreSQL house-keeping (``tests/conftest.py``): what the ``engine`` fixture
empties between tests, and the databases ``new_pg_database`` drops at the end of a run.

``_empty`` truncates only when there is something to truncate (a TRUNCATE of every table took a
third of a second, twice per PostgreSQL test, on tables mostly empty already); it must still
leave every table empty and every sequence restarted, whatever the test before left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

from jobs.models import Batch
from tests.conftest import PG_ADMIN_DSN, _drop_databases, _empty

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_engine(_pg_engine: Engine) -> Iterator[Engine]:
    _empty(_pg_engine)
    yield _pg_engine
    _empty(_pg_engine)


def _statements(engine: Engine) -> Callable[[], list[str]]:
    """Start recording the statements ``engine`` runs; the returned function stops and gives them."""
    seen: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", record)

    def stop() -> list[str]:
        event.remove(engine, "before_cursor_execute", record)
        return seen

    return stop


def test_empty_tables_and_unused_sequences_are_not_truncated(pg_engine: Engine) -> None:
    stop = _statements(pg_engine)
    _empty(pg_engine)
    assert "TRUNCATE" not in stop()


def test_rows_left_by_a_test_are_truncated(pg_engine: Engine) -> None:
    with Session(pg_engine) as session:
        session.add(Batch(name="left-behind", manifest_path="/m.yaml", manifest_sha256="0" * 64))
        session.commit()
    stop = _statements(pg_engine)
    _empty(pg_engine)
    assert "TRUNCATE" in stop()
    with pg_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM batches")).scalar_one() == 0


def test_a_sequence_used_without_a_row_left_is_restarted(pg_engine: Engine) -> None:
    with pg_engine.begin() as conn:  # an id drawn and its row rolled back or deleted: no row left
        assert conn.execute(text("SELECT nextval('job_events_id_seq')")).scalar_one() == 1
        conn.execute(text("SELECT nextval('job_events_id_seq')"))
    _empty(pg_engine)
    with pg_engine.begin() as conn:
        assert conn.execute(text("SELECT nextval('job_events_id_seq')")).scalar_one() == 1
    _empty(pg_engine)


def _exists(name: str) -> bool:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def test_the_databases_of_a_run_are_all_dropped_even_with_connections_open(
    new_pg_database: Callable[[], str],
) -> None:
    urls = [new_pg_database() for _ in range(3)]
    names = [url.rsplit("/", 1)[1] for url in urls]
    held = psycopg.connect(urls[0])  # a connection a test left open (WITH (FORCE) ends it)
    try:
        _drop_databases(names)
    finally:
        held.close()
    assert [name for name in names if _exists(name)] == []
    _drop_databases(names)  # dropped already (the run's end drops them again): no error
