"""Processes that share only the database (no limiter Redis) share ``WANBATCH_SUBMIT_RATE``
and fal's 429 pauses through it.

* Two runtimes (two ``wanbatch run`` on one database, each with its own in-process limiter)
  claimed up to about twice the rate in one second: the shared bucket held a second's submits,
  a burst on top of its refill. It now holds a tenth of a second's (at least one), so at these
  rates every claim, whichever process makes it, is ``1/rate`` after the previous one.
* A 429 heard by one paused only that one (its pause lived in its own memory); it is now
  written on the shared row, and the other's dispatch claims nothing until it ends.
"""

from __future__ import annotations

import bisect
import time
from pathlib import Path

from sqlalchemy import Engine

from tests.hostile import HostileProvider, json_reply
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.limits import LocalGCRA
from worker.steps import Runtime, dispatch, submit

KEY = "db-pacing-key-7e1a:5b0c2d9e8f7a6b5c4d3e2f1a0b9c8d7e"
T2V = "fal-ai/wan-22"
RATE = 4.0


def _runtime(engine: Engine, url: str, tmp_path: Path, owner: str, **overrides: float) -> Runtime:
    settings = settings_for(url, KEY, output_dir=tmp_path / "out", **{"max_outstanding": 100, **overrides})
    rt = make_runtime(engine, settings)
    assert isinstance(rt.limiter, LocalGCRA)  # no limiter Redis: only the database is shared
    rt.owner = owner  # another process
    return rt


def densest_second(times: list[float]) -> int:
    """The most claims in any window of one second (``[t, t + 1)``)."""
    times = sorted(times)
    return max((bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)), default=0)


def test_two_runs_on_one_database_claim_at_most_the_rate_in_any_second(
    engine: Engine, tmp_path: Path
) -> None:
    add_batch(engine, "many", [(T2V, {"prompt": f"p{i}", "resolution": "480p"}) for i in range(40)])
    first = _runtime(engine, "http://127.0.0.1:9", tmp_path, "host-a:1:", submit_rate=RATE)
    second = _runtime(engine, "http://127.0.0.1:9", tmp_path, "host-b:2:", submit_rate=RATE)
    claims: dict[str, list[float]] = {"first": [], "second": []}
    end = time.monotonic() + 2.6
    while time.monotonic() < end:
        for name, rt in (("first", first), ("second", second)):
            sent = dispatch(rt)
            at = time.monotonic()
            claims[name].extend(at for _ in sent)
        time.sleep(0.01)

    every = claims["first"] + claims["second"]
    assert claims["first"]  # both claimed: the rate was shared, not hoarded
    assert claims["second"]
    # Claims are 1/rate apart in the database's time; these are the times each round returned,
    # so one round slower than the next can bring one more claim into a second: rate + 1 at most.
    assert densest_second(every) <= RATE + 1, sorted(round(t - min(every), 3) for t in every)
    # And the rate is used, not starved: about 2.6 s at 4/s, from one claim at the start.
    assert len(every) >= 9


def test_a_429_heard_by_one_run_pauses_the_other(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    hostile.route("POST", rf"/{T2V}", json_reply({"detail": "Too many requests"}, 429, {"Retry-After": "30"}))
    add_batch(engine, "shared", [(T2V, {"prompt": f"p{i}", "resolution": "480p"}) for i in range(6)])
    refused = _runtime(engine, hostile.url, tmp_path, "host-a:1:", submit_rate=100.0)
    other = _runtime(engine, hostile.url, tmp_path, "host-b:2:", submit_rate=100.0)
    job_ids = dispatch(refused)
    assert job_ids
    assert submit(refused, job_ids[0]) == "rate-limited"

    add_batch(engine, "later", [(T2V, {"prompt": f"q{i}", "resolution": "480p"}) for i in range(3)])
    assert isinstance(other.limiter, LocalGCRA)
    assert other.limiter.pause_left() == 0  # its own limiter heard nothing: only the database did
    assert dispatch(other) == []  # the pause holds it back all the same
    assert other.bucket is not None
    assert 25 < other.bucket.until_next() <= 30.5  # and it looks again when the pause ends
    assert hostile.count("POST", r".*") == 1
