"""The periodic tick: one round of reconcile, poll, dispatch and download scheduling."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from worker.steps.context import Runtime
from worker.steps.dispatch import dispatch
from worker.steps.download import schedule_downloads
from worker.steps.poll import poll
from worker.steps.reconcile import cancel_jobs_of_cancelled_batches, reconcile

log = logging.getLogger(__name__)


@dataclass
class TickReport:
    """What one tick did (for logs, progress and benchmarks)."""

    reconciled: int = 0
    status_calls: int = 0
    dispatched: int = 0
    downloads: int = 0


def tick(rt: Runtime) -> TickReport:
    """One round of periodic work: reconcile, poll, dispatch, schedule downloads."""
    report = TickReport()
    report.reconciled = reconcile(rt) + cancel_jobs_of_cancelled_batches(rt)
    report.status_calls = poll(rt)
    report.dispatched = len(dispatch(rt))
    report.downloads = len(schedule_downloads(rt))
    return report
