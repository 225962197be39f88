"""``wanbatch rerun BATCH --vary FIELD=VALUES``: parse the option and type and check its values.

A sweep is only worth running if every job of it can be sent: a value fal would refuse (or that
wanbatch would price wrong) must stop the rerun before its batch is stored, in one line that
names the option and what is allowed. So the values are checked with the very checks a manifest
gets (:func:`jobs.validation.check_value`), per endpoint of the stored jobs, because one batch
may mix endpoints whose fields differ (``resolution`` allows ``1080p`` on Wan 2.5 only).

The option's text is untyped (``seed=1..3``, ``resolution=480p,720p``); a field's schema type
decides what each value becomes: integers for ``integer`` fields (``seed``), numbers for
``number`` ones, booleans by the words a CSV cell takes (:func:`jobs.digits.boolean_word`:
``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0``), the text itself otherwise. A value that does
not parse stays text, so the schema check reports it in the same words as a manifest would.
Image and audio fields are refused: a path typed on the command line would resolve against the
current folder, not the manifest's, and skip the folder checks a manifest's paths get; a
``matrix`` in a manifest is the way to sweep inputs.

A field name or value holding FAL_KEY (in any form :func:`jobs.key_forms.contains_key` knows, or
of a fal key's shape) is refused as a manifest's is (:mod:`jobs.manifest.fal_key`), in the same
words, and the option's text is never quoted then: the values are stored with the batch (and
its ``rerun_options``), sent to fal and exported.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jobs.digits import TOO_MANY_DIGITS, WHOLE, boolean_word, plain_number, whole_too_long
from jobs.endpoints import EndpointSpec, FieldSpec, FieldType
from jobs.errors import UsageError, did_you_mean
from jobs.manifest.fal_key import (
    KEY_NAME_MESSAGE,
    SHAPE_HELD,
    SHAPE_NAME_MESSAGE,
    holds_key,
    known_keys,
    refusal,
)
from jobs.printable import shortened
from jobs.validation import check_value

#: ``1..8``: an inclusive integer range (negative ends allowed, as for any integer field), its
#: ends whole numbers as a manifest writes them (:data:`jobs.digits.WHOLE`: ASCII digits only).
RANGE = re.compile(rf"\s*({WHOLE.pattern})\s*\.\.\s*({WHOLE.pattern})\s*")
#: Values one option, and combinations all options together, may make: far beyond any real
#: sweep, small enough that a typo (``1..10000000``) is an error rather than a full disk.
MAX_VALUES = 10_000
SYNTAX = "FIELD=VALUES, VALUES being a comma list (480p,720p) or an integer range (1..8)"
#: What a value holding FAL_KEY is told: a manifest's words (:data:`jobs.manifest.fal_key.KEY_MESSAGE`)
#: for the place a rerun's values go.
KEY_MESSAGE = (
    "the value holds FAL_KEY (the fal API key): refused, as a rerun's values are stored with its "
    "batch, sent to fal and exported with the dataset; the key belongs in the FAL_KEY variable only"
)
#: What a value of a fal key's shape that is no key this process knows is told (a manifest's
#: words, :data:`jobs.manifest.fal_key.SHAPE_MESSAGE`, for the place a rerun's values go).
SHAPE_MESSAGE = (
    f"{SHAPE_HELD}, whoever's key it is, as a rerun's values are stored with its batch, sent to "
    "fal and exported with the dataset; write it otherwise if it is no key"
)


@dataclass(frozen=True, slots=True)
class Vary:
    """One ``--vary`` option: the field and its values as typed, in order. A value given twice
    stays twice: its jobs repeat others' exact input and are stored once, with the warning that
    counts such repeats (dropping it here said nothing about the 1 job of ``480p,480p``)."""

    field: str
    tokens: tuple[str, ...]
    text: str

    @property
    def option(self) -> str:
        """The option as the user wrote it, for messages."""
        return option_text(self.text)


def option_text(text: str) -> str:
    """``--vary TEXT`` for a message, a long TEXT shortened (a value of 5,000 characters was
    quoted whole, in each message about it)."""
    return f"--vary {shortened(text)}"


def parse_vary(text: str, keys: Iterable[str] = ()) -> Vary:
    """One ``FIELD=VALUES`` option; :class:`UsageError` (one line) when it is malformed, or when
    it holds FAL_KEY (``keys``, or one this process remembered: :func:`refuse_key`, before
    anything quotes it)."""
    name, sep, values = text.partition("=")
    name = name.strip()
    refuse_key(name, (values,), whole=text, keys=keys)
    option = option_text(text)
    if not sep or not name:
        raise UsageError(f"{option}: expected {SYNTAX}")
    if found := RANGE.fullmatch(values):
        if whole_too_long(found[1]) or whole_too_long(found[2]):  # int() stops at 4,300 digits
            raise UsageError(f"{option}: {TOO_MANY_DIGITS}")
        low, high = int(found[1]), int(found[2])
        if high < low:
            raise UsageError(f"{option}: the range {low}..{high} is empty; write the smaller end first")
        if high - low + 1 > MAX_VALUES:
            raise UsageError(f"{option}: {high - low + 1} values, more than {MAX_VALUES}")
        tokens = [str(n) for n in range(low, high + 1)]
    else:
        tokens = [token.strip() for token in values.split(",")]
        if not all(tokens):
            raise UsageError(f"{option}: an empty value; expected {SYNTAX}")
    return Vary(field=name, tokens=tuple(tokens), text=text)


def refuse_key(name: str, values: Iterable[str], *, whole: str = "", keys: Iterable[str] = ()) -> None:
    """:class:`UsageError` (exit 2) when the field ``name``, one of ``values`` or the option's
    ``whole`` text holds FAL_KEY or a fal-key-shaped value (:func:`jobs.manifest.fal_key.holds_key`),
    in a manifest's words and never quoting what holds it: ``--vary: field 'prompt': the value
    holds FAL_KEY …`` (``holds a value shaped like a fal API key …`` when none of the known keys
    is there, only that shape); a field's name holding it is not named either. ``keys`` and the
    keys this process remembered are looked for (:func:`jobs.manifest.fal_key.known_keys`)."""
    known = known_keys(keys)
    if holds_key(name, known):
        raise UsageError(f"--vary: {refusal(name, known, KEY_NAME_MESSAGE, SHAPE_NAME_MESSAGE)}")
    values = list(values)
    if any(holds_key(value, known) for value in values) or holds_key(whole, known):
        # FAL_KEY when any of them holds it, else the shape
        said = refusal([*values, whole], known, KEY_MESSAGE, SHAPE_MESSAGE)
        raise UsageError(f"--vary: field {name!r}: {said}")


def parse_varies(texts: Iterable[str], keys: Iterable[str] = ()) -> tuple[Vary, ...]:
    """Every ``--vary`` option, each field at most once (two sweeps of one field is ambiguous);
    none may hold FAL_KEY (``keys``: the settings' FAL_KEY, see :func:`parse_vary`)."""
    keys = tuple(keys)
    varies = tuple(parse_vary(text, keys) for text in texts)
    seen: dict[str, Vary] = {}
    for vary in varies:
        if (first := seen.setdefault(vary.field, vary)) is not vary:
            raise UsageError(
                f"{vary.option}: {vary.field} is already varied by {first.option}; "
                "give all its values in one option"
            )
    combos = 1
    for vary in varies:
        combos *= len(vary.tokens)
    if combos > MAX_VALUES:
        raise UsageError(f"--vary: {combos} combinations of values per job, more than {MAX_VALUES}")
    return varies


def typed(fld: FieldSpec, token: str) -> Any:
    """``token`` as the field's schema type, or the text itself when it does not parse as that.

    Numbers by the rule a manifest's YAML and CSV cells follow (:func:`jobs.digits.plain_number`),
    a float for an integer field too, which the schema check then refuses in a manifest's words.
    """
    if fld.type in (FieldType.INTEGER, FieldType.NUMBER):
        number = plain_number(token)
        return token if number is None else number
    if fld.type is FieldType.BOOLEAN:
        word = boolean_word(token)
        return token if word is None else word
    return token


def checked_values(spec: EndpointSpec, vary: Vary) -> list[Any]:
    """The option's values typed for ``spec``'s field; :class:`UsageError` at the first bad one
    (first one holding FAL_KEY, for an option made without :func:`parse_vary`)."""
    refuse_key(vary.field, vary.tokens)
    fields = spec.fields_by_name
    fld = fields.get(vary.field)
    if fld is None:
        raise UsageError(
            f"{vary.option}: unknown field {vary.field!r} for {spec.id}{did_you_mean(vary.field, fields)} "
            f"(its fields: {', '.join(fields)})"
        )
    if fld.media is not None:
        raise UsageError(
            f"{vary.option}: {vary.field} is a media field of {spec.id} and cannot be varied here; "
            "use a `matrix` in a manifest to sweep files"
        )
    for token in vary.tokens:
        if whole_too_long(token):
            raise UsageError(f"{vary.option}: {vary.field}: {TOO_MANY_DIGITS} (allowed: {fld.allowed()})")
    values = [typed(fld, token) for token in vary.tokens]
    for value in values:
        if problems := [p for p in check_value(fld, value) if p.severity == "error"]:
            raise UsageError(
                f"{vary.option}: {vary.field} {problems[0].message} for {spec.id} "
                f"(allowed: {problems[0].allowed or fld.allowed()})"
            )
    return values


@dataclass
class Sweep:
    """The combinations of the ``--vary`` values for each endpoint, checked once per endpoint.

    With no option there is one, empty, combination: every job is repeated once, as it was.
    """

    varies: Sequence[Vary]
    _combos: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """How many combinations there are: each job is repeated this many times."""
        return math.prod(len(v.tokens) for v in self.varies)

    def combos(self, spec: EndpointSpec) -> list[dict[str, Any]]:
        """The field → value overrides of each combination (the product, first option slowest)."""
        found = self._combos.get(spec.id)
        if found is None:
            columns = [[(v.field, value) for value in checked_values(spec, v)] for v in self.varies]
            found = self._combos[spec.id] = [dict(combo) for combo in itertools.product(*columns)]
        return found
