"""The periodic tick: one round of reconcile, poll, dispatch and download scheduling."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta

from jobs import clock, db, store
from jobs.models import utcnow
from worker.steps.context import Runtime
from worker.steps.dispatch import dispatch
from worker.steps.download import schedule_downloads
from worker.steps.poll import poll
from worker.steps.reconcile import cancel_jobs_of_cancelled_batches, reconcile
from worker.steps.schedule import enforce_schedules
from worker.steps.webhooks import apply_pending, prune_applied

log = logging.getLogger(__name__)


@dataclass
class TickReport:
    """What one tick did (for logs, progress and benchmarks)."""

    webhooks: int = 0
    reconciled: int = 0
    status_calls: int = 0
    dispatched: int = 0
    #: Jobs its dispatch cancelled for a budget cap (nothing sent, yet work: the tick was not idle).
    budget_cancelled: int = 0
    downloads: int = 0


def tick(
    rt: Runtime,
    stopping: threading.Event | None = None,
    *,
    exclude: Collection[str] = (),
    streamed: Collection[str] = (),
) -> TickReport:
    """One round of periodic work: apply stored webhooks, reconcile, poll, dispatch, schedule downloads.

    Stored webhooks come first: a delivery that proves an ambiguous submit was accepted must be
    applied before the reconciler would settle that submit by its policy.

    ``stopping`` is checked between steps: once it is set (Ctrl-C) the round ends without
    claiming anything more, even when a slow status call kept it busy meanwhile. ``exclude``:
    jobs a status stream has just begun to follow, which the poll leaves alone; ``streamed``:
    jobs a stream has followed for longer, polled only every ``poll_max_interval``
    (:func:`~worker.steps.poll.poll`).
    """
    report = TickReport()
    catch_up_with_clock_step(rt)

    def go_on() -> bool:
        return stopping is None or not stopping.is_set()

    report.webhooks = apply_pending(rt)
    prune_applied(rt)
    report.reconciled = reconcile(rt) + cancel_jobs_of_cancelled_batches(rt) + enforce_schedules(rt)
    if go_on():
        report.status_calls = poll(rt, exclude=exclude, streamed=streamed)
    if go_on():
        before = rt.budget_cancelled
        report.dispatched = len(dispatch(rt))
        report.budget_cancelled = rt.budget_cancelled - before
    if go_on():
        report.downloads = len(schedule_downloads(rt))
    return report


def catch_up_with_clock_step(rt: Runtime) -> int:
    """After SQLite's timeline (this host's clock) stepped back, every wait stamped before the
    step is brought forward by as much, said once; how many. Without it, NTP correcting a clock
    an hour ahead left the run silent for an hour, its retries and polls due an hour late.

    The step is judged against the timeline's high-water mark kept in the database
    (:func:`jobs.store.catch_up_with_timeline`), in the tick's own ``BEGIN IMMEDIATE``
    transaction: of several processes sharing the file, the first to tick after the step moves
    the waits, and the others find nothing to do (each judging on its own moved them once each).
    PostgreSQL: nothing (every process reads the server's clock, :mod:`jobs.clock`).

    The database is asked only when its answer could be other than "nothing": when the time is
    more than a step before the mark as this process last saw it (a step back, or another process
    caught up with one and lowered the mark), or past it by more than
    :data:`jobs.clock.MARK_SLACK_SECONDS` (time to raise it). A run waiting at fal wrote the mark
    at every tick: a write transaction, and a WAL sync, every second."""
    if rt.engine.dialect.name != "sqlite":
        return 0
    step = timedelta(seconds=clock.STEP_SECONDS)
    slack = timedelta(seconds=clock.MARK_SLACK_SECONDS)
    known = rt.timeline_mark
    if known is not None and known - step <= utcnow() <= known + slack:
        return 0
    with db.session_scope(rt.engine) as session:
        back, moved, rt.timeline_mark = store.catch_up_with_timeline(
            session, now=utcnow(), step=step, slack=slack
        )
    if not back:
        return 0
    log.warning(
        "this host's clock went back %s: %d wait(s) stamped before are brought forward by as much",
        clock.span(back.total_seconds()),
        moved,
        extra={"event": "clock.stepped_back"},
    )
    return moved
