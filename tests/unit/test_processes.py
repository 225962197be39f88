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
