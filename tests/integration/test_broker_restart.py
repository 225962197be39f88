"""A Redis broker that restarts keeps nothing: the messages of jobs handed to tasks not started
yet are gone. The tick leader used to notice only when their leases ran out (two minutes by
default, the whole batch stalled); it now sees the broker's new incarnation at its next tick and
hands those jobs on again (a copy is harmless: the steps are fenced)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.exceptions
from sqlalchemy import Engine

from jobs import db, store
from jobs.models import utcnow
from tests.chaos.chaos_harness import RedisServer
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, completion_heard, job_ids, make_runtime, settings_for
from worker.conductor import Conductor
from worker.steps import dispatch, submit
from worker.steps.poll import apply_seen
from worker.tasks import redis_epoch

KEY = "broker-restart-key-2e9a"


def test_a_redis_restart_is_a_new_epoch(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        epoch = redis_epoch(server.url)
        assert epoch is not None
        first = epoch()
        assert first
        assert epoch() == first
        server.kill()
        with pytest.raises(redis.exceptions.ConnectionError):  # down: said so (the conductor marks it)
            epoch()
        server.start()
        again = epoch()
        assert again
        assert again != first
    finally:
        server.kill()
    assert redis_epoch("amqp://guest:guest@127.0.0.1:5672//") is None
    assert redis_epoch(None) is None


def _epochs(*values: str) -> Iterator[str]:
    yield from values


def test_the_leader_hands_the_waiting_jobs_on_again_after_a_broker_restart(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    FakeFal(hostile)
    submits: list[str] = []
    downloads: list[str] = []
    rt = make_runtime(
        engine,
        settings_for(hostile.url, KEY, output_dir=tmp_path / "out", max_outstanding=5),
        enqueue_submit=submits.append,
        enqueue_download=downloads.append,
    )
    batch_id = add_batch(engine, "b", [("fal-ai/wan-22", {"prompt": p, "resolution": "480p"}) for p in "abc"])
    done, began, waiting = job_ids(engine, batch_id)
    assert sorted(dispatch(rt)) == sorted([done, began, waiting])
    assert submit(rt, done) == "submitted"
    assert apply_seen(rt, [completion_heard(engine, rt, done)]) == 1  # its download task queued
    with db.session_scope(engine) as session:  # this one's POST began: never handed on again
        job = store.get_job(session, began)
        assert store.take_lease(session, rt.fence(job), now=utcnow(), lease_seconds=60, submitted_input={})
    submits.clear()
    downloads.clear()
    epochs = _epochs("run-1", "run-1", "run-2")
    rt.broker_epoch = lambda: next(epochs)
    conductor = Conductor(rt, stream=False)

    conductor._after_broker_restart()  # first look: nothing to compare with
    conductor._after_broker_restart()  # the same broker
    assert (submits, downloads) == ([], [])
    conductor._after_broker_restart()  # a new one: its queues are empty

    assert submits == [waiting]
    assert downloads == [done]
