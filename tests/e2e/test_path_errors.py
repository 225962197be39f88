"""A path that cannot be used — too long for the file system, unreadable, a symlink loop — is
bad input: one clear message naming it and why, exit 2; never ``internal error`` (exit 70), and
never "not found" for a file that is there.

Each case runs the installed console script (the user's exit code and stderr). The permission
cases run it without root's read override (:func:`without_read_override`), so a mode-000 file is
as unreadable here as to a user, whoever runs the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.e2e_helpers import MakeManifest, assert_one_line, wanbatch, without_read_override

#: Longer than any file name may be (255 bytes on every common Linux file system).
LONG = "b" * 300
ONE_ITEM = """\
name: {name}
endpoint: fal-ai/wan-i2v
items:
  - {{prompt: a, image_url: {image}, resolution: 480p, seed: 1}}
"""
ROW = '{"prompt": "a", "image_url": "images/landscape.jpg", "resolution": "480p", "seed": 2}\n'
TOO_LONG = "the name is too long for the file system"


def one_item(name: str, image: str = "images/landscape.jpg") -> str:
    return ONE_ITEM.format(name=name, image=image)


def items_from(source: str) -> str:
    return f"name: rows\nendpoint: fal-ai/wan-i2v\nitems_from: {source}\n"


def assert_manifest_error(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Exit 2, the manifest's located error lines (and the summary), no traceback."""
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert "internal error" not in done.stderr, done.stderr
    assert done.returncode == 2, (done.returncode, done.stderr)
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


@pytest.fixture
def locked() -> Iterator[list[Path]]:
    """Paths to make mode 000 for a test; given their permissions back afterwards (so the
    test's folder can be removed by a user who is not root)."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        path.chmod(0o700)


def lock(locked: list[Path], path: Path) -> None:
    path.chmod(0)
    locked.append(path)


# --------------------------------------------------------------------------- names too long


def test_a_batch_name_too_long_for_a_file_name_still_names_the_batch(manifest: MakeManifest) -> None:
    """`run NAME` tested NAME as a file first: a 300-character name crashed (Errno 36, exit 70)."""
    path = manifest("long", one_item(LONG))
    assert wanbatch("run", "--simulate", "--no-progress", path).returncode == 0
    again = wanbatch("run", LONG, "--simulate", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "1/1 done" in again.stdout + again.stderr


def test_a_manifest_path_too_long_is_a_manifest_error() -> None:
    done = wanbatch("run", "--simulate", f"{LONG}.yaml")
    assert_manifest_error(done, f"cannot read the manifest: {TOO_LONG}")


def test_an_items_from_name_too_long_is_located(manifest: MakeManifest) -> None:
    path = manifest("rows", items_from(f"{LONG}.jsonl"))
    for command in ("validate", "estimate", "submit"):
        assert_manifest_error(wanbatch(command, path), "rows.yaml:3: field 'items_from'", TOO_LONG)
    assert_manifest_error(wanbatch("run", "--simulate", path), "rows.yaml:3: field 'items_from'", TOO_LONG)


@pytest.mark.parametrize("fmt", ["jsonl", "hf"])
def test_an_export_path_too_long_is_one_line(manifest: MakeManifest, tmp_path: Path, fmt: str) -> None:
    assert wanbatch("submit", manifest("short", one_item("short"))).returncode == 0
    done = wanbatch("export", "short", "--format", fmt, "-o", tmp_path / LONG)
    line = assert_one_line(done, "cannot write the export to", TOO_LONG)
    assert "…" in line  # the 300 characters are cut in the middle


def test_an_output_folder_too_long_is_one_line(manifest: MakeManifest, tmp_path: Path) -> None:
    path = manifest("short", one_item("short"))
    done = wanbatch("run", "--simulate", path, env={"WANBATCH_OUTPUT_DIR": str(tmp_path / LONG)})
    assert_one_line(done, "WANBATCH_OUTPUT_DIR", "cannot take the outputs", TOO_LONG, "nothing was sent")


# --------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_an_unreadable_items_from_file_is_located(
    manifest: MakeManifest, e2e_env: Path, locked: list[Path], suffix: str
) -> None:
    """Was `internal error: PermissionError` (exit 70) from every command that reads the rows."""
    rows = e2e_env / f"p.{suffix}"
    rows.write_text(ROW if suffix == "jsonl" else "prompt,image_url\na,images/landscape.jpg\n")
    path = manifest("rows", items_from(rows.name))
    lock(locked, rows)
    # Named as the manifest wrote it, not as it resolved (/tmp/…/p.jsonl).
    expected = (
        f"rows.yaml:3: field 'items_from': cannot read the items_from file {rows.name}: permission denied"
    )
    plain = without_read_override()
    for command in ("validate", "estimate", "submit"):
        assert_manifest_error(wanbatch(command, path, prefix=plain), expected)
    assert_manifest_error(wanbatch("run", "--simulate", path, prefix=plain), expected)
    shown = json.loads(wanbatch("validate", "--json", path, prefix=plain).stdout)
    assert [(i["line"], i["field"]) for i in shown["issues"]] == [(3, "items_from")]


def test_a_manifest_in_an_unreadable_folder_says_so(
    manifest: MakeManifest, e2e_env: Path, locked: list[Path]
) -> None:
    """`run --simulate locked/m.yaml` was exit 70; validate said "manifest file not found"."""
    folder = e2e_env / "locked"
    folder.mkdir()
    (folder / "m.yaml").write_text(one_item("m"))
    lock(locked, folder)
    for args in (("validate",), ("run", "--simulate")):
        done = wanbatch(*args, "locked/m.yaml", prefix=without_read_override())
        assert_manifest_error(done, "locked/m.yaml: cannot read the manifest: permission denied")


def test_an_image_there_but_unreadable_is_not_called_missing(
    manifest: MakeManifest, e2e_env: Path, locked: list[Path]
) -> None:
    """An image in a mode-000 folder, or a symlink loop, was "file not found"."""
    body = one_item("img", "private/a.jpg") + "  - {prompt: b, image_url: loop1, resolution: 480p, seed: 2}\n"
    path = manifest("img", body)  # copies images/ beside it
    folder = e2e_env / "private"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((e2e_env / "images" / "landscape.jpg").read_bytes())
    lock(locked, folder)
    (e2e_env / "loop1").symlink_to("loop2")
    (e2e_env / "loop2").symlink_to("loop1")
    done = wanbatch("validate", path, prefix=without_read_override())
    assert_manifest_error(
        done,
        # Named as the manifest wrote them, not as they resolved (/tmp/…/private/a.jpg).
        "img.yaml:4: item 0: field 'image_url': cannot read private/a.jpg: permission denied",
        "img.yaml:5: item 1: field 'image_url': cannot read loop1: a symlink loop",
    )
    assert "not found" not in done.stderr


# --------------------------------------------------------------------------- the last resort


def _raising(error: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``wanbatch ARGV`` with ``jobs.batches.status`` raising ``error`` (a Python expression)."""
    code = (
        "import errno, sys, jobs.batches, cli\n"
        f"def boom(*a, **k):\n    raise {error}\n"
        "jobs.batches.status = boom\n"
        f"sys.argv = ['wanbatch', *{list(argv)!r}]\n"
        "cli.main()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        check=False,
    )


def test_an_os_error_about_a_path_nothing_caught_is_one_error_line() -> None:
    """The last resort: a path error no check foresaw is the user's path, not a bug (exit 2)."""
    error = f"OSError(errno.ENAMETOOLONG, 'File name too long', '/tmp/{LONG}')"
    line = assert_one_line(
        _raising(error, "status"), f"error: /tmp/{LONG[:50]}", f"…{LONG[-40:]}: {TOO_LONG}"
    )
    assert len(line) < 200
    as_json = _raising(error, "status", "--json")
    assert as_json.returncode == 2, as_json.stderr
    assert json.loads(as_json.stdout)["error"].endswith(f": {TOO_LONG}")
    denied = _raising("PermissionError(errno.EACCES, 'Permission denied', '/srv/x')", "status")
    assert_one_line(denied, "error: /srv/x: permission denied")


def test_an_os_error_naming_no_path_is_still_an_internal_error() -> None:
    done = _raising("OSError(errno.EIO, 'Input/output error')", "status")
    line = assert_one_line(done, "internal error: OSError", code=70)
    Path(line.split("details in ", 1)[1].rstrip(")")).unlink()
