"""Start-up without the cyclic garbage collector: a command's imports, then the GC frozen past them.

Importing what a command needs (SQLAlchemy, pydantic, httpx, Celery, PyAV, …) builds a few
hundred thousand objects that live as long as the process. Every 700 allocations CPython's
collector looks at the youngest of them, and every so often at all of them, during the imports
and again in the first seconds of the work: about a tenth of the imports' CPU, and a one-job
``wanbatch run`` took 0.3–0.4 s of CPU more with it than without (every process of a
distributed deployment pays as much). None of it frees anything: the objects are reachable
until exit.

So :func:`pause` (first thing in :func:`cli.main`) turns the collector off, and :func:`resume`
— called by the commands that go on working (``run``, ``worker``, ``serve``, ``simulator``)
once their machinery is loaded — moves everything alive into the permanent generation
(:func:`gc.freeze`, https://docs.python.org/3/library/gc.html#gc.freeze: later collections
never traverse it again) and turns the collector back on. Reference counting frees memory as
usual meanwhile; only cyclic garbage waits. A command that never calls :func:`resume` gets
the collector back after :data:`RESUME_AFTER_SECONDS` anyway, so no process ever runs long
without it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
from collections.abc import Iterator

#: The collector is back on this long after :func:`pause` at the latest, whatever the command.
RESUME_AFTER_SECONDS = 10.0

_lock = threading.Lock()
_paused = False


#: glibc's ``mallopt`` parameter for the most malloc arenas a process may have (``M_ARENA_MAX``
#: in glibc's malloc.h, https://man7.org/linux/man-pages/man3/mallopt.3.html).
_M_ARENA_MAX = -8
#: The malloc arenas wanbatch's own processes use (:func:`fewer_malloc_arenas`).
MALLOC_ARENAS = 2


def fewer_malloc_arenas() -> bool:
    """Cap glibc's malloc at :data:`MALLOC_ARENAS` arenas, before the command starts threads;
    whether it was capped here.

    glibc gives each new thread an arena of its own, up to eight per core, and never hands the
    free space of an arena back to the system. ``wanbatch run`` and the workers keep dozens of
    threads (submits, downloads, one per status stream), each allocating HTTP bodies, SQLite
    pages and TLS buffers and freeing them again: the free space kept across up to 16 arenas
    grew with every job (peak RSS 165 MB at 1,000 jobs, 225 MB at 20,000; the memory in use
    stayed at ~35 MB), where two arenas keep it flat (149 MB against 194 MB at 3,600 jobs) for
    no measurable CPU (the interpreter lock already keeps the threads from allocating at once).
    An arena limit the user set for glibc (``MALLOC_ARENA_MAX``, or ``glibc.malloc.arena_max``
    in ``GLIBC_TUNABLES``) is left to decide; another C library (musl: no ``mallopt`` to find,
    or one that ignores it) and a Python built without :mod:`ctypes` are left alone.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or "MALLOC_ARENA_MAX" in os.environ or "malloc.arena_max" in tunables:
        return False
    try:
        import ctypes  # here, not at the top: every command imports this module

        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (ImportError, OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, MALLOC_ARENAS))


def pause() -> None:
    """Turn the cyclic GC off for the start-up (no-op when it is off already: someone else's)."""
    global _paused
    with _lock:
        if _paused or not gc.isenabled():
            return
        gc.disable()
        _paused = True
    timer = threading.Timer(RESUME_AFTER_SECONDS, resume)
    timer.daemon = True
    timer.name = "wanbatch-gc-resume"
    timer.start()


def resume() -> None:
    """The start-up is over: freeze what it built and turn the GC back on (idempotent)."""
    global _paused
    with _lock:
        if not _paused:
            return
        _paused = False
        gc.freeze()
        gc.enable()


#: Modules that libraries wanbatch uses import only because they happen to be installed, for
#: features wanbatch never uses: httpx imports its command-line client (``httpx._main``: Rich's
#: progress bars and syntax highlighting, Pygments' lexers) whenever click, Rich and Pygments are
#: installed — and wanbatch depends on the first two. About a tenth of a second of each ``run``'s
#: start-up CPU. Only a module whose absence binds nothing another program in the process needs
#: belongs here: httpx binds a stand-in ``httpx.main`` (its CLI) when this import fails. (trio,
#: which httpcore imports when installed, does not: httpcore binds ``trio = None`` for good, and
#: a later trio program in the same process could not use httpx.)
UNUSED_OPTIONAL_MODULES = ("httpx._main",)


@contextlib.contextmanager
def without_unused_modules() -> Iterator[None]:
    """While a command runs, importing an :data:`UNUSED_OPTIONAL_MODULES` one fails as if it were
    not installed (``None`` in :data:`sys.modules`: https://docs.python.org/3/reference/import.html#the-module-cache),
    which httpx and httpcore both handle by doing without it. One already imported is left as it
    is, and the stand-ins are taken out again afterwards (a test process runs commands in its own)."""
    added = [name for name in UNUSED_OPTIONAL_MODULES if name not in sys.modules]
    for name in added:
        sys.modules[name] = None  # type: ignore[assignment]  # documented: "not installed"
    try:
        yield
    finally:
        for name in added:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
