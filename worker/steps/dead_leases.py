"""Leases of a dead ``--simulate`` run: taken back at once, or said on the progress line.

A simulation is processed only by a ``--simulate`` run, whose simulator lives in its own
process. When that process is killed (``kill -9``, an OOM kill: nothing gives its leases back)
its jobs stay leased to it for ``WANBATCH_LEASE_SECONDS``, and the next ``run --simulate`` of
the batch sat silently on ``submitting:N`` for that long. Its owner strings are
``host:pid:thread`` (:func:`~worker.steps.context.worker_identity`): on this host a pid that no
longer runs is proof enough that the holder is gone, so its leases lapse now and the jobs are
claimed again through the usual paths (the reconciler resends a simulation's lost submits to this
run's simulator: :func:`~worker.steps.failures.resend_to_simulator`). A holder that cannot be told
gone (another host, a live process, a queue's name) is waited for, and :func:`waiting_note` says
for whom and until when.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import datetime

from jobs import db, store
from jobs.models import utcnow
from jobs.store import LeaseHolder
from worker import processes
from worker.steps.context import DOWNLOAD_QUEUE, Runtime, process_identity

log = logging.getLogger(__name__)

#: How often (s) a ``--simulate`` run looks for leases of dead processes on its batch: a killed
#: run's show up at once; one that dies later (a second run of the batch) within this.
SCAN_SECONDS = 2.0


def process_gone(owner: str) -> bool:
    """Whether lease owner ``owner`` (``host:pid:thread``) is a process of this host that has
    ended (or is a zombie nobody reaped). Anything it cannot tell — another host, a live pid, this
    process, an owner of another shape — counts as alive: its lease is waited out, never taken."""
    host, _, rest = owner.partition(":")
    pid_text, sep, _ = rest.partition(":")
    if not sep or host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid <= 0 or pid == os.getpid():
        return False
    return not processes.exists(pid) or processes.zombie(pid)


class DeadLeases:
    """What a ``--simulate`` run does about other processes' leases on its batch."""

    def __init__(self, rt: Runtime, batch_id: str) -> None:
        self.rt = rt
        self.batch_id = batch_id
        self._next_scan = 0.0
        #: The holders last found alive, for :func:`waiting_note`.
        self.waiting_for: list[LeaseHolder] = []

    def take_back(self) -> int:
        """Every :data:`SCAN_SECONDS`: let the leases of dead processes on this host lapse now.
        Returns how many jobs were taken back."""
        if time.monotonic() < self._next_scan:
            return 0
        self._next_scan = time.monotonic() + SCAN_SECONDS
        now = utcnow()
        with db.session_scope(self.rt.engine) as session:
            holders = store.lease_holders(session, self.batch_id, now=now, excluding=process_identity())
            gone = [h for h in holders if process_gone(h.owner)]
            taken = store.expire_leases(session, self.batch_id, [h.owner for h in gone], now=now)
        # This process's own queued downloads are leased to the queue's name: not another's.
        self.waiting_for = [h for h in holders if h not in gone and h.owner != DOWNLOAD_QUEUE]
        for holder in gone:
            log.warning(
                "batch %s: %d job(s) were leased to %s, a process of this host that has ended "
                "(a stopped --simulate run, whose simulator ended with it): taken back now",
                self.batch_id,
                holder.jobs,
                holder.owner,
                extra={"event": "reconcile.dead_leases", "owner": holder.owner, "jobs": holder.jobs},
            )
        return taken

    def note(self, now: datetime | None = None) -> str:
        """The progress line's words for the leases still waited for ("" when none)."""
        return waiting_note(self.waiting_for, now or utcnow())


def waiting_note(holders: list[LeaseHolder], now: datetime) -> str:
    """``waiting for 3 job(s) leased to host:123:4 (another process) until 14:02:11 UTC``:
    why jobs of the batch do not move while another process holds them."""
    live = [h for h in holders if h.until > now]
    if not live:
        return ""
    jobs = sum(h.jobs for h in live)
    until = max(h.until for h in live)
    who = live[0].owner if len(live) == 1 else f"{live[0].owner} and {len(live) - 1} other(s)"
    # No countdown: the words stay the same while the wait lasts (a plain progress line is
    # printed again whenever they change).
    return f"waiting for {jobs} job(s) leased to {who} (another process) until {until:%H:%M:%S} UTC"
