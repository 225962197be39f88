"""jobs.not_in_manifest: the manifest its batch was last submitted from no longer has the job.

A resubmit of an edited manifest numbered such jobs after its items (``item_index`` from the
item count on) and kept them, and nothing stored said which they were: the run's exit code,
``status``'s advice and ``rerun --failed-only`` went on judging a failed job whose item was since
fixed, and an export could not tell the rows its stored manifest describes from those of an
earlier version of it. Every resubmit now sets the flag of the jobs it leaves out and clears it
for the others (``jobs.store.resubmit_jobs``); exports say it per row (``in_manifest``).

Filled for the jobs already stored whose batch's manifest text (``manifest_text``) names no
``items_from`` file: a job numbered from the number of its ``items`` on is one an earlier
resubmit left out (a rerun's text is its parent's, whose item numbers its jobs keep). False for
the others (rows of an ``items_from`` file are not stored with the batch, and a batch stored
before its text was kept has none): the next submit of their manifest marks them.

Of the jobs it marks, those certainly never sent — ``pending`` or ``retry_wait``, no attempt,
nothing of a POST recorded (its input, its send time, a request id, a 429 refusal, a resend
owed), nothing billed or possibly billed, no lease held — are cancelled as a resubmit drops
them (``jobs.store.creating._drop_never_sent``): ``error_type`` ``not_in_manifest``, its error
text, ``finished_at`` now, ``version`` + 1 and a ``job_events`` row each. Marked but left
``pending``, the first run after the upgrade sent and billed a job the user had removed or
corrected (an old spelling of a fixed typo). A manifest that has such a job again makes it
``pending`` again, as for any dropped job. A downgrade leaves them cancelled: the older code
would send them; the upgrade after it marks every job so dropped (``cancelled``, ``error_type``
``not_in_manifest``) again, whatever its batch's text.

Revision ID: 0039
Revises: 0038
Create Date: 2026-12-25 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
import yaml
from alembic import op

revision: str = "0039"
down_revision: str | Sequence[str] | None = "0038"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def item_count(text: str | None) -> int | None:
    """The items of a stored manifest text, when they are all in it (no ``items_from``); else None."""
    if text is None:
        return None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("items_from") is not None:
        return None
    items = data.get("items")
    return len(items) if isinstance(items, list) else None


#: What a dropped job says (``jobs.error``): ``jobs.store.creating.DROPPED_ERROR``, as it was
#: at this revision (a migration keeps its own copy: the code's may change).
DROPPED_ERROR = (
    "no longer in its manifest and never sent: cancelled when the manifest was submitted again "
    "(nothing of it reached fal); a manifest that has it again sends it"
)
#: Its ``jobs.error_type`` (``jobs.models.NOT_IN_MANIFEST``).
DROPPED_TYPE = "not_in_manifest"
#: Its ``job_events.reason``.
DROPPED_REASON = "not in manifest: never sent, dropped (upgrade to schema 0039)"


def drop_never_sent(conn: sa.Connection) -> int:
    """Cancel the marked jobs certainly never sent (see the module's text); how many. One
    compare-and-set UPDATE per state, each moved job's event from what it returns."""
    pg = conn.dialect.name == "postgresql"
    now = datetime.now(UTC)
    when = now if pg else now.replace(tzinfo=None)  # SQLite stores UTC text without an offset
    jobs = sa.table(
        "jobs",
        *(
            sa.column(name, sa.Integer)
            for name in (
                "version",
                "attempts",
                "rate_limited_submits",
                "resend_attempt",
                "possible_duplicate_charges",
                "actual_usd",
                "actual_billing_units",
                "ambiguous_usd",
            )
        ),
        *(
            sa.column(name, sa.String)
            for name in ("id", "state", "request_id", "lease_owner", "error", "error_type", "submitted_input")
        ),
        *(
            sa.column(name, sa.DateTime(timezone=True))
            for name in (
                "submitted_at",
                "sent_at",
                "lease_expires_at",
                "next_attempt_at",
                "finished_at",
                "updated_at",
            )
        ),
        sa.column("not_in_manifest", sa.Boolean),
    )
    events = sa.table(
        "job_events",
        sa.column("job_id", sa.String),
        sa.column("at", sa.DateTime(timezone=True)),
        sa.column("from_state", sa.String),
        sa.column("to_state", sa.String),
        sa.column("version", sa.Integer),
        sa.column("reason", sa.Text),
    )
    j = jobs.c
    never_sent = [
        j.not_in_manifest.is_(True),
        j.attempts == 0,
        j.submitted_at.is_(None),
        j.sent_at.is_(None),
        j.submitted_input.is_(None),
        j.request_id.is_(None),
        j.rate_limited_submits == 0,
        j.resend_attempt.is_(None),
        j.possible_duplicate_charges == 0,
        j.actual_usd.is_(None),
        j.ambiguous_usd == 0,
        sa.or_(j.lease_expires_at.is_(None), j.lease_expires_at <= when),
    ]
    moved = 0
    for state in ("pending", "retry_wait"):
        rows = conn.execute(
            jobs.update()
            .where(j.state == state, *never_sent)
            .values(
                state="cancelled",
                version=j.version + 1,
                updated_at=when,
                finished_at=when,
                next_attempt_at=None,
                lease_owner=None,
                lease_expires_at=None,
                error=DROPPED_ERROR,
                error_type=DROPPED_TYPE,
                actual_usd=0,
                actual_billing_units=0,
            )
            .returning(j.id, j.version)
        ).all()
        if rows:
            conn.execute(
                events.insert(),
                [
                    {
                        "job_id": job_id,
                        "at": when,
                        "from_state": state,
                        "to_state": "cancelled",
                        "version": version,
                        "reason": DROPPED_REASON,
                    }
                    for job_id, version in rows
                ],
            )
        moved += len(rows)
    return moved


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("not_in_manifest", sa.Boolean(), nullable=False, server_default="0"))
    conn = op.get_bind()
    batches = sa.table("batches", sa.column("id", sa.String), sa.column("manifest_text", sa.Text))
    jobs = sa.table(
        "jobs",
        sa.column("batch_id", sa.String),
        sa.column("item_index", sa.Integer),
        sa.column("state", sa.String),
        sa.column("error_type", sa.String),
        sa.column("not_in_manifest", sa.Boolean),
    )
    # A job dropped already (by a resubmit at 0039 or later, or by this upgrade before a
    # downgrade took its mark away) is marked whatever its batch's text says: the mark was lost
    # with the column, and for an ``items_from`` batch nothing else brings it back, so
    # ``rerun --failed-only`` sent and billed the removed job after ``alembic downgrade`` and
    # upgrade. (Added to this revision after its release: a database already at 0039 never runs
    # it again, and one that ran it without this line has its marks, lost only by a downgrade,
    # which this line now restores on the way back up.)
    conn.execute(
        jobs.update()
        .where(jobs.c.state == "cancelled", jobs.c.error_type == DROPPED_TYPE)
        .values(not_in_manifest=True)
    )
    found = conn.execute(
        sa.select(batches.c.id, batches.c.manifest_text).where(batches.c.manifest_text.is_not(None))
    )
    counted = [
        {"b_id": batch_id, "b_items": n} for batch_id, text in found if (n := item_count(text)) is not None
    ]
    if counted:
        conn.execute(
            jobs.update()
            .where(jobs.c.batch_id == sa.bindparam("b_id"), jobs.c.item_index >= sa.bindparam("b_items"))
            .values(not_in_manifest=True),
            counted,
        )
        drop_never_sent(conn)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("not_in_manifest")
