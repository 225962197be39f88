"""Which failed or cancelled jobs of a batch a rerun of it already rendered.

``rerun BATCH --failed-only`` repeats what did not succeed. Run it a second time (the same
command from the shell history, a button pressed twice) and it repeated the very jobs the first
rerun had already rendered and paid for: the same pinned-seed inputs paid for again, without a
word, and ``status BATCH`` kept advising that rerun. A job counts as rendered when a rerun of
the batch (any generation: a rerun of a rerun counts too) holds a succeeded job that repeats it
with the input a rerun sends now (its stored input, with the seed fal returned), in a batch of
the same kind (a simulation's placeholder never stands in for a paid video, nor the reverse).

A plain ``rerun`` (a reproducibility run) is meant to pay again and never asks this.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from sqlalchemy.orm import Session

from jobs import store
from jobs.models import Batch
from jobs.money import BUDGET_ERRORS, DAILY_CAP_ERROR
from jobs.printable import shell_ref
from jobs.states import JobState

#: What ``rerun --failed-only`` repeats.
RERUN_FAILED_STATES = (JobState.FAILED, JobState.CANCELLED)


class RenderedBy(TypedDict):
    """A rerun batch that rendered some of the batch's failed or cancelled jobs."""

    batch: str
    name: str
    jobs: int


class RerunRendered(TypedDict):
    """``status BATCH --json``'s ``rerun_rendered``: the batch's failed or cancelled jobs that a
    rerun of it has rendered since (``jobs``), of those the ones a cap cancelled (as the
    report's ``cancelled_for_budget`` and ``cancelled_for_daily_budget`` count them), and which
    reruns hold their videos."""

    jobs: int
    cancelled_for_budget: int
    cancelled_for_daily_budget: int
    reruns: list[RenderedBy]


@dataclass(frozen=True, slots=True)
class Render:
    """One rendered repeat of a job: the rerun batch that holds it."""

    batch_id: str
    batch_name: str
    input: dict[str, Any]
    #: The rerun's place among the batch's reruns, oldest generation first (then oldest rerun):
    #: the order in which messages name them.
    rank: int


def rerun_input(stored: Mapping[str, Any], seed: int | None) -> dict[str, Any]:
    """The input a rerun without ``--new-seeds`` sends for a job: the stored one, with the seed
    fal returned when it is known (so a rerun reproduces the output)."""
    resolved = dict(stored)
    if seed is not None:
        resolved["seed"] = int(seed)
    return resolved


def renders(session: Session, batch_id: str, *, simulated: bool) -> dict[str, list[Render]]:
    """The batch's failed or cancelled jobs (by id) → the succeeded repeats of them in its reruns
    of that kind (``simulated``), oldest rerun first; jobs never rendered are left out."""
    origin: dict[str, str] = {}  # a repeat's id → the batch's job it repeats, however many generations
    found: dict[str, list[Render]] = {}
    ranks: dict[str, int] = {}
    for row in store.rerun_repeats(session, batch_id, RERUN_FAILED_STATES):
        root = origin.get(row.rerun_of, row.rerun_of)
        origin[row.job_id] = root
        if row.succeeded and row.simulated == simulated:
            rank = ranks.setdefault(row.batch_id, len(ranks))
            found.setdefault(root, []).append(Render(row.batch_id, row.batch_name, row.input, rank))
    return found


def rendered_by(candidates: Iterable[Render], wanted: Mapping[str, Any]) -> Render | None:
    """The first repeat that rendered exactly ``wanted`` (another seed or a ``--vary`` value is
    another video, not this one)."""
    return next((r for r in candidates if r.input == wanted), None)


def tally(renders_: Iterable[Render]) -> list[RenderedBy]:
    """How many of the jobs each rerun rendered, the reruns in their :attr:`Render.rank` order."""
    by_batch: dict[str, RenderedBy] = {}
    for render in sorted(renders_, key=lambda r: r.rank):
        entry = by_batch.setdefault(
            render.batch_id, RenderedBy(batch=render.batch_id, name=render.batch_name, jobs=0)
        )
        entry["jobs"] += 1
    return list(by_batch.values())


def rerun_rendered(session: Session, batch: Batch) -> RerunRendered:
    """What ``status`` says of the batch's failed or cancelled jobs a rerun already rendered
    (as ``rerun --failed-only`` would find them), instead of advising to rerun them again."""
    report = RerunRendered(jobs=0, cancelled_for_budget=0, cancelled_for_daily_budget=0, reruns=[])
    found = renders(session, batch.id, simulated=batch.simulated)
    if not found:  # no rerun, or none rendered any of them: the batch's jobs are not even read
        return report
    rendered: list[Render] = []
    for job in store.jobs_of_batch(session, batch.id, states=RERUN_FAILED_STATES):
        render = rendered_by(found.get(job.id, ()), rerun_input(job.input, job.seed))
        if render is None:
            continue
        rendered.append(render)
        if job.state == JobState.CANCELLED and job.error_type in BUDGET_ERRORS:
            report["cancelled_for_budget"] += 1
            report["cancelled_for_daily_budget"] += job.error_type == DAILY_CAP_ERROR
    report["jobs"] = len(rendered)
    report["reruns"] = tally(rendered)
    return report


def reruns_text(reruns: Iterable[RenderedBy]) -> str:
    """``sweep-rerun-1`` or ``sweep-rerun-1 (2 jobs) and sweep-rerun-3 (1 job)``, and the command
    that lists their videos: where the outputs of the jobs are."""
    shown = list(reruns)
    if len(shown) == 1:
        names = shown[0]["name"]
    else:
        parts = [f"{r['name']} ({r['jobs']} job{'' if r['jobs'] == 1 else 's'})" for r in shown]
        names = ", ".join(parts[:-1]) + " and " + parts[-1]
    first = shown[0]
    return f"{names} (`wanbatch export {shell_ref(first['name'], first['batch'])}` lists their videos)"
