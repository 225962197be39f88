"""Schedules: keep each batch's sending inside its window and before its deadline.

A batch's ``schedule`` (manifest; :class:`jobs.schedule.Schedule`) says when its jobs may be
*sent*; dispatch claims nothing of a batch while it is closed (or paused by its user). This
step, run every tick, handles the moments it closes:

* **Past the deadline** nothing will ever be sent again: jobs never sent end ``cancelled`` with
  reason ``deadline`` (one set-based statement per state), and requests still waiting in fal's
  queue are cancelled there (free while queued). Requests already running finish and are
  downloaded: they are paid for. fal itself never starts a request after the cut-off either,
  as every submit carried ``X-Fal-Request-Start-Timeout`` (:mod:`worker.steps.submit`).
* **At a window's end** requests still waiting in fal's queue are cancelled there and their
  jobs go back to ``pending`` for the next window, no attempt counted (see
  :func:`worker.steps.poll.record_completion`); running ones finish.

A cancel is only asked of requests we believe are still ``queued``: cancelling a running one
would throw away work fal bills anyway.
"""

from __future__ import annotations

import logging
from datetime import datetime

from jobs import db, store
from jobs.errors import ProviderError
from jobs.models import BatchState, utcnow
from jobs.store import Fence
from worker.fal.models import RequestHandle
from worker.steps.context import Runtime, S, handle_of
from worker.steps.poll import DEADLINE, WINDOW_CLOSED

log = logging.getLogger(__name__)


def enforce_schedules(rt: Runtime, now: datetime | None = None) -> int:
    """Apply every scheduled batch's deadline and window end; returns how many jobs it moved."""
    now = now or utcnow()
    moved = 0
    plan: list[tuple[Fence, RequestHandle, str]] = []
    with db.session_scope(rt.engine) as session:
        for batch in store.scheduled_batches(session):
            if batch.state != BatchState.ACTIVE or not rt.in_scope(batch.id):
                continue
            if batch.simulated != rt.simulated:  # its requests are another provider's (Runtime.reach)
                continue
            schedule = store.batch_schedule(batch)
            if schedule.is_open(now):
                continue
            why = DEADLINE if schedule.past_deadline(now) else WINDOW_CLOSED
            if why == DEADLINE:
                moved += store.cancel_unsent_jobs(
                    session,
                    [batch.id],
                    reason="deadline",
                    error=f"not sent before the batch's deadline ({schedule.deadline:%Y-%m-%d %H:%M %Z})",
                    error_type=DEADLINE,
                    worker=rt.owner,
                )
            elif schedule.not_before is not None and now < schedule.not_before:
                continue  # not started yet: nothing of it can be at fal
            for job in store.jobs_of_batch(session, batch.id, states=[S.QUEUED]):
                plan.append((rt.fence(job), handle_of(job, rt.settings.fal_queue_url), why))
    for fence, handle, why in plan:
        try:
            outcome = rt.client.cancel(handle)
        except ProviderError as exc:
            log.info(
                "job %s: cancel at the %s failed (%s); will try again",
                fence.job_id,
                why,
                exc,
                extra={
                    "event": "schedule.cancel_failed",
                    "job_id": fence.job_id,
                    "request_id": handle.request_id,
                },
            )
            continue
        with db.session_scope(rt.engine) as session:
            reason = "deadline passed" if why == DEADLINE else "window closed"
            moved += store.mark_cancelling(
                session, fence, reason=f"{reason}: cancel requested at fal: {outcome.value}", error_type=why
            )
    return moved
