"""A dispatch round waits a bounded time for its jobs' sidecar objects (outputs in S3).

Review of the day's merge: the round reads them while it holds the database's dispatch lock
(SQLite: its write lock), and the S3 client's timeouts are a minute, with retries: a storage slow
to answer held every other write of the process for minutes. A read not answered within
:data:`worker.steps.adopt.LOOKUP_DEADLINE` counts as "cannot be asked": the job is sent.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from jobs import output_store
from jobs.output_store import OutputReadError
from worker.steps import adopt


def test_a_slow_storage_holds_the_round_no_longer_than_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def read_sidecar(video: str) -> dict[str, Any] | None:
        if video.endswith("slow.mp4"):
            release.wait(30)  # a storage that does not answer
        return None

    monkeypatch.setattr(output_store, "read_sidecar", read_sidecar)
    monkeypatch.setattr(adopt, "_own_video", lambda _rt, _batch, job: f"s3://b/p/{job.id}.mp4")
    monkeypatch.setattr(adopt, "LOOKUP_DEADLINE", 0.3)
    rt: Any = SimpleNamespace(settings=SimpleNamespace(output_url="s3://b/p"))
    jobs: Any = [SimpleNamespace(id=name, batch_id="B") for name in ("fast", "slow", "fast2")]
    try:
        started = time.monotonic()
        looked = adopt.look_up(rt, jobs, lambda _batch_id: SimpleNamespace(id="B"))
        took = time.monotonic() - started
    finally:
        release.set()
    assert took < 5, f"the round waited {took:.1f} s"
    assert looked["fast"] is None
    assert looked["fast2"] is None
    late = looked["slow"]
    assert isinstance(late, OutputReadError)
    assert "no answer from the storage within 0.3 s" in str(late)


def test_one_job_is_bounded_too(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(output_store, "read_sidecar", lambda _video: release.wait(30) and None)
    monkeypatch.setattr(adopt, "_own_video", lambda _rt, _batch, job: f"s3://b/p/{job.id}.mp4")
    monkeypatch.setattr(adopt, "LOOKUP_DEADLINE", 0.2)
    rt: Any = SimpleNamespace(settings=SimpleNamespace(output_url="s3://b/p"))
    try:
        job: Any = SimpleNamespace(id="only", batch_id="B")
        looked = adopt.look_up(rt, [job], lambda _b: SimpleNamespace(id="B"))
    finally:
        release.set()
    assert isinstance(looked["only"], OutputReadError)
