"""``read_scope``: reads that never queue behind SQLite's write lock, and never write (issue #11).

Every ``session_scope`` on SQLite opens with ``BEGIN IMMEDIATE``, so a mere lookup waited for
every writer of every process. A read_scope starts a deferred ``BEGIN``: in WAL mode it reads
a snapshot while another connection holds the write lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from jobs import db, store
from jobs.db import make_engine, migrate
from tests.sample_inputs import INPUTS
from tests.step_runtime import add_batch, job_ids


@pytest.fixture
def impatient_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """A migrated SQLite engine whose connections give up on a held write lock after 0.2 s
    (instead of 30 s), so a transaction that would wait for the writer fails quickly."""
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)
    engine = make_engine(f"sqlite:///{tmp_path / 'wanbatch.db'}")
    migrate(engine)
    yield engine
    engine.dispose()


def test_a_read_proceeds_while_another_connection_holds_the_write_lock(
    impatient_sqlite: Engine, tmp_path: Path
) -> None:
    engine = impatient_sqlite
    batch_id = add_batch(engine, "mine", [("fal-ai/wan-22", INPUTS["fal-ai/wan-22"])])
    (job_id,) = job_ids(engine, batch_id)
    reads = refused = 0
    # Another process's writer, say the CLI: it holds the single write lock, change uncommitted.
    writer = sqlite3.connect(tmp_path / "wanbatch.db", isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE batches SET name = 'renamed' WHERE id = ?", (batch_id,))
        for _ in range(3):
            with db.read_scope(engine) as session:
                assert store.get_job(session, job_id).batch_id == batch_id
                assert store.get_batch(session, batch_id).name == "mine"  # the committed snapshot
                reads += 1
        with (
            pytest.raises(OperationalError, match="database is locked"),
            db.session_scope(engine) as session,
        ):
            store.get_job(session, job_id)
        refused += 1
        writer.execute("COMMIT")
    finally:
        writer.close()
    assert (reads, refused) == (3, 1)
    with db.read_scope(engine) as session:
        assert store.get_batch(session, batch_id).name == "renamed"


def test_read_scope_keeps_what_it_read_and_writes_nothing(engine: Engine) -> None:
    batch_id = add_batch(engine, "b", [("fal-ai/wan-22", INPUTS["fal-ai/wan-22"])])
    (job_id,) = job_ids(engine, batch_id)
    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert (job.id, job.batch_id, job.endpoint) == (job_id, batch_id, "fal-ai/wan-22")  # usable after

    with pytest.raises(RuntimeError, match="reads only"), db.read_scope(engine) as session:
        store.get_batch(session, batch_id).name = "renamed"
    with db.read_scope(engine) as session:
        assert store.get_batch(session, batch_id).name == "b"
