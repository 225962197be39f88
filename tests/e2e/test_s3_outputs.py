"""``WANBATCH_OUTPUT_DIR=s3://bucket/prefix`` end to end: embedded ``wanbatch run`` against the
simulator, outputs stored in moto's S3 server (started on a free loopback port by the test).

What must hold, checked against the provider's books (the simulator's ledger) and the bucket
itself rather than against wanbatch's own records: every succeeded job's object is in the bucket
under ``<prefix>/<batch slug>/``, its bytes hash to the SHA-256 the database, the sidecar, the
export and the simulator recorded (and S3's ``ChecksumSHA256`` says the same); the exports
point at those objects; nothing else is in the bucket (no probe, no partial key, no pending
multipart upload) and nothing is left in the staging folder; a storage that refuses uploads
ends each job with a clear reason, keeps the paid video and never submits anything twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import stat
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import Wb, counts, db_rows, export_jsonl
from tests.s3_helpers import SECRET_KEY, MotoS3, S3FaultProxy, aws_env, b64, keys, object_sha256

pytestmark = pytest.mark.s3

BUCKET = "wanbatch-e2e"
PREFIX = "renders/night"
LOCATION = f"s3://{BUCKET}/{PREFIX}"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[MotoS3]:
    """moto on a free port, wanbatch's outputs pointed at ``s3://wanbatch-e2e/renders/night``."""
    with MotoS3() as server:
        aws_env(monkeypatch, server.url)
        monkeypatch.setenv("WANBATCH_OUTPUT_DIR", LOCATION)
        monkeypatch.setenv("WANBATCH_OUTPUT_STAGING_DIR", str(tmp_path / "staging"))
        yield server


def _db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'wanbatch.db'}"


def _jobs(tmp_path: Path) -> list[Any]:
    return db_rows(
        _db(tmp_path),
        "SELECT id, state, output_path, output_sha256, output_bytes, error, error_type, attempts,"
        " download_attempts, request_id FROM jobs ORDER BY item_index",
    )


def _stored_jobs(tmp_path: Path) -> int:
    """Jobs stored in the test's database (0 when the database was never even set up)."""
    tables = db_rows(_db(tmp_path), "SELECT name FROM sqlite_master WHERE type = 'table'")
    return counts(_db(tmp_path))[1] if ("jobs",) in [tuple(t) for t in tables] else 0


def _staged_files(tmp_path: Path) -> list[Path]:
    staging = tmp_path / "staging"
    return sorted(p for p in staging.rglob("*") if p.is_file()) if staging.exists() else []


def test_outputs_land_in_s3_with_their_sha256_and_every_export_points_at_them(
    wb: Wb,
    sim: SimulatorHandle,
    s3: MotoS3,
    examples_copy: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)

    run = wb("run", examples_copy / "quickstart.yaml", "--json", "--no-progress")
    assert run.code == 0, run.stderr
    report = run.json()
    batch = report["batch"]
    assert report["counts"]["succeeded"] == 3

    # The bucket holds one video and one sidecar per job under <prefix>/<batch slug>/, nothing else.
    jobs = _jobs(tmp_path)
    assert len(jobs) == 3
    expected_keys: list[str] = []
    by_uri: dict[str, Any] = {}
    for job in jobs:
        assert job.state == "succeeded"
        assert job.output_path.startswith(f"{LOCATION}/quickstart/")
        key = job.output_path.removeprefix(f"s3://{BUCKET}/")
        assert key.endswith(".mp4")
        expected_keys += [key, key.removesuffix(".mp4") + ".json"]
        by_uri[job.output_path] = job
        # The object's bytes, S3's own checksum and our metadata all say the recorded SHA-256.
        assert object_sha256(client, BUCKET, key) == job.output_sha256
        head = client.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == b64(job.output_sha256)
        assert head["Metadata"]["sha256"] == job.output_sha256
        assert head["ContentLength"] == job.output_bytes
        assert head["ContentType"] == "video/mp4"
        sidecar = json.loads(client.get_object(Bucket=BUCKET, Key=key[:-4] + ".json")["Body"].read())
        assert sidecar["video_path"] == job.output_path
        assert sidecar["video_sha256"] == job.output_sha256
        assert sidecar["job_id"] == job.id
    assert keys(client, BUCKET) == sorted(expected_keys)  # no probe object, no stray key
    assert client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert _staged_files(tmp_path) == []  # every staged copy removed once stored

    # The provider rendered exactly these bytes, once per job.
    ledger = sim.ledger()
    assert ledger["accepted"] == 3
    assert ledger["duplicates"] == []
    rendered = {e["request_id"]: e["output_sha256"] for e in ledger["entries"]}
    assert {j.request_id: j.output_sha256 for j in jobs} == rendered

    # JSONL, CSV and Parquet exports point at the objects.
    records = export_jsonl(wb, batch)
    assert {r["video_path"] for r in records} == set(by_uri)
    for r in records:
        assert r["video_sha256"] == by_uri[r["video_path"]].output_sha256
    rows = list(csv.DictReader(io.StringIO(wb("export", batch, "--format", "csv").stdout)))
    assert {row["video_path"]: row["video_sha256"] for row in rows} == {
        uri: job.output_sha256 for uri, job in by_uri.items()
    }
    import pyarrow.parquet as pq

    parquet = tmp_path / "export.parquet"
    assert wb("export", batch, "--format", "parquet", "-o", parquet).code == 0
    table = pq.read_table(parquet).to_pydict()
    assert dict(zip(table["video_path"], table["video_sha256"], strict=True)) == {
        uri: job.output_sha256 for uri, job in by_uri.items()
    }

    # The Hugging Face export downloads the objects into its folder, checked, each with the
    # mode a plain open() gives (the download's temporary file is mkstemp's 0600).
    dataset = tmp_path / "dataset"
    before = os.umask(0o022)
    try:
        hf = wb("export", batch, "--format", "hf", "-o", dataset)
    finally:
        os.umask(before)
    assert hf.code == 0, hf.stderr
    # Said as --json says it: the videos were downloaded from the bucket (audit: "3 copied").
    assert (
        f"exported 3 record(s) and 3 video(s) (0 hard-linked, 0 copied, 3 downloaded from S3) to {dataset}"
        in (" ".join(hf.stderr.split()))
    )
    meta = [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 3
    for row in meta:
        video = dataset / row["file_name"]
        assert hashlib.sha256(video.read_bytes()).hexdigest() == row["video_sha256"]
        # The copy inside the dataset, not the bucket's object: the dataset stands on its own.
        assert row["video_path"] == row["file_name"]
        assert row["video_sha256"] in {job.output_sha256 for job in by_uri.values()}
        assert stat.S_IMODE(video.stat().st_mode) == 0o644
        assert stat.S_IMODE((dataset / "metadata.jsonl").stat().st_mode) == 0o644

    # The credentials never reach the output, the logs, the database or the exports.
    seen = run.stdout + run.stderr + hf.stderr + caplog.text + (dataset / "metadata.jsonl").read_text()
    seen += repr(db_rows(_db(tmp_path), "SELECT * FROM jobs")) + json.dumps(records)
    assert SECRET_KEY not in seen


def test_run_refuses_to_start_when_the_bucket_does_not_exist(
    wb: Wb, sim: SimulatorHandle, s3: MotoS3, examples_copy: Path, tmp_path: Path
) -> None:
    run = wb("run", examples_copy / "quickstart.yaml", "--no-progress")
    assert run.code == 2
    assert f"WANBATCH_OUTPUT_DIR '{LOCATION}' cannot take the outputs" in run.stderr
    assert f"the bucket '{BUCKET}' does not exist at {s3.url}" in run.stderr
    assert "nothing was sent" in run.stderr
    assert "Traceback" not in run.stderr
    assert SECRET_KEY not in run.stderr
    assert sim.ledger()["accepted"] == 0
    assert _stored_jobs(tmp_path) == 0


def test_a_prefix_too_long_for_the_keys_is_refused_before_anything_is_paid(
    wb: Wb,
    sim: SimulatorHandle,
    s3: MotoS3,
    examples_copy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Audit: ``s3://…/<990 × p>`` passed `doctor` ("✓ output storage … is writable": its probe
    key is short) and `run`, which spent $0.60 before every upload failed with S3's
    KeyTooLongError. Now the configuration is refused: one line naming WANBATCH_OUTPUT_DIR,
    exit 2, nothing sent, nothing stored, nothing put in the bucket."""
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", f"s3://{BUCKET}/{'p' * 990}")
    run = wb("run", examples_copy / "quickstart.yaml", "--no-progress")
    assert run.code == 2
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("error: invalid configuration: WANBATCH_OUTPUT_DIR: the key prefix is 990 bytes")
    assert line.endswith("so the prefix may be at most 798 bytes: shorten it")
    assert sim.ledger()["accepted"] == 0
    assert _stored_jobs(tmp_path) == 0
    doctor = wb("doctor", "--json")
    checks = {c["name"]: c for c in doctor.json()["checks"]}
    assert checks["output storage"]["status"] != "ok"
    assert "WANBATCH_OUTPUT_DIR: the key prefix is 990 bytes" in checks["configuration"]["detail"]
    assert keys(client, BUCKET) == []


def test_doctor_checks_the_bucket_and_creates_no_staging_folder(
    wb: Wb, sim: SimulatorHandle, s3: MotoS3, tmp_path: Path
) -> None:
    """The bucket takes the probe object (removed again), as before; the staging folder not
    there yet is not created (the doctor creates nothing), only found creatable."""
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    staging = (tmp_path / "staging").resolve()
    for form in (("doctor", "--json"), ("doctor", "--simulate", "--json")):
        storage = next(c for c in wb(*form).json()["checks"] if c["name"] == "output storage")
        assert storage == {
            "name": "output storage",
            "status": "ok",
            "detail": f"{LOCATION} is writable; the staging folder {staging}: not created yet: "
            f"the first run creates it ({tmp_path.resolve()} is writable)",
            "fix": None,
        }
        assert not staging.exists()
        assert keys(client, BUCKET) == []
    staging.mkdir()
    storage = next(c for c in wb("doctor", "--json").json()["checks"] if c["name"] == "output storage")
    assert (storage["status"], storage["detail"]) == ("ok", f"{LOCATION} is writable")
    assert list(staging.iterdir()) == []
    assert keys(client, BUCKET) == []


def test_run_refuses_to_start_when_the_storage_is_unreachable(
    wb: Wb, sim: SimulatorHandle, s3: MotoS3, examples_copy: Path
) -> None:
    s3.client().create_bucket(Bucket=BUCKET)
    s3.stop()
    run = wb("run", examples_copy / "quickstart.yaml", "--no-progress")
    assert run.code == 2
    assert f"cannot reach {s3.url}" in run.stderr
    assert "nothing was sent" in run.stderr
    assert sim.ledger()["accepted"] == 0


def test_refused_uploads_pause_the_batch_and_nothing_is_paid_twice(
    wb: Wb,
    sim: SimulatorHandle,
    s3: MotoS3,
    examples_copy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bucket takes the start-up probe, then refuses every upload of the batch's keys. Before,
    the jobs failed ("output not saved") while the batch went on sending; now the batch pauses,
    the videos wait in the staging folder, and running it again once the storage takes them
    uploads them: never a second generation."""
    s3.client().create_bucket(Bucket=BUCKET)
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ATTEMPTS", "2")
    with S3FaultProxy(s3.port) as proxy:
        aws_env(monkeypatch, proxy.url)
        proxy.refuse_puts(f"/{BUCKET}/{PREFIX}/quickstart/")
        run = wb("run", examples_copy / "quickstart.yaml", "--json", "--no-progress")
    assert run.code == 2, run.stderr  # paused (ok false), not "some jobs failed"
    report = run.json()
    assert (report["phase"], report["ok"]) == ("paused", False)
    assert report["error"].startswith("batch quickstart is paused: outputs cannot be stored")
    assert report["counts"]["failed"] == 0
    reason = str(report["pause_reason"])
    assert reason.startswith("outputs cannot be stored: upload to s3://")
    assert f"access denied to bucket '{BUCKET}'" in reason
    assert SECRET_KEY not in reason
    assert "Traceback" not in run.stderr

    jobs = _jobs(tmp_path)
    for job in jobs:
        assert (job.state, job.error, job.attempts) == ("downloading", None, 1)  # submitted once
    # Each video (paid for) waits in the staging folder, intact.
    rendered = {e["request_id"]: e["output_sha256"] for e in sim.ledger()["entries"]}
    staged = _staged_files(tmp_path)
    assert sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in staged) == sorted(
        str(v) for v in rendered.values()
    )
    assert keys(s3.client(), BUCKET) == []  # refused uploads leave nothing behind

    aws_env(monkeypatch, s3.url)  # the storage takes uploads again: run the batch again
    again = wb("run", "quickstart", "--json", "--no-progress")
    assert again.code == 0, again.stderr
    assert again.json()["counts"]["succeeded"] == 3
    for job in _jobs(tmp_path):
        assert job.output_sha256 == rendered[job.request_id]
        assert job.attempts == 1
    assert _staged_files(tmp_path) == []
    # The provider's books: each job submitted and billed once; status says what it cost.
    ledger = sim.ledger()
    assert ledger["accepted"] == 3
    assert ledger["duplicates"] == []
    status = wb("status", report["batch"], "--json").json()
    assert Decimal(ledger["billed_usd"]) == Decimal(str(status["spent_usd"])) > 0


def test_a_refused_upload_is_retried_from_the_staged_copy(
    wb: Wb,
    sim: SimulatorHandle,
    s3: MotoS3,
    examples_copy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first upload of every video, and of every sidecar, is refused: each next try
    uploads the staged copy (and the video again with its sidecar: never one without the other)."""
    caplog.set_level(logging.INFO)
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    with S3FaultProxy(s3.port) as proxy:
        aws_env(monkeypatch, proxy.url)
        proxy.refuse_puts(f"/{BUCKET}/{PREFIX}/quickstart/", first=1)
        run = wb("run", examples_copy / "quickstart.yaml", "--json", "--no-progress")
        refused = list(proxy.rules.refused)
    assert run.code == 0, run.stderr
    assert run.json()["counts"]["succeeded"] == 3

    jobs = _jobs(tmp_path)
    assert len([k for k in refused if k.endswith(".mp4")]) == 3  # each video refused once
    assert len([k for k in refused if k.endswith(".json")]) == 3  # and each sidecar
    for job in jobs:
        assert job.state == "succeeded"
        assert job.download_attempts == 2  # the two refused uploads
        assert job.attempts == 1
        key = job.output_path.removeprefix(f"s3://{BUCKET}/")
        assert object_sha256(client, BUCKET, key) == job.output_sha256
    assert _staged_files(tmp_path) == []
    restaged = [r for r in caplog.records if "uploading the video staged by an earlier try" in r.getMessage()]
    assert {r.getMessage().split(":")[0] for r in restaged} == {f"job {job.id}" for job in jobs}
    ledger = sim.ledger()
    assert ledger["accepted"] == 3
    assert ledger["duplicates"] == []


REUSE = """\
name: {name}
endpoint: fal-ai/wan-i2v
reuse_outputs: true
defaults:
  resolution: 480p
  num_frames: 81
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
    seed: 7
"""


def test_reuse_outputs_takes_the_object_and_sends_again_when_it_is_gone(
    wb: Wb, sim: SimulatorHandle, s3: MotoS3, examples_copy: Path, tmp_path: Path
) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)

    def run(name: str) -> dict[str, Any]:
        manifest = examples_copy / f"{name}.yaml"
        manifest.write_text(REUSE.format(name=name), encoding="utf-8")
        done = wb("run", manifest, "--json", "--no-progress")
        assert done.code == 0, done.stderr
        (record,) = export_jsonl(wb, done.json()["batch"])
        return record

    first = run("first")
    again = run("again")
    assert sim.ledger()["accepted"] == 1  # the twin took the stored object
    assert again["reused_from"] == first["job_id"]
    assert again["video_path"] == first["video_path"]
    assert again["video_path"].startswith(f"{LOCATION}/first/")

    client.delete_object(Bucket=BUCKET, Key=first["video_path"].removeprefix(f"s3://{BUCKET}/"))
    gone = wb("export", "first", "--format", "hf", "-o", tmp_path / "first-dataset")
    assert gone.code == 2  # refused, nothing written
    assert "is missing or unreadable" in gone.stderr
    assert f"cannot download {first['video_path']}: the object does not exist" in gone.stderr
    assert not (tmp_path / "first-dataset").exists()
    third = run("third")
    assert sim.ledger()["accepted"] == 2  # the object is gone: rendered again
    assert third["reused_from"] is None
    assert third["video_path"].startswith(f"{LOCATION}/third/")
