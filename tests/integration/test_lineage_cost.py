"""What ``status`` and ``rerun --failed-only`` read to tell which failed jobs a rerun covers.

Review: once coverage followed a rerun's whole lineage, ``status`` of a rerun read every repeat
of every root job (its siblings', its own reruns', its own rows), decoded each stored input and
computed its content key, though only succeeded or still unfinished repeats can cover anything:
``status big-rerun-2`` took 1.27 s instead of 0.04 s for 10k jobs. Now the repeats that cannot
cover are left out in SQL (or read as ids only, for ``status`` of every batch), and each key is
computed once. Counted here, never timed: rows made into repeats, and content keys computed.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, update

from jobs import db, rendered, store
from jobs.manifest.keys import stored_content_key
from jobs.models import Batch, BatchState, Job, utcnow
from jobs.rendered import RERUN_FAILED_STATES, by_input, rerun_covered, rerun_covered_of_batches
from jobs.states import JobState
from jobs.store import repeats

STATES = list(JobState)


class Counts:
    """How many rows became :class:`jobs.store.RerunRepeat` and how many content keys were computed."""

    def __init__(self) -> None:
        self.rows = 0
        self.keys = 0

    def reset(self) -> None:
        self.rows = self.keys = 0


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Counts:
    seen = Counts()
    make, key = repeats._repeat, stored_content_key

    def counted_repeat(row: Any) -> store.RerunRepeat:
        seen.rows += 1
        return make(row)

    def counted_key(*args: Any) -> str:
        seen.keys += 1
        return key(*args)

    monkeypatch.setattr(repeats, "_repeat", counted_repeat)
    monkeypatch.setattr(rendered, "stored_content_key", counted_key)
    return seen


def _job(i: int, rerun_of: str | None) -> store.NewJob:
    return store.NewJob(
        key=f"{i:064x}",
        item_index=i,
        endpoint="fal-ai/wan-22",
        input={"prompt": f"p{i}", "resolution": "480p", "seed": 7},
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.20"),
        source_files=None,
        rerun_of=rerun_of,
    )


def _batch(
    session: Any, name: str, parent: str | None, of: list[str] | None, n: int
) -> tuple[str, list[str]]:
    batch, _ = store.get_or_create_batch(
        session,
        name=name,
        manifest_path="/p/m.yaml",
        manifest_sha256="0" * 64,
        budget_max_usd=None,
        parent_batch_id=parent,
    )
    store.add_jobs(session, batch.id, [_job(i, of[i] if of else None) for i in range(n)])
    ids = [job.id for job in store.jobs_of_batch(session, batch.id)]
    return batch.id, ids


def _set(session: Any, ids: list[str], states: list[JobState]) -> None:
    for job_id, state in zip(ids, states, strict=True):
        session.execute(update(Job).where(Job.id == job_id).values(state=state, seed=7, error_type=None))


def _lineage(
    engine: Engine,
    d_states: list[JobState],
    simulated: JobState = JobState.SUCCEEDED,
    c_first: JobState = JobState.FAILED,
) -> dict[str, str]:
    """big (root, every job failed) → big-rerun-1 (failed again) → big-rerun-1-rerun-1 (failed
    again, but its first job ``c_first``); big-rerun-2 (a sibling, jobs in ``d_states``);
    big-rerun-3 (cancelled, every state) and big-rerun-4 (simulated, its jobs ``simulated``):
    siblings whose unfinished jobs (cancelled) and whose any jobs (simulated) never cover a
    batch sent to fal."""
    n = len(d_states)
    failed = [JobState.FAILED] * n
    with db.session_scope(engine) as session:
        a, a_jobs = _batch(session, "big", None, None, n)
        b, b_jobs = _batch(session, "big-rerun-1", a, a_jobs, n)
        d, d_jobs = _batch(session, "big-rerun-2", a, a_jobs, n)
        c, c_jobs = _batch(session, "big-rerun-1-rerun-1", b, b_jobs, n)
        e, e_jobs = _batch(session, "big-rerun-3", a, a_jobs, n)
        f, f_jobs = _batch(session, "big-rerun-4", a, a_jobs, n)
        for ids, states in [
            (a_jobs, failed),
            (b_jobs, failed),
            (c_jobs, [c_first, *failed[1:]]),
            (d_jobs, d_states),
        ]:
            _set(session, ids, states)
        _set(session, e_jobs, STATES[:n] if n <= len(STATES) else failed)
        _set(session, f_jobs, [simulated] * n)
        session.execute(update(Batch).where(Batch.id == e).values(state=BatchState.CANCELLED))
        session.execute(update(Batch).where(Batch.id == f).values(simulated=True))
    return {"A": a, "B": b, "C": c, "D": d, "E": e, "F": f}


def test_a_lineage_where_nothing_covers_reads_no_repeat_and_computes_no_key(
    engine: Engine, counts: Counts
) -> None:
    """Every rerun failed again: nothing covers, so no repeat is read and no key computed
    (before: every other repeat of each root job, 4 per job for the rerun, and again for each
    batch of ``status`` with no batch)."""
    ids = _lineage(engine, [JobState.FAILED] * 6, simulated=JobState.FAILED)
    with db.read_scope(engine) as session:
        batches = {k: session.get_one(Batch, v) for k, v in ids.items()}
        for name in ("A", "B", "C", "D"):
            covered = rerun_covered(session, batches[name])
            assert covered.rendered["jobs"] == covered.pending["jobs"] == 0
        every = rerun_covered_of_batches(session, list(batches.values()))
        assert all(c.rendered["jobs"] == c.pending["jobs"] == 0 for c in every.values())
    assert (counts.rows, counts.keys) == (0, 0)


def test_only_the_repeats_that_cover_are_read_and_each_key_is_computed_once(
    engine: Engine, counts: Counts
) -> None:
    """big-rerun-2 holds one repeat in each state: one covers as rendered (succeeded), seven as
    being rerun (unfinished, not being cancelled). Only those are read; the answers are
    those of the full read, and ``status`` of every batch computes each repeat's key once."""
    ids = _lineage(engine, STATES, c_first=JobState.SUCCEEDED)
    covering = [s for s in STATES if s == JobState.SUCCEEDED or not (s.terminal or s == JobState.CANCELLING)]
    n = len(STATES)
    with db.read_scope(engine) as session:
        batches = {k: session.get_one(Batch, v) for k, v in ids.items()}
        counts.reset()
        b = rerun_covered(session, batches["B"])
        # big-rerun-2's covering repeats, big-rerun-3's succeeded one (a cancelled batch's
        # video is still rendered) and big-rerun-1-rerun-1's (a generation further down);
        # big-rerun-4 is a simulation.
        assert counts.rows == len(covering) + 2
        assert counts.keys == len(covering) + 2 + n  # and each failed job's wanted key
        assert b.rendered["jobs"] == 2
        assert b.pending["jobs"] == len(covering) - 2
        assert [r["name"] for r in b.rendered["reruns"]] == ["big-rerun-2", "big-rerun-1-rerun-1"]

        counts.reset()
        every = rerun_covered_of_batches(session, list(batches.values()))
        # The simulation's repeats too (batches of both kinds are read at once), but their
        # keys are never computed for a batch sent to fal.
        assert counts.rows == len(covering) + 2 + n
        # Each covering repeat once, and the wanted key of each failed or cancelled job of the
        # batches of a lineage a repeat covers in: A's and B's, C's but its first, and D's and
        # E's two each.
        assert counts.keys == len(covering) + 2 + 2 * n + (n - 1) + 2 + 2
        for name, batch in batches.items():
            assert every[batch.id] == rerun_covered(session, batch), name
            assert every[batch.id] == _full_read(session, batch), name


def _full_read(session: Any, batch: Batch) -> rendered.Covered:
    """:func:`rerun_covered` from every repeat of the lineage, as before: the reference."""
    rows = store.lineage_repeats(session, batch, RERUN_FAILED_STATES)
    found = by_input(rendered._renders(rows, simulated=batch.simulated, now=utcnow()))
    jobs = store.rerun_wanted_of_batches(session, [batch.id], RERUN_FAILED_STATES) if found else []
    return rendered._covered(found, jobs, batch.created_at)


def test_the_covering_test_in_sql_is_the_one_in_python(engine: Engine) -> None:
    """:func:`jobs.store.repeats.covering` keeps exactly the repeats ``_renders`` would keep
    (succeeded or :func:`jobs.rendered.still_rendering`, of the batch's kind), every state, in a
    cancelled batch and a simulated one too."""
    ids = _lineage(engine, STATES)
    with db.read_scope(engine) as session:
        batch = session.get_one(Batch, ids["B"])
        every = store.lineage_repeats(session, batch, RERUN_FAILED_STATES)
        for simulated in (False, True):
            kept = store.lineage_repeats(
                session, batch, RERUN_FAILED_STATES, only_covering=True, simulated=simulated
            )
            expected = [
                r.job_id
                for r in every
                if r.simulated == simulated and (r.succeeded or rendered.still_rendering(r))
            ]
            assert [r.job_id for r in kept] == expected
            assert expected  # the test tests something
