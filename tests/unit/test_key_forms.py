"""FAL_KEY belongs in FAL_KEY only: what counts as the key (``jobs.key_forms``), the settings
that refuse it, and the masking behind that refusal (``masked_url``, the doctor's lines)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from pydantic import SecretStr

from jobs.errors import ConfigError
from jobs.key_forms import contains_key, forget_keys, hide_keys, remember_key
from jobs.settings import Settings, settings_holding_key
from jobs.url_secrets import mask_urls, masked_url
from tests.ports import unused_port
from worker.doctor import _guarded, check_provider, check_storage

KEY_ID = "0b5c2d4e-1111-2222-3333-444455556666"
SECRET = "abcdef0123456789abcdef0123456789"
KEY = f"{KEY_ID}:{SECRET}"


@pytest.fixture
def remembered() -> Iterator[str]:
    remember_key(KEY)
    yield KEY
    forget_keys()


@pytest.mark.parametrize(
    "text",
    [
        f"http://h/?k={KEY}",
        f"http://user:{KEY}@h",
        f"/tmp/{KEY}/out",
        f"http://h/{quote(KEY, safe='')}",
        f"http://h/{KEY_ID}%3a{SECRET}",  # RFC 3986 §2.1: either case
        "http://h/" + "".join(f"%{b:02X}" for b in KEY.encode()),  # every character escaped
        f"http://h/?k={SECRET}",  # the secret half alone
        f"http://h/?k={KEY.replace(':', '+')}",
    ],
)
def test_the_key_is_found_in_any_form(text: str) -> None:
    assert contains_key(text, KEY)


@pytest.mark.parametrize("text", ["http://h/?k=abc", f"http://h/{KEY_ID}", f"/tmp/{SECRET[:7]}", ""])
def test_what_is_not_the_key(text: str) -> None:
    assert not contains_key(text, KEY)


@pytest.mark.parametrize("short", ["", "k3y", "a:b", "1234567"])
def test_a_key_under_eight_characters_is_found_nowhere(short: str) -> None:
    """Too short to tell from ordinary text: every setting would "contain" it."""
    assert not contains_key(f"/srv/{short}/{short}-outputs?{short}", short)
    assert hide_keys(f"x {short} y", [short]) == f"x {short} y"


def test_direct_settings_are_refused_too_and_never_quote_the_key() -> None:
    """Before any field's own validation: an allowed host's or an endpoint's error quotes the
    entry, and that entry would be the key."""
    cases: list[dict[str, object]] = [
        {"fal_queue_url": f"http://127.0.0.1:1/?k={KEY}"},
        {"download_allowed_hosts": KEY},
        {"pricing_overrides": {KEY: {"usd_per_unit": 1}}},
        {"serve_token": SecretStr(KEY)},
        {"output_dir": Path("/srv") / SECRET},
    ]
    for fields in cases:
        with pytest.raises(ConfigError) as info:
            Settings(FAL_KEY=KEY, **fields)  # type: ignore[arg-type]
        message = str(info.value)
        assert "contains FAL_KEY: the key belongs in FAL_KEY only" in message, message
        for part in (KEY, SECRET, KEY_ID):
            assert part not in message
        assert "\n" not in message


def test_every_setting_holding_it_is_named_once() -> None:
    data = {
        "FAL_KEY": f" {KEY}\r\n",
        "fal_queue_url": f"http://h/{KEY}",
        "webhook_url": f"http://h/w/{SECRET}",
        "output_url": f"s3://b/{KEY}",  # split off WANBATCH_OUTPUT_DIR
        "output_dir": f"s3://b/{KEY}",
        "submit_rate": 5,
    }
    assert settings_holding_key(data) == [
        "WANBATCH_FAL_QUEUE_URL",
        "WANBATCH_WEBHOOK_URL",
        "WANBATCH_OUTPUT_DIR",
    ]
    assert settings_holding_key({"FAL_KEY": KEY, "fal_queue_url": "https://queue.fal.run"}) == []
    assert settings_holding_key({"fal_queue_url": f"http://h/{KEY}"}) == []  # no key, nothing to hold


def test_a_setting_holding_only_fal_key_secret_is_said_to_hold_fal_key_secret() -> None:
    """Review: the refusal said "contains FAL_KEY" of a setting holding only FAL_KEY_SECRET's
    value (FAL_KEY set to another key): it names the variable whose value it holds."""
    other = "ffffffff-1111-2222-3333-444455556666:" + "f" * 32
    cases = {
        "webhook_url": f"http://h/w/{SECRET}",  # only FAL_KEY_SECRET's value
        "fal_queue_url": f"http://h/{other}",  # FAL_KEY's
    }
    with pytest.raises(ConfigError) as info:
        Settings(FAL_KEY=other, FAL_KEY_SECRET=SECRET, **cases)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(
        "invalid configuration: WANBATCH_FAL_QUEUE_URL contains FAL_KEY; "
        "WANBATCH_WEBHOOK_URL contains FAL_KEY_SECRET: the key and its secret belong in FAL_KEY "
        "and FAL_KEY_SECRET only"
    ), message
    with pytest.raises(ConfigError) as info:
        Settings(FAL_KEY=other, FAL_KEY_SECRET=SECRET, webhook_url=f"http://h/w/{SECRET}")
    message = str(info.value)
    assert message.startswith("invalid configuration: WANBATCH_WEBHOOK_URL contains FAL_KEY_SECRET: "), (
        message
    )
    assert "FAL_KEY:" not in message
    for part in (SECRET, other, other.partition(":")[2], KEY_ID):
        assert part not in message
    assert "\n" not in message


def test_masked_url_hides_a_known_key_whatever_names_it(remembered: str) -> None:
    for url in (f"http://h/gw/{KEY}/x", f"http://h/?x={KEY}", f"http://h/#{SECRET}"):
        assert KEY not in masked_url(url), masked_url(url)
        assert SECRET not in masked_url(url), masked_url(url)
    assert masked_url(f"http://h/gw/{KEY}/x") == "http://h/gw/**/x"
    said = mask_urls(f"cannot reach redis://h:1/0?x={KEY}: refused")
    assert said == "cannot reach redis://h:1/0?x=**: refused"
    assert masked_url("https://queue.fal.run/x") == "https://queue.fal.run/x"


def test_masked_url_without_a_known_key_is_as_before() -> None:
    assert masked_url(f"http://h/gw/{KEY}/x") == f"http://h/gw/{KEY}/x"


def test_the_doctor_s_lines_never_hold_the_key(tmp_path: Path) -> None:
    """Behind the settings' refusal: settings built without validation (as no command builds
    them) whose queue URL and output folder hold the key."""
    settings = Settings.model_construct(
        fal_key=SecretStr(KEY),
        fal_queue_url=f"http://127.0.0.1:{unused_port()}/?x={KEY}",
        output_dir=tmp_path / KEY,
    )
    assert KEY in check_provider(settings).detail  # what the check alone says
    for name, check in (("provider", check_provider), ("output storage", check_storage)):
        verdict = _guarded(name, check, settings)
        said = f"{verdict.detail} {verdict.fix}"
        assert KEY not in said, said
        assert SECRET not in said, said
