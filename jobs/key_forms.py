"""What counts as FAL_KEY in a text: the one definition, for the settings and for every redaction.

fal keys are ``<key id>:<key secret>`` (fal_client sends FAL_KEY, or
``FAL_KEY_ID:FAL_KEY_SECRET``, as ``Authorization: Key id:secret``:
https://github.com/fal-ai/fal/blob/main/projects/fal_client/src/fal_client/auth.py). The key
travels as it is, percent-encoded (a URL, a query, a form), base64- or hex-encoded (a provider
echoing a header, a token of its own), and its secret half alone is all an attacker needs beside
the id, which fal shows in its dashboards anyway: :func:`key_variants` lists those forms.

Three users share that notion, so none of them can miss a form the others know:

* :mod:`jobs.settings` refuses any setting other than FAL_KEY that holds the key
  (:func:`contains_key`): the key belongs in FAL_KEY only, sent as a header, never in a URL
  that is printed, logged and stored with every request;
* :func:`jobs.url_secrets.masked_url` hides the process's known keys (:func:`hide_keys`) in
  whatever URL it shows, whatever the parameter is called;
* ``worker.fal.redact`` masks every form in every log record, error and provider answer.
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import quote, quote_plus, unquote

#: A key shorter than this is not looked for inside other text (:func:`contains_key`,
#: :func:`hide_keys`): a test's ``k3y`` or a made-up ``a:b`` is part of ordinary words, folder
#: names and port numbers, so every setting would "contain" it. fal's own keys are 69 characters.
MIN_KEY_LENGTH = 8
#: The secret half of an ``id:secret`` key this long or longer counts on its own.
SECRET_MIN = 8
#: A key (or a form of it) this long is found wherever it appears, glued to other text too. A
#: shorter one (``FAL_KEY=simulator``, a test's ``a:b``; fal's own keys are 69 characters) could
#: be part of ordinary text — a prompt about "flight simulators", ``data:base64``, the logger
#: ``worker.fal.client`` — so it counts only as a token of its own: between the start or end of
#: the text, white space, quotes, brackets or ``= , ; & ? / |`` (``key=a:b``, ``"a:b"``). One
#: rule for every user: the settings' refusal, a manifest's, an export's masking, the logs'.
ANYWHERE_MIN = 16
#: What may stand either side of a short key's token (:data:`ANYWHERE_MIN`).
TOKEN_SEPARATORS = r"\s'\"`()\[\]{}<>=,;&?/|"  # noqa: S105 (characters, not a password)
#: An encoded form shorter than this is not looked for: it would match ordinary text.
ENCODED_MIN = 16
_URLSAFE = str.maketrans("+/", "-_")
#: A percent-escape (RFC 3986 §2.1: ``%`` and two hex digits, either case meaning the same octet).
_ESCAPE = re.compile(r"%[0-9A-F]{2}")
#: A percent-escape in either case: a text without one (``100% photoreal``) decodes to itself.
_ANY_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
#: A fal key standing alone: ``<key id>:<key secret>`` (fal_client sends FAL_KEY, or
#: ``FAL_KEY_ID:FAL_KEY_SECRET``, as ``Key id:secret``:
#: https://github.com/fal-ai/fal/blob/main/projects/fal_client/src/fal_client/auth.py), the id a
#: UUID and the secret 32 or more hex digits. Masked wherever it appears, glued to other text
#: too, so a process that does not know the key (the webhook receiver needs none; an export run
#: with another FAL_KEY) still masks one echoed bare.
BARE_KEY = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}:[0-9a-fA-F]{32,}"
)


#: What :data:`BARE_KEY` needs to match at all: a ``:`` and 32 hex digits. It starts with a
#: literal, which the regular expression engine looks for in C, so a text without a key (nearly
#: every prompt of a million-job manifest) is passed over fast.
BARE_SECRET = re.compile(r":[0-9a-fA-F]{32}")


def holds_key_shape(text: str) -> bool:
    """Whether ``text`` holds anything of a fal key's shape (:data:`BARE_KEY`), as written or
    behind percent-escapes (``…%3A0123…``): a fal key whatever key this process knows, or none.
    Cheap: one search for ``:`` and 32 hex digits in C, the full shape only where that is found,
    and a decoding only for a text holding a percent-escape (not for every bare ``%``)."""
    if BARE_SECRET.search(text) is not None and BARE_KEY.search(text) is not None:
        return True
    if "%" not in text or _ANY_ESCAPE.search(text) is None:  # "100% photoreal": nothing to decode
        return False
    plain, _ = decoded_text(text)
    return plain != text and BARE_SECRET.search(plain) is not None and BARE_KEY.search(plain) is not None


@lru_cache(maxsize=64)
def key_variants(key: str) -> frozenset[str]:
    """The forms in which ``key`` can travel in text: as it is, percent-encoded (in a URL, a
    query, a form: ``id%3Asecret``, or ``id%3asecret``, as RFC 3986 §2.1 allows either case),
    and for fal's ``id:secret`` keys the secret half alone.

    The key and the secret half are also looked for base64- and hex-encoded
    (:func:`_encoded_forms`): a provider that echoes a request's headers or a token of its own
    may encode them, and an encoded key is the key. The whole header value ``Key <key>``
    needs no forms of its own: encoded, it holds the key's form at another byte alignment
    (masked; what is left encodes ``Key ``), and each form is one more substring search for
    every text and value that passes through a redaction.

    Computed once per key (cached): every status event and log record asks for them.
    """
    forms = {key, quote(key, safe=""), quote(key, safe=":"), quote_plus(key)}
    payloads = [key]
    _, colon, secret = key.partition(":")
    if colon and len(secret) >= SECRET_MIN:
        forms |= {secret, quote(secret, safe="")}
        payloads.append(secret)
    forms |= {_ESCAPE.sub(lambda m: m.group().lower(), form) for form in forms}
    forms |= {form for payload in payloads for form in _encoded_forms(payload.encode())}
    return frozenset(f for f in forms if f)


def _encoded_forms(data: bytes) -> set[str]:
    """``data`` in hex (lower and upper case) and in base64 (standard and url-safe alphabets),
    as it appears *inside* longer encoded text (RFC 4648, https://www.rfc-editor.org/rfc/rfc4648).

    Base64 encodes 3 bytes as 4 characters, so the characters ``data`` turns into depend on
    where it starts among the bytes before it: one form per byte alignment (0, 1, 2), each
    keeping only the characters made of ``data``'s bits alone (those shared with the unknown
    neighbouring bytes, and the padding, are left out).
    """
    forms = {data.hex(), data.hex().upper()}
    for shift in range(3):
        text = base64.b64encode(bytes(shift) + data).decode("ascii")
        first = -(-8 * shift // 6)  # the first character with no bit of the filler bytes
        end = 8 * (shift + len(data)) // 6  # past the last character made of data's bits alone
        core = text[first:end]
        forms |= {core, core.translate(_URLSAFE)}
    return {form for form in forms if len(form) >= ENCODED_MIN}


#: How many layers of percent-encoding (and of JSON's ``\\/`` and ``\\u00XX`` escapes)
#: :func:`decoded_text` peels: a URL inside a parameter is encoded once, a redirect's redirect
#: twice; more than this is no URL a service builds but one made to hide what it holds.
DECODE_ROUNDS = 8
_JSON_ESCAPE = re.compile(r"\\u00([0-9a-fA-F]{2})")


def decoded_text(text: str) -> tuple[str, bool]:
    """``text`` percent-decoded, and its JSON escapes of ASCII (``\\/``, ``\\u0026``) undone,
    until it no longer changes, and whether it stopped changing within :data:`DECODE_ROUNDS`
    rounds (False: text still encoded after that many layers, to be treated as hiding a secret).

    Each round is one linear pass (``unquote``, two substitutions), so a hostile text costs at
    most :data:`DECODE_ROUNDS` passes over it."""
    for rounds in range(DECODE_ROUNDS + 1):
        if "%" not in text and "\\" not in text:
            return text, True
        plain = _JSON_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), unquote(text).replace("\\/", "/"))
        if plain == text:
            return text, True
        if rounds == DECODE_ROUNDS:  # one layer more than allowed: not decoded further
            break
        text = plain
    return text, False


@lru_cache(maxsize=256)
def token_pattern(form: str) -> re.Pattern[str]:
    """``form`` as a token of its own: nothing but a separator (:data:`TOKEN_SEPARATORS`) or
    the text's end either side."""
    return re.compile(rf"(?<![^{TOKEN_SEPARATORS}]){re.escape(form)}(?![^{TOKEN_SEPARATORS}])")


def _holds(text: str, form: str) -> bool:
    """Whether ``text`` holds ``form``: anywhere when it is :data:`ANYWHERE_MIN` characters or
    longer, else only as a token of its own."""
    if form not in text:
        return False
    return len(form) >= ANYWHERE_MIN or token_pattern(form).search(text) is not None


def contains_key(text: str, key: str) -> bool:
    """Whether ``text`` holds ``key`` in any of its forms (:func:`key_variants`), also behind
    percent-escapes of any characters (``%35f0c…`` decodes to the key as well).

    Always False for a key under :data:`MIN_KEY_LENGTH` characters (see there). Cheap: a few
    substring searches, in C, per text; the forms are computed once per key.
    """
    if len(key) < MIN_KEY_LENGTH:
        return False
    if any(_holds(text, form) for form in key_variants(key)):
        return True
    if "%" not in text and "+" not in text:
        return False
    _, colon, secret = key.partition(":")
    plain = [key, secret] if colon and len(secret) >= SECRET_MIN else [key]
    decoded = {unquote(text), unquote(text.replace("+", " "))}
    return any(_holds(d, p) for p in plain for d in decoded)


_lock = threading.Lock()
#: The keys this process knows (replaced, never changed in place: redaction caches on it).
_remembered: frozenset[str] = frozenset()


def remember_key(key: str) -> None:
    """Make ``key`` known to every redaction of this process (``worker.fal.redact``, and
    :func:`hide_keys`, which :func:`jobs.url_secrets.masked_url` applies)."""
    global _remembered
    if key:
        with _lock:
            _remembered = _remembered | {key}


def forget_keys() -> None:
    """Forget every key :func:`remember_key` was told (for tests that leave the process as they found it)."""
    global _remembered
    with _lock:
        _remembered = frozenset()


def remembered_keys() -> frozenset[str]:
    """The keys :func:`remember_key` was told."""
    return _remembered


def holds_known_key(text: str, keys: Iterable[str] = ()) -> bool:
    """Whether ``text`` holds one of ``keys`` or of the remembered keys in any form
    (:func:`contains_key`): a URL fal hands back is refused when it does."""
    return any(contains_key(text, k) for k in {*keys, *_remembered} if k)


def hide_keys(text: str, keys: Iterable[str] = (), *, mask: str = "***") -> str:
    """``text`` with every form of ``keys`` and of the remembered keys replaced by ``mask``.

    Whole forms only (a form under :data:`ANYWHERE_MIN` characters only as a token of its
    own), and only of keys of :data:`MIN_KEY_LENGTH` characters or more: this is
    the last line behind the settings' own refusal (a setting holding the key never loads), for
    a URL built from what a provider said or a key learnt after the settings.
    """
    known = frozenset(k for k in (*keys, *_remembered) if len(k) >= MIN_KEY_LENGTH)
    for form in _forms_of(known) if known else ():
        if form in text:
            if len(form) >= ANYWHERE_MIN:
                text = text.replace(form, mask)
            else:  # short enough to be part of ordinary words: masked where it stands alone
                text = token_pattern(form).sub(mask, text)
    return text


@lru_cache(maxsize=16)
def _forms_of(keys: frozenset[str]) -> tuple[str, ...]:
    """Every form of ``keys``, longest first (a form inside a longer one is masked with it);
    once per set of keys: :func:`hide_keys` runs for every URL of every log record."""
    return tuple(sorted({f for k in keys for f in key_variants(k)}, key=len, reverse=True))
