"""The open-file budget of a run's status streams (:func:`jobs.open_files.streams_that_fit`)."""

from __future__ import annotations

import pytest

from jobs.open_files import STATUS_CALLS_AT_ONCE, files_needed, streams_that_fit


def test_the_streams_that_fit_leave_room_for_the_threads_and_the_polls() -> None:
    spare = 64 - files_needed(4) - STATUS_CALLS_AT_ONCE
    assert streams_that_fit(4, simulator_here=False, soft=64) == spare
    # With --simulate the bundled simulator holds the other end of each connection: two apiece.
    simulated = (64 - files_needed(4) - 2 * STATUS_CALLS_AT_ONCE) // 2
    assert streams_that_fit(4, simulator_here=True, soft=64) == simulated
    assert streams_that_fit(4, simulator_here=False, soft=files_needed(4)) == 0  # no room: all polled
    assert streams_that_fit(4, simulator_here=False, soft=10) == 0  # never negative
    fewer = 64 - files_needed(16) - STATUS_CALLS_AT_ONCE  # more threads, fewer streams
    assert fewer < spare
    assert streams_that_fit(16, simulator_here=False, soft=64) == fewer


def test_no_known_limit_limits_no_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jobs.open_files.soft_limit", lambda: None)
    assert streams_that_fit(4, simulator_here=False) is None
