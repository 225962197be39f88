"""``worker.chaos`` point specs: parsed strictly, and inert when unset."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worker import chaos


def test_spec_is_parsed_with_probabilities() -> None:
    assert chaos.parse_points("after_post:0.2, mid_download:1,before_post") == {
        "after_post": 0.2,
        "mid_download": 1.0,
        "before_post": 1.0,
    }
    assert chaos.parse_points(None) == {}
    assert chaos.parse_points("") == {}


@pytest.mark.parametrize("spec", ["after_psot:0.1", "after_post:1.5", "after_post:-0.1", "after_post:x"])
def test_bad_spec_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match=r"chaos point|could not convert"):
        chaos.parse_points(spec)


def _run_point(env: dict[str, str]) -> int:
    code = "from worker.chaos import crash_point; crash_point('after_post'); print('alive')"
    clean = {"PATH": "/usr/bin:/bin", **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=clean, capture_output=True, check=False
    ).returncode


def test_crash_point_exits_137_only_when_enabled() -> None:
    assert _run_point({}) == 0
    assert _run_point({"WANBATCH_CHAOS_CRASH_POINTS": "before_post:1"}) == 0
    assert _run_point({"WANBATCH_CHAOS_CRASH_POINTS": "after_post:1"}) == chaos.CRASH_EXIT_CODE
