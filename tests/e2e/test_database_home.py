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
from jobs.db import close_engines
from jobs.redaction import MASK
from tests.e2e.e2e_helpers import EXAMPLES, FAL_KEY, Run, Wb
from tests.in_process import run_main

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
    close_engines()
    yield
    close_engines()


def _cd(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """The next command runs in ``folder``, as a new process would (no engine kept from before:
    the default URL is the same string in every folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)
    close_engines()


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


def test_a_batch_stored_in_another_unicode_spelling_by_an_older_wanbatch_is_refused_too(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None
) -> None:
    """A database not yet upgraded to 0041 holds the name as it was typed: in NFD (``e`` and a
    combining accent, as macOS gives it). The manifest's name is read in NFC, so looking for it
    as given and in NFC missed the batch: a new database was made and every job would have been
    sent again. Stored names are compared in NFC."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "café-run")
    _stored_in_proj(wb, monkeypatch, e2e_env, name="cafe")
    stored = e2e_env / "proj" / DEFAULT
    with sqlite3.connect(stored) as conn:  # as an older wanbatch stored it
        conn.execute("UPDATE batches SET name = ?", (nfd,))
    (e2e_env / "proj" / "cafe.yaml").write_text(MANIFEST.format(name=nfd), encoding="utf-8")
    _cd(monkeypatch, e2e_env)
    done = wb("submit", "proj/cafe.yaml")
    assert done.code == 2, done.stderr
    (line,) = _lines(done)
    assert str(stored) in line
    assert not (e2e_env / ".wanbatch").exists()


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
    close_engines()
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


# --------------------------------------------------------------------------- through a symlink
# Audit: with ``proj/shots`` a symlink to ``real/shots`` (holding m2.yaml, batch m2), ``cd proj && wanbatch
# submit shots/m2.yaml`` made proj/.wanbatch; then ``cd other && wanbatch submit
# ../proj/shots/m2.yaml`` and ``cd proj/shots && wanbatch submit m2.yaml`` each said "new
# database … the default, in the current folder" and stored m2 again (``run`` would have paid
# twice): the look upwards walked the physical folders (real/shots, real, …) only, never proj.


def _cd_logical(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``cd folder`` as a shell does: the kernel follows its symlinks, ``$PWD`` keeps the path typed."""
    _cd(monkeypatch, folder)
    monkeypatch.setenv("PWD", str(folder))


def _linked_shots(work: Path) -> Path:
    """``work/proj/shots`` a symlink to ``work/real/shots``, which holds ``m2.yaml`` (batch m2)."""
    real = work / "real" / "shots"
    real.mkdir(parents=True)
    _project(real, "m2")
    (work / "proj").mkdir()
    (work / "proj" / "shots").symlink_to(real, target_is_directory=True)
    (work / "other").mkdir()
    return work / "proj" / "shots" / "m2.yaml"


def _stored_through_the_link(wb: Wb, monkeypatch: pytest.MonkeyPatch, work: Path) -> Path:
    _linked_shots(work)
    _cd_logical(monkeypatch, work / "proj")
    done = wb("submit", "shots/m2.yaml")
    assert done.code == 0, done.stderr
    assert (work / "proj" / DEFAULT).is_file()
    return work / "proj" / DEFAULT


@pytest.mark.parametrize(
    ("where", "manifest"),
    [
        ("other", "../proj/shots/m2.yaml"),
        ("other", "{work}/proj/shots/m2.yaml"),
        ("proj/shots", "m2.yaml"),
    ],
    ids=["relative-from-a-sibling", "absolute-from-a-sibling", "inside-the-link"],
)
def test_a_batch_stored_above_a_symlinked_folder_is_refused(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None, where: str, manifest: str
) -> None:
    stored = _stored_through_the_link(wb, monkeypatch, e2e_env)
    _cd_logical(monkeypatch, e2e_env / where)
    done = wb("submit", manifest.format(work=e2e_env))
    assert done.code == 2, done.stderr
    (line,) = _lines(done)
    assert "batch 'm2' is stored in" in line
    assert str(stored) in line
    assert f"run from {e2e_env / 'proj'}" in line
    assert not (e2e_env / "other" / ".wanbatch").exists()
    assert not (e2e_env / "real" / "shots" / ".wanbatch").exists()


def test_a_batch_read_inside_a_symlinked_folder_names_the_database_above_the_link(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None
) -> None:
    stored = _stored_through_the_link(wb, monkeypatch, e2e_env)
    _cd_logical(monkeypatch, e2e_env / "proj" / "shots")
    done = wb("status", "m2")
    assert done.code == 2, done.stderr
    (line,) = _lines(done)
    assert f"there is one at {stored}" in line
    listed = wb("status")
    assert listed.code == 0, listed.stderr
    assert str(stored) in listed.stdout


def test_a_stale_pwd_is_not_taken_for_the_current_folder(
    wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, default_db: None
) -> None:
    """``$PWD`` counts only while it names the folder the command runs in (a program may chdir
    without changing it): here it names proj, whose database holds m2, but the command runs in
    an unrelated folder."""
    _stored_through_the_link(wb, monkeypatch, e2e_env)
    _cd(monkeypatch, e2e_env / "elsewhere")
    monkeypatch.setenv("PWD", str(e2e_env / "proj"))
    done = wb("submit", _project(e2e_env / "elsewhere", "m2").name)
    assert done.code == 0, done.stderr
    assert "the default, in the current folder" in done.stderr
    assert (e2e_env / "elsewhere" / DEFAULT).is_file()


# --------------------------------------------------------------------------- FAL_KEY in a path
# Audit: ``mkdir -p "/tmp/x/$FAL_KEY"``, cd there, ``wanbatch submit m.yaml`` printed ``new
# database ./.wanbatch/wanbatch.db (/tmp/x/<the key>/.wanbatch/wanbatch.db): …`` in clear,
# while the refusal and the "no batch" lines masked it.


@pytest.fixture
def key_redaction() -> Iterator[None]:
    """The command's start-up makes FAL_KEY known to every masking (``cli.main``); undone after."""
    yield
    from worker.fal.redact import uninstall_redaction

    uninstall_redaction()


@pytest.mark.parametrize("command", [("submit",), ("run", "--simulate", "--no-progress")], ids=lambda c: c[0])
def test_the_new_database_note_masks_fal_key_in_its_paths(
    e2e_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    default_db: None,
    key_redaction: None,
    command: tuple[str, ...],
) -> None:
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    (e2e_env / f"k-{FAL_KEY}" / DEFAULT).parent.mkdir(parents=True)
    (e2e_env / f"k-{FAL_KEY}" / DEFAULT).write_bytes(b"")  # a database above, named in the note
    folder = e2e_env / f"k-{FAL_KEY}" / f"in-{FAL_KEY}"
    manifest = _project(folder, "keyed")
    _cd(monkeypatch, folder)
    capsys.readouterr()
    assert run_main([*command, manifest.name], monkeypatch) == 0  # as the console script runs
    out, err = capsys.readouterr()
    (note,) = [line for line in err.splitlines() if "new database" in line]
    assert "another database exists at" in note
    assert FAL_KEY not in out + err
    assert f"in-{MASK}" in note
    assert (folder / DEFAULT).is_file()
