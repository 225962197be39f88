"""Keep FAL_KEY out of every log line and error message (CWE-532).

The masking rules themselves are :mod:`jobs.redaction` (:func:`redact_text`,
:func:`redact_value`, re-exported here), which the database's error columns apply too.

Two layers, because each one alone has a gap:

* :class:`KeyRedactionFilter` is a :class:`logging.Filter` that rewrites a record's message,
  arguments and formatted traceback. It is attached to the root logger *and its handlers*:
  a filter on a logger only sees records logged on that very logger, not those propagated
  from ``httpx``/``celery`` children, while handler filters see everything they emit.
* A log-record factory wrapper applies the same filter when any record is created, so handlers
  added later (pytest's caplog, Celery's own) also receive redacted records.

Besides the literal key (and its encoded forms: :func:`jobs.key_forms.key_variants`, the one
definition of what counts as the key, which the settings use too), ``Authorization: Key …``
/``Bearer …`` values and bare strings of a fal key's shape are masked by shape, whatever key
this process knows (:mod:`jobs.redaction`). A log record's URLs are masked too
(:func:`jobs.url_secrets.mask_urls`): httpx logs every request's URL, and a queue, JWKS or
webhook URL may carry a password or a ``?token=``.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from jobs.key_forms import forget_keys, remember_key
from jobs.key_forms import key_variants as key_variants  # re-exported: the forms redacted
from jobs.redaction import MASK as MASK
from jobs.redaction import _apply_rules as _apply_rules  # re-exported for the property tests
from jobs.redaction import _Known as _Known
from jobs.redaction import _redact_walk as _redact_walk
from jobs.redaction import redact_json as redact_json
from jobs.redaction import redact_text as redact_text
from jobs.redaction import redact_value as redact_value
from jobs.url_secrets import mask_urls

_lock = threading.Lock()
_previous_factory: Callable[..., logging.LogRecord] | None = None


class KeyRedactionFilter(logging.Filter):
    """Rewrites records so the key never reaches a handler; never drops a record."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        super().__init__()
        self._own = frozenset(k for k in keys if k)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keys={len(self._own)})"

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record, self._own)
        return True


def redact_record(record: logging.LogRecord, keys: Iterable[str] = ()) -> None:
    """Render the record's message once (dropping the args that fed it), then redact it: the
    key, and the credentials of every URL in it.

    Safe to call repeatedly: each call applies its own keys to the already-rendered text.
    """
    if not getattr(record, "_wanbatch_rendered", False):
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep what can be shown, redacted below
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = message
        record.args = None
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record._wanbatch_rendered = True
    record.msg = mask_urls(redact_text(str(record.msg), keys))
    if record.exc_text:
        record.exc_text = mask_urls(redact_text(record.exc_text, keys))
    if record.stack_info:
        record.stack_info = mask_urls(redact_text(record.stack_info, keys))


def install_redaction(key: str | None) -> KeyRedactionFilter:
    """Redact ``key`` (and Authorization values) from every log record of this process.

    Idempotent: calling it again with another key adds that key too.
    """
    global _previous_factory
    with _lock:
        if key:
            remember_key(key)
        flt = KeyRedactionFilter([key] if key else [])
        root = logging.getLogger()
        if not any(isinstance(f, KeyRedactionFilter) for f in root.filters):
            root.addFilter(flt)
        for handler in root.handlers:
            if not any(isinstance(f, KeyRedactionFilter) for f in handler.filters):
                handler.addFilter(flt)
        if _previous_factory is None:
            previous = _previous_factory = logging.getLogRecordFactory()

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                redact_record(record)
                return record

            logging.setLogRecordFactory(factory)
    return flt


def uninstall_redaction() -> None:
    """Undo :func:`install_redaction` (for tests that must leave logging as they found it).

    The product never calls it: a process redacts until it ends. It lives here, not in a test
    helper, because it undoes this module's private state (the record factory it replaced)."""
    global _previous_factory
    with _lock:
        forget_keys()
        root = logging.getLogger()
        for holder in (root, *root.handlers):
            for flt in [f for f in holder.filters if isinstance(f, KeyRedactionFilter)]:
                holder.removeFilter(flt)
        if _previous_factory is not None:
            logging.setLogRecordFactory(_previous_factory)
            _previous_factory = None
