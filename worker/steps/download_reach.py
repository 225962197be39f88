"""Whether this process's downloads can connect to fal's media hosts, and holding them while not.

A download that cannot even connect — the CDN's name does not resolve, the connection is
refused or times out, TLS fails in the handshake, the download proxy refuses the tunnel
(:class:`~worker.fal.errors.DownloadUnreachedError`) — got no answer about the file. The video
was made and paid for, and fal keeps it at its URL for as long as the request's media
lifetime: so such a try is never counted toward ``WANBATCH_DOWNLOAD_ATTEMPTS``, and the job
waits in ``downloading`` (as a submit that cannot reach fal waits in ``pending``,
:mod:`worker.steps.fal_reach`), tried again after a pause that doubles with each failure of the
outage (:data:`FIRST_PAUSE_SECONDS` up to :data:`LONGEST_PAUSE_SECONDS`). Said in one warning
line (at most every :data:`WARN_EVERY_SECONDS`) naming the host and what to change.

No outer bound on the hold itself: fal's media URLs live as long as the request's lifecycle
says (``X-Fal-Object-Lifecycle-Preference``: from seconds to never; "at least 7 days" by
default), which this process cannot know, and the result's JSON is already stored with the
job. What ends a job is the CDN's own answer once it connects: an expired file answers
403/404/410, final (:func:`worker.fal.storage._download_error`).

While the outage goes on, every job sent would be paid for and meet the same wall: once it has
lasted :data:`PAUSE_AFTER_SECONDS` the batch is paused with the reason ("outputs cannot be
downloaded here: …"), a pause that ends by itself with the first output stored again
(:func:`jobs.store.resume_after_outputs_stored`); ``run`` stops there and says why.

Per process, as fal's hold is: a worker whose host has no route out holds its own downloads.
Any HTTP answer from a media host (a success, an error status) ends the outage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from worker.outage_log import OutageLog

#: The first pause after a download could not connect; each further failure doubles it, up to the next.
FIRST_PAUSE_SECONDS = 2.0
LONGEST_PAUSE_SECONDS = 60.0
#: While downloads cannot connect, it is said again (one warning) at most this often.
WARN_EVERY_SECONDS = 30.0
#: How long the outage may last before the batch of a job that meets it is paused.
PAUSE_AFTER_SECONDS = 60.0
#: How long a download of a CANCELLED batch is held (the host failing it, or no connection to
#: it) before it fails (``download_failed``, its cost recorded), counted from this job's first
#: failure still waiting. Not its tries: with the defaults (5 tries, backoff 5+10+20+40 s) a
#: CDN blip of 75 s failed every paid video of a cancelled batch, and ``rerun --failed-only``
#: paid for them again. Not days either (fal's media lifetime, as an active batch waits): the
#: user asked to stop, and ``wanbatch cancel`` processes the batch until it is over.
CANCELLED_PATIENCE_SECONDS = 600.0
#: After how long without a failure a job's entry is dropped when nothing else forgot it
#: (``WANBATCH_RETRY_MAX_DELAY`` + ``WANBATCH_LEASE_SECONDS`` at their defaults, 300 + 120 s):
#: a job held is tried again within its backoff, so one silent that long has left — finished by
#: another process, say — and must not keep the outage open, nor date a later job's pause.
#: The download step passes the settings' own sum with each failure.
STALE_AFTER_SECONDS = 420.0


@dataclass(frozen=True, slots=True)
class Held:
    """What :meth:`DownloadReach.failed` makes of one download that could not connect."""

    #: Seconds until that job is tried again.
    delay: float
    #: Seconds the outage has lasted.
    lasted: float
    #: Whether to say it now (a warning line).
    say: bool
    #: Whether it has lasted long enough to pause the job's batch.
    pause: bool
    #: Whether the host stored another video whole since this job's previous failure: it
    #: serves, so this failure is about this job's file, and counts as a try
    #: (``WANBATCH_DOWNLOAD_ATTEMPTS``) — a file the host fails for good must not hold the job
    #: (and the ``run`` waiting on it) for the media lifetime.
    serves_others: bool = False
    #: Seconds since this job's first failure still waiting (0 when no job was named): what
    #: :data:`CANCELLED_PATIENCE_SECONDS` measures.
    held_for: float = 0.0


class _Waiting:
    """When each job still waiting first failed and last failed (``clock`` seconds); not
    thread-safe (its owner's lock guards it). An entry goes with :meth:`forget`, or once it
    has not failed for ``stale_after`` seconds (:meth:`prune`): it left without saying so."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.stale_after = STALE_AFTER_SECONDS

    def failed(self, job_id: str, now: float) -> float:
        """``job_id`` failed at ``now``: seconds since its first failure still waiting."""
        if len(self.first) >= 4096 and job_id not in self.first:
            self.clear()  # bounded: a job forgotten starts over, no more
        first = self.first.setdefault(job_id, now)
        self.last[job_id] = now
        return now - first

    def clear(self) -> None:
        self.first.clear()
        self.last.clear()

    def prune(self, now: float) -> list[str]:
        """Drop the jobs silent for ``stale_after``; the ones dropped."""
        gone = [job for job, at in self.last.items() if now - at > self.stale_after]
        for job in gone:
            self.forget(job)
        return gone

    def forget(self, job_id: str) -> None:
        self.first.pop(job_id, None)
        self.last.pop(job_id, None)


class DownloadReach:
    """This process's view of whether its downloads connect; thread-safe. ``clock`` (monotonic
    seconds) may be replaced in tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._outage = OutageLog(WARN_EVERY_SECONDS, clock)
        self._failures = 0
        #: The host the last failure could not connect to, and its warning's words (what
        #: failed, the fix): for a ``run``'s progress output (:meth:`note`, :meth:`unshown`).
        self._host = ""
        self._words = ""
        #: The words :meth:`unshown` gave last in this outage ("" when none yet), and when
        #: (``clock``): a later, different reason is given too, at most every
        #: :data:`WARN_EVERY_SECONDS`.
        self._shown = ""
        self._shown_at = 0.0
        #: Each held job's first failure: a cancelled batch's waits :data:`CANCELLED_PATIENCE_SECONDS`.
        self._waiting = _Waiting()
        #: When this process last gave each paused batch its latest reason (:meth:`may_renew`).
        self._renewed: dict[str, float] = {}

    @property
    def down(self) -> bool:
        return self._outage.down

    def failed(
        self, host: str = "", words: str = "", job_id: str = "", stale_after: float | None = None
    ) -> Held:
        """A download (of ``job_id``) could not connect (to ``host``; ``words``: what failed and
        the fix, as its warning says them): how long its job waits, and what to do about it.
        ``stale_after``: see :data:`STALE_AFTER_SECONDS`."""
        said = self._outage.failed()
        with self._lock:
            held_for = 0.0
            if job_id:
                if stale_after is not None:
                    self._waiting.stale_after = stale_after
                self._waiting.prune(said.at)
                held_for = self._waiting.failed(job_id, said.at)
            self._failures = 1 if said.began else self._failures + 1
            delay = min(LONGEST_PAUSE_SECONDS, FIRST_PAUSE_SECONDS * 2 ** min(self._failures - 1, 16))
            if said.began:
                self._shown = ""
            if words:
                self._host, self._words = host, words
        return Held(
            delay=delay,
            lasted=said.lasted,
            say=said.due,
            pause=said.lasted >= PAUSE_AFTER_SECONDS,
            held_for=held_for,
        )

    def may_renew(self, batch_id: str) -> bool:
        """Whether this process may now give batch ``batch_id``, paused for downloads, its latest
        failure's reason (which differs from the one it holds): the first time, then at most
        every :data:`WARN_EVERY_SECONDS`, as :meth:`unshown` repeats a changed reason. Downloads
        failing on two hosts in turn (fal serves videos from several) rewrote the batch's
        reason, some 600 characters on its row, at every failed try, and ``status`` flickered."""
        with self._lock:
            now = self._clock()
            last = self._renewed.get(batch_id)
            if last is not None and now - last < WARN_EVERY_SECONDS:
                return False
            # Entries past the interval decide nothing any more: the dict stays as small as
            # the batches renewed within it.
            self._renewed = {b: at for b, at in self._renewed.items() if now - at < WARN_EVERY_SECONDS}
            self._renewed[batch_id] = now
            return True

    def forget(self, job_id: str) -> None:
        """``job_id`` no longer waits for a connection (it left: stored, failed, its lease lost)."""
        with self._lock:
            self._waiting.forget(job_id)

    def note(self) -> str | None:
        """The progress line's note while downloads cannot connect; None while they do."""
        if not self._outage.down:
            return None
        with self._lock:
            host = self._host
        where = f" to {host}" if host else ""
        return f"downloads cannot connect{where}: held, no try counted"

    def unshown(self) -> str | None:
        """The outage's warning in full (the host, what failed, the fix) of its latest failure,
        the first time it is asked during an outage, and again when a later failure's words
        differ from those given (another host, a proxy refusing now where the name did not
        resolve), at most every :data:`WARN_EVERY_SECONDS`; None otherwise, and while downloads
        connect. An embedded ``run`` prints it on its progress output (its log line is drawn
        over there): the reason it shows is the latest one, not the outage's first."""
        if not self._outage.down:
            return None
        with self._lock:
            if not self._words or self._words == self._shown:
                return None
            now = self._clock()
            if self._shown and now - self._shown_at < WARN_EVERY_SECONDS:
                return None  # a reason that changes again and again: not a line each time
            self._shown, self._shown_at = self._words, now
            return (
                f"warning: downloads cannot connect: {self._words}; the paid videos wait at fal "
                "(none fails, no try counted) and are downloaded once it connects"
            )

    def answered(self) -> float | None:
        """A media host answered (whatever it said): the outage, if any, is over; how long it
        lasted (None when there was none)."""
        if not self._outage.down:
            return None
        lasted = self._outage.answered()
        with self._lock:
            self._failures = 0
        return lasted


#: How long after fal completed a request its video's host may keep failing before the job is
#: given up: fal's CDN keeps generated media 7 days unless the request asked otherwise
#: (``X-Fal-Object-Lifecycle-Preference``, https://fal.ai/docs/model-apis/data-retention).
MEDIA_HORIZON_DAYS = 7


@dataclass(frozen=True, slots=True)
class Troubled:
    """What :meth:`DownloadTrouble.failed` makes of one download the media host failed."""

    #: This job's failures of this kind in a row, in this process (its backoff's attempt number).
    tries: int
    #: Seconds the outage has lasted.
    lasted: float
    #: Whether to say it now (a warning line).
    say: bool
    #: Whether it has lasted long enough to pause the job's batch.
    pause: bool
    #: Whether the host stored another video whole since this job's previous failure: it
    #: serves, so this failure is about this job's file, and counts as a try
    #: (``WANBATCH_DOWNLOAD_ATTEMPTS``) — a file the host fails for good must not hold the job
    #: (and the ``run`` waiting on it) for the media lifetime.
    serves_others: bool = False
    #: Seconds since this job's first failure still waiting: what
    #: :data:`CANCELLED_PATIENCE_SECONDS` measures.
    held_for: float = 0.0


class DownloadTrouble:
    """This process's view of whether fal's media host serves its downloads: an outage is
    downloads the host answered with an error it may get over (``5xx``, ``429``, ``408``) or
    whose body it dropped midway (a reset, a read timeout), from the first such failure to the
    next video downloaded whole — or until no job waits on the host any more (each one that
    failed so left: stored, failed otherwise, its lease lost; :meth:`forget`). Unlike
    :class:`DownloadReach`, any answer does not end it: the host answering is the very trouble.
    Thread-safe; ``clock`` (monotonic seconds) may be replaced in tests.

    How long it has lasted, for the pause (:data:`PAUSE_AFTER_SECONDS`), is counted from a
    failure still waiting — the oldest waiting job's first failure, or the outage's start if
    later — never from a failure whose job has gone: one stale ``503`` an hour ago, its job
    gone since, made the first ``503`` of any later job pause its batch at once (and ``run``
    exit 2), the progress line saying "downloads wait" all that hour. The download step forgets
    each job that leaves (:func:`worker.steps.download.download`); one that left unseen (finished
    by another process) is dropped once it has not failed for :data:`STALE_AFTER_SECONDS`.

    Why not count such a failure toward ``WANBATCH_DOWNLOAD_ATTEMPTS``: five tries took about
    75 s, and an outage of the CDN longer than that failed every paid video that met it, which
    ``rerun --failed-only`` then rendered (and billed) again. Such a failure says nothing about
    the file, which fal keeps (an expired one answers 403/404/410, final). So the job waits in
    ``downloading`` with its own backoff (its :attr:`Troubled.tries`, kept here, per process:
    a new process starts again from the base delay), the batch is paused once the outage has
    lasted :data:`PAUSE_AFTER_SECONDS`, as for downloads that cannot connect.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._outage = OutageLog(WARN_EVERY_SECONDS, clock)
        self._clock = clock
        self._tries: dict[str, int] = {}
        #: When (``clock``) each waiting job first and last failed, in this process: what the
        #: pause measures, and what tells a job gone unseen (:data:`STALE_AFTER_SECONDS`).
        self._waiting = _Waiting()
        #: Videos downloaded whole so far, and each waiting job's count at its last failure
        #: (:attr:`Troubled.serves_others`).
        self._served = 0
        self._served_at: dict[str, int] = {}
        self._host = ""
        self._what = ""

    @property
    def down(self) -> bool:
        if self._outage.down:
            with self._lock:
                self._prune()
        return self._outage.down

    def _prune(self) -> bool:
        """Drop the jobs gone unseen (:data:`STALE_AFTER_SECONDS`); none left waiting ends the
        outage. Whether one is still under way. Under the lock."""
        for job_id in self._waiting.prune(self._clock()):
            self._drop(job_id)
        if not self._tries:
            self._outage.answered()
        return self._outage.down

    def failed(
        self, job_id: str, host: str = "", what: str = "", stale_after: float | None = None
    ) -> Troubled:
        """The host failed ``job_id``'s download (``what``: how, e.g. ``answers HTTP 503``;
        ``stale_after``: see :data:`STALE_AFTER_SECONDS`)."""
        with self._lock:  # one lock for the outage and the waiting jobs: forget() ends one
            if stale_after is not None:
                self._waiting.stale_after = stale_after
            self._prune()  # before this failure: one gone unseen neither prolongs nor dates it
            said = self._outage.failed()
            if len(self._tries) >= 4096 and job_id not in self._tries:
                self._tries.clear()  # bounded: a job forgotten starts its backoff over, no more
                self._served_at.clear()
                self._waiting.clear()
            tries = self._tries[job_id] = self._tries.get(job_id, 0) + 1
            held_for = self._waiting.failed(job_id, said.at)
            before = self._served_at.get(job_id)
            self._served_at[job_id] = self._served
            serves_others = before is not None and self._served > before
            if host:
                self._host, self._what = host, what
            # From a failure still waiting, within this outage (a video stored whole ended any before).
            lasted = min(said.lasted, said.at - min(self._waiting.first.values()))
        return Troubled(
            tries=tries,
            lasted=lasted,
            say=said.due,
            pause=lasted >= PAUSE_AFTER_SECONDS,
            serves_others=serves_others,
            held_for=held_for,
        )

    def forget(self, job_id: str) -> None:
        """``job_id`` no longer waits on the host (it failed otherwise, or left). The last one
        gone ends the outage: no job waits on the host any more, and nothing is known of it
        since (the next failure begins another, said at once)."""
        with self._lock:
            self._drop(job_id)
            if not self._tries:
                self._outage.answered()

    def _drop(self, job_id: str) -> None:
        self._tries.pop(job_id, None)
        self._served_at.pop(job_id, None)
        self._waiting.forget(job_id)

    def succeeded(self, job_id: str) -> float | None:
        """A video was downloaded whole: the outage, if any, is over; how long it lasted (None
        when there was none)."""
        with self._lock:
            self._served += 1
            self._drop(job_id)
            return self._outage.answered()

    def note(self) -> str | None:
        """The progress line's note while the media host fails downloads; None while it serves."""
        if not self._outage.down:
            return None
        with self._lock:
            if not self._prune():
                return None
            host, what = self._host, self._what
        who = f"{host} {what}" if host else "the media host fails downloads"
        return f"downloads wait: {who}; held, no try counted"
