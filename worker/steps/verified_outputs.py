"""The SHA-256 of stored videos that ``reuse_outputs`` would give a twin, read with no database
transaction open (:func:`worker.steps.dispatch._reuse`).

Hashing a video reads all of it (downloads it, from S3). Done inside a dispatch round's
transaction, as it was, that held SQLite's write lock for the whole read of every reused video
(a batch reusing a thousand 50 MB videos held it for minutes: every other step and command
waited on its busy timeout), and on PostgreSQL kept the claimed rows locked and a transaction
open across reads from S3. So the round only looks at cheap facts (an ``lstat``, or one ``HEAD``:
:class:`~jobs.output_store.OutputStamp`), and a twin whose bytes are not known for exactly those
facts is not decided in it: the job is let go (due at once, nothing recorded), the twin is named
in :attr:`worker.steps.dispatch.Dispatched.unverified`, and once the round has committed
:meth:`VerifiedOutputs.verify` reads it, outside any transaction, between two looks at its
stamp. The next round (at once: :func:`worker.steps.dispatch.dispatch` runs it) claims the job
again and finds the twin's digest under the stamp it sees *then*: a file changed, replaced or
deleted between the read and the claim has another stamp (or none), so it is never taken on the
strength of the bytes read before (it is read again, and passed over if its bytes are not the
recorded ones). The guarantee of ``reuse_outputs`` is unchanged: a twin is taken only when the
bytes at its path are, as far as the claim can tell, the ones whose SHA-256 it records.

A digest is kept for the process (up to :data:`KEPT` outputs, so a video many twins point at is
read once) only when its stamp tells every later change apart: an object's ETag names its bytes;
a local file's times do only once they are older than :data:`RACY_SECONDS` (a file changed twice
within one tick of the file system's clock keeps its times and inode). A digest read of a file
changed more recently than that, a file that changed while it was read, and a failure to read
(refused, unreachable: the job then waits or its batch pauses, as when the round's ``HEAD``
fails) serve the next round only — the window between a read and the claim that uses it is then
what it was when both happened in one transaction.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from jobs import output_store
from jobs.output_location import is_s3_url
from jobs.output_store import OutputReadError, OutputStamp

#: How old (since its last change) a local file must be when hashed for its digest to be kept
#: for later rounds: beyond the granularity of any file system's times (FAT's is 2 s).
RACY_SECONDS = 3.0
#: Outputs whose digest is kept at most; the oldest go first (a dropped one is only read again).
KEPT = 10_000


@dataclass(frozen=True, slots=True)
class Candidate:
    """A twin's output that a job would take if its bytes are those recorded (``sha256``)."""

    path: str
    sha256: str | None


@dataclass(frozen=True, slots=True)
class Verified:
    """What reading ``path`` found: its ``digest`` while its stamp was ``stamp``, or None with
    ``why`` (None: could not be read, as if gone; else why it is not taken)."""

    stamp: OutputStamp
    digest: str | None
    why: str | None
    #: The round after which it was read: it serves the next one (:meth:`VerifiedOutputs.known`).
    round: int
    #: Whether it serves later rounds too (the stamp tells any later change apart).
    lasting: bool


def storage_of(output_path: str) -> str:
    """Where a recorded output lives, for telling storages apart: ``s3://bucket``, or ``""``
    for a local file (whose check never fails: a file that cannot be looked at is gone)."""
    if not is_s3_url(output_path):
        return ""
    return "/".join(output_path.split("/", 3)[:3])


class VerifiedOutputs:
    """The digests read so far (see the module's docstring). Thread-safe; one per process
    (:data:`VERIFIED`): dispatch runs in one thread of one process at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._round = 0
        self._entries: dict[str, Verified] = {}
        self._failures: dict[str, tuple[int, OutputReadError]] = {}

    def next_round(self) -> None:
        """A dispatch round claimed jobs: what was read for the previous one only is spent."""
        with self._lock:
            self._round += 1

    def known(self, path: str, stamp: OutputStamp) -> Verified | None:
        """What was read of ``path`` at ``stamp`` and may serve this round; None when it is to be
        read (:meth:`verify`). Raises the :class:`OutputReadError` the read just before this
        round met, for the round to handle as a failed check."""
        with self._lock:
            failure = self._failures.get(path)
            if failure is not None and failure[0] == self._round - 1:
                raise failure[1]
            entry = self._entries.get(path)
            current = self._round
        if entry is None or entry.stamp != stamp:
            return None
        if not entry.lasting and entry.round != current - 1:
            return None
        return entry

    def verify(self, wanted: Sequence[Sequence[Candidate]]) -> int:
        """Read the candidates of each job in ``wanted`` in order, until one has its recorded
        bytes (the job takes that one; those after it need no read), with no transaction open.
        Each output is read once, a storage that failed is not asked again; returns how many
        outputs were read."""
        with self._lock:
            made = self._round
            self._failures = {p: f for p, f in self._failures.items() if f[0] >= made - 1}
        seen: dict[str, Verified | None] = {}
        failing: dict[str, OutputReadError] = {}
        reads = 0
        for candidates in wanted:
            for candidate in candidates:
                path = candidate.path
                failed = failing.get(storage_of(path))
                if failed is not None:
                    self._failed(path, made, failed)
                    continue
                if path not in seen:
                    try:
                        seen[path], read = self._verify_one(path, made)
                    except OutputReadError as exc:
                        failing[storage_of(path)] = exc
                        self._failed(path, made, exc)
                        continue
                    reads += read
                entry = seen[path]
                if entry is not None and entry.digest is not None and entry.digest == candidate.sha256:
                    break
        return reads

    def _failed(self, path: str, made: int, exc: OutputReadError) -> None:
        with self._lock:
            self._failures[path] = (made, exc)

    def _verify_one(self, path: str, made: int) -> tuple[Verified | None, int]:
        """Read ``path`` between two looks at its stamp (unless a lasting digest is known for the
        stamp it has); ``(None, …)`` when it is gone. :class:`OutputReadError` when it cannot."""
        started = time.time_ns()
        before = output_store.output_stamp(path)
        if before is None:
            return None, 0
        with self._lock:
            kept = self._entries.get(path)
        if kept is not None and kept.lasting and kept.stamp == before:
            return kept, 0
        digest = output_store.output_sha256(path)
        after = output_store.output_stamp(path)
        if after is None:
            return None, 1
        if after != before:
            entry = Verified(after, None, "it changed while it was read to check it", made, False)
        else:
            settled = after.changed_ns is not None and started - after.changed_ns >= RACY_SECONDS * 1e9
            # A failed read (digest None) serves the next round only, never a later one: a
            # passing EIO or a lagging store must not pass a good twin over for good.
            lasting = digest is not None and (after.by_content or settled)
            entry = Verified(after, digest, None, made, lasting)
        with self._lock:
            self._entries.pop(path, None)
            while len(self._entries) >= KEPT:
                del self._entries[next(iter(self._entries))]
            self._entries[path] = entry
        return entry, 1


#: This process's digests.
VERIFIED = VerifiedOutputs()
