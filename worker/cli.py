"""The full ``wanbatch`` command: the domain commands of :mod:`jobs.cli` plus execution.

Adds ``run``, ``worker`` and ``simulator`` to the same click group. Living in ``worker`` keeps
the dependency direction: ``worker`` imports ``jobs``, never the other way round.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from jobs import batches
from jobs.cli import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    cli,
    emit_json,
    err,
    guarded,
    json_option,
    money_line,
    out,
    print_failures,
    status_table,
)
from jobs.errors import ConfigError
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
def run(manifest: Path, as_json: bool, simulate: bool, no_progress: bool) -> None:
    """Submit MANIFEST, then process it until every job is terminal, showing progress.

    Without WANBATCH_BROKER_URL the work runs in this process (embedded); with one, the
    `wanbatch worker` processes do it and this waits. Run again to resume an interrupted batch.
    """

    def action() -> int:
        settings = get_settings()
        if simulate:
            from worker.running import simulated

            with simulated(settings) as sim_settings:
                result = batches.submit_manifest(manifest, sim_settings)
                return _run_and_report(result.batch_id, sim_settings, as_json, not no_progress)
        settings.require_fal_key()
        result = batches.submit_manifest(manifest, settings)
        return _run_and_report(result.batch_id, settings, as_json, not no_progress)

    guarded(as_json, action)


@cli.command()
@click.argument("batch")
@click.option("--failed-only", is_flag=True, help="Only the jobs that ended failed or cancelled.")
@click.option("--new-seeds", is_flag=True, help="Draw fresh seeds instead of reusing the returned ones.")
@json_option
@simulate_option
@progress_option
def rerun(
    batch: str, failed_only: bool, new_seeds: bool, as_json: bool, simulate: bool, no_progress: bool
) -> None:
    """A new batch from BATCH, processed like `run`: by default the exact inputs and returned seeds."""

    def action() -> int:
        settings = get_settings()
        if simulate:
            from worker.running import simulated

            with simulated(settings) as sim_settings:
                result = batches.rerun_batch(
                    batch, failed_only=failed_only, new_seeds=new_seeds, settings=sim_settings
                )
                return _run_and_report(result.batch_id, sim_settings, as_json, not no_progress)
        settings.require_fal_key()
        result = batches.rerun_batch(batch, failed_only=failed_only, new_seeds=new_seeds, settings=settings)
        return _run_and_report(result.batch_id, settings, as_json, not no_progress)

    guarded(as_json, action)


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

        engine = batches.open_engine(settings)
        with store.session_scope(engine) as session:
            target = store.get_batch(session, batch)
            store.set_batch_state(session, target.id, BatchState.CANCELLED, reason="cancelled by user")
            batch_id = target.id
        if settings.broker_url:
            report = batches.status(batch_id, settings)[0]
            emit_json(report) if as_json else out.print(status_table(report))
            return EXIT_OK
        if simulate:
            from worker.running import simulated

            with simulated(settings) as sim_settings:
                return _run_and_report(batch_id, sim_settings, as_json, not no_progress)
        return _run_and_report(batch_id, settings, as_json, not no_progress)

    guarded(as_json, action)


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
        options = SimulatorOptions(
            concurrency_limit=concurrency_limit, latency_seconds=latency, public_url=public_url
        )
        if faults:
            options = _with_faults(options, faults)
        serve(host, port, options)
        return EXIT_OK

    guarded(False, action)


def _with_faults(options: Any, faults: tuple[str, ...]) -> Any:
    """``KIND=P`` (a probability below 1) or ``KIND=N`` (the next N events) per ``--fault``."""
    import dataclasses

    from jobs.errors import UsageError
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


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    install_key_redaction()
    cli(prog_name="wanbatch")


__all__ = ["Table", "main"]
