"""Which failed or cancelled jobs of a batch a rerun of it already rendered.

``rerun BATCH --failed-only`` repeats what did not succeed. Run it a second time (the same
command from the shell history, a button pressed twice) and it repeated the very jobs the first
rerun had already rendered and paid for: the same pinned-seed inputs paid for again, without a
word, and ``status BATCH`` kept advising that rerun. A job counts as rendered when a rerun of
the batch (any generation: a rerun of a rerun counts too) holds a succeeded job that repeats it
with the input a rerun sends now (its stored input, with the seed fal returned), in a batch of
the same kind (a simulation's placeholder never stands in for a paid video, nor the reverse).

A rerun still unfinished covers a job as well: clicking "Rerun failed" twice (or running the
command twice before the first rerun was run) stored ``NAME-rerun-2`` with the very jobs
``NAME-rerun-1`` was still to send, and running both (workers send both on their own) paid
twice. A job counts as being rerun when such a repeat is unfinished: not terminal, not being
cancelled, its batch not cancelled. Once it fails or is cancelled it covers nothing any more.

Inputs are compared as their key sees them (:func:`jobs.manifest.keys.stored_content_key`): a
file and a data URI of one image, or two media-type spellings of one data URI, ask the same. Two
such jobs of one batch (twins that earlier versions stored apart) are stored once by a rerun,
which repeats only the first: its repeat covers both, or a second ``rerun --failed-only`` sent the
other and paid for the same video again.

A plain ``rerun`` (a reproducibility run) is meant to pay again and never asks this.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict

from sqlalchemy.orm import Session

from jobs import machine, store
from jobs.manifest.keys import stored_content_key
from jobs.models import Batch, utcnow
from jobs.money import BUDGET_ERRORS, DAILY_CAP_ERROR
from jobs.printable import printable, shell_ref
from jobs.schedule import Schedule
from jobs.states import JobState

#: The ``error_type`` of jobs a batch's schedule cancelled: its deadline, or a window's end that
#: no window followed before it (``worker.steps.schedule.DEADLINE``, ``WINDOW_CLOSED``).
SCHEDULE_ERRORS = ("deadline", "window_closed")

#: What ``rerun --failed-only`` repeats.
RERUN_FAILED_STATES = (JobState.FAILED, JobState.CANCELLED)


class RenderedBy(TypedDict):
    """A rerun batch that rendered some of the batch's failed or cancelled jobs."""

    batch: str
    name: str
    jobs: int
    #: Made after the batch: it rendered those jobs since. False for an earlier rerun (a sibling
    #: made before the batch, or anything :func:`tally` judges without a batch), which had
    #: already rendered their inputs when the batch ran them (:func:`rendered_text`).
    since: bool


class RerunBeing(TypedDict):
    """A rerun batch, not finished yet, that holds unfinished repeats of some of the batch's
    failed or cancelled jobs, and the command that goes on with it."""

    batch: str
    name: str
    jobs: int
    #: ``wanbatch run NAME`` (``--simulate`` for a simulation; after ``wanbatch resume NAME``
    #: when ``wanbatch pause`` paused it).
    command: str
    #: While its schedule is closed (a rerun keeps its parent's window), until when:
    #: ``waits for its window (opens 22:00 Europe/Berlin, in 23h57m)`` (:meth:`Schedule.waits`);
    #: ``""`` when it may send now. Nothing of it is sent before then, whatever runs it.
    waits: str
    #: The machine its manifest is on (``alice-laptop``) when that is another one than this
    #: (:func:`jobs.machine.elsewhere`): where :attr:`command` goes on; ``""`` else.
    machine: str


class RerunRendered(TypedDict):
    """``status BATCH --json``'s ``rerun_rendered``: the batch's failed or cancelled jobs that a
    rerun of it has rendered since (``jobs``), of those the ones a cap cancelled (as the
    report's ``cancelled_for_budget`` and ``cancelled_for_daily_budget`` count them), and which
    reruns hold their videos."""

    jobs: int
    cancelled_for_budget: int
    cancelled_for_daily_budget: int
    #: Of those, the ones the batch's schedule (its deadline) cancelled.
    cancelled_for_deadline: int
    reruns: list[RenderedBy]


class RerunPending(TypedDict):
    """``status BATCH --json``'s ``rerun_pending``: the batch's failed or cancelled jobs (not
    rendered since) that an unfinished rerun of it repeats with the same input (``jobs``), of
    those the ones a cap cancelled, and which reruns hold them."""

    jobs: int
    cancelled_for_budget: int
    cancelled_for_daily_budget: int
    #: Of those, the ones the batch's schedule (its deadline) cancelled.
    cancelled_for_deadline: int
    reruns: list[RerunBeing]


@dataclass(frozen=True, slots=True)
class Render:
    """One rendered (or, ``unfinished``, still to render) repeat of a job: the rerun batch that
    holds it."""

    batch_id: str
    batch_name: str
    input: dict[str, Any]
    #: Its input's key (:func:`jobs.manifest.keys.stored_content_key`): what it rendered.
    key: str
    #: The rerun's place among the batch's reruns, oldest generation first (then oldest rerun):
    #: the order in which messages name them.
    rank: int
    #: Not rendered yet: the repeat is still to be sent, at fal or downloading.
    unfinished: bool = False
    #: The command that goes on with its batch (only for an unfinished repeat).
    command: str = ""
    #: Until when its batch's schedule holds it back (only for an unfinished repeat):
    #: :attr:`RerunBeing.waits`.
    waits: str = ""
    #: The other machine its batch is on (only for an unfinished repeat): :attr:`RerunBeing.machine`.
    machine: str = ""
    #: When its batch was made (None: not known): whether it rendered a batch's jobs since.
    made_at: datetime | None = None


def rerun_input(stored: Mapping[str, Any], seed: int | None) -> dict[str, Any]:
    """The input a rerun without ``--new-seeds`` sends for a job: the stored one, with the seed
    fal returned when it is known (so a rerun reproduces the output)."""
    resolved = dict(stored)
    if seed is not None:
        resolved["seed"] = int(seed)
    return resolved


def still_rendering(row: store.RerunRepeat) -> bool:
    """Whether a repeat will still be sent or collected: unfinished, not being cancelled, in a
    batch not cancelled (whose unsent jobs are never sent). One that failed or was cancelled
    covers nothing: its job may be rerun again."""
    return not row.state.terminal and row.state != JobState.CANCELLING and not row.batch_cancelled


def go_on_command(name: str, batch_id: str, *, simulated: bool, paused: bool) -> str:
    """``wanbatch run NAME`` (what sends and collects an unfinished rerun), with ``--simulate``
    for a simulation and ``wanbatch resume NAME`` first when ``wanbatch pause`` paused it."""
    ref = shell_ref(name, batch_id)
    run = f"`wanbatch run {ref}{' --simulate' if simulated else ''}`"
    return f"`wanbatch resume {ref}`, then {run}" if paused else run


def renders(
    session: Session, batch_id: str, *, simulated: bool, now: datetime | None = None
) -> dict[str, list[Render]]:
    """The batch's failed or cancelled jobs (by id) → the succeeded and the still unfinished
    repeats of them in its reruns of that kind (``simulated``), oldest rerun first; jobs neither
    rendered nor being rerun are left out. ``now``: for how long an unfinished rerun's
    schedule holds it back (:attr:`Render.waits`)."""
    rows = store.rerun_repeats(session, batch_id, RERUN_FAILED_STATES)
    return _renders(rows, simulated=simulated, now=now or utcnow())


def lineage_renders(
    session: Session, batch: Batch, *, simulated: bool, now: datetime | None = None, asked_only: bool = False
) -> dict[str, list[Render]]:
    """:func:`renders` over ``batch``'s whole lineage (:func:`jobs.store.lineage_repeats`): the
    succeeded and the still unfinished jobs of every rerun of the batch ``batch`` is a rerun of
    in the end (any generation, ``batch`` itself left out), by the root's job they repeat.
    :func:`by_input` then finds, for each failed job of ``batch``, a rerun that rendered its very
    input: one of its own reruns, a sibling (another ``rerun --failed-only`` of its parent), or
    its parent's other reruns. Only ``batch``'s descendants were asked: ``rerun B --failed-only``
    paid again for the videos its sibling D had rendered, and ``status B`` never named D.

    Only the repeats that can cover are read (:func:`jobs.store.repeats.covering`), so a repeat
    of a repeat that failed is found under that failed repeat's id instead: the callers look
    repeats up by input (:func:`by_input`), never by that id. ``asked_only``: for ``status``,
    which looks up only ``batch``'s failed or cancelled jobs (:func:`jobs.store.lineage_repeats`)."""
    rows = store.lineage_repeats(
        session, batch, RERUN_FAILED_STATES, only_covering=True, simulated=simulated, asked_only=asked_only
    )
    return _renders(rows, simulated=simulated, now=now or utcnow())


def _renders(
    rows: Iterable[store.RerunRepeat], *, simulated: bool, now: datetime, keys: dict[str, str] | None = None
) -> dict[str, list[Render]]:
    """:func:`renders` from a batch's :func:`jobs.store.rerun_repeats` rows. ``keys``: each
    repeat's :attr:`Render.key` by its id, kept across calls (the batches of one lineage share
    its rows: each key is computed once)."""
    keys = {} if keys is None else keys
    origin: dict[str, str] = {}  # a repeat's id → the batch's job it repeats, however many generations
    found: dict[str, list[Render]] = {}
    ranks: dict[str, int] = {}
    waits: dict[str, str] = {}  # a rerun batch's id → its Schedule.waits, read once per batch
    for row in rows:
        root = origin.get(row.rerun_of, row.rerun_of)
        origin[row.job_id] = root
        if row.simulated != simulated or not (row.succeeded or still_rendering(row)):
            continue
        rank = ranks.setdefault(row.batch_id, len(ranks))
        unfinished = not row.succeeded
        command = (
            go_on_command(row.batch_name, row.batch_id, simulated=simulated, paused=row.batch_paused)
            if unfinished
            else ""
        )
        if unfinished and row.batch_id not in waits:
            waits[row.batch_id] = Schedule.from_json(row.batch_schedule).waits(now)
        waiting = waits.get(row.batch_id, "") if unfinished else ""
        host = row.batch_manifest_host
        elsewhere = machine.name(host) if unfinished and host is not None and machine.elsewhere(host) else ""
        key = keys.get(row.job_id)
        if key is None:
            key = keys[row.job_id] = stored_content_key(row.endpoint, row.input, row.source_files)
        found.setdefault(root, []).append(
            Render(
                row.batch_id,
                row.batch_name,
                row.input,
                key,
                rank,
                unfinished,
                command,
                waiting,
                elsewhere,
                row.batch_created_at,
            )
        )
    return found


def by_input(found: Mapping[str, Iterable[Render]]) -> dict[str, list[Render]]:
    """:func:`renders`' repeats by what they render (:attr:`Render.key`), oldest rerun first,
    whichever job they repeat: a repeat that stands for twins (the rerun stored their one input
    once) covers each of them."""
    grouped: dict[str, list[Render]] = {}
    for render in sorted((r for rs in found.values() for r in rs), key=lambda r: r.rank):
        grouped.setdefault(render.key, []).append(render)
    return grouped


def wanted_key(endpoint: str, wanted: Mapping[str, Any], sources: Mapping[str, Any] | None) -> str:
    """The key of the input a rerun sends for a job (:func:`rerun_input`), to look up in
    :func:`by_input`: files and data URIs by the SHA-256 their ``source_files`` recorded."""
    return stored_content_key(endpoint, wanted, sources)


def rendered_by(candidates: Iterable[Render], wanted: str) -> Render | None:
    """The first repeat that rendered exactly the input whose key is ``wanted`` (another seed or
    a ``--vary`` value is another video, not this one), else the first one still rendering it: a
    video already made is where to look first."""
    matching = [r for r in candidates if r.key == wanted]
    return next((r for r in matching if not r.unfinished), None) or next(iter(matching), None)


def tally(renders_: Iterable[Render], *, after: datetime | None = None) -> list[RenderedBy]:
    """How many of the jobs each rerun rendered (or renders), the reruns in their
    :attr:`Render.rank` order; each made ``after`` the batch's creation (when given) rendered
    them ``since`` (:attr:`RenderedBy.since`)."""
    by_batch: dict[str, RenderedBy] = {}
    for render in sorted(renders_, key=lambda r: r.rank):
        since = after is not None and render.made_at is not None and render.made_at > after
        entry = by_batch.setdefault(
            render.batch_id, RenderedBy(batch=render.batch_id, name=render.batch_name, jobs=0, since=since)
        )
        entry["jobs"] += 1
    return list(by_batch.values())


def tally_being(renders_: Iterable[Render]) -> list[RerunBeing]:
    """:func:`tally` of unfinished repeats, each rerun with the command that goes on with it
    and until when its schedule holds it back."""
    shown = list(renders_)
    of_batch = {r.batch_id: r for r in shown}
    return [
        RerunBeing(
            batch=e["batch"],
            name=e["name"],
            jobs=e["jobs"],
            command=of_batch[e["batch"]].command,
            waits=of_batch[e["batch"]].waits,
            machine=of_batch[e["batch"]].machine,
        )
        for e in tally(shown)
    ]


@dataclass(frozen=True, slots=True)
class Covered:
    """What ``status`` says of the batch's failed or cancelled jobs a rerun covers."""

    rendered: RerunRendered
    pending: RerunPending


def rerun_covered(session: Session, batch: Batch, *, now: datetime | None = None) -> Covered:
    """The batch's failed or cancelled jobs a rerun already rendered, and those an unfinished
    rerun is rendering (as ``rerun --failed-only`` would find them: any rerun of its lineage,
    :func:`lineage_renders`, a sibling's too): ``status`` names those
    reruns instead of advising to rerun the jobs again (``now``: for :attr:`RerunBeing.waits`)."""
    found = by_input(lineage_renders(session, batch, simulated=batch.simulated, now=now, asked_only=True))
    if not found:  # no rerun, or none covers any of them: the batch's jobs are not even read
        return _covered(found, (), batch.created_at)
    jobs = store.rerun_wanted_of_batches(session, [batch.id], RERUN_FAILED_STATES)
    return _covered(found, jobs, batch.created_at)


def rerun_covered_of_batches(
    session: Session, batches: Sequence[Batch], *, now: datetime | None = None
) -> dict[str, Covered]:
    """:func:`rerun_covered` of each of ``batches`` (by id), in a few queries however many
    batches there are (:func:`jobs.store.lineage_repeats_of_batches`, then the failed or
    cancelled jobs of the batches a rerun covers, in one query)."""
    ids = [b.id for b in batches]
    repeats = store.lineage_repeats_of_batches(session, ids, RERUN_FAILED_STATES, only_covering=True)
    now = now or utcnow()
    keys: dict[str, str] = {}
    found = {
        b.id: by_input(_renders(repeats.get(b.id, ()), simulated=b.simulated, now=now, keys=keys))
        for b in batches
    }
    jobs: dict[str, list[store.RerunWanted]] = {}
    covered = [i for i, f in found.items() if f]
    for job in store.rerun_wanted_of_batches(session, covered, RERUN_FAILED_STATES):
        jobs.setdefault(job.batch_id, []).append(job)
    made = {b.id: b.created_at for b in batches}
    return {
        batch_id: _covered(f, jobs.get(batch_id, ()) if f else (), made[batch_id])
        for batch_id, f in found.items()
    }


def _covered(
    found: Mapping[str, Sequence[Render]], jobs: Iterable[store.RerunWanted], made_at: datetime | None
) -> Covered:
    """:class:`Covered` of a batch's failed or cancelled ``jobs`` by :func:`by_input`'s ``found``;
    ``made_at``: when the batch was made (a rerun made after it rendered its jobs since)."""
    rendered = RerunRendered(
        jobs=0, cancelled_for_budget=0, cancelled_for_daily_budget=0, cancelled_for_deadline=0, reruns=[]
    )
    pending = RerunPending(
        jobs=0, cancelled_for_budget=0, cancelled_for_daily_budget=0, cancelled_for_deadline=0, reruns=[]
    )
    if not found:
        return Covered(rendered, pending)
    done: list[Render] = []
    going: list[Render] = []
    for job in jobs:
        key = wanted_key(job.endpoint, rerun_input(job.input, job.seed), job.source_files)
        render = rendered_by(found.get(key, ()), key)
        if render is None:
            continue
        (going if render.unfinished else done).append(render)
        report = pending if render.unfinished else rendered
        if job.state == JobState.CANCELLED and job.error_type in BUDGET_ERRORS:
            report["cancelled_for_budget"] += 1
            report["cancelled_for_daily_budget"] += job.error_type == DAILY_CAP_ERROR
        if job.state == JobState.CANCELLED and job.error_type in SCHEDULE_ERRORS:
            report["cancelled_for_deadline"] += 1
    rendered["jobs"], rendered["reruns"] = len(done), tally(done, after=made_at)
    pending["jobs"], pending["reruns"] = len(going), tally_being(going)
    return Covered(rendered, pending)


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


def rendered_how(since: bool) -> str:
    """How ``status`` says its jobs were rendered: ``rendered since by a rerun:`` when every
    rerun it names was made after the batch (``since``), else ``already rendered with the same
    input by``, as ``rerun`` says it. A sibling made before the batch (``rerun-1``, named on
    ``rerun-2``'s summary) rendered those inputs before the batch ran them, not since."""
    return "rendered since by a rerun:" if since else "already rendered with the same input by"


def rendered_text(rendered: RerunRendered) -> str:
    """``status``'s line on the batch's failed or cancelled jobs a rerun rendered (``3 failed or
    cancelled job(s) rendered since by a rerun: sweep-rerun-1 (…)``, :func:`rendered_how`);
    ``""`` when none."""
    if not rendered["jobs"]:
        return ""
    how = rendered_how(all(r["since"] for r in rendered["reruns"]))
    return f"{rendered['jobs']} failed or cancelled job(s) {how} {reruns_text(rendered['reruns'])}"


def going_on(rerun: RerunBeing) -> str:
    """What finishes an unfinished rerun, as ``status``, ``rerun`` and the dashboard say it:
    ``"`wanbatch run sweep-rerun-1` goes on"``, or while its schedule holds it back (it kept its
    parent's window, closed now), until when first: ``"it waits for its window (opens 22:00
    Europe/Berlin, in 23h57m); then `wanbatch run sweep-rerun-1` sends them"`` — "goes on" said
    of a rerun that sends nothing for hours was a promise nothing keeps. A rerun made on another
    machine (:attr:`RerunBeing.machine`) says where: ``"`wanbatch run sweep-rerun-1` on
    alice-laptop (another machine) goes on"``, as the refusal of its manifest names it."""
    command = rerun["command"]
    if elsewhere := rerun.get("machine"):
        command = f"{command} on {printable(elsewhere)} (another machine)"
    if not rerun["waits"]:
        return f"{command} goes on"
    return f"it {rerun['waits']}; then {command} sends them"


def being_text(reruns: Iterable[RerunBeing]) -> str:
    """``sweep-rerun-1 (`wanbatch run sweep-rerun-1` goes on)``, or for several
    ``sweep-rerun-1 (2 jobs; `wanbatch run sweep-rerun-1` goes on) and …``: where the jobs are
    being rerun, and what finishes each rerun (:func:`going_on`)."""
    shown = list(reruns)
    if len(shown) == 1:
        return f"{shown[0]['name']} ({going_on(shown[0])})"
    parts = [f"{r['name']} ({r['jobs']} job{'' if r['jobs'] == 1 else 's'}; {going_on(r)})" for r in shown]
    return ", ".join(parts[:-1]) + " and " + parts[-1]
