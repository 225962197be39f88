"""Every manifest in ``bad_manifests/`` must be refused with a located, specific error.

Each corpus file says in its header comments what the error must mention:

- ``# expect: <text>``: a phrase the error's message must contain;
- ``# field: <name>`` / ``# item: <n>``: the field and item index the error must name;
- ``# line: <n>`` and ``# in: <file>``: the line (and file, for ``items_from`` rows); without
  ``# line``, the line is the one marked ``#<-`` in the manifest itself.

Cases that would need big files (a 10 MB scalar, a 17 MB manifest, an 11 MB image) are
generated into ``tmp_path`` by :func:`generated_bad_manifests`, which the CLI tests can reuse.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from jobs.errors import ManifestError
from jobs.manifest import load_manifest, validate_job, validate_manifest

CORPUS = Path(__file__).parent / "bad_manifests"
CORPUS_FILES = sorted(CORPUS.glob("*.yaml"))


def _expectations(path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, text in enumerate(lines, start=1):
        header = re.match(r"^# (expect|field|item|line|in): (.+)$", text)
        if header:
            found[header.group(1)] = header.group(2).strip()
        if "#<-" in text and "line" not in found:
            found["marked"] = str(number)
    return found


def _assert_located(path: Path, expect: dict[str, str]) -> None:
    report = validate_manifest(path)
    assert not report.ok, f"{path.name} validated without errors"
    file_name = expect.get("in", path.name)
    line = expect.get("line", expect.get("marked"))
    assert line is not None, f"{path.name}: no '# line:' header and no '#<-' marker"
    wanted = [f"{file_name}:{line}", expect["expect"]]
    if "item" in expect:
        wanted.append(f"item {expect['item']}")
    if "field" in expect:
        wanted.append(f"field {expect['field']!r}")
    texts = [str(issue) for issue in report.errors]
    assert any(all(w in text for w in wanted) for text in texts), (
        f"{path.name}: no error mentions all of {wanted}; got:\n" + "\n".join(texts)
    )


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS_FILES) >= 30


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_corpus_file_is_refused_with_a_located_error(path: Path) -> None:
    expect = _expectations(path)
    assert "expect" in expect, f"{path.name} lacks an '# expect:' header"
    _assert_located(path, expect)


def _refusal(path: Path) -> ManifestError | None:
    """What the submit path sees: load, stream the jobs, validate each; the error, if any."""
    try:
        manifest = load_manifest(path)
        problems = [issue for job in manifest.jobs() for issue in validate_job(job)]
    except ManifestError as exc:
        return exc
    return ManifestError(problems) if problems else None


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_corpus_file_is_refused_on_the_submit_path_too(path: Path) -> None:
    refusal = _refusal(path)
    assert refusal is not None, f"{path.name} expanded into valid jobs"
    assert refusal.exit_code == 2
    assert refusal.issues


def generated_bad_manifests(folder: Path) -> list[tuple[Path, dict[str, str]]]:
    """Write the big-file cases into ``folder``; return (manifest, expectations) pairs."""
    cases: list[tuple[Path, dict[str, str]]] = []

    big_scalar = folder / "big_scalar.yaml"
    big_scalar.write_text("name: x\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: " + "x" * 10_000_000 + "\n")
    cases.append((big_scalar, {"expect": "10,000,000 characters is refused", "line": "4"}))

    huge = folder / "huge_manifest.yaml"
    with huge.open("wb") as fh:
        fh.write(b"name: x\n")
        fh.truncate(17 * 1024 * 1024)
    cases.append((huge, {"expect": "refused (at most 16,777,216)", "line": ""}))

    heavy = folder / "images" / "heavy.jpg"
    heavy.parent.mkdir(exist_ok=True)
    Image.new("RGB", (640, 360), (10, 20, 30)).save(heavy, quality=50)
    with heavy.open("ab") as fh:  # a valid JPEG header followed by 11 MB of padding
        fh.write(b"\0" * (11 * 1024 * 1024))
    too_heavy = folder / "image_too_large_bytes.yaml"
    too_heavy.write_text(
        "name: x\nendpoint: fal-ai/wan-25-preview/image-to-video\nitems:\n"
        "  - prompt: hi\n    image_url: images/heavy.jpg\n"
    )
    cases.append(
        (
            too_heavy,
            {"expect": "larger than the endpoint accepts", "line": "5", "item": "0", "field": "image_url"},
        )
    )
    return cases


def test_generated_big_cases_are_refused(tmp_path: Path) -> None:
    for path, expect in generated_bad_manifests(tmp_path):
        if expect["line"]:
            _assert_located(path, expect)
        else:  # refused before parsing: there is no line to point at
            report = validate_manifest(path)
            assert report.manifest is None
            assert any(expect["expect"] in str(i) and path.name in str(i) for i in report.errors)
        assert _refusal(path) is not None
