"""A batch's phase: what ``status`` shows in its state column and ``status --json`` as ``phase``."""

from __future__ import annotations

import pytest

from jobs.batches import batch_phase

WAITING = "waiting for window (opens 22:00)"


def _phase(
    state: str = "active",
    *,
    total: int = 4,
    finished: int = 1,
    pause_reason: str | None = None,
    paused_by_user: bool = False,
    schedule_state: str = "",
) -> tuple[str, str | None]:
    return batch_phase(
        state=state,
        total=total,
        finished=finished,
        pause_reason=pause_reason,
        paused_by_user=paused_by_user,
        schedule_state=schedule_state,
    )


def test_a_batch_with_every_job_finished_is_done_though_its_stored_state_is_active() -> None:
    assert _phase(finished=4) == ("done", None)
    assert _phase(total=0, finished=0) == ("active", None)  # nothing expanded yet is not done


def test_cancelled_wins_over_done_and_done_over_any_hold() -> None:
    assert _phase("cancelled", finished=4) == ("cancelled", None)
    assert _phase("paused", finished=4, pause_reason="budget reached") == ("done", None)
    assert _phase(finished=4, paused_by_user=True) == ("done", None)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"state": "paused", "pause_reason": "budget reached"}, ("paused", "budget reached")),
        ({"state": "paused"}, ("paused", "see the log")),
        ({"paused_by_user": True}, ("paused", "by its user")),
        ({"schedule_state": "past deadline: 3 cancelled"}, ("deadline", "past deadline: 3 cancelled")),
        ({"schedule_state": WAITING}, ("waiting", WAITING)),
        (
            {"paused_by_user": True, "schedule_state": "past deadline: 3 cancelled"},
            ("deadline", "past deadline: 3 cancelled"),
        ),
        ({"schedule_state": "open until 06:00"}, ("active", None)),
    ],
    ids=[
        "paused-by-fal",
        "paused-no-reason",
        "paused-by-user",
        "deadline",
        "waiting",
        "paused-past-deadline",
        "window-open",
    ],
)
def test_a_held_batch_says_why(kwargs: dict[str, object], expected: tuple[str, str | None]) -> None:
    assert _phase(**kwargs) == expected  # type: ignore[arg-type]
