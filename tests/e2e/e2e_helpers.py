"""Helpers shared by the end-to-end tests: run the CLI in process, read the database, write manifests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text

from cli import cli
from jobs.settings import get_settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "manifests" / "examples"
FAL_KEY = "test-key-e2e-5f0c1d9a"  # distinctive, so a leak is found by a plain substring search

#: The installed console script: what a user runs (``cli.main``, exit codes, one line on stderr).
WANBATCH = str(Path(sys.executable).with_name("wanbatch"))


def wanbatch(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 60, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run the console script with the test's environment (plus ``env``), behind ``prefix``
    (such as :func:`without_read_override`)."""
    return subprocess.run(
        [*prefix, WANBATCH, *map(str, args)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line(done: subprocess.CompletedProcess[str], *phrases: str, code: int = 2) -> str:
    """Exit ``code``, one non-empty stderr line containing every phrase, no traceback."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    assert len(lines) == 1, done.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def without_read_override() -> list[str]:
    """A command prefix under which a mode-000 file or folder is unreadable, as it is to a user.

    Root reads any file (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a test run as root (a
    container, CI) would never see "permission denied": there ``setpriv`` (util-linux) drops
    both capabilities for the command it runs. Anyone else lacks them already: no prefix.
    """
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


# --------------------------------------------------------------------------- wanbatch in a subprocess
# The tests that signal a run, kill its database connections or fill its disk need `wanbatch` as a
# real process (signals, exit codes, stderr), started in the background while the test acts on it.
# These helpers are that, once: each such test file used to carry its own copy.


def wanbatch_command() -> list[str]:
    """The argv that runs ``wanbatch``: the installed console script next to ``sys.executable``,
    else the same entry point (``cli.main``) through this interpreter."""
    if Path(WANBATCH).exists():
        return [WANBATCH]
    return [sys.executable, "-c", "from cli import main; main()"]


class Background:
    """``wanbatch ARGV`` running in the background, its stdout and stderr in the files
    ``NAME.stdout`` and ``NAME.stderr`` under ``cwd`` (a file never fills up and blocks it, as
    an unread pipe would). A subclass overrides :meth:`command` to run the CLI another way."""

    def __init__(self, argv: Sequence[str | Path], env: dict[str, str], cwd: Path, name: str) -> None:
        self.name = name
        self.out = cwd / f"{name}.stdout"
        self.err = cwd / f"{name}.stderr"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.popen = subprocess.Popen(
                [*self.command(), *map(str, argv)], env=env, cwd=cwd, stdout=out, stderr=err
            )

    def command(self) -> list[str]:
        """What runs the CLI (the arguments follow it)."""
        return wanbatch_command()

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait(self, timeout: float = 120) -> int:
        """Its exit code; killed, and the test failed with its stderr, when it does not end in time."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not finish within {timeout}s:\n{self.stderr()}")

    def kill(self) -> None:
        """Kill it if it still runs (for a ``finally``: nothing outlives its test)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


def wait_for(
    what: str, check: Callable[[], bool], proc: Background, timeout: float = 60.0, step: float = 0.05
) -> None:
    """Until ``check()`` holds; fails the test, with ``proc``'s stderr, if ``proc`` exits first or
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc.popen.poll() is not None:
            pytest.fail(f"wanbatch exited {proc.popen.returncode} before {what}:\n{proc.stderr()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{proc.stderr()}")
        time.sleep(step)


def subprocess_env(sim_url: str, database_url: str | None = None, **settings: str) -> dict[str, str]:
    """The environment of a ``wanbatch`` subprocess: this process's, without any ``WANBATCH_*``
    or ``FAL_KEY*`` of its own (``FAL_KEY_ID`` and ``FAL_KEY_SECRET`` make a key too), plus the
    test's database (``database_url``, else the one the ``e2e_env`` fixture set) and outputs,
    the simulator at ``sim_url``, the tests' ``FAL_KEY``, unbuffered output and fast timing.
    ``settings`` are set last, named without their ``WANBATCH_`` prefix:
    ``subprocess_env(url, MAX_OUTSTANDING="3")`` sets ``WANBATCH_MAX_OUTSTANDING=3``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WANBATCH_", "FAL_KEY"))}
    wanbatch_settings = {
        "DATABASE_URL": database_url if database_url is not None else os.environ["WANBATCH_DATABASE_URL"],
        "OUTPUT_DIR": os.environ["WANBATCH_OUTPUT_DIR"],
        "FAL_QUEUE_URL": sim_url,
        "FAL_REST_URL": sim_url,
        "POLL_MIN_INTERVAL": "0.05",
        "POLL_MAX_INTERVAL": "0.2",
        "TICK_INTERVAL": "0.05",
        "SUBMIT_RATE": "200",
        **settings,
    }
    assert not any(k.startswith("WANBATCH_") for k in settings), "name settings without WANBATCH_"
    return {
        **base,
        **{f"WANBATCH_{k}": v for k, v in wanbatch_settings.items()},
        "FAL_KEY": FAL_KEY,
        "PYTHONUNBUFFERED": "1",
    }


#: Timing that keeps a simulated run well under a second per job.
#: Two unseeded image-to-video jobs (fal picks the seeds); ``{name}`` is the batch name. Used by
#: the tests of reruns and diffs, which reproduce outputs from the seeds fal returned.
TWO_JOBS = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  num_frames: 81
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
  - prompt: Night falls over the hills
    image_url: images/night.jpg
"""

FAST_ENV = {
    "WANBATCH_POLL_MIN_INTERVAL": "0.05",
    "WANBATCH_POLL_MAX_INTERVAL": "0.2",
    "WANBATCH_TICK_INTERVAL": "0.05",
    "WANBATCH_RETRY_BASE_DELAY": "0",
    "WANBATCH_SUBMIT_RATE": "200",
    "WANBATCH_MAX_OUTSTANDING": "40",
}


@dataclass
class Run:
    """One CLI invocation's outcome."""

    code: int
    stdout: str
    stderr: str
    result: Result

    def json(self) -> Any:
        """The single JSON object the contract promises on stdout with ``--json``."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected exactly one JSON line on stdout, got:\n{self.stdout}"
        return json.loads(lines[0])


Wb = Callable[..., Run]
MakeManifest = Callable[[str, str], Path]


def invoke(*args: str | Path) -> Run:
    """Run ``wanbatch ARGS`` in process; an unexpected exception fails the test with its trace."""
    get_settings.cache_clear()  # env changes inside a test take effect, as for a new process
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="wanbatch")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        pytest.fail(f"wanbatch {' '.join(map(str, args))} raised:\n{trace}\nstderr:\n{result.stderr}")
    return Run(result.exit_code, result.stdout, result.stderr, result)


def write_manifest(folder: Path, name: str, body: str) -> Path:
    """Write a manifest beside a copy of the example images; returns its path."""
    images = folder / "images"
    if not images.exists():
        shutil.copytree(EXAMPLES / "images", images)
    path = folder / f"{name}.yaml"
    path.write_text(body, encoding="utf-8")
    return path


def db_rows(url: str, sql: str) -> list[Any]:
    """Rows of a query against the database at ``url`` (a separate, short-lived engine)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)))
    finally:
        engine.dispose()


def counts(url: str) -> tuple[int, int]:
    """(batches, jobs) stored at ``url``."""
    return (
        db_rows(url, "SELECT count(*) FROM batches")[0][0],
        db_rows(url, "SELECT count(*) FROM jobs")[0][0],
    )


def processed(wb: Wb, command: str, *args: str | Path) -> dict[str, Any]:
    """``wanbatch COMMAND ARGS --json --no-progress`` (run, rerun) succeeded: its report."""
    done = wb(command, *args, "--json", "--no-progress")
    assert done.code == 0, done.stderr
    report: dict[str, Any] = done.json()
    return report


def export_jsonl(wb: Wb, batch: str) -> list[dict[str, Any]]:
    """The batch's export records."""
    run = wb("export", batch, "--format", "jsonl")
    assert run.code == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
