"""``worker``, ``serve`` and ``simulator``: the long-running services.

``worker`` starts a Celery worker (distributed mode); ``serve`` runs the web app that receives
fal's webhooks (:mod:`web`); ``simulator`` serves the bundled stand-in for fal's queue API
(:mod:`falsim`). Each imports what it serves only when it runs.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from urllib.parse import urlsplit

import click

from cli.output import EXIT_OK, guarded


@click.command()
@click.option("--concurrency", "-c", type=int, default=None, help="Worker processes (default: CPU count).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--pool", default="prefork", show_default=True, help="Celery pool: prefork or threads.")
def worker(concurrency: int | None, loglevel: str, pool: str) -> None:
    """Start a distributed worker (Celery) against WANBATCH_BROKER_URL and WANBATCH_DATABASE_URL.

    Every worker also runs the periodic tick (dispatch, status checks, reconciliation); a
    database lock makes exactly one of them lead at a time.
    """

    def action() -> int:
        from jobs import db
        from jobs.errors import ConfigError
        from jobs.settings import get_settings

        settings = get_settings()
        if not settings.broker_url:
            raise ConfigError(
                "WANBATCH_BROKER_URL is not set: `wanbatch worker` is the distributed mode "
                "(use `wanbatch run MANIFEST` to process in this process)"
            )
        settings.require_fal_key()
        db.open_engine(settings)  # migrate before any worker process starts
        from celery.signals import worker_process_init, worker_ready, worker_shutdown, worker_shutting_down

        from worker import tasks
        from worker.app import QUEUE, get_app
        from worker.ticker import Ticker

        app = get_app(settings)

        ticker: list[Ticker] = []

        @worker_process_init.connect(weak=False)
        def _after_fork(**_: object) -> None:
            # A prefork child inherits this process's engine pool (the migration's connection)
            # and maybe its runtime: two processes on one socket corrupt each other's
            # transactions. Abandon (not close) what was inherited; the child opens its own.
            db.open_engine(settings).dispose(close=False)
            tasks.set_runtime(None)

        @worker_ready.connect(weak=False)
        def _start_ticker(**_: object) -> None:
            t = Ticker(lambda: tasks.runtime(app), settings.tick_interval)
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
                sys.executable, [sys.executable, "-c", "from cli import main; main()", *sys.argv[1:]]
            )
        return EXIT_OK

    guarded(False, action)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8788, show_default=True)
def serve(host: str, port: int) -> None:
    """Receive fal's webhooks at POST /webhooks/fal (put it behind WANBATCH_WEBHOOK_URL).

    Verifies each delivery's signature against WANBATCH_WEBHOOK_JWKS_URL, stores it in the
    database and applies it to its job; the workers' tick downloads what it completes.
    """

    def action() -> int:
        import uvicorn

        from jobs.errors import UsageError
        from jobs.settings import get_settings
        from web.app import create_app

        if not 0 <= port <= 65535:
            raise UsageError(f"--port must be between 1 and 65535 (0: any free port), got {port}")
        app = create_app(get_settings())
        try:
            uvicorn.run(app, host=host, port=port, log_level="info")
        except OSError as exc:  # in use, not ours to bind, or an unknown host
            raise UsageError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
        return EXIT_OK

    guarded(False, action)


@click.command()
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

    def action() -> int:
        from falsim import SimulatorOptions, serve
        from falsim.faults import parse_fault_option
        from jobs.errors import UsageError

        _check_simulator_options(port, latency, concurrency_limit, public_url)
        try:
            rules = dict(parse_fault_option(item) for item in faults)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        options = SimulatorOptions(
            concurrency_limit=concurrency_limit, latency_seconds=latency, public_url=public_url, faults=rules
        )
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
    from jobs.errors import UsageError

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
