"""Follow requests at fal over its status stream, so a completion is known the moment it happens.

Without a public URL for webhooks (a laptop, the embedded default) the only other way to
learn that a request finished is to ask, and asking on an interval both wastes calls and
leaves fal's slot idle until the next ask. fal's queue offers a server-sent-events stream per
request (``GET …/requests/{id}/status/stream``, https://docs.fal.ai/model-apis/model-endpoints/queue):
one call per request, and an event the moment its state changes.

Each watched request is read by a thread of its own while it lasts (:meth:`FalClient.stream_status`,
sync httpx sharing the client's connection pool), which reports what matters — the request
started running, or it ended — to a callback; the callback only queues it (the conductor
applies it to the database). A stream that breaks is reported as lost: the poller's safety net
takes the job over. The number of streams is bounded; requests beyond it are left to polling.
A thread whose stream ended waits a little for the next one rather than exit: a batch opens a
stream for every job, and starting a thread costs more CPU than reading a short stream.

A stream that stays open is not proof that it will ever say the request ended: one that sends
only keep-alive comments, or event after event that never reaches COMPLETED, held its job
``queued`` for good while ``/status`` said COMPLETED (and fal's result expires). So a stream
vouches for its job only while it is young (:meth:`StatusWatcher.by_age`): the poller asks about
the jobs of older streams too, on its own schedule, and a stream whose job turned out to have
ended meanwhile is let go (:meth:`StatusWatcher.let_go`) — its reader stops at the stream's
next chunk, keep-alives included, and nothing is reported for it. A stream that broke and was
opened again is as old as the job's first: one that always breaks just before the poller's
interval does not hold the job's poll back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection

from jobs.errors import WanbatchError
from worker import logs
from worker.fal.client import FalClient
from worker.fal.models import QueueState, RequestHandle, Status

log = logging.getLogger(__name__)

#: ``on_status(job_id, request_id, status)``: the request started running, or ended.
OnStatus = Callable[[str, str, Status], None]
#: ``on_lost(job_id, request_id)``: the stream broke before the request ended; polling takes over.
OnLost = Callable[[str, str], None]
#: The states a stream's statuses are reported in (COMPLETED always is: it ends the stream).
_FOLLOWED: tuple[QueueState, ...] = ("IN_PROGRESS",)
#: How long a reading thread with nothing to read waits for another stream before it exits.
IDLE_THREAD_SECONDS = 5.0


class StatusWatcher:
    """Watches up to ``max_streams`` requests at once, each over its own status stream."""

    def __init__(self, client: FalClient, on_status: OnStatus, on_lost: OnLost, *, max_streams: int) -> None:
        self.client = client
        self.on_status = on_status
        self.on_lost = on_lost
        self.max_streams = max_streams
        self._lock = threading.Lock()
        self._watching: dict[str, str] = {}  # job id -> request id
        #: job id -> when its first stream was asked for (monotonic): a stream that broke and is
        #: opened again (:meth:`watch` after a loss) keeps it, so its job is not vouched for anew
        #: (:meth:`by_age`); dropped when the job is no longer followed for good (:meth:`forget`).
        self._since: dict[str, float] = {}
        self._let_go: set[str] = set()  # job ids whose reader is to stop at its next chunk
        self._closed = False
        #: (job id, its request's handle, its batch id when the caller knew it)
        self._work: queue.SimpleQueue[tuple[str, RequestHandle, str | None]] = queue.SimpleQueue()
        self._idle = 0  # reading threads waiting for a stream (under _lock)

    def watching(self) -> frozenset[str]:
        """The jobs whose request is followed right now."""
        with self._lock:
            return frozenset(self._watching)

    def by_age(self, seconds: float) -> tuple[frozenset[str], frozenset[str]]:
        """The jobs followed now, split: those whose first stream was asked for less than
        ``seconds`` ago (their stream vouches for them: the poller leaves them alone), and the
        older ones (the poller asks about them too, in case their stream never says the request
        ended). A stream opened again after a loss counts from the first: one that always breaks
        just before ``seconds`` would otherwise hold the job's poll back for ever longer."""
        now = time.monotonic()
        with self._lock:
            young = frozenset(j for j in self._watching if now - self._since[j] < seconds)
            return young, frozenset(self._watching) - young

    def requests(self, job_ids: Collection[str]) -> dict[str, str]:
        """The request each of ``job_ids`` is followed for (those followed now)."""
        with self._lock:
            return {j: self._watching[j] for j in job_ids if j in self._watching}

    def let_go(self, job_ids: Collection[str]) -> None:
        """Stop following ``job_ids`` (their requests ended, as a poll found): each reader stops at
        its stream's next chunk, reports nothing, and its room is free again."""
        with self._lock:
            self._let_go.update(j for j in job_ids if j in self._watching)

    def forget(self, job_ids: Collection[str]) -> None:
        """``job_ids``' lost streams are not opened again (given up, or the job moved on): a later
        stream for one of them is a first one again. Jobs followed now are left as they are."""
        with self._lock:
            for job_id in job_ids:
                if job_id not in self._watching:
                    self._since.pop(job_id, None)

    def follows(self, job_id: str) -> bool:
        """Whether ``job_id``'s request is followed right now."""
        with self._lock:
            return job_id in self._watching

    def room(self) -> int:
        """How many more requests can be watched now."""
        with self._lock:
            return 0 if self._closed else self.max_streams - len(self._watching)

    def watch(self, job_id: str, handle: RequestHandle, batch_id: str | None = None) -> bool:
        """Start following ``handle`` for ``job_id``; False when it already is, or no room is left.
        A job whose stream was lost keeps the time its first stream was asked for (:meth:`by_age`).
        ``batch_id``: the job's batch, for the stream's log lines (the caller has it at hand; the
        watcher reads nothing to learn it)."""
        with self._lock:
            if self._closed or job_id in self._watching or len(self._watching) >= self.max_streams:
                return False
            self._watching[job_id] = handle.request_id
            self._since.setdefault(job_id, time.monotonic())
            if self._idle:
                self._idle -= 1  # that thread takes it: no new one
                start = False
            else:
                start = True
        self._work.put((job_id, handle, batch_id))
        if start:
            # Daemon: a stream blocked in a read must never hold up the process's exit.
            threading.Thread(target=self._reader, name="wanbatch-watch", daemon=True).start()
        return True

    def close(self) -> None:
        """Report nothing more. Streams still open end when the client's pool closes."""
        with self._lock:
            self._closed = True

    def _reader(self) -> None:
        """Follow streams one after another; exit after :data:`IDLE_THREAD_SECONDS` without one.

        Every stream put on the queue was counted against a thread: a new one, or an idle one
        (``_idle``) which is then bound to take it. A thread that times out uncounts itself
        under the lock; if a stream was counted against it meanwhile, it takes that one.
        """
        while True:
            try:
                job_id, handle, batch_id = self._work.get(timeout=IDLE_THREAD_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:
                        self._idle -= 1
                        return
                job_id, handle, batch_id = self._work.get()  # promised to this thread just now
            # Every line while the stream is read names its job (README › Logs), httpx's
            # ``GET …/status/stream`` line too: this thread works on that one job meanwhile.
            with logs.job_context(job_id, batch_id=batch_id, request_id=handle.request_id):
                self._follow(job_id, handle)
            if self._closed:
                return

    def _follow(self, job_id: str, handle: RequestHandle) -> None:
        running_said = False
        ended = False

        def stop() -> bool:  # asked at every chunk: a plain read of two values, no lock
            return self._closed or job_id in self._let_go

        try:
            # Only running and ended matter here: the queue's moves are read and left.
            for status in self.client.stream_status(handle, stop=stop, states=_FOLLOWED):
                if stop():
                    return
                if status.completed:
                    ended = True
                    self.on_status(job_id, handle.request_id, status)
                    # Read on to the stream's end (fal ends it here), so its connection is
                    # reused. The job stays "watched" meanwhile: no second stream for it.
                    continue
                if status.state == "IN_PROGRESS" and not running_said:
                    running_said = True
                    self.on_status(job_id, handle.request_id, status)
        except WanbatchError as exc:
            if ended:
                return  # the stream's end, after its last status, was not worth waiting for
            log.debug(
                "job %s: status stream lost (%s); polling takes over",
                job_id,
                exc,
                extra={"event": "stream.lost", "job_id": job_id, "request_id": handle.request_id},
            )
        except Exception:  # a bug or a closed pool must not kill the process: the poller has it
            log.debug(
                "job %s: status stream failed; polling takes over",
                job_id,
                exc_info=True,
                extra={"event": "stream.failed", "job_id": job_id, "request_id": handle.request_id},
            )
        finally:
            closed, let_go = self._done(job_id, ended=ended)
            if not ended and not closed and not let_go:
                self.on_lost(job_id, handle.request_id)

    def _done(self, job_id: str, *, ended: bool) -> tuple[bool, bool]:
        """``job_id`` is no longer followed (its room is free) and its thread is idle again, in
        one step: whoever sees the room free also finds the thread idle. Whether the watcher is
        closed (the thread then ends, not counted idle; one counted just before the close ends
        too, and the count no longer matters: a closed watcher takes no stream), and whether the
        stream was let go (:meth:`let_go`: nothing to report). A stream lost (not ``ended``, not
        let go) keeps its first time, for the stream that may be opened again."""
        with self._lock:
            self._watching.pop(job_id, None)
            let_go = job_id in self._let_go
            if ended or let_go or self._closed:
                self._since.pop(job_id, None)
            self._let_go.discard(job_id)
            if not self._closed:
                self._idle += 1
            return self._closed, let_go
