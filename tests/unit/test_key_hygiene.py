"""FAL_KEY hygiene: cleaned at load, sent only to fal's configured origins, scrubbed from all fal says."""

from __future__ import annotations

import httpx
import pytest
from pydantic import SecretStr

from jobs.errors import ConfigError, FinalProviderError
from jobs.settings import Settings, get_settings
from worker.fal.client import FalClient
from worker.fal.errors import SubmitNotSentError
from worker.fal.http import FalKeyAuth
from worker.fal.models import RequestHandle, valid_request_id
from worker.fal.redact import MASK, redact_text, redact_value

KEY = "0b5c2d4e-1111-2222-3333-444455556666:abcdef0123456789abcdef0123456789"
QUEUE = "https://queue.test"
RID = "80e732af-0000-4000-8000-000000000001"


@pytest.mark.parametrize("pasted", [f"{KEY}\r", f" {KEY} ", f"{KEY}\r\n", f"\t{KEY}\n"])
def test_surrounding_whitespace_is_stripped(pasted: str) -> None:
    settings = Settings(FAL_KEY=pasted)
    assert settings.fal_key is not None
    assert settings.fal_key.get_secret_value() == KEY
    assert Settings(FAL_KEY=SecretStr(pasted)).require_fal_key() == KEY


@pytest.mark.parametrize(
    "broken", [KEY[:8] + " " + KEY[8:], KEY[:8] + "\r" + KEY[8:], KEY + "\x1bx", KEY + "é"]
)
def test_a_key_with_inner_whitespace_or_control_characters_is_refused(
    broken: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAL_KEY", broken)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError) as info:
            get_settings()
    finally:
        get_settings.cache_clear()
    message = str(info.value)
    assert "FAL_KEY" in message
    assert "\n" not in message
    assert KEY[:8] not in message
    assert KEY[-8:] not in message


def test_a_blank_key_is_no_key() -> None:
    settings = Settings(FAL_KEY="  \r\n")
    assert settings.fal_key is None
    with pytest.raises(ConfigError, match="FAL_KEY is not set"):
        settings.require_fal_key()


def test_redaction_walks_provider_json_and_catches_a_cut_key() -> None:
    detail = [{"loc": ["body", KEY], "msg": f"bad {KEY}", "ctx": {"deep": [(f"Key {KEY}",)]}}, 7, None]
    cleaned = redact_value(detail, [KEY])
    assert KEY not in repr(cleaned)
    assert cleaned[0]["msg"] == f"bad {MASK}"
    assert cleaned[1:] == [7, None]
    # An error message shortened to 300 characters must not keep half the secret.
    assert redact_text("echo: " + KEY[:40] + "…", [KEY]) == f"echo: {MASK}…"
    assert redact_text("ends with " + KEY[:30], [KEY]) == f"ends with {MASK}"
    assert redact_text("a normal sentence…", [KEY]) == "a normal sentence…"
    deep: object = "x"
    for _ in range(500):
        deep = [deep]
    assert "nested too deep" in repr(redact_value(deep, [KEY]))  # no RecursionError


def test_the_key_goes_to_configured_origins_only() -> None:
    auth = FalKeyAuth(KEY, [QUEUE, "https://rest.test"])
    assert not hasattr(auth, "allow")  # nothing a provider says can add an origin
    assert auth.trusts(f"{QUEUE}/fal-ai/wan/requests/{RID}/status")
    assert auth.trusts("https://queue.test:443/x")
    assert not auth.trusts("http://queue.test/x")  # another scheme is another origin
    assert not auth.trusts("https://queue.test:8443/x")
    assert not auth.trusts("https://queue.test.evil.example/x")


@pytest.mark.parametrize(
    "value", [RID, "r1", "req_1.2:3-x", "a" * 128], ids=["uuid", "short", "punctuation", "longest"]
)
def test_request_ids_fal_could_send(value: str) -> None:
    assert valid_request_id(value)


@pytest.mark.parametrize("value", ["", "..", ".", "a/b", "a?b", "a#b", "a b", "a" * 129, "%2e%2e", None, 5])
def test_request_ids_that_would_move_a_url(value: object) -> None:
    assert not valid_request_id(value)


def test_a_handle_keeps_fal_urls_only_on_the_queue() -> None:
    endpoint = "wan/v2.6/image-to-video"
    derived = RequestHandle.from_request_id(QUEUE, endpoint, RID)
    assert derived.status_url == f"{QUEUE}/wan/v2.6/requests/{RID}/status"  # the app root, as fal

    def handle(base: str) -> RequestHandle:
        return RequestHandle.trusted(
            QUEUE, endpoint, RID, status_url=f"{base}/status", response_url=base, cancel_url=f"{base}/cancel"
        )

    own = f"{QUEUE}/wan/requests/{RID}"  # fal's own layout, even if it differs from ours: kept
    assert handle(own).status_url == f"{own}/status"
    for foreign in (
        f"https://elsewhere.test/wan/v2.6/requests/{RID}",
        f"http://queue.test/wan/v2.6/requests/{RID}",
        f"https://queue.test:8443/wan/v2.6/requests/{RID}",
        f"https://user:pw@queue.test/wan/v2.6/requests/{RID}",
        f"{QUEUE}/wan/v2.6/requests/another-request",
    ):
        assert handle(foreign) == derived, foreign
    assert RequestHandle.trusted(QUEUE, endpoint, RID, status_url=f"{own}/status") == derived


def test_a_closed_client_refuses_to_submit_without_ambiguity() -> None:
    client = FalClient(
        queue_url=QUEUE,
        rest_url="https://rest.test",
        key=KEY,
        timeout=httpx.Timeout(1.0),
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"request_id": RID})),
    )
    client.close()
    with pytest.raises(SubmitNotSentError, match="closed"):
        client.submit("fal-ai/wan-22", {"prompt": "p"})


def test_the_client_keeps_no_cookie_a_provider_sets() -> None:
    seen: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("cookie"))
        headers = {"Set-Cookie": "session=tracked; Path=/"}
        return httpx.Response(200, headers=headers, json={"status": "IN_QUEUE", "queue_position": 0})

    client = FalClient(
        queue_url=QUEUE,
        rest_url="https://rest.test",
        key=KEY,
        timeout=httpx.Timeout(1.0),
        transport=httpx.MockTransport(answer),
    )
    handle = RequestHandle.from_request_id(QUEUE, "fal-ai/wan-22", RID)
    client.status(handle)
    client.status(handle)
    client.close()
    assert seen == [None, None]
    assert not client.http.cookies


def test_the_clients_never_hand_a_response_to_urllibs_cookie_machinery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No client of fal's (queue API, downloads, uploads) builds urllib's request stand-in for
    a response's cookies (about 16 µs of CPU per response, every one of them kept by no jar)."""
    from worker.fal.http import build_http_client
    from worker.fal.storage import DownloadPolicy, guarded_client

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a response went through httpx's cookie extraction")

    monkeypatch.setattr(httpx.Cookies, "_CookieCompatRequest", refuse)
    response = httpx.Response(
        200, headers={"Set-Cookie": "session=tracked"}, request=httpx.Request("GET", "https://q.test/x")
    )
    clients = [
        build_http_client(timeout=httpx.Timeout(1.0)),
        guarded_client(DownloadPolicy(), httpx.Timeout(1.0)),
    ]
    for http in clients:
        http.cookies.extract_cookies(response)
        http.cookies = {"set": "anyway"}
        assert not http.cookies
        http.close()


def test_errors_from_storage_calls_are_scrubbed() -> None:
    answer = httpx.Response(400, json={"detail": [{"msg": f"upload refused for {KEY}", "input": KEY}]})
    client = FalClient(
        queue_url=QUEUE,
        rest_url="https://rest.test",
        key=KEY,
        timeout=httpx.Timeout(1.0),
        transport=httpx.MockTransport(lambda r: answer),
    )
    with client, pytest.raises(FinalProviderError) as info:
        client.send_idempotent("POST", "upload initiate", "https://rest.test/storage/upload/initiate")
    assert KEY not in str(info.value)
    assert KEY not in repr(info.value.detail)
    assert MASK in repr(info.value.detail)


@pytest.mark.parametrize(
    ("error_type", "expected"),
    [
        ("request_timeout", "request_timeout"),
        ("runner_server_error", "runner_server_error"),
        (KEY, None),  # an echoed Authorization value, however it got onto the error
        ("not a type: at all", None),
        ("x" * 65, None),
    ],
)
def test_the_error_type_a_job_stores_has_an_error_type_s_shape(error_type: str, expected: str | None) -> None:
    from worker.steps.failures import kind_of

    assert kind_of(FinalProviderError("refused", status_code=422, error_type=error_type)) == expected


def test_a_status_verdict_keeps_only_an_error_type_s_shape() -> None:
    from worker.fal.errors import status_failure

    assert status_failure("boom", KEY).error_type is None
    assert status_failure("boom", "runner_disconnected").error_type == "runner_disconnected"
