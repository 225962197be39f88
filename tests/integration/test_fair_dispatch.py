"""Several batches with jobs to send share the outstanding cap (real PostgreSQL and SQLite).

Claimed oldest first across every batch, the batch submitted first took every slot fal freed
until its last job was sent: a 10-job batch submitted after a 2,000-job one waited for all of
it (the distributed workers, whose leader claims for every batch), and a ``priority: low``
batch submitted first held normal ones back. Now each slot goes to a normal-priority batch
before a low one, and among them to the batch with the fewest requests at fal; a batch's own
jobs go in item order.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, update

from jobs import batches, db, store
from jobs.cap_holds import CapCheck, cap_holds, cap_note
from jobs.models import Batch, Job, utcnow
from jobs.settings import Settings
from jobs.states import JobState
from jobs.store.due import DueBatch, _share
from tests.step_runtime import add_batch, job_ids, make_runtime
from worker.limits import api_key_id
from worker.steps import Runtime, dispatch

S = JobState


def _runtime(
    engine: Engine, sent: list[str], *, batch_ids: frozenset[str] | None = None, **settings: Any
) -> Runtime:
    """Dispatch hands each claimed job to ``sent`` (it never calls fal); ``batch_ids`` None:
    the distributed workers' leader, which claims for every batch."""
    config = Settings(**{"submit_rate": 1000, "max_outstanding": 10, **settings})
    return make_runtime(engine, config, enqueue_submit=sent.append, batch_ids=batch_ids)


def _batch(
    engine: Engine, name: str, n: int, *, hours_ago: float, priority: str = "normal"
) -> tuple[str, list[str]]:
    """A batch of ``n`` jobs submitted ``hours_ago`` (its jobs too), at ``priority``."""
    jobs = [("fal-ai/wan-22", {"prompt": f"{name} {i}"}) for i in range(n)]
    batch_id = add_batch(engine, name, jobs, est_billing_units=Decimal(1), est_usd=Decimal("0.1"))
    at = utcnow() - timedelta(hours=hours_ago)
    with db.session_scope(engine) as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(created_at=at, priority=priority))
        session.execute(update(Job).where(Job.batch_id == batch_id).values(created_at=at))
    return batch_id, job_ids(engine, batch_id)


def _finish(engine: Engine, job_ids: list[str]) -> None:
    """fal finished these requests (sent by dispatch): their slots are free again."""
    with db.session_scope(engine) as session:
        for job_id in job_ids:
            assert store.transition(session, job_id, S.SUBMITTING, S.QUEUED, request_id=f"r-{job_id}")
            assert store.transition(session, job_id, S.QUEUED, S.DOWNLOADING)
            assert store.transition(session, job_id, S.DOWNLOADING, S.SUCCEEDED)


def _at_fal(engine: Engine, job_ids: list[str]) -> None:
    """These jobs' requests are queued at fal (sent before the test's rounds)."""
    with db.session_scope(engine) as session:
        for job_id in job_ids:
            assert store.transition(session, job_id, S.PENDING, S.SUBMITTING)
            assert store.transition(session, job_id, S.SUBMITTING, S.QUEUED, request_id=f"r-{job_id}")


def _of(sent: list[str], *batches: list[str]) -> list[int]:
    """How many of ``sent`` belong to each of ``batches`` (their job ids)."""
    return [sum(job_id in ids for job_id in sent) for ids in batches]


def test_a_later_small_batch_gets_half_the_free_slots_from_the_first_round(engine: Engine) -> None:
    _big, big = _batch(engine, "overnight", 200, hours_ago=1)
    _small, small = _batch(engine, "urgent", 10, hours_ago=0)
    sent: list[str] = []
    dispatch(_runtime(engine, sent))
    assert _of(sent, big, small) == [5, 5]
    assert [j for j in sent if j in big] == big[:5]  # each batch's own jobs in item order
    assert [j for j in sent if j in small] == small[:5]


def test_slots_fal_frees_go_to_the_batch_with_the_fewest_requests_at_fal(engine: Engine) -> None:
    """The audit's case: the big batch holds the whole cap when the small one is submitted; each
    slot fal frees then goes to the small one until both hold as many, then they take turns."""
    _big, big = _batch(engine, "overnight", 200, hours_ago=1)
    sent: list[str] = []
    rt = _runtime(engine, sent)
    dispatch(rt)
    assert sent == big[:10]  # alone, the big batch fills the cap
    _small, small = _batch(engine, "urgent", 10, hours_ago=0)
    taken: list[str] = []
    for _round in range(6):  # fal finishes the oldest request; a round sends one job
        _finish(engine, [sent[0]])
        del sent[0]
        before = len(sent)
        dispatch(rt)
        taken += sent[before:]
    assert taken[:5] == small[:5]  # the first five freed slots: the small batch's, in item order
    assert taken[5] in big  # 5 and 5 at fal: the older batch wins the tie


def test_a_low_priority_batch_gets_slots_only_when_no_normal_one_has_jobs_to_send(engine: Engine) -> None:
    _low, low = _batch(engine, "low", 400, hours_ago=2, priority="low")
    _normal, normal = _batch(engine, "normal", 12, hours_ago=0)
    sent: list[str] = []
    rt = _runtime(engine, sent)
    dispatch(rt)
    assert sent == normal[:10]  # the low batch, submitted first and holding nothing, waits
    _finish(engine, sent[:4])
    dispatch(rt)
    assert sent[10:] == [*normal[10:12], *low[:2]]  # the normal batch's last two, then the low one


def test_a_normal_batch_holding_more_at_fal_still_goes_before_a_low_one(engine: Engine) -> None:
    _batch(engine, "low", 50, hours_ago=2, priority="low")
    _normal, normal = _batch(engine, "normal", 50, hours_ago=0)
    _at_fal(engine, normal[:9])
    sent: list[str] = []
    dispatch(_runtime(engine, sent))
    assert sent == [normal[9]]


def test_paused_and_closed_batches_take_no_share(engine: Engine) -> None:
    _paused, paused = _batch(engine, "paused", 20, hours_ago=1)
    _open, open_ = _batch(engine, "open", 20, hours_ago=0)
    with db.session_scope(engine) as session:
        store.set_paused_by_user(session, _paused, True)
    sent: list[str] = []
    dispatch(_runtime(engine, sent))
    assert sent == open_[:10]
    assert not set(sent) & set(paused)


def test_an_embedded_run_of_several_batches_shares_between_them(engine: Engine) -> None:
    a_id, a = _batch(engine, "a", 30, hours_ago=1)
    b_id, b = _batch(engine, "b", 30, hours_ago=0)
    _c_id, c = _batch(engine, "c", 30, hours_ago=2)  # not this run's: never claimed by it
    sent: list[str] = []
    dispatch(_runtime(engine, sent, batch_ids=frozenset({a_id, b_id})))
    assert _of(sent, a, b, c) == [5, 5, 0]


def test_an_embedded_run_of_one_batch_sends_its_jobs_in_item_order(engine: Engine) -> None:
    a_id, a = _batch(engine, "a", 30, hours_ago=0)
    _b_id, _b = _batch(engine, "b", 30, hours_ago=1)
    sent: list[str] = []
    dispatch(_runtime(engine, sent, batch_ids=frozenset({a_id})))
    assert sent == a[:10]


def test_due_retries_share_the_slots_too(engine: Engine) -> None:
    _big, big = _batch(engine, "big", 40, hours_ago=1)
    _small, small = _batch(engine, "small", 4, hours_ago=0)
    with db.session_scope(engine) as session:  # the small batch's jobs wait for a retry, now due
        for job_id in small:
            assert store.transition(session, job_id, S.PENDING, S.SUBMITTING)
            assert store.transition(session, job_id, S.SUBMITTING, S.RETRY_WAIT, next_attempt_at=utcnow())
    sent: list[str] = []
    dispatch(_runtime(engine, sent, max_outstanding=6))
    assert _of(sent, big, small) == [3, 3]


# --------------------------------------------------------------------------- the sharing rule itself


def _due_batch(name: str, at_fal: int, *, low: bool = False, age: int = 0) -> DueBatch:
    return DueBatch(name, low, at_fal, datetime(2030, 1, 1) - timedelta(minutes=age))


def test_share_fills_the_emptiest_batch_first_and_keeps_each_batchs_order() -> None:
    batches = [_due_batch("a", 4, age=2), _due_batch("b", 0, age=1), _due_batch("c", 2)]
    due = {b.id: [f"{b.id}{i}" for i in range(10)] for b in batches}
    taken = _share(batches, 6, lambda b: due[b.id])
    assert taken == ["b0", "b1", "b2", "c0", "b3", "c1"]  # b to 2, then b and c (older first) to 4
    assert Counter(j[0] for j in _share(batches, 12, lambda b: due[b.id])) == {"a": 2, "b": 6, "c": 4}


def test_share_reads_only_the_batches_that_can_get_a_slot() -> None:
    batches = [_due_batch("full", 9), _due_batch("empty", 0), _due_batch("low", 0, low=True)]
    read: list[str] = []

    def due_of(batch: DueBatch) -> list[str]:
        read.append(batch.id)
        return [f"{batch.id}{i}" for i in range(3)]

    assert _share(batches, 2, due_of) == ["empty0", "empty1"]
    assert read == ["empty"]
    read.clear()
    assert _share(batches, 5, due_of) == ["empty0", "empty1", "empty2", "full0", "full1"]
    assert read == ["empty", "full"]  # the low batch comes after every normal one's jobs


# --------------------------------------------------------------------------- what `status` and `run` say


def _held(engine: Engine, batch_id: str, **settings: Any) -> str | None:
    """The ``phase_reason`` `status` gives ``batch_id`` with ``settings``."""
    config = Settings(**settings)
    check = CapCheck.of(config, api_key_id(config))
    with db.read_scope(engine) as session:
        report = batches.batch_report(session, batch_id, caps=check)
    assert report["phase"] == "active"
    return report["phase_reason"]


WORKERS: dict[str, Any] = {"broker_url": "redis://127.0.0.1:6379/0", "max_outstanding": 10}


def test_status_names_the_batches_a_full_cap_is_shared_with_and_how(engine: Engine) -> None:
    """The audit's note promised "sending resumes as fal finishes them" while every freed slot
    went to the older batch; it now says how the workers share the cap out."""
    _batch(engine, "overnight", 200, hours_ago=1)
    dispatch(_runtime(engine, []))  # the workers' leader: overnight fills the cap
    small_id, _small = _batch(engine, "urgent", 10, hours_ago=0)
    assert _held(engine, small_id, **WORKERS) == (
        "submits held back: the outstanding cap is full (10 of 10, WANBATCH_MAX_OUTSTANDING): requests "
        "at fal (10 of batch overnight); sending resumes as fal finishes them: the cap is shared with "
        "batch overnight, and each slot fal frees goes to the batch with jobs to send that holds the "
        "fewest (normal priority before `priority: low`); or raise WANBATCH_MAX_OUTSTANDING if your "
        "fal account runs more at once"
    )


def test_status_says_a_low_priority_batch_waits_for_the_normal_ones_with_jobs_to_send(engine: Engine) -> None:
    low_id, _low = _batch(engine, "catalogue", 40, hours_ago=2, priority="low")
    normal_id, normal = _batch(engine, "daytime", 30, hours_ago=0)
    sent: list[str] = []
    dispatch(_runtime(engine, sent))
    assert sent == normal[:10]
    said = (
        "submits held back: this batch is `priority: low`, and the workers send a low-priority "
        "batch's jobs only while no normal-priority batch has jobs to send (batch daytime has); it is "
        "sent once they are sent, or give it `priority: normal` and submit it again"
    )
    assert _held(engine, low_id, **WORKERS) == said
    check = CapCheck.of(Settings(**WORKERS), "k")
    with db.read_scope(engine) as session:  # what a watching `run` says on its progress line
        holds = cap_holds(session, low_id, check.workers_scope(), check)
        assert cap_note(holds, low_id, short=True) == "held: low priority (behind daytime)"
    with db.session_scope(engine) as session:  # paused, the normal batch holds nothing back
        store.set_paused_by_user(session, normal_id, True)
    # … and the cap its requests fill is what holds the low one back
    assert (_held(engine, low_id, **WORKERS) or "").startswith(
        "submits held back: the outstanding cap is full (10 of 10, WANBATCH_MAX_OUTSTANDING): requests "
        "at fal (10 of batch daytime)"
    )
