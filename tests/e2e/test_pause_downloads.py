"""`wanbatch pause` while videos are being downloaded: they are collected, not left behind.

The bug (audit "pausedl"): a run ended as soon as nothing was *at fal* once its batch was
paused, so jobs in `downloading` — made and billed by fal, their video not fetched yet (a 503
from the file host, retried later) — were left undownloaded, and `run NAME` of the paused batch
was refused: nothing fetched them until `resume`, which also sends new jobs, while fal's result
expires after an hour. Now a paused run goes on until those downloads are stored (or end
terminal), and `run NAME` of a paused batch collects what is at fal or downloading, sending
nothing, then ends as a run the pause stopped does (exit 2, the paused line).

`wanbatch run` runs as a real subprocess against a simulator in this test process, whose
download fault keeps the first job in `downloading` while the pause lands.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from tests.e2e.e2e_helpers import (
    FAL_KEY,
    FAST_ENV,
    Background,
    MakeManifest,
    Wb,
    db_rows,
    subprocess_env,
    wait_for,
)

MANIFEST = """\
name: pdl
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  num_frames: 81
matrix:
  seed: [1, 2, 3]
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
"""

PAUSED_LINE = (
    "batch pdl is paused (`wanbatch pause`): nothing of it is sent until `wanbatch resume pdl`; "
    "then run this command again to go on"
)


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(
        SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0, concurrency_limit=40, rng_seed=11)
    ) as handle:
        yield handle


@pytest.fixture
def env(e2e_env: Path, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """One job at a time, and no new submit while a video waits to be downloaded: the first job
    sits in `downloading`, nothing at fal, the others `pending`, when the pause lands. Failed
    downloads are tried again every fraction of a second, for long enough."""
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", sim.url)  # for the commands run in process
    monkeypatch.setenv("WANBATCH_FAL_REST_URL", sim.url)
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    return subprocess_env(
        sim.url,
        MAX_OUTSTANDING="1",
        MAX_DOWNLOAD_BACKLOG="1",
        RETRY_BASE_DELAY="0.05",
        RETRY_MAX_DELAY="0.2",
        DOWNLOAD_ATTEMPTS="1000",
        LEASE_SECONDS="120",
    )


def _counts(db: str) -> dict[str, int]:
    try:
        return {state: int(n) for state, n in db_rows(db, "SELECT state, count(*) FROM jobs GROUP BY state")}
    except OperationalError:  # not migrated yet
        return {}


def _fired(sim: SimulatorHandle) -> int:
    return sim.engine.faults.fired.get("download_error", 0)


def _paused_while_downloading(
    wb: Wb, sim: SimulatorHandle, env: dict[str, str], cwd: Path, path: Path
) -> Background:
    """A run of ``path`` whose first video cannot be fetched (503), paused by its user then."""
    sim.set_faults(download_error={"next": 100_000, "status": 503})
    run = Background(["run", str(path), "--no-progress"], env, cwd, "run")
    db = env["WANBATCH_DATABASE_URL"]
    wait_for(
        "a download to fail",
        lambda: _fired(sim) >= 1 and _counts(db).get("downloading") == 1,
        run,
        step=0.1,
    )
    paused = wb("pause", "pdl")
    assert paused.code == 0, paused.stderr
    assert "1 job(s) in flight finish and download" in paused.stdout
    return run


def _videos(cwd: Path) -> list[Path]:
    return sorted((cwd.parent / "outputs").rglob("*.mp4"))


def test_a_paused_run_downloads_what_fal_made_before_it_ends(
    wb: Wb, sim: SimulatorHandle, env: dict[str, str], e2e_env: Path, manifest: MakeManifest
) -> None:
    run = _paused_while_downloading(wb, sim, env, e2e_env, manifest("pdl", MANIFEST))
    try:
        # Paused, with nothing at fal: the run keeps trying the download (it ended at once).
        after_pause = _fired(sim)
        wait_for("the download to be tried again while paused", lambda: _fired(sim) >= after_pause + 3, run)
        sim.engine.faults.clear()  # the file host answers again
        code = run.wait(60)
    finally:
        run.kill()
    err = run.stderr()
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "batch paused by its user: `wanbatch resume pdl`, then run the same command again to go on"
    )
    report = wb("status", "pdl", "--json").json()
    assert report["counts"]["downloading"] == 0
    assert (report["counts"]["succeeded"], report["counts"]["pending"]) == (1, 2)
    assert len(_videos(e2e_env)) == 1
    assert sim.ledger()["accepted"] == 1  # nothing was sent after the pause


def test_run_of_a_paused_batch_collects_its_downloads_and_sends_nothing(
    wb: Wb, sim: SimulatorHandle, env: dict[str, str], e2e_env: Path, manifest: MakeManifest
) -> None:
    """A paused batch whose run was stopped (Ctrl-C) with a video still to download: `run pdl`
    was refused ("nothing of it is sent until `wanbatch resume pdl`"), so only `resume` — which
    sends the rest too — got the paid video. Now the run fetches it, sends nothing, and ends as
    a paused run does."""
    run = _paused_while_downloading(wb, sim, env, e2e_env, manifest("pdl", MANIFEST))
    try:
        run.popen.send_signal(signal.SIGINT)
        assert run.wait(30) == 130, run.stderr()
    finally:
        run.kill()
    assert _counts(env["WANBATCH_DATABASE_URL"]).get("downloading") == 1
    sim.engine.faults.clear()

    again = wb("run", "pdl", "--no-progress", "--json")
    assert again.code == 2, again.stderr
    body = again.json()
    assert (body["ok"], body["error"]) == (False, PAUSED_LINE)
    assert body["counts"]["downloading"] == 0
    assert (body["counts"]["succeeded"], body["counts"]["pending"]) == (1, 2)
    assert (
        "batch pdl is paused (`wanbatch pause`): nothing of it is sent; collecting its 1 job(s) at "
        "fal or downloading, then this run stops (`wanbatch resume pdl` sends the rest)"
    ) in " ".join(again.stderr.split())
    assert len(_videos(e2e_env)) == 1
    assert sim.ledger()["accepted"] == 1

    # Nothing left to collect: refused again, as before, nothing changed.
    refused = wb("run", "pdl", "--no-progress")
    assert refused.code == 2
    assert refused.stderr.strip().splitlines() == [f"error: {PAUSED_LINE}"]
    assert sim.ledger()["accepted"] == 1
