"""A fal that accepts connections and never answers a status call (a black hole: a stalled
proxy, a half-dead network after a laptop resumes) must not freeze the conductor.

Seen (overnight audit, scenario J): with the simulator stopped by ``kill -STOP``, the conductor's
loop sat inside one status call after another — three tries of the connect and read timeouts per
job — for minutes: no progress line, no heartbeat (``status`` said "nothing is processing it"
and advised a second run), no dispatch, no window or deadline check. A poll's status calls now
run off the loop thread, concurrently, within one short deadline; unanswered, they are "not
known yet" (never a failure, never a try), and fal is reported unreachable.

Played by a loopback server that accepts submits and holds every status call open; both
dialects (the ``engine`` fixture).
"""

from __future__ import annotations

import importlib
import socket
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from jobs import batches, db, store
from jobs.models import ConductorHeartbeat
from jobs.states import JobState
from tests.hostile import HostileProvider, Recorded, json_reply, wait_for
from tests.hostile_fal import COMPLETED, FakeFal
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for
from worker import conductor as conductor_module
from worker.conductor import Conductor
from worker.steps import dispatch, submit

KEY = "blackhole-key-5e1a"
JOBS = 3
STATUS = r"/fal-ai/wan-22/requests/[^/]+/status"
#: The module (``worker.steps.poll`` names the function the package exports).
poll_module = importlib.import_module("worker.steps.poll")


@pytest.fixture
def released() -> Iterator[threading.Event]:
    """Set when the test lets the held status calls go (at its end in any case)."""
    event = threading.Event()
    yield event
    event.set()


def _seen_at(engine: Engine) -> list[datetime]:
    with db.read_scope(engine) as session:
        return list(session.scalars(select(ConductorHeartbeat.seen_at)))


def test_a_status_call_that_is_never_answered_leaves_the_conductor_beating_and_names_fal(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, released: threading.Event
) -> None:
    monkeypatch.setattr(poll_module, "STATUS_POLL_SECONDS", 1.0, raising=False)
    monkeypatch.setattr(conductor_module, "HEARTBEAT_SECONDS", 0.2)

    def never_answers(_req: Recorded, _sock: socket.socket) -> None:
        released.wait(120)  # the connection was accepted; no byte ever comes back

    with HostileProvider() as hostile:
        FakeFal(hostile)
        # The read timeout as a user has it (60 s): before, one tick waited 3 × 60 s per job.
        settings = settings_for(hostile.url, KEY, output_dir=tmp_path / "out", read_timeout=60.0)
        batch_id = add_batch(
            engine, "blackhole", [("fal-ai/wan-22", {"prompt": f"a fox {i}"}) for i in range(JOBS)]
        )
        rt = make_runtime(engine, settings, batch_ids=frozenset({batch_id}))
        ids = job_ids(engine, batch_id)
        assert sorted(dispatch(rt)) == sorted(ids)
        assert [submit(rt, job_id) for job_id in ids] == ["submitted"] * JOBS
        hostile.route("GET", STATUS, never_answers)

        conductor = Conductor(rt, stream=False)
        stopping = threading.Event()
        progress: list[str | None] = []

        def on_progress() -> bool:
            progress.append(rt.fal_reach.note())
            return False

        runner = threading.Thread(
            target=conductor.run,
            args=(stopping,),
            kwargs={"on_progress": on_progress, "progress_every": 0.1},
            daemon=True,
        )
        runner.start()
        try:
            # Every job's status call is held open (concurrently: all of them in one poll) ...
            assert wait_for(lambda: hostile.count("GET", STATUS) >= JOBS, timeout=30)
            beats = _seen_at(engine)
            calls = len(progress)
            # ... yet the loop goes on: progress lines, heartbeats, and fal named unreachable.
            assert wait_for(
                lambda: (
                    len(progress) >= calls + 3
                    and sorted(_seen_at(engine)) > sorted(beats)
                    and any(note and "fal unreachable" in note for note in progress)
                ),
                timeout=30,
            ), (progress[-3:], hostile.count("GET", STATUS))
            note = next(note for note in progress if note and "fal unreachable" in note)
            assert "status check(s) unanswered" in note
            with db.read_scope(engine) as session:
                report = batches.batch_report(session, batch_id)
                jobs = list(store.jobs_of_batch(session, batch_id))
            assert report["processing"] is True
            assert "fal unreachable from" in report["fal_unreachable_note"]
            assert "status check(s) unanswered" in report["fal_unreachable_note"]
            # Not known yet is no failure, and no try: the jobs still wait at fal, sent once.
            assert sorted((job.state, job.attempts) for job in jobs) == [(JobState.QUEUED, 1)] * JOBS

            # fal answers again: the next poll hears it, and the hold ends.
            hostile.route("GET", STATUS, json_reply(COMPLETED))
            released.set()
            assert wait_for(lambda: not rt.fal_reach.down, timeout=30)
            assert wait_for(lambda: _states(engine, batch_id) == {JobState.DOWNLOADING}, timeout=30)
        finally:
            stopping.set()
            released.set()
            runner.join(timeout=30)
            conductor.close()
            rt.client.close()
        assert not runner.is_alive()


def _states(engine: Engine, batch_id: str) -> set[str]:
    with db.read_scope(engine) as session:
        return {job.state for job in store.jobs_of_batch(session, batch_id)}
