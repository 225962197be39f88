"""A job held back because fal could not be reached waits no longer than the hold that held it.

The gap (auditor's finding): a ``run`` stopped while fal was unreachable left its last probe's
job ``pending`` with ``error_type='fal_unreachable'`` and ``next_attempt_at`` up to a minute
ahead — the process's probe backoff, stored on the job row, where it outlived the process (and
its hold: ``fal_holds`` was empty). The next ``run``, whose fal answered, sent the other jobs at
once and that one a minute later, the progress line saying only ``pending:1``. The backoff is
the process's; when its hold ends (fal answers it, or it stops cleanly), and when a new process
first hears fal answer, the jobs such a backoff holds are due at once — unless a live hold of
another process (another host's worker, another run of the batch) still covers their batch.

Driven through the real submit step against a closed loopback port; the database is real
(SQLite and PostgreSQL). Asserted on ``next_attempt_at`` and on what dispatch claims, never on
wall-clock timing.
"""

from __future__ import annotations

import importlib
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select, update

from jobs import db, store
from jobs.listing import FAL_HOLD_STALE_SECONDS
from jobs.models import EVERY_BATCH, FAL_UNREACHABLE, FalHold, Job, utcnow
from jobs.processes import process_prefix
from tests.hostile import HostileProvider
from tests.hostile_fal import accept_submits
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.runtime import close_runtime
from worker.steps import Runtime, dispatch, submit
from worker.steps.fal_reach import LONGEST_PAUSE_SECONDS, FalReach

KEY = "fal-wait-key-4b1e"
RID = "8e2f4a6c-0b1d-4e3f-9a5c-7d6e5f4a3b2c"
T2V = "fal-ai/wan-22"


def _held_long(rt: Runtime) -> None:
    """``rt``'s hold on fal grown to half its longest pause, its next probe free to go now: the
    probe that fails next makes its job due a minute ahead (the backoff the audit found)."""
    at = [0.0]
    reach = FalReach(clock=lambda: at[0])
    reach.recorder = rt.record_fal_hold
    rt.fal_reach = reach
    reach.failed("could not connect (ConnectError): [Errno 111] Connection refused", probe=False)
    while reach.pause < LONGEST_PAUSE_SECONDS / 2:
        at[0] += reach.pause
        assert reach.admit() == (0.0, True)
        reach.failed("could not connect (ConnectError): [Errno 111] Connection refused", probe=True)
    at[0] += reach.pause  # the next submit goes as the probe


def _waits(engine: Engine, job_id: str) -> float:
    """Seconds until ``job_id`` is due (≤ 0: due now)."""
    with db.read_scope(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.next_attempt_at is not None
        return (job.next_attempt_at - utcnow()).total_seconds()


def _error(engine: Engine, job_id: str) -> tuple[str | None, str | None]:
    """``job_id``'s ``error`` and ``error_type``."""
    with db.read_scope(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.error, job.error_type


def _dead_owner() -> str:
    """The hold owner (``host:pid:``) of a process of this host that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:"


def test_a_run_stopped_while_fal_was_unreachable_leaves_its_probe_job_due_for_the_next_run(
    engine: Engine, hostile: HostileProvider
) -> None:
    port = hostile.port
    hostile.close()  # nothing listens there any more: every connect is refused
    batch_id = add_batch(engine, "unreach", [(T2V, {"prompt": "a"})])
    run = make_runtime(engine, settings_for(f"http://127.0.0.1:{port}", KEY), batch_ids=frozenset({batch_id}))
    try:
        _held_long(run)
        (job_id,) = dispatch(run)
        assert submit(run, job_id) == "fal-unreachable"
        assert _waits(engine, job_id) > LONGEST_PAUSE_SECONDS / 2  # the probe's backoff, as found
    finally:
        close_runtime(run)  # the run stops cleanly (Ctrl-C, a timeout's SIGTERM)

    assert _waits(engine, job_id) <= 0  # the backoff ended with the process that held it
    with HostileProvider() as fal:
        accept_submits(fal, RID, T2V)
        again = make_runtime(engine, settings_for(fal.url, KEY), batch_ids=frozenset({batch_id}))
        try:
            assert dispatch(again) == [job_id]  # sent at once, not a minute later
            assert submit(again, job_id) == "submitted"
        finally:
            close_runtime(again)
    assert _error(engine, job_id) == (None, None)  # sent: the outage is no error of it now


def test_a_worker_that_stops_frees_the_jobs_it_held_but_not_those_a_live_hold_elsewhere_holds(
    engine: Engine, hostile: HostileProvider
) -> None:
    """A distributed worker's hold covers every batch; its jobs (the probe's, and one it held
    back unsent) are due at once when it stops. A job of a batch that a live process on another
    host holds too (its run of that batch cannot reach fal either) keeps waiting for that hold."""
    port = hostile.port
    hostile.close()
    mine = add_batch(engine, "unreach-mine", [(T2V, {"prompt": "a"}), (T2V, {"prompt": "b"})])
    theirs = add_batch(engine, "unreach-theirs", [(T2V, {"prompt": "c"})])
    settings = settings_for(f"http://127.0.0.1:{port}", KEY)
    leader, worker = make_runtime(engine, settings), make_runtime(engine, settings)
    now = utcnow()
    with db.session_scope(engine) as session:  # another host's run of ``theirs``, holding now
        store.hold_fal(
            session,
            "worker-9:4242:",
            [theirs],
            since=now,
            next_probe_at=now,
            pause_seconds=LONGEST_PAUSE_SECONDS,
            error="could not connect (ConnectError): [Errno 111] Connection refused",
            now=now,
        )
    try:
        _held_long(worker)
        claimed = set(dispatch(leader))
        probe, held = sorted(claimed & _jobs_of(engine, mine))
        (other,) = claimed & _jobs_of(engine, theirs)
        assert submit(worker, probe) == "fal-unreachable"  # the probe: it cannot connect
        assert submit(worker, held) == "fal-unreachable"  # held back unsent
        assert submit(worker, other) == "fal-unreachable"
        assert min(_waits(engine, j) for j in (probe, held, other)) > LONGEST_PAUSE_SECONDS / 2
        error, error_type = _error(engine, held)  # what status and export say of it meanwhile
        assert error_type == FAL_UNREACHABLE
        assert error is not None
        assert error.startswith("held back: fal unreachable since ")
    finally:
        close_runtime(worker)
        close_runtime(leader)

    assert _waits(engine, probe) <= 0
    assert _waits(engine, held) <= 0
    assert _waits(engine, other) > LONGEST_PAUSE_SECONDS / 2  # worker-9's hold still holds it


def test_a_new_process_that_hears_fal_answer_frees_the_job_a_dead_process_held(
    engine: Engine, hostile: HostileProvider
) -> None:
    """A process that died holding (``kill -9``) never ended its hold: its row is left under a
    pid of this host that no longer runs. The first answer fal gives the next process frees the
    job that process's backoff held."""
    port = hostile.port
    hostile.close()
    batch_id = add_batch(engine, "unreach-dead", [(T2V, {"prompt": "a"}), (T2V, {"prompt": "b"})])
    dead = make_runtime(
        engine, settings_for(f"http://127.0.0.1:{port}", KEY), batch_ids=frozenset({batch_id})
    )
    try:
        _held_long(dead)
        (stranded,) = dispatch(dead)  # held: only the probe is claimed
        assert submit(dead, stranded) == "fal-unreachable"
        dead.fal_reach.recorder = None  # it dies: nothing more is recorded, its hold never ended
    finally:
        close_runtime(dead)
    with db.session_scope(engine) as session:
        session.execute(update(FalHold).where(FalHold.owner == process_prefix()).values(owner=_dead_owner()))
    assert _waits(engine, stranded) > LONGEST_PAUSE_SECONDS / 2

    with HostileProvider() as fal:
        accept_submits(fal, RID, T2V)
        again = make_runtime(engine, settings_for(fal.url, KEY), batch_ids=frozenset({batch_id}))
        try:
            (first,) = dispatch(again)  # the other job, due all along
            assert first != stranded
            assert submit(again, first) == "submitted"  # fal answers this process
            assert dispatch(again) == [stranded]
        finally:
            close_runtime(again)


def _jobs_of(engine: Engine, batch_id: str) -> set[str]:
    """The ids of ``batch_id``'s jobs."""
    with db.read_scope(engine) as session:
        return set(session.scalars(select(Job.id).where(Job.batch_id == batch_id)))


def _held_back(engine: Engine, job_id: str, seconds: float) -> None:
    """``job_id`` as a process holding fal gives it back: ``pending``, due ``seconds`` ahead."""
    with db.session_scope(engine) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state="pending",
                error="held back: fal unreachable",
                error_type=FAL_UNREACHABLE,
                next_attempt_at=utcnow() + timedelta(seconds=seconds),
            )
        )


def test_a_live_worker_hold_keeps_every_batch_waiting_but_a_simulated_one(engine: Engine) -> None:
    """A live distributed worker's hold (scope ``*``) covers every batch that worker may send —
    every one but a ``--simulate`` one, which only its own run sends. Was: the check whether a
    job's batch is simulated did not look at that job's batch but at any batch's, so that one
    simulated batch anywhere in the database made a live worker's hold cover nothing, and the
    jobs it held were freed while it still could not reach fal."""
    real = add_batch(engine, "unreach-real", [(T2V, {"prompt": "a"})])
    rehearsal = add_batch(engine, "unreach-rehearsal", [(T2V, {"prompt": "b"})], simulated=True)
    (held,), (simulated,) = _jobs_of(engine, real), _jobs_of(engine, rehearsal)
    for job_id in (held, simulated):
        _held_back(engine, job_id, LONGEST_PAUSE_SECONDS / 2)
    now = utcnow()
    with db.session_scope(engine) as session:  # another host's worker, holding now
        store.hold_fal(
            session,
            "worker-9:4242:",
            [EVERY_BATCH],
            since=now,
            next_probe_at=now,
            pause_seconds=LONGEST_PAUSE_SECONDS,
            error="could not connect (ConnectError): [Errno 111] Connection refused",
            now=now,
        )
    with db.session_scope(engine) as session:
        freed = store.end_fal_waits(
            session,
            None,
            now=utcnow(),
            longest=timedelta(seconds=LONGEST_PAUSE_SECONDS),
            live_since=now - timedelta(seconds=FAL_HOLD_STALE_SECONDS),
        )
    assert freed == 1
    assert _waits(engine, simulated) <= 0
    assert _waits(engine, held) > LONGEST_PAUSE_SECONDS / 4  # the worker still holds it


def test_the_holds_words_leave_the_job_when_the_hold_ends(
    engine: Engine, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job given back while fal was unreachable carries the hold's words (``error`` "held back:
    fal unreachable …"). They stayed once the hold ended, until the job was sent: the give-back
    that often comes next (the submit rate, busy as every held job is due at once) names no error
    of its own, and ``status`` went on saying fal was unreachable. They go with the hold, from a
    job made due and from one already due alike; a live hold elsewhere keeps its job's."""
    port = hostile.port
    hostile.close()
    batch_id = add_batch(engine, "unreach-words", [(T2V, {"prompt": "a"}), (T2V, {"prompt": "b"})])
    run = make_runtime(engine, settings_for(f"http://127.0.0.1:{port}", KEY), batch_ids=frozenset({batch_id}))
    try:
        _held_long(run)
        (job_id,) = dispatch(run)  # only the probe is claimed
        assert submit(run, job_id) == "fal-unreachable"
        assert _error(engine, job_id)[1] == FAL_UNREACHABLE
        (due,) = _jobs_of(engine, batch_id) - {job_id}
        _held_back(engine, due, -1)  # given back by the hold earlier, due already
    finally:
        close_runtime(run)  # the hold ends
    assert _error(engine, job_id) == (None, None)
    assert _error(engine, due) == (None, None)

    submit_step = importlib.import_module("worker.steps.submit")
    busy = ("held back by the submit rate for 5.00s", 5.0)
    monkeypatch.setattr(submit_step, "_take_submit_token", lambda _rt, _endpoint: busy)
    with HostileProvider() as fal:
        accept_submits(fal, RID, T2V)
        again = make_runtime(engine, settings_for(fal.url, KEY), batch_ids=frozenset({batch_id}))
        try:
            assert sorted(dispatch(again)) == sorted([job_id, due])
            assert [submit(again, j) for j in (job_id, due)] == ["rate-limited"] * 2
        finally:
            close_runtime(again)
    assert _error(engine, job_id) == (None, None)  # what status says of it: no stale outage

    other = add_batch(engine, "unreach-words-theirs", [(T2V, {"prompt": "c"})])
    (theirs,) = _jobs_of(engine, other)
    _held_back(engine, theirs, -1)
    now = utcnow()
    with db.session_scope(engine) as session:  # another host's run of it, holding now
        store.hold_fal(
            session,
            "worker-9:4242:",
            [other],
            since=now,
            next_probe_at=now,
            pause_seconds=LONGEST_PAUSE_SECONDS,
            error="could not connect (ConnectError): [Errno 111] Connection refused",
            now=now,
        )
        store.end_fal_waits(
            session,
            None,
            now=now,
            longest=timedelta(seconds=LONGEST_PAUSE_SECONDS),
            live_since=now - timedelta(seconds=FAL_HOLD_STALE_SECONDS),
        )
    assert _error(engine, theirs) == ("held back: fal unreachable", FAL_UNREACHABLE)
