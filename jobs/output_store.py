"""Where finished outputs live: a local folder, or S3-compatible object storage.

``WANBATCH_OUTPUT_DIR`` is a folder (the default, ``./outputs``) or ``s3://bucket/prefix``.
:func:`open_output_store` returns the matching :class:`OutputStore`; everything that writes,
checks, reads back or links to an output goes through it, so the download step, ``run``'s
start-up check, ``doctor``, the exports and the dashboard agree on one definition.

**Same guarantees in both.** A video is first written whole to a local file (the output folder
itself, or for S3 the staging folder ``WANBATCH_OUTPUT_STAGING_DIR``), hashed (SHA-256) while
it streams in and probed, exactly as before. Then :meth:`OutputStore.publish` makes it the
output: locally the file is already in place and its sidecar JSON is written atomically beside
it; for S3 the video is sent as *one* ``PutObject`` carrying ``ChecksumSHA256`` (S3 recomputes
it and refuses the object when the bytes differ), or, past :data:`MULTIPART_THRESHOLD`, as a
multipart upload with a SHA-256 per part that is aborted on any failure. Either way S3 makes
the object visible under its key only once it is complete, so **no partial object ever exists
under a final key**. The sidecar follows the same way. The staged file is removed only after
the job's success is stored (:meth:`OutputStore.finish`); an upload that fails keeps it, and the
next try uploads it again without asking fal for anything (a paid output is never regenerated).

**Never over another request's output.** Every S3 write is conditional (``If-None-Match: *``):
an object under the key is never replaced, unless its sidecar names this very request. Another
request's pair stays, and this one goes beside it as ``<stem>.<request id>.mp4``/``.json``, as a
local folder does (``worker.steps.download._own_name``). :func:`read_sidecar` reads a stored
video's sidecar wherever it is, for adopting a job a restored database forgot it paid for
(``worker.steps.adopt``).

**Keys** are ``<prefix>/<batch slug>/<item index>-<job id prefix>.mp4`` (and ``.json``): only the
configured prefix and names we made (``jobs.outputs.slug`` and our ids), never a name the
provider supplied. ``job.output_path`` records ``s3://bucket/key``; exports show that URI. S3
takes keys of at most 1024 bytes of UTF-8: the settings refuse a prefix the longest key would
not fit under (:func:`jobs.output_location.prefix_room`), ``submit``/``run``/``rerun`` the batch
whose own keys would not (:meth:`S3OutputStore.check_names`), and a storage that still answers
``KeyTooLongError`` pauses the batch at once (``OutputUploadError.too_long``).

**Credentials** are boto3's own business (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, instance roles, ``AWS_ENDPOINT_URL`` for MinIO and other S3-compatible
services, ``AWS_REGION``): wanbatch never reads, stores or prints them. Error messages name the
bucket, key and endpoint only.

boto3 is imported on first use, so commands that never touch S3 do not pay for it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import secrets
import shutil
import stat
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import unquote, urlsplit, urlunsplit

from jobs import outputs
from jobs.errors import StateConflict, WanbatchError
from jobs.fs import (
    CURRENT_FOLDER_GONE,
    creatable,
    current_folder_gone_fix,
    file_kind,
    file_mode,
    free_bytes_in,
    is_missing,
    lost_with_current_folder,
    name_problem,
    os_reason,
    shown_path,
    what_is,
)
from jobs.http_environment import is_loopback_host, proxy_variables
from jobs.output_location import (
    CONTROL_CHARS,
    S3_KEY_MAX_BYTES,
    is_s3_url,
    key_bytes,
    parse_s3_url,
    split_uri,
)
from jobs.outputs import OutputWriteError
from jobs.url_secrets import MASK, mask_urls

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from jobs.settings import DownloadSettings

log = logging.getLogger(__name__)

#: Above this size a video goes up as a multipart upload (one ``PutObject`` takes up to 5 GiB;
#: parts keep a retry from resending everything). Wan videos are a few MB: one request.
MULTIPART_THRESHOLD = 512 * 1024**2
#: Size of each part of a multipart upload (S3: at least 5 MiB, at most 10,000 parts).
MULTIPART_PART_SIZE = 64 * 1024**2
#: Bytes the writability probe sends (a small object: a full bucket quota still says so).
PROBE_BYTES = 1024
#: Bytes the output-folder probe writes and syncs: enough that a full disk says so.
OUTPUT_PROBE_BYTES = 64 * 1024


class OutputUploadError(OutputWriteError):
    """An output could not be uploaded to object storage (unreachable, refused, bucket missing).

    Unlike a full local disk this may heal (the network, a bucket created, a policy fixed), and
    the video is already paid for and staged locally: the download step tries the upload again
    like a failed download, keeping the staged file, and never asks fal again.

    ``too_long``: the storage refused the key itself as too long (``KeyTooLongError``), which no
    waiting heals: only a shorter prefix (``WANBATCH_OUTPUT_DIR``) or batch name does.
    """

    def __init__(self, message: str, *, too_long: bool = False) -> None:
        super().__init__(message)
        self.too_long = too_long


def _upload_error(where: str, exc: BaseException, bucket: str) -> OutputUploadError:
    """The :class:`OutputUploadError` of an upload to ``where`` that failed with ``exc``."""
    return OutputUploadError(
        f"upload to {where} failed: {_reason(exc, bucket)}", too_long=_code(exc) == "KeyTooLongError"
    )


class OutputReadError(WanbatchError):
    """A stored output could not be read back (a missing object, unreachable storage, or bytes
    whose SHA-256 is not the recorded one): an export that needs the video stops with the reason.

    ``refused``: the storage answered and refused us (access denied, credentials refused or
    missing), which waiting does not heal; otherwise the failure may pass (network, timeout)."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def _object(uri: str) -> tuple[str, str]:
    """:func:`split_uri` for a recorded ``output_path``: :class:`OutputReadError` when malformed."""
    try:
        return split_uri(uri)
    except ValueError as exc:
        raise OutputReadError(str(exc)) from None


def endpoint_url() -> str | None:
    """The S3 endpoint boto3 will use when one is configured (``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL``), without any user:password part, for messages; None for AWS itself."""
    raw = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not raw:
        return None
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:  # "[::1", ":99999", ":abc": the settings refuse these for S3 outputs
        return "AWS_ENDPOINT_URL (not a valid URL)"
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets, or its last group reads as a port
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# --------------------------------------------------------------------------- the interface


class OutputStore(ABC):
    """Where outputs go. One per configuration; cheap to open (the S3 client is shared).

    The download step calls :meth:`video_dest` (where to download), :meth:`location` (what the
    job's ``output_path`` will be), :meth:`publish` (make it the output), :meth:`finish` (after
    the success is stored) or :meth:`discard` (the output does not count). Everyone else uses
    :meth:`check_writable`, :meth:`describe`, :meth:`presigned_url`, :meth:`local_file`,
    :meth:`size` and :meth:`fetch`, which accept any recorded ``output_path`` (a local path or
    an ``s3://`` URI, whatever the current configuration).
    """

    #: True when outputs live in object storage (``publish`` uploads; a staged copy exists).
    is_remote: ClassVar[bool] = False

    @abstractmethod
    def describe(self) -> str:
        """Where outputs go, for people: the absolute folder, or ``s3://bucket/prefix``."""

    @abstractmethod
    def check_writable(self, *, create: bool = True) -> Path | None:
        """Prove an output can be stored before anything is paid for: write and remove a small
        probe. :class:`OutputWriteError` with a one-line reason (naming ``WANBATCH_OUTPUT_DIR``)
        otherwise. Used by ``run``/``rerun`` at start-up and by ``doctor``.

        A local folder (the output folder, or S3's staging folder) that is not there yet is
        created, unless ``create`` is false (``doctor``, which changes nothing): then it is only
        checked that it could be, and the nearest existing folder it would be created under is
        returned. None: the folder is there and took the probe."""

    def free_bytes(self) -> int | None:
        """Bytes free where the outputs are kept; None when nothing finite limits them (a bucket)."""
        return None

    #: The setting that names :meth:`local_root`, for messages.
    root_setting: ClassVar[str] = "WANBATCH_OUTPUT_DIR"

    def check_names(self, batch_name: str) -> None:
        """Prove the outputs of the batch named ``batch_name`` can be named here before any of
        it is sent: :class:`OutputWriteError` with a one-line reason otherwise. Its slug is made
        to fit a file system (:func:`jobs.outputs.slug`), but the batch's local folder (the
        output folder's, or the staging folder's for S3) must also be a name this session can
        record and every session finds again (:func:`jobs.fs.name_problem`: ``Crème`` under
        ``LC_ALL=C`` or a latin-1 locale is not): else the video would be paid for, then never
        recorded."""
        folder = self.local_root() / outputs.slug(batch_name)
        problem = name_problem(folder)
        if problem is not None:
            shown = shown_path(folder)
            raise OutputWriteError(f"the batch folder '{shown}' cannot take the outputs: {problem}")

    def check_root_name(self) -> None:
        """Prove the local folder outputs go to (:meth:`local_root`) is a name this session can
        record (:func:`jobs.fs.name_problem`), looking only: :class:`OutputWriteError`
        otherwise. Part of :meth:`check_writable`; ``wanbatch worker`` checks it at start-up."""
        _check_folder_name(self.local_root(), self.root_setting)

    @abstractmethod
    def video_dest(self, batch_name: str, item_index: int, job_id: str) -> Path:
        """The local file the download writes the video to (final for a folder, staged for S3)."""

    @abstractmethod
    def location(self, batch_name: str, item_index: int, job_id: str) -> str:
        """The ``output_path`` the job will record: an absolute path, or ``s3://bucket/key``."""

    @abstractmethod
    def sidecar_video_path(self, location: str) -> str:
        """The ``video_path`` the sidecar shows: relative to the output folder, or the URI."""

    def placement(self, dest: Path, batch_name: str, item_index: int, job_id: str) -> tuple[str, str]:
        """The ``output_path`` the job records and the ``video_path`` its sidecar shows, for the
        video whose local file is ``dest`` (:meth:`video_dest` of the same job)."""
        location = self.location(batch_name, item_index, job_id)
        return location, self.sidecar_video_path(location)

    @abstractmethod
    def publish(
        self,
        video: Path,
        *,
        location: str,
        sha256: str,
        size: int,
        sidecar: dict[str, Any],
        progress: Callable[[int], None] | None = None,
        temp_tag: str | None = None,
        holds_lease: Callable[[], bool] | None = None,
        stored_before: bool = False,
    ) -> str:
        """Make the downloaded ``video`` (hashed, probed) the output at ``location``, its
        sidecar JSON beside it; returns the ``output_path`` to record. Both are durable when it
        returns: the success that follows is recorded only for an output that survives a power loss.

        Local: :class:`OutputWriteError` (the video is removed: no video without its sidecar).
        S3: :class:`OutputUploadError` (the staged video is kept for another try).
        ``progress(bytes_sent)`` may raise to abort (a lost lease). ``temp_tag``: the lease's tag
        (:func:`outputs.partial_tag`) in the name of a local sidecar's temporary file, so that the
        job's next lease holder removes it should this process die before renaming it
        (:func:`outputs.remove_stale_partials`); a temporary file removed so means this lease was
        lost: :class:`StateConflict`, the video left to that holder.

        ``holds_lease()``: whether this attempt still holds the job's lease (a fenced check that
        renews it), asked before a failure removes the video it stored: one whose lease was
        taken over meanwhile never removes what is now the next holder's (who may have stored
        the very same video and recorded the job's success) — :class:`StateConflict` instead.
        ``stored_before``: an earlier attempt may have stored this output already (its video
        was staged by one): what is stored with the same SHA-256 is not sent again."""

    @abstractmethod
    def finish(self, video: Path) -> None:
        """The job's success is stored: drop what only served to get there (the staged copy)."""

    @abstractmethod
    def discard(self, video: Path) -> None:
        """The downloaded video does not count (not a video, mismatch, …): remove it."""

    def presigned_url(self, output_path: str, expires: int = 3600) -> str | None:
        """A time-limited HTTPS URL for an ``s3://`` output (for previews); None for a local file."""
        if not is_s3_url(output_path):
            return None
        bucket, key = _object(output_path)
        try:
            url = _client().generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
            )
        except Exception as exc:  # botocore's errors: no credentials, no region, …
            raise OutputReadError(f"cannot sign a URL for {output_path}: {_reason(exc, bucket)}") from None
        return _without_userinfo(url)

    def local_file(self, output_path: str) -> Path | None:
        """The resolved local file of a recorded ``output_path`` when it lies inside the output
        folder (``WANBATCH_OUTPUT_DIR``, or the staging folder for S3), else None — so a page
        serving files can never be steered outside it. None for ``s3://`` outputs."""
        if is_s3_url(output_path):
            return None
        try:
            root = self.local_root().resolve()
            path = Path(output_path).resolve()
            return path if root in path.parents and path.is_file() else None
        except (OSError, ValueError):  # a name the file system cannot hold (a NUL byte, …)
            return None

    @abstractmethod
    def local_root(self) -> Path:
        """The local folder this store writes into (the outputs, or the staging folder)."""

    def size(self, output_path: str) -> int | None:
        """The stored output's size in bytes, None when it is gone. A local path or ``s3://``
        URI; :class:`OutputReadError` when the storage cannot be asked."""
        return output_size(output_path)

    def fetch(self, output_path: str, target: Path, sha256: str | None = None) -> str:
        """Place the stored output at ``target`` (a new file): ``"linked"`` (hard link),
        ``"copied"`` or ``"downloaded"`` (from S3, its SHA-256 checked against ``sha256``).
        :class:`OutputReadError` when it is missing or cannot be read."""
        return fetch_output(output_path, target, sha256)


@dataclass(frozen=True)
class LocalOutputStore(OutputStore):
    """Outputs in a local folder: the download writes the final file (atomic rename), the
    sidecar is written atomically beside it. The behaviour wanbatch always had."""

    root: Path
    #: The output folder as resolved by :meth:`video_dest`, by the batch folder it placed: what
    #: :meth:`placement` states the stored path relative to, without resolving it again. A store
    #: is opened per job (``open_output_store``), so this is one job's view of the folder.
    _resolved: dict[Path, Path] = field(default_factory=dict, compare=False, repr=False, hash=False)

    def describe(self) -> str:
        return str(self.root.resolve())

    def local_root(self) -> Path:
        return self.root

    def check_writable(self, *, create: bool = True) -> Path | None:
        return _probe_folder(self.root, "WANBATCH_OUTPUT_DIR", create=create)

    def free_bytes(self) -> int | None:
        """What a write there meets (:func:`jobs.fs.free_bytes_in`, the one helper: root's
        reserved blocks counted for root, as the doctor counts them; ``shutil.disk_usage``'s
        ``free`` left them out, so a root worker's start-up warning saw 5 % less than it had)."""
        folder = self.root.resolve()
        # Not created yet (or not to be looked at): its disk is the parent's.
        while isinstance(file_kind(folder), OSError) and folder != folder.parent:
            folder = folder.parent
        return free_bytes_in(folder)

    def video_dest(self, batch_name: str, item_index: int, job_id: str) -> Path:
        root, folder = outputs.placed_batch_dir(self.root, batch_name)
        if len(self._resolved) < 64:
            self._resolved[folder] = root
        return folder / f"{outputs.job_stem(item_index, job_id)}{outputs.VIDEO_SUFFIX}"

    def location(self, batch_name: str, item_index: int, job_id: str) -> str:
        return str(self.video_dest(batch_name, item_index, job_id))

    def sidecar_video_path(self, location: str) -> str:
        return outputs.relative_to_output(Path(location), self.root)

    def placement(self, dest: Path, batch_name: str, item_index: int, job_id: str) -> tuple[str, str]:
        # ``dest`` is the location, its folder already resolved and checked by video_dest, which
        # resolved the output folder too: nothing is resolved again (resolving walks every folder
        # above, a stat each) — only for a ``dest`` this store did not place.
        try:
            root = self._resolved.get(dest.parent) or self.root.resolve()
            return str(dest), str(dest.relative_to(root))
        except (ValueError, OSError):  # OSError: a relative folder whose working folder is gone
            return str(dest), str(dest)

    def publish(
        self,
        video: Path,
        *,
        location: str,
        sha256: str,
        size: int,
        sidecar: dict[str, Any],
        progress: Callable[[int], None] | None = None,
        temp_tag: str | None = None,
        holds_lease: Callable[[], bool] | None = None,
        stored_before: bool = False,
    ) -> str:
        target = outputs.sidecar_path(video)
        try:
            outputs.write_json_atomic(target, sidecar, temp_tag=temp_tag)
        except FileNotFoundError as exc:
            if temp_tag is None:
                self._take_back(video, target, holds_lease)
                raise OutputWriteError(f"could not write {target}: {exc.strerror or exc}") from exc
            # The job's next lease holder swept our temporary file (this lease had lapsed): the
            # video is the new holder's now, never removed from under it.
            raise StateConflict(f"{target}: the job's lease moved on while its sidecar was written") from exc
        except OSError as exc:
            # a video without its sidecar is not an output: remove it (no half-finished outputs)
            self._take_back(video, target, holds_lease)
            raise OutputWriteError(f"could not write {target}: {exc.strerror or exc}") from exc
        return str(video)

    def _take_back(self, video: Path, target: Path, holds_lease: Callable[[], bool] | None) -> None:
        """Remove the video whose sidecar could not be written — unless this attempt's lease was
        taken over meanwhile: the file under that name is then the next holder's (its own
        download, perhaps already its job's recorded output), never removed from under it."""
        if holds_lease is not None and not holds_lease():
            raise StateConflict(f"{target}: the job's lease moved on while its sidecar was written")
        self.discard(video)

    def finish(self, video: Path) -> None:
        """Nothing to do: the downloaded file is the output."""

    def discard(self, video: Path) -> None:
        with contextlib.suppress(OSError):
            video.unlink()


@dataclass(frozen=True)
class S3OutputStore(OutputStore):
    """Outputs in an S3-compatible bucket under ``prefix``; videos staged in ``staging`` first."""

    bucket: str
    prefix: str
    staging: Path
    multipart_threshold: int = MULTIPART_THRESHOLD
    part_size: int = MULTIPART_PART_SIZE
    is_remote: ClassVar[bool] = True
    root_setting: ClassVar[str] = "WANBATCH_OUTPUT_STAGING_DIR (the staging folder)"

    @property
    def url(self) -> str:
        """``s3://bucket/prefix`` as configured (normalised)."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def describe(self) -> str:
        return self.url

    def local_root(self) -> Path:
        return self.staging

    def key(self, batch_name: str, item_index: int, job_id: str, suffix: str = ".mp4") -> str:
        """``<prefix>/<batch slug>/<stem><suffix>``: the prefix, then only names we made."""
        name = f"{outputs.job_stem(item_index, job_id)}{suffix}"
        return "/".join(p for p in (self.prefix, outputs.slug(batch_name), name) if p)

    def check_names(self, batch_name: str) -> None:
        """The batch's longest key (its slug, the highest item index, a ``.json`` sidecar) must
        fit S3's :data:`~jobs.output_location.S3_KEY_MAX_BYTES`, or every upload would fail
        after its video was paid for; its staging folder must be a name this session can record."""
        super().check_names(batch_name)
        longest = (
            key_bytes(self.prefix) + len("/") * bool(self.prefix) + outputs.longest_name_bytes(batch_name)
        )
        if longest > S3_KEY_MAX_BYTES:
            raise OutputWriteError(
                f"WANBATCH_OUTPUT_DIR {self.url!r} cannot take the outputs of batch "
                f"{outputs.slug(batch_name)!r}: its longest key would be {longest:,} bytes of UTF-8, "
                f"S3 takes at most {S3_KEY_MAX_BYTES:,} — shorten the prefix or the batch name"
            )

    def check_writable(self, *, create: bool = True) -> Path | None:
        under = _probe_folder(self.staging, self.root_setting, create=create)
        key = "/".join(p for p in (self.prefix, f".wanbatch-probe-{secrets.token_hex(8)}") if p)
        body = b"\0" * PROBE_BYTES
        try:
            client = _client()
            client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ChecksumSHA256=_b64sha256(body),
                ContentLength=len(body),
            )
        except Exception as exc:
            raise OutputWriteError(
                f"WANBATCH_OUTPUT_DIR {self.url!r} cannot take the outputs: {_reason(exc, self.bucket)}"
            ) from None
        unreadable: str | None = None
        try:  # read back too: reuse_outputs, `export --format hf` and the dashboard need it
            client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            unreadable = _reason(exc, self.bucket)
        try:
            client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # writing works, which is what matters; say what is left
            log.warning(
                "could not remove the probe s3://%s/%s: %s", self.bucket, key, _reason(exc, self.bucket)
            )
        if unreadable is not None:
            raise OutputWriteError(
                f"WANBATCH_OUTPUT_DIR {self.url!r} takes the outputs but cannot read them back: "
                f"{unreadable}; reuse_outputs, `export --format hf` and the dashboard's previews "
                "read them (s3:GetObject, and s3:ListBucket so that a missing object is told "
                "from a refused one)"
            )
        return under

    def video_dest(self, batch_name: str, item_index: int, job_id: str) -> Path:
        return outputs.video_path(self.staging, batch_name, item_index, job_id)

    def location(self, batch_name: str, item_index: int, job_id: str) -> str:
        return f"s3://{self.bucket}/{self.key(batch_name, item_index, job_id)}"

    def sidecar_video_path(self, location: str) -> str:
        return location

    def publish(
        self,
        video: Path,
        *,
        location: str,
        sha256: str,
        size: int,
        sidecar: dict[str, Any],
        progress: Callable[[int], None] | None = None,
        temp_tag: str | None = None,
        holds_lease: Callable[[], bool] | None = None,
        stored_before: bool = False,
    ) -> str:
        """Every write is conditional (``If-None-Match: *``): an object already under the job's
        key is never replaced, unless its sidecar names this very request (an earlier try's). A
        paid pair of another request (another copy of the database, a newer backup, an earlier
        request of the job) stays as it is, and this one goes beside it as
        ``<stem>.<request id>.mp4``/``.json`` (:func:`jobs.outputs.beside_path`), as in a local
        folder; the ``output_path`` returned names it. No request more when the key is free."""
        bucket, key = split_uri(location)
        request_id = sidecar.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            request_id = None
        places = [key]
        if request_id is not None:
            beside = str(outputs.beside_path(PurePosixPath(key), request_id))
            if beside != key:
                places.append(beside)
        held = ""
        for at in places:
            where = f"s3://{bucket}/{at}"
            record = sidecar if at == key else {**sidecar, "video_path": self.sidecar_video_path(where)}
            try:
                taken = self._publish_at(
                    video,
                    bucket=bucket,
                    key=at,
                    sha256=sha256,
                    size=size,
                    sidecar=record,
                    request_id=request_id,
                    by_name=at != key,
                    progress=progress,
                    holds_lease=holds_lease,
                    stored_before=stored_before,
                )
            except OutputReadError as exc:  # the sidecar under the key could not be read: later
                raise OutputUploadError(f"upload to {where}: {exc}") from None
            if taken is None:
                if at != key:
                    log.warning(
                        "job %s: s3://%s/%s holds %s; not overwritten: this request's video is stored "
                        "beside it as %s",
                        sidecar.get("job_id"),
                        bucket,
                        key,
                        held,
                        where,
                        extra={
                            "event": "output.kept_other_request",
                            "job_id": sidecar.get("job_id"),
                            "request_id": request_id,
                        },
                    )
                return where
            held = taken
        raise OutputUploadError(f"upload to s3://{bucket}/{places[-1]}: it holds {held}; not overwritten")

    def _publish_at(
        self,
        video: Path,
        *,
        bucket: str,
        key: str,
        sha256: str,
        size: int,
        sidecar: dict[str, Any],
        request_id: str | None,
        by_name: bool,
        progress: Callable[[int], None] | None,
        holds_lease: Callable[[], bool] | None,
        stored_before: bool,
    ) -> str | None:
        """Store the video at ``key`` and its sidecar beside it, neither over another request's
        object: None once both are stored, else what holds the key (nothing of ours is left
        under it). ``by_name``: ``key`` is named after this request (only its video goes there)."""
        side_key = key.rsplit(".", 1)[0] + ".json"
        data = outputs.sidecar_json(sidecar).encode()
        # An earlier attempt that stored both and then lost the job's lease (a storage answering
        # slower than WANBATCH_LEASE_SECONDS) left nothing to send again: two HEADs, not uploads.
        etag = _stored_etag(bucket, key, sha256, size) if stored_before else None
        sent = False
        if etag is not None:
            log.info(
                "s3://%s/%s is already stored with SHA-256 %s (by an earlier try): not sent again",
                bucket,
                key,
                sha256,
                extra={"event": "output.already_stored"},
            )
        else:
            try:
                etag, sent = self._put_video(video, bucket, key, sha256, size, progress, only_new=True), True
            except _Taken:
                holder = _holder(bucket, key, side_key, request_id, by_name, sha256, size)
                if holder is not None:
                    return holder
                etag = _stored_etag(bucket, key, sha256, size)
                if etag is None:  # this request's own video, as an earlier try stored it: replaced
                    etag, sent = self._put_video(video, bucket, key, sha256, size, progress), True
        if progress is not None:
            progress(size)  # the lease still ours before the sidecar goes (raises when it is not)
        if (
            stored_before
            and _stored_etag(bucket, side_key, hashlib.sha256(data).hexdigest(), len(data)) is not None
        ):
            return None
        try:
            try:
                put_bytes(bucket, side_key, data, content_type="application/json", only_new=True)
            except _Taken:
                existing = read_json_object(bucket, side_key)
                if existing is None or request_id is None or existing.get("request_id") != request_id:
                    # Another request's sidecar whose video was gone: the video just stored is
                    # taken back (only that object: S3 refuses the delete otherwise), and both
                    # go beside it.
                    if sent:
                        with contextlib.suppress(Exception):
                            _delete(bucket, key, etag)
                    return _held_by(existing)
                put_bytes(bucket, side_key, data, content_type="application/json")  # an earlier try's
        except OutputUploadError:
            # a video without its sidecar is not an output: take it back (both go up again next
            # try) — only while this attempt holds the job's lease: once it moved on, the object
            # under that key is the next holder's, who may have stored it and recorded the success.
            if holds_lease is not None and not holds_lease():
                raise StateConflict(
                    f"s3://{bucket}/{side_key}: the job's lease moved on while its sidecar was uploaded"
                ) from None
            with contextlib.suppress(Exception):
                _delete(bucket, key, etag)
            raise
        return None

    def _put_video(
        self,
        video: Path,
        bucket: str,
        key: str,
        sha256: str,
        size: int,
        progress: Callable[[int], None] | None,
        *,
        only_new: bool = False,
    ) -> str | None:
        try:
            return self.put_file(
                video, bucket=bucket, key=key, sha256=sha256, size=size, progress=progress, only_new=only_new
            )
        except (OutputUploadError, _Taken):
            raise
        except OSError as exc:  # reading the staged file back
            raise OutputWriteError(f"could not read the staged {video}: {exc.strerror or exc}") from exc

    def put_file(
        self,
        path: Path,
        *,
        bucket: str,
        key: str,
        sha256: str,
        size: int,
        progress: Callable[[int], None] | None = None,
        only_new: bool = False,
    ) -> str | None:
        """Upload ``path`` (``size`` bytes, SHA-256 ``sha256`` hex) to ``bucket/key`` atomically;
        the stored object's ETag (None when the storage did not say).

        Up to :attr:`multipart_threshold`: one ``PutObject`` with ``ChecksumSHA256``, which S3
        verifies. Beyond: a multipart upload, ``ChecksumSHA256`` on every part, aborted on any
        failure. The full SHA-256 travels as the object's ``sha256`` metadata either way.
        ``only_new``: never over an object under ``key`` (``If-None-Match: *``; :class:`_Taken`).
        """
        meta = {"sha256": sha256}
        where = f"s3://{bucket}/{key}"
        condition: dict[str, Any] = {"IfNoneMatch": "*"} if only_new else {}
        if size <= self.multipart_threshold:
            checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
            try:
                with path.open("rb") as fh:
                    answer = _client().put_object(
                        Bucket=bucket,
                        Key=key,
                        Body=_Reader(fh, progress),  # type: ignore[arg-type]
                        ContentLength=size,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=checksum,
                        ContentType="video/mp4",
                        Metadata=meta,
                        **condition,
                    )
            except (OSError, WanbatchError):
                raise
            except Exception as exc:
                if only_new and _taken(exc):
                    raise _Taken(where) from None
                raise _upload_error(where, exc, bucket) from None
            _check_echo(answer, checksum, where)
            return _etag(answer)
        return self._put_multipart(
            path, bucket=bucket, key=key, meta=meta, progress=progress, condition=condition
        )

    def _put_multipart(
        self,
        path: Path,
        *,
        bucket: str,
        key: str,
        meta: dict[str, str],
        progress: Callable[[int], None] | None,
        condition: dict[str, Any],
    ) -> str | None:
        where = f"s3://{bucket}/{key}"
        client = _client()
        try:
            upload_id = client.create_multipart_upload(
                Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256", ContentType="video/mp4", Metadata=meta
            )["UploadId"]
        except Exception as exc:
            raise _upload_error(where, exc, bucket) from None
        try:
            parts: list[dict[str, Any]] = []
            sent = 0
            with path.open("rb") as fh:
                number = 1
                while chunk := fh.read(self.part_size):
                    checksum = _b64sha256(chunk)
                    answer = client.upload_part(
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=checksum,
                    )
                    _check_echo(answer, checksum, f"{where} (part {number})")
                    parts.append({"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum})
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent)
                    number += 1
            try:  # S3 takes the condition on completion: the object appears only then
                done = client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                    **condition,
                )
            except Exception as exc:
                if condition and _taken(exc):
                    raise _Taken(where) from None
                raise
        except BaseException as exc:
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            if isinstance(exc, OSError | WanbatchError | _Taken) or not isinstance(exc, Exception):
                raise
            raise _upload_error(where, exc, bucket) from None
        return _etag(done)

    def finish(self, video: Path) -> None:
        with contextlib.suppress(OSError):
            video.unlink()

    def discard(self, video: Path) -> None:
        with contextlib.suppress(OSError):
            video.unlink()


def open_output_store(settings: DownloadSettings) -> OutputStore:
    """The store ``WANBATCH_OUTPUT_DIR`` names: :class:`S3OutputStore` for ``s3://bucket/prefix``
    (staging in ``settings.output_dir``, which the settings point at the staging folder), else
    :class:`LocalOutputStore`. Opening connects to nothing."""
    if settings.output_url:
        bucket, prefix = parse_s3_url(settings.output_url)
        return S3OutputStore(bucket=bucket, prefix=prefix, staging=settings.output_dir)
    return LocalOutputStore(root=settings.output_dir)


# --------------------------------------------------------------------------- any recorded path


def output_size(output_path: str) -> int | None:
    """Size in bytes of a recorded output (local path or ``s3://`` URI); None when it is gone.

    A local output is gone, too, when something other than the regular file wanbatch wrote stands
    at its path (a symlink, a pipe): no job may take that as its video."""
    stamp = output_stamp(output_path)
    return None if stamp is None else stamp.size


@dataclass(frozen=True, slots=True)
class OutputStamp:
    """What can be learnt of a stored output without reading it (one ``lstat``, or one ``HEAD``),
    and that changes whenever its bytes do: its size and ``version``. A local file's version is
    its device, inode, modification and status-change times (``st_ctime_ns`` moves on every
    write, rename or ``utime``, and cannot be set back: an ``mtime``-preserving copy or rewrite
    changes it); an object's is its ETag (an MD5 of its bytes, or unique to each write), its
    ``LastModified`` and ``VersionId``.

    ``by_content``: the version names the bytes themselves (an ETag), so other bytes always show
    in it. Otherwise it is only as fine as a clock, and a second change within the same clock
    tick would not show: ``changed_ns`` says when the last change was, in wall-clock nanoseconds
    (None: unknown)."""

    size: int
    version: tuple[object, ...]
    by_content: bool
    changed_ns: int | None


def output_stamp(output_path: str, *, quick: bool = False) -> OutputStamp | None:
    """The :class:`OutputStamp` of a recorded output (local path or ``s3://`` URI); None when it
    is gone (for a local output: anything but a regular file at its path, see
    :func:`output_size`). :class:`OutputReadError` when S3 cannot be asked. ``quick``: one try
    with short timeouts (:func:`_client`), for a look that can do without an answer (``diff``'s
    ``HEAD`` of each object)."""
    if not is_s3_url(output_path):
        try:
            info = Path(output_path).lstat()
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        version: tuple[object, ...] = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns)
        return OutputStamp(info.st_size, version, False, max(info.st_mtime_ns, info.st_ctime_ns))
    bucket, key = _object(output_path)
    try:
        head = _client(quick=quick).head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if _code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise OutputReadError(
            f"cannot look up {output_path}: {_reason(exc, bucket)}", refused=_refused(exc)
        ) from None
    etag = head.get("ETag") or None
    modified = head.get("LastModified")
    changed = int(modified.timestamp() * 1_000_000_000) if modified is not None else None
    version = (etag, modified.isoformat() if modified is not None else None, head.get("VersionId"))
    return OutputStamp(int(head["ContentLength"]), version, etag is not None, changed)


#: How much of a stored output :func:`output_sha256` reads at a time.
HASH_CHUNK = 1024 * 1024


def output_sha256(output_path: str) -> str | None:
    """SHA-256 of a recorded output's bytes as stored now (local path or ``s3://`` URI), read
    streaming, one chunk at a time; None when it is gone.

    As for :func:`output_size`, a local output is gone when anything but a regular file stands at
    its path (the file is opened without following a symlink), or when it cannot be read: no job
    may take what cannot be checked. An object that cannot be read for another reason than "not
    there" (refused, unreachable) raises :class:`OutputReadError`."""
    digest = hashlib.sha256()
    if not is_s3_url(output_path):
        try:
            # never through a symlink, and never blocking on a pipe (fstat refuses it below)
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
            fd = os.open(output_path, flags)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as fh:
            try:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    return None
                while chunk := fh.read(HASH_CHUNK):
                    digest.update(chunk)
            except OSError:
                return None
        return digest.hexdigest()
    bucket, key = _object(output_path)
    try:
        body = _client().get_object(Bucket=bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(HASH_CHUNK):
            digest.update(chunk)
    except Exception as exc:
        if _code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise OutputReadError(
            f"cannot read {output_path}: {_reason(exc, bucket)}", refused=_refused(exc)
        ) from None
    return digest.hexdigest()


def fetch_output(output_path: str, target: Path, sha256: str | None = None) -> str:
    """Place a recorded output at ``target``: hard-link or copy a local file, download an object
    (into a temporary file beside ``target``, SHA-256 checked, given the user's usual file mode
    as a plain ``open()`` would, then renamed). Returns
    ``"linked"``, ``"copied"`` or ``"downloaded"``; :class:`OutputReadError` otherwise."""
    if not is_s3_url(output_path):
        source = Path(output_path)
        if not source.is_file():
            raise OutputReadError(f"{output_path} is missing")
        try:
            os.link(source, target)
        except OSError:
            try:
                shutil.copyfile(source, target)
            except OSError as exc:
                raise OutputReadError(f"cannot copy {output_path}: {exc.strerror or exc}") from None
            return "copied"
        return "linked"
    bucket, key = _object(output_path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:
        raise OutputReadError(f"cannot write {target}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as fh:
            try:
                body = _client().get_object(Bucket=bucket, Key=key)["Body"]
                for chunk in body.iter_chunks(1024 * 1024):
                    digest.update(chunk)
                    fh.write(chunk)
            except OSError:
                raise
            except Exception as exc:
                missing = _code(exc) in ("404", "NoSuchKey", "NotFound")
                why = "the object does not exist" if missing else _reason(exc, bucket)
                raise OutputReadError(f"cannot download {output_path}: {why}") from None
            os.fchmod(fh.fileno(), file_mode())  # the user's usual mode, not mkstemp's 0600
        if sha256 is not None and digest.hexdigest() != sha256:
            raise OutputReadError(
                f"{output_path} changed since it was stored: its SHA-256 is {digest.hexdigest()}, "
                f"the record says {sha256}"
            )
        tmp.replace(target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputReadError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return "downloaded"


def put_bytes(bucket: str, key: str, data: bytes, *, content_type: str, only_new: bool = False) -> None:
    """One small object, ``ChecksumSHA256`` attached (S3 verifies it); :class:`OutputUploadError`.
    ``only_new``: never over an object under ``key`` (``If-None-Match: *``; :class:`_Taken`)."""
    checksum = _b64sha256(data)
    condition: dict[str, Any] = {"IfNoneMatch": "*"} if only_new else {}
    try:
        answer = _client().put_object(
            Bucket=bucket,
            Key=key,
            Body=data,
            ContentLength=len(data),
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=checksum,
            ContentType=content_type,
            Metadata={"sha256": hashlib.sha256(data).hexdigest()},
            **condition,
        )
    except Exception as exc:
        if only_new and _taken(exc):
            raise _Taken(f"s3://{bucket}/{key}") from None
        raise _upload_error(f"s3://{bucket}/{key}", exc, bucket) from None
    _check_echo(answer, checksum, f"s3://{bucket}/{key}")


def read_json_object(bucket: str, key: str, *, quick: bool = False) -> dict[str, Any] | None:
    """The sidecar stored as ``bucket/key`` (one ``GetObject``), read as a local one is
    (:func:`jobs.outputs.parse_sidecar`); None when there is no such object, or it is not a
    sidecar. :class:`OutputReadError` when the storage cannot be asked (refused, unreachable;
    a missing key reads as refused without ``s3:ListBucket``). ``quick``: one try, within a few
    seconds (:func:`_client`'s ``quick``), for a look that may do without an answer."""
    try:
        body = _client(quick=quick).get_object(Bucket=bucket, Key=key)["Body"]
        data = body.read(outputs.SIDECAR_MAX_BYTES + 1)
    except Exception as exc:
        if _code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise OutputReadError(
            f"cannot read s3://{bucket}/{key}: {_reason(exc, bucket)}", refused=_refused(exc)
        ) from None
    return outputs.parse_sidecar(data)


def read_sidecar(output_path: str, *, quick: bool = False) -> dict[str, Any] | None:
    """The sidecar beside a stored video (a local path or an ``s3://`` URI), None when there is
    none: one ``open`` (:func:`jobs.outputs.read_sidecar`, which never raises) or one
    ``GetObject`` (:func:`read_json_object`: :class:`OutputReadError` when S3 cannot be asked;
    ``quick``: one try, within a few seconds)."""
    if not is_s3_url(output_path):
        return outputs.read_sidecar(Path(output_path))
    bucket, key = _object(output_path)
    return read_json_object(bucket, str(PurePosixPath(key).with_suffix(outputs.SIDECAR_SUFFIX)), quick=quick)


# --------------------------------------------------------------------------- helpers


def _check_folder_name(folder: Path, name: str) -> None:
    """:class:`OutputWriteError` when ``folder``, or where it leads (a relative folder under the
    working folder, a symbolic link), is a name this session cannot record or another session
    would not find (:func:`jobs.fs.name_problem`). Looks only: nothing is created."""
    problem = name_problem(folder)
    shown = f"'{shown_path(folder)}'"
    if problem is None:
        try:
            real = folder.resolve()
        except (OSError, RuntimeError, ValueError):  # said by the probe that follows
            return
        problem = name_problem(real)
        if real != folder:
            shown += f" (that is '{shown_path(real)}')"
    if problem is not None:
        raise OutputWriteError(f"{name} {shown} cannot take the outputs: {problem}")


def _probe_folder(folder: Path, name: str, *, create: bool = True) -> Path | None:
    """Create ``folder``, write, fsync and remove a probe; :class:`OutputWriteError` otherwise.

    Without ``create``, a folder that is not there is left so: it is only checked that this user
    could create it (:func:`jobs.fs.creatable`), and the existing folder it would be created
    under is returned (None: the folder is there and took the probe).

    First of all its name (:func:`_check_folder_name`): a folder this session could write but
    not record took every paid video, then failed to record it.

    A relative folder (the default ``outputs``) from a current folder deleted under the shell
    was "cannot take the outputs: not found": said as such, with what to do."""
    if lost_with_current_folder(folder):
        raise OutputWriteError(
            f"{name} '{shown_path(folder)}' is relative, and {CURRENT_FOLDER_GONE}: "
            f"{current_folder_gone_fix(name)}"
        )
    _check_folder_name(folder, name)
    kind = file_kind(folder)
    if not create and isinstance(kind, OSError) and is_missing(kind) and not folder.is_symlink():
        under, why = creatable(folder)
        if why is not None:
            raise OutputWriteError(f"{name} '{shown_path(folder)}' cannot be created: {why}")
        return under
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".wanbatch-probe-", dir=folder)
        try:
            os.write(fd, b"\0" * OUTPUT_PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)
    except OSError as exc:
        what = what_is(folder)
        reason = f"it is {what}, not a folder" if what else os_reason(exc)
        raise OutputWriteError(f"{name} '{shown_path(folder)}' cannot take the outputs: {reason}") from None
    return None


def _etag(answer: Any) -> str | None:
    """The ETag an S3 write answered with, if any."""
    etag = answer.get("ETag") if isinstance(answer, dict) else None
    return str(etag) if etag else None


def _stored_etag(bucket: str, key: str, sha256: str, size: int) -> str | None:
    """The ETag of the object at ``bucket/key`` when it holds exactly these bytes: ``size``
    bytes whose SHA-256 (hex) is ``sha256`` — as its ``sha256`` metadata says (only wanbatch
    writes it, on an object S3 verified against that very checksum) and, when the storage
    keeps one, S3's own whole-object ``ChecksumSHA256``. None otherwise, or when it cannot be
    asked (then it is simply uploaded)."""
    try:
        head = _client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except Exception:
        return None
    if head.get("Metadata", {}).get("sha256") != sha256 or head.get("ContentLength") != size:
        return None
    checksum = head.get("ChecksumSHA256")
    if checksum and "-" not in checksum and checksum != base64.b64encode(bytes.fromhex(sha256)).decode():
        return None  # a multipart object's checksum ("…-N") is of its parts' checksums
    return _etag(head) or ""


class _Taken(Exception):
    """A conditional write (``If-None-Match: *``) found an object under its key: nothing was
    written. This module's own signal: :meth:`S3OutputStore.publish` then stores beside it."""


#: What a storage answers a conditional write whose key holds an object: ``412
#: PreconditionFailed`` (AWS, MinIO, moto), or ``409 ConditionalRequestConflict`` while another
#: write of that key is under way (which may succeed: taken as held).
_TAKEN_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


def _taken(exc: BaseException) -> bool:
    return _code(exc) in _TAKEN_CODES


def _held_by(record: dict[str, Any] | None) -> str:
    """What holds a key, for the warning of a pair stored beside it."""
    if record is None:
        return "an object without its sidecar (another request's video, or another process storing it now)"
    return f"the video of job {record.get('job_id')}, request {record.get('request_id')}"


def _holder(
    bucket: str, key: str, side_key: str, request_id: str | None, by_name: bool, sha256: str, size: int
) -> str | None:
    """Whose the object a conditional write found under ``key`` is: None when it is this
    request's (its sidecar names it; or, without a sidecar, the key is named after this request,
    or the object holds these very bytes), else what holds it (:func:`_held_by`). One
    ``GetObject`` of the sidecar, a ``HEAD`` when there is none."""
    record = read_json_object(bucket, side_key)
    if record is not None:
        return None if request_id is not None and record.get("request_id") == request_id else _held_by(record)
    if by_name or _stored_etag(bucket, key, sha256, size) is not None:
        return None
    return _held_by(None)


def _delete(bucket: str, key: str, etag: str | None) -> None:
    """Delete the object this attempt stored under ``key``: only it (``If-Match`` its ETag)."""
    if etag:
        _client().delete_object(Bucket=bucket, Key=key, IfMatch=etag)
    else:
        _client().delete_object(Bucket=bucket, Key=key)


def _check_echo(answer: Any, checksum: str, where: str) -> None:
    """S3 answers a write with the SHA-256 it computed over what it received: when it says one
    (S3-compatible servers that ignore checksums do not), it must be ours."""
    echoed = answer.get("ChecksumSHA256") if isinstance(answer, dict) else None
    if echoed and echoed != checksum:
        raise OutputUploadError(
            f"upload to {where}: the storage computed SHA-256 {echoed}, we sent {checksum}; not stored"
        )


def _b64sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class _Reader(io.RawIOBase):
    """A staged file as an upload body that reports progress (and may abort the upload by
    raising from ``progress``: a lease lost mid-upload leaves no object, S3 never got it all)."""

    def __init__(self, fh: io.BufferedReader, progress: Callable[[int], None] | None) -> None:
        super().__init__()
        self._fh, self._progress = fh, progress

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def read(self, size: int = -1) -> bytes:
        chunk = self._fh.read(size)
        if self._progress is not None and chunk:
            self._progress(self._fh.tell())
        return chunk

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


_clients: dict[tuple[str | None, ...], S3Client] = {}
_clients_lock = threading.Lock()

#: The environment that decides which S3 client boto3 builds: a change (a test's moto server,
#: a new endpoint) gets a new client. Values are only compared, never printed.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def _proxy_environment() -> tuple[str | None, ...]:
    """The proxy variables' values (any case, as botocore reads them through
    :func:`urllib.request.getproxies`): a client is built for them too."""
    return tuple(sorted(f"{k}={v}" for k, v in os.environ.items() if k.lower().endswith("_proxy")))


def _endpoint_host() -> str | None:
    """The host of the configured S3 endpoint (lower case, an IPv6 address without brackets),
    None for AWS itself or an endpoint that does not parse."""
    raw = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not raw:
        return None
    try:
        return urlsplit(raw).hostname
    except ValueError:
        return None


def _on_loopback() -> bool:
    """Whether the S3 endpoint is on this machine's loopback (a MinIO or moto beside wanbatch):
    no proxy can reach it, so none is used, whatever ``HTTP_PROXY`` says (README: requests to
    this machine's loopback never go through a proxy)."""
    host = _endpoint_host()
    return host is not None and is_loopback_host(host)


def _proxy_for_endpoint() -> tuple[str, str] | None:
    """``(variable, host:port)`` of the proxy botocore sends the S3 requests through (the
    endpoint's scheme's ``*_PROXY``, unless ``NO_PROXY`` or loopback bypasses it), else None.
    Never the proxy's credentials."""
    if _on_loopback():
        return None
    from botocore.utils import should_bypass_proxies

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    try:
        scheme = (urlsplit(endpoint).scheme or "https") if endpoint else "https"
        if endpoint and should_bypass_proxies(endpoint):
            return None
    except ValueError:
        return None
    found = proxy_variables(os.environ).get(scheme)
    if found is None:
        return None
    name, value = found
    try:
        parts = urlsplit(value if "://" in value else f"http://{value}")
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return name, "(unparsable)"
    shown = f"[{host}]" if ":" in host else host
    return name, f"{shown}:{port}" if port is not None else shown


def _client(*, quick: bool = False) -> S3Client:
    """The process's S3 client for the current ``AWS_*`` environment (boto3 clients are
    thread-safe; sessions are not, so each client gets its own session, made under a lock).

    ``quick``: a client of its own that tries once, connecting within 2 s and waiting 3 s for an
    answer, for reads that may do without one (a dispatch round's look for sidecars: a storage
    that does not answer must not keep its threads for the minutes the default client retries).

    An endpoint on this machine's loopback is reached directly: botocore would otherwise send
    it through ``HTTP_PROXY`` (it bypasses only ``NO_PROXY``'s hosts), a proxy elsewhere that
    cannot reach it and that saw every request's signed ``Authorization``."""
    key = (*(os.environ.get(name) for name in _CLIENT_ENV), *_proxy_environment(), str(quick))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                signature_version="s3v4",
                connect_timeout=2 if quick else 10,
                read_timeout=3 if quick else 60,
                retries={"max_attempts": 1 if quick else 3, "mode": "standard"},
                # S3-compatible servers (MinIO, moto, Ceph) behind one host name: path-style keys.
                s3={"addressing_style": "path"} if endpoint_url() else None,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                # {}: no proxy at all (None: botocore reads the proxy variables).
                proxies={} if _on_loopback() else None,
            )
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
            session = boto3.session.Session()
            client = session.client("s3", config=config, region_name=region or _default_region(session))
            if len(_clients) > 8:
                _clients.clear()
            _clients[key] = client
        return client


def _default_region(session: Any) -> str:
    """boto3's region (config file, profile), else ``us-east-1``: a client needs one to sign."""
    return str(session.region_name or "us-east-1")


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


#: What S3 answers when it refuses the credentials or their rights: waiting does not heal it.
_REFUSALS = frozenset(
    {
        "AccessDenied",
        "403",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
    }
)


def _refused(exc: BaseException) -> bool:
    """Whether an S3 call failed because the storage refused us (no rights, credentials refused
    or missing), not because it could not be reached or answered late."""
    from botocore import exceptions as bce

    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return True
    return _code(exc) in _REFUSALS


def _without_userinfo(url: str) -> str:
    """``url`` without a ``user:password@`` its endpoint (``AWS_ENDPOINT_URL``) carried: a
    presigned URL goes to a browser (the dashboard's preview redirects to it), and boto3 copies
    the endpoint's userinfo into it. The signature does not cover it (SigV4 signs the host)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _reason(exc: BaseException, bucket: str) -> str:
    """One line saying why an S3 call failed and what to do; never a credential.

    botocore's own texts quote the endpoint as configured (``Custom endpoint `http://u:pw@…`
    was not a valid URI``, ``Invalid endpoint: …``), a server's message may echo a URL: the
    line is masked (:func:`_masked`) whatever branch made it."""
    return _masked(CONTROL_CHARS.sub(" ", _why(exc, bucket)))


def _masked(text: str) -> str:
    """``text`` with the configured S3 endpoint's credentials hidden: the endpoint variables'
    values as written (spaces and all, which URL masking alone would cut short) shown with
    their password masked, that password standing on its own masked too, then every URL left
    masked (:func:`jobs.url_secrets.mask_urls`)."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        raw = os.environ.get(name) or ""
        head, secret, tail = _endpoint_parts(raw)
        if not secret:
            continue
        text = text.replace(raw, f"{head}{MASK}{tail}")
        for written in {secret, unquote(secret)}:
            if len(written) >= 4:  # masking every "a" of a message would hide the message
                text = text.replace(written, MASK)
    return mask_urls(text)


def _endpoint_parts(raw: str) -> tuple[str, str, str]:
    """``raw`` (an endpoint as written) cut around its secret: the password of its userinfo,
    or over HTTP a user name alone (the token of ``https://TOKEN@host``); ``("", "", "")``
    without one. The last ``@`` ends the userinfo (a password may hold ``/`` or ``@``)."""
    scheme, sep, rest = raw.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or not userinfo:
        return "", "", ""
    user, colon, password = userinfo.partition(":")
    if colon:
        return f"{scheme}://{user}:", password, f"@{host}"
    return f"{scheme}://", user, f"@{host}"


def _proxy_failure(exc: BaseException, where: str) -> str | None:
    """The line for a failure that was the proxy's, naming it (``host:port`` and its variable,
    never its credentials): botocore could not connect to it or it refused the tunnel
    (``ProxyConnectionError``), or it answered a 5xx of its own (no S3 request id: a forward
    proxy's ``502 Bad Gateway`` reads to botocore as the storage's answer). None otherwise."""
    from botocore import exceptions as bce

    proxy = _proxy_for_endpoint()
    if proxy is None:
        return None
    name, address = proxy
    if isinstance(exc, bce.ProxyConnectionError):
        return f"the proxy {address} ({name}) could not be reached, or refused the tunnel to {where}"
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    metadata = response.get("ResponseMetadata") or {}
    status = metadata.get("HTTPStatusCode")
    headers = {str(k).lower() for k in (metadata.get("HTTPHeaders") or {})}
    if isinstance(status, int) and status >= 500 and not headers & {"x-amz-request-id", "x-amz-id-2"}:
        message = str(response.get("Error", {}).get("Message", "") or "")
        said = f"{status} {_masked(CONTROL_CHARS.sub(' ', message))[:80]}".rstrip()
        return f"the proxy {address} ({name}) answered {said}: it could not reach {where}"
    return None


def _why(exc: BaseException, bucket: str) -> str:
    from botocore import exceptions as bce

    where = endpoint_url() or "AWS S3"
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    if (proxied := _proxy_failure(exc, where)) is not None:
        return proxied
    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectionError | bce.ConnectTimeoutError):
        return f"cannot reach {where} (check AWS_ENDPOINT_URL and the network)"
    if isinstance(exc, bce.ReadTimeoutError):
        return f"{where} did not answer in time"
    if isinstance(exc, bce.NoRegionError):
        return "no AWS region: set AWS_REGION"
    code = _code(exc)
    if code in ("NoSuchBucket",) or (code == "404" and "HeadBucket" in str(exc)):
        return f"the bucket {bucket!r} does not exist at {where}"
    if code in ("AccessDenied", "403", "AllAccessDisabled"):
        return f"access denied to bucket {bucket!r} (check the credentials' rights and the bucket policy)"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
        return f"{where} refused the credentials ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    if code == "KeyTooLongError":
        return (
            f"the storage refused the key as too long (KeyTooLongError; S3 takes at most "
            f"{S3_KEY_MAX_BYTES:,} bytes of UTF-8): shorten the prefix of WANBATCH_OUTPUT_DIR "
            "or the batch name"
        )
    if code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"):
        return f"the storage refused the upload's checksum ({code}): the bytes changed on the way"
    if code:
        message = str(getattr(exc, "response", {}).get("Error", {}).get("Message", "") or "")
        return f"{code}: {_masked(CONTROL_CHARS.sub(' ', message))[:200]}".rstrip(": ")
    text = _masked(CONTROL_CHARS.sub(" ", str(exc)))[:200]  # masked whole, then cut
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
