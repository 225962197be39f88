"""The outputs folder is a second record of what was paid for: a sidecar (``NAME.json`` beside
``NAME.mp4``) and its verified video prove that a job was rendered and billed.

The audit: restoring a database backup taken before jobs were paid (``sqlite3 .backup``,
``pg_dump``) and running again sent and billed every one of them again, and the new downloads
replaced the paid videos (and sidecars) already on disk; two copies of one project running at
once into one output folder overwrote each other's videos, so each database recorded SHA-256s
and request ids of files no longer there. Now a job whose own sidecar and video are on disk is
adopted (never sent), and a paid video of another request is never replaced: the new one is
stored beside it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from falsim.server import SimulatorHandle
from jobs.db import close_engines
from tests.conftest import _admin_execute
from tests.e2e.e2e_helpers import (
    Background,
    MakeManifest,
    Wb,
    db_rows,
    processed,
    subprocess_env,
    write_manifest,
)

# Pinned and unpinned seeds, text and image endpoints: the audit's manifest.
FIVE_JOBS = """\
name: {name}
endpoint: fal-ai/wan-22
defaults:
  resolution: 480p
items:
  - prompt: A paper boat drifting down a rainy street
    seed: 7
  - prompt: A fox running through snow
    seed: 8
  - prompt: A lighthouse at dusk, waves crashing
  - prompt: A city street at night in the rain
  - endpoint: fal-ai/wan-i2v
    prompt: Clouds drifting past a mountain
    image_url: images/landscape.jpg
    seed: 42
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, str]:
    """Every file of ``folder`` (recursively) → its SHA-256."""
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _jobs(url: str) -> list[Any]:
    return db_rows(url, "SELECT id, state, request_id, output_path, output_sha256, actual_usd FROM jobs")


def _consistent(url: str) -> None:
    """Every succeeded job's recorded video is on disk with the recorded SHA-256, and the sidecar
    beside it names the job's own request."""
    for job in _jobs(url):
        assert job.state == "succeeded", job
        video = Path(job.output_path)
        assert _sha(video) == job.output_sha256, f"{video} is not the video the database records"
        sidecar = json.loads(video.with_suffix(".json").read_text())
        assert (sidecar["job_id"], sidecar["request_id"]) == (job.id, job.request_id), video


class _Restorable:
    """The test's database, backed up and restored the way the README says (SQLite: the online
    backup API, as ``sqlite3 .backup``; PostgreSQL: a copy of the database, as ``pg_dump`` and
    ``pg_restore`` into a new one)."""

    def __init__(self, kind: str, tmp_path: Path, new_pg: Callable[[], str], monkeypatch: pytest.MonkeyPatch):
        self.kind = kind
        self.monkeypatch = monkeypatch
        if kind == "sqlite":
            self.file = tmp_path / "wanbatch.db"
            self.url = f"sqlite:///{self.file}"
        else:
            self.url = new_pg()
            self.backup_url = new_pg()  # made again from the first as a template (dropped at the end)
        monkeypatch.setenv("WANBATCH_DATABASE_URL", self.url)

    def back_up(self) -> None:
        close_engines()
        if self.kind == "sqlite":
            live, copy = sqlite3.connect(self.file), sqlite3.connect(self.file.with_suffix(".backup"))
            with copy:
                live.backup(copy)
            live.close()
            copy.close()
            return
        name, template = self.backup_url.rsplit("/", 1)[1], self.url.rsplit("/", 1)[1]
        _admin_execute(f'DROP DATABASE "{name}"')
        _admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')

    def restore(self) -> str:
        close_engines()
        if self.kind == "sqlite":
            for extra in ("-wal", "-shm"):
                Path(f"{self.file}{extra}").unlink(missing_ok=True)
            shutil.copyfile(self.file.with_suffix(".backup"), self.file)
            return self.url
        self.monkeypatch.setenv("WANBATCH_DATABASE_URL", self.backup_url)
        return self.backup_url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def restorable(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    new_pg_database: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
) -> _Restorable:
    return _Restorable(request.param, tmp_path, new_pg_database, monkeypatch)


@pytest.mark.slow
def test_a_restored_backup_adopts_what_the_outputs_folder_proves_paid(
    wb: Wb,
    sim: SimulatorHandle,
    manifest: MakeManifest,
    restorable: _Restorable,
    e2e_env: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = manifest("restored", FIVE_JOBS.format(name="restored"))
    assert wb("submit", path).code == 0
    restorable.back_up()  # every job pending in the backup
    first = processed(wb, "run", path)
    assert first["counts"]["succeeded"] == 5
    assert sim.ledger()["billed_count"] == 5
    outputs = e2e_env.parent / "outputs"
    before = _files(outputs)
    paid = {job.id: job for job in _jobs(restorable.url)}

    url = restorable.restore()
    assert {job.state for job in _jobs(url)} == {"pending"}
    again = wb("run", path, "--json", "--no-progress")

    assert again.code == 0, again.stderr
    assert sim.ledger()["billed_count"] == 5  # nothing sent, nothing billed again
    report = again.json()
    assert report["counts"]["succeeded"] == 5
    assert report["adopted_from_outputs"] == 5
    assert report["spent_usd"] == first["spent_usd"]  # fal billed them: counted as spent
    assert report["adopted_note"].startswith("5 job(s) adopted from outputs on disk")
    assert "job(s) adopted from outputs on disk" in caplog.text  # the run's log says it once
    assert _files(outputs) == before  # no file replaced, none added
    for job in _jobs(url):  # the request, video and cost the sidecars record
        was = paid[job.id]
        assert (job.request_id, job.output_path, job.output_sha256) == (
            was.request_id,
            was.output_path,
            was.output_sha256,
        )
        assert float(job.actual_usd) == float(was.actual_usd)
    _consistent(url)
    status = wb("status", "restored")
    assert "5 job(s) adopted from outputs on disk" in " ".join(status.stdout.split())


@pytest.mark.slow
def test_a_sidecar_whose_video_changed_adopts_nothing_and_the_paid_pair_stays(
    wb: Wb,
    sim: SimulatorHandle,
    manifest: MakeManifest,
    restorable: _Restorable,
    e2e_env: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = manifest("changed", FIVE_JOBS.format(name="changed"))
    assert wb("submit", path).code == 0
    restorable.back_up()
    processed(wb, "run", path)
    outputs = e2e_env.parent / "outputs" / "changed"
    videos = sorted(outputs.glob("*.mp4"))
    changed, gone = videos[0], videos[1]
    changed.write_bytes(changed.read_bytes()[:-1] + b"\0")  # same size, other bytes
    gone.unlink()
    kept = _files(outputs)

    url = restorable.restore()
    again = wb("run", path, "--json", "--no-progress")

    assert again.code == 0, again.stderr
    assert sim.ledger()["billed_count"] == 7  # the two that are not proven are rendered again
    assert again.json()["adopted_from_outputs"] == 3
    words = " ".join(caplog.text.split())
    assert "not adopted, sent again" in words
    after = _files(outputs)
    for name, digest in kept.items():  # nothing that was there is replaced or removed
        assert after[name] == digest, name
    # the changed video's new render is stored beside the pair its sidecar describes
    beside = [name for name in after if name not in kept and name.startswith(changed.stem + ".")]
    assert len(beside) == 2, after  # its video and sidecar, named after the new request
    assert "not overwritten" in words
    _consistent(url)


@pytest.mark.slow
def test_two_copies_at_once_into_one_folder_never_overwrite_each_other(
    sim: SimulatorHandle, e2e_env: Path
) -> None:
    a = e2e_env / "a"
    a.mkdir()
    path = write_manifest(a, "two", FIVE_JOBS.format(name="two"))
    url_a = f"sqlite:///{a / 'wanbatch.db'}"
    url_b = f"sqlite:///{e2e_env / 'b' / 'wanbatch.db'}"
    # Both copies send every job before either has stored a video: each pays (no database can
    # know of the other's requests); what is stored must not mix.
    sim.update_options(latency_seconds=4.0)
    try:
        submitted = Background(["submit", path], subprocess_env(sim.url, url_a), a, "submit")
        assert submitted.wait() == 0, submitted.stderr()
        shutil.copytree(a, e2e_env / "b")  # the user copies the project
        runs = [
            Background(["run", "two.yaml", "--no-progress"], subprocess_env(sim.url, url), copy, "run")
            for copy, url in ((a, url_a), (e2e_env / "b", url_b))
        ]
        for run in runs:
            assert run.wait() == 0, run.stderr()
    finally:
        sim.update_options(latency_seconds=0.05)
    assert sim.ledger()["billed_count"] == 10
    _consistent(url_a)
    _consistent(url_b)
    logs = " ".join((runs[0].stderr() + runs[1].stderr()).split())
    assert "another copy of this database, or a newer backup, already stored it" in logs
    files = list((e2e_env.parent / "outputs" / "two").iterdir())
    assert len(files) == 20  # five pairs each, none replaced
