"""Processes whose hosts' clocks disagree, or step, stamp and compare time on the database's clock.

Every lease, retry and heartbeat is written by one process and judged by others. Each process
read its own host's clock: on a shared PostgreSQL database a host 2 minutes ahead saw another
host's live leases as lapsed and took its in-flight submits over (paid twice); ``status`` on a
host 90 s ahead said a live batch had nothing processing it; and a backward step of the clock
(NTP correcting it by an hour) left a run's retries due an hour late. Here each "process" is this
one with its host clock shifted (:data:`jobs.clock.host_time`) and its measurement of the
database's clock taken again (:func:`as_host`), against the real PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from jobs import batches, clock, db, listing, store
from jobs.errors import DEADLINE_PASSED, ManifestError
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.conftest import _empty
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for
from worker.conductor import Conductor
from worker.steps.tick import tick

KEY = "clock-skew-key-5e1a"
URL = "https://queue.test"
T2V = "fal-ai/wan-22"
LEASE = 30.0
_REAL_TIME = time.time


@pytest.fixture(autouse=True)
def _own_clock() -> Iterator[None]:
    """Each test starts on this host's true clock, measured afresh, and leaves it so."""
    clock.reset()
    yield
    clock.host_time = _REAL_TIME
    clock.reset()


@pytest.fixture
def pg_engine(_pg_engine: Engine) -> Iterator[Engine]:
    """The ``engine`` fixture on PostgreSQL: the database two hosts share."""
    _empty(_pg_engine)
    yield _pg_engine
    _empty(_pg_engine)


def as_host(engine: Engine, skew: float) -> None:
    """Be a process on a host whose clock is ``skew`` seconds off: its clock shifted, and the
    database's clock measured from it (as a new process does on its first connection)."""
    clock.host_time = lambda: _REAL_TIME() + skew
    clock.reset()
    db.probe(engine)  # any statement: a connection handed out


def step_clock(by: float) -> None:
    """This host's clock steps ``by`` seconds (NTP), nothing measured again."""
    before = clock.host_time
    clock.host_time = lambda: before() + by


def _claimable(engine: Engine, batch_id: str, *, at: datetime, states: list[JobState]) -> list[str]:
    with db.session_scope(engine) as session:
        jobs = store.claim_jobs(
            session, states=states, limit=10, now=at, owner="reader", lease_seconds=LEASE, batch_id=batch_id
        )
        ids = [job.id for job in jobs]
        session.rollback()  # a look, not a claim
    return ids


@pytest.mark.parametrize(("writer", "reader"), [(120.0, 0.0), (0.0, 120.0), (-120.0, 0.0), (0.0, -120.0)])
def test_a_lease_lapses_when_its_holder_meant_whatever_either_host_clock_says(
    pg_engine: Engine, writer: float, reader: float
) -> None:
    """A lease written on one host is live for another host until ``lease_seconds`` after it was
    taken, not before (a live holder's submits taken over) and not much after (a dead one's
    jobs held two minutes more)."""
    batch_id = add_batch(pg_engine, "skewed-lease", [(T2V, {"prompt": "p"})])
    as_host(pg_engine, writer)
    with db.session_scope(pg_engine) as session:
        held = store.claim_jobs(
            session, states=[JobState.PENDING], limit=1, now=utcnow(), owner="writer", lease_seconds=LEASE
        )
    assert len(held) == 1

    as_host(pg_engine, reader)
    assert _claimable(pg_engine, batch_id, at=utcnow(), states=[JobState.PENDING]) == []
    later = utcnow() + timedelta(seconds=LEASE + 5)
    assert _claimable(pg_engine, batch_id, at=later, states=[JobState.PENDING]) == [held[0].id]


@pytest.mark.parametrize("skew", [90.0, -90.0])
def test_status_from_a_skewed_host_sees_a_live_batch_processed(pg_engine: Engine, skew: float) -> None:
    """A run beats for its batch on one host; ``status`` on a host ``skew`` s off says a process
    works on it, seen a moment ago (not "nothing is processing it", not seen in the future)."""
    batch_id = add_batch(pg_engine, "skewed-status", [(T2V, {"prompt": "p"})])
    as_host(pg_engine, 0.0)
    rt = make_runtime(pg_engine, settings_for(URL, KEY), batch_ids=frozenset({batch_id}))
    conductor = Conductor(rt, stream=False)
    try:
        conductor._beat()
        as_host(pg_engine, skew)
        with db.read_scope(pg_engine) as session:
            report = batches.batch_report(session, batch_id)
        now = utcnow()
        assert report["processing"] is True
        seen = datetime.fromisoformat(str(report["processed_at"]))
        assert timedelta(0) <= now - seen < timedelta(seconds=30), (now, seen)
    finally:
        conductor.close()


def test_a_backward_clock_step_does_not_hold_a_retry(engine: Engine) -> None:
    """A job waits 30 s for its retry when this host's clock steps back an hour: it is still due
    30 s after it was put to wait, on the clock the process reads after the step. Both dialects
    (SQLite's timeline is this host's clock; PostgreSQL's is the database's)."""
    batch_id = add_batch(engine, "stepped", [(T2V, {"prompt": "p"})])
    (job_id,) = job_ids(engine, batch_id)
    as_host(engine, 0.0)
    with db.session_scope(engine) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state=JobState.RETRY_WAIT, next_attempt_at=utcnow() + timedelta(seconds=30))
        )
    rt = make_runtime(engine, settings_for(URL, KEY), batch_ids=frozenset({batch_id}))
    tick(rt)  # the run is going
    step_clock(-3600.0)
    tick(rt)  # the run goes on after the step
    at = utcnow() + timedelta(seconds=31)
    assert _claimable(engine, batch_id, at=at, states=[JobState.RETRY_WAIT]) == [job_id]


def timeline_off(engine: Engine, skew: float) -> None:
    """The clock this process stamps with (:func:`utcnow`) ``skew`` seconds off the system clock
    (``datetime.now``): on SQLite this host's clock as wanbatch reads it (:data:`clock.host_time`)
    shifted; on PostgreSQL the database server's clock measured ``skew`` seconds off this host's."""
    clock.reset()
    if engine.dialect.name == "sqlite":
        clock.host_time = lambda: _REAL_TIME() + skew
        return
    moment = clock.steady()
    clock.take(_REAL_TIME() + skew, before=moment, after=moment, wall=_REAL_TIME(), say=False)
    clock.due_for_measurement()  # measured just now: the next connection does not ask again


@pytest.mark.parametrize("skew", [120.0, -120.0])
def test_a_fal_hold_is_stamped_on_the_database_s_clock(engine: Engine, skew: float) -> None:
    """Audit "clock-review": the "fal unreachable" hold's ``since`` and ``next_probe_at`` were
    stamped with the system clock, ``status`` judging them with the database's: with the database
    2 min behind, the first probe, 1 s away, was said to be 2 minutes away, and the hold began
    "in the future" (2 min ahead: a live hold looked stale and was not shown)."""
    batch_id = add_batch(engine, "held", [(T2V, {"prompt": "p"})])
    timeline_off(engine, skew)
    rt = make_runtime(engine, settings_for(URL, KEY), batch_ids=frozenset({batch_id}))
    rt.fal_reach.recorder = rt.record_fal_hold
    before = utcnow()
    left = rt.fal_reach.failed("could not connect (ConnectError)", probe=False)  # fal unreachable
    with db.read_scope(engine) as session:
        now = utcnow()
        holds = listing.fal_holds(session, batch_id, now=now)
    assert len(holds) == 1, "the live hold is shown"
    assert before <= holds[0].since <= now
    assert timedelta(0) <= holds[0].next_probe_at - before <= timedelta(seconds=left + 1)


def _deadline_manifest(tmp_path: Path, name: str, deadline: datetime) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nendpoint: {T2V}\nitems:\n  - prompt: p\n"
        f"schedule:\n  deadline: {deadline.isoformat(timespec='seconds')}\n",
        encoding="utf-8",
    )
    return path


def test_submit_judges_a_deadline_on_the_database_s_clock(
    pg_engine: Engine, pg_url: str, tmp_path: Path
) -> None:
    """A deadline is judged on the database's timeline, measured by ``submit`` before it stores
    anything: from a host 3 minutes behind the database, a deadline 1 minute ahead of that
    host's clock has passed (it was stored, and the first tick cancelled every job); from a host
    3 minutes ahead, a deadline 1 minute ahead of the database's clock has not."""
    settings = settings_for(URL, KEY, database_url=pg_url, output_dir=tmp_path / "outputs")
    real = _REAL_TIME()

    clock.host_time = lambda: _REAL_TIME() - 180.0
    clock.reset()
    behind = _deadline_manifest(tmp_path, "host-behind", datetime.fromtimestamp(real - 120.0, UTC))
    with pytest.raises(ManifestError) as refused:
        batches.submit_manifest(behind, settings)
    assert [i.code for i in refused.value.issues if i.severity == "error"] == [DEADLINE_PASSED]

    clock.host_time = lambda: _REAL_TIME() + 180.0
    clock.reset()
    ahead = _deadline_manifest(tmp_path, "host-ahead", datetime.fromtimestamp(real + 60.0, UTC))
    submitted = batches.submit_manifest(ahead, settings)
    assert (submitted.created, submitted.total) == (True, 1)
    assert not [w for w in submitted.warnings if "deadline" in w], submitted.warnings
