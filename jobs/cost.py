"""The cost report of a batch: estimated vs actual vs wasted, by endpoint and resolution.

*Actual* is what the provider bills, as recorded per job by the worker from the billing rules
(``jobs/billing_rules.yaml``): every attempt's bill, not just the last. *Wasted* is money that
bought no output: the actual cost of jobs that ended failed or cancelled (a billed 422, a
request cancelled after it started), plus what a job that finally succeeded paid for earlier
attempts. *Possible duplicates* are resubmissions after an ambiguous submit: fal may have billed
each one again; we cannot know, so they are shown apart, at the estimate, never hidden. A
*confirmed* duplicate is an extra request fal proved it ran — its signed webhook, or a submit's
answer that came after the job had moved on and that fal bills all the same: a billed one is in
actual (and wasted: it bought no output the job kept), no longer "possibly billed".

All sums are exact :class:`~decimal.Decimal`; rounding happens only at the edge, by
:mod:`jobs.money` (the same half-up rounding as ``status``; JSON money is a number there too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from jobs import store
from jobs.endpoints import get_endpoint
from jobs.models import NOT_IN_MANIFEST
from jobs.money import BUDGET_ERRORS, usd_json
from jobs.pricing import add_units, unit_symbol
from jobs.states import JobState

ZERO = Decimal(0)


@dataclass(slots=True)
class CostLine:
    """Money of one group of jobs (an endpoint at a resolution, or the whole batch)."""

    jobs: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    cancelled_for_budget: int = 0
    #: Sent and not finished: at fal, or being downloaded (as ``status`` counts them).
    in_flight: int = 0
    #: Waiting to be sent (``pending``, ``retry_wait``): fal holds no request of theirs now.
    waiting: int = 0
    #: Of ``waiting``, those sent before (a request of theirs ended: timed out or cancelled in
    #: fal's queue at a window's end, or failed), waiting to be sent again, as ``cancel`` counts
    #: them (:func:`jobs.store.unsent_kind`); their earlier attempts may have been billed. The
    #: rest were never sent.
    waiting_sent_before: int = 0
    estimated_usd: Decimal = ZERO
    actual_usd: Decimal = ZERO
    #: Billing units per unit symbol (:func:`jobs.pricing.unit_symbol`): seconds of video and
    #: videos are summed apart, never into one number.
    estimated_by_unit: dict[str, Decimal] = field(default_factory=dict)
    actual_by_unit: dict[str, Decimal] = field(default_factory=dict)
    wasted_usd: Decimal = ZERO
    possible_duplicate_charges: int = 0
    #: The resends no proof has resolved yet, at the estimate (what may come on top of actual).
    possible_duplicate_usd: Decimal = ZERO
    #: Extra requests fal proved it ran: by a signed webhook, or by a submit's answer that came after
    #: its job had moved on (billed ones are in actual and wasted).
    confirmed_duplicate_charges: int = 0
    #: What submits whose outcome stayed unknown, or requests fal lost after they started
    #: running, may have cost: fal may have billed them.
    possibly_billed_usd: Decimal = ZERO

    def add(self, job: store.JobMoney) -> None:
        """Count one job in this line."""
        actual = job.actual_usd or ZERO
        self.jobs += 1
        unit = unit_symbol(job.endpoint)
        if job.error_type != NOT_IN_MANIFEST:  # dropped from its manifest, never sent: no estimate
            self.estimated_usd += job.est_usd
            add_units(self.estimated_by_unit, unit, job.est_units)
        self.actual_usd += actual
        add_units(self.actual_by_unit, unit, job.actual_units or ZERO)
        if job.state == JobState.SUCCEEDED:
            self.succeeded += 1
            self.wasted_usd += max(ZERO, actual - job.est_usd)  # earlier attempts that were billed
        elif job.state in (JobState.FAILED, JobState.CANCELLED):
            self.wasted_usd += actual
            if job.state == JobState.FAILED:
                self.failed += 1
            else:
                self.cancelled += 1
                self.cancelled_for_budget += job.error_type in BUDGET_ERRORS
        elif job.state in (JobState.PENDING, JobState.RETRY_WAIT):
            self.waiting += 1
            self.waiting_sent_before += store.unsent_kind(job.state, job.submitted_at) == "sent_before"
        else:
            self.in_flight += 1
        self.possible_duplicate_charges += job.possible_duplicate_charges
        self.confirmed_duplicate_charges += job.confirmed_duplicate_charges
        unproven = max(0, job.possible_duplicate_charges - job.confirmed_duplicate_charges)
        self.possible_duplicate_usd += job.est_usd * unproven
        self.possibly_billed_usd += job.ambiguous_usd

    @property
    def unit(self) -> str | None:
        """The one unit symbol of this line's jobs; None when they bill in unlike units."""
        units = set(self.estimated_by_unit)
        return next(iter(units)) if len(units) == 1 else None

    @property
    def estimated_units(self) -> Decimal | None:
        """Estimated billing units when all of one unit (or none); None when unlike units mix."""
        return _one_unit_sum(self.estimated_by_unit)

    @property
    def actual_units(self) -> Decimal | None:
        """Billed units when all of one unit (or none); None when unlike units mix."""
        return _one_unit_sum(self.actual_by_unit)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: USD as numbers rounded to the micro-dollar (:func:`jobs.money.usd_json`, the
        type every ``--json`` object uses), billing units as plain numbers — ``estimated_units``
        and ``actual_units`` null when the line mixes unlike units (then see ``…_by_unit``)."""
        return {
            "jobs": self.jobs,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "cancelled_for_budget": self.cancelled_for_budget,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "waiting_sent_before": self.waiting_sent_before,
            "estimated_usd": usd_json(self.estimated_usd),
            "estimated_units": _units_json(self.estimated_units),
            "actual_usd": usd_json(self.actual_usd),
            "actual_units": _units_json(self.actual_units),
            "unit": self.unit,
            "estimated_units_by_unit": {u: float(n) for u, n in sorted(self.estimated_by_unit.items())},
            "actual_units_by_unit": {u: float(n) for u, n in sorted(self.actual_by_unit.items())},
            "wasted_usd": usd_json(self.wasted_usd),
            "possible_duplicate_charges": self.possible_duplicate_charges,
            "possible_duplicate_usd": usd_json(self.possible_duplicate_usd),
            "confirmed_duplicate_charges": self.confirmed_duplicate_charges,
            "possibly_billed_usd": usd_json(self.possibly_billed_usd),
        }


def _one_unit_sum(by_unit: dict[str, Decimal]) -> Decimal | None:
    return None if len(by_unit) > 1 else sum(by_unit.values(), ZERO)


def _units_json(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


@dataclass(slots=True)
class CostReport:
    """A batch's cost: the total and one line per (endpoint, resolution)."""

    batch_id: str
    name: str
    budget_max_usd: Decimal | None
    total: CostLine = field(default_factory=CostLine)
    lines: dict[tuple[str, str], CostLine] = field(default_factory=dict)
    #: Made by ``--simulate``: every figure is the simulator's, nothing was paid.
    simulated: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The ``wanbatch cost --json`` object."""
        return {
            "batch": self.batch_id,
            "name": self.name,
            "budget_max_usd": usd_json(self.budget_max_usd),
            "total": self.total.as_dict(),
            "by_endpoint": [
                {"endpoint": endpoint, "resolution": resolution, **line.as_dict()}
                for (endpoint, resolution), line in sorted(self.lines.items())
            ],
            "simulated": self.simulated,
        }


def _resolution(endpoint: str, resolved: dict[str, Any]) -> str:
    value = resolved.get("resolution")
    if value is None:
        try:
            fld = get_endpoint(endpoint).field("resolution")
        except Exception:  # an endpoint no longer registered: still report its money
            fld = None
        value = None if fld is None else fld.default
    return "-" if value is None else str(value)


def cost_report(session: Session, ref: str) -> CostReport:
    """The cost report of one batch (id, id prefix or name)."""
    batch = store.get_batch(session, ref)
    report = CostReport(batch.id, batch.name, batch.budget_max_usd, simulated=batch.simulated)
    for job in store.job_money(session, batch.id):
        report.total.add(job)
        report.lines.setdefault((job.endpoint, _resolution(job.endpoint, job.input)), CostLine()).add(job)
    return report
