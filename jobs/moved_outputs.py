"""Where a job's stored video is read from once its project moved: the one place that decides.

A job records its video's absolute path (``jobs.output_path``: see **Why absolute** below). A
project folder (manifest, images, the default ``wanbatch.db`` and ``./outputs``) moved or copied
elsewhere keeps those paths, which name the old folder: gone after a move, the original's files
after a copy. Every reader of a stored video (the exports, ``reuse_outputs``, the dashboard's
video links) asks :func:`relocated` / :class:`OutputFinder` instead of trusting the path.

**The rule.** Outputs are written as ``<WANBATCH_OUTPUT_DIR>/<batch folder>/<file>``
(:func:`jobs.outputs.video_path`), the output folder resolved, so the output root a path was
recorded under is its grandparent. When a recorded local path does not lie inside the current
output folder (``WANBATCH_OUTPUT_DIR`` as this process resolves it), the same
``<batch folder>/<file>`` under the current folder is looked at (:func:`candidate`), and taken
only when it is a regular file (never a symlink, its folder not a link out of the output folder)
of the recorded size whose SHA-256 is the recorded one: stat first, hashed only when the sizes
match, so a folder that merely shares a batch's name costs one ``lstat`` per video. A path inside
the current folder is never second-guessed (a missing video there is missing), an ``s3://``
object is where it is, and a job without a recorded SHA-256 is never moved.

**Hashed once.** What was found is recorded (:func:`record_moves`: ``output_path`` set to the new
path where it still holds the old one), so the next reader finds the video at its recorded path
and checks nothing. A database this process may not write to (a read-only export) only loses
that: the readers use the paths found (:class:`OutputFinder`'s ``moves``).

**Why absolute.** Storing paths relative to the output folder was considered and not done: the
folder is a setting (relative to the working folder by default, changed between runs, another
one per worker host), so a relative path would name a different file for each reader, silently,
and ``reuse_outputs`` compares outputs by path. An absolute path plus a move checked by SHA-256
never reads a file other than the one the job stored.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from jobs import db, store
from jobs.errors import DatabaseReadOnlyError
from jobs.output_location import is_s3_url
from jobs.output_store import output_sha256

log = logging.getLogger(__name__)


def local_root(output_dir: Path, output_url: str | None) -> Path | None:
    """The local output folder a moved output is looked for under, resolved; None when outputs
    go to S3 (``output_url``: ``output_dir`` is then only the staging folder) or when the folder
    cannot be resolved (a relative setting whose working folder is gone)."""
    if output_url:
        return None
    try:
        return output_dir.resolve()
    except (OSError, ValueError, RuntimeError):
        return None


def candidate(output_path: str, root: Path | None) -> Path | None:
    """Where the video recorded at ``output_path`` would be under the output folder ``root``
    (resolved) if its project moved: the same ``<batch folder>/<file>``. None when there is
    nothing to look for: no local root, an ``s3://`` object, a path inside ``root`` already, or
    one not shaped as wanbatch writes them."""
    if root is None or is_s3_url(output_path):
        return None
    recorded = Path(output_path)
    if not recorded.is_absolute() or len(recorded.parts) < 3 or root in recorded.parents:
        return None
    return root / recorded.parent.name / recorded.name


def _same_size(path: Path, root: Path, size: int | None) -> bool:
    """``path`` is a regular file (not a symlink) of ``size`` bytes, in a batch folder that is a
    real folder of ``root`` (not a link out of it)."""
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or (size is not None and info.st_size != size):
            return False
        return path.parent.resolve() == root / path.parent.name
    except (OSError, ValueError, RuntimeError):  # ValueError: a name this locale cannot encode
        return False


def relocated(output_path: str | None, sha256: str | None, size: int | None, root: Path | None) -> str | None:
    """The moved video of a job (see the module docstring): the path under ``root`` holding the
    bytes recorded (``sha256``, ``size``) for the video recorded at ``output_path``, else None
    (read it where it was recorded)."""
    if output_path is None or sha256 is None:
        return None
    found = candidate(output_path, root)
    if found is None or root is None or not _same_size(found, root, size):
        return None
    try:
        digest = output_sha256(str(found))
    except (OSError, ValueError):  # pragma: no cover - output_sha256 answers None for a local file
        return None
    return str(found) if digest == sha256 else None


def places_to_look(output_path: str, size: int | None, root: Path | None) -> list[str]:
    """Where a reader that checks the SHA-256 itself (``reuse_outputs``: read outside the claim's
    transaction) should look for the video recorded at ``output_path``, in this order: the same
    file under the current output folder ``root`` when it is there at the recorded size
    (:func:`candidate`), then the recorded path. Both, not the first alone: in a copied project
    a file of the recorded size but other bytes under the copy's folder (edited, re-encoded to
    the same length) must not hide the intact original still at the recorded path. The reader
    takes the first whose SHA-256 is the recorded one, never another. Nothing is read but an
    ``lstat``."""
    found = candidate(output_path, root)
    if found is None or root is None or not _same_size(found, root, size):
        return [output_path]
    return [str(found), output_path]


def record_move(session: Session, job_id: str, old: str, new: str) -> None:
    """Record in ``session``'s transaction that job ``job_id``'s video recorded at ``old`` is
    at ``new`` (checked by the caller), where it still names ``old``; the job's object in the
    session, if loaded, takes the new path too."""
    store.record_output_move(session, job_id, old, new)


def record_moves(engine: Engine, moves: Iterable[tuple[str, str, str]]) -> bool:
    """Record ``(job_id, old_path, new_path)`` moves: each job's ``output_path`` becomes the new
    path where it still holds the old one (a job stored again meanwhile keeps its new output).
    False (logged, nothing raised) when the database refuses the write: the caller still reads
    the paths it found."""
    rows = list(moves)
    if not rows:
        return True
    try:
        with db.session_scope(engine) as session:
            store.record_output_moves(session, rows)
    except (SQLAlchemyError, DatabaseReadOnlyError) as exc:  # a read-only export, status, page
        log.warning(
            "could not record where %d moved video(s) are now: %s",
            len(rows),
            type(exc).__name__,
            extra={"event": "outputs.move_not_recorded"},
        )
        return False
    return True


@dataclass
class OutputFinder:
    """The stored videos of some jobs, looked for once each under the current output folder.

    ``moves``: old path → new path, for every video found moved (whatever the database could
    record); ``missing``: the videos found neither at their recorded path nor moved."""

    root: Path | None
    moves: dict[str, str] = field(default_factory=dict)
    missing: int = 0
    _tried: dict[tuple[str, str], str | None] = field(default_factory=dict)

    def find(self, output_path: str | None, sha256: str | None, size: int | None) -> str | None:
        """The path to read the video recorded at ``output_path`` from (the recorded one unless
        it moved: :func:`relocated`, hashed at most once per path and digest)."""
        if output_path is None or sha256 is None or candidate(output_path, self.root) is None:
            return output_path
        key = (output_path, sha256)
        if key not in self._tried:
            found = relocated(output_path, sha256, size, self.root)
            self._tried[key] = found
            if found is not None:
                self.moves[output_path] = found
            elif _gone(output_path):
                self.missing += 1
        return self._tried[key] or output_path


def _gone(path: str) -> bool:
    try:
        return not stat.S_ISREG(Path(path).lstat().st_mode)
    except (OSError, ValueError):
        return True


def moved_video(engine: Engine, job_id: str, output_path: str, root: Path | None) -> str | None:
    """The moved video of job ``job_id``, recorded at ``output_path`` (:func:`relocated`, its
    recorded SHA-256 and size read here), recorded at its new path when found; else None. For a
    reader of one job's video (the dashboard's video link)."""
    if candidate(output_path, root) is None:
        return None
    with db.read_scope(engine) as session:
        row = store.output_digest(session, job_id)
    if row is None:
        return None
    found = relocated(output_path, row[0], row[1], root)
    if found is not None:
        record_moves(engine, [(job_id, output_path, found)])
    return found


def follow_outputs(engine: Engine, batch_ids: Iterable[str], root: Path | None) -> OutputFinder:
    """Look for the stored videos of the batches ``batch_ids`` that lie outside the output
    folder ``root`` (a moved or copied project: see the module docstring) and record those
    found there. Batches whose videos are all inside it cost a few queries
    (:func:`jobs.store.output_folders_of_batch`), nothing is read; the others one ``lstat`` per
    video, and one read of those of the recorded size. No transaction is open while videos are
    read."""
    finder = OutputFinder(root)
    if root is None:
        return finder
    rows: list[tuple[str, str, str | None, int | None]] = []
    with db.read_scope(engine) as session:
        for batch_id in batch_ids:
            for folder in store.output_folders_of_batch(session, batch_id):
                if candidate(f"{folder}/x", root) is None:
                    continue
                rows.extend(store.outputs_in_folder(session, batch_id, folder))
    moves = []
    for job_id, path, sha256, size in rows:
        found = finder.find(path, sha256, size)
        if found is not None and found != path:
            moves.append((job_id, path, found))
    record_moves(engine, moves)
    return finder


def moved_path(output_path: str | None, moves: Mapping[str, str] | None) -> str | None:
    """``output_path`` as :func:`follow_outputs` found it (``moves``), else as recorded."""
    if output_path is None or not moves:
        return output_path
    return moves.get(output_path, output_path)
