"""Heartbeats: who works on which batch, when each process and the workers last said so,
and which other processes share the submit pacing."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from jobs.models import EVERY_BATCH, SERVE_SCOPE, Batch, ConductorHeartbeat
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
) -> None:
    """``owner`` works on ``scopes`` (batch ids, or :data:`~jobs.models.EVERY_BATCH`) as of ``now``;
    rows of processes silent for :data:`HEARTBEAT_KEPT` go (each crash leaves its rows behind).
    ``broker_down_since``: since when ``owner`` could not reach the broker (None: it can; see
    :func:`mark_broker_down`).

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
            owner=owner, scope=scope, seen_at=now, broker_down_since=broker_down_since
        )
        beat = stmt.on_conflict_do_update(
            index_elements=["owner", "scope"],
            set_={"seen_at": stmt.excluded.seen_at, "broker_down_since": stmt.excluded.broker_down_since},
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
    from jobs.processes import owner_gone, owner_prefix

    rows = session.scalars(
        select(ConductorHeartbeat.owner)
        .where(ConductorHeartbeat.seen_at >= since, ConductorHeartbeat.scope != SERVE_SCOPE)
        .distinct()
    )
    found: set[str] = set()
    for owner in rows:
        prefix = owner_prefix(str(owner))
        if prefix is None or prefix == own or owner_gone(str(owner)):
            continue
        found.add(prefix)
    return sorted(found)


def heartbeat_owners(session: Session, batch_id: str, *, since: datetime | None) -> list[str]:
    """The processes (``host:pid:``…) that said at ``since`` or later (None: ever) that they work
    on ``batch_id`` itself (an embedded run of it; the workers' every-batch beat is not one)."""
    query = select(ConductorHeartbeat.owner).where(ConductorHeartbeat.scope == batch_id)
    if since is not None:
        query = query.where(ConductorHeartbeat.seen_at >= since)
    return [str(owner) for owner in session.scalars(query.order_by(ConductorHeartbeat.owner))]


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


def last_heartbeats(
    session: Session, batch_ids: Collection[str], *, live_since: datetime | None = None
) -> dict[str, datetime]:
    """:func:`last_heartbeat` of each of ``batch_ids`` (those never beaten for are left out), in
    one query (and one more for the batches, when the workers ever beat).

    The workers' every-batch beat counts for a batch from its creation on. One from before the
    batch existed said nothing of it: it counts, as the batch's creation, only when it is no
    older than ``live_since`` (the workers are alive, and take the new batch on at their next
    tick); otherwise it is a worker's that stopped before the batch existed, and a "last seen"
    earlier than the batch's creation is no answer (None: such beats never count)."""
    beats: dict[str, datetime] = {}
    rows = session.execute(
        select(ConductorHeartbeat.scope, func.max(ConductorHeartbeat.seen_at))
        .where(ConductorHeartbeat.scope.in_([*batch_ids, EVERY_BATCH]))
        .group_by(ConductorHeartbeat.scope)
    )
    for scope, seen in rows:
        beats[scope] = seen
    every = beats.pop(EVERY_BATCH, None)
    if every is None:
        return beats
    # The workers' beat covers every batch they may send: a simulation is not one of them.
    created = session.execute(
        select(Batch.id, Batch.created_at).where(Batch.id.in_(list(batch_ids)), Batch.simulated.isnot(True))
    )
    for batch_id, created_at in created:
        if every >= created_at:
            covered = every
        elif live_since is not None and every >= live_since:
            covered = created_at
        else:
            continue
        beats[batch_id] = max(beats.get(batch_id, covered), covered)
    return beats


def workers_last_beat(session: Session) -> datetime | None:
    """When the distributed workers' tick leader last said, in this database, that it works
    (on every batch); None: no worker ever did, or not within :data:`HEARTBEAT_KEPT`. Workers
    that answer the broker but never beat here process another database."""
    return session.scalar(
        select(func.max(ConductorHeartbeat.seen_at)).where(ConductorHeartbeat.scope == EVERY_BATCH)
    )
