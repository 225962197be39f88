"""Other processes of this host, as ``/proc`` and ``kill(pid, 0)`` tell them: whether one still
lives, and when it started (which tells it apart from a later process that reuses its pid).

Used to take back what a process that has ended left behind (a killed ``--simulate`` run's
leases, a crashed run's journal of unrecorded answers) at once rather than after a timeout,
and to tell whether the process that claimed a batch it simulates still runs
(:func:`simulation_owner`). See proc(5) for the fields of ``/proc/PID/stat``.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (``state`` first); None when the
    process or ``/proc`` is not there. The name is in parentheses and may hold any character."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return stat.rpartition(")")[2].split()


def started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot); None when unknown."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def exists(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (another user's counts: it is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process of that pid
        return True
    return True


def zombie(pid: int) -> bool:
    """Whether ``pid`` has ended but its parent has not reaped it yet (it holds nothing)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields is not None and fields[0] == "Z"


def process_prefix() -> str:
    """``host:pid:``: how the owners this process writes (leases, heartbeats) begin."""
    return f"{socket.gethostname()}:{os.getpid()}:"


def owner_prefix(owner: str) -> str | None:
    """``host:pid:`` of lease or heartbeat owner ``owner`` (``host:pid:thread``); None for an
    owner of another shape (a queue's name, ``download-queue``): no process to speak of."""
    host, _, rest = owner.partition(":")
    pid, sep, _ = rest.partition(":")
    return f"{host}:{pid}:" if host and sep and pid.isascii() and pid.isdigit() else None


def other_pid_here(owner: str) -> int | None:
    """The pid of owner ``owner`` (a lease or heartbeat owner, ``host:pid:``…) when it names
    another process of this host; None for another host, this process, or an owner of another
    shape (nothing can be told)."""
    host, _, rest = owner.partition(":")
    pid_text, sep, _ = rest.partition(":")
    if not sep or host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    return None if pid <= 0 or pid == os.getpid() else pid


def owner_gone(owner: str) -> bool:
    """Whether owner ``owner`` (``host:pid:``…) is a process of this host that has ended (or is a
    zombie nobody reaped). Anything it cannot tell — another host, a live pid, this process, an
    owner of another shape — counts as alive."""
    pid = other_pid_here(owner)
    return pid is not None and (not exists(pid) or zombie(pid))


#: Between a heartbeat owner (``host:pid:thread``) and the proof of its process's identity
#: (:func:`beat_owner`).
IDENTITY_MARK = "@"


@functools.cache
def namespace_here() -> str | None:
    """``BOOT.PIDNS``: this boot of this kernel (``/proc/sys/kernel/random/boot_id``) and the pid
    namespace this process sees pids in (the inode of ``/proc/self/ns/pid``); None when either
    cannot be read. Two processes that print the same see each other's pids — a hostname alone
    does not say so (a container sharing the host's name has pids of its own, another machine
    of the same name its own boot)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        pidns = Path("/proc/self/ns/pid").stat().st_ino
    except (OSError, UnicodeDecodeError):
        return None
    return f"{boot}.{pidns}" if boot and "@" not in boot else None


@functools.lru_cache(maxsize=64)
def beat_owner(owner: str) -> str:
    """The heartbeat owner of ``owner`` (``host:pid:thread``, a process of this host: this one's):
    ``owner`` followed by ``@BOOT.PIDNS.START`` (:func:`namespace_here`, when the process it names
    started), the proof :func:`beat_owner_ended` needs to say a beat's process has ended;
    ``owner`` itself when that cannot be read. The ``host:pid:`` it begins with is the lease
    owners' (:func:`owner_prefix`)."""
    here = namespace_here()
    start = started(other_pid_here(owner) or os.getpid())
    return f"{owner}{IDENTITY_MARK}{here}.{start}" if here is not None and start is not None else owner


def beat_owner_ended(owner: str) -> bool:
    """Whether heartbeat owner ``owner`` (:func:`beat_owner`) is *proved* to be a process that has
    ended: one of this boot and pid namespace whose pid no longer runs, is a zombie, or is now
    another process's (a later start: pids are reused). Anything else counts as alive, its beat
    going stale as any other: an owner without the proof (another host, a container sharing this
    host's name with pids of its own, an older wanbatch's beat, a ``--simulate`` claim), or this
    process. Stricter than :func:`owner_gone`: a live ``run`` judged ended would have ``status``
    send the user to start a second one."""
    head, mark, proof = owner.rpartition(IDENTITY_MARK)
    pid = other_pid_here(head) if mark else None
    if pid is None:
        return False
    namespace, _, start = proof.rpartition(".")
    if namespace != namespace_here() or not start.isdigit():
        return False
    if not exists(pid) or zombie(pid):
        return True
    return started(pid) not in (None, start)


def owner_ended(owner: str) -> bool:
    """Whether a heartbeat or lease owner's process has ended, by the one rule every check of a
    live process shares: a heartbeat owner carrying the proof of its identity (:func:`beat_owner`)
    by that proof (:func:`beat_owner_ended`: a process of another pid namespace is never judged
    ended), any other owner (a lease's, an older wanbatch's beat) by its ``host:pid``
    (:func:`owner_gone`)."""
    if IDENTITY_MARK in owner.partition(":")[2].partition(":")[2]:
        return beat_owner_ended(owner)
    return owner_gone(owner)


#: What follows ``host:pid:`` in the heartbeat owner under which a ``--simulate`` process claims
#: the batch it simulates (:func:`simulation_owner`).
SIMULATING = "simulating"


def simulation_owner(origin: str) -> str:
    """The heartbeat owner (``conductor_heartbeats.owner``) under which this process claims a
    batch it simulates: ``host:pid:simulating START ORIGIN``, where START is when the process
    started (:func:`started`: a later process that reuses the pid holds no claim) and ORIGIN its
    simulator's (each simulator has its own port; the requests it accepted record it as their
    ``jobs.fal_origin``). The claim holds for the process's life, whatever its age
    (:func:`claim_holder`)."""
    return f"{process_prefix()}{SIMULATING} {started(os.getpid()) or 0} {origin}"


def simulation_claim(owner: str) -> tuple[str, str] | None:
    """``(start, origin)`` of a claim's owner (:func:`simulation_owner`); None for any other owner
    (a heartbeat, a lease)."""
    _host, _, rest = owner.partition(":")
    _pid, _, tail = rest.partition(":")
    word, _, more = tail.partition(" ")
    start, _, origin = more.partition(" ")
    if word != SIMULATING or not start or not origin:
        return None
    return start, origin


def claim_holder(owner: str) -> int | None:
    """The pid of the process of this host, other than this one, that holds the claim ``owner``
    (:func:`simulation_owner`) and still runs: the same pid, started when the claim says (a pid
    reused since is another process); None otherwise — ended, a zombie, this process, another
    host, an owner that is no claim. A claim whose start was not known (``0``) holds while its
    pid lives."""
    claim = simulation_claim(owner)
    pid = other_pid_here(owner)
    if claim is None or pid is None or not exists(pid) or zombie(pid):
        return None
    start = claim[0]
    return pid if start == "0" or started(pid) in (None, start) else None


#: What follows ``host:pid:`` in the heartbeat owner under which a ``refetch`` claims the batch
#: whose videos it fetches again (:func:`refetch_owner`).
REFETCHING = "refetching"


def refetch_owner() -> str:
    """The heartbeat owner under which this process claims a batch it refetches:
    ``host:pid:refetching@BOOT.PIDNS.START`` (:func:`beat_owner`: the proof by which a claim
    whose process has ended is told at once, :func:`owner_ended`). It beats while the refetch
    downloads (``jobs.refetch_lock``)."""
    return beat_owner(f"{process_prefix()}{REFETCHING}")


def refetch_claim(owner: str) -> bool:
    """Whether heartbeat owner ``owner`` is a ``refetch``'s claim (:func:`refetch_owner`), not a
    process that runs the batch: ``status`` does not call the batch processed for it."""
    _host, _, rest = owner.partition(":")
    _pid, _, tail = rest.partition(":")
    return tail.partition(IDENTITY_MARK)[0] == REFETCHING
