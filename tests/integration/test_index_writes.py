"""A job's move writes only the index entries something reads (SQLite, the pages of its WAL).

Every move of a job (five on its way to ``succeeded``) rewrote an entry in each index of ``jobs``
holding ``state``: a delete and an insert, a B-tree page or two apiece, all committed with
``synchronous=FULL``. Two of them, on (``state``, ``next_attempt_at``) and (``batch_id``,
``state``, ``next_attempt_at``), are read only for the jobs waiting for a moment: a retry's
backoff (``retry_wait``) or fal's proof of an unknown submit (``submit_unknown``). They now hold
only those jobs (migration 0049): a move between the other states writes neither, a move into a
wait still does. Read from the WAL itself: the page number of each frame a commit appended,
named by the B-tree that owns it (``dbstat``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.db import make_engine, migrate
from jobs.models import utcnow
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids

S = JobState
T2V = "fal-ai/wan-22"
#: The two indexes only waiting jobs are in.
WAITING_INDEXES = {"ix_jobs_state_next_attempt_at", "ix_jobs_batch_id_state_next_attempt_at"}
WAL_HEADER = 32
FRAME_HEADER = 24


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A SQLite database made by the migrations, as the suite's other tests use."""
    made = make_engine(f"sqlite:///{tmp_path / 'wanbatch.db'}")
    migrate(made, from_models=False)
    yield made
    made.dispose()


def _database(engine: Engine) -> Path:
    return Path(str(engine.url.database))


def _empty_wal(engine: Engine) -> None:
    conn = sqlite3.connect(_database(engine), isolation_level=None)  # outside any transaction
    try:
        busy, _frames, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    assert busy == 0
    assert _database(engine).with_name("wanbatch.db-wal").stat().st_size == 0


def _written(engine: Engine) -> set[str]:
    """The B-trees whose pages the WAL holds (written since :func:`_empty_wal`)."""
    path = _database(engine)
    wal = path.with_name(path.name + "-wal").read_bytes()
    page_size = int.from_bytes(wal[8:12], "big")
    pages = {
        int.from_bytes(wal[at : at + 4], "big")
        for at in range(WAL_HEADER, len(wal), FRAME_HEADER + page_size)
    }
    conn = sqlite3.connect(path)
    try:
        owners = dict(conn.execute("SELECT pageno, name FROM dbstat"))
    finally:
        conn.close()
    return {owners[page] for page in pages if page in owners}


def _move(engine: Engine, job_id: str, expected: JobState, new: JobState, **fields: Any) -> set[str]:
    """Move the job, alone in a commit; the B-trees that commit wrote."""
    _empty_wal(engine)
    with db.session_scope(engine) as session:
        assert store.transition(session, job_id, expected, new, reason="test", **fields)
    return _written(engine)


def test_a_job_on_its_way_to_succeeded_writes_no_entry_of_the_waiting_indexes(engine: Engine) -> None:
    batch_id = add_batch(engine, "moves", [(T2V, {"prompt": f"p{n}"}) for n in range(40)])
    job = job_ids(engine, batch_id)[17]
    request = "0b7c5d9e-4f1a-4e3b-9c2d-8a6f5e4d3c2b"
    moves: list[tuple[JobState, JobState, dict[str, Any]]] = [
        (S.PENDING, S.SUBMITTING, {}),
        (S.SUBMITTING, S.QUEUED, {"request_id": request, "next_attempt_at": utcnow() + timedelta(seconds=2)}),
        (S.QUEUED, S.RUNNING, {"next_attempt_at": utcnow() + timedelta(seconds=2)}),
        (S.RUNNING, S.DOWNLOADING, {}),
        (S.DOWNLOADING, S.SUCCEEDED, {}),
    ]
    for expected, new, fields in moves:
        written = _move(engine, job, expected, new, **fields)
        # the check sees the move itself, and its entries in the indexes claims read
        assert {"jobs", "job_events", "ix_jobs_state_order", "ix_jobs_batch_id_state_order"} <= written
        assert not written & WAITING_INDEXES, (expected, new, sorted(written))


@pytest.mark.parametrize("wait", [S.RETRY_WAIT, S.SUBMIT_UNKNOWN])
def test_a_job_starting_or_ending_a_wait_is_written_in_the_waiting_indexes(
    engine: Engine, wait: JobState
) -> None:
    batch_id = add_batch(engine, "waits", [(T2V, {"prompt": f"p{n}"}) for n in range(40)])
    job = job_ids(engine, batch_id)[17]
    _move(engine, job, S.PENDING, S.SUBMITTING)
    entering = _move(engine, job, S.SUBMITTING, wait, next_attempt_at=utcnow() + timedelta(minutes=1))
    assert entering >= WAITING_INDEXES, sorted(entering)
    leaving = _move(engine, job, wait, S.FAILED, error="gave up")
    assert leaving >= WAITING_INDEXES, sorted(leaving)
