"""Fewer index entries rewritten per job move: four indexes of ``jobs`` made partial.

``ix_jobs_state_next_attempt_at`` and ``ix_jobs_batch_id_state_next_attempt_at`` held every job,
and every move of a job (five a job on its way to ``succeeded``) rewrote an entry of each: a
delete and an insert, two B-tree pages apiece on SQLite, while they are read only for the jobs
waiting out a retry's backoff (``retry_wait``) or fal's proof of an unknown submit
(``submit_unknown``). On SQLite they now hold only those jobs; PostgreSQL keeps both whole (its
planner reads the unfinished jobs of /metrics through them, and a write's CPU there is the server's).
``ix_jobs_request_id`` and
``ix_jobs_finished_at`` no longer hold the jobs without a request id or not finished (NULL, never
looked up), so a job's first request id and its finish write one entry each, not also the removal
of its NULL one. The queries that need them read the same entries as before; the others read the
jobs through ``ix_jobs_batch_id_state_order`` / ``ix_jobs_state_order`` (same leading columns).

Building them reads the jobs table once; a downgrade makes the full indexes again.

Revision ID: 0049
Revises: 0048
Create Date: 2027-01-04 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0049"
down_revision: str | Sequence[str] | None = "0048"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: As ``jobs.models`` spells it: SQLite sees ``state = 'retry_wait'`` imply an OR, not an ``IN``.
WAITING = sa.text("state = 'retry_wait' OR state = 'submit_unknown'")
HAS_REQUEST = sa.text("request_id IS NOT NULL")
FINISHED = sa.text("finished_at IS NOT NULL")

#: (name, columns, predicate): each index as it is made now.
PARTIAL = (
    ("ix_jobs_state_next_attempt_at", ["state", "next_attempt_at"], WAITING),
    ("ix_jobs_batch_id_state_next_attempt_at", ["batch_id", "state", "next_attempt_at"], WAITING),
    ("ix_jobs_request_id", ["request_id"], HAS_REQUEST),
    ("ix_jobs_finished_at", ["finished_at"], FINISHED),
)


#: Partial on SQLite only (see above).
SQLITE_ONLY = frozenset({"ix_jobs_state_next_attempt_at", "ix_jobs_batch_id_state_next_attempt_at"})


def _changed() -> list[tuple[str, list[str], sa.TextClause]]:
    """The indexes of :data:`PARTIAL` this database's dialect makes partial."""
    sqlite = op.get_bind().dialect.name == "sqlite"
    return [(name, columns, where) for name, columns, where in PARTIAL if sqlite or name not in SQLITE_ONLY]


def upgrade() -> None:
    for name, columns, where in _changed():
        op.drop_index(name, table_name="jobs")
        op.create_index(name, "jobs", columns, postgresql_where=where, sqlite_where=where)


def downgrade() -> None:
    for name, columns, _where in _changed():
        op.drop_index(name, table_name="jobs")
        op.create_index(name, "jobs", columns)
