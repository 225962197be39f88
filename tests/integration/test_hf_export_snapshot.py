"""An ``hf`` export loads with ``datasets`` at any size, and reads one snapshot of the database.

``datasets.load_dataset("json")`` (and ``"videofolder"``'s metadata) read JSON Lines in chunks of
10 MB and type every column from the first chunk: a large batch's ``metadata.jsonl`` whose later
rows held an ``input`` with other keys (another endpoint), a ``media_mismatch`` or an
``actual_prompt`` where the first chunk had only nulls, a seed above int64 or a timestamp with
microseconds after ones without, failed the whole load. The test loads with a small
``chunksize``: the same code path.

An ``hf`` export of a batch that is still running reads one snapshot.

It streams the rows in one statement and counts what it leaves out (and sums what the batch
was billed) in others. On PostgreSQL each statement of a READ COMMITTED transaction sees what
had committed when it started: a job that finished between the two was in neither (not a row:
still running when the rows were read; not left out: succeeded when they were counted), so the
dataset silently lacked it and the card said the batch had finished. The export now reads one
snapshot (``db.read_scope(snapshot=True)``): here the job finishes right after the rows were
streamed, and the card still counts it as left out (running), as the rows saw it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.models import Job, utcnow
from jobs.settings import get_settings
from jobs.states import JobState
from tests.in_process import run_main
from tests.step_runtime import add_batch

S = JobState


def _video(outputs: Path, name: str) -> dict[str, Any]:
    path = outputs / f"{name}.mp4"
    data = f"video {name}".encode()
    path.write_bytes(data)
    return {
        "output_path": str(path),
        "output_sha256": hashlib.sha256(data).hexdigest(),
        "output_bytes": len(data),
    }


def _walk(engine: Engine, job_id: str, *states: JobState, **fields: Any) -> None:
    """Move the job along ``states`` (committed), ``fields`` written by the last move."""
    with db.session_scope(engine) as session:
        for step, (old, new) in enumerate(itertools.pairwise(states), start=2):
            job = session.get(Job, job_id)
            assert job is not None
            written = fields if step == len(states) else {}
            assert store.transition(
                session, job_id, old, new, reason="test", expected_version=job.version, **written
            )
            session.expire_all()


def _export(engine: Engine, batch: str, folder: Path, outputs: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """``wanbatch export BATCH --format hf -o FOLDER --json`` in process, on ``engine``'s database."""
    for name in ("WANBATCH_DATABASE_URL", "WANBATCH_OUTPUT_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(outputs))
    get_settings.cache_clear()
    db.close_engines()
    try:
        return run_main(["export", batch, "--format", "hf", "-o", str(folder), "--json"], monkeypatch)
    finally:
        get_settings.cache_clear()
        db.close_engines()


#: Seeds reach 2**64 - 1 (fal's uint64); one above int64 comes late in the batch.
_BIG_SEED = 2**64 - 5


def test_a_large_metadata_jsonl_of_varying_rows_loads_with_datasets(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    early = [("fal-ai/wan-22", {"prompt": f"a paper boat {i}", "resolution": "480p"}) for i in range(150)]
    late = [
        ("fal-ai/wan-flf2v", {"prompt": f"day to night {i}", "start_image_url": "a", "end_image_url": "b"})
        for i in range(50)
    ]
    batch = add_batch(engine, "big-mixed", early + late)
    jobs = _jobs(engine, batch)
    whole_second = utcnow().replace(microsecond=0)
    with db.session_scope(engine) as session:
        for n, job in enumerate(jobs):
            fields: dict[str, Any] = {
                **_video(outputs, f"v{n}"),
                "seed": n,
                "media": {"width": 832, "height": 480, "frames": 81, "fps": 16.0, "duration_s": 5.06},
                "submitted_at": whole_second,  # isoformat() without microseconds
            }
            if n >= len(early):  # what the first rows never have
                fields["media_mismatch"] = "frames: 80 instead of 81"
                fields["actual_prompt"] = f"an expanded prompt {n}"
                fields["submitted_at"] = whole_second.replace(microsecond=123456)
            if n == len(jobs) - 1:
                fields["seed"] = _BIG_SEED
            shapes = {"media": fields.pop("media")}
            assert store.transition(
                session, job.id, S.PENDING, S.SUCCEEDED, expected_version=job.version, **fields
            )
            stored = session.get(Job, job.id)
            assert stored is not None
            for name, value in shapes.items():  # a JSON column, set through the ORM
                setattr(stored, name, value)
    folder = tmp_path / "hf"
    assert _export(engine, batch, folder, outputs, monkeypatch) == 0, capsys.readouterr().err

    metadata = folder / "metadata.jsonl"
    chunk = 16 << 10
    assert metadata.stat().st_size > 4 * chunk  # several chunks, as a large batch has at 10 MB
    ds = datasets.load_dataset(
        "json", data_files=str(metadata), split="train", chunksize=chunk, cache_dir=str(tmp_path / "hf-cache")
    )
    assert ds.num_rows == len(jobs)
    assert sorted(ds["job_id"]) == sorted(job.id for job in jobs)
    by_id = {row["job_id"]: row for row in ds}
    last = by_id[jobs[-1].id]
    assert int(last["seed_text"]) == _BIG_SEED
    assert json.loads(last["input"])["end_image_url"] == "b"  # JSON text, read back exactly
    assert last["media_mismatch"] == "frames: 80 instead of 81"
    assert last["actual_prompt"] == f"an expanded prompt {len(jobs) - 1}"
    assert json.loads(last["media"])["width"] == 832
    assert json.loads(by_id[jobs[0].id]["input"]) == {"prompt": "a paper boat 0", "resolution": "480p"}
    assert by_id[jobs[0].id]["media_mismatch"] is None
    # Every row once, in item order but for the few that come first (a value in every column).
    places = [json.loads(line)["item_index"] for line in metadata.read_text().splitlines()]
    leads = [0, len(early), len(jobs) - 1]  # the first row; the first late one; the big seed's
    assert places == leads + [n for n in range(len(jobs)) if n not in leads]


def test_a_job_finishing_while_the_rows_stream_is_counted_as_the_rows_saw_it(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    batch = add_batch(engine, "still-running", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(3)])
    first, second, late = (job.id for job in _jobs(engine, batch))
    for n, job_id in enumerate((first, second)):
        _walk(engine, job_id, S.PENDING, S.SUCCEEDED, **_video(outputs, f"v{n}"))
    _walk(engine, late, S.PENDING, S.SUBMITTING, S.RUNNING)

    streamed = store.jobs_of_batch_bounded
    finished: list[str] = []

    def finishes_after_the_rows(session: Any, batch_id: str, **kwargs: Any) -> Iterator[Job]:
        yield from streamed(session, batch_id, **kwargs)
        if not finished:  # between the rows' statement and the ones that count and sum
            _walk(engine, late, S.RUNNING, S.DOWNLOADING, S.SUCCEEDED, **_video(outputs, "late"))
            finished.append(late)

    monkeypatch.setattr(store, "jobs_of_batch_bounded", finishes_after_the_rows)
    folder = tmp_path / "hf"
    code = _export(engine, batch, folder, outputs, monkeypatch)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert finished == [late]  # the job did finish mid-export

    summary = json.loads(out.out)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert sorted(row["job_id"] for row in rows) == sorted([first, second])
    # Every job of the batch is a row or counted as left out, in the state the rows saw.
    assert (summary["records"], summary["by_status"], summary["not_exported"]) == (
        2,
        {"succeeded": 2},
        {"running": 1},
    )
    assert summary["warnings"][0].startswith("batch still-running has not finished: 1 job(s)")
    card = (folder / "README.md").read_text()
    assert "- not exported (running): 1" in card
    assert "(so far: the batch has not finished)" in card


def _jobs(engine: Engine, batch_id: str) -> list[Job]:
    with db.read_scope(engine) as session:
        return list(store.jobs_of_batch(session, batch_id))
