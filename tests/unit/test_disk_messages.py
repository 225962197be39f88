"""What a full database disk, a process out of file descriptors and a folder in an output's way
are told as: the doctor sees the full disk, a failed first start leaves no empty database file,
and "out of open files" is said as such (raise the limit), never as a full disk or fal's outage."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar

import httpx
import pytest

from jobs import db
from jobs.errors import DatabaseFullError
from jobs.outputs import OutputWriteError
from jobs.settings import DatabaseSettings, get_settings

E = TypeVar("E", bound=Exception)


def _sqlite_full() -> sqlite3.OperationalError:
    """SQLite's own SQLITE_FULL: a write past ``max_page_count``."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (b BLOB)")
        conn.execute("PRAGMA max_page_count = 1")
        with pytest.raises(sqlite3.OperationalError) as raised:
            conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
        return raised.value
    finally:
        conn.close()


def _no_room(real: Callable[[str], os.statvfs_result]) -> Callable[[str], object]:
    """``os.statvfs`` of a file system with no byte left (a tmpfs filled up)."""

    def statvfs(path: str) -> object:
        info = real(path)
        return SimpleNamespace(f_bavail=0, f_bfree=0, f_blocks=info.f_blocks, f_frsize=info.f_frsize)

    return statvfs


def _room_for_root_only(real: Callable[[str], os.statvfs_result]) -> Callable[[str], object]:
    """``os.statvfs`` of an ext4 disk of 20 GiB filled up to the blocks it keeps for root
    (``tune2fs -m``, 5 % by default): nothing left for other users, 1 GiB for root."""

    def statvfs(path: str) -> object:
        size = real(path).f_frsize
        root_only, disk = (1 << 30) // size, (20 << 30) // size
        return SimpleNamespace(f_bavail=0, f_bfree=root_only, f_blocks=disk, f_frsize=size)

    return statvfs


#: Who runs the doctor: its effective uid and its user namespace's uid map (the host's own for
#: root; a rootless container maps its root to a user of the host), and whether the blocks ext4
#: keeps for root are its to write.
WRITERS = {
    "host-root": (0, "         0          0 4294967295\n", True),
    "namespaced-root": (0, "         0       1000          1\n", False),
    "user": (1000, "         0          0 4294967295\n", False),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_the_doctor_counts_the_blocks_kept_for_root_when_it_runs_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """A disk full for every user but root: root's `run` creates the database and takes the
    output probe (ext4 lets the host's root write the 5 % it keeps), so the doctor run as root
    says so. Before: "the database's disk is full: every command that writes refuses to start"
    and "`run` refuses to start", both untrue for root (it asked ``f_bavail`` only)."""
    from jobs import fs
    from worker.doctor import check_database, check_storage

    euid, uid_map, room = WRITERS[writer]
    mapped = tmp_path / "uid_map"
    mapped.write_text(uid_map, encoding="ascii")
    monkeypatch.setattr(fs, "_UID_MAP", mapped, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'db' / 'wb.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    get_settings.cache_clear()
    monkeypatch.setattr(os, "statvfs", _room_for_root_only(os.statvfs))
    try:
        database, storage = check_database(get_settings()), check_storage(get_settings())
    finally:
        get_settings.cache_clear()
    expected = "ok" if room else "fail"
    assert (database.status, storage.status) == (expected, expected), (database.detail, storage.detail)
    if not room:
        assert "the database's disk is full (0 bytes free for" in database.detail
        assert "its disk is full (0 bytes free for" in storage.detail


def test_root_keeps_off_the_blocks_ext4_keeps_from_root_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """ext4 counts in ``f_bfree`` the blocks it keeps for itself (2 % of the disk, at most 4096),
    which root may not write either: a disk root has filled shows them, and is full for root."""
    from jobs import fs

    monkeypatch.setattr(fs, "writes_as_root", lambda: True)
    full = SimpleNamespace(f_bavail=0, f_bfree=4096, f_blocks=5_000_000, f_frsize=4096)
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    assert fs.free_bytes_in(Path("/data")) == 0
    band = SimpleNamespace(f_bavail=0, f_bfree=4096 + 256, f_blocks=5_000_000, f_frsize=4096)
    monkeypatch.setattr(os, "statvfs", lambda path: band)
    assert fs.free_bytes_in(Path("/data")) == 256 * 4096
    tmpfs = SimpleNamespace(f_bavail=10, f_bfree=10, f_blocks=256, f_frsize=4096)  # none kept
    monkeypatch.setattr(os, "statvfs", lambda path: tmpfs)
    assert fs.free_bytes_in(Path("/data")) == 10 * 4096


@pytest.mark.parametrize("exists", [True, False], ids=["database-there", "not-created-yet"])
def test_the_doctor_says_the_databases_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exists: bool
) -> None:
    """Before: "reachable, schema … (current)" and all well, while every command refused to
    start with "the database's disk is full"."""
    from worker.doctor import check_database

    path = tmp_path / "db" / "wb.db"
    url = f"sqlite:///{path}"
    if exists:
        engine = db.make_engine(url)
        db.migrate(engine)
        engine.dispose()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", url)
    get_settings.cache_clear()
    assert check_database(get_settings()).status == "ok"  # room: as before

    monkeypatch.setattr(os, "statvfs", _no_room(os.statvfs))
    check = check_database(get_settings())
    assert check.status == "fail"
    assert "the database's disk is full (0 bytes free for" in check.detail
    assert (check.fix or "").startswith("free space on that disk")
    assert path.exists() is exists  # the doctor creates nothing
    get_settings.cache_clear()


def test_the_doctor_says_an_output_folder_not_created_yet_has_no_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: "✓ … not created yet: the first run creates it (… is writable)" on a full disk,
    while that run's probe failed with "No space left on device" (a folder that is there takes
    the probe itself, and failed already)."""
    from worker.doctor import check_storage

    outputs = tmp_path / "outputs"
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(outputs))
    get_settings.cache_clear()
    assert check_storage(get_settings()).status == "ok"  # room: as before

    monkeypatch.setattr(os, "statvfs", _no_room(os.statvfs))
    check = check_storage(get_settings())
    assert check.status == "fail"
    assert (
        f"WANBATCH_OUTPUT_DIR '{outputs}' cannot take the outputs: its disk is full (0 bytes free"
        in check.detail
    )
    assert (check.fix or "").startswith("free space on that disk")
    assert not outputs.exists()  # the doctor creates nothing
    get_settings.cache_clear()


def test_a_first_start_on_a_full_disk_leaves_no_empty_database_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "wb.db"
    full = _sqlite_full()

    def migrate(engine: object, *args: object, **kwargs: object) -> None:
        with engine.connect() as conn:  # type: ignore[attr-defined]
            conn.exec_driver_sql("PRAGMA user_version = 0")  # SQLite touched the file, as it does
        raise full

    monkeypatch.setattr(db, "migrate", migrate)
    with pytest.raises(DatabaseFullError):
        db.open_engine(DatabaseSettings(database_url=f"sqlite:///{path}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    # A database that was there before is never removed, empty or not.
    path.touch()
    with pytest.raises(DatabaseFullError):
        db.open_engine(DatabaseSettings(database_url=f"sqlite:///{path}"))
    assert path.exists()


def _caused(exc: E, cause: BaseException) -> E:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("code", "said", "not_said"),
    [
        (errno.EMFILE, "this process ran out of file descriptors", "free space"),
        (errno.EISDIR, "a folder is in the way where the output file goes", "free space"),
        (errno.ENOSPC, "free space or fix WANBATCH_OUTPUT_DIR", "file descriptors"),
        # A read-only mount is no full disk: no freed space heals it (before: "free space or fix").
        (errno.EROFS, "the output folder is on a read-only file system", "free space"),
        (errno.EACCES, "this process may not write in the output folder", "free space"),
        (errno.EPERM, "this process may not write in the output folder", "free space"),
    ],
)
def test_an_output_that_cannot_be_written_gets_the_fix_of_its_cause(
    code: int, said: str, not_said: str
) -> None:
    from worker.steps.download import _write_fix

    exc = _caused(OutputWriteError("could not clean up /out/b: …"), OSError(code, os.strerror(code)))
    fix, _once = _write_fix(exc)
    assert said in fix
    assert not_said not in fix
    if code == errno.EMFILE:
        assert "ulimit -n" in fix
    if code == errno.EROFS:
        assert "remount it read-write" in fix
        assert "they can be written" in _once
    if code in (errno.EACCES, errno.EPERM):
        assert "permissions" in fix
        assert "they can be written" in _once


def test_a_submit_out_of_file_descriptors_is_not_called_fals_outage(caplog: pytest.LogCaptureFixture) -> None:
    from worker.fal.errors import FalUnreachableError, _submit_transport_failure
    from worker.steps.fal_reach import FalReach

    connect = _caused(httpx.ConnectError("[Errno 24] Too many open files"), OSError(errno.EMFILE, "Too many"))
    error = _submit_transport_failure(connect)
    assert isinstance(error, FalUnreachableError)  # nothing sent: uncounted, held as before
    assert "this process ran out of file descriptors" in str(error)
    assert "ulimit -n" in str(error)
    with caplog.at_level(logging.WARNING):
        FalReach().failed(str(error).removeprefix("fal submit: not sent, "), probe=False)
    (line,) = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "submit.fal_unreachable"]
    assert line.startswith("fal cannot be reached from this process: could not connect: this process ran out")
    assert "fal is unreachable" not in line


def test_the_accept_loops_out_of_files_error_is_one_line_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncio's accept loop logs it with a traceback for every connection in the backlog, every
    second: 27 MB of stderr in 6.6 s from the bundled simulator under `ulimit -n 20`."""
    from jobs.open_files import quiet_accept_errors

    quiet_accept_errors()
    quiet_accept_errors()  # once, however often
    logger = logging.getLogger("asyncio")
    exc = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(500):
            logger.error(
                "socket.accept() out of system resource\nsocket: <TransportSocket fd=3>",
                exc_info=(OSError, exc, None),
            )
        logger.error("another error")
    said = [r for r in caplog.records if r.name == "asyncio"]
    assert [r.getMessage() for r in said][-1] == "another error"
    (line,) = said[:-1]
    assert line.exc_info is None
    assert line.getMessage() == (
        "a server of this process cannot accept connections: this process ran out of file "
        "descriptors (too many open files, EMFILE); raise the open-file limit (`ulimit -n 4096` in "
        "the shell that starts wanbatch; LimitNOFILE= for a systemd service, ulimits: nofile for a "
        "container)"
    )


def test_the_output_folders_free_space_is_the_one_helpers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LocalOutputStore.free_bytes`` (the start-up warning that the output disk looks too
    small) counts as :func:`jobs.fs.free_bytes_in` does, root's reserved blocks included for
    root: it read ``shutil.disk_usage``'s ``free`` (``f_bavail`` only), 5 % of an ext4 disk less
    than root may write, and disagreed with the doctor."""
    from jobs import fs
    from jobs.output_store import LocalOutputStore

    monkeypatch.setattr(fs, "writes_as_root", lambda: True)
    band = SimpleNamespace(f_bavail=10, f_bfree=4096 + 256, f_blocks=5_000_000, f_frsize=4096)
    monkeypatch.setattr(os, "statvfs", lambda path: band)
    store = LocalOutputStore(tmp_path / "outputs" / "not-yet")  # not created: its parent's disk
    assert store.free_bytes() == fs.free_bytes_in(tmp_path) == 256 * 4096
