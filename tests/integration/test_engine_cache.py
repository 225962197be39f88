"""The engines ``open_engine`` keeps are disposed of when dropped, never left to the garbage
collector with their pooled connections open (a test process opening many databases ran the
shared PostgreSQL out of connections: "sorry, too many clients already")."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, text

from jobs import db
from jobs.settings import DatabaseSettings


def _used(url: str) -> Engine:
    engine = db.open_engine(DatabaseSettings(database_url=url))
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    return engine


def _backends(url: str) -> int:
    """Connections the server holds open to ``url``'s database."""
    name = url.rsplit("/", 1)[1]
    admin = db.make_engine(url)
    try:
        with admin.connect() as conn:
            found = conn.execute(
                text(
                    "select count(*) from pg_stat_activity where datname = :name and pid <> pg_backend_pid()"
                ),
                {"name": name},
            ).scalar_one()
    finally:
        admin.dispose()
    return int(found)


def test_forgetting_the_engines_closes_their_connections(new_pg_database: Callable[[], str]) -> None:
    url = new_pg_database()
    db.close_engines()
    try:
        _used(url)
        assert _backends(url) >= 1  # the pool keeps its connection for the next unit of work
        db.close_engines()
        assert _backends(url) == 0
    finally:
        db.close_engines()


def test_an_engine_dropped_for_a_newer_one_is_disposed_of(new_pg_database: Callable[[], str]) -> None:
    first = new_pg_database()
    db.close_engines()
    try:
        _used(first)
        for _ in range(db._Engines.KEPT):
            _used(new_pg_database())
        assert _backends(first) == 0  # the oldest engine went, and its connections with it
    finally:
        db.close_engines()
