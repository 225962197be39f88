"""What `run` and `status` advise for jobs a budget cap cancelled: a command that can work."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, cast

from cli.output import _budget_advice, daily_cap_in_force, daily_cap_origin, daily_cap_words
from jobs.batches import BatchReport
from jobs.money import daily_cap_in
from jobs.settings import Settings

BATCH_ID = "a9262bde" + "0" * 24
NOTHING_RENDERED = {"jobs": 0, "cancelled_for_budget": 0, "cancelled_for_daily_budget": 0, "reruns": []}


def _report(**fields: Any) -> BatchReport:
    base = {"batch": BATCH_ID, "name": "sweep", "cancelled_for_budget": 3, "cancelled_for_daily_budget": 0}
    covered = {"rerun_rendered": NOTHING_RENDERED, "rerun_pending": NOTHING_RENDERED}
    return cast(BatchReport, {**base, "simulated": False, "parent_batch": None, **covered, **fields})


#: A rerun batch: no manifest of its own to raise the cap in.
RERUN = {"parent_batch": "c" * 32}
#: What a batch made from a manifest is advised first (its cap raised there, run again).
RAISE = (
    "raise budget.max_usd in its manifest, then `wanbatch run MANIFEST` (the jobs its cap "
    "cancelled unsent are sent under the new cap), or "
)


def test_the_batch_cap_advises_raising_it_in_the_manifest_or_a_new_cap() -> None:
    """Raised in the manifest and run again, the jobs its cap cancelled unsent are sent under
    the one cap the user set; a rerun with ``--max-usd`` is a new batch with a cap of its own."""
    assert _budget_advice(_report()) == [
        f"  to run them: {RAISE}`wanbatch rerun sweep --failed-only --max-usd AMOUNT`"
    ]


def test_a_reruns_cap_advises_a_new_cap() -> None:
    assert _budget_advice(_report(**RERUN)) == [
        "  to run them: `wanbatch rerun sweep --failed-only --max-usd AMOUNT`"
    ]


def test_a_simulation_is_rerun_on_the_simulator() -> None:
    (advice,) = _budget_advice(_report(simulated=True))
    assert "`wanbatch run MANIFEST --simulate`" in advice
    assert "`wanbatch rerun sweep --failed-only --simulate --max-usd AMOUNT`" in advice


def test_the_daily_cap_advises_the_setting_or_the_next_day() -> None:
    advice = _budget_advice(_report(cancelled_for_daily_budget=3))
    assert advice == [
        "  3 by today's cap (WANBATCH_DAILY_BUDGET_USD): raise it, or wait for the next UTC day, "
        "then `wanbatch rerun sweep --failed-only`"
    ]


def _rendered(budget: int, daily: int = 0) -> dict[str, Any]:
    rerun = {"batch": "b" * 32, "name": "sweep-rerun-1", "jobs": budget}
    return {
        "jobs": budget,
        "cancelled_for_budget": budget,
        "cancelled_for_daily_budget": daily,
        "reruns": [rerun],
    }


def test_jobs_a_rerun_rendered_are_not_advised_again() -> None:
    assert _budget_advice(_report(rerun_rendered=_rendered(3))) == []
    assert _budget_advice(_report(rerun_rendered=_rendered(1), **RERUN)) == [
        "  to run the other 2: `wanbatch rerun sweep --failed-only --max-usd AMOUNT`"
    ]


def test_daily_cap_jobs_a_rerun_rendered_are_not_advised_again() -> None:
    advice = _budget_advice(_report(cancelled_for_daily_budget=3, rerun_rendered=_rendered(2, daily=2)))
    assert advice == [
        "  1 by today's cap (WANBATCH_DAILY_BUDGET_USD): raise it, or wait for the next UTC day, "
        "then `wanbatch rerun sweep --failed-only`"
    ]


def test_jobs_an_unfinished_rerun_repeats_are_not_advised_again() -> None:
    """Another rerun of them, before that one has run, would pay for them twice."""
    assert _budget_advice(_report(rerun_pending=_rendered(3))) == []
    advice = _budget_advice(_report(rerun_rendered=_rendered(1), rerun_pending=_rendered(1), **RERUN))
    assert advice == ["  to run the other 1: `wanbatch rerun sweep --failed-only --max-usd AMOUNT`"]


def test_a_name_another_command_would_read_otherwise_is_advised_by_the_id() -> None:
    """A name like an id prefix (refused as ambiguous once another batch's id starts with it), or
    one the shell would split: 12 characters of the id, never 8 (which a name could shadow)."""
    for name in ("73116756", "my sweep"):
        assert _budget_advice(_report(name=name, **RERUN)) == [
            "  to run them: `wanbatch rerun a9262bde0000 --failed-only --max-usd AMOUNT`"
        ]


def test_the_daily_cap_the_workers_applied_is_named_where_it_is_set() -> None:
    """With a broker the workers dispatch: their WANBATCH_DAILY_BUDGET_USD applied. An audit ran
    ``WANBATCH_DAILY_BUDGET_USD=100 wanbatch run`` beside workers with 3.00: every job was
    cancelled, and the advice said "raise it", with no word that only the workers' value counts."""
    workers = {"3.00": ["worker pid 12@host-a", "worker pid 7@host-b"]}
    where = daily_cap_words(Decimal(100), workers)
    assert where == (
        "the workers' setting applies, not this process's (100): 3.00 on worker pid 12@host-a, "
        "worker pid 7@host-b; raise it where the workers run and restart them"
    )
    advice = _budget_advice(_report(cancelled_for_daily_budget=3), daily_cap_from=where)
    assert advice == [
        f"  3 by today's cap (WANBATCH_DAILY_BUDGET_USD): {where}, or wait for the next UTC day, "
        "then `wanbatch rerun sweep --failed-only`"
    ]
    # The same value as here: still the workers' to raise. None read: said all the same.
    assert daily_cap_words(Decimal("3.00"), {"3.00": ["worker pid 12@host-a"]}) == (
        "the workers' setting applies (3.00 on each): raise it where the workers run and restart them"
    )
    assert daily_cap_words(None, {}) == (
        "the workers' setting applies, not this process's ((unset)): raise it where the workers run "
        "and restart them"
    )


#: A job the day's cap refused in Alice's run (WANBATCH_DAILY_BUDGET_USD=5), as ``status`` lists it.
ALICE_REFUSAL = (
    "budget: submitting would commit $31.39 of today's $5.00 cap "
    "(WANBATCH_DAILY_BUDGET_USD; $30.59 of it by other batches: bob-lh, carol-lh)"
)


def _refused(error: str = ALICE_REFUSAL) -> BatchReport:
    failures = [
        {"state": "cancelled", "error_type": "daily_budget", "count": 3, "example": error, "sent": False}
    ]
    return _report(name="alice-day", cancelled_for_daily_budget=3, failures=failures)


def test_a_daily_cap_that_is_not_this_shells_is_named() -> None:
    """An audit: Bob (his own setting unset, or 500) ran ``status alice-day`` and was told
    "raise it" — of Alice's $5 cap, the one in force when her run refused the jobs."""
    assert daily_cap_in(ALICE_REFUSAL) == Decimal("5.00")
    assert daily_cap_in("budget: submitting would commit $1.25 of the batch's $1.00 cap") is None
    where = daily_cap_in_force(None, _refused())
    assert where == (
        "the cap in force was $5.00 (the run's setting); this shell's is unset: "
        "raise it where the batch is run"
    )
    assert daily_cap_in_force(Decimal(500), _refused()) == (
        "the cap in force was $5.00 (the run's setting); this shell's is $500.00: "
        "raise it where the batch is run"
    )
    # Without a broker, status and run say it in their advice.
    bob = Settings(broker_url=None, daily_budget_usd=None)
    assert daily_cap_origin(bob, _refused()) == where
    assert _budget_advice(_refused(), daily_cap_from=where) == [
        f"  3 by today's cap (WANBATCH_DAILY_BUDGET_USD): {where}, or wait for the next UTC day, "
        "then `wanbatch rerun alice-day --failed-only`"
    ]


def test_the_same_daily_cap_as_this_shells_says_only_raise_it() -> None:
    """Alice's own ``status``: her setting is the one that applied (to the decimals the refusal
    showed: $5.00 is 5, and 5.004); nothing more to say. None known: nothing said either."""
    for mine in ("5", "5.00", "5.004"):
        assert daily_cap_in_force(Decimal(mine), _refused()) is None
    assert daily_cap_in_force(Decimal("5.006"), _refused()) == (
        "the cap in force was $5.00 (the run's setting); this shell's is $5.01: "
        "raise it where the batch is run"
    )
    assert daily_cap_in_force(None, _report(cancelled_for_daily_budget=3)) is None
    assert daily_cap_in_force(None, _refused("budget: cancelled by hand")) is None
