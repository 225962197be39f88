"""Every query wanbatch makes: batches, jobs, claims, state changes, money, uploads.

This is the only module that builds SQL; :mod:`jobs.db` owns the connection plumbing (engines,
sessions, migrations) and is imported from there. Nothing here commits: the caller's unit of
work (``jobs.db.session_scope``) does, so a step's state change, its event row and any claim
land together or not at all.

A job changes state through a verb named for what happened (:func:`mark_submitted`,
:func:`retry_later`, :func:`fail_job`, :func:`give_back`, :func:`mark_cancelled`, …), each taking
the :class:`Fence` its caller holds: the job, the state and the version it read, and who acts.
Three rules make concurrent workers safe:

* every verb is one compare-and-set, :func:`transition`, on the expected state and version: a
  late, duplicate or zombie worker matches 0 rows and gets ``False`` instead of overwriting
  newer progress;
* ``version`` is the fencing token. It grows on every transition and every claim, so a worker
  whose lease was taken over cannot write anything fenced with its old token;
* :func:`claim_jobs` hands each due job to exactly one claimer: ``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL (https://www.postgresql.org/docs/current/sql-select.html#SQL-FOR-UPDATE-SHARE),
  and SQLite's single writer (every transaction is ``BEGIN IMMEDIATE``) there.

Job creation writes no event row: the job row itself (``created_at``, ``version`` 0, state
``pending``) records it. That keeps :func:`add_jobs` at one row per job, which is what lets a
100,000-job manifest be stored in seconds; the history starts with the first transition.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Literal, cast

from sqlalchemy import (
    JSON,
    ColumnElement,
    Connection,
    Float,
    Select,
    Table,
    Text,
    and_,
    bindparam,
    case,
    column,
    delete,
    event,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    table,
    text,
    true,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy import cast as sa_cast
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, SessionTransaction, aliased
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.visitors import InternalTraversal

from jobs import billing, db
from jobs.endpoints import get_endpoint
from jobs.errors import NotFoundError, RequestHeldError
from jobs.models import (
    EVERY_BATCH,
    Batch,
    BatchRecord,
    BatchState,
    BatchTotals,
    ConductorHeartbeat,
    FalHold,
    InstanceSecret,
    Job,
    JobEvent,
    JobRecord,
    JobSnapshot,
    JSONDocument,
    KeyFreeText,
    Money,
    SubmitPace,
    SubmitRate,
    Upload,
    WebhookDelivery,
    WebhookInboxTotals,
    new_id,
    utcnow,
)
from jobs.money import BUDGET_ERRORS
from jobs.schedule import Schedule
from jobs.states import AT_PROVIDER_STATES, UNFINISHED_STATES, JobState, can_transition
from jobs.storable import holds_unstorable, storable_json

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql

__all__ = [
    "CANCEL_BILLED_AS",
    "DURATIONS",
    "FINISHED_EVENTS",
    "HEARTBEAT_KEPT",
    "PROVABLE_FAILURES",
    "UPLOAD_REUSE",
    "WINDOW_DUPLICATE",
    "BatchCost",
    "BatchMoney",
    "CapHolder",
    "CapScope",
    "DiffRow",
    "DuplicateNote",
    "FailureGroup",
    "FalHoldRow",
    "Fence",
    "InFlight",
    "JobHead",
    "JobMoney",
    "JobTotals",
    "LeaseHolder",
    "MetricsScope",
    "NewJob",
    "ReleasedLeases",
    "StoredProof",
    "SubmitTokens",
    "SubmitView",
    "UnfinishedBatch",
    "UnsentCancelled",
    "WindowEnd",
    "add_jobs",
    "adopt_before_resend",
    "adopt_cancelled_proof",
    "adopt_earlier_proof",
    "adopt_late_proof",
    "adopt_own_proof",
    "adopt_request",
    "adopt_requests_sent_elsewhere",
    "adopt_unknown_cancelled",
    "adopt_window_proof",
    "batch_committed_usd",
    "batch_cost",
    "batch_endpoints",
    "batch_estimated_usd",
    "batch_money",
    "batch_schedule",
    "batch_spent_usd",
    "batch_states",
    "cancel_unsent",
    "cancel_unsent_jobs",
    "cancelled_batches_with_work",
    "cap_holders",
    "claim_due",
    "claim_jobs",
    "committed_usd",
    "committed_usd_since",
    "committed_usd_today",
    "count_cancelled",
    "count_events_into",
    "count_finished_changes",
    "count_in_states",
    "count_in_states_by_endpoint",
    "count_media_mismatches",
    "count_requests",
    "count_waiting_since",
    "counts_by_state",
    "defer_delivery",
    "delivery_counts",
    "diff_rows_of_batch",
    "dispatch_batches",
    "drop_heartbeats",
    "duplicate_charge_recorded",
    "duration_buckets",
    "duration_histogram",
    "earlier_proof_adoptable",
    "expire_leases",
    "extend_lease",
    "fail_job",
    "fail_unsent",
    "failure_reasons",
    "fal_holds",
    "find_upload",
    "finished_usd",
    "first_submitted_at",
    "forget_uploads",
    "get_batch",
    "get_job",
    "get_or_create_batch",
    "give_back",
    "heartbeat_owners",
    "hold_fal",
    "hold_submits",
    "in_flight",
    "incremented",
    "instance_secret",
    "instance_secret_if_made",
    "item_inputs_of_batch",
    "job_events",
    "job_heads",
    "job_money",
    "job_snapshots",
    "job_totals",
    "jobs_of_batch",
    "jobs_of_batch_bounded",
    "last_heartbeat",
    "last_heartbeats",
    "lease_holders",
    "lease_holders_of_batches",
    "list_batches",
    "live_simulators",
    "lock_batch",
    "lock_dispatch",
    "mark_broker_down",
    "mark_cancelled",
    "mark_cancelling",
    "mark_completed",
    "mark_running",
    "mark_submit_unknown",
    "mark_submitted",
    "mark_submitting",
    "mark_succeeded",
    "name_for_batch",
    "note_duplicate_charge",
    "note_held_request",
    "note_own_request",
    "note_window_duplicate",
    "owners_last_seen",
    "pacing_peers",
    "record_duplicate_charge",
    "record_heartbeat",
    "record_result",
    "record_send",
    "record_upload",
    "refuse_held_request",
    "release_fal_hold",
    "release_lease",
    "release_process_leases",
    "request_holder",
    "request_known",
    "reruns_follow",
    "resend_unsent",
    "reserved_usd",
    "resume_after_outputs_stored",
    "resume_batch",
    "retry_later",
    "root_batch",
    "scheduled_batches",
    "sent_attempts",
    "sent_repeat",
    "set_batch_budget",
    "set_batch_manifest",
    "set_batch_manifest_path",
    "set_batch_schedule",
    "set_batch_state",
    "set_paused_by_user",
    "settle_delivery",
    "share_pacing",
    "simulated_batch_ids",
    "spent_usd",
    "status_due",
    "store_delivery",
    "stored_proof",
    "submit_view",
    "take_delivery",
    "take_lease",
    "take_pace_slot",
    "take_submit_tokens",
    "transition",
    "unfinished_batches",
    "unknown_cancel_adoptable",
    "unprocessed_deliveries",
    "update_job_fields",
    "utc_day",
    "video_bytes_per_job",
    "wasted_usd",
    "window_end",
    "window_proof_adoptable",
    "workers_broker_down_since",
    "workers_last_beat",
]

#: A batch id prefix must be at least this long to be accepted as a reference.
MIN_ID_PREFIX = 6

#: Columns a caller may set through :func:`transition` / :func:`update_job_fields`. Identity,
#: state and the fencing token are managed here and nowhere else.
_PROTECTED = frozenset({"id", "batch_id", "job_key", "state", "version", "created_at", "updated_at"})
_SETTABLE = frozenset(Job.__table__.columns.keys()) - _PROTECTED

#: A job's ``actual_usd`` is what its attempts were billed, written as each attempt ends. In
#: ``downloading`` fal has finished the current attempt (billed in full once its video is
#: stored), but its bill is written only when the download ends: until then ``actual_usd`` holds
#: only what the earlier attempts cost, and the current attempt counts at its estimate on top
#: (:func:`finished_usd`, :func:`spent_usd`). A ``succeeded`` job without a recorded cost counts
#: at its estimate.
#: Where a job leaves ``submit_unknown`` without proof that fal has its request (a webhook, a
#: late answer): failed, resent as a new attempt, cancelled. fal may have accepted (and billed)
#: the request all the same, so its estimate moves into ``ambiguous_usd`` and stays counted.
UNPROVEN_EXITS = frozenset({JobState.FAILED, JobState.RETRY_WAIT, JobState.CANCELLED})


# --------------------------------------------------------------------------- batches


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
    """
    holder = session.scalar(select(Batch).where(Batch.name == name))
    if holder is None or holder.simulated == simulated:
        return name, []
    if simulated:  # a new simulation, or the one an earlier --simulate run made
        return _simulation_slot(session, name)[0], []
    for candidate in _simulated_names(name):
        if session.scalar(select(Batch.id).where(Batch.name == candidate)) is None:
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
            was, new = child.name, parent.name + child.name[len(before) :]
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
        other = session.scalar(select(Batch).where(Batch.name == candidate))
        if other is None or other.simulated:
            return candidate, other
    raise AssertionError("unreachable: the candidate names never end")  # pragma: no cover


def is_stored(session: Session, name: str, *, simulated: bool) -> bool:
    """Whether a manifest named ``name`` already has its batch, where :func:`name_for_batch`
    finds it (a simulation's under ``NAME-simulated`` when a batch for fal holds ``NAME``)."""
    holder = session.scalar(select(Batch.simulated).where(Batch.name == name))
    if holder is None:
        return False
    if holder == simulated:
        return True
    return simulated and _simulation_slot(session, name)[1] is not None


def folder_name(batch: Batch) -> str:
    """The name a batch's outputs are filed under (its folder, its S3 prefix): its own, but a
    simulation's always ends in ``-simulated``. A simulation named ``NAME`` is renamed
    ``NAME-simulated`` when a batch for fal takes the name (:func:`name_for_batch`): had its
    videos been filed under ``NAME/``, the paid batch's folder would hold the placeholders too.
    Filed under ``NAME-simulated/`` from the start, they stay apart, under the name it ends with."""
    if not batch.simulated or _SIMULATED_NAME.fullmatch(batch.name):
        return batch.name
    return f"{batch.name}{SIMULATED_SUFFIX}"


def batch_name_taken(session: Session, name: str) -> bool:
    """Whether a batch is stored under exactly ``name``."""
    return session.scalar(select(Batch.id).where(Batch.name == name)) is not None


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
) -> tuple[Batch, bool]:
    """The batch called ``name``, creating it if needed; ``True`` when it was created now.
    (:func:`name_for_batch` first: the name a simulated or a paid batch may take.)

    Race-safe: two processes submitting the same manifest at once both end up with the one row
    the unique constraint on ``name`` lets through. An existing batch is returned unchanged
    (:func:`set_batch_budget` and :func:`set_batch_schedule` change what a new submit changes).
    """
    existing = session.scalar(select(Batch).where(Batch.name == name))
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
    """A batch by full id, by name, or by a unique id prefix of at least 6 characters.

    A reference no database can hold (a NUL, a lone surrogate) names no batch: it is not found,
    on every database alike, before any query (:func:`jobs.storable.holds_unstorable`).
    """
    ref = ref.strip()
    if holds_unstorable(ref):
        raise _no_such_batch(ref)
    found = session.get(Batch, ref)
    if found is not None:
        return found
    found = session.scalar(select(Batch).where(Batch.name == ref))
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
    """What a reference that names no batch is told (``ref`` shortened, control characters escaped)."""
    shown = ref if len(ref) <= 80 else ref[:80] + "…"
    return NotFoundError(
        f"no batch {shown!r}: give a batch name, its id, or an id prefix of at least {MIN_ID_PREFIX} "
        "characters (`wanbatch status` lists batches)"
    )


def _other_batch_with_id_prefix(session: Session, prefix: str, not_id: str) -> Batch | None:
    return session.scalar(
        select(Batch).where(Batch.id.startswith(prefix.lower(), autoescape=True), Batch.id != not_id).limit(1)
    )


def list_batches(session: Session) -> list[Batch]:
    """Every batch, oldest first."""
    return list(session.scalars(select(Batch).order_by(Batch.created_at, Batch.id)))


def set_batch_state(session: Session, batch_id: str, state: BatchState, reason: str | None = None) -> None:
    """Pause, resume or cancel a batch. A cancelled batch stays cancelled (returns silently)."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state != BatchState.CANCELLED)
        .values(state=state, pause_reason=reason)
        .execution_options(synchronize_session="fetch")
    )


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
    _downloads_due_now(session, batch_id)
    return True


#: How every pause for outputs that cannot be kept begins (a full disk, a read-only folder,
#: storage refusing uploads; :func:`worker.steps.download._pause_for_outputs`): such a pause
#: ends by itself once an output of the batch is stored again (:func:`resume_after_outputs_stored`).
OUTPUTS_PAUSE_PREFIX = "outputs cannot "


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
    _downloads_due_now(session, batch_id)
    return True


def _downloads_due_now(session: Session, batch_id: str) -> None:
    """The batch's downloads waiting for a retry, and held by nobody, are due at once."""
    now = utcnow()
    session.execute(
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


#: Key of the PostgreSQL advisory lock one dispatch round holds at a time (an arbitrary constant
#: of PostgreSQL's signed 64-bit lock keys: "dispatch" in ASCII).
_DISPATCH_LOCK_KEY = 0x6469737061746368


def lock_dispatch(session: Session) -> None:
    """Make this transaction the only dispatch round until it ends.

    A round checks the outstanding cap and the budgets against what is committed, so two rounds
    side by side would each fill them again (neither sees the other's claims). Rounds meet when
    a ``wanbatch run`` without a broker shares a PostgreSQL database with the workers' tick
    leader. There a transaction-level advisory lock makes them take turns
    (https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS), released at
    commit or rollback; on SQLite the transaction's write lock (``BEGIN IMMEDIATE``) already does.
    """
    if session.connection().dialect.name == "postgresql":
        _run(
            session,
            _prepared(("dispatch-lock",), lambda: select(func.pg_advisory_xact_lock(bindparam("key")))),
            {"key": _DISPATCH_LOCK_KEY},
        )


_SUBMIT_RATE = cast(Table, SubmitRate.__table__)
_SUBMIT_PACE = cast(Table, SubmitPace.__table__)


@dataclass(frozen=True, slots=True)
class SubmitTokens:
    """What :func:`take_submit_tokens` granted, and what the key's pacing row says besides."""

    #: Whole submits granted.
    granted: int
    #: Seconds until the next whole one (0.0 when one is left), or what is left of a 429's
    #: pause that held the grant back.
    wait: float
    #: Seconds a 429's pause, heard by any process (:func:`hold_submits`), still holds the key
    #: (0.0: none).
    held_for: float = 0.0
    #: Seconds the processes still share the key's pacing (:func:`share_pacing`; 0.0: not shared).
    shared_for: float = 0.0


def _epoch_now(dialect: str) -> Any:
    """Now, in epoch seconds, on the clock every process sharing the database compares:
    PostgreSQL's ``clock_timestamp()`` (the server's, at this statement: not ``now()``, the
    transaction's start); on SQLite, which has no server, the bound ``wall`` (the process's
    ``time.time()``: every process is on the one host that holds the file)."""
    if dialect == "postgresql":
        return func.extract("epoch", func.clock_timestamp())
    return bindparam("wall", type_=Float())


def take_submit_tokens(
    session: Session,
    api_key_id: str,
    wanted: int,
    *,
    rate: float,
    capacity: float,
    now: datetime,
    wall: float,
    hold_over: float = float("inf"),
) -> SubmitTokens:
    """Take up to ``wanted`` whole submits from the key's shared token bucket (:class:`SubmitRate`).

    Called in a dispatch round, after :func:`lock_dispatch`: rounds of every process take turns,
    so read-modify-write is safe, and ``rate`` (``WANBATCH_SUBMIT_RATE``) holds for them all
    together. The bucket refills at ``rate`` up to ``capacity`` from the time last written (a
    stamp ahead of ``now``, another host's clock, refills nothing). The same read says how long
    a 429's pause (:func:`hold_submits`) still holds the key and how long the pacing is still
    shared (:func:`share_pacing`), on the database's clock (``wall``: this process's epoch
    seconds, for SQLite); a pause longer than ``hold_over`` seconds grants nothing and takes
    nothing (its wait is what is left of it). That read of the key's :class:`SubmitPace` row
    takes no lock: the round, which keeps the bucket's row locked until it commits, never holds
    up a submit taking its slot there (:func:`take_pace_slot`).
    """
    dialect = session.connection().dialect.name

    def build() -> Any:
        clock = _epoch_now(dialect)
        key: Any = bindparam("key")

        def rate_of(column: Any) -> Any:
            return select(column).where(_SUBMIT_RATE.c.api_key_id == key).scalar_subquery()

        def pace_of(column: Any) -> Any:
            return select(column - clock).where(_SUBMIT_PACE.c.api_key_id == key).scalar_subquery()

        # One row whichever of the two rows is there (the pacing one is written by a heartbeat
        # or a 429, the bucket's by a round).
        return select(
            rate_of(_SUBMIT_RATE.c.tokens).label("tokens"),
            rate_of(_SUBMIT_RATE.c.stamp).label("stamp"),
            pace_of(_SUBMIT_PACE.c.hold_until).label("held_for"),
            pace_of(_SUBMIT_PACE.c.shared_until).label("shared_for"),
        )

    read = _prepared(("rate-read", dialect), build)
    row = _run(session, read, {"key": api_key_id, "wall": wall}).one()
    held_for = max(0.0, float(row.held_for or 0.0))
    shared_for = max(0.0, float(row.shared_for or 0.0))
    if held_for > hold_over:
        return SubmitTokens(0, held_for, held_for, shared_for)
    if row.tokens is None:
        tokens = capacity
    else:
        elapsed = max(0.0, (now - row.stamp).total_seconds())
        tokens = min(capacity, float(row.tokens) + elapsed * rate)
    granted = max(0, min(wanted, int(tokens)))
    tokens -= granted
    write = _prepared(("rate-write", dialect), lambda: _rate_upsert(dialect))
    _run(session, write, {"api_key_id": api_key_id, "tokens": tokens, "stamp": now})
    wait = 0.0 if tokens >= 1 else (1.0 - tokens) / rate
    return SubmitTokens(granted, wait, held_for, shared_for)


def _later_of(dialect: str, *values: Any) -> Any:
    """The greatest of ``values`` (SQL): ``GREATEST`` on PostgreSQL, SQLite's scalar ``max``."""
    return func.greatest(*values) if dialect == "postgresql" else func.max(*values)


def _pace_mark(dialect: str, column: str) -> Any:
    """``INSERT … ON CONFLICT DO UPDATE`` of the key's :class:`SubmitPace` row setting ``column``
    to ``seconds`` from now (the database's clock), a later time already there kept."""
    until = _epoch_now(dialect) + bindparam("seconds", type_=Float())
    new = _dialect_insert(dialect, _SUBMIT_PACE).values({"api_key_id": bindparam("key"), column: until})
    there = func.coalesce(_SUBMIT_PACE.c[column], 0.0)
    return new.on_conflict_do_update(
        index_elements=[_SUBMIT_PACE.c.api_key_id],
        set_={column: _later_of(dialect, there, new.excluded[column])},
    )


def hold_submits(session: Session, api_key_id: str, seconds: float, *, wall: float) -> None:
    """fal answered a submit of the key with 429: hold every process's submits of the key back
    for ``seconds`` from now on the database's clock (``wall``: this process's epoch seconds,
    for SQLite). Dispatch rounds that read it (:func:`take_submit_tokens`) claim nothing while it
    holds, and the slots taken before a POST (:func:`take_pace_slot`) come after it. A pause
    already longer is kept (a shorter ``Retry-After`` heard later does not cut it short)."""
    dialect = session.connection().dialect.name
    statement = _prepared(("pace-hold", dialect), lambda: _pace_mark(dialect, "hold_until"))
    _run(session, statement, {"key": api_key_id, "seconds": max(0.0, float(seconds)), "wall": wall})


def share_pacing(session: Session, api_key_id: str, seconds: float, *, wall: float) -> None:
    """Another live process shares the database: every process without a limiter Redis takes
    its submits' slots from the key's :class:`SubmitPace` row (:func:`take_pace_slot`) for the
    next ``seconds`` (the database's clock; ``wall`` for SQLite). Never shortened; each process
    that still sees another renews it at its heartbeat, and it lapses when none does."""
    dialect = session.connection().dialect.name
    statement = _prepared(("pace-share", dialect), lambda: _pace_mark(dialect, "shared_until"))
    _run(session, statement, {"key": api_key_id, "seconds": float(seconds), "wall": wall})


def _pace_slot(dialect: str) -> Any:
    """:func:`take_pace_slot`'s statement: the slot is the latest of the key's next slot, the
    end of a 429's pause and now; it is taken (the next one moves an interval on) only when it
    comes within ``max_wait``, and it returns the seconds until it (no row: not taken). A key
    with no row yet gets one, its slot now.

    One statement, its times read once it holds the row: of two processes, the second waits
    for the first's lock, then sees its slot and reads the clock then (PostgreSQL evaluates
    ``ON CONFLICT DO UPDATE``'s ``WHERE`` and ``SET`` on the row it locked, each
    ``clock_timestamp()`` when it runs; on SQLite the bound ``wall`` is read once the
    transaction holds the write lock)."""
    clock = _epoch_now(dialect)
    interval = bindparam("interval", type_=Float())
    pace = _SUBMIT_PACE.c

    def slot() -> Any:
        return _later_of(
            dialect, func.coalesce(pace.pace_at, 0.0), func.coalesce(pace.hold_until, 0.0), clock
        )

    new = _dialect_insert(dialect, _SUBMIT_PACE).values(api_key_id=bindparam("key"), pace_at=clock + interval)
    return new.on_conflict_do_update(
        index_elements=[pace.api_key_id],
        set_={"pace_at": slot() + interval},
        where=slot() - clock <= bindparam("max_wait", type_=Float()),
    ).returning((pace.pace_at - interval - clock).label("wait"))


def _pace_wait(dialect: str) -> Any:
    """The seconds until the key's next slot (:func:`_pace_slot`, none taken)."""
    clock = _epoch_now(dialect)
    pace = _SUBMIT_PACE.c
    left = _later_of(
        dialect, func.coalesce(pace.pace_at, 0.0) - clock, func.coalesce(pace.hold_until, 0.0) - clock, 0.0
    )
    return select(left.label("wait")).where(pace.api_key_id == bindparam("key"))


def take_pace_slot(
    session: Session,
    api_key_id: str,
    *,
    interval: float,
    max_wait: float,
    wall: Callable[[], float] = time.time,
) -> tuple[bool, float]:
    """Take the key's next submit slot (:class:`SubmitPace` ``pace_at``, GCRA's theoretical arrival
    time, one ``interval`` apart whichever process takes it) if it comes within ``max_wait``
    seconds: ``(True, seconds until it)`` (sleep that long, then POST); else ``(False, seconds
    until the next slot)``, nothing taken. A 429's pause (:func:`hold_submits`) comes first.
    Times are the database's (PostgreSQL's clock; on SQLite ``wall()``, this process's epoch
    seconds, read once the transaction holds the database's write lock). Called in a
    transaction of its own, right before the POST, only while processes share the database's
    pacing (:func:`share_pacing`): one statement, on a row no dispatch round locks."""
    connection = session.connection()  # SQLite: the write lock is held from here (BEGIN IMMEDIATE)
    dialect = connection.dialect.name
    params = {"key": api_key_id, "interval": float(interval), "max_wait": float(max_wait), "wall": wall()}
    taken = _run(session, _prepared(("pace-slot", dialect), lambda: _pace_slot(dialect)), params).first()
    if taken is not None:
        return True, max(0.0, float(taken.wait))
    left = _run(session, _prepared(("pace-wait", dialect), lambda: _pace_wait(dialect)), params).first()
    return False, (max(0.0, float(left.wait)) if left is not None else float(interval))


def return_submit_tokens(session: Session, api_key_id: str, unused: int, *, capacity: float) -> None:
    """Give ``unused`` submits back to the key's shared bucket (:func:`take_submit_tokens`, same
    round): a round granted more than it had jobs for. Kept, they were lost to every other
    process — a run whose jobs are all at fal still dispatches at each completion, and would
    starve a second run of the rate it does not use."""

    def build() -> Any:
        more = _SUBMIT_RATE.c.tokens + bindparam("unused", type_=Float())
        capped = case((more > bindparam("capacity", type_=Float()), bindparam("capacity")), else_=more)
        return update(_SUBMIT_RATE).where(_SUBMIT_RATE.c.api_key_id == bindparam("key")).values(tokens=capped)

    statement = _prepared(("rate-return",), build)
    _run(session, statement, {"key": api_key_id, "unused": float(unused), "capacity": float(capacity)})


def _dialect_insert(dialect: str, target: Any) -> postgresql.Insert | sqlite.Insert:
    """An ``INSERT`` into ``target`` that can take ``ON CONFLICT`` clauses, in ``dialect``'s
    (``"postgresql"`` or ``"sqlite"``) form. SQLAlchemy's PostgreSQL dialect is imported here,
    by a process that uses PostgreSQL, not by every one: about 20 ms of a SQLite process's
    start-up (``sqlalchemy.dialects.postgresql`` loads its asyncpg, pg8000 and psycopg modules)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(target)
    return sqlite.insert(target)


def _rate_upsert(dialect: str) -> Any:
    """``INSERT … ON CONFLICT (api_key_id) DO UPDATE`` replacing the bucket's state."""
    new = _dialect_insert(dialect, _SUBMIT_RATE)
    return new.on_conflict_do_update(
        index_elements=[_SUBMIT_RATE.c.api_key_id],
        set_={"tokens": new.excluded.tokens, "stamp": new.excluded.stamp},
    )


def dispatch_batches(session: Session, batch_ids: Collection[str] = ()) -> list[BatchRecord]:
    """:func:`scheduled_batches`, the simulated batches with work left, and the batches
    ``batch_ids``, in one query (a dispatch round's batches: those it may have to hold back —
    a round sends a simulated batch's jobs only when it works on that batch by name — and those
    it works on). Their columns as read (Core rows, not ORM objects: a round runs on every
    completion, and loading the batch as an object cost more than the rest of the round's reads)."""
    return list(_run(session, _held_back_query(simulated=True, whole=False), {"ids": sorted(batch_ids)}))


def batch_records(session: Session, batch_ids: Collection[str]) -> list[BatchRecord]:
    """The batches ``batch_ids`` as Core rows (every column but the manifest's text), in one
    query: those of the jobs a dispatch round claimed that :func:`dispatch_batches` did not
    read (a distributed leader works on every batch, so it knows its batches only from its
    claims). Loading each as an ORM object cost more than the claim itself."""
    if not batch_ids:
        return []

    def build() -> Any:
        return select(*_batch_columns()).where(Batch.id.in_(bindparam("ids", expanding=True)))

    return list(_run(session, _prepared(("batch_records",), build), {"ids": sorted(batch_ids)}))


def _batch_columns() -> list[Any]:
    """A batch's columns as a round reads them: all but the provenance (the manifest's text and
    a rerun's options, deferred on the model too; the text can be long and no round needs them)."""
    return [c for c in Batch.__table__.c if c.key not in ("manifest_text", "rerun_options")]


def _held_back_query(*, simulated: bool, whole: bool) -> Any:
    def build() -> Any:  # once per process: a dispatch round runs per completion
        held = [Batch.schedule.is_not(None), Batch.paused_by_user.is_(True)]
        if simulated:
            held.append(Batch.simulated.is_(True))
        return (
            (select(Batch) if whole else select(*_batch_columns()))
            .where(
                or_(
                    and_(or_(*held), _has_unfinished_jobs()),
                    Batch.id.in_(bindparam("ids", expanding=True)),
                )
            )
            .order_by(Batch.created_at, Batch.id)
        )

    return _prepared(("held_back_batches", simulated, whole), build)


def scheduled_batches(session: Session) -> list[Batch]:
    """Batches a dispatcher may have to hold back — those with a schedule or paused by their
    user — that still have work left.

    Every other batch is always sendable, and a finished one needs nothing more, so this stays
    a short list however long the database has lived: a nightly scheduled batch no longer adds a
    row to every dispatch round (one per completion) for good.
    """
    return list(session.scalars(_held_back_query(simulated=False, whole=True), {"ids": []}))


def cancelled_batches_with_work(session: Session) -> list[str]:
    """Ids of cancelled batches that still have jobs to end (unsent, or at fal), oldest first.

    The tick carries out ``wanbatch cancel`` for these; a cancelled batch whose jobs have all
    ended needs nothing more, however many of them the database holds.
    """
    query = _prepared(
        ("cancelled-with-work",),
        lambda: (
            select(Batch.id)
            .where(Batch.state == BatchState.CANCELLED, _has_unfinished_jobs())
            .order_by(Batch.created_at, Batch.id)
        ),
    )
    return [row[0] for row in _run(session, query)]


# --------------------------------------------------------------------------- creating jobs


@dataclass(frozen=True, slots=True)
class NewJob:
    """A validated, priced job ready to be stored. ``key`` identifies it within its batch."""

    key: str
    item_index: int
    endpoint: str
    input: dict[str, Any]
    est_billing_units: Decimal
    est_usd: Decimal
    #: The matrix combination's index within its item.
    variant: int = 0
    #: Provenance (see :class:`jobs.models.Job`): media sources, registry entry hash, pricing used.
    source_files: dict[str, Any] | None = None
    registry_sha256: str | None = None
    price_table: dict[str, Any] | None = None
    #: The parent batch's job this one repeats (a rerun's jobs).
    rerun_of: str | None = None


def add_jobs(
    session: Session, batch_id: str, jobs: Iterable[NewJob], *, chunk: int = 5000
) -> tuple[int, int]:
    """Store jobs, skipping those whose key the batch already has: ``(added, already_present)``.

    ``INSERT … ON CONFLICT (batch_id, job_key) DO NOTHING`` makes resubmitting a manifest (or
    two submitters racing) add nothing twice. Jobs are consumed ``chunk`` at a time, so memory
    stays bounded whatever the manifest's size. On PostgreSQL each chunk is streamed with
    ``COPY`` into a temporary table and moved over with one ``INSERT … SELECT``: several times
    faster than multi-row INSERTs, which is what keeps a 100,000-job manifest to seconds.
    A batch that already has jobs from a manifest takes :func:`resubmit_jobs` instead, which
    also gives the jobs already stored the places the manifest now gives them.
    """
    conn = session.connection()
    added = present = 0
    for block in _chunks(jobs, chunk):
        inserted = _insert_jobs(conn, batch_id, block)
        added += inserted
        present += len(block) - inserted
    return added, present


@dataclass(frozen=True, slots=True)
class Resubmitted:
    """What storing a manifest's jobs again in its batch did (:func:`resubmit_jobs`)."""

    added: int
    present: int
    #: Jobs already stored that took the ``(item_index, variant)`` the manifest now gives them.
    renumbered: int
    #: The batch's jobs whose key the manifest no longer has: kept, numbered after its items.
    not_in_manifest: int
    #: Jobs already stored whose media the manifest now names elsewhere (the same bytes under
    #: another path: its folder moved, or a file was renamed): they read them from there now.
    relocated: int = 0


def resubmit_jobs(
    session: Session,
    batch_id: str,
    jobs: Iterable[NewJob],
    item_count: Callable[[], int],
    *,
    chunk: int = 5000,
) -> Resubmitted:
    """Store a manifest's jobs in the batch it was submitted to before: the new ones added as
    :func:`add_jobs` does, and every job of the batch given a place that agrees with the manifest.

    A job is identified by its key, not by its place, so an item inserted above others, or a
    matrix reordered, leaves the jobs already stored with numbers of the old text: two jobs would
    share an ``(item_index, variant)`` and the export's numbers would not name the items of the
    manifest the batch now stores. So a job the manifest still has takes the place it has there
    (stored outputs keep their file names: the path is stored, never derived again), and a job it
    no longer has (kept: it may have been sent and paid for) is numbered after the manifest's
    ``item_count()`` items — asked once ``jobs`` is consumed, when a streamed manifest knows it —
    in the order those jobs had, each keeping its variant: no place names two jobs, and no place
    of the manifest names a job that is not there. The manifest's keys are kept in a temporary
    table of this transaction, not in memory, so a resubmit stays bounded like a submit.

    A job's key stands for its files by their bytes, not their paths, so a manifest submitted
    again from a folder it was moved to (or naming a file renamed since) finds its jobs stored
    with the old paths: each takes the manifest's media values and ``source_files``
    (:func:`_relocate_stored`): the manifest submitted now says where its files are, even when
    the old path still holds them. ``submitted_input`` (what a sent job sent) is never touched.

    Every statement that gives a stored job another item number adds the old one to its
    ``earlier_items`` (:func:`_earlier_items`): a video a try of it saved before (its name holds
    the number) is looked for under exactly those names (``worker.steps.download._downloaded_before``).
    """
    conn = session.connection()
    pg = conn.dialect.name == "postgresql"
    on_commit = " ON COMMIT DROP" if pg else ""  # SQLite's is dropped below (its rollback drops it too)
    conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {_SEEN} (job_key TEXT NOT NULL){on_commit}")
    seen = table(_SEEN, column("job_key"))
    conn.execute(delete(seen))
    staged_keys = select(table(_STAGING, column("job_key")).c.job_key)
    added = present = renumbered = relocated = 0
    for block in _chunks(jobs, chunk):
        inserted = _insert_jobs(conn, batch_id, block)
        added += inserted
        present += len(block) - inserted
        if inserted < len(block):
            relocated += _relocate_stored(conn, batch_id, block)
        if pg:  # the chunk is still in the staging table _insert_chunk_pg filled
            if inserted < len(block):
                renumbered += _place_stored_pg(conn)
            conn.execute(insert(seen).from_select(["job_key"], staged_keys))
        else:
            if inserted < len(block):
                renumbered += _place_stored_sqlite(conn, batch_id, block)
            conn.execute(insert(seen), [{"job_key": job.key} for job in block])
    stored = select(func.count()).select_from(_JOBS).where(_JOBS.c.batch_id == batch_id)
    gone = 0
    if conn.execute(stored).scalar_one() > added + present:
        rows = conn.execute(
            select(_JOBS.c.id, _JOBS.c.item_index, _JOBS.c.variant)
            .where(_JOBS.c.batch_id == batch_id, _JOBS.c.job_key.not_in(select(seen.c.job_key)))
            .order_by(_JOBS.c.item_index, _JOBS.c.variant, _JOBS.c.created_at, _JOBS.c.id)
        ).all()
        gone = len(rows)
        moves = [
            {"b_id": job_id, "b_item": item}
            for (job_id, old, _), item in zip(rows, places_after(rows, item_count()), strict=True)
            if item != old
        ]
        if moves:
            conn.execute(
                update(_JOBS)
                .where(_JOBS.c.id == bindparam("b_id"))
                .values(
                    item_index=bindparam("b_item"), earlier_items=_earlier_items(pg, bindparam("b_item"))
                ),
                moves,
            )
    conn.exec_driver_sql(f"DROP TABLE {_SEEN}")
    return Resubmitted(added, present, renumbered, gone, relocated)


def _relocate_stored(conn: Connection, batch_id: str, block: list[NewJob]) -> int:
    """Give the jobs of ``block`` stored already the media values the manifest now has, where
    they differ (the same bytes under another path, or another spelling), with its
    ``source_files``; how many changed.

    Only the endpoint's media fields are replaced: the key matched, so the rest is the same
    input, and a value stored since (never in the manifest) stays. Every such job, sent or not:
    one never sent reads its files from the new path when it is sent, one sent keeps what it
    sent (``submitted_input``) and is repeated by ``rerun`` from the new path."""
    wanted = {job.key: job for job in block}
    stored = conn.execute(
        select(_JOBS.c.id, _JOBS.c.job_key, _JOBS.c.input, _JOBS.c.source_files).where(
            _JOBS.c.batch_id == batch_id, _JOBS.c.job_key.in_(list(wanted))
        )
    ).all()
    changes = []
    for job_id, key, old_input, old_sources in stored:
        new = wanted[key]
        fields = [f.name for f in get_endpoint(new.endpoint).media_fields if f.name in new.input]
        media = {name: new.input[name] for name in fields if old_input.get(name) != new.input[name]}
        if media or old_sources != new.source_files:
            changes.append({"b_id": job_id, "b_input": {**old_input, **media}, "b_sources": new.source_files})
    if changes:
        _set_media(conn, changes)
    return len(changes)


def places_after(jobs: Sequence[tuple[Any, int, int]], first_item: int) -> list[int]:
    """The item numbers of jobs no longer in their manifest (``(id, item_index, variant)`` in
    item order), from ``first_item`` on: the jobs of one old item share a number, so its
    variants stay together; a variant seen twice in one old item (numbers stored before
    :func:`resubmit_jobs` renumbered) moves on to a number of its own, so no place names two."""
    numbers: dict[int, int] = {}
    taken: set[tuple[int, int]] = set()
    following = first_item
    out: list[int] = []
    for _, old, variant in jobs:
        item = numbers.get(old)
        if item is None or (item, variant) in taken:
            item = numbers[old] = following
            following += 1
        taken.add((item, variant))
        out.append(item)
    return out


def _chunks(jobs: Iterable[NewJob], size: int) -> Iterator[list[NewJob]]:
    source = iter(jobs)
    while block := list(itertools.islice(source, size)):
        yield block


def _insert_jobs(conn: Connection, batch_id: str, block: list[NewJob]) -> int:
    """Insert a chunk of jobs, skipping keys the batch has; how many were inserted."""
    now = utcnow()
    rows = [
        {
            "id": new_id(),
            "batch_id": batch_id,
            "job_key": job.key,
            "item_index": job.item_index,
            "variant": job.variant,
            "endpoint": job.endpoint,
            "input": job.input,
            "source_files": job.source_files,
            "registry_sha256": job.registry_sha256,
            "price_table": job.price_table,
            "rerun_of": job.rerun_of,
            "state": JobState.PENDING,
            "version": 0,
            "attempts": 0,
            "download_attempts": 0,
            "possible_duplicate_charges": 0,
            "est_billing_units": job.est_billing_units,
            "est_usd": job.est_usd,
            "created_at": now,
            "updated_at": now,
        }
        for job in block
    ]
    if conn.dialect.name == "postgresql":
        return _insert_chunk_pg(conn, rows)
    return _insert_chunk_sqlite(conn, rows)


#: The statements' value of ``earlier_items`` once the row's own ``item_index`` is appended
#: (:func:`_earlier_items`); 8 is :data:`EARLIER_ITEMS_KEPT`. PostgreSQL: the old list and the
#: number, the number's earlier place dropped, the last 8 by position.
_APPENDED_PG = (
    "(SELECT jsonb_agg(kept.e ORDER BY kept.o) FROM ("
    " SELECT t.e, t.o FROM jsonb_array_elements("
    "COALESCE(jobs.earlier_items, '[]'::jsonb) || to_jsonb(jobs.item_index)"
    ") WITH ORDINALITY AS t(e, o)"
    " WHERE t.e <> to_jsonb(jobs.item_index)"
    " OR t.o = jsonb_array_length(COALESCE(jobs.earlier_items, '[]'::jsonb)) + 1"
    " ORDER BY t.o DESC LIMIT 8) AS kept)"
)
#: SQLite: the same; ``json_group_array`` takes the rows in the order of the subquery it reads.
_APPENDED_SQLITE = (
    "(SELECT json_group_array(kept.v) FROM ("
    " SELECT last.v AS v, last.k AS k FROM ("
    " SELECT t.value AS v, t.key AS k FROM json_each(COALESCE(jobs.earlier_items, '[]')) AS t"
    " WHERE t.value IS NOT jobs.item_index"
    " UNION ALL SELECT jobs.item_index, 2147483647"
    " ORDER BY k DESC LIMIT 8) AS last ORDER BY last.k) AS kept)"
)


def _earlier_items(pg: bool, new_item: ColumnElement[Any]) -> ColumnElement[Any]:
    """``earlier_items`` of a job given the item number ``new_item``: when that is another number
    than its own (its output files' names change), its own number appended — moved to the end
    if it was there, only the last :data:`EARLIER_ITEMS_KEPT` kept — else as it was (only its
    variant moved). Computed by the statement from the row's own values, so a statement of many
    jobs stays one statement, and ordered by nothing but the order of the statements: no clock
    (:attr:`Job.earlier_items`). :data:`EARLIER_ITEMS_UNKNOWN` is kept like a number."""
    earlier = _JOBS.c.earlier_items
    appended = literal_column(_APPENDED_PG if pg else _APPENDED_SQLITE, earlier.type)
    return case((_JOBS.c.item_index != new_item, appended), else_=earlier)


def _place_stored_pg(conn: Connection) -> int:
    """Give the jobs of the staged chunk that were stored already the place staged for them
    (one ``UPDATE … FROM`` the staging table); how many moved. Only a changed place is written,
    and a changed item number is added to ``earlier_items`` (:func:`_earlier_items`)."""
    staged = table(_STAGING, column("batch_id"), column("job_key"), column("item_index"), column("variant"))
    moved = conn.execute(
        update(_JOBS)
        .where(
            _JOBS.c.batch_id == staged.c.batch_id,
            _JOBS.c.job_key == staged.c.job_key,
            or_(_JOBS.c.item_index != staged.c.item_index, _JOBS.c.variant != staged.c.variant),
        )
        .values(
            item_index=staged.c.item_index,
            variant=staged.c.variant,
            earlier_items=_earlier_items(True, staged.c.item_index),
        )
        .execution_options(preserve_rowcount=True)
    )
    return int(moved.rowcount)


def _place_stored_sqlite(conn: Connection, batch_id: str, block: list[NewJob]) -> int:
    """:func:`_place_stored_pg` for SQLite: one UPDATE per job, by the (batch_id, job_key) index."""
    moved = conn.execute(
        update(_JOBS)
        .where(
            _JOBS.c.batch_id == batch_id,
            _JOBS.c.job_key == bindparam("b_key"),
            or_(_JOBS.c.item_index != bindparam("b_item"), _JOBS.c.variant != bindparam("b_variant")),
        )
        .values(
            item_index=bindparam("b_item"),
            variant=bindparam("b_variant"),
            earlier_items=_earlier_items(False, bindparam("b_item")),
        )
        .execution_options(preserve_rowcount=True),
        [{"b_key": job.key, "b_item": job.item_index, "b_variant": job.variant} for job in block],
    )
    return int(moved.rowcount)


_JOBS = cast(Table, Job.__table__)
#: The attempt after the current one: a resend's number (:func:`retry_later`).
_NEXT_ATTEMPT = _JOBS.c.attempts + 1
#: Whether the attempt under way is the resend of a submit whose outcome stayed unknown.
_IS_RESEND = _JOBS.c.resend_attempt == _JOBS.c.attempts
#: ``possible_duplicate_charges`` once the attempt's POST is recorded as sent (:func:`record_send`).
#: The start timeout the POST replaces is kept (``earlier_start_timeout_at``): :func:`give_back`
#: puts it back when the POST is refused or never goes out (:data:`_OUTSTANDING_START_TIMEOUT`).
_RESEND_SENT: dict[str, ColumnElement[Any]] = {
    "possible_duplicate_charges": _JOBS.c.possible_duplicate_charges + case((_IS_RESEND, 1), else_=0),
    "earlier_start_timeout_at": _JOBS.c.start_timeout_at,
}
#: ``earlier_items`` once the job is sent as a new request (:func:`record_send`): without
#: :data:`EARLIER_ITEMS_UNKNOWN`, the numbers recorded kept in their order (NULL when none is
#: left). A number nobody recorded was taken from the job before schema 0032, so the file a try
#: saved under it was saved before then: never a video of a request sent now (a download takes
#: only one written since its request was sent), and only listing the folder finds it.
_UNKNOWN_DROPPED_PG = (
    "CASE WHEN jobs.earlier_items @> '[-1]'::jsonb THEN (SELECT jsonb_agg(t.e ORDER BY t.o)"
    " FROM jsonb_array_elements(jobs.earlier_items) WITH ORDINALITY AS t(e, o)"
    " WHERE t.e <> '-1'::jsonb) ELSE jobs.earlier_items END"
)
_UNKNOWN_DROPPED_SQLITE = (
    "CASE WHEN EXISTS (SELECT 1 FROM json_each(jobs.earlier_items) AS t WHERE t.value = -1)"
    " THEN (SELECT CASE WHEN count(*) = 0 THEN NULL ELSE json_group_array(kept.v) END FROM ("
    " SELECT t.value AS v FROM json_each(jobs.earlier_items) AS t WHERE t.value IS NOT -1"
    " ORDER BY t.key) AS kept) ELSE jobs.earlier_items END"
)
_SENT_PG = {**_RESEND_SENT, "earlier_items": literal_column(_UNKNOWN_DROPPED_PG, _JOBS.c.earlier_items.type)}
_SENT_SQLITE = {
    **_RESEND_SENT,
    "earlier_items": literal_column(_UNKNOWN_DROPPED_SQLITE, _JOBS.c.earlier_items.type),
}
#: ``possible_duplicate_charges`` when the attempt is given back: a resend recorded as sent
#: (its input written) that did not go out is uncounted (:func:`give_back`).
_RESEND_UNSENT = _JOBS.c.possible_duplicate_charges - case(
    (_IS_RESEND & _JOBS.c.submitted_input.is_not(None), 1), else_=0
)
#: ``start_timeout_at`` once a claimed attempt is given back (:func:`give_back`): the start
#: timeout of the request that may still be at fal. Only a resend of a submit whose outcome
#: stayed unknown (:data:`_IS_RESEND`) has one — the earlier attempt's, which the claim kept
#: (:func:`mark_submitting`) and a recorded POST replaced, keeping it aside (:func:`record_send`);
#: every other job's earlier requests have ended (fal's verdict), so it has none: NULL.
_OUTSTANDING_START_TIMEOUT = case(
    (
        _IS_RESEND,
        case(
            (_JOBS.c.sent_at.is_(None), _JOBS.c.start_timeout_at),
            else_=_JOBS.c.earlier_start_timeout_at,
        ),
    ),
    else_=None,
)
#: ``attempts`` once an attempt that was never sent is taken back (:func:`give_back`, :func:`fail_unsent`).
_NOT_COUNTED = case((_JOBS.c.attempts > 0, _JOBS.c.attempts - 1), else_=0)
#: ``ambiguous_usd`` grown by the job's estimate (:data:`UNPROVEN_EXITS`) — but not for a
#: simulation's job: its POST went to the simulator of a ``--simulate`` run, never to a provider
#: that bills, so nothing of it was possibly billed (``cost`` of a simulation says "nothing was
#: paid", and must not say "possibly billed" beside it).
_POSSIBLY_BILLED_MORE = case(
    (
        select(Batch.simulated).where(Batch.id == _JOBS.c.batch_id).scalar_subquery().is_(True),
        _JOBS.c.ambiguous_usd,
    ),
    else_=_JOBS.c.ambiguous_usd + _JOBS.c.est_usd,
)
_NEW_JOB_COLUMNS = (
    "id",
    "batch_id",
    "job_key",
    "item_index",
    "variant",
    "endpoint",
    "input",
    "source_files",
    "registry_sha256",
    "price_table",
    "rerun_of",
    "state",
    "version",
    "attempts",
    "download_attempts",
    "possible_duplicate_charges",
    "est_billing_units",
    "est_usd",
    "created_at",
    "updated_at",
)
_STAGING = "wanbatch_new_jobs"
#: The keys a resubmitted manifest has (:func:`resubmit_jobs`): a temporary table of its transaction.
_SEEN = "wanbatch_seen_keys"


def _insert_chunk_sqlite(conn: Connection, rows: list[dict[str, Any]]) -> int:
    stmt = (
        sqlite.insert(_JOBS)
        .on_conflict_do_nothing(index_elements=["batch_id", "job_key"])
        .returning(_JOBS.c.id)
    )
    return len(conn.execute(stmt, rows).all())


def _jsonb(value: Any) -> Any:
    """A JSON column's COPY value: SQL NULL for None (``JSONDoc`` is ``none_as_null``)."""
    from psycopg.types.json import Jsonb

    return None if value is None else Jsonb(value)


def _insert_chunk_pg(conn: Connection, rows: list[dict[str, Any]]) -> int:
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (LIKE jobs INCLUDING DEFAULTS) ON COMMIT DROP"
    )
    conn.exec_driver_sql(f"TRUNCATE {_STAGING}")
    money = Money()
    dialect = conn.dialect
    columns = ", ".join(_NEW_JOB_COLUMNS)
    import psycopg  # PostgreSQL only: SQLite runs never load the driver

    raw = conn.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    with raw.cursor() as cursor, cursor.copy(f"COPY {_STAGING} ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(
                (
                    row["id"],
                    row["batch_id"],
                    row["job_key"],
                    row["item_index"],
                    row["variant"],
                    row["endpoint"],
                    _jsonb(row["input"]),
                    _jsonb(row["source_files"]),
                    row["registry_sha256"],
                    _jsonb(row["price_table"]),
                    row["rerun_of"],
                    row["state"].value,
                    row["version"],
                    row["attempts"],
                    row["download_attempts"],
                    row["possible_duplicate_charges"],
                    money.process_bind_param(row["est_billing_units"], dialect),
                    money.process_bind_param(row["est_usd"], dialect),
                    row["created_at"],
                    row["updated_at"],
                )
            )
    staged = table(_STAGING, *(column(name) for name in _NEW_JOB_COLUMNS))
    moved = conn.execute(
        _dialect_insert("postgresql", _JOBS)
        .from_select(list(_NEW_JOB_COLUMNS), select(*staged.c))
        .on_conflict_do_nothing(index_elements=["batch_id", "job_key"])
        .execution_options(preserve_rowcount=True)
    )
    return int(moved.rowcount)


# --------------------------------------------------------------------------- state changes


def incremented(column: str, by: int = 1) -> ColumnElement[int]:
    """A field value meaning "the column plus ``by``".

    E.g. ``transition(…, attempts=incremented("attempts"))``.
    The increment happens in the UPDATE itself, so it is never lost to a concurrent read.
    """
    if column not in _SETTABLE:
        raise ValueError(f"cannot increment jobs.{column}")
    return getattr(Job, column) + by  # type: ignore[no-any-return]


def _check_fields(fields: dict[str, Any]) -> None:
    bad = set(fields) - _SETTABLE
    if bad:
        raise ValueError(f"not settable job fields: {sorted(bad)}")


_PREPARED: dict[tuple[Any, ...], Any] = {}


def _prepared(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """A statement built once per ``key`` and reused, its variable parts bound at execution.

    The hot queries (claims, the caps' counts, budget sums, transitions) run on every
    completion. Building a statement and deriving its cache key cost more CPU than running it
    on SQLite; a kept statement object memoises its cache key, so reusing it costs neither.
    """
    statement = _PREPARED.get(key)
    if statement is None:
        statement = _PREPARED[key] = _kept(build())
    return statement


#: Identities of the statements kept for the life of the process (:func:`_prepared`, the
#: transitions' shapes): :func:`jobs.db.run_reusable` may keep their compiled form.
_KEPT: set[int] = set()


def _kept(statement: Any) -> Any:
    """Mark ``statement`` as kept for good (its holder never lets it go) and return it."""
    _KEPT.add(id(statement))
    return statement


def _run(session: Session, statement: Any, params: Mapping[str, Any] | None = None) -> Any:
    """Execute a Core statement on the session's connection, in the session's transaction.

    ``Session.execute`` costs about twice the CPU of ``Connection.execute`` for a statement
    that loads no ORM objects (it builds an ORM execution state and runs its hooks first);
    every job runs a few dozen such statements on its way, so the hot ones come here, and the
    kept ones (:func:`_prepared`) go on to :func:`jobs.db.run_reusable`, which on SQLite and
    on PostgreSQL (psycopg) runs them on the driver directly. Changes pending on the session's
    objects are flushed first, as ``Session.execute`` would. The result answers
    ``first``/``one``/``scalar``/``all`` and iteration, its rows by index, by name and ``_mapping``.
    """
    if session.autoflush and (session.new or session.dirty or session.deleted):
        session.flush()
    connection = session.connection()
    if id(statement) in _KEPT:
        return db.run_reusable(connection, statement, params)
    return connection.execute(statement, params)


def _refuse_held_in(session: Session, job_id: str, fields: Mapping[str, Any]) -> None:
    """:func:`refuse_held_request` for a write of ``fields`` that gives the job a request id."""
    request_id = fields.get("request_id")
    if isinstance(request_id, str):
        refuse_held_request(session, job_id, request_id)


def transition(
    session: Session,
    job_id: str,
    expected: JobState,
    new: JobState,
    *,
    reason: str | None = None,
    expected_version: int | None = None,
    worker: str | None = None,
    details: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Move a job from ``expected`` to ``new`` if (and only if) it is still there.

    The one compare-and-set under every verb below (:func:`fail_job`, :func:`retry_later`, …),
    which the product calls instead: each names what happened and fixes the fields it writes.

    Returns ``False`` when the job is no longer in ``expected`` (or no longer at
    ``expected_version``): someone else moved it, and the caller must re-read rather than act.
    On success the version grows by one, ``fields`` are written in the same UPDATE, a
    :class:`JobEvent` is added, and a job reaching a terminal state gets ``finished_at`` and
    loses its lease. ``next_attempt_at`` is cleared (the job is due at once in its new state)
    unless given in ``fields``; the lease is kept for non-terminal states.

    Raises ``ValueError`` for an edge the lifecycle forbids or a field that may not be set:
    both are programming errors, not races. A ``request_id`` another job of the job's fal queue
    holds raises :class:`~jobs.errors.RequestHeldError` before anything is written
    (:func:`refuse_held_request`): every path that gives a job a request comes through here.
    Never commits.
    """
    if not can_transition(expected, new):
        raise ValueError(f"illegal job transition {expected.value} -> {new.value}")
    _check_fields(fields)
    _refuse_held_in(session, job_id, fields)
    now = utcnow()
    values: dict[str, Any] = {"next_attempt_at": None, **fields}
    if new.terminal:
        values = {"finished_at": now, "lease_owner": None, "lease_expires_at": None, **values}
    if expected == JobState.SUBMIT_UNKNOWN and new in UNPROVEN_EXITS:
        values["ambiguous_usd"] = _POSSIBLY_BILLED_MORE
    if expected in UNSENT_STATES and new in _UNBILLED_ENDS and "actual_usd" not in fields:
        # Ending without (another) send: a job never sent is billed nothing, for good.
        values["actual_usd"] = _ZERO_IF_NEVER_SENT
        values.setdefault("actual_billing_units", _ZERO_UNITS_IF_NEVER_SENT)
    if new == JobState.SUBMIT_UNKNOWN and "submitted_at" not in fields:
        # The POST went out, and fal may have accepted (and billed) it: the job was sent, when
        # its POST left (``sent_at``). Its money is then counted under that day, as it would be
        # had the answer come (:class:`BatchTotals`, the daily budget), and never under no day.
        values["submitted_at"] = func.coalesce(_JOBS.c.sent_at, literal(now, _JOBS.c.submitted_at.type))
    values.update(state=new, updated_at=now)
    # Core statements on the tables, not ORM-enabled ones, built once per shape and then only
    # executed with new parameters: every job moves several times, and building and caching an
    # ORM bulk UPDATE cost more CPU than the rest of a job's bookkeeping. The session's copy of
    # the job, if it holds one, is given the values written (it is not synchronised otherwise).
    # The event's columns; on PostgreSQL the same names are the statement's own parameters.
    event = {
        "at": now,
        "from_state": expected,
        "to_state": new,
        "reason": reason,
        "details": details,
        "worker": worker,
    }
    logged = session.connection().dialect.name == "postgresql"
    statement, params = _transition_statement(
        values, with_version=expected_version is not None, finishing=new.terminal, logged=logged
    )
    params.update(w_id=job_id, w_expected=expected, w_version=expected_version)
    if logged:
        params.update(event)
    row = _run(session, statement, params).first()
    if row is None:
        return False
    _refresh_loaded(session, job_id, row._mapping)
    if new.terminal:
        usd = finished_usd(new, row.actual_usd, row.est_usd, row.ambiguous_usd)
        _add_finished(session, row.batch_id, row.submitted_at, usd)
    if not logged:
        _run(session, _INSERT_EVENT, {"job_id": job_id, "version": row.version, **event})
    return True


_EVENTS = cast(Table, JobEvent.__table__)
_INSERT_EVENT = _kept(insert(_EVENTS))
_EVENT_COLUMNS = ("job_id", "at", "from_state", "to_state", "version", "reason", "worker")
#: What a transition's event row is written from, in this order (:func:`_with_event`).
_EVENT_ROW_COLUMNS = ("job_id", "at", "from_state", "to_state", "version", "reason", "details", "worker")

_STATEMENTS: dict[tuple[tuple[str, ...], bool, bool, bool], Any] = {}

#: What a transition to a terminal state also returns: the job's share of its batch's
#: finished money (:func:`finished_usd`) is known only once the row is written.
_FINISHING_RETURNS = ("batch_id", "submitted_at", "actual_usd", "est_usd", "ambiguous_usd")


def _transition_statement(
    values: dict[str, Any], *, with_version: bool, finishing: bool = False, logged: bool = False
) -> tuple[Any, dict[str, Any]]:
    """The UPDATE … RETURNING of a transition writing ``values``, and its parameters.

    Plain values become bound parameters of a statement kept per set of columns (a dozen
    shapes in all); a SQL expression (:func:`incremented`) makes a statement of its own.

    ``logged`` (PostgreSQL): the statement also writes the transition's :class:`JobEvent`, from
    a data-modifying ``WITH`` that inserts a row only when the UPDATE moved one, and takes the
    event's values as parameters named as its columns (``at``, ``from_state``, …). One
    statement and one round trip per move instead of two: every job moves five times, and on
    PostgreSQL each statement is a network round trip and a pass through the driver. A
    data-modifying ``WITH`` runs exactly once whether or not the outer query reads it (https://www.postgresql.org/docs/current/queries-with.html#QUERIES-WITH-MODIFYING).
    SQLite has no data-modifying ``WITH``: there the event is a second INSERT.
    """
    plain = {k: v for k, v in values.items() if not isinstance(v, ColumnElement)}
    expressions = {k: v for k, v in values.items() if isinstance(v, ColumnElement)}
    key = (tuple(sorted(plain)), with_version, finishing, logged)
    statement = None if expressions else _STATEMENTS.get(key)
    if statement is None:
        conditions = [
            _JOBS.c.id == bindparam("w_id"),
            _JOBS.c.state == bindparam("w_expected", type_=_JOBS.c.state.type),
        ]
        if with_version:
            conditions.append(_JOBS.c.version == bindparam("w_version"))
        written = {k: bindparam(f"v_{k}", type_=_JOBS.c[k].type) for k in plain}
        extra = _FINISHING_RETURNS if finishing else ()
        returned = dict.fromkeys((*plain, *expressions, "version", *extra))
        moving = (
            update(_JOBS)
            .where(*conditions)
            .values({**written, **expressions, "version": _JOBS.c.version + 1})
        )
        if logged:
            statement = _with_event(moving, returned)
        else:
            statement = moving.returning(*[_JOBS.c[name] for name in returned])
        if not expressions:
            _STATEMENTS[key] = _kept(statement)
    return statement, {f"v_{k}": v for k, v in plain.items()}


def _with_event(moving: Any, returned: Iterable[str]) -> Any:
    """``WITH moved AS (UPDATE …), logged AS (INSERT INTO job_events SELECT … FROM moved)
    SELECT … FROM moved``: a transition and its event in one statement (PostgreSQL)."""
    moved = moving.returning(*[_JOBS.c[name] for name in dict.fromkeys((*returned, "id"))]).cte("moved")
    event = select(
        moved.c.id,
        *[bindparam(name, type_=_EVENTS.c[name].type) for name in ("at", "from_state", "to_state")],
        moved.c.version,
        *[bindparam(name, type_=_EVENTS.c[name].type) for name in ("reason", "details", "worker")],
    )
    logged = insert(_EVENTS).from_select(list(_EVENT_ROW_COLUMNS), event).cte("logged")
    return select(*[moved.c[name] for name in returned]).add_cte(logged)


def finished_usd(
    state: JobState, actual_usd: Decimal | None, est_usd: Decimal, ambiguous_usd: Decimal = Decimal(0)
) -> Decimal:
    """A job's share of its batch's spent money (:class:`BatchMoney`; :func:`spent_usd` is the
    same in SQL), and so, once it is finished, of its batch's running totals: what fal billed
    its attempts (``actual_usd``) — for a succeeded job fal reported no cost for, its estimate;
    in ``downloading``, what the earlier attempts cost plus the estimate of the one fal just
    finished, whose bill is not written yet — plus what its submits whose outcome stayed
    unknown may have cost (``ambiguous_usd``)."""
    billed = actual_usd if actual_usd is not None else Decimal(0)
    if state == JobState.DOWNLOADING:
        billed += est_usd
    elif state == JobState.SUCCEEDED and actual_usd is None:
        billed = est_usd
    return billed + ambiguous_usd


#: ``session.info`` key: (batch id, day) → finished money added by this transaction, not yet written.
_FINISHED_KEY = "wanbatch.finished_usd"


def utc_day(moment: datetime | None) -> str:
    """The :class:`BatchTotals` day of a job last submitted at ``moment`` (``""``: never)."""
    return "" if moment is None else moment.astimezone(UTC).date().isoformat()


def _add_finished(session: Session, batch_id: str, submitted_at: datetime | None, usd: Decimal) -> None:
    """Count ``usd`` into the finished money of the batch (and of the day of the job's last
    submit) when this transaction commits."""
    if usd:
        pending: dict[tuple[str, str], Decimal] = session.info.setdefault(_FINISHED_KEY, {})
        key = (batch_id, utc_day(submitted_at))
        pending[key] = pending.get(key, Decimal(0)) + usd


_TOTALS = cast(Table, BatchTotals.__table__)


def _totals_upsert(dialect: str) -> Any:
    """``INSERT … ON CONFLICT (batch_id, day) DO UPDATE`` adding to the row (both dialects)."""
    new = _dialect_insert(dialect, _TOTALS)
    return new.on_conflict_do_update(
        index_elements=[_TOTALS.c.batch_id, _TOTALS.c.day],
        set_={"finished_usd": _TOTALS.c.finished_usd + new.excluded.finished_usd},
    )


@event.listens_for(Session, "before_commit")
def _write_finished(session: Session) -> None:
    """Add the finished money of this transaction's jobs to their totals, last and in key
    order: two transactions that finish jobs of the same batches then take these row locks in
    the same order, after every job row lock they need (no lock cycle through them)."""
    pending: dict[tuple[str, str], Decimal] | None = session.info.pop(_FINISHED_KEY, None)
    if not pending:
        return
    dialect = session.connection().dialect.name
    upsert = _prepared(("finished-add", dialect), lambda: _totals_upsert(dialect))
    for (batch_id, day), usd in sorted(pending.items()):
        _run(session, upsert, {"batch_id": batch_id, "day": day, "finished_usd": usd})


@event.listens_for(Session, "after_transaction_end")
def _forget_finished(session: Session, transaction: SessionTransaction) -> None:
    """A rolled-back transaction's finished money never happened (a committed one's is written)."""
    if transaction.parent is None:
        session.info.pop(_FINISHED_KEY, None)


def _refresh_loaded(session: Session, job_id: str, written: Mapping[Any, Any]) -> None:
    """Give the session's copy of ``job_id``, if it holds one, the values just written (a Core
    UPDATE does not touch the identity map; callers keep using the object after the session
    closes, so it is updated in place rather than expired)."""
    loaded = session.identity_map.get(identity_key(Job, job_id))
    if loaded is not None:
        for name, value in written.items():  # the model's attributes are named as its columns
            set_committed_value(loaded, name, value)


def update_job_fields(session: Session, job_id: str, *, expected_version: int, **fields: Any) -> bool:
    """Write non-state fields (request id, URLs, progress) fenced by ``version``; no bump.

    Returns ``False`` when the job moved on (its version changed), i.e. the caller's lease or
    view is stale and it must not act further.
    """
    _check_fields(fields)
    if not fields:
        raise ValueError("update_job_fields needs at least one field")
    if any(isinstance(v, ColumnElement) for v in fields.values()):
        raise ValueError("update_job_fields writes values, not SQL expressions")
    _refuse_held_in(session, job_id, fields)
    return _fenced_update(session, job_id, expected_version, {**fields, "updated_at": utcnow()}) is not None


# --------------------------------------------------------------------------- state changes, by intent


@dataclass(frozen=True, slots=True)
class Fence:
    """A job as one worker holds it: every verb below is fenced by it, taken once.

    ``state`` and ``version`` are what the worker read: a verb moves the job only if it is still
    exactly there, and returns ``False`` otherwise (someone else moved it; re-read, never act).
    ``owner`` is who acts: it is written on the event row, and a verb that leases the job
    leases it to ``owner``.
    """

    job_id: str
    state: JobState
    version: int
    owner: str | None = None

    @classmethod
    def of(cls, job: JobRecord, owner: str | None = None) -> Fence:
        """The fence of a job just read (or claimed) by ``owner``."""
        return cls(job.id, JobState(job.state), job.version, owner)

    def moved(self, state: JobState) -> Fence:
        """The same hold once a verb fenced by it moved the job to ``state``: every move writes
        ``version + 1`` where the version is this one (:func:`transition`), so the new one is
        known without reading the job again."""
        return replace(self, state=state, version=self.version + 1)

    def at(self, version: int) -> Fence:
        """The same hold once the version moved on to ``version`` (e.g. by :func:`take_lease`)."""
        return replace(self, version=version)


#: Fields that let go of a job's lease.
_UNLEASED: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
#: Fields of a request at fal: the request is gone, or not known (a submit's lost answer).
_FORGET_REQUEST: dict[str, Any] = {
    "request_id": None,
    "gateway_request_id": None,
    "status_url": None,
    "response_url": None,
    "cancel_url": None,
}
#: The URLs of a request at fal, which only a request fal holds needs.
_FORGET_URLS: dict[str, Any] = {"status_url": None, "response_url": None, "cancel_url": None}


def _move(session: Session, fence: Fence, new: JobState, reason: str, **fields: Any) -> bool:
    return transition(
        session,
        fence.job_id,
        fence.state,
        new,
        reason=reason,
        expected_version=fence.version,
        worker=fence.owner,
        **fields,
    )


def mark_submitting(
    session: Session, fence: Fence, *, attempt: int, api_key_id: str, lease_expires_at: datetime
) -> bool:
    """``pending``/``retry_wait`` → ``submitting``: attempt number ``attempt`` is about to be sent
    with ``api_key_id``, leased to ``fence.owner``. An earlier attempt's input and send time are
    forgotten: each attempt records them right before its POST (:func:`record_send`). Its
    ``start_timeout_at`` is kept until then (:func:`record_send` writes the new one, None too):
    a claimed resend dropped for the earlier attempt's proof (:func:`adopt_before_resend`) keeps
    that attempt's request, which was sent with it."""
    return _move(
        session,
        fence,
        JobState.SUBMITTING,
        f"attempt {attempt}",
        attempts=attempt,
        api_key_id=api_key_id,
        submitted_input=None,
        sent_at=None,
        lease_owner=fence.owner,
        lease_expires_at=lease_expires_at,
    )


def mark_submitted(
    session: Session,
    fence: Fence,
    *,
    running: bool,
    request_id: str,
    gateway_request_id: str | None,
    status_url: str | None,
    response_url: str | None,
    cancel_url: str | None,
    submitted_at: datetime,
    next_poll_at: datetime,
) -> bool:
    """``submitting`` → ``queued`` (``running`` when fal started it at once): fal accepted the
    request as ``request_id``. From ``submit_unknown`` it is the late answer to a POST the
    reconciler had given up on: the proof that the request exists."""
    late = "late answer: " if fence.state == JobState.SUBMIT_UNKNOWN else ""
    return _move(
        session,
        fence,
        JobState.RUNNING if running else JobState.QUEUED,
        f"{late}accepted as {request_id}",
        request_id=request_id,
        gateway_request_id=gateway_request_id,
        status_url=status_url,
        response_url=response_url,
        cancel_url=cancel_url,
        submitted_at=submitted_at,
        next_attempt_at=next_poll_at,
        error=None,
        error_type=None,
        **_UNLEASED,
    )


def adopt_request(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    gateway_request_id: str | None,
    submitted_at: datetime,
    next_poll_at: datetime,
    proof: str = "proved by webhook",
    **fetched: Any,
) -> bool:
    """``submitting``/``submit_unknown`` → ``queued``: fal's signed webhook for this job's current
    attempt proves it accepted the POST whose answer we never stored, as ``request_id`` — or
    the journal of the process that sent it does, which had the answer but no database to
    write it to (``proof`` says which). The job keeps that request (never resent); its URLs are
    derived from the configured queue. ``fetched``: what a webhook carries of fal's result
    (:func:`adopt_late_proof`)."""
    return _move(
        session,
        fence,
        JobState.QUEUED,
        f"{proof}: accepted as {request_id}",
        request_id=request_id,
        gateway_request_id=gateway_request_id,
        status_url=None,
        response_url=None,
        cancel_url=None,
        submitted_at=submitted_at,
        next_attempt_at=next_poll_at,
        error=None,
        error_type=None,
        **_UNLEASED,
        **fetched,
    )


def _same_request_elsewhere(other: Any, request_id: Any, job_id: Any, origin: Any) -> ColumnElement[bool]:
    """The one rule of which jobs hold "the same request" as job ``job_id`` would with
    ``request_id`` in fal queue ``origin``: ``other`` (:class:`~jobs.models.Job`, an alias of it,
    or the jobs table's columns) is another job holding that id, sent to that queue or to one
    nobody recorded (sent before schema 0034); an ``origin`` nobody recorded (NULL) matches every
    queue. An id is
    fal's within one queue: a job of another queue (another simulator, another deployment
    sharing the database) holding the same id holds another request.
    :func:`request_holder` and :func:`adopt_requests_sent_elsewhere` both read it."""
    origin_expr = origin if isinstance(origin, ColumnElement) else literal(origin, Job.fal_origin.type)
    return and_(
        other.request_id == request_id,
        other.id != job_id,
        or_(origin_expr.is_(None), other.fal_origin.is_(None), other.fal_origin == origin_expr),
    )


def request_holder(session: Session, job_id: str, request_id: str) -> str | None:
    """The id of another job than ``job_id`` that holds fal's request ``request_id`` in the
    fal queue ``job_id`` was sent to (its ``Job.fal_origin``: :func:`_same_request_elsewhere`),
    else None.

    fal's request ids are UUIDs, one per accepted POST: no path gives two jobs one request (a
    job taking another's output, ``reuse_outputs`` or a staged video, records ``reused_from``,
    never the request; a rerun's job sends its own; a late answer or a webhook's proof is kept
    by the job whose attempt it names). So an id another job holds — in a submit's answer, a
    webhook's proof, a journal's entry, a late answer — is a provider protocol error, and the
    job must not follow that request: its result is the other job's video, billed to it once
    already. Every write of a request id to a job checks it, in the transaction that writes it
    (:func:`transition`, :func:`update_job_fields`: :class:`~jobs.errors.RequestHeldError`);
    on PostgreSQL a transaction-level advisory lock on the id makes two jobs given one id take
    turns (under READ COMMITTED neither would see the other's uncommitted row). No unique
    index: simulations started with a fixed seed repeat their ids in one database (on
    different queues), and a database may already hold such duplicates."""
    params = {"job_id": job_id, "request_id": request_id}
    if session.connection().dialect.name == "postgresql":
        lock = _prepared(
            ("request-lock",),
            lambda: select(func.pg_advisory_xact_lock(func.hashtext(bindparam("request_id")))),
        )
        _run(session, lock, params)
    holder: str | None = _run(
        session, _prepared(("request-holder",), _request_holder_statement), params
    ).scalar()
    return holder


def _request_holder_statement() -> Any:
    """:func:`request_holder`'s query, built once (:func:`_prepared`): it runs in every submit's
    transaction, and building it (an alias and a subquery) cost more than the submit's POST."""
    mine = _JOBS.alias("mine")
    origin = select(mine.c.fal_origin).where(mine.c.id == bindparam("job_id")).scalar_subquery()
    return (
        select(_JOBS.c.id)
        .where(_same_request_elsewhere(_JOBS.c, bindparam("request_id"), bindparam("job_id"), origin))
        .limit(1)
    )


def refuse_held_request(session: Session, job_id: str, request_id: str) -> None:
    """Raise :class:`~jobs.errors.RequestHeldError` when another job of ``job_id``'s fal queue
    holds ``request_id`` (:func:`request_holder`): what every write of a request id to a job
    checks first, and what a path that would act on a request for a job (a late answer's
    cancel at fal, a webhook's duplicate charge) asks before it does."""
    holder = request_holder(session, job_id, request_id)
    if holder is not None:
        raise RequestHeldError(job_id, request_id, holder)


def note_held_request(
    session: Session,
    job_id: str,
    *,
    reason: str,
    worker: str | None,
    error: str | None = None,
    fence: Fence | None = None,
) -> bool:
    """Put on ``job_id``'s history that fal named, for one of its attempts, a request another
    job holds (:class:`~jobs.errors.RequestHeldError`; ``reason`` names the request and that
    job, never "accepted as <id>": the request is not the job's, :func:`request_known`), and
    with ``error`` say so in the job's error too (a ``submit_unknown`` job stays there: the
    error is what ``status`` shows of it). An event that moves nothing, as :func:`note_request`
    writes, no version bump; once per ``reason`` (a journal read again notes nothing more).
    ``fence``: only while the job is still where it saw it (state and version). False when
    there is no such job (or it moved on), or the note is there already."""
    locked = update(_JOBS).where(_JOBS.c.id == job_id).values(updated_at=utcnow())
    if fence is not None:
        locked = locked.where(_JOBS.c.state == fence.state, _JOBS.c.version == fence.version)
    row = _run(session, locked.returning(_JOBS.c.state, _JOBS.c.version)).first()
    if row is None:
        return False
    noted = select(JobEvent.id).where(
        JobEvent.job_id == job_id, JobEvent.from_state == JobEvent.to_state, JobEvent.reason == reason
    )
    if session.scalar(noted.limit(1)) is not None:
        return False
    if error is not None:
        _run(session, update(_JOBS).where(_JOBS.c.id == job_id).values(error=error))
        _refresh_loaded(session, job_id, {"error": error})
    event = {"job_id": job_id, "at": utcnow(), "from_state": row.state, "to_state": row.state}
    event.update(version=row.version, reason=reason, details=None, worker=worker)
    _run(session, _INSERT_EVENT, event)
    return True


#: What a failed job's error type says when it failed only because its submit's outcome stayed
#: unknown (:func:`adopt_late_proof`; ``worker.steps.failures.settle_unknown_submit``).
SUBMIT_UNKNOWN_ERROR = "submit_unknown"
#: What a rerun's job cancelled before its POST says: the job it repeats kept fal's request of
#: the same input after all (:func:`adopt_late_proof`), so sending it would pay twice.
REPEAT_NOT_SENT_ERROR = "original_kept_late_request"


def _locked_unmoved(session: Session, fence: Fence) -> Any:
    """The job's row, locked for the rest of the transaction, when it is still where ``fence``
    saw it (same state, same version); None when it is gone or has moved on. What every adoption
    of a proof checks first, before it reads the row's own conditions."""
    found = _run(session, select(_JOBS).where(_JOBS.c.id == fence.job_id).with_for_update()).first()
    if found is None or found.state != fence.state or found.version != fence.version:
        return None
    return found


def _proved_request(
    found: Any, request_id: str, gateway_request_id: str | None, next_poll_at: datetime
) -> dict[str, Any]:
    """What a job that adopts a request proved after the fact (:func:`adopt_late_proof`,
    :func:`adopt_before_resend`) writes: the request (its URLs derived from the configured
    queue), no error, unleased, and the estimate the unknown submit put in ``ambiguous_usd``
    ("possibly billed") taken out of it — the request is now the job's own, counted once."""
    return {
        "request_id": request_id,
        "gateway_request_id": gateway_request_id,
        "status_url": None,
        "response_url": None,
        "cancel_url": None,
        "next_attempt_at": next_poll_at,
        "error": None,
        "error_type": None,
        "ambiguous_usd": found.ambiguous_usd - min(found.ambiguous_usd, found.est_usd),
        **_UNLEASED,
    }


def adopt_late_proof(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    gateway_request_id: str | None,
    attempt: int,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``failed`` → ``queued``: after ``WANBATCH_SUBMIT_UNKNOWN_DEADLINE`` (or the policy at
    once) failed the job, proof comes that fal accepted one of the job's attempts (``attempt``:
    its last, or an earlier one sent again by ``resubmit``) as ``request_id``: fal's signed
    webhook (the request finished, so fal billed it) or the submit's late answer (accepted: it
    runs, and is billed). The one move out of a terminal state
    (:mod:`jobs.states`): the job keeps that request and goes on as any adopted request does —
    polled, its video fetched; nothing is sent again. When a rerun of the job
    (``rerun --failed-only``, another batch) was sent meanwhile (:func:`sent_repeat`), fal bills
    that input twice: one more ``confirmed_duplicate_charges`` on this job, said in ``reason``;
    a rerun not sent yet is cancelled first instead (:func:`_cancel_unsent_repeats`), so the
    input is paid once.

    Only a job that failed for that reason alone qualifies: ``error_type`` ``submit_unknown``,
    ``attempt`` one it sent, no request kept, no output (so a video is never fetched over another).
    The money stays counted once: the estimate that the proved submit put in ``ambiguous_usd``
    ("possibly billed") leaves it (a later attempt's stays: still possibly billed), and the job's
    share of its batch's finished money is taken back (it is in flight again; its success counts
    it, billed in full). The row is locked first, so the figures taken back are the ones the job
    was finished with. ``fetched``: what the webhook already carries of fal's result (``provider_output``,
    ``seed``, ``actual_prompt``), kept for the download. False when the job does not qualify or
    moved on (compare-and-set on ``fence``).
    """
    if fence.state != JobState.FAILED:
        return False
    found = _locked_unmoved(session, fence)
    if (
        found is None
        or found.error_type != SUBMIT_UNKNOWN_ERROR
        or not 1 <= attempt <= found.attempts
        or found.request_id is not None
        or found.output_path is not None
    ):
        return False
    # Before any write: a request another job holds is refused with nothing done (a rerun
    # cancelled below for a request the job then does not keep would never be sent).
    refuse_held_request(session, found.id, request_id)
    before = finished_usd(JobState.FAILED, found.actual_usd, found.est_usd, found.ambiguous_usd)
    adopted = _proved_request(found, request_id, gateway_request_id, next_poll_at)
    # A rerun not sent yet is not sent at all (first: a send recorded before it is found below).
    unsent = _cancel_unsent_repeats(session, found, request_id)
    if unsent:
        reason += f"; its rerun (job {', '.join(unsent)}), not sent yet, is cancelled: nothing paid twice"
    repeat = sent_repeat(session, found)
    if repeat is not None:  # ``rerun --failed-only`` sent it too: the same input billed twice
        adopted["confirmed_duplicate_charges"] = found.confirmed_duplicate_charges + 1
        reason += (
            f"; its rerun, job {repeat}, was sent too: fal renders and bills this input twice "
            "(a confirmed duplicate charge)"
        )
    moved = _move(session, fence, JobState.QUEUED, reason, finished_at=None, **adopted, **fetched)
    if moved:
        _add_finished(session, found.batch_id, found.submitted_at, -before)
    return moved


#: The errors of a job failed while its own request was at fal, billed as a cancel (or not at
#: all) without knowing how fal ended it: the poller gave up on fal's malformed status answers
#: (``provider_protocol_error``, after a best-effort cancel), or fal's status said it did not
#: know the request (``request_not_found``). fal may have run and billed it all the same, and
#: its signed webhook then proves it (:func:`adopt_own_proof`).
PROVABLE_FAILURES = frozenset({"provider_protocol_error", "request_not_found"})


def _failure_bill(session: Session, found: Any) -> dict[str, Decimal]:
    """What the failure of ``found`` (a job in :data:`PROVABLE_FAILURES`) put in its actual cost
    for the attempt it ended: a protocol error is billed as a cancel, in fal's queue (nothing) or
    running (``worker.steps.poll._protocol_error``), by the state it failed from; a request fal
    did not know, nothing.

    The failure is the job's last move into ``failed``: an event from another state. A note on
    the failed job's history moves nothing (``failed`` → ``failed``: a confirmed duplicate
    charge, :func:`note_duplicate_charge`; a late answer, :func:`note_request`) and says
    nothing of that attempt: read as the failure, its ``failed`` would pass for "not queued",
    and a cancel while running would be taken back — from money a duplicate charge billed."""
    zero = {"actual_billing_units": Decimal(0), "actual_usd": Decimal(0)}
    if found.error_type != "provider_protocol_error":
        return zero
    into_failed = (
        select(JobEvent.from_state)
        .where(
            JobEvent.job_id == found.id,
            JobEvent.to_state == JobState.FAILED,
            or_(JobEvent.from_state.is_(None), JobEvent.from_state != JobState.FAILED),
        )
        .order_by(JobEvent.id.desc())
        .limit(1)
    )
    came_from = session.scalar(into_failed)
    queued = came_from is None or JobState(came_from) == JobState.QUEUED
    outcome = billing.Outcome.CANCELLED_IN_QUEUE if queued else billing.Outcome.CANCELLED_RUNNING
    return billing.billed(outcome, found.est_billing_units, found.est_usd)


def _taken_back(found: Any, bill: dict[str, Decimal]) -> dict[str, Any]:
    """``found``'s actual cost and billing units with ``bill`` taken back: what the end it is
    moved out of billed for the request fal now proves ran (the success bills it in full)."""
    prior: dict[str, Any] = {}
    if found.actual_usd is not None:
        prior["actual_usd"] = max(Decimal(0), found.actual_usd - bill["actual_usd"])
    if found.actual_billing_units is not None:
        units = found.actual_billing_units - bill["actual_billing_units"]
        prior["actual_billing_units"] = max(Decimal(0), units)
    return prior


def _requeue_proved(
    session: Session,
    fence: Fence,
    found: Any,
    reason: str,
    next_poll_at: datetime,
    fields: dict[str, Any],
    fetched: dict[str, Any],
) -> bool:
    """Move ``found`` (locked, unmoved) to ``queued`` on the request fal proved it ran, to fetch
    its video as any adopted request does: no error, no lease, a fresh count of malformed
    answers (``download_attempts``), ``fields`` and ``fetched`` (what fal's result carries) set.
    A job that had ended gives its share of its batch's finished money back (it is in flight
    again). The one move the ``adopt_*_proof`` functions share; compare-and-set on ``fence``."""
    state = JobState(found.state)
    before = None
    if state.terminal:
        before = finished_usd(state, found.actual_usd, found.est_usd, found.ambiguous_usd)
    moved = _move(
        session,
        fence,
        JobState.QUEUED,
        reason,
        finished_at=None,
        next_attempt_at=next_poll_at,
        error=None,
        error_type=None,
        download_attempts=0,
        **_UNLEASED,
        **fields,
        **fetched,
    )
    if moved and before is not None:
        _add_finished(session, found.batch_id, found.submitted_at, -before)
    return moved


def adopt_own_proof(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``failed`` → ``queued``: fal's signed webhook proves that it ran and finished (so billed)
    the job's own request ``request_id``, after the job failed without knowing how fal ended it
    (:data:`PROVABLE_FAILURES`): the job goes on as any adopted request does, its video fetched
    from the result the webhook carries (``fetched``), and billed as the success it is.

    Only such a job qualifies: still keeping ``request_id``, no output. The money stays counted
    once: what its failure billed for the attempt (a cancel: :func:`_failure_bill`) leaves its
    actual cost, which the success then bills in full, and its share of its batch's finished
    money is taken back (it is in flight again). Its count of malformed status answers
    (``download_attempts``) starts afresh for the download. The row is locked first. False when
    the job does not qualify or moved on (compare-and-set on ``fence``).
    """
    if fence.state != JobState.FAILED:
        return False
    found = _locked_unmoved(session, fence)
    if (
        found is None
        or found.error_type not in PROVABLE_FAILURES
        or found.request_id != request_id
        or found.output_path is not None
    ):
        return False
    bill = _failure_bill(session, found)
    return _requeue_proved(session, fence, found, reason, next_poll_at, _taken_back(found, bill), fetched)


#: The key, in the details of the event that ends a job ``cancelled`` on fal's word that our
#: cancel ended its request (``worker.steps.poll.record_completion``, a deadline's cancel), of
#: the :class:`~jobs.billing.Outcome` that cancel was billed as: what :func:`adopt_cancelled_proof`
#: takes back once fal proves it ran the request to the end after all.
CANCEL_BILLED_AS = "billed_as"
#: The states from which a job ends ``cancelled`` on fal's word about its own request.
_CANCELLED_AT_FAL = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING})


def _into_cancelled(session: Session, job_id: str) -> Any:
    """The job's last move into ``cancelled`` (its ``from_state`` and ``details``), or None: a
    note on a cancelled job's history moves nothing (``cancelled`` → ``cancelled``) and is not
    it."""
    into_cancelled = (
        select(JobEvent.from_state, JobEvent.details)
        .where(
            JobEvent.job_id == job_id,
            JobEvent.to_state == JobState.CANCELLED,
            or_(JobEvent.from_state.is_(None), JobEvent.from_state != JobState.CANCELLED),
        )
        .order_by(JobEvent.id.desc())
        .limit(1)
    )
    return session.execute(into_cancelled).first()


def _cancel_bill(session: Session, found: Any) -> dict[str, Decimal] | None:
    """What the cancel that ended ``found`` (a ``cancelled`` job) put in its actual cost for its
    request, or None when it was not ended there by fal's word on that request (a budget, or
    ``wanbatch cancel`` of a job fal held none of: it keeps at most an ended request's id).

    The cancel is the job's last move into ``cancelled`` (a note on its history moves nothing,
    ``cancelled`` → ``cancelled``); its details say how it was billed. One recorded before they
    did: billed as running when fal reported run time or its history since the submit has it
    ``running`` (:func:`seen_running_since_submit`, the rule the poller applied), else as in
    fal's queue."""
    event = _into_cancelled(session, found.id)
    if event is None or event.from_state is None or JobState(event.from_state) not in _CANCELLED_AT_FAL:
        return None
    said = (event.details or {}).get(CANCEL_BILLED_AS) if isinstance(event.details, dict) else None
    if said in {o.value for o in billing.Outcome}:
        outcome = billing.Outcome(said)
    elif billing.ran(found.provider_metrics) or seen_running_since_submit(session, found.id):
        outcome = billing.Outcome.CANCELLED_RUNNING
    else:
        outcome = billing.Outcome.CANCELLED_IN_QUEUE
    return billing.billed(outcome, found.est_billing_units, found.est_usd)


def adopt_cancelled_proof(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``cancelled`` → ``queued``: fal's signed webhook proves that it ran and finished (so billed
    in full) the job's own request ``request_id``, which fal's status had said our cancel ended
    (``wanbatch cancel``, the dashboard's, a deadline's): fal's cancel of a running request is
    best effort, and the model may finish it anyway. The job goes on as any adopted request
    does, its video fetched from the result the webhook carries (``fetched``), and billed as the
    success it is — as a request that finishes while ``cancelling`` is (``cancelling`` →
    ``downloading``). Its batch stays cancelled: nothing is sent.

    Only such a job qualifies (:func:`_cancel_bill`): still keeping ``request_id``, no output.
    The money stays counted once: what the cancel billed (nothing in fal's queue, in full
    running) leaves its actual cost, which the success then bills in full, and its share of its
    batch's finished money is taken back (it is in flight again). The row is locked first.
    False when the job does not qualify or moved on (compare-and-set on ``fence``).
    """
    if fence.state != JobState.CANCELLED:
        return False
    found = _locked_unmoved(session, fence)
    if found is None or found.request_id != request_id or found.output_path is not None:
        return False
    bill = _cancel_bill(session, found)
    if bill is None:
        return False
    return _requeue_proved(session, fence, found, reason, next_poll_at, _taken_back(found, bill), fetched)


#: The states a request is at fal in, as the job's history records it; the move out of them is
#: how we recorded that request's end (:func:`window_end`).
_AT_FAL_STATES = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING})
#: Where a window's end (or fal's start timeout) puts a job whose request it ended
#: (:func:`requeue_after_cancel`).
_REQUEUED = frozenset({JobState.PENDING, JobState.RETRY_WAIT})


@dataclass(frozen=True)
class WindowEnd:
    """How we recorded the end of a request of a job that a batch's window end (or fal's start
    timeout) cancelled, the job put back to wait for the next window (:func:`window_end`):
    ``requeued_to`` (``pending``: unbilled, counted in ``unstarted_requests``; ``retry_wait``:
    billed, it had started) and what the cancel put in the job's actual cost for it (``bill``)."""

    requeued_to: JobState
    bill: dict[str, Decimal]


def _names_request(reason: str | None, request_id: str) -> bool:
    """Whether an event's ``reason`` says fal accepted ``request_id`` ("accepted as <id>"),
    that id and not one it begins."""
    text = reason or ""
    marker = f"accepted as {request_id}"
    start = text.find(marker)
    while start >= 0:
        end = start + len(marker)
        if end == len(text) or not (text[end].isalnum() or text[end] in "-_"):
            return True
        start = text.find(marker, end)
    return False


def window_end(session: Session, found: Any, request_id: str) -> WindowEnd | None:
    """How the job ``found`` recorded the end of its request ``request_id`` when a window's end
    (or the start timeout its submit carried) cancelled it and the job went back to wait for
    the next window (:func:`requeue_after_cancel`, from ``worker.steps.schedule.end_unstarted``);
    None when that request ended otherwise (a failure, a success, the user's cancel), or has not
    ended, or was never the job's.

    The request's end is the latest move of the job out of fal's states (``queued``,
    ``running``, ``cancelling``) since fal accepted it (the last move that says "accepted as
    <id>"): a request adopted back once (:func:`adopt_window_proof`) has ended otherwise since.
    The move says how the cancel was billed (its details' :data:`CANCEL_BILLED_AS`); one recorded
    before it did is read as unbilled when it went to ``pending`` (only a request that never
    ran goes there), and not at all otherwise (``retry_wait`` may be a failure's)."""
    events = session.execute(
        select(JobEvent.from_state, JobEvent.to_state, JobEvent.reason, JobEvent.details)
        .where(JobEvent.job_id == found.id)
        .order_by(JobEvent.id)
    ).all()
    accepted = False
    last_exit: Any = None
    for moved in events:
        if moved.from_state is None or moved.from_state == moved.to_state:
            continue  # a note (a duplicate charge, a late answer) moves nothing
        moved_from, moved_to = JobState(moved.from_state), JobState(moved.to_state)
        if moved_to in _AT_FAL_STATES and _names_request(moved.reason, request_id):
            accepted, last_exit = True, None
        elif moved_to in _AT_FAL_STATES and "accepted as " in (moved.reason or ""):
            accepted = False  # another request of the job: the one asked for had ended before
        elif accepted and moved_from in _AT_FAL_STATES and moved_to not in _AT_FAL_STATES:
            last_exit = moved
    if last_exit is None or JobState(last_exit.to_state) not in _REQUEUED:
        return None
    details = last_exit.details if isinstance(last_exit.details, dict) else {}
    said = details.get(CANCEL_BILLED_AS)
    requeued_to = JobState(last_exit.to_state)
    if said in {o.value for o in billing.Outcome}:
        outcome = billing.Outcome(said)
    elif requeued_to == JobState.PENDING:
        outcome = billing.Outcome.CANCELLED_IN_QUEUE
    else:
        return None
    return WindowEnd(requeued_to, billing.billed(outcome, found.est_billing_units, found.est_usd))


#: The states from which a job adopts its own request that a window's end was said to end
#: (:func:`adopt_window_proof`): waiting for the next window, claimed for it but its POST not
#: sent, or ended since without sending again (a cancel of its batch, the deadline).
_WINDOW_PROOF_STATES = frozenset(
    {JobState.PENDING, JobState.RETRY_WAIT, JobState.SUBMITTING, JobState.CANCELLED}
)


def window_proof_adoptable(job: Any) -> bool:
    """Whether ``job`` (a :class:`~jobs.models.Job` or a row of its columns), still keeping the
    request a window's end was said to end, has sent nothing since: it waits for the next window
    (``pending``, ``retry_wait``, or ``submitting`` before its POST is recorded as sent) or ended
    unsent (``cancelled``), no output. A proof that fal ran that request to the end is then
    adopted (:func:`adopt_window_proof`); once the job sent again, it is a duplicate charge."""
    state = JobState(job.state)
    if state not in _WINDOW_PROOF_STATES or job.output_path is not None or job.request_id is None:
        return False
    return not (state == JobState.SUBMITTING and job.submitted_input is not None)


def adopt_window_proof(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``pending``/``retry_wait``/``submitting``/``cancelled`` → ``queued``: fal's signed webhook
    proves that it ran to the end (so billed in full) the job's own request ``request_id``, which
    its batch's window end cancelled (:func:`window_end`): fal's cancel of a running request is
    best effort. The job, which waited to send it again in the next window
    (:func:`window_proof_adoptable`), keeps that request instead and goes on as any adopted
    request does, its video fetched from the result the webhook carries (``fetched``): nothing is
    sent again, nothing is paid twice. A resend claimed by a submit step loses its lease, and its
    send (fenced by version) finds the job moved.

    The attempts are those sent (a resend claimed but not sent is not counted, as
    :func:`give_back` does); a request that was counted as never started
    (``unstarted_requests``) ran. The money stays counted once: what the window's cancel billed
    (nothing in fal's queue, in full running) leaves the job's actual cost, which the success
    then bills in full; a ``cancelled`` job's share of its batch's finished money is taken back
    (it is in flight again). The row is locked first. False when the job does not qualify or
    moved on (compare-and-set on ``fence``).
    """
    if fence.state not in _WINDOW_PROOF_STATES:
        return False
    found = _locked_unmoved(session, fence)
    if found is None or found.request_id != request_id or not window_proof_adoptable(found):
        return False
    ended = window_end(session, found, request_id)
    if ended is None:
        return False
    fields = _taken_back(found, ended.bill) | {"attempts": sent_attempts(found)}
    if ended.requeued_to == JobState.PENDING and found.unstarted_requests > 0:
        fields["unstarted_requests"] = found.unstarted_requests - 1  # it ran
    return _requeue_proved(session, fence, found, reason, next_poll_at, fields, fetched)


#: The key, in the details of the note of a confirmed duplicate charge
#: (:func:`note_window_duplicate`), of the request a window's end was said to end and fal ran.
WINDOW_DUPLICATE = "duplicate_of_window_end"


def note_window_duplicate(
    session: Session,
    job_id: str,
    request_id: str,
    *,
    reason: str,
    worker: str | None,
    now: datetime,
) -> DuplicateNote:
    """fal's signed webhook proves that it ran to the end (billed in full) ``request_id``, a
    request of the job that its batch's window end cancelled (:func:`window_end`), after the job
    sent a new request in its place: fal ran and billed the job twice, a *confirmed* duplicate
    charge. In the job's books, once: one more ``confirmed_duplicate_charges``, on its history
    (an event that moves nothing, its details naming the request), and the success's bill in
    its actual cost in place of what the window's cancel billed (nothing in fal's queue, in full
    running). A finished job's share of its batch's running totals moves by the difference.

    ``held`` while a worker holds the job's lease (it bills the job from what it read: try
    later); ``known`` when the request was counted already, or did not end at a window's end;
    ``missing``: no such job. The row is locked first."""
    found = _run(session, select(_JOBS).where(_JOBS.c.id == job_id).with_for_update()).first()
    if found is None:
        return "missing"
    if found.lease_owner is not None and found.lease_expires_at is not None and found.lease_expires_at > now:
        return "held"
    notes = session.execute(
        select(JobEvent.details).where(JobEvent.job_id == job_id, JobEvent.from_state == JobEvent.to_state)
    ).scalars()
    if any(isinstance(d, dict) and d.get(WINDOW_DUPLICATE) == request_id for d in notes):
        return "known"
    ended = window_end(session, found, request_id)
    if ended is None:
        return "known"
    state = JobState(found.state)
    own = state == JobState.SUCCEEDED  # billed its estimate when no cost was recorded (finished_usd)
    prior_usd = found.actual_usd if found.actual_usd is not None else (found.est_usd if own else Decimal(0))
    units = found.actual_billing_units
    prior_units = units if units is not None else (found.est_billing_units if own else Decimal(0))
    success = billing.billed(billing.Outcome.SUCCEEDED, found.est_billing_units, found.est_usd)
    written: dict[str, Any] = {
        "confirmed_duplicate_charges": found.confirmed_duplicate_charges + 1,
        "actual_usd": prior_usd + max(Decimal(0), success["actual_usd"] - ended.bill["actual_usd"]),
        "actual_billing_units": prior_units
        + max(Decimal(0), success["actual_billing_units"] - ended.bill["actual_billing_units"]),
    }
    if state.terminal:
        before = finished_usd(state, found.actual_usd, found.est_usd, found.ambiguous_usd)
        after = finished_usd(state, written["actual_usd"], found.est_usd, found.ambiguous_usd)
        _add_finished(session, found.batch_id, found.submitted_at, after - before)
    _run(session, update(_JOBS).where(_JOBS.c.id == job_id).values(**written, updated_at=now))
    _refresh_loaded(session, job_id, written)
    event = {"job_id": job_id, "at": now, "from_state": state, "to_state": state, "version": found.version}
    event.update(reason=reason, details={WINDOW_DUPLICATE: request_id}, worker=worker)
    _run(session, _INSERT_EVENT, event)
    return "counted"


@dataclass(frozen=True)
class StoredProof:
    """A stored success delivery (:func:`stored_proof`): which attempt of the job it proves, as
    which request, and fal's body (its ``payload`` is the result)."""

    delivery_id: int
    attempt: int
    request_id: str
    gateway_request_id: str | None
    body: dict[str, Any]


def stored_proof(session: Session, job_id: str, *, attempts: int) -> StoredProof | None:
    """The newest success fal's webhooks delivered for one of ``job_id``'s attempts 1 to
    ``attempts`` whose request the job never recorded (:func:`request_known`: not adopted, not
    counted as a duplicate charge): proof, in whatever order it came, that fal ran that attempt
    (``worker.steps.failures.settle_unknown_submit`` reads it before resending or failing a job
    whose submit's outcome stayed unknown). The latest attempt first."""
    found = (
        select(WebhookDelivery)
        .where(
            WebhookDelivery.job_id == job_id,
            WebhookDelivery.status == "OK",
            WebhookDelivery.attempt >= 1,
            WebhookDelivery.attempt <= attempts,
        )
        .order_by(WebhookDelivery.attempt.desc(), WebhookDelivery.id)
    )
    for delivery in session.scalars(found):
        if delivery.attempt is None or request_known(session, job_id, delivery.request_id):
            continue
        if request_holder(session, job_id, delivery.request_id) is not None:
            continue  # another job's request: no proof of this job's (a provider protocol error)
        body = delivery.body if isinstance(delivery.body, dict) else {}
        gateway = body.get("gateway_request_id")
        return StoredProof(
            delivery.id,
            delivery.attempt,
            delivery.request_id,
            gateway if isinstance(gateway, str) else None,
            body,
        )
    return None


#: The states of a job whose resend of an unknown submit has not gone out yet: decided
#: (``retry_wait``), given back before its POST (``pending``), or claimed but its POST not
#: recorded as sent (``submitting`` without ``submitted_input``) — :func:`resend_unsent`.
_RESEND_WAITS = frozenset({JobState.RETRY_WAIT, JobState.PENDING, JobState.SUBMITTING})


def resend_unsent(job: Any, attempt: int) -> bool:
    """Whether ``job`` (a :class:`~jobs.models.Job` or a row of its columns) is to resend its
    ``attempt``, a submit whose outcome stayed unknown (``WANBATCH_SUBMIT_UNKNOWN_POLICY``
    ``resubmit``), and that resend has not gone out: proof that fal accepted ``attempt`` then
    replaces it (:func:`adopt_before_resend`). Once the resend's POST is recorded as sent
    (``submitting`` with its input, or any later state) a proof of ``attempt`` is a duplicate."""
    return _resend_unsent_in(JobState(job.state), job, attempt)


def _resend_unsent_in(state: JobState, job: Any, attempt: int) -> bool:
    """:func:`resend_unsent` of ``job`` as it was in ``state`` (a cancel keeps its other columns)."""
    if state not in _RESEND_WAITS or job.request_id is not None or job.output_path is not None:
        return False
    if job.resend_attempt != attempt + 1:
        return False
    if state == JobState.SUBMITTING:
        return bool(job.attempts == attempt + 1 and job.submitted_input is None)
    return bool(job.attempts == attempt)


def adopt_before_resend(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    gateway_request_id: str | None,
    attempt: int,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``retry_wait``/``pending``/``submitting`` → ``queued``: proof (fal's signed webhook, or the
    submit's late answer) that fal accepted ``attempt`` as ``request_id`` comes while the job
    waits to resend that attempt, whose outcome had stayed unknown, and before the resend went
    out (:func:`resend_unsent`). The job keeps the proved request and the resend is dropped:
    nothing is paid twice.

    The attempts are those sent: ``attempt`` (a resend claimed but not sent is not counted, as
    :func:`give_back` does), and no resend is pending any more (``resend_attempt`` cleared, so a
    later retry of the request is no possible duplicate). The money stays counted once: the
    estimate the unknown submit put in ``ambiguous_usd`` ("possibly billed") leaves it, as the
    request is now the job's own, reserved while fal holds it and billed when it ends. A resend
    claimed by a submit step loses its lease: its send (:func:`record_send`, fenced by version)
    then finds the job moved and sends nothing. The row is locked first. ``fetched``: what a
    webhook carries of fal's result (:func:`adopt_late_proof`). False when the job does not
    qualify or moved on (compare-and-set on ``fence``).
    """
    if fence.state not in _RESEND_WAITS:
        return False
    found = _locked_unmoved(session, fence)
    if found is None or not resend_unsent(found, attempt):
        return False
    adopted = _proved_request(found, request_id, gateway_request_id, next_poll_at)
    return _move(
        session,
        fence,
        JobState.QUEUED,
        reason,
        attempts=attempt,
        resend_attempt=None,
        **adopted,
        **fetched,
    )


#: The states of a job that has no live request of its own and may still send one, in which a
#: proof of an earlier attempt is adopted (:func:`adopt_earlier_proof`).
_EARLIER_PROOF_STATES = frozenset({JobState.SUBMIT_UNKNOWN, *_RESEND_WAITS})


def sent_attempts(job: Any) -> int:
    """How many of ``job``'s attempts went out: a resend claimed (``submitting``) whose POST is
    not recorded as sent is not one (:func:`give_back` does not count it either)."""
    unsent = JobState(job.state) == JobState.SUBMITTING and job.submitted_input is None
    return int(job.attempts) - 1 if unsent else int(job.attempts)


def earlier_proof_adoptable(job: Any, attempt: int) -> bool:
    """Whether ``job`` (a :class:`~jobs.models.Job` or a row of its columns) is to keep a proved
    success of its ``attempt``, an earlier one than the attempt it waits on or is to send: it
    has no live request of its own and no output, and is waiting on an unknown submit
    (``submit_unknown``, no request id: then ``attempt`` is an earlier one than that submit,
    which a proof of the very attempt adopts as its own, :func:`adopt_request`), or is to send
    again (``retry_wait``, ``pending``, ``submitting`` before its POST is recorded as sent).

    A job waiting to send again may keep the id of its last accepted request (:func:`retry_later`,
    :func:`requeue_after_cancel`, :func:`give_back` keep it as history), but that request has
    ended: every move into those states is taken on fal's verdict that it ended (a failure it
    reported, a cancel or start timeout it reported done), on a POST it refused or that never
    went out (the id then an earlier, ended attempt's), or forgets the id (an unknown submit,
    :func:`mark_submit_unknown`). The job sends again, paying again: a paid success of an
    earlier attempt is kept instead. The kept request itself is never this proof
    (:func:`request_known` finds it first)."""
    state = JobState(job.state)
    if state not in _EARLIER_PROOF_STATES or job.output_path is not None:
        return False
    if state == JobState.SUBMIT_UNKNOWN and job.request_id is not None:
        return False  # never so (its request forgotten): a request kept is one fal may hold
    if state == JobState.SUBMITTING and job.submitted_input is not None:
        return False  # its POST is out: its answer or its outcome decides
    last = sent_attempts(job)
    return 1 <= attempt < last if state == JobState.SUBMIT_UNKNOWN else 1 <= attempt <= last


def adopt_earlier_proof(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    gateway_request_id: str | None,
    attempt: int,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``submit_unknown``/``retry_wait``/``pending``/``submitting`` → ``queued``: fal's signed
    webhook proves that it ran and finished (so billed) ``attempt``, an earlier submit of the job
    whose answer was lost, while the job has no live request of its own
    (:func:`earlier_proof_adoptable`): ``WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit`` sent it again,
    and that resend's answer was lost too, or failed, or it waits to send again (keeping, maybe,
    the id of a resend fal accepted and then ended without a video). The job keeps
    the proved request and its result (``fetched``, as :func:`adopt_late_proof`): nothing more is
    sent, and no paid video is dropped.

    The attempts are those sent (a resend claimed but not sent is not counted, as
    :func:`give_back` does), and no resend is pending any more. The money stays counted once:
    the proved attempt's estimate leaves ``ambiguous_usd`` ("possibly billed"; the request is
    the job's own now, billed when it ends). A later attempt whose outcome is unknown stays a
    *possible* duplicate charge: from ``submit_unknown`` its estimate moves into
    ``ambiguous_usd``, as any exit of that state without proof does (a simulation's excepted,
    never at a provider that bills); its own proof, if it comes, is a confirmed duplicate charge.
    A resend claimed by a submit step loses its lease, and its send (fenced by version) finds the
    job moved. The row is locked first. False when the job does not qualify or moved on
    (compare-and-set on ``fence``).
    """
    if fence.state not in _EARLIER_PROOF_STATES:
        return False
    found = _locked_unmoved(session, fence)
    if found is None or not earlier_proof_adoptable(found, attempt):
        return False
    adopted = _proved_request(found, request_id, gateway_request_id, next_poll_at)
    if fence.state == JobState.SUBMIT_UNKNOWN:
        simulated = session.scalar(select(Batch.simulated).where(Batch.id == found.batch_id))
        if not simulated:
            adopted["ambiguous_usd"] += found.est_usd
    return _move(
        session,
        fence,
        JobState.QUEUED,
        reason,
        attempts=sent_attempts(found),
        resend_attempt=None,
        **adopted,
        **fetched,
    )


def unknown_cancel_adoptable(session: Session, job: Any, attempt: int) -> bool:
    """Whether ``job`` (a :class:`~jobs.models.Job` or a row of its columns) ended ``cancelled``
    (``wanbatch cancel``, the dashboard's, a deadline, a budget) while ``attempt``'s request was
    the only one it had sent and not ended: its outcome unknown (from ``submit_unknown``, its
    POST's answer lost: ``attempt`` is that POST's, the job's last), or a resend of it decided
    but not sent (``retry_wait``, ``pending``, ``submitting`` before its POST was recorded as
    sent: :func:`resend_unsent` as it was then). No request kept, no output. The cancel sent
    nothing, and nothing was sent since (a cancelled job sends nothing): a proof that fal
    accepted ``attempt`` (a success's webhook, the submit's late answer) is then of the job's
    one request, adopted (:func:`adopt_unknown_cancelled`), not a duplicate charge. A proof of
    an earlier attempt, a resend of which went out, is one of two requests: a duplicate.

    The state the cancel came from is its move into ``cancelled`` (:func:`_into_cancelled`)."""
    if JobState(job.state) != JobState.CANCELLED or job.request_id is not None or job.output_path is not None:
        return False
    event = _into_cancelled(session, job.id)
    if event is None or event.from_state is None:
        return False
    came_from = JobState(event.from_state)
    if came_from == JobState.SUBMIT_UNKNOWN:
        return bool(attempt >= 1 and job.attempts == attempt)
    return _resend_unsent_in(came_from, job, attempt)


def adopt_unknown_cancelled(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    gateway_request_id: str | None,
    attempt: int,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``cancelled`` → ``queued``: proof that fal accepted ``attempt`` as ``request_id`` comes
    after a cancel ended the job while that request was its only one, its outcome unknown
    (:func:`unknown_cancel_adoptable`): fal's signed webhook (it ran the request to the end:
    billed in full) or the submit's late answer once fal ran it anyway (a cancel of it did not
    stop it). The job keeps that request and goes on as any adopted request does, its video
    fetched (``fetched``: what a webhook carries of fal's result, :func:`adopt_late_proof`), and
    billed once, as the success it is. Its batch stays cancelled: nothing is sent.

    The attempts are those sent (``attempt``), no resend is pending any more. The money stays
    counted once: the estimate the unknown submit put in ``ambiguous_usd`` ("possibly billed")
    leaves it — the request is the job's own now, billed in full when its download ends — and
    the job's share of its batch's finished money is taken back (it is in flight again). The
    row is locked first. False when the job does not qualify or moved on (compare-and-set on
    ``fence``).
    """
    if fence.state != JobState.CANCELLED:
        return False
    found = _locked_unmoved(session, fence)
    if found is None or not unknown_cancel_adoptable(session, found, attempt):
        return False
    before = finished_usd(JobState.CANCELLED, found.actual_usd, found.est_usd, found.ambiguous_usd)
    adopted = _proved_request(found, request_id, gateway_request_id, next_poll_at)
    moved = _move(
        session,
        fence,
        JobState.QUEUED,
        reason,
        attempts=attempt,
        resend_attempt=None,
        finished_at=None,
        download_attempts=0,
        **adopted,
        **fetched,
    )
    if moved:
        _add_finished(session, found.batch_id, found.submitted_at, -before)
    return moved


def mark_submit_unknown(session: Session, fence: Fence, *, why: str, due_at: datetime) -> bool:
    """``submitting`` → ``submit_unknown``: the POST may have been accepted (and billed), and
    nothing says whether it was. Due at ``due_at`` for the policy, unless proof comes first.

    The job was sent: ``submitted_at`` becomes the POST's send time (:func:`transition`). Its
    request id is unknown, so an earlier attempt's is not shown as if it were this one's (the
    error says the outcome is unknown; the history keeps the earlier ids, and a late answer or
    a webhook records this one's)."""
    return _move(
        session,
        fence,
        JobState.SUBMIT_UNKNOWN,
        f"submit outcome unknown: {why}",
        error=f"submission outcome unknown: {why}",
        error_type="submit_unknown",
        next_attempt_at=due_at,
        **_FORGET_REQUEST,
        **_UNLEASED,
    )


def retry_later(
    session: Session,
    fence: Fence,
    *,
    reason: str,
    at: datetime | None = None,
    possible_duplicate: bool = False,
    **fields: Any,
) -> bool:
    """→ ``retry_wait``: submit again at ``at`` (at once when None), as a new attempt.

    The new attempt is a new request, so its count of malformed status answers and failed
    result calls (``download_attempts``) starts afresh. ``possible_duplicate``: the attempt it
    replaces may have been accepted and billed (an ambiguous submit), so the next attempt is
    marked as its resend (``resend_attempt``). It is counted in ``possible_duplicate_charges``
    only once its POST is recorded as sent (:func:`record_send`): a job cancelled, failed or
    past its deadline before that never sent anything again. ``fields`` (the error, the cost
    so far) are written too.
    """
    extra: dict[str, Any] = {"download_attempts": 0, **fields}
    if possible_duplicate:
        extra["resend_attempt"] = _NEXT_ATTEMPT
    return _move(session, fence, JobState.RETRY_WAIT, reason, next_attempt_at=at, **_UNLEASED, **extra)


def fail_job(
    session: Session,
    fence: Fence,
    *,
    error: str,
    error_type: str | None,
    reason: str | None = None,
    **fields: Any,
) -> bool:
    """→ ``failed``, for good: ``error`` says why (and is the event's reason unless ``reason`` is
    given); ``fields`` record what else is known, such as the attempt's billed cost."""
    return _move(
        session,
        fence,
        JobState.FAILED,
        error if reason is None else reason,
        error=error,
        error_type=error_type,
        **fields,
    )


def fail_unsent(session: Session, fence: Fence, *, error: str, error_type: str | None) -> bool:
    """``submitting`` → ``failed``, for good, before the attempt's POST left this process (its
    input file changed or vanished): like :func:`give_back`, the attempt is not counted — a job
    never sent exports ``attempts`` 0 — and a job never sent is billed nothing
    (``actual_usd`` 0; one sent before keeps what its earlier attempts cost)."""
    return _move(
        session,
        fence,
        JobState.FAILED,
        error,
        error=error,
        error_type=error_type,
        attempts=_NOT_COUNTED,
        possible_duplicate_charges=_RESEND_UNSENT,
        actual_usd=_ZERO_IF_NEVER_SENT,
        actual_billing_units=_ZERO_UNITS_IF_NEVER_SENT,
    )


def give_back(
    session: Session, fence: Fence, *, reason: str, due_at: datetime | None = None, **fields: Any
) -> bool:
    """``submitting`` → ``pending``, the attempt not counted: its POST never left this process
    (a limit held it back, its input could not be prepared, the process stopped), or fal
    refused it unaccepted (429, the account). Due again at ``due_at`` (at once when None).

    A resend of an unknown submit whose send was recorded (:func:`record_send`) is uncounted
    from ``possible_duplicate_charges`` too: the same attempt number is sent again later, and
    counted then.

    Every caller gives back a POST that fal never accepted (never sent, or refused): what
    :func:`record_send` wrote of it (``submitted_input``, ``sent_at``) is cleared, so the job
    reads as not sent — a rerun given back is no request at fal, cancelled when the job it
    repeats keeps its late answer (:func:`_cancel_unsent_repeats`).

    ``start_timeout_at`` becomes that of the request still possibly at fal, which
    :func:`adopt_before_resend` keeps should its proof come: for a resend of a submit whose
    outcome stayed unknown, the earlier attempt's — still there when given back before its POST
    (:func:`mark_submitting` keeps it), put back from ``earlier_start_timeout_at`` when the POST
    was recorded (:func:`record_send` wrote the refused POST's over it). Was: a resend refused
    with 429 kept the refused POST's, and a schedule removed since made fal's unbilled
    ``request_timeout`` of the adopted earlier request count an attempt. Any other job has no
    request at fal (its earlier ones ended): NULL. The next POST writes its own."""
    unsent: dict[str, Any] = {
        "submitted_input": None,
        "sent_at": None,
        "start_timeout_at": _OUTSTANDING_START_TIMEOUT,
        **fields,
    }
    return _move(
        session,
        fence,
        JobState.PENDING,
        reason,
        attempts=_NOT_COUNTED,
        possible_duplicate_charges=_RESEND_UNSENT,
        next_attempt_at=due_at,
        **_UNLEASED,
        **unsent,
    )


def mark_running(session: Session, fence: Fence, *, next_poll_at: datetime) -> bool:
    """``queued`` → ``running``: fal said IN_PROGRESS. Its status is asked again at ``next_poll_at``."""
    return _move(
        session, fence, JobState.RUNNING, "running at fal", next_attempt_at=next_poll_at, **_UNLEASED
    )


def status_due(session: Session, fence: Fence, *, at: datetime) -> bool:
    """Make a job whose request is at fal due for its next status call at ``at``: fal said the
    request finished, but not everything needed to settle the job (a webhook carries no run-time
    metrics, and what a failure or a cancel costs depends on them). No state change, no version
    bump, the lease left as it is: a status call already in flight settles the job itself."""
    return update_job_fields(session, fence.job_id, expected_version=fence.version, next_attempt_at=at)


def mark_completed(
    session: Session,
    fence: Fence,
    *,
    completed_at: datetime,
    provider_metrics: dict[str, Any] | None,
    error: str | None = None,
    error_type: str | None = None,
    lease_owner: str | None = None,
    lease_expires_at: datetime | None = None,
) -> bool:
    """→ ``downloading``: fal finished the request (and billed it); its result is fetched next.

    fal reports a failed request as COMPLETED with ``error``/``error_type``: they are kept on the
    event, for the download step should the result itself be unobtainable. ``lease_owner``
    marks a download already queued for it (see ``worker.steps.context.DOWNLOAD_QUEUE``). The
    polling's count of malformed answers (``download_attempts``) is reset for the download.
    """
    failed = error is not None or error_type is not None
    return _move(
        session,
        fence,
        JobState.DOWNLOADING,
        "completed at fal" + (f" with error {error_type}" if failed else ""),
        details={"error": error, "error_type": error_type} if failed else None,
        completed_at=completed_at,
        provider_metrics=provider_metrics,
        download_attempts=0,
        lease_owner=lease_owner,
        lease_expires_at=lease_expires_at,
    )


def mark_succeeded(
    session: Session,
    fence: Fence,
    *,
    output_path: str,
    output_sha256: str,
    output_bytes: int,
    **cost: Any,
) -> bool:
    """``downloading`` → ``succeeded``: the video and its sidecar are saved; ``cost`` is what fal
    billed over every attempt."""
    return _move(
        session,
        fence,
        JobState.SUCCEEDED,
        "downloaded",
        output_path=output_path,
        output_sha256=output_sha256,
        output_bytes=output_bytes,
        error=None,
        error_type=None,
        **cost,
    )


#: What a reusing job copies from the job whose output it takes: the output and what fal said
#: about it, so exports, diffs and status read the same as for the original.
_REUSED_FIELDS = (
    "output_path",
    "output_sha256",
    "output_bytes",
    "seed",
    "actual_prompt",
    "provider_output",
    "media",
    "media_mismatch",
)


def find_reusable(session: Session, job: JobRecord, *, simulated: bool, limit: int) -> list[Job]:
    """Up to ``limit`` succeeded jobs (any batch of ``job``'s kind, not ``job`` itself) with
    ``job``'s key and a stored output of their own, oldest first; ``simulated``: whether ``job``'s
    batch was made by ``run --simulate``.

    Same key means same endpoint and same resolved input (files and data URIs by content), seed
    included. A job stored before schema 0022 whose data URI's new key its twin took (see
    :attr:`Job.content_key`) is looked up, and found, by the key its input gives now: the same
    image given twice under two spellings, or as a file and inline, is rendered once.
    Oldest first, so every reuse of one render names the same original while its output is
    there; the caller checks the outputs in that order and takes the first still intact (the
    original's may be gone while a rerun's is not). Jobs that reused another's output are left
    out: their output is their source's (the same ``output_path``), which is a candidate itself.
    A rerun's job that took back the paid video its original left staged
    (:func:`mark_taking_staged`) names that original in ``reused_from`` too, but stored the
    video itself, under its own path: it is a candidate — often the only copy there is, its
    original having failed without an output. Same kind: a batch sent to fal takes only videos
    fal made, never a ``--simulate`` batch's placeholders (and a simulation only simulated ones,
    so it rehearses exactly what the paid run will do).
    """
    key = job.content_key or job.job_key
    source = aliased(Job)
    query = (
        select(Job)
        .join(Batch, Batch.id == Job.batch_id)
        .where(
            or_(Job.job_key == key, Job.content_key == key),
            Job.id != job.id,
            Job.state == JobState.SUCCEEDED,
            Job.output_sha256.is_not(None),
            Job.output_path.is_not(None),
            or_(
                Job.reused_from.is_(None),
                ~exists().where(source.id == Job.reused_from, source.output_path == Job.output_path),
            ),
            Batch.simulated.is_(simulated),
        )
        .order_by(Job.finished_at, Job.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def mark_reused(session: Session, fence: Fence, source: Job) -> bool:
    """``pending``/``retry_wait`` → ``succeeded`` without sending: the job takes ``source``'s
    output (``reuse_outputs``). Nothing was billed for it, so its actual cost is 0."""
    return _move(
        session,
        fence,
        JobState.SUCCEEDED,
        f"reused the output of job {source.id}",
        details={"reused_from": source.id},
        reused_from=source.id,
        completed_at=utcnow(),
        actual_usd=Decimal(0),
        actual_billing_units=Decimal(0),
        error=None,
        error_type=None,
        **{name: getattr(source, name) for name in _REUSED_FIELDS},
    )


#: The ``error_type`` of a paid job whose video could not be kept (its batch was cancelled while
#: its output could not be stored): a rerun may take the video it left in the staging folder.
OUTPUT_NOT_KEPT = "output_not_kept"

#: What a job taking a staged video copies from the job that left it (:func:`mark_taking_staged`).
_TAKEN_FIELDS = ("seed", "actual_prompt", "provider_output", "completed_at")


def staged_original(session: Session, job: JobRecord, *, simulated: bool) -> Job | None:
    """The job ``job`` reruns (``rerun_of``) when that job failed with its paid video left
    staged (:data:`OUTPUT_NOT_KEPT`, the video's SHA-256 and size recorded), in a batch of the
    same kind as ``job``'s (``simulated``), and no other rerun of it is taking (``downloading``)
    or took (``succeeded``) that video already; else None. Whether the staged file is still
    there, and still those bytes, is the caller's to check."""
    if job.rerun_of is None:
        return None
    original = session.scalar(
        select(Job)
        .join(Batch, Batch.id == Job.batch_id)
        .where(
            Job.id == job.rerun_of,
            Job.state == JobState.FAILED,
            Job.error_type == OUTPUT_NOT_KEPT,
            Job.output_sha256.is_not(None),
            Job.output_bytes.is_not(None),
            Batch.simulated.is_(simulated),
        )
    )
    if original is None:
        return None
    taken = session.scalar(
        select(Job.id)
        .where(
            Job.rerun_of == original.id,
            Job.id != job.id,
            Job.reused_from.is_not(None),
            Job.state.in_([JobState.DOWNLOADING, JobState.SUCCEEDED]),
        )
        .limit(1)
    )
    return None if taken is not None else original


def mark_taking_staged(session: Session, fence: Fence, original: Job, *, staged: str, **lease: Any) -> bool:
    """``pending``/``retry_wait`` → ``downloading`` without sending: the job takes the paid video
    ``original`` downloaded and left at ``staged`` (:func:`staged_original`), stores it like any
    download, and succeeds with ``reused_from`` naming the job fal made it for. Taking it bills
    nothing more (``original`` keeps what it was billed): the job keeps what fal billed its own
    earlier attempts, if it was sent before (a ``retry_wait`` after a request fal ran, cancelled
    or failed), else costs 0; its estimate becomes 0.
    ``lease``: ``lease_owner``/``lease_expires_at`` of its queued download, as for a completion."""
    source = original.reused_from or original.id  # a taker that failed in turn: the video's maker
    return _move(
        session,
        fence,
        JobState.DOWNLOADING,
        f"takes the paid video job {original.id} left in the staging folder ({staged}); not sent",
        details={"reused_from": source, "staged": staged},
        reused_from=source,
        actual_usd=_KEPT_USD,
        actual_billing_units=_KEPT_UNITS,
        # Not its estimate: while it waits in ``downloading`` (storage down) a job counts at what
        # it was billed plus its estimate in the budgets (:func:`finished_usd`), and this taking
        # will cost nothing more.
        est_usd=Decimal(0),
        download_attempts=0,
        error=None,
        error_type=None,
        **{name: getattr(original, name) for name in _TAKEN_FIELDS},
        **lease,
    )


def mark_cancelling(session: Session, fence: Fence, *, reason: str, error_type: str | None = None) -> bool:
    """``queued``/``running`` → ``cancelling``: a cancel was asked of fal; its status (how the
    request ended, and whether it was billed) is asked at once. ``error_type`` says why when it
    is not the user's cancel (``deadline``, ``window_closed``): it decides where the job goes."""
    extra = {"error_type": error_type} if error_type is not None else {}
    return _move(session, fence, JobState.CANCELLING, reason, next_attempt_at=utcnow(), **extra)


def requeue_after_cancel(
    session: Session,
    fence: Fence,
    *,
    reason: str,
    billed: bool,
    error: str,
    error_type: str | None,
    **cost: Any,
) -> bool:
    """``cancelling``/``queued``/``running`` → ``pending`` (cancelled, or timed out, while still
    in fal's queue: nothing billed) or ``retry_wait`` (fal had started it: billed), for a later
    window to send again. ``error`` says what ended the request.

    The request was sent: the job keeps its ``submitted_at``, its request id and the input it
    sent (what the export and the history show of it, until a later attempt replaces them),
    and the attempt stays in ``attempts``. One that never ran is also counted in
    ``unstarted_requests``, so it does not count against ``WANBATCH_MAX_ATTEMPTS``
    (:attr:`jobs.models.Job.counted_attempts`); one fal had started does.

    ``cost``: the job's ``actual_usd``/``actual_billing_units`` after this request
    (:func:`jobs.billing.billed`: earlier attempts plus this one's bill), written either way. An
    unbilled request is known to have cost nothing, so the job then holds what earlier attempts
    cost, 0 when none did — not "unknown": should the deadline end it before it is sent again,
    its cost is $0 like any other request that never ran, and a later attempt adds to it.
    The caller puts how the cancel was billed in the event's details (:data:`CANCEL_BILLED_AS`),
    taken back should fal prove it ran the request to the end (:func:`adopt_window_proof`)."""
    fields = {**_FORGET_URLS, **_UNLEASED, "error": error, "error_type": error_type, **cost}
    if billed:
        return _move(session, fence, JobState.RETRY_WAIT, reason, **fields)
    return _move(
        session,
        fence,
        JobState.PENDING,
        reason,
        unstarted_requests=incremented("unstarted_requests"),
        **fields,
    )


def mark_cancelled(
    session: Session, fence: Fence, *, reason: str, error: str, error_type: str | None, **fields: Any
) -> bool:
    """→ ``cancelled``, for good: a budget stopped it, or fal confirmed a cancel (``fields``: the
    cancel's cost and what fal reported)."""
    return _move(session, fence, JobState.CANCELLED, reason, error=error, error_type=error_type, **fields)


def record_result(
    session: Session, fence: Fence, *, output: dict[str, Any], seed: int | None, actual_prompt: str | None
) -> bool:
    """Keep fal's result of a ``downloading`` job (no state change): the video is fetched next,
    with its own count of tries."""
    return update_job_fields(
        session,
        fence.job_id,
        expected_version=fence.version,
        provider_output=output,
        seed=seed,
        actual_prompt=actual_prompt,
        download_attempts=0,
    )


#: A job's ``actual_usd`` once it ends unsent (:data:`_UNBILLED_ENDS`): what earlier attempts
#: were billed if it was ever sent, else 0 — it never will be billed, so it has no estimate left.
_ZERO_IF_NEVER_SENT = func.coalesce(
    _JOBS.c.actual_usd,
    case((_JOBS.c.submitted_at.is_(None), literal(Decimal(0), _JOBS.c.actual_usd.type)), else_=None),
)
#: Its ``actual_billing_units`` alike: 0 units beside the $0 of a job never sent (exports show both).
_ZERO_UNITS_IF_NEVER_SENT = func.coalesce(
    _JOBS.c.actual_billing_units,
    case(
        (_JOBS.c.submitted_at.is_(None), literal(Decimal(0), _JOBS.c.actual_billing_units.type)), else_=None
    ),
)
_UNBILLED_ENDS = frozenset({JobState.FAILED, JobState.CANCELLED})
#: What a job's earlier attempts cost, 0 when none was billed: its cost once it takes a video
#: that costs it nothing more (:func:`mark_taking_staged`).
_KEPT_USD = func.coalesce(_JOBS.c.actual_usd, literal(Decimal(0), _JOBS.c.actual_usd.type))
_KEPT_UNITS = func.coalesce(
    _JOBS.c.actual_billing_units, literal(Decimal(0), _JOBS.c.actual_billing_units.type)
)

#: States of a job fal does not hold (or that we never heard back about): a cancel needs no call to fal.
UNSENT_STATES: tuple[JobState, ...] = (JobState.PENDING, JobState.RETRY_WAIT, JobState.SUBMIT_UNKNOWN)


@dataclass(frozen=True, slots=True)
class UnsentCancelled:
    """The jobs :func:`cancel_unsent` ended, told apart as ``status`` tells them (``sent``:
    ``submitted_at``): a cancel that said "never sent" of them all misled about those fal had
    seen before.

    * ``never_sent``: no request of theirs ever went to fal;
    * ``sent_before``: sent before (a request of theirs failed, or was timed out in fal's queue),
      waiting to be sent again (``retry_wait``, ``pending``): fal holds no request of theirs now;
    * ``outcome_unknown``: in ``submit_unknown``, their POST's answer lost: fal may have
      accepted (and billed) it.
    """

    never_sent: int = 0
    sent_before: int = 0
    outcome_unknown: int = 0

    @property
    def total(self) -> int:
        return self.never_sent + self.sent_before + self.outcome_unknown


def unsent_kind(state: JobState, submitted_at: datetime | None) -> str:
    """Which of :class:`UnsentCancelled`'s counts a job fal holds no request of is in, by its
    ``state`` and ``submitted_at``: ``outcome_unknown`` (``submit_unknown``), ``never_sent`` (no
    request of it ever went out), else ``sent_before`` (one did, and ended: it waits to be sent
    again). The one place that tells them apart: :func:`cancel_unsent` counts by it, and
    ``wanbatch cost`` its waiting jobs (:class:`jobs.cost.CostLine`)."""
    if state == JobState.SUBMIT_UNKNOWN:
        return "outcome_unknown"
    return "never_sent" if submitted_at is None else "sent_before"


def cancel_unsent_jobs(
    session: Session,
    batch_ids: Sequence[str],
    *,
    reason: str,
    error: str,
    error_type: str,
    worker: str | None = None,
    sent_error: str | None = None,
) -> int:
    """:func:`cancel_unsent`, for callers that need only how many it cancelled."""
    return cancel_unsent(
        session,
        batch_ids,
        reason=reason,
        error=error,
        error_type=error_type,
        worker=worker,
        sent_error=sent_error,
    ).total


def cancel_unsent(
    session: Session,
    batch_ids: Sequence[str],
    *,
    reason: str,
    error: str,
    error_type: str,
    worker: str | None = None,
    sent_error: str | None = None,
) -> UnsentCancelled:
    """Cancel every job of ``batch_ids`` in :data:`UNSENT_STATES`, set-based; returns how many,
    told apart by whether they were sent before (:class:`UnsentCancelled`).

    ``sent_error``: the error of a job that was sent before (``submitted_at``: a request of it
    failed, was timed out in fal's queue at a window's end, or its outcome stayed unknown),
    written after what ended its last request (``"<that>; <sent_error>"``), where ``error``
    would say it was never sent. None: ``error`` for every job.

    ``wanbatch cancel`` of a 100,000-job batch must take seconds, not 100,000 round trips of
    :func:`transition`. This is the same move, done per source state in one statement each: the
    UPDATE's ``WHERE state = …`` is the compare-and-set (a job a dispatcher claimed meanwhile is
    left alone, as its row lock makes the UPDATE re-check it), the version grows by one, and
    each moved job gets its :class:`JobEvent` in the same statement — on PostgreSQL an
    ``INSERT … SELECT`` from the UPDATE's ``RETURNING`` (a data-modifying CTE), on SQLite (one
    writer at a time) the returned rows inserted with one executemany. Never commits.
    """
    if not batch_ids:
        return UnsentCancelled()
    now = utcnow()
    values: dict[str, Any] = {
        "state": JobState.CANCELLED,
        "version": _JOBS.c.version + 1,
        "updated_at": now,
        "finished_at": now,
        "next_attempt_at": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "error": error if sent_error is None else _error_if_sent(error, sent_error),
        "error_type": error_type,
        "actual_usd": _ZERO_IF_NEVER_SENT,
        "actual_billing_units": _ZERO_UNITS_IF_NEVER_SENT,
    }
    session.flush()  # pending ORM changes first: the statements below bypass the unit of work
    #: How many moved, by kind (the keys of :class:`UnsentCancelled`).
    moved_by: dict[str, int] = {"never_sent": 0, "sent_before": 0, "outcome_unknown": 0}

    def count(state: JobState, submitted_at: datetime | None, n: int) -> None:
        moved_by[unsent_kind(state, submitted_at)] += n

    for state in UNSENT_STATES:
        unproven = {"ambiguous_usd": _POSSIBLY_BILLED_MORE} if state == JobState.SUBMIT_UNKNOWN else {}
        where = [_JOBS.c.batch_id.in_(list(batch_ids)), _JOBS.c.state == state]
        for submitted_at, n in _cancel_in_state(
            session, state, where, {**values, **unproven}, reason=reason, worker=worker, now=now
        ):
            count(state, submitted_at, n)
    cancelled = UnsentCancelled(**moved_by)
    if cancelled.total:
        session.expire_all()  # Job objects already loaded in this session must not show the old state
    return cancelled


def _cancel_in_state(
    session: Session,
    state: JobState,
    where: Sequence[ColumnElement[bool]],
    values: Mapping[str, Any],
    *,
    reason: str,
    worker: str | None,
    now: datetime,
) -> list[tuple[datetime | None, int]]:
    """Move the jobs in ``state`` that match ``where`` to ``cancelled`` in one UPDATE writing
    ``values`` (:func:`cancel_unsent`, :func:`cancel_unsent_over`), each with its
    :class:`JobEvent` (``reason``, ``worker``) in the same statement on PostgreSQL (a
    data-modifying CTE), in one executemany on SQLite; their earlier attempts' money is counted
    into the batch's finished totals (:func:`_add_finished`), as :func:`transition` counts a job
    it ends. Returns how many moved per ``submitted_at`` (one entry per distinct value)."""
    conn = session.connection()
    moved = (
        update(_JOBS)
        .where(*where)
        .values(dict(values))
        .returning(
            _JOBS.c.id,
            _JOBS.c.version,
            _JOBS.c.batch_id,
            _JOBS.c.submitted_at,
            _JOBS.c.actual_usd,
            _JOBS.c.ambiguous_usd,
        )
    )
    counted: list[tuple[datetime | None, int]] = []
    if conn.dialect.name == "postgresql":
        cte = moved.cte(f"moved_{state.value}")
        events = select(
            cte.c.id,
            literal(now, _EVENTS.c.at.type),
            literal(state, _EVENTS.c.from_state.type),
            literal(JobState.CANCELLED, _EVENTS.c.to_state.type),
            cte.c.version,
            literal(reason, _EVENTS.c.reason.type),
            literal(worker, _EVENTS.c.worker.type),
        )
        logged = insert(_EVENTS).from_select(list(_EVENT_COLUMNS), events).cte(f"logged_{state.value}")
        # How many moved, and what earlier attempts of theirs were (or may have been) billed,
        # by batch and last submit (a row per job ever sent; one per batch for those never sent).
        per_batch = (
            select(
                cte.c.batch_id,
                cte.c.submitted_at,
                func.count(),
                func.sum(cte.c.actual_usd),
                func.sum(cte.c.ambiguous_usd),
            )
            .group_by(cte.c.batch_id, cte.c.submitted_at)
            .add_cte(logged)
        )
        for batch_id, submitted_at, n, billed, ambiguous in conn.execute(per_batch):
            counted.append((submitted_at, int(n)))
            _add_finished(session, batch_id, submitted_at, (billed or Decimal(0)) + (ambiguous or Decimal(0)))
        return counted
    rows = conn.execute(moved).all()
    for r in rows:
        counted.append((r.submitted_at, 1))
        _add_finished(session, r.batch_id, r.submitted_at, (r.actual_usd or Decimal(0)) + r.ambiguous_usd)
    if rows:
        conn.execute(
            insert(_EVENTS),
            [
                dict(
                    zip(
                        _EVENT_COLUMNS,
                        (r.id, now, state, JobState.CANCELLED, r.version, reason, worker),
                        strict=True,
                    )
                )
                for r in rows
            ],
        )
    return counted


#: How many distinct estimates one UPDATE of :func:`cancel_unsent_over` names in its ``CASE``
#: (each a bound parameter, twice): a batch has a handful; a sweep of durations may have hundreds.
_OVER_PRICES_PER_STATEMENT = 200


def cancel_unsent_over(
    session: Session,
    batch_id: str,
    *,
    over_usd: Decimal,
    error_for: Callable[[Decimal], str],
    error_type: str,
    reason: str,
    worker: str | None,
    now: datetime,
    keep_reusable: bool,
) -> int:
    """Cancel, for good and set-based, every unsent job of ``batch_id`` that dispatch would
    claim (``pending``/``retry_wait``, not leased to anyone now) whose estimate is above
    ``over_usd``: the room a budget cap has left (README, "Budgets are never exceeded"). Each is
    moved as :func:`mark_cancelled` moves a job a budget refused when dispatch claimed it: the
    same fields (``error`` from ``error_for(est_usd)``, ``error_type``, ``finished_at``, the
    lease let go, ``actual_usd`` 0 unless earlier attempts were billed), ``version + 1``, one
    :class:`JobEvent` each (``reason``, ``worker``), and its earlier attempts' money into
    :class:`BatchTotals`. Returns how many.

    Left alone, for dispatch to decide one by one when it claims them: a job that may never be
    sent — it reruns a job that left its paid video staged (:func:`staged_original`), or, with
    ``keep_reusable`` (the batch's ``reuse_outputs``), a succeeded twin may give it its output
    (:func:`find_reusable`; any twin keeps it here, the finer checks are dispatch's) — costs no
    budget, and is never cancelled for one.

    One UPDATE per state (per :data:`_OVER_PRICES_PER_STATEMENT` distinct estimates, whose
    words differ), after one read of the estimates: a budget reached on a 50,000-job batch
    used to end its jobs one dispatch round of ten at a time, for hours. Never commits.
    """
    twin = _JOBS.alias("twin")
    original = _JOBS.alias("original")
    key = func.coalesce(_JOBS.c.content_key, _JOBS.c.job_key)
    unsent = [JobState.PENDING, JobState.RETRY_WAIT]
    where: list[ColumnElement[bool]] = [
        _JOBS.c.batch_id == batch_id,
        _JOBS.c.est_usd > literal(over_usd, _JOBS.c.est_usd.type),
        or_(
            _JOBS.c.lease_expires_at.is_(None),
            _JOBS.c.lease_expires_at <= literal(now, _JOBS.c.lease_expires_at.type),
        ),
        or_(
            _JOBS.c.rerun_of.is_(None),
            ~exists().where(
                original.c.id == _JOBS.c.rerun_of,
                original.c.state == JobState.FAILED,
                original.c.error_type == OUTPUT_NOT_KEPT,
            ),
        ),
    ]
    if keep_reusable:
        where.append(
            ~exists().where(
                or_(twin.c.job_key == key, twin.c.content_key == key),
                twin.c.id != _JOBS.c.id,
                twin.c.state == JobState.SUCCEEDED,
                twin.c.output_path.is_not(None),
            )
        )
    session.flush()  # pending ORM changes first: the statements below bypass the unit of work
    conn = session.connection()
    prices = sorted(
        conn.execute(select(_JOBS.c.est_usd).where(_JOBS.c.state.in_(unsent), *where).distinct()).scalars()
    )
    if not prices:
        return 0
    money, text_type = _JOBS.c.est_usd.type, _JOBS.c.error.type
    values: dict[str, Any] = {
        "state": JobState.CANCELLED,
        "version": _JOBS.c.version + 1,
        "updated_at": now,
        "finished_at": now,
        "next_attempt_at": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "error_type": error_type,
        "actual_usd": _ZERO_IF_NEVER_SENT,
        "actual_billing_units": _ZERO_UNITS_IF_NEVER_SENT,
    }
    moved = 0
    for start in range(0, len(prices), _OVER_PRICES_PER_STATEMENT):
        chunk = prices[start : start + _OVER_PRICES_PER_STATEMENT]
        error = case(
            *[(_JOBS.c.est_usd == literal(p, money), literal(error_for(p), text_type)) for p in chunk],
            else_=literal(error_for(chunk[-1]), text_type),  # never taken: every estimate is named
        )
        priced = _JOBS.c.est_usd.in_([literal(p, money) for p in chunk])
        for state in unsent:
            for _, n in _cancel_in_state(
                session,
                state,
                [_JOBS.c.state == state, priced, *where],
                {**values, "error": error},
                reason=reason,
                worker=worker,
                now=now,
            ):
                moved += n
    if moved:
        for loaded in list(session.identity_map.values()):  # not the old state, if any is loaded
            if isinstance(loaded, Job) and loaded.batch_id == batch_id:
                session.expire(loaded)
    return moved


def _error_if_sent(error: str, sent_error: str) -> ColumnElement[str]:
    """``error`` for a job never sent; for one sent before, what ended its last request (its
    stored error, if any) followed by ``sent_error``."""
    text_type = _JOBS.c.error.type
    before = func.coalesce(_JOBS.c.error.concat(literal("; ", text_type)), literal("", text_type))
    return case(
        (_JOBS.c.submitted_at.is_not(None), before.concat(literal(sent_error, text_type))),
        else_=literal(error, text_type),
    )


# --------------------------------------------------------------------------- leases


def claim_jobs(
    session: Session,
    *,
    states: Sequence[JobState],
    limit: int,
    now: datetime,
    owner: str,
    lease_seconds: float,
    batch_id: str | None = None,
    batch_ids: Iterable[str] | None = None,
    active_batches_only: bool = False,
    endpoints: Sequence[str] | None = None,
    exclude_ids: Collection[str] = (),
    exclude_batch_ids: Collection[str] = (),
    sent_to: str | None = None,
) -> list[Job]:
    """Lease up to ``limit`` due jobs in ``states`` to ``owner``; no two claimers get the same job.

    Due means ``next_attempt_at`` is unset or not after ``now``, and any previous lease has
    expired (so a crashed worker's jobs come back after ``lease_seconds``). Claiming bumps each
    job's ``version``: the returned objects carry the new one, to fence later writes with.
    ``active_batches_only`` skips jobs of paused or cancelled batches (for submitting; polling
    must go on regardless); ``endpoints`` keeps only jobs of those endpoints (per-endpoint
    caps); ``batch_ids`` keeps only jobs of those batches (an embedded ``run`` works on its own
    batch, never on another one that was only submitted); ``exclude_ids`` skips those jobs (the
    ones a status stream already watches); ``exclude_batch_ids`` skips those batches' jobs (closed
    by their schedule, paused by their user); ``sent_to`` keeps only jobs whose request went to
    that fal queue origin, or to one not recorded (:func:`sent_to_origin`). Oldest jobs first.
    """
    found = _due(
        session,
        whole=False,
        states=states,
        limit=limit,
        now=now,
        batch_id=batch_id,
        batch_ids=batch_ids,
        active_batches_only=active_batches_only,
        endpoints=endpoints,
        exclude_ids=exclude_ids,
        exclude_batch_ids=exclude_batch_ids,
        sent_to=sent_to,
    )
    ids = [r.id for r in found]
    if not ids:
        return []
    _run(
        session,
        _prepared(
            ("claim-lease",),
            lambda: (
                update(_JOBS)
                .where(_JOBS.c.id.in_(bindparam("ids", expanding=True)))
                .values(
                    lease_owner=bindparam("owner"),
                    lease_expires_at=bindparam("until"),
                    version=_JOBS.c.version + 1,
                )
            ),
        ),
        {"ids": ids, "owner": owner, "until": now + timedelta(seconds=lease_seconds)},
    )
    claimed = session.scalars(
        _prepared(
            ("claim-load",),
            lambda: (
                select(Job)
                .where(Job.id.in_(bindparam("ids", expanding=True)))
                .order_by(Job.created_at, Job.item_index, Job.id)
                .execution_options(populate_existing=True)
            ),
        ),
        {"ids": ids},
    )
    return list(claimed)


def claim_due(
    session: Session,
    *,
    states: Sequence[JobState],
    limit: int,
    now: datetime,
    batch_ids: Iterable[str] | None = None,
    active_batches_only: bool = False,
    endpoints: Sequence[str] | None = None,
    exclude_batch_ids: Collection[str] = (),
) -> list[JobRecord]:
    """:func:`claim_jobs` for a caller that moves every job returned before its transaction ends
    (dispatch marks each ``submitting``, ``cancelled`` or reused: each move leases or releases
    it, fenced by the version read here): no lease UPDATE, no second read. The jobs stay locked
    to other claimers until the commit: ``SKIP LOCKED`` row locks on PostgreSQL, the single
    writer on SQLite.

    Their columns as read (Core rows: a claim runs on every completion, and building ORM objects
    cost more than the query). A move does not update them: the hold after one is
    :meth:`Fence.moved`.
    """
    return _due(
        session,
        whole=True,
        states=states,
        limit=limit,
        now=now,
        batch_ids=batch_ids,
        active_batches_only=active_batches_only,
        endpoints=endpoints,
        exclude_batch_ids=exclude_batch_ids,
    )


def _due(
    session: Session,
    *,
    whole: bool,
    states: Sequence[JobState],
    limit: int,
    now: datetime,
    batch_id: str | None = None,
    batch_ids: Iterable[str] | None = None,
    active_batches_only: bool = False,
    endpoints: Sequence[str] | None = None,
    exclude_ids: Collection[str] = (),
    exclude_batch_ids: Collection[str] = (),
    sent_to: str | None = None,
) -> list[Any]:
    """The oldest ``limit`` due jobs of :func:`claim_jobs`: their sort keys, or (``whole``) every
    column, as rows."""
    if limit <= 0 or not states:
        return []
    wanted: list[str | None] = [batch_id]
    if batch_ids is not None:
        if batch_id is not None:
            raise ValueError("claim_jobs takes batch_id or batch_ids, not both")
        wanted = list(sorted(set(batch_ids) - set(exclude_batch_ids)))
        if not wanted:
            return []
    if batch_id is not None and batch_id in exclude_batch_ids:
        return []
    skip_batches = sorted(exclude_batch_ids) if batch_id is None and batch_ids is None else []
    shape = (
        batch_id is not None or batch_ids is not None,
        active_batches_only,
        endpoints is not None,
        bool(exclude_ids),
        bool(skip_batches),
        sent_to is not None,
    )
    candidates = _prepared(("claim", whole, *shape), lambda: _claim_candidates(*shape, whole=whole))
    params: dict[str, Any] = {
        "now": now,
        "limit": limit,
        "endpoints": list(endpoints or ()),
        "exclude_ids": sorted(exclude_ids),
        "exclude_batch_ids": skip_batches,
        "sent_to": sent_to,
    }
    # One query per (state, batch), each reading the index on (batch_id, state, created_at,
    # item_index, id) — or (state, created_at, …) — in order and stopping at ``limit``; then
    # the oldest of them. One query over all states and batches had to sort every due job:
    # 25 ms per claim at 20,000 pending jobs, and a claim runs on every completion.
    found: list[Any] = []
    for state in states:
        for one_batch in wanted:
            at = {**params, "state": state, "batch_id": one_batch}
            if state == JobState.RETRY_WAIT:
                found += _due_retries(session, at, shape, whole=whole, candidates=candidates)
            else:
                found += _run(session, candidates, at).all()
    found.sort(key=lambda r: (r.created_at, r.item_index, r.id))
    return found[:limit]


#: Up to how many due ``retry_wait`` jobs (of a batch, or of all) a claim reads through the index
#: on their ``next_attempt_at`` and sorts (:func:`_due_retries`); more, and it reads them in
#: claim order instead, as every other state, stopping at its limit.
FEW_DUE_RETRIES = 500


def _due_retries(
    session: Session, params: dict[str, Any], shape: tuple[bool, ...], *, whole: bool, candidates: Any
) -> list[Any]:
    """The oldest ``limit`` due ``retry_wait`` jobs of one batch (or of all): the candidate rows
    of :func:`_due`, read through their ``next_attempt_at`` when few are due.

    The jobs waiting out their backoff are not due, and a 5xx outage leaves thousands of them:
    read in claim order (``created_at``, as every other state), every one of them came before
    the query could stop — 12 ms per claim at 8,000 of them, on every completion. The index on
    (``batch_id``, ``state``, ``next_attempt_at``) — or (``state``, ``next_attempt_at``) — holds
    the due ones apart: first how many (at most :data:`FEW_DUE_RETRIES`, on the index alone),
    then, when there are fewer, those due at once (``next_attempt_at`` NULL) and those whose
    moment has come, each read through that index and sorted into claim order. When there are
    more (an outage over: all due at once), the order-walking query finds ``limit`` due ones
    near its start.
    """
    unset, passed = _run(
        session,
        _prepared(("due-retries", shape[0]), lambda: _count_due(shape[0])),
        {**params, "few": FEW_DUE_RETRIES},
    ).one()
    if not unset and not passed:
        return []
    if unset >= FEW_DUE_RETRIES or passed >= FEW_DUE_RETRIES:
        return list(_run(session, candidates, params).all())
    found: list[Any] = []
    for due, count in zip(_DUE, (unset, passed), strict=True):
        if count:
            query = _prepared(
                ("claim", whole, *shape, due),
                functools.partial(_claim_candidates, *shape, whole=whole, due=due),
            )
            found += _run(session, query, params).all()
    return found


#: The two ways a ``retry_wait`` job is due (:func:`_due_retry_moment`).
_DUE = ("unset", "passed")


def _due_retry_moment(due: str) -> ColumnElement[bool]:
    """``retry_wait`` jobs due at once (``unset``: no ``next_attempt_at``) or whose moment has
    come (``passed``), as the index on ``next_attempt_at`` finds them (one equality, or one
    range: not the two of them or-ed, which no index reads)."""
    if due == "unset":
        return _JOBS.c.next_attempt_at.is_(None)
    return _JOBS.c.next_attempt_at <= bindparam("now")


def _any_due_retry(due: str) -> ColumnElement[bool]:
    """Whether any ``retry_wait`` job is due so (:func:`_due_retry_moment`): the first entry of
    the index on (``state``, ``next_attempt_at``) says. Never correlated with an enclosing query
    of the jobs (:func:`in_flight`)."""
    where = (_JOBS.c.state == JobState.RETRY_WAIT, _due_retry_moment(due))
    return select(literal(1)).select_from(_JOBS).where(*where).correlate(None).exists()


def _count_due(scoped: bool) -> Any:
    """How many ``retry_wait`` jobs of ``batch_id`` (``scoped``) or of all are due at once and
    how many are due by ``now``, each counted up to :data:`FEW_DUE_RETRIES` on the index alone."""

    def counted(due: str) -> Any:
        where = [_JOBS.c.state == JobState.RETRY_WAIT, _due_retry_moment(due)]
        if scoped:
            where.append(_JOBS.c.batch_id == bindparam("batch_id"))
        few = select(literal(1)).where(*where).limit(bindparam("few")).subquery()
        return select(func.count()).select_from(few).scalar_subquery()

    return select(counted("unset"), counted("passed"))


class _NotInIndexOrder(ColumnElement[Any]):
    """A column to sort by that no index may be read in the order of, so that the query reads
    the index its conditions narrow down and sorts what that finds: on SQLite ``+column``
    (SQLite's own way to keep an index out of a term), on PostgreSQL the column plus no time.

    A due-retry claim sorts the few due jobs it found through ``next_attempt_at``
    (:func:`_due_retries`). Seeing its ``ORDER BY`` served by the index in claim order, SQLite
    read every ``retry_wait`` job of the batch in that order instead, skipping those not due;
    so did PostgreSQL whenever its statistics had not yet seen the outage's retries."""

    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]  # noqa: RUF012 (SQLAlchemy's)

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(_NotInIndexOrder)
def _in_any_order(element: _NotInIndexOrder, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column, **kw))


@compiles(_NotInIndexOrder, "sqlite")
def _not_in_sqlite_index_order(element: _NotInIndexOrder, compiler: Any, **kw: Any) -> str:
    return "+" + str(compiler.process(element.column, **kw))


@compiles(_NotInIndexOrder, "postgresql")
def _not_in_postgresql_index_order(element: _NotInIndexOrder, compiler: Any, **kw: Any) -> str:
    return "(" + str(compiler.process(element.column, **kw)) + " + INTERVAL '0 seconds')"


def _claim_candidates(
    scoped: bool,
    active_only: bool,
    by_endpoint: bool,
    excluding: bool,
    excluding_batches: bool,
    by_origin: bool = False,
    *,
    whole: bool = False,
    due: str | None = None,
) -> Any:
    """The candidate query of :func:`claim_jobs` for one state (and batch), oldest first: the
    ids and sort keys, or (``whole``) every column of the jobs. ``due``: only ``retry_wait``
    jobs due at once (``unset``) or whose moment has come (``passed``), found through their
    ``next_attempt_at`` (:func:`_due_retries`)."""
    now: BindParameter[datetime] = bindparam("now")
    conditions: list[ColumnElement[bool]] = [
        _JOBS.c.state == bindparam("state", type_=_JOBS.c.state.type),
        or_(_JOBS.c.next_attempt_at.is_(None), _JOBS.c.next_attempt_at <= now)
        if due is None
        else _due_retry_moment(due),
        or_(_JOBS.c.lease_expires_at.is_(None), _JOBS.c.lease_expires_at <= now),
    ]
    if scoped:
        conditions.append(_JOBS.c.batch_id == bindparam("batch_id"))
    if by_endpoint:
        conditions.append(_JOBS.c.endpoint.in_(bindparam("endpoints", expanding=True)))
    if excluding:
        conditions.append(_JOBS.c.id.not_in(bindparam("exclude_ids", expanding=True)))
    if excluding_batches:
        conditions.append(_JOBS.c.batch_id.not_in(bindparam("exclude_batch_ids", expanding=True)))
    if active_only:
        conditions.append(exists().where(Batch.id == _JOBS.c.batch_id, Batch.state == BatchState.ACTIVE))
    if by_origin:
        conditions.append(sent_to_origin(bindparam("sent_to")))
    columns = list(_JOBS.c) if whole else [_JOBS.c.id, _JOBS.c.created_at, _JOBS.c.item_index]
    first: ColumnElement[Any] = _JOBS.c.created_at if due is None else _NotInIndexOrder(_JOBS.c.created_at)
    return (
        select(*columns)
        .where(*conditions)
        .order_by(first, _JOBS.c.item_index, _JOBS.c.id)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True, of=_JOBS)  # ignored by SQLite, whose writer is alone
    )


def take_lease(
    session: Session, fence: Fence, *, now: datetime, lease_seconds: float, **fields: Any
) -> Fence | None:
    """Lease the job to ``fence.owner`` for one step, bumping ``version``: the new fence, or None if lost.

    Unlike :func:`update_job_fields` this *bumps* the fencing token, so of two workers that read
    the same version (a message delivered twice) exactly one wins: the other's write matches 0
    rows. The step then fences everything it writes with the returned fence. ``fields`` are
    written in the same UPDATE (e.g. the exact input about to be submitted).
    """
    _check_fields(fields)
    values = {
        "lease_owner": fence.owner,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "updated_at": utcnow(),
        **fields,
    }
    row = _fenced_update(session, fence.job_id, fence.version, values, bump=True)
    return None if row is None else fence.at(int(row.version))


def record_send(
    session: Session,
    fence: Fence,
    *,
    now: datetime,
    lease_seconds: float,
    submitted_input: dict[str, Any],
    sent_at: datetime,
    api_key_id: str,
    start_timeout_at: datetime | None = None,
    fal_origin: str | None = None,
) -> Fence | None:
    """:func:`take_lease` for a submit's POST, recording the exact input, the send time and the
    id of the API key the POST goes with right before it goes out: the new fence, or None if
    lost. The key is the sending process's (dispatch recorded its own, which on distributed
    workers is the tick leader's, not necessarily the key of the worker that sends).
    ``fal_origin``: the origin of the fal queue the POST goes to (``Job.fal_origin``): only a
    process configured with that queue asks about the request afterwards (:func:`claim_jobs`'s
    ``sent_to``).
    ``start_timeout_at``: when the start timeout the POST carries ends (None: it carries none),
    what fal's ``request_timeout`` of it is judged by.

    This is the moment the job is *sent again*: when the attempt is the resend of a submit whose
    outcome stayed unknown (``resend_attempt``), it counts in ``possible_duplicate_charges``
    here, in the same UPDATE — not when the resend was decided, since a cancel, a budget or a
    deadline may end the job before it goes. (:func:`give_back` uncounts it if it then does not.)
    The start timeout the job held until now (the earlier attempt's) is kept aside in
    ``earlier_start_timeout_at``, for :func:`give_back` to put back should this POST be refused.
    A mark of earlier item numbers nobody recorded (:data:`EARLIER_ITEMS_UNKNOWN`) is dropped
    (:data:`_UNKNOWN_DROPPED_PG`): its download would list the whole output folder for a file
    that cannot be this request's.
    """
    values = {
        "lease_owner": fence.owner,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "updated_at": utcnow(),
        "submitted_input": submitted_input,
        "sent_at": sent_at,
        "start_timeout_at": start_timeout_at,
        "api_key_id": api_key_id,
        "fal_origin": fal_origin,
    }
    counted = _SENT_PG if session.connection().dialect.name == "postgresql" else _SENT_SQLITE
    row = _fenced_update(session, fence.job_id, fence.version, values, bump=True, counted=counted)
    return None if row is None else fence.at(int(row.version))


def _fenced_update(
    session: Session,
    job_id: str,
    version: int,
    values: dict[str, Any],
    *,
    bump: bool = False,
    owner: str | None = None,
    counted: Mapping[str, ColumnElement[Any]] | None = None,
) -> Any:
    """``UPDATE jobs SET values [, version + 1] WHERE id, version [, lease_owner] RETURNING …``:
    the written row, or None when the job moved on. A prepared statement per set of columns
    (see :func:`_prepared`); the session's copy of the job, if loaded, gets the values written.
    ``counted``: columns set by SQL expressions as well — a module constant, since the prepared
    statement is kept per its identity."""
    computed = dict(counted or {})

    def build() -> Any:
        conditions = [_JOBS.c.id == bindparam("w_id"), _JOBS.c.version == bindparam("w_version")]
        if owner is not None:
            conditions.append(_JOBS.c.lease_owner == bindparam("w_owner"))
        written: dict[str, Any] = {k: bindparam(f"v_{k}", type_=_JOBS.c[k].type) for k in values}
        written.update(computed)
        if bump:
            written["version"] = _JOBS.c.version + 1
        return update(_JOBS).where(*conditions).values(written).returning(*[_JOBS.c[k] for k in written])

    key = ("fenced", tuple(values), bump, owner is not None, id(counted) if counted else None)
    statement = _prepared(key, build)
    params = {f"v_{k}": v for k, v in values.items()}
    params.update(w_id=job_id, w_version=version, w_owner=owner)
    row = _run(session, statement, params).first()
    if row is not None:
        _refresh_loaded(session, job_id, row._mapping)
    return row


def extend_lease(session: Session, fence: Fence, *, now: datetime, lease_seconds: float) -> bool:
    """Heartbeat: push the lease out if ``fence.owner`` still holds it at ``fence.version``."""
    if fence.owner is None:
        return False  # nobody holds a lease that has no owner
    values = {"lease_expires_at": now + timedelta(seconds=lease_seconds)}
    return _fenced_update(session, fence.job_id, fence.version, values, owner=fence.owner) is not None


def release_lease(
    session: Session, fence: Fence, *, next_attempt_at: datetime | None = None, **fields: Any
) -> bool:
    """Let go of a job where it is, due again at ``next_attempt_at`` (at once when None): a
    limit was reached, or the step asks fal again later. ``fields`` record why (e.g. a count of
    failed tries); no state change, no version bump."""
    return update_job_fields(
        session,
        fence.job_id,
        expected_version=fence.version,
        next_attempt_at=next_attempt_at,
        **_UNLEASED,
        **fields,
    )


@dataclass(frozen=True, slots=True)
class ReleasedLeases:
    """What :func:`release_process_leases` (or :func:`release_step_jobs`) did.

    ``unsent``: ``submitting`` jobs whose POST had not started, back to ``pending``.
    ``released``: other jobs whose lease was cleared (downloads, status checks, queued downloads),
    due again at once. ``in_flight``: ``submitting`` jobs whose exact input is recorded, so their
    POST may be on its way: left alone for the reconciler, which never resends blindly.
    """

    unsent: int = 0
    released: int = 0
    in_flight: int = 0


def release_process_leases(
    session: Session,
    owner_prefix: str,
    *,
    batch_ids: Iterable[str] | None = None,
    queued_owner: str | None = None,
    worker: str | None = None,
) -> ReleasedLeases:
    """Give back every lease held by one stopping process, so the next run picks its jobs up at once.

    Lease owners are ``host:pid:thread``; ``owner_prefix`` (``host:pid:``) matches every thread
    of the process. Without this a Ctrl-C left the process's jobs leased to a dead owner until the
    lease expired (``WANBATCH_LEASE_SECONDS``). ``queued_owner`` also clears that owner's leases on
    the jobs of ``batch_ids``: the download messages an embedded run queued in its own memory, which
    die with it. A job whose POST may be in flight is never touched: only the reconciler may decide
    what became of it. Each move is a compare-and-set, so a thread of the stopping process that
    takes a lease meanwhile (to send its POST) wins and is counted as in flight instead.
    """
    if not owner_prefix:
        raise ValueError("release_process_leases needs an owner prefix")
    ours = Job.lease_owner.startswith(owner_prefix, autoescape=True)
    unsent, in_flight = _give_back_unsent(
        session, ours, worker, reason="given back: the process stopped before sending"
    )
    holders: ColumnElement[bool] = ours
    if queued_owner is not None:
        queued = Job.lease_owner == queued_owner
        if batch_ids is not None:
            queued = queued & Job.batch_id.in_(sorted(set(batch_ids)))
        holders = or_(ours, queued)
    released = _clear_leases(session, holders)
    return ReleasedLeases(unsent=unsent, released=released, in_flight=in_flight)


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """Another process's live leases on a batch's unfinished jobs (:func:`lease_holders`)."""

    #: The lease owner as stored (``host:pid:thread``, or a queue's name).
    owner: str
    jobs: int
    #: When the last of them lapses, if nothing renews it.
    until: datetime


def lease_holders(session: Session, batch_id: str, *, now: datetime, excluding: str) -> list[LeaseHolder]:
    """Who else holds live leases on ``batch_id``'s unfinished jobs: every owner not starting with
    ``excluding`` (this process's ``host:pid:``). A ``--simulate`` run asks, to take back at once
    what a dead simulated run held, or to say what it waits for (:mod:`worker.steps.dead_leases`)."""
    rows = session.execute(
        select(Job.lease_owner, func.count(), func.max(Job.lease_expires_at))
        .where(
            Job.batch_id == batch_id,
            Job.state.in_(UNFINISHED_STATES),
            Job.lease_owner.is_not(None),
            Job.lease_expires_at > now,
            ~Job.lease_owner.startswith(excluding, autoescape=True),
        )
        .group_by(Job.lease_owner)
        .order_by(Job.lease_owner)
    ).all()
    return [LeaseHolder(str(owner), int(count), until) for owner, count, until in rows if until is not None]


def lease_holders_of_batches(
    session: Session, batch_ids: Collection[str], *, now: datetime, excluding: str
) -> dict[str, list[LeaseHolder]]:
    """:func:`lease_holders` of each of ``batch_ids`` (those with none left out), in one query:
    what ``status`` reads to name the holders that are gone (:func:`jobs.listing.dead_holders`)."""
    if not batch_ids:
        return {}
    rows = session.execute(
        select(Job.batch_id, Job.lease_owner, func.count(), func.max(Job.lease_expires_at))
        .where(
            Job.batch_id.in_(sorted(set(batch_ids))),
            Job.state.in_(UNFINISHED_STATES),
            Job.lease_owner.is_not(None),
            Job.lease_expires_at > now,
            ~Job.lease_owner.startswith(excluding, autoescape=True),
        )
        .group_by(Job.batch_id, Job.lease_owner)
        .order_by(Job.batch_id, Job.lease_owner)
    ).all()
    found: dict[str, list[LeaseHolder]] = {}
    for batch_id, owner, count, until in rows:
        if until is not None:
            found.setdefault(str(batch_id), []).append(LeaseHolder(str(owner), int(count), until))
    return found


def owners_last_seen(session: Session, prefixes: Collection[str]) -> dict[str, datetime]:
    """When each of the processes ``prefixes`` (``host:pid:``) last recorded a heartbeat, any
    scope (:class:`~jobs.models.ConductorHeartbeat`); those without a row are left out (never
    beat, or stopped cleanly: a process that stops cleanly deletes its rows)."""
    wanted = sorted(set(prefixes))
    if not wanted:
        return {}
    rows = session.execute(
        select(ConductorHeartbeat.owner, func.max(ConductorHeartbeat.seen_at))
        .where(or_(*(ConductorHeartbeat.owner.startswith(p, autoescape=True) for p in wanted)))
        .group_by(ConductorHeartbeat.owner)
    ).all()
    seen: dict[str, datetime] = {}
    for owner, at in rows:
        prefix = next((p for p in wanted if str(owner).startswith(p)), None)
        if prefix is not None and at is not None and (prefix not in seen or at > seen[prefix]):
            seen[prefix] = at
    return seen


def expire_leases(session: Session, batch_id: str, owners: Collection[str], *, now: datetime) -> int:
    """Let the leases ``owners`` hold on ``batch_id``'s unfinished jobs lapse now, as if their time
    had run out: their owners are known to be gone, so the jobs are claimed again at once, through
    the same paths as any expired lease (a ``submitting`` one by the reconciler). The owner stays
    written, for the history. How many jobs."""
    if not owners:
        return 0
    lapsed = session.execute(
        update(Job)
        .where(
            Job.batch_id == batch_id,
            Job.state.in_(UNFINISHED_STATES),
            Job.lease_owner.in_(sorted(set(owners))),
            Job.lease_expires_at > now,
        )
        .values(lease_expires_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(lapsed.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class TakenBack:
    """What :func:`take_back_dead_leases` did: jobs not sent yet back to ``pending``
    (``unsent``), other leases lapsed now (``lapsed``: downloads, status checks, result
    fetches), and submits whose POST may be out, left to their lease (``in_flight``)."""

    unsent: int
    lapsed: int
    in_flight: int


def adopt_requests_sent_elsewhere(
    session: Session, batch_id: str, origin: str, *, now: datetime
) -> dict[str, int]:
    """Make ``batch_id``'s requests at fal that were sent to another fal queue than ``origin`` this
    queue's to follow (``Job.fal_origin`` := ``origin``): how many, by the origin they had.

    For an embedded ``run`` of the batch that nothing else follows (no other live process beats
    for it, nor the distributed workers): a request sent to a queue URL nobody runs any more (the
    user changed ``WANBATCH_FAL_QUEUE_URL`` between runs of the batch, a stand-in's port changed)
    would otherwise never be asked about again, its job queued for good. Asked about here, fal
    answers it as ever (a proxy and fal itself share requests), or says it never had it. A
    request whose id a job of this queue holds too is left where it was.

    Its two statements are built once (:func:`_prepared`): an embedded run asks this every
    :data:`worker.steps.dead_leases.SCAN_SECONDS`, and building them (an alias, a correlated
    ``EXISTS``) cost ~2.5 ms of CPU a call, ten times running them."""
    params = {"a_batch": batch_id, "a_origin": origin, "a_now": now}
    count, move = _prepared(("adopt-elsewhere",), _adopt_elsewhere_statements)
    counts = {str(was): int(n) for was, n in _run(session, count, params)}
    if counts:
        _run(session, move, params)
    return counts


def _adopt_elsewhere_statements() -> tuple[Any, Any]:
    """:func:`adopt_requests_sent_elsewhere`'s count and update, bound at execution to
    ``a_batch``, ``a_origin`` and ``a_now`` (not column names: the update sets two columns)."""
    jobs = _JOBS.c
    origin = bindparam("a_origin", type_=jobs.fal_origin.type)
    held = (
        (jobs.batch_id == bindparam("a_batch", type_=jobs.batch_id.type))
        & jobs.state.in_([JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING, JobState.DOWNLOADING])
        & jobs.request_id.is_not(None)
        & jobs.fal_origin.is_not(None)
        & (jobs.fal_origin != origin)
    )
    # A request id is fal's within one queue: one a job of this queue holds (a seeded stand-in
    # restarted on another port hands out its ids again) would be that job's request here.
    other = _JOBS.alias("other")
    held = held & ~exists().where(_same_request_elsewhere(other.c, jobs.request_id, jobs.id, origin))
    count = select(jobs.fal_origin, func.count()).where(held).group_by(jobs.fal_origin)
    move = (
        update(_JOBS)
        .where(held)
        .values(fal_origin=origin, updated_at=bindparam("a_now", type_=jobs.updated_at.type))
    )
    return _kept(count), _kept(move)


def take_back_dead_leases(
    session: Session, batch_id: str, owners: Collection[str], *, now: datetime, worker: str
) -> TakenBack:
    """Take back at once what ``owners`` — processes known to have ended — hold on ``batch_id``'s
    unfinished jobs, as far as that can never pay for anything twice:

    * a job claimed but not sent (``submitting``, no input recorded) goes back to ``pending`` by a
      fenced move: should its holder live after all, its own send is fenced out (it records the
      send by the version this moves on), so the job goes out once;
    * any other lease (a download, a status check, a result fetch) lapses now: the work is done
      again at worst, and its outcome recorded once (fenced);
    * a submit whose POST may be out (its input recorded) is left to its lease: its outcome is
      unknown, and only the reconciler decides it once the lease lapses (``submit_unknown``,
      never resent blindly). A live holder — one that merely looked gone — renews that lease
      while its POST is in flight, so its answer is never declared unknown while it may come.
    """
    if not owners:
        return TakenBack(0, 0, 0)
    theirs = (
        (Job.batch_id == batch_id) & Job.lease_owner.in_(sorted(set(owners))) & (Job.lease_expires_at > now)
    )
    unsent, in_flight = _give_back_unsent(
        session,
        theirs,
        worker,
        reason="taken back from a process of this host that has ended, before it sent",
    )
    lapsed = session.execute(
        update(Job)
        .where(theirs, Job.state.in_([s for s in UNFINISHED_STATES if s != JobState.SUBMITTING]))
        .values(lease_expires_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return TakenBack(unsent, int(lapsed.rowcount), in_flight)  # type: ignore[attr-defined]


def release_step_jobs(
    session: Session, job_ids: Collection[str], owner_prefix: str, *, queued_owner: str, worker: str
) -> ReleasedLeases:
    """Give back the jobs whose step the database failed (a killed connection, a restart), once
    it answers again: the tick takes them up at once, not after their lease runs out.

    A job not sent yet (``submitting``, no input recorded) goes back to ``pending`` whoever's
    lease it is under: dispatch leased it, in this process or in the tick leader's, for the very
    step that failed, and a copy of that step's message that might still run is fenced out (it
    takes the lease by the version this moves on). A lease of this process (``owner_prefix``) or
    of ``queued_owner`` (a download message not running yet) is cleared. A job whose POST may
    have gone out is left alone (``in_flight``), for the reconciler.
    """
    if not owner_prefix:
        raise ValueError("release_step_jobs needs an owner prefix")
    only = Job.id.in_(sorted(set(job_ids)))
    unsent, in_flight = _give_back_unsent(
        session, only, worker, reason="given back: the database failed its submit before sending"
    )
    ours = Job.lease_owner.startswith(owner_prefix, autoescape=True)
    released = _clear_leases(session, only & or_(ours, Job.lease_owner == queued_owner))
    return ReleasedLeases(unsent=unsent, released=released, in_flight=in_flight)


def _give_back_unsent(
    session: Session, which: ColumnElement[bool], worker: str | None, *, reason: str
) -> tuple[int, int]:
    """``submitting`` jobs matching ``which``: those whose POST has not started (no input
    recorded) back to ``pending``; returns how many moved, and how many may be in flight (their
    input recorded, or moved on by someone else meanwhile) and were left alone."""
    unsent = in_flight = 0
    submitting = session.execute(
        select(Job.id, Job.version, Job.submitted_input.is_(None))
        .where(Job.state == JobState.SUBMITTING, which)
        .order_by(Job.id)
    ).all()
    for job_id, version, not_sent in submitting:
        moved = not_sent and give_back(
            session,
            Fence(job_id, JobState.SUBMITTING, version, worker),
            reason=reason,
        )
        if moved:
            unsent += 1
        else:
            in_flight += 1
    return unsent, in_flight


def _clear_leases(session: Session, holders: ColumnElement[bool]) -> int:
    """Clear the lease of every job matching ``holders`` that is neither being submitted (the
    reconciler's) nor finished: due again at once. How many."""
    cleared = session.execute(
        update(Job)
        .where(holders, Job.state.not_in([JobState.SUBMITTING, *(s for s in JobState if s.terminal)]))
        .values(lease_owner=None, lease_expires_at=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(cleared.rowcount)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- reading jobs


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


def job_heads(session: Session, job_ids: Collection[str]) -> dict[str, JobHead]:
    """:class:`JobHead` of these jobs (missing ones are left out), in one query.

    A status stream reports a few requests at a time; loading whole jobs for it (their inputs,
    results and provider metadata, JSON to decode) was the largest share of applying it.
    """
    if not job_ids:
        return {}
    query = _prepared(
        ("job_heads",),
        lambda: select(Job.id, Job.state, Job.version, Job.request_id, Job.batch_id, Job.submitted_at).where(
            Job.id.in_(bindparam("ids", expanding=True))
        ),
    )
    rows = _run(session, query, {"ids": sorted(job_ids)})
    return {
        row.id: JobHead(
            row.id, JobState(row.state), row.version, row.request_id, row.batch_id, row.submitted_at
        )
        for row in rows
    }


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
    query = select(Job).where(Job.state.in_(list(states)), Job.request_id.is_not(None))
    if exclude_ids:
        query = query.where(Job.id.not_in(sorted(exclude_ids)))
    if batch_ids is not None:
        query = query.where(Job.batch_id.in_(sorted(batch_ids)))
    if exclude_batch_ids:
        query = query.where(Job.batch_id.not_in(sorted(exclude_batch_ids)))
    if sent_to is not None:
        query = query.where(sent_to_origin(sent_to))
    return list(session.scalars(query.order_by(Job.submitted_at, Job.id).limit(limit)))


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
    )
    sized = (Job.actual_prompt, Job.input, Job.source_files)
    for row in _rows_bounded(session, columns, [Job.batch_id == batch_id], sized):
        yield DiffRow(*tuple(row))


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
)


def _repeat(row: Any) -> RerunRepeat:
    """A row of :data:`_REPEAT_COLUMNS` as a :class:`RerunRepeat`."""
    job_id, of, batch, name, simulated, state, data, endpoint, sources, batch_state, paused, schedule = row
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
    )


def rerun_repeats(session: Session, batch_id: str, states: Sequence[JobState]) -> list[RerunRepeat]:
    """Every job of the reruns of ``batch_id`` (its reruns, theirs, …) that repeats one of its
    jobs in ``states``, directly or through a repeat of a former generation; generation by
    generation, so each row's ``rerun_of`` is the batch's job or a row before it.

    Walked by the batches' ``parent_batch_id`` (few rows) and then each child batch's jobs
    (``batch_id`` is indexed), never by a scan of every job's ``rerun_of``."""
    found: list[RerunRepeat] = []
    parents = [batch_id]
    repeated: Any = select(Job.id).where(Job.batch_id == batch_id, Job.state.in_(list(states)))
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
        found.extend(_repeat(row) for row in session.execute(generation))
        repeated = select(Job.id).where(Job.batch_id.in_(children), Job.rerun_of.in_(repeated))
        parents = children
    return found


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
            "input after all (its submit's late answer or proof came): sent, it would be billed twice"
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
    wanted = set(batch_ids)
    children: dict[str, list[str]] = {}
    for child, parent in session.execute(
        select(Batch.id, Batch.parent_batch_id).where(Batch.parent_batch_id.is_not(None))
    ):
        children.setdefault(str(parent), []).append(str(child))
    # Each batch's reruns generation by generation: level[root] = its batches ``g`` generations down.
    level = {root: [root] for root in wanted if root in children}
    root_of: dict[str, str] = {}  # a batch of this generation → the batch it is a rerun of, g generations up
    counted: dict[str, set[str]] = {}  # root → ids of the rows counted for it in the generation before
    found: dict[str, list[RerunRepeat]] = {}
    of = aliased(Job)
    repeated: Any = select(Job.id).where(Job.batch_id.in_(list(level)), Job.state.in_(list(states)))
    first = True
    while level:
        level = {root: [c for b in batches for c in children.get(b, ())] for root, batches in level.items()}
        level = {root: batches for root, batches in level.items() if batches}
        if not level:
            break
        root_of = {b: root for root, batches in level.items() for b in batches}
        generation = (
            select(*_REPEAT_COLUMNS, of.batch_id, of.state)
            .join(Batch, Batch.id == Job.batch_id)
            .join(of, of.id == Job.rerun_of)
            .where(Job.batch_id.in_(sorted(root_of)), Job.rerun_of.in_(repeated))
            .order_by(Batch.created_at, Job.item_index, Job.variant, Job.id)
        )
        now_counted: dict[str, set[str]] = {}
        for *row, of_batch, of_state in session.execute(generation):
            repeat = _repeat(row)
            root = root_of[repeat.batch_id]
            if first:
                if of_batch != root or JobState(of_state) not in states:
                    continue
            elif repeat.rerun_of not in counted.get(root, ()):
                continue
            found.setdefault(root, []).append(repeat)
            now_counted.setdefault(root, set()).add(repeat.job_id)
        repeated = select(Job.id).where(Job.batch_id.in_(sorted(root_of)), Job.rerun_of.in_(repeated))
        counted, first = now_counted, False
    return found


def jobs_of_batches(
    session: Session, batch_ids: Collection[str], states: Sequence[JobState]
) -> Iterator[Job]:
    """The jobs in ``states`` of every batch of ``batch_ids`` (:func:`jobs_of_batch` of each), in
    one query, batch by batch in item order."""
    if not batch_ids:
        return
    query = (
        select(Job)
        .where(Job.batch_id.in_(sorted(batch_ids)), Job.state.in_(list(states)))
        .order_by(Job.batch_id, Job.item_index, Job.variant, Job.created_at, Job.id)
        .execution_options(yield_per=500)
    )
    yield from session.scalars(query)


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


def failure_reasons(session: Session, batch_id: str, *, limit: int = 5) -> list[FailureGroup]:
    """The commonest reasons jobs ended failed or cancelled, by state, ``error_type`` and
    whether they were sent, each with one of its jobs' errors as its example."""
    sent = Job.submitted_at.is_not(None)
    query = (
        select(Job.state, Job.error_type, sent, func.min(Job.error), func.count())
        .where(Job.batch_id == batch_id, Job.state.in_([JobState.FAILED, JobState.CANCELLED]))
        .group_by(Job.state, Job.error_type, sent)
        .order_by(func.count().desc(), Job.state, Job.error_type, sent)
        .limit(limit)
    )
    return [
        FailureGroup(
            state=JobState(st).value, error_type=et, sent=bool(was_sent), example=ex or "", count=int(n)
        )
        for st, et, was_sent, ex, n in session.execute(query)
    ]


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
            rank.label("rank"),
        )
        .where(Job.batch_id.in_(sorted(batch_ids)), Job.state.in_([JobState.FAILED, JobState.CANCELLED]))
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
        )
        .where(ranked.c.rank <= limit)
        .order_by(ranked.c.batch_id, ranked.c.rank)
    )
    found: dict[str, list[FailureGroup]] = {}
    for batch_id, st, et, was_sent, ex, n in session.execute(query):
        found.setdefault(str(batch_id), []).append(
            FailureGroup(
                state=JobState(st).value, error_type=et, sent=bool(was_sent), example=ex or "", count=int(n)
            )
        )
    return found


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


@dataclass(frozen=True, slots=True)
class CapScope:
    """Which jobs a dispatcher's caps count (:meth:`of`): those it shares a limit with, never
    jobs that cannot hold it back.

    The outstanding cap guards fal's account, so it counts the requests really at that
    provider with this key, whatever their batch; the download backlog guards this process's
    own downloads piling up, so it counts the downloads this process makes. Counting more held
    every later run back for ever: a batch interrupted during its downloads (whose own run
    alone downloads them) or a simulation whose simulator had exited (its requests are at no
    provider this run talks to) left ``pending`` jobs of every other batch waiting in silence.
    """

    #: The key whose requests count against the outstanding cap; None: whatever key (a
    #: simulation's requests, which only its own simulator holds).
    api_key_id: str | None
    #: Only these batches' requests count against the outstanding cap; None: every batch's.
    requests_of: frozenset[str] | None = None
    #: Only these batches' downloads count in the backlog; None: every batch sent to fal (the
    #: distributed workers download all of them, and never a simulation's).
    downloads_of: frozenset[str] | None = None
    #: The requests at fal of every key count against the outstanding cap, not only
    #: ``api_key_id``'s (never a simulation's): the distributed workers' dispatch, where a worker
    #: with another ``FAL_KEY`` sends a job with its own key (``record_send``). Counting them all
    #: errs on the safe side: no account ever holds more than the cap.
    every_key: bool = False
    #: The origin of the counting process's fal queue (``Job.fal_origin``'s form). A request sent
    #: to another queue counts against the outstanding cap while a live process other than
    #: :attr:`me` works on its batch, or on every batch (:class:`Followed`): then its state moves
    #: and its slot comes back when it ends, and if that queue is fal's under another URL, it does
    #: hold one of the account's slots. Nobody following it (its run stopped), its row keeps the
    #: state it was last seen in for good, while fal — if that URL is fal's — still queues or
    #: runs it for a while: it counts until :data:`UNFOLLOWED_SECONDS` after it was last heard of
    #: (``Job.updated_at``) or, still waiting to start, after its start timeout ends if that is
    #: later (:func:`_heard_lately`); then it stops counting (a stand-in stopped with requests
    #: waiting held every later run's slots for good). The queue-wait back-off counts this
    #: queue's requests only (:attr:`QueueWaits`). A request with no origin recorded counts as
    #: this queue's. None: every queue's count (a simulation's scope: its requests are its run's
    #: simulator's, whichever port that one had).
    origin: str | None = None
    #: The heartbeat owner of the counting process (``Runtime.owner``), whose own beats do not
    #: make another queue's requests followed; "" for a process that does not beat (``status``).
    me: str = ""

    @classmethod
    def of(
        cls,
        *,
        api_key_id: str,
        batch_ids: Collection[str] | None,
        simulated: bool,
        every_key: bool = False,
        origin: str | None = None,
        me: str = "",
    ) -> CapScope:
        """The caps' scope of a process working on ``batch_ids`` (None: every batch, the
        distributed workers) with the key ``api_key_id`` and the fal queue at ``origin``
        (:attr:`origin`; ``me``: its heartbeat owner); ``simulated``: its fal is the simulator
        of a ``run --simulate``.

        A simulator holds the requests of the one batch its run processes and nothing else,
        so only that batch's requests and downloads count; an embedded run downloads its own
        batch only (other batches' results wait for their own run), while its requests share
        fal's account with every batch sent with the key to its queue, or to another one that
        a live process follows.
        """
        own = frozenset(batch_ids) if batch_ids is not None else None
        if simulated:
            return cls(api_key_id=None, requests_of=own or frozenset(), downloads_of=own or frozenset())
        return cls(
            api_key_id=api_key_id,
            requests_of=None,
            downloads_of=own,
            every_key=every_key,
            origin=origin,
            me=me,
        )


@dataclass(frozen=True, slots=True)
class InFlight:
    """What a dispatch round needs to know of the jobs in flight, read in one query
    (:func:`in_flight`)."""

    #: Requests at fal (or being sent) within the scope: the outstanding cap counts these.
    outstanding: int
    #: Jobs done at fal and waiting for a download within the scope (the download backlog).
    downloading: int
    #: Requests of the scope's own fal queue (:attr:`CapScope.origin`) still ``queued`` that were
    #: sent before the given moment: the queue-wait back-off's signal.
    waiting_long: int
    #: Whether any job waiting for a retry is due (any batch, any key): none, and no claim need
    #: look for them. Not a count of them all: a 5xx outage leaves thousands waiting out their
    #: backoff, and counting them read every one on every round.
    retry_due: bool


#: How long a request sent to another fal queue (:attr:`CapScope.origin`) that no live process
#: follows keeps counting against the outstanding cap after it was last heard of, or after its
#: start timeout ends (one still waiting to start): a bound on how long fal runs a request once
#: started (an hour: Wan renders take minutes, ``typical_seconds`` 60 to 150; fal lets a started
#: request run to its end). Until then that URL may be fal's under another name (a proxy), which
#: still runs the request on the account; after it, a stand-in's requests stop holding runs back.
UNFOLLOWED_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Followed:
    """Which batches a live process other than the counting one follows (:func:`followed_now`):
    their requests at another fal queue count as long as they are at fal (:attr:`CapScope.origin`).
    Read once per dispatch round, one small query on the heartbeats, and bound into the counts."""

    #: A live process beats for every batch (the distributed workers' leader): every request counts.
    every: bool = False
    #: The batches live processes beat for (sorted), when not :attr:`every`.
    batch_ids: tuple[str, ...] = ()


#: A scope with no origin, or nothing else to go by: every request counts as followed.
FOLLOWED_ALL = Followed(every=True)


def followed_now(session: Session, scope: CapScope, now: datetime) -> Followed:
    """:class:`Followed` as of ``now`` for ``scope``: the batches (or every batch) a process
    other than :attr:`CapScope.me` beat for within :data:`jobs.db.HEARTBEAT_STALE_SECONDS` — the
    rule the adoption of a batch's requests at another queue goes by
    (``worker.steps.dead_leases``): nothing else beats for the batch, and nobody follows them
    but its next run. No query for a scope without an origin (every queue counts)."""
    if scope.origin is None:
        return FOLLOWED_ALL

    def build() -> Any:
        return (
            select(ConductorHeartbeat.scope)
            .where(
                ConductorHeartbeat.seen_at >= bindparam("live_since"),
                ConductorHeartbeat.owner != bindparam("me"),
            )
            .distinct()
        )

    params = {"live_since": now - timedelta(seconds=db.HEARTBEAT_STALE_SECONDS), "me": scope.me}
    scopes = {str(row[0]) for row in _run(session, _prepared(("followed_now",), build), params).all()}
    if EVERY_BATCH in scopes:
        return FOLLOWED_ALL
    return Followed(batch_ids=tuple(sorted(scopes)))


def _requests_in(
    scope: CapScope, *, own_queue: bool = False, followed: Followed = FOLLOWED_ALL
) -> list[ColumnElement[bool]]:
    """The conditions of :attr:`CapScope.api_key_id`, :attr:`CapScope.requests_of` and
    :attr:`CapScope.origin`, their values bound as ``api_key_id``, ``requests_of``, ``origin``,
    ``followed`` and ``heard_since`` (:func:`_scope_params`). ``own_queue``: only the requests
    of the scope's own fal queue (the queue-wait back-off's); else those at another queue too
    while a live process follows their batch (``followed``: the same shape must be bound with
    the same :class:`Followed`'s values) or fal may still hold them (:func:`_heard_lately`)."""
    conditions: list[ColumnElement[bool]] = []
    if scope.every_key:
        conditions.append(_paid(Job.batch_id))
    elif scope.api_key_id is not None:
        conditions.append(_sent_with(bindparam("api_key_id")))
    if scope.requests_of is not None:
        conditions.append(Job.batch_id.in_(bindparam("requests_of", expanding=True)))
    if scope.origin is not None and (own_queue or not followed.every):
        conditions.append(_at_fal_for(sent_to_origin(bindparam("origin")), own_queue, followed))
    return conditions


def _at_fal_for(here: ColumnElement[bool], own_queue: bool, followed: Followed) -> ColumnElement[bool]:
    """``here`` (the own queue's requests), or with them those at another queue that count now."""
    if own_queue:
        return here
    if followed.every:
        return true()
    if followed.batch_ids:  # never an empty IN: the driver-direct path refuses one
        return or_(here, Job.batch_id.in_(bindparam("followed", expanding=True)), _heard_lately())
    return or_(here, _heard_lately())


def _heard_lately() -> ColumnElement[bool]:
    """A request nobody follows that fal may still queue or run: last heard of (its row last
    changed: its state as last seen, a poll) since ``heard_since`` (:data:`UNFOLLOWED_SECONDS`
    ago), or still waiting to start with a start timeout that ended since then (fal may start
    it until then, and it then runs). Plain comparisons with bound values: no date arithmetic,
    each dialect's own."""
    since: BindParameter[datetime] = bindparam("heard_since")
    return or_(
        Job.updated_at >= since,
        and_(Job.state.in_(list(WAITING_AT_FAL)), Job.start_timeout_at >= since),
    )


def _downloads_in(scope: CapScope) -> ColumnElement[bool]:
    """The condition of :attr:`CapScope.downloads_of`, bound as ``downloads_of``."""
    if scope.downloads_of is not None:
        return Job.batch_id.in_(bindparam("downloads_of", expanding=True))
    return _paid(Job.batch_id)


def _scope_params(
    scope: CapScope, now: datetime | None = None, followed: Followed = FOLLOWED_ALL
) -> dict[str, Any]:
    """The values :func:`_requests_in` and :func:`_downloads_in` bind (``now``: the clock when
    None; ``followed``: the one the statement's shape was built with)."""
    return {
        "api_key_id": scope.api_key_id,
        "requests_of": sorted(scope.requests_of or ()),
        "downloads_of": sorted(scope.downloads_of or ()),
        "origin": scope.origin,
        "followed": list(followed.batch_ids),
        "heard_since": (now or utcnow()) - timedelta(seconds=UNFOLLOWED_SECONDS),
    }


def _scope_shape(scope: CapScope, followed: Followed = FOLLOWED_ALL) -> tuple[bool, ...]:
    """What tells the statements of different scopes apart (:func:`_prepared`'s key)."""
    return (
        scope.api_key_id is None,
        scope.requests_of is None,
        scope.downloads_of is None,
        scope.every_key,
        scope.origin is None,
        followed.every,
        bool(followed.batch_ids),
    )


def in_flight(
    session: Session,
    *,
    scope: CapScope,
    sent_before: datetime,
    now: datetime,
    followed: Followed | None = None,
) -> InFlight:
    """The counts of :class:`InFlight` in ``scope``, in one pass over the in-flight states' index
    entries, and whether a ``retry_wait`` job is due at ``now`` (one look at the index on
    (``state``, ``next_attempt_at``)). ``followed``: :func:`followed_now`, read here when None.

    A dispatch round runs on every completion; the three counts it used to ask one by one,
    and a claim query for retries when there were none, were a third of its statements.
    """

    if followed is None:
        followed = followed_now(session, scope, now)

    def build() -> Any:
        requests = _requests_in(scope, followed=followed)
        return select(
            func.count().filter(Job.state.in_(bindparam("at_fal", expanding=True)), *requests),
            func.count().filter(Job.state == JobState.DOWNLOADING, _downloads_in(scope)),
            func.count().filter(
                Job.state == JobState.QUEUED,
                Job.submitted_at.is_not(None),
                Job.submitted_at <= bindparam("before"),
                *_requests_in(scope, own_queue=True),
            ),
            or_(*(_any_due_retry(due) for due in _DUE)),
        ).where(Job.state.in_(bindparam("states", expanding=True)))

    at_fal = sorted(AT_PROVIDER_STATES, key=lambda state: state.value)
    params = {
        "at_fal": at_fal,
        "states": [*at_fal, JobState.DOWNLOADING],
        "before": sent_before,
        "now": now,
        **_scope_params(scope, now, followed),
    }
    row: Any = _run(session, _prepared(("in_flight", *_scope_shape(scope, followed)), build), params).one()
    return InFlight(int(row[0]), int(row[1]), int(row[2]), bool(row[3]))


@dataclass(frozen=True, slots=True)
class CapHolder:
    """One batch's jobs that count against a dispatcher's caps (:func:`cap_holders`)."""

    batch_id: str
    name: str
    endpoint: str
    #: Its requests at fal (or being sent) within the scope: the outstanding caps'.
    requests: int
    #: Its jobs waiting for their download within the scope: the download backlog's.
    downloads: int


def cap_holders(session: Session, scope: CapScope) -> list[CapHolder]:
    """Who holds the caps of ``scope``, per batch and endpoint, in one pass over the in-flight
    jobs (the same counts as :func:`in_flight`): what ``run`` and ``status`` name when a cap
    holds submits back."""
    now = utcnow()
    followed = followed_now(session, scope, now)
    at_fal = sorted(AT_PROVIDER_STATES, key=lambda state: state.value)
    requests = func.count().filter(Job.state.in_(at_fal), *_requests_in(scope, followed=followed))
    downloads = func.count().filter(Job.state == JobState.DOWNLOADING, _downloads_in(scope))
    query = (
        select(Job.batch_id, Batch.name, Job.endpoint, requests, downloads)
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.state.in_([*at_fal, JobState.DOWNLOADING]))
        .group_by(Job.batch_id, Batch.name, Job.endpoint)
        .order_by(Job.batch_id, Job.endpoint)
    )
    rows = session.execute(query, _scope_params(scope, now, followed))
    return [
        CapHolder(str(batch_id), str(name), str(endpoint), int(n_requests), int(n_downloads))
        for batch_id, name, endpoint, n_requests, n_downloads in rows
        if n_requests or n_downloads
    ]


@dataclass(frozen=True, slots=True)
class CapCounts:
    """One batch's in-flight jobs per endpoint as every :class:`CapScope` of one key may count
    them (:func:`cap_counts`); :func:`holders_in` picks a scope's."""

    batch_id: str
    name: str
    endpoint: str
    #: Requests at fal (or being sent): sent with the key (or none recorded), of any key, and of
    #: any key in a batch that is not a simulation; the first and the last of the fal queue
    #: :func:`cap_counts` was given, or of another one that counts now (:attr:`CapScope.origin`).
    requests_with_key: int
    requests: int
    requests_paid: int
    #: Jobs waiting for their download: all, and those of batches that are not simulations.
    downloads: int
    downloads_paid: int


def cap_counts(session: Session, api_key_id: str | None, origin: str | None = None) -> list[CapCounts]:
    """The in-flight jobs of every batch per endpoint, counted for every scope of
    ``api_key_id`` and the fal queue at ``origin`` at once (one pass, as :func:`cap_holders`):
    what ``status`` with no batch reads once, and :func:`holders_in` answers each batch's scope
    from. ``origin`` (:attr:`CapScope.origin`) applies to the counts of a key's or every key's
    requests, not to a simulation's (its scope has no origin); None: every queue's."""
    now = utcnow()
    counting = CapScope(api_key_id=api_key_id, origin=origin)  # ``status``: it beats for nothing
    followed = followed_now(session, counting, now)
    at_fal = sorted(AT_PROVIDER_STATES, key=lambda state: state.value)
    on_fal = Job.state.in_(at_fal)
    on_fal_here: ColumnElement[bool] = on_fal
    if origin is not None and not followed.every:  # as :func:`_requests_in` counts them
        on_fal_here = on_fal & _at_fal_for(sent_to_origin(bindparam("origin")), False, followed)
    downloading = Job.state == JobState.DOWNLOADING
    query = (
        select(
            Job.batch_id,
            Batch.name,
            Job.endpoint,
            func.count().filter(on_fal_here, _sent_with(bindparam("api_key_id"))),
            func.count().filter(on_fal),
            func.count().filter(on_fal_here, _paid(Job.batch_id)),
            func.count().filter(downloading),
            func.count().filter(downloading, _paid(Job.batch_id)),
        )
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.state.in_([*at_fal, JobState.DOWNLOADING]))
        .group_by(Job.batch_id, Batch.name, Job.endpoint)
        .order_by(Job.batch_id, Job.endpoint)
    )
    return [
        CapCounts(str(batch_id), str(name), str(endpoint), *(int(n) for n in counts))
        for batch_id, name, endpoint, *counts in session.execute(
            query, _scope_params(counting, now, followed)
        )
    ]


def holders_in(counts: Iterable[CapCounts], scope: CapScope) -> list[CapHolder]:
    """:func:`cap_holders` of ``scope`` from :func:`cap_counts` (read with ``scope``'s key, or
    any key when ``scope`` has none): the same rows, without a query."""
    holders = []
    for c in counts:
        if scope.every_key:
            requests = c.requests_paid
        elif scope.api_key_id is not None:
            requests = c.requests_with_key
        else:
            requests = c.requests
        if scope.requests_of is not None and c.batch_id not in scope.requests_of:
            requests = 0
        if scope.downloads_of is not None:
            downloads = c.downloads if c.batch_id in scope.downloads_of else 0
        else:
            downloads = c.downloads_paid
        if requests or downloads:
            holders.append(CapHolder(c.batch_id, c.name, c.endpoint, requests, downloads))
    return holders


def count_cancelled(session: Session, batch_id: str, error_type: str) -> int:
    """How many jobs of a batch ended cancelled for ``error_type`` (``deadline``, ``budget``, …)."""
    query = (
        select(func.count())
        .select_from(Job)
        .where(Job.batch_id == batch_id, Job.state == JobState.CANCELLED, Job.error_type == error_type)
    )
    return int(session.scalar(query) or 0)


def count_cancelled_of_batches(
    session: Session, batch_ids: Collection[str], error_type: str
) -> dict[str, int]:
    """:func:`count_cancelled` of each of ``batch_ids`` in one query (batches with none left out)."""
    if not batch_ids:
        return {}
    query = (
        select(Job.batch_id, func.count())
        .where(
            Job.batch_id.in_(sorted(batch_ids)),
            Job.state == JobState.CANCELLED,
            Job.error_type == error_type,
        )
        .group_by(Job.batch_id)
    )
    return {str(batch_id): int(n) for batch_id, n in session.execute(query)}


def submitted_at_in_state(
    session: Session, batch_ids: Collection[str], state: JobState
) -> list[tuple[str, datetime | None]]:
    """``(batch id, submitted_at)`` of every job in ``state`` of ``batch_ids``, in one query."""
    if not batch_ids:
        return []
    query = select(Job.batch_id, Job.submitted_at).where(
        Job.batch_id.in_(sorted(batch_ids)), Job.state == state
    )
    return [(str(batch_id), at) for batch_id, at in session.execute(query)]


def sent_to_origin(origin: str | BindParameter[Any]) -> ColumnElement[bool]:
    """Jobs whose request went to the fal queue at ``origin``, or to one not recorded (sent
    before schema 0034): the requests a process configured with that queue may ask about."""
    return or_(_JOBS.c.fal_origin == origin, _JOBS.c.fal_origin.is_(None))


def _sent_with(api_key_id: str | BindParameter[Any]) -> ColumnElement[bool]:
    """Jobs sent with this API key, or with none recorded (e.g. in flight across the upgrade that
    added the column): counting those too errs on the side of the cap."""
    return or_(Job.api_key_id == api_key_id, Job.api_key_id.is_(None))


def first_submitted_at(session: Session, batch_id: str) -> datetime | None:
    """When the batch's first request was sent (the start of its throughput), or None."""
    return session.scalar(select(func.min(Job.submitted_at)).where(Job.batch_id == batch_id))


def count_waiting_since(
    session: Session, state: JobState, *, submitted_before: datetime, api_key_id: str | None = None
) -> int:
    """How many jobs have been in ``state`` since they were submitted before ``submitted_before``
    (e.g. requests still IN_QUEUE at fal long after we sent them), optionally for one API key."""

    def build() -> Any:
        query = (
            select(func.count())
            .select_from(Job)
            .where(
                Job.state == bindparam("state"),
                Job.submitted_at.is_not(None),
                Job.submitted_at <= bindparam("before"),
            )
        )
        if api_key_id is not None:
            query = query.where(_sent_with(bindparam("api_key_id")))
        return query

    query = _prepared(("count_waiting_since", api_key_id is not None), build)
    params = {"state": state, "before": submitted_before, "api_key_id": api_key_id}
    return int(_run(session, query, params).scalar() or 0)


def count_in_states_by_endpoint(
    session: Session, states: Iterable[JobState], *, scope: CapScope, followed: Followed | None = None
) -> dict[str, int]:
    """How many jobs of ``scope``'s requests are in ``states`` per endpoint (per-endpoint
    outstanding caps); ``followed``: :func:`followed_now`, read here when None."""
    now = utcnow()
    if followed is None:
        followed = followed_now(session, scope, now)
    requests = _requests_in(scope, followed=followed)
    query = select(Job.endpoint, func.count()).where(Job.state.in_(list(states)), *requests)
    rows = session.execute(query.group_by(Job.endpoint), _scope_params(scope, now, followed))
    return {str(endpoint): int(n) for endpoint, n in rows}


def batch_endpoints(session: Session, batch_id: str, states: Iterable[JobState]) -> set[str]:
    """The endpoints of the batch's jobs in ``states`` (whose per-endpoint caps may hold them)."""
    query = select(Job.endpoint).where(Job.batch_id == batch_id, Job.state.in_(list(states))).distinct()
    return {str(endpoint) for endpoint in session.scalars(query)}


def batches_endpoints(
    session: Session, batch_ids: Collection[str], states: Iterable[JobState]
) -> dict[str, set[str]]:
    """:func:`batch_endpoints` of each of ``batch_ids``, in one query (batches with none left out)."""
    if not batch_ids:
        return {}
    query = (
        select(Job.batch_id, Job.endpoint)
        .where(Job.batch_id.in_(sorted(batch_ids)), Job.state.in_(list(states)))
        .distinct()
    )
    found: dict[str, set[str]] = {}
    for batch_id, endpoint in session.execute(query):
        found.setdefault(str(batch_id), set()).add(str(endpoint))
    return found


def count_requests(session: Session, states: Iterable[JobState], *, scope: CapScope) -> int:
    """How many of ``scope``'s requests are in ``states``."""
    now = utcnow()
    followed = followed_now(session, scope, now)
    requests = _requests_in(scope, followed=followed)
    query = select(func.count()).select_from(Job).where(Job.state.in_(list(states)), *requests)
    return int(session.execute(query, _scope_params(scope, now, followed)).scalar() or 0)


#: ``WANBATCH_QUEUE_WAIT_BACKOFF`` beyond this (ten years) means "never": no date is that far back.
LONGEST_WAIT_SECONDS = 10 * 365 * 86400.0
#: Once fal is seen queueing our requests, how many to keep waiting there, as a share of those it
#: runs (:attr:`QueueWaits.depth`).
QUEUE_DEPTH_SHARE = 0.25
#: The states in which a request waits to be run at fal (or to be known there): the queue-wait
#: back-off keeps few of them (:class:`QueueWaits`).
WAITING_AT_FAL = (JobState.SUBMITTING, JobState.SUBMIT_UNKNOWN, JobState.QUEUED)


@dataclass(frozen=True, slots=True)
class QueueWaits:
    """The queue-wait back-off's counts (:func:`queue_waits`), of the requests of a scope's own
    fal queue only (:attr:`CapScope.origin`): what dispatch decides by, and ``run``, ``status``
    and the dashboard name when it holds submits back. Requests at another queue say nothing of
    how long one sent to this queue waits, and nothing moves those that no one follows."""

    #: Requests still ``queued`` that were sent before the back-off's threshold.
    waiting_long: int
    #: Requests that fal runs.
    running: int
    #: ``(batch id, name, requests)`` waiting at fal (:data:`WAITING_AT_FAL`), the most first.
    waiting_by_batch: tuple[tuple[str, str, int], ...] = ()

    @property
    def waiting(self) -> int:
        return sum(n for _id, _name, n in self.waiting_by_batch)

    @property
    def depth(self) -> int:
        """How many to keep waiting at fal: a quarter of those it runs, at least one."""
        return max(1, math.ceil(self.running * QUEUE_DEPTH_SHARE))

    def room(self, free: int) -> int:
        """Of ``free`` submits, how many the back-off lets go: all while nothing waited long."""
        if self.waiting_long == 0:
            return free
        return min(free, max(0, self.depth - self.waiting))

    @property
    def holds(self) -> bool:
        """Whether the back-off lets nothing go now."""
        return self.room(1) == 0


def queue_waits(session: Session, scope: CapScope, *, sent_before: datetime) -> QueueWaits:
    """:class:`QueueWaits` of ``scope``'s own fal queue (requests ``queued`` since before
    ``sent_before`` count as waiting long), in one grouped pass over those requests."""
    own = _requests_in(scope, own_queue=True)
    long = (Job.state == JobState.QUEUED) & Job.submitted_at.is_not(None) & (Job.submitted_at <= sent_before)
    query = (
        select(
            Job.batch_id,
            Batch.name,
            func.count().filter(Job.state.in_(WAITING_AT_FAL)),
            func.count().filter(Job.state == JobState.RUNNING),
            func.count().filter(long),
        )
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.state.in_([*WAITING_AT_FAL, JobState.RUNNING]), *own)
        .group_by(Job.batch_id, Batch.name)
    )
    waiting: list[tuple[str, str, int]] = []
    running = waiting_long = 0
    for batch_id, name, n_waiting, n_running, n_long in session.execute(query, _scope_params(scope)):
        running += int(n_running)
        waiting_long += int(n_long)
        if n_waiting:
            waiting.append((str(batch_id), str(name), int(n_waiting)))
    waiting.sort(key=lambda row: (-row[2], row[1], row[0]))
    return QueueWaits(waiting_long, running, tuple(waiting))


def _paid(batch_id: Any) -> ColumnElement[bool]:
    """``batch_id`` (a column) is not a simulation's: a ``--simulate`` run's money is made up (the
    simulator bills nothing), so it never counts toward the daily budget, which is about fal's."""
    simulations = select(Batch.id).where(Batch.simulated.is_(True)).scalar_subquery()
    return cast(ColumnElement[bool], batch_id.not_in(simulations))


def committed_usd_since(session: Session, since: datetime) -> Decimal:
    """USD committed across every batch sent to fal since ``since`` (the daily budget): what
    every job fal holds or may hold now commits (:func:`committed_usd`, as the batch cap counts
    it: its estimate plus what its earlier attempts were, or may have been, billed), plus what
    jobs submitted since then were (or may have been) billed. Simulations are left out
    (:func:`_paid`)."""
    zero = type_coerce(0, Money())
    reserved = session.scalar(
        select(func.coalesce(func.sum(committed_usd()), zero)).where(
            Job.state.in_(list(AT_PROVIDER_STATES)), _paid(Job.batch_id)
        )
    )
    spent = session.scalar(
        select(func.coalesce(func.sum(spent_usd()), zero)).where(
            Job.submitted_at >= since, Job.state.not_in(list(AT_PROVIDER_STATES)), _paid(Job.batch_id)
        )
    )
    return Decimal(reserved or 0) + Decimal(spent or 0)


def committed_usd_today(session: Session, now: datetime) -> Decimal:
    """:func:`committed_usd_since` the UTC midnight before ``now`` (the daily budget), read
    without summing every job ever stored: finished jobs from :class:`BatchTotals` (the rows of
    this day), the unfinished ones fal holds or has billed by index. Dispatch asks it on every
    round while ``WANBATCH_DAILY_BUDGET_USD`` is set. Simulations are left out (:func:`_paid`)."""
    since = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)

    def build() -> Any:
        zero = type_coerce(0, Money())
        after: BindParameter[datetime] = bindparam("since", type_=Job.submitted_at.type)
        finished = (
            select(func.sum(type_coerce(_TOTALS.c.finished_usd, Money())))
            .where(_TOTALS.c.day >= bindparam("day"), _paid(_TOTALS.c.batch_id))
            .scalar_subquery()
        )
        reserved = (
            select(func.sum(committed_usd()))
            .where(Job.state.in_(list(AT_PROVIDER_STATES)), _paid(Job.batch_id))
            .scalar_subquery()
        )
        unfinished = (
            select(func.sum(spent_usd()))
            .where(
                Job.state.in_([JobState.DOWNLOADING, JobState.RETRY_WAIT]),
                Job.submitted_at >= after,
                _paid(Job.batch_id),
            )
            .scalar_subquery()
        )
        parked = (
            select(func.sum(_parked_usd()))
            .where(_PENDING_BILLED, Job.submitted_at >= after, _paid(Job.batch_id))
            .scalar_subquery()
        )
        return select(
            *(func.coalesce(type_coerce(q, Money()), zero) for q in (finished, reserved, unfinished, parked))
        )

    params = {"day": utc_day(since), "since": since}
    row: Any = _run(session, _prepared(("committed_today",), build), params).one()
    return sum((Decimal(v) for v in row), Decimal(0))


@dataclass(frozen=True, slots=True)
class BatchMoney:
    """A batch's money, all exact Decimals in USD.

    * ``estimated_usd``: the sum of every job's estimate (what the whole batch should cost).
    * ``spent_usd``: what fal has billed or will bill for work it finished: what every job's
      attempts were billed (its actual cost); for a job in ``downloading`` that plus the
      estimate of the attempt fal just finished (its bill is written when the download ends);
      for a ``succeeded`` job with no recorded cost, its estimate.
    * ``reserved_usd``: estimates of jobs fal holds or may hold right now (submitting,
      submit_unknown, queued, running, cancelling): money that may still be charged.
    * ``committed_usd`` (= spent + reserved) is what a budget cap is checked against.
    * ``possible_duplicate_charges``: resubmissions after an ambiguous submit (maybe billed twice).
    * ``confirmed_duplicate_charges``: extra requests fal proved it ran (billed): by a signed
      webhook, or by a submit's answer that came after the job had moved on.
    * ``possibly_billed_usd``: the part of ``spent_usd`` that submits of unknown outcome may have
      cost (``Job.ambiguous_usd``): counted against the budget, shown apart.
    """

    estimated_usd: Decimal
    spent_usd: Decimal
    reserved_usd: Decimal
    possible_duplicate_charges: int
    confirmed_duplicate_charges: int = 0
    possibly_billed_usd: Decimal = Decimal(0)

    @property
    def committed_usd(self) -> Decimal:
        return self.spent_usd + self.reserved_usd


def spent_usd() -> ColumnElement[Decimal]:
    """One job's share of ``spent_usd`` (:class:`BatchMoney`), :func:`finished_usd` in SQL:
    summed per batch by :func:`batch_money` and the budget checks (:func:`batch_committed_usd`,
    the daily cap's :func:`committed_usd_today`), per state by ``status``, the dashboard and
    ``/metrics`` (:mod:`jobs.listing`).

    A ``downloading`` job counts what its earlier attempts cost (``actual_usd``) plus its
    estimate: fal finished the current attempt, but its bill is written only when the download
    ends. Counting ``actual_usd`` alone there let a retried job whose failed attempt cost
    nothing count $0 while its paid video was fetched, and a budget cap let one more job in."""
    actual = func.coalesce(Job.actual_usd, type_coerce(0, Money()))
    billed = case(
        (Job.state == JobState.DOWNLOADING, actual + Job.est_usd),
        (Job.state == JobState.SUCCEEDED, func.coalesce(Job.actual_usd, Job.est_usd)),
        else_=actual,
    )
    return type_coerce(billed + Job.ambiguous_usd, Money())


def committed_usd() -> ColumnElement[Decimal]:
    """What one job commits against a budget cap: ``spent_usd() + reserved_usd()`` (its share of
    :attr:`BatchMoney.committed_usd`). The one definition both caps sum — a batch's
    (:func:`batch_committed_usd`) and the day's (:func:`committed_usd_today`,
    :func:`committed_usd_since`) — so that a job counts, whatever its state, at least what its
    earlier attempts were (or may have been) billed plus its current attempt's estimate. A job
    sent again to fal after a billed attempt (a window closed on it running, a 422 whose upload
    was gone) used to count only its estimate in the day's sum, which let one more job past
    ``WANBATCH_DAILY_BUDGET_USD``."""
    return type_coerce(spent_usd() + reserved_usd(), Money())


def _parked_usd() -> ColumnElement[Decimal]:
    """A pending job's billed money: what earlier attempts were billed, or may have been."""
    return type_coerce(func.coalesce(Job.actual_usd, type_coerce(0, Money())) + Job.ambiguous_usd, Money())


def reserved_usd() -> ColumnElement[Decimal]:
    """One job's share of ``reserved_usd`` (:class:`BatchMoney`): its estimate while fal may hold it."""
    zero = type_coerce(0, Money())
    return type_coerce(case((Job.state.in_(list(AT_PROVIDER_STATES)), Job.est_usd), else_=zero), Money())


def batch_money(session: Session, batch_id: str) -> BatchMoney:
    """Estimated, spent and reserved USD for a batch (see :class:`BatchMoney` for definitions)."""

    def build() -> Any:
        zero = type_coerce(0, Money())
        return select(
            func.coalesce(func.sum(type_coerce(Job.est_usd, Money())), zero),
            func.coalesce(func.sum(spent_usd()), zero),
            func.coalesce(func.sum(reserved_usd()), zero),
            func.coalesce(func.sum(Job.possible_duplicate_charges), 0),
            func.coalesce(func.sum(Job.confirmed_duplicate_charges), 0),
            func.coalesce(func.sum(type_coerce(Job.ambiguous_usd, Money())), zero),
        ).where(Job.batch_id == bindparam("batch_id"))

    row: Any = _run(session, _prepared(("batch_money",), build), {"batch_id": batch_id}).one()
    return BatchMoney(
        estimated_usd=row[0],
        spent_usd=row[1],
        reserved_usd=row[2],
        possible_duplicate_charges=int(row[3]),
        confirmed_duplicate_charges=int(row[4]),
        possibly_billed_usd=row[5],
    )


#: ``ix_jobs_pending_billed``'s condition, word for word: SQLite uses a partial index only for
#: a query whose WHERE repeats the index's terms (https://sqlite.org/partialindex.html).
_PENDING_BILLED = text("state = 'pending' AND (actual_usd IS NOT NULL OR ambiguous_usd > 0)")


def batch_committed_usd(session: Session, batch_id: str) -> Decimal:
    """``batch_money(...).committed_usd``, read without summing the batch's finished and
    never-billed jobs: the budget check runs on every dispatch round, and a batch may hold
    100,000 jobs. Finished jobs come from :class:`BatchTotals`; the unfinished ones fal may hold
    or has billed are few and found by index (``ix_jobs_batch_id_state_order``, and
    ``ix_jobs_pending_billed`` for pending jobs an earlier attempt billed). A test keeps it
    equal to :func:`batch_money`'s sum through every kind of move."""

    return _summed_by_totals(session, batch_id, "batch_committed", committed_usd)


def _summed_by_totals(
    session: Session, batch_id: str, key: str, unfinished_usd: Callable[[], ColumnElement[Decimal]]
) -> Decimal:
    """A sum of money over every job of a batch, read without summing its finished jobs: their
    share from :class:`BatchTotals`, ``unfinished_usd`` over the unfinished jobs that are not
    ``pending`` (found by index), and what pending jobs were billed before (a partial index).
    ``key`` names the kept statement."""

    def build() -> Any:
        zero = type_coerce(0, Money())
        batch: BindParameter[str] = bindparam("batch_id")
        unfinished = [s for s in JobState if not s.terminal and s != JobState.PENDING]
        finished = (
            select(func.sum(type_coerce(_TOTALS.c.finished_usd, Money())))
            .where(_TOTALS.c.batch_id == batch)
            .scalar_subquery()
        )
        live = (
            select(func.coalesce(func.sum(unfinished_usd()), zero))
            .where(Job.batch_id == batch, Job.state.in_(unfinished))
            .scalar_subquery()
        )
        parked = (
            select(func.coalesce(func.sum(_parked_usd()), zero))
            .where(Job.batch_id == batch, _PENDING_BILLED)
            .scalar_subquery()
        )
        return select(func.coalesce(type_coerce(finished, Money()), zero), live, parked)

    row: Any = _run(session, _prepared((key,), build), {"batch_id": batch_id}).one()
    return Decimal(row[0]) + Decimal(row[1]) + Decimal(row[2])


def batch_spent_usd(session: Session, batch_id: str) -> Decimal:
    """``batch_money(...).spent_usd``, read like :func:`batch_committed_usd`: the finished jobs'
    money from :class:`BatchTotals`, the few unfinished ones by index. ``run``'s progress line
    shows it every second; summing a 20,000-job batch for it cost 19 ms of CPU each time. The
    tests that keep the committed figure equal to the full sum check this one too."""
    return _summed_by_totals(session, batch_id, "batch_spent", spent_usd)


def batch_estimated_usd(session: Session, batch_id: str) -> Decimal:
    """The sum of the batch's estimates (``batch_money(...).estimated_usd``) alone."""

    def build() -> Any:
        zero = type_coerce(0, Money())
        total = func.coalesce(func.sum(type_coerce(Job.est_usd, Money())), zero)
        return select(total).where(Job.batch_id == bindparam("batch_id"))

    query = _prepared(("batch_estimated",), build)
    return Decimal(_run(session, query, {"batch_id": batch_id}).scalar())


@dataclass(frozen=True, slots=True)
class BatchCost:
    """The short form of the cost report (``jobs.cost``) that ``status`` shows.

    ``actual_usd``: what the provider billed, per the billing rules, over every attempt.
    ``wasted_usd``: billed money that bought no output (failed or cancelled jobs, and earlier
    attempts of jobs that succeeded). ``cancelled_for_budget``: jobs a budget cap stopped.
    """

    actual_usd: Decimal
    wasted_usd: Decimal
    cancelled_for_budget: int


def wasted_usd() -> ColumnElement[Decimal]:
    """One job's share of ``wasted_usd`` (:class:`BatchCost`): summed per batch by
    :func:`batch_cost`, over every job by ``/metrics`` (:mod:`jobs.metrics`)."""
    zero = type_coerce(0, Money())
    actual = func.coalesce(Job.actual_usd, zero)
    wasted = case(
        (Job.state.in_([JobState.FAILED, JobState.CANCELLED]), actual),
        (
            (Job.state == JobState.SUCCEEDED) & (actual > Job.est_usd),
            type_coerce(actual - Job.est_usd, Money()),
        ),
        else_=zero,
    )
    return type_coerce(wasted, Money())


def batch_cost(session: Session, batch_id: str) -> BatchCost:
    """Actual and wasted USD and budget cancellations of a batch, in one query."""
    zero = type_coerce(0, Money())
    actual = func.coalesce(Job.actual_usd, zero)
    budget = case(((Job.state == JobState.CANCELLED) & Job.error_type.in_(BUDGET_ERRORS), 1), else_=0)
    row = session.execute(
        select(
            func.coalesce(func.sum(type_coerce(actual, Money())), zero),
            func.coalesce(func.sum(wasted_usd()), zero),
            func.coalesce(func.sum(budget), 0),
        ).where(Job.batch_id == batch_id)
    ).one()
    return BatchCost(actual_usd=row[0], wasted_usd=row[1], cancelled_for_budget=int(row[2]))


def count_media_mismatches(session: Session, batch_id: str) -> int:
    """Jobs of the batch whose video did not match the request (``media_mismatch`` set): shown
    by ``status`` and ``cost`` so a flagged clip is seen before it is used."""
    count = session.execute(
        select(func.count()).where(Job.batch_id == batch_id, Job.media_mismatch.is_not(None))
    ).scalar_one()
    return int(count)


@dataclass(frozen=True, slots=True)
class JobMoney:
    """One job's money, as the cost report (``jobs.cost``) adds it up."""

    endpoint: str
    input: dict[str, Any]
    state: JobState
    error_type: str | None
    est_usd: Decimal
    est_units: Decimal
    actual_usd: Decimal | None
    actual_units: Decimal | None
    possible_duplicate_charges: int
    #: What its submits of unknown outcome may have cost (``Job.ambiguous_usd``).
    ambiguous_usd: Decimal = Decimal(0)
    #: Extra requests fal proved it ran (billed in ``actual_usd`` when a success).
    confirmed_duplicate_charges: int = 0
    #: When its last request was sent; None when none ever was (:func:`unsent_kind`).
    submitted_at: datetime | None = None


def job_money(session: Session, batch_id: str) -> Iterator[JobMoney]:
    """The money of every job of a batch, streamed (only the columns the cost report needs) in
    pages bounded in bytes (the input, read for its resolution, may hold an inline image)."""
    columns = (
        Job.endpoint,
        Job.input,
        Job.state,
        Job.error_type,
        Job.est_usd,
        Job.est_billing_units,
        Job.actual_usd,
        Job.actual_billing_units,
        Job.possible_duplicate_charges,
        Job.ambiguous_usd,
        Job.confirmed_duplicate_charges,
        Job.submitted_at,
    )
    for row in _rows_bounded(session, columns, [Job.batch_id == batch_id], [Job.input]):
        yield JobMoney(
            endpoint=row.endpoint,
            input=row.input or {},
            state=JobState(row.state),
            error_type=row.error_type,
            est_usd=row.est_usd,
            est_units=row.est_billing_units,
            actual_usd=row.actual_usd,
            actual_units=row.actual_billing_units,
            possible_duplicate_charges=int(row.possible_duplicate_charges or 0),
            ambiguous_usd=row.ambiguous_usd or Decimal(0),
            confirmed_duplicate_charges=int(row.confirmed_duplicate_charges or 0),
            submitted_at=row.submitted_at,
        )


# --------------------------------------------------------------------------- uploads


#: How long an upload is reused: fal documents its storage's files as kept "for at least 7
#: days by default" (https://docs.fal.ai/faq), configurable per upload, and its newer retention
#: page promises no fixed period. A day stays well inside that, and an upload costs nothing.
UPLOAD_REUSE = timedelta(hours=24)


def record_upload(
    session: Session,
    *,
    origin: str,
    content_sha256: str,
    provider_url: str,
    size_bytes: int,
    content_type: str,
    expires_at: datetime | None = None,
    now: datetime | None = None,
) -> None:
    """Remember that content with this hash now lives at ``provider_url`` in the storage of the
    fal at ``origin`` (replaces an older upload there), until ``expires_at`` (default: ``now`` +
    :data:`UPLOAD_REUSE`). Uploads already expired are forgotten."""
    now = now or utcnow()
    session.execute(delete(Upload).where(Upload.expires_at <= now))
    dialect = session.get_bind().dialect.name
    values = {
        "origin": origin,
        "content_sha256": content_sha256,
        "provider_url": provider_url,
        "size_bytes": size_bytes,
        "content_type": content_type,
        "created_at": now,
        "expires_at": expires_at if expires_at is not None else now + UPLOAD_REUSE,
    }
    stmt = _dialect_insert(dialect, Upload).values(values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["origin", "content_sha256"],
        set_={key: stmt.excluded[key] for key in values if key not in ("origin", "content_sha256")},
    )
    session.execute(stmt)


def find_upload(
    session: Session, origin: str, content_sha256: str, *, now: datetime | None = None
) -> Upload | None:
    """The still-valid upload of this content to the fal at ``origin``, or ``None`` (never
    uploaded there, or expired by ``now``; a row without an expiry is not trusted)."""
    now = now or utcnow()
    return session.scalar(
        select(Upload)
        .where(Upload.origin == origin, Upload.content_sha256 == content_sha256)
        .where(Upload.expires_at > now)
        .execution_options(populate_existing=True)
    )


def forget_uploads(session: Session, provider_urls: Collection[str]) -> int:
    """Forget the uploads stored at any of ``provider_urls`` (fal could no longer download
    them): the next job that needs the file uploads it again. Returns how many were forgotten."""
    if not provider_urls:
        return 0
    result = session.execute(delete(Upload).where(Upload.provider_url.in_(list(provider_urls))))
    return int(getattr(result, "rowcount", 0) or 0)


# --------------------------------------------------------------------------- heartbeats


#: Heartbeats of processes that died without clearing them are forgotten after this long.
HEARTBEAT_KEPT = timedelta(days=7)


def record_heartbeat(
    session: Session,
    owner: str,
    scopes: Collection[str],
    now: datetime,
    *,
    supersede_before: datetime | None = None,
    broker_down_since: datetime | None = None,
) -> None:
    """``owner`` works on ``scopes`` (batch ids, or :data:`~jobs.models.EVERY_BATCH`) as of ``now``;
    rows of processes silent for :data:`HEARTBEAT_KEPT` go (each crash leaves its rows behind).
    ``broker_down_since``: since when ``owner`` could not reach the broker (None: it can; see
    :func:`mark_broker_down`).

    ``supersede_before`` (with :data:`~jobs.models.EVERY_BATCH` among ``scopes``): the every-batch
    rows of other owners last seen before it go too. Those workers stopped (a live one beats far
    more often), and this one works on every batch since: left behind, a crashed worker's row
    outlived this one's clean stop and made ``status`` say "last seen 32m ago" of batches this one
    had just processed. A live peer that was passed over (SQLite, where every worker leads)
    writes its row again at its next beat."""
    session.execute(delete(ConductorHeartbeat).where(ConductorHeartbeat.seen_at < now - HEARTBEAT_KEPT))
    if supersede_before is not None and EVERY_BATCH in scopes:
        session.execute(
            delete(ConductorHeartbeat).where(
                ConductorHeartbeat.scope == EVERY_BATCH,
                ConductorHeartbeat.owner != owner,
                ConductorHeartbeat.seen_at < supersede_before,
            )
        )
    dialect = session.get_bind().dialect.name
    for scope in sorted(scopes):  # in key order: two processes beating never deadlock
        stmt = _dialect_insert(dialect, ConductorHeartbeat).values(
            owner=owner, scope=scope, seen_at=now, broker_down_since=broker_down_since
        )
        beat = stmt.on_conflict_do_update(
            index_elements=["owner", "scope"],
            set_={"seen_at": stmt.excluded.seen_at, "broker_down_since": stmt.excluded.broker_down_since},
        )
        session.execute(beat)


def mark_broker_down(session: Session, owner: str, since: datetime | None) -> None:
    """``owner`` (the workers' leader) could not reach the broker since ``since``, or (None) it
    reaches it again: said on its heartbeat rows at once, not at its next beat, so ``status``
    names the broker instead of what the outage holds back (:func:`workers_broker_down_since`).
    A process that never beat has no row: its first beat carries it."""
    session.execute(
        update(ConductorHeartbeat).where(ConductorHeartbeat.owner == owner).values(broker_down_since=since)
    )


def workers_broker_down_since(session: Session, *, live_since: datetime) -> datetime | None:
    """Since when the distributed workers' leader could not reach the broker, as its every-batch
    heartbeat says (rows last seen before ``live_since`` are a stopped worker's: they say
    nothing); None: it reaches it, or no worker beats."""
    return session.scalar(
        select(func.min(ConductorHeartbeat.broker_down_since)).where(
            ConductorHeartbeat.scope == EVERY_BATCH,
            ConductorHeartbeat.seen_at >= live_since,
        )
    )


# --------------------------------------------------------------------------- fal holds


@dataclass(frozen=True, slots=True)
class FalHoldRow:
    """One process's hold on its submits while fal cannot be reached (:class:`~jobs.models.FalHold`)."""

    owner: str
    scope: str
    since: datetime
    next_probe_at: datetime
    pause_seconds: float
    error: str
    seen_at: datetime


def hold_fal(
    session: Session,
    owner: str,
    scopes: Collection[str],
    *,
    since: datetime,
    next_probe_at: datetime,
    pause_seconds: float,
    error: str,
    now: datetime,
) -> None:
    """``owner`` (a process, ``host:pid:``) holds its submits of ``scopes`` (batch ids, or
    :data:`~jobs.models.EVERY_BATCH`) because fal cannot be reached from it since ``since``:
    recorded, or renewed (``now`` as its ``seen_at``). Rows left for
    :data:`HEARTBEAT_KEPT` (a process that died holding) go."""
    session.execute(delete(FalHold).where(FalHold.seen_at < now - HEARTBEAT_KEPT))
    dialect = session.get_bind().dialect.name
    values = {
        "since": since,
        "next_probe_at": next_probe_at,
        "pause_seconds": float(pause_seconds),
        "error": error[:255],
        "seen_at": now,
    }
    for scope in sorted(scopes):  # in key order, as heartbeats: two writers never deadlock
        stmt = _dialect_insert(dialect, FalHold).values(owner=owner, scope=scope, **values)
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["owner", "scope"], set_={k: getattr(stmt.excluded, k) for k in values}
            )
        )


def release_fal_hold(session: Session, owner: str, scopes: Collection[str]) -> None:
    """fal answers ``owner`` again (or the process stops): its hold on ``scopes`` is over."""
    session.execute(delete(FalHold).where(FalHold.owner == owner, FalHold.scope.in_(list(scopes))))


def fal_holds(session: Session, scopes: Collection[str], *, live_since: datetime) -> list[FalHoldRow]:
    """The holds on the submits of ``scopes`` renewed at ``live_since`` or later (older rows are
    a process's that died holding: they say nothing), the longest-standing first."""
    rows = session.execute(
        select(
            FalHold.owner,
            FalHold.scope,
            FalHold.since,
            FalHold.next_probe_at,
            FalHold.pause_seconds,
            FalHold.error,
            FalHold.seen_at,
        )
        .where(FalHold.scope.in_(list(scopes)), FalHold.seen_at >= live_since)
        .order_by(FalHold.since, FalHold.owner, FalHold.scope)
    )
    return [FalHoldRow(*row) for row in rows]


def instance_secret(session: Session, name: str, make: Callable[[], str]) -> str:
    """The database's secret ``name`` (:class:`~jobs.models.InstanceSecret`), made by ``make`` and
    stored the first time it is asked for. Two processes asking at once agree: the insert of
    the second one does nothing, and both read the row that won."""
    dialect = session.get_bind().dialect.name
    stmt = _dialect_insert(dialect, InstanceSecret).values(name=name, value=make(), created_at=utcnow())
    session.execute(stmt.on_conflict_do_nothing(index_elements=["name"]))
    return str(session.execute(select(InstanceSecret.value).where(InstanceSecret.name == name)).scalar_one())


def instance_secret_if_made(session: Session, name: str) -> str | None:
    """The database's secret ``name`` if some process made it (None: not yet), read only: what
    ``wanbatch doctor``, which changes nothing, may ask."""
    return session.execute(
        select(InstanceSecret.value).where(InstanceSecret.name == name)
    ).scalar_one_or_none()


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


def drop_heartbeats(session: Session, owner: str) -> None:
    """``owner`` stopped working on anything (a clean exit)."""
    session.execute(delete(ConductorHeartbeat).where(ConductorHeartbeat.owner == owner))


def pacing_peers(session: Session, own: str, *, since: datetime) -> list[str]:
    """The other processes (``host:pid:``) that work on this database now: a heartbeat of
    theirs at ``since`` or later, as ``status`` and ``doctor`` tell live processes
    (:func:`jobs.db.live_processes`). ``own``: this process's prefix, left out; a process of
    this host that has ended is left out too. One short query, asked at a heartbeat, not per
    submit: whether the submit pacing is to be shared through the database
    (:func:`share_pacing`)."""
    from jobs.processes import owner_gone, owner_prefix

    rows = session.scalars(
        select(ConductorHeartbeat.owner).where(ConductorHeartbeat.seen_at >= since).distinct()
    )
    found: set[str] = set()
    for owner in rows:
        prefix = owner_prefix(str(owner))
        if prefix is None or prefix == own or owner_gone(str(owner)):
            continue
        found.add(prefix)
    return sorted(found)


def heartbeat_owners(session: Session, batch_id: str, *, since: datetime | None) -> list[str]:
    """The processes (``host:pid:``…) that said at ``since`` or later (None: ever) that they work
    on ``batch_id`` itself (an embedded run of it; the workers' every-batch beat is not one)."""
    query = select(ConductorHeartbeat.owner).where(ConductorHeartbeat.scope == batch_id)
    if since is not None:
        query = query.where(ConductorHeartbeat.seen_at >= since)
    return [str(owner) for owner in session.scalars(query.order_by(ConductorHeartbeat.owner))]


def live_simulators(session: Session, batch_id: str) -> dict[str, int]:
    """The simulators of the other live processes of this host that simulate ``batch_id``: their
    origin (``jobs.fal_origin`` of the requests each accepted) → the pid that runs it, from the
    claims those processes hold (:func:`jobs.processes.simulation_owner`), whatever their age; a
    claim whose process ended (or whose pid another process took since) holds nothing."""
    from jobs.processes import claim_holder, simulation_claim

    found: dict[str, int] = {}
    for owner in heartbeat_owners(session, batch_id, since=None):
        claim = simulation_claim(owner)
        if claim is not None and (pid := claim_holder(owner)) is not None:
            found[claim[1]] = pid
    return found


def last_heartbeat(session: Session, batch_id: str, *, live_since: datetime | None = None) -> datetime | None:
    """When a process last said it works on ``batch_id`` (its own or every batch, a simulation
    its own only); None: never. ``live_since``: see :func:`last_heartbeats`."""
    return last_heartbeats(session, [batch_id], live_since=live_since).get(batch_id)


def last_heartbeats(
    session: Session, batch_ids: Collection[str], *, live_since: datetime | None = None
) -> dict[str, datetime]:
    """:func:`last_heartbeat` of each of ``batch_ids`` (those never beaten for are left out), in
    one query (and one more for the batches, when the workers ever beat).

    The workers' every-batch beat counts for a batch from its creation on. One from before the
    batch existed said nothing of it: it counts, as the batch's creation, only when it is no
    older than ``live_since`` (the workers are alive, and take the new batch on at their next
    tick); otherwise it is a worker's that stopped before the batch existed, and a "last seen"
    earlier than the batch's creation is no answer (None: such beats never count)."""
    beats: dict[str, datetime] = {}
    rows = session.execute(
        select(ConductorHeartbeat.scope, func.max(ConductorHeartbeat.seen_at))
        .where(ConductorHeartbeat.scope.in_([*batch_ids, EVERY_BATCH]))
        .group_by(ConductorHeartbeat.scope)
    )
    for scope, seen in rows:
        beats[scope] = seen
    every = beats.pop(EVERY_BATCH, None)
    if every is None:
        return beats
    # The workers' beat covers every batch they may send: a simulation is not one of them.
    created = session.execute(
        select(Batch.id, Batch.created_at).where(Batch.id.in_(list(batch_ids)), Batch.simulated.isnot(True))
    )
    for batch_id, created_at in created:
        if every >= created_at:
            covered = every
        elif live_since is not None and every >= live_since:
            covered = created_at
        else:
            continue
        beats[batch_id] = max(beats.get(batch_id, covered), covered)
    return beats


def workers_last_beat(session: Session) -> datetime | None:
    """When the distributed workers' tick leader last said, in this database, that it works
    (on every batch); None: no worker ever did, or not within :data:`HEARTBEAT_KEPT`. Workers
    that answer the broker but never beat here process another database."""
    return session.scalar(
        select(func.max(ConductorHeartbeat.seen_at)).where(ConductorHeartbeat.scope == EVERY_BATCH)
    )


# --------------------------------------------------------------------------- webhook inbox


def store_delivery(
    session: Session,
    *,
    request_id: str,
    body_sha256: str,
    job_id: str | None,
    attempt: int | None,
    status: str,
    body: dict[str, Any],
) -> tuple[int, bool]:
    """Keep one verified delivery: ``(its id, True)``, or ``(the stored one's id, False)`` for a
    repeat of the very same body (counted in ``repeats``), whoever stored it first.

    ``body`` is kept as both databases can hold it (:func:`jobs.storable.storable_json`): a
    ``\\u0000`` or a lone surrogate in fal's JSON is refused by ``jsonb`` on every try, and the
    delivery (maybe the only proof that a lost submit was accepted) would never be stored.
    ``body_sha256`` stays the digest of the bytes received, which is what makes a repeat one.
    """
    dialect = session.get_bind().dialect.name
    stmt = (
        _dialect_insert(dialect, WebhookDelivery)
        .values(
            request_id=request_id,
            body_sha256=body_sha256,
            job_id=job_id,
            attempt=attempt,
            status=status,
            body=storable_json(body),
            received_at=utcnow(),
            repeats=0,
        )
        .on_conflict_do_nothing(index_elements=["request_id", "body_sha256"])
        .returning(WebhookDelivery.id)
    )
    new = session.execute(stmt).first()
    if new is not None:
        _count_inbox(session, stored=1)
        return int(new.id), True
    row = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.request_id == request_id, WebhookDelivery.body_sha256 == body_sha256)
        .values(repeats=WebhookDelivery.repeats + 1)
        .returning(WebhookDelivery.id)
        .execution_options(synchronize_session=False)
    ).one()
    _count_inbox(session, repeats=1)
    return int(row.id), False


def _count_inbox(session: Session, **added: int) -> None:
    """Add to the inbox's counters (:class:`~jobs.models.WebhookInboxTotals`), its row made the
    first time (a database made from the models starts without it)."""
    dialect = session.get_bind().dialect.name
    table = WebhookInboxTotals.__table__
    values = {"stored": 0, "repeats": 0, "ignored": 0, **added}
    stmt = _dialect_insert(dialect, WebhookInboxTotals).values(id=1, **values)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["id"], set_={name: table.c[name] + stmt.excluded[name] for name in added}
        )
    )


def take_delivery(session: Session, delivery_id: int) -> WebhookDelivery | None:
    """Mark a delivery processed now, if nobody has: the delivery to apply, or None (already
    applied, or being applied by another process, whose row lock this waits for)."""
    row = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.processed_at.is_(None))
        .values(processed_at=utcnow())
        .returning(WebhookDelivery.id)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    return session.get(WebhookDelivery, delivery_id, populate_existing=True)


def settle_delivery(session: Session, delivery_id: int, outcome: str) -> None:
    """Record what applying a taken delivery did (each delivery is settled once: it was taken
    by a compare-and-set, :func:`take_delivery`)."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .values(outcome=outcome[:255])
        .execution_options(synchronize_session=False)
    )
    if outcome.startswith("ignored"):
        _count_inbox(session, ignored=1)


def prune_deliveries(session: Session, *, before: datetime, limit: int = 1000) -> int:
    """Delete up to ``limit`` deliveries applied before ``before`` (``WANBATCH_WEBHOOK_RETENTION``
    ago), oldest first, on ``ix_webhook_deliveries_processed_at``; how many.

    A delivery not applied yet is kept, whatever its age, and so is one of a job that has not
    finished (:func:`stored_proof` may still read it when the job's unknown submit is settled).
    Nothing else reads an applied delivery: a repeat of a pruned one is stored again and applied
    again, and applying is idempotent (the job's history says which requests it knows:
    :func:`request_known`), so the retention only decides how long a repeat is counted as one
    rather than stored anew. The inbox's counters are not lowered
    (:class:`~jobs.models.WebhookInboxTotals`)."""
    live = select(Job.id).where(Job.id == WebhookDelivery.job_id, Job.state.in_(UNFINISHED_STATES))
    ids = [
        int(row[0])
        for row in session.execute(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.processed_at.is_not(None),
                WebhookDelivery.processed_at < before,
                ~live.exists(),
            )
            .order_by(WebhookDelivery.processed_at)
            .limit(limit)
        )
    ]
    if ids:
        session.execute(
            delete(WebhookDelivery)
            .where(WebhookDelivery.id.in_(ids))
            .execution_options(synchronize_session=False)
        )
    return len(ids)


def defer_delivery(session: Session, delivery_id: int, why: str) -> None:
    """Give a taken delivery back, unapplied: the tick tries it again."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .values(processed_at=None, outcome=why[:255])
        .execution_options(synchronize_session=False)
    )


def unprocessed_deliveries(session: Session, *, limit: int = 200) -> list[int]:
    """Ids of deliveries not applied yet, oldest first."""
    query = _prepared(
        ("unprocessed-deliveries", limit),
        lambda: (
            select(WebhookDelivery.id)
            .where(WebhookDelivery.processed_at.is_(None))
            .order_by(WebhookDelivery.id)
            .limit(limit)
        ),
    )
    return [int(row[0]) for row in _run(session, query)]


def request_known(session: Session, job_id: str, request_id: str) -> bool:
    """Whether ``request_id`` is (or was) one of the job's requests as we recorded them: its
    current one, or one an event says fal accepted (``accepted as …``)."""
    if session.scalar(select(Job.id).where(Job.id == job_id, Job.request_id == request_id)) is not None:
        return True
    accepted = JobEvent.reason.contains(f"accepted as {request_id}", autoescape=True)
    return session.scalar(select(JobEvent.id).where(JobEvent.job_id == job_id, accepted).limit(1)) is not None


def duplicate_charge_recorded(session: Session, request_id: str) -> bool:
    """Whether a delivery of ``request_id`` was already counted as a confirmed duplicate charge."""
    found = select(WebhookDelivery.id).where(
        WebhookDelivery.request_id == request_id, WebhookDelivery.outcome == "duplicate-charge"
    )
    return session.scalar(found.limit(1)) is not None


def record_duplicate_charge(session: Session, job_id: str) -> None:
    """One more request of this job that fal proved it ran besides the one the job kept: billed.
    Bookkeeping only (no state change, no version bump), so it never disturbs a worker's fence."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(confirmed_duplicate_charges=Job.confirmed_duplicate_charges + 1, updated_at=utcnow())
        .execution_options(synchronize_session="fetch")
    )


#: What :func:`note_duplicate_charge` did: ``counted``; ``known`` (the request is on the job's
#: history already: a repeated proof, counted once); ``held`` (a worker holds the job: try later);
#: ``missing`` (no such job).
DuplicateNote = Literal["counted", "known", "held", "missing"]


def note_duplicate_charge(
    session: Session,
    job_id: str,
    request_id: str,
    *,
    reason: str,
    worker: str | None,
    outcome: billing.Outcome | None,
    now: datetime,
) -> DuplicateNote:
    """A request of the job that fal proved it ran besides the one the job keeps (its signed
    webhook, or a submit's answer that came after the job had moved on and that fal bills all
    the same), in the job's books: on its history (an event that moves nothing, ``reason``
    saying "accepted as <request_id>", so :func:`request_known` finds it and a repeated proof
    is counted once), one more ``confirmed_duplicate_charges``, and, when ``outcome`` says how
    it ended (None: fal's webhook does not tell what it billed), its bill in the job's actual
    cost: the job's estimate times the outcome's rule (:func:`jobs.billing.billed`), the price
    each attempt of the job is billed at, for a request of the same input.

    Such a request comes from a submit whose answer was lost: what it may have cost is in
    ``ambiguous_usd`` (the "possibly billed" part of the money spent), which the proof resolves.
    Its estimate leaves ``ambiguous_usd`` as far as it is there; the money stays spent, billed
    now. A finished job's share of its batch's running totals moves by the difference.

    ``held`` while a worker holds the job's lease: it bills the job from what it read when it
    took the lease (a download writes the actual cost when it ends), which would overwrite this.
    The row is locked first, so a lease taken meanwhile reads this after it commits.
    """
    return _note_billed(
        session, job_id, request_id, reason=reason, worker=worker, outcome=outcome, now=now, duplicate=True
    )


def note_own_request(
    session: Session,
    job_id: str,
    request_id: str,
    *,
    reason: str,
    worker: str | None,
    outcome: billing.Outcome,
    now: datetime,
) -> DuplicateNote:
    """The job's one request ``request_id``, whose submit's answer came only after the job
    ended without it (cancelled or failed while its outcome was unknown, no other request sent:
    :func:`unknown_cancel_adoptable`, :func:`adopt_late_proof`), which fal then billed though
    the job keeps no video of it (``outcome``: a cancel of it while running): in the job's books
    as :func:`note_duplicate_charge` puts one (on its history, billed at the estimate times the
    outcome's rule in its actual cost, its estimate out of "possibly billed"), but not counted as
    a duplicate charge — it is the only request the job had fal run. ``counted`` when done; the
    other outcomes as there."""
    return _note_billed(
        session, job_id, request_id, reason=reason, worker=worker, outcome=outcome, now=now, duplicate=False
    )


def _note_billed(
    session: Session,
    job_id: str,
    request_id: str,
    *,
    reason: str,
    worker: str | None,
    outcome: billing.Outcome | None,
    now: datetime,
    duplicate: bool,
) -> DuplicateNote:
    """:func:`note_duplicate_charge` (``duplicate``) or :func:`note_own_request`."""
    found = _run(session, select(_JOBS).where(_JOBS.c.id == job_id).with_for_update()).first()
    if found is None:
        return "missing"
    if found.lease_owner is not None and found.lease_expires_at is not None and found.lease_expires_at > now:
        return "held"
    if request_known(session, job_id, request_id):
        return "known"
    state = JobState(found.state)
    written: dict[str, Any] = (
        {"confirmed_duplicate_charges": found.confirmed_duplicate_charges + 1} if duplicate else {}
    )
    if outcome is not None:
        own = state == JobState.SUCCEEDED  # billed its estimate when no cost was recorded (finished_usd)
        prior_usd = found.actual_usd if found.actual_usd is not None else (found.est_usd if own else None)
        units = found.actual_billing_units
        prior_units = units if units is not None else (found.est_billing_units if own else None)
        bill = billing.billed(
            outcome, found.est_billing_units, found.est_usd, prior_units=prior_units, prior_usd=prior_usd
        )
        written.update(bill, ambiguous_usd=found.ambiguous_usd - min(found.ambiguous_usd, found.est_usd))
        if state.terminal:
            before = finished_usd(state, found.actual_usd, found.est_usd, found.ambiguous_usd)
            after = finished_usd(state, written["actual_usd"], found.est_usd, written["ambiguous_usd"])
            _add_finished(session, found.batch_id, found.submitted_at, after - before)
    _run(session, update(_JOBS).where(_JOBS.c.id == job_id).values(**written, updated_at=now))
    _refresh_loaded(session, job_id, written)
    event = {"job_id": job_id, "at": now, "from_state": state, "to_state": state, "version": found.version}
    event.update(reason=reason, details=None, worker=worker)
    _run(session, _INSERT_EVENT, event)
    return "counted"


def note_request(
    session: Session,
    job_id: str,
    request_id: str,
    *,
    reason: str,
    worker: str | None,
    billed: bool,
    unbilled: bool = False,
) -> bool:
    """Put ``request_id``, a request of the job that the job does not keep, on its history (a
    submit's late answer, after the job moved on), and count it as a confirmed duplicate charge
    when fal bills it (``billed``: its bill is not written; one that can be billed goes through
    :func:`note_duplicate_charge`). False when there is no such job, or the request is on its
    history already (``reason`` must say "accepted as <request_id>": :func:`request_known`).

    The note is an event that moves nothing: ``from_state`` and ``to_state`` are the job's state,
    ``version`` its version. Bookkeeping only (no state change, no version bump), so it never
    disturbs a worker's fence, and it may follow a terminal state, which nothing leaves. The
    row is locked first (an UPDATE), so two notes of one request are one, the state noted is the
    one after any move under way, and the note comes after that move's event.

    ``unbilled``: fal's answer says it bills nothing for the request (cancelled while it waited
    in its queue, or no longer known), so what its submit, whose answer was lost, may have cost
    is resolved: its estimate leaves ``ambiguous_usd`` ("possibly billed") as far as it is there
    (a simulation put nothing there), and a finished job's share of its batch's running totals
    moves by as much. Only ``ambiguous_usd`` is written, which no worker bills from what it read.
    """
    locked = update(_JOBS).where(_JOBS.c.id == job_id).values(updated_at=utcnow())
    returned = (_JOBS.c.state, _JOBS.c.version, _JOBS.c.ambiguous_usd, _JOBS.c.est_usd)
    row = _run(session, locked.returning(*returned, _JOBS.c.batch_id, _JOBS.c.submitted_at)).first()
    if row is None or request_known(session, job_id, request_id):
        return False
    if billed:
        record_duplicate_charge(session, job_id)
    elif unbilled and row.ambiguous_usd > 0:
        resolved = min(row.ambiguous_usd, row.est_usd)
        written = {"ambiguous_usd": row.ambiguous_usd - resolved}
        _run(session, update(_JOBS).where(_JOBS.c.id == job_id).values(**written))
        _refresh_loaded(session, job_id, written)
        if JobState(row.state).terminal:
            _add_finished(session, row.batch_id, row.submitted_at, -resolved)
    event = {"job_id": job_id, "at": utcnow(), "from_state": row.state, "to_state": row.state}
    event.update(version=row.version, reason=reason, details=None, worker=worker)
    _run(session, _INSERT_EVENT, event)
    return True


def delivery_counts(session: Session) -> dict[str, int]:
    """The inbox in numbers: deliveries ever stored, repeats of them, ignored (the counters kept
    as they happen, :class:`~jobs.models.WebhookInboxTotals`: one row), and still to apply (a
    range of ``ix_webhook_deliveries_processed_at``). Never a pass over every delivery: a
    scrape read the whole inbox, which only grew."""
    totals = session.execute(
        select(WebhookInboxTotals.stored, WebhookInboxTotals.repeats, WebhookInboxTotals.ignored).where(
            WebhookInboxTotals.id == 1
        )
    ).first()
    unprocessed = session.scalar(
        select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.processed_at.is_(None))
    )
    stored, repeats, ignored = totals if totals is not None else (0, 0, 0)
    return {
        "stored": int(stored),
        "repeats": int(repeats),
        "unprocessed": int(unprocessed or 0),
        "ignored": int(ignored),
    }


# --------------------------------------------------------------------------- metrics (all batches)


#: A job's ``state`` is terminal, in SQL: the literal list of :data:`FINISHED_EVENTS` as well.
_TERMINAL_VALUES = tuple(sorted(s.value for s in JobState if s.terminal))


@dataclass(frozen=True, slots=True)
class MetricsScope:
    """Which jobs a ``/metrics`` aggregate (:func:`job_totals`, :func:`duration_buckets`) reads,
    by when they finished (``finished_at``), so that a scrape need not read every job ever stored
    (:class:`jobs.metrics.FinishedTotals` keeps the sums of the jobs finished long enough ago):

    * ``sealed``: the jobs in a terminal state that finished before ``until`` (or hold no
      ``finished_at``: rows stored before it was kept) — one full pass, when the sums are built;
    * ``finished``: the jobs in a terminal state that finished at ``since`` or later (and before
      ``until`` when given) — a range of ``ix_jobs_finished_at``;
    * ``unfinished``: the jobs in any other state — ``ix_jobs_state_order``.

    ``sealed`` until ``T``, ``finished`` since ``T`` and ``unfinished`` are every job, each once.
    """

    kind: Literal["sealed", "finished", "unfinished"]
    since: datetime | None = None
    until: datetime | None = None


def _metrics_terms(scope: MetricsScope | None) -> list[ColumnElement[bool]]:
    """The WHERE terms of ``scope`` (None: none), with the bound parameters ``m_since`` and
    ``m_until``: plain terms on the jobs table that an index answers."""
    if scope is None:
        return []
    terminal = Job.state.in_([JobState(v) for v in _TERMINAL_VALUES])
    since = bindparam("m_since", type_=_JOBS.c.finished_at.type)
    until = bindparam("m_until", type_=_JOBS.c.finished_at.type)
    if scope.kind == "sealed":
        return [terminal, or_(Job.finished_at < until, Job.finished_at.is_(None))]
    if scope.kind == "finished":
        return [terminal, Job.finished_at >= since, *([Job.finished_at < until] if scope.until else [])]
    if scope.kind == "unfinished":
        return [Job.state.in_([s for s in JobState if not s.terminal])]
    raise ValueError(f"unknown metrics scope {scope.kind!r}")


def _metrics_key(scope: MetricsScope | None) -> tuple[Any, ...]:
    """What tells apart the statements of ``scope`` (:func:`_prepared`)."""
    return ("all",) if scope is None else (scope.kind, scope.until is not None)


def _metrics_params(scope: MetricsScope | None) -> dict[str, Any]:
    if scope is None:
        return {}
    return {"m_since": scope.since, "m_until": scope.until}


#: The events of jobs that were in a terminal state (``from_state``): a job leaving one
#: (:func:`adopt_late_proof`, :func:`adopt_own_proof`, :func:`adopt_cancelled_proof`) or a note
#: on a finished job's books (:func:`note_duplicate_charge`, :func:`note_request`). Every change
#: of a finished job writes one; the partial index ``ix_job_events_from_finished`` holds them.
FINISHED_EVENTS = "from_state IN (" + ", ".join(f"'{v}'" for v in _TERMINAL_VALUES) + ")"


def count_finished_changes(session: Session) -> int:
    """How many times a finished job changed (:data:`FINISHED_EVENTS`): it grows with every
    change of a finished job, whichever process made it and whenever it commits. Written as the
    partial index's own literal condition, so that SQLite uses the index too."""
    query = select(func.count()).select_from(JobEvent).where(text(FINISHED_EVENTS))
    return int(session.scalar(query) or 0)


@dataclass(frozen=True, slots=True)
class JobTotals:
    """Sums over the jobs of one ``(state, endpoint, error_type)``, every batch: what ``/metrics``
    publishes (:mod:`jobs.metrics`). Money as :class:`BatchMoney` and :class:`BatchCost` define it,
    over the batches sent to fal only: a simulation's money is made up."""

    state: JobState
    endpoint: str
    error_type: str | None
    jobs: int
    attempts: int
    retries: int
    possible_duplicate_charges: int
    confirmed_duplicate_charges: int
    estimated_usd: Decimal
    spent_usd: Decimal
    reserved_usd: Decimal
    wasted_usd: Decimal


def job_totals(session: Session, scope: MetricsScope | None = None) -> list[JobTotals]:
    """Every job's numbers, summed per ``(state, endpoint, error_type)`` in one pass over the table
    (or over the jobs of ``scope`` only: :class:`MetricsScope`).

    ``attempts``: submissions counted on the jobs (a request fal ended unstarted at a window's
    end and that was sent again counts once: ``Job.counted_attempts``); ``retries``: attempts
    beyond each job's first.
    """
    zero = type_coerce(0, Money())

    def build() -> Any:
        paid = Batch.simulated.is_(False)
        counted = Job.attempts - Job.unstarted_requests
        return (
            select(
                Job.state,
                Job.endpoint,
                Job.error_type,
                func.count(),
                func.coalesce(func.sum(counted), 0),
                func.coalesce(func.sum(case((counted > 1, counted - 1), else_=0)), 0),
                func.coalesce(func.sum(Job.possible_duplicate_charges), 0),
                func.coalesce(func.sum(Job.confirmed_duplicate_charges), 0),
                *(
                    func.coalesce(func.sum(case((paid, money), else_=zero)), zero)
                    for money in (
                        type_coerce(Job.est_usd, Money()),
                        spent_usd(),
                        reserved_usd(),
                        wasted_usd(),
                    )
                ),
            )
            .join(Batch, Batch.id == Job.batch_id)
            .where(*_metrics_terms(scope))
            .group_by(Job.state, Job.endpoint, Job.error_type)
        )

    return [
        JobTotals(
            state=JobState(row[0]),
            endpoint=str(row[1]),
            error_type=row[2],
            jobs=int(row[3]),
            attempts=int(row[4]),
            retries=int(row[5]),
            possible_duplicate_charges=int(row[6]),
            confirmed_duplicate_charges=int(row[7]),
            estimated_usd=row[8],
            spent_usd=row[9],
            reserved_usd=row[10],
            wasted_usd=row[11],
        )
        for row in session.execute(
            _prepared(("job_totals", *_metrics_key(scope)), build), _metrics_params(scope)
        )
    ]


def batch_states(session: Session) -> dict[str, int]:
    """Batches ``active``, ``paused`` (by fal's refusal, a budget, or ``wanbatch pause``) and
    ``cancelled``: every state present, 0 when none."""
    out = {state.value: 0 for state in BatchState}
    grouped = select(Batch.state, Batch.paused_by_user, func.count()).group_by(
        Batch.state, Batch.paused_by_user
    )
    for state, by_user, n in session.execute(grouped):
        name = BatchState(state).value
        if name == BatchState.ACTIVE.value and by_user:
            name = BatchState.PAUSED.value
        out[name] += int(n)
    return out


def count_events_into(session: Session, state: JobState) -> int:
    """How many times any job moved into ``state`` (its history, e.g. submits of unknown outcome).

    The state is written into the SQL as a literal, not a parameter, so that a partial index
    ``ON job_events (…) WHERE to_state = '<state>'`` can answer it without reading the table.
    """
    into: ColumnElement[str] = literal_column(f"'{JobState(state).value}'")
    query = select(func.count()).select_from(JobEvent).where(JobEvent.to_state == into)
    return int(session.scalar(query) or 0)


def _seconds_between(dialect: str, start: Any, end: Any) -> ColumnElement[Any]:
    """``end - start`` in seconds: ``date_part`` (a float; ``extract`` gives a numeric, several
    times slower to compare) on PostgreSQL, Julian days on SQLite."""
    if dialect == "postgresql":
        return func.date_part("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def _inference_seconds(dialect: str) -> ColumnElement[Any]:
    """fal's ``metrics.inference_time`` when it is a number; anything else a provider sent is
    skipped, never cast (a bad value must not fail the query). On SQLite a document that is no
    JSON is skipped before ``json_type`` reads it (which would fail the whole query): an
    ``Infinity`` that earlier versions stored from a ``1e999`` in a fal answer."""
    if dialect == "postgresql":
        is_number = func.jsonb_typeof(Job.provider_metrics.op("->")("inference_time")) == "number"
        number: ColumnElement[Any] = Job.provider_metrics.op("->>")("inference_time").cast(Float)
        return case((is_number, number), else_=None)
    is_json = func.json_valid(Job.provider_metrics) == 1
    is_number = func.json_type(Job.provider_metrics, "$.inference_time").in_(["integer", "real"])
    number = func.json_extract(Job.provider_metrics, "$.inference_time")
    return case((~is_json, None), (is_number, number), else_=None)


#: What each duration histogram measures per job, in SQL (NULL: the job is not counted):
#:
#: * ``wait``: ``created_at`` → ``submitted_at``: how long a job waited on this side before its
#:   (last) submit — limits, budget, schedule, retry backoff;
#: * ``fal``: ``submitted_at`` → ``completed_at``: the request's time at fal, its queue and the
#:   model run, as seen from here (without webhooks, up to a poll interval more);
#: * ``inference``: fal's own ``inference_time`` of the request (the model's time);
#: * ``download``: ``completed_at`` → ``finished_at`` of succeeded jobs that were sent: fetching
#:   the result and the video, checking and storing it.
DURATIONS: dict[str, Callable[[str], ColumnElement[Any]]] = {
    "wait": lambda dialect: _seconds_between(dialect, Job.created_at, Job.submitted_at),
    "fal": lambda dialect: _seconds_between(dialect, Job.submitted_at, Job.completed_at),
    "inference": _inference_seconds,
    "download": lambda dialect: case(
        (
            (Job.state == JobState.SUCCEEDED) & Job.reused_from.is_(None),
            _seconds_between(dialect, Job.completed_at, Job.finished_at),
        ),
        else_=None,
    ),
}


def _bucket(dialect: str, seconds: ColumnElement[Any], bounds: Sequence[float]) -> ColumnElement[Any]:
    """The index of the first of ``bounds`` (ascending) that ``seconds`` is at most
    (``len(bounds)``: beyond the last), in SQL.

    PostgreSQL's ``width_bucket(x, thresholds)`` (a binary search) counts the thresholds ``<= x``,
    where Prometheus' ``le`` buckets want those ``< x`` (a value equal to a bound belongs to it).
    Negated, ``width_bucket(-x, -bounds reversed)`` counts the bounds ``>= x``, and what remains
    of ``len(bounds)`` is the count ``< x``: the index wanted. SQLite has no ``width_bucket``: a
    ``CASE`` down the bounds.
    """
    if dialect == "postgresql":
        negated = ",".join(repr(-float(bound)) for bound in reversed(bounds))
        return len(bounds) - func.width_bucket(-seconds, literal_column(f"'{{{negated}}}'::float8[]"))
    return case(*((seconds <= bound, index) for index, bound in enumerate(bounds)), else_=len(bounds))


def duration_buckets(
    session: Session, name: str, bounds: Sequence[float], scope: MetricsScope | None = None
) -> list[tuple[int, int, float]]:
    """``(bucket index, jobs, sum of their durations)`` per non-empty bucket of the duration
    ``name`` (a key of :data:`DURATIONS`; the index as :func:`duration_histogram` counts them),
    over every job or the jobs of ``scope`` (:class:`MetricsScope`). One ``GROUP BY``: the
    database returns a row per bucket, never a row per job. Negative durations (clocks that
    stepped back) are left out."""
    dialect = session.get_bind().dialect.name
    seconds = DURATIONS[name](dialect)
    bucket = _bucket(dialect, seconds, bounds)
    query = (
        select(bucket.label("bucket"), func.count(), func.sum(seconds))
        .where(seconds.is_not(None), seconds >= 0, *_metrics_terms(scope))
        .group_by(literal_column("bucket"))
    )
    return [
        (int(index), int(n), float(seconds_sum or 0.0))
        for index, n, seconds_sum in session.execute(query, _metrics_params(scope))
    ]


def duration_histogram(
    session: Session, name: str, bounds: Sequence[float], scope: MetricsScope | None = None
) -> tuple[list[int], float]:
    """Jobs per bucket of the duration ``name`` (a key of :data:`DURATIONS`) and the durations' sum
    (of the jobs of ``scope`` only, when given: :class:`MetricsScope`).

    ``counts[i]`` jobs took at most ``bounds[i]`` seconds and more than the bound before it (not
    cumulative); the last entry counts those beyond every bound (:func:`duration_buckets`).
    """
    counts = [0] * (len(bounds) + 1)
    total = 0.0
    for index, n, seconds_sum in duration_buckets(session, name, bounds, scope):
        counts[index] += n
        total += seconds_sum
    return counts, total
