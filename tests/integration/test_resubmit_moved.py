"""A manifest submitted again from a folder it was moved to (:func:`jobs.store.resubmit_jobs`),
on both dialects: the stored jobs take the media paths it gives now, nothing else of their input,
and what a sent job sent stays as it was."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from jobs import store
from jobs.models import Job


def _job(i: int, folder: str, **extra: Any) -> store.NewJob:
    return store.NewJob(
        key=f"{i:064x}",
        item_index=i,
        endpoint="fal-ai/wan-i2v",
        input={"prompt": f"item {i}", "image_url": f"{folder}/images/{i}.jpg", **extra},
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.40"),
        source_files={"image_url": {"source": f"images/{i}.jpg", "sha256": f"{i:064x}"}},
    )


def test_stored_jobs_take_the_paths_the_manifest_gives_now(session: Session) -> None:
    batch, _ = store.get_or_create_batch(
        session, name="moved", manifest_path="/old/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    # Job 0 holds a value stored since (never in the manifest); job 1 was sent.
    store.add_jobs(session, batch.id, [_job(0, "/old", seed_note="kept"), _job(1, "/old"), _job(2, "/old")])
    sent = {"prompt": "item 1", "image_url": "data:image/jpeg;base64,AAAA"}
    session.execute(update(Job).where(Job.job_key == f"{1:064x}").values(submitted_input=sent))
    session.commit()

    # The manifest moved to /new; item 2 is no longer in it.
    again = store.resubmit_jobs(session, batch.id, [_job(0, "/new"), _job(1, "/new")], lambda: 2)
    session.commit()
    assert (again.added, again.present, again.relocated, again.not_in_manifest) == (0, 2, 2, 1)
    jobs = {job.job_key[-1]: job for job in store.jobs_of_batch(session, batch.id)}
    assert jobs["0"].input == {"prompt": "item 0", "image_url": "/new/images/0.jpg", "seed_note": "kept"}
    assert jobs["1"].input == {"prompt": "item 1", "image_url": "/new/images/1.jpg"}
    assert jobs["1"].submitted_input == sent
    assert jobs["2"].input["image_url"] == "/old/images/2.jpg"

    # The same manifest again: nothing to relocate. A renamed file (its written path too) is.
    renamed = _job(1, "/new")
    renamed.input["image_url"] = "/new/images/renamed.jpg"
    renamed.source_files["image_url"]["source"] = "images/renamed.jpg"  # type: ignore[index]
    assert store.resubmit_jobs(session, batch.id, [_job(0, "/new")], lambda: 1).relocated == 0
    assert store.resubmit_jobs(session, batch.id, [_job(0, "/new"), renamed], lambda: 2).relocated == 1
    session.commit()
    session.expire_all()  # written with Core: the jobs loaded above are as they were
    job = next(j for j in store.jobs_of_batch(session, batch.id) if j.job_key == f"{1:064x}")
    assert (job.input["image_url"], job.source_files) == (
        "/new/images/renamed.jpg",
        {"image_url": {"source": "images/renamed.jpg", "sha256": f"{1:064x}"}},
    )
