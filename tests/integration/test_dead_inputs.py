"""An input URL fal could not download for one job is not sent by the jobs waiting to be sent.

fal fetches a job's media only when the request runs, and answers a URL it cannot fetch with a
422 (``file_download_error``) that it may bill. Was: every job sharing that URL was sent anyway
and each paid the 422 (a matrix of 20 seeds over one dead image URL: 20 failed, $4.00 wasted, 16
of them sent after the first had failed). Now the process remembers it: a job carrying the
user's URL fails unsent (``input_unreachable``, nothing billed) unless created after fal said so
(a rerun tries it again), and a job carrying wanbatch's upload that fal's storage dropped
uploads the file again before it is sent.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import db, store
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for, wait_until
from worker.fal.origin import url_origin_text
from worker.steps import Runtime, dispatch, download, poll, submit

KEY = "dead-inputs-key-7d21"
I2V = "fal-ai/wan-i2v"
#: The submit step's module (``worker.steps.submit`` is also the name of its function).
submit_step = importlib.import_module("worker.steps.submit")
IMAGE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "images" / "landscape.jpg"


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(
        SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0, concurrency_limit=8, rng_seed=5)
    ) as handle:
        yield handle


def _job(engine: Engine, job_id: str) -> Any:
    with db.read_scope(engine) as session:
        return store.get_job(session, job_id)


def _fails_at_fal(rt: Runtime, handed: list[str], job_id: str) -> str:
    """Send ``job_id`` and take in fal's verdict on it (its result's 422): the download step's outcome."""
    assert submit(rt, job_id) == "submitted"
    wait_until(lambda: job_id in handed, step=lambda: poll(rt))
    return download(rt, job_id)


def test_jobs_waiting_with_a_url_fal_could_not_download_fail_unsent(
    engine: Engine, sim: SimulatorHandle
) -> None:
    dead = f"{sim.url}/files/gone/b.jpg"  # a file of fal's storage that is no longer there: 404
    handed: list[str] = []
    rt = make_runtime(engine, settings_for(sim.url, KEY, max_outstanding=8), enqueue_download=handed.append)
    inputs: list[dict[str, Any]] = [
        {"prompt": "a", "image_url": dead, "resolution": "480p", "seed": 1},
        {"prompt": "a", "image_url": dead, "resolution": "480p", "seed": 2},
        {"prompt": "b", "image_url": "https://example.com/fine.png", "resolution": "480p"},
    ]
    batch_id = add_batch(engine, "dead-url", [(I2V, i) for i in inputs])
    first, second, fine = job_ids(engine, batch_id)
    try:
        assert sorted(dispatch(rt)) == sorted([first, second, fine])  # all claimed before fal answered
        assert _fails_at_fal(rt, handed, first) == "failed"
        assert submit(rt, second) == "failed"  # never sent: fal already said it cannot fetch the URL
        assert submit(rt, fine) == "submitted"  # another input goes as ever
        assert sim.ledger()["accepted"] == 2

        stopped = _job(engine, second)
        assert stopped.state == JobState.FAILED
        assert stopped.error_type == "input_unreachable"
        assert dead in stopped.error
        assert "(image_url)" in stopped.error
        assert first in stopped.error
        assert "`wanbatch rerun dead-url --failed-only`" in stopped.error
        assert stopped.attempts == 0
        assert not stopped.actual_usd
        assert stopped.submitted_input is None

        # A batch made since (a rerun, the URL maybe fixed) is sent: fal decides again.
        again = add_batch(engine, "dead-url-again", [(I2V, inputs[0])])
        (retried,) = job_ids(engine, again)
        assert dispatch(rt) == [retried]
        assert submit(rt, retried) == "submitted"
        assert sim.ledger()["accepted"] == 3
    finally:
        rt.client.close()


def test_an_upload_found_gone_while_a_job_waits_to_be_sent_is_uploaded_again(
    engine: Engine, sim: SimulatorHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both jobs take the cached upload fal's storage no longer has; the second waits for its
    rate token while the first's 422 comes back. Was: it was sent with the dead URL all the same,
    and paid a 422 of its own before uploading the file again."""
    image = tmp_path / "landscape.jpg"
    shutil.copyfile(IMAGE, image)
    data = image.read_bytes()
    dead = f"{sim.url}/files/expired/landscape.jpg"
    with db.session_scope(engine) as session:  # uploaded within the day, dropped by fal since
        store.record_upload(
            session,
            origin=url_origin_text(sim.url),
            content_sha256=hashlib.sha256(data).hexdigest(),
            provider_url=dead,
            size_bytes=len(data),
            content_type="image/jpeg",
        )
    handed: list[str] = []
    rt = make_runtime(
        engine,
        settings_for(sim.url, KEY, max_outstanding=8, inline_max_bytes=100),
        enqueue_download=handed.append,
    )
    inputs: list[dict[str, Any]] = [
        {"prompt": "a", "image_url": str(image), "resolution": "480p", "seed": s} for s in (1, 2)
    ]
    first, second = job_ids(engine, add_batch(engine, "stale-upload", [(I2V, i) for i in inputs]))
    try:
        assert sorted(dispatch(rt)) == sorted([first, second])
        assert submit(rt, first) == "submitted"
        assert _job(engine, first).submitted_input["image_url"] == dead
        wait_until(lambda: first in handed, step=lambda: poll(rt))

        real: Callable[[Runtime, store.Fence, str], bool] = submit_step._given_back_for_rate
        learned: list[str] = []

        def token_wait(rt_: Runtime, fence: store.Fence, endpoint: str) -> bool:
            # The second job holds its prepared input (the dead URL) and waits for its token;
            # meanwhile the first one's result comes back: fal could not download it.
            if fence.job_id == second and not learned:
                learned.append(download(rt, first))
            return real(rt_, fence, endpoint)

        monkeypatch.setattr(submit_step, "_given_back_for_rate", token_wait)
        assert submit(rt, second) == "submitted"
        assert learned == ["retry"]  # the first is sent again, uploading anew (as before)
        sent = _job(engine, second).submitted_input["image_url"]
        assert sent != dead
        assert sent.startswith(f"{sim.url}/files/")
        assert sim.ledger()["accepted"] == 2  # the first's failed attempt, and this one
    finally:
        rt.client.close()
