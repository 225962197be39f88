"""``export --format hf -o DIR`` into an existing empty folder it cannot rename over.

Export audit (session 34): DIR an empty mount point (a Docker bind volume, ``-o /out``), a
symlink to an empty folder or a dangling symlink passed the upfront check; then every video was
linked, copied or downloaded, and the export failed at its last step, renaming its finished
folder over DIR (rename(2): EBUSY over a mount point, ENOTDIR over a symlink). README says "DIR
must be new or empty": an existing empty folder, however reached, now gets the export (built in
a hidden folder inside it, on its own file system, its entries moved out at the end), and a
symlink that leads nowhere is refused in one line before any video is placed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from falsim.server import SimulatorHandle
from jobs import dataset_export
from tests.e2e.e2e_helpers import MakeManifest, Wb

TWO = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  image_url: images/landscape.jpg
matrix:
  seed: [1, 2]
items:
  - prompt: hi
"""

#: An i2v batch of a local image: its input is in `inputs/` too.
DATASET = ["README.md", "inputs", "manifest.yaml", "metadata.jsonl", "videos"]


def _batch(wb: Wb, manifest: MakeManifest, name: str) -> str:
    run = wb("run", manifest(name, TWO.format(name=name)), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    return str(run.json()["batch"])


def _dataset(folder: Path) -> list[str]:
    """What ``folder`` holds (hidden entries too: no ``.part`` may be left); its two videos checked."""
    assert len(list((folder / "videos").iterdir())) == 2
    assert len((folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    return sorted(os.listdir(folder))


def _placed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every video the export links or copies from now on."""
    placed: list[Path] = []
    place = dataset_export._place_video

    def counted(source: Path, target: Path, mode: int) -> bool:
        placed.append(target)
        return place(source, target, mode)

    monkeypatch.setattr(dataset_export, "_place_video", counted)
    return placed


def test_an_empty_folder_that_cannot_be_renamed_over_gets_the_export(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount point, as rename(2) treats one: renaming anything over it fails with EBUSY.
    (``test_an_empty_bind_mount_gets_the_export`` mounts one for real where it can.)"""
    batch = _batch(wb, manifest, "hf-mount")
    mount = tmp_path / "volume"
    mount.mkdir()
    inode = mount.stat().st_ino

    def refusing(real: Callable[..., Any]) -> Callable[..., Any]:
        def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            if Path(dst).resolve() == mount.resolve():
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src), None, str(dst))
            return real(src, dst, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "rename", refusing(os.rename))
    monkeypatch.setattr(os, "replace", refusing(os.replace))
    done = wb("export", batch, "--format", "hf", "-o", mount, "--json")
    assert done.code == 0, done.stderr
    assert done.json()["records"] == 2
    assert _dataset(mount) == DATASET
    assert mount.stat().st_ino == inode  # written into, never replaced


def test_a_symlink_to_an_empty_folder_gets_the_export_and_stays_a_symlink(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    batch = _batch(wb, manifest, "hf-link")
    target = tmp_path / "big" / "datasets"
    target.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(target)
    done = wb("export", batch, "--format", "hf", "-o", link)
    assert done.code == 0, done.stderr
    assert link.is_symlink()
    assert link.readlink() == target
    assert _dataset(target) == DATASET
    assert sorted(os.listdir(tmp_path / "big")) == ["datasets"]  # nothing beside it either


def test_a_dangling_symlink_is_refused_before_any_video_is_placed(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = _batch(wb, manifest, "hf-dangling")
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    placed = _placed(monkeypatch)
    before = sorted(os.listdir(tmp_path))
    done = wb("export", batch, "--format", "hf", "-o", link)
    assert done.code == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: cannot write the export to '{link}': it is a symlink to '{tmp_path / 'nowhere'}', "
        "which does not exist; create that folder or choose another -o"
    ]
    assert placed == []
    assert link.is_symlink()
    assert not (tmp_path / "nowhere").exists()
    assert sorted(os.listdir(tmp_path)) == before  # no temporary folder beside it either


def test_a_failed_export_leaves_an_existing_empty_folder_empty(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    batch = _batch(wb, manifest, "hf-fails")
    video = next((tmp_path / "outputs").rglob("*.mp4"))
    video.unlink()
    folder = tmp_path / "empty"
    folder.mkdir()
    done = wb("export", batch, "--format", "hf", "-o", folder)
    assert done.code == 2  # refused, nothing written
    assert "missing" in done.stderr
    assert os.listdir(folder) == []  # no hidden .part left inside it


def test_an_entry_taken_meanwhile_puts_back_what_was_moved(tmp_path: Path) -> None:
    """Moving the finished entries into DIR: one whose name something took there meanwhile
    fails the export, and the entries moved before go back, leaving DIR as it was."""
    dest = tmp_path / "dest"
    tmp = dest / ".wanbatch-export.x.part"
    (tmp / "videos").mkdir(parents=True)
    (tmp / "inputs").mkdir()
    for name in ("README.md", "manifest.yaml", "metadata.jsonl"):
        (tmp / name).write_text(name)
    (dest / "metadata.jsonl").write_text("someone else's")
    with pytest.raises(FileExistsError):
        dataset_export._publish_into(tmp, dest)
    assert sorted(os.listdir(dest)) == [".wanbatch-export.x.part", "metadata.jsonl"]
    assert sorted(os.listdir(tmp)) == DATASET
    assert (dest / "metadata.jsonl").read_text() == "someone else's"
