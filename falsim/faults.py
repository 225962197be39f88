"""Fault injection: named faults that fire by probability or for the next N eligible events.

Each kind is checked at exactly one place in the server, so a test can say "the next 3
submits get a 429" (``{"submit_429": {"next": 3}}``) or "5 % of downloads fail"
(``{"download_error": {"probability": 0.05, "status": 500}}``). Extra keys of a rule are
parameters of that fault (a status code, a delay, an error type).

The kinds, where each fires and what the client sees, are :data:`FAULTS` (``wanbatch simulator
--help`` lists them from there). Set them at start-up (``--fault KIND=P`` fires with probability
P < 1, ``--fault KIND=N`` on the next N events) or while the simulator runs with
``POST /_sim/faults`` (a JSON object ``{kind: {"probability": p, "next": n, ...params}}``;
``?replace=1`` drops every other rule first), read them and how often each fired with
``GET /_sim/faults``, clear them with ``DELETE /_sim/faults``.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass, field
from typing import Any, TypedDict

#: Every fault kind: where it fires → what the client sees (and its parameters). A plain dict
#: literal on purpose: ``wanbatch simulator --help`` reads it from this file without importing
#: the simulator (a third of a second), and the README's list is generated from it.
FAULTS: dict[str, str] = {
    "submit_429": 'submit → 429 {"detail": "Too many requests"}, no Retry-After; nothing queued.',
    "submit_502": (
        "submit → 502 nginx HTML, no x-fal-request-id (fal_client retries it); nothing queued, "
        "but the client cannot tell (wanbatch: submit_unknown)."
    ),
    "submit_503": "submit → 503 JSON with x-fal-request-id (fal_client does not retry); nothing queued.",
    "submit_504_user": "submit → 504 with X-Fal-Request-Timeout-Type: user; nothing queued.",
    "submit_504_after_accept": (
        "the request IS queued (and billed when it runs), then the gateway answers 504 nginx HTML "
        "(`status: 502`: a 502 page), no x-fal-request-id: its timeout expired after it forwarded "
        "the request."
    ),
    "submit_drop": (
        "the request IS queued (and billed when it runs), then the connection is reset before any "
        "response byte: the client sees a transport error."
    ),
    "submit_slow": (
        "the request IS queued, the response is held for `delay` seconds (default 30; sent at "
        "once when the simulator stops)."
    ),
    "status_502": "status poll → 502 nginx HTML.",
    "status_slow": (
        "status poll is held for `delay` seconds (default 30; sent at once when the simulator stops)."
    ),
    "status_stream_drop": "a status stream sends its first event, then ends before COMPLETED.",
    "model_error": (
        "the request completes with `error_type` (default runner_disconnected) and the result "
        'replays {"detail", "error_type"} with fal\'s status for that type (or `status`); billed '
        "when that status is below 500 (the runner spent time on it), never at 500 and above."
    ),
    "result_expired": "the request's result is gone the moment it completes (404 on result).",
    "download_error": "an output-file GET answers `status` (default 500).",
    "download_slow": (
        "an output-file GET is held for `delay` seconds (default 30; sent at once when the simulator stops)."
    ),
    "download_truncated": (
        "an output-file GET sends half the body, then resets the connection "
        '(`mode: "short"` instead sends a well-formed response with only half the bytes).'
    ),
    "webhook_drop": "the webhook is never sent.",
    "webhook_duplicate": "the webhook is sent twice.",
    "bad_file_name": "the output's file_name is `name` (default ../../escape.mp4).",
    "bad_render": (
        "the request completes, billed, but its video is not what was asked for: `size: [w, h]` "
        "replaces the frame size, `frames: n` the frame count (no parameter: half the requested "
        "size). wanbatch's media check must flag it."
    ),
}

FAULT_KINDS: frozenset[str] = frozenset(FAULTS)


@dataclass
class FaultRule:
    """When one fault fires: first for the ``next`` N events, then with ``probability``."""

    probability: float = 0.0
    next: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: dict[str, Any] | FaultRule) -> FaultRule:
        """From the JSON form ``{"probability": p, "next": n, ...params}``."""
        if isinstance(raw, FaultRule):
            return raw
        data = dict(raw)
        prob = float(data.pop("probability", 0.0))
        nxt = int(data.pop("next", 0))
        if not 0.0 <= prob <= 1.0 or nxt < 0:
            raise ValueError("a fault needs 0 <= probability <= 1 and next >= 0")
        return cls(probability=prob, next=nxt, params=data)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form, as accepted by :meth:`parse`."""
        return {"probability": self.probability, "next": self.next, **self.params}


def check_kind(kind: str) -> str:
    """``kind`` when it names a fault, else a ``ValueError`` listing the known ones."""
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault {kind!r} (known: {', '.join(sorted(FAULT_KINDS))})")
    return kind


def parse_fault_option(text: str) -> tuple[str, FaultRule]:
    """One ``--fault`` of ``wanbatch simulator``: ``KIND=P`` (a probability below 1) or ``KIND=N``.

    ``submit_429=0.1`` fires on 10 % of submits; ``submit_429=3`` on the next 3. A ``ValueError``
    (one line) for anything else.
    """
    key, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    # 1 and more is a count of events, so a whole number: 1.5 is neither (a count of 1 would
    # surprise whoever meant "always", which is no fault's probability either).
    if not sep or not math.isfinite(number) or number < 0 or (number >= 1 and not number.is_integer()):
        raise ValueError(
            f"--fault takes KIND=PROBABILITY (from 0 to below 1) or KIND=COUNT (a whole number), got {text!r}"
        )
    kind = check_kind(key.strip())
    return kind, FaultRule.parse({"probability": number} if number < 1 else {"next": int(number)})


class FaultsSnapshot(TypedDict):
    """The active rules by kind (as :meth:`FaultRule.as_dict`) and how often each kind fired."""

    rules: dict[str, dict[str, Any]]
    fired: dict[str, int]


class FaultPlan:
    """The active faults; thread-safe because tests change them while the server runs."""

    def __init__(self, rules: dict[str, FaultRule] | None = None, rng: random.Random | None = None) -> None:
        self._lock = threading.Lock()
        self._rng = rng or random.Random()
        self._rules: dict[str, FaultRule] = {}
        self.fired: dict[str, int] = {}
        self.set(rules or {})

    def set(self, rules: dict[str, Any], *, replace: bool = False) -> None:
        """Add or replace rules by kind (``replace`` drops every other rule first)."""
        parsed = {check_kind(kind): FaultRule.parse(raw) for kind, raw in rules.items()}
        with self._lock:
            if replace:
                self._rules.clear()
            self._rules.update(parsed)

    def clear(self) -> None:
        """No faults any more (the counts of fired faults are kept)."""
        with self._lock:
            self._rules.clear()

    def reset(self) -> None:
        """No faults, and no count of fired ones: the simulator starts afresh (its reset), and a
        test that reads how often a fault fired counts only its own."""
        with self._lock:
            self._rules.clear()
            self.fired.clear()

    def fire(self, kind: str) -> dict[str, Any] | None:
        """The fault's parameters when ``kind`` fires for this event, else None."""
        with self._lock:
            rule = self._rules.get(kind)
            if rule is None:
                return None
            if rule.next > 0:
                rule.next -= 1
            elif not (rule.probability > 0 and self._rng.random() < rule.probability):
                return None
            self.fired[kind] = self.fired.get(kind, 0) + 1
            return dict(rule.params)

    def snapshot(self) -> FaultsSnapshot:
        """Rules and how often each kind fired, JSON-ready."""
        with self._lock:
            return {
                "rules": {k: r.as_dict() for k, r in self._rules.items()},
                "fired": dict(self.fired),
            }
