"""A resubmitted manifest whose jobs differ from the batch's only by a documented default written
out (or left out), on both dialects (:func:`jobs.store.resubmit_jobs`).

Every such job got a new key, so the stored ones were left out (kept: sent, paid for) and the
new ones stored and sent again, for the same videos. A stored job that may have been sent, or
that succeeded, now stays its item's job (the new row is not kept); one a budget cancelled
before its first send, one never sent (dropped) and one without a pinned seed do not. A dropped
job the manifest brings back is matched too (it stays dropped), every job sent stands for one of
the manifest's, and the job that stands for another spelling records its key, so the next
resubmit stores nothing (``manifest_key``)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.orm import Session

from jobs import store
from jobs.endpoints import get_endpoint
from jobs.manifest import job_key
from jobs.models import NOT_IN_MANIFEST, Job
from jobs.states import JobState as S

ENDPOINT = "fal-ai/wan-22"
SENT = datetime(2026, 12, 1, tzinfo=UTC)


def _job(i: int, item: int, *, written: bool, seed: bool = True) -> store.NewJob:
    """Job ``i`` (prompt ``job i``, seed ``i``), ``num_frames: 81`` (the default) written or not."""
    given: dict[str, Any] = {"prompt": f"job {i}"}
    if seed:
        given["seed"] = i
    if written:
        given["num_frames"] = 81
    return store.NewJob(
        key=job_key(get_endpoint(ENDPOINT), given),
        item_index=item,
        endpoint=ENDPOINT,
        input=given,
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.40"),
    )


#: How each job stands before the manifest is submitted again with ``num_frames: 81`` written.
STANDING: dict[int, dict[str, Any]] = {
    0: {
        "state": S.SUCCEEDED,
        "attempts": 1,
        "submitted_at": SENT,
        "request_id": "r0",
        "actual_usd": Decimal("0.4"),
    },
    1: {"state": S.QUEUED, "attempts": 1, "submitted_at": SENT, "request_id": "r1"},  # at fal now
    2: {"state": S.FAILED, "attempts": 1, "submitted_at": SENT, "request_id": "r2", "actual_usd": 0},
    3: {"state": S.SUCCEEDED, "reused_from": "x" * 32, "actual_usd": 0},  # a twin's video, never sent
    4: {"state": S.CANCELLED, "error_type": "budget", "actual_usd": 0},  # never sent, no video
    5: {"state": S.PENDING},  # never sent: dropped, the manifest's spelling sent instead
}
#: Job 6 has no seed: sent, but another request than any of its spelling (fal draws a seed).
UNSEEDED = 6


def _by_prompt(session: Session, batch_id: str) -> dict[tuple[str, bool], Job]:
    session.expire_all()  # written with Core
    return {(j.input["prompt"], "num_frames" in j.input): j for j in store.jobs_of_batch(session, batch_id)}


def _manifest(written: bool) -> list[store.NewJob]:
    return [_job(i, i, written=written) for i in STANDING] + [
        _job(UNSEEDED, UNSEEDED, written=written, seed=False)
    ]


def test_a_default_written_out_keeps_the_jobs_already_sent_as_the_items_jobs(session: Session) -> None:
    batch, _ = store.get_or_create_batch(
        session, name="wd", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    store.add_jobs(session, batch.id, _manifest(written=False))
    unseeded = {"state": S.SUCCEEDED, "attempts": 1, "submitted_at": SENT, "request_id": "r6"}
    for i, values in [*STANDING.items(), (UNSEEDED, unseeded)]:
        session.execute(update(Job).where(Job.item_index == i).values(**values))
    session.commit()
    before = {prompt: job.id for (prompt, _), job in _by_prompt(session, batch.id).items()}

    # An item inserted on top too: every job takes its new place.
    edited = [_job(99, 0, written=True)] + [
        store.NewJob(**{**_job_fields(job), "item_index": job.item_index + 1})
        for job in _manifest(written=True)
    ]
    done = store.resubmit_jobs(session, batch.id, edited, lambda: 8)
    session.commit()

    # Jobs 0–3 stand for their items; 99, 4, 5 and 6 are stored anew (4 and 5 were never sent,
    # 6 has no seed). Left out: 4 (ended unsent), 5 (dropped) and 6 (sent).
    assert (done.added, done.present, done.defaults_matched) == (4, 4, 4)
    assert (done.not_in_manifest, done.dropped, done.ended_unsent, done.kept) == (3, 1, 1, 1)
    jobs = _by_prompt(session, batch.id)
    assert len(jobs) == 11
    for i in range(4):
        kept = jobs[(f"job {i}", False)]
        assert kept.id == before[f"job {i}"]
        assert (kept.item_index, kept.variant, kept.not_in_manifest) == (i + 1, 0, False)
        assert kept.state == STANDING[i]["state"]
        assert kept.job_key == _job(i, i, written=False).key  # its key and input: as sent
        assert kept.earlier_items == [i]
        assert (f"job {i}", True) not in jobs
    for i in (4, 5, UNSEEDED):
        old, new = jobs[(f"job {i}", False)], jobs[(f"job {i}", True)]
        assert (old.not_in_manifest, new.not_in_manifest) == (True, False)
        assert (new.state, new.item_index) == (S.PENDING, i + 1)
    assert (jobs[("job 5", False)].state, jobs[("job 5", False)].error_type) == (S.CANCELLED, NOT_IN_MANIFEST)
    assert jobs[("job 99", True)].state == S.PENDING

    # The same manifest again: nothing added, nothing moved, the same jobs stand.
    again = store.resubmit_jobs(session, batch.id, edited, lambda: 8)
    session.commit()
    assert (again.added, again.present, again.defaults_matched, again.renumbered) == (0, 8, 4, 0)
    assert _by_prompt(session, batch.id).keys() == jobs.keys()

    # The default left out again: the stored jobs are found by their own keys.
    plain = [
        store.NewJob(**{**_job_fields(job), "item_index": job.item_index + 1}) for job in _manifest(False)
    ]
    back = store.resubmit_jobs(session, batch.id, [_job(99, 0, written=True), *plain], lambda: 8)
    session.commit()
    assert back.defaults_matched == 0
    assert back.added == 0
    assert len(_by_prompt(session, batch.id)) == 11


def _job_fields(job: store.NewJob) -> dict[str, Any]:
    return {name: getattr(job, name) for name in store.NewJob.__dataclass_fields__}


def _sent(session: Session, batch_id: str, key: str) -> None:
    """Make the batch's job of ``key`` one rendered after a send: the request fal billed."""
    session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.job_key == key)
        .values(
            state=S.SUCCEEDED,
            attempts=1,
            submitted_at=SENT,
            request_id=f"r-{key[:8]}",
            actual_usd=Decimal("0.4"),
        )
    )
    session.commit()


def _of_key(session: Session, batch_id: str, key: str) -> Job:
    session.expire_all()
    return session.query(Job).filter(Job.batch_id == batch_id, Job.job_key == key).one()


def test_a_dropped_job_brought_back_is_not_sent_when_its_spelling_with_the_default_was(
    session: Session,
) -> None:
    """Job 0 is dropped (left out before it was sent), then the manifest has it with the default
    written out, which is sent and rendered; then it has it as first written again. The dropped
    row stays dropped (cancelled, marked): the job rendered is the item's, nothing is sent again."""
    batch, _ = store.get_or_create_batch(
        session, name="wd-back", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    plain, written, other = _job(0, 0, written=False), _job(0, 0, written=True), _job(1, 1, written=False)
    store.add_jobs(session, batch.id, [plain, other])
    session.commit()
    left = store.resubmit_jobs(session, batch.id, [_job(1, 0, written=False)], lambda: 1)
    session.commit()
    assert left.dropped == 1
    spelled = store.resubmit_jobs(session, batch.id, [written, other], lambda: 2)
    session.commit()
    assert (spelled.added, spelled.restored) == (1, 0)
    _sent(session, batch.id, written.key)
    rendered = _of_key(session, batch.id, written.key).id

    for _ in range(2):  # and the same manifest again: nothing changes
        back = store.resubmit_jobs(session, batch.id, [plain, other], lambda: 2)
        session.commit()
        assert (back.added, back.present, back.restored, back.defaults_matched) == (0, 2, 0, 1)
        assert (back.not_in_manifest, back.dropped, back.kept) == (1, 1, 0)
        dropped, kept = _of_key(session, batch.id, plain.key), _of_key(session, batch.id, written.key)
        assert (dropped.state, dropped.error_type, dropped.not_in_manifest) == (
            S.CANCELLED,
            NOT_IN_MANIFEST,
            True,
        )
        assert dropped.item_index == 2  # numbered after the manifest's items
        assert (kept.id, kept.state, kept.not_in_manifest, kept.item_index) == (
            rendered,
            S.SUCCEEDED,
            False,
            0,
        )
        pending = [j for j in store.jobs_of_batch(session, batch.id) if j.state == S.PENDING]
        assert [j.job_key for j in pending] == [other.key]

    # The spelling the rendered job was sent with, again: it is its own item's job, the
    # dropped row stays as it is.
    spelled_again = store.resubmit_jobs(session, batch.id, [written, other], lambda: 2)
    session.commit()
    assert (spelled_again.added, spelled_again.restored, spelled_again.defaults_matched) == (0, 0, 0)
    assert _of_key(session, batch.id, plain.key).state == S.CANCELLED


def test_two_sent_spellings_of_one_request_each_stand_for_an_item(session: Session) -> None:
    """Two items that differ only by ``num_frames: 81`` written out, both sent; then both write
    out another default (``resolution: 720p``): each item keeps a job already sent."""
    batch, _ = store.get_or_create_batch(
        session, name="wd-two", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    first = [_job(0, 0, written=False), _job(0, 1, written=True)]
    store.add_jobs(session, batch.id, first)
    session.commit()
    for job in first:
        _sent(session, batch.id, job.key)
    ids = [_of_key(session, batch.id, job.key).id for job in first]

    edited = []
    for job in first:
        given = {**job.input, "resolution": "720p"}
        edited.append(
            store.NewJob(
                **{**_job_fields(job), "input": given, "key": job_key(get_endpoint(ENDPOINT), given)}
            )
        )
    done = store.resubmit_jobs(session, batch.id, edited, lambda: 2)
    session.commit()
    assert (done.added, done.present, done.defaults_matched, done.not_in_manifest) == (0, 2, 2, 0)
    session.expire_all()
    jobs = sorted(store.jobs_of_batch(session, batch.id), key=lambda j: j.item_index)
    assert [(j.id, j.item_index, j.not_in_manifest) for j in jobs] == [(ids[0], 0, False), (ids[1], 1, False)]


def test_a_manifest_submitted_again_after_a_match_stores_and_deletes_nothing(session: Session) -> None:
    """The job that stands for an item written differently records that spelling's key: the
    next submit of the same manifest finds it by that key, as it finds any job by its own, and
    stores no row to delete again (a 100,000-job no-op resubmit took three times as long)."""
    batch, _ = store.get_or_create_batch(
        session, name="wd-again", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    plain = [_job(i, i, written=False) for i in range(3)]
    store.add_jobs(session, batch.id, plain)
    session.commit()
    for job in plain:
        _sent(session, batch.id, job.key)
    written = [_job(i, i, written=True) for i in range(3)]
    assert store.resubmit_jobs(session, batch.id, written, lambda: 3).defaults_matched == 3
    session.commit()

    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()).upper())

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", record)
    try:
        again = store.resubmit_jobs(session, batch.id, written, lambda: 3)
        session.commit()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert (again.added, again.present, again.defaults_matched, again.not_in_manifest) == (0, 3, 3, 0)
    assert not [s for s in statements if s.startswith("DELETE FROM JOBS")]
    assert not [s for s in statements if s.startswith("INSERT INTO JOBS")]
    session.expire_all()
    # The spelling each stands for, recorded; their own keys and inputs as they were sent.
    assert {j.job_key: j.manifest_key for j in store.jobs_of_batch(session, batch.id)} == {
        p.key: w.key for p, w in zip(plain, written, strict=True)
    }


@pytest.mark.parametrize("chunk", [1, 5000])
def test_both_spellings_as_two_items_are_two_jobs(session: Session, chunk: int) -> None:
    """A job that stands for another spelling, and a manifest that then has both (the same
    request written twice, which ``validate`` warns of) — in either order, in one chunk or two:
    the job is its own key's item's, the other item a job of its own, stored now (as a first
    submit of that manifest would store both)."""
    batch, _ = store.get_or_create_batch(
        session, name="wd-both", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    plain, written = _job(0, 0, written=False), _job(0, 0, written=True)
    store.add_jobs(session, batch.id, [plain])
    session.commit()
    _sent(session, batch.id, plain.key)
    assert store.resubmit_jobs(session, batch.id, [written], lambda: 1).defaults_matched == 1
    session.commit()
    sent = _of_key(session, batch.id, plain.key)
    assert sent.manifest_key == written.key

    both = [  # the spelling it stands for first: held back, then found to be an item of its own
        store.NewJob(**{**_job_fields(written), "item_index": 0}),
        store.NewJob(**{**_job_fields(plain), "item_index": 1}),
    ]
    for _ in range(2):
        done = store.resubmit_jobs(session, batch.id, both, lambda: 2, chunk=chunk)
        session.commit()
        assert done.not_in_manifest == 0
        jobs = {j.job_key: j for j in _all(session, batch.id)}
        assert jobs.keys() == {plain.key, written.key}
        assert (jobs[plain.key].id, jobs[plain.key].item_index, jobs[plain.key].manifest_key) == (
            sent.id,
            1,
            None,
        )
        assert (jobs[written.key].state, jobs[written.key].item_index) == (S.PENDING, 0)
        assert not any(j.not_in_manifest for j in jobs.values())
    assert (done.added, done.present, done.defaults_matched) == (0, 2, 0)


def _all(session: Session, batch_id: str) -> list[Job]:
    session.expire_all()
    return list(store.jobs_of_batch(session, batch_id))
