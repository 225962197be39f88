"""Numbers from untrusted text: ASCII digits only, one spelling everywhere, not too many digits.

``str.isdigit()`` is no guard for ``int()``: it accepts superscripts (``"²"``), circled and
other Unicode digits that ``int()`` then refuses with a ``ValueError`` — an unauthenticated
``X-Fal-Webhook-Timestamp: ²`` or ``?page=²`` became an internal error. ``int()`` also accepts
what ``isdigit()`` does not (``"+1"``, ``" 1"``, ``"1_0"``, Arabic-Indic digits), and refuses
more than 4300 digits. :func:`ascii_int` accepts ``[0-9]{1,max_digits}`` and nothing else.

A manifest's numbers are read by one rule wherever they are written (a YAML value, a CSV cell of
``items_from``, a ``rerun --vary`` value): :data:`WHOLE` and :data:`NUMBER`, through
:func:`whole_number` and :func:`plain_number`. ``float()`` alone is no such rule: it takes
``1_0.5``, ``inf``, ``nan``, ``" 1.5 "`` and ``٣.٥``, and YAML 1.1 takes ``1_000.0`` and ``.inf``
but not ``+.5`` or ``-.5``, so one text used to be one number in a YAML file, another (or text) in
a CSV cell, and a third on the command line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DIGITS = re.compile(r"[0-9]+")

#: A whole number as a manifest writes one: an optional sign and ASCII decimal digits (leading
#: zeros change nothing: ``0042`` is 42). No ``_``, no ``0x``/``0o``/``0b``, no other script's
#: digits (``٣``, which ``int()`` would take as 3).
WHOLE = re.compile(r"[+-]?[0-9]+")
#: Any number as a manifest writes one: YAML 1.2's core-schema float without ``.inf`` and
#: ``.nan`` (``1.5``, ``.5``, ``5.``, ``-.5``, ``1e3``, ``2.5E-1``), a whole number included. No
#: ``_``, no infinity or NaN spelled out (no provider input takes either), ASCII digits only.
NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def ascii_int(text: str | None, *, max_digits: int) -> int | None:
    """``text`` as a non-negative int when it is 1 to ``max_digits`` ASCII digits, else None."""
    if text is None or not 0 < len(text) <= max_digits or _DIGITS.fullmatch(text) is None:
        return None
    return int(text)


def whole_number(text: str) -> int | None:
    """``text`` as an int when it is a :data:`WHOLE` number, else None. The caller refuses more
    than :data:`MAX_WHOLE_DIGITS` digits first (:func:`digits_in`): ``int()`` stops at 4,300."""
    return int(text) if WHOLE.fullmatch(text) else None


def plain_number(text: str) -> int | float | None:
    """``text`` as a number when it is one by :data:`NUMBER`, else None: an int when it is a whole
    number (:func:`whole_number`'s caveat holds), a float otherwise. A float may still be
    infinite (``1e999``): the schema check refuses that with its field."""
    if (whole := whole_number(text)) is not None:
        return whole
    return float(text) if NUMBER.fullmatch(text) else None


#: The words a text cell or option reads as a boolean (any case): the CSV habits of spreadsheets
#: and YAML 1.1's words alike, so ``yes`` in an ``items_from`` CSV cell and ``--vary
#: enable_safety_checker=yes`` are one value.
TRUE_WORDS = frozenset({"true", "yes", "y", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "n", "off", "0"})


def boolean_word(text: str) -> bool | None:
    """``text`` as a boolean (:data:`TRUE_WORDS`, :data:`FALSE_WORDS`, any case, blanks around
    ignored), or None when it is no such word (it stays text, which a boolean field refuses)."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def foreign_digits(text: str) -> bool:
    """Whether ``text`` holds a decimal digit of another script than ASCII (``٣``, ``३``): a
    number written with them is refused, and a message may say why."""
    return any(char.isdecimal() and not char.isascii() for char in text)


#: Most digits a whole number in a manifest, an ``items_from`` row or a ``--vary`` value may
#: have. Python refuses to convert more than 4,300 (a ``ValueError``), a float holds at most
#: about 308, and no provider input needs more than 20 (a 64-bit seed).
MAX_WHOLE_DIGITS = 100
_TOO_BIG = 10**MAX_WHOLE_DIGITS
TOO_MANY_DIGITS = f"a whole number of more than {MAX_WHOLE_DIGITS} digits is refused"


@dataclass(frozen=True, slots=True)
class WholeTooLong:
    """What a whole number of more than :data:`MAX_WHOLE_DIGITS` digits is read as, in a YAML
    manifest or a JSON row: never converted (Python refuses more than 4,300 digits, and no
    field takes even 101). The reader reports it, once, with where it is; whatever else sees
    the placeholder stays silent about it (an issue whose ``value`` is one is that report
    again), so the rest of the manifest is still checked and every other error listed."""

    digits: int


def too_many_digits(value: object) -> bool:
    """Whether ``value`` is an int of more than :data:`MAX_WHOLE_DIGITS` digits (no conversion
    to text, so any size is safe to ask about)."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _TOO_BIG


def whole_too_long(text: str) -> bool:
    """Whether ``text`` is a :data:`WHOLE` number of more than :data:`MAX_WHOLE_DIGITS` digits:
    one that is refused before :func:`whole_number` would be asked to convert it."""
    return WHOLE.fullmatch(text) is not None and digits_in(text) > MAX_WHOLE_DIGITS


def digits_in(text: str) -> int:
    """How many digits a number written as ``text`` (``[+-]digits``) has."""
    return len(text.strip().lstrip("+-"))
