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
