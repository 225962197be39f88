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

The command's own process also keeps the code of the methods :mod:`dataclasses` compiles from
source at every start (:class:`MethodCache`), does without trio (:data:`COMMAND_ONLY_UNUSED_MODULES`),
and ends without tearing its heap down object by object (:func:`end_process`).
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import gc
import marshal
import os
import sys
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from importlib.util import MAGIC_NUMBER, cache_from_source
from pathlib import Path
from types import CodeType
from typing import Any, cast

#: The collector is back on this long after :func:`pause` at the latest, whatever the command.
RESUME_AFTER_SECONDS = 10.0

_lock = threading.Lock()
_paused = False


#: glibc's ``mallopt`` parameter for the most malloc arenas a process may have (``M_ARENA_MAX``
#: in glibc's malloc.h, https://man7.org/linux/man-pages/man3/mallopt.3.html).
_M_ARENA_MAX = -8
#: The malloc arenas wanbatch's own processes use (:func:`fewer_malloc_arenas`).
MALLOC_ARENAS = 2
#: glibc's ``mallopt`` parameters of the size from which a block is mapped on its own
#: (``M_MMAP_THRESHOLD``) and of the free space at the top of a heap that is handed back to the
#: kernel (``M_TRIM_THRESHOLD``), in glibc's malloc.h (the same man page).
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
#: Blocks up to this size come from the heap (:func:`steady_malloc_thresholds`): above a
#: 1080p frame's largest plane (1920×1080 is ~2.1 MB of luma with FFmpeg's padding).
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Free space at a heap's top kept instead of handed back: twice :data:`MMAP_THRESHOLD`, as
#: glibc's own dynamic rule sets it when it raises the mmap threshold.
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
#: What a user sets glibc's thresholds with (environment, ``GLIBC_TUNABLES``): any of them
#: leaves all of them to the user, since setting one turns glibc's dynamic thresholds off.
_THRESHOLD_VARIABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)
_THRESHOLD_TUNABLES = ("malloc.mmap_threshold", "malloc.trim_threshold", "malloc.top_pad", "malloc.mmap_max")


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt`` of this process; None on another C library (musl has none), another
    system, or a Python built without :mod:`ctypes`."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes  # here, not at the top: every command imports this module

        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (ImportError, OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return cast("Callable[[int, int], int]", mallopt)


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
    if "MALLOC_ARENA_MAX" in os.environ or "malloc.arena_max" in tunables:
        return False
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, MALLOC_ARENAS))


def steady_malloc_thresholds() -> bool:
    """Keep blocks up to :data:`MMAP_THRESHOLD` in glibc's heaps, and up to
    :data:`TRIM_THRESHOLD` of free space at a heap's top, for the whole process; whether they
    were set here.

    Each downloaded output is probed (:func:`worker.probe.probe`): one H.264 decoder opened,
    one frame decoded, the decoder closed, its buffers freed (a frame pool of ~0.6 MB at 480p,
    ~3 MB at 1080p, and the decoder's tables). glibc's defaults map a block above 128 KiB on its
    own and hand a heap's free top above 128 KiB back to the kernel, raising both only once a
    mapped block is freed (its "dynamic" thresholds, mallopt(3)): how far they had risen
    depended on what else the process had freed, and mostly they had not, so the freed
    decoder went back to the kernel at every probe, and the next probe faulted every page of
    it in again: ~300 page faults a probe of a 480p clip, ~800 at 1080p, where with these
    settings it is ~1 (counted with ``getrusage`` over 300 probes in a thread). The memory kept is
    what the next probe takes again; peak memory is the same (a 200-job simulator drain: ~23K
    page faults instead of 27K-100K, peak RSS ~117 MB either way). It is set at the start of
    every ``wanbatch`` process (:func:`cli._main`): ``run``, ``worker`` (whose prefork children
    inherit it through ``fork``), ``serve``, and the short commands, where it costs nothing.
    Both are needed: the mmap
    threshold alone still trims the heap, and the trim threshold alone freezes the mmap
    threshold wherever the dynamic rule had left it (setting either turns the rule off).
    Thresholds the user set for glibc (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
    ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_``, or their ``glibc.malloc.*`` tunables) are left
    to decide, all of them; another C library and a Python without :mod:`ctypes` are left alone.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(v in os.environ for v in _THRESHOLD_VARIABLES) or any(t in tunables for t in _THRESHOLD_TUNABLES):
        return False
    mallopt = _mallopt()
    if mallopt is None or not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


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
    if _method_cache is not None:  # the command's machinery is loaded: its methods are all known
        _method_cache.save()


def set_aside() -> None:
    """Freeze what the start-up built so far (:func:`gc.freeze`), the collector left as it is.

    Called by the ``wanbatch`` process itself once its command line, its libraries and its
    settings are loaded and before the command runs (:func:`cli._main`). Even with the collector
    off (:func:`pause`), the interpreter's exit collects once over every object still tracked:
    for a short command (``validate``, ``estimate``, ``--version``…), a walk over the hundred
    thousand objects of click, Rich and pydantic, about a tenth of its CPU. Frozen, they are left
    out of it; they live until the process ends anyway. What the command itself makes afterwards
    (an engine, its SQLite connections: the last one removes the ``-wal`` and ``-shm`` files) is
    still collected then, as before.
    """
    gc.freeze()


#: Modules that libraries wanbatch uses import only because they happen to be installed, for
#: features wanbatch never uses: httpx imports its command-line client (``httpx._main``: Rich's
#: progress bars and syntax highlighting, Pygments' lexers) whenever click, Rich and Pygments are
#: installed — and wanbatch depends on the first two. About a tenth of a second of each ``run``'s
#: start-up CPU. Only a module whose absence binds nothing another program in the process needs
#: belongs here: httpx binds a stand-in ``httpx.main`` (its CLI) when this import fails.
UNUSED_OPTIONAL_MODULES = ("httpx._main",)

#: Modules stood in for only in a process that is the ``wanbatch`` command itself (the console
#: script, ``python -m cli``: see :func:`cli._launched_as_command`), where no other program runs.
#: httpcore imports trio (with attrs, outcome and sortedcontainers: about 45 ms of CPU, a
#: sixteenth of a ``run``'s start-up) whenever it is installed, for the locks of a program that
#: runs *under* trio; wanbatch makes its HTTP calls from threads (and asyncio, in the web app).
#: httpcore binds ``trio = None`` for good when the import fails, so a process that goes on to
#: run another program after the command — a test calling :func:`cli.main` in process, a script
#: importing the package — keeps trio: a trio program there could not use httpx otherwise.
COMMAND_ONLY_UNUSED_MODULES = ("trio",)


@contextlib.contextmanager
def without_unused_modules(*, own_process: bool = False) -> Iterator[None]:
    """While a command runs, importing an :data:`UNUSED_OPTIONAL_MODULES` one — and, when
    ``own_process`` (the process is the command: nothing else runs in it), a
    :data:`COMMAND_ONLY_UNUSED_MODULES` one — fails as if it were not installed (``None`` in
    :data:`sys.modules`: https://docs.python.org/3/reference/import.html#the-module-cache), which
    httpx and httpcore both handle by doing without it. One already imported is left as it is,
    and the stand-ins are taken out again afterwards (a test process runs commands in its own)."""
    unused = UNUSED_OPTIONAL_MODULES + (COMMAND_ONLY_UNUSED_MODULES if own_process else ())
    added = [name for name in unused if name not in sys.modules]
    for name in added:
        sys.modules[name] = None  # type: ignore[assignment]  # documented: "not installed"
    try:
        yield
    finally:
        for name in added:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


# --------------------------------------------------------------------------- the exit


def end_process(code: object) -> None:
    """End the ``wanbatch`` process with exit status ``code`` (``sys.exit``'s argument) once the
    command is over, doing what the interpreter's own exit does that anyone can see, and skipping
    the rest; returns (the caller then exits as usual) when that is not all it would do.

    After the exit handlers, Python's finalization collects garbage and then tears every module
    down, freeing each of the few hundred thousand objects the start-up built (SQLAlchemy's,
    pydantic's, Rich's…) one by one: 30–50 ms of CPU at the end of every ``run``, a tenth of what
    it costs beyond its imports and its jobs, for memory the process hands back whole as it ends.
    Here the interpreter's exit is kept up to that point, in its order
    (https://docs.python.org/3/c-api/init.html#c.Py_FinalizeEx): no thread the exit would wait for
    is left (else it is left to do that, as before); the :mod:`atexit` handlers run (logging's
    flush and close, :func:`weakref.finalize`, a coverage run's data…); one collection finalizes
    what no one refers to any more (an object that closes something when collected, as a SQLite
    connection does); standard output and error are flushed. Then :func:`os._exit` ends the
    process — the way :func:`os._exit`'s documentation reserves for a process whose state is not
    to be cleaned up further: the command closed its databases before (``cli._close_databases``),
    and everything it writes it writes through files it closes itself.

    Not ended here, left to the interpreter: an exit status ``sys.exit`` would print (a text), an
    interactive session to follow (``python -i``), a standard stream that cannot be flushed (the
    interpreter's own flush then fails as before, and says so), a non-daemon thread still alive.
    """
    if code is None:
        status = 0
    elif isinstance(code, int) and -(2**31) <= code < 2**31:
        status = int(code)
    else:
        return
    if sys.flags.inspect or _threads_the_exit_waits_for():
        return
    atexit._run_exitfuncs()  # and unregistered: the interpreter would not run them again
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:
                stream.flush()
            except Exception:  # the interpreter's own flush fails alike, and says so
                return
    os._exit(status)


def _threads_the_exit_waits_for() -> bool:
    """Whether a thread other than the main one that the interpreter's exit joins is alive."""
    main = threading.main_thread()
    return any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate())


# --------------------------------------------------------------------------- dataclasses' methods

#: Past this many methods, the cache file keeps only those of the process that writes it (a file
#: that grew over many versions of wanbatch and its libraries starts again from what is used).
MAX_CACHED_METHODS = 10_000


class MethodCache:
    """The compiled code of the methods :mod:`dataclasses` generates, kept from one process to the next.

    Python 3.11's dataclasses write each class's ``__init__``, ``__repr__``, ``__eq__``,
    ``__hash__`` and, when frozen, ``__setattr__`` and ``__delattr__`` as source text and
    ``exec`` it: about 960 compilations in a ``run`` (wanbatch's 120 dataclasses, pydantic's,
    annotated-types', h11's…), some 65 ms of CPU, a twelfth of its start-up — the same texts
    compiled to the same code in every process. Installed (:meth:`install`), dataclasses' ``exec``
    takes each text's code from here and compiles only a text not seen before, which
    :meth:`save` adds to a file in the user's cache folder (:func:`method_cache_path`).

    The code is exactly what ``exec`` compiles from the same text (the key is the whole text,
    compiled as ``exec`` does: file name ``<string>``, no ``__future__`` flags inherited), so the
    classes are the same. The file is read and written as Python reads and writes .pyc files: one
    for another interpreter version (another magic number) or one that cannot be read is ignored,
    none is written under ``PYTHONDONTWRITEBYTECODE`` or ``-B``, and a folder that cannot be
    written only means compiling at every start, as before. It names the install it belongs to
    (``owner``: :func:`install_key`): another install's is ignored, and replaced when this one
    saves. As it holds code the process runs, a file that is not the user's own, or that others
    may write, is ignored too.
    """

    def __init__(self, path: Path | None, owner: str = "") -> None:
        self.path = path
        self.owner = owner
        self._lock = threading.Lock()
        self._stored: dict[str, bytes] = self._read()
        self._added: dict[str, bytes] = {}
        self._used: set[str] = set()
        self._pid = os.getpid()  # a forked child (Celery's pool) never writes the file
        #: A file this one replaces, removed once this one is written (:func:`install_method_cache`).
        self.replaces: Path | None = None

    def _read(self) -> dict[str, bytes]:
        if self.path is None:
            return {}
        try:
            with self.path.open("rb") as file:
                if not _only_ours(os.fstat(file.fileno())):
                    return {}
                data = file.read()
            # Code from a file only this user could have written, in the user's own folder.
            found = marshal.loads(data[len(MAGIC_NUMBER) :]) if data.startswith(MAGIC_NUMBER) else None  # noqa: S302
        except (OSError, ValueError, EOFError, TypeError):
            return {}
        if not (isinstance(found, tuple) and len(found) == 2 and found[0] == self.owner):
            return {}  # another install's (or an older wanbatch's file)
        methods = found[1]
        if not isinstance(methods, dict):
            return {}
        return {k: v for k, v in methods.items() if isinstance(k, str) and isinstance(v, bytes)}

    @property
    def compiled(self) -> int:
        """How many texts this process compiled (found neither in the file nor before)."""
        return len(self._added)

    def code(self, source: str) -> CodeType:
        """The code ``exec(source)`` runs, from the cache or compiled now."""
        with self._lock:
            self._used.add(source)
            raw = self._stored.get(source) or self._added.get(source)
        if raw is not None:
            with contextlib.suppress(ValueError, EOFError, TypeError):
                code = marshal.loads(raw)  # noqa: S302 (read from the file above)
                if isinstance(code, CodeType):
                    return code
        code = compile(source, "<string>", "exec", dont_inherit=True)
        with self._lock:
            self._added[source] = marshal.dumps(code)
        return code

    def exec_source(
        self,
        source: object,
        globals: dict[str, Any] | None = None,
        locals: Mapping[str, object] | None = None,
        /,
        **options: Any,
    ) -> None:
        """``exec`` as :mod:`dataclasses` calls it (a text, its namespaces), with cached code; any
        other call is passed on to the real ``exec``, in the caller's namespace."""
        if type(source) is not str or globals is None or options:
            caller = sys._getframe(1)
            if globals is None:
                globals, locals = caller.f_globals, caller.f_locals if locals is None else locals
            builtins.exec(source, globals, locals, **options)  # type: ignore[arg-type]  # noqa: S102
            return
        builtins.exec(self.code(source), globals, locals)  # noqa: S102 (dataclasses' own text)

    def install(self) -> None:
        """From now on, :mod:`dataclasses` compiles through this cache (its module-level ``exec``
        name, which its ``_create_fn`` — or 3.13's ``_FuncBuilder`` — calls, is this one's)."""
        import dataclasses

        dataclasses.exec = self.exec_source  # type: ignore[attr-defined]

    def save(self) -> None:
        """Add the texts compiled since the last save to the file (nothing to add, or no writing
        of bytecode: nothing written). Never fails: a folder that cannot be written is left be."""
        with self._lock:
            if not self._added or self.path is None or sys.dont_write_bytecode or os.getpid() != self._pid:
                return
            methods = {**self._stored, **self._added}
            if len(methods) > MAX_CACHED_METHODS:
                methods = {source: methods[source] for source in self._used if source in methods}
            self._stored, self._added = methods, {}
        with contextlib.suppress(OSError):
            _write_atomically(self.path, MAGIC_NUMBER + marshal.dumps((self.owner, methods)))
            if self.replaces is not None:
                self.replaces.unlink(missing_ok=True)


def _only_ours(status: os.stat_result) -> bool:
    """Whether a file is this user's own and nobody else may write it (as ssh asks of its keys)."""
    owner_ok = not hasattr(os, "geteuid") or status.st_uid == os.geteuid()
    return owner_ok and not status.st_mode & 0o022


#: The package folder's parent: where this install of wanbatch is (site-packages, a checkout).
_LOCATION = Path(__file__).absolute().parent.parent


def install_key(location: str | Path = _LOCATION) -> str:
    """What tells this install of wanbatch from any other: where it is, and its version as the
    installer recorded it beside it (``wanbatch-VERSION.dist-info``; none for a source checkout or
    an editable install, told apart by their locations). Read from the folder, not through
    :mod:`importlib.metadata`, whose search of every ``sys.path`` entry costs milliseconds at each
    start."""
    version = ""
    with contextlib.suppress(OSError), os.scandir(location) as entries:
        for entry in entries:
            if entry.name.startswith("wanbatch-") and entry.name.endswith(".dist-info"):
                version = entry.name.removeprefix("wanbatch-").removesuffix(".dist-info")
                break
    return f"{os.fspath(location)}\0{version}"


def _user_cache_folder() -> Path | None:
    """``$XDG_CACHE_HOME/wanbatch``, else ``~/.cache/wanbatch`` (the XDG Base Directory spec's
    per-user cache): the first that is, or can be made, a folder this user writes; None if neither.

    Only below a base that is there: ``$XDG_CACHE_HOME`` itself, or the home. Neither they nor
    their parents are ever made: a made-up home (``HOME=/nonexistent``, a service user's) once
    had root, for whom every folder is writable, make it at the first save."""
    bases: list[tuple[Path, Path]] = []  # (what must be there, the folder below it)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the spec: a relative path is invalid, and ignored
        bases.append((Path(xdg), Path(xdg) / "wanbatch"))
    with contextlib.suppress(RuntimeError):  # no home directory to be found
        home = Path.home()
        if home.is_absolute():
            bases.append((home, home / ".cache" / "wanbatch"))
    for base, folder in bases:
        if not base.is_dir():
            continue
        existing = folder
        while existing != base and not (existing.exists() or existing.is_symlink()):
            existing = existing.parent  # the folders missing below the base are made at the first save
        if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
            return folder
    return None


def method_cache_path(key: str | None = None) -> Path | None:
    """Where the :class:`MethodCache` file goes: the user's cache folder
    (:func:`_user_cache_folder`), one file per interpreter version and install of wanbatch
    (``key``, this one's :func:`install_key` by default: two installs never share a file, and
    none is left inside an install, where its uninstall would not remove it); None when there is
    no cache folder to write, or the interpreter keeps no bytecode files."""
    tag = sys.implementation.cache_tag
    folder = _user_cache_folder()
    if tag is None or folder is None:
        return None
    digest = zlib.crc32((install_key() if key is None else key).encode("utf-8", "surrogateescape"))
    return folder / f"dataclass-methods.{tag}.{digest:08x}.marshal"


def legacy_method_cache_path() -> Path | None:
    """Where earlier builds kept the file: beside this package's bytecode (``cli/__pycache__``, or
    its place under ``PYTHONPYCACHEPREFIX``), inside the install, where no uninstall removes it."""
    try:
        beside = cache_from_source(__file__)
    except NotImplementedError:  # sys.implementation.cache_tag is None
        return None
    return Path(beside).with_name(f"dataclass-methods.{sys.implementation.cache_tag}.marshal")


def _write_atomically(path: Path, data: bytes) -> None:
    """``data`` as the file ``path``, whole or not at all, as Python writes a .pyc: a temporary
    file beside it renamed over it (two processes saving at once: the last one's), readable and
    writable by this user only, in a folder made for this user only (the XDG spec's 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_EXCL | os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        temporary.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


#: The cache installed in this process (:func:`install_method_cache`), None before.
_method_cache: MethodCache | None = None


def install_method_cache() -> MethodCache:
    """Compile dataclasses' methods through a :class:`MethodCache` from here on, saved when
    :func:`resume` says the command's machinery is loaded and again at exit; the one installed
    already, if any. Only the command's own process does this (:mod:`cli`), before its imports."""
    global _method_cache
    if _method_cache is None:
        import atexit

        key = install_key()
        _method_cache = MethodCache(method_cache_path(key), owner=key)
        _method_cache.replaces = legacy_method_cache_path()  # removed at the first save
        _method_cache.install()
        atexit.register(_method_cache.save)
    return _method_cache
