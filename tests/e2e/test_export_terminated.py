"""SIGTERM or SIGHUP during `export` (or `submit`) stops it as Ctrl-C does; an export killed
outright leaves a temporary file the next export to the same target removes.

Audit: SIGTERM or SIGHUP during an `export -o data.jsonl` (jsonl, csv, parquet) killed it by the
signal (143, 129) with nothing on stderr, and left a hidden ``.data.jsonl.XXXX.part`` (0600,
partial records) beside the target, which nothing ever removed: each killed export added one.
Ctrl-C removed it (the export's cleanup runs on the way out) and exited 130 with one line; only
`run`, `rerun` and `cancel` took TERM and HUP as Ctrl-C. Now `export` and `submit` do too, and
the temporary file is locked while it is written, as an `hf` export's part folder is: one an
export killed with SIGKILL left is removed by the next export to the same target, one held by a
running export is left alone, and one of an earlier version's name (which took no lock) only
once untouched for a day.

The signal is sent by the `wanbatch` process to itself while it writes (a hook installed before
the CLI runs, after the first record): a real signal through the real handlers, no timing to guess.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.export import UNLOCKED_PART_AGE
from tests.e2e.e2e_helpers import MakeManifest, db_rows, subprocess_env
from tests.in_process import run_main

#: Runs the CLI after making the export send ``WANBATCH_TEST_SIGNAL`` to its own process once its
#: first record is on its way to the file.
EXPORT_HOOKED = """
import os, signal, sys
sys.argv[0] = "wanbatch"
sent = getattr(signal, os.environ.pop("WANBATCH_TEST_SIGNAL"))
import jobs.export as exporting

tallied = exporting.tallied

def hooked(*args, **kwargs):
    for n, row in enumerate(tallied(*args, **kwargs)):
        yield row
        if n == 0:
            os.kill(os.getpid(), sent)

exporting.tallied = hooked
from cli import main
main()
"""

#: Runs the CLI after making the first INSERT of a job send ``WANBATCH_TEST_SIGNAL`` to its own
#: process (inside the submit's transaction).
SUBMIT_HOOKED = """
import os, signal, sys
sys.argv[0] = "wanbatch"
sent = getattr(signal, os.environ.pop("WANBATCH_TEST_SIGNAL"))
from sqlalchemy import event
from sqlalchemy.engine import Engine

@event.listens_for(Engine, "before_cursor_execute")
def _insert(conn, cursor, statement, parameters, context, executemany):
    if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
        os.kill(os.getpid(), sent)
from cli import main
main()
"""

MANIFEST = (
    "name: night\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: one\n  - prompt: two\n  - prompt: three\n"
)


@pytest.fixture
def batch(manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A simulated batch of three jobs, run to the end; its manifest."""
    path = manifest("night", MANIFEST)
    assert run_main(["run", str(path), "--simulate", "--no-progress"], monkeypatch) == 0
    return path


def _hooked(script: str, sent: str, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *argv],
        env={**subprocess_env("http://127.0.0.1:9"), "WANBATCH_TEST_SIGNAL": sent},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def _interrupted(done: subprocess.CompletedProcess[str]) -> None:
    """Stopped as Ctrl-C stops it: exit 130, one ``interrupted`` line, the JSON object."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert [line for line in done.stderr.splitlines() if line.strip()] == ["interrupted"], done.stderr
    assert json.loads(done.stdout) == {"ok": False, "error": "interrupted"}


@pytest.mark.parametrize("sent", ["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_term_or_hup_during_an_export_is_ctrl_c_and_leaves_no_temporary_file(
    batch: Path, fmt: str, sent: str, e2e_env: Path
) -> None:
    target = e2e_env / f"data.{fmt}"

    done = _hooked(
        EXPORT_HOOKED, sent, e2e_env, "export", "night", "--format", fmt, "-o", target.name, "--json"
    )

    _interrupted(done)
    assert not target.exists()
    assert _parts(e2e_env) == []


def test_term_during_a_submit_is_ctrl_c_and_stores_nothing(manifest: MakeManifest, e2e_env: Path) -> None:
    path = manifest("night", MANIFEST)

    done = _hooked(SUBMIT_HOOKED, "SIGTERM", e2e_env, "submit", str(path), "--json")

    _interrupted(done)
    url = os.environ["WANBATCH_DATABASE_URL"]
    assert db_rows(url, "SELECT count(*) FROM batches")[0][0] == 0  # the transaction rolled back


def test_the_next_export_removes_what_a_killed_one_left_and_no_running_ones(
    batch: Path, e2e_env: Path
) -> None:
    target = e2e_env / "data.jsonl"
    killed = _hooked(EXPORT_HOOKED, "SIGKILL", e2e_env, "export", "night", "-o", target.name)
    assert killed.returncode == -9, killed.stderr
    (left,) = _parts(e2e_env)  # a SIGKILL can be caught by nothing: its file stays, for now
    assert left.startswith(".data.jsonl."), left
    assert left.endswith(".locked.part"), left

    long_ago = time.time() - UNLOCKED_PART_AGE - 60
    old = e2e_env / ".data.jsonl.abcd1234.part"  # an earlier version's, untouched for a day
    old.write_text("{}\n")
    os.utime(old, (long_ago, long_ago))
    recent = e2e_env / ".data.jsonl.efgh5678.part"  # an earlier version's, maybe still written
    recent.write_text("{}\n")
    held = e2e_env / ".data.jsonl.held0000.locked.part"  # a running export's
    held.write_text("{}\n")
    other = e2e_env / ".data.jsonl.v2.abcd1234.locked.part"  # an export to data.jsonl.v2's
    other.write_text("{}\n")
    mine = e2e_env / ".data.jsonl.abcd1234.locked.part.bak"  # not an export's name
    mine.write_text("{}\n")
    with held.open("rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        done = subprocess.run(
            [sys.executable, "-c", "from cli import main; main()", "export", "night", "-o", target.name],
            env=subprocess_env("http://127.0.0.1:9"),
            cwd=e2e_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert len(target.read_text().splitlines()) == 3
    assert _parts(e2e_env) == sorted([recent.name, held.name, other.name])
    assert mine.exists()
