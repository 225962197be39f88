"""``export`` of a batch that does not exist writes nothing anywhere: not a CSV header, not an
empty Parquet file, not a file at ``-o`` — only the one ``error:`` line (exit 2).

The records were a generator that looked the batch up when the first one was read, after the
CSV writer had written its header and the Parquet writer its schema: ``export NOPE --format csv
> ds.csv`` left a header-only file that looks like a real, empty dataset (audit s25, finding 3).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.e2e_helpers import Wb

NO_BATCH = "error: no batch 'no-such-batch'"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_an_unknown_batch_writes_nothing_to_stdout(wb: Wb, fmt: str) -> None:
    done = wb("export", "no-such-batch", "--format", fmt)
    assert done.code == 2
    assert done.result.stdout_bytes == b""
    assert done.stderr.startswith(NO_BATCH)
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "hf"])
def test_an_unknown_batch_leaves_no_file_at_the_output(wb: Wb, tmp_path: Path, fmt: str) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    target = folder / f"ds.{fmt}"
    done = wb("export", "no-such-batch", "--format", fmt, "-o", target)
    assert done.code == 2
    assert done.stderr.startswith(NO_BATCH)
    assert list(folder.iterdir()) == []  # neither the file nor a temporary one beside it


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_unknown_batch_sends_nothing_into_a_named_pipe(wb: Wb, tmp_path: Path, fmt: str) -> None:
    fifo = tmp_path / "records"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a loader waiting on the pipe
    try:
        done = wb("export", "no-such-batch", "--format", fmt, "-o", fifo)
        assert done.code == 2
        assert done.stderr.startswith(NO_BATCH)
        assert os.read(reader, 1 << 16) == b""  # a Parquet schema and footer used to arrive
    finally:
        os.close(reader)
