"""A runtime's batch scope and the give-back of a stopping process's leases, on both databases.

Issue #9: an embedded `run` of a 3-job manifest sent every pending job of the database (another
batch of 120k jobs that had only been submitted). With ``Runtime.batch_ids`` the steps that send,
download and cancel take only the scope's jobs, while the outstanding cap still counts every
request at fal for the key. And Ctrl-C gives back what the stopping process held, so the next run
picks those jobs up at once instead of after the lease.
"""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine

from jobs import db, store
from jobs.models import utcnow
from jobs.settings import Settings
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids, make_runtime
from worker.steps import Runtime, dispatch, schedule_downloads
from worker.steps.context import DOWNLOAD_QUEUE

S = JobState


def _runtime(engine: Engine, sent: list[str], batch_ids: frozenset[str] | None, **settings: Any) -> Runtime:
    """Dispatch and scheduling hand each job to ``sent`` (neither calls fal)."""
    config = Settings(submit_rate=1000, max_outstanding=10, **settings)
    return make_runtime(
        engine, config, enqueue_submit=sent.append, enqueue_download=sent.append, batch_ids=batch_ids
    )


def _batch(engine: Engine, name: str, n: int) -> tuple[str, list[str]]:
    jobs = [("fal-ai/wan-22", {"prompt": f"{name} {i}"}) for i in range(n)]
    batch_id = add_batch(engine, name, jobs, est_billing_units=Decimal(1), est_usd=Decimal("0.1"))
    return batch_id, job_ids(engine, batch_id)


def _states(engine: Engine, batch_id: str) -> dict[str, int]:
    with db.session_scope(engine) as session:
        return {k: v for k, v in store.counts_by_state(session, batch_id).items() if v}


def _move(engine: Engine, job_id: str, *path: JobState, **fields: Any) -> None:
    with db.session_scope(engine) as session:
        for here, there in itertools.pairwise(path):
            assert store.transition(session, job_id, here, there, **(fields if there == path[-1] else {}))


def test_dispatch_claims_only_the_scope_but_the_cap_counts_every_batch(engine: Engine) -> None:
    other, other_ids = _batch(engine, "other", 20)  # older: first in line without a scope
    mine, _ = _batch(engine, "mine", 20)
    sent: list[str] = []
    rt = _runtime(engine, sent, frozenset({mine}))
    assert len(dispatch(rt)) == 10
    assert _states(engine, other) == {"pending": 20}  # never touched
    with db.session_scope(engine) as session:
        assert {store.get_job(session, j).batch_id for j in sent} == {mine}

    # The account's limit is global: the other batch's requests at fal leave no room.
    sent.clear()
    for job_id in other_ids[:5]:
        _move(engine, job_id, S.PENDING, S.SUBMITTING, S.QUEUED, request_id=f"r-{job_id}")
    mine2, _ = _batch(engine, "mine-2", 5)
    rt2 = _runtime(engine, sent, frozenset({mine2}))
    assert dispatch(rt2) == []  # 10 of mine + 5 of other's at fal: over the cap of 10
    assert _states(engine, mine2) == {"pending": 5}


def test_without_a_scope_every_batch_is_served(engine: Engine) -> None:
    a, _ = _batch(engine, "a", 3)
    b, _ = _batch(engine, "b", 3)
    assert len(dispatch(_runtime(engine, [], None))) == 6  # a distributed worker serves all
    assert _states(engine, a) == {"submitting": 3}
    assert _states(engine, b) == {"submitting": 3}


def test_downloads_are_scheduled_for_the_scope_only(engine: Engine) -> None:
    mine, my_ids = _batch(engine, "mine", 2)
    _, other_ids = _batch(engine, "other", 2)
    for job_id in [*my_ids, *other_ids]:
        _move(engine, job_id, S.PENDING, S.SUBMITTING, S.QUEUED, S.DOWNLOADING)
    queued: list[str] = []
    assert sorted(schedule_downloads(_runtime(engine, queued, frozenset({mine})))) == sorted(my_ids)
    assert sorted(queued) == sorted(my_ids)
    with db.session_scope(engine) as session:
        assert all(store.get_job(session, j).lease_owner is None for j in other_ids)


def test_an_empty_scope_claims_nothing(engine: Engine) -> None:
    _batch(engine, "any", 3)
    with db.session_scope(engine) as session:
        got = store.claim_jobs(
            session, states=[S.PENDING], limit=10, now=utcnow(), owner="x", lease_seconds=60, batch_ids=[]
        )
    assert got == []


def test_release_process_leases_gives_back_exactly_what_the_process_held(engine: Engine) -> None:
    mine, ids = _batch(engine, "mine", 7)
    _, other_ids = _batch(engine, "other", 1)
    me, someone = "host-a:4242:", "host-a:4243:"
    with db.session_scope(engine) as session:

        def lease(job_id: str, owner: str, **fields: Any) -> None:
            job = store.get_job(session, job_id)
            assert store.take_lease(
                session, store.Fence.of(job, owner), now=utcnow(), lease_seconds=600, **fields
            )

        # 0: claimed for submit by this process, POST not started -> pending, attempt given back
        assert store.transition(session, ids[0], S.PENDING, S.SUBMITTING, attempts=1)
        lease(ids[0], me + "1")
        # 1: this process recorded the input: the POST may be in flight -> untouched
        assert store.transition(session, ids[1], S.PENDING, S.SUBMITTING, attempts=1)
        lease(ids[1], me + "2", submitted_input={"prompt": "x"})
        # 2: downloading in a thread of this process -> released
        for here, there in [(S.PENDING, S.SUBMITTING), (S.SUBMITTING, S.QUEUED), (S.QUEUED, S.DOWNLOADING)]:
            assert store.transition(session, ids[2], here, there)
        lease(ids[2], me + "3")
        # 3: a status check of this process -> released
        assert store.transition(session, ids[3], S.PENDING, S.SUBMITTING)
        assert store.transition(session, ids[3], S.SUBMITTING, S.QUEUED, request_id="r3")
        lease(ids[3], me + "1")
        # 4: a download queued in this process's memory (scope's batch) -> released
        for here, there in [(S.PENDING, S.SUBMITTING), (S.SUBMITTING, S.QUEUED), (S.QUEUED, S.DOWNLOADING)]:
            assert store.transition(session, ids[4], here, there)
        lease(ids[4], DOWNLOAD_QUEUE)
        # 5: another process of the same host -> untouched
        assert store.transition(session, ids[5], S.PENDING, S.SUBMITTING, attempts=1)
        lease(ids[5], someone + "1")
        # 6: never leased -> untouched
        # other batch: a queued download that is not ours to give back -> untouched
        for here, there in [(S.PENDING, S.SUBMITTING), (S.SUBMITTING, S.QUEUED), (S.QUEUED, S.DOWNLOADING)]:
            assert store.transition(session, other_ids[0], here, there)
        lease(other_ids[0], DOWNLOAD_QUEUE)

    with db.session_scope(engine) as session:
        got = store.release_process_leases(
            session, me, batch_ids=[mine], queued_owner=DOWNLOAD_QUEUE, worker="test"
        )
    assert (got.unsent, got.released, got.in_flight) == (1, 3, 1)

    with db.session_scope(engine) as session:
        jobs = {job_id: store.get_job(session, job_id) for job_id in [*ids, *other_ids]}
        assert jobs[ids[0]].state == S.PENDING
        assert jobs[ids[0]].attempts == 0
        assert jobs[ids[0]].lease_owner is None
        assert (
            store.job_events(session, ids[0])[-1].reason == "given back: the process stopped before sending"
        )
        assert jobs[ids[1]].state == S.SUBMITTING
        assert jobs[ids[1]].lease_owner == me + "2"  # left to the reconciler
        assert jobs[ids[2]].state == S.DOWNLOADING
        assert jobs[ids[2]].lease_owner is None
        assert jobs[ids[3]].state == S.QUEUED
        assert jobs[ids[3]].lease_owner is None
        assert jobs[ids[4]].lease_owner is None
        assert jobs[ids[5]].lease_owner == someone + "1"
        assert jobs[ids[5]].state == S.SUBMITTING
        assert jobs[ids[6]].state == S.PENDING
        assert jobs[other_ids[0]].lease_owner == DOWNLOAD_QUEUE
        # released jobs are due at once for the next run
        due = store.claim_jobs(
            session, states=[S.DOWNLOADING], limit=10, now=utcnow(), owner="next", lease_seconds=60
        )
        assert {j.id for j in due} == {ids[2], ids[4]}


def test_an_owner_prefix_is_matched_literally(engine: Engine) -> None:
    """``_`` and ``%`` are LIKE wildcards; a host name may contain ``_``."""
    _, ids = _batch(engine, "lit", 2)
    with db.session_scope(engine) as session:
        for job_id, owner in zip(ids, ["my_host:1:7", "myXhost:1:7"], strict=True):
            assert store.transition(session, job_id, S.PENDING, S.SUBMITTING, lease_owner=owner)
        got = store.release_process_leases(session, "my_host:1:")
    assert got.unsent == 1
    with db.session_scope(engine) as session:
        assert store.get_job(session, ids[1]).lease_owner == "myXhost:1:7"
