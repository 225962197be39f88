"""A network where only a proxy reaches the internet (corporate): the simulator's media URLs are
on ``cdn.corp.example``, a name only the stand-in proxy (:mod:`tests.loopback_proxy`) resolves.

Downloads go directly unless ``WANBATCH_DOWNLOAD_PROXY`` says otherwise. One that cannot even
connect is held (never a try counted, never a paid job failed), and the batch pauses with the
host and the fix; through the download proxy the same videos download, never made again."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import FAL_KEY, FAST_ENV, MakeManifest, Wb, export_jsonl
from tests.loopback_proxy import AUTH_REQUIRED, LoopbackProxy, loopback_proxy
from tests.ports import unused_port
from worker.steps import download_reach

ONE_JOB = """\
name: corporate
endpoint: fal-ai/wan-22
items:
  - prompt: A paper boat in the rain
    resolution: 480p
    seed: 5
"""

ONE_IMAGE_JOB = """\
name: corporate-upload
endpoint: fal-ai/wan-i2v
items:
  - prompt: A red car drives through a tunnel
    image_url: images/square.png
    resolution: 480p
    seed: 7
"""


@pytest.fixture
def corporate_sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatorHandle]:
    """A simulator whose media URLs name ``cdn.corp.example`` (its port), wanbatch pointed at
    it on 127.0.0.1 (fal's API is reached directly: only media go the corporate way)."""
    port = unused_port()
    options = SimulatorOptions(
        latency_seconds=0.05,
        latency_jitter=0.0,
        concurrency_limit=40,
        rng_seed=99,
        public_url=f"http://cdn.corp.example:{port}",
    )
    with running_simulator(options, port) as sim:
        served = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", served)
        monkeypatch.setenv("WANBATCH_FAL_REST_URL", served)
        monkeypatch.setenv("FAL_KEY", FAL_KEY)
        for name, value in FAST_ENV.items():
            monkeypatch.setenv(name, value)
        # the hold's pauses and its bound, short for a test
        monkeypatch.setattr(download_reach, "FIRST_PAUSE_SECONDS", 0.05)
        monkeypatch.setattr(download_reach, "LONGEST_PAUSE_SECONDS", 0.2)
        monkeypatch.setattr(download_reach, "PAUSE_AFTER_SECONDS", 1.0)
        get_settings.cache_clear()
        yield sim


@pytest.fixture
def proxy() -> Iterator[LoopbackProxy]:
    with loopback_proxy() as running:
        yield running


def _accepted(sim: SimulatorHandle) -> int:
    import httpx

    served = sim.url.replace("cdn.corp.example", "127.0.0.1")
    return int(httpx.get(f"{served}/_sim/ledger").json()["accepted"])


def test_a_download_that_cannot_connect_is_held_then_the_proxy_fetches_the_paid_video(
    wb: Wb,
    corporate_sim: SimulatorHandle,
    proxy: LoopbackProxy,
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the environment names the corporate proxy (as HTTPS_PROXY would), but downloads go direct
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    run = wb("run", manifest("corporate", ONE_JOB), "--json", "--no-progress")
    # not failed: held, then the batch paused with the host and the fix
    assert run.code == 2, run.stdout + run.stderr
    said = run.stdout + run.stderr
    assert "cdn.corp.example" in said
    assert "WANBATCH_DOWNLOAD_PROXY=env" in said
    batch = run.json()["batch"]
    (record,) = export_jsonl(wb, batch)
    assert record["status"] == "downloading", record
    assert record["error"] is None
    assert _accepted(corporate_sim) == 1

    # downloads through the environment's proxy: the paid video comes, nothing is made again
    monkeypatch.setenv("WANBATCH_DOWNLOAD_PROXY", "env")
    again = wb("run", manifest("corporate", ONE_JOB), "--json", "--no-progress")
    assert again.code == 0, again.stdout + again.stderr
    assert again.json()["counts"]["succeeded"] == 1
    assert again.json()["wasted_usd"] == 0
    assert _accepted(corporate_sim) == 1
    (record,) = export_jsonl(wb, batch)
    assert record["status"] == "succeeded"
    assert record["video_path"]
    fetched = [line for line in proxy.request_lines() if "cdn.corp.example" in line and "/files/" in line]
    assert fetched, proxy.request_lines()
    # the key never went to the media host, nor to the proxy
    assert FAL_KEY not in proxy.text()
    assert "Authorization: Key" not in proxy.text()


def test_a_proxy_url_with_credentials_downloads_and_uploads_never_showing_the_password(
    wb: Wb,
    corporate_sim: SimulatorHandle,
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = "pr0xy-s3cret-pass"
    wanted = "Basic " + base64.b64encode(f"alice:{password}".encode()).decode()
    monkeypatch.setenv("WANBATCH_INLINE_MAX_BYTES", "1")  # the image is uploaded: its PUT too
    with loopback_proxy(auth=wanted) as proxy:
        monkeypatch.setenv(
            "WANBATCH_DOWNLOAD_PROXY", proxy.url.replace("http://", f"http://alice:{password}@")
        )
        run = wb("run", manifest("corporate-upload", ONE_IMAGE_JOB), "--json", "--no-progress")
        assert run.code == 0, run.stdout + run.stderr
        assert run.json()["counts"]["succeeded"] == 1
        lines = proxy.request_lines()
        assert any(line.startswith("PUT http://cdn.corp.example") for line in lines), lines
        assert any(line.startswith("GET http://cdn.corp.example") for line in lines), lines
        assert FAL_KEY not in proxy.text()

        # the proxy now refuses those credentials: held and paused, the password never said
        proxy.auth = "Basic bm9ib2R5Om5vdGhpbmc="
        second = ONE_JOB.replace("corporate", "corporate-refused")
        refused = wb("run", manifest("corporate-refused", second), "--json", "--no-progress")
    assert refused.code == 2, refused.stdout + refused.stderr
    said = refused.stdout + refused.stderr
    assert "407" in said
    assert "http://alice:**@127.0.0.1" in said
    assert password not in said
    (record,) = export_jsonl(wb, refused.json()["batch"])
    assert record["status"] == "downloading"
    status = wb("status", refused.json()["batch"])
    assert password not in status.stdout + status.stderr


def _downloads_check(wb: Wb) -> tuple[int, dict[str, str | None]]:
    run = wb("doctor", "--json")
    (check,) = [c for c in run.json()["checks"] if c["name"] == "downloads"]
    assert FAL_KEY not in run.stdout + run.stderr
    return run.code, check


def test_doctor_checks_downloads_reach_the_media_the_way_they_will_go(
    wb: Wb,
    corporate_sim: SimulatorHandle,
    proxy: LoopbackProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # directly: the simulator's media URL (cdn.corp.example) does not resolve here
    monkeypatch.setenv("HTTP_PROXY", proxy.url)  # its media URL is http://
    code, check = _downloads_check(wb)
    assert code == 1
    assert check["status"] == "fail", check
    assert "cdn.corp.example" in str(check["detail"])
    assert "HTTP_PROXY is set, but downloads do not use it" in str(check["detail"])
    assert "WANBATCH_DOWNLOAD_PROXY=env" in str(check["fix"])
    # through the environment's proxy, as downloads will then go
    monkeypatch.setenv("WANBATCH_DOWNLOAD_PROXY", "env")
    _code, check = _downloads_check(wb)
    assert check["status"] == "ok", check
    assert "through the proxy HTTP_PROXY names" in str(check["detail"])
    assert any(line.startswith("GET http://cdn.corp.example") for line in proxy.request_lines())
    # a download proxy that refuses: named, its password never
    with loopback_proxy(AUTH_REQUIRED) as refusing:
        monkeypatch.setenv(
            "WANBATCH_DOWNLOAD_PROXY", refusing.url.replace("http://", "http://carol:pa55word-xyz@")
        )
        _code, check = _downloads_check(wb)
    assert check["status"] == "fail", check
    assert "407" in str(check["detail"])
    assert "pa55word-xyz" not in str(check["detail"]) + str(check["fix"])
    assert "WANBATCH_DOWNLOAD_PROXY" in str(check["fix"])


def test_run_says_once_that_downloads_cannot_connect_before_it_pauses(
    wb: Wb,
    corporate_sim: SimulatorHandle,
    proxy: LoopbackProxy,
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The held download's warning (the host, the fix) is on run's own output, once, before the
    pause's reason: not only in the log (which an embedded run's progress display draws over)."""
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    run = wb("run", manifest("corporate", ONE_JOB), "--no-progress")
    assert run.code == 2, run.stdout + run.stderr
    lines = run.stderr.splitlines()
    warned = [i for i, line in enumerate(lines) if line.startswith("warning: downloads cannot connect")]
    assert len(warned) == 1, run.stderr
    said = lines[warned[0]]
    assert "cdn.corp.example" in said
    assert "WANBATCH_DOWNLOAD_PROXY=env" in said
    assert "no try counted" in said
    paused = next(i for i, line in enumerate(lines) if line.startswith("batch paused"))
    assert warned[0] < paused
