"""Every knob of the simulator in one dataclass, so `wanbatch simulator`, tests and `--simulate` agree.

Defaults are *fal's* behaviour where it is documented (a new account runs 2 requests at once,
results live 1 h / 6 min without payload storage and 30 days with it, webhooks retry 10 times)
and *demo-friendly* where fal's numbers would make a local run pointless (a Wan video takes a
minute or two on fal; here ``latency_factor`` shrinks that to a second or two). Tests shrink
everything further (``latency_seconds=0.05``, ``webhook_retry_base_seconds=0.01``, …).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from falsim.faults import FaultRule
from jobs.billing import ERROR_TYPE_STATUS

#: fal's request-error table: error_type → the HTTP status the result endpoint replays. One
#: transcription of fal's documented table, shared with how wanbatch bills a failure.
ERROR_STATUS: dict[str, int] = ERROR_TYPE_STATUS


@dataclass
class SimulatorOptions:
    """How the simulated fal account and models behave; ``POST /_sim/options`` changes them at runtime.

    Latency: a request stays IN_PROGRESS for ``latency_seconds`` when set, otherwise for the
    endpoint's ``typical_seconds`` × ``latency_factor``; either is spread by ±``latency_jitter``
    (a fraction). Requests with invalid input finish after a tenth of that (the runner rejects
    them at once).
    """

    #: fal's account-wide limit on IN_PROGRESS requests; more wait IN_QUEUE (never 429).
    concurrency_limit: int = 2
    latency_seconds: float | None = None
    latency_factor: float = 0.02
    latency_jitter: float = 0.25
    #: Result retention without payload storage (``X-Fal-Store-IO: 0``): 1 h, or 6 min when the
    #: result body is ``large_result_bytes`` or more (fal's documented rule).
    result_ttl_seconds: float = 3600.0
    large_result_ttl_seconds: float = 360.0
    large_result_bytes: int = 10 * 1024
    #: With payload storage on (fal's default) results stay for the storage period (30 days).
    stored_result_ttl_seconds: float = 30 * 86400.0
    store_io_default: bool = True
    #: Keys that get 403 "User is locked" at submit (an exhausted balance).
    locked_keys: tuple[str, ...] = ()
    #: When set, only these keys are accepted (401 otherwise); by default any non-empty key is.
    accepted_keys: tuple[str, ...] | None = None
    #: What the model does with input fields it does not know: pydantic's default is to ignore.
    extra_fields: Literal["ignore", "forbid"] = "ignore"
    #: fal: "invalid inputs (HTTP 422) may still be charged if a runner spent GPU time".
    bill_validation_errors: bool = True
    #: Whether a cancel of an IN_PROGRESS request stops the runner (fal: "the model app decides").
    cancel_stops_running: bool = True
    webhook_attempts: int = 10
    webhook_retry_base_seconds: float = 1.0
    webhook_retry_max_seconds: float = 900.0
    webhook_timeout_seconds: float = 10.0
    #: Shifts the webhook timestamp header, to test a receiver's ±5 min tolerance.
    webhook_clock_skew_seconds: float = 0.0
    user_id: str = "sim-user"
    #: Distinct picture patterns; each output also carries its own tag, so bytes differ anyway.
    video_variants: int = 8
    encode_workers: int = 2
    #: Seeds the simulator's own randomness (random seeds, jitter, fault draws) for repeatable runs.
    rng_seed: int | None = None
    sse_keepalive_seconds: float = 15.0
    #: Base URL written into response/status/cancel/file URLs; defaults to the bound address.
    public_url: str | None = None
    faults: dict[str, FaultRule] = field(default_factory=dict)

    def updated(self, changes: dict[str, Any]) -> SimulatorOptions:
        """A copy with ``changes`` applied; unknown names are a ``ValueError`` (control API input)."""
        known = {f.name for f in fields(self)} - {"faults"}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown simulator option(s): {', '.join(sorted(unknown))}")
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in changes.items():
            if name in ("locked_keys", "accepted_keys") and value is not None:
                value = tuple(value)
            data[name] = value
        return SimulatorOptions(**data)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view (for ``GET /_sim/options``); key lists are shown by count only."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "faults"}
        out["locked_keys"] = len(self.locked_keys)
        out["accepted_keys"] = None if self.accepted_keys is None else len(self.accepted_keys)
        out["faults"] = {k: v.as_dict() for k, v in self.faults.items()}
        return out
