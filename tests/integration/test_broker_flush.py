"""A Redis broker that loses its queued messages without restarting: ``FLUSHALL``/``FLUSHDB``,
or the ``wanbatch`` queue list evicted under a ``maxmemory-policy`` that evicts keys.

The broker's incarnation used to be its ``run_id`` alone, which none of these changes: the jobs
handed to the lost messages then sat ``submitting`` for the whole lease
(``WANBATCH_LEASE_SECONDS``), holding their outstanding slots, with nothing said, and their
history read "worker lost before sending" though no worker was lost. The incarnation is now the
``run_id`` and a marker key of the broker's database (:data:`worker.tasks.BROKER_EPOCH_KEY`):
a flush or an eviction takes the marker with the messages, and the tick leader hands the jobs on
again at its next tick, says so in one warning line and on each job's history.

Real private ``redis-server`` processes on free ports (never the shared one).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine

from jobs import db, store
from tests.chaos.chaos_harness import RedisServer
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, completion_heard, job_ids, make_runtime, settings_for
from worker.conductor import Conductor
from worker.steps import dispatch, hand_on_again, submit
from worker.steps.poll import apply_seen
from worker.tasks import redis_epoch

KEY = "broker-flush-key-7c1d"
T2V = "fal-ai/wan-22"
#: The marker key of the broker's incarnation (:data:`worker.tasks.BROKER_EPOCH_KEY`).
BROKER_EPOCH_KEY = "wanbatch:broker-epoch"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path / "redis")
    s.start()
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis[bytes]]:
    c = redis.Redis(port=server.port)
    yield c
    c.close()


def _run_id(client: redis.Redis[bytes]) -> str:
    return str(client.info("server")["run_id"])


def test_a_flush_or_a_lost_marker_is_a_new_epoch_a_flush_elsewhere_is_not(
    server: RedisServer, client: redis.Redis[bytes]
) -> None:
    epoch = redis_epoch(server.url)
    assert epoch is not None
    run_id = _run_id(client)
    first = epoch()
    assert first is not None
    assert epoch() == first  # the same broker, asked again
    assert client.get(BROKER_EPOCH_KEY) is not None  # the marker, no TTL
    assert client.ttl(BROKER_EPOCH_KEY) == -1

    client.flushdb()
    after_flushdb = epoch()
    assert after_flushdb is not None
    assert after_flushdb != first
    assert epoch() == after_flushdb

    client.flushall()
    after_flushall = epoch()
    assert after_flushall is not None
    assert after_flushall not in (first, after_flushdb)

    client.delete(BROKER_EPOCH_KEY)  # what an eviction of the marker does
    evicted = epoch()
    assert evicted is not None
    assert evicted not in (first, after_flushdb, after_flushall)

    other = redis.Redis(port=server.port, db=3)  # another database's flush loses none of db 0's messages
    try:
        other.set("x", "1")
        other.flushdb()
    finally:
        other.close()
    assert epoch() == evicted
    assert _run_id(client) == run_id  # nothing of this was a restart


def test_workers_racing_to_set_the_marker_agree_on_one_epoch(
    server: RedisServer, client: redis.Redis[bytes]
) -> None:
    """Several workers (each a leader in turn, or one after another's lock) read the marker at
    once right after a flush: exactly one marker is set (``SET NX``), and every one of them reads
    the same epoch."""
    epochs = [redis_epoch(server.url) for _ in range(8)]
    assert all(e is not None for e in epochs)
    for _ in range(5):
        client.flushdb()
        start = threading.Barrier(len(epochs))
        seen: list[str | None] = []
        lock = threading.Lock()

        def look(
            epoch: Callable[[], str | None],
            start: threading.Barrier = start,
            seen: list[str | None] = seen,
            lock: threading.Lock = lock,
        ) -> None:
            start.wait()
            value = epoch()
            with lock:
                seen.append(value)

        threads = [threading.Thread(target=look, args=(e,)) for e in epochs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(seen) == len(epochs)
        assert None not in seen
        assert len(set(seen)) == 1, seen
        marker = client.get(BROKER_EPOCH_KEY)
        assert marker is not None
        assert marker.decode() in str(seen[0])


def test_a_redis_refusing_writes_is_no_new_epoch(server: RedisServer, client: redis.Redis[bytes]) -> None:
    """Out of memory (``maxmemory`` reached, ``noeviction``): the marker there reads as before;
    a marker missing cannot be set, and the epoch is unknown (None: asked again at the next tick),
    never a new one made up of a marker nobody could store."""
    filler = redis.Redis(port=server.port, db=1)
    try:
        for i in range(64):
            filler.set(f"filler:{i}", b"x" * 16384)
        epoch = redis_epoch(server.url)
        assert epoch is not None
        known = epoch()
        assert known is not None
        client.config_set("maxmemory", "1mb")
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            client.set("refused", "1")
        assert epoch() == known  # it reads: the same broker
        client.flushdb()  # db 0 only: db 1's filler keeps the memory full
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            client.set("refused", "1")
        assert epoch() is None  # the marker is gone and cannot be set: unknown
        assert client.get(BROKER_EPOCH_KEY) is None
        client.config_set("maxmemory", "0")
        again = epoch()
        assert again is not None
        assert again != known
    finally:
        client.config_set("maxmemory", "0")
        filler.close()


def test_the_leader_hands_the_waiting_jobs_on_again_after_a_flush(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    server: RedisServer,
    client: redis.Redis[bytes],
    caplog: pytest.LogCaptureFixture,
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
    batch_id = add_batch(engine, "b", [(T2V, {"prompt": p, "resolution": "480p"}) for p in "abc"])
    done, waiting, other = job_ids(engine, batch_id)
    assert sorted(dispatch(rt)) == sorted([done, waiting, other])
    assert submit(rt, done) == "submitted"
    assert submit(rt, other) == "submitted"
    assert apply_seen(rt, [completion_heard(engine, rt, done)]) == 1  # its download task queued
    submits.clear()
    downloads.clear()
    rt.broker_epoch = redis_epoch(server.url)
    conductor = Conductor(rt, stream=False)

    conductor._after_broker_restart()  # first look: nothing to compare with
    conductor._after_broker_restart()  # the same broker
    assert (submits, downloads) == ([], [])
    caplog.clear()
    client.flushdb()  # the queued messages are gone; the run_id is the same
    with caplog.at_level(logging.WARNING, logger="worker.conductor"):
        conductor._after_broker_restart()
        conductor._after_broker_restart()  # once: the new marker is the epoch from now on

    assert submits == [waiting]
    assert downloads == [done]
    said = [r.getMessage() for r in caplog.records if r.name == "worker.conductor"]
    assert len(said) == 1, said
    assert "lost its queued messages" in said[0]
    assert "flushed or evicted" in said[0]
    assert "1 submit(s) and 1 download(s)" in said[0]
    for job_id in (waiting, done):
        with db.read_scope(engine) as session:
            reasons = [e.reason or "" for e in store.job_events(session, job_id)]
        assert [r for r in reasons if r.startswith("message lost by the broker")], reasons
    with db.read_scope(engine) as session:
        reasons = [e.reason or "" for e in store.job_events(session, other)]
    assert not [r for r in reasons if "message lost" in r], reasons  # its message had run


def test_a_job_handed_on_again_while_its_message_is_still_queued_is_sent_once(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """The marker can be lost while the queue is not (only the marker evicted, ``allkeys-random``):
    every job handed to a task not started yet then has two messages. Each copy's submit reads the
    job and records its send fenced by the version it read, so one POST goes out, whichever copy
    runs first and however they interleave."""
    FakeFal(hostile)
    submits: list[str] = []
    settings = settings_for(hostile.url, KEY, output_dir=tmp_path / "out", max_outstanding=5)
    rt = make_runtime(engine, settings, enqueue_submit=submits.append)
    rt.submit_tickets = {}  # the first copy's read of the job is kept from before the second ran
    other_worker = make_runtime(engine, settings)
    batch_id = add_batch(engine, "twice", [(T2V, {"prompt": p, "resolution": "480p"}) for p in "ab"])
    first, second = job_ids(engine, batch_id)
    assert sorted(dispatch(rt)) == sorted([first, second])
    assert hand_on_again(rt, "flushed or evicted") == (2, 0)
    assert sorted(submits) == sorted([first, second, first, second])  # two messages each

    # ``first``: the copies one after the other.
    assert submit(other_worker, first) == "submitted"
    assert submit(other_worker, first) == "skipped"
    # ``second``: the original copy read the job (its ticket), then the other copy sent it.
    assert submit(other_worker, second) == "submitted"
    assert submit(rt, second) == "lost-lease"
    assert submit(rt, first) == "lost-lease"  # its ticket too was read before the other copy sent

    assert hostile.count("POST", rf"/{T2V}") == 2
    with db.read_scope(engine) as session:
        for job_id in (first, second):
            job = store.get_job(session, job_id)
            assert job.attempts == 1
            assert job.possible_duplicate_charges == 0


def test_a_marker_lost_every_tick_hands_on_once_per_lease_a_restart_always(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    server: RedisServer,
    client: redis.Redis[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under ``allkeys-lfu`` the marker, read once a tick, is the coldest key: evicted nearly every
    tick while the queue list survives. Each loss handed every waiting job on again, so the queue
    and the jobs' history grew by a copy each tick. A loss told by the marker alone now hands on
    at most once per ``WANBATCH_LEASE_SECONDS``; a restart (a new ``run_id``) always does."""
    FakeFal(hostile)
    submits: list[str] = []
    settings = settings_for(hostile.url, KEY, output_dir=tmp_path / "out", max_outstanding=5)
    rt = make_runtime(engine, settings, enqueue_submit=submits.append)
    batch_id = add_batch(engine, "lfu", [(T2V, {"prompt": p, "resolution": "480p"}) for p in "ab"])
    first, second = job_ids(engine, batch_id)
    assert sorted(dispatch(rt)) == sorted([first, second])
    submits.clear()
    rt.broker_epoch = redis_epoch(server.url)
    conductor = Conductor(rt, stream=False)
    now = [1000.0]
    conductor.clock = lambda: now[0]
    conductor._after_broker_restart()  # first look

    def notes(job_id: str) -> list[str]:
        with db.read_scope(engine) as session:
            reasons = [e.reason or "" for e in store.job_events(session, job_id)]
        return [r for r in reasons if r.startswith("message lost by the broker")]

    with caplog.at_level(logging.WARNING, logger="worker.conductor"):
        for _ in range(6):  # the marker evicted at every tick, a second apart
            client.delete(BROKER_EPOCH_KEY)
            conductor._after_broker_restart()
            now[0] += 1.0
        assert sorted(submits) == sorted([first, second])  # one hand-on
        said = [r.getMessage() for r in caplog.records if r.name == "worker.conductor"]
        assert len(said) == 1, said
        lost = "message lost by the broker (flushed or evicted): handed on again"
        assert notes(first) == notes(second) == [lost]
        epoch = client.get(BROKER_EPOCH_KEY)
        assert epoch is not None
        assert conductor._broker_epoch is not None
        assert epoch.decode() in conductor._broker_epoch  # the known epoch moved on all the same

        server.restart(down_seconds=0.1)  # within the lease: a restart still hands on
        conductor._after_broker_restart()
        assert len(submits) == 4
        said = [r.getMessage() for r in caplog.records if r.name == "worker.conductor"]
        assert len(said) == 2, said
        assert "restarted" in said[1]

        now[0] += settings.lease_seconds  # a lease on: a lost marker hands on again
        client.delete(BROKER_EPOCH_KEY)
        conductor._after_broker_restart()
        assert len(submits) == 6
        said = [r.getMessage() for r in caplog.records if r.name == "worker.conductor"]
        assert len(said) == 3, said
        assert "flushed or evicted" in said[2]
