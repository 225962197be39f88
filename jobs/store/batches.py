"""Batches: created, found by id or prefix, named, locked, paused and resumed, their budget,
manifest, schedule and the reruns that follow them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import PurePath
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    LargeBinary,
    bindparam,
    exists,
    func,
    or_,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, undefer

from jobs.batch_names import batch_name
from jobs.endpoints import get_endpoint
from jobs.errors import NotFoundError
from jobs.models import Batch, BatchRecord, BatchState, Job, new_id, utcnow
from jobs.printable import one_line
from jobs.schedule import Schedule
from jobs.states import UNFINISHED_STATES, JobState
from jobs.storable import holds_unstorable
from jobs.store.core import _JOBS, MIN_ID_PREFIX, _prepared, _run

#: What a simulated batch is called when its manifest's name belongs to a batch sent to fal.
SIMULATED_SUFFIX = "-simulated"
#: A name :func:`name_for_batch` gives a simulation moved aside (``NAME-simulated``, ``-simulated-2``…).
_SIMULATED_NAME = re.compile(rf".*{re.escape(SIMULATED_SUFFIX)}(-\d+)?", re.DOTALL)


def name_for_batch(session: Session, name: str, *, simulated: bool) -> tuple[str, list[tuple[str, str]]]:
    """The name a batch of the manifest named ``name`` is stored (or found) under, and the
    batches renamed to make room for it (``(old, new)`` each: a simulation that held ``name``
    first, then its simulated reruns; empty when nothing moved).

    Simulated and paid videos never share a batch, and a batch's name says which one it is:

    * a simulation never takes the name of a batch sent to fal: it is ``NAME-simulated``
      (``NAME-simulated-2``, … when a batch sent to fal holds that too);
    * a batch for fal takes its name back from a simulation, which is renamed
      ``NAME-simulated`` (or the next free one). So "drop ``--simulate``" sends the manifest
      to fal, instead of finding its simulated batch already done. Its simulated reruns go
      with it (:func:`_move_reruns`).

    ``name`` is compared, and returned, in NFC (:func:`jobs.batch_names.batch_name`).
    """
    name = batch_name(name)
    holder = _by_name(session, name, hint=ANOTHER_NAME)
    if holder is None or holder.simulated == simulated:
        return name, []
    if simulated:  # a new simulation, or the one an earlier --simulate run made
        return _simulation_slot(session, name)[0], []
    for candidate in _simulated_names(name):
        if not batch_name_taken(session, candidate):
            holder.name = candidate
            session.flush()  # the name is free before the batch for fal is inserted
            return name, [(name, candidate), *_move_reruns(session, holder, name)]
    raise AssertionError("unreachable: the candidate names never end")  # pragma: no cover


def _move_reruns(session: Session, moved: Batch, old: str) -> list[tuple[str, str]]:
    """Rename the simulated reruns of ``moved`` (a simulation just renamed from ``old``) after
    its new name, and theirs in turn: ``NAME-rerun-2`` becomes ``NAME-simulated-rerun-2``.

    Left as they were, the rehearsal's ``NAME-rerun-N`` read as reruns of the batch for fal now
    called ``NAME`` (``diff NAME NAME-rerun-1`` compared fal's videos with the simulator's), and
    held the names that batch's own reruns take (its first rerun was ``NAME-rerun-6`` after five
    rehearsed ones). Renamed, ``rerun NAME`` makes ``NAME-rerun-1`` as the rehearsal did, and the
    simulation's family reads as one (``rerun NAME-simulated`` goes on with its numbers). Only
    simulations named after their parent move: a rerun sent to fal keeps its name (its videos are
    fal's; ``-simulated`` would misname it), and so does one whose new name a batch already holds.
    Videos already downloaded stay where they are (each job stores its path); an unfinished
    rerun's later ones are filed under its new name, in a folder that still ends in
    ``-simulated`` (:func:`folder_name`), never beside fal's."""
    renamed: list[tuple[str, str]] = []
    todo = [(moved, old)]
    while todo:
        parent, before = todo.pop(0)
        children = session.scalars(
            select(Batch)
            .where(Batch.parent_batch_id == parent.id, Batch.simulated.is_(True))
            .order_by(Batch.created_at, Batch.id)
        ).all()
        for child in children:
            if not child.name.startswith(f"{before}-rerun-"):
                continue
            was, new = child.name, batch_name(parent.name + child.name[len(before) :])
            if batch_name_taken(session, new):
                continue
            child.name = new
            session.flush()
            renamed.append((was, new))
            todo.append((child, was))
    return renamed


def _simulation_slot(session: Session, name: str) -> tuple[str, Batch | None]:
    """Where a simulation of the manifest ``name`` goes while a batch for fal holds ``name``: the
    first ``NAME-simulated…`` that is free or a simulation's, and that simulation (None: free)."""
    for candidate in _simulated_names(name):
        other = _by_name(session, candidate, hint=ANOTHER_NAME)
        if other is None or other.simulated:
            return candidate, other
    raise AssertionError("unreachable: the candidate names never end")  # pragma: no cover


def is_stored(session: Session, name: str, *, simulated: bool) -> bool:
    """Whether a manifest named ``name`` already has its batch, where :func:`name_for_batch`
    finds it (a simulation's under ``NAME-simulated`` when a batch for fal holds ``NAME``)."""
    name = batch_name(name)
    holder = _by_name(session, name, hint=ANOTHER_NAME)
    if holder is None:
        return False
    if holder.simulated == simulated:
        return True
    return simulated and _simulation_slot(session, name)[1] is not None


def folder_name(batch: BatchRecord) -> str:
    """The name a batch's outputs are filed under (its folder, its S3 prefix): its own, but a
    simulation's always ends in ``-simulated``. A simulation named ``NAME`` is renamed
    ``NAME-simulated`` when a batch for fal takes the name (:func:`name_for_batch`): had its
    videos been filed under ``NAME/``, the paid batch's folder would hold the placeholders too.
    Filed under ``NAME-simulated/`` from the start, they stay apart, under the name it ends with."""
    if not batch.simulated or _SIMULATED_NAME.fullmatch(batch.name):
        return batch.name
    return f"{batch.name}{SIMULATED_SUFFIX}"


def batch_named(session: Session, name: str, *, hint: str | None = None) -> Batch | None:
    """The batch stored under ``name`` (compared in NFC), if any (no id or prefix lookup:
    :func:`get_batch`). Two batches stored under it in different spellings (kept apart by the
    upgrade to schema 0041) are a :class:`NotFoundError` naming both, ending with ``hint``
    (what to do instead; by default, give the manifest another name)."""
    return _by_name(session, name, hint=ANOTHER_NAME if hint is None else hint)


def batch_name_taken(session: Session, name: str) -> bool:
    """Whether a batch is stored under ``name`` (compared in NFC), in whatever spelling."""
    return bool(_spelt_alike(session, batch_name(name)))


#: What the user of an ambiguous name is told to do instead, by where the name came from.
ANOTHER_NAME = "give the manifest another `name`"
GIVE_ID = "give the id of the one you mean"


def _by_name(session: Session, name: str, *, hint: str) -> Batch | None:
    """The one batch stored under ``name`` (compared in NFC), or None; two or more are refused
    (:func:`_spelt_alike`): one line naming them, never one of them picked silently."""
    name = batch_name(name)
    found = _spelt_alike(session, name)
    if len(found) > 1:
        ids = [b.id for b in found]
        listed = ", ".join(ids[:-1]) + f" and {ids[-1]}"
        raise NotFoundError(
            f"batch name {name!r} is ambiguous: batches {listed} are stored under it, "
            f"spelt in different Unicode forms (names are compared in NFC); {hint}"
        )
    return found[0] if found else None


def _spelt_alike(session: Session, name: str) -> list[Batch]:
    """Every batch whose name is ``name`` (NFC) in NFC: the one stored so first, then any stored
    in another spelling, oldest first.

    Names are stored in NFC, so the others are those the upgrade to schema 0041 could not
    normalise without a clash (two batches stored before under one name in two spellings): it
    kept both. A name in another form holds a character outside ASCII, so only those are read
    (no database here normalises Unicode: compared in Python)."""
    found = list(session.scalars(select(Batch).where(Batch.name == name)))
    if session.connection().dialect.name == "postgresql":
        beyond_ascii = func.octet_length(Batch.name) != func.char_length(Batch.name)
    else:  # SQLite: a text's length counts characters, its bytes' length bytes
        beyond_ascii = func.length(sql_cast(Batch.name, LargeBinary)) != func.length(Batch.name)
    others = [
        batch_id
        for batch_id, stored in session.execute(
            select(Batch.id, Batch.name).where(beyond_ascii, Batch.name != name)
        )
        if batch_name(stored) == name
    ]
    if others:
        found += session.scalars(
            select(Batch).where(Batch.id.in_(others)).order_by(Batch.created_at, Batch.id)
        )
    return found


def _simulated_names(name: str) -> Iterator[str]:
    yield f"{name}{SIMULATED_SUFFIX}"
    number = 2
    while True:
        yield f"{name}{SIMULATED_SUFFIX}-{number}"
        number += 1


def get_or_create_batch(
    session: Session,
    *,
    name: str,
    manifest_path: str,
    manifest_sha256: str,
    budget_max_usd: Decimal | None,
    parent_batch_id: str | None = None,
    schedule: Schedule | None = None,
    priority: str = "normal",
    reuse_outputs: bool = False,
    manifest_text: str | None = None,
    simulated: bool = False,
    rerun_options: dict[str, Any] | None = None,
    manifest_host: str | None = None,
) -> tuple[Batch, bool]:
    """The batch called ``name`` (stored, and compared, in NFC), creating it if needed; ``True``
    when it was created now. (:func:`name_for_batch` first: the name a simulated or a paid
    batch may take.)

    Race-safe: two processes submitting the same manifest at once both end up with the one row
    the unique constraint on ``name`` lets through. An existing batch is returned unchanged
    (:func:`set_batch_budget` and :func:`set_batch_schedule` change what a new submit changes).
    """
    name = batch_name(name)
    existing = _by_name(session, name, hint=ANOTHER_NAME)
    if existing is not None:
        return existing, False
    batch = Batch(
        id=new_id(),
        name=name,
        manifest_path=manifest_path,
        manifest_sha256=manifest_sha256,
        budget_max_usd=budget_max_usd,
        parent_batch_id=parent_batch_id,
        state=BatchState.ACTIVE,
        pause_reason=None,  # set, not defaulted: bulk UPDATEs only refresh attributes already loaded
        schedule=_schedule_doc(schedule),
        priority=priority,
        paused_by_user=False,
        reuse_outputs=reuse_outputs,
        manifest_text=manifest_text,
        rerun_options=rerun_options,
        simulated=simulated,
        created_at=utcnow(),
    )
    if manifest_host is not None:  # NULL otherwise: unknown (a test, a batch of an older wanbatch)
        batch.manifest_host = manifest_host
    try:
        with session.begin_nested():
            session.add(batch)
    except IntegrityError:  # the savepoint's rollback already dropped ``batch`` from the session
        winner = session.scalar(select(Batch).where(Batch.name == name))
        if winner is None:  # the conflict was not on the name (e.g. a bad parent id)
            raise
        return winner, False
    return batch, True


#: Length of a batch id (uuid4 hex): the longest id prefix there is.
ID_CHARS = 32


def get_batch(session: Session, ref: str) -> Batch:
    """A batch by full id, by name (compared in NFC: :mod:`jobs.batch_names`), or by a unique id
    prefix of at least 6 characters.

    A reference no database can hold (a NUL, a lone surrogate) names no batch: it is not found,
    on every database alike, before any query (:func:`jobs.storable.holds_unstorable`).
    """
    ref = ref.strip()
    if holds_unstorable(ref):
        raise _no_such_batch(ref)
    found = session.get(Batch, ref)
    if found is not None:
        return found
    found = _by_name(session, ref, hint=GIVE_ID)
    if found is not None:
        # A name that is also another batch's id prefix (the 8 characters `status` shows) must not
        # silently pick the named one: `cancel 01d7cc63` would cancel a batch other than the listed.
        other = (
            _other_batch_with_id_prefix(session, ref, found.id)
            if MIN_ID_PREFIX <= len(ref) <= ID_CHARS
            else None
        )
        if other is not None:
            raise NotFoundError(
                f"{ref!r} is ambiguous: the name of batch {found.id[:8]} and an id prefix of batch "
                f"{other.id[:8]} ({other.name}); give the full id of the one you mean"
            )
        return found
    # No id is longer than ID_CHARS: a longer reference is no prefix (and SQLite refuses a LIKE
    # pattern of 50,000 characters or more: "LIKE or GLOB pattern too complex").
    if MIN_ID_PREFIX <= len(ref) <= ID_CHARS:
        matches = session.scalars(
            select(Batch).where(Batch.id.startswith(ref.lower(), autoescape=True)).limit(2)
        ).all()
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise NotFoundError(f"batch id prefix {ref!r} is ambiguous: give more characters or the name")
    raise _no_such_batch(ref)


def lock_batch(session: Session, ref: str) -> Batch:
    """:func:`get_batch`, its row then locked until the transaction ends and read again.

    What a change that first checks the batch (``cancel``, ``pause``, ``resume``) reads: on
    PostgreSQL ``SELECT … FOR UPDATE`` makes a concurrent change of the same batch wait for this
    transaction, and then see what it committed (a second cancel finds the batch cancelled), so
    exactly one of several concurrent calls changes it. SQLite ignores ``FOR UPDATE``: there
    :func:`jobs.db.session_scope`'s ``BEGIN IMMEDIATE`` already serialises writing transactions.
    """
    found = get_batch(session, ref)
    locked = session.scalar(
        select(Batch)
        .where(Batch.id == found.id)
        .with_for_update()
        .execution_options(populate_existing=True)  # the row as it is now, not as first read
    )
    if locked is None:  # deleted between the two reads
        raise _no_such_batch(ref)
    return locked


def _no_such_batch(ref: str) -> NotFoundError:
    """What a reference that names no batch is told: ``ref`` cut at 80 characters, control
    characters escaped and the bytes of a command line no encoding decoded shown as ``\\xc3``
    (:func:`jobs.printable.one_line`), never as ``\\udcc3`` (``{ref!r}`` did: a lone surrogate
    to every JSON parser that reads ``--json``'s error, and not the bytes the user typed)."""
    shown = one_line(ref) if len(ref) <= 80 else one_line(ref[:80]) + "…"
    return NotFoundError(
        f"no batch '{shown}': give a batch name, its id, or an id prefix of at least "
        f"{MIN_ID_PREFIX} characters (`wanbatch status` lists batches)"
    )


def _other_batch_with_id_prefix(session: Session, prefix: str, not_id: str) -> Batch | None:
    return session.scalar(
        select(Batch).where(Batch.id.startswith(prefix.lower(), autoescape=True), Batch.id != not_id).limit(1)
    )


def list_batches(session: Session) -> list[Batch]:
    """Every batch, oldest first; with its (deferred) ``manifest_host``, which ``status`` names
    for each batch another machine's: read with the rows, not one query per batch."""
    query = select(Batch).options(undefer(Batch.manifest_host)).order_by(Batch.created_at, Batch.id)
    return list(session.scalars(query))


def set_batch_state(session: Session, batch_id: str, state: BatchState, reason: str | None = None) -> None:
    """Pause, resume or cancel a batch. A cancelled batch stays cancelled (returns silently)."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state != BatchState.CANCELLED)
        .values(state=state, pause_reason=reason)
        .execution_options(synchronize_session="fetch")
    )


#: What the reason of every pause for fal's refusal of the key or the account holds
#: (:func:`worker.steps.failures.pause_for_account`): how :func:`pause_for_refusal` tells a
#: repeat of that pause from a change.
ACCOUNT_PAUSE_MARK = " (the key or the account; "


def pause_for_refusal(session: Session, batch_id: str, reason: str) -> bool:
    """Pause a batch because fal refused the key or the account, ``reason`` holding
    :data:`ACCOUNT_PAUSE_MARK`; True when that changed the batch: it was active, or paused for
    something else (``wanbatch pause``, its outputs). A batch already paused for such a refusal
    only takes the newer reason (False): every call a revoked key sends is refused alike, and
    the pause is news once. A cancelled batch stays cancelled (False).

    One statement decides, so of several workers refused at once only one is told it changed
    the batch (PostgreSQL re-checks the condition on the row another transaction just updated)."""
    changed = session.execute(
        update(Batch)
        .where(
            Batch.id == batch_id,
            Batch.state != BatchState.CANCELLED,
            or_(
                Batch.state != BatchState.PAUSED,
                Batch.pause_reason.is_(None),
                ~Batch.pause_reason.contains(ACCOUNT_PAUSE_MARK, autoescape=True),
            ),
        )
        .values(state=BatchState.PAUSED, pause_reason=reason)
        .execution_options(synchronize_session="fetch")
    )
    if cast("CursorResult[Any]", changed).rowcount:
        return True
    set_batch_state(session, batch_id, BatchState.PAUSED, reason=reason)
    return False


#: How every pause for a job's local input file that is not there begins
#: (:func:`worker.steps.failures.pause_for_missing_input`: the project folder moved, its disk is
#: not mounted, the file was deleted). Nothing was sent, so the batch waits rather than fail its
#: jobs for good; submitting its manifest (from its new place) or ``run BATCH`` ends the pause.
INPUTS_PAUSE_PREFIX = "input missing: "


def paused_for_inputs(reason: str | None) -> bool:
    """Whether a batch's ``pause_reason`` is a pause for a missing input file
    (:data:`INPUTS_PAUSE_PREFIX`)."""
    return (reason or "").startswith(INPUTS_PAUSE_PREFIX)


def pause_for_inputs(session: Session, batch_id: str, reason: str) -> bool:
    """Pause an active batch because a job's local input file is not there, ``reason`` starting
    with :data:`INPUTS_PAUSE_PREFIX`; True when that changed the batch. A batch paused already
    (for this or anything else) or cancelled is left as it is (False): its other jobs that meet
    the same missing folder are news once, and another pause's reason says what to fix first.
    One statement decides, so of several submit steps only one is told it paused the batch."""
    changed = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state == BatchState.ACTIVE)
        .values(state=BatchState.PAUSED, pause_reason=reason)
        .execution_options(synchronize_session="fetch")
    )
    return bool(cast("CursorResult[Any]", changed).rowcount)


def resume_batch(session: Session, batch_id: str) -> bool:
    """The user says "go on" (runs or submits a paused batch again): the batch is active again,
    and its downloads waiting for a retry are due at once — those a full disk held back
    (:mod:`worker.steps.download`) wait for exactly this. True when the batch was paused."""
    resumed = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state == BatchState.PAUSED)
        .values(state=BatchState.ACTIVE, pause_reason=None)
        .execution_options(synchronize_session="fetch")
    )
    if not cast("CursorResult[Any]", resumed).rowcount:
        return False
    downloads_due_now(session, batch_id)
    return True


#: How every pause for outputs that cannot be kept begins (a full disk, a read-only folder,
#: storage refusing uploads; :func:`worker.steps.download._pause_for_outputs`): such a pause
#: ends by itself once an output of the batch is stored again (:func:`resume_after_outputs_stored`).
OUTPUTS_PAUSE_PREFIX = "outputs cannot "
#: What follows :data:`OUTPUTS_PAUSE_PREFIX` in a pause for downloads (fal's media host fails
#: them, or they cannot connect: :mod:`worker.steps.download_reach`), not for a disk or storage
#: that cannot keep outputs: ``wanbatch cancel`` says what it does with each apart
#: (:func:`jobs.batches.cancel_batch`).
CANNOT_DOWNLOAD = "be downloaded here"


def paused_for_downloads(reason: str | None) -> bool:
    """Whether a batch's pause ``reason`` is for downloads that cannot be made (a CDN outage,
    no way to the CDN), not for outputs that cannot be kept."""
    return (reason or "").startswith(OUTPUTS_PAUSE_PREFIX + CANNOT_DOWNLOAD)


def renew_download_pause(session: Session, batch_id: str, reason: str) -> bool:
    """A batch paused for downloads (:func:`paused_for_downloads`) takes ``reason``, its latest
    failure's, in place of the one it was paused with; True when it changed. A batch resumed,
    cancelled or paused for anything else since is left alone (one statement decides)."""
    renewed = session.execute(
        update(Batch)
        .where(
            Batch.id == batch_id,
            Batch.state == BatchState.PAUSED,
            Batch.pause_reason.startswith(OUTPUTS_PAUSE_PREFIX + CANNOT_DOWNLOAD, autoescape=True),
            Batch.pause_reason != reason,
        )
        .values(pause_reason=reason)
        .execution_options(synchronize_session="fetch")
    )
    return bool(cast("CursorResult[Any]", renewed).rowcount)


def resume_after_outputs_stored(session: Session, batch_id: str) -> bool:
    """An output of the batch was just stored: if the batch is paused because outputs could not
    be kept, that is over — it is active again, and its other downloads waiting on the disk are
    due at once. True when it was so paused.

    The warning before a run promises a full disk pauses the batch "until there is room"; with
    workers nobody runs the batch again, so the first download that is stored again (a retry
    every ``WANBATCH_RETRY_MAX_DELAY``) is the proof there is room. A pause for any other reason
    (fal refusing the account, ``wanbatch pause``) is left alone.
    """
    query = _prepared(
        ("resume-after-outputs",),
        lambda: (
            update(Batch)
            .where(
                Batch.id == bindparam("batch_id"),
                Batch.state == BatchState.PAUSED,
                Batch.pause_reason.startswith(OUTPUTS_PAUSE_PREFIX, autoescape=True),
            )
            .values(state=BatchState.ACTIVE, pause_reason=None)
        ),
    )
    resumed = _run(session, query, {"batch_id": batch_id})
    if not resumed.rowcount:
        return False
    downloads_due_now(session, batch_id)
    return True


def downloads_due_now(session: Session, batch_id: str) -> int:
    """The batch's downloads waiting for a retry, and held by nobody, are due at once; how many.

    Also what ``wanbatch cancel`` of a batch paused for its outputs does: the jobs that wait for
    the disk (due only after ``WANBATCH_RETRY_MAX_DELAY``) are tried at once — stored if there is
    room now, else ended as a cancelled batch ends them — not waited for minutes."""
    now = utcnow()
    made = session.execute(
        update(Job)
        .where(
            Job.batch_id == batch_id,
            Job.state == JobState.DOWNLOADING,
            Job.next_attempt_at > now,
            or_(Job.lease_expires_at.is_(None), Job.lease_expires_at <= now),
        )
        .values(next_attempt_at=None)
        .execution_options(synchronize_session=False)
    )
    return int(cast("CursorResult[Any]", made).rowcount)


def set_batch_budget(session: Session, batch_id: str, budget_max_usd: Decimal | None) -> None:
    """Replace a batch's budget cap (``None`` removes it).

    The dispatcher reads the cap from the batch row in the transaction that claims each job, so
    the new value governs every job sent after this commits; jobs already in flight go on.
    """
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(budget_max_usd=budget_max_usd)
        .execution_options(synchronize_session="fetch")
    )


def set_batch_manifest(session: Session, batch_id: str, text: str | None, sha256: str) -> None:
    """Record the manifest a re-submit read: its text and SHA-256 (provenance of the batch).

    The jobs an edited manifest adds were made from this text, so the batch keeps the latest
    one; jobs keep their own provenance (``registry_sha256``, ``price_table``, ``source_files``).
    """
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(manifest_text=text, manifest_sha256=sha256)
        .execution_options(synchronize_session="fetch")
    )


def _schedule_doc(schedule: Schedule | None) -> dict[str, Any] | None:
    """The stored form: NULL for "no schedule", so :func:`scheduled_batches` is one IS NOT NULL."""
    return None if schedule is None or schedule.is_empty() else schedule.as_json()


def set_batch_manifest_path(session: Session, batch_id: str, path: str) -> None:
    """Record where the batch's manifest is now (its folder was moved, or it was submitted again
    from a copy): the folder its files are named relative to, and ``rerun`` checks them from."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(manifest_path=path)
        .execution_options(synchronize_session="fetch")
    )


def set_batch_manifest_host(session: Session, batch_id: str, host: str) -> None:
    """Record the machine the batch's manifest is on now (:mod:`jobs.machine`): it was submitted
    from another machine, or first from one since the column was added."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(manifest_host=host)
        .execution_options(synchronize_session="fetch")
    )


def root_batch(session: Session, batch: Batch) -> Batch:
    """The batch a rerun (of any generation) was made from by following ``parent_batch_id`` up:
    the batch its manifest stores, whose place (``manifest_path``) its reruns follow. ``batch``
    itself when it is no rerun."""
    seen = {batch.id}
    while batch.parent_batch_id is not None:
        parent = session.get(Batch, batch.parent_batch_id)
        if parent is None or parent.id in seen:  # pragma: no cover - a foreign key keeps the parent
            break
        seen.add(parent.id)
        batch = parent
    return batch


def reruns_follow(session: Session, batch_id: str, manifest_path: str, *, chunk: int = 5000) -> list[str]:
    """Give the reruns of a batch (every generation) the batch's place: their ``manifest_path``,
    and each of their jobs the paths the job it repeats (``rerun_of``) names its files by now;
    the names of the reruns that moved, in generation order.

    Called once the batch's own jobs took the paths its manifest, submitted from its new folder,
    gives them (:func:`resubmit_jobs`): a rerun's jobs are its own copies, made with the paths of
    then, so without this every rerun of a moved project named files of the old folder and could
    not be rerun. A rerun follows only a rerun whose place differs (on each submit: reruns left
    behind by an older version, which moved only the batch, catch up too), so a submit that
    moved nothing reads one short query per generation. A job follows field by field, and only
    when both name local files by absolute path and record the same SHA-256: the path comes
    from a job the manifest placed (validated inside its folder or an allowed one), never from
    a rewritten prefix, and the bytes stay checked where they are read (``rerun``, the submit
    step) — a different file at the new path is refused as before.
    """
    followed: list[str] = []
    todo = [batch_id]
    seen = {batch_id}  # a chain edited by hand into a cycle is walked once, not forever
    while todo:
        parent_id = todo.pop(0)
        children = session.execute(
            select(Batch.id, Batch.name, Batch.manifest_path)
            .where(Batch.parent_batch_id == parent_id)
            .order_by(Batch.created_at, Batch.id)
        ).all()
        for child_id, name, path in children:
            if child_id in seen:
                continue
            seen.add(child_id)
            todo.append(child_id)
            if path == manifest_path:
                continue
            _follow_originals(session.connection(), child_id, chunk)
            set_batch_manifest_path(session, child_id, manifest_path)
            followed.append(name)
    return followed


def _follow_originals(conn: Connection, batch_id: str, chunk: int) -> None:
    """Give each job of the rerun ``batch_id`` the media paths (and their ``source_files``
    entries) of the job it repeats, where they differ and record the same bytes (see
    :func:`reruns_follow`); read in pages of ``chunk`` jobs, so a large rerun stays bounded.

    The pages go in item order, ``(item_index, variant, id)``, after the last row of the page
    before: ``ix_jobs_batch_id_item_order`` makes each page a short index range. Paged by ``id``
    alone, every page read (and sorted) all the batch's jobs, so a large batch took minutes."""
    original = _JOBS.alias("original")
    order = tuple_(_JOBS.c.item_index, _JOBS.c.variant, _JOBS.c.id)
    after: tuple[int, int, str] | None = None
    while True:
        rows = conn.execute(
            select(
                _JOBS.c.item_index,
                _JOBS.c.variant,
                _JOBS.c.id,
                _JOBS.c.endpoint,
                _JOBS.c.input,
                _JOBS.c.source_files,
                original.c.input,
                original.c.source_files,
            )
            .join(original, original.c.id == _JOBS.c.rerun_of)
            .where(
                _JOBS.c.batch_id == batch_id,
                _JOBS.c.source_files.is_not(None),
                true() if after is None else order > tuple_(*after),
            )
            .order_by(_JOBS.c.item_index, _JOBS.c.variant, _JOBS.c.id)
            .limit(chunk)
        ).all()
        if not rows:
            return
        after = (rows[-1][0], rows[-1][1], rows[-1][2])
        changes = []
        for _, _, job_id, endpoint, given, sources, their_input, their_sources in rows:
            media, files = _followed_media(endpoint, given, sources, their_input, their_sources)
            if media:
                changes.append(
                    {"b_id": job_id, "b_input": {**given, **media}, "b_sources": {**sources, **files}}
                )
        if changes:
            _set_media(conn, changes)


def _set_media(conn: Connection, changes: list[dict[str, Any]]) -> None:
    """Each ``b_id`` job's ``input`` and ``source_files`` become ``b_input`` and ``b_sources`` (a
    batch given its new place, its reruns following it): one ``UPDATE … FROM`` for all of them.

    The rows go as one JSON document, the parameter of a set-returning function
    (``jsonb_to_recordset`` on PostgreSQL, ``json_each`` on SQLite) joined to ``jobs`` by id.
    An ``executemany`` of a one-row UPDATE ran one statement per job at the database (psycopg
    pipelines them, but each is a statement): 250,000 jobs took about 45 s on PostgreSQL. One
    parameter whatever the page's size, so no driver's limit on parameters is met. SQLite gets
    each value as the text SQLAlchemy would have stored (the column type's own bind processor),
    so the stored documents are the same byte for byte."""
    if not changes:
        return
    dialect = conn.dialect
    if dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import JSONB

        doc = [{"id": c["b_id"], "i": c["b_input"], "s": c["b_sources"]} for c in changes]
        statement = text(
            "UPDATE jobs SET input = v.i, source_files = v.s "
            "FROM jsonb_to_recordset(:doc) AS v(id TEXT, i JSONB, s JSONB) WHERE jobs.id = v.id"
        ).bindparams(bindparam("doc", type_=JSONB))
    else:
        # Both columns are JSONDoc: stored as the text this makes of the value (NULL for None).
        as_text = _JOBS.c.input.type.dialect_impl(dialect).bind_processor(dialect)
        assert as_text is not None
        doc = [{"id": c["b_id"], "i": as_text(c["b_input"]), "s": as_text(c["b_sources"])} for c in changes]
        statement = text(
            "UPDATE jobs SET input = json_extract(v.value, '$.i'), "
            "source_files = json_extract(v.value, '$.s') "
            "FROM json_each(:doc) AS v WHERE jobs.id = json_extract(v.value, '$.id')"
        ).bindparams(bindparam("doc", type_=sqlite.JSON))
    conn.execute(statement, {"doc": doc})


def _followed_media(
    endpoint: str,
    given: dict[str, Any],
    sources: dict[str, Any],
    their_input: dict[str, Any] | None,
    their_sources: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The media values (and ``source_files`` entries) a rerun's job takes from the job it
    repeats: each local file named elsewhere there, with the same SHA-256 recorded."""
    media: dict[str, Any] = {}
    files: dict[str, Any] = {}
    for fld in get_endpoint(endpoint).media_fields:
        mine, theirs = given.get(fld.name), (their_input or {}).get(fld.name)
        if not (isinstance(mine, str) and isinstance(theirs, str)) or mine == theirs:
            continue
        if not (PurePath(mine).is_absolute() and PurePath(theirs).is_absolute()):
            continue  # URLs and data URIs name no folder
        my_file, their_file = sources.get(fld.name), (their_sources or {}).get(fld.name)
        if not (isinstance(my_file, dict) and isinstance(their_file, dict)):
            continue
        digest = my_file.get("sha256")
        if isinstance(digest, str) and digest == their_file.get("sha256"):
            media[fld.name], files[fld.name] = theirs, their_file
    return media, files


def set_batch_schedule(session: Session, batch_id: str, schedule: Schedule | None, priority: str) -> None:
    """Replace a batch's schedule (``None`` or empty: none) and queue priority.

    Like the budget, the dispatcher reads both from the batch row before it sends each job, so
    the new values govern every job sent after this commits; jobs already at fal go on as sent.
    """
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(schedule=_schedule_doc(schedule), priority=priority)
        .execution_options(synchronize_session="fetch")
    )


def set_batch_reuse_outputs(session: Session, batch_id: str, reuse_outputs: bool) -> None:
    """Set whether a batch's pinned-seed jobs may take an existing output (``reuse_outputs``).

    Read by the dispatcher in each claim, so it governs every job claimed after this commits.
    """
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(reuse_outputs=reuse_outputs)
        .execution_options(synchronize_session="fetch")
    )


def set_paused_by_user(session: Session, batch_id: str, paused: bool) -> None:
    """``wanbatch pause`` / ``resume``: set or clear the user's pause of a batch.

    Only the flag changes, never ``state``: a batch fal's refusal paused stays paused after a
    resume, and a cancelled one stays cancelled. Dispatchers read the flag in every round, in
    every worker on every host, so a pause stops new submits as soon as this commits.
    """
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(paused_by_user=paused)
        .execution_options(synchronize_session="fetch")
    )


def batch_schedule(batch: BatchRecord) -> Schedule:
    """The batch's :class:`~jobs.schedule.Schedule` (the empty one, always open, when it has none)."""
    return Schedule.from_json(batch.schedule)


def _has_unfinished_jobs() -> ColumnElement[bool]:
    """The batch has a job not yet terminal (an index probe on ``(batch_id, state, …)``)."""
    return exists().where(Job.batch_id == Batch.id, Job.state.in_(UNFINISHED_STATES))
