"""A SQLite database whose disk is full, for tests: SQLite's own ``SQLITE_FULL``, on demand.

A test cannot count on mounting a small file system, so the full disk is SQLite's: with
``PRAGMA max_page_count`` at the database's current size, a write that needs one more page
fails with ``SQLITE_FULL`` ("database or disk is full"), the very error a full disk gives, and
SQLite rolls the statement back as it would then. A write that fits in the room left in its
pages would still succeed, unlike on a full disk, where the journal cannot grow; so while the
switch is on, temporary triggers make every change of every table also write a block into a pad
table, which needs new pages: every write fails, at the statement that made it, like on a full
disk. Nothing is mocked: the product's own statements fail inside SQLite.

:class:`FullDisk` switches the connections of the engines it is attached to (an engine, or the
``Engine`` class for every engine of the process) at each transaction's start. The pad table is
created by :func:`prepare` once the database exists (creating it needs room too).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import event

PAD = "wb_test_pad"
#: SQLite's default page limit: no limit to speak of.
NO_LIMIT = 1073741823
_TABLES = (
    "SELECT name FROM main.sqlite_master WHERE type = 'table' "
    f"AND name NOT LIKE 'sqlite_%' AND name <> '{PAD}'"
)


def prepare(database: str | Path) -> None:
    """Add the pad table to the SQLite file ``database`` (a path or a ``sqlite:///`` URL)."""
    path = str(database).removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {PAD} (block BLOB)")
        conn.commit()


class FullDisk:
    """While :attr:`full` (or ``is_full()``) says so, every write of the attached engines'
    connections fails with ``SQLITE_FULL``; otherwise they write as usual."""

    def __init__(self, is_full: Callable[[], bool] | None = None) -> None:
        self.full = False
        self._is_full = is_full if is_full is not None else (lambda: self.full)
        self._targets: list[Any] = []

    def attach(self, target: Any) -> None:
        """Watch ``target``: an engine, or the ``Engine`` class (every engine of the process)."""
        event.listen(target, "begin", self._begin)
        self._targets.append(target)

    def detach(self) -> None:
        for target in self._targets:
            event.remove(target, "begin", self._begin)
        self._targets.clear()

    @contextlib.contextmanager
    def attached(self, *targets: Any) -> Iterator[FullDisk]:
        for target in targets:
            self.attach(target)
        try:
            yield self
        finally:
            self.full = False
            self.detach()

    def _begin(self, connection: Any) -> None:
        # Looked at each time, not remembered: triggers made inside a transaction (a listener on
        # an engine runs after its BEGIN) go with its rollback.
        full = self._is_full()
        dbapi = connection.connection.dbapi_connection
        dbapi.execute(f"PRAGMA max_page_count = {1 if full else NO_LIMIT}")
        armed = dbapi.execute(
            "SELECT count(*) FROM temp.sqlite_master WHERE type = 'trigger' AND name LIKE 'wb_test_full_%'"
        ).fetchone()[0]
        if bool(armed) == full:
            return
        if dbapi.execute(f"SELECT 1 FROM main.sqlite_master WHERE name = '{PAD}'").fetchone() is None:
            return  # not prepared (yet): nothing to fill
        for table in [row[0] for row in dbapi.execute(_TABLES)]:
            for change in ("INSERT", "UPDATE", "DELETE"):
                name = f"wb_test_full_{table}_{change}"
                if full:
                    dbapi.execute(
                        f'CREATE TEMP TRIGGER IF NOT EXISTS "{name}" AFTER {change} ON main."{table}" '
                        f"BEGIN INSERT INTO {PAD} VALUES (zeroblob(8192)); END"
                    )
                else:
                    dbapi.execute(f'DROP TRIGGER IF EXISTS temp."{name}"')


def cli_source(flag: Path) -> str:
    """Python source that runs the ``wanbatch`` command line (``python -c SOURCE ARGS``) with
    every engine's writes refused for a full disk while the file ``flag`` exists."""
    root = Path(__file__).resolve().parents[1]
    return (
        "import os, sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from sqlalchemy.engine import Engine\n"
        "from tests.full_disk import FullDisk\n"
        f"FullDisk(lambda: os.path.exists({str(flag)!r})).attach(Engine)\n"
        "from cli import main\n"
        "main()\n"
    )
