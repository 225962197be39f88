"""A batch name's one spelling: Unicode NFC.

The same name can be typed as different code points: ``é`` as one character (NFC, what most
editors write) or as ``e`` and a combining accent (NFD, what macOS file names and some keyboards
give). Both look identical in a terminal and in ``status``, and the batch's folder was already
named by the NFC form (:func:`jobs.outputs.slug`), yet the database compared code points: the
same manifest saved the other way made a second batch that rendered and billed every job again,
into the same folder. So a name is NFC-normalised wherever it is stored or looked up — a
manifest's ``name``, every command's and the dashboard's NAME, a rerun's ``NAME-rerun-N`` — and
this is the one place that says how.
"""

from __future__ import annotations

import os
import unicodedata
from typing import Final, Literal

#: The normal form batch names are stored and compared in.
FORM: Final[Literal["NFC"]] = "NFC"


def batch_name(name: str) -> str:
    """``name`` in the form batch names are stored and compared in (NFC)."""
    return unicodedata.normalize(FORM, name)


def typed_name(text: str) -> str:
    """A batch reference as typed on a command line, read as the UTF-8 it is.

    A session whose file-name encoding is not UTF-8 (``LC_ALL=C`` with Python's UTF-8 mode off)
    decodes each byte of ``mañana`` beyond ASCII as a lone surrogate (``ma\\udcc3\\udcb1ana``),
    which named no batch: names are stored as text, and were written under UTF-8. When those
    bytes are UTF-8 (:func:`os.fsencode` gives them back), the text they spell is meant; else
    ``text`` as it is (its bytes then name no batch, and a message shows them as ``\\xNN``).
    """
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeError:
        return text
