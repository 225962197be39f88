"""Commands that only read work while the SQLite database's disk is full.

Before, on a disk filled to the last byte with no process holding the database open, ``status``,
``cost``, ``export`` and ``diff`` (also with ``?mode=ro``) all refused: "the database's disk is
full … nothing was changed" (exit 2), and left a 3-byte ``wb.db-shm`` and an empty ``wb.db-wal``
behind. In WAL mode SQLite creates and grows the ``-shm`` index even to read
(``SQLITE_IOERR_SHMSIZE``), so a plain read-only open fails too. Now such a command reads the
file ``immutable`` (no ``-shm``, no locks: exact, everything being in the file), refuses with a
reason when a ``-wal`` holds changes not yet in the file, and cleans up what its failed open
made; writing commands refuse as before.

The full disk is a real one: a 1 MiB tmpfs, filled. Mounting one needs root (or a container's
``CAP_SYS_ADMIN``); without it these tests are skipped (:mod:`tests.full_disk` simulates a full
disk for writes, but cannot make SQLite's ``-shm`` fail to grow). Each command runs as a real
``wanbatch`` process, so no engine of the test process holds the database open.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs import db
from jobs.db import close_engines, make_engine
from tests.e2e.e2e_helpers import MakeManifest, Wb, assert_one_line, wanbatch

BATCH = """\
name: {name}
endpoint: fal-ai/wan-22
defaults:
  resolution: 480p
items:
  - prompt: A paper boat on a rainy street
    seed: {seed}
  - prompt: A cat asleep in the sun
    seed: 2
"""


class SmallDisk:
    """A 1 MiB tmpfs at ``root``: :meth:`fill` takes its last byte, :meth:`free` gives it back."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (65536, 4096, 512, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * size)
        finally:
            os.close(fd)
        info = os.statvfs(self.root)
        assert info.f_bavail == 0, "the small disk still has room"

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    root = tmp_path / "small"
    root.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(root)
    finally:
        if subprocess.run(["umount", str(root)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.fixture
def database(small_disk: SmallDisk, wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two batches (``rd``, ``rd2``) in a database on the small disk, closed: nothing beside it."""
    path = small_disk.root / "db" / "wb.db"
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{path}")
    for name, seed in (("rd", 1), ("rd2", 7)):
        done = wb("submit", manifest(name, BATCH.format(name=name, seed=seed)))
        assert done.code == 0, done.stderr
    close_engines()
    _close_cleanly(path)
    assert _beside(path) == ["wb.db"]
    return path


def _close_cleanly(path: Path) -> None:
    """Checkpoint the write-ahead log into the file; the last connection closed removes it."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _beside(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def _env(url: str) -> dict[str, str]:
    return {"WANBATCH_DATABASE_URL": url}


@pytest.mark.parametrize("query", ["", "?mode=ro"])
def test_reading_commands_read_a_database_whose_disk_is_full(
    database: Path, small_disk: SmallDisk, tmp_path: Path, query: str
) -> None:
    env = _env(f"sqlite:///{database}{query}")
    small_disk.fill()

    status = wanbatch("status", "rd", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["total"] == 2
    assert wanbatch("status", env=env).returncode == 0

    cost = wanbatch("cost", "rd", "--json", env=env)
    assert cost.returncode == 0, cost.stderr
    assert json.loads(cost.stdout)["name"] == "rd"

    out = tmp_path / "rd.jsonl"  # on a disk with room: the database's is full
    export = wanbatch("export", "rd", "-o", out, env=env)
    assert export.returncode == 0, export.stderr
    assert len(out.read_text().splitlines()) == 2

    diff = wanbatch("diff", "rd", "rd2", "--json", env=env)
    assert "disk is full" not in diff.stderr, diff.stderr
    assert json.loads(diff.stdout)

    for done in (status, cost, export, diff):
        assert "Traceback" not in done.stderr, done.stderr
    # Nothing left beside the database: no -shm, no -wal (the audit found a 3-byte -shm and an
    # empty -wal after each refused command).
    assert _beside(database) == ["wb.db"]


def test_a_writing_command_still_refuses_and_leaves_nothing_beside_the_database(
    database: Path, small_disk: SmallDisk
) -> None:
    env = _env(f"sqlite:///{database}")
    small_disk.fill()
    refused = wanbatch("pause", "rd", env=env)
    assert_one_line(refused, f"the database's disk is full ({database})", "nothing was changed")
    assert _beside(database) == ["wb.db"]


def test_changes_only_in_the_write_ahead_log_are_not_read_past(database: Path, small_disk: SmallDisk) -> None:
    """A process that ended without checkpointing (killed) left changes in ``wb.db-wal``, and its
    ``-shm`` is gone (a copy of the database made without it): reading the file alone would show
    an older database, so the command refuses, and says why."""
    crash = (
        "import os, sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1])\n"
        "conn.execute('PRAGMA wal_autocheckpoint = 0')\n"
        "conn.execute(\"UPDATE batches SET pause_reason = 'changed' WHERE name = 'rd'\")\n"
        "conn.commit()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", crash, str(database)], check=True)
    (database.parent / "wb.db-shm").unlink()
    assert (database.parent / "wb.db-wal").stat().st_size > 0
    small_disk.fill()

    refused = wanbatch("status", "rd", env=_env(f"sqlite:///{database}"))
    assert_one_line(refused, f"the database's disk is full ({database})", "wb.db-wal", "not yet in")
    assert (database.parent / "wb.db-wal").stat().st_size > 0  # the log is kept: it holds the changes
    assert _beside(database) == ["wb.db", "wb.db-wal"]


def test_a_schema_behind_this_version_refuses_as_before(database: Path, small_disk: SmallDisk) -> None:
    """No migration can run on a full disk: a reading command refuses rather than read a schema
    this version's statements do not fit."""
    engine = make_engine(f"sqlite:///{database}")
    try:
        db.downgrade(engine, "-1")
    finally:
        engine.dispose()
    _close_cleanly(database)
    small_disk.fill()
    refused = wanbatch("status", "rd", env=_env(f"sqlite:///{database}"))
    assert_one_line(refused, f"the database's disk is full ({database})", "nothing was changed")
    assert _beside(database) == ["wb.db"]


def test_the_small_disk_is_full_for_sqlite_too(database: Path, small_disk: SmallDisk) -> None:
    """The premise: on this disk SQLite cannot even read the database in WAL mode."""
    small_disk.fill()
    with (
        contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn,
        pytest.raises(sqlite3.OperationalError) as failed,
    ):
        conn.execute("SELECT count(*) FROM batches").fetchone()
    assert failed.value.sqlite_errorcode == sqlite3.SQLITE_IOERR_SHMSIZE, failed.value


def test_the_doctor_fails_the_database_and_the_outputs_on_a_full_disk(
    database: Path, small_disk: SmallDisk
) -> None:
    """The database and the output folder (not created yet) on the one full disk: each check
    fails, saying so; no traceback, no ✓. Before, the output folder not there yet was "✓ …
    not created yet: the first run creates it (… is writable)", while that run's probe failed
    with "No space left on device"."""
    outputs = small_disk.root / "outputs"
    env = {**_env(f"sqlite:///{database}"), "WANBATCH_OUTPUT_DIR": str(outputs)}
    small_disk.fill()

    done = wanbatch("doctor", "--simulate", "--json", env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    checks = {check["name"]: check for check in json.loads(done.stdout)["checks"]}
    assert checks["database"]["status"] == "fail"
    assert "the database's disk is full (0 bytes free" in checks["database"]["detail"]
    assert checks["output storage"]["status"] == "fail", checks["output storage"]
    assert "its disk is full (0 bytes free" in checks["output storage"]["detail"]
    assert not outputs.exists()  # the doctor creates nothing

    shown = wanbatch("doctor", "--simulate", env=env)
    assert shown.returncode == 1, shown.stderr
    assert "Traceback" not in shown.stderr + shown.stdout, shown.stderr
    said = shown.stdout + shown.stderr
    assert "✗ database" in said, said
    assert "✗ output storage" in said, said
    assert "all well" not in said
    assert _beside(database) == ["wb.db"]


@pytest.fixture
def root_reserve_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB ext4 disk keeping half its blocks for root (``mkfs.ext4 -m 50``), mounted, and
    filled up to them: nothing left for other users (``f_bavail`` 0), some 4 MiB for root."""
    from jobs.fs import writes_as_root

    if not writes_as_root():
        pytest.skip("the blocks ext4 keeps for root are only the host's root's to write")
    image, root = tmp_path / "ext4.img", tmp_path / "reserved"
    with image.open("wb") as fh:
        fh.truncate(8 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "50", str(image)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 file system here: {made.stderr.decode(errors='replace').strip()}")
    root.mkdir()
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(root)], capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        fd = os.open(root / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.statvfs(root).f_bavail > 0:
                os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        info = os.statvfs(root)
        assert info.f_bavail == 0, info
        assert info.f_bfree * info.f_frsize > 2 << 20, info
        yield root
    finally:
        if subprocess.run(["umount", str(root)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(root)], check=False)


def test_the_doctor_run_as_root_writes_into_the_blocks_kept_for_root(
    root_reserve_disk: Path, wb: Wb, manifest: MakeManifest
) -> None:
    """Full for every user but root, whose commands write there (ext4 lets the host's root use
    the blocks it keeps): the doctor run as root passes the database and the output folder.
    Before, it said "the database's disk is full (0 bytes free …): every command that writes
    refuses to start" and "… `run` refuses to start", right after `submit` had written there."""
    database, outputs = root_reserve_disk / "db" / "wb.db", root_reserve_disk / "outputs"
    env = {**_env(f"sqlite:///{database}"), "WANBATCH_OUTPUT_DIR": str(outputs)}
    submitted = wanbatch("submit", manifest("rr", BATCH.format(name="rr", seed=1)), env=env)
    assert submitted.returncode == 0, submitted.stderr
    assert os.statvfs(root_reserve_disk).f_bavail == 0

    done = wanbatch("doctor", "--simulate", "--json", env=env)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    checks = {check["name"]: check for check in json.loads(done.stdout)["checks"]}
    assert checks["database"]["status"] == "ok", checks["database"]
    assert checks["output storage"]["status"] == "ok", checks["output storage"]
    assert not outputs.exists()  # the doctor creates nothing
