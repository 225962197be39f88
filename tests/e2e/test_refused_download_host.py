"""A video on a host the download policy refuses (not on ``WANBATCH_DOWNLOAD_ALLOWED_HOSTS``, or
at an internal address) is paid for: its job waits, its batch paused with one line naming the
host, the address and the setting, and a run after the setting is fixed downloads it, never
made again. The simulator's media URLs name ``localhost`` (``--public-url``) while wanbatch talks
to it on ``127.0.0.1``, so they are on a host that is not a configured fal URL's, as a CDN's is."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import FAL_KEY, FAST_ENV, MakeManifest, Wb, export_jsonl
from tests.ports import unused_port

ONE_JOB = """\
name: host2
endpoint: fal-ai/wan-22
items:
  - prompt: A paper boat in the rain
    resolution: 480p
    seed: 5
"""


@pytest.fixture
def localhost_sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[SimulatorHandle, int]]:
    """A simulator whose media URLs are ``http://localhost:PORT``, wanbatch pointed at it on
    ``http://127.0.0.1:PORT``."""
    port = unused_port()
    options = SimulatorOptions(
        latency_seconds=0.05,
        latency_jitter=0.0,
        concurrency_limit=40,
        rng_seed=7,
        public_url=f"http://localhost:{port}",
    )
    with running_simulator(options, port) as sim:
        served = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", served)
        monkeypatch.setenv("WANBATCH_FAL_REST_URL", served)
        monkeypatch.setenv("FAL_KEY", FAL_KEY)
        for name, value in FAST_ENV.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        yield sim, port


def _accepted(port: int) -> int:
    return int(httpx.get(f"http://127.0.0.1:{port}/_sim/ledger").json()["accepted"])


@pytest.mark.parametrize(
    ("allowed", "words", "fix"),
    [
        # the brief's reproduction: an allow-list that leaves the media host out
        ("media.example", "refusing to fetch from host 'localhost': not in the allow-list", "media.example,"),
        # no allow-list: localhost resolves to loopback, an internal address
        (None, "refusing to fetch from localhost (127.0.0.1): a loopback address", ""),
    ],
)
def test_a_refused_host_holds_the_paid_video_until_the_setting_allows_it(
    wb: Wb,
    localhost_sim: tuple[SimulatorHandle, int],
    manifest: MakeManifest,
    monkeypatch: pytest.MonkeyPatch,
    allowed: str | None,
    words: str,
    fix: str,
) -> None:
    _sim, port = localhost_sim
    if allowed is not None:
        monkeypatch.setenv("WANBATCH_DOWNLOAD_ALLOWED_HOSTS", allowed)
        get_settings.cache_clear()
    path = manifest("host2", ONE_JOB)
    run = wb("run", path, "--json", "--no-progress")
    # held, not failed: the batch paused (exit 2, as for any pause that needs the user)
    assert run.code == 2, run.stdout + run.stderr
    setting = f"WANBATCH_DOWNLOAD_ALLOWED_HOSTS={fix}localhost:{port}"
    refusals = [line for line in run.stderr.splitlines() if words in line]
    assert refusals, run.stderr
    assert all(setting in line for line in refusals), refusals
    batch = run.json()["batch"]
    (record,) = export_jsonl(wb, batch)
    assert record["status"] == "downloading", record
    assert record["error"] is None
    assert record["video_path"] is None
    status = wb("status", batch, "--json").json()
    assert status["state"] == "paused"
    assert words in status["pause_reason"], status["pause_reason"]
    assert setting in status["pause_reason"], status["pause_reason"]
    assert _accepted(port) == 1

    # a run under the same settings still refuses, and still fails nothing
    again = wb("run", path, "--json", "--no-progress")
    assert again.code == 2, again.stdout + again.stderr
    (record,) = export_jsonl(wb, batch)
    assert record["status"] == "downloading", record

    # the user gives the setting the line named: the paid video comes, nothing is made again
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ALLOWED_HOSTS", setting.split("=", 1)[1])
    get_settings.cache_clear()
    fixed = wb("run", path, "--json", "--no-progress")
    assert fixed.code == 0, fixed.stdout + fixed.stderr
    assert fixed.json()["counts"]["succeeded"] == 1
    assert fixed.json()["wasted_usd"] == 0
    (record,) = export_jsonl(wb, batch)
    assert record["status"] == "succeeded"
    assert record["video_path"]
    assert _accepted(port) == 1


def test_doctor_names_the_allow_list_when_it_refuses_the_media_host(
    wb: Wb, localhost_sim: tuple[SimulatorHandle, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _sim, port = localhost_sim
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ALLOWED_HOSTS", "media.example")
    get_settings.cache_clear()
    run = wb("doctor", "--json")
    (check,) = [c for c in run.json()["checks"] if c["name"] == "downloads"]
    assert check["status"] == "fail", check
    assert "not in the allow-list" in str(check["detail"])
    assert "a paid video waits, never fails" in str(check["detail"])
    fix = str(check["fix"])
    assert f"WANBATCH_DOWNLOAD_ALLOWED_HOSTS=media.example,localhost:{port}" in fix
    assert "network and DNS" not in fix
    # with that setting, the check passes
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ALLOWED_HOSTS", f"media.example,localhost:{port}")
    get_settings.cache_clear()
    run = wb("doctor", "--json")
    (check,) = [c for c in run.json()["checks"] if c["name"] == "downloads"]
    assert check["status"] == "ok", check
