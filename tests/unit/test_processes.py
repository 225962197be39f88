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
