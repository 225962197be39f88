"""Dataset exports beside JSONL and CSV: a typed Parquet file and a Hugging Face ``videofolder``.

Both reuse :func:`jobs.export.record`, so a field added there (``FIELDS``) reaches every format
the same day. Both stream: rows come from the database in chunks and leave in chunks, so a
100,000-job batch exports in constant memory.

**Parquet** (pyarrow): one typed column per export field, in ``FIELDS`` order. Counts are
``int64`` (``seed`` is ``uint64``: fal's seeds reach ``2**64 - 1``), money and billing units
``float64``, timestamps ``timestamp[us, UTC]``. Dicts and lists (``input``, ``media``,
``provider_metrics``, ``provider_output``, …) are JSON text, because their keys differ between
endpoints and one text column reads the same in pandas, DuckDB and Spark; a field this module
does not know yet is text too (JSON for anything that is not already a string). Rows are written
in row groups of at most :data:`PARQUET_ROW_GROUP` rows and about :data:`PARQUET_ROW_GROUP_BYTES`
of values (an inline image in ``input`` makes a row hundreds of KB), gathered as Arrow arrays: with
the page of jobs being read (:func:`jobs.store.jobs_of_batch_bounded`), the only rows held in
memory at once.

**Hugging Face** (``--format hf -o DIR``): the ``videofolder`` layout that
``datasets.load_dataset("videofolder", data_dir=DIR)`` and ``load_dataset("json",
data_files="DIR/metadata.jsonl")`` read: ``videos/`` (hard links when the outputs are on the same
filesystem, else copies; outputs in S3 are downloaded, each checked against its recorded
SHA-256), ``metadata.jsonl`` (``file_name``, the video's path relative to DIR,
then every export field as the JSONL export has them, but ``video_path``, which is ``file_name``
too: the stored output's path is one on this machine. ``seed_text`` is the seed those
loaders read exactly, as they make ``seed`` float64 when one exceeds int64. Objects and lists
(``input``, ``source_files``, ``media``, ``provider_metrics``, ``provider_output``) are JSON
text, as in Parquet, and the rows that first give each column a value come first: those
loaders type every column from the file's first 10 MB, see :func:`metadata_row` and
:func:`_write_metadata`), ``inputs/`` (each distinct local input file the rows' jobs sent, as
``inputs/<sha256><ext>``, checked against the SHA-256 they recorded; each row's ``input_files``
names its copies, ``input_file_problems`` why one is not there, see :class:`_InputFiles`),
the batch's manifest as ``manifest.<ext>`` (the text stored with the
batch, which its jobs were made from; for a batch stored before that text was kept, the file
when it is still readable; an ``items_from`` file it names is not stored with the batch, so not
included, and the card says so; when some rows come from jobs no longer in it, ``in_manifest``
false, the card says how many and that only the others were made from it), and a ``README.md``
dataset card (counts by status that add up to the rows, with the rows that took another job's
video, ``reused_from``, and those not as requested, ``media_mismatch``, nested under theirs;
endpoints; what the rows cost and what the whole batch was billed; the batches the reused
videos came from, whose spend they are; how it was made: ``wanbatch run``, or for a rerun its
parent and the ``wanbatch rerun`` command with its options, and for a rerun of a rerun every
generation's command). Every file gets the user's usual mode (0666 less the umask; folders
0777 less it); a video is hard-linked only when the stored output is as readable, else copied
(see :func:`_place_video`). Only succeeded jobs by default;
``include_failed`` adds the failed and cancelled ones with ``file_name: null`` (jobs still in
flight are never exported). What is left out is said (:func:`left_out_warnings`), and an export
that would hold no row is refused before anything is made (:func:`refuse_empty`).
A new folder is built as a hidden sibling (``.DIR.*.locked.part``, locked as the part folder
inside an existing DIR is, below) and renamed into place at the end, so a failed export never
leaves a half dataset under the target name (nor the parent folders it created for it); one a
killed export left beside DIR is removed by the next export into DIR, by the same rules
(:func:`_clear_stale_siblings`), and never stops it. An existing empty DIR (a mount point or a
symlink to a folder, which rename(2) cannot replace) is written into: built in a hidden
``DIR/.wanbatch-export.*.part``, its entries moved out at the end (:func:`_publish_into`); a
failed export leaves it empty. The export holds an exclusive ``flock`` on that part folder
while it writes, and says so in its name (``.locked.part``): one a killed export left behind
(nobody holds it) is removed by the next export into DIR, and a held one makes that export
stop, naming it (two exports never fill one DIR). A part folder without that name may be an
earlier version's, whose export took no lock and may still be writing: it is removed only once
untouched for a day, and stops the export before then, named. An existing
non-empty DIR is refused, never merged into, and so is a symlink leading nowhere, before any
video is placed (:func:`_refuse_taken`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from sqlalchemy.orm import Session

from jobs import listing, store
from jobs.cost import cost_report
from jobs.errors import NotFoundError, UsageError, WanbatchError
from jobs.export import (
    FIELDS,
    LOCKED_SUFFIX,
    PART_SUFFIX,
    RANDOM_PART,
    UNLOCKED_PART_AGE,
    by_state,
    export_manifest_text,
    record,
    status_hint,
    unfinished_of,
    write_atomically,
)
from jobs.fs import (
    file_kind,
    file_mode,
    folder_mode,
    is_missing,
    name_problem,
    os_reason,
    shown_path,
    what_is,
)
from jobs.models import Batch, Job
from jobs.money import usd_json, usd_text
from jobs.moved_outputs import moved_path
from jobs.pricing import add_units, unit_symbol, units_text
from jobs.printable import one_line, shell_ref
from jobs.states import JobState
from jobs.url_secrets import shareable_text
from jobs.yaml_lines import YamlProblem, load_located

#: Rows per Parquet row group at most: what the writer holds in memory at once.
PARQUET_ROW_GROUP = 10_000
#: Bytes of values per Parquet row group, about: a row group is written once its buffered values
#: reach this, before :data:`PARQUET_ROW_GROUP` rows when rows are large (an ``input`` carrying an
#: inline image as a data URI is hundreds of KB), so memory stays bounded whatever the row size.
PARQUET_ROW_GROUP_BYTES = 64 * 1024 * 1024
#: Bytes of values :func:`write_parquet` holds as Python objects, about, before it converts them
#: to Arrow arrays (the row group's rows are held as those until it is written).
_PARQUET_CHUNK_BYTES = 4 * 1024 * 1024
#: What :func:`write_parquet` counts per buffered value on top of a text's length.
_VALUE_OVERHEAD = 16

_INT_FIELDS = frozenset(
    {"item_index", "variant", "seed", "video_bytes", "attempts", "possible_duplicate_charges"}
)
#: fal's seeds reach ``2**64 - 1``: past int64, within uint64.
_UINT_FIELDS = frozenset({"seed"})
_FLOAT_FIELDS = frozenset(
    {"billing_units", "cost_usd", "est_billing_units", "est_usd", "possibly_billed_usd"}
)
_TIME_FIELDS = frozenset({"submitted_at", "finished_at"})
_BOOL_FIELDS = frozenset({"simulated", "in_manifest"})

#: The job states an ``hf`` export can hold: succeeded always, the others with ``include_failed``.
TERMINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

#: Where the videos go inside an ``hf`` export folder.
VIDEOS_DIR = "videos"
#: Where the local input files (images) the exported jobs sent go, each once, named by its
#: SHA-256 (:class:`_InputFiles`): the manifest's paths mean nothing in the dataset's folder,
#: and the storage URL fal was sent expires.
INPUTS_DIR = "inputs"


class MissingVideoError(WanbatchError):
    """A succeeded job's video is not where the database says: the dataset would be broken.

    Exit 2, as for an invalid input: nothing was written, and exit 1 means "some jobs ended
    failed or cancelled" (README's exit codes), which a script reads as "the export is there"."""

    exit_code = 2


def wanbatch_version() -> str:
    """The installed wanbatch version, for the dataset card and the Parquet metadata."""
    try:
        return metadata.version("wanbatch")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- Parquet


def arrow_schema() -> Any:
    """The Parquet schema: one typed column per export field, in ``FIELDS`` order."""
    import pyarrow as pa

    def kind(name: str) -> Any:
        if name in _UINT_FIELDS:
            return pa.uint64()
        if name in _INT_FIELDS:
            return pa.int64()
        if name in _FLOAT_FIELDS:
            return pa.float64()
        if name in _TIME_FIELDS:
            return pa.timestamp("us", tz="UTC")
        if name in _BOOL_FIELDS:
            return pa.bool_()
        return pa.string()

    return pa.schema(
        [pa.field(name, kind(name)) for name in FIELDS],
        metadata={"wanbatch_version": wanbatch_version(), "dict_fields": "JSON text"},
    )


def arrow_value(name: str, value: object) -> object:
    """``value`` of field ``name`` as its Parquet column holds it (see :func:`arrow_schema`)."""
    if value is None:
        return None
    if name in _UINT_FIELDS and isinstance(value, int) and not 0 <= value < 2**64:
        raise UsageError(f"{name} {value} does not fit Parquet's uint64 {name} column; export as jsonl")
    if name in _TIME_FIELDS and isinstance(value, str):
        return datetime.fromisoformat(value)
    if name in _INT_FIELDS or name in _FLOAT_FIELDS or name in _TIME_FIELDS or name in _BOOL_FIELDS:
        return value
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def write_parquet(rows: Iterator[dict[str, Any]], sink: str | IO[bytes]) -> int:
    """Write ``rows`` as Parquet to ``sink`` (a path or a binary stream) in row groups; the count.

    A row group's values are gathered as Arrow arrays (compact), converted from Python values
    every :data:`_PARQUET_CHUNK_BYTES` or so: Python objects for a whole row group are never held."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema()
    names: list[str] = list(schema.names)
    columns: dict[str, list[object]] = {name: [] for name in names}
    chunks: list[Any] = []  # the row group's rows converted so far (pyarrow RecordBatches)
    count = 0
    # Rows and (estimated) bytes of values buffered for the next row group, and of them the
    # bytes still Python values (not yet in ``chunks``).
    buffered = 0
    buffered_bytes = 0
    unconverted_bytes = 0

    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:

        def convert() -> None:
            if columns[names[0]]:
                chunks.append(pa.RecordBatch.from_pydict(columns, schema=schema))
                for values in columns.values():
                    values.clear()

        def flush() -> None:
            convert()
            # One row group of every chunk (row_group_size: all of them).
            writer.write_table(pa.Table.from_batches(chunks, schema=schema), row_group_size=buffered)
            chunks.clear()

        for row in rows:
            size = 0
            for name in names:
                value = arrow_value(name, row.get(name))
                columns[name].append(value)
                size += _VALUE_OVERHEAD
                if isinstance(value, (str, bytes)):
                    size += len(value)
            count += 1
            buffered += 1
            buffered_bytes += size
            unconverted_bytes += size
            if buffered >= PARQUET_ROW_GROUP or buffered_bytes >= PARQUET_ROW_GROUP_BYTES:
                flush()
                buffered = buffered_bytes = unconverted_bytes = 0
            elif unconverted_bytes >= _PARQUET_CHUNK_BYTES:
                convert()
                unconverted_bytes = 0
        if buffered:
            flush()
    return count


def write_parquet_file(rows: Iterator[dict[str, Any]], output: Path) -> int:
    """:func:`write_parquet` to ``output`` atomically (temp file beside it, fsync, rename)."""
    return write_atomically(output, "export.parquet", lambda fh: write_parquet(rows, fh))


# --------------------------------------------------------------------------- Hugging Face


@dataclass(slots=True)
class HfExport:
    """What an ``hf`` export wrote: the figures its dataset card shows, and the CLI prints."""

    folder: Path
    rows: int = 0
    videos: int = 0
    linked: int = 0
    copied: int = 0
    #: Of ``copied``, those downloaded from object storage (``s3://`` outputs).
    downloaded: int = 0
    #: Distinct local input files placed in ``inputs/`` (hard-linked or copied, as videos are).
    inputs: int = 0
    #: Distinct local input files a row names that were not placed (changed or gone since the
    #: batch was submitted, or no SHA-256 recorded to check them by), and the rows naming them.
    inputs_not_copied: int = 0
    rows_missing_inputs: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_endpoint: Counter[str] = field(default_factory=Counter)
    #: What the exported jobs were billed, summed exactly (never as floats: thirty $0.2025 jobs
    #: are $6.075, which float addition leaves just under and the card then showed as $6.07).
    cost_usd: Decimal = Decimal(0)
    #: Billed units per unit symbol (:func:`jobs.pricing.unit_symbol`): seconds and videos apart.
    billing_units: dict[str, Decimal] = field(default_factory=dict)
    manifest: str | None = None
    #: Where ``manifest`` came from: ``"stored"`` (the text kept with the batch), ``"file"`` (the
    #: manifest file, for a batch stored before its text was kept), None when not included.
    manifest_source: str | None = None
    #: Only for ``"file"``: the file differs from the one the batch was submitted with.
    manifest_changed: bool = False
    left_out: dict[str, int] = field(default_factory=dict)
    #: Bytes of every file in the published folder (a hard-linked video counts its full size).
    bytes: int = 0
    #: What the whole batch was billed (failed, cancelled and unfinished jobs included), as
    #: ``cost`` reports it: ``cost_usd`` alone under-reports the spend behind the dataset.
    batch_billed_usd: Decimal = Decimal(0)
    batch_billed_units: dict[str, Decimal] = field(default_factory=dict)
    #: What submits of unknown outcome may have cost on top (``cost``'s "possibly billed").
    batch_possibly_billed_usd: Decimal = Decimal(0)
    #: The ``items_from`` file the manifest names (as written there): not in the dataset, since
    #: the batch stores the manifest's text but not that file's (:func:`items_from_of`).
    items_from: str | None = None
    #: What the user must know about what the dataset leaves out (:func:`left_out_warnings`).
    warnings: list[str] = field(default_factory=list)
    #: Rows whose job took a video another job made instead of being sent (``reused_from``:
    #: ``reuse_outputs``, or a rerun taking a staged video back), by status; and the batches
    #: those jobs belong to (:func:`jobs.listing.reused_sources`): the spend behind those
    #: videos is theirs, not this batch's.
    reused: Counter[str] = field(default_factory=Counter)
    reused_sources: list[listing.ReusedSource] = field(default_factory=list)
    #: Rows whose video is not what was requested (``media_mismatch``), by status; and how many
    #: jobs of the whole batch ``status`` counts so (some may not be exported).
    mismatched: Counter[str] = field(default_factory=Counter)
    batch_media_mismatches: int = 0
    #: Rows whose job's item is no longer in the manifest the batch stores (``in_manifest``
    #: false: made from an earlier version of it).
    not_in_manifest: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The figures of ``export --format hf --json`` (money as every ``--json`` has it)."""
        return {
            "records": self.rows,
            "bytes": self.bytes,
            "videos": self.videos,
            "hard_linked": self.linked,
            "copied": self.copied,
            "downloaded": self.downloaded,
            "input_files": self.inputs,
            "input_files_not_copied": self.inputs_not_copied,
            "rows_missing_input_files": self.rows_missing_inputs,
            "by_status": dict(sorted(self.by_status.items())),
            "by_endpoint": dict(sorted(self.by_endpoint.items())),
            "not_exported": dict(sorted(self.left_out.items())),
            "cost_usd": usd_json(self.cost_usd),
            "billing_units_by_unit": {u: float(n) for u, n in sorted(self.billing_units.items())},
            "manifest": self.manifest,
            "manifest_source": self.manifest_source,
            "manifest_changed": self.manifest_changed,
            "items_from": None if self.items_from is None else {"path": self.items_from, "included": False},
            "batch_billed_usd": usd_json(self.batch_billed_usd),
            "batch_billed_units_by_unit": {u: float(n) for u, n in sorted(self.batch_billed_units.items())},
            "batch_possibly_billed_usd": usd_json(self.batch_possibly_billed_usd),
            "reused": {
                "records": self.reused.total(),
                "by_status": dict(sorted(self.reused.items())),
                "sources": [
                    {"batch": r.batch_id, "name": r.name, "records": r.jobs} for r in self.reused_sources
                ],
            },
            "media_mismatches": self.mismatched.total(),
            "media_mismatches_by_status": dict(sorted(self.mismatched.items())),
            "batch_media_mismatches": self.batch_media_mismatches,
            "not_in_manifest": self.not_in_manifest,
            "warnings": list(self.warnings),
        }


def _not_as_stored(source: Path, size: int | None) -> str | None:
    """How the stored video at ``source`` is no longer what wanbatch wrote, else None.

    wanbatch writes every video as a regular file of the recorded size. A symlink in its place
    (to ``/etc/…``, say) would put another file into a dataset meant to be shared, and a file of
    another size is not the video the job made. The size is checked, not the SHA-256 (reading
    every video again would make an export of a large batch as slow as copying it); the record
    carries ``video_sha256`` for a full check.
    """
    from jobs.output_store import output_size

    found = output_size(str(source))  # None for anything but a regular file (the caller saw one exists)
    if found is None:
        return "was replaced by a link or a special file"
    if size is not None and found != size:
        return f"has {found:,} bytes instead of {size:,}"
    return None


def _place_video(source: Path, target: Path, mode: int) -> bool:
    """Hard-link ``source`` at ``target`` (True), or copy it (False) when linking is impossible
    or the stored file lacks read permissions the user's new files get (``mode``,
    :func:`jobs.fs.file_mode`); never through a symlink (:func:`_not_as_stored` checked it is none).

    A link shares the stored file's mode. Outputs stored before wanbatch gave them the user's
    usual mode are owner-only (``mkstemp``'s 0600): linked, they would be the only files of a
    shared dataset its readers cannot open. A copy gets the usual mode (``open()``'s, 0666 less
    the umask) and the stored output is left as it is. Only read bits count: a umask of 002
    against outputs stored under 022 still links."""
    unreadable = mode & 0o444 & ~stat.S_IMODE(source.lstat().st_mode)
    if not unreadable:
        try:
            os.link(source, target, follow_symlinks=False)
        except OSError:
            pass
        else:
            return True
    shutil.copyfile(source, target, follow_symlinks=False)
    return False


#: An input file's extension as kept in ``inputs/`` (lower-cased); anything else is dropped.
_INPUT_SUFFIX = re.compile(r"\.[a-z0-9]{1,8}")


@dataclass(slots=True)
class _InputFiles:
    """The local input files an ``hf`` export places in ``inputs/<sha256><ext>``, each once.

    A job records each media file it was given by path with the SHA-256 of the bytes it sent
    (``source_files``). The dataset gets those bytes, checked against that digest: a file
    changed or gone since is not placed (it is not what the job sent), and the row says why
    (``input_file_problems``). Keyed by digest, so a file several jobs name (an image across
    seeds), or two paths holding the same bytes, is placed once. URLs and data URIs are not
    local files: the row's ``input`` keeps them."""

    folder: Path
    mode: int
    summary: HfExport
    #: SHA-256 → the placed file's path relative to the dataset folder.
    placed: dict[str, str] = field(default_factory=dict)
    #: (path, SHA-256) → why it was not placed: each file is read once whatever names it.
    refused: dict[tuple[str, str | None], str] = field(default_factory=dict)

    def of_job(self, job: Job) -> tuple[dict[str, str | None] | None, dict[str, str] | None]:
        """The row's ``input_files`` (media field → path in the dataset, null when not placed)
        and ``input_file_problems`` (media field → why not), each None when there is none."""
        files: dict[str, str | None] = {}
        problems: dict[str, str] = {}
        for name, source in (job.source_files or {}).items():
            value = job.input.get(name)
            if not (isinstance(source, dict) and isinstance(value, str) and Path(value).is_absolute()):
                continue  # a URL or a data URI: nothing local to place
            digest = source.get("sha256")
            placed, problem = self._place(value, digest if isinstance(digest, str) else None)
            files[name] = placed
            if problem is not None:
                problems[name] = f"{source.get('source', value)}: {problem}"
        if problems:
            self.summary.rows_missing_inputs += 1
        return files or None, problems or None

    def _place(self, path: str, digest: str | None) -> tuple[str | None, str | None]:
        """The placed copy of the file at ``path`` recorded as ``digest``, or why there is none."""
        if digest is not None and digest in self.placed:
            return self.placed[digest], None
        key = (path, digest)
        if key in self.refused:
            return None, self.refused[key]
        if digest is None:
            problem: str | None = "no SHA-256 recorded (a job stored before hashes were) to check it against"
        else:
            suffix = Path(path).suffix.lower()
            name = f"{INPUTS_DIR}/{digest}{suffix if _INPUT_SUFFIX.fullmatch(suffix) else ''}"
            problem = _place_input(Path(path), digest, self.folder / name, self.mode)
            if problem is None:
                self.placed[digest] = name
                self.summary.inputs += 1
                return name, None
        assert problem is not None
        self.refused[key] = problem
        self.summary.inputs_not_copied += 1
        return None, problem


def _place_input(source: Path, digest: str, target: Path, mode: int) -> str | None:
    """Copy the input file ``source`` to ``target`` (never through a symlink), then check the
    copied bytes against the recorded ``digest``; None when placed, else why not (nothing left at
    ``target``). Copied, never hard-linked as videos are: a user's input images live in their
    working folder and get edited in place, which would change a linked dataset's copy too.

    The placed file is what is hashed, not ``source`` before: a file rewritten in between is
    caught whichever way it went."""
    problem = name_problem(source)
    if problem is not None:
        return problem
    try:
        info = source.lstat()
        real = source.resolve()
        if real != source:  # stored resolved: a symlink appeared on the way since
            return f"now leads to {shown_path(real)} (a symlink appeared since the batch was submitted)"
    except FileNotFoundError:
        return "missing since the batch was submitted"
    except (OSError, RuntimeError) as exc:
        return f"unreadable ({os_reason(exc) if isinstance(exc, OSError) else 'a symlink loop?'})"
    if not stat.S_ISREG(info.st_mode):
        return "no longer a regular file"
    target.parent.mkdir(exist_ok=True)
    try:
        shutil.copyfile(source, target, follow_symlinks=False)
        with target.open("rb") as fh:
            now = hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        target.unlink(missing_ok=True)
        if is_missing(exc):
            return "missing since the batch was submitted"
        return f"unreadable ({os_reason(exc)})"
    if now != digest:
        target.unlink()
        return f"changed since the batch was submitted (SHA-256 {digest[:12]}… then, {now[:12]}… now)"
    return None


def _input_warning(summary: HfExport) -> str | None:
    """The export's one line on the input files it could not place, else None."""
    if not summary.inputs_not_copied:
        return None
    return (
        f"{summary.inputs_not_copied} input file(s) named by {summary.rows_missing_inputs} row(s) were "
        f"not copied into {INPUTS_DIR}/ (changed or missing since the batch was submitted): each such "
        "row's input_file_problems says which and why"
    )


def _write_manifest(batch: Batch, folder: Path, summary: HfExport) -> None:
    """Write the batch's manifest into ``folder`` and note it in ``summary``.

    The text stored with the batch (``manifest_text``: what its jobs were made from, and what
    their ``item_index`` and ``variant`` number; a rerun's is its parent's), whatever the file
    holds now or whether it still exists. A batch stored before that text was kept has none:
    then the file at ``manifest_path`` is copied when still readable, and ``manifest_changed``
    says whether it differs from the one submitted. Either way with the secrets the rows'
    ``input`` masks masked too (:func:`jobs.export.export_manifest_text`: FAL_KEY, URL
    credentials), so the two say the same."""
    import hashlib

    source = Path(batch.manifest_path)
    suffix = source.suffix if source.suffix in (".yaml", ".yml", ".json") else ".yaml"
    name = f"manifest{suffix}"
    if batch.manifest_text is not None:
        shown = export_manifest_text(batch.manifest_text)
        (folder / name).write_text(shown, encoding="utf-8", newline="")
        summary.manifest, summary.manifest_source, summary.manifest_changed = name, "stored", False
        summary.items_from = items_from_of(batch.manifest_text)
        return
    try:
        data = source.read_bytes()
    except (OSError, ValueError):  # ValueError: a name this session's file-name encoding lacks
        return
    text = data.decode("utf-8", errors="surrogateescape")
    shown = export_manifest_text(text)
    (folder / name).write_bytes(data if shown == text else shown.encode("utf-8", errors="surrogateescape"))
    summary.manifest, summary.manifest_source = name, "file"
    summary.manifest_changed = hashlib.sha256(data).hexdigest() != batch.manifest_sha256
    summary.items_from = items_from_of(data.decode("utf-8-sig", errors="replace"))


def items_from_of(text: str | None) -> str | None:
    """The ``items_from:`` path a manifest's text names (as written), else None.

    The dataset's ``manifest.yaml`` names that file, but the batch keeps only the manifest's
    text, not the rows file's: copying the file as it is now could put rows into the dataset
    that its jobs were not made from. The card says it is not included instead (each row's
    ``input`` holds what its job sent). A text that no longer parses names nothing."""
    if text is None:
        return None
    try:
        data, _duplicates = load_located(text)
    except YamlProblem:
        return None
    source = data.get("items_from") if isinstance(data, dict) else None
    return source if isinstance(source, str) and source.strip() else None


def _dataset_rows(
    session: Session,
    batch: Batch,
    output_dir: Path,
    folder: Path,
    summary: HfExport,
    include_failed: bool,
    moves: Mapping[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """The ``metadata.jsonl`` rows, placing each succeeded job's video in ``folder`` on the way,
    and each local input file an exported job sent (:class:`_InputFiles`) (``moves``: videos of
    a moved project found where the database could not record them,
    :func:`jobs.moved_outputs.follow_outputs`)."""
    states = _exported_states(include_failed)
    videos = folder / VIDEOS_DIR
    videos.mkdir()
    mode = file_mode()  # what a copy gets, and what a stored video must let read to be linked
    inputs = _InputFiles(folder, mode, summary)
    for job in store.jobs_of_batch_bounded(session, batch.id, states=states):
        file_name: str | None = None
        if job.state is JobState.SUCCEEDED:
            uri = moved_path(job.output_path, moves)
            if uri is not None and uri.startswith("s3://"):
                file_name = f"{VIDEOS_DIR}/{_fetch_object(job.id, uri, job.output_sha256, folder)}"
                summary.downloaded += 1
                summary.copied += 1
            else:
                source = Path(uri) if uri else None
                if source is None or not source.is_file():
                    raise MissingVideoError(
                        f"job {job.id} succeeded but its video is missing ({uri or 'no path'}); "
                        "nothing was exported"
                    )
                changed = _not_as_stored(source, job.output_bytes)
                if changed:
                    raise MissingVideoError(
                        f"job {job.id} succeeded but its video {uri} {changed} since it was stored; "
                        "nothing was exported"
                    )
                file_name = f"{VIDEOS_DIR}/{source.name}"
                if _place_video(source, folder / file_name, mode):
                    summary.linked += 1
                else:
                    summary.copied += 1
            summary.videos += 1
        row = record(job, batch, output_dir, moves)
        # The copy inside the dataset, as file_name names it: the stored output's path is a
        # path on this machine (absolute when outside WANBATCH_OUTPUT_DIR), useless to a reader.
        row["video_path"] = file_name
        # The job's local input files inside the dataset: file_name and input_files pair a video
        # with what it was made from.
        input_files, input_problems = inputs.of_job(job)
        yield {
            "file_name": file_name,
            "input_files": input_files,
            "input_file_problems": input_problems,
            **_summed(row, job, summary),
        }


def _summed(row: dict[str, Any], job: Job, summary: HfExport) -> dict[str, Any]:
    """Count ``row`` (the record of ``job``) into the dataset card's figures; returns it.

    Money and units are summed from the job's exact Decimals, as ``cost`` sums them, not from
    the record's floats: the card then says what ``run``, ``status`` and ``cost`` say.
    """
    summary.rows += 1
    summary.by_status[row["status"]] += 1
    summary.by_endpoint[row["endpoint"]] += 1
    if job.reused_from is not None:
        summary.reused[row["status"]] += 1
    if job.media_mismatch is not None:
        summary.mismatched[row["status"]] += 1
    if row["in_manifest"] is False:
        summary.not_in_manifest += 1
    summary.cost_usd += job.actual_usd or Decimal(0)
    add_units(summary.billing_units, unit_symbol(job.endpoint), job.actual_billing_units or Decimal(0))
    return row


def _fetch_object(job_id: str, uri: str, sha256: str | None, folder: Path) -> str:
    """Download a video stored in S3 into ``folder/videos/`` (its SHA-256 checked against the
    record); its file name there. :class:`MissingVideoError` when it cannot be had."""
    from jobs.output_store import OutputReadError, fetch_output

    name = uri.rsplit("/", 1)[-1]
    if name in ("", ".", "..") or name.startswith("."):
        raise MissingVideoError(f"job {job_id}: {uri} is not a video object; nothing was exported")
    try:
        fetch_output(uri, folder / VIDEOS_DIR / name, sha256)
    except OutputReadError as exc:
        raise MissingVideoError(
            f"job {job_id} succeeded but its video is missing or unreadable ({exc}); nothing was exported"
        ) from None
    return name


def _code(text: str) -> str:
    """``text`` as one Markdown code span, whatever backticks it holds (a longer fence)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _rerun_command(batch: Batch, parent_id: str) -> str | None:
    """The ``wanbatch rerun`` command that made ``batch`` (its parent by full id, the options as
    stored in ``rerun_options``); None when the options were not recorded (an older rerun)."""
    options = batch.rerun_options
    if options is None:
        return None
    words = ["wanbatch", "rerun", parent_id]
    if options.get("failed_only"):
        words.append("--failed-only")
    if options.get("new_seeds"):
        words.append("--new-seeds")
    if options.get("max_usd") is not None:
        words += ["--max-usd", str(options["max_usd"])]
    for text in options.get("vary") or ():
        words += ["--vary", str(text)]
    if options.get("pay_again"):
        words.append("--pay-again")
    if options.get("now"):
        words.append("--now")
    if batch.simulated:
        words.append("--simulate")
    return shlex.join(words)


def _generated(batch: Batch) -> str:
    """The command that made ``batch``, as the card shows it (a Markdown code span, or for a
    rerun stored before its options were kept the command without them and a note saying so)."""
    simulate = " --simulate" if batch.simulated else ""
    if batch.parent_batch_id is None:
        return f"`wanbatch run{simulate} <manifest>`"
    command = _rerun_command(batch, batch.parent_batch_id)
    if command is not None:  # its --vary values masked as the rows' input (a rerun stored before
        return _code(shareable_text(command))  # they were checked for FAL_KEY may hold it)
    return (
        f"`wanbatch rerun {batch.parent_batch_id}{simulate}` with options that were not recorded "
        "(a rerun stored by a wanbatch that did not keep them); each row's `input` and `seed` "
        "are what was sent"
    )


def _made_by(batch: Batch, parent: Batch | None) -> list[str]:
    """The card's lines on the command that made the batch: ``run`` for a manifest's batch; for a
    rerun its parent and the ``rerun`` command, options included."""
    if batch.parent_batch_id is None:
        return [f"- generated: {_generated(batch)}"]
    parent_id = batch.parent_batch_id
    named = f"batch {_code(parent.name)} ({_code(parent_id)})" if parent is not None else _code(parent_id)
    return [f"- rerun of: {named}", f"- generated: {_generated(batch)}"]


def _ancestors(session: Session, batch: Batch) -> tuple[list[Batch], str | None]:
    """``batch``'s generations, oldest first and ``batch`` last, following ``parent_batch_id``;
    and the id of a parent no longer stored where the chain breaks off (else None). A chain that
    comes back to a batch already seen (never made by wanbatch) stops there."""
    chain = [batch]
    seen = {batch.id}
    missing = None
    while (parent_id := chain[-1].parent_batch_id) is not None and parent_id not in seen:
        try:
            parent = store.get_batch(session, parent_id)
        except NotFoundError:
            missing = parent_id
            break
        chain.append(parent)
        seen.add(parent.id)
    return chain[::-1], missing


def _lineage(session: Session, batch: Batch) -> list[str]:
    """The card's lines on every generation of a rerun of a rerun (or deeper): each batch and
    the command that made it, from the manifest's ``run`` on, so the options of every rerun on
    the way are there (``generated`` shows only the last one's). Nothing for a batch made by
    ``run`` or a rerun of it: ``rerun of`` and ``generated`` say it all."""
    chain, missing = _ancestors(session, batch)
    if len(chain) < 3 and missing is None:
        return []
    lines = ["- lineage (oldest first):"]
    if missing is not None:
        lines.append(f"  0. batch {_code(missing)}: no longer stored")
    for n, generation in enumerate(chain, start=1):
        this = ", this dataset" if generation is batch else ""
        lines.append(
            f"  {n}. batch {_code(generation.name)} ({_code(generation.id)}{this}): {_generated(generation)}"
        )
    return lines


def _inputs_lines(summary: HfExport) -> list[str]:
    """The card's count of the input files in ``inputs/``, and of those left out."""
    if not summary.inputs and not summary.inputs_not_copied:
        return []
    line = f"- {summary.inputs} input file(s) in `{INPUTS_DIR}/` (named by each row's `input_files`)"
    if summary.inputs_not_copied:
        line += (
            f"; {summary.inputs_not_copied} not included, changed or missing since the batch was "
            f"submitted ({summary.rows_missing_inputs} row(s): see their `input_file_problems`)"
        )
    return [line]


def _cost_lines(summary: HfExport) -> list[str]:
    """The card's money: what the dataset's rows were billed, and what the whole batch was
    (failed, cancelled and unfinished jobs included), so that nobody reporting the spend behind
    the dataset takes the first for the second."""
    rows = f"{usd_text(summary.cost_usd)} (billing units: {units_text(summary.billing_units)})"
    lines = [f"- cost of these rows: {rows}"]
    billed = (
        f"- billed for the whole batch: {usd_text(summary.batch_billed_usd)} "
        f"(billing units: {units_text(summary.batch_billed_units)}), every job included"
    )
    others = summary.batch_billed_usd - summary.cost_usd
    if others > 0:
        billed += f"; {usd_text(others)} of it for jobs not in this dataset"
    if summary.batch_possibly_billed_usd:
        billed += (
            f"; possibly up to {usd_text(summary.batch_possibly_billed_usd)} more, by submits whose "
            "outcome is unknown"
        )
    if unfinished_of(summary.left_out):
        billed += " (so far: the batch has not finished)"
    return [*lines, billed]


#: Source batches a card names by name before it says "and N more".
CARD_SOURCES = 3


def _reused_lines(batch: Batch, summary: HfExport) -> list[str]:
    """The card's paragraph on reused videos: how many rows took a video another job made (not
    rendered, nor paid for, by this batch: its cost lines count only what such a job's own
    earlier attempts were billed) and the batches those jobs belong to, the first
    :data:`CARD_SOURCES` by name, with their rows."""
    total = summary.reused.total()
    if not total:
        return []

    def named(source: listing.ReusedSource) -> str:
        if source.batch_id is None:
            return f"{source.jobs} from jobs no longer stored"
        if source.batch_id == batch.id:
            return f"{source.jobs} from jobs of this batch"
        return f"{source.jobs} from batch {_code(source.name or '')} ({_code(source.batch_id)})"

    shown = [named(source) for source in summary.reused_sources[:CARD_SOURCES]]
    if more := summary.reused_sources[CARD_SOURCES:]:
        shown.append(f"and {sum(s.jobs for s in more)} from {len(more)} more batch(es)")
    return [
        "",
        f"**Reused videos:** {total} of these rows took a video another job made instead of "
        "being sent (`reuse_outputs`, or a rerun taking back a video its parent paid for; "
        f"`reused_from` names that job): {', '.join(shown)}. Those videos were neither rendered "
        "nor paid for by this batch (such a row's cost is only what its job's own earlier "
        "attempts were billed, if any): what they cost is counted in the batch that made them "
        "(`wanbatch cost BATCH`).",
    ]


def _mismatch_lines(summary: HfExport) -> list[str]:
    """The card's paragraph on videos not as requested (``media_mismatch``), with the count
    ``wanbatch status`` gives for the whole batch when some of them are not exported."""
    total = summary.mismatched.total()
    if not total and not summary.batch_media_mismatches:
        return []
    text = (
        f"**Videos not as requested:** {total} of these rows (`media_mismatch` says what differs "
        "from the request: size, frames, duration, …)"
    )
    if (others := summary.batch_media_mismatches - total) > 0:
        text += (
            f"; `wanbatch status` counts {summary.batch_media_mismatches} video(s) not as requested "
            f"in the whole batch, {others} of them in jobs not exported"
        )
    return ["", text + "."]


def _items_from_line(summary: HfExport) -> list[str]:
    """The card's note that the ``items_from`` file ``manifest.yaml`` names is not in the dataset."""
    if summary.items_from is None:
        return []
    return [
        f"- items_from: {_code(summary.items_from)}, which `{summary.manifest}` names, is **not "
        "included**: wanbatch keeps the manifest's text with the batch, not that file's, and the "
        "file as it is now may not be what the jobs were made from. Each row's `input` is what "
        "its job sent"
    ]


def _earlier_versions_lines(summary: HfExport) -> list[str]:
    """The card's note on rows ``manifest.yaml`` does not describe: jobs of an earlier version
    of the manifest (``in_manifest`` false)."""
    lines = []
    named = summary.manifest or "the batch's manifest"
    if summary.not_in_manifest:
        lines.append(
            f"- {summary.not_in_manifest} of the {summary.rows} rows come from jobs no longer in "
            f"{named} (an earlier version of it); their `in_manifest` is false"
        )
    return lines


def _order_text(summary: HfExport) -> str:
    """How the card says the rows are ordered."""
    if summary.not_in_manifest:
        return (
            "Rows are in item order, the manifest's items first, then those of jobs no longer in "
            "it (numbered after its items)"
        )
    return "Rows are in the manifest's order"


def _card(
    batch: Batch, parent: Batch | None, summary: HfExport, include_failed: bool, lineage: list[str]
) -> str:
    """The ``README.md`` dataset card: what is in the folder and how it was made."""
    made = (
        "**Simulated** videos, made by wanbatch's bundled fal simulator (`--simulate`), not by "
        "fal.ai's Wan endpoints: a rehearsal of the batch, not a dataset of the model's output. By "
        if batch.simulated
        else "Videos generated with fal.ai's hosted Wan endpoints by "
    )
    lines = [
        "---",
        f"pretty_name: {json.dumps(batch.name, ensure_ascii=False)}",
        "tags: [video, synthetic, wanbatch" + (", simulated]" if batch.simulated else "]"),
        "---",
        "",
        f"# {batch.name}",
        "",
        f"{made}wanbatch {wanbatch_version()}, batch `{batch.id}` "
        f"(submitted {batch.created_at.isoformat()}).",
        "",
        "## Contents",
        "",
        f"- {summary.rows} row(s) in `metadata.jsonl`, {summary.videos} video(s) in `{VIDEOS_DIR}/`",
        *_inputs_lines(summary),
    ]
    for status, n in sorted(summary.by_status.items()):
        # What some of a status's rows are besides, nested under it: the top-level counts
        # still add up to the rows.
        lines.append(f"- {status}: {n}")
        if reused := summary.reused[status]:
            lines.append(f"  - of them, took a video another job made (`reused_from`): {reused}")
        if mismatched := summary.mismatched[status]:
            lines.append(f"  - of them, with a video not as requested (`media_mismatch`): {mismatched}")
    lines += [f"- not exported ({state}): {n}" for state, n in sorted(summary.left_out.items()) if n]
    lines += [
        *_cost_lines(summary),
        "",
        "| endpoint | rows |",
        "|---|---:|",
    ]
    lines += [f"| `{endpoint}` | {n} |" for endpoint, n in sorted(summary.by_endpoint.items())]
    lines += _reused_lines(batch, summary) + _mismatch_lines(summary)
    # The manifest's file name only: its folder on this machine (a home directory, a user name)
    # has no place in a card meant to be published.
    source = Path(batch.manifest_path).name
    whose = "its parent batch was" if batch.parent_batch_id is not None else "the batch was"
    if summary.manifest_source == "stored" and summary.not_in_manifest:
        # Some rows come from an earlier version of it: the text is not theirs.
        latest = (
            "its parent batch stored when this batch was made"
            if batch.parent_batch_id is not None
            else "the batch was last submitted with"
        )
        manifest = (
            f"`{summary.manifest}` (the text of `{source}` {latest}, as stored with it; only the "
            "rows whose `in_manifest` is true were made from it)"
        )
    elif summary.manifest_source == "stored":
        manifest = f"`{summary.manifest}` (the text of `{source}` {whose} made from, as stored with it)"
    elif summary.manifest:
        manifest = f"`{summary.manifest}` (copied from `{source}`" + (
            "; **it changed after the batch was submitted**)" if summary.manifest_changed else ")"
        )
    else:
        manifest = f"not included (`{source}` was not readable at export time)"
    lines += [
        "",
        "## How it was made",
        "",
        f"- manifest: {manifest}",
        *_earlier_versions_lines(summary),
        *_items_from_line(summary),
        *_made_by(batch, parent),
        *lineage,
        f"- exported: `wanbatch export {batch.id} --format hf -o <folder>"
        + (" --include failed`" if include_failed else "`"),
        "",
        "Each row of `metadata.jsonl` is one job: `file_name` (the video, relative to this folder; "
        "null for a job without a video) and every field of wanbatch's export record (`input` is "
        "the exact JSON submitted, `seed` the one the provider used, `video_sha256` the video's "
        "SHA-256, `provider_metrics` and `provider_output` fal's metrics and result). "
        f"`input_files` maps each media field the job was given as a local file (`image_url`, …) "
        f"to its copy in `{INPUTS_DIR}/`, named by its SHA-256 (the bytes the job sent, checked), "
        "so `file_name` and `input_files` pair a video with what it was made from; a file changed "
        "or gone since the batch was submitted is not included (null there, and "
        "`input_file_problems` says why); inputs given as URLs are not fetched: the row's `input` "
        "keeps the URL (fal's storage URLs expire after some days). Objects and "
        "lists (`input`, `input_files`, `source_files`, `media`, `provider_metrics`, "
        "`provider_output`) are JSON text, whose keys differ between endpoints and rows: "
        "`json.loads` them. "
        + _order_text(summary)
        + ", but for a few that come first (the first to give each column a "
        "value), so that loaders typing columns from the file's beginning type them all.",
        "",
        "```python",
        "import json",
        "from datasets import load_dataset",
        'ds = load_dataset("json", data_files="metadata.jsonl")  # or ("videofolder", data_dir=".")',
        'seed = int(ds["train"]["seed_text"][0])  # the exact seed, to reproduce the video',
        'prompt = json.loads(ds["train"]["input"][0])["prompt"]',
        "```",
        "",
        "Seeds go up to 18446744073709551615 (uint64). These loaders read JSON numbers as int64 or "
        "float64, so a seed above 2^53 in `seed` (and in `input`) comes back rounded, and every "
        "`seed` as a float when one exceeds int64: `seed_text` holds the exact value as text.",
        "",
    ]
    return "\n".join(lines)


def _publish(tmp: Path, dest: Path) -> None:
    """Rename the finished folder (a sibling of ``dest``, which does not exist) into place with
    the user's usual permissions (mkdtemp's are 0700)."""
    tmp.chmod(folder_mode())
    tmp.replace(dest)  # an empty folder made there meanwhile is replaced; a non-empty one makes this fail


#: What :func:`_publish_into` moves last: the file loaders read the dataset from.
_LAST = "metadata.jsonl"


def _publish_into(tmp: Path, dest: Path) -> None:
    """Move the finished export's entries from ``tmp`` (a hidden folder inside ``dest``, an
    existing empty folder) into ``dest``, ``metadata.jsonl`` last, then remove ``tmp``.

    ``dest`` itself is never renamed over: it may be a mount point (rename(2) over one fails
    with EBUSY) or a symlink to a folder (ENOTDIR). Each entry is renamed within ``dest``'s file
    system, so this is quick whatever the videos weigh. An entry whose name something else took
    in ``dest`` meanwhile fails the export; the entries moved before go back into ``tmp``, which
    the caller removes, so ``dest`` is left as it was."""
    names = sorted((entry.name for entry in tmp.iterdir()), key=lambda name: (name == _LAST, name))
    moved: list[str] = []
    try:
        for name in names:
            target = dest / name
            if os.path.lexists(target):
                taken = f"{name} was created in it during the export"
                raise FileExistsError(errno.EEXIST, taken, str(target))
            (tmp / name).rename(target)
            moved.append(name)
    except OSError:
        for name in reversed(moved):
            with contextlib.suppress(OSError):
                (dest / name).rename(tmp / name)
        raise
    tmp.rmdir()


def refuse_missing_videos(session: Session, batch: Batch, moves: Mapping[str, str] | None = None) -> None:
    """Refuse (:class:`MissingVideoError`, before anything is written) a dataset some of whose
    succeeded jobs' local videos are gone or of another size than stored, saying how many and
    the command that fetches them again from fal for free (``wanbatch refetch``).

    Refused rather than left out (no ``--skip-missing``): a dataset whose rows silently lack
    paid videos passes for a whole one, its card's counts would not add up, and the fix costs
    nothing while fal still serves the files. It used to stop at the first such job, naming it
    alone, with no way on. One ``stat`` per video, the same look as the copy's own
    (:func:`_dataset_rows`), which stays for a video removed while the export runs."""
    missing: list[tuple[str, str]] = []
    changed: list[tuple[str, str]] = []
    for row in store.recorded_outputs_of_batch(session, batch.id):
        uri = moved_path(row.output_path, moves)
        if uri is None or uri.startswith("s3://"):  # an object is fetched, and checked, as it is copied
            continue
        source = Path(uri)
        if not source.is_file():
            missing.append((row.id, uri))
        elif (how := _not_as_stored(source, row.output_bytes)) is not None:
            changed.append((row.id, f"{uri} {how}"))
    if not missing and not changed:
        return
    what = " and ".join(
        part
        for part in (
            f"{len(missing)} missing" if missing else "",
            f"{len(changed)} changed since stored" if changed else "",
        )
        if part
    )
    first_id, first = (missing or changed)[0]
    ref = shell_ref(batch.name, batch.id)
    raise MissingVideoError(
        f"{len(missing) + len(changed)} succeeded job(s)' videos are not on disk as stored ({what}; "
        f"first: job {first_id}, {first}); nothing was exported: `wanbatch refetch {ref}` fetches them "
        "again from fal at no charge while fal still serves them, then export again"
    )


def write_hf(
    session: Session,
    batch_ref: Batch | str,
    output_dir: Path,
    dest: Path,
    *,
    include_failed: bool = False,
    moves: Mapping[str, str] | None = None,
) -> HfExport:
    """Write the batch (a Batch, or its id, id prefix or name) as a Hugging Face ``videofolder``
    at ``dest`` (see the module docstring).

    ``session`` should read one snapshot (``jobs.db.read_scope(engine, snapshot=True)``): the
    rows, the jobs left out and the batch's cost are read by several statements, and of a batch
    still running they add up only when all of them see the same jobs."""
    batch = batch_ref if isinstance(batch_ref, Batch) else store.get_batch(session, batch_ref)
    existing = _refuse_taken(dest)
    refuse_empty(batch, store.counts_by_state(session, batch.id), include_failed)
    refuse_missing_videos(session, batch, moves)
    # A new folder is built beside it and renamed into place: all or nothing. An existing empty
    # one (a mount point, a symlink to a folder) cannot be renamed over: the export is built in a
    # hidden folder inside it, on its own file system, and its entries moved out of it at the end.
    made = [] if existing else _missing_folders(dest.parent)
    held: int | None = None  # the lock on the part folder (beside DIR, or inside it), while it is written
    try:
        if existing:
            tmp, held = _part_inside(dest)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            _clear_stale_siblings(dest)
            tmp, held = _locked_part(dest.parent, f".{dest.name}.")
    except OSError as exc:
        _remove_empty(made)
        raise UsageError(f"cannot write the export to {str(dest)!r}: {exc.strerror or exc}") from None
    summary = HfExport(folder=dest)
    try:
        if existing:
            _refuse_another_writer(dest, tmp)
        _write_metadata(_dataset_rows(session, batch, output_dir, tmp, summary, include_failed, moves), tmp)
        counts = store.counts_by_state(session, batch.id)
        exported = {s.value for s in _exported_states(include_failed)}
        summary.left_out = {state: n for state, n in counts.items() if state not in exported and n}
        summary.warnings = left_out_warnings(batch, summary.left_out)
        if inputs_line := _input_warning(summary):
            summary.warnings.append(inputs_line)
        _add_batch_cost(session, batch, summary)
        if summary.reused:
            summary.reused_sources = listing.reused_sources(
                session, batch.id, _exported_states(include_failed)
            )
        summary.batch_media_mismatches = store.count_media_mismatches(session, batch.id)
        _write_manifest(batch, tmp, summary)
        parent = None if batch.parent_batch_id is None else store.get_batch(session, batch.parent_batch_id)
        card = _card(batch, parent, summary, include_failed, _lineage(session, batch))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        summary.bytes = _folder_bytes(tmp)
        if existing:
            _publish_into(tmp, dest)
        else:
            _publish(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise UsageError(f"cannot write the export to {str(dest)!r}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise
    finally:
        if held is not None:
            os.close(held)  # after the part folder is gone: never an unlocked one a retry could take
    return summary


#: The largest seed JSON readers type as int64; pyarrow makes a larger one (and its column) float64.
_INT64_MAX = 2**63 - 1


def metadata_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as ``metadata.jsonl`` holds it: every object or list (``input``, ``source_files``,
    ``media``, ``media_mismatch``) as JSON text, and the timestamps always with microseconds.

    ``datasets`` reads JSON Lines in chunks of 10 MB and types every column from the first one:
    an object whose keys differ in a later chunk (``input`` across endpoints) failed the whole
    load ("Couldn't cast array of type struct<…> to …"), and so did a timestamp with
    microseconds after ones without (``isoformat()`` drops ``.000000``; pyarrow types the latter
    as ``timestamp[s]``). JSON text reads the same in every chunk (``json.loads`` it back)."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, dict | list):
            value = json.dumps(value, ensure_ascii=False, default=str)
        elif name in _TIME_FIELDS and isinstance(value, str):
            value = datetime.fromisoformat(value).isoformat(timespec="microseconds")
        out[name] = value
    return out


def _write_metadata(rows: Iterator[dict[str, Any]], folder: Path) -> None:
    """Write ``metadata.jsonl`` into ``folder``: :func:`metadata_row` of each row, a few rows first.

    ``datasets`` types a column from the file's first 10 MB chunk: one null there (``error`` of
    succeeded jobs, ``media_mismatch``, ``reused_from``, ``actual_prompt`` of another endpoint)
    is typed null, and a value in a later chunk failed the load ("Couldn't cast array of type
    string to null"); a seed above int64 in a later chunk failed it too (the first chunk's
    ``seed`` was int64). So the rows that first give each column a value (and the one with the
    largest seed, when one exceeds int64) come first, in their own order, then every other row
    in item order. The rows go to a scratch file first: only where those few start
    is held in memory (a row with an inline image is MBs)."""
    scratch = folder / ".metadata.unordered.jsonl"
    firsts: dict[str, int] = {}  # column → the first row with a value in it
    big_seed: tuple[int, int] | None = None  # (seed, row) of the largest seed above int64
    held: dict[int, int] = {}  # row → where its line starts in the scratch file (not the line:
    # a row with an inline image is MBs, and up to a row per column leads)
    count = 0
    with scratch.open("w", encoding="utf-8") as fh:
        for index, row in enumerate(rows):
            count += 1
            lead = False
            for name, value in row.items():
                if value is not None and name not in firsts:
                    firsts[name] = index
                    lead = True
            seed = row.get("seed")
            if isinstance(seed, int) and seed > _INT64_MAX and (big_seed is None or seed > big_seed[0]):
                if big_seed is not None and big_seed[1] not in firsts.values():
                    held.pop(big_seed[1], None)
                big_seed = (seed, index)
                lead = True
            if lead:
                held[index] = fh.tell()
            fh.write(json.dumps(metadata_row(row), ensure_ascii=False, default=str) + "\n")
    leads = set(firsts.values()) | ({big_seed[1]} if big_seed is not None else set())
    with (folder / "metadata.jsonl").open("w", encoding="utf-8") as out, scratch.open(encoding="utf-8") as fh:
        for index in sorted(leads):
            fh.seek(held[index])
            out.write(fh.readline())
        fh.seek(0)
        for index, line in enumerate(fh):
            if index not in leads:
                out.write(line)
    scratch.unlink()


def _exported_states(include_failed: bool) -> tuple[JobState, ...]:
    """The job states an ``hf`` export holds: succeeded, and failed and cancelled with ``include_failed``."""
    return TERMINAL_STATES if include_failed else TERMINAL_STATES[:1]


def _failed_of(counts: dict[str, int]) -> dict[str, int]:
    """The failed and cancelled jobs of ``counts`` (by state); only states with jobs."""
    return {s.value: counts[s.value] for s in TERMINAL_STATES[1:] if counts.get(s.value)}


def refuse_empty(batch: Batch, counts: dict[str, int], include_failed: bool) -> None:
    """:class:`UsageError` (exit 2, before anything is made) when the dataset would hold no row.

    A folder with an empty ``metadata.jsonl`` looks like a dataset and is none:
    ``datasets.load_dataset("json", …)`` fails on it (``StopIteration``). Said instead: what the
    batch's jobs are, and what would export them (``--include failed``, or the batch finishing)."""
    if any(counts.get(s.value) for s in _exported_states(include_failed)):
        return
    shown = by_state(counts) or "no jobs"
    why = "none has finished" if include_failed else "none succeeded"
    hints = []
    if not include_failed and _failed_of(counts):
        hints.append("`--include failed` exports the failed and cancelled ones (without videos)")
    if unfinished_of(counts):
        hints.append(f"export again once it has finished ({status_hint(batch)})")
    raise UsageError(
        f"batch {one_line(batch.name)} has nothing to export as a dataset: {why} ({shown}); "
        "nothing was written" + "".join(f"; {hint}" for hint in hints)
    )


def left_out_warnings(batch: Batch, left_out: dict[str, int]) -> list[str]:
    """What an ``hf`` export must say about the jobs it left out (``left_out``, by state): the
    dataset then holds part of the batch, and nothing in the folder's name says so."""
    warnings = []
    if unfinished := unfinished_of(left_out):
        warnings.append(
            f"batch {one_line(batch.name)} has not finished: {sum(unfinished.values())} job(s) "
            f"without a result yet are left out ({by_state(unfinished)}); export again once it has "
            f"finished ({status_hint(batch)})"
        )
    if failed := _failed_of(left_out):
        warnings.append(
            f"{sum(failed.values())} job(s) that ended without a video are left out "
            f"({by_state(failed)}): `--include failed` adds them (file_name null)"
        )
    return warnings


def _add_batch_cost(session: Session, batch: Batch, summary: HfExport) -> None:
    """What the whole batch was billed (every job, as ``cost`` reports it) into ``summary``."""
    total = cost_report(session, batch.id).total
    summary.batch_billed_usd = total.actual_usd
    summary.batch_billed_units = dict(total.actual_by_unit)
    summary.batch_possibly_billed_usd = total.possibly_billed_usd


def _refuse_taken(dest: Path) -> bool:
    """Whether ``dest`` is an existing empty folder (True) or missing (False), else
    :class:`UsageError`, before anything is made or fetched. An existing one may be reached
    through a symlink or be a mount point: the export is written into it (:func:`write_hf`). A
    symlink that leads nowhere is refused (the export would have to create its target, outside
    the path given), as is what cannot be looked at (a name too long for the file system, a
    folder without permission, a symlink loop), with the system's reason."""
    try:
        link = stat.S_ISLNK(dest.lstat().st_mode)
    except OSError as exc:
        if is_missing(exc):
            return False
        raise UsageError(f"cannot write the export to '{shown_path(dest)}': {os_reason(exc)}") from None
    except ValueError:  # a NUL in the path
        link = False
    kind: str | OSError = file_kind(dest)
    if link and isinstance(kind, OSError) and is_missing(kind):
        target = shown_path(dest.readlink())
        raise UsageError(
            f"cannot write the export to '{shown_path(dest)}': it is a symlink to '{target}', which does "
            "not exist; create that folder or choose another -o"
        )
    if kind == "folder":
        try:
            if _clear_stale_parts(dest):
                return True
        except OSError as exc:  # a folder it may not list
            kind = exc
    if isinstance(kind, OSError):
        raise UsageError(f"cannot write the export to '{shown_path(dest)}': {os_reason(kind)}")
    what = what_is(dest)
    if what:  # a file, a named pipe, …: "not an empty folder" read as if it were a folder
        raise UsageError(f"-o {str(dest)!r} is {what}, not a folder; choose a new folder (the export is one)")
    raise UsageError(f"-o {str(dest)!r} exists and is not an empty folder; choose a new folder")


#: The hidden folder an export into an existing DIR is built in, inside DIR (``tempfile``'s
#: random part between them), then :data:`~jobs.export.PART_SUFFIX`. An export that holds its
#: lock while it writes ends its name with :data:`~jobs.export.LOCKED_SUFFIX`
#: (``.wanbatch-export.RANDOM.locked.part``); one without may be an earlier version's, which
#: took no lock: it is removed only once untouched, every entry in it, for
#: :data:`~jobs.export.UNLOCKED_PART_AGE` (:func:`_take_stale`), as a single-file export's
#: temporary file is.
PART_PREFIX = ".wanbatch-export."


def _is_part(entry: os.DirEntry[str]) -> bool:
    """Whether ``entry`` is a part folder an export into its folder made (a real folder)."""
    return (
        entry.name.startswith(PART_PREFIX)
        and entry.name.endswith(PART_SUFFIX)
        and entry.is_dir(follow_symlinks=False)
    )


def _is_sibling_part(entry: os.DirEntry[str], dest: Path) -> bool:
    """Whether ``entry`` is a part folder an export into the new folder ``dest`` made beside it
    (a real folder): ``.DEST.RANDOM.locked.part``, or an earlier version's ``.DEST.RANDOM.part``."""
    pattern = re.escape(f".{dest.name}.") + RANDOM_PART + r"(?:\.locked)?\.part"
    return re.fullmatch(pattern, entry.name) is not None and entry.is_dir(follow_symlinks=False)


def _clear_stale_siblings(dest: Path) -> None:
    """Remove the part folders that exports into the new folder ``dest``, killed before they
    renamed theirs into place, left beside it (:func:`_is_sibling_part`): by the rules that clear
    stale ones inside an existing folder (:func:`_take_stale`): one nobody holds the lock of,
    named as taking one, is removed; one held is a running export's, and left alone; one of an
    earlier version's name (which took no lock) only once untouched for
    :data:`UNLOCKED_PART_AGE`. Nothing here refuses the export: what cannot be removed was never
    in its way (each export builds its own part folder), and stays for the user to judge."""
    try:
        with os.scandir(dest.parent) as entries:
            parts = [Path(entry.path) for entry in entries if _is_sibling_part(entry, dest)]
    except OSError:  # a folder it may not list: making the part folder there says why
        return
    for part in parts:
        _take_stale(part)


def _clear_stale_parts(dest: Path) -> bool:
    """Whether the existing folder ``dest`` is empty, once the part folders that exports which
    ended without finishing left in it (killed: nothing removed them) are removed.

    Each export into ``dest`` holds an exclusive ``flock`` on its part folder for as long as it
    writes (:func:`_part_inside`); the kernel drops it when that process ends, however. A part
    folder nobody holds is removed while this holds it (an export that made it a moment ago and
    is about to take it finds it gone and makes another) — when its name says its export takes
    the lock (:data:`LOCKED_SUFFIX`); one of an earlier version's name only once untouched for
    :data:`UNLOCKED_PART_AGE` (the first versions that wrote into ``dest`` took no lock: such an
    export may still be writing). One held is a running export's: :class:`UsageError`, nothing
    touched. One that cannot be locked or removed (a file system without ``flock``, no
    permission), or may be written to still, is named in the refusal, for the user to judge."""
    parts = []
    with os.scandir(dest) as entries:
        for entry in entries:  # stops at the first other entry: a full folder is not listed whole
            if not _is_part(entry):
                return False
            parts.append(entry)
    for entry in parts:
        state = _take_stale(Path(entry.path))
        if state == "held":
            raise UsageError(
                f"-o {str(dest)!r}: another export is writing into it now ({entry.name}); wait for it "
                "to finish or choose another folder"
            )
        if state != "removed":
            raise UsageError(
                f"-o {str(dest)!r} holds {entry.name}, an export's unfinished folder ({state}); remove "
                "it if no export is writing there, or choose another folder"
            )
    return True


def _take_stale(part: Path) -> str:
    """``"removed"`` when no export held ``part`` (removed meanwhile included), ``"held"`` when
    one does, else why it could not be told or removed: among those, a part folder without the
    lock record (:data:`LOCKED_SUFFIX`) changed within :data:`UNLOCKED_PART_AGE`
    (:func:`_unlocked_writer`)."""
    try:
        fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return "removed"
    except OSError as exc:
        return os_reason(exc)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "held"
        except OSError as exc:  # no flock here (some network file systems): cannot tell
            return f"cannot tell: {os_reason(exc)}"
        if writer := _unlocked_writer(part):
            return writer
        try:
            shutil.rmtree(part)
        except FileNotFoundError:
            pass
        except OSError as exc:
            return f"cannot remove it: {os_reason(exc)}"
        return "removed"
    finally:
        os.close(fd)


def _unlocked_writer(part: Path) -> str | None:
    """Why ``part``, a part folder nobody holds the lock of, may still be written to, else None.

    None when its name holds the lock record (:data:`LOCKED_SUFFIX`: its export held the lock
    from before it wrote anything, so it has ended), or when neither the folder nor anything in
    it changed for :data:`UNLOCKED_PART_AGE`. Else it may be an export of an earlier version,
    which took no lock, still writing (or a killed one's: the user may remove it)."""
    if part.name.endswith(LOCKED_SUFFIX):
        return None
    try:
        changed = _last_change(part, time.time() - UNLOCKED_PART_AGE)
    except FileNotFoundError:
        return None  # removed meanwhile
    except OSError as exc:
        return f"made by an earlier wanbatch, which takes no lock; cannot tell its age: {os_reason(exc)}"
    if changed is None:
        return None
    ago = max(0, round((time.time() - changed) / 60))
    hours = UNLOCKED_PART_AGE // 3600
    return (
        f"made by an earlier wanbatch, which takes no lock; changed {ago} min ago, "
        f"removed once untouched for {hours} hours"
    )


def _last_change(folder: Path, since: float) -> float | None:
    """The modification time of ``folder`` or of an entry under it (links not followed) at or
    after ``since``, the first found; None when none changed since then. An entry gone while
    it is looked at was changed now; :class:`FileNotFoundError` when ``folder`` itself is gone."""
    mtime = folder.lstat().st_mtime
    if mtime >= since:
        return mtime
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    info = entry.stat(follow_symlinks=False)
                    if info.st_mtime >= since:
                        return info.st_mtime
                    if stat.S_ISDIR(info.st_mode):
                        pending.append(Path(entry.path))
        except FileNotFoundError:
            return time.time()  # removed under this look (a folder, a file): its export is at work
    return None


def _part_inside(dest: Path) -> tuple[Path, int | None]:
    """A new hidden part folder inside ``dest``, locked (:func:`_locked_part`)."""
    return _locked_part(dest, PART_PREFIX)


def _locked_part(folder: Path, prefix: str) -> tuple[Path, int | None]:
    """A new hidden part folder in ``folder`` (``prefix``, tempfile's random part, then
    :data:`LOCKED_SUFFIX`) and the descriptor holding its exclusive ``flock`` (None where the
    file system has none: unheld, as before). The lock is taken after the folder is made, so a
    retry clearing stale ones (:func:`_clear_stale_parts`, :func:`_clear_stale_siblings`) may
    remove it in between: the folder at the path is checked to be the one locked, else another
    made."""
    for _ in range(8):
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=LOCKED_SUFFIX, dir=folder))
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a clearer holds it only for as long as it looks
        except OSError:
            os.close(fd)
            return tmp, None
        try:
            same = os.path.samestat(tmp.lstat(), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            return tmp, fd
        os.close(fd)
    raise OSError(errno.EAGAIN, "its part folder kept being removed by another export", str(folder))


def _refuse_another_writer(dest: Path, own: Path) -> None:
    """:class:`UsageError` when another export holds a part folder in ``dest`` besides ``own``:
    two exports that found ``dest`` empty at the same moment. Each checks after taking its own
    lock, so at most one of them goes on (both stop when both hold theirs by then). One of an
    earlier version, which takes no lock, stops this one as long as it may be writing
    (:func:`_unlocked_writer`)."""
    with os.scandir(dest) as entries:
        others = [Path(e.path) for e in entries if _is_part(e) and e.name != own.name]
    for part in others:
        if _held(part):
            raise UsageError(
                f"-o {str(dest)!r}: another export is writing into it now ({part.name}); wait for it "
                "to finish or choose another folder"
            )
        if writer := _unlocked_writer(part):
            raise UsageError(
                f"-o {str(dest)!r}: another export may be writing into it now ({part.name}, {writer}); "
                "wait for it to finish or choose another folder"
            )


def _held(part: Path) -> bool:
    """Whether an export holds ``part``'s lock now (looked at without holding it)."""
    try:
        fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops a lock just taken
    return False


def _folder_bytes(folder: Path) -> int:
    """The bytes of the regular files under ``folder`` (links are not followed; export makes none)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            info = (Path(root) / name).lstat()
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def _missing_folders(folder: Path) -> list[Path]:
    """The folders of ``folder``'s chain that do not exist yet, deepest first: what creating it makes."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed export created (deepest first), each only while empty."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            return
