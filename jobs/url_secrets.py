"""URLs made safe to show: the credentials a setting's URL may carry, masked.

Every URL wanbatch is configured with can carry a secret: ``redis://:password@host``,
``postgresql://user:password@host/db``, a queue or JWKS URL behind a proxy that wants
``https://user:password@proxy/…`` or ``?token=…``. A message, a log line or ``doctor``'s report
names the URL so the operator knows which one failed, and ends up in CI logs and tickets: the
secret in it must not. :func:`masked_url` is the one helper for every such URL (the database's,
the broker's, the limiter's, fal's, the webhook receiver's, the JWKS'), and :func:`mask_urls`
applies it to each URL inside a longer text (a log record).

What is masked: the password of the userinfo (over HTTP a userinfo without one is masked whole:
a name alone authenticates nothing there unless it is the secret, ``https://TOKEN@host``), and the
value of every query, fragment or path (``;name=value``) parameter whose name looks like a credential
(:data:`_SECRET_NAME`), or whose value holds a credential once percent-decoded (a signed URL
carried in a ``?redirect=``: :func:`_hides_secret`, masked whole). A URL JSON text escapes
(``https:\\/\\/…``) is masked as the URL it is. Masking a harmless value costs a reader nothing;
showing a secret cannot be undone. Nothing else is changed, so the URL still says where it
points — but for FAL_KEY, in any of its forms (:mod:`jobs.key_forms`), wherever it stands: in
a path, a fragment, a parameter of any name. The settings refuse a URL that holds it, so this
is the last line only.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

from jobs.key_forms import BARE_KEY, MIN_KEY_LENGTH, decoded_text, hide_keys

#: What a masked credential is shown as (Celery's and kombu's form, ``redis://:**@host``).
MASK = "**"

#: A query or fragment parameter whose name holds any of these (any case) is a credential:
#: ``token``, ``access_token``, ``api_key``, ``key``, ``secret``, ``client_secret``, ``password``,
#: ``sslpassword``, ``pwd``, ``sig``/``signature`` (S3's ``X-Amz-Signature``, Azure's ``sig``),
#: ``auth``, ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``jwt``, ``session``.
_SECRET_NAME = re.compile(r"token|secret|pass|pwd|key|sig|auth|cred|jwt|session", re.IGNORECASE)

#: Schemes whose userinfo without a password is a token (``https://TOKEN@host``): a database's or
#: Redis' is a user name (``postgresql://postgres@host/db``), shown as it is.
_WEB_SCHEMES = frozenset({"http", "https", "ws", "wss"})

#: ``scheme://user:password@``, the password up to the first ``@`` (possessive: a text with no
#: ``@`` is read once, not once per character). :func:`masked_url` masks it when it holds a
#: ``/``, ``?`` or ``#`` (not URL-encoded).
_RAW_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*+://[^:/?#@\s]*+:)(?P<password>[^@\s]*+)@")

#: A URL inside free text: a scheme, ``://`` (or JSON's escaped ``:\/\/``), then up to white
#: space or a quote or bracket, less the punctuation of the sentence around it
#: (``…/db?sslpassword=***: cannot connect``) and a backslash (the escape of the quote after it).
#: A scheme is at most 64 characters, so no start costs more than that much reading before it fails.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,63}+:(?://|\\/\\/)[^\s'\"<>`]*[^\s'\"<>`.,:;!?)\]\\]")

#: What ends a ``name=value`` inside decoded text (:func:`_holds_secret`).
_PARAM_END = re.compile(r"[?&;#\s'\"<>]")
#: What ends a URL's authority (``scheme://user:password@host``).
_AUTHORITY_END = re.compile(r"[/?#\s]")
#: A word of free text (:func:`mask_params_in_text`), as a URL's characters.
_WORD = re.compile(r"[^\s'\"<>`]+")


def masked_url(url: str, *, mask: str = MASK) -> str:
    """``url`` with its credentials masked (``redis://:**@host:6379/0``,
    ``https://queue.example/?token=**``), for messages: never the raw setting.

    FAL_KEY, when this process knows it (:func:`jobs.key_forms.remember_key`), is masked
    wherever it stands, not only as a parameter whose name looks secret.

    ``(not a URL)`` for text that does not even parse as one (it is not shown: it may be the
    secret itself, pasted into the wrong variable).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(not a URL)"
    shown = url
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, colon, password = userinfo.partition(":")
        if colon:
            hidden = f"{user}:{_mask_of(password, mask)}"
        else:  # a name alone: over HTTP the token itself (https://TOKEN@host), elsewhere a user name
            hidden = _mask_of(user, mask) if parts.scheme.lower() in _WEB_SCHEMES else user
        shown = shown.replace(f"//{parts.netloc}", f"//{hidden}@{host}", 1)
    elif (
        (found := _RAW_PASSWORD.match(url))
        and re.search(r"[/?#]", found.group("password"))
        and not found.group("password").split("/", 1)[0].isdigit()
    ):
        # A password with a "/", "?" or "#" written as is: URL parsing ends the host there and
        # would show the rest of it as the path. Masked up to its "@" (a port is no password).
        shown = f"{found.group('head')}{mask}{url[found.end('password') :]}"
        parts = urlsplit(shown)
    if ";" in parts.path:  # path parameters (RFC 3986 §3.3): `/queue;token=…` is a credential too
        at = shown.find(parts.path, shown.find("//") + 2 if parts.netloc else 0)
        if at >= 0:
            path = "/".join(_masked_segment(segment, mask) for segment in parts.path.split("/"))
            shown = f"{shown[:at]}{path}{shown[at + len(parts.path) :]}"
    if parts.query:
        shown = shown.replace(f"?{parts.query}", f"?{_masked_params(parts.query, mask)}", 1)
    if parts.fragment:
        shown = shown.replace(f"#{parts.fragment}", f"#{_masked_params(parts.fragment, mask)}", 1)
    return hide_keys(shown, mask=mask)  # the process's FAL_KEY, whatever names it (or nothing)


def _masked_params(text: str, mask: str) -> str:
    """``a=1&token=x`` → ``a=1&token=**``: each parameter whose name looks secret, or whose value
    hides one (:func:`_hides_secret`: a signed URL percent-encoded in a ``?redirect=``), masked
    whole; the rest as written."""
    pairs = []
    for pair in re.split(r"([&;])", text):
        name, equals, value = pair.partition("=")
        secret = equals and value and (_SECRET_NAME.search(unquote(name)) or _hides_secret(value))
        pairs.append(f"{name}={_mask_of(value, mask)}" if secret else pair)
    return "".join(pairs)


def _hides_secret(value: str) -> bool:
    """Whether a parameter's value holds a secret once decoded (:func:`jobs.key_forms.decoded_text`):
    a URL with credentials or a ``name=value`` of a secret name (``https%3A%2F%2F…%3FX-Amz-Signature%3D…``),
    FAL_KEY, a fal key's shape; or more layers of encoding than any service nests."""
    if "%" not in value and "\\" not in value:
        plain, decoded = value, True
        if "=" not in plain and "@" not in plain:  # a plain word: FAL_KEY is masked in the whole URL
            return False
    else:
        plain, decoded = decoded_text(value)
    return not decoded or _holds_secret(plain)


def _holds_secret(plain: str) -> bool:
    """Whether decoded text holds a credential: a ``name=value`` whose name looks secret, a URL's
    userinfo, FAL_KEY in any form, anything of a fal key's shape. One pass or so over ``plain``
    each (no recursion, however many URLs are nested in it)."""
    if len(plain) >= MIN_KEY_LENGTH and (hide_keys(plain) != plain or BARE_KEY.search(plain)):
        return True  # (no key, nor a form of one, is shorter)
    for piece in _PARAM_END.split(plain):
        name, equals, value = piece.partition("=")
        if equals and value.strip("*") and _SECRET_NAME.search(name):
            return True
    at = plain.find("://")
    while at >= 0:
        end = _AUTHORITY_END.search(plain, at + 3)  # stops at the next "://" at the latest
        if "@" in plain[at + 3 : end.start() if end else len(plain)]:
            return True
        at = plain.find("://", at + 3)
    return False


def _masked_segment(segment: str, mask: str) -> str:
    """``queue;token=x`` → ``queue;token=**``: a path segment's parameters as :func:`_masked_params`."""
    head, semicolon, params = segment.partition(";")
    return f"{head};{_masked_params(params, mask)}" if semicolon else segment


def _mask_of(secret: str, mask: str) -> str:
    """``mask`` for ``secret``; a value masked already (only ``*``) stays as it is, so a URL
    masked twice (``postgresql://u:***@…`` in a message that is masked again) reads the same."""
    return secret if secret and not secret.strip("*") else mask


def mask_urls(text: str, *, mask: str = MASK) -> str:
    """``text`` with every URL in it masked (:func:`masked_url`); a text without ``://`` as it is.

    For text that is not only a URL: a log record (httpx logs every request's URL), an error
    message quoting one, JSON text quoting one (``https:\\/\\/…``, masked as the URL it
    escapes and shown escaped again). A URL that does not parse is masked whole.
    """
    if "://" not in text and ":\\/\\/" not in text:
        return text

    def one(match: re.Match[str]) -> str:
        url = match.group()
        escaped = ":\\/\\/" in url[:80]
        shown = masked_url(url.replace("\\/", "/") if escaped else url, mask=mask)
        if shown == "(not a URL)":
            return mask
        return shown.replace("/", "\\/") if escaped else shown

    return _URL_IN_TEXT.sub(one, text)


def is_secret_name(name: str) -> bool:
    """Whether a parameter or field called ``name`` holds a credential (``access_token``,
    ``X-Amz-Signature``, ``password``…: :data:`_SECRET_NAME`)."""
    return bool(_SECRET_NAME.search(name))


def mask_params_in_text(text: str, *, mask: str = MASK) -> str:
    """``text`` with each word shaped like a query string (``a=1&X-Amz-Signature=…``, outside a
    URL) masked as a URL's query is (:func:`_masked_params`); a word holding a URL is left to
    :func:`mask_urls`, a text without ``=`` as it is."""
    if "=" not in text:
        return text

    def one(match: re.Match[str]) -> str:
        word = match.group()
        if "=" not in word or "://" in word or ":\\/\\/" in word:
            return word
        return _masked_params(word, mask)

    return _WORD.sub(one, text)
