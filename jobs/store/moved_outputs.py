"""The queries of :mod:`jobs.moved_outputs`: a moved project's stored videos, read and re-pointed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from jobs.models import Batch, Job

_JOBS = cast(Table, Job.__table__)

#: Rows per statement of :func:`record_output_moves`.
MOVES_PER_STATEMENT = 1000


def outputs_in_folder(
    session: Session, batch_id: str, folder: str
) -> list[tuple[str, str, str | None, int | None]]:
    """``(job id, output_path, output_sha256, output_bytes)`` of the batch's jobs whose recorded
    output lies directly in ``folder`` (an exact prefix comparison, on the batch's index)."""
    prefix = folder + "/"
    query = select(Job.id, Job.output_path, Job.output_sha256, Job.output_bytes).where(
        Job.batch_id == batch_id, func.substr(Job.output_path, 1, len(prefix)) == prefix
    )
    return [(str(i), str(p), s, None if n is None else int(n)) for i, p, s, n in session.execute(query)]


def output_digest(session: Session, job_id: str) -> tuple[str | None, int | None] | None:
    """``(output_sha256, output_bytes)`` of a job, None when there is no such job."""
    row = session.execute(select(Job.output_sha256, Job.output_bytes).where(Job.id == job_id)).first()
    return None if row is None else (row[0], None if row[1] is None else int(row[1]))


def record_output_moves(session: Session, moves: Sequence[tuple[str, str, str]]) -> None:
    """Each ``(job id, old path, new path)``: the job's ``output_path`` becomes the new path
    where it still holds the old one (a job stored again meanwhile keeps its new output)."""
    statement = (
        update(_JOBS)
        .where(_JOBS.c.id == bindparam("b_id"), _JOBS.c.output_path == bindparam("b_old"))
        .values(output_path=bindparam("b_new"))
    )
    rows = [{"b_id": job_id, "b_old": old, "b_new": new} for job_id, old, new in moves]
    for start in range(0, len(rows), MOVES_PER_STATEMENT):
        session.execute(statement, rows[start : start + MOVES_PER_STATEMENT])


def record_output_move(session: Session, job_id: str, old: str, new: str) -> None:
    """:func:`record_output_moves` of one job, through the ORM: the job's object loaded in
    ``session`` (if any) takes the new path too."""
    session.execute(update(Job).where(Job.id == job_id, Job.output_path == old).values(output_path=new))


def batch_and_reruns(session: Session, batch_id: str) -> list[str]:
    """The batch and its reruns (every generation), ids, the batch first."""
    found = [batch_id]
    todo = [batch_id]
    while todo:
        parent = todo.pop(0)
        for (child,) in session.execute(select(Batch.id).where(Batch.parent_batch_id == parent)):
            if child not in found:  # a chain edited by hand into a cycle is walked once
                found.append(child)
                todo.append(child)
    return found
