"""Conformance: fal's own Python client (``fal_client``) works against the simulator unmodified.

If fal's client can submit, poll, stream events, fetch, cancel and re-create handles from a
request id against the simulator, the simulator speaks the protocol the way fal does — and
wanbatch's tests against it mean something.

``fal_client`` only speaks ``https://`` and reads ``FAL_QUEUE_RUN_HOST`` once, at import
(``fal_client/client.py`` in github.com/fal-ai/fal). So the simulator runs over TLS with a
throw-away certificate that httpx trusts through ``SSL_CERT_FILE``. In this process the module
constants that the env var would have produced (``QUEUE_URL_FORMAT``; plus the hard-coded
``REST_URL``/``CDN_URL`` for uploads) are patched;
:func:`test_env_var_route_in_a_fresh_interpreter` proves the real route — env vars set before
import — in a subprocess, with the module-level functions.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import fal_client
import httpx
import pytest
from fal_client.client import FalClientHTTPError

from falsim import SimulatorHandle, SimulatorOptions, running_simulator
from tests.sample_inputs import INPUTS

KEY = "sim-conformance-key"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorHandle]:
    opts = SimulatorOptions(latency_seconds=0.1, latency_jitter=0.0, concurrency_limit=4, rng_seed=5)
    with running_simulator(opts, tls=True) as handle:
        yield handle


@pytest.fixture(scope="module")
def fal(sim: SimulatorHandle) -> Iterator[fal_client.SyncClient]:
    """A ``fal_client.SyncClient`` whose hosts point at the TLS simulator."""
    assert sim.ca_file is not None
    host = sim.url.removeprefix("https://")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL_CERT_FILE", str(sim.ca_file))
        mp.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"https://{host}/")
        mp.setattr(fal_client.client, "REST_URL", sim.url)
        mp.setattr(fal_client.client, "CDN_URL", sim.url)
        yield fal_client.SyncClient(key=KEY)


@pytest.fixture(autouse=True)
def _clean(sim: SimulatorHandle) -> None:
    sim.reset()
    sim.update_options(concurrency_limit=4)


def _download(sim: SimulatorHandle, url: str) -> bytes:
    assert sim.ca_file is not None
    import ssl

    with httpx.Client(verify=ssl.create_default_context(cafile=str(sim.ca_file))) as c:
        resp = c.get(url)
        resp.raise_for_status()
        return resp.content


@pytest.mark.parametrize("endpoint", sorted(INPUTS))
def test_submit_events_get_status_handles_cancel(
    sim: SimulatorHandle, fal: fal_client.SyncClient, endpoint: str
) -> None:
    handle = fal.submit(endpoint, INPUTS[endpoint])
    assert handle.request_id

    events = list(handle.iter_events(with_logs=True, interval=0.02))
    *pending, last = events
    assert isinstance(last, fal_client.Completed)
    assert pending  # the 0.1 s runner is observed in progress at least once
    assert all(isinstance(e, (fal_client.Queued, fal_client.InProgress)) for e in pending)
    assert any(isinstance(e, fal_client.InProgress) and e.logs for e in pending)
    assert last.logs
    assert last.error is None
    assert last.metrics["inference_time"] > 0

    result = handle.get(interval=0.02)
    assert result["video"]["content_type"] == "video/mp4"
    assert isinstance(result["seed"], int)
    assert len(_download(sim, result["video"]["url"])) == result["video"]["file_size"]

    status = handle.status()
    assert isinstance(status, fal_client.Completed)
    assert status.logs is None  # logs key present but null when not requested

    # Re-created from the id: fal_client derives owner/alias URLs itself — they must be ours.
    assert fal.get_handle(endpoint, handle.request_id) == handle
    again = fal.status(endpoint, handle.request_id, with_logs=True)
    assert isinstance(again, fal_client.Completed)
    assert again.logs
    assert fal.result(endpoint, handle.request_id) == result

    with pytest.raises(FalClientHTTPError) as err:
        handle.cancel()
    assert err.value.status_code == 400  # ALREADY_COMPLETED


def test_cancel_while_queued(sim: SimulatorHandle, fal: fal_client.SyncClient) -> None:
    sim.update_options(concurrency_limit=0)
    handle = fal.submit("fal-ai/wan-22", INPUTS["fal-ai/wan-22"])
    queued = handle.status()
    assert isinstance(queued, fal_client.Queued)
    assert queued.position == 0
    assert handle.cancel() is None  # type: ignore[func-returns-value]  # typed None; it must not raise
    done = fal.status("fal-ai/wan-22", handle.request_id)
    assert isinstance(done, fal_client.Completed)
    assert done.error_type == "client_cancelled"
    with pytest.raises(FalClientHTTPError) as err:
        handle.get(interval=0.02)
    assert err.value.status_code == 499
    assert err.value.error_type == "client_cancelled"
    with pytest.raises(FalClientHTTPError) as unknown:
        fal.cancel("fal-ai/wan-22", "00000000-0000-4000-8000-000000000000")
    assert unknown.value.status_code == 404


def _position(handle: fal_client.SyncRequestHandle) -> int:
    status = handle.status()
    assert isinstance(status, fal_client.Queued)
    return status.position


def test_queued_position_is_reported(sim: SimulatorHandle, fal: fal_client.SyncClient) -> None:
    sim.update_options(concurrency_limit=0)
    handles = [fal.submit("fal-ai/wan-22", {**INPUTS["fal-ai/wan-22"], "seed": i}) for i in range(3)]
    assert [_position(h) for h in handles] == [0, 1, 2]
    sim.update_options(concurrency_limit=4)
    assert all(h.get(interval=0.02)["seed"] == i for i, h in enumerate(handles))


def test_validation_error_is_a_422_at_result(fal: fal_client.SyncClient) -> None:
    bad = {**INPUTS["fal-ai/wan-i2v"], "num_frames": 500}
    handle = fal.submit("fal-ai/wan-i2v", bad)
    final = list(handle.iter_events(interval=0.02))[-1]
    assert isinstance(final, fal_client.Completed)  # never FAILED
    with pytest.raises(FalClientHTTPError) as err:
        handle.get(interval=0.02)
    assert err.value.status_code == 422
    detail: object = err.value.message  # typed str by fal_client; FastAPI-style details are a list
    assert isinstance(detail, list)
    assert detail[0]["loc"] == ["body", "num_frames"]


def test_model_error_surfaces_error_type(sim: SimulatorHandle, fal: fal_client.SyncClient) -> None:
    sim.set_faults(model_error={"next": 1, "error_type": "runner_disconnected"})
    handle = fal.submit("fal-ai/wan-22", INPUTS["fal-ai/wan-22"])
    final = list(handle.iter_events(interval=0.02))[-1]
    assert isinstance(final, fal_client.Completed)
    assert final.error_type == "runner_disconnected"
    with pytest.raises(FalClientHTTPError) as err:
        handle.get(interval=0.02)
    assert err.value.status_code == 503  # has x-fal-request-id: fal_client does not retry it
    assert err.value.error_type == "runner_disconnected"


def test_client_retries_nginx_502_but_not_a_dropped_accept(
    sim: SimulatorHandle, fal: fal_client.SyncClient
) -> None:
    sim.set_faults(submit_502={"next": 1})
    fal.submit("fal-ai/wan-22", {**INPUTS["fal-ai/wan-22"], "seed": 1}).get(interval=0.02)
    ledger = sim.ledger()
    assert ledger["accepted"] == 1
    assert [r["status_code"] for r in ledger["rejections"]] == [502]

    # fal_client also retries its non-idempotent submit POST on a transport error: when the
    # first POST had been accepted, fal now runs (and bills) the same input twice.
    sim.set_faults(submit_drop={"next": 1})
    fal.submit("fal-ai/wan-22", {**INPUTS["fal-ai/wan-22"], "seed": 2})
    ledger = sim.ledger()
    assert ledger["accepted"] == 3
    assert len(ledger["duplicates"]) == 1
    assert len(ledger["duplicates"][0]["request_ids"]) == 2


def test_upload_then_use_as_input(sim: SimulatorHandle, fal: fal_client.SyncClient) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (500, 500), (200, 30, 30)).save(buf, "PNG")
    url = fal.upload(buf.getvalue(), "image/png", file_name="square.png")
    assert url.startswith(sim.url)
    assert _download(sim, url) == buf.getvalue()
    result = fal.subscribe(
        "fal-ai/wan-25-preview/image-to-video",
        {"prompt": "a red square", "image_url": url, "resolution": "480p", "seed": 9},
        interval=0.02,
    )
    assert result["video"]["width"] == result["video"]["height"] == 480  # follows the square image
    # the same input and seed through fal's client give byte-identical files
    again = fal.subscribe(
        "fal-ai/wan-25-preview/image-to-video",
        {"prompt": "a red square", "image_url": url, "resolution": "480p", "seed": 9},
        interval=0.02,
    )
    digest = [hashlib.sha256(_download(sim, r["video"]["url"])).hexdigest() for r in (result, again)]
    assert digest[0] == digest[1]


def test_async_client(sim: SimulatorHandle, fal: fal_client.SyncClient) -> None:
    async def run() -> dict[str, Any]:
        client = fal_client.AsyncClient(key=KEY)
        handle = await client.submit("wan/v2.6/image-to-video", INPUTS["wan/v2.6/image-to-video"])
        status = await handle.status(with_logs=True)
        assert isinstance(status, (fal_client.Queued, fal_client.InProgress))
        return await handle.get(interval=0.02)

    result = asyncio.run(run())
    assert result["video"]["height"] == 720


_SCRIPT = """
import json, sys, fal_client
endpoint, payload = sys.argv[1], json.loads(sys.argv[2])
handle = fal_client.submit(endpoint, payload)
result = fal_client.result(endpoint, handle.request_id)
status = fal_client.status(endpoint, handle.request_id, with_logs=True)
print(json.dumps({"rid": handle.request_id, "status_url": handle.status_url, "result": result,
                  "completed": type(status).__name__, "logs": len(status.logs or [])}))
"""


def test_env_var_route_in_a_fresh_interpreter(sim: SimulatorHandle) -> None:
    """The documented way: FAL_QUEUE_RUN_HOST and FAL_KEY set before fal_client is imported."""
    host = sim.url.removeprefix("https://")
    env = {
        **os.environ,
        "FAL_QUEUE_RUN_HOST": host,
        "FAL_KEY": KEY,
        "SSL_CERT_FILE": str(sim.ca_file),
    }
    endpoint = "fal-ai/wan-25-preview/image-to-video"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, endpoint, json.dumps(INPUTS[endpoint])],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status_url"] == f"https://{host}/fal-ai/wan-25-preview/requests/{out['rid']}/status"
    assert out["completed"] == "Completed"
    assert out["logs"] > 0
    assert out["result"]["video"]["content_type"] == "video/mp4"
    assert time.monotonic() - started < 30
