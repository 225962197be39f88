"""The batch page's "committed" figure is the true share of the budget cap, over 100 % too.

Audit: a batch that had committed $19.80 of a $10.00 cap read "budget cap $10.00 · 100%
committed": the figure went through the bar-width helper, which clamps to 0–100. The text now
says 198 %, flagged as over the cap; the bar still ends at its edge.
"""

from __future__ import annotations

import re
from decimal import Decimal
from html import unescape
from pathlib import Path

import pytest
from sqlalchemy import Engine

from jobs import store
from jobs.db import session_factory
from jobs.models import utcnow
from jobs.states import JobState
from tests.web.web_helpers import ENDPOINTS, HTML, app_for, client, make_batch, new_job, set_job, settings_for
from web.dashboard import percent, share


def _page(engine: Engine, output_dir: Path, budget: str, costs: list[str]) -> str:
    """The batch page of a batch under ``budget`` whose jobs succeeded at ``costs``, as text."""
    with session_factory(engine)() as session:
        batch = make_batch(
            session,
            "over-cap",
            [new_job(i, endpoint=ENDPOINTS[0]) for i in range(len(costs))],
            budget=Decimal(budget),
        )
        for job, cost in zip(store.jobs_of_batch(session, batch.id), costs, strict=True):
            set_job(
                session,
                job.id,
                state=JobState.SUCCEEDED,
                attempts=1,
                submitted_at=utcnow(),
                finished_at=utcnow(),
                actual_usd=Decimal(cost),
            )
        session.commit()
        batch_id = batch.id
    page = client(app_for(engine, settings_for(engine, output_dir))).get(f"/batches/{batch_id}", headers=HTML)
    assert page.status_code == 200
    return page.text


def _text(html: str) -> str:
    """The page's words, tags dropped and white space folded."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def test_a_batch_over_its_cap_shows_how_far_over(sqlite_engine: Engine, output_dir: Path) -> None:
    html = _page(sqlite_engine, output_dir, "10", ["9.90", "9.90"])
    text = _text(html)
    assert "budget cap $10.00 · 198% committed, over the cap" in text
    assert "100% committed" not in text
    assert (
        '<span class="warn-text" title="spent and at fal now: more than the budget cap">198% committed'
        in html
    )
    assert 'class="mbar-spent over"' in html  # the bar: full, in the over-the-cap colour


def test_a_batch_under_its_cap_reads_as_before(sqlite_engine: Engine, output_dir: Path) -> None:
    text = _text(_page(sqlite_engine, output_dir, "10", ["2.50"]))
    assert "budget cap $10.00 · 25% committed" in text
    assert "over the cap" not in text


@pytest.mark.parametrize(
    ("part", "whole", "bar", "read"),
    [
        (Decimal("19.80"), Decimal("10"), 100.0, 198.0),
        (1, 4, 25.0, 25.0),
        (3, 0, 0.0, 0.0),
        (-1, 4, 0.0, 0.0),
    ],
)
def test_the_bar_is_clamped_and_the_figure_is_not(
    part: Decimal, whole: Decimal, bar: float, read: float
) -> None:
    assert percent(part, whole) == pytest.approx(bar)
    assert share(part, whole) == pytest.approx(read)
