"""Mask FAL_KEY in any text or value: the rules every redaction of the project applies.

One definition of *how* the key is masked, as :mod:`jobs.key_forms` is the one definition of
*what* counts as the key. Its users:

* ``worker.fal.redact`` masks every log record and everything the fal client hands back
  (answers and errors) with :func:`redact_text` and :func:`redact_value`;
* :class:`jobs.models.KeyFreeText`, the type of every column that records why a job or a
  batch is where it is (``jobs.error``, ``job_events.reason``, ``batches.pause_reason``),
  masks each value as it is written: an error text made from a provider's answer (a
  download's redirect naming the key) cannot reach the database, ``status`` or an export
  whichever path built it; and as it is read, for rows an earlier version stored unmasked.

Besides the literal key (and its encoded forms: :func:`jobs.key_forms.key_variants`; a form
shorter than :data:`_ANYWHERE_MIN` only where it stands as a word of its own),
``Authorization: Key …``/``Bearer …`` values and bare strings of a fal key's shape
(:data:`_BARE_KEY`) are masked by shape, whatever key this process knows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from jobs.key_forms import (
    ANYWHERE_MIN,
    BARE_KEY,
    TOKEN_SEPARATORS,
    key_variants,
    remembered_keys,
    token_pattern,
)
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


def masked_error(text: str) -> str:
    """An error as it is shown to anyone: :func:`redact_text` (every form of the keys this process
    knows, anything of a fal key's shape, Authorization values) and the credentials of every URL
    in it (:func:`jobs.url_secrets.mask_urls`). Every ``error:`` line and ``{"ok": false,
    "error": …}`` of the command line and of the dashboard passes here, and so does a bug's
    one-line summary (:func:`worker.crash.summary`): a message quoting what the user typed (a
    batch reference, a path) never prints back the key typed there."""
    return mask_urls(redact_text(text))


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


def redact_json(value: Any, text: str, keys: Iterable[str] = ()) -> Any:
    """:func:`redact_value` of ``value``, parsed from the JSON ``text``: the same value, the
    text looked at in place of ``value`` rendered as JSON again when it can stand for it.

    An ASCII text without a backslash escapes nothing, so every string of ``value`` (keys of
    dicts too) is in it as it is: no rule can match in any of them when none matches in the
    text (its rules look for words, shapes and keys' triggers, never for a text's start or end).
    A status stream's events come through here, each already in hand as text: one pass over it
    instead of a rendering and a pass. Any other text (escapes, non-ASCII, nested deeper than
    the walk goes) is checked as :func:`redact_value` checks.
    """
    if not text.isascii() or "\\" in text or text.count("[") + text.count("{") > _MAX_DEPTH:
        return redact_value(value, keys)
    known = _known(keys)
    if not _may_need_masking(text, known.triggers):
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
