"""What a stopping run says of the submits it had in flight at fal, and that it sends no new one.

Audit: a second Ctrl-C printed only ``interrupted again: exiting now`` — nothing of the POSTs
whose answers it abandoned (fal may have queued and billed them) nor of how to go on. The line
keeps its documented words and adds both (:func:`worker.running.second_signal_line`). And once
a run stops, a submit step that got past its lease sends nothing (:meth:`Unrecorded.stop_sending`):
the stop waits for the answers of the POSTs already out, not for new ones.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from worker import running
from worker.steps.unrecorded import Unrecorded

UNANSWERED = (
    "(fal may have accepted and billed them, and their outcome is settled after "
    "WANBATCH_LEASE_SECONDS (120s))"
)


@pytest.fixture
def unrecorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Unrecorded:
    """The run being stopped: its runtime (settings, submissions) and its batch, as the handler sees them."""
    waiting = Unrecorded(f"sqlite:///{tmp_path / 'never-opened.db'}")
    rt = SimpleNamespace(settings=SimpleNamespace(lease_seconds=120.0, read_timeout=60.0), unrecorded=waiting)
    monkeypatch.setattr(running._stopping, "runtime", rt)
    monkeypatch.setattr(running._stopping, "batch_id", "b" * 32)
    return waiting


def _again(batch_id: str | None) -> str:
    return f"run `wanbatch run {batch_id and batch_id[:6]}` again to resume"


def test_before_anything_is_processed_the_line_is_the_documented_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(running._stopping, "runtime", None)
    monkeypatch.setattr(running._stopping, "batch_id", None)
    assert running.second_signal_line(_again) == "interrupted again: exiting now"
    assert running.second_signal_line() == "interrupted again: exiting now"


def test_with_nothing_in_flight_it_says_how_to_go_on(unrecorded: Unrecorded) -> None:
    assert running.second_signal_line(_again) == (
        "interrupted again: exiting now; run `wanbatch run bbbbbb` again to resume"
    )


def test_with_posts_in_flight_it_says_what_becomes_of_them(unrecorded: Unrecorded) -> None:
    sent = [unrecorded.sending(), unrecorded.sending()]
    assert running.second_signal_line(_again) == (
        "interrupted again: exiting now; 2 submit(s) were in flight: run `wanbatch run bbbbbb` "
        f"again to resume {UNANSWERED}"
    )
    for one in sent:
        assert one is not None
        one.end()
    assert running.second_signal_line(_again).endswith("again to resume")


def test_a_hint_that_fails_leaves_the_line_without_it(unrecorded: Unrecorded) -> None:
    def broken(_batch_id: str | None) -> str:
        raise RuntimeError("no hint")

    assert unrecorded.sending() is not None
    assert running.second_signal_line(broken) == (
        f"interrupted again: exiting now; 1 submit(s) were in flight {UNANSWERED}"
    )


def test_a_stopped_run_sends_nothing_more_and_still_counts_what_it_sent(unrecorded: Unrecorded) -> None:
    out = unrecorded.sending()
    assert out is not None
    assert unrecorded.stop_sending() == 1  # the one whose answer the stop waits for
    assert unrecorded.sending() is None  # a step that got this far gives its job back unsent
    assert unrecorded.in_flight() == 1
    out.end()
    assert unrecorded.wait_for_sends(0.1) == 0
