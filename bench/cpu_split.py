"""Where each drain client's CPU goes, by library and by kernel call (issue #11's CPU line).

``bench.drain`` says how much CPU a job costs; this says *where*: the embedded ``wanbatch run``
and the hand-written script each drain the same job list against one simulator (its own
process, as in ``bench.drain``), each under ``perf record -e cpu-clock -c 1000000 -g``: one
sample per millisecond of the client's CPU, so samples are milliseconds, whatever the threads
do. ``perf report`` then splits them by shared object (the Python interpreter, the kernel,
SQLite, FFmpeg, OpenSSL, libc) and the kernel's part by the system call it was in (file syncs,
futex waits and wake-ups, everything else).

Why perf and not py-spy: a sampling profiler of Python stacks cannot see the CPU a thread spends
in the kernel or in C libraries with the interpreter lock released (fsync, SQLite, decoding a
frame, TLS), and py-spy's idle detection misreports blocking calls in some containers. perf
counts CPU wherever it is spent. It needs ``perf`` on the PATH and permission to profile one's
own processes (``kernel.perf_event_paranoid`` ≤ 2, or root).

    python -m bench.cpu_split                  # 400 jobs, concurrency 8, model time 0.5 s
    python -m bench.cpu_split --jobs 200 --keep /tmp/perf   # keep the perf.data files

perf's sampling costs the profiled process a little: compare the two columns with each other,
and take the CPU per job of record from ``bench.drain``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from bench._common import ROOT, byte_compile, machine_summary, print_table, today
from bench.drain import WanbatchOptions, embedded_command, handwritten_command, start_simulator

#: Shared objects grouped as the table shows them: (label, pattern of the object's name).
GROUPS: tuple[tuple[str, str], ...] = (
    ("Python interpreter", r"^libpython|^python3"),
    ("kernel", r"^\[kernel"),
    ("SQLite", r"sqlite"),
    ("FFmpeg (PyAV)", r"^libav|^libsw|^av\b|\.abi3\.so$"),
    ("OpenSSL", r"^libssl|^libcrypto|^_ssl"),
    ("libc", r"^libc\.|^libm\.|^ld-linux"),
)
OTHER = "other (C extensions, …)"

#: Kernel entry points whose inclusive share is shown apart: (label, symbols).
SYSCALLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernel: fsync / fdatasync", ("__x64_sys_fsync", "__x64_sys_fdatasync")),
    ("kernel: futex (threads waiting, waking)", ("__x64_sys_futex",)),
    ("kernel: page faults", ("asm_exc_page_fault",)),
)


@dataclass
class Split:
    """One client's CPU in milliseconds, by group."""

    jobs: int
    ms: Counter[str] = field(default_factory=Counter)
    total_ms: int = 0

    def per_job(self, group: str) -> float:
        return self.ms[group] / self.jobs


def _group(dso: str) -> str:
    return next((label for label, pattern in GROUPS if re.search(pattern, dso)), OTHER)


def _report(data: Path, *args: str) -> list[str]:
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "-q", "-g", "none", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


def split_of(data: Path, jobs: int) -> Split:
    """The samples of ``data`` (one per CPU millisecond) by group and kernel entry point."""
    return split_from_reports(
        _report(data, "--no-children", "--sort", "dso", "-n"),
        _report(data, "--children", "--sort", "sym", "--dsos", "[kernel.kallsyms]"),
        jobs,
    )


def split_from_reports(dso_lines: list[str], kernel_lines: list[str], jobs: int) -> Split:
    """A :class:`Split` from ``perf report``'s lines: samples by shared object
    (``65.30%  10790  libpython3.11.so.1.0``) and the kernel's symbols with their inclusive share
    (``2.57%  0.01%  [k] __x64_sys_fdatasync``)."""
    split = Split(jobs)
    for line in dso_lines:
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1].isdigit():
            split.ms[_group(parts[2].strip())] += int(parts[1])
    split.total_ms = sum(split.ms.values())
    for label, symbols in SYSCALLS:
        share = 0.0
        for line in kernel_lines:
            parts = line.split()
            if parts and parts[-1] in symbols:
                share += float(parts[0].rstrip("%"))
        split.ms[label] = round(share / 100 * split.total_ms)
    return split


def _perf(out: Path) -> list[str]:
    return ["perf", "record", "-q", "-e", "cpu-clock", "-c", "1000000", "-g", "-o", str(out), "--"]


def _run(argv: list[str], env: dict[str, str], log: Path) -> None:
    with log.open("w") as err:
        code = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{argv[argv.index('--') + 1 :][:3]} exited {code}:\n{tail}")


def table(jobs: int, wanbatch: Split, script: Split) -> Table:
    t = Table(
        title=f"CPU ms per job by where it is spent ({jobs} jobs, perf cpu-clock samples)",
        title_justify="left",
    )
    for header in ("spent in", "wanbatch run", "handwritten script", "difference"):
        t.add_column(header, justify="left" if header == "spent in" else "right")
    rows = [label for label, _ in GROUPS] + [OTHER]
    for label in rows:
        a, b = wanbatch.per_job(label), script.per_job(label)
        t.add_row(label, f"{a:.2f}", f"{b:.2f}", f"{a - b:+.2f}")
        if label == "kernel":
            for sub, _ in SYSCALLS:
                a, b = wanbatch.per_job(sub), script.per_job(sub)
                t.add_row(f"  {sub.removeprefix('kernel: ')}", f"{a:.2f}", f"{b:.2f}", f"{a - b:+.2f}")
    a, b = wanbatch.total_ms / wanbatch.jobs, script.total_ms / script.jobs
    t.add_row("total", f"{a:.2f}", f"{b:.2f}", f"{a - b:+.2f}", style="bold")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=8, help="the account's concurrency at the simulator")
    p.add_argument("--latency", type=float, default=0.5, help="model time (s)")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--keep", type=Path, metavar="DIR", help="keep the perf.data files in DIR")
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        print("bench.cpu_split needs `perf` (Debian: linux-perf) on the PATH", file=sys.stderr)
        return 2
    byte_compile()
    print(f"{today()} · {machine_summary()}")
    with tempfile.TemporaryDirectory(prefix="bench-cpu-split-") as raw:
        tmp = Path(raw)
        keep = args.keep or tmp
        keep.mkdir(parents=True, exist_ok=True)
        sim = start_simulator(tmp, args.concurrency, args.latency, 0.0, args.seed)
        try:
            argv, env, work = embedded_command(sim, tmp, args.jobs, WanbatchOptions(extra_env={}))
            _run([*_perf(keep / "wanbatch.data"), *argv], env, work / "stderr.log")
            sim.reset()
            argv, env, work = handwritten_command(sim, tmp, args.jobs, args.concurrency)
            _run([*_perf(keep / "handwritten.data"), *argv], env, work / "stderr.log")
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"a run broke: {exc}", file=sys.stderr)
            return 1
        finally:
            sim.stop()
        wanbatch = split_of(keep / "wanbatch.data", args.jobs)
        script = split_of(keep / "handwritten.data", args.jobs)
    print_table(table(args.jobs, wanbatch, script))
    return 0


if __name__ == "__main__":
    sys.exit(main())
