"""A resubmitted manifest whose jobs differ from the batch's only by a documented default written
out (or left out), on both dialects (:func:`jobs.store.resubmit_jobs`).

Every such job got a new key, so the stored ones were left out (kept: sent, paid for) and the
new ones stored and sent again, for the same videos. A stored job that may have been sent, or
that succeeded, now stays its item's job (the new row is not kept); one a budget cancelled
before its first send, one never sent (dropped) and one without a pinned seed do not."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import update
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
