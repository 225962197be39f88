"""Settings whose value has a shape, checked when the settings load: one line naming the
variable and what is allowed, never a failure found by the first job (or never found).

- the fal URLs (queue, REST, webhook, JWKS): ``abc``, ``ftp://x`` or an empty queue URL once
  made every job fail with "unsupported URL";
- an in-memory SQLite database: each connection saw its own empty database ("no such table");
- an empty ``WANBATCH_OUTPUT_DIR``: outputs landed in whatever folder the command ran in; and
  ``~/out`` in a folder setting made a folder named ``~`` there;
- the chaos points: a typo was a traceback in a worker's log the first time a job reached the
  point, and ``run`` waited forever.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.errors import ConfigError
from jobs.settings import get_settings


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


@pytest.mark.parametrize(
    "variable", ["WANBATCH_FAL_QUEUE_URL", "WANBATCH_FAL_REST_URL", "WANBATCH_WEBHOOK_JWKS_URL"]
)
@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("abc", "no scheme"),
        ("ftp://x", "scheme 'ftp'"),
        ("http://", "with a host"),
        ("https://:443/x", "with a host"),
        ("http://host:99999", "invalid port"),
        ("http://ho st", "with a host"),
    ],
)
def test_fal_urls_must_be_http_urls_with_a_host(
    variable: str, value: str, phrase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _refused(monkeypatch, variable, value)
    assert phrase in message
    assert "http(s) URL" in message


@pytest.mark.parametrize("variable", ["WANBATCH_FAL_QUEUE_URL", "WANBATCH_FAL_REST_URL"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_fal_url_is_refused(variable: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "is empty" in _refused(monkeypatch, variable, value)


def test_the_webhook_url_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "scheme 'ftp'" in _refused(monkeypatch, "WANBATCH_WEBHOOK_URL", "ftp://hooks.example/fal")


def test_good_urls_are_taken_and_an_empty_optional_one_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", "http://127.0.0.1:8787/")
    monkeypatch.setenv("WANBATCH_FAL_REST_URL", "HTTPS://rest.example")
    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", "")
    monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", "")
    settings = get_settings()
    assert settings.fal_queue_url == "http://127.0.0.1:8787"
    assert settings.fal_rest_url == "HTTPS://rest.example"
    assert settings.webhook_url is None
    assert settings.webhook_jwks_url == "https://rest.fal.ai/.well-known/jwks.json"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite+pysqlite:///:memory:",
        "sqlite:///file:shared?mode=memory&cache=shared&uri=true",
    ],
)
def test_an_in_memory_sqlite_database_is_refused(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    message = _refused(monkeypatch, "WANBATCH_DATABASE_URL", url)
    assert "in-memory SQLite database is refused" in message
    assert "system of record" in message
    assert "file" in message


@pytest.mark.parametrize(
    "url", ["sqlite:///wb.db", "sqlite:////tmp/wb.db", "postgresql://u@127.0.0.1/db", "sqlite:///memory.db"]
)
def test_database_files_and_servers_are_taken(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", url)
    assert get_settings().database_url == url


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        ("sqlite:///some.db?%ZZ", "invalid percent escape"),
        ("sqlite:///some.db?mode=r%o", "invalid percent escape"),
        ("postgresql://u@127.0.0.1/db?sslmode=%ZZ", "invalid percent escape"),
        ("postgresql://u@127.0.0.1/db?application_name=%FF", "not UTF-8 text"),
        ("sqlite:///some.db?mode", "a part with no '='"),
        ("postgresql://u@127.0.0.1/db?=require", "an option with no name"),
        ("sqlite:///some.db?timeout=1&timeout=2", "gives the option 'timeout' more than once"),
        ("sqlite:///some.db?timeout=abc", "the SQLite option timeout=abc is not a number of seconds"),
        ("sqlite:///some.db?timeout=inf", "the SQLite option timeout=inf is not a number of seconds"),
        ("sqlite:///some.db?check_same_thread=maybe", "check_same_thread=maybe is not true or false"),
        ("sqlite:///some.db?uri=true&cached_statements=x", "cached_statements=x is not a whole number"),
    ],
)
def test_a_malformed_database_url_query_is_refused(
    url: str, phrase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``?%ZZ`` was dropped without a word (SQLAlchemy ignores a query part with no ``=``), and a
    SQLite driver option that does not convert (``timeout=abc``, or given twice) was an internal
    error, exit 70, at the first connection."""
    message = _refused(monkeypatch, "WANBATCH_DATABASE_URL", url)
    assert phrase in message


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///some.db?mode=ro",
        "sqlite:///some.db?timeout=2.5&check_same_thread=false",
        "sqlite:///some.db?",
        "sqlite:///100%ZZ.db",  # the path, not the query: a file may be named so
        "sqlite:///file:some.db?mode=ro&uri=true",
        "postgresql://u:pa?ss%@127.0.0.1/db",  # a '?' and a '%' in the password: no query
        "postgresql://u@127.0.0.1/db?application_name=a%20b+c&sslmode=prefer&",
    ],
)
def test_well_formed_database_url_queries_are_taken(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", url)
    assert get_settings().database_url == url


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_output_dir_is_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "is empty" in _refused(monkeypatch, "WANBATCH_OUTPUT_DIR", value)


def test_a_leading_tilde_in_a_folder_setting_is_the_home_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``WANBATCH_OUTPUT_DIR='~/out'`` (quoted, or from a .env: no shell expands it) wrote to
    ``./~/out``; a manifest's paths expand ``~``, and so do the folder settings now."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", "~/out")
    monkeypatch.setenv("WANBATCH_ALLOWED_INPUT_DIRS", "~/media,/srv/media")
    settings = get_settings()
    assert settings.output_dir == tmp_path / "out"
    assert settings.allowed_input_dirs == [tmp_path / "media", Path("/srv/media")]
    get_settings.cache_clear()
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", "s3://bucket/prefix")
    monkeypatch.setenv("WANBATCH_OUTPUT_STAGING_DIR", "~/staging")
    settings = get_settings()
    assert settings.output_dir == settings.output_staging_dir == tmp_path / "staging"


@pytest.mark.parametrize("variable", ["WANBATCH_OUTPUT_DIR", "WANBATCH_ALLOWED_INPUT_DIRS"])
def test_a_tilde_of_an_unknown_user_is_refused(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    message = _refused(monkeypatch, variable, "~no-such-user-wanbatch/out")
    assert "'~no-such-user-wanbatch', whose home folder is unknown" in message


@pytest.mark.parametrize("variable", ["WANBATCH_CHAOS_CRASH_POINTS", "WANBATCH_CHAOS_STOP_POINTS"])
@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("abc", "unknown chaos point 'abc'"),
        ("after_post:abc", "probability 'abc' is not a number from 0 to 1"),
        ("after_post:2", "probability '2' is not a number from 0 to 1"),
        ("after_post:nan", "is not a number from 0 to 1"),
        ("after_post:0.1,nosuch:1", "unknown chaos point 'nosuch'"),
    ],
)
def test_malformed_chaos_points_are_refused_at_load(
    variable: str, value: str, phrase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert phrase in _refused(monkeypatch, variable, value)


def test_well_formed_chaos_points_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_CHAOS_CRASH_POINTS", "before_post:0.1, after_post : 1,mid_download")
    assert get_settings().chaos_crash_points


@pytest.mark.parametrize(
    ("value", "hosts"),
    [
        # The README's own forms; an IPv6 entry first was read as JSON ("Expecting value").
        ("[::1]:8443,*.fal.media", ["[::1]:8443", "*.fal.media"]),
        ("[::1]", ["[::1]"]),
        (
            "::1, media.internal.example:8443, CDN.Example.",
            ["::1", "media.internal.example:8443", "CDN.Example."],
        ),
        ('["storage.googleapis.com", "[fe80::1]:9000"]', ["storage.googleapis.com", "[fe80::1]:9000"]),
        ("127.0.0.1:8000,files_1.example", ["127.0.0.1:8000", "files_1.example"]),
    ],
)
def test_allowed_hosts_take_every_documented_form(
    value: str, hosts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ALLOWED_HOSTS", value)
    assert get_settings().download_allowed_hosts == hosts


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("*", "entry '*': not a host name"),
        ("*.fal.media,host:abc", "entry 'host:abc': its port 'abc' is not a number from 1 to 65535"),
        ("media.example:0", "its port '0' is not a number"),
        ("https://media.example:8443/", "entry 'https://media.example:8443/': a URL, not a host"),
        ("media.example/videos", "a URL, not a host"),
        ("[media.example]:443", "not an IPv6 address in brackets"),
        ("[::1]8443", "not [IPv6] or [IPv6]:port"),
        ("media example", "not a host name"),
        ('["a.example",', "starts like a JSON list but is not one"),
    ],
)
def test_allowed_hosts_refuse_an_entry_that_matches_no_host(
    value: str, phrase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Such an entry was taken without a word and matched nothing: the downloads it was meant
    to allow were refused after fal had been paid."""
    message = _refused(monkeypatch, "WANBATCH_DOWNLOAD_ALLOWED_HOSTS", value)
    assert phrase in message
    if "JSON" not in phrase:
        assert message.endswith(
            "each entry is host, host:port, *.suffix, [IPv6] or [IPv6]:port, comma-separated "
            "(e.g. *.fal.media,media.example:8443)"
        )


def test_an_allowed_hosts_url_is_refused_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _refused(monkeypatch, "WANBATCH_DOWNLOAD_ALLOWED_HOSTS", "https://user:hunter2@media.example/")
    assert "hunter2" not in message
    assert "entry 'https://***@media.example/': a URL, not a host" in message


@pytest.mark.parametrize(
    "variable",
    ["WANBATCH_FAL_QUEUE_URL", "WANBATCH_FAL_REST_URL", "WANBATCH_WEBHOOK_URL", "WANBATCH_WEBHOOK_JWKS_URL"],
)
@pytest.mark.parametrize("url", ["http://h\x01x", "https://h/x\x7f", "http://h/\x1b[0m", "http://h/\u200b"])
def test_urls_with_a_control_character_are_refused(
    variable: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx refused them on the first request: ``run`` ended in an internal error (exit 70)."""
    message = _refused(monkeypatch, variable, url)
    assert "control" in message
    assert url not in message


S3_ENV = {"WANBATCH_OUTPUT_DIR": "s3://bucket/prefix", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
@pytest.mark.parametrize(
    "url", ["http://u:hunter2@127.0.0.1:99999", "http://u:hunter2@h:abc", "ftp://u:hunter2@h", "http://[::1"]
)
def test_a_broken_s3_endpoint_is_refused_without_its_password(
    variable: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port of 99999 ended ``run`` in "internal error: ValueError: Port out of range"."""
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    message = _refused(monkeypatch, variable, url)
    assert "hunter2" not in message


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        ("http://u:PWSECRET1@127.0.0.1:57009 ", "a space before or after"),  # from a .env file
        (" http://u:PWSECRET1@127.0.0.1:57009", "a space before or after"),
        ("http://u:PWSECRET1@127.0.0.1:57009\t", "a space before or after"),
        ("   ", "is blank"),
        ("http://u:PWSECRET1@127.0.0.1:57009/?x", "a query"),
        ("http://u:PWSECRET1@127.0.0.1:57009?token=x", "a query"),
        ("http://u:PWSECRET1@127.0.0.1:57009/#top", "a fragment"),
    ],
)
def test_an_s3_endpoint_boto3_would_read_otherwise_is_refused_without_its_password(
    variable: str, url: str, phrase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit: the settings checked a stripped copy and took a query, boto3 then read the variable
    as it was and failed every upload with a message quoting it, password included."""
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    message = _refused(monkeypatch, variable, url)
    assert phrase in message
    assert "PWSECRET1" not in message


def test_the_aws_endpoint_is_left_alone_without_s3_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://h:abc")
    assert get_settings().output_url is None


def test_a_good_s3_endpoint_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert get_settings().output_url == "s3://bucket/prefix"


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        ("garbage", "not a URL"),
        ("foo://u:hunter2@x", "scheme 'foo'"),
        ("memory://", "scheme 'memory'"),
        ("redis://[::1", "not a valid URL"),
        ("redis://:hunter2@127.0.0.1:99999/0", "not a valid URL"),
        ("redis://127.0.0.1:6379/abc", "not a number"),
        ("redis:///0", "no host"),
        ("redis+socket://", "no socket path"),
        ("redis://h\x01:6379/0", "control"),
    ],
)
def test_a_broker_url_must_name_a_broker(url: str, phrase: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``garbage`` was accepted: the worker retried "Cannot connect to amqp://…@garbage" forever."""
    message = _refused(monkeypatch, "WANBATCH_BROKER_URL", url)
    assert phrase in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:pw@h:6379",
        "rediss://h:6380/2",
        "redis+socket:///run/redis.sock",
        "amqp://guest:guest@127.0.0.1:5672//",
        "amqp://x",
    ],
)
def test_broker_urls_celery_takes_are_taken(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_BROKER_URL", url)
    assert get_settings().broker_url == url


def test_an_empty_broker_url_is_embedded_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_BROKER_URL", " ")
    assert get_settings().broker_url is None


@pytest.mark.parametrize("value", ['{"a":1}', "[[1]]", "[null]", '[""]', "[1, 2"])
def test_allowed_input_dirs_written_as_json_must_be_a_list_of_folders(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each was split at ``:`` and ``,`` into folders nobody meant, silently."""
    _refused(monkeypatch, "WANBATCH_ALLOWED_INPUT_DIRS", value)


def test_allowed_input_dirs_take_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_ALLOWED_INPUT_DIRS", '["/a", "/b:c"]')
    assert get_settings().allowed_input_dirs == [Path("/a"), Path("/b:c")]


@pytest.mark.parametrize(
    "variable", ["WANBATCH_DAILY_BUDGET_USD", "WANBATCH_SUBMIT_RATE", "WANBATCH_EMBEDDED_CONCURRENCY"]
)
@pytest.mark.parametrize("value", ["1_0", "٣", "1_000.5", "１０"])
def test_a_number_setting_is_written_in_ascii_digits_without_underscores(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``WANBATCH_DAILY_BUDGET_USD=1_0`` was a $10 budget and ``٣`` one of $3 (Python's number
    parsers take both), where a manifest's ``budget.max_usd`` and ``--max-usd`` refuse them."""
    message = _refused(monkeypatch, variable, value)
    assert "not a plain number" in message


def test_plain_number_settings_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_DAILY_BUDGET_USD", " 12.50 ")
    monkeypatch.setenv("WANBATCH_SUBMIT_RATE", "2.5")
    monkeypatch.setenv("WANBATCH_EMBEDDED_CONCURRENCY", "4")
    settings = get_settings()
    assert str(settings.daily_budget_usd) == "12.50"
    assert settings.submit_rate == 2.5
    assert settings.embedded_concurrency == 4
