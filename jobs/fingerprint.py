"""The database's fingerprint: a name of a database safe to show anyone, derived from its
webhook secret (:data:`jobs.store.WEBHOOK_SECRET`).

Its own module, not :mod:`worker.steps.webhooks` (which re-exports it): a ``run`` that only
watches the workers (a broker configured) reads the workers' records on Redis, which are keyed
by it, and must not load the workers' steps (the fal client, PyAV) to do so.
"""

from __future__ import annotations

import hashlib
import hmac

#: The message the database's fingerprint is the HMAC of: no token's (``job:attempt``, always
#: with a colon), so the fingerprint is never a token, and, HMAC being a pseudorandom function
#: (RFC 2104; RFC 6151 section 2.3), it tells nothing about any token or about the secret.
FINGERPRINT_LABEL = b"wanbatch database fingerprint v1"
#: Hex digits of a fingerprint: 64 bits, so two databases' never meet by chance.
FINGERPRINT_HEX_DIGITS = 16


def database_fingerprint(secret: bytes) -> str:
    """A name of the database whose webhook secret is ``secret``, safe to show anyone: the
    receiver's ``/healthz`` says it, and ``wanbatch doctor`` compares it with its own database's,
    since a receiver serving another database refuses every delivery (403: another secret, so
    every token is wrong). It forges nothing: it is an HMAC of a fixed label under the secret,
    never of a job and attempt."""
    return hmac.new(secret, FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:FINGERPRINT_HEX_DIGITS]
