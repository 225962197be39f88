"""Webhooks: keep each verified delivery from fal in the inbox, then apply it to its job.

A delivery says fal finished request ``request_id`` (``OK`` or ``ERROR``); the ``fal_webhook``
URL fal called carries the job id and attempt it belongs to (:func:`worker.steps.submit.webhook_for`).
Applying it makes the very moves the poller makes (:func:`worker.steps.poll.record_completion`,
compare-and-set on the job's state and version), so a webhook and a poll racing are harmless:

* the job's own request, ``queued``/``running``/``cancelling`` → ``downloading`` (or
  ``cancelled``), the download queued at once when a runtime can queue it, else found by the
  tick's ``schedule_downloads``;
* the same request *failed* (``ERROR``, a cancel included): the job is made due for a status
  call at once instead (``status due``), and the poller settles it from fal's status. A webhook
  carries no run-time metrics (``{request_id, gateway_request_id, status, payload, error}``),
  and what fal bills for a failure or a cancel depends on whether the request ran: a 4xx after
  inference time or a cancel while running is billed, the same before a runner took it is not.
  settled from the webhook alone, each would be recorded as costing nothing;
* a request we never recorded, for the job's current attempt, while that attempt's POST is in
  flight or its answer was lost (``submitting`` with its input recorded, ``submit_unknown``):
  proof that fal accepted it. The job adopts the request id (``queued``, then as above) and
  is never sent again;
* a request we never recorded, for the attempt whose resend (``WANBATCH_SUBMIT_UNKNOWN_POLICY``
  ``resubmit``) has not gone out yet (``retry_wait``, ``pending``, ``submitting`` before its POST
  is recorded as sent): the job adopts it instead and the resend is dropped
  (:func:`jobs.store.adopt_before_resend`), nothing paid twice;
* a success for an earlier attempt of a job that has no live request of its own (its resend's
  answer lost too, ``submit_unknown``; or to be sent again, any request id it keeps one that
  ended): adopted with its result
  (:func:`jobs.store.adopt_earlier_proof`), nothing more sent; the later attempt stays a
  possible duplicate charge;
* a success for any attempt of a job failed for its unknown submit outcome: adopted
  (:func:`jobs.store.adopt_late_proof`), its video fetched;
* a request we never recorded, for an attempt beyond those the database recorded as sent, of a
  job it would send (again) (``pending``, ``retry_wait``, ``submitting`` before its POST is
  recorded as sent): a token is minted only for a submit about to be recorded, so the database
  is behind fal — restored from an older backup. The job adopts the request, its attempts catch
  up, it is never sent again (:func:`jobs.store.adopt_restored_proof`); said once per process in
  a warning (:func:`_adopt_restored_proof`). Never a duplicate charge;
* a success of a failed job's own request, when the poller failed it without knowing how fal
  ended it (:data:`jobs.store.PROVABLE_FAILURES`): adopted back (:func:`jobs.store.adopt_own_proof`);
* a success of a cancelled job's own request, which fal's status said our cancel ended (fal's
  cancel of a running request is best effort): adopted back, its cancel's bill taken back and
  the success billed in full (:func:`jobs.store.adopt_cancelled_proof`);
* a success of the request of a job a cancel ended while that request was its only one, its
  outcome unknown (``submit_unknown``, or its resend not sent yet): adopted, its video fetched,
  billed once in full, nothing sent (:func:`jobs.store.adopt_unknown_cancelled`); a proof of an
  earlier attempt whose resend went out stays a duplicate charge;
* a success of a request a batch's window end was said to have cancelled, its job back to wait
  for the next window (:func:`jobs.store.window_end`): the job takes it back instead of sending it
  again (:func:`jobs.store.adopt_window_proof`), the cancel's bill taken back; once the job sent
  again, a *confirmed* duplicate charge billed in place of that bill
  (:func:`jobs.store.note_window_duplicate`);
* a request we never recorded otherwise (an earlier attempt resent after an ambiguous submit,
  or a second request of one attempt), whatever the job's state, a finished job's included:
  fal ran and billed it besides the one the job keeps, a *confirmed* duplicate charge, counted
  once on the job, put on its history and, when fal reports it done, billed in its actual cost
  (:func:`_duplicate_charge`);
* a request another job of the same fal queue holds (:func:`jobs.store.request_holder`): a
  provider protocol error, never proof of this job's submit nor a duplicate charge of it (the
  request is the other job's): acknowledged and ignored, said in an error line;
* an unknown job, a finished job's own request, a request already handled: acknowledged and
  ignored.

Each delivery is applied once: taking it (``processed_at``) is itself a compare-and-set, in the
transaction that applies it. The tick applies whatever the receiver stored but did not apply.

fal signs the webhooks of every account with the same keys
(https://docs.fal.ai/model-apis/model-endpoints/webhooks), so a valid signature proves that fal
sent a delivery, not that its request is ours: anyone with a fal account could put one of our
job ids in a ``fal_webhook`` URL of their own, and have fal deliver "proof" that the job's
ambiguous submit was accepted as *their* request. So each URL also carries a token,
an HMAC of its job id and attempt under a secret of the database (:func:`binding_token`), and
the receiver refuses a delivery whose token does not match before anything is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from jobs import billing, db, store
from jobs.errors import NotFoundError
from jobs.fingerprint import FINGERPRINT_HEX_DIGITS as FINGERPRINT_HEX_DIGITS
from jobs.fingerprint import FINGERPRINT_LABEL as FINGERPRINT_LABEL
from jobs.fingerprint import database_fingerprint as database_fingerprint
from jobs.models import Job, WebhookDelivery, utcnow
from jobs.settings import Settings
from jobs.store import Fence
from worker.fal.models import Status, request_id_or_none
from worker.fal.redact import redact_value
from worker.fal.results import fetched_fields
from worker.fal.webhooks import VerifiedDelivery
from worker.steps.accounts import account_verdict
from worker.steps.context import Runtime, S, worker_identity
from worker.steps.poll import first_poll_at, record_completion

log = logging.getLogger(__name__)

#: Job states in which the job's own request is at fal and a completion moves it on.
_AT_FAL = (S.QUEUED, S.RUNNING, S.CANCELLING)
#: Tries to apply one delivery when the job keeps moving under it; then the tick tries again.
_TRIES = 3
#: What applying a failure reported by webhook does: the job waits for fal's status, asked at once.
STATUS_DUE = "status due: a failure by webhook says not whether the request ran"
#: What a delivery not applied yet says: the tick applies it later.
DEFERRED = "deferred: the job kept moving, or a worker holds it"
#: What applying a success proved for a job the deadline had failed does (:func:`_late_proof`).
ADOPTED_LATE = "adopted: a late proof of a job failed for its unknown submit outcome"
#: What applying a proof of the attempt a pending resend was to replace does
#: (:func:`jobs.store.adopt_before_resend`).
ADOPTED_BEFORE_RESEND = "adopted: a proof of the attempt its pending resend replaced; not resent"
#: What applying a success of an earlier attempt does, for a job that has no live request of
#: its own (:func:`jobs.store.adopt_earlier_proof`).
ADOPTED_EARLIER = "adopted: a proof of an earlier attempt; nothing is sent again"
#: What applying a success of a failed job's own request does (:func:`jobs.store.adopt_own_proof`).
ADOPTED_OWN = "adopted: a proof that the failed job's own request finished at fal"
#: What applying a success of a cancelled job's own request does
#: (:func:`jobs.store.adopt_cancelled_proof`).
ADOPTED_CANCELLED = "adopted: a proof that fal ran to the end the request our cancel was said to end"
#: What applying a success of the only request of a job cancelled while its outcome was unknown
#: does (:func:`jobs.store.adopt_unknown_cancelled`).
ADOPTED_UNKNOWN_CANCELLED = (
    "adopted: a proof that fal ran to the end the only request of a job cancelled with its outcome unknown"
)
#: What applying a success of the request a window's end was said to end, while the job waits to
#: send it again, does (:func:`jobs.store.adopt_window_proof`).
ADOPTED_WINDOW = "adopted: a proof that fal ran to the end the request a window's end was said to end"
#: What applying a proof of an attempt the database never recorded as sent does, for a job it
#: would send (again): the database is behind fal, restored from an older backup
#: (:func:`jobs.store.adopt_restored_proof`).
ADOPTED_RESTORED = "adopted: a proof of an attempt the database never recorded as sent (restored backup)"
#: Outcomes after which the tick leader has work (:func:`jobs.db.notify_events`, on PostgreSQL),
#: in whichever process it runs: a moved job's download to queue and the slot it freed to fill,
#: or a job due for its status call now.
_ADOPTED = (
    "adopted",
    ADOPTED_LATE,
    ADOPTED_BEFORE_RESEND,
    ADOPTED_EARLIER,
    ADOPTED_OWN,
    ADOPTED_CANCELLED,
    ADOPTED_WINDOW,
    ADOPTED_UNKNOWN_CANCELLED,
    ADOPTED_RESTORED,
)
_WAKES = ("completed", STATUS_DUE, *_ADOPTED)


#: The :class:`~jobs.models.InstanceSecret` that keys the webhook URLs' tokens, made with the
#: database (:data:`jobs.store.WEBHOOK_SECRET`).
WEBHOOK_SECRET = store.WEBHOOK_SECRET
#: Hex digits of a token: 128 bits of HMAC-SHA256, beyond guessing.
TOKEN_HEX_DIGITS = 32

#: Per engine, not per URL: a database dropped and made again under the same URL (as tests do)
#: has a secret of its own.
_secrets: weakref.WeakKeyDictionary[Engine, bytes] = weakref.WeakKeyDictionary()
_secrets_lock = threading.Lock()


def webhook_secret(engine: Engine) -> bytes:
    """The database's webhook secret; read once per process and engine (it never changes). Made
    when the database is created or upgraded (:data:`jobs.store.WEBHOOK_SECRET`), so that every
    backup holds it; made here the first time any process asks for it otherwise (a database
    whose secret row was deleted by hand), as before."""
    with _secrets_lock:
        known = _secrets.get(engine)
    if known is not None:
        return known
    with db.session_scope(engine) as session:
        value = store.instance_secret(session, WEBHOOK_SECRET, store.new_secret_value)
    secret = bytes.fromhex(value)
    with _secrets_lock:
        _secrets[engine] = secret
    return secret


def binding_token(secret: bytes, job_id: str, attempt: int) -> str:
    """The token a ``fal_webhook`` URL carries for ``job_id``'s ``attempt``
    (:func:`worker.steps.submit.webhook_for`)."""
    digest = hmac.new(secret, f"{job_id}:{attempt}".encode(), hashlib.sha256).hexdigest()
    return digest[:TOKEN_HEX_DIGITS]


def binding_holds(secret: bytes, job_id: str | None, attempt: int | None, token: str | None) -> bool:
    """Whether a delivery's URL names a job and attempt one of our submits gave fal."""
    if job_id is None or attempt is None or token is None:
        return False
    return hmac.compare_digest(binding_token(secret, job_id, attempt), token)


def _everything(_batch_id: str) -> bool:
    return True


@dataclass(frozen=True)
class Inbox:
    """What storing and applying deliveries needs; the receiver has no fal client, so no
    :class:`~worker.steps.Runtime` is required. ``enqueue_download``: queue a download at once
    (None: leave it to the tick); ``in_scope``: the batches whose downloads this process queues."""

    engine: Engine
    settings: Settings
    owner: str = field(default_factory=worker_identity)
    enqueue_download: Callable[[str], None] | None = None
    in_scope: Callable[[str], bool] = _everything

    @classmethod
    def of(cls, rt: Runtime) -> Inbox:
        """The inbox as a worker's runtime applies it."""
        return cls(rt.engine, rt.settings, rt.owner, rt.enqueue_download, rt.in_scope)


#: What a delivery signed for another fal account than ours is settled as (:func:`account_verdict`).
FOREIGN = "ignored: signed for another fal account"


def receive(
    inbox: Inbox, delivery: VerifiedDelivery, *, job_id: str | None, attempt: int | None
) -> int | None:
    """Store a verified delivery (once per distinct body) and apply it; returns its inbox id,
    or None for one signed for another fal account than ours (:func:`account_verdict`: not
    stored, the receiver refuses it).

    The delivery is committed before it is applied: a failure while applying leaves it in the
    inbox for the tick, and fal gets its 2xx either way.
    """
    fal_key = inbox.settings.fal_key.get_secret_value() if inbox.settings.fal_key else ""
    with db.session_scope(inbox.engine) as session:
        verdict = account_verdict(
            session, inbox.settings, job_id, attempt, delivery.request_id, delivery.user_id
        )
        if verdict == "foreign":  # the receiver refuses it (403), in one log line
            return None
        delivery_id, new = store.store_delivery(
            session,
            request_id=delivery.request_id,
            body_sha256=delivery.body_sha256,
            job_id=job_id,
            attempt=attempt,
            status="OK" if delivery.ok else "ERROR",
            body=redact_value(delivery.body, [fal_key]),
            user_id=delivery.user_id,
        )
    if not new:
        log.info(
            "webhook for %s delivered again (stored once)",
            delivery.request_id,
            extra={"event": "webhook.repeated", "job_id": job_id, "request_id": delivery.request_id},
        )
    try:
        apply_delivery(inbox, delivery_id)
    except Exception as exc:  # stored: the tick applies it later; fal must not resend for our bug
        # A locked or unreachable database is no bug: a warning of one line, no traceback.
        unavailable = db.is_unavailable(exc)
        log.log(
            logging.WARNING if unavailable else logging.ERROR,
            "webhook %d: applying failed%s; the tick will try again",
            delivery_id,
            f" (the database is unavailable: {db.database_problem(exc)})" if unavailable else "",
            exc_info=not unavailable,
            extra={"event": "webhook.apply_failed", "job_id": job_id, "request_id": delivery.request_id},
        )
        if job_id is not None:
            _announce(inbox, f"webhook:{job_id}")
    return delivery_id


def _announce(inbox: Inbox, payload: str) -> None:
    """Wake the tick leader (PostgreSQL) in a transaction of its own; best effort, as the
    leader's next tick finds the same work anyway."""
    try:
        with db.session_scope(inbox.engine) as session:
            db.notify_events(session, payload)
    except Exception as exc:
        unavailable = db.is_unavailable(exc)  # locked, unreachable: one line, no traceback
        log.warning(
            "could not wake the tick leader (%s)%s; its next tick will do",
            payload,
            f": the database is unavailable: {db.database_problem(exc)}" if unavailable else "",
            exc_info=not unavailable,
            extra={"event": "webhook.notify_failed"},
        )


def apply_pending(rt: Runtime, limit: int = 200) -> int:
    """Apply every stored delivery not applied yet (the tick's safety net); returns how many."""
    inbox = Inbox.of(rt)
    # Only a look (every tick, nearly always finding nothing): no write lock. Each delivery is
    # then taken in its own transaction, which refuses one another process took meanwhile.
    with db.read_scope(rt.engine) as session:
        ids = store.unprocessed_deliveries(session, limit=limit)
    return sum(apply_delivery(inbox, delivery_id) != "deferred" for delivery_id in ids)


#: Seconds between two prunings of the inbox by one process (:func:`prune_applied`).
PRUNE_EVERY = 600.0
#: Most deliveries one pruning deletes (one short transaction); the next takes the rest.
PRUNE_BATCH = 1000
_pruned_at: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()


def prune_applied(rt: Runtime, *, now: float | None = None) -> int:
    """Delete applied deliveries older than ``WANBATCH_WEBHOOK_RETENTION``
    (:func:`jobs.store.prune_deliveries`), at most every :data:`PRUNE_EVERY` seconds per
    process and engine; how many. The tick's: the receiver keeps no schedule of its own."""
    clock = time.monotonic() if now is None else now
    last = _pruned_at.get(rt.engine)
    if last is not None and clock - last < PRUNE_EVERY:
        return 0
    _pruned_at[rt.engine] = clock
    before = utcnow() - timedelta(seconds=rt.settings.webhook_retention)
    with db.session_scope(rt.engine) as session:
        pruned = store.prune_deliveries(session, before=before, limit=PRUNE_BATCH)
    if pruned:
        log.info(
            "webhook inbox: %d applied deliveries older than %s pruned",
            pruned,
            timedelta(seconds=rt.settings.webhook_retention),
            extra={"event": "webhook.pruned"},
        )
    if pruned == PRUNE_BATCH:
        _pruned_at.pop(rt.engine, None)  # more to take: the next tick goes on
    return pruned


def apply_delivery(inbox: Inbox, delivery_id: int) -> str:
    """Apply one stored delivery to its job; returns what it did (stored as its ``outcome``):
    ``completed``, ``adopted``, :data:`STATUS_DUE`, ``duplicate-charge``, ``ignored: …``,
    ``deferred`` (the job kept moving, or a worker holds it; the tick tries again),
    :data:`FOREIGN` (signed for another fal account: :func:`account_verdict`) or ``taken``
    (already applied)."""
    queue: str | None = None
    with db.session_scope(inbox.engine) as session:
        delivery = store.take_delivery(session, delivery_id)
        if delivery is None:
            return "taken"
        if delivery.user_id is not None and (
            account_verdict(
                session,
                inbox.settings,
                delivery.job_id,
                delivery.attempt,
                delivery.request_id,
                delivery.user_id,
            )
            == "foreign"
        ):  # stored before its job's key's account was learnt: checked against it now
            store.settle_delivery(session, delivery_id, FOREIGN)
            log.warning(
                "webhook for job %s (request %s) was signed for fal account %s, not ours: ignored",
                delivery.job_id,
                delivery.request_id,
                delivery.user_id,
                extra={
                    "event": "webhook.foreign_account",
                    "job_id": delivery.job_id,
                    "request_id": delivery.request_id,
                },
            )
            return FOREIGN
        outcome, queue = _apply(session, inbox, delivery)
        if outcome is None:
            store.defer_delivery(session, delivery_id, DEFERRED)
            return "deferred"
        store.settle_delivery(session, delivery_id, outcome)
        if outcome in _WAKES and delivery.job_id is not None:  # heard at commit, with the move
            db.notify_events(session, f"webhook:{delivery.job_id}")
        if queue is not None:
            session.commit()
    if queue is not None and inbox.enqueue_download is not None:
        inbox.enqueue_download(queue)
    return outcome


def status_of(body: dict[str, Any]) -> Status:
    """fal's webhook body as the status answer it stands for: COMPLETED, with fal's error if any.

    ``{"status": "ERROR", "error": "Invalid status code: 422", "payload": {"detail": …}}``;
    a model's failure carries its ``error_type`` in the payload, as the result endpoint does.
    """
    payload = body.get("payload")
    error = body.get("error") if isinstance(body.get("error"), str) else None
    error_type = payload.get("error_type") if isinstance(payload, dict) else None
    if not isinstance(error_type, str):
        error_type = None
    if body.get("status") != "OK" and error is None and error_type is None:
        error = "fal reported the request failed"
    return Status(state="COMPLETED", error=error, error_type=error_type, raw=body)


def settles(status: Status) -> bool:
    """Whether a completion fal reported is enough to settle its job: a success always (billed
    in full, ran or not); a failure only with the run time the bill depends on
    (``metrics.inference_time``), which fal's status carries and its webhooks never do."""
    return not status.failed or "inference_time" in status.metrics


#: What :func:`_apply` answers: ``(outcome, job id whose download to queue)``; outcome None:
#: try again later.
_Answer = tuple[str | None, str | None]


@dataclass(frozen=True)
class _Try:
    """One try at applying ``delivery`` to its job, read afresh at ``now``: what every case needs.
    ``state`` and ``fence`` are the job's as read, which an adoption moves on (:func:`_adopt`);
    ``gateway``: fal's gateway id of the request, read from the body once for every try."""

    session: Session
    inbox: Inbox
    delivery: WebhookDelivery
    status: Status
    gateway: str | None
    job: Job
    state: S
    now: datetime
    fence: Fence

    @property
    def result(self) -> dict[str, Any]:
        """What a success's result gives the download (:func:`_fetched`); nothing for a failure."""
        return {} if self.status.failed else _fetched(self.delivery.body)

    def proof(self, attempt: int, reason: str) -> dict[str, Any]:
        """What the store's adoption of a request we never recorded takes besides its id: fal's
        gateway id, the attempt the delivery proves, the job's reason, and the result."""
        return {"gateway_request_id": self.gateway, "attempt": attempt, "reason": reason, **self.result}


@dataclass(frozen=True)
class _Moved:
    """A case moved the job to ``queued`` (an adoption), or found it at fal: its ``outcome``, and
    the ``fence`` of the job as it stands now, for the completion (:func:`_complete`)."""

    outcome: str
    fence: Fence


#: What one case does with a delivery: moves the job on (:class:`_Moved`), answers for good, or
#: None (the job moved under it: try again).
_Step = _Moved | _Answer | None


def _apply(session: Session, inbox: Inbox, delivery: WebhookDelivery) -> _Answer:
    """``(outcome, job id whose download to queue)``; outcome None: try again later.

    Each try reads the job afresh and takes the one case that fits the delivery: a request we
    recorded for the job (:func:`_known_request`) or one we never did (:func:`_unknown_request`).
    A case that moved the job to ``queued``, or found it at fal, goes on to the completion fal
    reported (:func:`_complete`). Every move is a compare-and-set: one lost to the job moving
    under it is tried again, :data:`_TRIES` times, then left to the tick."""
    if delivery.job_id is None:
        return "ignored: no job id in the webhook URL", None
    status = status_of(delivery.body)
    gateway = request_id_or_none(delivery.body.get("gateway_request_id"))
    for _ in range(_TRIES):
        try:
            job = store.get_job(session, delivery.job_id)
        except NotFoundError:
            return "ignored: unknown job", None
        fence = Fence.of(job, inbox.owner)
        at = _Try(session, inbox, delivery, status, gateway, job, S(job.state), utcnow(), fence)
        known = store.request_known(session, job.id, delivery.request_id)
        step = _known_request(at) if known else _unknown_request(at)
        if isinstance(step, _Moved):
            step = _complete(at, step)
        if step is not None:
            return step
    return None, None


def _known_request(at: _Try) -> _Step:
    """A delivery of a request we recorded for the job. Its own request, still at fal: completed
    as the poller would. A success of a request our cancel, a window's end or the poller ended
    without knowing how fal ended it: a paid video, taken back (fal's cancel of a running
    request is best effort). One a window's end ended and the job sent again since: a confirmed
    duplicate charge. An earlier request of the job, or its own once it finished otherwise:
    acknowledged and ignored."""
    job, delivery, state, status = at.job, at.delivery, at.state, at.status
    own = job.request_id == delivery.request_id
    # A success of a request a window's end cancelled and put the job back to wait for
    # the next window: fal's cancel of a running request is best effort.
    ended = (
        store.window_end(at.session, job, delivery.request_id)
        if not status.failed and not (own and state in _AT_FAL)
        else None
    )
    if ended is not None and own and store.window_proof_adoptable(job):
        return _adopt_window_proof(at)
    if ended is not None:  # the job sent again since: fal ran and billed it twice
        return _window_duplicate(at.session, at.inbox, job, delivery, now=at.now), None
    if job.request_id != delivery.request_id:
        if store.duplicate_charge_recorded(at.session, delivery.request_id):
            return "ignored: duplicate charge already counted", None
        return "ignored: an earlier request of the job", None
    if state not in _AT_FAL and _cancel_proof(job, state, status):
        return _adopt_cancelled_proof(at)
    if state not in _AT_FAL:
        if not _own_proof(job, state, status):
            return f"ignored: job already {state.value}", None
        return _adopt_own_proof(at)
    return _Moved("completed", at.fence)


def _unknown_request(at: _Try) -> _Step:
    """A delivery of a request we never recorded for the job, taken in this order: one another
    job holds (a provider protocol error: ignored); the proof of the job's current attempt whose
    answer is in flight or lost; of the attempt a pending resend was to replace; of the only
    request of a job a cancel ended with its outcome unknown; of an earlier attempt of a job with
    no live request; of an attempt the database never recorded as sent, of a job it would send
    (a database restored from an older backup); of the request of a job failed for its unknown
    outcome. Anything else is a
    request fal ran besides the one the job keeps: a confirmed duplicate charge."""
    job, delivery, state, status = at.job, at.delivery, at.state, at.status
    attempt = delivery.attempt
    if (holder := store.request_holder(at.session, job.id, delivery.request_id)) is not None:
        return _held_elsewhere(job, delivery, holder), None
    if attempt == job.attempts and (
        state == S.SUBMIT_UNKNOWN or (state == S.SUBMITTING and job.submitted_input is not None)
    ):
        return _adopt_submitted(at)
    if attempt is not None and store.resend_unsent(job, attempt):
        return _adopt_before_resend(at, attempt)
    if (
        attempt is not None
        and not status.failed
        and state == S.CANCELLED
        and store.unknown_cancel_adoptable(at.session, job, attempt)
    ):
        return _adopt_unknown_cancelled(at, attempt)
    if attempt is not None and not status.failed and store.earlier_proof_adoptable(job, attempt):
        return _adopt_earlier_proof(at, attempt)
    if attempt is not None and store.restored_proof_adoptable(job, attempt):
        return _adopt_restored_proof(at, attempt)
    if _late_proof(job, state, delivery, status):
        return _adopt_late_proof(at, attempt or 0)  # never None here (_late_proof)
    return _duplicate_charge(at.session, at.inbox, job, delivery, status, now=at.now), None


def _adopt(
    at: _Try,
    adopt: Callable[..., bool],
    fields: dict[str, Any],
    outcome: str,
    event: str,
    message: str,
    *args: object,
    level: int = logging.WARNING,
) -> _Moved | None:
    """The job adopts the delivery's request by ``adopt``, one of the store's compare-and-set
    adoptions (``fields``: what it takes besides the request id and when to poll first), says so
    in one line (``event``, ``message``) and stands ``queued``, one version on: the fence the
    completion goes on with. None: the job moved meanwhile, and nothing was adopted.

    Its reason and message are made before it, as the adoption clears the job's error type, on
    this very object too."""
    if not adopt(
        at.session,
        at.fence,
        request_id=at.delivery.request_id,
        next_poll_at=first_poll_at(at.inbox.settings, at.now),
        **fields,
    ):
        return None
    _say(level, event, at.job, at.delivery, message, *args)
    return _Moved(outcome, Fence(at.job.id, S.QUEUED, at.fence.version + 1, at.inbox.owner))


def _adopt_window_proof(at: _Try) -> _Step:
    """A success of the job's own request, which a window's end was said to have ended while the
    job now waits to send it again (:func:`jobs.store.window_proof_adoptable`): fal ran it to the
    end and billed it, so the job takes it back instead of sending it again, its video fetched
    (:func:`jobs.store.adopt_window_proof`)."""
    job, request_id = at.job, at.delivery.request_id
    reason = (
        f"proof by webhook, after a window's end was said to have ended it "
        f"({job.error_type}): its request {request_id} ran to the end at fal "
        "(billed): its video is fetched, nothing is sent again"
    )
    return _adopt(
        at,
        store.adopt_window_proof,
        {"reason": reason, **at.result},
        ADOPTED_WINDOW,
        "webhook.adopted_window",
        "job %s: a webhook proved that fal ran its request %s to the end (billed) though a "
        "window's end was said to have ended it: its video is fetched, nothing is sent again",
        job.id,
        request_id,
    )


def _adopt_cancelled_proof(at: _Try) -> _Step:
    """A success of the job's own request, which fal's status said our cancel ended
    (:func:`_cancel_proof`): fal's cancel of a running request is best effort, so the job takes
    it back, its video fetched and billed in full (:func:`jobs.store.adopt_cancelled_proof`). The
    store refusing it while the job stayed as it was means no cancel at fal ended it: ignored."""
    job, request_id = at.job, at.delivery.request_id
    reason = (
        f"proof by webhook, after our cancel was said to have ended it ({job.error_type}): "
        f"its request {request_id} ran to the end at fal (billed): its video "
        "is fetched"
    )
    moved = _adopt(
        at,
        store.adopt_cancelled_proof,
        {"reason": reason, **at.result},
        ADOPTED_CANCELLED,
        "webhook.adopted_cancelled",
        "job %s: a webhook proved that fal ran its request %s to the end (billed) though "
        "our cancel was said to have ended it (%s): its video is fetched, billed in full",
        job.id,
        request_id,
        job.error_type,
    )
    if moved is None and S(store.get_job(at.session, job.id).state) == at.state:
        return f"ignored: job already {at.state.value}", None  # not a cancel at fal
    return moved


def _adopt_own_proof(at: _Try) -> _Step:
    """A success of the job's own request after the job failed without knowing how fal ended it
    (:func:`_own_proof`): a paid video the job dropped, taken back and fetched
    (:func:`jobs.store.adopt_own_proof`)."""
    job, request_id = at.job, at.delivery.request_id
    reason = (
        f"proof by webhook, after the job failed ({job.error_type}): its request "
        f"{request_id} finished at fal (billed): its video is fetched"
    )
    return _adopt(
        at,
        store.adopt_own_proof,
        {"reason": reason, **at.result},
        ADOPTED_OWN,
        "webhook.adopted_own",
        "job %s: a webhook proved, after the job failed (%s), that fal ran its request %s "
        "(billed): its video is fetched",
        job.id,
        job.error_type,
        request_id,
    )


def _adopt_submitted(at: _Try) -> _Step:
    """A request of the job's current attempt, while its POST is in flight or its answer was
    lost (``submitting`` with its input recorded, ``submit_unknown``): proof that fal accepted
    it. The job adopts the request id (:func:`jobs.store.adopt_request`) and is never sent
    again."""
    # When its POST went out (older rows: when it last moved, close after).
    submitted_at: datetime = at.job.sent_at or at.job.updated_at or at.now
    return _adopt(
        at,
        store.adopt_request,
        {"gateway_request_id": at.gateway, "submitted_at": submitted_at},
        "adopted",
        "webhook.adopted",
        "job %s: webhook proved fal accepted it as %s",
        at.job.id,
        at.delivery.request_id,
        level=logging.INFO,
    )


def _adopt_before_resend(at: _Try, attempt: int) -> _Step:
    """A request of the attempt ``WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit`` decided to send
    again, before the resend went out (:func:`jobs.store.resend_unsent`): the proved request
    replaces the resend (:func:`jobs.store.adopt_before_resend`), nothing is paid twice."""
    request_id = at.delivery.request_id
    reason = (
        f"proof by webhook before the resend went out: attempt {attempt} "
        f"accepted as {request_id}; the resend is dropped, nothing is sent again"
    )
    return _adopt(
        at,
        store.adopt_before_resend,
        at.proof(attempt, reason),
        ADOPTED_BEFORE_RESEND,
        "webhook.adopted_before_resend",
        "job %s: a webhook proved fal accepted attempt %s as %s before its resend went out: kept, not resent",
        at.job.id,
        attempt,
        request_id,
    )


def _adopt_unknown_cancelled(at: _Try, attempt: int) -> _Step:
    """A success of the only request of a job a cancel ended while its outcome was unknown (its
    answer lost, or its resend not sent; :func:`jobs.store.unknown_cancel_adoptable`): fal ran it
    to the end and billed it. The job's one request, not a duplicate: its video is fetched,
    nothing is sent (:func:`jobs.store.adopt_unknown_cancelled`)."""
    job, request_id = at.job, at.delivery.request_id
    reason = (
        f"proof by webhook, after the job was cancelled with its submit's outcome unknown "
        f"({job.error_type}): attempt {attempt} accepted as {request_id} "
        "and finished at fal (billed): its video is fetched, nothing is sent"
    )
    return _adopt(
        at,
        store.adopt_unknown_cancelled,
        at.proof(attempt, reason),
        ADOPTED_UNKNOWN_CANCELLED,
        "webhook.adopted_unknown_cancelled",
        "job %s: a webhook proved that fal ran its only request %s (attempt %s, its outcome "
        "unknown when the job was cancelled) to the end (billed): its video is fetched",
        job.id,
        request_id,
        attempt,
    )


def _adopt_earlier_proof(at: _Try, attempt: int) -> _Step:
    """A success of an earlier attempt, sent again after its answer was lost, while the job has
    no live request of its own (one it waits to send again keeps at most an ended one's id;
    :func:`jobs.store.earlier_proof_adoptable`): fal ran and billed it, so the job keeps it and
    its video and sends nothing more (:func:`jobs.store.adopt_earlier_proof`). A later attempt
    whose outcome is unknown stays a possible duplicate charge (a confirmed one if its own proof
    comes)."""
    request_id = at.delivery.request_id
    reason = (
        f"proof by webhook of an earlier attempt: attempt {attempt} accepted as "
        f"{request_id} and finished at fal (billed): its video is fetched, "
        f"nothing is sent again"
    )
    return _adopt(
        at,
        store.adopt_earlier_proof,
        at.proof(attempt, reason),
        ADOPTED_EARLIER,
        "webhook.adopted_earlier",
        "job %s: a webhook proved fal ran its earlier attempt %s as %s (billed): kept, nothing is sent again",
        at.job.id,
        attempt,
        request_id,
    )


#: Per engine: whether this process said that its database looks restored from an older backup
#: (:func:`_adopt_restored_proof`), once.
_restored_said: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()


def _adopt_restored_proof(at: _Try, attempt: int) -> _Step:
    """A request of ``attempt``, which the database never recorded as sent, for a job it would
    send (again) (:func:`jobs.store.restored_proof_adoptable`): the delivery's token holds, and a
    token is minted only for a submit about to be recorded, so the database is behind fal —
    restored from a backup older than that submit (or a copy of one). The job adopts the request
    as an answered submit's (:func:`jobs.store.adopt_restored_proof`): never sent again, never a
    duplicate charge. A dispatcher that claimed the job meanwhile loses: its send, fenced by
    version, finds the job moved; once its POST is recorded as sent the job no longer qualifies
    and this proof is that POST's or a duplicate (the other cases). Each job says it in an info
    line; the process, the first time, in a warning (after the commit)."""
    job, request_id = at.job, at.delivery.request_id
    reason = (
        f"proof by webhook of attempt {attempt}, which this database never recorded as sent "
        f"(restored from an older backup?): accepted as {request_id}; kept, not sent again"
    )
    moved = _adopt(
        at,
        store.adopt_restored_proof,
        {**at.proof(attempt, reason), "submitted_at": at.now},
        ADOPTED_RESTORED,
        "webhook.adopted_restored",
        "job %s: a webhook proved fal accepted its attempt %s as %s, which this database never "
        "recorded as sent: kept, not sent again",
        job.id,
        attempt,
        request_id,
        level=logging.INFO,
    )
    if moved is not None:
        engine = at.inbox.engine
        db.after_commit(at.session, lambda: _say_restored(engine, job, at.delivery, attempt))
    return moved


def _say_restored(engine: Engine, job: Job, delivery: WebhookDelivery, attempt: int) -> None:
    """Warn, once per process and engine, that the database looks restored from an older backup."""
    with _secrets_lock:
        if _restored_said.get(engine):
            return
        _restored_said[engine] = True
    _say(
        logging.WARNING,
        "webhook.database_restored",
        job,
        delivery,
        "the database looks restored from an older backup: fal's webhooks prove submits it never "
        "recorded (first: job %s, attempt %s, request %s); each such job keeps its request and is "
        "not sent again. If another copy of this database is still in use, stop it: it would send "
        "its jobs too",
        job.id,
        attempt,
        delivery.request_id,
    )


def _adopt_late_proof(at: _Try, attempt: int) -> _Step:
    """A success of any attempt of a job failed only because its submit's outcome stayed
    unknown (:func:`_late_proof`): fal ran and billed it, so the job adopts it and fetches its
    video (:func:`jobs.store.adopt_late_proof`)."""
    request_id = at.delivery.request_id
    reason = (
        f"late proof by webhook, after the job failed for its unknown submit outcome: "
        f"attempt {attempt} accepted as {request_id} and finished at fal "
        "(billed): its video is fetched, nothing is sent again"
    )
    return _adopt(
        at,
        store.adopt_late_proof,
        at.proof(attempt, reason),
        ADOPTED_LATE,
        "webhook.adopted_late",
        "job %s: a webhook proved, after the job failed for its unknown submit outcome, that "
        "fal ran it as %s (billed): its video is fetched",
        at.job.id,
        request_id,
    )


def _complete(at: _Try, moved: _Moved) -> _Answer | None:
    """The completion fal reported, applied to the job at fal (found there, or just adopted) as
    the poller applies it (:func:`record_completion`). A failure that does not settle the job
    (:func:`settles`: a webhook says not whether the request ran, which its bill depends on)
    makes its status due at once instead. None: the job moved meanwhile, try again; an adopted
    job whose completion lost a race keeps its outcome, and the poller finishes it."""
    job, status, fence, outcome = at.job, at.status, moved.fence, moved.outcome
    if not settles(status):
        if not store.status_due(at.session, fence, at=at.now):
            return None
        _say(
            logging.INFO,
            "webhook.status_due",
            job,
            at.delivery,
            "job %s: fal reported %s failed (%s); its status says whether it ran: asked now",
            job.id,
            at.delivery.request_id,
            status.error_type or status.error,
        )
        return (outcome if outcome in _ADOPTED else STATUS_DUE), None
    queued_until = (
        at.now + timedelta(seconds=at.inbox.settings.lease_seconds)
        if at.inbox.enqueue_download is not None and at.inbox.in_scope(job.batch_id)
        else None
    )
    queue = record_completion(at.session, fence, status, now=at.now, download_queued_until=queued_until)
    if S(store.get_job(at.session, job.id).state) != fence.state:
        return outcome, job.id if queue else None
    if outcome in _ADOPTED:  # adopted, but the completion lost a race: the poller finishes it
        return outcome, None
    return None


def _held_elsewhere(job: Job, delivery: WebhookDelivery, holder: str) -> str:
    """A delivery naming ``job`` for a request that job ``holder`` of the same fal queue holds
    (:func:`jobs.store.request_holder`): fal gives each accepted POST a request of its own, so
    this is a provider protocol error, never proof of ``job``'s submit nor a duplicate charge of
    it (the request is the other job's, billed to it). Acknowledged and ignored, said in an
    error line; the job is left as it is (a ``submit_unknown`` one waits on for its own proof)."""
    _say(
        logging.ERROR,
        "webhook.request_held",
        job,
        delivery,
        "job %s: a webhook for its attempt %s names request %s, which job %s already holds "
        "(a provider protocol error): ignored",
        job.id,
        delivery.attempt,
        delivery.request_id,
        holder,
    )
    return f"ignored: request held by job {holder}"


def _say(level: int, event: str, job: Job, delivery: WebhookDelivery, message: str, *args: object) -> None:
    """Log what a delivery did to ``job``, with the fields every such line carries."""
    log.log(
        level,
        message,
        *args,
        extra={"event": event, "job_id": job.id, "batch_id": job.batch_id, "request_id": delivery.request_id},
    )


def _late_proof(job: Job, state: S, delivery: WebhookDelivery, status: Status) -> bool:
    """Whether ``delivery`` proves that fal ran and finished, billed, the very request of a job
    that failed only because its submit's outcome stayed unknown (``WANBATCH_SUBMIT_UNKNOWN_POLICY``
    ``fail``, or ``resubmit`` out of attempts, once ``WANBATCH_SUBMIT_UNKNOWN_DEADLINE`` passed):
    any attempt it sent (its last, or an earlier one sent again), no request kept, no output.
    Such a job adopts the request and fetches its video (:func:`jobs.store.adopt_late_proof`),
    whatever its batch's state: a cancel, a pause or a deadline stops what is sent, and this
    sends nothing (a request that finished despite a cancel is downloaded too). A failure fal
    reports is not adopted: there is no video to fetch, and the job stays failed (the proof is
    noted as before, :func:`_duplicate_charge`)."""
    return (
        state == S.FAILED
        and job.error_type == store.SUBMIT_UNKNOWN_ERROR
        and delivery.attempt is not None
        and 1 <= delivery.attempt <= job.attempts
        and job.request_id is None
        and job.output_path is None
        and not status.failed
    )


def _own_proof(job: Job, state: S, status: Status) -> bool:
    """Whether a success of the job's own request proves a paid video the job dropped: it failed
    without knowing how fal ended that request (:data:`jobs.store.PROVABLE_FAILURES`: the poller
    gave up on fal's malformed status answers, billing a cancel, or fal's status did not know
    the request), no output. The job adopts it back (:func:`jobs.store.adopt_own_proof`)."""
    return (
        state == S.FAILED
        and job.error_type in store.PROVABLE_FAILURES
        and job.output_path is None
        and not status.failed
    )


def _cancel_proof(job: Job, state: S, status: Status) -> bool:
    """Whether a success of the job's own request proves a paid video a cancel dropped: the job
    ended ``cancelled`` on fal's word that our cancel ended that request (the user's, or a
    deadline's; :func:`jobs.store.adopt_cancelled_proof` checks it was), yet fal ran it to the
    end — its cancel of a running request is best effort. No output. The job adopts it back, as
    a ``cancelling`` job whose request fal finished anyway is downloaded."""
    return (
        state == S.CANCELLED and job.request_id is not None and job.output_path is None and not status.failed
    )


def _window_duplicate(
    session: Session, inbox: Inbox, job: Job, delivery: WebhookDelivery, *, now: datetime
) -> str | None:
    """A success of a request of ``job`` that its batch's window end was said to have cancelled,
    proved after the job sent a new request in its place: fal ran and billed the job twice, a
    *confirmed* duplicate charge, counted and billed once (:func:`jobs.store.note_window_duplicate`;
    the window's cancel's bill replaced by the success's). The outcome (None: try again later,
    a worker holds the job and bills it itself)."""
    reason = (
        f"webhook: fal ran to the end (billed) {delivery.request_id}, the request a window's end was "
        "said to have ended, after the job was sent again: a confirmed duplicate charge"
    )
    noted = store.note_window_duplicate(
        session, job.id, delivery.request_id, reason=reason, worker=inbox.owner, now=now
    )
    if noted == "held":
        return None
    if noted != "counted":
        return "ignored: unknown job" if noted == "missing" else "ignored: duplicate charge already counted"
    _say(
        logging.WARNING,
        "webhook.duplicate_charge",
        job,
        delivery,
        "job %s: fal ran %s to the end though a window's end was said to have ended it, and the job "
        "was sent again: a confirmed duplicate charge (billed)",
        job.id,
        delivery.request_id,
    )
    return "duplicate-charge"


def _fetched(body: dict[str, Any]) -> dict[str, Any]:
    """What fal's result in a success's webhook gives the download (:func:`fetched_fields`)."""
    return fetched_fields(body.get("payload"))


def _duplicate_charge(
    session: Session, inbox: Inbox, job: Job, delivery: WebhookDelivery, status: Status, *, now: datetime
) -> str | None:
    """A request of ``job`` that fal ran besides the one the job keeps (an earlier attempt resent
    after its answer was lost, a second request of one attempt): a *confirmed* duplicate charge,
    whatever the job's state. fal retries a webhook for two hours
    (https://docs.fal.ai/model-apis/model-endpoints/webhooks), so the proof often comes after the
    job finished, and it counts then too.

    It goes in the job's books (:func:`jobs.store.note_duplicate_charge`): on its history, in
    ``confirmed_duplicate_charges``, and, for a success, billed in full at the job's estimate
    (fal's webhook carries no cost; the request ran the job's input, priced as its own attempts
    are). A failure's bill depends on whether it ran, which the webhook does not say: it is
    counted and noted, its money left as it was (possibly billed, when its submit's outcome was
    unknown). The outcome (None: try again later, a worker holds the job and bills it itself).
    """
    if store.duplicate_charge_recorded(session, delivery.request_id):  # counted before it was noted
        return "ignored: duplicate charge already counted"
    outcome = None if status.failed else billing.Outcome.SUCCEEDED
    fate = (
        "billed" if outcome else f"failed at fal ({status.error_type or status.error}): its bill is unknown"
    )
    reason = (
        f"webhook: fal ran attempt {delivery.attempt}'s request besides the job's own: "
        f"accepted as {delivery.request_id}; {fate}"
    )
    noted = store.note_duplicate_charge(
        session, job.id, delivery.request_id, reason=reason, worker=inbox.owner, outcome=outcome, now=now
    )
    if noted == "held":
        return None
    if noted != "counted":
        return "ignored: unknown job" if noted == "missing" else "ignored: duplicate charge already counted"
    _say(
        logging.WARNING,
        "webhook.duplicate_charge",
        job,
        delivery,
        "job %s: fal ran %s (attempt %s) besides the job's own request: a confirmed duplicate charge (%s)",
        job.id,
        delivery.request_id,
        delivery.attempt,
        fate,
    )
    return "duplicate-charge"
