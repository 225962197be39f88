"""One conductor round: the statuses heard and the dispatch they make room for, in one commit.

A completion used to cost two transactions (apply the status, then dispatch the slot it
freed); the round now does both in one. A dispatch that fails must not take the statuses
with it: each was heard once, from a stream that has ended.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from jobs import db, store
from jobs.states import JobState
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, completion_heard, job_ids, make_runtime, settings_for
from worker import steps
from worker.conductor import Conductor
from worker.steps import Runtime, dispatch, submit
from worker.steps.poll import Seen

S = JobState
KEY = "conductor-rounds-key-5b2a"


@pytest.fixture
def commits(engine: Engine) -> Iterator[list[int]]:
    seen: list[int] = []

    def record(_conn: Any) -> None:
        seen.append(1)

    writer = db.writer_engine(engine)  # where units of work commit (SQLite: its own engine)
    event.listen(writer, "commit", record)
    yield seen
    event.remove(writer, "commit", record)


def _one_done_one_waiting(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> tuple[Runtime, Seen, str]:
    """Job A sent and completed at fal (its stream event not yet applied); job B waits to be sent."""
    FakeFal(hostile)
    rt = make_runtime(
        engine,
        settings_for(
            hostile.url, KEY, output_dir=tmp_path / "out", max_outstanding=1, max_download_backlog=5
        ),
    )
    batch_id = add_batch(
        engine, "rounds", [("fal-ai/wan-22", {"prompt": p, "resolution": "480p"}) for p in "ab"]
    )
    first, second = job_ids(engine, batch_id)
    assert dispatch(rt) == [first]  # the cap of 1 holds B back
    assert submit(rt, first) == "submitted"
    return rt, completion_heard(engine, rt, first), second


def test_a_completion_and_the_dispatch_it_allows_commit_once(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, commits: list[int]
) -> None:
    rt, seen, waiting = _one_done_one_waiting(engine, hostile, tmp_path)
    conductor = Conductor(rt, stream=False)
    commits.clear()
    assert conductor._apply_then_dispatch([seen]) == [waiting]
    assert len(commits) == 1
    with db.read_scope(engine) as session:
        assert store.get_job(session, seen.job_id).state == S.DOWNLOADING
        assert store.get_job(session, waiting).state == S.SUBMITTING


def test_a_failed_dispatch_does_not_lose_the_statuses(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt, seen, waiting = _one_done_one_waiting(engine, hostile, tmp_path)
    conductor = Conductor(rt, stream=False)

    def broken(*_args: Any) -> None:
        raise RuntimeError("dispatch broke")

    monkeypatch.setattr(steps, "dispatch_in", broken)
    with pytest.raises(RuntimeError, match="dispatch broke"):
        conductor._apply_then_dispatch([seen])
    with db.read_scope(engine) as session:
        assert store.get_job(session, seen.job_id).state == S.DOWNLOADING  # applied on its own
        assert store.get_job(session, waiting).state == S.PENDING
