"""Poll: ask fal for the status of due in-flight jobs, batched, with an interval that grows
with the time waited; completed jobs go on to download. No worker slot waits on fal."""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Collection, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from jobs import billing, db, open_files, store
from jobs.errors import (
    AccountLockedError,
    FinalProviderError,
    ProviderError,
    RetryableProviderError,
    WanbatchError,
)
from jobs.models import USER_CANCELLED, BatchState, Job, JobSnapshot, utcnow
from jobs.settings import Settings
from jobs.store import Fence
from worker import logs, telemetry
from worker.fal.errors import UNREACHED, ProviderProtocolError
from worker.fal.http import cut_off_at
from worker.fal.models import RequestHandle, Status
from worker.steps.context import DOWNLOAD_QUEUE, DownloadClaim, Runtime, S, handle_of, in_seconds
from worker.steps.download import handed_claim
from worker.steps.failures import billed, describe, failure_type, pause_for_account
from worker.steps.schedule import (
    DEADLINE,
    WINDOW_CLOSED,
    closed_by,
    end_unstarted,
    start_timeout_expired,
    timed_out_unstarted,
)

log = logging.getLogger(__name__)

#: Malformed status answers for one request before its job fails (instead of polling forever).
PROTOCOL_ERROR_LIMIT = 5

#: The most one poll waits on fal, all its status calls together, in seconds: a status answer
#: is a few hundred bytes. A call not answered by then (a network that accepts connections and
#: never answers: a stalled proxy, a laptop just resumed) is "not known yet", asked again at
#: the next poll interval — never a failure, never a try of its job. Without it, a tick waited
#: up to three tries of the connect and read timeouts per job, the conductor's loop with it
#: (no heartbeat, no progress line, no dispatch, no deadline) for minutes.
STATUS_POLL_SECONDS = 5.0
#: How many status calls of one poll are in flight at once (issue #11); the open-file budget of
#: the status streams keeps room for them (:func:`jobs.open_files.streams_that_fit`).
STATUS_THREADS = open_files.STATUS_CALLS_AT_ONCE
#: How much longer than :data:`STATUS_POLL_SECONDS` a poll waits for its calls' threads (their
#: retries' short sleeps) before it leaves a call that still runs behind: the conductor's loop
#: never waits on fal for longer, whatever a client does.
STATUS_GRACE_SECONDS = 3.0


def first_poll_at(settings: Settings, submitted_at: datetime) -> datetime:
    """When a job fal just accepted is first asked about: soon, or — with a webhook receiver,
    which tells us of the completion — ``webhook_poll_after`` later, polling being only the
    safety net for a webhook that never came."""
    wait = settings.webhook_poll_after if settings.webhook_url else settings.poll_min_interval
    return submitted_at + timedelta(seconds=wait)


def _next_poll(
    settings: Settings, submitted_at: datetime | None, now: datetime, *, streamed: bool = False
) -> datetime:
    """Poll often at first, then back off as the job waits (a quarter of the time waited);
    with a webhook receiver, never more often than ``webhook_poll_after``. A job a status
    stream follows (``streamed``) is asked about only every ``poll_max_interval``: the stream
    tells of its end, the poll is there for a stream that never does."""
    if streamed:
        return now + timedelta(seconds=settings.poll_max_interval)
    waited = (now - submitted_at).total_seconds() if submitted_at else 0.0
    interval = min(settings.poll_max_interval, max(settings.poll_min_interval, waited / 4))
    if settings.webhook_url:
        interval = max(interval, settings.webhook_poll_after)
    return now + timedelta(seconds=interval)


def poll(
    rt: Runtime, limit: int = 200, *, exclude: Collection[str] = (), streamed: Collection[str] = ()
) -> int:
    """Ask fal for the status of every due in-flight job; returns how many status calls were made.

    Every batch's, even with a batch scope (``rt.batch_ids``): a status call costs nothing, and
    the outstanding cap counts every request at fal for the key, so requests another batch left
    at fal (an interrupted run) must still be seen to finish or they would hold the cap forever.
    Only the scope's completed jobs are downloaded here; another batch's wait, unleased, in
    ``downloading`` for a run of that batch (or a worker). ``exclude``: jobs a status stream
    has followed for a short while (:mod:`worker.watcher`); asking for them too would only cost
    calls. ``streamed``: jobs a stream has followed for longer, asked about when due like any
    other, then again only after ``poll_max_interval`` (a stream that stays open without ever
    saying COMPLETED must not hold its job).
    Never the requests of another provider (:meth:`~worker.steps.context.Runtime.reach`): a
    ``--simulate`` run asks its simulator about its own batch only, fal is never asked about a
    simulation's requests, and a request sent to another fal queue URL is left to a process of
    that queue. A request sent with another API key is asked about (a key of the same account
    may), but fal's "not found" or refusal of it is not final (:func:`_not_ours`): the job
    waits for a process with its key.
    """
    now = utcnow()
    with db.session_scope(rt.engine) as session:
        reach = rt.reach(session)
        due = store.claim_jobs(
            session,
            states=[S.QUEUED, S.RUNNING, S.CANCELLING],
            limit=limit,
            now=now,
            owner=rt.owner,
            lease_seconds=rt.settings.lease_seconds,
            exclude_ids=exclude,
            batch_ids=reach.batch_ids,
            exclude_batch_ids=reach.exclude_batch_ids,
            sent_to=reach.sent_to,
        )
        snapshot = [(rt.fence(j), handle_of(j, rt.settings.fal_queue_url), j.submitted_at) for j in due]
        job_of = {j.id: j for j in due}  # read as rows: usable after the session
        elsewhere = {j.id for j in due if not rt.in_scope(j.batch_id)}
        batch_of = {j.id: j.batch_id for j in due}
    answers = _ask(rt, [(fence.job_id, handle, batch_of[fence.job_id]) for fence, handle, _ in snapshot])
    _judge_reach(rt, answers)
    calls = 0
    for fence, handle, submitted_at in snapshot:
        job_id = fence.job_id
        # Every line about this job names it (README › Logs): httpx's line of the status call too.
        with logs.job_context(job_id, batch_id=batch_of[job_id], request_id=handle.request_id):
            calls += 1
            try:
                status = _answer(answers[job_id])
            except AccountLockedError as exc:
                # The account, not the request: pause the batch, keep the job, and ask again later —
                # the request is still at fal, running and billed, whatever our key's state.
                telemetry.count_provider_error(exc)
                if (sent := rt.sent_elsewhere(job_of[job_id])) is not None:  # not the sender's account
                    _not_ours(rt, fence, handle, sent, exc, rt.other_key(job_of[job_id]))
                    continue
                log.debug(  # the pause itself is said once, by pause_for_account
                    "job %s: status refused for the account (%s); batch paused",
                    job_id,
                    exc,
                    extra={"event": "poll.account_refused", "job_id": job_id, "batch_id": batch_of[job_id]},
                )
                with db.session_scope(rt.engine) as session:
                    pause_for_account(session, rt, batch_of[job_id], exc)
                    store.release_lease(
                        session, fence, next_attempt_at=in_seconds(rt.settings.poll_max_interval)
                    )
                continue
            except ProviderProtocolError as exc:
                telemetry.count_provider_error(exc)
                _protocol_error(rt, fence, handle, submitted_at, exc)
                continue
            except FinalProviderError as exc:
                telemetry.count_provider_error(exc)
                # "not found" for this key, or by this run's simulator: no proof the request is lost
                if (sent := rt.sent_elsewhere(job_of[job_id])) is not None:
                    _not_ours(rt, fence, handle, sent, exc, rt.other_key(job_of[job_id]))
                    continue
                with db.session_scope(rt.engine) as session:
                    if gone_after_our_cancel(session, fence, exc, now=utcnow()):
                        continue
                    _lost(session, fence, exc, simulated=rt.simulated)
                continue
            except ProviderError as exc:
                telemetry.count_provider_error(exc)
                log.info(
                    "job %s: status failed (%s); will ask again",
                    job_id,
                    exc,
                    extra={"event": "poll.status_failed", "job_id": job_id, "request_id": handle.request_id},
                )
                with db.session_scope(rt.engine) as session:
                    store.release_lease(
                        session, fence, next_attempt_at=_next_poll(rt.settings, submitted_at, utcnow())
                    )
                continue
            _apply_status(
                rt,
                fence,
                status,
                submitted_at,
                download=job_id not in elsewhere,
                streamed=job_id in streamed,
                sent_with=getattr(job_of[job_id], "api_key_id", None),
                request_id=handle.request_id,
            )
    return calls


@dataclass(slots=True)
class _Answer:
    """What one status call of a poll came to: its status, its error, or neither (not answered
    within the poll's deadline, or not asked before it: ``unanswered`` says why)."""

    status: Status | None = None
    error: Exception | None = None
    unanswered: str = ""
    #: The call met no server at all: its connection failed, or the deadline cut it short.
    unreached: bool = False


def _answer(answer: _Answer) -> Status:
    if answer.status is not None:
        return answer.status
    if answer.error is not None:
        raise answer.error
    raise RetryableProviderError(f"fal status: {answer.unanswered}")


def _ask(rt: Runtime, asks: Sequence[tuple[str, RequestHandle, str]]) -> dict[str, _Answer]:
    """Ask fal for the status of each ``(job id, handle, batch id)``, at most
    :data:`STATUS_THREADS` at once, off the calling thread (the conductor's loop), all within
    :data:`STATUS_POLL_SECONDS`: every network wait of every call ends by then
    (:func:`~worker.fal.http.cut_off_at`, as every exchange is bounded by its own), a call not
    begun by then is not made, and one whose thread is still busy after
    :data:`STATUS_GRACE_SECONDS` more is left behind. Each answer is its status, its error, or
    neither (:class:`_Answer`)."""
    answers = {job_id: _Answer() for job_id, _, _ in asks}
    if not asks:
        return answers
    seconds = STATUS_POLL_SECONDS
    deadline = time.monotonic() + seconds
    late = f"no answer within {seconds:g}s (this poll's deadline); asked again at the next poll"

    def one(job_id: str, handle: RequestHandle, batch_id: str) -> None:
        answer = answers[job_id]
        if time.monotonic() >= deadline:
            answer.unanswered = (
                f"not asked within {seconds:g}s (this poll's deadline); asked at the next poll"
            )
            return
        with (
            logs.job_context(job_id, batch_id=batch_id, request_id=handle.request_id),
            cut_off_at(deadline, late) as cut,
        ):
            try:
                answer.status = rt.client.status(handle)
            except Exception as exc:
                answer.error = exc
                answer.unreached = (cut is not None and cut.hit) or isinstance(exc.__cause__, UNREACHED)

    pool = ThreadPoolExecutor(
        max_workers=min(STATUS_THREADS, len(asks)), thread_name_prefix="wanbatch-status"
    )
    try:
        futures: list[Future[None]] = [
            pool.submit(contextvars.copy_context().run, one, job_id, handle, batch_id)
            for job_id, handle, batch_id in asks
        ]
        wait(futures, timeout=seconds + STATUS_GRACE_SECONDS, return_when=FIRST_EXCEPTION)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    for (job_id, _, _), future in zip(asks, futures, strict=True):
        answer = answers[job_id]
        if not future.done() or future.cancelled():
            # Left behind (its thread ends with its call): its status, should it come, is dropped.
            answers[job_id] = _Answer(unanswered=late, unreached=True)
        elif (exc := future.exception()) is not None:  # BaseException outside ``one``'s except
            raise exc
        elif answer.status is None and answer.error is None and not answer.unanswered:
            answer.unanswered = late
    return answers


def _judge_reach(rt: Runtime, answers: dict[str, _Answer]) -> None:
    """fal's answers to a poll tell whether it can be reached (:mod:`worker.steps.fal_reach`):
    any answer at all (a status, an HTTP error) says it can; a poll none of whose calls met a
    server (each cut short by its deadline, or its connection failing) says it cannot — ``run``'s
    progress line and ``status`` then say so, and submits are held as after a failed connect."""
    reached = [
        a for a in answers.values() if a.status is not None or (a.error is not None and not a.unreached)
    ]
    if reached:
        if any(getattr(a.error, "status_code", 0) or a.status is not None for a in reached):
            rt.fal_reach.answered()
        return
    unreached = [a for a in answers.values() if a.unreached]
    if not unreached:
        return
    first = unreached[0]
    said = first.unanswered or (str(first.error) if first.error is not None else "no answer")
    rt.fal_reach.failed(f"{len(unreached)} status check(s) unanswered: {said}", probe=False)


def _not_ours(
    rt: Runtime, fence: Fence, handle: RequestHandle, sent: str, exc: WanbatchError, key: str | None = None
) -> None:
    """fal said "not found" (or refused) about a request ``sent`` with another API key, or a
    simulation's request another live process's simulator accepted
    (:meth:`~worker.steps.context.Runtime.sent_elsewhere`): no proof of anything — a key of
    another account is told that another account's request does not exist, and a simulator
    knows only its own. The job keeps its request (never failed, never resent, its batch never
    paused) and is asked about again after the longest poll interval; a process that can ask
    about it (with the key it was sent with: its own run, or workers configured with it; the
    process of that simulator) settles it. A request of another key (``key``, its id) is noted,
    in the database too (:meth:`~worker.steps.context.Runtime.key_refused`): a run ends once only
    such are left, workers' or its own. Said as a warning the first time this process meets it,
    at debug level at every later poll."""
    first = rt.key_refused(fence.job_id, handle.request_id, key) if key is not None else True
    log.log(
        logging.WARNING if first else logging.DEBUG,
        "job %s: fal answered %s about request %s, %s: not taken as final; waiting for a process "
        "that can ask about it",
        fence.job_id,
        exc,
        handle.request_id,
        sent,
        extra={"event": "poll.other_key", "job_id": fence.job_id, "request_id": handle.request_id},
    )
    with db.session_scope(rt.engine) as session:
        store.release_lease(session, fence, next_attempt_at=in_seconds(rt.settings.poll_max_interval))


def _protocol_error(
    rt: Runtime,
    fence: Fence,
    handle: RequestHandle,
    submitted_at: datetime | None,
    exc: ProviderProtocolError,
) -> None:
    """A status answer fal's protocol cannot produce (unknown state, not an object, nested
    absurdly deep): ask again, counting them in ``download_attempts`` (unused before download);
    after :data:`PROTOCOL_ERROR_LIMIT` the job fails with the reason instead of being polled
    forever, and fal is asked to cancel the request (best effort: it may run and bill anyway)."""
    job_id = fence.job_id
    with db.session_scope(rt.engine) as session:
        count = store.get_job(session, job_id).download_attempts + 1
        if count < PROTOCOL_ERROR_LIMIT:
            log.warning(
                "job %s: malformed status answer %d (%s); will ask again",
                job_id,
                count,
                exc,
                extra={"event": "poll.malformed_status", "job_id": job_id, "request_id": handle.request_id},
            )
            store.release_lease(
                session,
                fence,
                next_attempt_at=_next_poll(rt.settings, submitted_at, utcnow()),
                download_attempts=count,
            )
            return
    try:
        rt.client.cancel(handle)
    except WanbatchError as cancel_error:
        log.info(
            "job %s: cancel after malformed status answers failed: %s",
            job_id,
            cancel_error,
            extra={"event": "poll.cancel_failed", "job_id": job_id, "request_id": handle.request_id},
        )
    reason = f"fal's status answers broke its protocol {count} times: {exc}"
    # Billed as a cancel: a request that was running has used GPU time; a queued one has not.
    queued = fence.state == S.QUEUED
    outcome = billing.Outcome.CANCELLED_IN_QUEUE if queued else billing.Outcome.CANCELLED_RUNNING
    with db.session_scope(rt.engine) as session:
        job = store.get_job(session, job_id)
        store.fail_job(
            session,
            fence,
            error=reason,
            error_type="provider_protocol_error",
            download_attempts=count,
            **billed(job, outcome),
        )


def _lost(session: Session, fence: Fence, exc: ProviderError, *, simulated: bool) -> None:
    """fal's status gave a final answer about the job's request that was no status: it does not
    know it (404, ``request_not_found``), or refuses to say. The job fails, for good: we can no
    longer follow it. A request fal does not know that we saw run (fal said IN_PROGRESS, or
    reported inference time) may have run to the end and been billed — fal bills a request a
    runner took, as a cancel of one is billed as running — so its estimate is counted as
    possibly billed (:func:`jobs.store.fail_lost_request`), and its error says so; one only ever
    seen in fal's queue never ran, and is billed nothing ("never charged for … time spent waiting
    in the queue", https://fal.ai/docs/documentation/model-apis/pricing). A ``--simulate`` run's
    request (``simulated``: only its own run asks about it) was never at a provider that bills:
    nothing is counted (:func:`jobs.store.fail_lost_request`), and its error says so."""
    why = describe(exc)
    kind = failure_type(exc)
    job = store.get_job(session, fence.job_id)
    ran = kind == "request_not_found" and (billing.ran(job.provider_metrics) or _seen_running(session, fence))
    error = f"provider lost the request: {why}"
    if ran and simulated:
        error += "; it had started running (a simulation: nothing was billed)"
    elif ran:
        error += (
            "; it had started running at fal, which may have run it to the end and billed it: its "
            "estimate is counted as possibly billed"
        )
    store.fail_lost_request(session, fence, reason=f"status: {why}", error=error, error_type=kind, ran=ran)


#: fal's ``error_type`` for a request cancelled at a client's request (ours: a cancel we sent).
CLIENT_CANCELLED = "client_cancelled"


def _cancel_outcome(status: Status, *, seen_running: bool) -> billing.Outcome:
    """How a request we asked to cancel ended, for billing: cancelled (queued or running) or an
    error. One that fal had already timed out in its queue (the start timeout it carried) never
    ran: billed as cancelled there. ``seen_running``: we saw it IN_PROGRESS ourselves
    (:func:`_seen_running`), so it ran, whatever metrics the answer carries."""
    if status.error_type in (None, CLIENT_CANCELLED):
        return billing.classify_cancel(status.metrics, seen_running=seen_running)
    if timed_out_unstarted(status):
        return billing.Outcome.CANCELLED_IN_QUEUE
    return billing.classify_failure(None, status.error_type, status.metrics)


def _seen_running(session: Session, fence: Fence) -> bool:
    """Whether the job's current request was seen IN_PROGRESS: it is ``running``, or its history
    since its last submit has it there (``running`` → ``cancelling``)."""
    return fence.state == S.RUNNING or store.seen_running_since_submit(session, fence.job_id)


#: What :func:`_ended_by_our_cancel` answers for the user's cancel (``wanbatch cancel``); the
#: schedule's are :data:`~worker.steps.schedule.WINDOW_CLOSED` and
#: :data:`~worker.steps.schedule.DEADLINE`.
USER_CANCEL = "user"


def _ended_by_our_cancel(session: Session, fence: Fence, status: Status, *, now: datetime) -> str | None:
    """Why ``status`` is fal's answer to a cancel we asked for — :data:`USER_CANCEL`, or the
    batch's schedule (``window_closed``, ``deadline``) — or None when it is not ours.

    The job is ``cancelling`` (its ``error_type`` says whether the schedule asked: only a
    ``cancelling`` job's does, an earlier attempt's may linger otherwise); or fal ended its
    ``queued``/``running`` request as ``client_cancelled`` while the batch is cancelled, or while
    its schedule has closed (:func:`~worker.steps.schedule.closed_by` at ``now``). Our cancel was
    sent, and fal's answer (a status stream, a poll) came before the job's own move to
    ``cancelling`` was stored (it is sent first, then stored), or instead of it: the move found
    the job ``running`` (seen so after the cancel's step read it ``queued``), or was never made.
    """
    job = store.get_job(session, fence.job_id)
    if fence.state == S.CANCELLING:
        return job.error_type if job.error_type in (WINDOW_CLOSED, DEADLINE) else USER_CANCEL
    if fence.state not in (S.QUEUED, S.RUNNING) or status.error_type != CLIENT_CANCELLED:
        return None
    batch = store.get_batch(session, job.batch_id)
    if batch.state == BatchState.CANCELLED:
        return USER_CANCEL
    return closed_by(store.batch_schedule(batch), now)


def gone_after_our_cancel(session: Session, fence: Fence, exc: ProviderError, *, now: datetime) -> bool:
    """fal's status answered 404 ("request not found") for a job whose request we asked it to
    cancel (``cancelling``): fal lists NOT_FOUND among a cancel's outcomes, and removes a request
    it cancelled from its queue. The job ends as the cancel meant it to — ``cancelled`` for the
    user's (``wanbatch cancel``) or the deadline's, back for the next window for a window's end
    (:func:`~worker.steps.schedule.end_unstarted`) — never ``failed`` as a request fal lost, which
    ``rerun --failed-only`` would render again. So is a ``queued``/``running`` one of a cancelled
    batch, or of one whose schedule has closed: our cancel was sent, and its move to
    ``cancelling`` not stored yet (its answer came after the cancels' deadline, or not at all).
    Billed as any cancel fal confirmed: in its queue
    (nothing) unless we saw it running (:func:`_seen_running`), that bill taken back should fal's
    webhook prove it ran to the end after all. False (nothing done) for any other job or error."""
    if fence.state not in (S.CANCELLING, S.QUEUED, S.RUNNING) or exc.status_code != 404:
        return False
    job = store.get_job(session, fence.job_id)
    if fence.state == S.CANCELLING:
        why: str | None = job.error_type if job.error_type in (WINDOW_CLOSED, DEADLINE) else USER_CANCEL
    else:  # our cancel sent, its move to ``cancelling`` not stored yet (as in _ended_by_our_cancel)
        batch = store.get_batch(session, job.batch_id)
        why = (
            USER_CANCEL
            if batch.state == BatchState.CANCELLED
            else closed_by(store.batch_schedule(batch), now)
        )
        if why is None:
            return False
    outcome = billing.classify_cancel(job.provider_metrics, seen_running=_seen_running(session, fence))
    how = f"fal no longer knows the request after our cancel ({describe(exc)})"
    if why != USER_CANCEL:
        end_unstarted(
            session, fence, job, Status(state="COMPLETED"), why=why, how=how, now=now, outcome=outcome
        )
        return True
    end_user_cancel(session, fence, job, outcome, reason=how, now=now)
    return True


def end_user_cancel(
    session: Session,
    fence: Fence,
    job: Job,
    outcome: billing.Outcome,
    *,
    reason: str,
    now: datetime,
    provider_metrics: dict[str, Any] | None = None,
) -> bool:
    """→ ``cancelled``: the user's cancel ended the job's request at fal, ``reason`` saying how
    (fal's ``client_cancelled`` end, or its 404 after our cancel), billed as ``outcome``. Both
    record :data:`~jobs.models.USER_CANCELLED`, as the cancel of a job never sent does: the
    COMPLETED end recorded fal's ``client_cancelled`` and the 404 ``cancelled``, so ``status``
    and exports showed one cancel as two reasons."""
    return store.mark_cancelled(
        session,
        fence,
        reason=reason,
        error="cancelled by user",
        error_type=USER_CANCELLED,
        completed_at=now,
        provider_metrics=provider_metrics,
        details={store.CANCEL_BILLED_AS: outcome.value},  # taken back should fal prove a run
        **billed(job, outcome),
    )


def record_completion(
    session: Session,
    fence: Fence,
    status: Status,
    *,
    now: datetime,
    download_queued_until: datetime | None = None,
    download_owner: str = DOWNLOAD_QUEUE,
    row: dict[str, Any] | None = None,
) -> bool:
    """fal says the request is COMPLETED (a status answer or a webhook): the job goes on to
    ``downloading`` — or, ended by a cancel we asked for, to ``cancelled``, billed by whether
    the request ran (fal's metrics, or our own sight of it running).

    Compare-and-set on ``fence``, so a poll and a webhook racing each other are harmless.
    ``download_queued_until``: the caller queues the download itself once this commits (the
    job is leased to ``download_owner`` until then: :data:`DOWNLOAD_QUEUE`, or the caller's own
    worker when the download runs in its process); None leaves it unleased for the tick's
    ``schedule_downloads``. True when the caller must now queue the download; ``row`` (a dict)
    then holds the job as that move left it.
    """
    why = _ended_by_our_cancel(session, fence, status, now=now) if status.failed else None
    if why is not None:
        job = store.get_job(session, fence.job_id)
        outcome = _cancel_outcome(status, seen_running=_seen_running(session, fence))
        ended = f"cancelled at fal ({status.error_type or status.error})"
        if why != USER_CANCEL:  # the batch's schedule asked the cancel
            end_unstarted(session, fence, job, status, why=why, how=ended, now=now, outcome=outcome)
            return False
        end_user_cancel(
            session, fence, job, outcome, reason=ended, now=now, provider_metrics=status.metrics or None
        )
        return False
    # fal ended the request by the start timeout a schedule gave it, before it started: the
    # window's end or the deadline as fal saw it, not a failure of the job.
    if (
        fence.state == S.QUEUED
        and timed_out_unstarted(status)
        and start_timeout_expired(session, fence, status, now=now)
    ):
        return False
    queued = download_queued_until is not None
    moved = store.mark_completed(
        session,
        fence,
        completed_at=now,
        provider_metrics=status.metrics or None,
        error=status.error,
        error_type=status.error_type,
        lease_owner=download_owner if queued else None,
        lease_expires_at=download_queued_until,
        row=row if queued else None,
    )
    return moved and queued


def _apply_status(
    rt: Runtime,
    fence: Fence,
    status: Status,
    submitted_at: datetime | None,
    *,
    download: bool = True,
    streamed: bool = False,
    sent_with: str | None = None,
    request_id: str | None = None,
) -> None:
    """Move the job by fal's ``status`` of its request. ``sent_with``: the key id the job
    recorded for it; another than this runtime's, the request is this key's from now on, fal
    having answered it about it (:meth:`~worker.steps.context.Runtime.followed_with_this_key`)."""
    now = utcnow()
    with db.session_scope(rt.engine) as session:
        if request_id is not None:
            rt.followed_with_this_key(session, fence.job_id, request_id, sent_with)
        if status.completed:
            queued_until = rt.lease_until(now) if download else None
            if record_completion(session, fence, status, now=now, download_queued_until=queued_until):
                session.commit()
                rt.enqueue_download(fence.job_id)
            return
        next_poll = _next_poll(rt.settings, submitted_at, now, streamed=streamed)
        if status.state == "IN_PROGRESS" and fence.state == S.QUEUED:
            store.mark_running(session, fence, next_poll_at=next_poll)
            return
        store.release_lease(session, fence, next_attempt_at=next_poll)


#: Job states in which the job's own request is at fal, so a status of it can move the job.
AT_FAL = (S.QUEUED, S.RUNNING, S.CANCELLING)


@dataclass(frozen=True, slots=True)
class Seen:
    """fal said ``status`` of request ``request_id``, the request of job ``job_id`` (a stream event)."""

    job_id: str
    request_id: str
    status: Status


def apply_seen(rt: Runtime, seen: Sequence[Seen]) -> int:
    """Apply statuses fal pushed (status streams), in one transaction; returns how many moved a job.

    The same compare-and-set moves as a poll (:func:`record_completion`, ``mark_running``) on
    the job as it is now, and only while the job still waits on that very request: a stale
    event (the job was resent, cancelled, or a poll got there first) changes nothing. Downloads
    of this runtime's batches are queued once the transaction commits.
    """
    if not seen:
        return 0
    with db.session_scope(rt.engine) as session:
        applied = apply_seen_in(session, rt, seen)
    return applied.hand_on(rt)


@dataclass
class Applied:
    """What applying statuses did in its transaction; :meth:`hand_on` once it has committed."""

    moved: int = 0
    downloads: list[str] = field(default_factory=list)
    claims: dict[str, DownloadClaim] = field(default_factory=dict)

    def hand_on(self, rt: Runtime) -> int:
        """Queue the downloads (with the claims read for them); how many jobs moved."""
        if rt.download_claims is not None:  # committed: the downloads may start from what was read
            rt.download_claims.update(self.claims)
        for job_id in self.downloads:
            rt.enqueue_download(job_id)
        return self.moved


def apply_seen_in(session: Session, rt: Runtime, seen: Sequence[Seen]) -> Applied:
    """:func:`apply_seen`'s work in the caller's transaction; hand on what it returns once that
    commits."""
    now = utcnow()
    done = Applied()
    handing = rt.download_claims is not None  # downloads run on this process's threads
    latest: dict[str, Seen] = {}
    for event in seen:  # one stream's events arrive in order: the last one of a job says most
        if not (event.job_id in latest and latest[event.job_id].status.completed):
            latest[event.job_id] = event
    jobs = store.job_heads(session, set(latest))
    handed: dict[str, dict[str, Any]] = {}  # job id -> the row its move to downloading returned
    # In job id order: every process moves rows in one order, so two conductors applying the
    # same requests' statuses (an embedded run beside the workers' leader, both following the
    # requests at fal) wait for each other instead of deadlocking on PostgreSQL.
    for event in sorted(latest.values(), key=lambda e: e.job_id):
        job = jobs.get(event.job_id)
        if job is None or job.request_id != event.request_id or job.state not in AT_FAL:
            continue
        fence = Fence(job.id, job.state, job.version, rt.owner)
        status = event.status
        rt.followed_with_this_key(session, job.id, event.request_id, job.api_key_id)
        if status.completed:
            queued_until = rt.lease_until(now) if rt.in_scope(job.batch_id) else None
            owner = rt.owner if handing else DOWNLOAD_QUEUE
            row: dict[str, Any] | None = {} if handing else None
            if record_completion(
                session,
                fence,
                status,
                now=now,
                download_queued_until=queued_until,
                download_owner=owner,
                row=row,
            ):
                done.downloads.append(job.id)
                if row:
                    handed[job.id] = row
            done.moved += 1
        elif status.state == "IN_PROGRESS" and fence.state == S.QUEUED:
            next_poll = _next_poll(rt.settings, job.submitted_at, now)
            if store.mark_running(session, fence, next_poll_at=next_poll):
                done.moved += 1
    # The completed jobs as they now stand (moved and leased above), as their moves' UPDATEs
    # returned them (no read again): each download starts from its claim (``handed_claim``)
    # instead of reading the job again.
    for job_id, row in sorted(handed.items()):
        claim = handed_claim(session, rt, job_id, JobSnapshot(**row))
        if claim is not None:
            done.claims[job_id] = claim
    return done
