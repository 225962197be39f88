"""Loading: a manifest's YAML (with the line of every value) → a :class:`Manifest`.

Only the top level is read here: ``name``, ``description``, ``endpoint``, ``defaults``,
``matrix``, ``items``, ``items_from`` (checked to be a JSONL/CSV file inside the allowed
folders, not yet read) and ``budget``. Every problem becomes a located issue; nothing raises for
bad input except :func:`load_manifest`, which raises one :class:`ManifestError` with all of them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from jobs.endpoints import known_endpoint_ids
from jobs.errors import Issue, ManifestError, did_you_mean
from jobs.manifest.checks import duplicate_key_issues, outside_message
from jobs.manifest.expand import Manifest
from jobs.manifest.items_from import ITEMS_FROM_SUFFIXES
from jobs.manifest.model import describe, error_count
from jobs.media import NUL_ALLOWED, NUL_MESSAGE, allowed_roots, resolve_local
from jobs.yaml_lines import LList, LMap, YamlProblem, load_located

#: Manifest files above this size are refused before parsing.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024

TOP_LEVEL_KEYS = ("name", "description", "endpoint", "defaults", "matrix", "items", "items_from", "budget")
BUDGET_KEYS = ("max_usd",)


class _Report(Protocol):
    """Records one top-level issue of the manifest being parsed."""

    def __call__(self, message: str, line: int | None = None, fld: str | None = None, **kw: Any) -> None: ...


def parse_manifest(
    path: str | Path, allowed_dirs: Iterable[Path] = ()
) -> tuple[Manifest | None, list[Issue]]:
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
            f"the manifest must be a mapping with name, endpoint and items; got {describe(root)}",
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
    issues.extend(duplicate_key_issues(root, duplicates, display))
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
            f"'name' must be non-empty text, got {describe(name)}",
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
        top(
            f"'description' must be text, got {describe(desc)}",
            line("description"),
            "description",
            value=desc,
        )
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

    defaults = _mapping(
        root, "defaults", top, "a mapping of endpoint fields", "a mapping such as {resolution: 480p}"
    )
    if defaults is not None:
        if "endpoint" in defaults:
            top(
                "'endpoint' does not belong in defaults; set it at the top level or per item",
                defaults.key_lines["endpoint"],
                "endpoint",
                value=defaults["endpoint"],
            )
            del defaults["endpoint"]
        manifest.defaults = defaults

    _parse_matrix(root, manifest, top)
    _parse_items(root, manifest, top)
    _parse_budget(root, manifest, top)
    return manifest, issues


def _mapping(root: LMap, key: str, top: _Report, what: str, allowed: str) -> LMap | None:
    """The mapping under ``key``; None (reported when present but not a mapping) otherwise."""
    value = root.get(key)
    if value is None or isinstance(value, LMap):
        return value
    top(
        f"'{key}' must be {what}, got {describe(value)}",
        root.lines.get(key),
        key,
        value=value,
        allowed=allowed,
    )
    return None


def _parse_matrix(root: LMap, manifest: Manifest, top: _Report) -> None:
    matrix = _mapping(
        root, "matrix", top, "a mapping of field → list of values", "a mapping such as {seed: [1, 2, 3]}"
    )
    if matrix is None:
        return
    for key, values in matrix.items():
        where = matrix.lines.get(key)
        if key == "endpoint":
            top("the matrix sweeps input fields, not endpoints", matrix.key_lines[key], "matrix.endpoint")
        elif not isinstance(values, LList):
            top(
                f"matrix {key!r} must be a list of values, got {describe(values)}",
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


def _parse_items(root: LMap, manifest: Manifest, top: _Report) -> None:
    items = root.get("items")
    if isinstance(items, LList) and items:
        manifest.items = items
    elif items is not None:
        top(
            f"'items' must be a list of mappings, got {describe(items)}",
            root.lines.get("items"),
            "items",
            value=items,
            allowed="a list: each entry starts with '- '",
        )
    source = root.get("items_from")
    if source is not None:
        where = root.lines.get("items_from")
        if not isinstance(source, str) or not source.strip():
            top(
                f"'items_from' must be a file path, got {describe(source)}", where, "items_from", value=source
            )
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
                    "items_from " + outside_message(source, str(resolved)),
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


def _parse_budget(root: LMap, manifest: Manifest, top: _Report) -> None:
    budget = _mapping(root, "budget", top, "a mapping", "{max_usd: 25.00}")
    if budget is None:
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
            f"budget max_usd must be a number of US dollars, got {describe(value)}",
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


def load_manifest(path: str | Path, allowed_dirs: Iterable[Path] = ()) -> Manifest:
    """Parse a manifest's top level; :class:`ManifestError` for anything structurally wrong."""
    manifest, issues = parse_manifest(path, allowed_dirs)
    if manifest is None or error_count(issues):
        raise ManifestError(issues)
    return manifest
