"""Whether another process of this host lives (:mod:`jobs.processes`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from jobs import processes


def test_a_live_process_exists_and_has_a_start() -> None:
    assert processes.exists(os.getpid())
    assert processes.started(os.getpid()) is not None
    assert not processes.zombie(os.getpid())


def test_an_ended_child_is_a_zombie_until_reaped_then_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while not processes.zombie(child.pid):  # ended, not reaped yet
        assert time.monotonic() < deadline, "the child never ended"
        time.sleep(0.02)
    assert processes.exists(child.pid)  # a zombie still has its pid
    child.wait()
    assert not processes.exists(child.pid)
    assert processes.started(child.pid) is None


def test_this_process_has_one_identity_its_leases_and_heartbeats_share() -> None:
    """``host:pid:`` is built in one place, :func:`jobs.processes.process_prefix`: the lease owners
    of the steps (:func:`worker.steps.context.worker_identity`), what a process gives back as its
    own, and the owners the listings tell apart from this process's. A second copy
    (``worker.steps.context.process_identity``) could drift from it, and a process would then
    take its own leases for another's."""
    import socket

    from worker.steps import context

    prefix = processes.process_prefix()
    assert prefix == f"{socket.gethostname()}:{os.getpid()}:"
    assert context.worker_identity().startswith(prefix)
    assert processes.owner_prefix(context.worker_identity()) == prefix
    assert not hasattr(context, "process_identity")
    assert vars(context)["process_prefix"] is processes.process_prefix  # imported, not defined again


def _owner_of(pid: int, proof: str) -> str:
    """A heartbeat owner of process ``pid`` of this host carrying ``proof`` (``BOOT.PIDNS.START``)."""
    import socket

    return f"{socket.gethostname()}:{pid}:1{processes.IDENTITY_MARK}{proof}"


def test_a_beat_is_proved_ended_only_in_this_boot_and_pid_namespace() -> None:
    """``status`` says at once that a killed ``run`` has ended (its pid gone, or now another
    process's) — but only when the beat proves it was a process whose pids this one sees: a
    container sharing this host's name has pids of its own, and its live ``run`` judged ended
    would send the user to start a second one."""
    here = processes.namespace_here()
    assert here is not None  # Linux: /proc tells the boot and the pid namespace
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = processes.started(live.pid)
        assert start is not None
        # A live process of this boot and namespace, as its own beat names it: alive.
        assert not processes.beat_owner_ended(_owner_of(live.pid, f"{here}.{start}"))
        # Its pid, but another start: a killed run's pid reused by a later process — ended.
        assert processes.beat_owner_ended(_owner_of(live.pid, f"{here}.{int(start) - 1}"))
    finally:
        live.kill()
        live.wait()
    # Ended, in this boot and namespace: ended.
    assert processes.beat_owner_ended(_owner_of(live.pid, f"{here}.{start}"))
    # The same pid seen from another pid namespace (a container), or another boot: nothing is
    # proved, the beat goes stale as any other.
    boot, _, pidns = here.rpartition(".")
    assert not processes.beat_owner_ended(_owner_of(live.pid, f"{boot}.{int(pidns) + 1}.{start}"))
    assert not processes.beat_owner_ended(_owner_of(live.pid, f"another-boot.{pidns}.{start}"))
    # No proof at all (an older wanbatch's beat): nothing is proved either.
    assert not processes.beat_owner_ended(_owner_of(live.pid, "")[: -len(processes.IDENTITY_MARK)])


def test_this_process_beats_with_the_proof_of_its_identity() -> None:
    owner = processes.beat_owner(f"{processes.process_prefix()}7")
    head, mark, proof = owner.rpartition(processes.IDENTITY_MARK)
    assert (head, mark) == (f"{processes.process_prefix()}7", processes.IDENTITY_MARK)
    assert proof == f"{processes.namespace_here()}.{processes.started(os.getpid())}"
    assert processes.owner_prefix(owner) == processes.process_prefix()  # leases' prefix, as before
    assert not processes.beat_owner_ended(owner)  # this process


def test_every_check_of_a_live_process_judges_a_proved_beat_by_its_proof() -> None:
    """The schema-upgrade guard, ``doctor`` and the shared submit pacing judge a heartbeat owner
    as ``status`` does (:func:`processes.owner_ended`): a live ``run`` of another pid namespace
    (a container sharing this host's name) whose pid does not run here is not ended; a lease's
    owner, which carries no proof, is judged by its ``host:pid`` as before."""
    here = processes.namespace_here()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    boot, _, pidns = str(here).rpartition(".")
    elsewhere = _owner_of(gone.pid, f"{boot}.{int(pidns) + 1}.123")
    assert processes.owner_gone(elsewhere)  # its pid, seen from here, does not run …
    assert not processes.owner_ended(elsewhere)  # … but it is another namespace's: alive
    assert processes.owner_ended(_owner_of(gone.pid, f"{here}.123"))
    assert processes.owner_ended(_owner_of(gone.pid, "")[: -len(processes.IDENTITY_MARK)])  # a lease's
