"""Keep FAL_KEY out of every log line and error message (CWE-532).

Two layers, because each one alone has a gap:

* :class:`KeyRedactionFilter` is a :class:`logging.Filter` that rewrites a record's message,
  arguments and formatted traceback. It is attached to the root logger *and its handlers*:
  a filter on a logger only sees records logged on that very logger, not those propagated
  from ``httpx``/``celery`` children, while handler filters see everything they emit.
* A log-record factory wrapper applies the same filter when any record is created, so handlers
  added later (pytest's caplog, Celery's own) also receive redacted records.

Besides the literal key (and its encoded forms: :func:`jobs.key_forms.key_variants`, the one
definition of what counts as the key, which the settings use too; a form shorter than
:data:`_ANYWHERE_MIN` only where it stands as a word of its own), ``Authorization: Key …``
/``Bearer …`` values and bare strings of a fal key's shape (:data:`_BARE_KEY`) are masked by
shape, whatever key this process knows. A log record's URLs are masked too
(:func:`jobs.url_secrets.mask_urls`): httpx logs every request's URL, and a queue, JWKS or
webhook URL may carry a password or a ``?token=``.
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

from jobs.key_forms import (
    ANYWHERE_MIN,
    BARE_KEY,
    TOKEN_SEPARATORS,
    forget_keys,
    remember_key,
    remembered_keys,
    token_pattern,
)
from jobs.key_forms import key_variants as key_variants  # re-exported: the forms redacted
from jobs.url_secrets import mask_urls

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
#: A fal key standing alone, ``<uuid>:<32+ hex digits>``, whatever key this process knows
#: (:data:`jobs.key_forms.BARE_KEY`, which exports mask by as well).
_BARE_KEY = BARE_KEY
#: What :data:`_BARE_KEY` needs to match at all; it starts with a literal ``:``, which the
#: regular expression engine looks for in C, so a text without a key is passed over fast.
_BARE_SECRET = re.compile(r":[0-9a-fA-F]{32}")

_lock = threading.Lock()
_previous_factory: Callable[..., logging.LogRecord] | None = None


def redact_text(text: str, keys: Iterable[str] = ()) -> str:
    """``text`` with every given key and every Authorization value replaced by ``***``.

    A key cut short where the text was shortened (at its end or at a ``…``) is masked too: an
    error message trimmed to 300 characters must not keep the first half of the secret.

    Every status event, result body and log record passes through here, and nearly none holds
    anything to mask, so a text is first checked for what each rule needs to match at all (a
    substring test runs in C): the key's first :data:`_CUT_KEY_MIN` characters (in the key
    and in every cut of it long enough to be masked), ``authorization`` for :data:`_AUTH_VALUE`
    (matched as it matches), ``Key``/``Bearer`` for :data:`_KEY_SHAPE`, ``:`` and 32 hex digits
    for :data:`_BARE_KEY`. Without any of them the rules below would change nothing, and the
    text is returned as it is.
    """
    known = _known(keys)
    return _apply_rules(text, known.variants) if _may_need_masking(text, known.triggers) else text


class _Known:
    """The variants of a set of keys (longest first, as :func:`_apply_rules` applies them),
    what the key rules need to match at all (``triggers``: each variant's first
    :data:`_CUT_KEY_MIN` characters), and whether every trigger appears in JSON text as it is
    (``json_safe``, see :func:`_may_need_masking_anywhere`)."""

    __slots__ = ("json_safe", "triggers", "variants")

    def __init__(self, keys: frozenset[str]) -> None:
        variants = {v for k in keys for v in key_variants(k)}
        self.variants: tuple[str, ...] = tuple(sorted(variants, key=len, reverse=True))
        self.triggers: frozenset[str] = frozenset(v[:_CUT_KEY_MIN] for v in variants)
        self.json_safe = not any(_JSON_ESCAPED.search(t) for t in self.triggers)


def _known(keys: Iterable[str]) -> _Known:
    """The variants of ``keys`` and of the installed keys, built once per set of keys: every
    log record and status event comes here, so the per-call work is one cache look-up."""
    return _known_for(tuple(keys), remembered_keys())


@lru_cache(maxsize=64)
def _known_for(keys: tuple[str, ...], installed: frozenset[str]) -> _Known:
    return _Known(frozenset(k for k in (*keys, *installed) if k))


def _apply_rules(text: str, keys: Iterable[str]) -> str:
    """Every masking rule of :func:`redact_text`, whatever the text holds.

    A key whose first :data:`_CUT_KEY_MIN` characters are not in the text is skipped: neither
    it nor a cut of it long enough to be masked can be there (the cut rule loops in Python).
    """
    for key in sorted(keys, key=len, reverse=True):
        if key[:_CUT_KEY_MIN] in text:
            if len(key) >= _ANYWHERE_MIN:
                text = _mask_cut_key(text.replace(key, MASK), key)
            else:  # short enough to be part of ordinary words: masked where it stands alone
                text = _mask_cut_key(_whole_word(key).sub(MASK, text), key, whole=True)
    text = _AUTH_VALUE.sub(lambda m: f"{m.group('head')}{m.group('scheme')} {MASK}", text)
    text = _KEY_SHAPE.sub(lambda m: f"{m.group('scheme')} {MASK}", text)
    return _BARE_KEY.sub(MASK, text)


#: A key's prefix this long, right where a text was cut, is taken for the cut key.
_CUT_KEY_MIN = 8
#: A key (or a form of it) this long is masked wherever it appears; a shorter one only as a
#: token of its own (:data:`jobs.key_forms.ANYWHERE_MIN`: masking it inside ordinary text —
#: ``data:base64``, the logger ``worker.fal.client`` — garbled every line).
_ANYWHERE_MIN = ANYWHERE_MIN
_SEPARATOR = re.compile(f"[{TOKEN_SEPARATORS}]")
#: ``key`` as a token of its own: nothing but a separator (or the text's end) either side.
_whole_word = token_pattern


def _may_need_masking(text: str, triggers: Iterable[str]) -> bool:
    """Whether any rule of :func:`redact_text` could match ``text`` (False: none can), given
    the ``triggers`` of the keys' variants (:class:`_Known`)."""
    if "Key" in text or "Bearer" in text:
        return True
    if _AUTH_WORD.search(text) or _BARE_SECRET.search(text):
        return True
    # A key of up to _CUT_KEY_MIN characters is only masked whole; a longer one, or a cut of
    # it, always contains its first _CUT_KEY_MIN characters: its trigger (_Known.triggers).
    return any(map(text.__contains__, triggers))


def _mask_cut_key(text: str, key: str, *, whole: bool = False) -> str:
    """Mask a prefix of ``key`` that ends the text or stands right before an ellipsis (with
    ``whole``, only one that starts a token: at the text's start or after a separator)."""
    if len(key) <= _CUT_KEY_MIN:
        return text  # a cut this short says too little to be told from ordinary text
    cuts = [i for i, ch in enumerate(text) if ch == "…"] + [len(text)]
    for cut in reversed(cuts):  # right to left, so earlier positions stay valid
        for n in range(min(len(key) - 1, cut), _CUT_KEY_MIN - 1, -1):
            if whole and cut - n > 0 and not _SEPARATOR.match(text[cut - n - 1]):
                continue
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
    known = _known(keys)
    if not _may_need_masking_anywhere(value, known):
        return value
    return _redact_walk(value, known, 0)


#: Characters ``json.dumps(..., ensure_ascii=False)`` writes escaped: a string holding one
#: does not appear verbatim in the JSON text, so a key holding one is not looked for there.
_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')


def _may_need_masking_anywhere(value: Any, known: _Known) -> bool:
    """Whether any rule could match any string in ``value`` (False: none can; True: walk it).

    Rendered as JSON without ASCII escapes, every string of ``value`` (keys of dicts too)
    appears in the text as it is, but for quotes, backslashes and control characters, which no
    rule's trigger holds; a value that is not JSON, or keys whose trigger (the part of a key
    that must be found) holds such a character, is walked, and so is one that may be nested
    deeper than :data:`_MAX_DEPTH` (cut there by the walk).
    """
    if isinstance(value, str):
        return _may_need_masking(value, known.triggers)
    if not known.json_safe:
        return True
    try:
        text = json.dumps(value, ensure_ascii=False, check_circular=False)
    except (TypeError, ValueError, RecursionError):
        return True
    if text.count("[") + text.count("{") > _MAX_DEPTH:
        return True
    return _may_need_masking(text, known.triggers)


def _redact_walk(value: Any, known: _Known, depth: int) -> Any:
    if isinstance(value, str):
        return _apply_rules(value, known.variants) if _may_need_masking(value, known.triggers) else value
    if depth >= _MAX_DEPTH and isinstance(value, dict | list | tuple):
        return "[nested too deep]"
    deeper = depth + 1
    if isinstance(value, dict):
        return {_redact_walk(k, known, deeper): _redact_walk(v, known, deeper) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_walk(v, known, deeper) for v in value]
    if isinstance(value, tuple):
        return tuple(_redact_walk(v, known, deeper) for v in value)
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
    """Undo :func:`install_redaction` (for tests that must leave logging as they found it)."""
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
