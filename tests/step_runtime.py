"""Driving the step functions directly against a fal (the simulator or the hostile provider).

The CLI runs the same steps through Celery; tests that must act *between* steps (cancel while
two requests run and six wait, look at a job right after its submit) call them one by one:
``dispatch`` claims, ``submit`` sends, ``poll`` asks for status, ``cancel_jobs_of_cancelled_batches``
cancels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Engine

from jobs import db, store
from jobs.settings import Settings
from worker.fal.client import FalClient
from worker.runtime import build_runtime
from worker.steps import Runtime
from worker.steps.poll import Seen

#: Timing that makes a step-driven test take a fraction of a second per round.
FAST: dict[str, float] = {
    "poll_min_interval": 0.05,
    "poll_max_interval": 0.2,
    "tick_interval": 0.05,
    "retry_base_delay": 0.0,
    "submit_rate": 100.0,
    "queue_wait_backoff": 0.0,
}


def settings_for(url: str, key: str, **overrides: Any) -> Settings:
    """Settings pointing the queue and REST APIs at ``url``, with ``key`` and fast timing."""
    return Settings(
        FAL_KEY=SecretStr(key),
        fal_queue_url=url,
        fal_rest_url=url,
        **{**FAST, **overrides},
    )


def _not_run(_job_id: str) -> None:
    """A hand-off that does nothing: the test calls the next step itself."""


def make_runtime(
    engine: Engine,
    settings: Settings,
    client: FalClient | None = None,
    *,
    enqueue_submit: Callable[[str], None] = _not_run,
    enqueue_download: Callable[[str], None] = _not_run,
    batch_ids: frozenset[str] | None = None,
    simulated: bool = False,
) -> Runtime:
    """A runtime whose submit and download "tasks" are not run (tests call the steps themselves),
    unless the test passes its own hand-offs (e.g. ``list.append`` to see what was handed on).
    ``batch_ids`` and ``simulated``: as an embedded ``run`` (``--simulate``) of those batches.

    Without ``client``, one is built from ``settings``; a missing FAL_KEY is allowed, for steps
    that never call fal (dispatch, scheduling downloads)."""
    return build_runtime(
        enqueue_submit=enqueue_submit,
        enqueue_download=enqueue_download,
        settings=settings,
        allow_missing_key=True,
        batch_ids=batch_ids,
        simulated=simulated,
        engine=engine,
        client=client,
    )


def add_batch(
    engine: Engine,
    name: str,
    jobs: Sequence[tuple[str, dict[str, Any]]],
    *,
    est_billing_units: Decimal = Decimal(5),
    est_usd: Decimal = Decimal("0.25"),
    simulated: bool = False,
) -> str:
    """A batch of ``(endpoint, input)`` jobs, stored as ``submit`` would (``simulated``: as
    ``run --simulate`` would); returns its id.

    Every job is estimated at ``est_billing_units`` and ``est_usd``."""
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session,
            name=name,
            manifest_path=f"{name}.yaml",
            manifest_sha256="0" * 64,
            budget_max_usd=None,
            simulated=simulated,
        )
        store.add_jobs(
            session,
            batch.id,
            (
                store.NewJob(
                    key=f"{i:064x}",
                    item_index=i,
                    endpoint=endpoint,
                    input=payload,
                    est_billing_units=est_billing_units,
                    est_usd=est_usd,
                )
                for i, (endpoint, payload) in enumerate(jobs)
            ),
        )
        return batch.id


def job_ids(engine: Engine, batch_id: str) -> list[str]:
    """The batch's job ids, in item order (by their ids alone: a migration test reads them at a
    schema older than the models')."""
    from sqlalchemy import select

    from jobs.models import Job

    with engine.connect() as conn:
        query = (
            select(Job.id)
            .where(Job.batch_id == batch_id)
            .order_by(Job.item_index, Job.variant, Job.created_at, Job.id)
        )
        return list(conn.execute(query).scalars())


def job_states(engine: Engine, batch_id: str) -> dict[str, int]:
    """Jobs per state (only states that have some)."""
    with db.session_scope(engine) as session:
        return {k: v for k, v in store.counts_by_state(session, batch_id).items() if v}


def wait_until(predicate: Callable[[], bool], *, step: Callable[[], object], timeout: float = 15.0) -> None:
    """Run ``step`` until ``predicate`` holds; fail with the last state after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        step()
        time.sleep(0.02)


def completion_heard(engine: Engine, rt: Runtime, job_id: str) -> Seen:
    """The status event a stream would report for ``job_id``, sent and completed at fal: asked
    of fal now, not yet applied (the test applies it)."""
    with db.read_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.request_id is not None
    status = rt.client.status(rt.client.handle(job.endpoint, job.request_id))
    assert status.completed
    return Seen(job_id, job.request_id, status)


def ended_beat_owner(owner: str) -> str:
    """The heartbeat owner a process of this host named ``owner`` (``host:pid:thread``) wrote, with
    the proof of its identity (:func:`jobs.processes.beat_owner`), once its pid no longer runs:
    what a killed ``run`` leaves behind (its start time is moot: the pid is gone)."""
    from jobs import processes

    return f"{owner}{processes.IDENTITY_MARK}{processes.namespace_here()}.0"
