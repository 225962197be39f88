"""A step of an embedded ``run`` that fails unexpectedly (a bug) is one line on the terminal, its
traceback in an owner-only file the line names, as ``internal error`` does for a command: before,
the whole traceback was printed on stderr, under the progress bar, for every job that met it."""

from __future__ import annotations

import io
import json
import logging
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from worker import crash
from worker.embedded import InProcessWorker
from worker.logs import TEXT_FORMAT, JsonFormatter, TextFormatter
from worker.steps.context import StepsEnded


@pytest.fixture
def crash_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temp folder crash files go to, and no file remembered from another test."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(crash, "_written", {})
    return tmp_path


@pytest.fixture
def stderr_of_embedded() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """What ``worker.embedded`` logs, as the text and the JSON format write it."""
    logger = logging.getLogger("worker.embedded")
    text, as_json = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(text), logging.StreamHandler(as_json)]
    handlers[0].setFormatter(TextFormatter(TEXT_FORMAT))
    handlers[1].setFormatter(JsonFormatter())
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield text, as_json
    finally:
        for handler in handlers:
            logger.removeHandler(handler)


def download(_rt: Any, job_id: str) -> str:
    raise ValueError(f"a value no one expected for {job_id}\nsecond line")


def test_a_steps_bug_is_one_line_and_its_traceback_is_in_a_file(
    crash_dir: Path, stderr_of_embedded: tuple[io.StringIO, io.StringIO]
) -> None:
    text, as_json = stderr_of_embedded
    worker = InProcessWorker(1)
    # No step here reads the runtime; the worker counts each step's end on it (run's refresh).
    worker.bind(SimpleNamespace(steps_ended=StepsEnded()))  # type: ignore[arg-type]
    try:
        worker._run(download, "job-1")
        worker._run(download, "job-2")
    finally:
        worker.close()

    (first, second) = text.getvalue().splitlines()  # one line each: no traceback
    (kept,) = crash_dir.glob("wanbatch-crash-*.txt")  # one file for both: the same bug
    assert first == (
        "ERROR worker.embedded: download of job job-1 failed: ValueError: a value no one expected "
        f"for job-1; please report it (details in {kept})"
    )
    assert second.startswith("ERROR worker.embedded: download of job job-2 failed: ValueError:")
    assert "Traceback" not in text.getvalue()
    trace = kept.read_text(encoding="utf-8")
    assert "Traceback" in trace
    assert "ValueError: a value no one expected for job-1" in trace
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    records = [json.loads(line) for line in as_json.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["step.failed", "step.failed"]
    assert "Traceback" in records[0]["exc"]  # the JSON format keeps it, as its one field
