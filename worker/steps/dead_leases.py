"""Leases of a dead process on this host: taken back at once, or said on the progress line.

An embedded ``run`` stopped without giving its leases back — killed (``kill -9``, an OOM kill), a
second Ctrl-C, a crash — left its jobs leased to it for ``WANBATCH_LEASE_SECONDS``, and the next
run of the batch sat on them that long, its progress line giving a false reason ("download
backlog full") and a false ETA. Lease owners are ``host:pid:thread``
(:func:`~worker.steps.context.worker_identity`): on this host a pid that no longer runs is proof
enough that the holder is gone (:func:`process_gone`), so what it held is taken back now.

* A ``--simulate`` run's simulator lived in the dead process: every lease lapses now, and the
  reconciler resends a simulation's lost submits to this run's simulator
  (:func:`~worker.steps.failures.resend_to_simulator`) — never at fal, nothing was billed.
* A run for fal takes back only what can never be paid for twice
  (:func:`jobs.store.take_back_dead_leases`): jobs claimed but not sent go back to ``pending``
  (fenced: a holder that only looked gone cannot send them too), downloads, status checks and
  result fetches lapse now. A submit whose POST may be out is left to its lease, then to the
  reconciler (``submit_unknown``: never resent blindly). Why wait for it when its process is gone:
  "gone" rests on the hostname and the pid, and two processes may share a hostname without
  sharing a pid namespace (containers on the host's network) — such a live holder renews the
  lease while its POST is in flight, so waiting never declares an answer that may still come
  unknown; and a dead holder's answer could only come from its journal
  (:mod:`worker.steps.unrecorded`), which the reconciler reads before the lease lapses.

A holder that cannot be told gone (another host, a live process, a queue's name), and a dead
one's submits in flight, are waited for. A live process whose heartbeat is fresh works on the
batch beside this run (:func:`working_owners`: a second ``run`` of it, a worker), and the
progress line names it (:func:`jobs.listing.working_beside_note`) beside the batch's ETA; of the
others :func:`jobs.listing.waiting_note` says for whom and until when, with no ETA (``status``
names holders that are gone the same way: :func:`jobs.listing.dead_holders_text`).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from jobs import db, processes, store
from jobs.listing import PROCESSING_STALE_SECONDS, waiting_note, working_beside_note
from jobs.models import EVERY_BATCH, utcnow
from jobs.processes import owner_prefix, process_prefix
from jobs.store import LeaseHolder
from worker.steps.context import DOWNLOAD_QUEUE, Runtime

log = logging.getLogger(__name__)

#: How often (s) a ``--simulate`` run looks for leases of dead processes on its batch: a killed
#: run's show up at once; one that dies later (a second run of the batch) within this.
SCAN_SECONDS = 2.0


def process_gone(owner: str) -> bool:
    """Whether lease owner ``owner`` (``host:pid:thread``) is a process of this host that has
    ended (or is a zombie nobody reaped). Anything it cannot tell — another host, a live pid, this
    process, an owner of another shape — counts as alive: its lease is waited out, never taken."""
    return processes.owner_gone(owner)


def live_pid_here(owner: str) -> int | None:
    """The pid of lease or heartbeat owner ``owner`` (``host:pid:``…) when it is a live process of
    this host other than this one; None otherwise (ended, a zombie, another host, this process,
    an owner of another shape). The converse of :func:`process_gone` for what it can tell."""
    pid = processes.other_pid_here(owner)
    return pid if pid is not None and processes.exists(pid) and not processes.zombie(pid) else None


def live_runs_here(session: Session, batch_id: str, *, now: datetime) -> list[int]:
    """The pids of the live processes of this host, other than this one, that work on
    ``batch_id``: they claimed it to simulate it (:func:`claim_simulation`: held for the
    process's life, from before it stores or sends anything), beat for it within
    :data:`~jobs.listing.PROCESSING_STALE_SECONDS`, or hold live leases on its jobs. A killed
    run's rows and leases stay behind, but its pid no longer runs: it is not one (the next run
    takes its work over)."""
    since = now - timedelta(seconds=PROCESSING_STALE_SECONDS)
    beats = store.heartbeat_owners(session, batch_id, since=since)
    owners = [o for o in beats if not processes.simulation_claim(o)]  # claims: live_simulators
    owners += [h.owner for h in store.lease_holders(session, batch_id, now=now, excluding=process_prefix())]
    pids = {pid for owner in owners if (pid := live_pid_here(owner)) is not None}
    pids.update(store.live_simulators(session, batch_id).values())
    return sorted(pids)


def claim_simulation(session: Session, batch_id: str, origin: str, *, now: datetime) -> list[int]:
    """Claim ``batch_id`` for this process, which simulates it with its simulator at ``origin``,
    unless another live process of this host works on it (:func:`live_runs_here`): then nothing
    is written and their pids are returned (empty: claimed).

    The check and the claim are one step of the caller's transaction: the batch's row is locked
    first (:func:`jobs.store.lock_batch`: on PostgreSQL a second starter waits for this
    transaction, then sees its claim; SQLite's ``BEGIN IMMEDIATE`` already serialises them), so
    of two ``--simulate`` runs started together exactly one claims the batch — a run still
    starting has neither heartbeat nor lease to be seen by. The claim is a heartbeat row of the
    batch (:func:`jobs.processes.simulation_owner`) that holds while its process runs, whatever
    its age; :func:`release_simulation` deletes it, and a dead process's claim is free (and
    deleted here)."""
    store.lock_batch(session, batch_id)
    pids = live_runs_here(session, batch_id, now=now)
    if pids:
        return pids
    here = process_prefix()  # this process's own claims end with its simulators
    for owner in store.heartbeat_owners(session, batch_id, since=None):
        gone = processes.claim_holder(owner) is None and not owner.startswith(here)
        if gone and processes.simulation_claim(owner):
            store.drop_heartbeats(session, owner)
    store.record_heartbeat(session, processes.simulation_owner(origin), [batch_id], now)
    return []


def release_simulation(session: Session, origin: str) -> None:
    """This process's simulator at ``origin`` has stopped: its claims (:func:`claim_simulation`)
    end with it."""
    store.drop_heartbeats(session, processes.simulation_owner(origin))


def working_owners(
    session: Session, holders: list[LeaseHolder], *, now: datetime, gone: frozenset[str]
) -> set[str]:
    """Those of ``holders`` (by owner) that work on the batch now, beside this run: a process
    (``host:pid:``…) not known to have ended whose heartbeat, any scope, is at most
    :data:`~jobs.listing.PROCESSING_STALE_SECONDS` old — a second ``run`` of the batch, a
    distributed worker. Such a process renews its leases and takes new ones for as long as it
    works, so "waiting for … until" its lease ends moved forward for the whole run and the batch's
    ETA was never shown (two runs of one batch, 2,000 jobs, seven minutes). A holder that beats no
    more (killed on another host, stopped, hung), that has ended, or that is no process (a queue's
    name) is not one: its leases are waited out, and said so (:func:`waiting_note`)."""
    prefixes = {p for h in holders if h.owner not in gone and (p := owner_prefix(h.owner)) is not None}
    if not prefixes:
        return set()
    seen = store.owners_last_seen(session, prefixes)
    fresh = now - timedelta(seconds=PROCESSING_STALE_SECONDS)
    return {
        h.owner
        for h in holders
        if h.owner not in gone
        and (p := owner_prefix(h.owner)) is not None
        and (at := seen.get(p)) is not None
        and at >= fresh
    }


class DeadLeases:
    """What an embedded run does about other processes' leases on its batch."""

    def __init__(self, rt: Runtime, batch_id: str) -> None:
        self.rt = rt
        self.batch_id = batch_id
        self._next_scan = 0.0
        #: The holders whose leases are waited for, for :func:`waiting_note`: processes that do
        #: not work on the batch now (gone, silent, or of no process at all).
        self.waiting_for: list[LeaseHolder] = []
        #: The holders that work on the batch beside this run (:func:`working_owners`), for
        #: :func:`working_beside_note`: their leases come and go, the batch's pace says the rest.
        self.working: list[LeaseHolder] = []
        #: The owners last found gone (their submits in flight are waited for all the same).
        self.gone: frozenset[str] = frozenset()

    def take_back(self) -> int:
        """Every :data:`SCAN_SECONDS`: let the leases of dead processes on this host lapse now.
        Returns how many jobs were taken back."""
        if time.monotonic() < self._next_scan:
            return 0
        self._next_scan = time.monotonic() + SCAN_SECONDS
        now = utcnow()
        mine = process_prefix()
        said: list[tuple[str, int, int]] = []  # owner, jobs taken back, submits left in flight
        with db.session_scope(self.rt.engine) as session:
            holders = store.lease_holders(session, self.batch_id, now=now, excluding=mine)
            gone = [h.owner for h in holders if process_gone(h.owner)]
            for owner in gone:
                if self.rt.simulated:  # its simulator ended with it: everything, the POSTs out too
                    said.append((owner, store.expire_leases(session, self.batch_id, [owner], now=now), 0))
                else:
                    back = store.take_back_dead_leases(
                        session, self.batch_id, [owner], now=now, worker=self.rt.owner
                    )
                    said.append((owner, back.unsent + back.lapsed, back.in_flight))
            # What stays leased (to live processes; to dead ones, submits whose POST may be out).
            left = store.lease_holders(session, self.batch_id, now=now, excluding=mine) if gone else holders
            # This process's own queued downloads are leased to the queue's name: not another's.
            left = [h for h in left if h.owner != DOWNLOAD_QUEUE]
            working = working_owners(session, left, now=now, gone=frozenset(gone))
            adopted = self._adopt(session, now) if not self.rt.simulated else {}
        self.working = [h for h in left if h.owner in working]
        self.waiting_for = [h for h in left if h.owner not in working]
        self.gone = frozenset(gone)
        for was, jobs in sorted(adopted.items()):
            log.warning(
                "batch %s: %d request(s) were sent to the fal queue at %s, which no live process of "
                "this batch follows: asked about at this run's queue (%s) from now on",
                self.batch_id,
                jobs,
                was,
                self.rt.queue_origin,
                extra={"event": "reconcile.adopt_origin", "origin": was, "jobs": jobs},
            )
        taken = 0
        for owner, jobs, in_flight in said:
            taken += jobs
            if not jobs:
                continue
            waits = (
                f"; {in_flight} submit(s) whose POST may be out wait for their lease, then the reconciler"
                if in_flight
                else ""
            )
            log.warning(
                "batch %s: %d job(s) were leased to %s, a process of this host that has ended: "
                "taken back now%s",
                self.batch_id,
                jobs,
                owner,
                waits,
                extra={"event": "reconcile.dead_leases", "owner": owner, "jobs": jobs},
            )
        return taken

    def _adopt(self, session: Session, now: datetime) -> dict[str, int]:
        """This batch's requests sent to another fal queue than this run's, made this run's to
        follow when nothing else can: no other live process beats for the batch, nor the
        distributed workers (which follow every batch, maybe on that queue). Otherwise a request
        sent to a queue URL nobody runs any more (``WANBATCH_FAL_QUEUE_URL`` changed between runs
        of the batch, a stand-in's port changed) was never asked about again, and its job and the
        run waited for good. How many were adopted, by the origin they had.

        The heartbeats are read only once such a request is found (in the same transaction):
        every :data:`SCAN_SECONDS` they were read first, two statements, nearly always for none."""
        since = now - timedelta(seconds=PROCESSING_STALE_SECONDS)
        mine = process_prefix()

        def nobody_else() -> bool:
            return not any(
                not owner.startswith(mine) and not process_gone(owner)
                for scope in (self.batch_id, EVERY_BATCH)
                for owner in store.heartbeat_owners(session, scope, since=since)
            )

        return store.adopt_requests_sent_elsewhere(
            session, self.batch_id, self.rt.queue_origin, now=now, only_if=nobody_else
        )

    def note(self, now: datetime | None = None) -> str:
        """The progress line's words for the leases still waited for ("" when none): those of
        processes that do not work on the batch now, not :meth:`beside`'s."""
        return waiting_note(self.waiting_for, now or utcnow(), gone=self.gone)

    def beside(self) -> str:
        """The progress line's words for the other processes that work on the batch too ("" when
        none): a second ``run`` of it, the distributed workers."""
        return working_beside_note(self.working)
