"""An embedded run's threads share one CPU (``WANBATCH_CPU_AFFINITY``), moved when it gets busy.

Why: an embedded ``wanbatch run`` does its work on a dozen threads (the conductor, the submit and
download pools, the status streams) that all need CPython's global interpreter lock, and hand it
to one another around every short system call (a socket read, an ``fsync``, a SQLite step). On a
machine with several CPUs each hand-off wakes a thread sleeping on *another* CPU: an
inter-processor interrupt, caches warmed again, and in a virtual machine an exit to the
hypervisor. That is the "convoy effect" of the GIL with I/O-bound threads on multicore machines
(https://bugs.python.org/issue7946; David Beazley, "Understanding the Python GIL", PyCon 2010).
Measured on the drain benchmark (2 vCPUs), the run's CPU per job falls by 5–10 % when its
threads share one CPU, its makespan unchanged: only one of them runs Python at a time anyway,
and a run needs far less than a core (about 20 ms of CPU per video that fal renders in minutes).

How: the thread that starts the run is pinned to the CPU it is on (or the one the setting names)
before the run starts its threads, which inherit the pin (``sched_setaffinity(2)``: "A child
created via fork(2) inherits its parent's CPU affinity mask", and a new thread inherits its
creator's). Threads the process had before (a server's, a test's) are left alone. A pinned thread
cannot be moved by the kernel's load balancer, so :meth:`SharedCpu.check` looks every few seconds
at how busy each allowed CPU was (``/proc/stat``) and moves the run's threads to the idlest one
when other work took over theirs. :meth:`SharedCpu.release` gives every thread still pinned its
former affinity back when the run ends.

Linux only (``os.sched_setaffinity`` and ``/proc``); elsewhere, or with a single CPU allowed
(``taskset``, a container's cpuset), nothing is pinned.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from jobs.settings import CPU_AFFINITY_AUTO as AUTO
from jobs.settings import CPU_AFFINITY_OFF as OFF

log = logging.getLogger(__name__)

#: Seconds between two looks at the CPUs' load (:meth:`SharedCpu.check`), give or take a fifth
#: at random: two runs that started on the same CPU do not look, and move, at the same moment.
CHECK_EVERY = 5.0
#: Move when other work (another run, say) used more than this share of the run's CPU over the
#: last look...
BUSY_SHARE = 0.3
#: ... and another allowed CPU was idle this much more of the time than the run's CPU was.
IDLER_BY = 0.25

#: ``/proc/stat`` counts in clock ticks (``USER_HZ``, sysconf(_SC_CLK_TCK)).
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

#: Per-CPU ``(busy, total)`` clock ticks since boot (``/proc/stat``'s ``cpuN`` lines).
CpuTimes = dict[int, tuple[int, int]]


def read_cpu_times(path: Path = Path("/proc/stat")) -> CpuTimes:
    """Busy and total clock ticks of each CPU since boot (proc(5): user, nice, system, idle,
    iowait, irq, softirq, steal...; idle and iowait are not busy). Empty when unreadable."""
    times: CpuTimes = {}
    try:
        with path.open(encoding="ascii", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return times
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit():
            continue
        try:
            ticks = [int(part) for part in rest.split()]
        except ValueError:
            continue
        if len(ticks) < 4:
            continue
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        # guest time is already counted in user (proc(5)): only the first eight columns sum
        total = sum(ticks[:8])
        times[int(name[3:])] = (total - idle, total)
    return times


def current_cpu() -> int | None:
    """The CPU the calling thread runs on (``/proc/thread-self/stat``'s 39th field), or None."""
    try:
        with Path("/proc/thread-self/stat").open(encoding="ascii", errors="replace") as f:
            fields = f.read(4096).rpartition(")")[2].split()
        return int(fields[36])  # fields[0] is the 3rd field (state)
    except (OSError, IndexError, ValueError):
        return None


def named_cpu_problem(setting: str) -> str | None:
    """Why ``setting`` (``WANBATCH_CPU_AFFINITY``) names a CPU this process may not use, or None
    (``auto``, ``off``, a usable CPU, or a system without CPU affinity, where nothing is pinned):
    checked before ``run`` stores anything."""
    value = setting.strip().lower()
    if not value.isdigit() or not hasattr(os, "sched_getaffinity"):
        return None
    try:
        allowed = os.sched_getaffinity(0)
    except OSError:
        return None
    if int(value) in allowed:
        return None
    usable = ", ".join(str(c) for c in sorted(allowed))
    return f"CPU {int(value)} is not one this process may use ({usable})"


def _threads() -> list[int]:
    try:
        return [int(entry.name) for entry in Path("/proc/self/task").iterdir() if entry.name.isdigit()]
    except OSError:
        return []


@dataclass
class SharedCpu:
    """The run's threads' shared CPU; see the module's docstring."""

    cpu: int
    #: The CPUs the process may use (the run's threads move among them).
    allowed: frozenset[int]
    #: The calling thread's affinity before the pin, given back by :meth:`release`.
    before: frozenset[int]
    #: Whether the CPU was chosen by wanbatch (``auto``): only then is it moved when busy.
    movable: bool = True
    moves: int = 0
    _last: CpuTimes = field(default_factory=dict)
    _last_cpu_seconds: float = 0.0
    _last_check: float = 0.0
    _wait: float = CHECK_EVERY
    _clock: Callable[[], float] = time.monotonic

    @classmethod
    def start(cls, setting: str) -> SharedCpu | None:
        """Pin the calling thread (and so every thread it starts from now) to one CPU as
        ``setting`` says; None when nothing is pinned (``off``, not Linux, one CPU allowed, or
        the kernel refuses). A named CPU the process may not use is refused: ValueError."""
        value = setting.strip().lower()
        if value == OFF or not hasattr(os, "sched_setaffinity"):
            return None
        try:
            before = frozenset(os.sched_getaffinity(0))
        except OSError:
            return None
        if len(before) < 2:
            return None
        if value == AUTO:
            cpu = current_cpu()
            if cpu not in before:
                cpu = min(before)
        else:
            problem = named_cpu_problem(value)
            if problem is not None:
                raise ValueError(problem)
            cpu = int(value)
        assert cpu is not None
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError as exc:
            log.debug("cannot pin the run's threads to CPU %d: %s", cpu, exc)
            return None
        shared = cls(cpu=cpu, allowed=before, before=before, movable=value == AUTO)
        shared._last = read_cpu_times()
        shared._last_cpu_seconds = time.process_time()
        shared._last_check = shared._clock()
        log.debug("the run's threads share CPU %d", cpu, extra={"event": "cpu.pinned"})
        return shared

    def check(self) -> bool:
        """Move the run's threads to the idlest allowed CPU when other work took theirs over
        since the last look (at most every :data:`CHECK_EVERY` seconds); True when moved."""
        now = self._clock()
        if not self.movable or now - self._last_check < self._wait:
            return False
        self._wait = CHECK_EVERY * random.uniform(0.8, 1.2)
        times = read_cpu_times()
        cpu_seconds = time.process_time()
        last, ours = self._last, cpu_seconds - self._last_cpu_seconds
        self._last, self._last_cpu_seconds, self._last_check = times, cpu_seconds, now
        target = self.busier_than_elsewhere(last, times, ours)
        if target is None:
            return False
        self._move(target)
        return True

    def busier_than_elsewhere(self, before: CpuTimes, after: CpuTimes, own_seconds: float) -> int | None:
        """The CPU to move to, given two ``/proc/stat`` looks and the process's own CPU seconds
        between them; None when the run's CPU is not taken over by other work, or no allowed CPU
        is clearly idler. The process's own time is all counted on the run's CPU (a safe
        overestimate: it only makes a move rarer)."""
        shares: dict[int, float] = {}  # CPU -> busy share of the interval
        ticks: dict[int, int] = {}
        for cpu in self.allowed:
            if cpu not in before or cpu not in after:
                continue
            busy = after[cpu][0] - before[cpu][0]
            ticks[cpu] = after[cpu][1] - before[cpu][1]
            if ticks[cpu] > 0:
                shares[cpu] = busy / ticks[cpu]
        if self.cpu not in shares:
            return None
        share = shares[self.cpu]
        own_share = own_seconds * CLOCK_TICKS_PER_SECOND / ticks[self.cpu]
        if share - own_share <= BUSY_SHARE:
            return None
        idlest = min(shares, key=lambda cpu: (shares[cpu], cpu))
        if idlest == self.cpu or shares[idlest] > share - IDLER_BY:
            return None
        return idlest

    def _move(self, cpu: int) -> None:
        moved = 0
        for tid in _threads():
            try:
                if os.sched_getaffinity(tid) == {self.cpu}:
                    os.sched_setaffinity(tid, {cpu})
                    moved += 1
            except OSError:  # the thread ended meanwhile
                continue
        log.debug(
            "the run's threads (%d) moved from CPU %d, busy with other work, to CPU %d",
            moved,
            self.cpu,
            cpu,
            extra={"event": "cpu.moved"},
        )
        self.cpu = cpu
        self.moves += 1

    def release(self) -> None:
        """Give every thread still pinned to the run's CPU (the caller's, and any the run left
        running) the affinity the caller had before :meth:`start`."""
        for tid in _threads():
            try:
                if os.sched_getaffinity(tid) == {self.cpu}:
                    os.sched_setaffinity(tid, self.before)
            except OSError:
                continue
