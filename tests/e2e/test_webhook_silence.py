"""A run with WANBATCH_WEBHOOK_URL whose webhooks never arrive (nothing listens there) says so.

Before: nothing followed fal's status streams and the receiver got nothing, so every completion
came from the safety net's poll (WANBATCH_WEBHOOK_POLL_AFTER after the submit), each job holding
its slot meanwhile, and neither `run` nor `status` said why the batch crawled. Now both say it
in one line, naming WANBATCH_WEBHOOK_URL and `wanbatch doctor`.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine

import jobs.webhook_silence
from falsim.server import SimulatorHandle
from jobs import store
from jobs.models import WebhookDelivery, utcnow
from jobs.settings import Settings
from jobs.states import JobState
from jobs.webhook_silence import SILENT_JOBS, silence
from tests.e2e.e2e_helpers import MakeManifest, Wb
from tests.ports import unused_port

SIX = "name: six\nendpoint: fal-ai/wan-22\nitems:\n" + "".join(
    f"  - prompt: a lighthouse, take {n}\n    seed: {n}\n" for n in range(6)
)
LINE = "no webhook came for any of the last"


def test_run_and_status_say_that_no_webhook_comes(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = f"http://127.0.0.1:{unused_port()}/webhooks/fal"
    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", nowhere)
    monkeypatch.setenv("WANBATCH_WEBHOOK_POLL_AFTER", "0.2")  # the safety net, quick here
    monkeypatch.setattr(jobs.webhook_silence, "LOOK_EVERY_SECONDS", 0.0)
    run = wb("run", manifest("six", SIX), "--no-progress")
    assert run.code == 0, run.stdout + run.stderr
    said = [line for line in run.stderr.splitlines() if LINE in line]
    assert len(said) == 1, run.stderr  # once
    assert "WANBATCH_WEBHOOK_URL" in said[0]
    assert nowhere in said[0]
    assert "`wanbatch doctor`" in said[0]
    status = wb("status", "six")
    assert status.code == 0, status.stderr
    assert LINE in status.stderr
    assert "`wanbatch doctor`" in status.stderr
    # Without a receiver configured, nothing is said.
    monkeypatch.delenv("WANBATCH_WEBHOOK_URL")
    assert LINE not in wb("status", "six").stderr


def _ended(session: object, batch_id: str, n: int) -> list[str]:
    ids = []
    for job in list(store.jobs_of_batch(session, batch_id))[:n]:  # type: ignore[arg-type]
        job.state = JobState.SUCCEEDED
        job.request_id = f"req-{job.id}"
        job.submitted_at = utcnow() - timedelta(seconds=60)
        ids.append(job.id)
    return ids


def test_one_delivery_or_few_jobs_say_nothing(engine: Engine) -> None:
    from jobs.db import session_scope
    from tests.web.web_helpers import make_batch, new_job

    settings = Settings(webhook_url="https://hooks.example.com/webhooks/fal")
    since = utcnow() - timedelta(minutes=5)
    with session_scope(engine) as session:
        batch = make_batch(
            session, "b", [new_job(i, endpoint="fal-ai/wan-22") for i in range(SILENT_JOBS + 2)]
        )
        ids = _ended(session, batch.id, SILENT_JOBS - 1)
    with session_scope(engine) as session:
        assert silence(session, settings, batch.id, since=since) is None  # too few to tell
    with session_scope(engine) as session:
        ids = _ended(session, batch.id, SILENT_JOBS + 1)
    with session_scope(engine) as session:
        line = silence(session, settings, batch.id, since=since)
        assert line is not None
        assert f"last {SILENT_JOBS + 1} jobs" in line
        assert silence(session, Settings(), batch.id, since=since) is None  # no receiver configured
        assert silence(session, settings, batch.id, since=utcnow()) is None  # sent before the window
        session.add(
            WebhookDelivery(
                request_id=f"req-{ids[0]}", body_sha256="0" * 64, job_id=ids[0], status="OK", body={}
            )
        )
    with session_scope(engine) as session:
        assert silence(session, settings, batch.id, since=since) is None  # fal reaches the receiver


def test_a_simulated_batch_says_nothing(engine: Engine) -> None:
    """A ``run --simulate`` sends to the bundled simulator without a webhook (its settings drop
    WANBATCH_WEBHOOK_URL): ``status`` of that batch with WANBATCH_WEBHOOK_URL set said that fal
    cannot deliver to it, of jobs fal never saw."""
    from sqlalchemy import update

    from jobs.db import session_scope
    from jobs.models import Batch
    from tests.web.web_helpers import make_batch, new_job

    settings = Settings(webhook_url="https://hooks.example.com/webhooks/fal")
    since = utcnow() - timedelta(minutes=5)
    with session_scope(engine) as session:
        batch = make_batch(
            session, "sim", [new_job(i, endpoint="fal-ai/wan-22") for i in range(SILENT_JOBS + 1)]
        )
        _ended(session, batch.id, SILENT_JOBS + 1)
    with session_scope(engine) as session:
        assert silence(session, settings, batch.id, since=since) is not None  # sent to fal: said
        session.execute(update(Batch).where(Batch.id == batch.id).values(simulated=True))
    with session_scope(engine) as session:
        assert silence(session, settings, batch.id, since=since) is None


def test_run_says_nothing_once_a_webhook_came_though_it_is_pruned_later(engine: Engine) -> None:
    """A run that saw fal's webhooks arrive, then waited (a schedule's closed window, a daily cap)
    past WANBATCH_WEBHOOK_RETENTION: the tick pruned the applied deliveries, and the run said
    that no webhook came for any of its jobs. Once one came, the run looks no more."""
    from sqlalchemy import delete

    from jobs.db import session_scope
    from jobs.webhook_silence import SilenceWatch
    from tests.web.web_helpers import make_batch, new_job

    settings = Settings(webhook_url="https://hooks.example.com/webhooks/fal")
    since = utcnow() - timedelta(minutes=5)
    now = [0.0]
    with session_scope(engine) as session:
        batch = make_batch(
            session, "pruned", [new_job(i, endpoint="fal-ai/wan-22") for i in range(SILENT_JOBS + 1)]
        )
        ids = _ended(session, batch.id, SILENT_JOBS + 1)
        for job_id in ids:
            session.add(
                WebhookDelivery(
                    request_id=f"req-{job_id}", body_sha256="0" * 64, job_id=job_id, status="OK", body={}
                )
            )
    watch = SilenceWatch(settings, batch.id, since, clock=lambda: now[0])
    with session_scope(engine) as session:
        assert watch.unsaid(session) is None  # they came
        session.execute(delete(WebhookDelivery))  # prune_deliveries, WANBATCH_WEBHOOK_RETENTION later
    now[0] += 3600.0
    with session_scope(engine) as session:
        assert watch.unsaid(session) is None
