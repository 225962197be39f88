"""Whether a batch's succeeded jobs still have their videos where they were recorded.

A video deleted or replaced after its job succeeded was seen only by ``diff`` and by an export's
warning: ``status`` and ``run`` said ``8/8 done`` over an empty output folder, and nothing said
that fal may still serve the paid video for free (``wanbatch refetch``). :func:`look` is the one
check ``status BATCH``, the end of ``run``/``rerun``, ``refetch`` and an ``hf`` export share, and
``diff`` looks at each side of a pair with :func:`look_at`.

**Bounded cost.** Without ``verify`` a local video costs one ``lstat`` (its size against the
recorded one; a moved project's under the current output folder first,
:func:`jobs.moved_outputs.places_to_look`): ``status`` of a batch of thousands stays quick.
Hashing reads every byte, so it is asked for (``diff --verify``, ``refetch --verify``), never
done by ``status``. S3 objects are not looked at here (each would be a ``HEAD``): counted as
``not_checked``; ``diff`` looks them up itself, a few at a time.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from sqlalchemy.orm import Session

from jobs import moved_outputs, store
from jobs.output_location import is_s3_url
from jobs.output_store import output_sha256

#: What :func:`look_at` found of a job's recorded video: ``ok``, ``missing`` (nothing, or no
#: regular file, at its path; an S3 object that is not there), ``changed on disk`` (another
#: size than recorded; when verified, other bytes).
OnDisk = Literal["ok", "missing", "changed on disk"]
#: Job ids of each kind :class:`OutputsOnDisk` lists (``--json``); the counts are whole.
LISTED = 50


class Recorded(Protocol):
    """A job's recorded video, as every reader of this module has it."""

    @property
    def output_path(self) -> str | None: ...

    @property
    def output_sha256(self) -> str | None: ...

    @property
    def output_bytes(self) -> int | None: ...


def look_at(row: Recorded, root: Path | None, *, verify: bool = False) -> tuple[OnDisk | None, str | None]:
    """What is at the path the video of ``row`` was recorded at, and that path when it is not
    the video recorded: one ``lstat`` and its size against the recorded one (a moved project's
    video where :func:`jobs.moved_outputs.places_to_look` finds it first, at the recorded size,
    under ``root``, the current output folder); with ``verify`` its SHA-256 too, an S3 object's
    included. ``(None, None)`` for a job without a recorded video, and for an S3 object without
    ``verify`` (``diff`` looks those up together, a few at a time)."""
    recorded = row.output_path
    if row.output_sha256 is None or recorded is None:
        return None, None
    if is_s3_url(recorded):
        path = recorded
        if not verify:
            return None, None
    else:
        path = moved_outputs.places_to_look(recorded, row.output_bytes, root)[0]
        try:
            info = os.lstat(path)
        except (OSError, ValueError):
            return "missing", path
        if not stat.S_ISREG(info.st_mode):
            return "missing", path
        if row.output_bytes is not None and info.st_size != row.output_bytes:
            return "changed on disk", path
    if verify:
        digest = output_sha256(path)
        if digest is None:
            return "missing", path
        if digest != row.output_sha256:
            return "changed on disk", path
    return "ok", None


@dataclass
class OutputsOnDisk:
    """What :func:`look` found of a batch's succeeded jobs' videos."""

    #: Local videos looked at.
    checked: int = 0
    #: ``(job id, path looked at)`` of the videos not there, and of those of another size (or,
    #: ``verified``, other bytes) than recorded.
    missing: list[tuple[str, str]] = field(default_factory=list)
    changed: list[tuple[str, str]] = field(default_factory=list)
    #: Videos in S3, not looked at (a request each).
    not_checked: int = 0
    #: Each video hashed against its recorded SHA-256, not only its size looked at.
    verified: bool = False

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.changed)

    def job_ids(self) -> list[str]:
        """The jobs whose video is not the one recorded, missing ones first."""
        return [job_id for job_id, _ in (*self.missing, *self.changed)]

    def as_dict(self) -> dict[str, Any]:
        """``status --json``'s ``outputs_on_disk`` (and ``run``'s, ``refetch``'s)."""
        return {
            "checked": self.checked,
            "missing": len(self.missing),
            "changed": len(self.changed),
            "not_checked": self.not_checked,
            "verified": self.verified,
            "missing_jobs": [job_id for job_id, _ in self.missing[:LISTED]],
            "changed_jobs": [job_id for job_id, _ in self.changed[:LISTED]],
        }

    def what(self) -> str:
        """``2 missing and 1 changed (another size)``: the problems in words."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing")
        if self.changed:
            how = "other bytes than recorded" if self.verified else "another size than recorded"
            parts.append(f"{len(self.changed)} changed ({how})")
        return " and ".join(parts)

    def note(self, ref: str) -> str | None:
        """The line ``status BATCH`` and the end of ``run`` print, or None when every video
        looked at is there: how many, and the command that fetches them again for free."""
        if not self.problems:
            return None
        deeper = (
            ""
            if self.verified
            else f"; only sizes were looked at: `wanbatch diff {ref} {ref} --verify` hashes every video"
        )
        return (
            f"{self.problems} of {self.checked} succeeded job(s)' videos are not on disk as stored "
            f"({self.what()}): `wanbatch refetch {ref}` fetches them again from fal, at no charge, while "
            f"fal still serves them{deeper}"
        )


def look(session: Session, batch_id: str, root: Path | None, *, verify: bool = False) -> OutputsOnDisk:
    """Look at every succeeded job's recorded video of the batch (:func:`look_at`): ``root``,
    the current local output folder (None: only where recorded)."""
    found = OutputsOnDisk(verified=verify)
    for row in store.recorded_outputs_of_batch(session, batch_id):
        if row.output_path is not None and is_s3_url(row.output_path):
            found.not_checked += 1
            continue
        outcome, path = look_at(row, root, verify=verify)
        if outcome is None:  # no SHA-256 recorded (an older row): nothing to compare with
            continue
        found.checked += 1
        if outcome == "missing":
            found.missing.append((row.id, path or row.output_path or ""))
        elif outcome == "changed on disk":
            found.changed.append((row.id, path or row.output_path or ""))
    return found
