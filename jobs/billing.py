"""What the provider bills for a finished request: an outcome class, then a rule from data.

fal's billing depends on how a request ended (success, 5xx, a 4xx after GPU time, cancel while
queued or while running). The *classification* is code — it reads what the provider told us —
but the *fraction billed* per class lives in ``billing_rules.yaml`` beside this module, so a
change in fal's billing (or a correction found by auditing fal's billing events) is a data edit.

Money stays :class:`~decimal.Decimal`; a job's actual cost accumulates over its attempts (a
retried job may have paid for an earlier attempt too).
"""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from jobs.errors import ConfigError

RULES_PATH = Path(__file__).with_name("billing_rules.yaml")

#: fal's request-error types and the HTTP status each is replayed with ("Typical Status Code",
#: https://fal.ai/docs/documentation/model-apis/request-errors): what a failure's status is
#: taken to be when only its ``error_type`` is known (a ``COMPLETED`` status whose result could
#: not be fetched, a cancelled request that ended in an error).
ERROR_TYPE_STATUS: dict[str, int] = {
    "request_timeout": 504,
    "startup_timeout": 504,
    "runner_scheduling_failure": 503,
    "runner_connection_timeout": 503,
    "runner_disconnected": 503,
    "runner_connection_refused": 503,
    "runner_connection_error": 503,
    "runner_incomplete_response": 502,
    "runner_server_error": 500,
    "internal_error": 500,
    "client_disconnected": 499,
    "client_cancelled": 499,
    "bad_request": 400,
}


class Outcome(StrEnum):
    """How one provider request ended, as far as billing is concerned."""

    SUCCEEDED = "succeeded"
    SERVER_ERROR = "server_error"
    MODEL_ERROR_AFTER_INFERENCE = "model_error_after_inference"
    MODEL_ERROR = "model_error"
    VALIDATION_ERROR_AFTER_INFERENCE = "validation_error_after_inference"
    VALIDATION_ERROR = "validation_error"
    CLIENT_ERROR_AFTER_INFERENCE = "client_error_after_inference"
    CLIENT_ERROR = "client_error"
    CANCELLED_IN_QUEUE = "cancelled_in_queue"
    CANCELLED_RUNNING = "cancelled_running"


@lru_cache(maxsize=4)
def load_rules(path: Path = RULES_PATH) -> dict[Outcome, Decimal]:
    """The billed fraction per outcome; every :class:`Outcome` must be given, each in [0, 1]."""
    with path.open(encoding="utf-8") as fh:
        raw: Any = yaml.safe_load(fh)
    table = raw.get("outcomes") if isinstance(raw, dict) else None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: expected a mapping 'outcomes: {{class: fraction}}'")
    rules: dict[Outcome, Decimal] = {}
    for outcome in Outcome:
        if outcome.value not in table:
            raise ConfigError(f"{path}: no billing rule for outcome {outcome.value!r}")
        fraction = Decimal(str(table[outcome.value]))
        if not Decimal(0) <= fraction <= Decimal(1):
            raise ConfigError(f"{path}: {outcome.value} must be a fraction between 0 and 1")
        rules[outcome] = fraction
    unknown = set(table) - {o.value for o in Outcome}
    if unknown:
        raise ConfigError(f"{path}: unknown outcome(s) {sorted(unknown)}")
    return rules


def ran(metrics: dict[str, Any] | None) -> bool:
    """Whether fal reported inference time for the request (a runner worked on it)."""
    value = (metrics or {}).get("inference_time")
    return isinstance(value, int | float) and value > 0


def classify_failure(
    status_code: int | None, error_type: str | None, metrics: dict[str, Any] | None
) -> Outcome:
    """The billing class of a request that ended without an output.

    ``status_code`` is the HTTP status fal replayed for the result (None when only the status
    was seen: then the status fal documents for ``error_type``, :data:`ERROR_TYPE_STATUS`),
    ``error_type`` fal's own error type (set for model/infrastructure errors, unset for a plain
    422 validation error), ``metrics`` the status's metrics (``inference_time``).

    fal: "Server errors (HTTP 500+) are never charged. Client-side errors like invalid inputs
    (HTTP 422) may still be charged if a runner spent GPU time." So below 500 what decides is
    whether fal reported inference time — with an ``error_type`` (400 ``bad_request``, a 422
    content-policy rejection, 499 ``client_disconnected``) as without one.
    """
    status = status_code if status_code is not None else ERROR_TYPE_STATUS.get(error_type or "")
    if status is not None and status >= 500:
        return Outcome.SERVER_ERROR
    if error_type in ("client_cancelled",):
        return Outcome.CANCELLED_RUNNING if ran(metrics) else Outcome.CANCELLED_IN_QUEUE
    if status_code == 422 and not error_type:
        return Outcome.VALIDATION_ERROR_AFTER_INFERENCE if ran(metrics) else Outcome.VALIDATION_ERROR
    if error_type:
        return Outcome.MODEL_ERROR_AFTER_INFERENCE if ran(metrics) else Outcome.MODEL_ERROR
    return Outcome.CLIENT_ERROR_AFTER_INFERENCE if ran(metrics) else Outcome.CLIENT_ERROR


def classify_cancel(metrics: dict[str, Any] | None, *, seen_running: bool = False) -> Outcome:
    """A request fal reports cancelled: billed only if it had started running — as fal's metrics
    say (``inference_time``), or as we saw ourselves (``seen_running``: fal said IN_PROGRESS).
    Either is enough: metrics can be missing (fal's webhooks carry none, legacy apps report
    none), and a request a runner took is billed whatever we were told of it afterwards."""
    return Outcome.CANCELLED_RUNNING if seen_running or ran(metrics) else Outcome.CANCELLED_IN_QUEUE


def billed(
    outcome: Outcome,
    est_units: Decimal,
    est_usd: Decimal,
    *,
    prior_units: Decimal | None = None,
    prior_usd: Decimal | None = None,
) -> dict[str, Decimal]:
    """The job's ``actual_billing_units``/``actual_usd`` after one more attempt ended as ``outcome``.

    Adds this attempt's bill (its fraction of the estimate) to what earlier attempts cost.
    """
    fraction = load_rules()[outcome]
    return {
        "actual_billing_units": (prior_units or Decimal(0)) + est_units * fraction,
        "actual_usd": (prior_usd or Decimal(0)) + est_usd * fraction,
    }
