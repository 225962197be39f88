"""The traceback of a bug, kept in an owner-only file instead of printed.

A bug is reported in one line (``internal error: …; please report it (details in FILE)``, or a
step's ``… failed: …``) and its traceback goes to a file of its own in the temp folder, masked as
every log line is (``FAL_KEY``, URL passwords): a terminal, a CI log or a progress bar never gets
a page of Python frames, and the report still has everything a maintainer needs.
"""

from __future__ import annotations

import os
import tempfile
import threading
import traceback

from jobs.printable import named_first_line
from jobs.redaction import masked_error
from jobs.url_secrets import mask_urls
from worker.fal.redact import redact_text

#: Files already written by this process, by what failed (a step's name and the exception's
#: type): a bug every job of a batch meets leaves one file, not one per job.
_written: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def traceback_text(exc: BaseException) -> str:
    """``exc``'s traceback, masked (the key, passwords in URLs)."""
    return mask_urls(redact_text("".join(traceback.format_exception(exc))))


def crash_file(exc: BaseException, *, where: str | None = None) -> str | None:
    """Write ``exc``'s traceback to a new owner-only ``wanbatch-crash-*.txt`` in the temp folder;
    its path, or None when it could not be written. With ``where`` (what failed, e.g. a step's
    name), a second failure of the same kind in this process names the first one's file."""
    kind = None if where is None else (where, f"{type(exc).__module__}.{type(exc).__qualname__}")
    with _lock:
        if kind is not None and kind in _written:
            return _written[kind]
        try:
            fd, name = tempfile.mkstemp(prefix="wanbatch-crash-", suffix=".txt")
            with os.fdopen(
                fd, "w", encoding="utf-8", errors="backslashreplace"
            ) as fh:  # a surrogate of a non-UTF-8 name
                fh.write(traceback_text(exc))
        except OSError:
            return None
        if kind is not None:
            _written[kind] = name
        return name


def summary(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters), masked: a bug in one line."""
    return masked_error(named_first_line(exc, limit=300))
