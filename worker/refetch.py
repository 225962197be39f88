"""``wanbatch refetch BATCH``: fetch a batch's paid videos again from fal, never paying again.

A succeeded job's video deleted or replaced on disk (``rm -rf outputs/NAME``, a disk restored
without its videos) was lost as far as wanbatch went: the download step only handles jobs in
``downloading``, and ``rerun`` submits again, billed. Yet fal's CDN keeps serving the video at
the URL its result named (``provider_output.video.url``) until the file's lifecycle ends
(https://fal.ai/docs/model-apis/data-retention: generated media stay on the CDN as public URLs
until their expiration, which the account or the request's ``X-Fal-Object-Lifecycle-Preference``
sets; "expired files are permanently deleted and cannot be recovered"), and a GET costs nothing.

What a refetch does, per succeeded job whose local video :func:`jobs.outputs_on_disk.look`
finds missing or changed (``verify``: hashed, not only its size looked at):

* one GET of the recorded URL with exactly the guards of a first download
  (:func:`worker.fal.storage.download`: the download policy's hosts, the announced size, the
  size limit, a video container, ``WANBATCH_DOWNLOAD_TIMEOUT``), into a hidden file beside the
  video's place;
* its SHA-256 and size against those recorded when the job first stored it. The same bytes are
  the very video that was probed then, so its recorded ``media`` stands and no probe is needed:
  it goes under its recorded name (a changed file there is kept beside it, renamed
  ``<stem>.changed-<time>.mp4``, never overwritten; the recorded video put back there meanwhile,
  by another ``refetch`` or a restored backup, stays as it is) with the sidecar its first
  download wrote (:class:`Filed`: a video taken from a twin is the twin's, described as the
  twin's), and nothing in the database changes but, for a moved project, the path
  (:func:`jobs.moved_outputs.record_moves`);
* other bytes than recorded: both facts are kept. The download goes beside the video's place as
  ``<stem>.refetched-<sha256 prefix>.mp4``, its sidecar naming both digests; the job's record is
  unchanged (its SHA-256 still names the video it paid for); the outcome says so.
* fal no longer serving it (401/403/404/410, as a first download reads them): said per job with
  the advice (``rerun`` pays again), nothing changed. Anything else (unreachable, cut short, a
  full disk) is said too, nothing changed, and running the command again tries again.

Up to ``WANBATCH_EMBEDDED_CONCURRENCY`` videos are fetched at once, each exactly as above (jobs
that share one video's place, twins reusing one file, one after another, in order): the outcomes,
in the look's order, are a sequential refetch's. ``progress(done, total)`` is told each video
done. A refetch and a ``run`` of the same batch are one at a time (:mod:`jobs.refetch_lock`):
refused, in one line, while another process works on the batch, and claimed while it fetches.

Never a submit, never a result call: nothing here talks to fal's queue API. A simulated batch's
videos were served by its ``--simulate`` run's simulator, gone with it; S3 output storage is not
handled (its objects are not looked at by ``status`` either; ``diff --verify`` checks them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx

from jobs import db, moved_outputs, outputs, refetch_lock, store
from jobs.errors import FinalProviderError, ProviderError, UsageError
from jobs.models import JobView
from jobs.output_store import output_sha256
from jobs.outputs import OutputWriteError
from jobs.outputs_on_disk import OutputsOnDisk, look
from jobs.printable import shell_ref
from jobs.settings import Settings
from worker.fal.results import parse_result
from worker.fal.storage import download as download_file

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from jobs.models import Batch
    from worker.fal.storage import SharedDownloadClient

log = logging.getLogger(__name__)

Outcome = Literal["fetched", "different", "gone", "failed"]
#: The HTTP answers by which fal's CDN says a file is no longer served (its lifecycle ended):
#: what a first download fails at once on (``worker.fal.storage._download_error``).
NO_LONGER_SERVED = frozenset({401, 403, 404, 410})
#: How many job ids :meth:`RefetchReport.lines` names per outcome before "and N more".
NAMED = 10


@dataclass(frozen=True, slots=True)
class Filed:
    """Whose record a refetched video's sidecar is, as the first download that stored the video
    wrote it (:func:`worker.steps.download._store_video`): the job's own; for a job that took
    its twin's output (``reuse_outputs``: it records the twin's very file), the twin's, filed
    under the twin's batch (the file and its sidecar are the twin's: a first download of the
    reusing job never wrote one); for a rerun's job that took the paid video its original left
    staged, under its own name, :func:`worker.steps.download.taken_sidecar` of ``maker``."""

    job: JobView
    folder_name: str
    parent: str | None
    #: The job fal made the video for, when the job stored a video it took (staged) under its
    #: own name: the sidecar describes its request.
    maker: JobView | None = None


@dataclass(frozen=True, slots=True)
class Refetched:
    """What became of one job's video."""

    job_id: str
    outcome: Outcome
    #: Where the video is now (``fetched``), or where fal's other bytes were kept (``different``).
    path: str | None = None
    #: Why it was not fetched (``gone``, ``failed``), in words.
    detail: str | None = None
    #: The SHA-256 the job records, and that of the bytes fal served (``different``: they differ).
    recorded_sha256: str | None = None
    served_sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "outcome": self.outcome,
            "path": self.path,
            "detail": self.detail,
            "recorded_sha256": self.recorded_sha256,
            "served_sha256": self.served_sha256,
        }


@dataclass
class RefetchReport:
    """``refetch``'s outcome: what was looked at, and each job's video fetched or not."""

    batch: str
    name: str
    ref: str
    looked: OutputsOnDisk
    jobs: list[Refetched] = field(default_factory=list)

    def counts(self) -> Counter[str]:
        return Counter(job.outcome for job in self.jobs)

    @property
    def complete(self) -> bool:
        """Every video looked for is back as recorded (or none was missing)."""
        return all(job.outcome == "fetched" for job in self.jobs)

    def as_dict(self) -> dict[str, Any]:
        """``refetch --json``'s object."""
        counts = self.counts()
        return {
            "ok": self.complete,
            "batch": self.batch,
            "name": self.name,
            "outputs_on_disk": self.looked.as_dict(),
            **{outcome: counts.get(outcome, 0) for outcome in ("fetched", "different", "gone", "failed")},
            "jobs": [job.as_dict() for job in self.jobs],
        }

    def lines(self) -> list[str]:
        """What ``refetch`` says, one line per outcome (the jobs named, the first few)."""
        looked = self.looked
        how = "hashed" if looked.verified else "looked at"
        if not self.jobs:
            return [
                f"{self.name}: all {looked.checked} video(s) {how} are on disk as stored; nothing to fetch"
            ]
        counts = self.counts()
        said = [
            f"{self.name}: {looked.problems} of {looked.checked} video(s) {how} were not on disk as stored"
        ]

        def jobs(outcome: Outcome) -> str:
            ids = [job.job_id for job in self.jobs if job.outcome == outcome]
            more = f" and {len(ids) - NAMED} more" if len(ids) > NAMED else ""
            return ", ".join(ids[:NAMED]) + more

        if counts["fetched"]:
            said.append(f"fetched again from fal, the recorded bytes (SHA-256 checked): {counts['fetched']}")
        for job in self.jobs:  # each one: where the other bytes are
            if job.outcome == "different":
                said.append(
                    f"job {job.job_id}: fal served other bytes than recorded (SHA-256 {job.served_sha256} "
                    f"instead of {job.recorded_sha256}): kept as {job.path}; the job's record is unchanged"
                )
        if counts["gone"]:
            reasons = sorted({job.detail or "" for job in self.jobs if job.outcome == "gone"})
            said.append(
                f"no longer served by fal ({'; '.join(reasons)}): {counts['gone']} ({jobs('gone')}); "
                f"nothing changed: only `wanbatch rerun {self.ref}` makes them again, and pays again"
            )
        for job in self.jobs:
            if job.outcome == "failed":
                said.append(f"job {job.job_id}: not fetched: {job.detail}; nothing changed")
        if counts["failed"]:
            said.append(f"`wanbatch refetch {self.ref}` tries again")
        return said


def refetch_batch(
    settings: Settings,
    ref: str,
    *,
    verify: bool = False,
    announce: Callable[[int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RefetchReport:
    """Fetch again from fal the videos of batch ``ref`` (id, prefix or name) that are not on
    disk as stored (see the module docstring). ``announce(n)`` is told how many before the
    first download (it says so on stderr), ``progress(done, n)`` after each video. Refused (a
    :class:`~jobs.errors.UsageError`, nothing fetched) while another process works on the batch
    (:mod:`jobs.refetch_lock`). Reads in one short transaction, claims the batch in another,
    downloads with none open, records a moved project's new paths in one more."""
    engine = db.open_engine(settings)
    root = moved_outputs.local_root(settings.output_dir, settings.output_url)
    with db.read_scope(engine) as session:
        batch = store.get_batch(session, ref)
        refetch_lock.refuse_busy(session, batch, shell_ref(batch.name, batch.id))
        looked = look(session, batch.id, root, verify=verify)
        targets = [
            job
            for chunk in _chunks(looked.job_ids(), 500)
            for job in store.job_snapshots(session, chunk).values()
        ]
        report = RefetchReport(batch.id, batch.name, shell_ref(batch.name, batch.id), looked)
        simulated = batch.simulated
        filed = _filed(session, batch, targets)
    if not targets:
        return report
    if settings.output_url:  # pragma: no cover - look() never lists an S3 object
        raise UsageError("refetch stores into a local output folder; WANBATCH_OUTPUT_DIR is S3")
    # Claimed before a word is said: a refusal is the one line (exit 2), nothing fetched.
    claim = None if simulated else refetch_lock.claim(engine, batch, report.ref)
    try:
        if announce is not None:
            announce(len(targets))
        order = {job_id: i for i, job_id in enumerate(looked.job_ids())}
        targets.sort(key=lambda job: order.get(job.id, 0))
        if simulated:  # its simulator ended with the `--simulate` run that served them
            why = "a simulation's videos were served by its `--simulate` run's simulator, which ended with it"
            report.jobs = [
                Refetched(job.id, "gone", detail=why, recorded_sha256=job.output_sha256) for job in targets
            ]
            return report
        report.jobs = _fetch_all(
            settings,
            targets,
            root,
            filed,
            progress=progress,
            renew=lambda: refetch_lock.renew(engine, claim, report.batch),
        )
    finally:
        refetch_lock.release(engine, claim)
    moves = [
        (job.id, job.output_path or "", done.path)
        for job, done in zip(targets, report.jobs, strict=True)
        if done.outcome == "fetched" and done.path is not None and done.path != job.output_path
    ]
    if moves and not moved_outputs.record_moves(engine, moves):  # pragma: no cover - a read-only database
        log.warning("the videos fetched again are in place, but their new paths could not be recorded")
    return report


def _fetch_all(
    settings: Settings,
    targets: Sequence[JobView],
    root: Path | None,
    filed: dict[str, Filed],
    *,
    progress: Callable[[int, int], None] | None,
    renew: Callable[[], None],
) -> list[Refetched]:
    """Each target's :class:`Refetched`, in ``targets``' order: up to
    ``WANBATCH_EMBEDDED_CONCURRENCY`` places fetched at once (:func:`_refetch_one` each, with
    the very client guards a first download uses); the targets of one place (twins that record
    one file) one after another, in order, as a sequential refetch met them — at once, they
    shared one staging file. ``renew`` is called every :data:`jobs.refetch_lock.RENEW_SECONDS`
    while downloads go on; ``progress(done, total)`` after each video, in order of ``done``."""
    from worker.fal.storage import SharedDownloadClient
    from worker.steps.download import download_policy

    places: dict[str, list[int]] = {}
    for i, job in enumerate(targets):
        dest = _destination(job.output_path or "", root)
        places.setdefault(str(dest) if dest is not None else f"\0{job.id}", []).append(i)
    outcomes: list[Refetched | None] = [None] * len(targets)
    counted = threading.Lock()
    done = 0

    def fetch_place(indices: list[int]) -> None:
        nonlocal done
        for i in indices:
            job = targets[i]
            outcomes[i] = _refetch_one(settings, shared, job, root, filed[job.id])
            with counted:
                done += 1
                if progress is not None:
                    progress(done, len(targets))

    shared = SharedDownloadClient(download_policy(settings), _timeout(settings))
    pool = ThreadPoolExecutor(
        min(settings.embedded_concurrency, len(places)), thread_name_prefix="wanbatch-refetch"
    )
    try:
        pending = {pool.submit(fetch_place, indices) for indices in places.values()}
        while pending:
            finished, pending = wait(pending, timeout=refetch_lock.RENEW_SECONDS)
            for future in finished:
                future.result()  # an unexpected error of a thread is this call's
            if pending:
                renew()
    finally:
        # Stopped (Ctrl-C, an error): the videos not begun are not; the client closed, those
        # under way end now (their staging files removed, as a failed first download's).
        pool.shutdown(wait=False, cancel_futures=True)
        shared.close()
    return [outcome for outcome in outcomes if outcome is not None]


def _filed(session: Session, batch: Batch, targets: Sequence[JobView]) -> dict[str, Filed]:
    """Each target's :class:`Filed`: whose sidecar its video gets back, read with the targets."""
    own = (store.folder_name(batch), batch.parent_batch_id)
    makers = store.job_snapshots(session, sorted({job.reused_from for job in targets if job.reused_from}))
    batches: dict[str, tuple[str, str | None]] = {batch.id: own}
    filed: dict[str, Filed] = {}
    for job in targets:
        maker = makers.get(job.reused_from) if job.reused_from is not None else None
        if maker is None:  # its own video (or its twin's job is no longer stored: its own record)
            filed[job.id] = Filed(job, *own)
        elif _same_file(job.output_path, maker.output_path):  # reuse_outputs: the twin's very file
            if maker.batch_id not in batches:
                theirs = store.get_batch(session, maker.batch_id)
                batches[maker.batch_id] = (store.folder_name(theirs), theirs.parent_batch_id)
            filed[job.id] = Filed(maker, *batches[maker.batch_id])
        else:  # a staged video taken, stored under the job's own name
            filed[job.id] = Filed(job, *own, maker=maker)
    return filed


def _same_file(path: str | None, other: str | None) -> bool:
    """Whether two recorded paths name one stored video: the same ``<batch folder>/<file>``
    (one of them may still name the place the project was moved from)."""
    if path is None or other is None:
        return False
    return Path(path).parts[-2:] == Path(other).parts[-2:]


def _chunks(ids: list[str], size: int) -> list[list[str]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def _timeout(settings: Settings) -> httpx.Timeout:
    return httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)


def _refetch_one(
    settings: Settings,
    shared: SharedDownloadClient,
    job: JobView,
    root: Path | None,
    filed: Filed,
) -> Refetched:
    """One job's video: downloaded, checked against its record, placed (see the module docstring)."""
    recorded_sha = job.output_sha256
    failed = _failed_of(job.id, recorded_sha)
    try:
        video = parse_result(job.provider_output)
    except ProviderError as exc:
        return failed(f"its stored result names no video to fetch ({exc})")
    dest = _destination(job.output_path or "", root)
    if dest is None:
        return failed(f"{job.output_path} is not inside the output folder {root}: not written there")
    staging = dest.with_name(f".{dest.name}.refetch{outputs.PARTIAL_SUFFIX}")
    try:
        result = download_file(
            video.url,
            staging,
            expected_size=video.file_size,
            max_bytes=settings.download_max_bytes,
            client=shared.get(),
            policy=shared.policy,
            timeout=shared.timeout,
            total_timeout=settings.download_timeout,
            expect_video=True,
            sync_dir=False,
        )
    except FinalProviderError as exc:
        if exc.status_code in NO_LONGER_SERVED:
            return Refetched(job.id, "gone", detail=f"HTTP {exc.status_code}", recorded_sha256=recorded_sha)
        return failed(str(exc))
    except (ProviderError, OutputWriteError) as exc:
        return failed(str(exc))
    try:
        if result.sha256 == recorded_sha and (job.output_bytes is None or result.size == job.output_bytes):
            if _is_recorded(dest, result.sha256, result.size):  # put back meanwhile: it stays
                staging.unlink()
                if not outputs.sidecar_path(dest).exists():
                    _write_sidecar(filed, dest, root, result.sha256, result.size, recorded_sha)
            else:
                _keep_changed(dest)
                staging.replace(dest)
                _write_sidecar(filed, dest, root, result.sha256, result.size, recorded_sha)
            outputs.fsync_dir(dest.parent)
            return Refetched(
                job.id, "fetched", path=str(dest), recorded_sha256=recorded_sha, served_sha256=result.sha256
            )
        other = dest.with_name(f"{dest.stem}.refetched-{result.sha256[:12]}{dest.suffix}")
        staging.replace(other)
        _write_sidecar(filed, other, root, result.sha256, result.size, recorded_sha)
        outputs.fsync_dir(dest.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            staging.unlink()
        return failed(f"could not store it in {dest.parent}: {exc.strerror or exc}")
    log.warning(
        "job %s: fal served other bytes than recorded (SHA-256 %s, recorded %s): kept as %s",
        job.id,
        result.sha256,
        recorded_sha,
        other,
        extra={"event": "refetch.different_bytes", "job_id": job.id},
    )
    return Refetched(
        job.id, "different", path=str(other), recorded_sha256=recorded_sha, served_sha256=result.sha256
    )


def _failed_of(job_id: str, recorded_sha: str | None) -> Callable[[str], Refetched]:
    """A ``failed`` outcome of ``job_id`` for a reason."""

    def failed(detail: str) -> Refetched:
        return Refetched(job_id, "failed", detail=detail, recorded_sha256=recorded_sha)

    return failed


def _destination(recorded: str, root: Path | None) -> Path | None:
    """Where the video recorded at ``recorded`` goes back: there, or, for a moved project (the
    path lies outside the current output folder ``root``), the same ``<batch folder>/<file>``
    under ``root`` (:func:`jobs.moved_outputs.candidate`). None when that place's folder leads
    out of the output folder (a link): nothing is written through it."""
    moved = moved_outputs.candidate(recorded, root)
    dest = moved if moved is not None else Path(recorded)
    if root is None:
        return dest
    try:
        inside = root in dest.parent.resolve().parents or dest.parent.resolve() == root
    except (OSError, RuntimeError, ValueError):
        return None
    return dest if inside else None


def _is_recorded(dest: Path, sha256: str, size: int) -> bool:
    """Whether ``dest`` is a regular file holding the recorded video (``size`` bytes of
    ``sha256``): another ``refetch`` of the batch, or the user, put it back after the look. One
    ``lstat``, and a hash only at the recorded size."""
    try:
        info = os.lstat(dest)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size != size:
        return False
    return output_sha256(str(dest)) == sha256


def _keep_changed(dest: Path) -> None:
    """A file at ``dest`` that is not the recorded video (another size, other bytes): renamed
    ``<stem>.changed-<unix time>.mp4`` beside it, never overwritten; it may be the user's."""
    if not os.path.lexists(dest):
        return
    kept = dest.with_name(f"{dest.stem}.changed-{int(time.time())}{dest.suffix}")
    dest.replace(kept)
    log.warning(
        "%s was not the recorded video: kept as %s",
        dest,
        kept.name,
        extra={"event": "refetch.changed_kept"},
    )


def _write_sidecar(
    filed: Filed,
    video: Path,
    root: Path | None,
    sha256: str,
    size: int,
    recorded_sha: str | None,
) -> None:
    """The sidecar of a video fetched again: what a first download writes
    (:func:`worker.steps.download.sidecar_record`, or :func:`~worker.steps.download.taken_sidecar`
    for a staged video taken), from the record of :class:`Filed`'s job, and when it was fetched
    again; for other bytes, the SHA-256 the job records beside the one served."""
    from worker.steps.download import sidecar_record, taken_sidecar

    job = filed.job
    shown = outputs.relative_to_output(video, root) if root is not None else str(video)
    if filed.maker is not None:
        record = taken_sidecar(filed.maker, job, filed.folder_name, shown, sha256, size)
    else:
        cost = {"actual_billing_units": job.actual_billing_units, "actual_usd": job.actual_usd}
        record = sidecar_record(job, filed.folder_name, shown, sha256, size, cost)
    record.update(
        rerun_of=job.rerun_of, parent_batch=filed.parent, media=job.media, media_mismatch=job.media_mismatch
    )
    record["refetched_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if sha256 != recorded_sha:
        record["recorded_sha256"] = recorded_sha
        record["note"] = "fal served other bytes than the job recorded: not the job's output"
    outputs.write_json_atomic(outputs.sidecar_path(video), record)
