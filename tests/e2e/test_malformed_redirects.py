"""A redirect whose ``Location`` is no usable URL: a provider error, never a crash or a leak.

httpx makes the next request of every 3xx that has a Location, even when it follows none. A
location without a host that is no path either (``data:text/plain,hi``, ``mailto:x``) made it
raise :class:`httpx.InvalidURL`, which no mapping caught: ``run`` ended "internal error … please
report it" (exit 70) on every run, a download crashed three times and paused the batch with
its paid videos stuck, and ``doctor``'s provider check "failed itself" (``cancel``'s exit 70:
``tests/unit/test_fal_client.py``). A
location httpx cannot parse (``http://x:<FAL_KEY>/``, the key as a port) raised an error quoting
it, and that text was stored as the job's error: the key in the database, ``run``'s summary and
``status --json``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.settings import get_settings
from tests.e2e.e2e_helpers import FAL_KEY, FAST_ENV, MakeManifest, Run, Wb, export_jsonl
from tests.hostile import HostileProvider, json_reply, redirect
from tests.hostile_fal import FakeFal

ONE_JOB = """\
name: hostile
endpoint: fal-ai/wan-22
items:
  - prompt: A paper boat drifting down a rainy street
    resolution: 480p
    seed: 1
"""
#: Locations without a host that are no path either: httpx's InvalidURL.
NO_HOST = ["data:text/plain,hi", "mailto:x"]


@pytest.fixture
def fal(hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFal]:
    """wanbatch pointed at the hostile provider playing fal."""
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", hostile.url)
    monkeypatch.setenv("WANBATCH_FAL_REST_URL", hostile.url)
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield FakeFal(hostile)
    get_settings.cache_clear()


def run_one(wb: Wb, manifest: MakeManifest) -> tuple[Run, dict[str, object]]:
    run = wb("run", manifest("hostile", ONE_JOB), "--json", "--no-progress")
    (record,) = export_jsonl(wb, run.json()["batch"])
    return run, record


def assert_no_crash(run: Run) -> None:
    assert "internal error" not in run.stdout + run.stderr, run.stderr
    assert "please report it" not in run.stdout + run.stderr, run.stderr
    assert "InvalidURL" not in run.stdout + run.stderr, run.stderr


@pytest.mark.parametrize("location", NO_HOST)
@pytest.mark.timeout(90)
def test_a_status_redirect_to_no_url_fails_the_job_not_the_run(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, hostile: HostileProvider, location: str
) -> None:
    fal.on_status("r1", redirect(location))
    hostile.route("PUT", r".*/requests/r1/cancel", json_reply({"status": "CANCELLATION_REQUESTED"}, 202))
    run, record = run_one(wb, manifest)
    assert_no_crash(run)
    assert run.code == 1, run.stderr
    assert record["status"] == "failed"
    assert record["error_type"] == "provider_protocol_error"
    assert "fal status: redirect to a malformed location, not followed" in str(record["error"])
    assert location not in str(record["error"])
    assert hostile.count("GET", r".*/requests/r1/status") == 5  # PROTOCOL_ERROR_LIMIT, as any redirect
    assert fal.posts() == 1


@pytest.mark.parametrize("location", NO_HOST)
def test_a_result_redirect_to_no_url_fails_the_job_with_its_cost(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, location: str
) -> None:
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ATTEMPTS", "3")
    fal.on_result("r1", redirect(location))
    run, record = run_one(wb, manifest)
    assert_no_crash(run)
    assert run.code == 1, run.stderr
    assert record["status"] == "failed"
    assert record["error_type"] == "provider_protocol_error"
    assert "fal result: redirect to a malformed location, not followed" in str(record["error"])
    assert record["cost_usd"] == pytest.approx(record["est_usd"])  # the video was made: billed
    assert fal.result_calls("r1") == 3  # WANBATCH_DOWNLOAD_ATTEMPTS, as any redirect of the result
    assert fal.posts() == 1


@pytest.mark.parametrize("location", NO_HOST)
def test_a_download_redirect_to_no_url_is_refused_at_once_and_the_batch_goes_on(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, location: str
) -> None:
    """Before, the download step crashed three times and paused the batch, its paid video stuck."""
    fal.on_file("r1.mp4", redirect(location))
    run, record = run_one(wb, manifest)
    assert_no_crash(run)
    assert run.code == 1, run.stderr
    assert run.json()["phase"] != "paused"
    assert record["status"] == "failed"
    assert record["error_type"] == "download_failed"
    for words in ("fal download: refusing a malformed redirect", "1 time(s)"):  # final: not fetched again
        assert words in str(record["error"]), record["error"]
    assert record["cost_usd"] == pytest.approx(record["est_usd"])
    assert fal.file_gets("r1.mp4") == 1
    assert fal.posts() == 1


def test_doctor_says_what_a_redirect_to_no_url_is(
    wb: Wb, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: "the check itself failed: InvalidURL: … please report it"."""
    hostile.route("GET", r"/.*", redirect("data:text/plain,hi"))
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", hostile.url)
    run = wb("doctor", "--json")
    provider = next(c for c in run.json()["checks"] if c["name"] == "provider")
    assert provider["status"] == "fail"
    assert provider["detail"] == f"{hostile.url}: answered a redirect to a malformed location (not followed)"
    assert "WANBATCH_FAL_QUEUE_URL" in provider["fix"]
    assert_no_crash(run)


@pytest.mark.parametrize("where", ["file", "result", "status"])
def test_a_redirect_naming_the_key_leaves_it_nowhere(
    wb: Wb, fal: FakeFal, manifest: MakeManifest, hostile: HostileProvider, tmp_path: Path, where: str
) -> None:
    """``http://x:<FAL_KEY>/``: httpx refuses the port, quoting it. Before, a download stored
    that text as the job's error: the key in the database, ``run``'s summary, ``status --json``."""
    bad = redirect(f"http://x:{FAL_KEY}/")
    if where == "file":
        fal.on_file("r1.mp4", bad)
    elif where == "result":
        fal.on_result("r1", bad)
    else:
        fal.on_status("r1", bad)
        hostile.route("PUT", r".*/requests/r1/cancel", json_reply({"status": "CANCELLATION_REQUESTED"}, 202))
    run, record = run_one(wb, manifest)
    assert run.code == 1, run.stderr
    assert record["status"] == "failed"
    assert "malformed" in str(record["error"]), record["error"]
    status = wb("status", "hostile", "--json")
    human = wb("status", "hostile")
    shown = run.stdout + run.stderr + status.stdout + status.stderr + human.stdout + human.stderr
    assert FAL_KEY not in shown
    assert FAL_KEY not in str(record)
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("wanbatch.db*"))
    assert stored, "the database file was not found"
    assert FAL_KEY.encode() not in stored
