"""``wanbatch run`` and ``doctor`` against a fal whose answers would fill the memory: a body of
a few hundred bytes sent ``Content-Encoding: gzip, gzip`` that inflates to 200 MiB, a status
stream whose one event never ends. Each is read to its cap and no further (Python's peak memory
measured with tracemalloc stays far below what the answer would take), and the job still ends:
with the reason, or by polling.

Found by an audit playing fal on loopback: 1.8 KB of result took ``wanbatch run`` to 2.2 GB,
the doctor's key check and the JWKS fetch likewise; 1.5 GB of one stream event took 1.6 GB.
"""

from __future__ import annotations

import pytest

from jobs.settings import get_settings
from tests.e2e.e2e_helpers import FAL_KEY, FAST_ENV, MakeManifest, Wb, export_jsonl
from tests.hostile import HostileProvider, compression_bomb, event_flood, json_reply, traced_peak
from tests.hostile_fal import FakeFal

ONE_JOB = """\
name: bombs
endpoint: fal-ai/wan-22
items:
  - prompt: A paper boat drifting down a rainy street
    resolution: 480p
    seed: 1
"""
#: What each hostile answer here would take in memory if read whole.
INFLATED = 200 << 20
#: The most Python may hold at once while one is read: far below it, well above a run's own.
BOUND = 64 << 20


@pytest.fixture
def fal(hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch) -> FakeFal:
    """wanbatch pointed at the hostile provider playing fal (which completes every request at once)."""
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", hostile.url)
    monkeypatch.setenv("WANBATCH_FAL_REST_URL", hostile.url)
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ATTEMPTS", "2")
    get_settings.cache_clear()
    return FakeFal(hostile)


def _run(wb: Wb, manifest: MakeManifest) -> tuple[int, dict[str, object], int]:
    """Run the one-job batch: its exit code, its export record and Python's peak memory meanwhile."""
    with traced_peak() as peak:
        run = wb("run", manifest("bombs", ONE_JOB), "--json", "--no-progress")
    (record,) = export_jsonl(wb, run.json()["batch"])
    return run.code, record, peak()


def test_a_result_that_inflates_to_hundreds_of_mb_fails_the_job_at_the_cap(
    wb: Wb, fal: FakeFal, manifest: MakeManifest
) -> None:
    fal.on_result("r1", compression_bomb(INFLATED))
    code, record, peak = _run(wb, manifest)
    assert peak < BOUND, f"{peak >> 20} MiB held at once"
    assert code == 1
    assert record["status"] == "failed"
    assert record["error_type"] == "provider_protocol_error"
    assert "answer over 1048576 bytes" in str(record["error"]), record["error"]
    assert fal.result_calls("r1") == 2  # WANBATCH_DOWNLOAD_ATTEMPTS, then no more
    assert fal.posts() == 1


def test_a_status_answer_that_inflates_to_hundreds_of_mb_fails_the_job_at_the_cap(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, hostile: HostileProvider
) -> None:
    fal.on_status("r1", compression_bomb(INFLATED))
    hostile.route("PUT", r".*/requests/r1/cancel", json_reply({"status": "CANCELLATION_REQUESTED"}, 202))
    code, record, peak = _run(wb, manifest)
    assert peak < BOUND, f"{peak >> 20} MiB held at once"
    assert code == 1
    assert record["status"] == "failed"
    assert record["error_type"] == "provider_protocol_error"
    assert "answer over 1048576 bytes" in str(record["error"]), record["error"]


def test_a_status_stream_event_without_end_is_dropped_and_the_job_polled_to_success(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, hostile: HostileProvider
) -> None:
    """Before, the event was buffered whole, however long, while the job sat ``queued``."""
    hostile.route("GET", r".*/requests/r1/status/stream", event_flood(INFLATED))
    code, record, peak = _run(wb, manifest)
    assert peak < BOUND, f"{peak >> 20} MiB held at once"
    assert code == 0
    assert record["status"] == "succeeded"
    assert hostile.count("GET", r".*/requests/r1/status/stream") >= 1
    assert fal.posts() == 1


def test_the_doctor_s_key_check_reads_an_inflating_answer_to_the_cap(
    wb: Wb, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    hostile.route("GET", r"/.*", compression_bomb(INFLATED))
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", hostile.url)
    get_settings.cache_clear()
    with traced_peak() as peak:
        run = wb("doctor", "--json")
    assert peak() < BOUND, f"{peak() >> 20} MiB held at once"
    provider = next(c for c in run.json()["checks"] if c["name"] == "provider")
    assert provider["status"] == "fail"
    assert provider["detail"] == f"{hostile.url}: HTTP 200 with an answer over 1048576 bytes; not read"
    assert "status.fal.ai" in provider["fix"]
