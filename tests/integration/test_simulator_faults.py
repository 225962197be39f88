"""Fault injection and webhooks of the fal simulator, seen by real httpx clients over sockets."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from falsim import SimulatorHandle, SimulatorOptions, running_simulator
from tests.integration.sim_helpers import AUTH, verify_webhook, wait_completed, webhook_receiver
from tests.sample_inputs import INPUTS

EP = "fal-ai/wan-22"
PAYLOAD = INPUTS[EP]


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    opts = SimulatorOptions(
        latency_seconds=0.05,
        latency_jitter=0.0,
        concurrency_limit=4,
        webhook_retry_base_seconds=0.02,
        rng_seed=3,
    )
    with running_simulator(opts) as handle:
        yield handle


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(headers=AUTH, timeout=10) as c:
        yield c


def test_submit_rejections(sim: SimulatorHandle, client: httpx.Client) -> None:
    url = f"{sim.url}/{EP}"
    sim.set_faults(
        submit_429={"next": 1}, submit_502={"next": 1}, submit_503={"next": 1}, submit_504_user={"next": 1}
    )
    seen = {}
    for _ in range(4):
        resp = client.post(url, json=PAYLOAD)
        seen[resp.status_code] = resp
    r429, r502, r503, r504 = seen[429], seen[502], seen[503], seen[504]
    assert "retry-after" not in r429.headers
    assert "nginx" in r502.text
    assert "x-fal-request-id" not in r502.headers  # fal_client treats this as an ingress error
    assert r503.headers["x-fal-request-id"]  # …and this one as fal's own answer
    assert r503.json()["error_type"] == "runner_scheduling_failure"
    assert r504.headers["x-fal-request-timeout-type"] == "user"
    assert client.post(url, json=PAYLOAD).status_code == 200  # the "next" counts are used up
    ledger = sim.ledger()
    assert ledger["accepted"] == 1
    assert sorted(r["status_code"] for r in ledger["rejections"]) == [429, 502, 503, 504]
    assert ledger["faults"]["fired"] == {
        "submit_429": 1,
        "submit_502": 1,
        "submit_503": 1,
        "submit_504_user": 1,
    }


@pytest.mark.parametrize(
    ("params", "status", "title"),
    [({}, 504, "504 Gateway Time-out"), ({"status": 502}, 502, "502 Bad Gateway")],
)
def test_gateway_answer_after_accept_leaves_a_queued_billed_request(
    sim: SimulatorHandle, client: httpx.Client, params: dict[str, int], status: int, title: str
) -> None:
    """``submit_504_after_accept``: fal queued the request, then the ingress answered its own
    nginx page (no x-fal-request-id) — what the client sees of a gateway timeout after it
    forwarded the POST."""
    sim.set_faults(submit_504_after_accept={"next": 1, **params})
    resp = client.post(f"{sim.url}/{EP}", json=PAYLOAD)
    assert resp.status_code == status
    assert title in resp.text
    assert "nginx" in resp.text
    assert "x-fal-request-id" not in resp.headers
    deadline = time.monotonic() + 5
    while sim.ledger()["completed"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    ledger = sim.ledger()
    (entry,) = ledger["entries"]
    assert (entry["client_saw_response"], entry["outcome"], entry["billed"]) == (False, "ok", True)
    assert ledger["accepted"] == 1
    assert ledger["rejections"] == []
    assert ledger["faults"]["fired"] == {"submit_504_after_accept": 1}


def test_drop_after_accept_leaves_a_queued_billed_request(sim: SimulatorHandle, client: httpx.Client) -> None:
    sim.set_faults(submit_drop={"next": 1})
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.post(f"{sim.url}/{EP}", json=PAYLOAD)
    deadline = time.monotonic() + 5
    while sim.ledger()["completed"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    (entry,) = sim.ledger()["entries"]
    assert entry["client_saw_response"] is False
    assert entry["outcome"] == "ok"
    assert entry["billed"] is True
    # the client resends blindly: now fal has billed the same input twice
    client.post(f"{sim.url}/{EP}", json=PAYLOAD)
    assert sim.ledger()["duplicates"][0]["endpoint"] == EP


def test_slow_submit_times_out_after_accept(sim: SimulatorHandle) -> None:
    sim.set_faults(submit_slow={"next": 1, "delay": 1.0})
    with httpx.Client(headers=AUTH, timeout=0.3) as short, pytest.raises(httpx.ReadTimeout):
        short.post(f"{sim.url}/{EP}", json=PAYLOAD)
    assert sim.ledger()["accepted"] == 1


def test_status_faults(sim: SimulatorHandle, client: httpx.Client) -> None:
    sub = client.post(f"{sim.url}/{EP}", json=PAYLOAD).json()
    sim.set_faults(status_502={"next": 1})
    bad = client.get(sub["status_url"])
    assert bad.status_code == 502
    assert "nginx" in bad.text
    wait_completed(client, sub["status_url"])


@pytest.mark.parametrize(("error_type", "status"), [("runner_disconnected", 503), ("internal_error", 500)])
def test_model_error(sim: SimulatorHandle, client: httpx.Client, error_type: str, status: int) -> None:
    sim.set_faults(model_error={"next": 1, "error_type": error_type})
    sub = client.post(f"{sim.url}/{EP}", json=PAYLOAD).json()
    done = wait_completed(client, sub["status_url"])
    assert done["status"] == "COMPLETED"
    assert done["error_type"] == error_type
    assert done["error"]
    result = client.get(sub["response_url"])
    assert result.status_code == status
    assert result.headers["x-fal-error-type"] == error_type
    assert result.json() == {"detail": done["error"], "error_type": error_type}
    (entry,) = sim.ledger()["entries"]
    assert entry["billed"] is False  # 5xx are never charged
    assert entry["usd"] == "0"


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        ({"error_type": "bad_request"}, 400),
        ({"error_type": "content_policy_violation", "status": 422}, 422),
        ({"error_type": "client_disconnected"}, 499),
    ],
)
def test_model_error_below_500_after_inference_is_billed(
    sim: SimulatorHandle, client: httpx.Client, fault: dict[str, Any], status: int
) -> None:
    # fal's FAQ: client-side errors "may still be charged if a runner spent GPU time".
    sim.set_faults(model_error={"next": 1, **fault})
    sub = client.post(f"{sim.url}/{EP}", json=PAYLOAD).json()
    done = wait_completed(client, sub["status_url"])
    assert done["error_type"] == fault["error_type"]
    assert done["metrics"]["inference_time"] > 0
    assert client.get(sub["response_url"]).status_code == status
    (entry,) = sim.ledger()["entries"]
    assert entry["billed"] is True
    assert Decimal(entry["usd"]) > 0


def test_result_expired_fault(sim: SimulatorHandle, client: httpx.Client) -> None:
    sim.set_faults(result_expired={"next": 1})
    sub = client.post(f"{sim.url}/{EP}", json=PAYLOAD).json()
    wait_completed(client, sub["status_url"])
    assert client.get(sub["response_url"]).status_code == 404


def _video_url(sim: SimulatorHandle, client: httpx.Client) -> tuple[str, int]:
    sub = client.post(f"{sim.url}/{EP}", json=PAYLOAD).json()
    wait_completed(client, sub["status_url"])
    video = client.get(sub["response_url"]).json()["video"]
    return video["url"], video["file_size"]


def test_download_faults(sim: SimulatorHandle, client: httpx.Client) -> None:
    url, size = _video_url(sim, client)
    sim.set_faults(download_error={"next": 1, "status": 503})
    assert httpx.get(url).status_code == 503
    sim.set_faults(download_truncated={"next": 1})
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):  # reset mid-body
        httpx.get(url)
    sim.set_faults(download_truncated={"next": 1, "mode": "short"})
    short = httpx.get(url)
    assert short.status_code == 200
    assert len(short.content) == size // 2
    assert len(httpx.get(url).content) == size


def test_bad_file_name_fault(sim: SimulatorHandle, client: httpx.Client) -> None:
    sim.set_faults(bad_file_name={"next": 1, "name": "../../etc/passwd"})
    sub = client.post(f"{sim.url}/{EP}", json=PAYLOAD).json()
    wait_completed(client, sub["status_url"])
    video = client.get(sub["response_url"]).json()["video"]
    assert video["file_name"] == "../../etc/passwd"
    assert httpx.get(video["url"]).status_code == 200


def test_probability_faults_are_reproducible() -> None:
    def fired(seed: int) -> list[int]:
        opts = SimulatorOptions(rng_seed=seed, latency_seconds=0.01)
        with running_simulator(opts) as s, httpx.Client(headers=AUTH) as c:
            s.set_faults(submit_429={"probability": 0.5})
            return [c.post(f"{s.url}/{EP}", json=PAYLOAD).status_code for _ in range(20)]

    first = fired(11)
    assert first == fired(11)
    assert 429 in first
    assert 200 in first


def test_webhook_signed_retried_and_verifiable(sim: SimulatorHandle, client: httpx.Client) -> None:
    with webhook_receiver(statuses=[500, 503]) as rec:
        sub = client.post(
            f"{sim.url}/{EP}", params={"fal_webhook": rec.url}, json={**PAYLOAD, "seed": 5}
        ).json()
        assert rec.event.wait(10)
        jwks = httpx.get(f"{sim.url}/.well-known/jwks.json").json()
    assert jwks["keys"][0]["kty"] == "OKP"
    assert jwks["keys"][0]["crv"] == "Ed25519"
    assert len(rec.calls) == 3  # two failures, then delivered
    headers, body = rec.calls[-1]
    assert verify_webhook(jwks, headers, body)
    assert not verify_webhook(jwks, headers, body + b" ")
    h = {k.lower(): v for k, v in headers.items()}
    assert h["x-fal-webhook-request-id"] == sub["request_id"]
    assert h["x-fal-webhook-user-id"] == "sim-user"
    assert abs(int(h["x-fal-webhook-timestamp"]) - time.time()) < 30
    doc = json.loads(body)
    assert body == json.dumps(doc, sort_keys=True).encode()  # sorted keys, default separators
    assert doc["status"] == "OK"
    assert doc["error"] is None
    assert doc["payload"]["seed"] == 5
    assert doc["payload"] == client.get(sub["response_url"]).json()
    delivery = sim.ledger()["webhooks"][0]
    assert delivery["delivered"] is True
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 503, 200]


def test_webhook_error_payload_for_invalid_input(sim: SimulatorHandle, client: httpx.Client) -> None:
    with webhook_receiver() as rec:
        client.post(f"{sim.url}/{EP}", params={"fal_webhook": rec.url}, json={"num_frames": 5})
        assert rec.event.wait(10)
    doc: dict[str, Any] = json.loads(rec.calls[0][1])
    assert doc["status"] == "ERROR"
    assert doc["error"] == "Invalid status code: 422"
    assert doc["payload"]["detail"][0]["loc"][0] == "body"


def test_webhook_drop_and_duplicate(sim: SimulatorHandle, client: httpx.Client) -> None:
    with webhook_receiver() as rec:
        sim.set_faults(webhook_drop={"next": 1})
        dropped = client.post(f"{sim.url}/{EP}", params={"fal_webhook": rec.url}, json=PAYLOAD).json()
        wait_completed(client, dropped["status_url"])
        sim.set_faults(webhook_duplicate={"next": 1})
        client.post(f"{sim.url}/{EP}", params={"fal_webhook": rec.url}, json=PAYLOAD)
        deadline = time.monotonic() + 5
        while len(rec.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
    assert len(rec.calls) == 2
    assert rec.calls[0][1] == rec.calls[1][1]
    assert all(json.loads(b)["request_id"] != dropped["request_id"] for _, b in rec.calls)


def test_webhook_clock_skew_is_visible() -> None:
    opts = SimulatorOptions(latency_seconds=0.01, webhook_clock_skew_seconds=-3600)
    with running_simulator(opts) as s, webhook_receiver() as rec, httpx.Client(headers=AUTH) as c:
        c.post(f"{s.url}/{EP}", params={"fal_webhook": rec.url}, json=PAYLOAD)
        assert rec.event.wait(10)
        headers, body = rec.calls[0]
        assert verify_webhook(s.jwks(), headers, body)  # validly signed…
    h = {k.lower(): v for k, v in headers.items()}
    assert time.time() - int(h["x-fal-webhook-timestamp"]) > 3000  # …but stale
