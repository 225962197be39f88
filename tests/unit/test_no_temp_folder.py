"""No usable temporary folder (a read-only ``/tmp``, as in ``docker --read-only``).

Before: every ``run`` exited 70 "No usable temporary directory found": the journal of accepted
submissions asked :func:`tempfile.gettempdir` though the SQLite folder is its first choice, and
the in-process simulator made a certificate folder even without TLS.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest

from falsim import running_simulator
from jobs.errors import ConfigError
from worker.steps.unrecorded import journal_folders


@pytest.fixture
def no_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gettempdir finds no usable folder, as where every candidate is read-only or missing."""
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: [str(tmp_path / "gone")])
    with pytest.raises(FileNotFoundError):
        tempfile.gettempdir()


@pytest.mark.usefixtures("no_temp_folder")
def test_journals_go_beside_the_sqlite_database_without_a_temp_folder(tmp_path: Path) -> None:
    folders = journal_folders(f"sqlite:///{tmp_path / 'wanbatch.sqlite'}")
    assert folders[0] == tmp_path
    assert all(folder in (tmp_path, Path("/dev/shm")) for folder in folders)


@pytest.mark.usefixtures("no_temp_folder")
def test_the_simulator_without_tls_needs_no_temp_folder() -> None:
    with running_simulator() as sim:
        answer = httpx.get(f"{sim.url}/no-such-path", timeout=10)
    assert answer.status_code == 401  # it serves (and asks for a key)


@pytest.mark.usefixtures("no_temp_folder")
def test_the_simulator_with_tls_says_it_needs_a_writable_temp_folder() -> None:
    with pytest.raises(ConfigError, match="TMPDIR") as raised, running_simulator(tls=True):
        pass
    assert "\n" not in str(raised.value)
