"""Every manifest in ``bad_manifests/`` must be refused with a located, specific error.

What each corpus file's error must mention is in its header comments (see
:mod:`tests.unit.bad_manifest_corpus`); the big-file cases are generated into ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.errors import ManifestError
from jobs.manifest import load_manifest, validate_job, validate_manifest
from tests.unit.bad_manifest_corpus import CORPUS_FILES, expectations, generated_bad_manifests, wanted


def _assert_located(path: Path, expect: dict[str, str]) -> None:
    report = validate_manifest(path)
    assert not report.ok, f"{path.name} validated without errors"
    line = expect.get("line", expect.get("marked"))
    assert line is not None, f"{path.name}: no '# line:' header and no '#<-' marker"
    texts = [str(issue) for issue in report.errors]
    must = wanted(path, expect)
    assert any(all(w in text for w in must) for text in texts), (
        f"{path.name}: no error mentions all of {must}; got:\n" + "\n".join(texts)
    )


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS_FILES) >= 30


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_corpus_file_is_refused_with_a_located_error(path: Path) -> None:
    expect = expectations(path)
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


def test_generated_big_cases_are_refused(tmp_path: Path) -> None:
    for path, expect in generated_bad_manifests(tmp_path):
        if expect["line"]:
            _assert_located(path, expect)
        else:  # refused before parsing: there is no line to point at
            report = validate_manifest(path)
            assert report.manifest is None
            assert any(expect["expect"] in str(i) and path.name in str(i) for i in report.errors)
        assert _refusal(path) is not None
