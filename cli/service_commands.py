"""``worker``, ``serve`` and ``simulator``: the long-running services.

``worker`` starts a Celery worker (distributed mode); ``serve`` runs the web app that receives
fal's webhooks (:mod:`web`); ``simulator`` serves the bundled stand-in for fal's queue API
(:mod:`falsim`). Each imports what it serves only when it runs.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import socket
from typing import Any

import click

from cli import startup
from cli.output import EXIT_OK, guarded, require_http_environment
from jobs.bounds import MAX_THREADS
from jobs.http_environment import require_usable
from worker.celery_worker import RESTARTED_ENV as RESTARTED_ENV  # re-exported: its home before this move

#: ``wanbatch worker``'s Celery pool unless ``--pool`` says otherwise (see :func:`worker`).
DEFAULT_POOL = "threads"
#: The pools ``--pool`` takes: Celery's that need no other package (eventlet and gevent do).
POOLS = ("threads", "prefork", "processes", "solo")
#: ``--loglevel``'s choices: Celery's (``celery worker -l``), kept here so ``--help`` needs no Celery.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL")


class _Count(click.IntRange):
    """A bounded whole number: ``-c x`` is "not a valid integer", not "not a valid integer range"
    (which read as if a range such as ``1..4`` were wanted)."""

    name = "integer"


#: What a node name may not hold: white space and control characters (it names the worker's
#: reply queue on the broker and stands in every line that names the worker).
_NOT_IN_NODE_NAME = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def node_name(value: str | None) -> str:
    """``--name``'s value as Celery's ``--hostname`` makes it: ``NAME@HOST`` with ``%h`` (this
    host's name), ``%n`` (its first label) and ``%d`` (its domain) expanded; a value without ``@``
    is the host part. The name part defaults to ``wanbatch-PID`` (this process's id, which
    ``status`` and the leases name too, ``host:pid:``) where Celery's is ``celery``: two workers on
    one host then never share a node name (``celery@HOST`` for both: Celery warns of the duplicate
    whenever they are pinged, and their log lines, Flower and ``celery inspect`` cannot tell them
    apart). A bad value is a usage error (exit 2)."""
    from celery.utils.nodenames import host_format, nodesplit

    if value is not None and (not value.strip() or _NOT_IN_NODE_NAME.search(value)):
        raise click.BadParameter("a node name is NAME@HOST, without spaces or control characters")
    name, host = nodesplit(value or "")
    try:
        expanded: str = host_format(f"{name or f'wanbatch-{os.getpid()}'}@{host or socket.gethostname()}")
    except ValueError:  # an abbreviation Celery does not know (%x)
        raise click.BadParameter(f"{value!r}: unknown %-abbreviation (known: %h, %n, %d)") from None
    if _NOT_IN_NODE_NAME.search(expanded) or expanded.startswith("@") or expanded.endswith("@"):
        raise click.BadParameter("a node name is NAME@HOST, both parts not empty")
    return expanded


def _node_name_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    return node_name(value)


@click.command()
@click.option(
    "--concurrency",
    "-c",
    # Checked here, before anything connects: Celery took -1 (prefork: a traceback at every
    # restart; threads: an internal error), 0 as "the CPU count", and any number of threads.
    type=_Count(1, MAX_THREADS),
    default=None,
    help="Tasks run at once: threads or processes (default: CPU count).",
)
@click.option(
    "--loglevel", "-l", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO", show_default=True
)
@click.option(
    "--pool",
    type=click.Choice(POOLS, case_sensitive=False),
    default=DEFAULT_POOL,
    show_default=True,
    help="Celery pool: threads (tasks on threads of this process) or prefork (child processes).",
)
@click.option(
    "--name",
    "-n",
    "node_name",
    metavar="NAME@HOST",
    default=None,
    callback=_node_name_option,
    help="This worker's Celery node name, unique per worker (Celery's --hostname: %h is the host "
    "name, %n its first label, %d its domain; a value without @ is the host part). "
    "Default: wanbatch-PID@HOST.",
)
def worker(concurrency: int | None, loglevel: str, pool: str, node_name: str) -> None:
    """Start a distributed worker (Celery) against WANBATCH_BROKER_URL and WANBATCH_DATABASE_URL.

    Every worker also runs the periodic tick (dispatch, status checks, reconciliation); a
    database lock makes exactly one of them lead at a time.
    \f

    Why the threads pool by default, where Celery's own default is prefork: Celery recommends prefork for
    CPU-bound tasks (https://docs.celeryq.dev/en/stable/userguide/concurrency/index.html), and wanbatch's
    tasks are not — a step waits on fal, the database and the disk, and the embedded mode runs the very
    same steps on thread pools (:mod:`worker.embedded`). Prefork costs CPU for nothing here: every child
    builds a runtime of its own (database pool, fal client, TLS context, endpoint registry) and every task
    crosses a pipe to it and back, while on threads the tasks share the process's runtime, and their
    notices reach the tick leader's conductor directly when it runs in the same process
    (:func:`worker.tasks.conduct_here`). On the 400-job drain benchmark (``python -m bench.drain``) two
    threads workers use 8 % less CPU than two prefork ones (45 vs. 49 ms per job, the watcher and the
    submit included) and half the memory (420 vs. 865 MB). What threads give up, per the same page:
    ``--max-tasks-per-child`` and task time limits, which wanbatch uses neither of (downloads bound
    themselves with WANBATCH_DOWNLOAD_TIMEOUT). ``task_acks_late`` keeps a task's message until it ran, so
    a worker process killed mid-task leaves it to be redelivered (and the job's lease to lapse for the
    tick to take over), whichever the pool; ``task_reject_on_worker_lost`` only acts on a prefork child
    that dies under a living parent. ``--pool prefork`` remains available.
    """

    def action() -> int:
        from jobs.settings import get_settings
        from worker.celery_worker import serve_worker
        from worker.logs import timestamp_text_lines

        timestamp_text_lines()  # a worker's log is read hours later: every line says when
        settings = get_settings()
        # The proxy and certificate variables its clients will read, for the fal it calls.
        require_http_environment([settings.fal_queue_url, settings.fal_rest_url])
        return serve_worker(
            settings,
            concurrency=concurrency,
            loglevel=loglevel,
            pool=pool,
            node_name=node_name,
            machinery_loaded=startup.resume,
        )

    guarded(False, action)


def uvicorn_log_config(log_format: str) -> dict[str, Any] | None:
    """How ``serve`` has uvicorn log: for JSON logs, not at all (its records go to our root
    handler); for text, uvicorn's own handlers (access lines on stdout, the rest on stderr), each
    line in the long-running processes' text format: its time first, in UTC to the millisecond,
    as a worker's (``2026-05-01T22:14:03.512Z INFO uvicorn.access: 127.0.0.1:5000 - "GET / …"
    200``), so a receiver's log says when each delivery came.

    The line is formatted from the record's message, never from uvicorn's own fields: every
    record is rendered (and the key redacted from it) when it is made
    (:func:`worker.fal.redact.install_redaction`), which leaves no ``args``, and uvicorn's access
    formatter built its line from the args and failed on every request ("--- Logging error
    ---", a traceback per request). The rendered message is the same line.
    """
    if log_format == "json":
        return None
    from uvicorn.config import LOGGING_CONFIG

    from worker.logs import TIMESTAMPED_TEXT_FORMAT

    config = copy.deepcopy(LOGGING_CONFIG)
    ours = {"()": "worker.logs.TextFormatter", "fmt": TIMESTAMPED_TEXT_FORMAT}
    config["formatters"] = {"default": dict(ours), "access": dict(ours)}
    return config


#: The request line inside an access log line already rendered: ``"POST /path?query HTTP/1.1"``.
_REQUEST_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/')
#: Connections and requests ``serve`` handles at once, at most; beyond it uvicorn answers 503 at
#: once. Each may hold a body of up to 1 MiB for a few seconds: this bounds what a flood of
#: connections costs. uvicorn counts an open connection that has sent no request yet too: each
#: must send its request's head within :data:`web.connections.HEAD_DEADLINE` or is closed.
SERVE_LIMIT_CONCURRENCY = 100
#: Connections one peer may hold open at once (a quarter of :data:`SERVE_LIMIT_CONCURRENCY`):
#: one host cannot take every slot, even by reconnecting as its idle ones are closed. Each of
#: fal's deliveries is one short request, so a sender of webhooks needs few connections at once.
#: The proxies WANBATCH_SERVE_FORWARDED_ALLOW_IPS names have no such cap (everything behind one
#: comes from its address); a connection beyond it is closed at once, a failed delivery to fal,
#: which sends it again later.
SERVE_CONNECTIONS_PER_PEER = 25
#: Seconds ``serve``'s graceful shutdown (SIGTERM, Ctrl-C, SIGHUP) waits for requests in progress
#: (a webhook body still arriving has :data:`web.bodies.BODY_DEADLINE`, as long): what is still
#: running then is cut (answered 503, or its connection reset: a dashboard tab that stopped
#: reading a video), not waited on for ever (:mod:`jobs.asgi_shutdown`).
SERVE_GRACEFUL_SHUTDOWN_SECONDS = 10


class AccessLogMasking(logging.Filter):
    """Masks the secret query values (the webhook URL's ``token``) of uvicorn's access lines.

    uvicorn logs each request's path with its query as sent; ``POST /webhooks/fal?…&token=…``
    would put every job's webhook token in the log. The target is masked with
    :func:`jobs.url_secrets.masked_url`, as every other URL in the log is: in the record's
    args when it has them, and in its message when it was rendered already
    (:func:`worker.fal.redact.install_redaction` renders every record when it is made).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from jobs.url_secrets import masked_url

        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (*args[:2], masked_url(args[2]), *args[3:])
        if isinstance(record.msg, str):
            record.msg = _REQUEST_LINE.sub(
                lambda m: f'"{m.group("method")} {masked_url(m.group("target"))} HTTP/', record.msg
            )
        return True


def mask_access_log() -> None:
    """Install :class:`AccessLogMasking` on uvicorn's access logger (once)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, AccessLogMasking) for f in access.filters):
        access.addFilter(AccessLogMasking())


def stopping_on_hangup(server_class: Any) -> Any:
    """A subclass of ``server_class`` (:class:`uvicorn.Server`) that stops on SIGHUP as on SIGTERM.

    uvicorn handles SIGINT and SIGTERM only (``uvicorn.server.HANDLED_SIGNALS``): a SIGHUP —
    the terminal or SSH session closed, ``kill -HUP`` from a process manager — killed ``serve``
    on the spot, cutting webhook deliveries and dashboard actions short mid-request. Now it is a
    graceful shutdown like SIGTERM's: no new connection is taken, requests in progress finish,
    then the process ends by the signal, as uvicorn ends it after SIGTERM (exit status 129). It
    is not a reload (settings are read at start: a changed one needs a restart). A SIGHUP the
    parent set to be ignored (``nohup``) stays ignored: it goes on serving. Output to a terminal
    that hung up goes to /dev/null, so the last lines are not errors nobody can read
    (:func:`worker.running.drop_hung_up_terminal`), as for ``run``. A second Ctrl-C ends the
    shutdown at once on every Python (:class:`jobs.asgi_shutdown.ForcedExitEndsShutdown`).
    """
    import contextlib
    import signal
    import threading
    from collections.abc import Iterator
    from types import FrameType

    from jobs.asgi_shutdown import ForcedExitEndsShutdown
    from worker.running import drop_hung_up_terminal, open_terminals

    # The simulator's server has the mixin already (it is first there): added once.
    bases = (
        (server_class,)
        if issubclass(server_class, ForcedExitEndsShutdown)
        else (ForcedExitEndsShutdown, server_class)
    )

    class Server(*bases):  # type: ignore[misc]
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # Inside uvicorn's own: its handlers are restored, and a signal that stopped the
            # server raised again, after this one's, so SIGHUP ends the process as SIGTERM does.
            with super().capture_signals():
                hangup = getattr(signal, "SIGHUP", None)  # not on Windows
                if (
                    hangup is None
                    or threading.current_thread() is not threading.main_thread()
                    or signal.getsignal(hangup) is signal.SIG_IGN
                ):
                    yield
                    return
                terminals = open_terminals()

                def hung_up(signum: int, frame: FrameType | None) -> None:
                    drop_hung_up_terminal(terminals)
                    self.handle_exit(signum, frame)

                previous = signal.signal(hangup, hung_up)
                try:
                    yield
                finally:
                    signal.signal(hangup, previous)

    return Server


def serve_host(host: str) -> str:
    """``--host`` as a bind takes it: stripped, an IPv6 address without its brackets
    (``[::1]`` was looked up as a host name: a DNS error); checked as
    ``WANBATCH_METRICS_HOST`` is (:func:`jobs.settings.metrics_host_problem`). Empty is refused
    (it bound every interface, without a word): a :class:`~jobs.errors.UsageError` (exit 2)."""
    from jobs.errors import UsageError
    from jobs.settings import METRICS_HOST_FORMS, metrics_host_problem

    shown = host.strip()
    if shown.startswith("[") and shown.endswith("]"):
        shown = shown[1:-1].strip()
    if not shown:
        raise UsageError(
            "--host is empty (it would listen on every interface): give the address to listen on, "
            "127.0.0.1 (the default), or 0.0.0.0 or :: to mean every interface"
        )
    problem = metrics_host_problem(shown)
    if problem:
        raise UsageError(f"--host: {problem}; {METRICS_HOST_FORMS}")
    return shown


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8788, show_default=True)
def serve(host: str, port: int) -> None:
    """One web app: the dashboard at /, Prometheus metrics at /metrics, fal's webhooks at
    POST /webhooks/fal (put that behind WANBATCH_WEBHOOK_URL).

    Once WANBATCH_SERVE_TOKEN is set, the dashboard and /metrics need it from every client,
    loopback included (unset: read-only, loopback only); the webhook endpoint never does: each
    delivery's signature is verified against WANBATCH_WEBHOOK_JWKS_URL, stored and applied to
    its job. Behind a proxy elsewhere than this host's loopback, name it in
    WANBATCH_SERVE_FORWARDED_ALLOW_IPS.
    """

    def action() -> int:
        import uvicorn

        from jobs.errors import UsageError
        from jobs.settings import get_settings
        from web.app import create_app
        from web.auth import trusted_proxies
        from web.connections import guarded_h11
        from worker.logs import timestamp_text_lines

        if not 0 <= port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535 (0: any free port), got {port}")
        bind_host = serve_host(host)
        settings = get_settings()
        require_http_environment([settings.webhook_jwks_url])  # what the JWKS fetch reads
        app = create_app(settings, heartbeat=True)  # an upgrade by a newer wanbatch waits for it
        log_config = uvicorn_log_config(settings.log_format)
        timestamp_text_lines()  # the app's own lines too: a receiver's log is read hours later
        startup.resume()
        # Bound here, not by uvicorn: uvicorn logs a bind error and exits 3 itself (``[Errno 98]``
        # or ``Name or service not known`` on its own line), which the one-line error (exit 2)
        # every other usage mistake gets could never replace.
        sock = socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET, socket.SOCK_STREAM)
        shown = f"[{bind_host}]" if ":" in bind_host else bind_host
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bind_host, port))
            sock.listen(2048)
        except OSError as exc:  # in use, not ours to bind, or an unknown host
            sock.close()
            raise UsageError(f"cannot serve on {shown}:{port}: {exc.strerror or exc}") from None
        # uvicorn's h11 parser refuses a Content-Length of more than 20 digits itself (h11's
        # fixed CONTENT_LENGTH_MAX_DIGITS, https://github.com/python-hyper/h11): a 400 the app
        # never sees, so the receiver's 413 and its count apply up to 20 digits (README: Webhooks).
        config = uvicorn.Config(
            app,
            log_level="info",
            log_config=log_config,
            limit_concurrency=SERVE_LIMIT_CONCURRENCY,
            # uvicorn's h11 protocol, with a deadline for each request's head and a cap per peer
            # (web.connections): otherwise idle connections hold the slots above for ever.
            http=guarded_h11(SERVE_CONNECTIONS_PER_PEER, trusted_proxies(settings.serve_forwarded_allow_ips)),
            # The app believes the proxy headers itself (web.auth.ForwardedHeaders: the same
            # rewrite, for WANBATCH_SERVE_FORWARDED_ALLOW_IPS's proxies), so that it can tell
            # whether the peer was one of them, which uvicorn's rewrite hides.
            proxy_headers=False,
            timeout_graceful_shutdown=SERVE_GRACEFUL_SHUTDOWN_SECONDS,
        )
        mask_access_log()  # after the Config, which configures uvicorn's loggers
        from jobs.open_files import quiet_accept_errors, raise_soft_limit

        raise_soft_limit()  # toward the hard limit: each connection holds a file descriptor
        quiet_accept_errors()  # none left: one line now and then, not a traceback per try
        server = stopping_on_hangup(uvicorn.Server)(config)
        # uvicorn says where it listens only for sockets it bound itself: the same line, as before.
        bound = sock.getsockname()[1]
        said = "Uvicorn running on http://%s:%d (Press CTRL+C to quit)"
        logging.getLogger("uvicorn.error").info(said, shown, bound)
        server.run(sockets=[sock])
        return EXIT_OK

    guarded(False, action)


def fault_kinds() -> dict[str, str]:
    """The simulator's fault kinds and what each does, read from ``falsim/faults.py`` itself.

    The :data:`falsim.faults.FAULTS` literal is parsed, not imported: importing anything of
    :mod:`falsim` loads the whole simulator (uvicorn, starlette, the endpoint registry), a third
    of a second that ``simulator --help`` should not pay. One list, so the help cannot drift.
    """
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("falsim")  # a top-level package: found, not imported
    if spec is not None and spec.origin is not None:
        source = Path(spec.origin).with_name("faults.py").read_text(encoding="utf-8")
        for node in ast.parse(source).body:
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "FAULTS":
                assert node.value is not None
                found: dict[str, str] = ast.literal_eval(node.value)
                return found
    from falsim.faults import FAULTS  # the file moved or changed shape: pay the import

    return FAULTS


class _SimulatorCommand(click.Command):
    """``simulator``'s help ends with every fault kind (see :func:`fault_kinds`)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        kinds = fault_kinds()
        with formatter.section("Fault kinds (--fault KIND=P or KIND=N, or POST /_sim/faults)"):
            formatter.write_dl(sorted(kinds.items()))
        formatter.write_paragraph()
        formatter.write_text(
            "KIND=0.1 fires on 10% of eligible events, KIND=3 on the next 3. While it runs: "
            'POST /_sim/faults with {"KIND": {"probability": P, "next": N, ...params}} '
            "(?replace=1 drops the other rules), GET /_sim/faults shows the rules and how often "
            "each fired, DELETE /_sim/faults clears them; GET /_sim/ledger is what a real account "
            "would have been billed. /_sim/ answers its own host only (an address, localhost, "
            "--host or --public-url's), no other site's Origin, and JSON bodies only "
            "(Content-Type: application/json)."
        )


@click.command(cls=_SimulatorCommand)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8787, show_default=True)
@click.option(
    "--latency", type=float, default=None, help="Seconds each request runs (default: scaled model time)."
)
@click.option(
    "--concurrency-limit", type=int, default=2, show_default=True, help="Account limit on running requests."
)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="KIND=VALUE",
    help="Inject a fault (repeatable): KIND=P fires with probability P < 1, KIND=N on the next N "
    "events, e.g. submit_429=0.1 (kinds below).",
)
@click.option(
    "--public-url",
    default=None,
    help="Base URL written into the URLs it hands out (e.g. http://simulator:8787 in docker compose).",
)
@click.option(
    "--tls",
    is_flag=True,
    help="Serve HTTPS with a throw-away self-signed certificate (deleted when it stops) and print "
    "the settings that make fal's own client (fal-client, https only) and wanbatch trust it.",
)
def simulator(
    host: str,
    port: int,
    latency: float | None,
    concurrency_limit: int,
    faults: tuple[str, ...],
    public_url: str | None,
    tls: bool,
) -> None:
    """Run the bundled simulator of fal's queue API (for the offline demo and tests)."""

    def action() -> int:
        from falsim import SimulatorOptions, serve
        from falsim.faults import parse_fault_option
        from jobs.errors import UsageError

        _check_simulator_options(port, latency, concurrency_limit, public_url, tls)
        try:
            rules = dict(parse_fault_option(item) for item in faults)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        options = SimulatorOptions(
            concurrency_limit=concurrency_limit, latency_seconds=latency, public_url=public_url, faults=rules
        )
        startup.resume()
        try:
            # With --tls a SIGHUP (the terminal closed) stops it as SIGTERM does, and so deletes
            # the certificate's folder: uvicorn handles SIGINT and SIGTERM only.
            serve(host, port, options, tls=tls, server_class=stopping_on_hangup if tls else None)
        except OSError as exc:  # in use, not ours to bind, or an unknown host
            raise UsageError(f"the simulator cannot serve on {host}:{port}: {exc.strerror or exc}") from None
        return EXIT_OK

    guarded(False, action)


def _check_simulator_options(
    port: int, latency: float | None, concurrency_limit: int, public_url: str | None, tls: bool = False
) -> None:
    """One-line UsageErrors for values the simulator would otherwise take silently or crash on.

    It reads no settings, but its webhook deliveries beyond loopback honour the proxy variables:
    those httpx cannot use are refused as every command that talks to fal refuses them. A
    certificate variable it cannot use is only a warning: the simulator reads them for webhook
    deliveries to HTTPS receivers alone, and the shell it is restarted in often still holds the
    ``SSL_CERT_FILE`` of its previous ``--tls`` run, whose certificate was deleted when it stopped."""
    from cli.output import err, escape
    from jobs.errors import UsageError
    from jobs.http_environment import certificate_problems

    require_usable(certificates=False)
    for problem in certificate_problems():
        err.print(
            f"[yellow]warning: {escape(problem)}; the simulator starts all the same (it reads it "
            "only for webhook deliveries to HTTPS receivers, which may fail)[/yellow]"
        )
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535 (0: any free port), got {port}")
    if latency is not None and not (math.isfinite(latency) and latency >= 0):
        raise UsageError(f"--latency must be a number of seconds, 0 or more, got {latency}")
    if concurrency_limit < 1:
        raise UsageError(f"--concurrency-limit must be 1 or more, got {concurrency_limit}")
    if public_url is not None:
        from jobs.settings import check_http_url

        try:  # the clients follow the URLs it hands out: a host httpx refuses crashed them
            check_http_url(public_url, "http://simulator:8787")
        except ValueError as exc:
            raise UsageError(f"--public-url: {exc}") from None
        if tls and not public_url.lower().startswith("https://"):
            # Clients would be sent to http:// URLs on a server that answers only TLS.
            raise UsageError(f"--public-url must be an https:// URL with --tls, got {public_url}")
