"""``reuse_outputs`` in dispatch, on SQLite and PostgreSQL: a claimed pinned-seed job whose twin
(same key, another batch) succeeded takes its output in the claim's transaction, never sent."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from jobs import db, store
from jobs.settings import Settings
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids, make_runtime
from worker.steps import dispatch

S = JobState
JOBS: list[tuple[str, dict[str, Any]]] = [
    ("fal-ai/wan-22", {"prompt": "a fox", "seed": 5}),
    ("fal-ai/wan-22", {"prompt": "a fox"}),
]


def _succeed(engine: Engine, job_id: str, video: Path) -> None:
    """Take ``job_id`` through fal to ``succeeded`` with ``video`` as its output."""
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
            output_sha256="ab" * 32,
            output_bytes=video.stat().st_size,
            seed=5,
            actual_prompt="a fox, expanded",
            actual_usd=Decimal("0.4"),
        )


def _second_batch(engine: Engine, reuse: bool) -> list[str]:
    batch_id = add_batch(engine, "again", JOBS, est_usd=Decimal("0.4"))
    with db.session_scope(engine) as session:
        store.set_batch_reuse_outputs(session, batch_id, reuse)
        store.set_batch_budget(session, batch_id, Decimal("0.5"))  # room for one job's estimate
    return job_ids(engine, batch_id)


def test_a_pinned_seed_twin_is_reused_and_an_unseeded_one_sent(engine: Engine, tmp_path: Path) -> None:
    video = tmp_path / "first.mp4"
    video.write_bytes(b"video bytes")
    first = job_ids(engine, add_batch(engine, "first", JOBS))
    for job_id in first:
        _succeed(engine, job_id, video)
    seeded, unseeded = _second_batch(engine, reuse=True)

    sent: list[str] = []
    done: list[tuple[str, str]] = []
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10), enqueue_submit=sent.append)
    rt.notify = lambda kind, job_id: done.append((kind, job_id))
    assert dispatch(rt) == [unseeded]  # the budget held the unseeded job's estimate: none reserved
    assert sent == [unseeded]
    assert done == [("done", seeded)]
    with db.session_scope(engine) as session:
        job = store.get_job(session, seeded)
        assert job.state == S.SUCCEEDED
        assert job.reused_from == first[0]
        assert (job.output_path, job.output_sha256, job.seed) == (str(video), "ab" * 32, 5)
        assert job.actual_prompt == "a fox, expanded"
        assert job.actual_usd == 0
        assert job.request_id is None
        assert job.attempts == 0
        assert job.lease_owner is None
        assert [e.to_state for e in store.job_events(session, seeded)] == [S.SUCCEEDED]


def test_without_reuse_outputs_or_the_file_every_job_is_sent(engine: Engine, tmp_path: Path) -> None:
    video = tmp_path / "first.mp4"
    video.write_bytes(b"video bytes")
    for job_id in job_ids(engine, add_batch(engine, "first", JOBS)):
        _succeed(engine, job_id, video)
    ids = _second_batch(engine, reuse=False)
    sent: list[str] = []
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10), enqueue_submit=sent.append)
    with db.session_scope(engine) as session:
        store.set_batch_budget(session, store.get_job(session, ids[0]).batch_id, None)
    assert sorted(dispatch(rt)) == sorted(ids)

    video.unlink()  # reuse on, but the original's file is gone: sent
    third = add_batch(engine, "third", JOBS[:1])
    with db.session_scope(engine) as session:
        store.set_batch_reuse_outputs(session, third, True)
    assert dispatch(rt) == job_ids(engine, third)


def test_a_symlink_in_the_originals_place_is_not_reused(engine: Engine, tmp_path: Path) -> None:
    """Something else standing at the stored video's path, even of the same size, is not the video
    the job made: the twin is sent, not pointed at it."""
    video = tmp_path / "first.mp4"
    video.write_bytes(b"video bytes")
    for job_id in job_ids(engine, add_batch(engine, "first", JOBS)):
        _succeed(engine, job_id, video)
    other = tmp_path / "other.bin"
    other.write_bytes(b"other bytes")  # the same size
    video.unlink()
    video.symlink_to(other)
    third = add_batch(engine, "third", JOBS[:1])
    with db.session_scope(engine) as session:
        store.set_batch_reuse_outputs(session, third, True)
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10))
    assert dispatch(rt) == job_ids(engine, third)  # sent, not reused
