"""A thread that cannot start: a resource limit of this machine, told in one line.

CPython raises ``RuntimeError("can't start new thread")`` when ``pthread_create`` fails — a
process or thread limit reached (``ulimit -u``, ``RLIMIT_NPROC``, which counts every thread of
the user; a container's ``pids`` limit), or no memory left for the thread's stack
(https://docs.python.org/3/library/_thread.html#thread.start_new_thread,
https://man7.org/linux/man-pages/man3/pthread_create.3.html: ``EAGAIN``). The same class is
what a :class:`concurrent.futures.ThreadPoolExecutor` raises once it is shut down ("cannot
schedule new futures after shutdown"): :func:`cannot_start_thread` tells the two apart, and
:func:`thread_limit_line` says what to do instead of an "internal error" or a run that hangs.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from jobs.errors import UsageError

#: The message of CPython's RuntimeError when a thread cannot be created.
CANT_START_THREAD = "can't start new thread"


class ThreadLimitError(UsageError):
    """No thread could be started: a limit of this machine (``ulimit -u``), not a bug."""


def cannot_start_thread(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or a cause of it) is CPython's failure to start a thread."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RuntimeError) and CANT_START_THREAD in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _threads_in_use() -> int:
    """This process's threads, as the kernel counts them (FFmpeg's and the database driver's
    too: ``Threads:`` of ``/proc/self/status``); Python's own count elsewhere."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("Threads:"):
                return int(line.split(":", 1)[1])
    return threading.active_count()


def _nproc_limit() -> str:
    """The soft ``RLIMIT_NPROC`` (``ulimit -u``) in words."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NPROC)
    except (ImportError, AttributeError, OSError, ValueError):
        return "unknown"
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


def _concurrency() -> str:
    """WANBATCH_EMBEDDED_CONCURRENCY as this process reads it ("?" when the settings cannot be read)."""
    try:
        from jobs.settings import get_settings

        return str(get_settings().embedded_concurrency)
    except Exception:
        return "?"


def thread_limit_line() -> str:
    """The one line for a thread that could not start: the limit, the threads in use, the fix."""
    return (
        f"cannot start another thread: this process reached a limit on threads or processes "
        f"(`ulimit -u` is {_nproc_limit()}, which counts every thread of the user; {_threads_in_use()} "
        f"threads in this process), or the memory for a thread's stack (`ulimit -v`): raise those "
        f"limits (LimitNPROC=/TasksMax= for a systemd service, a container's pids or memory limit), or "
        f"lower WANBATCH_EMBEDDED_CONCURRENCY (now {_concurrency()})"
    )
