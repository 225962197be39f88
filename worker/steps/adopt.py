"""Adopting outputs on disk: the outputs folder is a second record of what was paid for.

A job's sidecar (``NAME.json`` beside ``NAME.mp4``: :func:`worker.steps.download.sidecar_record`)
is written only once its video is stored whole, and only for a request fal rendered and billed.
So when a dispatch round claims a job to send it and finds, under the job's own name, a sidecar
that names this very job (its id) with the same input (and, for a pinned seed, that seed) beside a
video whose SHA-256 is the one it records, the database is behind the folder: a backup restored
over it (``sqlite3 .backup``, ``pg_dump``), or another copy of it that ran. The job is then
*adopted* — ``succeeded`` with the request id, seed, fal's answer, cost and output the sidecar
records, never sent again (:func:`jobs.store.mark_adopted`). Its cost counts as spent: fal billed
it.

Cheap on the hot path: one ``open`` of the sidecar's name per claimed job, which fails for every
job never stored before; the JSON is read only when there is one. With ``WANBATCH_OUTPUT_DIR=
s3://…`` it is one ``GetObject`` of the job's own sidecar key instead (a ``404`` for a job never
stored), the round's read :data:`LOOKUPS_AT_ONCE` at a time (:func:`look_up`) so that its
transaction waits about one round trip per eight jobs; a storage that cannot be asked adopts
nothing (the job is sent, as before; said once per batch). The video is hashed outside the
round's transaction, as ``reuse_outputs`` twins are
(:class:`~worker.steps.verified_outputs.VerifiedOutputs`): the job is let go until it is read,
and the next round decides on the stamp it sees then.

A sidecar whose video is gone, of another size or other bytes, or that names another job or
input, adopts nothing, and nothing is removed: the job is sent, and its download stores the new
video beside that pair (:func:`worker.steps.download._own_name`; in S3, the conditional writes
of :meth:`jobs.output_store.S3OutputStore.publish`), never over it.

Only the job's own name is looked at: a fresh database made from the same manifest gives its jobs
new ids, so new names (see the README's "Backups and restores").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from jobs import output_store, outputs, store
from jobs.errors import RequestHeldError
from jobs.models import BatchRecord, JobRecord, utcnow
from jobs.output_store import OutputReadError, open_output_store
from worker.steps.context import Runtime
from worker.steps.verified_outputs import Candidate, VerifiedOutputs

log = logging.getLogger(__name__)

#: What :func:`adopt` decided (the same words as :mod:`worker.steps.dispatch`'s verdicts).
ADOPTED, SEND, WAIT = "adopted", "send", "wait"


def adopt(
    session: Session,
    rt: Runtime,
    job: JobRecord,
    batch: BatchRecord,
    unverified: list[list[Candidate]],
    verified: VerifiedOutputs,
    looked: Looked | None = None,
) -> str:
    """Adopt the claimed ``job`` from the outputs folder (or bucket) when its own sidecar and
    video prove it was rendered (see the module's docstring): :data:`ADOPTED`, :data:`WAIT` (its
    video is to be read first, outside the transaction: named in ``unverified``; or the job moved
    meanwhile) or :data:`SEND` (nothing to adopt: the usual way on). ``verified``: the digests
    read so far (dispatch's :data:`~worker.steps.verified_outputs.VERIFIED`, which reads
    ``unverified``). ``looked``: the round's sidecar objects, read at once (:func:`look_up`)."""
    video = _own_video(rt, batch, job)
    if video is None:
        return SEND
    try:
        # one failed open (or GetObject) for a job never stored (the usual case)
        record = looked[job.id] if looked and job.id in looked else output_store.read_sidecar(video)
        if isinstance(record, OutputReadError):
            raise record
    except OutputReadError as exc:
        return _cannot_look(rt, batch, exc)
    if not isinstance(record, dict) or not _names(record, job):
        return SEND
    sha256, size = record.get("video_sha256"), record.get("video_bytes")
    if not isinstance(sha256, str) or not isinstance(size, int) or isinstance(size, bool):
        return SEND
    try:
        stamp = output_store.output_stamp(video)
    except OutputReadError:
        return _not_adopted(job, video, "cannot be read")
    if stamp is None or stamp.size != size:
        found = (
            "is gone" if stamp is None else f"is {stamp.size:,} bytes, not the {size:,} its sidecar records"
        )
        return _not_adopted(job, video, found)
    try:
        known = verified.known(video, stamp)
    except OutputReadError:
        return _not_adopted(job, video, "cannot be read")
    if known is None:  # read once the round has committed; the next round decides
        unverified.append([Candidate(video, sha256)])
        store.release_lease(session, rt.fence(job))
        return WAIT
    if known.digest != sha256:
        return _not_adopted(job, video, known.why or "does not have the SHA-256 its sidecar records")
    fields = _adopted_fields(record, job, video, sha256, size)
    try:
        moved = store.mark_adopted(session, rt.fence(job), sidecar=_sidecar_of(video), **fields)
    except RequestHeldError:  # another job of this database holds that request: not this one's
        return _not_adopted(job, video, "names a request another job of this database holds")
    if not moved:
        return WAIT
    if batch.id not in rt.adopted_said:
        rt.adopted_said.add(batch.id)
        log.warning(
            "batch %s: job(s) adopted from outputs on disk (the database was behind them: a restored "
            "backup?): each is marked succeeded with the request, seed and cost its sidecar records, "
            "never sent again; `wanbatch status %s` counts them",
            batch.name,
            batch.name,
            extra={"event": "dispatch.adopted_batch", "batch_id": batch.id},
        )
    log.info(
        "job %s: adopted from %s (request %s); not sent",
        job.id,
        _name(video),
        fields.get("request_id"),
        extra={"event": "dispatch.adopted", "job_id": job.id, "batch_id": job.batch_id},
    )
    return ADOPTED


#: What :func:`look_up` read of each job's own sidecar object: the JSON object, None (no such
#: object, or not a sidecar) or why the storage could not be asked.
Looked = dict[str, dict[str, Any] | OutputReadError | None]

#: Sidecar objects read at once (boto3's connection pool holds 10 by default).
LOOKUPS_AT_ONCE = 8

#: Seconds a dispatch round waits for its sidecar objects: the round holds the database's
#: dispatch lock (SQLite: its write lock) meanwhile, so a storage that is slow to answer must not
#: hold every other write of the process for its client's minute-long timeouts. A job whose
#: sidecar was not read by then is sent, as when the storage cannot be asked (said once a batch).
LOOKUP_DEADLINE = 5.0

#: Seconds no sidecar is looked for after a round's reads missed :data:`LOOKUP_DEADLINE`: the
#: rounds meanwhile send their jobs without waiting (else every round would wait the deadline
#: again while the storage does not answer). Then the next round asks again.
LOOKUP_PAUSE = 60.0


class _Lookups:
    """The process's sidecar reads: one pool of :data:`LOOKUPS_AT_ONCE` threads for every round
    (a pool a round, left to reads that did not answer, piled up eight threads a round), and
    until when none is asked (:data:`LOOKUP_PAUSE`). Reads use the storage's quick client (one
    try within a few seconds: :func:`jobs.output_store.read_sidecar`), so a thread a read that
    does not answer holds comes back soon."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.paused_until = 0.0

    def executor(self) -> ThreadPoolExecutor:
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(LOOKUPS_AT_ONCE, thread_name_prefix="wanbatch-sidecars")
            return self.pool


LOOKUPS = _Lookups()


def look_up(rt: Runtime, jobs: Sequence[JobRecord], batch_of: Callable[[str], BatchRecord]) -> Looked:
    """With outputs in S3: the own sidecar object of each of the round's claimed ``jobs``, read
    :data:`LOOKUPS_AT_ONCE` at a time (one ``GetObject`` per job, a ``404`` for a job never
    stored), so that a round's transaction waits for about one round trip per eight jobs, not one
    per job. Empty for a local folder (:func:`adopt` opens each file itself: one failed ``open``)."""
    if rt.settings.output_url is None or not jobs:
        return {}
    where = {job.id: _own_video(rt, batch_of(job.batch_id), job) for job in jobs}

    def read(job_id: str) -> dict[str, Any] | OutputReadError | None:
        video = where[job_id]
        if video is None:
            return None
        try:
            return output_store.read_sidecar(video, quick=True)
        except OutputReadError as exc:
            return exc

    if time.monotonic() < LOOKUPS.paused_until:
        paused = OutputReadError(
            f"it did not answer within {LOOKUP_DEADLINE:g} s: not asked again for {LOOKUP_PAUSE:g} s"
        )
        return {job_id: paused for job_id in where}
    pool = LOOKUPS.executor()
    pending = {job_id: pool.submit(read, job_id) for job_id in where}
    _, late = wait(pending.values(), timeout=LOOKUP_DEADLINE)
    if late:
        for future in late:
            future.cancel()  # not started yet: never asked; a read under way ends by itself
        LOOKUPS.paused_until = time.monotonic() + LOOKUP_PAUSE
    missed = OutputReadError(f"no answer from the storage within {LOOKUP_DEADLINE:g} s")
    return {job_id: missed if future in late else future.result() for job_id, future in pending.items()}


def _own_video(rt: Runtime, batch: BatchRecord, job: JobRecord) -> str | None:
    """Where the job's own video is stored when it is: under its own name in the batch's local
    folder, or its own key in the bucket (an ``s3://`` URI); None when the folder cannot be placed."""
    if rt.settings.output_url is not None:
        return open_output_store(rt.settings).location(store.folder_name(batch), job.item_index, job.id)
    folder = _folder(rt, batch)
    if folder is None:
        return None
    return str(folder / f"{outputs.job_stem(job.item_index, job.id)}{outputs.VIDEO_SUFFIX}")


def _sidecar_of(video: str) -> str:
    """The sidecar's path (or URI) beside ``video``, whose name ends in ``.mp4``."""
    return video.removesuffix(outputs.VIDEO_SUFFIX) + outputs.SIDECAR_SUFFIX


def _name(video: str) -> str:
    return video.rsplit("/", 1)[-1]


def _cannot_look(rt: Runtime, batch: BatchRecord, exc: OutputReadError) -> str:
    """The storage could not say whether the job's sidecar is there: the job is sent as it was
    before adoption existed (said once per batch)."""
    if batch.id not in rt.sidecars_unread:
        rt.sidecars_unread.add(batch.id)
        log.warning(
            "batch %s: could not look for its jobs' own sidecars in the output storage (%s): jobs are "
            "sent without (one a restored backup already paid for would be paid again)",
            batch.name,
            exc,
            extra={"event": "dispatch.sidecar_unread", "batch_id": batch.id},
        )
    return SEND


def _folder(rt: Runtime, batch: BatchRecord) -> Path | None:
    """The batch's local output folder, found once per runtime; None for a folder that cannot
    be placed (the download step says why, when it comes to store there)."""
    if batch.id in rt.output_folders:
        return rt.output_folders[batch.id]
    folder: Path | None = None
    try:
        folder = outputs.batch_dir(rt.settings.output_dir, store.folder_name(batch))
    except outputs.OutputWriteError:
        folder = None
    if len(rt.output_folders) > 1024:
        rt.output_folders.clear()
    rt.output_folders[batch.id] = folder
    return folder


def _names(record: dict[str, Any], job: JobRecord) -> bool:
    """Whether the sidecar ``record`` is of this job as it stands: its id, the input the job's
    submitted input is made from (``resolved_input``: the image references sent may differ from
    one attempt to the next, uploads being made again once fal's expire) and, for a pinned seed,
    that seed as fal returned it."""
    if record.get("job_id") != job.id or record.get("resolved_input") != job.input:
        return False
    pinned = job.input.get("seed")
    return pinned is None or record.get("seed") == pinned


def _not_adopted(job: JobRecord, video: str, why: str) -> str:
    log.warning(
        "job %s: its sidecar %s names it, but the video %s: not adopted, sent again (the pair is left "
        "as it is; the new video is stored beside it)",
        job.id,
        _name(_sidecar_of(video)),
        why,
        extra={"event": "dispatch.not_adopted", "job_id": job.id, "batch_id": job.batch_id},
    )
    return SEND


def _adopted_fields(
    record: dict[str, Any], job: JobRecord, path: str, sha256: str, size: int
) -> dict[str, Any]:
    """What the job records once adopted, from its sidecar: each value only when of the right
    kind (a field the sidecar lacks, or holds something else in, is left as it is)."""
    fields: dict[str, Any] = {"output_path": path, "output_sha256": sha256, "output_bytes": size}
    for name, longest in (
        ("request_id", 255),
        ("gateway_request_id", 255),
        ("actual_prompt", None),
        ("media_mismatch", None),
    ):
        value = record.get(name)
        if isinstance(value, str) and (longest is None or len(value) <= longest):
            fields[name] = value
    for name in ("provider_output", "provider_metrics", "media"):
        if isinstance(record.get(name), dict):
            fields[name] = record[name]
    if isinstance(record.get("input"), dict):
        fields["submitted_input"] = record["input"]
    seed = record.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        fields["seed"] = seed
    for name in ("submitted_at", "completed_at"):
        moment = _moment(record.get(name))
        if moment is not None:
            fields[name] = moment
    fields.setdefault("completed_at", utcnow())
    # What fal billed, over every attempt the sidecar's database knew of: at least what this one
    # recorded for the job's earlier attempts (the sidecar's database went on from there).
    known_usd = job.actual_usd or Decimal(0)
    known_units = job.actual_billing_units or Decimal(0)
    usd = _amount(record.get("cost_usd"))
    units = _amount(record.get("billing_units"))
    fields["actual_usd"] = max(usd if usd is not None else job.est_usd, known_usd)
    fields["actual_billing_units"] = max(units if units is not None else job.est_billing_units, known_units)
    return fields


def _moment(value: Any) -> datetime | None:
    """An ISO 8601 time of the sidecar as an aware datetime (a naive one is UTC), else None."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _amount(value: Any) -> Decimal | None:
    """A non-negative, finite amount the sidecar wrote as text, else None."""
    if not isinstance(value, str):
        return None
    try:
        amount = Decimal(value)
    except InvalidOperation:
        return None
    return amount if amount.is_finite() and amount >= 0 else None
