"""Creating jobs: a manifest's jobs stored in bulk (:func:`add_jobs`, COPY on PostgreSQL) and a
resubmitted manifest's jobs placed where it puts them (:func:`resubmit_jobs`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    bindparam,
    case,
    column,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    table,
    union_all,
    update,
)
from sqlalchemy.engine import CursorResult, Dialect
from sqlalchemy.orm import Session

from jobs.endpoints import get_endpoint
from jobs.manifest.keys import defaults_free_key, stored_content_key
from jobs.media import MediaKind, classify
from jobs.models import NOT_IN_MANIFEST, Batch, Money, new_id, utcnow
from jobs.money import BATCH_CAP_ERROR
from jobs.states import JobState
from jobs.store.batches import _set_media
from jobs.store.core import _JOBS, _dialect_insert
from jobs.store.repeats import covered_by_reruns
from jobs.store.transitions import _EVENT_COLUMNS, _EVENTS
from jobs.store.unsent import _cancel_in_state, _cancel_values


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


def mark_reruns_not_in_manifest(session: Session, batch_id: str, parent_id: str) -> int:
    """Mark the jobs of rerun ``batch_id`` that repeat a job of ``parent_id`` its manifest no longer has
    (``not_in_manifest``, as their parent jobs are: the rerun's manifest text is its parent's);
    how many. A separate statement, not a column of :func:`add_jobs`' insert: that insert also
    stores jobs on the older schemas the migration tests build."""
    parents = _JOBS.alias("parents")
    repeated = select(parents.c.id).where(
        parents.c.batch_id == parent_id, parents.c.not_in_manifest.is_(True)
    )
    marked = session.execute(
        update(_JOBS)
        .where(_JOBS.c.batch_id == batch_id, _JOBS.c.rerun_of.in_(repeated.scalar_subquery()))
        .values(not_in_manifest=True)
        .execution_options(preserve_rowcount=True)
    )
    return int(cast(CursorResult[Any], marked).rowcount)


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
class ChangedFile:
    """A local file the manifest's jobs send whose bytes differ from those jobs of the batch
    were stored for: those jobs' keys stood for the old bytes, so the manifest no longer has
    them, and it has a job for the new bytes in place of each (:func:`_replaced_by_new_bytes`).
    The manifest itself may not have been edited at all: the file was rewritten."""

    #: The file, as the manifest's jobs name it (absolute, resolved).
    path: str
    #: The SHA-256 the replaced jobs recorded (several when it changed more than once).
    old_sha256: tuple[str, ...]
    #: Its SHA-256 now, as the manifest's jobs recorded it.
    new_sha256: str
    #: Of the replaced jobs, those never sent (cancelled, as :attr:`Resubmitted.dropped`), those
    #: that ended without being sent, and those that may have been sent and paid for: they are
    #: counted in :class:`Resubmitted`'s figures too.
    dropped: int = 0
    ended_unsent: int = 0
    kept: int = 0

    @property
    def jobs(self) -> int:
        """The batch's jobs for the old bytes the manifest's jobs for the new ones replace."""
        return self.dropped + self.ended_unsent + self.kept


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
    #: Of ``not_in_manifest``, the jobs never sent, so cancelled (``error_type``
    #: ``not_in_manifest``): by this resubmit, or by an earlier one that left them out too.
    #: The others may have reached fal (and been paid for): they stay as they are.
    dropped: int = 0
    #: Jobs an earlier resubmit dropped that the manifest has again: ``pending`` once more.
    restored: int = 0
    #: Of ``not_in_manifest``, the jobs not dropped that ended without being sent (nothing of a
    #: POST recorded, nothing billed: cancelled by a budget or a deadline before their first
    #: send, or given a twin's video): they stay as they are, and nothing of them was paid for.
    ended_unsent: int = 0
    #: Of ``present``, the manifest's jobs not stored by their key that ask what a job the batch
    #: already sent (or rendered) asks, once the endpoint's documented defaults are filled in (a
    #: default written out, or left out, since): that job is theirs, nothing new is stored
    #: (:func:`_match_written_defaults`), nor a dropped job of their key restored; and those
    #: found so by an earlier resubmit, found now by the key that job recorded (:func:`_holders`).
    defaults_matched: int = 0
    #: Of ``not_in_manifest``, the jobs left out only because a local file they send changed
    #: since they were stored (the manifest has the same job for its new bytes), by file: a job
    #: sending two changed files (a first and a last frame) is counted under each.
    changed_files: tuple[ChangedFile, ...] = ()
    #: Those jobs once each, by kind (:func:`_left_out_kind`: ``dropped``, ``ended_unsent``,
    #: ``kept``): what ``not_in_manifest``'s figures hold of them, the files' counts overlapping.
    replaced: Mapping[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        """Of ``not_in_manifest``, the jobs left as they were that may have been sent (an attempt
        counted, a POST or a request id recorded, something billed), or are being sent now."""
        return self.not_in_manifest - self.dropped - self.ended_unsent


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

    Every job the manifest no longer has is marked so (``not_in_manifest``), every job it has
    unmarked: the one notion of "no longer in the manifest" that ``run``'s exit code, ``status``
    and ``rerun --failed-only`` go by. Of the jobs it no longer has, those never sent
    (:func:`_drop_never_sent`) are cancelled here, in this transaction: kept pending, the next
    run sent and billed a job the user had removed or corrected. One the manifest has again
    that an earlier resubmit dropped is ``pending`` again (:func:`_restore`): the same row, so
    the batch still holds one job per key. Of the others it leaves out, those that already ended
    without being sent (:func:`_nothing_sent`) are counted apart (``ended_unsent``) from those
    that may have been sent and paid for (:attr:`Resubmitted.kept`).

    A job of the manifest may be stood for by a job the batch sent under another spelling of the
    same request (an endpoint default written out or left out, :func:`_match_written_defaults`):
    that job is the item's, and records the key it stands for (``manifest_key``). A later
    resubmit finds it by that key (:func:`_holders`) and stores nothing for it, as for a job
    found by its own key; a job of that key an earlier resubmit dropped stays dropped, left out.
    """
    conn = session.connection()
    pg = conn.dialect.name == "postgresql"
    on_commit = " ON COMMIT DROP" if pg else ""  # SQLite's are dropped below (its rollback drops them too)
    # Keyed, so a statement over the keys can look one up (and the planner knows them unique).
    # Each key with the id its job was staged with: the rows this resubmit added are those whose
    # id is their key's here (:func:`_match_written_defaults`).
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE IF NOT EXISTS {_SEEN} (job_key TEXT PRIMARY KEY, id TEXT NOT NULL){on_commit}"
    )
    seen = table(_SEEN, column("job_key"), column("id"))
    conn.execute(delete(seen))
    add_seen = _dialect_insert(conn.dialect.name, seen).on_conflict_do_nothing()
    # Jobs that stand for a spelling of the manifest's (Job.manifest_key): looked up only in a
    # batch that has one, so a plain resubmit pays one index probe for them.
    aliases = _has_aliases(conn, batch_id)
    if aliases:
        conn.exec_driver_sql(
            f"CREATE TEMP TABLE IF NOT EXISTS {_STOOD_FOR} "
            f"(job_key TEXT PRIMARY KEY, job TEXT NOT NULL){on_commit}"
        )
        conn.execute(delete(table(_STOOD_FOR)))
    added = present = renumbered = relocated = stood_for = 0
    files: dict[str, str] = {}  # each local file the manifest's jobs send → its SHA-256 now
    for block in _chunks(jobs, chunk):
        _note_files(files, block)
        holders = _holders(conn, batch_id, block) if aliases else {}
        if holders:  # found by the key they stand for: nothing stored for them
            mine = [job for job in block if job.key in holders]
            block = [job for job in block if job.key not in holders]
            _keep_stood_for(conn, mine)
            moved, media = _stand_in(conn, [(holders[job.key], job) for job in mine])
            renumbered, relocated = renumbered + moved, relocated + media
            stood_for += len(mine)
            present += len(mine)
            conn.execute(add_seen, [{"job_key": job.key, "id": new_id()} for job in mine])
        a, p, r, m = _store_block(conn, batch_id, block, add_seen)
        added, present, renumbered, relocated = added + a, present + p, renumbered + r, relocated + m
    if aliases:
        a, r, held = _both_spellings(conn, batch_id)
        added, present, renumbered, stood_for = added + a, present - a, renumbered + r, stood_for - held
    if pg:  # filled by now: without statistics the planner guesses its size from its pages
        conn.exec_driver_sql(f"ANALYZE {_SEEN}")
    by_key: ColumnElement[bool] = _JOBS.c.job_key.in_(select(seen.c.job_key))
    # The jobs the manifest has, by their key, or (aliases) by the key they stand for: one
    # statement each, so each is a semi-join (an IN within an OR is a subplan per job).
    in_manifest = [by_key, _JOBS.c.manifest_key.in_(select(seen.c.job_key))] if aliases else [by_key]
    stored = select(func.count()).select_from(_JOBS).where(_JOBS.c.batch_id == batch_id)
    gone = dropped = ended_unsent = matched = 0
    changed_files: tuple[ChangedFile, ...] = ()
    replaced: dict[str, int] = {}
    left_out: ColumnElement[bool] | None = None
    if conn.execute(stored).scalar_one() > added + present:
        left_out = _left_out(conn, batch_id, aliases)
        from_added, matched = _match_written_defaults(conn, batch_id, left_out)
        added, present = added - from_added, present + from_added
        if aliases or matched > from_added:
            # A dropped job the manifest has again that a job sent stands for stays dropped: it
            # is among the jobs left out, neither restored nor unmarked.
            by_key = and_(by_key, _not_left_out())
            in_manifest = [and_(theirs, _not_left_out()) for theirs in in_manifest]
    restored = _restore(session, batch_id, by_key) if present else 0
    for theirs in in_manifest if present else []:  # unmarked: the manifest has them (again)
        conn.execute(
            update(_JOBS)
            .where(_JOBS.c.batch_id == batch_id, _JOBS.c.not_in_manifest.is_(True), theirs)
            .values(not_in_manifest=False)
        )
    if left_out is not None:
        conn.execute(
            update(_JOBS)
            .where(_JOBS.c.batch_id == batch_id, _JOBS.c.not_in_manifest.is_(False), left_out)
            .values(not_in_manifest=True)
        )
        _drop_never_sent(session, batch_id, left_out)
        rows = conn.execute(
            select(
                _JOBS.c.id,
                _JOBS.c.item_index,
                _JOBS.c.variant,
                _JOBS.c.state,
                _JOBS.c.error_type,
                case((and_(*_nothing_sent()), 1), else_=0).label("unsent"),
                _JOBS.c.endpoint,
                _JOBS.c.input,
                _JOBS.c.source_files,
            )
            .where(_JOBS.c.batch_id == batch_id, left_out)
            .order_by(_JOBS.c.item_index, _JOBS.c.variant, _JOBS.c.created_at, _JOBS.c.id)
        ).all()
        gone = len(rows)
        dropped = sum(1 for row in rows if _left_out_kind(row) == "dropped")
        ended_unsent = sum(1 for row in rows if _left_out_kind(row) == "ended_unsent")
        changed_files, replaced = _replaced_by_new_bytes(conn, rows, files)
        places = [(row.id, row.item_index, row.variant) for row in rows]
        moves = [
            {"b_id": job_id, "b_item": item}
            for (job_id, old, _), item in zip(places, places_after(places, item_count()), strict=True)
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
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {_LEFT_OUT}")
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {_STOOD_FOR}")
    return Resubmitted(
        added,
        present,
        renumbered,
        gone,
        relocated,
        dropped,
        restored,
        ended_unsent,
        matched + stood_for,
        changed_files,
        replaced,
    )


def _note_files(files: dict[str, str], block: Iterable[NewJob]) -> None:
    """Add to ``files`` each local file the jobs of ``block`` send, with the SHA-256 their
    ``source_files`` recorded (its bytes as the manifest was read): one entry per distinct file."""
    for job in block:
        for name, source in (job.source_files or {}).items():
            value = job.input.get(name)
            digest = source.get("sha256") if isinstance(source, dict) else None
            if not isinstance(value, str) or not isinstance(digest, str) or files.get(value) == digest:
                continue
            if classify(value) is MediaKind.PATH:
                files[value] = digest


def _left_out_kind(row: Any) -> str:
    """How a job the manifest left out is counted (:class:`Resubmitted`): ``dropped`` (never
    sent, cancelled), ``ended_unsent`` (ended before a send) or ``kept`` (may have been sent)."""
    if _is_dropped(row.state, row.error_type):
        return "dropped"
    if row.unsent and JobState(row.state).terminal:
        return "ended_unsent"
    return "kept"


def _changed_paths(row: Any, files: Mapping[str, str]) -> dict[str, str]:
    """The local files of a left-out job (``row``) whose bytes the manifest's jobs recorded
    otherwise: each field's name → the manifest's SHA-256 of its file now."""
    changed: dict[str, str] = {}
    for name, source in (row.source_files or {}).items():
        value = (row.input or {}).get(name)
        then = source.get("sha256") if isinstance(source, dict) else None
        now = files.get(value) if isinstance(value, str) else None
        if isinstance(then, str) and now is not None and now != then:
            changed[name] = now
    return changed


def _replaced_by_new_bytes(
    conn: Connection, rows: Sequence[Any], files: Mapping[str, str]
) -> tuple[tuple[ChangedFile, ...], dict[str, int]]:
    """Of the jobs the manifest left out (``rows``), those it has again for the new bytes of a
    file of theirs (``files``: the manifest's, by path): the job's key recomputed from the store
    with the file's SHA-256 now (:func:`jobs.manifest.keys.stored_content_key`) is among the
    manifest's keys (:data:`_SEEN`), by file. A job also edited in the manifest (another prompt)
    is not: the manifest left it out, and that is what its user is told. With the files, those
    jobs counted once each by kind (:attr:`Resubmitted.replaced`)."""
    candidates: dict[str, list[tuple[Any, dict[str, str]]]] = {}  # key with the new bytes → jobs
    for row in rows:
        changed = _changed_paths(row, files)
        if changed:
            sources = {
                name: {**source, "sha256": changed[name]} if name in changed else source
                for name, source in row.source_files.items()
            }
            key = stored_content_key(row.endpoint, row.input or {}, sources)
            candidates.setdefault(key, []).append((row, changed))
    if not candidates:
        return (), {}
    seen = table(_SEEN, column("job_key"))
    keys = list(candidates)
    found: set[str] = set()
    for start in range(0, len(keys), 500):
        part = keys[start : start + 500]
        found.update(conn.execute(select(seen.c.job_key).where(seen.c.job_key.in_(part))).scalars())
    replaced = [job for key in found for job in candidates[key]]
    once = {"dropped": 0, "ended_unsent": 0, "kept": 0}
    for row, _changed in replaced:
        once[_left_out_kind(row)] += 1
    return _by_file(replaced), once


def _by_file(replaced: Iterable[tuple[Any, dict[str, str]]]) -> tuple[ChangedFile, ...]:
    """The replaced jobs (each with its changed fields, :func:`_changed_paths`) counted by
    file, as ``resubmit_jobs`` counts the jobs it leaves out. A job sending two changed files (a
    first and a last frame) is counted under each: counted under its first only, the last was
    never named, and the user who put the first back found the job left out again."""
    old: dict[str, set[str]] = {}
    new: dict[str, str] = {}
    kinds: dict[str, dict[str, int]] = {}
    for row, changed in replaced:
        paths = {row.input[name]: name for name in changed}  # one file in both fields: once
        for path, name in paths.items():
            old.setdefault(path, set()).add(row.source_files[name]["sha256"])
            new[path] = changed[name]
            counts = kinds.setdefault(path, {"dropped": 0, "ended_unsent": 0, "kept": 0})
            counts[_left_out_kind(row)] += 1
    return tuple(
        ChangedFile(path=path, old_sha256=tuple(sorted(old[path])), new_sha256=new[path], **kinds[path])
        for path in sorted(kinds)
    )


def _store_block(
    conn: Connection, batch_id: str, block: list[NewJob], add_seen: Any
) -> tuple[int, int, int, int]:
    """Store a chunk of the manifest's jobs as :func:`resubmit_jobs` does, those the batch has
    already (by key) given the place and media paths the manifest gives them, every key kept in
    :data:`_SEEN`: ``(added, present, renumbered, relocated)``."""
    if not block:
        return 0, 0, 0, 0
    renumbered = relocated = 0
    block_rows = _job_rows(batch_id, block)
    inserted = _insert_rows(conn, block_rows)
    if inserted < len(block):
        relocated += _relocate_stored(conn, batch_id, block)
    if conn.dialect.name == "postgresql":  # the chunk is still in the staging table _insert_chunk_pg filled
        if inserted < len(block):
            renumbered += _place_stored_pg(conn)
        staging = table(_STAGING, column("job_key"), column("id"))
        conn.execute(add_seen.from_select(["job_key", "id"], select(staging.c.job_key, staging.c.id)))
    else:
        if inserted < len(block):
            renumbered += _place_stored_sqlite(conn, batch_id, block)
        conn.execute(add_seen, [{"job_key": row["job_key"], "id": row["id"]} for row in block_rows])
    return inserted, len(block) - inserted, renumbered, relocated


def _has_aliases(conn: Connection, batch_id: str) -> bool:
    """Whether a job of ``batch_id`` stands for a manifest's key other than its own
    (:attr:`jobs.models.Job.manifest_key`): one probe of ``ix_jobs_batch_id_manifest_key``."""
    found = conn.execute(
        select(literal(1)).where(_JOBS.c.batch_id == batch_id, _JOBS.c.manifest_key.is_not(None)).limit(1)
    ).first()
    return found is not None


def _holders(conn: Connection, batch_id: str, block: list[NewJob]) -> dict[str, Any]:
    """The jobs of ``batch_id`` that stand for a job of ``block`` (their ``manifest_key`` is its
    key), by that key: not one whose own key the manifest has (in ``block`` or an earlier chunk,
    :data:`_SEEN`): that job is its own item's (:func:`_both_spellings`)."""
    keys = {job.key for job in block}
    seen = table(_SEEN, column("job_key"))
    rows = conn.execute(
        select(
            _JOBS.c.id,
            _JOBS.c.job_key,
            _JOBS.c.manifest_key,
            _JOBS.c.input,
            _JOBS.c.source_files,
            _JOBS.c.item_index,
            _JOBS.c.variant,
            _JOBS.c.not_in_manifest,
        ).where(
            _JOBS.c.batch_id == batch_id,
            _JOBS.c.manifest_key.is_not(None),
            _JOBS.c.manifest_key.in_(list(keys)),
            ~exists().where(seen.c.job_key == _JOBS.c.job_key),
            ~and_(_JOBS.c.state == JobState.CANCELLED, _JOBS.c.error_type == NOT_IN_MANIFEST),
        )
    ).all()
    return {row.manifest_key: row for row in rows if row.job_key not in keys}


def _keep_stood_for(conn: Connection, block: list[NewJob]) -> None:
    """Keep the jobs of ``block`` that a stored job stands for (:data:`_STOOD_FOR`), for
    :func:`_both_spellings`: nothing is stored for them unless the manifest turns out to have
    that job's own key too."""
    stood_for = table(_STOOD_FOR, column("job_key"), column("job"))
    conn.execute(
        insert(stood_for),
        [{"job_key": job.key, "job": json.dumps(_job_document(job), default=str)} for job in block],
    )


def _job_document(job: NewJob) -> dict[str, Any]:
    return {name: getattr(job, name) for name in NewJob.__dataclass_fields__}


def _job_of_document(text: str) -> NewJob:
    doc = json.loads(text)
    doc["est_billing_units"], doc["est_usd"] = Decimal(doc["est_billing_units"]), Decimal(doc["est_usd"])
    return NewJob(**doc)


def _both_spellings(conn: Connection, batch_id: str) -> tuple[int, int, int]:
    """Jobs that stand for another spelling (``manifest_key``) when the manifest has both: their
    own key, and the one they stand for, as two items (the same request written twice, which
    ``validate`` warns of). Such a job is its own key's item's job, and no longer stands for the
    other (its ``manifest_key`` is cleared); the other item's job, held back by
    :func:`_holders`, is stored now (or a job of its key the batch has, dropped, takes its place
    and is ``pending`` again, as any dropped job the manifest has again): ``(added, renumbered,
    held back)``.
    Rare: looked for once, after every chunk."""
    seen = table(_SEEN, column("job_key"), column("id"))
    stood_for = table(_STOOD_FOR, column("job_key"), column("job"))
    both = conn.execute(
        select(_JOBS.c.id, _JOBS.c.manifest_key).where(
            _JOBS.c.batch_id == batch_id,
            _JOBS.c.manifest_key.is_not(None),
            _JOBS.c.manifest_key.in_(select(seen.c.job_key)),
            _JOBS.c.job_key.in_(select(seen.c.job_key)),
        )
    ).all()
    if not both:
        return 0, 0, 0
    conn.execute(update(_JOBS).where(_JOBS.c.id.in_([row.id for row in both])).values(manifest_key=None))
    held = [
        _job_of_document(text)
        for (text,) in conn.execute(
            select(stood_for.c.job).where(stood_for.c.job_key.in_([row.manifest_key for row in both]))
        )
    ]
    if not held:
        return 0, 0, 0
    block_rows = _job_rows(batch_id, held)
    inserted = _insert_rows(conn, block_rows)
    renumbered = 0
    if inserted < len(held):
        _relocate_stored(conn, batch_id, held)
        renumbered = _place_stored_sqlite(conn, batch_id, held)
    # The rows stored now are this resubmit's (:func:`_match_written_defaults` reads them by id).
    conn.execute(
        update(seen).where(seen.c.job_key == bindparam("b_key")).values(id=bindparam("b_id")),
        [{"b_key": row["job_key"], "b_id": row["id"]} for row in block_rows],
    )
    return inserted, renumbered, len(held)


def _stand_in(conn: Connection, pairs: list[tuple[Any, NewJob]]) -> tuple[int, int]:
    """Each stored job of ``pairs`` (a row of :func:`_holders`) takes the place of the manifest's
    job it stands for, and the media paths it gives (the same bytes), and is in the manifest:
    ``(moved, relocated)``. Only what differs is written: a no-op resubmit writes nothing."""
    pg = conn.dialect.name == "postgresql"
    moves = [
        {"b_id": old.id, "b_item": new.item_index, "b_variant": new.variant}
        for old, new in pairs
        if (old.item_index, old.variant) != (new.item_index, new.variant) or old.not_in_manifest
    ]
    if moves:
        conn.execute(
            update(_JOBS)
            .where(_JOBS.c.id == bindparam("b_id"))
            .values(
                item_index=bindparam("b_item"),
                variant=bindparam("b_variant"),
                earlier_items=_earlier_items(pg, bindparam("b_item")),
                not_in_manifest=False,
            ),
            moves,
        )
    changes = [
        change
        for old, new in pairs
        if (change := _media_change(old.id, old.input or {}, old.source_files, new)) is not None
    ]
    _set_media(conn, changes)
    moved = sum(1 for old, new in pairs if (old.item_index, old.variant) != (new.item_index, new.variant))
    return moved, len(changes)


def _media_change(
    job_id: str, old_input: dict[str, Any], old_sources: Any, new: Any
) -> dict[str, Any] | None:
    """The change of :func:`jobs.store.batches._set_media` that gives stored job ``job_id`` the
    media values and ``source_files`` of the manifest's job ``new`` (a :class:`NewJob`, or a
    stored row with ``endpoint``, ``input`` and ``source_files``), where they differ; else None.
    Only the endpoint's media fields: the rest of the stored input (what was sent) stays."""
    fields = [f.name for f in get_endpoint(new.endpoint).media_fields if f.name in new.input]
    media = {name: new.input[name] for name in fields if old_input.get(name) != new.input[name]}
    if media or old_sources != new.source_files:
        return {"b_id": job_id, "b_input": {**old_input, **media}, "b_sources": new.source_files}
    return None


def _left_out(conn: Connection, batch_id: str, aliases: bool = False) -> ColumnElement[bool]:
    """Which jobs of ``batch_id`` the resubmitted manifest left out: their ids, found once by
    an anti-join of the batch's jobs with the manifest's keys (:data:`_SEEN`, filled) and kept
    in the temporary table :data:`_LEFT_OUT`; the condition a statement over those jobs takes
    (the mark, :func:`_drop_never_sent`, the rows numbered after the manifest's items).

    ``NOT EXISTS``, not ``NOT IN``: PostgreSQL plans no ``NOT IN (subquery)`` as an anti-join,
    only as a filter running a subplan for each job, and once the keys outgrow ``work_mem`` that
    subplan reads every key for every job: a resubmit of 100,000 jobs leaving one item out ran
    for more than 15 minutes, a statement at a time. The two differ only where a key is NULL
    (``NOT IN`` over a NULL is never true): ``jobs.job_key`` is NOT NULL, and so is every key
    of :data:`_SEEN`. Found once, not in each statement: what the statements change (marks,
    states) is not what decides which jobs these are, and the ids are the jobs' primary key.

    ``aliases``: some job of the batch stands for a key other than its own (``manifest_key``,
    :func:`_match_written_defaults`): one that stands for a key of the manifest is in it, and a
    job a resubmit dropped whose key such a job stands for is left out (it stays dropped)."""
    pg = conn.dialect.name == "postgresql"
    on_commit = " ON COMMIT DROP" if pg else ""
    conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {_LEFT_OUT} (id TEXT PRIMARY KEY){on_commit}")
    gone = table(_LEFT_OUT, column("id"))
    conn.execute(delete(gone))
    conn.execute(insert(gone).from_select(["id"], _left_out_ids(batch_id, aliases)))
    if pg:
        conn.exec_driver_sql(f"ANALYZE {_LEFT_OUT}")
    return _JOBS.c.id.in_(select(gone.c.id))


def _left_out_ids(batch_id: str, aliases: bool = False) -> Select[tuple[str]]:
    """The ids of the jobs of ``batch_id`` whose key :data:`_SEEN` does not hold (an anti-join);
    with ``aliases``, see :func:`_left_out`."""
    seen = table(_SEEN, column("job_key"))
    absent = ~exists().where(seen.c.job_key == _JOBS.c.job_key)
    if not aliases:
        return select(_JOBS.c.id).where(_JOBS.c.batch_id == batch_id, absent)
    holder = _JOBS.alias("holder")
    # Two anti-joins (a NULL manifest_key equals no key); and, disjoint from those (their key is
    # the manifest's), the dropped jobs a job in the manifest stands for.
    absent_both = select(_JOBS.c.id).where(
        _JOBS.c.batch_id == batch_id, absent, ~exists().where(seen.c.job_key == _JOBS.c.manifest_key)
    )
    stood_for = select(_JOBS.c.id).where(
        _JOBS.c.batch_id == batch_id,
        _JOBS.c.state == JobState.CANCELLED,
        _JOBS.c.error_type == NOT_IN_MANIFEST,
        exists().where(seen.c.job_key == _JOBS.c.job_key),
        exists().where(
            holder.c.batch_id == batch_id,
            holder.c.manifest_key.is_not(None),
            holder.c.manifest_key == _JOBS.c.job_key,
        ),
    )
    return cast(Select[tuple[str]], union_all(absent_both, stood_for))


def _not_left_out() -> ColumnElement[bool]:
    """A job not among those :func:`_left_out` found: an anti-join (``NOT EXISTS``, not ``NOT IN``:
    see :func:`_left_out`)."""
    gone = table(_LEFT_OUT, column("id"))
    return ~exists().where(gone.c.id == _JOBS.c.id)


#: Ids one ``IN (…)`` list names at most: a sweep that wrote out a default matches every job,
#: and each id is a bound parameter (SQLite allows 32,766 of them, psycopg 65,535).
_IDS_PER_STATEMENT = 5000


def _match_written_defaults(
    conn: Connection, batch_id: str, left_out: ColumnElement[bool]
) -> tuple[int, int]:
    """Keep as their items' jobs the left-out jobs of ``batch_id`` that the manifest's jobs
    stored for nothing yet ask the same as, once the endpoint's documented defaults are filled
    in: ``(of the rows this resubmit added, of all)``.

    A key is the input as written, so a manifest edited to write out a default (``num_frames:
    81`` where fal renders 81 frames anyway), or to leave out one it wrote, gives every job a new
    key: the old ones were left out (sent, kept) and the new ones sent and billed again, for the
    same videos. Such a job is one of the same request: like a manifest submitted again as it
    was, its item keeps the job it has. The job stored stays as it is — its key, its input as it
    was sent, its state, its video — and takes the item's place (and the media paths the
    manifest now gives, the same bytes, as :func:`_relocate_stored` does), and records the key it
    stands for (``manifest_key``): the next resubmit finds it by that key, storing nothing
    (:func:`_holders`). The manifest's job it stands for is either a row just added, deleted
    here, in this transaction (nothing was stored for it, nothing is sent), or one an earlier
    resubmit dropped that the manifest has again (never sent): that one stays dropped, among the
    jobs left out, instead of being ``pending`` again and sent.

    Only a job that may have been sent (:func:`_nothing_sent` false: sent, being sent, ended
    after a send) or that succeeded (a twin's video reused) stands in for one: a job a budget or
    a deadline cancelled before its first send has nothing to stand in with (the new row is sent,
    once), and one never sent is dropped as before (the new row, the manifest's spelling, is sent
    in its place, once). Only jobs that pin their seed, or whose endpoint has none, are the same
    request (:func:`jobs.manifest.keys.defaults_free_key`): without a seed fal draws a new one.
    Each stored job stands in for one at most, and every such job stands in for one: of several
    that ask the same (two items differing only by a default written out, both sent), a
    succeeded one first, then one in the item's place, then the oldest."""
    candidates = [
        row
        for row in conn.execute(
            select(
                _JOBS.c.id,
                _JOBS.c.job_key,
                _JOBS.c.endpoint,
                _JOBS.c.input,
                _JOBS.c.source_files,
                _JOBS.c.state,
                _JOBS.c.error_type,
                _JOBS.c.item_index,
                _JOBS.c.variant,
                case((and_(*_nothing_sent()), 1), else_=0).label("unsent"),
            )
            .where(_JOBS.c.batch_id == batch_id, left_out)
            .order_by(_JOBS.c.created_at, _JOBS.c.id)
        )
        if not _is_dropped(row.state, row.error_type)
        and (not row.unsent or JobState(row.state) == JobState.SUCCEEDED)
    ]
    standing: dict[str, list[Any]] = {}
    for row in candidates:
        key = defaults_free_key(row.endpoint, row.input or {}, row.source_files, row.job_key)
        if key is not None:
            standing.setdefault(key, []).append(row)
    if not standing:
        return 0, 0
    seen = table(_SEEN, column("job_key"), column("id"))
    columns = (
        _JOBS.c.id,
        _JOBS.c.job_key,
        _JOBS.c.endpoint,
        _JOBS.c.input,
        _JOBS.c.source_files,
        _JOBS.c.item_index,
        _JOBS.c.variant,
    )
    # IN, not a join: SQLite read the batch's jobs by their index and scanned the keys (no
    # index on their ids) for each, hours for 40,000 jobs; IN makes it one lookup each.
    added_rows = conn.execute(
        select(*columns, literal(1).label("added")).where(
            _JOBS.c.batch_id == batch_id, _JOBS.c.id.in_(select(seen.c.id))
        )
    ).all()
    # Dropped before, in the manifest again (its key: it is not left out): what _restore would
    # make pending.
    dropped_rows = conn.execute(
        select(*columns, literal(0).label("added")).where(
            _JOBS.c.batch_id == batch_id,
            _JOBS.c.state == JobState.CANCELLED,
            _JOBS.c.error_type == NOT_IN_MANIFEST,
            _not_left_out(),
        )
    ).all()
    pairs = []
    for new in sorted([*added_rows, *dropped_rows], key=lambda row: (row.item_index, row.variant)):
        key = defaults_free_key(new.endpoint, new.input or {}, new.source_files, new.job_key)
        rows = standing.get(key) if key is not None else None
        if not rows:
            continue
        place = (new.item_index, new.variant)
        best = min(
            range(len(rows)),
            key=lambda i: (
                JobState(rows[i].state) != JobState.SUCCEEDED,
                (rows[i].item_index, rows[i].variant) != place,
                i,
            ),
        )
        pairs.append((new, rows.pop(best)))
    if not pairs:
        return 0, 0
    added_ids = [new.id for new, _ in pairs if new.added]
    for start in range(0, len(added_ids), _IDS_PER_STATEMENT):
        conn.execute(delete(_JOBS).where(_JOBS.c.id.in_(added_ids[start : start + _IDS_PER_STATEMENT])))
    pg = conn.dialect.name == "postgresql"
    conn.execute(
        update(_JOBS)
        .where(_JOBS.c.id == bindparam("b_id"))
        .values(
            item_index=bindparam("b_item"),
            variant=bindparam("b_variant"),
            earlier_items=_earlier_items(pg, bindparam("b_item")),
            not_in_manifest=False,
            manifest_key=bindparam("b_key"),
        ),
        [
            {"b_id": old.id, "b_item": new.item_index, "b_variant": new.variant, "b_key": new.job_key}
            for new, old in pairs
        ],
    )
    changes = [
        change
        for new, old in pairs
        if (change := _media_change(old.id, old.input or {}, old.source_files, new)) is not None
    ]
    _set_media(conn, changes)
    gone = table(_LEFT_OUT, column("id"))
    kept_ids = [old.id for _, old in pairs]
    for start in range(0, len(kept_ids), _IDS_PER_STATEMENT):
        conn.execute(delete(gone).where(gone.c.id.in_(kept_ids[start : start + _IDS_PER_STATEMENT])))
    # The dropped jobs a stored job now stands for are left out: they stay dropped.
    stood_for = [{"id": new.id} for new, _ in pairs if not new.added]
    if stood_for:
        conn.execute(insert(gone), stood_for)
    return len(added_ids), len(pairs)


def _is_dropped(state: str, error_type: str | None) -> bool:
    """Whether a job is one a resubmit dropped (:func:`_drop_never_sent`)."""
    return JobState(state) == JobState.CANCELLED and error_type == NOT_IN_MANIFEST


#: What a job dropped from its manifest says (``jobs.error``).
DROPPED_ERROR = (
    "no longer in its manifest and never sent: cancelled when the manifest was submitted again "
    "(nothing of it reached fal); a manifest that has it again sends it"
)


def _no_post_recorded() -> list[ColumnElement[bool]]:
    """No attempt counted, no POST recorded (its input, its send time, a request), none refused
    with 429, no resend of an unknown submit, nothing ambiguous or possibly billed twice."""
    j = _JOBS.c
    return [
        j.attempts == 0,
        j.submitted_at.is_(None),
        j.sent_at.is_(None),
        j.submitted_input.is_(None),
        j.request_id.is_(None),
        j.rate_limited_submits == 0,
        j.resend_attempt.is_(None),
        j.possible_duplicate_charges == 0,
        j.ambiguous_usd == literal(Decimal(0), j.ambiguous_usd.type),
    ]


def _never_sent(now: datetime) -> list[ColumnElement[bool]]:
    """A job nothing of which can have reached fal: :func:`_no_post_recorded`, nothing billed,
    and no process holding it now."""
    j = _JOBS.c
    return [
        *_no_post_recorded(),
        j.actual_usd.is_(None),
        or_(j.lease_expires_at.is_(None), j.lease_expires_at <= literal(now, j.lease_expires_at.type)),
    ]


def _nothing_sent() -> list[ColumnElement[bool]]:
    """A job of which nothing was sent, whatever its state: :func:`_no_post_recorded` and nothing
    billed (an ended job never sent has ``actual_usd`` 0, one still to send has none). Ended, it
    is one a budget, a deadline or a cancel ended before its first POST, or that took a twin's
    video: kept by a resubmit that leaves it out, it was never paid for (:attr:`Resubmitted.ended_unsent`)."""
    j = _JOBS.c
    return [
        *_no_post_recorded(),
        or_(j.actual_usd.is_(None), j.actual_usd == literal(Decimal(0), j.actual_usd.type)),
    ]


def _drop_never_sent(session: Session, batch_id: str, left_out: ColumnElement[bool]) -> int:
    """Cancel the jobs of ``batch_id`` its manifest left out (``left_out``) that were never sent
    (``pending``/``retry_wait`` and :func:`_never_sent`): ``error_type`` :data:`NOT_IN_MANIFEST`,
    nothing billed. Set-based, one UPDATE per state, as ``wanbatch cancel`` moves jobs
    (:func:`jobs.store.unsent._cancel_in_state`): the ``WHERE`` is the compare-and-set (a job a
    dispatcher claims meanwhile is left to it: its row lock makes the UPDATE check it again),
    the version grows by one, each moved job gets its event. A job that may have reached fal
    stays: it may have been paid for, and its request may still run. How many it cancelled."""
    now = utcnow()
    values = _cancel_values(now, error=DROPPED_ERROR, error_type=NOT_IN_MANIFEST, never_sent=True)
    moved = 0
    for state in (JobState.PENDING, JobState.RETRY_WAIT):
        where = [_JOBS.c.batch_id == batch_id, _JOBS.c.state == state, left_out, *_never_sent(now)]
        for _, n in _cancel_in_state(
            session, state, where, values, reason="not in manifest: never sent, dropped", worker=None, now=now
        ):
            moved += n
    if moved:
        session.expire_all()  # Job objects already loaded must not show the old state
    return moved


def _restore(session: Session, batch_id: str, in_manifest: ColumnElement[bool]) -> int:
    """Make ``pending`` again, and unmark, the jobs of ``batch_id`` a resubmit dropped
    (:func:`_drop_never_sent`) that the manifest has again (``in_manifest``): never sent, they
    are sent as any new job is; the same row, so the batch holds one job per key. A
    compare-and-set on ``cancelled`` and the drop's ``error_type``, the version grows by one,
    each with its event. How many."""
    where = [_JOBS.c.batch_id == batch_id, _JOBS.c.error_type == NOT_IN_MANIFEST, in_manifest]
    return _back_to_pending(session, where, "in the manifest again", not_in_manifest=False)


def revive_budget_cancelled(session: Session, batch_id: str) -> int:
    """Make ``pending`` again the jobs of ``batch_id`` its own budget cap cancelled before ever
    sending them (``cancelled``, ``error_type`` :data:`~jobs.money.BATCH_CAP_ERROR`, and
    :func:`_nothing_sent`: no attempt, no POST recorded, nothing billed), once its cap was raised
    or removed: the new cap decides them when dispatch claims them, as it does every job not
    sent yet. How many.

    A resubmit with a higher ``budget.max_usd`` said the new cap "applies to every job not yet
    sent", yet those jobs stayed cancelled and nothing was sent; the only way on was ``rerun
    --failed-only``, a new batch with a cap of its own on top of the money spent. Left as they
    are: a job sent before (its request may have been billed; ``rerun`` repeats it), one another
    cause ended (the day's cap, a deadline, ``wanbatch cancel``: a raised batch cap lifts none
    of them), one its manifest no longer has, and one a rerun rendered or is rendering
    (:func:`~jobs.store.repeats.covered_by_reruns`: sent here as well, it would be paid twice;
    one whose rerun failed or was cancelled is revived all the same). Nothing of
    them was billed, so the batch's finished totals (:class:`~jobs.models.BatchTotals`, which
    counted 0 for each) stay right. A compare-and-set on ``cancelled``, the version grows by
    one, each with its event, set-based (one statement, whatever the batch's size)."""
    batch = session.get(Batch, batch_id)
    simulated = bool(batch is not None and batch.simulated)
    covered = covered_by_reruns(session, batch_id, [JobState.CANCELLED], simulated=simulated)
    where = [
        _JOBS.c.batch_id == batch_id,
        _JOBS.c.error_type == BATCH_CAP_ERROR,
        _JOBS.c.not_in_manifest.is_(False),
        *_nothing_sent(),
    ]
    if covered:  # few: the jobs a rerun rendered or is rendering
        where.append(_JOBS.c.id.not_in(sorted(covered)))
    return _back_to_pending(session, where, "budget raised: never sent, decided again")


#: ``error_type`` of a job failed before it was sent because a local input file could not be
#: sent (:func:`worker.steps.submit`: changed, unreadable, or — before missing files paused the
#: batch — not there).
INPUT_FILE_ERROR = "input_file"


def revive_input_failed(session: Session, batch_id: str) -> int:
    """Make ``pending`` again the jobs of ``batch_id`` that failed ``input_file`` before ever
    being sent (:func:`_nothing_sent`) and that the manifest submitted now has; how many.

    Such a job's key stands for its files' bytes, so the manifest just validated having it means
    its files are there again with the recorded bytes — where the manifest now puts them: a
    project moved used to fail every unsent job for good ("media file … does not exist", its old
    path), and submitting the manifest from the new folder moved the batch but left them failed;
    only ``rerun --failed-only`` (a new batch) sent them. Left as they are: a job the manifest
    no longer has (a file rewritten since: the manifest has a job for its new bytes), one sent
    before, and one a rerun rendered or is rendering (:func:`covered_by_reruns`: it would be
    paid twice). Nothing of them was billed, so the batch's finished totals stay right."""
    batch = session.get(Batch, batch_id)
    simulated = bool(batch is not None and batch.simulated)
    covered = covered_by_reruns(session, batch_id, [JobState.FAILED], simulated=simulated)
    where = [
        _JOBS.c.batch_id == batch_id,
        _JOBS.c.error_type == INPUT_FILE_ERROR,
        _JOBS.c.not_in_manifest.is_(False),
        *_nothing_sent(),
    ]
    if covered:  # few: the jobs a rerun rendered or is rendering
        where.append(_JOBS.c.id.not_in(sorted(covered)))
    reason = "its input files are there again (manifest submitted): never sent, sent now"
    return _back_to_pending(session, where, reason, ended=JobState.FAILED)


def _back_to_pending(
    session: Session,
    where: Sequence[ColumnElement[bool]],
    reason: str,
    *,
    ended: JobState = JobState.CANCELLED,
    **values: Any,
) -> int:
    """Move the ``ended`` (``cancelled`` unless said) jobs that match ``where`` back to
    ``pending`` in one UPDATE (the compare-and-set on ``ended``; ``values`` written too), their
    end forgotten (error, finished_at, what they billed: nothing), the version one more, each
    with its event (``reason``). How many."""
    conn = session.connection()
    now = utcnow()
    moved = conn.execute(
        update(_JOBS)
        .where(_JOBS.c.state == ended, *where)
        .values(
            state=JobState.PENDING,
            version=_JOBS.c.version + 1,
            updated_at=now,
            finished_at=None,
            next_attempt_at=None,
            error=None,
            error_type=None,
            actual_usd=None,
            actual_billing_units=None,
            **values,
        )
        .returning(_JOBS.c.id, _JOBS.c.version)
    ).all()
    if moved:
        conn.execute(
            insert(_EVENTS),
            [
                dict(
                    zip(
                        _EVENT_COLUMNS,
                        (row.id, now, ended, JobState.PENDING, row.version, reason, None),
                        strict=True,
                    )
                )
                for row in moved
            ],
        )
        session.expire_all()
    return len(moved)


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
    changes = [
        change
        for job_id, key, old_input, old_sources in stored
        if (change := _media_change(job_id, old_input, old_sources, wanted[key])) is not None
    ]
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


#: Most bytes of input one chunk of :func:`add_jobs` holds: 5,000 jobs of a 1 MiB prompt each
#: were 5 GB in memory at once (and again as the rows inserted).
CHUNK_BYTES = 64 * 1024 * 1024


def _input_bytes(value: object) -> int:
    """About the bytes of a job's input: its texts' lengths (cheap: no encoding), a few for the rest."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_input_bytes(k) + _input_bytes(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(_input_bytes(v) for v in value)
    return 8


def _chunks(jobs: Iterable[NewJob], size: int, max_bytes: int = CHUNK_BYTES) -> Iterator[list[NewJob]]:
    """``jobs`` in lists of at most ``size`` jobs and about ``max_bytes`` of input (at least one
    job each): a chunk's jobs, and their rows, are all in memory at once."""
    block: list[NewJob] = []
    held = 0
    for job in jobs:
        block.append(job)
        held += _input_bytes(job.input)
        if len(block) >= size or held >= max_bytes:
            yield block
            block, held = [], 0
    if block:
        yield block


def _insert_jobs(conn: Connection, batch_id: str, block: list[NewJob]) -> int:
    """Insert a chunk of jobs, skipping keys the batch has; how many were inserted."""
    return _insert_rows(conn, _job_rows(batch_id, block))


def _insert_rows(conn: Connection, rows: list[dict[str, Any]]) -> int:
    """Insert rows of :func:`_job_rows`, skipping keys the batch has; how many were inserted."""
    if conn.dialect.name == "postgresql":
        return _insert_chunk_pg(conn, rows)
    return _insert_chunk_sqlite(conn, rows)


def _job_rows(batch_id: str, block: list[NewJob]) -> list[dict[str, Any]]:
    """A chunk of jobs as the rows inserted for them, each with a new id."""
    now = utcnow()
    return [
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
    """:func:`_place_stored_pg` for SQLite (and a few jobs on PostgreSQL, :func:`_both_spellings`):
    one UPDATE per job, by the (batch_id, job_key) index."""
    pg = conn.dialect.name == "postgresql"
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
            earlier_items=_earlier_items(pg, bindparam("b_item")),
        )
        .execution_options(preserve_rowcount=True),
        [{"b_key": job.key, "b_item": job.item_index, "b_variant": job.variant} for job in block],
    )
    return int(moved.rowcount)


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
#: The ids of the batch's jobs whose key it no longer has (:func:`_left_out`): another.
_LEFT_OUT = "wanbatch_left_out"
#: The manifest's jobs a stored job stands for (:func:`_holders`), held back: another.
_STOOD_FOR = "wanbatch_stood_for"


def _insert_chunk_sqlite(conn: Connection, rows: list[dict[str, Any]]) -> int:
    """One ``INSERT … ON CONFLICT DO NOTHING`` run over the chunk by the driver's executemany,
    each value converted by its column type's own bind processor (what SQLAlchemy would store),
    the rows inserted counted by SQLite. Built with ``insert(...).returning`` and a dictionary
    per row, SQLAlchemy compiled the parameters of every row in Python: about half of a
    million-job submit's time on SQLite (bench/RESULTS.md, manifest_scale)."""
    processors = _sqlite_processors(conn.dialect)
    params = [
        tuple(
            value if process is None else process(value)
            for process, value in zip(processors, row_values, strict=True)
        )
        for row_values in ([row[name] for name in _NEW_JOB_COLUMNS] for row in rows)
    ]
    result = conn.exec_driver_sql(_SQLITE_INSERT, params, execution_options={"preserve_rowcount": True})
    return int(result.rowcount)


#: The statement of :func:`_insert_chunk_sqlite`: the chunk's rows, a job whose key the batch
#: already has skipped (the ``(batch_id, job_key)`` unique index).
#: Its columns are :data:`_NEW_JOB_COLUMNS`, in that order (tests/unit/test_manifest_scale.py).
_SQLITE_INSERT = (
    "INSERT INTO jobs (id, batch_id, job_key, item_index, variant, endpoint, input, source_files, "
    "registry_sha256, price_table, rerun_of, state, version, attempts, download_attempts, "
    "possible_duplicate_charges, est_billing_units, est_usd, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (batch_id, job_key) DO NOTHING"
)


def _sqlite_processors(dialect: Dialect) -> list[Callable[[Any], Any] | None]:
    """Each of :data:`_NEW_JOB_COLUMNS`' bind processor on ``dialect`` (None: stored as given)."""
    return [_JOBS.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in _NEW_JOB_COLUMNS]


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
