"""A twin that could not be read once is read again later (``reuse_outputs``' per-process cache
of verified digests, worker/steps/verified_outputs.py): a passing EIO must not make every later
twin render again while the intact video's lstat facts stay the same.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from sqlalchemy import Engine

from jobs import output_store
from jobs.settings import Settings
from tests.integration.test_reuse_dispatch import JOBS, _reused_from, _reusing, _succeed
from tests.step_runtime import add_batch, job_ids, make_runtime
from worker.steps import dispatch, verified_outputs


def test_one_failed_read_of_a_twin_does_not_make_every_later_twin_render_again(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verified_outputs, "RACY_SECONDS", 0.0)  # the video is older than the clock's tick
    video = tmp_path / "first.mp4"
    video.write_bytes(b"video bytes")
    (original,) = job_ids(engine, add_batch(engine, "lc", JOBS[:1]))
    _succeed(engine, original, video)

    real_sha, real_open = output_store.output_sha256, os.open
    failures = [str(video)]  # the first read of the video meets a transient I/O error

    def flaky_open(path: str, *args: object, **kwargs: object) -> int:
        if failures and str(path) == failures[0]:
            failures.pop()
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    def sha(path: str) -> str | None:
        monkeypatch.setattr(os, "open", flaky_open)
        try:
            return real_sha(path)
        finally:
            monkeypatch.setattr(os, "open", real_open)

    monkeypatch.setattr(output_store, "output_sha256", sha)
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10))
    job_ids(engine, _reusing(engine, "unlucky"))
    dispatch(rt)  # the read failed: this one job is sent, as a read failure always did
    assert not failures

    # The video is intact and readable now; nothing about it changed.
    (later,) = job_ids(engine, _reusing(engine, "later"))
    sent = dispatch(rt)
    assert sent == [], f"the twin of an intact video was sent to fal again: {sent}"
    assert _reused_from(engine, later) == original
