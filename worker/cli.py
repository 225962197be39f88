"""The full ``wanbatch`` command: the domain commands of :mod:`jobs.cli` plus execution.

Adds ``run``, ``worker`` and ``simulator`` to the same click group. Living in ``worker`` keeps
the dependency direction: ``worker`` imports ``jobs``, never the other way round.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.table import Table

from jobs import batches
from jobs.cli import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    allow_dir_option,
    cli,
    emit_json,
    err,
    guarded,
    json_option,
    money_line,
    out,
    print_budget_note,
    print_failures,
    status_table,
)
from jobs.errors import ConfigError, UsageError
from jobs.settings import Settings, get_settings


def _final_code(report: dict[str, Any]) -> int:
    counts = report["counts"]
    unfinished = report["total"] - report["finished"]
    return (
        EXIT_SOME_FAILED if counts.get("failed", 0) or counts.get("cancelled", 0) or unfinished else EXIT_OK
    )


def _run_and_report(batch_id: str, settings: Settings, as_json: bool, progress: bool) -> int:
    from worker.running import process_batch

    report, stats = process_batch(batch_id, settings, console=err, show_progress=progress and not as_json)
    if as_json:
        emit_json(
            {**report, "wall_seconds": round(stats.wall_seconds, 3), "status_calls": stats.status_calls}
        )
    else:
        out.print(status_table(report))
        out.print(money_line(report))
        print_failures(report)
        out.print(f"outputs in {settings.output_dir.resolve()}; finished in {stats.wall_seconds:.1f}s")
    return _final_code(report)


def _processing(as_json: bool, action: Callable[[], int], resume: Callable[[str | None], str]) -> None:
    """:func:`guarded`, plus what Ctrl-C and SIGTERM do to a command that processes a batch.

    The first signal stops the work within seconds (see :mod:`worker.running`) and exits 130
    with one line saying what was given back and how to resume (``resume(batch_id)``); a
    second one exits at once.
    """
    from worker.running import Interrupted, stop_on_signals

    def interruptible() -> int:
        try:
            with stop_on_signals():
                return action()
        except Interrupted as exc:
            _exit_interrupted(exc, as_json, exc.hint or resume(exc.batch_id))

    guarded(as_json, interruptible)


def _exit_interrupted(exc: Any, as_json: bool, hint: str) -> NoReturn:
    """Report an interruption and end the process now.

    ``os._exit``, not ``sys.exit``: a download abandoned in a worker thread would otherwise keep
    the interpreter alive (thread pools are joined at exit) for as long as it takes.
    """
    from rich.markup import escape

    line = f"{exc}; {hint}"
    if as_json:
        emit_json({"ok": False, "error": line, "interrupted": True, "batch": exc.batch_id})
    err.print(f"[yellow]{escape(line)}[/yellow]")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exc.exit_code)


def _stored_batch(ref: Path, settings: Settings) -> str | None:
    """The id of the stored batch ``run REF`` names when REF is no file (None: treat it as a manifest).

    ``run BATCH`` resumes a batch that has no manifest of its own to run again (an interrupted
    ``rerun``). Only a bare name is looked up, so a mistyped manifest path still gets the
    manifest's "file not found", and no database is created for it.
    """
    if ref.exists() or len(ref.parts) != 1 or ref.suffix.lower() in (".yaml", ".yml", ".json"):
        return None
    from jobs import store
    from jobs.errors import NotFoundError
    from jobs.models import BatchState

    try:
        with store.session_scope(batches.open_engine(settings)) as session:
            target = store.get_batch(session, str(ref))
            if target.state == BatchState.PAUSED:  # running it again is the user saying "go on"
                store.set_batch_state(session, target.id, BatchState.ACTIVE)
            return target.id
    except NotFoundError:
        return None


def _run_hint(batch_id: str | None) -> str:
    return "run the same command again to resume"


def _broker_warnings(settings: Settings) -> None:
    """Warn (never fail) when the workers that carry out a recorded change cannot be reached."""
    from worker.running import check_broker, live_workers, no_worker_warning

    try:
        check_broker(settings)
    except ConfigError as exc:
        err.print(f"[yellow]warning: {exc}[/yellow]")
        return
    if live_workers(settings) == 0:
        err.print(f"[yellow]{no_worker_warning(settings)}[/yellow]")


simulate_option = click.option(
    "--simulate",
    is_flag=True,
    help="Start the bundled fal simulator and send every request to it (no FAL_KEY needed, nothing billed).",
)
progress_option = click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")


@cli.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@json_option
@simulate_option
@progress_option
@allow_dir_option
def run(
    manifest: Path, as_json: bool, simulate: bool, no_progress: bool, allow_dirs: tuple[Path, ...]
) -> None:
    """Submit MANIFEST, then process it until every job is terminal, showing progress.

    Without WANBATCH_BROKER_URL the work runs in this process (embedded) and touches this batch
    only; with one, the `wanbatch worker` processes do it and this waits. Ctrl-C stops within
    seconds (exit 130); run again to resume. MANIFEST may also name a stored batch (`run BATCH`).
    """

    def action() -> int:
        from worker.running import check_broker, simulated

        settings = get_settings()
        batches.check_output_dir(settings)  # before anything is stored or sent
        if simulate:
            check_broker(settings)
            with simulated(settings) as sim_settings:
                return _submit_and_run(manifest, sim_settings, allow_dirs, as_json, not no_progress)
        settings.require_fal_key()
        check_broker(settings)  # exit 2 now, rather than wait silently on a broker that is down
        return _submit_and_run(manifest, settings, allow_dirs, as_json, not no_progress)

    _processing(as_json, action, _run_hint)


def _submit_and_run(
    manifest: Path, settings: Settings, allow_dirs: tuple[Path, ...], as_json: bool, progress: bool
) -> int:
    """`run` once its settings are known good: resume the stored batch it names, or submit the manifest."""
    stored = _stored_batch(manifest, settings)
    if stored is not None:
        return _run_and_report(stored, settings, as_json, progress)
    result = batches.submit_manifest(manifest, settings, allow_dirs)
    print_budget_note(result)
    return _run_and_report(result.batch_id, settings, as_json, progress)


@cli.command()
@click.argument("batch")
@click.option("--failed-only", is_flag=True, help="Only the jobs that ended failed or cancelled.")
@click.option("--new-seeds", is_flag=True, help="Draw fresh seeds instead of reusing the returned ones.")
@click.option(
    "--max-usd",
    "max_usd",
    default=None,
    metavar="AMOUNT",
    help="Budget cap of the new batch in USD (default: the parent's cap).",
)
@json_option
@simulate_option
@progress_option
def rerun(
    batch: str,
    failed_only: bool,
    new_seeds: bool,
    max_usd: str | None,
    as_json: bool,
    simulate: bool,
    no_progress: bool,
) -> None:
    """A new batch from BATCH, processed like `run`: by default the exact inputs and returned seeds."""

    def action() -> int:
        cap = None if max_usd is None else batches.parse_usd(max_usd)  # one-line UsageError
        settings = get_settings()
        batches.check_output_dir(settings)  # before anything is stored or sent
        options: dict[str, Any] = {"failed_only": failed_only, "new_seeds": new_seeds, "max_usd": cap}
        from worker.running import check_broker, simulated

        if simulate:
            check_broker(settings)
            with simulated(settings) as sim_settings:
                result = batches.rerun_batch(batch, settings=sim_settings, **options)
                print_budget_note(result)
                return _run_and_report(result.batch_id, sim_settings, as_json, not no_progress)
        settings.require_fal_key()
        check_broker(settings)  # exit 2 now, rather than wait silently on a broker that is down
        result = batches.rerun_batch(batch, settings=settings, **options)
        print_budget_note(result)
        return _run_and_report(result.batch_id, settings, as_json, not no_progress)

    def resume(batch_id: str | None) -> str:
        if batch_id is None:
            return "run the same command again to start over"
        return f"`wanbatch run {batch_id}` resumes the new batch (running `rerun` again would start another)"

    _processing(as_json, action, resume)


@cli.command()
@click.argument("batch")
@json_option
@simulate_option
@progress_option
def cancel(batch: str, as_json: bool, simulate: bool, no_progress: bool) -> None:
    """Stop BATCH: pending jobs are never submitted, queued ones are cancelled at fal.

    Embedded, this waits until every job is terminal; with workers, they finish the cancel.
    """

    def action() -> int:
        settings = get_settings()
        from jobs import store
        from jobs.models import BatchState
        from jobs.states import AT_PROVIDER_STATES, TERMINAL_STATES, JobState

        engine = batches.open_engine(settings)
        with store.session_scope(engine) as session:
            target = store.get_batch(session, batch)
            store.set_batch_state(session, target.id, BatchState.CANCELLED, reason="cancelled by user")
            batch_id = target.id
            # What fal does not hold ends now, set-based (seconds for 100,000 jobs); the rest
            # needs a cancel call each, made by the tick (queued ones first: they are free).
            at_once = store.cancel_unsent_jobs(
                session, [batch_id], reason="batch cancelled", error="cancelled by user",
                error_type="cancelled", worker="cli",
            )  # fmt: skip
            at_fal = store.count_in_states(session, AT_PROVIDER_STATES, batch_id=batch_id)
            unfinished = store.count_in_states(
                session, [s for s in JobState if s not in TERMINAL_STATES], batch_id=batch_id
            )
        err.print(
            f"cancel: {at_once} job(s) cancelled at once (never sent); {at_fal} at fal being cancelled there"
        )
        if unfinished == 0 and not settings.broker_url:
            report = batches.status(batch_id, settings)[0]
            if as_json:
                emit_json(report)
            else:
                out.print(status_table(report))
                out.print(money_line(report))
                print_failures(report)
            return _final_code(report)
        if settings.broker_url:
            _broker_warnings(settings)  # the cancel is recorded; the workers carry it out
            report = batches.status(batch_id, settings)[0]
            emit_json(report) if as_json else out.print(status_table(report))
            return EXIT_OK
        if simulate:
            from worker.running import simulated

            with simulated(settings) as sim_settings:
                return _run_and_report(batch_id, sim_settings, as_json, not no_progress)
        return _run_and_report(batch_id, settings, as_json, not no_progress)

    _processing(as_json, action, lambda _: f"run `wanbatch cancel {batch}` again to finish cancelling")


@cli.command()
@click.option("--concurrency", "-c", type=int, default=None, help="Worker processes (default: CPU count).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--pool", default="prefork", show_default=True, help="Celery pool: prefork or threads.")
def worker(concurrency: int | None, loglevel: str, pool: str) -> None:
    """Start a distributed worker (Celery) against WANBATCH_BROKER_URL and WANBATCH_DATABASE_URL.

    Every worker also runs the periodic tick (dispatch, status checks, reconciliation); a
    database lock makes exactly one of them lead at a time.
    """

    def action() -> int:
        settings = get_settings()
        if not settings.broker_url:
            raise ConfigError(
                "WANBATCH_BROKER_URL is not set: `wanbatch worker` is the distributed mode "
                "(use `wanbatch run MANIFEST` to process in this process)"
            )
        settings.require_fal_key()
        batches.open_engine(settings)  # migrate before any worker process starts
        from celery.signals import worker_process_init, worker_ready, worker_shutdown, worker_shutting_down

        from worker import tasks
        from worker.app import QUEUE, app
        from worker.ticker import Ticker

        ticker: list[Ticker] = []

        @worker_process_init.connect(weak=False)
        def _after_fork(**_: object) -> None:
            # A prefork child inherits this process's engine pool (the migration's connection)
            # and maybe its runtime: two processes on one socket corrupt each other's
            # transactions. Abandon (not close) what was inherited; the child opens its own.
            batches.open_engine(settings).dispose(close=False)
            tasks.set_runtime(None)

        @worker_ready.connect(weak=False)
        def _start_ticker(**_: object) -> None:
            t = Ticker(tasks.runtime, settings.tick_interval)
            t.start()
            ticker.append(t)

        @worker_shutdown.connect(weak=False)
        def _stop_ticker(**_: object) -> None:
            for t in ticker:
                t.stop()

        argv = [
            "worker",
            f"--loglevel={loglevel}",
            "-Q",
            QUEUE,
            f"--pool={pool}",
            "--without-gossip",
            "--without-mingle",
        ]
        if concurrency:
            argv.append(f"--concurrency={concurrency}")
        asked_to_stop: list[str] = []

        @worker_shutting_down.connect(weak=False)
        def _by_signal(sig: str = "", **_: object) -> None:
            asked_to_stop.append(sig)

        app.worker_main(argv=argv)
        if not asked_to_stop:
            # Celery ends its worker cleanly after some broker-connection losses (kombu's redis
            # transport raising on a closed channel, logged as "Unrecoverable error"), though
            # nobody asked it to stop. A worker must outlive a broker restart: start afresh.
            logging.getLogger(__name__).error("the Celery worker stopped on its own; restarting it")
            time.sleep(1.0)
            os.execv(  # noqa: S606 - re-exec ourselves with the same arguments
                sys.executable, [sys.executable, "-c", "from worker.cli import main; main()", *sys.argv[1:]]
            )
        return EXIT_OK

    guarded(False, action)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8787, show_default=True)
@click.option(
    "--latency", type=float, default=None, help="Seconds each request runs (default: scaled model time)."
)
@click.option(
    "--concurrency-limit", type=int, default=2, show_default=True, help="Account limit on running requests."
)
@click.option(
    "--fault", "faults", multiple=True, metavar="KIND=VALUE", help="Fault injection, e.g. submit_429=0.1."
)
@click.option(
    "--public-url",
    default=None,
    help="Base URL written into the URLs it hands out (e.g. http://simulator:8787 in docker compose).",
)
def simulator(
    host: str,
    port: int,
    latency: float | None,
    concurrency_limit: int,
    faults: tuple[str, ...],
    public_url: str | None,
) -> None:
    """Run the bundled simulator of fal's queue API (for the offline demo and tests)."""
    from worker.simulator.options import SimulatorOptions
    from worker.simulator.server import serve

    def action() -> int:
        _check_simulator_options(port, latency, concurrency_limit, public_url)
        options = SimulatorOptions(
            concurrency_limit=concurrency_limit, latency_seconds=latency, public_url=public_url
        )
        if faults:
            options = _with_faults(options, faults)
        try:
            serve(host, port, options)
        except OSError as exc:  # in use, not ours to bind, or an unknown host
            raise UsageError(f"the simulator cannot serve on {host}:{port}: {exc.strerror or exc}") from None
        return EXIT_OK

    guarded(False, action)


def _check_simulator_options(
    port: int, latency: float | None, concurrency_limit: int, public_url: str | None
) -> None:
    """One-line UsageErrors for values the simulator would otherwise take silently or crash on."""
    import math
    from urllib.parse import urlsplit

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535 (0: any free port), got {port}")
    if latency is not None and not (math.isfinite(latency) and latency >= 0):
        raise UsageError(f"--latency must be a number of seconds, 0 or more, got {latency}")
    if concurrency_limit < 1:
        raise UsageError(f"--concurrency-limit must be 1 or more, got {concurrency_limit}")
    if public_url is not None:
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(
                f"--public-url must be an http(s) URL such as http://simulator:8787, got {public_url!r}"
            )


def _with_faults(options: Any, faults: tuple[str, ...]) -> Any:
    """``KIND=P`` (a probability below 1) or ``KIND=N`` (the next N events) per ``--fault``."""
    import dataclasses

    from worker.simulator import FAULT_KINDS
    from worker.simulator.faults import FaultRule

    rules: dict[str, FaultRule] = {}
    for item in faults:
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or number < 0:
            raise UsageError(f"--fault takes KIND=PROBABILITY or KIND=COUNT, got {item!r}")
        if key.strip() not in FAULT_KINDS:
            raise UsageError(f"unknown fault {key.strip()!r} (known: {', '.join(sorted(FAULT_KINDS))})")
        raw = {"probability": number} if number < 1 else {"next": int(number)}
        rules[key.strip()] = FaultRule.parse(raw)
    return dataclasses.replace(options, faults=rules)


def install_key_redaction() -> bool:
    """Redact FAL_KEY from every log record of this process (and of the workers it forks).

    Returns whether a key was configured. Bad configuration is left for the command to report.
    """
    from jobs.errors import WanbatchError
    from worker.fal.redact import install_redaction

    try:
        key = get_settings().fal_key
    except WanbatchError:
        return False
    if key is None or not key.get_secret_value():
        return False
    install_redaction(key.get_secret_value())
    return True


#: Exit code of an unexpected error (sysexits.h ``EX_SOFTWARE``): apart from the contract's
#: 0 (success), 1 (some jobs failed) and 2 (bad input), so scripts never mistake a crash for either.
EXIT_INTERNAL = 70


def _internal_error(exc: BaseException) -> NoReturn:
    """One line on stderr for a bug; the traceback goes to an owner-only file the line names."""
    import tempfile
    import traceback

    from worker.fal.redact import redact_text

    detail = (str(exc).strip().splitlines() or [""])[0][:300]
    where = ""
    try:
        fd, name = tempfile.mkstemp(prefix="wanbatch-crash-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(redact_text("".join(traceback.format_exception(exc))))
        where = f" (details in {name})"
    except OSError:
        pass
    text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    print(f"internal error: {redact_text(text)}; please report it{where}", file=sys.stderr)
    sys.exit(EXIT_INTERNAL)


def main() -> None:
    """Console-script entry point.

    Click runs with ``standalone_mode=False`` so this function decides what reaches the user:
    a usage mistake is one ``error:`` line (exit 2), ``--help``/``--version`` behave as always,
    Ctrl-C prints ``Aborted!`` (exit 1, as click does), and anything unexpected — a bug — is
    one ``internal error`` line (exit 70) instead of a traceback. Deliberate errors never get
    here: every command turns :class:`~jobs.errors.WanbatchError` into its message and exit code.
    """
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        install_key_redaction()
        code = cli.main(prog_name="wanbatch", standalone_mode=False)
    except click.UsageError as exc:  # unknown option, missing argument, bad value
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        print(f"error: {exc.format_message().rstrip('.')}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:  # the safety net: a bug still gets one line, not a traceback
        _internal_error(exc)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


__all__ = ["Table", "main"]
