"""Without ``WANBATCH_DATABASE_URL`` the database is ``./.wanbatch/wanbatch.db``, in the folder a
command runs in: a command run from another folder must not start a second, empty database
without a word, and send (and pay for) a batch another one holds again.

Audit: ``cd proj && wanbatch run --simulate m.yaml``, then ``cd .. && wanbatch submit
proj/m.yaml`` said "created: 3 job(s), 3 new, 0 already stored" in a new ``./.wanbatch`` — with
``run`` instead, every video rendered and billed a second time. Now, only while the default is in
use and its file does not exist yet, the manifest's folder and its parents are looked at: a
database there that holds the batch is a refusal (one line, exit 2, nothing created); one that
does not is named in the note that says a new database is made, which every first creation says.
The commands that read a batch by name no longer create an empty database to find nothing in it.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from jobs.db import _engine_for
from tests.e2e.e2e_helpers import EXAMPLES, Run, Wb

MANIFEST = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults: {{resolution: 480p}}
items:
  - {{prompt: a boat on a lake, image_url: images/landscape.jpg, seed: 4}}
"""
DEFAULT = Path(".wanbatch") / "wanbatch.db"
SHOWN = "./.wanbatch/wanbatch.db"


@pytest.fixture
def default_db(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ``WANBATCH_DATABASE_URL``: the default database, in the current folder."""
    monkeypatch.delenv("WANBATCH_DATABASE_URL")
    _engine_for.cache_clear()
    yield
    _engine_for.cache_clear()


def _cd(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """The next command runs in ``folder``, as a new process would (no engine kept from before:
    the default URL is the same string in every folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)
    _engine_for.cache_clear()


def _project(folder: Path, name: str) -> Path:
    """``folder/m.yaml`` beside a copy of the example images; its path."""
    if not (folder / "images").exists():
        shutil.copytree(EXAMPLES / "images", folder / "images")
    path = folder / f"{name}.yaml"
    path.write_text(MANIFEST.format(name=name), encoding="utf-8")
    return path


def _lines(run: Run) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.strip()]


def _stored_in_proj(wb: Wb, monkeypatch: pytest.MonkeyPatch, work: Path, name: str = "home") -> Path:
    """``cd work/proj && wanbatch submit NAME.yaml``: the batch in ``work/proj/.wanbatch``; its manifest."""
    manifest = _project(work / "proj", name)
    _cd(monkeypatch, work / "proj")
    done = wb("submit", manifest.name)
    assert done.code == 0, done.stderr
    assert (work / "proj" / DEFAULT).is_file()
    return manifest


def test_the_first_submit_says_it_makes_the_default_database(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None
) -> None:
    manifest = _project(e2e_env / "proj", "home")
    _cd(monkeypatch, e2e_env / "proj")
    first = wb("submit", "--json", manifest.name)
    assert first.code == 0, first.stderr
    assert first.json()["total"] == 1  # stdout: the one JSON object, the note on stderr
    notes = [line for line in _lines(first) if "new database" in line]
    assert len(notes) == 1, first.stderr
    assert SHOWN in notes[0]
    assert (e2e_env / "proj" / DEFAULT).is_file()
    again = wb("submit", manifest.name)
    assert again.code == 0, again.stderr
    assert "new database" not in again.stderr  # said once: when it is made


def test_a_batch_stored_in_a_parent_database_is_refused_from_another_folder(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None
) -> None:
    _stored_in_proj(wb, monkeypatch, e2e_env)
    stored = e2e_env / "proj" / DEFAULT
    _cd(monkeypatch, e2e_env)
    for args in (("submit", "proj/home.yaml"), ("submit", "--json", "proj/home.yaml")):
        done = wb(*args)
        assert done.code == 2, done.stderr
        (line,) = _lines(done)
        assert str(stored) in line
        assert SHOWN in line
        assert str(e2e_env / DEFAULT) in line
        assert "WANBATCH_DATABASE_URL" in line
        assert f"run from {e2e_env / 'proj'}" in line
        assert "Traceback" not in done.stderr
        assert not (e2e_env / ".wanbatch").exists()  # no new database, not even its folder
    assert json.loads(done.stdout)["ok"] is False  # --json: the contract's error object


def test_run_from_another_folder_is_refused_before_anything_is_sent(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None, sim: SimulatorHandle
) -> None:
    _stored_in_proj(wb, monkeypatch, e2e_env)
    _cd(monkeypatch, e2e_env / "elsewhere")
    done = wb("run", "--no-progress", "../proj/home.yaml")
    assert done.code == 2, done.stderr
    (line,) = _lines(done)
    assert str(e2e_env / "proj" / DEFAULT) in line  # the folder as it is, without ".."
    assert not (e2e_env / "elsewhere" / ".wanbatch").exists()
    assert sim.ledger()["accepted"] == 0  # nothing paid for


def test_a_simulation_from_another_folder_goes_on_with_a_note(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None
) -> None:
    _stored_in_proj(wb, monkeypatch, e2e_env)
    _cd(monkeypatch, e2e_env)
    done = wb("run", "--simulate", "--no-progress", "proj/home.yaml")
    assert done.code == 0, done.stderr
    notes = [line for line in _lines(done) if "new database" in line]
    assert len(notes) == 1, done.stderr
    assert str(e2e_env / "proj" / DEFAULT) in notes[0]
    assert "'home'" in notes[0]
    assert (e2e_env / DEFAULT).is_file()


def test_a_parent_database_without_the_batch_is_named_in_the_note(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None
) -> None:
    _stored_in_proj(wb, monkeypatch, e2e_env)
    other = _project(e2e_env / "proj", "other")
    _cd(monkeypatch, e2e_env)
    done = wb("submit", other)
    assert done.code == 0, done.stderr
    notes = [line for line in _lines(done) if "new database" in line]
    assert len(notes) == 1, done.stderr
    assert f"another database exists at {e2e_env / 'proj' / DEFAULT}" in notes[0]
    assert (e2e_env / DEFAULT).is_file()


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a database at all" * 100)


def _old_schema(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE something_else (x INTEGER)")


@pytest.mark.parametrize("make", [_garbage, _old_schema], ids=["not-sqlite", "no-batches-table"])
def test_a_candidate_that_cannot_be_read_is_named_not_a_traceback(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None, make: object
) -> None:
    manifest = _project(e2e_env / "proj", "home")
    candidate = e2e_env / "proj" / DEFAULT
    candidate.parent.mkdir()
    make(candidate)  # type: ignore[operator]
    before = candidate.read_bytes()
    _cd(monkeypatch, e2e_env / "elsewhere")
    done = wb("submit", manifest)
    assert done.code == 0, done.stderr
    assert f"another database exists at {candidate}" in done.stderr
    assert candidate.read_bytes() == before  # looked at, never migrated
    assert sorted(p.name for p in candidate.parent.iterdir()) == ["wanbatch.db"]  # nothing left beside it


def test_a_locked_candidate_is_skipped(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None
) -> None:
    manifest = _stored_in_proj(wb, monkeypatch, e2e_env)
    candidate = e2e_env / "proj" / DEFAULT
    _engine_for.cache_clear()
    holder = sqlite3.connect(candidate, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")  # no reader gets in until it ends
        _cd(monkeypatch, e2e_env / "elsewhere")
        done = wb("submit", manifest)
    finally:
        holder.close()
    assert done.code == 0, done.stderr
    assert f"another database exists at {candidate}" in done.stderr


def test_an_explicit_database_url_is_never_second_guessed(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None
) -> None:
    _stored_in_proj(wb, monkeypatch, e2e_env)
    _cd(monkeypatch, e2e_env)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", "sqlite:///.wanbatch/wanbatch.db")  # afresh, on purpose
    done = wb("submit", "proj/home.yaml")
    assert done.code == 0, done.stderr
    assert "new database" not in done.stderr
    assert (e2e_env / DEFAULT).is_file()


@pytest.mark.parametrize(
    "args",
    [
        ("status", "home"),
        ("cost", "home"),
        ("export", "home", "--format", "jsonl"),
        ("diff", "home", "home"),
        ("pause", "home"),
        ("cancel", "home"),
        ("rerun", "home", "--simulate"),
        ("run", "home"),
    ],
    ids=lambda a: a[0],
)
def test_reading_a_batch_where_there_is_no_database_names_the_file_and_the_parent_one(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None, args: tuple[str, ...]
) -> None:
    _stored_in_proj(wb, monkeypatch, e2e_env)
    _cd(monkeypatch, e2e_env / "proj" / "sub")
    done = wb(*args)
    assert done.code == 2, done.stderr
    (line,) = _lines(done)
    assert "no batch 'home'" in line
    assert SHOWN in line
    assert str(e2e_env / "proj" / "sub") in line
    assert str(e2e_env / "proj" / DEFAULT) in line
    assert not (e2e_env / "proj" / "sub" / ".wanbatch").exists()  # no empty database made


def test_status_where_there_is_no_database_makes_none(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None
) -> None:
    _stored_in_proj(wb, monkeypatch, e2e_env)
    _cd(monkeypatch, e2e_env / "proj" / "sub")
    shown = wb("status")
    assert shown.code == 0, shown.stderr
    assert str(e2e_env / "proj" / DEFAULT) in shown.stdout
    listed = wb("status", "--json")
    assert listed.json() == {"batches": []}
    assert str(e2e_env / "proj" / DEFAULT) in listed.stderr
    assert not (e2e_env / "proj" / "sub" / ".wanbatch").exists()
    # and so a submit from here still finds the batch above, instead of an empty database here
    assert wb("submit", "../home.yaml").code == 2
