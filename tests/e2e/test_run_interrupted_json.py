"""Ctrl-C while `wanbatch run --json` has stored its batch and not begun processing it: the JSON
names the stored batch, as `rerun --json` does (:mod:`tests.e2e.test_rerun_interrupted`).

The bug: a signal between the batch's commit and the start of its processing carried no batch,
and ``run`` gave ``_processing`` no way to say which it had stored, so the object said
``"batch": null`` while the database held the batch with its pending jobs; a script reading the
id to resume or cancel it had nothing to go on.

The signal is sent by the `wanbatch` process to itself right after the batch was stored (a hook
installed before the CLI runs): a real SIGINT, or SIGTERM, through the real handlers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.e2e_helpers import MakeManifest, db_rows, subprocess_env

#: Runs the CLI after making its budget note (said once the batch is stored, before its
#: processing) send the signal named by ``WANBATCH_TEST_SIGNAL`` to this process.
HOOKED = """
import os, signal, sys
sys.argv[0] = "wanbatch"
sent = getattr(signal, os.environ.pop("WANBATCH_TEST_SIGNAL"))
if os.environ.pop("WANBATCH_TEST_AT", "stored") == "storing":
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "before_cursor_execute")
    def _insert(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
            os.kill(os.getpid(), sent)
else:
    import cli.batch_commands as commands

    said = commands.print_budget_note

    def _stored(result):
        said(result)
        os.kill(os.getpid(), sent)

    commands.print_budget_note = _stored
from cli import main
main()
"""

MANIFEST = "name: night\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: one\n  - prompt: two\n"


def _run_stopped(env: dict[str, str], cwd: Path, path: Path) -> dict[str, object]:
    """`run --simulate --json` of ``path``, stopped by the hook: its JSON object."""
    done = subprocess.run(
        [sys.executable, "-c", HOOKED, "run", "--simulate", "--json", "--no-progress", str(path)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 130, (done.returncode, done.stderr)
    body: dict[str, object] = json.loads(done.stdout)
    return body


@pytest.mark.parametrize("sent", ["SIGINT", "SIGTERM"])
def test_an_interrupted_run_json_names_the_stored_batch(
    sent: str, manifest: MakeManifest, e2e_env: Path
) -> None:
    env = {**subprocess_env("http://127.0.0.1:9"), "WANBATCH_TEST_SIGNAL": sent}

    body = _run_stopped(env, e2e_env, manifest("night", MANIFEST))

    (stored,) = db_rows(env["WANBATCH_DATABASE_URL"], "SELECT id FROM batches")
    pending = db_rows(env["WANBATCH_DATABASE_URL"], "SELECT count(*) FROM jobs WHERE state = 'pending'")
    assert pending[0][0] == 2  # stored, nothing processed
    assert (body["ok"], body["interrupted"], body["batch"]) == (False, True, stored[0])
    assert "run the same command again to resume" in str(body["error"])


def test_a_run_interrupted_while_storing_names_no_batch(manifest: MakeManifest, e2e_env: Path) -> None:
    """The batch's transaction was rolled back: the batch it had named is not in the database,
    and the object names none."""
    env = {
        **subprocess_env("http://127.0.0.1:9"),
        "WANBATCH_TEST_SIGNAL": "SIGINT",
        "WANBATCH_TEST_AT": "storing",
    }

    body = _run_stopped(env, e2e_env, manifest("night", MANIFEST))

    assert db_rows(env["WANBATCH_DATABASE_URL"], "SELECT id FROM batches") == []
    assert (body["ok"], body["interrupted"], body["batch"]) == (False, True, None)
