"""CPU and memory of a *set* of child processes, each with children of its own (benchmarks only).

Why this exists: a distributed wanbatch is several processes at once (``wanbatch worker`` ×N,
each a Celery parent with prefork children, plus the ``wanbatch run`` that watches), and issue
#11's "CPU per job (all wanbatch processes)" is the sum over all of them.

* **CPU** comes from ``os.wait4`` on each process we started: the kernel adds in the CPU of
  every descendant that process reaped, so a Celery parent that joins its pool on shutdown
  reports the pool's CPU too. A descendant nobody reaped (orphaned by a SIGKILL) would be lost,
  so a sampler also reads each process's ``utime + stime`` from ``/proc``; the larger of the two
  totals is reported (the sample is a lower bound: it misses the last fraction of a second).
* **Peak RSS** is the sum, over every process seen in the children's process groups, of its own
  high-water mark (``VmHWM``, sampled from ``/proc``), i.e. an upper bound of the set's
  simultaneous peak. Forked children share pages with their parent and RSS counts shared pages
  in each of them, so a prefork pool is over-counted rather than under-counted.

Each child is started in a session of its own (``start_new_session``), so its process group is
exactly it and its descendants. Linux only (``/proc``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Child:
    """A process we started, reaped by us with ``os.wait4`` (never by ``Popen.poll``/``wait``,
    which would reap it without its resource usage)."""

    proc: subprocess.Popen[bytes]
    name: str
    cpu_seconds: float | None = None
    maxrss_mb: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exited(self) -> bool:
        return self.proc.returncode is not None

    def reap(self, block: bool) -> bool:
        """Collect its exit status and resource usage if it has ended; True once it has.

        A descendant still alive in its group then is killed (its CPU counts only as sampled).
        """
        if self.exited:
            return True
        # Look without reaping first: while it is a zombie its pid (= its group id) cannot be
        # reused, so any descendant it left behind can be killed by group safely.
        ended = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG))
        if ended is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        _, status, usage = os.wait4(self.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_seconds = usage.ru_utime + usage.ru_stime
        self.maxrss_mb = usage.ru_maxrss / 1024
        return True


def spawn(argv: Sequence[str], name: str, env: dict[str, str], cwd: Path, log: Path) -> Child:
    """Start ``argv`` in a session of its own, stdout and stderr to ``log``."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Child(proc, name)


def stop_all(children: Sequence[Child], grace: float) -> None:
    """SIGTERM to each (Celery's warm shutdown), then SIGKILL the group of any alive after
    ``grace`` seconds; every one is reaped (see :meth:`Child.reap`)."""
    for c in children:
        if not c.exited:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while not all([c.reap(block=False) for c in children]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for c in children:
        if not c.exited:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.pid, signal.SIGKILL)
            c.reap(block=True)


@dataclass
class _Seen:
    group: int
    hwm_kb: int = 0
    cpu_ticks: int = 0


@dataclass
class GroupSampler:
    """Samples every process of some process groups every ``every`` seconds (a daemon thread)."""

    every: float = 0.2
    groups: set[int] = field(default_factory=set)
    seen: dict[int, _Seen] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self, child: Child) -> None:
        with self._lock:
            self.groups.add(child.pid)

    def __enter__(self) -> GroupSampler:
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self) -> None:
        with self._lock:
            groups = set(self.groups)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                # after "comm)": state ppid pgrp session … utime(12) stime(13) from that point
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                group = int(fields[2])
                if group not in groups:
                    continue
                cpu = int(fields[11]) + int(fields[12])
                hwm = _vm_hwm_kb(entry / "status")
            except (OSError, IndexError, ValueError):
                continue  # it ended in between
            with self._lock:
                seen = self.seen.get(int(entry.name))
                if seen is None:
                    seen = self.seen[int(entry.name)] = _Seen(group)
                seen.hwm_kb = max(seen.hwm_kb, hwm)
                seen.cpu_ticks = max(seen.cpu_ticks, cpu)

    def snapshot(self) -> dict[int, _Seen]:
        """pid -> what was seen of it (after the sampler stopped: final)."""
        with self._lock:
            return dict(self.seen)


def _vm_hwm_kb(status: Path) -> int:
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class SetUsage:
    """What a set of processes used in all: CPU seconds, summed peak RSS, processes counted."""

    cpu_seconds: float
    peak_rss_mb: float
    processes: int
    killed: int
    #: The two CPU figures ``cpu_seconds`` is the larger of (without ``before``), for checking.
    waited_seconds: float
    sampled_seconds: float


def total_usage(children: Sequence[Child], sampler: GroupSampler, before: float = 0.0) -> SetUsage:
    """The set's usage once every child has been reaped; ``before`` adds the CPU of processes
    that ran earlier and alone (e.g. ``wanbatch submit``), which count for CPU, not for RSS."""
    waited = sum(c.cpu_seconds or 0.0 for c in children)
    seen = sampler.snapshot()
    sampled = sum(s.cpu_ticks for s in seen.values()) / CLOCK_TICKS
    rss_kb = 0.0
    for pid, s in seen.items():
        rss_kb += s.hwm_kb
        leader = next((c for c in children if c.pid == pid), None)
        alone = sum(1 for t in seen.values() if t.group == s.group) == 1
        if leader is not None and alone and leader.maxrss_mb is not None:
            rss_kb = rss_kb - s.hwm_kb + max(s.hwm_kb, leader.maxrss_mb * 1024)
    for c in children:  # a child that ended before the first sample
        if c.pid not in seen and c.maxrss_mb is not None:
            rss_kb += c.maxrss_mb * 1024
    killed = sum(1 for c in children if c.proc.returncode == -signal.SIGKILL)
    processes = len(set(seen) | {c.pid for c in children})
    return SetUsage(before + max(waited, sampled), rss_kb / 1024, processes, killed, waited, sampled)


def per_process_cpu(children: Sequence[Child], sampler: GroupSampler) -> dict[str, float]:
    """Each child's CPU seconds, its descendants included (the larger of ``wait4``'s figure and
    the sum of its process group's ``/proc`` samples, as :func:`total_usage` takes for the set):
    which of a distributed run's processes a cost is in."""
    seen = sampler.snapshot()
    out: dict[str, float] = {}
    for c in children:
        sampled = sum(s.cpu_ticks for s in seen.values() if s.group == c.pid) / CLOCK_TICKS
        out[c.name] = max(c.cpu_seconds or 0.0, sampled)
    return out
