"""What a run whose batch sends nothing more (paused) still waits for before it ends."""

from __future__ import annotations

from typing import cast

from jobs.batches import BatchProgress, left_to_collect
from jobs.states import JobState


def _progress(state: str, **counts: int) -> BatchProgress:
    every = {s.value: 0 for s in JobState} | counts
    return cast(BatchProgress, {"state": state, "counts": every})


def test_a_user_paused_batch_waits_for_its_downloads_too() -> None:
    """Paid videos still to fetch held nothing back: the run ended with them undownloaded."""
    assert left_to_collect(_progress("active", downloading=2, pending=5)) == 2
    assert left_to_collect(_progress("active", running=1, queued=1, downloading=1, retry_wait=3)) == 3
    assert left_to_collect(_progress("active", pending=4, succeeded=2)) == 0


def test_a_batch_paused_for_its_outputs_or_by_fal_waits_for_fal_only() -> None:
    """Its downloads wait on the fix (a full disk, a refused result), tried again for as long
    as it takes: waiting for them would never end the run; the next run fetches them."""
    assert left_to_collect(_progress("paused", downloading=2, running=1)) == 1
    assert left_to_collect(_progress("paused", downloading=2)) == 0
