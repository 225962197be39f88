"""Where ``export -o`` may write: a file (atomically, by rename), but also a device or a named
pipe, written straight through — never replaced. Run as root, ``-o /dev/null`` once renamed a
regular file over ``/dev/null`` (and ``-o /dev/full`` "succeeded" the same way)."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from jobs.dataset_export import write_parquet_file
from jobs.errors import UsageError
from jobs.export import FIELDS, write_file


def _rows(n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        row: dict[str, Any] = dict.fromkeys(FIELDS)
        row.update(job_id=f"j{i}", batch="b1", batch_name="plain", status="succeeded", input={"prompt": "p"})
        rows.append(row)
    return rows


def _is_char_device(path: str) -> bool:
    return stat.S_ISCHR(os.stat(path).st_mode)


def test_dev_null_stays_a_device() -> None:
    assert write_file(iter(_rows(3)), "jsonl", Path("/dev/null")) == 3
    assert _is_char_device("/dev/null")


def test_a_full_device_is_one_line_and_stays_a_device() -> None:
    with pytest.raises(UsageError, match="cannot write the export to '/dev/full': No space left on device"):
        write_file(iter(_rows(3)), "jsonl", Path("/dev/full"))
    assert _is_char_device("/dev/full")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_named_pipe_gets_the_records_and_stays_a_pipe(tmp_path: Path, fmt: str) -> None:
    fifo = tmp_path / "records"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    if fmt == "jsonl":
        count = write_file(iter(_rows(4)), "jsonl", fifo)
    else:
        count = write_parquet_file(iter(_rows(4)), fifo)
    reader.join(timeout=10)
    assert count == 4
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    (body,) = received
    if fmt == "jsonl":
        assert [json.loads(line)["job_id"] for line in body.splitlines()] == ["j0", "j1", "j2", "j3"]
    else:
        assert body.startswith(b"PAR1")
        assert body.endswith(b"PAR1")
    assert list(tmp_path.iterdir()) == [fifo]  # no temporary file left beside it


def test_a_symlink_keeps_pointing_at_the_file_it_named(tmp_path: Path) -> None:
    target = tmp_path / "data" / "records.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "latest.jsonl"
    link.symlink_to(target)
    assert write_file(iter(_rows(2)), "jsonl", link) == 2
    assert link.is_symlink()
    assert [json.loads(line)["job_id"] for line in target.read_text().splitlines()] == ["j0", "j1"]


def test_a_regular_file_is_still_replaced_atomically(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    out.write_text("old\n")
    assert write_file(iter(_rows(2)), "jsonl", out) == 2
    assert len(out.read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]


def test_a_missing_folder_is_refused_not_created(tmp_path: Path) -> None:
    typo = tmp_path / "expots" / "2026" / "records.jsonl"
    with pytest.raises(UsageError, match="there is no folder"):
        write_file(iter(_rows(1)), "jsonl", typo)
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_a_replaced_file_keeps_its_permissions_and_a_new_one_follows_the_umask(tmp_path: Path) -> None:
    shared = tmp_path / "shared.jsonl"
    shared.write_text("old\n")
    shared.chmod(0o644)
    write_file(iter(_rows(1)), "jsonl", shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644  # not mkstemp's 0600

    umask = os.umask(0o027)
    try:
        fresh = tmp_path / "fresh.parquet"
        write_parquet_file(iter(_rows(1)), fresh)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640


def test_media_carries_the_contracts_duration_beside_the_stored_duration_s() -> None:
    """The database keeps ``duration_s`` (rows of every version have it); the export record's
    ``media`` is the contract's "width, height, frames, fps, duration", ``duration_s`` kept too."""
    from jobs.export import export_media

    stored = {"width": 854, "height": 480, "frames": 81, "fps": 16.0, "duration_s": 5.0625, "codec": "h264"}
    assert export_media(stored) == {**stored, "duration": 5.0625}
    assert list(export_media(stored) or {}) == [
        "width",
        "height",
        "frames",
        "fps",
        "duration",
        "duration_s",
        "codec",
    ]
    assert stored == {
        "width": 854,
        "height": 480,
        "frames": 81,
        "fps": 16.0,
        "duration_s": 5.0625,
        "codec": "h264",
    }
    assert export_media({"width": 1, "duration_s": None}) == {
        "width": 1,
        "duration": None,
        "duration_s": None,
    }
    assert export_media({"duration": 2.0, "duration_s": 1.0}) == {"duration": 2.0, "duration_s": 1.0}
    assert export_media(None) is None


@pytest.mark.skipif(not Path("/proc/version").is_file(), reason="Linux's /proc")
def test_a_file_in_a_folder_that_takes_no_new_file_says_the_temporary_file_failed() -> None:
    """``-o /proc/version``: the file exists, but no temporary file can be made beside it; the
    error said "No such file or directory" of the file itself."""
    with pytest.raises(UsageError) as refused:
        write_file(iter(_rows(1)), "jsonl", Path("/proc/version"))
    assert str(refused.value) == (
        "cannot write the export to '/proc/version': cannot create its temporary file beside it "
        "(in '/proc'): No such file or directory"
    )


def test_a_concurrent_export_to_the_same_file_never_removes_a_finished_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: the export let go of its temporary file's lock (by closing it) before renaming it
    into place, so a second export to the same FILE starting in between found a ``.locked.part``
    nobody held, took it for one a killed export left, and removed it: the first export then
    failed ("cannot write the export to …: No such file or directory"), its records lost. The
    second export starts exactly then here (the rename is where it is hooked)."""
    out = tmp_path / "records.jsonl"
    real_replace = Path.replace
    second: list[int] = []
    began: list[Path] = []

    def replace_after_another_export_began(self: Path, target: Any) -> Path:
        if not began and self.name.endswith(".locked.part"):  # the first export's rename
            began.append(self)
            second.append(write_file(iter(_rows(1)), "jsonl", out))  # sweeps, writes, renames
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace_after_another_export_began)
    assert write_file(iter(_rows(3)), "jsonl", out) == 3  # the first export ends, with its records
    assert second == [1]
    assert [json.loads(line)["job_id"] for line in out.read_text().splitlines()] == ["j0", "j1", "j2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]
