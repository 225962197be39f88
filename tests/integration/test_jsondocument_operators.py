"""JSON columns in operators on PostgreSQL: ``provider_metrics -> 'inference_time'`` binds its key as
text, not as a JSON document (``jsonb -> jsonb`` does not exist). Found by review: the
``inference`` duration histogram, and with it every /metrics scrape, failed on PostgreSQL once
the JSON type became a TypeDecorator (:class:`jobs.models.JSONDocument`)."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.states import JobState
from tests.step_runtime import add_batch


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_inference_histogram_reads_on_postgresql(engine: Engine) -> None:
    batch = add_batch(engine, "m", [("fal-ai/wan-22", {"prompt": "p"})])
    with db.session_scope(engine) as session:
        job = next(iter(store.jobs_of_batch(session, batch)))
        job_id, version = job.id, job.version
    with db.session_scope(engine) as session:
        assert store.transition(
            session,
            job_id,
            JobState.PENDING,
            JobState.FAILED,
            expected_version=version,
            provider_metrics={"inference_time": 4.2},
        )
    with db.read_scope(engine) as session:
        counts, total = store.duration_histogram(session, "inference", [1.0, 10.0])
    assert counts == [0, 1, 0]
    assert total == pytest.approx(4.2)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_metrics_scrape_of_an_empty_postgresql_database_says_database_up(engine: Engine) -> None:
    """The whole /metrics scrape reads every duration histogram: on PostgreSQL the failing
    ``inference`` query makes the database look down (or the scrape fail), jobs or not."""
    from jobs.settings import Settings
    from tests.integration.test_metrics import scrape, value

    samples = scrape(engine, Settings())
    assert value(samples, "wanbatch_database_up") == 1
    assert value(samples, "wanbatch_jobs", state="pending") == 0
