"""A rerun with more jobs than a manifest may have is refused before a row is built.

``--vary`` caps combinations per job (10,000), but the jobs it repeats multiply them: a finished
1,000-job batch rerun with ``--vary seed=1..2000`` grew by 15 MB a second, past 1.3 GB, without a
word. The manifest's limit (``MAX_JOBS``, a million) holds for a rerun too; lowered here.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, update

from jobs import db, rerun, store
from jobs.errors import UsageError
from jobs.models import NOT_IN_MANIFEST, Job
from jobs.settings import Settings
from jobs.states import JobState
from jobs.vary import parse_varies
from tests.step_runtime import add_batch


def test_a_rerun_over_the_job_limit_is_refused_and_stores_nothing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = add_batch(engine, "big-parent", [("fal-ai/wan-22", {"prompt": p, "seed": 1}) for p in "abc"])
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))
    monkeypatch.setattr(rerun, "MAX_JOBS", 8)

    with pytest.raises(UsageError) as refused:
        rerun.rerun_batch(parent, vary=parse_varies(["seed=1..3"]), settings=settings)
    assert "would have 9 jobs (3 job(s) × 3 combinations of --vary values), more than 8" in str(refused.value)
    with db.read_scope(engine) as session:
        assert [b.name for b in store.list_batches(session)] == ["big-parent"]

    done = rerun.rerun_batch(parent, vary=parse_varies(["seed=1..2"]), settings=settings)  # 6: fine
    assert done.total == 6


def _leave_out(engine: Engine, batch_id: str, item: int, **values: object) -> None:
    """Job ``item`` of the batch as an edited manifest left it: no longer in it (``values``)."""
    with db.session_scope(engine) as session:
        session.execute(
            update(Job)
            .where(Job.batch_id == batch_id, Job.item_index == item)
            .values(not_in_manifest=True, **values)
        )


def test_the_job_limit_counts_only_the_jobs_a_plain_rerun_repeats(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job a resubmit dropped (never sent: ``cancelled``, ``not_in_manifest``) is left out of a
    plain rerun, so it is not counted towards the limit: 2 jobs × 3 seeds fit in 6."""
    parent = add_batch(engine, "dropped-parent", [("fal-ai/wan-22", {"prompt": p, "seed": 1}) for p in "abc"])
    _leave_out(engine, parent, 2, state=JobState.CANCELLED, error_type=NOT_IN_MANIFEST)
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))
    monkeypatch.setattr(rerun, "MAX_JOBS", 6)

    done = rerun.rerun_batch(parent, vary=parse_varies(["seed=1..3"]), settings=settings)
    assert done.total == 6

    with pytest.raises(UsageError) as refused:  # 2 jobs × 4 seeds: over, and counted as such
        rerun.rerun_batch(parent, vary=parse_varies(["seed=1..4"]), settings=settings)
    assert "would have 8 jobs (2 job(s) × 4 combinations of --vary values), more than 6" in str(refused.value)


def test_the_job_limit_counts_only_the_jobs_a_failed_only_rerun_repeats(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--failed-only`` leaves out the failed jobs the manifest no longer has: not counted."""
    parent = add_batch(engine, "failed-parent", [("fal-ai/wan-22", {"prompt": p, "seed": 1}) for p in "abc"])
    with db.session_scope(engine) as session:
        session.execute(update(Job).where(Job.batch_id == parent).values(state=JobState.FAILED))
    _leave_out(engine, parent, 0)
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))
    monkeypatch.setattr(rerun, "MAX_JOBS", 6)

    done = rerun.rerun_batch(parent, failed_only=True, vary=parse_varies(["seed=1..3"]), settings=settings)
    assert done.total == 6
