"""Where the time went, from ``py-spy record -f raw`` output (collapsed stacks).

Each line of a raw file is ``frame;frame;…;frame COUNT`` (outermost first), a frame being
``function (file:line)``. A function's *inclusive* share is the fraction of samples with it
anywhere on the stack (counted once per sample, however deep the recursion), keyed by function
and file without the line, so one function's call sites add up. py-spy records only threads
that are running (no ``--idle``), so shares are of the samples in which the process was busy.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.table import Table


def _function(frame: str) -> str:
    """``name (file:line)`` -> ``name (file)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def inclusive(path: Path) -> tuple[int, Counter[str], Counter[str]]:
    """Total samples, inclusive and self samples per function."""
    total = 0
    incl: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_function(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for function in set(frames):
            incl[function] += n
    return total, incl, own


def top_table(path: Path, title: str, n: int = 25) -> Table:
    """The ``n`` functions with the largest inclusive share, with their self share."""
    total, incl, own = inclusive(path)
    t = Table(title=f"{title} — {total} busy samples ({path})", title_justify="left")
    t.add_column("inclusive", justify="right")
    t.add_column("self", justify="right")
    t.add_column("function (file)")
    for function, count in incl.most_common(n):
        t.add_row(
            f"{count / total * 100:.1f}%",
            f"{own[function] / total * 100:.1f}%" if own[function] else "",
            function,
        )
    return t
