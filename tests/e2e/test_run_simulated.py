"""`wanbatch run` end to end, embedded, against the simulator: outputs, records and the ledger agree.

The simulator's ledger is the provider's side of the story (what was accepted and billed), so
these tests check wanbatch's own records against it rather than against themselves. The last
test runs the README's first command exactly as written (`run --simulate`) in an empty folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import EXAMPLES, FAL_KEY, Wb, export_jsonl

CONTRACT_COLUMNS = {
    "job_id",
    "batch",
    "endpoint",
    "status",
    "input",
    "seed",
    "request_id",
    "video_path",
    "video_sha256",
    "billing_units",
    "cost_usd",
    "attempts",
    "error",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _video(record: dict[str, Any], output_dir: Path) -> Path:
    path = Path(record["video_path"])
    return path if path.is_absolute() else output_dir / path


def test_quickstart_runs_embedded_and_every_record_agrees(
    wb: Wb, sim: SimulatorHandle, examples_copy: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "outputs"
    run = wb("run", examples_copy / "quickstart.yaml", "--json", "--no-progress")
    assert run.code == 0, run.stderr
    report = run.json()
    batch = report["batch"]
    assert report["total"] == 3
    assert report["counts"]["succeeded"] == 3

    # Files: one MP4 and one sidecar per job, under OUTPUT_DIR/<batch name>/.
    folder = output_dir / "quickstart"
    videos = sorted(folder.glob("*.mp4"))
    sidecars = sorted(folder.glob("*.json"))
    assert len(videos) == 3
    assert [p.with_suffix(".json") for p in videos] == sidecars
    side = {}
    for video, sidecar_file in zip(videos, sidecars, strict=True):
        assert video.read_bytes()[4:8] == b"ftyp"  # an MP4, not an error page
        sidecar = json.loads(sidecar_file.read_text())
        assert sidecar["video_sha256"] == _sha256(video)
        assert isinstance(sidecar["seed"], int)
        assert sidecar["request_id"]
        assert isinstance(sidecar["input"], dict)
        assert sidecar["input"]["prompt"]
        side[sidecar["job_id"]] = sidecar

    # status and export tell the same story as the files.
    status = wb("status", batch, "--json").json()
    assert status["counts"]["succeeded"] == 3
    assert status["total"] == 3
    records = export_jsonl(wb, batch)
    assert len(records) == 3
    assert {r["job_id"] for r in records} == set(side)
    assert sum(1 for r in records if r["status"] == "succeeded") == status["counts"]["succeeded"]
    for r in records:
        s = side[r["job_id"]]
        assert r["status"] == "succeeded"
        assert r["error"] is None
        assert r["video_sha256"] == s["video_sha256"] == _sha256(_video(r, output_dir))
        assert r["seed"] == s["seed"]
        assert r["request_id"] == s["request_id"]
        assert r["input"] == s["input"]
        assert r["attempts"] == 1
    # The manifest's seeds (42, 7, 3) are what the provider used and returned.
    assert sorted(r["seed"] for r in records) == [3, 7, 42]

    # CSV: parses, has the contract's columns, same jobs.
    csv_run = wb("export", batch, "--format", "csv")
    assert csv_run.code == 0, csv_run.stderr
    rows = list(csv.DictReader(io.StringIO(csv_run.stdout)))
    assert rows
    assert set(rows[0]) >= CONTRACT_COLUMNS
    assert {row["job_id"] for row in rows} == set(side)
    for row in rows:
        assert json.loads(row["input"]) == side[row["job_id"]]["input"]
        assert row["video_sha256"] == side[row["job_id"]]["video_sha256"]

    # The provider's books: exactly one accepted submit per job, nothing paid twice.
    ledger = sim.ledger()
    assert ledger["accepted"] == 3
    assert ledger["duplicates"] == []
    by_request = {e["request_id"]: e for e in ledger["entries"]}
    assert set(by_request) == {r["request_id"] for r in records}
    for r in records:
        entry = by_request[r["request_id"]]
        assert entry["outcome"] == "ok"
        assert entry["seed"] == r["seed"]
        assert entry["endpoint"] == r["endpoint"]
    assert Decimal(ledger["billed_usd"]) == Decimal(str(status["spent_usd"]))


def _all_text_in_database(url: str) -> str:
    engine = create_engine(url)
    try:
        chunks = []
        with engine.connect() as conn:
            for table in inspect(conn).get_table_names():
                for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                    chunks.append(repr(tuple(row)))
        return "\n".join(chunks)
    finally:
        engine.dispose()


def test_fal_key_never_leaks(
    wb: Wb,
    sim: SimulatorHandle,
    examples_copy: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # One request fails (a model error, retried) so that error paths write messages too.
    sim.set_faults(model_error={"next": 1})
    run = wb("run", examples_copy / "quickstart.yaml", "--no-progress")
    assert run.code == 0, run.stderr
    batch = wb("status", "quickstart", "--json").json()["batch"]
    exports = tmp_path / "exports"
    exports.mkdir()
    assert wb("export", batch, "--format", "jsonl", "-o", exports / "q.jsonl").code == 0
    assert wb("export", batch, "--format", "csv", "-o", exports / "q.csv").code == 0
    assert (exports / "q.jsonl").stat().st_size > 0

    # The key really was used (the simulator saw authorised requests), so absence means something.
    assert sim.ledger()["accepted"] >= 4
    assert caplog.records, "nothing was logged at DEBUG: the log check would prove nothing"
    assert FAL_KEY not in run.stdout + run.stderr
    assert FAL_KEY not in caplog.text
    assert FAL_KEY not in _all_text_in_database(f"sqlite:///{tmp_path / 'wanbatch.db'}")
    key = FAL_KEY.encode()
    scanned = 0
    for path in tmp_path.rglob("*"):  # exports, videos, sidecars, the SQLite file and its WAL
        if path.is_file():
            scanned += 1
            assert key not in path.read_bytes(), f"FAL_KEY found in {path}"
    assert scanned >= 8


def test_readme_first_command_with_simulate(wb: Wb, e2e_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`wanbatch run --simulate manifests/examples/quickstart.yaml` with no configuration at all."""
    monkeypatch.delenv("WANBATCH_DATABASE_URL")
    monkeypatch.delenv("WANBATCH_OUTPUT_DIR")
    shutil.copytree(EXAMPLES, e2e_env / "manifests" / "examples")
    run = wb("run", "--simulate", "manifests/examples/quickstart.yaml", "--no-progress")
    assert run.code == 0, run.stdout + run.stderr
    videos = sorted((e2e_env / "outputs" / "quickstart-simulated").glob("*.mp4"))  # never beside fal's
    assert len(videos) == 3
    assert all(v.with_suffix(".json").is_file() for v in videos)
    assert (e2e_env / ".wanbatch").is_dir()
    assert "succeeded" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr
