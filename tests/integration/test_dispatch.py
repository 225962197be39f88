"""Dispatch against a real database: the outstanding cap, and its back-off when fal queues;
which jobs count against the caps, and what `status` says when one holds a batch back.

fal queues whatever it cannot run (accounts run 2 to 40 at once). When requests we sent are
still IN_QUEUE long after, dispatch keeps just one waiting at fal instead of filling the cap.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine

from jobs import batches, db, store
from jobs.cap_holds import CapCheck, cap_note
from jobs.models import utcnow
from jobs.settings import Settings
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids, make_runtime
from worker.conductor import Conductor
from worker.limits import api_key_id
from worker.outage_log import HoldLog
from worker.steps import Runtime, dispatch

S = JobState


def _runtime(
    engine: Engine,
    sent: list[str],
    *,
    batch_ids: frozenset[str] | None = None,
    simulated: bool = False,
    **settings: Any,
) -> Runtime:
    """Dispatch hands each claimed job to ``sent`` (it never calls fal). ``batch_ids``: an
    embedded run's (``simulated``: a ``--simulate`` run's); None: the distributed workers'."""
    config = Settings(**{"submit_rate": 1000, "max_outstanding": 10, **settings})
    return make_runtime(engine, config, enqueue_submit=sent.append, batch_ids=batch_ids, simulated=simulated)


def _batch_of(engine: Engine, n: int, name: str = "dispatch", *, simulated: bool = False) -> list[str]:
    jobs = [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(n)]
    batch_id = add_batch(
        engine, name, jobs, est_billing_units=Decimal(1), est_usd=Decimal("0.1"), simulated=simulated
    )
    return job_ids(engine, batch_id)


def _batch_id(engine: Engine, job_id: str) -> frozenset[str]:
    """The batch of ``job_id``, as a runtime's ``batch_ids``."""
    with db.read_scope(engine) as session:
        return frozenset({store.get_job(session, job_id).batch_id})


def _at_fal(engine: Engine, job_ids: list[str], state: JobState, waited: float) -> None:
    """Move jobs to ``state`` at fal as if submitted ``waited`` seconds ago."""
    with db.session_scope(engine) as session:
        for job_id in job_ids:
            assert store.transition(session, job_id, S.PENDING, S.SUBMITTING)
            assert store.transition(
                session,
                job_id,
                S.SUBMITTING,
                S.QUEUED,
                request_id=f"r-{job_id}",
                submitted_at=utcnow() - timedelta(seconds=waited),
            )
            if state == S.RUNNING:
                assert store.transition(session, job_id, S.QUEUED, S.RUNNING)


def test_dispatch_fills_the_cap_when_nothing_waits_long(engine: Engine) -> None:
    ids = _batch_of(engine, 20)
    _at_fal(engine, ids[:3], S.QUEUED, waited=5)  # queued, but not for long
    sent: list[str] = []
    assert len(dispatch(_runtime(engine, sent, queue_wait_backoff=60))) == 7
    assert len(sent) == 7


def test_dispatch_holds_back_while_requests_wait_in_fals_queue(engine: Engine) -> None:
    ids = _batch_of(engine, 20)
    _at_fal(engine, ids[:3], S.QUEUED, waited=120)  # the account runs fewer than we send
    sent: list[str] = []
    assert dispatch(_runtime(engine, sent, queue_wait_backoff=60)) == []
    assert sent == []


def test_dispatch_keeps_one_waiting_when_the_long_waiters_started_running(engine: Engine) -> None:
    ids = _batch_of(engine, 20)
    _at_fal(engine, ids[:2], S.RUNNING, waited=120)
    _at_fal(engine, ids[2:3], S.QUEUED, waited=90)  # still one long waiter, and it is the only one queued
    rt = _runtime(engine, [], queue_wait_backoff=60)
    assert dispatch(rt) == []  # one request already waits at fal: enough
    with db.session_scope(engine) as session:
        assert store.transition(session, ids[2], S.QUEUED, S.RUNNING)
    assert len(dispatch(rt)) == 7  # nothing waits any more: the full cap again


def test_backoff_off_when_zero(engine: Engine) -> None:
    ids = _batch_of(engine, 20)
    _at_fal(engine, ids[:3], S.QUEUED, waited=600)
    assert len(dispatch(_runtime(engine, [], queue_wait_backoff=0))) == 7


def test_an_embedded_runs_outstanding_cap_is_per_api_key(engine: Engine) -> None:
    """An embedded run sends with its own key only, so another key's requests (another account)
    leave its cap untouched; the distributed leader counts every key instead (its workers may
    each hold another key: test_dispatch_rounds)."""
    ids = _batch_of(engine, 30)
    _at_fal(engine, ids[:8], S.RUNNING, waited=1)
    with db.session_scope(engine) as session:  # those 8 were sent with another account's key
        for job_id in ids[:8]:
            job = store.get_job(session, job_id)
            assert store.update_job_fields(
                session, job_id, expected_version=job.version, api_key_id="other-key"
            )
    sent: list[str] = []
    rt = _runtime(engine, sent, batch_ids=_batch_id(engine, ids[0]), fal_key="key-of-this-deployment")
    assert len(dispatch(rt)) == 10  # the other key's 8 leave this key's cap of 10 untouched
    with db.session_scope(engine) as session:
        mine = {store.get_job(session, job_id).api_key_id for job_id in sent}
    assert mine == {api_key_id(rt.settings)}
    assert "key-of-this-deployment" not in str(next(iter(mine)))
    assert dispatch(rt) == []  # and now this key's cap is full


def _downloading(engine: Engine, job_ids: list[str]) -> None:
    """Move jobs on to ``downloading``: completed at fal, the output not yet stored."""
    _at_fal(engine, job_ids, S.RUNNING, waited=1)
    with db.session_scope(engine) as session:
        for job_id in job_ids:
            assert store.transition(session, job_id, S.RUNNING, S.DOWNLOADING)


def test_stalled_downloads_hold_submits_back(engine: Engine) -> None:
    """Paid outputs must not pile up at fal (where they expire) while downloads stall."""
    ids = _batch_of(engine, 30)
    _downloading(engine, ids[:8])
    rt = _runtime(engine, [], max_download_backlog=10)
    sent = dispatch(rt)
    assert len(sent) == 2  # the cap allows 10, the backlog only 2 more
    with db.session_scope(engine) as session:
        for job_id in sent:  # both complete at fal; their downloads stall too
            assert store.transition(session, job_id, S.SUBMITTING, S.QUEUED, request_id=f"r-{job_id}")
            assert store.transition(session, job_id, S.QUEUED, S.DOWNLOADING)
    assert dispatch(rt) == []  # backlog full: nothing sent, whatever the free slots
    with db.session_scope(engine) as session:
        assert store.transition(session, ids[0], S.DOWNLOADING, S.SUCCEEDED)
    assert len(dispatch(rt)) == 1  # one download done: one more may go


def test_the_download_backlog_defaults_to_the_outstanding_cap(engine: Engine) -> None:
    ids = _batch_of(engine, 30)
    _downloading(engine, ids[:7])
    assert len(dispatch(_runtime(engine, []))) == 3  # max_outstanding 10 - 7 waiting for download


def test_an_embedded_run_counts_only_the_downloads_it_makes_in_the_backlog(engine: Engine) -> None:
    """Another batch's results wait, undownloaded, for that batch's own run (an embedded run
    downloads its own batch only): they must not hold this run's submits back. They held every
    later run back for ever, `pending` and silent, after a run was stopped during its downloads."""
    _downloading(engine, _batch_of(engine, 5, "stopped-during-downloads"))
    mine = _batch_of(engine, 3, "mine")
    workers = _runtime(engine, [], max_download_backlog=5)
    assert dispatch(workers) == []  # the workers download every batch: theirs count
    sent: list[str] = []
    run = _runtime(engine, sent, batch_ids=_batch_id(engine, mine[0]), max_download_backlog=5)
    assert sorted(dispatch(run)) == sorted(mine)


def test_the_workers_are_not_held_back_by_a_simulations_downloads(engine: Engine) -> None:
    """Only its own `--simulate` run downloads a simulation's videos (from its simulator)."""
    _downloading(engine, _batch_of(engine, 5, "rehearsal", simulated=True))
    paid = _batch_of(engine, 5, "paid")
    sent: list[str] = []
    assert len(dispatch(_runtime(engine, sent, max_download_backlog=5))) == 5  # the backlog is empty
    assert sorted(sent) == sorted(paid)


def test_jobs_waiting_for_their_download_hold_no_outstanding_slot(engine: Engine) -> None:
    """Done at fal, a job is no longer at fal: only the download backlog counts it."""
    _downloading(engine, _batch_of(engine, 8, "done-at-fal"))
    assert len(dispatch(_runtime(engine, [], max_download_backlog=100))) == 0  # nothing else pending
    mine = _batch_of(engine, 20, "mine")
    run = _runtime(engine, [], batch_ids=_batch_id(engine, mine[0]), max_download_backlog=100)
    assert len(dispatch(run)) == 10  # the whole outstanding cap


def test_a_simulation_counts_only_its_own_requests_and_downloads(engine: Engine) -> None:
    """Every simulation sends the simulator's key, but each `--simulate` run has a simulator of
    its own: the requests and results an earlier one left (its simulator exited with its process)
    are at no provider this run talks to, and never move on while it runs."""
    earlier = _batch_of(engine, 4, "interrupted-rehearsal", simulated=True)
    _at_fal(engine, earlier[:2], S.RUNNING, waited=1)
    _downloading(engine, earlier[2:])
    mine = _batch_of(engine, 5, "rehearsal", simulated=True)
    sent: list[str] = []
    config = {"max_outstanding": 2, "max_download_backlog": 2}
    run = _runtime(engine, sent, batch_ids=_batch_id(engine, mine[0]), simulated=True, **config)
    assert len(dispatch(run)) == 2  # both caps hold 2: none of the earlier simulation's counts
    assert set(sent) <= set(mine)
    assert dispatch(run) == []  # its own two requests fill its cap


def _held(engine: Engine, job_id: str, **settings: Any) -> str | None:
    """The ``phase_reason`` `status` gives the batch of ``job_id`` with ``settings`` (and its key)."""
    config = Settings(**settings)
    check = CapCheck.of(config, api_key_id(config))
    with db.read_scope(engine) as session:
        report = batches.batch_report(session, store.get_job(session, job_id).batch_id, caps=check)
    assert report["phase"] == "active"
    return report["phase_reason"]


def test_status_says_which_cap_holds_a_batch_back_and_whose_jobs_fill_it(engine: Engine) -> None:
    other = _batch_of(engine, 2, "other")
    _at_fal(engine, other, S.RUNNING, waited=1)
    mine = _batch_of(engine, 3, "mine")
    run = _runtime(engine, [], batch_ids=_batch_id(engine, mine[0]), max_outstanding=2)
    assert dispatch(run) == []
    assert run.capped
    assert _held(engine, mine[0], max_outstanding=2) == (
        "submits held back: the outstanding cap is full (2 of 2, WANBATCH_MAX_OUTSTANDING): requests "
        "at fal (2 of batch other); sending resumes as fal finishes them: the cap is shared with "
        "batch other, and each `run` sends its own batch's jobs into the slots it finds free; or "
        "raise WANBATCH_MAX_OUTSTANDING if your fal account runs more at once"
    )
    assert _held(engine, mine[0], max_outstanding=3) is None  # room for one more
    assert _held(engine, other[0], max_outstanding=2) is None  # nothing of its own waits to be sent
    # An endpoint's own cap, with this batch's jobs waiting for it.
    per_endpoint = {"max_outstanding_per_endpoint": {"fal-ai/wan-22": 1}}
    assert _held(engine, mine[0], **per_endpoint) == (
        "submits held back: the outstanding cap of fal-ai/wan-22 is full (2 of 1, "
        "WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT): requests at fal (2 of batch other); sending "
        "resumes as fal finishes them: the cap is shared with batch other, and each `run` sends its "
        "own batch's jobs into the slots it finds free; or raise WANBATCH_MAX_OUTSTANDING_PER_ENDPOINT "
        "if your fal account runs more at once"
    )


def test_status_says_when_the_batchs_own_downloads_hold_it_back_but_not_its_own_requests(
    engine: Engine,
) -> None:
    mine = _batch_of(engine, 6, "mine")
    _downloading(engine, mine[:2])
    assert _held(engine, mine[0], max_download_backlog=2) == (
        "submits held back: the download backlog is full (2 of 2, WANBATCH_MAX_DOWNLOAD_BACKLOG): "
        "jobs wait for their download (2 of this batch); sending resumes as they are stored (a full "
        "disk or a slow link stalls them), or raise WANBATCH_MAX_DOWNLOAD_BACKLOG"
    )
    _at_fal(engine, mine[2:4], S.RUNNING, waited=1)
    # Full of its own requests, the cap is at work for the batch: its counts say so already.
    assert _held(engine, mine[0], max_outstanding=2, max_download_backlog=3) is None


def test_with_workers_the_explanation_counts_every_keys_requests_as_their_leader_does(
    engine: Engine,
) -> None:
    """The workers' leader counts the requests of every key against WANBATCH_MAX_OUTSTANDING (a
    worker with another FAL_KEY sends with its own): what `status` and a watching `run` say holds
    the batch back counts the same, not only this process's key ("1 of 3" while dispatch saw 3
    of 3 and sent nothing). An embedded run's note stays per key, as its dispatch is."""
    from worker.running import _CapWatch

    other = _batch_of(engine, 2, "other-key")
    _at_fal(engine, other, S.RUNNING, waited=1)
    with db.session_scope(engine) as session:  # sent by a worker with another FAL_KEY
        for job_id in other:
            job = store.get_job(session, job_id)
            assert store.update_job_fields(
                session, job_id, expected_version=job.version, api_key_id="another-workers-key"
            )
    mine = _batch_of(engine, 3, "mine")
    _at_fal(engine, mine[:1], S.RUNNING, waited=1)
    leader = _runtime(engine, [], max_outstanding=3)
    assert dispatch(leader) == []  # 3 of 3 at fal, whichever key sent them
    assert leader.capped
    workers: dict[str, Any] = {"broker_url": "redis://127.0.0.1:6379/0", "max_outstanding": 3}
    note = (
        "submits held back: the outstanding cap is full (3 of 3, WANBATCH_MAX_OUTSTANDING): requests "
        "at fal (2 of batch other-key, 1 of this batch); sending resumes as fal finishes them: the "
        "cap is shared with batch other-key, and each slot fal frees goes to the batch with jobs to "
        "send that holds the fewest (normal priority before `priority: low`); or raise "
        "WANBATCH_MAX_OUTSTANDING if your fal account runs more at once"
    )
    assert _held(engine, mine[0], **workers) == note  # status
    config = Settings(**workers)
    watch = _CapWatch(next(iter(_batch_id(engine, mine[0]))), config, None)  # run, watching
    with db.read_scope(engine) as session:
        current = batches.batch_progress(session, watch.batch_id)
        assert cap_note(watch.holds(session, current), watch.batch_id) == note
    # Embedded, a run sends with its own key only: the other key's requests hold it back nowhere.
    assert _held(engine, mine[0], max_outstanding=3) is None
    embedded = _runtime(engine, [], batch_ids=_batch_id(engine, mine[0]), max_outstanding=3)
    assert len(dispatch(embedded)) == 2


class _Clock:
    """Monotonic seconds a test moves on by hand (the holds' :class:`HoldLog` reads them)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if getattr(r, "event", None) == event]


def test_a_lasting_queue_backoff_is_said_at_most_once_a_minute_and_its_end_once(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A tick leader whose requests wait in fal's queue ran a round every second or so, each
    logging the same back-off line: 57 a minute, 80,000 a day for one unchanged state."""
    ids = _batch_of(engine, 40)
    _at_fal(engine, ids[:1], S.RUNNING, waited=120)
    _at_fal(engine, ids[1:4], S.QUEUED, waited=120)  # fal runs 1, 3 wait: keep 1
    clock = _Clock()
    rt = _runtime(engine, [], queue_wait_backoff=60)
    rt.queue_hold = HoldLog(clock=clock)
    with caplog.at_level(logging.INFO, logger="worker.steps.dispatch"):
        for _ in range(180):  # three minutes of a round a second
            assert dispatch(rt) == []
            clock.now += 1
        said = _lines(caplog, "dispatch.queue_backoff")
        assert len(said) == 3  # when it began, then once a minute
        assert said[0] == "requests wait in fal's queue over 60s: keeping 1 waiting (3 wait; room 0 of 6)"
        assert said[1].endswith("; held back for 60s")

        _at_fal(engine, ids[4:8], S.RUNNING, waited=120)  # fal runs 5 now (a higher tier): keep 2
        assert len(dispatch(rt)) == 0
        assert len(_lines(caplog, "dispatch.queue_backoff")) == 4  # a material change: at once

        with db.session_scope(engine) as session:  # the waiting ones start: nothing waits long
            for job_id in ids[1:4]:
                assert store.transition(session, job_id, S.QUEUED, S.RUNNING)
        for _ in range(5):
            dispatch(rt)
            clock.now += 1
    assert _lines(caplog, "dispatch.queue_backoff_ended") == [
        "no request waits in fal's queue over 60s any more: submits fill the cap again (held back for 180s)"
    ]


def test_a_full_download_backlog_is_said_at_most_once_a_minute_and_its_end_once(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    ids = _batch_of(engine, 30)
    _downloading(engine, ids[:5])
    clock = _Clock()
    rt = _runtime(engine, [], max_download_backlog=5)
    rt.backlog_hold = HoldLog(clock=clock)
    with caplog.at_level(logging.INFO, logger="worker.steps.dispatch"):
        for _ in range(150):
            assert dispatch(rt) == []
            clock.now += 1
        assert _lines(caplog, "dispatch.download_backlog") == [
            "5 jobs wait for their download (bound 5): holding submits",
            "5 jobs wait for their download (bound 5): holding submits; held back for 60s",
            "5 jobs wait for their download (bound 5): holding submits; held back for 120s",
        ]
        with db.session_scope(engine) as session:
            assert store.transition(session, ids[0], S.DOWNLOADING, S.SUCCEEDED)
        assert len(dispatch(rt)) == 1
    assert _lines(caplog, "dispatch.download_backlog_ended") == [
        "4 jobs wait for their download (bound 5): submits resume (held back for 150s)"
    ]


def test_a_worker_that_stops_leading_forgets_the_holds_it_said(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the tick leader dispatches: a worker that loses the lead runs no more rounds, so the
    hold it said never ended in its log. Kept, it read as one hold when that worker led again,
    however long after: its next round said "submits resume (held back for 7200s)" of a hold it
    had stopped watching two hours before (or went on with it, "held back for 7200s"). A worker
    that no longer leads forgets its holds: leading again, it says what it finds afresh."""
    ids = _batch_of(engine, 30)
    _downloading(engine, ids[:5])
    clock = _Clock()
    rt = _runtime(engine, [], max_download_backlog=5)
    rt.backlog_hold = HoldLog(clock=clock)
    with caplog.at_level(logging.INFO, logger="worker.steps.dispatch"):
        assert dispatch(rt) == []
        assert _lines(caplog, "dispatch.download_backlog") == [
            "5 jobs wait for their download (bound 5): holding submits"
        ]
        # another worker takes the lead: this one's loop finds it does not lead, and rounds stop
        workers = Conductor(rt, stream=False)
        workers.run(threading.Event(), on_progress=lambda: True, leads=lambda: False, resilient=True)
        workers.close()
        clock.now += 7200  # two hours later it leads again, the backlog drained meanwhile
        with db.session_scope(engine) as session:
            for job_id in ids[:5]:
                assert store.transition(session, job_id, S.DOWNLOADING, S.SUCCEEDED)
        assert len(dispatch(rt)) == 5
        assert _lines(caplog, "dispatch.download_backlog_ended") == []
        _downloading(engine, ids[-5:])  # full again: a hold that begins now, said as one
        assert dispatch(rt) == []
    assert _lines(caplog, "dispatch.download_backlog")[-1] == (
        "5 jobs wait for their download (bound 5): holding submits"
    )
