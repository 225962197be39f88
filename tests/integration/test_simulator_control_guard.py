"""The simulator's control API (``/_sim/…``) answers this machine's own clients, not a web page.

It had no check at all: another site's page changed the fault rules with a ``text/plain`` POST
(no preflight needed), and a page whose DNS name was rebound to 127.0.0.1 read ``GET
/_sim/ledger`` — every job's webhook URL with its binding token. Now a ``Host`` that is no
address and none of the simulator's names is refused 403, as is another ``Origin``, and a
control POST whose body is said to be anything but JSON gets 415; nothing is changed by them.
fal_client's and wanbatch's requests (``Host`` the simulator's address, no ``Origin``) pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from starlette.datastructures import Headers

from falsim import SimulatorHandle, SimulatorOptions, running_simulator
from falsim.app import control_refusal
from tests.integration.sim_helpers import AUTH
from tests.sample_inputs import INPUTS

RULE = '{"submit_429": {"next": 5}}'


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    options = SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0, rng_seed=7)
    with running_simulator(options) as handle:
        yield handle


def _rules(sim: SimulatorHandle) -> dict[str, object]:
    answer = httpx.get(f"{sim.url}/_sim/faults")
    assert answer.status_code == 200, answer.text
    return dict(answer.json()["rules"])


def test_another_sites_text_plain_post_changes_no_rule(sim: SimulatorHandle) -> None:
    before = _rules(sim)
    page = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    refused = httpx.post(f"{sim.url}/_sim/faults?replace=1", content=RULE, headers=page)
    assert refused.status_code == 403
    assert "Origin" in refused.json()["detail"]
    # The same body with no Origin (a page of no site at all, or an old browser): the content
    # type alone is refused, as any a page may send without asking.
    for content_type in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ):
        answer = httpx.post(
            f"{sim.url}/_sim/faults?replace=1", content=RULE, headers={"Content-Type": content_type}
        )
        assert answer.status_code == 415, content_type
        assert "application/json" in answer.json()["detail"]
    assert httpx.post(f"{sim.url}/_sim/reset", headers={"Origin": "null"}).status_code == 403
    assert _rules(sim) == before


def test_a_rebound_host_reads_no_ledger(sim: SimulatorHandle) -> None:
    with httpx.Client(headers=AUTH, timeout=10) as client:
        hook = "http://127.0.0.1:9/webhooks/fal?job=j1&attempt=1&token=secret-binding-token"
        submitted = client.post(
            f"{sim.url}/fal-ai/wan-22", params={"fal_webhook": hook}, json=INPUTS["fal-ai/wan-22"]
        )
        assert submitted.status_code == 200
    port = sim.url.rsplit(":", 1)[1]
    for host in (f"rebind.evil.example:{port}", "rebind.evil.example", f"localhost.evil.example:{port}"):
        answer = httpx.get(f"{sim.url}/_sim/ledger", headers={"Host": host})
        assert answer.status_code == 403, host
        assert "secret-binding-token" not in answer.text
        assert "DNS rebinding" in answer.json()["detail"]
        assert httpx.get(f"{sim.url}/_sim/faults", headers={"Host": host}).status_code == 403
        changed = httpx.post(
            f"{sim.url}/_sim/faults?replace=1", json={"submit_429": {"next": 5}}, headers={"Host": host}
        )
        assert changed.status_code == 403
    assert _rules(sim) == {}
    # Its own clients read on: by address, by localhost, and with their own Origin.
    assert httpx.get(f"{sim.url}/_sim/ledger").json()["accepted"] == 1
    assert httpx.get(f"{sim.url}/_sim/ledger", headers={"Host": f"localhost:{port}"}).status_code == 200
    same = httpx.post(f"{sim.url}/_sim/faults", json={"submit_429": {"next": 1}}, headers={"Origin": sim.url})
    assert same.status_code == 200
    assert httpx.post(f"{sim.url}/_sim/faults?replace=1", content=RULE).status_code == 200  # no type said
    assert httpx.delete(f"{sim.url}/_sim/faults").status_code == 200
    assert httpx.post(f"{sim.url}/_sim/reset").status_code == 200


def _status(method: str, headers: dict[str, str], own: frozenset[str] = frozenset()) -> int:
    refusal = control_refusal(method, Headers(headers), own)
    return 200 if refusal is None else refusal[0]


def test_addresses_loopback_names_and_its_own_names_pass() -> None:
    """Any address passes (no DNS answer makes an address name another machine: a simulator
    bound to every interface stays reachable by its LAN address), as do loopback names and the
    names it was started under; any other name is refused, and so is no ``Host`` at all."""
    assert _status("GET", {"host": "simulator:8787"}, frozenset({"simulator"})) == 200
    assert _status("GET", {"host": "[::1]:8787"}) == 200
    assert _status("GET", {"host": "192.0.2.7:8787"}) == 200
    assert _status("GET", {"host": "localhost"}) == 200
    assert _status("GET", {"host": "simulator:8787"}) == 403
    assert _status("GET", {}) == 403
    assert _status("POST", {"host": "127.0.0.1:8787", "content-type": "application/merge-patch+json"}) == 200
    assert (
        _status("POST", {"host": "127.0.0.1:8787", "content-type": "application/json; charset=utf-8"}) == 200
    )
    assert _status("GET", {"host": "127.0.0.1:8787", "origin": "http://127.0.0.1:8787"}) == 200
    assert _status("GET", {"host": "127.0.0.1:8787", "origin": "http://127.0.0.1:8788"}) == 403


def test_a_public_url_names_the_simulator_too(sim: SimulatorHandle) -> None:
    with running_simulator(SimulatorOptions(public_url="http://simulator:8787")) as named:
        port = named.engine.served_url.rsplit(":", 1)[1]
        direct = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{direct}/_sim/ledger", headers={"Host": "simulator:8787"}).status_code == 200
        assert httpx.get(f"{direct}/_sim/ledger", headers={"Host": "elsewhere:8787"}).status_code == 403
