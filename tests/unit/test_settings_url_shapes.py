"""Settings that passed every check when they loaded, then failed every job or crashed a command.

- A fal URL with a query or fragment, a ``%`` that starts no percent escape, or port 0: the
  request paths are appended to the queue and REST URLs as text, so ``?q=1`` swallowed them and
  every job failed "Application '' not found"; port 0 left ``run`` waiting for ever.
- ``WANBATCH_METRICS_HOST=a..b`` crashed ``run`` and ``worker`` (UnicodeError, exit 70).
- ``WANBATCH_OUTPUT_STAGING_DIR`` was copied into ``output_dir`` before it was checked: a blank one
  was "WANBATCH_OUTPUT_DIR: is empty", an ``s3://`` one a local folder named ``s3:``.

Each is now refused when the settings load: one line naming the variable and what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.errors import ConfigError
from jobs.settings import check_http_url, get_settings

BASE_VARIABLES = ["WANBATCH_FAL_QUEUE_URL", "WANBATCH_FAL_REST_URL"]
ALL_HTTP_VARIABLES = [*BASE_VARIABLES, "WANBATCH_WEBHOOK_URL", "WANBATCH_WEBHOOK_JWKS_URL"]


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (
        *ALL_HTTP_VARIABLES,
        "WANBATCH_METRICS_HOST",
        "WANBATCH_OUTPUT_DIR",
        "WANBATCH_OUTPUT_STAGING_DIR",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(name, raising=False)
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


# --------------------------------------------------------------------------- fal's URLs


@pytest.mark.parametrize("variable", BASE_VARIABLES)
@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("http://127.0.0.1:28920?q=1", "has a query"),
        ("http://127.0.0.1:28920/?", "has a query"),
        ("http://u:hunter2@127.0.0.1:28920/base?token=t0ken", "has a query"),
        ("http://127.0.0.1:28920#x", "has a fragment"),
        ("http://127.0.0.1:28920/%", "invalid percent escape"),
        ("http://127.0.0.1:28920/a%zzb", "invalid percent escape"),
        ("http://127.0.0.1:0", "port 0"),
        ("http://[::1]:0/", "port 0"),
    ],
)
def test_a_fal_base_url_every_path_would_be_lost_in_is_refused(
    variable: str, value: str, phrase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _refused(monkeypatch, variable, value)
    assert phrase in message
    assert "such as https://" in message or "%25" in message  # what is allowed
    assert "hunter2" not in message
    assert "t0ken" not in message


@pytest.mark.parametrize("variable", ["WANBATCH_WEBHOOK_URL", "WANBATCH_WEBHOOK_JWKS_URL"])
@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("https://hooks.example/webhooks/fal#x", "has a fragment"),
        ("https://hooks.example/webhooks/%/fal", "invalid percent escape"),
        ("https://hooks.example:0/webhooks/fal", "port 0"),
    ],
)
def test_the_webhook_urls_refuse_a_fragment_a_bad_escape_and_port_0(
    variable: str, value: str, phrase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert phrase in _refused(monkeypatch, variable, value)


def test_urls_used_whole_keep_their_query(monkeypatch: pytest.MonkeyPatch) -> None:
    """The webhook URL gets its job's parameters merged into its query, and the JWKS URL is
    fetched as it is: a query there reaches the server (a token a proxy asks for)."""
    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", "https://hooks.example/webhooks/fal?tenant=a")
    monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", "https://keys.example/jwks.json?v=2")
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", "http://127.0.0.1:28920/fal%2Dproxy/")
    settings = get_settings()
    assert settings.webhook_url == "https://hooks.example/webhooks/fal?tenant=a"
    assert settings.webhook_jwks_url == "https://keys.example/jwks.json?v=2"
    assert settings.fal_queue_url == "http://127.0.0.1:28920/fal%2Dproxy"


@pytest.mark.parametrize(
    "value", ["http://simulator:8787?x=1", "http://simulator:0", "http://simulator:8787#a"]
)
def test_the_simulator_public_url_is_a_base_url_too(value: str) -> None:
    with pytest.raises(ValueError, match=r"query|port 0|fragment"):
        check_http_url(value, "http://simulator:8787")


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_an_s3_endpoint_on_port_0_is_refused(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", "s3://renders/tokyo")
    assert "port 0" in _refused(monkeypatch, variable, "http://[::1]:0")


def test_an_s3_endpoint_is_shown_with_its_ipv6_brackets_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was shown as "cannot reach http://::1": the brackets and the port lost."""
    from jobs.output_store import endpoint_url

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://u:hunter2@[::1]:9000/minio")
    assert endpoint_url() == "http://[::1]:9000/minio"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert endpoint_url() == "http://127.0.0.1:9000"


# --------------------------------------------------------------------------- the metrics host


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("a..b", "empty label"),
        ("a" * 64 + ".example", "over 63 characters"),
        (".example", "empty label"),
        ("1.2.3.999", "no IPv4 address"),
        ("a b", "is no address or host name"),
        ("host/metrics", "is no address or host name"),
        ("[not-v6]", "is no address or host name"),
        ("::zz", "is no IPv6 address"),
    ],
)
def test_a_metrics_host_nothing_can_listen_on_is_refused(
    value: str, phrase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _refused(monkeypatch, "WANBATCH_METRICS_HOST", value)
    assert phrase in message
    assert "0.0.0.0 for every interface" in message  # what is allowed


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "0.0.0.0"),  # what a container sets
        ("::", "::"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        (" localhost ", "localhost"),
        ("metrics.internal", "metrics.internal"),
        ("", "127.0.0.1"),  # docker-compose passes "" for unset
    ],
)
def test_addresses_and_names_are_taken(value: str, kept: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_METRICS_HOST", value)
    assert get_settings().metrics_host == kept


def test_a_host_that_does_not_resolve_is_blamed_not_the_port() -> None:
    from tests.ports import unused_port
    from worker.telemetry import serve_metrics

    port = unused_port()
    with pytest.raises(ConfigError) as caught:
        serve_metrics(port, "no-such-host.invalid")
    message = str(caught.value)
    assert message.startswith("WANBATCH_METRICS_HOST=no-such-host.invalid: cannot serve metrics"), message
    assert "WANBATCH_METRICS_PORT" not in message


def test_an_ipv6_metrics_host_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from tests.ports import unused_port
    from worker.telemetry import serve_metrics

    monkeypatch.setenv("WANBATCH_METRICS_HOST", "[::1]")
    port = unused_port()
    stop = serve_metrics(port, get_settings().metrics_host)  # no IPv6 loopback: fails, loudly
    try:
        assert httpx.get(f"http://[::1]:{port}/metrics", timeout=5).status_code == 200
    finally:
        stop()


# --------------------------------------------------------------------------- the staging folder


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        (" ", "is blank"),
        ("s3://bkt/x", "is a URL: the staging folder must be a local folder"),
        ("https://files.example/x", "is a URL"),
    ],
)
@pytest.mark.parametrize("output", ["s3://bkt/p", "outputs"])
def test_the_staging_folder_is_checked_under_its_own_name(
    value: str, phrase: str, output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", output)
    message = _refused(monkeypatch, "WANBATCH_OUTPUT_STAGING_DIR", value)
    assert phrase in message
    assert "WANBATCH_OUTPUT_DIR: is empty" not in message


def test_an_empty_staging_folder_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", "s3://bkt/p")
    monkeypatch.setenv("WANBATCH_OUTPUT_STAGING_DIR", "")
    settings = get_settings()
    assert settings.output_dir == Path(".wanbatch/staging")
    assert settings.output_url == "s3://bkt/p"


@pytest.mark.parametrize("value", ["gs://bucket/renders", "https://files.example/out"])
def test_an_output_url_wanbatch_cannot_write_to_is_refused(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gs://bucket`` became a relative folder named ``gs:``."""
    message = _refused(monkeypatch, "WANBATCH_OUTPUT_DIR", value)
    assert "s3://bucket/prefix" in message
