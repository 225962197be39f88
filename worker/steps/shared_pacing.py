"""Submit pacing through the database, for processes that share it and no limiter Redis.

Every dispatch round takes its claims from the key's token bucket in the database
(:func:`jobs.store.take_submit_tokens`), but that bucket holds a second's submits, and without
a limiter Redis each process spaced its POSTs in its own memory (:class:`~worker.limits.LocalGCRA`):
two embedded ``wanbatch run`` on one database, or one beside workers without a limiter Redis,
could send up to about twice ``WANBATCH_SUBMIT_RATE`` in one second, and a 429 paused only the
process that heard it.

So, while another live process shares the database, each POST of a process without a limiter
Redis takes its slot from the key's pacing row first (``submit_pace``,
:func:`jobs.store.take_pace_slot`: GCRA, one
``(1 + WANBATCH_SUBMIT_JITTER_ALLOWANCE) / WANBATCH_SUBMIT_RATE`` apart, whichever process
takes it, on the database's clock read once the row is held; one statement) and sleeps until
it. That row is not the bucket's (``submit_rate``), which each dispatch round keeps locked from
its grant to its commit: a dispatch round never holds up a slot. Which processes share it is
what the heartbeats say (:func:`note_peers`, at each of this process's heartbeats: one short
query every 10 s); the mark lives on the key's pacing row (:data:`SHARED_SECONDS`, renewed by
each process that still sees another), so each dispatch round, which reads it with the bucket
(in the same statement, without locking it), learns of it too. A process alone on its database
takes no slot: its submits cost no extra transaction. Distributed workers without a limiter
Redis are several processes by nature (the pool's children submit): they always take their
slots there.

A 429 is written on the pacing row (:func:`jobs.store.hold_submits`) by whichever process
hears it: every process's dispatch claims nothing while it lasts
(:func:`jobs.store.take_submit_tokens`), and every slot comes after it.
"""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy.orm import Session

from jobs import db, store
from jobs.db import HEARTBEAT_STALE_SECONDS
from jobs.models import utcnow
from jobs.processes import owner_prefix
from worker import telemetry
from worker.limits import RedisGCRA, api_key_id, api_key_rate
from worker.steps.context import Runtime

#: How long one process's sighting of another keeps the pacing shared (the key's row): three
#: heartbeats (``worker.conductor.HEARTBEAT_SECONDS``), so a beat put off by a slow round does
#: not let it lapse while both still run.
SHARED_SECONDS = 30.0


def db_paced(rt: Runtime) -> bool:
    """Whether this process's POSTs take their slots from the database: it has no limiter Redis
    (one shared limiter paces every process that uses it) and another live process shares the
    database, or it is a distributed worker (its pool's children submit side by side)."""
    if rt.limiter is None or isinstance(rt.limiter, RedisGCRA):
        return False
    return rt.settings.broker_url is not None or rt.pacing.shared


def note_peers(session: Session, rt: Runtime) -> bool:
    """At this process's heartbeat, in its transaction: when it has no limiter Redis and
    another live process works on the database (a heartbeat within
    :data:`~jobs.db.HEARTBEAT_STALE_SECONDS`), mark the key's pacing shared for
    :data:`SHARED_SECONDS` more (for every process, which each learn it at their next dispatch
    round). True when it did."""
    if rt.limiter is None or isinstance(rt.limiter, RedisGCRA):
        return False
    now = utcnow()
    peers = store.pacing_peers(
        session, owner_prefix(rt.owner) or rt.owner, since=now - timedelta(seconds=HEARTBEAT_STALE_SECONDS)
    )
    if not peers:
        return False
    store.share_pacing(session, api_key_id(rt.settings), SHARED_SECONDS, wall=time.time())
    rt.pacing.shared_for(SHARED_SECONDS)
    return True


def take_slot(rt: Runtime, max_wait: float) -> float:
    """Take this POST's slot from the database (:func:`jobs.store.take_pace_slot`), sleeping
    until it when it comes within ``max_wait`` seconds: 0.0 then; else the seconds until the
    next slot (nothing taken: the job goes back, due then)."""
    key, interval = api_key_id(rt.settings), api_key_rate(rt.settings).interval
    with db.session_scope(rt.engine) as session:
        taken, wait = store.take_pace_slot(session, key, interval=interval, max_wait=max_wait)
    if not taken:
        telemetry.count_limiter_wait("held_back")
        return max(wait, 1e-3)
    if wait > 0:
        telemetry.count_limiter_wait("slept", wait)
        time.sleep(wait)
    return 0.0


def hold(session: Session, rt: Runtime, seconds: float) -> None:
    """fal answered 429: hold every process's submits of the key for ``seconds`` (the key's
    pacing row, in the caller's transaction): each one's dispatch, and each slot taken before a POST."""
    if seconds > 0:
        store.hold_submits(session, api_key_id(rt.settings), seconds, wall=time.time())
