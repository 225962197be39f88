"""The account-wide limits every process dispatching on one database applies: the strictest of
the live ones (:mod:`jobs.account_limits` says why).

At each of its heartbeats a dispatching process (an embedded ``run``, the workers' tick leader)
writes its own limits on its heartbeat row (:func:`published_by`), reads the other live
processes' (:func:`jobs.store.live_limits`: one short query every 10 s, in the heartbeat's
transaction), and from then on dispatches and submits with the strictest of them for the same
account (:meth:`worker.steps.context.Runtime.apply_limits`): its outstanding caps, its dispatch
bucket and the database's (refilled at its rate), its submit spacing (the in-process limiter, the
database's pacing slots, a limiter Redis' grants). When the stricter process stops (its heartbeat
gone, or older than :data:`jobs.db.HEARTBEAT_STALE_SECONDS`), its own limits apply again; so
they do once the tick leader finds the lead another worker's (:func:`let_go`).

Said once per change in a warning line naming the other process and its value, and kept on the
runtime for ``run``'s held message (:attr:`~worker.steps.context.Runtime.peer_limits`).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from jobs import account_limits, store
from jobs.account_limits import PeerLimits
from jobs.db import HEARTBEAT_STALE_SECONDS
from jobs.models import utcnow
from jobs.processes import owner_prefix
from worker.limits import api_key_id
from worker.steps.context import Runtime

log = logging.getLogger(__name__)


def published_by(rt: Runtime) -> dict[str, Any]:
    """What ``rt``'s process writes with its heartbeat: its own limits, never those it applies."""
    own = rt.own_settings
    return account_limits.published(
        own,
        key_id=api_key_id(own),
        origin=rt.queue_origin,
        simulated=rt.simulated,
        by=account_limits.RUN if rt.batch_ids else account_limits.WORKERS,
    )


def same_account_peers(session: Session, rt: Runtime) -> list[PeerLimits]:
    """The other live processes dispatching for ``rt``'s account and queue, and their limits."""
    since = utcnow() - timedelta(seconds=HEARTBEAT_STALE_SECONDS)
    docs = store.live_limits(session, owner_prefix(rt.owner) or rt.owner, since=since)
    key_id = api_key_id(rt.own_settings)
    found = []
    for owner, doc in docs.items():
        peer = account_limits.parse(owner, doc)
        if peer is not None and account_limits.same_account(
            peer, key_id=key_id, origin=rt.queue_origin, simulated=rt.simulated
        ):
            found.append(peer)
    return found


def note_limits(session: Session, rt: Runtime) -> bool:
    """At ``rt``'s heartbeat, in its transaction (its own limits written already): apply the
    strictest limits of the live processes of its account, and say so when that changes. True
    when what it applies changed."""
    peers = same_account_peers(session, rt)
    own = rt.own_settings
    rt.peer_limits = account_limits.differing(own, peers)
    applied = account_limits.strictest(own, peers)
    if account_limits.same_limits(applied, rt.settings) or not rt.apply_limits(applied):
        return False
    _say(rt, own)
    return True


def let_go(rt: Runtime) -> None:
    """``rt``'s process no longer dispatches: the workers' tick leader found the lead another
    worker's. The strictest limits it applied while leading were for its dispatch rounds and its
    published policy; kept, they went on spacing its own submits (and pushing the shared rate
    keys) at another process's rate, and being compared with the next leader's policy as its own,
    until it led again, however long after that process stopped. Its own settings apply again
    (the leader's policy still binds its submits). No database statement; nothing at all when
    they apply already (called at every round of a worker that does not lead)."""
    rt.peer_limits = {}
    if rt.apply_limits(rt.own_settings):
        log.info(
            "this worker no longer leads: it applies its own account-wide limits again (the tick "
            "leader's policy still binds its submits)",
            extra={"event": "limits.peers_applied"},
        )


def _say(rt: Runtime, own: Any) -> None:
    """The warning line of a change in what ``rt`` applies (or that its own limits apply again)."""
    applied = rt.settings
    stricter = [
        f"{name}={account_limits.own_value(applied, name)} (its own {account_limits.own_value(own, name)})"
        for name in account_limits.ACCOUNT_WIDE
        if account_limits.own_value(applied, name) != account_limits.own_value(own, name)
    ]
    if not stricter:
        log.warning(
            "this process applies its own account-wide limits again: no other live process of this "
            "database and fal key is stricter",
            extra={"event": "limits.peers_applied"},
        )
        return
    others = "; ".join(part for parts in rt.peer_limits.values() for part in parts)
    log.warning(
        "other processes dispatch on this database for the same fal account with other limits (%s): "
        "each applies the strictest of the live processes', so the account's limit holds; this one "
        "now applies %s. Give every process the same values (your fal account's limits)",
        others,
        ", ".join(stricter),
        extra={"event": "limits.peers_applied"},
    )
