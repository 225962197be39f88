"""A daily-cap refusal says whose spending used the day's cap up, on both databases.

``WANBATCH_DAILY_BUDGET_USD`` is summed over every batch of the database (README: "all
batches"), and an audit had three people share one PostgreSQL database and one fal account:
Alice, capped at $5, had every job cancelled with "submitting would commit $31.39 of today's
$5.00 cap", $30.59 of it Bob's and Carol's batches — which nothing said. The refusal now names
the other batches that hold part of the day's money, the largest first, and how much they hold;
read in one grouped query, and only by a round that refuses a job for the day's cap.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, cast

import pytest
from sqlalchemy import Engine, update

from jobs import db, store
from jobs.manifest.expand import Manifest
from jobs.models import Job, utcnow
from jobs.money import DAILY_CAP_ERROR, DaySpender
from jobs.states import JobState
from tests.sample_inputs import INPUTS
from tests.step_runtime import add_batch, job_ids, job_states, make_runtime, settings_for
from worker.steps import dispatch

WAN = ("fal-ai/wan-22", INPUTS["fal-ai/wan-22"])
URL = "http://127.0.0.1:9"
KEY = "daily-cap-whose-key"


def _at_fal(engine: Engine, name: str, estimates: list[str], *, simulated: bool = False) -> str:
    """A batch whose jobs fal holds now, sent today: each reserves its estimate for the day."""
    batch_id = add_batch(engine, name, [WAN] * len(estimates), simulated=simulated)
    ids = job_ids(engine, batch_id)  # read before the write opens: SQLite has one writer
    with db.session_scope(engine) as session:
        for job_id, usd in zip(ids, estimates, strict=True):
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(state=JobState.QUEUED, est_usd=Decimal(usd), submitted_at=utcnow())
            )
    return batch_id


def _errors(engine: Engine, batch_id: str) -> set[tuple[str | None, str | None]]:
    with db.read_scope(engine) as session:
        return {(j.error, j.error_type) for j in store.jobs_of_batch(session, batch_id)}


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """Each read of the day's sum by batch (the real query runs: only its calls are counted)."""
    calls: list[datetime] = []
    real: Callable[..., list[DaySpender]] = store.committed_usd_today_by_batch

    def counting(session: Any, now: datetime) -> list[DaySpender]:
        calls.append(now)
        return real(session, now)

    monkeypatch.setattr(store, "committed_usd_today_by_batch", counting)
    return calls


def test_the_refusal_names_the_other_batches_that_hold_the_day(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _at_fal(engine, "bob-lh", ["10.00", "10.00"])  # $20.00
    _at_fal(engine, "carol-lh", ["10.59"])
    _at_fal(engine, "rehearsal", ["50.00"], simulated=True)  # made-up money: never counted, never named
    alice = add_batch(engine, "alice-day", [WAN] * 3, est_usd=Decimal("0.80"))
    calls = _counted(monkeypatch)
    settings = settings_for(URL, KEY, daily_budget_usd=Decimal(5))
    assert dispatch(make_runtime(engine, settings, batch_ids=frozenset({alice}))) == []
    assert job_states(engine, alice) == {"cancelled": 3}
    words = (
        "budget: submitting would commit $31.39 of today's $5.00 cap "
        "(WANBATCH_DAILY_BUDGET_USD; $30.59 of it by other batches: bob-lh, carol-lh)"
    )
    # The job refused when claimed and the two ended with it, set-based: the same words.
    assert _errors(engine, alice) == {(words, DAILY_CAP_ERROR)}
    assert len(calls) == 1  # one grouped read for the round, not one per job


def test_the_batches_own_money_is_not_someone_elses_and_many_are_counted(engine: Engine) -> None:
    """The refused batch's own money today is not "other batches'"; past three names, the rest
    are counted. What this round sends of the batch is counted as its own too."""
    for name, usd in (("b1", "2.00"), ("b2", "1.50"), ("b3", "1.00"), ("b4", "0.25"), ("b5", "0.25")):
        _at_fal(engine, name, [usd])
    own = add_batch(engine, "own", [WAN] * 6, est_usd=Decimal("0.50"))
    settings = settings_for(URL, KEY, daily_budget_usd=Decimal(6))
    # $5.00 of others: two of own's fit ($6.00), the third is refused.
    assert len(dispatch(make_runtime(engine, settings, batch_ids=frozenset({own})))) == 2
    words = (
        "budget: submitting would commit $6.50 of today's $6.00 cap "
        "(WANBATCH_DAILY_BUDGET_USD; $5.00 of it by other batches: b1, b2, b3 and 2 more)"
    )
    assert _errors(engine, own) == {(None, None), (words, DAILY_CAP_ERROR)}


def test_no_other_batch_no_breakdown_and_no_read_without_a_refusal(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _counted(monkeypatch)
    alone = add_batch(engine, "alone", [WAN] * 3, est_usd=Decimal("0.25"))
    settings = settings_for(URL, KEY, daily_budget_usd=Decimal("10"))
    assert len(dispatch(make_runtime(engine, settings, batch_ids=frozenset({alone})))) == 3
    assert calls == []  # nothing refused: the day's sum by batch is never read

    more = add_batch(engine, "more", [WAN] * 2, est_usd=Decimal("0.25"))
    tight = settings_for(URL, KEY, daily_budget_usd=Decimal("0.80"))
    assert len(dispatch(make_runtime(engine, tight, batch_ids=frozenset({more})))) == 0
    words = (
        "budget: submitting would commit $1.00 of today's $0.80 cap "
        "(WANBATCH_DAILY_BUDGET_USD; $0.75 of it by other batches: alone)"
    )
    assert _errors(engine, more) == {(words, DAILY_CAP_ERROR)}

    # Only its own money today: the words are as before, no breakdown.
    solo = settings_for(URL, KEY, daily_budget_usd=Decimal("0.50"))
    left = add_batch(engine, "left", [WAN] * 3, est_usd=Decimal("0.25"))
    with db.session_scope(engine) as session:
        session.execute(update(Job).where(Job.batch_id != left).values(state=JobState.CANCELLED))
    assert len(dispatch(make_runtime(engine, solo, batch_ids=frozenset({left})))) == 2
    plain = "budget: submitting would commit $0.75 of today's $0.50 cap (WANBATCH_DAILY_BUDGET_USD)"
    assert _errors(engine, left) == {(None, None), (plain, DAILY_CAP_ERROR)}


def test_a_stored_name_with_a_line_break_stays_on_the_refusals_one_line(engine: Engine) -> None:
    """A batch name stored before line breaks and tabs were refused (README: shown escaped) is
    named in another batch's refusal as ``status`` shows it, ``\\n`` and ``\\t`` escaped: the
    refusal is one line (its ``dispatch`` log line, ``status``, ``export``), and an old name must
    not break it — nor ``validate``'s warning, which names the same batches."""
    from jobs.estimates import daily_budget_issues
    from jobs.pricing import Totals

    _at_fal(engine, "old\nname\tone", ["2.00"])
    mine = add_batch(engine, "mine", [WAN], est_usd=Decimal("0.80"))
    settings = settings_for(URL, KEY, daily_budget_usd=Decimal(2))
    assert dispatch(make_runtime(engine, settings, batch_ids=frozenset({mine}))) == []
    ((error, kind),) = _errors(engine, mine)
    assert kind == DAILY_CAP_ERROR
    assert error is not None
    assert "\n" not in error
    assert "\t" not in error
    assert error.endswith("$2.00 of it by other batches: old\\nname\\tone)")

    with db.read_scope(engine) as session:
        today = store.committed_usd_today_by_batch(session, utcnow())
    totals = Totals()
    totals.usd = Decimal("1.00")
    totals.jobs = 1
    manifest = cast(Manifest, SimpleNamespace(name="mine", display="mine.yaml"))
    (issue,) = daily_budget_issues(manifest, totals, Decimal(2), today)
    assert "\n" not in str(issue)
    assert "by other batches: old\\nname\\tone" in str(issue)
