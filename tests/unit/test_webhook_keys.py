"""fal's signing keys (:class:`worker.fal.webhooks.JwksKeys`) under a hostile or failing JWKS, and
deliveries whose headers or body are built to crash the receiver rather than fool it.

No network: the JWKS is an :class:`httpx.MockTransport` whose handler the test controls (it may
block until the test lets it go, stream forever, or fail), and the clock is the test's.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from falsim.webhooks import WebhookSigner, webhook_body
from jobs.digits import ascii_int
from tests.hostile import gzip_bomb, traced_peak
from worker.fal.webhooks import (
    JWKS_MAX_BYTES,
    JwksKeys,
    JwksUnavailable,
    KeysHealth,
    WebhookRejected,
    signed_message,
    verify_delivery,
)

URL = "http://jwks.test/.well-known/jwks.json"
#: How long a blocked handler waits at most for the test to let it go: only so that a broken
#: implementation fails the test instead of hanging it; never reached when the code is right.
SAFETY = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Jwks:
    """A JWKS the test changes: its document, its status, and a gate a fetch may block on."""

    def __init__(self, *signers: WebhookSigner) -> None:
        self.doc: dict[str, Any] = {"keys": [k for s in signers for k in s.jwks()["keys"]]}
        self.status = 200
        self.requests = 0
        self.block = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.block:
            self.entered.set()
            self.release.wait(SAFETY)
        try:
            return httpx.Response(self.status, json=self.doc)
        finally:
            if self.block:
                self.done.set()

    def keys(self, clock: Clock, **kw: Any) -> JwksKeys:
        return JwksKeys(URL, clock=clock, transport=httpx.MockTransport(self.handler), **kw)


def _signed(signer: WebhookSigner) -> tuple[bytes, bytes]:
    message = signed_message("req-1", "user-1", "1700000000", b"{}")
    return message, signer._key.sign(message)


def test_a_failed_fetch_is_remembered_and_not_repeated_for_the_back_off() -> None:
    """A flood of deliveries while the JWKS fails costs one fetch per back-off, not one each."""
    fal = WebhookSigner()
    jwks, clock = Jwks(fal), Clock()
    jwks.status = 500
    keys = jwks.keys(clock, failure_backoff=5.0)
    message, signature = _signed(fal)
    for _ in range(50):
        with pytest.raises(JwksUnavailable, match="HTTP 500") as refused:
            keys.verify(message, signature)
        assert refused.value.status_code == 503
    assert jwks.requests == 1
    clock.now += 4.9
    with pytest.raises(JwksUnavailable):
        keys.verify(message, signature)
    assert jwks.requests == 1
    clock.now += 0.2  # the back-off is over: fetched again, and it works now
    jwks.status = 200
    assert keys.verify(message, signature)
    assert jwks.requests == 2


def test_cached_keys_still_verify_while_a_refresh_keeps_failing() -> None:
    fal, forger = WebhookSigner(), WebhookSigner()
    jwks, clock = Jwks(fal), Clock()
    keys = jwks.keys(clock, refresh_min_seconds=30.0, failure_backoff=5.0)
    message, signature = _signed(fal)
    assert keys.verify(message, signature)
    clock.now += 40  # a forged delivery makes the keys be fetched again: that fails
    jwks.status = 502
    forged = _signed(forger)
    with pytest.raises(JwksUnavailable):
        keys.verify(*forged)
    clock.now += 1
    with pytest.raises(JwksUnavailable, match="not fetched again"):
        keys.verify(*forged)
    assert keys.verify(message, signature)  # fal's own deliveries go on, from the cache
    assert jwks.requests == 2


def test_a_fetch_that_finished_between_two_looks_is_used_not_repeated() -> None:
    """A delivery whose signature the cached keys did not verify looks again before fetching; if
    another delivery's fetch finished in between (it brought the rotated key), that result is
    used: no second fetch. (CI once met this interleaving in the test below: three fetches.)"""
    fal, rotated = WebhookSigner(), WebhookSigner()
    jwks = Jwks(fal)
    keys = JwksKeys(URL, clock=Clock(), refresh_min_seconds=0.0, transport=httpx.MockTransport(jwks.handler))
    assert keys.verify(*_signed(fal))
    jwks.doc = {"keys": fal.jwks()["keys"] + rotated.jwks()["keys"]}
    plan = keys._plan

    def another_fetch_finishes_first(*, force: bool) -> tuple[Any, bool, int]:
        if force:
            keys._refresh(keys._generation)  # another delivery's fetch, finished meanwhile
        return plan(force=force)

    keys._plan = another_fetch_finishes_first  # type: ignore[method-assign]
    assert keys.verify(*_signed(rotated))
    assert jwks.requests == 2


def test_cached_keys_verify_while_a_fetch_hangs_and_waiters_get_its_result() -> None:
    """A forged delivery starts a fetch that hangs: fal's next delivery, which the cached keys
    verify, does not wait for it; a delivery signed by a new key waits for that fetch (bounded)
    and takes its result instead of fetching again."""
    fal, rotated, forger = WebhookSigner(), WebhookSigner(), WebhookSigner()
    jwks, clock = Jwks(fal), Clock()
    planned = threading.Event()

    def noting_clock() -> float:
        if threading.current_thread().name == "rotated":
            planned.set()
        return clock()

    keys = JwksKeys(
        URL,
        clock=noting_clock,
        refresh_min_seconds=0.0,
        fetch_wait=SAFETY,
        transport=httpx.MockTransport(jwks.handler),
    )
    message, signature = _signed(fal)
    assert keys.verify(message, signature)
    jwks.block = True
    jwks.doc = {"keys": fal.jwks()["keys"] + rotated.jwks()["keys"]}
    forged_result: list[object] = []
    forging = threading.Thread(target=lambda: forged_result.append(keys.verify(*_signed(forger))))
    forging.start()
    try:
        assert jwks.entered.wait(SAFETY)
        assert keys.verify(message, signature)
        assert not jwks.done.is_set()  # verified while the fetch was still under way
        rotated_result: list[object] = []
        waiting = threading.Thread(
            target=lambda: rotated_result.append(keys.verify(*_signed(rotated))), name="rotated"
        )
        waiting.start()
        assert planned.wait(SAFETY)
    finally:
        jwks.release.set()
        forging.join(SAFETY)
    waiting.join(SAFETY)
    assert forged_result == [False]
    assert rotated_result == [True]
    assert jwks.requests == 2  # the waiter used the forged delivery's fetch


def test_a_delivery_that_needs_a_fetch_under_way_waits_a_bounded_time() -> None:
    fal, forger = WebhookSigner(), WebhookSigner()
    jwks, clock = Jwks(fal), Clock()
    keys = jwks.keys(clock, refresh_min_seconds=0.0, fetch_wait=0.01)
    message, signature = _signed(fal)
    assert keys.verify(message, signature)
    jwks.block = True
    forging = threading.Thread(target=lambda: keys.verify(*_signed(forger)))
    forging.start()
    try:
        assert jwks.entered.wait(SAFETY)
        with pytest.raises(JwksUnavailable, match="being fetched"):
            keys.verify(*_signed(WebhookSigner()))
    finally:
        jwks.release.set()
        forging.join(SAFETY)
    assert jwks.requests == 2


def test_health_fetches_as_a_delivery_would_and_says_what_it_found() -> None:
    """``/healthz`` and the doctor ask :meth:`JwksKeys.health`: it fetches the keys when none
    are held (a fresh receiver holds none), no more often than deliveries would, and a failure
    of a refresh is reported beside the cached keys that still verify."""
    fal, forger = WebhookSigner(), WebhookSigner()
    jwks, clock = Jwks(fal), Clock()
    keys = jwks.keys(clock, refresh_min_seconds=30.0, failure_backoff=5.0)
    jwks.status = 503
    assert keys.health() == KeysHealth(False, 0, "fal's signing keys could not be fetched: HTTP 503")
    refused = keys.health()  # within the back-off: no fetch
    assert (refused.can_verify, jwks.requests) == (False, 1)
    assert "not fetched again" in str(refused.error)
    clock.now += 5
    jwks.status = 200
    assert keys.health() == KeysHealth(True, 1, None)
    assert keys.health() == KeysHealth(True, 1, None)  # cached: no fetch
    assert jwks.requests == 2
    clock.now += 40  # a forged delivery forces a refresh, which fails: the cache still verifies
    jwks.status = 502
    with pytest.raises(JwksUnavailable):
        keys.verify(*_signed(forger))
    assert keys.health() == KeysHealth(True, 1, "fal's signing keys could not be fetched: HTTP 502")


def test_health_waits_a_bounded_time_for_a_fetch_that_hangs() -> None:
    """A container's health check gives ``/healthz`` a few seconds: a fetch that hangs is
    reported as under way, and its result is there for the next look."""
    fal = WebhookSigner()
    jwks, clock = Jwks(fal), Clock()
    keys = jwks.keys(clock, fetch_wait=SAFETY)
    jwks.block = True
    try:
        pending = keys.health(wait=0.0)
        assert pending.can_verify is False
        assert pending.error == "fal's signing keys are being fetched: no answer within 0 s yet"
        assert jwks.entered.wait(SAFETY)
    finally:
        jwks.release.set()
    assert keys.health(wait=SAFETY) == KeysHealth(True, 1, None)  # that fetch's keys
    assert jwks.requests == 1


def _streaming(chunks: Iterator[bytes], headers: dict[str, str] | None = None) -> httpx.MockTransport:
    return httpx.MockTransport(lambda _request: httpx.Response(200, headers=headers, content=chunks))


def test_a_huge_jwks_is_cut_off_at_the_cap_while_it_streams() -> None:
    sent = 0

    def endless() -> Iterator[bytes]:
        nonlocal sent
        while True:
            sent += 1
            yield b" " * 4096

    keys = JwksKeys(URL, transport=_streaming(endless()))
    with pytest.raises(JwksUnavailable, match="too large") as refused:
        keys.verify(*_signed(WebhookSigner()))
    assert "HTTP 200" not in refused.value.reason
    assert sent * 4096 <= JWKS_MAX_BYTES + 2 * 4096  # stopped at the cap, not at the end


def test_a_compressed_jwks_is_cut_off_at_the_cap_not_inflated_whole() -> None:
    """``identity`` was asked for; a ``gzip`` of a ``gzip`` came anyway. httpx inflated the one
    chunk on the wire whole (200 MiB here, 2.1 GB in the audit) before the cap was looked at."""
    bomb = gzip_bomb(200 << 20)
    keys = JwksKeys(URL, transport=_streaming(iter([bomb]), {"Content-Encoding": "gzip, gzip"}))
    with traced_peak() as peak, pytest.raises(JwksUnavailable, match="too large"):
        keys.verify(*_signed(WebhookSigner()))
    assert peak() < 8 << 20, f"{peak() >> 20} MiB held at once"


def test_a_jwks_declared_too_large_is_not_read() -> None:
    read = []

    def body() -> Iterator[bytes]:
        read.append(1)
        yield b"{}"

    keys = JwksKeys(URL, transport=_streaming(body(), {"Content-Length": str(200 * 1024 * 1024)}))
    with pytest.raises(JwksUnavailable, match="too large"):
        keys.verify(*_signed(WebhookSigner()))
    assert read == []


def test_a_jwks_dripped_a_byte_at_a_time_is_cut_off_by_the_deadline() -> None:
    """Every read gets its byte in time (httpx's timeout is per read), so only a deadline on the
    whole fetch ends it; the drip here is endless, so nothing but that deadline can."""
    stop = threading.Event()

    def drip() -> Iterator[bytes]:
        while not stop.wait(0.005):
            yield b" "

    keys = JwksKeys(URL, deadline=0.05, transport=_streaming(drip()))
    try:
        with pytest.raises(JwksUnavailable, match=r"took over 0\.05 s"):
            keys.verify(*_signed(WebhookSigner()))
    finally:
        stop.set()


@pytest.mark.parametrize("body", [b"[" * 60000, b'{"keys": ' + b"[" * 60000, b"\xff\xfe", b"nope"])
def test_a_jwks_that_is_not_json_is_unavailable_never_a_crash(body: bytes) -> None:
    keys = JwksKeys(URL, transport=httpx.MockTransport(lambda _r: httpx.Response(200, content=body)))
    with pytest.raises(JwksUnavailable, match="not valid JSON"):
        keys.verify(*_signed(WebhookSigner()))


def _delivery(signer: WebhookSigner, body: bytes, **headers: str) -> dict[str, str]:
    return {**signer.headers("req-1", "user-1", body), **headers}


@pytest.mark.parametrize("stamp", ["²", "1700000000²", "١٧٠٠٠٠٠٠٠٠", "+1700000000", " 1700000000", "1_700"])
def test_a_timestamp_of_other_digits_is_refused_not_a_crash(stamp: str) -> None:
    fal = WebhookSigner()
    keys = Jwks(fal).keys(Clock())
    with pytest.raises(WebhookRejected, match="not unix seconds") as refused:
        verify_delivery(_delivery(fal, b"{}", **{"X-Fal-Webhook-Timestamp": stamp}), b"{}", keys)
    assert refused.value.status_code == 401


def test_a_signed_body_nested_too_deep_is_refused_not_a_crash() -> None:
    fal = WebhookSigner()
    body = b'{"status": "OK", "payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    keys = Jwks(fal).keys(Clock())
    with pytest.raises(WebhookRejected, match="not a fal webhook") as refused:
        verify_delivery(_delivery(fal, body), body, keys)
    assert refused.value.status_code == 400


def test_a_good_delivery_still_verifies() -> None:
    fal = WebhookSigner()
    body = webhook_body("req-1", "req-1", True, {"video": {"url": "https://x/v.mp4"}}, None)
    delivery = verify_delivery(_delivery(fal, body), body, Jwks(fal).keys(Clock()))
    assert delivery.ok
    assert json.loads(body)["request_id"] == delivery.request_id


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("42", 42),
        ("00012", 12),
        ("123456789", 123456789),
        ("1234567890", None),  # longer than max_digits
        ("", None),
        (None, None),
        ("²", None),
        ("1²", None),
        ("٣", None),
        ("+1", None),
        ("-1", None),
        (" 1", None),
        ("1 ", None),
        ("1_0", None),
        ("1.0", None),
        ("1\n", None),
    ],
)
def test_ascii_int_takes_ascii_digits_only(text: str | None, expected: int | None) -> None:
    assert ascii_int(text, max_digits=9) == expected


def test_a_failed_refresh_is_no_longer_reported_once_the_keys_held_verify_a_delivery() -> None:
    """An audit: ``/healthz`` said ``signing_keys_error`` (one failed refresh) beside
    ``can_verify_signatures: true`` for up to a day, until the keys aged, while every delivery
    was accepted. A delivery the held keys verify makes that failure old news; a later failure
    is reported again, and the back-off still holds after it."""
    fal, forger = WebhookSigner(), WebhookSigner()
    jwks, clock = Jwks(fal), Clock()
    keys = jwks.keys(clock, refresh_min_seconds=30.0, failure_backoff=5.0)
    assert keys.health() == KeysHealth(True, 1, None)
    clock.now += 40  # a forged delivery forces a refresh, which fails: the cache still verifies
    jwks.status = 500
    with pytest.raises(JwksUnavailable):
        keys.verify(*_signed(forger))
    failed = KeysHealth(True, 1, "fal's signing keys could not be fetched: HTTP 500")
    assert keys.health() == failed
    assert keys.verify(*_signed(fal))  # fal's own delivery: the keys held verify it
    assert keys.health() == KeysHealth(True, 1, None)
    clock.now += 40  # another forced refresh fails: said again
    with pytest.raises(JwksUnavailable):
        keys.verify(*_signed(forger))
    assert keys.health() == failed
    assert jwks.requests == 3
