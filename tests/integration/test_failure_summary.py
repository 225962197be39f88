"""A failure group whose jobs' errors differ names them all (``status``'s failures; SQLite and
PostgreSQL).

Audit: twelve jobs failed because images/p1.png and images/p2.png were both rewritten after
the submit; ``status`` said ``12 failed (input_file): media file 'images/p1.png' changed since …``
(``min(error)`` of the group) and never named p2.png.
"""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Engine, update

from jobs import db, store
from jobs.models import Job
from jobs.states import JobState
from jobs.store.reading import FAILURE_ERRORS_KEPT

T2V = "fal-ai/wan-22"
CHANGED = "changed since the manifest was validated (its bytes differ); not sent"


def _batch(engine: Engine, name: str, errors: list[str]) -> str:
    """A batch of one failed job (``input_file``) per error of ``errors``; its id."""
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session, name=name, manifest_path=f"{name}.yaml", manifest_sha256="0" * 64, budget_max_usd=None
        )
        store.add_jobs(
            session,
            batch.id,
            [
                store.NewJob(
                    key=f"{i:064x}",
                    item_index=i,
                    endpoint=T2V,
                    input={"prompt": f"take {i}"},
                    est_billing_units=Decimal(1),
                    est_usd=Decimal(1),
                )
                for i in range(len(errors))
            ],
        )
        for job, error in zip(store.jobs_of_batch(session, batch.id), errors, strict=True):
            session.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(state=JobState.FAILED, error=error, error_type="input_file")
            )
        return batch.id


def test_each_file_is_named_by_both_readers(engine: Engine) -> None:
    spread = _batch(
        engine,
        "spread",
        [f"media file 'images/p1.png' {CHANGED}"] * 8 + [f"media file 'images/p2.png' {CHANGED}"] * 4,
    )
    one = _batch(engine, "one", [f"media file 'images/p1.png' {CHANGED}"] * 3)
    with db.read_scope(engine) as session:
        both = store.failure_reasons_of_batches(session, [spread, one])
        alone = store.failure_reasons(session, spread)
    (group,) = both[spread]
    assert alone == [group]
    assert (group.count, group.distinct) == (12, 2)
    assert group.example == f"media file 'images/p1.png' {CHANGED}"  # as before: one job's error
    assert group.errors == (
        (f"media file 'images/p1.png' {CHANGED}", 8),
        (f"media file 'images/p2.png' {CHANGED}", 4),
    )
    assert group.summary == f"media files 'images/p1.png' and 'images/p2.png' {CHANGED}"
    (single,) = both[one]
    assert (single.distinct, single.errors, single.summary) == (1, (), single.example)


def test_a_groups_distinct_errors_are_counted_exactly_past_those_it_keeps(engine: Engine) -> None:
    """The grouping query only tells one error from several (its least and greatest): the exact
    count comes with the kept errors, and counts those past :data:`FAILURE_ERRORS_KEPT` too."""
    three = _batch(engine, "three", [f"media file 'images/p{i % 3}.png' {CHANGED}" for i in range(9)])
    many = _batch(engine, "many", [f"media file 'images/m{i:02d}.png' {CHANGED}" for i in range(60)])
    with db.read_scope(engine) as session:
        both = store.failure_reasons_of_batches(session, [three, many])
        alone = store.failure_reasons(session, many)
    (group,) = both[three]
    assert (group.count, group.distinct, len(group.errors)) == (9, 3, 3)
    (group,) = both[many]
    assert alone == [group]
    assert (group.count, group.distinct, len(group.errors)) == (60, 60, FAILURE_ERRORS_KEPT)
