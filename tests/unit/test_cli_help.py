"""The top-level help: bare `wanbatch` prints it (exit 0), and it names the contract's settings.

Found by a contract-conformance audit: `wanbatch` with no command printed the whole help as an
error (`error: Usage: …`, exit 2); and no help page named an environment variable, 8 of the
contract's 15 on none at all. `wanbatch` alone now answers as `wanbatch --help` does (help on
stdout, exit 0, as docker does); the help ends with a "Settings (environment variables)" section
from :data:`jobs.setting_notes.CONTRACT_SETTINGS`, which this file keeps the same as the
settings wanbatch reads (names and defaults) and as the contract's table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic_core import PydanticUndefined

from jobs.setting_notes import CONTRACT_SETTINGS
from jobs.settings import Settings
from tests.in_process import run_main

#: CONTRACT.md "Configuration": every variable of its table, in its order.
CONTRACT_VARIABLES = (
    "FAL_KEY",
    "WANBATCH_DATABASE_URL",
    "WANBATCH_BROKER_URL",
    "WANBATCH_FAL_QUEUE_URL",
    "WANBATCH_FAL_REST_URL",
    "WANBATCH_OUTPUT_DIR",
    "WANBATCH_SUBMIT_RATE",
    "WANBATCH_MAX_OUTSTANDING",
    "WANBATCH_DOWNLOAD_TIMEOUT",
    "WANBATCH_DOWNLOAD_ALLOWED_HOSTS",
    "WANBATCH_WEBHOOK_URL",
    "WANBATCH_WEBHOOK_JWKS_URL",
    "WANBATCH_MEDIA_MISMATCH",
    "WANBATCH_SERVE_TOKEN",
    "WANBATCH_LOG_FORMAT",
)


def _help(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    code = run_main(args, monkeypatch)
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def test_bare_wanbatch_prints_the_help_and_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _help([], monkeypatch, capsys)
    assert (code, err) == (0, "")
    assert out.startswith("Usage: wanbatch ")
    assert "error" not in out
    assert (0, out, "") == _help(["--help"], monkeypatch, capsys)  # the very same page


def test_an_unknown_option_without_a_command_is_still_one_usage_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An option the group does not have is still one `error:` line, not the help."""
    code, out, err = _help(["--nosuch"], monkeypatch, capsys)
    assert code == 2
    assert err == "error: No such option '--nosuch' (see `wanbatch --help`)\n"
    assert out == ""


def test_the_help_lists_every_setting_of_the_contract_with_its_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _help(["--help"], monkeypatch, capsys)
    assert code == 0
    _, section = out.split("Settings (environment variables):\n")
    listed = [line.split()[0] for line in section.splitlines() if line.startswith("  ") and line[2] != " "]
    assert tuple(listed[: len(CONTRACT_VARIABLES)]) == CONTRACT_VARIABLES
    for note in CONTRACT_SETTINGS:
        assert note.default_text in " ".join(section.split()), note.name
    assert "[default: https://rest.fal.ai/.well-known/jwks.json]" in " ".join(section.split())
    assert "https://rest.fal.ai/.well-known/jwks.json]\n" in section  # never cut at its hyphen
    assert 'README "Configuration"' in " ".join(section.split())
    assert "`wanbatch doctor`" in section
    assert max(len(line) for line in out.splitlines()) <= 80


def test_the_notes_name_the_contract_s_settings_in_its_order() -> None:
    assert tuple(note.name for note in CONTRACT_SETTINGS) == CONTRACT_VARIABLES


def _field_default(name: str) -> Any:
    """The default :class:`Settings` gives the variable ``name``."""
    field = Settings.model_fields[name.removeprefix("WANBATCH_").lower()]
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    assert field.default is not PydanticUndefined, name
    return field.default


@pytest.mark.parametrize("note", CONTRACT_SETTINGS, ids=lambda note: note.name)
def test_each_default_the_help_states_is_the_one_wanbatch_uses(note: Any) -> None:
    default = _field_default(note.name)
    if default is None:  # unset: said in words ("none", "unset: no webhooks")
        assert note.default.split(":")[0] in ("none", "unset"), note
    elif isinstance(default, Path):
        assert Path(note.default) == default
    elif isinstance(default, float):
        assert float(note.default) == default
    else:
        assert note.default == str(default)
