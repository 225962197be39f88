"""Reading jobs: snapshots and heads of jobs, a batch's jobs in bounded pages, its diffs,
inputs and output folders, its events, counts by state and failure reasons."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, ColumnElement, Select, Text, and_, bindparam, func, or_, select
from sqlalchemy import cast as sa_cast
from sqlalchemy.orm import Session

from jobs.errors import NotFoundError
from jobs.models import (
    NOT_IN_MANIFEST,
    Batch,
    BatchState,
    Job,
    JobEvent,
    JobSnapshot,
    JSONDocument,
    KeyFreeText,
    utcnow,
)
from jobs.states import UNFINISHED_STATES, JobState
from jobs.store.batches import get_batch
from jobs.store.core import _JOBS, _prepared, _run, _sent_with, sent_to_origin
from jobs.store.transitions import _INSERT_EVENT, update_job_fields


def manifest_job_count(session: Session, batch_id: str) -> int:
    """How many of the batch's jobs the manifest it was last submitted from has (those not
    marked ``not_in_manifest``): what a manifest submitted from elsewhere would leave out."""
    found = session.scalar(
        select(func.count()).select_from(Job).where(Job.batch_id == batch_id, Job.not_in_manifest.is_(False))
    )
    return int(found or 0)


def job_snapshots(session: Session, job_ids: Collection[str]) -> dict[str, JobSnapshot]:
    """The jobs with these ids as :class:`JobSnapshot` (missing ones are left out), in one query.

    Every column, read as Core rows: what the conductor hands a completed job's download with.
    Loading the jobs as ORM objects for it was the largest share of applying a status stream's
    completions."""
    if not job_ids:
        return {}
    query = _prepared(
        ("job_snapshots",), lambda: select(*_JOBS.c).where(_JOBS.c.id.in_(bindparam("ids", expanding=True)))
    )
    return {row.id: JobSnapshot(**row._mapping) for row in _run(session, query, {"ids": sorted(job_ids)})}


def job_snapshot(session: Session, job_id: str) -> JobSnapshot:
    """One job as a :class:`JobSnapshot` (:func:`job_snapshots`): what a step that only reads
    it needs, without building an ORM object (its JSON columns decoded into tracked state)."""
    found = job_snapshots(session, (job_id,)).get(job_id)
    if found is None:
        raise NotFoundError(f"no job {job_id!r}")
    return found


@dataclass(frozen=True, slots=True)
class JobHead:
    """What a status event needs of a job: where it stands and which request it waits on."""

    id: str
    state: JobState
    version: int
    request_id: str | None
    batch_id: str
    submitted_at: datetime | None
    #: The API key (its id) the request was sent with, or last followed with (``Job.api_key_id``).
    api_key_id: str | None = None


#: At most this many ids are bound in one statement (one parameter each): PostgreSQL refuses a
#: statement past 65,535 parameters, and each one costs on every run of it.
IDS_PER_QUERY = 1000


def job_heads(session: Session, job_ids: Collection[str]) -> dict[str, JobHead]:
    """:class:`JobHead` of these jobs (missing ones are left out), in one query.

    A status stream reports a few requests at a time; loading whole jobs for it (their inputs,
    results and provider metadata, JSON to decode) was the largest share of applying it.
    """
    if not job_ids:
        return {}
    query = _prepared(
        ("job_heads",),
        lambda: select(
            Job.id, Job.state, Job.version, Job.request_id, Job.batch_id, Job.submitted_at, Job.api_key_id
        ).where(Job.id.in_(bindparam("ids", expanding=True))),
    )
    ids = sorted(job_ids)
    heads: dict[str, JobHead] = {}
    for start in range(0, len(ids), IDS_PER_QUERY):  # one bound parameter per id: bounded
        for row in _run(session, query, {"ids": ids[start : start + IDS_PER_QUERY]}):
            heads[row.id] = JobHead(
                row.id,
                JobState(row.state),
                row.version,
                row.request_id,
                row.batch_id,
                row.submitted_at,
                row.api_key_id,
            )
    return heads


@dataclass(frozen=True, slots=True)
class SubmitView:
    """What the submit step reads of a job and its batch before sending it (:func:`submit_view`)."""

    id: str
    state: JobState
    version: int
    endpoint: str
    input: dict[str, Any]
    submitted_input: dict[str, Any] | None
    attempts: int
    batch_id: str
    schedule: dict[str, Any] | None
    priority: str
    source_files: dict[str, Any] | None = None
    #: The batch's manifest (absolute), whose folder a refused input file is named relative to.
    manifest_path: str | None = None


def submit_view(session: Session, job_id: str) -> SubmitView:
    """:class:`SubmitView` of one job, in one query (``NotFoundError`` if there is none).

    A distributed worker's submit starts from the job and its batch as stored. Loading both as
    whole ORM objects took two queries and the mapping of every column (the job's provider
    metadata and results included); the submit needs these ten.
    """
    query = _prepared(
        ("submit_view",),
        lambda: (
            select(
                Job.id,
                Job.state,
                Job.version,
                Job.endpoint,
                Job.input,
                Job.submitted_input,
                Job.attempts,
                Job.batch_id,
                Batch.schedule,
                Batch.priority,
                Job.source_files,
                Batch.manifest_path,
            )
            .join(Batch, Batch.id == Job.batch_id)
            .where(Job.id == bindparam("job_id"))
        ),
    )
    row = _run(session, query, {"job_id": job_id}).first()
    if row is None:
        raise NotFoundError(f"no job {job_id!r}")
    return SubmitView(
        row.id,
        JobState(row.state),
        row.version,
        row.endpoint,
        row.input,
        row.submitted_input,
        row.attempts,
        row.batch_id,
        row.schedule,
        row.priority,
        row.source_files,
        row.manifest_path,
    )


def requests_at_fal(
    session: Session,
    *,
    states: Sequence[JobState],
    exclude_ids: Collection[str] = (),
    limit: int,
    batch_ids: Collection[str] | None = None,
    exclude_batch_ids: Collection[str] = (),
    sent_to: str | None = None,
) -> list[Job]:
    """Jobs in ``states`` whose request fal has (a request id is recorded), oldest first,
    leaving out ``exclude_ids``: what a status watcher should follow and does not yet. Only
    jobs of ``batch_ids`` (None: any batch) and of none of ``exclude_batch_ids``, and (``sent_to``)
    only requests sent to that fal queue origin or to one not recorded."""
    if limit <= 0 or (batch_ids is not None and not batch_ids):
        return []
    where: list[ColumnElement[bool]] = [Job.state.in_(list(states)), Job.request_id.is_not(None)]
    if batch_ids is not None:
        where.append(Job.batch_id.in_(sorted(batch_ids)))
    if exclude_batch_ids:
        where.append(Job.batch_id.not_in(sorted(exclude_batch_ids)))
    if sent_to is not None:
        where.append(sent_to_origin(sent_to))
    order = (Job.submitted_at, Job.id)
    if len(exclude_ids) <= IDS_PER_QUERY:  # the usual case: the streams open now, a few given up
        if exclude_ids:
            where.append(Job.id.not_in(sorted(exclude_ids)))
        return list(session.scalars(select(Job).where(*where).order_by(*order).limit(limit)))
    # More ids than a statement may bind (PostgreSQL refuses past 65,535 parameters): the first
    # ids in order, enough to find ``limit`` outside ``exclude_ids``, then those jobs.
    excluded = exclude_ids if isinstance(exclude_ids, set | frozenset) else set(exclude_ids)
    ids = session.scalars(select(Job.id).where(*where).order_by(*order).limit(limit + len(excluded)))
    chosen = [job_id for job_id in ids if job_id not in excluded][:limit]
    if not chosen:
        return []
    jobs = session.scalars(select(Job).where(Job.id.in_(chosen))).all()
    place = {job_id: n for n, job_id in enumerate(chosen)}
    return sorted(jobs, key=lambda job: place[job.id])


def handed_off(
    session: Session,
    *,
    queue_owner: str,
    now: datetime,
    batch_ids: Collection[str] | None = None,
    exclude_batch_ids: Collection[str] = (),
) -> tuple[list[str], list[str]]:
    """Jobs handed to a task that has not started yet, as ``(to submit, to download)``: claimed
    for a submit whose POST has not begun (``submitting``, no recorded input, lease running),
    and ``downloading`` under ``queue_owner`` (the lease of a download task still queued).
    Only jobs of ``batch_ids`` (None: any batch) and of none of ``exclude_batch_ids``."""
    if batch_ids is not None and not batch_ids:
        return [], []
    waiting_submit = (
        (Job.state == JobState.SUBMITTING) & Job.submitted_input.is_(None) & (Job.lease_expires_at > now)
    )
    waiting_download = (Job.state == JobState.DOWNLOADING) & (Job.lease_owner == queue_owner)
    query = select(Job.id, Job.state).where(waiting_submit | waiting_download)
    if batch_ids is not None:
        query = query.where(Job.batch_id.in_(sorted(batch_ids)))
    if exclude_batch_ids:
        query = query.where(Job.batch_id.not_in(sorted(exclude_batch_ids)))
    submits: list[str] = []
    downloads: list[str] = []
    for job_id, state in session.execute(query.order_by(Job.id)):
        (submits if state == JobState.SUBMITTING else downloads).append(job_id)
    return submits, downloads


def simulated_batch_ids(session: Session) -> frozenset[str]:
    """The batches made by ``run --simulate``: their requests are a simulator's, never fal's."""
    query = _prepared(("simulated-batch-ids",), lambda: select(Batch.id).where(Batch.simulated.is_(True)))
    return frozenset(row[0] for row in _run(session, query))


def batch_requests(
    session: Session, batch_id: str, states: Collection[JobState]
) -> list[tuple[str, str, Any, JobState, datetime | None, datetime | None, Any, Any]]:
    """``(endpoint, request id, submitted input, state, sent at, start timeout at, input, source
    files)`` of the batch's jobs in ``states`` that have a request at fal, oldest first (a
    ``--simulate`` run gives them back to its simulator). ``sent at``: when the request's POST
    went out (``sent_at``, else ``submitted_at``), what its start timeout was counted from;
    ``start timeout at``: when that start timeout ends, as recorded with the POST (None: it
    carried none, or was sent before schema 0030); ``input`` and ``source files``: the job's
    stored input (local files by path) and the SHA-256 of each file as validated."""
    query = (
        select(
            Job.endpoint,
            Job.request_id,
            Job.submitted_input,
            Job.state,
            func.coalesce(Job.sent_at, Job.submitted_at),
            Job.start_timeout_at,
            Job.input,
            Job.source_files,
        )
        .where(Job.batch_id == batch_id, Job.state.in_(sorted(states)), Job.request_id.is_not(None))
        .order_by(Job.submitted_at, Job.id)
    )
    return [
        (endpoint, request_id, data, JobState(state), sent, until, stored, sources)
        for endpoint, request_id, data, state, sent, until, stored, sources in session.execute(query)
    ]


#: The states of a simulation's job whose request an earlier ``--simulate`` run's simulator may
#: have finished unbeknown to the database (the run stopped first): :func:`note_simulated_finished`.
_UNSEEN_FINISH_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING)


def simulated_results(session: Session, batch_id: str) -> dict[str, dict[str, Any] | None]:
    """The results an earlier ``--simulate`` run knew of for the simulation ``batch_id``'s
    finished requests, by request id; empty for a batch sent to fal: those of its
    ``downloading`` jobs as that run fetched them from its own simulator (None: not fetched
    yet), and those its simulator finished while the database still had them ``queued``,
    ``running`` or ``cancelling`` (the run stopped before it learnt of it), as that run
    recorded them once its simulator had stopped (:func:`note_simulated_finished`: the seed
    only). Read by the next ``--simulate`` run, which gives those requests back to its simulator
    finished (:func:`forget_simulated_results`)."""
    if not get_batch(session, batch_id).simulated:
        return {}
    finished = or_(
        Job.state == JobState.DOWNLOADING,
        # written so by a version before the note (a job's ``provider_output`` held it)
        and_(Job.state.in_(sorted(_UNSEEN_FINISH_STATES)), Job.provider_output.is_not(None)),
    )
    query = select(Job.request_id, Job.provider_output).where(
        Job.batch_id == batch_id, finished, Job.request_id.is_not(None)
    )
    results = {request_id: output for request_id, output in session.execute(query)}
    notes = (
        select(Job.request_id, JobEvent.details)
        .join(JobEvent, JobEvent.job_id == Job.id)
        .where(
            Job.batch_id == batch_id,
            Job.state.in_(sorted(_UNSEEN_FINISH_STATES)),
            Job.request_id.is_not(None),
            JobEvent.from_state == JobEvent.to_state,
            JobEvent.reason.startswith(_SIMULATOR_FINISHED_REASON),
        )
    )
    for request_id, details in session.execute(notes):
        if isinstance(details, dict) and details.get(SIMULATOR_FINISHED) == request_id:
            results[request_id] = {"seed": details.get("seed")}
    return results


#: The key of a :func:`note_simulated_finished` note's details naming the request it is about
#: (its ``seed`` beside it), and the words its reason begins with.
SIMULATOR_FINISHED = "simulator_finished"
_SIMULATOR_FINISHED_REASON = "finished by the simulator of a stopped --simulate run"


def note_simulated_finished(session: Session, finished: Mapping[str, int | None]) -> int:
    """Record, on the simulations' jobs still ``queued``, ``running`` or ``cancelling`` whose
    request is in ``finished`` (request id → the seed its result carried), that the simulator of
    the ``--simulate`` run that sent it finished it (successfully, and billed it) before it
    stopped: a note on the job's history (an event that moves nothing, once per request) whose
    details name the request and the seed its result carried (:data:`SIMULATOR_FINISHED`). The
    next ``--simulate`` run then gives them to its own simulator finished
    (:func:`simulated_results`), the same video unbilled, instead of running and billing them a
    second time. Never the job's ``provider_output``: that holds what its own request returned
    once the job fetched it, and the job has fetched nothing yet. A batch sent to fal is never
    touched. Returns how many were recorded."""
    if not finished:
        return 0
    query = (
        select(Job.id, Job.version, Job.state, Job.request_id)
        .join(Batch, Batch.id == Job.batch_id)
        .where(
            Batch.simulated.is_(True),
            Job.state.in_(sorted(_UNSEEN_FINISH_STATES)),
            Job.request_id.in_(sorted(finished)),
        )
    )
    noted = 0
    for job_id, version, state, request_id in session.execute(query).all():
        reason = f"{_SIMULATOR_FINISHED_REASON} before it learnt of it: request {request_id}"
        known = select(JobEvent.id).where(JobEvent.job_id == job_id, JobEvent.reason == reason)
        if request_id is None or session.scalar(known.limit(1)) is not None:
            continue
        details = {SIMULATOR_FINISHED: request_id, "seed": finished[request_id]}
        event = {"job_id": job_id, "at": utcnow(), "from_state": state, "to_state": state}
        event.update(version=version, reason=reason, details=details, worker=None)
        _run(session, _INSERT_EVENT, event)
        noted += 1
    return noted


def forget_simulated_results(session: Session, batch_id: str, request_ids: Collection[str]) -> int:
    """Forget the results an earlier ``--simulate`` run knew of for the simulation
    ``batch_id``'s finished requests of ``request_ids`` (:func:`simulated_results`): their videos'
    URLs name that run's simulator, gone with it; the next download asks this run's simulator,
    which was given the requests back finished, for the result again (never run or billed anew).
    A batch sent to fal is never touched: fal's stored result is used as it is. Returns how many
    were forgotten."""
    if not request_ids or not get_batch(session, batch_id).simulated:
        return 0
    query = select(Job.id, Job.version).where(
        Job.batch_id == batch_id,
        Job.state.in_(sorted((JobState.DOWNLOADING, *_UNSEEN_FINISH_STATES))),
        Job.request_id.in_(sorted(request_ids)),
        Job.provider_output.is_not(None),
    )
    return sum(
        update_job_fields(session, job_id, expected_version=version, provider_output=None)
        for job_id, version in session.execute(query).all()
    )


def get_job(session: Session, job_id: str) -> Job:
    """One job by id, freshly read (never a stale copy from the session)."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFoundError(f"no job {job_id!r}")
    return job


def jobs_of_batch(
    session: Session, batch_id: str, *, states: Sequence[JobState] | None = None
) -> Iterator[Job]:
    """A batch's jobs in item order, then matrix combination, streamed (server-side cursor on
    PostgreSQL)."""
    query = select(Job).where(Job.batch_id == batch_id)
    if states is not None:
        query = query.where(Job.state.in_(list(states)))
    query = query.order_by(Job.item_index, Job.variant, Job.created_at, Job.id)
    query = query.execution_options(yield_per=500)
    yield from session.scalars(query)


#: Rows a bounded read (:func:`jobs_of_batch_bounded`, …) reads in one page, at most.
READ_PAGE_ROWS = 500
#: Characters of JSON and text columns a bounded read holds in one page, about (a page holds at
#: least one row, whatever its size): an input with an inline image (a data URI) is hundreds of
#: KB to several MB, and :data:`READ_PAGE_ROWS` of those would be gigabytes.
READ_PAGE_BYTES = 4 * 1024 * 1024

#: The job's columns of unbounded size (JSON and text), what a page's size is counted from.
_JOB_SIZED_COLUMNS = tuple(
    c for c in _JOBS.columns if isinstance(c.type, JSONDocument | JSON | Text | KeyFreeText)
)

_JOB_ORDER = (Job.item_index, Job.variant, Job.created_at, Job.id)


def _size_of(columns: Sequence[Any]) -> ColumnElement[int]:
    """SQL for the characters ``columns`` hold together (JSON as its text; NULL as 0): SQLite's
    ``length`` of the stored text, PostgreSQL's of the value cast to text."""
    sizes = [func.coalesce(func.length(sa_cast(c, Text)), 0) for c in columns]
    return functools.reduce(lambda a, b: a + b, sizes)


def _pages_of(session: Session, keys: Select[str, int]) -> Iterator[list[str]]:
    """The ids ``keys`` selects (``(id, size)`` rows, in order), in pages of at most
    :data:`READ_PAGE_ROWS` rows and about :data:`READ_PAGE_BYTES` of ``size`` (one row at
    least). The ids stream (server-side cursor on PostgreSQL); each page is read by its own
    statement while they do, so only one page of the wide rows is held at a time."""
    page: list[str] = []
    held = 0
    for job_id, size in session.execute(keys.execution_options(yield_per=READ_PAGE_ROWS)):
        if page and (len(page) >= READ_PAGE_ROWS or held + size > READ_PAGE_BYTES):
            yield page
            page, held = [], 0
        page.append(job_id)
        held += size
    if page:
        yield page


def jobs_of_batch_bounded(
    session: Session, batch_id: str, *, states: Sequence[JobState] | None = None
) -> Iterator[Job]:
    """:func:`jobs_of_batch`, for a reader that only reads (an export): held in memory a page at
    a time bounded in bytes as well as rows (:func:`_pages_of`), not 500 whole rows whatever
    their size; each job is expunged from ``session`` once the next one is asked for, so
    nothing keeps the earlier pages alive. Meant for a read-only session (``db.read_scope``):
    a job the caller read before in ``session`` is expunged as well."""
    where = [Job.batch_id == batch_id]
    if states is not None:
        where.append(Job.state.in_(list(states)))
    keys = select(Job.id, _size_of(_JOB_SIZED_COLUMNS)).where(*where).order_by(*_JOB_ORDER)
    for ids in _pages_of(session, keys):
        page = list(session.scalars(select(Job).where(Job.id.in_(ids), *where).order_by(*_JOB_ORDER)))
        while page:
            job = page.pop(0)
            yield job
            session.expunge(job)


def _rows_bounded(
    session: Session, columns: Sequence[Any], where: Sequence[ColumnElement[bool]], sized: Sequence[Any]
) -> Iterator[Any]:
    """``select(*columns).where(*where)`` in the order of :func:`jobs_of_batch`, as Core rows,
    read in pages bounded by the size of the ``sized`` columns (:func:`_pages_of`)."""
    keys = select(Job.id, _size_of(sized)).where(*where).order_by(*_JOB_ORDER)
    for ids in _pages_of(session, keys):
        page = list(session.execute(select(*columns).where(Job.id.in_(ids), *where).order_by(*_JOB_ORDER)))
        while page:
            yield page.pop(0)


@dataclass(frozen=True, slots=True)
class DiffRow:
    """The columns of one job that ``diff`` compares (:func:`diff_rows_of_batch`): no ORM row,
    and none of the JSON columns it does not read (``submitted_input``, provider output, …)."""

    id: str
    job_key: str
    item_index: int
    variant: int
    endpoint: str
    state: JobState
    seed: int | None
    actual_prompt: str | None
    output_sha256: str | None
    actual_usd: Decimal | None
    rerun_of: str | None
    reused_from: str | None
    input: dict[str, Any]
    source_files: dict[str, Any] | None
    #: Where the video was recorded and its size: what ``diff`` looks at on disk.
    output_path: str | None = None
    output_bytes: int | None = None
    #: Requests sent for the job: a pair whose costs differ may owe it to a billed failed attempt.
    attempts: int | None = None


def diff_rows_of_batch(session: Session, batch_id: str) -> Iterator[DiffRow]:
    """A batch's jobs as ``diff`` reads them (:class:`DiffRow`), in the order of
    :func:`jobs_of_batch`, streamed in pages bounded in bytes (an input may hold an inline image)."""
    columns = (
        Job.id,
        Job.job_key,
        Job.item_index,
        Job.variant,
        Job.endpoint,
        Job.state,
        Job.seed,
        Job.actual_prompt,
        Job.output_sha256,
        Job.actual_usd,
        Job.rerun_of,
        Job.reused_from,
        Job.input,
        Job.source_files,
        Job.output_path,
        Job.output_bytes,
        Job.attempts,
    )
    sized = (Job.actual_prompt, Job.input, Job.source_files)
    for row in _rows_bounded(session, columns, [Job.batch_id == batch_id], sized):
        yield DiffRow(*tuple(row))


@dataclass(frozen=True, slots=True)
class RecordedOutput:
    """A succeeded job's recorded video (:func:`recorded_outputs_of_batch`): what ``status``,
    ``refetch`` and an ``hf`` export look for on disk, and nothing else of the job."""

    id: str
    item_index: int
    output_path: str | None
    output_sha256: str | None
    output_bytes: int | None


def recorded_outputs_of_batch(session: Session, batch_id: str) -> Iterator[RecordedOutput]:
    """The batch's succeeded jobs that record a video, in the order of :func:`jobs_of_batch`:
    a few short columns per job, so that ``status`` can look at a batch of 100,000.

    One ordered statement, streamed :data:`READ_PAGE_ROWS` rows at a time (a server-side
    cursor on PostgreSQL), not :func:`_rows_bounded`'s page of ids after page of ids: each of
    those statements is filtered by the batch too, which SQLite (no statistics) answers by
    walking the batch's whole index again for every page of 500 — about 20 s for 100,000 jobs,
    on every ``status``. These columns are short (a path, a digest): no page needs bounding in
    bytes."""
    query = (
        select(Job.id, Job.item_index, Job.output_path, Job.output_sha256, Job.output_bytes)
        .where(Job.batch_id == batch_id, Job.state == JobState.SUCCEEDED, Job.output_path.is_not(None))
        .order_by(*_JOB_ORDER)
        .execution_options(yield_per=READ_PAGE_ROWS)
    )
    for job_id, item_index, output_path, sha256, size in session.execute(query):
        yield RecordedOutput(job_id, item_index, output_path, sha256, size)


def item_inputs_of_batch(
    session: Session, batch_id: str, items: Collection[int]
) -> Iterator[tuple[str, int, str, dict[str, Any]]]:
    """``(job id, item_index, endpoint, input)`` of a batch's jobs of the items ``items``, in
    the order of :func:`jobs_of_batch`, streamed: what ``diff``'s table reads to name the fields
    that tell an item's jobs apart, for the rows it shows."""
    if not items:
        return
    where = [Job.batch_id == batch_id, Job.item_index.in_(sorted(set(items)))]
    columns = (Job.id, Job.item_index, Job.endpoint, Job.input)
    for row in _rows_bounded(session, columns, where, [Job.input]):
        job_id, item_index, endpoint, given = row
        yield job_id, item_index, endpoint, given


def keyed_inputs_of_batch(
    session: Session, batch_id: str, items: Collection[int]
) -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any] | None]]:
    """``(job id, endpoint, input, source_files)`` of a batch's jobs of the items ``items``, in
    the order of :func:`jobs_of_batch`, streamed in pages bounded in bytes: what ``diff`` reads
    to name the input fields that differ between two jobs paired by origin or by place."""
    if not items:
        return
    where = [Job.batch_id == batch_id, Job.item_index.in_(sorted(set(items)))]
    columns = (Job.id, Job.endpoint, Job.input, Job.source_files)
    for row in _rows_bounded(session, columns, where, [Job.input, Job.source_files]):
        job_id, endpoint, given, sources = row
        yield job_id, endpoint, given, sources


def media_inputs_of_batch(session: Session, batch_id: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Each job of a batch that names media files: its input and its ``source_files``, streamed
    (what :func:`jobs.export.refuse_own_file` looks the local files up in), in pages bounded
    in bytes (an input may hold an inline image)."""
    where = [Job.batch_id == batch_id, Job.source_files.is_not(None)]
    sized = (Job.input, Job.source_files)
    for given, sources in _rows_bounded(session, (Job.input, Job.source_files), where, sized):
        if isinstance(given, dict) and isinstance(sources, dict):
            yield given, sources


#: How many folders :func:`output_folders_of_batch` finds one query each before it lists the rest.
OUTPUT_FOLDER_PROBES = 16


def output_folders_of_batch(session: Session, batch_id: str) -> list[str]:
    """The distinct folders the recorded outputs of a batch's jobs lie in (each ``output_path``
    up to its last ``/``: a local folder, or an ``s3://bucket/prefix``), as recorded, in no set
    order; what :func:`jobs.export_target.refuse_own_file` keeps an export out of.

    A batch's videos and their sidecars share a folder or a few (another ``WANBATCH_OUTPUT_DIR``
    for a later run, a reused job's source batch): each is found by one query that skips every
    output inside the folders found before (an index range on the batch, no row sent back but
    one), so a 100,000-job batch costs a few such queries, not 100,000 rows. Past
    :data:`OUTPUT_FOLDER_PROBES` folders the remaining outputs are listed once instead. A
    recorded path without a ``/`` has no folder and is skipped."""
    folders: list[str] = []
    query = select(Job.output_path).where(Job.batch_id == batch_id, Job.output_path.is_not(None))
    for _ in range(OUTPUT_FOLDER_PROBES):
        found = session.execute(query.limit(1)).scalar_one_or_none()
        if found is None:
            return folders
        folder, slash, _name = found.rpartition("/")
        if not slash:
            query = query.where(Job.output_path != found)
            continue
        folders.append(folder)
        prefix = folder + "/"
        # An exact comparison (LIKE is case-insensitive in SQLite and needs escaping).
        query = query.where(func.substr(Job.output_path, 1, len(prefix)) != prefix)
    rest = {
        path.rpartition("/")[0]
        for path in session.execute(query.execution_options(yield_per=1000)).scalars()
        if path is not None and "/" in path
    }
    return folders + sorted(rest)


def job_events(session: Session, job_id: str) -> list[JobEvent]:
    """A job's history, oldest first."""
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def seen_running_since_submit(session: Session, job_id: str) -> bool:
    """Whether the job's history since its last move into ``submitting`` (its current attempt)
    has it ``running`` (fal said IN_PROGRESS): then its request ran, and a cancel of it is billed
    as running whatever fal's metrics say (they can be missing)."""
    for step in reversed(job_events(session, job_id)):
        if JobState.RUNNING in (step.to_state, step.from_state):
            return True
        if step.to_state == JobState.SUBMITTING:  # the current attempt began here
            return False
    return False


def counts_by_state(session: Session, batch_id: str | None = None) -> dict[str, int]:
    """Jobs per state (every state present, 0 when none), for one batch or all."""

    def build() -> Any:
        query = select(Job.state, func.count()).group_by(Job.state)
        return query if batch_id is None else query.where(Job.batch_id == bindparam("batch_id"))

    query = _prepared(("counts_by_state", batch_id is not None), build)
    counts = {state.value: 0 for state in JobState}
    for state, count in session.execute(query, {"batch_id": batch_id}):
        counts[JobState(state).value] = int(count)
    return counts


@dataclass(frozen=True)
class BatchPulse:
    """A batch's state, whether its user paused it, and how many of its jobs are unfinished:
    what a ``run`` that shows no progress reads between its full reads (:func:`batch_pulse`)."""

    state: str
    paused_by_user: bool
    unfinished: int

    @property
    def goes_on(self) -> bool:
        """Nothing a run's end depends on is in sight: the batch is active, not paused by its user,
        and has unfinished jobs. Otherwise (finished, paused, cancelled) the full read decides."""
        return self.state == BatchState.ACTIVE.value and not self.paused_by_user and self.unfinished > 0


def batch_pulse(session: Session, batch_id: str) -> BatchPulse | None:
    """:class:`BatchPulse` of ``batch_id`` in one statement (None when there is no such batch):
    a fraction of the full progress read (its counts by state, money, forecast, notes), which a
    run that shows no progress needs only when the batch may end."""
    query = _prepared(
        ("batch_pulse",),
        lambda: select(
            Batch.state,
            Batch.paused_by_user,
            select(func.count())
            .select_from(Job)
            .where(Job.batch_id == Batch.id, Job.state.in_(UNFINISHED_STATES))
            .scalar_subquery(),
        ).where(Batch.id == bindparam("batch_id")),
    )
    row = _run(session, query, {"batch_id": batch_id}).first()
    if row is None:
        return None
    return BatchPulse(BatchState(row[0]).value, bool(row[1]), int(row[2] or 0))


def video_bytes_per_job(session: Session, batch_id: str) -> int | None:
    """What one stored video of ``batch_id`` takes, on average: from its own succeeded jobs, else
    from every succeeded job of a batch sent to fal (a simulation's placeholders are tiny), else
    None (nothing stored yet to tell)."""
    stored = (
        select(func.avg(Job.output_bytes))
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.state == JobState.SUCCEEDED, Job.output_bytes.is_not(None), Job.reused_from.is_(None))
    )
    for query in (stored.where(Job.batch_id == batch_id), stored.where(Batch.simulated.is_(False))):
        average = session.scalar(query)
        if average is not None:
            return int(average)
    return None


@dataclass(frozen=True, slots=True)
class FailureGroup:
    """Jobs of a batch that ended failed or cancelled the same way (:func:`failure_reasons`).

    ``sent``: whether a request of theirs went to fal (``submitted_at``): the same
    ``error_type`` covers jobs fal held and jobs never sent (the deadline cancels both, and so
    does a user's cancel), and one group's example would tell the other's story."""

    state: str
    error_type: str | None
    sent: bool
    example: str
    count: int
    #: How many different errors the group's jobs have: ``example`` is one of them, and it can
    #: hide the others (files 'a.png' and 'b.png' both changed, but the example names one).
    distinct: int = 1
    #: When ``distinct`` > 1, the group's commonest errors with their job counts (most jobs
    #: first, at most :data:`FAILURE_ERRORS_KEPT`), for a summary that names them all
    #: (:mod:`jobs.failure_summary`); empty otherwise.
    errors: tuple[tuple[str, int], ...] = ()

    @property
    def summary(self) -> str:
        """The line shown for the group: ``example``, or, when its jobs' errors differ, one that
        names them all (every file of ``media file '…' changed since …``)."""
        from jobs.failure_summary import failure_summary

        return failure_summary(self.example, self.errors, self.distinct)


#: Distinct errors read per failure group that has more than one: enough for a summary to name
#: the first few and count the rest, bounded however many different errors the jobs have.
FAILURE_ERRORS_KEPT = 50

#: The jobs :func:`failure_reasons` groups: failed or cancelled, and still in the manifest.
_FAILED_IN_MANIFEST = (
    Job.state.in_([JobState.FAILED, JobState.CANCELLED]),
    Job.not_in_manifest.is_(False),
)


def failure_reasons(session: Session, batch_id: str, *, limit: int = 5) -> list[FailureGroup]:
    """The commonest reasons jobs ended failed or cancelled, by state, ``error_type`` and
    whether they were sent, each with one of its jobs' errors as its example. Jobs of the
    manifest only: one it no longer has (``Job.not_in_manifest``: an item fixed, or removed) is
    no failure of the batch now, and ``status`` counts those apart."""
    sent = Job.submitted_at.is_not(None)
    query = (
        select(
            Job.state,
            Job.error_type,
            sent,
            func.min(Job.error),
            func.count(),
            func.max(Job.error),
        )
        .where(Job.batch_id == batch_id, *_FAILED_IN_MANIFEST)
        .group_by(Job.state, Job.error_type, sent)
        .order_by(func.count().desc(), Job.state, Job.error_type, sent)
        .limit(limit)
    )
    groups = [_failure_group(*row) for row in session.execute(query)]
    return _with_errors(session, {batch_id: groups})[batch_id]


def failure_reasons_of_batches(
    session: Session, batch_ids: Collection[str], *, limit: int = 5
) -> dict[str, list[FailureGroup]]:
    """:func:`failure_reasons` of each of ``batch_ids`` (batches with none left out), in one
    query: each batch's groups ranked as :func:`failure_reasons` orders them (by the database,
    so that NULLs sort as they do there), its first ``limit`` kept."""
    if not batch_ids:
        return {}
    sent = Job.submitted_at.is_not(None)
    rank = func.row_number().over(
        partition_by=Job.batch_id, order_by=(func.count().desc(), Job.state, Job.error_type, sent)
    )
    ranked = (
        select(
            Job.batch_id.label("batch_id"),
            Job.state.label("state"),
            Job.error_type.label("error_type"),
            sent.label("sent"),
            func.min(Job.error).label("example"),
            func.count().label("n"),
            func.max(Job.error).label("last"),
            rank.label("rank"),
        )
        .where(Job.batch_id.in_(sorted(batch_ids)), *_FAILED_IN_MANIFEST)
        .group_by(Job.batch_id, Job.state, Job.error_type, sent)
        .subquery()
    )
    query = (
        select(
            ranked.c.batch_id,
            ranked.c.state,
            ranked.c.error_type,
            ranked.c.sent,
            ranked.c.example,
            ranked.c.n,
            ranked.c.last,
        )
        .where(ranked.c.rank <= limit)
        .order_by(ranked.c.batch_id, ranked.c.rank)
    )
    found: dict[str, list[FailureGroup]] = {}
    for batch_id, *group in session.execute(query):
        found.setdefault(str(batch_id), []).append(_failure_group(*group))
    return _with_errors(session, found)


def _failure_group(
    state: str, error_type: str | None, sent: bool, example: str | None, count: int, last: str | None
) -> FailureGroup:
    """One row of :func:`failure_reasons`' grouping query (its least error the example, its
    greatest telling one error from several) as a :class:`FailureGroup`."""
    return FailureGroup(
        state=JobState(state).value,
        error_type=error_type,
        sent=bool(sent),
        example=example or "",
        count=int(count),
        distinct=_at_least(example, last),
    )


def _at_least(first: str | None, last: str | None) -> int:
    """How many distinct errors a group has, as far as its least and greatest tell: 0 (none),
    1, or 2 for "several" — :func:`_with_errors` counts those exactly. ``min``/``max`` cost the
    grouping query next to nothing; ``count(DISTINCT error)`` sorted every group's errors on every
    ``status`` (3.5× the query on a batch of 300,000 failed jobs), where most groups have one."""
    if first is None:
        return 0
    return 1 if first == last else 2


def _with_errors(session: Session, found: dict[str, list[FailureGroup]]) -> dict[str, list[FailureGroup]]:
    """``found`` with each group of several distinct errors given its commonest ones
    (:attr:`FailureGroup.errors`): one more query, over the batches that have such a group only
    (most have none: a failure's text rarely varies within its ``error_type``)."""
    wanted = {batch_id for batch_id, groups in found.items() if any(g.distinct > 1 for g in groups)}
    if not wanted:
        return found
    sent = Job.submitted_at.is_not(None)
    per_group = (Job.batch_id, Job.state, Job.error_type, sent)
    rank = func.row_number().over(partition_by=per_group, order_by=(func.count().desc(), Job.error))
    ranked = (
        select(
            Job.batch_id.label("batch_id"),
            Job.state.label("state"),
            Job.error_type.label("error_type"),
            sent.label("sent"),
            Job.error.label("error"),
            func.count().label("n"),
            rank.label("rank"),
            # rows of the group once grouped by error: its distinct errors, counted exactly
            func.count().over(partition_by=per_group).label("kinds"),
        )
        .where(Job.batch_id.in_(sorted(wanted)), Job.error.is_not(None), *_FAILED_IN_MANIFEST)
        .group_by(*per_group, Job.error)
        .subquery()
    )
    c = ranked.c
    query = (
        select(c.batch_id, c.state, c.error_type, c.sent, c.error, c.n, c.kinds)
        .where(c.rank <= FAILURE_ERRORS_KEPT)
        .order_by(c.batch_id, c.state, c.error_type, c.sent, c.rank)
    )
    errors: dict[tuple[str, str, str | None, bool], list[tuple[str, int]]] = {}
    kinds: dict[tuple[str, str, str | None, bool], int] = {}
    for batch_id, st, et, was_sent, error, n, k in session.execute(query):
        key = (str(batch_id), JobState(st).value, et, bool(was_sent))
        errors.setdefault(key, []).append((str(error), int(n)))
        kinds[key] = int(k)
    return {
        batch_id: [
            dataclasses.replace(
                g,
                errors=tuple(errors.get(key, ())),
                distinct=kinds.get(key, g.distinct),
            )
            if g.distinct > 1
            else g
            for g in groups
            for key in [(batch_id, g.state, g.error_type, g.sent)]
        ]
        for batch_id, groups in found.items()
    }


def count_in_states(
    session: Session,
    states: Iterable[JobState],
    *,
    batch_id: str | None = None,
    api_key_id: str | None = None,
) -> int:
    """How many jobs are in ``states`` (e.g. ``AT_PROVIDER_STATES`` for the outstanding cap),
    optionally of one batch or sent with one API key."""

    def build() -> Any:
        query = (
            select(func.count()).select_from(Job).where(Job.state.in_(bindparam("states", expanding=True)))
        )
        if batch_id is not None:
            query = query.where(Job.batch_id == bindparam("batch_id"))
        if api_key_id is not None:
            query = query.where(_sent_with(bindparam("api_key_id")))
        return query

    query = _prepared(("count_in_states", batch_id is not None, api_key_id is not None), build)
    params = {"states": list(states), "batch_id": batch_id, "api_key_id": api_key_id}
    return int(_run(session, query, params).scalar() or 0)


def count_repeated(
    session: Session, batch_id: str, *, states: Sequence[JobState] | None, failed_only: bool
) -> int:
    """How many jobs of ``batch_id`` a rerun repeats, before ``--vary`` multiplies them: those in
    ``states`` (None: every job) less those it leaves out because the batch's manifest no longer
    has them — ``failed_only`` (``--failed-only``) every one marked ``not_in_manifest``, a plain
    rerun those a resubmit dropped (``cancelled``, ``error_type`` :data:`NOT_IN_MANIFEST`).
    :func:`jobs.rerun.rerun_batch` picks them row by row, but its size check refuses before a
    row is built, so it counts them here by the same rule: counted by state alone, the jobs it
    leaves out counted towards the limit, and a rerun that fitted was refused."""
    query = select(func.count()).select_from(Job).where(Job.batch_id == batch_id)
    if states is not None:
        query = query.where(Job.state.in_(list(states)))
    if failed_only:
        query = query.where(Job.not_in_manifest.is_(False))
    else:  # IS DISTINCT FROM: error_type is mostly NULL, and "!=" would leave those jobs out too
        query = query.where(
            or_(Job.state != JobState.CANCELLED, Job.error_type.is_distinct_from(NOT_IN_MANIFEST))
        )
    return int(session.scalar(query) or 0)


@dataclass(frozen=True, slots=True)
class UnfinishedBatch:
    """A batch with jobs not yet terminal: its flags and those jobs by state."""

    state: BatchState
    paused_by_user: bool
    counts: dict[JobState, int]


def unfinished_batches(session: Session) -> dict[str, UnfinishedBatch]:
    """Every batch with a job not yet terminal, in one query over those jobs only."""
    rows = session.execute(
        select(Job.batch_id, Batch.state, Batch.paused_by_user, Job.state, func.count())
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.state.in_(UNFINISHED_STATES))
        .group_by(Job.batch_id, Batch.state, Batch.paused_by_user, Job.state)
    )
    out: dict[str, UnfinishedBatch] = {}
    for batch_id, batch_state, by_user, job_state, n in rows:
        found = out.setdefault(batch_id, UnfinishedBatch(BatchState(batch_state), bool(by_user), {}))
        found.counts[JobState(job_state)] = int(n)
    return out
