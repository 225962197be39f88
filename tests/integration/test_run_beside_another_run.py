"""Two runs of one batch: each names the other and shows the batch's ETA, not a wait.

Two ``wanbatch run`` of the same batch (two terminals, one SQLite file, 2,000 jobs,
WANBATCH_MAX_OUTSTANDING=10) both showed, for the whole seven minutes, ``no ETA yet · waiting
for 5 job(s) leased to vm:11835:22240 (another process) until 01:59:13 UTC``: the "until" moved
forward as the other run renewed and took leases, and no ETA ever came, even at 1,900/2,000.
A holder whose heartbeat is fresh works on the batch too: the progress line now names it, and
gives the ETA of the batch's pace (both runs' work, as ``status`` does). A holder that beats
no more (stopped, killed on another host, hung) or that has ended is still waited for aloud,
with no ETA: that is a wait.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta

from sqlalchemy import Engine, update

from jobs import db, store
from jobs.batches import batch_progress, batch_report
from jobs.listing import PROCESSING_STALE_SECONDS
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for
from worker.conductor import Conductor
from worker.running import beside_note, leases_note
from worker.steps.dead_leases import DeadLeases

KEY = "beside-another-run-key"
WAN = ("fal-ai/wan-22", {"prompt": "a cat"})
OTHER = "elsewhere:11835:22240"  # another host's process: never taken for gone


def _batch(engine: Engine, *, now: datetime) -> tuple[str, list[str]]:
    """Ten jobs: four finished within the last minutes (a pace), one at fal, and the
    five others pending; returns the batch and the pending jobs."""
    batch_id = add_batch(engine, "two-runs", [WAN] * 10)
    ids = job_ids(engine, batch_id)
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id.in_(ids[:4]))
            .values(
                state=JobState.SUCCEEDED,
                attempts=1,
                submitted_at=now - timedelta(minutes=3),
                finished_at=now - timedelta(minutes=1),
            )
        )
        conn.execute(
            update(Job)
            .where(Job.id == ids[4])
            .values(
                state=JobState.QUEUED, attempts=1, request_id="r-4", submitted_at=now - timedelta(seconds=30)
            )
        )
    return batch_id, ids[5:]


def _lease(engine: Engine, job_ids: list[str], owner: str, *, until: datetime) -> None:
    """``job_ids`` claimed by ``owner`` (the other run), as its dispatch leaves them."""
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id.in_(job_ids))
            .values(state=JobState.SUBMITTING, lease_owner=owner, lease_expires_at=until)
        )


def _beat(engine: Engine, owner: str, batch_id: str, at: datetime) -> None:
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, owner, [batch_id], at)


def _conductor(engine: Engine, batch_id: str) -> Conductor:
    """This run of the batch, as ``run`` builds it (the leases of others looked at once)."""
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", KEY), batch_ids=frozenset({batch_id}))
    rt.dead_leases = DeadLeases(rt, batch_id)
    rt.dead_leases.take_back()
    return Conductor(rt, stream=False)


def test_another_run_working_the_batch_is_named_and_the_eta_shown(engine: Engine) -> None:
    now = utcnow()
    batch_id, pending = _batch(engine, now=now)
    # A live process of this host (as in the report: two terminals), with two threads.
    host, pid = socket.gethostname(), os.getppid()
    other = f"{host}:{pid}:22240"
    _lease(engine, pending[:3], other, until=now + timedelta(minutes=5))
    _lease(engine, pending[3:4], f"{host}:{pid}:22241", until=now + timedelta(minutes=5))
    _beat(engine, other, batch_id, now)  # it works on the batch: its heartbeat is fresh

    conductor = _conductor(engine, batch_id)
    # Not a wait: the run's progress line keeps its ETA (the `if leased:` that drops it sees "")...
    assert leases_note(conductor) == ""
    # ...and names the other process (one, whatever its threads), with the jobs it has in hand.
    assert beside_note(conductor) == (
        f"another process works on this batch too: {pid}@{host} (4 job(s) leased to it)"
    )
    with db.read_scope(engine) as session:
        current = batch_progress(session, batch_id, now=now)
        report = batch_report(session, batch_id, now=now)
    assert current["eta_seconds"] is not None  # the pace of both runs' work
    # status (and the dashboard, by the same forecast) give it too, naming no dead holder.
    assert report["eta_seconds"] == current["eta_seconds"]
    assert report["dead_lease_holders"] == []


def test_two_other_processes_are_counted_as_two(engine: Engine) -> None:
    now = utcnow()
    batch_id, pending = _batch(engine, now=now)
    _lease(engine, pending[:2], OTHER, until=now + timedelta(minutes=5))
    _lease(engine, pending[2:3], "box:77:1", until=now + timedelta(minutes=5))
    _beat(engine, OTHER, batch_id, now)
    _beat(engine, "box:77:1", batch_id, now)
    conductor = _conductor(engine, batch_id)
    assert leases_note(conductor) == ""
    assert beside_note(conductor) == (
        "2 other processes work on this batch too: 77@box and 1 other(s) (3 job(s) leased to them)"
    )


def test_a_holder_that_beats_no_more_is_still_waited_for_aloud(engine: Engine) -> None:
    """Stopped, hung, or killed on another host: its heartbeat went stale, so its leases are a
    wait (whose, until when), and the run shows no ETA meanwhile."""
    now = utcnow()
    batch_id, pending = _batch(engine, now=now)
    until = now + timedelta(minutes=5)
    _lease(engine, pending[:2], OTHER, until=until)
    _beat(engine, OTHER, batch_id, now - timedelta(seconds=PROCESSING_STALE_SECONDS + 5))
    conductor = _conductor(engine, batch_id)
    assert leases_note(conductor).startswith(
        f"waiting for 2 job(s) leased to {OTHER} (another process) until "
    )
    assert beside_note(conductor) == ""


def test_a_holder_that_never_beat_is_still_waited_for_aloud(engine: Engine) -> None:
    now = utcnow()
    batch_id, pending = _batch(engine, now=now)
    _lease(engine, pending[:1], OTHER, until=now + timedelta(minutes=5))
    conductor = _conductor(engine, batch_id)
    assert leases_note(conductor).startswith(
        f"waiting for 1 job(s) leased to {OTHER} (another process) until "
    )
    assert beside_note(conductor) == ""
