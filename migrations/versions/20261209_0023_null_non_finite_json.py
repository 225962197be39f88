"""JSON documents stored on SQLite with ``NaN``, ``Infinity`` or ``-Infinity`` hold ``null`` there.

Before fal's answers were read with every non-finite number as ``null`` (``worker.fal.errors.
parse_json``; a ``1e999`` in an answer was read as infinity), such a number was written as
Python's ``json`` writes it: ``Infinity``, no JSON at all. SQLite's JSON functions refuse the whole
document ("malformed JSON"), and every strict reader of what is read from it too: an export's
records, a sidecar, a query of ``/metrics``. Each such document (in every JSON column) is read
with Python's ``json``, which takes them, every non-finite float in it becomes ``null`` (the rule
of ``parse_json`` and :func:`jobs.storable.storable_json`), and it is written back as strict JSON;
nothing else in it changes. A document that holds none is not written.

PostgreSQL holds none: ``jsonb`` refuses ``NaN`` and ``Infinity`` ("invalid input syntax for
type json"), so nothing is done there. A downgrade changes nothing (``null`` is what those
numbers were meant to be).

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-09 12:00:00
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0023"
down_revision: str | Sequence[str] | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Every JSON column at 0022: table → (primary key, [(column, nullable)]).
_COLUMNS: dict[str, tuple[str, list[tuple[str, bool]]]] = {
    "batches": ("id", [("schedule", True), ("rerun_options", True)]),
    "jobs": (
        "id",
        [
            ("input", False),
            ("submitted_input", True),
            ("provider_metrics", True),
            ("provider_output", True),
            ("media", True),
            ("source_files", True),
            ("price_table", True),
        ],
    ),
    "job_events": ("id", [("details", True)]),
    "webhook_deliveries": ("id", [("body", False)]),
}
#: What Python's ``json`` writes for a non-finite float.
_CONSTANTS = ("NaN", "Infinity", "-Infinity")
#: Where its ``json.dumps`` (the JSON type's writer on SQLite) puts a value: after a key, after
#: another item, first in a list. Looked for with these, a constant never matches in base64 (a
#: data URI of several MB holds ``NaN`` many times over, but no space, comma or bracket).
_BEFORE = (": ", ", ", "[")
#: Documents read at a time (an input may hold a data URI of several MB).
_CHUNK = 50


def _mended(text: str) -> str | None:
    """The document ``text`` as strict JSON, its non-finite numbers ``null``; None when it holds
    none (a ``NaN`` in a string is text), or is no document Python's ``json`` reads (left as it is)."""
    found: list[str] = []

    def constant(literal: str) -> None:  # NaN, Infinity, -Infinity
        found.append(literal)

    def number(literal: str) -> float | None:  # with a fraction or exponent: 1e999 is infinite
        value = float(literal)
        if math.isfinite(value):
            return value
        found.append(literal)
        return None

    try:
        doc = json.JSONDecoder(parse_float=number, parse_constant=constant).decode(text)
        return json.dumps(doc, allow_nan=False) if found else None
    except (ValueError, RecursionError):
        return None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return  # jsonb holds no NaN or Infinity
    for table, (key, columns) in _COLUMNS.items():
        for column, nullable in columns:
            pk: sa.ColumnClause[Any] = sa.column(key)
            doc = sa.column(column, sa.Text)
            holds = sa.or_(
                doc.in_(_CONSTANTS),
                *(sa.func.instr(doc, before + c) > 0 for before in _BEFORE for c in _CONSTANTS),
            )
            ids = list(bind.execute(sa.select(pk).select_from(sa.table(table)).where(holds)).scalars())
            target = sa.table(table, sa.column(key), sa.column(column, sa.Text))
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                rows = bind.execute(sa.select(pk, doc).select_from(sa.table(table)).where(pk.in_(chunk)))
                for row_id, text in rows.all():
                    mended = _mended(text) if isinstance(text, str) else None
                    if mended is None:
                        continue
                    value: str | None = None if mended == "null" and nullable else mended
                    bind.execute(sa.update(target).where(target.c[key] == row_id).values({column: value}))


def downgrade() -> None:
    """Nothing to undo: ``null`` is what those numbers read as since."""
