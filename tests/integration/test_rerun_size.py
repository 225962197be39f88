"""A rerun with more jobs than a manifest may have is refused before a row is built.

``--vary`` caps combinations per job (10,000), but the jobs it repeats multiply them: a finished
1,000-job batch rerun with ``--vary seed=1..2000`` grew by 15 MB a second, past 1.3 GB, without a
word. The manifest's limit (``MAX_JOBS``, a million) holds for a rerun too; lowered here.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from jobs import batches, db, store
from jobs.errors import UsageError
from jobs.settings import Settings
from jobs.vary import parse_varies
from tests.step_runtime import add_batch


def test_a_rerun_over_the_job_limit_is_refused_and_stores_nothing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = add_batch(engine, "big-parent", [("fal-ai/wan-22", {"prompt": p, "seed": 1}) for p in "abc"])
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))
    monkeypatch.setattr(batches, "MAX_JOBS", 8)

    with pytest.raises(UsageError) as refused:
        batches.rerun_batch(parent, vary=parse_varies(["seed=1..3"]), settings=settings)
    assert "would have 9 jobs (3 job(s) × 3 combinations of --vary values), more than 8" in str(refused.value)
    with db.read_scope(engine) as session:
        assert [b.name for b in store.list_batches(session)] == ["big-parent"]

    done = batches.rerun_batch(parent, vary=parse_varies(["seed=1..2"]), settings=settings)  # 6: fine
    assert done.total == 6
