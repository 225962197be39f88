"""Job states and the transitions allowed between them.

The whole lifecycle is designed here, once, so that every later piece (dispatcher, poller,
reconciler, cancel, webhooks) moves jobs along edges this table allows. ``jobs.store.transition``
refuses any other edge, and does each move as a compare-and-set so two workers can never both
win the same step.

::

    pending ──► submitting ──► queued ──► running ──► downloading ──► succeeded
       │            │  │  │       │          │             │
       │            │  │  └──────►│◄─────────┘ (completed) │
       │            │  ▼                                    ▼
       │            │ submit_unknown ── (proved/resubmit/fail)   failed
       │            ▼
       │        retry_wait ──► submitting   (backoff after a transient or model error)
       ▼
    cancelled ◄── (cancel or budget, from any state not yet paid for)
    cancelling ──► cancelled | downloading (it finished anyway: we paid, so we keep it)

A request still in fal's queue when its batch's window ends goes back to ``pending`` (cancelled
there, or timed out there by the start timeout its submit carried; never started, no attempt
counted): ``cancelling ──► pending`` or ``queued ──► pending``.

With ``reuse_outputs``, a pinned-seed ``pending``/``retry_wait`` job whose exact twin already
succeeded goes straight to ``succeeded``, taking that output (never sent, nothing billed).

A job its batch's edited manifest no longer has, and that was never sent (``pending`` or
``retry_wait``, no attempt, nothing recorded of a POST), is cancelled by the resubmit that left
it out (``error_type`` ``not_in_manifest``); the manifest bringing it back makes it ``pending``
again: ``cancelled ──► pending`` (``jobs.store.resubmit_jobs``), one row per job key still.

Terminal states are ``succeeded``, ``failed`` and ``cancelled``: nothing leaves them (a rerun
makes a new batch) — but for the edited manifest above, and paid work coming back: a job that
failed only because its submit's outcome stayed unknown past
``WANBATCH_SUBMIT_UNKNOWN_DEADLINE`` (``error_type`` ``submit_unknown``, no request kept, no
output) goes ``failed ──► queued`` when fal's signed
webhook later proves it accepted that very attempt and finished it: the request was billed, so
its video is fetched (``jobs.store.adopt_late_proof``), and nothing is sent again. A late answer
of the submit proves it as well (accepted: the request runs, and is billed).

Under ``WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit`` the same proof may come while the resend waits
(``retry_wait``, or ``pending`` when its claim was given back unsent, or ``submitting`` before its
POST is recorded as sent): the job adopts the proved request instead, ``retry_wait``/``pending``/
``submitting ──► queued`` (``jobs.store.adopt_before_resend``), and the resend is never sent.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Where a job is. Values are stored in the database and printed by ``status``."""

    PENDING = "pending"
    """Validated and stored; not yet claimed for submission (may wait for limits or budget)."""
    SUBMITTING = "submitting"
    """Claimed under a lease; the submit POST is about to be, or is being, sent."""
    SUBMIT_UNKNOWN = "submit_unknown"
    """The POST may have been accepted but no answer came back: may be billed; never resent blindly."""
    RETRY_WAIT = "retry_wait"
    """A transient or retryable failure; waiting until ``next_attempt_at`` to submit again."""
    QUEUED = "queued"
    """Accepted by fal (we hold its request_id), IN_QUEUE there."""
    RUNNING = "running"
    """IN_PROGRESS at fal."""
    DOWNLOADING = "downloading"
    """COMPLETED at fal; fetching the result and the media file."""
    CANCELLING = "cancelling"
    """Cancel was requested at fal for a request that may already be running."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True when nothing can move the job any further."""
        return self in TERMINAL_STATES

    @property
    def at_provider(self) -> bool:
        """True when fal holds (or may hold) a request of this job right now."""
        return self in AT_PROVIDER_STATES


TERMINAL_STATES: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
#: The others, in declaration order: a job in one still needs work (a finished batch has none).
UNFINISHED_STATES: tuple[JobState, ...] = tuple(s for s in JobState if s not in TERMINAL_STATES)

#: States in which a request counts against the outstanding cap: it was (or may have been) sent
#: and fal has not finished it.
AT_PROVIDER_STATES: frozenset[JobState] = frozenset(
    {JobState.SUBMITTING, JobState.SUBMIT_UNKNOWN, JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING}
)

S = JobState
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # → SUCCEEDED: reuse_outputs, the job took an already succeeded job's output; never sent.
    # → QUEUED only by jobs.store.adopt_before_resend (as from retry_wait): proof that fal
    # accepted the attempt a resend given back unsent was to replace.
    # → DOWNLOADING: a rerun's job takes the paid video the job it reruns left in the staging
    # folder (jobs.store.mark_taking_staged), and stores it; never sent. The same from retry_wait.
    S.PENDING: frozenset({S.SUBMITTING, S.CANCELLED, S.FAILED, S.SUCCEEDED, S.QUEUED, S.DOWNLOADING}),
    S.SUBMITTING: frozenset(
        {
            S.QUEUED,  # accepted, IN_QUEUE
            S.RUNNING,  # accepted, already IN_PROGRESS
            S.SUBMIT_UNKNOWN,  # read timeout / reset / worker died after the POST may have gone out
            S.RETRY_WAIT,  # transient error before anything was accepted
            S.PENDING,  # released before the POST was sent (e.g. limits, shutdown)
            S.FAILED,  # final provider error (422 at submit, bad key, …)
            S.CANCELLED,  # budget or cancel noticed before the POST
        }
    ),
    S.SUBMIT_UNKNOWN: frozenset(
        {
            S.QUEUED,  # a webhook or lookup proved the request exists
            S.RUNNING,
            S.DOWNLOADING,
            S.RETRY_WAIT,  # policy: resubmit as a new attempt, a possible duplicate charge once sent
            S.FAILED,  # policy: "submission outcome unknown"
            S.CANCELLED,
        }
    ),
    # → SUCCEEDED: reused. → QUEUED only by jobs.store.adopt_before_resend: proof (a webhook, a
    # late answer) that fal accepted the attempt the pending resend of an unknown submit replaces.
    S.RETRY_WAIT: frozenset({S.SUBMITTING, S.CANCELLED, S.FAILED, S.SUCCEEDED, S.QUEUED, S.DOWNLOADING}),
    S.QUEUED: frozenset(
        {
            S.RUNNING,
            S.DOWNLOADING,
            S.RETRY_WAIT,
            S.FAILED,
            S.CANCELLING,
            S.CANCELLED,  # a cancel or budget; or fal timed it out in its queue at the batch's deadline
            S.PENDING,  # the same at a window's end: never started, sent again in the next window
        }
    ),
    S.RUNNING: frozenset({S.DOWNLOADING, S.RETRY_WAIT, S.FAILED, S.CANCELLING, S.CANCELLED}),
    S.DOWNLOADING: frozenset({S.SUCCEEDED, S.FAILED, S.RETRY_WAIT}),
    S.CANCELLING: frozenset(
        {
            S.CANCELLED,
            S.DOWNLOADING,  # fal finished it anyway (paid): downloaded
            S.FAILED,
            S.PENDING,  # cancelled in fal's queue at a window's end: sent again in the next window
            S.RETRY_WAIT,  # the same, but fal had started it (billed): a new attempt next window
        }
    ),
    S.SUCCEEDED: frozenset(),
    # → QUEUED only by jobs.store.adopt_late_proof: a late webhook proves the failed job's
    # ambiguous submit was accepted and completed (paid): its video is fetched, nothing is sent.
    S.FAILED: frozenset({S.QUEUED}),
    # → QUEUED only by jobs.store.adopt_cancelled_proof: fal's signed webhook proves that it ran
    # to the end (paid) the request our cancel was reported to have ended: its video is fetched.
    # → PENDING only by jobs.store.resubmit_jobs: a job never sent that a resubmit cancelled
    # because its manifest no longer had it (error_type not_in_manifest) is in the manifest again.
    S.CANCELLED: frozenset({S.QUEUED, S.PENDING}),
}
del S


def can_transition(current: JobState, new: JobState) -> bool:
    """Whether the lifecycle allows moving a job from ``current`` to ``new``."""
    return new in ALLOWED_TRANSITIONS[current]
