"""``export`` holds a bounded number of bytes of rows at once, whatever each row's size.

The README promised "constant memory … whatever their size", but the jobs were read 500 at a
time whole (every JSON column: ``input``, ``submitted_input``, ``source_files``, fal's output):
with an inline image as a data URI in each input (rows of 1.36 MB) a 600-job export peaked at
1.4 GB (jsonl) and 1.7 GB (parquet), and rows of several MB would have needed tens of GB. Here
60 jobs carry about 1 MB of input each, sent (so ``submitted_input`` holds it again): the peak
of Python's allocations while each format exports them must stay well under what they add up to.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.settings import get_settings
from jobs.states import JobState
from tests.in_process import run_main
from tests.step_runtime import add_batch

JOBS = 60
#: Bytes of base64 in each job's data URI: about 1 MB of input per job.
URI_CHARS = 1_000_000


def _inputs() -> list[dict[str, str]]:
    """Each job's input: a prompt and an inline image (random, so nothing compresses it away)."""
    raw = URI_CHARS * 3 // 4
    uri = "data:image/png;base64,"
    images = (uri + base64.b64encode(os.urandom(raw)).decode() for _ in range(JOBS))
    return [{"prompt": f"shot {i}", "image_url": image} for i, image in enumerate(images)]


def _big_batch(engine: Engine, outputs: Path) -> tuple[str, int]:
    """A batch of :data:`JOBS` succeeded jobs with about 1 MB of input each; its id and the bytes
    of its inputs as JSON (what the export's ``input`` column adds up to)."""
    inputs = _inputs()
    total = sum(len(json.dumps(given)) for given in inputs)
    batch = add_batch(engine, "big-rows", [("fal-ai/wan-i2v", given) for given in inputs])
    del inputs
    with db.session_scope(engine) as session:
        ids = [(job.id, job.version) for job in store.jobs_of_batch(session, batch)]
    for n, (job_id, version) in enumerate(ids):
        video = outputs / f"{n:03d}.mp4"
        video.write_bytes(b"video %d" % n)
        with db.session_scope(engine) as session:
            job = store.get_job(session, job_id)
            assert store.transition(
                session,
                job_id,
                JobState.PENDING,
                JobState.SUCCEEDED,
                expected_version=version,
                submitted_input=dict(job.input),  # sent: the data URI twice in the row
                output_path=str(video),
                output_sha256=hashlib.sha256(video.read_bytes()).hexdigest(),
                output_bytes=video.stat().st_size,
            )
    return batch, total


def _export_to(engine: Engine, outputs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``export`` reads: ``engine``'s database, videos under ``outputs``."""
    for name in ("WANBATCH_DATABASE_URL", "WANBATCH_OUTPUT_DIR", "FAL_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(outputs))
    get_settings.cache_clear()
    db.close_engines()


def _peak_of_export(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """The export's exit code is 0; returns the peak of Python's allocations while it ran."""
    gc.collect()
    tracemalloc.start()
    try:
        code = run_main(["export", *argv], monkeypatch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        get_settings.cache_clear()
        db.close_engines()
    assert code == 0
    return peak


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "hf"])
def test_export_memory_stays_bounded_in_bytes_with_megabyte_rows(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    batch, total = _big_batch(engine, outputs)
    _export_to(engine, outputs, monkeypatch)
    # A first export (of another, small batch) imports what exporting needs: not counted.
    small = add_batch(engine, "small", [("fal-ai/wan-22", {"prompt": "p"})])
    warm = tmp_path / ("warm" if fmt == "hf" else f"warm.{fmt}")
    run_main(["export", small, "--format", fmt, "-o", str(warm)], monkeypatch)  # hf: refused (none succeeded)

    target = tmp_path / ("hf" if fmt == "hf" else f"export.{fmt}")
    peak = _peak_of_export([batch, "--format", fmt, "-o", str(target)], monkeypatch)

    shown = f"{fmt}: peak {peak / 1e6:.1f} MB of Python allocations for {total / 1e6:.1f} MB of inputs"
    assert peak < total / 3, shown
    # … and every row is there, in order, its data URI whole.
    if fmt == "parquet":
        table = pq.read_table(target, columns=["item_index", "input"])
        assert table.column("item_index").to_pylist() == list(range(JOBS))
        firsts = [json.loads(table.column("input")[0].as_py())]
    elif fmt == "hf":
        firsts = [json.loads(json.loads(line)["input"]) for line in (target / "metadata.jsonl").open()]
        assert len(firsts) == JOBS
    elif fmt == "jsonl":
        firsts = [json.loads(line)["input"] for line in target.open()]
        assert [row["prompt"] for row in firsts] == [f"shot {i}" for i in range(JOBS)]
    else:
        assert sum(1 for _ in target.open()) == JOBS + 1
        firsts = []
    for given in firsts:
        assert len(given["image_url"]) == len("data:image/png;base64,") + URI_CHARS
