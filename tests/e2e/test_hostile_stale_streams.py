"""``wanbatch run`` against a fal whose status stream stays open but never says the request ended.

Found by a hostile-provider audit: a ``GET …/status/stream`` that sends one ``IN_QUEUE`` event
and then a ``: ping`` keep-alive every second, or an ``IN_PROGRESS`` event every millisecond, kept
its job ``queued`` for good (still there after 130 s, with not one status poll) while
``/status`` answered COMPLETED; fal's result expires an hour later (six minutes above 10 KB).
The poller skipped every job a stream followed, and a stream was handed back to polling only
when it broke. Now a stream vouches for its job only for ``WANBATCH_POLL_MAX_INTERVAL``: then the
job is polled too, found COMPLETED, and downloaded.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

import pytest

from jobs.settings import get_settings
from tests.e2e.e2e_helpers import FAL_KEY, FAST_ENV, MakeManifest, Wb, export_jsonl, wanbatch
from tests.hostile import Behaviour, HostileProvider, stale_stream
from tests.hostile_fal import FakeFal

ONE_JOB = """\
name: stale
endpoint: fal-ai/wan-22
items:
  - prompt: A lighthouse blinking through fog
    resolution: 480p
    seed: 1
"""
#: How long the run may take: the stream vouches for 0.2 s (FAST_ENV's poll max interval), the
#: rest is one poll, a download and the CLI's start; without the fix it never ends.
BOUND_SECONDS = 20.0
STREAM = r".*/requests/r1/status/stream"
STATUS = r".*/requests/r1/status"


def keepalive() -> Behaviour:
    """One IN_QUEUE event, then a keep-alive comment every 0.2 s, without end."""
    return stale_stream(b'data: {"status": "IN_QUEUE", "queue_position": 0}\n\n', b": ping\n\n", 0.2)


def flood() -> Behaviour:
    """An IN_PROGRESS event (for another request id, as the audit's) every millisecond, without end."""
    return stale_stream(b"", b'data: {"status": "IN_PROGRESS", "request_id": "zzz"}\n\n', 0.001)


@pytest.mark.parametrize("stream", [keepalive, flood], ids=["keepalive", "flood"])
def test_a_stream_that_never_completes_does_not_hold_its_job(
    stream: Callable[[], Behaviour],
    wb: Wb,
    manifest: MakeManifest,
    hostile: HostileProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", hostile.url)
    monkeypatch.setenv("WANBATCH_FAL_REST_URL", hostile.url)
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    fal = FakeFal(hostile)  # /status answers COMPLETED; the result and the video behave
    hostile.route("GET", STREAM, stream())
    started = time.monotonic()
    try:  # a child process: without the fix the run never ends, and the timeout kills it
        run = wanbatch("run", manifest("stale", ONE_JOB), "--json", "--no-progress", timeout=BOUND_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the job was still held by its status stream after {BOUND_SECONDS:g} s "
            f"({hostile.count('GET', STATUS)} status polls)"
        )
    took = time.monotonic() - started
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    assert run.returncode == 0, run.stderr
    (record,) = export_jsonl(wb, json.loads(run.stdout)["batch"])
    assert record["status"] == "succeeded", record
    assert hostile.count("GET", STREAM) >= 1  # it was followed over the stream first
    assert hostile.count("GET", STATUS) >= 1  # and polled once the stream had vouched long enough
    assert fal.posts() == 1
    assert took < BOUND_SECONDS
