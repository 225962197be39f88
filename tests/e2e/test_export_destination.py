"""Where ``export -o`` writes, from the dataset-export audit.

- ``export -o`` a stored video (or its sidecar, or a folder among them), run from another folder
  than ``run`` with the default relative ``./outputs``, exited 0 and left JSON Lines where the
  paid video was: only ``WANBATCH_OUTPUT_DIR`` as the export resolved it was protected. The
  folders the batch's jobs recorded their outputs in are refused whatever the settings now.
- ``-o s3://bucket/ds`` "succeeded" into a local folder ``./s3:/bucket/ds`` (the ``//``
  collapsed); export writes no remote destination, so a URI is refused in one line.
- A killed ``--format hf`` export into an existing empty folder left its hidden part folder
  inside, and every retry said the folder was not empty. A part folder no export holds is now
  removed; one a running export holds is refused, naming it, and untouched.
- A killed ``--format hf`` export into a new folder left its hidden part folder beside it
  (``.DIR.RANDOM.part``) for good. It is now named and locked as the one inside an existing
  folder is, and the next export into DIR removes it by the same rules; one a running export
  holds, and those of another destination, are left alone.
- An export of an earlier wanbatch, which took no lock, had its part folder removed under it by
  the next export into the same folder (nobody held it): a part folder whose name does not say
  that its export takes a lock is removed only once untouched for a day; a younger one is
  refused, naming it, and untouched.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobs import dataset_export
from jobs.export import UNLOCKED_PART_AGE
from tests.e2e.conftest import _clear_caches
from tests.e2e.e2e_helpers import MakeManifest
from tests.in_process import run_main

MANIFEST = """\
name: kept
endpoint: fal-ai/wan-i2v
defaults: {resolution: 480p, image_url: images/landscape.jpg}
matrix:
  seed: [1, 2]
items:
  - prompt: a lighthouse at dusk
"""


@pytest.fixture
def video(manifest: MakeManifest, e2e_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stored video of a simulated batch run with the default ``./outputs`` (relative to its
    folder), the export then run from another folder with the settings it has there."""
    monkeypatch.delenv("WANBATCH_OUTPUT_DIR")
    _clear_caches()
    path = manifest("kept", MANIFEST)
    assert run_main(["run", str(path), "--simulate", "--no-progress"], monkeypatch) == 0
    stored = next((e2e_env / "outputs").rglob("*.mp4"))
    elsewhere = e2e_env.parent / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _clear_caches()
    return stored


def _refused(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert run_main(argv, monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_stored_video_and_its_sidecar_are_refused_from_another_folder(
    video: Path, fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sidecar = video.with_suffix(".json")
    before = {path: path.read_bytes() for path in (video, sidecar)}
    for target in (video, sidecar, video.parent / "new.jsonl"):
        err = _refused(["export", "kept", "--format", fmt, "-o", str(target)], monkeypatch, capsys)
        assert f"{target.name}: this is inside the folder where batch kept stores its videos" in err
        assert err.endswith("choose another path for the export")
    assert {path: path.read_bytes() for path in before} == before
    assert not (video.parent / "new.jsonl").exists()
    assert not [p for p in video.parent.iterdir() if p.name.endswith(".part")]


def test_an_hf_folder_among_the_outputs_is_refused_from_another_folder(
    video: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = sorted(os.listdir(video.parent))
    inside = _refused(
        ["export", "kept", "--format", "hf", "-o", str(video.parent / "ds")], monkeypatch, capsys
    )
    assert "this is inside the folder where batch kept stores" in inside
    folder = _refused(["export", "kept", "--format", "hf", "-o", str(video.parent)], monkeypatch, capsys)
    assert "this is the folder where batch kept stores" in folder
    assert sorted(os.listdir(video.parent)) == listed


def test_beside_the_outputs_is_fine_from_another_folder(video: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    beside = video.parent.parent / "kept.jsonl"  # in the output folder, outside the batch's
    assert run_main(["export", "kept", "-o", str(beside)], monkeypatch) == 0
    assert len(beside.read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.parametrize(
    ("fmt", "target"), [("hf", "s3://bucket/ds"), ("jsonl", "s3://b/k.jsonl"), ("csv", "file:///tmp/x.csv")]
)
def test_a_uri_is_refused_and_nothing_is_made(
    manifest: MakeManifest,
    e2e_env: Path,
    fmt: str,
    target: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_main(["run", str(manifest("kept", MANIFEST)), "--simulate", "--no-progress"], monkeypatch) == 0
    listed = sorted(os.listdir(e2e_env))
    err = _refused(["export", "kept", "--format", fmt, "-o", target], monkeypatch, capsys)
    assert err == f"error: -o takes a local path; {target!r} is a URI, and an export writes no remote " + (
        "destination: export to a local file or folder, then copy it (e.g. with `aws s3 cp`)"
    )
    assert sorted(os.listdir(e2e_env)) == listed  # no ./s3:/bucket/ds


@pytest.fixture
def batch(manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch) -> str:
    assert run_main(["run", str(manifest("kept", MANIFEST)), "--simulate", "--no-progress"], monkeypatch) == 0
    return "kept"


def _stale_part(folder: Path) -> Path:
    """What a killed export into ``folder`` leaves: its part folder, half filled, held by nobody
    (named, as every export names it since it takes a lock, as one that takes a lock)."""
    part = folder / ".wanbatch-export.k1ll3d.locked.part"  # as README names it
    (part / "videos").mkdir(parents=True)
    (part / "videos" / "000000-half.mp4").write_bytes(b"\0" * 100)
    return part


def test_a_killed_exports_part_folder_does_not_block_the_next(
    batch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = tmp_path / "volume"  # an existing empty folder, as a mount point is
    volume.mkdir()
    _stale_part(volume)
    assert run_main(["export", batch, "--format", "hf", "-o", str(volume)], monkeypatch) == 0
    assert sorted(os.listdir(volume)) == ["README.md", "inputs", "manifest.yaml", "metadata.jsonl", "videos"]
    assert len(os.listdir(volume / "videos")) == 2


def test_a_running_exports_part_folder_is_named_and_left_alone(
    batch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    part = _stale_part(volume)
    fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the export writing it holds it
        err = _refused(["export", batch, "--format", "hf", "-o", str(volume)], monkeypatch, capsys)
    finally:
        os.close(fd)
    assert f"another export is writing into it now ({part.name})" in err
    assert os.listdir(volume) == [part.name]
    assert (part / "videos" / "000000-half.mp4").stat().st_size == 100


def test_two_exports_into_one_folder_never_mix(
    batch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second export started while the first places its videos is refused; the first finishes."""
    volume = tmp_path / "volume"
    volume.mkdir()
    place = dataset_export._place_video
    second: list[tuple[int, str]] = []

    def placing(source: Path, target: Path, mode: int) -> bool:
        if not second:
            capsys.readouterr()
            code = run_main(["export", batch, "--format", "hf", "-o", str(volume)], monkeypatch)
            second.append((code, capsys.readouterr().err))
        return place(source, target, mode)

    monkeypatch.setattr(dataset_export, "_place_video", placing)
    assert run_main(["export", batch, "--format", "hf", "-o", str(volume)], monkeypatch) == 0
    ((code, err),) = second
    assert code == 2
    assert "another export is writing into it now (.wanbatch-export." in err
    assert sorted(os.listdir(volume)) == ["README.md", "inputs", "manifest.yaml", "metadata.jsonl", "videos"]


def _old_export_part(folder: Path) -> Path:
    """The part folder an export of an earlier wanbatch, which took no lock, makes in ``folder``
    (as it made it: ``tempfile.mkdtemp`` with the same prefix and suffix), a video placed in it
    already; its export is still running, placing the next."""
    part = Path(tempfile.mkdtemp(prefix=".wanbatch-export.", suffix=".part", dir=folder))
    (part / "videos").mkdir()
    (part / "videos" / "000000-old.mp4").write_bytes(b"\0" * 100)
    return part


def test_a_running_export_of_an_earlier_version_keeps_its_part_folder(
    batch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nobody holds its lock (it takes none): it was removed as a killed export's, under it."""
    volume = tmp_path / "volume"
    volume.mkdir()
    part = _old_export_part(volume)
    err = _refused(["export", batch, "--format", "hf", "-o", str(volume)], monkeypatch, capsys)
    assert f"-o {str(volume)!r} holds {part.name}, an export's unfinished folder (" in err
    assert "made by an earlier wanbatch, which takes no lock; changed 0 min ago" in err
    assert os.listdir(volume) == [part.name]
    assert (part / "videos" / "000000-old.mp4").stat().st_size == 100


def test_an_earlier_versions_part_folder_untouched_for_a_day_is_removed(
    batch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    part = _old_export_part(volume)
    long_ago = time.time() - UNLOCKED_PART_AGE - 60
    for path in (part / "videos" / "000000-old.mp4", part / "videos", part):
        os.utime(path, (long_ago, long_ago))
    assert run_main(["export", batch, "--format", "hf", "-o", str(volume)], monkeypatch) == 0
    assert sorted(os.listdir(volume)) == ["README.md", "inputs", "manifest.yaml", "metadata.jsonl", "videos"]


def test_an_earlier_versions_part_folder_written_to_lately_is_kept(
    batch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The folder itself untouched for a day, but a video in it is being written: still running."""
    volume = tmp_path / "volume"
    volume.mkdir()
    part = _old_export_part(volume)
    long_ago = time.time() - UNLOCKED_PART_AGE - 60
    for path in (part / "videos", part):
        os.utime(path, (long_ago, long_ago))
    _refused(["export", batch, "--format", "hf", "-o", str(volume)], monkeypatch, capsys)
    assert os.listdir(volume) == [part.name]


def test_an_export_of_an_earlier_version_started_alongside_stops_this_one(
    batch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both found the folder empty at once: this one goes on only if no other export may be
    writing there, and one of an earlier version may (nobody holds its lock: it takes none)."""
    volume = tmp_path / "volume"
    volume.mkdir()
    inside = dataset_export._part_inside
    old: list[Path] = []

    def alongside(dest: Path) -> tuple[Path, int | None]:
        made = inside(dest)
        old.append(_old_export_part(dest))
        return made

    monkeypatch.setattr(dataset_export, "_part_inside", alongside)
    err = _refused(["export", batch, "--format", "hf", "-o", str(volume)], monkeypatch, capsys)
    assert f"({old[0].name}, made by an earlier wanbatch" in err
    assert os.listdir(volume) == [old[0].name]
    assert (old[0] / "videos" / "000000-old.mp4").stat().st_size == 100


#: An export into ``sys.argv[2]`` that SIGKILLs itself once it placed its first video (what an
#: OOM kill or ``kill -9`` does midway): nothing of it runs after, no ``finally``.
_KILLED_MIDWAY = """
import os, signal, sys
from jobs import dataset_export
place = dataset_export._place_video
def placing(*args, **kwargs):
    place(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
dataset_export._place_video = placing
sys.argv = ["wanbatch", "export", sys.argv[1], "--format", "hf", "-o", sys.argv[2]]
from cli import main
main()
"""


def test_a_killed_export_into_a_new_folder_leaves_nothing_after_the_next(
    batch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "datasets" / "new"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_MIDWAY, batch, str(dest)], capture_output=True, text=True, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (left,) = os.listdir(dest.parent)  # its part folder, a video in it
    assert left.startswith(".new.")
    assert left.endswith(".part")
    assert os.listdir(dest.parent / left / "videos")
    # A running export's part folder for the same destination, and another destination's.
    running = dest.parent / ".new.runn1ng0.locked.part"
    other = dest.parent / ".new.v2.k1ll3d00.locked.part"
    running.mkdir()
    other.mkdir()
    fd = os.open(running, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the export writing it holds it
        assert run_main(["export", batch, "--format", "hf", "-o", str(dest)], monkeypatch) == 0
    finally:
        os.close(fd)
    assert sorted(os.listdir(dest.parent)) == sorted([running.name, other.name, "new"])
    assert len(os.listdir(dest / "videos")) == 2
