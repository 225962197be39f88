"""Simulated and paid batches never mix, on both databases.

A batch made by ``run --simulate`` sends its requests to the simulator of that run. Before,
nothing told it from a batch sent to fal: the distributed workers would send its pending jobs to
fal (billed), a ``--simulate`` run of a paid batch's manifest would give that batch simulated
videos, and after the README's ``run --simulate``, "drop ``--simulate``" found the simulated
batch done and sent nothing to fal. Here: the names a simulation and a paid batch take, that a
round serving every batch (a worker) never sends a simulation, and that the workers' heartbeat
does not count as processing one.
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from jobs import db, store
from jobs.models import EVERY_BATCH, Batch, BatchState, utcnow
from jobs.settings import Settings
from jobs.states import JobState
from tests.sample_inputs import INPUTS
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for
from worker.steps import Runtime, dispatch

WAN = ("fal-ai/wan-22", INPUTS["fal-ai/wan-22"])


def _runtime(engine: Engine, sent: list[str], batch_ids: frozenset[str] | None) -> Runtime:
    config = Settings(submit_rate=1000, max_outstanding=20)
    return make_runtime(engine, config, enqueue_submit=sent.append, batch_ids=batch_ids)


def _batch(engine: Engine, name: str, n: int, **kw: Any) -> str:
    jobs = [("fal-ai/wan-22", {"prompt": f"{name} {i}"}) for i in range(n)]
    return add_batch(engine, name, jobs, est_billing_units=Decimal(1), est_usd=Decimal("0.1"), **kw)


def _pending(engine: Engine, batch_id: str) -> int:
    with db.session_scope(engine) as session:
        return store.counts_by_state(session, batch_id)["pending"]


def test_a_worker_round_never_sends_a_simulation(engine: Engine) -> None:
    simulated = _batch(engine, "sim", 3, simulated=True)
    paid = _batch(engine, "paid", 3)
    sent: list[str] = []
    assert len(dispatch(_runtime(engine, sent, None))) == 3  # a worker: every batch but the simulation
    assert (_pending(engine, simulated), _pending(engine, paid)) == (3, 0)

    # The --simulate run that processes it by name sends it (to its own simulator).
    sent.clear()
    assert len(dispatch(_runtime(engine, sent, frozenset({simulated})))) == 3
    assert _pending(engine, simulated) == 0


def test_a_simulation_finished_drops_out_of_the_rounds(engine: Engine) -> None:
    """Like a finished scheduled batch, a simulation with no work left is not read each round."""
    done = _batch(engine, "sim-done", 1, simulated=True)
    waiting = _batch(engine, "sim-waiting", 1, simulated=True)
    with db.session_scope(engine) as session:
        cancelled = store.cancel_unsent_jobs(
            session, [done], reason="t", error="t", error_type="cancelled", worker="t"
        )
        assert cancelled == 1
        ids = {b.id for b in store.dispatch_batches(session)}
        assert ids == {waiting}
        assert store.scheduled_batches(session) == []  # the schedule enforcer has no use for them


def _create(
    session: Session, name: str, *, simulated: bool = False, parent: Batch | None = None
) -> tuple[Batch, bool]:
    return store.get_or_create_batch(
        session,
        name=name,
        manifest_path="m",
        manifest_sha256="0" * 64,
        budget_max_usd=None,
        simulated=simulated,
        parent_batch_id=None if parent is None else parent.id,
    )


def test_names_keep_simulations_apart_from_paid_batches(engine: Engine) -> None:
    with db.session_scope(engine) as session:
        # Nothing holds the name: either kind takes it.
        assert store.name_for_batch(session, "clip", simulated=True) == ("clip", [])
        sim, _ = _create(session, "clip", simulated=True)
        # A second --simulate run finds the same simulation.
        assert store.name_for_batch(session, "clip", simulated=True) == ("clip", [])
        # The batch for fal takes the name back; the simulation is renamed aside.
        moved = store.name_for_batch(session, "clip", simulated=False)
        assert moved == ("clip", [("clip", "clip-simulated")])
        assert sim.name == "clip-simulated"
        paid, created = _create(session, "clip")
        assert created
        assert not paid.simulated
        # From now on a --simulate run of the manifest resumes the renamed simulation ...
        assert store.name_for_batch(session, "clip", simulated=True) == ("clip-simulated", [])
        # ... and the paid batch keeps its name.
        assert store.name_for_batch(session, "clip", simulated=False) == ("clip", [])


def test_a_simulation_moved_aside_takes_its_simulated_reruns_along(engine: Engine) -> None:
    """Left behind, a rehearsal's ``clip-rerun-1`` read as a rerun of the paid ``clip`` (``diff``
    compared fal's videos with the simulator's), and the paid batch's first rerun was numbered
    after the rehearsal's (``clip-rerun-3`` here)."""
    with db.session_scope(engine) as session:
        sim, _ = _create(session, "clip", simulated=True)
        first, _ = _create(session, "clip-rerun-1", simulated=True, parent=sim)
        nested, _ = _create(session, "clip-rerun-1-rerun-1", simulated=True, parent=first)
        paid_rerun, _ = _create(session, "clip-rerun-2", parent=sim)  # `rerun clip` without --simulate
        unrelated, _ = _create(session, "clip-rerun-1-mine", simulated=True)  # no rerun of clip's

        name, moved = store.name_for_batch(session, "clip", simulated=False)

        assert name == "clip"
        assert moved == [
            ("clip", "clip-simulated"),
            ("clip-rerun-1", "clip-simulated-rerun-1"),
            ("clip-rerun-1-rerun-1", "clip-simulated-rerun-1-rerun-1"),
        ]
        assert (sim.name, first.name, nested.name) == (
            "clip-simulated",
            "clip-simulated-rerun-1",
            "clip-simulated-rerun-1-rerun-1",
        )
        assert paid_rerun.name == "clip-rerun-2"  # fal's videos: never called -simulated
        assert unrelated.name == "clip-rerun-1-mine"
        assert not store.batch_name_taken(session, "clip-rerun-1")  # the paid clip's first rerun's


def test_a_simulated_rerun_whose_new_name_is_taken_keeps_its_own(engine: Engine) -> None:
    with db.session_scope(engine) as session:
        sim, _ = _create(session, "clip", simulated=True)
        first, _ = _create(session, "clip-rerun-1", simulated=True, parent=sim)
        _create(session, "clip-simulated-rerun-1")  # a manifest of that very name, sent to fal

        moved = store.name_for_batch(session, "clip", simulated=False)
        assert moved == ("clip", [("clip", "clip-simulated")])
        assert first.name == "clip-rerun-1"


def test_a_paid_batch_holding_the_simulated_name_is_skipped(engine: Engine) -> None:
    """A manifest literally named ``clip-simulated``, sent to fal, is never taken for a simulation."""
    with db.session_scope(engine) as session:
        for name in ("clip", "clip-simulated"):
            _create(session, name)
        assert store.name_for_batch(session, "clip", simulated=True) == ("clip-simulated-2", [])
        sim, _ = _create(session, "clip-simulated-2", simulated=True)
        assert store.name_for_batch(session, "clip", simulated=True) == ("clip-simulated-2", [])
        assert sim.simulated


def test_the_workers_heartbeat_does_not_cover_a_simulation(engine: Engine) -> None:
    simulated = _batch(engine, "sim", 1, simulated=True)
    paid = _batch(engine, "paid", 1)
    now = utcnow()
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "worker@host", [EVERY_BATCH], now)
        beats = store.last_heartbeats(session, [simulated, paid])
        assert set(beats) == {paid}
        store.record_heartbeat(session, "run@host", [simulated], now + timedelta(seconds=1))
        assert store.last_heartbeat(session, simulated) == now + timedelta(seconds=1)


def _move(engine: Engine, job_id: str, *path: JobState, **fields: Any) -> None:
    with db.session_scope(engine) as session:
        for here, there in itertools.pairwise(path):
            assert store.transition(session, job_id, here, there, **(fields if there == path[-1] else {}))


def test_a_simulations_money_never_counts_toward_the_daily_budget(engine: Engine) -> None:
    """The simulator bills nothing: a rehearsal of $7.50 must not leave today's real cap spent."""
    settings = settings_for(
        "http://127.0.0.1:9", "budget-key", max_outstanding=50, daily_budget_usd=Decimal("1.50")
    )
    rehearsal = add_batch(engine, "rehearsal", [WAN] * 10, est_usd=Decimal("0.25"), simulated=True)
    finished = job_ids(engine, rehearsal)[0]
    now = utcnow()
    S = JobState
    _move(engine, finished, S.PENDING, S.SUBMITTING, S.QUEUED, request_id="r-0", submitted_at=now)
    _move(engine, finished, S.QUEUED, S.DOWNLOADING, S.SUCCEEDED, actual_usd=Decimal("5.00"))
    # The --simulate run of the rehearsal: the day's cap does not hold it back either.
    assert len(dispatch(make_runtime(engine, settings, batch_ids=frozenset({rehearsal})))) == 9

    paid = add_batch(engine, "paid", [WAN] * 7, est_usd=Decimal("0.25"))
    assert len(dispatch(make_runtime(engine, settings, batch_ids=frozenset({paid})))) == 6  # $1.50 of $1.50
    with db.session_scope(engine) as session:
        refused = [j.error for j in store.jobs_of_batch(session, paid) if j.state == S.CANCELLED]
        assert refused == [
            "budget: submitting would commit $1.75 of today's $1.50 cap (WANBATCH_DAILY_BUDGET_USD)"
        ]
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        assert store.committed_usd_today(session, now) == Decimal("1.50")
        assert store.committed_usd_since(session, midnight) == Decimal("1.50")


def _at_provider(engine: Engine, batch_id: str) -> dict[JobState, str]:
    """The batch's four jobs left where a stopped run leaves them, as its provider holds them:
    ``queued``, ``downloading`` and ``submit_unknown`` with a request id, and ``submitting``
    with its lease run out. Returns job id by state."""
    S = JobState
    past = utcnow() - timedelta(hours=1)
    ids = job_ids(engine, batch_id)
    # One request id per job: two jobs never hold one request (store.RequestHeldError).
    _move(
        engine, ids[0], S.PENDING, S.SUBMITTING, S.QUEUED, request_id=f"r-{batch_id[:8]}-0", submitted_at=past
    )
    _move(
        engine,
        ids[1],
        S.PENDING,
        S.SUBMITTING,
        S.QUEUED,
        S.DOWNLOADING,
        request_id=f"r-{batch_id[:8]}-1",
        submitted_at=past,
    )
    _move(engine, ids[2], S.PENDING, S.SUBMITTING, S.SUBMIT_UNKNOWN, submitted_input={"prompt": "x"})
    _move(
        engine,
        ids[3],
        S.PENDING,
        S.SUBMITTING,
        submitted_input={"prompt": "x"},
        lease_owner="gone",
        lease_expires_at=past,
    )
    return {S.QUEUED: ids[0], S.DOWNLOADING: ids[1], S.SUBMIT_UNKNOWN: ids[2], S.SUBMITTING: ids[3]}


def _states(engine: Engine, batch_id: str) -> dict[str, JobState]:
    with db.session_scope(engine) as session:
        return {j.id: j.state for j in store.jobs_of_batch(session, batch_id)}


@pytest.mark.parametrize("runtime", ["worker", "simulate"])
def test_a_runtime_leaves_the_other_providers_requests_alone(engine: Engine, runtime: str) -> None:
    """A worker (fal's runtime, every batch) never touches a simulation's requests, and a
    ``--simulate`` run (its simulator's, its own batch) never a paid batch's: no status call,
    no cancel, no download, no settling of an unknown submit. Before, each asked its own
    provider about the other's requests, heard 404 and ended them "lost" — a paid one while fal
    still ran and billed it."""
    from worker.steps import cancel_jobs_of_cancelled_batches, poll, reconcile, schedule_downloads

    settings = settings_for("http://127.0.0.1:9", "key", submit_unknown_policy="fail")
    simulation = _batch(engine, "sim", 4, simulated=True)
    paid = _batch(engine, "paid", 4)
    if runtime == "worker":
        rt, theirs = make_runtime(engine, settings), simulation
    else:
        rt, theirs = make_runtime(engine, settings, batch_ids=frozenset({simulation})), paid
        rt.simulated = True
    _at_provider(engine, theirs)
    with db.session_scope(engine) as session:
        store.set_batch_state(session, theirs, BatchState.CANCELLED, "cancelled by user")
        assert not rt.reach(session).covers(theirs)
    before = _states(engine, theirs)

    assert poll(rt) == 0  # not one status call
    assert reconcile(rt) == 0
    assert cancel_jobs_of_cancelled_batches(rt) == 0
    assert schedule_downloads(rt) == []
    assert _states(engine, theirs) == before


class _Watcher:
    """Stands in for the status watcher: records what the conductor asks it to follow."""

    def __init__(self) -> None:
        self.followed: list[str] = []
        self.forgotten: set[str] = set()

    def watching(self) -> frozenset[str]:
        return frozenset(self.followed)

    def room(self) -> int:
        return 64

    def watch(self, job_id: str, _handle: object, _batch_id: str | None = None) -> bool:
        self.followed.append(job_id)
        return True

    def forget(self, job_ids: set[str]) -> None:
        self.forgotten |= job_ids


@pytest.mark.parametrize("runtime", ["worker", "simulate"])
def test_a_conductor_follows_only_its_own_providers_requests(engine: Engine, runtime: str) -> None:
    """On PostgreSQL a `--simulate` run and the workers hear of each other's submits (LISTEN):
    neither opens a status stream for the other's request, at its own provider."""
    from worker.conductor import Conductor

    settings = settings_for("http://127.0.0.1:9", "key")
    simulation = _batch(engine, "sim", 4, simulated=True)
    paid = _batch(engine, "paid", 4)
    queued = {batch_id: _at_provider(engine, batch_id)[JobState.QUEUED] for batch_id in (simulation, paid)}
    if runtime == "worker":
        rt, ours = make_runtime(engine, settings), paid
    else:
        rt, ours = make_runtime(engine, settings, batch_ids=frozenset({simulation})), simulation
        rt.simulated = True
    conductor = Conductor(rt)
    watcher = _Watcher()
    conductor.watcher = watcher  # type: ignore[assignment]

    conductor._watch(set(queued.values()))  # heard of both submits
    assert watcher.followed == [queued[ours]]
    assert watcher.forgotten == set(queued.values()) - {queued[ours]}  # no stream of ours, ever
    conductor._watch(set())  # the tick's catch-up
    assert watcher.followed == [queued[ours]]
