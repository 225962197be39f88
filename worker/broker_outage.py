"""Riding out a broker (Redis, RabbitMQ) that is unreachable for a while, as a database outage.

The workers' leader hands jobs to the tasks through the broker; while it is down a hand-off
raises (kombu's ``OperationalError``, wrapping the client's connection error) and the round
fails. That is no bug: a job claimed but not handed on comes back when its lease runs out
(``WANBATCH_LEASE_SECONDS``; at once when a Redis that restarted empty is noticed, see
:meth:`worker.conductor.Conductor._after_broker_restart`). So it is said as
the limiter says its Redis is down (:class:`worker.limits.Outage`): one warning line without a
traceback, again at most every :data:`WARN_EVERY_SECONDS` while it lasts, and the loop goes on
after a pause.

A Redis that answers but refuses writes — out of memory (``maxmemory`` reached under the
``noeviction`` policy) or a read-only replica — is the same outage (:func:`broker_refusal`):
nothing can be handed on, acknowledged or restored until it takes writes again. Its words say
so ("refuses writes (out of memory)"), not that it cannot be reached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from jobs.printable import named_first_line
from jobs.url_secrets import masked_url
from worker.outage_log import OutageLog

log = logging.getLogger(__name__)

#: While the broker stays unreachable, the warning is repeated at most this often.
WARN_EVERY_SECONDS = 30.0


def _connection_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "the broker cannot be reached": kombu's, which wraps the clients',
    and the clients' own (a call that was not wrapped)."""
    import kombu.exceptions

    errors: list[type[BaseException]] = [kombu.exceptions.OperationalError]
    try:
        import redis.exceptions

        errors += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:  # pragma: no cover - redis is a dependency
        pass
    try:
        import amqp.exceptions  # type: ignore[import-untyped]

        errors += [amqp.exceptions.RecoverableConnectionError]
    except ImportError:  # pragma: no cover - py-amqp comes with kombu
        pass
    return tuple(errors)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it was raised from (``__cause__``, else ``__context__``), in order."""
    found: list[BaseException] = []
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        found.append(cause)
        cause = cause.__cause__ or cause.__context__
    return found


#: What Redis answers a write with when it is out of memory and evicts nothing
#: (``maxmemory-policy noeviction``), and when it is a read-only replica: matched in the text
#: too, for an error a library re-raised as another type with the words alone.
_OUT_OF_MEMORY_WORDS = "command not allowed when used memory > 'maxmemory'"
_READ_ONLY_WORDS = ("READONLY", "You can't write against a read only replica")


def _refusal_by_type(exc: BaseException) -> str | None:
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover - redis is a dependency
        return None
    out_of_memory = getattr(redis.exceptions, "OutOfMemoryError", ())  # not in every stub of redis
    if isinstance(exc, out_of_memory):
        return "out of memory"
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return "read-only replica"
    return None


def _refusal_by_words(exc: BaseException) -> str | None:
    text = str(exc)
    if _OUT_OF_MEMORY_WORDS in text:
        return "out of memory"
    if any(words in text for words in _READ_ONLY_WORDS):
        return "read-only replica"
    return None


def _refused_by(exc: BaseException) -> tuple[BaseException, str] | None:
    """The error of ``exc``'s chain that says Redis refused the write (its own type first, then
    the words of one that carries them), and the refusal; None when none does."""
    chain = _chain(exc)
    for told in (_refusal_by_type, _refusal_by_words):
        for cause in chain:
            refusal = told(cause)
            if refusal is not None:
                return cause, refusal
    return None


def broker_refusal(exc: BaseException) -> str | None:
    """``"out of memory"`` or ``"read-only replica"`` when ``exc`` or an error it was raised
    from is Redis refusing a write (``OutOfMemoryError``, ``ReadOnlyError``, or their words in
    an error that re-raised them: it answers, but takes no write); None for anything else."""
    found = _refused_by(exc)
    return found[1] if found is not None else None


def broker_problem(exc: BaseException) -> str | None:
    """What the broker's client said, on one line (``OperationalError: Error 111 connecting to
    127.0.0.1:6379. Connection refused.``), when ``exc`` or an error it was raised from is a
    broker connection error, or Redis refusing writes (:func:`broker_refusal`: its own error
    is named, ``OutOfMemoryError: command not allowed when used memory > 'maxmemory'.``); None
    for anything else."""
    refused = _refused_by(exc)
    if refused is not None:  # the refusal's own words, not those of what wrapped it
        return named_first_line(refused[0])
    errors = _connection_errors()
    for cause in _chain(exc):
        if isinstance(cause, errors):
            return named_first_line(cause)
    return None


def outage_words(refusal: str | None) -> str:
    """``cannot be reached``, or ``refuses writes (out of memory)``: what is wrong with the broker."""
    return f"refuses writes ({refusal})" if refusal else "cannot be reached"


class BrokerOutage:
    """Says, within bounds, that the broker at ``url`` (masked) cannot be reached: the first
    failure at once, then at most every ``every`` seconds while failures go on (not once per
    round); :meth:`answered` ends the outage (its length starts again at the next one)."""

    def __init__(
        self,
        url: str | None,
        *,
        every: float = WARN_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.where = masked_url(url) if url else "the broker"
        # A round that went through is no proof the broker answers (it may have handed nothing
        # on): the next failure is said once ``every`` has passed since the last warning.
        self._log = OutageLog(every, clock, new_outage_said_at_once=False)

    def failed(self, problem: str, refusal: str | None = None) -> None:
        """A round failed for the broker: ``problem`` is what its client said; ``refusal``
        (:func:`broker_refusal`) when it answered but refused the write."""
        said = self._log.failed()
        if said.due:
            log.warning(
                "the broker at %s %s%s (%s): the conductor pauses and goes on; a job it could not "
                "hand to the workers is taken up again when its lease runs out",
                self.where,
                outage_words(refusal),
                said.for_how_long,
                problem,
                extra={"event": "conductor.broker_unavailable", **({"refusal": refusal} if refusal else {})},
            )
        else:
            log.debug(
                "the broker still %s (%s)",
                "refuses writes" if refusal else "is unreachable",
                problem,
                extra={"event": "conductor.broker_down"},
            )

    def answered(self) -> None:
        """A round went through without a broker error: an outage under way is over."""
        self._log.answered()


#: The key a worker started afresh writes to learn that its Redis broker takes writes again
#: (:func:`write_problem`): wanbatch's own, gone after a second.
WRITE_CHECK_KEY = "wanbatch:broker-write-check"
#: While a worker started afresh waits for its broker to take writes, how often it tries.
WRITE_CHECK_EVERY_SECONDS = 2.0


def write_problem(url: str) -> tuple[str, str | None] | None:
    """One write to the Redis broker at ``url`` (:data:`WRITE_CHECK_KEY`, expiring after a
    second): None when it took it; else what its client said (one line) and the refusal
    (:func:`broker_refusal`; None: it did not answer at all)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        client.set(WRITE_CHECK_KEY, b"1", px=1000)
    except redis.RedisError as exc:
        return broker_problem(exc) or named_first_line(exc), broker_refusal(exc)
    finally:
        client.close()
    return None


@dataclass(frozen=True, slots=True)
class WriteRefused:
    """A Redis broker that answers but refused a write (:func:`write_refused`): said in the words
    a ``wanbatch worker``'s first start refuses with (:func:`check_writable`) and ``wanbatch
    doctor``'s broker check fails with, one sentence each, so both say the same."""

    #: The broker's URL, password masked.
    where: str
    #: What its client said, one line (``ReadOnlyError: You can't write against a read only replica.``).
    problem: str
    #: ``"read-only replica"`` or ``"out of memory"`` (:func:`broker_refusal`).
    refusal: str

    def cause(self) -> str:
        """``the broker at redis://… refuses writes (read-only replica) (ReadOnlyError: …)``."""
        return f"the broker at {self.where} {outage_words(self.refusal)} ({self.problem})"

    def fix(self) -> str:
        """What to do about it, lower case."""
        if self.refusal == "read-only replica":
            return "point WANBATCH_BROKER_URL at the primary"
        return "give the broker's Redis memory to spare (raise its maxmemory, or free what fills it)"


def write_refused(url: str | None) -> WriteRefused | None:
    """:func:`write_problem` of the Redis broker at ``url`` when it answers but refuses the write
    (a read-only replica, or out of memory: ``maxmemory`` reached under ``noeviction``); None when
    it takes it, does not answer at all, or is no Redis broker."""
    if not url or not url.startswith(("redis://", "rediss://")):
        return None
    found = write_problem(url)
    if found is None or found[1] is None:
        return None
    from jobs.printable import one_line

    return WriteRefused(masked_url(url), one_line(found[0]), found[1])  # a server's words: escaped


def check_writable(url: str | None) -> None:
    """Raise :class:`jobs.errors.ConfigError` (exit 2, one line, with the fix) when the Redis
    broker at ``url`` answers but refuses a write (:func:`write_refused`). For a ``wanbatch
    worker``'s first start, as :func:`worker.limits.check_limiter` for its limiter: a broker that
    refuses writes then is a configuration to fix, where for a worker started afresh it is an
    outage under way (:func:`wait_until_writable`). Without this, a worker pointed at a replica
    waited for ever as if for an outage. A broker that does not answer at all passes: Celery
    waits for it at start (``broker_connection_retry_on_startup``), as before. Nothing for any
    other broker. ``wanbatch doctor`` fails its broker check with the same words."""
    refused = write_refused(url)
    if refused is None:
        return
    from jobs.errors import ConfigError

    fix = refused.fix()
    if refused.refusal != "read-only replica":
        fix += ", then start the worker again"
    raise ConfigError(f"{refused.cause()}. {fix[0].upper()}{fix[1:]}; nothing was sent")


def wait_until_writable(
    url: str | None,
    *,
    pause: float = WRITE_CHECK_EVERY_SECONDS,
    every: float = WARN_EVERY_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once the Redis broker at ``url`` takes a write (at once when it does, or when it
    is no Redis broker): for a ``wanbatch worker`` started afresh after Celery stopped it on its
    own, whose Celery would otherwise stop again at once (its start writes to the broker), and
    be started afresh again, a traceback each time. Meanwhile one warning line, again at most
    every ``every`` seconds, and one when it takes writes again. Ends only with the process
    (SIGTERM stops it as before Celery started)."""
    if not url or not url.startswith(("redis://", "rediss://")):
        return
    found = write_problem(url)
    if found is None:
        return
    where = masked_url(url)
    outage = OutageLog(every, clock)
    while found is not None:
        problem, refusal = found
        said = outage.failed()
        if said.due:
            log.warning(
                "the broker at %s %s%s (%s): this worker, started afresh, waits for it to take "
                "writes before it starts (jobs wait, none fails)",
                where,
                outage_words(refusal),
                said.for_how_long,
                problem,
                extra={"event": "worker.broker_wait", **({"refusal": refusal} if refusal else {})},
            )
        sleep(pause)
        found = write_problem(url)
    lasted = outage.answered()
    log.warning(
        "the broker at %s takes writes again after %.0fs: the worker starts",
        where,
        lasted or 0.0,
        extra={"event": "worker.broker_back"},
    )
