"""Where ``export -o`` may not write: wanbatch's own files.

An export renames its finished file over ``-o`` (or, for ``hf``, fills the folder ``-o``), so a
path that happens to name one of wanbatch's files replaced it: ``-o wanbatch.db`` left a JSON
Lines file where the database was (every later command failed "file is not a database"), ``-o``
a stored video broke the batch's outputs, ``-o`` the manifest's ``items_from`` file its rows.
:func:`refuse_own_file` refuses such a path before anything is written, for every format.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.orm import Session

from jobs import store
from jobs.dataset_export import items_from_of
from jobs.db import sqlite_file
from jobs.errors import UsageError
from jobs.fs import shown_path
from jobs.media import MediaKind, classify
from jobs.models import Batch
from jobs.output_location import is_s3_url
from jobs.printable import one_line

#: What SQLite keeps beside a database file (WAL mode's log and index, a rollback journal).
SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal")


#: ``scheme://``: a URI (``s3://bucket/ds``, ``hf://datasets/…``, ``file:///…``), not a file name.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def refuse_uri(given: str) -> None:
    """:class:`UsageError` (one line) when ``-o`` as typed is a URI: an export writes a local
    file or folder only, and ``s3://bucket/ds`` taken as a path became a folder ``./s3:/bucket/ds``
    (the ``//`` collapsed) while the export reported success."""
    if _URI.match(given):
        raise UsageError(
            f"-o takes a local path; {given!r} is a URI, and an export writes no remote destination: "
            "export to a local file or folder, then copy it (e.g. with `aws s3 cp`)"
        )


def _resolved(path: Path | str) -> Path | None:
    """``path`` absolute (from the working folder), ``~`` expanded, symlinks followed as far as
    they exist; None for one that cannot be (a loop, too long a name)."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def refuse_own_file(
    session: Session, output: Path, batch: Batch, *, database_url: str, output_dir: Path
) -> None:
    """:class:`UsageError` (one line, nothing written) when ``output`` (an export's ``-o``, a file
    or an ``hf`` folder) is one of wanbatch's own files: the SQLite database of ``database_url``
    or its ``-wal``/``-shm``/``-journal`` file, anything inside ``output_dir`` (the stored outputs,
    or an S3 location's local staging folder), ``batch``'s manifest, its ``items_from`` file or
    a media file one of its jobs names, or anything inside a folder its jobs' videos and sidecars
    are stored in (as recorded for them: ``output_dir`` is the setting as this command sees it,
    which a relative ``./outputs`` or a changed setting makes another folder). Beside them is
    fine."""
    target = _resolved(output)
    if target is None:  # the writer says what is wrong with it
        return
    shown = shown_path(output)
    database = sqlite_file(database_url)
    if database is not None:
        for suffix in SQLITE_COMPANIONS:
            if target == _resolved(str(database.path) + suffix):
                what = "wanbatch's database" + (f" ({suffix.lstrip('-')} file)" if suffix else "")
                raise UsageError(f"{shown}: this is {what}; choose another path for the export")
    outputs = _resolved(output_dir)
    if outputs is not None and (target == outputs or outputs in target.parents):
        raise UsageError(
            f"{shown}: this is inside WANBATCH_OUTPUT_DIR ({shown_path(outputs)}), where wanbatch "
            "keeps the videos; choose another path for the export"
        )
    for path, what in _batch_files(session, batch):
        if target == _resolved(path):
            raise UsageError(
                f"{shown}: this is {what} of batch {one_line(batch.name)}; choose another path for the export"
            )
    for folder in _output_folders(session, batch):
        if target == folder or folder in target.parents:
            where = "the folder" if target == folder else "inside the folder"
            raise UsageError(
                f"{shown}: this is {where} where batch {one_line(batch.name)} stores its videos and "
                f"their sidecars ({shown_path(folder)}); choose another path for the export"
            )


def _output_folders(session: Session, batch: Batch) -> Iterator[Path]:
    """The local folders ``batch``'s jobs recorded their outputs in, as recorded (absolute) and
    with symlinks followed as they are now; none for outputs in S3."""
    for recorded in store.output_folders_of_batch(session, batch.id):
        if not recorded or is_s3_url(recorded) or not Path(recorded).is_absolute():
            continue
        yield Path(recorded)
        resolved = _resolved(recorded)
        if resolved is not None and resolved != Path(recorded):
            yield resolved


def _batch_files(session: Session, batch: Batch) -> Iterator[tuple[Path, str]]:
    """The files ``batch`` was made from, absolute: its manifest, the ``items_from`` file the
    manifest names (stored text, else the file as it is now), and the local media its jobs name."""
    manifest = Path(batch.manifest_path)
    yield manifest, "the manifest"
    text = batch.manifest_text
    if text is None:
        try:
            text = manifest.read_text(encoding="utf-8-sig", errors="replace")
        except OSError:
            text = None
    rows = items_from_of(text)
    folders = [manifest.parent]
    if rows is not None:
        rows_path = manifest.parent / Path(rows).expanduser()
        folders.append(rows_path.parent)
        yield rows_path, "the items_from file"
    for given, sources in store.media_inputs_of_batch(session, batch.id):
        for name, source in sources.items():
            value = given.get(name)
            if isinstance(value, str) and classify(value) is MediaKind.PATH and Path(value).is_absolute():
                yield Path(value), f"a source file ({name})"
            written = source.get("source") if isinstance(source, dict) else None
            if isinstance(written, str) and classify(written) is MediaKind.PATH:
                for folder in folders:  # as the manifest or an items_from row named it
                    yield folder / Path(written).expanduser(), f"a source file ({name})"
