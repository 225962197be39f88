"""``run``'s progress refresh takes at most a small share of the run's time, whatever the batch's size."""

from __future__ import annotations

import pytest

from worker.running import REFRESH_MAX_GAP_SECONDS, REFRESH_SHARE, RefreshBudget


def test_a_quick_refresh_may_come_again_at_once_and_a_slow_one_later() -> None:
    budget = RefreshBudget()
    assert budget.due(0.0)  # the first one at once
    budget.spent(10.0, 10.001)  # 1 ms (a small batch): the conductor's own pace (0.5 s) decides
    assert budget.due(10.06)
    budget.spent(20.0, 20.03)  # 30 ms (a 100,000-job batch): 2 % of the time at most
    assert not budget.due(20.03 + 1.4)
    assert budget.due(20.0 + 0.03 / REFRESH_SHARE + 1e-9)


@pytest.mark.parametrize("took", [1.0, 60.0])
def test_the_gap_is_bounded(took: float) -> None:
    """However slow a refresh (a database under load), the next one is at most 10 s later."""
    budget = RefreshBudget()
    budget.spent(0.0, took)
    assert not budget.due(took + REFRESH_MAX_GAP_SECONDS - 0.01)
    assert budget.due(took + REFRESH_MAX_GAP_SECONDS)
