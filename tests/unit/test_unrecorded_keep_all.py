"""A process that ends without the database (:meth:`Unrecorded.keep_all`) journals the
submissions whose record write is still on its way, and no later save of the same process (a
step's write failing, or landing, while the hang watch prints its last line) drops them: one
missing from the journal is found ``submitting`` without its request id by the next run, whose
policy may send it — and pay for it — again."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

from worker.steps.unrecorded import Accepted, Journal, Unrecorded, read_journal

URL = "postgresql://postgres@127.0.0.1:5999/x"


def _accepted(job_id: str, request_id: str) -> Accepted:
    return Accepted(
        job_id=job_id,
        attempt=1,
        request_id=request_id,
        gateway_request_id=None,
        status_url=None,
        response_url=None,
        cancel_url=None,
        running=False,
        submitted_at=datetime(2026, 1, 2, tzinfo=UTC),
    )


STUCK = _accepted("job-stuck", "0f3c2a9e-1d2b-4c5d-8e7f-9a0b1c2d3e4f")
FAILING = _accepted("job-failing", "1f3c2a9e-1d2b-4c5d-8e7f-9a0b1c2d3e4f")


def _journalled(unrecorded: Unrecorded) -> set[str]:
    assert unrecorded.journal.path is not None
    entries = read_journal(unrecorded.journal.path)
    assert entries is not None
    return {e.request_id for e in entries}


def _held_in_flight(unrecorded: Unrecorded) -> tuple[threading.Event, threading.Thread]:
    """A step whose record write of STUCK hangs (a frozen database) until released."""
    entered, release = threading.Event(), threading.Event()

    def step() -> None:
        with unrecorded.recording(STUCK):
            entered.set()
            release.wait(60)

    thread = threading.Thread(target=step, daemon=True)
    thread.start()
    assert entered.wait(30)
    return release, thread


def test_a_later_failed_write_keeps_the_in_flight_submission_in_the_journal(tmp_path: Path) -> None:
    unrecorded = Unrecorded(URL, Journal(URL, folders=[tmp_path]))
    release, thread = _held_in_flight(unrecorded)
    try:
        assert [a.request_id for a in unrecorded.keep_all()] == [STUCK.request_id]
        assert _journalled(unrecorded) == {STUCK.request_id}
        unrecorded.keep(FAILING)  # another step's write fails while the process ends
        assert _journalled(unrecorded) == {STUCK.request_id, FAILING.request_id}
        unrecorded.recorded(FAILING)  # ... and lands after all
        assert _journalled(unrecorded) == {STUCK.request_id}
        unrecorded.keep(STUCK)  # its own write fails: waited for, listed once
        assert unrecorded.waiting() == [STUCK]
        unrecorded.leave(STUCK)  # its step stops waiting: still kept
        assert unrecorded.waiting() == [STUCK]
    finally:
        release.set()
        thread.join(30)
    # Its step ended without a word (the process ends): it stays kept.
    assert _journalled(unrecorded) == {STUCK.request_id}
    assert unrecorded.left() == [STUCK]


def test_the_in_flight_write_landing_after_all_leaves_the_journal(tmp_path: Path) -> None:
    """Its step records it once its write lands (``_until_recorded``): kept no longer."""
    unrecorded = Unrecorded(URL, Journal(URL, folders=[tmp_path]))
    release, thread = _held_in_flight(unrecorded)
    try:
        unrecorded.keep_all()
        assert _journalled(unrecorded) == {STUCK.request_id}
        unrecorded.recorded(STUCK)
        assert unrecorded.waiting() == []
        assert unrecorded.journal.path is None
        assert list(tmp_path.iterdir()) == []
    finally:
        release.set()
        thread.join(30)
