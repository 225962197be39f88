"""Parquet export row groups are bounded by bytes as well as rows. With rows alone (10,000 a
group), an ``input`` carrying an inline image as a data URI (up to 256 KiB) made the writer hold
gigabytes of Python values before writing its first group; only the boundaries change, never the
file's schema or contents."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from jobs.dataset_export import (
    PARQUET_ROW_GROUP,
    PARQUET_ROW_GROUP_BYTES,
    arrow_schema,
    arrow_value,
    write_parquet_file,
)
from jobs.export import FIELDS

#: Each row's inline image: 1 MiB of base64, so the byte budget is reached long before the rows.
_IMAGE_CHARS = 1024 * 1024


def _rows(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        row: dict[str, Any] = dict.fromkeys(FIELDS)
        image = "data:image/png;base64," + chr(ord("A") + i % 26) * _IMAGE_CHARS
        row.update(
            job_id=f"j{i}",
            batch="b1",
            status="succeeded",
            item_index=i,
            input={"prompt": f"p{i}", "image_url": image},
        )
        yield row


def test_large_rows_are_split_into_row_groups_by_bytes_and_round_trip(tmp_path: Path) -> None:
    n = PARQUET_ROW_GROUP_BYTES // _IMAGE_CHARS + 16
    assert n < PARQUET_ROW_GROUP
    out = tmp_path / "big.parquet"

    assert write_parquet_file(_rows(n), out) == n

    parquet = pq.ParquetFile(out)
    assert parquet.num_row_groups > 1
    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    assert sum(sizes) == n
    assert max(sizes) * _IMAGE_CHARS <= PARQUET_ROW_GROUP_BYTES + _IMAGE_CHARS

    table = parquet.read()
    assert table.schema.equals(arrow_schema(), check_metadata=True)
    for got, row in zip(table.to_pylist(), _rows(n), strict=True):
        assert got == {name: arrow_value(name, row[name]) for name in FIELDS}
        assert json.loads(got["input"]) == row["input"]


def test_small_rows_stay_one_row_group(tmp_path: Path) -> None:
    out = tmp_path / "small.parquet"
    rows = ({**dict.fromkeys(FIELDS), "job_id": f"j{i}", "input": {"prompt": "p"}} for i in range(50))
    assert write_parquet_file(rows, out) == 50
    assert pq.ParquetFile(out).num_row_groups == 1
