"""worker.one_cpu: an embedded run's threads share one CPU, move off it when it gets busy, and
give the caller its affinity back.

Affinity is per thread on Linux: each test pins a thread of its own, never pytest's."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from pydantic import ValidationError

from jobs.settings import Settings
from worker.one_cpu import BUSY_SHARE, CHECK_EVERY, SharedCpu, current_cpu, read_cpu_times

T = TypeVar("T")

ALLOWED = frozenset(os.sched_getaffinity(0))


def _in_thread(work: Callable[[], T]) -> T:
    """``work()`` on a thread of its own (a pin never reaches pytest's threads)."""
    out: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            out.append(work())
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


def test_this_machine_has_several_cpus() -> None:
    """The tests below pin and move between CPUs: they need two (CI has two)."""
    assert len(ALLOWED) >= 2, f"these tests need 2 CPUs; this process may use {sorted(ALLOWED)}"


def test_auto_pins_the_caller_and_the_threads_it_starts_then_gives_the_affinity_back() -> None:
    def work() -> tuple[int, set[int], set[int], set[int], set[int]]:
        earlier_seen: list[set[int]] = []
        earlier_go = threading.Event()
        earlier_done = threading.Event()

        def earlier() -> None:  # a thread the process had before the run: left alone
            earlier_go.wait(5)
            earlier_seen.append(os.sched_getaffinity(0))
            earlier_done.set()

        before_thread = threading.Thread(target=earlier)
        before_thread.start()
        shared = SharedCpu.start("auto")
        assert shared is not None
        mine = os.sched_getaffinity(0)
        child: list[set[int]] = []
        started = threading.Thread(target=lambda: child.append(os.sched_getaffinity(0)))
        started.start()
        started.join()
        earlier_go.set()
        earlier_done.wait(5)
        before_thread.join()
        shared.release()
        return shared.cpu, mine, child[0], earlier_seen[0], os.sched_getaffinity(0)

    cpu, mine, child, earlier, after = _in_thread(work)
    assert cpu in ALLOWED
    assert mine == {cpu}
    assert child == {cpu}  # inherited: the run's pools and streams start after the pin
    assert earlier == set(ALLOWED)
    assert after == set(ALLOWED)


def test_auto_takes_the_cpu_the_caller_runs_on() -> None:
    # a thread allowed one CPU only is left as it is
    def single() -> SharedCpu | None:
        os.sched_setaffinity(0, {min(ALLOWED)})
        try:
            return SharedCpu.start("auto")
        finally:
            os.sched_setaffinity(0, ALLOWED)

    assert _in_thread(single) is None

    def on_max() -> tuple[int | None, int]:
        os.sched_setaffinity(0, {max(ALLOWED)})
        here = current_cpu()
        os.sched_setaffinity(0, ALLOWED)  # still on that CPU until the scheduler moves it
        shared = SharedCpu.start("auto")
        assert shared is not None
        cpu = shared.cpu
        shared.release()
        return here, cpu

    here, cpu = _in_thread(on_max)
    assert here == max(ALLOWED)
    assert cpu in ALLOWED


def test_off_pins_nothing_and_a_named_cpu_is_that_cpu() -> None:
    assert _in_thread(lambda: SharedCpu.start("off")) is None

    def named() -> tuple[int, set[int], bool]:
        shared = SharedCpu.start(str(max(ALLOWED)))
        assert shared is not None
        got = os.sched_getaffinity(0)
        shared.release()
        return shared.cpu, got, shared.movable

    cpu, got, movable = _in_thread(named)
    assert (cpu, got, movable) == (max(ALLOWED), {max(ALLOWED)}, False)


def test_a_cpu_the_process_may_not_use_is_refused_naming_the_ones_it_may() -> None:
    with pytest.raises(ValueError, match=r"CPU 4096 is not one this process may use \(0, 1"):
        _in_thread(lambda: SharedCpu.start("4096"))


@pytest.mark.parametrize("value", ["auto", " AUTO ", "off", "Off", "0", "007"])
def test_the_setting_accepts_auto_off_and_cpu_numbers(value: str) -> None:
    assert Settings(cpu_affinity=value).cpu_affinity in {"auto", "off", "0", "7"}


@pytest.mark.parametrize("value", ["", "on", "-1", "1.5", "0,1", "١", "123456"])
def test_the_setting_refuses_anything_else(value: str) -> None:
    with pytest.raises(ValidationError, match="expected auto, off or a CPU number such as 0"):
        Settings(cpu_affinity=value)


def _shared(cpu: int = 0) -> SharedCpu:
    return SharedCpu(cpu=cpu, allowed=frozenset({0, 1, 2}), before=frozenset({0, 1, 2}))


Looks = dict[int, tuple[int, int]]


def _looks(busy: dict[int, int], total: int = 500) -> tuple[Looks, Looks]:
    """Two /proc/stat looks ``total`` ticks apart in which each CPU was busy ``busy[cpu]`` ticks."""
    before = {cpu: (1000, 10_000) for cpu in busy}
    after = {cpu: (1000 + b, 10_000 + total) for cpu, b in busy.items()}
    return before, after


def test_moves_when_other_work_took_the_cpu_over_to_the_idlest() -> None:
    before, after = _looks({0: 480, 1: 200, 2: 30})  # 5 s at 100 ticks/s
    assert _shared().busier_than_elsewhere(before, after, own_seconds=0.5) == 2


def test_stays_when_the_cpu_is_busy_with_the_run_itself() -> None:
    before, after = _looks({0: 480, 1: 0, 2: 0})
    # the process used 4.5 of the 5 s: what is left is not other work
    assert _shared().busier_than_elsewhere(before, after, own_seconds=4.5) is None


def test_two_runs_on_one_cpu_part() -> None:
    """Another run took half of the CPU: the run moves to the idle one."""
    before, after = _looks({0: 500, 1: 10, 2: 300})
    assert _shared().busier_than_elsewhere(before, after, own_seconds=2.5) == 1


def test_stays_when_no_cpu_is_clearly_idler() -> None:
    before, after = _looks({0: 400, 1: 380, 2: 390})
    assert BUSY_SHARE < 0.8
    assert _shared().busier_than_elsewhere(before, after, own_seconds=0.0) is None


def test_stays_when_its_cpu_is_missing_from_the_looks() -> None:
    before, after = _looks({1: 0, 2: 0})
    assert _shared().busier_than_elsewhere(before, after, own_seconds=0.0) is None


def test_check_moves_the_pinned_threads_and_only_them() -> None:
    def work() -> tuple[bool, int, set[int], set[int], set[int]]:
        free = threading.Event()
        seen: list[set[int]] = []
        go = threading.Event()

        def unpinned() -> None:  # started before the pin
            go.wait(5)
            seen.append(os.sched_getaffinity(0))
            free.set()

        other = threading.Thread(target=unpinned)
        other.start()
        shared = SharedCpu.start(str(min(ALLOWED)))
        assert shared is not None
        shared.movable = True
        target = max(ALLOWED)
        clock = [100.0]
        shared._clock = lambda: clock[0]
        shared._last_check = 0.0
        setattr(shared, "busier_than_elsewhere", lambda before, after, own_seconds: target)  # noqa: B010
        moved = shared.check()
        mine = os.sched_getaffinity(0)
        go.set()
        free.wait(5)
        other.join()
        # too soon for another look
        clock[0] += CHECK_EVERY * 0.75
        again = shared.check()
        shared.release()
        return moved and not again, shared.cpu, mine, seen[0], os.sched_getaffinity(0)

    moved, cpu, mine, other, after = _in_thread(work)
    assert moved
    assert cpu == max(ALLOWED)
    assert mine == {max(ALLOWED)}
    assert other == set(ALLOWED)
    assert after == set(ALLOWED)


def test_a_named_cpu_is_never_moved() -> None:
    def work() -> bool:
        shared = SharedCpu.start(str(min(ALLOWED)))
        assert shared is not None
        shared._last_check = -1e9
        setattr(shared, "busier_than_elsewhere", lambda before, after, own_seconds: max(ALLOWED))  # noqa: B010
        try:
            return shared.check()
        finally:
            shared.release()

    assert _in_thread(work) is False


def test_reads_busy_and_total_ticks_per_cpu(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  10 0 10 100 5 0 0 0 0 0\n"
        "cpu0 1 2 3 40 5 6 7 8 9 10\n"
        "cpu1 10 0 0 90 0\n"
        "cpufreq nonsense\n"
        "cpu2 x y z\n"
        "intr 1 2 3\n"
    )
    # cpu0: busy = user+nice+system+irq+softirq+steal = 1+2+3+6+7+8, total = first 8 columns
    assert read_cpu_times(stat) == {0: (27, 72), 1: (10, 100)}
    assert read_cpu_times(tmp_path / "missing") == {}
    assert set(read_cpu_times()) >= ALLOWED


def test_run_refuses_a_cpu_it_may_not_use_in_one_line_before_storing_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    manifest = tmp_path / "m.yaml"
    manifest.write_text("name: pinned\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a boat\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_")}
    env |= {
        "WANBATCH_CPU_AFFINITY": "4096",
        "WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}",
        "FAL_KEY": "one-cpu-test-key-5c2d",
    }
    done = subprocess.run(
        [sys.executable, "-m", "cli", "run", str(manifest), "--no-progress"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "WANBATCH_CPU_AFFINITY: CPU 4096 is not one this process may use (0, 1" in lines[0]
    assert not (tmp_path / "w.db").exists()  # nothing stored
