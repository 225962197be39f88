"""A submit whose POST never went out, and whose give-back the database did not take then (the
database away for a moment, the process out of file descriptors): the job is given back as
never sent once its lease lapses — not called "submission outcome unknown" and, by the default
policy, failed as possibly billed for a request fal never saw.

Found by the constrained-machine audit (``EMFILE`` during a submit's own database write).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from jobs import db, store
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.fal.errors import FalUnreachableError, SubmitNotSentError
from worker.steps import Runtime, dispatch, reconcile, submit

KEY = "unsent-give-back-key-3b9f"


def get(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id)


def lease_lapsed(engine: Engine, job_id: str) -> None:
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(
            session, job_id, expected_version=job.version, lease_expires_at=utcnow(), next_attempt_at=None
        )


def refused_once(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``store.give_back`` fails once, as a database out of reach (or a process out of file
    descriptors: SQLite's "unable to open database file") fails it; then works again."""
    real: Callable[..., Any] = store.give_back
    refused: list[str] = []

    def give_back(session: Any, fence: Any, **kwargs: Any) -> Any:
        if not refused:
            refused.append(fence.job_id)
            raise OperationalError("UPDATE jobs", {}, Exception("unable to open database file"))
        return real(session, fence, **kwargs)

    monkeypatch.setattr(store, "give_back", give_back)
    return refused


@pytest.mark.parametrize(
    "failure",
    [
        SubmitNotSentError("could not open a socket: too many open files"),
        FalUnreachableError("connection refused"),
    ],
    ids=["not sent", "fal unreachable"],
)
def test_a_send_that_never_went_out_is_given_back_after_its_lease_even_when_the_first_give_back_failed(
    engine: Engine, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    fal = FakeFal(hostile)
    rt: Runtime = make_runtime(engine, settings_for(hostile.url, KEY))
    try:
        add_batch(engine, "unsent", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})])
        (job_id,) = dispatch(rt)

        def not_sent(*_args: Any, **_kwargs: Any) -> Any:
            raise failure

        monkeypatch.setattr(rt.client, "submit", not_sent)
        refused = refused_once(monkeypatch)
        with pytest.raises(OperationalError):
            submit(rt, job_id)
        assert refused == [job_id]
        stuck = get(engine, job_id)
        assert stuck.state == JobState.SUBMITTING  # its send recorded, its give-back not
        assert stuck.submitted_input is not None

        lease_lapsed(engine, job_id)
        reconcile(rt)
        job = get(engine, job_id)
        assert job.state == JobState.PENDING, (job.state, job.error)
        assert job.error_type == "not_sent"
        assert len(rt.unsent) == 0
        assert fal.posts() == 0  # fal never saw it
    finally:
        rt.client.close()


def test_only_the_send_noted_is_given_back_not_a_later_one(
    engine: Engine, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The note names the send it was made for (its recorded time): a job sent again since,
    whose later POST's outcome is unknown, is not given back on an older send's word."""
    FakeFal(hostile)
    rt: Runtime = make_runtime(engine, settings_for(hostile.url, KEY))
    try:
        add_batch(engine, "unsent", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})])
        (job_id,) = dispatch(rt)
        rt.unsent.note(job_id, utcnow().replace(year=2020), "not sent: an older send")

        def lost(*_args: Any, **_kwargs: Any) -> Any:
            raise KeyboardInterrupt  # the process stopped mid-POST: its outcome is unknown

        monkeypatch.setattr(rt.client, "submit", lost)
        with pytest.raises(KeyboardInterrupt):
            submit(rt, job_id)
        lease_lapsed(engine, job_id)
        reconcile(rt)
        assert get(engine, job_id).state != JobState.PENDING
    finally:
        rt.client.close()
