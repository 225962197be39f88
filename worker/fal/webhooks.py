"""Verifying fal's webhooks: an Ed25519 signature over the raw body, keys from fal's JWKS.

fal signs every delivery (https://docs.fal.ai/model-endpoints/webhooks, "Verifying your
webhook") and sends four headers: ``X-Fal-Webhook-Request-Id``, ``-User-Id``, ``-Timestamp``
(unix seconds) and ``-Signature`` (hex). The signed message is, in UTF-8::

    request_id + "\\n" + user_id + "\\n" + timestamp + "\\n" + sha256hex(raw body)

and the keys are the ``OKP``/``Ed25519`` entries of the JWKS at
``https://rest.fal.ai/.well-known/jwks.json`` (``WANBATCH_WEBHOOK_JWKS_URL``). Keys rotate, so
every key is tried, and a signature no cached key verifies makes the JWKS be fetched again (at
most once per :data:`REFRESH_MIN_SECONDS`). A delivery more than :data:`TIMESTAMP_TOLERANCE`
seconds off our clock is refused, so a captured delivery cannot be replayed later.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

#: fal's published tolerance: a delivery more than 5 minutes off is refused.
TIMESTAMP_TOLERANCE = 300.0
#: A JWKS is fetched again at most this often when a signature meets no known key.
REFRESH_MIN_SECONDS = 30.0
#: Keys are kept at most this long without a fetch.
KEYS_MAX_AGE = 24 * 3600.0
#: Largest JWKS document read.
JWKS_MAX_BYTES = 64 * 1024

REQUEST_ID = "x-fal-webhook-request-id"
USER_ID = "x-fal-webhook-user-id"
TIMESTAMP = "x-fal-webhook-timestamp"
SIGNATURE = "x-fal-webhook-signature"


class WebhookRejected(Exception):
    """A delivery that must change nothing; ``status_code`` is the HTTP answer it gets."""

    def __init__(self, reason: str, status_code: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code


class JwksUnavailable(WebhookRejected):
    """The signing keys could not be fetched: the delivery is refused (fal retries it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, 503)


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    """What fal's signature covers."""
    return f"{request_id}\n{user_id}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()


def keys_of(jwks: object) -> list[Ed25519PublicKey]:
    """The Ed25519 public keys of a JWKS document (other or malformed entries are skipped)."""
    entries = jwks.get("keys") if isinstance(jwks, dict) else None
    keys: list[Ed25519PublicKey] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue
        x = entry.get("x")
        if not isinstance(x, str):
            continue
        try:
            raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
        except (ValueError, binascii.Error):
            continue
    return keys


class JwksKeys:
    """fal's signing keys, fetched with httpx, cached, and fetched again when none verifies.

    Thread-safe: the receiver verifies deliveries on several threads at once.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        refresh_min_seconds: float = REFRESH_MIN_SECONDS,
        max_age: float = KEYS_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url
        self._timeout = timeout
        self._refresh_min = refresh_min_seconds
        self._max_age = max_age
        self._clock = clock
        self._transport = transport
        self._lock = threading.Lock()
        self._keys: list[Ed25519PublicKey] = []
        self._fetched_at: float | None = None
        self.fetches = 0

    def _fetch(self) -> list[Ed25519PublicKey]:
        self.fetches += 1
        try:
            with httpx.Client(timeout=self._timeout, transport=self._transport) as client:
                response = client.get(self.url)
        except httpx.HTTPError as exc:
            raise JwksUnavailable(f"fal's signing keys could not be fetched: {type(exc).__name__}") from None
        if response.status_code != 200 or len(response.content) > JWKS_MAX_BYTES:
            raise JwksUnavailable(f"fal's signing keys could not be fetched: HTTP {response.status_code}")
        try:
            keys = keys_of(json.loads(response.content))
        except ValueError:
            keys = []
        if not keys:
            raise JwksUnavailable("fal's JWKS holds no Ed25519 key")
        return keys

    def _current(self, *, force: bool) -> tuple[list[Ed25519PublicKey], bool]:
        """The cached keys; fetched first when there are none, they are too old, or ``force``
        (a signature none of them verified) and the last fetch is old enough."""
        with self._lock:
            now = self._clock()
            age = None if self._fetched_at is None else now - self._fetched_at
            stale = age is None or age > self._max_age
            fetch = stale or (force and age is not None and age >= self._refresh_min)
            if fetch:
                self._keys = self._fetch()
                self._fetched_at = now
            return list(self._keys), fetch

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether any of fal's keys signed ``message`` (refreshing the keys once if none did)."""
        cached, _ = self._current(force=False)
        if _any_verifies(cached, message, signature):
            return True
        fresh, fetched = self._current(force=True)
        return fetched and _any_verifies(fresh, message, signature)


def _any_verifies(keys: list[Ed25519PublicKey], message: bytes, signature: bytes) -> bool:
    for key in keys:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return True
    return False


@dataclass(frozen=True)
class VerifiedDelivery:
    """A delivery whose signature, timestamp and body all check out."""

    request_id: str
    user_id: str
    timestamp: int
    body: dict[str, Any]
    body_sha256: str

    @property
    def ok(self) -> bool:
        """fal's ``status``: ``OK``, or ``ERROR`` (the request failed)."""
        return self.body.get("status") == "OK"


def verify_delivery(
    headers: Mapping[str, str],
    body: bytes,
    keys: JwksKeys,
    *,
    now: float | None = None,
    tolerance: float = TIMESTAMP_TOLERANCE,
) -> VerifiedDelivery:
    """The delivery, checked; :class:`WebhookRejected` (or :class:`JwksUnavailable`) otherwise.

    Cheap checks come first (headers, timestamp), so a flood of junk never fetches the JWKS.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    request_id, user_id = lower.get(REQUEST_ID, ""), lower.get(USER_ID, "")
    stamp, signature_hex = lower.get(TIMESTAMP, ""), lower.get(SIGNATURE, "")
    if not (request_id and user_id and stamp and signature_hex):
        raise WebhookRejected("missing X-Fal-Webhook-* headers")
    if not stamp.isdigit() or len(stamp) > 12:
        raise WebhookRejected("the timestamp is not unix seconds")
    moment = int(stamp)
    if abs((time.time() if now is None else now) - moment) > tolerance:
        raise WebhookRejected("the timestamp is more than 5 minutes off")
    try:
        signature = bytes.fromhex(signature_hex)
    except ValueError:
        signature = b""
    if len(signature) != 64:
        raise WebhookRejected("the signature is not 64 hex-encoded bytes")
    if not keys.verify(signed_message(request_id, user_id, stamp, body), signature):
        raise WebhookRejected("bad signature")
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("status") not in ("OK", "ERROR"):
        raise WebhookRejected("the body is not a fal webhook", 400)
    if doc.get("request_id") != request_id:
        raise WebhookRejected("the body's request_id does not match the signed one", 400)
    return VerifiedDelivery(
        request_id=request_id,
        user_id=user_id,
        timestamp=moment,
        body=doc,
        body_sha256=hashlib.sha256(body).hexdigest(),
    )
