"""``export -o -`` is standard output, as ``-o /dev/stdout`` is (scripting audit).

It wrote a file literally named ``-`` in the current folder, and said "exported 2 record(s) to
-": a pipeline (``wanbatch export B -o - | jq``) read nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.e2e_helpers import MakeManifest
from tests.in_process import run_main

MANIFEST = """\
name: dash
items:
  - {endpoint: fal-ai/wan-22, prompt: a paper boat in the rain}
  - {endpoint: fal-ai/wan-22, prompt: a lake at dawn}
"""


@pytest.fixture
def batch(manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    assert run_main(["submit", str(manifest("dash", MANIFEST))], monkeypatch) == 0
    return capsys.readouterr().out.strip()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_dash_is_standard_output(
    batch: str, fmt: str, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["export", "dash", "--format", fmt, "-o", "-"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert not (e2e_env / "-").exists()
    lines = out.splitlines()
    if fmt == "jsonl":
        assert [json.loads(line)["batch"] for line in lines] == [batch, batch]
    else:
        assert lines[0].startswith("job_id,batch,"), out
        assert len(lines) == 3, out
    # The same bytes as without -o.
    assert run_main(["export", "dash", "--format", fmt], monkeypatch) == 0
    assert capsys.readouterr().out == out


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--json"], "error: --json prints to standard output: -o - must be another file"),
        (["--format", "hf"], "error: -o - is standard output, not a folder; choose a new folder"),
    ],
    ids=["json", "hf"],
)
def test_dash_is_refused_where_standard_output_is(
    batch: str,
    extra: list[str],
    said: str,
    e2e_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    capsys.readouterr()
    assert run_main(["export", "dash", "-o", "-", *extra], monkeypatch) == 2
    captured = capsys.readouterr()
    shown = json.loads(captured.out)["error"] if "--json" in extra else captured.err.strip()
    assert shown.startswith(said.removeprefix("error: ") if "--json" in extra else said), captured
    assert not (e2e_env / "-").exists()


def test_a_file_named_dash_is_still_reachable(
    batch: str, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["export", "dash", "-o", "./-"], monkeypatch) == 0
    written = (e2e_env / "-").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["batch"] for line in written] == [batch, batch]
    assert capsys.readouterr().out == ""
