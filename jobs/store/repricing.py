"""Estimates of jobs not sent yet, priced again with the prices in force.

A job's estimate (``est_usd``) is what a budget cap reserves when the job is sent. It was fixed
when the job was stored: a price corrected afterwards (``WANBATCH_PRICING_OVERRIDES``) was
ignored by the cap of a batch already submitted — ``estimate`` said about 3 of 10 jobs fit a
$2.00 cap, and ``run`` sent 9. A job nothing of which has been sent is priced again by the
prices in force of the process that submits its manifest again or decides to send it (in
distributed mode, a worker's); a job sent (or possibly sent) keeps the estimate it was sent
with, which its recorded cost and the caps' sums go by.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import String, bindparam, cast, or_, select, update
from sqlalchemy.orm import Session

from jobs.pricing import estimate_job, price_table, priced_otherwise
from jobs.settings import BudgetSettings
from jobs.states import JobState
from jobs.store.core import _JOBS
from jobs.store.creating import _no_post_recorded

#: Jobs whose input is read at once: an input may hold inline images of megabytes.
_INPUTS_AT_ONCE = 200


@dataclass(slots=True)
class Repriced:
    """What :func:`reprice_unsent` changed."""

    #: Jobs priced again (their estimate may or may not have moved: their table had).
    jobs: int = 0
    #: Their estimates before and after, summed.
    before_usd: Decimal = Decimal(0)
    after_usd: Decimal = Decimal(0)
    #: Of the jobs ``wanted`` (:func:`reprice_unsent`), each one's new ``(billing units, usd)``.
    wanted: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """Whether an estimate moved (a table that changed without a price is no news)."""
        return self.before_usd != self.after_usd


def _unsent(batch_id: str) -> list[Any]:
    """A job of ``batch_id`` waiting to be sent of which nothing was ever sent or billed
    (:func:`jobs.store.creating._no_post_recorded`): its estimate reserves nothing yet."""
    return [
        _JOBS.c.batch_id == batch_id,
        # Not IN (...): the UPDATE runs as executemany, which takes no expanding parameter.
        or_(_JOBS.c.state == JobState.PENDING, _JOBS.c.state == JobState.RETRY_WAIT),
        _JOBS.c.price_table.is_not(None),
        _JOBS.c.actual_usd.is_(None),
        *_no_post_recorded(),
    ]


def reprice_unsent(
    session: Session, batch_id: str, prices: BudgetSettings, *, wanted: Collection[str] = ()
) -> Repriced:
    """Price again, with ``prices`` (a process's settings), every job of ``batch_id`` not sent
    yet whose stored ``price_table`` is not the one those prices give
    (:func:`jobs.pricing.priced_otherwise`): its ``est_usd``, ``est_billing_units`` and
    ``price_table``, in the caller's transaction.

    The stored tables are read first, each distinct one once (a batch has a few: one per
    endpoint, per prices it was submitted with), as text, so the rows of one are found again by
    the same text on either database; only the inputs of jobs priced otherwise are read, a
    page at a time. A job another transaction holds (a dispatch round's claim, about to be
    sent: the round prices it by its own process's prices) is skipped, never waited for; the
    UPDATE is a compare-and-set on the same conditions. ``wanted``: the jobs whose new estimate
    the caller needs (a round's claims, which it holds), returned in :attr:`Repriced.wanted`.
    """
    conn = session.connection()
    where = _unsent(batch_id)
    text = cast(_JOBS.c.price_table, String)
    tables = conn.execute(select(_JOBS.c.endpoint, text).where(*where).distinct()).all()
    stale = [
        (endpoint, raw) for endpoint, raw in tables if priced_otherwise(endpoint, json.loads(raw), prices)
    ]
    done = Repriced()
    wanted = set(wanted)
    write = (
        update(_JOBS)
        .where(_JOBS.c.id == bindparam("b_id"), *where)
        .values(
            est_usd=bindparam("b_usd", type_=_JOBS.c.est_usd.type),
            est_billing_units=bindparam("b_units", type_=_JOBS.c.est_billing_units.type),
            price_table=bindparam("b_table", type_=_JOBS.c.price_table.type),
        )
    )
    for endpoint, raw in stale:
        now = price_table(endpoint, prices)
        # Locked as they are read, skipping rows another transaction holds (PostgreSQL; SQLite
        # has one writer): a dispatch round's claims, which it prices itself, or a concurrent
        # resubmit's. Waiting for them instead could deadlock two that price one batch.
        mine = select(_JOBS.c.id).where(*where, _JOBS.c.endpoint == endpoint, text == raw)
        ids = list(conn.execute(mine.with_for_update(skip_locked=True)).scalars())
        for start in range(0, len(ids), _INPUTS_AT_ONCE):
            page = ids[start : start + _INPUTS_AT_ONCE]
            rows = conn.execute(
                select(_JOBS.c.id, _JOBS.c.input, _JOBS.c.est_usd).where(_JOBS.c.id.in_(page))
            ).all()
            writes = []
            for row in rows:
                est = estimate_job(endpoint, row.input, prices)
                writes.append(
                    {"b_id": row.id, "b_usd": est.usd, "b_units": est.billing_units, "b_table": now}
                )
                done.jobs += 1
                done.before_usd += row.est_usd
                done.after_usd += est.usd
                if row.id in wanted:
                    done.wanted[row.id] = (est.billing_units, est.usd)
            if writes:
                conn.execute(write, writes)
    return done
