"""Ctrl-C while `wanbatch rerun` stores its new batch: the line names the batch, or says none was stored.

The bug: a signal before the processing began (the new batch's jobs being stored, or stored and
the run being set up) carried no batch, so the line said "run the same command again to start
over" — even when the batch had been stored. Copied, that stored a second `NAME-rerun-N` of the
same jobs, paid twice if both run. And a signal inside one of the storing statements
(SQLAlchemy drops the connection on it) was reported as an internal error, exit 70: the SQLite
rollback hook read the dropped connection. Now the rerun names its batch before storing it, the
line looks it up, and says either how to run the stored batch or that nothing was stored.

The signal is sent by the `wanbatch` process to itself, at an exact point (a hook installed
before the CLI runs): a real SIGINT through the real handlers, with no timing to guess.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.e2e_helpers import MakeManifest, Wb, db_rows, subprocess_env, wanbatch_command

#: Runs the CLI after installing a Ctrl-C at ``WANBATCH_TEST_SIGINT_AT``: ``storing`` (the first
#: INSERT of the new batch's jobs, inside SQLAlchemy's execution of it) or ``stored`` (the batch
#: is committed, its processing has not begun).
HOOKED = """
import os, signal, sys
sys.argv[0] = "wanbatch"
point = os.environ.pop("WANBATCH_TEST_SIGINT_AT")

def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)

if point == "storing":
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "before_cursor_execute")
    def _insert(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
            ctrl_c()
else:
    import cli.batch_commands as commands

    said = commands.print_budget_note

    def _stored(result):
        said(result)
        ctrl_c()

    commands.print_budget_note = _stored
from cli import main
main()
"""

MANIFEST = "name: night\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: one\n  - prompt: two\n"


@pytest.fixture
def env(e2e_env: Path) -> dict[str, str]:
    """The subprocess's environment: this test's database and outputs; `--simulate` needs no fal."""
    return subprocess_env("http://127.0.0.1:9", TICK_INTERVAL="0.05")


def _rerun_stopped_at(
    point: str, env: dict[str, str], cwd: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            HOOKED,
            "rerun",
            "night",
            "--new-seeds",
            "--simulate",
            "--no-progress",
            *extra,
        ],
        env={**env, "WANBATCH_TEST_SIGINT_AT": point},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _batches(env: dict[str, str]) -> list[str]:
    return sorted(row[0] for row in db_rows(env["WANBATCH_DATABASE_URL"], "SELECT name FROM batches"))


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert done.returncode == 130, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_ctrl_c_while_the_jobs_are_stored_says_nothing_was_stored(
    wb: Wb, manifest: MakeManifest, env: dict[str, str], e2e_env: Path
) -> None:
    assert wb("submit", manifest("night", MANIFEST)).code == 0

    line = _one_line(_rerun_stopped_at("storing", env, e2e_env))

    assert "internal error" not in line
    assert "nothing was stored" in line, line
    assert "run the same command again to start over" in line
    assert _batches(env) == ["night"]  # the new batch's transaction was rolled back


def test_ctrl_c_after_the_batch_was_stored_names_it_and_its_run_finishes_it(
    wb: Wb, manifest: MakeManifest, env: dict[str, str], e2e_env: Path
) -> None:
    assert wb("submit", manifest("night", MANIFEST)).code == 0

    line = _one_line(_rerun_stopped_at("stored", env, e2e_env))

    assert "run the same command again" not in line, line
    found = re.search(r"`(wanbatch run [^`]*)` resumes the new batch \(running `rerun` again", line)
    assert found, line
    assert found.group(1) == "wanbatch run night-rerun-1 --simulate"
    assert _batches(env) == ["night", "night-rerun-1"]

    copied = shlex.split(found.group(1))[1:]
    resumed = subprocess.run(
        [*wanbatch_command(), *copied, "--no-progress"],
        env=env,
        cwd=e2e_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert _batches(env) == ["night", "night-rerun-1"]  # no second batch of the same jobs


def test_an_interrupted_rerun_json_names_the_stored_batch(
    wb: Wb, manifest: MakeManifest, env: dict[str, str], e2e_env: Path
) -> None:
    assert wb("submit", manifest("night", MANIFEST)).code == 0

    done = _rerun_stopped_at("stored", env, e2e_env, "--json")

    assert done.returncode == 130, done.stderr
    body = json.loads(done.stdout)
    (batch_id,) = (
        r[0]
        for r in db_rows(env["WANBATCH_DATABASE_URL"], "SELECT id FROM batches WHERE name = 'night-rerun-1'")
    )
    assert (body["ok"], body["interrupted"], body["batch"]) == (False, True, batch_id)
    assert "`wanbatch run night-rerun-1 --simulate` resumes the new batch" in body["error"]
