"""The lease keeper's thread (:mod:`worker.steps.keepalive`) is woken only when it must be.

Every POST and every download holds its lease with the keeper while it waits. The keeper's
thread sleeps until the earliest renewal due (or, idle, for its linger); a step held since is
due later still (a third of a lease from now), so waking the thread for it only made it look,
find nothing due and sleep again: a thread hand-off (and a turn of the GIL) per POST and per
download, for nothing. Only a step due before the thread would look by itself wakes it.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from typing import Any

from sqlalchemy import Engine

from jobs.states import JobState as S
from jobs.store import Fence
from worker.steps.keepalive import StepLeases


class _Wakes(threading.Condition):
    """The keeper's condition, counting the wake-ups its waiting thread was sent (``woken``) and
    how often its waits ended (a wake-up, or the time-out), and saying when the thread waits."""

    def __init__(self, lock: Any) -> None:
        super().__init__(lock)
        self.woken = 0
        self.ended = 0
        self.waiting = threading.Event()
        self.woke = threading.Event()
        self.lingering = threading.Event()  # a wait of 50 s or more began

    def notify(self, n: int = 1) -> None:
        if self._waiters:  # type: ignore[attr-defined]
            self.woken += 1
        super().notify(n)

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        if timeout is not None and timeout >= 50:
            self.lingering.set()
        try:
            return super().wait(timeout)
        finally:
            self.ended += 1
            self.waiting.clear()
            self.woke.set()


def _spied(leases: StepLeases) -> _Wakes:
    wakes = _Wakes(leases._lock)
    leases._wake = wakes
    return wakes


def _fence(n: int) -> Fence:
    return Fence(f"job-{n}", S.SUBMITTING, 1, "me")


def test_steps_held_while_the_keeper_sleeps_to_an_earlier_renewal_do_not_wake_it(engine: Engine) -> None:
    # A long lease: nothing is due for 100 s, so the thread's only wait ends with the close.
    leases = StepLeases(engine, 300.0)
    wakes = _spied(leases)
    with ExitStack() as steps:
        steps.enter_context(leases.kept(_fence(0)))
        assert wakes.waiting.wait(30), "the keeper's thread never began to wait"
        for n in range(1, 21):  # twenty POSTs one after another, each due after the first
            steps.enter_context(leases.kept(_fence(n)))
        assert len(leases.holding()) == 21
        assert wakes.woken == 0  # none of them woke the thread: it sleeps on to job-0's renewal
    leases.close()
    thread = leases._thread
    if thread is not None:
        thread.join(30)
    assert wakes.ended == 1  # the close's wake-up, and no other


def test_downloads_one_after_another_do_not_wake_the_output_keeper(engine: Engine) -> None:
    # The output keeper (it lingers a third of a lease once idle): each download held after the
    # first is due after the renewal the thread sleeps to, or the end of its linger.
    leases = StepLeases(engine, 300.0, what="output", linger=100.0, warn_lost=False)
    wakes = _spied(leases)
    with leases.kept(_fence(0)):
        assert wakes.waiting.wait(30), "the keeper's thread never began to wait"
    # The thread sleeps to job-0's renewal (nothing is due for 100 s): not woken by its end.
    for n in range(1, 11):
        with leases.kept(_fence(n)):
            pass
    assert wakes.woken == 0
    leases.close()
    thread = leases._thread
    if thread is not None:
        thread.join(30)
    assert wakes.ended == 1


def test_a_step_due_before_the_keeper_looks_by_itself_wakes_it(engine: Engine) -> None:
    # A keeper whose idle thread lingers longer than a third of a lease (3 s lease: renewals
    # every second, linger 100 s): a step held meanwhile is due long before the linger ends,
    # so the thread is woken for it, and sleeps on to its renewal only.
    leases = StepLeases(engine, 3.0, what="output", linger=100.0, warn_lost=False)
    wakes = _spied(leases)
    with leases.kept(_fence(0)):
        assert wakes.waiting.wait(30), "the keeper's thread never began to wait"
    # job-0 released: the thread wakes for its renewal at the latest (a second), finds nothing
    # held, and lingers (a wait of 100 s).
    assert wakes.lingering.wait(30), "the thread never lingered"
    ended = wakes.ended
    wakes.woke.clear()
    with leases.kept(_fence(1)):
        assert wakes.woken == 1
        assert wakes.woke.wait(30), "the lingering thread did not wake for a renewal due sooner"
        assert wakes.ended == ended + 1
    leases.close()
