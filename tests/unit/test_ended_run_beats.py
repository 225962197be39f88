"""A heartbeat whose process has ended says when a batch was last seen, never that it is processed.

A killed ``wanbatch run`` (kill -9, a closed SSH session) leaves its heartbeat behind. For the
minute that beat stayed fresh (``jobs.listing.PROCESSING_STALE_SECONDS``) ``status``, the
dashboard and /metrics said the batch was processed, and the headline blamed a cap or fal's
queue. :class:`jobs.store.BatchBeat` keeps apart the last sighting (``seen``) and the last beat of
a process not known to have ended (``live``); processing goes by the latter only.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from jobs import listing
from jobs.listing import LastBeat, Totals

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _unfinished() -> Totals:
    totals = Totals(first_submitted_at=NOW - timedelta(minutes=5))
    totals.counts.update(succeeded=1, queued=2, pending=3)
    return totals


def test_a_fresh_beat_of_an_ended_process_is_only_a_last_sighting() -> None:
    killed = LastBeat(seen=NOW - timedelta(seconds=5), live=None)  # its only process has ended
    assert not listing.is_processing(killed, now=NOW)
    assert listing.ended_run(killed, now=NOW)
    assert (
        listing.idle_reason(_unfinished(), killed, now=NOW) == "nothing is processing it (last seen 5s ago)"
    )


def test_a_live_process_beside_it_still_processes_the_batch() -> None:
    # The killed run beat last, but another live process beat within the minute: processed.
    beside = LastBeat(seen=NOW - timedelta(seconds=2), live=NOW - timedelta(seconds=20))
    assert listing.is_processing(beside, now=NOW)
    assert not listing.ended_run(beside, now=NOW)
    assert listing.idle_reason(_unfinished(), beside, now=NOW) == ""


def test_beats_of_live_processes_go_stale_as_before() -> None:
    alive = LastBeat(seen=NOW - timedelta(seconds=5), live=NOW - timedelta(seconds=5))
    assert listing.is_processing(alive, now=NOW)
    assert not listing.ended_run(alive, now=NOW)
    stale = NOW - timedelta(minutes=3)
    stopped = LastBeat(seen=stale, live=stale)  # another host's, silent: the staleness decides
    assert not listing.is_processing(stopped, now=NOW)
    assert not listing.ended_run(stopped, now=NOW)  # not known to have ended: its caps still said
    assert (
        listing.idle_reason(_unfinished(), stopped, now=NOW) == "nothing is processing it (last seen 3m ago)"
    )
    # A killed run's beat after a live process's that went stale: the killed one was the last.
    later = LastBeat(seen=NOW - timedelta(seconds=5), live=stale)
    assert not listing.is_processing(later, now=NOW)
    assert listing.ended_run(later, now=NOW)
    assert listing.idle_reason(_unfinished(), later, now=NOW) == "nothing is processing it (last seen 5s ago)"


def test_no_beat_at_all_is_no_ended_run() -> None:
    assert not listing.is_processing(None, now=NOW)
    assert not listing.ended_run(None, now=NOW)
    assert listing.idle_reason(_unfinished(), None, now=NOW) == "nothing is processing it"
