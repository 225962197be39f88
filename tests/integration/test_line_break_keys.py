"""A batch stored before schema 0042 from an ``items_from`` CSV with CRLF line endings (a quoted
multi-line cell kept as ``two\\r\\nlines``, keyed so) submitted again after the upgrade adds
nothing, from the CRLF file or the same file with LF endings, on SQLite and PostgreSQL.

A CSV cell's line breaks are now read as ``\\n`` and keys hold every text's line breaks as
``\\n``: without migration 0042 the job stored with ``\\r\\n`` would hold a key the manifest no
longer gives, and a resubmit would leave it out and store (and pay for) the same item again.
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
from jobs.manifest import canonical_json, key_of, keyed_input, validate_manifest
from jobs.models import Job
from jobs.settings import Settings
from tests.older_rows import older_batch

LANDSCAPE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "images" / "landscape.jpg"
MANIFEST = """name: rows
endpoint: fal-ai/wan-i2v
defaults: {image_url: images/landscape.jpg, seed: 7}
items_from: rows.csv
"""
ROWS = b'prompt\n"two\nlines"\none line\n'


def test_line_breaks_are_keyed_as_lf_and_a_csv_cell_is_read_so() -> None:
    assert canonical_json({"prompt": "two\r\nlines"}) == canonical_json({"prompt": "two\nlines"})
    assert canonical_json({"prompt": "two\rlines"}) == canonical_json({"prompt": "two\nlines"})
    assert canonical_json({"p": ["a\r\nb"]}) == canonical_json({"p": ["a\nb"]})
    assert canonical_json({"prompt": "two\r\nlines"}, breaks_as_written=True) != canonical_json(
        {"prompt": "two\nlines"}
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def old_url(request: pytest.FixtureRequest, tmp_path: Path, new_pg_database: Callable[[], str]) -> str:
    """A database at schema 0041 (before 0042 keyed line breaks as ``\\n``)."""
    url = f"sqlite:///{tmp_path / 'old.db'}" if request.param == "sqlite" else new_pg_database()
    engine = make_engine(url)
    migrate(engine, "0041", from_models=False)
    engine.dispose()
    return url


def _manifest(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    shutil.copyfile(LANDSCAPE, tmp_path / "images" / "landscape.jpg")
    (tmp_path / "rows.csv").write_bytes(ROWS)
    path = tmp_path / "rows.yaml"
    path.write_text(MANIFEST, encoding="utf-8")
    return path


def _submitted_before_0042(path: Path, settings: Settings) -> str:
    """The manifest stored as a version before 0042 stored it from the CRLF file: the two-line
    prompt with ``\\r\\n``, keyed as written. Returns the batch's id."""
    report = validate_manifest(path)
    assert report.manifest is not None
    two, one = list(report.manifest.jobs())
    assert two.input["prompt"] == "two\nlines"
    crlf = dataclasses.replace(two, input={**two.input, "prompt": "two\r\nlines"})
    engine = make_engine(settings.database_url)
    try:
        with db.session_scope(engine) as session:
            batch_id = older_batch(
                session,
                "rows",
                manifest_path=str(path.resolve()),
                manifest_sha256=report.manifest.sha256,
                manifest_text=report.manifest.text,
            )
            old = []
            for spec in (crlf, one):
                endpoint = get_endpoint(spec.endpoint)
                key = key_of(endpoint.id, keyed_input(endpoint, spec.input), breaks_as_written=True)
                (new,) = batches._new_jobs(iter([spec]), settings)
                old.append(dataclasses.replace(new, key=key))
            assert store.add_jobs(session, batch_id, old) == (2, 0)
            return batch_id
    finally:
        engine.dispose()


def _jobs(url: str, batch_id: str) -> dict[str, tuple[str, str | None, dict[str, object]]]:
    """Each job's key, content key and input, by prompt."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Job.job_key, Job.content_key, Job.input).where(Job.batch_id == batch_id)
            ).all()
            return {str(given["prompt"]): (key, content, given) for key, content, given in rows}
    finally:
        engine.dispose()


def test_a_batch_keyed_before_0042_from_a_crlf_csv_submitted_again_adds_nothing(
    old_url: str, tmp_path: Path
) -> None:
    path = _manifest(tmp_path)
    settings = Settings(database_url=old_url)
    batch_id = _submitted_before_0042(path, settings)
    before = _jobs(old_url, batch_id)

    for rows in (ROWS.replace(b"\n", b"\r\n"), ROWS):  # the CRLF file again, then the LF one
        (tmp_path / "rows.csv").write_bytes(rows)
        again = batches.submit_manifest(path, settings)  # migrates to head first
        assert (again.batch_id, again.created, again.added, again.existing) == (batch_id, False, 0, 2)
        assert again.not_in_manifest == 0

    after = _jobs(old_url, batch_id)
    keys = [job.key for job in validate_manifest(path).manifest.jobs()]  # type: ignore[union-attr]
    assert [after["two\r\nlines"][0], after["one line"][0]] == keys
    assert after["two\r\nlines"][0] != before["two\r\nlines"][0]
    assert after["one line"] == before["one line"]
    # Nothing sent changes: the stored input is as it was stored.
    assert after["two\r\nlines"][2] == before["two\r\nlines"][2]

    # A downgrade gives the old keys back.
    engine = make_engine(old_url)
    try:
        downgrade(engine, "0041")
    finally:
        engine.dispose()
    assert _jobs(old_url, batch_id) == before
