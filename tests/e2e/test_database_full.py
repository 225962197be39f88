"""The database's disk fills up: one clear line, nothing sent meanwhile, nothing lost, nothing paid twice.

Before, any writing command (`submit`, `pause`, `run`) against a SQLite database whose disk was
full answered ``internal error: OperationalError: … database or disk is full; please report
it`` (exit 70). During an embedded `run`, the conductor died at once while the submit threads
retried recording the request ids fal had accepted for twelve minutes, a warning a second, and
then threw them away: after space was freed those jobs ended ``failed (submit_unknown)``
although fal had run and billed them, and `rerun --failed-only` paid for them again.

The full disk is SQLite's own (:mod:`tests.full_disk`: ``PRAGMA max_page_count``, and every
write made to need room): each write fails with ``SQLITE_FULL`` ("database or disk is full"),
the error a full disk gives. Each command runs as a real ``wanbatch`` process (the entry point,
its exit codes, its stderr) whose writes are refused so while a flag file exists: the test
fills and frees the "disk" by creating and removing the flag, mid-run. fal is the simulator in
this process, whose ledger says what was accepted (and billed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import Background, MakeManifest, db_rows, subprocess_env, wait_for
from tests.full_disk import cli_source, prepare

JOBS = 6


class Disk:
    """The flag that makes the database's disk full, for the processes started with :func:`cli`."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def fill(self) -> None:
        prepare(os.environ["WANBATCH_DATABASE_URL"])
        self.flag.touch()

    def free(self) -> None:
        self.flag.unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    disk = Disk(tmp_path / "disk-is-full")
    yield disk
    disk.free()


@pytest.fixture
def env(e2e_env: Path, sim: SimulatorHandle, disk: Disk) -> dict[str, str]:
    """The subprocesses' environment: this test's database and outputs, the test's simulator."""
    return subprocess_env(
        sim.url,
        MAX_OUTSTANDING="2",
        EMBEDDED_CONCURRENCY="2",
        LEASE_SECONDS="3",  # what was claimed but never sent is sent after this
    )


def cli(disk: Disk, *args: str | Path) -> list[str]:
    """``wanbatch ARGS`` as the console script runs it, its writes refused while ``disk`` is full."""
    return [sys.executable, "-c", cli_source(disk.flag), *map(str, args)]


def wanbatch(
    env: dict[str, str], cwd: Path, disk: Disk, *args: str | Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(disk, *args), env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


class Proc(Background):
    """A `wanbatch` in the background (:class:`Background`), its writes refused while ``disk`` is full."""

    def __init__(self, disk: Disk, args: list[str | Path], env: dict[str, str], cwd: Path, name: str) -> None:
        self.disk = disk
        super().__init__(args, env, cwd, name)

    def command(self) -> list[str]:
        return cli(self.disk)


def journals(folder: Path) -> list[Path]:
    """The files where a process keeps accepted submissions its database could not take."""
    return sorted(folder.glob("wanbatch-accepted-*.jsonl"))


def kept(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in journals(folder) for line in path.read_text().splitlines()]


def jobs(db: str) -> list[tuple[str, int, int]]:
    """(state, attempts, possible duplicate charges) of every job."""
    try:
        rows = db_rows(db, "SELECT state, attempts, possible_duplicate_charges FROM jobs")
    except OperationalError:  # not migrated yet
        return []
    return sorted((str(s), int(a), int(d)) for s, a, d in rows)


def one_line(done: subprocess.CompletedProcess[str] | Proc) -> str:
    err = done.stderr() if isinstance(done, Proc) else done.stderr
    out = done.stdout() if isinstance(done, Proc) else done.stdout
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err + out, err
    assert "internal error" not in err + out, err
    assert len(lines) == 1, err
    return lines[0]


def _manifest(manifest: MakeManifest, name: str, count: int = JOBS) -> Path:
    items = "\n".join(f"  - prompt: a lighthouse in the rain, number {i}" for i in range(count))
    return manifest(name, f"name: {name}\nendpoint: fal-ai/wan-22\nitems:\n{items}\n")


def test_a_write_refused_for_a_full_disk_is_one_line_exit_2_and_changes_nothing(
    manifest: MakeManifest, env: dict[str, str], disk: Disk, e2e_env: Path
) -> None:
    """Was ``internal error: OperationalError: … database or disk is full; please report it``, exit 70."""
    db = env["WANBATCH_DATABASE_URL"]
    assert wanbatch(env, e2e_env, disk, "submit", _manifest(manifest, "first", count=2)).returncode == 0
    stored = db_rows(db, "SELECT count(*) FROM batches")[0][0], db_rows(db, "SELECT count(*) FROM jobs")[0][0]
    assert stored == (1, 2)

    disk.fill()
    other = _manifest(manifest, "other")
    refused = wanbatch(env, e2e_env, disk, "submit", other)
    assert refused.returncode == 2, refused.stderr
    line = one_line(refused)
    where = db.removeprefix("sqlite:///")
    assert line == (
        f"error: the database's disk is full ({where}): free space, then run the command again; "
        "nothing was changed"
    )
    as_json = wanbatch(env, e2e_env, disk, "submit", other, "--json")
    assert as_json.returncode == 2, as_json.stderr
    assert json.loads(as_json.stdout) == {"ok": False, "error": line.removeprefix("error: ")}
    for command in (["run", other, "--no-progress"], ["pause", "first"], ["cancel", "first"]):
        done = wanbatch(env, e2e_env, disk, *command)
        assert done.returncode == 2, (command, done.stderr)
        assert one_line(done) == line

    disk.free()  # nothing of the refused commands was kept
    assert (
        db_rows(db, "SELECT count(*) FROM batches")[0][0],
        db_rows(db, "SELECT count(*) FROM jobs")[0][0],
    ) == stored
    assert db_rows(db, "SELECT state, paused_by_user FROM batches") == [("active", 0)]
    assert wanbatch(env, e2e_env, disk, "submit", other).returncode == 0


def test_a_run_whose_disk_fills_up_sends_nothing_more_and_records_what_fal_accepted_once_space_is_back(
    manifest: MakeManifest,
    sim: SimulatorHandle,
    env: dict[str, str],
    disk: Disk,
    e2e_env: Path,
    tmp_path: Path,
) -> None:
    """fal accepts the first two submits, whose answers reach wanbatch only after the disk is
    full: the ids wait (in memory, and in a journal beside the database), nothing more is sent,
    the progress says why; space comes back and the run finishes, each job sent once."""
    db = env["WANBATCH_DATABASE_URL"]
    sim.set_faults(submit_slow={"next": 2, "delay": 1.5})  # queued at once, answered 1.5 s later
    run = Proc(disk, ["run", _manifest(manifest, "filled")], env, e2e_env, "run")
    try:
        wait_for("fal to accept two submits", lambda: sim.ledger()["accepted"] == 2, run)
        disk.fill()
        wait_for("both accepted ids kept aside", lambda: len(kept(tmp_path)) == 2, run)
        ledger = sim.ledger()
        assert sorted(e["request_id"] for e in kept(tmp_path)) == sorted(
            e["request_id"] for e in ledger["entries"]
        )
        # While the disk is full, nothing more is sent, and the run says what waits and where.
        wait_for("the progress to say so", lambda: "waiting to be recorded" in run.stderr(), run)
        assert sim.ledger()["accepted"] == 2
        assert "2 accepted submission(s) waiting to be recorded; free space on the disk of" in run.stderr()
        assert {s for s, _, _ in jobs(db)} == {"pending", "submitting"}  # no id recorded yet

        disk.free()
        assert run.wait() == 0, run.stderr()
    finally:
        run.kill()
    err = run.stderr()
    assert "Traceback" not in err
    assert "internal error" not in err
    assert err.count("which cannot be recorded yet") == 2  # said once each, not once a second
    assert err.count("recorded after all") == 2
    assert jobs(db) == [("succeeded", 1, 0)] * JOBS
    ledger = sim.ledger()
    assert ledger["accepted"] == JOBS  # each job paid for once
    assert ledger["duplicates"] == []
    assert journals(tmp_path) == []  # every kept id is in the database now


def test_ctrl_c_while_the_disk_is_full_names_the_accepted_requests_and_the_next_run_records_them(
    manifest: MakeManifest,
    sim: SimulatorHandle,
    env: dict[str, str],
    disk: Disk,
    e2e_env: Path,
    tmp_path: Path,
) -> None:
    db = env["WANBATCH_DATABASE_URL"]
    path = _manifest(manifest, "stopped")
    sim.set_faults(submit_slow={"next": 2, "delay": 1.5})
    first = Proc(disk, ["run", path, "--no-progress"], env, e2e_env, "first")
    try:
        wait_for("fal to accept two submits", lambda: sim.ledger()["accepted"] == 2, first)
        disk.fill()
        wait_for("both accepted ids kept aside", lambda: len(kept(tmp_path)) == 2, first)
        first.popen.send_signal(signal.SIGINT)
        assert first.wait(30) == 130, first.stderr()
    finally:
        first.kill()
    accepted = sim.ledger()["entries"]
    assert len(accepted) == 2
    last = first.stderr().strip().splitlines()[-1]
    assert "2 accepted submission(s) could not be recorded (fal has them, and bills them)" in last
    for entry in accepted:  # each request id, with its job, in the line the run ends with
        assert f"request {entry['request_id']}" in last
    (journal,) = journals(tmp_path)
    assert f"kept in {journal}: the next run on this host records them (none is sent again)" in last
    assert "still in flight" not in last  # they are not unknown: their ids are known
    assert {s for s, _, _ in jobs(db)} == {"pending", "submitting"}

    disk.free()
    second = Proc(disk, ["run", path, "--no-progress"], env, e2e_env, "second")
    assert second.wait() == 0, second.stderr()
    assert "Traceback" not in second.stderr()
    assert second.stderr().count(f"recorded: kept in {journal}") == 2
    assert jobs(db) == [("succeeded", 1, 0)] * JOBS  # none failed "submit_unknown"
    ledger = sim.ledger()
    assert ledger["accepted"] == JOBS  # the two were never sent again
    assert ledger["duplicates"] == []
    assert journals(tmp_path) == []


def test_a_run_whose_disk_fills_up_with_nothing_to_record_ends_in_one_line(
    manifest: MakeManifest, sim: SimulatorHandle, env: dict[str, str], disk: Disk, e2e_env: Path
) -> None:
    """Every job is at fal (its id recorded) when the disk fills: nothing waits, so the run
    ends at once, saying where to free space; the next run collects the results."""
    db = env["WANBATCH_DATABASE_URL"]
    path = _manifest(manifest, "ended", count=2)
    latency = sim.engine.options.latency_seconds
    sim.update_options(latency_seconds=3.0)  # long enough to fill the disk while both run
    try:
        run = Proc(disk, ["run", path, "--no-progress"], env, e2e_env, "run")
        try:
            at_fal = {"queued", "running"}
            wait_for("both jobs to be at fal", lambda: sum(s in at_fal for s, _, _ in jobs(db)) == 2, run)
            disk.fill()
            assert run.wait() == 2, run.stderr()
        finally:
            run.kill()
    finally:
        sim.update_options(latency_seconds=latency)
    where = db.removeprefix("sqlite:///")
    assert one_line(run) == (
        f"error: the database's disk is full ({where}): free space, then run the same command again: it "
        "goes on where this run stopped (nothing more was sent; requests already at fal are collected then)"
    )
    disk.free()
    second = Proc(disk, ["run", path, "--no-progress"], env, e2e_env, "second")
    assert second.wait() == 0, second.stderr()
    assert jobs(db) == [("succeeded", 1, 0)] * 2
    assert sim.ledger()["accepted"] == 2
