"""Keep FAL_KEY out of every log line and error message (CWE-532).

Two layers, because each one alone has a gap:

* :class:`KeyRedactionFilter` is a :class:`logging.Filter` that rewrites a record's message,
  arguments and formatted traceback. It is attached to the root logger *and its handlers*:
  a filter on a logger only sees records logged on that very logger, not those propagated
  from ``httpx``/``celery`` children, while handler filters see everything they emit.
* A log-record factory wrapper applies the same filter when any record is created, so handlers
  added later (pytest's caplog, Celery's own) also receive redacted records.

Besides the literal key, ``Authorization: Key …``/``Bearer …`` values are masked by shape.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import traceback
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"

#: An Authorization header value in any common rendering (``Authorization: Key x``,
#: ``'authorization': 'Key x'``, ``(b'Authorization', b'Key x')``).
_AUTH_VALUE = re.compile(
    r"(?P<head>authorization['\"]?\s*[:=,]\s*b?['\"]?\s*)(?P<scheme>key|bearer)\s+[^\s'\",)]+",
    re.IGNORECASE,
)
#: What :data:`_AUTH_VALUE` needs to match at all, matched the same way (``re.IGNORECASE`` also
#: takes a dotless ``ı`` for an ``i``: a plain lower-cased substring test would miss that).
_AUTH_WORD = re.compile("authorization", re.IGNORECASE)
#: fal keys look like ``<uuid>:<hex secret>``; mask ``Key <that>`` wherever it appears.
_KEY_SHAPE = re.compile(r"\b(?P<scheme>Key|Bearer)\s+[0-9A-Za-z_-]{8,}:[0-9A-Za-z_-]{8,}")

_lock = threading.Lock()
_keys: set[str] = set()
_previous_factory: Callable[..., logging.LogRecord] | None = None


def redact_text(text: str, keys: Iterable[str] = ()) -> str:
    """``text`` with every given key and every Authorization value replaced by ``***``.

    A key cut short where the text was shortened (at its end or at a ``…``) is masked too: an
    error message trimmed to 300 characters must not keep the first half of the secret.

    Every status event, result body and log record passes through here, and nearly none holds
    anything to mask, so a text is first checked for what each rule needs to match at all (a
    substring test runs in C): the key's first :data:`_CUT_KEY_MIN` characters (in the key
    and in every cut of it long enough to be masked), ``authorization`` for :data:`_AUTH_VALUE`
    (matched as it matches), ``Key``/``Bearer`` for :data:`_KEY_SHAPE`. Without any of them the
    rules below would change nothing, and the text is returned as it is.
    """
    known = {v for k in (*keys, *_keys) if k for v in key_variants(k)}
    return _apply_rules(text, known) if _may_need_masking(text, known) else text


#: The secret half of an ``id:secret`` key this long or longer is masked on its own.
_SECRET_MIN = 8


@lru_cache(maxsize=64)
def key_variants(key: str) -> frozenset[str]:
    """The forms in which ``key`` can travel in text: as it is, percent-encoded (in a URL, a
    query, a form: ``id%3Asecret``), and for fal's ``id:secret`` keys the secret half alone,
    which is all an attacker needs beside the id that fal shows in its dashboards anyway."""
    forms = {key, quote(key, safe=""), quote(key, safe=":"), quote_plus(key)}
    _, colon, secret = key.partition(":")
    if colon and len(secret) >= _SECRET_MIN:
        forms |= {secret, quote(secret, safe="")}
    return frozenset(f for f in forms if f)


def _apply_rules(text: str, keys: Iterable[str]) -> str:
    """Every masking rule of :func:`redact_text`, whatever the text holds."""
    for key in sorted(keys, key=len, reverse=True):
        text = _mask_cut_key(text.replace(key, MASK), key)
    text = _AUTH_VALUE.sub(lambda m: f"{m.group('head')}{m.group('scheme')} {MASK}", text)
    return _KEY_SHAPE.sub(lambda m: f"{m.group('scheme')} {MASK}", text)


#: A key's prefix this long, right where a text was cut, is taken for the cut key.
_CUT_KEY_MIN = 8


def _may_need_masking(text: str, keys: Iterable[str]) -> bool:
    """Whether any rule of :func:`redact_text` could match ``text`` (False: none can)."""
    if "Key" in text or "Bearer" in text:
        return True
    if _AUTH_WORD.search(text):
        return True
    # A key of up to _CUT_KEY_MIN characters is only masked whole; a longer one, or a cut of
    # it, always contains its first _CUT_KEY_MIN characters.
    return any(key[:_CUT_KEY_MIN] in text for key in keys)


def _mask_cut_key(text: str, key: str) -> str:
    """Mask a prefix of ``key`` that ends the text or stands right before an ellipsis."""
    if len(key) <= _CUT_KEY_MIN:
        return text  # a cut this short says too little to be told from ordinary text
    cuts = [i for i, ch in enumerate(text) if ch == "…"] + [len(text)]
    for cut in reversed(cuts):  # right to left, so earlier positions stay valid
        for n in range(min(len(key) - 1, cut), _CUT_KEY_MIN - 1, -1):
            if text[cut - n : cut] == key[:n]:
                text = text[: cut - n] + MASK + text[cut:]
                break
    return text


#: Deeper than this, a provider's JSON is replaced rather than walked (no recursion bomb).
_MAX_DEPTH = 100


def redact_value(value: Any, keys: Iterable[str] = ()) -> Any:
    """``value`` with every string inside it redacted, walking dicts, lists and tuples.

    For what a provider sent back (an error ``detail`` list, a status or result body) before
    any of it is stored: a key echoed three levels down is still the key.

    Every status event and result passes through here and nearly none holds anything to mask,
    so the whole value is first checked at once, as JSON text (one C-level pass instead of a
    Python call per string: 35 µs per status event became a few): when no rule could match
    anywhere in it, it is returned as it is.
    """
    known = {v for k in (*keys, *_keys) if k for v in key_variants(k)}
    if not _may_need_masking_anywhere(value, known):
        return value
    return _redact_walk(value, known, 0)


#: Characters ``json.dumps(..., ensure_ascii=False)`` writes escaped: a string holding one
#: does not appear verbatim in the JSON text, so a key holding one is not looked for there.
_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')


def _may_need_masking_anywhere(value: Any, keys: set[str]) -> bool:
    """Whether any rule could match any string in ``value`` (False: none can; True: walk it).

    Rendered as JSON without ASCII escapes, every string of ``value`` (keys of dicts too)
    appears in the text as it is, but for quotes, backslashes and control characters, which no
    rule's trigger holds; a value that is not JSON, or a key with such a character, is walked,
    and so is one that may be nested deeper than :data:`_MAX_DEPTH` (cut there by the walk).
    """
    if isinstance(value, str):
        return _may_need_masking(value, keys)
    if any(_JSON_ESCAPED.search(k) for k in keys):
        return True
    try:
        text = json.dumps(value, ensure_ascii=False, check_circular=False)
    except (TypeError, ValueError, RecursionError):
        return True
    if text.count("[") + text.count("{") > _MAX_DEPTH:
        return True
    return _may_need_masking(text, keys)


def _redact_walk(value: Any, keys: set[str], depth: int) -> Any:
    if isinstance(value, str):
        return _apply_rules(value, keys) if _may_need_masking(value, keys) else value
    if depth >= _MAX_DEPTH and isinstance(value, dict | list | tuple):
        return "[nested too deep]"
    if isinstance(value, dict):
        return {_redact_walk(k, keys, depth + 1): _redact_walk(v, keys, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_walk(v, keys, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(_redact_walk(v, keys, depth + 1) for v in value)
    return value


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
    """Render the record's message once (dropping the args that fed it), then redact it.

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
    record.msg = redact_text(str(record.msg), keys)
    if record.exc_text:
        record.exc_text = redact_text(record.exc_text, keys)
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info, keys)


def install_redaction(key: str | None) -> KeyRedactionFilter:
    """Redact ``key`` (and Authorization values) from every log record of this process.

    Idempotent: calling it again with another key adds that key too.
    """
    global _previous_factory
    with _lock:
        if key:
            _keys.add(key)
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
    """Undo :func:`install_redaction` (for tests that must leave logging as they found it)."""
    global _previous_factory
    with _lock:
        _keys.clear()
        root = logging.getLogger()
        for holder in (root, *root.handlers):
            for flt in [f for f in holder.filters if isinstance(f, KeyRedactionFilter)]:
                holder.removeFilter(flt)
        if _previous_factory is not None:
            logging.setLogRecordFactory(_previous_factory)
            _previous_factory = None
