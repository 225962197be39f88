"""`cancel` without FAL_KEY, in this process: refused before anything changes when requests are
at fal (cancelling them there needs the key); it used to cancel the unsent jobs, then refuse —
an exit 2 over a half-done cancel. A simulation's cancel needs no key, nor does one of only
unsent jobs."""

from __future__ import annotations

from typing import Any

import pytest

from jobs.states import JobState
from tests.e2e.e2e_helpers import MakeManifest, Wb

THREE = """name: three
endpoint: fal-ai/wan-22
items:
  - prompt: a lighthouse at dusk
    seed: 7
  - prompt: a lighthouse at dawn
    seed: 8
  - prompt: a lighthouse at noon
    seed: 9
"""


def _status(wb: Wb, batch: str) -> dict[str, Any]:
    run = wb("status", batch, "--json")
    assert run.code == 0, run.stdout + run.stderr
    report: dict[str, Any] = run.json()
    return report


def _set_states(batch: str, states: list[JobState]) -> None:
    """Put the batch's jobs, in id order, into ``states`` (a request id for those at fal)."""
    from sqlalchemy import update

    from jobs import db, store
    from jobs.models import Job
    from jobs.settings import get_settings

    with db.session_scope(db.open_engine(get_settings())) as session:
        batch_id = store.get_batch(session, batch).id
        jobs = sorted(store.jobs_of_batch(session, batch_id), key=lambda j: j.id)
        for job, state in zip(jobs, states, strict=True):
            request = job.request_id or f"req-{job.id[:8]}"
            values = {"state": state, "request_id": None if state == JobState.PENDING else request}
            session.execute(update(Job).where(Job.id == job.id).values(**values))


def test_cancel_with_requests_at_fal_and_no_key_changes_nothing(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert wb("submit", manifest("three", THREE)).code == 0
    _set_states("three", [JobState.QUEUED, JobState.PENDING, JobState.PENDING])
    monkeypatch.delenv("FAL_KEY", raising=False)

    refused = wb("cancel", "three", "--no-progress")

    assert refused.code == 2
    assert refused.stderr.strip().splitlines() == [
        "error: FAL_KEY is not set: 1 job(s) of batch three are at fal, and cancelling them there "
        "needs the key; nothing was cancelled (export FAL_KEY=<your fal API key>, then run "
        "`wanbatch cancel three` again)"
    ]
    after = _status(wb, "three")
    assert after["state"] == "active"
    assert (after["counts"]["pending"], after["counts"]["queued"], after["counts"]["cancelled"]) == (2, 1, 0)
    as_json = wb("cancel", "three", "--json", "--no-progress")
    assert as_json.code == 2
    assert as_json.json()["ok"] is False
    assert _status(wb, "three")["counts"]["pending"] == 2


def test_cancel_of_unsent_jobs_needs_no_key(wb: Wb, manifest: MakeManifest) -> None:
    assert wb("submit", manifest("three", THREE)).code == 0
    cancel = wb("cancel", "three", "--json", "--no-progress")
    assert cancel.code == 1, cancel.stderr  # every job cancelled
    assert (cancel.json()["state"], cancel.json()["counts"]["cancelled"]) == ("cancelled", 3)


def test_cancel_of_a_simulation_needs_no_key(wb: Wb, manifest: MakeManifest) -> None:
    assert wb("run", manifest("three", THREE), "--simulate", "--no-progress").code == 0
    _set_states("three", [JobState.QUEUED, JobState.PENDING, JobState.SUCCEEDED])
    cancel = wb("cancel", "three", "--simulate", "--json", "--no-progress")
    assert cancel.code == 1, cancel.stderr
    report = cancel.json()
    assert report["state"] == "cancelled"
    assert report["finished"] == report["total"] == 3
