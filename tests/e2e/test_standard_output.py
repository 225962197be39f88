"""A standard output that cannot take what a command prints: closed (``>&-``), full
(``>/dev/full``), or a pipe whose reader went away (``| head``).

Every case runs the installed console script in a subprocess: what happens to fd 1 is only real
there. Closed or full is one ``error: cannot write to standard output: …`` line and exit 2, as
``export`` always said it (never a traceback of ``None.write``, never an "internal error", exit
70); a reader gone is no line at all and exit 141, what a shell reports for a tool SIGPIPE ended
(exit 1 would say jobs failed).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import IO

import pytest

from tests.e2e.e2e_helpers import EXAMPLES, WANBATCH, assert_one_line, wanbatch

QUICKSTART = EXAMPLES / "quickstart.yaml"

#: Commands that print on stdout, one of each kind (a table, prose, a --json object, click's own).
PRINTING = [
    ["status"],
    ["status", "--json"],
    ["status", "quickstart", "--json"],
    ["validate", str(QUICKSTART)],
    ["validate", "--json", str(QUICKSTART)],
    ["estimate", str(QUICKSTART)],
    ["cost", "quickstart", "--json"],
    ["diff", "quickstart", "quickstart"],
    ["diff", "quickstart", "quickstart", "--json"],
    ["doctor", "--simulate", "--json"],
    ["--version"],
]


@pytest.fixture
def submitted() -> None:
    done = wanbatch("submit", QUICKSTART)
    assert done.returncode == 0, done.stderr


def _run(
    args: list[str], stdout: int | IO[str] | None, close_stdout: bool = False
) -> subprocess.CompletedProcess[str]:
    """``wanbatch ARGS`` with ``stdout`` as its standard output, or none (``close_stdout``)."""
    done = subprocess.run(
        [WANBATCH, *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=(lambda: os.close(1)) if close_stdout else None,
    )
    done.stdout = done.stdout or ""  # not captured: nothing to show
    return done


@pytest.mark.usefixtures("submitted")
@pytest.mark.parametrize("args", PRINTING, ids=" ".join)
def test_a_closed_stdout_is_one_line_and_exit_2(args: list[str]) -> None:
    """Was two tracebacks ending in ``'NoneType' object has no attribute 'write'``, exit 1."""
    done = _run(args, None, close_stdout=True)
    assert_one_line(done, "error: cannot write to standard output: Bad file descriptor")


@pytest.mark.usefixtures("submitted")
@pytest.mark.parametrize("args", PRINTING, ids=" ".join)
def test_a_full_stdout_is_one_line_and_exit_2(args: list[str]) -> None:
    """Was ``internal error: OSError: [Errno 28] No space left on device; please report it``, exit 70."""
    with Path("/dev/full").open("w") as full:
        done = _run(args, full)
    line = assert_one_line(done)
    assert line == "error: cannot write to standard output: No space left on device"


@pytest.mark.usefixtures("submitted")
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_an_export_into_a_closed_stdout_is_its_own_line(fmt: str) -> None:
    """Was ``internal error … 'NoneType' object has no attribute 'flush'``, exit 70."""
    done = _run(["export", "quickstart", "--format", fmt], None, close_stdout=True)
    assert_one_line(done, "error: cannot write the export to standard output: Bad file descriptor")


def test_a_command_with_stdout_closed_still_does_its_work() -> None:
    """The batch is stored; only saying so failed."""
    done = _run(["submit", str(QUICKSTART)], None, close_stdout=True)
    assert_one_line(done, "error: cannot write to standard output")
    status = wanbatch("status", "quickstart", "--json")
    assert status.returncode in (0, 1), status.stderr
    assert json.loads(status.stdout)["total"] == 3


def _into_a_pipe_nobody_reads(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``wanbatch ARGS`` writing into a pipe whose read end was closed before it started: its
    first write fails with EPIPE, whenever it comes (no race with a reader closing it)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return _run(args, write)
    finally:
        os.close(write)


@pytest.mark.usefixtures("submitted")
@pytest.mark.parametrize(
    "args",
    [
        ["export", "quickstart"],
        ["export", "quickstart", "--format", "csv"],
        ["export", "quickstart", "--format", "parquet"],
        ["status"],
        ["status", "quickstart", "--json"],
        ["validate", "--json", str(QUICKSTART)],
        ["--help"],
    ],
    ids=" ".join,
)
def test_a_reader_gone_exits_141_quietly(args: list[str]) -> None:
    """Was exit 1, the contract's "some jobs failed or were cancelled"."""
    done = _into_a_pipe_nobody_reads(args)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""  # no "internal error", no "Exception ignored"


def _stderr_into_a_pipe_nobody_reads(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``wanbatch ARGS`` with stdout captured and stderr a pipe whose reader went away before it
    started (``wanbatch … 2>&1 | head -1`` once ``head`` is done, a log shipper that died)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [WANBATCH, *args], stdout=subprocess.PIPE, stderr=write, text=True, timeout=300, check=False
        )
    finally:
        os.close(write)


BAD_MANIFEST = "name: bad\nendpoint: fal-ai/nope\nitems:\n  - prompt: a\n"


def test_a_stderr_reader_gone_keeps_the_exit_code_of_bad_input(tmp_path: Path) -> None:
    """Was exit 1 ("some jobs failed") from rich's broken-pipe handler, for any command whose
    stderr broke: a bad manifest must still be exit 2."""
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(BAD_MANIFEST)
    assert _stderr_into_a_pipe_nobody_reads(["validate", str(manifest)]).returncode == 2


def test_a_stderr_reader_gone_leaves_the_json_object_on_stdout() -> None:
    """rich's handler also pointed *stdout* at /dev/null: the ``--json`` object of a run, whose
    progress goes to stderr, was lost."""
    done = _stderr_into_a_pipe_nobody_reads(["run", str(QUICKSTART), "--simulate", "--json"])
    assert done.returncode == 0
    found = json.loads(done.stdout)
    assert found["phase"] == "done"
    assert found["total"] == found["finished"] == 3


def test_a_run_whose_stderr_reader_went_away_finishes_and_reports_on_stdout() -> None:
    """Progress and logs go nowhere; the batch is processed and the summary printed, exit 0."""
    done = _stderr_into_a_pipe_nobody_reads(["run", str(QUICKSTART), "--simulate"])
    assert done.returncode == 0
    assert "3/3 done" in done.stdout
    status = wanbatch("status", "quickstart", "--json")
    assert json.loads(status.stdout)["phase"] == "done"


def _stderr_into(path: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """``wanbatch ARGS`` with stdout captured and stderr opened on ``path`` (``/dev/full``)."""
    with Path(path).open("w") as err:
        return subprocess.run(
            [WANBATCH, *args], stdout=subprocess.PIPE, stderr=err, text=True, timeout=300, check=False
        )


def test_a_stderr_on_a_full_device_keeps_the_exit_code_and_the_json_object(tmp_path: Path) -> None:
    """rich's handler covered a reader gone (EPIPE) only: ENOSPC (``2>log`` on a full disk) made
    any command an internal error, exit 70, its ``--json`` object saying so."""
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(BAD_MANIFEST)
    assert _stderr_into("/dev/full", ["validate", str(manifest)]).returncode == 2
    done = _stderr_into("/dev/full", ["validate", "--json", str(manifest)])
    assert done.returncode == 2
    assert json.loads(done.stdout)["error"] == "1 error(s); nothing was submitted."


def test_a_run_whose_terminal_went_away_processes_its_batch() -> None:
    """``wanbatch run m.yaml &``, ``disown``, then the terminal closes: writes to it fail with EIO,
    which made the run an internal error (exit 70), its batch left unfinished."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [WANBATCH, "run", str(QUICKSTART), "--simulate"],
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
        start_new_session=True,
    )
    os.close(slave)
    os.close(master)  # the terminal goes away: every later write to it fails with EIO
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "3/3 done" in out
    assert json.loads(wanbatch("status", "quickstart", "--json").stdout)["phase"] == "done"
