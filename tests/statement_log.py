"""Every statement an engine runs meanwhile, as text: what the tests of a step's reads and writes
assert on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event

from jobs import db


@contextmanager
def recorded_statements(engine: Engine, width: int | None = None) -> Iterator[list[str]]:
    """The statements ``engine`` runs inside the block, whitespace folded (their first ``width``
    characters; None: whole), those of its SQLite writer connection too: units of work write
    there, an engine of its own (``jobs.db._add_writer``)."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split())[:width])

    engines = {engine, db.writer_engine(engine)}
    for one in engines:
        event.listen(one, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        for one in engines:
            event.remove(one, "before_cursor_execute", record)
