"""The Celery app: transport only. The database is the system of record.

Messages carry a job id and nothing else, so a message that is lost, delayed or delivered
twice does no harm: every task re-reads its job and moves it with a fenced compare-and-set,
and the periodic tick (``worker.ticker``) finds any due work a lost message left behind.

The app is built by a function, never at import: :func:`get_app` makes one per broker URL (the
settings' ``WANBATCH_BROKER_URL``, or kombu's in-memory transport for the embedded mode) and
registers the tasks on it. So a command runs on the broker of the settings it was given — a
module-level app took the URL of whatever environment first imported it, for the whole process.

Settings, and why (Celery's configuration reference:
https://docs.celeryq.dev/en/stable/userguide/configuration.html):

* ``task_serializer``/``accept_content`` = JSON only: pickle would let anyone who can write to
  the broker run code in the worker
  (https://docs.celeryq.dev/en/stable/userguide/security.html#serializers).
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a task's message is acknowledged after
  it ran, so a worker killed mid-task (kill -9, OOM) leaves the message to be redelivered
  rather than lost. Redelivery is safe because steps are idempotent under the job's version.
* ``worker_prefetch_multiplier = 1``: a worker reserves one message per process, so a slow
  download does not hold other jobs' messages hostage
  (https://docs.celeryq.dev/en/stable/userguide/optimizing.html#prefetch-limits).
* ``visibility_timeout`` (Redis): how long an unacknowledged message stays invisible before
  Redis hands it to another worker. It must exceed the longest task (a large download at the
  read timeout) or tasks would run twice concurrently; 2 h is far above any step here, and a
  redelivery in between is harmless anyway
  (https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html#visibility-timeout).
* ``task_ignore_result``: results live in the database; no result backend is needed.
* ``broker_connection_retry_on_startup`` and unlimited ``broker_connection_max_retries``:
  a worker outlives a broker restart instead of exiting.
* ``worker_send_task_events`` + ``task_send_sent_event`` with a broker (distributed mode):
  workers publish task events (received, started, succeeded, failed, retried) and senders a
  ``task-sent`` event, so Flower (``celery --broker=$WANBATCH_BROKER_URL flower``) and
  ``celery events`` show the tasks live. A few small messages per task, on the broker only;
  the embedded mode has no broker to publish on, so there they stay off
  (https://docs.celeryq.dev/en/stable/userguide/monitoring.html#events).
  A worker publishes its task events in bunches, every half second, not one message per event,
  and a sender its ``task-sent`` events likewise (:mod:`worker.task_events`).
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from celery import Celery

from jobs.settings import REDIS_SCHEMES, BrokerSettings
from worker.task_events import BatchedTaskEvents, WorkerEvents

VISIBILITY_TIMEOUT_SECONDS = 2 * 60 * 60
QUEUE = "wanbatch"
#: How long one call to a Redis broker (a publish, a reconnection's handshake) may wait for its
#: answer, and a connection attempt for the server to accept. A Redis that is up but does not
#: answer (stopped, a hung host, a network partition that drops packets) otherwise held the
#: caller for good: kombu's default is no timeout at all.
BROKER_SOCKET_TIMEOUT_SECONDS = 5.0
BROKER_CONNECT_TIMEOUT_SECONDS = 5.0
#: How often a task message is published again after the broker failed it (Celery's
#: ``task_publish_retry_policy``; its default tries 3 times more). Each try waits up to
#: :data:`BROKER_SOCKET_TIMEOUT_SECONDS` to publish and as long to reconnect, so the leader's hand-off
#: to a broker that does not answer fails within about 20 s and is an outage
#: (:mod:`worker.broker_outage`) instead of a round held for a minute.
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def broker_transport_options(broker_url: str | None) -> dict[str, Any]:
    """kombu's transport options for ``broker_url`` (None: the in-memory transport)."""
    options: dict[str, Any] = {
        "visibility_timeout": VISIBILITY_TIMEOUT_SECONDS,
        "polling_interval": 0.05 if broker_url is None else 1.0,
    }
    if broker_url is not None and broker_url.startswith(REDIS_SCHEMES):
        # kombu's Redis channel passes these to redis-py: every broker call is bounded, and TCP
        # keepalives find a peer that vanished while the connection was idle.
        options.update(
            socket_timeout=BROKER_SOCKET_TIMEOUT_SECONDS,
            socket_connect_timeout=BROKER_CONNECT_TIMEOUT_SECONDS,
            socket_keepalive=True,
        )
    return options


def make_app(broker_url: str | None) -> Celery:
    """A configured app without tasks (enough to ping workers). Without a broker URL it uses
    kombu's in-memory transport (embedded)."""
    app = Celery(
        "wanbatch",
        broker=broker_url or "memory://localhost/",
        events=f"{WorkerEvents.__module__}:{WorkerEvents.__qualname__}",
        set_as_current=False,
    )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options=broker_transport_options(broker_url),
        broker_connection_timeout=BROKER_CONNECT_TIMEOUT_SECONDS,
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        worker_hijack_root_logger=False,
        worker_send_task_events=broker_url is not None,
        task_send_sent_event=broker_url is not None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    if broker_url is not None:
        app.steps["consumer"].add(BatchedTaskEvents)
    return app


@cache
def _app_for(broker_url: str | None) -> Celery:
    # Here, not at the top: the tasks bring the steps (the fal client, PyAV), which a process
    # that only pings workers or sends them messages (``run``'s watcher, ``status``) never needs.
    from worker.tasks import register_tasks

    app = make_app(broker_url)
    register_tasks(app)
    return app


def get_app(settings: BrokerSettings) -> Celery:
    """The app of ``settings``' broker with the tasks registered: one per broker URL and process."""
    return _app_for(settings.broker_url)


def run_worker(
    app: Celery,
    *,
    pool: str,
    concurrency: int | None,
    loglevel: str,
    quiet: bool,
    hostname: str | None = None,
) -> int:
    """Run a Celery worker consuming :data:`QUEUE` until it stops; its exit code.

    ``hostname`` is its node name (``celery worker --hostname``, expanded already:
    :func:`cli.service_commands.node_name`); None: Celery's default, ``celery@HOST``.

    What ``celery worker -Q wanbatch --without-gossip --without-mingle`` does
    (``celery.bin.worker.worker``: drop privileges if asked, ``app.Worker(...).start()``), without
    going through Celery's command line: importing ``celery.bin.celery`` brings every Celery
    subcommand with it, ``click_repl`` and ``prompt_toolkit`` among them (the ``amqp`` shell),
    which was about a tenth of a worker's start-up CPU (measured: 190 ms against 18 ms on a
    2-core AMD EPYC). Gossip and mingle are off: workers share nothing but the database and the
    queue, and mingle's start-up round trip only syncs revoked-task lists, which wanbatch does
    not use (cancellation goes through the database).
    """
    from celery import concurrency as pools
    from celery.platforms import maybe_drop_privileges
    from celery.utils.log import mlevel

    pool_cls = _cold_shutdown_safe(pools.get_implementation(pool))  # "threads", "prefork", ...
    maybe_drop_privileges(uid=None, gid=None)  # Celery's check: a root worker is warned about
    options: dict[str, Any] = {}
    if concurrency:
        options["concurrency"] = concurrency
    if hostname:
        options["hostname"] = hostname
    from worker.logs import celery_task_lines_from_debug
    from worker.peers import name_this_node

    celery_task_lines_from_debug(mlevel(loglevel))  # before Celery's worker asks its loggers
    name_this_node(hostname)  # its record on the limiter's Redis names it (``doctor`` reads it)
    worker = _stopping_on_hangup(app.Worker)(
        pool_cls=pool_cls,
        consumer_cls=_cancelling_says_so(app.conf.worker_consumer),
        loglevel=mlevel(loglevel),  # a number, as Celery's ``-l`` option makes it
        queues=[QUEUE],
        without_gossip=True,
        without_mingle=True,
        quiet=quiet,
        **options,
    )
    worker.start()
    return int(worker.exitcode or 0)


def _cold_shutdown_safe(pool_cls: Any) -> Any:
    """Celery's threads pool (``pool_cls``, else it is returned as it is), without the traceback
    of its cold shutdown.

    A second Ctrl-C (Celery's cold shutdown) cancels the running tasks by killing them, which a
    thread cannot be: ``celery.concurrency.thread.TaskPool.terminate_job`` raises
    ``NotImplementedError``, and Celery logged it, with its traceback, as "Error on stopping
    Pool", then went on without waiting for the pool at all. Here, while the cold shutdown
    cancels them (:func:`_cancelling_says_so` sets ``cancelling``), the kill is no kill, said in
    one warning line: the task finishes (its message was given back to the broker, and the
    job's version makes a repeat harmless) and the worker ends after it, as on a warm shutdown
    — or, when the database does not answer, within seconds all the same
    (:func:`worker.running.worker_stop_watch`).

    Any other kill is Celery's: ``celery control revoke --terminate`` of a running task is
    refused (its reply is the ``NotImplementedError``; the task goes on, still listed by
    ``inspect active``), never answered "ok" while the task runs on. The subclass keeps the
    module and name of Celery's class: the banner says ``concurrency: N (thread)`` and
    ``inspect stats`` ``celery.concurrency.thread:TaskPool``, as for Celery's own pool.
    """
    from celery.concurrency.thread import TaskPool

    if not (isinstance(pool_cls, type) and issubclass(pool_cls, TaskPool)):
        return pool_cls

    class Pool(pool_cls):  # type: ignore[misc]
        _said = False
        #: Set while Celery's cold shutdown cancels the running tasks, and only then.
        cancelling = False

        def terminate_job(self, pid: Any, signal: Any = None) -> None:
            if not self.cancelling:
                super().terminate_job(pid, signal)  # Celery's NotImplementedError: nothing killed
                return
            if not Pool._said:
                Pool._said = True
                logging.getLogger(__name__).warning(
                    "cold shutdown: a task running on a thread cannot be cut short; the worker "
                    "ends once it has finished (its message goes back to the broker)",
                    extra={"event": "worker.cold_shutdown_waits"},
                )

    # Celery names the pool after its class's module (the banner) and module:name (stats).
    Pool.__module__ = pool_cls.__module__
    Pool.__name__ = pool_cls.__name__
    Pool.__qualname__ = pool_cls.__qualname__
    return Pool


def _cancelling_says_so(consumer_cls: Any) -> Any:
    """A subclass of Celery's ``consumer_cls`` (a class or its dotted name) whose
    ``cancel_active_requests`` — called by Celery's cold shutdown only
    (``celery.apps.worker.on_cold_shutdown`` and ``during_soft_shutdown``) — sets the pool's
    ``cancelling`` (:func:`_cold_shutdown_safe`) while it runs."""
    from celery.utils.imports import symbol_by_name

    base = symbol_by_name(consumer_cls)

    class Consumer(base):  # type: ignore[misc,valid-type]
        def cancel_active_requests(self) -> None:
            pool = self.pool
            if not hasattr(pool, "cancelling"):
                super().cancel_active_requests()
                return
            pool.cancelling = True
            try:
                super().cancel_active_requests()
            finally:
                pool.cancelling = False

    Consumer.__module__ = base.__module__
    Consumer.__name__ = base.__name__
    Consumer.__qualname__ = base.__qualname__
    return Consumer


def _stopping_on_hangup(worker_class: Any) -> Any:
    """A subclass of Celery's ``worker_class`` (``app.Worker``) that stops on SIGHUP as on SIGTERM.

    Celery's own SIGHUP: a worker whose stdout is no terminal (a container, systemd, ``nohup``,
    a log file) restarts, ``execv`` of ``sys.executable`` with ``sys.argv`` after a warm
    shutdown — a surprise in a container, and nothing that reloads anything wanbatch reads (the
    settings of the process's environment are the same); ``nohup``'s ignoring of SIGHUP was
    overridden. One whose stdout is a terminal gets no handler: closing the terminal killed it
    outright, its tasks redelivered and its jobs' leases lapsing as after a crash
    (https://docs.celeryq.dev/en/stable/userguide/workers.html#restarting-the-worker). Now SIGHUP
    is Celery's warm shutdown, as SIGTERM (tasks in progress finish, the worker ends, exit 0),
    unless it was ignored when the worker started (``nohup``): then it stays ignored. Prefork
    children ignore it (:func:`_children_ignore_hangup`): closing a terminal signals the whole
    process group, and the parent stops them itself.
    """
    import signal

    from celery.apps.worker import install_worker_term_handler
    from celery.platforms import signals
    from celery.signals import worker_process_init

    worker_process_init.connect(_children_ignore_hangup, weak=False)  # once: the same receiver
    _children_ignore_hangup_from_the_start()

    hangup = getattr(signal, "SIGHUP", None)  # not on Windows
    ignored = hangup is not None and signal.getsignal(hangup) is signal.SIG_IGN

    class Worker(worker_class):  # type: ignore[misc]
        def install_platform_tweaks(self, worker: Any) -> None:
            super().install_platform_tweaks(worker)  # Celery's restart on SIGHUP among them
            if hangup is None:
                return
            if ignored:
                signals.ignore("SIGHUP")
            else:
                install_worker_term_handler(worker, sig="SIGHUP")

    return Worker


def _children_ignore_hangup_from_the_start() -> None:
    """Have Celery's prefork child initializer ignore SIGHUP where it resets it to the default.

    ``celery.concurrency.prefork.process_initializer`` resets the signals of its module-level
    ``WORKER_SIGRESET`` (SIGHUP among them) first thing, then loads the app and sets up logging,
    and only then sends ``worker_process_init`` (:func:`_children_ignore_hangup`). A hangup in
    between — a child still starting on a loaded machine — killed it (``exited with 'signal 1
    (SIGHUP)'``). The initializer reads both sets when it runs, so moving SIGHUP from the one
    to ``WORKER_SIGIGNORE`` closes that window; the receiver stays for any pool that starts its
    children otherwise.
    """
    try:
        from celery.concurrency import prefork
    except ImportError:  # pragma: no cover - a Celery without the prefork pool
        return
    resets, ignores = getattr(prefork, "WORKER_SIGRESET", None), getattr(prefork, "WORKER_SIGIGNORE", None)
    if isinstance(resets, set) and isinstance(ignores, set):
        resets.discard("SIGHUP")
        ignores.add("SIGHUP")


def _children_ignore_hangup(**_: object) -> None:
    """In a prefork child: ignore SIGHUP. Celery resets it to the default there
    (``celery.concurrency.prefork.process_initializer``), so a closed terminal, which signals the
    whole process group, killed every child mid-task while the parent was still stopping warmly."""
    import signal

    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
