"""Every number a setting takes is finite and bounded: ``inf``, ``nan`` or ``1e300`` is one clear
line naming the variable, never a value that overflows a date or a limiter much later (a
``WANBATCH_SUBMIT_RATE=inf`` or ``WANBATCH_LEASE_SECONDS=1e300`` run ended in an internal error)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from jobs.errors import ConfigError
from jobs.models import utcnow
from jobs.settings import MAX_LOCK_WAIT_SECONDS, MAX_SECONDS, MIN_RATE, MIN_SECONDS, Settings, get_settings

#: Every float field, by its variable's name (found, not listed: a new one is covered too).
FLOAT_FIELDS = sorted(
    name for name, field in Settings.model_fields.items() if field.annotation in (float, float | None)
)


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_the_float_fields_are_found() -> None:
    assert {"submit_rate", "lease_seconds", "retry_max_delay", "download_timeout"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e300"])
def test_no_float_setting_takes_an_absurd_number(
    field: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    variable = f"WANBATCH_{field.upper()}"
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        get_settings()
    message = str(caught.value)
    assert message.startswith(f"invalid configuration: {variable}: ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("variable", "value", "phrase"),
    [
        ("WANBATCH_SUBMIT_RATE_PER_ENDPOINT", '{"fal-ai/wan-22": 1e300}', "(at fal-ai/wan-22)"),
        ("WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT", '{"fal-ai/wan-22": 99999999999}', "(at fal-ai/wan-22)"),
        ("WANBATCH_MAX_OUTSTANDING", "99999999999999999999", "less than or equal to"),
        ("WANBATCH_MAX_DOWNLOAD_BACKLOG", "99999999999999999999", "less than or equal to"),
    ],
)
def test_rates_and_caps_are_bounded(
    variable: str, value: str, phrase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable) as caught:
        get_settings()
    assert phrase in str(caught.value)


def test_a_year_is_still_a_duration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_RETRY_MAX_DELAY", str(MAX_SECONDS))
    assert get_settings().retry_max_delay == MAX_SECONDS


#: A token of the right shape; the broken ones below are built from it.
SERVE_TOKEN = "serve-token-0123456789-abcdef"


@pytest.mark.parametrize(
    "broken",
    [
        "short-secret",  # under 16 characters: guessable
        SERVE_TOKEN[:10] + " " + SERVE_TOKEN[10:],  # no client can send a space in a Bearer token
        SERVE_TOKEN + "é",
        SERVE_TOKEN[:10] + "\t" + SERVE_TOKEN[10:],
        SERVE_TOKEN + "\x1b",
    ],
)
def test_a_serve_token_must_be_sendable_and_long(broken: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_SERVE_TOKEN", broken)
    with pytest.raises(ConfigError) as caught:
        get_settings()
    message = str(caught.value)
    assert message.startswith("invalid configuration: WANBATCH_SERVE_TOKEN: ")
    assert "at least 16 visible ASCII characters" in message
    assert "\n" not in message
    assert broken.strip() not in message
    assert SERVE_TOKEN[:8] not in message


@pytest.mark.parametrize("blank", ["", "   ", "\r\n"])
def test_an_empty_serve_token_is_unset(blank: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_SERVE_TOKEN", blank)
    assert get_settings().serve_token is None
    assert Settings(serve_token=blank).serve_token is None


def test_a_serve_token_loses_only_surrounding_whitespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_SERVE_TOKEN", f" {SERVE_TOKEN}\r\n")
    token = get_settings().serve_token
    assert token is not None
    assert token.get_secret_value() == SERVE_TOKEN
    exactly_16 = "0123456789abcdef"
    assert Settings(serve_token=exactly_16).serve_token is not None


@pytest.mark.parametrize(
    ("variable", "value", "phrase"),
    [
        # A cap of 0 held that endpoint's jobs pending forever: `run` never ended.
        ("WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT", '{"fal-ai/wan-i2v": 0}', "greater than or equal to 1"),
        ("WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT", '{"fal-ai/wan-i2v": -3}', "greater than or equal to 1"),
        ("WANBATCH_SUBMIT_RATE_PER_ENDPOINT", '{"fal-ai/wan-i2v": 0}', "greater than 0"),
        ("WANBATCH_SUBMIT_RATE_PER_ENDPOINT", '{"fal-ai/wan-i2v": -1}', "greater than 0"),
    ],
)
def test_per_endpoint_caps_and_rates_have_the_global_lower_bound(
    variable: str, value: str, phrase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        get_settings()
    message = str(caught.value)
    assert message.startswith(f"invalid configuration: {variable} (at fal-ai/wan-i2v): ")
    assert phrase in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "variable", ["WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT", "WANBATCH_SUBMIT_RATE_PER_ENDPOINT"]
)
def test_per_endpoint_maps_name_known_endpoints_only(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, '{"fal-ai/wan-i2v": 2, "fal-ai/wan-typo": 1}')
    with pytest.raises(ConfigError) as caught:
        get_settings()
    message = str(caught.value)
    assert message.startswith(f"invalid configuration: {variable}: ")
    assert "fal-ai/wan-typo: not an endpoint wanbatch knows (" in message
    assert "wan/v2.6/image-to-video" in message  # what is allowed
    assert "\n" not in message


def test_per_endpoint_maps_take_known_endpoints_and_positive_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT", '{"wan/v2.6/image-to-video": 1}')
    monkeypatch.setenv("WANBATCH_SUBMIT_RATE_PER_ENDPOINT", '{"fal-ai/wan-i2v": 0.5}')
    settings = get_settings()
    assert settings.max_outstanding_per_endpoint == {"wan/v2.6/image-to-video": 1}
    assert settings.submit_rate_per_endpoint == {"fal-ai/wan-i2v": 0.5}


#: Every integer field, by its variable's name (found, not listed: a new one is covered too).
INT_FIELDS = sorted(
    name for name, field in Settings.model_fields.items() if field.annotation in (int, int | None)
)


def test_the_int_fields_are_found() -> None:
    assert {
        "max_attempts",
        "download_attempts",
        "download_max_bytes",
        "inline_max_bytes",
        "embedded_concurrency",
        "max_outstanding",
    } <= set(INT_FIELDS)


@pytest.mark.parametrize("field", INT_FIELDS)
def test_no_int_setting_takes_an_absurd_number(field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """1e29 attempts, bytes or threads was taken: every integer has an upper bound."""
    variable = f"WANBATCH_{field.upper()}"
    monkeypatch.setenv(variable, str(10**29))
    with pytest.raises(ConfigError) as caught:
        get_settings()
    message = str(caught.value)
    assert message.startswith(f"invalid configuration: {variable}: Input should be less than or equal to ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("variable", "highest"),
    [
        ("WANBATCH_MAX_ATTEMPTS", 1_000_000),
        ("WANBATCH_DOWNLOAD_ATTEMPTS", 1_000_000),
        ("WANBATCH_DOWNLOAD_MAX_BYTES", 1024**4),
        ("WANBATCH_INLINE_MAX_BYTES", 64 * 1024**2),
        ("WANBATCH_EMBEDDED_CONCURRENCY", 1024),
    ],
)
def test_the_new_upper_bounds_are_the_documented_ones(
    variable: str, highest: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, str(highest))
    assert getattr(get_settings(), variable.removeprefix("WANBATCH_").lower()) == highest
    get_settings.cache_clear()
    monkeypatch.setenv(variable, str(highest + 1))
    with pytest.raises(ConfigError, match=f"{variable}: Input should be less than or equal to {highest}$"):
        get_settings()


@pytest.mark.parametrize("value", ["abc", "http://127.0.0.1:6379/0", "redis:x"])
def test_the_limits_url_must_be_a_redis_url(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit A6: ``WANBATCH_LIMITS_URL=abc`` passed (doctor said the settings were valid), then
    ``run`` crashed with a ValueError after storing the batch."""
    monkeypatch.setenv("WANBATCH_LIMITS_URL", value)
    with pytest.raises(ConfigError) as caught:
        get_settings()
    message = str(caught.value)
    assert message.startswith("invalid configuration: WANBATCH_LIMITS_URL: ")
    assert "redis://" in message
    assert "\n" not in message


@pytest.mark.parametrize("value", ["redis://127.0.0.1:6379/0", "rediss://h:6380/1", "unix:///tmp/r.sock"])
def test_redis_limits_urls_are_taken(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_LIMITS_URL", value)
    assert get_settings().limits_url == value


def test_an_empty_limits_url_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_LIMITS_URL", "")
    assert not get_settings().limits_url


#: Every duration that must be positive (a ``gt=0`` duration once): found, not listed.
POSITIVE_DURATIONS = sorted(
    name
    for name, field in Settings.model_fields.items()
    if any(getattr(m, "ge", None) == MIN_SECONDS for m in field.metadata)
)


def test_the_positive_durations_are_found() -> None:
    assert {"download_timeout", "connect_timeout", "read_timeout", "lease_seconds", "tick_interval"} <= set(
        POSITIVE_DURATIONS
    )


@pytest.mark.parametrize("field", POSITIVE_DURATIONS)
@pytest.mark.parametrize("value", ["1e-320", "5e-324", "1e-9"])
def test_no_duration_is_shorter_than_a_microsecond(
    field: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``1e-320`` passed ``> 0``: a run with such a download timeout sat stuck."""
    variable = f"WANBATCH_{field.upper()}"
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        get_settings()
    assert str(caught.value).startswith(f"invalid configuration: {variable}: ")
    monkeypatch.setenv(variable, str(MIN_SECONDS))
    get_settings.cache_clear()
    assert getattr(get_settings(), field) == MIN_SECONDS


@pytest.mark.parametrize(
    ("variable", "value", "where"),
    [
        ("WANBATCH_SUBMIT_RATE", "1e-320", ""),
        ("WANBATCH_SUBMIT_RATE", "1e-12", ""),
        ("WANBATCH_SUBMIT_RATE_PER_ENDPOINT", '{"fal-ai/wan-22": 1e-320}', " (at fal-ai/wan-22)"),
    ],
)
def test_a_rate_is_at_least_one_submit_a_day(
    variable: str, value: str, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``1e-320`` overflowed the date a held-back job was due again: a traceback, and ``run``
    never ended; ``1e-12`` held the jobs back for ever without a word."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        get_settings()
    message = str(caught.value)
    assert message.startswith(f"invalid configuration: {variable}{where}: must be at least ")
    assert "one a day" in message


def test_one_submit_a_day_is_a_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_SUBMIT_RATE", str(MIN_RATE))
    monkeypatch.setenv("WANBATCH_SUBMIT_RATE_PER_ENDPOINT", f'{{"fal-ai/wan-22": {MIN_RATE}}}')
    settings = get_settings()
    assert settings.submit_rate == MIN_RATE
    assert settings.submit_rate_per_endpoint == {"fal-ai/wan-22": MIN_RATE}


@pytest.mark.parametrize("seconds", [1 / 1e-320, 1e300, -1e300, float("inf"), float("nan")])
def test_a_due_date_never_overflows(seconds: float) -> None:
    """``in_seconds(1 / rate)`` raised OverflowError for a tiny rate: a worker's traceback."""
    from worker.steps.context import in_seconds

    due = in_seconds(seconds)
    assert abs((due - utcnow()).total_seconds()) <= MAX_SECONDS + 60


def test_the_lock_wait_is_one_postgresql_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit "review1": ``WANBATCH_DATABASE_LOCK_WAIT=2592000`` (30 days, under a year) passed, and
    PostgreSQL refused every bounded transaction's ``lock_timeout`` (at most 2147483647 ms): every
    reading command failed with "invalid value for parameter lock_timeout", the dashboard 503."""
    monkeypatch.setenv("WANBATCH_DATABASE_LOCK_WAIT", "2592000")
    with pytest.raises(ConfigError) as caught:
        get_settings()
    message = str(caught.value)
    assert message.startswith("invalid configuration: WANBATCH_DATABASE_LOCK_WAIT: ")
    assert "lock_timeout" in message
    assert "\n" not in message
    get_settings.cache_clear()
    monkeypatch.setenv("WANBATCH_DATABASE_LOCK_WAIT", str(MAX_LOCK_WAIT_SECONDS))
    assert get_settings().database_lock_wait == MAX_LOCK_WAIT_SECONDS
