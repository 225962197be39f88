"""``status BATCH`` looks at every succeeded job's video (:func:`jobs.outputs_on_disk.look`):
its read of the recorded outputs must cost one pass over the batch, whatever its size.

It was read in pages of 500 ids, each page a statement of its own filtered by the batch as
well, which SQLite answered by walking the batch's whole index for every page: a batch of
100,000 succeeded jobs took about 20 s of ``status`` (200 pages, each a walk of 100,000
rows) before the first ``lstat``. One ordered, streamed statement reads it in one walk.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, update

from jobs import db
from jobs.models import Job
from jobs.outputs_on_disk import look
from jobs.states import JobState
from jobs.store.reading import READ_PAGE_ROWS
from tests.step_runtime import add_batch, job_ids

#: Jobs: more than two pages of the paged read.
JOBS = 2 * READ_PAGE_ROWS + 7


def test_status_reads_a_batchs_recorded_outputs_in_one_statement(engine: Engine, tmp_path: Path) -> None:
    batch = add_batch(engine, "on-disk", [("fal-ai/wan-i2v", {"prompt": f"p{i}"}) for i in range(JOBS)])
    ids = job_ids(engine, batch)
    present = tmp_path / "on-disk"
    present.mkdir()
    with db.session_scope(engine) as session:
        session.execute(
            update(Job)
            .where(Job.batch_id == batch)
            .values(state=JobState.SUCCEEDED, output_sha256="0" * 64, output_bytes=0, actual_usd=Decimal(0))
        )
        for job_id in ids:
            video = str(present / f"{job_id}.mp4")
            session.execute(update(Job).where(Job.id == job_id).values(output_path=video))
    for job_id in ids[1:]:  # the first one's video is missing
        (present / f"{job_id}.mp4").touch()

    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM jobs" in statement:
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        with db.read_scope(engine) as session:
            found = look(session, batch, tmp_path)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert (found.checked, found.job_ids()) == (JOBS, [ids[0]])
    assert len(statements) == 1, statements
