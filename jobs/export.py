"""Export a batch as a dataset: one record per job, JSONL or CSV, streamed.

Fields are the contract's (job_id, batch, endpoint, status, input, seed, request_id,
video_path, video_sha256, billing_units, cost_usd, attempts, error) plus a few a dataset
builder wants (item_index, batch_name, actual_prompt, estimates, error_type, timestamps).
``input`` is the exact JSON submitted (image references as sent); for a job never submitted
it is the validated input. Rows stream from the database, so a 100,000-job batch exports in
constant memory.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.orm import Session

from jobs import store
from jobs.models import Batch, Job

FIELDS = (
    "job_id",
    "batch",
    "batch_name",
    "item_index",
    "endpoint",
    "status",
    "input",
    "seed",
    "actual_prompt",
    "request_id",
    "video_path",
    "video_sha256",
    "video_bytes",
    "billing_units",
    "cost_usd",
    "est_billing_units",
    "est_usd",
    "attempts",
    "possible_duplicate_charges",
    "error",
    "error_type",
    "submitted_at",
    "finished_at",
)


def _num(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


def _video_path(job: Job, output_dir: Path) -> str | None:
    if job.output_path is None:
        return None
    path = Path(job.output_path)
    try:
        return str(path.resolve().relative_to(output_dir.resolve()))
    except ValueError:
        return str(path.resolve())


def record(job: Job, batch: Batch, output_dir: Path) -> dict[str, Any]:
    """The export record of one job."""
    return {
        "job_id": job.id,
        "batch": batch.id,
        "batch_name": batch.name,
        "item_index": job.item_index,
        "endpoint": job.endpoint,
        "status": job.state.value,
        "input": job.submitted_input if job.submitted_input is not None else job.input,
        "seed": job.seed,
        "actual_prompt": job.actual_prompt,
        "request_id": job.request_id,
        "video_path": _video_path(job, output_dir),
        "video_sha256": job.output_sha256,
        "video_bytes": job.output_bytes,
        "billing_units": _num(job.actual_billing_units),
        "cost_usd": _num(job.actual_usd),
        "est_billing_units": _num(job.est_billing_units),
        "est_usd": _num(job.est_usd),
        "attempts": job.attempts,
        "possible_duplicate_charges": job.possible_duplicate_charges,
        "error": job.error if job.state.value != "succeeded" else None,
        "error_type": job.error_type if job.state.value != "succeeded" else None,
        "submitted_at": job.submitted_at.isoformat() if job.submitted_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def records(session: Session, batch_ref: str, output_dir: Path) -> Iterator[dict[str, Any]]:
    """Every job of the batch, in item order, as export records."""
    batch = store.get_batch(session, batch_ref)
    for job in store.jobs_of_batch(session, batch.id):
        yield record(job, batch, output_dir)


def write(rows: Iterator[dict[str, Any]], fmt: str, fh: TextIO) -> int:
    """Write ``rows`` as ``jsonl`` or ``csv`` to ``fh``; returns the number of records."""
    count = 0
    if fmt == "jsonl":
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            count += 1
        return count
    writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        flat = {
            k: json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else v for k, v in row.items()
        }
        writer.writerow(flat)
        count += 1
    return count
