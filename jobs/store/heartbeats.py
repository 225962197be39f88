"""Heartbeats: who works on which batch, when each process and the workers last said so,
and which other processes share the submit pacing."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from jobs.models import EVERY_BATCH, SERVE_SCOPE, WORKER_SCOPE, Batch, ConductorHeartbeat
from jobs.store.core import _dialect_insert

#: Heartbeats of processes that died without clearing them are forgotten after this long.
HEARTBEAT_KEPT = timedelta(days=7)


def record_heartbeat(
    session: Session,
    owner: str,
    scopes: Collection[str],
    now: datetime,
    *,
    supersede_before: datetime | None = None,
    broker_down_since: datetime | None = None,
    limits: dict[str, Any] | None = None,
) -> None:
    """``owner`` works on ``scopes`` (batch ids, or :data:`~jobs.models.EVERY_BATCH`) as of ``now``;
    rows of processes silent for :data:`HEARTBEAT_KEPT` go (each crash leaves its rows behind).
    ``broker_down_since``: since when ``owner`` could not reach the broker (None: it can; see
    :func:`mark_broker_down`). ``limits``: the account-wide limits it dispatches with
    (:func:`jobs.account_limits.published`; None: it dispatches nothing), read by :func:`live_limits`.

    ``supersede_before`` (with :data:`~jobs.models.EVERY_BATCH` among ``scopes``): the every-batch
    rows of other owners last seen before it go too. Those workers stopped (a live one beats far
    more often), and this one works on every batch since: left behind, a crashed worker's row
    outlived this one's clean stop and made ``status`` say "last seen 32m ago" of batches this one
    had just processed. A live peer that was passed over (SQLite, where every worker leads)
    writes its row again at its next beat."""
    session.execute(delete(ConductorHeartbeat).where(ConductorHeartbeat.seen_at < now - HEARTBEAT_KEPT))
    if supersede_before is not None and EVERY_BATCH in scopes:
        session.execute(
            delete(ConductorHeartbeat).where(
                ConductorHeartbeat.scope == EVERY_BATCH,
                ConductorHeartbeat.owner != owner,
                ConductorHeartbeat.seen_at < supersede_before,
            )
        )
    dialect = session.get_bind().dialect.name
    for scope in sorted(scopes):  # in key order: two processes beating never deadlock
        stmt = _dialect_insert(dialect, ConductorHeartbeat).values(
            owner=owner, scope=scope, seen_at=now, broker_down_since=broker_down_since, limits=limits
        )
        beat = stmt.on_conflict_do_update(
            index_elements=["owner", "scope"],
            set_={
                "seen_at": stmt.excluded.seen_at,
                "broker_down_since": stmt.excluded.broker_down_since,
                "limits": stmt.excluded.limits,
            },
        )
        session.execute(beat)


def mark_broker_down(session: Session, owner: str, since: datetime | None) -> None:
    """``owner`` (the workers' leader) could not reach the broker since ``since``, or (None) it
    reaches it again: said on its heartbeat rows at once, not at its next beat, so ``status``
    names the broker instead of what the outage holds back (:func:`workers_broker_down_since`).
    A process that never beat has no row: its first beat carries it."""
    session.execute(
        update(ConductorHeartbeat).where(ConductorHeartbeat.owner == owner).values(broker_down_since=since)
    )


def workers_broker_down_since(session: Session, *, live_since: datetime) -> datetime | None:
    """Since when the distributed workers' leader could not reach the broker, as its every-batch
    heartbeat says (rows last seen before ``live_since`` are a stopped worker's: they say
    nothing); None: it reaches it, or no worker beats."""
    return session.scalar(
        select(func.min(ConductorHeartbeat.broker_down_since)).where(
            ConductorHeartbeat.scope == EVERY_BATCH,
            ConductorHeartbeat.seen_at >= live_since,
        )
    )


def drop_heartbeats(session: Session, owner: str) -> None:
    """``owner`` stopped working on anything (a clean exit)."""
    session.execute(delete(ConductorHeartbeat).where(ConductorHeartbeat.owner == owner))


def pacing_peers(session: Session, own: str, *, since: datetime) -> list[str]:
    """The other processes (``host:pid:``) that work on this database now: a heartbeat of
    theirs at ``since`` or later, as ``status`` and ``doctor`` tell live processes
    (:func:`jobs.db.live_processes`). ``own``: this process's prefix, left out; a process of
    this host that has ended is left out too, and a ``serve`` (:data:`~jobs.models.SERVE_SCOPE`:
    it sends nothing). One short query, asked at a heartbeat, not per submit: whether the submit
    pacing is to be shared through the database (:func:`share_pacing`)."""
    from jobs.processes import owner_ended, owner_prefix, refetch_claim

    rows = session.scalars(
        select(ConductorHeartbeat.owner)
        .where(ConductorHeartbeat.seen_at >= since, ConductorHeartbeat.scope != SERVE_SCOPE)
        .distinct()
    )
    found: set[str] = set()
    for owner in rows:
        prefix = owner_prefix(str(owner))
        if prefix is None or prefix == own or owner_ended(str(owner)) or refetch_claim(str(owner)):
            continue  # a refetch sends nothing
        found.add(prefix)
    return sorted(found)


def live_limits(session: Session, own: str, *, since: datetime) -> dict[str, Any]:
    """The account-wide limits each other live dispatching process published with its heartbeat
    (:func:`record_heartbeat`'s ``limits``), by ``host:pid:``: a heartbeat at ``since`` or later
    that carries them. ``own``: this process's prefix, left out (None: none, ``doctor``); a
    process of this host that has ended is left out too. One short query, at a heartbeat (or
    ``doctor``): the rows are a handful, one per process and batch."""
    from jobs.processes import owner_ended, owner_prefix

    rows = session.execute(
        select(ConductorHeartbeat.owner, ConductorHeartbeat.limits)
        .where(ConductorHeartbeat.seen_at >= since, ConductorHeartbeat.limits.isnot(None))
        .order_by(ConductorHeartbeat.owner)
    )
    found: dict[str, Any] = {}
    for owner, limits in rows:
        prefix = owner_prefix(str(owner))
        if prefix is None or prefix == own or prefix in found or owner_ended(str(owner)):
            continue
        found[prefix] = limits
    return found


def heartbeat_owners(session: Session, batch_id: str, *, since: datetime | None) -> list[str]:
    """The processes (``host:pid:``…) that said at ``since`` or later (None: ever) that they work
    on ``batch_id`` itself (an embedded run of it; the workers' every-batch beat is not one)."""
    query = select(ConductorHeartbeat.owner).where(ConductorHeartbeat.scope == batch_id)
    if since is not None:
        query = query.where(ConductorHeartbeat.seen_at >= since)
    return [str(owner) for owner in session.scalars(query.order_by(ConductorHeartbeat.owner))]


def batch_beaters(session: Session, batch_id: str, *, since: datetime) -> dict[str, datetime]:
    """When each process that said at ``since`` or later that it works on ``batch_id`` itself (an
    embedded run of it, not the workers' every-batch beat) last said so, by heartbeat owner
    (``host:pid:thread@…``): what tells a run of the batch on another machine is still alive
    (:func:`jobs.batches.refuse_live_elsewhere`)."""
    rows = session.execute(
        select(ConductorHeartbeat.owner, ConductorHeartbeat.seen_at).where(
            ConductorHeartbeat.scope == batch_id, ConductorHeartbeat.seen_at >= since
        )
    )
    return {str(owner): at for owner, at in rows}


def live_simulators(session: Session, batch_id: str) -> dict[str, int]:
    """The simulators of the other live processes of this host that simulate ``batch_id``: their
    origin (``jobs.fal_origin`` of the requests each accepted) → the pid that runs it, from the
    claims those processes hold (:func:`jobs.processes.simulation_owner`), whatever their age; a
    claim whose process ended (or whose pid another process took since) holds nothing."""
    from jobs.processes import claim_holder, simulation_claim

    found: dict[str, int] = {}
    for owner in heartbeat_owners(session, batch_id, since=None):
        claim = simulation_claim(owner)
        if claim is not None and (pid := claim_holder(owner)) is not None:
            found[claim[1]] = pid
    return found


def last_heartbeat(session: Session, batch_id: str, *, live_since: datetime | None = None) -> datetime | None:
    """When a process last said it works on ``batch_id`` (its own or every batch, a simulation
    its own only); None: never. ``live_since``: see :func:`last_heartbeats`."""
    return last_heartbeats(session, [batch_id], live_since=live_since).get(batch_id)


@dataclass(frozen=True, slots=True)
class BatchBeat:
    """When processes last said they work on a batch (:func:`batch_beats`)."""

    #: The latest beat of any process, one that has ended too: when the batch was last seen
    #: processed (``status``'s "last seen 40s ago").
    seen: datetime
    #: The latest beat of a process not known to have ended (``gone`` of :func:`batch_beats`);
    #: None when every process that beat for the batch is known to have ended.
    live: datetime | None

    @property
    def ended(self) -> bool:
        """Whether the latest beat is a process's that is known to have ended (a killed ``run``
        of this host): it tells when the batch was last seen, never that it is processed."""
        return self.live is None or self.live < self.seen


def last_heartbeats(
    session: Session, batch_ids: Collection[str], *, live_since: datetime | None = None
) -> dict[str, datetime]:
    """:func:`last_heartbeat` of each of ``batch_ids`` (those never beaten for are left out):
    :attr:`BatchBeat.seen` of :func:`batch_beats`."""
    return {b: beat.seen for b, beat in batch_beats(session, batch_ids, live_since=live_since).items()}


def batch_beats(
    session: Session,
    batch_ids: Collection[str],
    *,
    live_since: datetime | None = None,
    gone: Callable[[str], bool] | None = None,
) -> dict[str, BatchBeat]:
    """When a process last said it works on each of ``batch_ids`` (those never beaten for are
    left out), and when one not known to have ended did (``gone``: whether an owner,
    ``host:pid:``…, is a process known to have ended; each owner asked once), in one query (and
    one more for the batches, when the workers ever beat). A row per process and scope: a
    batch has a few (its runs, their claims), the workers' every-batch scope one per live leader.

    The workers' every-batch beat counts for a batch from its creation on. One from before the
    batch existed said nothing of it: it counts, as the batch's creation, only when it is no
    older than ``live_since`` (the workers are alive, and take the new batch on at their next
    tick); otherwise it is a worker's that stopped before the batch existed, and a "last seen"
    earlier than the batch's creation is no answer (None: such beats never count).

    A ``refetch``'s claim of a batch (:func:`jobs.processes.refetch_claim`) is no run of it:
    left out (its downloads are no jobs moving, and a forecast for it would be false)."""
    from jobs.processes import refetch_claim

    seen: dict[str, datetime] = {}
    live: dict[str, datetime] = {}
    ended: dict[str, bool] = {}
    rows = session.execute(
        select(ConductorHeartbeat.scope, ConductorHeartbeat.owner, ConductorHeartbeat.seen_at).where(
            ConductorHeartbeat.scope.in_([*batch_ids, EVERY_BATCH])
        )
    )
    for scope, owner, at in rows:
        if refetch_claim(owner):
            continue
        seen[scope] = max(seen.get(scope, at), at)
        if gone is not None and ended.setdefault(owner, gone(owner)):
            continue
        live[scope] = max(live.get(scope, at), at)
    every = seen.pop(EVERY_BATCH, None)
    every_live = live.pop(EVERY_BATCH, None)
    if every is not None:
        # The workers' beat covers every batch they may send: a simulation is not one of them.
        created = session.execute(
            select(Batch.id, Batch.created_at).where(
                Batch.id.in_(list(batch_ids)), Batch.simulated.isnot(True)
            )
        )
        for batch_id, created_at in created:
            if (covered := _covered(every, created_at, live_since)) is not None:
                seen[batch_id] = max(seen.get(batch_id, covered), covered)
            if (covered := _covered(every_live, created_at, live_since)) is not None:
                live[batch_id] = max(live.get(batch_id, covered), covered)
    return {b: BatchBeat(at, live.get(b)) for b, at in seen.items()}


def _covered(every: datetime | None, created_at: datetime, live_since: datetime | None) -> datetime | None:
    """What the workers' every-batch beat ``every`` says of a batch created at ``created_at``
    (:func:`batch_beats`): itself, the creation while the workers are alive, or nothing."""
    if every is None:
        return None
    if every >= created_at:
        return every
    if live_since is not None and every >= live_since:
        return created_at
    return None


def workers_last_beat(session: Session) -> datetime | None:
    """When the distributed workers' tick leader last said, in this database, that it works
    (on every batch); None: no worker ever did, or not within :data:`HEARTBEAT_KEPT`. Workers
    that answer the broker but never beat here process another database."""
    return session.scalar(
        select(func.max(ConductorHeartbeat.seen_at)).where(ConductorHeartbeat.scope == EVERY_BATCH)
    )


@dataclass(frozen=True, slots=True)
class WorkersBeat:
    """The distributed workers' latest heartbeats in this database (:func:`workers_beats`): the
    tick leader's (every batch) and the others' (:data:`~jobs.models.WORKER_SCOPE`). Workers
    that beat here while their leader does not work on this database, and their leader is
    stuck (a frozen process holding the lead); workers that answer the broker and beat neither
    way work on another database."""

    #: Who last beat as the tick leader, and when (None: no leader ever did).
    leader_owner: str | None
    leader_seen: datetime | None
    #: When a worker that does not lead last beat (None: none ever did).
    others_seen: datetime | None


def workers_beats(session: Session) -> WorkersBeat:
    """:class:`WorkersBeat` from one query (a row per worker process: a handful)."""
    rows = session.execute(
        select(ConductorHeartbeat.scope, ConductorHeartbeat.owner, ConductorHeartbeat.seen_at).where(
            ConductorHeartbeat.scope.in_([EVERY_BATCH, WORKER_SCOPE])
        )
    )
    leader: tuple[datetime, str] | None = None
    others: datetime | None = None
    for scope, owner, at in rows:
        if scope == EVERY_BATCH:
            if leader is None or at > leader[0]:
                leader = (at, str(owner))
        elif others is None or at > others:
            others = at
    return WorkersBeat(
        leader_owner=None if leader is None else leader[1],
        leader_seen=None if leader is None else leader[0],
        others_seen=others,
    )
