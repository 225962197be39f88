"""``rerun`` of jobs fal made and billed but whose video was never downloaded: said, never silent.

The audit: after a CDN outage failed 8 paid jobs at download, ``rerun --failed-only`` rendered
them again without a word, and the ledger went $4.00 → $8.80.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, update

from jobs import db, store
from jobs.models import Job
from jobs.rerun import rerun_batch
from jobs.settings import Settings
from jobs.states import JobState as S


def _job(i: int) -> store.NewJob:
    return store.NewJob(
        key=f"{i:064x}",
        item_index=i,
        endpoint="fal-ai/wan-22",
        input={"prompt": f"p{i}", "resolution": "720p"},
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.40"),
    )


def _failed(engine: Engine, batch_id: str, item: int, **values: Any) -> None:
    with db.session_scope(engine) as session:
        session.execute(
            update(Job)
            .where(Job.batch_id == batch_id, Job.item_index == item)
            .values(state=S.FAILED, **values)
        )


@pytest.mark.parametrize("failed_only", [True, False], ids=["failed-only", "plain"])
def test_a_rerun_says_how_many_paid_videos_it_pays_for_again(engine: Engine, failed_only: bool) -> None:
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session, name="dl1", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
        )
        store.add_jobs(session, batch.id, [_job(i) for i in range(4)])
    paid = {"seed": 7, "actual_usd": Decimal("0.40"), "request_id": "r"}
    _failed(
        engine, batch.id, 0, error_type="download_failed", error="download failed 5 time(s): HTTP 503", **paid
    )
    _failed(
        engine, batch.id, 1, error_type="download_failed", error="download failed 5 time(s): HTTP 503", **paid
    )
    _failed(engine, batch.id, 2, error_type="result_unavailable", error="could not get fal's result", **paid)
    _failed(engine, batch.id, 3, seed=7, error_type="model_error", actual_usd=Decimal(0))  # not paid
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))

    result = rerun_batch("dl1", failed_only=failed_only, settings=settings)

    said = [w for w in result.warnings if "paid" in w]
    assert len(said) == 1, result.warnings
    line = said[0]
    assert "3 job(s) of batch dl1" in line
    assert "$1.20" in line  # fal billed them once already
    assert "again" in line
    assert "download" in line


def test_a_rerun_says_how_many_possibly_billed_submits_it_sends_again(engine: Engine) -> None:
    """A submit whose outcome was never known (``submit_unknown``: a ``run`` killed before it
    stored fal's answer) is possibly billed; ``rerun --failed-only`` sent it again without a word
    and fal billed it twice (an audit: 25 of 28 such jobs had been billed)."""
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session, name="k1", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
        )
        store.add_jobs(session, batch.id, [_job(i) for i in range(3)])
    unknown = {"error_type": "submit_unknown", "error": "the submit's outcome is unknown"}
    _failed(engine, batch.id, 0, ambiguous_usd=Decimal("0.40"), **unknown)
    _failed(engine, batch.id, 1, ambiguous_usd=Decimal("0.40"), **unknown)
    _failed(engine, batch.id, 2, error_type="model_error", actual_usd=Decimal(0))  # not billed
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))

    result = rerun_batch("k1", failed_only=True, settings=settings)

    said = [w for w in result.warnings if "possibly billed" in w]
    assert len(said) == 1, result.warnings
    assert "2 job(s) of batch k1 may already have been made and billed ($0.80 possibly billed" in said[0]
    assert "sends them again and pays for them again (est. $" in said[0]


def test_the_rerun_points_at_the_video_urls_only_of_the_jobs_that_have_one(engine: Engine) -> None:
    """A result that expired (``result_expired``) or whose call failed (``result_unavailable``)
    left no ``provider_output``: the warning said fal might still serve "those videos" and that
    `export` gave each URL, for jobs of which neither was true."""
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session, name="ex1", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
        )
        store.add_jobs(session, batch.id, [_job(i) for i in range(3)])
    paid = {"seed": 7, "actual_usd": Decimal("0.40"), "request_id": "r"}
    expired = {"error_type": "result_expired", "error": "fal result expired or unknown (HTTP 404)"}
    _failed(engine, batch.id, 0, **expired, **paid)
    _failed(engine, batch.id, 1, **expired, **paid)
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))

    (line,) = [w for w in rerun_batch("ex1", failed_only=True, settings=settings).warnings if "paid" in w]
    assert "2 job(s) of batch ex1 were made and paid for ($0.80)" in line
    assert "may still serve" not in line
    assert "provider_output" not in line
    assert "fal no longer keeps the result of 2 of them (result_expired)" in line

    # One whose video URL fal gave (download_failed): pointed at, and only it.
    video = {"video": {"url": "https://v3.fal.media/files/x/out.mp4"}, "seed": 7}
    _failed(
        engine, batch.id, 2, error_type="download_failed", error="HTTP 503", provider_output=video, **paid
    )
    again = rerun_batch("ex1", failed_only=True, settings=settings, pay_again=True)  # 0, 1 sent above
    (line,) = [w for w in again.warnings if "paid" in w]
    assert "3 job(s) of batch ex1 were made and paid for ($1.20)" in line
    assert "fal may still serve the videos of 1 of them (`wanbatch export ex1` gives each one's URL" in line
    assert "fal no longer keeps the result of 2 of them (result_expired)" in line
