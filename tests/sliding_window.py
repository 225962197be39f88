"""Counting events in sliding windows: how the rate-limit tests read the simulator's ledger."""

from __future__ import annotations


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """Most events in any half-open window [t, t + window) (sliding, not calendar seconds)."""
    times = sorted(times)
    best = j = 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + window:
            j += 1
        best = max(best, j - i)
    return best
