"""A rerun is always a batch of its own, reproduces only what it can, and ``diff`` pairs it with
its parent job by job, whatever ``--vary`` did to the inputs and variant numbers."""

from __future__ import annotations

from typing import Any

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import TWO_JOBS, MakeManifest, Wb, export_jsonl, processed

# Pinned seeds, two resolutions, num_frames left to the endpoint's default (81).
SIZES = """\
name: {name}
endpoint: fal-ai/wan-i2v
matrix:
  resolution: [480p, 720p]
items:
  - prompt: Cars racing in slow motion
    image_url: images/landscape.jpg
    seed: 1
"""

SEEDS = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
matrix:
  seed: [7, 8]
items:
  - prompt: A boat on a lake
    image_url: images/night.jpg
"""


def _run(wb: Wb, path: Any) -> str:
    return str(processed(wb, "run", path)["batch"])


def _rerun(wb: Wb, batch: str, *options: str) -> dict[str, Any]:
    return processed(wb, "rerun", batch, *options)


def _inputs(wb: Wb, *batches: str) -> dict[str, dict[str, Any]]:
    """Every job's stored input, by job id."""
    return {r["job_id"]: r["input"] for b in batches for r in export_jsonl(wb, b)}


@pytest.mark.slow
def test_rerun_never_adds_its_jobs_to_a_batch_that_has_its_name(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    parent = _run(wb, manifest("mine", TWO_JOBS.format(name="mine")))
    # The user's own, unrelated batch happens to be called what the first rerun would be.
    squatter = _run(wb, manifest("squat", SEEDS.format(name="mine-rerun-1")))

    first = _rerun(wb, parent)
    second = _rerun(wb, parent)

    assert first["name"] == "mine-rerun-2"
    assert second["name"] == "mine-rerun-3"
    for report in (first, second):
        assert report["parent_batch"] == parent
        assert report["total"] == 2
        assert report["counts"]["succeeded"] == 2
    own = wb("status", squatter, "--json").json()
    assert own["total"] == 2
    assert own["parent_batch"] is None


@pytest.mark.slow
def test_rerun_of_a_batch_whose_seeds_are_not_known_yet_is_refused(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    # Stored, never sent: fal has picked no seed for either job.
    assert wb("submit", manifest("later", TWO_JOBS.format(name="later"))).code == 0
    before = wb("status", "--json").json()["batches"]

    refused = wb("rerun", "later", "--no-progress")

    assert refused.code == 2
    assert "batch later is still running: 2 jobs have not finished" in refused.stderr
    assert "--new-seeds" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert wb("status", "--json").json()["batches"] == before  # nothing stored
    # Fresh seeds do not depend on the parent's: that rerun is allowed.
    fresh = _rerun(wb, "later", "--new-seeds")
    assert fresh["counts"]["succeeded"] == 2


@pytest.mark.slow
def test_vary_repeats_of_another_job_are_stored_once_with_a_warning(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    parent = _run(wb, manifest("seeds", SEEDS.format(name="seeds")))

    done = wb("rerun", parent, "--vary", "seed=7..8", "--json", "--no-progress")

    assert done.code == 0, done.stderr
    assert done.json()["total"] == 2  # seeds 7 and 8 once each, not four jobs
    assert "warning" in done.stderr
    assert "2 of the rerun's 4 jobs repeat another one's exact input" in done.stderr
    # Why, plainly: the two jobs of the seed matrix end up with the same seed.
    assert "(item 0's jobs with seed=7 and with seed=8 both become seed=7)" in " ".join(done.stderr.split())


@pytest.mark.slow
def test_diff_pairs_a_vary_rerun_with_the_jobs_it_repeats(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    parent = _run(wb, manifest("sizes", SIZES.format(name="sizes")))
    # 81 frames is the endpoint's default: those two jobs ask exactly what the parent's asked.
    again = _rerun(wb, parent, "--vary", "num_frames=81,100")["batch"]
    # Neither value repeats the parent: each job pairs with its own original, by origin.
    longer = _rerun(wb, parent, "--vary", "num_frames=90,100")["batch"]
    inputs = _inputs(wb, parent, again, longer)

    same = wb("diff", parent, again, "--json")
    report = same.json()
    assert (report["same"], report["different"], report["only_a"], report["only_b"]) == (2, 0, 0, 2)
    for pair in report["jobs"]:
        if pair["a"] is None:
            assert inputs[pair["b"]["job_id"]]["num_frames"] == 100
            continue
        assert pair["result"] == "same"
        assert pair["matched_by"] == "input"
        a, b = inputs[pair["a"]["job_id"]], inputs[pair["b"]["job_id"]]
        assert (a["resolution"], b["num_frames"]) == (b["resolution"], 81)

    report = wb("diff", parent, longer, "--json").json()
    assert (report["different"], report["only_a"], report["only_b"]) == (2, 0, 2)
    for pair in report["jobs"]:
        if pair["a"] is not None:
            assert pair["matched_by"] == "origin"
            a, b = inputs[pair["a"]["job_id"]], inputs[pair["b"]["job_id"]]
            assert a["resolution"] == b["resolution"]  # the 720p original meets a 720p repeat
            assert b["num_frames"] == 90  # the first of its combinations


@pytest.mark.slow
def test_prose_into_a_pipe_is_one_line_per_message(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # no width given: not a terminal, nothing to wrap at
    parent = _run(wb, manifest("whole", TWO_JOBS.format(name="whole")))

    done = wb("rerun", parent, "--failed-only")

    assert done.code == 0
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert len(lines[0]) > 80  # long enough that rich's stand-in width of 80 used to break it
    assert lines[0].startswith("nothing to rerun: batch whole")
    assert lines[0].endswith("no batch was created")


@pytest.mark.slow
def test_rerun_keeps_the_daily_window_not_the_parents_instants(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    window = f"{(now - timedelta(hours=1)):%H:%M}-{(now + timedelta(hours=1)):%H:%M}"  # open now
    deadline = (now + timedelta(hours=2)).isoformat()
    body = TWO_JOBS.format(name="nightly") + (
        f"priority: low\nschedule:\n  window: '{window}'\n  timezone: UTC\n  deadline: {deadline}\n"
    )
    parent = _run(wb, manifest("nightly", body))

    rerun = _rerun(wb, parent)

    status = wb("status", rerun["batch"], "--json").json()
    assert status["schedule"] == {"not_before": None, "deadline": None, "window": window, "timezone": "UTC"}
    assert status["priority"] == "low"
    assert rerun["counts"]["succeeded"] == 2  # the window is open: sent at once
