"""``wanbatch serve`` says in the database that it uses it: a heartbeat row (scope
:data:`~jobs.models.SERVE_SCOPE`), as the workers and an embedded ``run`` say it.

An upgrade of the schema waits for the processes that use the database, as far as the database
can tell (:func:`jobs.db.live_processes`: a heartbeat within a minute, or a job lease). A serve
wrote neither, so a newer wanbatch upgraded the schema under a running older serve, whose
**Rerun failed** then made a rerun of jobs the upgrade had dropped (``not_in_manifest``), which a
worker sent and billed. Now serve beats every :data:`SERVE_HEARTBEAT_SECONDS` on a thread of its
own and deletes its row when it stops; a killed one's goes stale in a minute.

A serve that cannot write its row (a read-only role, a ``mode=ro`` file, an outage) still
starts and serves: it says so in one warning line, once per streak of failures — until it
writes again, an upgrade cannot see it.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from sqlalchemy import Engine

from jobs import db, store
from jobs.models import SERVE_SCOPE, utcnow
from jobs.processes import process_prefix

log = logging.getLogger(__name__)

#: How often serve beats: as often as the conductor (``worker.conductor.HEARTBEAT_SECONDS``), well
#: within the minute after which a silent process no longer holds an upgrade back
#: (:data:`jobs.db.HEARTBEAT_STALE_SECONDS`).
SERVE_HEARTBEAT_SECONDS = 10.0
#: Longest a stopping serve waits for its last write (deleting its row) before it goes on: the
#: row of one that could not delete it goes stale by itself.
STOP_WAIT_SECONDS = 5.0


def serve_owner() -> str:
    """This serve's heartbeat owner: ``host:pid:serve``."""
    return f"{process_prefix()}serve"


class ServeHeartbeat:
    """Beats for this serve on ``engine`` until :meth:`stop` (see the module's text)."""

    def __init__(self, engine: Engine, *, every: float = SERVE_HEARTBEAT_SECONDS) -> None:
        self.engine = engine
        self.every = every
        self.owner = serve_owner()
        self._stopping = threading.Event()
        self._failing = False  # the last beat failed (said once per streak)
        self._thread = threading.Thread(target=self._run, name="wanbatch-serve-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def beat(self) -> bool:
        """Write this serve's row now; True when written (a failure is said once per streak)."""
        try:
            with db.session_scope(self.engine) as session:
                store.record_heartbeat(session, self.owner, [SERVE_SCOPE], utcnow())
        except Exception as exc:
            if not self._failing:
                log.warning(
                    "serve could not record in the database that it uses it (%s): until it can, an "
                    "upgrade of the schema by a newer wanbatch cannot see this serve (stop it before "
                    "upgrading); it tries again every %.0f s",
                    db.database_problem(exc),
                    self.every,
                    extra={"event": "serve.heartbeat_failed"},
                )
            self._failing = True
            return False
        if self._failing:
            log.info(
                "serve records in the database that it uses it again",
                extra={"event": "serve.heartbeat_recorded"},
            )
        self._failing = False
        return True

    def _run(self) -> None:
        wrote = False
        while True:
            wrote = self.beat() or wrote
            if self._stopping.wait(self.every):
                break
        if wrote:
            # A database that cannot be written now: the row goes stale by itself.
            with contextlib.suppress(Exception), db.session_scope(self.engine) as session:
                store.drop_heartbeats(session, self.owner)

    def stop(self) -> None:
        """Stop beating and delete this serve's row (waits :data:`STOP_WAIT_SECONDS` at most)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(STOP_WAIT_SECONDS)
