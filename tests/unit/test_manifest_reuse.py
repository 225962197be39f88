"""The manifest's ``reuse_outputs:``: a boolean on the Manifest, or a located error."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.manifest import load_manifest
from jobs.manifest.loading import parse_manifest

HEAD = "name: again\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a city at night\n    seed: 3\n"  # 1-5


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("written", "wanted"), [("", False), ("reuse_outputs: true\n", True), ("reuse_outputs: false\n", False)]
)
def test_reuse_outputs_is_parsed(tmp_path: Path, written: str, wanted: bool) -> None:
    assert load_manifest(write(tmp_path, HEAD + written)).reuse_outputs is wanted


@pytest.mark.parametrize(
    ("value", "phrase"), [('"true"', "got the text 'true'"), ("1", "got int 1"), ("[true]", "a list")]
)
def test_a_non_boolean_reuse_outputs_is_a_located_error(tmp_path: Path, value: str, phrase: str) -> None:
    manifest, issues = parse_manifest(write(tmp_path, HEAD + f"reuse_outputs: {value}\n"))
    assert manifest is not None
    assert manifest.reuse_outputs is False
    errors = [i for i in issues if i.severity == "error"]
    assert len(errors) == 1, [str(i) for i in errors]
    assert (errors[0].line, errors[0].field) == (6, "reuse_outputs")
    assert "reuse_outputs must be true or false" in errors[0].message
    assert phrase in errors[0].message
