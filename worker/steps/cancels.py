"""The cancels a tick sends to fal, off the conductor's loop and within a bound.

A cancel is one PUT (:meth:`worker.fal.client.FalClient.cancel`), bounded only by the connect
and read timeouts. The tick sent its cancels — ``wanbatch cancel``'s
(:func:`worker.steps.reconcile.cancel_jobs_of_cancelled_batches`), a window's end or a deadline's
(:func:`worker.steps.schedule.enforce_schedules`) — on the conductor's loop, one after
another: to a fal that accepts connections and never answers (a stalled proxy, a laptop just
resumed) each waited its timeouts, and meanwhile the conductor wrote no heartbeat (``status``
then said "nothing is processing it" and advised a second run), showed no progress, sent
nothing and checked no deadline. The status polls of a tick were bounded first
(:data:`worker.steps.poll.STATUS_POLL_SECONDS`); the cancels now are too.

Their ORDER matters (a cancel sent out of order can get a request billed:
:func:`~worker.steps.reconcile.cancel_jobs_of_cancelled_batches`), so they are not sent in
parallel as the polls are: each step's cancels go as one sequence, in its order, on a thread of
their own (:func:`in_lane`), all within :data:`CANCEL_SECONDS`. Every network wait of a cancel
ends by then (:func:`~worker.fal.http.cut_off_at`), and a cancel not begun by then is not sent.
A cancel nothing answered in time is "not known yet" (:meth:`CancelRound.send` returns None):
never a failed try (:mod:`worker.steps.cancel_tries`), never recorded as cancelled; the next
tick sends it again, in its order. The tick waits for the sequence at most
:data:`CANCEL_GRACE_SECONDS` longer; one still under way then is left behind, and no other
sequence starts (:attr:`~worker.steps.context.Runtime.cancel_lane` is held) until it ends, so a
cancel is never sent twice at once, nor two sequences' out of order.

Not a late answer's cancel (:func:`worker.steps.reconcile._settle_late`): nothing sends that one
again, so it must be sent, and its outcome booked, exactly once. On a thread left behind (or
waiting behind a sequence left behind) it could be lost with the process — ``run`` ending, the
request accepted and billed at fal and recorded nowhere. It is settled on its caller, as a
submit step settles the late answers it meets (rare: a submit answered after its job moved on).

A round none of whose cancels met a server says fal cannot be reached, as a poll does
(:mod:`worker.steps.fal_reach`): submits are held and ``run``'s progress line and ``status``
say so; a round fal answered (anything over HTTP) says it can.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from jobs.errors import ProviderError
from worker.fal.errors import UNREACHED
from worker.fal.http import cut_off_at
from worker.fal.models import CancelOutcome, RequestHandle
from worker.steps.context import Runtime

log = logging.getLogger(__name__)

#: The most one step's cancels wait on fal, all of them together, in seconds (as a poll's
#: status calls: :data:`worker.steps.poll.STATUS_POLL_SECONDS`). A cancel's answer is a few
#: bytes; one not answered by then is sent again at the next tick.
CANCEL_SECONDS = 5.0
#: How much longer the tick waits for a sequence's thread (its database writes) before it
#: leaves it behind: the conductor's loop never waits on fal for longer, whatever a client does.
CANCEL_GRACE_SECONDS = 3.0

_T = TypeVar("_T")


@dataclass(slots=True)
class CancelRound:
    """One sequence of cancels and its deadline (``time.monotonic()``), and what fal made of
    them so far."""

    rt: Runtime
    deadline: float
    seconds: float = CANCEL_SECONDS
    #: Cancels fal answered (a cancel outcome, or an HTTP error).
    answered: int = 0
    #: Why each cancel that met no server (cut short by the deadline, or its connection failed).
    unreached: list[str] = field(default_factory=list)
    #: Cancels nothing answered within the deadline, or not sent before it: tried next tick.
    unanswered: int = 0

    def over(self) -> bool:
        """Whether the deadline has passed: nothing more is sent this round."""
        return time.monotonic() >= self.deadline

    def send(self, handle: RequestHandle) -> CancelOutcome | None:
        """Ask fal to cancel ``handle`` within the round's deadline: fal's answer, or None when
        nothing answered by then (or the deadline had passed: not sent) — not known yet, never
        a failure. fal's refusal, a connection that failed, raise as ever
        (:class:`~jobs.errors.ProviderError`)."""
        if self.over():
            self.unanswered += 1
            return None
        late = f"no answer within {self.seconds:g}s (this tick's bound on cancels); sent again next tick"
        with cut_off_at(self.deadline, late) as cut:
            try:
                outcome = self.rt.client.cancel(handle)
            except ProviderError as exc:
                if cut is not None and cut.hit:
                    self.unanswered += 1
                    self.unreached.append(late)
                    return None
                if isinstance(exc.__cause__, UNREACHED):
                    self.unreached.append(str(exc))
                else:
                    self.answered += 1
                raise
        self.answered += 1
        return outcome

    def judge_reach(self) -> None:
        """What the round says of whether fal can be reached (:mod:`worker.steps.fal_reach`)."""
        if self.answered:
            self.rt.fal_reach.answered()
        elif self.unreached:
            said = self.unreached[0]
            self.rt.fal_reach.failed(f"{len(self.unreached)} cancel(s) unanswered: {said}", probe=False)


def in_lane(rt: Runtime, what: str, sequence: Callable[[CancelRound], _T]) -> _T | None:
    """Run ``sequence`` (a step's cancels, in their order, and the writes that follow each) on a
    thread of its own, with a :class:`CancelRound` whose deadline is :data:`CANCEL_SECONDS`
    away; wait for it at most :data:`CANCEL_GRACE_SECONDS` longer. Its result, or None when it
    did not run (another sequence of this runtime is still under way: tried next tick) or was
    left behind (its thread ends with its last write; its result is dropped).

    A thread that cannot be started (``RuntimeError: can't start new thread``: the process's
    or the system's thread limit) gives the lane back before the error is raised: only the
    thread's own end releases it otherwise, and a lane held for ever skipped every later tick's
    cancels — ``wanbatch cancel``'s, a window's end's — in silence."""
    lane = rt.cancel_lane
    if not lane.acquire(blocking=False):
        log.info(
            "%s: the cancels of an earlier tick are still under way (fal answers slowly); sent next tick",
            what,
            extra={"event": "cancel.lane_busy"},
        )
        return None
    seconds = CANCEL_SECONDS
    done: list[_T] = []
    failed: list[BaseException] = []
    left = threading.Event()  # the caller stopped waiting: an error is said here, not raised

    def body() -> None:
        round_ = CancelRound(rt, time.monotonic() + seconds, seconds)
        try:
            done.append(sequence(round_))
            round_.judge_reach()
        except BaseException as exc:
            failed.append(exc)
            if left.is_set():
                log.warning(
                    "%s: cancels left behind ended with %s: %s",
                    what,
                    type(exc).__name__,
                    exc,
                    extra={"event": "cancel.left_failed"},
                )
        finally:
            lane.release()

    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(body,), name="wanbatch-cancel", daemon=True
    )
    try:
        thread.start()
    except Exception:  # raised by _start_new_thread, before any thread exists: body never runs
        lane.release()  # nothing else would give the lane back
        raise
    thread.join(seconds + CANCEL_GRACE_SECONDS)
    if thread.is_alive():
        left.set()
        if thread.is_alive():
            log.info(
                "%s: cancels still under way after %gs are left to finish on their own; the tick goes on",
                what,
                seconds + CANCEL_GRACE_SECONDS,
                extra={"event": "cancel.left_behind"},
            )
            return None
    if failed:
        raise failed[0]
    return done[0] if done else None
