"""The pass that stores a validated manifest's jobs reads its ``items_from`` file again, and must
find the very bytes validation read (:meth:`jobs.manifest.expand.Manifest.refuse_changed_items`).

Audit: rows appended or rewritten between the validating read and the storing one were stored
and sent unchecked. The storing pass now hashes what it reads and raises
:class:`~jobs.errors.ItemsFileChanged` (one line; the caller's transaction stores nothing) on any
difference: found at once by the size, else once read, else where a row it read broke something.
Pricing, which such a row reached unvalidated, says an unpriced value in one line too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path

import pytest

from jobs import batches
from jobs.errors import ItemsFileChanged, UnpricedError, UsageError
from jobs.manifest import JobSpec, validate_manifest
from jobs.manifest.expand import Manifest
from jobs.pricing import estimate_job
from jobs.settings import Settings

ROWS = [{"prompt": f"row {i}", "seed": i} for i in range(6)]
AGAIN = "; nothing was submitted: run it again once the file is written"


def _jsonl(rows: Sequence[Mapping[str, object]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _validated(folder: Path, data: str, name: str = "rows.jsonl") -> tuple[Manifest, Path]:
    rows = folder / name
    rows.write_text(data, encoding="utf-8")
    path = folder / "m.yaml"
    path.write_text(f"name: rows\nendpoint: fal-ai/wan-22\nitems_from: {name}\n", encoding="utf-8")
    report = validate_manifest(path)
    assert report.ok, [str(i) for i in report.issues]
    assert report.manifest is not None
    assert report.manifest.validated
    return report.manifest, rows


def _same_size(text: str, old: str, new: str) -> str:
    assert len(old) == len(new)
    changed = text.replace(old, new, 1)
    assert changed != text
    return changed


def test_validation_records_the_hash_of_every_byte_it_read(tmp_path: Path) -> None:
    data = _jsonl(ROWS)
    manifest, rows = _validated(tmp_path, data)
    read = manifest.items_read
    assert read is not None
    assert read.complete
    assert (read.length, read.sha256) == (len(data), hashlib.sha256(data.encode()).hexdigest())
    assert (read.device, read.inode) == (rows.stat().st_dev, rows.stat().st_ino)
    assert [job.input["prompt"] for job in manifest.jobs()] == [row["prompt"] for row in ROWS]


def test_rows_appended_between_the_passes_are_refused_before_one_is_read(tmp_path: Path) -> None:
    manifest, rows = _validated(tmp_path, _jsonl(ROWS))
    with rows.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"prompt": "never validated", "num_frames": 9999, "bogus_field": True}) + "\n")
    jobs = manifest.jobs()
    with pytest.raises(ItemsFileChanged) as raised:
        next(jobs)  # the size tells at once: not one row priced or stored
    size = len(_jsonl(ROWS))
    assert str(raised.value) == (
        f"rows.jsonl changed while submit ran ({size:,} bytes when validated, {rows.stat().st_size:,} now)"
        + AGAIN
    )
    assert isinstance(raised.value, UsageError)
    assert raised.value.exit_code == 2


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_row_rewritten_at_the_same_size_is_refused_once_read(tmp_path: Path, kind: str) -> None:
    data = _jsonl(ROWS) if kind == "jsonl" else "prompt,seed\n" + "".join(f"row {i},{i}\n" for i in range(6))
    manifest, rows = _validated(tmp_path, data, f"rows.{kind}")
    stat = rows.stat()
    rows.write_text(_same_size(data, "row 3", "row 9"), encoding="utf-8")
    os.utime(rows, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # its time as it was: the bytes tell
    with pytest.raises(ItemsFileChanged, match=r"\(its bytes differ from those validated\)"):
        list(manifest.jobs())


def test_a_file_written_while_the_storing_pass_reads_it_is_refused(tmp_path: Path) -> None:
    """After the storing pass opened the file (its size still the one validated) and read its
    first rows: the end of the pass compares the whole."""
    rows_data = [{"prompt": f"row {i} " + "x" * 9000} for i in range(4)]  # past one read's buffer
    data = _jsonl(rows_data)
    manifest, rows = _validated(tmp_path, data)
    jobs = manifest.jobs()
    first = next(jobs)
    assert first.input["prompt"].startswith("row 0")
    with rows.open("r+b") as fh:  # the last row rewritten in place, the size unchanged
        fh.seek(len(data) - 20)
        fh.write(b"y" * 10)
    with pytest.raises(ItemsFileChanged, match=r"\(its bytes differ from those validated\)"):
        list(jobs)


def test_what_a_changed_row_broke_is_said_as_the_change(tmp_path: Path) -> None:
    """Refused where its caller saw a row fail (here pricing, which the storing pass's rows reach
    unvalidated): the rest of the file is read through the same open file and compared."""
    long_rows = [{"prompt": f"a lighthouse at dusk, take {i}", "seed": i} for i in range(6)]
    data = _jsonl(long_rows)
    manifest, rows = _validated(tmp_path, data)
    wide = json.dumps({"prompt": "", "resolution": "1080p"})
    line = json.dumps(long_rows[0])
    assert len(line) > len(wide)
    wide = wide.replace('""', '"' + "w" * (len(line) - len(wide)) + '"')
    rows.write_text(data.replace(line, wide, 1), encoding="utf-8")
    jobs = manifest.jobs()
    job = next(jobs)
    with pytest.raises(UnpricedError, match=r"no price for resolution='1080p'"):
        estimate_job(job.endpoint, job.input)
    with pytest.raises(ItemsFileChanged, match=r"\(its bytes differ from those validated\)"):
        manifest.refuse_changed_items()


def test_the_same_bytes_under_another_file_are_taken(tmp_path: Path) -> None:
    """An editor's save (written aside, renamed over it) of the same rows is no change."""
    data = _jsonl(ROWS)
    manifest, rows = _validated(tmp_path, data)
    aside = tmp_path / "rows.jsonl.tmp"
    aside.write_text(data, encoding="utf-8")
    aside.replace(rows)
    assert len(list(manifest.jobs())) == len(ROWS)
    manifest.refuse_changed_items()  # nothing to say


def test_another_file_of_other_bytes_is_named_so(tmp_path: Path) -> None:
    data = _jsonl(ROWS)
    manifest, rows = _validated(tmp_path, data)
    aside = tmp_path / "rows.jsonl.tmp"
    aside.write_text(_same_size(data, "row 1", "row 7"), encoding="utf-8")
    aside.replace(rows)
    with pytest.raises(ItemsFileChanged, match=r"\(another file now has its name\)"):
        list(manifest.jobs())


@pytest.mark.parametrize("now", ["gone", "folder"])
def test_a_file_gone_since_validation_is_refused_not_skipped(tmp_path: Path, now: str) -> None:
    """Its rows would silently not be stored (a folder was skipped): the batch without them."""
    manifest, rows = _validated(tmp_path, _jsonl(ROWS))
    rows.unlink()
    if now == "folder":
        rows.mkdir()
    with pytest.raises(ItemsFileChanged) as raised:
        list(manifest.jobs())
    why = "it cannot be read now: not found" if now == "gone" else "it is a folder now"
    assert str(raised.value) == f"rows.jsonl changed while submit ran ({why})" + AGAIN


def test_an_unvalidated_pass_only_records(tmp_path: Path) -> None:
    """Before validation there is nothing to compare with: a pass records what it read."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(_jsonl(ROWS), encoding="utf-8")
    path = tmp_path / "m.yaml"
    path.write_text("name: rows\nendpoint: fal-ai/wan-22\nitems_from: rows.jsonl\n", encoding="utf-8")
    report = validate_manifest(path)
    assert report.manifest is not None
    manifest = report.manifest
    manifest.validated = False
    rows.write_text(_jsonl(ROWS[:2]), encoding="utf-8")
    assert len(list(manifest.jobs())) == 2
    manifest.refuse_changed_items()
    assert manifest.items_read is not None
    assert manifest.items_read.length == len(_jsonl(ROWS[:2]))


@pytest.mark.parametrize(
    ("endpoint", "given", "field"),
    [
        ("fal-ai/wan-22", {"prompt": "a", "resolution": "1080p"}, "resolution"),  # a rate no table has
        ("fal-ai/wan-22", {"prompt": "a", "num_frames": "many"}, "num_frames"),  # units of no number
        ("fal-ai/wan-22", {"prompt": "a", "num_frames": True}, "num_frames"),
        ("fal-ai/wan-i2v", {"prompt": "a", "resolution": "1080p"}, "resolution"),  # a factor no table has
        ("fal-ai/wan-i2v", {"prompt": "a", "num_frames": "x"}, "num_frames"),  # a threshold of no number
        ("fal-ai/wan-i2v", {"prompt": "a", "num_frames": float("nan")}, "num_frames"),
    ],
)
def test_pricing_says_what_it_cannot_price_in_one_line(
    endpoint: str, given: dict[str, object], field: str
) -> None:
    """Never a ValueError (or decimal's InvalidOperation) the command line calls internal (70)."""
    with pytest.raises(UnpricedError) as raised:
        estimate_job(endpoint, given)
    assert f"{endpoint} has no price for {field}=" in str(raised.value)
    assert raised.value.exit_code == 2
    assert "\n" not in str(raised.value)


def test_pricing_still_prices_what_it_covers() -> None:
    t2v = {"prompt": "a", "resolution": "480p", "num_frames": 96}  # 6 s at $0.04
    assert estimate_job("fal-ai/wan-22", t2v).usd == Decimal("0.24")
    i2v = {"prompt": "a", "resolution": "480p", "num_frames": 100}  # 0.5 units × 1.25 at $0.40
    assert estimate_job("fal-ai/wan-i2v", i2v).usd == Decimal("0.25")


def test_a_job_no_price_covers_is_located_when_stored(tmp_path: Path) -> None:
    """Stored from a validated manifest all the same (a price table that misses a value its
    endpoint allows): the job's file, line and item, in one line."""
    spec = JobSpec(
        item_index=3,
        source="rows.jsonl",
        line=4,
        endpoint="fal-ai/wan-22",
        input={"prompt": "a", "resolution": "1080p"},
        key="k",
        matrix={},
        origins={},
    )

    def one() -> Iterator[JobSpec]:
        yield spec

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", output_dir=str(tmp_path / "out"))
    with pytest.raises(UnpricedError) as raised:
        list(batches._new_jobs(one(), settings))
    assert str(raised.value) == (
        "rows.jsonl:4: item 3: fal-ai/wan-22 has no price for resolution='1080p': the job cannot be "
        "priced; nothing was submitted"
    )
