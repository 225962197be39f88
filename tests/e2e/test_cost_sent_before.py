"""`wanbatch cost` of a batch whose waiting jobs were sent before: a request of theirs ended in
fal's queue at a window's end (timed out or cancelled there, unstarted), and they wait, back in
`pending`, to be sent in the next window. Such a job keeps its `submitted_at`, `request_id` and
`attempts`; `cost` said "not sent yet" of it, where `status` and `cancel` tell it apart."""

from __future__ import annotations

from typing import Any

from jobs.states import JobState
from tests.e2e.e2e_helpers import MakeManifest, Wb

FOUR = """name: four
endpoint: fal-ai/wan-22
items:
  - {prompt: a harbour at dusk, seed: 1}
  - {prompt: a harbour at dawn, seed: 2}
  - {prompt: a harbour at noon, seed: 3}
  - {prompt: a harbour at night, seed: 4}
"""


def _as_a_window_left_them(batch: str) -> None:
    """Of the batch's jobs in id order: one queued at fal; two sent once, their request ended
    unstarted in fal's queue at a window's end, back in ``pending`` (attempts, request id and
    ``submitted_at`` kept, as README **Overnight renders** says); one never sent."""
    from sqlalchemy import update

    from jobs import db, store
    from jobs.models import Job, utcnow
    from jobs.settings import get_settings

    sent = {"submitted_at": utcnow(), "attempts": 1, "unstarted_requests": 1}
    with db.session_scope(db.open_engine(get_settings())) as session:
        batch_id = store.get_batch(session, batch).id
        jobs = sorted(store.jobs_of_batch(session, batch_id), key=lambda j: j.id)
        states: list[tuple[JobState, dict[str, Any]]] = [
            (JobState.QUEUED, {**sent, "unstarted_requests": 0}),
            (JobState.PENDING, sent),
            (JobState.PENDING, sent),
            (JobState.PENDING, {}),
        ]
        for job, (state, values) in zip(jobs, states, strict=True):
            request = {"request_id": f"req-{job.id[:8]}"} if values else {}
            session.execute(update(Job).where(Job.id == job.id).values(state=state, **values, **request))


def test_cost_counts_waiting_jobs_sent_before_apart(wb: Wb, manifest: MakeManifest) -> None:
    assert wb("submit", manifest("four", FOUR)).code == 0
    _as_a_window_left_them("four")

    table = wb("cost", "four")

    assert table.code == 0, table.stderr
    assert (
        "4 job(s) not finished (1 in flight; 1 not sent yet; 2 sent before, waiting to be sent "
        "again, not at fal now): actual is not final yet"
    ) in " ".join(table.stdout.split())
    as_json = wb("cost", "four", "--json")
    assert as_json.code == 0, as_json.stderr
    body = as_json.json()
    for line in (body["total"], *body["by_endpoint"]):
        assert (line["in_flight"], line["waiting"], line["waiting_sent_before"]) == (1, 3, 2)
