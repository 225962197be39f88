"""``jobs.moved_outputs`` on SQLite and PostgreSQL: a moved project's stored videos are found
under the current output folder by their recorded SHA-256 and recorded there (audit r3)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy import Engine

from jobs import db, moved_outputs, store
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids

S = JobState


def _succeed(engine: Engine, job_id: str, video: Path, body: bytes) -> None:
    with db.session_scope(engine) as session:
        assert store.transition(session, job_id, S.PENDING, S.SUBMITTING)
        assert store.transition(session, job_id, S.SUBMITTING, S.QUEUED, request_id=f"r-{job_id}")
        assert store.transition(session, job_id, S.QUEUED, S.DOWNLOADING)
        assert store.transition(
            session,
            job_id,
            S.DOWNLOADING,
            S.SUCCEEDED,
            output_path=str(video),
            output_sha256=hashlib.sha256(body).hexdigest(),
            output_bytes=len(body),
        )


def _paths(engine: Engine, ids: list[str]) -> list[str | None]:
    with db.read_scope(engine) as session:
        return [store.get_job(session, job_id).output_path for job_id in ids]


def test_follow_outputs_records_the_videos_found_and_only_those(engine: Engine, tmp_path: Path) -> None:
    jobs = [("fal-ai/wan-22", {"prompt": f"p{i}", "seed": i}) for i in range(4)]
    batch_id = add_batch(engine, "mv", jobs)
    ids = job_ids(engine, batch_id)
    old = tmp_path / "a" / "outputs" / "mv"
    old.mkdir(parents=True)
    for i, job_id in enumerate(ids):
        body = f"video {i}".encode()
        (old / f"00000{i}.mp4").write_bytes(body)
        _succeed(engine, job_id, old / f"00000{i}.mp4", body)
    (tmp_path / "a").rename(tmp_path / "b")
    new = tmp_path / "b" / "outputs" / "mv"
    (new / "000001.mp4").write_bytes(b"video X")  # the same size, other bytes: not taken
    (new / "000002.mp4").unlink()  # lost in the move
    (new / "000003.mp4").unlink()
    (new / "000003.mp4").symlink_to(tmp_path / "b" / "elsewhere.mp4")  # never through a link
    (tmp_path / "b" / "elsewhere.mp4").write_bytes(b"video 3")

    root = (tmp_path / "b" / "outputs").resolve()
    found = moved_outputs.follow_outputs(engine, [batch_id], root)
    assert found.moves == {str(old / "000000.mp4"): str(new / "000000.mp4")}
    assert found.missing == 3
    assert _paths(engine, ids) == [str(new / "000000.mp4"), *(str(old / f"00000{i}.mp4") for i in (1, 2, 3))]

    # Recorded: the video found is not looked for again; the others are still not taken.
    again = moved_outputs.follow_outputs(engine, [batch_id], root)
    assert (again.moves, again.missing) == ({}, 3)
