"""One step of a job's life per function, driven by the database, never by a message's content.

Celery tasks (``worker.tasks``) and the periodic tick call these. Each function re-reads the
job, checks that it is still where the step expects it, and moves it with one of the store's
verbs (``store.mark_submitted``, ``store.retry_later``, ``store.fail_job``, …), each a
compare-and-set fenced by the :class:`~jobs.store.Fence` (state and ``version``) the step read.
So a message delivered twice does nothing the second time, and a message lost is made good by
the tick, which finds due work in the database:

* :func:`dispatch` claims due ``pending``/``retry_wait`` jobs within the outstanding cap, the
  submit rate and the batch budget, marks them ``submitting`` and hands them to ``submit``.
* :func:`submit` records the exact input it will send, commits, POSTs **once**, and records
  the request id at once. A lost answer makes the job ``submit_unknown`` — never a blind resend.
* :func:`poll` asks fal for the status of due ``queued``/``running`` jobs (batched, with a poll
  interval that grows with the time a job has waited), so no worker slot is held while waiting.
* :func:`download` fetches the result, then the video, then writes the sidecar and finishes.
* :func:`reconcile` drives jobs whose worker died (expired lease) or whose outcome is unknown.

Network calls happen outside database transactions; every write is fenced by the ``version``
read before the call, so a worker paused past its lease cannot overwrite newer state.
"""

from worker.steps.context import DOWNLOAD_QUEUE, RateBucket, Runtime, worker_identity
from worker.steps.dispatch import dispatch, dispatch_in
from worker.steps.download import crashed, download, schedule_downloads, sidecar_record
from worker.steps.poll import poll
from worker.steps.reconcile import cancel_jobs_of_cancelled_batches, hand_on_again, reconcile
from worker.steps.submit import submit, webhook_for
from worker.steps.tick import TickReport, tick

__all__ = [
    "DOWNLOAD_QUEUE",
    "RateBucket",
    "Runtime",
    "TickReport",
    "cancel_jobs_of_cancelled_batches",
    "crashed",
    "dispatch",
    "dispatch_in",
    "download",
    "hand_on_again",
    "poll",
    "reconcile",
    "schedule_downloads",
    "sidecar_record",
    "submit",
    "tick",
    "webhook_for",
    "worker_identity",
]
