"""Riding out a broker (Redis, RabbitMQ) that is unreachable for a while, as a database outage.

The workers' leader hands jobs to the tasks through the broker; while it is down a hand-off
raises (kombu's ``OperationalError``, wrapping the client's connection error) and the round
fails. That is no bug: a job claimed but not handed on comes back when its lease runs out
(``WANBATCH_LEASE_SECONDS``; at once when a Redis that restarted empty is noticed, see
:meth:`worker.conductor.Conductor._after_broker_restart`). So it is said as
the limiter says its Redis is down (:class:`worker.limits.Outage`): one warning line without a
traceback, again at most every :data:`WARN_EVERY_SECONDS` while it lasts, and the loop goes on
after a pause.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

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


def broker_problem(exc: BaseException) -> str | None:
    """What the broker's client said, on one line (``OperationalError: Error 111 connecting to
    127.0.0.1:6379. Connection refused.``), when ``exc`` or an error it was raised from is a
    broker connection error; None for anything else."""
    errors = _connection_errors()
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, errors):
            lines = str(cause).strip().splitlines()
            said = lines[0].strip() if lines else ""
            name = type(cause).__name__
            return f"{name}: {said}" if said else name
        cause = cause.__cause__ or cause.__context__
    return None


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

    def failed(self, problem: str) -> None:
        said = self._log.failed()
        if said.due:
            log.warning(
                "the broker at %s cannot be reached%s (%s): the conductor pauses and goes on; a job "
                "it could not hand to the workers is taken up again when its lease runs out",
                self.where,
                said.for_how_long,
                problem,
                extra={"event": "conductor.broker_unavailable"},
            )
        else:
            log.debug(
                "the broker is still unreachable (%s)", problem, extra={"event": "conductor.broker_down"}
            )

    def answered(self) -> None:
        """A round went through without a broker error: an outage under way is over."""
        self._log.answered()
