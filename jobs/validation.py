"""Checks of one job's resolved input against its endpoint's schema, returning located issues.

The checks are hand-written over :class:`~jobs.endpoints.FieldSpec` rather than a pydantic model
per item: a 100,000-job batch must validate in a second or two, and the messages must say what
is allowed in the user's words (the field's own ``allowed()`` text), not pydantic's.

This module knows nothing of manifests: :func:`check_input` checks a mapping against an
endpoint, and :func:`validate_input` puts each finding where a :class:`Location` says its value
was written (``jobs.manifest`` builds the location of each expanded job).

Type rules: ``bool`` is not an integer or a number (YAML ``yes`` is a bool, and ``seed: yes`` is
a mistake), an integer is a number, and a float is never an integer (``num_frames: 81.0`` is
refused rather than silently truncated). Numbers must be finite. No text anywhere in a value
(nested lists and mappings included, keys too) may hold a NUL character: PostgreSQL's text and
JSON types cannot store one, and no endpoint means one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from jobs.digits import TOO_MANY_DIGITS, foreign_digits, too_many_digits
from jobs.endpoints import EndpointSpec, FieldSpec, FieldType
from jobs.errors import Issue, did_you_mean, squeezed
from jobs.media import NUL_ALLOWED, NUL_MESSAGE, check_media
from jobs.printable import quoted


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One problem with one field of an input, not yet located in a file; a ``"warning"`` (a
    media limit wanbatch assumed, which fal does not publish, or one fal only advises outside
    its input schema) is reported but does not block."""

    field: str
    message: str
    value: object
    allowed: str | None
    severity: str = "error"
    #: What kind of problem (:attr:`jobs.media.MediaProblem.code`), kept on its issue.
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Location:
    """Where an input was written: its file, line and item, and where each field came from.

    ``origins`` maps a field to the (file, line) that set it (a default, a matrix value, the
    item's own line); a field absent from it is located at the item.
    """

    file: str
    line: int | None
    item: int | None
    origins: Mapping[str, tuple[str, int | None]] = field(default_factory=dict)


#: Media verdicts of one pass by (endpoint, field, resolved value, value as written): a message
#: names the file as written, so two spellings of one file are two entries.
MediaCache = dict[tuple[str, str, str, str], list[FieldProblem]]


class ValueCache:
    """Verdicts of one validation pass on plain values (text, whole numbers, booleans) by
    endpoint and field: a sweep repeats each of its few prompts, seeds and resolutions across
    thousands of jobs, which then cost a dictionary look-up each instead of the field's checks.

    Only exact ``str``, ``int`` and ``bool`` values are remembered: equal values of one of those
    types say the same in every message (``-0.0`` and ``0.0`` are equal floats quoted apart, so
    floats are checked each time). Bounded, so a manifest of a million distinct prompts does not
    keep them all: past :attr:`MAX_ENTRIES` entries or :attr:`MAX_CHARS` characters of text,
    new values are checked without being remembered.
    """

    MAX_ENTRIES = 50_000
    MAX_CHARS = 8_000_000

    __slots__ = ("_chars", "_verdicts")

    def __init__(self) -> None:
        self._verdicts: dict[tuple[str, str, type, object], list[FieldProblem]] = {}
        self._chars = 0

    def check(self, endpoint: str, fld: FieldSpec, value: str | int) -> list[FieldProblem]:
        """:func:`check_value` of ``value``, remembered when there is room."""
        mark = (endpoint, fld.name, type(value), value)
        found = self._verdicts.get(mark)
        if found is None:
            found = check_value(fld, value)
            size = len(value) if isinstance(value, str) else 0
            if len(self._verdicts) < self.MAX_ENTRIES and self._chars + size <= self.MAX_CHARS:
                self._verdicts[mark] = found
                self._chars += size
        return found


#: The exact types :class:`ValueCache` remembers.
_REMEMBERED = (str, int, bool)


def has_nul(value: object, depth: int = 0) -> bool:
    """Whether any text in ``value`` (nested lists and mappings, keys included) holds a NUL."""
    if isinstance(value, str):
        return "\0" in value
    if depth > 100:  # the YAML loader caps nesting well below this; never recurse without bound
        return False
    if isinstance(value, Mapping):
        return any(has_nul(k, depth + 1) or has_nul(v, depth + 1) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(has_nul(v, depth + 1) for v in value)
    return False


def check_input(
    spec: EndpointSpec,
    values: Mapping[str, Any],
    media_cache: MediaCache | None = None,
    *,
    skip: Collection[str] = (),
    written: Mapping[str, Any] | None = None,
    value_cache: ValueCache | None = None,
    checked: dict[str, str] | None = None,
) -> list[FieldProblem]:
    """Every problem of ``values`` (a resolved input) against ``spec``, in a stable order.

    ``media_cache`` remembers media verdicts by (endpoint, field, value, value as written) for
    one pass, so a batch that reuses one image checks (and stats) it once. Fields in ``skip`` count as present
    but their values are not checked (a path outside the allowed folders, already reported:
    its file must not even be opened). ``written`` holds media values as the user wrote them
    (``images/x.jpg``, where ``values`` has the absolute path it resolved to): a problem names
    and quotes a file as written. ``value_cache`` remembers the verdicts on other plain values
    for one pass (:class:`ValueCache`): the same problems, found once per distinct value.
    ``checked`` collects, for one pass, each local file that passed with the SHA-256 of the
    bytes its check read (:func:`jobs.media.check_media`): what the job is to record.
    """
    fields = spec.fields_by_name
    problems: list[FieldProblem] = []
    for name, value in values.items():
        if name in skip:
            continue
        fld = fields.get(name)
        if fld is None:
            problems.append(
                FieldProblem(
                    name,
                    f"unknown field {quoted(name)} for {spec.id}{did_you_mean(name, fields)}",
                    value,
                    "the fields of " + spec.id + ": " + ", ".join(fields),
                )
            )
            continue
        if has_nul(value):
            problems.append(FieldProblem(name, NUL_MESSAGE, value, NUL_ALLOWED))
            continue
        shown = (written or {}).get(name) if fld.media is not None else None
        shown = shown if isinstance(shown, str) else None
        if media_cache is not None and fld.media is not None and isinstance(value, str):
            mark = (spec.id, name, value, value if shown is None else shown)
            found = media_cache.get(mark)
            if found is None:
                found = media_cache[mark] = check_value(fld, value, shown=shown, checked=checked)
            problems.extend(found)
        elif value_cache is not None and fld.media is None and type(value) in _REMEMBERED:
            problems.extend(value_cache.check(spec.id, fld, value))
        else:
            problems.extend(check_value(fld, value, shown=shown, checked=checked))
    for fld in fields.values():
        if fld.required and fld.name not in values and fld.name not in skip:
            problems.append(
                FieldProblem(fld.name, f"required field {fld.name!r} is missing", None, fld.allowed())
            )
    return problems


def check_value(
    fld: FieldSpec, value: Any, *, shown: str | None = None, checked: dict[str, str] | None = None
) -> list[FieldProblem]:
    """Problems of one value for one field (type, range, enum, length, media).

    ``shown``: a media value as the user wrote it (``value`` being the path it resolved to),
    which its problems name and quote (``file not found: images/x.jpg``). ``checked``: see
    :func:`check_input`."""
    kind = fld.type
    if value is None:
        return [FieldProblem(fld.name, "must not be null", value, fld.allowed())]
    if fld.media is not None:
        quoted_value = value if shown is None else shown
        return [
            FieldProblem(fld.name, p.message, quoted_value, p.allowed or None, p.severity, p.code)
            for p in check_media(value, kind, fld.media, shown=shown, checked=checked)
        ]
    if kind is FieldType.STRING:
        return _check_string(fld, value)
    if kind is FieldType.BOOLEAN:
        if isinstance(value, bool):
            return []
        return [_wrong_type(fld, value, "true or false")]
    if kind is FieldType.INTEGER:
        if isinstance(value, bool) or not isinstance(value, int):
            return [_wrong_type(fld, value, "an integer")]
        if too_many_digits(value):
            return [FieldProblem(fld.name, TOO_MANY_DIGITS, None, fld.allowed())]
        if fld.maximum is None and not -(2**63) <= value < 2**63:  # what a provider's JSON takes
            return [FieldProblem(fld.name, f"{value} is out of range", value, "a 64-bit whole number")]
    elif kind is FieldType.NUMBER:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return [_wrong_type(fld, value, "a number")]
        if too_many_digits(value):  # float() of it would raise OverflowError
            return [FieldProblem(fld.name, TOO_MANY_DIGITS, None, fld.allowed())]
        if not math.isfinite(value):
            return [FieldProblem(fld.name, _not_finite(value), value, fld.allowed())]
    return _check_range(fld, value)


def _not_finite(value: float) -> str:
    """Why an infinity or NaN is refused. No manifest spells one out (``.inf`` and ``inf`` are
    text), so an infinity was written as a number too large for a float (``1e999``), or as
    JSON's non-standard ``Infinity``."""
    if math.isnan(value):
        return f"{value!r} is not a finite number"
    return f"{value!r} is not a finite number: a number beyond ±1.8e308 (such as 1e999) is infinite"


def _check_string(fld: FieldSpec, value: Any) -> list[FieldProblem]:
    if not isinstance(value, str):
        if fld.enum is not None and isinstance(value, int | float) and not isinstance(value, bool):
            hint = _enum_hint(str(value), [str(v) for v in fld.enum])
            return [
                FieldProblem(
                    fld.name, f"{quoted(value)} is not one of the allowed values{hint}", value, fld.allowed()
                )
            ]
        return [_wrong_type(fld, value, "text")]
    if fld.enum is not None:
        if value not in fld.enum:
            hint = _enum_hint(value, [str(v) for v in fld.enum])
            return [
                FieldProblem(
                    fld.name, f"{quoted(value)} is not one of the allowed values{hint}", value, fld.allowed()
                )
            ]
        return []
    if fld.max_length is not None and len(value) > fld.max_length:
        return [
            FieldProblem(
                fld.name,
                f"is {len(value)} characters long, more than {fld.max_length}",
                value,
                fld.allowed(),
            )
        ]
    if fld.required and not value.strip():
        return [FieldProblem(fld.name, "must not be empty", value, fld.allowed())]
    return []


_DIGITS = re.compile(r"[0-9]+")  # ASCII digits, as everywhere a number is read


def _enum_hint(text: str, choices: list[str]) -> str:
    """``(did you mean '720p'?)`` for an allowed value ``text`` plainly meant, else nothing.

    Meant: the same but for case or blanks (``720P``), or missing only a unit (``720`` for
    ``720p``), or a near spelling (:func:`~jobs.errors.did_you_mean`) with the same numbers in
    it. A near spelling with other numbers is another value, not a typo: ``1080p`` is not
    "``580p``?" (it shares three characters); the allowed list that follows says what there is.
    """
    folded = squeezed(text)
    if folded:  # the same but for case or blanks is did_you_mean's; it is the one choice here too
        with_unit = [c for c in choices if c.lower().startswith(folded) and not c[len(folded) :].isdigit()]
        if len(with_unit) == 1 and _DIGITS.findall(with_unit[0]) == _DIGITS.findall(text):
            return f" (did you mean {with_unit[0]!r}?)"
    return did_you_mean(text, choices)


def _check_range(fld: FieldSpec, value: float) -> list[FieldProblem]:
    if fld.enum is not None and value not in fld.enum:
        message = f"{quoted(value)} is not one of the allowed values"
        return [FieldProblem(fld.name, message, value, fld.allowed())]
    if (fld.minimum is not None and value < fld.minimum) or (fld.maximum is not None and value > fld.maximum):
        return [FieldProblem(fld.name, f"{quoted(value)} is out of range", value, fld.allowed())]
    return []


def _wrong_type(fld: FieldSpec, value: Any, expected: str) -> FieldProblem:
    got = "true/false (a boolean)" if isinstance(value, bool) else type(value).__name__
    if isinstance(value, str):
        got = "text"
    elif isinstance(value, dict):
        got = "a mapping"
    elif isinstance(value, list):
        got = "a list"
        # The commonest way to get here: a sweep written in place (``seed: [1, 2, 3]`` in an item).
        return FieldProblem(
            fld.name,
            f"expected {expected}, got {got} {quoted(value)}; "
            # Also reached from a matrix entry that lists lists (``seed: [[1, 2], [3]]``): the
            # hint then says what its values must be.
            "a list makes one job per value only under `matrix:`, whose entries list single values",
            value,
            fld.allowed(),
        )
    return FieldProblem(
        fld.name, f"expected {expected}, got {got} {quoted(value)}", value, _allowed(fld, value)
    )


def _allowed(fld: FieldSpec, value: object) -> str:
    """The field's allowed values, and for a number written in another script's digits (``٣``,
    which ``int()`` takes, so a reader may well expect the field to) how to write it instead."""
    if fld.type in (FieldType.INTEGER, FieldType.NUMBER) and isinstance(value, str) and foreign_digits(value):
        return f"{fld.allowed()}, written with the ASCII digits 0-9"
    return fld.allowed()


def validate_input(
    spec: EndpointSpec,
    values: Mapping[str, Any],
    where: Location,
    media_cache: MediaCache | None = None,
    *,
    skip: Collection[str] = (),
    written: Mapping[str, Any] | None = None,
    value_cache: ValueCache | None = None,
    checked: dict[str, str] | None = None,
) -> list[Issue]:
    """:func:`check_input`'s problems as issues, each at the line its offending value came from
    (``written``: media values as the user wrote them; ``checked``: the hashes of the files
    checked; see :func:`check_input`)."""
    issues: list[Issue] = []
    for problem in check_input(
        spec, values, media_cache, skip=skip, written=written, value_cache=value_cache, checked=checked
    ):
        file, line = where.origins.get(problem.field, (where.file, where.line))
        issues.append(
            Issue(
                file=file,
                line=line,
                item=where.item,
                field=problem.field,
                message=problem.message,
                value=problem.value,
                allowed=problem.allowed,
                severity=problem.severity,
                code=problem.code,
            )
        )
    return issues
