"""``items_from``: stream a JSONL or CSV file of items, one row at a time.

A 100,000-row file is never held in memory: each reader yields :class:`RawItem` rows and appends
a located issue for a row it cannot use (bad JSON, a duplicate key, too many cells, a line
longer than :data:`MAX_ITEMS_FROM_LINE`), then goes on with the next row.

CSV cells are text; :func:`csv_value` converts a cell to its field's type (integer, number,
boolean) during expansion, numbers by the rule a YAML value and a ``--vary`` value follow
(:func:`jobs.digits.plain_number`). A cell that does not convert stays text, and validation
reports it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.digits import (
    MAX_WHOLE_DIGITS,
    TOO_MANY_DIGITS,
    WholeTooLong,
    boolean_word,
    digits_in,
    plain_number,
    too_many_digits,
    whole_too_long,
)
from jobs.endpoints import EndpointSpec, FieldType
from jobs.errors import Issue
from jobs.manifest.keys import lf
from jobs.manifest.model import RawItem, describe
from jobs.printable import quoted
from jobs.yaml_lines import MAX_DEPTH

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

#: Longest line accepted in an ``items_from`` JSONL file.
MAX_ITEMS_FROM_LINE = 1024 * 1024
ITEMS_FROM_SUFFIXES = (".jsonl", ".ndjson", ".csv")

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_MESSAGE = (
    "text with a lone UTF-16 surrogate (such as \\ud800) is refused: it is no Unicode character"
)


#: The endpoint a row's fields are checked against, from the row's ``endpoint`` value (None:
#: the manifest's); None when it is unknown. Only the "allowed" of a message needs it here.
SpecFor = Callable[[object], EndpointSpec | None]


def _no_spec(endpoint: object) -> EndpointSpec | None:
    return None


#: A check of a CSV header's column names (the file as displayed): its issues, said once at line
#: 1, and the fields they cover, which each row's validation then does not repeat.
HeaderCheck = Callable[[list[str], str], tuple[list[Issue], frozenset[str]]]


def _no_header_check(names: list[str], display: str) -> tuple[list[Issue], frozenset[str]]:
    return [], frozenset()


def _past_limit(display: str, line: int, message: str, allowed: str, code: str | None) -> Issue:
    """The one located error of the row that goes past a limit of the whole file (its rows,
    its input's bytes): the row, not a field of it, is refused."""
    return Issue(file=display, line=line, item=None, field=None, message=message, allowed=allowed, code=code)


@dataclass(slots=True)
class InputBudget:
    """The input an ``items_from`` file's rows may still add to the manifest's jobs
    (:data:`jobs.manifest.expand.MAX_INPUT_BYTES` less what the manifest's own items store):
    each row's bytes once per matrix combination, and what the defaults and the matrix add to
    each row's jobs. The row that goes past it is refused at its line, and no more is read."""

    left: int
    #: Jobs each row makes (the matrix combinations): its bytes are stored in each.
    per_row: int
    #: Bytes each row's jobs take whatever the row holds (defaults, matrix values).
    each_row: int
    message: str
    allowed: str
    code: str | None = None

    def spend(self, row_bytes: int) -> bool:
        """Count a row; whether the input is now over the budget."""
        self.left -= row_bytes * self.per_row + self.each_row
        return self.left < 0

    def issue(self, display: str, line: int) -> Issue:
        """The one located error the row past the budget gets."""
        return _past_limit(display, line, self.message, self.allowed, self.code)


@dataclass(frozen=True, slots=True)
class RowLimit:
    """The most items a manifest may have with its file's rows (the job limit over the matrix
    combinations each item makes): the row that would be one more is refused at its line, and
    nothing after it is read — a file of ten million rows is not read to the end, nor parsed,
    to learn it was too long. Every row counts, one that is refused or repeats another too
    (the limit is on the expansion before duplicates collapse, as the matrix's is)."""

    #: Item indices below this are allowed; the row holding this index is refused.
    items: int
    message: str
    allowed: str
    code: str | None = None
    #: The input the rows may still add (every row counts, as for :attr:`items`).
    input: InputBudget | None = None

    def over_input(self, row_bytes: int) -> bool:
        """Whether a row of ``row_bytes`` (its line as read) takes the input past the budget."""
        return self.input is not None and self.input.spend(row_bytes)

    def reached(self, index: int) -> bool:
        """Whether the row numbered ``index`` is one too many."""
        return index >= self.items

    def issue(self, display: str, line: int) -> Issue:
        """The one located error the row past the limit gets."""
        return _past_limit(display, line, self.message, self.allowed, self.code)


#: How much :meth:`ItemsFile.drain` reads at once.
_DRAIN_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ItemsRead:
    """What one pass read of an ``items_from`` file: which file (device and inode, as opened),
    how many bytes, their SHA-256, and whether that was the whole file (read to its end).

    The pass that validates the rows records this; the pass that stores them compares its own
    (:meth:`jobs.manifest.expand.Manifest.jobs`): the same bytes, or nothing is stored."""

    device: int
    inode: int
    length: int
    sha256: str
    complete: bool


class ItemsFile(io.RawIOBase):
    """An ``items_from`` file opened for one pass, every byte read through one SHA-256 as it is
    read (streaming: a file of a million rows is hashed as it is parsed, never held).

    The readers wrap it (:class:`io.BufferedReader`, :class:`io.TextIOWrapper`), so the hash is
    of the very bytes they parsed, in order: what a pass checked is known by its bytes, not by a
    second read that could find others."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = path.open("rb", buffering=0)
        found = os.fstat(self._file.fileno())
        #: The file as opened: its device and inode (another file renamed over the path has
        #: another), and its size then.
        self.device, self.inode, self.size = found.st_dev, found.st_ino, found.st_size
        self._sha256 = hashlib.sha256()
        self._length = 0
        #: Whether a read found the end of the file: every byte of it went through the hash.
        self.complete = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        count = self._file.readinto(buffer)
        if not count:
            self.complete = True
            return 0
        with memoryview(buffer) as view:
            self._sha256.update(view[:count])
        self._length += count
        return count

    def close(self) -> None:
        # An open that failed (no permission) left no ``_file``; IOBase's finalizer still closes
        # the object, and CPython 3.13 prints what that raises ("Exception ignored in …").
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()
        super().close()

    def read_so_far(self) -> ItemsRead:
        """The bytes read until now (all of them once :attr:`complete`)."""
        return ItemsRead(self.device, self.inode, self._length, self._sha256.hexdigest(), self.complete)

    def drain(self) -> ItemsRead | None:
        """The whole file as this pass found it: what was read, then the rest of it read (and
        hashed) now, through the same open file. None when that cannot be told: the file was
        closed before its end, or the rest cannot be read."""
        if not self.closed and not self.complete:
            chunk = bytearray(_DRAIN_CHUNK)
            try:
                while self.readinto(chunk):
                    pass
            except OSError:
                return None
        return self.read_so_far() if self.complete else None


@contextlib.contextmanager
def _lines(source: ItemsFile) -> Iterator[io.BufferedReader[ItemsFile]]:
    """``source`` buffered, to read lines from; detached when done, not closed: :func:`read_items`
    hands the file to its ``ended`` still open (which may read the rest of it), then closes it."""
    fh = io.BufferedReader(source)
    try:
        yield fh
    finally:
        fh.detach()


@contextlib.contextmanager
def _text(source: ItemsFile) -> Iterator[io.TextIOWrapper]:
    """``source`` as CSV text (see :func:`csv_items`), left open as :func:`_lines` leaves it."""
    with _lines(source) as buffered:
        fh = io.TextIOWrapper(buffered, encoding="utf-8-sig", errors="surrogateescape", newline="")
        try:
            yield fh
        finally:
            fh.detach()


#: Called with the file a pass opened (before a row is read), then with it once the rows are
#: read (before it is closed): :class:`jobs.manifest.expand.Manifest` records or compares it.
ItemsWatch = Callable[[ItemsFile], None]


def _not_watched(source: ItemsFile) -> None:
    return None


def read_items(
    path: Path,
    display: str,
    index: int,
    sink: list[Issue],
    spec_for: SpecFor = _no_spec,
    limit: RowLimit | None = None,
    check_header: HeaderCheck = _no_header_check,
    *,
    opened: ItemsWatch = _not_watched,
    ended: ItemsWatch = _not_watched,
) -> Iterator[RawItem]:
    """The rows of a JSONL or CSV file (by suffix), numbered from ``index``; problems to ``sink``.
    With a ``limit``, reading stops at the first row past it (said in ``sink``). A CSV header's
    names go to ``check_header`` (JSONL rows each carry their own keys: validated per row).

    The file is read through an :class:`ItemsFile`, handed to ``opened`` before its first row
    and to ``ended`` after its last one (or where reading stopped), while still open."""
    with ItemsFile(path) as source:
        opened(source)
        if path.suffix.lower() == ".csv":
            yield from csv_items(source, path.parent, display, index, sink, spec_for, limit, check_header)
        else:
            yield from jsonl_items(source, path.parent, display, index, sink, spec_for, limit)
        ended(source)


def _whole(text: str) -> int | WholeTooLong:
    """A JSON integer literal (``json.loads``' ``parse_int``): one of too many digits is never
    converted (it said only "use sys.set_int_max_str_digits()"); :func:`value_problem`
    reports it with its field."""
    digits = digits_in(text)
    return WholeTooLong(digits) if digits > MAX_WHOLE_DIGITS else int(text)


def whole_number_allowed(spec: EndpointSpec | None, name: object) -> str:
    """What a field given a whole number of too many digits allows: the endpoint field's values,
    else any whole number short enough."""
    fld = spec.field(name) if spec is not None and isinstance(name, str) else None
    return fld.allowed() if fld is not None else f"a whole number of at most {MAX_WHOLE_DIGITS} digits"


def jsonl_items(
    source: ItemsFile,
    base_dir: Path,
    display: str,
    index: int,
    sink: list[Issue],
    spec_for: SpecFor = _no_spec,
    limit: RowLimit | None = None,
) -> Iterator[RawItem]:
    """One item per JSON-object line; blank lines skipped, a leading BOM ignored. ``base_dir``:
    the file's folder, which the rows' relative paths are resolved from."""
    # Once a file, not once a row: ``json.loads`` with hooks builds a decoder (and its scanner)
    # each call, and the limits' attributes are the same for every row.
    decode = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_int=_whole).decode
    cap = limit.items if limit is not None else None
    budget = limit.input if limit is not None else None
    with _lines(source) as fh:
        readline = fh.readline
        lineno = 0
        while True:
            raw = readline(MAX_ITEMS_FROM_LINE + 1)
            if not raw:
                return
            lineno += 1
            too_long = len(raw) > MAX_ITEMS_FROM_LINE and not raw.endswith(b"\n")
            if lineno == 1 and not too_long and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not too_long and not raw.strip():
                continue
            if cap is not None and index >= cap:  # RowLimit.reached
                assert limit is not None
                sink.append(limit.issue(display, lineno))
                return
            if budget is not None and budget.spend(len(raw)):
                sink.append(budget.issue(display, lineno))
                return
            if too_long:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                    raw = fh.readline(MAX_ITEMS_FROM_LINE)
                sink.append(
                    row_issue(display, lineno, index, f"line longer than {MAX_ITEMS_FROM_LINE:,} bytes")
                )
                index += 1
                continue
            try:
                text = raw.decode("utf-8")
                if text.startswith("\ufeff"):  # as json.loads refuses it
                    raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
                obj = decode(text)
            except UnicodeDecodeError:
                sink.append(row_issue(display, lineno, index, "not UTF-8 text"))
            except json.JSONDecodeError as exc:
                sink.append(row_issue(display, lineno, index, f"not valid JSON ({_json_error(exc)})"))
            except ValueError as exc:
                sink.append(row_issue(display, lineno, index, f"not valid JSON ({exc})"))
            except RecursionError:
                sink.append(
                    row_issue(display, lineno, index, f"nesting deeper than {MAX_DEPTH} levels is refused")
                )
            else:
                if (found := value_problem(obj)) is not None:
                    problem, where = found
                    sink.append(
                        Issue(
                            file=display,
                            line=lineno,
                            item=index,
                            field=where or None,
                            message=problem,
                            allowed=_allowed(problem, obj, where, spec_for),
                        )
                    )
                elif isinstance(obj, dict):
                    yield RawItem(index, display, lineno, obj, {}, base_dir)
                else:
                    sink.append(
                        row_issue(
                            display, lineno, index, f"each line must be a JSON object, got {describe(obj)}"
                        )
                    )
            index += 1


def _json_error(exc: json.JSONDecodeError) -> str:
    """What is wrong with one JSON Lines row and where, within that row: the decoder's own
    ``line 2 column 1 (char 35)`` counted from the row and past its line break (a row cut short
    ends there), which read as a line of the file the message already names."""
    if exc.lineno > 1:
        return f"{exc.msg} at the end of the line"
    return f"{exc.msg} at column {exc.colno}"


def value_problem(value: object, depth: int = 0, where: str = "") -> tuple[str, str] | None:
    """What the YAML loader would refuse in a value read from JSON: nesting deeper than
    :data:`~jobs.yaml_lines.MAX_DEPTH`, a whole number of too many digits, or a lone surrogate
    (``"\\ud800"``: valid JSON, but no UTF-8 text can hold it), with where it is (``seed``,
    ``loras[0].scale``; ``""`` for the row itself); None when there is none."""
    if depth > MAX_DEPTH:
        return f"nesting deeper than {MAX_DEPTH} levels is refused", where
    if isinstance(value, WholeTooLong) or too_many_digits(value):
        return TOO_MANY_DIGITS, where
    if isinstance(value, str):
        return None if _SURROGATE.search(value) is None else (_SURROGATE_MESSAGE, where)
    children: Iterable[tuple[str, object]] = ()
    if isinstance(value, dict):
        for key in value:
            if isinstance(key, str) and _SURROGATE.search(key) is not None:
                return _SURROGATE_MESSAGE, where
        children = ((f"{where}.{key}" if where else str(key), child) for key, child in value.items())
    elif isinstance(value, list):
        children = ((f"{where}[{i}]", child) for i, child in enumerate(value))
    for place, child in children:
        if (found := value_problem(child, depth + 1, place)) is not None:
            return found
    return None


def _allowed(problem: str, row: object, where: str, spec_for: SpecFor) -> str | None:
    """The allowed values a too-long number's message names (None for the other problems): the
    field's, when the number is the field's whole value."""
    if problem != TOO_MANY_DIGITS:
        return None
    spec = spec_for(row.get("endpoint")) if isinstance(row, dict) and where in row else None
    return whole_number_allowed(spec, where)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {quoted(key)}")
        out[key] = value
    return out


def csv_items(
    source: ItemsFile,
    base_dir: Path,
    display: str,
    index: int,
    sink: list[Issue],
    spec_for: SpecFor = _no_spec,
    limit: RowLimit | None = None,
    check_header: HeaderCheck = _no_header_check,
) -> Iterator[RawItem]:
    """One item per row under a header of field names; blank rows skipped.

    The header's names are checked once (``check_header``): a misspelt column is one error at
    line 1, not the same error on every row; each row carries the fields so reported
    (:attr:`RawItem.reported`), which its validation leaves out.

    Line breaks inside a quoted cell are ``\\n`` whatever the file's line endings (:func:`lf`).

    Read strictly: a quote left open at the end of the file, or text right after a closing
    quote, is an error, not a cell that swallowed the rest of its row (or of the file) into a
    prompt that would then be paid for. Quotes inside an unquoted cell stay literal.

    Bytes that are not UTF-8 are kept as lone surrogates (``surrogateescape``) rather than
    raised at once: the decoder reads ahead in blocks, so its error came before the row was
    known and named line 1, item 0. The row holding them is refused instead, "not UTF-8 text"
    at its own line as in JSONL, and reading goes on. ``base_dir``: as for :func:`jsonl_items`."""
    with _text(source) as fh:
        lines = _BoundedLines(fh)
        reader = csv.reader(lines, strict=True)
        last = 0  # the line the previous row ended on: the next one starts after it
        rows = False  # past the header: a row too long is an item
        try:
            header: list[str] | None = None
            for header in reader:  # blank lines before the header are skipped, as between rows
                if any(cell.strip() for cell in header):
                    break
                last = reader.line_num
                lines.record = 0
            else:
                header = None
            if header is None:
                return
            at = last + 1  # the header's line: what a message about it names
            if not_utf8(header):
                sink.append(row_issue(display, at, None, "the header row is not UTF-8 text"))
                return
            names = [h.strip() for h in header]
            if any(not n for n in names) or len(set(names)) != len(names):
                message = "the header row needs distinct, non-empty field names"
                sink.append(row_issue(display, at, None, message, names))
                return
            header_issues, reported = check_header(names, display)
            # check_header names line 1 (the header's usual place): here, the line it is on.
            sink.extend(replace(issue, line=at) if issue.line == 1 else issue for issue in header_issues)
            last = reader.line_num
            lines.record = 0
            rows = True
            for row in reader:
                line = last + 1
                last = reader.line_num
                size, lines.record = lines.record, 0
                if not any(cell.strip() for cell in row):
                    continue
                if limit is not None and limit.reached(index):
                    sink.append(limit.issue(display, line))
                    return
                if limit is not None and limit.input is not None and limit.over_input(size):
                    sink.append(limit.input.issue(display, line))
                    return
                if not_utf8(row):
                    sink.append(row_issue(display, line, index, "not UTF-8 text"))
                elif len(row) > len(names):
                    sink.append(
                        row_issue(
                            display, line, index, f"{len(row)} cells but only {len(names)} header names"
                        )
                    )
                elif bad := next((n for n, c in zip(names, row, strict=False) if cell_problem(c)), None):
                    fields = dict(zip(names, row, strict=False))
                    sink.append(
                        Issue(
                            file=display,
                            line=line,
                            item=index,
                            field=bad,
                            message=TOO_MANY_DIGITS,
                            allowed=whole_number_allowed(spec_for(fields.get("endpoint") or None), bad),
                        )
                    )
                else:  # an empty cell is a field the row does not set (the endpoint too)
                    # Its line breaks as YAML reads a manifest's: the same file re-saved by Excel
                    # or checked out with git's autocrlf (CRLF) is the same prompts, sent as such.
                    cells = {name: lf(cell) for name, cell in zip(names, row, strict=False) if cell != ""}
                    yield RawItem(index, display, line, cells, {}, base_dir, True, reported)
                index += 1
        except csv.Error as exc:
            sink.append(row_issue(display, last + 1, index, f"unreadable CSV ({exc}); reading stopped"))
        except _RecordTooLong:
            # Where the record starts; a cell left open may have run on past this line, so the
            # rows after it cannot be told apart: reading stops, as for a quote left open.
            message = f"a row longer than {MAX_ITEMS_FROM_LINE:,} bytes; reading stopped"
            sink.append(row_issue(display, last + 1, index if rows else None, message))


class _RecordTooLong(Exception):
    """A CSV record (one line, or the lines of a quoted cell) past :data:`MAX_ITEMS_FROM_LINE`."""


class _BoundedLines:
    """A CSV file's lines for :func:`csv.reader`, each read with a bound, and each record (the
    lines since :attr:`record` was last set to 0) bounded to :data:`MAX_ITEMS_FROM_LINE` bytes, as
    a JSONL line is. ``csv.field_size_limit`` bounds one cell, not a row: a 100 MB line of short
    cells (or of commas) was read whole, held as a list of 100 million cells, and took minutes
    and gigabytes before any message."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        #: Bytes (UTF-8) of the record being read so far.
        self.record = 0

    def __iter__(self) -> _BoundedLines:
        return self

    def __next__(self) -> str:
        line = str(self._fh.readline(MAX_ITEMS_FROM_LINE + 1))
        if not line:
            raise StopIteration
        self.record += len(line.encode("utf-8", "surrogateescape"))
        if self.record > MAX_ITEMS_FROM_LINE:
            raise _RecordTooLong
        return line


def not_utf8(row: list[str]) -> bool:
    """Whether a CSV row read with ``surrogateescape`` held bytes that are not UTF-8: UTF-8 text
    never decodes to a surrogate, so any surrogate is such a byte."""
    return any(_SURROGATE.search(cell) is not None for cell in row)


def cell_problem(cell: str) -> str | None:
    """A CSV cell's number of more digits than a whole number may have (its conversion would
    fail), or None."""
    return TOO_MANY_DIGITS if whole_too_long(cell.strip()) else None


def row_issue(display: str, line: int, index: int | None, message: str, value: object = None) -> Issue:
    """An error about a whole row (no field to name)."""
    return Issue(file=display, line=line, item=index, field=None, message=message, value=value)


def csv_value(spec: EndpointSpec, key: str, value: Any) -> Any:
    """A CSV cell converted to its field's type when it reads as one; otherwise unchanged."""
    fld = spec.field(key) if isinstance(value, str) else None
    if fld is None or not isinstance(value, str):
        return value
    text = value.strip()
    if whole_too_long(text):
        return value  # stays text: :func:`cell_problem` refused the row first
    if fld.type in (FieldType.INTEGER, FieldType.NUMBER):
        # A float for an integer field too: refused as "expected an integer, got float 1.5",
        # in the words a YAML ``seed: 1.5`` or ``--vary seed=1.5`` gets.
        number = plain_number(text)
        return value if number is None else number
    if fld.type is FieldType.BOOLEAN:
        word = boolean_word(text)
        return value if word is None else word
    return value
