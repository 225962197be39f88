"""Validate and estimate a manifest, without the database: ``validate`` and ``estimate``.

What a manifest would do before anything is stored — its issues, its jobs' billing units and
USD, the budget warnings — from the manifest, the settings and the endpoint registry alone.
Apart from :mod:`jobs.batches` (which re-exports all of it) so that ``wanbatch validate`` and
``wanbatch estimate`` never import SQLAlchemy, the models and the store: about half of their
start-up CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from pathlib import Path

from jobs.errors import Issue, ManifestError
from jobs.manifest import JobSpec, ValidationReport, validate_manifest
from jobs.manifest.expand import Manifest
from jobs.money import DAILY_CAP_ERROR, DaySpender, others_today, usd_apart, usd_text
from jobs.pricing import Totals, estimate_job
from jobs.settings import InputSettings, Settings


def input_dirs(settings: InputSettings, allowed_dirs: Iterable[Path] = ()) -> tuple[Path, ...]:
    """Folders beyond a manifest's own that its local files may come from.

    The ``--allow-dir`` options, then ``WANBATCH_ALLOWED_INPUT_DIRS``: both explicit choices of
    the user running wanbatch, never of the manifest's author.
    """
    return (*allowed_dirs, *settings.allowed_input_dirs)


def fal_keys(settings: object) -> tuple[str, ...]:
    """FAL_KEY's value when ``settings`` has one set: a manifest holding it is refused
    (:mod:`jobs.manifest.fal_key`), whether or not this run sends anything to fal."""
    key = getattr(settings, "fal_key", None)
    value = key.get_secret_value() if key is not None else ""
    return (value,) if value else ()


def check_manifest(
    path: str | Path,
    settings: InputSettings,
    allowed_dirs: Iterable[Path] = (),
    *,
    each_valid: Callable[[JobSpec], None] | None = None,
) -> ValidationReport:
    """Validate, and raise :class:`ManifestError` with every located issue when anything is wrong.

    Local files may come from the manifest's folder and the folders :func:`input_dirs` names.
    ``each_valid``: see :func:`jobs.manifest.validate_manifest`.
    """
    report = validate_manifest(
        path, input_dirs(settings, allowed_dirs), fal_keys(settings), each_valid=each_valid
    )
    if not report.ok:
        raise ManifestError(report.issues)
    return report


#: A batch of more jobs than this with no ``budget.max_usd`` gets a warning from ``validate`` and
#: ``estimate``: past a hundred renders a typo in a matrix is real money, and a cap is one line.
LARGE_BATCH_JOBS = 100


def estimate_manifest(
    path: str | Path,
    settings: Settings,
    allowed_dirs: Iterable[Path] = (),
    *,
    spent_today: Callable[[], Sequence[DaySpender] | None] | None = None,
) -> tuple[ValidationReport, Totals]:
    """Job count, billing units and USD of a valid manifest, per endpoint and in total.

    The report's issues gain the budget warnings (:func:`budget_issues`, then
    :func:`daily_budget_issues`), so ``validate`` and ``estimate``, which both run this, say the
    same thing about money before any is spent. ``spent_today``: what every batch committed
    today, by batch, when the caller can read it (asked only while ``WANBATCH_DAILY_BUDGET_USD``
    is set: this module never reads the database itself).
    """
    totals = Totals()
    # Priced as the validation pass checks them (one pass, not two): a job with an error is not
    # priced, and then the manifest is refused and the totals never seen.
    report = check_manifest(
        path,
        settings,
        allowed_dirs,
        each_valid=lambda spec: totals.add(estimate_job(spec.endpoint, spec.input, settings)),
    )
    assert report.manifest is not None
    report.issues.extend(budget_issues(report.manifest, totals))
    daily_cap = settings.daily_budget_usd
    if daily_cap is not None:
        today = spent_today() if spent_today is not None else None
        report.issues.extend(daily_budget_issues(report.manifest, totals, daily_cap, today))
    return report, totals


def budget_issues(manifest: Manifest, totals: Totals) -> list[Issue]:
    """Warnings about the money a manifest would spend (never errors: the cap still holds).

    An estimate over ``budget.max_usd`` means the cap will cancel jobs (status shows them as
    cancelled for budget): better known before submitting. More than :data:`LARGE_BATCH_JOBS`
    jobs and no budget at all means nothing stops a mistake from being paid for in full.
    """
    cap = manifest.budget_max_usd
    warnings: list[str] = []
    if cap is not None and totals.usd > cap:
        share = int(totals.jobs * cap / totals.usd) if totals.usd else totals.jobs
        estimate, capped = usd_apart(totals.usd, cap)  # never "$1.01 exceeds $1.01"
        warnings.append(
            f"the estimate {estimate} exceeds budget.max_usd {capped}: only about "
            f"{share} of {totals.jobs} job(s) will run, the rest end cancelled (budget); raise "
            "budget.max_usd or shrink the batch"
        )
    if cap is None and totals.jobs > LARGE_BATCH_JOBS:
        warnings.append(
            f"{totals.jobs} jobs (estimate {usd_text(totals.usd)}) and no budget: add "
            f"`budget: {{max_usd: AMOUNT}}` so a mistake cannot spend it all (warned above "
            f"{LARGE_BATCH_JOBS} jobs)"
        )
    return [
        Issue(
            file=manifest.display, line=None, item=None, field="budget.max_usd", message=m, severity="warning"
        )
        for m in warnings
    ]


def daily_budget_issues(
    manifest: Manifest,
    totals: Totals,
    daily_cap: Decimal,
    today: Sequence[DaySpender] | None,
    *,
    unsent: bool = False,
) -> list[Issue]:
    """The warning that the estimate exceeds ``WANBATCH_DAILY_BUDGET_USD`` — or what is left of
    it once ``today`` (what each batch committed today, when known) is counted — a warning, as
    :func:`budget_issues`'s: the cap still holds, and ``run`` cancels, unsent, the jobs that would
    cross it (``daily_budget``). Said with ``run``'s words for that cap (its cancellations name
    ``today's $X cap (WANBATCH_DAILY_BUDGET_USD)``; its advice "raise it, or wait for the next
    UTC day"), so the two read as one rule. A batch capped lower by its own budget is
    still warned: both caps hold, and the day's may be the one that stops it. Whose spending
    today's is, when other batches than the manifest's own hold some (:func:`_whose_today`),
    as ``run``'s refusals say it: the cap counts every batch of the database. ``unsent``:
    ``totals`` are the stored batch's jobs not sent yet (``submit`` of a batch that sent some),
    and the estimate is said to be theirs."""
    spent = sum((s.usd for s in today or ()), Decimal(0))
    spent = max(spent, Decimal(0))
    room = daily_cap - spent
    if totals.usd <= room:
        return []
    committed = f"{usd_text(spent)} committed today{_whose_today(today or (), manifest.name, spent)}"
    cap = f"today's {usd_text(daily_cap)} cap (WANBATCH_DAILY_BUDGET_USD; {committed})"
    if room <= 0:
        said = f"nothing is left of {cap}: none of the {totals.jobs} job(s) will run today"
    else:
        # The amounts with the decimals that tell them apart: never "$1.01 exceeds $1.01".
        estimate, left = usd_apart(totals.usd, room)
        where = f"the {left} left of {cap}" if spent else f"today's {left} cap (WANBATCH_DAILY_BUDGET_USD)"
        share = int(totals.jobs * room / totals.usd)
        whose = f" of the {totals.jobs} job(s) not sent yet" if unsent else ""
        said = f"the estimate {estimate}{whose} exceeds {where}: only about {share} of {totals.jobs} job(s)"
        said += " will run today"
    message = f"{said}, the rest end cancelled (daily budget); raise it, or wait for the next UTC day"
    return [
        Issue(
            file=manifest.display,
            line=None,
            item=None,
            field=None,  # no field of the manifest: the setting, named in the message
            message=message,
            severity="warning",
            code=DAILY_CAP_ERROR,  # what run's cancellations by this cap are typed
        )
    ]


def _whose_today(today: Sequence[DaySpender], own: str, spent: Decimal) -> str:
    """The part of ``spent`` (today's committed money) batches other than ``own`` (the
    manifest's name: its batch, when stored already) hold, and which: `` by other batches:
    bob-lh, carol-lh`` when they hold all of it, ``, $0.50 of it by other batches: bob-lh``
    when the manifest's batch holds the rest; "" when they hold none."""
    usd, names = others_today(today, own)
    if not names:
        return ""
    if usd >= spent:
        return f" by other batches: {names}"
    return f", {usd_text(usd)} of it by other batches: {names}"
