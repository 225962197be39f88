"""``refetch`` and a ``run`` of the same batch, one at a time.

A ``refetch`` writes a batch's videos under their recorded names, as a ``run`` downloading the
batch does: started beside one, the two raced on the same names (a staging file, a ``.changed``
rename, a sidecar). Each refuses while the other works on the batch, in one line (exit 2),
before anything is fetched or sent, naming the process and the ways on (wait for it, or stop
it). There is no lock file: what tells a batch's workers is what ``status``, ``--take-over`` and
``--simulate``'s claim already read (:mod:`worker.steps.dead_leases`):

* a ``refetch`` is refused while another process beat for the batch within
  :data:`jobs.db.HEARTBEAT_STALE_SECONDS` (an embedded ``run`` of it, another ``refetch``),
  simulates it, or holds a live lease on one of its jobs (a distributed worker downloading it);
  a process of this host proved to have ended holds nothing (:func:`jobs.processes.owner_ended`);
* downloading, it holds a claim: a heartbeat row of the batch under
  :func:`jobs.processes.refetch_owner`, written in the transaction that checked (the batch's row
  locked: of two refetches started together, one goes on), renewed every
  :data:`RENEW_SECONDS`, deleted at its end (a killed one's is free at once on this host, after
  :data:`~jobs.db.HEARTBEAT_STALE_SECONDS` elsewhere); ``status`` does not count it as a run;
* a ``run`` of the batch (``run BATCH``, ``run MANIFEST``) is refused while a live claim holds
  it (:func:`refuse_refetching`), as a ``--simulate`` run is refused a batch another simulates.
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from jobs import db, processes, store
from jobs.errors import DatabaseReadOnlyError, UsageError
from jobs.models import Batch, utcnow
from jobs.printable import one_line

log = logging.getLogger(__name__)

#: How often (s) a refetch renews its claim while it downloads (a run's heartbeat's pace).
RENEW_SECONDS = 10.0


def holders(session: Session, batch_id: str) -> list[str]:
    """Who else works on ``batch_id`` now (owners ``host:pid:``…, a refetch's claims first): a
    fresh heartbeat of the batch, a live simulation claim, a live lease on one of its jobs.
    This process and processes of this host that have ended are left out."""
    now = utcnow()
    here = processes.process_prefix()
    since = now - timedelta(seconds=db.HEARTBEAT_STALE_SECONDS)
    found: list[str] = []
    for owner in store.heartbeat_owners(session, batch_id, since=since):
        if owner.startswith(here) or processes.simulation_claim(owner) or processes.owner_ended(owner):
            continue
        found.append(owner)
    host = socket.gethostname()
    found += [f"{host}:{pid}:" for pid in store.live_simulators(session, batch_id).values()]
    found += [
        h.owner
        for h in store.lease_holders(session, batch_id, now=now, excluding=here)
        if not processes.owner_gone(h.owner)
    ]
    return sorted(found, key=lambda owner: not processes.refetch_claim(owner))


def _who(owner: str) -> tuple[str, str | None]:
    """``process 4242 on this host`` (or ``on HOST``), and the pid when on this host; a lease
    owner that is no process (a queue's name): the distributed workers."""
    if processes.owner_prefix(owner) is None:
        return f"the distributed workers ({one_line(owner)})", None
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname():
        return f"process {pid} on this host", pid
    return f"process {pid} on {one_line(host)}", None


def _ways_on(pid: str | None, again: str) -> str:
    stop = f"stop it (Ctrl-C there, or `kill {pid}`)" if pid else "stop it there"
    return f"wait for it to end, or {stop}, then run {again} again"


def refetch_refusal(name: str, ref: str, owner: str) -> str:
    """The line a ``refetch`` of batch ``name`` is refused with while ``owner`` works on it."""
    who, pid = _who(owner)
    if processes.refetch_claim(owner):
        doing = f"is being refetched by {who} (another `wanbatch refetch`)"
    else:
        doing = f"is being processed by {who} (a `wanbatch run` of it, or a worker)"
    return (
        f"batch {one_line(name)} {doing}: fetched beside it, its videos would be written under the "
        f"same names; nothing fetched; {_ways_on(pid, f'`wanbatch refetch {ref}`')}"
    )


def refuse_busy(session: Session, batch: Batch, ref: str) -> None:
    """A :class:`~jobs.errors.UsageError` (exit 2) when another process works on ``batch``
    (:func:`holders`): a ``refetch`` refused before it looks or fetches."""
    if found := holders(session, batch.id):
        raise UsageError(refetch_refusal(batch.name, ref, found[0]))


def claim(engine: Engine, batch: Batch, ref: str) -> str | None:
    """Claim ``batch`` for this refetch (see the module docstring): its claim's owner, to renew
    and release; a :class:`~jobs.errors.UsageError` when another process works on it. None on a
    read-only database (nothing can be claimed there, and nothing written by a run either)."""
    owner = processes.refetch_owner()
    try:
        with db.session_scope(engine) as session:
            store.lock_batch(session, batch.id)
            refuse_busy(session, batch, ref)
            store.record_heartbeat(session, owner, [batch.id], utcnow())
    except DatabaseReadOnlyError:
        return None
    return owner


def renew(engine: Engine, owner: str | None, batch_id: str) -> None:
    """The claim ``owner`` holds on: its heartbeat now. A failed write is logged, never raised
    (the downloads go on; the claim goes stale as a run's beat would)."""
    if owner is None:
        return
    try:
        with db.session_scope(engine) as session:
            store.record_heartbeat(session, owner, [batch_id], utcnow())
    except Exception as exc:  # a database error of any kind: the beat is best-effort
        log.warning("the refetch's claim on its batch could not be renewed: %s", exc)


def release(engine: Engine, owner: str | None) -> None:
    """The refetch has ended: its claim goes (a failed delete: it goes stale, as a run's)."""
    if owner is None:
        return
    try:
        with db.session_scope(engine) as session:
            store.drop_heartbeats(session, owner)
    except Exception as exc:  # a database error of any kind: the claim goes stale
        log.warning("the refetch's claim on its batch could not be released: %s", exc)


def refuse_refetching(session: Session, batch: Batch) -> None:
    """``run`` of a batch a live ``refetch`` of another process holds: a
    :class:`~jobs.errors.UsageError` (exit 2), raised before anything changes."""
    for owner in holders(session, batch.id):
        if processes.refetch_claim(owner):
            who, pid = _who(owner)
            raise UsageError(
                f"batch {one_line(batch.name)} is being refetched by {who} (`wanbatch refetch`): a run "
                f"now would download beside it under the same names; nothing changed; "
                f"{_ways_on(pid, 'this command')}"
            )
