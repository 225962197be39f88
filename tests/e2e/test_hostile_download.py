"""``wanbatch run`` against a hostile fal: a paid video is fetched, never generated twice.

fal (the hostile provider, :mod:`hostile_fal`) completes every request at once; each test makes
one part of fetching the output misbehave — the result call, the status answers, the video
host, the disk — and checks how many generations fal was asked for (POSTs), what the job says,
and what it cost.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from jobs.printable import size_text
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import FAL_KEY, FAST_ENV, MakeManifest, Run, Wb, export_jsonl
from tests.hostile import HostileProvider, drip, json_reply, nested_json, raw_reply, redirect, reset, sequence
from tests.hostile_fal import COMPLETED, FakeFal, sample_video

TWO_JOBS = """\
name: hostile
endpoint: fal-ai/wan-22
items:
  - prompt: A paper boat drifting down a rainy street
    resolution: 480p
    seed: 1
  - prompt: A lighthouse at dusk
    resolution: 480p
    seed: 2
"""
ONE_JOB = TWO_JOBS.split("  - prompt: A lighthouse")[0]
NGINX_502 = raw_reply(b"<html><center>nginx</center></html>", 502, {"Content-Type": "text/html"})
HTML_200 = raw_reply(b"<html>down for maintenance</html>", 200, {"Content-Type": "text/html"})


@pytest.fixture
def fal(hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch) -> FakeFal:
    """wanbatch pointed at the hostile provider playing fal."""
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", hostile.url)
    monkeypatch.setenv("WANBATCH_FAL_REST_URL", hostile.url)
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    return FakeFal(hostile)


@pytest.fixture
def metadata() -> Iterator[HostileProvider]:
    """An internal service on another loopback address (a cloud metadata endpoint's stand-in)."""
    with HostileProvider(host="127.0.0.3") as server:
        server.route("GET", r"/latest/meta-data/creds", json_reply({"SecretAccessKey": "do-not-leak"}))
        yield server


@pytest.fixture
def same_host() -> Iterator[HostileProvider]:
    """Another service on fal's own loopback address, on a port of its own (a Redis's stand-in)."""
    with HostileProvider() as server:
        server.route(
            "GET", r"/(secret|video\.mp4)", raw_reply(sample_video(), headers={"Content-Type": "video/mp4"})
        )
        yield server


def run_batch(wb: Wb, manifest: MakeManifest, body: str = TWO_JOBS) -> tuple[Run, list[dict[str, object]]]:
    """Run the manifest; its export records in fal's order (the job sent first is ``r1``)."""
    run = wb("run", manifest("hostile", body), "--json", "--no-progress")
    report = run.json()
    return run, sorted(export_jsonl(wb, report["batch"]), key=lambda r: str(r["request_id"]))


def assert_billed_failure(record: dict[str, object], *words: str) -> None:
    """Failed, with the reason, and with fal's cost (the video was made) recorded."""
    assert record["status"] == "failed"
    for word in words:
        assert word in str(record["error"]), record["error"]
    assert record["cost_usd"] == pytest.approx(record["est_usd"])
    assert record["video_path"] is None


def assert_held_refusal(run: Run, record: dict[str, object], *words: str) -> None:
    """Refused by the download policy: not failed but held (the job waits in ``downloading``),
    its batch paused (``run`` exits 2) with the reason and the setting that would allow the
    host — never fetched from meanwhile."""
    assert run.code == 2, run.stdout + run.stderr
    assert record["status"] == "downloading", record
    assert record["error"] is None
    assert record["video_path"] is None
    reason = str(run.json()["pause_reason"])
    for word in (*words, "WANBATCH_DOWNLOAD_ALLOWED_HOSTS="):
        assert word in reason, reason


# ------------------------------------------------------------------------ item 1: the result call


def test_result_call_hiccups_never_resubmit_and_the_cost_is_recorded(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, tmp_path: Path
) -> None:
    # More failures than the client's own three tries, so the download step sees them too.
    fal.on_result(
        "r1",
        sequence(NGINX_502, raw_reply(b"busy", 503), json_reply({"detail": "slow down"}, 429), reset(),
                 HTML_200, NGINX_502, reset(), json_reply(fal.result_for("r1"))),
    )  # fmt: skip
    fal.on_result("r2", sequence(reset(), HTML_200, reset(), reset(), json_reply(fal.result_for("r2"))))
    run, records = run_batch(wb, manifest)
    assert run.code == 0, run.stderr
    assert fal.posts() == 2  # exactly one generation per job
    assert fal.result_calls("r1") == 8
    for record in records:
        assert record["status"] == "succeeded"
        assert record["attempts"] == 1
        assert record["cost_usd"] == pytest.approx(record["est_usd"])
        video = tmp_path / "outputs" / str(record["video_path"])
        assert hashlib.sha256(video.read_bytes()).hexdigest() == hashlib.sha256(fal.video).hexdigest()


def test_an_error_fal_reports_for_the_request_still_starts_a_new_attempt(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, hostile: HostileProvider
) -> None:
    failed = {"detail": "Runner disconnected", "error_type": "runner_disconnected"}
    fal.on_result("r1", json_reply(failed, 503, {"X-Fal-Error-Type": "runner_disconnected"}))
    # r2: the status says it failed, and its result call only resets: the status verdict decides
    timed_out = {**COMPLETED, "error": "Request timed out", "error_type": "request_timeout"}
    fal.on_status("r2", json_reply(timed_out))
    fal.on_result("r2", reset())
    run, records = run_batch(wb, manifest)
    assert run.code == 0, run.stderr
    assert fal.posts() == 4  # each job: the failed attempt, then one new one
    assert [r["attempts"] for r in records] == [2, 2]
    assert all(r["status"] == "succeeded" for r in records)


# ----------------------------------------------------------------- item 9: malformed provider answers


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (nested_json(100_000), ["nested more than"]),
        (json_reply({"status": "FAILED", "logs": None}), ["unknown status 'FAILED'"]),
        (json_reply(["COMPLETED"]), ["not a JSON object"]),
    ],
    ids=["nested", "unknown-status", "not-an-object"],
)
@pytest.mark.timeout(90)  # before the fix this never ended
def test_malformed_status_answers_fail_the_job_after_bounded_tries(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, hostile: HostileProvider, status: object, words: list[str]
) -> None:
    fal.on_status("r1", status)  # type: ignore[arg-type]
    hostile.route("PUT", r".*/requests/r1/cancel", json_reply({"status": "CANCELLATION_REQUESTED"}, 202))
    started = time.monotonic()
    run, records = run_batch(wb, manifest)
    assert run.code == 1, run.stderr
    assert time.monotonic() - started < 60  # it ends: no job polled forever
    bad, good = records
    assert bad["status"] == "failed"
    assert bad["error_type"] == "provider_protocol_error"
    for word in words:
        assert word in str(bad["error"])
    assert hostile.count("GET", r".*/requests/r1/status") == 5  # PROTOCOL_ERROR_LIMIT
    assert hostile.count("PUT", r".*/requests/r1/cancel") == 1  # and fal is told to stop it
    assert good["status"] == "succeeded"
    assert fal.posts() == 2


@pytest.mark.parametrize(
    ("result", "words"),
    [
        ("nested", ["nested more than"]),
        ({"actual_prompt": {"text": "x"}}, ["'actual_prompt' is a dict"]),
        ({"video": [{"url": "x"}]}, ["'video' is a list"]),
    ],
    ids=["nested", "prompt-object", "video-list"],
)
def test_malformed_results_fail_the_job_with_the_billed_cost(
    wb: Wb,
    fal: FakeFal,
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
    result: object,
    words: list[str],
) -> None:
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ATTEMPTS", "3")
    if result == "nested":
        fal.on_result("r1", nested_json(100_000))
    else:
        fal.on_result("r1", json_reply(fal.result_for("r1", **result)))  # type: ignore[arg-type]
    run, (bad, good) = run_batch(wb, manifest)
    assert run.code == 1, run.stderr
    assert_billed_failure(bad, "3 tries", *words)
    assert bad["error_type"] == "provider_protocol_error"
    assert fal.result_calls("r1") == 3  # WANBATCH_DOWNLOAD_ATTEMPTS, then no more
    assert good["status"] == "succeeded"
    assert fal.posts() == 2  # never generated again


# ------------------------------------------------------------- items 7 and 8: slow and endless hosts


@pytest.mark.timeout(90)  # before the fix this never ended
def test_a_download_longer_than_the_lease_completes_once(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WANBATCH_LEASE_SECONDS", "2")
    chunk = len(fal.video) // 8 + 1
    fal.on_file("r1.mp4", drip(fal.video, chunk=chunk, every=0.5))  # about 4.5 s, twice the lease
    run, (record,) = run_batch(wb, manifest, ONE_JOB)
    assert run.code == 0, run.stderr
    assert record["status"] == "succeeded"
    assert fal.file_gets("r1.mp4") == 1  # no second task took it over mid-stream
    video = tmp_path / "outputs" / str(record["video_path"])
    assert video.read_bytes() == fal.video
    assert [p.name for p in video.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.timeout(90)  # before the fix this never ended
def test_a_host_that_drip_feeds_bytes_cannot_hold_a_worker_forever(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_DOWNLOAD_TIMEOUT", "1")
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ATTEMPTS", "2")
    fal.on_file("r1.mp4", drip(fal.video, chunk=16, every=0.2))  # 20 s at this pace; reads never time out
    started = time.monotonic()
    run, (record,) = run_batch(wb, manifest, ONE_JOB)
    assert run.code == 1, run.stderr
    assert time.monotonic() - started < 15
    assert_billed_failure(record, "longer than 1 s", "WANBATCH_DOWNLOAD_TIMEOUT", "2 time(s)")
    assert fal.file_gets("r1.mp4") == 2
    assert fal.posts() == 1


# --------------------------------------------------------------------- item 13: where outputs come from


def test_a_result_url_on_an_internal_address_is_refused(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, metadata: HostileProvider
) -> None:
    creds = f"{metadata.url}/latest/meta-data/creds"
    fal.on_result("r1", json_reply(fal.result_for("r1", url=creds)))
    run, (record,) = run_batch(wb, manifest, ONE_JOB)
    # held, not failed: a setting decides it (the user may list the host); never connected
    assert_held_refusal(run, record, "127.0.0.3", "loopback address", f"127.0.0.3:{metadata.port}")
    assert metadata.requests == []  # never even connected
    assert fal.posts() == 1


def test_a_host_name_is_judged_by_the_addresses_it_resolves_to(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, hostile: HostileProvider
) -> None:
    # "localhost" is not the configured fal host (127.0.0.1), and it resolves to loopback
    local = f"http://localhost:{hostile.port}/files/r1.mp4"
    fal.on_result("r1", json_reply(fal.result_for("r1", url=local)))
    run, (record,) = run_batch(wb, manifest, ONE_JOB)
    assert_held_refusal(run, record, "localhost (127.0.0.1)", "loopback address")
    assert fal.file_gets("r1.mp4") == 0


def test_a_redirect_to_an_internal_address_is_refused(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, metadata: HostileProvider
) -> None:
    fal.on_file("r1.mp4", redirect(f"{metadata.url}/latest/meta-data/creds"))
    run, (record,) = run_batch(wb, manifest, ONE_JOB)
    assert_held_refusal(run, record, "127.0.0.3", "loopback address")
    assert fal.file_gets("r1.mp4") == 1
    assert metadata.requests == []


@pytest.mark.parametrize("how", ["result-url", "redirect"])
def test_another_port_of_fals_host_is_not_trusted(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, same_host: HostileProvider, how: str
) -> None:
    """Before, fal's *host* was trusted: any port of 127.0.0.1 was reachable from a result URL
    or a redirect, and the job downloaded whatever the service there answered."""
    target = f"{same_host.url}/secret"
    if how == "redirect":
        fal.on_file("r1.mp4", redirect(target))
    else:
        fal.on_result("r1", json_reply(fal.result_for("r1", url=target)))
    run, (record,) = run_batch(wb, manifest, ONE_JOB)
    assert_held_refusal(run, record, "127.0.0.1: a loopback address")
    assert same_host.requests == []  # never even connected
    assert fal.posts() == 1


# ------------------------------------------------- fal's queue API answers directly: no redirects


def test_a_redirected_result_call_is_not_followed_and_fails_the_job_with_the_reason(
    wb: Wb,
    fal: FakeFal,
    manifest: MakeManifest,
    same_host: HostileProvider,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Before, the result GET followed a 302 to another port of fal's host, and the job
    succeeded with that service's JSON stored as fal's output (database and sidecar)."""
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ATTEMPTS", "3")
    foreign = fal.result_for("r1", planted="by-another-service")
    same_host.route("GET", r"/internal/result", json_reply(foreign))
    fal.on_result("r1", redirect(f"{same_host.url}/internal/result?token=do-not-show"))
    run, (record,) = run_batch(wb, manifest, ONE_JOB)
    assert run.code == 1, run.stderr
    assert same_host.requests == []  # never even connected
    assert_billed_failure(record, "3 tries", "HTTP 302", f"{same_host.url}/internal/result", "not followed")
    assert "do-not-show" not in str(record["error"])  # the location is shown masked
    assert record["error_type"] == "provider_protocol_error"
    assert fal.result_calls("r1") == 3  # WANBATCH_DOWNLOAD_ATTEMPTS, then no more
    assert fal.posts() == 1
    assert "by-another-service" not in json.dumps(record)
    assert [p for p in (tmp_path / "outputs").rglob("*.json") if "by-another-service" in p.read_text()] == []


def test_a_redirected_status_call_is_not_followed_and_fails_the_job_with_the_reason(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, hostile: HostileProvider, metadata: HostileProvider
) -> None:
    """Before, every status poll followed the 302 to the internal service and asked it."""
    fal.on_status("r1", redirect(f"{metadata.url}/latest/meta-data/creds"))
    hostile.route("PUT", r".*/requests/r1/cancel", json_reply({"status": "CANCELLATION_REQUESTED"}, 202))
    run, (record,) = run_batch(wb, manifest, ONE_JOB)
    assert run.code == 1, run.stderr
    assert metadata.requests == []  # never even connected
    assert record["status"] == "failed"
    assert record["error_type"] == "provider_protocol_error"
    for word in ("HTTP 302", f"{metadata.url}/latest/meta-data/creds", "not followed"):
        assert word in str(record["error"]), record["error"]
    assert hostile.count("GET", r".*/requests/r1/status") == 5  # PROTOCOL_ERROR_LIMIT
    assert hostile.count("PUT", r".*/requests/r1/cancel") == 1  # and fal is told to stop it
    assert fal.posts() == 1


@pytest.mark.timeout(90)
def test_a_status_call_redirected_to_itself_fails_the_job_not_the_run(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, hostile: HostileProvider
) -> None:
    """Before, httpx's TooManyRedirects escaped every mapping: ``internal error``, exit 70, on
    every run, and the job never moved."""
    fal.on_status("r1", redirect(f"{hostile.url}/fal-ai/wan-22/requests/r1/status", 307))
    run, (record,) = run_batch(wb, manifest, ONE_JOB)
    assert run.code == 1, run.stderr
    assert "internal error" not in run.stderr
    assert record["status"] == "failed"
    assert record["error_type"] == "provider_protocol_error"
    for word in ("HTTP 307 redirect to", "not followed"):
        assert word in str(record["error"]), record["error"]
    assert hostile.count("GET", r".*/requests/r1/status") == 5  # each poll asked once, no loop
    assert fal.posts() == 1


def test_a_host_and_port_on_the_allow_list_is_fetched_from(
    wb: Wb,
    fal: FakeFal,
    manifest: MakeManifest,
    same_host: HostileProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ALLOWED_HOSTS", f"127.0.0.1:{same_host.port}")
    fal.on_file("r1.mp4", redirect(f"{same_host.url}/video.mp4"))  # fal's origin, then the listed one
    run, (record,) = run_batch(wb, manifest, ONE_JOB)
    assert run.code == 0, run.stderr
    assert record["status"] == "succeeded"
    assert [r.path for r in same_host.requests] == ["/video.mp4"]


def test_an_internal_host_is_fetched_from_when_it_is_listed(
    wb: Wb,
    fal: FakeFal,
    manifest: MakeManifest,
    metadata: HostileProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ALLOWED_HOSTS", "127.0.0.3")
    metadata.route("GET", r"/video\.mp4", raw_reply(fal.video, headers={"Content-Type": "video/mp4"}))
    fal.on_file("r1.mp4", redirect(f"{metadata.url}/video.mp4"))
    run, (record,) = run_batch(wb, manifest, ONE_JOB)
    assert run.code == 0, run.stderr
    assert record["status"] == "succeeded"
    (get,) = metadata.requests
    assert get.headers["accept-encoding"] == "identity"  # sizes and caps apply to the bytes as sent


def test_a_body_that_is_not_a_video_is_refused(wb: Wb, fal: FakeFal, manifest: MakeManifest) -> None:
    page = b"<!DOCTYPE html><html><body>Access denied</body></html>"
    fal.on_file("r1.mp4", raw_reply(page, headers={"Content-Type": "video/mp4"}))
    run, (record,) = run_batch(wb, manifest, ONE_JOB)
    assert run.code == 1, run.stderr
    assert_billed_failure(record, "not a video", "<!DOCTYPE")
    assert fal.file_gets("r1.mp4") == 1  # final: not fetched again
    assert fal.posts() == 1


def test_a_compressed_body_is_refused_at_once_not_inflated_to_disk(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, tmp_path: Path
) -> None:
    """Before, the gzip body was decoded though ``identity`` was asked for and the video was
    saved inflated (here a few KB on the wire, 5 MB on disk)."""
    bomb = gzip.compress(fal.video + b"\0" * (5 << 20))
    fal.on_file("r1.mp4", raw_reply(bomb, headers={"Content-Type": "video/mp4", "Content-Encoding": "gzip"}))
    run, (record,) = run_batch(wb, manifest, ONE_JOB)
    assert run.code == 1, run.stderr
    assert_billed_failure(record, "'gzip'-encoded body", "1 time(s)")
    assert fal.file_gets("r1.mp4") == 1  # final: not fetched again
    assert fal.posts() == 1
    assert list((tmp_path / "outputs").rglob("*.mp4")) == []


# ------------------------------------------------------------------------------ item 10: the disk


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``WANBATCH_OUTPUT_DIR`` on a 64 KiB tmpfs (root only: the test fails, never skips, without it)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.fail(f"this test mounts a small tmpfs (needs root): {mounted.stderr.strip()}", pytrace=False)
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(folder))
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize(
    ("padding", "words"),
    [(200_000, ["No space left on device", ".part"]), (62_000, ["No space left on device", ".json"])],
    ids=["video-does-not-fit", "sidecar-does-not-fit"],
)
def test_a_full_disk_pauses_the_batch_and_the_paid_video_is_downloaded_once_there_is_room(
    wb: Wb,
    hostile: HostileProvider,
    monkeypatch: pytest.MonkeyPatch,
    manifest: MakeManifest,
    small_disk: Path,
    tmp_path: Path,
    padding: int,
    words: list[str],
) -> None:
    """Before, the job failed ("output not saved") and the run went on sending: on a full disk
    every later job was paid for and thrown away the same way. Now nothing more is sent, the
    video waits at fal, and running the batch again with room downloads it (never a new submit)."""
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", hostile.url)
    monkeypatch.setenv("WANBATCH_FAL_REST_URL", hostile.url)
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANBATCH_MAX_OUTSTANDING", "1")  # the second job is sent after the first ends
    fal = FakeFal(hostile, video=sample_video() + b"\0" * padding)
    started = time.monotonic()
    run = wb("run", manifest("hostile", TWO_JOBS), "--json", "--no-progress")
    # Exit 2, as for any pause (no job failed or was cancelled: exit 1 would say so), with the
    # contract's `ok: false` and the line that says what to fix.
    assert run.code == 2, run.stderr
    assert time.monotonic() - started < 30
    report = run.json()
    assert report["phase"] == "paused"
    assert report["ok"] is False
    assert report["error"].startswith("batch hostile is paused: outputs cannot be written here")
    assert report["error"].endswith("fix it, then run this command again to go on")
    for word in ("outputs cannot be written here", *words, "free space or fix WANBATCH_OUTPUT_DIR"):
        assert word in str(report["pause_reason"]), report["pause_reason"]
    assert "batch paused: outputs cannot be written here" in " ".join(run.stderr.split())
    assert report["counts"].get("failed", 0) == 0
    assert fal.posts() == 1  # the second job was never sent into the full disk
    assert fal.file_gets("r1.mp4") == 1
    leftovers = [p.name for p in small_disk.rglob("*") if p.is_file()]
    assert leftovers == []  # no partial video, no video without its sidecar

    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "room"))  # space is freed
    again = wb("run", "hostile", "--json", "--no-progress")
    assert again.code == 0, again.stderr
    assert again.json()["counts"]["succeeded"] == 2
    first = next(r for r in export_jsonl(wb, "hostile") if r["request_id"] == "r1")
    assert first["status"] == "succeeded"
    assert fal.file_gets("r1.mp4") == 2  # downloaded again, never made again
    assert fal.posts() == 2


def test_run_warns_when_the_disk_looks_too_small_for_the_batch(
    wb: Wb,
    sim: SimulatorHandle,
    monkeypatch: pytest.MonkeyPatch,
    manifest: MakeManifest,
    small_disk: Path,
    tmp_path: Path,
) -> None:
    """Before sending anything, from the size of the videos stored so far: a night that would stop
    at 3 AM on a full disk is told at the start. It only warns; the full disk then pauses."""
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "big"))
    first = wb("run", manifest("first", ONE_JOB.replace("name: hostile", "name: first")), "--no-progress")
    assert first.code == 0, first.stderr
    (video,) = (tmp_path / "big").rglob("*.mp4")
    size = video.stat().st_size

    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(small_disk))
    three = "name: three\nendpoint: fal-ai/wan-22\nitems:\n" + "".join(
        f"  - prompt: A paper boat, take {take}\n    resolution: 480p\n    seed: {take}\n"
        for take in (1, 2, 3)
    )
    run = wb("run", manifest("three", three), "--no-progress", "--json")
    said = " ".join(run.stderr.split())
    assert f"warning: {small_disk} has " in said
    assert "free; the 3 videos this batch still has to store need about" in said
    assert f"({size_text(size)} each, the average so far)" in said
    assert "If the disk fills, the batch pauses (nothing more is sent) until there is room" in said
    assert run.code == 2, run.stderr  # and so it did: paused, not failed
    assert (run.json()["phase"], run.json()["ok"]) == ("paused", False)

    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "big"))
    enough = wb("run", manifest("four", ONE_JOB.replace("name: hostile", "name: four")), "--no-progress")
    assert enough.code == 0, enough.stderr
    assert "warning" not in enough.stderr  # room enough: nothing said
