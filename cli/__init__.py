"""The ``wanbatch`` command: one click group, its commands, and the console-script entry point.

One module per group of commands — :mod:`cli.manifest_commands` (validate, estimate, submit),
:mod:`cli.batch_commands` (status, cost, export, diff, run, rerun, cancel, pause, resume),
:mod:`cli.service_commands` (worker, serve, simulator) and :mod:`cli.doctor_command` (doctor) —
and :mod:`cli.output` for what they print and how they exit. The CLI sits outside both the
domain (:mod:`jobs`, which knows no click or rich) and execution (:mod:`worker`): a command
imports what it needs when it runs, so ``wanbatch --help`` or ``wanbatch validate`` never loads
Celery, the fal client or the simulator.
"""

from __future__ import annotations

# Before anything else: a Ctrl-C while the imports below run (half a second of them) used to be
# a KeyboardInterrupt traceback from wherever it landed — click, dataclasses, pydantic… — or
# "Aborted!" with exit 1. Until the command itself starts (main() hands SIGINT back to Python
# then, see _interrupt_normally), SIGINT ends the process with one line and exit 130: nothing
# has been stored before a command runs.
import contextlib
import os
import signal
import sys
import threading

#: Exit code after Ctrl-C: 128 + SIGINT, what shells report for an interrupted command.
EXIT_INTERRUPTED = 130

#: The ``--json`` object of a Ctrl-C during start-up: what :func:`_fail` prints for one just after.
_INTERRUPTED_JSON = b'{"ok": false, "error": "interrupted"}\n'


def _options(args: list[str]) -> list[str]:
    """The command line's words before a ``--`` (after it, every word is an argument)."""
    return args[: args.index("--")] if "--" in args else args


def _json_requested(args: list[str]) -> bool:
    """Whether the command line asks for ``--json``."""
    return "--json" in _options(args)


def _exit_interrupted(signum: int, frame: object) -> None:
    """Ctrl-C during start-up: ``interrupted`` on stderr (and, under ``--json``, its object on
    stdout, as every other way a command ends prints one), then exit 130 on the spot. Raw
    ``os.write``s, best effort: no Python stream may be used from here (the signal can come in
    the middle of a write through one), and nothing may keep the exit from coming."""
    with contextlib.suppress(OSError):
        os.write(2, b"interrupted\n")
    if _json_requested(sys.argv[1:]):
        with contextlib.suppress(OSError):
            os.write(1, _INTERRUPTED_JSON)
    os._exit(EXIT_INTERRUPTED)


def _reserve_standard_descriptors() -> None:
    """Open /dev/null as descriptor 1 and 2 when the process was started without them
    (``wanbatch status >&-``). Else the next file opened (the SQLite database, a log) would get
    the number, and whatever writes to "standard output" at that level — a raw ``os.write(1,
    …)`` on the way out, a child process — would write into it. ``sys.stdout`` stays None
    (Python found no standard output): a write to it is the error :class:`cli.output.GuardedStdout`
    says it is."""
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            with contextlib.suppress(OSError):
                null = os.open(os.devnull, os.O_WRONLY)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)


def _exit_on_interrupt() -> object:
    """Make SIGINT exit 130 with one line; returns the handler it replaced (None if it did not).

    Only over Python's own handler, and only in the main thread: a SIGINT a parent set to be
    ignored (``nohup``, a background job) stays ignored, and a caller's own handler stays.
    """
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None
    try:
        return signal.signal(signal.SIGINT, _exit_interrupted)
    except ValueError:  # not the main thread
        return None


#: The commands a SIGTERM or a SIGHUP stops as Ctrl-C does (exit 130), start-up included: the
#: README's **Ctrl-C**. ``export`` and ``submit`` too: killed by the signal (143, 129) without a
#: word, an export left its hidden temporary file of partial records beside its target for good;
#: stopped as Ctrl-C stops them, the file is removed and a submit's transaction rolled back on the
#: way out. The others keep the signals' default (``serve``: uvicorn's graceful shutdown, then the
#: signal's own status; ``worker``: Celery's warm shutdown).
_STOPPED_LIKE_CTRL_C = frozenset({"run", "rerun", "cancel", "export", "submit"})


def _command_name(args: list[str]) -> str | None:
    """The command the command line names: its first word that is not an option (the group has
    no option that takes a value)."""
    return next((word for word in _options(args) if not word.startswith("-")), None)


def _termination_signals() -> list[signal.Signals]:
    """SIGTERM and SIGHUP, where the platform has them."""
    names = ("SIGTERM", "SIGHUP")  # no SIGHUP on Windows
    return [sig for name in names if (sig := getattr(signal, name, None)) is not None]


def _exit_on_termination() -> dict[signal.Signals, object]:
    """During the start-up of the commands of :data:`_STOPPED_LIKE_CTRL_C`, make SIGTERM and
    SIGHUP exit 130 with one line, as SIGINT (:func:`_exit_on_interrupt`); returns the handlers
    it replaced.

    They killed the process by the signal (143, 129) without a word until the run's own handling
    (:func:`worker.running.stop_on_signals`) took over, a second or two in, though the README
    says they stop these commands as Ctrl-C does. Only over the default action, and only in the
    main thread: one the parent set to be ignored (``nohup``) stays ignored, a caller's own stays.
    """
    if _command_name(sys.argv[1:]) not in _STOPPED_LIKE_CTRL_C:
        return {}
    replaced: dict[signal.Signals, object] = {}
    for sig in _termination_signals():
        if signal.getsignal(sig) is not signal.SIG_DFL:
            continue
        try:
            replaced[sig] = signal.signal(sig, _exit_interrupted)
        except ValueError:  # not the main thread
            break
    return replaced


def _interrupt_normally() -> None:
    """SIGINT raises KeyboardInterrupt again (if :func:`_exit_on_interrupt` had replaced that),
    and so do SIGTERM and SIGHUP where :func:`_exit_on_termination` had replaced theirs: until
    the command's own handling takes over, they stop it as Ctrl-C does, what it holds cleaned up
    on the way out."""
    for sig in (signal.SIGINT, *_termination_signals()):
        if signal.getsignal(sig) is _exit_interrupted:
            signal.signal(sig, signal.default_int_handler)


#: The modules ``python -m`` runs as the ``wanbatch`` command (:mod:`cli.__main__`).
_MAIN_MODULES = frozenset({"cli", "cli.__main__"})


def _launched_as_command() -> bool:
    """Whether this process is the ``wanbatch`` command: the console script, or ``python -m cli``.

    ``python -m`` imports this package while ``sys.argv[0]`` is still ``-m``; the module it runs
    is the word of the original command line just before the command's own arguments (``-mcli``
    written as one word included).
    """
    argv = sys.argv
    if os.path.basename(argv[0] if argv else "") == "wanbatch":  # noqa: PTH119 (no pathlib yet)
        return True
    if not argv or argv[0] != "-m":
        return False
    original = getattr(sys, "orig_argv", [])
    at = len(original) - len(argv)
    return 0 <= at < len(original) and original[at].removeprefix("-m") in _MAIN_MODULES


#: Whether this process is the ``wanbatch`` command (:func:`_launched_as_command`), decided once.
_AS_COMMAND = _launched_as_command()

# The command (``wanbatch``, ``python -m cli``): at once, before the imports. Another launcher
# (``python -c "from cli import main; main()"``, a test importing the package) gets it from main().
if _AS_COMMAND:
    _reserve_standard_descriptors()
    _exit_on_interrupt()
    _exit_on_termination()
    from cli import startup as _startup  # stdlib only

    _startup.install_method_cache()  # before the imports below define their dataclasses

import logging  # noqa: E402 (after the SIGINT handler, on purpose)
from typing import NoReturn  # noqa: E402

import click  # noqa: E402

from cli import batch_commands, doctor_command, manifest_commands, service_commands, startup  # noqa: E402
from cli.output import (  # noqa: E402
    EXIT_BROKEN_PIPE,
    EXIT_OK,
    EXIT_USAGE,
    ReaderGone,
    StdoutError,
    emit_json,
    guarded_stderr,
    guarded_stdout,
    path_failure,
)
from jobs.printable import first_line, printable  # noqa: E402
from jobs.setting_notes import CONTRACT_SETTINGS, MORE_SETTINGS  # noqa: E402 (stdlib only)

#: Width of the settings' name column: the longest name, WANBATCH_DOWNLOAD_ALLOWED_HOSTS, fits.
_SETTING_COLUMN = max(len(note.name) for note in CONTRACT_SETTINGS)


class _Interrupted(BaseException):
    """A Ctrl-C (KeyboardInterrupt, its cause) on its way from the command to :func:`_main`,
    past click's main: that one writes an empty line to stderr first (a stray blank line before
    ``interrupted`` in a log; an OSError instead of exit 130 when stderr cannot be written)."""


class _WanbatchGroup(click.Group):
    """The ``wanbatch`` group: its help ends with the settings, as click lists the options."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Interrupted from exc

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The "Settings (environment variables)" section of ``wanbatch --help``, from
        :data:`jobs.setting_notes.CONTRACT_SETTINGS` (a module that loads nothing)."""
        with formatter.section("Settings (environment variables)"):
            _write_settings(formatter)
            formatter.write_paragraph()
            formatter.write_text(MORE_SETTINGS)
        super().format_epilog(ctx, formatter)


def _write_settings(formatter: click.HelpFormatter) -> None:
    """One row per setting, as click's ``write_dl`` writes the options, but wrapped between
    words only (a default URL, ``https://rest.fal.ai/.well-known/jwks.json``, is never cut at
    its hyphen, so it can be copied from the terminal), the ``[default: …]`` kept in one piece
    after the words when it fits."""
    import textwrap

    indent = " " * formatter.current_indent
    width = max(formatter.width - formatter.current_indent - _SETTING_COLUMN - 2, 20)
    wrapper = textwrap.TextWrapper(width=width, break_on_hyphens=False, break_long_words=False)
    for note in CONTRACT_SETTINGS:
        lines = wrapper.wrap(note.words)
        if lines and len(lines[-1]) + 2 + len(note.default_text) <= width:
            lines[-1] += "  " + note.default_text
        else:
            lines += wrapper.wrap(note.default_text)
        first, *rest = lines
        formatter.write(f"{indent}{note.name:<{_SETTING_COLUMN}}  {first}\n")
        for line in rest:
            formatter.write(f"{indent}{'':<{_SETTING_COLUMN}}  {line}\n")


@click.group(
    cls=_WanbatchGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    # Bare `wanbatch` prints the help (as `--help` does) and exits 0, as docker does: click's
    # own answer was the whole help as an "error: Usage: …" message, exit 2.
    invoke_without_command=True,
)
@click.version_option(package_name="wanbatch")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """wanbatch: batch orchestration for fal.ai's Wan video endpoints.

    Validate a manifest, estimate its cost, submit it, run it, watch it, export it.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


for _command in (
    manifest_commands.validate,
    manifest_commands.estimate,
    manifest_commands.submit,
    batch_commands.status,
    batch_commands.cost,
    batch_commands.export,
    batch_commands.run,
    batch_commands.rerun,
    batch_commands.cancel,
    batch_commands.pause,
    batch_commands.resume,
    batch_commands.diff,
    batch_commands.refetch,
    service_commands.worker,
    service_commands.serve,
    service_commands.simulator,
    doctor_command.doctor,
):
    cli.add_command(_command)


def install_key_redaction() -> bool:
    """Redact FAL_KEY from every log record of this process (and of the workers it forks), and
    FAL_KEY_SECRET's value, whether or not it makes the key (:meth:`FalSettings.secrets`).

    Returns whether a key was configured. Bad configuration is left for the command to report.
    """
    from jobs.errors import WanbatchError
    from jobs.settings import get_settings

    try:
        secrets = get_settings().secrets()
    except WanbatchError:
        return False
    if not secrets:
        return False
    from worker.fal.redact import install_redaction

    for secret in secrets:
        install_redaction(secret)
    return True


#: Exit code of an unexpected error (sysexits.h ``EX_SOFTWARE``): apart from the contract's
#: 0 (success), 1 (some jobs failed) and 2 (bad input), so scripts never mistake a crash for either.
EXIT_INTERNAL = 70


def _internal_error(exc: BaseException) -> NoReturn:
    """One line on stderr for a bug; the traceback goes to an owner-only file the line names.

    The last resort: should the reporting fail in turn (an install too broken to import what it
    uses), the line names only the exception's type (its message is not masked then, and may
    quote a key), without a file; and it is still one line and exit 70, never a traceback."""
    bare = f"internal error: {type(exc).__name__}; please report it"
    try:
        from worker.crash import crash_file, summary

        name = crash_file(exc)
        where = f" (details in {name})" if name else ""
        line = f"internal error: {summary(exc)}; please report it{where}"
    except Exception:
        line = bare
    try:
        _fail(line, EXIT_INTERNAL)
    except Exception:  # _fail could not mask the line: nothing of it was printed
        _to_stderr(bare)
        sys.exit(EXIT_INTERNAL)


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether a Ctrl-C is what ``exc`` reports: Python wraps an exception raised inside some
    machinery in another one (3.11's ``type.__new__`` turns one from a descriptor's
    ``__set_name__``, such as a dataclass field being defined while a command imports Rich, into
    ``RuntimeError("Error calling __set_name__ …")`` caused by it). The chain of causes and
    contexts is followed, each exception once."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        todo += [current.__cause__, current.__context__]
    return False


def _database_said(exc: BaseException) -> str | None:
    """The one line for a database error that is the environment's, not a bug, wherever in a
    command it happened; None for anything else: a write the database refused because its disk
    is full (SQLite's ``SQLITE_FULL``, PostgreSQL's ``disk_full``), a table that is not there
    (the database is not wanbatch's, or its tables were dropped while the command ran: start-up
    checks them), or a database that failed under the command (:func:`jobs.db.is_unavailable`:
    an I/O error, a connection the server closed, a restart): the environment's, which no bug
    report fixes. The unit of work that failed was rolled back, as every failed one is
    (:func:`jobs.db.session_scope`), or committed whole just before its failure was heard; the
    commands that write do so in one unit, and each is safe to run again."""
    from jobs import db

    full, missing, unavailable = db.is_disk_full(exc), db.is_schema_missing(exc), db.is_unavailable(exc)
    if not (full or missing or unavailable):
        return None
    try:
        from jobs.settings import get_settings

        url: str | None = get_settings().database_url
    except Exception:  # the settings were read before the command could write: not expected
        url = None
    if full:
        return str(db.disk_full_error(url))
    if missing:
        return str(db.schema_missing_error(url, first_line(exc)))
    return str(db.failed_during_command_error(url, exc))


def _fail(line: str, code: int, *, prefix: str = "") -> NoReturn:
    """End the process with ``line`` on stderr and exit ``code``; with ``--json`` also the
    contract's ``{"ok": false, "error": …}`` on stdout, so a script reading stdout learns of a
    usage mistake or a bug as it learns of any other error, instead of reading nothing. ``prefix``
    (``error: ``) is for the terminal only, as in :func:`cli.output.fail`. ``line`` is masked
    (:func:`jobs.redaction.masked_error`): a usage mistake quoting an argument that holds FAL_KEY
    never prints it back."""
    from jobs.redaction import masked_error

    line = masked_error(line)
    _to_stderr(prefix + line)
    if _json_requested(sys.argv[1:]):
        with contextlib.suppress(OSError, ValueError, ReaderGone):  # stdout unwritable: the line above
            emit_json({"ok": False, "error": line})
    sys.exit(code)


def _to_stderr(line: str) -> None:
    """``line`` on stderr, if there is one (``2>&-``: nowhere, and never on stdout instead)."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            print(line, file=sys.stderr, flush=True)


#: Options that make any command print and exit before it runs (click's eager options).
_HELP_OPTIONS = frozenset({"-h", "--help", "--version"})


def _only_help(args: list[str]) -> bool:
    """True when the command line only asks for help or the version (or for nothing at all).

    Then nothing can log, so the key redaction — which loads and validates every setting, a
    tenth of a second of pydantic — is skipped, and ``wanbatch --help`` answers at once.
    """
    return not args or any(a in _HELP_OPTIONS for a in _options(args))


def main() -> None:
    """Console-script entry point.

    Click runs with ``standalone_mode=False`` so this function decides what reaches the user:
    a usage mistake is one ``error:`` line (exit 2), ``--help``/``--version`` behave as always,
    Ctrl-C is one ``interrupted`` line (exit 130) until a command's own handling takes over
    (``run``'s says how to resume), an OSError about a path that no check explained is one
    ``error: PATH: REASON`` line (exit 2: the user's path, not a bug), a standard output that
    cannot be written (full, failing, closed: see :class:`cli.output.GuardedStdout`) is one
    ``error: cannot write to standard output: REASON`` line (exit 2), a reader that closed it
    (``| head``) ends the command quietly with 141 (128 + SIGPIPE), and anything else
    unexpected — a bug — is one ``internal error`` line (exit 70) instead of a traceback.
    Deliberate errors never get here: every command turns :class:`~jobs.errors.WanbatchError`
    into its message and exit code.
    """
    try:
        _main_guarded()
    except SystemExit as exc:
        if _AS_COMMAND and _ends_the_process():  # nothing follows: no teardown of the heap
            startup.end_process(exc.code)
        raise


def _ends_the_process() -> bool:
    """Whether :func:`main` is the last thing this process runs: it was started as the console
    script (its file is the ``wanbatch`` script pip wrote, whose ``sys.exit(main())`` is all it
    does) or as ``python -m cli`` (:mod:`cli.__main__`). Not for a program that calls main()
    itself, even with ``wanbatch`` as its ``argv[0]`` (a test that reads the process afterwards)."""
    entry = sys.modules.get("__main__")
    spec = getattr(entry, "__spec__", None)
    if spec is not None and spec.name in _MAIN_MODULES:
        return True
    file = getattr(entry, "__file__", None)
    if not isinstance(file, str):
        return False
    name = os.path.basename(file)  # noqa: PTH119 (as _launched_as_command reads argv[0])
    return name.removesuffix(".exe").removesuffix("-script.pyw").removesuffix("-script.py") == "wanbatch"


def _main_guarded() -> None:
    """:func:`main`'s work, under its guards (see there)."""
    _reserve_standard_descriptors()  # already done at import for the console script
    replaced = _exit_on_interrupt()
    replaced_termination = _exit_on_termination()
    try:
        # A write to stdout fails as StdoutError or ReaderGone, below, one to stderr is dropped;
        # httpx and httpcore do without their optional imports wanbatch has no use for (cli.startup).
        with guarded_stdout(), guarded_stderr(), startup.without_unused_modules(own_process=_AS_COMMAND):
            _main()
    finally:  # only reached in process (tests): the caller's handlers back
        stopped = sys.modules.get("jobs.db")  # a stopped command's lock bound is its own
        if stopped is not None:
            stopped.wait_for_lock_again()
        if replaced is not None:
            signal.signal(signal.SIGINT, replaced)  # type: ignore[arg-type]
        for sig, handler in replaced_termination.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader closed it (what a write there fails of
    with EPIPE): a BrokenPipeError from elsewhere is not a reason to exit 141."""
    import select

    try:
        poller = select.poll()
        poller.register(1, select.POLLOUT)
        return any(revents & select.POLLERR for _, revents in poller.poll(0))
    except (OSError, AttributeError):  # no poll (Windows), no descriptor 1
        return False


def _interrupted() -> NoReturn:
    """End a command Ctrl-C (or SIGTERM, SIGHUP: see :func:`_interrupt_normally`) stopped:
    ``interrupted``, exit 130. On a terminal the line starts a line of its own, after the ``^C``
    the terminal echoed; in a log it has no blank line before it."""
    terminal = False
    with contextlib.suppress(AttributeError, OSError, ValueError):
        terminal = sys.stderr.isatty()
    _fail("interrupted", EXIT_INTERRUPTED, prefix="\n" if terminal else "")


def _stdout_to_devnull() -> None:
    """Point standard output at /dev/null, so the interpreter's last flush of what is still
    buffered for a closed pipe fails no more (the recipe of Python's signal documentation,
    https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _main() -> None:
    startup.fewer_malloc_arenas()  # before any thread: their freed memory is kept per arena
    startup.steady_malloc_thresholds()  # a probe's decoder buffers kept for the next probe
    startup.pause()  # no cyclic GC over the imports; the long-running commands resume it
    from worker.logs import configure_logging  # stdlib only: text, or JSON lines (WANBATCH_LOG_FORMAT)

    configure_logging(level=logging.WARNING)
    try:
        _run_command()
    finally:  # however it ends: a command's own sys.exit, an error's line, Ctrl-C
        if _AS_COMMAND:  # the process ends here; a program calling main() keeps its engines
            _close_databases()


def _run_command() -> None:
    """Run the command of ``sys.argv``: every way it ends is an exit status and at most one line."""
    try:
        if not _only_help(sys.argv[1:]):  # help prints no secret: skip loading the settings
            install_key_redaction()
        # From here a command runs: Ctrl-C raises KeyboardInterrupt again, so what the command
        # holds is cleaned up on the way out (an export's temporary file, a transaction), and
        # click turns it into Abort, answered below. Only the imports and the settings before
        # this point, which store nothing, end the process on the spot.
        _interrupt_normally()
        if _AS_COMMAND:  # nothing else runs in this process: see startup.set_aside
            startup.set_aside()
        try:
            code = cli.main(prog_name="wanbatch", standalone_mode=False)
        except Exception as exc:
            # A Ctrl-C wins over whatever failed on its way up (a write it caused, an import's
            # __set_name__ wrapping it): the exit is 130, whatever failed next.
            if _caused_by_interrupt(exc):
                raise _Interrupted from exc
            raise
    except (KeyboardInterrupt, _Interrupted):  # click's main passes both on (see _WanbatchGroup)
        _interrupted()
    except ReaderGone:  # the reader went away (`export B | head`): nothing to say,
        _stdout_to_devnull()  # and the exit status of a tool SIGPIPE ended (1 says jobs failed)
        sys.exit(EXIT_BROKEN_PIPE)
    except BrokenPipeError as exc:  # not through sys.stdout: 141 only if stdout is what broke
        if not _stdout_reader_gone():
            _internal_error(exc)
        _stdout_to_devnull()
        sys.exit(EXIT_BROKEN_PIPE)
    except StdoutError as exc:  # a full disk behind `>`, an I/O error, no stdout (`>&-`)
        _stdout_to_devnull()  # what is left in its buffer goes nowhere, not in an error at exit
        _to_stderr(f"error: {exc}")  # no --json object: stdout is what cannot take it
        sys.exit(EXIT_USAGE)
    except click.UsageError as exc:  # unknown option, missing argument, bad value
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        _fail(f"{exc.format_message().rstrip('.')}{hint}", exc.exit_code, prefix="error: ")
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code, prefix="error: ")
    except click.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # SIGINT raised (a caller's handler)
            _interrupted()
        _fail("Aborted!", 1)
    except OSError as exc:  # a path nothing before explained (outside guarded: a callback, an option)
        if (usage := path_failure(exc)) is None:
            _internal_error(exc)
        _fail(printable(str(usage)), usage.exit_code, prefix="error: ")
    except Exception as exc:  # the safety net: a bug still gets one line, not a traceback
        # The check failing in turn (an install whose jobs.db cannot be imported) leaves a bug's line.
        with contextlib.suppress(Exception):
            if (said := _database_said(exc)) is not None:  # no bug: a full disk, a foreign database
                _fail(printable(said), EXIT_USAGE, prefix="error: ")
            from jobs.thread_limit import cannot_start_thread, thread_limit_line

            if cannot_start_thread(exc):  # no bug either: `ulimit -u` reached (a thread at start-up)
                _fail(thread_limit_line(), EXIT_USAGE, prefix="error: ")
        _internal_error(exc)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


#: How long the exit waits for the command's database connections to close (:func:`_close_databases`).
CLOSE_DATABASES_SECONDS = 5.0


def _close_databases() -> None:
    """Close the command's database connections before the process exits.

    Python's exit does not promise to finalize them, and a SQLite database left open keeps its
    last transactions in ``wanbatch.db-wal`` (the write-ahead log) until the next process opens
    it: a user who copies or archives ``wanbatch.db`` alone after a ``run`` would miss them. The
    last connection closed checkpoints the log into the file and removes ``-wal`` and ``-shm``
    (https://www.sqlite.org/wal.html#the_wal_file). Nothing is said if that fails: the log is
    intact, and the next open applies it. Under a memory or thread limit no thread may start
    (an export that ended in ~90 lines of traceback, exit 1): it closes them itself then."""
    database = sys.modules.get("jobs.db")
    if database is None:
        return
    # A Ctrl-C now ends the process as one before the command began would: no traceback.
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    def close() -> None:
        with contextlib.suppress(Exception):
            database.close_engines()

    # On a thread, waited for a while: a SQLite writer's connection closes under its lock, which
    # a thread of the command still at work (a daemon, ending with the process) may hold.
    closing = threading.Thread(target=close, name="wanbatch-close-databases", daemon=True)
    try:
        closing.start()
    except RuntimeError:  # "can't start new thread" (a memory or thread limit): close here instead
        close()
        return
    closing.join(CLOSE_DATABASES_SECONDS)
