"""The reproducibility audit's reruns, on both dialects (:func:`jobs.rerun.rerun_batch`).

* ``rerun B --failed-only`` paid again for the videos a sibling rerun D had rendered (B and D
  both ``rerun A --failed-only``): only B's own reruns were asked. ``status B`` never said so.
* A plain ``rerun`` after an image was replaced and the manifest resubmitted was refused for
  ever, the digests of the jobs no longer in the manifest merged with the current ones.
* A rerun sent stored inputs the endpoint registry no longer allows; its images too, which
  were left to the SHA-256 check alone (a file unchanged, but past a limit narrowed since).
* ``rerun --max-usd`` below every job's estimate stored a batch whose every job the cap cancelled.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update

from jobs import db, store
from jobs.errors import UsageError
from jobs.models import Job
from jobs.rendered import rerun_covered, rerun_covered_of_batches
from jobs.rerun import NothingToRerun, rerun_batch
from jobs.settings import Settings
from jobs.states import JobState as S

IMAGES = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "images"


def _job(
    i: int,
    job_input: dict[str, Any],
    *,
    sources: dict[str, Any] | None = None,
    endpoint: str = "fal-ai/wan-22",
) -> store.NewJob:
    return store.NewJob(
        key=f"{i:064x}",
        item_index=i,
        endpoint=endpoint,
        input=job_input,
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.20"),
        source_files=sources,
    )


def _settings(engine: Engine) -> Settings:
    return Settings(database_url=engine.url.render_as_string(hide_password=False))


def _set_states(engine: Engine, batch_id: str, state: S, **values: Any) -> None:
    with db.session_scope(engine) as session:
        session.execute(update(Job).where(Job.batch_id == batch_id).values(state=state, **values))


def _names(engine: Engine) -> list[str]:
    with db.read_scope(engine) as session:
        return sorted(b.name for b in store.list_batches(session))


def test_failed_only_of_a_rerun_leaves_out_what_a_sibling_rendered(engine: Engine) -> None:
    """The audit: A's 2 jobs failed; B = ``rerun A --failed-only`` failed again; D = the same
    command, rendered them. ``rerun B --failed-only`` sent both again (pinned seeds: D's very
    videos) and paid; ``status B`` advised it."""
    with db.session_scope(engine) as session:
        a, _ = store.get_or_create_batch(
            session, name="night", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
        )
        store.add_jobs(session, a.id, [_job(i, {"prompt": f"p{i}", "resolution": "480p"}) for i in range(2)])
        session.execute(
            update(Job).where(Job.batch_id == a.id).values(state=S.FAILED, seed=7, error_type="model_error")
        )
    settings = _settings(engine)
    b = rerun_batch("night", failed_only=True, settings=settings)
    _set_states(engine, b.batch_id, S.FAILED, error_type="model_error")
    d = rerun_batch("night", failed_only=True, settings=settings)
    assert d.name == "night-rerun-2"
    _set_states(engine, d.batch_id, S.SUCCEEDED)

    with pytest.raises(NothingToRerun) as nothing:
        rerun_batch(b.name, failed_only=True, settings=settings)

    said = str(nothing.value)
    assert "already rendered with the same input by night-rerun-2" in said, said
    assert _names(engine) == ["night", "night-rerun-1", "night-rerun-2"]
    with db.read_scope(engine) as session:
        batch = store.get_batch(session, b.batch_id)
        one = rerun_covered(session, batch)
        many = rerun_covered_of_batches(session, store.list_batches(session))[b.batch_id]
    for covered in (one, many):  # status B, and status with no batch
        assert covered.rendered["jobs"] == 2
        assert [r["name"] for r in covered.rendered["reruns"]] == ["night-rerun-2"]
    # Asked for in so many words, they are sent again all the same.
    forced = rerun_batch(b.name, failed_only=True, pay_again=True, settings=settings)
    assert forced.added == 2
    # Two generations down, D (the grandparent's other rerun) still counts: C's jobs failed too.
    _set_states(engine, forced.batch_id, S.FAILED, error_type="model_error")
    with pytest.raises(NothingToRerun, match="already rendered with the same input by night-rerun-2"):
        rerun_batch(forced.name, failed_only=True, settings=settings)
    with db.read_scope(engine) as session:
        batch = store.get_batch(session, forced.batch_id)
        assert rerun_covered(session, batch).rendered["jobs"] == 2
        every = rerun_covered_of_batches(session, store.list_batches(session))
    assert {store_id: c.rendered["jobs"] for store_id, c in every.items()} == {
        a.id: 2,
        b.batch_id: 2,
        d.batch_id: 0,
        forced.batch_id: 2,
    }


def _image_job(i: int, image: Path, content: bytes) -> store.NewJob:
    digest = hashlib.sha256(content).hexdigest()
    sources = {"image_url": {"source": "images/night.jpg", "sha256": digest}}
    job_input = {"prompt": "a night", "image_url": str(image), "seed": 3}
    return _job(i, job_input, sources=sources, endpoint="fal-ai/wan-i2v")


def test_a_plain_rerun_after_an_image_was_replaced_leaves_out_the_old_jobs(
    engine: Engine, tmp_path: Path
) -> None:
    """The image was replaced and the manifest resubmitted: the old job is no longer in it. A
    plain rerun merged both jobs' digests and was refused for ever ("changed since the batch
    was submitted" of a file the new job sends as is), the original put back or not."""
    folder = tmp_path.resolve()
    image = folder / "images" / "night.jpg"
    image.parent.mkdir()
    # Real images: a rerun checks them against the endpoint's limits as validate does.
    old, new = (IMAGES / "landscape.jpg").read_bytes(), (IMAGES / "night.jpg").read_bytes()
    image.write_bytes(new)
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session,
            name="night",
            manifest_path=str(folder / "night.yaml"),
            manifest_sha256="0" * 64,
            budget_max_usd=None,
        )
        store.add_jobs(session, batch.id, [_image_job(0, image, old)])
        session.execute(update(Job).values(state=S.SUCCEEDED, seed=3))
        store.resubmit_jobs(session, batch.id, [_image_job(1, image, new)], lambda: 1)  # the old one out
        session.execute(update(Job).values(state=S.SUCCEEDED, seed=3))
        jobs = {j.not_in_manifest: j.id for j in store.jobs_of_batch(session, batch.id)}
    settings = _settings(engine)

    result = rerun_batch("night", settings=settings)

    with db.read_scope(engine) as session:
        assert [j.rerun_of for j in store.jobs_of_batch(session, result.batch_id)] == [jobs[False]]
    said = [w for w in result.warnings if "images/night.jpg" in w]
    assert said == [
        "1 job(s) of batch night no longer in its manifest send a file changed since they were "
        "submitted (images/night.jpg): left out (sent, they would fail)"
    ]

    image.write_bytes(old)  # the original back: now the manifest's job would send other bytes
    with pytest.raises(UsageError) as refused:
        rerun_batch("night", settings=settings)
    lines = str(refused.value).splitlines()
    assert lines[0].startswith("cannot rerun batch night: 1 source file differs"), lines
    then, now = hashlib.sha256(new).hexdigest()[:12], hashlib.sha256(old).hexdigest()[:12]
    assert lines[1:] == [
        f"  images/night.jpg: changed since the batch was submitted (SHA-256 {then}… then, {now}… now)"
    ]
    assert _names(engine) == ["night", "night-rerun-1"]


def _failed_batch(engine: Engine, name: str, inputs: list[dict[str, Any]], cap: Decimal | None = None) -> str:
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session, name=name, manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=cap
        )
        store.add_jobs(session, batch.id, [_job(i, values) for i, values in enumerate(inputs)])
        session.execute(
            update(Job)
            .where(Job.batch_id == batch.id)
            .values(state=S.FAILED, seed=5, error_type="model_error")
        )
        return batch.id


def test_a_rerun_refuses_stored_inputs_the_registry_no_longer_allows(engine: Engine) -> None:
    """A resolution removed from the endpoint's enum (stored before, as the registry allowed it
    then) was sent by ``rerun`` unchecked: now one line per problem, exit 2, nothing stored."""
    batch = _failed_batch(
        engine,
        "old",
        [
            {"prompt": "a", "resolution": "1080p"},
            {"prompt": "b", "resolution": "1080p"},
            {"prompt": "c", "resolution": "480p", "motion": 3},
        ],
    )
    with db.read_scope(engine) as session:
        ids = {j.item_index: j.id[:8] for j in store.jobs_of_batch(session, batch)}

    for failed_only in (False, True):
        with pytest.raises(UsageError) as refused:
            rerun_batch("old", failed_only=failed_only, settings=_settings(engine))

        assert refused.value.exit_code == 2
        lines = str(refused.value).splitlines()
        assert lines[0].startswith("cannot rerun batch old: 2 stored input problems are no longer allowed"), (
            lines
        )
        assert len(lines) == 3, lines
        assert lines[1] == (
            f"  batch old, job {ids[0]} (item 0): field 'resolution': '1080p' is not one of the allowed "
            "values (allowed: 480p, 580p, 720p); and 1 more job(s)"
        )
        assert lines[2].startswith(
            f"  batch old, job {ids[2]} (item 2): field 'motion': unknown field 'motion'"
        )
        assert "(allowed: the fields of fal-ai/wan-22: prompt, " in lines[2]
    assert _names(engine) == ["old"]


def test_a_rerun_refuses_an_image_past_the_registrys_limits_now(engine: Engine, tmp_path: Path) -> None:
    """A job stored under a registry whose limit has narrowed since (or one past Wan 2.6's
    schema's 240-7680 pixels, stored by hand), its file unchanged, was rerun with its image
    unchecked (only its SHA-256 was): fal refuses it. Now refused as ``validate`` refuses that
    image, naming the parent batch, job and field; nothing stored. A URL is not fetched (its
    form alone is checked, as validate checks it): a job sending one goes."""
    from PIL import Image

    folder = tmp_path.resolve()
    image = folder / "images" / "wide.png"
    image.parent.mkdir()
    Image.new("RGB", (8000, 1200), "gray").save(image)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    endpoint = "wan/v2.6/image-to-video"
    sources = {"image_url": {"source": "images/wide.png", "sha256": digest}}
    jobs = [
        _job(i, {"prompt": f"p{i}", "image_url": str(image), "seed": 3}, sources=sources, endpoint=endpoint)
        for i in range(3)
    ]
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session,
            name="wide",
            manifest_path=str(folder / "wide.yaml"),
            manifest_sha256="0" * 64,
            budget_max_usd=None,
        )
        store.add_jobs(session, batch.id, jobs)
        session.execute(update(Job).values(state=S.FAILED, seed=3, error_type="model_error"))
        first = min(store.jobs_of_batch(session, batch.id), key=lambda j: j.item_index).id[:8]

    with pytest.raises(UsageError) as refused:
        rerun_batch("wide", failed_only=True, settings=_settings(engine))

    assert refused.value.exit_code == 2
    lines = str(refused.value).splitlines()
    assert lines[0].startswith("cannot rerun batch wide: 1 stored media input is no longer allowed"), lines
    assert lines[0].endswith("nothing was stored. Edit the manifest (another file) and submit it:")
    assert lines[1] == (
        f"  batch wide, job {first} (item 0): field 'image_url': the image is 8000x1200 pixels, "
        "too large (allowed: from 240x240 to 7680x7680 pixels); and 2 more job(s)"
    )
    assert len(lines) == 2
    assert _names(engine) == ["wide"]

    # Sent by URL: not fetched here (nor by validate), so not refused.
    url = {"prompt": "u", "image_url": "https://example.com/wide.png", "seed": 3}
    with db.session_scope(engine) as session:
        other, _ = store.get_or_create_batch(
            session, name="byurl", manifest_path="/m.yaml", manifest_sha256="1" * 64, budget_max_usd=None
        )
        store.add_jobs(session, other.id, [_job(0, url, endpoint=endpoint)])
    result = rerun_batch("byurl", settings=_settings(engine))
    assert result.added == 1


def test_a_rerun_warns_of_an_image_past_a_limit_fal_only_advises(engine: Engine, tmp_path: Path) -> None:
    """A 4K photo on Wan 2.6 is inside its schema's 240-7680 pixels but outside its overview's
    advised 360-2000: ``validate``, ``submit`` and ``run`` warn and send it. A rerun sent it
    too, but said nothing (its check kept only the errors). Now it warns as it refuses: one line
    naming the parent batch, job and field, the other jobs counted; the rerun is stored."""
    from PIL import Image

    folder = tmp_path.resolve()
    image = folder / "images" / "photo.jpg"
    image.parent.mkdir()
    Image.new("RGB", (3840, 2160), "gray").save(image)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    endpoint = "wan/v2.6/image-to-video"
    sources = {"image_url": {"source": "images/photo.jpg", "sha256": digest}}
    jobs = [
        _job(i, {"prompt": f"p{i}", "image_url": str(image), "seed": 3}, sources=sources, endpoint=endpoint)
        for i in range(3)
    ]
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session,
            name="photo",
            manifest_path=str(folder / "photo.yaml"),
            manifest_sha256="0" * 64,
            budget_max_usd=None,
        )
        store.add_jobs(session, batch.id, jobs)
        session.execute(update(Job).values(state=S.FAILED, seed=3, error_type="model_error"))
        first = min(store.jobs_of_batch(session, batch.id), key=lambda j: j.item_index).id[:8]

    result = rerun_batch("photo", failed_only=True, settings=_settings(engine))

    assert result.added == 3
    assert result.warnings == [
        f"batch photo, job {first} (item 0): field 'image_url': the image is 3840x2160 pixels: "
        "fal's overview says from 360x360 to 2000x2000 pixels, its input schema allows from "
        "240x240 to 7680x7680 pixels; sent as is; and 2 more job(s)"
    ]


def test_a_rerun_whose_cap_fits_no_job_is_refused_before_storing(engine: Engine) -> None:
    """``rerun X --failed-only --max-usd 0.1`` with $0.20 jobs stored, each time, a batch whose
    every job the cap cancelled."""
    jobs = [{"prompt": "a", "resolution": "480p"}, {"prompt": "b", "resolution": "480p"}]  # $0.2025 each
    _failed_batch(engine, "capped", jobs, cap=Decimal("0.10"))
    settings = _settings(engine)

    with pytest.raises(UsageError) as refused:
        rerun_batch("capped", failed_only=True, max_usd=Decimal("0.1"), settings=settings)

    assert str(refused.value) == (
        "cannot rerun batch capped: its cap $0.10 (--max-usd) is below the estimate of each of its 2 "
        "job(s) (the cheapest: $0.20), so every job would be cancelled for budget; nothing was stored. "
        "Give --max-usd 0.21 or more"
    )
    # What is left of the parent's cap: all of it, nothing committed.
    with pytest.raises(UsageError, match=r"\(what is left of batch capped.s budget.max_usd \(\$0.10; "):
        rerun_batch("capped", failed_only=True, settings=settings)
    assert _names(engine) == ["capped"]
    # One job fits: stored (the cap cancels the other, as asked).
    assert rerun_batch("capped", failed_only=True, max_usd=Decimal("0.21"), settings=settings).added == 2
