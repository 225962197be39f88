"""``wanbatch worker``: a distributed worker's life, from the checks before it starts to its exit.

:func:`serve_worker` is what the command runs once its options are parsed
(:func:`cli.service_commands.worker`): it refuses settings that cannot work (one line, exit 2),
reaches the limiter's Redis and the broker, migrates the database, serves the metrics, starts
Celery's worker (:func:`worker.app.run_worker`) with the periodic tick beside it
(:class:`worker.ticker.Ticker`), and decides how the process ends once Celery's worker returned:
exit 0 after a stop it was asked for, one line and exit 2 for a start that can never succeed or a
schema downgraded under it, and a fresh start of the whole process (``os.execv``) when Celery
stopped its worker on its own.

Everything heavy (Celery, SQLAlchemy, the steps) is imported when it is used, never at the top:
the command line imports this module for :data:`RESTARTED_ENV`, and ``wanbatch --help`` or
``validate`` must not load Celery.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from jobs.errors import ConfigError, DatabaseReadOnlyError

if TYPE_CHECKING:
    from celery import Celery

    from jobs.settings import Settings
    from worker.running import HangWatch
    from worker.ticker import Ticker

#: Set in the environment of a ``wanbatch worker`` that started itself afresh (``os.execv``)
#: after Celery stopped its worker on its own: the start-up then waits for the limiter's Redis and
#: the broker, an outage under way, instead of ending with exit 2 (see :func:`serve_worker`).
RESTARTED_ENV = "_WANBATCH_WORKER_RESTARTED"

#: The logger of "the Celery worker stopped on its own; restarting it": the name that line has
#: always carried (it was logged from the command's module), which log filters and alerts match.
_log = logging.getLogger("cli.service_commands")


def serve_worker(
    settings: Settings,
    *,
    concurrency: int | None,
    loglevel: str,
    pool: str,
    node_name: str,
    machinery_loaded: Callable[[], None],
) -> int:
    """Run one distributed worker until it is asked to stop; its exit code (0), or a
    :class:`~jobs.errors.ConfigError` (one line, exit 2) for what keeps it from working.

    ``concurrency``, ``loglevel``, ``pool`` and ``node_name`` are the command's options, checked
    already. ``machinery_loaded`` is called once Celery has loaded what it runs with, in this
    process and in each prefork child (the command line's :func:`cli.startup.resume`: the cyclic
    GC, paused over the imports, comes back with them frozen; passed in, as ``worker/`` imports
    nothing of ``cli/``). When Celery stops its worker on its own (a broker connection lost), this
    never returns: the process starts itself afresh (:func:`_start_afresh`).
    """
    from jobs.open_files import raise_soft_limit

    raise_soft_limit()  # toward the hard limit: each connection and output holds a descriptor
    broker_url = _refuse_unusable_settings(settings)
    _reach_the_redis_servers(settings, broker_url)
    _open_the_database(settings)
    from worker import telemetry  # before anything counts: prefork children count in files

    stop_metrics = telemetry.serve_configured(settings, child_processes=pool in ("prefork", "processes"))
    run = _WorkerRun(settings, machinery_loaded)
    run.run(pool=pool, concurrency=concurrency, loglevel=loglevel, node_name=node_name)
    if stop_metrics is not None:
        stop_metrics()
    run.raise_failure()
    if not run.asked_to_stop:
        _start_afresh()
    return 0


def _refuse_unusable_settings(settings: Settings) -> str:
    """The broker's URL; one line and exit 2 for settings a worker cannot work with, before
    anything connects: no broker (a worker is the distributed mode), no FAL_KEY, an output folder
    whose name this session cannot record (every paid download would fail)."""
    if not settings.broker_url:
        raise ConfigError(
            "WANBATCH_BROKER_URL is not set: `wanbatch worker` is the distributed mode "
            "(use `wanbatch run MANIFEST` to process in this process)"
        )
    settings.require_fal_key()
    from jobs.output_store import open_output_store
    from jobs.outputs import OutputWriteError

    try:
        open_output_store(settings).check_root_name()
    except OutputWriteError as exc:
        raise ConfigError(f"{exc}; the worker was not started") from None
    return settings.broker_url


def _reach_the_redis_servers(settings: Settings, broker_url: str) -> None:
    """The limiter's Redis and the broker, before Celery starts: at a first start, one line and
    exit 2 for either that cannot be used; after a fresh start of our own (:data:`RESTARTED_ENV`),
    waited for, as the outage under way that they are. Then a warning for a Redis that may evict
    wanbatch's keys."""
    from worker.limits import check_limiter, wait_for_limiter

    if os.environ.pop(RESTARTED_ENV, None) == "1":
        # Started afresh after Celery stopped on its own (the broker lost, out of memory): an
        # outage under way, which it waits out (a warning every 30 s), never exit 2; and
        # for a broker that takes writes, or Celery's start would stop again at once.
        from worker.broker_outage import wait_until_writable

        wait_for_limiter(settings)
        wait_until_writable(broker_url)
    else:
        from worker.broker_outage import check_writable

        check_limiter(settings)  # its Redis unreachable: one line, exit 2, before anything starts
        check_writable(broker_url)  # a replica, or full: one line, exit 2, as the limiter
    from worker.redis_memory import warn_at_start

    warn_at_start(settings)  # a Redis that may evict keys: one warning line per server


def _open_the_database(settings: Settings) -> None:
    """Migrate the database before any worker process starts, refuse a worker whose FAL_KEY is
    not the live workers' (:func:`refuse_another_key`: one line, exit 2), and say where this
    worker's limits differ from the tick leader's: never silently, as the leader's limits apply
    (said again if a leader publishes later, or another takes over; a key that differs then, two
    workers started within the same seconds, is said too)."""
    from jobs import db
    from worker.limits import published_mismatch, say_mismatch
    from worker.steps.webhooks import database_fingerprint, webhook_secret

    engine = db.open_engine(settings)
    # A read-only database (mode=ro, a file not ours, default_transaction_read_only, a standby):
    # every claim, lease and result would be refused, each round a traceback in the log, for ever.
    if (reason := db.read_only_reason(engine)) is not None:
        raise DatabaseReadOnlyError(
            f"the database is read-only: {reason}; a worker writes to it (claims, leases, "
            "results), so it was not started",
            reason=reason,
        )
    database = database_fingerprint(webhook_secret(engine))
    refuse_another_key(settings, database)
    say_mismatch(published_mismatch(settings, database))


def refuse_another_key(settings: Settings, database: str | None) -> None:
    """One line and exit 2 (:class:`~jobs.errors.ConfigError`) for a worker whose ``FAL_KEY``
    is not the key the live workers of ``database`` use (:func:`worker.peers.other_key_refusal`)."""
    from jobs.processes import process_prefix
    from worker.peers import other_key_refusal

    if (why := other_key_refusal(settings, database, process_prefix())) is not None:
        raise ConfigError(why)


def _start_afresh() -> NoReturn:
    """Replace this process with a new ``wanbatch worker`` of the same arguments.

    Celery ends its worker cleanly after some broker-connection losses (kombu's redis transport
    raising on a closed channel, logged as "Unrecoverable error"), though nobody asked it to
    stop. A worker must outlive a broker restart: the new start waits for the broker and the
    limiter (:data:`RESTARTED_ENV`) instead of ending with exit 2.
    """
    _log.error("the Celery worker stopped on its own; restarting it")
    time.sleep(1.0)
    os.environ[RESTARTED_ENV] = "1"
    os.execv(  # noqa: S606 - re-exec ourselves with the same arguments
        sys.executable, [sys.executable, "-c", "from cli import main; main()", *sys.argv[1:]]
    )


class _WorkerRun:
    """One run of Celery's worker in this process, and what its Celery signals share.

    Celery calls the receivers connected here on its own threads (or in a prefork child, for
    :meth:`after_fork`); :meth:`run` reads what they left once the worker returned: whether a
    stop was asked for (:attr:`asked_to_stop`), whether it failed to start for good
    (:attr:`start_failure`), whether the ticker met a schema downgraded under it
    (:attr:`schema_behind`). The receivers are connected with strong references (``weak=False``):
    nothing else keeps them alive.
    """

    def __init__(self, settings: Settings, machinery_loaded: Callable[[], None]) -> None:
        from celery.signals import worker_process_init, worker_ready, worker_shutdown, worker_shutting_down

        from worker import tasks
        from worker.app import get_app
        from worker.logs import celery_console_as_log_lines, celery_logs_through_ours
        from worker.running import worker_stop_watch

        self.settings = settings
        self.machinery_loaded = machinery_loaded
        self.app: Celery = get_app(settings)
        self.tickers: list[Ticker] = []
        self.schema_behind: list[ConfigError] = []  # the ticker met a schema downgraded under it
        self.asked_to_stop: list[str] = []  # the stop signals Celery was given
        worker_process_init.connect(self.after_fork, weak=False)
        # What stopped a worker before it was ever ready (see _StartFailure): the same start would
        # stop it again the same way, so it is one line and exit 2, never a restart.
        self.start_failure = _StartFailure()
        with self.app.connection_for_read() as connection:  # made, not connected
            self.start_failure.transient = (*connection.connection_errors, *connection.channel_errors)
        logging.getLogger("celery.worker").addFilter(self.start_failure)  # "Unrecoverable error: …"
        worker_ready.connect(self.start_ticker, weak=False)
        worker_shutdown.connect(self.stop_ticker, weak=False)
        celery_logs_through_ours()  # its task and multiprocessing loggers: our format, our handler
        celery_console_as_log_lines(settings.log_format)  # its shutdown notices too: log lines
        # A stop that a database which does not answer at all holds back (a frozen server: the
        # running task's write, the heartbeat's delete, the pool's threads joined at exit, each
        # waiting for ever) ends anyway, in one line, keeping what fal accepted in the journal.
        self.stop_watch: HangWatch = worker_stop_watch(settings.lease_seconds, tasks.built_runtime)
        worker_shutting_down.connect(self.by_signal, weak=False)

    def run(self, *, pool: str, concurrency: int | None, loglevel: str, node_name: str) -> None:
        """Run Celery's worker until it returns, then stop what it left running, however it ended."""
        from worker.app import run_worker
        from worker.steps.output_writes import share_warm_shutdown

        share_warm_shutdown()  # before the pool forks: its children hear the warm shutdown by it
        quiet = self.settings.log_format == "json"  # no banner amid JSON lines
        streams = sys.stdout, sys.stderr  # Celery makes them log records ("celery.redirected")
        try:
            run_worker(
                self.app,
                pool=pool.lower(),
                concurrency=concurrency,
                loglevel=loglevel.upper(),
                quiet=quiet,
                hostname=node_name,
            )
        finally:
            self.stop_ticker()  # however the worker ended (worker_shutdown did it already, as a rule)
            self.stop_watch.done.set()  # it stopped on its own: nothing for the watch to end
            sys.stdout, sys.stderr = streams  # what ends the command is said as every command says it

    def raise_failure(self) -> None:
        """One line and exit 2 for a worker that stopped itself: a start that would fail the same
        way again (never restarted), or a schema downgraded under the ticker (as at start-up)."""
        if self.start_failure.failed_for_good(bool(self.asked_to_stop)):
            raise ConfigError(self.start_failure.message())
        if self.schema_behind:
            raise self.schema_behind[0]

    def after_fork(self, **_: object) -> None:
        """In a prefork child (``worker_process_init``): abandon what was inherited.

        The child inherits this process's engine pool (the migration's connection) and maybe its
        runtime: two processes on one socket corrupt each other's transactions. Abandoned (not
        closed); the child opens its own.
        """
        from jobs import db
        from worker import tasks
        from worker.limits import in_pool_child

        db.open_engine(self.settings).dispose(close=False)
        tasks.set_runtime(None)
        self.machinery_loaded()  # forked while start-up had the GC paused (no timer in a child)
        in_pool_child()  # the limits' differences: said once, by the main process, not per child

    def start_ticker(self, **_: object) -> None:
        """Once Celery says the worker is ready (``worker_ready``): start the periodic tick."""
        from worker import tasks
        from worker.ticker import Ticker

        self.start_failure.ready = True
        self.machinery_loaded()  # Celery has loaded what it runs with
        ticker = Ticker(lambda: tasks.runtime(self.app), self.settings.tick_interval)
        ticker.start()
        self.tickers.append(ticker)

    def stop_ticker(self, **_: object) -> None:
        """Stop the tick: at Celery's warm shutdown (``worker_shutdown``: SIGTERM, SIGINT, after
        the running tasks ended), and again, for nothing, once the worker returned.

        The ticker clears this process's heartbeat before the process exits, or a clean stop would
        read as "still processing", then as a crash ("last seen"), in ``status``.
        """
        while self.tickers:
            stopped = self.tickers.pop()
            stopped.shutdown()
            if stopped.failure is not None:
                self.schema_behind.append(stopped.failure)

    def by_signal(self, sig: str = "", **_: object) -> None:
        """A stop signal (``worker_shutting_down``): the worker was asked to stop, and a stop that
        a database which does not answer holds back ends anyway (:attr:`stop_watch`). The warm
        shutdown lets the running tasks finish; a task that only waits for what it can do
        without ends its wait (:meth:`~worker.steps.output_writes.OutputWrites.end_waits`), in
        this process and in each prefork child, which never hears the signal itself
        (:func:`~worker.steps.output_writes.say_warm_shutdown`)."""
        from worker import tasks
        from worker.running import say_sends_awaited
        from worker.steps.output_writes import say_warm_shutdown

        self.asked_to_stop.append(sig)
        if self.stop_watch.ident is None:  # the first signal: a second one (cold shutdown) too
            self.stop_watch.start()
            say_warm_shutdown()  # a prefork child's waits end at their next look
            rt = tasks.built_runtime()
            say_sends_awaited(rt)  # what the warm shutdown waits for, said once
            if rt is not None:  # and what it need not wait for ends
                rt.output_writes.end_waits()


class _StartFailure(logging.Filter):
    """Why Celery's worker stopped before it was ever ready, kept instead of its traceback.

    Celery logs whatever stops its worker (``Unrecoverable error: …``, with the traceback) and
    returns. Some broker-connection losses end it so, and ``wanbatch worker`` then starts afresh
    (a worker must outlive a broker restart); but a start that failed otherwise before the worker
    was ever ready (a pool that cannot be built, a value Celery refuses) fails the very same way
    at every restart: it printed a traceback and "restarting it" every few seconds, forever. A
    broker that is down at start-up is not such a failure: Celery waits for it
    (``broker_connection_retry_on_startup``). Nor is a Redis broker that refuses writes (out of
    memory, a read-only replica: :func:`worker.broker_outage.broker_problem`), whose error ends
    Celery's start: the worker starts afresh, and waits for it to take writes
    (:func:`worker.broker_outage.wait_until_writable`).
    """

    def __init__(self) -> None:
        super().__init__()
        #: Set when Celery says the worker is ready (``worker_ready``).
        self.ready = False
        #: The broker transport's connection and channel errors: those are restarted after.
        self.transient: tuple[type[BaseException], ...] = ()
        self.reason: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.ready or record.levelno < logging.CRITICAL or not record.exc_info:
            return True
        exc = record.exc_info[1]
        from worker.broker_outage import broker_problem

        if exc is None or isinstance(exc, self.transient) or broker_problem(exc) is not None:
            # The broker's (unreachable, or a Redis that refuses writes: out of memory, a
            # read-only replica): an outage, and the worker starts afresh once it is over
            return True
        self.reason = f"{type(exc).__name__}: {exc}"
        return False  # said once, in the one line that ends the command

    def failed_for_good(self, asked_to_stop: bool) -> bool:
        """Whether the worker ended before it was ready, nobody asked, and not for the broker."""
        return not (asked_to_stop or self.ready) and self.reason is not None

    def message(self) -> str:
        """The one line that ends ``wanbatch worker``: the reason's first line, any key masked."""
        from jobs.printable import one_line
        from worker.fal.redact import redact_text

        why = one_line(redact_text(self.reason or ""))[:300]
        return (
            f"the Celery worker could not start ({why}); not restarting it, as the same start "
            "would fail the same way"
        )
