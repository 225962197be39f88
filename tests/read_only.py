"""A read-only URL of a test's database: SQLite's ``?mode=ro``; on PostgreSQL a session setting,
``default_transaction_read_only = on`` in the connection's ``options`` (every engine opened from
the URL, the use cases' own too, is read-only; the shared server is not reconfigured)."""

from __future__ import annotations

from sqlalchemy import Engine

#: libpq's ``options``: the session starts with ``default_transaction_read_only = on``.
PG_READ_ONLY_OPTIONS = "-c default_transaction_read_only=on"


def read_only_url(engine: Engine) -> str:
    """``engine``'s database, read-only, as a ``WANBATCH_DATABASE_URL``."""
    if engine.dialect.name == "sqlite":
        return f"sqlite:///{engine.url.database}?mode=ro"
    url = engine.url.update_query_dict({"options": PG_READ_ONLY_OPTIONS})
    return url.render_as_string(hide_password=False)
