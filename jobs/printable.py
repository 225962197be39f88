"""Text from outside (a manifest's batch name, fal's error words, a prompt) made safe to show on
a terminal.

A terminal obeys control characters in what it prints: ``ESC ] 0 ; … BEL`` retitles the window,
``ESC ] 52`` writes the clipboard, ``ESC [ 2 J`` clears the screen, and bidirectional overrides
(U+202E, "Trojan Source", https://trojansource.codes/) make text read differently than it is. A
hostile provider's error message, or a shared manifest's name, must not do any of that to the
operator's terminal when ``status`` or a log line shows it. So every such character is shown as
its escape (``\\x1b``, ``\\u202e``) instead: visible, copyable, inert. Line breaks and tabs stay
(:func:`one_line` escapes them too, for a table cell or a heading). JSON output needs none of
this (``json.dumps`` escapes control characters itself).
"""

from __future__ import annotations

import re

#: C0 controls but tab and line feed, DEL, C1 controls, and the bidirectional embeddings,
#: overrides and isolates (U+202A–U+202E, U+2066–U+2069), plus the line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on shown as its escape instead."""
    return _UNSAFE.sub(_escaped, text)


#: What :func:`one_line` escapes: :data:`_UNSAFE`, and line feeds and tabs too.
_NOT_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")
_BREAKS = {"\n": "\\n", "\t": "\\t"}


def _escaped_one_line(match: re.Match[str]) -> str:
    return _BREAKS.get(match.group()) or _escaped(match)


def one_line(text: str) -> str:
    """:func:`printable`, with line feeds and tabs escaped as well (``\\n``, ``\\t``): text that
    must stay on its one line, such as a batch name in a table row."""
    return _NOT_ONE_LINE.sub(_escaped_one_line, text)


def control_character(text: str) -> str | None:
    """The escape of the first character of ``text`` that :func:`one_line` escapes (a control
    character, line break, tab or bidirectional override), or None when there is none."""
    found = _NOT_ONE_LINE.search(text)
    return None if found is None else _escaped_one_line(found)
