"""Manifests: load a YAML batch description, expand it into jobs, and validate every job.

The manifest (see the README) names a batch, a default ``endpoint``, ``defaults``, an optional
``matrix``, ``items`` and optionally ``items_from`` (a JSONL or CSV file of more items), and a
``budget``. Loading is cheap and reads only the YAML; :meth:`Manifest.jobs` then *streams* the
expanded jobs, so a 100,000-row ``items_from`` file is never held in memory.

How one job's input is resolved (each later step wins):

1. ``defaults``;
2. the item's own fields;
3. the matrix combination. The matrix applies to every item, giving items × (product of the
   matrix lists) jobs. An item that sets a field the matrix also sets is overridden by the
   matrix, with a warning (the sweep is what the user asked for; the item value is likely a
   leftover).

Then:

- a ``null`` value removes the field (so an item can unset a default; the provider applies its
  own default);
- endpoint defaults are **not** injected: the input stays as the user wrote it, the provider
  applies its documented defaults (pricing reads them from the registry);
- an integer given for a text field whose allowed values are numbers written as text (Wan 2.5's
  ``duration: ["5", "10"]``) becomes that text, so ``duration: 5`` works;
- CSV cells are text; they are converted to the field's type (integer, number, boolean) and an
  empty cell means the field is absent. A cell that does not convert stays text and is reported
  by validation;
- local media paths become absolute, relative to the manifest's folder (or to the
  ``items_from`` file's folder for its rows), with ``~``, ``..`` and symlinks resolved. The result
  must lie inside the manifest's folder (or a folder the user allowed explicitly with
  ``--allow-dir`` / ``WANBATCH_ALLOWED_INPUT_DIRS``); anything else is a located error, and the
  file is never read. The same holds for ``items_from`` itself.

No string anywhere (name, description, any field of any item, ``items_from`` rows) may contain
a NUL character: PostgreSQL cannot store one, so it is refused here, with its location, rather
than by the database in the middle of ``submit``.

Every job has a deterministic key: sha256 of the endpoint and the canonical JSON of the resolved
input, in which local files are replaced by ``sha256:<content hash>`` (moving a file keeps the
key; changing its bytes changes it). Identical jobs in one manifest collapse to one, with a
warning naming both items.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

from jobs.endpoints import EndpointSpec, FieldType, get_endpoint, known_endpoint_ids
from jobs.errors import Issue, ManifestError
from jobs.media import (
    NUL_ALLOWED,
    NUL_MESSAGE,
    OUTSIDE_ALLOWED,
    LocalPath,
    MediaKind,
    allowed_roots,
    classify,
    file_sha256,
    resolve_local,
)
from jobs.validation import MediaCache, did_you_mean, fields_of, validate_job
from jobs.yaml_lines import LList, LMap, YamlProblem, load_located

#: Manifest files above this size are refused before parsing.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
#: Longest line accepted in an ``items_from`` JSONL file.
MAX_ITEMS_FROM_LINE = 1024 * 1024
#: Most jobs one manifest may expand to (items × matrix).
MAX_JOBS = 1_000_000
#: Most issues one validation pass collects; the rest are counted.
MAX_ISSUES = 10_000

TOP_LEVEL_KEYS = ("name", "description", "endpoint", "defaults", "matrix", "items", "items_from", "budget")
BUDGET_KEYS = ("max_usd",)
ITEMS_FROM_SUFFIXES = (".jsonl", ".ndjson", ".csv")

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_TRUE = frozenset({"true", "yes", "y", "on", "1"})
_FALSE = frozenset({"false", "no", "n", "off", "0"})


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One expanded job, ready to validate or store."""

    item_index: int  # 0-based across items then items_from rows
    source: str  # file the item came from (manifest path or items_from path), for display
    line: int | None  # 1-based line of the item in `source`
    endpoint: str
    input: dict[str, Any]  # resolved input (local media as absolute paths)
    key: str  # deterministic job key (sha256 hex)
    matrix: dict[str, Any]  # the matrix combination applied ({} if none)
    #: Where each input field was written: field → (file, line). Fields absent here came from the item.
    origins: Mapping[str, tuple[str, int | None]] = field(default_factory=dict, compare=False, repr=False)
    #: Media fields whose local path lies outside the allowed folders (already reported as
    #: errors): validation must not open those files, and such a job is never stored.
    refused: frozenset[str] = field(default_factory=frozenset, compare=False, repr=False)


@dataclass(slots=True)
class _RawItem:
    index: int
    source: str
    line: int | None
    fields: Mapping[str, Any]
    lines: Mapping[str, int]
    base_dir: Path
    from_csv: bool = False


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
    defaults: LMap = field(default_factory=lambda: LMap(1))
    matrix: dict[str, LList] = field(default_factory=dict)
    items: LList = field(default_factory=lambda: LList(1))
    items_from: Path | None = None
    items_from_display: str | None = None
    #: Top-level issues found while parsing (errors and warnings).
    issues: list[Issue] = field(default_factory=list)
    #: False when the top-level endpoint is unknown (reported once, not once per item).
    endpoint_known: bool = True
    #: Folders local files may come from, resolved: the manifest's own first, then the ones the
    #: user allowed (``--allow-dir``, ``WANBATCH_ALLOWED_INPUT_DIRS``).
    roots: tuple[str, ...] = ()

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

    def matrix_size(self) -> int:
        """Jobs per item: the product of the matrix lists' lengths (1 without a matrix)."""
        return math.prod(len(v) for v in self.matrix.values())

    def jobs(self, issues: list[Issue] | None = None) -> Iterator[JobSpec]:
        """Stream every expanded job: items, then ``items_from`` rows. Not validated.

        Expansion problems (an item that is not a mapping, an unknown endpoint, a bad JSONL
        line…) skip that item and are appended to ``issues``; without a list, the first error
        raises :class:`ManifestError`. Duplicate jobs are dropped with a warning.
        """
        sink: list[Issue] = [] if issues is None else issues
        # digest -> item_index << 32 | line: ~140 bytes a job instead of ~270 with hex keys and
        # tuples, which keeps a million-job manifest's duplicate check near 130 MB (bench/RESULTS.md).
        seen: dict[bytes, int] = {}
        combos = self._combos()
        digests: dict[str, str | None] = {}
        # Resolved per pass, not per process: a file swapped for a symlink between validation
        # and storing is caught by the second pass.
        paths: dict[tuple[str, str], LocalPath] = {}
        for raw in self._raw_items(sink):
            for job in self._expand(raw, combos, sink, digests, paths):
                digest = bytes.fromhex(job.key)
                packed = seen.get(digest)
                if packed is not None:
                    first_index, first_line = packed >> 32, packed & 0xFFFFFFFF
                    first_source = self._source_of(first_index)
                    sink.append(
                        Issue(
                            file=job.source,
                            line=job.line,
                            item=job.item_index,
                            field=None,
                            message=(
                                f"identical to the job of item {first_index} "
                                f"({first_source}:{first_line or None})"
                                f"{_matrix_text(job.matrix)}; it runs once"
                            ),
                            severity="warning",
                        )
                    )
                    continue
                seen[digest] = job.item_index << 32 | (job.line or 0)
                yield job
            if issues is None and _error_count(sink):
                raise ManifestError(sink)
        if issues is None and _error_count(sink):
            raise ManifestError(sink)

    def _source_of(self, item_index: int) -> str:
        """The file an item came from: the manifest for ``items``, else the ``items_from`` file."""
        if item_index < len(self.items):
            return self.display
        return self.items_from_display or str(self.items_from)

    # -- expansion -------------------------------------------------------------------------

    def _combos(self) -> list[tuple[tuple[str, Any, int], ...]]:
        if not self.matrix:
            return [()]
        axes = [
            [(key, value, values.lines[i]) for i, value in enumerate(values)]
            for key, values in self.matrix.items()
        ]
        return [tuple(c) for c in itertools.product(*axes)]

    def _raw_items(self, sink: list[Issue]) -> Iterator[_RawItem]:
        index = 0
        for i, item in enumerate(self.items):
            line = self.items.lines[i]
            if isinstance(item, LMap):
                yield _RawItem(index, self.display, line, item, item.lines, self.base_dir)
            else:
                sink.append(
                    Issue(
                        file=self.display,
                        line=line,
                        item=index,
                        field=None,
                        message=f"an item must be a mapping of fields, got {_kind(item)}",
                        value=item,
                        allowed="a mapping such as {prompt: ..., image_url: ...}",
                    )
                )
            index += 1
        if self.items_from is None or not self.items_from.is_file():
            return
        display = self.items_from_display or str(self.items_from)
        if self.items_from.suffix.lower() == ".csv":
            yield from _csv_items(self.items_from, display, index, sink)
        else:
            yield from _jsonl_items(self.items_from, display, index, sink)

    def _expand(
        self,
        raw: _RawItem,
        combos: list[tuple[tuple[str, Any, int], ...]],
        sink: list[Issue],
        digests: dict[str, str | None],
        paths: dict[tuple[str, str], LocalPath],
    ) -> Iterator[JobSpec]:
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
                if value == "":
                    continue
                value = _from_csv(spec, key, value)
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
        for combo in combos:
            values = dict(base)
            job_origins = dict(origins)
            for key, value, line in combo:
                values[key] = value
                job_origins[key] = (self.display, line)
            resolved, outside = _resolve(spec, values, raw.base_dir, self.roots, paths)
            for key, real in outside.items():
                where = job_origins.get(key, (raw.source, raw.line))
                sink.append(
                    Issue(
                        file=where[0],
                        line=where[1],
                        item=raw.index,
                        field=key,
                        message=_outside_message(values[key], real),
                        value=values[key],
                        allowed=OUTSIDE_ALLOWED,
                    )
                )
            yield JobSpec(
                item_index=raw.index,
                source=raw.source,
                line=raw.line,
                endpoint=spec.id,
                input=resolved,
                key=job_key(spec, resolved, digests, refused=outside),
                matrix={key: value for key, value, _ in combo},
                origins=job_origins,
                refused=frozenset(outside),
            )

    def _endpoint_for(self, raw: _RawItem, sink: list[Issue]) -> EndpointSpec | None:
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
        sink.append(
            Issue(
                file=raw.source,
                line=raw.lines.get("endpoint", raw.line),
                item=raw.index,
                field="endpoint",
                message=f"unknown endpoint {endpoint!r}{did_you_mean(str(endpoint), known_endpoint_ids())}",
                value=endpoint,
                allowed=", ".join(known_endpoint_ids()),
            )
        )
        return None


def _outside_message(value: object, real: str) -> str:
    """Why a local path is refused, naming where it really leads when that differs."""
    if str(value) == real:
        return f"{value!r} is outside the manifest's folder"
    return f"{value!r} leads to {real}, outside the manifest's folder"


def _error_count(issues: list[Issue]) -> int:
    return sum(1 for i in issues if i.severity == "error")


def _matrix_text(matrix: Mapping[str, Any]) -> str:
    if not matrix:
        return ""
    return " with " + ", ".join(f"{k}={v!r}" for k, v in matrix.items())


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the text {value[:60]!r}"
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


# -- resolution and keys -----------------------------------------------------------------------


def _resolve(
    spec: EndpointSpec,
    values: dict[str, Any],
    base_dir: Path,
    roots: tuple[str, ...],
    paths: dict[tuple[str, str], LocalPath],
) -> tuple[dict[str, Any], dict[str, str]]:
    """The input with local paths made real; and the media fields whose path is outside ``roots``.

    A value holding a NUL is left as written (validation refuses it; the OS would raise on it).
    """
    out: dict[str, Any] = {}
    outside: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        fld = fields_of(spec.id).get(key) if key in _media_or_enum(spec.id) else None
        if fld is not None:
            if fld.media is not None:
                if (
                    isinstance(value, str)
                    and value.strip()
                    and "\0" not in value
                    and classify(value) is MediaKind.PATH
                ):
                    mark = (str(base_dir), value)
                    local = paths.get(mark)
                    if local is None:
                        local = paths[mark] = resolve_local(value, str(base_dir), roots)
                    value = local.path
                    if not local.inside:
                        outside[key] = local.path
            elif type(value) is int and str(value) in {str(v) for v in fld.enum or ()}:
                value = str(value)
        out[key] = value
    return out, outside


@lru_cache(maxsize=64)
def _media_or_enum(endpoint_id: str) -> frozenset[str]:
    spec = get_endpoint(endpoint_id)
    return frozenset(
        f.name
        for f in spec.fields
        if f.media is not None or (f.type is FieldType.STRING and f.enum is not None)
    )


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept: the same input always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def job_key(
    spec: EndpointSpec,
    resolved: Mapping[str, Any],
    digests: dict[str, str | None] | None = None,
    *,
    refused: Mapping[str, str] | frozenset[str] = frozenset(),
) -> str:
    """sha256 hex of the endpoint and the input, local files standing in by their content hash.

    ``digests`` caches file hashes by path for one pass (a batch reuses a few images many times).
    Fields in ``refused`` (paths outside the allowed folders) are keyed by their path and never
    read; such a job is invalid and never stored.
    """
    keyed = dict(resolved)
    for name in _media_or_enum(spec.id):
        value = keyed.get(name)
        if isinstance(value, str) and (name in refused or "\0" in value):
            keyed[name] = f"unread:{value}"
        elif isinstance(value, str) and classify(value) is MediaKind.PATH:
            if digests is None or value not in digests:
                digest = file_sha256(Path(value))
                if digests is not None:
                    digests[value] = digest
            else:
                digest = digests[value]
            keyed[name] = f"sha256:{digest}" if digest else f"missing:{value}"
    text = spec.id + "\n" + canonical_json(keyed)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _from_csv(spec: EndpointSpec, key: str, value: Any) -> Any:
    fld = fields_of(spec.id).get(key) if isinstance(value, str) else None
    if fld is None or not isinstance(value, str):
        return value
    text = value.strip()
    if fld.type is FieldType.INTEGER and _INT.match(text):
        return int(text)
    if fld.type is FieldType.NUMBER:
        if _INT.match(text):
            return int(text)
        if _FLOAT.match(text):
            return float(text)
    if fld.type is FieldType.BOOLEAN:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
    return value


# -- items_from ----------------------------------------------------------------------------------


def _jsonl_items(path: Path, display: str, index: int, sink: list[Issue]) -> Iterator[_RawItem]:
    base_dir = path.parent
    with path.open("rb") as fh:
        lineno = 0
        while True:
            raw = fh.readline(MAX_ITEMS_FROM_LINE + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_ITEMS_FROM_LINE and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                    raw = fh.readline(MAX_ITEMS_FROM_LINE)
                sink.append(
                    _row_issue(display, lineno, index, f"line longer than {MAX_ITEMS_FROM_LINE:,} bytes")
                )
                index += 1
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
            except UnicodeDecodeError:
                sink.append(_row_issue(display, lineno, index, "not UTF-8 text"))
            except ValueError as exc:
                sink.append(_row_issue(display, lineno, index, f"not valid JSON ({exc})"))
            else:
                if isinstance(obj, dict):
                    yield _RawItem(index, display, lineno, obj, {}, base_dir)
                else:
                    sink.append(
                        _row_issue(
                            display, lineno, index, f"each line must be a JSON object, got {_kind(obj)}"
                        )
                    )
            index += 1


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _csv_items(path: Path, display: str, index: int, sink: list[Issue]) -> Iterator[_RawItem]:
    base_dir = path.parent
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                return
            names = [h.strip() for h in header]
            if any(not n for n in names) or len(set(names)) != len(names):
                sink.append(
                    _row_issue(
                        display, 1, None, "the header row needs distinct, non-empty field names", names
                    )
                )
                return
            last = reader.line_num
            for row in reader:
                line = last + 1
                last = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) > len(names):
                    sink.append(
                        _row_issue(
                            display, line, index, f"{len(row)} cells but only {len(names)} header names"
                        )
                    )
                else:
                    yield _RawItem(
                        index, display, line, dict(zip(names, row, strict=False)), {}, base_dir, True
                    )
                index += 1
        except (csv.Error, UnicodeDecodeError) as exc:
            sink.append(
                _row_issue(display, reader.line_num + 1, index, f"unreadable CSV ({exc}); reading stopped")
            )


def _row_issue(display: str, line: int, index: int | None, message: str, value: object = None) -> Issue:
    return Issue(file=display, line=line, item=index, field=None, message=message, value=value)


# -- top level ---------------------------------------------------------------------------------


def _parse(path: str | Path, allowed_dirs: Iterable[Path] = ()) -> tuple[Manifest | None, list[Issue]]:
    """Parse the top level; never raises for bad input. The manifest is None when unusable.

    ``allowed_dirs`` are folders, beyond the manifest's own, that local files may come from.
    """
    display = str(path)
    p = Path(path)
    issues: list[Issue] = []

    def top(message: str, line: int | None = None, fld: str | None = None, **kw: Any) -> None:
        issues.append(Issue(file=display, line=line, item=None, field=fld, message=message, **kw))

    try:
        size = p.stat().st_size
    except OSError:
        top("manifest file not found")
        return None, issues
    if not p.is_file():
        top("not a regular file")
        return None, issues
    if size > MAX_MANIFEST_BYTES:
        top(f"the manifest is {size:,} bytes; refused (at most {MAX_MANIFEST_BYTES:,}); use items_from")
        return None, issues
    data = p.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        top("the manifest is not UTF-8 text", data[: exc.start].count(b"\n") + 1)
        return None, issues
    try:
        root, duplicates = load_located(text)
    except YamlProblem as exc:
        top(exc.message, exc.line)
        return None, issues
    if not isinstance(root, LMap):
        top(
            f"the manifest must be a mapping with name, endpoint and items; got {_kind(root)}",
            getattr(root, "line", 1),
            allowed="name, endpoint, defaults, matrix, items, items_from, budget",
        )
        return None, issues

    manifest = Manifest(
        path=p.absolute(),
        display=display,
        name="",
        endpoint=None,
        budget_max_usd=None,
        sha256=digest,
        issues=issues,
    )
    manifest.roots = allowed_roots(manifest.base_dir, tuple(allowed_dirs))
    for key, first, second in duplicates:
        issues.append(
            Issue(
                file=display,
                line=second,
                item=_item_at(root, second),
                field=key,
                message=f"duplicate key {key!r} (first at line {first}, again at line {second})",
                allowed="each key once per mapping",
            )
        )
    for key in root:
        if key not in TOP_LEVEL_KEYS:
            top(
                f"unknown top-level key {key!r}{did_you_mean(key, TOP_LEVEL_KEYS)}",
                root.key_lines[key],
                key,
                value=key,
                allowed=", ".join(TOP_LEVEL_KEYS),
            )

    def line(key: str) -> int:
        return root.lines.get(key, root.line)

    name = root.get("name")
    if "name" not in root:
        top("missing required key 'name' (the batch name)", root.line, "name", allowed="a short text")
    elif not isinstance(name, str) or not name.strip():
        top(
            f"'name' must be non-empty text, got {_kind(name)}",
            line("name"),
            "name",
            value=name,
            allowed="a short text",
        )
    elif "\0" in name:
        top(f"the batch name {NUL_MESSAGE}", line("name"), "name", value=name, allowed=NUL_ALLOWED)
    else:
        manifest.name = name.strip()

    desc = root.get("description")
    if desc is not None and not isinstance(desc, str):
        top(f"'description' must be text, got {_kind(desc)}", line("description"), "description", value=desc)
    elif isinstance(desc, str) and "\0" in desc:
        top(
            f"the description {NUL_MESSAGE}",
            line("description"),
            "description",
            value=desc,
            allowed=NUL_ALLOWED,
        )
    manifest.description = desc if isinstance(desc, str) and "\0" not in desc else None

    endpoint = root.get("endpoint")
    if endpoint is not None:
        if isinstance(endpoint, str) and endpoint in known_endpoint_ids():
            manifest.endpoint = endpoint
        else:
            manifest.endpoint = str(endpoint)
            manifest.endpoint_known = False
            top(
                f"unknown endpoint {endpoint!r}{did_you_mean(str(endpoint), known_endpoint_ids())}",
                line("endpoint"),
                "endpoint",
                value=endpoint,
                allowed=", ".join(known_endpoint_ids()),
            )

    defaults = root.get("defaults")
    if isinstance(defaults, LMap):
        if "endpoint" in defaults:
            top(
                "'endpoint' does not belong in defaults; set it at the top level or per item",
                defaults.key_lines["endpoint"],
                "endpoint",
                value=defaults["endpoint"],
            )
            del defaults["endpoint"]
        manifest.defaults = defaults
    elif defaults is not None:
        top(
            f"'defaults' must be a mapping of endpoint fields, got {_kind(defaults)}",
            line("defaults"),
            "defaults",
            value=defaults,
            allowed="a mapping such as {resolution: 480p}",
        )

    _parse_matrix(root, manifest, top)
    _parse_items(root, manifest, top)
    _parse_budget(root, manifest, top)
    return manifest, issues


def _item_at(root: LMap, line: int) -> int | None:
    """The index of the inline item that contains ``line`` (for duplicate-key messages)."""
    items = root.get("items")
    if not isinstance(items, LList) or not items.lines:
        return None
    after = [ln for k, ln in root.key_lines.items() if k != "items" and ln > items.line]
    if line < items.lines[0] or (after and line >= min(after)):
        return None
    return bisect.bisect_right(items.lines, line) - 1


def _parse_matrix(root: LMap, manifest: Manifest, top: Any) -> None:
    matrix = root.get("matrix")
    if matrix is None:
        return
    if not isinstance(matrix, LMap):
        top(
            f"'matrix' must be a mapping of field → list of values, got {_kind(matrix)}",
            root.lines.get("matrix"),
            "matrix",
            value=matrix,
            allowed="a mapping such as {seed: [1, 2, 3]}",
        )
        return
    for key, values in matrix.items():
        where = matrix.lines.get(key)
        if key == "endpoint":
            top("the matrix sweeps input fields, not endpoints", matrix.key_lines[key], "matrix.endpoint")
        elif not isinstance(values, LList):
            top(
                f"matrix {key!r} must be a list of values, got {_kind(values)}",
                where,
                key,
                value=values,
                allowed=f"a list such as {key}: [a, b]",
            )
        elif not values:
            top(
                f"matrix {key!r} is an empty list, which would expand to no jobs",
                where,
                key,
                allowed="a non-empty list",
            )
        else:
            manifest.matrix[key] = values


def _parse_items(root: LMap, manifest: Manifest, top: Any) -> None:
    items = root.get("items")
    if isinstance(items, LList) and items:
        manifest.items = items
    elif items is not None:
        top(
            f"'items' must be a list of mappings, got {_kind(items)}",
            root.lines.get("items"),
            "items",
            value=items,
            allowed="a list: each entry starts with '- '",
        )
    source = root.get("items_from")
    if source is not None:
        where = root.lines.get("items_from")
        if not isinstance(source, str) or not source.strip():
            top(f"'items_from' must be a file path, got {_kind(source)}", where, "items_from", value=source)
        elif "\0" in source:
            top(f"the items_from path {NUL_MESSAGE}", where, "items_from", value=source, allowed=NUL_ALLOWED)
        elif not source.lower().endswith(ITEMS_FROM_SUFFIXES):
            top(
                f"items_from {source!r} is neither JSONL nor CSV",
                where,
                "items_from",
                value=source,
                allowed="a path ending in .jsonl, .ndjson or .csv",
            )
        else:
            local = resolve_local(source, str(manifest.base_dir), manifest.roots)
            resolved = Path(local.path)
            if not local.inside:
                top(
                    "items_from " + _outside_message(source, str(resolved)),
                    where,
                    "items_from",
                    value=source,
                    allowed=(
                        "a JSONL or CSV file inside the manifest's folder (symlinks must point "
                        "inside too); allow another folder explicitly with --allow-dir DIR or "
                        "WANBATCH_ALLOWED_INPUT_DIRS"
                    ),
                )
            elif not resolved.is_file():
                top(
                    f"items_from file not found: {resolved}",
                    where,
                    "items_from",
                    value=source,
                    allowed="a path relative to the manifest's folder",
                )
            else:
                manifest.items_from = resolved
                manifest.items_from_display = str(Path(manifest.display).parent / source)
    if not manifest.items and source is None and (items is None or isinstance(items, LList)):
        top(
            "the manifest has no items: add 'items:' (a list) or 'items_from:' (a JSONL/CSV file)",
            root.lines.get("items", root.line),
            "items",
            allowed="at least one item",
        )


def _parse_budget(root: LMap, manifest: Manifest, top: Any) -> None:
    budget = root.get("budget")
    if budget is None:
        return
    if not isinstance(budget, LMap):
        top(
            f"'budget' must be a mapping, got {_kind(budget)}",
            root.lines.get("budget"),
            "budget",
            value=budget,
            allowed="{max_usd: 25.00}",
        )
        return
    for key in budget:
        if key not in BUDGET_KEYS:
            top(
                f"unknown budget key {key!r}{did_you_mean(key, BUDGET_KEYS)}",
                budget.key_lines[key],
                f"budget.{key}",
                value=key,
                allowed=", ".join(BUDGET_KEYS),
            )
    if "max_usd" not in budget:
        return
    value = budget["max_usd"]
    where = budget.lines.get("max_usd")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        top(
            f"budget max_usd must be a number of US dollars, got {_kind(value)}",
            where,
            "budget.max_usd",
            value=value,
            allowed="a positive number such as 25.00",
        )
    elif value <= 0:
        top(
            f"budget max_usd must be positive, got {value}",
            where,
            "budget.max_usd",
            value=value,
            allowed="a positive number such as 25.00",
        )
    else:
        manifest.budget_max_usd = Decimal(str(value))


# -- public entry points -------------------------------------------------------------------------


def load_manifest(path: str | Path, allowed_dirs: Iterable[Path] = ()) -> Manifest:
    """Parse a manifest's top level; :class:`ManifestError` for anything structurally wrong."""
    manifest, issues = _parse(path, allowed_dirs)
    if manifest is None or _error_count(issues):
        raise ManifestError(issues)
    return manifest


@dataclass
class ValidationReport:
    """Everything wrong (and worth a warning) with a manifest, found in one streaming pass."""

    manifest: Manifest | None
    issues: list[Issue]
    job_count: int

    @property
    def ok(self) -> bool:
        """True when no issue is an error (warnings do not block)."""
        return not any(i.severity == "error" for i in self.issues)

    @property
    def errors(self) -> list[Issue]:
        """The error-severity issues only."""
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        """The warning-severity issues only."""
        return [i for i in self.issues if i.severity == "warning"]

    def raise_for_errors(self) -> None:
        """Raise :class:`ManifestError` with every issue when there is any error."""
        if not self.ok:
            raise ManifestError(self.issues)


def validate_manifest(path: str | Path, allowed_dirs: Iterable[Path] = ()) -> ValidationReport:
    """Parse, expand and validate every job; never raises for bad input.

    Issues come in file order (the manifest's own first, then ``items_from`` rows). A problem in
    ``defaults`` or ``matrix`` is reported once, not once per job it reaches. Local files must
    lie inside the manifest's folder or one of ``allowed_dirs``.
    """
    manifest, issues = _parse(path, allowed_dirs)
    if manifest is None:
        return ValidationReport(None, issues, 0)
    shared = manifest.shared_lines
    seen: set[tuple[object, ...]] = set()
    collected: list[Issue] = list(issues)
    expansion: list[Issue] = []
    dropped = 0
    count = 0

    def add(issue: Issue) -> None:
        nonlocal dropped
        if issue.file == manifest.display and issue.line in shared:
            mark: tuple[object, ...] = (issue.file, issue.line, issue.field, issue.message)
        else:
            mark = (issue.file, issue.line, issue.item, issue.field, issue.message)
        if mark in seen:
            return
        seen.add(mark)
        if len(collected) >= MAX_ISSUES:
            dropped += 1
            return
        collected.append(issue)

    media_cache: MediaCache = {}
    for job in manifest.jobs(expansion):
        count += 1
        for issue in expansion:
            add(issue)
        expansion.clear()
        for issue in validate_job(job, media_cache):
            add(issue)
        if count > MAX_JOBS:
            add(
                Issue(
                    file=manifest.display,
                    line=None,
                    item=None,
                    field=None,
                    message=f"the manifest expands to more than {MAX_JOBS:,} jobs; split it",
                )
            )
            break
    for issue in expansion:
        add(issue)
    collected.sort(key=lambda i: (i.file != manifest.display, i.file, i.line or 0))
    if dropped:
        collected.append(
            Issue(
                file=manifest.display,
                line=None,
                item=None,
                field=None,
                message=f"… and {dropped:,} more issues not shown",
            )
        )
    return ValidationReport(manifest, collected, count)


def iter_valid_jobs(path: str | Path, allowed_dirs: Iterable[Path] = ()) -> Iterator[JobSpec]:
    """Validate the whole manifest first, then stream its jobs; :class:`ManifestError` if invalid.

    Two passes over the file, so nothing is stored (and no money spent) for a manifest that is
    wrong anywhere — even on its last line.
    """
    report = validate_manifest(path, allowed_dirs)
    report.raise_for_errors()
    assert report.manifest is not None
    return report.manifest.jobs()
