"""A parsed manifest, and the stream of jobs it expands to.

:class:`Manifest` holds the top level only (cheap to build); :meth:`Manifest.jobs` reads the
items and the ``items_from`` rows as it goes and yields each job of each matrix combination, so a
100,000-row file is never held in memory. The resolution order is in :mod:`jobs.manifest`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from jobs.endpoints import EndpointSpec, get_endpoint, known_endpoint_ids
from jobs.errors import TOO_MANY_JOBS, TOO_MUCH_INPUT, Issue, ItemsFileChanged, ManifestError, did_you_mean
from jobs.fs import file_kind, os_reason, shown_path
from jobs.manifest.checks import (
    DefaultedDuplicates,
    DuplicateJobs,
    both_issues,
    outside_issues,
    resolve_input,
    unchecked_issues,
)
from jobs.manifest.fal_key import row_key_issues
from jobs.manifest.items_from import InputBudget, ItemsFile, ItemsRead, RowLimit, csv_value, read_items
from jobs.manifest.keys import job_key
from jobs.manifest.model import JobSpec, RawItem, describe, error_count
from jobs.manifest.row_paths import PathCache, RowFallbacks
from jobs.manifest.sources import source_files
from jobs.printable import quoted, size_text
from jobs.schedule import Schedule
from jobs.validation import Location, validate_input
from jobs.yaml_lines import LList, LMap

#: Most jobs one manifest may expand to (items × matrix).
MAX_JOBS = 1_000_000


def too_many_jobs_message() -> str:
    """What a manifest over :data:`MAX_JOBS` is told, whether found up front or while streaming."""
    return f"the manifest expands to more than {MAX_JOBS:,} jobs; split it"


def jobs_allowed() -> str:
    """What a manifest over :data:`MAX_JOBS` is told is allowed."""
    return f"at most {MAX_JOBS:,} jobs per manifest"


#: Most input all of one manifest's jobs may store: the values they send, summed over every job
#: (a 1 MiB prompt swept over 10,000 seeds is 10 GB, which ``submit`` held and wrote to the
#: database as 10,000 copies). Generous: a million jobs of 2 kB each (Wan 2.5 and 2.6 take
#: prompts of at most 800 characters); and it bounds what one pass hashes (each job's key) to
#: about half a minute. Counted before anything is expanded, from the matrix and the items
#: (:meth:`Manifest.input_size_floor`), then row by row for an ``items_from`` file
#: (:class:`~jobs.manifest.items_from.InputBudget`).
MAX_INPUT_BYTES = 2 * 10**9


def input_allowed() -> str:
    """What a manifest over :data:`MAX_INPUT_BYTES` is told is allowed."""
    return (
        f"at most {size_text(MAX_INPUT_BYTES)} of input over all the manifest's jobs: a local file "
        "counts as its path, not its bytes"
    )


@functools.lru_cache(maxsize=256)
def _text_bytes(text: str) -> int:
    """The UTF-8 bytes of a text that is not ASCII (a prompt in Chinese is three bytes a
    character), counted once per text: a YAML alias repeats the very same string, found here by
    its cached hash and identity, not encoded again."""
    return len(text.encode("utf-8", "surrogatepass"))


def value_size(value: object) -> int:
    """About the bytes ``value`` takes in a job's stored input: text by its UTF-8 bytes, as an
    ``items_from`` row's line is counted (its length for ASCII, known at once; counting
    characters let 1,000,000 Chinese characters × 1,500 seeds, 4.5 GB, pass as 1.5 GB), a list
    or a mapping by its members', anything else a few bytes."""
    if isinstance(value, str):
        return (len(value) if value.isascii() else _text_bytes(value)) + 2
    if isinstance(value, dict):
        return 2 + sum(value_size(key) + value_size(member) + 2 for key, member in value.items())
    if isinstance(value, list):
        return 2 + sum(value_size(member) + 1 for member in value)
    return 8


#: What an error of a value the matrix overrides adds: why it is an error all the same.
_STILL_CHECKED = "but a value written here is checked all the same"


def _unread_media(spec: EndpointSpec, key: str, value: object) -> bool:
    """Whether ``value`` is text for a media field: a file or URL that, overridden by the matrix,
    is never sent, so it is neither read nor confined (a value of another kind is still wrong)."""
    fld = spec.field(key)
    return fld is not None and fld.media is not None and isinstance(value, str)


#: One matrix combination: (field, value, line of the value) for each matrix field.
Combo = tuple[tuple[str, Any, int], ...]


class _Combos:
    """The matrix combinations, produced on each iteration rather than held: a large matrix
    is never materialised (its size is checked first, from the axis lengths alone)."""

    def __init__(self, axes: list[list[tuple[str, Any, int]]]) -> None:
        self._axes = axes

    def __iter__(self) -> Iterator[Combo]:
        return iter(itertools.product(*self._axes))  # no axes: one empty combination


@dataclass
class Manifest:
    """The parsed top level of a manifest. Cheap to build: ``items_from`` is read by :meth:`jobs`."""

    path: Path
    display: str
    name: str
    endpoint: str | None
    budget_max_usd: Decimal | None
    sha256: str
    description: str | None = None
    #: The manifest file's text as read (stored on the batch as provenance at submit).
    text: str | None = None
    defaults: LMap = field(default_factory=lambda: LMap(1))
    matrix: dict[str, LList] = field(default_factory=dict)
    items: LList = field(default_factory=lambda: LList(1))
    items_from: Path | None = None
    items_from_display: str | None = None
    #: ``items_from`` as the manifest wrote it: how a message about the file names it.
    items_from_written: str | None = None
    #: The manifest line of ``items_from:`` (where an empty file is reported).
    items_from_line: int | None = None
    #: Top-level issues found while parsing (errors and warnings).
    issues: list[Issue] = field(default_factory=list)
    #: False when the top-level endpoint is unknown (reported once, not once per item).
    endpoint_known: bool = True
    #: Folders local files may come from, resolved: the manifest's own first, then the ones the
    #: user allowed (``--allow-dir``, ``WANBATCH_ALLOWED_INPUT_DIRS``).
    roots: tuple[str, ...] = ()
    #: When the batch may send (``schedule:``); the empty schedule (always open) when absent.
    schedule: Schedule = field(default_factory=Schedule)
    #: fal queue priority of every job (``priority:``): "normal" or "low".
    priority: str = "normal"
    #: ``reuse_outputs:``: a pinned-seed job equal to an already succeeded one takes its output.
    reuse_outputs: bool = False
    #: How many items (``items`` entries, then ``items_from`` rows) the last :meth:`jobs` pass
    #: read, once it ran to the end; None before. Not ``1 + the last job's item_index``: an item
    #: whose jobs all repeat earlier ones yields none, yet holds its index. A resubmit numbers
    #: the batch's jobs no longer in the manifest from here (:func:`jobs.store.resubmit_jobs`).
    item_count: int | None = None
    #: Each local media file its validation checked and passed (resolved path), with the SHA-256
    #: of the very bytes that check read and decoded (:func:`jobs.media.checked_file`). The pass
    #: that stores the jobs records these, not a hash of a later read: a file rewritten since
    #: its check is then refused by the worker rather than sent unchecked (and billed).
    checked: dict[str, str] = field(default_factory=dict)
    #: Set once a validation pass has filled :attr:`checked`: a later pass (the one that stores
    #: the jobs) refuses a job naming a local file that check did not read
    #: (:func:`jobs.manifest.checks.unchecked_issues`) instead of hashing it from a fresh read.
    validated: bool = False
    #: FAL_KEY's values (:func:`jobs.manifest.fal_key.known_keys`): an ``items_from`` row holding
    #: one is an error as it is read (the manifest's own values are checked when it is parsed).
    fal_keys: frozenset[str] = frozenset()
    #: The ``items_from`` file as the validating pass read it: which file, how many bytes, their
    #: SHA-256 (:class:`ItemsRead`). Once :attr:`validated`, a later pass (the one that stores
    #: the jobs) reads the file again and is refused (:class:`ItemsFileChanged`) unless it finds
    #: exactly these bytes: rows appended or rewritten between the passes were stored, and sent,
    #: without anyone checking them (an audit's row of 9,999 frames, a sweep's 2,000 422s).
    items_read: ItemsRead | None = None
    #: The ``items_from`` file the current pass reads (:meth:`refuse_changed_items` finishes it).
    _reading: ItemsFile | None = field(default=None, repr=False, compare=False)
    #: :meth:`input_size_floor`, once counted.
    _input_size: int | None = field(default=None, repr=False)

    @property
    def base_dir(self) -> Path:
        """The folder relative paths in the manifest are resolved against."""
        return self.path.parent

    @property
    def shared_lines(self) -> frozenset[int]:
        """Lines of ``defaults`` and ``matrix`` values: issues there apply to many jobs."""
        lines = set(self.defaults.lines.values())
        for values in self.matrix.values():
            lines.update(values.lines)
        return frozenset(lines)

    def jobs(
        self, issues: list[Issue] | None = None, *, dropped: Callable[[JobSpec], None] | None = None
    ) -> Iterator[JobSpec]:
        """Stream every expanded job: items, then ``items_from`` rows. Not validated.

        Expansion problems (an item that is not a mapping, an unknown endpoint, a bad JSONL
        line…) skip that item and are appended to ``issues``; without a list, the first error
        raises :class:`ManifestError`. Duplicate jobs are dropped with a warning, each handed to
        ``dropped`` first: validation checks it all the same (an item whose job is identical to
        an earlier one, by its bytes, may still be wrong in its own way — a zero-byte local file
        beside an empty data URI — and its error was never said). Jobs that differ only by an
        endpoint default written out in one and left out in another are kept, with one warning
        per group once the pass ends (:class:`DefaultedDuplicates`). Without ``issues`` no one
        reads a warning (the pass that stores a validated manifest), so that check, a second
        hash and a remembered entry per job, is not made.
        """
        sink: list[Issue] = [] if issues is None else issues
        duplicates = DuplicateJobs(self._source_of)
        defaulted = DefaultedDuplicates(self._source_of, self._matrix_of) if issues is not None else None
        combos = self._combos()
        digests: dict[str, str | None] = dict(self.checked)
        # Resolved per pass, not per process: a file swapped for a symlink between validation
        # and storing is caught by the second pass.
        paths = PathCache()
        fallbacks = RowFallbacks()  # row paths found only beside the items file: one warning
        # Once a pass, not once a row or a job: the property makes a new Path each time, and a
        # file's rows share one folder (a Path compared once, not once a row).
        base_dir = self.base_dir
        folder = str(base_dir)
        row_dir: tuple[Path, bool] = (base_dir, True)  # a row's folder; whether it is the manifest's
        produced = False
        self.item_count = None
        items = len(self.items)
        for raw in self._raw_items(sink):
            items = max(items, raw.index + 1)
            if raw.base_dir is not row_dir[0]:
                row_dir = (raw.base_dir, raw.base_dir == base_dir)
            own_dir = row_dir[1]
            for job in self._expand(raw, combos, sink, digests, paths, fallbacks, base_dir, folder, own_dir):
                warning = duplicates.warning(job)
                if warning is not None:
                    if dropped is not None:
                        dropped(job)
                    sink.append(warning)
                    continue
                produced = True
                if defaulted is not None:
                    defaulted.add(job, digests)
                yield job
            if issues is None and error_count(sink):
                self.refuse_changed_items()  # an error of a row changed since: the change is said
                raise ManifestError(sink)
        self.item_count = items
        sink.extend(fallbacks.warnings())
        if defaulted is not None:
            sink.extend(defaulted.warnings())
        if not produced and self.items_from is not None and not error_count(sink) + error_count(self.issues):
            sink.append(self._no_rows())
        if issues is None and error_count(sink):
            self.refuse_changed_items()
            raise ManifestError(sink)

    def refuse_changed_items(self) -> None:
        """Raise :class:`ItemsFileChanged` when the pass that stores the jobs (one after
        :attr:`validated`) reads an ``items_from`` file other than the one validated.

        Called as that pass ends, and by whoever sees it fail midway (its error may come from a
        row changed since, which no one checked: a price no table has, a value the database
        refuses): the rest of the file is read through the same open file and the whole
        compared, so the change, not what it broke, is what the user is told. Nothing to say
        before validation, nor when this pass read no ``items_from`` file, nor once its file was
        closed before its end (its refusal was said then)."""
        if not self.validated or self._reading is None:
            return
        found = self._reading.drain()
        if found is not None:
            self._compare_items(found)

    def _compare_items(self, found: ItemsRead) -> None:
        """:class:`ItemsFileChanged` unless ``found`` is the file validation read, byte for byte."""
        want = self.items_read
        if want is None or not want.complete:  # validation never read it to its end: never stored
            raise self._items_changed("it was not read to its end when validated")
        if (found.length, found.sha256) == (want.length, want.sha256):
            return  # the same bytes (even if written again, or renamed over the old file)
        if (found.device, found.inode) != (want.device, want.inode):
            raise self._items_changed("another file now has its name")
        if found.length != want.length:
            raise self._items_changed(f"{want.length:,} bytes when validated, {found.length:,} now")
        raise self._items_changed("its bytes differ from those validated")

    def _items_changed(self, why: str) -> ItemsFileChanged:
        """The one line a refused ``items_from`` change gets."""
        return ItemsFileChanged(
            f"{shown_path(self._items_from_named)} changed while submit ran ({why}); nothing was "
            "submitted: run it again once the file is written"
        )

    def _items_opened(self, source: ItemsFile) -> None:
        """The ``items_from`` file a pass opened: kept to be finished (:meth:`refuse_changed_items`).
        The storing pass refuses at once a file of another size than the bytes validated: not one
        row of it is read, priced or stored."""
        self._reading = source
        want = self.items_read
        if self.validated and want is not None and want.complete and source.size != want.length:
            raise self._items_changed(f"{want.length:,} bytes when validated, {source.size:,} now")

    def _items_ended(self, source: ItemsFile) -> None:
        """A pass read the ``items_from`` rows (to the end, or where it stopped): validation
        records what it read; the storing pass compares the whole file with that."""
        if not self.validated:
            self.items_read = source.read_so_far()
            return
        found = source.drain()
        if found is None:  # the rest of it cannot be read now: it is not the file validated
            raise self._items_changed("the rest of it cannot be read now")
        self._compare_items(found)

    def _no_rows(self) -> Issue:
        """Not one job and no other error: the ``items_from`` file holds no rows. A batch of 0
        jobs would stay active forever, so this is the error of a manifest without items."""
        return Issue(
            file=self.display,
            line=self.items_from_line,
            item=None,
            field="items_from",
            message="the manifest has no items: its items_from file holds no rows",
            allowed="at least one item, in 'items:' or as a row of the items_from file",
        )

    def _source_of(self, item_index: int) -> str:
        """The file an item came from: the manifest for ``items``, else the ``items_from`` file."""
        if item_index < len(self.items):
            return self.display
        return self.items_from_display or str(self.items_from)

    def _matrix_of(self, variant: int) -> dict[str, Any]:
        """The matrix combination numbered ``variant`` (as :meth:`_combos` yields them: the last
        axis varies fastest), without building the others."""
        combo: list[tuple[str, Any]] = []
        for key, values in reversed(self.matrix.items()):
            variant, i = divmod(variant, len(values))
            combo.append((key, values[i]))
        return dict(reversed(combo))

    def combination_count(self) -> int:
        """How many matrix combinations each item expands to (1 without a matrix), from the
        axis lengths alone: nothing is built."""
        return math.prod(len(values) for values in self.matrix.values())

    def expansion_floor(self) -> int:
        """The jobs this manifest expands to at least (before duplicates collapse), known before
        reading anything: the ``items`` (at least one: an ``items_from`` file adds rows) × the
        combinations. A manifest over the job limit by this count alone is refused up front."""
        return max(len(self.items), 1) * self.combination_count()

    def _defaults_size(self) -> int:
        """The bytes the ``defaults`` the matrix does not override add to each job."""
        return sum(value_size(k) + value_size(v) for k, v in self.defaults.items() if k not in self.matrix)

    def _matrix_size(self) -> int:
        """The bytes the matrix values add to one item's jobs, summed over its combinations:
        each value of an axis is in ``combinations / len(axis)`` of them."""
        combinations = self.combination_count()
        return sum(
            sum(value_size(key) + value_size(value) for value in values) * (combinations // len(values))
            for key, values in self.matrix.items()
        )

    def input_size_floor(self) -> int:
        """The bytes of input this manifest's jobs store at least, known before anything is
        expanded or any ``items_from`` row read: for each item, its fields and the defaults it
        does not override, once per matrix combination, and the matrix values. A manifest over
        :data:`MAX_INPUT_BYTES` by this count alone is refused up front, in the time it takes to
        add the numbers (a 1 MiB prompt × 10,000 seeds took minutes to validate, 5 GB of memory
        and 10 GB of database to store)."""
        if self._input_size is not None:
            return self._input_size
        combinations = self.combination_count()
        defaults = self._defaults_size()
        matrix = self._matrix_size()
        total = 0
        for item in self.items:
            if not isinstance(item, dict):
                continue
            own = 0
            for key, value in item.items():
                if key == "endpoint" or key in self.matrix:
                    continue
                own += value_size(key) + value_size(value)
                if key in self.defaults:  # the item's value replaces the default's
                    own -= value_size(key) + value_size(self.defaults[key])
            total += combinations * (defaults + own) + matrix
        self._input_size = total
        return total

    def too_much_input(self) -> Issue | None:
        """The error of a manifest whose ``items`` (before any ``items_from`` row) already store
        more than :data:`MAX_INPUT_BYTES`; None when they do not."""
        size = self.input_size_floor()
        if size <= MAX_INPUT_BYTES:
            return None
        jobs = self.expansion_floor()
        return Issue(
            file=self.display,
            line=None,
            item=None,
            field="matrix" if self.matrix else "items",
            message=(
                f"the manifest's {jobs:,} jobs would store {size_text(size)} of input, about "
                f"{size_text(size // max(jobs, 1))} each; refused: shorten the long values (a "
                "prompt, a data URI: write a local file's path instead) or split the manifest"
            ),
            allowed=input_allowed(),
            code=TOO_MUCH_INPUT,
        )

    def _combos(self) -> Iterable[Combo]:
        axes = [
            [(key, value, values.lines[i]) for i, value in enumerate(values)]
            for key, values in self.matrix.items()
        ]
        return _Combos(axes)

    def _raw_items(self, sink: list[Issue]) -> Iterator[RawItem]:
        index = 0
        for i, item in enumerate(self.items):
            line = self.items.lines[i]
            if isinstance(item, LMap):
                yield RawItem(index, self.display, line, item, item.lines, self.base_dir)
            else:
                sink.append(
                    Issue(
                        file=self.display,
                        line=line,
                        item=index,
                        field=None,
                        message=f"an item must be a mapping of fields, got {describe(item)}",
                        value=item,
                        allowed="a mapping such as {prompt: ..., image_url: ...}",
                    )
                )
            index += 1
        self._reading = None
        if self.items_from is None:
            return
        kind = file_kind(self.items_from)  # again: it may have changed since the manifest was parsed
        if kind != "file" and self.validated and self.items_read is not None:
            # Validated, then gone or replaced by a folder: its rows must not silently vanish.
            now = (
                f"it cannot be read now: {os_reason(kind)}"
                if isinstance(kind, OSError)
                else f"it is a {kind} now"
            )
            raise self._items_changed(now)
        if kind != "file":  # gone or unreadable: said; a folder or a FIFO now (reading would block): skipped
            if isinstance(kind, OSError):
                sink.append(self._unreadable(kind))
            return
        display = self.items_from_display or str(self.items_from)
        try:
            yield from read_items(
                self.items_from,
                display,
                index,
                sink,
                self._spec_named,
                self._row_limit(),
                self._check_header,
                opened=self._items_opened,
                ended=self._items_ended,
            )
        except OSError as exc:  # unreadable (permissions), or gone since the manifest was parsed
            if self.validated and self.items_read is not None:
                raise self._items_changed(f"it cannot be read now: {os_reason(exc)}") from exc
            sink.append(self._unreadable(exc))

    def _row_limit(self) -> RowLimit:
        """The ``items_from`` rows past :data:`MAX_JOBS` (the items before them and each row's
        matrix combinations counted): refused at the first one, where it stands, before it is
        parsed or expanded and before the rest of the file is read."""
        combinations = self.combination_count()
        items = MAX_JOBS // combinations
        allowed = jobs_allowed()
        if combinations > 1:
            noun = "item" if items == 1 else "items"
            allowed += f": {items:,} {noun} with the matrix's {combinations:,} combinations each"
        budget = InputBudget(
            left=MAX_INPUT_BYTES - self.input_size_floor(),
            per_row=combinations,
            each_row=combinations * self._defaults_size() + self._matrix_size(),
            message=(
                f"the manifest's jobs would store more than {size_text(MAX_INPUT_BYTES)} of input "
                "with this row; refused: shorten the long values or split the file"
            ),
            allowed=input_allowed(),
            code=TOO_MUCH_INPUT,
        )
        return RowLimit(items, too_many_jobs_message(), allowed, TOO_MANY_JOBS, budget)

    @property
    def _items_from_named(self) -> str:
        """The ``items_from`` file as a message names it: as the manifest wrote it."""
        return self.items_from_written or str(self.items_from)

    def _unreadable(self, exc: OSError) -> Issue:
        """The ``items_from`` file could not be read: said where the manifest names it, with the
        system's reason ("permission denied"), like an unreadable image — not a traceback."""
        return Issue(
            file=self.display,
            line=self.items_from_line,
            item=None,
            field="items_from",
            message=f"cannot read the items_from file {shown_path(self._items_from_named)}: {os_reason(exc)}",
            allowed="a readable JSONL or CSV file",
        )

    def _check_header(self, names: list[str], display: str) -> tuple[list[Issue], frozenset[str]]:
        """A CSV header's columns checked once, at line 1: a column no row may carry (no field of
        the endpoint, nor ``endpoint``), and, when every row uses the top-level endpoint, a
        required field no column, default or matrix value gives. Without this, each mistake
        was said again on every row, and none of it named the header. Returns the issues and
        the fields they cover (the rows' validation leaves those out). A column the matrix also
        sets is left to the matrix's own check (the matrix wins)."""
        if "endpoint" in names:  # a row may name any endpoint: a column none has is wrong for all
            specs = [get_endpoint(endpoint) for endpoint in known_endpoint_ids()]
        else:
            spec = self._spec_named(None)
            specs = [] if spec is None else [spec]
        if not specs:
            return [], frozenset()
        fields = list(dict.fromkeys(name for spec in specs for name in spec.fields_by_name))
        choices = [*fields, "endpoint"]
        where = f"for {specs[0].id}" if len(specs) == 1 else "for any endpoint"
        if len(specs) == 1:
            allowed = f"the fields of {specs[0].id}: {', '.join(fields)}; or endpoint"
        else:
            allowed = f"endpoint, or a field of the row's endpoint: {', '.join(sorted(fields))}"
        issues: list[Issue] = []
        reported: set[str] = set()
        for name in names:
            if name in choices or name in self.matrix:
                continue
            message = f"unknown column {quoted(name)} in the header {where}{did_you_mean(name, choices)}"
            issues.append(
                Issue(file=display, line=1, item=None, field=name, message=message, allowed=allowed)
            )
            reported.add(name)
        if len(specs) == 1:
            for fld in specs[0].fields_by_name.values():
                given = fld.name in names or fld.name in self.defaults or fld.name in self.matrix
                if fld.required and not given:
                    message = f"column {fld.name!r} is required and missing from the header"
                    issues.append(
                        Issue(
                            file=display,
                            line=1,
                            item=None,
                            field=fld.name,
                            message=message,
                            allowed=fld.allowed(),
                        )
                    )
                    reported.add(fld.name)
        return issues, frozenset(reported)

    def _spec_named(self, endpoint: object) -> EndpointSpec | None:
        """The spec of a row's ``endpoint`` (None: the manifest's), or None when it is unknown."""
        if endpoint is None:
            endpoint = self.endpoint if self.endpoint_known else None
        known = isinstance(endpoint, str) and endpoint in known_endpoint_ids()
        return get_endpoint(endpoint) if known and isinstance(endpoint, str) else None

    def _expand(
        self,
        raw: RawItem,
        combos: Iterable[Combo],
        sink: list[Issue],
        digests: dict[str, str | None],
        paths: PathCache,
        fallbacks: RowFallbacks,
        base_dir: Path,
        folder: str,
        own_dir: bool,
    ) -> Iterator[JobSpec]:
        """The jobs of one item. ``base_dir``: the manifest's folder (``folder``, as text);
        ``own_dir``: whether the item's file is in it (no path of its falls back elsewhere)."""
        if raw.source != self.display:  # a fal-shaped key is refused without FAL_KEY too
            held = row_key_issues(raw, self.fal_keys)
            if held:  # said without the key; the row's other checks could quote its values
                sink.extend(held)
                return
        spec = self._endpoint_for(raw, sink)
        if spec is None:
            return
        base: dict[str, Any] = {}
        origins: dict[str, tuple[str, int | None]] = {}
        for key, value in self.defaults.items():
            base[key] = value
            origins[key] = (self.display, self.defaults.lines.get(key))
        for key, value in raw.fields.items():
            if key == "endpoint":
                continue
            if raw.from_csv:
                value = csv_value(spec, key, value)
            base[key] = value
            origins.pop(key, None)
            if raw.lines:
                origins[key] = (raw.source, raw.lines.get(key, raw.line))
        overridden = [k for k in self.matrix if k in raw.fields]
        if overridden:
            sink.append(
                Issue(
                    file=raw.source,
                    line=raw.lines.get(overridden[0], raw.line),
                    item=raw.index,
                    field=overridden[0],
                    message=(
                        f"the item sets {', '.join(overridden)}, which the matrix also sets; "
                        "the matrix values are used"
                    ),
                    value=raw.fields[overridden[0]],
                    severity="warning",
                )
            )
        sink.extend(self._overridden_issues(raw, spec, base, origins))
        row_dirs = None if own_dir else self._row_dirs(raw)
        for variant, combo in enumerate(combos):
            values = dict(base)
            job_origins = dict(origins)
            for key, value, line in combo:
                values[key] = value
                job_origins[key] = (self.display, line)
            resolved, outside, fell_back, both = resolve_input(
                spec, values, folder, self.roots, paths, row_dirs
            )
            if outside:
                sink.extend(outside_issues(raw, values, outside, job_origins))
            if fell_back or both:  # only a row whose file is not in the manifest's folder
                if variant == 0:  # a row's own value, the same in each matrix job: said once
                    sink.extend(both_issues(raw, values, both, job_origins))
                    for key, spelled in fell_back.items():
                        at_file, at_line = job_origins.get(key, (raw.source, raw.line))
                        fallbacks.add(at_file, at_line, raw.index, key, values[key], spelled)
                values.update(fell_back)  # named as the contract reads it: relative to the manifest
            refused = {**outside, **both}  # never read, hashed or stored
            if self.validated:
                unchecked = list(
                    unchecked_issues(
                        raw, spec, values, resolved, refused, job_origins, self.checked, base_dir
                    )
                )
                if unchecked:  # never hashed, never yielded: the item's end raises (issues is None)
                    sink.extend(unchecked)
                    continue
            yield JobSpec(
                item_index=raw.index,
                source=raw.source,
                line=raw.line,
                endpoint=spec.id,
                input=resolved,
                key=job_key(spec, resolved, digests, refused=refused),
                matrix={key: value for key, value, _ in combo},
                origins=job_origins,
                refused=frozenset(refused),
                variant=variant,
                source_files=source_files(spec, values, resolved, digests, refused=refused),
                reported=raw.reported,
            )

    def _overridden_issues(
        self,
        raw: RawItem,
        spec: EndpointSpec,
        base: dict[str, Any],
        origins: dict[str, tuple[str, int | None]],
    ) -> list[Issue]:
        """The errors of the values the matrix overrides (a default's, the item's own), each at
        the line that wrote it. The matrix wins, but a value refused without it is refused with
        it: ``defaults: {seed: [1, 2, 3]}`` beside ``matrix: {seed: [7]}`` is the sweep written in
        the wrong place, and passed as valid; a stray ``seed: abc`` would turn into an error the
        day the matrix line is removed, on a manifest ``validate`` had called valid. A local file
        named there is not read (its value is never sent), nor its path resolved: only a media
        value that is not text is checked. ``null`` unsets, as anywhere. A default's errors
        come once per item and are said once (a ``defaults`` line is shared, see
        :func:`jobs.manifest.report.validate_manifest`)."""
        overridden = {
            key: base[key]
            for key in self.matrix
            if key in base and key not in raw.reported and not _unread_media(spec, key, base[key])
        }
        if not overridden:
            return []
        values = resolve_input(spec, overridden, self.base_dir, self.roots, PathCache()).input
        where = Location(raw.source, raw.line, raw.index, origins)
        return [
            replace(issue, message=f"{issue.message}; the matrix sets {issue.field!r} too, {_STILL_CHECKED}")
            for issue in validate_input(spec, values, where)
            if issue.field in values
        ]

    def _row_dirs(self, raw: RawItem) -> dict[str, Path]:
        """The folder an ``items_from`` row's own path may fall back to (its file's), for each
        field the row itself sets, the matrix's left out (the matrix wins over the item); asked
        only of a row whose folder is not the manifest's (an item of the manifest has none).
        Every relative path is relative to the manifest's folder first
        (:mod:`jobs.manifest.row_paths`). A value written in the manifest (``defaults``,
        ``matrix``) never falls back: ``defaults: {image_url: images/a.png}`` must not name
        ``data/images/a.png`` for the rows of ``data/rows.jsonl``."""
        return {key: raw.base_dir for key in raw.fields if key != "endpoint" and key not in self.matrix}

    def _endpoint_for(self, raw: RawItem, sink: list[Issue]) -> EndpointSpec | None:
        if "endpoint" not in raw.fields:
            if self.endpoint is None:
                sink.append(
                    Issue(
                        file=raw.source,
                        line=raw.line,
                        item=raw.index,
                        field="endpoint",
                        message="no endpoint: set a top-level 'endpoint:' or this item's 'endpoint:'",
                        allowed=", ".join(known_endpoint_ids()),
                    )
                )
                return None
            return get_endpoint(self.endpoint) if self.endpoint_known else None
        endpoint = raw.fields["endpoint"]
        if isinstance(endpoint, str) and endpoint in known_endpoint_ids():
            return get_endpoint(endpoint)
        if endpoint is None or (isinstance(endpoint, str) and not endpoint.strip()):
            message = (
                f"the item's endpoint is empty ({describe(endpoint)}): name one, or leave the "
                "key out to use the top-level 'endpoint:'"
            )
        else:
            hint = did_you_mean(str(endpoint), known_endpoint_ids())
            message = f"unknown endpoint {quoted(endpoint)}{hint}"
        sink.append(
            Issue(
                file=raw.source,
                line=raw.lines.get("endpoint", raw.line),
                item=raw.index,
                field="endpoint",
                message=message,
                value=endpoint,
                allowed=", ".join(known_endpoint_ids()),
            )
        )
        return None
