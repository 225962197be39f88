"""Wake-ups across processes: PostgreSQL ``LISTEN``/``NOTIFY`` on one channel.

A process that moves a job — a worker that submitted it, the webhook receiver that completed
it — says so with :func:`jobs.db.notify_events` (``"<kind>:<job_id>"``, kind ``submitted``,
``freed``, ``done`` or ``webhook``) inside the transaction that made the move; PostgreSQL
delivers the notice when that transaction commits, and never when it rolls back. The tick
leader waits on an :class:`EventListener` instead of sleeping, so it reacts within milliseconds
rather than at its next tick.

Notices are hints, never the record: one sent while a listener was reconnecting is lost, so
whoever waits treats a reconnect (and every timeout) as "look at everything", which the tick
does anyway. On SQLite there is no other process to hear from: :meth:`EventListener.wait`
just sleeps.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import psycopg

from jobs import db
from jobs.printable import first_line
from jobs.settings import DatabaseSettings

log = logging.getLogger(__name__)

#: Most notices taken in one :meth:`EventListener.wait` (the rest wait for the next call).
DRAIN_MAX = 10_000


class EventListener:
    """A dedicated connection listening on :data:`jobs.db.EVENTS_CHANNEL`.

    It starts listening at construction, so a notice committed after that is not missed. Use it
    from one thread: :meth:`close` it from the thread that waits, or once that one has stopped.
    """

    def __init__(self, settings_or_url: DatabaseSettings | str, *, connect_timeout: float = 10.0) -> None:
        url = settings_or_url if isinstance(settings_or_url, str) else settings_or_url.database_url
        self._url = url
        self._connect_timeout = connect_timeout
        #: Only PostgreSQL carries notices; otherwise :meth:`wait` just sleeps.
        self.enabled = db.normalize_url(url).get_backend_name() == "postgresql"
        #: How many times the connection was opened again after it was lost (for tests and stats).
        self.reconnects = 0
        self._conn: psycopg.Connection[Any] | None = None
        self._lost = False  # the connection is gone and the loss was logged
        self._closed = False
        if self.enabled:
            self._connect()

    @property
    def backend_pid(self) -> int | None:
        """The server process of the listening connection (None while there is none)."""
        return self._conn.info.backend_pid if self._conn is not None else None

    def wait(self, timeout: float) -> list[str]:
        """The payloads of notices received within ``timeout`` seconds, in commit order.

        Returns as soon as one arrives, with whatever else is already pending; ``[]`` after the
        timeout. When the connection dies it is opened again and ``[]`` is returned at once
        (notices sent in between are lost: the caller looks at everything, as after a timeout).
        """
        if not self.enabled or self._closed:
            time.sleep(max(0.0, timeout))
            return []
        deadline = time.monotonic() + max(0.0, timeout)
        conn = self._conn or self._connect()
        if conn is None:  # the database is still unreachable: wait out the timeout, quietly
            time.sleep(max(0.0, deadline - time.monotonic()))
            return []
        try:
            payloads = [
                n.payload for n in conn.notifies(timeout=max(0.0, deadline - time.monotonic()), stop_after=1)
            ]
            while payloads and len(payloads) < DRAIN_MAX:
                more = [n.payload for n in conn.notifies(timeout=0.0)]
                if not more:
                    break
                payloads += more
        except psycopg.Error as exc:
            self._drop(exc)
            self._connect()
            return []
        return payloads

    def close(self) -> None:
        """Stop listening (later :meth:`wait` calls only sleep)."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                log.debug("closing the event listener's connection failed", exc_info=True)

    def __enter__(self) -> EventListener:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _connect(self) -> psycopg.Connection[Any] | None:
        """Open and ``LISTEN``; None (the failure logged once per outage) when that fails."""
        try:
            conn = db.listen_events(self._url, connect_timeout=self._connect_timeout)
        except psycopg.Error as exc:
            if not self._lost:
                self._lost = True
                log.warning(
                    "event listener: cannot reach the database (%s); the tick carries on",
                    first_line(exc),
                    extra={"event": "listener.unreachable"},
                )
            return None
        self._conn = conn
        if self._lost:
            self._lost = False
            self.reconnects += 1
            log.info("event listener: listening again", extra={"event": "listener.back"})
        return conn

    def _drop(self, exc: psycopg.Error) -> None:
        """Forget a dead connection; logged once per outage."""
        conn, self._conn = self._conn, None
        if not self._lost:
            self._lost = True
            log.warning(
                "event listener: connection lost (%s); reconnecting",
                first_line(exc),
                extra={"event": "listener.lost"},
            )
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
