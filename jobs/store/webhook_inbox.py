"""The webhook inbox: deliveries stored, taken, settled, deferred and pruned, and the
duplicate charges and requests they tell of."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.orm import Session

from jobs import billing
from jobs.models import Batch, FalAccount, Job, JobEvent, WebhookDelivery, WebhookInboxTotals, utcnow
from jobs.states import UNFINISHED_STATES, JobState
from jobs.storable import storable_json
from jobs.store.core import _JOBS, _dialect_insert, _prepared, _refresh_loaded, _run
from jobs.store.transitions import _INSERT_EVENT, _add_finished, finished_usd


def store_delivery(
    session: Session,
    *,
    request_id: str,
    body_sha256: str,
    job_id: str | None,
    attempt: int | None,
    status: str,
    body: dict[str, Any],
    user_id: str | None = None,
) -> tuple[int, bool]:
    """Keep one verified delivery: ``(its id, True)``, or ``(the stored one's id, False)`` for a
    repeat of the very same body (counted in ``repeats``), whoever stored it first.

    ``body`` is kept as both databases can hold it (:func:`jobs.storable.storable_json`): a
    ``\\u0000`` or a lone surrogate in fal's JSON is refused by ``jsonb`` on every try, and the
    delivery (maybe the only proof that a lost submit was accepted) would never be stored.
    ``body_sha256`` stays the digest of the bytes received, which is what makes a repeat one.
    ``user_id``: the fal account it was signed for (:class:`~jobs.models.FalAccount`).
    """
    dialect = session.get_bind().dialect.name
    stmt = (
        _dialect_insert(dialect, WebhookDelivery)
        .values(
            request_id=request_id,
            body_sha256=body_sha256,
            job_id=job_id,
            attempt=attempt,
            status=status,
            body=storable_json(body),
            received_at=utcnow(),
            repeats=0,
            user_id=user_id,
        )
        .on_conflict_do_nothing(index_elements=["request_id", "body_sha256"])
        .returning(WebhookDelivery.id)
    )
    new = session.execute(stmt).first()
    if new is not None:
        _count_inbox(session, stored=1)
        return int(new.id), True
    row = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.request_id == request_id, WebhookDelivery.body_sha256 == body_sha256)
        .values(repeats=WebhookDelivery.repeats + 1)
        .returning(WebhookDelivery.id)
        .execution_options(synchronize_session=False)
    ).one()
    _count_inbox(session, repeats=1)
    return int(row.id), False


def _count_inbox(session: Session, **added: int) -> None:
    """Add to the inbox's counters (:class:`~jobs.models.WebhookInboxTotals`), its row made the
    first time (a database made from the models starts without it)."""
    dialect = session.get_bind().dialect.name
    table = WebhookInboxTotals.__table__
    values = {"stored": 0, "repeats": 0, "ignored": 0, **added}
    stmt = _dialect_insert(dialect, WebhookInboxTotals).values(id=1, **values)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["id"], set_={name: table.c[name] + stmt.excluded[name] for name in added}
        )
    )


def job_key_and_request(session: Session, job_id: str) -> tuple[str | None, str | None, int] | None:
    """``(api_key_id, request_id, attempts)`` of the job: the key its latest attempt (number
    ``attempts``) went with — the only attempt whose key the database keeps — and the request it
    keeps; None when there is no such job."""
    found = session.execute(
        select(Job.api_key_id, Job.request_id, Job.attempts).where(Job.id == job_id)
    ).first()
    return None if found is None else (found.api_key_id, found.request_id, int(found.attempts))


def fal_accounts(session: Session) -> dict[tuple[str, str], str]:
    """The fal account each API key's webhooks are pinned to, per signer
    (``(api_key_id, signer)`` → user id)."""
    rows = session.execute(select(FalAccount.api_key_id, FalAccount.signer, FalAccount.user_id))
    return {(row.api_key_id, row.signer): row.user_id for row in rows}


def pinned_account(session: Session, api_key_id: str, signer: str) -> str | None:
    """The fal account ``api_key_id``'s webhooks verified by ``signer`` are pinned to, if learnt."""
    query = select(FalAccount.user_id).where(FalAccount.api_key_id == api_key_id, FalAccount.signer == signer)
    return session.scalars(query).first()


def pin_account(
    session: Session, api_key_id: str, signer: str, user_id: str, request_id: str
) -> tuple[str, bool]:
    """Pin ``api_key_id``'s webhooks verified by ``signer`` to ``user_id``, unless one is pinned
    already (by another process meanwhile, say): ``(the pinned user id, whether this call
    pinned it)``."""
    dialect = session.get_bind().dialect.name
    stmt = (
        _dialect_insert(dialect, FalAccount)
        .values(
            api_key_id=api_key_id,
            signer=signer[:255],
            user_id=user_id[:255],
            request_id=request_id[:255],
            learnt_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["api_key_id", "signer"])
        .returning(FalAccount.api_key_id)
    )
    if session.execute(stmt).first() is not None:
        return user_id[:255], True
    mine = (FalAccount.api_key_id == api_key_id, FalAccount.signer == signer[:255])
    return session.scalars(select(FalAccount.user_id).where(*mine)).one(), False


def take_delivery(session: Session, delivery_id: int) -> WebhookDelivery | None:
    """Mark a delivery processed now, if nobody has: the delivery to apply, or None (already
    applied, or being applied by another process, whose row lock this waits for)."""
    row = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.processed_at.is_(None))
        .values(processed_at=utcnow())
        .returning(WebhookDelivery.id)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    return session.get(WebhookDelivery, delivery_id, populate_existing=True)


def settle_delivery(session: Session, delivery_id: int, outcome: str) -> None:
    """Record what applying a taken delivery did (each delivery is settled once: it was taken
    by a compare-and-set, :func:`take_delivery`)."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .values(outcome=outcome[:255])
        .execution_options(synchronize_session=False)
    )
    if outcome.startswith("ignored"):
        _count_inbox(session, ignored=1)


def prune_deliveries(session: Session, *, before: datetime, limit: int = 1000) -> int:
    """Delete up to ``limit`` deliveries applied before ``before`` (``WANBATCH_WEBHOOK_RETENTION``
    ago), oldest first, on ``ix_webhook_deliveries_processed_at``; how many.

    A delivery not applied yet is kept, whatever its age, and so is one of a job that has not
    finished (:func:`stored_proof` may still read it when the job's unknown submit is settled).
    Nothing else reads an applied delivery: a repeat of a pruned one is stored again and applied
    again, and applying is idempotent (the job's history says which requests it knows:
    :func:`request_known`), so the retention only decides how long a repeat is counted as one
    rather than stored anew. The inbox's counters are not lowered
    (:class:`~jobs.models.WebhookInboxTotals`)."""
    live = select(Job.id).where(Job.id == WebhookDelivery.job_id, Job.state.in_(UNFINISHED_STATES))
    ids = [
        int(row[0])
        for row in session.execute(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.processed_at.is_not(None),
                WebhookDelivery.processed_at < before,
                ~live.exists(),
            )
            .order_by(WebhookDelivery.processed_at)
            .limit(limit)
        )
    ]
    if ids:
        session.execute(
            delete(WebhookDelivery)
            .where(WebhookDelivery.id.in_(ids))
            .execution_options(synchronize_session=False)
        )
    return len(ids)


def defer_delivery(session: Session, delivery_id: int, why: str) -> None:
    """Give a taken delivery back, unapplied: the tick tries it again."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .values(processed_at=None, outcome=why[:255])
        .execution_options(synchronize_session=False)
    )


def unprocessed_deliveries(session: Session, *, limit: int = 200) -> list[int]:
    """Ids of deliveries not applied yet, oldest first."""
    query = _prepared(
        ("unprocessed-deliveries", limit),
        lambda: (
            select(WebhookDelivery.id)
            .where(WebhookDelivery.processed_at.is_(None))
            .order_by(WebhookDelivery.id)
            .limit(limit)
        ),
    )
    return [int(row[0]) for row in _run(session, query)]


def request_known(session: Session, job_id: str, request_id: str) -> bool:
    """Whether ``request_id`` is (or was) one of the job's requests as we recorded them: its
    current one, or one an event says fal accepted (``accepted as …``)."""
    if session.scalar(select(Job.id).where(Job.id == job_id, Job.request_id == request_id)) is not None:
        return True
    accepted = JobEvent.reason.contains(f"accepted as {request_id}", autoescape=True)
    return session.scalar(select(JobEvent.id).where(JobEvent.job_id == job_id, accepted).limit(1)) is not None


def duplicate_charge_recorded(session: Session, request_id: str) -> bool:
    """Whether a delivery of ``request_id`` was already counted as a confirmed duplicate charge."""
    found = select(WebhookDelivery.id).where(
        WebhookDelivery.request_id == request_id, WebhookDelivery.outcome == "duplicate-charge"
    )
    return session.scalar(found.limit(1)) is not None


def record_duplicate_charge(session: Session, job_id: str) -> None:
    """One more request of this job that fal proved it ran besides the one the job kept: billed.
    Bookkeeping only (no state change, no version bump), so it never disturbs a worker's fence."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(confirmed_duplicate_charges=Job.confirmed_duplicate_charges + 1, updated_at=utcnow())
        .execution_options(synchronize_session="fetch")
    )


#: What :func:`note_duplicate_charge` did: ``counted``; ``known`` (the request is on the job's
#: history already: a repeated proof, counted once); ``held`` (a worker holds the job: try later);
#: ``missing`` (no such job).
DuplicateNote = Literal["counted", "known", "held", "missing"]


def note_duplicate_charge(
    session: Session,
    job_id: str,
    request_id: str,
    *,
    reason: str,
    worker: str | None,
    outcome: billing.Outcome | None,
    now: datetime,
) -> DuplicateNote:
    """A request of the job that fal proved it ran besides the one the job keeps (its signed
    webhook, or a submit's answer that came after the job had moved on and that fal bills all
    the same), in the job's books: on its history (an event that moves nothing, ``reason``
    saying "accepted as <request_id>", so :func:`request_known` finds it and a repeated proof
    is counted once), one more ``confirmed_duplicate_charges``, and, when ``outcome`` says how
    it ended (None: fal's webhook does not tell what it billed), its bill in the job's actual
    cost: the job's estimate times the outcome's rule (:func:`jobs.billing.billed`), the price
    each attempt of the job is billed at, for a request of the same input.

    Such a request comes from a submit whose answer was lost: what it may have cost is in
    ``ambiguous_usd`` (the "possibly billed" part of the money spent), which the proof resolves.
    Its estimate leaves ``ambiguous_usd`` as far as it is there; the money stays spent, billed
    now. A finished job's share of its batch's running totals moves by the difference.

    ``held`` while a worker holds the job's lease: it bills the job from what it read when it
    took the lease (a download writes the actual cost when it ends), which would overwrite this.
    The row is locked first, so a lease taken meanwhile reads this after it commits.
    """
    return _note_billed(
        session, job_id, request_id, reason=reason, worker=worker, outcome=outcome, now=now, duplicate=True
    )


def note_own_request(
    session: Session,
    job_id: str,
    request_id: str,
    *,
    reason: str,
    worker: str | None,
    outcome: billing.Outcome,
    now: datetime,
) -> DuplicateNote:
    """The job's one request ``request_id``, whose submit's answer came only after the job
    ended without it (cancelled or failed while its outcome was unknown, no other request sent:
    :func:`unknown_cancel_adoptable`, :func:`adopt_late_proof`), which fal then billed though
    the job keeps no video of it (``outcome``: a cancel of it while running): in the job's books
    as :func:`note_duplicate_charge` puts one (on its history, billed at the estimate times the
    outcome's rule in its actual cost, its estimate out of "possibly billed"), but not counted as
    a duplicate charge — it is the only request the job had fal run. ``counted`` when done; the
    other outcomes as there."""
    return _note_billed(
        session, job_id, request_id, reason=reason, worker=worker, outcome=outcome, now=now, duplicate=False
    )


def _note_billed(
    session: Session,
    job_id: str,
    request_id: str,
    *,
    reason: str,
    worker: str | None,
    outcome: billing.Outcome | None,
    now: datetime,
    duplicate: bool,
) -> DuplicateNote:
    """:func:`note_duplicate_charge` (``duplicate``) or :func:`note_own_request`."""
    found = _run(session, select(_JOBS).where(_JOBS.c.id == job_id).with_for_update()).first()
    if found is None:
        return "missing"
    if found.lease_owner is not None and found.lease_expires_at is not None and found.lease_expires_at > now:
        return "held"
    if request_known(session, job_id, request_id):
        return "known"
    state = JobState(found.state)
    written: dict[str, Any] = (
        {"confirmed_duplicate_charges": found.confirmed_duplicate_charges + 1} if duplicate else {}
    )
    if outcome is not None:
        own = state == JobState.SUCCEEDED  # billed its estimate when no cost was recorded (finished_usd)
        prior_usd = found.actual_usd if found.actual_usd is not None else (found.est_usd if own else None)
        units = found.actual_billing_units
        prior_units = units if units is not None else (found.est_billing_units if own else None)
        bill = billing.billed(
            outcome, found.est_billing_units, found.est_usd, prior_units=prior_units, prior_usd=prior_usd
        )
        written.update(bill, ambiguous_usd=found.ambiguous_usd - min(found.ambiguous_usd, found.est_usd))
        if state.terminal:
            before = finished_usd(state, found.actual_usd, found.est_usd, found.ambiguous_usd)
            after = finished_usd(state, written["actual_usd"], found.est_usd, written["ambiguous_usd"])
            _add_finished(session, found.batch_id, found.submitted_at, after - before)
    _run(session, update(_JOBS).where(_JOBS.c.id == job_id).values(**written, updated_at=now))
    _refresh_loaded(session, job_id, written)
    event = {"job_id": job_id, "at": now, "from_state": state, "to_state": state, "version": found.version}
    event.update(reason=reason, details=None, worker=worker)
    _run(session, _INSERT_EVENT, event)
    return "counted"


def note_request(
    session: Session,
    job_id: str,
    request_id: str,
    *,
    reason: str,
    worker: str | None,
    billed: bool,
    unbilled: bool = False,
) -> bool:
    """Put ``request_id``, a request of the job that the job does not keep, on its history (a
    submit's late answer, after the job moved on), and count it as a confirmed duplicate charge
    when fal bills it (``billed``: its bill is not written; one that can be billed goes through
    :func:`note_duplicate_charge`). False when there is no such job, or the request is on its
    history already (``reason`` must say "accepted as <request_id>": :func:`request_known`).

    The note is an event that moves nothing: ``from_state`` and ``to_state`` are the job's state,
    ``version`` its version. Bookkeeping only (no state change, no version bump), so it never
    disturbs a worker's fence, and it may follow a terminal state, which nothing leaves. The
    row is locked first (an UPDATE), so two notes of one request are one, the state noted is the
    one after any move under way, and the note comes after that move's event.

    ``unbilled``: fal's answer says it bills nothing for the request (cancelled while it waited
    in its queue, or no longer known), so what its submit, whose answer was lost, may have cost
    is resolved: its estimate leaves ``ambiguous_usd`` ("possibly billed") as far as it is there
    (a simulation put nothing there), and a finished job's share of its batch's running totals
    moves by as much. Only ``ambiguous_usd`` is written, which no worker bills from what it read.
    """
    locked = update(_JOBS).where(_JOBS.c.id == job_id).values(updated_at=utcnow())
    returned = (_JOBS.c.state, _JOBS.c.version, _JOBS.c.ambiguous_usd, _JOBS.c.est_usd)
    row = _run(session, locked.returning(*returned, _JOBS.c.batch_id, _JOBS.c.submitted_at)).first()
    if row is None or request_known(session, job_id, request_id):
        return False
    if billed:
        record_duplicate_charge(session, job_id)
    elif unbilled and row.ambiguous_usd > 0:
        resolved = min(row.ambiguous_usd, row.est_usd)
        written = {"ambiguous_usd": row.ambiguous_usd - resolved}
        _run(session, update(_JOBS).where(_JOBS.c.id == job_id).values(**written))
        _refresh_loaded(session, job_id, written)
        if JobState(row.state).terminal:
            _add_finished(session, row.batch_id, row.submitted_at, -resolved)
    event = {"job_id": job_id, "at": utcnow(), "from_state": row.state, "to_state": row.state}
    event.update(version=row.version, reason=reason, details=None, worker=worker)
    _run(session, _INSERT_EVENT, event)
    return True


def delivery_counts(session: Session) -> dict[str, int]:
    """The inbox in numbers: deliveries ever stored, repeats of them, ignored (the counters kept
    as they happen, :class:`~jobs.models.WebhookInboxTotals`: one row), and still to apply (a
    range of ``ix_webhook_deliveries_processed_at``). Never a pass over every delivery: a
    scrape read the whole inbox, which only grew."""
    totals = session.execute(
        select(WebhookInboxTotals.stored, WebhookInboxTotals.repeats, WebhookInboxTotals.ignored).where(
            WebhookInboxTotals.id == 1
        )
    ).first()
    unprocessed = session.scalar(
        select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.processed_at.is_(None))
    )
    stored, repeats, ignored = totals if totals is not None else (0, 0, 0)
    return {
        "stored": int(stored),
        "repeats": int(repeats),
        "unprocessed": int(unprocessed or 0),
        "ignored": int(ignored),
    }


#: The states of a job whose request fal finished (a completion or a failure fal told of).
_ENDED_AT_FAL = (JobState.DOWNLOADING, JobState.SUCCEEDED, JobState.FAILED)


def webhooks_heard(session: Session, batch_id: str, *, since: datetime) -> tuple[int, int]:
    """Of ``batch_id``'s jobs sent since ``since`` whose request fal has finished: how many, and
    for how many of them a webhook delivery was stored (``ix_webhook_deliveries_job_id``). With
    a receiver that fal reaches, every one has its delivery (long before the safety net's poll);
    none for several says fal's webhooks do not arrive (:mod:`jobs.webhook_silence`). ``(0, 0)``
    for a ``--simulate`` batch: its requests went to the bundled simulator, never with a webhook."""
    if session.scalar(select(Batch.simulated).where(Batch.id == batch_id)):
        return 0, 0
    heard = select(WebhookDelivery.id).where(WebhookDelivery.job_id == Job.id).exists()
    ended, delivered = session.execute(
        select(func.count(), func.coalesce(func.sum(case((heard, 1), else_=0)), 0)).where(
            Job.batch_id == batch_id,
            Job.request_id.is_not(None),
            Job.submitted_at >= since,
            Job.state.in_(_ENDED_AT_FAL),
        )
    ).one()
    return int(ended), int(delivered)
