"""Where a job's video and its sidecar JSON go, and how the sidecar is written.

File names are derived only from things we made (the batch name, slugified, and the job's item
index and id), never from a name the provider supplied, so no response can steer a write outside
``WANBATCH_OUTPUT_DIR`` (path traversal: https://owasp.org/www-community/attacks/Path_Traversal).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import random
import re
import stat
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any, TypeVar

import orjson

from jobs import fs
from jobs.batch_names import batch_name
from jobs.errors import WanbatchError
from jobs.fs import name_problem, shown_path
from jobs.models import EARLIER_ITEMS_UNKNOWN, new_id
from jobs.storable import storable_json


class OutputWriteError(WanbatchError):
    """An output (video or sidecar) could not be written: disk full, folder not writable, ….

    Not the provider's fault and not healed by asking fal again: the download step pauses the
    batch with the reason, and the paid video waits for a run that can keep it.
    """


class OutputFolderError(OutputWriteError):
    """The batch's output folder cannot be placed (:func:`batch_dir`): it resolves outside the
    output folder, or the output folder cannot be resolved. No room frees it: the user must."""


#: Longest folder name :func:`slug` makes, in characters and in UTF-8 bytes (file systems count
#: bytes, 255 at most per name).
SLUG_MAX_CHARS, SLUG_MAX_BYTES = 100, 200


def _kept(char: str) -> bool:
    """Letters, marks and digits of any script, and ``.``, ``_``, ``-``: never a separator,
    control, space or symbol."""
    return char in "._-" or unicodedata.category(char)[0] in "LMN"


@functools.lru_cache(maxsize=256)
def slug(name: str) -> str:
    """A file-system-safe, non-empty, readable form of a batch name.

    NFC-normalised, so ``é`` typed either way is one folder; letters and digits of every script
    are kept (``東京-夜景`` stays ``東京-夜景``, not ``batch``); each run of anything else becomes
    one ``-``. No separators, no leading dots or dashes, at most :data:`SLUG_MAX_CHARS`
    characters and :data:`SLUG_MAX_BYTES` bytes of UTF-8 (cut on a character boundary). An
    ASCII name gets the very folder it always got, so existing batches keep theirs.

    Kept per name (a pure function of it): every download of a batch asks for its folder.
    """
    parts: list[str] = []
    for char in batch_name(name):
        if _kept(char):
            parts.append(char)
        elif not parts or parts[-1] != "\0":
            parts.append("\0")  # one "-" per run of unsafe characters
    cleaned = "".join("-" if p == "\0" else p for p in parts).strip(".-")[:SLUG_MAX_CHARS]
    encoded = cleaned.encode("utf-8")
    if len(encoded) > SLUG_MAX_BYTES:
        cleaned = encoded[:SLUG_MAX_BYTES].decode("utf-8", errors="ignore").rstrip(".-")
    return cleaned or "batch"


def batch_dir(output_dir: Path, batch_name: str) -> Path:
    """``<output_dir>/<batch name>/``, guaranteed to be inside ``output_dir``
    (:func:`placed_batch_dir`)."""
    return placed_batch_dir(output_dir, batch_name)[1]


def placed_batch_dir(output_dir: Path, batch_name: str) -> tuple[Path, Path]:
    """``output_dir`` resolved, and ``<output_dir>/<batch name>/`` resolved, guaranteed to be
    inside it.

    :class:`OutputWriteError` with the reason when it cannot be: the batch's folder resolves
    outside ``output_dir`` (a symbolic link out of it, say to a folder on a bigger disk — which
    would also let a link steer writes anywhere), or ``output_dir`` cannot be resolved at all (a
    relative one, the default ``./outputs``, whose working folder was removed; a link loop). A
    folder that cannot take the outputs, as a full or read-only one: the download step pauses
    the batch with the reason, never a bug report."""
    name = slug(batch_name)
    # A name this session cannot record (``LC_ALL=C`` and ``ñ``; a folder whose bytes are not
    # UTF-8) made every paid download of the batch crash as it stored its success.
    problem = name_problem(output_dir / name)
    if problem is not None:
        raise OutputFolderError(
            f"the batch folder '{shown_path(output_dir / name)}' cannot take the outputs: {problem}"
        )
    try:
        root = output_dir.resolve()
        path = _resolved_in(root, name)
    except FileNotFoundError as exc:  # os.getcwd(): the working folder is gone
        if output_dir.is_absolute():
            why = exc.strerror or exc
            raise OutputFolderError(f"the output folder {output_dir} cannot be found: {why}") from exc
        raise OutputFolderError(
            f"the working folder that WANBATCH_OUTPUT_DIR {output_dir} is relative to is gone "
            f"({exc.strerror or exc}) — run from a folder that exists, or set WANBATCH_OUTPUT_DIR "
            "to an absolute path"
        ) from exc
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop (Python < 3.13)
        raise OutputFolderError(f"the output folder {output_dir / name} cannot be resolved: {exc}") from exc
    problem = name_problem(path)  # where it leads: a relative folder, or a symbolic link
    if problem is not None:
        raise OutputFolderError(
            f"the batch folder '{shown_path(output_dir / name)}' (that is '{shown_path(path)}') cannot "
            f"take the outputs: {problem}"
        )
    if root not in path.parents:
        raise OutputFolderError(
            f"the batch folder {root / name} resolves to {path}, outside WANBATCH_OUTPUT_DIR {root} "
            "(a symbolic link out of it?) — outputs are only written inside it: replace the link "
            "with a real folder (moving the batch's videos into it)"
        )
    return root, path


def _resolved_in(root: Path, name: str) -> Path:
    """``(root / name).resolve()`` for a resolved ``root`` and one plain name (a :func:`slug`:
    no separator, never ``.`` or ``..``): when that is a real folder (not a symbolic link) it
    resolves to itself, which one ``lstat`` shows — resolving walks every folder above it again,
    a ``stat`` each, for every download."""
    candidate = root / name
    try:
        if stat.S_ISDIR(os.lstat(candidate).st_mode):
            return candidate
    except OSError:
        pass  # not there yet, or not to be looked at: resolving says what it is
    return candidate.resolve()


def job_stem(item_index: int, job_id: str) -> str:
    """The file stem of a job's outputs: sortable by item, unique by job."""
    return f"{item_index:06d}-{job_id[:12]}"


#: The suffixes of a job's outputs: its video, and the sidecar JSON beside it.
VIDEO_SUFFIX, SIDECAR_SUFFIX = ".mp4", ".json"


def longest_name_bytes(batch_name: str | None = None) -> int:
    """Bytes of UTF-8 the longest output name wanbatch makes under an output location takes:
    ``<batch slug>/<job stem><suffix>`` of ``batch_name`` (None: of the longest slug there is,
    :data:`SLUG_MAX_BYTES`), for the highest item index a manifest has and a full-length job id.
    An S3 key is the prefix, ``/`` and this (``jobs.output_store``)."""
    from jobs.manifest.expand import MAX_JOBS

    slug_bytes = SLUG_MAX_BYTES if batch_name is None else len(slug(batch_name).encode("utf-8"))
    stem = job_stem(MAX_JOBS - 1, new_id())
    suffix = max(len(s.encode("utf-8")) for s in (VIDEO_SUFFIX, SIDECAR_SUFFIX))
    return slug_bytes + len("/") + len(stem.encode("utf-8")) + suffix


def video_path(output_dir: Path, batch_name: str, item_index: int, job_id: str) -> Path:
    """Where the job's video is stored."""
    return batch_dir(output_dir, batch_name) / f"{job_stem(item_index, job_id)}{VIDEO_SUFFIX}"


def under_another_item(dest: Path, job_id: str) -> Path | None:
    """The job's file of ``dest``'s kind in ``dest``'s folder under another item number, else None.

    A job's stem holds its item index, which a resubmit of an edited manifest may change (an
    item inserted above it): a video staged by an earlier try, before that, waits under the old
    number. Temporary ``.part`` files are never taken (they start with a dot).

    It lists the whole folder (every video of the batch so far): the download step asks only
    for a job whose earlier numbers nobody recorded (``jobs.earlier_items`` holds
    ``EARLIER_ITEMS_UNKNOWN``: sent before schema 0032); every other job's earlier names are
    known, each one ``stat`` away. Asked by every download, it made a batch quadratic in its size."""
    suffix = f"-{job_id[:12]}{dest.suffix}"
    try:
        with os.scandir(dest.parent) as entries:
            for entry in entries:
                if entry.name.endswith(suffix) and not entry.name.startswith(".") and entry.name != dest.name:
                    return Path(entry.path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return None


def under_earlier_items(dest: Path, job_id: str, earlier_items: Sequence[int] | None) -> Iterator[Path]:
    """Where the job's file of ``dest``'s kind may wait under an item number it had before a
    resubmit of an edited manifest renumbered it (``jobs.earlier_items``): the names, the most
    recent number first, never ``dest`` itself (its current name, which the caller looks at
    first: a job renumbered back to a number it had gives no name for that number).

    Each earlier number gives one name (never more than ``jobs.models.EARLIER_ITEMS_KEPT``),
    nothing is looked up for it, and a job never renumbered gives none. Only for a job whose
    earlier numbers nobody recorded (:data:`jobs.models.EARLIER_ITEMS_UNKNOWN`: sent before
    schema 0032) is the folder listed (:func:`under_another_item`), once the caller asks for a
    name. The download step and a rerun looking for a staged video both look under these."""
    if not earlier_items:
        return
    if EARLIER_ITEMS_UNKNOWN in earlier_items:
        found = under_another_item(dest, job_id)
        if found is not None:
            yield found
        return
    for old in reversed(earlier_items):
        path = dest.with_name(f"{job_stem(old, job_id)}{dest.suffix}")
        if path != dest:  # renumbered back to a number it had: that name is ``dest``, not an earlier one
            yield path


def sidecar_path(video: Path) -> Path:
    """The JSON sidecar beside a video."""
    return video.with_suffix(SIDECAR_SUFFIX)


#: Largest sidecar :func:`read_sidecar` reads (a Wan sidecar is a few KB): a bigger file is
#: not one wanbatch wrote, and is read as none.
SIDECAR_MAX_BYTES = 4 * 1024 * 1024


def read_sidecar(video: Path) -> dict[str, Any] | None:
    """The sidecar JSON beside ``video`` (:func:`sidecar_path`) as written by a download, or None:
    there is none (the usual case: one failed ``open``), or it cannot be read, is larger than
    :data:`SIDECAR_MAX_BYTES` or is not a JSON object. Never raises."""
    try:
        with sidecar_path(video).open("rb") as fh:
            data = fh.read(SIDECAR_MAX_BYTES + 1)
    except (OSError, ValueError):
        return None
    return parse_sidecar(data)


def parse_sidecar(data: bytes) -> dict[str, Any] | None:
    """A sidecar's bytes (at most :data:`SIDECAR_MAX_BYTES` + 1 of them read) as the JSON object
    a download wrote, else None: too large, not JSON, or not an object. Never raises. The same
    reading for a local file (:func:`read_sidecar`) and an S3 object
    (:func:`jobs.output_store.read_sidecar`)."""
    if len(data) > SIDECAR_MAX_BYTES:
        return None
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return record if isinstance(record, dict) else None


#: A local path or an S3 key's pure path: :func:`beside_path` gives one of the same kind.
_P = TypeVar("_P", bound=PurePath)

#: What a fal request id may be to appear as it is in a file name (:func:`beside_path`).
_NAMEABLE_REQUEST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def request_tag(request_id: str) -> str:
    """``request_id`` as a file-name part: itself when it is a plain id (fal's are UUIDs),
    else ``r`` and 16 hex digits of its SHA-256 — never a name the provider could steer."""
    if _NAMEABLE_REQUEST.fullmatch(request_id):
        return request_id
    return "r" + hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def beside_path(video: _P, request_id: str) -> _P:
    """Where the video of fal's request ``request_id`` goes when the job's own name ``video``
    holds a paid video of another request (another copy of the database stored it, or an
    earlier request of the job): ``<stem>.<request id>.mp4`` beside it (:func:`request_tag`),
    its sidecar ``<stem>.<request id>.json``. ``video`` itself when it is that name already.
    Also an S3 key's (as a :class:`~pathlib.PurePosixPath`: ``jobs.output_store``)."""
    tag = request_tag(request_id)
    if video.stem.endswith(f".{tag}"):
        return video
    return video.with_name(f"{video.stem}.{tag}{video.suffix}")


def partial_tag(version: int) -> str:
    """The tag a download attempt puts in its temporary file's name: the job version (fencing
    token) of its lease, so a later lease holder can tell a file of an attempt that lost the job."""
    return f"v{version}"


_TAGGED = re.compile(r"v(\d+)-")


#: The suffixes of temporary files: a download's (``.part``, :func:`partial_tag`) and a
#: sidecar's (``.tmp``, :func:`write_json_atomic`). Both names start with a dot.
PARTIAL_SUFFIX, SIDECAR_TEMP_SUFFIX = ".part", ".tmp"

#: Per folder: when it was last listed (monotonic) and the temporary files it held then. A
#: listing older than the re-list age is dropped when another folder is listed, and at most
#: :data:`PARTIALS_FOLDERS_MAX` folders are kept (the oldest listings go first): a long-lived
#: worker downloads into a new folder per batch, for ever.
_PARTIALS: dict[Path, tuple[float, set[str]]] = {}
PARTIALS_FOLDERS_MAX = 1024
_PARTIALS_LOCK = threading.Lock()


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith((PARTIAL_SUFFIX, SIDECAR_TEMP_SUFFIX))


def _partials_in(folder: Path, max_age: float) -> set[str] | None:
    """The temporary files (``.part``, ``.tmp``) of ``folder`` as last listed, listing it again
    once ``max_age`` passed.

    Listing a batch's folder for every download made a batch quadratic: its folder holds every
    video so far, 100,000 at the end of a big batch. A stale partial is left by an attempt whose
    lease lapsed, and a lease lasts ``max_age`` (the caller passes the lease): a file created
    after the last listing belongs to an attempt that cannot have lost its job before the
    listing is old enough to be redone. None when the folder does not exist.
    """
    now = time.monotonic()
    with _PARTIALS_LOCK:
        seen = _PARTIALS.get(folder)
        if seen is not None and now - seen[0] < max_age:
            return seen[1]
    try:
        with os.scandir(folder) as entries:
            names = {e.name for e in entries if _is_temporary(e.name)}
    except (FileNotFoundError, NotADirectoryError):
        return None
    with _PARTIALS_LOCK:
        _PARTIALS.pop(folder, None)  # re-inserted last: the dict stays in listing order
        for old in [f for f, (listed, _) in _PARTIALS.items() if now - listed >= max_age]:
            del _PARTIALS[old]  # would be listed again anyway
        while len(_PARTIALS) >= PARTIALS_FOLDERS_MAX:
            del _PARTIALS[next(iter(_PARTIALS))]
        _PARTIALS[folder] = (now, names)
    return names


def remove_stale_partials(
    dest: Path,
    *,
    older_than: float,
    version: int | None = None,
    now: float | None = None,
    storing: Callable[[], bool] | None = None,
) -> int:
    """Delete temporary files left beside ``dest`` by attempts that are over: a download's
    ``.<name>.*.part`` and its sidecar's ``.<name>.json.*.tmp`` (a process killed while writing
    the sidecar, :func:`write_json_atomic`, leaves one; nothing else ever removes it).

    The caller holds the job's lease at ``version``. A file tagged with a lower version
    (:func:`partial_tag`) belongs to an attempt whose lease was taken over — which only happens
    once that lease lapsed, or its process ended — so the attempt aborts at its next lease
    renewal (or, for a sidecar, at its rename) without storing anything: its file goes. An
    untagged file goes only when untouched for ``older_than`` seconds (the lease): a live
    download writes unbuffered and its mtime moves with every chunk, and a sidecar is written in
    one go while its writer holds the lease. So the file of a download (or sidecar write) still
    holding the job is never pulled from under it. The folder is listed at most once per
    ``older_than`` (:func:`_partials_in`), not once per download.

    ``storing()``, asked once before a sidecar's temporary file would go: whether ``dest`` is held
    by a process storing it now (``worker.steps.download._being_stored``). Then the file is that
    process's sidecar on its way, kept: a try frozen past its lease (``kill -STOP``) while it wrote
    it, its file swept, ended without a sidecar and left its video under the job's name for good.
    """
    removed = 0
    cutoff = (time.time() if now is None else now) - older_than
    prefix, sidecar = f".{dest.name}.", f".{sidecar_path(dest).name}."
    names = _partials_in(dest.parent, older_than)
    if not names:
        return 0
    held: bool | None = None  # whether dest is being stored: asked once, when a sidecar's file would go
    for name in [n for n in names if n.startswith(prefix) or n.startswith(sidecar)]:
        partial = name.startswith(prefix) and name.endswith(PARTIAL_SUFFIX)
        if not partial and not (name.startswith(sidecar) and name.endswith(SIDECAR_TEMP_SUFFIX)):
            continue
        stale = dest.parent / name
        tagged = _TAGGED.match(name[len(prefix if partial else sidecar) :])
        superseded = tagged is not None and version is not None and int(tagged.group(1)) < version
        try:
            if not superseded and stale.stat().st_mtime > cutoff:
                continue
            if not partial and storing is not None:
                held = storing() if held is None else held
                if held:
                    continue
            stale.unlink()
        except FileNotFoundError:
            pass
        else:
            removed += 1
        with _PARTIALS_LOCK:
            names.discard(name)
    return removed


def remove_attempt_partials(dest: Path, version: int) -> int:
    """Delete the temporary files of the attempt that holds the job's lease at ``version``
    (:func:`partial_tag`) beside ``dest``: its download's ``.<name>.v<version>-….part`` and its
    sidecar's ``.<name>.json.v<version>-….tmp`` — never another attempt's. What a run that stops
    under control removes of a download it did not wait for
    (:meth:`worker.steps.output_writes.OutputWrites.stop`). How many it removed."""
    tag = f"{partial_tag(version)}-"
    prefixes = (
        (f".{dest.name}.{tag}", PARTIAL_SUFFIX),
        (f".{sidecar_path(dest).name}.{tag}", SIDECAR_TEMP_SUFFIX),
    )
    removed = 0
    try:
        found = list(dest.parent.iterdir())
    except FileNotFoundError:
        return 0
    for path in found:
        if any(path.name.startswith(start) and path.name.endswith(end) for start, end in prefixes):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def fsync_dir(folder: Path) -> None:
    """Make a rename into ``folder`` durable (POSIX: the directory entry is only on disk once the
    directory itself is synced); harmless where directories cannot be opened.

    Several threads that renamed into one folder at about the same time share a sync
    (:class:`_FolderSyncs`): a sync that *starts* after a thread's rename makes it durable, so
    each caller returns once such a sync has ended, never before — one sync of the folder for a
    burst of stored videos instead of one each."""
    _FOLDER_SYNCS.sync(folder)


class _FolderSyncs:
    """Group commit of folder syncs, per folder (by the path as given).

    A caller takes a ticket once its renames are done. A sync that begins after a ticket was
    taken covers it (the folder's entries as they are when the sync starts are made durable),
    so a caller waits while a sync is under way and returns once one that began after its
    ticket has ended — running it itself when none is under way. Never a sync skipped: every
    caller is covered by a sync that started after its own renames."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        #: folder → [tickets taken, tickets covered by an ended sync, a sync under way]
        self._folders: dict[Path, list[int]] = {}

    def sync(self, folder: Path) -> None:
        with self._lock:
            state = self._folders.setdefault(folder, [0, 0, 0])
            state[0] += 1
            ticket = state[0]
            while True:
                if state[1] >= ticket:  # a sync that began after this ticket has ended
                    self._forget(folder, state)
                    return
                if not state[2]:
                    state[2] = 1
                    covers = state[0]  # every ticket taken before this sync begins
                    break
                self._done.wait()
        synced = False
        try:
            fs.sync_folder(folder)
            synced = True
        finally:
            with self._lock:
                if synced:  # a failed sync (EIO) covers nobody: each waiter then syncs, and fails, itself
                    state[1] = max(state[1], covers)
                state[2] = 0
                self._forget(folder, state)
                self._done.notify_all()

    def _forget(self, folder: Path, state: list[int]) -> None:
        """Drop a folder nobody waits on (every ticket covered, no sync under way): a long-lived
        worker stores into a new folder per batch, for ever."""
        if state[1] >= state[0] and not state[2] and self._folders.get(folder) is state:
            del self._folders[folder]


_FOLDER_SYNCS = _FolderSyncs()

#: The characters of a temporary file's random part (``tempfile.mkstemp``'s: 8 of them).
_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"
_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_temp_names = random.Random()
os.register_at_fork(after_in_child=_temp_names.seed)  # a forked child never repeats its parent's names


def create_temporary(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """Create a new file ``<prefix><8 random characters><suffix>`` in ``folder`` (never one that
    is there: ``O_EXCL``, no symlink followed), open for writing: its descriptor and path.

    As ``tempfile.mkstemp`` does, but with the mode a plain ``open()`` gives (0666 less the
    umask, or the folder's default ACL), applied by the kernel as it creates the file: no
    ``fchmod`` afterwards, nor the umask read from ``/proc`` for it (``mkstemp`` makes 0600,
    which a video or sidecar renamed into place must not keep). A temporary file only ever
    holds what its final name will: nothing is shown earlier than it would be. ``OSError`` as
    ``open`` raises it (``FileNotFoundError`` when ``folder`` is not there)."""
    for _ in range(100):
        name = f"{prefix}{''.join(_temp_names.choices(_TEMP_CHARS, k=8))}{suffix}"
        path = folder / name
        try:
            return os.open(path, _TEMP_FLAGS, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(folder))


def sidecar_json(data: dict[str, Any]) -> str:
    """``data`` as a sidecar's text: JSON any strict reader takes, its keys in ``data``'s order,
    never sorted: ``input`` is the exact JSON submitted, its fields in the order they were sent
    (as the export has them), the record's own fields in the order it lists them. A non-finite
    float, which ``json`` would write as ``NaN``/``Infinity`` (no JSON), is written as ``null``
    (:func:`jobs.storable.storable_json`): fal's answers are read so (see
    ``worker.fal.errors.load_json``), but a job an earlier version stored may still hold one."""
    try:
        return _strict_json(data)
    except ValueError as exc:  # also a circular reference: not ours to mend
        if not str(exc).startswith("Out of range float"):
            raise
    return _strict_json(storable_json(data))


#: orjson's options that write what ``json.dumps(indent=2, default=str, ensure_ascii=False)``
#: writes, byte for byte but for an exponent's leading zero (``1e-7``, not ``1e-07``): datetimes
#: and dataclasses go to ``default`` (``str``) as there, not orjson's own forms
#: (https://github.com/ijl/orjson#option).
_ORJSON_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _strict_json(data: Any) -> str:
    """The sidecar's text. With ``indent`` the standard library encodes in pure Python (its C
    encoder is for compact output only): about 760 Python calls a sidecar, a twentieth of a
    job's. orjson writes the same text in C. It writes a non-finite float as ``null``, which is
    what :func:`sidecar_json` makes of one; what it refuses (a key that is not a string, an
    integer beyond 64 bits, a lone surrogate) goes to the standard encoder, as before."""
    try:
        return orjson.dumps(data, default=str, option=_ORJSON_OPTIONS).decode() + "\n"
    except (orjson.JSONEncodeError, TypeError):
        pass
    return json.dumps(data, indent=2, default=str, ensure_ascii=False, allow_nan=False) + "\n"


def write_json_atomic(path: Path, data: dict[str, Any], *, temp_tag: str | None = None) -> None:
    """Write JSON so that readers see the old file or the complete new one, never a torn one,
    and the new one survives a power loss once this returns (the file, then its folder, synced).

    A sidecar is written after its video was renamed into the same folder: this one folder
    sync makes both renames durable before the job is recorded as succeeded. It gets the user's
    usual file mode (0666 less the umask), as its video does (:func:`create_temporary`). Its
    bytes are made first and written in one ``write``. A process killed before the rename
    leaves its temporary ``.<name>.[<temp_tag>-]*.tmp``: the job's next download removes it
    (:func:`remove_stale_partials`), at once when it carries the tag of the lease it was
    written under (:func:`partial_tag`), which the next holder has outlived. The folder is
    made only when it is not there (no ``mkdir`` and ``stat`` each time)."""
    body = sidecar_json(data).encode("utf-8")
    prefix = f".{path.name}." + (f"{temp_tag}-" if temp_tag else "")
    try:
        fd, tmp = create_temporary(path.parent, prefix, SIDECAR_TEMP_SUFFIX)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temporary(path.parent, prefix, SIDECAR_TEMP_SUFFIX)
    try:
        try:
            write_all(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` unbuffered (one ``write`` unless the system takes less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def relative_to_output(path: Path, output_dir: Path) -> str:
    """A video path relative to ``WANBATCH_OUTPUT_DIR`` when inside it, else absolute."""
    try:
        return str(path.resolve().relative_to(output_dir.resolve()))
    except ValueError:
        return str(path.resolve())
