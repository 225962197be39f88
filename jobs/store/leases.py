"""Leases: claiming due jobs (``FOR UPDATE SKIP LOCKED``), taking, extending and releasing a
job's lease, recording a submit's POST as sent, and taking back the jobs of processes that died."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, bindparam, exists, func, or_, select, update
from sqlalchemy.orm import Session

from jobs.clock import naive_utc
from jobs.models import ConductorHeartbeat, Job, JobRecord, utcnow
from jobs.states import UNFINISHED_STATES, JobState
from jobs.store.core import _JOBS, _SENT_PG, _SENT_SQLITE, _kept, _prepared, _run, _same_request_elsewhere
from jobs.store.due import _due, _due_fairly
from jobs.store.outcomes import give_back, give_back_not_sent
from jobs.store.transitions import _UNLEASED, Fence, _check_fields, _fenced_update, update_job_fields


def claim_jobs(
    session: Session,
    *,
    states: Sequence[JobState],
    limit: int,
    now: datetime,
    owner: str,
    lease_seconds: float,
    batch_id: str | None = None,
    batch_ids: Iterable[str] | None = None,
    active_batches_only: bool = False,
    endpoints: Sequence[str] | None = None,
    exclude_ids: Collection[str] = (),
    exclude_batch_ids: Collection[str] = (),
    sent_to: str | None = None,
) -> list[Job]:
    """Lease up to ``limit`` due jobs in ``states`` to ``owner``; no two claimers get the same job.

    Due means ``next_attempt_at`` is unset or not after ``now``, and any previous lease has
    expired (so a crashed worker's jobs come back after ``lease_seconds``). Claiming bumps each
    job's ``version``: the returned objects carry the new one, to fence later writes with.
    ``active_batches_only`` skips jobs of paused or cancelled batches (for submitting; polling
    must go on regardless); ``endpoints`` keeps only jobs of those endpoints (per-endpoint
    caps); ``batch_ids`` keeps only jobs of those batches (an embedded ``run`` works on its own
    batch, never on another one that was only submitted); ``exclude_ids`` skips those jobs (the
    ones a status stream already watches); ``exclude_batch_ids`` skips those batches' jobs (closed
    by their schedule, paused by their user); ``sent_to`` keeps only jobs whose request went to
    that fal queue origin, or to one not recorded (:func:`sent_to_origin`). Oldest jobs first.
    """
    found = _due(
        session,
        record=False,
        states=states,
        limit=limit,
        now=now,
        batch_id=batch_id,
        batch_ids=batch_ids,
        active_batches_only=active_batches_only,
        endpoints=endpoints,
        exclude_ids=exclude_ids,
        exclude_batch_ids=exclude_batch_ids,
        sent_to=sent_to,
    )
    ids = [r.id for r in found]
    if not ids:
        return []
    _run(
        session,
        _prepared(
            ("claim-lease",),
            lambda: (
                update(_JOBS)
                .where(_JOBS.c.id.in_(bindparam("ids", expanding=True)))
                .values(
                    lease_owner=bindparam("owner"),
                    lease_expires_at=bindparam("until"),
                    version=_JOBS.c.version + 1,
                )
            ),
        ),
        {"ids": ids, "owner": owner, "until": now + timedelta(seconds=lease_seconds)},
    )
    claimed = session.scalars(
        _prepared(
            ("claim-load",),
            lambda: (
                select(Job)
                .where(Job.id.in_(bindparam("ids", expanding=True)))
                .order_by(Job.created_at, Job.item_index, Job.id)
                .execution_options(populate_existing=True)
            ),
        ),
        {"ids": ids},
    )
    return list(claimed)


def claim_due(
    session: Session,
    *,
    states: Sequence[JobState],
    limit: int,
    now: datetime,
    batch_ids: Iterable[str] | None = None,
    active_batches_only: bool = False,
    endpoints: Sequence[str] | None = None,
    exclude_batch_ids: Collection[str] = (),
) -> list[JobRecord]:
    """:func:`claim_jobs` for a caller that moves every job returned before its transaction ends
    (dispatch marks each ``submitting``, ``cancelled`` or reused: each move leases or releases
    it, fenced by the version read here): no lease UPDATE, no second read. The jobs stay locked
    to other claimers until the commit: ``SKIP LOCKED`` row locks on PostgreSQL, the single
    writer on SQLite.

    Their columns as read (Core rows: a claim runs on every completion, and building ORM objects
    cost more than the query), those of :class:`~jobs.models.JobRecord` only: the rest cost the
    claim twice what it costs without them, and nothing of the round reads them. A move does
    not update them: the hold after one is :meth:`Fence.moved`.

    Not simply the oldest: the slots are shared between the batches with jobs to send, normal
    priority before ``priority: low``, each next slot to the batch with the fewest requests at
    fal, and a batch's own jobs in item order (:func:`jobs.store.due._due_fairly`).
    """
    return _due_fairly(
        session,
        states=states,
        limit=limit,
        now=now,
        batch_ids=batch_ids,
        active_batches_only=active_batches_only,
        endpoints=endpoints,
        exclude_batch_ids=exclude_batch_ids,
    )


def take_lease(
    session: Session, fence: Fence, *, now: datetime, lease_seconds: float, **fields: Any
) -> Fence | None:
    """Lease the job to ``fence.owner`` for one step, bumping ``version``: the new fence, or None if lost.

    Unlike :func:`update_job_fields` this *bumps* the fencing token, so of two workers that read
    the same version (a message delivered twice) exactly one wins: the other's write matches 0
    rows. The step then fences everything it writes with the returned fence. ``fields`` are
    written in the same UPDATE (e.g. the exact input about to be submitted).
    """
    _check_fields(fields)
    values = {
        "lease_owner": fence.owner,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "updated_at": utcnow(),
        **fields,
    }
    row = _fenced_update(session, fence.job_id, fence.version, values, bump=True)
    return None if row is None else fence.at(int(row.version))


def record_send(
    session: Session,
    fence: Fence,
    *,
    now: datetime,
    lease_seconds: float,
    submitted_input: dict[str, Any],
    sent_at: datetime,
    api_key_id: str,
    start_timeout_at: datetime | None = None,
    fal_origin: str | None = None,
) -> Fence | None:
    """:func:`take_lease` for a submit's POST, recording the exact input, the send time and the
    id of the API key the POST goes with right before it goes out: the new fence, or None if
    lost. The key is the sending process's (dispatch recorded its own, which on distributed
    workers is the tick leader's, not necessarily the key of the worker that sends).
    ``fal_origin``: the origin of the fal queue the POST goes to (``Job.fal_origin``): only a
    process configured with that queue asks about the request afterwards (:func:`claim_jobs`'s
    ``sent_to``).
    ``start_timeout_at``: when the start timeout the POST carries ends (None: it carries none),
    what fal's ``request_timeout`` of it is judged by.

    This is the moment the job is *sent again*: when the attempt is the resend of a submit whose
    outcome stayed unknown (``resend_attempt``), it counts in ``possible_duplicate_charges``
    here, in the same UPDATE — not when the resend was decided, since a cancel, a budget or a
    deadline may end the job before it goes. (:func:`give_back` uncounts it if it then does not.)
    The start timeout the job held until now (the earlier attempt's) is kept aside in
    ``earlier_start_timeout_at``, for :func:`give_back` to put back should this POST be refused.
    A mark of earlier item numbers nobody recorded (:data:`EARLIER_ITEMS_UNKNOWN`) is dropped
    (:data:`_UNKNOWN_DROPPED_PG`): its download would list the whole output folder for a file
    that cannot be this request's.
    """
    values = {
        "lease_owner": fence.owner,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "updated_at": utcnow(),
        "submitted_input": submitted_input,
        "sent_at": sent_at,
        "start_timeout_at": start_timeout_at,
        "api_key_id": api_key_id,
        "fal_origin": fal_origin,
    }
    counted = _SENT_PG if session.connection().dialect.name == "postgresql" else _SENT_SQLITE
    row = _fenced_update(session, fence.job_id, fence.version, values, bump=True, counted=counted)
    return None if row is None else fence.at(int(row.version))


def extend_lease(session: Session, fence: Fence, *, now: datetime, lease_seconds: float) -> bool:
    """Heartbeat: push the lease out if ``fence.owner`` still holds it at ``fence.version``."""
    if fence.owner is None:
        return False  # nobody holds a lease that has no owner
    values = {"lease_expires_at": now + timedelta(seconds=lease_seconds)}
    return _fenced_update(session, fence.job_id, fence.version, values, owner=fence.owner) is not None


def release_lease(
    session: Session, fence: Fence, *, next_attempt_at: datetime | None = None, **fields: Any
) -> bool:
    """Let go of a job where it is, due again at ``next_attempt_at`` (at once when None): a
    limit was reached, or the step asks fal again later. ``fields`` record why (e.g. a count of
    failed tries); no state change, no version bump."""
    return update_job_fields(
        session,
        fence.job_id,
        expected_version=fence.version,
        next_attempt_at=next_attempt_at,
        **_UNLEASED,
        **fields,
    )


@dataclass(frozen=True, slots=True)
class ReleasedLeases:
    """What :func:`release_process_leases` (or :func:`release_step_jobs`) did.

    ``unsent``: ``submitting`` jobs whose POST had not started, back to ``pending``.
    ``released``: other jobs whose lease was cleared (downloads, status checks, queued downloads),
    due again at once. ``in_flight``: ``submitting`` jobs whose exact input is recorded, so their
    POST may be on its way: left alone for the reconciler, which never resends blindly.
    """

    unsent: int = 0
    released: int = 0
    in_flight: int = 0


def release_process_leases(
    session: Session,
    owner_prefix: str,
    *,
    batch_ids: Iterable[str] | None = None,
    queued_owner: str | None = None,
    worker: str | None = None,
    proven_unsent: Mapping[str, ProvenUnsentSend] | None = None,
) -> ReleasedLeases:
    """Give back every lease held by one stopping process, so the next run picks its jobs up at once.

    Lease owners are ``host:pid:thread``; ``owner_prefix`` (``host:pid:``) matches every thread
    of the process. Without this a Ctrl-C left the process's jobs leased to a dead owner until the
    lease expired (``WANBATCH_LEASE_SECONDS``). ``queued_owner`` also clears that owner's leases on
    the jobs of ``batch_ids``: the download messages an embedded run queued in its own memory, which
    die with it. A job whose POST may be in flight is never touched: only the reconciler may decide
    what became of it — unless the process proves its POST never went (``proven_unsent``, see
    :func:`_give_back_unsent`). Each move is a compare-and-set, so a thread of the stopping process
    that takes a lease meanwhile (to send its POST) wins and is counted as in flight instead.
    """
    if not owner_prefix:
        raise ValueError("release_process_leases needs an owner prefix")
    ours = Job.lease_owner.startswith(owner_prefix, autoescape=True)
    unsent, in_flight = _give_back_unsent(
        session, ours, worker, reason="given back: the process stopped before sending", proven=proven_unsent
    )
    holders: ColumnElement[bool] = ours
    if queued_owner is not None:
        queued = Job.lease_owner == queued_owner
        if batch_ids is not None:
            queued = queued & Job.batch_id.in_(sorted(set(batch_ids)))
        holders = or_(ours, queued)
    released = _clear_leases(session, holders)
    return ReleasedLeases(unsent=unsent, released=released, in_flight=in_flight)


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """Another process's live leases on a batch's unfinished jobs (:func:`lease_holders`)."""

    #: The lease owner as stored (``host:pid:thread``, or a queue's name).
    owner: str
    jobs: int
    #: When the last of them lapses, if nothing renews it.
    until: datetime


def lease_holders(session: Session, batch_id: str, *, now: datetime, excluding: str) -> list[LeaseHolder]:
    """Who else holds live leases on ``batch_id``'s unfinished jobs: every owner not starting with
    ``excluding`` (this process's ``host:pid:``). A ``--simulate`` run asks, to take back at once
    what a dead simulated run held, or to say what it waits for (:mod:`worker.steps.dead_leases`)."""
    rows = session.execute(
        select(Job.lease_owner, func.count(), func.max(Job.lease_expires_at))
        .where(
            Job.batch_id == batch_id,
            Job.state.in_(UNFINISHED_STATES),
            Job.lease_owner.is_not(None),
            Job.lease_expires_at > now,
            ~Job.lease_owner.startswith(excluding, autoescape=True),
        )
        .group_by(Job.lease_owner)
        .order_by(Job.lease_owner)
    ).all()
    return [LeaseHolder(str(owner), int(count), until) for owner, count, until in rows if until is not None]


def lease_holders_of_batches(
    session: Session, batch_ids: Collection[str], *, now: datetime, excluding: str
) -> dict[str, list[LeaseHolder]]:
    """:func:`lease_holders` of each of ``batch_ids`` (those with none left out), in one query:
    what ``status`` reads to name the holders that are gone (:func:`jobs.listing.dead_holders`)."""
    if not batch_ids:
        return {}
    rows = session.execute(
        select(Job.batch_id, Job.lease_owner, func.count(), func.max(Job.lease_expires_at))
        .where(
            Job.batch_id.in_(sorted(set(batch_ids))),
            Job.state.in_(UNFINISHED_STATES),
            Job.lease_owner.is_not(None),
            Job.lease_expires_at > now,
            ~Job.lease_owner.startswith(excluding, autoescape=True),
        )
        .group_by(Job.batch_id, Job.lease_owner)
        .order_by(Job.batch_id, Job.lease_owner)
    ).all()
    found: dict[str, list[LeaseHolder]] = {}
    for batch_id, owner, count, until in rows:
        if until is not None:
            found.setdefault(str(batch_id), []).append(LeaseHolder(str(owner), int(count), until))
    return found


def owners_last_seen(session: Session, prefixes: Collection[str]) -> dict[str, datetime]:
    """When each of the processes ``prefixes`` (``host:pid:``) last recorded a heartbeat, any
    scope (:class:`~jobs.models.ConductorHeartbeat`); those without a row are left out (never
    beat, or stopped cleanly: a process that stops cleanly deletes its rows)."""
    wanted = sorted(set(prefixes))
    if not wanted:
        return {}
    rows = session.execute(
        select(ConductorHeartbeat.owner, func.max(ConductorHeartbeat.seen_at))
        .where(or_(*(ConductorHeartbeat.owner.startswith(p, autoescape=True) for p in wanted)))
        .group_by(ConductorHeartbeat.owner)
    ).all()
    seen: dict[str, datetime] = {}
    for owner, at in rows:
        prefix = next((p for p in wanted if str(owner).startswith(p)), None)
        if prefix is not None and at is not None and (prefix not in seen or at > seen[prefix]):
            seen[prefix] = at
    return seen


def expire_leases(session: Session, batch_id: str, owners: Collection[str], *, now: datetime) -> int:
    """Let the leases ``owners`` hold on ``batch_id``'s unfinished jobs lapse now, as if their time
    had run out: their owners are known to be gone, so the jobs are claimed again at once, through
    the same paths as any expired lease (a ``submitting`` one by the reconciler). The owner stays
    written, for the history. How many jobs."""
    if not owners:
        return 0
    lapsed = session.execute(
        update(Job)
        .where(
            Job.batch_id == batch_id,
            Job.state.in_(UNFINISHED_STATES),
            Job.lease_owner.in_(sorted(set(owners))),
            Job.lease_expires_at > now,
        )
        .values(lease_expires_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(lapsed.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class TakenBack:
    """What :func:`take_back_dead_leases` did: jobs not sent yet back to ``pending``
    (``unsent``), other leases lapsed now (``lapsed``: downloads, status checks, result
    fetches), and submits whose POST may be out, left to their lease (``in_flight``)."""

    unsent: int
    lapsed: int
    in_flight: int


def adopt_requests_sent_elsewhere(
    session: Session, batch_id: str, origin: str, *, now: datetime, only_if: Callable[[], bool] | None = None
) -> dict[str, int]:
    """Make ``batch_id``'s requests at fal that were sent to another fal queue than ``origin`` this
    queue's to follow (``Job.fal_origin`` := ``origin``): how many, by the origin they had.

    For an embedded ``run`` of the batch that nothing else follows (no other live process beats
    for it, nor the distributed workers): a request sent to a queue URL nobody runs any more (the
    user changed ``WANBATCH_FAL_QUEUE_URL`` between runs of the batch, a stand-in's port changed)
    would otherwise never be asked about again, its job queued for good. Asked about here, fal
    answers it as ever (a proxy and fal itself share requests), or says it never had it. A
    request whose id a job of this queue holds too is left where it was.

    Its two statements are built once (:func:`_prepared`): an embedded run asks this every
    :data:`worker.steps.dead_leases.SCAN_SECONDS`, and building them (an alias, a correlated
    ``EXISTS``) cost ~2.5 ms of CPU a call, ten times running them.

    ``only_if``: asked, in the caller's transaction, only once some request is found to adopt;
    False leaves them all as they are (and returns nothing). The caller's condition (no other
    live process follows the batch: two reads of the heartbeats) then costs nothing in the usual
    case, every request sent to this queue."""
    params = {"a_batch": batch_id, "a_origin": origin, "a_now": now}
    count, move = _prepared(("adopt-elsewhere",), _adopt_elsewhere_statements)
    counts = {str(was): int(n) for was, n in _run(session, count, params)}
    if not counts or (only_if is not None and not only_if()):
        return {}
    _run(session, move, params)
    return counts


def _adopt_elsewhere_statements() -> tuple[Any, Any]:
    """:func:`adopt_requests_sent_elsewhere`'s count and update, bound at execution to
    ``a_batch``, ``a_origin`` and ``a_now`` (not column names: the update sets two columns)."""
    jobs = _JOBS.c
    origin = bindparam("a_origin", type_=jobs.fal_origin.type)
    held = (
        (jobs.batch_id == bindparam("a_batch", type_=jobs.batch_id.type))
        & jobs.state.in_([JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING, JobState.DOWNLOADING])
        & jobs.request_id.is_not(None)
        & jobs.fal_origin.is_not(None)
        & (jobs.fal_origin != origin)
    )
    # A request id is fal's within one queue: one a job of this queue holds (a seeded stand-in
    # restarted on another port hands out its ids again) would be that job's request here.
    other = _JOBS.alias("other")
    held = held & ~exists().where(_same_request_elsewhere(other.c, jobs.request_id, jobs.id, origin))
    count = select(jobs.fal_origin, func.count()).where(held).group_by(jobs.fal_origin)
    move = (
        update(_JOBS)
        .where(held)
        .values(fal_origin=origin, updated_at=bindparam("a_now", type_=jobs.updated_at.type))
    )
    return _kept(count), _kept(move)


def take_back_dead_leases(
    session: Session, batch_id: str, owners: Collection[str], *, now: datetime, worker: str
) -> TakenBack:
    """Take back at once what ``owners`` — processes known to have ended — hold on ``batch_id``'s
    unfinished jobs, as far as that can never pay for anything twice:

    * a job claimed but not sent (``submitting``, no input recorded) goes back to ``pending`` by a
      fenced move: should its holder live after all, its own send is fenced out (it records the
      send by the version this moves on), so the job goes out once;
    * any other lease (a download, a status check, a result fetch) lapses now: the work is done
      again at worst, and its outcome recorded once (fenced);
    * a submit whose POST may be out (its input recorded) is left to its lease: its outcome is
      unknown, and only the reconciler decides it once the lease lapses (``submit_unknown``,
      never resent blindly). A live holder — one that merely looked gone — renews that lease
      while its POST is in flight, so its answer is never declared unknown while it may come.
    """
    if not owners:
        return TakenBack(0, 0, 0)
    theirs = (
        (Job.batch_id == batch_id) & Job.lease_owner.in_(sorted(set(owners))) & (Job.lease_expires_at > now)
    )
    unsent, in_flight = _give_back_unsent(
        session,
        theirs,
        worker,
        reason="taken back from a process of this host that has ended, before it sent",
    )
    lapsed = session.execute(
        update(Job)
        .where(theirs, Job.state.in_([s for s in UNFINISHED_STATES if s != JobState.SUBMITTING]))
        .values(lease_expires_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return TakenBack(unsent, int(lapsed.rowcount), in_flight)  # type: ignore[attr-defined]


def release_step_jobs(
    session: Session,
    job_ids: Collection[str],
    owner_prefix: str,
    *,
    queued_owner: str,
    worker: str,
    proven_unsent: Mapping[str, ProvenUnsentSend] | None = None,
) -> ReleasedLeases:
    """Give back the jobs whose step the database failed (a killed connection, a restart), once
    it answers again: the tick takes them up at once, not after their lease runs out.

    A job not sent yet (``submitting``, no input recorded) goes back to ``pending`` whoever's
    lease it is under: dispatch leased it, in this process or in the tick leader's, for the very
    step that failed, and a copy of that step's message that might still run is fenced out (it
    takes the lease by the version this moves on). A lease of this process (``owner_prefix``) or
    of ``queued_owner`` (a download message not running yet) is cleared. A job whose POST may
    have gone out is left alone (``in_flight``), for the reconciler — unless this process proves
    that very send never went (``proven_unsent``: the database failed the commit of its record,
    see :func:`_give_back_unsent`).
    """
    if not owner_prefix:
        raise ValueError("release_step_jobs needs an owner prefix")
    only = Job.id.in_(sorted(set(job_ids)))
    unsent, in_flight = _give_back_unsent(
        session,
        only,
        worker,
        reason="given back: the database failed its submit before sending",
        proven=proven_unsent,
    )
    ours = Job.lease_owner.startswith(owner_prefix, autoescape=True)
    released = _clear_leases(session, only & or_(ours, Job.lease_owner == queued_owner))
    return ReleasedLeases(unsent=unsent, released=released, in_flight=in_flight)


@dataclass(frozen=True, slots=True)
class ProvenUnsentSend:
    """A send recorded at ``sent_at`` that the process which recorded it knows never went out
    (``why``): its POST was never made, though the record may have committed."""

    sent_at: datetime
    why: str


def _give_back_unsent(
    session: Session,
    which: ColumnElement[bool],
    worker: str | None,
    *,
    reason: str,
    proven: Mapping[str, ProvenUnsentSend] | None = None,
) -> tuple[int, int]:
    """``submitting`` jobs matching ``which``: those whose POST has not started (no input
    recorded) back to ``pending``; returns how many moved, and how many may be in flight (their
    input recorded, or moved on by someone else meanwhile) and were left alone.

    A job whose send is recorded goes back too when ``proven`` holds that very send (the same
    ``sent_at``): its process knows the POST was never made — the database failed as the send's
    record committed (a reply lost, a log that could not be synced), so the record may have
    landed though the step saw it fail and sent nothing. Without the proof it waited for its
    lease to lapse and ended ``submit_unknown``, "possibly billed", for a request fal never saw.
    """
    unsent = in_flight = 0
    submitting = session.execute(
        select(Job.id, Job.version, Job.submitted_input.is_(None), Job.sent_at)
        .where(Job.state == JobState.SUBMITTING, which)
        .order_by(Job.id)
    ).all()
    for job_id, version, not_sent, sent_at in submitting:
        fence = Fence(job_id, JobState.SUBMITTING, version, worker)
        proof = None if not_sent or proven is None else proven.get(job_id)
        if proof is not None and _same_moment(proof.sent_at, sent_at):
            moved = give_back_not_sent(session, fence, proof.why)
        else:
            moved = not_sent and give_back(session, fence, reason=reason)
        if moved:
            unsent += 1
        else:
            in_flight += 1
    return unsent, in_flight


def _same_moment(noted: datetime, stored: datetime | None) -> bool:
    """Whether ``noted`` and ``stored`` are one instant, whichever of them carries a zone (a
    PostgreSQL column hands it back aware, SQLite's naive in UTC)."""
    return stored is not None and naive_utc(noted) == naive_utc(stored)


def _clear_leases(session: Session, holders: ColumnElement[bool]) -> int:
    """Clear the lease of every job matching ``holders`` that is neither being submitted (the
    reconciler's) nor finished: due again at once. How many."""
    cleared = session.execute(
        update(Job)
        .where(holders, Job.state.not_in([JobState.SUBMITTING, *(s for s in JobState if s.terminal)]))
        .values(lease_owner=None, lease_expires_at=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(cleared.rowcount)  # type: ignore[attr-defined]
