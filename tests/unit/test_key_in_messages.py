"""No error line prints back FAL_KEY, and a fal-shaped key is neither stored nor shown.

Found by a secret-leak audit:

* ``wanbatch status "$FAL_KEY"`` answered ``error: no batch 'id-1234:sekrit-CANARY-5f3a': …``
  (``--json`` alike), and ``export -o /x/<secret>/x.jsonl`` echoed the path;
* ``env -u FAL_KEY wanbatch submit`` of a prompt holding a fal-shaped key stored it (without
  FAL_KEY the manifest check looked for nothing), and ``diff --json`` then showed it in full
  while exports masked it (``real **``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.settings import get_settings
from tests.in_process import run_main

KEY = "id-1234:sekrit-CANARY-5f3a"
SECRET = KEY.partition(":")[2]
SHAPED = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b:0123456789abcdef0123456789abcdef"
HOLDS = "field 'prompt': the value holds FAL_KEY (the fal API key): refused"
#: A value of a fal key's shape that is no key this process knows: said as such, not as FAL_KEY.
SHAPE_HOLDS = "field 'prompt': holds a value shaped like a fal API key"


@pytest.fixture(autouse=True)
def _settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'w.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("FAL_KEY", KEY)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
    from worker.fal.redact import uninstall_redaction

    uninstall_redaction()


def _manifest(tmp_path: Path, name: str, prompt: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f'name: {name}\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "{prompt}"\n    resolution: 480p\n'
    )
    return path


def _printed(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    said = capsys.readouterr()
    for text in (said.out, said.err):
        assert SECRET not in text
        assert SHAPED.partition(":")[2] not in text
    return said.out, said.err


@pytest.mark.parametrize("ref", [KEY, SECRET, f"x{SECRET}x"])
def test_an_error_quoting_what_was_typed_masks_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], ref: str
) -> None:
    assert run_main(["status", ref], monkeypatch) == 2
    _, err = _printed(capsys)
    assert err.startswith("error: no batch '")
    assert run_main(["status", ref, "--json"], monkeypatch) == 2
    out, err = _printed(capsys)
    assert json.loads(out)["error"].startswith("no batch '")
    assert err.startswith("error: no batch '")
    # A usage mistake (click's, through cli._fail) is masked the same way.
    assert run_main(["status", "--nope", ref], monkeypatch) == 2
    _printed(capsys)


def test_an_export_path_holding_the_secret_is_not_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["submit", str(_manifest(tmp_path, "ok", "a boat"))], monkeypatch) == 0
    capsys.readouterr()
    target = f"/nonexistent-{SECRET}/x/x.jsonl"
    assert run_main(["export", "ok", "-o", target], monkeypatch) == 2
    _, err = _printed(capsys)
    assert "cannot write the export to '/nonexistent-***/x/x.jsonl'" in err
    assert run_main(["export", "ok", "-o", target, "--json"], monkeypatch) == 2
    out, _ = _printed(capsys)
    assert "/nonexistent-***/x/x.jsonl" in json.loads(out)["error"]


def test_a_fal_shaped_key_is_refused_without_fal_key_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FAL_KEY")
    get_settings.cache_clear()
    manifest = _manifest(tmp_path, "rk", f"real {SHAPED}")
    for command in ("validate", "submit"):
        assert run_main([command, str(manifest)], monkeypatch) == 2
        _, err = _printed(capsys)
        assert f"{manifest}:4: item 0: {SHAPE_HOLDS}" in err
    # An items_from row too, and a field's name.
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": f"row {SHAPED}"}) + "\n")
    listed = tmp_path / "listed.yaml"
    listed.write_text(
        "name: listed\nendpoint: fal-ai/wan-22\ndefaults:\n  resolution: 480p\nitems_from: rows.jsonl\n"
    )
    assert run_main(["validate", str(listed)], monkeypatch) == 2
    _, err = _printed(capsys)
    assert SHAPE_HOLDS in err
    with sqlite3.connect(tmp_path / "w.db") as conn:
        assert conn.execute("SELECT count(*) FROM batches").fetchone() == (0,)
    # An ordinary prompt with a colon and hex in it is no key.
    fine = _manifest(tmp_path, "fine", "frame 3f2a1b4c:0123456789abcdef, a boat")
    assert run_main(["validate", str(fine)], monkeypatch) == 0
    capsys.readouterr()


def test_diff_json_masks_a_stored_prompt_holding_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows stored before the refusal (or by hand) are shown as the exports show them."""
    for name in ("da", "db"):
        assert run_main(["submit", str(_manifest(tmp_path, name, "a boat"))], monkeypatch) == 0
    with sqlite3.connect(tmp_path / "w.db") as conn:
        conn.execute("UPDATE jobs SET input = json_set(input, '$.prompt', ?)", (f"real {SHAPED} {KEY}",))
    capsys.readouterr()
    run_main(["diff", "da", "db", "--json"], monkeypatch)
    out, _ = _printed(capsys)
    assert KEY not in out
    jobs = [json.loads(line) for line in out.splitlines() if line.strip()]
    prompts = {
        side["prompt"] for doc in jobs for pair in doc.get("jobs", []) for side in (pair["a"], pair["b"])
    }
    assert prompts == {"real ** **"}
