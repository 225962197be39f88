"""The submit-rate limiter's Redis going away mid-run: jobs are held back, never failed, sent
twice or sent past the limits, the outage is said (a bounded warning), and sending resumes
when Redis answers again.

Before, every claimed job was given back every 5 s with a warning of its own (a flood, and its
input prepared again each time), and dispatch went on claiming them. The real outage (a
private ``redis-server`` killed under a running ``wanbatch run``) is in
``tests/e2e/test_limiter_unreachable.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, update

from falsim import SimulatorOptions, running_simulator
from jobs import db, store
from jobs.models import Job
from jobs.states import JobState
from tests.chaos.chaos_harness import RedisServer
from tests.ports import unused_port
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.limits import UNREACHABLE_RETRY_SECONDS, RedisGCRA, api_key_rate, unreachable_note
from worker.steps import RateBucket, dispatch, submit

T2V = "fal-ai/wan-22"


class Clock:
    """The outage's clock, moved by the test: the warnings' spacing without waiting for it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _states(engine: Engine) -> dict[str, tuple[JobState, int]]:
    with db.read_scope(engine) as session:
        jobs = session.query(Job).all()
        return {j.id: (j.state, j.attempts) for j in jobs}


def _said(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if getattr(r, "event", None) == event]


@pytest.mark.redis
def test_a_limiter_outage_holds_jobs_back_then_lets_them_through(
    engine: Engine,
    redis_url: str,
    redis_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.limits")
    options = SimulatorOptions(latency_seconds=0.0, latency_jitter=0.0, concurrency_limit=40)
    with running_simulator(options) as sim:
        settings = settings_for(sim.url, f"outage-{redis_namespace}", limits_url=redis_url)
        rt = make_runtime(engine, settings)
        limiter = rt.limiter
        assert isinstance(limiter, RedisGCRA)
        clock = Clock()
        limiter.outage.clock = clock
        # Dispatch's bucket on the same clock: the hold it sets is read as set, however slow the
        # steps between (on a loaded machine the submits above took over a second).
        assert rt.bucket is not None
        rt.bucket = RateBucket(rt.bucket.rate, clock=clock)
        down = [False]
        answer = limiter.client.execute_command

        def flaky(*args: Any, **options: Any) -> Any:
            if down[0]:
                raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
            return answer(*args, **options)

        monkeypatch.setattr(limiter.client, "execute_command", flaky)
        try:
            add_batch(engine, "outage", [(T2V, {"prompt": f"a lighthouse {i}"}) for i in range(3)])
            claimed = dispatch(rt)  # Redis answered: all three are claimed
            assert len(claimed) == 3

            # Redis goes away between the claim and the submits: each is given back (not sent,
            # not failed, its attempt not counted), and the outage is said once, not per job.
            down[0] = True
            assert [submit(rt, job_id) for job_id in claimed] == ["rate-limited"] * 3
            assert sim.ledger()["accepted"] == 0
            assert set(_states(engine).values()) == {(JobState.PENDING, 0)}
            warned = _said(caplog, "limiter.unavailable")
            assert len(warned) == 1, warned
            assert "unreachable" in warned[0]
            assert "redis://127.0.0.1:6379/0 (WANBATCH_LIMITS_URL)" in warned[0]
            assert "none fails" in warned[0]
            assert unreachable_note(limiter) == "limiter unreachable: submits held"
            with db.read_scope(engine) as session:
                reason = store.job_events(session, claimed[0])[-1].reason
            assert reason is not None
            assert reason.startswith("held back: the submit-rate limiter's Redis at redis://127.0.0.1:6379/0")

            # A job due now is not even claimed while Redis is down: dispatch holds itself back
            # (no claim, no upload, no history entry) and asks again later.
            add_batch(engine, "during", [(T2V, {"prompt": "a harbour"})])
            assert dispatch(rt) == []
            assert rt.bucket.until_next() >= UNREACHABLE_RETRY_SECONDS
            assert len(_said(caplog, "limiter.unavailable")) == 1  # still within 30 s

            clock.now += 31  # half a minute on: said once more, with how long it has lasted
            rt.bucket.tokens = rt.bucket.capacity
            assert dispatch(rt) == []
            warned = _said(caplog, "limiter.unavailable")
            assert len(warned) == 2
            assert "unreachable for 31s" in warned[1]
            assert set(_states(engine).values()) == {(JobState.PENDING, 0)}
            assert sim.ledger()["accepted"] == 0

            # Redis is back: every job goes out exactly once.
            down[0] = False
            with db.session_scope(engine) as session:  # due now, not in 5 s
                session.execute(update(Job).values(next_attempt_at=None))
            rt.bucket.tokens = rt.bucket.capacity
            again = dispatch(rt)
            assert len(again) == 4
            assert [submit(rt, job_id) for job_id in again] == ["submitted"] * 4
            assert sim.ledger()["accepted"] == 4
            assert set(_states(engine).values()) == {(JobState.QUEUED, 1)}
            recovered = _said(caplog, "limiter.recovered")
            assert len(recovered) == 1
            assert "answers again after 31s: sending resumes" in recovered[0]
            assert unreachable_note(limiter) is None
        finally:
            down[0] = False
            limiter.client.delete(api_key_rate(settings).key)
            limiter.close()


def _read_only(client: redis.Redis[bytes], read_only: bool) -> None:
    """Make a private Redis a replica of a master nobody runs (it still answers reads, and
    refuses every write: a failover that left the limiter pointing at a demoted primary), or a
    primary again."""
    if read_only:
        client.execute_command("REPLICAOF", "127.0.0.1", str(unused_port()))
    else:
        client.execute_command("REPLICAOF", "NO", "ONE")


def test_a_limiter_redis_that_refuses_writes_holds_jobs_back_without_flapping(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A limiter Redis that answers reads but refuses writes (a read-only replica) mid-run.

    Before, dispatch's read-only question (``pause_left``) passed, so every round claimed the
    jobs, each submit failed to take its token and gave its job back, and the log flapped
    between "is unreachable" and "answers again after 0s: sending resumes" every 5 s, for
    ever. Now it is one warning saying what Redis refuses, dispatch claims nothing until Redis
    takes a write again, and then one line says that sending resumes."""
    caplog.set_level(logging.WARNING, logger="worker.limits")
    server = RedisServer(tmp_path / "redis")  # our own: the shared Redis is never made read-only
    server.start()
    admin = redis.Redis(port=server.port, socket_timeout=5)
    options = SimulatorOptions(latency_seconds=0.0, latency_jitter=0.0, concurrency_limit=40)
    try:
        with running_simulator(options) as sim:
            settings = settings_for(sim.url, "read-only-limiter", limits_url=server.url)
            rt = make_runtime(engine, settings)
            limiter = rt.limiter
            assert isinstance(limiter, RedisGCRA)
            clock = Clock()
            limiter.outage.clock = clock
            add_batch(engine, "refused", [(T2V, {"prompt": f"a lighthouse {i}"}) for i in range(3)])
            claimed = dispatch(rt)  # Redis took writes: all three are claimed
            assert len(claimed) == 3

            _read_only(admin, True)
            assert [submit(rt, job_id) for job_id in claimed] == ["rate-limited"] * 3
            assert set(_states(engine).values()) == {(JobState.PENDING, 0)}
            warned = _said(caplog, "limiter.unavailable")
            assert len(warned) == 1, warned
            assert "refuses the limiter's script" in warned[0]
            assert "read only replica" in warned[0]
            assert "@user_script" not in warned[0]  # not the script's SHA and line
            assert unreachable_note(limiter) == "limiter refused by its Redis: submits held"

            # Rounds go on: none claims a job (the reads pass, but a submit needs a write), and
            # none says that sending resumes.
            assert rt.bucket is not None
            with db.session_scope(engine) as session:  # due now, not in 5 s
                session.execute(update(Job).values(next_attempt_at=None))
            for _ in range(3):
                clock.now += 6
                rt.bucket.tokens = rt.bucket.capacity
                assert dispatch(rt) == []
            assert _said(caplog, "limiter.recovered") == []
            assert len(_said(caplog, "limiter.unavailable")) == 1  # within 30 s: said once
            assert set(_states(engine).values()) == {(JobState.PENDING, 0)}
            assert sim.ledger()["accepted"] == 0

            _read_only(admin, False)  # writable again: every job goes out exactly once
            rt.bucket.tokens = rt.bucket.capacity
            again = dispatch(rt)
            assert len(again) == 3
            assert [submit(rt, job_id) for job_id in again] == ["submitted"] * 3
            assert sim.ledger()["accepted"] == 3
            recovered = _said(caplog, "limiter.recovered")
            assert len(recovered) == 1, recovered
            assert "sending resumes" in recovered[0]
            assert unreachable_note(limiter) is None
            limiter.close()
    finally:
        admin.close()
        server.kill()
