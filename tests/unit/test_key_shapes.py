"""FAL_KEY's shape mistakes are caught here, not by fal; FAL_KEY_ID + FAL_KEY_SECRET work as in fal_client.

Found by an audit of fal credentials: ``FAL_KEY='"<id>:<secret>"'`` (a ``.env`` read by
``docker run --env-file`` keeps the quotes) and the single-quoted form were sent as they were,
fal refused them, and the batch paused saying only "the API key was rejected (HTTP 401)". A key
without ``:`` went the same way, without a word before. fal_client's other way to give the key,
``FAL_KEY_ID`` and ``FAL_KEY_SECRET`` (``fal_client.auth._resolve_env_or_colab_auth``), was
ignored: "FAL_KEY is not set". Now a quoted key is refused in one line that names the quotes and
never the key; the pair makes the key as fal_client makes it (FAL_KEY first); a key without ``:``
is sent (the simulator takes any key) after one warning line; and FAL_KEY_SECRET's value is
masked and refused in other settings as FAL_KEY is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from cli import install_key_redaction
from cli.batch_commands import SIMULATOR_KEY
from jobs.errors import ConfigError
from jobs.settings import SIMULATOR_KEYS, get_settings
from worker.fal.redact import uninstall_redaction

KEY_ID = "0b5c2d4e-1111-2222-3333-444455556666"
SECRET = "abcdef0123456789abcdef0123456789"
KEY = f"{KEY_ID}:{SECRET}"
VARIABLES = ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
    uninstall_redaction()


def _refusal(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        get_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert KEY_ID not in message
    assert SECRET not in message
    assert SECRET[:8] not in message
    return message


@pytest.mark.parametrize("quoted", [f'"{KEY}"', f"'{KEY}'", f' "{KEY}"\r', f'"{KEY}', f"{KEY}'"], ids=repr)
def test_a_quoted_key_is_refused_naming_the_quotes(quoted: str, monkeypatch: pytest.MonkeyPatch) -> None:
    message = _refusal(monkeypatch, FAL_KEY=quoted)
    assert message.startswith("invalid configuration: FAL_KEY: the value is wrapped in quotes")
    assert "`docker run --env-file`" in message
    assert "write the key without quotes" in message


@pytest.mark.parametrize("name", ["FAL_KEY_ID", "FAL_KEY_SECRET"])
def test_a_quoted_half_of_the_pair_is_refused_by_its_name(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"FAL_KEY_ID": KEY_ID, "FAL_KEY_SECRET": SECRET}
    env[name] = f'"{env[name]}"'
    message = _refusal(monkeypatch, **env)
    assert message.startswith(f"invalid configuration: {name}: the value is wrapped in quotes")


def test_the_pair_makes_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAL_KEY_ID", f" {KEY_ID}")
    monkeypatch.setenv("FAL_KEY_SECRET", f"{SECRET}\r")
    assert get_settings().require_fal_key() == KEY


ENVIRONMENTS = [
    {"FAL_KEY": KEY},
    {"FAL_KEY_ID": KEY_ID, "FAL_KEY_SECRET": SECRET},
    {"FAL_KEY": KEY, "FAL_KEY_ID": "ffffffff-1111-2222-3333-444455556666", "FAL_KEY_SECRET": "f" * 32},
    {"FAL_KEY": "", "FAL_KEY_ID": KEY_ID, "FAL_KEY_SECRET": SECRET},
    {"FAL_KEY_ID": KEY_ID},
    {"FAL_KEY_SECRET": SECRET},
    {"FAL_KEY_ID": KEY_ID, "FAL_KEY_SECRET": ""},
    {},
]


def _set(env: dict[str, str]) -> str:
    """``FAL_KEY+FAL_KEY_ID=``: the variables set (``=``: to a value), for a test's id."""
    return "+".join(f"{k}{'=' * bool(v)}" for k, v in env.items()) or "none"


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=_set)
def test_the_key_is_the_one_fal_client_would_send(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The installed fal_client is the reference: the same key, or none, for the same variables."""
    from fal_client.auth import _resolve_env_or_colab_auth

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    theirs = _resolve_env_or_colab_auth(False)
    settings = get_settings()
    ours = settings.fal_key.get_secret_value() if settings.fal_key is not None else None
    assert ours == (theirs.token if theirs is not None else None)


@pytest.mark.parametrize(
    ("have", "lack"), [("FAL_KEY_ID", "FAL_KEY_SECRET"), ("FAL_KEY_SECRET", "FAL_KEY_ID")]
)
def test_half_a_pair_says_which_half_is_missing(
    have: str, lack: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(have, KEY_ID if have == "FAL_KEY_ID" else SECRET)
    with pytest.raises(ConfigError) as caught:
        get_settings().require_fal_key()
    message = str(caught.value)
    assert message.startswith(f"FAL_KEY is not set ({have} is set, {lack} is not: ")
    assert SECRET not in message


def test_a_key_without_a_colon_is_sent_after_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    odd = KEY_ID.replace("-", "") + SECRET
    monkeypatch.setenv("FAL_KEY", odd)
    settings = get_settings()
    with caplog.at_level(logging.WARNING):
        assert settings.require_fal_key() == odd  # not refused: the simulator takes any key
        assert settings.require_fal_key() == odd
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"FAL_KEY has no ':' ({len(odd)} characters), where fal's keys are ")
    assert "HTTP 401" in warnings[0]
    assert odd not in caplog.text
    assert SECRET not in caplog.text
    assert settings.key_shape_problem() is not None


@pytest.mark.parametrize("key", [KEY, SIMULATOR_KEY], ids=["a fal key", "the simulator's placeholder"])
def test_a_key_of_the_right_shape_says_nothing(
    key: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``--simulate`` sends its simulator a placeholder (as docker-compose.yml's default FAL_KEY
    does) on the simulator's URL: no fal key, and no mistake to warn about at every run (on fal's
    own queue it is refused: see the placeholder's test below)."""
    monkeypatch.setenv("FAL_KEY", key)
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", "http://127.0.0.1:8787")
    with caplog.at_level(logging.WARNING):
        get_settings().require_fal_key()
    assert not caplog.records
    assert get_settings().key_shape_problem() is None
    assert SIMULATOR_KEY in SIMULATOR_KEYS


@pytest.mark.parametrize(
    "env",
    [
        {"FAL_KEY_ID": KEY_ID, "FAL_KEY_SECRET": SECRET},
        {"FAL_KEY": "ffffffff-1111-2222-3333-444455556666:" + "f" * 32, "FAL_KEY_SECRET": SECRET},
    ],
    ids=["the pair's key", "FAL_KEY's, with FAL_KEY_SECRET set too"],
)
def test_fal_key_secret_is_masked_in_logs_and_refused_in_other_settings(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert install_key_redaction() is True
    with caplog.at_level(logging.WARNING):
        logging.getLogger("httpx").warning("echoed %s and %s", SECRET, f"{KEY_ID}:{SECRET}")
    assert "echoed" in caplog.text
    assert SECRET not in caplog.text + "".join(r.getMessage() for r in caplog.records)

    get_settings.cache_clear()
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", f"/data/{SECRET}")
    message = _refusal(monkeypatch)
    # It holds FAL_KEY_SECRET's value (never FAL_KEY's in the second case, and FAL_KEY was never
    # set in the first): the refusal names that variable, not FAL_KEY.
    assert message.startswith("invalid configuration: WANBATCH_OUTPUT_DIR contains FAL_KEY_SECRET: "), message
    assert "the key's secret belongs in FAL_KEY_SECRET only" in message, message


def test_the_simulators_placeholder_gives_way_to_a_complete_pair_and_never_goes_to_fal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docker-compose.yml's FAL_KEY default is the simulator's placeholder: a complete pair wins
    over it (a set FAL_KEY still wins over the pair), and the placeholder is refused, never sent,
    when the queue is fal's own, where it can only be answered 401."""
    (placeholder,) = SIMULATOR_KEYS
    monkeypatch.setenv("FAL_KEY", placeholder)
    monkeypatch.setenv("FAL_KEY_ID", KEY_ID)
    monkeypatch.setenv("FAL_KEY_SECRET", SECRET)
    assert get_settings().require_fal_key() == KEY
    get_settings.cache_clear()
    monkeypatch.setenv("FAL_KEY", "other-id:other-secret")
    assert get_settings().require_fal_key() == "other-id:other-secret"
    get_settings.cache_clear()

    monkeypatch.delenv("FAL_KEY_ID")
    monkeypatch.delenv("FAL_KEY_SECRET")
    monkeypatch.setenv("FAL_KEY", placeholder)
    for fal in ("https://queue.fal.run", "https://QUEUE.fal.run./", "https://gateway.fal.ai/queue"):
        monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", fal)
        get_settings.cache_clear()
        with pytest.raises(ConfigError) as caught:
            get_settings().require_fal_key()
        assert str(caught.value).startswith("FAL_KEY is the bundled simulator's placeholder"), fal
        assert "FAL_KEY_ID and FAL_KEY_SECRET" in str(caught.value)
    for elsewhere in ("http://127.0.0.1:8787", "http://simulator:8787", "https://notfal.run.example"):
        monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", elsewhere)
        get_settings.cache_clear()
        assert get_settings().require_fal_key() == placeholder, elsewhere
