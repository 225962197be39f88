"""A failure below HTTP 500 that carries fal's ``error_type`` is billed when a runner spent GPU time.

fal's FAQ (https://fal.ai/docs/model-apis/faq): "Server errors (HTTP 500+) are never charged.
Client-side errors like invalid inputs (HTTP 422) may still be charged if a runner spent GPU
time." fal attaches an ``error_type`` to nearly every failure, so a 400 ``bad_request``, a 422
content-policy rejection or a 499 ``client_disconnected`` after inference time is billed like a
plain 422 after inference time; without inference time, or at 500 and above, it is not.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from jobs.billing import Outcome, billed, classify_failure, load_rules

RAN = {"inference_time": 4.2}
NOT_RAN: list[dict[str, object] | None] = [None, {}, {"inference_time": None}, {"inference_time": 0}]


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "bad_request"),
        (422, "content_policy_violation"),
        (499, "client_disconnected"),
        (None, "bad_request"),  # only fal's status was seen: fal documents 400 for it
        (None, "content_policy_violation"),  # a type fal does not list: not known to be a 5xx
    ],
)
def test_an_error_type_below_500_after_inference_time_is_billed(status: int | None, error_type: str) -> None:
    outcome = classify_failure(status, error_type, RAN)
    assert outcome == Outcome.MODEL_ERROR_AFTER_INFERENCE
    assert load_rules()[outcome] == 1
    cost = billed(outcome, Decimal("16"), Decimal("0.8"), prior_usd=Decimal("0.1"))
    assert cost["actual_usd"] == Decimal("0.9")
    assert cost["actual_billing_units"] == Decimal("16")


@pytest.mark.parametrize("metrics", NOT_RAN)
@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, "bad_request"), (422, "content_policy_violation"), (499, "client_disconnected")],
)
def test_an_error_type_below_500_without_inference_time_costs_nothing(
    status: int, error_type: str, metrics: dict[str, object] | None
) -> None:
    outcome = classify_failure(status, error_type, metrics)
    assert outcome == Outcome.MODEL_ERROR
    assert billed(outcome, Decimal("16"), Decimal("0.8"))["actual_usd"] == 0


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (500, "internal_error"),
        (500, "bad_request"),  # the status fal replayed decides, not the type's usual one
        (503, "runner_disconnected"),
        (504, "request_timeout"),
        (None, "runner_disconnected"),  # only fal's status was seen: fal documents 503 for it
        (None, "runner_incomplete_response"),
        (None, "internal_error"),
    ],
)
def test_a_server_error_after_inference_time_is_never_billed(status: int | None, error_type: str) -> None:
    outcome = classify_failure(status, error_type, RAN)
    assert outcome == Outcome.SERVER_ERROR
    assert billed(outcome, Decimal("16"), Decimal("0.8"))["actual_usd"] == 0


def test_client_cancelled_is_still_a_cancel() -> None:
    assert classify_failure(499, "client_cancelled", RAN) == Outcome.CANCELLED_RUNNING
    assert classify_failure(499, "client_cancelled", None) == Outcome.CANCELLED_IN_QUEUE
    assert classify_failure(None, "client_cancelled", RAN) == Outcome.CANCELLED_RUNNING


def test_the_rules_file_names_the_new_outcome() -> None:
    rules = load_rules()
    assert set(rules) == set(Outcome)
    assert rules[Outcome.MODEL_ERROR_AFTER_INFERENCE] == 1
    assert rules[Outcome.MODEL_ERROR] == 0
