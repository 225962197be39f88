"""fal unreachable for a while (an outage of fal, or of this host's network) does not fail a batch.

A submit whose connection failed before anything was sent is no submission: its job goes back
uncounted, nothing is possibly billed, and the run holds its submits — one probe after each
growing pause — until fal answers. Seen (distops audit, item 1): a simulator stopped for 40 s
failed all 30 jobs "after 3 attempt(s): fal submit: not sent, could not connect".
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from falsim.options import SimulatorOptions
from falsim.server import running_simulator
from jobs import batches, db, store
from jobs.settings import Settings, get_settings
from jobs.states import JobState
from tests.ports import unused_port
from worker.running import process_batch

JOBS = 6
MANIFEST = """
name: fal-down
defaults:
  resolution: 480p
items:
""" + "".join(f"  - {{endpoint: fal-ai/wan-22, prompt: a paper boat {i}}}\n" for i in range(JOBS))
#: What a job given back says once a probe failed too (the pause doubled from 1 s): fal comes
#: back only then.
PROBE_FAILED = "retrying every 2s"


@pytest.fixture
def settings(new_pg_database: Callable[[], str], tmp_path: Path) -> Iterator[Settings]:
    port = unused_port()  # nothing listens there until the test starts the simulator on it
    get_settings.cache_clear()
    yield Settings(
        database_url=new_pg_database(),
        FAL_KEY=SecretStr("fal-down-test-key-3c1d"),
        fal_queue_url=f"http://127.0.0.1:{port}",
        fal_rest_url=f"http://127.0.0.1:{port}",
        output_dir=tmp_path / "outputs",
        poll_min_interval=0.05,
        poll_max_interval=0.2,
        tick_interval=0.05,
        retry_base_delay=0,
        submit_rate=100,
        max_outstanding=20,
        max_attempts=1,  # a single counted failure would fail its job
    )
    get_settings.cache_clear()


def _refusals(settings: Settings, batch_id: str) -> list[str]:
    """Why the batch's submits were given back because fal could not be reached, oldest first."""
    engine = db.open_engine(settings)
    try:
        with db.read_scope(engine) as session:
            jobs = list(store.jobs_of_batch(session, batch_id))
            events = [e for job in jobs for e in store.job_events(session, job.id)]
            return [
                e.reason
                for e in sorted(events, key=lambda e: e.id)
                if e.reason and e.reason.startswith("not sent") and "not counted as an attempt" in e.reason
            ]
    finally:
        engine.dispose()


def test_a_batch_rides_out_fal_being_unreachable_and_sends_each_job_once(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "batch.yaml"
    path.write_text(MANIFEST, encoding="utf-8")
    batch_id = batches.submit_manifest(path, settings).batch_id
    port = int(settings.fal_queue_url.rsplit(":", 1)[1])
    stop, failed = threading.Event(), []

    def fal_comes_back() -> None:
        """Once the run has failed to connect a few times, the simulator starts on its port."""
        try:
            while not any(PROBE_FAILED in why for why in _refusals(settings, batch_id)):
                if stop.wait(0.05):
                    return
            options = SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0, rng_seed=11)
            with running_simulator(options, port=port):
                stop.wait()
        except BaseException as exc:  # the main thread raises it
            failed.append(exc)

    thread = threading.Thread(target=fal_comes_back, name="fal-comes-back", daemon=True)
    thread.start()
    try:
        report, _stats = process_batch(batch_id, settings, show_progress=False, serve_metrics=False)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not failed, failed
    refusals = _refusals(settings, batch_id)  # fal really was unreachable for a while
    assert "could not connect" in refusals[0]
    assert "retrying every 1s" in refusals[0]
    assert any(PROBE_FAILED in why for why in refusals)
    assert report["counts"]["succeeded"] == JOBS, report
    assert not report["possibly_billed_usd"]
    assert report["possible_duplicate_charges"] == 0
    engine = db.open_engine(settings)
    try:
        with db.read_scope(engine) as session:
            jobs = list(store.jobs_of_batch(session, batch_id))
            assert [(job.state, job.attempts) for job in jobs] == [(JobState.SUCCEEDED, 1)] * JOBS
    finally:
        engine.dispose()
