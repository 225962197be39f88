"""A submit fal accepted whose record the database refuses is held in its process's journal
(:mod:`worker.steps.unrecorded`); no other process may call its outcome unknown, nor send it
again, while that holder lives.

Before, only the holding process left the job alone (its memory said so): the reconciler of any
other process — the distributed workers' tick leader on another host, a second ``run`` —
claimed the job once its lease ran out, "the worker was lost during the POST", and by
``WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit`` sent it, and paid for it, a second time (by
``fail``: failed a job fal was rendering).

Now the holder marks the job held in the database (``held_submissions``, not the job's own
row, which is the one refused) and renews the mark while it holds the entry; every reconciler
leaves a job with a fresh mark alone. A holder that is gone (its mark no longer renewed) holds
nothing: the lease rules apply as before, so a job whose host never runs wanbatch again is not
stranded for ever.

Real PostgreSQL, two runtimes of different owners (two processes as the database sees them), a
trigger refusing the request id of the one job.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from jobs import db, store
from jobs.models import utcnow
from tests.hostile import HostileProvider
from tests.hostile_fal import accept_submits
from tests.integration.test_unrecordable_accepted import _expire_lease, _job, _refusing
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.steps import Runtime, dispatch, reconcile, submit
from worker.steps import held as held_module
from worker.steps import unrecorded as unrecorded_module

T2V = "fal-ai/wan-22"
KEY = "held-across-key-7d2a"


@pytest.fixture(autouse=True)
def _journals_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journals go to this test's temporary folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture
def pg(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """The run's PostgreSQL database, migrated, emptied before and after."""
    from tests.conftest import _empty

    engine: Engine = request.getfixturevalue("_pg_engine")
    _empty(engine)
    yield engine
    _empty(engine)


def _runtime(engine: Engine, hostile: HostileProvider, owner: str, policy: str = "resubmit") -> Runtime:
    url = engine.url.render_as_string(hide_password=False)
    settings = settings_for(hostile.url, KEY, database_url=url, submit_unknown_policy=policy)
    rt = make_runtime(engine, settings)
    rt.owner = owner  # another process, as the database sees it (leases, fences)
    return rt


def _marks(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT job_id, request_id FROM held_submissions ORDER BY job_id"))
        return [(str(a), str(b)) for a, b in rows]


def _held_back(
    engine: Engine, hostile: HostileProvider, policy: str = "resubmit"
) -> tuple[Runtime, Runtime, str, str, object]:
    """Process A sends the job, fal accepts it, the database refuses its request id: A holds
    it. Its lease then runs out. Returns A, B (a process on another host), the job, the
    request id and what drops the trigger."""
    request_id = str(uuid.uuid4())
    accept_submits(hostile, request_id)
    holder = _runtime(engine, hostile, "host-a:4101:1")
    other = _runtime(engine, hostile, "host-b:4202:1", policy)
    add_batch(engine, "held", [(T2V, {"prompt": "a lantern on a pier"})])
    (job_id,) = dispatch(holder)
    drop = _refusing(engine, request_id)
    assert submit(holder, job_id) == "unrecorded"
    assert _job(engine, job_id) == ("submitting", None)
    _expire_lease(engine, job_id)
    return holder, other, job_id, request_id, drop


@pytest.mark.parametrize("policy", ["resubmit", "fail"])
def test_another_process_leaves_a_job_held_by_a_live_holder_alone(
    pg: Engine, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    holder, other, job_id, request_id, drop = _held_back(pg, hostile, policy)
    try:
        # Another process's tick, past the lease: was "the worker was lost during the POST",
        # then at once (no webhook receiver) resubmitted and sent again by its dispatch, or
        # failed while fal renders it.
        for _ in range(3):
            reconcile(other)
            sent = dispatch(other)
            for again in sent:
                submit(other, again)
        assert _job(pg, job_id) == ("submitting", None)
        assert hostile.count("POST", ".*") == 1  # fal's ledger: one request, one charge
        with db.read_scope(pg) as session:
            job = store.get_job(session, job_id)
            assert job.attempts == 1
            assert job.error is None
    finally:
        drop()  # type: ignore[operator]

    # The database takes it again: the holder, which does not reconcile (a worker that does not
    # lead), records it all the same — the keeper of its marks tries it again, once due.
    assert _marks(pg) == [(job_id, request_id)]
    monkeypatch.setattr(unrecorded_module, "REFUSED_RETRY_SECONDS", 0.0)
    monkeypatch.setattr(held_module, "RECONCILER_QUIET_SECONDS", 0.0)  # its reconciler is quiet
    (entry,) = holder.unrecorded.waiting()
    holder.unrecorded.refused(entry)  # as if that time had passed
    holder.held.beat()
    deadline = time.monotonic() + 10  # its thread may be at it at that very moment: then it does
    while _job(pg, job_id) != ("queued", request_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _job(pg, job_id) == ("queued", request_id)
    assert _marks(pg) == []
    assert holder.unrecorded.held_job_ids() == set()
    assert hostile.count("POST", ".*") == 1


def test_a_holder_gone_holds_nothing_and_the_lease_rules_apply(pg: Engine, hostile: HostileProvider) -> None:
    """The holder died and no process of its host runs again: its mark is no longer renewed,
    and once it is stale the job is settled as any lost submit (here: resent, a possible
    duplicate charge, as the policy asks)."""
    holder, other, job_id, _request_id, drop = _held_back(pg, hostile)
    try:
        holder.held.close()  # the holder's renewals end with it
        reconcile(other)
        assert _job(pg, job_id) == ("submitting", None)  # its mark is fresh still
        with pg.begin() as conn:
            conn.execute(
                text("UPDATE held_submissions SET seen_at = :old"), {"old": utcnow() - timedelta(minutes=5)}
            )
        reconcile(other)
        with db.read_scope(pg) as session:
            job = store.get_job(session, job_id)
            assert job.state != "submitting"
            assert "possible duplicate charge" in (store.job_events(session, job_id)[-1].reason or "")
    finally:
        drop()  # type: ignore[operator]


def test_a_mark_goes_only_with_the_request_it_names(pg: Engine) -> None:
    """A process that records an older request of a job (from the journal of a holder that
    ended) leaves alone the mark a live process keeps for that job's newer, refused request: the
    job stays held until that one is recorded."""
    job_id = uuid.uuid4().hex
    with db.session_scope(pg) as session:
        store.hold_submissions(session, "host-b:2:", {job_id: "req-new"}, now=utcnow())
    with db.session_scope(pg) as session:
        store.release_held(session, {job_id: "req-old"})
    assert _marks(pg) == [(job_id, "req-new")]
    with db.session_scope(pg) as session:
        store.release_held(session, {job_id: "req-new"})
    assert _marks(pg) == []
