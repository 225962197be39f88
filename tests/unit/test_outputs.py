"""Output paths stay inside the output folder; stale partial downloads are cleaned up."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from jobs import fs, outputs


def test_batch_names_cannot_escape_the_output_dir(tmp_path: Path) -> None:
    for hostile in ("../../etc", "/etc/passwd", "..", "a/../../b", ""):
        folder = outputs.batch_dir(tmp_path, hostile)
        assert tmp_path.resolve() in folder.parents


def test_batch_name_slugs_carry_no_path(tmp_path: Path) -> None:
    for hostile in ("../../etc", "/abs/path\\x", "..", "."):
        name = outputs.slug(hostile)
        assert "/" not in name
        assert "\\" not in name
        assert name not in ("", ".", "..")
        assert outputs.batch_dir(tmp_path, hostile).parent == tmp_path.resolve()


def test_video_names_come_from_our_ids_only(tmp_path: Path) -> None:
    path = outputs.video_path(tmp_path, "sweep", 7, "0123456789abcdef0123")
    assert path.name == "000007-0123456789ab.mp4"
    assert outputs.sidecar_path(path).name == "000007-0123456789ab.json"


def test_remove_stale_partials_removes_only_this_files_old_temporaries(tmp_path: Path) -> None:
    dest = tmp_path / "000001-abc.mp4"
    mine = [tmp_path / ".000001-abc.mp4.x1y2.part", tmp_path / ".000001-abc.mp4.zz.part"]
    live = tmp_path / ".000001-abc.mp4.live.part"  # a download still writing (fresh mtime)
    other = tmp_path / ".000002-def.mp4.q.part"
    for p in [*mine, live, other]:
        p.write_bytes(b"partial")
    old = time.time() - 600
    for p in [*mine, other]:
        os.utime(p, (old, old))
    assert outputs.remove_stale_partials(dest, older_than=120) == 2
    assert not any(p.exists() for p in mine)
    assert live.exists()  # never pulled from under a live download
    assert other.exists()
    assert outputs.remove_stale_partials(tmp_path / "missing" / "x.mp4", older_than=120) == 0


def test_partials_of_attempts_that_lost_the_job_go_even_when_fresh(tmp_path: Path) -> None:
    dest = tmp_path / "000001-abc.mp4"
    superseded = tmp_path / f".000001-abc.mp4.{outputs.partial_tag(7)}-x1.part"  # killed a moment ago
    current = tmp_path / f".000001-abc.mp4.{outputs.partial_tag(9)}-y2.part"
    for p in (superseded, current):
        p.write_bytes(b"partial")
    assert outputs.remove_stale_partials(dest, older_than=120, version=9) == 1
    assert not superseded.exists()
    assert current.exists()  # the lease holder's own attempt is never touched


def test_write_json_atomic_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    outputs.write_json_atomic(target, {"seed": 2**64 - 1})
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_json_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    outputs.write_json_atomic(target, {"v": 1})
    loop: dict[str, object] = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular"):
        outputs.write_json_atomic(target, loop)
    assert target.read_text().strip() == '{\n  "v": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_batch_folder_is_listed_once_per_lease_not_once_per_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing the folder (every video of the batch so far) for each download was quadratic."""
    listed: list[object] = []
    real_scandir = os.scandir

    def counting_scandir(path: Path) -> Any:
        listed.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    for n in range(50):
        (tmp_path / f"{n:06d}-job{n}.mp4").write_bytes(b"video")
    for n in range(50):
        assert outputs.remove_stale_partials(tmp_path / f"{n:06d}-job{n}.mp4", older_than=120, version=3) == 0
    assert len(listed) == 1


def test_a_partial_made_after_the_listing_is_found_once_the_listing_is_a_lease_old(tmp_path: Path) -> None:
    dest = tmp_path / "000001-abc.mp4"
    assert outputs.remove_stale_partials(dest, older_than=0.05, version=9) == 0  # listed: nothing there
    superseded = tmp_path / f".000001-abc.mp4.{outputs.partial_tag(7)}-x1.part"
    superseded.write_bytes(b"partial")
    time.sleep(0.06)  # the attempt that wrote it could only lose its lease after this long
    assert outputs.remove_stale_partials(dest, older_than=0.05, version=9) == 1
    assert not superseded.exists()


@pytest.fixture
def umask_027() -> Any:
    before = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(before)


def test_the_umask_is_read_without_changing_it(umask_027: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.umask`` is process-wide and can only be read by setting it: a thread creating a file
    between the two calls got the wrong mode. ``jobs.fs`` reads ``/proc/self/status`` instead."""
    from jobs import fs

    assert (fs.umask(), fs.file_mode(), fs.folder_mode()) == (0o027, 0o640, 0o750)
    assert os.umask(0o027) == 0o027  # untouched by the reads
    # Where /proc cannot say: the umask the process started with (read once, at import).
    monkeypatch.setattr(fs, "_PROC_STATUS", Path("/nonexistent/status"))
    assert fs.umask() == fs._STARTUP_UMASK


def test_a_sidecar_gets_the_users_usual_mode_not_mkstemps(umask_027: None, tmp_path: Path) -> None:
    target = tmp_path / "000001-abc.json"
    outputs.write_json_atomic(target, {"v": 1})
    assert target.stat().st_mode & 0o777 == 0o640


def test_a_sidecar_is_json_a_strict_reader_takes(tmp_path: Path) -> None:
    """A job an earlier version stored may hold ``inf`` or ``nan`` (SQLite kept fal's ``1e999``
    as ``Infinity``): the sidecar said ``Infinity``, which no JSON reader but Python's takes."""
    target = tmp_path / "a.json"
    infinite = {"seed": float("inf"), "metrics": {"t": [float("-inf"), float("nan"), 2.5]}}
    outputs.write_json_atomic(target, infinite)

    def refuse(name: str) -> Any:
        raise AssertionError(f"the sidecar holds {name}")

    assert json.loads(target.read_text(encoding="utf-8"), parse_constant=refuse) == {
        "seed": None,
        "metrics": {"t": [None, None, 2.5]},
    }


def test_a_sidecar_keeps_the_submitted_inputs_order(tmp_path: Path) -> None:
    """The sidecar's ``input`` is "the exact submitted input": its fields in the order they were
    sent, as the export has them, not sorted (so is the record's own order, ``job_id`` first)."""
    sent = {"prompt": "p", "resolution": "480p", "image_url": "data:…", "seed": 7}
    target = tmp_path / "a.json"
    outputs.write_json_atomic(target, {"job_id": "j", "input": sent, "actual_prompt": None})
    text = target.read_text(encoding="utf-8")
    assert list(json.loads(text)) == ["job_id", "input", "actual_prompt"]
    assert list(json.loads(text)["input"]) == list(sent)
    assert list(json.loads(outputs.sidecar_json({"input": sent, "x": float("inf")}))["input"]) == list(sent)


def test_a_local_outputs_placement_is_the_location_and_its_sidecar_path_resolving_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output path and the sidecar's video path of a stored video are those location() and
    sidecar_video_path() give (a symlinked output folder too), for one resolve of the output
    folder instead of four: a resolve per job is a few stat calls each."""
    from jobs.output_store import LocalOutputStore

    real_resolve = Path.resolve
    calls = 0

    def counting(self: Path, strict: bool = False) -> Path:
        nonlocal calls
        calls += 1
        return real_resolve(self, strict)

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for root in (tmp_path / "real", tmp_path / "link", tmp_path / "link" / ".." / "link" / "sub"):
        store = LocalOutputStore(root)
        dest = store.video_dest("my batch", 3, "0123456789abcdef0123")
        location = store.location("my batch", 3, "0123456789abcdef0123")
        expected = (location, store.sidecar_video_path(location))

        calls = 0
        monkeypatch.setattr(Path, "resolve", counting)
        assert store.placement(dest, "my batch", 3, "0123456789abcdef0123") == expected
        monkeypatch.undo()
        assert calls <= 1


def test_a_sidecars_temporary_left_by_a_killed_write_goes_with_the_old_partials(tmp_path: Path) -> None:
    """``write_json_atomic`` killed before its rename leaves ``.<sidecar>.XXXX.tmp``: swept by
    the same rule as a download's partials (older than the lease), never a fresh one."""
    dest = tmp_path / "000001-abc.mp4"

    def temporary(prefix: str) -> Path:
        fd, name = tempfile.mkstemp(dir=tmp_path, prefix=prefix, suffix=".tmp")
        os.close(fd)
        return Path(name)

    killed = temporary(".000001-abc.json.")
    live = temporary(".000001-abc.json.")  # a sidecar being written right now
    other = temporary(".000002-def.json.")  # another job's
    old = time.time() - 600
    for p in (killed, other):
        os.utime(p, (old, old))
    superseded = temporary(f".000001-abc.json.{outputs.partial_tag(7)}-")  # killed a moment ago
    current = temporary(f".000001-abc.json.{outputs.partial_tag(9)}-")  # the lease holder's own
    assert outputs.remove_stale_partials(dest, older_than=120, version=9) == 2
    assert not killed.exists()
    assert not superseded.exists()  # its lease was taken over: its writer never renames it
    assert live.exists()
    assert current.exists()
    assert other.exists()


def test_a_sidecars_temporary_carries_the_tag_it_is_given(tmp_path: Path) -> None:
    made: list[str] = []
    real = outputs.create_temporary

    def recording(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
        fd, path = real(folder, prefix, suffix)
        made.append(path.name)
        return fd, path

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(outputs, "create_temporary", recording)
        outputs.write_json_atomic(tmp_path / "000001-abc.json", {"v": 1}, temp_tag=outputs.partial_tag(4))
    (name,) = made
    assert name.startswith(".000001-abc.json.v4-")
    assert name.endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["000001-abc.json"]


def test_a_batch_folder_the_file_name_encoding_cannot_hold_is_a_folder_error_not_a_crash(
    tmp_path: Path,
) -> None:
    """Under ``LC_ALL=C`` without UTF-8 mode, a batch named ``tiny-ñ`` made every download of it
    crash (UnicodeEncodeError, "please report it"); it is an OutputFolderError saying the locale,
    which the download step turns into a paused batch with that reason."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from jobs.outputs import batch_dir, OutputFolderError\n"
        "try:\n    batch_dir(Path(sys.argv[1]), 'tiny-\\xf1')\n"
        "except OutputFolderError as exc:\n    print('folder error:', exc)\n"
    )
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        env=env,
        cwd=Path(outputs.__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "folder error:" in done.stdout
    assert "file-name encoding (check LANG/LC_ALL)" in done.stdout


def test_the_folders_listed_for_partials_are_bounded(tmp_path: Path) -> None:
    """A long-lived worker lists a new folder per batch: the listings kept stay bounded (the
    oldest go first), and the folder listed last is kept."""
    outputs._PARTIALS.clear()
    folders = [tmp_path / f"batch-{n}" for n in range(outputs.PARTIALS_FOLDERS_MAX + 200)]
    for folder in folders:
        folder.mkdir()
        assert outputs._partials_in(folder, 3600.0) == set()
    assert len(outputs._PARTIALS) == outputs.PARTIALS_FOLDERS_MAX
    assert folders[-1] in outputs._PARTIALS
    assert folders[0] not in outputs._PARTIALS
    outputs._PARTIALS.clear()


def test_a_listing_older_than_the_relist_age_is_dropped(tmp_path: Path) -> None:
    outputs._PARTIALS.clear()
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    outputs._partials_in(old, 0.05)
    listed = time.monotonic()
    while time.monotonic() - listed < 0.1:  # the listing of ``old`` is stale now
        time.sleep(0.01)
    outputs._partials_in(new, 0.05)
    assert set(outputs._PARTIALS) == {new}
    outputs._PARTIALS.clear()


def test_a_sidecar_is_the_standard_encoders_text_written_in_c() -> None:
    """orjson writes the sidecar (the standard encoder is pure Python with ``indent``): the text
    is byte for byte what ``json.dumps(indent=2, default=str, ensure_ascii=False)`` writes (but
    for an exponent's leading zero: ``1e-7``, not ``1e-07``; the same number to any reader), a
    non-finite float is ``null`` as before, and what orjson refuses (an integer key, an integer
    beyond 64 bits, a lone surrogate) still comes out as the standard encoder writes it."""
    import datetime
    import decimal
    import sys

    record: dict[str, Any] = {
        "job_id": "01J0000000000000000000000",
        "input": {"prompt": 'Crème brûlée\n\u2028\x01 "quoted" / ✓', "seed": 42, "num_frames": 81},
        "seed": 2**31 - 1,
        "cost_usd": decimal.Decimal("0.20"),
        "finished_at": datetime.datetime(2026, 12, 6, 8, 0, tzinfo=datetime.UTC),
        "floats": [0.1, 1.5e16, -0.0, 24.0, 5.041666666666667],
        "empty": [{}, []],
        "flag": True,
        "none": None,
    }
    expected = json.dumps(record, indent=2, default=str, ensure_ascii=False) + "\n"
    assert outputs.sidecar_json(record) == expected
    assert json.loads(outputs.sidecar_json({"tiny": 1e-7})) == {"tiny": 1e-7}

    with_nan = {"input": {"a": 1}, "x": float("nan"), "y": float("-inf")}
    assert json.loads(outputs.sidecar_json(with_nan)) == {"input": {"a": 1}, "x": None, "y": None}

    refusals: list[dict[Any, Any]] = [{1: "int key"}, {"big": 2**70}, {"s": "\ud800"}]
    for refused in refusals:
        assert outputs.sidecar_json(refused) == json.dumps(refused, indent=2, ensure_ascii=False) + "\n"

    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        outputs.sidecar_json(record)
    finally:
        sys.setprofile(None)
    assert calls < 20, calls  # the pure-Python encoder made hundreds


def test_a_folder_sync_is_shared_by_renames_made_before_it_began_and_only_by_those(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fsync_dir`` after a rename returns only once a sync of the folder that *began after*
    that rename has ended (the entry is then durable); renames of other threads waiting
    meanwhile share the next sync instead of one each. A sync already under way when a rename
    is made never counts for it."""
    import threading

    events: list[str] = []
    first_started, release_first = threading.Event(), threading.Event()
    syncs = 0

    def sync(folder: Path) -> None:
        nonlocal syncs
        syncs += 1
        number = syncs
        events.append(f"sync {number} begins")
        if number == 1:
            first_started.set()
            assert release_first.wait(30)
        events.append(f"sync {number} ends")

    monkeypatch.setattr(fs, "sync_folder", sync)

    def renamed(name: str) -> None:
        outputs.fsync_dir(tmp_path)
        events.append(f"{name} returns")

    first = threading.Thread(target=renamed, args=("a",))
    first.start()
    assert first_started.wait(30)
    # b and c renamed while a's sync was under way: it may not count for them
    later = [threading.Thread(target=renamed, args=(name,)) for name in ("b", "c")]
    for thread in later:
        thread.start()
    state = outputs._FOLDER_SYNCS._folders
    for _ in range(3000):  # both have taken their tickets (and wait): not a timing assertion
        if state.get(tmp_path, [0])[0] == 3:
            break
        threading.Event().wait(0.01)
    assert state[tmp_path][0] == 3
    release_first.set()
    for thread in [first, *later]:
        thread.join(30)
    assert syncs == 2  # one for a, one shared by b and c
    assert events.index("a returns") > events.index("sync 1 ends")
    for name in ("b", "c"):
        assert events.index(f"{name} returns") > events.index("sync 2 ends")
    assert tmp_path not in state  # nobody waits: the folder is forgotten
