"""Which failed downloads are a CDN outage (waited for, never counted), and the outage's log."""

from __future__ import annotations

import httpx
import pytest

from jobs.errors import FinalProviderError, ProviderError, RetryableProviderError
from worker.fal.errors import DownloadIntegrityError, DownloadUnreachedError
from worker.steps.download import host_trouble
from worker.steps.download_reach import PAUSE_AFTER_SECONDS, DownloadReach, DownloadTrouble


def _dropped(cause: Exception) -> RetryableProviderError:
    try:
        raise RetryableProviderError("fal download: network error") from cause
    except RetryableProviderError as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "trouble"),
    [
        (RetryableProviderError("HTTP 503", status_code=503), True),
        (RetryableProviderError("HTTP 500", status_code=500), True),
        (RetryableProviderError("HTTP 429", status_code=429), True),
        (RetryableProviderError("HTTP 408", status_code=408), True),
        (_dropped(httpx.RemoteProtocolError("peer closed connection")), True),
        (_dropped(httpx.ReadTimeout("timed out")), True),
        (RetryableProviderError("HTTP 409", status_code=409), False),
        (RetryableProviderError("download took longer than 600 s"), False),  # WANBATCH_DOWNLOAD_TIMEOUT
        (DownloadIntegrityError("download truncated: the MP4 is cut"), False),
        (DownloadUnreachedError("could not connect to v3.fal.media", host="v3.fal.media"), False),
        (FinalProviderError("output no longer downloadable (HTTP 404)", status_code=404), False),
        (FinalProviderError("the output is not a video"), False),
    ],
)
def test_only_the_hosts_passing_trouble_is_held(exc: ProviderError, trouble: bool) -> None:
    assert host_trouble(exc) is trouble


def test_the_outage_counts_each_jobs_tries_pauses_after_a_minute_and_ends_with_a_video() -> None:
    now = [0.0]
    trouble = DownloadTrouble(lambda: now[0])
    assert trouble.note() is None
    first = trouble.failed("a", "v3.fal.media", "answers HTTP 503")
    assert (first.tries, first.say, first.pause) == (1, True, False)
    assert trouble.failed("b").tries == 1  # each job its own backoff
    now[0] = PAUSE_AFTER_SECONDS
    later = trouble.failed("a")
    assert (later.tries, later.pause) == (2, True)
    assert trouble.note() == "downloads wait: v3.fal.media answers HTTP 503; held, no try counted"
    assert trouble.succeeded("a") == PAUSE_AFTER_SECONDS
    assert trouble.note() is None
    assert trouble.failed("a").tries == 1  # its backoff starts over
    assert trouble.failed("b").tries == 2


def test_a_job_whose_host_stored_other_videos_since_its_last_failure_is_told_to_count_it() -> None:
    """One file the host fails for good while it serves the others is that file's trouble: the
    job's failures count as tries, else it (and the run waiting on it) was held for days."""
    trouble = DownloadTrouble(lambda: 0.0)
    assert trouble.failed("a").serves_others is False  # a first failure: nothing to go by
    assert trouble.failed("a").serves_others is False  # nothing stored meanwhile: an outage
    trouble.succeeded("b")
    assert trouble.failed("a").serves_others is True
    assert trouble.failed("a").serves_others is False  # counted from its last failure on
    trouble.succeeded("b")
    trouble.forget("a")
    assert trouble.failed("a").serves_others is False  # forgotten: a first failure again


def test_the_outage_ends_when_no_job_waits_on_the_host_any_more() -> None:
    """A job that met one 503, then left (its file answered 404, its lease was lost...): the
    outage stayed open, the progress line said "downloads wait" for good, and an hour later
    the first 503 of any job had "lasted" an hour and paused its batch at once."""
    now = [0.0]
    trouble = DownloadTrouble(lambda: now[0])
    trouble.failed("gone", "v3.fal.media", "answers HTTP 503")
    trouble.failed("still", "v3.fal.media", "answers HTTP 503")
    trouble.forget("gone")
    assert trouble.note() is not None  # another job still waits on the host
    trouble.forget("still")
    assert trouble.note() is None
    now[0] = 3600.0
    first = trouble.failed("new", "v3.fal.media", "answers HTTP 503")
    assert (first.tries, first.lasted, first.say, first.pause) == (1, 0.0, True, False)


def test_the_pause_counts_from_the_oldest_failure_still_waiting() -> None:
    now = [0.0]
    trouble = DownloadTrouble(lambda: now[0])
    trouble.failed("a")
    now[0] = 30.0
    trouble.failed("b")
    trouble.forget("a")  # the oldest leaves; b has waited 30 s of the outage
    now[0] = 80.0
    assert (trouble.failed("b").lasted, trouble.failed("c").pause) == (50.0, False)
    now[0] = 30.0 + PAUSE_AFTER_SECONDS
    assert trouble.failed("c").pause  # b's first failure, a minute ago, still waits
    # A video stored whole ends the outage: a job waiting since before counts from the next failure.
    trouble.succeeded("c")
    now[0] = 200.0
    assert trouble.failed("b").lasted == 0.0


def test_a_job_gone_unseen_is_dropped_once_it_would_have_been_tried_again() -> None:
    """A job finished by another process is never forgotten here: once it has not failed for
    WANBATCH_RETRY_MAX_DELAY + WANBATCH_LEASE_SECONDS it has left, and neither keeps the outage
    open nor dates a later job's pause."""
    now = [0.0]
    trouble = DownloadTrouble(lambda: now[0])
    trouble.failed("gone", "v3.fal.media", "answers HTTP 503", stale_after=420.0)
    now[0] = 400.0
    assert trouble.note() is not None  # within its backoff and lease: it may still come back
    now[0] = 421.0
    assert trouble.note() is None  # gone: the outage is over
    first = trouble.failed("new", "v3.fal.media", "answers HTTP 503", stale_after=420.0)
    assert (first.tries, first.lasted, first.say, first.pause, first.held_for) == (1, 0.0, True, False, 0.0)


def test_held_for_counts_from_the_jobs_first_failure_still_waiting() -> None:
    now = [0.0]
    trouble = DownloadTrouble(lambda: now[0])
    trouble.failed("a")
    now[0] = 250.0
    trouble.failed("b")
    assert trouble.failed("a").held_for == 250.0
    trouble.forget("a")
    now[0] = 300.0
    assert trouble.failed("a").held_for == 0.0  # forgotten: starts over
    assert trouble.failed("b").held_for == 50.0
    reach = DownloadReach(lambda: now[0])
    assert reach.failed("v3.fal.media", job_id="a").held_for == 0.0
    now[0] = 600.0
    assert reach.failed("v3.fal.media", job_id="a", stale_after=420.0).held_for == 300.0
    reach.forget("a")
    assert reach.failed("v3.fal.media", job_id="a").held_for == 0.0
    now[0] = 1021.0  # silent longer than WANBATCH_RETRY_MAX_DELAY + WANBATCH_LEASE_SECONDS: gone
    assert reach.failed("v3.fal.media", job_id="a").held_for == 0.0
