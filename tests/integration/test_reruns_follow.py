"""A batch's reruns follow it to the place its manifest was submitted from (its folder moved).

Audit: submitting the manifest from its new folder moved only the batch; its reruns kept the old
folder and their jobs the old absolute paths, so no rerun of theirs could ever be made again.
:func:`jobs.store.reruns_follow` gives every generation the paths of the jobs they repeat, file
by file where the same SHA-256 is recorded, never by rewriting a path prefix.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, event, select, update

from jobs import db, store
from jobs.models import Batch, Job

I2V = "fal-ai/wan-i2v"
OLD, NEW = "/old/proj", "/new/proj"


def _job(key: str, image: str, sha: str, rerun_of: str | None = None, item: int = 0) -> store.NewJob:
    return store.NewJob(
        key=key * 64,
        item_index=item,
        endpoint=I2V,
        input={"prompt": f"take {key}", "image_url": image},
        est_billing_units=Decimal(1),
        est_usd=Decimal(1),
        source_files={
            "image_url": {"source": image.rsplit("/", 2)[-2] + "/" + image.rsplit("/", 1)[-1], "sha256": sha}
        },
        rerun_of=rerun_of,
    )


def _batch(session: Any, name: str, parent: str | None, jobs: list[store.NewJob]) -> str:
    batch, _ = store.get_or_create_batch(
        session,
        name=name,
        manifest_path=f"{OLD}/m.yaml",
        manifest_sha256="0" * 64,
        budget_max_usd=None,
        parent_batch_id=parent,
    )
    store.add_jobs(session, batch.id, jobs)
    return batch.id


def _ids(session: Any, batch_id: str) -> dict[str, str]:
    """The batch's job ids by the first character of their key."""
    return {job.job_key[0]: job.id for job in store.jobs_of_batch(session, batch_id)}


def _image(session: Any, job_id: str) -> tuple[str, dict[str, Any]]:
    job = session.get(Job, job_id)
    session.refresh(job)
    return job.input["image_url"], job.source_files["image_url"]


def test_every_generation_takes_the_paths_of_the_jobs_it_repeats(engine: Engine) -> None:
    a, b = "a" * 64, "b" * 64
    with db.session_scope(engine) as session:
        root = _batch(
            session,
            "clip",
            None,
            [_job("1", f"{OLD}/images/a.png", a), _job("2", f"{OLD}/images/b.png", b, item=1)],
        )
        originals = _ids(session, root)
        rerun = _batch(
            session,
            "clip-rerun-1",
            root,
            [
                _job("3", f"{OLD}/images/a.png", a, originals["1"]),
                _job("4", f"{OLD}/images/b.png", b, originals["2"], item=1),
                # Recorded with other bytes than its original's: never follows.
                _job("5", f"{OLD}/images/b.png", "c" * 64, originals["1"], item=2),
            ],
        )
        first = _ids(session, rerun)
        second = _batch(
            session, "clip-rerun-1-rerun-1", rerun, [_job("6", f"{OLD}/images/a.png", a, first["3"])]
        )

    with db.session_scope(engine) as session:
        # The manifest, submitted from its new folder, still has the first item only.
        store.resubmit_jobs(session, root, [_job("1", f"{NEW}/images/a.png", a)], lambda: 1)
        store.set_batch_manifest_path(session, root, f"{NEW}/m.yaml")
        followed = store.reruns_follow(session, root, f"{NEW}/m.yaml", chunk=1)
    assert followed == ["clip-rerun-1", "clip-rerun-1-rerun-1"]

    with db.session_scope(engine) as session:
        moved = (f"{NEW}/images/a.png", {"source": "images/a.png", "sha256": a})
        assert _image(session, first["3"]) == moved
        assert _image(session, _ids(session, second)["6"]) == moved
        # Its original is no longer in the manifest and kept its path: so does it.
        assert _image(session, first["4"])[0] == f"{OLD}/images/b.png"
        assert _image(session, first["5"]) == (
            f"{OLD}/images/b.png",
            {"source": "images/b.png", "sha256": "c" * 64},
        )
        paths = session.execute(select(Batch.name, Batch.manifest_path).order_by(Batch.name)).all()
        assert [tuple(p) for p in paths] == [
            ("clip", f"{NEW}/m.yaml"),
            ("clip-rerun-1", f"{NEW}/m.yaml"),
            ("clip-rerun-1-rerun-1", f"{NEW}/m.yaml"),
        ]
        # Submitted again from there: nothing left to follow.
        assert store.reruns_follow(session, root, f"{NEW}/m.yaml") == []


def test_a_rerun_chain_edited_into_a_cycle_is_walked_once(engine: Engine) -> None:
    """A database edited by hand so that the root names its own rerun as its parent: the walk
    down the chain comes back to the root; it must visit each batch once, not loop forever."""
    a = "a" * 64
    with db.session_scope(engine) as session:
        root = _batch(session, "clip", None, [_job("1", f"{OLD}/images/a.png", a)])
        rerun = _batch(
            session, "clip-rerun-1", root, [_job("2", f"{OLD}/images/a.png", a, _ids(session, root)["1"])]
        )
        second = _batch(
            session,
            "clip-rerun-1-rerun-1",
            rerun,
            [_job("3", f"{OLD}/images/a.png", a, _ids(session, rerun)["2"])],
        )
        session.execute(update(Batch).where(Batch.id == root).values(parent_batch_id=second))

    statements = 0

    def count(*_: Any) -> None:
        # Without the guard the walk never ends: stop it (and fail) instead of hanging the run.
        nonlocal statements
        statements += 1
        if statements > 200:
            raise RuntimeError("reruns_follow is still walking the chain")

    with db.session_scope(engine) as session:
        store.resubmit_jobs(session, root, [_job("1", f"{NEW}/images/a.png", a)], lambda: 1)
        store.set_batch_manifest_path(session, root, f"{NEW}/m.yaml")
        event.listen(engine, "before_cursor_execute", count)
        try:
            followed = store.reruns_follow(session, root, f"{NEW}/m.yaml")
        finally:
            event.remove(engine, "before_cursor_execute", count)
    assert followed == ["clip-rerun-1", "clip-rerun-1-rerun-1"]

    with db.session_scope(engine) as session:
        assert _image(session, _ids(session, second)["3"])[0] == f"{NEW}/images/a.png"
        paths = session.execute(select(Batch.name, Batch.manifest_path).order_by(Batch.name)).all()
        assert {p.manifest_path for p in paths} == {f"{NEW}/m.yaml"}


def _many(n: int, folder: str, rerun_of: str | None = None) -> store.NewJob:
    """Job ``n`` of a large batch: its own key and item, every one naming the same image."""
    job = _job("x", f"{folder}/images/a.png", "a" * 64, rerun_of, item=n)
    return replace(job, key=f"{n:064d}", input={**job.input, "prompt": f"take {n}"})


def test_a_page_of_jobs_follows_in_a_bounded_number_of_statements(engine: Engine) -> None:
    """500 rerun jobs follow their originals in one UPDATE per page, not one per job.

    Was: an ``executemany`` of a one-row UPDATE, which the database runs once per job (psycopg
    pipelines them; each is still a statement): 250,000 jobs took about 45 s on PostgreSQL. An
    ``executemany`` counts here as the statements it runs, one per parameter set."""
    a = "a" * 64
    jobs = 500
    with db.session_scope(engine) as session:
        root = _batch(
            session,
            "clip",
            None,
            [_many(n, OLD) for n in range(jobs)],
        )
        originals = {job.item_index: job.id for job in store.jobs_of_batch(session, root)}
        rerun = _batch(
            session,
            "clip-rerun-1",
            root,
            [_many(n, OLD, originals[n]) for n in range(jobs)],
        )
        store.resubmit_jobs(session, root, [_many(n, NEW) for n in range(jobs)], lambda: 1)
        store.set_batch_manifest_path(session, root, f"{NEW}/m.yaml")

    updates: list[int] = []

    def count(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("UPDATE JOBS"):
            updates.append(len(parameters) if many else 1)

    engines = {engine, db.writer_engine(engine)}
    with db.session_scope(engine) as session:
        for one in engines:
            event.listen(one, "before_cursor_execute", count)
        try:
            followed = store.reruns_follow(session, root, f"{NEW}/m.yaml", chunk=200)
        finally:
            for one in engines:
                event.remove(one, "before_cursor_execute", count)
    assert followed == ["clip-rerun-1"]
    assert sum(updates) == 3, updates  # pages of 200, 200 and 100 jobs: one UPDATE each

    with db.session_scope(engine) as session:
        moved = (f"{NEW}/images/a.png", {"source": "images/a.png", "sha256": a})
        jobs_now = list(store.jobs_of_batch(session, rerun))
        assert len(jobs_now) == jobs
        assert all((j.input["image_url"], (j.source_files or {})["image_url"]) == moved for j in jobs_now)
        assert all(job.input["prompt"] == f"take {job.item_index}" for job in jobs_now)
