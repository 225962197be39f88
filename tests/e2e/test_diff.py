"""``wanbatch diff`` end to end on the simulator: reruns compared with their parent, byte for byte."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import FAST_ENV, TWO_JOBS, MakeManifest, Wb, export_jsonl, processed

# TWO_JOBS has no seeds: fal picks them, so an exact rerun's keys (seed now in the input) differ
# from the parent's and the jobs pair by their input apart from the seed.

# Pinned seeds through a matrix: an exact rerun has the very same job keys.
PINNED = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  num_frames: 81
matrix:
  seed: [7, 8]
items:
  - prompt: {prompt}
    image_url: images/landscape.jpg
"""


def _run(wb: Wb, path: Path, *options: str) -> str:
    return str(processed(wb, "run", path, *options)["batch"])


def _rerun(wb: Wb, batch: str, *options: str) -> str:
    return str(processed(wb, "rerun", batch, *options)["batch"])


def _diff(wb: Wb, a: str, b: str, code: int) -> dict[str, Any]:
    done = wb("diff", a, b, "--json")
    assert done.code == code, done.stdout + done.stderr
    report: dict[str, Any] = done.json()
    return report


@pytest.mark.slow
def test_exact_rerun_is_the_same_and_new_seeds_differ(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    parent = _run(wb, manifest("repro", TWO_JOBS.format(name="repro")))
    exact = _rerun(wb, parent)

    report = _diff(wb, parent, exact, 0)
    assert (report["same"], report["different"], report["only_a"], report["only_b"]) == (2, 0, 0, 0)
    assert report["identical"] is True
    assert report["batch_a"]["batch"] == parent
    assert report["batch_b"]["batch"] == exact
    records = {r["job_id"]: r for r in export_jsonl(wb, parent) + export_jsonl(wb, exact)}
    for job in report["jobs"]:
        a, b = job["a"], job["b"]
        assert job["result"] == "same"
        assert job["differs"] == []
        assert job["matched_by"] == "input"  # fal picked the seeds: the rerun's keys differ
        assert a["job_id"] != b["job_id"]
        assert a["seed"] == b["seed"] is not None
        assert a["video_sha256"] == b["video_sha256"] is not None
        assert a["prompt"] == b["prompt"]
        assert a["cost_usd"] == b["cost_usd"]
        # Byte for byte on disk, not only as recorded.
        for side in (a, b):
            video = tmp_path / "outputs" / str(records[side["job_id"]]["video_path"])
            assert hashlib.sha256(video.read_bytes()).hexdigest() == side["video_sha256"]

    human = wb("diff", parent, exact)
    assert human.code == 0, human.stderr
    assert "2 same, 0 different, 0 only in A, 0 only in B" in human.stdout

    fresh = _rerun(wb, parent, "--new-seeds")
    report = _diff(wb, parent, fresh, 1)
    assert (report["same"], report["different"], report["only_a"], report["only_b"]) == (0, 2, 0, 0)
    assert report["identical"] is False
    for job in report["jobs"]:
        assert job["result"] == "different"
        assert job["matched_by"] == "input"
        assert {"video", "seed"} <= set(job["differs"])
        assert job["a"]["seed"] != job["b"]["seed"]
        assert isinstance(job["a"]["seed"], int)
        assert isinstance(job["b"]["seed"], int)
    human = wb("diff", parent, fresh)
    assert human.code == 1
    assert "0 same, 2 different" in human.stdout
    assert str(report["jobs"][0]["b"]["seed"]) in human.stdout  # the seeds are listed


@pytest.mark.slow
def test_pinned_seeds_match_by_key_and_unrelated_batches_do_not_match(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    pinned = _run(wb, manifest("pinned", PINNED.format(name="pinned", prompt="Clouds drifting")))
    exact = _rerun(wb, pinned)
    report = _diff(wb, "pinned", exact, 0)  # a name works as well as an id
    assert report["same"] == 2
    assert [job["matched_by"] for job in report["jobs"]] == ["job_key", "job_key"]
    assert sorted(job["a"]["seed"] for job in report["jobs"]) == [7, 8]

    other = _run(wb, manifest("other", PINNED.format(name="other", prompt="A different prompt")))
    report = _diff(wb, pinned, other, 1)
    assert (report["same"], report["different"], report["only_a"], report["only_b"]) == (0, 0, 2, 2)
    assert [job["result"] for job in report["jobs"]] == ["only_a", "only_a", "only_b", "only_b"]
    assert all(job["matched_by"] is None and job["differs"] == [] for job in report["jobs"])
    assert report["jobs"][0]["b"] is None
    assert report["jobs"][-1]["a"] is None


def test_unknown_batch_is_one_line_and_exit_2(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest) -> None:
    submitted = wb("submit", manifest("known", TWO_JOBS.format(name="known")), "--json")
    assert submitted.code == 0, submitted.stderr
    done = wb("diff", "known", "no-such-batch")
    assert done.code == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "no batch 'no-such-batch'" in lines[0]
    assert "Traceback" not in done.stdout + done.stderr


#: One pinned seed at two resolutions; a $0.30 cap sends the 480p job ($0.20) and cancels the
#: 720p one ($0.40) before it is sent.
CAPPED_SWEEP = """\
name: {name}
endpoint: fal-ai/wan-i2v
matrix:
  resolution: [480p, 720p]
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
    seed: 7
budget:
  max_usd: 0.30
"""


def test_diff_rows_tell_an_items_jobs_apart_and_show_pinned_seeds_of_unsent_jobs(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    run = wb("run", manifest("capped", CAPPED_SWEEP.format(name="capped")), "--json", "--no-progress")
    parent = run.json()  # exit 1: a job was cancelled by the budget
    assert (parent["counts"]["succeeded"], parent["counts"]["cancelled"]) == (1, 1), run.stdout
    fresh = _rerun(wb, parent["batch"], "--new-seeds", "--max-usd", "5")

    report = _diff(wb, parent["batch"], fresh, 1)
    (unsent,) = [job for job in report["jobs"] if job["a"]["status"] == "cancelled"]
    assert unsent["a"]["seed"] is None  # fal returned none: it was never sent
    assert unsent["a"]["pinned_seed"] == 7
    assert unsent["a"]["job_key"] != unsent["b"]["job_key"]

    human = wb("diff", parent["batch"], fresh)
    rows = [line for line in human.stdout.splitlines() if line.startswith("0 ")]
    assert len(rows) == 2, human.stdout
    by_resolution = {res: row for row in rows for res in ("480p", "720p") if f"0 resolution={res}" in row}
    assert sorted(by_resolution) == ["480p", "720p"], human.stdout
    assert f"7 / {unsent['b']['seed']}" not in by_resolution["720p"]
    assert f"7 (pinned) / {unsent['b']['seed']}" in by_resolution["720p"]
    assert "(pinned)" not in by_resolution["480p"]

    # The exact rerun sends the seed the cancelled job pinned: the same seed, not a difference.
    exact = _rerun(wb, parent["batch"], "--max-usd", "5")
    report = _diff(wb, parent["batch"], exact, 1)
    (unsent,) = [job for job in report["jobs"] if job["a"]["status"] == "cancelled"]
    assert unsent["b"]["seed"] == 7
    assert "seed" not in unsent["differs"]
    assert {"video", "status"} <= set(unsent["differs"])


#: A sweep over resolutions, the seeds left to fal: a `--new-seeds` rerun differs in each job.
SWEEP = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults:
  num_frames: 81
matrix:
  resolution: [480p, 720p]
items:
  - prompt: A calm mountain landscape, clouds drifting slowly past the peak
    image_url: images/landscape.jpg
"""


def test_at_80_columns_the_item_label_is_never_cut(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output into a pipe is 80 columns wide: the item column was cut to "0 resolutio…" in both
    rows of the sweep, which then read the same."""
    monkeypatch.setenv("COLUMNS", "80")  # what rich takes when stdout is no terminal
    parent = _run(wb, manifest("sweep", SWEEP.format(name="sweep")), "--simulate")
    fresh = _rerun(wb, parent, "--new-seeds", "--simulate")

    human = wb("diff", parent, fresh)

    assert human.code == 1, human.stdout + human.stderr
    lines = human.stdout.splitlines()
    assert max(cell_len(line.rstrip()) for line in lines) <= 80, human.stdout
    assert "…" not in human.stdout
    for label in ("0 resolution=480p", "0 resolution=720p"):
        assert sum(line.startswith(label + " ") for line in lines) == 1, human.stdout
    assert "sweep vs sweep-rerun-1: 0 same, 2 different, 0 only in A, 0 only in B" in human.stdout


@pytest.mark.slow
def test_a_simulated_exact_rerun_of_uploaded_images_is_the_same(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images over WANBATCH_INLINE_MAX_BYTES (most real photos) are uploaded, and each
    `--simulate` run uploads them again to a simulator of its own, under a new URL. The model
    works on the image's bytes, so the exact rerun still reproduces every video."""
    monkeypatch.setenv("WANBATCH_INLINE_MAX_BYTES", "1000")  # the example images are ~6 KB
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    parent = _run(
        wb, manifest("photos", PINNED.format(name="photos", prompt="Clouds drifting")), "--simulate"
    )
    exact = _rerun(wb, parent, "--simulate")
    sent = {r["input"]["image_url"] for r in export_jsonl(wb, parent) + export_jsonl(wb, exact)}
    assert len(sent) == 2  # one image, uploaded by each run under its own URL
    assert all(url.startswith("http") for url in sent)

    report = _diff(wb, parent, exact, 0)
    assert (report["same"], report["different"], report["only_a"], report["only_b"]) == (2, 0, 0, 0)
    assert all(job["a"]["video_sha256"] == job["b"]["video_sha256"] is not None for job in report["jobs"])


def _simulated(wb: Wb, path: Path) -> str:
    return _run(wb, path, "--simulate")


def test_unrelated_manifests_saved_at_one_path_never_pair_by_place(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """expB overwrote expA's file: another name, endpoint, resolution and every prompt. Item 0
    of each was paired with the other's ("different", matched by item), the endpoints unsaid."""
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    path = manifest(
        "exp",
        "name: expA\nendpoint: fal-ai/wan-22\ndefaults: {resolution: 480p}\nitems:\n"
        "  - {prompt: A lighthouse in a storm}\n  - {prompt: A cat sleeping on a windowsill}\n",
    )
    _simulated(wb, path)
    path.write_text(
        "name: expB\nendpoint: fal-ai/wan-i2v\ndefaults: {resolution: 720p}\nitems:\n"
        "  - {prompt: Totally unrelated experiment about cars, image_url: images/landscape.jpg}\n"
        "  - {prompt: Another unrelated thing, image_url: images/night.jpg}\n",
        encoding="utf-8",
    )
    _simulated(wb, path)

    report = _diff(wb, "expA", "expB", 1)
    assert (report["same"], report["different"], report["only_a"], report["only_b"]) == (0, 0, 2, 2)
    assert all(job["matched_by"] is None for job in report["jobs"])

    # The same endpoint throughout, but nothing the two ask in common: still no pairs.
    path.write_text(
        "name: expC\nendpoint: fal-ai/wan-22\ndefaults: {resolution: 720p}\nitems:\n"
        "  - {prompt: A submarine under the ice}\n  - {prompt: A parade in the rain}\n",
        encoding="utf-8",
    )
    _simulated(wb, path)
    report = _diff(wb, "expA", "expC", 1)
    assert (report["only_a"], report["only_b"]) == (2, 2)


def test_diff_json_warns_that_a_simulation_is_compared_with_a_batch_sent_to_fal(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    paid = _run(wb, manifest("paid", TWO_JOBS.format(name="paid")))
    rehearsal = _simulated(wb, manifest("rehearsal", TWO_JOBS.format(name="rehearsal")))

    for options in ((), ("--json",)):
        done = wb("diff", paid, rehearsal, *options)
        assert "Traceback" not in done.stderr
        assert "rehearsal is a simulation (`--simulate`) and paid was sent to fal" in " ".join(
            done.stderr.split()
        ), (options, done.stderr)
    done = wb("diff", paid, rehearsal, "--json")
    assert done.json()["batch_b"]["simulated"] is True  # stdout still holds the one JSON object


#: Two pinned-seed jobs: with ``reuse_outputs: true`` a second batch takes the first's videos.
REUSED = """\
name: {name}
endpoint: fal-ai/wan-i2v
reuse_outputs: true
defaults:
  resolution: 480p
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
    seed: 7
  - prompt: Night falls over the hills
    image_url: images/night.jpg
    seed: 8
"""


def test_a_reused_output_is_flagged_not_taken_for_a_reproduction(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    first = _simulated(wb, manifest("first", REUSED.format(name="first")))
    again = _simulated(wb, manifest("again", REUSED.format(name="again")))
    records = {r["job_id"]: r for r in export_jsonl(wb, again)}
    assert all(r["reused_from"] is not None for r in records.values())  # nothing rendered

    report = _diff(wb, first, again, 0)  # byte for byte the same videos: all matched
    assert (report["same"], report["different"], report["reused"]) == (2, 0, 2)
    for job in report["jobs"]:
        assert job["result"] == "same"
        assert job["reused"] is True
        assert job["a"]["reused_from"] is None
        assert job["b"]["reused_from"] == job["a"]["job_id"]

    human = wb("diff", first, again)
    assert human.code == 0, human.stderr
    assert "2 same, 0 different, 0 only in A, 0 only in B" in human.stdout
    assert "2 of the same pairs reused an output rather than rendering it" in " ".join(human.stdout.split())
    rows = [line for line in human.stdout.splitlines() if line.startswith("0") or line.startswith("1")]
    assert len(rows) == 2, human.stdout
    assert all("reused output" in row for row in rows), human.stdout

    # Two batches that both reused one original: no evidence either.
    third = _simulated(wb, manifest("third", REUSED.format(name="third")))
    report = _diff(wb, again, third, 0)
    assert report["reused"] == 2
    assert all(job["a"]["reused_from"] == job["b"]["reused_from"] is not None for job in report["jobs"])

    # A render compared with a render is evidence: nothing flagged.
    exact = _rerun(wb, first, "--simulate")
    report = _diff(wb, first, exact, 0)
    assert report["reused"] == 0
    assert all(job["reused"] is False for job in report["jobs"]), report


def test_a_file_and_a_data_uri_of_the_same_image_pair_by_input_under_new_seeds(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay sending inline (a data URI) the images another run read from files, with new
    seeds: its keys differ by the seed only, so its jobs pair by input, image by image, as the
    job key sees images (by their bytes), not by the text of the stored input. Different
    manifests: nothing pairs by place, so only the input can pair them."""
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    body = "name: {name}\nendpoint: fal-ai/wan-i2v\ndefaults: {{resolution: 480p}}\nitems:\n"
    item = "  - {{prompt: Clouds drifting, image_url: '{image}', seed: {seed}}}\n"
    files = manifest(
        "files",
        body.format(name="files")
        + item.format(image="images/landscape.jpg", seed=1)
        + item.format(image="images/night.jpg", seed=3),
    )
    images = files.parent / "images"

    def inline(image: str, media_type: str) -> str:
        return f"data:{media_type};base64," + base64.b64encode((images / image).read_bytes()).decode("ascii")

    inlined = manifest(  # the other order, and another spelling of the media type
        "inlined",
        body.format(name="inlined")
        + item.format(image=inline("night.jpg", "image/jpg"), seed=4)
        + item.format(image=inline("landscape.jpg", "image/jpeg"), seed=2),
    )
    a, b = _simulated(wb, files), _simulated(wb, inlined)

    report = _diff(wb, a, b, 1)
    assert (report["same"], report["different"], report["only_a"], report["only_b"]) == (0, 2, 0, 0)
    seeds = {(job["a"]["pinned_seed"], job["b"]["pinned_seed"]) for job in report["jobs"]}
    assert seeds == {(1, 2), (3, 4)}
    for job in report["jobs"]:
        assert job["matched_by"] == "input"
        assert "seed" in job["differs"]
        assert job["a"]["job_key"] != job["b"]["job_key"]
