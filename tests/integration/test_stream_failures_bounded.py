"""What a long-lived conductor keeps of lost status streams stays bounded (a soak audit).

The conductor counted, per job, how often its status stream broke, and never dropped a count:
a ``wanbatch worker`` kept one per job whose stream ever broke, long after the job left fal.
Worse, the jobs given up on (streams broken three times, polled since) were sent on every tick
as the catch-up query's ``NOT IN`` list, one bound parameter per job ever given up on: the tick
slowed with the worker's age, and past 65,535 ids PostgreSQL refused the query on every tick.
Now a count goes with its job's following, a job given up on is kept only while that request
waits at fal, and the catch-up query binds a bounded number of ids whatever it is given.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, update

from jobs import db, store
from jobs.errors import RetryableProviderError
from jobs.models import Job, utcnow
from jobs.states import JobState
from jobs.store.reading import IDS_PER_QUERY
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for, wait_until
from worker.conductor import STREAM_FAILURES_MAX, Conductor
from worker.fal.models import RequestHandle, Status
from worker.steps.poll import AT_FAL

KEY = "stream-failures-key-3b9d"
#: Jobs whose streams all break: more than the catch-up should ever bind as parameters.
JOBS = 120
#: The most parameters a statement of the tick may bind here (a few for states, batches...).
FEW = 40


class _Breaks:
    """A client whose every status stream breaks at once, before any status."""

    def __init__(self) -> None:
        self.opened = 0
        self._lock = threading.Lock()

    def stream_status(
        self, handle: RequestHandle, *, stop: object = None, states: object = None
    ) -> Iterator[Status]:
        with self._lock:
            self.opened += 1
        if self.opened >= 0:  # always: a generator that breaks at its first read, as the real one
            raise RetryableProviderError("status stream broke")
        yield Status(state="IN_QUEUE")


class _Parameters:
    """The parameters each statement on ``engine`` binds, as long as it is installed."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.counts: list[int] = []

    def __enter__(self) -> _Parameters:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, _statement: str, parameters: Any, *_: Any) -> None:
        if isinstance(parameters, list):  # executemany: each row on its own
            self.counts.extend(len(p) for p in parameters)
        else:
            self.counts.append(len(parameters or ()))


def _at_fal(engine: Engine, ids: list[str]) -> None:
    """Put ``ids`` at fal (queued, each with a request of its own), oldest first."""
    start = utcnow() - timedelta(hours=1)
    with db.session_scope(engine) as session:
        for n, job_id in enumerate(ids):
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    state=JobState.QUEUED,
                    request_id=f"req-{job_id}",
                    submitted_at=start + timedelta(seconds=n),
                )
            )


def _ended(engine: Engine, ids: list[str]) -> None:
    with db.session_scope(engine) as session:
        session.execute(update(Job).where(Job.id.in_(ids)).values(state=JobState.FAILED))


def test_lost_streams_of_jobs_that_ended_leave_nothing_behind(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "out"))
    batch_id = add_batch(
        engine,
        "breaks",
        [("fal-ai/wan-22", {"prompt": f"fog {i}", "resolution": "480p"}) for i in range(JOBS)],
    )
    ids = job_ids(engine, batch_id)
    _at_fal(engine, ids)
    conductor = Conductor(rt, max_streams=JOBS)
    watcher = conductor.watcher
    assert watcher is not None
    breaks = _Breaks()
    watcher.client = breaks  # type: ignore[assignment]
    stopping = threading.Event()

    def round_() -> None:  # the loop's round: lost streams are followed again
        _, lost, _ = conductor._take(0)
        if lost:
            conductor._watch(lost)

    try:
        conductor._watch(set(ids))  # every job's first stream: each breaks, is opened again, ...
        wait_until(
            lambda: breaks.opened == STREAM_FAILURES_MAX * JOBS and not watcher.watching(),
            step=round_,
            timeout=60,
        )
        round_()
        assert breaks.opened == STREAM_FAILURES_MAX * JOBS  # given up on: polled, no more streams

        # The jobs end (a poll, another process): the next tick keeps nothing of them, and the
        # ticks after it bind nothing for them.
        _ended(engine, ids)
        conductor._tick(stopping)
        with _Parameters(engine) as parameters:
            conductor._tick(stopping)
        assert max(parameters.counts) <= FEW, sorted(parameters.counts)[-5:]
        assert conductor._stream_failures == {}
        assert getattr(conductor, "_given_up", {}) == {}

    finally:
        conductor.close()
        rt.client.close()


def test_the_catch_up_query_binds_a_bounded_number_of_excluded_ids(engine: Engine) -> None:
    """Any number of ids to leave out: PostgreSQL refused past 65,535 parameters, SQLite past
    32,766; now the statement binds at most :data:`IDS_PER_QUERY` of them, and the answer is
    the same (the oldest requests at fal, the excluded left out)."""
    batch_id = add_batch(engine, "many", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(6)])
    ids = job_ids(engine, batch_id)
    _at_fal(engine, ids)
    excluded = {ids[0], ids[2]} | {uuid.uuid4().hex for _ in range(70_000)}
    with _Parameters(engine) as parameters, db.read_scope(engine) as session:
        got = store.requests_at_fal(session, states=AT_FAL, exclude_ids=excluded, limit=3)
        found = [job.id for job in got]
        few = store.requests_at_fal(session, states=AT_FAL, exclude_ids={ids[0]}, limit=2)
    assert found == [ids[1], ids[3], ids[4]]
    assert [job.id for job in few] == [ids[1], ids[2]]
    assert max(parameters.counts) <= IDS_PER_QUERY + FEW
