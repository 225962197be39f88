"""How a step turns a provider failure into a reason, a retry or a final failure, and
what the failed attempt cost (the billing rules are data: ``jobs/billing_rules.yaml``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.orm import Session

from jobs import billing, db, store
from jobs.endpoints import get_endpoint
from jobs.errors import (
    AccountLockedError,
    FinalProviderError,
    MissingInputError,
    ProviderError,
    RetryableProviderError,
)
from jobs.fs import shown_path
from jobs.media import MediaKind, classify
from jobs.models import Job, JobView, utcnow
from jobs.printable import SHELL_ID_CHARS, shell_ref
from jobs.processes import process_prefix
from jobs.settings import RetrySettings, Settings
from jobs.states import JobState
from jobs.store import Fence
from jobs.url_secrets import masked_url
from worker import telemetry
from worker.fal.errors import ResultExpiredError, error_type_or_none, format_detail
from worker.fal.models import request_id_or_none
from worker.fal.results import fetched_fields
from worker.limits import api_key_id
from worker.steps.accounts import signed_by_us
from worker.steps.context import Runtime, in_seconds
from worker.steps.dead_inputs import INPUT_UNREACHABLE, DeadInput

log = logging.getLogger(__name__)


def backoff(retry: RetrySettings, attempt: int) -> float:
    """Seconds before ``attempt`` is tried again: base × 2^(attempt-1), capped."""
    delay = retry.retry_base_delay * (2 ** max(0, attempt - 1))
    return float(min(retry.retry_max_delay, delay))


def retry_after(retry: RetrySettings, exc: ProviderError) -> float:
    """fal's ``Retry-After`` for ``exc`` in seconds (0 without one), capped at
    ``WANBATCH_RETRY_MAX_DELAY``: a provider's hint, not a licence to stall a batch for a year."""
    hint = getattr(exc, "retry_after", None) or 0.0
    return float(min(hint, retry.retry_max_delay))


def describe(exc: ProviderError) -> str:
    """The provider's own words for a failure, short enough for a status line and an export."""
    prefix = f"HTTP {exc.status_code}: " if exc.status_code else ""
    return prefix + (format_detail(exc.detail) or str(exc))


def kind_of(exc: ProviderError) -> str | None:
    """The job's ``error_type`` for ``exc``: fal's own when it gave one, else what we know the
    failure to be — a result gone (``result_expired``), a request fal does not know
    (``request_not_found``) — so `status` groups them by name, not as a bare "error". Billing
    reads fal's ``exc.error_type`` alone (:func:`cost_of_failure`).

    fal's own is kept only in an error type's shape (:func:`~worker.fal.errors.error_type_or_none`):
    it is stored, shown and published as a metrics label as it is, so anything else an error
    carries there (an echoed key) is not."""
    own = error_type_or_none(exc.error_type)
    if own:
        return own
    if isinstance(exc, ResultExpiredError):
        return "result_expired"
    if isinstance(exc, FinalProviderError) and exc.status_code == 404:
        return "request_not_found"
    return None


def failure_type(exc: ProviderError) -> str:
    """The ``error_type`` a job that failed (or waits to retry) for ``exc`` is stored with: what
    :func:`kind_of` knows, else the kind of failure — ``network_error`` (the connection failed),
    ``http_<status>`` (fal answered with an error but named none), else the error's class in
    snake case — so `status` and ``status --json`` never show a failure without a type."""
    known = kind_of(exc)
    if known:
        return known
    if isinstance(exc.__cause__, httpx.TransportError):
        return "network_error"
    if exc.status_code:
        return f"http_{exc.status_code}"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def settle(session: Session, rt: Runtime, fence: Fence, exc: ProviderError, **cost: Any) -> str:
    """What an attempt that fal failed leads to, for submit and download alike: a retry or the end.

    Only a failure that may pass (:class:`RetryableProviderError`) is tried again, as a new
    attempt after a backoff (at least fal's ``Retry-After``), while attempts remain
    (``WANBATCH_MAX_ATTEMPTS``); any other failure, or the last attempt's, ends the job with
    fal's own words. ``cost`` (what fal billed for the attempt) is recorded either way.

    Returns what it did, the step's outcome (:data:`~worker.logs.TERMINAL_OUTCOMES`): ``retry``
    (the job waits for a new attempt), ``failed`` (it ended, the last attempt's failure
    included), or ``lost-lease`` (the job moved meanwhile: nothing was written). Never read from
    the exception's class: a retryable failure of the last attempt is ``failed``.
    """
    reason = describe(exc)
    telemetry.count_provider_error(exc)
    if not isinstance(exc, RetryableProviderError):
        gone = _note_unreachable(session, rt, fence.job_id, exc)
        if gone and _upload_again(session, rt, fence, exc, gone, reason, cost):
            return "retry"
        if gone:
            reason += f" ({UPLOAD_GONE}: the next attempt uploads it again)"
        return _ended(store.fail_job(session, fence, error=reason, error_type=failure_type(exc), **cost))
    # Requests fal ended unstarted at a window's end are not the job's failures: not counted.
    attempts = store.get_job(session, fence.job_id).counted_attempts
    if attempts >= rt.settings.max_attempts:
        failed = store.fail_job(
            session,
            fence,
            reason=f"gave up after {attempts} attempt(s): {reason}",
            error=f"after {attempts} attempt(s): {reason}",
            error_type=failure_type(exc),
            **cost,
        )
        return _ended(failed)
    delay = max(backoff(rt.settings, attempts), retry_after(rt.settings, exc))
    if store.retry_later(
        session,
        fence,
        reason=f"retry in {delay:.0f}s: {reason}",
        at=in_seconds(delay),
        error=reason,
        error_type=failure_type(exc),
        **cost,
    ):
        telemetry.count_retry("provider_error")
        return "retry"
    return "lost-lease"


def _ended(failed: bool) -> str:
    """The outcome of a ``fail_job`` fenced by the job's version: ``lost-lease`` if it moved."""
    return "failed" if failed else "lost-lease"


# ------------------------------------------------------------------ input URLs fal could not download

#: fal's error type for a media input its model could not download. fal's error items carry
#: ``loc`` (the field), ``msg`` (for people: "client code should not parse and rely on" it) and
#: ``type`` ("use this for conditional logic"): https://docs.fal.ai/errors.
DOWNLOAD_ERROR_TYPE = "file_download_error"
#: fal's words for it, read only in an item without that type (the same page warns that some of
#: fal's APIs do not follow that structure yet).
_DOWNLOAD_FAILED = "Failed to download the file"
#: Why a job's upload is forgotten, in its retry's reason or its error (the retry's event
#: carries ``{"upload_gone": [urls]}``: a job is sent again for it once).
UPLOAD_GONE = "fal's storage no longer had the uploaded copy of a local file"


def _texts(value: object) -> Iterator[str]:
    """Every string inside a JSON-like value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)


@dataclass(frozen=True, slots=True)
class SentMedia:
    """One media value an attempt sent as a URL."""

    #: The field (``image_url``), with the item's index for a list field (``image_urls[1]``).
    field: str
    name: str
    index: int | None
    url: str
    #: Sent in place of a local file: wanbatch's upload, from the cache or new.
    upload: bool


def sent_media(endpoint: str, stored: Mapping[str, Any], sent: Mapping[str, Any] | None) -> list[SentMedia]:
    """The media values of an input as ``sent`` (``stored``: the job's input as validated) that
    went as URLs, each marked as an upload when the stored value is a local file."""
    found: list[SentMedia] = []
    for fld in get_endpoint(endpoint).media_fields:
        raw, out = stored.get(fld.name), (sent or {}).get(fld.name)
        pairs: list[tuple[int | None, object, object]]
        if isinstance(raw, list) and isinstance(out, list):
            pairs = [(i, local, url) for i, (local, url) in enumerate(zip(raw, out, strict=False))]
        else:
            pairs = [(None, raw, out)]
        for index, local, url in pairs:
            if isinstance(url, str) and classify(url) is MediaKind.URL:
                upload = isinstance(local, str) and classify(local) is MediaKind.PATH
                shown = fld.name if index is None else f"{fld.name}[{index}]"
                found.append(SentMedia(shown, fld.name, index, url, upload))
    return found


def _uploaded_urls(job: Job) -> list[str]:
    """The storage URLs this attempt sent in place of local files (uploads, from the cache or
    new): the media fields whose stored input is a local path and whose sent input is a URL."""
    return [m.url for m in sent_media(job.endpoint, job.input, job.submitted_input) if m.upload]


def _download_failures(exc: ProviderError) -> list[object]:
    """The items of fal's 422 that say an input could not be downloaded: of fal's error type
    (:data:`DOWNLOAD_ERROR_TYPE`), else — an item of no type — in fal's words."""
    if exc.status_code not in (None, 422):
        return []
    items = exc.detail if isinstance(exc.detail, list) else [exc.detail]
    found: list[object] = []
    for item in items:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == DOWNLOAD_ERROR_TYPE or (
            not isinstance(kind, str) and any(_DOWNLOAD_FAILED in t for t in _texts(item))
        ):
            found.append(item)
    return found


def _named_by(item: object, sent: list[SentMedia]) -> list[SentMedia]:
    """The sent values a download failure is about: those of the field (and list index) its
    ``loc`` names (``["body", "image_url"]``); for an item whose ``loc`` names none of them, those
    whose URL its words quote."""
    loc = item.get("loc") if isinstance(item, dict) else None
    if isinstance(loc, list):
        path = loc[1:] if loc[:1] == ["body"] else loc
        if path and isinstance(path[0], str):
            index = path[1] if len(path) > 1 and isinstance(path[1], int) else None
            named = [m for m in sent if m.name == path[0] and (index is None or m.index == index)]
            if named:
                return named
    texts = list(_texts(item))
    return [m for m in sent if any(m.url in t for t in texts)]


def unreachable_inputs(job: Job, exc: ProviderError) -> list[SentMedia]:
    """The input URLs of ``job``'s attempt that fal said, in ``exc``, it could not download
    (its 422 "Failed to download the file from URL: 404 Not Found"): the user's own URLs, and
    uploads fal's storage dropped. Each once."""
    sent = sent_media(job.endpoint, job.input, job.submitted_input)
    found: dict[str, SentMedia] = {}
    for item in _download_failures(exc):
        for media in _named_by(item, sent):
            found.setdefault(media.url, media)
    return list(found.values())


def _note_unreachable(session: Session, rt: Runtime, job_id: str, exc: ProviderError) -> list[str]:
    """Take in what fal said it could not download for this attempt (:func:`unreachable_inputs`):
    every such URL is noted for this process (:class:`~worker.steps.dead_inputs.DeadInputs`), so
    that the jobs not sent yet that would send it are not sent with it
    (:func:`worker.steps.submit.submit`); the uploads among them are forgotten from the upload
    cache, so that no later job sends them again. Returns those uploads (a user's own URL is
    never among them)."""
    if not _download_failures(exc):
        return []
    job = store.get_job(session, job_id)
    found = unreachable_inputs(job, exc)
    now = utcnow()
    new = rt.dead_inputs.learn(DeadInput(m.url, m.field, job_id, now, m.upload) for m in found)
    gone = [m.url for m in found if m.upload]
    if gone:
        store.forget_uploads(session, gone)
        log.warning(
            "job %s: %s (%s); forgotten, uploaded again next time",
            job_id,
            UPLOAD_GONE,
            ", ".join(gone),
            extra={"event": "submit.upload_gone", "job_id": job_id},
        )
    for dead in new:
        if not dead.upload:
            log.warning(
                "job %s: fal could not download %s (%s); jobs of this process not sent yet that "
                "carry it fail unsent (%s)",
                job_id,
                masked_url(dead.url),
                dead.field,
                INPUT_UNREACHABLE,
                extra={"event": "submit.input_unreachable", "job_id": job_id},
            )
    return gone


def unreachable_error(session: Session, dead: list[DeadInput], batch_id: str, *, simulated: bool) -> str:
    """The error of a job not sent because fal could not download one of its input URLs for
    another job (``input_unreachable``): which URL, in which field, for which job, and what to do
    — one line, as ``status`` and an export show it."""
    # A signed URL's credentials are not repeated into the error (stored, shown, exported).
    said = "; ".join(f"{masked_url(d.url)} ({d.field}) for job {d.job_id}" for d in dead)
    return (
        f"not sent: fal could not download {said}, and this job would send the same; replace the "
        f"URL in the manifest, or {_rerun_hint(session, batch_id, simulated=simulated)} once it "
        "can be fetched again"
    )


def _upload_again(
    session: Session,
    rt: Runtime,
    fence: Fence,
    exc: ProviderError,
    gone: list[str],
    reason: str,
    cost: dict[str, Any],
) -> bool:
    """Send a job fal failed only because an upload it was given had expired from fal's
    storage again, at once, as a new attempt that uploads the file anew — once per job (a
    second such failure is not a stale cache), while attempts remain, and never for a
    simulation (its uploads are remembered by the run itself). The failed attempt's cost, if
    fal billed the 422, is recorded as for any failure."""
    if rt.simulated:
        return False
    job = store.get_job(session, fence.job_id)
    if job.counted_attempts >= rt.settings.max_attempts:
        return False
    events = store.job_events(session, fence.job_id)
    if any(isinstance(e.details, dict) and "upload_gone" in e.details for e in events):
        return False
    retried = store.retry_later(
        session,
        fence,
        reason=f"retry now: {UPLOAD_GONE}, uploading it again: {reason}",
        error=reason,
        error_type=failure_type(exc),
        details={"upload_gone": gone},
        **cost,
    )
    if retried:
        telemetry.count_retry("upload_gone")
    return retried


def billed(job: JobView, outcome: billing.Outcome) -> dict[str, Any]:
    """The job's actual cost after this attempt ended as ``outcome`` (earlier attempts included)."""
    return billing.billed(
        outcome,
        job.est_billing_units,
        job.est_usd,
        prior_units=job.actual_billing_units,
        prior_usd=job.actual_usd,
    )


def cost_of_failure(job: JobView, exc: ProviderError) -> dict[str, Any]:
    """What fal bills for an attempt that ended in ``exc``: the rule for its outcome class
    (``jobs/billing_rules.yaml``: 5xx never, a 4xx — a 422, a model error such as ``bad_request`` —
    only when a runner spent inference time)."""
    return billed(job, billing.classify_failure(exc.status_code, exc.error_type, job.provider_metrics))


# ------------------------------------------------------------------ submissions of unknown outcome

#: Why waiting on an ambiguous submit cannot help when no webhook receiver is configured.
NO_RECEIVER = (
    "no webhook receiver is configured (WANBATCH_WEBHOOK_URL), so nothing can prove whether fal "
    "accepted it and waiting would change nothing"
)


def submit_outcome_unknown(
    session: Session, rt: Runtime, fence: Fence, why: str, *, settle_now: bool = True
) -> bool:
    """``submitting`` → ``submit_unknown`` for a POST that may have been accepted; then, unless
    something can still prove the outcome, ``WANBATCH_SUBMIT_UNKNOWN_POLICY`` at once.

    Only fal's webhook (sent to ``WANBATCH_WEBHOOK_URL`` with the job id and attempt) can tell
    later whether such a request exists — fal has no "list my requests" call. With a receiver
    the job waits up to ``WANBATCH_SUBMIT_UNKNOWN_DEADLINE`` for that proof; without one it
    would wait for nothing, so the policy is applied now (``settle_now``; else the job is due
    at once for the reconciler) and the reason says why. The event into ``submit_unknown`` is
    written either way: the history shows the ambiguity. Returns whether the job moved;
    :func:`outcome_unknown` says what became of it.
    """
    return outcome_unknown(session, rt, fence, why, settle_now=settle_now) != "lost-lease"


def outcome_unknown(session: Session, rt: Runtime, fence: Fence, why: str, *, settle_now: bool = True) -> str:
    """:func:`submit_outcome_unknown`, returning what it did, the submit step's outcome (as
    :func:`settle` returns one): ``ambiguous`` (the job waits in ``submit_unknown`` for fal's
    webhook proof, or for the reconciler), what the policy did at once (:func:`settle_unknown`:
    ``failed`` — its step line then a WARNING with the job's ``error`` and ``error_type``, as
    every job that failed for good —, ``retry``, ``adopted``), or ``lost-lease`` (the job moved
    meanwhile: nothing was written)."""
    if rt.simulated:
        return resend_to_simulator(session, rt, fence, why)
    waits = bool(rt.settings.webhook_url)
    deadline = in_seconds(rt.settings.submit_unknown_deadline if waits else 0)
    if not store.mark_submit_unknown(session, fence, why=why, due_at=deadline):
        return "lost-lease"
    telemetry.count_ambiguous_submit()
    if settle_now and not waits:
        settled = settle_unknown(session, rt, store.get_job(session, fence.job_id), NO_RECEIVER)
        if settled != "lost-lease":
            return settled
    return "ambiguous"


def held_request_why(request_id: str, holder: str, *, how: str = "answered the submit") -> str:
    """Why a job does not take ``request_id``, fal's id for one of its submits that job
    ``holder`` already holds (:class:`~jobs.errors.RequestHeldError`), for its history and
    error. ``how``: how fal named it (its submit's answer, the journal that kept that answer)."""
    return (
        f"provider protocol error: fal {how} with request id {request_id}, "
        f"which job {holder} already holds (each accepted submit gets a request of its own); "
        "this job does not take that request's result, and its own request, if fal made one, is unknown"
    )


def request_held_elsewhere(
    session: Session,
    rt: Runtime,
    fence: Fence,
    request_id: str,
    holder: str,
    *,
    how: str = "answered the submit",
) -> bool:
    """fal answered this job's POST (``how``: its answer, or the journal that kept it) with a
    request id job ``holder`` already holds (:class:`~jobs.errors.RequestHeldError`): a provider
    protocol error. The job must not follow that request — its result is the other job's video,
    which would be stored twice and its cost counted twice — so it is not recorded, nor
    cancelled at fal (it is the other job's).

    The job is, or goes to, ``submit_unknown``, as for a POST whose answer was lost, not to
    ``failed`` or ``retry_wait``: the POST went out and fal may well have accepted and billed a
    request of its own for it, under an id we were never told. ``submit_unknown`` counts its
    estimate as possibly billed (the budgets hold against it), waits for fal's webhook naming
    this job's attempt (the one proof of its own request) where a receiver is configured, then
    applies ``WANBATCH_SUBMIT_UNKNOWN_POLICY`` (``fail`` by default: never a silent second
    payment; ``resubmit`` counts a possible duplicate charge). A plain failure would leave that
    money uncounted; a retry would send, and maybe pay, again without saying so. A job already
    in ``submit_unknown`` (its answer came late, or from a journal) stays there, the clash on its
    history and in its error (:func:`jobs.store.note_held_request`), its deadline as it was.
    False when the job is in neither state, or moved from ``submitting`` meanwhile (its lease
    lost)."""
    why = held_request_why(request_id, holder, how=how)
    log.error(
        "job %s: fal named request id %s for it, already job %s's; not taken",
        fence.job_id,
        request_id,
        holder,
        extra={
            "event": "submit.duplicate_request",
            "job_id": fence.job_id,
            "request_id": request_id,
            "holder": holder,
        },
    )
    if fence.state == JobState.SUBMIT_UNKNOWN:
        error = f"submission outcome unknown: {why}"
        store.note_held_request(session, fence.job_id, reason=why, worker=rt.owner, error=error, fence=fence)
        return True
    if fence.state != JobState.SUBMITTING:
        return False
    moved = submit_outcome_unknown(session, rt, fence, why, settle_now=False)
    if moved and not rt.simulated and not rt.settings.webhook_url:  # nothing can prove it: settled now
        settle_unknown_submit(session, rt, store.get_job(session, fence.job_id), f"{why}; {NO_RECEIVER}")
    return moved


def unknown_submit_wait_over(settings: Settings) -> str:
    """Why a ``submit_unknown`` job that came due is settled now (for its reason)."""
    if not settings.webhook_url:
        return NO_RECEIVER
    deadline = settings.submit_unknown_deadline
    return f"no webhook proved it within WANBATCH_SUBMIT_UNKNOWN_DEADLINE ({deadline:g}s)"


#: What a resend of a submit whose outcome is unknown costs, said wherever one is advised: the
#: advice read as a plain retry ("sends it again"), and following it paid a second time for
#: every video fal had accepted (an audit: 3 of 20).
PAYS_AGAIN = "which pays a second time if fal did accept it"


def settle_unknown_submit(session: Session, rt: Runtime, job: Job, why: str) -> bool:
    """Apply ``WANBATCH_SUBMIT_UNKNOWN_POLICY`` to ``job`` (:func:`settle_unknown`); returns
    whether the job moved."""
    return settle_unknown(session, rt, job, why) != "lost-lease"


def settle_unknown(session: Session, rt: Runtime, job: Job, why: str) -> str:
    """Apply ``WANBATCH_SUBMIT_UNKNOWN_POLICY`` to ``job`` (in ``submit_unknown`` at ``job.version``);
    returns what it did: ``adopted`` (a stored proof), ``retry`` (sent again), ``failed``, or
    ``lost-lease`` (the job moved meanwhile: nothing was written).

    ``resubmit`` (while attempts remain) sends it again as a new attempt, counted in
    ``possible_duplicate_charges`` when that attempt's POST is recorded as sent
    (:func:`jobs.store.record_send`), so a job cancelled before it is not; otherwise it fails
    with "submission outcome unknown" and why.

    First the inbox is read: a success fal's webhook delivered for one of the job's attempts,
    whatever the order it came in (:func:`jobs.store.stored_proof`), proves that fal ran and
    billed it, and the job keeps that request and its result instead (:func:`_adopt_stored`):
    nothing is sent again, nothing is failed.
    """
    fence = rt.fence(job)
    if rt.simulated:
        return resend_to_simulator(session, rt, fence, why)
    proof = store.stored_proof(
        session,
        job.id,
        attempts=job.attempts,
        ours=lambda delivery: signed_by_us(session, rt.settings, delivery),
    )
    if proof is not None and _adopt_stored(session, fence, job, proof):
        return "adopted"
    resubmit = rt.settings.submit_unknown_policy == "resubmit"
    if resubmit and job.counted_attempts < rt.settings.max_attempts:
        resent = store.retry_later(
            session,
            fence,
            reason=f"outcome unknown ({why}): resubmitting (possible duplicate charge)",
            possible_duplicate=True,
        )
        if resent:
            telemetry.count_retry("ambiguous_resubmit")
        return "retry" if resent else "lost-lease"
    spent = " (no attempt left to resubmit)" if resubmit else ""
    failed = store.fail_job(
        session,
        fence,
        reason=f"submission outcome unknown: {why}{spent}",
        error=f"submission outcome unknown ({why}){spent}: fal may have accepted (and billed) it; "
        f"{_rerun_hint(session, job.batch_id, simulated=False)} sends it again, {PAYS_AGAIN}",
        error_type="submit_unknown",
    )
    return _ended(failed)


def _adopt_stored(session: Session, fence: Fence, job: Job, proof: store.StoredProof) -> bool:
    """``submit_unknown`` → ``queued`` with the request a stored webhook proved fal ran and
    finished (billed): the job's current attempt (:func:`jobs.store.adopt_request`) or an
    earlier one (:func:`jobs.store.adopt_earlier_proof`; the current one stays a possible
    duplicate charge), its result kept for the download, its status asked at once. Fenced by
    the job's version: False when it moved meanwhile (a webhook applied, say)."""
    now = utcnow()
    fetched = fetched_fields(proof.body.get("payload"))
    common: dict[str, Any] = {
        "request_id": proof.request_id,
        "gateway_request_id": request_id_or_none(proof.gateway_request_id),
        "next_poll_at": now,
    }
    if proof.attempt == job.attempts:
        moved = store.adopt_request(
            session,
            fence,
            submitted_at=job.sent_at or job.updated_at or now,
            proof="proved by a stored webhook",
            **common,
            **fetched,
        )
    else:
        moved = store.adopt_earlier_proof(
            session,
            fence,
            attempt=proof.attempt,
            reason=(
                f"proof by a stored webhook of an earlier attempt: attempt {proof.attempt} accepted "
                f"as {proof.request_id} and finished at fal (billed): its video is fetched, nothing "
                "is sent again"
            ),
            **common,
            **fetched,
        )
    if moved:
        extra = {
            "event": "submit.adopted_stored_proof",
            "job_id": job.id,
            "batch_id": job.batch_id,
            "request_id": proof.request_id,
        }
        said = (
            "job %s: a stored webhook proved fal ran attempt %s as %s (billed): kept, nothing is sent again"
        )
        args = (job.id, proof.attempt, proof.request_id)
        # Said once committed: a commit the database refuses (its disk is full) keeps nothing.
        db.after_commit(session, partial(log.warning, said, *args, extra=extra))
    return moved


def _rerun_hint(session: Session, batch_id: str, *, simulated: bool) -> str:
    """``wanbatch rerun REF --failed-only``, as a stored error says it: a command that still
    works when copied from ``status``, the dashboard or an export long after it was written.

    REF is the batch's name as :func:`~jobs.printable.shell_ref` gives it for a batch sent to
    fal, whose name never changes. A simulation's may: one a batch for fal takes the name of is
    renamed ``NAME-simulated`` (:func:`jobs.store.name_for_batch`), and its old name then names
    the paid batch. So a simulation is named by its id's first characters, which stay its own.
    """
    if simulated:
        return f"`wanbatch rerun {batch_id[:SHELL_ID_CHARS]} --failed-only --simulate`"
    ref = shell_ref(store.get_batch(session, batch_id).name, batch_id)
    return f"`wanbatch rerun {ref} --failed-only`"


def resend_to_simulator(session: Session, rt: Runtime, fence: Fence, why: str) -> str:
    """A simulation's submit whose outcome is unknown (``submitting`` or ``submit_unknown``):
    send it again, to this ``--simulate`` run's simulator, while attempts remain.

    It went to a simulator, never to a provider that bills: nothing of it was possibly billed,
    and sending it again costs nothing (:data:`jobs.store.UNPROVEN_EXITS` leaves a simulation's
    money alone). The simulator that may have it lived in a process that stopped (a lost
    worker), or is this run's own, where a request it keeps is only a placeholder render; so
    neither the policy nor a possible duplicate charge applies. Only when no attempt is left
    (``WANBATCH_MAX_ATTEMPTS``) does it fail, without words of billing. Returns what it did:
    ``retry``, ``failed`` or ``lost-lease`` (the job moved meanwhile).
    """
    job = store.get_job(session, fence.job_id)
    attempts = job.counted_attempts
    if attempts < rt.settings.max_attempts:
        resent = store.retry_later(
            session,
            fence,
            reason=f"outcome unknown ({why}): a simulation's request, never at fal: "
            "sent again to this run's simulator",
        )
        return "retry" if resent else "lost-lease"
    failed = store.fail_job(
        session,
        fence,
        reason=f"submission outcome unknown: {why} (no attempt left)",
        error=f"submission outcome unknown ({why}) after {attempts} attempt(s): a simulation, "
        f"nothing was billed; {_rerun_hint(session, job.batch_id, simulated=True)} sends it again",
        error_type="submit_unknown",
    )
    return _ended(failed)


# ------------------------------------------------------------------ failures that are not the job's


def pause_for_account(session: Session, rt: Runtime, batch_id: str, exc: AccountLockedError) -> str:
    """Pause ``batch_id`` because fal refused the account (401/402/403); returns the reason.

    The same refusal would meet every job, so none is failed for it: the batch stops sending,
    ``status`` shows the reason, and the jobs stay where they are (requests already at fal are
    still polled: they run and are billed regardless). Running the batch again resumes it.

    The reason names the process that heard the refusal (``host:pid``) and the id of the key it
    sent (:func:`~worker.limits.api_key_id`): with several workers, one given a wrong ``FAL_KEY``
    pauses every batch it touches, and the operator must find that one, not doubt a good key.
    fal's 401 for a key that is no ``<key id>:<key secret>`` adds what is wrong with its shape.

    Said once, as a warning, when the batch's state changes (:func:`jobs.store.pause_for_refusal`);
    the refusals of the calls after it (every job's submit, status and result is refused alike)
    at debug level only.
    """
    # `status` adds how to go on once it is fixed
    reason = f"{exc}{store.ACCOUNT_PAUSE_MARK}{refused_by(rt)})"
    if exc.status_code == 401 and (shape := rt.settings.key_shape_problem(refused=True)):
        reason += f"; {shape}"  # fal's 401 says only "rejected": say what is wrong with the key
    changed = store.pause_for_refusal(session, batch_id, reason)
    # Every call a revoked key sends is refused alike: the pause is news once per batch, each
    # refusal after it only for debugging.
    log.log(
        logging.WARNING if changed else logging.DEBUG,
        "batch %s paused: %s" if changed else "batch %s still paused: %s",
        batch_id,
        reason,
        extra={"event": "batch.account_refused", "batch_id": batch_id},
    )
    return reason


def pause_for_missing_input(session: Session, batch_id: str, exc: MissingInputError) -> str:
    """Pause ``batch_id`` because a job's local input file is not there; returns the reason.

    Nothing was sent, so nothing is lost by waiting, while failing the job (as was done) ended
    every unsent job of a moved project for good (``input_file``), and ``run NEW/m.yaml``, which
    gives the batch its new place, left them failed with the old path. The same holds for one
    file of many deleted (on purpose, perhaps): the batch waits, naming it, for the user to put
    it back or take its item out of the manifest — cheaper than a job failed by mistake.

    The reason says which file — or, when the manifest's whole folder is gone, which folder —
    and the ways on: submitting the manifest from its new place (``run NEW-FOLDER/m.yaml``,
    which resumes the batch and gives its jobs the new paths), or ``run BATCH`` once the file
    or disk is back. A rerun has no manifest of its own: its root's manifest gives it (and its
    reruns) the new place (:func:`jobs.store.reruns_follow`). Warned once per pause."""
    batch = store.get_batch(session, batch_id)
    root = store.root_batch(session, batch)
    manifest = Path(root.manifest_path)
    simulate = " --simulate" if batch.simulated else ""
    folder = manifest.parent
    try:
        gone = not folder.is_dir()
    except OSError:
        gone = True
    if gone and Path(exc.path).is_relative_to(folder):
        what = f"the manifest's folder {shown_path(folder)} is gone (moved or renamed? its disk not mounted?)"
    else:
        what = f"{exc} (deleted, or moved?)"
    ref = shell_ref(batch.name, batch.id)
    place = f"`wanbatch run NEW-FOLDER/{shown_path(manifest.name)}{simulate}`"
    if root.id != batch.id:  # a rerun: its root's manifest takes it along
        place += (
            f" (batch {root.name}'s manifest: its reruns move with it), then `wanbatch run {ref}{simulate}`"
        )
    back = "the folder is back (its disk mounted)" if gone else "the file is back"
    removed = "" if gone else "; deleted on purpose? take its item out of the manifest and run that"
    reason = (
        f"{store.INPUTS_PAUSE_PREFIX}{what}; nothing of it was sent. If the project moved, {place} "
        f"gives the batch its new place and goes on; once {back}, `wanbatch run {ref}{simulate}` "
        f"goes on{removed}"
    )
    changed = store.pause_for_inputs(session, batch_id, reason)
    log.log(
        logging.WARNING if changed else logging.DEBUG,
        "batch %s paused: %s" if changed else "batch %s paused already; a job of it: %s",
        batch_id,
        reason if changed else exc,
        extra={"event": "batch.input_missing", "batch_id": batch_id},
    )
    return reason


def refused_by(rt: Runtime) -> str:
    """``worker host:pid with key id 1a2b…``: who sent what fal refused, for the operator to find it."""
    return f"sent by worker {process_prefix().rstrip(':')} with key id {api_key_id(rt.settings)}"
