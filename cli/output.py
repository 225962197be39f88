"""What the ``wanbatch`` commands print, and how a command ends.

Output rules (the contract): with ``--json`` exactly one JSON object goes to stdout; human
output goes to stdout; progress and logs go to stderr. Exit codes: 0 success, 1 some jobs
failed or were cancelled, 2 invalid input or usage (and 70 for a bug, see :func:`cli.main`).
Bad input never prints a traceback: every command runs its work through :func:`guarded`.

Layout rules, so a new user's 80-column terminal reads well: tables have no side borders and
narrow headers; batch ids are shown as at least the 8-character prefix every command accepts
(longer only when needed to stay unique); names and endpoints give way (an ellipsis, or a wrap)
before anything else does; money is never cut and always comes from :func:`jobs.money.usd_text`
(one rounding everywhere); a line of prose longer than the terminal is cut at a `` · ``
boundary or wrapped, never left to run off the edge.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import io
import json
import math
import os
import re
import sys
import textwrap
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

from rich import box
from rich.cells import cell_len, set_cell_size
from rich.console import Console
from rich.markup import escape as markup_escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from jobs.clock import utcnow
from jobs.errors import Issue, ManifestError, UsageError, WanbatchError
from jobs.fs import has_escaped_bytes, path_error, shown_bytes
from jobs.money import DAILY_CAP_ERROR, daily_cap_in, round_cents, usd_apart, usd_text
from jobs.printable import is_a_terminal, one_line, printable, redraws, shell_ref
from jobs.schedule import eta_text
from jobs.states import JobState

if TYPE_CHECKING:
    from jobs.batches import BatchReport, SubmitResult
    from jobs.cost import CostLine, CostReport
    from jobs.pricing import EstimateReport
    from jobs.settings import Settings

#: The widest ``COLUMNS`` (and tallest ``LINES``) taken: wider than any screen; a larger value is
#: taken as this. Layout loops over the width (:func:`distinct_fits`): a billion never ended.
MAX_TERMINAL_CELLS = 10_000


def _sane_terminal_size() -> None:
    """Make ``COLUMNS`` and ``LINES`` sizes rich can use, or remove them, before any console reads them.

    rich takes any string of digits as the size, each time it measures: ``COLUMNS=0`` made every
    width 0 (``range() arg 3 must not be zero`` in :func:`distinct_fits`), a billion made the
    layout run for ever, and ``²`` (a digit to :meth:`str.isdigit`, not to :func:`int`) or 5,000
    digits a traceback when the first console was made, before any command ran. A size that is no
    whole number above 0 is removed, as if unset (the terminal's size, or 80 columns, then); a
    larger one than :data:`MAX_TERMINAL_CELLS` becomes that. Changed in this process's
    environment, so every console of it (``run``'s progress too) reads the same.
    """
    for name in ("COLUMNS", "LINES"):
        value = os.environ.get(name)
        if value is None:
            continue
        text = value.strip()
        if not (text.isascii() and text.isdigit()) or not text.strip("0"):
            del os.environ[name]
        elif len(text.lstrip("0")) > len(str(MAX_TERMINAL_CELLS)) or int(text) > MAX_TERMINAL_CELLS:
            os.environ[name] = str(MAX_TERMINAL_CELLS)
        elif text != value:
            os.environ[name] = text


_sane_terminal_size()
# ``emoji=False``: rich would turn ``:x:`` in a user's path, prompt or batch name into an emoji,
# so a message (or a suggested command) would show text the user never wrote.


class _StderrConsole(Console):
    """The console of messages, progress and errors (stderr), which outlives its reader.

    A reader of stderr that goes away (``wanbatch run m.yaml 2>&1 | head -1``, a log shipper
    that died) made rich's default :meth:`Console.on_broken_pipe` end the command with exit 1
    — "some jobs failed", whatever happened — and point *stdout* at ``/dev/null``: a
    ``--json`` object or an export on a healthy stdout was lost. Here the command goes on and
    ends with its own exit code, its stdout intact: what it would have said on stderr goes
    to ``/dev/null`` (descriptor 2 too, so logging's handler and the interpreter's last flush
    of ``sys.stderr`` no longer fail either). See https://docs.python.org/3/library/signal.html#note-on-sigpipe.
    """

    def _check_buffer(self) -> None:
        # rich calls on_broken_pipe for EPIPE only; a stderr that cannot take a write for another
        # reason — a terminal gone (EIO: a disowned `run &` after logout), a full disk behind
        # `2>log` (ENOSPC), a descriptor open for reading (EBADF) — made the command an
        # "internal error" (exit 70), a `run` stopping with its batch unfinished. Any of them
        # is the same as a reader gone.
        try:
            super()._check_buffer()
        except OSError:
            del self._buffer[:]
            self.on_broken_pipe()

    def on_broken_pipe(self) -> None:
        self.quiet = True
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.file.fileno() if _has_fileno(self.file) else 2)
            finally:
                os.close(devnull)


def _has_fileno(stream: object) -> bool:
    try:
        stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
    return True


out = Console(soft_wrap=True, highlight=False, emoji=False)
err: Console = _StderrConsole(stderr=True, soft_wrap=True, highlight=False, emoji=False)

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


#: Exit code when the reader of standard output went away (``wanbatch export B | head``):
#: 128 + SIGPIPE, what a shell reports for a tool SIGPIPE ended; 1 would say jobs failed.
EXIT_BROKEN_PIPE = 141


class StdoutError(WanbatchError, OSError):
    """Standard output cannot be written: a full disk or a failing device behind ``>``, or no
    standard output at all (``>&-``). The environment's, not a bug: :func:`cli.main` says so in
    one ``error:`` line on stderr and exits 2 (under ``--json`` too: no object can be printed).
    An :class:`OSError` too (what a failed write raises); :func:`guarded` passes it on to
    :func:`cli.main`, which alone knows stdout is what cannot take the message."""

    exit_code = EXIT_USAGE

    def __init__(self, reason: str, what: str = "") -> None:
        super().__init__(f"cannot write {what}to standard output: {reason}")


class ReaderGone(WanbatchError):
    """The reader of standard output closed it (``| head``): :func:`cli.main` exits
    :data:`EXIT_BROKEN_PIPE`, saying nothing (:func:`guarded` passes it on). Not a
    BrokenPipeError on purpose: click and rich each end the process with exit 1 on one
    (``sys.exit(1)``), before :func:`cli.main` sees it."""

    exit_code = EXIT_BROKEN_PIPE


@contextlib.contextmanager
def writing_stdout(what: str = "") -> Iterator[None]:
    """Writes to standard output: their failure is :class:`ReaderGone` (a closed pipe) or
    :class:`StdoutError` (``cannot write {what}to standard output: REASON``), never an
    internal error. Every write to stdout goes through here: :class:`GuardedStdout` (which
    :func:`cli.main` makes ``sys.stdout``), and ``export``'s bytes."""
    try:
        yield
    except (ReaderGone, StdoutError):
        raise
    except BrokenPipeError:
        raise ReaderGone from None
    except OSError as exc:
        raise StdoutError(exc.strerror or str(exc) or type(exc).__name__, what) from None


#: Why a write to a closed standard output fails.
_CLOSED = "Bad file descriptor (it is closed)"


class _ClosedBytes(io.RawIOBase):
    """The byte stream of a standard output that is closed: every write fails (EBADF)."""

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        raise OSError(errno.EBADF, _CLOSED)


class _ClosedText(io.TextIOBase):
    """Standard output when the process has none (``wanbatch status >&-``: Python makes
    ``sys.stdout`` None): every write fails (EBADF), as ``ls >&-`` does, instead of an
    AttributeError of None."""

    encoding = "utf-8"
    errors = "strict"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, _CLOSED)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise io.UnsupportedOperation("standard output is closed")

    @property
    def buffer(self) -> io.RawIOBase:
        return _ClosedBytes()


#: What a glyph of wanbatch's own output (or of rich's) becomes on a stream whose encoding has
#: no such character (``LC_ALL=C``: ASCII; ``PYTHONIOENCODING=latin-1``), as rich's tables already
#: fall back to ASCII borders there. Any other character such a stream cannot take (a name's
#: ``ñ`` under ASCII, a surrogate of a file name that is not UTF-8) is shown as its escape.
_ASCII_GLYPHS = {
    "✓": "ok",
    "✗": "x",
    "·": "-",
    "…": "...",
    "—": "--",
    "–": "-",
    "→": "->",
    "←": "<-",
    "×": "x",
    "±": "+/-",
    "─": "-",
    "━": "-",
    "│": "|",
    "┃": "|",
    "└": "+",
    "┘": "+",
    "├": "+",
    "┤": "+",
    "┌": "+",
    "┐": "+",
    "┼": "+",
    "►": ">",
    "◄": "<",
    "▼": "v",
    "▲": "^",
    "•": "*",
    "█": "#",
    "░": ".",
    "⚠": "!",
}


def encodable(text: str, encoding: str | None) -> bool:
    """Whether a stream of ``encoding`` can take ``text`` as it is (strict)."""
    try:
        text.encode(encoding or "utf-8")
    except UnicodeEncodeError:
        return False
    except LookupError:  # an encoding Python does not know: the stream's own business
        return True
    return True


def fitted(text: str, encoding: str | None) -> str:
    """``text`` as a stream of ``encoding`` can take it: unchanged when it can (the usual case,
    and always under UTF-8 for text without surrogates); else each character it cannot hold
    becomes its ASCII stand-in (:data:`_ASCII_GLYPHS`; a spinner's braille dot a ``*``) or its
    backslash escape (``\\xf1``, ``\\udcc3``). Never raises: an ordinary command once ended as
    an "internal error" (UnicodeEncodeError) on a stream that was not UTF-8."""
    if encodable(text, encoding):
        return text
    enc = encoding or "utf-8"
    shown: list[str] = []
    for ch in text:
        if encodable(ch, enc):
            shown.append(ch)
        elif (glyph := _ASCII_GLYPHS.get(ch)) is not None:
            shown.append(glyph)
        elif "\u2800" <= ch <= "\u28ff":  # rich's spinner frames
            shown.append("*")
        elif "\udc80" <= ch <= "\udcff":  # a file name's byte its encoding did not decode
            shown.append(shown_bytes(ch))
        else:
            shown.append(ch.encode("ascii", "backslashreplace").decode("ascii"))
    return "".join(shown)


class FittedText:
    """A text stream whose writes never fail for its encoding: each is :func:`fitted` to it.
    ``sys.stderr`` while a command runs (:func:`guarded_stdout`): rich's messages, log lines and
    ``error:`` lines; anything else is ``target``'s."""

    def __init__(self, target: TextIO) -> None:
        self.target: TextIO = target

    def _fit(self, text: str) -> str:
        return fitted(text, getattr(self.target, "encoding", None))

    def write(self, text: str) -> int:
        self.target.write(self._fit(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        self.target.writelines(self._fit(line) for line in lines)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


class GuardedStdout(FittedText):
    """``sys.stdout`` while a command runs (:func:`cli.main`): ``target``'s writes and flushes
    through :func:`writing_stdout`, so rich, click and :func:`emit_json` all fail the same way,
    each :func:`fitted` to its encoding (a ``--json`` object is made ASCII first: :func:`emit_json`);
    anything else is ``target``'s. ``target`` None (no standard output) is :class:`_ClosedText`."""

    def __init__(self, target: TextIO | None) -> None:
        super().__init__(target if target is not None else cast(TextIO, _ClosedText()))

    def write(self, text: str) -> int:
        with writing_stdout():
            return super().write(text)

    def writelines(self, lines: Iterable[str]) -> None:
        with writing_stdout():
            super().writelines(lines)

    def flush(self) -> None:
        with writing_stdout():
            self.target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


class GuardedStderr:
    """``sys.stderr`` while a command runs (:func:`cli.main`): a write or flush that fails (a
    reader gone, ``2>&1 | head``; a full disk behind ``2>log``; a terminal gone) is dropped, as
    the README promises, and descriptor 2 is pointed at ``/dev/null`` from then on (as
    :meth:`_StderrConsole.on_broken_pipe` does), so logging's handler and the interpreter's last
    flush fail no more either. Else click's own write of a line on Ctrl-C, or any ``print(…,
    file=sys.stderr)``, failed into an OSError that made the command an internal error (70) or a
    reader of *stdout* gone (141). Anything else is ``target``'s."""

    def __init__(self, target: TextIO) -> None:
        self.target = target

    def write(self, text: str) -> int:
        try:
            return self.target.write(text)
        except (OSError, ValueError):
            self._gone()
            return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self.target.flush()
        except (OSError, ValueError):
            self._gone()

    def _gone(self) -> None:
        """What is left for stderr, and all that comes, goes to ``/dev/null``."""
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.target.fileno() if _has_fileno(self.target) else 2)
            finally:
                os.close(devnull)
        with contextlib.suppress(OSError, ValueError):
            self.target.flush()  # the buffer that failed, now into /dev/null

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


@contextlib.contextmanager
def guarded_stderr() -> Iterator[None]:
    """One command's standard error: ``sys.stderr`` is a :class:`GuardedStderr` of it (put back
    after); none at all (Python found no descriptor 2) stays None."""
    previous = sys.stderr
    if previous is not None and not isinstance(previous, GuardedStderr):
        sys.stderr = cast(TextIO, GuardedStderr(previous))
    try:
        yield
    finally:
        sys.stderr = previous


#: Set once a ``--json`` object has started on its way to stdout: an exit on the spot (a second
#: Ctrl-C, :func:`hard_exit_json`) then adds no second one.
_json_written = threading.Event()


@contextlib.contextmanager
def guarded_stdout() -> Iterator[None]:
    """One command's standard output: ``sys.stdout`` is a :class:`GuardedStdout` of it and
    ``sys.stderr`` a :class:`FittedText` of its own (both put back after), and no ``--json``
    object has been printed yet."""
    previous, previous_err = sys.stdout, sys.stderr
    _json_written.clear()
    sys.stdout = cast(TextIO, GuardedStdout(previous))
    if previous_err is not None and not isinstance(previous_err, FittedText):
        sys.stderr = cast(TextIO, FittedText(previous_err))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = previous, previous_err


def _non_finite(value: object) -> str | None:
    """``inf``, ``-inf`` or ``nan`` for a number (float or Decimal) that is not finite; else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Decimal) and not value.is_finite():
        return "nan" if value.is_nan() else ("inf" if value > 0 else "-inf")
    return None


def _strict(value: object) -> object:
    """``value`` with every non-finite number in it (keys too) as its :func:`_non_finite`
    text, which strict JSON can hold."""
    if (text := _non_finite(value)) is not None:
        return text
    if isinstance(value, Mapping):
        return {_strict(k): _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _json_default(value: object) -> str:
    """What JSON has no type for (a Decimal, a datetime): its text; a non-finite Decimal as a
    non-finite float is (:func:`_non_finite`)."""
    return _non_finite(value) or str(value)


def json_document(obj: Mapping[str, object], *, ascii_only: bool = False) -> str:
    """``obj`` as strict JSON (RFC 8259), on one line: a non-finite number (``1e999`` in a
    manifest, ``NaN`` in a JSONL item, quoted back in an issue's ``value``) is the string
    ``"inf"``, ``"-inf"`` or ``"nan"``, never ``Infinity``/``NaN``, which ``json.loads`` of
    other languages refuses. Anything else JSON has no type for is its ``str``. ``ascii_only``:
    every character beyond ASCII as its ``\\uXXXX`` escape (the same JSON, for any stream)."""
    try:
        return json.dumps(obj, default=_json_default, ensure_ascii=ascii_only, allow_nan=False)
    except ValueError:  # a non-finite float somewhere: the rare case, so only then walked
        return json.dumps(_strict(obj), default=_json_default, ensure_ascii=ascii_only, allow_nan=False)


def stdout_json(obj: Mapping[str, object]) -> str:
    """:func:`json_document` of ``obj`` as standard output can take it: as it is when its
    encoding holds every character (UTF-8, nearly always), else in ASCII (``\\uXXXX`` escapes):
    still the same valid JSON, where an ``ñ`` under ``LC_ALL=C`` made ``--json`` an "internal
    error" and a stand-in (:func:`fitted`) would make it other text, or no JSON at all."""
    text = json_document(obj)
    if has_escaped_bytes(text):
        # A file name's bytes no encoding decoded (``LC_ALL=C``, a byte that is no UTF-8) are
        # lone surrogates, which strict JSON parsers refuse: the text ``\\xc3\\xb1`` instead,
        # as every message shows them. Outside strings JSON is ASCII: only strings change.
        text = shown_bytes(text, backslash="\\\\")
        if encodable(text, getattr(sys.stdout, "encoding", None)):
            return text
        return _NON_ASCII.sub(lambda m: json.dumps(m.group()).strip('"'), text)
    if encodable(text, getattr(sys.stdout, "encoding", None)):
        return text
    return json_document(obj, ascii_only=True)


#: A character beyond ASCII (in a JSON text: always inside a string).
_NON_ASCII = re.compile("[^\x00-\x7f]")


def emit_json(obj: Mapping[str, object]) -> None:
    """Print one JSON object on stdout (the contract's ``--json`` output): the one place a
    ``--json`` object is written (:func:`json_document`), with :func:`emit_json_list` for one
    that ends in a long list."""
    text = stdout_json(obj) + "\n"
    _json_written.set()
    sys.stdout.write(text)
    sys.stdout.flush()


def emit_line(text: str) -> None:
    """Print ``text`` as one plain line on stdout, for a script to read (``submit``'s batch id:
    ``B=$(wanbatch submit m.yaml)``): no markup, no colour, never wrapped at the terminal's width
    (``COLUMNS``), whatever rich would do. The words for a human go to stderr beside it."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


#: Items :func:`emit_json_list` writes at a time.
JSON_LIST_CHUNK = 200


def emit_json_list(head: Mapping[str, object], key: str, items: Iterable[Mapping[str, object]]) -> None:
    """:func:`emit_json` of ``{**head, key: list(items)}`` (``key`` last), byte for byte, with
    the list written a few items at a time: a list of every job of two batches is never held
    whole. Each item is one :func:`json_document` (a non-finite number in one is its text, as
    in the whole object); ``head`` must not have ``key``."""
    assert key not in head
    opening = stdout_json({**head, key: []})
    assert opening.endswith("[]}")
    _json_written.set()
    sys.stdout.write(opening[:-2])
    chunk: list[str] = []
    separator = ""
    for item in items:
        chunk.append(separator + stdout_json(item))
        separator = ", "
        if len(chunk) >= JSON_LIST_CHUNK:
            sys.stdout.write("".join(chunk))
            chunk.clear()
    chunk.append("]}\n")
    sys.stdout.write("".join(chunk))
    sys.stdout.flush()


def hard_exit_json(error: str, batch_id: str | None = None) -> bytes | None:
    """The ``--json`` object of a command that is about to end on the spot (``os._exit``, a
    second Ctrl-C), ``{"ok": false, "error": ERROR, "interrupted": true, "batch": BATCH_ID}``
    (null when no batch is known to be stored), as bytes for ``os.write`` (a signal handler must
    not write through ``sys.stdout``, which the signal may have interrupted mid-write); None when
    an object was already printed."""
    if _json_written.is_set():
        return None
    _json_written.set()
    document = {"ok": False, "error": error, "interrupted": True, "batch": batch_id}
    return (json_document(document, ascii_only=True) + "\n").encode()  # any encoding takes it


def escape(text: str) -> str:
    """``text`` with rich's markup brackets made literal and its terminal control characters
    shown as escapes (:func:`jobs.printable.printable`): it may come from a manifest or from fal.

    Every piece of user-controlled text (a name, a prompt, a path, a message quoting input) goes
    through this before it is put in a markup string (the consoles print ``:x:`` as written too:
    ``emoji=False``)."""
    shown = printable(text)
    body = shown.rstrip("\\")
    if body == shown:
        return markup_escape(shown)
    # rich's escape gets one trailing backslash right, not two or more. Doubled, in front of an
    # empty tag pair, they show as written whatever markup follows (``[/bold]``) or not.
    return markup_escape(body) + "\\" * 2 * (len(shown) - len(body)) + "[default][/default]"


def issue_line(issue: Issue) -> str:
    """One validation issue, its severity in colour."""
    style = "red" if issue.severity == "error" else "yellow"
    return f"[{style}]{issue.severity}[/{style}] {escape(str(issue))}"


def error_text(exc: WanbatchError) -> str:
    """``exc``'s message as it is shown, on the terminal and in ``--json``: masked
    (:func:`jobs.redaction.masked_error`, as :func:`cli._fail` masks its line), so an error quoting
    what the user typed (``no batch '…'``, an export's path) never prints back FAL_KEY typed there."""
    from jobs.redaction import masked_error

    return masked_error(str(exc))


def json_error(exc: WanbatchError) -> dict[str, Any]:
    """The contract's ``{"ok": false, "error": …}`` for ``exc``: its first line as ``error``, and
    the lines under it (files, issues, one per line; their common indent removed) as
    ``details``. ``error`` alone left a script without the very lines that say what to fix (which
    source files of a rerun changed), which the terminal shows.

    Lines are split at line feeds only, where the terminal breaks them (:func:`escape` shows a
    CR, NEL or U+2028 as its escape): :meth:`str.splitlines` also split at those, so a value
    holding one became entries of its own. Masked as the ``error:`` line is (:func:`error_text`)."""
    head, *rest = error_text(exc).split("\n")
    payload: dict[str, Any] = {"ok": False, "error": head.rstrip(":")}
    details = [line.rstrip() for line in textwrap.dedent("\n".join(rest)).split("\n") if line.strip()]
    if details:
        payload["details"] = details
    return payload


def refused_manifest_text(exc: ManifestError) -> str:
    """The line under a refused manifest's issues (``1 error(s); nothing was submitted.``): on
    stderr after its glyph, and ``--json``'s ``error`` as it is, "the same line as on stderr"
    (the object said ``1 error(s) in manifest``, the exception's own head)."""
    return f"{exc.error_total} error(s); nothing was submitted."


def fail(exc: WanbatchError, as_json: bool) -> NoReturn:
    """Report a deliberate error (no traceback) and exit with its code: its ``error:`` line (and
    the lines under it, or a manifest's issues) on stderr, with ``--json`` too, as every other
    failure says it there (:func:`cli._fail`: a usage mistake, a bug), and with ``--json`` also
    its object on stdout (:func:`json_error`)."""
    if isinstance(exc, ManifestError):
        for issue in exc.issues:
            err.print(issue_line(issue))
        err.print(f"[red]✗ {refused_manifest_text(exc)}[/red]")
    else:
        err.print(f"[red]error:[/red] {escape(error_text(exc))}")
    if as_json:
        payload = json_error(exc)
        if isinstance(exc, ManifestError):
            payload["error"] = refused_manifest_text(exc)
            payload["issues"] = [i.as_dict() for i in exc.issues]
        emit_json(payload)
    sys.exit(exc.exit_code)


def path_failure(exc: OSError) -> UsageError | None:
    """The last resort for an OSError about a path that no check before it explained (a name
    longer than the file system allows, a folder without permission): a usage error, exit 2,
    ``<path>: <reason>``. None for one that names no path: that is a fault, not bad input."""
    message = path_error(exc)
    return None if message is None else UsageError(message)


def guarded(as_json: bool, action: Callable[[], int | None]) -> None:
    """Run ``action``; turn deliberate errors — and an OSError about a path the user gave
    (:func:`path_failure`), or a thread that cannot start (:mod:`jobs.thread_limit`) — into a
    message and the contract's exit code."""
    try:
        code = action()
    except (ReaderGone, StdoutError):  # standard output is what failed: cli.main says it
        raise
    except WanbatchError as exc:
        fail(exc, as_json)
    except OSError as exc:
        if (usage := path_failure(exc)) is None:
            raise
        fail(usage, as_json)
    except RuntimeError as exc:  # a thread that cannot start (`ulimit -u`): a limit, not a bug
        from jobs.thread_limit import ThreadLimitError, cannot_start_thread, thread_limit_line

        if not cannot_start_thread(exc):
            raise
        fail(ThreadLimitError(thread_limit_line()), as_json)
    sys.exit(code or EXIT_OK)


def guarded_read(as_json: bool, action: Callable[[], int | None]) -> None:
    """:func:`guarded`, for a command an operator runs to look (``status``, ``cost``, ``export``,
    ``diff``): its PostgreSQL transactions wait at most ``WANBATCH_DATABASE_LOCK_WAIT`` for a lock
    another session holds (:func:`jobs.db.lock_waits_bounded`), then it ends with one line naming
    that session (exit 2, as for a database that cannot be reached) instead of waiting in silence
    for as long as the other session stays open. It only reads (:func:`jobs.db.only_reading`): a
    SQLite database whose disk is full is read as it is, where a writing command refuses."""

    def bounded() -> int | None:
        from jobs import db
        from jobs.settings import get_settings

        with db.lock_waits_bounded(get_settings()), db.only_reading():
            return action()

    guarded(as_json, bounded)


def print_warnings(result: SubmitResult) -> None:
    """Say on stderr what storing the batch warned of (items that collapsed into one, a past
    deadline of a batch resumed, variations that repeat others …)."""
    for warning in result.warnings:
        err.print(f"[yellow]warning[/yellow] {escape(warning)}")


def print_budget_note(result: SubmitResult) -> None:
    """Say on stderr that (re)submitting changed the batch's budget cap, or the estimates of its
    jobs not sent yet (the prices in force changed since they were stored)."""
    for note in (result.budget_note(), result.estimate_note()):
        if note:
            err.print(f"[yellow]{escape(note)}[/yellow]")


def final_code(report: BatchReport) -> int:
    """1 when a job of the batch's manifest failed or was cancelled, or a job is not finished;
    else 0. A job the manifest no longer has that ended (``not_in_manifest``: its item fixed,
    or removed) is no failure of the batch now: a fixed manifest would exit 1 for ever."""
    counts = report["counts"]
    left_out = report.get("not_in_manifest") or {}
    failed = counts.get("failed", 0) - left_out.get("failed", 0)
    cancelled = counts.get("cancelled", 0) - left_out.get("cancelled", 0)
    unfinished = report["total"] - report["finished"]
    return EXIT_SOME_FAILED if failed > 0 or cancelled > 0 or unfinished else EXIT_OK


# --------------------------------------------------------------------------- layout helpers

#: Shortest batch id prefix shown: the 8 characters every command accepts (6 would do, 8 is
#: what people copy).
ID_CHARS = 8


def short_id(batch_id: str) -> str:
    """The batch id as shown by default: its first :data:`ID_CHARS` characters."""
    return batch_id[:ID_CHARS]


def short_ids(batch_ids: list[str]) -> dict[str, str]:
    """Each id shortened to the same length, :data:`ID_CHARS` or more: unique among ``batch_ids``."""
    length = ID_CHARS
    while length < 32 and len({b[:length] for b in batch_ids}) < len(set(batch_ids)):
        length += 2
    return {b: b[:length] for b in batch_ids}


def width() -> int:
    """The terminal's width in cells (``COLUMNS`` wins; 80 when not a terminal)."""
    return out.width


def fit(text: str, cells: int) -> str:
    """``text`` cut to ``cells`` terminal cells with ``…`` (wide characters count double)."""
    if cell_len(text) <= cells:
        return text
    return set_cell_size(text, max(cells - 1, 0)).rstrip() + "…" if cells > 0 else ""


def _head(text: str, cells: int) -> str:
    """The longest start of ``text`` that takes at most ``cells`` cells."""
    used = 0
    for i, char in enumerate(text):
        used += cell_len(char)
        if used > cells:
            return text[:i]
    return text


def _tail(text: str, cells: int) -> str:
    """The longest end of ``text`` that takes at most ``cells`` cells."""
    return _head(text[::-1], cells)[::-1]


def fit_middle(text: str, cells: int, tail: int | None = None) -> str:
    """``text`` cut to ``cells`` cells with ``…`` in the middle: its start and its end stay
    (``seed-res…-rerun-2``), and the end is what tells a rerun, a date or a number apart.
    ``tail``: the cells kept at the end (default: half of what is kept)."""
    if cell_len(text) <= cells:
        return text
    if cells < 2:
        return "…" if cells == 1 else ""
    keep = cells - 1
    tail = keep // 2 if tail is None else max(0, min(tail, keep))
    return _head(text, keep - tail) + "…" + (_tail(text, tail) if tail else "")


def _could_be(shown: str, name: str) -> bool:
    """Whether ``shown`` (a name, or its start and end around ``…``) could be ``name``."""
    if "…" not in shown:
        return shown == name
    head, _, tail = shown.rpartition("…")
    return len(name) >= len(head) + len(tail) and name.startswith(head) and name.endswith(tail)


class _Names:
    """Names, sorted as they are and as read backwards: those that start with a given head, or
    end with a given tail, are one range of either (found by bisection). What a cut of one name
    could also be is then read among the fewer of the two ranges, not among every name: checked
    against every other name, :func:`distinct_fits` was quadratic in the batches, and 2,000
    long names that share a start took ``status`` 1.6 s to lay out at 80 columns."""

    def __init__(self, names: Sequence[str]) -> None:
        self.forward = sorted(names)
        self.backward = sorted(name[::-1] for name in names)
        self.every = frozenset(names)

    def others_like(self, shown: str, name: str) -> bool:
        """Whether ``shown`` (``name``, or its start and end around ``…``) could be another name."""
        if "…" not in shown:
            return shown != name and shown in self.every
        head, _, tail = shown.rpartition("…")
        starting = _starting(self.forward, head)
        ending = _starting(self.backward, tail[::-1])
        if len(starting) <= len(ending):
            candidates: Iterable[str] = starting
        else:
            candidates = (reversed_name[::-1] for reversed_name in ending)
        return any(other != name and _could_be(shown, other) for other in candidates)


def _starting(ordered: list[str], head: str) -> list[str]:
    """The strings of sorted ``ordered`` that start with ``head`` (one range of it)."""
    low = bisect.bisect_left(ordered, head)
    high = bisect.bisect_right(ordered, head, lo=low, key=lambda text: text[: len(head)])
    return ordered[low:high]


def distinct_fits(names: list[str], cells: int) -> dict[str, str | None]:
    """Each of ``names`` shown in ``cells`` cells so that what is shown could be no other of them.

    A name that fits is shown whole; a longer one with :func:`fit_middle`, trying where to cut
    (half and half, then more of its end, then more of its start) until no other name starts
    and ends as shown. None for a name no cut tells apart: show it whole (wrapped)."""
    distinct = list(dict.fromkeys(names))
    keep = max(cells - 1, 0)
    tails = [*range(keep // 2, keep + 1), *range(keep // 2 - 1, -1, -1)]
    shown: dict[str, str | None] = {}
    index: _Names | None = None
    for name in distinct:
        if cell_len(name) <= cells:
            shown[name] = name
            continue
        index = index or _Names(distinct)
        cuts = (fit_middle(name, cells, t) for t in tails)
        shown[name] = next((c for c in cuts if not index.others_like(c, name)), None)
    return shown


def wrapped(
    text: str, cells: int, *, lead: str = "", lead_style: str = "", max_lines: int | None = None
) -> str:
    """``lead`` + ``text`` as markup, word-wrapped at ``cells`` in a terminal (or with ``COLUMNS``)
    and at most ``max_lines`` lines, the last then cut after a whole word with ``…``; into a pipe
    or a file with no width given, one line, whole (see :func:`say`). ``text`` and ``lead`` are
    plain (escaped here)."""
    text, lead = printable(text), printable(lead)  # as shown: what is wrapped is what is printed
    if not (is_a_terminal(out.file) or os.environ.get("COLUMNS")):  # FORCE_COLOR: colour only
        lines = [lead + text]
    else:
        body = Text(lead + text)
        lines = [line.plain.rstrip() for line in body.wrap(out, cells, overflow="fold")]
        if max_lines is not None and len(lines) > max_lines:
            last = lines[max_lines - 1]
            while last and cell_len(last) + 2 > cells:
                last = last.rsplit(" ", 1)[0] if " " in last.strip() else last[: max(cells - 2, 0)]
            lines = [*lines[: max_lines - 1], (last + " …").lstrip()]
    joined = "\n".join(lines)
    if lead and joined.startswith(lead):
        head = f"[{lead_style}]{escape(lead)}[/{lead_style}]" if lead_style else escape(lead)
        return head + escape(joined[len(lead) :])
    return escape(joined)


def join_lines(parts: list[str], cells: int, sep: str = " · ") -> list[str]:
    """``parts`` joined with ``sep`` into as few lines as fit in ``cells``; never splits a part.

    A part wider than ``cells`` on its own gets its own line (printed word-wrapped).
    """
    lines: list[str] = []
    for part in parts:
        if lines and cell_len(lines[-1] + sep + part) <= cells:
            lines[-1] += sep + part
        else:
            lines.append(part)
    return lines


def say(text: str, style: str | None = None, *, console: Console | None = None) -> None:
    """Print prose (already markup-escaped), word-wrapped at the terminal's width (or
    ``COLUMNS``); into a pipe or a file with no width given, one line per paragraph: a script
    greps for it, and rich's stand-in width of 80 would break it mid-sentence."""
    target = console or out
    line = f"[{style}]{text}[/{style}]" if style else text
    wrap = is_a_terminal(target.file) or bool(os.environ.get("COLUMNS"))  # FORCE_COLOR: colour only
    if wrap:
        target.print(line, soft_wrap=False, overflow="fold")
    else:
        target.print(line, soft_wrap=True)


def working(text: str) -> contextlib.AbstractContextManager[object]:
    """A spinner with ``text`` (already markup-escaped) on stderr while the block runs: only where
    stderr may be redrawn (:func:`jobs.printable.redraws`); elsewhere nothing, as rich's own
    transient status shows nothing in a file. ``FORCE_COLOR`` (common in CI) made rich draw it into
    a file or a pipe: a hidden cursor, a carriage-return frame each 80 ms, a line erased.

    Every live display of the commands goes through this (or ``redraws``), never ``err.status``."""
    if redraws(err):
        return err.status(text)
    return contextlib.nullcontext()


def compact_table(title: str | None = None) -> Table:
    """The table style of every report: no side borders, a rule under the header and above a
    total, two spaces between columns."""
    return Table(
        title=title,
        box=box.HORIZONTALS,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        title_justify="left",
        title_style="bold",
    )


def whole_columns(table: Table) -> Table:
    """``table``, at least as wide as its columns need: when the terminal is narrower than its
    fixed columns (ids, counts, money) and the name's fewest cells, it is laid out at that width
    and the terminal wraps its lines. rich would squeeze the table into the terminal instead,
    and a column it cannot wrap then shrank to nothing: ``COLUMNS=5 wanbatch status`` showed a
    rule and blank rows, 8 columns dropped the money.

    A column of a set width (:func:`fixed_column`) is given it as its ``width``: laid out at
    least this wide, the table is what it was, but rich no longer measures every cell of it,
    three times over (for ``status``'s 2,000 batches, some 40,000 measures of cells whose width was known).
    """
    for column in table.columns:
        if column.no_wrap and column.min_width is not None and column.min_width == column.max_width:
            column.width = column.min_width
    options = out.options.update_width(MAX_TERMINAL_CELLS)
    least = Measurement.get(out, options, table).minimum
    if least > width():
        table.width = least
    return table


def fixed_column(table: Table, header: str, cells: list[str], *, right: bool = True) -> int:
    """A column as wide as its widest cell, never wrapped or cut (counts, money, ids); its width."""
    needed = max([cell_len(header), *(cell_len(c) for c in cells)])
    table.add_column(
        header, justify="right" if right else "left", no_wrap=True, min_width=needed, max_width=needed
    )
    return needed


def short_endpoints(endpoints: list[str], cells: int) -> list[str]:
    """Endpoint ids shortened sensibly and alike: whole when all fit, else all without the
    ``fal-ai/`` owner that most Wan endpoints share, then cut with ``…``."""
    if all(cell_len(e) <= cells for e in endpoints):
        return endpoints
    return [fit(e.removeprefix("fal-ai/"), cells) for e in endpoints]


#: Cells between two columns of :func:`compact_table` (the box's space plus one of padding).
GAP = 2


# --------------------------------------------------------------------------- one batch


def report_ref(report: BatchReport) -> str:
    """How to name the reported batch in a command to type (:func:`jobs.printable.shell_ref`)."""
    return shell_ref(report["name"], report["batch"])


#: The fewest cells of a batch's name that a heading keeps (``status BATCH``, ``cost BATCH``),
#: however narrow the terminal: the line then wraps, but says which batch it is about.
HEADING_NAME_MIN = 10


def heading_room(cells: int) -> int:
    """The cells a heading gives the batch's name: what ``cells`` leaves, never below
    :data:`HEADING_NAME_MIN` (``fit`` keeps its start, ``…`` then)."""
    return max(cells, HEADING_NAME_MIN)


def batch_heading(report: BatchReport) -> str:
    """``name (a1b2c3d4) · state``, the name shortened to fit the terminal."""
    label = report["phase"] + (" · simulated" if report["simulated"] else "")
    suffix = f" ({short_id(report['batch'])}) · {label}"
    name = fit(one_line(report["name"]), heading_room(width() - cell_len(suffix)))
    return f"[bold]{escape(name)}[/bold]{escape(suffix)}"


def status_table(report: BatchReport) -> Table:
    """A human table of one batch's counts (every state that has a job, then the total)."""
    table = compact_table()
    table.add_column("state")
    table.add_column("jobs", justify="right", no_wrap=True)
    for state in JobState:
        n = report["counts"].get(state.value, 0)
        if n:
            table.add_row(state.value, str(n))
    table.add_section()
    table.add_row("total", str(report["total"]))
    return whole_columns(table)


def progress_text(report: BatchReport, *, distributed: bool = False) -> str:
    """``6/10 done · 3 in flight · ~3m20s left``; no forecast for a batch nothing works on, and
    what would go on with one that no process works on (a stopped ``run``; ``distributed``:
    see :func:`idle_text`)."""
    parts = [f"{report['finished']}/{report['total']} done"]
    if report["finished"] < report["total"]:
        label = report["phase"]
        parts.append(f"{report['in_flight']} in flight")
        if eta := eta_text(report["eta_seconds"]):
            note = report["eta_note"]
            parts.append(f"{eta} at this pace, but {note}" if note else eta)
        elif label in ("paused", "waiting", "deadline", "cancelled"):
            parts.append(f"no ETA: {label}")
        elif report["broker_unreachable_since"]:  # said in full above (its phase_reason)
            parts.append("no ETA: the workers cannot reach the broker")
        elif report["processing"] and report["in_flight"] == 0:
            parts.append("no ETA: nothing in flight")
        if not report["processing"] and label != "cancelled":
            parts.append(idle_text(report, distributed=distributed))
        elif not report["processing"] and report["in_flight"]:
            parts.append(cancelled_idle_text(report, distributed=distributed))
    return " · ".join(parts)


def cancelled_idle_text(report: BatchReport, *, distributed: bool = False) -> str:
    """What a cancelled batch with jobs at fal or downloading needs when no process works on it:
    a webhook ``wanbatch serve`` applied after its run ended may have proved that fal ran a
    cancelled request to the end (billed), and its video waits to be fetched
    (:func:`jobs.batches.cancelled_collecting`)."""
    from jobs.listing import not_processing  # SQLAlchemy: loaded only once a report is shown

    seen = report["processed_at"]
    words = not_processing(datetime.fromisoformat(seen) if seen else None, now=utcnow())
    downloading = report["counts"].get("downloading", 0)
    paid = f"{downloading} paid video(s) to fetch" if downloading else "requests at fal"
    return f"{words}: {_runner(report, workers=True, distributed=distributed)} collects them ({paid})"


def idle_text(report: BatchReport, *, distributed: bool = False) -> str:
    """What a batch with work left but no process working on it needs, and since when.

    ``distributed`` (``WANBATCH_BROKER_URL`` is set here): ``wanbatch run`` only watches the
    workers then, so "`wanbatch run NAME` goes on" was a promise it does not keep: a worker on
    this database goes on, and a run only ends a pause fal's refusal caused."""
    from jobs.listing import not_processing  # SQLAlchemy: loaded only once a report is shown

    seen = report["processed_at"]
    words = not_processing(datetime.fromisoformat(seen) if seen else None, now=utcnow())
    from jobs.batches import inputs_paused, refused_by_fal  # loaded already: they made the report

    if report["phase"] == "deadline":  # nothing is sent any more, paused or not: `resume` does nothing
        # The workers' deadline step skips a paused batch: only a run cancels its unsent jobs.
        runner = _runner(report, workers=report["state"] != "paused", distributed=distributed)
        return f"{words}: {runner} {deadline_run_text(report)}"
    if report.get("tick_leader_note"):  # the workers beat here, but their leader is frozen
        return f"{words}: {report['tick_leader_note']}"
    # A user's pause is ended by `resume` only: a run (or a worker) of a paused batch sends nothing.
    first = f"after `wanbatch resume {report_ref(report)}`, " if _paused_by_user(report) else ""
    # Only a run ends a pause fal's refusal of the key or the account caused: workers leave it.
    # Nor a pause for a missing input file: only a run (or a submit of the manifest) ends it.
    ended_by_run = refused_by_fal(report) or inputs_paused(report)
    runner = _runner(report, workers=not ended_by_run, distributed=distributed)
    return f"{words}: {first}{runner} goes on"


#: What processes a batch when a broker is configured: ``wanbatch run`` only watches then.
ON_THIS_DATABASE = "a `wanbatch worker` on this database (WANBATCH_DATABASE_URL)"


def _runner(report: BatchReport, *, workers: bool, distributed: bool = False) -> str:
    """What processes the batch: `wanbatch run REF`, or (``workers``) a worker. Only a
    ``--simulate`` run processes a simulation. ``distributed``: a worker does, ``run`` only
    watches — but for a pause fal's refusal caused (not ``workers``), which only a run ends."""
    ref = report_ref(report)
    if report["simulated"]:
        unset = " with WANBATCH_BROKER_URL unset" if distributed else ""  # refused with a broker
        return f"`wanbatch run {ref} --simulate`{unset}"
    if distributed:
        if not workers:
            return f"`wanbatch run {ref}` ends the pause, then {ON_THIS_DATABASE}"
        return ON_THIS_DATABASE
    if not workers:
        return f"`wanbatch run {ref}`"
    return f"`wanbatch run {ref}`, or a worker,"


def deadline_run_text(report: BatchReport) -> str:
    """What processing a batch past its deadline does: it sends nothing, collects what fal made
    and cancels the unsent jobs (reason `deadline`)."""
    from jobs.batches import deadline_run_words  # loaded already: it made the report

    unsent = report["counts"].get("pending", 0) + report["counts"].get("retry_wait", 0)
    return deadline_run_words(in_flight=report["in_flight"], unsent=unsent)


def _paused_by_user(report: BatchReport) -> bool:
    """Paused by `wanbatch pause` (and not cancelled, which ends any pause)."""
    return bool(report["paused_by_user"]) and report["state"] != "cancelled"


def pause_over_text(report: BatchReport) -> str:
    """A user's pause of a batch whose schedule will never send again (past its deadline, or the
    window opens only after it): resuming sends nothing, and its unsent jobs end cancelled."""
    unsent = report["counts"].get("pending", 0) + report["counts"].get("retry_wait", 0)
    words = "paused by user, but resuming sends nothing"
    if not unsent:
        return words
    # Past the deadline, or with no window opening before it, a run or a worker cancels them
    # (`idle_text` says how, when none runs).
    return f"{words}: its {unsent} unsent job(s) end cancelled when a run or a worker processes it"


def money_line(report: BatchReport, *, daily_cap_from: str | None = None) -> str:
    """Estimated, spent, budget and what went wrong with money: short lines, no markup escaping
    needed by the caller (ids and numbers only). ``daily_cap_from``: where the day's cap that
    applied is set, when not in this process (:func:`daily_cap_origin`)."""
    first = [f"estimated {usd_text(report['estimated_usd'])}", f"spent {usd_text(report['spent_usd'])}"]
    if report["budget_max_usd"] is not None:
        first.append(f"budget {usd_text(report['budget_max_usd'])}")
    if report["wasted_usd"]:
        first.append(f"wasted {usd_text(report['wasted_usd'])}")
    lines = join_lines(first, width())
    if report["possibly_billed_usd"]:
        lines.append(
            f"[yellow]{usd_text(report['possibly_billed_usd'])} of it possibly billed[/yellow] "
            "(requests whose outcome is unknown — a submit whose answer was lost, a request fal lost "
            "after it started running: fal may have charged them; counted against the budget)"
        )
    if report["possible_duplicate_charges"]:
        lines.append(f"[yellow]{report['possible_duplicate_charges']} possible duplicate charge(s)[/yellow]")
    if report["confirmed_duplicate_charges"]:
        lines.append(
            f"[yellow]{report['confirmed_duplicate_charges']} confirmed duplicate charge(s)[/yellow] "
            "(requests fal ran besides the ones the jobs kept: billed; each is on its job's history)"
        )
    if report["rate_limited_submits"]:
        lines.append(
            f"[yellow]{report['rate_limited_submits']} submit(s) refused by fal with 429[/yellow] "
            "(rate limited: nothing billed, no attempt spent; sending slowed down)"
        )
    if report["media_mismatches"]:
        lines.append(
            f"[yellow]{report['media_mismatches']} video(s) not as requested[/yellow] (see `export`)"
        )
    if report["cancelled_for_budget"]:
        lines.append(
            f"[yellow]{report['cancelled_for_budget']} job(s) cancelled: budget cap reached[/yellow]"
        )
        lines.extend(_budget_advice(report, daily_cap_from=daily_cap_from))
    if report.get("cancelled_for_deadline") and report["finished"] == report["total"]:
        lines.append(f"[yellow]{deadline_cancelled_text(report)}[/yellow]")
        lines.extend(_deadline_advice(report))
    if rendered := _rendered_line(report):
        lines.append(rendered)
    if pending := _pending_line(report):
        lines.append(pending)
    return "\n".join(lines)


def deadline_cancelled_text(report: BatchReport) -> str:
    """The jobs the batch's deadline cancelled, those sent to fal (``cancelled_for_deadline_sent``)
    counted apart from those never sent, as ``status``'s failure lines below count them: ``3
    job(s) cancelled: not sent before the deadline``, ``5 job(s) cancelled by the deadline: 2 not
    sent before it; 3 sent to fal, their requests ended unfinished (see why below)``. A sent
    job's own error says how (``fal timed it out in its queue at the batch's deadline …``)."""
    total = report.get("cancelled_for_deadline", 0)
    sent = min(total, report.get("cancelled_for_deadline_sent", 0))
    if not sent:
        return f"{total} job(s) cancelled: not sent before the deadline"
    at_fal = "sent to fal, their requests ended unfinished (see why below)"
    if sent == total:
        return f"{total} job(s) cancelled by the deadline: {at_fal}"
    return f"{total} job(s) cancelled by the deadline: {total - sent} not sent before it; {sent} {at_fal}"


def _rendered_line(report: BatchReport) -> str:
    """Where the videos of the failed or cancelled jobs a rerun rendered are (since, or before
    the batch ran them, :func:`jobs.rendered.rendered_text`): ``rerun
    --failed-only`` leaves those jobs out, so advising it for them would mislead."""
    from jobs.rendered import rendered_text  # loaded already: it made the report

    return escape(rendered_text(report["rerun_rendered"]))


def _pending_line(report: BatchReport) -> str:
    """Which unfinished rerun repeats the batch's failed or cancelled jobs, and what finishes
    it (:func:`jobs.rendered.going_on`: the command, after its window opens when it waits for
    it): ``rerun --failed-only`` leaves those jobs out, and another rerun of them would pay twice."""
    from jobs.rendered import going_on  # loaded already: it made the report

    reruns = report["rerun_pending"]["reruns"]
    if not reruns:
        return ""
    parts = [f"{r['jobs']} job(s) are being rerun in {r['name']}: {going_on(r)}" for r in reruns]
    return escape("; ".join(parts))


def _budget_advice(report: BatchReport, *, daily_cap_from: str | None = None) -> list[str]:
    """How to run what a cap cancelled: for the jobs the batch's own cap stopped, a higher
    ``budget.max_usd`` in its manifest, run again (the jobs the cap cancelled unsent are pending
    again, :func:`jobs.store.revive_budget_cancelled`; a batch made from a manifest only), or a
    rerun with a new cap (``--max-usd``); a higher ``WANBATCH_DAILY_BUDGET_USD``, or the next UTC
    day, for those the daily cap stopped — which no ``--max-usd`` can let through, and which a
    raised batch cap leaves cancelled. ``daily_cap_from``: how to raise the day's cap where it
    is set, when this process's is not the one that applied (the workers', with a broker:
    :func:`daily_cap_origin`). Jobs a rerun already rendered, or an unfinished one is rendering,
    are not counted: ``rerun --failed-only`` leaves them out (:func:`_rendered_line` says where
    their videos are, :func:`_pending_line` how to go on)."""
    # A simulation's jobs go to the simulator again: without --simulate the hint would send
    # them to fal (paid), or stop at the missing FAL_KEY.
    simulate = " --simulate" if report["simulated"] else ""
    rerun = f"wanbatch rerun {escape(report_ref(report))} --failed-only{simulate}"
    covered = [report["rerun_rendered"], report["rerun_pending"]]
    daily = report["cancelled_for_daily_budget"] - sum(c["cancelled_for_daily_budget"] for c in covered)
    capped = report["cancelled_for_budget"] - sum(c["cancelled_for_budget"] for c in covered) - daily
    advice = []
    if capped:
        them = f"the other {capped}" if any(c["cancelled_for_budget"] for c in covered) else "them"
        if report.get("parent_batch") is None:  # made from a manifest: its cap can be raised there
            again = f"`wanbatch run MANIFEST{simulate}`"
            advice.append(
                f"  to run {them}: raise budget.max_usd in its manifest, then {again} (the jobs its "
                f"cap cancelled unsent are sent under the new cap), or `{rerun} --max-usd AMOUNT`"
            )
        else:
            advice.append(f"  to run {them}: `{rerun} --max-usd AMOUNT`")
    if daily:
        how = escape(daily_cap_from) if daily_cap_from else "raise it"
        advice.append(
            f"  {daily} by today's cap (WANBATCH_DAILY_BUDGET_USD): {how}, or wait for the next "
            f"UTC day, then `{rerun}`"
        )
    return advice


def daily_cap_words(here: Decimal | None, workers: Mapping[str, list[str]] | None) -> str:
    """How to raise the day's cap that applied, in a distributed setup: the workers dispatch, so
    their ``WANBATCH_DAILY_BUDGET_USD`` decides, not the one of the process that says it.
    ``here``: this process's; ``workers``: each value the live workers publish
    (:func:`worker.peers.outcome_settings`), with the workers that have it (None or empty: none
    could be read). An audit set ``WANBATCH_DAILY_BUDGET_USD=100`` on its ``run`` while the
    workers had 3.00: every job was cancelled, and the advice said only "raise it"."""
    mine = str(here) if here is not None else "(unset)"
    restart = "raise it where the workers run and restart them"
    if not workers:
        return f"the workers' setting applies, not this process's ({mine}): {restart}"
    if set(workers) == {mine}:
        return f"the workers' setting applies ({mine} on each): {restart}"
    theirs = "; ".join(f"{value} on {', '.join(names)}" for value, names in workers.items())
    return f"the workers' setting applies, not this process's ({mine}): {theirs}; {restart}"


def daily_cap_in_force(here: Decimal | None, report: BatchReport) -> str | None:
    """Without a broker, the day's cap that cancelled ``report``'s jobs, when it is not this
    process's (``here``): the cap is the setting of the ``run`` that dispatched, read back from
    the refusal's words (:func:`jobs.money.daily_cap_in`, in its example among the report's
    ``failures``). None when they agree (to the decimals the refusal showed) or none is known.

    An audit: Alice ran with ``WANBATCH_DAILY_BUDGET_USD=5`` and her jobs were cancelled; Bob,
    his own unset, ran ``status`` on her batch and was told "raise it" — of a cap that was not
    his, and which his shell did not even set."""
    refusals = (g["example"] for g in report.get("failures", ()) if g["error_type"] == DAILY_CAP_ERROR)
    cap = next((c for e in refusals if (c := daily_cap_in(e)) is not None), None)
    if cap is None or (here is not None and here.quantize(cap, rounding=ROUND_HALF_UP) == cap):
        return None
    if here is None:
        capped, mine = usd_text(cap), "unset"
    else:
        capped, mine = usd_apart(cap, here)
    in_force = f"the cap in force was {capped} (the run's setting); this shell's is {mine}"
    return f"{in_force}: raise it where the batch is run"


def daily_cap_origin(settings: Settings, report: BatchReport) -> str | None:
    """:func:`daily_cap_words` for ``report``'s jobs the day's cap cancelled, when a broker is
    configured (the workers dispatch: their setting applied); without one,
    :func:`daily_cap_in_force` (the ``run``'s setting applied, which may not be this
    process's). None when they agree, or when no such job is advised (nothing read then)."""
    if report["simulated"] or not report["cancelled_for_daily_budget"]:
        return None
    if not settings.broker_url:
        return daily_cap_in_force(settings.daily_budget_usd, report)
    # Not worker.steps: a run that watches the workers never loads their machinery.
    from worker.doctor import database_id
    from worker.peers import read_peers

    workers: dict[str, list[str]] = {}
    for peer in read_peers(settings, database_id(settings)):
        value = peer.settings.get("WANBATCH_DAILY_BUDGET_USD", "(not published)")
        workers.setdefault(value, []).append(peer.name)
    return daily_cap_words(settings.daily_budget_usd, workers)


def _deadline_advice(report: BatchReport) -> list[str]:
    """How to run what the batch's schedule cancelled (its deadline passed, or no window opened
    before it): ``rerun --failed-only``, which keeps the batch's daily window and so waits for
    it, and ``--now``, which sends them at once. Jobs a rerun already rendered, or an unfinished
    one is rendering, are not counted (as in :func:`_budget_advice`)."""
    simulate = " --simulate" if report["simulated"] else ""
    rerun = f"wanbatch rerun {escape(report_ref(report))} --failed-only{simulate}"
    covered = [report["rerun_rendered"], report["rerun_pending"]]
    done = sum(c.get("cancelled_for_deadline", 0) for c in covered)
    left = report.get("cancelled_for_deadline", 0) - done
    if left <= 0:
        return []
    them = f"the other {left}" if done else "them"
    window = (report.get("schedule") or {}).get("window")
    if window is None:  # the rerun has no schedule: sent at once
        return [f"  to run {them}: `{rerun}`"]
    zone = escape(str((report.get("schedule") or {}).get("timezone") or "UTC"))
    return [
        f"  to run {them}: `{rerun} --now` sends them now; `{rerun}` keeps the window "
        f"{escape(str(window))} ({zone}) and waits for it"
    ]


#: Lines at most that one reason jobs failed or were cancelled takes in a terminal (the full
#: text is in ``export`` and ``status --json``).
FAILURE_LINES = 3


def print_failures(report: BatchReport) -> None:
    """Why jobs failed or were cancelled, commonest first, one line each (the full text is in
    `export` and `status --json`)."""
    from jobs.batches import told_apart_by_sending  # loaded already: it made the report

    split = told_apart_by_sending((f["state"], f["error_type"], f["sent"]) for f in report["failures"])
    for f in report["failures"]:
        kind = f["error_type"] or "error"
        # "880 cancelled: cancelled by user", not "880 cancelled (cancelled): …"
        lead = f"{f['count']} {f['state']}" + ("" if kind == f["state"] else f" ({kind})")
        if (f["state"], f["error_type"]) in split:
            lead += ", sent to fal" if f["sent"] else ", never sent"
        lead += ": "
        # The summary names every file (or counts the other errors) one example would hide.
        example = " ".join(f.get("summary", f["example"]).split())
        if step := f.get("next_step"):  # fal discarded the results, the input files were missing
            example += f" — {' '.join(step.split())}"
        # Wrapped, not cut: a cap's amount or a deadline's time is often at the end of the text.
        line = wrapped(example, width(), lead=lead, lead_style="red", max_lines=FAILURE_LINES)
        out.print(line, soft_wrap=True)


def print_report(
    report: BatchReport, *, distributed: bool = False, daily_cap_from: str | None = None
) -> None:
    """One batch for a human (``status BATCH``, and the end of ``run``): heading, why it is held
    back, counts, progress, money, schedule notes and failure reasons (``distributed``: a broker
    is configured, see :func:`idle_text`; ``daily_cap_from``: :func:`daily_cap_origin`)."""
    from jobs.batches import (  # loaded already: they made the report
        SCHEDULE_OVER,
        schedule_words,
    )

    out.print(batch_heading(report))
    if elsewhere := report.get("manifest_elsewhere_note"):  # another machine's project: whose, where
        say(escape(elsewhere), "yellow")
    if report["state"] == "paused":  # fal refused the account, or the outputs could not be written
        say(escape(_paused_text(report)), "yellow")
    # a cap holds its unsent jobs back, or the workers cannot reach the broker
    if report["phase"] == "active" and report["phase_reason"]:
        say(escape(report["phase_reason"]), "yellow")
    if fal := report.get("fal_unreachable_note"):  # a process cannot connect to fal: it holds its submits
        say(escape(fal), "yellow")
    if dead := report.get("dead_lease_holders_note"):  # a killed process's leases: whose, until when
        say(escape(dead), "yellow")
    if proof := report.get("proof_wait_note"):  # submits whose outcome fal's webhook may still prove
        say(escape(proof), "yellow")
    if elsewhere := report.get("elsewhere_waiting_note"):  # requests only another key or queue can ask about
        say(escape(elsewhere), "yellow")
    if uncancelled := report.get("uncancelled_note"):  # cancels given up: fal may still bill them
        say(escape(uncancelled), "yellow")
    out.print(status_table(report))
    say(escape(progress_text(report, distributed=distributed)))
    for line in money_line(report, daily_cap_from=daily_cap_from).splitlines():
        say(line)
    # "schedule: paused by user (…)", "…: waiting for window (opens …)", "…: past deadline: …"
    # (the dashboard's batch page says the same words)
    words = schedule_words(report["schedule_state"], report["paused_schedule_state"], report_ref(report))
    schedule = [f"schedule: {words}"] if words else []
    if (  # paused by its user, but its schedule will never send again: resuming sends nothing
        _paused_by_user(report)
        and report["phase"] != "done"  # finished: nothing is held back, as without a schedule
        and report["schedule_state"].startswith(SCHEDULE_OVER)
    ):
        schedule.append(pause_over_text(report))
    if report["priority"] != "normal":
        schedule.append(f"priority {report['priority']}")
    if schedule:
        say(escape(" · ".join(schedule)))
    if report["low_priority_note"]:
        say(escape(report["low_priority_note"]), "yellow")
    if left_out := report.get("not_in_manifest_note"):  # an item fixed or removed: not its failures
        say(escape(left_out))
    if adopted := report.get("adopted_note"):  # the database was behind the outputs folder
        say(escape(adopted), "yellow")
    if gone := report.get("outputs_on_disk_note"):  # paid videos deleted or replaced: fetch again
        say(escape(gone), "yellow")
    print_failures(report)


def _paused_text(report: BatchReport) -> str:
    """Why a batch fal's refusal or its outputs paused is held back, and how to go on; past its
    deadline, that nothing more is sent and what a run then does (fixing the cause only matters
    for what fal holds)."""
    reason = report["pause_reason"] or "see the log"
    simulate = " --simulate" if report["simulated"] else ""  # only a --simulate run sends one
    again = f"`wanbatch run {report_ref(report)}{simulate}`"
    if report["phase"] != "deadline":
        from jobs.store import paused_for_inputs  # loaded already: it made the report

        if paused_for_inputs(report["pause_reason"]):  # a missing input's reason says the ways on
            return f"paused: {reason}"
        return f"paused: {reason}; fix it, then {again} goes on"
    fix = "fix it, then " if report["in_flight"] else ""
    return (
        f"paused: {reason}; but its deadline has passed, so nothing more is sent: "
        f"{fix}{again} {deadline_run_text(report)}"
    )


def print_summary(
    report: BatchReport, *, distributed: bool = False, daily_cap_from: str | None = None
) -> None:
    """A finished batch for a human: the counts, the money lines and why jobs failed."""
    print_report(report, distributed=distributed, daily_cap_from=daily_cap_from)


# --------------------------------------------------------------------------- every batch


#: The headers of ``status``'s counts of failed and cancelled jobs when the names need the room.
SHORT_HEADERS = {"failed": "fail", "cancelled": "canc"}
#: The fewest cells the name column gets before the failed and cancelled counts make way (they
#: are in ``status BATCH``); money, counts and ids are never cut.
NAME_MIN = 10


def batches_table(reports: list[BatchReport]) -> Table:
    """One row per batch (``wanbatch status`` without a batch), readable at 80 columns: every
    column is as wide as its content and the name takes what is left. When that is too little,
    the failed/cancelled headers shorten (``fail``, ``canc``), then those two columns go; a name
    still too long keeps its start and its end (``seed-res…-rerun-2``), cut so that no two names
    look alike (or, when no cut does that, wrapped whole)."""
    ids = short_ids([r["batch"] for r in reports])
    rows = []
    for r in reports:
        c = r["counts"]
        rows.append(
            [
                ids[r["batch"]],
                r["name"],
                r["phase"],
                f"{r['finished']}/{r['total']}",
                str(c.get("failed", 0)),
                str(c.get("cancelled", 0)),
                usd_text(r["spent_usd"]),
                usd_text(r["estimated_usd"]),
            ]
        )
    headers = ["batch", "name", "state", "done", "failed", "cancelled", "spent", "estimate"]
    longest = max([cell_len("name"), *(cell_len(one_line(row[1])) for row in rows)])

    def room_for(columns: list[int], names: dict[int, str]) -> int:
        used = sum(
            max([cell_len(names.get(i, headers[i])), *(cell_len(row[i]) for row in rows)]) for i in columns
        )
        return width() - used - GAP * len(columns)

    columns = [i for i in range(len(headers)) if i != 1]
    names: dict[int, str] = {}
    room = room_for(columns, names)
    if longest > room:  # the names need the room: shorter headers, then fewer columns
        names = {i: SHORT_HEADERS[h] for i, h in enumerate(headers) if h in SHORT_HEADERS}
        room = room_for(columns, names)
        if room < min(longest, NAME_MIN):
            columns = [i for i in columns if headers[i] not in SHORT_HEADERS]
            room = room_for(columns, names)
    room = max(room, NAME_MIN)
    shown = distinct_fits([one_line(row[1]) for row in rows], room)

    table = compact_table()
    fixed_column(table, "batch", [row[0] for row in rows], right=False)
    table.add_column("name", min_width=min(longest, room), max_width=room, overflow="fold")
    for i in columns[1:]:
        fixed_column(table, names.get(i, headers[i]), [row[i] for row in rows], right=i > 2)
    for row in rows:
        name = one_line(row[1])  # a line break or tab (a name stored before they were refused) escaped
        row[1] = shown[name] or name  # None: no cut tells it apart, so whole (wrapped)
        table.add_row(*(escape(row[i]) for i in [0, 1, *columns[1:]]))
    return whole_columns(table)


def print_batches(reports: list[BatchReport], *, distributed: bool = False) -> None:
    """``wanbatch status``: the table, then why each paused or waiting batch is held back (and
    each active one whose unsent jobs a cap holds back), and which batches with work left no
    process works on; each note wrapped, never cut (a window's time, a command to type)."""
    from jobs.batches import paused_schedule_text  # loaded already: it made the reports

    out.print(batches_table(reports))
    ids = short_ids([r["batch"] for r in reports])
    notes = []
    for r in reports:
        label, reason = r["phase"], r["phase_reason"]
        if reason and label in ("paused", "waiting"):
            closed = paused_schedule_text(r["paused_schedule_state"]) if label == "paused" else ""
            notes.append(f"{ids[r['batch']]} {label}: {reason}" + (f"; {closed}" if closed else ""))
        elif reason and label == "active":  # a cap holds its unsent jobs back: which, and whose jobs
            notes.append(f"{ids[r['batch']]} {reason}")
        if fal := r.get("fal_unreachable_note"):  # a process cannot connect to fal: it holds its submits
            notes.append(f"{ids[r['batch']]} {fal}")
        if dead := r.get("dead_lease_holders_note"):  # a killed process's leases: whose, until when
            notes.append(f"{ids[r['batch']]} {dead}")
        if proof := r.get("proof_wait_note"):  # submits whose outcome fal's webhook may still prove
            notes.append(f"{ids[r['batch']]} {proof}")
        if elsewhere := r.get("elsewhere_waiting_note"):  # requests only another key or queue can ask about
            notes.append(f"{ids[r['batch']]} {elsewhere}")
        if uncancelled := r.get("uncancelled_note"):  # cancels given up: fal may still bill them
            notes.append(f"{ids[r['batch']]} {uncancelled}")
        if not r["processing"] and label not in ("done", "cancelled"):
            notes.append(f"{ids[r['batch']]} {idle_text(r, distributed=distributed)}")
        elif not r["processing"] and label == "cancelled" and r["in_flight"]:
            notes.append(f"{ids[r['batch']]} {cancelled_idle_text(r, distributed=distributed)}")
    simulations = [ids[r["batch"]] for r in reports if r["simulated"]]
    if simulations:  # their videos and money are the simulator's: say which rows those are
        notes.append(f"simulated (`--simulate`): {', '.join(simulations)}")
    for note in notes:
        out.print(wrapped(note, width()), soft_wrap=True)


# --------------------------------------------------------------------------- cost and estimate


def usd(value: Decimal | float | None) -> str:
    """Dollars and cents, rounded half up (:func:`jobs.money.usd_text`)."""
    return usd_text(value)


def cost_heading(report: CostReport) -> str:
    """``cost of NAME (a1b2c3d4)``, the name shortened to fit; a simulation says nothing was paid."""
    suffix = f" ({short_id(report.batch_id)})"
    if report.simulated:
        suffix += " · simulated: nothing was paid"
    name = fit(one_line(report.name), heading_room(width() - cell_len("cost of ") - cell_len(suffix)))
    return f"[bold]cost of {escape(name)}[/bold]{suffix}"


def cost_table(report: CostReport) -> Table:
    """A human table of a batch's cost report (``wanbatch cost``): endpoints give way, money never."""
    lines = [
        (endpoint, resolution, _cost_cells(line))
        for (endpoint, resolution), line in sorted(report.lines.items())
    ]
    total_cells = _cost_cells(report.total)
    headers = ["jobs", "estimated", "actual", "wasted", "dup?"]
    table = compact_table()
    table.add_column("endpoint", no_wrap=True)
    used = fixed_column(table, "res.", [res for _e, res, _c in lines], right=False)
    for i, header in enumerate(headers):
        used += fixed_column(table, header, [cells[i] for *_x, cells in lines] + [total_cells[i]])
    room = max(width() - used - GAP * (len(headers) + 1), 12)
    endpoints = short_endpoints([endpoint for endpoint, _r, _c in lines], room)
    table.columns[0].min_width = table.columns[0].max_width = max(
        cell_len(e) for e in [*endpoints, "endpoint"]
    )
    for shown, (_endpoint, resolution, cells) in zip(endpoints, lines, strict=True):
        table.add_row(escape(shown), escape(resolution), *cells)
    table.add_section()
    table.add_row("total", "", *total_cells)
    return whole_columns(table)


def rounding_note(
    columns: Mapping[str, tuple[Sequence[Decimal | float | None], Decimal | float | None]],
) -> str | None:
    """The line under a money table whose rounded lines do not add up to its rounded total
    (``$0.30 + $0.38 + $0.41`` against ``$1.08``: wan-2.2 prices have fractions of a cent), naming
    those columns; None when every column adds up. Each figure stays rounded half up to the
    cent, and the total is the exact sum rounded, so a payer checking the sum is told why."""
    off = [
        name
        for name, (lines, total) in columns.items()
        if sum((round_cents(v) for v in lines if v is not None), Decimal(0)) != round_cents(total or 0)
    ]
    if not off:
        return None
    return (
        f"lines are rounded to the cent; the total is the exact sum, rounded ({', '.join(off)}), "
        "so the lines may not add up to it"
    )


def cost_rounding_note(report: CostReport) -> str | None:
    """:func:`rounding_note` of ``wanbatch cost``'s money columns."""
    lines = list(report.lines.values())
    return rounding_note(
        {
            "estimated": ([line.estimated_usd for line in lines], report.total.estimated_usd),
            "actual": ([line.actual_usd for line in lines], report.total.actual_usd),
            "wasted": ([line.wasted_usd for line in lines], report.total.wasted_usd),
        }
    )


def estimate_rounding_note(data: EstimateReport) -> str | None:
    """:func:`rounding_note` of ``wanbatch estimate``'s USD column."""
    return rounding_note({"USD": ([line["usd"] for line in data["by_endpoint"].values()], data["usd"])})


def _cost_cells(line: CostLine) -> tuple[str, ...]:
    return (
        str(line.jobs),
        usd(line.estimated_usd),
        usd(line.actual_usd),
        usd(line.wasted_usd),
        str(line.possible_duplicate_charges),
    )


def estimate_table(title: str, data: EstimateReport) -> Table:
    """A human table of a manifest's estimate (``wanbatch estimate``); ``*`` marks assumed prices."""
    from jobs.pricing import units_text

    rows = [
        [
            endpoint,
            str(line["jobs"]),
            units_text({line["unit"]: line["billing_units"]}),
            usd(line["usd"]),
        ]
        for endpoint, line in data["by_endpoint"].items()
    ]
    # Units add up per unit only (seconds and videos do not); dollars add up.
    total = ["total", str(data["jobs"]), units_text(data["billing_units_by_unit"]), usd(data["usd"])]
    headers = ["jobs", "billing units", "USD"]
    table = compact_table(escape(fit(title, width())))
    table.add_column("endpoint", no_wrap=True)
    used = sum(
        fixed_column(table, header, [row[i + 1] for row in [*rows, total]])
        for i, header in enumerate(headers)
    )
    room = max(width() - used - GAP * len(headers) - 2, 12)
    names = short_endpoints([row[0] for row in rows], room)
    shown = [
        name + (" *" if row[0] in data["price_assumptions"] else "")
        for name, row in zip(names, rows, strict=True)
    ]
    table.columns[0].min_width = table.columns[0].max_width = max(cell_len(e) for e in [*shown, "endpoint"])
    for label, row in zip(shown, rows, strict=True):
        table.add_row(escape(label), *row[1:])
    table.add_section()
    table.add_row(*total)
    return whole_columns(table)


# --------------------------------------------------------------------------- diff


#: ``diff``'s columns, in order.
DIFF_HEADERS = ("item", "result", "differs", "seed A / B", "video A / B", "cost A / B")
#: The columns that wrap, in the order they narrow to their longest word: the item label last,
#: as it is what tells two rows of a sweep apart (``0 resolution=480p`` / ``0 resolution=720p``).
_DIFF_GIVE_WAY = (4, 3, 2, 5, 0)
#: The columns folded (words broken) when even that is too wide, in turn: never cost (money).
_DIFF_FOLD_FIRST, _DIFF_FOLD_LAST = (4, 3, 2), (0,)


def diff_table(rows: list[tuple[str, ...]]) -> Table:
    """``diff``'s rows (plain text, cells in :data:`DIFF_HEADERS` order; the result's second line
    says how the pair was matched) at the terminal's width.

    The result is as wide as its widest cell. The other columns wrap at spaces, the A / B pairs
    after their `` /`` (so an amount of money is never split): video, seed, what differs and cost
    narrow to their longest piece first, then the item label. When that is still too wide,
    video, seed and what differs fold (break words) before the label does. Nothing is cut with
    an ellipsis (rich's default), which made two rows of a sweep read the same."""
    table = compact_table()
    room = width() - _natural(DIFF_HEADERS[1], rows, 1) - GAP * (len(DIFF_HEADERS) - 1)
    natural = {i: _natural(DIFF_HEADERS[i], rows, i) for i in _DIFF_GIVE_WAY}
    least = {i: _least(DIFF_HEADERS[i], rows, i) for i in _DIFF_GIVE_WAY}
    widths = _give_way(natural, least, room)
    for i, header in enumerate(DIFF_HEADERS):
        if i == 1:  # the result, and on its second line how the pair was matched: never wrapped
            fixed_column(table, header, [line for row in rows for line in row[i].splitlines()], right=False)
        else:
            table.add_column(header, width=widths[i], overflow="fold", justify="right" if i == 5 else "left")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    return table


def _natural(header: str, rows: list[tuple[str, ...]], column: int) -> int:
    """The cells ``column`` takes unwrapped (its widest line)."""
    return max([cell_len(header), *(cell_len(line) for row in rows for line in row[column].splitlines())])


def _least(header: str, rows: list[tuple[str, ...]], column: int) -> int:
    """The cells ``column`` needs to break no word: its longest word, the ``A /`` of an
    ``A / B`` pair kept on one line (``2955667e27cd /``, then ``5a1dee404e17``)."""
    words: list[str] = []
    for text in [header, *(row[column] for row in rows)]:
        *firsts, last = text.split(" / ")
        words += last.split()
        for part in firsts:
            words += [*part.split(), f"{part.split()[-1] if part.split() else ''} /"]
    return max([1, *(cell_len(word) for word in words)])


def _give_way(natural: dict[int, int], least: dict[int, int], room: int) -> dict[int, int]:
    """Widths within ``room`` cells: each column (in the dict's order) narrows to its ``least``
    until they fit; when even that is too wide, :data:`_DIFF_FOLD_FIRST` narrow, the widest a
    cell at a time, then :data:`_DIFF_FOLD_LAST` (folded: every character still shown)."""
    widths = dict(natural)
    over = sum(widths.values()) - room
    for i in widths:
        give = max(0, min(over, widths[i] - least[i]))
        widths[i] -= give
        over -= give
    for folding in (_DIFF_FOLD_FIRST, _DIFF_FOLD_LAST):
        while over > 0 and max(widths[i] for i in folding) > 1:
            widest = max(folding, key=lambda i: widths[i])
            widths[widest] -= 1
            over -= 1
    return widths


def require_http_environment(reaches: Iterable[str] | None, *, certificates: bool = True) -> None:
    """Refuse (a one-line ConfigError) the proxy and certificate variables that would make every
    request of a command that is about to talk to ``reaches`` fail, and warn of those that make
    some fail (:func:`jobs.http_environment.environment_verdict`; None: any URL)."""
    from jobs.http_environment import require_usable

    for warning in require_usable(reaches=reaches, certificates=certificates):
        err.print(f"[yellow]warning: {escape(warning)}[/yellow]")
