"""What `status` advises for jobs a deadline cancelled, and what `rerun` says of a new batch that
keeps its parent's window while it is closed (the clock given explicitly)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from cli.output import _deadline_advice, deadline_cancelled_text
from jobs.batches import BatchReport, SubmitResult
from jobs.rerun import rerun_wait_note

BATCH_ID = "a9262bde" + "0" * 24
NOTHING = {"jobs": 0, "cancelled_for_budget": 0, "cancelled_for_daily_budget": 0, "reruns": []}
BERLIN = {"not_before": None, "deadline": None, "window": "22:00-06:00", "timezone": "Europe/Berlin"}


def _report(**fields: Any) -> BatchReport:
    base = {"batch": BATCH_ID, "name": "night", "cancelled_for_deadline": 4, "schedule": BERLIN}
    covered = {"rerun_rendered": NOTHING, "rerun_pending": NOTHING}
    return cast(BatchReport, {**base, "simulated": False, **covered, **fields})


def test_the_deadline_advises_a_rerun_and_now() -> None:
    assert _deadline_advice(_report()) == [
        "  to run them: `wanbatch rerun night --failed-only --now` sends them now; "
        "`wanbatch rerun night --failed-only` keeps the window 22:00-06:00 (Europe/Berlin) and waits for it"
    ]


def test_without_a_window_the_rerun_is_sent_at_once() -> None:
    assert _deadline_advice(_report(schedule={**BERLIN, "window": None}, simulated=True)) == [
        "  to run them: `wanbatch rerun night --failed-only --simulate`"
    ]


def test_jobs_a_rerun_renders_are_not_advised_again() -> None:
    pending = {**NOTHING, "jobs": 3, "cancelled_for_deadline": 3}
    (advice,) = _deadline_advice(_report(rerun_pending=pending))
    assert advice.startswith("  to run the other 1: ")
    assert _deadline_advice(_report(rerun_pending={**pending, "cancelled_for_deadline": 4})) == []


def test_the_deadline_summary_counts_jobs_sent_to_fal_apart() -> None:
    """A batch whose 3 requests fal timed out in its queue at the deadline (the start timeout
    their submits carried) said "3 job(s) cancelled: not sent before the deadline", though they
    were sent: the ones sent are counted apart from the ones never sent."""
    assert deadline_cancelled_text(_report(cancelled_for_deadline=3, cancelled_for_deadline_sent=0)) == (
        "3 job(s) cancelled: not sent before the deadline"
    )
    assert deadline_cancelled_text(_report(cancelled_for_deadline=3, cancelled_for_deadline_sent=3)) == (
        "3 job(s) cancelled by the deadline: sent to fal, their requests ended unfinished (see why below)"
    )
    assert deadline_cancelled_text(_report(cancelled_for_deadline=5, cancelled_for_deadline_sent=3)) == (
        "5 job(s) cancelled by the deadline: 2 not sent before it; 3 sent to fal, their requests ended "
        "unfinished (see why below)"
    )


def _rerun(schedule: dict[str, Any] | None) -> SubmitResult:
    return SubmitResult(
        batch_id=BATCH_ID, name="night-rerun-1", created=True, added=4, existing=0, total=4, counts={},
        schedule=schedule,
    )  # fmt: skip


def test_a_rerun_waiting_for_its_window_says_when_it_opens_and_how_to_send_it_now() -> None:
    morning = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)  # 07:00 in Berlin: the window opens at 22:00
    assert rerun_wait_note(_rerun(BERLIN), morning) == (
        "batch night-rerun-1 waits for its window (opens 22:00 Europe/Berlin, in 15h); `--now` sends it "
        "now (Ctrl-C, `wanbatch cancel night-rerun-1`, then the same rerun with `--now`)"
    )


def test_a_rerun_whose_window_is_open_or_that_has_none_says_nothing() -> None:
    night = datetime(2026, 12, 2, 22, 0, tzinfo=UTC)  # 23:00 in Berlin
    assert rerun_wait_note(_rerun(BERLIN), night) is None
    assert rerun_wait_note(_rerun(None), night) is None
