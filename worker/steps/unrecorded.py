"""Accepted submissions the database could not take yet, and a database whose disk is full.

A submit fal accepted is paid for, and until its request id is recorded only the process that
sent it knows that id. When the database does not take the write — its disk is full, it cannot be
reached, or it refuses it (a constraint or a trigger, a schema older than this wanbatch's, a
corrupt file; or a bug of ours on the way) — the id must not be thrown away:

* **In memory** (:class:`Unrecorded`): the submit step keeps the id and tries again, once a
  second. A full disk does not heal by waiting, but nothing is lost by waiting either: the step
  goes on until someone frees space (no give-up, however long), and meanwhile nothing more is
  claimed or sent (:attr:`Unrecorded.full`; the conductor holds its rounds, ``run``'s progress
  line says what waits and where to free space). An unreachable database is waited for up to
  its old patience, then the id is left to the journal below. A write the database refused
  (anything but an outage: waiting a second does not change its mind) is left to the journal
  at once, said in one line with the database's words; the reconciler of this process tries it
  again every :data:`REFUSED_RETRY_SECONDS` (:meth:`Unrecorded.retry_due`) and leaves its job
  alone meanwhile (:meth:`Unrecorded.held_job_ids`: never declared "submission outcome unknown",
  nor sent again). So does every other process, while this one lives: the job is marked held in
  the database (:mod:`worker.steps.held`, :attr:`Unrecorded.marks`), the mark renewed while it
  is held here.
* **On the side** (:class:`Journal`): from the first refused write on, each such submission
  (job, attempt, request id, fal's URLs) is also kept in a small owner-only file,
  ``wanbatch-accepted-<database>-<process>.jsonl``, in the first of these folders that takes
  it: the SQLite database's own folder, the system's temporary folder, ``/dev/shm`` (memory:
  usually free when a disk is full). A few hundred bytes each; the file is removed once all are
  recorded. What cannot be kept anywhere is still in the log (one warning per submission, with
  its request id) and in the line a stopped run ends with.
* **Adopted** (:func:`worker.steps.reconcile.adopt_unrecorded`): the next process that
  reconciles this database on this host (the next ``run``, a worker's tick) records the files
  left by processes that ended, before it would declare those jobs' outcome unknown — so a
  job fal accepted is followed and downloaded, never sent (and paid for) again. An entry the
  database still refuses stays in its file (the others leave it) and its job is left alone,
  until the database takes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from jobs import db, processes
from jobs.errors import ConfigError, DatabaseFullError, DatabaseLockedError
from worker.crash import crash_file, summary
from worker.fal.models import request_id_or_none, valid_request_id

log = logging.getLogger(__name__)

#: How often a step that waits to record accepted submissions says so again (the first refusal
#: of each is said at once, with its request id).
REMINDER_SECONDS = 30.0
#: How often another process's journal files are looked for (:func:`saved_elsewhere`).
SCAN_SECONDS = 30.0
#: How often a submission whose record the database refused (not an outage: a constraint, a
#: trigger, a bug) is tried again by the reconciler of the process that holds it.
REFUSED_RETRY_SECONDS = 30.0
#: File names of the journal: ``wanbatch-accepted-<database key>-<process>.jsonl``.
PREFIX = "wanbatch-accepted-"
SUFFIX = ".jsonl"
#: Bytes of a journal file read at most (thousands of entries): anything longer is not ours.
MAX_JOURNAL_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Accepted:
    """A submit fal accepted: all that recording it needs."""

    job_id: str
    attempt: int
    request_id: str
    gateway_request_id: str | None
    status_url: str | None
    response_url: str | None
    cancel_url: str | None
    running: bool
    submitted_at: datetime
    #: The simulator of the ``run --simulate`` that sent it finished it (successfully) before it
    #: stopped: the next run's simulator takes it back finished, never runs nor bills it again
    #: (:meth:`Journal.note_finished`). Always False for fal's requests.
    finished: bool = False
    #: The seed that finished request's result carried (its video is made again from it).
    seed: int | None = None

    def line(self) -> str:
        """``job J (attempt A): request R``, for messages."""
        return f"job {self.job_id} (attempt {self.attempt}): request {self.request_id}"

    def as_json(self) -> str:
        return json.dumps({**asdict(self), "submitted_at": self.submitted_at.isoformat()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Accepted | None:
        """One journal line read back; None for a line that is not one (never trusted blindly)."""
        try:
            raw = json.loads(text)
            fields: dict[str, Any] = {
                "job_id": raw["job_id"],
                "attempt": raw["attempt"],
                "request_id": raw["request_id"],
                "gateway_request_id": request_id_or_none(raw.get("gateway_request_id")),
                "status_url": _text_or_none(raw.get("status_url")),
                "response_url": _text_or_none(raw.get("response_url")),
                "cancel_url": _text_or_none(raw.get("cancel_url")),
                "running": raw.get("running") is True,
                "submitted_at": datetime.fromisoformat(raw["submitted_at"]),
                "finished": raw.get("finished") is True,
                "seed": raw.get("seed") if type(raw.get("seed")) is int else None,
            }
        except (ValueError, TypeError, KeyError):
            return None
        if not isinstance(fields["job_id"], str) or not 0 < len(fields["job_id"]) <= 64:
            return None
        if type(fields["attempt"]) is not int or not valid_request_id(fields["request_id"]):
            return None
        if fields["submitted_at"].tzinfo is None:
            return None
        return cls(**fields)


def is_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the database's disk is full (:func:`jobs.db.is_disk_full`, or the
    one line made of it: :class:`~jobs.errors.DatabaseFullError`)."""
    return isinstance(exc, DatabaseFullError) or db.is_disk_full(exc)


def passes_by_waiting(exc: BaseException) -> bool:
    """Whether a record that failed with ``exc`` may well succeed by trying again a moment
    later: an outage, a lock, a full disk once space is freed (:func:`jobs.db.is_unavailable`)
    — not a column or table the database lacks (SQLite says "no such column" as it says an
    outage), nor a write it refused (:func:`refused_words`)."""
    if isinstance(exc, DatabaseFullError | DatabaseLockedError):
        return True
    return db.is_unavailable(exc) and not db.is_schema_mismatch(exc)


def refused_words(exc: BaseException, where: str) -> str:
    """What failed, for the line that says an accepted submission could not be recorded: the
    database's own words for a write it refused (a constraint, a trigger, a value out of range,
    a corrupt or read-only file), else a bug's, its traceback in a crash file (``where``: what
    failed, so a bug met again leaves no second file)."""
    if isinstance(exc, SQLAlchemyError | ConfigError):
        return f"the database refused the write ({db.database_problem(exc)})"
    details = crash_file(exc, where=where)
    return f"a bug: {summary(exc)} (please report it{f'; details in {details}' if details else ''})"


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and len(value) <= 2048 else None


# --------------------------------------------------------------------------- the journal


def database_key(database_url: str) -> str:
    """16 hex digits naming one database (a SQLite file's absolute path; a PostgreSQL URL
    without its password), so a journal is adopted only by processes of the same database."""
    try:
        target = db.sqlite_file(database_url)
        ident = (
            str(target.path.absolute())
            if target is not None
            else db.normalize_url(database_url).set(password=None).render_as_string(hide_password=False)
        )
    except ConfigError:
        ident = database_url
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def journal_folders(database_url: str) -> list[Path]:
    """Where journals are kept, in order of preference (see the module docstring)."""
    folders: list[Path] = []
    with contextlib.suppress(ConfigError):
        target = db.sqlite_file(database_url)
        if target is not None:
            folders.append(target.path.absolute().parent)
    # No usable temporary folder (a read-only /tmp, as in `docker --read-only`): gettempdir
    # raises FileNotFoundError (https://docs.python.org/3/library/tempfile.html#tempfile.gettempdir);
    # the other folders still serve, and Journal copes with none writable.
    with contextlib.suppress(OSError):
        folders.append(Path(tempfile.gettempdir()))
    shm = Path("/dev/shm")  # noqa: S108 (files made owner-only, O_EXCL; read back only if ours)
    if shm.is_dir():
        folders.append(shm)
    unique: list[Path] = []
    for folder in folders:
        if folder not in unique:
            unique.append(folder)
    return unique


def _owner_token() -> str:
    """``<pid>-<start>``: this process, told apart from a later one that reuses its pid."""
    return f"{os.getpid()}-{processes.started(os.getpid()) or 0}"


def _ended(owner: str) -> bool:
    """Whether the process that wrote a journal (``<pid>-<start>``) has ended. Anything else
    (a file a user saved by hand) counts as ended: its entries are for the taking."""
    pid_text, _, start = owner.partition("-")
    if not pid_text.isdigit() or int(pid_text) <= 0:
        return True
    pid = int(pid_text)
    if start not in ("", "0") and Path("/proc/self/stat").exists():
        return processes.started(pid) != start
    return not processes.exists(pid)


class Journal:
    """This process's journal file of accepted submissions not yet recorded (module docstring)."""

    def __init__(self, database_url: str, folders: Iterable[Path] | None = None) -> None:
        self.key = database_key(database_url)
        self.folders = list(folders) if folders is not None else journal_folders(database_url)
        self.name = f"{PREFIX}{self.key}-{_owner_token()}{SUFFIX}"
        #: Where the file is now (the last write that worked), None when nowhere.
        self.path: Path | None = None
        self._lock = threading.Lock()

    def save(self, entries: Iterable[Accepted]) -> Path | None:
        """Keep exactly ``entries`` (none: remove the file); where they are kept, or None when no
        folder could take them. A new copy is written beside the old one and then renamed over
        it, so a write cut short by the full disk leaves the previous copy whole."""
        lines = "".join(e.as_json() + "\n" for e in entries)
        with self._lock:
            if not lines:
                self._remove_all()
                return None
            tried = [self.path] if self.path is not None else []
            for path in tried + [f / self.name for f in self.folders if f / self.name != self.path]:
                if _write_file(path, lines):
                    self._remove_all(keep=path)
                    self.path = path
                    return path
            return None

    def _remove_all(self, keep: Path | None = None) -> None:
        for folder in self.folders:
            path = folder / self.name
            if path != keep:
                with contextlib.suppress(OSError):
                    path.unlink()
        if keep is None:
            self.path = None

    def note_finished(self, finished: Mapping[str, int | None]) -> int:
        """Mark this process's entries whose request is in ``finished`` (request id → the seed
        its result carried) as finished, in the journal file wherever it is kept; how many were
        marked. Called by ``run --simulate`` once its simulator has stopped: that simulator
        billed them, and the next run's simulator must take them back finished instead of
        running (and billing) them again. A file that cannot be read or rewritten is left as
        it is."""
        marked = 0
        with self._lock:
            for folder in self.folders:
                path = folder / self.name
                entries = read_journal(path)  # None: no file there (or unreadable)
                if not entries:
                    continue
                changed = [
                    replace(e, finished=True, seed=finished[e.request_id])
                    if e.request_id in finished and not e.finished
                    else e
                    for e in entries
                ]
                count = sum(1 for old, new in zip(entries, changed, strict=True) if old is not new)
                if count and _write_file(path, "".join(e.as_json() + "\n" for e in changed)):
                    marked += count
        return marked

    def left_by_others(self) -> list[Path]:
        """Journal files of this database that processes which have ended left behind (this
        user's own only: another user's file could name any request)."""
        found: list[Path] = []
        head = f"{PREFIX}{self.key}-"
        for folder in self.folders:
            try:
                names = [e.name for e in os.scandir(folder) if e.name.startswith(head)]
            except OSError:
                continue
            for name in names:
                owner = name[len(head) : -len(SUFFIX)] if name.endswith(SUFFIX) else None
                if owner is None or name == self.name or not _ended(owner):
                    continue
                path = folder / name
                with contextlib.suppress(OSError):
                    info = path.lstat()
                    if info.st_uid == os.geteuid() and (info.st_mode & 0o170000) == 0o100000:
                        found.append(path)
        return found


def _write_file(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` (owner-only, synced) by way of a temporary file; False when
    the folder cannot take it (full, read-only, missing)."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()  # a copy a crash left; never followed (O_EXCL, O_NOFOLLOW below)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        temporary.replace(path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        return False


def read_journal(path: Path) -> list[Accepted] | None:
    """The entries of a journal file; None when it cannot be read (it is left alone)."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_JOURNAL_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_JOURNAL_BYTES:
        return None
    entries = [Accepted.from_json(line) for line in data.decode("utf-8", errors="replace").splitlines()]
    return [e for e in entries if e is not None]


def keep_only(path: Path, entries: Iterable[Accepted]) -> bool:
    """Rewrite the journal file ``path`` (one a process that ended left) with only ``entries``:
    those the database still refuses, once the others are recorded. False when it could not be
    rewritten (it is left as it was: recording an entry again changes nothing)."""
    return _write_file(path, "".join(e.as_json() + "\n" for e in entries))


# --------------------------------------------------------------------------- in memory


class Unrecorded:
    """What this process knows that the database does not have yet, and whether its disk is full.

    Shared by the submit steps (which keep an accepted id until it is recorded), the conductor
    (which holds its rounds while the disk is full and a step still waits) and ``run``'s progress
    line and last words. Every method may be called from any thread.
    """

    def __init__(self, database_url: str, journal: Journal | None = None) -> None:
        self.database_url = database_url
        self.journal = journal if journal is not None else Journal(database_url)
        #: Set when the run stops for good (Ctrl-C, or a full disk with nothing left to wait
        #: for): steps stop retrying and leave their ids to the journal.
        self.given_up = threading.Event()
        self._lock = threading.Lock()
        self._saving = threading.Lock()  # one journal write at a time, each of the latest list
        self._waiting: dict[str, Accepted] = {}  # retried by their steps
        self._left: dict[str, Accepted] = {}  # given up by their steps; kept in the journal
        self._recording: dict[str, Accepted] = {}  # being recorded by their steps right now
        #: Job id -> when (``time.monotonic()``) the database, which refused to record the
        #: submission, is asked again (:meth:`refused`).
        self._refused: dict[str, float] = {}
        #: Entries of other processes' journals the database refused: their jobs are left alone.
        self._others: dict[str, Accepted] = {}
        self._steps = 0  # submit steps under way
        self._posting = 0  # submit POSTs sent whose answer is not held here yet (:meth:`sending`)
        self._closed = False  # the run stops: no new POST goes out (:meth:`stop_sending`)
        self._posted = threading.Condition(self._lock)  # told when one is
        self._full_since: float | None = None
        self._next_reminder = 0.0
        self._next_scan = 0.0
        #: Marks in the database the jobs held here, for every other process
        #: (:class:`worker.steps.held.HeldMarks`); None: nothing marks them (a bare instance).
        self.marks: Marks | None = None
        #: Held while the submissions of this process are tried again: by its reconciler, or by
        #: the keeper of its marks when it does not reconcile (:func:`worker.steps.reconcile.retry_held`).
        self.retrying = threading.Lock()
        #: When (``time.monotonic()``) this process's reconciler last tried them (0: never).
        self.reconciled_at = 0.0

    # ------------------------------------------------------------------ the disk

    @property
    def full(self) -> bool:
        """Whether the database's disk was found full and no write has worked since: nothing
        new is sent meanwhile (an accepted id it could not record would only join the wait)."""
        return self._full_since is not None

    def mark_full(self) -> bool:
        """A write was refused for want of space (:func:`jobs.db.is_disk_full`); True when the
        disk was not known to be full before."""
        with self._lock:
            if self._full_since is not None:
                return False
            self._full_since = time.monotonic()
            self._next_reminder = self._full_since + REMINDER_SECONDS
            return True

    def writable(self) -> None:
        """A write worked: space was freed — unless submissions still wait to be recorded (the
        write that worked may have needed less room than theirs): they tell, by landing."""
        with self._lock:
            if not self._waiting:
                self._full_since = None

    @property
    def place(self) -> str:
        """Where to free space: the SQLite file's folder, or the PostgreSQL server."""
        with contextlib.suppress(ConfigError):
            target = db.sqlite_file(self.database_url)
            if target is not None:
                return f"the disk of {target.path.absolute().parent}"
        return f"the database server ({db.safe_url(self.database_url)})"

    # ------------------------------------------------------------------ the steps

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Count a submit step while it runs (:meth:`busy`)."""
        with self._lock:
            self._steps += 1
        try:
            yield
        finally:
            with self._lock:
                self._steps -= 1

    def busy(self) -> bool:
        """Whether a submit step of this process is under way (one that waits to record an
        accepted id stays under way until it is recorded, or :attr:`given_up`)."""
        return self._steps > 0

    def sending(self) -> Sending | None:
        """A submit POST is under way, from its send's record on: asked by the step once that
        record's write holds the job's row, before it commits (so that a send is recorded only
        once nothing stops it any more: a stop can no longer come between that record and the
        POST, leaving a job that reads "its POST may be out" though nothing went; nor is a step
        whose record still waits — for another session's lock — counted as sent to fal):
        counted in flight until its :meth:`Sending.end` — once its answer is held here
        (:meth:`recording`), or it failed, or the step gave its job back before the POST — so
        that a process ending without the database waits for its answer before keeping what
        fal accepted (:meth:`wait_for_sends`): an answer that arrives after the journal is
        written is lost.

        None once the run stops (:meth:`stop_sending`): the send's record is rolled back and the
        POST does not go. A stopping run waits for the answers of those already under way, and
        a step that got past its lease while that wait began would otherwise send a new one,
        billed, that nobody waits for."""
        with self._lock:
            if self._closed:
                return None
            self._posting += 1
        return Sending(self)

    def stop_sending(self) -> int:
        """The run stops: no submit POST goes out from now on (:meth:`sending` answers None);
        returns how many are in flight, whose answers are still awaited."""
        with self._lock:
            self._closed = True
            return self._posting

    def in_flight_unlocked(self) -> int:
        """:meth:`in_flight` without taking the lock, for a signal handler: the thread it
        interrupted may hold that lock, and the handler must never wait on it."""
        return self._posting

    def _sent(self) -> None:
        with self._lock:
            self._posting -= 1
            self._posted.notify_all()

    def in_flight(self) -> int:
        """How many submit POSTs of this process wait for fal's answer."""
        with self._lock:
            return self._posting

    def wait_for_sends(self, bound: float) -> int:
        """Wait, up to ``bound`` seconds, until no submit POST of this process waits for fal's
        answer any more (each is bounded by its own HTTP deadline); returns how many did when
        this began."""
        deadline = time.monotonic() + bound
        with self._posted:
            count = self._posting
            while self._posting > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._posted.wait(left)
        return count

    @contextlib.contextmanager
    def recording(self, accepted: Accepted, sent: Sending | None = None) -> Iterator[None]:
        """While a step records ``accepted``: held in memory only (nothing is written on this,
        the usual path), so that a process that must end while the database gives no answer at
        all — the write neither lands nor fails — can still keep it (:meth:`keep_all`). ``sent``,
        the POST that brought it, stops counting in flight once it is held."""
        with self._lock:
            self._recording[accepted.job_id] = accepted
        if sent is not None:
            sent.end()
        try:
            yield
        finally:
            with self._lock:
                self._recording.pop(accepted.job_id, None)

    def keep_all(self) -> list[Accepted]:
        """The process ends now without waiting for the database (it does not answer): every
        accepted submission not known to be recorded — those whose write is on its way
        included — goes to the journal, for the next run to record (adopting one whose write
        landed after all changes nothing: :func:`worker.steps.reconcile.adopt_unrecorded`).
        Returns them.

        Those being written move to the given-up list, under the journal's own lock: every
        later save (a step's :meth:`keep` or :meth:`recorded` while the process ends) writes
        that list too, so none drops them — a submission missing from the journal would be
        found ``submitting`` without its request id by the next run, and may be sent (and
        paid for) again."""
        with self._saving:
            with self._lock:
                for job_id, accepted in self._recording.items():
                    if job_id not in self._waiting:
                        self._left.setdefault(job_id, accepted)
                entries = [*self._waiting.values(), *self._left.values()]
            if entries:
                self.journal.save(entries)
        return entries

    def keep(self, accepted: Accepted) -> Path | None:
        """``accepted`` could not be recorded: wait with it, and keep it in the journal too;
        where it is kept (None: nowhere could take it). Its job is marked held for the other
        processes from now on (:attr:`marks`, renewed while it is held)."""
        with self._lock:
            self._left.pop(accepted.job_id, None)  # kept by keep_all while being written
            self._waiting[accepted.job_id] = accepted
        where = self._save()
        if self.marks is not None:
            self.marks.wake()
        return where

    def recorded(self, accepted: Accepted) -> None:
        """``accepted`` is in the database now (its mark goes)."""
        with self._lock:
            waited = self._waiting.pop(accepted.job_id, None)
            left = self._left.pop(accepted.job_id, None)
            self._refused.pop(accepted.job_id, None)
            other = self._others.pop(accepted.job_id, None)
        if waited is not None or left is not None:
            self._save()
        if self.marks is not None and (waited or left or other) is not None:
            self.marks.release({accepted.job_id: accepted.request_id})

    def leave(self, accepted: Accepted) -> None:
        """Its step stops waiting: ``accepted`` stays in the journal (and in memory, for
        :func:`worker.steps.reconcile.adopt_unrecorded` in this process)."""
        with self._lock:
            if self._waiting.pop(accepted.job_id, None) is not None:
                self._left[accepted.job_id] = accepted

    def refused(self, accepted: Accepted) -> bool:
        """The database refused to record ``accepted`` (not an outage): asked again in
        :data:`REFUSED_RETRY_SECONDS`, its job marked held for the other processes at once
        (:attr:`marks`: not on the job's row, the one refused). True the first time (to be
        said, once)."""
        with self._lock:
            first = accepted.job_id not in self._refused
            self._refused[accepted.job_id] = time.monotonic() + REFUSED_RETRY_SECONDS
        if self.marks is not None:
            self.marks.hold(accepted)
        return first

    def retry_due(self, accepted: Accepted) -> bool:
        """Whether to try recording ``accepted`` now: at once, unless the database refused it
        less than :data:`REFUSED_RETRY_SECONDS` ago."""
        with self._lock:
            return self._refused.get(accepted.job_id, 0.0) <= time.monotonic()

    def refused_elsewhere(self, entries: Iterable[Accepted]) -> None:
        """The entries of other processes' journals the database refused at the last look:
        their jobs are left alone (:meth:`held_job_ids`) until it takes them."""
        with self._lock:
            self._others = {e.job_id: e for e in entries}
            others = bool(self._others)
        if others and self.marks is not None:
            self.marks.wake()

    def marked(self) -> dict[str, str]:
        """The jobs to mark held for the other processes (job id → request id): every accepted
        submission held here that a write failed for (this process's, waited for or given up;
        another's journal entry it adopted and the database refused). Not one whose first
        write is still on its way (the usual path, a few milliseconds)."""
        with self._lock:
            return {
                e.job_id: e.request_id
                for e in (*self._waiting.values(), *self._left.values(), *self._others.values())
            }

    def held_job_ids(self) -> set[str]:
        """The jobs whose accepted submission is held here and not recorded yet (waited for,
        given up, being written, or refused in another process's journal): the reconciler
        leaves them alone — never "submission outcome unknown", never sent again."""
        with self._lock:
            return {*self._waiting, *self._left, *self._recording, *self._others}

    def refused_count(self) -> int:
        """How many submissions of this process the database refused to record, not yet taken."""
        with self._lock:
            return sum(1 for job_id in self._refused if job_id in self._waiting or job_id in self._left)

    def left(self) -> list[Accepted]:
        """The submissions their steps gave up on, not recorded yet."""
        with self._lock:
            return list(self._left.values())

    def waiting(self) -> list[Accepted]:
        """Every accepted submission not recorded yet (waited for, or given up on)."""
        with self._lock:
            return [*self._waiting.values(), *self._left.values()]

    def _save(self) -> Path | None:
        with self._saving:
            return self.journal.save(self.waiting())

    def give_up(self, grace: float) -> list[Accepted]:
        """The run stops for good: steps stop waiting (within a second) and what they still
        hold stays in the journal. Waits up to ``grace`` seconds for steps whose POST is on its
        way (its answer joins the list); returns every submission not recorded."""
        self.given_up.set()
        deadline = time.monotonic() + grace
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.waiting()

    # ------------------------------------------------------------------ saying so

    def note(self) -> str | None:
        """The progress line's words while the disk is full, or while the database refuses to
        record submissions fal accepted (None otherwise)."""
        if not self.full:
            refused = self.refused_count()
            if not refused:
                return None
            path = self.journal.path
            where = f"kept in {path}" if path else "logged (event submit.unrecorded)"
            return (
                f"{refused} accepted submission(s) the database refused to record: {where}, tried "
                f"again every {REFUSED_RETRY_SECONDS:g}s (see the error above)"
            )
        count = len(self.waiting())
        if count:
            return (
                f"database full: {count} accepted submission(s) waiting to be recorded; "
                f"free space on {self.place}"
            )
        return f"database full: nothing is sent; free space on {self.place}"

    def reminder_due(self) -> bool:
        """True at most once every :data:`REMINDER_SECONDS` (for all threads together)."""
        now = time.monotonic()
        with self._lock:
            if now < self._next_reminder:
                return False
            self._next_reminder = now + REMINDER_SECONDS
            return True

    def scan_due(self) -> bool:
        """True at most once every :data:`SCAN_SECONDS`: time to look for journals others left."""
        now = time.monotonic()
        with self._lock:
            if now < self._next_scan:
                return False
            self._next_scan = now + SCAN_SECONDS
            return True

    def lost_words(self, lost: list[Accepted], by: str = "run") -> str:
        """What a stopping run (``by``: or a ``worker``) says of the submissions it could not
        record (empty: none)."""
        if not lost:
            return ""
        ids = ", ".join(a.line() for a in lost)
        where = self.journal.path
        if where is not None:
            then = f"kept in {where}: the next {by} on this host records them (none is sent again)"
        else:
            folders = ", ".join(map(str, self.journal.folders))
            saved = self.journal.folders[0] / f"{PREFIX}{self.journal.key}-saved{SUFFIX}"
            then = (
                f"they could not be kept on disk either (no room in {folders}); each is logged "
                f"above as JSON (event submit.unrecorded): save those lines as {saved} once there "
                f"is room, and the next {by} records them"
            )
        return (
            f"{len(lost)} accepted submission(s) could not be recorded (fal has them, and bills "
            f"them): {ids}; {then}"
        )


class Marks(Protocol):
    """What marks the jobs held here in the database (:class:`worker.steps.held.HeldMarks`)."""

    def hold(self, accepted: Accepted) -> None:
        """Mark ``accepted``'s job held now (a refused record), and keep renewing."""

    def wake(self) -> None:
        """Something is held: renew the marks from now on."""

    def release(self, held: Mapping[str, str]) -> None:
        """Those submissions (job id → request id) are recorded: their marks go."""


class Sending:
    """One submit POST in flight (:meth:`Unrecorded.sending`); :meth:`end` once, or more."""

    def __init__(self, unrecorded: Unrecorded) -> None:
        self._unrecorded = unrecorded
        self._ended = False

    def end(self) -> None:
        """Its answer is held (or there is none to hold): no longer in flight."""
        if not self._ended:
            self._ended = True
            self._unrecorded._sent()
