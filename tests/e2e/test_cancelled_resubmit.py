"""`submit` and `run` of a batch `wanbatch cancel` ended are refused: a cancel is for good.

Submitting the edited manifest of a cancelled batch said "updated: … 1 new" with no warning, and
the run that followed cancelled the new job at once ("cancelled by user", exit 1); running the
unchanged manifest sent nothing and exited 1. Now both say the batch is cancelled and the ways on
(a rerun as a new batch, or a new `name`): exit 2, one line, nothing stored, nothing sent.

Embedded SQLite mode, the real click group in process, against the bundled simulator.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

from falsim.server import SimulatorHandle
from jobs import db, store
from jobs.models import Batch, BatchState, Job
from jobs.settings import get_settings
from jobs.states import JobState
from tests.e2e.e2e_helpers import FAL_KEY, MakeManifest, Wb

NIGHT = """\
name: night
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  num_frames: 81
matrix:
  seed: [{seeds}]
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
"""

CANCELLED = (
    "batch night is cancelled (`wanbatch cancel`) and cannot be resumed; `wanbatch rerun night "
    "--failed-only{simulate}` runs what failed or was cancelled again as a new batch"
)
#: What `submit` and `run` of the manifest add: a new `name` submits it as a new batch.
NEW_NAME = " (or give the manifest a new `name`)"


def _totals(wb: Wb, batch: str) -> tuple[int, dict[str, int]]:
    report = wb("status", batch, "--json").json()
    return report["total"], {state: n for state, n in report["counts"].items() if n}


def test_submit_and_run_of_a_cancelled_batch_are_refused(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = manifest("night", NIGHT.format(seeds="1, 2"))
    assert wb("submit", path).code == 0
    assert wb("cancel", "night", "--no-progress").code == 1  # both jobs cancelled, never sent
    path.write_text(NIGHT.format(seeds="1, 2, 3"), encoding="utf-8")  # one job more

    line = CANCELLED.format(simulate="") + NEW_NAME
    submitted = wb("submit", path)
    assert submitted.code == 2
    assert (submitted.stdout, submitted.stderr.strip().splitlines()) == ("", [f"error: {line}"])
    as_json = wb("submit", path, "--json")
    assert as_json.code == 2
    assert as_json.json() == {"ok": False, "error": line}

    ran = wb("run", path, "--no-progress", "--json")
    assert ran.code == 2
    assert ran.json() == {"ok": False, "error": line}

    path.write_text(NIGHT.format(seeds="1, 2"), encoding="utf-8")  # the manifest as it was cancelled
    unchanged = wb("run", path, "--no-progress")
    assert unchanged.code == 2
    assert unchanged.stderr.strip().splitlines() == [f"error: {line}"]

    by_name = wb("run", "night", "--no-progress")  # no manifest to rename: the rerun only
    assert by_name.code == 2
    assert by_name.stderr.strip().splitlines() == [f"error: {CANCELLED.format(simulate='')}"]
    # Without FAL_KEY the same: "FAL_KEY is not set" sent the user off to be refused again.
    monkeypatch.delenv("FAL_KEY")
    get_settings.cache_clear()
    keyless = wb("run", "night", "--no-progress")
    assert (keyless.code, keyless.stderr.strip().splitlines()) == (2, by_name.stderr.strip().splitlines())
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    get_settings.cache_clear()

    assert _totals(wb, "night") == (2, {"cancelled": 2})  # the new job was never stored
    assert sim.ledger()["accepted"] == 0

    # The ways on that the line names go on.
    rerun = wb("rerun", "night", "--failed-only", "--no-progress", "--json")
    assert rerun.code == 0, rerun.stderr
    assert (rerun.json()["name"], rerun.json()["counts"]["succeeded"]) == ("night-rerun-1", 2)
    path.write_text(NIGHT.format(seeds="1, 2, 3").replace("name: night", "name: morning"), encoding="utf-8")
    renamed = wb("run", path, "--no-progress", "--json")
    assert renamed.code == 0, renamed.stderr
    assert renamed.json()["counts"]["succeeded"] == 3


def test_a_cancelled_simulation_is_refused_with_simulate_in_the_hint(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    path = manifest("night", NIGHT.format(seeds="1, 2"))
    assert wb("run", path, "--simulate", "--no-progress").code == 0
    with db.session_scope(db.open_engine(get_settings())) as session:  # a run stopped before its last job
        batch_id = store.get_batch(session, "night").id
        first = next(iter(store.jobs_of_batch(session, batch_id))).id
        session.execute(update(Job).where(Job.id == first).values(state=JobState.PENDING))
    assert wb("cancel", "night", "--simulate", "--no-progress").code == 1

    path.write_text(NIGHT.format(seeds="1, 2, 3"), encoding="utf-8")
    ran = wb("run", path, "--simulate", "--no-progress", "--json")
    assert ran.code == 2
    assert ran.json() == {"ok": False, "error": CANCELLED.format(simulate=" --simulate") + NEW_NAME}
    assert _totals(wb, "night") == (2, {"succeeded": 1, "cancelled": 1})


def test_a_cancel_still_under_way_is_named_first(wb: Wb, manifest: MakeManifest) -> None:
    """Cancelled while its jobs were not all ended yet (an interrupted `cancel`, workers at it):
    `rerun --failed-only` would leave those out, so the line says `cancel` finishes them first."""
    path = manifest("night", NIGHT.format(seeds="1, 2"))
    assert wb("submit", path).code == 0
    with db.session_scope(db.open_engine(get_settings())) as session:  # what `cancel` records first
        session.execute(update(Batch).where(Batch.name == "night").values(state=BatchState.CANCELLED))

    submitted = wb("submit", path, "--json")
    assert submitted.code == 2
    assert submitted.json()["error"] == (
        "batch night is cancelled (`wanbatch cancel`) and cannot be resumed; 2 job(s) of it are still "
        "being cancelled (`wanbatch cancel night` finishes that), then `wanbatch rerun night "
        "--failed-only` runs what failed or was cancelled again as a new batch" + NEW_NAME
    )
    assert _totals(wb, "night") == (2, {"pending": 2})


def test_a_paid_video_a_webhook_proved_after_the_cancel_is_named_by_status_and_collected_by_run(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """After the batch's run ended, `wanbatch serve` applied fal's webhook proving that a request
    our cancel was said to end ran to the end (billed): the job was adopted back into
    `downloading`, and no process was left to fetch its video. `status` said only "no ETA:
    cancelled", and `run night` was refused as "still being cancelled": the paid video stayed
    unfetched, silently, until fal's result expired. Now `status` says `run night` collects it,
    and `run night` does, sending nothing."""
    path = manifest("night", NIGHT.format(seeds="1, 2"))
    assert wb("run", path, "--no-progress").code == 0
    assert sim.ledger()["accepted"] == 2
    with db.session_scope(db.open_engine(get_settings())) as session:
        batch_id = store.get_batch(session, "night").id
        proved = next(iter(store.jobs_of_batch(session, batch_id)))
        Path(proved.output_path or "").unlink()
        # What `cancel` then an adoption by webhook (jobs.store.adopt_cancelled_proof, then the
        # completion) leave: the batch cancelled, the job's video at fal, nothing fetched.
        session.execute(update(Batch).where(Batch.id == batch_id).values(state=BatchState.CANCELLED))
        session.execute(
            update(Job)
            .where(Job.id == proved.id)
            .values(state=JobState.DOWNLOADING, output_path=None, output_sha256=None, lease_owner=None)
        )

    status = wb("status", "night")
    assert status.code == 0, status.stderr
    shown = " ".join((status.stdout + status.stderr).split())
    assert "nothing is processing it: `wanbatch run night`, or a worker, collects them" in shown, shown
    assert "(1 paid video(s) to fetch)" in shown
    listed = " ".join(wb("status").stdout.split())
    assert "1 paid video(s) to fetch" in listed, listed

    ran = wb("run", "night", "--no-progress", "--json")
    assert ran.code == 0, ran.stderr
    assert "collecting its 1 job(s) at fal or downloading" in " ".join(ran.stderr.split())
    assert _totals(wb, "night") == (2, {"succeeded": 2})
    assert sim.ledger()["accepted"] == 2  # nothing sent
    with db.session_scope(db.open_engine(get_settings())) as session:
        after = store.get_job(session, proved.id)
        assert after.state == JobState.SUCCEEDED
        assert Path(after.output_path or "").is_file()
        assert store.get_batch(session, batch_id).state == BatchState.CANCELLED
