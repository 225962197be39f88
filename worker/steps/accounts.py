"""Whose webhook is it: the fal account a delivery is signed for, pinned per API key.

fal signs the webhooks of every account with the same keys
(https://docs.fal.ai/model-apis/model-endpoints/webhooks) and names the account in each
(``X-Fal-Webhook-User-Id``, covered by the signature). The token of a ``fal_webhook`` URL
(:func:`worker.steps.webhooks.binding_token`) binds a delivery to one of our submits, but a
token can leak — a reverse proxy's access log keeps query strings — and then anyone with a fal
account of their own could send a request with that URL and have fal deliver genuine "proof"
for our job: their request adopted and their video fetched into our batch, or duplicate charges
counted and billed on it. The account closes that:

* ``WANBATCH_FAL_USER_ID`` names our accounts; a delivery signed for any other is refused.
* Unset (the default, nothing to configure), each API key's account is learnt once (trust on
  first use, :func:`jobs.store.pin_account`) from the first delivery of the very request its job
  recorded from fal's answer to our own submit: fal gives every request an id of its own, and
  signs its delivery for the account that sent it, so only our account's delivery can carry it.
  From then on a delivery naming an attempt sent with that key, signed for another account, is
  refused (the receiver answers 403, stores nothing) — and one stored before, applied later or
  read as proof by the submit-unknown deadline, is ignored.

A pin judges only what it was learnt from, never pooled across keys or signers:

* It is per key *and signer* (:func:`signer_of`: the origin of ``WANBATCH_WEBHOOK_JWKS_URL``,
  whose keys verified the delivery). The real ``FAL_KEY`` pointed once at ``wanbatch simulator``
  (its queue and its JWKS) pins that key to the simulator's ``sim-user`` for the simulator's
  signer only: fal's own deliveries, verified against fal's keys, are judged by what they teach.
* It judges the deliveries of attempts sent with its key, and each key's only by its own pin: an
  account pinned for one key (``run --simulate``'s, a test account's) is nobody else's. The
  database keeps the key of a job's latest attempt only (``Job.api_key_id``), so a delivery of an
  earlier attempt (sent with a key since rotated, say) is bound by its token alone, as before.

Before a key's account is learnt, the token alone binds its deliveries, as before: holding back
the proof of an ambiguous submit until then would resend (pay for) a job whose lone request's
answer was lost in a new database. A token leaks only once a delivery carried it, so the first
delivery of a request we recorded pins the account long before.
"""

from __future__ import annotations

import logging
from typing import Literal

from sqlalchemy.orm import Session

from jobs import store
from jobs.models import WebhookDelivery
from jobs.settings import Settings
from worker.fal.origin import url_origin_text

log = logging.getLogger(__name__)

#: What :func:`account_verdict` finds: signed for one of our fal accounts (or one not known yet),
#: or for another.
Verdict = Literal["ours", "foreign"]


def signer_of(settings: Settings) -> str:
    """Whose keys verify this receiver's deliveries: ``scheme://host:port`` of
    ``WANBATCH_WEBHOOK_JWKS_URL`` (never its path or query; one that does not parse, kept as is
    up to the column's 255 characters). fal's, ``https://rest.fal.ai:443``, by default."""
    try:
        return url_origin_text(settings.webhook_jwks_url)
    except ValueError:
        return settings.webhook_jwks_url[:255]


def account_verdict(
    session: Session,
    settings: Settings,
    job_id: str | None,
    attempt: int | None,
    request_id: str,
    user_id: str,
) -> Verdict:
    """Whether a verified delivery's fal account (``user_id``) may speak for attempt ``attempt``
    of job ``job_id`` (None: its latest).

    ``foreign`` when ``WANBATCH_FAL_USER_ID`` is set and does not name it, or when the attempt
    was sent with an API key whose account (for this receiver's signer) is pinned to another.
    Otherwise ``ours``, and when the delivery is of the job's own request (the one it recorded
    from fal's answer to our submit) while its key's account is not known yet, that account is
    pinned now. A delivery naming no job of ours is ``ours``: it is ignored anyway; so is one
    of an earlier attempt than the job's latest, whose key the database does not keep."""
    configured = settings.fal_user_ids
    if configured:
        return "ours" if user_id in configured else "foreign"
    found = store.job_key_and_request(session, job_id) if job_id is not None else None
    if found is None:
        return "ours"
    key, own_request, latest = found
    if key is None or (attempt is not None and attempt != latest):
        return "ours"  # that attempt's key is not known: the token alone binds it, as before
    signer = signer_of(settings)
    pinned = store.pinned_account(session, key, signer)
    if pinned is not None:
        return "ours" if pinned == user_id else "foreign"
    if own_request is None or own_request != request_id:
        return "ours"  # not learnt yet: the token alone binds it, as before
    pinned, new = store.pin_account(session, key, signer, user_id, request_id)
    if new:
        log.info(
            "webhooks of API key %s verified by %s are fal account %s's from now on (learnt from "
            "request %s of job %s): deliveries signed for any other account are refused",
            key,
            signer,
            user_id,
            request_id,
            job_id,
            extra={"event": "webhook.account_pinned", "job_id": job_id, "request_id": request_id},
        )
    return "ours" if pinned == user_id else "foreign"


def signed_by_us(session: Session, settings: Settings, delivery: WebhookDelivery) -> bool:
    """Whether a stored delivery is our account's (:func:`account_verdict`); one stored before
    schema 0037 recorded no account, and is taken as before."""
    if delivery.user_id is None:
        return True
    verdict = account_verdict(
        session, settings, delivery.job_id, delivery.attempt, delivery.request_id, delivery.user_id
    )
    return verdict == "ours"
