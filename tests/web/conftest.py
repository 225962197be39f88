"""Dashboard test fixtures: a migrated SQLite engine of the test's own (for tests about the web
layer, not the SQL), and an output folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from jobs.db import close_engines, make_engine
from jobs.settings import get_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No stray WANBATCH_* / FAL_KEY / AWS_* from the caller's shell; fresh settings caches."""
    for name in list(os.environ):
        if name.startswith(("WANBATCH_", "AWS_")) or name == "FAL_KEY":
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
    close_engines()


@pytest.fixture
def sqlite_engine(tmp_path: Path, _sqlite_template: Path) -> Iterator[Engine]:
    """A migrated SQLite database of this test's own (a copy of the session's template)."""
    path = tmp_path / "web.db"
    shutil.copyfile(_sqlite_template, path)
    engine = make_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "outputs"
    folder.mkdir()
    return folder
