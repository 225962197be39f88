"""A submit whose rate grant went stale while its lease was recorded takes a fresh token.

Was: the grant was taken, then the lease committed, then the POST sent. A commit that stalled
(a checkpoint, a busy disk: seen in full CI runs, where PostgreSQL stalled three workers' lease
commits at once for ~0.7 s) let those workers send their grants together with the next ones:
7 submits in one of fal's 1-second windows at a rate of 5. A grant older than half of
``WANBATCH_SUBMIT_JITTER_ALLOWANCE`` when the POST is about to go out is now void.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import db, store
from jobs.states import JobState
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.steps import Runtime, dispatch, submit

KEY = "stale-grant-key-51c0aa"
T2V = "fal-ai/wan-22"
#: Stale after half of it: 0.1 s.
ALLOWANCE = 0.2
STALL = 0.4


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(SimulatorOptions(latency_seconds=0.2, latency_jitter=0.0, rng_seed=3)) as handle:
        yield handle


def _grants(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When the limiter granted a submit (monotonic), from now on."""
    assert rt.limiter is not None
    granted: list[float] = []
    real = rt.limiter.acquire

    def acquire(endpoint: str) -> float:
        wait = real(endpoint)
        if wait <= 0:
            granted.append(time.monotonic())
        return wait

    monkeypatch.setattr(rt.limiter, "acquire", acquire)
    return granted


def _stall_lease_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    real = store.record_send

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(STALL)
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "record_send", slow)


def _one_claimed(engine: Engine, rt: Runtime) -> str:
    add_batch(engine, "stale-grant", [(T2V, {"prompt": "a lighthouse at dusk"})])
    (job_id,) = dispatch(rt)
    return job_id


def test_a_stalled_lease_commit_sends_on_a_fresh_grant(
    engine: Engine, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = make_runtime(engine, settings_for(sim.url, KEY, submit_rate=4.0, submit_jitter_allowance=ALLOWANCE))
    try:
        job_id = _one_claimed(engine, rt)
        granted = _grants(rt, monkeypatch)
        _stall_lease_commits(monkeypatch)
        assert submit(rt, job_id) == "submitted"
    finally:
        rt.client.close()
    assert len(granted) == 2, granted  # the first went stale during the stalled commit
    assert granted[1] - granted[0] >= STALL
    assert sim.ledger()["accepted"] == 1


def test_a_prompt_lease_commit_sends_on_its_grant(
    engine: Engine, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No allowance stalls nothing either (every grant would be stale): the check is off.
    rt = make_runtime(engine, settings_for(sim.url, KEY, submit_rate=4.0, submit_jitter_allowance=0.0))
    try:
        job_id = _one_claimed(engine, rt)
        granted = _grants(rt, monkeypatch)
        _stall_lease_commits(monkeypatch)
        assert submit(rt, job_id) == "submitted"
    finally:
        rt.client.close()
    assert len(granted) == 1


def test_a_stale_grant_whose_fresh_token_is_far_off_gives_the_job_back_unsent(
    engine: Engine, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One submit every (1 + 0.2) / 0.5 = 2.4 s, and a submit waits at most 0.5 s for its token.
    settings = settings_for(
        sim.url, KEY, submit_rate=0.5, submit_jitter_allowance=ALLOWANCE, submit_wait_max=0.5
    )
    rt = make_runtime(engine, settings)
    try:
        job_id = _one_claimed(engine, rt)
        _stall_lease_commits(monkeypatch)
        assert submit(rt, job_id) == "rate-limited"
    finally:
        rt.client.close()
    assert sim.ledger()["accepted"] == 0
    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
        assert job.state == JobState.PENDING
        assert job.attempts == 0  # the attempt that never left is not counted
        assert job.lease_owner is None
        assert job.next_attempt_at is not None
