"""Batch-level use cases: validate, estimate, submit and report, as plain functions.

The CLI stays thin (parse, call one of these, print); the worker and tests call the same
functions, so "what `submit` does" has exactly one definition.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NotRequired, Protocol, TypedDict, cast

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from jobs import clock, database_home, db, listing, machine, store
from jobs.cap_holds import (
    CapCheck,
    Held,
    HeldByScope,
    _cap_holds,
    cap_holds,
    cap_note,
    normal_batches_ahead,
    queue_waits,
)
from jobs.db import open_engine
from jobs.digits import NUMBER
from jobs.endpoints import registry_sha256
from jobs.errors import (
    DEADLINE_PASSED,
    NEVER_OPENS,
    ConfigError,
    Issue,
    ManifestError,
    NotFoundError,
    UnpricedError,
    UsageError,
    WanbatchError,
)
from jobs.estimates import daily_budget_issues, fal_keys, input_dirs
from jobs.failure_summary import next_step
from jobs.fs import shown_in_folder, shown_path
from jobs.listing import PAST_DEADLINE as PAST_DEADLINE
from jobs.listing import PAUSED_BY_USER as PAUSED_BY_USER
from jobs.listing import SCHEDULE_OVER as SCHEDULE_OVER
from jobs.listing import batch_phase as batch_phase
from jobs.manifest import JobSpec, ValidationReport, validate_manifest
from jobs.manifest.expand import Manifest
from jobs.manifest.loading import MAX_MANIFEST_BYTES
from jobs.models import USER_CANCELLED, Batch, BatchState, Job, utcnow
from jobs.money import DaySpender, too_much_usd, usd_apart, usd_json, usd_text
from jobs.pricing import Totals, estimate_job, price_table
from jobs.printable import printable, shell_ref, size_text
from jobs.processes import process_prefix
from jobs.rendered import (
    Covered,
    RerunPending,
    RerunRendered,
    rerun_covered,
    rerun_covered_of_batches,
)
from jobs.schedule import Schedule, format_age
from jobs.settings import DatabaseSettings, DownloadSettings, RetrySettings, Settings
from jobs.states import AT_PROVIDER_STATES, UNFINISHED_STATES, JobState
from jobs.url_secrets import masked_url


def check_output_dir(settings: DownloadSettings) -> Path:
    """Prove ``WANBATCH_OUTPUT_DIR`` takes an output before anything is sent: for a folder,
    create it, then write, fsync and remove a probe; for ``s3://bucket/prefix``, the same in the
    staging folder, then put (with its SHA-256) and delete a small probe object.
    :class:`ConfigError` otherwise. Returns the local folder (outputs, or staging for S3).

    A video fal made is paid for; finding out after the first job that the folder is read-only,
    the disk is full or the bucket refuses writes would waste every job in flight. (It can still
    fail later: the download step handles that.)
    """
    from jobs.output_store import open_output_store
    from jobs.outputs import OutputWriteError

    try:
        open_output_store(settings).check_writable()
    except OutputWriteError as exc:
        raise ConfigError(f"{exc}; nothing was sent") from None
    return settings.output_dir


def check_output_names(settings: DownloadSettings, batch_name: str) -> None:
    """Prove the outputs of the batch named ``batch_name`` can be named where they go (an S3
    key holds at most 1024 bytes): :class:`ConfigError` otherwise, before anything is sent."""
    from jobs.output_store import open_output_store
    from jobs.outputs import OutputWriteError

    try:
        open_output_store(settings).check_names(batch_name)
    except OutputWriteError as exc:
        raise ConfigError(f"{exc}; nothing was sent") from None


#: How much more room than the estimate counts as enough (the estimate is an average).
SPACE_MARGIN = 1.1
#: What a video's sidecar JSON takes beside it (a few KB, one filesystem block or so).
SIDECAR_BYTES = 4096


def space_note(batch_id: str, settings: Settings) -> str | None:
    """A warning, before processing, when ``WANBATCH_OUTPUT_DIR``'s disk looks too small for the
    videos the batch still has to store; None when it looks big enough, or nothing tells.

    The size of a video is the average of those already stored (this batch's, else any batch's
    sent to fal): a guess, so it only warns, and says what it assumed. Running out is handled
    anyway (the batch pauses, nothing more is sent: :mod:`worker.steps.download`); knowing at
    the start saves a night of rendering that stops at 3 AM.
    """
    from jobs.output_store import open_output_store

    outputs = open_output_store(settings)
    free = outputs.free_bytes()
    if free is None:
        return None
    with db.read_scope(open_engine(settings)) as session:
        counts = store.counts_by_state(session, batch_id)
        per_video = store.video_bytes_per_job(session, batch_id)
    remaining = sum(counts[state.value] for state in JobState if not state.terminal)
    if per_video is None or remaining == 0:
        return None
    needed = remaining * (per_video + SIDECAR_BYTES)
    if free >= needed * SPACE_MARGIN:
        return None
    return (
        f"{outputs.describe()} has {size_text(free)} free; the {remaining} videos this batch still has "
        f"to store need about {size_text(needed)} ({size_text(per_video)} each, the average so far). "
        "If the disk fills, the batch pauses (nothing more is sent) until there is room"
    )


#: Renamed reruns the ``run`` line names one by one (the others are counted).
RERUNS_SHOWN = 3


@dataclass(slots=True)
class SubmitResult:
    """What ``submit`` did: the batch, and how many jobs were new vs already stored."""

    batch_id: str
    name: str
    created: bool
    added: int
    existing: int
    total: int
    counts: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    #: The batch's budget cap after this submit (None: no cap).
    budget_max_usd: Decimal | None = None
    #: ``{"from": old, "to": new}`` (USD, None = no cap) when this submit changed the cap.
    budget_changed: dict[str, float | None] | None = None
    #: Jobs the batch's old cap had cancelled before sending them that this submit, raising or
    #: removing the cap, made ``pending`` again (:func:`jobs.store.revive_budget_cancelled`).
    budget_revived: int = 0
    #: Jobs failed ``input_file`` before ever being sent (a file not there, its folder moved)
    #: that this submit, whose manifest has them with their files, made ``pending`` again
    #: (:func:`jobs.store.revive_input_failed`).
    inputs_revived: int = 0
    #: The batch's schedule (``Schedule.as_json()``, None = none) and queue priority after this submit.
    schedule: dict[str, Any] | None = None
    priority: str = "normal"
    #: ``{"from": old, "to": new}``, each ``{"schedule": …, "priority": …}``, when this submit
    #: changed the schedule or the priority.
    schedule_changed: dict[str, dict[str, Any]] | None = None
    #: Made by a ``--simulate`` run: its requests go to the bundled simulator, never to fal.
    simulated: bool = False
    #: The new name of a simulation that held this batch's name (a batch for fal takes it back).
    moved_aside: str | None = None
    #: Its simulated reruns, renamed with it: ``(old, new)`` each (``NAME-rerun-1`` →
    #: ``NAME-simulated-rerun-1``).
    reruns_moved: list[tuple[str, str]] = field(default_factory=list)
    #: Of ``existing``, the jobs that took a new ``(item_index, variant)``: the edited manifest
    #: puts them elsewhere (an item inserted above, a matrix reordered).
    renumbered: int = 0
    #: Jobs of the batch the manifest no longer has (numbered after its items).
    not_in_manifest: int = 0
    #: Of those, the jobs never sent, dropped (cancelled, ``not_in_manifest``); the others stay.
    dropped: int = 0
    #: Of those, the jobs not dropped that ended without being sent (a budget cancelled them
    #: before their first POST, …): they stay as they are, nothing of them paid for.
    ended_unsent: int = 0
    #: Jobs dropped by an earlier submit that the manifest has again: ``pending`` once more.
    restored: int = 0
    #: Of ``not_in_manifest``, the jobs left out only because a local file they send was
    #: rewritten since (the manifest has a job for its new bytes in place of each), by file:
    #: ``{"source", "old_sha256" (a list), "new_sha256", "jobs", "dropped", "ended_unsent",
    #: "kept"}`` (:func:`_changed_file_json`); a job sending two such files (a first and a last
    #: frame) is counted under each.
    changed_files: list[dict[str, Any]] = field(default_factory=list)
    #: Of ``existing``, the manifest's jobs a job the batch already sent (or rendered) stands
    #: for: they differ from it only by an endpoint default written out or left out.
    defaults_matched: int = 0
    #: ``{"from": old, "to": new}`` (absolute paths) when the batch's manifest was submitted
    #: from somewhere else than last time (its folder moved, or another machine's, the same path
    #: or not: ``manifest_host_moved``): its files are read from there now.
    manifest_moved: dict[str, str] | None = None
    #: The manifest as the command was given it (how :meth:`moved_note` names the new place).
    manifest_given: str | None = None
    #: ``{"from": old, "to": new}`` (machines' host names, :mod:`jobs.machine`) when the batch's
    #: manifest was on another machine and this one took it (a copy asking for all its jobs, or
    #: ``--take-over``): the batch is this machine's project now.
    manifest_host_moved: dict[str, str] | None = None
    #: The batch's reruns (every generation, by name) that took its new place with it: their
    #: jobs name their files where the batch's jobs do now (:func:`jobs.store.reruns_follow`).
    reruns_followed: list[str] = field(default_factory=list)
    #: Stored videos of the batch (and its reruns) found moved with it: stored under another
    #: output folder, found under the current one with the recorded SHA-256, and recorded there
    #: (:func:`_follow_outputs`). Distinct files, not jobs.
    outputs_followed: int = 0
    #: ``{"from": old, "to": new, "jobs": n}`` (USD: the batch's estimate) when this submit priced
    #: again the ``n`` stored jobs not sent yet with the prices in force and that changed the
    #: estimate (``WANBATCH_PRICING_OVERRIDES`` corrected since: :func:`jobs.store.reprice_unsent`).
    estimate_changed: dict[str, float | int | None] | None = None
    #: The warning that the manifest's estimate exceeds ``WANBATCH_DAILY_BUDGET_USD`` or what is
    #: left of it today (``estimate --json``'s ``budget_warnings``, in its words); also in
    #: ``warnings``. Empty without the setting, under it, or for a simulation.
    budget_warnings: list[str] = field(default_factory=list)
    #: The stderr line saying this submit made the default database (``./.wanbatch/wanbatch.db``)
    #: in the current folder, and where another one was found (:mod:`jobs.database_home`); None else.
    database_note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The contract's ``submit --json`` object (batch, total, counts) plus what was added."""
        return {
            "batch": self.batch_id,
            "name": self.name,
            "created": self.created,
            "added": self.added,
            "existing": self.existing,
            "total": self.total,
            "counts": self.counts,
            "budget_max_usd": _money(self.budget_max_usd),
            "budget_changed": self.budget_changed,
            "estimate_changed": self.estimate_changed,
            "budget_revived": self.budget_revived,
            "inputs_revived": self.inputs_revived,
            "schedule": self.schedule,
            "priority": self.priority,
            "schedule_changed": self.schedule_changed,
            "simulated": self.simulated,
            "renumbered": self.renumbered,
            "not_in_manifest": self.not_in_manifest,
            "dropped": self.dropped,
            "ended_unsent": self.ended_unsent,
            "restored": self.restored,
            "changed_files": list(self.changed_files),
            "defaults_matched": self.defaults_matched,
            "manifest_moved": self.manifest_moved,
            "manifest_host_moved": self.manifest_host_moved,
            "reruns_followed": list(self.reruns_followed),
            "outputs_followed": self.outputs_followed,
            "warnings": list(self.warnings),
            "budget_warnings": list(self.budget_warnings),
        }

    def moved_note(self) -> str | None:
        """The stderr line saying the batch's manifest (and so its files) is somewhere else now,
        with the reruns that followed it, or None."""
        reruns = ""
        if self.reruns_followed:
            shown = ", ".join(self.reruns_followed[:RERUNS_SHOWN])
            more = len(self.reruns_followed) - RERUNS_SHOWN
            reruns = f"{shown}{f', and {more} more' if more > 0 else ''}"
        if self.manifest_moved is None:
            if not reruns:
                return None
            # Reruns an older version left in the old folder when only the batch moved.
            now = self.manifest_given or ""
            followed = f"reruns of batch {self.name} moved to its place ({shown_path(now)}): {reruns}"
            return followed + self._outputs_note()
        now = shown_path(self.manifest_given or self.manifest_moved["to"])
        was = shown_path(self.manifest_moved["from"])
        if (hosts := self.manifest_host_moved) is not None:  # from another machine to this one
            now = f"{now} on this machine ({printable(hosts['to'])})"
            was = f"{printable(hosts['from'])}:{was}"
        return (
            f"batch {self.name} moved: its manifest is now {now} (was {was})"
            + (f"; its reruns moved with it: {reruns}" if reruns else "")
            + self._outputs_note()
        )

    def _outputs_note(self) -> str:
        if not self.outputs_followed:
            return ""
        return f"; {self.outputs_followed} stored video(s) found in its new output folder"

    def simulation_note(self) -> str | None:
        """The stderr line saying a simulation gave this batch its name, or None."""
        if self.moved_aside is None:
            return None
        reruns = ""
        if self.reruns_moved:
            shown = ", ".join(f"{old} → {new}" for old, new in self.reruns_moved[:RERUNS_SHOWN])
            more = len(self.reruns_moved) - RERUNS_SHOWN
            reruns = f" with its simulated reruns ({shown}{f', and {more} more' if more > 0 else ''})"
        return (
            f"batch {self.name} was a simulation (`--simulate`): renamed {self.moved_aside}{reruns}; "
            f"a new batch {self.name} goes to fal"
        )

    def budget_note(self) -> str | None:
        """The stderr line saying the cap changed, or None."""
        if self.budget_changed is None:
            return None
        old, new = self.budget_changed["from"], self.budget_changed["to"]
        if old is not None and new is not None:  # never "$1.01 → $1.01" for 1.01 → 1.005
            was, now = usd_apart(old, new)
        else:
            was, now = _cap_text(old), _cap_text(new)
        revived = ""
        if self.budget_revived:
            revived = (
                f"; {self.budget_revived} job(s) its old cap cancelled before sending them are pending "
                "again, decided by the new cap"
            )
        return (
            f"budget of batch {self.name} changed: {was} → {now} (applies to every job not yet sent){revived}"
        )

    def estimate_note(self) -> str | None:
        """The stderr line saying the prices in force changed the estimates of jobs not sent
        yet (old → new total of the batch), or None."""
        if self.estimate_changed is None:
            return None
        old, new = self.estimate_changed["from"], self.estimate_changed["to"]
        assert old is not None
        assert new is not None
        was, now = usd_apart(old, new)
        return (
            f"estimates of batch {self.name} changed with the prices in force: {was} → {now} "
            f"({self.estimate_changed['jobs']} job(s) not sent yet priced again; jobs already sent "
            "keep theirs)"
        )

    def schedule_note(self) -> str | None:
        """The stderr line saying the schedule or priority changed, or None."""
        if self.schedule_changed is None:
            return None
        old, new = self.schedule_changed["from"], self.schedule_changed["to"]
        return (
            f"schedule of batch {self.name} changed: {schedule_text(old['schedule'], old['priority'])} → "
            f"{schedule_text(new['schedule'], new['priority'])} (applies to every job not yet sent)"
        )


def schedule_text(schedule: dict[str, Any] | None, priority: str = "normal") -> str:
    """A stored schedule and priority in a few words: ``deadline 2026-12-07 06:00 +01:00, window
    22:00-06:00 Europe/Berlin, priority low``: its instants as ``status`` shows them, in the
    schedule's time zone (:meth:`Schedule.stamp`), not as stored (UTC)."""
    parts = []
    if schedule:
        read = Schedule.from_json(schedule)
        if read.not_before is not None:
            parts.append(f"not before {read.stamp(read.not_before)}")
        if read.deadline is not None:
            parts.append(f"deadline {read.stamp(read.deadline)}")
        if schedule.get("window"):
            parts.append(f"window {schedule['window']} {schedule.get('timezone') or 'UTC'}")
    if priority != "normal":
        parts.append(f"priority {priority}")
    return ", ".join(parts) or "none"


def _cap_text(value: float | None) -> str:
    return "no cap" if value is None else usd_text(value)


#: ``--max-usd``'s thousands separators: a comma before every group of exactly three digits of
#: the whole part (``1,000``, ``12,345.50``), never anywhere else (``2,50`` is no amount).
_GROUPED = re.compile(r"[+]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?")
_USD_ALLOWED = (
    "a positive amount of US dollars in ASCII digits such as 25, 25.00, $25 or 1,000.50 "
    "(commas only between groups of three digits)"
)


def parse_usd(text: str, option: str = "--max-usd") -> Decimal:
    """A positive, finite amount of US dollars (``25``, ``25.00``, ``$25``, ``1,000``); UsageError otherwise.

    The number is read as a manifest's ``budget.max_usd`` is (:data:`jobs.digits.NUMBER`: ASCII
    digits, no ``_``), after an optional ``$``; commas are accepted only as thousands separators
    (:data:`_GROUPED`). ``2,50`` was read as 250 (every comma dropped) and ``٣`` or ``1_0`` as
    numbers (``Decimal()`` takes them): all three are refused.
    """
    cleaned = text.strip().removeprefix("$")
    if _GROUPED.fullmatch(cleaned):
        cleaned = cleaned.replace(",", "")
    value = Decimal(cleaned) if NUMBER.fullmatch(cleaned) else Decimal("NaN")
    if not value.is_finite() or value <= 0:
        raise UsageError(f"{option} takes {_USD_ALLOWED}, got {text!r}")
    if (problem := too_much_usd(value)) is not None:
        raise UsageError(f"{option} {text.strip()} {problem}")
    return value


#: Seconds ``validate`` and ``estimate`` wait for PostgreSQL to answer before they warn about
#: the day's cap without today's spend (:func:`committed_today`): a warning is not worth a hang.
COMMITTED_TODAY_TIMEOUT = 5


def committed_today(settings: DatabaseSettings) -> list[DaySpender] | None:
    """What each batch has committed today, the largest first (the day's cap counts their sum,
    ``run``'s dispatch reads the same: :func:`jobs.store.committed_usd_today_by_batch`), or
    None when the database cannot tell. By batch, so that the warning says whose it is.

    For the warnings of ``validate`` and ``estimate`` about ``WANBATCH_DAILY_BUDGET_USD``, which
    never create, migrate or write a database: read through :func:`jobs.db.read_engine` (a
    missing SQLite file stays missing), and a database that is missing, unreachable or of another
    schema is not an error here — the warning is then about the whole cap."""
    from sqlalchemy.pool import NullPool

    try:
        url = db.normalize_url(settings.database_url)
        postgres = url.get_backend_name() == "postgresql"
        connect_args = {"connect_timeout": COMMITTED_TODAY_TIMEOUT} if postgres else {}
        engine = db.read_engine(url, poolclass=NullPool, connect_args=connect_args)
        try:
            with db.read_scope(engine) as session:
                return store.committed_usd_today_by_batch(session, utcnow())
        finally:
            engine.dispose()
    except (SQLAlchemyError, WanbatchError, OSError):
        return None


def _new_job(
    endpoint: str,
    item_index: int,
    key: str,
    resolved: dict[str, Any],
    settings: Settings,
    *,
    variant: int = 0,
    source_files: dict[str, Any] | None = None,
    rerun_of: str | None = None,
) -> store.NewJob:
    """A job row to store, with its cost estimate and provenance (registry entry hash, pricing)."""
    est = estimate_job(endpoint, resolved, settings)
    return store.NewJob(
        key=key,
        item_index=item_index,
        endpoint=endpoint,
        input=resolved,
        est_billing_units=est.billing_units,
        est_usd=est.usd,
        variant=variant,
        source_files=source_files,
        registry_sha256=registry_sha256(endpoint),
        price_table=price_table(endpoint, settings),
        rerun_of=rerun_of,
    )


def _new_jobs(specs: Iterator[JobSpec], settings: Settings) -> Iterator[store.NewJob]:
    """The jobs to store, priced. A job no price covers is one located line
    (:class:`UnpricedError`), never an internal error: validation refuses such inputs first, so
    this is a row changed since it was validated (which :func:`submit_manifest` then says), or a
    price table that misses a value its endpoint allows."""
    for spec in specs:
        try:
            job = _new_job(
                spec.endpoint,
                spec.item_index,
                spec.key,
                spec.input,
                settings,
                variant=spec.variant,
                source_files=spec.source_files,
            )
        except UnpricedError as exc:
            where = Issue(spec.source, spec.line, spec.item_index, None, str(exc))
            raise UnpricedError(f"{where}; nothing was submitted") from exc
        yield job


#: What storing a row may raise when no one validated it (an ``items_from`` row changed between
#: the passes): a price no table has, a value the database or the job's key refuses. Any of them
#: is first put down to the change, if there was one (:meth:`Manifest.refuse_changed_items`).
_ROW_FAILURES: tuple[type[Exception], ...] = (
    UnpricedError,
    SQLAlchemyError,
    ValueError,
    TypeError,
    ArithmeticError,
    LookupError,
)


def _submitted(
    session: Session,
    batch: Batch,
    created: bool,
    added: int,
    existing: int,
    warnings: list[str] | None = None,
    budget_changed: dict[str, float | None] | None = None,
    schedule_changed: dict[str, dict[str, Any]] | None = None,
) -> SubmitResult:
    counts = store.counts_by_state(session, batch.id)
    return SubmitResult(
        batch_id=batch.id,
        name=batch.name,
        created=created,
        added=added,
        existing=existing,
        total=sum(counts.values()),
        counts=counts,
        warnings=warnings or [],
        budget_max_usd=batch.budget_max_usd,
        budget_changed=budget_changed,
        schedule=batch.schedule,
        priority=batch.priority,
        schedule_changed=schedule_changed,
        simulated=batch.simulated,
    )


#: The manifest errors that say its schedule can send nothing more (:func:`_resumes_past_deadline`).
_SCHEDULE_OVER = (DEADLINE_PASSED, NEVER_OPENS)


def _resumes_past_deadline(engine: Engine, report: ValidationReport, simulated: bool) -> bool:
    """Whether the manifest's only errors say its schedule can send nothing more (the deadline
    passed, or passes before the window opens again), and its batch is stored.

    A new batch whose deadline has passed could send nothing: refused. A stored one is another
    matter: its interrupted run left requests at fal, made and billed, that running the same
    command again must collect (the deadline then cancels what was never sent, as it would
    have). So is a manifest edited after its deadline (a budget raised to collect them)."""
    assert report.manifest is not None
    if any(issue.code not in _SCHEDULE_OVER for issue in report.errors):
        return False
    with db.read_scope(engine) as session:
        return store.is_stored(session, report.manifest.name, simulated=simulated)


def _deadline_note(issue: Issue) -> Issue:
    """The past deadline of a stored batch (or one it reaches before the window opens again):
    said, not refused."""
    if issue.code == NEVER_OPENS:  # the message ends "nothing could ever be sent"
        message = f"{issue.message.removesuffix(': nothing could ever be sent')}: nothing more is sent; "
        message += "what fal made is collected, the rest cancelled"
    else:
        message = f"{issue.message}: nothing more is sent; what fal made is collected, the rest cancelled"
    return replace(issue, message=message, severity="warning", allowed=None)


def schedule_over_note(batch: Batch, now: datetime) -> str | None:
    """What ``run BATCH`` says of a stored batch whose schedule will never send again (its
    deadline passed, or comes before the window next opens), in the words a manifest's deadline
    gets (:func:`_deadline_note`); None while it may still send."""
    schedule = store.batch_schedule(batch)
    over = schedule.over(now)
    if over is None:
        return None
    return f"batch {batch.name}: {over}: nothing more is sent; what fal made is collected, the rest cancelled"


def manifest_edited_note(batch: Batch) -> str | None:
    """What ``run BATCH`` says before it starts when the manifest file the batch was submitted
    from no longer holds what was submitted (its SHA-256, stored, differs): the run goes on with
    the stored manifest — its budget cap, schedule and jobs — as the contract has it (only
    submitting applies the file's current values), but a lowered cap edited into the file and
    then ``run NAME`` spent under the old cap without a word. None when the file is unchanged,
    is another machine's, cannot be read (gone: the submit step says so, and pauses the batch,
    should a job need a file from its folder), or the batch is a rerun (no manifest of its own).

    Bounded: one file read and hashed, at most the manifest's size limit."""
    if batch.parent_batch_id is not None or machine.elsewhere(batch.manifest_host):
        return None
    path = Path(batch.manifest_path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except (OSError, ValueError):
        return None
    if hashlib.sha256(data).hexdigest() == batch.manifest_sha256:
        return None
    cap = f"budget {usd_text(batch.budget_max_usd)}" if batch.budget_max_usd is not None else "no budget cap"
    simulate = " --simulate" if batch.simulated else ""
    shown = shown_path(path)
    return (
        f"{shown} changed since batch {batch.name} was submitted; this run uses the stored version "
        f"({cap}); `wanbatch run {shown}{simulate}` applies the file"
    )


def _apply_budget(session: Session, batch: Batch, wanted: Decimal | None) -> dict[str, float | None] | None:
    """Give an existing batch the cap asked for now; ``{"from", "to"}`` when that changed it."""
    if batch.budget_max_usd == wanted:  # Decimal equality: 5.0 == 5.000000
        return None
    change = {"from": _money(batch.budget_max_usd), "to": _money(wanted)}
    store.set_batch_budget(session, batch.id, wanted)
    return change


def cap_raised(old: Decimal | None, new: Decimal | None) -> bool:
    """Whether a batch cap going from ``old`` to ``new`` (None: no cap) lets more through: the
    jobs the old one cancelled unsent are then decided again (:func:`jobs.store.revive_budget_cancelled`);
    a lower cap would only cancel them again."""
    if old is None:
        return False  # no cap before: nothing was cancelled by one
    return new is None or new > old


def _schedule_json(schedule: Schedule) -> dict[str, Any] | None:
    """How a schedule is stored and compared: None when it constrains nothing."""
    return None if schedule.is_empty() else schedule.as_json()


def _apply_schedule(
    session: Session, batch: Batch, wanted: Schedule, priority: str
) -> dict[str, dict[str, Any]] | None:
    """Give an existing batch the schedule and priority asked for now; ``{"from", "to"}`` when
    that changed either."""
    old = {"schedule": _schedule_json(store.batch_schedule(batch)), "priority": batch.priority}
    new = {"schedule": _schedule_json(wanted), "priority": priority}
    if old == new:
        return None
    store.set_batch_schedule(session, batch.id, wanted, priority)
    return {"from": old, "to": new}


def submit_manifest(
    path: str | Path,
    settings: Settings,
    allowed_dirs: Iterable[Path] = (),
    *,
    simulated: bool = False,
    refuse_paused_batch: bool = False,
    refuse: Callable[[Session, Batch], None] | None = None,
    take_over: bool = False,
    on_batch: Callable[[str], None] | None = None,
) -> SubmitResult:
    """Validate the whole manifest, then store its batch and jobs in one transaction.

    Nothing is written unless every job is valid. Idempotent: the batch is found by name and
    jobs by their deterministic key, so submitting the same manifest again adds nothing (and
    an edited manifest adds only its new jobs, and gives every job its place in the edited text:
    :func:`jobs.store.resubmit_jobs`). The manifest's *current* budget always applies:
    submitting again with a lower, higher or no ``budget.max_usd`` changes the stored cap (and
    the result says so in ``budget_changed``); a raised or removed cap makes ``pending`` again
    the jobs the old one cancelled before sending them (``budget_revived``,
    :func:`jobs.store.revive_budget_cancelled`): the message says the new cap applies to every
    job not yet sent, and those were never sent. So do its current ``schedule`` and ``priority``
    (``schedule_changed``), and ``reuse_outputs``. A user's ``wanbatch pause`` is left as it is:
    only ``resume`` ends it. A batch ``wanbatch cancel`` ended is refused (:func:`refuse_cancelled`)
    and nothing is stored: its new jobs would only be cancelled. Submitted from another place
    than last time (its folder moved, ``manifest_moved``), the batch takes the new manifest path,
    and its stored jobs the paths the manifest now gives their files (the same bytes: the same
    keys), so what is not sent yet, and a later ``rerun``, reads them from there. Its reruns (every
    generation) follow: each rerun's job takes the paths of the job it repeats, where both record
    the same SHA-256 (``reruns_followed``, :func:`jobs.store.reruns_follow`), so ``rerun`` of a
    rerun finds them there too.

    ``simulated`` (``--simulate``): the batch is a simulation, stored apart from any batch of
    the same name sent to fal (:func:`jobs.store.name_for_batch`). ``refuse_paused_batch``
    (``run``): a batch its user paused is refused (:func:`refuse_paused`) and nothing is stored.
    ``refuse``: the caller's own refusal of the batch (stored, or created now), raised likewise
    before anything is; what it writes is committed with the batch, or not at all (``run
    --simulate``: a batch another live process simulates is refused,
    :func:`simulated_elsewhere_line`, else claimed for this process in the same transaction —
    two runs started together both found no other and both ran it).

    The batch records the machine its manifest is on (``manifest_host``, :mod:`jobs.machine`).
    Submitted from another machine, the manifest given must ask for every job of the batch (the
    same project on a shared folder, or a copy with more items), whatever its path, or it is
    refused (:func:`refuse_name_taken`): that machine's file cannot be looked at from here.
    ``take_over`` (``--take-over``): the user says it is the batch's project moved here, and it
    is taken whatever it leaves out, as a move on one machine is. Taken, the batch records this
    machine (``manifest_host_moved``).

    ``on_batch(id)`` is called with the batch (found or created) inside the transaction, before
    its jobs are stored: should a signal stop the command before this returns, the caller can
    look it up to name the batch the database holds (``run --json``'s ``batch``), or none.
    """
    judged_at = clock.utcnow()
    report = validate_manifest(path, input_dirs(settings, allowed_dirs), fal_keys(settings), now=judged_at)
    manifest = report.manifest
    if manifest is None:
        raise ManifestError(report.issues)
    # Before the default database is created: a database above the manifest's folder that holds
    # this batch is a refusal (a --simulate run spends nothing: a note), nothing created.
    home = database_home.before_creating(settings, Path(path), manifest.name, refuse=not simulated)
    if home is not None and not report.ok:  # a new database holds no batch to resume
        raise ManifestError(report.issues)
    engine = open_engine(settings)
    # The deadline judged again on the database's clock, measured now that it is open (a
    # PostgreSQL server's; SQLite's is this host's): a host 3 minutes behind it let a deadline
    # 1 minute ahead of its own clock through, and the first tick cancelled every job.
    db.on_database_clock(engine)
    now = clock.utcnow()
    if (manifest.schedule.over(judged_at) is None) != (manifest.schedule.over(now) is None):
        report = validate_manifest(path, input_dirs(settings, allowed_dirs), fal_keys(settings), now=now)
        manifest = report.manifest
        if manifest is None:  # pragma: no cover - the same file, read again
            raise ManifestError(report.issues)
    if not report.ok:
        if not _resumes_past_deadline(engine, report, simulated):
            raise ManifestError(report.issues)
        report.issues = [_deadline_note(i) if i.code in _SCHEDULE_OVER else i for i in report.issues]
    assert manifest is not None
    manifest_path = str(Path(path).resolve())
    here = machine.this_machine()
    with db.session_scope(engine) as session:
        refuse_rerun_name(session, manifest.name)  # before a simulation holding it is renamed
        name, moved = store.name_for_batch(session, manifest.name, simulated=simulated)
        check_output_names(settings, name)  # raised inside the transaction: nothing is stored
        batch, created = store.get_or_create_batch(
            session,
            name=name,
            manifest_path=manifest_path,
            manifest_sha256=manifest.sha256,
            budget_max_usd=manifest.budget_max_usd,
            schedule=manifest.schedule,
            priority=manifest.priority,
            reuse_outputs=manifest.reuse_outputs,
            manifest_text=manifest.text,
            simulated=simulated,
            manifest_host=here,
        )
        if not created:  # raised inside the transaction: nothing is stored
            refuse_rerun(session, batch)
            refuse_cancelled(session, batch, manifest=True)
        if on_batch is not None:
            on_batch(batch.id)
        if refuse is not None:  # a new batch too: what it claims is claimed with the batch
            refuse(session, batch)
        manifest_moved = None
        in_manifest = 0  # of the batch's jobs, those its manifest as last submitted has
        stored_at, stored_host = batch.manifest_path, None if created else batch.manifest_host
        # Its manifest is known to be on another machine: its file cannot be checked from here.
        other_host = stored_host if machine.elsewhere(stored_host) else None
        if take_over and other_host is not None:  # raised inside the transaction
            refuse_live_elsewhere(session, batch, now=now, silent_for=take_over_silence(settings))
        if not created and (stored_at != manifest_path or other_host is not None):
            in_manifest = store.manifest_job_count(session, batch.id)
            # Submitted from another place (its folder moved, or another machine's, the same path
            # there or not): the manifest submitted now says where its files are; resubmit_jobs
            # gives the stored jobs their new paths.
            manifest_moved = {"from": stored_at, "to": manifest_path}
            if stored_at != manifest_path:
                store.set_batch_manifest_path(session, batch.id, manifest_path)
        if not created and stored_host != here:  # another machine's, or not recorded yet
            store.set_batch_manifest_host(session, batch.id, here)
        cap_before = batch.budget_max_usd
        budget_changed = None if created else _apply_budget(session, batch, manifest.budget_max_usd)
        if not created and (batch.manifest_text, batch.manifest_sha256) != (manifest.text, manifest.sha256):
            # Provenance: the batch keeps the manifest it was last submitted from.
            store.set_batch_manifest(session, batch.id, manifest.text, manifest.sha256)
        if not created and batch.reuse_outputs != manifest.reuse_outputs:
            # Like the budget: the manifest's current value governs jobs claimed from now on.
            store.set_batch_reuse_outputs(session, batch.id, manifest.reuse_outputs)
        schedule_changed = (
            None if created else _apply_schedule(session, batch, manifest.schedule, manifest.priority)
        )
        # The storing pass reads the items_from file again: refused, inside this transaction, unless
        # it finds the very bytes validated (Manifest.refuse_changed_items): nothing is stored.
        new_jobs = _new_jobs(manifest.jobs(), settings)
        stored = None
        followed: list[str] = []
        try:
            if created:
                added, existing = store.add_jobs(session, batch.id, new_jobs)
            else:
                # Jobs already stored take the places the manifest gives them now (see resubmit_jobs).
                stored = store.resubmit_jobs(session, batch.id, new_jobs, lambda: _item_count(manifest))
                added, existing = stored.added, stored.present
        except _ROW_FAILURES:
            # What failed may be a row changed since validation (never checked): the change is said.
            manifest.refuse_changed_items()
            raise
        if stored is not None:
            if manifest_moved is not None and not take_over:  # raised inside the transaction
                refuse_name_taken(
                    batch.name, stored_at, str(path), stored, in_manifest, other_host=other_host
                )
            # Its reruns' jobs follow its own, now where the manifest names their files.
            followed = store.reruns_follow(session, batch.id, manifest_path)
        inputs_revived = 0
        if stored is not None:  # after resubmit_jobs: its files, where the manifest now puts them
            inputs_revived = store.revive_input_failed(session, batch.id)
        revived = 0
        if budget_changed is not None and cap_raised(cap_before, manifest.budget_max_usd):
            # After resubmit_jobs: a job the manifest no longer has is marked, and stays ended.
            revived = store.revive_budget_cancelled(session, batch.id)
        # The jobs stored before and not sent yet (those just revived included): priced with the
        # prices in force now, as `estimate` prices them, so the cap reserves what they will cost.
        repriced = None if created else store.reprice_unsent(session, batch.id, settings)
        if refuse_paused_batch:
            refuse_paused(session, batch)  # raised inside the transaction: nothing is stored
        if batch.state == BatchState.PAUSED:
            # Paused because fal refused the account or the outputs could not be written;
            # submitting again is the user saying "go on".
            store.resume_batch(session, batch.id)
        # The day's cap holds for batches sent to fal (never a simulation's).
        cap = None if simulated else settings.daily_budget_usd
        budget_warnings = _daily_warnings(session, batch.id, manifest, added + existing, cap, now)
        warnings = [str(i) for i in [*report.issues, *budget_warnings] if i.severity != "error"]
        if stored is not None and stored.changed_files:
            folder = Path(manifest_path).parent
            warnings.extend(
                _changed_file_note(batch.name, changed, folder) for changed in stored.changed_files
            )
        if stored is not None and (edited := _edited_away(stored)).not_in_manifest:
            warnings.append(_not_in_manifest_note(batch.name, edited, _item_count(manifest)))
        if stored is not None and stored.defaults_matched:
            warnings.append(_defaults_matched_note(batch.name, stored.defaults_matched))
        if inputs_revived:
            warnings.append(
                f"{inputs_revived} job(s) of batch {batch.name} that failed before being sent because an "
                "input file could not be sent (input_file) are pending again: their files are there now"
            )
        if stored is not None and stored.restored:
            warnings.append(
                f"{stored.restored} job(s) of batch {batch.name} dropped from its manifest before are in it "
                "again: they are sent as new jobs are"
            )
        result = _submitted(
            session, batch, created, added, existing, warnings, budget_changed, schedule_changed
        )
        result.budget_revived = revived
        result.inputs_revived = inputs_revived
        result.budget_warnings = [i.message for i in budget_warnings]
        if moved:
            result.moved_aside, result.reruns_moved = moved[0][1], moved[1:]
        if stored is not None:
            result.changed_files = [
                _changed_file_json(changed, Path(manifest_path).parent) for changed in stored.changed_files
            ]
            result.renumbered, result.not_in_manifest = stored.renumbered, stored.not_in_manifest
            result.dropped, result.restored = stored.dropped, stored.restored
            result.ended_unsent = stored.ended_unsent
            result.defaults_matched = stored.defaults_matched
        if repriced is not None and repriced.changed:
            _ESTIMATES.pop(batch.id, None)
            after = store.batch_estimated_usd(session, batch.id)
            before = after - repriced.after_usd + repriced.before_usd
            result.estimate_changed = {"from": _money(before), "to": _money(after), "jobs": repriced.jobs}
        result.manifest_moved, result.manifest_given = manifest_moved, str(path)
        if other_host is not None:
            result.manifest_host_moved = {"from": machine.name(other_host), "to": machine.name(here)}
        result.reruns_followed = followed
        result.database_note = home.note if home is not None else None
    if manifest_moved is not None or followed:
        _follow_outputs(engine, settings, result)
    return result


def _daily_warnings(
    session: Session, batch_id: str, manifest: Manifest, asked: int, cap: Decimal | None, now: datetime
) -> list[Issue]:
    """``submit``'s warning that what the batch will still send exceeds ``WANBATCH_DAILY_BUDGET_USD``,
    or what is left of it today (:func:`jobs.estimates.daily_budget_issues`, the words
    ``validate`` and ``estimate`` say it in): one issue, or none; none when ``cap`` is None (no
    daily cap, or a simulation, which the cap leaves out).

    Weighed are the batch's jobs not sent yet, as stored (priced with the prices in force:
    :func:`jobs.store.reprice_unsent` ran first), against today's committed money, which holds
    its jobs sent today already: the whole manifest counted those twice, and a batch submitted,
    run or resumed again after it had sent (or finished) its jobs was told that "only about 1 of
    4 job(s) will run today" when none was left to send. ``asked``: the manifest's jobs; when
    fewer are left to send, the warning says it weighs those not sent yet."""
    if cap is None:
        return []
    jobs, usd = store.unsent_estimate(session, batch_id)
    if not jobs:
        return []  # nothing left to send: nothing the cap could cancel
    today = store.committed_usd_today_by_batch(session, now)
    return daily_budget_issues(manifest, Totals(jobs=jobs, usd=usd), cap, today, unsent=jobs < asked)


def _follow_outputs(engine: Engine, settings: Settings, result: SubmitResult) -> None:
    """The batch moved (``manifest_moved``, or its reruns caught up): its stored videos, and
    its reruns', are looked for under the current output folder when they were stored outside
    it, and recorded there when they hold the recorded bytes (:mod:`jobs.moved_outputs`: one
    ``lstat`` each, hashed only at the recorded size), after the submit's transaction, so no
    lock is held while videos are read. ``outputs_followed`` counts them; a warning names those
    found nowhere."""
    from jobs import moved_outputs

    root = moved_outputs.local_root(settings.output_dir, settings.output_url)
    if root is None:
        return
    with db.read_scope(engine) as session:
        family = store.batch_and_reruns(session, result.batch_id)
    finder = moved_outputs.follow_outputs(engine, family, root)
    result.outputs_followed = len(finder.moves)
    if finder.missing:
        result.warnings.append(
            f"{finder.missing} stored video(s) of batch {result.name} or its reruns are neither where "
            f"they were stored nor under WANBATCH_OUTPUT_DIR ({shown_path(root)}): an export fails "
            "until they are back (copy the old outputs folder into it and submit again)"
        )


def _item_count(manifest: Manifest) -> int:
    """The items the manifest's jobs were just read from (known once they all were)."""
    assert manifest.item_count is not None, "the manifest's jobs were not all read"
    return manifest.item_count


def _defaults_matched_note(name: str, matched: int) -> str:
    """The warning of a resubmit whose jobs differ from jobs the batch already sent only by an
    endpoint default written out (or left out) since: those jobs stand for them, nothing is sent
    again (:func:`jobs.store.creating._match_written_defaults`)."""
    return (
        f"{matched} job(s) of the manifest ask what jobs batch {name} already sent ask once the "
        "endpoint's documented defaults are filled in (a default written out or left out since): "
        "those jobs stay theirs, with their input as sent; nothing is sent again "
        f"(`wanbatch rerun {name}` renders anew)"
    )


def _edited_away(stored: store.Resubmitted) -> store.Resubmitted:
    """``stored`` without the jobs left out only because a file of theirs changed (its
    ``changed_files``, each said by :func:`_changed_file_note`): the jobs left out because the
    manifest was edited (or cut), for :func:`_not_in_manifest_note`."""
    replaced = stored.replaced  # each job once: a job of two changed files is under both
    return replace(
        stored,
        not_in_manifest=stored.not_in_manifest - sum(replaced.values()),
        dropped=stored.dropped - replaced.get("dropped", 0),
        ended_unsent=stored.ended_unsent - replaced.get("ended_unsent", 0),
        changed_files=(),
        replaced={},
    )


def _sha_prefix(digest: str) -> str:
    """A SHA-256 as a line names it: its first 12 hex digits (as ``rerun`` names a changed file's)."""
    return f"{digest[:12]}…"


def _changed_file_note(name: str, changed: store.ChangedFile, folder: Path) -> str:
    """The warning of a resubmit that found a file of the manifest rewritten since jobs of the
    batch were stored for it: the manifest has a job for the new bytes in place of each of those
    (their keys stood for the old bytes). It said "N job(s) of batch … are no longer in its
    manifest", and the user looked for an edit of the manifest that nobody made."""
    then = ", ".join(_sha_prefix(d) for d in changed.old_sha256)
    parts = []
    if changed.dropped:
        parts.append(
            f"its {changed.dropped} job(s) never sent are replaced by job(s) for the new image "
            "(dropped, cancelled)"
        )
    if changed.ended_unsent:
        parts.append(f"its {changed.ended_unsent} job(s) that ended without being sent stay as they are")
    if changed.kept:
        parts.append(
            f"its {changed.kept} job(s) already sent stay in the batch (they may have been paid for), "
            "and job(s) for the new image are added"
        )
    return (
        f"{shown_in_folder(changed.path, folder)} changed since batch {name} was submitted (SHA-256 "
        f"{then} → {_sha_prefix(changed.new_sha256)}): {'; '.join(parts)}"
    )


def _changed_file_json(changed: store.ChangedFile, folder: Path) -> dict[str, Any]:
    """One of ``submit --json``'s ``changed_files``: the file as the manifest names it, its
    SHA-256 then (a list: several when it changed more than once) and now, its jobs by kind."""
    return {
        "source": shown_in_folder(changed.path, folder),
        "old_sha256": list(changed.old_sha256),
        "new_sha256": changed.new_sha256,
        "jobs": changed.jobs,
        "dropped": changed.dropped,
        "ended_unsent": changed.ended_unsent,
        "kept": changed.kept,
    }


def _not_in_manifest_note(name: str, stored: store.Resubmitted, items: int) -> str:
    """The warning of a resubmit that left jobs of the batch out: those never sent are dropped
    (cancelled: nothing of them reached fal), those that ended without being sent stay as they
    are (nothing of them was paid for), the others stay (they may have been paid for); all are
    numbered apart, after the manifest's items."""
    parts = []
    if stored.dropped:
        parts.append(f"{stored.dropped} never sent are dropped (cancelled)")
    if stored.ended_unsent:
        parts.append(f"{stored.ended_unsent} ended without being sent stay as they are")
    if stored.kept:
        parts.append(f"{stored.kept} already sent stay in the batch (they may have been paid for)")
    return (
        f"{stored.not_in_manifest} job(s) of batch {name} are no longer in its manifest: {'; '.join(parts)}; "
        f"numbered after its {items} item(s) (item_index {items} and up in exports and diffs)"
    )


def _money(value: Decimal | None) -> float | None:
    """JSON money: the one type and rounding every ``--json`` object uses (:mod:`jobs.money`)."""
    return usd_json(value)


class FailureReason(TypedDict):
    """One of a batch's commonest reasons for jobs ending failed or cancelled."""

    state: str
    error_type: str | None
    count: int
    #: One job's error (the first by its text), exactly as stored.
    example: str
    #: Whether these jobs were sent to fal (a request of each went out) or never were: one
    #: ``error_type`` may cover both (``deadline``: cancelled in fal's queue, or not sent before
    #: it), and they are counted apart.
    sent: bool
    #: What ``status`` shows: ``example``, or, when the jobs' errors differ (``distinct_errors``
    #: > 1), a line naming them (every file of "media files 'a.png' and 'b.png' changed since
    #: …"; :mod:`jobs.failure_summary`): one example hid the others.
    summary: str
    #: How many different errors these jobs have.
    distinct_errors: int
    #: The way on for these jobs, where one is known (:func:`jobs.failure_summary.next_step`:
    #: fal discarded their results, their input files were missing), else None.
    next_step: str | None


def told_apart_by_sending(groups: Iterable[tuple[str, str | None, bool]]) -> set[tuple[str, str | None]]:
    """Of failure groups ``(state, error_type, sent)``, the ``(state, error_type)`` pairs that
    come as two, for jobs sent to fal and jobs never sent: each of those says which it is where
    it is shown (``status``, the dashboard), as the same words ("cancelled by user") may head
    both; a pair that is all one or the other needs no such word."""
    seen: dict[tuple[str, str | None], set[bool]] = {}
    for state, error_type, sent in groups:
        seen.setdefault((state, error_type), set()).add(sent)
    return {pair for pair, kinds in seen.items() if len(kinds) > 1}


class BatchReport(TypedDict):
    """The contract's ``status BATCH --json`` object: these keys, in this order, are the output.

    USD figures are floats rounded to the micro-dollar (None when there is nothing to sum);
    ``counts`` has every job state, 0 when none.
    """

    batch: str
    name: str
    state: str
    pause_reason: str | None
    #: ``wanbatch pause``: no new submits until ``resume`` (independent of ``state``).
    paused_by_user: bool
    #: In words: "paused by user", "waiting for window (opens …)", "past deadline: N cancelled",
    #: … (see :func:`schedule_state`); "" when nothing holds the batch back.
    schedule_state: str
    #: For a batch its user paused (``schedule_state`` "paused by user"): what ``schedule_state``
    #: would say without the pause, the schedule's own words ("waiting for window (opens 22:00
    #: Europe/Berlin, in 23h57m)", "open until …"): resuming sends nothing before it opens.
    #: "" otherwise, and without a schedule (:func:`paused_schedule_state`).
    paused_schedule_state: str
    #: What a person reads as the batch's state (:func:`batch_phase`, the ``state`` column of
    #: ``status``): ``active``, ``done``, ``paused``, ``waiting``, ``deadline`` or ``cancelled``.
    phase: str
    #: Why the batch is held back (``paused``, ``waiting``, ``deadline``; or, ``active``, a cap
    #: that holds its unsent jobs back: :func:`cap_holds`), else None.
    phase_reason: str | None
    #: ``Schedule.as_json()`` (``not_before``, ``deadline``, ``window``, ``timezone``), or None.
    schedule: dict[str, Any] | None
    priority: str
    #: ``priority: low`` requests waiting in fal's queue unusually long, and a line saying so.
    low_priority_waiting: int
    low_priority_note: str
    total: int
    finished: int
    #: Jobs being worked on: sent to fal (or being sent, cancelled, checked) or downloading.
    in_flight: int
    #: Seconds left at the pace of the last 10 minutes (:func:`jobs.listing.pace`, as the
    #: dashboard); None when there is no pace (nothing finished lately) or when nothing is
    #: working on the batch (paused, held by its schedule, cancelled, no job in flight, no
    #: process processing it); 0 when done.
    eta_seconds: float | None
    #: When the forecast ends after the window closes or the deadline passes: what happens then.
    eta_note: str | None
    #: Whether a wanbatch process (an embedded ``run``, or the distributed workers) has said
    #: within :data:`jobs.listing.PROCESSING_STALE_SECONDS` that it works on the batch.
    processing: bool
    #: When one last said so (ISO 8601, UTC); None when none ever did or it stopped cleanly.
    processed_at: str | None
    #: Since when the workers' leader cannot reach the broker (ISO 8601, UTC): submits and
    #: downloads wait for it, and there is no ETA; None when it can (or no worker is alive).
    broker_unreachable_since: str | None
    #: The processes that cannot connect to fal and hold their submits of this batch (an
    #: embedded ``run`` of it, or distributed workers): each one's ``owner``, ``host``, ``pid``,
    #: ``since``, ``next_probe_at`` (ISO 8601, UTC), ``pause_seconds`` and ``error``, the
    #: longest-standing first (:func:`jobs.listing.fal_holds`); empty when none (or done).
    fal_unreachable: list[dict[str, Any]]
    #: That in one line (:func:`jobs.listing.fal_hold_text`); "" when none.
    fal_unreachable_note: str
    #: The processes holding leases on its unfinished jobs that are gone — ended (a pid of
    #: this host that no longer runs), with a stale heartbeat, or a worker whose record on the
    #: workers' Redis went stale: each one's ``owner``, ``host``, ``pid``, ``jobs``,
    #: ``lease_until`` (when they are taken over), ``last_seen`` (ISO 8601, UTC; None when it
    #: never beat), ``ended`` and ``worker_record_stale`` (:func:`jobs.listing.dead_holders`).
    dead_lease_holders: list[dict[str, Any]]
    #: That in one line (:func:`jobs.listing.dead_holders_text`); "" when none.
    dead_lease_holders_note: str
    #: While nothing processes the batch but distributed workers beat in this database: their
    #: tick leader has stopped beating (frozen while it holds the lead), named, with how long
    #: (:func:`jobs.listing.stalled_leader_text`); "" otherwise.
    tick_leader_note: str
    #: Jobs in ``submit_unknown`` that wait for fal's webhook to prove whether it accepted their
    #: submit (:func:`jobs.listing.proof_waits`; 0 when none), when the last wait ends (ISO 8601,
    #: UTC; None when none: ``WANBATCH_SUBMIT_UNKNOWN_POLICY`` then applies), and that in one
    #: line (:func:`jobs.listing.proof_wait_text`, with the policy; "" when none). ``eta_seconds``
    #: never ends before that wait.
    proof_waiting: int
    proof_wait_until: str | None
    proof_wait_note: str
    #: Its unfinished jobs whose request this process cannot ask fal about, so they wait for
    #: another: each group's ``reason`` (``"api_key"``: sent with another API key, named by its
    #: ``key_id``, a hash, never the key; ``"fal_queue"``: sent to another fal queue, named by its
    #: ``origin``) and ``jobs`` (:func:`jobs.listing.elsewhere_waits`); empty when none, or when
    #: the report was asked without knowing this process's key and queue. That in one line
    #: (:func:`jobs.listing.elsewhere_wait_text`; "" when none).
    elsewhere_waiting: list[dict[str, Any]]
    elsewhere_waiting_note: str
    counts: dict[str, int]
    estimated_usd: float | None
    spent_usd: float | None
    reserved_usd: float | None
    budget_max_usd: float | None
    #: The part of ``spent_usd`` that submits whose outcome stayed unknown may have cost (fal
    #: may have accepted and billed them): counted against the budget, shown apart.
    possibly_billed_usd: float | None
    possible_duplicate_charges: int
    confirmed_duplicate_charges: int
    #: Jobs whose video did not match the request (``media_mismatch``; see worker.probe).
    media_mismatches: int
    #: Submits fal refused with HTTP 429 (rate limited), given back without spending an attempt.
    rate_limited_submits: int
    actual_usd: float | None
    wasted_usd: float | None
    cancelled_for_budget: int
    #: Of those, the jobs the daily cap (``WANBATCH_DAILY_BUDGET_USD``) cancelled.
    cancelled_for_daily_budget: int
    #: Jobs the batch's schedule cancelled (reason ``deadline``: its deadline passed, or no
    #: window opened before it): ``status`` advises ``rerun --failed-only`` (``--now``) for them.
    cancelled_for_deadline: int
    #: Of ``cancelled_for_deadline``, the jobs sent to fal (``submitted_at``, as ``failures``
    #: tells them apart): a request of theirs went to fal and ended unfinished — timed out or
    #: cancelled in fal's queue at the deadline, or ended earlier and not sent again — where the
    #: others were never sent.
    cancelled_for_deadline_sent: int
    failures: list[FailureReason]
    parent_batch: str | None
    created_at: str
    #: Made by ``--simulate``: its requests go to the bundled simulator, never to fal.
    simulated: bool
    #: Where its manifest was last submitted from: the absolute path, and the machine's host
    #: name (:mod:`jobs.machine`; None for a batch stored before it was recorded).
    manifest_path: str
    manifest_host: str | None
    #: When that machine is not this one, a line naming it and the path, so nobody pauses or
    #: cancels another person's batch on a shared database unawares
    #: (:func:`manifest_elsewhere_text`); "" otherwise.
    manifest_elsewhere_note: str
    #: Its failed or cancelled jobs a rerun of it has rendered since (:mod:`jobs.rendered`):
    #: ``rerun --failed-only`` leaves them out, and ``status`` names the rerun instead of
    #: advising one.
    rerun_rendered: RerunRendered
    #: Its failed or cancelled jobs an unfinished rerun of it is rendering (not rendered since):
    #: ``rerun --failed-only`` leaves them out too, and ``status`` says which command goes on
    #: with that rerun instead of advising another.
    rerun_pending: RerunPending
    #: Its jobs the manifest it was last submitted from no longer has (``Job.not_in_manifest``:
    #: an item removed, or corrected): ``jobs`` in all, ``ended`` of them finished, of those how
    #: many ``succeeded``, ``failed`` and ``cancelled`` (the jobs dropped, never sent, among
    #: them). Counted in ``counts``; ``failures``, the ``cancelled_for_*`` advice, the exit code
    #: of ``run`` and ``rerun --failed-only`` judge the other jobs: the manifest's.
    not_in_manifest: dict[str, int]
    #: That in one line ("2 ended job(s) are no longer in the manifest …"); "" when none ended.
    not_in_manifest_note: str
    #: Its jobs adopted from the outputs folder instead of being sent: their own sidecar and
    #: verified video were there while the database had them unsent (a restored backup, another
    #: copy of the database: ``worker.steps.adopt``); and that in one line ("" when none).
    adopted_from_outputs: int
    adopted_note: str
    #: Of a cancelled batch, its jobs still ``queued`` or ``running`` at fal on a request whose
    #: cancel a process gave up (:mod:`worker.steps.cancel_tries`; recorded on the job's history,
    #: :func:`jobs.store.note_cancel_given_up`): fal may still run and bill them. Each ``job``,
    #: ``request_id``, fal's last answer (``error``), ``tries`` and ``given_up_at``; and that
    #: in one line (:func:`uncancelled_text`, "" when none).
    uncancelled: list[dict[str, Any]]
    uncancelled_note: str
    #: Of ``status BATCH`` and the end of ``run``/``rerun`` only (a ``stat`` per video: not for
    #: every batch of ``status``, nor for each progress line): the succeeded jobs' local videos
    #: looked at, and how many are missing or of another size than stored, with some of their
    #: job ids (:meth:`jobs.outputs_on_disk.OutputsOnDisk.as_dict`); and that in one line with
    #: the command that fetches them again (None when all are there).
    outputs_on_disk: NotRequired[dict[str, Any]]
    outputs_on_disk_note: NotRequired[str | None]


class BatchProgress(TypedDict):
    """What a progress display shows of a batch (see :func:`batch_progress`)."""

    batch: str
    name: str
    state: str
    pause_reason: str | None
    total: int
    finished: int
    counts: dict[str, int]
    estimated_usd: float | None
    spent_usd: float | None
    paused_by_user: bool
    #: Whether the schedule lets the batch send now (always, without one), and in words.
    schedule_open: bool
    schedule_state: str
    #: :func:`paused_schedule_state`, as ``status --json`` gives it.
    paused_schedule_state: str
    #: Why no new job is sent now (:func:`jobs.listing.held_reason`: paused, cancelled, outside
    #: its schedule); "" when jobs may be sent. No time left is forecast while it is set.
    held: str
    #: Why the batch does not move now (:func:`batch_standing`, as ``status`` decides it): what
    #: ``held`` says, else that nothing processes it or that the workers cannot reach the
    #: broker; "" when it moves. No time left is forecast while it is set.
    standing: str
    #: Whether a process works on the batch now (``status --json``'s ``processing``).
    processing: bool
    #: The batch's schedule (the empty one without).
    schedule: Schedule
    #: :func:`batch_report`'s ``eta_seconds`` and ``eta_note``, by the same pace and rules
    #: (:func:`jobs.listing.forecast`): what ``status`` would say now.
    eta_seconds: float | None
    eta_note: str | None
    #: :func:`batch_report`'s ``proof_wait_note``: jobs waiting for fal's webhook proof of their
    #: submit, until when, and what then ("" when none).
    proof_wait_note: str
    #: :func:`batch_report`'s ``elsewhere_waiting_note``: requests sent with another API key or
    #: to another fal queue, waiting for a process that has them ("" when none).
    elsewhere_waiting_note: str


#: ``WANBATCH_SUBMIT_UNKNOWN_POLICY``'s default, for a report asked without the settings.
DEFAULT_UNKNOWN_POLICY = RetrySettings.model_fields["submit_unknown_policy"].default

#: :func:`batch_standing` of a batch the workers process while their leader cannot reach the broker.
BROKER_UNREACHABLE = "broker unreachable"


def batch_standing(
    batch: Batch,
    totals: listing.Totals,
    last_beat: listing.LastBeat | None,
    broker_down: datetime | None,
    *,
    now: datetime,
) -> str:
    """Why ``batch`` does not move now, in words ("" when it does): the one rule ``status``
    (:func:`batch_report`) and ``run``'s progress line (:func:`batch_progress`) forecast by —
    what holds it back or that nothing processes it (:func:`jobs.listing.standing`), else that
    the workers cannot reach the broker (``broker_down``: since when, None when they can).
    The progress line once asked only what holds it back, and kept a growing "time left" while
    no worker was alive, where ``status`` said "nothing is processing it" and gave none."""
    return listing.standing(batch, totals, last_beat, now=now) or (BROKER_UNREACHABLE if broker_down else "")


@dataclass(frozen=True, slots=True)
class Forecast:
    """A batch's forecast as ``status`` gives it (:func:`batch_forecast`)."""

    #: :func:`batch_standing`: why it does not move now ("" when it does).
    standing: str
    #: :func:`jobs.listing.forecast`: the time left, and what the schedule cuts short of it.
    eta_seconds: float | None
    eta_note: str | None
    #: When a process last said it works on the batch, and one not known to have ended
    #: (:func:`jobs.listing.heartbeat`).
    last_beat: listing.LastBeat | None
    #: Its jobs waiting for fal's webhook proof of their submit (:func:`jobs.listing.proof_waits`),
    #: which ``eta_seconds`` never ends before; None when none.
    proof: listing.ProofWait | None = None

    def proof_note(self, policy: str, *, now: datetime) -> str:
        """:func:`jobs.listing.proof_wait_text` of :attr:`proof` (``policy``:
        ``WANBATCH_SUBMIT_UNKNOWN_POLICY``; ``now``: the one the forecast was made at): the words
        ``status``, ``run`` and the dashboard share."""
        return listing.proof_wait_text(self.proof, policy=policy, now=now)


def batch_forecast(session: Session, batch: Batch, totals: listing.Totals, *, now: datetime) -> Forecast:
    """The forecast of one batch by ``status``'s rules: :func:`batch_standing` (what holds it
    back, that nothing processes it, or that the workers cannot reach the broker — asked only of
    an unfinished batch they would process, not of a simulation) and :func:`jobs.listing.forecast`.
    ``run``'s progress line (:func:`batch_progress`) and the dashboard's batch page go by it; the
    page once asked only what holds the batch back, and kept a time left while the workers could
    not reach the broker, where ``status`` gave none."""
    return batch_forecasts(session, [(batch, totals)], now=now)[batch.id]


def batch_forecasts(
    session: Session, shown: Iterable[tuple[Batch, listing.Totals]], *, now: datetime
) -> dict[str, Forecast]:
    """:func:`batch_forecast` of each ``(batch, totals)`` (by batch id), with one query for their
    heartbeats and at most one for the broker: the dashboard's batch list. The list once asked
    only what holds each batch back or that nothing processes it, and showed a time left while
    the workers could not reach the broker, where ``status`` and the batch's page gave none."""
    rows = list(shown)
    beats = listing.heartbeats(session, [batch.id for batch, _totals in rows], now=now)
    # Asked once, and only when some unfinished batch the workers would process is shown.
    broker: list[datetime | None] = []

    def broker_down(batch: Batch, totals: listing.Totals) -> datetime | None:
        if (totals.total > 0 and totals.finished == totals.total) or batch.simulated:
            return None
        if not broker:
            broker.append(listing.broker_down_since(session, now=now))
        return broker[0]

    # Asked only of batches with a job in ``submit_unknown`` (most have none): one query.
    unknown = [batch.id for batch, totals in rows if totals.counts.get(JobState.SUBMIT_UNKNOWN.value)]
    proofs = listing.proof_waits(session, unknown, now=now)
    found = {}
    for batch, totals in rows:
        beat = beats.get(batch.id)
        standing = batch_standing(batch, totals, beat, broker_down(batch, totals), now=now)
        proof = proofs.get(batch.id)
        schedule = store.batch_schedule(batch)
        eta, eta_note = listing.forecast(totals, held=standing, schedule=schedule, now=now, proof=proof)
        found[batch.id] = Forecast(standing, eta, eta_note, beat, proof)
    return found


def batch_progress(
    session: Session,
    batch_id: str,
    *,
    now: datetime | None = None,
    policy: str = DEFAULT_UNKNOWN_POLICY,
    here: listing.Here | None = None,
    shown: bool = True,
) -> BatchProgress:
    """The part of :func:`batch_report` a progress display needs — state, counts, money, the
    forecast — without the cost report and failure reasons, which cost several aggregates each
    time. ``now``: for the schedule and the pace; ``policy``: ``WANBATCH_SUBMIT_UNKNOWN_POLICY``,
    for what ``proof_wait_note`` says comes after a wait for proof; ``here``: the key and fal
    queue of the process that shows it, for ``elsewhere_waiting_note`` (none without).

    ``shown=False``: for a ``run`` that shows nothing (``--no-progress``), which reads it only
    to know when it ends: no forecast and no notes (``standing``, ``eta_*``, ``proof_wait_note``
    and ``elsewhere_waiting_note`` blank, ``processing`` True), the pace over the last finishes
    being most of the read's cost."""
    batch = store.get_batch(session, batch_id)
    schedule, now = store.batch_schedule(batch), now or utcnow()
    counts = store.counts_by_state(session, batch.id)
    total = sum(counts.values())
    finished = sum(counts[s.value] for s in JobState if s.terminal)
    held = listing.held_reason(batch, now=now)
    done = total > 0 and finished == total
    standing, processing, eta, eta_note, proof_note, elsewhere = "", True, None, None, "", ""
    if shown:
        # What status's pace goes by, without its pass over every job of the batch for the money.
        totals = listing.Totals(
            counts=counts,
            # One read of the window's finishes (``ix_jobs_finished_at``): none there, no pace.
            stretch=listing.work_stretches(session, [batch.id], now=now).get(batch.id),
            first_submitted_at=_first_submitted_at(session, batch.id, now),
        )
        # status's rule, not only what holds the batch back: no forecast either while nothing
        # processes it (no worker alive, a stopped run) or while the workers cannot reach the broker.
        forecast = batch_forecast(session, batch, totals, now=now)
        standing, processing = forecast.standing, listing.is_processing(forecast.last_beat, now=now)
        eta, eta_note = forecast.eta_seconds, forecast.eta_note
        proof_note = forecast.proof_note(policy, now=now)
        elsewhere = elsewhere_note(session, batch, counts, here)
    shown_schedule = schedule_state(session, batch, finished=done, now=now)
    return {
        "batch": batch.id,
        "name": batch.name,
        "state": BatchState(batch.state).value,
        "pause_reason": batch.pause_reason,
        "total": total,
        "finished": finished,
        "counts": counts,
        "estimated_usd": _money(_estimated_usd(session, batch, total, counts)),
        "spent_usd": _money(store.batch_spent_usd(session, batch.id)),
        "paused_by_user": batch.paused_by_user,
        "schedule_open": schedule.is_open(now) and not batch.paused_by_user,
        "schedule_state": shown_schedule,
        "paused_schedule_state": paused_schedule_state(shown_schedule, schedule, now),
        "held": held,
        "standing": standing,
        "processing": processing,
        "schedule": schedule,
        "eta_seconds": eta,
        "eta_note": eta_note,
        "proof_wait_note": proof_note,
        "elsewhere_waiting_note": elsewhere,
    }


def elsewhere_note(
    session: Session, batch: Batch, counts: Mapping[str, int], here: listing.Here | None
) -> str:
    """:func:`jobs.listing.elsewhere_wait_text` of one batch (``counts``: its jobs by state;
    ``here``: the shown process's key and queue, "" without): its query is asked only when the
    batch has a job in a state that waits for what fal says of its request (most have none at
    the end), and never of a simulation (its requests are its run's simulator's). ``run``'s
    progress line and the dashboard's batch page say it in ``status``'s words."""
    if here is None or batch.simulated or not any(counts.get(state) for state in listing.FOLLOWED_STATES):
        return ""
    return listing.elsewhere_wait_text(listing.elsewhere_waits(session, [batch.id], here).get(batch.id, []))


def held_note(
    session: Session,
    batch: Batch,
    counts: Mapping[str, int],
    phase: str,
    caps: CapCheck,
    *,
    beat: listing.LastBeat | None = None,
    now: datetime | None = None,
) -> str:
    """What holds an ``active`` batch's unsent (``pending``) jobs back, counted as ``caps`` counts
    (:func:`cap_holds`, :func:`cap_note`): ``status``'s ``phase_reason`` for it, for the
    dashboard's batch page; "" when nothing does, or the batch is not active or has none pending,
    or (``beat``: :attr:`Forecast.last_beat`) the run that worked on it was killed
    (:func:`jobs.listing.ended_run`), as ``status`` says."""
    if phase != "active" or not counts.get(JobState.PENDING.value, 0):
        return ""
    if listing.ended_run(beat, now=now or utcnow()):
        return ""
    return cap_note(cap_holds(session, batch.id, caps.scope(batch), caps), batch.id)


def left_to_collect(progress: BatchProgress) -> int:
    """Jobs a run whose batch sends nothing more (paused) still waits for before it ends: the
    requests fal holds, and the videos of completed requests still being downloaded. Both are
    paid for, and a download is made only while something runs the batch: ``wanbatch pause``
    promises that they finish and are downloaded, and ``resume`` would also send new jobs.

    A batch paused by fal's refusal of the key or by outputs that cannot be stored is the
    exception for its downloads: they wait on that fix (a refused result, a full disk), tried
    again for as long as it takes, and would hold the run for ever; the next run, which ends
    that pause, fetches them (README: "`run` ends once nothing is left at fal").
    """
    counts = progress["counts"]
    states = AT_PROVIDER_STATES if progress["state"] == BatchState.PAUSED.value else listing.BUSY_STATES
    return sum(counts.get(s.value, 0) for s in states)


#: Batch id → (what says whether its estimate can have changed, the sum of its estimates) as
#: last read by this process.
_ESTIMATES: dict[str, tuple[tuple[int, int, int, str], Decimal]] = {}


def _estimated_usd(session: Session, batch: Batch, jobs: int, counts: Mapping[str, int]) -> Decimal:
    """The sum of the batch's estimates, read again only when it can have changed.

    ``run`` shows it every second, and summing a 100,000-job batch each time was most of the
    progress line's CPU. A job's estimate changes only while it waits to be sent: a resubmit of
    its manifest drops (cancels) a job never sent that it no longer has, or brings one back
    (:func:`jobs.store.estimated_usd`), and a job not sent yet is priced again when the prices in
    force differ from those it was stored with (:func:`jobs.store.reprice_unsent`): by a
    resubmit (which forgets the sum it changed), or by a dispatch round, which moves a job it
    claimed out of ``pending`` in the same transaction. So the number of jobs, of cancelled and
    of pending jobs and the manifest's SHA-256 say whether the sum can have changed."""
    key = (
        jobs,
        counts.get(JobState.CANCELLED.value, 0),
        counts.get(JobState.PENDING.value, 0),
        batch.manifest_sha256,
    )
    known = _ESTIMATES.get(batch.id)
    if known is not None and known[0] == key:
        return known[1]
    if len(_ESTIMATES) > 256:
        _ESTIMATES.clear()
    estimated = store.batch_estimated_usd(session, batch.id)
    _ESTIMATES[batch.id] = (key, estimated)
    return estimated


#: Batch id → its first submit, once that is older than :data:`jobs.listing.THROUGHPUT_WINDOW`.
_FIRST_SENT: dict[str, datetime] = {}


def _first_submitted_at(session: Session, batch_id: str, now: datetime) -> datetime | None:
    """:func:`jobs.store.first_submitted_at`, read again only while it is recent enough to matter.

    The pace is taken over the throughput window or since the first submit, when that is more
    recent (:func:`jobs.listing.pace`); once the first submit is older than the window it no
    longer changes the pace, and finding it is a pass over the batch's jobs (14 ms a refresh on a
    20,000-job batch, twice the count by state). Only a batch whose every earlier request was
    sent again could move it later, and that is where the line's pace would differ from status's."""
    known = _FIRST_SENT.get(batch_id)
    if known is not None:
        return known
    first = store.first_submitted_at(session, batch_id)
    if first is not None and now - first >= listing.THROUGHPUT_WINDOW:
        if len(_FIRST_SENT) > 256:
            _FIRST_SENT.clear()
        _FIRST_SENT[batch_id] = first
    return first


#: ``error_type`` of jobs a schedule's deadline cancelled before they were sent or started.
DEADLINE_ERROR = "deadline"


def deadline_run_words(*, in_flight: int, unsent: int) -> str:
    """What processing a batch past its deadline does (``status`` and the dashboard say it after
    the command): it sends nothing, collects what fal made and cancels the unsent jobs (reason
    ``deadline``)."""
    does = ["collects what fal made"] if in_flight else []
    if unsent:
        does.append(f"cancels its {unsent} unsent job(s) (deadline)")
    return " and ".join(does) or "ends it"


def schedule_state(session: Session, batch: Batch, *, finished: bool, now: datetime) -> str:
    """What holds a batch back, in words, as ``status`` shows it ("" when nothing does).

    A user's pause first (it is what ``resume`` ends); then a passed deadline with how many jobs it
    cancelled; otherwise the schedule's own words (:meth:`Schedule.describe`). A cancelled batch,
    and one whose every job is finished, is held back by nothing: "waiting for window" would
    mislead there, and so would "paused by user" (with its "`wanbatch resume` goes on": there is
    nothing left to go on with; ``paused_by_user`` still says the flag is set). Nor is the pause
    what holds back a batch whose schedule will never send again (its deadline passed, or comes
    before the window next opens): resuming it sends nothing, so the schedule's words come first.
    """
    return _schedule_state(
        batch,
        finished=finished,
        now=now,
        cancelled=lambda: store.count_cancelled(session, batch.id, DEADLINE_ERROR),
    )


def _schedule_state(batch: Batch, *, finished: bool, now: datetime, cancelled: Callable[[], int]) -> str:
    """:func:`schedule_state`, ``cancelled`` counting the jobs its deadline cancelled (asked
    only of a batch past its deadline)."""
    if batch.state == BatchState.CANCELLED:
        return ""
    schedule = store.batch_schedule(batch)
    if batch.paused_by_user and not finished and schedule.over(now) is None:
        return PAUSED_BY_USER
    if schedule.is_empty():
        return ""
    if schedule.past_deadline(now):
        return f"{PAST_DEADLINE}: {cancelled()} cancelled"
    return "" if finished else schedule.describe(now)


def paused_schedule_state(shown: str, schedule: Schedule, now: datetime) -> str:
    """What the schedule says of a batch its user paused (``shown``, its :func:`schedule_state`,
    is "paused by user"): :meth:`Schedule.describe`, what ``schedule_state`` would say without
    the pause; "" for any other batch, and without a schedule. The pause said only "`wanbatch
    resume` goes on", and a user learnt after resuming that the window had closed until the next
    night."""
    return schedule.describe(now) if shown == PAUSED_BY_USER else ""


#: How :meth:`Schedule.describe` says that the window is closed, and that ``not_before`` is ahead.
_WAITING_FOR_WINDOW, _WAITING_UNTIL = "waiting for window (", "waiting until "


def schedule_words(shown: str, paused_schedule: str, ref: str) -> str:
    """What follows ``schedule:`` for a batch in ``status`` and on the dashboard's batch page:
    ``shown`` (its :func:`schedule_state`), and for a batch its user paused how it goes on —
    "paused by user (`wanbatch resume NAME` goes on)", or while its schedule is closed too
    (``paused_schedule``: its :func:`paused_schedule_state`) "paused by user; its window is
    closed (opens 22:00 Europe/Berlin, in 23h57m): `wanbatch resume NAME` goes on once it
    opens". ``ref``: how to name the batch in a command (:func:`jobs.printable.shell_ref`)."""
    if shown != PAUSED_BY_USER:  # work is left, and `resume` lets it go on ...
        return shown
    # ... at once, or once its schedule opens: said now, not learnt after resuming.
    closed = paused_schedule_text(paused_schedule)
    resume = f"`wanbatch resume {ref}` goes on"
    return f"{shown}; {closed}: {resume} once it opens" if closed else f"{shown} ({resume})"


def paused_schedule_text(paused_schedule: str) -> str:
    """A :func:`paused_schedule_state` that holds the batch back beside its user's pause, in the
    words ``status`` and ``run`` add to "paused by user": "its window is closed (opens 22:00
    Europe/Berlin, in 23h57m)", "nothing is sent before 2026-12-05 22:00 +01:00 (in 5h)"; ""
    when the schedule is open (resuming goes on at once) or there is none."""
    if not paused_schedule or paused_schedule.startswith("open"):
        return ""
    if paused_schedule.startswith(_WAITING_FOR_WINDOW):
        return "its window is closed (" + paused_schedule.removeprefix(_WAITING_FOR_WINDOW)
    if paused_schedule.startswith(_WAITING_UNTIL):
        return "nothing is sent before " + paused_schedule.removeprefix(_WAITING_UNTIL)
    return f"its schedule: {paused_schedule}"


def schedule_states(
    session: Session, batches: Iterable[tuple[Batch, bool]], *, now: datetime
) -> dict[str, str]:
    """:func:`schedule_state` of each ``(batch, finished)`` (by batch id), with one query for
    the jobs the deadlines of those past theirs cancelled (the dashboard's batch list)."""
    shown = list(batches)
    past = [b.id for b, _done in shown if store.batch_schedule(b).past_deadline(now)]
    cancelled = store.count_cancelled_of_batches(session, past, DEADLINE_ERROR)
    return {
        b.id: _schedule_state(b, finished=done, now=now, cancelled=_looked_up(cancelled, b.id))
        for b, done in shown
    }


def _looked_up(counts: dict[str, int], key: str) -> Callable[[], int]:
    """``counts[key]`` (0 when absent), when asked."""
    return lambda: counts.get(key, 0)


#: A low-priority request still in fal's queue after this long is called out by ``status``: fal
#: serves low priority only when no normal request waits on the endpoint, so it can starve.
LOW_PRIORITY_WAIT_SECONDS = 600.0


def low_priority_note(
    batch: Batch, *, now: datetime, queued: Callable[[], Iterable[datetime | None]]
) -> tuple[int, str]:
    """How many of a ``priority: low`` batch's requests have waited in fal's queue longer than
    :data:`LOW_PRIORITY_WAIT_SECONDS`, and a line saying so ("" when none, or not low).
    ``queued`` gives when each of the batch's ``queued`` jobs was sent (asked only of a
    low-priority batch)."""
    if batch.priority != "low":
        return 0, ""
    before = now - timedelta(seconds=LOW_PRIORITY_WAIT_SECONDS)
    waiting = sum(1 for submitted_at in queued() if submitted_at is not None and submitted_at <= before)
    if not waiting:
        return 0, ""
    return waiting, (
        f"{waiting} low-priority request(s) waiting in fal's queue over "
        f"{LOW_PRIORITY_WAIT_SECONDS / 60:.0f} min: fal serves low priority only when no normal "
        "request waits on the endpoint (`priority: normal` and submit again to stop waiting)"
    )


def _tick_leader_note(batch: Batch, reads: _Reads, *, done: bool, processing: bool, now: datetime) -> str:
    """``tick_leader_note``: asked only with a broker (workers lead ticks only there), of an
    unfinished batch of the workers' (not a simulation) that nothing processes — one read of
    the workers' beats, shared by every batch shown."""
    if done or processing or batch.simulated:
        return ""
    beats = reads.workers_beats()
    return listing.stalled_leader_text(beats, now=now) if listing.leader_stalled(beats, now=now) else ""


def broker_down_text(since: datetime, broker_url: str | None, *, now: datetime) -> str:
    """What ``status`` says of a batch while the workers' leader cannot reach the broker (since
    when: its date too when not on ``now``'s UTC day, :func:`jobs.listing.utc_clock`)."""
    where = f"WANBATCH_BROKER_URL {masked_url(broker_url)}" if broker_url else "WANBATCH_BROKER_URL"
    return (
        f"the workers cannot reach the broker ({where}) since {listing.utc_clock(since, now=now)}: "
        "submits and downloads wait for it"
    )


class _Reads(Protocol):
    """What :func:`_report` reads of the database for a batch: :class:`_OneBatch` asks for one
    batch, :class:`_AllBatches` for every batch at once (``status`` with no batch)."""

    session: Session

    def totals(self, batch: Batch, now: datetime) -> listing.Totals: ...
    def queued_sent_at(self, batch: Batch) -> Iterable[datetime | None]: ...
    def deadline_cancelled(self, batch: Batch, *, sent: bool | None = None) -> int: ...
    def broker_down(self, now: datetime) -> datetime | None: ...
    def workers_beats(self) -> store.WorkersBeat: ...
    def held(self, scope: store.CapScope) -> Held: ...
    def queue_waits(
        self, scope: store.CapScope, caps: CapCheck, now: datetime
    ) -> store.QueueWaits | None: ...
    def pending_endpoints(self, batch: Batch) -> set[str]: ...
    def heartbeat(self, batch: Batch, now: datetime) -> listing.LastBeat | None: ...
    def fal_holds(
        self, batch: Batch, now: datetime, gone: Callable[[str], bool] | None
    ) -> list[listing.FalHoldView]: ...
    def dead_holders(
        self,
        batch: Batch,
        now: datetime,
        gone: Callable[[str], bool] | None,
        silent: Mapping[str, datetime] | None,
    ) -> list[listing.DeadHolder]: ...
    def failures(self, batch: Batch) -> list[store.FailureGroup]: ...
    def covered(self, batch: Batch, now: datetime) -> Covered: ...
    def proof_wait(self, batch: Batch, now: datetime) -> listing.ProofWait | None: ...
    def elsewhere(self, batch: Batch, here: listing.Here) -> list[listing.ElsewhereWait]: ...
    def adopted(self, batch: Batch) -> int: ...
    def uncancelled(self, batch: Batch) -> list[store.Uncancelled]: ...


class _OneBatch:
    """:class:`_Reads` of one batch: its own queries (``status BATCH``)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def adopted(self, batch: Batch) -> int:
        return store.adopted_counts(self.session, [batch.id]).get(batch.id, 0)

    def uncancelled(self, batch: Batch) -> list[store.Uncancelled]:
        return store.uncancelled_requests(self.session, [batch.id]).get(batch.id, [])

    def totals(self, batch: Batch, now: datetime) -> listing.Totals:
        # One pass over the batch's jobs for every figure (the dashboard's query): a 100k-job
        # batch was scanned five times, once per figure.
        return listing.batch_summary(self.session, batch.id, now=now).all

    def queued_sent_at(self, batch: Batch) -> Iterable[datetime | None]:
        return (
            job.submitted_at for job in store.jobs_of_batch(self.session, batch.id, states=[JobState.QUEUED])
        )

    def deadline_cancelled(self, batch: Batch, *, sent: bool | None = None) -> int:
        return store.count_cancelled(self.session, batch.id, DEADLINE_ERROR, sent=sent)

    def broker_down(self, now: datetime) -> datetime | None:
        return listing.broker_down_since(self.session, now=now)

    def workers_beats(self) -> store.WorkersBeat:
        return store.workers_beats(self.session)

    def held(self, scope: store.CapScope) -> Held:
        return Held.of(store.cap_holders(self.session, scope))

    def queue_waits(self, scope: store.CapScope, caps: CapCheck, now: datetime) -> store.QueueWaits | None:
        return queue_waits(self.session, scope, caps, now=now)

    def pending_endpoints(self, batch: Batch) -> set[str]:
        return store.batch_endpoints(self.session, batch.id, [JobState.PENDING])

    def heartbeat(self, batch: Batch, now: datetime) -> listing.LastBeat | None:
        return listing.heartbeat(self.session, batch.id, now=now)

    def fal_holds(
        self, batch: Batch, now: datetime, gone: Callable[[str], bool] | None
    ) -> list[listing.FalHoldView]:
        return listing.fal_holds(self.session, batch.id, now=now, simulated=batch.simulated, gone=gone)

    def dead_holders(
        self,
        batch: Batch,
        now: datetime,
        gone: Callable[[str], bool] | None,
        silent: Mapping[str, datetime] | None,
    ) -> list[listing.DeadHolder]:
        return listing.read_dead_holders(
            self.session, [batch.id], now=now, excluding=process_prefix(), gone=gone, silent=silent
        )[batch.id]

    def failures(self, batch: Batch) -> list[store.FailureGroup]:
        return store.failure_reasons(self.session, batch.id)

    def covered(self, batch: Batch, now: datetime) -> Covered:
        return rerun_covered(self.session, batch, now=now)

    def proof_wait(self, batch: Batch, now: datetime) -> listing.ProofWait | None:
        return listing.proof_waits(self.session, [batch.id], now=now).get(batch.id)

    def elsewhere(self, batch: Batch, here: listing.Here) -> list[listing.ElsewhereWait]:
        return listing.elsewhere_waits(self.session, [batch.id], here).get(batch.id, [])


class _AllBatches:
    """:class:`_Reads` of many batches: each figure read for all of them in one grouped query
    (a few for reruns), the first time one batch needs it, so that ``status`` with no batch
    makes as many queries for 750 batches as for 5. Same figures as :class:`_OneBatch`."""

    def __init__(
        self,
        session: Session,
        batches: Sequence[Batch],
        *,
        now: datetime,
        api_key_id: str | None,
        origin: str | None = None,
    ) -> None:
        self.session = session
        self.batches = list(batches)
        self.ids = [b.id for b in self.batches]
        self.now = now
        self.api_key_id = api_key_id
        self.origin = origin
        self._read: dict[str, Any] = {}

    def _once(self, name: str, read: Callable[[], Any]) -> Any:
        if name not in self._read:
            self._read[name] = read()
        return self._read[name]

    def adopted(self, batch: Batch) -> int:
        found = self._once("adopted", lambda: store.adopted_counts(self.session, self.ids))
        return int(found.get(batch.id, 0))

    def uncancelled(self, batch: Batch) -> list[store.Uncancelled]:
        # Only the cancelled batches' jobs at fal can hold a cancel given up: those read, once.
        def read() -> dict[str, list[store.Uncancelled]]:
            ids = [b.id for b in self.batches if b.state == BatchState.CANCELLED]
            return store.uncancelled_requests(self.session, ids)

        return cast(list[store.Uncancelled], self._once("uncancelled", read).get(batch.id, []))

    def totals(self, batch: Batch, now: datetime) -> listing.Totals:
        return self._all_totals()[batch.id]

    def _all_totals(self) -> dict[str, listing.Totals]:
        found = self._once("totals", lambda: listing.totals_of_batches(self.session, self.ids, now=self.now))
        return cast(dict[str, listing.Totals], found)

    def _unfinished(self) -> list[Batch]:
        """The batches not every job of which finished (none without jobs): :func:`_report` asks
        what holds only those back. Read for them alone, not for the hundreds of batches done
        long ago (every job of theirs was read for nothing: a third of a second at 400,000)."""

        def read() -> list[Batch]:
            totals = self._all_totals()
            return [b for b in self.batches if not 0 < totals[b.id].total == totals[b.id].finished]

        return cast(list[Batch], self._once("unfinished", read))

    def queued_sent_at(self, batch: Batch) -> Iterable[datetime | None]:
        def read() -> dict[str, list[datetime | None]]:
            low = [b.id for b in self.batches if b.priority == "low"]
            sent: dict[str, list[datetime | None]] = {}
            for batch_id, at in store.submitted_at_in_state(self.session, low, JobState.QUEUED):
                sent.setdefault(batch_id, []).append(at)
            return sent

        return cast(list[datetime | None], self._once("queued", read).get(batch.id, []))

    def deadline_cancelled(self, batch: Batch, *, sent: bool | None = None) -> int:
        def read() -> dict[str, int]:
            # Every scheduled batch: one whose window opens only after its deadline ends its
            # unsent jobs (reason `deadline`) before the deadline (``cancelled_for_deadline``).
            scheduled = [b.id for b in self.batches if b.schedule is not None]
            return store.count_cancelled_of_batches(self.session, scheduled, DEADLINE_ERROR, sent=sent)

        return int(self._once(f"deadline-{sent}", read).get(batch.id, 0))

    def broker_down(self, now: datetime) -> datetime | None:
        return cast(
            datetime | None, self._once("broker", lambda: listing.broker_down_since(self.session, now=now))
        )

    def workers_beats(self) -> store.WorkersBeat:
        return cast(store.WorkersBeat, self._once("workers", lambda: store.workers_beats(self.session)))

    def held(self, scope: store.CapScope) -> Held:
        # Every batch's in-flight jobs, read once; each scope's counts summed once, not per batch.
        by_scope = self._once(
            "caps", lambda: HeldByScope(store.cap_counts(self.session, self.api_key_id, self.origin))
        )
        return cast(HeldByScope, by_scope).held(scope)

    def queue_waits(self, scope: store.CapScope, caps: CapCheck, now: datetime) -> store.QueueWaits | None:
        # The same for every batch sent to fal (their scopes differ only in their downloads); a
        # simulation's is its own batch's.
        key = "queue:" + ",".join(sorted(scope.requests_of or ()))
        return cast(
            store.QueueWaits | None, self._once(key, lambda: queue_waits(self.session, scope, caps, now=now))
        )

    def pending_endpoints(self, batch: Batch) -> set[str]:
        found = self._once(
            "endpoints", lambda: store.batches_endpoints(self.session, self.ids, [JobState.PENDING])
        )
        return set(found.get(batch.id, set()))

    def heartbeat(self, batch: Batch, now: datetime) -> listing.LastBeat | None:
        found = self._once("beats", lambda: listing.heartbeats(self.session, self.ids, now=self.now))
        return cast(listing.LastBeat | None, found.get(batch.id))

    def fal_holds(
        self, batch: Batch, now: datetime, gone: Callable[[str], bool] | None
    ) -> list[listing.FalHoldView]:
        found = self._once(
            "fal_holds",
            lambda: listing.fal_holds_of_batches(self.session, self._unfinished(), now=now, gone=gone),
        )
        return cast(list[listing.FalHoldView], found[batch.id])

    def dead_holders(
        self,
        batch: Batch,
        now: datetime,
        gone: Callable[[str], bool] | None,
        silent: Mapping[str, datetime] | None,
    ) -> list[listing.DeadHolder]:
        found = self._once(
            "dead_holders",
            lambda: listing.read_dead_holders(
                self.session,
                [b.id for b in self._unfinished()],
                now=now,
                excluding=process_prefix(),
                gone=gone,
                silent=silent,
            ),
        )
        return cast(list[listing.DeadHolder], found[batch.id])

    def failures(self, batch: Batch) -> list[store.FailureGroup]:
        found = self._once("failures", lambda: store.failure_reasons_of_batches(self.session, self.ids))
        return cast(list[store.FailureGroup], found.get(batch.id, []))

    def covered(self, batch: Batch, now: datetime) -> Covered:
        found = self._once("covered", lambda: rerun_covered_of_batches(self.session, self.batches, now=now))
        return cast(Covered, found[batch.id])

    def proof_wait(self, batch: Batch, now: datetime) -> listing.ProofWait | None:
        found = self._once("proof", lambda: listing.proof_waits(self.session, self.ids, now=self.now))
        return cast(listing.ProofWait | None, found.get(batch.id))

    def elsewhere(self, batch: Batch, here: listing.Here) -> list[listing.ElsewhereWait]:
        found = self._once("elsewhere", lambda: listing.elsewhere_waits(self.session, self.ids, here))
        return cast(list[listing.ElsewhereWait], found.get(batch.id, []))


def batch_report(
    session: Session,
    batch_id: str,
    *,
    now: datetime | None = None,
    caps: CapCheck | None = None,
    broker_url: str | None = None,
    gone: Callable[[str], bool] | None = None,
    silent: Mapping[str, datetime] | None = None,
    policy: str = DEFAULT_UNKNOWN_POLICY,
    here: listing.Here | None = None,
) -> BatchReport:
    """The contract's ``status BATCH --json`` object for one batch (``now``: for the schedule;
    ``policy``: ``WANBATCH_SUBMIT_UNKNOWN_POLICY``, what ``proof_wait_note`` says comes after a
    wait for fal's proof of a submit).

    ``caps``: how a process sending the batch from here counts the caps; an active batch with
    jobs waiting to be sent that one holds back gets it as its ``phase_reason``
    (:func:`cap_holds`), instead of a ``pending`` that waits in silence.

    While the workers' leader cannot reach the broker (:func:`jobs.listing.broker_down_since`),
    an unfinished batch the workers process gets no ETA, and an active one that as its
    ``phase_reason`` (:func:`broker_down_text`, naming ``broker_url`` masked): whatever a cap
    seems to hold back, nothing moves until the broker answers.

    ``gone``: whether a process (``host:pid:``) is known to have ended, so that a hold on fal it
    recorded before it died is not shown (:func:`jobs.listing.fal_holds`); ``silent``: worker
    processes (``host:pid:``) whose record on the workers' Redis went stale, and when each was
    last seen, so that jobs one holds are named as held by a gone process
    (:func:`jobs.listing.dead_holders`). ``here``: the API key id and fal queue origin of the
    process that shows it, to say which jobs wait for a process with another key or queue
    (``elsewhere_waiting``; none without)."""
    batch = store.get_batch(session, batch_id)
    return _report(
        batch,
        _OneBatch(session),
        now=now or utcnow(),
        caps=caps,
        broker_url=broker_url,
        gone=gone,
        silent=silent,
        policy=policy,
        here=here,
    )


def _report(
    batch: Batch,
    reads: _Reads,
    *,
    now: datetime,
    caps: CapCheck | None,
    broker_url: str | None,
    gone: Callable[[str], bool] | None,
    silent: Mapping[str, datetime] | None = None,
    policy: str = DEFAULT_UNKNOWN_POLICY,
    here: listing.Here | None = None,
) -> BatchReport:
    """:func:`batch_report` of ``batch``, what it reads of the database read through ``reads``."""
    totals = reads.totals(batch, now)
    counts = dict(totals.counts)
    terminal = sum(counts[s.value] for s in JobState if s.terminal)
    total = sum(counts.values())
    done = total > 0 and terminal == total
    starving, starving_note = low_priority_note(batch, now=now, queued=lambda: reads.queued_sent_at(batch))
    in_flight = total - terminal - totals.waiting
    shown_schedule = _schedule_state(
        batch, finished=done, now=now, cancelled=lambda: reads.deadline_cancelled(batch)
    )
    phase, phase_reason = batch_phase(
        state=batch.state,
        total=total,
        finished=terminal,
        pause_reason=batch.pause_reason,
        paused_by_user=batch.paused_by_user,
        schedule_state=shown_schedule,
    )
    beat = reads.heartbeat(batch, now)
    processing = listing.is_processing(beat, now=now)
    # The workers beat here, but their tick leader is frozen: nothing follows the requests' rows
    # nor takes leases over until another worker leads (what the notes below would promise).
    stalled = _tick_leader_note(batch, reads, done=done, processing=processing, now=now) if broker_url else ""
    # The workers cannot hand anything on: no batch they process moves (a simulation is a run's).
    broker_down = None if done or batch.simulated else reads.broker_down(now)
    if broker_down is not None and phase == "active":
        phase_reason = broker_down_text(broker_down, broker_url, now=now)
    elif (
        caps is not None
        and phase == "active"
        and counts.get(JobState.PENDING.value, 0)
        # Its run was killed: what a cap or fal's queue seemed to hold back was that run's (its
        # requests, its beat), and nothing sends the batch; the idle line says so instead.
        and not listing.ended_run(beat, now=now)
    ):
        scope = caps.scope(batch)
        holds = _cap_holds(
            reads.held(scope),
            batch.id,
            caps,
            waiting=lambda: reads.pending_endpoints(batch),
            # The workers' leader is frozen: the requests' rows are not followed, and a back-off
            # read from them holds nothing back (nothing is sent at all).
            queue=(lambda: reads.queue_waits(scope, caps, now)) if not stalled else (lambda: None),
            ahead=lambda: (
                normal_batches_ahead(reads.session, batch.id, now=now) if batch.priority == "low" else ()
            ),
        )
        phase_reason = cap_note(holds, batch.id) or None
    # The dashboard's forecast, to the second: the pace of the last minutes, and none for a batch
    # held back, with nothing in flight or that no process works on (it would only mislead).
    held = batch_standing(batch, totals, beat, broker_down, now=now)
    schedule = store.batch_schedule(batch)
    # Jobs waiting for fal's proof of their submit: the time left never ends before their wait.
    proof = reads.proof_wait(batch, now) if counts.get(JobState.SUBMIT_UNKNOWN.value) else None
    eta, eta_note = listing.forecast(totals, held=held, schedule=schedule, now=now, proof=proof)
    fal_holds = [] if done else reads.fal_holds(batch, now, gone)
    dead = [] if done else reads.dead_holders(batch, now, gone, silent)
    covered = reads.covered(batch, now)
    # Requests only a process with another key or queue can ask about: asked only when some job
    # waits for what fal says of its request.
    # A simulation's requests are its run's simulator's: never another process's to follow.
    followed = not batch.simulated and any(counts.get(state) for state in listing.FOLLOWED_STATES)
    elsewhere = reads.elsewhere(batch, here) if here is not None and followed else []
    # Jobs adopted from the outputs folder: looked for only among succeeded ones.
    adopted = reads.adopted(batch) if counts.get(JobState.SUCCEEDED.value) else 0
    # Requests of a cancelled batch whose cancel a process gave up (fal may still run and bill
    # them): looked for only among its jobs still at fal.
    at_fal = counts.get(JobState.QUEUED.value, 0) + counts.get(JobState.RUNNING.value, 0)
    given_up = reads.uncancelled(batch) if batch.state == BatchState.CANCELLED and at_fal else []
    return {
        "batch": batch.id,
        "name": batch.name,
        "state": BatchState(batch.state).value,
        "pause_reason": batch.pause_reason,
        "paused_by_user": batch.paused_by_user,
        "schedule_state": shown_schedule,
        "paused_schedule_state": paused_schedule_state(shown_schedule, schedule, now),
        "phase": phase,
        "phase_reason": phase_reason,
        "schedule": batch.schedule,
        "priority": batch.priority,
        "low_priority_waiting": starving,
        "low_priority_note": starving_note,
        "total": total,
        "finished": terminal,
        "in_flight": in_flight,
        "eta_seconds": eta,
        "eta_note": eta_note,
        "processing": processing,
        "processed_at": beat.seen.isoformat() if beat is not None else None,
        "broker_unreachable_since": broker_down.isoformat() if broker_down is not None else None,
        "fal_unreachable": [hold.as_json() for hold in fal_holds],
        "fal_unreachable_note": listing.fal_hold_text(fal_holds, now=now),
        "dead_lease_holders": [holder.as_json() for holder in dead],
        "dead_lease_holders_note": listing.dead_holders_text(dead, now=now, processing=not stalled),
        "tick_leader_note": stalled,
        "proof_waiting": proof.jobs if proof is not None else 0,
        "proof_wait_until": proof.until.isoformat() if proof is not None else None,
        "proof_wait_note": listing.proof_wait_text(proof, policy=policy, now=now),
        "elsewhere_waiting": [wait.as_json() for wait in elsewhere],
        "elsewhere_waiting_note": listing.elsewhere_wait_text(elsewhere),
        "counts": counts,
        "estimated_usd": _money(totals.estimated_usd),
        "spent_usd": _money(totals.spent_usd),
        "reserved_usd": _money(totals.reserved_usd),
        "budget_max_usd": _money(batch.budget_max_usd),
        "possibly_billed_usd": _money(totals.possibly_billed_usd),
        "possible_duplicate_charges": totals.possible_duplicate_charges,
        "confirmed_duplicate_charges": totals.confirmed_duplicate_charges,
        "actual_usd": _money(totals.actual_usd),
        "wasted_usd": _money(totals.wasted_usd),
        "cancelled_for_budget": totals.cancelled_for_budget,
        "cancelled_for_daily_budget": totals.cancelled_for_daily_budget,
        "cancelled_for_deadline": reads.deadline_cancelled(batch) if batch.schedule is not None else 0,
        "cancelled_for_deadline_sent": (
            reads.deadline_cancelled(batch, sent=True) if batch.schedule is not None else 0
        ),
        "media_mismatches": totals.media_mismatches,
        "rate_limited_submits": totals.rate_limited_submits,
        "failures": [
            FailureReason(
                state=g.state,
                error_type=g.error_type,
                count=g.count,
                example=g.example,
                sent=g.sent,
                summary=g.summary,
                distinct_errors=g.distinct,
                next_step=next_step(
                    g.error_type,
                    sent=g.sent,
                    ref=shell_ref(batch.name, batch.id),
                    simulated=batch.simulated,
                    rerun=batch.parent_batch_id is not None,
                ),
            )
            for g in reads.failures(batch)
        ],
        "parent_batch": batch.parent_batch_id,
        "created_at": batch.created_at.isoformat(),
        "simulated": batch.simulated,
        "manifest_path": batch.manifest_path,
        "manifest_host": machine.name(batch.manifest_host) if batch.manifest_host is not None else None,
        "manifest_elsewhere_note": manifest_elsewhere_text(batch),
        "rerun_rendered": covered.rendered,
        "rerun_pending": covered.pending,
        "not_in_manifest": not_in_manifest_counts(totals.not_in_manifest),
        "not_in_manifest_note": not_in_manifest_text(totals.not_in_manifest),
        "adopted_from_outputs": adopted,
        "adopted_note": adopted_text(adopted),
        "uncancelled": [u.as_json() for u in given_up],
        "uncancelled_note": uncancelled_text(given_up, batch),
    }


def manifest_elsewhere_text(batch: Batch) -> str:
    """The line saying batch ``batch`` is the project of another machine (its recorded
    ``manifest_host`` is not this one): which, and its manifest's path there; "" when it is this
    machine's or the machine is not known (stored before it was recorded). A rerun's is the
    machine ``rerun`` made it on: its ``manifest_path`` is its parent's, on the parent's machine
    (maybe another), so it is not named."""
    if not machine.elsewhere(batch.manifest_host):
        return ""
    assert batch.manifest_host is not None
    if batch.parent_batch_id is not None:
        return (
            f"batch {printable(batch.name)} belongs to {printable(machine.name(batch.manifest_host))} "
            "(another machine): a rerun made there"
        )
    return (
        f"batch {printable(batch.name)} belongs to {printable(machine.name(batch.manifest_host))}:"
        f"{shown_path(batch.manifest_path)} (another machine): its manifest was last submitted from there"
    )


def uncancelled_note(session: Session, batch: Batch, counts: Mapping[str, int]) -> str:
    """:func:`uncancelled_text` of one batch (``counts``: its jobs by state), for the dashboard's
    batch page: asked only of a cancelled batch with jobs still at fal, as ``status`` asks it."""
    at_fal = counts.get(JobState.QUEUED.value, 0) + counts.get(JobState.RUNNING.value, 0)
    if batch.state != BatchState.CANCELLED or not at_fal:
        return ""
    return uncancelled_text(store.uncancelled_requests(session, [batch.id]).get(batch.id, []), batch)


def uncancelled_text(given_up: Sequence[store.Uncancelled], batch: Batch) -> str:
    """The line ``status`` gives a cancelled batch's requests whose cancel a process gave up at
    fal (:func:`jobs.store.uncancelled_requests`): how many, each request and fal's last answer,
    that fal may still run and bill them, and what asks again ("" when none)."""
    if not given_up:
        return ""
    shown = "; ".join(f"request {u.request_id}: {printable(u.error)} ({u.tries} tries)" for u in given_up[:3])
    more = f"; {len(given_up) - 3} more (`status --json`: uncancelled)" if len(given_up) > 3 else ""
    simulate = " --simulate" if batch.simulated else ""
    return (
        f"{len(given_up)} request(s) of this cancelled batch could not be cancelled at fal "
        f"({shown}{more}): fal may still run and bill them; `wanbatch cancel "
        f"{shell_ref(batch.name, batch.id)}{simulate}` asks fal again (a worker does every few "
        "minutes) and fetches a video fal finishes"
    )


def adopted_text(adopted: int) -> str:
    """The line ``status`` and ``run`` give a batch's jobs adopted from outputs on disk ("" when none)."""
    if not adopted:
        return ""
    return (
        f"{adopted} job(s) adopted from outputs on disk (the database was behind them: a restored "
        "backup?): their sidecars' requests and costs are recorded, none was sent again"
    )


def not_in_manifest_counts(by_state: Mapping[str, int]) -> dict[str, int]:
    """:attr:`BatchReport.not_in_manifest` from the batch's jobs its manifest no longer has, by
    state (:attr:`jobs.listing.Totals.not_in_manifest`)."""
    ended = {
        s.value: by_state.get(s.value, 0) for s in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
    }
    return {"jobs": sum(by_state.values()), "ended": sum(ended.values()), **ended}


def not_in_manifest_text(by_state: Mapping[str, int]) -> str:
    """The line ``status`` and ``run`` give the ended jobs the batch's manifest no longer has:
    they are not the batch's failures (its exit code, its advice), and say so; "" when none."""
    counts = not_in_manifest_counts(by_state)
    if not counts["ended"]:
        return ""
    parts = [f"{counts[state]} {state}" for state in ("succeeded", "failed", "cancelled") if counts[state]]
    return (
        f"{counts['ended']} ended job(s) are no longer in the manifest ({', '.join(parts)}): "
        "not counted in the batch's outcome, nor rerun by `rerun --failed-only`"
    )


def check_simulation(
    batch_id: str, settings: DatabaseSettings, *, simulated: bool, command: str = "run"
) -> None:
    """Refuse (exit 2) to process a simulation against fal, or a batch sent to fal with the
    simulator: simulated videos never mix with paid ones, and a simulation never costs money.

    ``simulated``: whether this process sends to the bundled simulator (``--simulate``);
    ``command``: the one that goes on (``run``, ``cancel``), named in the message.
    """
    with db.read_scope(open_engine(settings)) as session:
        refuse_other_way(store.get_batch(session, batch_id), simulated=simulated, command=command)


def refuse_other_way(batch: Batch, *, simulated: bool, command: str = "run") -> None:
    """:func:`check_simulation` of a batch already read: call it before changing anything, so a
    refusal (exit 2) always means that nothing happened."""
    name = batch.name
    if batch.simulated and not simulated:
        raise UsageError(
            f"batch {name} is a simulation (made by `--simulate`): nothing of it goes to fal; "
            f"`wanbatch {command} {shell_ref(name, batch.id)} --simulate` goes on (run its manifest "
            "without `--simulate` to send it to fal)"
        )
    if simulated and not batch.simulated:
        raise UsageError(
            f"batch {name} is sent to fal: `--simulate` would mix simulated videos into it; "
            "go on without `--simulate` (`wanbatch run MANIFEST --simulate` simulates its manifest "
            "as a batch of its own)"
        )


def simulated_elsewhere_line(name: str, pid: int) -> str:
    """What ``run --simulate`` says (exit 2, nothing changed) of a batch that process ``pid`` of
    this host is simulating now. Each simulation's simulator lives in its own process, and holds
    the requests that run sent: a second one, given a copy of those "at fal" when it started,
    knew nothing of those sent after, answered them "not found", and their jobs failed."""
    return (
        f"batch {name} is being simulated by process {pid} on this host, whose own simulator holds "
        f"its requests: a second `--simulate` run cannot share them; nothing was changed (wait for "
        f"process {pid} to finish, or stop it with Ctrl-C, then {RUN_AGAIN})"
    )


def refuse_cancel_without_key(session: Session, batch: Batch, settings: Settings, *, simulated: bool) -> None:
    """``cancel`` here, in this process, of a batch with requests at fal and no ``FAL_KEY``: a
    :class:`ConfigError` (exit 2) before anything changes.

    Cancelling those requests needs the key; cancelling the unsent jobs first and then refusing
    left a half-done cancel behind an exit 2 that says nothing happened. Not refused: with a
    broker (the workers cancel, with their key), with ``--simulate`` (the simulator needs no
    key), or when every unfinished job is unsent (those end without a call to fal).
    """
    if simulated or settings.broker_url or (settings.fal_key and settings.fal_key.get_secret_value()):
        return
    sent = [s for s in UNFINISHED_STATES if s not in store.UNSENT_STATES]
    held = store.count_in_states(session, sent, batch_id=batch.id)
    if held:
        raise ConfigError(
            f"FAL_KEY is not set: {held} job(s) of batch {batch.name} are at fal, and cancelling "
            f"them there needs the key; nothing was cancelled (export FAL_KEY=<your fal API key>, "
            f"then run `wanbatch cancel {shell_ref(batch.name, batch.id)}` again)"
        )


def ends_without_fal(session: Session, batch: Batch, now: datetime) -> bool:
    """Whether processing ``batch`` now makes no call to fal, so needs no ``FAL_KEY``: its
    deadline has passed (nothing of it is sent any more), and every unfinished job of it waits
    to be sent (``pending``, ``retry_wait``): fal holds no request of it, and nothing of it waits
    to be downloaded, cancelled or looked up there (a ``submit_unknown`` is). The run then only
    ends those jobs cancelled (reason ``deadline``): what ``status`` and ``resume`` advise
    ``wanbatch run NAME`` for (:func:`_resumed_line`, ``cli.output.deadline_run_text``)."""
    if store.batch_schedule(batch).over(now) is None:
        return False
    at_fal = [s for s in UNFINISHED_STATES if s not in listing.WAITING_STATES]
    return not store.count_in_states(session, at_fal, batch_id=batch.id)


def makes_no_fal_call(session: Session, batch: Batch, now: datetime) -> bool:
    """Whether processing ``batch`` now makes no call to fal at all: none of its jobs is
    unfinished (it has ended: a ``run`` of it only reports it), or :func:`ends_without_fal`. Such
    a run reaches no fal host, so the proxy variables are none of its business."""
    if not store.count_in_states(session, UNFINISHED_STATES, batch_id=batch.id):
        return True
    return ends_without_fal(session, batch, now)


#: How a ``run`` goes on, said after what to fix first (``rerun`` names ``wanbatch run NAME``:
#: running it again would store another batch).
RUN_AGAIN = "run this command again"


def paused_line(name: str, ref: str, again: str = RUN_AGAIN, *, closed: str = "") -> str:
    """What a ``run`` says of a batch its user paused: paused, and how to go on. ``closed``:
    :func:`paused_schedule_text`, when its schedule is closed too ("its window is closed (opens
    22:00 Europe/Berlin, in 23h57m)"), said as ``status`` says it: resuming sends nothing
    before then, and a user learnt that only after resuming."""
    schedule = f"; {closed}" if closed else ""
    return (
        f"batch {name} is paused (`wanbatch pause`){schedule}: nothing of it is sent until "
        f"`wanbatch resume {ref}`{' and its schedule opens' if closed else ''}; then {again} to go on"
    )


def refused_by_fal(report: BatchReport) -> bool:
    """Whether the batch has jobs left and is paused because fal refused the key or the account
    (HTTP 401/402/403, :func:`worker.steps.failures.pause_for_account`), not for its outputs."""
    return (
        report["state"] == BatchState.PAUSED.value
        and report["finished"] < report["total"]
        and not (report["pause_reason"] or "").startswith(store.OUTPUTS_PAUSE_PREFIX)
        and not store.paused_for_inputs(report["pause_reason"])
    )


def inputs_paused(report: BatchReport) -> bool:
    """Whether the batch has jobs left and is paused because a job's local input file is not
    there (its folder moved, its disk not mounted: :func:`worker.steps.failures.pause_for_missing_input`)."""
    return (
        report["state"] == BatchState.PAUSED.value
        and report["finished"] < report["total"]
        and store.paused_for_inputs(report["pause_reason"])
    )


def inputs_line(report: BatchReport) -> str:
    """What a ``run`` that a missing input file stopped says: paused, and the reason, which says
    which file or folder is missing and the ways on (the manifest from its new place, or ``run
    BATCH`` once the file is back): "run this command again" would meet the same missing file."""
    return f"batch {report['name']} is paused: {report['pause_reason']}"


def outputs_paused(report: BatchReport) -> bool:
    """Whether the batch has jobs left and is paused because its outputs could not be stored
    (a full disk, a read-only folder, storage that refuses writes:
    :func:`worker.steps.download._pause_for_outputs`)."""
    return (
        report["state"] == BatchState.PAUSED.value
        and report["finished"] < report["total"]
        and (report["pause_reason"] or "").startswith(store.OUTPUTS_PAUSE_PREFIX)
    )


def outputs_line(report: BatchReport, again: str = RUN_AGAIN) -> str:
    """What a ``run`` that unstorable outputs stopped says: paused, why (the reason says what to
    fix), and how to go on."""
    return f"batch {report['name']} is paused: {report['pause_reason']}; fix it, then {again} to go on"


def refused_line(report: BatchReport, again: str = RUN_AGAIN) -> str:
    """What a ``run`` that fal's refusal of the key or the account stopped says: nothing more is
    sent, why, and how to go on (the same command resumes the batch once fal accepts the key)."""
    reason = report["pause_reason"] or "fal refused the key or the account"
    return (
        f"batch {report['name']} is paused: {reason}: nothing more of it is sent; fix FAL_KEY "
        f"or the fal account (`wanbatch doctor` checks both), then {again} to go on"
    )


def cancelled_at_once(cancelled: store.UnsentCancelled) -> str:
    """What ``wanbatch cancel`` and the dashboard's **Cancel batch** say of the jobs they ended
    at once, fal holding no request of theirs: ``5 job(s) cancelled at once (never sent)``.

    Jobs sent before are told apart, as ``status`` tells them: one waiting to be sent again
    (``retry_wait``) was once at fal, and "never sent" said otherwise; one whose submit's
    outcome is unknown may be at fal, billed."""
    if not cancelled.sent_before and not cancelled.outcome_unknown:
        return f"{cancelled.total} job(s) cancelled at once (never sent)"
    parts = []
    if cancelled.never_sent:
        parts.append(f"{cancelled.never_sent} never sent")
    if cancelled.sent_before:
        parts.append(f"{cancelled.sent_before} sent before, waiting to be sent again, not at fal now")
    if cancelled.outcome_unknown:
        unknown = cancelled.outcome_unknown
        parts.append(f"{unknown} sent with the outcome unknown, which fal may have accepted and billed")
    return f"{cancelled.total} job(s) cancelled at once ({'; '.join(parts)})"


@dataclass(frozen=True, slots=True)
class CancelResult:
    """What :func:`cancel_batch` did to a batch; ``wanbatch cancel`` and the dashboard's
    **Cancel batch** each say it in their own way."""

    batch_id: str
    name: str
    #: A simulation (made by ``--simulate``): its requests are at its run's simulator.
    simulated: bool
    #: An earlier cancel had cancelled the batch: this one only ended what that one left unsent.
    already_cancelled: bool
    #: Every job was terminal and the batch not cancelled: nothing changed (it stays ``done``).
    finished: bool
    #: The jobs ended at once, fal holding no request of theirs.
    at_once: store.UnsentCancelled
    #: Jobs fal holds (or may hold): each needs a cancel call there, made by whatever processes
    #: the batch.
    at_fal: int
    #: Jobs not terminal once the cancel is recorded (those at fal, those being downloaded).
    unfinished: int
    #: Paid videos that waited to be downloaded for the batch's pause for its outputs (a full
    #: disk, a read-only folder, a storage refusing them), made due at once by the cancel (a
    #: cancel run again makes the downloads still waiting due too, uncounted: why they wait is
    #: no longer known).
    outputs_waiting: int = 0
    #: That pause's reason (None: the batch was not paused for its outputs), or the download
    #: pause's (:attr:`downloads_waiting`).
    outputs_reason: str | None = None
    #: Paid videos that waited for fal's media host, the batch paused because downloads fail
    #: there or cannot connect (:func:`jobs.store.paused_for_downloads`), made due at once by the
    #: cancel: a cancelled batch's download is held 10 minutes at most (since its first failure),
    #: stored if the host serves it by then, else failed ``download_failed``.
    downloads_waiting: int = 0
    #: The batch is another machine's project (:func:`manifest_elsewhere_text`): which, and its
    #: manifest there; "" when it is this machine's (or not known).
    manifest_elsewhere_note: str = ""

    @property
    def changed(self) -> bool:
        """Whether this call changed anything: cancelled the batch, or ended jobs of it."""
        return not self.finished and (not self.already_cancelled or self.at_once.total > 0)

    def as_dict(self) -> dict[str, Any]:
        """The counts the dashboard's JSON answer carries."""
        return {
            "batch": self.batch_id,
            "name": self.name,
            "already_cancelled": self.already_cancelled,
            "cancelled_at_once": self.at_once.total,
            "never_sent": self.at_once.never_sent,
            "sent_before": self.at_once.sent_before,
            "outcome_unknown": self.at_once.outcome_unknown,
            "at_fal": self.at_fal,
            "unfinished": self.unfinished,
            "outputs_waiting": self.outputs_waiting,
            "downloads_waiting": self.downloads_waiting,
            "manifest_elsewhere_note": self.manifest_elsewhere_note,
        }


def cancel_batch(ref: str, settings: Settings, *, by: str, simulate: bool | None = None) -> CancelResult:
    """Cancel batch ``ref`` (id, id prefix or name): the one operation behind ``wanbatch cancel``
    and the dashboard's **Cancel batch**, which differ only in how they say what it did (and in
    that the CLI then processes the batch until it is over).

    In one transaction, the batch's row locked (:func:`jobs.store.lock_batch`: of concurrent
    cancels exactly one cancels it, the others find it cancelled, as they would in turn): the
    batch becomes ``cancelled`` ("cancelled by user"), and every job fal holds no request of
    ends ``cancelled`` at once, set-based (:func:`jobs.store.cancel_unsent`): ``pending`` and
    ``retry_wait`` ones, never sent or sent before and waiting to be sent again, and
    ``submit_unknown`` ones, told apart in :attr:`CancelResult.at_once` as ``status`` tells
    them. Each such job's event names ``by`` (``cli``, ``dashboard``): who cancelled it.

    No call to fal is made here: the requests fal holds are cancelled by the tick of whatever
    processes the batch (:func:`worker.steps.reconcile.cancel_jobs_of_cancelled_batches`:
    queued ones first, newest first from the tail of fal's FIFO queue, running ones only after
    them) — the CLI's own run, the workers, or for a simulation the ``--simulate`` run whose
    simulator holds them.

    * A batch whose every job is terminal, not cancelled, is :attr:`~CancelResult.finished`:
      nothing changes; it stays ``done``, not relabelled cancelled.
    * A batch already cancelled is :attr:`~CancelResult.already_cancelled`; its jobs still
      unsent (a cancel stopped half-way) end now. The CLI always finished such a cancel, while
      the dashboard answered "already cancelled" and left them waiting: both finish it now, as a
      user who cancels again expects. With nothing left unsent, nothing changes.
    * A batch paused for its outputs (:data:`jobs.store.OUTPUTS_PAUSE_PREFIX`: a full disk, a
      read-only folder) has paid videos waiting in ``downloading``, each due only after
      ``WANBATCH_RETRY_MAX_DELAY`` (:func:`worker.steps.download._pause_for_outputs`): the cancel
      makes them due at once (:attr:`CancelResult.outputs_waiting`), so whatever processes the
      batch tries each now — stored if there is room, else failed ``output_not_kept`` as a
      cancelled batch ends them — instead of waiting minutes in silence. So does a cancel run
      again on a cancelled batch (the pause's reason is gone by then; its waits are not).
    * A batch paused because its downloads fail (:func:`jobs.store.paused_for_downloads`: fal's
      media host fails them, or they cannot connect) has its waiting videos made due at once
      too, told apart (:attr:`CancelResult.downloads_waiting`): no disk decides their fate, the
      host does — a cancelled batch's download is held 10 minutes at most since its first
      failure (:func:`worker.steps.download._cancelled_given_up`), so the cancel ends within
      them instead of waiting for the host for days, and a short blip throws no paid video away.

    ``simulate``: None when the caller only records the cancel (the dashboard); else the caller
    goes on to process the batch here, with ``--simulate`` or not (the CLI), and what that needs
    is checked first (:func:`refuse_other_way`, :func:`refuse_cancel_without_key`). A refusal is
    raised before anything changes.
    """
    with db.session_scope(open_engine(settings)) as session:
        batch = store.lock_batch(session, ref)
        already = batch.state == BatchState.CANCELLED
        unfinished = store.count_in_states(session, UNFINISHED_STATES, batch_id=batch.id)
        finished = not already and not unfinished
        at_once, at_fal, outputs_waiting, downloads_waiting = store.UnsentCancelled(), 0, 0, 0
        reason = batch.pause_reason or ""
        outputs_paused = reason.startswith(store.OUTPUTS_PAUSE_PREFIX)
        paused_for_outputs = batch.state == BatchState.PAUSED and outputs_paused
        for_downloads = paused_for_outputs and store.paused_for_downloads(reason)
        if unfinished:
            if simulate is not None:
                refuse_other_way(batch, simulated=simulate, command="cancel")
                refuse_cancel_without_key(session, batch, settings, simulated=simulate)
            store.set_batch_state(session, batch.id, BatchState.CANCELLED, reason="cancelled by user")
            at_once = store.cancel_unsent(
                session,
                [batch.id],
                reason="batch cancelled",
                error="cancelled by user",
                error_type=USER_CANCELLED,
                worker=by,
            )
            if paused_for_outputs or already:  # already: the pause's reason is gone, its waits are not
                due = store.downloads_due_now(session, batch.id)
                if for_downloads:  # the media host decides their fate, not a disk
                    downloads_waiting = due
                elif paused_for_outputs:  # said only when known to be for outputs
                    outputs_waiting = due
            at_fal = store.count_in_states(session, AT_PROVIDER_STATES, batch_id=batch.id)
            unfinished = store.count_in_states(session, UNFINISHED_STATES, batch_id=batch.id)
        return CancelResult(
            batch_id=batch.id,
            name=batch.name,
            simulated=batch.simulated,
            already_cancelled=already,
            finished=finished,
            at_once=at_once,
            at_fal=at_fal,
            unfinished=unfinished,
            outputs_waiting=outputs_waiting,
            outputs_reason=reason if paused_for_outputs else None,
            downloads_waiting=downloads_waiting,
            manifest_elsewhere_note=manifest_elsewhere_text(batch),
        )


def outputs_waiting_line(done: CancelResult) -> str | None:
    """What ``wanbatch cancel`` says of the paid videos that waited for the batch's outputs to be
    kept (:attr:`CancelResult.outputs_waiting`), or for fal's media host
    (:attr:`CancelResult.downloads_waiting`), in one line: what they waited for (the pause's
    reason up to its advice) and what the cancel does with them now. None: none waited."""
    why = ""
    if done.outputs_reason:
        cause = done.outputs_reason.split(" — ", 1)[0].split("; the videos already made", 1)[0]
        why = f" ({cause})"
    if done.downloads_waiting:
        return (
            f"cancel: {done.downloads_waiting} paid video(s) waited for fal's media host{why}: each is "
            "tried now, not after WANBATCH_RETRY_MAX_DELAY, and held 10 minutes at most — "
            "stored if the host serves it (never made again), else it ends failed (download_failed, "
            "its cost recorded) after 10 minutes of failing"
        )
    if not done.outputs_waiting:
        return None
    return (
        f"cancel: {done.outputs_waiting} paid video(s) waited for the batch's outputs to be kept{why}: "
        "each is tried once now, not after WANBATCH_RETRY_MAX_DELAY — stored if there is room (never "
        "made again), else it ends failed (output_not_kept) as the cancel ends them"
    )


#: ``error_type`` of a job whose request, sent with another API key, ``wanbatch cancel
#: --abandon-other-key`` wrote off (:func:`abandon_other_key`).
ABANDONED_OTHER_KEY = "abandoned_other_key"


def other_key_requests(session: Session, batch_id: str, *, key_id: str, origin: str) -> list[Job]:
    """The unfinished jobs of batch ``batch_id`` waiting on a request sent with another API key
    than ``key_id`` (a process's, a hash) to the fal queue at ``origin`` (or to one not
    recorded): what ``cancel --abandon-other-key`` asks fal about, and writes off those fal
    refuses to ``key_id``. A ``downloading`` job whose result is stored is none of them: its
    video is fetched from the stored result, which needs no key."""
    return [
        job
        for job in store.jobs_of_batch(session, batch_id, states=store.REFUSABLE_STATES)
        if job.request_id is not None
        and job.api_key_id is not None
        and job.api_key_id != key_id
        and (job.fal_origin is None or job.fal_origin == origin)
        and not (job.state == JobState.DOWNLOADING and job.provider_output is not None)
    ]


def abandon_other_key(batch_id: str, settings: Settings, *, key_id: str, origin: str, by: str) -> int:
    """``wanbatch cancel BATCH --abandon-other-key``: every unfinished job of the batch whose
    request was sent with another API key than ``key_id`` (this process's, a hash) to the fal
    queue at ``origin`` (:func:`other_key_requests`) and that fal refused to ``key_id`` (a
    :func:`jobs.store.note_key_refused` mark that still holds: the caller asked fal first,
    :func:`worker.abandon.ask_about_other_keys`) ends ``failed`` (``error_type``
    :data:`ABANDONED_OTHER_KEY`), its request left at fal unfollowed, its estimate counted as
    possibly billed (:func:`jobs.store.abandon_request`). The way out when that key is gone (a
    key of another fal account, revoked): fal tells this key such requests do not exist, so
    nothing here can follow, cancel or download them, and the batch would never end. A request
    fal answers this key about is the same account's: it is followed and cancelled (or
    downloaded) as any other, never written off. How many were.
    Each job is moved by its version read here; one a process moved meanwhile (a worker's poll
    or cancel of it, which bump its version) is read again and tried again, a few times: the
    first try left it unfinished, and the batch with it, until ``cancel`` was run once more."""
    abandoned: list[str] = []
    for _ in range(ABANDON_TRIES):
        missed = _abandon_other_key_once(
            batch_id, settings, key_id=key_id, origin=origin, by=by, into=abandoned
        )
        if not missed:
            break
    return len(abandoned)


#: How many times ``cancel --abandon-other-key`` reads again the jobs another process moved
#: while it wrote them off (:func:`abandon_other_key`).
ABANDON_TRIES = 5


def _abandon_other_key_once(
    batch_id: str, settings: Settings, *, key_id: str, origin: str, by: str, into: list[str]
) -> int:
    """One pass of :func:`abandon_other_key`: the jobs written off are added to ``into``; how
    many it found but could not write off because another process moved them meanwhile."""
    missed = 0
    with db.session_scope(open_engine(settings)) as session:
        refused = {(r.job_id, r.request_id) for r in store.refused_requests(session, batch_id, key_id=key_id)}
        found = [
            job
            for job in other_key_requests(session, batch_id, key_id=key_id, origin=origin)
            if (job.id, job.request_id) in refused
        ]
        abandoned: list[str] = []
        for job in found:
            sent_with = job.api_key_id
            error = (
                f"request {job.request_id} was sent with another API key (key id {sent_with}) and "
                "abandoned (`wanbatch cancel --abandon-other-key`): fal does not know it for the key "
                f"id {key_id}; left at fal unfollowed, where it may still run and bill; its estimate "
                "is counted as possibly billed"
            )
            if store.abandon_request(
                session,
                store.Fence.of(job, by),
                error=error,
                error_type=ABANDONED_OTHER_KEY,
                reason=f"abandoned: sent with another API key (key id {sent_with})",
            ):
                abandoned.append(job.id)
            else:
                missed += 1
        store.forget_key_refusals(session, abandoned)
    into.extend(abandoned)
    return missed


def cancelled_line(session: Session, batch: Batch, *, manifest: bool) -> str:
    """What ``submit`` and ``run`` say of a batch ``wanbatch cancel`` ended: cancelled for good,
    and the ways on (a rerun of its jobs as a new batch; for a manifest, a new ``name``).

    While jobs of it are still being cancelled (an interrupted ``cancel``, or workers still at
    it), ``rerun --failed-only`` would leave them out: the line says ``cancel`` finishes them."""
    ref = shell_ref(batch.name, batch.id)
    simulate = " --simulate" if batch.simulated else ""
    line = f"batch {batch.name} is cancelled (`wanbatch cancel`) and cannot be resumed; "
    if collecting := cancelled_collecting(session, batch):
        line += (
            f"{collecting} job(s) of it are at fal or have a paid video to fetch (`wanbatch run "
            f"{ref}{simulate}` collects them, sending nothing), then "
        )
    elif unfinished := store.count_in_states(session, UNFINISHED_STATES, batch_id=batch.id):
        line += (
            f"{unfinished} job(s) of it are still being cancelled (`wanbatch cancel {ref}{simulate}` "
            "finishes that), then "
        )
    line += f"`wanbatch rerun {ref} --failed-only{simulate}` runs what failed or was cancelled again"
    line += " as a new batch"
    return line + (" (or give the manifest a new `name`)" if manifest else "")


def refuse_rerun_name(session: Session, name: str) -> None:
    """``submit`` or ``run`` of a manifest named as a batch ``wanbatch rerun`` made
    (``NAME-rerun-1``): a :class:`UsageError` (exit 2), raised before anything changes (see
    :func:`refuse_rerun`). Looked up by the manifest's own name, before
    :func:`jobs.store.name_for_batch` would rename a simulated rerun holding it aside."""
    holder = store.batch_named(session, name)
    if holder is not None:
        refuse_rerun(session, holder)


def refuse_rerun(session: Session, batch: Batch) -> None:
    """A manifest submitted to a batch ``wanbatch rerun`` made: a :class:`UsageError` (exit 2),
    raised before anything changes. A rerun never adds jobs to an existing batch, and a rerun
    batch is made from its parent's jobs, not from a manifest: merged, the manifest's jobs were
    added to it, the rerun "moved" to the manifest's folder, and its dataset card claimed its
    parent was made from that file. Only the manifest's name collides (a copy of a manifest
    renamed after a rerun, a typo): another name makes a batch of its own."""
    if batch.parent_batch_id is None:
        return
    try:
        parent_name = store.get_batch(session, batch.parent_batch_id).name
    except NotFoundError:  # never deleted by wanbatch; its id says what is known
        parent_name = batch.parent_batch_id
    raise UsageError(
        f"batch {batch.name} is a rerun of {parent_name} (made by `wanbatch rerun`); "
        "give the manifest another name"
    )


def refuse_name_taken(
    name: str,
    stored_at: str,
    given: str,
    stored: store.Resubmitted,
    before: int,
    *,
    other_host: str | None = None,
) -> None:
    """A manifest of another project that took a stored batch's ``name:``: a :class:`UsageError`
    (exit 2), raised before anything is stored.

    A batch is found by its name, so a manifest submitted from another place is taken for the
    same project moved or copied (:func:`submit_manifest`'s ``manifest_moved``). When the batch's
    manifest is still where it was, the one given now may be another project with the same name
    on a shared database: merged, the jobs of the first it does not have were dropped as "no
    longer in its manifest", its budget cap replaced, and "moved" announced, while the next
    submit of the first moved everything back. So while the old manifest is there, a manifest
    from elsewhere is taken only when it leaves out none of the ``before`` jobs the old one had
    (a copy, perhaps with more items): one that asks for none of them, or leaves some out, is
    refused, and the line says how to move a project on purpose. A real move leaves no file
    behind.

    ``other_host``: the batch's manifest is on another machine (``batches.manifest_host``,
    :mod:`jobs.machine`), whose files this one cannot see — "not there" here proved nothing,
    and with the same path on both (the same dev-container layout) no move was even considered
    — so it counts as still there, whatever the paths, and the line names that machine. The
    caller skips this for ``--take-over``, the move the line offers."""
    kept = stored.present - stored.restored  # of the jobs the old manifest had, those asked for again
    left_out = max(before - kept, 0)
    if stored.present and not left_out:
        return
    old = Path(stored_at)
    if other_host is None:
        try:
            if not old.is_file() or old.samefile(given):
                return
        except OSError:
            return
    # Its jobs a manifest dropped before, asked for again (``restored``), are none of the batch's now.
    asks = f"leaves out {left_out} of its {before} job(s)" if kept > 0 else "asks for none of its jobs"
    if other_host is not None:
        owner = f"{printable(machine.name(other_host))}:{shown_path(old)} (another machine)"
        how = "if it is the same project moved to this machine, run the command again with `--take-over`"
    else:
        owner = f"{shown_path(old)}, which is still there"
        how = (
            f"if it is the same project moved, move or delete {shown_path(old)} first, "
            "or run the command again with `--take-over`"
        )
    raise UsageError(
        f"batch {name} belongs to {owner}, and {shown_path(Path(given))} {asks}: give this manifest "
        f"another `name:` (or, {how})"
    )


def take_over_silence(settings: Settings) -> float:
    """How long a run of a batch on another machine must have been silent before ``--take-over``
    takes the batch (:func:`refuse_live_elsewhere`), in seconds: a lease's length
    (``WANBATCH_LEASE_SECONDS``), and never less than the silence after which a process is taken
    for stopped (:data:`jobs.listing.PROCESSING_STALE_SECONDS`). By then every lease it held on
    the batch's jobs has run out, so whatever it was sending or fetching is this machine's to
    claim (its late writes lose the lease's version compare), and a run merely slow to beat
    (a busy database) is not taken for gone."""
    return max(settings.lease_seconds, listing.PROCESSING_STALE_SECONDS)


def refuse_live_elsewhere(session: Session, batch: Batch, *, now: datetime, silent_for: float) -> None:
    """``--take-over`` of a batch that a run on another machine still works on: a
    :class:`UsageError` (exit 2), raised before anything is stored.

    ``--take-over`` says the project moved here; a run of it still beating on the other machine
    (a heartbeat for the batch within ``silent_for`` seconds, :func:`take_over_silence`) says it
    did not. Taken anyway, both machines sent and fetched its jobs, each into its own output
    folder, their leases fought over, and the other run ended saying its outputs were in a
    folder that held none of them. The line names that machine and when it was last seen, and
    the ways out: stop that run there, or wait for the silence. A machine is told from this one
    by its heartbeats (:func:`jobs.machine.beat_machine`): a second run of the batch on this
    machine works beside this one, as ever."""
    since = now - timedelta(seconds=silent_for)
    seen: dict[str, datetime] = {}
    for owner, at in store.batch_beaters(session, batch.id, since=since).items():
        host = machine.beat_machine(owner)
        if host is not None and (host not in seen or at > seen[host]):
            seen[host] = at
    if not seen:
        return
    host, at = max(seen.items(), key=lambda item: item[1])
    age = format_age(max(0.0, (now - at).total_seconds()))
    raise UsageError(
        f"batch {batch.name} is still being run on {printable(host)} (another machine), last seen {age} ago: "
        "taken over now, both machines would send and fetch its jobs, each into its own output "
        f"folder; stop that run there, or wait until it has been silent for {format_age(silent_for)} "
        "(WANBATCH_LEASE_SECONDS), then run the command again with `--take-over`"
    )


def refuse_cancelled(session: Session, batch: Batch, *, manifest: bool) -> None:
    """``submit`` or ``run`` of a batch ``wanbatch cancel`` ended: a :class:`UsageError` (exit 2),
    raised before anything changes. A cancel is for good: the jobs a new submit added were
    cancelled "by user" at once (:mod:`worker.steps.reconcile`), and a run sent nothing.

    Not ``run BATCH`` (not ``manifest``) of one with jobs at fal or downloading
    (:func:`cancelled_collecting`): that run collects them, sending nothing. Refused, a video fal
    finished (and billed) after the cancel stayed unfetched until the user thought of running
    ``cancel`` again."""
    if batch.state != BatchState.CANCELLED:
        return
    if not manifest and cancelled_collecting(session, batch):
        return  # `run BATCH` collects what fal made or holds, sending nothing
    raise UsageError(cancelled_line(session, batch, manifest=manifest))


def cancelled_collecting(session: Session, batch: Batch) -> int:
    """How many jobs of a batch ``wanbatch cancel`` ended are still at fal or downloading (0 for
    a batch not cancelled): requests whose cancel is under way, and videos fal finished, paid
    for, that nobody has fetched yet — a webhook applied by ``wanbatch serve`` after the batch's
    run ended can prove that fal ran a cancelled (or lost) request to the end, and adopt it
    (:mod:`worker.steps.webhooks`). ``run BATCH`` collects them (:func:`refuse_cancelled` lets it
    through), sending nothing, as ``cancel BATCH`` does; ``status`` and the dashboard say so."""
    if batch.state != BatchState.CANCELLED:
        return 0
    return store.count_in_states(session, listing.BUSY_STATES, batch_id=batch.id)


def refuse_paused(session: Session, batch: Batch) -> None:
    """``run`` of a batch its user paused, with jobs left to send and nothing to collect: a
    :class:`UsageError` (exit 2), raised before anything changes. Running it would send
    nothing, and a pause is ended by ``resume`` only (a pause fal's refusal or a full disk
    caused is ended by ``run`` itself: not this).

    A paused batch with requests at fal or videos being downloaded is not refused
    (:func:`paused_collecting`): those are paid for, and fal keeps a result for an hour only, so
    the run collects them — sending nothing — and then ends as a run the pause stopped does.

    Past its deadline the pause holds nothing back any more (``status`` shows it as
    ``deadline``): the run sends nothing either way, collects what fal made and ends the unsent
    jobs cancelled (reason ``deadline``), so it is not refused; refusing it said "`wanbatch
    resume`, then run again", and resuming changed nothing.
    """
    if not batch.paused_by_user or batch.state == BatchState.CANCELLED:
        return
    if store.batch_schedule(batch).over(utcnow()) is not None:
        return
    if paused_collecting(session, batch):
        return
    if store.count_in_states(session, UNFINISHED_STATES, batch_id=batch.id):
        now = utcnow()
        closed = paused_schedule_text(paused_schedule_state(PAUSED_BY_USER, store.batch_schedule(batch), now))
        raise UsageError(paused_line(batch.name, shell_ref(batch.name, batch.id), closed=closed))


def paused_collecting(session: Session, batch: Batch) -> int:
    """How many jobs a ``run`` of a batch its user paused collects without sending anything:
    requests at fal and videos being downloaded (0 when the batch is not held by its user's
    pause, as past its deadline, or cancelled). A run ends a pause fal's refusal or a full disk
    caused, so the downloads of such a batch count too."""
    if not batch.paused_by_user or batch.state == BatchState.CANCELLED:
        return 0
    if store.batch_schedule(batch).over(utcnow()) is not None:
        return 0
    return store.count_in_states(session, listing.BUSY_STATES, batch_id=batch.id)


def cancelled_collecting_line(name: str, collecting: int) -> str:
    """What a ``run`` of a cancelled batch says before it collects its jobs at fal or
    downloading (see :func:`cancelled_collecting`)."""
    return (
        f"batch {name} is cancelled (`wanbatch cancel`): nothing of it is sent; collecting its "
        f"{collecting} job(s) at fal or downloading (a video fal finished is paid for: it is "
        f"fetched), then this run stops"
    )


def collecting_line(name: str, ref: str, collecting: int) -> str:
    """What a ``run`` of a paused batch says before it collects what was paid for (see
    :func:`refuse_paused`): nothing is sent, what it waits for, and how the run ends."""
    return (
        f"batch {name} is paused (`wanbatch pause`): nothing of it is sent; collecting its "
        f"{collecting} job(s) at fal or downloading, then this run stops (`wanbatch resume {ref}` "
        "sends the rest)"
    )


def status(
    ref: str | None,
    settings: DatabaseSettings,
    caps: CapCheck | None = None,
    *,
    broker_url: str | None = None,
    gone: Callable[[str], bool] | None = None,
    silent: Mapping[str, datetime] | None = None,
    policy: str = DEFAULT_UNKNOWN_POLICY,
    here: listing.Here | None = None,
) -> list[BatchReport]:
    """Reports for one batch (``ref`` = id, id prefix or name) or, with no ref, for every batch;
    ``caps``: say which cap holds an active batch's submits back; ``broker_url``: the broker a
    broker outage names; ``gone``: processes known to have ended; ``silent``: workers whose
    Redis record went stale; ``policy``: ``WANBATCH_SUBMIT_UNKNOWN_POLICY``; ``here``: this
    process's API key id and fal queue origin (:func:`batch_report`)."""
    engine = open_engine(settings)
    with db.session_scope(engine) as session:
        if ref is not None:
            batch_id = store.get_batch(session, ref).id
            return [
                batch_report(
                    session,
                    batch_id,
                    caps=caps,
                    broker_url=broker_url,
                    gone=gone,
                    silent=silent,
                    policy=policy,
                    here=here,
                )
            ]
        # Every batch from a fixed number of grouped queries (not one report's ten per batch:
        # hundreds of scheduled batches made `status` take seconds), the same reports.
        now = utcnow()
        batches = store.list_batches(session)
        reads = _AllBatches(
            session,
            batches,
            now=now,
            api_key_id=caps.api_key_id if caps else None,
            origin=caps.origin if caps else None,
        )
        return [
            _report(
                batch,
                reads,
                now=now,
                caps=caps,
                broker_url=broker_url,
                gone=gone,
                silent=silent,
                policy=policy,
                here=here,
            )
            for batch in batches
        ]


@dataclass(frozen=True, slots=True)
class PauseResult:
    """What ``wanbatch pause`` / ``resume`` did to a batch, and the one line that says so."""

    batch_id: str
    name: str
    paused_by_user: bool
    #: False when the batch already was as asked (pausing a paused batch changes nothing).
    changed: bool
    state: str
    pause_reason: str | None
    #: Jobs fal holds or that are being downloaded (they go on), and jobs waiting to be sent.
    in_flight: int
    waiting: int
    schedule_state: str
    message: str
    #: The batch is another machine's project (:func:`manifest_elsewhere_text`); "" else.
    manifest_elsewhere_note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The ``pause --json`` / ``resume --json`` object."""
        return {
            "batch": self.batch_id,
            "name": self.name,
            "paused_by_user": self.paused_by_user,
            "changed": self.changed,
            "state": self.state,
            "pause_reason": self.pause_reason,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "schedule_state": self.schedule_state,
            "message": self.message,
            "manifest_elsewhere_note": self.manifest_elsewhere_note,
        }


def set_paused(ref: str, paused: bool, settings: DatabaseSettings) -> PauseResult:
    """``wanbatch pause BATCH`` (``paused``) or ``resume BATCH``: set or clear the user's pause.

    Pausing stops new submits of the batch in every worker (each dispatch round reads the flag);
    jobs fal already holds go on, finish and are downloaded. Only the flag changes: a batch that
    is ``paused`` because fal refused the account (or its outputs could not be written) stays so
    after ``resume`` (``run`` or submitting again ends that), and the message says so. Pausing a
    cancelled or finished batch, or resuming a cancelled one, is a :class:`UsageError`: there is
    nothing it could change. The batch's row is locked while it is checked and changed
    (:func:`jobs.store.lock_batch`), so concurrent calls answer as sequential ones would.
    """
    engine = open_engine(settings)
    with db.session_scope(engine) as session:
        # Locked: of concurrent pauses of one batch exactly one changes it, the others find it
        # paused already (changed: false), as they would one after the other.
        batch = store.lock_batch(session, ref)
        label = f"{batch.name} ({batch.id[:12]})"
        short = shell_ref(batch.name, batch.id)  # what to type in a hint
        counts = store.counts_by_state(session, batch.id)
        total = sum(counts.values())
        terminal = sum(counts[s.value] for s in JobState if s.terminal)
        if batch.state == BatchState.CANCELLED:
            if paused:
                raise UsageError(f"batch {label} is cancelled: nothing more is sent, so nothing to pause")
            raise UsageError(
                f"batch {label} is cancelled and cannot be resumed; "
                f"`wanbatch rerun {short} --failed-only{' --simulate' if batch.simulated else ''}` "
                "sends its unfinished jobs in a new batch"
            )
        if paused and total > 0 and terminal == total:
            raise UsageError(f"batch {label} is finished (all {total} jobs are done): nothing to pause")
        changed = batch.paused_by_user != paused
        if changed:
            store.set_paused_by_user(session, batch.id, paused)
        waiting = counts[JobState.PENDING.value] + counts[JobState.RETRY_WAIT.value]
        in_flight = total - terminal - waiting
        over: str | None = None  # resumed, but the schedule will never send again: why
        if paused:
            flying = f"; {in_flight} job(s) in flight finish and download" if in_flight else ""
            line = (
                f"paused batch {label}: no new jobs are sent{flying} (`wanbatch resume {short}` goes on)"
                if changed
                else f"batch {label} was already paused; nothing changed"
            )
        else:
            line, over = _resumed_line(
                batch, label, short, changed=changed, waiting=waiting, in_flight=in_flight, now=utcnow()
            )
        state = schedule_state(session, batch, finished=total > 0 and terminal == total, now=utcnow())
        if state and not paused and batch.state != BatchState.PAUSED and over is None:
            line += f"; schedule: {state}"
        return PauseResult(
            batch_id=batch.id,
            name=batch.name,
            paused_by_user=batch.paused_by_user,
            changed=changed,
            state=BatchState(batch.state).value,
            pause_reason=batch.pause_reason,
            in_flight=in_flight,
            waiting=waiting,
            schedule_state=state,
            message=line,
            manifest_elsewhere_note=manifest_elsewhere_text(batch),
        )


def _resumed_line(
    batch: Batch, label: str, short: str, *, changed: bool, waiting: int, in_flight: int, now: datetime
) -> tuple[str, str | None]:
    """What ``resume`` says, and why the schedule will never send again (None while it may).

    Resuming only clears the user's flag: a run or the workers send the jobs, not this command.
    A batch fal's refusal or its outputs paused stays paused, and a run (or submitting again)
    ends that — but past its deadline nothing is sent either way: the line says the deadline
    passed and that a run cancels the waiting jobs, never that something "resumes" them.
    """
    simulate = " --simulate" if batch.simulated else ""
    refused = batch.state == BatchState.PAUSED  # by fal's refusal, or its outputs
    schedule = store.batch_schedule(batch)
    past = schedule.past_deadline(now)
    # Past its deadline the workers' deadline step skips a paused batch: a run cancels its jobs.
    workers = "" if batch.simulated or (refused and past) else " (or the workers, with a broker)"
    sender = f"`wanbatch run {short}{simulate}`{workers}"
    over = schedule.over(now) if changed or (refused and past) else None
    if over is not None:
        # Past its deadline (or the window opens only after it): resuming sends nothing,
        # and "may be sent again" would promise what the deadline takes away.
        if not waiting:
            then = "nothing more is sent"
        else:
            then = f"its {waiting} waiting job(s) will never be sent; {sender} cancels them"
        head = f"resumed batch {label}" if changed else f"batch {label} was not paused by `wanbatch pause`"
        line = f"{head}, but {over}: {then}"
    elif changed:
        line = f"resumed batch {label}: {waiting} waiting job(s) may be sent again; {sender} sends them"
    else:
        line = f"batch {label} was not paused by `wanbatch pause`; nothing changed"
    if refused:
        reason = batch.pause_reason or "see the log"
        if past:  # nothing to resume: what is at fal is collected once the cause is fixed
            if in_flight:
                line += f"; it is also paused ({reason}): fix that for {sender} to collect "
                line += f"the {in_flight} job(s) at fal"
        else:
            line += f"; it is still paused ({reason}): `wanbatch run {short}{simulate}` or submitting "
            line += "its manifest again resumes that"
    return line, over
