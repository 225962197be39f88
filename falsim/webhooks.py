"""fal-style webhook delivery: sorted-key JSON bodies signed with Ed25519, retried on failure.

fal signs ``request_id + "\\n" + user_id + "\\n" + timestamp + "\\n" + sha256hex(body)`` and sends
the four ``X-Fal-Webhook-*`` headers; receivers verify against the JWKS at
``/.well-known/jwks.json`` (here served by the simulator with its own per-process key). Bodies are
``json.dumps(…, sort_keys=True)`` with Python's default separators, as captured from real fal
deliveries, so a receiver that re-serialises instead of hashing the raw bytes fails here too.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def webhook_body(
    request_id: str, gateway_request_id: str, ok: bool, payload: Any, error: str | None
) -> bytes:
    """The exact bytes fal would POST for one completed request."""
    doc = {
        "request_id": request_id,
        "gateway_request_id": gateway_request_id,
        "status": "OK" if ok else "ERROR",
        "payload": payload,
        "error": error,
    }
    return json.dumps(doc, sort_keys=True).encode()


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    """What the signature covers (fal's scheme)."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{request_id}\n{user_id}\n{timestamp}\n{digest}".encode()


class WebhookSigner:
    """One Ed25519 key pair per simulator; its public half is the JWKS."""

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self._key = key or Ed25519PrivateKey.generate()
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.kid = hashlib.sha256(raw).hexdigest()[:16]
        self._x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def jwks(self) -> dict[str, Any]:
        """``{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": …}]}``."""
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": self._x, "kid": self.kid, "use": "sig"}]}

    def headers(self, request_id: str, user_id: str, body: bytes, skew: float = 0.0) -> dict[str, str]:
        """The four ``X-Fal-Webhook-*`` headers for ``body``."""
        timestamp = str(int(time.time() + skew))
        signature = self._key.sign(signed_message(request_id, user_id, timestamp, body)).hex()
        return {
            "Content-Type": "application/json",
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": user_id,
            "X-Fal-Webhook-Timestamp": timestamp,
            "X-Fal-Webhook-Signature": signature,
        }


class DeliveryAttempt(TypedDict):
    """One POST of a webhook: when, and the receiver's status code or the transport error's name."""

    at: float
    status_code: NotRequired[int]
    error: NotRequired[str]


class DeliveryRecord(TypedDict):
    """A webhook's record in the ledger (``Delivery.as_dict``)."""

    request_id: str
    url: str
    attempts: list[DeliveryAttempt]
    delivered: bool
    dropped: bool


@dataclass
class Delivery:
    """The record of one webhook's attempts (for the ledger)."""

    request_id: str
    url: str
    attempts: list[DeliveryAttempt] = field(default_factory=list)
    delivered: bool = False
    dropped: bool = False

    def as_dict(self) -> DeliveryRecord:
        """JSON-ready."""
        return {
            "request_id": self.request_id,
            "url": self.url,
            "attempts": list(self.attempts),
            "delivered": self.delivered,
            "dropped": self.dropped,
        }


async def deliver(
    client: httpx.AsyncClient,
    record: Delivery,
    body: bytes,
    make_headers: Any,
    *,
    attempts: int,
    base_delay: float,
    max_delay: float,
    timeout: float,
) -> None:
    """POST until a 2xx or ``attempts`` run out; each attempt is re-signed with a fresh timestamp."""
    for attempt in range(attempts):
        try:
            response = await client.post(record.url, content=body, headers=make_headers(), timeout=timeout)
            record.attempts.append({"at": time.time(), "status_code": response.status_code})
            if 200 <= response.status_code < 300:
                record.delivered = True
                return
        except httpx.HTTPError as exc:
            record.attempts.append({"at": time.time(), "error": type(exc).__name__})
        if attempt + 1 < attempts:
            await asyncio.sleep(min(max_delay, base_delay * 2**attempt))
