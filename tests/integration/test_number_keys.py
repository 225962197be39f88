"""A batch stored before schema 0034 (numbers keyed as written: ``guide_scale: 5.0`` as ``5.0``)
submitted again after the upgrade adds nothing, on SQLite and PostgreSQL.

Keys now hold numbers by their value (``5.0`` as ``5``): without migration 0034 the jobs stored
with a whole-number float would hold a key the manifest no longer gives, and a resubmit of the
unchanged manifest would store (and pay for) them a second time.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from jobs import batches, db, store
from jobs.db import downgrade, make_engine, migrate
from jobs.endpoints import get_endpoint
from jobs.manifest import key_of, keyed_input, validate_manifest
from jobs.models import Job
from jobs.settings import Settings
from tests.older_rows import older_batch

LANDSCAPE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "images" / "landscape.jpg"
#: The schema audit's ``num.yaml``: items 0 and 1 are one request, item 2 writes out a default.
NUM = """name: num
endpoint: fal-ai/wan-i2v
items:
  - {prompt: same, image_url: images/landscape.jpg, seed: 7, guide_scale: 5}
  - {prompt: same, image_url: images/landscape.jpg, seed: 7, guide_scale: 5.0}
  - {prompt: other, image_url: images/landscape.jpg, seed: 7, shift: 5.0}
  - {prompt: other, image_url: images/landscape.jpg, seed: 7}
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def old_url(request: pytest.FixtureRequest, tmp_path: Path, new_pg_database: Callable[[], str]) -> str:
    """A database at schema 0033 (before 0034 keyed numbers by their value)."""
    url = f"sqlite:///{tmp_path / 'old.db'}" if request.param == "sqlite" else new_pg_database()
    engine = make_engine(url)
    migrate(engine, "0033", from_models=False)
    engine.dispose()
    return url


def _manifest(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    shutil.copyfile(LANDSCAPE, tmp_path / "images" / "landscape.jpg")
    path = tmp_path / "num.yaml"
    path.write_text(NUM, encoding="utf-8")
    return path


def _submitted_before_0034(path: Path, settings: Settings) -> str:
    """The manifest stored as a version before 0034 stored it: four jobs (``5`` and ``5.0`` two),
    each keyed with its numbers as written; returns the batch's id."""
    report = validate_manifest(path)
    assert report.manifest is not None
    specs = list(report.manifest.jobs())
    assert len(specs) == 3  # what this version makes of it; the old one kept item 1 apart
    item_1 = dataclasses.replace(specs[0], item_index=1, input={**specs[0].input, "guide_scale": 5.0})
    specs.insert(1, item_1)
    engine = make_engine(settings.database_url)
    try:
        with db.session_scope(engine) as session:
            batch_id = older_batch(
                session,
                "num",
                manifest_path=str(path.resolve()),
                manifest_sha256=report.manifest.sha256,
                manifest_text=report.manifest.text,
            )
            old = []
            for spec in specs:
                endpoint = get_endpoint(spec.endpoint)
                key = key_of(endpoint.id, keyed_input(endpoint, spec.input), numbers_as_written=True)
                (new,) = batches._new_jobs(iter([spec]), settings)
                old.append(dataclasses.replace(new, key=key))
            assert store.add_jobs(session, batch_id, old) == (4, 0)
            return batch_id
    finally:
        engine.dispose()


def _jobs(url: str, batch_id: str) -> dict[str, tuple[str, str | None, dict[str, object]]]:
    """Each job's key, content key and input, by id."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Job.id, Job.job_key, Job.content_key, Job.input).where(Job.batch_id == batch_id)
            ).all()
            return {job_id: (key, content, given) for job_id, key, content, given in rows}
    finally:
        engine.dispose()


def _ids(url: str, batch_id: str) -> list[str]:
    """The batch's job ids, in item order."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            query = select(Job.id).where(Job.batch_id == batch_id).order_by(Job.item_index, Job.variant)
            return list(conn.execute(query).scalars())
    finally:
        engine.dispose()


def test_a_batch_keyed_before_0034_submitted_again_adds_nothing(old_url: str, tmp_path: Path) -> None:
    path = _manifest(tmp_path)
    settings = Settings(database_url=old_url)
    batch_id = _submitted_before_0034(path, settings)
    before = _jobs(old_url, batch_id)
    same, twin, shifted, plain = _ids(old_url, batch_id)

    again = batches.submit_manifest(path, settings)  # migrates to head first

    assert (again.batch_id, again.created, again.added, again.existing) == (batch_id, False, 0, 3)
    assert (again.total, again.not_in_manifest) == (4, 1)  # item 1's job (5.0) stays: it may have been sent
    after = _jobs(old_url, batch_id)
    keys = [job.key for job in validate_manifest(path).manifest.jobs()]  # type: ignore[union-attr]
    # Item 2 (shift: 5.0) took the key its input gives now; items 0 (5) and 3 had theirs already.
    assert [after[j][0] for j in (same, shifted, plain)] == keys
    assert after[shifted][0] != before[shifted][0]
    assert (after[same], after[plain]) == (before[same], before[plain])
    # Item 1 (5.0): its twin item 0 holds the new key; it keeps its own and records that one.
    assert after[twin][:2] == (before[twin][0], keys[0])
    # Nothing sent changes: the stored inputs are as written.
    assert {j: row[2] for j, row in after.items()} == {j: row[2] for j, row in before.items()}
    assert isinstance(after[twin][2]["guide_scale"], float)

    # A downgrade gives the old keys back, and drops the twin's content key.
    engine = make_engine(old_url)
    try:
        downgrade(engine, "0033")
    finally:
        engine.dispose()
    assert _jobs(old_url, batch_id) == before
