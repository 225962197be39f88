"""Verifying fal's webhooks: an Ed25519 signature over the raw body, keys from fal's JWKS.

fal signs every delivery (https://docs.fal.ai/model-endpoints/webhooks, "Verifying your
webhook") and sends four headers: ``X-Fal-Webhook-Request-Id``, ``-User-Id``, ``-Timestamp``
(unix seconds) and ``-Signature`` (hex). The signed message is, in UTF-8::

    request_id + "\\n" + user_id + "\\n" + timestamp + "\\n" + sha256hex(raw body)

and the keys are the ``OKP``/``Ed25519`` entries of the JWKS at
``https://rest.fal.ai/.well-known/jwks.json`` (``WANBATCH_WEBHOOK_JWKS_URL``). Keys rotate, so
every key is tried, and a signature no cached key verifies makes the JWKS be fetched again (at
most once per :data:`REFRESH_MIN_SECONDS`; after a failed fetch, not again for
:data:`FAILURE_BACKOFF_SECONDS`, deliveries meanwhile refused with 503). A fetch is bounded in
time (:data:`FETCH_DEADLINE_SECONDS`) and size (:data:`JWKS_MAX_BYTES`), and a delivery the
cached keys verify never waits for one. A delivery more than :data:`TIMESTAMP_TOLERANCE`
seconds off our clock is refused, so a captured delivery cannot be replayed later.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from jobs.digits import ascii_int
from jobs.errors import WanbatchError
from worker.fal.errors import parse_json

if TYPE_CHECKING:  # imported where used: only the receiver verifies (about 10 ms of start-up)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

#: fal's published tolerance: a delivery more than 5 minutes off is refused.
TIMESTAMP_TOLERANCE = 300.0
#: A JWKS is fetched again at most this often when a signature meets no known key.
REFRESH_MIN_SECONDS = 30.0
#: Keys are kept at most this long without a fetch.
KEYS_MAX_AGE = 24 * 3600.0
#: After a failed fetch, deliveries that need the keys are refused (503) without fetching
#: again for this long: a flood of forged deliveries cannot become a flood of fetches.
FAILURE_BACKOFF_SECONDS = 5.0
#: Longest one fetch of the JWKS may take in all, however slowly its bytes arrive.
FETCH_DEADLINE_SECONDS = 10.0
#: Longest a delivery waits for a fetch another delivery started before it is refused (503).
FETCH_WAIT_SECONDS = 2.0
#: Largest JWKS document read (fal's holds a few keys of a hundred bytes each).
JWKS_MAX_BYTES = 64 * 1024

_UNFETCHED = "fal's signing keys could not be fetched"

REQUEST_ID = "x-fal-webhook-request-id"
USER_ID = "x-fal-webhook-user-id"
TIMESTAMP = "x-fal-webhook-timestamp"
SIGNATURE = "x-fal-webhook-signature"


class WebhookRejected(WanbatchError):
    """A delivery that must change nothing; ``status_code`` is the HTTP answer it gets (the
    receiver, :class:`web.receiver.WebhookReceiver`, answers it: it never reaches the command line)."""

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
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

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


def _transport_reason(exc: BaseException) -> str:
    """Why the JWKS could not be fetched, in one line, its cause named: the proxy (its
    ``host:port`` and variable, never its credentials) that refused or could not reach the
    host, the CA bundle a certificate did not verify against
    (:mod:`worker.fal.proxy_failure`), else httpx's reason for a connect or a read (no URL in
    those), else the error's type alone (an invalid URL's words quote it)."""
    from jobs.url_secrets import mask_urls
    from worker.fal.proxy_failure import certificate_words, proxy_failure, target_of

    name = type(exc).__name__
    if (proxy := proxy_failure(exc)) is not None:
        return f"{name}: {proxy.describe(target_of(exc))}"
    if (certificate := certificate_words(exc)) is not None:
        return f"{name}: {certificate}"
    text = " ".join(str(exc).split())
    if isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.UnsupportedProtocol) and text:
        return f"{name}: {mask_urls(text)[:200]}"
    return name


@dataclass(frozen=True)
class KeysHealth:
    """What :meth:`JwksKeys.health` found: ``can_verify`` (there are keys to verify with),
    how many, and why the last fetch failed (None: it did not)."""

    can_verify: bool
    keys: int
    error: str | None


class JwksKeys:
    """fal's signing keys, fetched with httpx, cached, and fetched again when none verifies.

    Thread-safe: the receiver verifies deliveries on several threads at once. Two locks: a
    short one over the cached keys (held for a few assignments, never during a fetch), and
    one a fetch holds, so only one fetch is ever under way. A delivery the cached keys verify
    never waits for a fetch. One that needs a fetch while another is under way waits for it at
    most ``fetch_wait`` seconds and then takes that fetch's result, or is refused
    (:class:`JwksUnavailable`, 503: fal retries). A failed fetch is remembered: for
    ``failure_backoff`` seconds every delivery that needs the keys is refused the same way
    without fetching again, so forged deliveries cannot turn into a flood of fetches.

    A fetch takes at most ``deadline`` seconds in all, connect, headers and body together
    (httpx's timeouts bound each wait for bytes, not the whole, so a JWKS whose headers or
    body are sent a byte at a time is cut off by the deadline:
    :func:`~worker.fal.http.cut_off_at`), and reads at most :data:`JWKS_MAX_BYTES` of the
    document.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        deadline: float = FETCH_DEADLINE_SECONDS,
        refresh_min_seconds: float = REFRESH_MIN_SECONDS,
        failure_backoff: float = FAILURE_BACKOFF_SECONDS,
        fetch_wait: float = FETCH_WAIT_SECONDS,
        max_age: float = KEYS_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url
        self._timeout = min(timeout, deadline)
        self._deadline = deadline
        self._refresh_min = refresh_min_seconds
        self._failure_backoff = failure_backoff
        self._fetch_wait = fetch_wait
        self._max_age = max_age
        self._clock = clock
        self._transport = transport
        #: Guards the fields below; never held while fetching.
        self._state = threading.Lock()
        #: Held by the one fetch under way.
        self._fetching = threading.Lock()
        self._keys: list[Ed25519PublicKey] = []
        self._fetched_at: float | None = None
        #: When the last fetch failed, and why (None: it did not).
        self._failed_at: float | None = None
        self._failure = ""
        #: Whether a delivery verified since the last failed fetch: that failure is old news to
        #: :meth:`health` then, the keys held verify (the back-off still goes by ``_failed_at``).
        self._verified_since_failure = False
        #: Fetches finished, either way: a thread that waited for another's fetch tells by it.
        self._generation = 0
        #: Fetches started (for tests and diagnostics).
        self.fetches = 0

    def _fetch(self) -> list[Ed25519PublicKey]:
        """The keys the JWKS publishes now; :class:`JwksUnavailable` when it cannot be read.

        Read as every answer from fal is (:func:`~worker.fal.http.decoded_chunks`): a body sent
        compressed although ``identity`` was asked for is inflated a bounded step at a time, so
        the size cap stops it; httpx's own decoder inflated one wire chunk of a "zip bomb" to
        gigabytes before the cap was looked at."""
        from jobs.errors import ConfigError
        from jobs.http_environment import beyond_loopback
        from worker.fal.http import (
            cut_off_at,
            decoded_chunks,
            direct_mounts,
            environment_checked,
            shared_ssl_context,
            with_deadlines,
        )

        self.fetches += 1
        cut_off = time.monotonic() + self._deadline
        too_slow = f"{_UNFETCHED}: the JWKS took over {self._deadline:g} s to arrive"
        body = bytearray()
        try:
            # A JWKS on this machine's loopback (the simulator's, a test receiver's) is fetched
            # directly: through HTTP_PROXY it was the proxy's 502 (README: Proxies and certificates).
            with environment_checked():
                client = with_deadlines(
                    httpx.Client(
                        timeout=self._timeout,
                        transport=self._transport,
                        verify=shared_ssl_context(),
                        mounts=direct_mounts([self.url]),
                        # One on loopback reads no proxy variable: `serve` refuses none for it.
                        trust_env=beyond_loopback([self.url]),
                        headers={"Accept-Encoding": "identity"},  # what is counted is what is sent
                    )
                )
        except ConfigError as exc:  # a certificate file OpenSSL refuses: the receiver says so
            raise JwksUnavailable(f"{_UNFETCHED}: {exc}") from None
        try:
            with (
                cut_off_at(cut_off, too_slow) as cut,
                client,
                client.stream("GET", self.url) as response,
            ):
                if response.status_code != 200:
                    raise JwksUnavailable(f"{_UNFETCHED}: HTTP {response.status_code}")
                declared = ascii_int(response.headers.get("content-length"), max_digits=18)
                if declared is not None and declared > JWKS_MAX_BYTES:
                    raise JwksUnavailable(f"{_UNFETCHED}: the JWKS is too large ({declared} bytes)")
                for chunk in itertools.chain([b""], decoded_chunks(response)):  # checked before any read
                    body += chunk
                    if len(body) > JWKS_MAX_BYTES:
                        raise JwksUnavailable(
                            f"{_UNFETCHED}: the JWKS is too large (over {JWKS_MAX_BYTES} bytes)"
                        )
                    if time.monotonic() > cut_off:
                        raise JwksUnavailable(too_slow)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            if cut is not None and cut.hit:  # a wait (the headers' too) cut short by the deadline
                raise JwksUnavailable(too_slow) from None
            raise JwksUnavailable(f"{_UNFETCHED}: {_transport_reason(exc)}") from None
        try:
            doc = json.loads(bytes(body))
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python recurses
            raise JwksUnavailable("fal's JWKS is not valid JSON") from None
        keys = keys_of(doc)
        if not keys:
            raise JwksUnavailable("fal's JWKS holds no Ed25519 key")
        return keys

    def _plan(self, *, force: bool) -> tuple[list[Ed25519PublicKey], bool, int]:
        """``(usable cached keys, whether to fetch, fetches finished so far)``. A fetch is due
        when there are no keys, they are too old, or ``force`` (a signature none of them
        verified) and the last fetch is old enough; within ``failure_backoff`` of a failed
        fetch a due fetch is refused instead (:class:`JwksUnavailable`)."""
        with self._state:
            now = self._clock()
            age = None if self._fetched_at is None else now - self._fetched_at
            stale = age is None or age > self._max_age
            due = stale or (force and age is not None and age >= self._refresh_min)
            if due and self._failed_at is not None and now - self._failed_at < self._failure_backoff:
                raise JwksUnavailable(
                    f"{self._failure} (not fetched again for {self._failure_backoff:g} s after a failure)"
                )
            return ([] if stale else list(self._keys)), due, self._generation

    def _refresh(self, seen: int) -> list[Ed25519PublicKey]:
        """Fetch the keys, unless a fetch finished since ``seen`` (then its result stands)."""
        if not self._fetching.acquire(timeout=self._fetch_wait):
            raise JwksUnavailable(
                f"fal's signing keys are being fetched: not ready within {self._fetch_wait:g} s"
            )
        try:
            with self._state:
                if self._generation != seen:  # fetched while this thread waited
                    if self._failed_at is not None:
                        raise JwksUnavailable(self._failure)
                    return list(self._keys)
                started = self._clock()
            try:
                keys = self._fetch()
            except JwksUnavailable as exc:
                with self._state:
                    self._failed_at, self._failure = self._clock(), exc.reason
                    self._verified_since_failure = False
                    self._generation += 1
                raise
            with self._state:
                self._keys, self._fetched_at, self._failed_at, self._failure = keys, started, None, ""
                self._generation += 1
            return list(keys)
        finally:
            self._fetching.release()

    def health(self, wait: float | None = None) -> KeysHealth:
        """Whether a delivery signed with a key of the JWKS can be verified now.

        Fetches the keys when a delivery would (none yet, or too old), under the same rules, so
        ``GET /healthz`` and ``wanbatch doctor`` see what the next delivery would meet (a
        receiver that has had no delivery yet has fetched nothing), and asking often fetches no
        more often than deliveries do. ``wait``: the longest to wait for that fetch (None: until
        it ends, itself bounded); a fetch still under way then goes on and is reported as such,
        so a health check with a short timeout still gets its answer in time. Usable keys count
        even after a failed fetch (one forced by a signature they did not verify); that failure
        is still reported, until a later fetch succeeds or a delivery verifies with those keys:
        ``/healthz`` kept one failed refresh's error for up to a day (until the keys aged)
        beside ``can_verify_signatures: true``, while every delivery was accepted.
        """
        try:
            keys, due, seen = self._plan(force=False)
        except JwksUnavailable as exc:
            return KeysHealth(can_verify=False, keys=0, error=exc.reason)
        if due:
            fetched: list[list[Ed25519PublicKey] | JwksUnavailable] = []

            def fetch() -> None:
                try:
                    fetched.append(self._refresh(seen))
                except JwksUnavailable as exc:
                    fetched.append(exc)

            thread = threading.Thread(target=fetch, name="wanbatch-jwks-fetch", daemon=True)
            thread.start()
            thread.join(wait)
            if not fetched:
                return KeysHealth(
                    can_verify=False,
                    keys=0,
                    error=f"fal's signing keys are being fetched: no answer within {wait:g} s yet",
                )
            if isinstance(fetched[0], JwksUnavailable):
                return KeysHealth(can_verify=False, keys=0, error=fetched[0].reason)
            keys = fetched[0]
        with self._state:
            current = self._failed_at is not None and not (keys and self._verified_since_failure)
            failure = self._failure if current else None
        return KeysHealth(can_verify=bool(keys), keys=len(keys), error=failure)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether any of fal's keys signed ``message`` (refreshing the keys once if none did)."""
        verified = self._verify(message, signature)
        if verified:
            with self._state:
                self._verified_since_failure = True
        return verified

    def _verify(self, message: bytes, signature: bytes) -> bool:
        keys, due, seen = self._plan(force=False)
        if due:
            keys = self._refresh(seen)
        if _any_verifies(keys, message, signature):
            return True
        if due:  # just fetched: there is nothing newer to try
            return False
        fresh, due, latest = self._plan(force=True)
        if latest != seen and _any_verifies(fresh, message, signature):
            return True  # another thread's fetch, finished since this one read, brought the key
        return due and _any_verifies(self._refresh(latest), message, signature)


def _any_verifies(keys: list[Ed25519PublicKey], message: bytes, signature: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

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
    moment = ascii_int(stamp, max_digits=12)
    if moment is None:
        raise WebhookRejected("the timestamp is not unix seconds")
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
    try:  # fal's answer: numbers no database holds (``1e999``, 5,000 digits) read as null
        doc = parse_json(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python recurses
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
