"""Twins stored before schema 0022 (one image as two jobs of a batch: two media-type spellings of
a data URI, or a file and a data URI) are paid for once after the upgrade, on SQLite and
PostgreSQL.

0022 keys a data URI by its decoded bytes; a batch holds each key once, so only one twin could
take the new key and the others kept their old text key. The upgrade audit (an old database,
then this version) found three ways that paid twice: ``reuse_outputs`` sent every unsent twin of
an old batch (each looked its output up by its own key); it missed an old succeeded video when a
failed twin held the new key; and a second ``rerun --failed-only`` sent the twin the first one
had stored once (it compared inputs by text, under the one parent job it recorded).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from jobs import db, store
from jobs.db import make_engine, migrate
from jobs.endpoints import get_endpoint
from jobs.manifest import job_key, key_of
from jobs.rendered import rerun_covered
from jobs.rerun import NothingToRerun, rerun_batch
from jobs.settings import Settings
from jobs.states import JobState as S
from tests.older_rows import older_batch
from tests.step_runtime import job_ids, make_runtime
from worker.steps import dispatch

WAN = get_endpoint("fal-ai/wan-i2v")
LANDSCAPE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "images" / "landscape.jpg"


@pytest.fixture(params=["sqlite", "postgresql"])
def old_url(request: pytest.FixtureRequest, tmp_path: Path, new_pg_database: Callable[[], str]) -> str:
    """A database at schema 0021 (before 0022 rekeyed data URIs by their bytes)."""
    url = f"sqlite:///{tmp_path / 'old.db'}" if request.param == "sqlite" else new_pg_database()
    engine = make_engine(url)
    migrate(engine, "0021", from_models=False)
    engine.dispose()
    return url


def _inputs() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
    """The same image as ``image/jpeg`` and ``image/jpg`` data URIs and as a file, and its SHA-256."""
    raw = LANDSCAPE.read_bytes()
    encoded = base64.b64encode(raw).decode()
    base = {"prompt": "Clouds drifting past the peak", "seed": 91}
    return (
        {**base, "image_url": f"data:image/jpeg;base64,{encoded}"},
        {**base, "image_url": f"data:image/jpg;base64,{encoded}"},
        {**base, "image_url": str(LANDSCAPE)},
        hashlib.sha256(raw).hexdigest(),
    )


def _old_batch(url: str, name: str, jobs: list[tuple[dict[str, Any], dict[str, Any] | None]]) -> str:
    """A batch stored as a version before 0022 stored it: each data URI keyed by its text, each
    file by its bytes; returns its id."""
    engine = make_engine(url)
    try:
        with db.session_scope(engine) as session:
            made_id = older_batch(session, name, manifest_path=str(LANDSCAPE.parent.parent / "m.yaml"))
            store.add_jobs(
                session,
                made_id,
                [
                    store.NewJob(
                        key_of(WAN.id, payload)
                        if payload["image_url"].startswith("data:")
                        else job_key(WAN, payload),
                        item,
                        WAN.id,
                        payload,
                        Decimal(5),
                        Decimal("0.2"),
                        source_files=sources,
                    )
                    for item, (payload, sources) in enumerate(jobs)
                ],
            )
            return made_id
    finally:
        engine.dispose()


def _set_states(engine: Engine, states: dict[str, str]) -> None:
    with engine.begin() as conn:
        for job_id, state in states.items():
            conn.execute(text("UPDATE jobs SET state = :s WHERE id = :j"), {"s": state, "j": job_id})


def _succeed(engine: Engine, job_id: str, video: Path) -> None:
    """Through fal to ``succeeded`` with ``video`` as its output."""
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
            output_sha256=hashlib.sha256(video.read_bytes()).hexdigest(),
            output_bytes=video.stat().st_size,
            seed=91,
            actual_usd=Decimal("0.2"),
        )


def _dispatch_all(engine: Engine) -> tuple[list[str], list[str]]:
    """One dispatch round: the jobs sent and the jobs that took a twin's output."""
    sent: list[str] = []
    done: list[str] = []
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10), enqueue_submit=sent.append)
    rt.notify = lambda kind, job_id: done.append(job_id) if kind == "done" else None
    dispatch(rt)
    return sent, done


def test_unsent_twins_of_an_old_batch_take_the_output_of_the_one_sent(old_url: str, tmp_path: Path) -> None:
    """``twinpend``: three items, one image (``image/jpeg``, ``image/jpg``, the file), seed 91,
    ``reuse_outputs: true``. The file's job held the new key already, so both data-URI twins kept
    their old one: with one job out at a time, each was sent in its turn ($0.60 for one video)."""
    jpeg, jpg, local, digest = _inputs()
    batch = _old_batch(
        old_url,
        "twinpend",
        [(jpeg, None), (jpg, None), (local, {"image_url": {"source": "x", "sha256": digest}})],
    )
    engine = make_engine(old_url)
    try:
        migrate(engine, from_models=False)
        with db.session_scope(engine) as session:
            store.set_batch_reuse_outputs(session, batch, True)
        first, *twins = job_ids(engine, batch)
        video = tmp_path / "one.mp4"
        video.write_bytes(b"the one video")
        _succeed(engine, first, video)  # the first one sent (WANBATCH_MAX_OUTSTANDING=1)

        sent, reused = _dispatch_all(engine)

        assert sent == []
        assert sorted(reused) == sorted(twins)
        with db.session_scope(engine) as session:
            assert {store.get_job(session, j).reused_from for j in twins} == {first}
    finally:
        engine.dispose()


def test_an_old_succeeded_video_is_reused_though_its_failed_twin_holds_the_key(
    old_url: str, tmp_path: Path
) -> None:
    """The old batch's ``image/jpeg`` job failed, its ``image/jpg`` twin succeeded: the new key
    goes to the succeeded one, and a new batch asking that image with the same seed reuses it."""
    jpeg, jpg, local, digest = _inputs()
    old = _old_batch(old_url, "old", [(jpeg, None), (jpg, None)])
    engine = make_engine(old_url)
    try:
        failed, done = job_ids(engine, old)
        video = tmp_path / "old.mp4"
        video.write_bytes(b"the old video")
        _set_states(engine, {failed: "failed"})
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE jobs SET state = 'succeeded', output_path = :p, output_sha256 = :s, "
                    "output_bytes = :b WHERE id = :j"
                ),
                {
                    "p": str(video),
                    "s": hashlib.sha256(video.read_bytes()).hexdigest(),
                    "b": video.stat().st_size,
                    "j": done,
                },
            )
        migrate(engine, from_models=False)
        new = _old_batch(old_url, "new", [(local, {"image_url": {"source": "x", "sha256": digest}})])
        with db.session_scope(engine) as session:
            store.set_batch_reuse_outputs(session, new, True)
        (job,) = job_ids(engine, new)

        sent, reused = _dispatch_all(engine)

        assert (sent, reused) == ([], [job])
        with db.session_scope(engine) as session:
            assert store.get_job(session, job).reused_from == done
    finally:
        engine.dispose()


def test_a_second_rerun_failed_only_sends_neither_twin_again(old_url: str) -> None:
    """Both twins failed in the old batch; the first ``rerun --failed-only`` stores their one
    input once and renders it. A second one made ``old-rerun-2`` and sent the other twin."""
    jpeg, jpg, _local, _digest = _inputs()
    old = _old_batch(old_url, "old", [(jpeg, None), (jpg, None)])
    engine = make_engine(old_url)
    try:
        _set_states(engine, dict.fromkeys(job_ids(engine, old), "failed"))
        migrate(engine, from_models=False)
        settings = Settings(database_url=old_url)
        first = rerun_batch(old, failed_only=True, settings=settings)
        (repeat,) = job_ids(engine, first.batch_id)
        _set_states(engine, {repeat: "succeeded"})

        with pytest.raises(NothingToRerun) as nothing:
            rerun_batch(old, failed_only=True, settings=settings)

        assert "already rendered with the same input by old-rerun-1" in " ".join(str(nothing.value).split())
        with db.read_scope(engine) as session:
            covered = rerun_covered(session, store.get_batch(session, old))
        assert covered.rendered["jobs"] == 2
    finally:
        engine.dispose()
