"""A command run from a folder deleted under the shell is one ``error:`` line, not an internal error.

Audit: ``mkdir g && cd g && rmdir ../g``, then ``wanbatch status`` (``status --json``, ``submit
/abs/m.yaml``, ``run foo``, ``export foo``) ended with exit 70 ``internal error:
FileNotFoundError … please report it``: the default database, ``./.wanbatch/wanbatch.db``, is
relative to the current folder, and SQLAlchemy makes it absolute (``os.path.abspath``) when the
engine is made. Now that is exit 2 and one line saying what to do; a database URL that does not
depend on the current folder (an absolute SQLite path, PostgreSQL) goes on working.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "name: gone\nendpoint: fal-ai/wan-22\nitems:\n  - {prompt: a kite, seed: 1, resolution: 480p}\n"
GONE = "the current folder no longer exists (deleted?)"


def _in_a_deleted_folder(
    tmp_path: Path, url: str | None, *args: str, outputs: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``mkdir g && cd g && rmdir ../g && python -m cli ARGS`` (the interpreter itself: a
    pyenv shim refuses a deleted current folder before wanbatch starts). The output folder is
    ``outputs`` when given (a relative one is relative to the deleted folder), else absolute."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_") and k != "FAL_KEY"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["WANBATCH_OUTPUT_DIR"] = outputs or str(tmp_path / "outputs")
    env["HOME"] = str(tmp_path)
    env["TMPDIR"] = str(tmp_path)  # a crash report, should there be one, stays here
    if url is not None:
        env["WANBATCH_DATABASE_URL"] = url
    folder = shlex.quote(str(tmp_path / "g"))
    command = shlex.join([sys.executable, "-m", "cli", *args])
    script = f"mkdir {folder} && cd {folder} && rmdir ../g && exec {command}"
    return subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False
    )


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "args",
    [("status",), ("status", "--json"), ("submit", "{manifest}"), ("run", "foo"), ("export", "foo")],
    ids=lambda a: " ".join(a),
)
@pytest.mark.parametrize("url", [None, "sqlite:///.wanbatch/wanbatch.db"], ids=["default", "relative-url"])
def test_the_default_database_from_a_deleted_folder_is_one_line(
    tmp_path: Path, manifest: Path, args: tuple[str, ...], url: str | None
) -> None:
    done = _in_a_deleted_folder(tmp_path, url, *(a.format(manifest=manifest) for a in args))
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {GONE}"), lines[0]
    assert "WANBATCH_DATABASE_URL" in lines[0]
    assert "internal error" not in done.stderr
    assert not list(tmp_path.glob("**/wanbatch.db"))
    if "--json" in args:
        answer = json.loads(done.stdout)
        assert answer["ok"] is False
        assert GONE in answer["error"]


@pytest.fixture(params=["sqlite", "postgresql"])
def absolute_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kept' / 'wanbatch.db'}"
    make: Callable[[], str] = request.getfixturevalue("new_pg_database")
    return make()


def test_a_database_that_does_not_depend_on_the_folder_keeps_working(
    tmp_path: Path, manifest: Path, absolute_url: str
) -> None:
    submitted = _in_a_deleted_folder(tmp_path, absolute_url, "submit", str(manifest))
    assert submitted.returncode == 0, submitted.stderr
    listed = _in_a_deleted_folder(tmp_path, absolute_url, "status", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [b["name"] for b in json.loads(listed.stdout)["batches"]] == ["gone"]
    shown = _in_a_deleted_folder(tmp_path, absolute_url, "export", "gone", "--format", "jsonl")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout.splitlines()[0])["batch_name"] == "gone"
    missing = _in_a_deleted_folder(tmp_path, absolute_url, "run", "foo")
    assert missing.returncode == 2, missing.stderr
    assert "no batch 'foo'" in missing.stderr
    assert GONE not in missing.stderr


def test_doctor_from_a_deleted_folder_says_so_with_its_fix(tmp_path: Path) -> None:
    """``doctor`` went on where the other commands refuse, and said "the check itself failed:
    FileNotFoundError … fix: please report it" of the database and the output storage: now
    each says what the other commands say, and the other checks still run (exit 1, doctor's
    "something to fix")."""
    done = _in_a_deleted_folder(tmp_path, None, "doctor", "--simulate", "--json", outputs="outputs")
    assert done.returncode == 1, done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    database, storage = checks["database"], checks["output storage"]
    assert (database["status"], storage["status"]) == ("fail", "fail"), checks
    assert GONE in database["detail"], database
    assert database["fix"] == "cd to a folder that exists, or set WANBATCH_DATABASE_URL to an absolute path"
    assert GONE in storage["detail"], storage
    assert storage["fix"] == "cd to a folder that exists, or set WANBATCH_OUTPUT_DIR to an absolute path"
    for check in checks.values():
        assert "please report it" not in (check["fix"] or ""), check
        assert "FileNotFoundError" not in check["detail"], check
    assert checks["configuration"]["status"] == "ok"

    kept = _in_a_deleted_folder(
        tmp_path, f"sqlite:///{tmp_path / 'kept.db'}", "doctor", "--simulate", "--json"
    )
    assert kept.returncode == 0, kept.stdout
    assert GONE not in kept.stdout


def test_run_with_a_relative_output_folder_from_a_deleted_folder_is_one_line(
    tmp_path: Path, manifest: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'kept.db'}"
    done = _in_a_deleted_folder(tmp_path, url, "run", "--simulate", str(manifest), outputs="outputs")
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert GONE in lines[0], lines[0]
    assert "set WANBATCH_OUTPUT_DIR to an absolute path" in lines[0], lines[0]
