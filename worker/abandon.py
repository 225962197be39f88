"""``wanbatch cancel BATCH --abandon-other-key``: fal is asked about each request of another API
key with this process's key before anything is written off.

fal keeps a request for the account that sent it: a key of the same account (a key rotated
within it) is answered, a key of another account (or the old key revoked) is told "not found".
Written off without asking, requests the current key could still follow — finished and billed,
their videos waiting at fal — were lost. So each such request (:func:`jobs.batches.other_key_requests`)
is asked about once, with the one status call a poll makes:

* answered: the request is this key's from now on (:func:`jobs.store.followed_with_key`, as a
  poll records it): the cancel goes on with it as with any other (a finished one is downloaded);
* "not found" or refused (a final answer): noted (:func:`jobs.store.note_key_refused`), and
  :func:`jobs.batches.abandon_other_key` writes it off;
* no answer (the network, fal's 5xx or 429): left as it is, neither followed nor written off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from jobs import db, store
from jobs.batches import other_key_requests
from jobs.db import open_engine
from jobs.errors import FinalProviderError, ProviderError
from jobs.models import utcnow
from jobs.settings import Settings
from worker.fal.client import FalClient
from worker.steps.context import handle_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Asked:
    """What fal answered this key about a batch's requests of another key."""

    #: Answered: the same account's, followed with this key (never written off).
    answered: int = 0
    #: "Not found" or refused for this key: the ones that may be written off.
    refused: int = 0
    #: No answer (transient): left as they were.
    unanswered: int = 0


def ask_about_other_keys(
    batch_id: str, settings: Settings, *, key_id: str, origin: str, client: FalClient | None = None
) -> Asked:
    """Ask fal, with ``settings``' key (whose id is ``key_id``), about every request of batch
    ``batch_id`` sent with another key to the fal queue at ``origin``; record what it answered
    (module docstring). ``client``: the one to ask with (built from ``settings`` otherwise)."""
    with db.read_scope(open_engine(settings)) as session:
        plan = [
            (job.id, str(job.api_key_id), handle_of(job, settings.fal_queue_url))
            for job in other_key_requests(session, batch_id, key_id=key_id, origin=origin)
        ]
    if not plan:
        return Asked()
    answered = refused = unanswered = 0
    fal = client or FalClient.from_settings(settings)
    engine = open_engine(settings)
    try:
        for job_id, sent_with, handle in plan:
            try:
                fal.status(handle)
            except FinalProviderError as exc:  # "not found" (or refused) for this key
                with db.session_scope(engine) as session:
                    store.note_key_refused(
                        session, job_id, handle.request_id, sent_with=sent_with, key_id=key_id, now=utcnow()
                    )
                log.debug(
                    "job %s: fal answered %s about request %s for this key", job_id, exc, handle.request_id
                )
                refused += 1
                continue
            except ProviderError as exc:  # no answer: nothing is concluded
                log.info(
                    "job %s: fal could not be asked about request %s (%s): left as it is, not written off",
                    job_id,
                    handle.request_id,
                    exc,
                    extra={"event": "cancel.other_key_unanswered", "job_id": job_id},
                )
                unanswered += 1
                continue
            with db.session_scope(engine) as session:
                followed = store.followed_with_key(session, job_id, handle.request_id, key_id)
            if followed:
                log.info(
                    "job %s: fal answered about request %s, sent with another API key (key id %s), "
                    "when asked with this process's (key id %s): the same fal account; followed "
                    "with this key, not written off",
                    job_id,
                    handle.request_id,
                    sent_with,
                    key_id,
                    extra={"event": "job.key_followed", "job_id": job_id, "request_id": handle.request_id},
                )
            answered += 1
    finally:
        if client is None:
            fal.close()
    return Asked(answered=answered, refused=refused, unanswered=unanswered)
