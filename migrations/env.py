"""Alembic environment for wanbatch.

``jobs.db.migrate`` passes an open connection in ``config.attributes["connection"]`` (inside a
transaction it already holds a migration lock on); the ``alembic`` command line passes nothing,
and then the URL is ``sqlalchemy.url`` from the ini file or, normally, ``WANBATCH_DATABASE_URL``.
Logging is deliberately not configured here: the application owns it.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from jobs.db import make_engine, normalize_url, references_unchecked
from jobs.models import Base
from jobs.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().database_url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    """Print the SQL instead of running it (``alembic upgrade head --sql``)."""
    url = normalize_url(_url())
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.get_backend_name() == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        _configure(given)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        # SQLite's foreign keys, on at connect, off while tables are rebuilt (as ``migrate`` does).
        with engine.connect() as connection, references_unchecked(connection):
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
