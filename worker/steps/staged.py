"""Paid videos left in the staging folder, taken back by a rerun instead of rendered again.

A job whose batch was cancelled while its output could not be stored (object storage down)
fails with ``error_type`` ``output_not_kept``: its paid video stays in the staging folder
(``WANBATCH_OUTPUT_STAGING_DIR``), and the download step recorded the video's SHA-256 and size
on the job when its upload failed. A ``rerun`` of that job (with or without ``--failed-only``,
the same input: no ``--new-seeds``, no ``--vary``) takes that file instead of sending the job to
fal again (:func:`worker.steps.dispatch._take_staged`), and stores it like any download
(:func:`worker.steps.download.download`) — but only a file that is still exactly the one the
job downloaded: another one (changed, or a new file under that name) is refused, and said so.
The file is looked for under the job's item number and under those it had before a resubmit of
an edited manifest renumbered it (``jobs.earlier_items``), as the download step looks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy.orm import Session

from jobs import outputs, store
from jobs.models import JobView
from jobs.settings import DEFAULT_STATE_DIR, Settings

#: How many takers that failed in turn are followed back to the file (a rerun of a rerun of …).
CHAIN = 8


def staging_folder(settings: Settings) -> Path:
    """The staging folder: where a video waits for its upload to object storage (the settings
    point ``output_dir`` at it for ``s3://`` outputs), or where it waited, should the outputs
    have gone back to a local folder since."""
    if settings.output_url:
        return settings.output_dir
    return settings.output_staging_dir or DEFAULT_STATE_DIR / "staging"


def staged_copies(session: Session, settings: Settings, original: JobView) -> list[Path]:
    """Where the paid video ``original`` left may be, first the likeliest: its own staged file,
    under its item number and then under the numbers it had before (``jobs.earlier_items``, the
    most recent first: a resubmit of an edited manifest renumbered it after its video was
    staged, :func:`jobs.outputs.under_earlier_items`, the names the download step looks under);
    then, when ``original`` had itself taken the video from the job it reruns (and failed in
    turn: its batch was cancelled too), that job's, and so on (a taker uploads from the file it
    takes, never moves it)."""
    folder = staging_folder(settings)
    paths: list[Path] = []
    job: JobView | None = original
    for _ in range(CHAIN):
        if job is None:
            break
        name = store.folder_name(store.get_batch(session, job.batch_id))
        own = outputs.video_path(folder, name, job.item_index, job.id)
        paths.append(own)
        paths.extend(outputs.under_earlier_items(own, job.id, job.earlier_items))
        if job.reused_from is None or job.rerun_of is None:
            break
        job = store.get_job(session, job.rerun_of)
    return paths


def differs(path: Path, sha256: str, size: int) -> str | None:
    """None when ``path`` holds exactly ``size`` bytes with this SHA-256; else what is wrong."""
    try:
        have = path.stat().st_size
        if have != size:
            return f"is {have:,} bytes, not the {size:,} it downloaded"
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1024 * 1024):
                digest.update(chunk)
    except FileNotFoundError:
        return "is gone"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if digest.hexdigest() != sha256:
        return f"has another SHA-256 ({digest.hexdigest()[:12]}…, not the {sha256[:12]}… it downloaded)"
    return None


def find_staged(session: Session, settings: Settings, original: JobView) -> tuple[Path | None, str]:
    """The staged file holding exactly the video ``original`` downloaded (its recorded SHA-256
    and size), and ``""``; or None and why no file is taken (naming the likeliest file)."""
    sha256, size = original.output_sha256, original.output_bytes
    copies = staged_copies(session, settings, original)
    if sha256 is None or size is None:
        return None, f"job {original.id} recorded no SHA-256 of the video it downloaded"
    why = ""
    for path in copies:
        wrong = differs(path, sha256, size)
        if wrong is None:
            return path, ""
        why = why or f"{path} {wrong}"
    return None, why
