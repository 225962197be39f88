"""JSON documents as every database wanbatch runs on can hold them.

Python's ``json`` reads text PostgreSQL's ``jsonb`` refuses: ``\\u0000`` (a NUL: "unsupported
Unicode escape sequence"), a lone UTF-16 surrogate such as ``\\ud800`` (no Unicode character;
"invalid input syntax for type json", or not even encodable as UTF-8), and ``NaN`` or
``Infinity`` (no JSON numbers at all). A document from outside that holds one would be refused
by the database on every try, though nothing is wrong with the database, so it is made storable
first: the same on SQLite, so both keep the same text (a lone surrogate, no UTF-8, would fail
there too, and in any file it is written to). The documents from outside are fal's: its signed
webhook bodies (:func:`jobs.store.store_delivery`) and every answer the fal client reads
(``worker.fal.errors.load_json``, and for the text of an answer that is not JSON, ``_short``).
"""

from __future__ import annotations

import math
import re
from typing import Any

#: What a ``jsonb`` string cannot hold: NUL and UTF-16 surrogates (in a Python string any
#: surrogate is a lone one: ``json`` joins an escaped pair into the one character it encodes).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
#: What each of them becomes: the Unicode replacement character.
REPLACEMENT = "\ufffd"


def holds_unstorable(text: str) -> bool:
    """Whether ``text`` holds a character no text of any database wanbatch runs on can hold (a
    NUL, a lone surrogate), so nothing stored can equal it.

    A lookup by such a text (a batch reference, a job id, an endpoint filter: typed by a user,
    or in a URL) finds nothing, and must say so without asking the database, which answers it
    differently on each: PostgreSQL refuses a NUL (a data error), SQLite compares it and finds
    nothing, and a lone surrogate (a command line that is not UTF-8) cannot even be sent.
    """
    return _UNSTORABLE.search(text) is not None


def storable_text(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD (the same string when it has none)."""
    return _UNSTORABLE.sub(REPLACEMENT, text)


def _storable_scalar(value: Any) -> Any:
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN, ±Infinity: what JSON itself would write for them is null
    return value


def storable_json(doc: Any) -> Any:
    """``doc`` (as ``json.loads`` returns it) with every string, dict keys included, made
    storable (:func:`storable_text`) and every non-finite float made ``None``; a copy, ``doc``
    itself is left alone.

    Iterative, not recursive: ``doc`` may be nested as deep as ``json.loads`` went, which is
    about as deep as Python recurses, and this runs on a thread already some frames down.
    """
    containers = (dict, list, tuple)
    if not isinstance(doc, containers):
        return _storable_scalar(doc)
    root: Any = {} if isinstance(doc, dict) else []
    pending: list[tuple[Any, Any]] = [(doc, root)]
    while pending:
        source, target = pending.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, value in items:
            copied: Any
            if isinstance(value, containers):
                copied = {} if isinstance(value, dict) else []
                pending.append((value, copied))
            else:
                copied = _storable_scalar(value)
            if isinstance(target, dict):
                target[storable_text(key) if isinstance(key, str) else key] = copied
            else:
                target.append(copied)
    return root
