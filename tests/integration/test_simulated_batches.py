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

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from jobs import db, store
from jobs.models import EVERY_BATCH, Batch, utcnow
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


def _create(session: Session, name: str, *, simulated: bool = False) -> tuple[Batch, bool]:
    return store.get_or_create_batch(
        session,
        name=name,
        manifest_path="m",
        manifest_sha256="0" * 64,
        budget_max_usd=None,
        simulated=simulated,
    )


def test_names_keep_simulations_apart_from_paid_batches(engine: Engine) -> None:
    with db.session_scope(engine) as session:
        # Nothing holds the name: either kind takes it.
        assert store.name_for_batch(session, "clip", simulated=True) == ("clip", None)
        sim, _ = _create(session, "clip", simulated=True)
        # A second --simulate run finds the same simulation.
        assert store.name_for_batch(session, "clip", simulated=True) == ("clip", None)
        # The batch for fal takes the name back; the simulation is renamed aside.
        assert store.name_for_batch(session, "clip", simulated=False) == ("clip", "clip-simulated")
        assert sim.name == "clip-simulated"
        paid, created = _create(session, "clip")
        assert created
        assert not paid.simulated
        # From now on a --simulate run of the manifest resumes the renamed simulation ...
        assert store.name_for_batch(session, "clip", simulated=True) == ("clip-simulated", None)
        # ... and the paid batch keeps its name.
        assert store.name_for_batch(session, "clip", simulated=False) == ("clip", None)


def test_a_paid_batch_holding_the_simulated_name_is_skipped(engine: Engine) -> None:
    """A manifest literally named ``clip-simulated``, sent to fal, is never taken for a simulation."""
    with db.session_scope(engine) as session:
        for name in ("clip", "clip-simulated"):
            _create(session, name)
        assert store.name_for_batch(session, "clip", simulated=True) == ("clip-simulated-2", None)
        sim, _ = _create(session, "clip-simulated-2", simulated=True)
        assert store.name_for_batch(session, "clip", simulated=True) == ("clip-simulated-2", None)
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
