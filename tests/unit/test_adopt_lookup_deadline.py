"""A dispatch round waits a bounded time for its jobs' sidecar objects (outputs in S3).

Review of the day's merge: the round reads them while it holds the database's dispatch lock
(SQLite: its write lock), and the S3 client's timeouts are a minute, with retries: a storage slow
to answer held every other write of the process for minutes. A read not answered within
:data:`worker.steps.adopt.LOOKUP_DEADLINE` counts as "cannot be asked": the job is sent. A second
review: every round then waited the deadline again, and each left eight threads behind; now the
reads share one pool, and after a miss none is asked for :data:`~worker.steps.adopt.LOOKUP_PAUSE`.
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


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> adopt._Lookups:
    """A fresh pool and no pause (the process's own are left alone)."""
    fresh = adopt._Lookups()
    monkeypatch.setattr(adopt, "LOOKUPS", fresh)
    monkeypatch.setattr(adopt, "_own_video", lambda _rt, _batch, job: f"s3://b/p/{job.id}.mp4")
    return fresh


def _round(names: list[str]) -> dict[str, Any]:
    rt: Any = SimpleNamespace(settings=SimpleNamespace(output_url="s3://b/p"))
    jobs: Any = [SimpleNamespace(id=name, batch_id="B") for name in names]
    return adopt.look_up(rt, jobs, lambda _batch_id: SimpleNamespace(id="B"))


def test_a_slow_storage_holds_a_round_no_longer_than_its_deadline_then_is_not_asked(
    monkeypatch: pytest.MonkeyPatch, lookups: adopt._Lookups
) -> None:
    release = threading.Event()
    asked: list[str] = []

    def read_sidecar(video: str, *, quick: bool = False) -> dict[str, Any] | None:
        assert quick  # one try within seconds, not the default client's minutes
        asked.append(video)
        if video.endswith("slow.mp4"):
            release.wait(30)  # a storage that does not answer
        return None

    monkeypatch.setattr(output_store, "read_sidecar", read_sidecar)
    monkeypatch.setattr(adopt, "LOOKUP_DEADLINE", 0.3)
    try:
        started = time.monotonic()
        looked = _round(["fast", "slow", "fast2"])
        took = time.monotonic() - started
        assert took < 5, f"the round waited {took:.1f} s"
        assert looked["fast"] is None
        assert looked["fast2"] is None
        late = looked["slow"]
        assert isinstance(late, OutputReadError)
        assert "no answer from the storage within 0.3 s" in str(late)

        # The next rounds do not wait again: nothing is asked until the pause ends.
        asked.clear()
        started = time.monotonic()
        again = _round(["next", "next2"])
        assert time.monotonic() - started < 0.2
        assert asked == []
        assert all(isinstance(v, OutputReadError) and "not asked again" in str(v) for v in again.values())

        lookups.paused_until = 0.0  # the pause is over: asked again
        assert _round(["later"]) == {"later": None}
        assert asked == ["s3://b/p/later.mp4"]
        assert lookups.pool is not None
        assert lookups.pool._max_workers == adopt.LOOKUPS_AT_ONCE  # one pool, reused
    finally:
        release.set()


def test_one_job_is_bounded_too(monkeypatch: pytest.MonkeyPatch, lookups: adopt._Lookups) -> None:
    release = threading.Event()
    monkeypatch.setattr(output_store, "read_sidecar", lambda _video, quick=False: release.wait(30) and None)
    monkeypatch.setattr(adopt, "LOOKUP_DEADLINE", 0.2)
    try:
        looked = _round(["only"])
    finally:
        release.set()
    assert isinstance(looked["only"], OutputReadError)
