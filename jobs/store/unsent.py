"""State changes by intent, cancelling jobs fal does not hold (:data:`UNSENT_STATES`),
set-based: a batch's cancel, and the jobs a budget no longer covers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, case, exists, func, insert, literal, or_, select, update
from sqlalchemy.orm import Session

from jobs.models import Job, utcnow
from jobs.states import JobState
from jobs.store.core import _JOBS, _POSSIBLY_BILLED_MORE
from jobs.store.outcomes import OUTPUT_NOT_KEPT
from jobs.store.transitions import (
    _EVENT_COLUMNS,
    _EVENTS,
    _ZERO_IF_NEVER_SENT,
    _ZERO_UNITS_IF_NEVER_SENT,
    UNSENT_STATES,
    _add_finished,
)


@dataclass(frozen=True, slots=True)
class UnsentCancelled:
    """The jobs :func:`cancel_unsent` ended, told apart as ``status`` tells them (``sent``:
    ``submitted_at``): a cancel that said "never sent" of them all misled about those fal had
    seen before.

    * ``never_sent``: no request of theirs ever went to fal;
    * ``sent_before``: sent before (a request of theirs failed, or was timed out in fal's queue),
      waiting to be sent again (``retry_wait``, ``pending``): fal holds no request of theirs now;
    * ``outcome_unknown``: in ``submit_unknown``, their POST's answer lost: fal may have
      accepted (and billed) it.
    """

    never_sent: int = 0
    sent_before: int = 0
    outcome_unknown: int = 0

    @property
    def total(self) -> int:
        return self.never_sent + self.sent_before + self.outcome_unknown


def unsent_kind(state: JobState, submitted_at: datetime | None) -> str:
    """Which of :class:`UnsentCancelled`'s counts a job fal holds no request of is in, by its
    ``state`` and ``submitted_at``: ``outcome_unknown`` (``submit_unknown``), ``never_sent`` (no
    request of it ever went out), else ``sent_before`` (one did, and ended: it waits to be sent
    again). The one place that tells them apart: :func:`cancel_unsent` counts by it, and
    ``wanbatch cost`` its waiting jobs (:class:`jobs.cost.CostLine`)."""
    if state == JobState.SUBMIT_UNKNOWN:
        return "outcome_unknown"
    return "never_sent" if submitted_at is None else "sent_before"


def cancel_unsent_jobs(
    session: Session,
    batch_ids: Sequence[str],
    *,
    reason: str,
    error: str,
    error_type: str,
    worker: str | None = None,
    sent_error: str | None = None,
) -> int:
    """:func:`cancel_unsent`, for callers that need only how many it cancelled."""
    return cancel_unsent(
        session,
        batch_ids,
        reason=reason,
        error=error,
        error_type=error_type,
        worker=worker,
        sent_error=sent_error,
    ).total


def cancel_unsent(
    session: Session,
    batch_ids: Sequence[str],
    *,
    reason: str,
    error: str,
    error_type: str,
    worker: str | None = None,
    sent_error: str | None = None,
) -> UnsentCancelled:
    """Cancel every job of ``batch_ids`` in :data:`UNSENT_STATES`, set-based; returns how many,
    told apart by whether they were sent before (:class:`UnsentCancelled`).

    ``sent_error``: the error of a job that was sent before (``submitted_at``: a request of it
    failed, was timed out in fal's queue at a window's end, or its outcome stayed unknown),
    written after what ended its last request (``"<that>; <sent_error>"``), where ``error``
    would say it was never sent. None: ``error`` for every job.

    ``wanbatch cancel`` of a 100,000-job batch must take seconds, not 100,000 round trips of
    :func:`transition`. This is the same move, done per source state in one statement each: the
    UPDATE's ``WHERE state = …`` is the compare-and-set (a job a dispatcher claimed meanwhile is
    left alone, as its row lock makes the UPDATE re-check it), the version grows by one, and
    each moved job gets its :class:`JobEvent` in the same statement — on PostgreSQL an
    ``INSERT … SELECT`` from the UPDATE's ``RETURNING`` (a data-modifying CTE), on SQLite (one
    writer at a time) the returned rows inserted with one executemany. Never commits.
    """
    if not batch_ids:
        return UnsentCancelled()
    now = utcnow()
    values = _cancel_values(
        now, error=error if sent_error is None else _error_if_sent(error, sent_error), error_type=error_type
    )
    session.flush()  # pending ORM changes first: the statements below bypass the unit of work
    #: How many moved, by kind (the keys of :class:`UnsentCancelled`).
    moved_by: dict[str, int] = {"never_sent": 0, "sent_before": 0, "outcome_unknown": 0}

    def count(state: JobState, submitted_at: datetime | None, n: int) -> None:
        moved_by[unsent_kind(state, submitted_at)] += n

    for state in UNSENT_STATES:
        unproven = {"ambiguous_usd": _POSSIBLY_BILLED_MORE} if state == JobState.SUBMIT_UNKNOWN else {}
        where = [_JOBS.c.batch_id.in_(list(batch_ids)), _JOBS.c.state == state]
        for submitted_at, n in _cancel_in_state(
            session, state, where, {**values, **unproven}, reason=reason, worker=worker, now=now
        ):
            count(state, submitted_at, n)
    cancelled = UnsentCancelled(**moved_by)
    if cancelled.total:
        session.expire_all()  # Job objects already loaded in this session must not show the old state
    return cancelled


def _cancel_values(
    now: datetime, *, error: str | ColumnElement[str], error_type: str, never_sent: bool = False
) -> dict[str, Any]:
    """What a set-based cancel (:func:`_cancel_in_state`) writes to each job it moves to
    ``cancelled`` at ``now``: the move itself (the version, which fences out a late writer; no
    lease, no retry due), its end (``finished_at``, ``error``, ``error_type``) and what it
    billed: 0 for a job never sent, else what its last request billed, or NULL (not known).
    ``never_sent``: every job moved is known never to have been sent (the caller's ``WHERE``
    says so, as a resubmit's drop does): 0 outright. One place, so that ``wanbatch cancel``, a
    budget's cancel and a resubmit's drop end a job alike (each built it by hand)."""
    zero = Decimal(0)
    return {
        "state": JobState.CANCELLED,
        "version": _JOBS.c.version + 1,
        "updated_at": now,
        "finished_at": now,
        "next_attempt_at": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "error": error,
        "error_type": error_type,
        "actual_usd": zero if never_sent else _ZERO_IF_NEVER_SENT,
        "actual_billing_units": zero if never_sent else _ZERO_UNITS_IF_NEVER_SENT,
    }


def _cancel_in_state(
    session: Session,
    state: JobState,
    where: Sequence[ColumnElement[bool]],
    values: Mapping[str, Any],
    *,
    reason: str,
    worker: str | None,
    now: datetime,
) -> list[tuple[datetime | None, int]]:
    """Move the jobs in ``state`` that match ``where`` to ``cancelled`` in one UPDATE writing
    ``values`` (:func:`cancel_unsent`, :func:`cancel_unsent_over`), each with its
    :class:`JobEvent` (``reason``, ``worker``) in the same statement on PostgreSQL (a
    data-modifying CTE), in one executemany on SQLite; their earlier attempts' money is counted
    into the batch's finished totals (:func:`_add_finished`), as :func:`transition` counts a job
    it ends. Returns how many moved per ``submitted_at`` (one entry per distinct value)."""
    conn = session.connection()
    moved = (
        update(_JOBS)
        .where(*where)
        .values(dict(values))
        .returning(
            _JOBS.c.id,
            _JOBS.c.version,
            _JOBS.c.batch_id,
            _JOBS.c.submitted_at,
            _JOBS.c.actual_usd,
            _JOBS.c.ambiguous_usd,
        )
    )
    counted: list[tuple[datetime | None, int]] = []
    if conn.dialect.name == "postgresql":
        cte = moved.cte(f"moved_{state.value}")
        events = select(
            cte.c.id,
            literal(now, _EVENTS.c.at.type),
            literal(state, _EVENTS.c.from_state.type),
            literal(JobState.CANCELLED, _EVENTS.c.to_state.type),
            cte.c.version,
            literal(reason, _EVENTS.c.reason.type),
            literal(worker, _EVENTS.c.worker.type),
        )
        logged = insert(_EVENTS).from_select(list(_EVENT_COLUMNS), events).cte(f"logged_{state.value}")
        # How many moved, and what earlier attempts of theirs were (or may have been) billed,
        # by batch and last submit (a row per job ever sent; one per batch for those never sent).
        per_batch = (
            select(
                cte.c.batch_id,
                cte.c.submitted_at,
                func.count(),
                func.sum(cte.c.actual_usd),
                func.sum(cte.c.ambiguous_usd),
            )
            .group_by(cte.c.batch_id, cte.c.submitted_at)
            .add_cte(logged)
        )
        for batch_id, submitted_at, n, billed, ambiguous in conn.execute(per_batch):
            counted.append((submitted_at, int(n)))
            _add_finished(session, batch_id, submitted_at, (billed or Decimal(0)) + (ambiguous or Decimal(0)))
        return counted
    rows = conn.execute(moved).all()
    for r in rows:
        counted.append((r.submitted_at, 1))
        _add_finished(session, r.batch_id, r.submitted_at, (r.actual_usd or Decimal(0)) + r.ambiguous_usd)
    if rows:
        conn.execute(
            insert(_EVENTS),
            [
                dict(
                    zip(
                        _EVENT_COLUMNS,
                        (r.id, now, state, JobState.CANCELLED, r.version, reason, worker),
                        strict=True,
                    )
                )
                for r in rows
            ],
        )
    return counted


#: How many distinct estimates one UPDATE of :func:`cancel_unsent_over` names in its ``CASE``
#: (each a bound parameter, twice): a batch has a handful; a sweep of durations may have hundreds.
_OVER_PRICES_PER_STATEMENT = 200


def cancel_unsent_over(
    session: Session,
    batch_id: str,
    *,
    over_usd: Decimal,
    error_for: Callable[[Decimal], str],
    error_type: str,
    reason: str,
    worker: str | None,
    now: datetime,
    keep_reusable: bool,
) -> int:
    """Cancel, for good and set-based, every unsent job of ``batch_id`` that dispatch would
    claim (``pending``/``retry_wait``, not leased to anyone now) whose estimate is above
    ``over_usd``: the room a budget cap has left (README, "Budgets are never exceeded"). Each is
    moved as :func:`mark_cancelled` moves a job a budget refused when dispatch claimed it: the
    same fields (``error`` from ``error_for(est_usd)``, ``error_type``, ``finished_at``, the
    lease let go, ``actual_usd`` 0 unless earlier attempts were billed), ``version + 1``, one
    :class:`JobEvent` each (``reason``, ``worker``), and its earlier attempts' money into
    :class:`BatchTotals`. Returns how many.

    Left alone, for dispatch to decide one by one when it claims them: a job that may never be
    sent — it reruns a job that left its paid video staged (:func:`staged_original`), or, with
    ``keep_reusable`` (the batch's ``reuse_outputs``), a succeeded twin may give it its output
    (:func:`find_reusable`; any twin keeps it here, the finer checks are dispatch's) — costs no
    budget, and is never cancelled for one.

    One UPDATE per state (per :data:`_OVER_PRICES_PER_STATEMENT` distinct estimates, whose
    words differ), after one read of the estimates: a budget reached on a 50,000-job batch
    used to end its jobs one dispatch round of ten at a time, for hours. Never commits.
    """
    twin = _JOBS.alias("twin")
    original = _JOBS.alias("original")
    key = func.coalesce(_JOBS.c.content_key, _JOBS.c.job_key)
    unsent = [JobState.PENDING, JobState.RETRY_WAIT]
    where: list[ColumnElement[bool]] = [
        _JOBS.c.batch_id == batch_id,
        _JOBS.c.est_usd > literal(over_usd, _JOBS.c.est_usd.type),
        or_(
            _JOBS.c.lease_expires_at.is_(None),
            _JOBS.c.lease_expires_at <= literal(now, _JOBS.c.lease_expires_at.type),
        ),
        or_(
            _JOBS.c.rerun_of.is_(None),
            ~exists().where(
                original.c.id == _JOBS.c.rerun_of,
                original.c.state == JobState.FAILED,
                original.c.error_type == OUTPUT_NOT_KEPT,
            ),
        ),
    ]
    if keep_reusable:
        where.append(
            ~exists().where(
                or_(twin.c.job_key == key, twin.c.content_key == key),
                twin.c.id != _JOBS.c.id,
                twin.c.state == JobState.SUCCEEDED,
                twin.c.output_path.is_not(None),
            )
        )
    session.flush()  # pending ORM changes first: the statements below bypass the unit of work
    conn = session.connection()
    prices = sorted(
        conn.execute(select(_JOBS.c.est_usd).where(_JOBS.c.state.in_(unsent), *where).distinct()).scalars()
    )
    if not prices:
        return 0
    money, text_type = _JOBS.c.est_usd.type, _JOBS.c.error.type
    moved = 0
    for start in range(0, len(prices), _OVER_PRICES_PER_STATEMENT):
        chunk = prices[start : start + _OVER_PRICES_PER_STATEMENT]
        error = case(
            *[(_JOBS.c.est_usd == literal(p, money), literal(error_for(p), text_type)) for p in chunk],
            else_=literal(error_for(chunk[-1]), text_type),  # never taken: every estimate is named
        )
        priced = _JOBS.c.est_usd.in_([literal(p, money) for p in chunk])
        for state in unsent:
            for _, n in _cancel_in_state(
                session,
                state,
                [_JOBS.c.state == state, priced, *where],
                _cancel_values(now, error=error, error_type=error_type),
                reason=reason,
                worker=worker,
                now=now,
            ):
                moved += n
    if moved:
        for loaded in list(session.identity_map.values()):  # not the old state, if any is loaded
            if isinstance(loaded, Job) and loaded.batch_id == batch_id:
                session.expire(loaded)
    return moved


def _error_if_sent(error: str, sent_error: str) -> ColumnElement[str]:
    """``error`` for a job never sent; for one sent before, what ended its last request (its
    stored error, if any) followed by ``sent_error``."""
    text_type = _JOBS.c.error.type
    before = func.coalesce(_JOBS.c.error.concat(literal("; ", text_type)), literal("", text_type))
    return case(
        (_JOBS.c.submitted_at.is_not(None), before.concat(literal(sent_error, text_type))),
        else_=literal(error, text_type),
    )
