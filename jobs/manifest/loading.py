"""Loading: a manifest's YAML (with the line of every value) → a :class:`Manifest`.

Only the top level is read here: ``name``, ``description``, ``endpoint``, ``defaults``,
``matrix``, ``items``, ``items_from`` (checked to be a JSONL/CSV file inside the allowed
folders, not yet read), ``budget``, ``schedule``, ``priority`` and ``reuse_outputs``. Every
problem becomes a located issue; nothing raises for bad input except :func:`load_manifest`,
which raises one :class:`ManifestError` with all of them.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import stat
import zoneinfo
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from jobs import clock
from jobs.batch_names import batch_name
from jobs.digits import TOO_MANY_DIGITS, WholeTooLong
from jobs.endpoints import get_endpoint, known_endpoint_ids
from jobs.errors import (
    DEADLINE_PASSED,
    NEVER_OPENS,
    TOO_MANY_JOBS,
    Issue,
    ManifestError,
    did_you_mean,
    same_numbers,
)
from jobs.fs import file_kind, is_missing, os_reason, resolved_name_problem, shown_path
from jobs.manifest.checks import duplicate_key_issues, outside_message
from jobs.manifest.expand import MAX_JOBS, Manifest, jobs_allowed, too_many_jobs_message
from jobs.manifest.fal_key import text_key_issues, tree_key_issues
from jobs.manifest.items_from import ITEMS_FROM_SUFFIXES, whole_number_allowed
from jobs.manifest.model import describe, error_count
from jobs.media import (
    NUL_ALLOWED,
    NUL_MESSAGE,
    UNREPRESENTABLE_ALLOWED,
    UNREPRESENTABLE_MESSAGE,
    allowed_roots,
    representable,
    resolve_local,
)
from jobs.money import MAX_USD, too_much_usd
from jobs.printable import control_character, quoted
from jobs.schedule import Schedule, parse_instant, parse_window, zone
from jobs.yaml_lines import LList, LMap, Where, WholeNumbersTooLong, YamlProblem, load_located

#: Manifest files above this size are refused before parsing.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024

TOP_LEVEL_KEYS = (
    "name",
    "description",
    "endpoint",
    "defaults",
    "matrix",
    "items",
    "items_from",
    "budget",
    "schedule",
    "priority",
    "reuse_outputs",
)
BUDGET_KEYS = ("max_usd",)
SCHEDULE_KEYS = ("not_before", "deadline", "window", "timezone")
#: fal's queue priorities (``X-Fal-Queue-Priority``); "normal" is fal's default and its highest.
PRIORITIES = ("normal", "low")
_TIMESTAMP_ALLOWED = "an ISO 8601 timestamp with an offset, such as 2026-12-01T22:00:00+01:00 or …Z for UTC"
_WINDOW_ALLOWED = '"HH:MM-HH:MM" in the schedule\'s timezone, such as "22:00-06:00" (may cross midnight)'
_MAX_USD_ALLOWED = "a positive number such as 25.00"
_ZONE_ALLOWED = "an IANA time zone name, such as Europe/Berlin, America/New_York or UTC"


class _Report(Protocol):
    """Records one top-level issue of the manifest being parsed."""

    def __call__(self, message: str, line: int | None = None, fld: str | None = None, **kw: Any) -> None: ...


def parse_manifest(
    path: str | Path,
    allowed_dirs: Iterable[Path] = (),
    *,
    now: datetime | None = None,
    keys: frozenset[str] = frozenset(),
) -> tuple[Manifest | None, list[Issue]]:
    """Parse the top level; never raises for bad input. The manifest is None when unusable.

    ``allowed_dirs`` are folders, beyond the manifest's own, that local files may come from.
    ``now`` (aware) is what a schedule's deadline must lie after; by default the current time on
    the database's timeline (:func:`jobs.clock.utcnow`: this host's clock until a PostgreSQL
    database was measured, as every process stamps and judges time; see
    :func:`jobs.batches.submit_manifest`, which judges again once the database is open).
    ``keys`` (FAL_KEY, :func:`jobs.manifest.fal_key.known_keys`): a value or line holding one is
    an error (:mod:`jobs.manifest.fal_key`), and so is an ``items_from`` row's as it is read.
    """
    display = str(path)
    p = Path(path)
    issues: list[Issue] = []

    def top(message: str, line: int | None = None, fld: str | None = None, **kw: Any) -> None:
        if isinstance(kw.get("value"), WholeTooLong):  # said already, as a number too long
            return
        issues.append(Issue(file=display, line=line, item=None, field=fld, message=message, **kw))

    try:
        info = p.stat()
        if not stat.S_ISREG(info.st_mode):
            top("not a regular file")
            return None, issues
        if info.st_size > MAX_MANIFEST_BYTES:
            top(
                f"the manifest is {info.st_size:,} bytes; refused (at most {MAX_MANIFEST_BYTES:,}); "
                "use items_from"
            )
            return None, issues
        data = p.read_bytes()
    except OSError as exc:  # missing, or there but unreadable: say which
        top("manifest file not found" if is_missing(exc) else f"cannot read the manifest: {os_reason(exc)}")
        return None, issues
    except ValueError:  # a NUL in the path
        top("manifest file not found")
        return None, issues
    # The batch records where its manifest is (its reruns, and a move, follow it): a place this
    # session cannot record as text (a folder named in UTF-8 read under LC_ALL=C) made `submit`
    # and `run` an internal error after `validate` had said all was valid.
    placed = resolved_name_problem(p)
    if placed is not None:
        top(f"the manifest's path cannot be recorded: {placed}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        top("the manifest is not UTF-8 text", data[: exc.start].count(b"\n") + 1)
        return None, issues
    try:
        root, duplicates = load_located(text)
    except WholeNumbersTooLong as exc:
        # Each such number is one located error; the rest of the manifest is checked all the
        # same (the numbers read as placeholders nothing else reports), so every error is said.
        issues.extend(_too_long_issue(display, exc.root, where, line) for where, line in exc.numbers)
        root, duplicates = exc.root, exc.duplicates
    except YamlProblem as exc:
        top(exc.message, exc.line)
        return None, issues
    held = tree_key_issues(root, display, keys)
    issues.extend(held or text_key_issues(text, display, keys))
    if not isinstance(root, LMap):
        top(
            f"the manifest must be a mapping with name, endpoint and items; got {describe(root)}",
            getattr(root, "line", 1),
            allowed=", ".join(TOP_LEVEL_KEYS),
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
        text=text,
        fal_keys=keys,
    )
    manifest.roots = allowed_roots(manifest.base_dir, tuple(allowed_dirs))
    issues.extend(duplicate_key_issues(root, duplicates, display))
    for key in root:
        if key not in TOP_LEVEL_KEYS:
            top(
                f"unknown top-level key {quoted(key)}{did_you_mean(key, TOP_LEVEL_KEYS)}",
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
    elif (control := control_character(name.strip())) is not None:
        # A name is one line that `status` tables show and commands take as an argument.
        top(
            f"the batch name contains a control character ({control})",
            line("name"),
            "name",
            value=name,
            allowed="one line of visible text: no line breaks, tabs or other control characters",
        )
    else:  # in NFC: the same name typed either way is one batch (jobs.batch_names)
        manifest.name = batch_name(name.strip())

    desc = root.get("description")
    if desc is not None and not isinstance(desc, str):
        top(
            f"'description' must be text, got {describe(desc)}",
            line("description"),
            "description",
            value=desc,
            allowed='text; quote it when it starts with [ or {, as in description: "[draft] spring teaser"',
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
                f"unknown endpoint {quoted(endpoint)}{did_you_mean(str(endpoint), known_endpoint_ids())}",
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
    if manifest.expansion_floor() > MAX_JOBS:  # from the list lengths: 1000³ combinations are never built
        where = "matrix" if manifest.matrix else "items"
        at = root.key_lines.get(where, root.line)
        top(too_many_jobs_message(), at, where, allowed=jobs_allowed(), code=TOO_MANY_JOBS)
    elif (too_much := manifest.too_much_input()) is not None:  # from the values' sizes: nothing expanded
        issues.append(replace(too_much, line=root.key_lines.get(str(too_much.field), root.line)))
    _parse_budget(root, manifest, top)
    _parse_schedule(root, manifest, top, clock.utcnow() if now is None else now)
    _parse_priority(root, manifest, top)
    _parse_reuse_outputs(root, manifest, top)
    return manifest, issues


def _too_long_issue(display: str, root: Any, where: Where, line: int) -> Issue:
    """A whole number of too many digits, named as the manifest's other errors name a value:
    ``item 0: field 'seed'`` in ``items``, ``field 'defaults.seed'`` elsewhere, with what the
    endpoint's field allows when the number is that field's value."""
    item = where[1] if len(where) > 2 and where[0] == "items" and isinstance(where[1], int) else None
    rest = where[2:] if item is not None else where
    # The endpoint field the number is the whole value of: an item's, a default's, a matrix value.
    default = where[:1] == ("defaults",) and len(where) == 2
    matrix_value = where[:1] == ("matrix",) and len(where) == 3 and isinstance(where[2], int)
    name: object = None
    if item is not None:
        name = rest[0] if len(rest) == 1 else None
    elif default or matrix_value:
        name = where[1]
    endpoint = _item_endpoint(root, item)
    spec = get_endpoint(endpoint) if name is not None and endpoint in known_endpoint_ids() else None
    return Issue(
        file=display,
        line=line,
        item=item,
        field=_dotted(rest) or None,
        message=TOO_MANY_DIGITS,
        allowed=_MAX_USD_ALLOWED if where == ("budget", "max_usd") else whole_number_allowed(spec, name),
    )


def _item_endpoint(root: Any, item: int | None) -> object:
    """The endpoint an item uses (its own ``endpoint:``, else the manifest's), as written."""
    if not isinstance(root, dict):
        return None
    items = root.get("items")
    own = items[item] if item is not None and isinstance(items, list) and item < len(items) else None
    if isinstance(own, dict) and "endpoint" in own:
        return own["endpoint"]
    return root.get("endpoint")


def _dotted(where: Where) -> str:
    """``("loras", 0, "scale")`` → ``loras[0].scale``."""
    text = ""
    for part in where:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


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
                f"matrix {quoted(key)} must be a list of values, got {describe(values)}",
                where,
                key,
                value=values,
                allowed=f"a list such as {key}: [a, b]",
            )
        elif not values:
            top(
                f"matrix {quoted(key)} is an empty list, which would expand to no jobs",
                where,
                key,
                allowed="a non-empty list",
            )
        else:
            manifest.matrix[key] = values


def _parse_items(root: LMap, manifest: Manifest, top: _Report) -> None:
    items = root.get("items")
    source = root.get("items_from")
    if isinstance(items, LList) and items:
        manifest.items = items
    elif isinstance(items, LList):
        if source is None:  # an empty list next to an items_from file is no problem
            top(
                "the manifest has no items: 'items' is an empty list; add at least one item "
                "or 'items_from:' (a JSONL/CSV file)",
                root.lines.get("items"),
                "items",
                allowed="a list with at least one entry starting with '- '",
            )
    elif items is not None:
        top(
            f"'items' must be a list of mappings, got {describe(items)}",
            root.lines.get("items"),
            "items",
            value=items,
            allowed="a list: each entry starts with '- '",
        )
    if source is not None:
        where = root.lines.get("items_from")
        manifest.items_from_line = where
        if not isinstance(source, str) or not source.strip():
            top(
                f"'items_from' must be a file path, got {describe(source)}", where, "items_from", value=source
            )
        elif "\0" in source:
            top(f"the items_from path {NUL_MESSAGE}", where, "items_from", value=source, allowed=NUL_ALLOWED)
        elif not representable(source):
            top(
                f"items_from: {UNREPRESENTABLE_MESSAGE}",
                where,
                "items_from",
                value=source,
                allowed=UNREPRESENTABLE_ALLOWED,
            )
        elif not source.lower().endswith(ITEMS_FROM_SUFFIXES):
            top(
                f"items_from {quoted(source)} is neither JSONL nor CSV",
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
                    "items_from " + outside_message(source, local),
                    where,
                    "items_from",
                    value=source,
                    allowed=(
                        "a JSONL or CSV file inside the manifest's folder (symlinks must point "
                        "inside too); allow another folder explicitly with --allow-dir DIR or "
                        "WANBATCH_ALLOWED_INPUT_DIRS"
                    ),
                )
            elif (kind := file_kind(resolved)) != "file":
                shown = shown_path(source)  # as written, not as resolved: what the user can find
                if isinstance(kind, OSError):  # missing, or there but not to be read: say which
                    message = (
                        f"items_from file not found: {shown}"
                        if is_missing(kind)
                        else f"cannot read the items_from file {shown}: {os_reason(kind)}"
                    )
                    allowed = (
                        "a path relative to the manifest's folder"
                        if is_missing(kind)
                        else "a readable JSONL or CSV file"
                    )
                else:  # a folder, a named pipe (reading it would block), a device
                    message = f"items_from is not a regular file: {shown}"
                    allowed = "a regular JSONL or CSV file"
                top(message, where, "items_from", value=source, allowed=allowed)
            else:
                manifest.items_from = resolved
                manifest.items_from_display = str(Path(manifest.display).parent / source)
                manifest.items_from_written = source
    if items is None and source is None:
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
                f"unknown budget key {quoted(key)}{did_you_mean(key, BUDGET_KEYS)}",
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
            allowed=_MAX_USD_ALLOWED,
        )
    elif value <= 0:
        top(
            f"budget max_usd must be positive, got {value}",
            where,
            "budget.max_usd",
            value=value,
            allowed=_MAX_USD_ALLOWED,
        )
    elif (problem := too_much_usd(value)) is not None:
        top(
            f"budget max_usd {value} {problem}",
            where,
            "budget.max_usd",
            value=value,
            allowed=f"a positive number less than {MAX_USD:,.0f}, such as 25.00",
        )
    else:
        manifest.budget_max_usd = Decimal(str(value))


def _parse_schedule(root: LMap, manifest: Manifest, top: _Report, now: datetime) -> None:
    """``schedule:`` → :attr:`Manifest.schedule`, kept empty when any part of it is wrong."""
    schedule = _mapping(
        root, "schedule", top, "a mapping", "{not_before: ..., deadline: ..., window: ..., timezone: ...}"
    )
    if schedule is None:
        return
    ok = True
    for key in schedule:
        if key not in SCHEDULE_KEYS:
            ok = False
            top(
                f"unknown schedule key {quoted(key)}{did_you_mean(key, SCHEDULE_KEYS)}",
                schedule.key_lines[key],
                f"schedule.{key}",
                value=key,
                allowed=", ".join(SCHEDULE_KEYS),
            )
    instants: dict[str, datetime | None] = {"not_before": None, "deadline": None}
    named = schedule.get("timezone")
    # The schedule's zone, when it is one: a time without an offset is refused all the same, the
    # refusal saying which offset it has there that day.
    local_zone = named if isinstance(named, str) and _zone_problem(named) is None else None
    for key in instants:
        value = schedule.get(key)
        if value is None:
            continue
        try:
            instants[key] = parse_instant(value, timezone=local_zone)
        except ValueError as exc:
            ok = False
            top(
                f"schedule {key}: {exc}",
                schedule.lines.get(key),
                f"schedule.{key}",
                value=value,
                allowed=_TIMESTAMP_ALLOWED,
            )
    window = None
    if schedule.get("window") is not None:
        written = schedule["window"]
        try:
            if not isinstance(written, str):
                raise ValueError(f'window must be text such as "22:00-06:00", got {describe(written)}')
            window = parse_window(written)
        except ValueError as exc:
            ok = False
            top(
                f"schedule {exc}",
                schedule.lines.get("window"),
                "schedule.window",
                value=written,
                allowed=_WINDOW_ALLOWED,
            )
    timezone = schedule.get("timezone")
    if timezone is None:
        timezone = "UTC"
        if window is not None and (offsets := _local_offsets(schedule, instants)):
            # Valid, and maybe meant: but a window of local hours beside local instants is
            # far likelier to be local too, and read in UTC it moves by the offset.
            top(
                f"schedule window {schedule['window']} is read in UTC (no timezone given), though "
                f"{offsets}: add timezone: naming the zone they are local to (such as Europe/Paris), "
                "or timezone: UTC if the window is meant in UTC",
                schedule.lines.get("window"),
                "schedule.window",
                value=schedule["window"],
                severity="warning",
            )
    elif (problem := _zone_problem(timezone)) is not None:
        ok = False
        top(
            problem,
            schedule.lines.get("timezone"),
            "schedule.timezone",
            value=timezone,
            allowed=_ZONE_ALLOWED,
        )
    elif (misread := _etc_gmt_warning(timezone) or _legacy_zone_warning(timezone)) is not None:
        top(
            misread,
            schedule.lines.get("timezone"),
            "schedule.timezone",
            value=timezone,
            severity="warning",
        )
    not_before, deadline = instants["not_before"], instants["deadline"]
    if deadline is not None:
        where = schedule.lines.get("deadline")
        if not_before is not None and deadline <= not_before:
            ok = False
            top(
                f"schedule deadline {schedule['deadline']} is not after not_before "
                f"{schedule['not_before']}: nothing could ever be sent",
                where,
                "schedule.deadline",
                value=schedule["deadline"],
                allowed="a deadline later than not_before",
            )
        elif deadline <= now:
            # An error for a new batch; a stored one is resumed all the same (submit_manifest):
            # the schedule is kept, for that batch to end as it says.
            top(
                f"schedule deadline {schedule['deadline']} has already passed "
                f"(it is now {now.astimezone(UTC):%Y-%m-%d %H:%M} UTC)",
                where,
                "schedule.deadline",
                value=schedule["deadline"],
                allowed="a deadline in the future",
                code=DEADLINE_PASSED,
            )
        elif ok and (why := Schedule(not_before, deadline, window, timezone).why_never_opens(now)):
            # The window (after not_before) first opens only once the deadline has passed: the
            # batch would send nothing and end cancelled. Stored batches: as for a past deadline.
            top(
                f"schedule {why}: nothing could ever be sent",
                where,
                "schedule.deadline",
                value=schedule["deadline"],
                allowed="a deadline after the window next opens",
                code=NEVER_OPENS,
            )
    if ok:
        manifest.schedule = Schedule(not_before, deadline, window, timezone)


def _written_offset(value: object) -> timedelta | None:
    """The UTC offset a schedule instant was written with (``parse_instant`` keeps only the
    instant), or None when it cannot be read (the error is said already)."""
    try:
        parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).strip().upper())
    except ValueError:
        return None
    return parsed.utcoffset()


def _offset_text(offset: timedelta) -> str:
    """``+01:00``, ``-05:30``: an offset as ISO 8601 writes it (seconds only when there are any)."""
    sign = "-" if offset < timedelta(0) else "+"
    seconds = int(abs(offset).total_seconds())
    text = f"{sign}{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"
    return text + (f":{seconds % 60:02d}" if seconds % 60 else "")


def _local_offsets(schedule: LMap, instants: dict[str, datetime | None]) -> str | None:
    """What says that a schedule without ``timezone`` was written in local time: its instants
    that carry a UTC offset other than zero ("not_before and deadline carry the offset +01:00"),
    or None when none does."""
    offsets = {
        key: offset
        for key, parsed in instants.items()
        if parsed is not None and (offset := _written_offset(schedule[key]))
    }
    if not offsets:
        return None
    if len(set(offsets.values())) == 1:
        (offset,) = set(offsets.values())
        carry = "carries" if len(offsets) == 1 else "carry"
        return f"{' and '.join(offsets)} {carry} the offset {_offset_text(offset)}"
    return " and ".join(f"{key} carries {_offset_text(offset)}" for key, offset in offsets.items())


#: ``Etc/GMT+1``-style zone names: POSIX signs, the reverse of ISO 8601's (Etc/GMT+1 is UTC-01:00).
_ETC_GMT = re.compile(r"Etc/GMT([+-])0*(\d{1,2})", re.IGNORECASE)


def _etc_gmt_warning(name: str) -> str | None:
    """The warning for an ``Etc/GMT±N`` zone (N not 0): it means the opposite of how it reads."""
    found = _ETC_GMT.fullmatch(name.strip())
    if found is None or int(found[2]) == 0:
        return None
    sign, hours = found[1], int(found[2])
    means = f"UTC{'-' if sign == '+' else '+'}{hours:02d}:00"
    reads = f"UTC{sign}{hours:02d}:00"
    flipped = f"Etc/GMT{'-' if sign == '+' else '+'}{hours}"
    return (
        f"schedule timezone {name} is {means}, not {reads}: Etc/GMT zones have the sign reversed "
        f"(POSIX); for {reads} write {flipped} or a city zone (Area/City)"
    )


#: Legacy zone names of the tz database that never change to daylight time (UTC-05:00, -07:00
#: and -10:00 all year), though most places their abbreviation names do: ``EST`` with a window
#: of 22:00-06:00 opens at 23:00 New York time all summer. What each is, and what to write.
_FIXED_LEGACY = {
    "EST": "never changes to daylight time: it is UTC-05:00 all year, an hour off New York's clocks "
    "in summer; for New York write America/New_York (for UTC-05:00 all year, America/Panama)",
    "MST": "never changes to daylight time: it is UTC-07:00 all year, an hour off Denver's clocks "
    "in summer; for Denver write America/Denver (for Arizona, America/Phoenix)",
    "HST": "is a legacy name: UTC-10:00 all year, no daylight time (as Hawaii's clocks); write "
    "Pacific/Honolulu",
}
#: Legacy POSIX-style and European names that follow a daylight-saving rule (the US's, the EU's)
#: as their places do today: valid, but the zone of a place says where, and its whole history.
_RULED_LEGACY = {
    "EST5EDT": ("US", "America/New_York"),
    "CST6CDT": ("US", "America/Chicago"),
    "MST7MDT": ("US", "America/Denver"),
    "PST8PDT": ("US", "America/Los_Angeles"),
    "CET": ("EU", "Europe/Berlin or Europe/Paris"),
    "MET": ("EU", "Europe/Berlin or Europe/Paris"),
    "EET": ("EU", "Europe/Athens or Europe/Helsinki"),
    "WET": ("EU", "Europe/Lisbon"),
}


def _legacy_zone_warning(name: str) -> str | None:
    """The warning for a legacy zone name the tz database keeps for compatibility (``EST``,
    ``EST5EDT``, ``CET``, …): valid, but ``EST`` and ``MST`` never change to daylight time,
    whatever the places their abbreviations name do, and the others are better said by a place's
    zone (Area/City). None for any other name."""
    if name in _FIXED_LEGACY:
        return f"schedule timezone {name} {_FIXED_LEGACY[name]}"
    if name in _RULED_LEGACY:
        rules, canonical = _RULED_LEGACY[name]
        return (
            f"schedule timezone {name} is a legacy name (it follows the {rules} daylight-saving "
            f"rules); write the zone of a place, such as {canonical}"
        )
    return None


#: Files of a host's tz database that ``ZoneInfo`` loads but that are no IANA zone: what they
#: mean depends on the host (``localtime`` is its own zone), so a manifest must not name them.
_HOST_ZONE_FILES = frozenset({"localtime", "factory", "posixrules"})
_HOST_ZONE_DIRS = ("posix/", "right/")
#: Spellings of UTC that are no zone name here (``Z`` of an ISO offset, ``utc``, ``gmt+0``, …).
_UTC_LIKE = re.compile(r"(?:z|zulu|utc|gmt|ut|uct)(?:[+-]?0{1,2}(?::?00)?)?", re.IGNORECASE)


def _host_zone_file(name: str) -> bool:
    folded = name.casefold()
    return folded in _HOST_ZONE_FILES or folded.startswith(_HOST_ZONE_DIRS)


def _zone_problem(name: object) -> str | None:
    """Why ``name`` is not an IANA time zone name, or None when it is one."""
    if not isinstance(name, str):
        return f"schedule timezone must be a time zone name, got {describe(name)}"
    if _host_zone_file(name):
        return f"{quoted(name)} is this host's tz database file, not an IANA time zone name{_zone_hint(name)}"
    try:
        zone(name)
    except ValueError:
        return f"unknown time zone {quoted(name)}{_zone_hint(name)}"
    return None


def _zone_hint(name: str) -> str:
    """`` (did you mean 'X'?)`` for a wrong zone name: UTC for its other spellings, else the
    closest IANA name, matched whatever the case."""
    if _UTC_LIKE.fullmatch(name.strip()):
        return " (did you mean 'UTC'?)"
    # Listing every zone reads the tz database from disk: only worth it for a wrong name.
    names = {z.casefold(): z for z in zoneinfo.available_timezones() if not _host_zone_file(z)}
    if (same := names.get(name.casefold())) is not None:
        return f" (did you mean {same!r}?)"
    # Same numbers only, as for any hint (jobs.errors.did_you_mean): Etc/GMT+13 is not "Etc/GMT+3?".
    close = difflib.get_close_matches(name.casefold(), same_numbers(name.casefold(), names), n=1, cutoff=0.6)
    return f" (did you mean {names[close[0]]!r}?)" if close else ""


def _parse_priority(root: LMap, manifest: Manifest, top: _Report) -> None:
    value = root.get("priority")
    if value is None:
        return
    if value in PRIORITIES:
        manifest.priority = value
        return
    hint = did_you_mean(value, PRIORITIES) if isinstance(value, str) else ""
    why = " (fal has no higher priority than normal)" if value in ("high", "urgent") else ""
    top(
        f"priority must be normal or low, got {describe(value)}{hint}{why}",
        root.lines.get("priority"),
        "priority",
        value=value,
        allowed="normal (the default) or low",
    )


def _parse_reuse_outputs(root: LMap, manifest: Manifest, top: _Report) -> None:
    """``reuse_outputs:`` must be a real boolean: a quoted "false" silently meaning true would spend
    (or save) money against the user's intent."""
    value = root.get("reuse_outputs")
    if value is None:
        return
    if isinstance(value, bool):
        manifest.reuse_outputs = value
        return
    top(
        f"reuse_outputs must be true or false, got {describe(value)}",
        root.lines.get("reuse_outputs"),
        "reuse_outputs",
        value=value,
        allowed="true or false (the default)",
    )


def load_manifest(
    path: str | Path, allowed_dirs: Iterable[Path] = (), *, now: datetime | None = None
) -> Manifest:
    """Parse a manifest's top level; :class:`ManifestError` for anything structurally wrong."""
    manifest, issues = parse_manifest(path, allowed_dirs, now=now)
    if manifest is None or error_count(issues):
        raise ManifestError(issues)
    return manifest
