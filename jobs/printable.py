"""Text from outside (a manifest's batch name, fal's error words, a prompt) made safe to show on
a terminal.

A terminal obeys control characters in what it prints: ``ESC ] 0 ; … BEL`` retitles the window,
``ESC ] 52`` writes the clipboard, ``ESC [ 2 J`` clears the screen, and bidirectional overrides
(U+202E, "Trojan Source", https://trojansource.codes/) make text read differently than it is. A
hostile provider's error message, or a shared manifest's name, must not do any of that to the
operator's terminal when ``status`` or a log line shows it. So every such character is shown as
its escape (``\\x1b``, ``\\u202e``) instead: visible, copyable, inert. Line breaks and tabs stay
(:func:`one_line` escapes them too, for a table cell or a heading, and for what a one-line message
quotes: a path, ``jobs.fs.shown_path``; a value, :func:`shortened`; a manifest issue; what an
error says, :func:`first_line`). JSON output needs none of this (``json.dumps`` escapes control
characters itself).
"""

from __future__ import annotations

import os
import re
from typing import Protocol

#: C0 controls but tab and line feed, DEL, C1 controls, and the bidirectional embeddings,
#: overrides and isolates (U+202A–U+202E, U+2066–U+2069), plus the line and paragraph separators;
#: and lone surrogates (U+D800–U+DFFF), which no UTF-8 stream or strict JSON parser takes.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        # A byte the file-system encoding did not decode (``surrogateescape``: a command-line
        # argument or file name under ``LC_ALL=C``): shown as the byte it is, ``\xc3``, as
        # ``jobs.fs.shown_bytes`` shows it.
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on shown as its escape instead."""
    return _UNSAFE.sub(_escaped, text)


#: What :func:`one_line` escapes: :data:`_UNSAFE`, and line feeds and tabs too.
_NOT_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029\ud800-\udfff]")
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


def _said(exc: BaseException) -> BaseException:
    """The error whose words ``exc`` carries: what the driver raised (``.orig``) when SQLAlchemy
    wrapped it (its own words add the statement and its parameters), else ``exc`` itself."""
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def _first_words(said: BaseException, limit: int | None) -> str:
    line = str(said).strip().split("\n", 1)[0].strip()
    return one_line(line if limit is None else line[:limit])


def first_line(exc: BaseException, *, limit: int | None = None) -> str:
    """The first line of what ``exc`` says, for a log line or a one-line message: the driver's
    words when SQLAlchemy wrapped its error (not SQLAlchemy's ``(psycopg.OperationalError)``
    prefix, statement and parameters), escaped like :func:`one_line` (a server's words, or a
    value they quote, must neither drive the terminal nor forge a log line); its type's name
    when it says nothing. ``limit`` cuts the line to that many characters, before escaping (so
    no escape is cut in half).

    Lines end at line feeds only (as :func:`cli.output.json_error` splits them):
    ``str.splitlines`` also ended one at a carriage return or U+2028 that a quoted value held;
    those are shown as their escapes instead."""
    said = _said(exc)
    return _first_words(said, limit) or type(said).__name__


def named_first_line(exc: BaseException, *, limit: int | None = None) -> str:
    """``Type: first line`` (:func:`first_line`), the type being that of the error whose words
    they are (``AdminShutdown: terminating connection due to administrator command``, not
    SQLAlchemy's ``OperationalError``); the type alone when it says nothing."""
    said = _said(exc)
    line = _first_words(said, limit)
    return f"{type(said).__name__}: {line}" if line else type(said).__name__


#: Characters of a value a message quotes (:func:`quoted`): enough to recognise it, few enough
#: that its line stays a line.
QUOTED_CHARS = 60


#: A doubled full stop that ends a sentence (``refused.. Start it``, ``refused..`` at the end): not
#: part of an ellipsis (``...``), nor a path's parent (``/srv/..``) or a lone ``..``.
_DOUBLED_STOP = re.compile(r"(?<![.\s/\\])\.\.(?=\s|$)")


def clause(text: str) -> str:
    """``text`` without the full stop that ends it, for a message that goes on after it: a
    client's error (``Error 111 connecting to 127.0.0.1:1. Connection refused.``) quoted before
    ``. Start it…`` made ``refused.. Start it``. An ellipsis (``...``, ``…``) stays as it is."""
    text = text.rstrip()
    if text.endswith(".") and not text.endswith(".."):
        return text[:-1]
    return text


def single_stops(text: str) -> str:
    """``text`` with each doubled full stop that ends a sentence made one (``refused.. Start`` →
    ``refused. Start``), wherever text quoted in it met a stop of its own; ellipses (``...``) and
    paths (``/srv/..``) stay as they are. The last line behind :func:`clause`, for messages that
    quote others' words (``doctor``'s)."""
    return _DOUBLED_STOP.sub(".", text)


def shortened(text: str, limit: int = QUOTED_CHARS) -> str:
    """``text`` cut to its first ``limit`` characters and "…" when longer, with its length said:
    a 5,000-character value quoted whole made its one-line error 5,000 characters long.

    Escaped like :func:`one_line` (after the cut, so no escape is cut in half): a value holding a
    line break made its one-line message two."""
    if len(text) <= limit:
        return one_line(text)
    return f"{one_line(text[:limit])}… ({len(text):,} characters)"


def quoted(value: object, limit: int = QUOTED_CHARS) -> str:
    """``repr(value)`` for a message, shortened like :func:`shortened`: a long text by its first
    ``limit`` characters (quoted, then "…"), a long list or mapping by its repr's start."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}… ({len(value):,} characters)"
    text = repr(value)
    if len(text) <= limit:
        return text
    count = f" ({len(value):,} items)" if isinstance(value, list | dict) else ""
    return f"{text[:limit]}…{count}"


def size_text(size: int) -> str:
    """``37 kB``, ``1.2 GB``: decimal units, as disks are sold and ``df -H`` shows them."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}" if size < 10 * scale else f"{size // scale:,} {unit}"
    return f"{size} bytes"


#: A batch name a shell passes as one word, unchanged: no quoting, globbing or expansion needed.
_SHELL_WORD = re.compile(r"[\w.@+-]+", re.ASCII)
#: The suffixes that make ``wanbatch run REF`` read REF as a manifest file, never a batch name.
_FILE_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl", ".csv")
#: Characters of the batch id a hint shows instead of the name: unique in practice, and long
#: enough (``store.MIN_ID_PREFIX`` is 6) for every command that takes a batch.
SHELL_ID_CHARS = 12
#: A name a command may read as another batch's id prefix (``store.MIN_ID_PREFIX`` to
#: ``store.ID_CHARS`` hexadecimal characters): ``store.get_batch`` refuses it as ambiguous when
#: one exists, and one may be stored after the hint is printed.
_ID_LIKE = re.compile(r"[0-9a-fA-F]{6,32}", re.ASCII)


def shell_ref(name: str, batch_id: str) -> str:
    """How to name a batch in a command the user copies from a hint (``wanbatch resume REF``):
    its name when that is one shell word every command reads as this batch, else its id's first
    :data:`SHELL_ID_CHARS` characters.

    A name is not enough when the shell would need it quoted, when click would read it as an
    option (``-h`` printed help; ``--json`` was "Missing argument"), or when ``run REF`` would
    read it as a file instead of the batch: ``.`` and ``..``, a manifest or items suffix
    (``base.yaml`` ran that file), a name longer than a file name may be, or a file of that name
    in the current folder (where the user types the hint). Nor when the name looks like a batch
    id's prefix (``8e70d40c``): a command refuses it as ambiguous once another batch's id starts
    with it, which a batch stored later may.
    """
    if (
        _SHELL_WORD.fullmatch(name)
        and not _ID_LIKE.fullmatch(name)
        and not name.startswith("-")
        and name not in (".", "..")
        and not name.lower().endswith(_FILE_SUFFIXES)
        and len(name.encode()) <= 255
        and not os.path.lexists(name)
    ):
        return name
    return batch_id[:SHELL_ID_CHARS]


def is_a_terminal(stream: object) -> bool:
    """Whether ``stream`` writes to a terminal: its descriptor is a tty (a stream with none, a
    ``StringIO``, answers with its own ``isatty``; one that cannot say is no terminal).

    Not rich's ``Console.is_terminal``: that is True whenever ``FORCE_COLOR`` (or
    ``TTY_COMPATIBLE=1``) is set, as it often is in CI, and a log file then got ``run``'s live
    bar, cursor moves and carriage returns. Those variables ask for colour; whether a line may be
    redrawn in place, or prose wrapped at the terminal's width, is for the stream to say.
    """
    try:
        return os.isatty(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        pass
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


class _Console(Protocol):
    """What :func:`redraws` reads of a rich ``Console`` (the domain does not import rich)."""

    @property
    def file(self) -> object: ...

    @property
    def is_terminal(self) -> bool: ...

    @property
    def is_dumb_terminal(self) -> bool: ...


def redraws(console: _Console) -> bool:
    """Whether ``console`` (a rich ``Console``) may draw a live display: a spinner, a status, a
    progress bar redrawn in place. Only when its stream :func:`is_a_terminal` and rich agrees
    (``TTY_COMPATIBLE=0``, a dumb terminal: no redraws there either).

    The one test for every live display of wanbatch (``run``'s bar, the spinner of ``validate``,
    ``estimate``, ``submit`` and ``doctor``): with ``FORCE_COLOR`` set into a file or a pipe,
    rich drew its spinner there (``\\x1b[?25l``, a ``\\r\\x1b[2K`` frame each 80 ms).
    """
    return is_a_terminal(console.file) and console.is_terminal and not console.is_dumb_terminal
