"""The simulator's webhook deliveries and the proxy variables: a receiver on this machine's
loopback is reached directly (a proxy elsewhere cannot reach it: through ``HTTP_PROXY`` every
delivery was the proxy's 502), any other through the proxy the environment names."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from falsim import SimulatorOptions, running_simulator
from tests.integration.sim_helpers import AUTH, wait_completed, webhook_receiver
from tests.loopback_proxy import BAD_GATEWAY, loopback_proxy
from tests.sample_inputs import INPUTS
from worker.fal.webhooks import JwksKeys

EP = "fal-ai/wan-22"


def test_webhooks_to_loopback_go_direct_and_others_through_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    with loopback_proxy(BAD_GATEWAY) as proxy, webhook_receiver() as rec:
        for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        options = SimulatorOptions(latency_seconds=0.01, webhook_attempts=1)
        with running_simulator(options) as sim, httpx.Client(headers=AUTH, trust_env=False) as client:
            client.post(f"{sim.url}/{EP}", params={"fal_webhook": rec.url}, json=INPUTS[EP])
            assert rec.event.wait(30), sim.ledger()["webhooks"]
            elsewhere = client.post(
                f"{sim.url}/{EP}", params={"fal_webhook": "http://receiver.example/hook"}, json=INPUTS[EP]
            ).json()
            wait_completed(client, elsewhere["status_url"], timeout=30)
            deadline = time.monotonic() + 30
            while not proxy.requests and time.monotonic() < deadline:
                time.sleep(0.02)
    assert len(rec.calls) == 1
    assert [request[0] for request in proxy.requests] == ["POST http://receiver.example/hook HTTP/1.1"]


def test_an_https_receiver_on_loopback_is_trusted_through_ssl_cert_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A local TLS proxy in front of ``wanbatch serve`` (as the README advises), its CA in
    ``SSL_CERT_FILE``: the direct client of loopback deliveries turns the proxy variables off,
    not the certificate ones (it trusted certifi's bundle only: three ConnectErrors, nothing
    delivered)."""
    with webhook_receiver(tls=tmp_path) as rec:
        assert rec.ca_file is not None
        monkeypatch.setenv("SSL_CERT_FILE", str(rec.ca_file))
        options = SimulatorOptions(latency_seconds=0.01, webhook_attempts=1)
        with running_simulator(options) as sim, httpx.Client(headers=AUTH, trust_env=False) as client:
            client.post(f"{sim.url}/{EP}", params={"fal_webhook": rec.url}, json=INPUTS[EP])
            assert rec.event.wait(30), sim.ledger()["webhooks"]
    assert len(rec.calls) == 1


def test_a_jwks_on_loopback_is_fetched_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A receiver tried against the simulator's JWKS (``http://127.0.0.1:PORT/.well-known/
    jwks.json``) behind ``HTTP_PROXY``: the keys come from the simulator, not the proxy's 502."""
    with running_simulator() as sim, loopback_proxy(BAD_GATEWAY) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        health = JwksKeys(f"{sim.url}/.well-known/jwks.json").health()
    assert (health.can_verify, health.error) == (True, None)
    assert proxy.requests == []


def test_a_jwks_on_loopback_is_fetched_whatever_the_proxy_variables_say(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``serve`` with ``WANBATCH_WEBHOOK_JWKS_URL`` on loopback refuses no proxy variable (it
    reaches nothing a proxy carries), so its JWKS client reads none: an ``ftp://`` one made every
    fetch "JWKS unavailable: invalid configuration: HTTPS_PROXY…"."""
    with running_simulator() as sim:
        monkeypatch.setenv("HTTP_PROXY", "ftp://x:1")
        monkeypatch.setenv("ALL_PROXY", "socks4://x:1")
        health = JwksKeys(f"{sim.url}/.well-known/jwks.json").health()
    assert (health.can_verify, health.error) == (True, None)
