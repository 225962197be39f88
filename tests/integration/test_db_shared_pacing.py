"""Processes that share only the database (no limiter Redis) share ``WANBATCH_SUBMIT_RATE``
and fal's 429 pauses through it.

* Two runtimes (two ``wanbatch run`` on one database, each with its own in-process limiter,
  told apart by their process identities) sent up to about twice the rate in one second: the
  shared bucket paces claims and holds a second's submits, and each spaced its POSTs in its own
  memory. Once their heartbeats show each other, every POST takes its slot from the database.
* A 429 heard by one paused only that one; it is now written on the shared row, and the
  other's dispatch claims nothing until it ends.
* A process alone on its database takes no slot there: no extra transaction per submit.
* A slot is taken on a row no dispatch round locks (PostgreSQL: a submit waited for the whole
  round that wrote the key's bucket), and its time is read once the slot's row is held.
"""

from __future__ import annotations

import bisect
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from jobs import db, store
from tests.hostile import HostileProvider, Recorded, json_reply
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.limits import LocalGCRA
from worker.steps import Runtime, dispatch, dispatch_in, shared_pacing, submit
from worker.steps.shared_pacing import db_paced, note_peers

KEY = "db-pacing-key-7e1a:5b0c2d9e8f7a6b5c4d3e2f1a0b9c8d7e"
T2V = "fal-ai/wan-22"
RATE = 4.0


def _runtime(engine: Engine, url: str, tmp_path: Path, owner: str, **overrides: float) -> Runtime:
    settings = settings_for(url, KEY, output_dir=tmp_path / "out", **{"max_outstanding": 100, **overrides})
    rt = make_runtime(engine, settings)
    assert isinstance(rt.limiter, LocalGCRA)  # no limiter Redis: only the database is shared
    rt.owner = owner  # another process
    return rt


def _beat(rt: Runtime) -> bool:
    """The conductor's heartbeat of ``rt``'s process: its row, and whether it sees another."""
    from jobs import store
    from jobs.models import EVERY_BATCH, utcnow

    with db.session_scope(rt.engine) as session:
        store.record_heartbeat(session, rt.beat_owner, {EVERY_BATCH}, utcnow())
        return note_peers(session, rt)


def densest_second(times: list[float]) -> int:
    """The most POSTs in any window of one second (``[t, t + 1)``)."""
    times = sorted(times)
    return max((bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)), default=0)


def _accept_and_time(hostile: HostileProvider, times: list[float]) -> None:
    counter = iter(range(10_000))
    lock = threading.Lock()

    def reply(request: Recorded, sock: socket.socket) -> None:
        with lock:
            times.append(time.monotonic())
            n = next(counter)
        base = f"{hostile.url}/{T2V}/requests/req-{n}"
        urls = {"status_url": f"{base}/status", "response_url": base, "cancel_url": f"{base}/cancel"}
        # Running at once: fal queues nothing of ours, so dispatch keeps no room back for it.
        json_reply({"request_id": f"req-{n}", "status": "IN_PROGRESS", **urls})(request, sock)

    hostile.route("POST", rf"/{T2V}", reply)


def test_two_runs_on_one_database_send_at_most_the_rate_in_any_second(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    times: list[float] = []
    _accept_and_time(hostile, times)
    first = _runtime(engine, hostile.url, tmp_path, "host-a:1:", submit_rate=RATE)
    second = _runtime(engine, hostile.url, tmp_path, "host-b:2:", submit_rate=RATE)
    assert dispatch(first) == []  # nothing due yet: the shared bucket is full, a second's submits
    _beat(first)  # alone so far: nothing shared
    assert not db_paced(first)
    assert _beat(second)  # sees the first: the pacing is shared...
    assert _beat(first)  # ...and the first sees the second at its next beat
    assert db_paced(first)
    assert db_paced(second)
    add_batch(engine, "many", [(T2V, {"prompt": f"p{i}", "resolution": "480p"}) for i in range(60)])

    sent: dict[str, int] = {"first": 0, "second": 0}
    submits: list[threading.Thread] = []

    def send(name: str, rt: Runtime, job_id: str) -> None:
        if submit(rt, job_id) == "submitted":
            sent[name] += 1

    def run(name: str, rt: Runtime, end: float) -> None:
        # As an embedded run does: each claimed job's submit on a thread of its own, so the jobs
        # one round claims wait for their slots side by side.
        while time.monotonic() < end:
            for job_id in dispatch(rt):
                thread = threading.Thread(target=send, args=(name, rt, job_id))
                thread.start()
                submits.append(thread)
            time.sleep(0.01)

    end = time.monotonic() + 3.0
    pairs = (("first", first), ("second", second))
    loops = [threading.Thread(target=run, args=(n, rt, end)) for n, rt in pairs]
    for loop in loops:
        loop.start()
    for loop in loops:
        loop.join(timeout=60)
    for thread in submits:
        thread.join(timeout=60)

    assert sent["first"]  # both sent: the rate was shared, not hoarded
    assert sent["second"]
    # One slot per (1 + jitter) / rate in the database's time; these are the times fal heard
    # them, so one POST slower on its way than the next can bring one more into a second.
    assert densest_second(times) <= RATE + 1, sorted(round(t - min(times), 3) for t in times)
    assert len(times) >= 9  # and the rate is used: about 3 s at 4/s


def test_a_429_heard_by_one_run_holds_the_other(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    hostile.route("POST", rf"/{T2V}", json_reply({"detail": "Too many requests"}, 429, {"Retry-After": "30"}))
    refused = _runtime(engine, hostile.url, tmp_path, "host-a:1:", submit_rate=100.0)
    other = _runtime(engine, hostile.url, tmp_path, "host-b:2:", submit_rate=100.0)
    _beat(refused)
    assert _beat(other)
    add_batch(engine, "first", [(T2V, {"prompt": "a lighthouse", "resolution": "480p"})])
    (first,) = dispatch(refused)
    add_batch(engine, "second", [(T2V, {"prompt": f"p{i}", "resolution": "480p"}) for i in range(2)])
    claimed = dispatch(other)  # claimed before the 429
    assert len(claimed) == 2
    assert submit(refused, first) == "rate-limited"

    assert isinstance(other.limiter, LocalGCRA)
    assert other.limiter.pause_left() == 0  # its own limiter heard nothing: only the database did
    # A job it claimed before the 429 does not go out: its slot comes after the pause.
    assert submit(other, claimed[0]) == "rate-limited"
    add_batch(engine, "later", [(T2V, {"prompt": f"q{i}", "resolution": "480p"}) for i in range(3)])
    assert dispatch(other) == []  # and its dispatch claims nothing meanwhile
    assert other.bucket is not None
    assert 25 < other.bucket.until_next() <= 30.5  # it looks again when the pause ends
    assert hostile.count("POST", r".*") == 1


def test_a_run_alone_on_its_database_takes_no_slot_there(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No other process: each submit costs what it did, no transaction more."""
    times: list[float] = []
    _accept_and_time(hostile, times)
    add_batch(engine, "alone", [(T2V, {"prompt": f"p{i}", "resolution": "480p"}) for i in range(3)])
    rt = _runtime(engine, hostile.url, tmp_path, "host-a:1:", submit_rate=RATE)
    assert not _beat(rt)
    assert not db_paced(rt)
    # Counted where a slot is taken, not in the statements a listener sees: on SQLite a
    # listener does not see every statement the store runs.
    slots: list[str] = []
    take_slot, take_pace_slot = shared_pacing.take_slot, store.take_pace_slot

    def counted_slot(*args: Any, **kwargs: Any) -> float:
        slots.append("take_slot")
        return take_slot(*args, **kwargs)

    def counted_pace_slot(*args: Any, **kwargs: Any) -> tuple[bool, float]:
        slots.append("take_pace_slot")
        return take_pace_slot(*args, **kwargs)

    monkeypatch.setattr(shared_pacing, "take_slot", counted_slot)
    monkeypatch.setattr(store, "take_pace_slot", counted_pace_slot)
    for job_id in dispatch(rt):
        assert submit(rt, job_id) == "submitted"
    assert len(times) == 3
    assert slots == []


def _sharing(engine: Engine, url: str, tmp_path: Path, rate: float) -> tuple[Runtime, Runtime]:
    """Two runs on ``engine`` that have seen each other: their POSTs take slots from the database."""
    first = _runtime(engine, url, tmp_path, "host-a:1:", submit_rate=rate)
    second = _runtime(engine, url, tmp_path, "host-b:2:", submit_rate=rate)
    _beat(first)
    assert _beat(second)
    assert _beat(first)
    assert db_paced(first)
    assert db_paced(second)
    return first, second


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite writes one at a time
def test_a_slot_does_not_wait_for_a_dispatch_round(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """A dispatch round keeps the key's bucket row locked from its grant to its commit (its
    claims in between): a slot taken on that row waited for the whole round."""
    first, second = _sharing(engine, hostile.url, tmp_path, 200.0)
    assert shared_pacing.take_slot(second, 10.0) == 0.0  # the key's rows are there
    add_batch(engine, "many", [(T2V, {"prompt": f"p{i}", "resolution": "480p"}) for i in range(20)])
    took: list[float] = []
    slot = threading.Thread(target=lambda: took.append(shared_pacing.take_slot(second, 10.0)))
    with db.session_scope(engine) as session:
        round_ = dispatch_in(session, first)  # the round, not committed yet
        assert round_.sent  # it took submits from the bucket
        slot.start()
        slot.join(timeout=5.0)
        waited = slot.is_alive()  # still waiting: for this round's commit
    slot.join(timeout=30.0)
    assert not waited, "the submit's slot waited for the dispatch round to commit"
    assert took == [0.0]


def test_a_slot_is_timed_from_when_it_holds_the_row(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submit that waited for another transaction on the key's pacing row (a 429 being
    written, another's slot) times its slot from when it got the row, not from before: it
    slept on top of that wait until a slot already past."""
    held, lock_for = 0.6, 0.9
    first, second = _sharing(engine, hostile.url, tmp_path, 200.0)
    assert shared_pacing.take_slot(second, 10.0) == 0.0  # the key's rows are there
    slots: list[tuple[bool, float]] = []  # what the database answered: taken, seconds to sleep
    real = store.take_pace_slot

    def recorded(*args: Any, **kwargs: Any) -> tuple[bool, float]:
        slots.append(real(*args, **kwargs))
        return slots[-1]

    monkeypatch.setattr(store, "take_pace_slot", recorded)
    took: list[float] = []
    slot = threading.Thread(target=lambda: took.append(shared_pacing.take_slot(second, 10.0)))
    with db.session_scope(engine) as session:
        shared_pacing.hold(session, first, held)  # a 429: held for 0.6 s, from now
        start = time.monotonic()
        slot.start()
        time.sleep(lock_for)  # the 429's transaction goes on, the row locked
    slot.join(timeout=30.0)
    elapsed = time.monotonic() - start
    assert took == [0.0]
    assert elapsed >= lock_for - 0.05  # it did wait for the row
    # Its slot is when it got the row (the hold over by then): no sleep on top of the wait
    # (timed from before it, it slept until 0.6 s after that, 1.5 s in all). Asked of what
    # the database answered, not of the wall clock: a loaded machine only makes the row come
    # later, past the hold all the more.
    assert slots == [(True, 0.0)], slots
