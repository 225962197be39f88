"""A reuse lookup searches the key's index, never every succeeded job (SQLite).

``reuse_outputs`` looks for a job's twins once per claimed job, inside the dispatch round's write
transaction. Asked as ``job_key = k OR content_key = k``, SQLite's planner (no statistics) walked
``ix_jobs_state_order`` over every succeeded job of the database instead: an audit's 3,000-job
reuse in a 33,000-job database took 450 s (rendering them took 48 s), and every other writing
command was locked out meanwhile. Each key column is now asked on its own, and the answers merged.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from jobs import db, store
from jobs.db import make_engine, migrate
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids

T2V = "fal-ai/wan-22"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    made = make_engine(f"sqlite:///{tmp_path / 'wanbatch.db'}")
    migrate(made, from_models=False)
    yield made
    made.dispose()


def _lookups(engine: Engine, job_id: str) -> tuple[list[Job], list[tuple[str, Any]]]:
    """find_reusable's answer for ``job_id`` and the statements it ran (SQL, parameters)."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", record)  # the unit of work may use an engine of its own
    try:
        with db.session_scope(engine) as session:
            job = store.get_job(session, job_id)
            found = store.find_reusable(session, job, simulated=False, limit=5)
            session.expunge_all()
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    asked = ("jobs.job_key = ?", "jobs.content_key = ?", "job_key = ? OR", "content_key = ?)")
    return found, [(sql, params) for sql, params in seen if any(a in sql for a in asked)]


def test_each_lookup_searches_a_key_index_not_the_state_index(engine: Engine) -> None:
    batch = add_batch(engine, "b", [(T2V, {"prompt": "a cat", "seed": 1})])
    (job_id,) = job_ids(engine, batch)
    _found, lookups = _lookups(engine, job_id)
    assert lookups
    raw = engine.raw_connection()
    try:
        for sql, params in lookups:
            plan = " | ".join(row[-1] for row in raw.cursor().execute("EXPLAIN QUERY PLAN " + sql, params))
            assert "ix_jobs_state_order" not in plan, plan
            assert "ix_jobs_job_key" in plan or "ix_jobs_content_key" in plan, plan
    finally:
        raw.close()


def test_twins_by_either_key_come_oldest_first_and_within_the_limit(engine: Engine) -> None:
    """The merged answer is the one query's: twins by ``job_key`` or ``content_key``, each once,
    oldest finished first, at most ``limit``."""
    item = {"prompt": "a cat", "seed": 1}
    wanted_batch = add_batch(engine, "wanted", [(T2V, item)])
    (wanted,) = job_ids(engine, wanted_batch)
    twins = [job_ids(engine, add_batch(engine, f"twin{i}", [(T2V, item)]))[0] for i in range(7)]
    now = utcnow()
    with db.session_scope(engine) as session:
        key = store.get_job(session, wanted).job_key
        for age, twin_id in enumerate(twins):
            twin = session.get(Job, twin_id)
            assert twin is not None
            twin.state = JobState.SUCCEEDED
            twin.output_sha256 = "0" * 64
            twin.output_path = f"/videos/{twin_id}.mp4"
            twin.finished_at = now - timedelta(minutes=age)
            # Half are found by their content key alone (their job key another spelling's).
            if age % 2:
                twin.job_key, twin.content_key = f"other-{age}", key
    found, _ = _lookups(engine, wanted)
    assert [j.id for j in found] == list(reversed(twins))[:5]
