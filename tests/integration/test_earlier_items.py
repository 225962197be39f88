"""``jobs.earlier_items``, on both dialects: every statement of :func:`jobs.store.resubmit_jobs`
that gives a stored job another item number appends the old one (its output files' names hold
the number: the download step looks under exactly those names), most recent last, each once,
the last ``EARLIER_ITEMS_KEPT``; nothing else writes it, and no clock is read. A rerun looking
for the paid video its original left staged looks under those numbers too."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from jobs import outputs, store
from jobs.models import EARLIER_ITEMS_KEPT, EARLIER_ITEMS_UNKNOWN, Job
from jobs.states import JobState
from tests.step_runtime import settings_for
from worker.steps.staged import find_staged


def _job(i: int, item: int, variant: int = 0) -> store.NewJob:
    return store.NewJob(
        key=f"{i:064x}",
        item_index=item,
        endpoint="fal-ai/wan-22",
        input={"prompt": f"job {i}"},
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.40"),
        variant=variant,
    )


def _places(session: Session, batch_id: str) -> dict[int, tuple[int, int, list[int] | None]]:
    session.expire_all()  # written with Core
    return {
        int(job.job_key, 16): (job.item_index, job.variant, job.earlier_items)
        for job in store.jobs_of_batch(session, batch_id)
    }


def _count(n: int) -> Callable[[], int]:
    return lambda: n


def _batch(session: Session, name: str = "renumbered") -> str:
    batch, _ = store.get_or_create_batch(
        session, name=name, manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    return batch.id


def test_a_resubmit_records_the_numbers_it_takes_from_jobs(session: Session) -> None:
    batch_id = _batch(session)
    store.add_jobs(session, batch_id, [_job(0, 0), _job(1, 1), _job(2, 2), _job(3, 3)])
    session.commit()
    assert _places(session, batch_id) == {i: (i, 0, None) for i in range(4)}

    # Job 0 takes another variant of its item, job 1 stays, an item (job 4) is inserted above job
    # 2, and job 3 is no longer in the manifest: numbered after its 4 items.
    again = [_job(0, 0, variant=1), _job(1, 1), _job(4, 2), _job(2, 3)]
    moved = store.resubmit_jobs(session, batch_id, again, lambda: 4)
    session.commit()
    assert (moved.added, moved.present, moved.renumbered, moved.not_in_manifest) == (1, 3, 2, 1)
    assert _places(session, batch_id) == {
        0: (0, 1, None),  # its files keep their name: only the item number is in it
        1: (1, 0, None),
        2: (3, 0, [2]),
        3: (4, 0, [3]),
        4: (2, 0, None),  # new
    }

    # The same manifest again changes no number: nothing is added.
    store.resubmit_jobs(session, batch_id, again, lambda: 4)
    session.commit()
    assert _places(session, batch_id)[2] == (3, 0, [2])

    # Job 2 renumbered again (the inserted item gone): its newest old number comes last; job 4,
    # no longer in the manifest either, is numbered after its 3 items (job 3 keeps 4).
    store.resubmit_jobs(session, batch_id, [_job(0, 0, variant=1), _job(1, 1), _job(2, 2)], lambda: 3)
    session.commit()
    places = _places(session, batch_id)
    assert places[2] == (2, 0, [2, 3])  # back at 2: it had that number (its name) too
    assert places[3] == (4, 0, [3])
    assert places[4] == (3, 0, [2])


def test_earlier_numbers_are_kept_once_each_and_the_newest_only(session: Session) -> None:
    """A number the job goes back to moves to the end; past ``EARLIER_ITEMS_KEPT`` the oldest go."""
    batch_id = _batch(session, "many")
    store.add_jobs(session, batch_id, [_job(0, 0)])
    session.commit()
    numbers = [1, 0, 1, *range(2, 2 + EARLIER_ITEMS_KEPT + 2)]
    expected: list[int] = []
    current = 0
    for number in numbers:
        # items inserted above the job: the manifest's own items stand for them (other keys)
        above = [_job(100 + n, n) for n in range(number)]
        store.resubmit_jobs(session, batch_id, [*above, _job(0, number)], _count(number + 1))
        session.commit()
        expected = [*(x for x in expected if x != current), current][-EARLIER_ITEMS_KEPT:]
        current = number
        job = _places(session, batch_id)[0]
        assert job == (number, 0, expected)
    assert len(expected) == EARLIER_ITEMS_KEPT
    assert expected[-1] == numbers[-2]


def test_an_unknown_earlier_number_is_kept_with_the_ones_added_after_it(session: Session) -> None:
    """A job schema 0032 marked ``EARLIER_ITEMS_UNKNOWN`` (sent before it) keeps the mark."""
    batch_id = _batch(session, "marked")
    store.add_jobs(session, batch_id, [_job(0, 0)])
    session.commit()
    (job,) = store.jobs_of_batch(session, batch_id)
    unknown = [EARLIER_ITEMS_UNKNOWN]
    store.update_job_fields(session, job.id, expected_version=job.version, earlier_items=unknown)
    session.commit()
    store.resubmit_jobs(session, batch_id, [_job(1, 0), _job(0, 1)], lambda: 2)
    session.commit()
    got: Sequence[int] | None = _places(session, batch_id)[0][2]
    assert got == [EARLIER_ITEMS_UNKNOWN, 0]


@pytest.mark.parametrize(
    ("moves", "unknown", "earlier"),
    [
        ([1], False, [0]),  # an item inserted above it
        ([2, 1], False, [0, 2]),  # renumbered twice: found under the first number
        ([1], True, [EARLIER_ITEMS_UNKNOWN, 0]),  # numbers nobody recorded: the folder is listed
    ],
)
def test_a_rerun_finds_the_video_staged_under_a_number_its_original_had_before(
    session: Session, tmp_path: Path, moves: list[int], unknown: bool, earlier: list[int]
) -> None:
    """Review C: the original staged its paid video under item 0, its upload failed and its
    batch was cancelled (``output_not_kept``); the manifest was then edited and submitted again,
    renumbering it. A rerun looked only under its current number, missed the video and sent the
    job to fal again (paid twice): it looks under its earlier numbers too."""
    batch_id = _batch(session, "staged")
    store.add_jobs(session, batch_id, [_job(0, 0)])
    session.commit()
    (original,) = store.jobs_of_batch(session, batch_id)
    staging = tmp_path / "staging"
    settings = settings_for(
        "http://127.0.0.1:9",
        "earlier-items-key-1234",
        output_dir=tmp_path / "out",
        output_staging_dir=staging,
    )
    video = b"\x00\x00\x00\x18ftypmp42" + b"x" * 1000
    staged = outputs.video_path(
        staging, store.folder_name(store.get_batch(session, batch_id)), 0, original.id
    )
    staged.parent.mkdir(parents=True)
    staged.write_bytes(video)
    session.execute(
        update(Job)
        .where(Job.id == original.id)
        .values(
            state=JobState.FAILED,
            error_type=store.OUTPUT_NOT_KEPT,
            output_sha256=hashlib.sha256(video).hexdigest(),
            output_bytes=len(video),
            earlier_items=[EARLIER_ITEMS_UNKNOWN] if unknown else None,
        )
    )
    session.commit()
    for number in moves:
        above = [_job(100 + n, n) for n in range(number)]
        store.resubmit_jobs(session, batch_id, [*above, _job(0, number)], _count(number + 1))
        session.commit()
    session.expire_all()
    original = store.get_job(session, original.id)
    assert (original.item_index, original.earlier_items) == (moves[-1], earlier)

    path, why = find_staged(session, settings, original)
    assert path == staged, why
    # another file under an earlier name is refused, as one under the current name is
    staged.write_bytes(video[:-1] + b"y")
    assert find_staged(session, settings, original)[0] is None
