"""What a first start does to a new database, counted statement by statement (issue #11's CPU line).

A first ``wanbatch run`` on a fresh SQLite file creates the schema from the models
(:func:`jobs.db.migrate`). The tables the database has are read once, and once more under the
lock; creating them then must not look every table up again (SQLAlchemy's ``checkfirst``: two
``PRAGMA table_info`` per table on SQLite, a catalogue query per table on PostgreSQL).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect

from jobs.db import SCHEMA_HEAD, make_engine, migrate
from jobs.models import Base


def _statements_of_a_first_migrate(url: str) -> tuple[list[str], set[str], set[str]]:
    """(every statement :func:`migrate` ran on a new database, its tables after, its revision)."""
    engine = make_engine(url)
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        migrate(engine)
        event.remove(engine, "before_cursor_execute", record)
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            stamped = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars()
            heads = {str(v) for v in stamped}
    finally:
        engine.dispose()
    return seen, tables, heads


def test_a_new_sqlite_database_is_created_without_looking_each_table_up(tmp_path: Path) -> None:
    seen, tables, heads = _statements_of_a_first_migrate(f"sqlite:///{tmp_path / 'wanbatch.db'}")
    assert set(Base.metadata.tables) | {"alembic_version"} <= tables  # it did create the schema
    assert heads == {SCHEMA_HEAD}
    creates = [s for s in seen if s.startswith("CREATE TABLE")]
    assert len(creates) == len(Base.metadata.tables) + 1  # the models' and alembic_version
    lookups = [s for s in seen if "table_info" in s]
    assert lookups == [], f"{len(lookups)} per-table lookups, e.g. {lookups[:2]}"
    listings = [s for s in seen if "FROM sqlite_master" in s]
    assert len(listings) == 2  # once to decide, once under the lock


def test_a_second_migrate_of_the_created_database_changes_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'wanbatch.db'}"
    _statements_of_a_first_migrate(url)
    seen, tables, heads = _statements_of_a_first_migrate(url)
    assert heads == {SCHEMA_HEAD}
    assert not [s for s in seen if s.startswith(("CREATE", "INSERT", "DROP", "ALTER"))]
    assert set(Base.metadata.tables) <= tables
