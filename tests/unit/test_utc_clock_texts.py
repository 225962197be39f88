"""Every time of day the views give names its date when it is not on ``now``'s UTC day.

A bare "since 23:50:00 UTC" or "until 01:02:11 UTC" reads as today's: an overnight render read
the next morning (a hold on fal since last night, a lease that ends after midnight, a broker
down since yesterday) said a time of the wrong day. Each text now writes its instant through
:func:`jobs.listing.utc_clock` with the ``now`` its caller has: the time alone on ``now``'s UTC
day, the date too on any other. Fixed instants: nothing here depends on the wall clock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from jobs import listing, store
from jobs.batches import broker_down_text
from jobs.listing import DeadHolder, FalHoldView
from worker.steps.fal_reach import FalReach

#: Last night, and the next morning (UTC) when it is read.
NIGHT = datetime(2026, 12, 5, 23, 50, 0, tzinfo=UTC)
MORNING = datetime(2026, 12, 6, 0, 10, 0, tzinfo=UTC)
#: The evening before a lease that ends after midnight, and just after midnight.
EVENING = datetime(2026, 12, 5, 23, 58, 0, tzinfo=UTC)
AFTER_MIDNIGHT = datetime(2026, 12, 6, 0, 2, 11, tzinfo=UTC)
MIDNIGHT = datetime(2026, 12, 6, 0, 0, 30, tzinfo=UTC)


def test_a_hold_on_fal_since_last_night_names_its_date() -> None:
    hold = FalHoldView("worker-3:4242:", NIGHT, MORNING + timedelta(seconds=32), 60.0, "refused")
    assert listing.fal_hold_text([hold], now=MORNING) == (
        "fal unreachable from worker-3 (pid 4242) since 2026-12-05 23:50:00 UTC "
        "(submits held, next probe in 32s): refused"
    )
    same_day = NIGHT + timedelta(minutes=5)
    assert listing.fal_hold_text([hold], now=same_day).startswith(
        "fal unreachable from worker-3 (pid 4242) since 23:50:00 UTC "
    )


def test_a_wait_for_leases_that_end_after_midnight_names_its_date() -> None:
    holders = [store.LeaseHolder("host-a:123:4", 3, AFTER_MIDNIGHT)]
    assert listing.waiting_note(holders, EVENING) == (
        "waiting for 3 job(s) leased to host-a:123:4 (another process) until 2026-12-06 00:02:11 UTC"
    )
    assert listing.waiting_note(holders, EVENING, gone={"host-a:123:4"}) == (
        "waiting for 3 job(s) leased to host-a:123:4 (a process that has ended; submits whose "
        "outcome is checked then) until 2026-12-06 00:02:11 UTC"
    )
    assert listing.waiting_note(holders, MIDNIGHT).endswith("(another process) until 00:02:11 UTC")


def test_jobs_a_gone_process_holds_past_midnight_name_the_date_they_are_taken_over() -> None:
    dead = [DeadHolder("host-a:123:4", 1, AFTER_MIDNIGHT, EVENING - timedelta(seconds=40), False)]
    assert listing.dead_holders_text(dead, now=EVENING) == (
        "1 job held by process 123@host-a, not seen for 40s: taken over at 2026-12-06 00:02:11 UTC "
        "when its lease ends"
    )
    assert listing.dead_holders_text(dead, now=MIDNIGHT).endswith(
        ": taken over at 00:02:11 UTC when its lease ends"
    )


def test_a_broker_down_since_last_night_names_its_date() -> None:
    assert broker_down_text(NIGHT, None, now=MORNING) == (
        "the workers cannot reach the broker (WANBATCH_BROKER_URL) since 2026-12-05 23:50:00 UTC: "
        "submits and downloads wait for it"
    )
    # The day is UTC's, whatever offset the instant comes in (00:50 in Berlin is 23:50 UTC).
    local = datetime.fromisoformat("2026-12-06T00:50:00+01:00")
    assert broker_down_text(local, None, now=NIGHT) == (
        "the workers cannot reach the broker (WANBATCH_BROKER_URL) since 23:50:00 UTC: "
        "submits and downloads wait for it"
    )


def test_the_progress_line_s_hold_on_fal_since_last_night_names_its_date() -> None:
    """``run``'s progress line and a held job's reason (:meth:`FalReach.note`)."""
    wall = [NIGHT]
    fal = FalReach(clock=lambda: 100.0, wall=lambda: wall[0])
    fal.failed("could not connect (ConnectError): refused", probe=False)
    assert fal.note() == (
        "fal unreachable since 23:50:00 UTC: could not connect (ConnectError): refused; retrying every 1s"
    )
    wall[0] = MORNING  # still held the next morning
    said = "fal unreachable since 2026-12-05 23:50:00 UTC: could not connect (ConnectError): refused"
    assert (fal.note() or "").startswith(said)
    assert (fal.note(NIGHT + timedelta(minutes=1)) or "").startswith("fal unreachable since 23:50:00 UTC: ")
    assert (fal.note(MORNING) or "").startswith(said)
