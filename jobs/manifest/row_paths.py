"""Which file an ``items_from`` row's relative local path names.

The contract says a local path is relative to the manifest, and it is, for a row of an
``items_from`` file too: ``data/rows.jsonl``'s ``"image_url": "images/a.png"`` is
``images/a.png`` beside the manifest. wanbatch once read it relative to the row's own file
(``data/images/a.png``), and its README said so; a project laid out that way must not stop
working, nor (worse) start sending another image without a word. So a row's own relative path
(:func:`choose`) is:

- the manifest's file, when it is there (or when the row's folder has none);
- the file beside the items file, when only that one exists: kept, so a project that followed
  the old README still runs, with one warning per items file (:class:`RowFallbacks`) naming the
  rule and how to write the path instead; its ``source_files`` and messages spell it relative to
  the manifest (``data/images/a.png``), so what a record says is what the contract reads;
- an error naming both, when both exist and hold different bytes: which one the user meant
  cannot be known, and either guess pays for a video of an image they may not have meant.
  Two paths holding the same bytes are one input (a job's key is its bytes), so the manifest's
  is taken.

Either base is confined alike (:func:`jobs.media.resolve_local`, symlinks followed): a candidate
outside the allowed folders is never looked at, so neither the choice nor a message depends on
a file outside them. A path the manifest's folder leads out of through a symbolic link is
refused as such, never passed over for the row's folder; so is one the manifest's folder lacks
whose link beside the items file leads out (not "file not found" of a file the user sees).
"""

from __future__ import annotations

import filecmp
import os
from dataclasses import dataclass, field
from pathlib import Path

from jobs.errors import Issue
from jobs.fs import shown_path
from jobs.media import LocalPath, resolve_local
from jobs.printable import quoted

#: What a row's path that names two different files is told is allowed.
BOTH_ALLOWED = (
    "one file for the path: a row's local path is relative to the manifest's folder; "
    "remove or rename one of the two, or write the other's path relative to the manifest's folder"
)


@dataclass(frozen=True, slots=True)
class RowPath:
    """The file a row's path was taken to name, and how it was chosen."""

    local: LocalPath
    #: Found only beside the items file: the path spelled relative to the manifest's folder
    #: (:func:`spelled`); else None.
    fell_back: str | None = None
    #: Both files exist and differ: the one-line error; else None.
    both: str | None = None


@dataclass(slots=True)
class PathCache:
    """One pass's resolutions: each (folder, value) resolved once, each row path chosen once
    (a stat or two, and for two existing files a byte comparison, not one per matrix job)."""

    local: dict[tuple[str, str], LocalPath] = field(default_factory=dict)
    rows: dict[tuple[str, str, str], RowPath] = field(default_factory=dict)

    def resolve(self, value: str, folder: str, roots: tuple[str, ...]) -> LocalPath:
        """``value`` resolved from ``folder`` (:func:`jobs.media.resolve_local`), once a pass."""
        mark = (folder, value)
        local = self.local.get(mark)
        if local is None:
            local = self.local[mark] = resolve_local(value, folder, roots)
        return local


def _present(local: LocalPath) -> bool:
    """Whether an allowed candidate names something that exists (never asked of one outside)."""
    return local.inside and Path(local.path).exists()


def _same_bytes(a: str, b: str) -> bool:
    """Whether two existing paths are regular files of the same bytes (a folder, a FIFO or an
    unreadable file is no match: reading a FIFO would block, and the user must say which)."""
    if not (Path(a).is_file() and Path(b).is_file()):
        return False
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _absolute(value: str) -> bool:
    """Whether ``value`` names one place whatever folder it is read from (``/x``, ``~/x``)."""
    try:
        return Path(value).expanduser().is_absolute()
    except RuntimeError:  # "~user" with no such user: taken literally, as resolve_local does
        return Path(value).is_absolute()


def spelled(value: str, row_dir: str, base_dir: str) -> str:
    """``value`` read from ``row_dir``, spelled relative to the manifest's folder ``base_dir``
    (``images/a.png`` from ``data/`` is ``data/images/a.png``; from an ``--allow-dir`` folder
    beside it, ``../shared/images/a.png``): what the user would write in the manifest, never
    an absolute path of this machine. Lexical past the two folders' real places: a symlink in
    ``value`` stays as written."""
    lexical = os.path.normpath(Path(os.path.realpath(row_dir)) / value)
    return os.path.relpath(lexical, os.path.realpath(base_dir))


def choose(value: str, base_dir: str, row_dir: str, roots: tuple[str, ...], cache: PathCache) -> RowPath:
    """The file a row's own relative path names (see the module's docstring): the manifest's,
    else the one beside the items file in ``row_dir``, else an error when both differ."""
    mark = (base_dir, row_dir, value)
    chosen = cache.rows.get(mark)
    if chosen is None:
        chosen = cache.rows[mark] = _choose(value, base_dir, row_dir, roots, cache)
    return chosen


def _choose(value: str, base_dir: str, row_dir: str, roots: tuple[str, ...], cache: PathCache) -> RowPath:
    mine = cache.resolve(value, base_dir, roots)
    if _absolute(value):
        return RowPath(mine)
    theirs = cache.resolve(value, row_dir, roots)
    if theirs.path == mine.path:
        return RowPath(mine)
    if not _present(theirs):
        if mine.inside and not _present(mine) and not theirs.inside and theirs.via_link:
            # Nothing in the manifest's folder, and beside the items file a symbolic link that
            # leads out: refused as such (with --allow-dir's hint), not "file not found".
            return RowPath(theirs)
        return RowPath(mine)
    beside = spelled(value, row_dir, base_dir)
    if _present(mine):
        if _same_bytes(mine.path, theirs.path):
            return RowPath(mine)
        here = os.path.normpath(value)
        message = (
            f"{quoted(value)} names two different files: {shown_path(here)} in the manifest's "
            f"folder (a row's path is relative to it) and {shown_path(beside)} beside this items "
            "file (where wanbatch looked before); which one is meant cannot be told: neither is sent"
        )
        return RowPath(mine, both=message)
    if not mine.inside and mine.via_link:  # the manifest's own path leads out: refused as such
        return RowPath(mine)
    return RowPath(theirs, fell_back=beside)


@dataclass(frozen=True, slots=True)
class _Fallback:
    """Where the first row value read from beside its items file was written, and as what."""

    file: str
    line: int | None
    item: int
    field: str
    value: str
    spelled: str


@dataclass(slots=True)
class RowFallbacks:
    """The row paths of one pass found only beside the items file: said once per items file, at
    the first such value, with how many there were (a warning per row would bury the rest)."""

    count: int = 0
    first: _Fallback | None = None

    def add(self, file: str, line: int | None, item: int, fld: str, value: str, spelled: str) -> None:
        """One more row value read from beside its items file, written at ``file:line``."""
        self.count += 1
        if self.first is None:
            self.first = _Fallback(file, line, item, fld, value, spelled)

    def warnings(self) -> list[Issue]:
        """The one warning of the pass, or none."""
        first = self.first
        if first is None:
            return []
        others = "" if self.count == 1 else f" (and {self.count - 1:,} more value(s) of this file)"
        message = (
            f"{quoted(first.value)} is not in the manifest's folder: read as {shown_path(first.spelled)}, "
            f"beside the items file{others}; a row's local path is relative to the manifest's folder, "
            "and this old reading is kept only while the manifest's folder has no such file"
        )
        allowed = f"the path relative to the manifest's folder, {shown_path(first.spelled)}"
        return [
            Issue(
                file=first.file,
                line=first.line,
                item=first.item,
                field=first.field,
                message=message,
                value=first.value,
                allowed=allowed,
                severity="warning",
            )
        ]
