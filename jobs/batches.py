"""Batch-level use cases: validate, estimate, submit and report, as plain functions.

The CLI stays thin (parse, call one of these, print); the worker and tests call the same
functions, so "what `submit` does" has exactly one definition.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from jobs import store
from jobs.endpoints import get_endpoint
from jobs.errors import ManifestError
from jobs.manifest import JobSpec, ValidationReport, job_key, load_manifest, validate_manifest
from jobs.models import Batch, BatchState, utcnow
from jobs.pricing import Totals, estimate_job
from jobs.settings import Settings, get_settings
from jobs.states import JobState


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    engine = store.make_engine(url)
    store.migrate(engine)
    return engine


def open_engine(settings: Settings | None = None) -> Engine:
    """The engine of the system of record, migrated to head (once per process and URL)."""
    return _engine_for((settings or get_settings()).database_url)


def check_manifest(path: str | Path) -> ValidationReport:
    """Validate, and raise :class:`ManifestError` with every located issue when anything is wrong."""
    report = validate_manifest(path)
    if not report.ok:
        raise ManifestError(report.issues)
    return report


def estimate_manifest(path: str | Path, settings: Settings | None = None) -> tuple[ValidationReport, Totals]:
    """Job count, billing units and USD of a valid manifest, per endpoint and in total."""
    report = check_manifest(path)
    assert report.manifest is not None
    totals = Totals()
    for spec in report.manifest.jobs():
        totals.add(estimate_job(spec.endpoint, spec.input, settings))
    return report, totals


@dataclass(slots=True)
class SubmitResult:
    """What ``submit`` did: the batch, and how many jobs were new vs already stored."""

    batch_id: str
    name: str
    created: bool
    added: int
    existing: int
    total: int
    counts: dict[str, int]
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The contract's ``submit --json`` object (batch, total, counts) plus what was added."""
        return {
            "batch": self.batch_id,
            "name": self.name,
            "created": self.created,
            "added": self.added,
            "existing": self.existing,
            "total": self.total,
            "counts": self.counts,
        }


def _new_job(
    endpoint: str, item_index: int, key: str, resolved: dict[str, Any], settings: Settings | None
) -> store.NewJob:
    """A job row to store, with its cost estimate."""
    est = estimate_job(endpoint, resolved, settings)
    return store.NewJob(
        key=key,
        item_index=item_index,
        endpoint=endpoint,
        input=resolved,
        est_billing_units=est.billing_units,
        est_usd=est.usd,
    )


def _new_jobs(specs: Iterator[JobSpec], settings: Settings | None) -> Iterator[store.NewJob]:
    for spec in specs:
        yield _new_job(spec.endpoint, spec.item_index, spec.key, spec.input, settings)


def _submitted(
    session: Session,
    batch: Batch,
    created: bool,
    added: int,
    existing: int,
    warnings: list[str] | None = None,
) -> SubmitResult:
    counts = store.counts_by_state(session, batch.id)
    return SubmitResult(
        batch_id=batch.id,
        name=batch.name,
        created=created,
        added=added,
        existing=existing,
        total=sum(counts.values()),
        counts=counts,
        warnings=warnings or [],
    )


def submit_manifest(path: str | Path, settings: Settings | None = None) -> SubmitResult:
    """Validate the whole manifest, then store its batch and jobs in one transaction.

    Nothing is written unless every job is valid. Idempotent: the batch is found by name and
    jobs by their deterministic key, so submitting the same manifest again adds nothing (and
    an edited manifest adds only its new jobs).
    """
    report = check_manifest(path)
    manifest = report.manifest
    assert manifest is not None
    engine = open_engine(settings)
    with store.session_scope(engine) as session:
        batch, created = store.get_or_create_batch(
            session,
            name=manifest.name,
            manifest_path=str(Path(path).resolve()),
            manifest_sha256=manifest.sha256,
            budget_max_usd=manifest.budget_max_usd,
        )
        added, existing = store.add_jobs(session, batch.id, _new_jobs(manifest.jobs(), settings))
        if batch.state == BatchState.PAUSED:
            # Paused because fal refused the account; submitting again is the user saying "go on".
            store.set_batch_state(session, batch.id, BatchState.ACTIVE)
        warnings = [str(i) for i in report.issues if i.severity != "error"]
        return _submitted(session, batch, created, added, existing, warnings)


def _money(value: Decimal | None) -> float | None:
    return None if value is None else float(value.quantize(Decimal("0.000001")))


def _eta_seconds(started: datetime | None, finished: int, total: int) -> float | None:
    """Seconds until the batch should be done at the pace it has kept so far (None: no pace yet).

    A batch runs at a steady pace set by the outstanding cap and model time, so the average
    since its first submit is a fair forecast once a few jobs have finished.
    """
    if started is None or finished == 0 or finished >= total:
        return None if finished < total else 0.0
    elapsed = (utcnow() - started).total_seconds()
    return round(elapsed / finished * (total - finished), 1)


def batch_report(session: Session, batch_id: str) -> dict[str, Any]:
    """The contract's ``status BATCH --json`` object for one batch."""
    batch = store.get_batch(session, batch_id)
    counts = store.counts_by_state(session, batch.id)
    money = store.batch_money(session, batch.id)
    cost = store.batch_cost(session, batch.id)
    terminal = sum(counts[s.value] for s in JobState if s.terminal)
    total = sum(counts.values())
    return {
        "batch": batch.id,
        "name": batch.name,
        "state": batch.state.value if hasattr(batch.state, "value") else batch.state,
        "pause_reason": batch.pause_reason,
        "total": total,
        "finished": terminal,
        "eta_seconds": _eta_seconds(store.first_submitted_at(session, batch.id), terminal, total),
        "counts": counts,
        "estimated_usd": _money(money.estimated_usd),
        "spent_usd": _money(money.spent_usd),
        "reserved_usd": _money(money.reserved_usd),
        "budget_max_usd": _money(batch.budget_max_usd),
        "possible_duplicate_charges": money.possible_duplicate_charges,
        "actual_usd": _money(cost.actual_usd),
        "wasted_usd": _money(cost.wasted_usd),
        "cancelled_for_budget": cost.cancelled_for_budget,
        "failures": [
            {"state": st, "error_type": et, "count": n, "example": ex}
            for st, et, ex, n in store.failure_reasons(session, batch.id)
        ],
        "parent_batch": batch.parent_batch_id,
        "created_at": batch.created_at.isoformat(),
    }


def status(ref: str | None, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Reports for one batch (``ref`` = id, id prefix or name) or, with no ref, for every batch."""
    engine = open_engine(settings)
    with store.session_scope(engine) as session:
        if ref is not None:
            return [batch_report(session, store.get_batch(session, ref).id)]
        return [batch_report(session, b.id) for b in store.list_batches(session)]


def manifest_name(path: str | Path) -> str:
    """The batch name a manifest declares (cheap: does not expand items)."""
    return load_manifest(path).name


def rerun_batch(
    ref: str, *, failed_only: bool = False, new_seeds: bool = False, settings: Settings | None = None
) -> SubmitResult:
    """A new batch from a stored one, linked to it as its parent.

    By default every job is repeated with its exact resolved input and the seed the provider
    returned (so a rerun reproduces the outputs); ``failed_only`` keeps only jobs that ended
    failed or cancelled; ``new_seeds`` draws a fresh seed per job instead, recorded before
    submission so the rerun is itself reproducible.
    """
    engine = open_engine(settings)
    with store.session_scope(engine) as session:
        parent = store.get_batch(session, ref)
        siblings = sum(1 for b in store.list_batches(session) if b.parent_batch_id == parent.id)
        name = f"{parent.name}-rerun-{siblings + 1}"
        batch, created = store.get_or_create_batch(
            session,
            name=name,
            manifest_path=parent.manifest_path,
            manifest_sha256=parent.manifest_sha256,
            budget_max_usd=parent.budget_max_usd,
            parent_batch_id=parent.id,
        )
        wanted = [JobState.FAILED, JobState.CANCELLED] if failed_only else None
        digests: dict[str, str | None] = {}

        def new_jobs() -> Iterator[store.NewJob]:
            for job in store.jobs_of_batch(session, parent.id, states=wanted):
                spec = get_endpoint(job.endpoint)
                resolved = dict(job.input)
                if new_seeds:
                    resolved["seed"] = secrets.randbelow(2**31)
                elif job.seed is not None:
                    resolved["seed"] = int(job.seed)
                yield _new_job(
                    job.endpoint, job.item_index, job_key(spec, resolved, digests), resolved, settings
                )

        added, existing = store.add_jobs(session, batch.id, list(new_jobs()))
        return _submitted(session, batch, created, added, existing)
