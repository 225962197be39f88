"""``wanbatch rerun BATCH --vary FIELD=VALUES`` end to end on the simulator (issue #13).

A sweep repeats every stored job once per value (the product over several options), every other
input field exactly as it was, each job with its own key and estimate; a value the endpoint's
schema refuses stops the rerun in one line (exit 2) before any batch is stored.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import TWO_JOBS, MakeManifest, Wb, counts, db_rows, export_jsonl

# TWO_JOBS has no seeds: fal picks them, and an unvaried rerun pins the ones it returned.


def _parent(wb: Wb, manifest: MakeManifest, name: str) -> tuple[str, dict[int, dict[str, Any]]]:
    """Run the two-job batch; its id and its export records by item."""
    done = wb("run", manifest(name, TWO_JOBS.format(name=name)), "--json", "--no-progress")
    assert done.code == 0, done.stderr
    batch = str(done.json()["batch"])
    return batch, {r["item_index"]: r for r in export_jsonl(wb, batch)}


def _rerun(wb: Wb, batch: str, *options: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    done = wb("rerun", batch, *options, "--json", "--no-progress")
    assert done.code == 0, done.stderr
    report: dict[str, Any] = done.json()
    return report, export_jsonl(wb, report["batch"])


def _without(record: dict[str, Any], *fields: str) -> dict[str, Any]:
    return {k: v for k, v in record["input"].items() if k not in fields}


def _keys(batch: str) -> list[str]:
    url = os.environ["WANBATCH_DATABASE_URL"]
    return [row[0] for row in db_rows(url, f"SELECT job_key FROM jobs WHERE batch_id = '{batch}'")]


@pytest.mark.slow
def test_vary_seed_range_sweeps_each_job_over_every_seed(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    parent, original = _parent(wb, manifest, "sweep")
    report, records = _rerun(wb, parent, "--vary", "seed=1..3")

    assert report["parent_batch"] == parent
    assert report["total"] == 6
    assert report["counts"]["succeeded"] == 6
    assert len(records) == 6
    for index, first in original.items():
        mine = [r for r in records if r["item_index"] == index]
        assert sorted(r["input"]["seed"] for r in mine) == [1, 2, 3]
        assert sorted(r["seed"] for r in mine) == [1, 2, 3]  # what fal used: the pinned seed
        assert sorted(r["variant"] for r in mine) == [0, 1, 2]  # each combination its own
        for rec in mine:
            assert _without(rec, "seed") == _without(first, "seed")  # the rest exact
            assert rec["source_files"] == first["source_files"]
    keys = _keys(report["batch"])
    assert len(set(keys)) == 6  # a fresh key per job
    assert not set(keys) & set(_keys(parent))
    # Six jobs at the parent's per-job price.
    parent_usd = wb("status", parent, "--json").json()["estimated_usd"]
    assert report["estimated_usd"] == pytest.approx(3 * parent_usd)


@pytest.mark.slow
def test_vary_resolution_and_the_product_of_two_options(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    parent, original = _parent(wb, manifest, "res")
    parent_usd = wb("status", parent, "--json").json()["estimated_usd"]

    report, records = _rerun(wb, parent, "--vary", "resolution=480p,720p")
    assert report["total"] == 4
    assert report["counts"]["succeeded"] == 4
    assert Counter((r["item_index"], r["input"]["resolution"]) for r in records) == {
        (0, "480p"): 1,
        (0, "720p"): 1,
        (1, "480p"): 1,
        (1, "720p"): 1,
    }
    for rec in records:
        first = original[rec["item_index"]]
        assert rec["input"]["seed"] == first["seed"]  # unvaried: the returned seed, as a plain rerun
        assert _without(rec, "resolution", "seed") == _without(first, "resolution", "seed")
        assert rec["media"]["height"] == int(rec["input"]["resolution"].removesuffix("p"))
    # Fresh estimates: 480p is 0.5 billing units and 720p 1, so 0.5 + 1 per job against 0.5.
    assert report["estimated_usd"] == pytest.approx(3 * parent_usd)

    report, records = _rerun(wb, parent, "--vary", "seed=5,6", "--vary", "resolution=480p,720p")
    assert report["total"] == 8
    assert report["counts"]["succeeded"] == 8
    combos = Counter((r["item_index"], r["input"]["seed"], r["input"]["resolution"]) for r in records)
    assert combos == {(i, s, res): 1 for i in (0, 1) for s in (5, 6) for res in ("480p", "720p")}
    for rec in records:
        assert _without(rec, "resolution", "seed") == _without(
            original[rec["item_index"]], "resolution", "seed"
        )


def test_a_value_listed_twice_is_one_job_with_the_repeat_warning(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """`resolution=480p,480p` silently made one job per job; README: a warning counts repeats."""
    parent, _ = _parent(wb, manifest, "twice")
    done = wb("rerun", parent, "--vary", "resolution=480p,480p", "--json", "--no-progress")
    assert done.code == 0, done.stderr
    assert done.json()["total"] == 2
    assert "warning" in done.stderr
    said = " ".join(done.stderr.split())
    assert "2 of the rerun's 4 jobs repeat another one's exact input and are stored once" in said
    # Which value repeats, in the option's words (it said "one of item 0's is item 0 variant 0").
    assert "(resolution=480p is listed twice in --vary resolution=480p,480p); 2 jobs in all" in said
    assert "variant" not in said


@pytest.mark.parametrize(
    ("option", "phrases"),
    [
        ("resolution=480p,1080p", ["--vary resolution=480p,1080p", "'1080p'", "allowed: 480p, 720p"]),
        ("seed=1,two", ["--vary seed=1,two", "expected an integer", "allowed: an integer"]),
        ("num_frames=81..200", ["--vary num_frames=81..200", "out of range", "allowed: an integer from"]),
        ("sed=1..3", ["--vary sed=1..3", "unknown field 'sed'", "did you mean 'seed'"]),
        ("image_url=a.png,b.png", ["--vary image_url=a.png,b.png", "media field"]),
        ("seed", ["--vary seed", "FIELD=VALUES"]),
        ("seed=3..1", ["--vary seed=3..1", "empty"]),
        ("seed=1,,2", ["--vary seed=1,,2", "empty value"]),
    ],
)
def test_a_bad_vary_is_one_line_exit_2_and_stores_nothing(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, option: str, phrases: list[str]
) -> None:
    submitted = wb("submit", manifest("bad", TWO_JOBS.format(name="bad")), "--json")
    assert submitted.code == 0, submitted.stderr
    url = os.environ["WANBATCH_DATABASE_URL"]
    before = counts(url)

    done = wb("rerun", "bad", "--vary", option, "--no-progress")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.code == 2, done.stderr
    assert len(lines) == 1, done.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert counts(url) == before
    assert sim.ledger()["entries"] == []  # nothing sent either


def test_vary_seed_with_new_seeds_and_a_field_twice_are_refused(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    assert wb("submit", manifest("twice", TWO_JOBS.format(name="twice"))).code == 0
    url = os.environ["WANBATCH_DATABASE_URL"]
    before = counts(url)
    both = wb("rerun", "twice", "--new-seeds", "--vary", "seed=1..2", "--no-progress")
    assert both.code == 2
    assert "--new-seeds" in both.stderr
    twice = wb("rerun", "twice", "--vary", "seed=1", "--vary", "seed=2", "--no-progress")
    assert twice.code == 2
    assert "already varied" in twice.stderr
    assert counts(url) == before
