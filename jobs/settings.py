"""Typed settings, read once from ``WANBATCH_*`` variables (and fal's key), grouped by subsystem.

Each subsystem has a section — :class:`FalSettings`, :class:`DatabaseSettings`,
:class:`BrokerSettings`, :class:`TickSettings`, :class:`LimitSettings`,
:class:`BudgetSettings`, :class:`RetrySettings`, :class:`DownloadSettings`,
:class:`InputSettings`, :class:`WebhookSettings`, :class:`ChaosSettings` — with its fields, its
validators and its helpers. :class:`Settings` inherits them all (pydantic merges the fields and
validators of every base), so ``settings.submit_rate`` reads as it always did and every variable
keeps its name; code that needs one subsystem only may take that section's type. Configuration
never comes from ``os.environ`` scattered through the code: :func:`get_settings` reads it once,
and only the edges (the CLI commands, the worker bootstrap, the tasks' runtime) call it.

``FAL_KEY`` is a :class:`pydantic.SecretStr`: its ``repr``/``str`` print ``**********``, so a
settings object can be logged without leaking the key. When it is unset, ``FAL_KEY_ID`` and
``FAL_KEY_SECRET`` make it, as fal_client reads them (:func:`_key_in_use`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, get_args
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from jobs.bounds import MAX_THREADS
from jobs.chaos_points import parse_points
from jobs.endpoints import get_endpoint, known_endpoint_ids
from jobs.errors import ConfigError
from jobs.key_forms import MIN_KEY_LENGTH, contains_key
from jobs.money import MAX_USD

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(".wanbatch")

#: fal lets a new account run 2 requests at once and raises that to 40 with its tiers; 10 is a
#: middle ground that keeps cancel, budget and result expiry under control (see README).
DEFAULT_MAX_OUTSTANDING = 10
#: Submits per second across every worker; well under any limit fal has been seen to enforce.
DEFAULT_SUBMIT_RATE = 5.0
#: The longest time a setting may name, in seconds: a year. Anything longer is a typo (or a
#: ``1e300``), and "now + that" would overflow every date it is added to.
MAX_SECONDS = 366 * 24 * 3600.0
#: The shortest time a setting may name, in seconds: a microsecond. A smaller positive number
#: (``1e-320``) is no duration any clock measures, and dividing by it overflows.
MIN_SECONDS = 1e-6
#: The fewest submits per second a rate may name: one a day. ``1e-320`` passed and then
#: overflowed the date a held-back job is due again (a traceback, and a run that never ended);
#: ``1e-12`` held every job but the first back for thousands of years, without a word.
MIN_RATE = 1 / 86400
#: The most submits per second a setting may name: far beyond any account fal has, and small
#: enough that the limiter's arithmetic (intervals in microseconds) stays exact.
MAX_RATE = 100_000.0
#: The most requests a cap may name (outstanding, download backlog): fal runs at most a few
#: hundred at once for any account; beyond this a number is a typo.
MAX_COUNT = 1_000_000


def _at_least_one_a_day(rate: float) -> float:
    """``rate`` unless it is under :data:`MIN_RATE`; ValueError saying the bound in words (pydantic's
    own "greater than or equal to 1.1574074074074073e-05" says nothing a reader can check)."""
    if rate < MIN_RATE:
        raise ValueError(
            f"must be at least {MIN_RATE:.8f} submits per second (one a day; e.g. 0.5 is one every "
            f"2 s), got {rate!r}"
        )
    return rate


#: A submit rate (global or per endpoint): above 0 (0 would never grant a submit), and at least
#: one a day (:data:`MIN_RATE`), at most :data:`MAX_RATE`.
_Rate = Annotated[float, Field(gt=0, le=MAX_RATE), AfterValidator(_at_least_one_a_day)]
#: A per-endpoint submit rate: bounded like ``submit_rate``.
_EndpointRate = _Rate
#: A duration in seconds that must be positive: from a microsecond (:data:`MIN_SECONDS`) to a year.
_Seconds = Annotated[float, Field(ge=MIN_SECONDS, le=MAX_SECONDS)]
#: The longest ``WANBATCH_DATABASE_LOCK_WAIT``, in seconds: PostgreSQL's ``lock_timeout`` takes
#: at most 2147483647 ms (about 24.8 days; https://www.postgresql.org/docs/current/runtime-config-client.html),
#: and a longer one (a year passed :data:`MAX_SECONDS`) made the server refuse every bounded
#: command's transaction ("invalid value for parameter lock_timeout"), the dashboard's too.
MAX_LOCK_WAIT_SECONDS = 2_147_483.0


def _a_lock_wait_postgresql_takes(seconds: float) -> float:
    """``seconds`` unless PostgreSQL's ``lock_timeout`` would refuse it
    (:data:`MAX_LOCK_WAIT_SECONDS`); ValueError saying the bound in words."""
    if seconds > MAX_LOCK_WAIT_SECONDS:
        raise ValueError(
            f"must be at most {MAX_LOCK_WAIT_SECONDS:.0f} seconds (about 24.8 days: the most "
            f"PostgreSQL's lock_timeout takes), got {seconds!r}"
        )
    return seconds


#: How long fal retries a webhook delivery (https://docs.fal.ai/model-apis/model-endpoints/webhooks):
#: the least ``webhook_retention``, so that every retry of an applied delivery is known as one.
WEBHOOK_RETRY_SECONDS = 2 * 3600.0
#: A per-endpoint cap: like ``max_outstanding``, at least 1 (0 held the endpoint's jobs forever).
_EndpointCap = Annotated[int, Field(ge=1, le=MAX_COUNT)]
#: The most attempts (submissions, downloads) a setting may name: like a cap, beyond is a typo.
MAX_ATTEMPTS = MAX_COUNT
#: The largest output a download may accept: 1 TiB, far beyond any video fal returns (2 GiB default).
MAX_DOWNLOAD_BYTES = 1024**4
#: The largest local file sent inline as a data URI: 64 MiB, beyond the largest image or audio
#: file any endpoint takes (25 MB); a larger inline limit changes nothing but the typo.
MAX_INLINE_BYTES = 64 * 1024**2
#: The shortest ``WANBATCH_SERVE_TOKEN`` taken: the dashboard's actions must not be guessable.
MIN_SERVE_TOKEN_LENGTH = 16


#: ``WANBATCH_DOWNLOAD_PROXY``'s value that downloads through the environment's proxy variables.
DOWNLOAD_PROXY_FROM_ENV = "env"


#: The variables read without the ``WANBATCH_`` prefix: fal's and the AWS SDK's own names.
_UNPREFIXED = frozenset(
    {"FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"}
)
#: The variables that make up the fal key, read as fal_client reads them (:func:`_key_in_use`).
_KEY_VARIABLES = frozenset({"fal_key", "fal_key_id", "fal_key_secret"})


def _setting_name(loc: tuple[int | str, ...]) -> str:
    """The variable a validation error is about, and where inside its (JSON) value."""
    head = str(loc[0]).upper() if loc else "?"
    name = head if head in _UNPREFIXED else f"WANBATCH_{head}"
    return name + (f" (at {'.'.join(str(p) for p in loc[1:])})" if len(loc) > 1 else "")


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, which decodes JSON values (dicts, lists) itself.

    Two differences: an empty variable counts as unset, and a value that is not JSON is a
    one-line :class:`ConfigError` naming the variable — pydantic-settings' own ``SettingsError``
    names the field, not the variable, and chains the decoder's traceback.
    """

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError as exc:
            raise ConfigError(
                f"invalid configuration: {_setting_name((field_name,))}: not valid JSON ({exc})"
            ) from None


class _Section(BaseSettings):
    """What every section shares: the ``WANBATCH_`` prefix, frozen values, the JSON decoding."""

    # ``inf`` and ``nan`` are no number of seconds, submits or dollars: refused for every field.
    # ``defer_build``: a section's validator is built when it is first used, not at import. Each
    # command reads the whole :class:`Settings`; building a dozen sections' validators that
    # nothing uses was a fifth of every command's start-up.
    model_config = SettingsConfigDict(
        env_prefix="WANBATCH_", extra="ignore", frozen=True, allow_inf_nan=False, defer_build=True
    )

    @model_validator(mode="before")
    @classmethod
    def _plain_numbers(cls, data: Any) -> Any:
        """Refuse a number written with ``_`` or non-ASCII characters (``1_0``, ``٣``).

        Python's and pydantic's number parsers accept both (``float("1_0")`` is 10), where a
        manifest reads such a value as text and ``--max-usd`` refuses it: a money setting
        ``WANBATCH_DAILY_BUDGET_USD=1_0`` was a budget of $10 that nobody wrote."""
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if isinstance(value, str) and _is_number(field.annotation) and not _plain_number_text(value):
                raise ConfigError(
                    f"invalid configuration: {_setting_name((name,))}: {value.strip()!r} is not a plain "
                    "number: write it in ASCII digits, without `_` (such as 10 or 2.5)"
                )
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvSource(settings_cls), dotenv_settings, file_secret_settings


def _is_number(annotation: Any) -> bool:
    """Whether a field's type is a number (int, float, Decimal), optional or not."""
    if annotation in (int, float, Decimal):
        return True
    return any(arg in (int, float, Decimal) for arg in get_args(annotation))


def _plain_number_text(value: str) -> bool:
    """Whether ``value`` is written in ASCII without ``_`` (what a number setting may hold)."""
    return value.isascii() and "_" not in value


def _one_of(*words: str) -> BeforeValidator:
    """A setting that is one of ``words``, in any case, with spaces around it dropped (as
    ``WANBATCH_LOG_FORMAT=JSON`` always was; ``WANBATCH_MEDIA_MISMATCH=FAIL`` was refused with
    pydantic's "String should match pattern '^(flag|fail)$'"). Anything else: one line saying
    the words."""
    allowed = " or ".join(repr(word) for word in words)

    def check(value: object) -> object:
        if not isinstance(value, str):
            return value
        word = value.strip().lower()
        if word not in words:
            raise ValueError(f"must be {allowed} (any case), got {value.strip()!r}")
        return word

    return BeforeValidator(check)


#: A ``%`` that does not start a percent escape (two hex digits).
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _http_url(value: str, example: str, *, base: bool = False) -> str:
    """``value`` as an http(s) URL with a host (trailing slashes dropped); ValueError saying what
    is wrong otherwise — checked when the settings load, not when the first job fails with
    "unsupported URL". The value itself is not echoed: a URL may carry a token.

    Refused too, as each passed here and then failed every request: port 0 (nothing listens
    there: ``run`` waited for ever, "fal is unreachable"), a fragment (``#…``, never sent) and a
    ``%`` that starts no percent escape (``/%``). A ``base`` URL (fal's queue and REST URLs,
    the simulator's public URL) is one every request's path is appended to, as text: a query
    (``?q=1``) there swallowed that path, and every job failed "Application '' not found"."""
    url = value.strip()
    if not url:
        raise ValueError(f"is empty; an http(s) URL such as {example} is needed (unset it for the default)")
    _refuse_control_characters(url)
    parsed = urlsplit(url)
    if parsed.scheme.lower() not in ("http", "https"):
        scheme = f"scheme {parsed.scheme!r}" if parsed.scheme else "no scheme"
        raise ValueError(f"must be an http(s) URL such as {example} (this one has {scheme})")
    try:
        parsed.port  # noqa: B018 (raises for a port that is no number, or out of range)
    except ValueError:
        raise ValueError(f"has an invalid port; expected an http(s) URL such as {example}") from None
    if not parsed.hostname or any(ch.isspace() for ch in url):
        raise ValueError(f"must be an http(s) URL with a host, such as {example}")
    problem = http_host_problem(parsed.hostname)
    if problem:
        raise ValueError(problem)
    if parsed.port == 0:
        raise ValueError(
            f"has port 0, where no server can be reached; give the port it listens on (1 to 65535), "
            f"such as {example}"
        )
    if base and "?" in url:
        raise ValueError(
            "has a query (?…): every request's path is appended to this URL, and would end up in the "
            f"query; write only scheme://host[:port] and a path, such as {example}"
        )
    if "#" in url:
        raise ValueError(
            f"has a fragment (#…), which is never sent; write the URL without it, such as {example}"
        )
    if _BAD_ESCAPE.search(url):
        raise ValueError(
            "has an invalid percent escape: '%' starts two hex digits (%2F), a '%' itself is written %25"
        )
    return url.rstrip("/")


def check_http_url(value: str, example: str) -> str:
    """:func:`_http_url` for a base URL given elsewhere than a setting (``sim --public-url``):
    the URL without trailing slashes, or ValueError saying what is wrong (never echoing it)."""
    return _http_url(value, example, base=True)


#: What a URL's host may be, as an error message says it.
HOST_FORMS = (
    "a host is dot-separated labels of 1 to 63 letters, digits or hyphens, a name IDNA 2008 "
    "allows (bücher.example), an IPv4 or an [IPv6] address"
)
#: What httpx takes for an IPv4 address (``httpx._urlparse.IPv4_STYLE_HOSTNAME``), and then
#: requires to be one.
_IPV4_STYLE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+", re.ASCII)


def http_host_problem(host: str) -> str | None:
    """What httpx, which sends every request, or the resolver refuses in a URL's host (as
    :func:`urllib.parse.urlsplit` gives it: lower case, an IPv6 literal without brackets), or
    None. The host is not echoed: it comes from a URL that may carry a token.

    :func:`~urllib.parse.urlsplit` takes any host. httpx refuses (``InvalidURL``) a
    non-ASCII name that IDNA 2008 does not allow (``☃.example``), an ``xn--`` name that is no
    valid Punycode and a ``#.#.#.#`` that is no IPv4 address (``httpx._urlparse.encode_host``);
    the resolver (Python's ``idna`` codec, in ``getaddrinfo``) refuses an empty label (``a..b``,
    ``.a``) and one over 63 characters. Each passed the settings check, then crashed the first
    request of a run, or held its jobs back for ever. ``idna`` is imported for a name that is
    not plain ASCII only."""
    if ":" in host:  # an IPv6 literal: urlsplit checked it
        return None
    if _IPV4_STYLE.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "its host is no IPv4 address (four numbers from 0 to 255, no leading zeros)"
        return None
    name = host
    if not host.isascii() or host.startswith("xn--"):
        import idna  # httpx's own IDNA library

        try:
            name = host if host.isascii() else idna.encode(host.lower()).decode("ascii")
            if name.startswith("xn--"):
                idna.decode(name)  # what httpx does to give the URL's host
        except (idna.IDNAError, UnicodeError):
            return f"its host is no name IDNA 2008 allows (httpx refuses it); {HOST_FORMS}"
    problem = resolvable_host_problem(name)
    return f"{problem}; {HOST_FORMS}" if problem else None


def resolvable_host_problem(host: str) -> str | None:
    """What Python's resolver refuses in a host name (its ``idna`` codec, which
    :func:`socket.getaddrinfo` applies to every name it is given), or None; not echoed. A name
    the codec takes may still be unknown to DNS: that is the network's answer, not a setting's
    mistake."""
    if ":" in host:  # an IPv6 literal
        return None
    try:
        host.encode("idna")
    except UnicodeError:
        return "its host has an empty label (as in a..b) or one over 63 characters, or is no name IDNA allows"
    return None


def _refuse_control_characters(url: str) -> None:
    """ValueError when ``url`` holds a control character (``\\x01``, DEL, …): httpx
    refuses such a URL on the first request ("Invalid non-printable ASCII character"), which
    surfaced as an internal error in the middle of a run. The value is not echoed (a token)."""
    if any(not ch.isprintable() and not ch.isspace() for ch in url):  # spaces: "with a host" below
        raise ValueError("contains a control (non-printable) character; write the URL again")


#: What starts a JSON list: ``[`` then a string, the end of the list, or nothing (a broken list).
#: ``[::1]:8443`` (an IPv6 host, as the README writes one) starts with ``[`` too and is no JSON.
_JSON_LIST = re.compile(r'\[\s*(?:"|\]|$)')


def _listed(value: object, separators: str) -> object:
    """A JSON list of strings, or text split at any of ``separators`` (blanks dropped); other
    values as is."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if _JSON_LIST.match(text):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"starts like a JSON list but is not one ({exc})") from None
    for separator in separators[1:]:
        text = text.replace(separator, separators[0])
    return [part.strip() for part in text.split(separators[0]) if part.strip()]


def home_expanded(path: Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded, as a shell would have done it (and as a
    manifest's own paths are): taken literally, ``WANBATCH_OUTPUT_DIR='~/out'`` (quoted, or set in
    a ``.env`` or a compose file, where no shell expands it) made a folder named ``~`` wherever the
    command ran. ValueError when the home folder is unknown: the setting names a folder nobody meant."""
    if not str(path).startswith("~"):
        return path
    try:
        return path.expanduser()
    except RuntimeError:  # "~nosuchuser", or no HOME and no password entry
        raise ValueError(
            f"starts with {path.parts[0]!r}, whose home folder is unknown: give the folder in full"
        ) from None


#: The forms of a ``WANBATCH_DOWNLOAD_ALLOWED_HOSTS`` entry, as an error message lists them.
ALLOWED_HOST_FORMS = (
    "each entry is host, host:port, *.suffix, [IPv6] or [IPv6]:port, comma-separated "
    "(e.g. *.fal.media,media.example:8443)"
)
#: A host name (or an IPv4 address): dot-separated labels of letters, digits, ``-`` and ``_``
#: (some storage hosts use it), neither starting nor ending with ``-``; a final dot is allowed.
_HOST_NAME = re.compile(
    r"(?=[^:]{1,254}$)(?!-)[a-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9_-]{1,63}(?<!-))*\.?",
    re.ASCII | re.IGNORECASE,
)


def allowed_host_entry(entry: str) -> tuple[str, int | None]:
    """A ``WANBATCH_DOWNLOAD_ALLOWED_HOSTS`` entry as ``(host as compared, port or None for any)``.

    ``host``, ``*.suffix``, ``host:port``, ``[v6]`` and ``[v6]:port`` (RFC 3986 §3.2.2 brackets an
    IPv6 literal so its colons are not read as a port); a bare IPv6 literal is a host, any port.
    Anything else (``*``, ``host:abc``, a URL) is a ValueError naming the entry: such an entry
    matched no host, so the downloads it was meant to allow were refused after fal had been paid.
    The host is compared in lower case, without brackets or a final dot.
    """
    text = entry.strip()
    if text.startswith("["):
        inside, closed, rest = text[1:].partition("]")
        if not closed or not _is_ipv6(inside):
            raise _bad_host_entry(entry, "not an IPv6 address in brackets")
        if rest and not rest.startswith(":"):
            raise _bad_host_entry(entry, "not [IPv6] or [IPv6]:port")
        return inside.lower(), _entry_port(entry, rest[1:]) if rest else None
    if text.count(":") > 1:
        if _is_ipv6(text):  # its last group is no port
            return text.lower(), None
        raise _bad_host_entry(entry, "a URL, not a host" if "://" in text else "not a host or host:port")
    name, colon, port = text.partition(":")
    if "/" in text or "@" in text:
        raise _bad_host_entry(entry, "a URL, not a host")
    if not _HOST_NAME.fullmatch(name.removeprefix("*.")):
        raise _bad_host_entry(entry, "not a host name")
    return name.lower().rstrip("."), _entry_port(entry, port) if colon else None


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _entry_port(entry: str, port: str) -> int:
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise _bad_host_entry(entry, f"its port {port!r} is not a number from 1 to 65535")
    return int(port)


def _bad_host_entry(entry: str, reason: str) -> ValueError:
    # A URL's user and password are not echoed: settings may be shown where others read them.
    shown = re.sub(r"^([a-z][a-z0-9+.-]*://)?[^/]*@", r"\1***@", entry.strip(), flags=re.IGNORECASE)
    return ValueError(f"entry {shown!r}: {reason}; {ALLOWED_HOST_FORMS}")


#: The broker URLs taken, as an error message lists them.
BROKER_URL_FORMS = (
    "expected a Redis URL such as redis://127.0.0.1:6379/0 (rediss:// with TLS, "
    "redis+socket:///path/to/redis.sock) or an AMQP URL such as amqp://user:password@host:5672//"
)
#: The Celery transports a broker URL may name: Redis (what the README documents and the
#: submit-rate limiter shares) and AMQP (RabbitMQ, Celery's default transport).
_BROKER_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "amqp", "amqps", "pyamqp"})


def broker_url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as ``WANBATCH_BROKER_URL``, or None. The value is not echoed:
    it may hold a password. A Redis URL's database, when given, is a number (Celery's worker
    refused ``/abc`` only once it had started)."""
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "contains a space or a control (non-printable) character"
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in _BROKER_SCHEMES:
        return f"scheme {scheme!r} is not a supported broker" if sep else "not a URL"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises for a port that is no number, or out of range)
    except ValueError:
        return "not a valid URL (a broken [IPv6] host, or a port that is no number from 0 to 65535)"
    if scheme.lower() == "redis+socket":
        return None if parts.path.strip("/") else "names no socket path"
    if not parts.hostname:
        return "names no host"
    if problem := resolvable_host_problem(parts.hostname):
        return problem
    database = parts.path.strip("/")
    if scheme.lower().startswith("redis") and database and not database.isdigit():
        return "its Redis database (after the host) is not a number"
    return None


#: The variable a field's raw value came from, where it is not the field's own: an ``s3://``
#: output location is split off ``WANBATCH_OUTPUT_DIR`` (:meth:`DownloadSettings._split_output_location`).
_FROM_VARIABLE = {"output_url": "output_dir"}


def settings_holding_key(data: Mapping[str, Any]) -> list[str]:
    """The variables, other than FAL_KEY, whose value in ``data`` (the settings as read, before
    validation: field or alias → value) holds FAL_KEY's value or its secret half, or
    FAL_KEY_SECRET's value, plain or percent-encoded (:func:`jobs.key_forms.contains_key`); in
    the order of ``data``, each once (:func:`settings_holding_secrets`, without what each holds).

    wanbatch sends the key as an ``Authorization`` header only. Written into a URL (a queue URL's
    password, path or query, a webhook path, a Redis URL's query) or a folder, it went wherever
    that setting goes: printed by ``doctor`` and by one-line errors, stored with every request's
    status and result URLs. ``FAL_KEY_SECRET``'s value is looked for too, whether or not it makes
    the key in use (:func:`_key_in_use`): it is a secret either way. A key under
    :data:`jobs.key_forms.MIN_KEY_LENGTH` characters is never found (too short to tell from
    ordinary text), so a test key such as ``k3y`` refuses nothing.
    """
    return [name for name, _held in settings_holding_secrets(data)]


def settings_holding_secrets(
    data: Mapping[str, Any], *, key_from_pair: bool = False
) -> list[tuple[str, str]]:
    """:func:`settings_holding_key`, each variable with the one whose value it holds: ``FAL_KEY``
    (its value, or its secret half, as FAL_KEY was set), else ``FAL_KEY_SECRET`` — a value that
    holds only FAL_KEY_SECRET's (FAL_KEY set to another key, or not set: ``key_from_pair``, the
    key in use made of FAL_KEY_ID and FAL_KEY_SECRET, :func:`_key_in_use`). The refusal names the
    variable the user wrote the secret in, never the value."""
    fal_key, secret = (
        key.strip() if key is not None and len(key.strip()) >= MIN_KEY_LENGTH else None
        for key in (_raw_text(data, "FAL_KEY"), _raw_text(data, "FAL_KEY_SECRET"))
    )
    # The key in use made of FAL_KEY_ID:FAL_KEY_SECRET: no FAL_KEY of the user's, the pair's
    # key (or its secret half) held is FAL_KEY_SECRET's value held.
    secrets = [k for k in (secret, fal_key if key_from_pair else None) if k is not None]
    fal_key = None if key_from_pair else fal_key
    if fal_key is None and not secrets:
        return []
    found: list[tuple[str, str]] = []
    for field, value in data.items():
        if str(field).lower() in _KEY_VARIABLES:
            continue
        texts = _texts(value)
        if fal_key is not None and any(contains_key(text, fal_key) for text in texts):
            held = "FAL_KEY"
        elif any(contains_key(text, key) for text in texts for key in secrets):
            held = "FAL_KEY_SECRET"
        else:
            continue
        name = _setting_name((_FROM_VARIABLE.get(str(field), str(field)),))
        if name not in (n for n, _h in found):
            found.append((name, held))
    return found


def key_in_setting_line(found: Sequence[tuple[str, str]]) -> str:
    """The one line refusing the settings :func:`settings_holding_secrets` found: each variable
    with the one whose value it holds, never the value."""
    parts = []
    for held in ("FAL_KEY", "FAL_KEY_SECRET"):
        names = [name for name, h in found if h == held]
        if names:
            parts.append(f"{', '.join(names)} {'contains' if len(names) == 1 else 'contain'} {held}")
    holders = {h for _n, h in found}
    if holders == {"FAL_KEY_SECRET"}:
        belongs = "the key's secret belongs in FAL_KEY_SECRET only"
    elif holders == {"FAL_KEY"}:
        belongs = "the key belongs in FAL_KEY only"
    else:
        belongs = "the key and its secret belong in FAL_KEY and FAL_KEY_SECRET only"
    return (
        f"invalid configuration: {'; '.join(parts)}: {belongs} (wanbatch sends it as an "
        "Authorization header); take it out of the setting"
    )


def _raw_text(data: Mapping[str, Any], name: str) -> str | None:
    """The variable ``name``'s value in ``data`` (the settings as read: by the variable's name, or
    the field's), as text; None when it is unset or no text."""
    raw = data.get(name, data.get(name.lower()))
    value = raw.get_secret_value() if isinstance(raw, SecretStr) else raw
    return value if isinstance(value, str) else None


#: Quotes, which no fal key holds: one at either end of a key is a ``.env`` file's quoting
#: kept as part of the value (``docker run --env-file`` takes ``FAL_KEY="…"`` literally).
_QUOTES = "\"'"


def clean_key_text(value: str) -> str | None:
    """A fal key (or its id or secret half) as typed: without the whitespace a copy-paste or a
    ``.env`` with CRLF endings leaves around it, None when nothing is left; ValueError, never
    holding the key, for a key wrapped in quotes or with whitespace or control characters inside.

    Sent as is, a quoted key is refused by fal (HTTP 401, which paused the batch saying only that
    the key was rejected), and one with a control character inside makes httpx refuse every
    request header — which used to look like an ambiguous submit."""
    key = value.strip()
    if not key:
        return None
    if key[0] in _QUOTES or key[-1] in _QUOTES:
        raise ValueError(
            "the value is wrapped in quotes (it starts or ends with \" or '), which are no part of "
            "a fal key: a .env file read by `docker run --env-file` (or `env $(cat .env)`) keeps "
            "them; write the key without quotes"
        )
    if any(not ("!" <= ch <= "~") for ch in key):
        raise ValueError(
            "the key contains spaces, control or non-ASCII characters inside it; "
            "copy it again from https://fal.ai/dashboard/keys"
        )
    return key


def _key_in_use(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with FAL_KEY set as fal_client sets the key it sends
    (``fal_client.auth._resolve_env_or_colab_auth``): FAL_KEY when it is set (not blank);
    otherwise, when FAL_KEY_ID and FAL_KEY_SECRET are both set, ``FAL_KEY_ID:FAL_KEY_SECRET``;
    otherwise none. Every use of the key (the header, its id, every redaction, the checks that
    no other setting holds it) then reads that one value. A part of the pair wrapped in quotes
    or with spaces inside is refused as FAL_KEY would be, naming its variable.

    One difference from fal_client, which never sees it: a FAL_KEY that is the bundled
    simulator's placeholder (:data:`SIMULATOR_KEYS`, docker-compose.yml's default) gives way to
    a complete pair, so a host that sets only the pair gets it in the containers."""
    fal_key = _raw_text(data, "FAL_KEY")
    if fal_key is not None and fal_key.strip() and fal_key.strip() not in SIMULATOR_KEYS:
        return data
    parts: list[str] = []
    for name in ("FAL_KEY_ID", "FAL_KEY_SECRET"):
        raw = _raw_text(data, name)
        try:
            part = clean_key_text(raw) if raw is not None else None
        except ValueError as exc:
            raise ConfigError(f"invalid configuration: {name}: {exc}") from None
        if part is None:
            return data
        parts.append(part)
    return {**{k: v for k, v in data.items() if str(k).lower() != "fal_key"}, "FAL_KEY": ":".join(parts)}


def _texts(value: object, depth: int = 0) -> list[str]:
    """Every text in a raw setting: a string, a path, a secret, and those inside a decoded JSON
    value (dict keys and values, list items); numbers and flags hold no key."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str | Path):
        return [str(value)]
    if depth > 20:  # no setting is nested this deep: its own validation refuses it
        return []
    if isinstance(value, Mapping):
        return [t for k, v in value.items() for item in (k, v) for t in _texts(item, depth + 1)]
    if isinstance(value, list | tuple | set | frozenset):
        return [t for item in value for t in _texts(item, depth + 1)]
    return []


class FalSettings(_Section):
    """Where fal is, the key that pays for it, and how long to wait for it."""

    fal_key: SecretStr | None = Field(default=None, validation_alias="FAL_KEY")
    #: fal_client's other way to give the key, as two variables: used when FAL_KEY is unset
    #: (:func:`_key_in_use`, which makes ``fal_key`` of them); kept here to say which one is
    #: missing, and to mask the secret wherever FAL_KEY is masked.
    fal_key_id: str | None = Field(default=None, validation_alias="FAL_KEY_ID")
    fal_key_secret: SecretStr | None = Field(default=None, validation_alias="FAL_KEY_SECRET")
    fal_queue_url: str = "https://queue.fal.run"
    fal_rest_url: str = "https://rest.fal.ai"
    connect_timeout: _Seconds = 10.0
    read_timeout: _Seconds = 60.0
    #: Send ``X-Fal-Disable-Fallbacks: true`` with every submit: fal otherwise may reroute a
    #: request to another model after repeated failures, so "the same input" would not be the
    #: same request (reproducibility lock, issue #13). ``false`` lets fal fall back.
    disable_fallbacks: bool = True

    @field_validator("fal_queue_url", "fal_rest_url")
    @classmethod
    def _check_url(cls, value: str, info: ValidationInfo) -> str:
        """An http(s) URL with a host; ``abc``, ``ftp://x`` or an empty value are refused here."""
        field = info.field_name or ""
        return _http_url(value, cls.model_fields[field].default, base=True)

    @field_validator("limits_url")
    @classmethod
    def _check_limits_url(cls, value: str | None) -> str | None:
        """A Redis URL (``redis://``, ``rediss://`` or ``unix://``): anything else passed here
        and then crashed ``run`` after it had stored the batch. Empty is unset, as before."""
        if not value:
            return value
        if value.split("://", 1)[0].lower() not in ("redis", "rediss", "unix") or "://" not in value:
            raise ValueError("must be a Redis URL (redis://, rediss:// or unix://)")
        try:
            host = urlsplit(value).hostname
        except ValueError:  # a broken [IPv6] host: Redis' own check says so
            return value
        if host and (problem := resolvable_host_problem(host)):
            raise ValueError(f"{problem}; expected a Redis URL such as redis://127.0.0.1:6379/0")
        return value

    @field_validator("fal_key", mode="before")
    @classmethod
    def _clean_key(cls, value: object) -> object:
        """The key without surrounding whitespace (:func:`clean_key_text`: a key wrapped in quotes,
        or with whitespace or control characters inside, is refused). The message never contains
        the key."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return value
        return clean_key_text(value)

    @field_validator("fal_key_id", "fal_key_secret", mode="before")
    @classmethod
    def _strip_key_part(cls, value: object) -> object:
        """FAL_KEY_ID and FAL_KEY_SECRET without surrounding whitespace; blank is unset. Only
        stripped here: when they make the key, :func:`_key_in_use` has checked them already, and
        when FAL_KEY is set fal_client does not read them either."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return value
        return value.strip() or None

    @model_validator(mode="before")
    @classmethod
    def _key_only_in_fal_key(cls, data: Any) -> Any:
        """Take the key from FAL_KEY_ID and FAL_KEY_SECRET when FAL_KEY is unset
        (:func:`_key_in_use`), then refuse every other setting that holds the key or
        FAL_KEY_SECRET (:func:`settings_holding_key`).

        Before any field is validated: a field's own error may quote its value (an allowed
        host's entry, an endpoint's name), and that value would be the key."""
        if not isinstance(data, dict):
            return data
        in_use = _key_in_use(data)
        if found := settings_holding_secrets(in_use, key_from_pair=in_use is not data):
            raise ConfigError(key_in_setting_line(found))
        return in_use

    def require_fal_key(self) -> str:
        """The key itself, for the one place that sends it; a clear error when it is unset, or
        when it is the simulator's placeholder and the queue is fal's own. A key that is no
        ``<key id>:<key secret>`` is sent (the simulator takes any key) after one warning line
        (:meth:`key_shape_problem`)."""
        if self.fal_key is None or not self.fal_key.get_secret_value():
            raise ConfigError(f"FAL_KEY is not set{self._half_a_pair()}: {NO_KEY_HINT}")
        key = self.fal_key.get_secret_value()
        problem = self.key_shape_problem()
        if problem and key in SIMULATOR_KEYS:  # fal's own host: refused for certain, so never sent
            raise ConfigError(problem)
        if problem and key not in _shape_warned:
            _shape_warned.add(key)
            log.warning(
                "%s: sent as it is (a simulator or a gateway may take any key), but fal will refuse it "
                "(HTTP 401)",
                problem,
                extra={"event": "config.key_shape"},
            )
        return key

    def _half_a_pair(self) -> str:
        """`` (FAL_KEY_ID is set, FAL_KEY_SECRET is not: …)`` when only one of the pair is set."""
        secret = self.fal_key_secret is not None and bool(self.fal_key_secret.get_secret_value())
        if bool(self.fal_key_id) == secret:
            return ""
        have, lack = ("FAL_KEY_ID", "FAL_KEY_SECRET") if self.fal_key_id else ("FAL_KEY_SECRET", "FAL_KEY_ID")
        return f" ({have} is set, {lack} is not: the pair makes the key only together)"

    def key_shape_problem(self, *, refused: bool = False) -> str | None:
        """What is wrong with the key's shape, in words that never hold the key, or None. fal's
        keys are ``<key id>:<key secret>``; one without ``:`` is refused by fal (HTTP 401), yet
        a simulator or a gateway may take any key: said when the queue is fal's own
        (:meth:`require_fal_key`, and with fal's 401), never refused; elsewhere nothing is said.
        The bundled simulator's placeholder (:data:`SIMULATOR_KEYS`) is no mistake, but on fal's
        own queue, where it can only be refused. ``refused``: the queue has just refused the key
        (HTTP 401), whatever its host: say what is odd about it."""
        key = self.fal_key.get_secret_value() if self.fal_key is not None else ""
        if key in SIMULATOR_KEYS and _is_fal_host(urlsplit(self.fal_queue_url).hostname):
            return (
                f"FAL_KEY is the bundled simulator's placeholder ({key}: docker-compose.yml's default), "
                f"which fal refuses, while WANBATCH_FAL_QUEUE_URL is fal's ({self.fal_queue_url}): set "
                "FAL_KEY, or FAL_KEY_ID and FAL_KEY_SECRET, to your key from https://fal.ai/dashboard/keys"
            )
        if not key or ":" in key or key in SIMULATOR_KEYS:
            return None
        if not refused and not _is_fal_host(urlsplit(self.fal_queue_url).hostname):
            return None  # a simulator's or a gateway's may take any key: nothing to say until it refuses
        return (
            f"FAL_KEY has no ':' ({len(key)} characters), where fal's keys are <key id>:<key secret>, "
            "as https://fal.ai/dashboard/keys shows them"
        )

    def secrets(self) -> tuple[str, ...]:
        """Every secret of fal's these settings hold, for the redactions: the key in use, and
        FAL_KEY_SECRET's value when it is set (also when FAL_KEY, set as well, is the key in use)."""
        values = [s.get_secret_value() for s in (self.fal_key, self.fal_key_secret) if s is not None]
        return tuple(dict.fromkeys(v for v in values if v))


#: How to go on without a key (after "FAL_KEY is not set").
NO_KEY_HINT = (
    "export FAL_KEY=<your fal API key>, or use the bundled simulator "
    "(`--simulate`: wanbatch run --simulate …, rerun --simulate …), which needs no key"
)


def _is_fal_host(host: str | None) -> bool:
    """Whether ``host`` is one of fal's own (``queue.fal.run``, ``*.fal.ai``, …), where the
    simulator's placeholder key can only be refused."""
    host = (host or "").lower().rstrip(".")
    return any(host == domain or host.endswith("." + domain) for domain in ("fal.run", "fal.ai", "fal.media"))


#: The placeholder keys sent to the bundled simulator, which takes any key: what ``--simulate``
#: sends (``cli.batch_commands.SIMULATOR_KEY``) and docker-compose.yml's ``FAL_KEY`` default. No
#: ``<key id>:<key secret>``, and nothing to warn about (:meth:`FalSettings.key_shape_problem`).
SIMULATOR_KEYS = frozenset({"simulator-key"})
#: The keys :meth:`FalSettings.require_fal_key` has warned about (once per key and process).
_shape_warned: set[str] = set()


#: Where SQLAlchemy's URL parser (``sqlalchemy.engine.url.make_url``, whose pattern this is)
#: finds a database URL's query: after the first ``?`` past the user, the password (which may
#: hold a ``?``), the host, the port and the database.
_DATABASE_URL = re.compile(
    r"""[\w+]+://
        (?:[^:/]*(?::[^@]*)?@)?
        (?:(?P<host>\[[^/?]+\]|[^/:?]+)?(?::[^/?]*)?)?
        (?:/[^?]*)?
        (?:\?(?P<query>.*))?""",
    re.VERBOSE,
)
#: The query options SQLAlchemy's SQLite driver (pysqlite) takes itself, and what each value is
#: converted to when the first connection opens: a value that does not convert was an internal
#: error there (``could not convert string to float: 'abc'``), exit 70.
SQLITE_DRIVER_OPTIONS = {
    "uri": "bool",
    "timeout": "seconds",
    "isolation_level": "text",
    "detect_types": "whole",
    "check_same_thread": "bool",
    "cached_statements": "whole",
}
#: The words SQLAlchemy reads as true or false (``sqlalchemy.util.asbool``).
_BOOLEAN_WORDS = frozenset({"true", "yes", "on", "y", "t", "1", "false", "no", "off", "n", "f", "0"})


def database_url_problem(url: str) -> str | None:
    """What is malformed in a database URL's query (after ``?``), or None. The URL's value is
    never echoed (a query may hold a password, ``sslpassword=``); an option's name may be.

    SQLAlchemy reads the query leniently: a part without ``=`` (``?%ZZ``, ``?mode``) is dropped
    without a word, an invalid percent escape is kept as typed, a repeated option becomes a list
    (``timeout=1&timeout=2``: an internal error when SQLite opened), and a SQLite driver option
    that is no number or flag (``timeout=abc``) failed only at the first connection, as an
    internal error. A URL that is no database URL at all is left to the database's own check."""
    match = _DATABASE_URL.match(url)
    query = match["query"] if match is not None else None
    if not query:
        return None
    where = "its query (after '?')"
    options: dict[str, str] = {}
    for part in query.split("&"):
        if not part:  # "?a=1&&b=2": nothing between
            continue
        if _BAD_ESCAPE.search(part):
            return (
                f"{where} has an invalid percent escape: '%' starts two hex digits (%2F), a '%' itself "
                "is written %25"
            )
        name, equals, value = part.partition("=")
        if not equals:
            return (
                f"{where} has a part with no '=', which would be ignored: each option is name=value, "
                "options are joined by '&'"
            )
        try:
            key, text = (unquote_to_bytes(x.replace("+", " ")).decode("utf-8") for x in (name, value))
        except UnicodeDecodeError:
            return f"{where} has percent escapes that are not UTF-8 text"
        if not key:
            return f"{where} has an option with no name ('=' first)"
        if key in options:
            return f"{where} gives the option {key!r} more than once"
        options[key] = text
    if url.partition("://")[0].split("+")[0].lower() != "sqlite":
        return None
    for key, text in options.items():
        problem = _sqlite_option_problem(SQLITE_DRIVER_OPTIONS.get(key), text.strip())
        if problem:
            return f"the SQLite option {key}={text} is not {problem}"
    return None


def _sqlite_option_problem(kind: str | None, text: str) -> str | None:
    """What a SQLite driver option's value should have been, when it is not."""
    if kind == "bool" and text.lower() not in _BOOLEAN_WORDS:
        return "true or false"
    if kind == "whole":
        try:
            int(text)
        except ValueError:
            return "a whole number"
    if kind == "seconds":
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not 0 <= seconds <= MAX_SECONDS:  # nan and inf too
            return "a number of seconds (0 or more)"
    return None


class DatabaseSettings(_Section):
    """The system of record."""

    database_url: str = Field(default_factory=lambda: f"sqlite:///{DEFAULT_STATE_DIR / 'wanbatch.db'}")
    #: How long an operator's command that reads (``status``, ``cost``, ``export``, ``diff``,
    #: ``doctor``, the dashboard's pages) waits for a lock another PostgreSQL session holds on
    #: wanbatch's tables before it gives up with one line naming that session (PostgreSQL's
    #: ``lock_timeout``, set for those commands' transactions only: ``run`` and the workers wait
    #: as long as it takes, and an export that runs long is not cut short). SQLite's busy wait
    #: (30 s) applies there instead.
    #: At most :data:`MAX_LOCK_WAIT_SECONDS` (PostgreSQL's own bound), refused here by name.
    database_lock_wait: Annotated[_Seconds, AfterValidator(_a_lock_wait_postgresql_takes)] = 10.0

    @field_validator("database_url")
    @classmethod
    def _refuse_in_memory(cls, value: str) -> str:
        """An in-memory SQLite database lives and dies with one connection: every command opens
        several (and ``run``, ``serve`` and the workers are other processes), so each would see
        its own empty database — the system of record must be a file or a server."""
        scheme, _, rest = value.strip().partition("://")
        if scheme.split("+")[0].lower() != "sqlite":
            return value
        database = rest[1:] if rest.startswith("/") else rest
        path = database.split("?")[0]
        if not path or path == ":memory:" or "mode=memory" in database or path.startswith("file::memory:"):
            raise ValueError(
                "an in-memory SQLite database is refused: the database is the system of record, shared "
                "by every connection and process (run, workers, serve, status), so it must be a file, "
                "e.g. sqlite:///path/to/wanbatch.db"
            )
        path = database.split("?")[0]
        if not path.startswith("file:") and (path.endswith("/") or path.rsplit("/", 1)[-1] in (".", "..")):
            raise ValueError(
                "the SQLite path names a folder, not a file: add the database file's name, e.g. "
                "sqlite:///path/to/wanbatch.db"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _refuse_malformed_query(cls, value: str) -> str:
        """A malformed query (:func:`database_url_problem`): one line at start-up, not an option
        silently dropped or an internal error at the first connection."""
        problem = database_url_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("database_url")
    @classmethod
    def _check_server_host(cls, value: str) -> str:
        """A PostgreSQL host the resolver refuses (``a..b``, a label over 63 characters): it
        passed here and then ended the first command in an internal error (UnicodeError)."""
        match = _DATABASE_URL.match(value.strip())
        host = (match["host"] or "") if match is not None else ""
        if host and not host.startswith("[") and value.partition("://")[0].split("+")[0].lower() != "sqlite":
            problem = resolvable_host_problem(unquote(host))
            if problem:
                raise ValueError(
                    f"{problem}; expected a database URL such as postgresql://user:password@db-host:5432/wanbatch"
                )
        return value


#: ``WANBATCH_CPU_AFFINITY`` besides a CPU number (worker.one_cpu).
CPU_AFFINITY_AUTO = "auto"
CPU_AFFINITY_OFF = "off"

#: The URL schemes of a Redis broker, as kombu reads them (its redis transport, and Sentinel).
REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://", "sentinel://")


class BrokerSettings(_Section):
    """The Celery transport, and the worker that runs inside ``wanbatch run`` without one."""

    broker_url: str | None = None
    #: Worker threads of the embedded (no broker) mode.
    embedded_concurrency: int = Field(default=4, ge=1, le=MAX_THREADS)
    #: Where an embedded run's threads run (worker.one_cpu): ``auto``, one CPU wanbatch chooses
    #: and moves off when it gets busy; ``off``, wherever the kernel puts them; or a CPU number.
    cpu_affinity: str = CPU_AFFINITY_AUTO

    @field_validator("cpu_affinity", mode="before")
    @classmethod
    def _check_cpu_affinity(cls, value: object) -> object:
        """``auto``, ``off`` or a CPU number (0, 1, …), any case, spaces around ignored."""
        if not isinstance(value, str):
            return value
        text = value.strip().lower()
        if text in (CPU_AFFINITY_AUTO, CPU_AFFINITY_OFF):
            return text
        if text.isascii() and text.isdigit() and len(text) <= 5:
            return str(int(text))
        raise ValueError(f"expected {CPU_AFFINITY_AUTO}, {CPU_AFFINITY_OFF} or a CPU number such as 0")

    @field_validator("broker_url", mode="before")
    @classmethod
    def _check_broker(cls, value: object) -> object:
        """Empty is unset (embedded mode, as docker-compose passes ``""``); anything else a broker
        URL (:func:`broker_url_problem`). ``garbage`` passed: Celery read it as an AMQP host
        and the worker retried "Cannot connect to amqp://guest:**@garbage:5672//" forever."""
        if not isinstance(value, str):
            return value
        if not value.strip():
            return None
        problem = broker_url_problem(value.strip())
        if problem:
            raise ValueError(f"{problem}; {BROKER_URL_FORMS}")
        return value.strip()


class TickSettings(_Section):
    """The periodic tick, status polls and leases. Seconds throughout."""

    #: How often the dispatcher/poller/reconciler tick runs.
    tick_interval: _Seconds = 1.0
    #: Status polls start this often and back off with elapsed time up to poll_max_interval.
    poll_min_interval: _Seconds = 2.0
    poll_max_interval: _Seconds = 30.0
    #: With a webhook receiver (``webhook_url``) completions arrive as webhooks and polling is
    #: only the safety net: a submitted job is first polled this long after its submit, and no
    #: more often than this afterwards.
    webhook_poll_after: _Seconds = 30.0
    #: A claimed job's lease; a worker that dies holding one gives the job back after this long.
    lease_seconds: _Seconds = 120.0


class LimitSettings(_Section):
    """How fast and how much is sent to fal (README "Limits, budgets and cost")."""

    submit_rate: _Rate = DEFAULT_SUBMIT_RATE
    max_outstanding: int = Field(default=DEFAULT_MAX_OUTSTANDING, ge=1, le=MAX_COUNT)
    #: Most jobs completed at fal and waiting for (or in) their download before dispatch stops
    #: sending: when downloads stall (a full disk, a slow link), paid outputs must not pile up at
    #: fal, where their files expire. ``None``: the same as ``max_outstanding``.
    max_download_backlog: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    #: Redis holding the global submit-rate limiter; defaults to the broker when it is Redis.
    #: Without one (embedded mode) the limiter lives in this process, which is then the only one.
    limits_url: str | None = None
    #: JSON object: endpoint id -> submits/second for that endpoint (on top of ``submit_rate``).
    submit_rate_per_endpoint: dict[str, _EndpointRate] = Field(default_factory=dict)
    #: JSON object: endpoint id -> most outstanding requests of that endpoint (within ``max_outstanding``).
    max_outstanding_per_endpoint: dict[str, _EndpointCap] = Field(default_factory=dict)
    #: Network jitter between a granted submit and fal receiving it, in seconds: submits are
    #: spaced (1 + this) / rate apart so that no 1-second window *as fal sees it* holds more than
    #: ``submit_rate`` submits.
    submit_jitter_allowance: float = Field(default=0.05, ge=0, le=1)
    #: Longest a submit task waits for a rate token before giving the job back to ``pending``.
    submit_wait_max: float = Field(default=2.0, ge=0, le=MAX_SECONDS)
    #: fal runs 2 to 40 requests at once depending on the account's tier and queues the rest.
    #: When a request we sent is still IN_QUEUE this many seconds later, the account runs fewer
    #: than our cap: send only enough to keep one request waiting at fal (0 turns this off).
    queue_wait_backoff: float = Field(default=60.0, ge=0, le=MAX_SECONDS)

    @property
    def download_backlog(self) -> int:
        """The download backlog's bound in effect: ``max_download_backlog``, else the outstanding cap."""
        return self.max_download_backlog or self.max_outstanding

    @field_validator("submit_rate_per_endpoint", "max_outstanding_per_endpoint")
    @classmethod
    def _check_endpoints(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Every key an endpoint of the registry: a misspelt one would limit nothing, silently."""
        for endpoint in value:
            _check_known_endpoint(endpoint)
        return value


def _check_known_endpoint(endpoint: str) -> None:
    """ValueError naming ``endpoint`` and the ones allowed, unless the registry knows it."""
    if endpoint not in known_endpoint_ids():
        raise ValueError(f"{endpoint}: not an endpoint wanbatch knows ({', '.join(known_endpoint_ids())})")


#: The highest price per billing unit an override may name (fal's are cents): beyond is a typo.
MAX_PRICE = 1e6


def _check_priced(endpoint: str, by: Mapping[str, Any]) -> None:
    """An override names an endpoint of the registry, and only prices it has: one for an unknown
    endpoint, or for a value its price never depends on, would change nothing (and, silently
    ignored, would drop the estimate's "assumed price" mark all the same)."""
    _check_known_endpoint(endpoint)
    pricing = get_endpoint(endpoint).pricing
    priced = pricing.usd_per_unit_by or {}
    unknown = sorted(str(k) for k in by if str(k) not in priced)
    if unknown:
        where = (
            f"its price depends on {pricing.usd_per_unit_field} ({', '.join(priced)})"
            if priced
            else "its price depends on no input value: use usd_per_unit"
        )
        raise ValueError(f"{endpoint}: usd_per_unit_by names {', '.join(unknown)}, but {where}")


class BudgetSettings(_Section):
    """What a job costs, and how much may be spent a day."""

    #: JSON object: endpoint id -> {"usd_per_unit": number} or {"usd_per_unit_by": {value: number}},
    #: to correct a price the registry marks as an assumption (e.g. fal-ai/wan-22).
    pricing_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: Cap on USD committed (spent + reserved) per UTC day across all batches; unset = no cap.
    daily_budget_usd: Decimal | None = Field(default=None, ge=0, lt=MAX_USD)

    @field_validator("pricing_overrides")
    @classmethod
    def _check_prices(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Every price a non-negative number, so pricing never meets a bad value mid-batch."""
        example = '{"fal-ai/wan-22": {"usd_per_unit": 0.1}} or {"…": {"usd_per_unit_by": {"720p": 0.2}}}'
        for endpoint, entry in value.items():
            unknown = set(entry) - {"usd_per_unit", "usd_per_unit_by"}
            if unknown or not entry:
                raise ValueError(f"{endpoint}: expected usd_per_unit or usd_per_unit_by, like {example}")
            prices = [("usd_per_unit", entry["usd_per_unit"])] if "usd_per_unit" in entry else []
            by = entry.get("usd_per_unit_by", {})
            if not isinstance(by, dict):
                raise ValueError(f"{endpoint}: usd_per_unit_by must be an object, like {example}")
            prices += [(f"usd_per_unit_by.{k}", v) for k, v in by.items()]
            for name, price in prices:
                number = isinstance(price, int | float) and not isinstance(price, bool)
                if not number or not 0 <= price < MAX_PRICE:
                    raise ValueError(
                        f"{endpoint}: {name} must be a number from 0 up to {MAX_PRICE:,.0f} (USD per billing "
                        f"unit), got {price!r}"
                    )
            _check_priced(endpoint, by)
        return value

    def usd_override(self, endpoint_id: str) -> dict[str, Decimal] | None:
        """Price overrides for one endpoint as Decimals, or None."""
        raw = self.pricing_overrides.get(endpoint_id)
        if raw is None:
            return None
        out: dict[str, Decimal] = {}
        if "usd_per_unit" in raw:
            out[""] = Decimal(str(raw["usd_per_unit"]))
        for key, val in dict(raw.get("usd_per_unit_by", {})).items():
            out[str(key)] = Decimal(str(val))
        return out


class RetrySettings(_Section):
    """How often a failed submission is tried again, and what to do when its outcome is unknown."""

    #: How many times a job may be submitted (transient and model errors) before it fails.
    max_attempts: int = Field(default=3, ge=1, le=MAX_ATTEMPTS)
    #: Backoff before a retryable failure is submitted again: base × 2^(attempt-1), capped.
    retry_base_delay: float = Field(default=5.0, ge=0, le=MAX_SECONDS)
    retry_max_delay: float = Field(default=300.0, ge=0, le=MAX_SECONDS)
    #: What to do with a submission whose outcome is unknown after ``submit_unknown_deadline``:
    #: "fail" (default: never risk paying twice) or "resubmit" (counted as a possible duplicate charge).
    submit_unknown_policy: Annotated[str, _one_of("fail", "resubmit")] = "fail"
    submit_unknown_deadline: float = Field(default=600.0, ge=0, le=MAX_SECONDS)


#: The hosts the AWS SDK takes in an endpoint URL (``botocore.utils.is_valid_endpoint_url``,
#: after a final dot is dropped); it refuses any other with "Invalid endpoint: <the whole URL>",
#: password included.
_S3_ENDPOINT_HOST = re.compile(
    r"((?!-)[a-z\d-]{1,63}(?<!-)\.)*((?!-)[a-z\d-]{1,63}(?<!-))", re.ASCII | re.IGNORECASE
)


class DownloadSettings(_Section):
    """Where outputs go, and what a download may take.

    ``WANBATCH_OUTPUT_DIR`` is a local folder, or ``s3://bucket/prefix`` for S3-compatible object
    storage (``jobs.output_store``). For an S3 location the URL is kept in :attr:`output_url`
    and :attr:`output_dir` becomes the local *staging* folder (``WANBATCH_OUTPUT_STAGING_DIR``,
    default ``.wanbatch/staging``) where a video is downloaded, hashed and probed before its
    upload — so ``output_dir`` is always a local :class:`~pathlib.Path`, never a URL that code
    written for folders could ``mkdir``.
    """

    output_dir: Path = Path("outputs")
    #: ``s3://bucket/prefix`` when ``WANBATCH_OUTPUT_DIR`` names object storage, else None. Set
    #: only from ``WANBATCH_OUTPUT_DIR`` (see :meth:`_split_output_location`).
    output_url: str | None = None
    #: Local folder for videos on their way to object storage (S3 only; unused for a folder).
    output_staging_dir: Path | None = None
    #: Largest output file we accept from the provider.
    download_max_bytes: int = Field(default=2 * 1024**3, gt=0, le=MAX_DOWNLOAD_BYTES)
    #: Hosts outputs may be downloaded from (and uploads PUT to) beyond the configured fal URLs'
    #: origins and fal's media hosts, comma-separated or a JSON list: ``host`` (any port),
    #: ``host:port`` (that port only; ``[v6]:port`` for an IPv6 literal) or ``*.fal.media`` style
    #: wildcards. Unset: any host whose addresses are all public; loopback, private, link-local,
    #: reserved, multicast and unspecified addresses are refused unless the URL is on a fal URL's
    #: origin (scheme, host and port) or listed here. Set: it adds to fal's hosts, never replaces
    #: them — only those listed (whatever they resolve to), the fal URLs' origins and fal's media
    #: hosts (:data:`worker.fal.storage.FAL_MEDIA_HOSTS`, at public addresses) are fetched from,
    #: e.g. ``media.internal.example:8443``.
    download_allowed_hosts: Annotated[list[str] | None, NoDecode] = None
    #: How downloads (and uploads' PUTs) reach fal's media hosts: unset, directly (the address
    #: guard judges the very address connected to); ``env``, through the proxy the environment's
    #: ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` name for the URL, ``NO_PROXY`` obeyed, as
    #: httpx reads them; or a proxy URL (``http://[user:pass@]proxy:3128``, ``https://``,
    #: ``socks5://``, ``socks5h://``) for every download. Loopback is never proxied. Through a
    #: proxy the guard judges names, not the address the proxy connects to
    #: (:meth:`worker.fal.storage.DownloadPolicy.check_proxied`). A secret: its URL may hold a
    #: password, never echoed.
    download_proxy: SecretStr | None = None
    #: How many times a failed download is retried before the job fails (never regenerated).
    download_attempts: int = Field(default=5, ge=1, le=MAX_ATTEMPTS)
    #: Longest one download attempt may take, in seconds, on top of the read timeout (which
    #: bounds each wait for bytes): a host that trickles bytes cannot hold a worker slot forever.
    download_timeout: _Seconds = 1800.0
    #: What a downloaded video that does not match the request (size, frame count, duration;
    #: see ``worker.probe``) leads to: "flag" (default: the job succeeds, the mismatch is
    #: recorded and shown) or "fail" (the job fails with the reason, its cost recorded as wasted).
    media_mismatch: Annotated[str, _one_of("flag", "fail")] = "flag"
    #: The AWS SDK's own endpoint variables, read here only to be checked (``jobs.output_store``
    #: reads them from the environment, as boto3 does), and only when outputs go to S3.
    aws_endpoint_url: str | None = Field(default=None, validation_alias="AWS_ENDPOINT_URL")
    aws_endpoint_url_s3: str | None = Field(default=None, validation_alias="AWS_ENDPOINT_URL_S3")

    @field_validator("aws_endpoint_url", "aws_endpoint_url_s3")
    @classmethod
    def _check_endpoint(cls, value: str | None, info: ValidationInfo) -> str | None:
        """With ``WANBATCH_OUTPUT_DIR=s3://…``, an http(s) URL with a host and a valid port: a
        port of ``99999`` or ``abc`` passed and then ended ``run`` in an internal error ("Port
        out of range"), and ``doctor`` blamed WANBATCH_OUTPUT_DIR. The password is never echoed
        (:func:`_http_url` names what is wrong, not the value). Without S3 the variable is the
        AWS SDK's business, not ours: it is left alone.

        boto3 reads the variable as it is, not this checked copy: a space before or after it (a
        ``.env`` file's ``AWS_ENDPOINT_URL="http://…:9000 "``), a query (``/?x``) or a fragment
        passed here and then failed every upload with the SDK's message, which quotes the whole
        URL, password included. Those are refused here too."""
        if not value or not info.data.get("output_url"):
            return value
        if not value.strip():
            raise ValueError("is blank; unset it, or write an http(s) URL such as http://127.0.0.1:9000")
        if value != value.strip():
            raise ValueError(
                "has a space before or after the URL (the AWS SDK reads the variable as it is); "
                "write it without, such as http://127.0.0.1:9000"
            )
        if "?" in value or "#" in value:
            raise ValueError(
                "has a query (?…) or a fragment (#…), which an S3 endpoint cannot take; "
                "write only scheme://host:port (and a path), such as http://127.0.0.1:9000"
            )
        url = _http_url(value, "http://127.0.0.1:9000", base=True)
        host = urlsplit(url).hostname or ""
        if ":" not in host and (len(host) > 255 or not _S3_ENDPOINT_HOST.fullmatch(host.removesuffix("."))):
            raise ValueError(
                "its host is not one the AWS SDK takes: dot-separated labels of 1 to 63 ASCII letters, "
                "digits and hyphens (no '_', no international name), an IPv4 or an [IPv6] address, "
                "such as http://127.0.0.1:9000"
            )
        return url

    @field_validator("download_proxy", mode="before")
    @classmethod
    def _check_download_proxy(cls, value: object) -> object:
        """``env`` (any case), or a proxy URL httpx can use (:func:`jobs.http_environment.proxy_problem`,
        as for ``HTTPS_PROXY``); blank is unset. The value is never echoed: it may hold a password."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return value
        text = value.strip()
        if not text:
            return None
        if text.lower() == DOWNLOAD_PROXY_FROM_ENV:
            return DOWNLOAD_PROXY_FROM_ENV
        from jobs.http_environment import proxy_problem

        problem = proxy_problem(text)
        if problem is None and not urlsplit(text if "://" in text else f"http://{text}").hostname:
            problem = "names no proxy host; write http://proxy.example:3128"
        if problem is not None:
            raise ValueError(f"{problem}, or 'env' to use the proxy HTTPS_PROXY names")
        return text if "://" in text else f"http://{text}"

    @field_validator("download_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        """Comma-separated (or a JSON list), each entry checked: one that matches no host is
        refused here, not found when the paid outputs cannot be downloaded."""
        hosts = _listed(value, ",")
        for entry in hosts if isinstance(hosts, list) else ():
            if isinstance(entry, str):
                allowed_host_entry(entry)
        return (hosts or None) if isinstance(value, str) else hosts

    @model_validator(mode="before")
    @classmethod
    def _split_output_location(cls, data: Any) -> Any:
        """``WANBATCH_OUTPUT_DIR=s3://…`` → :attr:`output_url` (normalised), and the staging
        folder as :attr:`output_dir`. A :class:`~pathlib.Path` would fold ``s3://`` into ``s3:/``
        (a relative folder named ``s3:``), so the URL is taken apart before field validation.
        ``output_url`` is never read on its own: it always follows ``WANBATCH_OUTPUT_DIR``. A
        malformed URL is left in place for :meth:`_refuse_bad_url` to name the variable."""
        if not isinstance(data, dict):
            return data
        from jobs.output_location import is_s3_url, normalise_s3_url

        data = dict(data)
        data.pop("output_url", None)
        location = data.get("output_dir")
        if isinstance(location, str) and is_s3_url(location):
            try:
                data["output_url"] = normalise_s3_url(location)
            except ValueError:
                return data
            staging = data.get("output_staging_dir")
            if staging is not None and _staging_problem(staging):  # refused under its own name
                staging = None
            data["output_dir"] = staging or DEFAULT_STATE_DIR / "staging"
        return data

    @field_validator("output_staging_dir", mode="before")
    @classmethod
    def _check_staging(cls, value: object) -> object:
        """A local folder (:func:`_staging_problem`), said under WANBATCH_OUTPUT_STAGING_DIR: a
        blank value was refused as "WANBATCH_OUTPUT_DIR: is empty", and ``s3://bkt/x`` was taken
        as the relative folder ``s3:/bkt/x``. Empty is unset (docker-compose passes ``""``)."""
        if isinstance(value, str) and not value:
            return None
        problem = _staging_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("output_dir", "output_staging_dir")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        """``~/out`` is the home folder's ``out``, not ``./~/out`` (:func:`home_expanded`)."""
        return None if value is None else home_expanded(value)

    @field_validator("output_dir", mode="before")
    @classmethod
    def _refuse_bad_url(cls, value: object) -> object:
        """An ``s3://`` value still here did not parse: say why, under WANBATCH_OUTPUT_DIR; another
        URL (``gs://…``, ``https://…``) is none wanbatch writes to (it was taken as a relative
        folder named ``gs:``). An empty value is refused too: as a path it is ``.``, and outputs
        would land in whatever folder the command runs in."""
        from jobs.output_location import is_s3_url, normalise_s3_url

        if isinstance(value, str) and not value.strip():
            raise ValueError(
                "is empty: name a folder (unset it for the default ./outputs) or s3://bucket/prefix"
            )
        if isinstance(value, str) and is_s3_url(value):
            normalise_s3_url(value)  # raises ValueError with the reason
        elif isinstance(value, str) and _URL_START.match(value.strip()):  # gs://…: a folder "gs:"
            raise ValueError(
                "is a URL wanbatch cannot write to: name a local folder, or s3://bucket/prefix for "
                "S3-compatible object storage"
            )
        return value


#: A URL's start: a scheme, then ``://`` (``s3://``, ``https://``, ``gs://``).
_URL_START = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def _staging_problem(value: object) -> str | None:
    """What is wrong with ``value`` as ``WANBATCH_OUTPUT_STAGING_DIR``, or None (empty: unset)."""
    if not isinstance(value, str) or not value:
        return None
    if not value.strip():
        return "is blank: name a local folder (unset it for the default .wanbatch/staging)"
    if _URL_START.match(value.strip()):
        return (
            "is a URL: the staging folder must be a local folder (a video is downloaded, hashed and "
            "probed there before its upload to WANBATCH_OUTPUT_DIR), such as /var/tmp/wanbatch-staging"
        )
    return None


def _json_folders(text: str) -> list[str]:
    """``text`` as a JSON list of folder names; ValueError saying what else it is."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"starts like JSON but is not JSON ({exc}); {_FOLDERS_FORMS}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"is JSON but not a list of folder names; {_FOLDERS_FORMS}")
    return value


_FOLDERS_FORMS = 'expected folders separated by ":" or ",", or a JSON list such as ["/data/in", "~/media"]'


class InputSettings(_Section):
    """What a manifest's local files may be, and how they reach fal."""

    #: Local images up to this many bytes are sent inline as data URIs; larger ones are uploaded.
    inline_max_bytes: int = Field(default=256 * 1024, ge=0, le=MAX_INLINE_BYTES)
    #: Folders, beyond a manifest's own, that its local files (images, ``items_from``) may come
    #: from. ``os.pathsep`` (":" on POSIX) or comma separated, or a JSON list. Unset: only the
    #: manifest's folder, so a shared manifest cannot read (and send to fal) a private file.
    allowed_input_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)

    @field_validator("allowed_input_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: object) -> object:
        """Separated folders, or a JSON list of them. A value written as JSON (``[`` or ``{``
        first) must be a list of folder names: ``{"a":1}``, ``[[1]]`` or ``[null]`` were split
        at ``:`` and ``,`` into folders nobody meant, silently."""
        if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
            value = _json_folders(value)
        return _listed(value, os.pathsep + ",")

    @field_validator("allowed_input_dirs")
    @classmethod
    def _expand_homes(cls, value: list[Path]) -> list[Path]:
        """``~/media`` is the home folder's ``media`` (:func:`home_expanded`), as ``--allow-dir``
        takes it from a shell."""
        return [home_expanded(folder) for folder in value]


class WebhookSettings(_Section):
    """fal's completion callback."""

    #: Public URL of a webhook receiver. When set, every submit asks fal to call it on completion
    #: with ``job_id`` and ``attempt`` in the query, so a webhook can prove what happened to a
    #: submission whose answer was lost (``submit_unknown``) — fal signs it, we can verify it.
    webhook_url: str | None = None
    #: fal's webhook-signing public keys (https://docs.fal.ai/model-endpoints/webhooks).
    webhook_jwks_url: str = "https://rest.fal.ai/.well-known/jwks.json"
    #: How long an applied delivery stays in the receiver's inbox before the tick deletes it
    #: (``jobs.store.prune_deliveries``); within it a repeat of the same body is recognised and
    #: counted, not stored again. At least fal's two hours of webhook retries; 7 days by default.
    webhook_retention: float = Field(default=7 * 24 * 3600.0, ge=WEBHOOK_RETRY_SECONDS, le=MAX_SECONDS)
    #: The fal accounts (user ids, as ``X-Fal-Webhook-User-Id`` names them; comma-separated) our
    #: webhooks are signed for: a delivery signed for any other is refused. Unset (the default):
    #: each API key's account is learnt from the first delivery of a request its own submit
    #: recorded (``jobs.models.FalAccount``), and deliveries that prove nothing are held until then.
    fal_user_id: str | None = None

    @property
    def fal_user_ids(self) -> frozenset[str]:
        """``WANBATCH_FAL_USER_ID``'s accounts (empty: learnt instead)."""
        return frozenset(part.strip() for part in (self.fal_user_id or "").split(",") if part.strip())

    @field_validator("fal_user_id", mode="before")
    @classmethod
    def _check_fal_user_id(cls, value: object) -> object:
        """Empty is unset; otherwise user ids of visible characters without spaces, comma-separated."""
        if not isinstance(value, str):
            return value
        parts = [part.strip() for part in value.split(",")]
        if not any(parts):
            return None
        if not all(parts) or any(not part.isprintable() or " " in part for part in parts):
            raise ValueError("expected fal user ids (as X-Fal-Webhook-User-Id names them), comma-separated")
        return ",".join(parts)

    @field_validator("webhook_url", mode="before")
    @classmethod
    def _check_webhook_url(cls, value: object) -> object:
        """Empty is unset (docker-compose passes ``""``); anything else an http(s) URL with a host."""
        if not isinstance(value, str):
            return value
        return _http_url(value, "https://your-host/webhooks/fal") if value.strip() else None

    @field_validator("webhook_jwks_url", mode="before")
    @classmethod
    def _check_jwks_url(cls, value: object) -> object:
        """Empty means fal's own keys (the default); anything else an http(s) URL with a host."""
        if not isinstance(value, str):
            return value
        default = str(cls.model_fields["webhook_jwks_url"].default)
        return _http_url(value, default) if value.strip() else default


#: What ``WANBATCH_METRICS_HOST`` may be, as an error message says it.
METRICS_HOST_FORMS = (
    "expected the address to listen on: an IPv4 address (127.0.0.1; 0.0.0.0 for every interface), "
    "an IPv6 address (::1 or [::1]; :: for every interface) or a host name of dot-separated labels "
    "of 1 to 63 letters, digits or hyphens (localhost)"
)


def metrics_host_problem(host: str) -> str | None:
    """What is wrong with ``host`` (stripped, without brackets) as an address to listen on, or None."""
    if ":" in host:
        return None if _is_ipv6(host) else f"{host!r} is no IPv6 address"
    if any(not ch.isprintable() or ch.isspace() for ch in host):
        return f"{host!r} is no address or host name"
    problem = http_host_problem(host.lower())  # an IPv4 address, a name the resolver takes
    if problem:
        return problem.split("; ")[0].replace("its host", "the host", 1).replace(" (httpx refuses it)", "")
    if host.isascii() and not _IPV4_STYLE.fullmatch(host) and not _HOST_NAME.fullmatch(host):
        return f"{host!r} is no address or host name"
    return None


class ServeSettings(_Section):
    """The operator's side: ``wanbatch serve`` (dashboard, metrics), logs."""

    #: Token the dashboard's pages and actions and ``/metrics`` require from every client,
    #: loopback included (``Authorization: Bearer …`` or the login form's cookie): a reverse
    #: proxy on this host looks like loopback. Unset (or empty): the dashboard is read-only and
    #: answers loopback clients only. The webhook receiver never needs it. At least 16 visible
    #: ASCII characters (see :meth:`_check_token`).
    serve_token: SecretStr | None = None
    #: The proxies whose ``X-Forwarded-For``, ``X-Forwarded-Proto`` and ``X-Forwarded-Host``
    #: ``wanbatch serve`` believes (uvicorn's ``forwarded_allow_ips``; the host for the dashboard's
    #: Origin check, :func:`web.auth.origin_refusal`): addresses and networks, comma-separated, or
    #: ``*`` for any peer. Unset: uvicorn's default (``$FORWARDED_ALLOW_IPS``, else 127.0.0.1),
    #: which a proxy in another container or on another host is not.
    serve_forwarded_allow_ips: str | None = None
    #: ``text`` (default) or ``json``: one JSON object per line with a stable ``event`` key.
    log_format: Annotated[str, _one_of("text", "json")] = "text"
    #: A port on which ``wanbatch worker`` and ``wanbatch run`` serve their own process metrics
    #: (submits, limiter waits, request latencies) for Prometheus; unset: none.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    #: The address that metrics port binds: loopback by default (process metrics are not for
    #: the internet); ``0.0.0.0`` in a container that Prometheus scrapes from outside. An IPv6
    #: address may be bracketed (``[::1]``); it is kept without the brackets, as a bind takes it.
    metrics_host: str = "127.0.0.1"

    @field_validator("metrics_host", mode="before")
    @classmethod
    def _check_metrics_host(cls, value: object) -> object:
        """An address or a host name (:func:`metrics_host_problem`); empty is the default
        (docker-compose passes ``""``). ``a..b`` passed and then ended ``run`` and ``worker`` in
        an internal error (the resolver's UnicodeError), and ``doctor`` said all was well."""
        if not isinstance(value, str):
            return value
        host = value.strip()
        if not host:
            return cls.model_fields["metrics_host"].default
        if host.startswith("[") and host.endswith("]") and _is_ipv6(host[1:-1]):
            return host[1:-1]
        problem = metrics_host_problem(host)
        if problem:
            raise ValueError(f"{problem}; {METRICS_HOST_FORMS}")
        return host

    @field_validator("serve_forwarded_allow_ips", mode="before")
    @classmethod
    def _check_proxies(cls, value: object) -> object:
        """Empty is unset (docker-compose passes ``""``); each entry must be ``*``, an address
        or a network: uvicorn takes anything else as a literal that never matches a peer, and
        the proxy would go on being distrusted without a word."""
        if not isinstance(value, str):
            return value
        entries = [entry.strip() for entry in value.split(",") if entry.strip()]
        for entry in entries:
            if entry == "*":
                continue
            try:
                ipaddress.ip_network(entry) if "/" in entry else ipaddress.ip_address(entry)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is no address or network: give addresses (10.0.0.7, ::1), networks "
                    "(172.16.0.0/12, host bits zero) or *, comma-separated"
                ) from None
        if "*" in entries:  # uvicorn trusts any peer only for a lone "*"
            return "*"
        return ",".join(entries) or None

    @field_validator("serve_token", mode="before")
    @classmethod
    def _check_token(cls, value: object) -> object:
        """An empty (or blank) token is no token: docker-compose passes ``""`` when none is set.
        Surrounding whitespace (a ``.env`` with CRLF endings) is stripped. Anything else must be
        something a client can send as ``Authorization: Bearer …`` and nobody guesses: at least
        :data:`MIN_SERVE_TOKEN_LENGTH` visible ASCII characters. The message never holds it."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return value
        token = value.strip()
        if not token:
            return None
        if len(token) < MIN_SERVE_TOKEN_LENGTH or any(not ("!" <= ch <= "~") for ch in token):
            raise ValueError(
                f"the token must be at least {MIN_SERVE_TOKEN_LENGTH} visible ASCII characters (letters, "
                "digits, punctuation; no spaces, control or non-ASCII characters), e.g. the output of "
                "`openssl rand -hex 16`"
            )
        return token


class ChaosSettings(_Section):
    """Fault injection for the chaos suite only (:mod:`worker.chaos`)."""

    #: ``point:probability,…`` at which a worker kills itself (exit 137, like ``kill -9``) or
    #: stops itself (SIGSTOP).
    chaos_crash_points: str | None = None
    chaos_stop_points: str | None = None

    @field_validator("chaos_crash_points", "chaos_stop_points")
    @classmethod
    def _check_points(cls, value: str | None) -> str | None:
        """Parsed once here, so a typo is the usual configuration error at start-up."""
        parse_points(value)
        return value


class Settings(
    FalSettings,
    DatabaseSettings,
    BrokerSettings,
    TickSettings,
    LimitSettings,
    BudgetSettings,
    RetrySettings,
    DownloadSettings,
    InputSettings,
    WebhookSettings,
    ServeSettings,
    ChaosSettings,
):
    """Everything wanbatch can be told from the environment. Names are the contract's."""

    def limits_backend_url(self) -> str | None:
        """The Redis URL of the global limiter: ``limits_url``, else the broker when it is Redis."""
        if self.limits_url:
            return self.limits_url
        if self.broker_url and self.broker_url.split(":", 1)[0] in ("redis", "rediss", "unix"):
            return self.broker_url
        return None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once, for the edges. Tests call ``get_settings.cache_clear()``."""
    try:
        return Settings()
    except ValidationError as exc:
        # A validator's own words, without pydantic's "Value error, " before them.
        problems = "; ".join(
            f"{_setting_name(err['loc'])}: {err['msg'].removeprefix('Value error, ')}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    except SettingsError as exc:  # a source pydantic-settings could not read
        raise ConfigError(f"invalid configuration: {exc}") from None
