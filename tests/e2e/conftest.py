"""End-to-end fixtures: the real ``wanbatch`` click group, in process, against the simulator.

Every test gets a clean environment (no stray ``WANBATCH_*`` or ``FAL_KEY``), its own working
folder, output folder and SQLite database, and fresh settings/engine caches, so commands see
exactly the configuration the test sets. The simulator runs once per session (tiny latency,
a generous concurrency limit) and is reset before each test that asks for it, so each test
reads a ledger of its own and can inject faults.
"""

from __future__ import annotations

import json
import os
import shutil
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text

from jobs.batches import _engine_for
from jobs.settings import get_settings
from worker.cli import cli
from worker.simulator.options import SimulatorOptions
from worker.simulator.server import SimulatorHandle, running_simulator

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "manifests" / "examples"
FAL_KEY = "test-key-e2e-5f0c1d9a"  # distinctive, so a leak is found by a plain substring search

#: Timing that keeps a simulated run well under a second per job.
FAST_ENV = {
    "WANBATCH_POLL_MIN_INTERVAL": "0.05",
    "WANBATCH_POLL_MAX_INTERVAL": "0.2",
    "WANBATCH_TICK_INTERVAL": "0.05",
    "WANBATCH_RETRY_BASE_DELAY": "0",
    "WANBATCH_SUBMIT_RATE": "200",
    "WANBATCH_MAX_OUTSTANDING": "40",
}


def _clear_caches() -> None:
    get_settings.cache_clear()
    _engine_for.cache_clear()


@pytest.fixture(autouse=True)
def e2e_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A clean environment, cwd = ``tmp_path/work``, SQLite DB and outputs under it."""
    for name in list(os.environ):
        if name.startswith("WANBATCH_") or name == "FAL_KEY":
            monkeypatch.delenv(name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'wanbatch.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    _clear_caches()
    yield work
    _clear_caches()


@pytest.fixture(scope="session")
def _session_sim() -> Iterator[SimulatorHandle]:
    with running_simulator(
        SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0, concurrency_limit=40, rng_seed=1234)
    ) as sim:
        yield sim


@pytest.fixture
def sim(_session_sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch) -> SimulatorHandle:
    """The session's simulator, reset (fresh ledger, no faults), with wanbatch pointed at it."""
    _session_sim.reset()
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", _session_sim.url)
    monkeypatch.setenv("WANBATCH_FAL_REST_URL", _session_sim.url)
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    return _session_sim


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


def invoke(*args: str | Path) -> Run:
    """Run ``wanbatch ARGS`` in process; an unexpected exception fails the test with its trace."""
    get_settings.cache_clear()  # env changes inside a test take effect, as for a new process
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="wanbatch")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        pytest.fail(f"wanbatch {' '.join(map(str, args))} raised:\n{trace}\nstderr:\n{result.stderr}")
    return Run(result.exit_code, result.stdout, result.stderr, result)


@pytest.fixture
def wb() -> Callable[..., Run]:
    """``wb("status", batch, "--json")`` → :class:`Run`."""
    return invoke


@pytest.fixture
def examples_copy(e2e_env: Path) -> Path:
    """A writable copy of ``manifests/examples`` (manifests + images) in the test's folder."""
    dest = e2e_env / "examples"
    shutil.copytree(EXAMPLES, dest)
    return dest


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


def export_jsonl(wb: Callable[..., Run], batch: str) -> list[dict[str, Any]]:
    """The batch's export records."""
    run = wb("export", batch, "--format", "jsonl")
    assert run.code == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines() if line.strip()]


MakeManifest = Callable[[str, str], Path]


@pytest.fixture
def manifest(e2e_env: Path) -> MakeManifest:
    """``manifest(name, yaml_body)`` → path of a manifest with ``images/`` beside it."""
    return lambda name, body: write_manifest(e2e_env, name, body)
