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
(:func:`is_secret_name`: by its words, not its letters), or whose value holds a credential once
percent-decoded (a signed URL carried in a ``?redirect=``: :func:`_hides_secret`, masked
whole). A URL JSON text escapes (``https:\\/\\/…``) is masked as the URL it is. Masking a
harmless value costs a reader nothing; showing a secret cannot be undone. Nothing else is
changed, so the URL still says where it points — but for FAL_KEY, in any of its forms
(:mod:`jobs.key_forms`), wherever it stands: in a path, a fragment, a parameter of any name.
The settings refuse a URL that holds it, so this is the last line only.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

from jobs.key_forms import (
    BARE_KEY,
    BARE_SECRET,
    MIN_KEY_LENGTH,
    contains_key,
    decoded_text,
    hide_keys,
    remembered_keys,
)

#: What a masked credential is shown as (Celery's and kombu's form, ``redis://:**@host``).
MASK = "**"

#: A name (of a query, fragment or path parameter, a JSON field, a ``name=value`` in text) is a
#: credential's when one of its words is one of these (:func:`is_secret_name`), or starts or ends
#: with one (``privkey``, ``sslpassword``, ``tokenid``, ``oauth``, ``xapikey``: words written as
#: one), unless it is a word of :data:`HARMLESS_WORDS` (``author``, ``keyframes``, ``monkey``).
#: Its words are the name split at anything but a letter or digit (``access_token``,
#: ``X-Amz-Signature``, ``headers.Authorization``), at a camelCase step (``sessionToken``,
#: ``APIKey``; an acronym before a lower-case word is read both ways, ``APIkey`` as ``AP``
#: ``Ikey`` and as ``API`` ``key``, secret when either reading is) and between letters and digits, compared
#: lower-cased and with a plural ``s`` dropped (``api_keys``); two neighbours that make a known
#: word are read as one (``key`` ``Frames`` → ``keyframes``, ``SAML`` ``Response`` →
#: ``samlresponse``). A count or a measure is no secret (``prompt_tokens``, ``max_tokens``,
#: ``key_frame_interval``, ``pass_rate``: :data:`_COUNTED_PLURALS`, :data:`_MEASURE_WORDS`).
#: Masking a harmless value costs a reader little; showing a secret cannot be undone: an unknown
#: word holding a secret word at its start or end is a secret (``job_key``, ``cache_key`` too).
SECRET_WORDS = frozenset(
    {
        "token",
        "secret",
        "password",
        "passwd",
        "pass",
        "pwd",
        "passphrase",
        "passcode",
        "key",
        "apikey",
        "sig",
        "signature",
        "auth",
        "authz",
        "authn",
        "authorization",
        "authorisation",
        "authentication",
        "credential",
        "cred",
        "cookie",
        "session",
        "sessionid",
        "sessid",
        "jwt",
        "bearer",
        # OAuth's and SAML's: a signed client assertion (RFC 7521), a PKCE code_verifier
        # (RFC 7636), OAuth 1.0a's oauth_verifier, a SAML response, a CSRF or XSRF token
        "assertion",
        "verifier",
        "samlresponse",
        "csrf",
        "xsrf",
    }
)
#: A word starting or ending with a secret word (:data:`SECRET_WORDS`) is one…
_SECRET_AFFIXES = tuple(sorted(SECRET_WORDS))
#: … and one holding any of these anywhere (``clientsecretvalue``, ``myapikeyid``): no ordinary
#: word does (but :data:`HARMLESS_WORDS`).
_SECRET_INFIXES = (
    "token",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "apikey",
    "signature",
    "credential",
    "cookie",
    "sessionid",
    "jwt",
)
#: Ordinary words that start or end with a secret word (or hold one): no credential. Kept short
#: on purpose (each one is a word a name is read as, plural ``s`` dropped, not a prefix): a word
#: missing here is masked, which costs a reader a value, never a secret.
HARMLESS_WORDS = frozenset(
    {
        # auth…
        "author",
        "authored",
        "authoring",
        "authority",
        "authorities",
        # key…, …key
        "keyframe",
        "keyword",
        "keyboard",
        "keynote",
        "monkey",
        "donkey",
        "hockey",
        "turkey",
        "whiskey",
        "jockey",
        # pass…, …pass
        "passe",  # "passes" less its plural "s"
        "passed",
        "passing",
        "passage",
        "passenger",
        "passive",
        "passthrough",
        "bypass",
        "compass",
        "surpass",
        "encompass",
        # sig…
        "signal",
        "signed",
        "sigma",
        "sigmoid",
        # cred…
        "credit",
        "credited",
        # token…
        "tokenizer",
        "tokenize",
        "tokenized",
        "tokenization",
        "keypoint",
    }
)
#: A name whose last word is one of these names something *about* a credential, not the
#: credential (``token_type: "Bearer"``, ``signature_style``, ``SignatureVersion``,
#: ``session_name``): kept, when an earlier word made it look secret.
_SECRET_DESCRIPTORS = frozenset(
    {
        "type",
        "style",
        "version",
        "count",
        "length",
        "size",
        "algorithm",
        "method",
        "scheme",
        "format",
        "kind",
        "mode",
        "name",
        "expires",
        "expiry",
        "expiration",
        "ttl",
    }
)
#: Counts and measures: a word of these *after* a name's last secret word says the name is a
#: measure of something, not a credential (``key_frame_interval``, ``key_points``, ``pass_rate``,
#: ``token_refresh_interval``, ``tokens_per_second``); compared with a plural ``s`` dropped.
#: Before the secret word it qualifies nothing (``second_key`` is a key).
_MEASURE_WORDS = frozenset(
    {
        "count",
        "interval",
        "frame",
        "point",
        "rate",
        "ratio",
        "second",
        "sec",
        "minute",
        "hour",
        "ms",
        "step",
        "fps",
    }
)
#: A plural secret word right after one of these is a count (``prompt_tokens``, ``num_tokens``,
#: ``max_tokens``, ``text_tokens``, S3's ``max-keys``): ``tokens`` alone, ``access_tokens`` and
#: ``api_keys`` stay secret.
_NUMBER_WORDS = frozenset({"num", "number", "max", "min", "total", "n"})
_COUNTED_PLURALS = {
    "tokens": _NUMBER_WORDS
    | {"prompt", "completion", "text", "input", "output", "cached", "reasoning", "image", "audio", "video"},
    "keys": _NUMBER_WORDS,
}
#: A query or form parameter named ``code`` is an OAuth authorization code (RFC 6749 §4.1.2):
#: masked in a URL's query or fragment and in a form body (``grant_type=…&code=…``), but not as a
#: field's name (an error code, mostly) nor a lone ``code=1`` in a line of text (an exit code).
_CODE_PARAM = "code"
_CODE_IN_QUERY = re.compile(r"[?&#]code=[^&#\s]", re.IGNORECASE)
#: A JSON Web Token by its shape (``eyJ`` is base64url of ``{"``): header, payload and a
#: signature that may be empty, masked wherever it stands (:func:`mask_jwts`). Starting only
#: where no base64url character stands before it, each part read once: linear.
_JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]++\.[A-Za-z0-9_-]++\.[A-Za-z0-9_-]*+")
#: What a secret name holds somewhere, whatever its case (a quick test before the words are
#: split: most names hold none). ``re.IGNORECASE`` also takes ``ſ`` for an ``s``, ``ı``/``İ``
#: for an ``i`` and the Kelvin sign for a ``k``: :data:`_ASCII_LOOKALIKES` maps them the same.
_SECRET_STEM = re.compile(
    r"token|secret|pass|pwd|key|sig|auth|cred|cookie|sess|jwt|bearer|assert|verif|saml|csrf|xsrf",
    re.IGNORECASE,
)
_ASCII_LOOKALIKES = str.maketrans({"\u017f": "s", "\u0131": "i", "\u0130": "I", "\u212a": "K"})
#: A word of a name: an upper-case run not followed by a lower-case letter (``API`` of
#: ``APIKey``), a capitalised or lower-case word, a number. One pass: each alternative reads
#: a run of one class (at most one character given back).
_NAME_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
#: The same, but an upper-case run of two letters or more before a lower-case word is a word
#: of its own (``API`` ``key`` of ``APIkey``, where :data:`_NAME_WORD` reads ``AP`` ``Ikey``).
_ACRONYM_WORD = re.compile(r"[A-Z]{2,}+(?=[a-z])|[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
#: Where the two readings differ.
_ACRONYM_BEFORE_WORD = re.compile(r"[A-Z]{2}[a-z]")

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


def _masked_params(text: str, mask: str, *, form: bool = True) -> str:
    """``a=1&token=x`` → ``a=1&token=**``: each parameter whose name looks secret, or whose value
    hides one (:func:`_hides_secret`: a signed URL percent-encoded in a ``?redirect=``), masked
    whole; the rest as written. ``form``: ``text`` is a query or form body, so a ``code`` is an
    authorization code (:data:`_CODE_PARAM`)."""
    pairs = []
    for pair in re.split(r"([&;])", text):
        name, equals, value = pair.partition("=")
        plain_name = unquote(name)
        secret = (
            equals
            and value
            and (
                is_secret_name(plain_name)
                or (form and plain_name.rpartition("?")[2].lower() == _CODE_PARAM)
                or _hides_secret(value)
            )
        )
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
        if equals and value.strip("*") and is_secret_name(name):
            return True
    if _CODE_IN_QUERY.search(plain):  # an authorization code, ?code=… or &code=…
        return True
    if _find_secret_pairs(plain, 1):  # JSON's "name": "value", a header's Authorization: …
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
    """Whether a parameter or field called ``name`` holds a credential: one of its words is a
    secret word (:data:`SECRET_WORDS`: ``access_token``, ``X-Amz-Signature``, ``apiKey``,
    ``client_secret``, ``Authorization``, ``sessionToken``, ``password``, ``fal_key``) or starts
    or ends with one (``APIkey``, ``privkey``, ``sslpassword``, ``tokenid``, ``DBpass``) and is
    no :data:`HARMLESS_WORDS` word, unless its last word only describes one (``token_type``,
    ``signature_style``), a measure word follows it (``key_frame_interval``, ``pass_rate``,
    ``tokens_per_second``) or it is a plural counted (``prompt_tokens``, ``num_tokens``,
    ``max-keys``). OAuth's and SAML's credentials are secret (``client_assertion``,
    ``code_verifier``, ``SAMLResponse``, ``csrf``); ``code`` is not (a field's ``code`` is an
    error's: only a query or form parameter ``code`` is masked, by :func:`masked_url` and
    :func:`mask_params_in_text`). Not a substring test: ``author``, ``design``, ``keyframes``,
    ``keyFrames``, ``passes``, ``monkey`` are kept."""
    if not _SECRET_STEM.search(name):
        return False
    name = name.translate(_ASCII_LOOKALIKES)
    readings = [_NAME_WORD.findall(name)]
    if _ACRONYM_BEFORE_WORD.search(name):  # ``APIkey``: ``AP`` ``Ikey`` or ``API`` ``key``
        readings.append(_ACRONYM_WORD.findall(name))
    return any(_holds_secret_word([w.lower() for w in words]) for words in readings)


def _holds_secret_word(words: list[str]) -> bool:
    words = _joined(words)
    secret = [i for i, word in enumerate(words) if _is_secret_word(word) and not _is_count(words, i)]
    if not secret:
        return False
    if len(words) > 1 and words[-1] in _SECRET_DESCRIPTORS:
        return False
    return not any(_singular(word) in _MEASURE_WORDS for word in words[secret[-1] + 1 :])


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def _joined(words: list[str]) -> list[str]:
    """``words`` with two neighbours that make one known word written as one (``key`` ``frames``
    → ``keyframes``, harmless; ``saml`` ``response`` → ``samlresponse``, secret)."""
    if len(words) < 2:
        return words
    out: list[str] = []
    i = 0
    while i < len(words):
        if i + 1 < len(words):
            glued = words[i] + words[i + 1]
            if {glued, _singular(glued)} & (HARMLESS_WORDS | SECRET_WORDS):
                out.append(glued)
                i += 2
                continue
        out.append(words[i])
        i += 1
    return out


def _is_count(words: list[str], at: int) -> bool:
    """Whether ``words[at]`` is a plural counted (``prompt_tokens``, ``max_keys``)."""
    qualifiers = _COUNTED_PLURALS.get(words[at])
    return qualifiers is not None and at > 0 and words[at - 1] in qualifiers


def _name_words(name: str) -> list[str]:
    """``name``'s words, lower-cased (``X-Amz-Signature`` → ``x``, ``amz``, ``signature``)."""
    return [w.lower() for w in _NAME_WORD.findall(name.translate(_ASCII_LOOKALIKES))]


def _is_secret_word(word: str) -> bool:
    forms = (word, word[:-1]) if len(word) > 3 and word.endswith("s") else (word,)
    if any(w in HARMLESS_WORDS for w in forms):
        return False
    return any(
        w in SECRET_WORDS
        or w.startswith(_SECRET_AFFIXES)
        or w.endswith(_SECRET_AFFIXES)
        or any(infix in w for infix in _SECRET_INFIXES)
        for w in forms
    )


def mask_params_in_text(text: str, *, mask: str = MASK) -> str:
    """``text`` with each word shaped like a query string (``a=1&X-Amz-Signature=…``, outside a
    URL) masked as a URL's query is (:func:`_masked_params`; ``code=`` only in a word with a ``&``
    or ``?``, a form body or a path's query: ``exit code=1`` is kept); a word holding a URL is
    left to :func:`mask_urls`, a text without ``=`` as it is."""
    if "=" not in text:
        return text

    def one(match: re.Match[str]) -> str:
        word = match.group()
        if "=" not in word or "://" in word or ":\\/\\/" in word:
            return word
        return _masked_params(word, mask, form="&" in word or "?" in word)

    return _WORD.sub(one, text)


#: The head of a ``name=value`` or ``"name": value`` pair in text: a name (up to 64 letters,
#: digits, ``_``, ``.``, ``-``, starting where no such character stands before it), quoted or not
#: (``"…"``, ``'…'``, JSON-escaped ``\\"…\\"`` in text holding JSON text), then ``=`` or ``:``.
#: Every part has a bounded length, so no start reads more than about 100 characters.
_PAIR_HEAD = re.compile(
    r"(?<![A-Za-z0-9_.-])(?P<q>\\{0,7}+[\"'])?+(?P<name>[A-Za-z0-9_.-]{1,64}+)"
    r"(?P<nq>\\{0,7}+[\"'])?+[ \t]{0,8}+(?P<sep>[:=])[ \t]{0,8}+"
)
#: A quoted value's opening quote, JSON-escaped or not.
_VALUE_QUOTE = re.compile(r"\\{0,7}+[\"']")
#: A quoted value's characters up to its closing quote (backslash escapes skipped): one pass.
_QUOTED_BODY = {q: re.compile(rf"[^{q}\\]*+(?:\\.[^{q}\\]*+)*+", re.DOTALL) for q in ('"', "'")}
#: An unquoted value: an optional HTTP authentication scheme and the word after it
#: (``Bearer abc``), up to white space, a quote, a bracket or a parameter's end.
_BARE_VALUE = re.compile(
    r"(?:(?:Bearer|Basic|Digest|Key|Token|bearer|basic|digest|key|token)[ \t]++)?+[^\s\"'&;,<>()\[\]{}\\#]*+"
)
#: An unquoted header value that runs to the end of its line (``Cookie: a=1; sid=…``,
#: ``Authorization: Digest username="…", response="…"``), or to a quote or angle bracket.
_LINE_VALUE = re.compile(r"[^\r\n\"'<>]*+")
#: Names masked after ``Name:`` unquoted although they are one word: headers and the words no
#: sentence puts before a colon (a prompt's ``a golden key: …`` is no credential).
_COLON_NAMES = frozenset({"authorization", "cookie", "password", "passwd", "pwd", "passphrase", "apikey"})
#: Headers whose unquoted value runs to the end of the line.
_LINE_HEADERS = ("authorization", "cookie")
#: An HTTP authentication scheme at a masked value's start, shown (``Authorization: Bearer **``).
_SCHEME = re.compile(r"(?:Bearer|Basic|Digest|Key|Token|bearer|basic|digest|key|token)[ \t]++")
#: ``Bearer <token>`` anywhere (RFC 6750's b64token): masked when the token looks like one
#: (:func:`_looks_like_token`); ``Bearer of bad news``, ``a Standard Bearer carrying a flag`` are
#: prose. (After ``Authorization:`` any value is masked, a word of letters too.)
_BEARER = re.compile(r"(?<![A-Za-z0-9_-])(?:Bearer|BEARER)[ \t]{1,8}+(?P<token>[A-Za-z0-9._~+/-]++=*+)")


def _find_secret_pairs(text: str, limit: int = 0) -> list[tuple[int, int]]:
    """Where the values of secret-named pairs stand in ``text`` (see :func:`mask_secret_pairs`),
    in order and not overlapping; at most ``limit`` of them (0: all).

    Linear: each head is read once (a bounded length), each value once from its head, and a
    head inside a value already found is passed over."""
    spans: list[tuple[int, int]] = []
    if not _SECRET_STEM.search(text) and "Bearer" not in text and "BEARER" not in text:
        return spans
    done = 0
    for bearer in _BEARER.finditer(text):
        if _looks_like_token(bearer.group("token")):
            spans.append(bearer.span("token"))
            if len(spans) == limit:
                return spans
    for head in _PAIR_HEAD.finditer(text):
        if head.start() < done or not is_secret_name(name := head.group("name")):
            continue
        quoted_name = head.group("nq") is not None
        colon = head.group("sep") == ":"
        pos = head.end()
        opening = _VALUE_QUOTE.match(text, pos)
        if opening:
            quote = opening.group()
            start = opening.end()
            if len(quote) == 1:
                body = _QUOTED_BODY[quote].match(text, start)
                end = body.end() if body else start
            else:  # JSON text inside a string: its value ends at the same escaped quote
                found = text.find(quote, start)
                end = len(text) if found < 0 else found
        elif quoted_name and colon and text[pos : pos + 1] in ("[", "{"):
            # a list or an object (a multi-valued header, a credentials object): masked inside
            # its brackets, to the one that closes it (or to the end)
            start = pos + 1
            end = _container_end(text, pos)
        elif quoted_name and colon:
            continue  # JSON's number, true, false or null: no secret (a field's is masked in export)
        else:
            lowered = name.lower()
            if colon and not quoted_name and len(_name_words(name)) < 2 and lowered not in _COLON_NAMES:
                continue
            start = pos
            line = colon and lowered.endswith(_LINE_HEADERS)
            value = (_LINE_VALUE if line else _BARE_VALUE).match(text, pos)
            end = value.end() if value else pos
            if line:  # the white space before the line's end is no part of the value
                end = start + len(text[start:end].rstrip(" \t"))
        if scheme := _SCHEME.match(text, start, end):
            start = scheme.end()
        if not text[start:end].strip("*"):
            continue
        spans.append((start, end))
        done = end
        if len(spans) == limit:
            return spans
    return _merged(spans)


#: What :func:`_container_end` looks at: an escape (skipped with what it escapes), a quote, a bracket.
_CONTAINER_MARK = re.compile(r"\\.|[\"'\[\]{}]", re.DOTALL)


def _container_end(text: str, at: int) -> int:
    """Where the bracket that closes the one at ``text[at]`` stands (brackets inside quotes
    passed over), or the text's end when none does. One pass from ``at``."""
    depth = 0
    quote = ""
    for mark in _CONTAINER_MARK.finditer(text, at):
        char = mark.group()
        if len(char) == 2:
            continue
        if quote:
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return mark.start()
    return len(text)


def _looks_like_token(word: str) -> bool:
    """Whether ``word``, after ``Bearer`` outside a header, is a token rather than prose: it has
    a digit or one of ``._~+/-=`` (a JWT's ``xxx.yyy.zzz`` too) besides a sentence's final full
    stop, or 20 characters or more (no English word has)."""
    body = word.rstrip(".")
    return len(body) >= 20 or not body.isalpha()


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` in order, overlapping ones made one."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        else:
            out.append((start, end))
    return out


def mask_jwts(text: str, *, mask: str = MASK) -> str:
    """``text`` with every JSON Web Token in it masked, by its shape (:data:`_JWT`: a signed
    client assertion, an ID token, an access token), whatever names it or stands around it."""
    return _JWT.sub(mask, text) if "eyJ" in text else text


def mask_secret_pairs(text: str, *, mask: str = MASK) -> str:
    """``text`` with the value of every secret-named pair in it masked, outside URLs too:
    ``access_token=abc`` (unquoted: up to white space, a quote, a bracket, ``&``, ``;``, ``,``),
    ``"access_token": "abc"`` and ``'password': 'a b'`` (quoted: up to the closing quote;
    JSON-escaped, ``\\"token\\": \\"abc\\"``, too), ``X-Api-Key: abc``, ``Authorization: Bearer abc``
    and ``Cookie: …`` (a header's value to the end of its line), and ``Bearer <token>`` anywhere.
    A name is secret as :func:`is_secret_name` says; ``Name: value`` unquoted counts only for a
    name of two words or more or a header's (``Key: the golden one`` is prose), and a JSON
    number, boolean or null is no secret (in text: a field's is masked by the export). A quoted
    secret name's list or object (``"X-Api-Key": ["…"]``, ``"credentials": {…}``) is masked
    inside its brackets, to the one that closes it (``[**]``, ``{**}``). Linear in ``text`` (no
    pattern reads a character twice but a bounded number of times)."""
    spans = _find_secret_pairs(text)
    if not spans:
        return text
    parts = []
    at = 0
    for start, end in spans:
        parts.append(text[at:start])
        parts.append(_mask_of(text[start:end], mask))
        at = end
    parts.append(text[at:])
    return "".join(parts)


def without_keys(text: str, *, mask: str = MASK) -> str | None:
    """``text`` with every form of FAL_KEY this process knows (:func:`jobs.key_forms.hide_keys`)
    and anything of a fal key's shape (:data:`jobs.key_forms.BARE_KEY`) masked; None when a key
    is still in it, encoded in a way those do not know (percent-escapes of any characters)."""
    shown = hide_keys(text, mask=mask)
    if BARE_SECRET.search(shown) is not None:  # what BARE_KEY needs, looked for in C first
        shown = BARE_KEY.sub(mask, shown)
    plain, _ = decoded_text(shown)  # a bounded number of passes
    keys = remembered_keys()
    if (plain != shown and BARE_KEY.search(plain)) or any(
        contains_key(t, k) for k in keys for t in {shown, plain}
    ):
        return None
    return shown


def shareable_text(text: str) -> str:
    """``text`` as an export shows a string of a job's input (a prompt): FAL_KEY in any form and
    anything of a fal key's shape masked (:func:`without_keys`; the mask whole when a key is still
    in it, encoded otherwise), and the credentials of every URL in it (:func:`mask_urls`). The
    dashboard's job list and ``diff`` show stored prompts through it too, as exports do."""
    shown = without_keys(text)
    return MASK if shown is None else mask_urls(shown)
