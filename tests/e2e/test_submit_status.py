"""`submit` is idempotent and `status --json` carries the contract's fields, on both dialects."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.e2e_helpers import Wb, counts

STATUS_KEYS = {"batch", "name", "total", "counts", "estimated_usd", "spent_usd", "possible_duplicate_charges"}


@pytest.fixture(params=["sqlite", "postgresql"])
def e2e_db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'submit.db'}"
    else:
        url = request.getfixturevalue("new_pg_database")()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", url)
    return url


def test_submit_twice_adds_nothing_and_status_reports(wb: Wb, examples_copy: Path, e2e_db: str) -> None:
    path = examples_copy / "seed-resolution-sweep.yaml"
    first = wb("submit", path, "--json")
    assert first.code == 0, first.stderr
    one = first.json()
    assert one["total"] == 6
    assert one["added"] == 6
    assert one["counts"]["pending"] == 6

    second = wb("submit", path, "--json")
    assert second.code == 0, second.stderr
    two = second.json()
    assert two["batch"] == one["batch"]
    assert two["total"] == 6
    assert two["added"] == 0
    assert two["existing"] == 6
    assert counts(e2e_db) == (1, 6)

    human = wb("submit", path)
    assert human.code == 0
    assert human.stdout == one["batch"] + "\n"  # the id alone: `B=$(wanbatch submit m.yaml)`
    said = f"batch {one['batch']} (seed-resolution-sweep) updated: 6 job(s), 0 new, 6 already stored"
    assert said in human.stderr
    assert counts(e2e_db) == (1, 6)

    status = wb("status", one["batch"], "--json")
    assert status.code == 0, status.stderr
    report = status.json()
    assert report.keys() >= STATUS_KEYS
    assert report["batch"] == one["batch"]
    assert report["name"] == "seed-resolution-sweep"
    assert report["total"] == 6
    assert report["counts"]["pending"] == 6
    assert sum(report["counts"].values()) == 6
    assert report["estimated_usd"] == pytest.approx(1.8)
    assert report["spent_usd"] == 0
    assert report["possible_duplicate_charges"] == 0

    # The name and an id prefix are accepted too; an unknown batch is a usage error (2).
    assert wb("status", "seed-resolution-sweep", "--json").json()["batch"] == one["batch"]
    assert wb("status", one["batch"][:8], "--json").json()["batch"] == one["batch"]
    every = wb("status", "--json").json()
    assert [b["batch"] for b in every["batches"]] == [one["batch"]]
    unknown = wb("status", "no-such-batch", "--json")
    assert unknown.code == 2
    assert "Traceback" not in unknown.stdout + unknown.stderr
