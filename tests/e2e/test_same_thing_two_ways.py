"""The same manifest written two ways is one batch of the same jobs, paid for once.

The audit's cases: a batch name typed in Unicode NFC and in NFD (``é`` one character, or ``e``
and a combining accent — what macOS file names and some keyboards give) made a second batch and
rendered every job again, its videos filed into the same folder; and an ``items_from`` CSV
re-saved with CRLF line endings (Excel, git's ``autocrlf``) turned a quoted multi-line cell's
``\\n`` into ``\\r\\n``: another prompt, another job key, a job sent and billed again."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, counts, export_jsonl

NFC = unicodedata.normalize("NFC", "Café Noir")
NFD = unicodedata.normalize("NFD", "Café Noir")
BODY = (
    "name: {name}\nendpoint: fal-ai/wan-i2v\n"
    "defaults: {{resolution: 480p, image_url: images/landscape.jpg}}\n"
    "items:\n  - {{prompt: a quiet street, seed: 1}}\n  - {{prompt: rain at night, seed: 2}}\n"
)


@pytest.fixture
def any_db(db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both dialects; through ``engine``, which empties the shared PostgreSQL database after."""
    monkeypatch.setenv("WANBATCH_DATABASE_URL", db_url)
    return db_url


def test_a_batch_name_in_nfd_after_nfc_is_the_same_batch_and_sends_nothing(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, any_db: str
) -> None:
    assert NFC != NFD
    first = wb("run", manifest("nn_NFC", BODY.format(name=NFC)), "--json", "--no-progress")
    assert first.code == 0, first.stderr
    assert sim.ledger()["accepted"] == 2
    again = wb("run", manifest("nn_NFD", BODY.format(name=NFD)), "--json", "--no-progress")
    assert again.code == 0, again.stderr
    assert again.json()["batch"] == first.json()["batch"]
    assert sim.ledger()["accepted"] == 2  # nothing sent again
    assert counts(any_db) == (1, 2)
    for spelling in (NFC, NFD):
        status = wb("status", spelling, "--json")
        assert status.code == 0, status.stderr
        assert status.json()["batch"] == first.json()["batch"]


def test_a_csv_with_crlf_line_endings_is_the_same_jobs_with_the_same_prompts(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, any_db: str, tmp_path: Path
) -> None:
    path = manifest(
        "rows",
        "name: rows\nendpoint: fal-ai/wan-i2v\n"
        "defaults: {resolution: 480p, image_url: images/landscape.jpg, seed: 3}\nitems_from: rows.csv\n",
    )
    rows = path.parent / "rows.csv"
    rows.write_bytes(b'prompt\n"two\nlines"\none line\n')
    assert wb("run", path, "--no-progress").code == 0
    assert sim.ledger()["accepted"] == 2
    for ending in (b"\r\n", b"\r"):  # Excel / git autocrlf, and an old Mac's lone CR
        rows.write_bytes(b'prompt\n"two\nlines"\none line\n'.replace(b"\n", ending))
        again = wb("run", path, "--json", "--no-progress")
        assert again.code == 0, again.stderr
        assert sim.ledger()["accepted"] == 2  # nothing sent again
        assert counts(any_db) == (1, 2)
    assert sorted(r["input"]["prompt"] for r in export_jsonl(wb, "rows")) == ["one line", "two\nlines"]


def test_a_csv_first_submitted_with_crlf_sends_the_prompt_with_lf(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, any_db: str
) -> None:
    path = manifest(
        "crlf",
        "name: crlf\nendpoint: fal-ai/wan-i2v\n"
        "defaults: {resolution: 480p, image_url: images/landscape.jpg, seed: 3}\nitems_from: rows.csv\n",
    )
    (path.parent / "rows.csv").write_bytes(b'prompt\r\n"two\r\nlines"\r\n')
    assert wb("run", path, "--no-progress").code == 0
    assert sim.ledger()["accepted"] == 1
    assert [r["input"]["prompt"] for r in export_jsonl(wb, "crlf")] == ["two\nlines"]


def test_two_batches_stored_under_one_name_in_two_spellings_are_refused_by_name_in_one_line(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, any_db: str
) -> None:
    """What the upgrade to schema 0041 keeps as it is: a batch stored under the NFC name and one
    under the NFD name. Neither is picked silently: each spelling, and a manifest of that name,
    is refused in one line naming both ids; by id each is found."""
    first = wb("run", manifest("nn_NFC", BODY.format(name=NFC)), "--json", "--no-progress")
    assert first.code == 0, first.stderr
    kept = first.json()["batch"]
    other = "f" * 32
    engine = create_engine(any_db)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO batches (id, name, manifest_path, manifest_sha256, created_at, state) "
                    "VALUES (:id, :name, 'm.yaml', :sha, :at, 'active')"
                ),
                {"id": other, "name": NFD, "sha": "0" * 64, "at": datetime(2026, 1, 1, tzinfo=UTC)},
            )
    finally:
        engine.dispose()
    for spelling in (NFC, NFD):
        refused = wb("status", spelling)
        assert refused.code == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        for phrase in ("is ambiguous", kept, other, "give the id of the one you mean"):
            assert phrase in lines[0], lines[0]
    assert wb("status", kept, "--json").json()["batch"] == kept
    assert wb("status", other, "--json").json()["batch"] == other
    again = wb("run", manifest("nn_NFD", BODY.format(name=NFD)), "--json", "--no-progress")
    assert again.code == 2
    assert "give the manifest another `name`" in again.stderr
    assert kept in again.stderr
    assert sim.ledger()["accepted"] == 2
    assert counts(any_db) == (2, 2)
