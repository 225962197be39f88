"""The submit step against a database whose disk is full, step by step (SQLite's own
``SQLITE_FULL``: :mod:`tests.full_disk`), and the journal a stopped process leaves.

* Nothing is sent while the disk is full: the lease that must precede a POST cannot be taken,
  and once a write was refused, a claimed job is not sent even where a write would fit.
* An id fal accepted is kept (in memory, and in a journal beside the database) for as long as
  the disk stays full — no give-up — and recorded once there is room: the job is followed,
  never declared "submission outcome unknown" (before: given up after twelve minutes, then
  failed, and paid again by `rerun --failed-only`).
* A journal left by a process that ended is recorded by the next one's reconcile, before the
  reconciler would settle those jobs as unknown; a journal of a job that moved on is dropped.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from falsim import SimulatorOptions, running_simulator
from falsim.server import SimulatorHandle
from jobs import db, store
from jobs.db import make_engine, migrate
from jobs.models import utcnow
from jobs.states import JobState
from tests.full_disk import FullDisk, prepare
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.steps import Runtime, dispatch, reconcile, submit
from worker.steps.reconcile import adopt_unrecorded
from worker.steps.unrecorded import PREFIX, SUFFIX, Accepted, database_key

S = JobState
T2V = "fal-ai/wan-22"
KEY = "disk-full-test-key"


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    engine = make_engine(sqlite_url)
    migrate(engine)
    prepare(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture
def disk(sqlite_engine: Engine) -> Iterator[FullDisk]:
    with FullDisk().attached(sqlite_engine, db.writer_engine(sqlite_engine)) as disk:
        yield disk


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    options = SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0, concurrency_limit=10)
    with running_simulator(options) as handle:
        yield handle


def _runtime(engine: Engine, sim: SimulatorHandle, sqlite_url: str, **overrides: float) -> Runtime:
    settings = settings_for(sim.url, KEY, database_url=sqlite_url, **{"lease_seconds": 60.0, **overrides})
    return make_runtime(engine, settings)


def _job(engine: Engine, job_id: str) -> tuple[S, str | None, int]:
    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
        return S(job.state), job.request_id, job.attempts


def _wait(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _journals(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{PREFIX}*{SUFFIX}"))


def test_nothing_is_sent_while_the_disk_is_full(
    sqlite_engine: Engine, sqlite_url: str, sim: SimulatorHandle, disk: FullDisk
) -> None:
    rt = _runtime(sqlite_engine, sim, sqlite_url)
    add_batch(sqlite_engine, "full", [(T2V, {"prompt": f"a lighthouse {i}"}) for i in range(2)])
    first, second = dispatch(rt)

    disk.full = True
    assert submit(rt, first) == "database-full"  # the lease before the POST was refused
    assert sim.ledger()["accepted"] == 0
    assert rt.unrecorded.full
    assert rt.unrecorded.note() == (
        f"database full: nothing is sent; free space on the disk of {Path(sqlite_url.removeprefix('sqlite:///')).parent}"
    )

    # Room for a write again, but nothing told this process so: still nothing is sent (an id fal
    # gave now might not be recordable); the job goes back to pending, due at once.
    disk.full = False
    assert submit(rt, second) == "database-full"
    assert sim.ledger()["accepted"] == 0
    assert _job(sqlite_engine, second) == (S.PENDING, None, 0)

    rt.unrecorded.writable()  # a write of this process worked (the conductor's next tick)
    again = dispatch(rt)
    assert second in again
    assert submit(rt, second) == "submitted"
    assert sim.ledger()["accepted"] == 1
    assert _job(sqlite_engine, first) == (S.SUBMITTING, None, 1)  # its lease runs out, then it is sent


def test_a_job_claimed_while_the_disk_was_full_is_given_back_as_soon_as_it_takes_writes(
    sqlite_engine: Engine, sqlite_url: str, sim: SimulatorHandle, disk: FullDisk
) -> None:
    """Before: the step's give-back, refused for the full disk, was never tried again: the job
    stayed `submitting` under this run's lease (60 s here) after space was freed, the progress
    line saying `~0:00:00 left · submitting:1`. It is given back as a database outage's is
    (:class:`worker.step_outage.GiveBack`), and the conductor told to dispatch it again."""
    from worker.embedded import InProcessWorker

    rt = _runtime(sqlite_engine, sim, sqlite_url)  # a lease of 60 s
    add_batch(sqlite_engine, "given-back", [(T2V, {"prompt": "a lighthouse at noon"})])
    (job_id,) = dispatch(rt)
    told: list[tuple[str, str]] = []
    rt.notify = lambda kind, job: told.append((kind, job))
    worker = InProcessWorker(1)
    worker.bind(rt)
    with worker:
        disk.full = True
        worker.submit(job_id)
        _wait("the step to meet the full disk", lambda: rt.unrecorded.full and not rt.unrecorded.busy())
        time.sleep(0.5)
        assert _job(sqlite_engine, job_id) == (S.SUBMITTING, None, 1)  # its give-back was refused too

        disk.full = False  # space is freed: well within the lease, the job goes back
        _wait("the job to be given back", lambda: _job(sqlite_engine, job_id)[0] == S.PENDING, timeout=10)
        _wait("the conductor to be told", lambda: ("freed", job_id) in told, timeout=5)
    assert sim.ledger()["accepted"] == 0  # nothing was sent meanwhile


def test_an_accepted_id_waits_for_room_for_as_long_as_it_takes_then_is_recorded(
    sqlite_engine: Engine, sqlite_url: str, sim: SimulatorHandle, disk: FullDisk, tmp_path: Path
) -> None:
    # The old patience (the lease plus the reconciler's deadline, a minute at the least) did
    # not wait for space; here the lease is short and the deadline 0.
    rt = _runtime(sqlite_engine, sim, sqlite_url, lease_seconds=0.5, submit_unknown_deadline=0.0)
    add_batch(sqlite_engine, "accepted", [(T2V, {"prompt": "a harbour at dawn"})])
    (job_id,) = dispatch(rt)
    sim.set_faults(submit_slow={"next": 1, "delay": 0.5})  # queued at once, answered 0.5 s later
    outcome: list[str] = []
    step = threading.Thread(target=lambda: outcome.append(submit(rt, job_id)), daemon=True)
    step.start()
    _wait("fal to accept the submit", lambda: sim.ledger()["accepted"] == 1)
    disk.full = True

    _wait("the accepted id to be kept aside", lambda: len(_journals(tmp_path)) == 1)
    (journal,) = _journals(tmp_path)
    (entry,) = [json.loads(line) for line in journal.read_text().splitlines()]
    (fal,) = sim.ledger()["entries"]
    assert (entry["job_id"], entry["attempt"], entry["request_id"]) == (job_id, 1, fal["request_id"])
    assert rt.unrecorded.busy()
    assert (rt.unrecorded.note() or "").startswith(
        "database full: 1 accepted submission(s) waiting to be recorded"
    )

    # The step holds the id, whatever the lease and the deadline: none is lost while the
    # process lives.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert step.is_alive()
        time.sleep(0.1)
    assert _job(sqlite_engine, job_id) == (S.SUBMITTING, None, 1)

    disk.full = False
    step.join(30)
    assert outcome == ["submitted"]
    assert _job(sqlite_engine, job_id) == (S.QUEUED, fal["request_id"], 1)
    assert _journals(tmp_path) == []
    assert not rt.unrecorded.full
    assert sim.ledger()["accepted"] == 1


def test_the_tick_after_space_returns_records_a_waiting_id_rather_than_call_it_unknown(
    sqlite_engine: Engine, sqlite_url: str, sim: SimulatorHandle, disk: FullDisk, tmp_path: Path
) -> None:
    """Space returns and the conductor's tick runs before the waiting step's next try: the job's
    lease ran out long ago, and the reconciler declared its outcome unknown (and, with no
    receiver, failed it at once) — the step then found the job moved on, and the request fal
    accepted and billed was orphaned. The tick records the id the process holds instead."""
    rt = _runtime(sqlite_engine, sim, sqlite_url, lease_seconds=0.5, submit_unknown_deadline=0.0)
    add_batch(sqlite_engine, "tick-first", [(T2V, {"prompt": "a harbour at dusk"})])
    (job_id,) = dispatch(rt)
    sim.set_faults(submit_slow={"next": 1, "delay": 0.5})
    outcome: list[str] = []
    step = threading.Thread(target=lambda: outcome.append(submit(rt, job_id)), daemon=True)
    step.start()
    _wait("fal to accept the submit", lambda: sim.ledger()["accepted"] == 1)
    disk.full = True
    _wait("the accepted id to be kept aside", lambda: len(_journals(tmp_path)) == 1)
    time.sleep(1.0)  # the lease (0.5 s) runs out while the disk is full
    (fal,) = sim.ledger()["entries"]

    disk.full = False
    rt.unrecorded.writable()
    reconcile(rt)  # the tick, before the step's next try (it waits a second between tries)
    assert _job(sqlite_engine, job_id) == (S.QUEUED, fal["request_id"], 1)
    step.join(30)
    assert outcome == ["submitted"]
    assert _job(sqlite_engine, job_id) == (S.QUEUED, fal["request_id"], 1)
    assert _journals(tmp_path) == []
    assert sim.ledger()["accepted"] == 1


def test_the_next_process_records_a_journal_left_behind(
    sqlite_engine: Engine,
    sqlite_url: str,
    sim: SimulatorHandle,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt = _runtime(sqlite_engine, sim, sqlite_url)
    add_batch(sqlite_engine, "left", [(T2V, {"prompt": f"a quiet bay {i}"}) for i in range(2)])
    sent, moved_on = dispatch(rt)
    # A process took the leases and sent both, then ended before the database took the answers.
    now = utcnow()
    with db.session_scope(sqlite_engine) as session:
        for job_id in (sent, moved_on):
            job = store.get_job(session, job_id)
            store.take_lease(
                session,
                rt.fence(job),
                now=now,
                lease_seconds=0.0,
                submitted_input=dict(job.input),
                sent_at=now,
            )
        store.fail_job(session, rt.fence(store.get_job(session, moved_on)), error="gone", error_type="test")
    kept = [
        Accepted(
            job_id=job_id,
            attempt=1,
            request_id=request_id,
            gateway_request_id=None,
            status_url=None,
            response_url=None,
            cancel_url=None,
            running=False,
            submitted_at=now,
        )
        for job_id, request_id in (
            (sent, "0b4f1c3e-5d6a-4b7c-8d9e-0f1a2b3c4d5e"),
            (moved_on, "1c5a2d4f-6e7b-4c8d-9e0f-1a2b3c4d5e6f"),
        )
    ]
    # Its pid no longer runs (a pid beyond any Linux pid_max); and one a user saved by hand.
    folder = tmp_path
    name = f"{PREFIX}{database_key(sqlite_url)}"
    (folder / f"{name}-99999999-1{SUFFIX}").write_text(kept[0].as_json() + "\n")
    (folder / f"{name}-saved{SUFFIX}").write_text(kept[1].as_json() + "\n")
    (folder / f"{PREFIX}{'0' * 16}-99999999-1{SUFFIX}").write_text(
        kept[0].as_json() + "\n"
    )  # another database's

    assert reconcile(rt) >= 1  # recorded before the expired lease could make it "unknown"
    assert _job(sqlite_engine, sent) == (S.QUEUED, kept[0].request_id, 1)
    assert _job(sqlite_engine, moved_on)[:2] == (S.FAILED, None)
    said = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "submit.adopt_too_late"]
    assert len(said) == 1
    assert kept[1].request_id in said[0]
    assert [p.name for p in _journals(folder)] == [f"{PREFIX}{'0' * 16}-99999999-1{SUFFIX}"]


def test_a_late_answer_is_settled_before_the_tick_goes_on_even_behind_a_slow_cancel(
    sqlite_engine: Engine,
    sqlite_url: str,
    sim: SimulatorHandle,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A journal's entry whose job moved on is a late answer: its file is removed and the
    entry settled (cancelled at fal, put on the job's history) — nothing else sends it. Settled
    on the cancels' thread behind a cancel sequence still under way (fal slow), the tick gave up
    waiting after 8 s and a ``run`` ending then lost it: accepted and billed at fal, neither
    cancelled nor recorded anywhere. It is settled before the tick goes on."""
    rt = _runtime(sqlite_engine, sim, sqlite_url)
    add_batch(sqlite_engine, "late-lane", [(T2V, {"prompt": "a quiet pier"})])
    (job_id,) = dispatch(rt)
    now = utcnow()
    with db.session_scope(sqlite_engine) as session:
        job = store.get_job(session, job_id)
        store.take_lease(
            session, rt.fence(job), now=now, lease_seconds=0.0, submitted_input=dict(job.input), sent_at=now
        )
        store.fail_job(session, rt.fence(store.get_job(session, job_id)), error="gone", error_type="test")
    late = Accepted(
        job_id=job_id,
        attempt=1,
        request_id="2d6b3e5a-7f8c-4d9e-8f0a-1b2c3d4e5f60",
        gateway_request_id=None,
        status_url=None,
        response_url=None,
        cancel_url=None,
        running=False,
        submitted_at=now,
    )
    journal = tmp_path / f"{PREFIX}{database_key(sqlite_url)}-99999999-1{SUFFIX}"
    journal.write_text(late.as_json() + "\n")

    with rt.cancel_lane:  # an earlier tick's cancels, left behind, still under way
        started = time.monotonic()
        assert adopt_unrecorded(rt) == 0
        took = time.monotonic() - started
        # Settled by now, whatever the lane: the journal is gone, so it must be on the history.
        said = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "submit.adopt_too_late"]
        assert len(said) == 1, said
        assert late.request_id in said[0]
        with db.read_scope(sqlite_engine) as session:
            history = [e.reason or "" for e in store.job_events(session, job_id)]
        assert any(late.request_id in reason for reason in history), history
    assert not journal.exists()
    assert took < 5, took  # never the cancels' wait (8 s) either


def test_an_id_recorded_late_is_said_recorded_only_once_the_commit_took_it(
    sqlite_engine: Engine,
    sqlite_url: str,
    sim: SimulatorHandle,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, "… recorded: kept in … while the database could not take it" was logged inside
    the transaction: when its commit then met the full disk, the line was false (and the same
    run later said the submission could not be recorded)."""
    from sqlalchemy.orm import Session

    rt = _runtime(sqlite_engine, sim, sqlite_url)
    add_batch(sqlite_engine, "late", [(T2V, {"prompt": "a quiet bay"})])
    (job_id,) = dispatch(rt)
    now = utcnow()
    with db.session_scope(sqlite_engine) as session:
        job = store.get_job(session, job_id)
        store.take_lease(
            session, rt.fence(job), now=now, lease_seconds=0.0, submitted_input=dict(job.input), sent_at=now
        )
    kept = Accepted(
        job_id=job_id,
        attempt=1,
        request_id="0b4f1c3e-5d6a-4b7c-8d9e-0f1a2b3c4d5e",
        gateway_request_id=None,
        status_url=None,
        response_url=None,
        cancel_url=None,
        running=False,
        submitted_at=now,
    )
    journal = tmp_path / f"{PREFIX}{database_key(sqlite_url)}-99999999-1{SUFFIX}"
    journal.write_text(kept.as_json() + "\n")

    real_commit = Session.commit
    full = db.disk_full_error(sqlite_url)

    def commit_on_a_full_disk(self: Session) -> None:
        raise full  # the commit's write (SQLite's WAL append) finds no room

    monkeypatch.setattr(Session, "commit", commit_on_a_full_disk)
    with pytest.raises(type(full)):
        adopt_unrecorded(rt)
    assert [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "submit.adopted"] == []
    assert _job(sqlite_engine, job_id)[1] is None
    assert journal.exists()

    monkeypatch.setattr(Session, "commit", real_commit)
    rt = _runtime(sqlite_engine, sim, sqlite_url)
    assert adopt_unrecorded(rt) == 1
    (said,) = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "submit.adopted"]
    assert said.endswith(f"recorded: kept in {journal} while the database could not take it")
    assert _job(sqlite_engine, job_id)[1] == kept.request_id
