"""An embedded `run`, `rerun` or `cancel` works on its own batch only (issue #9).

The bug: a 3-job quickstart `run` processed every pending job in the database, spending $180 on
another, 120k-job batch that had only been `submit`ted. The simulator's ledger is the provider's
side of the story: it must show no request for the other batch.
"""

from __future__ import annotations

from pathlib import Path

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, db_rows

OTHER = """name: big-other-batch
endpoint: fal-ai/wan-22
items:
{items}
"""
MINE = """name: small-run
endpoint: fal-ai/wan-22
items:
  - prompt: mine one
  - prompt: mine two
"""


def _other_manifest(manifest: MakeManifest, n: int = 6) -> Path:
    items = "\n".join(f"  - prompt: other batch item {i}" for i in range(n))
    return manifest("other", OTHER.format(items=items))


def _ledger_ids(sim: SimulatorHandle) -> set[str]:
    """The request ids fal accepted."""
    return {entry["request_id"] for entry in sim.ledger()["entries"]}


def _request_ids(db: str, *names: str) -> set[str]:
    """The request ids the database recorded for the jobs of the batches called ``names``."""
    quoted = ", ".join(f"'{n}'" for n in names)
    return {
        row[0]
        for row in db_rows(
            db,
            "SELECT j.request_id FROM jobs j JOIN batches b ON b.id = j.batch_id "
            f"WHERE b.name IN ({quoted}) AND j.request_id IS NOT NULL",
        )
    }


def _other_states(db: str) -> list[tuple[str, int, int]]:
    return [
        (row[0], row[1], row[2])
        for row in db_rows(
            db,
            "SELECT j.state, j.attempts, count(*) FROM jobs j JOIN batches b ON b.id = j.batch_id "
            "WHERE b.name = 'big-other-batch' GROUP BY j.state, j.attempts",
        )
    ]


def test_embedded_run_leaves_another_submitted_batch_alone(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'wanbatch.db'}"
    submitted = wb("submit", _other_manifest(manifest), "--json")
    assert submitted.code == 0, submitted.stderr

    run = wb("run", manifest("mine", MINE), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    assert run.json()["counts"]["succeeded"] == 2

    assert _ledger_ids(sim) == _request_ids(db, "small-run")  # every request fal saw is the run's
    assert len(_ledger_ids(sim)) == 2
    assert _other_states(db) == [("pending", 0, 6)]
    events = db_rows(
        db,
        "SELECT count(*) FROM job_events e JOIN jobs j ON j.id = e.job_id "
        "JOIN batches b ON b.id = j.batch_id WHERE b.name = 'big-other-batch'",
    )
    assert events[0][0] == 0  # not even a claim's transition
    assert not (tmp_path / "outputs" / "big-other-batch").exists()


def test_embedded_cancel_and_rerun_leave_another_batch_alone(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'wanbatch.db'}"
    first = wb("run", manifest("mine", MINE), "--json", "--no-progress")
    assert first.code == 0, first.stderr
    assert wb("submit", _other_manifest(manifest), "--json").code == 0

    rerun = wb("rerun", "small-run", "--json", "--no-progress")
    assert rerun.code == 0, rerun.stderr
    assert rerun.json()["counts"]["succeeded"] == 2
    cancel = wb("cancel", "small-run", "--json", "--no-progress")
    assert cancel.code in (0, 1), cancel.stderr

    # two for the run, two for the rerun, none for the other batch
    assert _ledger_ids(sim) == _request_ids(db, "small-run", "small-run-rerun-1")
    assert len(_ledger_ids(sim)) == 4
    assert _other_states(db) == [("pending", 0, 6)]

    # And the other batch still runs in full when its own turn comes.
    other = wb("run", _other_manifest(manifest), "--json", "--no-progress")
    assert other.code == 0, other.stderr
    assert other.json()["counts"]["succeeded"] == 6
    assert sim.ledger()["accepted"] == 10


def test_run_resumes_a_stored_batch_by_name(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest) -> None:
    """`run BATCH` drives a stored batch: how an interrupted `rerun` (no manifest of its own) resumes."""
    submitted = wb("submit", manifest("mine", MINE), "--json")
    assert submitted.code == 0, submitted.stderr
    run = wb("run", "small-run", "--json", "--no-progress")
    assert run.code == 0, run.stderr
    report = run.json()
    assert report["batch"] == submitted.json()["batch"]
    assert report["counts"]["succeeded"] == 2
    assert len(_ledger_ids(sim)) == 2

    # Neither a stored batch nor a file: one line saying both, exit 2.
    missing = wb("run", "no-such-batch", "--no-progress")
    assert missing.code == 2
    assert "no manifest file 'no-such-batch', and no batch 'no-such-batch'" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_run_resumes_a_stored_batch_beside_a_folder_of_its_name(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """`run BATCH` in a folder holding a sub-folder named like the batch resumes the batch: a
    folder is no manifest file. A folder that names no batch either is the manifest's own error."""
    submitted = wb("submit", manifest("mine", MINE), "--json")
    assert submitted.code == 0, submitted.stderr
    (Path.cwd() / "small-run").mkdir()
    run = wb("run", "small-run", "--json", "--no-progress")
    assert run.code == 0, run.stderr
    report = run.json()
    assert report["batch"] == submitted.json()["batch"]
    assert report["counts"]["succeeded"] == 2

    (Path.cwd() / "just-a-folder").mkdir()
    folder = wb("run", "just-a-folder", "--no-progress")
    assert folder.code == 2
    assert "just-a-folder: not a regular file" in folder.stdout + folder.stderr
    assert "nothing was submitted" in folder.stdout + folder.stderr
    assert "Traceback" not in folder.stderr
    assert len(_ledger_ids(sim)) == 2
