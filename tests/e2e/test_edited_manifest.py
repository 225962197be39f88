"""A manifest edited and submitted again: every job's ``(item_index, variant)`` is its place in
the text the batch now stores.

Jobs are identified by key, so an item inserted above others used to leave the jobs already
stored with the numbers of the old text while new jobs took the new text's: two jobs shared
``(0, 0)``, and the export (and the hf export's ``manifest.yaml``) named the wrong items — as did
``diff``'s pairing by item and variant. Jobs the manifest no longer has stay in the batch,
numbered after its items.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import Engine

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl, processed

SWEEP = """\
name: edited
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
matrix:
  seed: {seeds}
items:
{items}"""

ITEM = "  - {{prompt: {prompt}, image_url: images/{image}}}\n"
IMAGES = {"zeroth": "night.jpg", "first": "landscape.jpg", "second": "square.png", "third": "square.png"}


def _sweep(prompts: list[str], seeds: list[int]) -> str:
    items = "".join(ITEM.format(prompt=p, image=IMAGES[p]) for p in prompts)
    return SWEEP.format(seeds=json.dumps(seeds), items=items)


def _places(records: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(r["item_index"], r["variant"]) for r in records]


def _assert_named_by(text: str, records: list[dict[str, Any]]) -> None:
    """Every record's place is unique, and names its own prompt and seed in the manifest ``text``
    (or lies past its items: a job the manifest no longer has)."""
    places = _places(records)
    assert not [p for p, n in Counter(places).items() if n > 1], places
    manifest = yaml.safe_load(text)
    seeds = manifest.get("matrix", {}).get("seed")
    for record in records:
        index, variant = record["item_index"], record["variant"]
        if index >= len(manifest["items"]):
            continue
        assert record["input"]["prompt"] == manifest["items"][index]["prompt"], record
        if seeds is not None:
            assert record["input"]["seed"] == seeds[variant], record


@pytest.fixture
def any_db(db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> str:
    """This test's database, on both dialects (the submit stores jobs by dialect); through
    ``engine``, which empties the run's shared PostgreSQL database afterwards."""
    monkeypatch.setenv("WANBATCH_DATABASE_URL", db_url)
    return db_url


def test_a_resubmitted_manifest_numbers_every_job_as_its_stored_text_does(
    wb: Wb, manifest: MakeManifest, any_db: str
) -> None:
    path = manifest("edited", _sweep(["first", "second", "third"], [1, 2]))
    first = wb("submit", path, "--json")
    assert first.code == 0, first.stderr

    # An item inserted on top, one removed, the matrix reordered.
    path.write_text(_sweep(["zeroth", "first", "third"], [2, 1]), encoding="utf-8")
    second = wb("submit", path, "--json")
    assert second.code == 0, second.stderr
    report = second.json()
    assert (report["added"], report["existing"], report["total"]) == (2, 4, 8)
    records = export_jsonl(wb, "edited")
    _assert_named_by(path.read_text(encoding="utf-8"), records)
    assert [(r["item_index"], r["variant"], r["input"]["prompt"], r["input"]["seed"]) for r in records] == [
        (0, 0, "zeroth", 2),
        (0, 1, "zeroth", 1),
        (1, 0, "first", 2),
        (1, 1, "first", 1),
        (2, 0, "third", 2),
        (2, 1, "third", 1),
        # no longer in the manifest: kept, after its 3 items, with the variants they had
        (3, 0, "second", 1),
        (3, 1, "second", 2),
    ]
    assert (report["renumbered"], report["not_in_manifest"]) == (4, 2)
    human = wb("submit", path)
    assert human.code == 0, human.stderr
    assert "2 job(s) of batch edited are no longer in its manifest" in human.stderr
    assert "item_index 3 and up" in human.stderr

    # The removed item back, last: its jobs (the same keys) take its place; nothing is added.
    path.write_text(_sweep(["zeroth", "first", "third", "second"], [2, 1]), encoding="utf-8")
    third = wb("submit", path, "--json")
    assert third.code == 0, third.stderr
    records = export_jsonl(wb, "edited")
    _assert_named_by(path.read_text(encoding="utf-8"), records)
    assert _places(records) == [(i, v) for i in range(4) for v in range(2)]
    assert (third.json()["added"], third.json()["renumbered"], third.json()["not_in_manifest"]) == (0, 2, 0)


def test_inserting_an_item_above_others_keeps_the_export_and_the_hf_manifest_in_step(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """The auditor's case: two jobs run, an item inserted on top, run again."""
    body = (
        "name: r4\nendpoint: fal-ai/wan-i2v\ndefaults: {resolution: 480p, seed: 1}\nitems:\n"
        "  - {prompt: first, image_url: images/landscape.jpg}\n"
        "  - {prompt: second, image_url: images/square.png}\n"
    )
    path = manifest("r4", body)
    processed(wb, "run", path)
    path.write_text(
        body.replace("items:\n", "items:\n  - {prompt: new zeroth, image_url: images/night.jpg}\n"),
        encoding="utf-8",
    )
    before = {r["job_id"]: r["video_path"] for r in export_jsonl(wb, "r4")}
    processed(wb, "run", path)

    records = export_jsonl(wb, "r4")
    assert [(r["item_index"], r["variant"], r["input"]["prompt"]) for r in records] == [
        (0, 0, "new zeroth"),
        (1, 0, "first"),
        (2, 0, "second"),
    ]
    for record in records:  # stored outputs keep their names; the new job is filed by its place
        assert record["video_path"] == before.get(record["job_id"], f"r4/000000-{record['job_id'][:12]}.mp4")

    out = tmp_path / "hf"
    assert wb("export", "r4", "--format", "hf", "-o", out).code == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert (out / row["file_name"]).is_file()
        row["input"] = json.loads(row["input"])  # JSON text in metadata.jsonl
    _assert_named_by((out / "manifest.yaml").read_text(encoding="utf-8"), rows)


def test_diff_pairs_an_edited_prompt_by_its_place_after_an_item_was_inserted_above_it(
    wb: Wb, manifest: MakeManifest
) -> None:
    """Batch A got an item inserted on top; batch B, from the same file, also edits a prompt:
    that job pairs by item and variant with A's, which means both must hold the same text's places."""
    body = (
        "name: {name}\nendpoint: fal-ai/wan-i2v\ndefaults: {{resolution: 480p, seed: 1}}\nitems:\n"
        "{zeroth}  - {{prompt: {first}, image_url: images/landscape.jpg}}\n"
        "  - {{prompt: second, image_url: images/square.png}}\n"
    )
    zeroth = "  - {prompt: new zeroth, image_url: images/night.jpg}\n"
    path = manifest("pairs", body.format(name="pairs-a", zeroth="", first="first"))
    assert wb("submit", path).code == 0
    path.write_text(body.format(name="pairs-a", zeroth=zeroth, first="first"), encoding="utf-8")
    assert wb("submit", path).code == 0
    path.write_text(body.format(name="pairs-b", zeroth=zeroth, first="first edited"), encoding="utf-8")
    assert wb("submit", path).code == 0

    done = wb("diff", "pairs-a", "pairs-b", "--json")
    assert done.code == 1, done.stderr  # nothing ran: no pair has the same video
    report = done.json()
    assert (report["only_a"], report["only_b"]) == (0, 0)
    by_prompt = {job["a"]["prompt"]: job for job in report["jobs"]}
    edited = by_prompt["first"]
    assert edited["matched_by"] == "item"
    a, b = edited["a"], edited["b"]
    assert (b["prompt"], b["item_index"], b["variant"]) == ("first edited", 1, 0)
    assert (a["item_index"], a["variant"]) == (1, 0)
