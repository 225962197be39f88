"""``wanbatch rerun`` (and the dashboard's "Rerun failed"): a new batch made from a stored one.

A rerun is not a submit. Its jobs come from the parent's stored jobs, not from a manifest, and
its rules are its own: which jobs it repeats (``--failed-only``; the jobs a resubmit dropped or
the manifest no longer has; those an earlier rerun rendered already, :mod:`jobs.rendered`), with
which seeds (the ones fal returned, or ``--new-seeds``), ``--vary`` sweeps and the numbering they
need, the local files checked against the SHA-256 their parent recorded, the name
``NAME-rerun-N`` and the daily window it keeps from its parent. Those rules live here.

It stores the new batch as ``submit`` does (:class:`jobs.batches.SubmitResult` and its helpers),
so this module imports :mod:`jobs.batches` and never the other way round (no import cycle:
``tests/test_architecture.py``). The refusal of a manifest submitted under a rerun's name
(:func:`jobs.batches.refuse_rerun`) is a check of ``submit`` and ``run``, and stays with them.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from jobs import db, machine, store
from jobs.batches import SubmitResult, _new_job, _submitted, check_output_names
from jobs.db import open_engine
from jobs.endpoints import EndpointSpec, get_endpoint
from jobs.errors import ConfigError, UsageError, WanbatchError
from jobs.fs import name_problem, shown_in_folder, shown_path
from jobs.manifest import job_key
from jobs.manifest.expand import MAX_JOBS
from jobs.media import MediaKind, classify
from jobs.models import NOT_IN_MANIFEST, Batch, utcnow
from jobs.money import usd_apart, usd_text
from jobs.printable import one_line, shell_ref, shortened
from jobs.rendered import (
    RERUN_FAILED_STATES,
    Render,
    RenderedBy,
    RerunBeing,
    being_text,
    by_input,
    lineage_renders,
    rendered_by,
    rerun_input,
    reruns_text,
    tally,
    tally_being,
    wanted_key,
)
from jobs.schedule import Schedule
from jobs.settings import Settings
from jobs.states import JobState
from jobs.url_secrets import mask_urls
from jobs.validation import FieldProblem, ValueCache, check_input, check_value
from jobs.vary import Sweep, Vary, checked_values


class NothingToRerun(WanbatchError):
    """``rerun`` found no job to repeat (``--failed-only`` on a batch with no failed or cancelled
    job): nothing is stored, and that is no failure — exit 0, with a line that says why."""

    exit_code = 0


def _not_in_manifest_left_out(parent: Batch, jobs: int) -> str:
    """The line of a ``rerun --failed-only`` that left out failed or cancelled jobs the parent's
    manifest no longer has (``Job.not_in_manifest``): sending them again would pay for an item
    the user fixed, or removed."""
    return (
        f"{jobs} failed or cancelled job(s) of batch {parent.name} are no longer in its manifest: "
        "left out (its manifest has what replaced them)"
    )


def _dropped(state: JobState, error_type: str | None) -> bool:
    """Whether a job is one a resubmit (or the upgrade to schema 0039) dropped from its manifest:
    cancelled before anything of it was sent (``jobs.store.creating._drop_never_sent``)."""
    return state == JobState.CANCELLED and error_type == NOT_IN_MANIFEST


#: The ``error_type`` of a job whose video fal made and billed, but that never reached the
#: output folder: the video, or fal's result naming it, could not be fetched
#: (:mod:`worker.steps.download`). Not ``not_a_video`` or ``media_mismatch``: those videos came,
#: and were wrong.
PAID_NOT_FETCHED = frozenset({"download_failed", "result_unavailable", "result_expired"})


def _paid_not_fetched(state: JobState, error_type: str | None, actual_usd: Decimal | None) -> bool:
    """Whether a job failed after fal made, and billed, its video, never fetched
    (:data:`PAID_NOT_FETCHED`)."""
    return state == JobState.FAILED and error_type in PAID_NOT_FETCHED and bool(actual_usd)


@dataclass(frozen=True, slots=True)
class _Unfetched:
    """A job of the parent fal made and billed whose video was never fetched
    (:func:`_paid_not_fetched`): what fal billed, and whether fal's result naming its video is
    kept (``provider_output``: a ``download_failed`` job's; none when the result call itself
    failed, ``result_unavailable``, or fal no longer kept it, ``result_expired``)."""

    billed: Decimal
    error_type: str | None
    has_url: bool


def _paid_again(parent: Batch, rows: Sequence[store.NewJob], unfetched: dict[str, _Unfetched]) -> str | None:
    """The warning of a rerun that renders again jobs whose paid videos were never fetched
    (:func:`_paid_not_fetched`): how many, what fal billed for them, what they cost again. A
    CDN outage once failed such jobs within a minute, and ``rerun --failed-only`` paid for
    every one of them a second time without a word. None when the rerun repeats none.

    Where those videos may still be is said only of the jobs it is true of: an export gives the
    video URL of a job whose result was fetched (``provider_output``); a job whose result call
    failed or expired has none, and fal no longer keeps an expired one's."""
    again = [row for row in rows if row.rerun_of in unfetched]
    if not again:
        return None
    parents = [unfetched[job_id] for job_id in dict.fromkeys(row.rerun_of for row in again) if job_id]
    billed = sum((job.billed for job in parents), Decimal(0))
    cost = sum((row.est_usd for row in again), Decimal(0))
    ref = shell_ref(parent.name, parent.id)
    line = (
        f"{len(parents)} job(s) of batch {parent.name} were made and paid for ({usd_text(billed)}) but "
        f"failed at download, their videos never fetched: this rerun renders and pays for them again "
        f"(est. {usd_text(cost)})"
    )
    served = sum(1 for job in parents if job.has_url)
    if served:
        those = "those videos" if served == len(parents) else f"the videos of {served} of them"
        line += (
            f"; fal may still serve {those} (`wanbatch export {ref}` gives each one's URL in provider_output)"
        )
    expired = sum(1 for job in parents if job.error_type == "result_expired")
    if expired:
        line += f"; fal no longer keeps the result of {expired} of them (result_expired)"
    return line


#: Why a failed or cancelled job's estimate is counted as possibly billed, by its ``error_type``,
#: as :func:`_possibly_paid_again` says it; any other's came from a submit whose outcome was
#: never known (``ambiguous_usd``: ``submit_unknown``, or an earlier attempt's, resent).
_POSSIBLY_BILLED_WHY = {
    "request_not_found": "fal lost their request after it had started running",
    "abandoned_other_key": "their request, sent with another API key, was left at fal unfollowed",
}
#: What :func:`_possibly_paid_again` says of the jobs :data:`_POSSIBLY_BILLED_WHY` does not name.
_SUBMIT_NEVER_KNOWN = "their submit's outcome was never known"


def _possibly_paid_again(
    parent: Batch, rows: Sequence[store.NewJob], possibly: dict[str, tuple[Decimal, str | None]]
) -> str | None:
    """The warning of a rerun that sends again jobs fal may already have made and billed,
    counted as possibly billed (``ambiguous_usd``: ``possibly`` maps each to that money and its
    ``error_type``): a submit whose outcome was never known (its answer lost, the process killed
    before storing it: ``submit_unknown``), a request fal lost after it had started running
    (``request_not_found``), a request of another API key left at fal. ``rerun --failed-only``
    sent them again without a word, and fal billed many a second time. Each reason is said of
    the jobs it is true of. None when the rerun repeats none."""
    again = [row for row in rows if row.rerun_of in possibly]
    if not again:
        return None
    parents = [possibly[job_id] for job_id in dict.fromkeys(row.rerun_of for row in again) if job_id]
    maybe = sum((usd for usd, _ in parents), Decimal(0))
    cost = sum((row.est_usd for row in again), Decimal(0))
    whys: dict[str, int] = {}
    for _, error_type in parents:
        why = _POSSIBLY_BILLED_WHY.get(error_type or "", _SUBMIT_NEVER_KNOWN)
        whys[why] = whys.get(why, 0) + 1
    said = next(iter(whys)) if len(whys) == 1 else "; ".join(f"{n} as {why}" for why, n in whys.items())
    line = (
        f"{len(parents)} job(s) of batch {parent.name} may already have been made and billed "
        f"({usd_text(maybe)} possibly billed: {said}): this rerun sends them again and pays for them "
        f"again (est. {usd_text(cost)})"
    )
    if _POSSIBLY_BILLED_WHY["abandoned_other_key"] not in whys:
        # fal's signed webhook of a submit or a request it lost proves what it ran (the job
        # adopts it instead of paying twice); nothing adopts an abandoned request's.
        line += "; a webhook receiver (WANBATCH_WEBHOOK_URL) proves such requests instead"
    return line


def _dropped_left_out(parent: Batch, jobs: int) -> str:
    """The line of a plain ``rerun`` that left out the jobs a resubmit dropped: never sent, they
    have nothing to repeat, and sending them would bill a job the user removed or corrected."""
    return (
        f"{jobs} job(s) of batch {parent.name} were dropped from its manifest, never sent: left out "
        "(nothing of them to repeat)"
    )


def _nothing_to_rerun(
    session: Session, parent: Batch, failed_only: bool, not_in_manifest: int = 0, *, dropped: int = 0
) -> str:
    """Why a rerun of ``parent`` would be empty; says that no batch was made. ``not_in_manifest``:
    the failed or cancelled jobs ``--failed-only`` left out, its manifest no longer having them;
    ``dropped``: the jobs a plain rerun left out, dropped from its manifest and never sent."""
    label = f"batch {parent.name} ({parent.id[:8]})"
    if not failed_only:
        if dropped:
            return (
                f"nothing to rerun: {label} has no job to repeat ({dropped} dropped from its manifest, "
                "never sent, are left out); no batch was created"
            )
        return f"nothing to rerun: {label} has no jobs; no batch was created"
    if not_in_manifest:
        return (
            f"nothing to rerun: {label} has no failed or cancelled job in its manifest ({not_in_manifest} "
            "no longer in it are left out); no batch was created"
        )
    counts = store.counts_by_state(session, parent.id)
    total = sum(counts.values())
    unfinished = total - sum(counts[s.value] for s in JobState if s.terminal)
    why = (
        f"{unfinished} of {total} not finished yet"
        if unfinished
        else f"all {counts[JobState.SUCCEEDED.value]} succeeded"
    )
    return f"nothing to rerun: {label} has no failed or cancelled job ({why}); no batch was created"


def _refuse_too_many(
    session: Session, parent: Batch, wanted: list[JobState] | None, sweep: Sweep, *, failed_only: bool
) -> None:
    """Refuse, before a single row is built, a rerun with more jobs than a manifest may have
    (:data:`jobs.manifest.expand.MAX_JOBS`): ``--vary`` caps combinations per job, and the jobs
    it repeats multiply them (20,000 × ``seed=1..10000`` filled the memory, row by row). Only
    the jobs the rerun makes count: not those it leaves out as no longer in the manifest."""
    jobs = store.count_repeated(session, parent.id, states=wanted, failed_only=failed_only)
    total = jobs * sweep.size
    if total > MAX_JOBS:
        raise UsageError(
            f"the rerun of {parent.name} would have {total:,} jobs ({jobs:,} job(s) × {sweep.size:,} "
            f"combinations of --vary values), more than {MAX_JOBS:,}: vary fewer values"
            + ("" if failed_only else ", or rerun only the failed jobs (--failed-only)")
        )


def rerun_batch(
    ref: str,
    *,
    failed_only: bool = False,
    new_seeds: bool = False,
    max_usd: Decimal | None = None,
    vary: Sequence[Vary] = (),
    pay_again: bool = False,
    send_now: bool = False,
    settings: Settings,
    simulated: bool = False,
    on_batch: Callable[[str, str], None] | None = None,
    before_storing: Callable[[], object] | None = None,
) -> SubmitResult:
    """A new batch from a stored one, linked to it as its parent.

    By default every job is repeated with its exact resolved input and the seed the provider
    returned (so a rerun reproduces the outputs); ``failed_only`` keeps only jobs that ended
    failed or cancelled; ``new_seeds`` draws a fresh seed per job instead, recorded before
    submission so the rerun is itself reproducible. ``max_usd`` is the new batch's budget cap
    (default: with ``failed_only``, what is left of the parent's cap once the parent and its
    reruns committed their money, :func:`_left_of_cap`, said in a warning; otherwise the
    parent's cap, a whole batch rendered again as it was; none when the parent has none), which
    is how jobs a cap cancelled get another chance. The
    parent's queue priority and daily window carry over; its ``not_before`` and deadline do
    not (the parent's deadline has usually passed: the jobs it cancelled are what is rerun).
    ``simulated`` (``--simulate``) makes the new batch a simulation, whatever the parent was.
    ``send_now`` (``--now``) drops the schedule altogether (no window, no deadline, no
    ``not_before``): the jobs a deadline cancelled are sent at once, not in the next window.

    ``vary`` (``--vary FIELD=VALUES``) sweeps fields: each job is repeated once per combination
    of the values (the product over the options), every other input field exactly as stored,
    with a fresh job key and estimate. With ``new_seeds`` the fresh seed is drawn once per
    stored job and shared by its combinations, so they differ only in the varied fields. Every
    value is checked against each endpoint's schema before the batch is stored: a bad one is a
    one-line :class:`UsageError` and nothing is stored. When no job qualifies (``failed_only``
    on a batch where every job succeeded) nothing is stored either: :class:`NothingToRerun`.

    ``failed_only`` leaves out the jobs an earlier rerun in the batch's lineage (any rerun of the
    batch it comes from, any generation, of the same kind: its own, a sibling's) already
    rendered, or still unfinished will render, with the very input this one would send
    (:mod:`jobs.rendered`), with a warning that names that rerun (and, unfinished, what goes on
    with it) — or, when that is all of them, :class:`NothingToRerun` naming it:
    running the same command twice (or pressing the dashboard's button twice before the first
    rerun ran) paid for the same videos twice. With ``send_now``, an unfinished one that holds
    some of them and waits for its window (or ``not_before``) is a :class:`UsageError` that says
    so and to cancel it first: sent now beside it they would be paid twice, and left to it they
    would not go out now, which ``--now`` asked for. ``pay_again``
    (``--pay-again``) sends them all the same. ``failed_only`` leaves out, too, the failed or
    cancelled jobs the parent's manifest no longer has (``Job.not_in_manifest``: an item fixed
    or removed since; or dropped, by its state, whatever its mark says), in a warning of one
    line — sending them paid again for a prompt the user corrected — or, when that is all of
    them, :class:`NothingToRerun` saying so. A plain rerun is a reproducibility run, paid again
    on purpose: it leaves out only the jobs a resubmit dropped (``cancelled``, ``error_type``
    :data:`~jobs.models.NOT_IN_MANIFEST`: never sent, so nothing of them to repeat, and the user
    removed or corrected them), in a warning of one line — sending them billed a job the user
    had taken out — or, when that is all of them, :class:`NothingToRerun`. (``failed_only``
    leaves them out with the other cancelled jobs its manifest no longer has.)

    Variants: without ``vary`` (or with one combination) each job keeps its parent's ``variant``,
    its place in the manifest, which ``diff`` pairs batches of one manifest by. With several
    combinations they are numbered anew, densely per item (0, 1, … in the parent's order, then
    the combinations'): numbers derived from the parent's would multiply with every generation
    of reruns. ``rerun_of`` keeps each job's link to the job it repeats.

    Every local file the jobs send must still hold the bytes whose SHA-256 the parent recorded
    (``source_files``); otherwise every job would fail at submission (``input_file``) and each
    later rerun too, since it copies the same record: a :class:`UsageError` names each such file
    and nothing is stored (see :func:`_checked_sources`), checked job by job: a job its manifest no
    longer has whose file changed (an image replaced, the manifest resubmitted) is left out
    instead, with a warning. Every input it would send is checked against the endpoint registry
    as ``submit`` checks a manifest's (:class:`_InputCheck`): a value no longer allowed is a
    :class:`UsageError` with one line per problem, nothing stored; so is an image (or audio)
    file, unchanged, that the registry's limits no longer allow (:meth:`_InputCheck.media_allowed`,
    after the SHA-256 check); so is a budget cap below
    every job's estimate (:func:`_nothing_fits`), which stored a batch of jobs all cancelled.

    ``on_batch(id, name)`` is called with the new batch before its jobs are stored, in the same
    transaction (storing a large batch takes a while): should Ctrl-C stop the command, its hint
    looks the batch up to tell "stored, run it" (never ``rerun`` again, which would make a second
    batch of the same jobs, paid twice if both run) from "nothing was stored" (rolled back).

    ``before_storing()`` is called once every check above has passed and the rerun is known to
    have jobs, before anything is stored: the caller's last precondition for sending them (the
    CLI requires ``FAL_KEY`` there), so that a rerun with nothing to do says so
    (:class:`NothingToRerun`, exit 0) whether or not it could have sent anything.
    """
    if new_seeds and any(v.field == "seed" for v in vary):
        raise UsageError("--new-seeds and --vary seed=… both choose the seeds: give only one of them")
    sweep = Sweep(vary)
    engine = open_engine(settings)
    with db.session_scope(engine) as session:
        parent = store.get_batch(session, ref)
        wanted = list(RERUN_FAILED_STATES) if failed_only else None
        _refuse_too_many(session, parent, wanted, sweep, failed_only=failed_only)
        digests: dict[str, str | None] = {}
        unseeded: list[int] = []  # unfinished jobs whose seed nobody knows yet (their items)

        def new_jobs() -> Iterator[store.NewJob]:
            for job in store.jobs_of_batch(session, parent.id, states=wanted):
                if not failed_only and _dropped(job.state, job.error_type):
                    dropped.append(job.id)  # never sent: nothing of it to repeat
                    continue
                # Its item was fixed, or removed; or a resubmit dropped it (by its state too: the
                # mark alone was lost when an older serve or a downgrade and upgrade came between).
                if failed_only and (job.not_in_manifest or _dropped(job.state, job.error_type)):
                    not_in_manifest.append(job.id)
                    continue
                if job.not_in_manifest:
                    not_in_manifest_jobs.append(job.id)
                if _paid_not_fetched(job.state, job.error_type, job.actual_usd):
                    has_url = isinstance(job.provider_output, dict) and bool(job.provider_output)
                    unfetched[job.id] = _Unfetched(job.actual_usd or Decimal(0), job.error_type, has_url)
                elif job.state != JobState.SUCCEEDED and job.ambiguous_usd:
                    possibly[job.id] = (job.ambiguous_usd, job.error_type)
                spec = get_endpoint(job.endpoint)
                stored = before[job.id] = rerun_input(job.input, None if new_seeds else job.seed)
                if new_seeds:
                    stored["seed"] = secrets.randbelow(2**31)
                elif stored.get("seed") is None and not job.state.terminal:
                    unseeded.append(job.item_index)
                combos = sweep.combos(spec)  # checked for this endpoint on first use
                if len(combos) > 1:
                    swept.add(job.item_index)
                for combo in combos:
                    resolved = {**stored, **combo}
                    if not inputs.allowed(spec, resolved, job.id, job.item_index):
                        continue  # refused below, with every other problem (not even priced)
                    yield _new_job(
                        job.endpoint,
                        job.item_index,
                        job_key(spec, resolved, digests),
                        resolved,
                        settings,
                        # The parent's place in the manifest; a swept item's jobs are
                        # numbered anew below (_placed). Media fields are never varied, so
                        # where the files came from carries over.
                        variant=job.variant,
                        source_files=job.source_files,
                        rerun_of=job.id,
                    )

        # Built (and the varied values checked) before the batch row exists: a bad value
        # leaves nothing stored.
        swept: set[int] = set()  # items whose jobs --vary repeats more than once
        before: dict[str, dict[str, Any]] = {}  # parent's job id → its input, seed as the rerun's
        not_in_manifest: list[str] = []  # failed or cancelled jobs its manifest no longer has
        not_in_manifest_jobs: list[str] = []  # ... and those a plain rerun repeats all the same
        dropped: list[str] = []  # jobs a resubmit dropped (never sent), which a plain rerun leaves out
        unfetched: dict[str, _Unfetched] = {}  # parent's job id → its paid video never fetched
        # parent's job id → what fal may have billed (outcome unknown), and the job's error type
        possibly: dict[str, tuple[Decimal, str | None]] = {}
        inputs = _InputCheck()
        rows = list(new_jobs())
        if inputs.lines:
            raise UsageError(_inputs_refused(parent, inputs.said()))
        if not rows:
            raise NothingToRerun(
                _nothing_to_rerun(session, parent, failed_only, len(not_in_manifest), dropped=len(dropped))
            )
        covered = Coverage()
        if failed_only and not pay_again:
            rows, covered = _not_covered(session, parent, rows, simulated=simulated, now=utcnow())
            if send_now and (waiting := _waiting_reruns(covered)):
                raise UsageError(_not_sent_now(parent, waiting, simulated=simulated))
            if not rows:
                raise NothingToRerun(_all_covered(parent, covered))
        if unseeded:
            raise UsageError(_still_running(parent, len(unseeded)))
        unnamed = _unnamed_source(rows, Path(parent.manifest_path).parent)
        if unnamed is not None:  # not "changed": the file is there, under a name this locale lacks
            raise ConfigError(f"cannot rerun batch {parent.name}: {unnamed}; nothing was stored")
        sources = _checked_sources(rows, Path(parent.manifest_path).parent, set(not_in_manifest_jobs))
        if sources.problems:
            raise UsageError(_sources_changed(parent, sources.problems, store.root_batch(session, parent)))
        rows = sources.kept
        if not rows:
            raise NothingToRerun(_all_changed(parent, sources))
        media = _InputCheck()
        rows = [row for row in rows if media.media_allowed(row)]
        if media.lines:
            raise UsageError(_media_refused(parent, media.said()))
        rows, warnings = _placed(rows, swept, lambda row, twin: _repeat_cause(row, twin, before, vary))
        # An image past a limit fal only advises (or wanbatch only assumed) is sent, as validate
        # sends it, and said as validate says it.
        warnings += [f"batch {parent.name}, {line}" for line in media.warned_lines()]
        # --failed-only goes on with the parent's work, under the parent's cap: what is left of it.
        # A plain rerun renders the whole batch again (a comparison run): its own cap, as the parent's.
        left = _left_of_cap(session, parent) if max_usd is None and failed_only else None
        cap = max_usd if max_usd is not None else (left.cap if left is not None else parent.budget_max_usd)
        if cap is not None and rows and min(row.est_usd for row in rows) > cap:
            raise UsageError(_nothing_fits(parent, rows, cap, given=max_usd is not None, left=left))
        warnings[:0] = _left_out(parent, covered)
        if not_in_manifest:
            warnings.insert(0, _not_in_manifest_left_out(parent, len(not_in_manifest)))
        if dropped:
            warnings.insert(0, _dropped_left_out(parent, len(dropped)))
        if sources.left_out:
            warnings.append(_changed_left_out(parent, sources))
        if (paid_again := _paid_again(parent, rows, unfetched)) is not None:
            warnings.insert(0, paid_again)
        if (maybe_again := _possibly_paid_again(parent, rows, possibly)) is not None:
            warnings.insert(0, maybe_again)
        if before_storing is not None:
            before_storing()
        name = _rerun_name(session, parent)
        check_output_names(settings, name)  # raised inside the transaction: nothing is stored
        if left is not None and left.committed:
            warnings.insert(0, left.line(name, parent))
        batch, created = store.get_or_create_batch(
            session,
            name=name,
            manifest_path=parent.manifest_path,
            manifest_sha256=parent.manifest_sha256,
            budget_max_usd=cap,
            parent_batch_id=parent.id,
            priority=parent.priority,
            schedule=None if send_now else _rerun_schedule(parent),
            manifest_text=parent.manifest_text,  # provenance: the manifest the jobs came from
            simulated=simulated,
            # The machine the rerun was made on (as a submit records its own): on a database
            # machines share, another one's status, pause and cancel say whose it is.
            manifest_host=machine.this_machine(),
            rerun_options=rerun_options(
                failed_only=failed_only,
                new_seeds=new_seeds,
                max_usd=max_usd,
                vary=vary,
                pay_again=pay_again,
                send_now=send_now,
            ),
        )
        if not created:  # another rerun took the free name at the same moment (PostgreSQL)
            raise UsageError(
                f"another rerun of {parent.name} was stored as {name} just now; run this one again"
            )
        if on_batch is not None:
            on_batch(batch.id, batch.name)
        added, existing = store.add_jobs(session, batch.id, rows)
        if not_in_manifest_jobs:  # a plain rerun repeats them: its copies say so too (in_manifest)
            store.mark_reruns_not_in_manifest(session, batch.id, parent.id)
        return _submitted(session, batch, created, added, existing, warnings)


@dataclass(frozen=True, slots=True)
class _LeftOfCap:
    """A rerun's default cap (no ``--max-usd``): what is left of its parent's cap once the parent
    and its reruns (every generation) have committed their money."""

    #: The parent's cap.
    parent_cap: Decimal
    #: What the parent and its reruns have committed (:func:`jobs.store.lineage_committed_usd`).
    committed: Decimal

    @property
    def cap(self) -> Decimal:
        """The new rerun's cap: never below 0."""
        return max(self.parent_cap - self.committed, Decimal(0))

    def words(self, parent: Batch) -> str:
        """``what is left of batch sweep's budget.max_usd ($2.00; $1.60 committed by it and its reruns)``."""
        return (
            f"what is left of batch {parent.name}'s budget.max_usd ({usd_text(self.parent_cap)}; "
            f"{usd_text(self.committed)} committed by it and its reruns)"
        )

    def line(self, name: str, parent: Batch) -> str:
        """The stderr line saying where the new rerun's cap comes from."""
        return (
            f"rerun {name}: its cap is {usd_text(self.cap)}: what is left of batch {parent.name}'s "
            f"{usd_text(self.parent_cap)} budget.max_usd, {usd_text(self.committed)} of which it and its "
            "reruns have committed; `--max-usd AMOUNT` sets another cap"
        )


def _left_of_cap(session: Session, parent: Batch) -> _LeftOfCap | None:
    """The default cap of a rerun of ``parent`` (None: the parent has no cap, nor has its rerun).

    It used to be the parent's cap itself, afresh: a batch that spent its $2.00 and was rerun
    ``--failed-only`` could spend $2.00 more, $4.00 for a manifest that says ``max_usd: 2.00``
    (each rerun as much again). The user's cap is for the lineage, so a rerun gets what the
    parent and its reruns have not committed; ``--max-usd`` says otherwise on purpose."""
    if parent.budget_max_usd is None:
        return None
    return _LeftOfCap(parent.budget_max_usd, store.lineage_committed_usd(session, parent.id))


def _nothing_fits(
    parent: Batch, rows: list[store.NewJob], cap: Decimal, *, given: bool, left: _LeftOfCap | None = None
) -> str:
    """Why a rerun whose budget cap is below every job's estimate is refused: the cap would
    cancel each one before sending it (a job is sent when its estimate fits under what is left),
    and each such command stored a batch of nothing but jobs cancelled for budget."""
    cheapest = min(row.est_usd for row in rows)
    enough = cheapest.quantize(Decimal("0.01"), rounding=ROUND_CEILING)
    if given:
        whose = "--max-usd"
    elif left is not None:
        whose = left.words(parent)
    else:
        whose = f"batch {parent.name}'s budget.max_usd, which a rerun keeps"
    capped, least = usd_apart(cap, cheapest)  # never "its cap $0.20 is below … $0.20"
    return (
        f"cannot rerun batch {parent.name}: its cap {capped} ({whose}) is below the estimate of "
        f"each of its {len(rows)} job(s) (the cheapest: {least}), so every job would be "
        f"cancelled for budget; nothing was stored. Give --max-usd {enough} or more"
    )


def rerun_options(
    *,
    failed_only: bool,
    new_seeds: bool,
    max_usd: Decimal | None,
    vary: Sequence[Vary],
    pay_again: bool = False,
    send_now: bool = False,
) -> dict[str, Any]:
    """What a rerun batch stores of the options that made it (``batches.rerun_options``): enough
    to write the command again (an ``hf`` export's dataset card shows it). ``max_usd`` only when
    given (the batch's own cap is ``budget_max_usd``), ``vary`` as typed, in order;
    ``pay_again`` only when given (batches stored before it existed have no such key)."""
    options: dict[str, Any] = {
        "failed_only": failed_only,
        "new_seeds": new_seeds,
        "max_usd": None if max_usd is None else str(max_usd),
        "vary": [v.text for v in vary],
    }
    if pay_again:
        options["pay_again"] = True
    if send_now:
        options["now"] = True
    return options


@dataclass(frozen=True, slots=True)
class Coverage:
    """The jobs a ``rerun --failed-only`` left out: rendered already by earlier reruns
    (``rendered``), or repeated by unfinished ones that will render them (``pending``)."""

    rendered: list[RenderedBy] = field(default_factory=list)
    pending: list[RerunBeing] = field(default_factory=list)


def _not_covered(
    session: Session, parent: Batch, rows: list[store.NewJob], *, simulated: bool, now: datetime
) -> tuple[list[store.NewJob], Coverage]:
    """The rerun's jobs without those an earlier rerun in ``parent``'s lineage (of this kind: a
    simulation or a batch for fal; its own reruns, a sibling's, its parent's other reruns:
    :func:`jobs.rendered.lineage_renders`) already rendered, or still renders, with the same
    input, and the reruns
    holding those: a rerun stored twice before either ran would pay twice. ``now``: for how long
    the schedule of an unfinished one holds it back (:attr:`RerunBeing.waits`)."""
    found = by_input(lineage_renders(session, parent, simulated=simulated, now=now))
    if not found:
        return rows, Coverage()
    kept: list[store.NewJob] = []
    covering: list[Render] = []
    for row in rows:
        key = wanted_key(row.endpoint, row.input, row.source_files)
        render = rendered_by(found.get(key, ()), key)
        if render is None:
            kept.append(row)
        else:
            covering.append(render)
    return kept, Coverage(
        tally(r for r in covering if not r.unfinished), tally_being(r for r in covering if r.unfinished)
    )


def _all_covered(parent: Batch, covered: Coverage) -> str:
    """Why ``rerun --failed-only`` made no batch: every job it would send was rendered already,
    or is being rerun by an unfinished rerun (the message says what finishes that)."""
    done = sum(r["jobs"] for r in covered.rendered)
    going = sum(r["jobs"] for r in covered.pending)
    rendered = f"already rendered with the same input by {reruns_text(covered.rendered)}" if done else ""
    pending = f"being rerun with the same input in {being_text(covered.pending)}" if going else ""
    if done and going:
        was, are = ("was" if done == 1 else "were"), ("is" if going == 1 else "are")
        why = (
            f"of the {done + going} failed or cancelled jobs of batch {parent.name}, "
            f"{done} {was} {rendered} and {going} {are} {pending}"
        )
    else:
        count = done + going
        jobs = "failed or cancelled job" if count == 1 else f"{count} failed or cancelled jobs"
        verb = ("was" if count == 1 else "were") if done else ("is" if count == 1 else "are")
        why = f"the {jobs} of batch {parent.name} {verb} {rendered or pending}"
    return f"nothing to rerun: {why}; no batch was created (--pay-again renders and pays for them again)"


def _waiting_reruns(covered: Coverage) -> list[tuple[RerunBeing, str]]:
    """The unfinished reruns among ``covered`` that wait for their schedule (a closed window, or
    ``not_before`` ahead), each with how long, in words (:attr:`RerunBeing.waits`: ``waits for
    its window (opens 22:00 Europe/Berlin, in 15h)``, ``waits until 2026-12-05 22:00 +01:00 (in
    5h)``)."""
    return [(rerun, rerun["waits"]) for rerun in covered.pending if rerun["waits"]]


def _not_sent_now(parent: Batch, waiting: list[tuple[RerunBeing, str]], *, simulated: bool) -> str:
    """Why ``rerun --failed-only --now`` sends nothing while an earlier rerun that holds the same
    jobs waits for its window: sent now beside it, they would be paid for twice once it opens,
    and "`wanbatch run` of it goes on" waits hours. The way to send them now is to cancel it."""
    count = sum(rerun["jobs"] for rerun, _ in waiting)
    jobs, verb, them = (
        ("failed or cancelled job", "is", "it")
        if count == 1
        else (f"{count} failed or cancelled jobs", "are", "them")
    )
    where = " and ".join(f"{rerun['name']}, which {waits}" for rerun, waits in waiting)
    flag = " --simulate" if simulated else ""
    cancels = ", ".join(f"`wanbatch cancel {shell_ref(r['name'], r['batch'])}{flag}`" for r, _ in waiting)
    return (
        f"not sent now: the {jobs} of batch {parent.name} {verb} being rerun with the same input in "
        f"{where}; to send {them} now: {cancels}, then this command again; no batch was created "
        f"(a second one would pay for {them} twice)"
    )


def _left_out(parent: Batch, covered: Coverage) -> list[str]:
    """The warnings of a ``rerun --failed-only`` that left out jobs an earlier rerun rendered, or
    an unfinished one is rendering: one for each."""
    warnings = []
    if covered.rendered:
        count = sum(r["jobs"] for r in covered.rendered)
        warnings.append(
            f"{count} failed or cancelled job(s) of batch {parent.name} left out: already rendered "
            f"with the same input by {reruns_text(covered.rendered)}; --pay-again renders and pays "
            "for them again"
        )
    if covered.pending:
        count = sum(r["jobs"] for r in covered.pending)
        warnings.append(
            f"{count} failed or cancelled job(s) of batch {parent.name} left out: being rerun with "
            f"the same input in {being_text(covered.pending)}, not finished yet; --pay-again "
            "renders and pays for them again"
        )
    return warnings


def rerun_wait_note(result: SubmitResult, now: datetime) -> str | None:
    """What ``rerun`` says on stderr of a new batch that keeps its parent's window while that
    window is closed: it waits for it (the jobs a deadline cancelled go out the next night, not
    this morning), and ``--now`` sends it at once. None when it may send now (or has no window)."""
    waits = rerun_waits(result, now)
    if not waits:
        return None
    ref = shell_ref(result.name, result.batch_id)
    return (
        f"batch {result.name} {waits}; `--now` sends it now (Ctrl-C, `wanbatch cancel {ref}`, then "
        "the same rerun with `--now`)"
    )


def rerun_waits(result: SubmitResult, now: datetime) -> str:
    """How long a new rerun waits for the window it kept, in the words ``status`` says it of a
    rerun (:meth:`Schedule.waits`: ``waits for its window (opens 22:00 Europe/Berlin, in
    15h)``); "" when it may send now. ``rerun``'s note and the dashboard's "Rerun failed" say it:
    the note once wrote its own ("waits for its window: opens 22:00 …, in 15h"), and the
    dashboard said "the workers send it" of a rerun that waited hours."""
    return Schedule.from_json(result.schedule).waits(now)


def _rerun_schedule(parent: Batch) -> Schedule | None:
    """The parent's daily window (and its time zone), which a rerun keeps: an overnight batch's
    failed jobs, rerun in the evening, still go out at night. Not its ``not_before`` or
    ``deadline``: instants for the parent's night, usually past by the time of a rerun (its
    deadline cancelled the very jobs being rerun)."""
    if parent.schedule is None:
        return None
    window = store.batch_schedule(parent)
    if window.window is None:
        return None
    return Schedule(window=window.window, timezone=window.timezone)


def _rerun_name(session: Session, parent: Batch) -> str:
    """``NAME-rerun-N``, N one more than the parent's reruns so far, or the next one no batch
    holds: a rerun is always a new batch, never jobs added to one that has the name already
    (the user's own manifest may be called that, or a rerun sent to fal of a simulation that
    held the parent's name: renamed, a simulation takes its simulated reruns along, see
    :func:`jobs.store.name_for_batch`, but not those)."""
    number = sum(1 for b in store.list_batches(session) if b.parent_batch_id == parent.id) + 1
    while store.batch_name_taken(session, f"{parent.name}-rerun-{number}"):
        number += 1
    return f"{parent.name}-rerun-{number}"


def _still_running(batch: Batch, count: int) -> str:
    """Why a rerun of a batch whose seeds are not all known yet would not reproduce it."""
    jobs = "job has" if count == 1 else "jobs have"
    ref = shell_ref(batch.name, batch.id)
    return (
        f"batch {batch.name} is still running: {count} {jobs} not finished, and the seed fal picks for "
        f"them is not known yet, so a rerun would draw other seeds and not reproduce them; wait "
        f"until `wanbatch status {ref}` says done, or pass --new-seeds for fresh seeds"
    )


def _placed(
    rows: list[store.NewJob], swept: set[int], cause: Callable[[store.NewJob, store.NewJob], str]
) -> tuple[list[store.NewJob], list[str]]:
    """The rerun's jobs with each exact input once, the jobs of ``swept`` items numbered
    0, 1, … within their item in order, and a warning when ``--vary`` made some the same as
    others (``--vary seed=1..2`` over jobs already sweeping those seeds), saying why with
    ``cause(repeat, twin)`` for the first repeat (:func:`_repeat_cause`).

    Dense numbers keep ``variant`` as small as the batch: the product of the parent's number
    and the combination count grew with every generation of reruns until the database refused
    it. Items not swept keep the parent's numbers (their place in the manifest)."""
    kept: dict[str, store.NewJob] = {}
    repeats: list[store.NewJob] = []
    for row in rows:
        if row.key in kept:
            repeats.append(row)
        else:
            kept[row.key] = row
    placed: list[store.NewJob] = []
    taken: dict[int, int] = {}  # item → how many of its swept jobs are numbered
    for row in kept.values():
        if row.item_index in swept:
            number = taken.get(row.item_index, 0)
            taken[row.item_index] = number + 1
            row = replace(row, variant=number)
        placed.append(row)
    if not repeats:
        return placed, []
    first = repeats[0]
    return placed, [
        f"{len(repeats)} of the rerun's {len(rows)} jobs repeat another one's exact input and are "
        f"stored once ({cause(first, kept[first.key])}); {len(placed)} jobs in all"
    ]


def _repeat_cause(
    row: store.NewJob, twin: store.NewJob, before: dict[str, dict[str, Any]], vary: Sequence[Vary]
) -> str:
    """Why ``row`` asks exactly what ``twin`` asks, in the words of the option or the inputs:
    ``resolution=480p is listed twice in --vary resolution=480p,480p``, or ``item 0's jobs with
    seed=7 and with seed=8 both become seed=7``. ``before``: each parent job's input (seed
    included) before ``--vary``. The place a job would have had (``item 0 variant 0``) told the
    user nothing they could act on."""
    if row.rerun_of == twin.rerun_of:  # one job's combinations: a value given twice
        return _listed_twice(row, vary) or f"item {row.item_index}'s job is made twice by the --vary values"
    a, b = before.get(twin.rerun_of or "", {}), before.get(row.rerun_of or "", {})
    fields = sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))
    one_item = twin.item_index == row.item_index
    if not fields:
        items = f"item {row.item_index}" if one_item else f"items {twin.item_index} and {row.item_index}"
        return f"two jobs of {items} now ask exactly the same"
    first, second = _fields_text(a, fields), _fields_text(b, fields)
    if one_item:
        jobs = f"item {row.item_index}'s jobs with {first} and with {second}"
    else:
        jobs = f"item {twin.item_index}'s job with {first} and item {row.item_index}'s job with {second}"
    return f"{jobs} both become {_fields_text(row.input, fields)}"


def _listed_twice(row: store.NewJob, vary: Sequence[Vary]) -> str | None:
    """``resolution=480p is listed twice in --vary …``: the option whose values give ``row``'s
    value more than once (as typed for its endpoint: ``81`` and ``081`` are one number)."""
    spec = get_endpoint(row.endpoint)
    for option in vary:
        value = row.input.get(option.field)
        times = checked_values(spec, option).count(value)
        if times > 1:
            said = "twice" if times == 2 else f"{times} times"
            return f"{_fields_text(row.input, [option.field])} is listed {said} in {option.option}"
    return None


def _fields_text(values: dict[str, Any], fields: Iterable[str]) -> str:
    """``seed=7 resolution=480p`` (``no seed`` for one the input leaves out), values shortened."""
    shown = []
    for name in fields:
        if name not in values:
            shown.append(f"no {name}")
            continue
        value = values[name]
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        shown.append(f"{name}={shortened(text)}")
    return " ".join(shown)


class _InputCheck:
    """The inputs a rerun would send checked against the endpoint registry as ``submit`` checks a
    manifest's (:func:`jobs.validation.check_input`): a value no longer allowed (a resolution
    removed from the enum), a field the endpoint no longer has, one it requires now. A rerun
    sent its stored inputs unchecked (or failed pricing one, exit 70).

    One line per problem: ``job 3c1a2b4d (item 0): field 'resolution': '1080p' is not one of the
    allowed values (allowed: 480p, 580p, 720p)``; the same problem in other jobs is counted on
    its line (``; and 41 more job(s)``), so 100,000 jobs give a few lines. Media fields are
    checked apart (:meth:`media_allowed`), once :func:`_checked_sources` has found their files
    unchanged: a file changed or missing is said as that, not as an image that breaks a limit."""

    def __init__(self) -> None:
        self._cache = ValueCache()
        #: Media verdicts by (endpoint, field, value): a batch of one image reads it once.
        self._media: dict[tuple[str, str, str], list[FieldProblem]] = {}
        #: Each problem (endpoint, field, message, allowed) → its line and how many more jobs have it.
        self.lines: dict[tuple[str, str, str, str], list[Any]] = {}
        #: The same for each warning (a limit fal only advises, or wanbatch only assumed): said,
        #: never refusing.
        self.warned: dict[tuple[str, str, str, str], list[Any]] = {}

    def allowed(self, spec: EndpointSpec, values: dict[str, Any], job_id: str, item: int) -> bool:
        """Whether ``values`` (parent job ``job_id``'s, of manifest item ``item``) has no error."""
        media = [fld.name for fld in spec.media_fields]
        problems = check_input(spec, values, skip=media, value_cache=self._cache)
        return self._noted(spec, problems, job_id, item)

    def media_allowed(self, row: store.NewJob) -> bool:
        """Whether the media values ``row`` would send (its parent job's: media fields are never
        varied) pass the endpoint registry's limits now, checked as ``validate`` checks a
        manifest's (:func:`jobs.validation.check_value`: a local file's format, size, dimensions
        and alpha, a data URI's bytes, a URL's form), a problem naming the file as the manifest
        did (``source_files``). The registry is wanbatch's: an upgrade may narrow a limit, and a
        rerun sent its parent's images unchecked, for fal to refuse each job. Only a hard limit
        (fal's input schema's) refuses; an advised or assumed one only warns, as in ``validate``."""
        spec = get_endpoint(row.endpoint)
        sources = row.source_files or {}
        problems: list[FieldProblem] = []
        for fld in spec.media_fields:
            value = row.input.get(fld.name)
            if not isinstance(value, str):
                continue  # not a value a media field takes: allowed() said so already
            mark = (spec.id, fld.name, value)
            if mark not in self._media:
                source = sources.get(fld.name)
                shown = source.get("source") if isinstance(source, dict) else None
                self._media[mark] = check_value(fld, value, shown=shown if isinstance(shown, str) else None)
            problems += self._media[mark]
        return self._noted(spec, problems, row.rerun_of or "", row.item_index)

    def _noted(self, spec: EndpointSpec, problems: Iterable[FieldProblem], job_id: str, item: int) -> bool:
        """Note the problems among ``problems`` (of parent job ``job_id``, of manifest item
        ``item``) as lines; whether there was no error. Warnings (a limit fal only advises, or
        wanbatch only assumed) never refuse, as in ``validate``: they are noted apart
        (:meth:`warned_lines`)."""
        ok = True
        for problem in problems:
            if problem.severity == "error":
                ok = False
                noted = self.lines
            else:
                noted = self.warned
            mark = (spec.id, problem.field, problem.message, problem.allowed or "")
            if mark in noted:
                noted[mark][1] += 1
                continue
            line = f"job {job_id[:8]} (item {item}): field {problem.field!r}: {problem.message}"
            if problem.allowed:
                line += f" (allowed: {problem.allowed})"
            noted[mark] = [line, 0]
        return ok

    def said(self) -> list[str]:
        """The lines, each on one line, a URL's credentials masked (as every message)."""
        return _counted(self.lines)

    def warned_lines(self) -> list[str]:
        """The warnings' lines, as :meth:`said` gives the errors'."""
        return _counted(self.warned)


def _counted(noted: dict[tuple[str, str, str, str], list[Any]]) -> list[str]:
    """Each noted line with how many more jobs have it, on one line, credentials masked."""
    shown = [line + (f"; and {more} more job(s)" if more else "") for line, more in noted.values()]
    return [one_line(mask_urls(line)) for line in shown]


def _inputs_refused(parent: Batch, lines: list[str]) -> str:
    """Why a rerun of ``parent`` is refused: its stored inputs break the endpoint registry's
    rules now (:class:`_InputCheck`); its first line says what to do, then one per problem."""
    problems = "1 stored input value is" if len(lines) == 1 else f"{len(lines)} stored input problems are"
    return (
        f"cannot rerun batch {parent.name}: {problems} no longer allowed by the endpoint registry, so "
        "fal would refuse the jobs; nothing was stored. `--vary FIELD=VALUE` sends an allowed value "
        "of such a field instead; or edit the manifest and submit it:\n"
        + "\n".join(f"  batch {parent.name}, {line}" for line in lines)
    )


def _media_refused(parent: Batch, lines: list[str]) -> str:
    """Why a rerun of ``parent`` is refused: images (or audio) its jobs would send break the
    endpoint registry's limits now (:meth:`_InputCheck.media_allowed`); its first line says what
    to do (``--vary`` cannot: media fields are never varied), then one per problem."""
    problems = (
        "1 stored media input is" if len(lines) == 1 else f"{len(lines)} stored media input problems are"
    )
    return (
        f"cannot rerun batch {parent.name}: {problems} no longer allowed by the endpoint registry, so "
        "fal would refuse the jobs; nothing was stored. Edit the manifest (another file) and submit it:\n"
        + "\n".join(f"  batch {parent.name}, {line}" for line in lines)
    )


def _unnamed_source(rows: Iterable[store.NewJob], folder: Path) -> str | None:
    """``images/ñ.png: file name cannot be represented …`` for the first local file the rerun's
    jobs would send whose recorded name this session cannot open (:func:`jobs.fs.name_problem`:
    a batch submitted under UTF-8, rerun under ``LC_ALL=C``), else None. Said as ``validate``
    says it of a media file; resolving the name was an internal error (exit 70)."""
    for row in rows:
        for fld in get_endpoint(row.endpoint).media_fields:
            value = row.input.get(fld.name)
            if isinstance(value, str) and classify(value) is MediaKind.PATH:
                problem = name_problem(value)
                if problem is not None:
                    return f"{shown_in_folder(value, folder)}: {problem}"
    return None


@dataclass(frozen=True, slots=True)
class _Sources:
    """What :func:`_checked_sources` found of the rerun's local files."""

    #: The jobs still to store: every one but those left out.
    kept: list[store.NewJob]
    #: One line per file a job in the manifest would send changed: the rerun is refused.
    problems: list[str]
    #: The jobs left out: no longer in the manifest, a file of theirs changed since.
    left_out: int = 0
    #: Those jobs' files, as :func:`jobs.fs.shown_in_folder` shows them.
    left_out_files: list[str] = field(default_factory=list)


def _checked_sources(
    rows: Iterable[store.NewJob], folder: Path, not_in_manifest: Collection[str]
) -> _Sources:
    """Each job's local files checked against the SHA-256 that job recorded (``source_files``),
    job by job: a job in the manifest whose file differs gives a line each
    (``images/car.png: changed (…)``, ``…: missing``); a job no longer in it (its parent job's
    id in ``not_in_manifest``: a resubmit replaced it) whose file differs is left out instead,
    the file most likely replaced on purpose (the manifest's jobs send the new one).

    The digests of every job naming a path were merged and the file had to match them all: after
    an image was replaced and the manifest resubmitted, the old jobs' digest and the new ones'
    could never both match, and a plain rerun was refused for ever, in words that were not true
    of the jobs it named ("changed since the batch was submitted" of a file its jobs sent as is).

    The path is shown relative to the manifest's ``folder`` (absolute when outside it). Each
    file is read once, directly (as the submit step reads it, with no cache to be fooled by a
    same-size rewrite). Only local paths with a recorded SHA-256 are checked: URLs are not
    fetched here, data URIs carry their bytes, and jobs stored before hashes were recorded have
    nothing to compare with (the submit step does not check those either).

    Why refuse rather than resend the bytes the parent's jobs sent (``jobs.submitted_input``,
    a data URI for a small file)? Only some jobs have them: a file above the inline limit went
    as a fal storage URL whose content wanbatch cannot check (and fal may expire), and jobs
    never sent (cancelled by a cap or a deadline, what ``--failed-only`` reruns) recorded
    nothing. The rerun would be a mix of reproduced jobs and failures, its stored input a
    multi-megabyte data URI whose job key no longer matches the parent's, while the folder holds
    a file the user changed on purpose, maybe. The user decides instead: the original back, or
    a new batch for the new image.
    """
    now: dict[str, tuple[str | None, str | None]] = {}  # path → (its SHA-256 now, or what is wrong)
    mismatched: dict[str, set[str]] = {}  # path → the SHA-256 values of manifest jobs it differs from
    left_files: dict[str, None] = {}
    kept: list[store.NewJob] = []
    left_out = 0
    for row in rows:
        differs: list[tuple[str, str]] = []
        for fld in get_endpoint(row.endpoint).media_fields:
            value = row.input.get(fld.name)
            source = (row.source_files or {}).get(fld.name)
            digest = source.get("sha256") if isinstance(source, dict) else None
            if not (isinstance(value, str) and isinstance(digest, str) and classify(value) is MediaKind.PATH):
                continue
            if value not in now:
                now[value] = _file_digest(Path(value))
            current, problem = now[value]
            if problem is not None or current != digest:
                differs.append((value, digest))
        if differs and row.rerun_of is not None and row.rerun_of in not_in_manifest:
            left_out += 1
            left_files.update((shown_in_folder(value, folder), None) for value, _ in differs)
            continue
        for value, digest in differs:
            mismatched.setdefault(value, set()).add(digest)
        kept.append(row)
    lines = []
    for value, digests in mismatched.items():
        current, problem = now[value]
        if problem is None:
            then = ", ".join(sorted(f"{d[:12]}…" for d in digests))
            problem = f"changed since the batch was submitted (SHA-256 {then} then, {str(current)[:12]}… now)"
        lines.append(f"{shown_in_folder(value, folder)}: {problem}")  # one line each: a line feed is escaped
    return _Sources(kept, lines, left_out, list(left_files))


def _file_digest(path: Path) -> tuple[str | None, str | None]:
    """``path``'s SHA-256 now, or (None and) what keeps it from being read as the file the batch
    recorded.

    A recorded name this session cannot open (``ñ`` under ``LC_ALL=C``) is said as ``validate``
    says it of a media file (:func:`jobs.fs.name_problem`), never resolved: that was exit 70."""
    problem = name_problem(path)
    if problem is not None:
        return None, problem
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None, "cannot be resolved (a symlink loop?)"
    if real != path:  # stored fully resolved: a symlink appeared since
        return None, f"now leads to {shown_path(real)} (a symlink appeared since the batch was submitted)"
    if not path.exists():
        return None, _MISSING
    if not path.is_file():
        return None, "no longer a file"
    try:
        with path.open("rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest(), None
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"


def _changed_left_out(parent: Batch, left: _Sources) -> str:
    """The line of a rerun that left out jobs no longer in the manifest whose file changed since."""
    return (
        f"{left.left_out} job(s) of batch {parent.name} no longer in its manifest send a file changed "
        f"since they were submitted ({_files_text(left)}): left out (sent, they would fail)"
    )


def _files_text(left: _Sources) -> str:
    """The first few files of the jobs :func:`_checked_sources` left out."""
    return ", ".join(left.left_out_files[:3]) + (", …" if len(left.left_out_files) > 3 else "")


def _all_changed(parent: Batch, left: _Sources) -> str:
    """Why a rerun made no batch: each of its jobs was no longer in the manifest and sends a
    file changed since (:func:`_checked_sources`)."""
    return (
        f"nothing to rerun: the {left.left_out} job(s) of batch {parent.name} left to repeat are no "
        f"longer in its manifest and send a file changed since ({_files_text(left)}); no batch was created"
    )


def _sources_changed(parent: Batch, lines: list[str], root: Batch) -> str:
    """Why a rerun of ``parent`` is refused: its first line says what to do (``--json`` shows
    that line only), then one line per file. ``root``: the batch ``parent`` is a rerun of (any
    generation; ``parent`` itself when it is none), whose manifest gives them their place."""
    one = len(lines) == 1
    files = "1 source file differs" if one else f"{len(lines)} source files differ"
    return (
        f"cannot rerun batch {parent.name}: {files} from what its jobs were validated with, so "
        f"every job that sends {'it' if one else 'one of them'} would fail; nothing was stored. "
        "Put the original file back to "
        "reproduce the batch, or submit the edited manifest as a new batch (another `name:`) to "
        f"render the new image{_moved_hint(parent, root, lines)}:\n"
        + "\n".join(f"  {line}" for line in lines)
    )


def _moved_hint(parent: Batch, root: Batch, lines: list[str]) -> str:
    """What :func:`_sources_changed` adds when a file is missing: the folder may have moved, and
    submitting its manifest from the new place gives the batch its files back. A rerun has no
    manifest of its own: submitting its ``root``'s moves the root and its reruns with it
    (:func:`jobs.store.reruns_follow`). A root already elsewhere (a rerun an older version left
    behind) is named by its manifest there, which submitting again brings the rerun to."""
    if not any(line.endswith(_MISSING) for line in lines):
        return ""
    again = f"NEW-FOLDER/{Path(root.manifest_path).name}"
    if (
        root is not parent
        and root.manifest_path != parent.manifest_path
        and Path(root.manifest_path).is_file()
    ):
        again = root.manifest_path
    command = f"wanbatch run {again} --simulate" if root.simulated else f"wanbatch submit {again}"
    if root is parent:
        return f"; moved the manifest's folder? give the batch its new place first (`{shown_path(command)}`)"
    return (
        f"; moved the manifest's folder? give batch {root.name}, which {parent.name} is a rerun of, "
        f"its new place first (`{shown_path(command)}`): its reruns move with it"
    )


#: What :func:`_source_problem` says of a file no longer there.
_MISSING = "missing (deleted or moved since the batch was submitted)"
