"""Open files (file descriptors): this process's limit, and saying so when it runs out.

A process that runs out of file descriptors (``EMFILE``; the whole system: ``ENFILE``) fails
wherever it next opens something: a socket to fal, an output file, a listing of the output
folder, a connection the bundled simulator accepts. Each of those used to be told as its own
trouble ("fal is unreachable", "free space or fix WANBATCH_OUTPUT_DIR"), and the simulator's
accept loop logged a traceback a thousand times a second. :func:`out_of_files` tells the case
from others by the error's ``errno`` (anywhere in its causes), and says what to do: raise the
open-file limit. :func:`raise_soft_limit` raises this process's soft limit toward its hard one
at start-up (what many servers do); :func:`quiet_accept_errors` turns asyncio's accept-loop
error into one line, at most every :data:`ACCEPT_SAID_EVERY_SECONDS`, without a traceback.
"""

from __future__ import annotations

import errno
import logging
import threading
import time

#: What an ``EMFILE`` and an ``ENFILE`` mean, and what to do about each.
EMFILE_SAID = "this process ran out of file descriptors (too many open files, EMFILE)"
EMFILE_FIX = (
    "raise the open-file limit (`ulimit -n 4096` in the shell that starts wanbatch; "
    "LimitNOFILE= for a systemd service, ulimits: nofile for a container)"
)
ENFILE_SAID = "the system ran out of file descriptors (too many open files in the system, ENFILE)"
ENFILE_FIX = "close other programs, or raise the system's limit (sysctl fs.file-max)"
#: The soft limit :func:`raise_soft_limit` raises to (at most the hard limit).
TARGET_SOFT_LIMIT = 65536
#: asyncio's accept-loop error is said at most this often.
ACCEPT_SAID_EVERY_SECONDS = 30.0
_ACCEPT_MESSAGE = "socket.accept() out of system resource"
#: asyncio's retry of such an accept, a second later, fails this way when the server has closed
#: its socket meanwhile (a run ending): "Invalid file descriptor: -1".
_RETRY_AFTER_CLOSE = "Exception in callback BaseSelectorEventLoop._start_serving"


def os_errno(exc: BaseException | None) -> int | None:
    """The ``errno`` of the first :class:`OSError` in ``exc`` or its causes (None: none has one)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def out_of_files(exc: BaseException | None) -> tuple[str, str] | None:
    """``(what happened, what to do)`` when ``exc`` (or a cause of it) says the process or the
    system ran out of file descriptors; None otherwise."""
    code = os_errno(exc)
    if code == errno.EMFILE:
        return EMFILE_SAID, EMFILE_FIX
    if code == errno.ENFILE:
        return ENFILE_SAID, ENFILE_FIX
    return None


#: The ``errno`` values that say this machine (or this process's limits) ran short, not that a
#: file or an answer is bad: file descriptors, memory, a resource "temporarily unavailable",
#: buffer space (https://man7.org/linux/man-pages/man3/errno.3.html). Such a failure is ours to
#: fix, never a verdict on what fal delivered.
LOCAL_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.ENOBUFS})


def local_resource_errno(exc: BaseException | None) -> int | None:
    """The ``errno`` (one of :data:`LOCAL_RESOURCE_ERRNOS`) when ``exc`` or a cause of it says
    this machine ran short of a resource; None otherwise. A :class:`MemoryError` counts as
    ``ENOMEM``: PyAV raises its ``av.error.MemoryError`` (a MemoryError, not an OSError) for
    FFmpeg's ``AVERROR(ENOMEM)`` (https://pyav.org/docs/stable/api/error.html)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = getattr(exc, "errno", None)
        if isinstance(exc, OSError | MemoryError) and code in LOCAL_RESOURCE_ERRNOS:
            return int(code)
        if isinstance(exc, MemoryError):
            return errno.ENOMEM
        exc = exc.__cause__ or exc.__context__
    return None


def says_out_of_files(text: str) -> bool:
    """Whether a message (an error's text) is one :func:`out_of_files` worded."""
    return EMFILE_SAID in text or ENFILE_SAID in text


def raise_soft_limit(target: int = TARGET_SOFT_LIMIT) -> int | None:
    """Raise this process's soft open-file limit to ``target``, or to its hard limit when that is
    lower (never lowers it; a process may always do this much). Returns the soft limit now."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (OSError, ValueError):  # a system that refuses it: keep what there is
            pass
    return soft


class _AcceptOutOfFiles(logging.Filter):
    """asyncio's "socket.accept() out of system resource" (a server of this process could not
    accept a connection: no file descriptor left), as one line without a traceback, at most
    every :data:`ACCEPT_SAID_EVERY_SECONDS`; the other records of the logger pass unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._said_at: float | None = None
        self._since_said = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(_RETRY_AFTER_CLOSE) and record.exc_info and record.exc_info[0] is ValueError:
            return False  # the retry of an accept that failed, due after the server closed: nothing lost
        if not message.startswith(_ACCEPT_MESSAGE):
            return True
        with self._lock:
            now = time.monotonic()
            if self._said_at is not None and now - self._said_at < ACCEPT_SAID_EVERY_SECONDS:
                self._since_said += 1
                return False
            self._said_at, again = now, self._since_said
            self._since_said = 0
        exc = record.exc_info[1] if record.exc_info else None
        said, fix = out_of_files(exc) or (
            f"the system refused a resource ({exc.strerror if isinstance(exc, OSError) else exc})",
            "free memory or file descriptors",
        )
        more = f" ({again} more times since last said)" if again else ""
        record.msg = "a server of this process cannot accept connections%s: %s; %s"
        record.args = (more, said, fix)
        record.exc_info = None
        record.exc_text = None
        return True


_accept_filter = _AcceptOutOfFiles()


def quiet_accept_errors() -> None:
    """Install the accept-loop filter on the ``asyncio`` logger (once: installing again is a no-op)."""
    logger = logging.getLogger("asyncio")
    if _accept_filter not in logger.filters:
        logger.addFilter(_accept_filter)


def files_needed(concurrency: int) -> int:
    """About the fewest file descriptors a process doing the work with ``concurrency`` threads
    needs (the interpreter, the database and its journal, the log, a connection to fal and an
    output file per thread, the bundled simulator's side of each connection); a batch of a
    dozen jobs at the default 4 threads ran out at 20 and got by with 24."""
    return 24 + 2 * concurrency


#: Status calls a poll makes at once (``worker.steps.poll.STATUS_THREADS``), each on a connection
#: of its own: room :func:`streams_that_fit` keeps for them.
STATUS_CALLS_AT_ONCE = 8


def soft_limit() -> int | None:
    """This process's soft open-file limit now (None: unlimited, or no such limit here)."""
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def streams_that_fit(concurrency: int, *, simulator_here: bool, soft: int | None = None) -> int | None:
    """How many fal status streams (:mod:`worker.watcher`) fit under the open-file limit ``soft``
    (this process's by default: :func:`soft_limit`) beside what ``concurrency`` threads need
    (:func:`files_needed`); None when nothing limits them.

    Each stream holds a connection for as long as its request is at fal, one per outstanding
    request: at ``WANBATCH_MAX_OUTSTANDING=30`` and ``ulimit -n 40`` (which :func:`require_open_files`
    accepts for 4 threads) the streams took the last descriptors, and the database's own files
    then failed to open (``EMFILE``) under a submit that fal had accepted. A stream of a
    ``--simulate`` run (``simulator_here``) holds two: the bundled simulator in this process
    holds the other end. Requests beyond the streams that fit are polled, as those beyond the
    watcher's own bound are, :data:`STATUS_CALLS_AT_ONCE` calls at once: room is kept for them."""
    soft = soft_limit() if soft is None else soft
    if soft is None:
        return None
    per_connection = 2 if simulator_here else 1
    polls = STATUS_CALLS_AT_ONCE * per_connection  # the requests not streamed are polled, so many at once
    return max(0, soft - files_needed(concurrency) - polls) // per_connection


def require_open_files(concurrency: int) -> None:
    """Before a process does the work (``run``, ``rerun``): raise the soft open-file limit
    toward the hard one (:func:`raise_soft_limit`), and refuse, in one line, a limit that stays
    far too low for ``concurrency`` threads (:func:`files_needed`): such a run would pause its
    batch at its first download and hold its submits, each for a reason that is not the one."""
    from jobs.errors import ConfigError

    soft = raise_soft_limit()
    needed = files_needed(concurrency)
    if soft is not None and soft < needed:
        raise ConfigError(
            f"the open-file limit of this process is {soft} (`ulimit -n`), and its hard limit no higher: "
            f"far too low to run a batch with {concurrency} worker thread(s) (about {needed} are needed): "
            f"{EMFILE_FIX}"
        )
