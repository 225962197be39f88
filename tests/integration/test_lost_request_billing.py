"""A request fal forgot after it started running (its status answers 404) may have been billed.

The audit: three jobs seen ``running`` at fal, the run killed, fal's queue reset; the next ``run``
failed them ``request_not_found`` and counted $0.00 — ``status``, ``run``'s summary and exports
all said nothing was spent — and ``rerun --failed-only`` paid for them again without a word. A
request a runner took is billed whatever we are told of it afterwards (a cancel of one is billed
as running): its estimate is now counted as possibly billed, and the rerun says so before paying
again. One only ever seen in fal's queue never ran, and costs nothing.
"""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.batches import batch_report
from jobs.cost import cost_report
from jobs.export import records
from jobs.models import Job, utcnow
from jobs.rerun import rerun_batch
from jobs.settings import Settings
from jobs.states import JobState
from tests.hostile import HostileProvider, json_reply
from tests.hostile_fal import accept_submits
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.steps import Runtime, dispatch, poll, submit

S = JobState
KEY = "8d3c1f0e-5a6b-4c7d-9e8f-0a1b2c3d4e5f:0f1e2d3c4b5a69788796a5b4c3d2e1f0"
RID = "3b0e8f1a-2c4d-4e6f-8a9b-0c1d2e3f4a5b"
T2V = "fal-ai/wan-22"
STATUS = rf"/{T2V}/requests/{RID}/status"
EST = Decimal("0.25")  # add_batch's estimate


def _job(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        found = store.get_job(session, job_id)
        session.expunge(found)
        return found


def _poll_due(rt: Runtime) -> None:
    time.sleep(rt.settings.poll_max_interval * 1.5)  # due again, whatever interval it waited
    assert poll(rt) == 1


def _lost(engine: Engine, hostile: HostileProvider, seen: str, *, simulated: bool = False) -> tuple[str, str]:
    """One job of batch ``lost3`` sent to fal, seen ``seen`` (``IN_QUEUE``, ``IN_PROGRESS``) by a
    poll; then fal's status forgets it (404, as after the simulator's reset): ``(batch, job)``.
    ``simulated``: a ``--simulate`` run's batch, sent to its simulator."""
    accept_submits(hostile, RID, T2V)
    batch_id = add_batch(engine, "lost3", [(T2V, {"prompt": "a lighthouse", "seed": 1})], simulated=simulated)
    scope = frozenset({batch_id}) if simulated else None  # a --simulate run is of its own batch
    rt = make_runtime(engine, settings_for(hostile.url, KEY), batch_ids=scope, simulated=simulated)
    try:
        (job_id,) = dispatch(rt)
        assert submit(rt, job_id) == "submitted"
        hostile.route("GET", STATUS, json_reply({"status": seen}, 202))
        _poll_due(rt)
        assert _job(engine, job_id).state == (S.RUNNING if seen == "IN_PROGRESS" else S.QUEUED)
        hostile.route("GET", STATUS, json_reply({"detail": f"Request {RID} not found"}, 404))
        _poll_due(rt)
    finally:
        rt.client.close()
    return batch_id, job_id


def _spent(engine: Engine, batch_id: str) -> Decimal:
    """The batch's spent money, once the running totals (what budgets read) agree with the jobs."""
    with db.read_scope(engine) as session:
        spent = store.batch_money(session, batch_id).spent_usd
        assert store.batch_spent_usd(session, batch_id) == spent
        return spent


def test_a_request_fal_lost_after_it_ran_is_counted_as_possibly_billed(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    batch_id, job_id = _lost(engine, hostile, "IN_PROGRESS")
    failed = _job(engine, job_id)
    assert (failed.state, failed.error_type) == (S.FAILED, "request_not_found")
    assert failed.ambiguous_usd == EST
    assert failed.actual_usd is None  # nothing known billed: possibly, not actually
    assert "possibly billed" in (failed.error or "")

    assert _spent(engine, batch_id) == EST
    with db.read_scope(engine) as session:
        report = batch_report(session, batch_id)  # `status --json`, `run`'s summary, the dashboard
        (record,) = list(records(session, batch_id, tmp_path))
        cost = cost_report(session, batch_id)
    assert (report["spent_usd"], report["possibly_billed_usd"]) == (float(EST), float(EST))
    assert cost.total.possibly_billed_usd == EST
    assert record["possibly_billed_usd"] == float(EST)
    assert "earlier submit's outcome is unknown" not in record["error"]  # not what happened

    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))
    result = rerun_batch("lost3", failed_only=True, settings=settings)
    said = [w for w in result.warnings if "possibly billed" in w]
    assert len(said) == 1, result.warnings
    assert "1 job(s) of batch lost3 may already have been made and billed ($0.25 possibly billed" in said[0]
    assert "fal lost their request after it had started running" in said[0]
    assert "submit's outcome" not in said[0]


def test_a_request_fal_lost_while_it_waited_in_its_queue_costs_nothing(
    engine: Engine, hostile: HostileProvider
) -> None:
    """fal bills nothing for a request that only waited in its queue: nothing possibly billed."""
    batch_id, job_id = _lost(engine, hostile, "IN_QUEUE")
    failed = _job(engine, job_id)
    assert (failed.state, failed.error_type) == (S.FAILED, "request_not_found")
    assert failed.ambiguous_usd == 0
    assert "possibly billed" not in (failed.error or "")
    assert _spent(engine, batch_id) == 0

    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))
    result = rerun_batch("lost3", failed_only=True, settings=settings)
    assert not [w for w in result.warnings if "possibly billed" in w], result.warnings


def test_a_simulated_request_the_simulator_lost_after_it_ran_says_nothing_was_billed(
    engine: Engine, hostile: HostileProvider
) -> None:
    """A ``--simulate`` run's request is never at a provider that bills: lost after it ran, its
    error says nothing of "possibly billed" (it said "its estimate is counted as possibly
    billed" while nothing was counted), and nothing is."""
    batch_id, job_id = _lost(engine, hostile, "IN_PROGRESS", simulated=True)
    failed = _job(engine, job_id)
    assert (failed.state, failed.error_type) == (S.FAILED, "request_not_found")
    assert "possibly billed" not in (failed.error or ""), failed.error
    assert "a simulation: nothing was billed" in (failed.error or "")
    assert failed.ambiguous_usd == 0
    assert _spent(engine, batch_id) == 0


@pytest.mark.parametrize("seen", ["IN_QUEUE", "IN_PROGRESS"])
def test_a_proof_that_the_lost_request_finished_counts_it_once(
    engine: Engine, hostile: HostileProvider, seen: str
) -> None:
    """fal's signed webhook then proves it ran the request to the end: the job adopts it back
    (``adopt_own_proof``), and what its failure counted as possibly billed leaves
    ``ambiguous_usd`` — the success bills it in full, once."""
    batch_id, job_id = _lost(engine, hostile, seen)
    failed = _job(engine, job_id)
    with db.session_scope(engine) as session:
        assert store.adopt_own_proof(
            session,
            store.Fence.of(failed, "webhooks"),
            request_id=RID,
            next_poll_at=utcnow(),
            reason="proof by webhook",
        )
    adopted = _job(engine, job_id)
    assert adopted.state == S.QUEUED
    assert adopted.ambiguous_usd == 0
    assert _spent(engine, batch_id) == 0  # in flight again: its success will bill it
