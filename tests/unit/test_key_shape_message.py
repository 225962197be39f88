"""A value merely shaped like a fal key is refused as such, not as if it were the user's FAL_KEY.

Audit: with FAL_KEY set to another key (or unset), a prompt ``asset
123e4567-e89b-12d3-a456-426614174000:d41d8cd98f00b204e9800998ecf8427e glowing`` was refused with
``field 'prompt': the value holds FAL_KEY (the fal API key)`` — a user then looks for how their
key got there; ``rerun --vary prompt=…`` alike. It is still refused (a fal key is a fal key,
whoever's), but the message says what was matched: the shape. And :func:`holds_key_shape`
percent-decoded every value holding a bare ``%`` (``100% photoreal``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs import key_forms
from jobs.errors import UsageError
from jobs.key_forms import holds_key_shape
from jobs.settings import get_settings
from jobs.vary import parse_varies
from tests.in_process import run_main

FAL_KEY = "0b5c2d4e-1111-2222-3333-444455556666:abcdef0123456789abcdef0123456789"
SHAPED = "123e4567-e89b-12d3-a456-426614174000:d41d8cd98f00b204e9800998ecf8427e"
PROMPT = f"asset {SHAPED} glowing"
SHAPE = (
    "holds a value shaped like a fal API key (`<key id>:<secret>`, a UUID, a colon and 32 hex "
    "digits): refused, so that no fal key is stored or sent"
)
HOLDS = "holds FAL_KEY"


@pytest.fixture(autouse=True)
def _settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'w.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
    from worker.fal.redact import uninstall_redaction

    uninstall_redaction()


def _manifest(folder: Path, name: str, prompt: str, comment: str = "") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        f"{comment}name: {name}\nendpoint: fal-ai/wan-22\ndefaults: {{resolution: 480p}}\n"
        f'items:\n  - prompt: "{prompt}"\n',
        encoding="utf-8",
    )
    return path


def _stderr(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err


@pytest.mark.parametrize("fal_key", [FAL_KEY, None], ids=["another-FAL_KEY", "no-FAL_KEY"])
def test_a_fal_shaped_value_is_refused_for_its_shape(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fal_key: str | None,
) -> None:
    if fal_key is None:
        monkeypatch.delenv("FAL_KEY")
        get_settings.cache_clear()
    manifest = _manifest(tmp_path, "shaped", PROMPT)
    for command in ("validate", "submit"):
        assert run_main([command, str(manifest)], monkeypatch) == 2
        err = _stderr(capsys)
        assert f"{manifest}:5: item 0: field 'prompt': {SHAPE}" in err, err
        assert HOLDS not in err
        assert SHAPED not in err
    with sqlite3.connect(tmp_path / "w.db") as conn:
        assert conn.execute("SELECT count(*) FROM batches").fetchone() == (0,)


def test_the_known_key_is_still_called_fal_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(tmp_path, "mine", f"asset {FAL_KEY}")
    assert run_main(["validate", str(manifest)], monkeypatch) == 2
    err = _stderr(capsys)
    assert "field 'prompt': the value holds FAL_KEY (the fal API key): refused" in err, err
    assert "shaped like" not in err


def test_a_shaped_value_in_a_comment_is_refused_for_its_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(tmp_path, "commented", "a kite", comment=f"# made with {SHAPED}\n")
    assert run_main(["validate", str(manifest)], monkeypatch) == 2
    err = _stderr(capsys)
    assert f"{manifest}:1: this line {SHAPE}" in err, err
    assert HOLDS not in err


@pytest.mark.parametrize("keys", [(FAL_KEY,), ()], ids=["another-FAL_KEY", "no-FAL_KEY"])
def test_vary_refuses_a_shaped_value_for_its_shape(keys: tuple[str, ...]) -> None:
    with pytest.raises(UsageError) as refused:
        parse_varies([f"prompt={PROMPT}"], keys)
    message = str(refused.value)
    assert message.startswith(f"--vary: field 'prompt': {SHAPE}"), message
    assert HOLDS not in message
    with pytest.raises(UsageError) as known:
        parse_varies([f"prompt=asset {FAL_KEY}"], (FAL_KEY,))
    assert "--vary: field 'prompt': the value holds FAL_KEY (the fal API key)" in str(known.value)


def test_rerun_vary_says_the_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["submit", str(_manifest(tmp_path, "base", "a kite"))], monkeypatch) == 0
    capsys.readouterr()
    assert run_main(["rerun", "base", "--simulate", "--vary", f"prompt={PROMPT}"], monkeypatch) == 2
    err = _stderr(capsys)
    assert f"error: --vary: field 'prompt': {SHAPE}" in err, err
    assert HOLDS not in err


def test_a_bare_percent_is_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """``100% photoreal`` holds no escape: nothing to decode, so :func:`decoded_text` is not
    called (it was, for every such value of a manifest: 7 µs instead of 0.4 µs)."""
    calls: list[str] = []
    real = key_forms.decoded_text

    def counted(text: str) -> tuple[str, bool]:
        calls.append(text)
        return real(text)

    monkeypatch.setattr(key_forms, "decoded_text", counted)
    for text in ("100% photoreal", "50 %", "a 5%-off sale, %zz", "%"):
        assert not holds_key_shape(text)
    assert calls == []
    escaped = SHAPED.replace(":", "%3A")
    assert holds_key_shape(f"asset {escaped}")
    assert holds_key_shape(f"100% asset {SHAPED.replace(':', '%3a')}")
    assert calls  # an escape is decoded
