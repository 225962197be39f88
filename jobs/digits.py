"""Whole numbers from untrusted text: ASCII digits only, and not too many of them.

``str.isdigit()`` is no guard for ``int()``: it accepts superscripts (``"²"``), circled and
other Unicode digits that ``int()`` then refuses with a ``ValueError`` — an unauthenticated
``X-Fal-Webhook-Timestamp: ²`` or ``?page=²`` became an internal error. ``int()`` also accepts
what ``isdigit()`` does not (``"+1"``, ``" 1"``, ``"1_0"``, Arabic-Indic digits), and refuses
more than 4300 digits. :func:`ascii_int` accepts ``[0-9]{1,max_digits}`` and nothing else.
"""

from __future__ import annotations

import re

_DIGITS = re.compile(r"[0-9]+")


def ascii_int(text: str | None, *, max_digits: int) -> int | None:
    """``text`` as a non-negative int when it is 1 to ``max_digits`` ASCII digits, else None."""
    if text is None or not 0 < len(text) <= max_digits or _DIGITS.fullmatch(text) is None:
        return None
    return int(text)


#: Most digits a whole number in a manifest, an ``items_from`` row or a ``--vary`` value may
#: have. Python refuses to convert more than 4,300 (a ``ValueError``), a float holds at most
#: about 308, and no provider input needs more than 20 (a 64-bit seed).
MAX_WHOLE_DIGITS = 100
_TOO_BIG = 10**MAX_WHOLE_DIGITS
TOO_MANY_DIGITS = f"a whole number of more than {MAX_WHOLE_DIGITS} digits is refused"


def too_many_digits(value: object) -> bool:
    """Whether ``value`` is an int of more than :data:`MAX_WHOLE_DIGITS` digits (no conversion
    to text, so any size is safe to ask about)."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _TOO_BIG


def digits_in(text: str) -> int:
    """How many digits a number written as ``text`` (``[+-]digits``) has."""
    return len(text.strip().lstrip("+-"))
