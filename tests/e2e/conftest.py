"""End-to-end fixtures: the real ``wanbatch`` click group, in process, against the simulator.

Every test gets a clean environment (no stray ``WANBATCH_*`` or ``FAL_KEY``), its own working
folder, output folder and SQLite database, and fresh settings/engine caches, so commands see
exactly the configuration the test sets. The simulator runs once per session (tiny latency,
a generous concurrency limit) and is reset before each test that asks for it, so each test
reads a ledger of its own and can inject faults.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs.db import close_engines
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import EXAMPLES, FAL_KEY, FAST_ENV, MakeManifest, Wb, invoke, write_manifest


def _clear_caches() -> None:
    get_settings.cache_clear()
    close_engines()


@pytest.fixture(autouse=True)
def e2e_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A clean environment, cwd = ``tmp_path/work``, SQLite DB and outputs under ``tmp_path``."""
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


@pytest.fixture
def wb() -> Wb:
    """``wb("status", batch, "--json")`` → :class:`e2e_helpers.Run`."""
    return invoke


@pytest.fixture
def examples_copy(e2e_env: Path) -> Path:
    """A writable copy of ``manifests/examples`` (manifests + images) in the test's folder."""
    dest = e2e_env / "examples"
    shutil.copytree(EXAMPLES, dest)
    return dest


@pytest.fixture
def manifest(e2e_env: Path) -> MakeManifest:
    """``manifest(name, yaml_body)`` → path of a manifest with ``images/`` beside it."""
    return lambda name, body: write_manifest(e2e_env, name, body)
