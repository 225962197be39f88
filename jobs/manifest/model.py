"""The shapes every manifest step shares: an expanded job, a raw item, and how values are named.

Nothing here reads a file; the loading, streaming, keying and checking modules all build on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.errors import Issue
from jobs.printable import quoted
from jobs.validation import Location


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
    #: The matrix combination's index within its item (0 without a matrix): with ``item_index``
    #: it names the job across batches of the same manifest (export order, ``diff``).
    variant: int = 0
    #: Per media field, the reference as written and its SHA-256 (:mod:`jobs.manifest.sources`);
    #: None when the job has no media field.
    source_files: dict[str, dict[str, str | None]] | None = field(default=None, compare=False, repr=False)
    #: Fields whose problem was said once for the item's whole file (:attr:`RawItem.reported`):
    #: validation treats them as present and does not check them again.
    reported: frozenset[str] = field(default_factory=frozenset, compare=False, repr=False)

    @property
    def location(self) -> Location:
        """Where this job's input was written, so validation can point at each value's line."""
        return Location(self.source, self.line, self.item_index, self.origins)


@dataclass(slots=True)
class RawItem:
    """One item as written (an ``items`` entry or an ``items_from`` row), before expansion.

    ``fields`` are the fields the item sets: a CSV row's empty cells are not among them (an
    empty cell means "absent"), so an empty ``endpoint`` cell is the manifest's endpoint and an
    empty ``seed`` cell no field the matrix overrides."""

    index: int
    source: str
    line: int | None
    fields: Mapping[str, Any]
    lines: Mapping[str, int]
    base_dir: Path
    from_csv: bool = False
    #: Fields whose problem is said once for the whole file (a CSV header's unknown column, or
    #: a required one it lacks): this row's validation does not repeat it.
    reported: frozenset[str] = frozenset()


def describe(value: object) -> str:
    """How a wrong value is named in a message: its kind, and the value when short."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the text {quoted(value)}"
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {quoted(value)}"


def error_count(issues: list[Issue]) -> int:
    """How many of ``issues`` are errors (warnings do not block)."""
    return sum(1 for i in issues if i.severity == "error")
