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
from worker.conductor import STARTED_BATCH_SECONDS, Conductor
from worker.fal.models import Status
from worker.steps import RateBucket, Runtime, dispatch, submit
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


def _held_by_the_backlog(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, backlog: int
) -> tuple[Runtime, Conductor, Seen, str]:
    """Job A sent and completed at fal, job B waiting, fal with room for both (cap 2); the
    conductor applied A's completion and dispatched with a download backlog bound of ``backlog``."""
    FakeFal(hostile)
    rt = make_runtime(
        engine,
        settings_for(
            hostile.url, KEY, output_dir=tmp_path / "out", max_outstanding=2, max_download_backlog=backlog
        ),
    )
    rt.download_claims = {}
    batch_id = add_batch(
        engine, "backlog", [("fal-ai/wan-22", {"prompt": p, "resolution": "480p"}) for p in "ab"]
    )
    first, second = job_ids(engine, batch_id)
    rt.bucket = RateBucket(0.001, burst=1)  # one token: B stays pending behind A
    assert dispatch(rt) == [first]
    rt.bucket = RateBucket(1000.0)
    assert submit(rt, first) == "submitted"
    conductor = Conductor(rt, stream=False)
    rt.notify = conductor.notify
    return rt, conductor, completion_heard(engine, rt, first), second


def test_a_finished_download_dispatches_what_the_backlog_held_back(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """The backlog bound (here 1) holds B while A downloads; A's download finishing is the
    event that sends B, not the next tick (issue #11: a freed slot dispatches at once)."""
    rt, conductor, seen, waiting = _held_by_the_backlog(engine, hostile, tmp_path, backlog=1)
    assert conductor._apply_then_dispatch([seen]) == []  # A downloading: the backlog is full
    assert rt.downloads_held
    assert conductor._take(0) == ([], set(), False)
    assert steps.download(rt, seen.job_id) == "succeeded"
    assert conductor._take(0) == ([], set(), True)  # the download woke dispatch
    assert steps.dispatch(rt) == [waiting]


def test_a_finished_download_wakes_nothing_when_nothing_waits_on_downloads(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    rt, conductor, seen, waiting = _held_by_the_backlog(engine, hostile, tmp_path, backlog=5)
    assert conductor._apply_then_dispatch([seen]) == [waiting]  # the backlog had room
    assert not rt.downloads_held
    assert steps.download(rt, seen.job_id) == "succeeded"
    assert conductor._take(0) == ([], set(), False)  # no dispatch round for it: none was needed


def _started_heard(engine: Engine, hostile: HostileProvider, tmp_path: Path) -> Conductor:
    """A conductor that heard job A's request start running, and has applied nothing yet."""
    FakeFal(hostile)
    conductor = Conductor(
        make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path)), stream=False
    )
    conductor._on_status("job-a", "req-a", Status("IN_PROGRESS"))
    return conductor


def test_a_started_event_waits_for_a_round_that_writes(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """A round that only starts watching a submit writes nothing; "started running" events it
    took along used to cost a transaction of their own (about one in ten of a drain's). They
    now ride along with the next completion or dispatch."""
    conductor = _started_heard(engine, hostile, tmp_path)
    conductor.notify("submitted", "job-b")
    assert conductor._take(0) == ([], {"job-b"}, False)  # the watch round leaves it

    conductor._on_status("job-c", "req-c", Status("COMPLETED"))
    seen, submitted, wants = conductor._take(0)
    assert [s.job_id for s in seen] == ["job-a", "job-c"]  # along with the completion's round
    assert (submitted, wants) == (set(), True)
    assert conductor._take(0) == ([], set(), False)


def test_a_started_event_goes_along_with_a_dispatch_round(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    conductor = _started_heard(engine, hostile, tmp_path)
    conductor.notify("freed", "job-x")
    seen, _, wants = conductor._take(0)
    assert [s.job_id for s in seen] == ["job-a"]
    assert wants


def test_a_started_event_is_applied_once_due_without_other_rounds(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    conductor = _started_heard(engine, hostile, tmp_path)
    conductor.notify("submitted", "job-b")
    conductor._started_since -= STARTED_BATCH_SECONDS  # its wait is over
    seen, submitted, wants = conductor._take(0)
    assert [s.job_id for s in seen] == ["job-a"]
    assert (submitted, wants) == ({"job-b"}, False)


def test_the_wait_for_events_ends_when_a_started_event_falls_due(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    conductor = _started_heard(engine, hostile, tmp_path)
    seen, _, _ = conductor._take(30.0)  # returns after STARTED_BATCH_SECONDS, not 30 s
    assert [s.job_id for s in seen] == ["job-a"]


def test_a_submit_already_followed_wakes_no_round(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """The submit step starts following its request itself (``watch_accepted``), then says
    "submitted": a round for it would only find the request followed already."""
    FakeFal(hostile)
    conductor = Conductor(
        make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path)), stream=True
    )
    assert conductor.watcher is not None
    conductor.watcher._watching["job-a"] = "req-a"  # as watch_accepted leaves it
    conductor.notify("submitted", "job-a")
    assert conductor._take(0) == ([], set(), False)
    conductor.notify("submitted", "job-b")  # another process's submit (LISTEN): to be followed
    assert conductor._take(0) == ([], {"job-b"}, False)


def test_a_full_cap_leaves_no_dispatch_round_to_come_back_for(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """While the jobs wait at fal (60-150 s a Wan render) and the outstanding cap is full, the
    conductor sets no time to dispatch again (:meth:`Conductor._redispatch_at`): a freed slot
    (``notify("freed")``, a stream's completion) or the next tick is what can change dispatch's
    answer, and a look every 20 ms would only read the caps again. A round left short by the
    submit rate asks to come back: once the cap is full, the round that finds it so takes that
    back. (Issue #11 measured no such looks while waiting: a guard, not a fix.)"""
    FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "out", max_outstanding=1))
    batch_id = add_batch(
        engine, "capped", [("fal-ai/wan-22", {"prompt": p, "resolution": "480p"}) for p in "ab"]
    )
    first, _ = job_ids(engine, batch_id)
    conductor = Conductor(rt, stream=False)
    assert dispatch(rt) == [first]  # the cap of 1 holds B back
    assert submit(rt, first) == "submitted"  # A waits at fal
    assert rt.bucket is not None
    rt.bucket.short = True  # as a round the rate held back left it
    assert conductor._redispatch_at() is not None
    assert dispatch(rt) == []  # the cap is full: nothing to claim
    assert conductor._redispatch_at() is None  # nothing to come back for before an event
