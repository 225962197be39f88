"""The checks that need the whole manifest rather than one value: duplicates and confinement.

- A YAML key written twice in one mapping is an error at its second line (the loader keeps
  both lines); identical jobs collapse to one, with a warning naming the first item. Jobs whose
  keys differ only because one writes out an endpoint default another leaves out stay two jobs
  (the key is what was written), with one warning per group (:class:`DefaultedDuplicates`).
- Local media paths become absolute, relative to the manifest's folder wherever they were
  written (an ``items_from`` row's own values fall back to that file's folder only when the
  manifest's has no such file: :mod:`jobs.manifest.row_paths`), with ``~``, ``..`` and symlinks
  resolved; a path that leads outside the allowed folders is a located error and its file is
  never read.

Per-value checks (types, ranges, media formats) live in :mod:`jobs.validation`.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from jobs.endpoints import EndpointSpec, get_endpoint
from jobs.errors import Issue
from jobs.fs import shown_in_folder, shown_path
from jobs.manifest.keys import endpoint_defaults, job_key, resolvable_fields, written_defaults
from jobs.manifest.model import JobSpec, RawItem
from jobs.manifest.row_paths import BOTH_ALLOWED, PathCache, choose
from jobs.media import OUTSIDE_ALLOWED, LocalPath, MediaKind, classify, representable
from jobs.printable import quoted
from jobs.yaml_lines import LList, LMap


def duplicate_key_issues(root: LMap, duplicates: list[tuple[str, int, int]], display: str) -> Iterator[Issue]:
    """An error for each key written twice in one mapping, at its second line."""
    for key, first, second in duplicates:
        yield Issue(
            file=display,
            line=second,
            item=_item_at(root, second),
            field=key,
            message=f"duplicate key {quoted(key)} (first at line {first}, again at line {second})",
            allowed="each key once per mapping",
        )


def _item_at(root: LMap, line: int) -> int | None:
    """The index of the inline item that contains ``line`` (for duplicate-key messages)."""
    items = root.get("items")
    if not isinstance(items, LList) or not items.lines:
        return None
    after = [ln for k, ln in root.key_lines.items() if k != "items" and ln > items.line]
    if line < items.lines[0] or (after and line >= min(after)):
        return None
    return bisect.bisect_right(items.lines, line) - 1


class DuplicateJobs:
    """Remembers every job key of one pass, to drop (with a warning) a job seen before."""

    def __init__(self, source_of: Callable[[int], str]) -> None:
        self._source_of = source_of
        # digest -> item_index << 32 | line: ~140 bytes a job instead of ~270 with hex keys and
        # tuples, which keeps a million-job manifest's duplicate check near 130 MB (bench/RESULTS.md).
        self._seen: dict[bytes, int] = {}

    def warning(self, job: JobSpec) -> Issue | None:
        """The warning for a job identical to an earlier one; None (and remembered) otherwise."""
        digest = bytes.fromhex(job.key)
        packed = self._seen.get(digest)
        if packed is None:
            self._seen[digest] = job.item_index << 32 | (job.line or 0)
            return None
        first_index, first_line = packed >> 32, packed & 0xFFFFFFFF
        return Issue(
            file=job.source,
            line=job.line,
            item=job.item_index,
            field=None,
            message=(
                f"identical to the job of item {first_index} "
                f"({self._source_of(first_index)}:{first_line or None})"
                f"{_matrix_text(job.matrix)}; it runs once"
            ),
            severity="warning",
        )


#: One 32-bit field of a packed :class:`_Member`.
_MASK = 0xFFFFFFFF


class _Member(NamedTuple):
    """A job of a :class:`DefaultedDuplicates` group: the defaults it writes out, and where it is."""

    written: frozenset[str]
    variant: int
    item_index: int
    line: int | None


class DefaultedDuplicates:
    """Jobs of one pass that ask the same once the endpoint's documented defaults are filled in,
    though their keys differ: one writes out a default (``resolution: 720p``) another leaves out.
    Both are sent and billed, for the same video; the keys stay as written (they are stored), so
    this is a warning, one per group, said at the end of the pass.

    Only jobs that pin their seed (or whose endpoint has none) are compared: without one, fal
    picks a seed per request and the two are different requests. Jobs are grouped by the key of
    their input with its default-valued fields left out: the same grouping as by the input with
    the defaults filled in (:func:`jobs.manifest.keys.with_defaults` adds the same values to
    both), and a job that writes out no default keeps its own key, so most jobs cost no second
    hash. Jobs with identical keys never get here (:class:`DuplicateJobs` drops them first)."""

    def __init__(self, source_of: Callable[[int], str], matrix_of: Callable[[int], dict[str, Any]]) -> None:
        self._source_of = source_of
        self._matrix_of = matrix_of
        # key digest -> the first job with that key, packed into one int (:meth:`_pack`): a
        # _Member and a frozenset per job were about 500 bytes, half a gigabyte for a
        # million-job sweep that pins its seeds (bench/RESULTS.md, manifest_scale).
        self._first: dict[bytes, int] = {}
        # The distinct sets of written-out defaults (a manifest has a handful), by number.
        self._written: list[frozenset[str]] = []
        self._written_ids: dict[frozenset[str], int] = {}
        # key digest -> (endpoint, every job with that key), for keys seen more than once
        self._groups: dict[bytes, tuple[str, list[_Member]]] = {}

    def _pack(self, member: _Member) -> int:
        """``member`` as one int: its set of defaults by number, variant, item and line."""
        written = self._written_ids.get(member.written)
        if written is None:
            written = self._written_ids[member.written] = len(self._written)
            self._written.append(member.written)
        return ((written << 32 | member.variant) << 32 | member.item_index) << 32 | (member.line or 0)

    def _unpack(self, packed: int) -> _Member:
        line, packed = packed & _MASK, packed >> 32
        item_index, packed = packed & _MASK, packed >> 32
        variant, written = packed & _MASK, packed >> 32
        return _Member(self._written[written], variant, item_index, line or None)

    def add(self, job: JobSpec, digests: dict[str, str | None]) -> None:
        """Remember a job kept by the pass (not a collapsed duplicate)."""
        if job.refused:  # an error already; its key holds an unread path
            return
        spec = get_endpoint(job.endpoint)
        if spec.field("seed") is not None and "seed" not in job.input:
            return
        written = written_defaults(job.endpoint, job.input)
        key = job.key
        if written:
            key = job_key(spec, {k: v for k, v in job.input.items() if k not in written}, digests)
        member = _Member(frozenset(written), job.variant, job.item_index, job.line)
        digest = bytes.fromhex(key)
        first = self._first.get(digest)
        if first is None:
            self._first[digest] = self._pack(member)
            return
        self._groups.setdefault(digest, (job.endpoint, [self._unpack(first)]))[1].append(member)

    def warnings(self) -> Iterator[Issue]:
        """One warning per group, at its second job, naming every job and the defaults that make
        the only difference."""
        for endpoint, members in self._groups.values():
            some = frozenset().union(*(m.written for m in members))
            every = frozenset.intersection(*(m.written for m in members))
            differ = ", ".join(
                f"{name}: {_shown(value)}"
                for name, value in endpoint_defaults(endpoint).items()
                if name in some - every
            )
            second = members[1]
            item, line = second.item_index, second.line
            matrix = _matrix_text(self._matrix_of(second.variant)).lstrip()
            also = [self._named(member) for member in members[2:]]
            as_do = f", as {'does' if len(also) == 1 else 'do'} {', '.join(also)}" if also else ""
            yield Issue(
                file=self._source_of(item),
                line=line or None,
                item=item,
                field=None,
                message=(
                    f"{matrix + ', ' if matrix else ''}asks what {self._named(members[0])} asks"
                    f"{as_do}, once the endpoint's defaults "
                    f"are filled in: they differ only by {differ} (the endpoint's defaults); "
                    f"{f'all {len(members)}' if also else 'both'} are sent and billed and should render "
                    f"the same video; drop {'all but one' if also else 'one'}, or leave the default out"
                ),
                severity="warning",
            )

    def _named(self, member: _Member) -> str:
        """``item 0 (m.yaml:4) with resolution='720p'``, as the collapse warning names items."""
        item, matrix = member.item_index, _matrix_text(self._matrix_of(member.variant))
        return f"item {item} ({self._source_of(item)}:{member.line or None}){matrix}"


def _shown(value: object) -> str:
    """A default's value as written in YAML (``720p``, ``81``, ``true``), a long text cut short.

    A text YAML would not read back as that text is quoted: an empty default (Wan 2.6's
    ``negative_prompt``) printed as ``negative_prompt:`` and a blank, and ``duration: 5`` reads
    as a number where the default is the text ``"5"``.
    """
    if not isinstance(value, str):
        text = json.dumps(value)
    else:
        try:
            plain = yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        text = value if plain else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:39] + "…"


def _matrix_text(matrix: Mapping[str, Any]) -> str:
    if not matrix:
        return ""
    # Each value as an error quotes it (shortened: a matrix value may be a 100 KB prompt).
    return " with " + ", ".join(f"{k}={quoted(v)}" for k, v in matrix.items())


def outside_message(value: object, local: LocalPath) -> str:
    """Why a local path (``local``, from :func:`~jobs.media.resolve_local`) is refused as outside
    the allowed folders, from nothing outside them: the value as written and its lexical form,
    or, when it is written inside and a symbolic link there leads out, just that. Never where
    the link points nor where the path really leads, and the same whether the refused file
    exists or not (the message must not tell a shared manifest's author about private files)."""
    if local.via_link:
        return f"{quoted(value)} leads outside the manifest's folder through a symbolic link"
    if str(value) == local.written:
        return f"{quoted(value)} is outside the manifest's folder"
    return f"{quoted(value)} is {shown_path(local.written)}, outside the manifest's folder"


class Resolved(NamedTuple):
    """A job's input with its local paths made real (:func:`resolve_input`), and what the
    resolution found wrong or worth a word, each by media field."""

    input: dict[str, Any]
    #: Paths outside the allowed folders, each with why (:func:`outside_message`).
    outside: dict[str, str]
    #: An ``items_from`` row's paths found only beside its file: each spelled relative to the
    #: manifest's folder (:mod:`jobs.manifest.row_paths`).
    fell_back: dict[str, str]
    #: An ``items_from`` row's paths naming two different files: each with the error's words.
    both: dict[str, str]


def resolve_input(
    spec: EndpointSpec,
    values: dict[str, Any],
    base_dir: Path | str,
    roots: tuple[str, ...],
    paths: PathCache,
    row_dirs: Mapping[str, Path] | None = None,
) -> Resolved:
    """The input with local paths made real, and what that found (:class:`Resolved`).

    A relative path is relative to the manifest's folder ``base_dir``, wherever it was written.
    A value an ``items_from`` row sets itself (its field in ``row_dirs``, with the row's file's
    folder) falls back to that folder only when the manifest's has no such file, and is an
    error when both have one and they differ (:func:`jobs.manifest.row_paths.choose`). Either
    way it must land inside ``roots``. ``null`` values are dropped; an integer given for a text
    enum of numbers (``duration: 5``) becomes that text. ``paths`` caches resolutions for one
    pass. A value holding a NUL, or one the file-system encoding cannot hold, is left as
    written (validation refuses it; the OS would raise on it). ``base_dir`` may be given as text
    (a pass over many jobs spells it once).
    """
    out: dict[str, Any] = {}
    outside: dict[str, str] = {}
    fell_back: dict[str, str] = {}
    both: dict[str, str] = {}
    resolvable = resolvable_fields(spec.id)  # once per job, not once per field
    folder = str(base_dir)
    for key, value in values.items():
        if value is None:
            continue
        fld = spec.field(key) if key in resolvable else None
        if fld is not None:
            if fld.media is not None:
                if (
                    isinstance(value, str)
                    and value.strip()
                    and "\0" not in value
                    and classify(value) is MediaKind.PATH
                    and representable(value)
                ):
                    row_dir = (row_dirs or {}).get(key)
                    if row_dir is None:
                        local = paths.resolve(value, folder, roots)
                    else:
                        chosen = choose(value, folder, str(row_dir), roots, paths)
                        local = chosen.local
                        if chosen.fell_back is not None:
                            fell_back[key] = chosen.fell_back
                        if chosen.both is not None:
                            both[key] = chosen.both
                    if not local.inside:
                        outside[key] = outside_message(value, local)
                    value = local.path
            elif type(value) is int and str(value) in {str(v) for v in fld.enum or ()}:
                value = str(value)
        out[key] = value
    return Resolved(out, outside, fell_back, both)


def both_issues(
    raw: RawItem,
    values: Mapping[str, Any],
    both: Mapping[str, str],
    origins: Mapping[str, tuple[str, int | None]],
) -> Iterator[Issue]:
    """An error for each row path naming two different files, where it was written."""
    return _path_issues(raw, values, both, origins, BOTH_ALLOWED)


def _path_issues(
    raw: RawItem,
    values: Mapping[str, Any],
    problems: Mapping[str, str],
    origins: Mapping[str, tuple[str, int | None]],
    allowed: str,
) -> Iterator[Issue]:
    """An error for each field of ``problems`` (field -> message), located where its value was
    written (``origins``: a default's line, a matrix's, else the item's own)."""
    for key, message in problems.items():
        where = origins.get(key, (raw.source, raw.line))
        yield Issue(
            file=where[0],
            line=where[1],
            item=raw.index,
            field=key,
            message=message,
            value=values[key],
            allowed=allowed,
        )


#: What a job of a storing pass is told when it names a local file validation did not read.
UNCHECKED_ALLOWED = (
    "a manifest, its items_from file and its images left as they are while submit runs: submit again"
)


def unchecked_issues(
    raw: RawItem,
    spec: EndpointSpec,
    values: Mapping[str, Any],
    resolved: Mapping[str, Any],
    refused: Mapping[str, str],
    origins: Mapping[str, tuple[str, int | None]],
    checked: Mapping[str, str],
    folder: Path,
) -> Iterator[Issue]:
    """An error for each local file of a job, in the pass that stores a validated manifest's
    jobs, that its validation did not check (``checked``, :attr:`Manifest.checked`).

    That pass resolves the paths and reads the ``items_from`` rows again: a symlink pointed
    elsewhere, or a row rewritten, since validation names a file no check read. Hashed then from
    a fresh read, its bytes were recorded as if checked, and the worker, finding the bytes it
    recorded, sent them (a truncated image, for fal to refuse and bill). Such a job is refused
    before its file is read; a path outside the allowed folders (``refused``) is said apart."""
    for fld in spec.media_fields:
        value = resolved.get(fld.name)
        if not isinstance(value, str) or fld.name in refused or "\0" in value:
            continue
        if classify(value) is not MediaKind.PATH or value in checked:
            continue
        written = values.get(fld.name)
        name = shown_path(str(written))
        now = shown_in_folder(value, folder)
        where = origins.get(fld.name, (raw.source, raw.line))
        yield Issue(
            file=where[0],
            line=where[1],
            item=raw.index,
            field=fld.name,
            message=(
                f"{name}{'' if now == name else f' (now {now})'} was not checked by this submit's "
                "validation: the file, a symlink or the manifest's rows changed while submit ran; "
                "nothing is stored"
            ),
            value=written,
            allowed=UNCHECKED_ALLOWED,
        )


def outside_issues(
    raw: RawItem,
    values: Mapping[str, Any],
    outside: Mapping[str, str],
    origins: Mapping[str, tuple[str, int | None]],
) -> Iterator[Issue]:
    """An error for each media path that leads outside the allowed folders, where it was written."""
    return _path_issues(raw, values, outside, origins, OUTSIDE_ALLOWED)
