"""Riding out a database that is briefly unavailable: a connection the server killed, a restart,
a failover.

Nothing of a job is lost when the database stops answering for a while: every step is a
compare-and-set, a transaction that failed left nothing behind, and what only this process knows
(an accepted request id) is retried by the submit step itself. So the loops that drive a batch —
the conductor of an embedded ``run`` or of the workers' leader, and a ``run`` watching the
workers — pause and go on rather than end. :class:`DatabaseOutage` is that pause: one warning
when the outage begins (no traceback: it is no bug), pauses that grow from
:data:`FIRST_PAUSE_SECONDS` to :data:`MAX_PAUSE_SECONDS`, one line when the database answers
again (at INFO), and, for a command with someone waiting on it, an end after ``patience`` seconds
(:class:`DatabaseUnavailableError`, exit 2) instead of waiting forever.
"""

from __future__ import annotations

import logging
import threading
import time

from jobs.db import database_problem, safe_url
from jobs.errors import ConfigError

log = logging.getLogger(__name__)

#: The first pause after the database failed a round; a killed connection is replaced at once,
#: so the round that follows it usually succeeds.
FIRST_PAUSE_SECONDS = 0.1
#: The longest pause between two tries while the database stays unavailable: it is noticed
#: within this long of coming back.
MAX_PAUSE_SECONDS = 2.0


class DatabaseUnavailableError(ConfigError):
    """The database stopped answering while a command worked, and did not answer again in time.

    Exit 2 and one line, as a database that cannot be reached at start-up: it is the
    environment's problem, not a bug (never "internal error")."""


class DatabaseOutage:
    """Pauses a loop whose round the database could not serve, and says so once per outage.

    ``what`` names the loop in the warning ("the run", "the conductor"); ``patience`` is how long
    an outage may last before :meth:`failed` raises :class:`DatabaseUnavailableError` (None:
    forever, for a long-lived worker that must outlast any outage); ``url`` is the database's,
    named (password masked) in that error.
    """

    def __init__(self, what: str, *, patience: float | None, url: str) -> None:
        self.what = what
        self.patience = patience
        self.url = url
        self._since: float | None = None  # monotonic; None: the database answers
        self._pause = FIRST_PAUSE_SECONDS

    def failed(self, exc: BaseException, stopping: threading.Event) -> None:
        """A round failed with ``exc``, an error of :func:`jobs.db.is_unavailable`: warn when
        this begins an outage, then pause (cut short when ``stopping`` is set). Raises
        :class:`DatabaseUnavailableError` once the outage has lasted ``patience``."""
        now = time.monotonic()
        problem = database_problem(exc)
        if self._since is None:
            self._since, self._pause = now, FIRST_PAUSE_SECONDS
            log.warning(
                "the database is unavailable (%s): %s pauses and goes on when it answers%s",
                problem,
                self.what,
                (
                    f" (it stops if the database stays unavailable for {self.patience:.0f}s, "
                    "WANBATCH_LEASE_SECONDS)"
                    if self.patience is not None
                    else ""
                ),
                extra={"event": "database.unavailable"},
            )
        else:
            log.debug("the database is still unavailable (%s)", problem, extra={"event": "database.down"})
        waited = now - self._since
        if self.patience is not None and waited >= self.patience:
            raise DatabaseUnavailableError(
                f"the database stopped answering: WANBATCH_DATABASE_URL {safe_url(self.url)} has not "
                f"answered for {waited:.0f}s (WANBATCH_LEASE_SECONDS is {self.patience:.0f}s): {problem}"
            ) from None
        pause = self._pause
        if self.patience is not None:  # never sleep past the patience: end on time
            pause = min(pause, max(0.0, self.patience - waited))
        stopping.wait(pause)
        self._pause = min(MAX_PAUSE_SECONDS, self._pause * 2)

    def answered(self) -> None:
        """A round the database served: an outage under way is over (one line says so)."""
        since = self._since
        if since is None:
            return
        self._since = None
        log.info(
            "the database answers again (after %.1fs): %s goes on",
            time.monotonic() - since,
            self.what,
            extra={"event": "database.recovered"},
        )
