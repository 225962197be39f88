"""Process a batch until every job is terminal, showing progress; the engine of ``run``.

Embedded (no broker): an in-process Celery worker consumes the tasks while this thread ticks,
for this batch only — another batch in the same database that was only submitted is never
sent, downloaded or cancelled by it. Distributed (a broker is configured): the
``wanbatch worker`` processes do the work (for every batch) and this only watches the database,
warning when no worker answers. Either way the same steps run and the same rows tell the truth.

Ctrl-C (SIGINT), SIGTERM or SIGHUP (the terminal or SSH session closed) stops a run within
seconds (:func:`stop_on_signals`): nothing more is sent, the leases this process holds are given
back so the next run picks its jobs up at once, running downloads stop at their next chunk and
remove their per-attempt temporary files (those still under way after :data:`STOP_WRITES_SECONDS`
have theirs removed: :func:`_stop_output_writes`; so does a run the database's full disk stops),
and the command exits 130. A second Ctrl-C exits at once.

A database that does not answer at all — a frozen server whose kernel still acknowledges every
packet, so neither TCP keepalives nor ``tcp_user_timeout`` ever fire, and psycopg waits for ever
— cannot hold that stop back: giving the leases back is a database write that would never
return. psycopg's wait releases the GIL and runs Python's signal handlers every 100 ms (its C
``wait_c`` polls in slices), so the signal itself is always handled; what hung was the stop's own
database calls on the main thread after it. So the first signal also arms a watch
(:class:`HangWatch`): a stop still under way after :data:`STOP_HANG_GRACE_SECONDS` asks the
database, on a connection of its own, whether it answers at all; when no answer comes within
:data:`DATABASE_ANSWER_SECONDS` the process keeps what only it knows (accepted submissions not
recorded yet) in the journal of :mod:`worker.steps.unrecorded`, says so in one line and exits 130.
The jobs are safe without the give-back: the database holds them, their leases lapse (at once for
the next run on this host, the process being gone: :mod:`worker.steps.dead_leases`). While the
run goes on, a database that has not served its progress for :data:`DATABASE_SILENCE_SECONDS`
and does not answer either is said in one warning line (:class:`_SilenceWatch`), never a silent
hang. No ``statement_timeout`` instead: exports and migrations legitimately run longer.

A SQLite write lock another process holds does not hold the stop up: from the first signal on,
writes give it up within a moment (:func:`jobs.db.stop_waiting_for_lock`), and the last line says
the jobs were left as recorded, for the next run to take over (:func:`_left_locked`). Nor does a
PostgreSQL lock another session holds (``LOCK TABLE``, a ``CREATE INDEX`` left open): the stop's
transactions wait at most :data:`jobs.db.STOP_LOCK_WAIT_SECONDS` for it, and the last line names
that session; a step's write that was already waiting for it when the stop came is not waited
for (the process ends: its accepted submission is kept in the journal).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import TaskID

from jobs import db, listing, store
from jobs.batches import (
    BatchProgress,
    BatchReport,
    batch_progress,
    batch_report,
    left_to_collect,
    paused_schedule_text,
)
from jobs.cap_holds import CapCheck, CapHold, cap_holds, cap_note
from jobs.db import open_engine
from jobs.errors import ConfigError, DatabaseFullError, WanbatchError
from jobs.models import utcnow
from jobs.printable import clause, first_line, printable, redraws, shell_ref
from jobs.schedule import format_age
from jobs.settings import Settings, get_settings
from jobs.states import JobState
from jobs.store import CapScope
from jobs.thread_limit import ThreadLimitError
from jobs.url_secrets import masked_url
from jobs.webhook_silence import SilenceWatch
from worker.db_outage import DatabaseOutage, DatabaseUnavailableError
from worker.here import process_here, queue_origin
from worker.limits import api_key_id, unreachable_note
from worker.one_cpu import SharedCpu
from worker.progress_line import PlainProgress, batch_progress_display, money_text, plain_line
from worker.stranded import Stranded

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from worker.conductor import Conductor
    from worker.embedded import InProcessWorker
    from worker.steps import Runtime
    from worker.steps.cancel_tries import GivenUp
    from worker.steps.unrecorded import Accepted

_T = TypeVar("_T")

log = logging.getLogger(__name__)

#: Exit code after SIGINT/SIGTERM: 128 + SIGINT, what shells report for a Ctrl-C'd command.
EXIT_INTERRUPTED = 130

#: How long a stopping run waits, once the POSTs it had in flight were answered or their wait
#: ran out (:func:`_wait_for_answers`, up to ``WANBATCH_READ_TIMEOUT``), for its submit steps to
#: record those answers, and for their jobs' leases to show it. A record takes milliseconds; a
#: submission still unanswered after this is left to the reconciler.
IN_FLIGHT_GRACE_SECONDS = 3.0

#: How often a run waiting on workers asks the broker whether any worker is alive.
WORKER_CHECK_SECONDS = 30.0

#: How long a stopping run lets its loop finish the step it is in (a claim being committed).
STOP_WAIT_SECONDS = 2.0

#: How long a stopping run waits for its downloads under way to stop (each at its next chunk)
#: or to store the video they have whole, before it removes their temporary files itself.
STOP_WRITES_SECONDS = 2.0


#: The most of a run's wall time its progress refresh may take (reading the batch's counts and
#: money); beyond it the refresh comes less often.
REFRESH_SHARE = 0.02
#: The longest wait between two refreshes, however large the batch.
REFRESH_MAX_GAP_SECONDS = 10.0
#: Embedded, how often the progress refresh reads the batch when nothing this process knows of
#: changed since its last read (no step ended, no status applied, nothing dispatched, no note
#: of its own changed): the safety net for what other processes change (`wanbatch pause` or
#: `cancel` from another terminal, a second run of the batch). While jobs wait minutes at fal,
#: reading every 0.5 s cost more statements than the conductor's own tick, for a line that did
#: not change.
REFRESH_UNCHANGED_SECONDS = 5.0


class RefreshBudget:
    """Spaces out ``run``'s progress refresh so that it takes at most :data:`REFRESH_SHARE` of the
    run's time, whatever the batch's size.

    The refresh counts the batch's jobs by state, a read that grows with the batch: twice a
    second on a 100,000-job batch it would cost several percent of a core for the whole of a
    render that lasts hours. A refresh that took ``d`` seconds is next made ``d / share`` later at
    the soonest (at most :data:`REFRESH_MAX_GAP_SECONDS`): a small batch refreshes as before, a
    huge one every few seconds, and the end of the batch is seen that much later at most.
    """

    def __init__(self, share: float = REFRESH_SHARE, max_gap: float = REFRESH_MAX_GAP_SECONDS) -> None:
        self._share = share
        self._max_gap = max_gap
        self._next = 0.0

    def due(self, now: float) -> bool:
        """Whether a refresh may be made at ``now`` (``time.monotonic()``)."""
        return now >= self._next

    def spent(self, started: float, ended: float) -> None:
        """A refresh ran from ``started`` to ``ended``."""
        self._next = ended + min(self._max_gap, (ended - started) / self._share - (ended - started))


@dataclass
class RunStats:
    """What a run did, for the summary and the benchmark."""

    wall_seconds: float = 0.0
    status_calls: int = 0
    #: Requests of the batch still at fal whose cancel the run gave up (fal did not take it, see
    #: :mod:`worker.steps.cancel_tries`): the run ended with them left there, for the command to name.
    uncancelled: list[GivenUp] = field(default_factory=list)
    #: Requests of the batch sent with another API key that fal told this run's key it does not
    #: know (:mod:`worker.steps.other_key`): the run ended with only those (and ``uncancelled``)
    #: left, for the command to name with the ways out (exit 2).
    stranded: list[Stranded] = field(default_factory=list)


class Interrupted(WanbatchError):
    """SIGINT or SIGTERM stopped the command; what was given back is in the message.

    ``batch_id`` is the batch being processed when known (the CLI names it in its hint);
    ``hint``, when set, is how to go on, replacing the command's own resume hint.
    """

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str, *, batch_id: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.hint = hint

    def also(self, clause: str) -> None:
        """Add ``clause`` to the message: what the command's shutdown, after the stop, left
        undone, said in the stop's one line rather than a line of its own."""
        self.args = (f"{self.args[0]}; {clause}",)


class _Stop(BaseException):
    """Unwinds the main thread after the first SIGINT/SIGTERM.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way swallows it.
    """


#: Set by the first SIGINT/SIGTERM. The run loop checks it between steps, and the main thread
#: waits on it: that is what stops a run, whatever the raise below reached or not.
_stop_requested = threading.Event()
#: True while the main thread only waits for the run loop: the signal handler then just sets
#: :data:`_stop_requested` instead of raising into it.
_waiting = threading.Event()

#: How long a stopping command goes on before it asks whether the database answers at all (a
#: healthy stop gives its leases back within a few seconds; asking costs nothing meanwhile).
STOP_HANG_GRACE_SECONDS = 3.0
#: How long that question (``SELECT 1`` on a new connection) waits for its answer once the
#: connection is open: a database that has given none by then is not answering.
DATABASE_ANSWER_SECONDS = 4.0
#: How long opening that new connection may take before the database is called silent: a server
#: that works but is slow to accept new clients (a pooler queueing them, ``pre_auth_delay``, a
#: slow name lookup of its host) is not frozen, and the process's own connections still answer.
DATABASE_CONNECT_SECONDS = 30.0
#: How long a run goes on without its progress read completing before it asks the same question,
#: and says so in one warning line when no answer comes.
DATABASE_SILENCE_SECONDS = 30.0

#: Taken (never released) by whichever thread ends the process on the spot after a stop, so
#: that only one last line is written: the main thread's, or the hang watch's.
exit_lock = threading.Lock()


@dataclass
class _Stopping:
    """What the hang watch needs to end a stop that the database holds back: the batch being
    processed (None: not yet) and, embedded, the runtime whose accepted submissions it keeps."""

    batch_id: str | None = None
    runtime: Runtime | None = None


_stopping = _Stopping()


def processing_batch() -> str | None:
    """The batch this process has begun processing (or watching) under :func:`stop_on_signals`;
    None before that: what a second signal's last words name (it must not ask the database)."""
    return _stopping.batch_id


def database_silence(url: str, within: float | None = None, connecting: float | None = None) -> str | None:
    """Why the database at ``url`` gave no answer: neither to ``SELECT 1`` on a connection of
    its own — ``connecting`` seconds to open it, then ``within`` seconds for the answer — nor to
    any statement this process sent meanwhile (:func:`jobs.db.last_answer`: its pooled
    connections answering tell a database that works but is slow to accept new clients). None
    when it answered, even with an error (refused, too many clients: something answered, and
    the callers' own calls fail rather than hang). ``within`` and ``connecting`` default to
    :data:`DATABASE_ANSWER_SECONDS` and :data:`DATABASE_CONNECT_SECONDS` as they are when called.

    The question is asked on a daemon thread: a frozen server lets a connect or a query wait far
    longer (libpq's ``connect_timeout``, then for ever). That connect's own ``connect_timeout``
    is set beyond ``connecting``, so that a connect which never completes is silence, not an
    error answered."""
    from sqlalchemy import event as sa_event
    from sqlalchemy.pool import NullPool

    within = DATABASE_ANSWER_SECONDS if within is None else within
    connecting = DATABASE_CONNECT_SECONDS if connecting is None else connecting
    asked = time.monotonic()
    answer: list[BaseException | None] = []
    connected: list[float] = []
    heard = threading.Event()

    def ask() -> None:
        try:
            options: dict[str, Any] = {"poolclass": NullPool}
            if db.normalize_url(url).get_backend_name() == "postgresql":
                options["connect_args"] = {"connect_timeout": math.ceil(connecting + within) + 5}
            engine = db.read_engine(url, **options)
            sa_event.listen(engine, "connect", lambda *_: connected.append(time.monotonic()))
            try:
                db.probe(engine)
            finally:
                engine.dispose()
        except Exception as exc:  # an answer all the same: what it said does not matter here
            answer.append(exc)
        else:
            answer.append(None)
        heard.set()

    threading.Thread(target=ask, name="wanbatch-database-probe", daemon=True).start()
    while not heard.wait(0.1):
        if db.last_answer() > asked:
            return None  # the process's own connections answer
        now = time.monotonic()
        if connected and now - connected[0] >= within:
            return f"no answer within {within:.0f}s"
        if not connected and now - asked >= connecting:
            return f"no answer within {connecting:.0f}s (no connection)"
    if answer and answer[0] is not None:
        log.debug("the database answered with an error: %s", db.database_problem(answer[0]))
    return None


def _database_url() -> str | None:
    """The configured database's URL, for the hang watch (None: the settings cannot say)."""
    try:
        return get_settings().database_url
    except Exception:  # invalid settings: the command has said so already
        return None


#: Beyond a submit POST's own HTTP deadline (connect + 2 × read timeout), how long a process
#: ending without the database waits for its answer: its answer may be on its way.
SEND_ANSWER_MARGIN_SECONDS = 5.0


def wait_for_sends(rt: Runtime | None) -> int:
    """A process about to end without the database: wait for the submit POSTs it has in flight
    at fal to get their answers — each bounded by its own HTTP deadline, ``WANBATCH_CONNECT_TIMEOUT``
    plus twice ``WANBATCH_READ_TIMEOUT`` — so that what fal accepted is held, and kept in the
    journal by :meth:`~worker.steps.unrecorded.Unrecorded.keep_all`; an answer arriving after
    that would be lost, its job found ``submitting`` without a request id (``submit_unknown``),
    maybe paid twice. Returns how many were in flight."""
    if rt is None:
        return 0
    count = rt.unrecorded.in_flight()
    if count:
        bound = rt.settings.connect_timeout + 2 * rt.settings.read_timeout + SEND_ANSWER_MARGIN_SECONDS
        log.warning(
            "the database is not answering: waiting up to %.0fs for the answers of %d submit(s) in "
            "flight at fal, to keep them, before ending",
            bound,
            count,
            extra={"event": "stop.wait_for_sends"},
        )
        rt.unrecorded.wait_for_sends(bound)
    return count


def _waited_words(waited: int, rt: Runtime) -> str:
    """What a process that waited for ``waited`` submit(s) in flight says of them (empty: none)."""
    if not waited:
        return ""
    left = rt.unrecorded.in_flight()
    said = f"waited for {waited} submit(s) in flight at fal"
    if left:
        said += (
            f", {left} of them still without an answer: their jobs are checked by the reconciler, "
            "never resent blindly"
        )
    return said


def hung_words(reason: str, url: str, rt: Runtime | None, batch_id: str | None, waited: int = 0) -> str:
    """The line a stop that the database holds back ends with: that it does not answer, and
    what becomes of the jobs — the truth, since nothing could be given back or recorded.
    ``waited``: how many submit POSTs in flight it waited for first (:func:`wait_for_sends`)."""
    said = (
        f"interrupted, but the database is not answering (WANBATCH_DATABASE_URL {db.safe_url(url)}: "
        f"{reason}), so this process ends without waiting for it"
    )
    if rt is None:
        what = f"batch {batch_id}" if batch_id else "the batch"
        return f"{said}; nothing of {what} is lost: the database holds it, as far as its last commit"
    kept = rt.unrecorded.keep_all()
    parts = [
        f"{said}; nothing more is sent and the jobs are safe in the database: requests already at "
        "fal stay there and the next run collects them; the jobs this process held are taken up by "
        "the next run on this host once this process has ended (from another host: after "
        f"WANBATCH_LEASE_SECONDS, {rt.settings.lease_seconds:.0f}s), a submit whose answer was not "
        "recorded is checked by the reconciler, never resent blindly"
    ]
    if waited:
        parts.append(_waited_words(waited, rt))
    if kept:
        parts.append(rt.unrecorded.lost_words(kept))
    return "; ".join(parts)


#: Exit code of a ``wanbatch worker`` whose stop ended without the database (Celery's cold
#: shutdown's ``EX_FAILURE``): not the warm shutdown's 0, since its heartbeat and leases stay.
WORKER_HUNG_EXIT = 1


def worker_hung_words(
    reason: str, url: str, lease_seconds: float, rt: Runtime | None, waited: int = 0
) -> str:
    """:func:`hung_words` for a ``wanbatch worker`` (``rt``: its process's runtime, None when
    it never built one): its accepted submissions not recorded go to the journal too."""
    said = (
        f"stopping, but the database is not answering (WANBATCH_DATABASE_URL {db.safe_url(url)}: "
        f"{reason}), so this worker ends without waiting for it (exit {WORKER_HUNG_EXIT})"
    )
    parts = [
        f"{said}; its jobs are safe in the database: requests already at fal stay there and the "
        "workers collect them once it answers; the jobs this worker held are taken up again when "
        f"their leases end (WANBATCH_LEASE_SECONDS, {lease_seconds:.0f}s), a submit whose answer "
        "was not recorded is checked by the reconciler, never resent blindly"
    ]
    kept = rt.unrecorded.keep_all() if rt is not None else []
    if rt is not None and waited:
        parts.append(_waited_words(waited, rt))
    if rt is not None and kept:
        parts.append(rt.unrecorded.lost_words(kept, by="worker"))
    return "; ".join(parts)


def worker_stop_watch(lease_seconds: float, runtime: Callable[[], Runtime | None]) -> HangWatch:
    """The :class:`HangWatch` of a ``wanbatch worker``, to start at the first stop signal (Celery's
    ``worker_shutting_down``) and to tell ``done`` once the worker ended on its own.

    Celery's warm shutdown waits for the running tasks, then the ticker clears its heartbeat,
    then Python's exit joins the pool's threads: against a frozen database (a statement that
    never gets its answer) each waits for ever, and a second Ctrl-C (Celery's cold shutdown)
    cannot end a thread either. So, as for ``run``, a stop still under way
    :data:`STOP_HANG_GRACE_SECONDS` after the signal asks the database on a connection of its own,
    and when no answer comes the worker waits for the answers of its submit POSTs in flight at
    fal (:func:`wait_for_sends`), keeps the submissions fal accepted that ``runtime()``
    (its process's) has not recorded in the journal of :mod:`worker.steps.unrecorded`, says so
    in one log line (event ``worker.stop_database_hung``) and exits :data:`WORKER_HUNG_EXIT`.
    A prefork pool's children hold their own runtimes: only the main process's are kept."""

    def words(reason: str, url: str, waited: int) -> str:
        return worker_hung_words(reason, url, lease_seconds, runtime(), waited)

    def hung(line: str, _batch_id: str | None) -> None:
        log.error("%s", line, extra={"event": "worker.stop_database_hung"})
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(WORKER_HUNG_EXIT)

    return HangWatch(hung, None, words, runtime)


def say_sends_awaited(rt: Runtime | None) -> int:
    """A ``wanbatch worker`` asked to stop (Celery's warm shutdown): say once, in a log line,
    how many submit POSTs of this process are still awaiting fal's answer, and how long each
    may take (its own deadline: ``WANBATCH_CONNECT_TIMEOUT`` + twice ``WANBATCH_READ_TIMEOUT``).
    The warm shutdown waits for the tasks sending them — rightly: an answer abandoned leaves a
    paid request without its id — and said nothing while it did (17.6 s once, beyond Docker's
    default 10 s grace, which then kills it mid-POST). Returns the count (0: nothing said).

    ``rt`` is this process's runtime (:func:`worker.tasks.built_runtime`): None before its first
    task, and with ``--pool prefork`` always (the children hold theirs), so nothing is said then.
    Called from Celery's signal handler: the count is read without a lock (the interrupted
    thread may hold it)."""
    if rt is None:
        return 0
    count = rt.unrecorded.in_flight_unlocked()
    if count:
        bound = rt.settings.connect_timeout + 2 * rt.settings.read_timeout
        log.warning(
            "warm shutdown: waiting for %d submit(s) already sent to fal to be answered (up to %.0fs: "
            "WANBATCH_CONNECT_TIMEOUT + twice WANBATCH_READ_TIMEOUT), so that their request ids are "
            "recorded; a container stopped sooner (Docker's default grace is 10s) leaves them to the "
            "reconciler after WANBATCH_LEASE_SECONDS (%.0fs), possibly billed",
            count,
            bound,
            rt.settings.lease_seconds,
            extra={"event": "worker.stop_waits_for_sends"},
        )
    return count


class _SilenceWatch:
    """Says, in one warning line, that the database gives no answer while a run goes on — no
    error, no progress, nothing in the log (a frozen server) — and, in one line, when it
    answers again. Reports only: the run waits, as it waits out an outage that fails fast
    (:class:`~worker.db_outage.DatabaseOutage`), and Ctrl-C ends it (:class:`HangWatch`).

    :meth:`answered` is called by the run loop each time its progress read completes;
    :meth:`check` by the main thread while it waits. Once no read has completed for
    ``silence`` seconds, the database is asked on a connection of its own
    (:func:`database_silence`, on a thread: the main thread stays free for signals); a loop
    merely busy elsewhere (a slow call to fal) is not taken for a silent database.
    """

    def __init__(self, url: str, silence: float = DATABASE_SILENCE_SECONDS) -> None:
        self.url = url
        self.silence = silence
        self._last = time.monotonic()
        self._asking: threading.Thread | None = None
        self._said = False

    def answered(self) -> None:
        self._last = time.monotonic()
        if self._said:
            self._said = False
            log.info("the database answers again: the run goes on", extra={"event": "database.answers"})

    def check(self) -> None:
        if self._said or (self._asking is not None and self._asking.is_alive()):
            return
        if time.monotonic() - self._last < self.silence:
            return
        self._asking = threading.Thread(target=self._ask, name="wanbatch-database-silence", daemon=True)
        self._asking.start()

    def _ask(self) -> None:
        asked = time.monotonic()
        reason = database_silence(self.url)
        if reason is None or self._last > asked:
            self._last = max(self._last, asked)  # it answers: look again after another silence
            return
        self._said = True
        log.warning(
            "the database is not answering (WANBATCH_DATABASE_URL %s: nothing read for %.0fs, %s): "
            "the run waits for it; the jobs are safe in the database, and Ctrl-C stops the run",
            db.safe_url(self.url),
            time.monotonic() - self._last,
            reason,
            extra={"event": "database.silent"},
        )


class HangWatch(threading.Thread):
    """Ends a stop that a database which does not answer holds back (see the module docstring).

    Started by the first stop signal; ``done`` is set when the command finished on its own.
    Every :data:`STOP_HANG_GRACE_SECONDS` the stop is still under way, it asks the database
    (:func:`database_silence`); only when no answer comes does it end the process: through
    ``on_hang(line, batch_id)`` (the command's last words, then ``os._exit``), else by writing
    the line and ``last_words()`` itself and exiting 130.

    ``words(reason, url, waited)``, when given, makes that line instead of :func:`hung_words` (a
    ``wanbatch worker``'s: :func:`worker_hung_words`, through :func:`worker_stop_watch`).

    Before ending, it waits for the answers of the submit POSTs ``runtime()`` (by default the
    run's: :data:`_stopping`) has in flight at fal (:func:`wait_for_sends`), then asks again:
    a database that answers by then lets the stop go on.
    """

    def __init__(
        self,
        on_hang: Callable[[str, str | None], None] | None,
        last_words: Callable[[], bytes | None] | None,
        words: Callable[[str, str, int], str] | None = None,
        runtime: Callable[[], Runtime | None] | None = None,
    ) -> None:
        super().__init__(name="wanbatch-stop-watch", daemon=True)
        self.on_hang = on_hang
        self.last_words = last_words
        self.words = words
        self.runtime = runtime or (lambda: _stopping.runtime)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(STOP_HANG_GRACE_SECONDS):
            url = _database_url()
            if url is None:
                return
            reason = database_silence(url)
            if reason is None or self.done.is_set():
                continue  # it answers: the stop goes on at its own pace (a second signal ends it)
            before = time.monotonic()
            waited = wait_for_sends(self.runtime())
            if waited and (self.done.is_set() or db.last_answer() > before):
                continue  # it answered meanwhile: the stop goes on
            if not exit_lock.acquire(blocking=False):
                return  # the main thread is writing its own last line, and exits
            log.debug(  # for a JSON log: the line below is what the console shows
                "the database does not answer (%s) while the run stops: exiting without it",
                reason,
                extra={"event": "run.stop_database_hung"},
            )
            batch_id, rt = _stopping.batch_id, _stopping.runtime
            if self.words is not None:
                line = self.words(reason, url, waited)
            else:
                line = hung_words(reason, url, rt, batch_id, waited)
            if self.on_hang is not None:
                with contextlib.suppress(Exception):
                    self.on_hang(line, batch_id)  # normally never returns (os._exit)
            with contextlib.suppress(OSError):
                os.write(2, f"\n{line}\n".encode(errors="replace"))
            _say_last_words(self.last_words)
            os._exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def stop_on_signals(
    *,
    last_words: Callable[[], bytes | None] | None = None,
    on_hang: Callable[[str, str | None], None] | None = None,
    again: Callable[[str], str] | None = None,
) -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM/SIGHUP into :class:`Interrupted`; a second SIGINT or SIGTERM
    exits at once (130), in one line that says how to go on (``again(batch_id)``, the command's
    own hint) and what becomes of the submits it had in flight (:func:`second_signal_line`). A
    second SIGHUP is ignored: closing a terminal sends one from the shell and one from the
    kernel, and the first is being acted on (:func:`_stop_signals`).

    ``last_words()``, when given, is what that exit on the spot writes to standard output first
    (the command's ``--json`` object; None: nothing), with one ``os.write``, best effort: the
    signal may have come in the middle of a write through ``sys.stdout``.

    The first signal also starts a :class:`HangWatch`: a stop that a database which does not
    answer at all holds back ends anyway, through ``on_hang(line, batch_id)`` (which writes the
    command's last words and exits), else with ``line``, ``last_words()`` and exit 130.

    Raising from a signal handler interrupts whatever Python code runs at that moment — even a
    finalizer, which swallows the exception ("Exception ignored in …"). So the handler's main
    effect is a flag: the run loop (in its own thread) stops at its next step, and the main
    thread, which only waits while the batch is processed, notices at once. Outside that wait
    (reading and storing the manifest) it also raises, to cut a long submit short.

    Only the main thread can install signal handlers; elsewhere (tests calling in process from a
    thread) this does nothing. The handlers stay installed after an interruption, so a Ctrl-C
    while the command winds down is never a traceback.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    _stop_requested.clear()
    db.wait_for_lock_again()
    terminals = open_terminals()
    watch = HangWatch(on_hang, last_words)
    _stopping.batch_id, _stopping.runtime = None, None

    def handle(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            drop_hung_up_terminal(terminals)
            if received:  # a hangup comes twice (the shell's, the kernel's): no second signal
                return
        received.append(signum)
        if len(received) > 1:
            with contextlib.suppress(OSError):
                os.write(2, f"\n{second_signal_line(again)}\n".encode(errors="replace"))
            _keep_accepted_now()
            _say_last_words(last_words)
            os._exit(EXIT_INTERRUPTED)
        _stop_requested.set()
        # A write waiting for SQLite's lock, which another process holds, gives up within a
        # moment instead of its 30 s: the stop and the shutdown's writes are not held by it.
        db.stop_waiting_for_lock()
        watch.start()  # the first signal only: a second one exited above
        if not _waiting.is_set():
            raise _Stop(signum)

    previous = {sig: signal.signal(sig, handle) for sig in _stop_signals()}
    try:
        yield
    except _Stop:
        raise Interrupted("interrupted") from None
    # Finished (a signal that came too late to stop anything changes nothing): the usual handlers.
    watch.done.set()
    _stop_requested.clear()
    db.wait_for_lock_again()
    for sig, handler in previous.items():
        signal.signal(sig, handler)


#: What a second signal's line begins with (documented: kept, and extended after a ``;``).
INTERRUPTED_AGAIN = "interrupted again: exiting now"


def second_signal_line(again: Callable[[str], str] | None = None) -> str:
    """The line of a second signal, which exits on the spot: :data:`INTERRUPTED_AGAIN`, then how
    to go on (``again(batch_id)``, once the batch being processed is known) and, when submit
    POSTs of this run were still awaiting fal's answer, what becomes of them: fal may have
    queued and billed them, and the next run settles them only once their leases run out —
    never a silent exit that leaves the user guessing whether a resend pays twice.

    Called from the signal handler: it reads the count of POSTs in flight without a lock (the
    interrupted thread may hold it) and lets any failure of ``again`` go (the exit comes first)."""
    rt, batch_id = _stopping.runtime, _stopping.batch_id
    hint = ""
    if again is not None and batch_id is not None:
        with contextlib.suppress(Exception):
            hint = again(batch_id)
    in_flight = rt.unrecorded.in_flight_unlocked() if rt is not None else 0
    if in_flight and rt is not None:
        then = f": {hint}" if hint else ""
        return f"{INTERRUPTED_AGAIN}; {in_flight} submit(s) were in flight{then} ({_unanswered_words(rt)})"
    return f"{INTERRUPTED_AGAIN}; {hint}" if hint else INTERRUPTED_AGAIN


#: How long a second signal's exit waits for the journal of accepted submissions to be written.
KEEP_ON_EXIT_SECONDS = 3.0


def _keep_accepted_now(seconds: float = KEEP_ON_EXIT_SECONDS) -> None:
    """Before an exit on the spot (a second signal), keep the accepted submissions this process
    has not recorded in the journal (:meth:`~worker.steps.unrecorded.Unrecorded.keep_all`), and
    say where: the stop may be waiting for a frozen database, or for the answers of POSTs in
    flight at fal (:class:`HangWatch`), and a submission fal accepted whose record was on its
    way would otherwise be found ``submitting`` without its request id by the next run (and
    may be paid for twice). Adopting one whose record landed after all changes nothing.

    On a thread of its own, waited for at most ``seconds``: the handler runs on the main thread,
    which may hold the journal's lock at that moment — the exit must never wait on it."""
    rt = _stopping.runtime
    if rt is None:
        return
    unrecorded = rt.unrecorded

    def keep() -> None:
        with contextlib.suppress(Exception):
            said = unrecorded.lost_words(unrecorded.keep_all())
            if said:
                os.write(2, f"{said}\n".encode())

    thread = threading.Thread(target=keep, name="wanbatch-keep-on-exit", daemon=True)
    thread.start()
    thread.join(seconds)


def _say_last_words(last_words: Callable[[], bytes | None] | None) -> None:
    """Write ``last_words()`` to standard output (fd 1) before an exit on the spot; whatever
    fails (the object, a closed or full stdout) is let go: the exit comes first."""
    if last_words is None:
        return
    with contextlib.suppress(Exception):
        words = last_words()
        if words:
            os.write(1, words)


def _stop_signals() -> list[signal.Signals]:
    """The signals that stop a run gracefully: SIGINT, SIGTERM, and SIGHUP — what closing the
    terminal or the SSH session sends, the commonest way a run is interrupted (it killed the
    process outright, exit 129: answers to POSTs in flight were lost, leases not given back).

    A signal the parent set to be ignored stays ignored: the run goes on. SIGHUP under
    ``nohup``; SIGINT (and SIGTERM) in a job a non-interactive shell started in the background
    (``cmd &`` in a script), or under a parent that ignores them on purpose. Only SIGHUP was
    checked: SIGINT then stayed ignored until the run installed its handlers, and stopped it from
    then on, so one ``kill -INT`` was ignored or obeyed by when it came."""
    wanted: list[signal.Signals] = []
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # no SIGHUP on Windows
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            wanted.append(sig)
    return wanted


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def open_terminals() -> list[int]:
    """Which of stdout and stderr (1, 2) are terminals now: after a hangup they no longer are
    (:func:`drop_hung_up_terminal`)."""
    return [fd for fd in (1, 2) if _isatty(fd)]


def drop_hung_up_terminal(terminals: list[int]) -> None:
    """Point those of ``terminals`` (stdout, stderr) that are no longer terminals — the terminal
    hung up: a write to it fails with EIO — at /dev/null, so that stopping (giving the leases
    back, the last line) is not cut short by a write nobody can read. A ``kill -HUP`` with the
    terminal still open changes nothing: the last line is shown there as after Ctrl-C."""
    gone = [fd for fd in terminals if not _isatty(fd)]
    if not gone:
        return
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in gone:
            os.dup2(devnull, fd)
        os.close(devnull)


# --------------------------------------------------------------------------- the broker


def check_broker(settings: Settings, timeout: float = 3.0) -> None:
    """Raise :class:`ConfigError` (exit 2) unless ``WANBATCH_BROKER_URL`` answers within ``timeout``.

    Called before anything is submitted: without it, ``run`` against a broker that is down
    waited silently forever (Celery retries its connection without end). Socket timeouts bound
    the attempt, and a thread bounds it again for transports that ignore them.
    """
    url = settings.broker_url
    if not url:
        return
    failure: list[BaseException] = []

    def attempt() -> None:
        from kombu import connection

        factory: Any = connection.Connection  # kombu is only partly typed
        options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        try:
            conn = factory(url, connect_timeout=timeout, transport_options=options)
            try:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
            finally:
                conn.release()
        except Exception as exc:  # any transport's error: reported as one line below
            failure.append(exc)

    thread = threading.Thread(target=attempt, name="wanbatch-broker-check", daemon=True)
    thread.start()
    thread.join(timeout + 2.0)
    if thread.is_alive():
        reason = f"no answer within {timeout + 2.0:.0f}s"
    elif failure:
        exc = failure[0]
        # Its own full stop dropped: the message's sentence goes on ("refused.. Start it" was said).
        reason = clause(first_line(exc)) or type(exc).__name__
    else:
        return
    raise ConfigError(
        f"cannot reach the broker at {masked_url(url)} (WANBATCH_BROKER_URL): {reason}. "
        "Start it or fix the URL; unset WANBATCH_BROKER_URL to run in this process"
    )


def live_workers(settings: Settings, timeout: float = 1.0) -> int | None:
    """How many ``wanbatch worker`` processes answer a ping on the broker (None: could not ask)."""
    nodes = worker_nodes(settings, timeout)
    return None if nodes is None else len(nodes)


def worker_nodes(settings: Settings, timeout: float = 1.0) -> list[str] | None:
    """The Celery node names (``wanbatch-PID@HOST`` unless ``worker --name`` gave another) of
    the ``wanbatch worker`` processes that answer a ping on the broker, one per reply, sorted
    (None: could not ask)."""
    if not settings.broker_url:
        return None
    from worker.app import make_app

    app = make_app(settings.broker_url)
    try:
        replies = app.control.ping(timeout=timeout) or []
    except Exception:  # the broker went away meanwhile: not this check's to report
        log.debug("could not ping the workers", exc_info=True, extra={"event": "broker.ping_failed"})
        return None
    finally:
        app.close()
    # Each reply is {node name: {"ok": "pong"}}; two workers sharing a name answer twice.
    return sorted(str(node) for reply in replies if isinstance(reply, dict) for node in reply)


def no_worker_warning(settings: Settings, *, waiting: bool = True) -> str:
    """The line printed while no worker answers on the broker (``waiting``: by a command that
    keeps waiting for one, as ``run`` does; a command that only recorded a change returns)."""
    assert settings.broker_url
    then = "still waiting" if waiting else "it is carried out then"
    return (
        f"warning: no wanbatch worker answers on the broker {masked_url(settings.broker_url)}: "
        f"nothing is processed until one runs (start `wanbatch worker`); {then}"
    )


def workers_heartbeat(settings: Settings) -> datetime | None:
    """When the workers' tick leader last said, in this command's database, that it works on
    every batch (:func:`jobs.store.workers_last_beat`); None: never."""
    with db.read_scope(open_engine(settings)) as session:
        return store.workers_last_beat(session)


def workers_beats_here(settings: Settings) -> store.WorkersBeat:
    """The workers' latest heartbeats in this command's database, the tick leader's and the
    others' (:func:`jobs.store.workers_beats`)."""
    with db.read_scope(open_engine(settings)) as session:
        return store.workers_beats(session)


def stalled_leader_warning(
    settings: Settings, workers: int, beats: store.WorkersBeat, *, waiting: bool = True
) -> str:
    """The line printed while the workers work on this database but their tick leader has stopped
    beating (:func:`jobs.listing.leader_stalled`): not "another WANBATCH_DATABASE_URL", which sent users to
    check URLs that were right."""
    assert settings.broker_url
    then = "still waiting" if waiting else "it is carried out once one leads"
    return (
        f"warning: {workers} wanbatch worker(s) answer on the broker {masked_url(settings.broker_url)} "
        f"and work on this database {db.safe_url(settings.database_url)}, but "
        f"{listing.stalled_leader_text(beats)}; {then}"
    )


def workers_warning(settings: Settings, workers: int, *, waiting: bool = True) -> str | None:
    """What to say of ``workers`` that answer on the broker when this database has no fresh
    beat of their tick leader: its leader stalled (:func:`stalled_leader_warning`), or they
    serve another database (:func:`elsewhere_warning`); None when the leader beats here."""
    last = workers_heartbeat(settings)
    if beating_here(last):
        return None
    beats = workers_beats_here(settings)
    if listing.leader_stalled(beats):
        return stalled_leader_warning(settings, workers, beats, waiting=waiting)
    return elsewhere_warning(settings, workers, last, waiting=waiting)


def beating_here(last_beat: datetime | None, *, now: datetime | None = None) -> bool:
    """Whether the workers' latest heartbeat in this database (``last_beat``) says they work on
    it now: the same minute :func:`jobs.listing.is_processing` gives a batch's (``status``)."""
    return listing.is_fresh(last_beat, now=now or utcnow())


def elsewhere_warning(
    settings: Settings, workers: int, last_beat: datetime | None, *, waiting: bool = True
) -> str:
    """The line printed while workers answer on the broker but none works on this database:
    they serve another one (two deployments sharing a broker, or a typo in one host's
    ``WANBATCH_DATABASE_URL``), so nothing here is processed, however long the run waits."""
    assert settings.broker_url
    if last_beat is None:
        seen = "none ever"
    else:
        seen = f"the last {format_age((utcnow() - last_beat).total_seconds())} ago"
    then = "still waiting" if waiting else "it is carried out once one does"
    return (
        f"warning: {workers} wanbatch worker(s) answer on the broker {masked_url(settings.broker_url)}, "
        f"but none works on this database {db.safe_url(settings.database_url)} (no worker heartbeat in it "
        f"within the last minute; {seen}): they likely use another WANBATCH_DATABASE_URL (another "
        "deployment sharing this broker, or a typo on one host). Give the workers and this command the "
        f"same WANBATCH_DATABASE_URL, or each deployment a broker of its own; {then}"
    )


def broker_down_warning(settings: Settings) -> str:
    """The line printed while the broker cannot be reached to ask for the workers."""
    assert settings.broker_url
    return (
        f"warning: cannot reach the broker {masked_url(settings.broker_url)} (WANBATCH_BROKER_URL): "
        "no work reaches the workers until it is back (jobs already at fal finish there); still waiting"
    )


def compact_note(note: str) -> str:
    """A schedule's state as short as the progress line needs it: ``window opens 22:00
    Europe/Berlin, in 3h20m`` for ``waiting for window (opens …, in …)``, so the countdown fits
    an 80-column line with the count, the money and the clock."""
    head = "waiting for window (opens "
    if note.startswith(head) and note.endswith(")"):
        return "window opens " + note[len(head) : -1]
    return note


#: How long a run stopped before its first look at the workers waits for that look to end
#: (a ping takes about a second), so that what it says on the way out is what it found.
FIRST_LOOK_WAIT_SECONDS = 3.0

#: How long workers that answer the broker have, from the start of a run's watch, to show a
#: heartbeat in its database before the run warns that they serve another one. Their leader
#: beats at its first tick and every 10 s after (``worker.conductor.HEARTBEAT_SECONDS``): a
#: worker started with the run has had time to.
WORKER_BEAT_GRACE_SECONDS = 15.0


@dataclass(frozen=True, slots=True)
class _Look:
    """One look at the workers: when it began (``time.monotonic()``), how many answered the
    broker (None: it could not be asked), and whether they work on this database (None: not
    asked, or the database could not be read), with their latest heartbeat in it."""

    began: float
    alive: int | None
    here: bool | None = None
    last_beat: datetime | None = None
    #: The workers beat here, but their tick leader has stopped (:func:`jobs.listing.leader_stalled`).
    stalled: store.WorkersBeat | None = None


class _WorkerWatch(threading.Thread):
    """Warns, at once and then every ``every`` seconds, while no worker answers on the broker,
    or while the workers that answer work on another database; remembers what it last found
    (:meth:`seen_alive_recently`, :meth:`seen_elsewhere`).

    A thread of its own: a ping takes a second, and a broker that stops answering must not
    freeze the progress display. ``ask`` counts the workers answering (None: the broker could
    not be asked); :func:`live_workers` unless a test gives another. ``heard`` reads the workers'
    latest heartbeat in this database (:func:`workers_heartbeat`): workers that answer the ping
    but never beat here serve another database — staging and production sharing one Redis, or a
    typo in one host's URL — and the run waited in silence, "pending" forever. That is said
    once ``grace`` seconds have passed (a worker started with the run beats within them).
    """

    def __init__(
        self,
        settings: Settings,
        say: Callable[[str], None],
        every: float,
        ask: Callable[[Settings], int | None] = live_workers,
        heard: Callable[[Settings], datetime | None] = workers_heartbeat,
        grace: float = WORKER_BEAT_GRACE_SECONDS,
        beats: Callable[[Settings], store.WorkersBeat] = workers_beats_here,
    ) -> None:
        super().__init__(name="wanbatch-worker-watch", daemon=True)
        self.settings = settings
        self.say = say
        self.every = every
        self.ask = ask
        self.heard = heard
        self.beats = beats
        self.grace = grace
        self.stopping = threading.Event()
        self._looked = threading.Event()
        #: The latest look; None before one ended.
        self._latest: _Look | None = None

    def run(self) -> None:
        started = time.monotonic()
        while not self.stopping.is_set():
            look = self._look()
            self._latest = look  # one assignment: read whole by other threads
            self._looked.set()
            if self.stopping.is_set():
                return
            wait = self.every
            if look.alive == 0:
                self.say(no_worker_warning(self.settings))
            elif look.alive is None:  # the broker itself is down
                self.say(broker_down_warning(self.settings))
            elif look.stalled is not None:
                self.say(stalled_leader_warning(self.settings, look.alive, look.stalled))
            elif look.here is False:
                if look.began - started >= self.grace:
                    self.say(elsewhere_warning(self.settings, look.alive, look.last_beat))
                else:  # the workers may have just started: look again once they had time to beat
                    wait = min(wait, started + self.grace - time.monotonic())
            self.stopping.wait(max(0.0, wait))

    def _look(self) -> _Look:
        """Ask the broker for the workers and, when some answer, this database for their beat."""
        began = time.monotonic()
        alive = self.ask(self.settings)
        if not alive:
            return _Look(began, alive)
        try:
            last = self.heard(self.settings)
        except Exception:  # the database is unavailable: the run's own loop says so
            log.debug(
                "could not read the workers' heartbeat", exc_info=True, extra={"event": "broker.beat_unread"}
            )
            return _Look(began, alive)
        if beating_here(last):
            return _Look(began, alive, here=True, last_beat=last)
        # No fresh beat of the tick leader: the other workers' beats tell a frozen leader (the
        # workers do work on this database) from workers that serve another one.
        try:
            beats = self.beats(self.settings)
        except Exception:
            log.debug(
                "could not read the workers' beats", exc_info=True, extra={"event": "broker.beat_unread"}
            )
            beats = None
        if beats is not None and listing.leader_stalled(beats):
            return _Look(began, alive, here=True, last_beat=last, stalled=beats)
        return _Look(began, alive, here=False, last_beat=last)

    def _recent(self, wait: float) -> _Look | None:
        """The latest look, if made within the last two rounds (a look that hangs proves
        nothing); before the first one ends, waits for it at most ``wait`` seconds."""
        self._looked.wait(wait)
        latest = self._latest
        if latest is None or time.monotonic() - latest.began > 2 * self.every:
            return None
        return latest

    def seen_alive_recently(self, wait: float = FIRST_LOOK_WAIT_SECONDS) -> bool:
        """Whether the latest look at the workers found one working on this database (or could
        not read the database to tell), and was made within the last two rounds. Before the
        first look ends, waits for it at most ``wait`` seconds; none by then counts as no
        worker seen."""
        latest = self._recent(wait)
        return latest is not None and bool(latest.alive) and latest.here is not False

    def seen_elsewhere(self, wait: float = FIRST_LOOK_WAIT_SECONDS) -> bool:
        """Whether the latest look found workers answering the broker but none beating in this
        database (they serve another one)."""
        latest = self._recent(wait)
        return latest is not None and bool(latest.alive) and latest.here is False


def stopped_watching(batch_id: str, *, workers_seen: bool, elsewhere: bool = False) -> str:
    """What a distributed ``run`` says when Ctrl-C stops it watching: that the workers carry on
    only when one was seen alive lately, working on this database; otherwise nothing processes
    the batch, and saying they carry on would contradict the warning just printed (no worker
    answers, or ``elsewhere``: those that answer serve another database)."""
    if workers_seen:
        return f"interrupted: stopped watching batch {batch_id}; the workers carry on with it"
    if elsewhere:
        return (
            f"interrupted: stopped watching batch {batch_id}; the workers that answer on the broker "
            "work on another database (none beats in this one), so nothing processes it until a "
            "worker runs with this WANBATCH_DATABASE_URL (`wanbatch doctor` checks it)"
        )
    return (
        f"interrupted: stopped watching batch {batch_id}; no wanbatch worker was seen alive lately, "
        "so nothing processes it until one starts (start `wanbatch worker`)"
    )


# --------------------------------------------------------------------------- processing


def load_machinery(settings: Settings) -> None:
    """Import what :func:`process_batch` works with under ``settings``, without starting any of it.

    Embedded, that is the conductor, the step pools and the runtime — with them httpx, httpcore,
    PyAV and the fal client, over a hundred modules that :func:`process_batch` would otherwise
    import itself, once it has begun. The CLI calls this before :func:`cli.startup.resume`, so
    they are loaded with the cyclic GC still paused and frozen with the rest of the start-up,
    instead of being imported under the collector and traversed by every full collection of
    the run. With a broker the workers do the work: a watching run needs none of it.
    """
    import jobs.outputs_on_disk  # noqa: F401 (the run's summary looks at its videos: loaded now)

    if settings.broker_url:
        return
    import worker.conductor
    import worker.embedded
    import worker.runtime
    import worker.steps.dead_leases  # noqa: F401 (imported for the side effect: loaded now)


def process_batch(
    batch_id: str,
    settings: Settings,
    *,
    console: Console | None = None,
    show_progress: bool = True,
    serve_metrics: bool = True,
    again: str = "run the same command again",
    keyless: bool = False,
) -> tuple[BatchReport, RunStats]:
    """Drive ``batch_id`` to the end; returns its final status report and run statistics.

    ``again``: how the user goes on with the batch once it is paused (a ``rerun`` names
    ``wanbatch run NAME``: running it again would store another batch), said on the last line.
    ``keyless``: processing it makes no call to fal (:func:`jobs.batches.ends_without_fal`: past
    its deadline, only unsent jobs left, which it ends), so it runs embedded without ``FAL_KEY``.

    Raises :class:`Interrupted` after SIGINT/SIGTERM (under :func:`stop_on_signals`), once this
    process has stopped sending and given its leases back.

    Embedded, it serves this process's metrics while it works (:func:`serve_run_metrics`) unless
    ``serve_metrics`` is False: the caller serves them already (``run`` and ``rerun`` bind the
    port before they store anything).
    """
    stats = RunStats()
    started = time.monotonic()
    console = console or Console(stderr=True, emoji=False)
    _stopping.batch_id = batch_id
    if settings.broker_url:
        with db.read_scope(open_engine(settings)) as session:  # for the hint, should Ctrl-C come
            ref = shell_ref(store.get_batch(session, batch_id).name, batch_id)
        watch = _WorkerWatch(settings, console.print, WORKER_CHECK_SECONDS)
        watch.start()
        try:
            _watch(batch_id, settings, console, show_progress, stats, conductor=None, again=again)
        except _Stop:
            raise Interrupted(
                stopped_watching(
                    batch_id,
                    workers_seen=watch.seen_alive_recently(),
                    elsewhere=watch.seen_elsewhere(wait=0.0),
                ),
                batch_id=batch_id,
                hint=f"`wanbatch status {ref}` follows it; running the same command again watches it",
            ) from None
        except DatabaseUnavailableError as exc:
            raise DatabaseUnavailableError(
                f"{exc}; stopped watching batch {batch_id}: the workers carry on with it once the "
                "database answers, and running the same command again watches it"
            ) from None
        finally:
            watch.stopping.set()
        _sync_log(open_engine(settings))  # the workers' commits: what the report reads
    else:
        _process_embedded(batch_id, settings, console, show_progress, stats, serve_metrics, again, keyless)
    stats.wall_seconds = time.monotonic() - started
    return _final_report(batch_id, settings), stats


def watch_batch(
    batch_id: str,
    settings: Settings,
    *,
    console: Console,
    show_progress: bool,
    still: Callable[[], bool],
    stopped: str,
    hint: str,
) -> bool:
    """Show the progress of ``batch_id`` that another process processes (a ``--simulate`` run,
    whose simulator holds the batch's requests: ``cancel --simulate`` leaves them to it), sending
    and asking nothing, until every job is terminal (True) or ``still()`` says that process is
    no longer there (False: the caller goes on with the batch itself). ``still`` is asked
    between refreshes. Ctrl-C stops the watch only: :class:`Interrupted` (``stopped``, ``hint``)."""
    ended: list[bool] = []
    _stopping.batch_id = batch_id

    def watching() -> bool:
        if still():
            return True
        ended.append(True)
        return False

    try:
        stats = RunStats()
        _watch(batch_id, settings, console, show_progress, stats, conductor=None, again="", still=watching)
    except _Stop:
        raise Interrupted(stopped, batch_id=batch_id, hint=hint) from None
    return not ended


def _final_report(batch_id: str, settings: Settings) -> BatchReport:
    """The report of a batch whose run is over (:func:`read_after_run`)."""
    return read_after_run(
        batch_id,
        settings,
        lambda session: batch_report(session, batch_id, policy=settings.submit_unknown_policy),
    )


def read_after_run(batch_id: str, settings: Settings, read: Callable[[Session], _T]) -> _T:
    """What ``read`` reads of a batch whose run is over (its report, whether its videos are
    still on disk), read as the run's rounds read: a database that is unavailable just then (a
    killed connection, a restart, a failover) is waited out, up to a lease
    (``WANBATCH_LEASE_SECONDS``); past that, one line (exit 2) that says the run is over and
    where its outcome is to be read, never "internal error". A read that failed once, after
    every job had finished, ended the run with exit 2 where it had done its work (a connection
    reset injected into the look at the videos on disk)."""
    engine = open_engine(settings)
    outage = DatabaseOutage(
        "the run (reading its report)", patience=settings.lease_seconds, url=settings.database_url
    )
    waiting = threading.Event()  # never set: Ctrl-C raises in this (the main) thread meanwhile
    while True:
        try:
            with db.read_scope(engine) as session:
                found = read(session)
        except Exception as exc:
            if not db.is_unavailable(exc):
                raise
            try:
                outage.failed(exc, waiting)
            except DatabaseUnavailableError as gone:
                raise DatabaseUnavailableError(
                    f"{gone}; the run of batch {batch_id} is over, but its report could not be read: "
                    f"`wanbatch status {batch_id}` shows it once the database answers"
                ) from None
            continue
        outage.answered()
        return found


def _process_embedded(
    batch_id: str,
    settings: Settings,
    console: Console,
    show_progress: bool,
    stats: RunStats,
    serve_metrics: bool,
    again: str,
    keyless: bool = False,
) -> None:
    from worker.conductor import Conductor, listening
    from worker.embedded import InProcessWorker
    from worker.runtime import build_runtime, close_runtime
    from worker.steps.dead_leases import DeadLeases

    # allow_missing_key only when keyless (the run makes no call to fal): otherwise a missing
    # FAL_KEY is a ConfigError here, before anything is claimed (a simulated run has the
    # simulator's key). This batch only: never another one merely submitted.
    # A simulation is processed only by a --simulate run (jobs.batches.check_simulation), so the
    # batch says which provider this runtime talks to: it then reaches that provider's requests only.
    with db.read_scope(open_engine(settings)) as session:
        simulated = store.get_batch(session, batch_id).simulated
    # WANBATCH_METRICS_PORT: this process does the work. Before the runtime: a port in use
    # leaves nothing to close.
    stop_metrics = serve_run_metrics(settings) if serve_metrics else _nothing_to_stop
    # Before any of the run's threads start: they inherit the pin (worker.one_cpu).
    try:
        shared_cpu = SharedCpu.start(settings.cpu_affinity)
    except ValueError as exc:
        stop_metrics()
        raise ConfigError(f"WANBATCH_CPU_AFFINITY: {exc}") from None
    worker = InProcessWorker(settings.embedded_concurrency)
    try:
        rt = build_runtime(
            settings=settings,
            allow_missing_key=keyless,
            enqueue_submit=worker.submit,
            enqueue_download=worker.download,
            batch_ids=frozenset({batch_id}),
            simulated=simulated,
        )
    except BaseException:
        stop_metrics()
        if shared_cpu is not None:
            shared_cpu.release()
        raise
    # The steps run on this process's threads: dispatch and the conductor hand them what they read.
    rt.submit_tickets, rt.download_claims = {}, {}
    conductor = Conductor(rt)
    if shared_cpu is not None:
        conductor.on_tick = shared_cpu.check
    rt.notify = conductor.notify
    rt.on_accepted = conductor.watch_accepted
    # A stopped run's leases that nothing gave back (killed, crashed, a second Ctrl-C): taken
    # back at once when its process on this host is gone, as far as nothing is paid twice;
    # what is waited for instead is said on the progress line (worker.steps.dead_leases).
    rt.dead_leases = DeadLeases(rt, batch_id)
    worker.bind(rt)
    # A step's thread that cannot start (`ulimit -u`): stop as Ctrl-C does, then say why (below).
    worker.on_thread_limit = _stop_requested.set
    _stopping.runtime = rt  # a stop the database holds back keeps its accepted submissions
    abandoned = False
    try:
        with worker, listening(rt.engine, conductor.notify):
            try:
                _watch(batch_id, settings, console, show_progress, stats, conductor=conductor, again=again)
            except _Stop:
                abandoned = True
                _stop_steps(rt, worker, conductor)
                _wait_for_answers(rt, console)  # what fal accepted is recorded, not left unknown
                # Accepted ids the database could not take (its disk is full) stay in the journal.
                lost = rt.unrecorded.give_up(IN_FLIGHT_GRACE_SECONDS)
                stopped = "interrupted" if worker.thread_limit is None else "stopped"
                said = _give_back(rt, batch_id, kept=len(lost), stopped=stopped)
                # A step whose record write still waits (for a PostgreSQL lock another session
                # took before the stop: that wait is not bounded) ends with the process: kept too.
                lost = rt.unrecorded.keep_all()
                if lost:
                    said = f"{said}; {rt.unrecorded.lost_words(lost)}"
                if worker.thread_limit is not None:  # no signal: a thread could not start
                    raise ThreadLimitError(
                        f"{worker.thread_limit}; {said}; "
                        "run the same command again once that is fixed, to resume"
                    ) from None
                raise Interrupted(said, batch_id=batch_id) from None
            except DatabaseUnavailableError as exc:
                # The database stayed away past a lease: stop as Ctrl-C does, giving back what
                # can still be given back, and say so in one line (exit 2), never "internal error".
                abandoned = True
                _stop_steps(rt, worker, conductor)
                lost = _collect_answers(rt, console)  # what fal accepted is kept, not left unknown
                said = _give_back(rt, batch_id, kept=len(lost), stopped="stopped")
                lost = rt.unrecorded.keep_all()  # a record still on its way: kept too
                if lost:
                    said = f"{said}; {rt.unrecorded.lost_words(lost)}"
                raise DatabaseUnavailableError(
                    f"{exc}; {said}; run the same command again once the database answers, to resume"
                ) from None
            except Exception as exc:
                if not db.is_disk_full(exc):
                    raise
                abandoned = True
                _stop_steps(rt, worker, conductor)
                _collect_answers(rt, console)
                raise _stopped_by_full_disk(rt) from None
    finally:
        conductor.close()
        _sync_log(rt.engine)
        stop_metrics()
        _stopping.runtime = None
        if shared_cpu is not None:
            shared_cpu.release()
        if not abandoned:  # abandoned threads may still use them until the process exits
            close_runtime(rt)


def _stop_steps(rt: Runtime, worker: InProcessWorker, conductor: Conductor) -> None:
    """What every stop of an embedded run does first, whatever stopped it (Ctrl-C or SIGTERM,
    its database gone past a lease, its database's disk full): no submit POST goes out from now
    on (:meth:`~worker.steps.unrecorded.Unrecorded.stop_sending`: a step under way gives its job
    back unsent), no step starts, the conductor stops, and the downloads under way stop, each
    removing its temporary file (``.…mp4.v5-….part`` files were left for the next run).

    Only Ctrl-C stopped sending: a submit step already past the worker's abandon check when the
    database stopped the run went on to POST — billed, after the run had decided to stop."""
    rt.unrecorded.stop_sending()
    worker.abandon()  # a step that starts from now on does nothing
    conductor.close()
    _stop_output_writes(rt)


def _wait_for_answers(rt: Runtime, console: Console, *, exit_now: str = "Ctrl-C again to exit now") -> int:
    """A run stopping under a Ctrl-C or SIGTERM: send nothing more (a step that claimed its job
    gives it back unsent), and wait for the answers of the submit POSTs already on their way
    to fal, up to their own read timeout (``WANBATCH_READ_TIMEOUT``), saying so once on stderr.
    Returns how many were in flight.

    fal queued (and bills) such a request whether or not its answer is read: one abandoned
    after a short grace (3 s, before) left its job without a request id, for the next run to
    wait out the lease and then fail ``submit_unknown`` — and a ``rerun --failed-only`` of it
    paid a second time. Each answer that arrives is recorded by its step (the request id kept);
    a second Ctrl-C still exits at once (:func:`stop_on_signals`), journalling what was answered.
    """
    count = rt.unrecorded.stop_sending()
    if not count:
        return 0
    bound = rt.settings.read_timeout
    console.print(
        f"waiting for {count} submit(s) already sent to fal to be answered (up to {bound:g}s; "
        f"{exit_now}: {_unanswered_words(rt)})",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    rt.unrecorded.wait_for_sends(bound)
    return count


def _collect_answers(rt: Runtime, console: Console) -> list[Accepted]:
    """A run its database stopped (gone past a lease, its disk full) waits, as Ctrl-C's stop
    does (:func:`_wait_for_answers`, up to ``WANBATCH_READ_TIMEOUT``), for the answers of the
    submit POSTs already on their way to fal, then its submit steps stop waiting for the
    database (:meth:`~worker.steps.unrecorded.Unrecorded.give_up`): returns the submissions fal
    accepted that the database could not take, kept in the journal for the next run to record.

    It ended at once, before: fal queued (and billed) those requests, nobody read their
    answers, and the next run settled their jobs ``submit_unknown`` after the lease. A Ctrl-C
    during the wait ends the wait only (no signal stopped the run: it is the first one); the
    run then ends with its line as it would have."""
    with contextlib.suppress(_Stop):
        _wait_for_answers(rt, console, exit_now="Ctrl-C to stop waiting")
    return rt.unrecorded.give_up(IN_FLIGHT_GRACE_SECONDS)


def _unanswered_words(rt: Runtime) -> str:
    """What becomes of submits whose answer a run exiting on the spot never read."""
    lease = f"WANBATCH_LEASE_SECONDS ({rt.settings.lease_seconds:.0f}s)"
    return f"fal may have accepted and billed them, and their outcome is settled after {lease}"


def _sync_log(engine: Engine) -> None:
    """Before ``run`` reports what it did (or why it stopped) and exits: every commit on disk,
    those that synced nothing of their own too (a success stored in a local folder, a status
    heard: :func:`jobs.db.covered`) — this process's, and those of the other processes that
    worked on the batch (the workers of a broker, a second run beside it) — so that a power cut
    after the report cannot take back what it said. A sync that fails is said, and the report
    still comes: the commits are in the database, only their surviving a power cut is in doubt."""
    try:
        db.sync_log(engine)
    except Exception as exc:
        log.warning(
            "could not sync the database before the report (%s): a power cut now could lose its last changes",
            db.database_problem(exc),
            extra={"event": "run.sync_failed"},
        )


def _stop_output_writes(rt: Runtime) -> None:
    """A run that stops under control (Ctrl-C, the database's full disk, a database gone) ends
    its process at once (``os._exit``, threads abandoned): its downloads under way stop first,
    each removing its temporary file, and what is still under way after
    :data:`STOP_WRITES_SECONDS` has its temporary files removed here
    (:meth:`worker.steps.output_writes.OutputWrites.stop`). Before, the next run swept them."""
    removed = rt.output_writes.stop(STOP_WRITES_SECONDS)
    if removed:
        log.debug(
            "removed %d temporary output file(s) of downloads still under way",
            removed,
            extra={"event": "run.partials_removed"},
        )


def _stopped_by_full_disk(rt: Runtime) -> DatabaseFullError:
    """The line a run ends with when the database's disk is full and no submission of this
    process waits to be recorded any more (the conductor waited for those): nothing more was
    sent; what fal holds is collected by the next run. A submission accepted while stopping
    (its POST was on its way) is kept in the journal, and named."""
    rt.unrecorded.give_up(IN_FLIGHT_GRACE_SECONDS)
    lost = rt.unrecorded.lost_words(rt.unrecorded.keep_all())  # a record still on its way: kept too
    then = (
        "run the same command again: it goes on where this run stopped (nothing more was sent; "
        "requests already at fal are collected then)"
    )
    full = db.disk_full_error(rt.settings.database_url, then=then)
    return DatabaseFullError(f"{full}; {lost}" if lost else str(full), where=full.where)


def serve_run_metrics(settings: Settings) -> Callable[[], None]:
    """This process's metrics on ``WANBATCH_METRICS_PORT`` for an embedded run (a port in use: a
    ConfigError that says which variable to change); without the setting nobody can read them,
    so nothing is counted (:func:`~worker.telemetry.count_nothing`). Returns what undoes either.
    With a broker, ``run`` only watches: the workers serve theirs."""
    from worker import telemetry

    stop = telemetry.serve_configured(settings)
    return stop if stop is not None else telemetry.count_nothing()


def leases_note(conductor: Conductor | None) -> str:
    """What an embedded run waits for while another process that does not work on its batch now
    (gone, or silent) holds leases on it that it cannot take back ("" when nothing): never a
    silent ``submitting:3`` for minutes, nor a cap's reason that is not the one. The progress
    line gives no ETA then (the pace says nothing of when the wait ends)."""
    if conductor is None or conductor.rt.dead_leases is None:
        return ""
    return conductor.rt.dead_leases.note()


def beside_note(conductor: Conductor | None) -> str:
    """The other live processes that work on an embedded run's batch too, whose leases come and
    go as they work ("" when none: :func:`jobs.listing.working_beside_note`): named beside the
    batch's ETA, not waited for (two runs of one batch showed "no ETA yet · waiting for 5 job(s)
    leased to … until …" to the end, the time moving forward as the other run worked)."""
    if conductor is None or conductor.rt.dead_leases is None:
        return ""
    return conductor.rt.dead_leases.beside()


def _nothing_to_stop() -> None:
    """What :func:`_process_embedded` stops when its caller serves the metrics."""


def _give_back(rt: Runtime, batch_id: str, *, kept: int = 0, stopped: str = "interrupted") -> str:
    """Give back this process's leases; returns the line that says what became of its jobs,
    beginning with ``stopped`` (what stopped the run).

    Waits up to :data:`IN_FLIGHT_GRACE_SECONDS` for POSTs already sent to be answered (their
    request ids recorded), so that the next run rarely has a ``submit_unknown`` to resolve.
    ``kept``: submissions fal accepted whose ids the database could not take, kept for the next
    run instead (:mod:`worker.steps.unrecorded`): not waited for, and not said to be unknown.
    """
    from jobs.processes import process_prefix
    from worker.steps.context import DOWNLOAD_QUEUE

    prefix = process_prefix()
    deadline = time.monotonic() + IN_FLIGHT_GRACE_SECONDS
    unsent = released = 0
    try:
        while True:
            proven = rt.unsent.noted()  # sends recorded as their commit failed: never made
            with db.session_scope(rt.engine) as session:
                got = store.release_process_leases(
                    session,
                    prefix,
                    batch_ids=[batch_id],
                    queued_owner=DOWNLOAD_QUEUE,
                    worker=rt.owner,
                    proven_unsent=proven,
                )
            for job_id in proven:
                rt.unsent.forget(job_id)
            unsent += got.unsent
            released += got.released
            if got.in_flight <= kept or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        with db.session_scope(rt.engine) as session:
            at_fal = store.count_in_states(
                session, [JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING], batch_id=batch_id
            )
    except Exception as exc:  # the database is unreachable: the leases expire on their own
        log.debug("giving leases back failed", exc_info=True, extra={"event": "run.give_back_failed"})
        if db.held_by_lock(exc):
            return _left_locked(rt, stopped)
        return (
            f"{stopped}; could not give this process's jobs back ({type(exc).__name__}): they "
            f"are picked up again after WANBATCH_LEASE_SECONDS ({rt.settings.lease_seconds:.0f}s)"
        )
    parts = [f"{stopped}: nothing more is sent"]
    if unsent:
        parts.append(f"{unsent} job(s) not yet sent went back to pending")
    if released:
        parts.append(f"{released} download(s)/status check(s) released")
    if at_fal:
        parts.append(f"{at_fal} request(s) still at fal: the next run fetches their results")
    if got.in_flight > kept:
        parts.append(
            f"{got.in_flight - kept} submission(s) were still in flight: the next run checks them "
            f"after WANBATCH_LEASE_SECONDS ({rt.settings.lease_seconds:.0f}s), never resending blindly"
        )
    return "; ".join(parts)


def _left_locked(rt: Runtime, stopped: str) -> str:
    """What a stopping run says when another process holds SQLite's write lock, or another
    session a PostgreSQL lock its give-back waited :data:`jobs.db.STOP_LOCK_WAIT_SECONDS` for
    (:func:`_give_back` found it so; that session named, :func:`jobs.db.lock_holders`): nothing
    was waited for (:func:`jobs.db.stop_waiting_for_lock`), nothing was given back, and nothing
    is lost — the database is the system of record, and what this process held on it is taken
    over by the next run once this process has ended (:mod:`worker.steps.dead_leases`; its
    claims and heartbeat as a dead process's)."""
    where = db.database_place(rt.settings.database_url) or "the database"
    holder = ""
    if rt.engine.dialect.name == "postgresql":
        holders = db.lock_holders(rt.engine)
        holder = "; " + (holders[0].said() if holders else "who holds the lock could not be read")
        locked = "is locked by another session"
    else:
        locked = "is locked by another process (a write transaction held open)"
    lease = f"WANBATCH_LEASE_SECONDS ({rt.settings.lease_seconds:.0f}s)"
    if rt.simulated:  # its simulator ends with this process: nothing of it can be paid twice
        next_run = (
            "the next --simulate run takes them, and this run's claim on the batch, over at once "
            "(this process will have ended)"
        )
    else:
        next_run = (
            "the next run on this host takes them back as soon as this process has ended (a "
            f"submission that may have reached fal after {lease}, checked, never resent blindly), "
            f"a run elsewhere after {lease}"
        )
    return (
        f"{stopped}: nothing more is sent; the database {where} {locked}, so this run did not "
        f"wait to give its jobs back: they stay as recorded, nothing is lost, and {next_run}{holder}"
    )


class _CapWatch:
    """Which caps hold the batch's unsent jobs back, for the progress line (:func:`cap_holds`,
    what ``status`` says too): asked only while jobs wait ``pending`` and nothing else (a pause,
    the schedule) holds them, and embedded only after dispatch found a cap full."""

    def __init__(self, batch_id: str, settings: Settings, rt: Runtime | None) -> None:
        self.batch_id = batch_id
        self.rt = rt
        self.settings = settings
        # Embedded, what this process's dispatch counts; watching, what the workers' leader
        # counts (every key's requests: CapScope.every_key).
        self.scope: CapScope = rt.cap_scope() if rt is not None else self.check.workers_scope()
        #: The caps (and whose jobs) last said in full: said again only when that changes.
        self._said: tuple[tuple[str, str | None, tuple[str, ...]], ...] = ()

    @property
    def check(self) -> CapCheck:
        """The caps as this process's dispatch applies them now: embedded, the strictest of the
        live processes' (:mod:`worker.steps.peer_limits`, changed at a heartbeat) and those that
        differ; from its fal queue's origin (a simulation's: its simulator's) and its own heartbeat."""
        rt = self.rt
        if rt is None:
            settings = self.settings
            return CapCheck.of(settings, api_key_id(settings), queue_origin(settings.fal_queue_url))
        return CapCheck.of(
            rt.settings, api_key_id(rt.settings), rt.queue_origin, rt.beat_owner, rt.peer_limits
        )

    def holds(self, session: Session, current: BatchProgress) -> list[CapHold]:
        """The caps holding the batch back now (empty: none, or not worth a query)."""
        if current["held"] or not current["counts"].get(JobState.PENDING.value, 0):
            return []
        if self.rt is not None and not self.rt.capped:
            return []
        return cap_holds(session, self.batch_id, self.scope, self.check)

    @staticmethod
    def alert(holds: list[CapHold]) -> str | None:
        """Which caps hold the batch back, without their counts: a plain line goes out when
        this changes (:meth:`PlainProgress.due`), not at every count that moves."""
        return " ".join(h.endpoint or h.kind for h in holds) or None

    def first_said(self, holds: list[CapHold]) -> str | None:
        """The full note of ``holds`` when they differ from the caps last said (None: the same,
        or none), so that a hold is explained once, not at every refresh."""
        key = tuple((h.kind, h.endpoint, tuple(i for i, _n, _j in h.holders)) for h in holds)
        if key == self._said or not holds:
            self._said = key
            return None
        self._said = key
        return cap_note(holds, self.batch_id)


def _uncancelled(
    session: Session, batch_id: str, current: BatchProgress, conductor: Conductor | None
) -> list[GivenUp]:
    """The requests of cancelled batch ``batch_id`` whose cancel this (embedded) run gave up,
    still at fal: their jobs ``queued`` or ``running`` on that very request."""
    if conductor is None or current["state"] != "cancelled":
        return []
    given_up = conductor.rt.cancel_tries.given_up()
    if not given_up:
        return []
    heads = store.job_heads(session, {g.job_id for g in given_up})
    at_fal = (JobState.QUEUED, JobState.RUNNING)
    return [
        g
        for g in given_up
        if (head := heads.get(g.job_id)) is not None
        and head.batch_id == batch_id
        and head.request_id == g.request_id
        and head.state in at_fal
    ]


def _stranded(
    session: Session, batch_id: str, settings: Settings, conductor: Conductor | None
) -> list[Stranded]:
    """The requests of batch ``batch_id`` sent with another API key that fal told the key that
    follows them it does not know, still unfinished: their jobs wait on that very request. Read
    from the database (:func:`jobs.store.refused_requests`), where the process that asked noted
    it: embedded, this run's key; watching the workers, theirs — every worker has the one key
    (``wanbatch worker`` refuses another), taken to be this process's when it has one, any key
    fal refused such a request to when it has none."""
    if conductor is not None:
        key: str | None = api_key_id(conductor.rt.settings)
    else:
        key = api_key_id(settings) if settings.fal_key and settings.fal_key.get_secret_value() else None
    return [
        Stranded(r.job_id, r.request_id, r.sent_with, r.key_id)
        for r in store.refused_requests(session, batch_id, key_id=key)
    ]


def _what_changes(conductor: Conductor) -> tuple[object, ...]:
    """What an embedded run knows in memory that its progress line depends on, or that tells
    the database may hold something new for it: the steps that ended, the conductor's rounds
    and ticks that did something (``ConductorStats.changes``), a budget's cancels, a cap found
    full, the notes of its own (limiter, database's disk, fal and download reach, leases
    waited for, other processes beside it), the cancels given up, a stop asked for. All cheap
    (no database, no network): compared at each look, it decides whether to read."""
    rt = conductor.rt
    return (
        rt.steps_ended.count,
        conductor.stats.changes,
        rt.budget_cancelled,
        rt.capped,
        unreachable_note(rt.limiter),
        rt.unrecorded.note(),
        rt.fal_reach.note(),
        rt.download_reach.note(),
        rt.download_trouble.note(),
        leases_note(conductor),
        beside_note(conductor),
        len(rt.cancel_tries.given_up()),
        _stop_requested.is_set(),
    )


def _pulse_says_on(engine: Engine, batch_id: str) -> bool:
    """Whether an embedded run that shows nothing may skip its full progress read: one statement
    (:func:`jobs.store.batch_pulse`) says the batch is active, not paused by its user, and has
    unfinished jobs, so nothing its end depends on is in sight.

    The full read (counts by state, money, the forecast's pace over the last finishes, the
    notes, what holds the batch back) is what a progress line shows; with none shown it only
    decides when the run ends, and it cost a 400-job drain about 0.6 ms of CPU a job (twice a
    second while jobs complete). It is still made every :data:`REFRESH_UNCHANGED_SECONDS`, for
    what only it says (a cap holding jobs back, webhooks fal never sends, requests left with
    another key), and at once when the pulse sees the batch finished, paused or cancelled."""
    with db.read_scope(engine) as session:
        pulse = store.batch_pulse(session, batch_id)
    return pulse is not None and pulse.goes_on


def _watch(
    batch_id: str,
    settings: Settings,
    console: Console,
    show_progress: bool,
    stats: RunStats,
    conductor: Conductor | None,
    *,
    again: str,
    still: Callable[[], bool] | None = None,
) -> None:
    """Conduct (embedded) and show progress until the batch is done or paused (``again``: how
    to go on then, see :func:`process_batch`); only watching (no ``conductor``), also until
    ``still()`` is False (:func:`watch_batch`).

    The loop runs in a thread of its own while the main thread only waits, so a signal never
    has to interrupt a database call or an HTTP request to be noticed; raises :class:`_Stop`
    when one asked to stop (after letting the loop finish the step it was in, briefly).
    Embedded, the loop is the :class:`~worker.conductor.Conductor`, reacting to fal's events
    and ticking as a safety net; distributed, the workers do that and this only watches.
    """
    engine = open_engine(settings)
    # Not a terminal (nohup, CI, `2> run.log`): a line redrawn in place would show only at the
    # end, so the same facts go out as plain lines now and then instead (PlainProgress). Whether
    # stderr really is one: FORCE_COLOR (common in CI) makes rich say so of any file; and a
    # terminal rich will not redraw on (TTY_COMPATIBLE=0, TERM=dumb) gets the plain lines too.
    live = redraws(console)
    plain = PlainProgress() if show_progress and not live else None
    # Fits 80 columns.
    progress = batch_progress_display(console, disable=not show_progress or plain is not None)
    failure: list[BaseException] = []
    finished = threading.Event()

    def shown(text: str) -> str:
        """Text from a manifest or from fal, for the console: inert controls, literal brackets."""
        return escape(printable(text))

    budget = RefreshBudget()
    silence = _SilenceWatch(settings.database_url)
    # fal's webhooks that never come (a receiver fal cannot reach): said once, in full.
    hooks = SilenceWatch(conductor.rt.settings if conductor is not None else settings, batch_id, utcnow())
    caps = _CapWatch(batch_id, settings, conductor.rt if conductor is not None else None)
    # The key and fal queue this run asks about (its runtime's: a simulation's are its simulator's).
    here = process_here(conductor.rt.settings if conductor is not None else settings)

    # Embedded: what the last read saw in memory (_what_changes), and when it read.
    seen: list[tuple[object, ...] | None] = [None]
    read_at = [0.0]
    # Embedded with nothing shown (--no-progress): when the last full read was (_pulse_says_on).
    full_at = [0.0]
    pulse_only = conductor is not None and not show_progress

    def refresh(task_id: TaskID) -> bool:
        """Show where the batch is; True when there is nothing more to wait for (False, with
        nothing read, while the refresh waits for its :class:`RefreshBudget`, and, embedded,
        while nothing changed since the last read for less than :data:`REFRESH_UNCHANGED_SECONDS`:
        the line keeps what it showed, its ETA included, until the next read)."""
        started = time.monotonic()
        if not budget.due(started):
            return False
        if conductor is not None:
            now_seen = _what_changes(conductor)
            if now_seen == seen[0] and started - read_at[0] < REFRESH_UNCHANGED_SECONDS:
                return False
            seen[0], read_at[0] = now_seen, started
        if pulse_only:
            if started - full_at[0] < REFRESH_UNCHANGED_SECONDS and _pulse_says_on(engine, batch_id):
                budget.spent(started, time.monotonic())
                silence.answered()
                return False
            full_at[0] = started
        # Another process's leases on the batch that this run waits out: whose, until when —
        # said instead of a cap's reason (the jobs they hold fill it) and of a forecast. Not those
        # of a live process working on the batch too (a second run of it): that one is named,
        # and the batch's pace, both runs' work, gives the ETA.
        leased = leases_note(conductor)
        beside = beside_note(conductor)
        with db.read_scope(engine) as session:
            current = batch_progress(
                session, batch_id, policy=settings.submit_unknown_policy, here=here, shown=not pulse_only
            )
            holds = [] if leased else caps.holds(session, current)
            uncancelled = _uncancelled(session, batch_id, current, conductor)
            stranded = _stranded(session, batch_id, settings, conductor)
            unheard = hooks.unsaid(session)
        budget.spent(started, time.monotonic())
        if unheard is not None:  # once, in full (as a cap's line)
            progress.console.print(f"[yellow]{shown(unheard)}[/yellow]")
        silence.answered()
        done = current["finished"]
        waiting = compact_note(current["schedule_state"]) if not current["schedule_open"] else ""
        # Embedded, this process submits: while its limiter's Redis does not answer, say so;
        # while the database's disk is full, what waits to be recorded and where to free space;
        # while fal cannot be reached, since when and how often a submit tries.
        held = unreachable_note(conductor.rt.limiter) if conductor is not None else None
        held = (conductor.rt.unrecorded.note() if conductor is not None else None) or held
        held = held or (conductor.rt.fal_reach.note() if conductor is not None else None)
        # While its downloads cannot connect (worker.steps.download_reach): the warning in full
        # once (its log line is drawn over by the display), then short on the line.
        if conductor is not None and (line := conductor.rt.download_reach.unshown()) is not None:
            progress.console.print(f"[yellow]{shown(line)}[/yellow]")
        held = held or (conductor.rt.download_reach.note() if conductor is not None else None)
        # While fal's media host answers its downloads 5xx/429 or drops them (a CDN outage).
        held = held or (conductor.rt.download_trouble.note() if conductor is not None else None)
        held = held or leased
        # A cap that holds the unsent jobs back, and whose jobs fill it: in full once, then short.
        if (line := caps.first_said(holds)) is not None:
            progress.console.print(f"[yellow]{shown(line)}[/yellow]")
        capped = printable(cap_note(holds, batch_id, short=True))
        progress.update(
            task_id,
            total=current["total"],
            completed=done,
            money=money_text(current["spent_usd"], current["estimated_usd"]),
            counts=current["counts"],
        )
        # The time left that `status` gives now (the pace of the last 10 minutes, by its rules,
        # jobs.listing.forecast): none for a batch paused or outside its schedule (it sends none
        # of its waiting jobs), and the schedule's caveat when it stops sending first. Not rich's
        # task.speed: its 30-second sampling made two jobs finishing within a second look like
        # a pace that ends the batch in seconds, before a window that closes first.
        task = next(t for t in progress.tasks if t.id == task_id)
        eta, eta_note = current["eta_seconds"], current["eta_note"]
        if leased:  # the pace of the jobs it had says nothing of when the wait ends
            eta, eta_note = None, None
        # What `status` says when nothing moves the batch though nothing holds it back: nothing
        # processes it (no worker alive, watching), the workers cannot reach the broker. Its
        # forecast is none then (batch_progress, by status's rule), and the line says why.
        stalled = current["standing"] if current["standing"] != current["held"] else ""
        # Jobs waiting for fal's webhook proof of their submit: until when, and what then (the
        # time left never ends before; status and the dashboard say the same words).
        proof = current["proof_wait_note"]
        # Requests sent with another API key or to another fal queue: this run does not ask
        # about them and does not end before another process settles them (status says so too).
        elsewhere = current["elsewhere_waiting_note"]
        # Its leases as last scanned (up to 2 s old): nothing of a finished batch is leased.
        beside = beside if done < current["total"] else ""
        notes = " · ".join(
            n for n in (waiting, held, stalled, capped, proof, elsewhere, beside, eta_note) if n
        )
        progress.update(
            task_id,
            # A scheduled batch outside its window says so, with the time left (the countdown).
            description=f"jobs · {notes}" if notes else "jobs",
            eta=eta,
            held=bool(current["standing"]),
        )
        # A batch that sends nothing more ends its run once what it paid for is collected: the
        # requests fal holds and the videos being downloaded (not only the former: paid videos
        # were left undownloaded, and nothing fetched them until `resume`).
        collecting = left_to_collect(current)
        # Past its deadline (or with no window opening before it) a user's pause holds nothing
        # back: the tick ends the unsent jobs (cancelled, reason `deadline`) and the run goes on
        # until what fal made is collected. Nor does it hold a cancelled batch's run back: that
        # goes on until every job is terminal.
        held_by_user = (
            current["paused_by_user"]
            and current["state"] != "cancelled"
            and current["schedule"].over(utcnow()) is None
        )
        # A cancelled batch whose every unfinished job is a request fal would not cancel (this
        # run gave up: worker.steps.cancel_tries) ends here, naming them, never waiting for ever;
        # so does a batch whose only unfinished jobs (those apart) are requests sent with another
        # API key that fal does not know for this one (worker.steps.other_key).
        left = {g.job_id for g in uncancelled} | {n.job_id for n in stranded}
        stuck = bool(left) and done + len(left) >= current["total"]
        ends = (
            done >= current["total"]
            or stuck
            or (collecting == 0 and (current["state"] == "paused" or held_by_user))
        )
        if plain is not None and plain.due(
            time.monotonic(),
            done,
            current["total"],
            final=ends,
            alert=held or stalled.partition(" (")[0] or caps.alert(holds),
        ):
            console.print(plain_line(task), markup=False, highlight=False, soft_wrap=True)
        if done >= current["total"]:
            return True
        if stuck:
            stranded_ids = {n.job_id for n in stranded}
            stats.uncancelled = [g for g in uncancelled if g.job_id not in stranded_ids]
            stats.stranded = stranded
            return True
        if current["state"] == "paused" and collecting == 0:
            reason = shown(current["pause_reason"] or "see status")  # fal's words, maybe
            # A missing input's reason names the ways on itself: "run the same command again"
            # would meet the same missing file when the project moved.
            then = f"; fix it, then {shown(again)} to resume"
            if store.paused_for_inputs(current["pause_reason"]):
                then = ""
            progress.console.print(f"[yellow]batch paused: {reason}{then}[/yellow]")
            return True
        if held_by_user and collecting == 0:
            ref = shell_ref(current["name"], batch_id)
            # A schedule closed too (the window ended while paused): resuming sends nothing
            # before it opens, which `status` says in the same words.
            closed = paused_schedule_text(current["paused_schedule_state"])
            paused = f"paused by its user; {shown(closed)}" if closed else "paused by its user"
            progress.console.print(
                f"[yellow]batch {paused}: `wanbatch resume {ref}`, then {shown(again)} to go on[/yellow]"
            )
            return True
        return False

    def loop(task_id: TaskID) -> None:
        try:
            if conductor is not None:
                conductor.run(_stop_requested, on_progress=lambda: refresh(task_id))
                stats.status_calls += conductor.stats.status_calls + conductor.stats.streams
                return
            # Watching the workers: a database that is unavailable for a while is waited out
            # (the workers ride it out too), up to a lease (WANBATCH_LEASE_SECONDS).
            outage = DatabaseOutage(
                "the run (watching the workers)", patience=settings.lease_seconds, url=settings.database_url
            )
            while not _stop_requested.is_set():
                try:
                    if refresh(task_id) or (still is not None and not still()):
                        return
                except Exception as exc:
                    if not db.is_unavailable(exc):
                        raise
                    outage.failed(exc, _stop_requested)
                    continue
                outage.answered()
                _stop_requested.wait(settings.tick_interval)
        except BaseException as exc:  # handed to the main thread, which raises it
            failure.append(exc)
        finally:
            finished.set()

    with progress:
        task_id = progress.add_task("jobs", total=None, money="", counts={})
        thread = threading.Thread(target=loop, args=(task_id,), name="wanbatch-run-loop", daemon=True)
        _waiting.set()
        try:
            if _stop_requested.is_set():  # a signal came while the batch was being stored
                raise _Stop
            thread.start()
            while not finished.wait(0.2):
                if _stop_requested.is_set():
                    break
                silence.check()
        finally:
            _waiting.clear()
        if _stop_requested.is_set():
            # The loop stops at its next step; a claim it is committing right now lands before
            # the leases are given back. A slow status call is not waited for: after it the
            # loop sees the flag and claims nothing more.
            finished.wait(STOP_WAIT_SECONDS)
            raise _Stop
    if failure:
        raise failure[0]
