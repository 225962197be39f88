"""A submit fal refuses with 429 is fal's "slow down", not the job's failure.

* The job goes back to ``pending`` with no attempt spent, its refusal counted
  (``rate_limited_submits``), due after its own backoff.
* Every submit under the same key waits (the shared limiter's next grant moves), for fal's
  ``Retry-After`` (capped) or ``WANBATCH_RETRY_BASE_DELAY``.
* The bound: after ``FREE_RATE_LIMIT_REFUSALS`` refusals each one counts as an attempt, so a storm
  that never ends still ends the job, with fal's words.
* Dispatch claims nothing while the shared limiter holds submits back (a pause another worker
  heard too), and the conductor dispatches again when the pause ends, not every 20 ms.
* A 429 on the upload of a job's local image is the same "slow down".
* Whole runs: a storm of refusals against the simulator, with one attempt per job, loses none.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from PIL import Image
from sqlalchemy import Engine, select, text

from cli.output import money_line
from falsim import SimulatorOptions, running_simulator
from jobs import batches, db, store
from jobs.batches import batch_report
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.hostile import HostileProvider, Recorded, json_reply
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.conductor import Conductor
from worker.limits import LocalGCRA, RedisGCRA, api_key_rate, limiter_for
from worker.running import process_batch
from worker.steps import RateBucket, dispatch, submit
from worker.steps.submit import FREE_RATE_LIMIT_REFUSALS

S = JobState
KEY = "8d3c1f0e-5a6b-4c7d-9e8f-0a1b2c3d4e5f:0f1e2d3c4b5a69788796a5b4c3d2e1f0"
T2V = "fal-ai/wan-22"
I2V = "fal-ai/wan-i2v"
TOO_MANY = {"detail": "Too many requests"}


def job(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        found = store.get_job(session, job_id)
        session.expunge(found)
        return found


def refused(hostile: HostileProvider, headers: dict[str, str] | None = None) -> None:
    hostile.route("POST", rf"/{T2V}", json_reply(TOO_MANY, 429, headers))


def test_a_429_gives_the_job_back_uncounted_and_holds_every_submit(
    engine: Engine, hostile: HostileProvider
) -> None:
    refused(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, retry_base_delay=30, max_attempts=1))
    add_batch(engine, "refused", [(T2V, {"prompt": "a lighthouse"})])
    (job_id,) = dispatch(rt)
    before = utcnow()
    assert submit(rt, job_id) == "rate-limited"

    after = job(engine, job_id)
    assert (after.state, after.attempts, after.rate_limited_submits) == (S.PENDING, 0, 1)
    assert after.submitted_input is None  # fal refused it: nothing was submitted
    assert "429" in (after.error or "")
    assert "Too many requests" in (after.error or "")
    assert after.next_attempt_at is not None
    assert after.next_attempt_at >= before + timedelta(seconds=29)  # its own backoff
    with db.session_scope(engine) as session:
        reasons = [e.reason for e in store.job_events(session, job_id)]
    assert "not counted as an attempt (refusal 1 of 10)" in (reasons[-1] or "")

    # Every submit of the key waits out the pause, whatever the endpoint; dispatch claims nothing.
    assert rt.limiter is not None
    assert rt.limiter.acquire(T2V) > 25
    assert rt.limiter.acquire(I2V) > 25
    add_batch(engine, "after-the-refusal", [(T2V, {"prompt": "a harbour"})])
    assert dispatch(rt) == []
    assert hostile.count("POST", r".*") == 1


class StopsAtTheRefusal:
    """Monotonic time until fal refuses (:meth:`stop`), then that moment for ever: a pause set at
    the refusal is read as it was set, however long the submit took to record it."""

    def __init__(self) -> None:
        self.stopped: float | None = None

    def __call__(self) -> float:
        return time.monotonic() if self.stopped is None else self.stopped

    def stop(self) -> None:
        if self.stopped is None:
            self.stopped = time.monotonic()


@pytest.mark.parametrize(("header", "pause"), [("7", 7.0), ("1e300", 60.0), ("inf", 2.0)])
def test_retry_after_sets_the_pause_within_the_retry_ceiling(
    engine: Engine, hostile: HostileProvider, header: str, pause: float
) -> None:
    """fal's ``Retry-After`` is honoured, but it is the provider's word: capped at
    ``WANBATCH_RETRY_MAX_DELAY``, and ignored when it is not a finite number."""
    settings = settings_for(hostile.url, KEY, retry_base_delay=2, retry_max_delay=60)
    rt = make_runtime(engine, settings)
    # The limiter's clock stops when fal refuses: the pause is read as the submit set it. On the
    # real clock it was read after the submit had recorded the refusal, which a loaded machine
    # stretched past the second the bound allowed. (Stopped from the start, it would leave the
    # submit waiting for the next token for ever when it takes a fresh grant before the POST.)
    clock = StopsAtTheRefusal()
    limiter = rt.limiter
    assert isinstance(limiter, LocalGCRA)
    limiter.clock = clock
    refusal = json_reply(TOO_MANY, 429, {"Retry-After": header})

    def refuse(request: Recorded, sock: socket.socket) -> None:
        clock.stop()
        refusal(request, sock)

    hostile.route("POST", rf"/{T2V}", refuse)
    add_batch(engine, "retry-after", [(T2V, {"prompt": "a lighthouse"})])
    (job_id,) = dispatch(rt)
    before = utcnow()
    assert submit(rt, job_id) == "rate-limited"
    assert hostile.count("POST", r".*") == 1  # refused by fal, not held back before sending
    assert limiter.acquire(T2V) == pytest.approx(pause, abs=1e-6)
    assert limiter.pause_left() == pytest.approx(pause, abs=1e-6)
    due = job(engine, job_id).next_attempt_at
    assert due is not None
    assert before + timedelta(seconds=pause) <= due <= utcnow() + timedelta(seconds=pause)


def test_refusals_past_the_free_ones_count_and_end_the_job(engine: Engine, hostile: HostileProvider) -> None:
    refused(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, retry_base_delay=0, max_attempts=2))
    add_batch(engine, "storm", [(T2V, {"prompt": "a lighthouse"})])
    outcomes = []
    for _ in range(FREE_RATE_LIMIT_REFUSALS + 5):
        claimed = dispatch(rt)
        if not claimed:
            break
        outcomes.append(submit(rt, claimed[0]))
    # the last attempt's refusal ends the job: its outcome says so, whatever the error's class
    assert outcomes == ["rate-limited"] * FREE_RATE_LIMIT_REFUSALS + ["retry", "failed"]
    with db.session_scope(engine) as session:
        (only,) = session.query(Job).all()
        state, attempts, free, error = only.state, only.attempts, only.rate_limited_submits, only.error
    assert (state, attempts, free) == (S.FAILED, 2, FREE_RATE_LIMIT_REFUSALS)
    assert error is not None
    assert error.startswith("after 2 attempt(s): HTTP 429")
    assert hostile.count("POST", r".*") == FREE_RATE_LIMIT_REFUSALS + 2


MANIFEST = """\
name: {name}
endpoint: fal-ai/wan-22
defaults:
  resolution: 480p
matrix:
  seed: [1, 2, 3, 4, 5, 6]
items:
  - prompt: a quiet harbour at dawn
"""


@pytest.mark.parametrize(
    ("name", "storm"), [("burst", {"next": 24}), ("rain", {"next": 3, "probability": 0.5})]
)
def test_a_429_storm_with_one_attempt_per_job_loses_no_job(
    db_url: str, tmp_path: Path, name: str, storm: dict[str, float]
) -> None:
    """Before, each 429 spent one of ``WANBATCH_MAX_ATTEMPTS``: with one attempt, every job the
    storm met failed without ever running. Now every job succeeds with its one attempt."""
    options = SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0, concurrency_limit=8, rng_seed=5)
    with running_simulator(options) as sim:
        settings = settings_for(
            sim.url,
            KEY,
            database_url=db_url,
            output_dir=tmp_path / "outputs",
            retry_base_delay=0.02,
            max_attempts=1,
        )
        manifest = tmp_path / "storm.yaml"
        manifest.write_text(MANIFEST.format(name=f"storm-{name}"), encoding="utf-8")
        submitted = batches.submit_manifest(manifest, settings)
        sim.set_faults(submit_429=storm)
        report, _stats = process_batch(submitted.batch_id, settings, show_progress=False)
        ledger = sim.ledger()
    assert report["finished"] == report["total"] == 6
    refusals = sum(1 for r in ledger["rejections"] if r["status_code"] == 429)
    assert refusals >= 1
    assert ledger["accepted"] == 6
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT state, attempts, rate_limited_submits FROM jobs WHERE batch_id = :b"),
                {"b": submitted.batch_id},
            ).all()
    finally:
        engine.dispose()
    assert sorted(state for state, _, _ in rows) == ["succeeded"] * 6
    assert all(attempts == 1 for _, attempts, _ in rows)
    assert sum(free for _, _, free in rows) == refusals

    # `status` says so: in its JSON, and in a line of its own.
    engine = db.make_engine(db_url)
    try:
        with db.read_scope(engine) as session:
            shown = batch_report(session, submitted.batch_id)
    finally:
        engine.dispose()
    assert shown["rate_limited_submits"] == refusals
    assert f"{refusals} submit(s) refused by fal with 429" in money_line(shown)


def test_the_dispatch_bucket_says_when_its_next_token_comes() -> None:
    bucket = RateBucket(10.0, burst=1)
    assert bucket.take(1) == 1
    assert 0.05 < bucket.until_next() <= 0.1
    bucket.hold_off(2.0)
    assert bucket.take(1) == 0
    assert 2.0 < bucket.until_next() <= 2.1


def test_a_pause_heard_after_an_idle_spell_holds_the_bucket_for_all_of_it() -> None:
    """The hold starts when it is heard. Before, the next :meth:`RateBucket.take` refilled the
    bucket for all the time since the last one, the seconds before the hold included: a 5 s
    pause heard 10 s after the last round held nothing at all."""
    now = [1000.0]
    bucket = RateBucket(4.0, burst=1, clock=lambda: now[0])
    assert bucket.take(1) == 1
    now[0] += 10.0  # the next round, an idle spell later
    bucket.hold_off(5.0)
    assert bucket.take(1) == 0
    assert bucket.until_next() == 5.25  # the pause, then a token at the rate (4 a second)
    now[0] += 5.0
    assert bucket.take(1) == 0
    now[0] += 0.25
    assert bucket.take(1) == 1


def test_a_pause_heard_long_after_the_last_round_holds_dispatch(
    engine: Engine, hostile: HostileProvider
) -> None:
    """A submit hears fal's 429 some seconds after dispatch's last round (a quiet worker's
    rounds come a tick apart): the next round claims nothing until the pause ends. Before, the
    bucket credited the seconds since the last round against the pause, so that round claimed
    the jobs due and each submit gave its job back, one history entry apiece."""
    now = [1000.0]
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    assert rt.bucket is not None
    rt.bucket = RateBucket(rt.bucket.rate, clock=lambda: now[0])  # as built, on the test's clock
    limiter = rt.limiter
    assert isinstance(limiter, LocalGCRA)
    limiter.clock = lambda: now[0]
    assert dispatch(rt) == []  # a round with nothing due
    now[0] += 10.0
    limiter.hold_off(T2V, 5.0)  # a submit heard fal's 429
    add_batch(engine, "after-a-quiet-spell", [(T2V, {"prompt": "a lighthouse"})])
    assert dispatch(rt) == []
    assert rt.bucket.until_next() >= 5.0
    now[0] += 6.0  # the pause is over
    assert len(dispatch(rt)) == 1
    assert hostile.count("POST", r".*") == 0


def test_a_held_dispatch_looks_again_when_the_pause_ends_not_every_20_ms(
    engine: Engine, hostile: HostileProvider
) -> None:
    """While the submit rate is paused (a 429), the conductor's next dispatch round comes when
    the pause ends: it used to look again every 20 ms, some 50 futile rounds a second."""
    handed: list[str] = []
    rt = make_runtime(engine, settings_for(hostile.url, KEY, tick_interval=30), enqueue_submit=handed.append)
    add_batch(engine, "paused-rate", [(T2V, {"prompt": "a lighthouse"})])
    assert rt.bucket is not None
    rt.bucket.hold_off(1.0)
    conductor = Conductor(rt, stream=False)
    stopping = threading.Event()
    runner = threading.Thread(target=conductor.run, args=(stopping,))
    runner.start()
    try:
        deadline = time.monotonic() + 15
        while not handed and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stopping.set()
        runner.join(timeout=10)
    assert len(handed) == 1  # sent once the pause was over
    assert conductor.stats.rounds <= 10  # not ~50 rounds over the pause


def test_a_pause_another_worker_heard_holds_this_dispatch(
    engine: Engine, hostile: HostileProvider, redis_url: str, redis_namespace: str
) -> None:
    """The distributed leader dispatches, a worker elsewhere hears the 429: the leader reads the
    pause from the shared limiter and claims nothing until it ends (before, it claimed jobs at
    the submit rate and the workers handed each back, one history entry apiece)."""
    settings = settings_for(hostile.url, f"pause-elsewhere-{redis_namespace}", limits_url=redis_url)
    rt = make_runtime(engine, settings)
    assert isinstance(rt.limiter, RedisGCRA)
    add_batch(engine, "held-elsewhere", [(T2V, {"prompt": "a lighthouse"})])
    elsewhere = RedisGCRA.from_url(settings, redis_url)
    assert rt.bucket is not None
    try:
        # Judged by the clocks that decide (this process's for the bucket, Redis' for the pause),
        # read before and after: not by a guess of how long dispatch takes on a loaded machine.
        since_here = rt.bucket.clock()  # first: its span holds the span on Redis' clock
        seconds, micros = elsewhere.client.time()
        since = seconds + micros / 1_000_000
        elsewhere.hold_off(I2V, 5.0)  # the API key's limit holds every endpoint
        assert dispatch(rt) == []
        assert rt.bucket.short
        # The whole pause, less the time passed since it was heard (1 ms for the two clocks).
        assert rt.bucket.until_next() >= 5.0 - (rt.bucket.clock() - since_here) - 0.001
        left = rt.limiter.pause_left()
        seconds, micros = elsewhere.client.time()
        assert 5.0 - (seconds + micros / 1_000_000 - since) - 1e-6 <= left <= 5.0
    finally:
        elsewhere.client.delete(api_key_rate(settings).key)
        elsewhere.close()
    rt.bucket.tokens = 1.0  # the pause is over (deleted): the job goes out
    assert len(dispatch(rt)) == 1


def test_short_waits_for_a_token_do_not_hold_dispatch(engine: Engine, hostile: HostileProvider) -> None:
    """At the submit rate the limiter is always a little ahead; only a wait longer than a submit
    would sleep out (``WANBATCH_SUBMIT_WAIT_MAX``) holds dispatch."""
    rt = make_runtime(engine, settings_for(hostile.url, KEY, submit_rate=5.0))
    add_batch(engine, "at-rate", [(T2V, {"prompt": p}) for p in ("a", "b")])
    assert rt.limiter is not None
    assert rt.limiter.acquire(T2V) == 0  # a submit just took a token: the next is 0.21 s away
    # The limiter spaces the next submit (asked again should the machine have stalled as long)...
    wait = next((w for w in (rt.limiter.acquire(T2V) for _ in range(50)) if w > 0), 0.0)
    assert 0 < wait < 0.5
    assert rt.limiter.pause_left() == 0  # ...and that spacing is no pause (it held dispatch)
    assert len(dispatch(rt)) == 2


def test_a_429_on_the_image_upload_is_no_attempt_either(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """A local image goes up through fal's storage API before the submit; fal refusing that upload
    with 429 is the same "slow down", and costs the job nothing either."""
    hostile.route("POST", r"/storage/upload/initiate", json_reply(TOO_MANY, 429))
    image = tmp_path / "still.png"
    Image.new("RGB", (640, 480), (20, 90, 160)).save(image)
    settings = settings_for(hostile.url, KEY, inline_max_bytes=0, retry_base_delay=30, max_attempts=1)
    rt = make_runtime(engine, settings)
    try:
        add_batch(
            engine, "upload-429", [(I2V, {"prompt": "p", "image_url": str(image), "resolution": "480p"})]
        )
        (job_id,) = dispatch(rt)
        assert submit(rt, job_id) == "rate-limited"
    finally:
        rt.client.close()
    after = job(engine, job_id)
    assert (after.state, after.attempts, after.rate_limited_submits) == (S.PENDING, 0, 1)
    assert rt.limiter is not None
    assert rt.limiter.pause_left() > 25  # every submit waits out the pause
    assert hostile.count("POST", r"/fal-ai/.*") == 0


def test_a_round_that_finds_fewer_jobs_than_tokens_leaves_nothing_waiting_for_the_rate(
    engine: Engine, hostile: HostileProvider
) -> None:
    """The bucket holds fewer tokens (the rate, 5) than the outstanding cap has room for (10).
    With nothing due the round is not short of tokens; with more jobs due than tokens, it is."""
    rt = make_runtime(engine, settings_for(hostile.url, KEY, submit_rate=5.0, max_outstanding=10))
    assert rt.bucket is not None
    assert dispatch(rt) == []
    assert not rt.bucket.short  # nothing was due: nothing waits for a token

    add_batch(engine, "more-than-the-rate", [(T2V, {"prompt": f"shot {n}"}) for n in range(7)])
    assert 0 < len(dispatch(rt)) <= 5  # a second's worth of the rate at most
    assert rt.bucket.short  # the others wait for the next tokens


def test_an_idle_conductor_does_not_dispatch_every_20_ms(engine: Engine, hostile: HostileProvider) -> None:
    """With the default submit rate (5 a second) below the outstanding cap (10), every round asked
    for more tokens than the bucket can hold, was "short", and came again 20 ms later: a worker
    with nothing to do ran some 50 dispatch rounds a second (8 % of a core on PostgreSQL, and a
    write of the shared rate's row each time), overnight included."""
    rt = make_runtime(
        engine, settings_for(hostile.url, KEY, submit_rate=5.0, max_outstanding=10, tick_interval=30)
    )
    conductor = Conductor(rt, stream=False)
    stopping = threading.Event()
    runner = threading.Thread(target=conductor.run, args=(stopping,))
    runner.start()
    try:
        # Its first tick, waited for (a guessed while could pass, on a loaded machine, before
        # it), then 1.5 s of idling: what an idle conductor does meanwhile is what is counted.
        deadline = time.monotonic() + 60
        while conductor.stats.ticks < 1:
            assert runner.is_alive(), "the conductor ended before its first tick"
            assert time.monotonic() < deadline, "the conductor never ticked within 60 s"
            time.sleep(0.02)
        time.sleep(1.5)
    finally:
        stopping.set()
        conductor.notify("done", "")  # wake it: it waits for its next tick, 30 s away
        runner.join(timeout=10)
    assert not runner.is_alive()
    assert conductor.stats.ticks == 1
    assert conductor.stats.rounds <= 3  # the first tick's round, not ~75


@pytest.mark.parametrize("limiter", ["local", "redis"])
def test_ordinary_spacing_is_no_pause_and_the_rate_is_kept(
    sqlite_url: str, tmp_path: Path, redis_url: str, limiter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``WANBATCH_SUBMIT_WAIT_MAX`` below the interval between two submits, dispatch read
    the limiter's ordinary spacing (the next token one interval away after every submit) as a
    429's pause and held its bucket back as long again: every job waited two intervals, and the
    rate ran at half its setting (21 s apart at 0.1 a second). No 429 here: dispatch is never
    held, so the submits go out one interval apart, not two."""
    rate = 2.0  # 0.525 s between submits with the default jitter allowance
    held: list[float] = []
    original = RateBucket.hold_off

    def spy(bucket: RateBucket, seconds: float) -> None:
        held.append(seconds)
        original(bucket, seconds)

    monkeypatch.setattr(RateBucket, "hold_off", spy)
    key = f"spacing-{limiter}-{uuid.uuid4().hex}"  # its own limiter keys in the shared Redis
    options = SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0, concurrency_limit=8, rng_seed=5)
    with running_simulator(options) as sim:
        settings = settings_for(
            sim.url,
            key,
            database_url=sqlite_url,
            output_dir=tmp_path / "outputs",
            submit_rate=rate,
            submit_wait_max=0.05,
            **({"limits_url": redis_url} if limiter == "redis" else {}),
        )
        assert isinstance(limiter_for(settings), RedisGCRA if limiter == "redis" else LocalGCRA)
        manifest = tmp_path / "spacing.yaml"
        manifest.write_text(MANIFEST.format(name=f"spacing-{limiter}"), encoding="utf-8")
        submitted = batches.submit_manifest(manifest, settings)
        try:
            report, _stats = process_batch(submitted.batch_id, settings, show_progress=False)
        finally:
            client = redis.Redis.from_url(redis_url)
            client.delete(api_key_rate(settings).key)
            client.close()
        assert sim.ledger()["accepted"] == 6
    assert report["finished"] == report["total"] == 6
    engine = db.make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            query = select(Job.submitted_at).where(Job.batch_id == submitted.batch_id)
            stamps = sorted(at for at in conn.execute(query).scalars() if at is not None)
    finally:
        engine.dispose()
    assert len(stamps) == 6
    # No 429, so dispatch was never held back (before: after every submit, one interval more). The
    # gaps themselves are not asserted: a timing bound would flake on a loaded machine, and the
    # hold is what doubled them (``python -m bench.drain`` measures a drain's pace).
    assert held == []
