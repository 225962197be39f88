"""A URL's host that :func:`urllib.parse.urlsplit` takes but the library using the URL refuses,
and the settings whose value is one of a few words.

Each host below passed the settings check, then: ``WANBATCH_WEBHOOK_URL=https://☃.example/…``
crashed every submit (httpx: "Invalid IDNA hostname") and the run never ended; the same in a
fal URL was an internal error (exit 70) after the batch was stored; ``a..b`` or a label over
63 characters held every job back ("encoding with 'idna' codec failed"); in a PostgreSQL URL
it was an internal error; in ``AWS_ENDPOINT_URL`` boto3 refused it with the whole URL, password
included. ``WANBATCH_MEDIA_MISMATCH=FAIL`` was refused with pydantic's "String should match
pattern" while ``WANBATCH_LOG_FORMAT=JSON`` was taken.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from jobs.errors import ConfigError
from jobs.settings import check_http_url, get_settings

LONG_LABEL = "a" * 64

#: Hosts httpx or the resolver refuses, and a word of what is said.
BAD_HTTP_HOSTS = [
    ("\N{SNOWMAN}.example", "no name IDNA 2008 allows"),
    ("xn--abc.example", "no name IDNA 2008 allows"),
    ("a..b", "empty label"),
    (".a", "empty label"),
    (f"{LONG_LABEL}.com", "over 63 characters"),
    ("1.2.3.999", "no IPv4 address"),
    ("01.2.3.4", "no IPv4 address"),
]
HTTP_VARIABLES = [
    "WANBATCH_FAL_QUEUE_URL",
    "WANBATCH_FAL_REST_URL",
    "WANBATCH_WEBHOOK_URL",
    "WANBATCH_WEBHOOK_JWKS_URL",
]


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _refused(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> str:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        get_settings()
    message = str(caught.value)
    assert message.startswith(f"invalid configuration: {variable}: "), message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("variable", HTTP_VARIABLES)
@pytest.mark.parametrize(("host", "phrase"), BAD_HTTP_HOSTS)
def test_an_http_url_whose_host_httpx_or_the_resolver_refuses(
    variable: str, host: str, phrase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _refused(monkeypatch, variable, f"https://user:hunter2@{host}:8443/webhooks/fal?token=t0ken")
    assert phrase in message
    assert "IPv4" in phrase or "a host is dot-separated labels" in message  # what is allowed
    assert "hunter2" not in message
    assert "t0ken" not in message


@pytest.mark.parametrize(
    "host",
    [
        "b\N{LATIN SMALL LETTER U WITH DIAERESIS}cher.example",
        "xn--bcher-kva.example",
        "a_b.example",
        "host.",
        "[::1]",
    ],
)
def test_hosts_httpx_takes_are_taken(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"https://{host}:8443/webhooks/fal"
    for variable in HTTP_VARIABLES:
        monkeypatch.setenv(variable, url)
    settings = get_settings()
    assert settings.webhook_url == settings.fal_queue_url == url
    httpx.URL(url).host  # noqa: B018 (what the worker does with it)


def _as_httpx_then_the_resolver_take_it(url: str) -> None:
    """What a request does with ``url``: httpx parses it and gives its host, then
    :func:`socket.getaddrinfo` encodes that with the ``idna`` codec."""
    httpx.URL(url).host.encode("idna")


@pytest.mark.parametrize(("host", "phrase"), BAD_HTTP_HOSTS)
def test_every_refused_host_is_one_httpx_or_the_resolver_refuses(host: str, phrase: str) -> None:
    """The check refuses only what would have failed later."""
    with pytest.raises((httpx.InvalidURL, UnicodeError)):
        _as_httpx_then_the_resolver_take_it(f"https://{host}/")
    with pytest.raises(ValueError, match=phrase):
        check_http_url(f"https://{host}/", "https://example.com")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WANBATCH_BROKER_URL", "redis://:hunter2@a..b:6379/0"),
        ("WANBATCH_BROKER_URL", f"amqp://u:hunter2@{LONG_LABEL}.example:5672//"),
        ("WANBATCH_LIMITS_URL", "redis://:hunter2@a..b:6379/0"),
        ("WANBATCH_DATABASE_URL", "postgresql://u:hunter2@a..b:5432/wanbatch"),
        ("WANBATCH_DATABASE_URL", f"postgresql+psycopg://u:hunter2@{LONG_LABEL}.example/wanbatch"),
    ],
)
def test_a_server_host_the_resolver_refuses(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _refused(monkeypatch, variable, value)
    assert "empty label" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WANBATCH_BROKER_URL", "redis://db-host.internal:6379/0"),
        ("WANBATCH_LIMITS_URL", "redis://[::1]:6379/0"),
        ("WANBATCH_DATABASE_URL", "postgresql://u:p@db_host:5432/wanbatch"),
        ("WANBATCH_DATABASE_URL", "postgresql://u:p@[::1]:5432/wanbatch"),
    ],
)
def test_server_hosts_the_resolver_takes_are_taken(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    get_settings()


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
@pytest.mark.parametrize("host", ["minio_1", "\N{SNOWMAN}.example", "a..b", "-minio"])
def test_an_s3_endpoint_host_the_aws_sdk_refuses(
    variable: str, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """boto3 refused each with "Invalid endpoint: http://u:hunter2@…", password and all."""
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", "s3://renders/tokyo")
    message = _refused(monkeypatch, variable, f"http://u:hunter2@{host}:9000")
    assert "host" in message
    assert "hunter2" not in message


@pytest.mark.parametrize("value", ["https://a..b:8787", "http://\N{SNOWMAN}:8787"])
def test_the_simulator_public_url_is_checked_as_a_setting_is(value: str) -> None:
    with pytest.raises(ValueError, match="its host"):
        check_http_url(value, "http://simulator:8787")


@pytest.mark.parametrize(
    ("variable", "value", "field", "taken"),
    [
        ("WANBATCH_MEDIA_MISMATCH", "FAIL", "media_mismatch", "fail"),
        ("WANBATCH_MEDIA_MISMATCH", " Flag ", "media_mismatch", "flag"),
        ("WANBATCH_SUBMIT_UNKNOWN_POLICY", "Resubmit", "submit_unknown_policy", "resubmit"),
        ("WANBATCH_LOG_FORMAT", "JSON", "log_format", "json"),
    ],
)
def test_word_settings_take_any_case(
    variable: str, value: str, field: str, taken: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(get_settings(), field) == taken


@pytest.mark.parametrize(
    ("variable", "words"),
    [
        ("WANBATCH_MEDIA_MISMATCH", "'flag' or 'fail'"),
        ("WANBATCH_SUBMIT_UNKNOWN_POLICY", "'fail' or 'resubmit'"),
        ("WANBATCH_LOG_FORMAT", "'text' or 'json'"),
    ],
)
def test_a_word_setting_names_the_words_it_takes(
    variable: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _refused(monkeypatch, variable, "maybe")
    assert message == f"invalid configuration: {variable}: must be {words} (any case), got 'maybe'"
