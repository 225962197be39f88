"""A read-only URL of a test's database: SQLite's ``?mode=ro``; on PostgreSQL a session setting,
``default_transaction_read_only = on`` in the connection's ``options`` (every engine opened from
the URL, the use cases' own too, is read-only; the shared server is not reconfigured)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, text

#: libpq's ``options``: the session starts with ``default_transaction_read_only = on``.
PG_READ_ONLY_OPTIONS = "-c default_transaction_read_only=on"


def read_only_url(engine: Engine) -> str:
    """``engine``'s database, read-only, as a ``WANBATCH_DATABASE_URL``."""
    if engine.dialect.name == "sqlite":
        return f"sqlite:///{engine.url.database}?mode=ro"
    url = engine.url.update_query_dict({"options": PG_READ_ONLY_OPTIONS})
    return url.render_as_string(hide_password=False)


_NAMED = "WHERE name = :name"


@contextmanager
def secret_removed(engine: Engine, name: str) -> Iterator[None]:
    """``engine``'s instance secret ``name`` deleted for the block, then put back: the test
    database outlives the test (emptied between tests, its instance secrets kept), and the
    processes of later tests know the database, and sign, by them."""
    named = {"name": name}
    with engine.begin() as conn:
        found = conn.execute(text(f"SELECT * FROM instance_secrets {_NAMED}"), named).mappings()
        kept = [dict(row) for row in found]
        conn.execute(text(f"DELETE FROM instance_secrets {_NAMED}"), named)
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DELETE FROM instance_secrets {_NAMED}"), named)
            for row in kept:
                columns = ", ".join(row)
                marks = ", ".join(f":{column}" for column in row)
                conn.execute(text(f"INSERT INTO instance_secrets ({columns}) VALUES ({marks})"), row)
