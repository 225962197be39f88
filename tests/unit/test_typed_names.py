"""A batch reference typed under a locale that is not UTF-8, and how a message shows its bytes."""

from __future__ import annotations

import os
import sys

import pytest

from jobs.batch_names import typed_name
from jobs.printable import one_line, printable, shortened

#: What ``LC_ALL=C`` with Python's UTF-8 mode off makes of ``mañana`` on a command line.
ESCAPED = "ma\udcc3\udcb1ana"


@pytest.mark.skipif(sys.getfilesystemencoding() != "utf-8", reason="the test session's own encoding")
def test_utf8_bytes_the_locale_did_not_decode_are_read_as_utf8(monkeypatch: pytest.MonkeyPatch) -> None:
    # os.fsencode under an ASCII file-system encoding gives the bytes back from the surrogates;
    # under UTF-8 (this session) surrogateescape does the same.
    assert os.fsencode(ESCAPED) == "mañana".encode()
    assert typed_name(ESCAPED) == "mañana"
    assert typed_name("mañana") == "mañana"
    assert typed_name("plain-name") == "plain-name"
    assert typed_name("ma\udcf1ana") == "ma\udcf1ana"  # latin-1's ñ: no UTF-8, left as typed


def test_a_message_shows_an_undecoded_byte_as_that_byte() -> None:
    for show in (printable, one_line, shortened):
        assert show(ESCAPED) == "ma\\xc3\\xb1ana", show
    assert one_line("a\ud800b") == "a\\ud800b"  # any other lone surrogate: its escape
    assert shortened("\udcff" * 100, 3) == "\\xff\\xff\\xff… (100 characters)"
