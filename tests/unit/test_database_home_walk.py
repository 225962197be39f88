"""The look upwards for the default database (:func:`jobs.database_home.database_above`) walks
the folders as the user typed them, through symlinks, as well as the folders they are, and stops
at the home folder however it is reached.

Audit: with ``proj/shots`` a symlink to ``real/shots``, the database in ``proj`` was never found
from ``proj/shots`` or for ``../proj/shots/m2.yaml``: only ``start.resolve()``'s parents were
looked at (``real/shots``, ``real``, …).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import database_home
from jobs.database_home import DEFAULT_DATABASE, database_above, database_above_cwd


def _database(folder: Path) -> Path:
    path = folder / DEFAULT_DATABASE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    return path


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path/home/proj/shots`` → ``tmp_path/home/real/shots``; HOME is ``tmp_path/home``;
    the command runs in ``tmp_path/home/elsewhere``."""
    home = tmp_path / "home"
    (home / "real" / "shots").mkdir(parents=True)
    (home / "proj").mkdir()
    (home / "proj" / "shots").symlink_to(home / "real" / "shots", target_is_directory=True)
    (home / "elsewhere").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "elsewhere")
    monkeypatch.setenv("PWD", str(home / "elsewhere"))
    return home


def test_the_folder_a_symlink_is_in_is_looked_at(tree: Path) -> None:
    stored = _database(tree / "proj")
    assert database_above(tree / "proj" / "shots") == stored
    assert database_above(tree / "elsewhere" / ".." / "proj" / "shots") == stored
    assert database_above(Path("../proj/shots")) == stored  # relative: to $PWD, as the shell means it


def test_the_physical_parents_are_still_looked_at(tree: Path) -> None:
    stored = _database(tree / "real")
    assert database_above(tree / "proj" / "shots") == stored


def test_the_current_folder_through_a_symlink(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = _database(tree / "proj")
    monkeypatch.chdir(tree / "proj" / "shots")
    monkeypatch.setenv("PWD", str(tree / "proj" / "shots"))
    assert database_above_cwd() == stored
    monkeypatch.setenv("PWD", str(tree / "elsewhere"))  # stale: names another folder, not used
    assert database_above_cwd() is None


def test_a_home_reached_through_a_symlink_still_bounds_the_walk(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HOME=…/linkhome, a symlink to …/home: walked as typed, the look stops at linkhome too,
    never reaching the database above the home folder."""
    _database(tmp_path)  # above home: never looked at
    (tmp_path / "linkhome").symlink_to(tree, target_is_directory=True)
    monkeypatch.setenv("HOME", str(tmp_path / "linkhome"))
    assert database_above(tmp_path / "linkhome" / "proj" / "shots") is None
    monkeypatch.setenv("HOME", str(tree))
    assert database_above(tmp_path / "linkhome" / "proj" / "shots") is None
    home_db = _database(tree)  # the home folder itself is looked at
    found = database_above(tmp_path / "linkhome" / "proj" / "shots")
    assert found in {home_db, tmp_path / "linkhome" / DEFAULT_DATABASE}


def test_the_walk_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/nonexistent-home")
    monkeypatch.setattr(database_home, "MAX_LEVELS", 3)
    deep = tmp_path / "a" / "b" / "c" / "d" / "e"
    deep.mkdir(parents=True)
    _database(tmp_path / "a")  # 4 levels above e: out of reach
    monkeypatch.chdir(tmp_path)
    assert database_above(deep) is None
    stored = _database(tmp_path / "a" / "b")  # 3 levels above e
    assert database_above(deep) == stored
