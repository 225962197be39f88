"""Dispatch: claim due jobs within the outstanding caps, the submit rate and the budgets,
mark them ``submitting`` and hand them to the submit task. Run by the tick leader only."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from jobs import db, store
from jobs.endpoints import all_endpoints
from jobs.models import Job, utcnow
from jobs.states import JobState
from worker.limits import api_key_id
from worker.steps.context import Runtime, S

log = logging.getLogger(__name__)


def dispatch(rt: Runtime) -> list[str]:
    """Claim due jobs within the caps and budget, mark them ``submitting``; returns their ids.

    The budget is checked in the same transaction that claims: a job's estimate counts as
    reserved from the moment it is ``submitting``, so the cap holds even with many in flight.
    Only jobs of ``rt.batch_ids`` are claimed, but the outstanding caps count every batch's
    requests at fal for the key: the account's limit is global.
    """
    now = utcnow()
    sent: list[str] = []
    key_id = api_key_id(rt.settings)  # the caps are per API key, as fal's account limits are
    with db.session_scope(rt.engine) as session:
        outstanding = store.count_in_states(session, states_at_provider(), api_key_id=key_id)
        free = _room_at_fal(session, rt, now, rt.settings.max_outstanding - outstanding, key_id)
        if free <= 0:
            return []
        assert rt.bucket is not None
        free = rt.bucket.take(free)
        if free <= 0:
            return []
        jobs = _claim_within_caps(session, rt, free, now, key_id)
        unused = free
        for job in jobs:
            refusal = _budget_refusal(session, rt, job, now)
            if refusal is not None:
                store.mark_cancelled(
                    session, rt.fence(job), reason="budget", error=refusal, error_type="budget"
                )
                continue
            moved = store.mark_submitting(
                session,
                rt.fence(job),
                attempt=job.attempts + 1,
                api_key_id=key_id,
                lease_expires_at=rt.lease_until(now),
            )
            if moved:
                sent.append(job.id)
                unused -= 1
    if unused > 0 and rt.bucket is not None:
        rt.bucket.tokens += unused  # claimed fewer than granted: give the rate back
    for job_id in sent:
        rt.enqueue_submit(job_id)
    return sent


def _room_at_fal(session: Session, rt: Runtime, now: datetime, free: int, key_id: str) -> int:
    """Adapt the outstanding cap to the account's tier (fal runs 2 to 40 at once, queues the rest).

    Requests still IN_QUEUE at fal ``queue_wait_backoff`` seconds after we sent them mean the
    account runs fewer than our cap. Sending more would only lengthen fal's queue — losing
    control of cancel, budget and result expiry — so dispatch then keeps just one request
    waiting at fal. As soon as nothing waits that long (jobs start, or the tier was raised),
    the full cap applies again.
    """
    threshold = rt.settings.queue_wait_backoff
    if threshold <= 0 or free <= 0:
        return free
    before = now - timedelta(seconds=threshold)
    if store.count_waiting_since(session, S.QUEUED, submitted_before=before, api_key_id=key_id) == 0:
        return free
    waiting = store.count_in_states(session, [S.SUBMITTING, S.SUBMIT_UNKNOWN, S.QUEUED], api_key_id=key_id)
    room = max(0, 1 - waiting)
    if room < free:
        log.info(
            "requests wait in fal's queue over %.0fs: holding back (room %d of %d)", threshold, room, free
        )
    return min(free, room)


def _claim_within_caps(session: Session, rt: Runtime, free: int, now: datetime, key_id: str) -> list[Job]:
    """Claim up to ``free`` due jobs, no endpoint beyond its own cap (``max_outstanding_per_endpoint``)."""
    claim: dict[str, Any] = {
        "states": [S.PENDING, S.RETRY_WAIT],
        "now": now,
        "owner": rt.owner,
        "lease_seconds": rt.settings.lease_seconds,
        "active_batches_only": True,
        "batch_ids": rt.batch_ids,  # only the runtime's own batches; the caps count every batch
    }
    caps = rt.settings.max_outstanding_per_endpoint
    if not caps:
        return store.claim_jobs(session, limit=free, **claim)
    outstanding = store.count_in_states_by_endpoint(session, states_at_provider(), api_key_id=key_id)
    jobs: list[Job] = []
    for endpoint, cap in sorted(caps.items()):
        room = min(free - len(jobs), cap - outstanding.get(endpoint, 0))
        if room > 0:
            jobs += store.claim_jobs(session, limit=room, endpoints=[endpoint], **claim)
    uncapped = [e.id for e in all_endpoints() if e.id not in caps]
    if free - len(jobs) > 0 and uncapped:
        jobs += store.claim_jobs(session, limit=free - len(jobs), endpoints=uncapped, **claim)
    return jobs


def _budget_refusal(session: Session, rt: Runtime, job: Job, now: datetime) -> str | None:
    """Why submitting ``job`` would cross a budget cap (its batch's, or the day's), else None.

    Checked in the claim's transaction, by the single dispatcher: what is committed (spent +
    the estimates of everything in flight) plus this job's estimate must stay within the cap.
    """
    batch = store.get_batch(session, job.batch_id)
    if batch.budget_max_usd is not None:
        money = store.batch_money(session, batch.id)
        if money.committed_usd + job.est_usd > batch.budget_max_usd:
            return (
                f"budget: submitting would commit ${money.committed_usd + job.est_usd:.2f} "
                f"of the batch's ${batch.budget_max_usd:.2f} cap"
            )
    cap = rt.settings.daily_budget_usd
    if cap is not None:
        since = now.replace(hour=0, minute=0, second=0, microsecond=0)
        committed = store.committed_usd_since(session, since)
        if committed + job.est_usd > cap:
            return (
                f"budget: submitting would commit ${committed + job.est_usd:.2f} of today's "
                f"${cap:.2f} cap (WANBATCH_DAILY_BUDGET_USD)"
            )
    return None


def states_at_provider() -> list[JobState]:
    """States that count against the outstanding cap."""
    return [s for s in JobState if s.at_provider]
