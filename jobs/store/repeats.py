"""Reruns' repeats: the jobs of a rerun that repeat another job's input, and cancelling the
repeats not yet sent once the job they repeat kept fal's request."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ColumnElement, and_, case, null, or_, select, true, type_coerce, union
from sqlalchemy.orm import Session, aliased

from jobs.models import Batch, BatchState, Job, JobRecord
from jobs.states import UNFINISHED_STATES, JobState
from jobs.store.transitions import Fence, _move

#: What a rerun's job cancelled before its POST says: the job it repeats kept fal's request of
#: the same input after all, proved late (a submit's late answer, fal's webhook: every adoption
#: of a failed or cancelled job, :mod:`jobs.store.proofs`), and gets its video from it, so
#: sending the rerun's would pay twice.
REPEAT_NOT_SENT_ERROR = "original_kept_late_request"


@dataclass(frozen=True, slots=True)
class RerunRepeat:
    """One job of a later rerun (any generation) that repeats a job of an earlier batch: what
    :func:`rerun_repeats` gives, for ``rerun --failed-only`` and ``status`` to tell which failed
    or cancelled jobs a rerun already rendered, or is rendering still."""

    job_id: str
    #: The job it repeats: one of the batch's own, or a repeat of an earlier generation.
    rerun_of: str
    batch_id: str
    batch_name: str
    simulated: bool
    state: JobState
    input: dict[str, Any]
    endpoint: str = ""
    #: Where its images came from (:attr:`Job.source_files`): what its input asks, by content.
    source_files: dict[str, Any] | None = None
    #: Its batch was cancelled (``wanbatch cancel``): its unsent jobs are never sent.
    batch_cancelled: bool = False
    #: Its batch was paused by ``wanbatch pause``: nothing of it is sent until ``resume``.
    batch_paused: bool = False
    #: Its batch's schedule (:attr:`Batch.schedule`, as stored): a rerun keeps its parent's
    #: window, and while that is closed nothing of it is sent (``status`` says until when).
    batch_schedule: dict[str, Any] | None = None
    #: The machine its batch's manifest is on (:attr:`Batch.manifest_host`: for a rerun, the one
    #: ``rerun`` made it on), None when not recorded: where ``wanbatch run`` of it goes on.
    batch_manifest_host: str | None = None
    #: When its batch was made (:attr:`Batch.created_at`): a rerun made before the batch asked
    #: about (a sibling) rendered its jobs' inputs already, not since.
    batch_created_at: datetime | None = None

    @property
    def succeeded(self) -> bool:
        """Its video was rendered (and paid for, unless simulated)."""
        return self.state == JobState.SUCCEEDED


#: What :func:`rerun_repeats` reads of each repeat, in :func:`_repeat`'s order.
_REPEAT_COLUMNS = (
    Job.id,
    Job.rerun_of,
    Job.batch_id,
    Batch.name,
    Batch.simulated,
    Job.state,
    Job.input,
    Job.endpoint,
    Job.source_files,
    Batch.state,
    Batch.paused_by_user,
    Batch.schedule,
    Batch.manifest_host,
    Batch.created_at,
)


#: The states of a repeat that covers the job it repeats (:func:`covering`): rendered, or still
#: to be sent or collected (not terminal, not being cancelled).
_COVERING_STATES = (JobState.SUCCEEDED, *(s for s in UNFINISHED_STATES if s != JobState.CANCELLING))


def covering(simulated: bool | None = None) -> ColumnElement[bool]:
    """SQL for a repeat (a job joined to its batch) that covers the job it repeats, as
    :func:`jobs.rendered.still_rendering` and :attr:`RerunRepeat.succeeded` judge it in Python:
    succeeded, or unfinished (not being cancelled) in a batch not cancelled; with ``simulated``,
    in a batch of that kind only. Every other repeat is skipped by ``rerun --failed-only`` and
    ``status``, so reading it (its input decoded, its key computed) was wasted."""
    unfinished = and_(Job.state.in_(list(_COVERING_STATES[1:])), Batch.state != BatchState.CANCELLED)
    test = or_(Job.state == JobState.SUCCEEDED, unfinished)
    return test if simulated is None else and_(test, Batch.simulated == simulated)


#: The columns of :data:`_REPEAT_COLUMNS` of unbounded size (JSON, decoded when read): what
#: :func:`lineage_repeats_of_batches` reads only of the repeats that cover.
_HEAVY_COLUMNS = (Job.input, Job.source_files, Batch.schedule)


def _repeat(row: Any) -> RerunRepeat:
    """A row of :data:`_REPEAT_COLUMNS` as a :class:`RerunRepeat`."""
    (
        job_id,
        of,
        batch,
        name,
        simulated,
        state,
        data,
        endpoint,
        sources,
        batch_state,
        paused,
        schedule,
        host,
        created_at,
    ) = row
    return RerunRepeat(
        job_id,
        of,
        batch,
        name,
        bool(simulated),
        JobState(state),
        dict(data),
        endpoint,
        dict(sources) if isinstance(sources, dict) else None,
        batch_cancelled=batch_state == BatchState.CANCELLED,
        batch_paused=bool(paused),
        batch_schedule=dict(schedule) if isinstance(schedule, dict) else None,
        batch_manifest_host=host,
        batch_created_at=created_at,
    )


def rerun_repeats(session: Session, batch_id: str, states: Sequence[JobState]) -> list[RerunRepeat]:
    """Every job of the reruns of ``batch_id`` (its reruns, theirs, …) that repeats one of its
    jobs in ``states``, directly or through a repeat of a former generation; generation by
    generation, so each row's ``rerun_of`` is the batch's job or a row before it.

    Walked by the batches' ``parent_batch_id`` (few rows) and then each child batch's jobs
    (``batch_id`` is indexed), never by a scan of every job's ``rerun_of``."""
    return _walk(
        session, batch_id, select(Job.id).where(Job.batch_id == batch_id, Job.state.in_(list(states)))
    )


def covered_by_reruns(
    session: Session, batch_id: str, states: Sequence[JobState], *, simulated: bool
) -> set[str]:
    """The ids of ``batch_id``'s jobs in ``states`` that a rerun (any generation, of the
    ``simulated`` kind) rendered or is still rendering (:func:`covering`, judged as
    :func:`jobs.rendered.still_rendering` judges it): a repeat of a repeat that failed counts for
    the job at the root of its chain. Any such repeat counts, whatever its input (a ``--vary``
    or ``--new-seeds`` one too): sending that job again would pay for what a rerun already took."""
    repeats = rerun_repeats(session, batch_id, states)
    parent = {r.job_id: r.rerun_of for r in repeats}
    covered: set[str] = set()
    for r in repeats:
        if r.simulated != simulated:
            continue
        if not (r.succeeded or (r.state in _COVERING_STATES[1:] and not r.batch_cancelled)):
            continue
        root, seen = r.rerun_of, {r.job_id}
        while root in parent and root not in seen:  # up the chain to the batch's own job
            seen.add(root)
            root = parent[root]
        covered.add(root)
    return covered


def _walk(session: Session, batch_id: str, repeated: Any, wanted: Any = None) -> list[RerunRepeat]:
    """:func:`rerun_repeats` of the jobs of ``batch_id`` that ``repeated`` (a query of job ids)
    selects; with ``wanted`` (SQL of a job joined to its batch), only the rows it holds for,
    though the walk still goes through the others (each generation's query of ids is nested SQL,
    never the rows read)."""
    found: list[RerunRepeat] = []
    parents = [batch_id]
    while parents:
        children = list(session.scalars(select(Batch.id).where(Batch.parent_batch_id.in_(parents))))
        if not children:
            break
        generation = (
            select(*_REPEAT_COLUMNS)
            .join(Batch, Batch.id == Job.batch_id)
            .where(Job.batch_id.in_(children), Job.rerun_of.in_(repeated))
            .order_by(Batch.created_at, Job.item_index, Job.variant, Job.id)
        )
        if wanted is not None:
            generation = generation.where(wanted)
        found.extend(_repeat(row) for row in session.execute(generation))
        repeated = select(Job.id).where(Job.batch_id.in_(children), Job.rerun_of.in_(repeated))
        parents = children
    return found


def lineage_repeats(
    session: Session,
    batch: Batch,
    states: Sequence[JobState],
    *,
    only_covering: bool = False,
    simulated: bool | None = None,
    asked_only: bool = False,
) -> list[RerunRepeat]:
    """Every job of a rerun in ``batch``'s lineage (``batch`` itself left out) that repeats the
    job one of ``batch``'s jobs in ``states`` comes from: each such job is followed up its
    ``rerun_of`` to the job of the batch it is a rerun of in the end (:func:`jobs.store.root_batch`), and
    every repeat of that root job, any generation, is found from there. ``rerun B --failed-only``
    and ``status B`` ask which of B's failed jobs one of them rendered with the very same input:
    B's own reruns, and a sibling too (``rerun A --failed-only`` made B, whose jobs failed again,
    and then D, which rendered them: rerun again, B's jobs paid for D's videos a second time).
    For a batch that is no rerun, exactly :func:`rerun_repeats`. In one query per generation
    (the root jobs found by a nested query, never a list of ids).

    ``only_covering``: only the repeats that cover the job they repeat (:func:`covering`, of
    the ``simulated`` kind when given), selected in SQL: a lineage whose reruns failed again
    (thousands of repeats, none covering) reads no row at all. ``batch``'s own rows are left
    out in SQL too.

    A lineage with a ``--vary`` rerun in it (:func:`_varied`) is walked from every job of its
    root: such a rerun's jobs repeat one job each (``--vary seed=1..12`` over jobs of seeds 1 to
    6 made all twelve repeats of the seed-1 job) though their inputs are other jobs' — its
    cancelled seed-3 job was never found rendered by a sibling's repeat of the seed-3 job, and
    ``rerun --failed-only`` of it paid for that video again (CI: a summary that named the sibling
    or not, as the cap happened to let the seed-1 job through or not). ``asked_only`` (``status``,
    which says only what covers ``batch``'s jobs in ``states``): that walk only while ``batch``
    has such a job (:func:`_root_jobs`)."""
    depth, top, seen = 0, batch, {batch.id}
    while top.parent_batch_id is not None:
        parent = session.get(Batch, top.parent_batch_id)
        if parent is None or parent.id in seen:  # pragma: no cover - a foreign key keeps the parent
            break
        seen.add(parent.id)
        depth, top = depth + 1, parent
    whole = {top.id: [batch.id] if asked_only else None} if _varied_below(session, top.id) else {}
    start = select(Job.id).where(
        Job.batch_id == top.id, Job.id.in_(_root_jobs({depth: [batch.id]}, states, whole=whole))
    )
    wanted = Job.batch_id != batch.id
    if only_covering:
        wanted = and_(wanted, covering(simulated))
    return [row for row in _walk(session, top.id, start, wanted) if row.batch_id != batch.id]


def _root_jobs(
    by_depth: dict[int, list[str]],
    states: Sequence[JobState],
    *,
    whole: Mapping[str, Collection[str] | None] | None = None,
) -> Any:
    """A query of the root jobs (:func:`lineage_repeats`) of the jobs in ``states`` of the
    batches ``by_depth`` holds, each list under its batches' number of generations below their
    root: a job's ``rerun_of`` taken that many times, each a nested query; and every job of the
    root batches ``whole`` maps (a lineage with a ``--vary`` rerun: :func:`_varied`) — when it
    maps one to batches of its lineage, only while one of those has a job in ``states``.

    That condition is ``status``'s (:func:`lineage_repeats_of_batches`, ``asked_only``): it says
    only which of a batch's failed or cancelled jobs a rerun covers, and a batch with none
    started the walk from no job at all — until the whole root did, and ``status`` of a
    100,000-job batch whose ``--vary`` rerun succeeded read and decoded every one of the
    rerun's 100,000 jobs to say nothing (9 s instead of 0.07 s). Tested in SQL (``EXISTS``, the
    ``(batch_id, state)`` index), so the statements are as many as before."""
    parts: list[Any] = []
    for root, askers in sorted((whole or {}).items()):
        part = select(Job.id).where(Job.batch_id == root)
        if askers is not None:
            asked = aliased(Job)
            part = part.where(
                select(asked.id)
                .where(asked.batch_id.in_(sorted(askers)), asked.state.in_(list(states)))
                .exists()
            )
        parts.append(part)
    for depth, batch_ids in sorted(by_depth.items()):
        query: Any = select(Job.id if depth == 0 else Job.rerun_of).where(
            Job.batch_id.in_(sorted(batch_ids)), Job.state.in_(list(states))
        )
        for _ in range(depth - 1):
            query = select(Job.rerun_of).where(Job.id.in_(query))
        parts.append(query)
    return parts[0] if len(parts) == 1 else union(*parts)


@dataclass(frozen=True, slots=True)
class RerunWanted:
    """What ``status`` reads of a batch's failed or cancelled job to tell whether a rerun covers
    it (:func:`jobs.rendered.rerun_covered`): the input a rerun sends for it, and why it ended."""

    batch_id: str
    endpoint: str
    input: dict[str, Any]
    seed: int | None
    source_files: dict[str, Any] | None
    state: JobState
    error_type: str | None


def rerun_wanted_of_batches(
    session: Session, batch_ids: Collection[str], states: Sequence[JobState]
) -> Iterator[RerunWanted]:
    """The jobs in ``states`` of every batch of ``batch_ids``, in one query, batch by batch in
    item order, streamed (server-side cursor on PostgreSQL): only the columns
    :class:`RerunWanted` holds (a job's dozens of others, its answer and its times among them,
    were read and made into objects for thousands of jobs)."""
    if not batch_ids:
        return
    query = (
        select(Job.batch_id, Job.endpoint, Job.input, Job.seed, Job.source_files, Job.state, Job.error_type)
        .where(Job.batch_id.in_(sorted(batch_ids)), Job.state.in_(list(states)))
        .order_by(Job.batch_id, Job.item_index, Job.variant, Job.created_at, Job.id)
        .execution_options(yield_per=500)
    )
    for batch_id, endpoint, data, seed, sources, state, error_type in session.execute(query):
        yield RerunWanted(
            str(batch_id),
            endpoint,
            dict(data),
            None if seed is None else int(seed),
            dict(sources) if isinstance(sources, dict) else None,
            JobState(state),
            error_type,
        )


@dataclass(frozen=True, slots=True)
class _Repeat:
    """A job that repeats a given job's input through reruns (:func:`_repeats_of`)."""

    id: str
    state: JobState
    version: int
    #: Whether fal has (or may have) a request of it: one was accepted (``submitted_at``, which
    #: stays; a submit whose outcome stayed unknown takes its send time as that), or its current
    #: POST is out (``submitting`` with ``sent_at``: written right before the POST, cleared when
    #: the next attempt is claimed and when fal refused it unaccepted, :func:`give_back`).
    sent: bool
    #: Whether it is still to send (another) POST: waiting to (``pending``, ``retry_wait``), or
    #: claimed with no POST recorded (``submitting`` without ``sent_at``). An earlier attempt
    #: fal accepted does not stop it sending the next one.
    sends: bool


#: The states of a repeat that is still to send (:attr:`_Repeat.sends`, :func:`_cancel_unsent_repeats`).
_UNSENT_REPEAT_STATES = frozenset({JobState.PENDING, JobState.RETRY_WAIT, JobState.SUBMITTING})


def _repeated_root(session: Session, job: JobRecord) -> tuple[str, str, set[str]]:
    """The job ``job`` repeats in the end (its ``rerun_of``, followed up while that job is
    stored): that job's id and batch, and the ids of ``job`` and every job it repeats on the
    way (the root included). A cycle, which no rerun makes, ends the walk."""
    line = {job.id}
    root, batch, up = job.id, job.batch_id, job.rerun_of
    while up is not None and up not in line:
        above = session.execute(select(Job.batch_id, Job.rerun_of).where(Job.id == up)).first()
        if above is None:
            break
        line.add(up)
        root, batch, up = up, str(above.batch_id), above.rerun_of
    return root, batch, line


def _repeats_of(session: Session, job: JobRecord) -> list[_Repeat]:
    """Every other job that repeats ``job``'s input through reruns, in batches of the same kind
    (a simulation's repeat bills nothing): the job ``job`` repeats in the end (its ``rerun_of``
    followed up) is found first, and then every job of a rerun that repeats that one (any
    generation): ``job``'s own reruns, and sibling reruns too — a second ``rerun --failed-only``
    of the parent made while ``job``, the first rerun's, had failed as well. ``job`` itself and
    the jobs it repeats are left out: each of those failed, or ``job`` would not have been made.
    Walked generation by generation by the batches' ``parent_batch_id`` and then each child
    batch's jobs, never a scan of every job; a cycle ends the walk."""
    simulated = bool(session.scalar(select(Batch.simulated).where(Batch.id == job.batch_id)))
    root, top, line = _repeated_root(session, job)
    found: list[_Repeat] = []
    seen_batches = {top}
    seen_jobs = {root}
    parents = [top]
    repeated = [root]
    while parents and repeated:
        same_tree = session.scalars(select(Batch.id).where(Batch.parent_batch_id.in_(parents)))
        children = [b for b in same_tree if b not in seen_batches]
        if not children:
            break
        seen_batches.update(children)
        rows = session.execute(
            select(Job.id, Job.state, Job.version, Job.sent_at, Job.submitted_at, Batch.simulated)
            .join(Batch, Batch.id == Job.batch_id)
            .where(Job.batch_id.in_(children), Job.rerun_of.in_(repeated))
            .order_by(Job.id)
        ).all()
        rows = [r for r in rows if str(r.id) not in seen_jobs]
        seen_jobs.update(str(r.id) for r in rows)
        for r in rows:
            if str(r.id) in line or bool(r.simulated) != simulated:
                continue
            state = JobState(r.state)
            posted = state == JobState.SUBMITTING and r.sent_at is not None
            sends = state in _UNSENT_REPEAT_STATES and not posted
            sent = r.submitted_at is not None or posted
            found.append(_Repeat(str(r.id), state, int(r.version), sent, sends))
        parents, repeated = children, [str(r.id) for r in rows]
    return found


def sent_repeat(session: Session, job: JobRecord) -> str | None:
    """Another job that repeats ``job``'s input through reruns (``job``'s own reruns or sibling
    ones, any generation, same kind: :func:`_repeats_of`) of which fal has a request (accepted,
    or its POST out): its id, else None. ``rerun --failed-only`` sent it for a job that failed
    because its submit's outcome was unknown; should that submit's answer come after all, fal
    renders and bills the same input twice: a confirmed duplicate charge
    (:func:`adopt_late_proof`), and a late answer is cancelled at fal first
    (:func:`worker.steps.late_answers.settle_late_answer`). A POST fal refused unaccepted (429:
    :func:`give_back`) is no request of it."""
    return next((r.id for r in _repeats_of(session, job) if r.sent), None)


def _cancel_unsent_repeats(session: Session, job: JobRecord, request_id: str) -> list[str]:
    """Cancel every repeat of ``job`` (:func:`_repeats_of`) that is still to send a POST
    (:attr:`_Repeat.sends`: waiting, or claimed with its POST not recorded — an earlier attempt
    of it fal accepted or refused does not matter), now that ``job`` keeps fal's request
    ``request_id`` of the same input after all: sent, it would render and bill that input
    twice. Fenced by each repeat's version: a submit that records its send (:func:`record_send`)
    first is not cancelled (it went out: :func:`sent_repeat` then finds it), and one whose send
    comes after finds its job moved on and sends nothing."""
    cancelled: list[str] = []
    for repeat in _repeats_of(session, job):
        if not repeat.sends:
            continue
        reason = (
            f"not sent: the job it repeats, {job.id}, keeps fal's request {request_id} of the same "
            "input after all (proved by its submit's late answer or fal's webhook): its video comes "
            "from that request; sent, this one would be billed twice"
        )
        fence = Fence(repeat.id, repeat.state, repeat.version)
        if _move(session, fence, JobState.CANCELLED, reason, error=reason, error_type=REPEAT_NOT_SENT_ERROR):
            cancelled.append(repeat.id)
    return cancelled


def rerun_repeats_of_batches(
    session: Session, batch_ids: Collection[str], states: Sequence[JobState]
) -> dict[str, list[RerunRepeat]]:
    """:func:`rerun_repeats` of each of ``batch_ids`` (those with no repeat left out): the same
    rows in the same order, in two queries per generation of reruns (the longest chain of
    reruns of reruns), however many batches there are (``status`` with no batch).

    Each generation is read for every batch at once; a row counts for the batch ``g``
    generations up its chain of parents when the job it repeats does: one of that batch's jobs
    in ``states`` (the first generation), or a row counted for it one generation before."""
    return _repeats_of_roots(session, set(batch_ids), states, _children(session))


def _varied(options: Any) -> bool:
    """Whether a rerun batch's jobs' inputs need not be the input of the job each repeats (its
    ``rerun_of``), by its :attr:`Batch.rerun_options`: made with ``--vary``, or stored before
    those options were (none recorded: it may have been). A job of such a rerun may be the very
    input another job's repeat rendered, so who rendered what is found by input over the whole
    lineage, never only among the repeats of the job it repeats."""
    return not isinstance(options, dict) or bool(options.get("vary"))


def _below(children: dict[str, list[str]], root: str) -> set[str]:
    """Every rerun of ``root``, any generation, from :func:`_links`' links."""
    found: set[str] = set()
    level = [root]
    while level:
        level = [c for b in level for c in children.get(b, ()) if c not in found]
        found.update(level)
    return found


def _varied_below(session: Session, root: str) -> bool:
    """Whether a rerun of ``root`` (any generation) was made with ``--vary`` (:func:`_varied`):
    its reruns read generation by generation by their parent links (few rows), until one is."""
    seen: set[str] = set()
    level = [root]
    while level:
        rows = session.execute(select(Batch.id, Batch.rerun_options).where(Batch.parent_batch_id.in_(level)))
        level = []
        for batch_id, options in rows:
            if _varied(options):
                return True
            if str(batch_id) not in seen:
                seen.add(str(batch_id))
                level.append(str(batch_id))
    return False


def _links(session: Session) -> tuple[dict[str, list[str]], set[str]]:
    """Each batch that has reruns → its reruns' ids, and the reruns made with ``--vary``
    (:func:`_varied`): one read of the reruns' parent links and options."""
    children: dict[str, list[str]] = {}
    varied: set[str] = set()
    for child, parent, options in session.execute(
        select(Batch.id, Batch.parent_batch_id, Batch.rerun_options).where(Batch.parent_batch_id.is_not(None))
    ):
        children.setdefault(str(parent), []).append(str(child))
        if _varied(options):
            varied.add(str(child))
    return children, varied


def _children(session: Session) -> dict[str, list[str]]:
    """Each batch that has reruns → its reruns' ids (one read of the reruns' parent links)."""
    children: dict[str, list[str]] = {}
    for child, parent in session.execute(
        select(Batch.id, Batch.parent_batch_id).where(Batch.parent_batch_id.is_not(None))
    ):
        children.setdefault(str(parent), []).append(str(child))
    return children


def lineage_repeats_of_batches(
    session: Session, batch_ids: Collection[str], states: Sequence[JobState], *, only_covering: bool = False
) -> dict[str, list[RerunRepeat]]:
    """:func:`lineage_repeats` of each of ``batch_ids`` (those with none left out), in as many
    queries as :func:`rerun_repeats_of_batches` (``status`` with no batch): the roots are found
    from the same read of the reruns' parent links, and each lineage walked once.

    ``only_covering``: only the repeats that cover (:func:`covering`, of either kind). The
    others are still read, to tell which lineage each row belongs to, but as their ids and
    states only: their inputs are neither sent nor decoded. A lineage with a ``--vary`` rerun
    in it is walked from every job of its root, as :func:`lineage_repeats` walks it, while one
    of the batches asked about in it has a job in ``states`` (``status`` says nothing of the
    others: :func:`_root_jobs`)."""
    children, varied = _links(session)
    parent_of = {child: parent for parent, kids in children.items() for child in kids}
    roots: dict[str, str] = {}
    by_depth: dict[int, list[str]] = {}
    for batch_id in batch_ids:
        seen, top = {batch_id}, batch_id
        while (up := parent_of.get(top)) is not None and up not in seen:  # a cycle (none is made) ends it
            seen.add(up)
            top = up
        roots[batch_id] = top
        by_depth.setdefault(len(seen) - 1, []).append(batch_id)
    if not by_depth:
        return {}
    asking: dict[str, list[str]] = {}  # a root → the batches asked about in its lineage
    for batch_id, root in roots.items():
        asking.setdefault(root, []).append(batch_id)
    whole: dict[str, Collection[str] | None] = {
        root: askers for root, askers in asking.items() if varied & _below(children, root)
    }
    start = _root_jobs(by_depth, states, whole=whole)
    found = _repeats_of_roots(
        session, set(roots.values()), states, children, start, only_covering=only_covering
    )
    lineages = {b: [r for r in found.get(root, ()) if r.batch_id != b] for b, root in roots.items()}
    return {b: rows for b, rows in lineages.items() if rows}


def _repeats_of_roots(
    session: Session,
    wanted: set[str],
    states: Sequence[JobState],
    children: dict[str, list[str]],
    start: Any = None,
    *,
    only_covering: bool = False,
) -> dict[str, list[RerunRepeat]]:
    """:func:`rerun_repeats_of_batches` of ``wanted``, given every batch's reruns (:func:`_children`);
    with ``start`` (a query of job ids: :func:`_root_jobs`), of those of their jobs instead of
    those in ``states``; ``only_covering``: :func:`lineage_repeats_of_batches`'."""
    # Each batch's reruns generation by generation: level[root] = its batches ``g`` generations down.
    level = {root: [root] for root in wanted if root in children}
    root_of: dict[str, str] = {}  # a batch of this generation → the batch it is a rerun of, g generations up
    counted: dict[str, set[str]] = {}  # root → ids of the rows counted for it in the generation before
    found: dict[str, list[RerunRepeat]] = {}
    of = aliased(Job)
    repeated: Any = select(Job.id).where(
        Job.batch_id.in_(list(level)), Job.state.in_(list(states)) if start is None else Job.id.in_(start)
    )
    first = True
    test = covering() if only_covering else None
    covers = type_coerce(true() if test is None else test, Boolean)
    columns = tuple(
        type_coerce(case((test, column), else_=null()), column.type)
        if test is not None and any(column is heavy for heavy in _HEAVY_COLUMNS)
        else column
        for column in _REPEAT_COLUMNS
    )
    while level:
        level = {root: [c for b in batches for c in children.get(b, ())] for root, batches in level.items()}
        level = {root: batches for root, batches in level.items() if batches}
        if not level:
            break
        root_of = {b: root for root, batches in level.items() for b in batches}
        generation = (
            select(*columns, of.batch_id, of.state, covers)
            .join(Batch, Batch.id == Job.batch_id)
            .join(of, of.id == Job.rerun_of)
            .where(Job.batch_id.in_(sorted(root_of)), Job.rerun_of.in_(repeated))
            .order_by(Batch.created_at, Job.item_index, Job.variant, Job.id)
        )
        now_counted: dict[str, set[str]] = {}
        for *row, of_batch, of_state, row_covers in session.execute(generation):
            job_id, rerun_of, batch_id = row[0], row[1], row[2]
            root = root_of[batch_id]
            if first:
                if of_batch != root or (start is None and JobState(of_state) not in states):
                    continue
            elif rerun_of not in counted.get(root, ()):
                continue
            if row_covers:
                found.setdefault(root, []).append(_repeat(row))
            now_counted.setdefault(root, set()).add(job_id)
        repeated = select(Job.id).where(Job.batch_id.in_(sorted(root_of)), Job.rerun_of.in_(repeated))
        counted, first = now_counted, False
    return found
