"""A status stream that stays open without ever saying its request ended holds nothing for good.

The conductor's poller used to leave every job a stream followed alone, and the watcher handed
a job back only when its stream broke: a stream of keep-alives, or of events that never reach
COMPLETED, kept its job ``queued`` forever while ``/status`` said COMPLETED (a hostile-provider
audit). Now a stream vouches for its job for ``WANBATCH_POLL_MAX_INTERVAL``; then the tick polls
the job too, and once the job has moved on, the stream is let go: its reader stops, its room is
free, and it is not taken for a lost stream (no new one is opened for the job).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.states import JobState
from tests.hostile import HostileProvider, stale_stream, wait_for
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for, wait_until
from worker.conductor import Conductor
from worker.steps import dispatch, submit

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
