"""``validate``, ``estimate`` and ``submit``: the commands that read a manifest.

Thin by design: parse options, call one function of :mod:`jobs.batches` (``submit``) or of
:mod:`jobs.estimates` (``validate``, ``estimate``: no database, so neither imports SQLAlchemy),
print. Nothing here talks to fal, so nothing of :mod:`worker` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cli.options import manifest_command, take_over_option
from cli.output import (
    EXIT_OK,
    emit_json,
    emit_line,
    err,
    escape,
    estimate_rounding_note,
    estimate_table,
    guarded,
    issue_line,
    out,
    print_budget_note,
    print_warnings,
    say,
    working,
)

if TYPE_CHECKING:
    from jobs.money import DaySpender
    from jobs.settings import Settings


def _spent_today(settings: Settings) -> Callable[[], list[DaySpender] | None]:
    """What each batch committed today, read from the database only when asked: only while
    ``WANBATCH_DAILY_BUDGET_USD`` is set (:func:`jobs.estimates.estimate_manifest`), so without
    it ``validate`` and ``estimate`` load nothing of the database (half their start-up CPU)."""

    def read() -> list[DaySpender] | None:
        from jobs.batches import committed_today

        return committed_today(settings)

    return read


@manifest_command
def validate(manifest: Path, as_json: bool, allow_dirs: tuple[Path, ...]) -> None:
    """Check MANIFEST and every expanded job; submits nothing.

    Also warns when the estimate exceeds budget.max_usd, or what is left of today's
    WANBATCH_DAILY_BUDGET_USD, or when a batch of more than 100 jobs has no budget at all.
    """

    def action() -> int:
        from jobs.estimates import estimate_manifest
        from jobs.settings import get_settings

        settings = get_settings()
        with working(f"validating {escape(str(manifest))} …"):
            report, _totals = estimate_manifest(
                manifest, settings, allow_dirs, spent_today=_spent_today(settings)
            )
        if as_json:
            emit_json(
                {
                    "ok": True,
                    "manifest": str(manifest),
                    "name": report.manifest.name if report.manifest else None,
                    "jobs": report.job_count,
                    "issues": [i.as_dict() for i in report.issues],
                }
            )
        else:
            for issue in report.issues:
                err.print(issue_line(issue))
            out.print(f"[green]✓[/green] {escape(str(manifest))}: {report.job_count} job(s), all valid")
        return EXIT_OK

    guarded(as_json, action)


@manifest_command
def estimate(manifest: Path, as_json: bool, allow_dirs: tuple[Path, ...]) -> None:
    """Job count, billing units and USD per endpoint and in total; submits nothing.

    Warns as validate does (on stderr, with --json too): when the estimate exceeds
    budget.max_usd or what is left of today's WANBATCH_DAILY_BUDGET_USD, when a batch of more
    than 100 jobs has no budget at all, and of whatever else is valid but rarely what was meant.
    """

    def action() -> int:
        from jobs.estimates import estimate_manifest
        from jobs.money import DAILY_CAP_ERROR, usd_json
        from jobs.settings import get_settings

        settings = get_settings()
        with working(f"validating and pricing {escape(str(manifest))} …"):
            report, totals = estimate_manifest(
                manifest, settings, allow_dirs, spent_today=_spent_today(settings)
            )
        data = totals.as_dict()
        warnings = report.warnings
        budget = [i for i in warnings if i.field == "budget.max_usd" or i.code == DAILY_CAP_ERROR]
        for issue in warnings:  # on stderr, with --json too: a script sees them in its log
            err.print(issue_line(issue))
        if as_json:
            cap = report.manifest.budget_max_usd if report.manifest else None
            emit_json(
                {
                    **data,
                    "budget_max_usd": usd_json(cap),
                    "budget_warnings": [i.message for i in budget],
                    "warnings": [str(i) for i in warnings],
                }
            )
            return EXIT_OK
        out.print(estimate_table(f"Estimate for {manifest}", data))
        if note := estimate_rounding_note(data):
            say(note)
        if data["price_assumptions"]:
            say(
                "* price not published by fal: an assumption (see README, override with "
                "WANBATCH_PRICING_OVERRIDES)"
            )
        return EXIT_OK

    guarded(as_json, action)


@manifest_command
@take_over_option
def submit(manifest: Path, as_json: bool, allow_dirs: tuple[Path, ...], take_over: bool) -> None:
    """Validate MANIFEST, store its jobs and queue them; prints the batch id.

    The id alone on stdout (`B=$(wanbatch submit m.yaml)`), what was stored on stderr.

    Submitting the same manifest again adds no duplicate jobs, and applies its current budget.
    Warns on stderr, as validate does, when the estimate exceeds what is left of today's
    WANBATCH_DAILY_BUDGET_USD (--json: budget_warnings).
    """

    def action() -> int:
        from jobs import batches
        from jobs.settings import get_settings

        settings = get_settings()
        with working(f"validating {escape(str(manifest))}, then storing its jobs …"):
            result = batches.submit_manifest(manifest, settings, allow_dirs, take_over=take_over)
        if note := result.database_note:  # the default database, made here: said once
            err.print(escape(note))
        print_warnings(result)  # on stderr, with --json too: a script sees them in its log
        if note := result.simulation_note():
            err.print(escape(note))
        if note := result.moved_note():
            err.print(escape(note))
        print_budget_note(result)
        if note := result.schedule_note():
            err.print(escape(note))
        if as_json:
            emit_json(result.as_dict())
        else:
            # stdout: the batch id alone (`B=$(wanbatch submit m.yaml)`); the words on stderr.
            emit_line(result.batch_id)
            verb = "created" if result.created else "updated"
            err.print(
                f"batch [bold]{result.batch_id}[/bold] ({escape(result.name)}) {verb}: "
                f"{result.total} job(s), {result.added} new, {result.existing} already stored"
            )
        return EXIT_OK

    guarded(as_json, action)
