"""Whether fal answers this process's submits, and holding them while it does not.

A submit whose connection to fal failed before a byte went out (refused, timed out, no pooled
connection: :class:`~worker.fal.errors.FalUnreachableError`) is no submission: its job goes back
to ``pending`` uncounted. Were that all, an outage of fal or of this host's network would turn
the whole batch over every few seconds. So from the first such failure this process holds its
submits: a job claimed meanwhile goes back, uncounted, due when the hold ends. After each pause
one submit goes through as a probe; when the probe cannot connect either, the pause doubles
(:data:`FIRST_PAUSE_SECONDS` up to :data:`LONGEST_PAUSE_SECONDS`). The first answer fal gives a
submit — whatever it says — ends the hold.

Per process, on purpose: one worker whose fal URL is wrong, or whose host lost its network,
holds its own submits, not every other worker's (unlike a 429, which is the account's and is
shared through the limiter). The batch's schedule and deadline go on as ever: the jobs held
are ``pending``, and the tick ends them at the deadline.

The hold is also recorded in the database (:class:`~jobs.models.FalHold`, through
:attr:`FalReach.recorder`), so that ``status`` and the dashboard say which process holds and
since when, wherever it runs: written when the hold begins, renewed by a failed probe at most
every :data:`~jobs.listing.FAL_HOLD_RENEW_SECONDS` (a process that died holding leaves a row
that goes stale), deleted when fal answers. Never once per probe.

A job given back because of the hold is due when the next probe may go: the backoff is stored
on the job (``next_attempt_at``), so that no other process sends it meanwhile. It is this
process's all the same, so it ends with the hold: when the hold's end is recorded (fal answers,
or the process stops cleanly: :meth:`FalReach.release`), and when this process first hears fal
answer (a process that died holding never recorded its end), the jobs such a backoff holds that
no live hold of another process covers are due at once
(:meth:`~worker.steps.context.Runtime.record_fal_hold`).

A stop never waits for a record under way for longer than it waits for a lock
(:data:`RELEASE_WAIT_SECONDS`): that record is a running step's write, which waits for a lock
another session holds as long as it takes (``LOCK TABLE jobs`` left open in ``psql``: the first
answer's end of the waits updates ``jobs``), and :meth:`FalReach.release` waited for it on the
stopping thread — a Ctrl-C that never ended, without a word.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from jobs import clock as timeline
from jobs.db import STOP_LOCK_WAIT_SECONDS
from jobs.listing import FAL_HOLD_RENEW_SECONDS, FAL_PROBE_PAUSE_MAX, utc_clock
from jobs.open_files import says_out_of_files
from worker.outage_log import OutageLog

log = logging.getLogger(__name__)

#: The first pause after fal is found unreachable; each failed probe doubles it, up to the next.
FIRST_PAUSE_SECONDS = 1.0
LONGEST_PAUSE_SECONDS = FAL_PROBE_PAUSE_MAX
#: While fal stays unreachable, it is said again (one warning) at most this often.
WARN_EVERY_SECONDS = 30.0
#: How long a stopping process waits for a record of the hold under way on a step's thread
#: before it leaves it (:meth:`FalReach.release`): as long as its own writes wait for a lock.
RELEASE_WAIT_SECONDS = STOP_LOCK_WAIT_SECONDS


#: The most of the last failure kept (and recorded: ``fal_holds.error`` holds 255): enough for a
#: proxy's failure said whole (``could not connect (ProxyError): the proxy 10.0.0.5:3128
#: (HTTPS_PROXY) answered 407 Proxy Authentication Required: set its user:password in …``).
ERROR_CHARS = 200


def _short(text: str, limit: int = ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class Hold:
    """A hold as recorded: since when (the database's clock), the next probe, the pause, the last error."""

    since: datetime
    next_probe_at: datetime
    pause_seconds: float
    error: str


#: Records a hold (a :class:`Hold`), or its end (None): :attr:`FalReach.recorder`.
Recorder = Callable[[Hold | None], None]


class FalReach:
    """This process's view of whether fal can be reached, and the hold on its submits.

    Thread-safe: the submit step runs on several threads (an embedded run) at once.
    ``clock`` (monotonic seconds) and ``wall`` (the hold's ``since`` and ``next_probe_at``, which
    ``status`` judges on the database's clock: :func:`jobs.clock.utcnow`, not this host's) may be
    replaced in tests.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: timeline.utcnow(),
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        #: Since when (``wall``) fal was unreachable; None while it answers.
        self.since: datetime | None = None
        #: When the outage began and was last said (``clock``), and its end.
        self._outage = OutageLog(WARN_EVERY_SECONDS, clock)
        #: The last connect failure, in short.
        self.error = ""
        #: The pause now between probes.
        self.pause = FIRST_PAUSE_SECONDS
        #: Until when (``clock``) nothing is sent: the next probe may go then.
        self._until = 0.0
        #: Where the hold is recorded for ``status`` (the runtime sets it); None: nowhere.
        self.recorder: Recorder | None = None
        #: Serialises the records, each of the state as it is then: the last one written is
        #: the latest state, whichever thread's change came first.
        self._record_lock = threading.Lock()
        #: When (``clock``) the hold was last recorded; None while no record stands.
        self._recorded_at: float | None = None
        #: Whether the end of a hold was recorded since this process began: until then, the
        #: first answer fal gives records one (ending the waits a process before it left).
        self._ended_once = False

    @property
    def down(self) -> bool:
        """Whether fal is held unreachable (until a submit is answered)."""
        return self.since is not None

    def held_for(self) -> float:
        """Seconds until the next probe may go (0 when it may go now, or fal answers)."""
        if self.since is None:
            return 0.0
        return max(0.0, self._until - self._clock())

    def admit(self) -> tuple[float, bool]:
        """May a submit go now? ``(0, probe)`` when it may — ``probe``: it goes as the one probe
        after a pause, which holds the next submit for another pause meanwhile — else
        ``(seconds until the next probe, False)``."""
        if self.since is None:  # the usual case: no lock
            return 0.0, False
        with self._lock:
            now = self._clock()
            if now < self._until:
                return self._until - now, False
            self._until = now + self.pause  # the probe's: the others wait for its outcome
            return 0.0, True

    def failed(self, error: str, *, probe: bool) -> float:
        """A submit could not connect to fal: hold the submits; seconds until the next probe.

        The pause doubles when ``probe`` failed; a submit sent before the outage was seen (not a
        probe) only starts the hold or leaves it as it is."""
        with self._lock:
            said = self._outage.failed()
            now = said.at
            if said.began:
                self.since = self._wall()
                self.pause = FIRST_PAUSE_SECONDS
            elif probe:
                self.pause = min(LONGEST_PAUSE_SECONDS, self.pause * 2)
            self.error = _short(error)
            if said.began or probe:
                self._until = now + self.pause
            pause, left = self.pause, max(0.0, self._until - now)
            recorded = self._recorded_at
            # Recorded when the hold begins (or its record failed), renewed by a failed probe
            # now and then: what keeps the record from going stale while the hold lasts.
            record = said.began or recorded is None or (probe and now - recorded >= FAL_HOLD_RENEW_SECONDS)
        if record:
            self._record()
        if said.due:
            # Out of file descriptors, this process reaches nothing: not fal's outage.
            local = says_out_of_files(error)
            what = "fal cannot be reached from this process" if local else "fal is unreachable"
            log.warning(
                "%s%s: %s; submits are held, one tried every %gs until fal answers "
                "(the jobs wait uncounted, none fails)",
                what,
                said.for_how_long,
                error,
                pause,
                extra={"event": "submit.fal_unreachable"},
            )
        return left

    def answered(self) -> None:
        """fal answered a submit (whatever it said): the hold ends."""
        if self.since is None:  # the usual case: no lock
            # A hold's end that could not be recorded then; or the first answer this process
            # hears, whose end of every hold ends the waits a process that died holding left.
            if self._recorded_at is not None or not self._ended_once:
                self._record()
            return
        with self._lock:
            lasted = self._outage.answered()
            if lasted is None:  # another thread heard the answer first
                return
            self.since, self.pause, self._until = None, FIRST_PAUSE_SECONDS, 0.0
        self._record()
        log.warning(
            "fal answers again after %.0fs: submits resume",
            lasted,
            extra={"event": "submit.fal_reachable"},
        )

    def _record(self) -> None:
        """Record the hold as it stands now (or its end) through :attr:`recorder`. Best effort:
        a database that cannot be written now gets it at the next failed submit."""
        recorder = self.recorder
        if recorder is None:
            return
        with self._record_lock:
            if self.recorder is not recorder:  # released while this waited for the lock
                return
            with self._lock:
                now = self._clock()
                since, pause, error, until = self.since, self.pause, self.error, self._until
            if since is None and self._recorded_at is None and self._ended_once:
                return  # nothing recorded, nothing to end
            hold = None
            if since is not None:
                next_probe_at = self._wall() + timedelta(seconds=max(0.0, until - now))
                hold = Hold(since=since, next_probe_at=next_probe_at, pause_seconds=pause, error=error)
            try:
                recorder(hold)
            except Exception as exc:
                log.debug(
                    "could not record that fal is %s (%s)",
                    "unreachable" if hold is not None else "reachable again",
                    type(exc).__name__,  # the database's words may hold its URL
                    extra={"event": "submit.fal_hold_unrecorded"},
                )
                return
            self._recorded_at = now if hold is not None else None
            self._ended_once = self._ended_once or hold is None

    def release(self) -> None:
        """This process stops (its runtime or its conductor closes): a hold it recorded ends with
        it, and nothing more is recorded, whatever its submits meet meanwhile. Best effort: a
        record that cannot be deleted goes stale by itself.

        A record under way on a step's thread is waited for :data:`RELEASE_WAIT_SECONDS` at
        most: a running step's write waits for another session's lock as long as it takes, and
        the stop must not (the step's own outcome is its business; nothing more is recorded)."""
        if self.recorder is None:
            return  # released already, or nothing to record to
        if not self._record_lock.acquire(timeout=RELEASE_WAIT_SECONDS):
            self.recorder = None  # a record that starts from now on writes nothing
            log.debug(
                "left a record of the hold on fal under way (its write waits for the database)",
                extra={"event": "submit.fal_hold_unrecorded"},
            )
            return
        try:
            recorder, self.recorder = self.recorder, None
            if recorder is None or self._recorded_at is None:
                return
            try:
                recorder(None)
            except Exception as exc:
                log.debug(
                    "could not clear the record of the hold on fal (%s)",
                    type(exc).__name__,
                    extra={"event": "submit.fal_hold_unrecorded"},
                )
                return
            self._recorded_at = None
        finally:
            self._record_lock.release()

    def note(self, now: datetime | None = None) -> str | None:
        """Why submits are held, for the progress line and a held job's reason; None when not.
        ``now`` (``wall`` when not given): the hold's start names its date when not on its UTC
        day (:func:`jobs.listing.utc_clock`)."""
        since = self.since
        if since is None:
            return None
        began = utc_clock(since, now=now or self._wall())
        return f"fal unreachable since {began}: {self.error}; retrying every {self.pause:g}s"
