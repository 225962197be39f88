"""A manifest holding FAL_KEY is refused before anything is stored or sent, and no message shows it.

Found by a dataset-export audit: with FAL_KEY set, ``prompt: "debug <FAL_KEY>"`` was "all
valid", stored in the database and exported in clear. The key belongs in FAL_KEY only; a
manifest's values (and its text) are stored with the batch, sent to fal and exported.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from jobs.settings import get_settings
from tests.in_process import run_main

KEY = "0b5c2d4e-1111-2222-3333-444455556666:abcdef0123456789abcdef0123456789"
SECRET = KEY.partition(":")[2]
ENCODED = quote(KEY, safe="")
B64_SECRET = base64.b64encode(SECRET.encode()).decode()
HOLDS = "the value holds FAL_KEY"


@pytest.fixture(autouse=True)
def _settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'w.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("FAL_KEY", KEY)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
    from worker.fal.redact import uninstall_redaction

    uninstall_redaction()


def _said(capsys: pytest.CaptureFixture[str]) -> str:
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert KEY not in text
    assert SECRET not in text
    return text


def _said_json(capsys: pytest.CaptureFixture[str]) -> Any:
    """The ``--json`` object on stdout (stderr says the issues too, as without ``--json``):
    neither holds the key."""
    printed = capsys.readouterr()
    for text in (printed.out, printed.err):
        assert KEY not in text
        assert SECRET not in text
    return json.loads(printed.out)


def _manifest(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(body)
    return path


def test_a_prompt_holding_the_key_is_refused_with_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(
        tmp_path,
        "name: leak\nendpoint: fal-ai/wan-22\ndefaults:\n  enable_prompt_expansion: true\n"
        f'items:\n  - prompt: a boat\n  - prompt: "debug {KEY}"\n',
    )
    assert run_main(["validate", str(manifest)], monkeypatch) == 2
    lines = [line for line in _said(capsys).splitlines() if HOLDS in line]
    assert len(lines) == 1
    assert f"{manifest}:7: item 1: field 'prompt': {HOLDS}" in lines[0]

    assert run_main(["validate", "--json", str(manifest)], monkeypatch) == 2
    (issue,) = [i for i in _said_json(capsys)["issues"] if HOLDS in i["message"]]
    assert (issue["line"], issue["item"], issue["field"], issue["value"]) == (7, 1, "prompt", None)

    # Without FAL_KEY set, a value of a fal key's shape is refused all the same (a keyless
    # `submit` stored one, which the dashboard and `diff` then showed), said as of that shape;
    # its secret half alone, which has no such shape, is ordinary text then.
    monkeypatch.delenv("FAL_KEY")
    get_settings.cache_clear()
    from worker.fal.redact import uninstall_redaction

    uninstall_redaction()  # the key the CLI remembered at start-up
    assert run_main(["validate", str(manifest)], monkeypatch) == 2
    said = _said(capsys)
    assert f"{manifest}:7: item 1: field 'prompt': holds a value shaped like a fal API key" in said
    assert HOLDS not in said  # no FAL_KEY to hold: the shape is what was matched
    manifest.write_text(manifest.read_text().replace(KEY, SECRET))
    assert run_main(["validate", str(manifest)], monkeypatch) == 0
    assert "all valid" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("where", "line", "item", "field"),
    [
        # percent-encoded in a URL's query, in a default
        (
            f"defaults:\n  image_url: https://cdn.example/a.png?k={ENCODED}\n",
            4,
            None,
            "defaults.image_url",
        ),
        # the secret half alone, base64-encoded, in a matrix value
        (
            f"matrix:\n  prompt: [a, {B64_SECRET}]\n",
            4,
            None,
            "matrix.prompt[1]",
        ),
        # the description
        (f"description: uses {KEY}\n", 3, None, "description"),
        # a nested value of an item
        (f"  - prompt: b\n    loras: [{{path: 'https://x.example/{KEY}'}}]\n", 6, 1, "loras[0].path"),
        # a comment: the manifest's text is stored with the batch too
        (f"# key {KEY}\n", 3, None, None),
    ],
)
def test_the_key_in_any_form_anywhere_in_the_manifest_is_refused(
    where: str,
    line: int,
    item: int | None,
    field: str | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if where.startswith("  - "):
        body = f"name: leak\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a\n{where}"
    else:
        body = f"name: leak\nendpoint: fal-ai/wan-22\n{where}items:\n  - prompt: a\n"
    manifest = _manifest(tmp_path, body)
    assert run_main(["validate", "--json", str(manifest)], monkeypatch) == 2
    held = [i for i in _said_json(capsys)["issues"] if "FAL_KEY" in i["message"]]
    assert [(i["line"], i["item"], i["field"]) for i in held] == [(line, item, field)]


def test_an_items_from_row_holding_the_key_is_refused_at_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": f"x {quote(KEY)}"}) + "\n"
    )
    manifest = _manifest(tmp_path, "name: rows\nendpoint: fal-ai/wan-22\nitems_from: rows.jsonl\n")
    assert run_main(["validate", "--json", str(manifest)], monkeypatch) == 2
    (issue,) = _said_json(capsys)["issues"]
    assert issue["file"].endswith("rows.jsonl")
    assert (issue["line"], issue["item"], issue["field"]) == (2, 1, "prompt")
    assert HOLDS in issue["message"]


def test_no_other_message_quotes_a_value_holding_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An enum's refusal quotes the value it refuses; this one holds the key.
    manifest = _manifest(
        tmp_path, f'name: leak\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a\n    resolution: "{KEY}"\n'
    )
    assert run_main(["validate", str(manifest)], monkeypatch) == 2
    assert HOLDS in _said(capsys)
    assert run_main(["validate", "--json", str(manifest)], monkeypatch) == 2
    _said(capsys)


@pytest.mark.parametrize("command", [["submit"], ["run", "--simulate", "--no-progress"]])
def test_submit_and_run_store_and_send_nothing(
    command: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = _manifest(
        tmp_path,
        "name: leak\nendpoint: fal-ai/wan-22\n"
        f'items:\n  - prompt: "debug {KEY}"\n    enable_prompt_expansion: true\n',
    )
    assert run_main([*command, str(manifest)], monkeypatch) == 2
    assert "nothing was submitted" in _said(capsys)
    database = tmp_path / "w.db"
    if database.exists():
        with sqlite3.connect(database) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            if "jobs" in tables:
                assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone() == (0,)
                assert conn.execute("SELECT COUNT(*) FROM batches").fetchone() == (0,)
