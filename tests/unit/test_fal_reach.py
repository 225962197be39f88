"""The hold on a process's submits while fal is unreachable, and a failure's error_type.

A fake clock drives the hold: no test waits for the pauses it describes.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import httpx

from jobs.errors import FinalProviderError, ProviderError, RetryableProviderError
from jobs.listing import FAL_HOLD_RENEW_SECONDS
from worker.fal.errors import DownloadUnreachedError, FalUnreachableError, unreached
from worker.steps.failures import failure_type
from worker.steps.fal_reach import LONGEST_PAUSE_SECONDS, RELEASE_WAIT_SECONDS, FalReach, Hold


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reach() -> tuple[FalReach, Clock]:
    clock = Clock()
    return FalReach(clock=clock, wall=lambda: datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)), clock


def test_fal_answering_holds_nothing() -> None:
    fal, _ = reach()
    assert fal.admit() == (0.0, False)
    assert (fal.down, fal.held_for(), fal.note()) == (False, 0.0, None)


def test_one_probe_after_each_pause_the_pause_doubling_up_to_a_minute() -> None:
    fal, clock = reach()
    assert fal.failed("could not connect (ConnectError): refused", probe=False) == 1.0
    assert fal.note() == (
        "fal unreachable since 03:04:05 UTC: could not connect (ConnectError): refused; retrying every 1s"
    )
    assert fal.admit() == (1.0, False)  # held
    # a submit sent before the hold was seen fails too: it does not lengthen the pause
    assert fal.failed("refused", probe=False) == 1.0
    pauses = []
    for _ in range(9):
        clock.now += fal.held_for()
        assert fal.admit() == (0.0, True)  # the probe
        assert fal.admit()[1] is False  # and only it: the next waits for its outcome
        fal.failed("refused", probe=True)
        pauses.append(fal.pause)
    assert pauses == [2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert fal.pause == LONGEST_PAUSE_SECONDS
    assert (fal.note() or "").endswith("retrying every 60s")


def test_the_first_answer_ends_the_hold() -> None:
    fal, clock = reach()
    fal.failed("refused", probe=False)
    clock.now += 1
    assert fal.admit() == (0.0, True)
    fal.answered()
    assert (fal.down, fal.note(), fal.admit()) == (False, None, (0.0, False))
    fal.failed("refused", probe=False)  # a new outage starts from the first pause again
    assert fal.pause == 1.0


def test_only_a_connect_failure_is_unreached() -> None:
    def caused(exc: ProviderError, cause: Exception) -> ProviderError:
        exc.__cause__ = cause
        return exc

    assert unreached(FalUnreachableError("fal submit: not sent, could not connect"))
    assert unreached(caused(RetryableProviderError("upload: network error"), httpx.ConnectTimeout("t")))
    assert not unreached(caused(RetryableProviderError("upload: network error"), httpx.ReadTimeout("t")))
    assert not unreached(RetryableProviderError("HTTP 503", status_code=503))
    # a proxy that did not open the tunnel to fal's storage or the upload host: nothing sent
    assert unreached(caused(RetryableProviderError("upload: network error"), httpx.ProxyError("407")))
    assert unreached(DownloadUnreachedError("fal upload: could not connect", host="cdn.example"))


def test_every_failure_of_a_step_has_an_error_type() -> None:
    network = RetryableProviderError("fal status: network error (ReadError)")
    network.__cause__ = httpx.ReadError("reset")
    assert failure_type(network) == "network_error"
    assert failure_type(RetryableProviderError("gateway", status_code=502)) == "http_502"
    assert failure_type(FinalProviderError("refused", status_code=422, error_type="bad_input")) == "bad_input"
    assert failure_type(RetryableProviderError("something else")) == "retryable_provider_error"


def test_the_hold_is_recorded_when_it_begins_renewed_now_and_then_and_ended_never_per_probe() -> None:
    """What ``status`` reads (``fal_holds``): written when the hold begins, renewed by a failed
    probe at most every FAL_HOLD_RENEW_SECONDS, ended when fal answers — not once per probe."""
    fal, clock = reach()
    written: list[Hold | None] = []
    fal.recorder = written.append
    fal.failed("refused", probe=False)
    assert [h.since if h else None for h in written] == [datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)]
    assert written[0] is not None
    assert written[0].pause_seconds == 1.0
    fal.failed("refused", probe=False)  # a submit sent before the hold was seen: nothing written
    for _ in range(9):  # probes after 1, 2, 4, … 60 s: 243 s in all
        clock.now += fal.held_for()
        assert fal.admit()[1] is True
        fal.failed("refused", probe=True)
    renewals = written[1:]
    assert 1 <= len(renewals) <= 243 // FAL_HOLD_RENEW_SECONDS < 9
    assert all(h is not None and h.pause_seconds > 1 for h in renewals)
    fal.answered()
    assert written[-1] is None  # the hold is over
    fal.answered()  # nothing more to say
    fal.release()
    assert written[-1] is None
    assert len(written) == 2 + len(renewals)


def test_the_first_answer_a_process_hears_records_an_end_once_though_it_never_held() -> None:
    """A process that died holding never recorded its hold's end, and the jobs its backoff held
    wait for it: the first answer fal gives the next process records an end (which ends those
    waits, ``Runtime.end_fal_waits``), once; later answers write nothing."""
    fal, _ = reach()
    written: list[Hold | None] = []
    fal.recorder = written.append
    fal.answered()
    assert written == [None]
    fal.answered()
    fal.release()
    assert written == [None]


def test_a_first_end_that_could_not_be_recorded_is_recorded_at_the_next_answer() -> None:
    fal, _ = reach()
    tries: list[Hold | None] = []

    def refused(hold: Hold | None) -> None:
        tries.append(hold)
        raise OSError("the database is unreachable")

    fal.recorder = refused
    fal.answered()
    fal.recorder = tries.append
    fal.answered()
    fal.answered()
    assert tries == [None, None]


def test_a_stop_does_not_wait_for_a_record_held_up_by_a_lock() -> None:
    """CI: Ctrl-C of a run while another PostgreSQL session held ``LOCK TABLE jobs`` never ended.
    The first answer fal gave had its step record the end of every hold (which updates
    ``jobs``), a running step's write that waits for the lock as long as it takes; the stop's
    :meth:`FalReach.release` waited for that record. Now it waits at most
    ``RELEASE_WAIT_SECONDS`` and records nothing more; the step's record is its own business."""
    fal, _ = reach()
    stuck, unstick = threading.Event(), threading.Event()
    written: list[Hold | None] = []

    def waits_for_a_lock(hold: Hold | None) -> None:
        stuck.set()
        unstick.wait(60)
        written.append(hold)

    fal.recorder = waits_for_a_lock
    step = threading.Thread(target=fal.answered)  # the first answer this process hears
    step.start()
    try:
        assert stuck.wait(10)
        stop = threading.Thread(target=fal.release)
        began = time.monotonic()
        stop.start()
        stop.join(RELEASE_WAIT_SECONDS + 10)
        assert not stop.is_alive(), "the stop waited for the step's record"
        assert time.monotonic() - began >= RELEASE_WAIT_SECONDS - 0.5
        fal.release()  # again (the conductor's close, then the runtime's): at once
        assert time.monotonic() - began < RELEASE_WAIT_SECONDS + 5
    finally:
        unstick.set()
        step.join(10)
    assert written == [None]  # the step's own record went through, once the lock was free
    fal.failed("refused", probe=False)  # after the stop: nothing more is recorded
    fal.answered()
    assert written == [None]
