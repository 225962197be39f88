"""A status stream that stays open without ever saying its request ended holds nothing for good.

The conductor's poller used to leave every job a stream followed alone, and the watcher handed
a job back only when its stream broke: a stream of keep-alives, or of events that never reach
COMPLETED, kept its job ``queued`` forever while ``/status`` said COMPLETED (a hostile-provider
audit). Now a stream vouches for its job for ``WANBATCH_POLL_MAX_INTERVAL``; then the tick polls
the job too, and once the job has moved on, the stream is let go: its reader stops, its room is
free, and it is not taken for a lost stream (no new one is opened for the job).

A stream that breaks is opened again (a few times): the job's age counts from its first stream,
or a stream that always broke just before the interval held the job's first poll back for
about three intervals.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.errors import RetryableProviderError
from jobs.states import JobState
from tests.hostile import HostileProvider, breaking_stream, stale_stream, wait_for
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for, wait_until
from worker.conductor import Conductor
from worker.fal.client import FalClient
from worker.fal.models import RequestHandle, Status
from worker.steps import dispatch, submit
from worker.watcher import StatusWatcher

KEY = "stale-streams-key-7c1e"
STREAM = r".*/requests/r1/status/stream"
STATUS = r".*/requests/r1/status"
#: How long a stream vouches for its job here (``WANBATCH_POLL_MAX_INTERVAL``).
VOUCHES = 0.5

KEEPALIVE = (b'data: {"status": "IN_QUEUE", "queue_position": 0}\n\n', b": ping\n\n", 0.1)
FLOOD = (b"", b'data: {"status": "IN_PROGRESS", "request_id": "zzz"}\n\n', 0.001)


@pytest.mark.parametrize("shape", [KEEPALIVE, FLOOD], ids=["keepalive", "flood"])
def test_a_stream_that_never_completes_is_polled_past_then_let_go(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, shape: tuple[bytes, bytes, float]
) -> None:
    FakeFal(hostile)  # /status answers COMPLETED
    hung_up = threading.Event()
    hostile.route("GET", STREAM, stale_stream(*shape, hung_up=hung_up))
    settings = settings_for(hostile.url, KEY, output_dir=tmp_path / "out", poll_max_interval=VOUCHES)
    rt = make_runtime(engine, settings)
    batch_id = add_batch(engine, "stale", [("fal-ai/wan-22", {"prompt": "fog", "resolution": "480p"})])
    (job,) = job_ids(engine, batch_id)
    assert dispatch(rt) == [job]
    assert submit(rt, job) == "submitted"
    conductor = Conductor(rt)
    stopping = threading.Event()
    try:
        opened = time.monotonic()
        conductor._watch({job})
        assert wait_for(lambda: hostile.count("GET", STREAM) == 1)
        watcher = conductor.watcher
        assert watcher is not None
        conductor._tick(stopping)
        if time.monotonic() - opened < VOUCHES:  # a young stream vouches for its job: no poll yet
            assert hostile.count("GET", STATUS) == 0

        def tick() -> None:
            conductor._tick(stopping)

        def state() -> JobState:
            with db.read_scope(engine) as session:
                return store.get_job(session, job).state

        wait_until(lambda: state() == JobState.DOWNLOADING, step=tick, timeout=10)
        assert hostile.count("GET", STATUS) == 1  # one poll, once the stream had vouched long enough
        # The next tick lets the stream go: its reader hangs up and frees its room.
        wait_until(
            lambda: hung_up.is_set() and not watcher.watching(),
            step=tick,
            timeout=10,
        )
        time.sleep(0.3)
        conductor._tick(stopping)
        assert hostile.count("GET", STREAM) == 1  # let go, not lost: no new stream for the job
        assert conductor._stream_failures == {}
    finally:
        conductor.close()
        rt.client.close()


#: How long a stream vouches for its job in the test of a stream that keeps breaking, and
#: after how long each of its streams breaks: just before that.
KEEPS_BREAKING_VOUCHES = 1.5
BREAKS_AFTER = 0.9


def test_a_stream_opened_again_vouches_only_as_long_as_the_first(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """Each stream breaks just before ``WANBATCH_POLL_MAX_INTERVAL`` and is opened again at once
    (as the conductor's next round does): the job is polled once its first stream has vouched
    that long, not an interval after its last stream (about three intervals, before)."""
    FakeFal(hostile)  # /status answers COMPLETED
    hostile.route("GET", STREAM, breaking_stream(KEEPALIVE[0], BREAKS_AFTER))
    settings = settings_for(
        hostile.url, KEY, output_dir=tmp_path / "out", poll_max_interval=KEEPS_BREAKING_VOUCHES
    )
    rt = make_runtime(engine, settings)
    batch_id = add_batch(engine, "breaking", [("fal-ai/wan-22", {"prompt": "fog", "resolution": "480p"})])
    (job,) = job_ids(engine, batch_id)
    assert dispatch(rt) == [job]
    assert submit(rt, job) == "submitted"
    conductor = Conductor(rt)
    stopping = threading.Event()

    def round_then_tick() -> None:
        _, lost, _ = conductor._take(0)  # a lost stream's job, to follow again (the loop's round)
        if lost:
            conductor._watch(lost)
        conductor._tick(stopping)

    watcher = conductor.watcher
    assert watcher is not None
    asked: list[float | None] = []  # when each stream's job counts from, as each was asked for
    watch = watcher.watch

    def watch_noting(job_id: str, handle: RequestHandle, batch_id: str | None = None) -> bool:
        followed = watch(job_id, handle, batch_id)
        asked.append(watcher._since.get(job_id))
        return followed

    watcher.watch = watch_noting  # type: ignore[method-assign]
    try:
        conductor._watch({job})
        wait_until(lambda: hostile.count("GET", STATUS) > 0, step=round_then_tick, timeout=15)
        assert hostile.count("GET", STREAM) == 2  # the first broke and was opened again
        # The poll found the job ended and let its stream go: its lost stream is counted no more.
        assert conductor._stream_failures == {}
        # The stream opened again counted from the first: it did not vouch for the job anew.
        assert len(asked) == 2
        assert asked[0] is not None
        assert asked[1] == asked[0]
    finally:
        conductor.close()
        rt.client.close()


class _BreakingStreams:
    """A client whose every status stream breaks when the test says (``opened``: one event per
    stream, set to break it)."""

    def __init__(self) -> None:
        self.opened: queue.SimpleQueue[threading.Event] = queue.SimpleQueue()
        #: Set when the test ends: every stream breaks at once, one opened later too, so no
        #: reading thread outlives the test (a later test counts the watcher's threads).
        self.closed = threading.Event()

    def stream_status(
        self, handle: RequestHandle, *, stop: object = None, states: object = None
    ) -> Iterator[Status]:
        breaks = threading.Event()
        self.opened.put(breaks)
        while not (breaks.is_set() or self.closed.is_set()):
            breaks.wait(0.05)
        raise RetryableProviderError("status stream broke")  # before any status


def test_the_watcher_keeps_a_lost_stream_s_first_time_until_told_to_forget() -> None:
    streams = _BreakingStreams()
    lost: queue.SimpleQueue[str] = queue.SimpleQueue()
    watcher = StatusWatcher(
        cast(FalClient, streams), lambda *_: None, lambda job_id, _: lost.put(job_id), max_streams=2
    )
    handle = RequestHandle.from_request_id("https://queue.test", "fal-ai/wan", "r-1")

    def lose_the_stream() -> None:
        streams.opened.get(timeout=10).set()
        assert lost.get(timeout=10) == "j"
        assert watcher.by_age(3600) == (frozenset(), frozenset())  # lost: neither young nor old

    try:
        assert watcher.watch("j", handle)
        first = time.monotonic()  # the first stream was asked for before this
        time.sleep(0.3)
        lose_the_stream()
        again = time.monotonic()  # the second is asked for after this
        assert watcher.watch("j", handle)
        # Older than the time since the second stream, younger than the time since the first.
        seconds = time.monotonic() - (first + again) / 2
        young, old = watcher.by_age(seconds)
        assert (young, old) == (frozenset(), frozenset({"j"}))  # as old as its first stream
        lose_the_stream()
        watcher.forget({"j"})  # not followed again: polled from now on
        assert watcher.watch("j", handle)
        assert watcher.by_age(seconds) == (frozenset({"j"}), frozenset())  # a first stream again
    finally:
        watcher.close()
        streams.closed.set()
