"""``status`` of a batch in a lineage with a ``--vary`` rerun reads the lineage only when it has
failed or cancelled jobs to ask about.

Finding a ``--vary`` rerun's failed jobs rendered by any rerun of the lineage walks from every
job of the lineage's root: a ``--vary`` rerun's jobs repeat one job each though their inputs are
other jobs'. ``status`` did that walk for every batch, even one with nothing failed: a 100,000-job
batch whose ``--vary`` rerun succeeded read and decoded all 100,000 of the rerun's jobs (9 s,
0.07 s before) to say nothing at all. ``rerun`` still walks the whole lineage (a job it would send
again may be one a ``--vary`` rerun rendered, whatever state its own job is in).
"""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Engine, update

from jobs import db, store
from jobs.models import Job
from jobs.rendered import RERUN_FAILED_STATES, rerun_covered, rerun_covered_of_batches
from jobs.states import JobState as S


def _job(i: int, seed: int, rerun_of: str | None = None) -> store.NewJob:
    return store.NewJob(
        key=f"{seed:08x}{i:056x}",
        item_index=i,
        endpoint="fal-ai/wan-22",
        input={"prompt": "a lighthouse", "resolution": "720p", **({"seed": seed} if rerun_of else {})},
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.40"),
        rerun_of=rerun_of,
    )


def _lineage(engine: Engine) -> tuple[str, str]:
    """Batch ``root`` (3 jobs of one prompt, seeds 1..3, succeeded) and its ``--vary seed=1..3`` rerun of
    item 0's job (all three its repeats, as such a rerun makes them), succeeded: ``(root, rerun)``."""
    with db.session_scope(engine) as session:
        root, _ = store.get_or_create_batch(
            session, name="root", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
        )
        store.add_jobs(session, root.id, [_job(i, i + 1) for i in range(3)])
        (first,) = session.scalars(
            update(Job).where(Job.batch_id == root.id, Job.item_index == 0).values(seed=1).returning(Job.id)
        )
        for i in (1, 2):
            session.execute(
                update(Job).where(Job.batch_id == root.id, Job.item_index == i).values(seed=i + 1)
            )
        vary, _ = store.get_or_create_batch(
            session,
            name="root-vary",
            manifest_path="/m.yaml",
            manifest_sha256="0" * 64,
            budget_max_usd=None,
            parent_batch_id=root.id,
            rerun_options={"vary": ["seed=1..3"], "failed_only": False},
        )
        store.add_jobs(session, vary.id, [_job(0, s, first) for s in (1, 2, 3)])
        session.execute(update(Job).values(state=S.SUCCEEDED, actual_usd=Decimal("0.40")))
        return root.id, vary.id


def test_a_batch_with_nothing_failed_reads_none_of_its_varied_lineage(engine: Engine) -> None:
    root_id, vary_id = _lineage(engine)
    with db.read_scope(engine) as session:
        root = store.get_batch(session, root_id)
        # status of one batch, and of every batch: nothing failed, nothing read
        assert store.lineage_repeats_of_batches(session, [root_id, vary_id], RERUN_FAILED_STATES) == {}
        assert (
            store.lineage_repeats(session, root, RERUN_FAILED_STATES, only_covering=True, asked_only=True)
            == []
        )
        assert rerun_covered(session, root).rendered["jobs"] == 0
        # rerun still walks the whole lineage (what it would send again may be rendered already)
        assert len(store.lineage_repeats(session, root, RERUN_FAILED_STATES, only_covering=True)) == 3


def test_a_failed_job_of_the_lineage_is_still_found_rendered_by_the_varied_rerun(engine: Engine) -> None:
    """What the whole walk is for: item 2's job failed, and the ``--vary`` rerun's seed-3 job
    (a repeat of item 0's job) rendered its very input."""
    root_id, vary_id = _lineage(engine)
    with db.session_scope(engine) as session:
        session.execute(
            update(Job).where(Job.batch_id == root_id, Job.item_index == 2).values(state=S.FAILED)
        )
    with db.read_scope(engine) as session:
        root, vary = store.get_batch(session, root_id), store.get_batch(session, vary_id)
        assert rerun_covered(session, root).rendered["jobs"] == 1
        assert rerun_covered_of_batches(session, [root, vary])[root_id].rendered["jobs"] == 1
