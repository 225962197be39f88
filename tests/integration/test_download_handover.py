"""The conductor hands an in-process download the claim it read (issue #11's per-job CPU).

Recording a completion from a status stream moves the job to ``downloading`` and, when the
downloads run on this process's threads, leases it to this process in that same transaction
and keeps what it read: the download step starts from that claim, with no second read and no
second lease. Fenced like any claim: a job changed in between is never finished by it.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from jobs import db, store
from jobs.states import JobState
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, completion_heard, make_runtime, settings_for
from worker.steps import Runtime, dispatch, download, submit
from worker.steps.poll import Seen, apply_seen

S = JobState
KEY = "download-handover-key-7d1e"


def _completed_at_fal(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, **overrides: float
) -> tuple[Runtime, Seen]:
    """One job fal accepted and completed; the stream event that says so, not yet applied."""
    FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs", **overrides))
    rt.download_claims = {}
    add_batch(engine, "handover", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})])
    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "submitted"
    return rt, completion_heard(engine, rt, job_id)


def test_the_download_starts_from_the_claim_the_conductor_read(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, statements: list[str]
) -> None:
    rt, seen = _completed_at_fal(engine, hostile, tmp_path)
    assert apply_seen(rt, [seen]) == 1
    assert rt.download_claims is not None
    claim = rt.download_claims[seen.job_id]
    with db.read_scope(engine) as session:
        job = store.get_job(session, seen.job_id)
        assert (job.state, job.lease_owner) == (S.DOWNLOADING, rt.owner)  # leased to this process
        assert claim.fence.version == job.version
    statements.clear()
    assert download(rt, seen.job_id) == "succeeded"
    assert seen.job_id not in rt.download_claims
    assert statements[0].startswith(("BEGIN", "UPDATE jobs", "WITH moved AS (UPDATE jobs"))  # no read first
    assert not [s for s in statements if s.startswith("SELECT jobs")]
    with db.read_scope(engine) as session:
        done = store.get_job(session, seen.job_id)
        assert done.state == S.SUCCEEDED
        assert done.version == claim.fence.version + 1  # no second lease: only the success moved it
        assert done.output_path is not None
        assert Path(done.output_path).is_file()


def test_the_completion_hands_on_the_job_as_its_move_returned_it(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, statements: list[str]
) -> None:
    """The conductor's claim is the job as the UPDATE that moved it to ``downloading`` returned
    it (every column): no read of the job after its move, and nothing in it stale."""
    rt, seen = _completed_at_fal(engine, hostile, tmp_path)
    statements.clear()
    assert apply_seen(rt, [seen]) == 1
    moved = next(i for i, s in enumerate(statements) if s.startswith(("UPDATE jobs", "WITH moved AS")))
    assert not [s for s in statements[moved:] if s.startswith("SELECT jobs")]  # nothing read back
    assert rt.download_claims is not None
    claim = rt.download_claims[seen.job_id]
    with db.read_scope(engine) as session:
        stored = store.job_snapshot(session, seen.job_id)
    assert vars(claim.job) == vars(stored)


def test_a_job_changed_after_the_handover_is_not_finished_by_it(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    # The try that lost its lease waits up to a lease for the new holder to record the job
    # (download._withdraw_if_stored_elsewhere); this one never does: a short lease, not 120 s.
    rt, seen = _completed_at_fal(engine, hostile, tmp_path, lease_seconds=5.0)
    apply_seen(rt, [seen])
    with db.session_scope(engine) as session:  # e.g. another worker took the job over meanwhile
        job = store.get_job(session, seen.job_id)
        other = store.Fence.of(job, "someone-else")
        assert store.take_lease(session, other, now=job.updated_at, lease_seconds=60)
    assert download(rt, seen.job_id) == "lost-lease"
    with db.read_scope(engine) as session:
        job = store.get_job(session, seen.job_id)
        assert (job.state, job.lease_owner) == (S.DOWNLOADING, "someone-else")
