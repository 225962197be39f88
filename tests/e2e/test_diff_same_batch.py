"""``wanbatch diff X X``: a batch compared with itself says so, and never claims a reuse.

Every job pairs with itself (by its key). The pair's two sides were one job, so "one render"
was trivially true and every pair was flagged ``reused output`` (``--json``: ``"reused": N``)
although nothing was reused, and a cancelled job compared with itself was labelled
``reused output, video``. A real reuse across two batches is still flagged.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.e2e_helpers import FAST_ENV, MakeManifest
from tests.in_process import run_main

#: Two pinned-seed jobs, and a third whose seed no earlier batch rendered.
BODY = """\
name: {name}
endpoint: fal-ai/wan-i2v
reuse_outputs: {reuse}
budget:
  max_usd: {budget}
defaults:
  resolution: 480p
  num_frames: 81
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
    seed: 7
  - prompt: Night falls over the hills
    image_url: images/night.jpg
    seed: 8
{more}"""

THIRD = """\
  - prompt: A lantern in the fog
    image_url: images/landscape.jpg
    seed: 9
"""


def _json(
    argv: list[str], code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    assert run_main([*argv, "--json"], monkeypatch) == code
    return json.loads(capsys.readouterr().out)


def test_a_batch_compared_with_itself_says_so_and_claims_no_reuse(
    manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    first_path = manifest("first", BODY.format(name="first", reuse="false", budget=10, more=""))
    run = ["run", "--simulate", "--no-progress"]
    first = _json([*run, str(first_path)], 0, monkeypatch, capsys)["batch"]
    # Its two pinned-seed jobs reuse first's outputs (no budget reserved); the third would be
    # rendered, and the budget cancels it: a job without a video.
    again_path = manifest("again", BODY.format(name="again", reuse="true", budget="0.1", more=THIRD))
    again = _json([*run, str(again_path)], 1, monkeypatch, capsys)["batch"]

    report = _json(["diff", again, again], 1, monkeypatch, capsys)  # a job has no video
    assert report["same_batch"] is True
    assert (report["same"], report["different"], report["only_a"], report["only_b"]) == (2, 1, 0, 0)
    assert report["reused"] == 0
    for job in report["jobs"]:
        assert job["a"]["job_id"] == job["b"]["job_id"]
        assert job["reused"] is False
        assert job["differs"] == []  # a job differs in nothing from itself
    cancelled = [job for job in report["jobs"] if job["a"]["status"] == "cancelled"]
    assert len(cancelled) == 1
    assert cancelled[0]["result"] == "different"

    assert run_main(["diff", again, again], monkeypatch) == 1
    human = " ".join(capsys.readouterr().out.split())
    assert "again vs again: 2 same, 1 different, 0 only in A, 0 only in B" in human
    assert "both sides are the same batch (again): every job is compared with itself" in human
    assert "reused" not in human
    assert "no video (cancelled)" in human

    # A batch of one job compared with itself, every job with a video: exit 0, one note line.
    report = _json(["diff", first, first], 0, monkeypatch, capsys)
    assert (report["same_batch"], report["identical"], report["reused"]) == (True, True, 0)
    assert run_main(["diff", first, first], monkeypatch) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("both sides are the same batch" in line for line in lines) == 1

    # Two batches, one of which reused the other's outputs: still flagged, and not the same batch.
    report = _json(["diff", first, again], 1, monkeypatch, capsys)
    assert report["same_batch"] is False
    assert (report["same"], report["only_b"], report["reused"]) == (2, 1, 2)
    for job in report["jobs"]:
        if job["a"] is not None:
            assert job["reused"] is True
            assert job["b"]["reused_from"] == job["a"]["job_id"]
    assert run_main(["diff", first, again], monkeypatch) == 1
    human = " ".join(capsys.readouterr().out.split())
    assert "2 of the same pairs reused an output rather than rendering it" in human
    assert "same batch" not in human
