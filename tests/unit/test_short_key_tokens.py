"""A FAL_KEY shorter than 16 characters counts only where it stands as a token of its own, in
every check that looks for it (one rule, :data:`jobs.key_forms.ANYWHERE_MIN`), as the logs'
redaction always did: with ``FAL_KEY=simulator`` (any key works with the bundled simulator), a
prompt about "flight simulators" was refused by the manifest check and exported as
"flight **s" (found by review), and a setting naming a folder ``simulators`` was refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.export import export_input
from jobs.key_forms import forget_keys, remember_key
from jobs.manifest import validate_manifest
from worker.fal.redact import redact_text

KEY = "simulator"  # "any key works" with the bundled simulator (README)
PROMPT = "two flight simulators side by side, cinematic"


@pytest.fixture
def key_remembered() -> Iterator[None]:
    remember_key(KEY)
    yield
    forget_keys()


def test_redaction_keeps_a_short_key_inside_a_word() -> None:
    assert redact_text(PROMPT, [KEY]) == PROMPT  # the documented rule


def test_manifest_with_the_short_key_inside_a_word_is_not_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: sims\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: {PROMPT}\n")
    report = validate_manifest(manifest, (), (KEY,))
    assert report.ok, [issue.message for issue in report.issues]


def test_export_keeps_a_prompt_with_the_short_key_inside_a_word(key_remembered: None) -> None:
    assert export_input({"prompt": PROMPT}) == {"prompt": PROMPT}


def test_a_setting_with_the_short_key_inside_a_word_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.settings import Settings

    monkeypatch.setenv("FAL_KEY", KEY)
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", "/data/simulators/out")
    assert str(Settings().output_dir).endswith("simulators/out")


def test_the_short_key_standing_alone_is_still_found(tmp_path: Path, key_remembered: None) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: sims\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: the key is {KEY}\n")
    assert not validate_manifest(manifest, (), (KEY,)).ok
    assert export_input({"prompt": f"key={KEY}"}) == {"prompt": "key=**"}
