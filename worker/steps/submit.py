"""Submit: send one claimed job to fal exactly once.

The exact input is recorded and committed before the POST; the POST is never retried; the
job's lease is renewed while fal's answer is awaited (:mod:`worker.steps.keepalive`); a lost
answer makes the job ``submit_unknown``; an accepted request id is recorded even through a
database outage or a full disk, because only this process knows it (kept in memory and in a
journal meanwhile: :mod:`worker.steps.unrecorded`), and whatever else fails its record (a write
the database refuses, a schema downgraded under this process, a bug) keeps it in that journal
for later, never loses it. A failure before the request left this
process is not ambiguous: the job goes back to ``pending`` (or fails with the reason). While the
database's disk is full nothing is sent."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from jobs import db, store
from jobs.endpoints import get_endpoint
from jobs.errors import (
    AccountLockedError,
    AmbiguousSubmitError,
    FinalProviderError,
    MissingInputError,
    ProviderError,
    RequestHeldError,
    RetryableProviderError,
    UsageError,
)
from jobs.media import sent_form
from jobs.models import FAL_UNREACHABLE, utcnow
from jobs.schedule import Schedule
from jobs.settings import Settings
from jobs.store import Fence
from worker import chaos, logs, telemetry
from worker.fal.errors import FalUnreachableError, SubmitNotSentError, unreached
from worker.fal.models import RequestHandle, Submitted
from worker.fal.storage import prepare_input
from worker.limits import (
    UNREACHABLE_RETRY_SECONDS,
    LimiterUnavailableError,
    api_key_id,
    stale_grant_seconds,
    wait_for_token,
)
from worker.steps import shared_pacing
from worker.steps.context import Runtime, S, SubmitTicket, in_seconds
from worker.steps.dead_inputs import INPUT_UNREACHABLE
from worker.steps.failures import (
    UPLOAD_GONE,
    backoff,
    describe,
    outcome_unknown,
    pause_for_account,
    pause_for_missing_input,
    request_held_elsewhere,
    retry_after,
    sent_media,
    settle,
    unreachable_error,
)
from worker.steps.late_answers import awaits_answer, settle_late_answer
from worker.steps.poll import first_poll_at
from worker.steps.unrecorded import (
    REFUSED_RETRY_SECONDS,
    Accepted,
    Sending,
    is_full,
    passes_by_waiting,
    refused_words,
)
from worker.steps.webhooks import binding_token, webhook_secret

log = logging.getLogger(__name__)

#: fal may reroute a request to another model after repeated failures; a reproducible run must
#: not (https://docs.fal.ai/model-apis/model-endpoints/queue, "x-fal-disable-fallbacks").
FALLBACKS_OFF = {"X-Fal-Disable-Fallbacks": "true"}
#: Least time left before a batch's window closes or its deadline passes for a submit to go
#: out (it carries the rest as fal's start timeout, which fal wants above 0.1 s).
MIN_START_TIMEOUT_SECONDS = 1.0
#: How long a job whose POST failed inside this process (never sent) waits before it is tried again.
NOT_SENT_RETRY_SECONDS = 30.0
#: Why a job claimed before the run stopped goes back unsent (:meth:`Unrecorded.stop_sending`).
STOPPED_BEFORE_SENDING = "given back: the process stopped before sending"
#: fal's "slow down": the request was refused, not queued (nothing ran, nothing is billed).
RATE_LIMITED = 429
#: 429 refusals of one job's submits that are not counted as attempts. fal's own client retries
#: a 429 ten times (``fal_client`` ``MAX_ATTEMPTS``); beyond that each refusal counts against
#: ``WANBATCH_MAX_ATTEMPTS``, so a storm that never ends still ends the job, with the reason.
FREE_RATE_LIMIT_REFUSALS = 10


def _take_submit_token(rt: Runtime, endpoint: str) -> tuple[str, float] | None:
    """None when the submit may go now; else why not and how long until the job is due again.

    Waits in place for a token up to ``submit_wait_max`` (dispatch paces itself to the same
    rate, so waits are short); beyond that the job goes back to ``pending`` rather than hold a
    worker slot. An unreachable limiter fails closed: nothing is sent until it is back.
    """
    assert rt.limiter is not None
    try:
        wait = wait_for_token(rt.limiter, endpoint, rt.settings.submit_wait_max)
    except LimiterUnavailableError as exc:
        # The limiter itself warns, at most every 30 s while the outage lasts; not once per job.
        telemetry.count_limiter_wait("unavailable")
        return f"held back: {exc}", UNREACHABLE_RETRY_SECONDS
    if wait > 0:
        return f"held back by the submit rate for {wait:.2f}s", wait
    if shared_pacing.db_paced(rt):
        # Another process shares the database and no limiter Redis: the slot is the database's.
        wait = shared_pacing.take_slot(rt, rt.settings.submit_wait_max)
        if wait > 0:
            return f"held back by the submit rate shared through the database for {wait:.2f}s", wait
    return None


def _given_back_for_rate(rt: Runtime, fence: Fence, endpoint: str) -> bool:
    """Take a submit token (:func:`_take_submit_token`); when there is none to be had now, the
    job goes back to ``pending``, due when the limiter says, and True."""
    held_back = _take_submit_token(rt, endpoint)
    if held_back is None:
        return False
    reason, delay = held_back
    with db.session_scope(rt.engine) as session:
        store.give_back(session, fence, reason=reason, due_at=in_seconds(delay))
    return True


#: Outcomes of :func:`submit` after which the job keeps the request fal accepted: followed at fal
#: (``adopted``: an ambiguous submit a stored webhook proved, :func:`~worker.steps.failures.settle_unknown`).
_KEPT = ("submitted", "submitted-late", "adopted-late", "adopted")


def webhook_for(settings: Settings, engine: Engine, job_id: str, attempt: int) -> str | None:
    """The ``fal_webhook`` URL for one attempt: the receiver learns which job and attempt a
    completion belongs to even when the submit's answer never reached us, and the token shows
    it that our submit named them (:func:`worker.steps.webhooks.binding_token`)."""
    if not settings.webhook_url:
        return None
    token = binding_token(webhook_secret(engine), job_id, attempt)
    parts = httpx.URL(settings.webhook_url)
    return str(parts.copy_merge_params({"job_id": job_id, "attempt": str(attempt), "token": token}))


def submit(rt: Runtime, job_id: str) -> str:
    """Send one claimed job to fal, exactly once. Returns what happened, for logs and tests.

    Whoever conducts this process hears of it at once (``rt.notify``): an accepted job is to
    be watched, any other end gave its outstanding slot back (dispatch again now).

    A write the database refuses because its disk is full ends the step (``database-full``)
    without a traceback: nothing is sent, and the conductor holds every round until space is
    freed (:mod:`worker.steps.unrecorded`). The job may keep its lease (the write that would give
    it back was refused too): whoever ran the step gives it back as soon as the disk takes writes
    again (:func:`worker.step_outage.after_full_disk`), not when the lease runs out.
    """
    with rt.unrecorded.step():
        try:
            outcome = _submit(rt, job_id)
        except Exception as exc:
            if not db.is_disk_full(exc):
                raise
            rt.unrecorded.mark_full()
            log.info(
                "job %s: not sent: the database's disk is full", job_id, extra={"event": "submit.db_full"}
            )
            outcome = "database-full"  # worker.step_outage.DATABASE_FULL: given back once there is room
    if outcome in _KEPT:
        rt.notify("submitted", job_id)
    elif outcome not in ("skipped", "ambiguous", "duplicate-request", "database-full", "unrecorded"):
        rt.notify("freed", job_id)
    return outcome


def _read_ticket(rt: Runtime, job_id: str) -> SubmitTicket | None:
    """The job as the submit starts from it, read; None when it is not for this step."""
    # Only a look (no write lock): the fenced writes that follow refuse a job changed since.
    with db.read_scope(rt.engine) as session:
        view = store.submit_view(session, job_id)
    if view.state != S.SUBMITTING or view.submitted_input is not None:
        return None  # a duplicate message, or another worker already began this POST
    return SubmitTicket(
        fence=Fence(view.id, view.state, view.version, rt.owner),
        endpoint=view.endpoint,
        input=dict(view.input),
        attempt=view.attempts,
        batch_id=view.batch_id,
        schedule=Schedule.from_json(view.schedule),
        priority=view.priority,
        source_files=view.source_files,
        manifest_path=view.manifest_path,
    )


def _submit(rt: Runtime, job_id: str) -> str:
    # What dispatch left for an in-process hand-off, or else the job as stored now.
    ticket = rt.submit_tickets.pop(job_id, None) if rt.submit_tickets is not None else None
    if ticket is None:
        ticket = _read_ticket(rt, job_id)
        if ticket is None:
            return "skipped"
    fence, endpoint, raw_input, attempt = ticket.fence, ticket.endpoint, ticket.input, ticket.attempt
    batch_id, schedule, priority = ticket.batch_id, ticket.schedule, ticket.priority
    logs.annotate(batch_id=batch_id)
    if rt.unrecorded.full:  # an id fal gave now could not be recorded either: send nothing
        with db.session_scope(rt.engine) as session:  # refused too, most likely: the lease runs out
            store.give_back(
                session, fence, reason="held back: the database's disk is full", due_at=in_seconds(0)
            )
        return "database-full"

    # The batch's schedule, checked again right before sending (dispatch checked it when it
    # claimed the job, but a window may have closed since): fal must not start the request
    # after the window or the deadline either, so it gets the time left as its start timeout.
    now = utcnow()
    closes = schedule.closes_at(now) if schedule.is_open(now) else now
    start_timeout = None if closes is None else (closes - now).total_seconds()
    if start_timeout is not None and start_timeout < MIN_START_TIMEOUT_SECONDS:
        return _hold_for_schedule(rt, fence, schedule)

    # An input URL fal could not download for another job: not sent with it (nothing is uploaded
    # or waited for first).
    if (
        rt.dead_inputs.any()
        and (stopped := _stopped_for_dead_input(rt, ticket, as_sent(raw_input))) is not None
    ):
        return stopped

    # fal unreachable a moment ago (a connect failure): only one submit at a time goes, as the
    # probe, after each pause; the others go back uncounted, due when the hold ends (marked as
    # the probe's job is, so that the wait ends with the hold: Runtime.end_fal_waits).
    held, probe = rt.fal_reach.admit()
    if held > 0:
        why = f"held back: {rt.fal_reach.note(now) or 'fal unreachable'}"
        with db.session_scope(rt.engine) as session:
            store.give_back(
                session, fence, reason=why, due_at=in_seconds(held), error=why, error_type=FAL_UNREACHABLE
            )
        return "fal-unreachable"

    prepared = _prepare(rt, ticket, fence, probe=probe)
    if isinstance(prepared, str):
        return prepared
    to_send = prepared
    # Before the lease: a bad URL must not strand the job.
    webhook = webhook_for(rt.settings, rt.engine, job_id, attempt)

    # The global submit rate, taken right before the POST (every worker shares it). Before
    # take_lease on purpose: a worker that dies while waiting leaves a job that is plainly
    # "not sent" (no recorded input), not one whose submission looks ambiguous.
    if _given_back_for_rate(rt, fence, endpoint):
        return "rate-limited"
    granted = time.monotonic()
    # fal may have said, while this job waited for its token, that it cannot download one of its
    # inputs: a user's URL is not sent; an upload fal's storage dropped is made again first.
    if rt.dead_inputs.any():  # none known (nearly always): neither check has a URL to find
        if (stopped := _stopped_for_dead_input(rt, ticket, to_send)) is not None:
            return stopped
        if (again := _upload_dead_again(rt, ticket, to_send, probe=probe)) is not None:
            if isinstance(again, str):
                return again
            to_send = again

    # From the send's record on, the POST is under way (counted in flight, so that a stopping
    # run waits for its answer): _record_send asks, in one step with the stop, once its write
    # holds the job's row and before it commits (Unrecorded.sending). A run that stopped before
    # then records nothing and sends nothing (_stopped).
    ready = _record_send(rt, fence, ticket, to_send, closes, granted)
    if isinstance(ready, str):  # given back (or lost, or the run stopped) before the POST
        return ready
    fence, start_timeout, sent, sent_at = ready
    try:
        chaos.crash_point("before_post")
    except BaseException:
        sent.end()
        raise
    try:
        try:
            # The lease is renewed while fal's answer is awaited: a POST may take longer than the
            # lease, and a lapsed one would make the reconciler call this live POST lost.
            with rt.submit_leases.kept(fence):
                submitted = rt.client.submit(
                    endpoint,
                    to_send,
                    webhook_url=webhook,
                    priority="low" if priority == "low" else None,
                    start_timeout=start_timeout,
                    extra_headers=FALLBACKS_OFF if rt.settings.disable_fallbacks else None,
                )
        except BaseException:
            sent.end()  # no accepted id to keep: what follows records the outcome itself
            raise
    except FalUnreachableError as exc:
        # The connection to fal failed before a byte went out: no submission, nothing billed.
        with _unsent_noted(rt, fence, sent_at, f"not sent: {exc}"):
            return _fal_unreachable(rt, fence, exc, probe=probe)
    except (SubmitNotSentError, UsageError) as exc:
        # Failed inside this process before the request was written: fal cannot have it.
        log.error("job %s: not sent (%s); giving it back", job_id, exc, extra={"event": "submit.not_sent"})
        with _unsent_noted(rt, fence, sent_at, f"not sent: {exc}"), db.session_scope(rt.engine) as session:
            _not_sent(session, fence, f"not sent: {exc}")
        return "not-sent"
    except AmbiguousSubmitError as exc:
        rt.fal_reach.answered()  # connected: whatever became of the POST, fal is reachable
        telemetry.count_submit(endpoint, "ambiguous")
        with db.session_scope(rt.engine) as session:
            # `ambiguous` while the job waits for proof; what the policy did when it could not wait
            # (no receiver): a job it failed is logged as any that failed for good.
            return outcome_unknown(session, rt, fence, str(exc))
    except AccountLockedError as exc:
        rt.fal_reach.answered()
        telemetry.count_submit(endpoint, "refused")
        with db.session_scope(rt.engine) as session:
            reason = pause_for_account(session, rt, batch_id, exc)
            store.give_back(session, fence, reason=f"batch paused: {reason}", due_at=in_seconds(0))
        return "account-locked"
    except (RetryableProviderError, FinalProviderError) as exc:
        rt.fal_reach.answered()
        if _rate_limited(exc):
            telemetry.count_submit(endpoint, "rate_limited")
            return _refused_for_rate(rt, fence, endpoint, exc)
        telemetry.count_submit(
            endpoint, "retryable" if isinstance(exc, RetryableProviderError) else "refused"
        )
        with db.session_scope(rt.engine) as session:
            return settle(session, rt, fence, exc)  # what it did: the last attempt's retry fails

    try:
        telemetry.count_submit(endpoint, "accepted")
        logs.annotate(request_id=submitted.request_id)
        chaos.crash_point("after_post")
        now = utcnow()
        accepted = Accepted(
            job_id=job_id,
            attempt=attempt,
            request_id=submitted.request_id,
            gateway_request_id=submitted.gateway_request_id,
            status_url=submitted.status_url,
            response_url=submitted.response_url,
            cancel_url=submitted.cancel_url,
            running=submitted.status == "IN_PROGRESS",
            submitted_at=now,
        )
        outcome = _until_recorded(
            rt, accepted, lambda: _record_submission(rt, fence, submitted, accepted, endpoint), sent
        )
    finally:
        sent.end()
    # fal answered: a hold ends — after the request is recorded, as ending one writes to the
    # database (the first answer a process hears ends the waits a dead process's hold left)
    rt.fal_reach.answered()
    if outcome == "submitted":
        chaos.crash_point("after_commit")
    if outcome in _KEPT and rt.on_accepted is not None:
        # Built from the configured queue URL and the (validated) request id only: the key goes there.
        rt.on_accepted(
            job_id,
            RequestHandle.from_request_id(rt.settings.fal_queue_url, endpoint, submitted.request_id),
            batch_id,
        )
    return outcome


class _StoppedBeforeSend(Exception):
    """The run stopped while a step's send was being recorded: that record is rolled back."""


#: Why a job whose send's record failed as it committed goes back unsent (:func:`_record_send`).
RECORD_FAILED = "not sent: the database failed as its send was recorded"


def _record_send(
    rt: Runtime,
    fence: Fence,
    ticket: SubmitTicket,
    to_send: dict[str, Any],
    closes: datetime | None,
    granted: float,
) -> tuple[Fence, float | None, Sending, datetime] | str:
    """Record what is about to be sent, and when, before the POST goes out; the lease's fence,
    fal's start timeout to send with, the POST counted in flight (:meth:`Unrecorded.sending`,
    to :meth:`~worker.steps.unrecorded.Sending.end` once its answer is held) and the send's
    recorded time (:mod:`worker.steps.unsent`), or what became of the job instead (it lost its
    lease, the run stopped, or it went back ``pending`` unsent: a stale rate grant, its
    schedule's window too near its end).

    The POST is counted in flight once the record's write holds the job's row and before it
    commits, in one step with the stop: a stop that comes earlier — while that write waits for
    another session's lock, say — rolls the record back and the job goes back unsent
    (:func:`_stopped`): the run neither waits for nor says "already sent to fal" of a POST that
    never went, nor does that POST go once the lock is let go, after the run stopped. A stop
    that comes later lets the POST go, and waits for its answer: a record that committed is
    never undone by a give-back (one that did not land, the database gone as the run stopped,
    left the job "its POST may be out", ``submit_unknown``, though nothing went).

    If this process dies from here on, the reconciler knows the submit's outcome is unknown, and
    a lost answer counts the money it may have cost under the day it was sent (``sent_at``).
    record_send (a take_lease) bumps the version: of two copies of this message, exactly one
    gets here. A resend of an unknown submit counts as a possible duplicate charge here, as it is sent."""
    sent: Sending | None = None
    taken: Fence | None = None
    try:
        with db.session_scope(rt.engine) as session:
            sent_at = utcnow()
            taken = store.record_send(
                session,
                fence,
                now=sent_at,
                lease_seconds=rt.settings.lease_seconds,
                submitted_input=to_send,
                sent_at=sent_at,
                api_key_id=api_key_id(rt.settings),  # the key this POST goes with, not dispatch's
                # The queue it goes to: only a process of that queue asks about it.
                fal_origin=rt.queue_origin,
                # What fal's request_timeout of it is judged by, whatever the schedule becomes.
                start_timeout_at=closes,
            )
            if taken is not None:
                sent = rt.unrecorded.sending()
                if sent is None:  # the run stopped while this write waited: rolled back
                    raise _StoppedBeforeSend
    except _StoppedBeforeSend:
        return _stopped(rt, fence)
    except BaseException:
        if sent is not None:  # the record did not commit: nothing goes
            sent.end()
        if taken is not None:
            # It failed as it committed, or after (a reply the database never sent, a log not
            # synced to disk): it may have landed, and the job then reads "its POST may be out"
            # though none was made. Noted, the give-back once the database answers moves it back.
            rt.unsent.note(taken.job_id, sent_at, RECORD_FAILED)
        raise
    if taken is None or sent is None:
        return "lost-lease"
    try:
        with _unsent_noted(rt, taken, sent_at, "not sent: given back before its POST"):
            ready = _send_now(rt, taken, ticket, closes, granted)
    except BaseException:
        sent.end()
        raise
    if isinstance(ready, str):  # given back before the POST: nothing in flight
        sent.end()
        return ready
    return taken, ready, sent, sent_at


@contextlib.contextmanager
def _unsent_noted(rt: Runtime, fence: Fence, sent_at: datetime, why: str) -> Iterator[None]:
    """Around the give-back of a job whose recorded send never went out: should that write
    fail (the database unreachable, no file descriptor left), the send is noted as never gone
    (:mod:`worker.steps.unsent`), so that this process's reconciler gives the job back once its
    lease lapses, instead of calling its outcome unknown (by default: failed, "possibly
    billed", for a request fal never saw)."""
    try:
        yield
    except Exception:
        rt.unsent.note(fence.job_id, sent_at, why)
        raise


def _send_now(
    rt: Runtime, taken: Fence, ticket: SubmitTicket, closes: datetime | None, granted: float
) -> float | str | None:
    """Once the send is recorded: fal's start timeout to send with (None: none), or what became
    of the job instead (given back unsent: a stale rate grant, its schedule's window too near
    its end)."""
    if time.monotonic() - granted > stale_grant_seconds(rt.settings):
        # Recording the lease stalled (a checkpoint, a busy disk): other workers' grants went out
        # meanwhile, and sending on this old one would bunch submits into one of fal's windows.
        telemetry.count_limiter_wait("stale")
        if _given_back_for_rate(rt, taken, ticket.endpoint):
            return "rate-limited"

    # The start timeout again, from the moment of sending: preparing media, waiting for a rate
    # token and recording the lease all took time, and fal counts the timeout from receipt.
    if closes is None:
        return None
    start_timeout = (closes - utcnow()).total_seconds()
    if start_timeout < MIN_START_TIMEOUT_SECONDS:
        return _hold_for_schedule(rt, taken, ticket.schedule)
    return start_timeout


def _prepare(rt: Runtime, ticket: SubmitTicket, fence: Fence, *, probe: bool) -> dict[str, Any] | str:
    """The job's input as it is sent (:func:`~worker.fal.storage.prepare_input`: local files
    inline or uploaded), or, when it cannot be prepared, the step's outcome (the job failed,
    given back or paused, as the failure says)."""
    job_id, batch_id, endpoint = fence.job_id, ticket.batch_id, ticket.endpoint
    spec = get_endpoint(endpoint)
    try:
        fields = {f.name: f.type for f in spec.media_fields}
        # A refused file is named as the manifest wrote it, relative to its folder (the job's
        # error is stored, shown by `status` and exported): not as the absolute path stored.
        folder = Path(ticket.manifest_path).parent if ticket.manifest_path else None
        return prepare_input(
            ticket.input, fields, preparer=rt.media, source_files=ticket.source_files, folder=folder
        )
    except MissingInputError as exc:  # its folder moved, its disk is not mounted: wait, nothing sent
        with db.session_scope(rt.engine) as session:
            reason = pause_for_missing_input(session, batch_id, exc)
            kept = store.give_back(session, fence, reason=f"batch paused: {reason}", due_at=in_seconds(0))
        return "input-missing" if kept else "lost-lease"
    except (UsageError, OSError) as exc:  # a local file changed or became unreadable
        with db.session_scope(rt.engine) as session:
            failed = store.fail_unsent(session, fence, error=str(exc), error_type="input_file")
        return "failed" if failed else "lost-lease"
    except AccountLockedError as exc:  # the upload was refused for the account: pause, as a submit would
        with db.session_scope(rt.engine) as session:
            reason = pause_for_account(session, rt, batch_id, exc)
            store.give_back(session, fence, reason=f"batch paused: {reason}", due_at=in_seconds(0))
        return "account-locked"
    except ProviderError as exc:
        if unreached(exc):  # fal's storage could not be reached: nothing was sent either
            return _fal_unreachable(rt, fence, exc, probe=probe)
        if _rate_limited(exc):  # the upload was refused for the account's pace, as a submit may be
            return _refused_for_rate(rt, fence, endpoint, exc)
        with db.session_scope(rt.engine) as session:
            return settle(session, rt, fence, exc)
    except Exception as exc:  # our own side failed (a closed client, a bug): nothing was sent
        log.exception(
            "job %s: preparing the input failed; giving it back",
            job_id,
            extra={"event": "submit.prepare_failed"},
        )
        why = rt.client.scrub(f"not sent: preparing the input failed: {exc!r}")
        with db.session_scope(rt.engine) as session:
            _not_sent(session, fence, why)
        return "not-sent"


def as_sent(raw_input: Mapping[str, Any]) -> dict[str, Any]:
    """``raw_input`` with each URL as it would be sent (:func:`jobs.media.sent_form`), before
    its local files are prepared: what :func:`_stopped_for_dead_input` can look at first."""
    out: dict[str, Any] = {}
    for name, value in raw_input.items():
        if isinstance(value, str):
            out[name] = sent_form(value)
        elif isinstance(value, list):
            out[name] = [sent_form(v) if isinstance(v, str) else v for v in value]
        else:
            out[name] = value
    return out


def _stopped_for_dead_input(rt: Runtime, ticket: SubmitTicket, sent: Mapping[str, Any]) -> str | None:
    """``failed`` (or ``lost-lease``) when ``sent`` carries a URL of the user's that fal said,
    for another job, it could not download (:mod:`worker.steps.dead_inputs`) and the job was
    created before fal said so: failed unsent, ``input_unreachable``, billed nothing; None when
    it may go. A job created since (a rerun) is sent: the URL may be back."""
    carried = [m.url for m in sent_media(ticket.endpoint, ticket.input, sent) if not m.upload]
    dead = rt.dead_inputs.among(carried)
    if not dead:
        return None
    fence = ticket.fence
    with db.session_scope(rt.engine) as session:
        created = store.get_job(session, fence.job_id).created_at
        applies = [d for d in dead if created is None or created < d.learned_at]
        if not applies:
            return None
        error = unreachable_error(session, applies, ticket.batch_id, simulated=rt.simulated)
        failed = store.fail_unsent(session, fence, error=error, error_type=INPUT_UNREACHABLE)
    return "failed" if failed else "lost-lease"


def _upload_dead_again(
    rt: Runtime, ticket: SubmitTicket, sent: dict[str, Any], *, probe: bool
) -> dict[str, Any] | str | None:
    """When ``sent`` carries an upload fal said, for another job, its storage no longer has
    (:mod:`worker.steps.dead_inputs`): that upload forgotten (again: another process may have
    reused it meanwhile) and the input prepared anew, so the file is uploaded again rather than
    this job paying a 422 for it too. None when it carries none; else the new input, or the
    step's outcome when it cannot be prepared (:func:`_prepare`)."""
    uploads = [m.url for m in sent_media(ticket.endpoint, ticket.input, sent) if m.upload]
    dead = [d.url for d in rt.dead_inputs.among(uploads)]
    if not dead:
        return None
    with db.session_scope(rt.engine) as session:
        store.forget_uploads(session, dead)
    log.info(
        "job %s: %s (%s); uploading it again before sending",
        ticket.fence.job_id,
        UPLOAD_GONE,
        ", ".join(dead),
        extra={"event": "submit.upload_again", "job_id": ticket.fence.job_id},
    )
    return _prepare(rt, ticket, ticket.fence, probe=probe)


def _rate_limited(exc: ProviderError) -> bool:
    """fal's "slow down" (429), which refuses a request without queueing or billing anything."""
    return exc.status_code == RATE_LIMITED and isinstance(exc, RetryableProviderError)


def _refused_for_rate(rt: Runtime, fence: Fence, endpoint: str, exc: ProviderError) -> str:
    """fal refused the submit with 429: slow everyone down, and give the job back uncounted.

    A 429 says nothing about the job: it was the account's pace, and the same POST sent a little
    later is accepted. So every worker sharing the key stops submitting for fal's
    ``Retry-After`` (else ``WANBATCH_RETRY_BASE_DELAY``): the shared limiter's next grant moves
    (:meth:`~worker.limits.SubmitLimiter.hold_off`), and a storm is probed by one submit per pause,
    not met by every queued job. The job itself goes back to ``pending`` without spending an
    attempt, due after its own backoff (doubling with each refusal, so the same job is not the
    probe every time). After :data:`FREE_RATE_LIMIT_REFUSALS` of them, a refusal is an ordinary
    retryable failure again (``settle``), and ``WANBATCH_MAX_ATTEMPTS`` ends the job.
    """
    pause = retry_after(rt.settings, exc) or backoff(rt.settings, 1)
    # Dispatch, here or in another process, reads the pause from the limiter (``pause_left``).
    if pause > 0 and rt.limiter is not None:
        # Unreachable: the limiter says so itself, and the next acquire fails closed all the same.
        with contextlib.suppress(LimiterUnavailableError):
            rt.limiter.hold_off(endpoint, pause)
    with db.session_scope(rt.engine) as session:
        # The processes that share the database without a limiter Redis hear it there.
        shared_pacing.hold(session, rt, pause)
        refusals = store.get_job(session, fence.job_id).rate_limited_submits + 1
        if refusals > FREE_RATE_LIMIT_REFUSALS:
            return settle(session, rt, fence, exc)
        delay = max(backoff(rt.settings, refusals), pause)
        said = describe(exc)
        telemetry.count_provider_error(exc)
        store.give_back(
            session,
            fence,
            reason=(
                f"rate limited by fal ({said}): not counted as an attempt "
                f"(refusal {refusals} of {FREE_RATE_LIMIT_REFUSALS}); submits paused {pause:g}s, "
                f"this job again in {delay:g}s"
            ),
            due_at=in_seconds(delay),
            submitted_input=None,  # recorded when the lease was taken; fal refused it
            rate_limited_submits=refusals,
            error=said,
            error_type=exc.error_type or "rate_limited",
        )
    return "rate-limited"


def _fal_unreachable(rt: Runtime, fence: Fence, exc: Exception, *, probe: bool) -> str:
    """fal could not be reached (the connection failed before anything was sent): no submission.

    The job goes back to ``pending`` uncounted — nothing was queued, nothing is possibly billed —
    and this process holds its submits (:class:`~worker.steps.fal_reach.FalReach`): one probe
    after each growing pause, until fal answers. The job is due when the next probe may go.
    """
    said = str(exc).removeprefix("fal submit: not sent, ")
    left = rt.fal_reach.failed(said, probe=probe)
    why = f"not sent: {exc}"
    with db.session_scope(rt.engine) as session:
        store.give_back(
            session,
            fence,
            reason=f"{why}; not counted as an attempt: {rt.fal_reach.note() or 'fal unreachable'}",
            due_at=in_seconds(left),
            submitted_input=None,  # recorded when the lease was taken; it never left
            error=why,
            error_type=FAL_UNREACHABLE,
        )
    return "fal-unreachable"


def _hold_for_schedule(rt: Runtime, fence: Fence, schedule: Schedule) -> str:
    """Too little of the batch's window (or time before its deadline) is left for fal to start
    the request: pending again, due when the schedule next opens."""
    reopens = schedule.next_open(utcnow() + timedelta(seconds=MIN_START_TIMEOUT_SECONDS))
    with db.session_scope(rt.engine) as session:
        store.give_back(
            session,
            fence,
            reason="held back: the batch's schedule is closed",
            due_at=reopens,
            submitted_input=None,  # recorded if the lease was taken; never sent
        )
    return "outside-schedule"


def _stopped(rt: Runtime, fence: Fence) -> str:
    """The run stops (:meth:`~worker.steps.unrecorded.Unrecorded.stop_sending`): the job goes
    back unsent, due at once for the next run, its attempt not counted.

    Only ever with no send recorded (:meth:`~worker.steps.unrecorded.Unrecorded.sending` is
    asked before that record commits, and a stop rolls it back: :func:`_record_send`): should
    this give-back not land (the database stopped answering as the run stopped, or the process
    ended first), the job reads as claimed but never sent, and the next run's reconciler sends
    it again — never ``submit_unknown``, "possibly billed"."""
    with db.session_scope(rt.engine) as session:
        store.give_back(session, fence, reason=STOPPED_BEFORE_SENDING, due_at=in_seconds(0))
    return "stopped"


def _not_sent(session: Session, fence: Fence, why: str) -> None:
    """The POST failed inside this process, before fal could have it: pending again, a while later."""
    store.give_back(
        session,
        fence,
        reason=why,
        due_at=in_seconds(NOT_SENT_RETRY_SECONDS),
        error=why,
        error_type=store.NOT_SENT,
    )


def _refused_by(*, full: bool) -> str:
    """What keeps a submission fal accepted from being recorded while it is waited for, for its
    log lines."""
    if full:
        return "the database's disk is full"
    return "the database is unreachable"


def _until_recorded(
    rt: Runtime, accepted: Accepted, action: Callable[[], str], sent: Sending | None = None
) -> str:
    """Run ``action`` (recording ``accepted``) until the database takes it: this process alone
    knows the request id of an accepted, paid submit, and giving up at the first refused write
    would turn it into "submission outcome unknown" — and, by ``rerun --failed-only``, a second
    payment.

    * The disk is full (:func:`jobs.db.is_disk_full`): tried again every second for as long as
      it lasts — it ends only when someone frees space — unless the run stops for good
      (``given_up``: Ctrl-C). Nothing new is sent meanwhile (:attr:`Unrecorded.full`).
    * The database is unreachable: tried again, backing off to 1 s so the write lands within a
      second of its return, for up to the lease plus ``WANBATCH_SUBMIT_UNKNOWN_DEADLINE``.
    * Anything else — the database refused the write (a constraint, a trigger, a value out of
      range, a corrupt file), its schema is older than this wanbatch's or its tables are gone,
      or a bug of ours failed on the way (:func:`_refusal`): not tried again here, since waiting
      a second does not change it; said in one line with what failed, and the submission is
      left to the journal at once (this process's reconciler tries it again, leaving its job
      alone meanwhile: :meth:`~worker.steps.unrecorded.Unrecorded.held_job_ids`).

    From the first failure the submission is also kept in the journal, so what a step gives up
    on is recorded by the next process instead (:mod:`worker.steps.unrecorded`); only a
    committed record takes it out. Said once per submission with its request id, then every
    :data:`~worker.steps.unrecorded.REMINDER_SECONDS` for all of them; ``unrecorded`` when given up.
    """
    # Held in memory while it is written: a database that never answers leaves the write
    # neither done nor failed, and a process that ends then journals it (Unrecorded.keep_all).
    with rt.unrecorded.recording(accepted, sent):
        return _recorded_or_kept(rt, accepted, action)


def _recorded_or_kept(rt: Runtime, accepted: Accepted, action: Callable[[], str]) -> str:
    """:func:`_until_recorded`'s loop."""
    waiting = rt.unrecorded
    patience = time.monotonic() + max(60.0, rt.settings.lease_seconds + rt.settings.submit_unknown_deadline)
    delay = 0.1
    kept = False
    while True:
        try:
            outcome = action()
        except Exception as exc:
            refusal = _refusal(rt, exc)
            if refusal is not None:  # waiting does not change it: left to the journal at once
                return _left_to_journal(rt, accepted, refusal)
            full = is_full(exc)
            what = _refused_by(full=full)
            if full:
                waiting.mark_full()
            # Another process holds SQLite's lock and this one is stopping: not waited for, and
            # the run's last line names every submission left unrecorded.
            level = logging.DEBUG if db.gave_up_on_lock(exc) else logging.WARNING
            if not kept:
                kept = True
                where = waiting.keep(accepted)
                log.log(
                    level,
                    "%s: fal accepted %s, which cannot be recorded yet; %s (%s)",
                    what,
                    accepted.line(),
                    f"retrying until space is freed on {waiting.place}" if full else "retrying",
                    f"kept in {where} meanwhile" if where else f"not kept on disk: {accepted.as_json()}",
                    extra={
                        "event": "submit.record_retry" if where else "submit.unrecorded",
                        "job_id": accepted.job_id,
                        "request_id": accepted.request_id,
                    },
                )
            elif waiting.reminder_due():
                log.log(
                    level,
                    "%s: %d accepted submission(s) still waiting to be recorded%s",
                    what,
                    len(waiting.waiting()),
                    f"; free space on {waiting.place}" if full else "",
                    extra={"event": "submit.record_retry"},
                )
            stopping = waiting.given_up.is_set()  # the run stops, and its last line names them all
            if stopping or (not full and time.monotonic() > patience):
                waiting.leave(accepted)
                log.log(
                    logging.INFO if stopping else logging.ERROR,
                    "%s: %s not recorded; %s",
                    what,
                    accepted.line(),
                    f"kept in {waiting.journal.path}: the next run records it"
                    if waiting.journal.path
                    else f"not kept on disk either: {accepted.as_json()}",
                    extra={
                        "event": "submit.unrecorded",
                        "job_id": accepted.job_id,
                        "request_id": accepted.request_id,
                    },
                )
                return "unrecorded"
            waiting.given_up.wait(1.0 if full else delay)
            delay = min(1.0, delay * 2)
            continue
        except BaseException:
            # Ctrl-C or an exit in this very thread, while the write was on its way: kept (a
            # record that landed after all makes the next run's adoption a no-op), then the
            # process goes on ending as it was told.
            waiting.keep(accepted)
            waiting.leave(accepted)
            raise
        # Also when its first write landed: one the hang watch journalled meanwhile
        # (Unrecorded.keep_all) leaves the journal again.
        waiting.recorded(accepted)
        if kept:
            waiting.writable()
            log.warning(
                "%s recorded after all",
                accepted.line(),
                extra={
                    "event": "submit.recorded_late",
                    "job_id": accepted.job_id,
                    "request_id": accepted.request_id,
                },
            )
        return outcome


def _refusal(rt: Runtime, exc: Exception) -> tuple[str, str] | None:
    """Why recording an accepted submission failed and what comes next, when waiting a second
    would not change it (the submission is then left to the journal at once:
    :func:`_left_to_journal`); None for what passes by waiting — an outage, a lock, a full disk
    (:func:`jobs.db.is_unavailable`).

    A schema older than this wanbatch's (:func:`jobs.db.schema_behind`, which also stops this
    process: ``Runtime.schema_behind``), a database without wanbatch's tables, a write the
    database refused (a constraint, a trigger, a value out of range, a column it lacks, a
    corrupt or read-only file: in its own words), or a bug (its traceback in a crash file)."""
    later = (
        f"this process tries it again every {REFUSED_RETRY_SECONDS:g}s, and the next run or worker "
        "on this host records it once the database takes it"
    )
    if db.is_schema_mismatch(exc) and (behind := rt.schema_behind or db.schema_behind(rt.engine)):
        rt.schema_behind = behind  # every later step of this process leaves its job; it stops
        then = "this version's next run or worker on this host records it then"
        return behind, f"{db.SCHEMA_BEHIND_FIX}; {then}"
    if db.is_schema_missing(exc):
        return (
            f"the database has no such table ({db.database_problem(exc)}): it is not a wanbatch "
            "database, or its tables were dropped",
            "the next run or worker on this host with wanbatch's database back records it",
        )
    if passes_by_waiting(exc):
        return None
    return refused_words(exc, "record_submission"), later


def _left_to_journal(rt: Runtime, accepted: Accepted, refusal: tuple[str, str]) -> str:
    """The database will not take ``accepted`` by waiting (:func:`_refusal`: why, and what comes
    next): kept in the journal (and in memory, for this process's reconciler to try again
    later, leaving its job alone meanwhile), said once in one line; ``unrecorded``."""
    why, then = refusal
    waiting = rt.unrecorded
    where = waiting.keep(accepted)
    waiting.leave(accepted)
    waiting.refused(accepted)  # tried again by the reconciler, not at its next tick
    log.error(
        "fal accepted %s, which could not be recorded: %s; %s",
        accepted.line(),
        why,
        f"kept in {where}: {then} (nothing is sent again)"
        if where
        else f"not kept on disk either: {accepted.as_json()}",
        extra={"event": "submit.unrecorded", "job_id": accepted.job_id, "request_id": accepted.request_id},
    )
    return "unrecorded"


#: Reads of a job whose late answer finds it moving (a webhook, the reconciler) before giving up
#: on adopting it; each failed compare-and-set means the job moved, so two nearly always do.
LATE_TRIES = 3


def _record_submission(
    rt: Runtime, fence: Fence, submitted: Submitted, accepted: Accepted, endpoint: str
) -> str:
    """Store the request id fal gave us: ``submitted``, ``submitted-late``, ``adopted-late``,
    ``orphaned`` or ``duplicate-request`` (another job of the same fal queue holds that id:
    :func:`jobs.store.request_holder`, which every write of a request id checks; the job is
    ``submit_unknown``, :func:`~worker.steps.failures.request_held_elsewhere`).

    ``submitted-late``: the lease was taken over while the POST was in flight (this worker
    stalled past it) and the reconciler called the outcome unknown, but the job still waits for
    proof (``submit_unknown``, no request): the answer is that proof, and the job keeps the
    request — a compare-and-set from the state and version just read, tried again if the job
    moves meanwhile. ``adopted-late``: the job had failed for the unknown outcome, or waits to
    resend it and the resend has not gone out: it keeps the request all the same, nothing is
    sent again. ``orphaned``: the job moved on without it (sent again, cancelled, finished
    otherwise): the request is cancelled at fal and recorded (:mod:`worker.steps.late_answers`).
    """

    def record(session: Session, held: Fence) -> bool:
        return store.mark_submitted(
            session,
            held,
            running=submitted.status == "IN_PROGRESS",
            request_id=submitted.request_id,
            gateway_request_id=submitted.gateway_request_id,
            status_url=submitted.status_url,
            response_url=submitted.response_url,
            cancel_url=submitted.cancel_url,
            submitted_at=accepted.submitted_at,
            next_poll_at=first_poll_at(rt.settings, accepted.submitted_at),
        )

    with db.session_scope(rt.engine) as session:
        try:
            if record(session, fence):
                return "submitted"
        except RequestHeldError as held:  # raised before anything was written
            if request_held_elsewhere(session, rt, fence, held.request_id, held.holder):
                return "duplicate-request"
    for _ in range(LATE_TRIES):
        with db.session_scope(rt.engine) as session:
            job = store.get_job(session, fence.job_id)
            if job.request_id == submitted.request_id:  # our commit landed though we saw an error (a retry)
                return "submitted"
            if not awaits_answer(job, accepted.attempt):
                break
            try:
                recorded = record(session, rt.fence(job))
            except RequestHeldError as held:
                # Never cancelled at fal as an orphan: the request is the other job's.
                request_held_elsewhere(session, rt, rt.fence(job), held.request_id, held.holder)
                return "duplicate-request"
            if recorded:
                extra = {"event": "submit.late_answer", "job_id": job.id, "request_id": submitted.request_id}
                said = "%s: fal's answer came after the job's lease had been taken over; recorded"
                # Said once committed: a commit the database refuses (its disk is full) records nothing.
                db.after_commit(session, partial(log.warning, said, accepted.line(), extra=extra))
                return "submitted-late"
    settled = settle_late_answer(rt, accepted, endpoint)
    if settled == "adopted":
        return "adopted-late"
    return "duplicate-request" if settled == "held" else "orphaned"
