"""This process's own counters and histograms, for Prometheus: what it sent to fal and how that went.

The database says what became of every job, whichever process did the work (``/metrics`` of
``wanbatch serve``, :mod:`jobs.metrics`). What only the process that did the work can count
lives here: each submit POST and how it ended, each provider error by type, each retry
scheduled, each ambiguous submit, each wait for the submit-rate limiter, the latency of every
call to fal's API, and (in ``wanbatch serve``) each webhook delivery accepted or rejected and
each connection it closed before a request (too slow a head, too many from one peer).
``wanbatch worker`` and an embedded ``wanbatch run`` serve them on ``WANBATCH_METRICS_PORT``
(:func:`serve_configured`); ``wanbatch serve`` adds them to its ``/metrics``.

Counting is a function call at the place where the thing happens (``count_submit``,
``count_provider_error``, …), cheap and never failing. The metrics themselves are built on the
first count, not at import: ``wanbatch worker`` runs Celery's prefork pool, whose child
processes do the submits, and a child's in-memory counter is invisible to the parent that
serves the port. :func:`use_multiprocess` (called before anything counts) switches
prometheus_client to its multiprocess mode instead: every process writes its values to files
in one folder, and the parent serves their sum
(https://prometheus.github.io/client_python/multiprocess/).

Label values are bounded: operations and outcomes are fixed names from the code, endpoints are
the registry's, and a provider's ``error_type`` is cut to :data:`MAX_LABEL_LENGTH` characters
of a safe alphabet, with at most :data:`MAX_ERROR_TYPES` distinct ones (then ``other``) — a
provider inventing error types must not create unbounded series. No label or value ever holds
the key, a URL or a request's input.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from jobs.errors import ConfigError, ProviderError
from jobs.settings import ServeSettings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.metrics_core import Metric

#: Where ``wanbatch worker`` and ``run`` serve their metrics unless told otherwise: loopback,
#: because the port has no authentication. Exposing it is a deliberate choice
#: (``WANBATCH_METRICS_HOST=0.0.0.0``, e.g. in a container only Prometheus reaches).
DEFAULT_METRICS_HOST = "127.0.0.1"

#: Latency buckets (seconds) of fal API calls: milliseconds against the simulator, up to the
#: read timeout's minute against a slow gateway.
REQUEST_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Buckets (seconds) of the time a submit slept waiting for a rate token (bounded by
#: ``WANBATCH_SUBMIT_WAIT_MAX``, 2 s by default).
WAIT_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)

#: Longest provider error type kept as a label value, and how many distinct ones are kept.
MAX_LABEL_LENGTH = 48
MAX_ERROR_TYPES = 40
_SAFE_LABEL = re.compile(r"[^0-9A-Za-z_.:-]+")
_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class _Metrics:
    registry: CollectorRegistry
    submits: Counter
    provider_errors: Counter
    retries: Counter
    ambiguous: Counter
    limiter_waits: Counter
    limiter_wait_seconds: Histogram
    fal_requests: Histogram
    webhooks: Counter
    connections_closed: Counter


_lock = threading.Lock()
_built: _Metrics | None = None
#: How many :func:`count_nothing` callers have not restored counting yet (changed under
#: ``_lock``): nothing is counted while it is above zero.
_silenced = 0
_multiprocess_dir: str | None = None
_error_types: set[str] = set()


def _metrics() -> _Metrics:
    """The metrics, built on first use (after :func:`use_multiprocess`, when it is called)."""
    global _built
    built = _built
    if built is not None:
        return built
    with _lock:
        if _built is None:
            _built = _build()
        return _built


def _build() -> _Metrics:
    from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

    # No ``*_created`` series beside every counter and histogram: Prometheus' text format shows
    # them as gauges of their own, doubling what a scrape returns for a start time nobody reads.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry(auto_describe=True)
    return _Metrics(
        registry=registry,
        submits=Counter(
            "wanbatch_worker_submits",
            "Submit POSTs this process sent to fal, by endpoint and outcome (accepted, ambiguous, "
            "retryable, refused).",
            ["endpoint", "outcome"],
            registry=registry,
        ),
        provider_errors=Counter(
            "wanbatch_worker_provider_errors",
            "Provider errors this process handled (submit, status, result, download), by type.",
            ["type"],
            registry=registry,
        ),
        retries=Counter(
            "wanbatch_worker_retries",
            "Jobs this process sent back to retry_wait for a new attempt, by cause (provider_error, "
            "ambiguous_resubmit, upload_gone).",
            ["cause"],
            registry=registry,
        ),
        ambiguous=Counter(
            "wanbatch_worker_ambiguous_submits",
            "Submits this process saw end with their outcome unknown (the job went to submit_unknown).",
            registry=registry,
        ),
        limiter_waits=Counter(
            "wanbatch_limiter_waits",
            "Times the submit-rate limiter made a submit wait, by outcome (slept: the token came "
            "within WANBATCH_SUBMIT_WAIT_MAX; held_back: the job went back to pending; "
            "unavailable: the limiter could not be reached; stale: the grant aged while the "
            "lease was recorded and a fresh token was taken).",
            ["outcome"],
            registry=registry,
        ),
        limiter_wait_seconds=Histogram(
            "wanbatch_limiter_wait_seconds",
            "Seconds a submit slept waiting for a submit-rate token.",
            buckets=WAIT_BUCKETS,
            registry=registry,
        ),
        fal_requests=Histogram(
            "wanbatch_fal_request_duration_seconds",
            "Latency of this process's calls to fal's API, by operation (submit, status, result, "
            "cancel, upload_initiate, upload) and status (2xx, 4xx, 5xx, error: no answer).",
            ["operation", "status"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        ),
        webhooks=Counter(
            "wanbatch_webhook_deliveries",
            "Webhook deliveries this process's receiver answered, by result (accepted, rejected).",
            ["result"],
            registry=registry,
        ),
        connections_closed=Counter(
            "wanbatch_serve_connections_closed",
            "Connections this process's serve closed before a request, by reason (head_timeout: "
            "no whole request head in time; peer_limit: its peer had its share open already).",
            ["reason"],
            registry=registry,
        ),
    )


# --------------------------------------------------------------------------- counting


def count_submit(endpoint: str, outcome: str) -> None:
    """One submit POST sent to fal that ended ``outcome`` (``accepted``, ``ambiguous``,
    ``rate_limited`` (429), ``retryable``, ``refused``)."""
    if _silenced:
        return
    _metrics().submits.labels(endpoint=endpoint, outcome=outcome).inc()


def error_kind(exc: ProviderError) -> str:
    """The ``type`` label of a provider error: fal's ``error_type`` when it gave one, else the
    HTTP status class (``http_429``, ``http_5xx``), else the error's class name."""
    if exc.error_type:
        kind = _SAFE_LABEL.sub("_", exc.error_type)[:MAX_LABEL_LENGTH] or "unknown"
        with _lock:
            if kind not in _error_types:
                if len(_error_types) >= MAX_ERROR_TYPES:
                    return "other"
                _error_types.add(kind)
        return kind
    code = exc.status_code
    if code is not None:
        return f"http_{code}" if code in (408, 409, 422, 429) else f"http_{code // 100}xx"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def count_provider_error(exc: ProviderError) -> None:
    """One provider error this process handled (it decided a retry or a failure from it)."""
    if _silenced:
        return
    _metrics().provider_errors.labels(type=error_kind(exc)).inc()


def count_retry(cause: str) -> None:
    """One job sent back to ``retry_wait`` for a new attempt (``provider_error``,
    ``ambiguous_resubmit``, ``upload_gone``)."""
    if _silenced:
        return
    _metrics().retries.labels(cause=cause).inc()


def count_ambiguous_submit() -> None:
    """One submit whose outcome is unknown (the job moved to ``submit_unknown``)."""
    if _silenced:
        return
    _metrics().ambiguous.inc()


def count_limiter_wait(outcome: str, seconds: float = 0.0) -> None:
    """The limiter made a submit wait: ``slept`` (``seconds``), ``held_back``, ``unavailable``, ``stale``."""
    if _silenced:
        return
    metrics = _metrics()
    metrics.limiter_waits.labels(outcome=outcome).inc()
    if outcome == "slept":
        metrics.limiter_wait_seconds.observe(seconds)


def count_webhook(*, accepted: bool) -> None:
    """One webhook delivery answered by this process's receiver."""
    if _silenced:
        return
    _metrics().webhooks.labels(result="accepted" if accepted else "rejected").inc()


def count_connection_closed(reason: str) -> None:
    """One connection ``serve`` closed before a request: ``head_timeout`` or ``peer_limit``."""
    if _silenced:
        return
    _metrics().connections_closed.labels(reason=reason).inc()


class FalCall:
    """One timed call to fal's API (see :func:`fal_request`)."""

    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status = "error"

    def done(self, response: _R) -> _R:
        """Note the answer's status (``response.status_code``) and hand the response back."""
        code = getattr(response, "status_code", None)
        self.status = f"{code // 100}xx" if isinstance(code, int) else "error"
        return response


@contextmanager
def fal_request(operation: str) -> Iterator[FalCall]:
    """Time one HTTP call to fal: ``with fal_request("status") as call: r = call.done(send())``.

    The status label is the answer's class, or ``error`` when none came (a timeout, a reset).
    """
    call = FalCall()
    if _silenced:
        yield call
        return
    started = time.perf_counter()
    try:
        yield call
    finally:
        elapsed = time.perf_counter() - started
        name = operation.replace(" ", "_")
        _metrics().fal_requests.labels(operation=name, status=call.status).observe(elapsed)


def count_nothing() -> Callable[[], None]:
    """Stop counting in this process; returns the function that turns counting back on.

    For an embedded ``wanbatch run`` without ``WANBATCH_METRICS_PORT``: its counts could never
    be read by anyone (they live in its memory and die with it), so counting them only cost
    CPU on every fal call, and importing prometheus_client about 75 ms of start-up.
    """
    global _silenced
    with _lock:
        _silenced += 1
    restored = False

    def restore() -> None:
        # Counted, not a saved flag: of two runs in one process, the first to end must not
        # turn counting on under the second, nor the second leave it off for good.
        global _silenced
        nonlocal restored
        with _lock:
            if restored:
                return
            restored = True
            _silenced -= 1

    return restore


# --------------------------------------------------------------------------- exposing


def registry() -> CollectorRegistry:
    """This process's registry (for ``wanbatch serve``'s ``/metrics`` and for tests)."""
    return _metrics().registry


class ProcessMetrics:
    """A collector that yields this process's metrics, to add to another registry."""

    def collect(self) -> Iterable[Metric]:
        return registry().collect()


def use_multiprocess(directory: str) -> None:
    """Count in files under ``directory`` from now on, in this process and every process forked
    from it (Celery's prefork children): call before anything counts, and serve with
    :func:`serve_metrics` from the parent.

    prometheus_client picks its value store when it is imported, from
    ``PROMETHEUS_MULTIPROC_DIR``; setting the variable and the store here works whether or not
    it was imported already, as long as no metric exists yet.
    """
    global _multiprocess_dir
    with _lock:
        if _built is not None:
            raise RuntimeError("use_multiprocess() must come before the first count")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        from prometheus_client import values

        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        _multiprocess_dir = directory


def serve_configured(settings: ServeSettings, *, child_processes: bool = False) -> Callable[[], None] | None:
    """Serve on ``WANBATCH_METRICS_PORT`` (and ``WANBATCH_METRICS_HOST``, default loopback) when
    it is set; returns the function that stops it (None: nothing configured).

    ``child_processes``: the work happens in processes forked from this one from now on
    (Celery's prefork pool), so they count in files (:func:`use_multiprocess`) — in a folder of
    ``PROMETHEUS_MULTIPROC_DIR`` when the environment names one, else a fresh temporary one that
    stopping removes.
    """
    if settings.metrics_port is None:
        return None
    # WANBATCH_METRICS_HOST: loopback by default (see DEFAULT_METRICS_HOST).
    host = settings.metrics_host or DEFAULT_METRICS_HOST
    own_dir: str | None = None
    if child_processes:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            directory = own_dir = tempfile.mkdtemp(prefix="wanbatch-metrics-")
        use_multiprocess(directory)
    try:
        stop = serve_metrics(settings.metrics_port, host)
    except ConfigError:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
        raise

    def stop_and_clean() -> None:
        stop()
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)

    return stop_and_clean


def serve_metrics(port: int, host: str = DEFAULT_METRICS_HOST) -> Callable[[], None]:
    """Serve this process's metrics (all processes', in multiprocess mode) over HTTP on
    ``host:port``, with the process's CPU and memory; returns the function that stops it.

    A port that cannot be bound is a :class:`ConfigError` naming ``WANBATCH_METRICS_PORT``.
    """
    from prometheus_client import (
        GC_COLLECTOR,
        PLATFORM_COLLECTOR,
        PROCESS_COLLECTOR,
        CollectorRegistry,
        start_http_server,
    )

    served = CollectorRegistry()
    if _multiprocess_dir is not None:
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(served, path=_multiprocess_dir)  # type: ignore[no-untyped-call]
    else:
        served.register(ProcessMetrics())
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        served.register(collector)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server, thread = start_http_server(port, addr=host, registry=served)
    except (socket.gaierror, UnicodeError) as exc:  # the host's name, not the port
        why = exc.strerror if isinstance(exc, socket.gaierror) else None
        raise ConfigError(
            f"WANBATCH_METRICS_HOST={host}: cannot serve metrics on {where}: the host name does not "
            f"resolve to an address here ({why or 'the resolver refuses the name'}); give an address "
            "such as 127.0.0.1 or 0.0.0.0, or unset it"
        ) from None
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:  # no interface of this host has that address
            raise ConfigError(
                f"WANBATCH_METRICS_HOST={host}: cannot serve metrics on {where} ({exc.strerror or exc}): "
                "no interface here has that address; give one it has, such as 127.0.0.1 or 0.0.0.0, "
                "or unset it"
            ) from None
        raise ConfigError(
            f"WANBATCH_METRICS_PORT={port}: cannot serve metrics on {where} "
            f"({exc.strerror or exc}); choose another port or unset it"
        ) from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
