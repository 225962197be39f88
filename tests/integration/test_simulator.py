"""The fal simulator over real sockets: protocol shapes, lifecycle, media, storage, ledger."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import time
from collections.abc import Callable, Iterator
from typing import Any

import av
import httpx
import pytest

from falsim import SimulatorHandle, SimulatorOptions, running_simulator
from falsim.engine import COMPLETED, IN_PROGRESS, Engine
from jobs.endpoints import get_endpoint
from tests.integration.sim_helpers import AUTH, png_data_uri, wait_completed, wait_in_progress
from tests.sample_inputs import INPUTS

FAST = {"latency_seconds": 0.05, "latency_jitter": 0.0, "concurrency_limit": 4, "rng_seed": 7}


@pytest.fixture
def make_sim() -> Iterator[Callable[..., SimulatorHandle]]:
    """Start simulators with FAST options (overridable); all are stopped after the test."""
    with contextlib.ExitStack() as stack:

        def make(**overrides: Any) -> SimulatorHandle:
            return stack.enter_context(running_simulator(SimulatorOptions(**{**FAST, **overrides})))

        yield make


@pytest.fixture
def sim(make_sim: Callable[..., SimulatorHandle]) -> SimulatorHandle:
    return make_sim()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(headers=AUTH, timeout=10) as c:
        yield c


def submit(
    client: httpx.Client, sim: SimulatorHandle, endpoint: str, payload: object, **kw: Any
) -> dict[str, Any]:
    resp = client.post(f"{sim.url}/{endpoint}", json=payload, **kw)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


@pytest.mark.parametrize("endpoint", sorted(INPUTS))
def test_full_lifecycle_per_endpoint(sim: SimulatorHandle, client: httpx.Client, endpoint: str) -> None:
    sub = submit(client, sim, endpoint, INPUTS[endpoint])
    base = f"{sim.url}/{get_endpoint(endpoint).app_base}/requests/{sub['request_id']}"
    # URLs are absolute, on the simulator, and drop the endpoint's sub-path.
    assert sub["response_url"] == base
    assert sub["status_url"] == base + "/status"
    assert sub["cancel_url"] == base + "/cancel"
    assert sub["status"] == "IN_QUEUE"
    assert sub["queue_position"] == 0
    assert sub["gateway_request_id"]

    early = client.get(sub["response_url"])
    assert early.status_code == 400
    assert early.json() == {"detail": "Request is still in progress"}

    done = wait_completed(client, sub["status_url"])
    assert isinstance(done["logs"], list)
    assert {"message", "level", "source", "timestamp"} <= set(done["logs"][0])
    assert done["metrics"]["inference_time"] >= 0.04
    assert "error" not in done
    quiet = client.get(sub["status_url"] + "/", params={"logs": "false"})
    assert quiet.status_code == 200
    assert quiet.json()["logs"] is None

    result = client.get(sub["response_url"] + "/")
    assert result.status_code == 200
    assert result.headers["x-fal-request-id"] == sub["request_id"]
    out = result.json()
    video = out["video"]
    assert video["content_type"] == "video/mp4"
    assert isinstance(out["seed"], int)
    data = httpx.get(video["url"]).content
    assert len(data) == video["file_size"]
    head = httpx.head(video["url"])
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == video["file_size"]
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        width, height, fps = stream.width, stream.height, stream.average_rate
    expected_h = 720 if INPUTS[endpoint]["resolution"] == "720p" else 480
    assert height == expected_h
    assert width == {480: 854, 720: 1280}[expected_h]
    if "duration" in get_endpoint(endpoint).defaults():
        assert (video["width"], video["height"], video["num_frames"]) == (width, height, frames)
        assert frames == 5 * 24
        assert fps == 24
    else:
        assert frames == 81
        assert fps == 16


def test_status_shapes_queue_positions_and_logs(
    make_sim: Callable[..., SimulatorHandle], client: httpx.Client
) -> None:
    # The first runs 2 s: long enough for the looks below, taken once it is seen running (a
    # guessed 0.1 s found it still queued, or already completed, on a loaded machine).
    sim = make_sim(concurrency_limit=1, latency_seconds=2.0)
    subs = [submit(client, sim, "fal-ai/wan-22", {**INPUTS["fal-ai/wan-22"], "seed": i}) for i in range(3)]
    wait_in_progress(client, subs[0]["status_url"])
    first = client.get(subs[0]["status_url"], params={"logs": "0"})
    assert first.status_code == 202
    assert first.json()["status"] == "IN_PROGRESS"
    assert "logs" in first.json()
    assert first.json()["logs"] is None
    with_logs = client.get(subs[0]["status_url"], params={"logs": "true"}).json()
    assert isinstance(with_logs["logs"], list)
    assert with_logs["logs"]
    third = client.get(subs[2]["status_url"])
    assert third.status_code == 202
    body = third.json()
    assert body["status"] == "IN_QUEUE"
    assert body["queue_position"] == 1
    assert body["request_id"] == subs[2]["request_id"]
    assert body["response_url"] == subs[2]["response_url"]
    for s in subs:
        wait_completed(client, s["status_url"])
    assert sim.ledger()["max_in_progress"] == 1


def test_auth_locked_and_unknown(make_sim: Callable[..., SimulatorHandle]) -> None:
    sim = make_sim(locked_keys=("broke",))
    url = f"{sim.url}/fal-ai/wan-22"
    assert httpx.post(url, json=INPUTS["fal-ai/wan-22"]).status_code == 401
    assert httpx.post(url, json={}, headers={"Authorization": "Basic abc"}).status_code == 401
    locked = httpx.post(url, json={}, headers={"Authorization": "Key broke"})
    assert locked.status_code == 403
    assert locked.json() == {"detail": "User is locked. Reason: Exhausted balance. Add funds to continue."}
    assert httpx.post(f"{sim.url}/fal-ai/no-such-model", json={}, headers=AUTH).status_code == 404
    unknown = httpx.get(f"{sim.url}/fal-ai/wan-22/requests/nope/status", headers=AUTH)
    assert unknown.status_code == 404
    # status/result of a real request under the wrong app is unknown too
    sub = httpx.post(url, json=INPUTS["fal-ai/wan-22"], headers=AUTH).json()
    assert (
        httpx.get(f"{sim.url}/fal-ai/wan-i2v/requests/{sub['request_id']}", headers=AUTH).status_code == 404
    )
    assert sim.ledger()["accepted"] == 1


def test_invalid_input_is_accepted_then_422_at_result(sim: SimulatorHandle, client: httpx.Client) -> None:
    bad = {"image_url": "https://example.com/x.png", "num_frames": 500, "resolution": "1080p"}
    sub = submit(client, sim, "fal-ai/wan-i2v", bad)
    done = wait_completed(client, sub["status_url"])
    assert done["status"] == "COMPLETED"  # never FAILED
    result = client.get(sub["response_url"])
    assert result.status_code == 422
    detail = result.json()["detail"]
    locs = {tuple(d["loc"]): d for d in detail}
    assert locs[("body", "prompt")]["type"] == "missing"
    assert locs[("body", "num_frames")]["type"] == "less_than_equal"
    assert locs[("body", "num_frames")]["msg"] == "Input should be less than or equal to 100"
    assert locs[("body", "resolution")]["msg"] == "Input should be '480p' or '720p'"
    entry = sim.ledger()["entries"][0]
    assert entry["outcome"] == "invalid"
    assert entry["status_code"] == 422
    assert entry["billed"] is True  # bill_validation_errors defaults to fal's "may be charged"


def test_unknown_fields_ignored_or_forbidden(
    make_sim: Callable[..., SimulatorHandle], client: httpx.Client
) -> None:
    payload = {**INPUTS["fal-ai/wan-22"], "bogus": 1}
    ignoring = make_sim()
    sub = submit(client, ignoring, "fal-ai/wan-22", payload)
    wait_completed(client, sub["status_url"])
    assert client.get(sub["response_url"]).status_code == 200
    forbidding = make_sim(extra_fields="forbid")
    sub = submit(client, forbidding, "fal-ai/wan-22", payload)
    wait_completed(client, sub["status_url"])
    result = client.get(sub["response_url"])
    assert result.status_code == 422
    assert result.json()["detail"][0]["type"] == "extra_forbidden"


def test_determinism_and_seed_echo(sim: SimulatorHandle, client: httpx.Client) -> None:
    def run(payload: dict[str, Any]) -> tuple[int, str]:
        sub = submit(client, sim, "fal-ai/wan-i2v", payload)
        wait_completed(client, sub["status_url"])
        out = client.get(sub["response_url"]).json()
        return out["seed"], hashlib.sha256(httpx.get(out["video"]["url"]).content).hexdigest()

    base = INPUTS["fal-ai/wan-i2v"]
    seed_a, sha_a = run({**base, "seed": 1234})
    seed_b, sha_b = run({**base, "seed": 1234})
    seed_c, sha_c = run({**base, "seed": 1235})
    assert (seed_a, seed_b, seed_c) == (1234, 1234, 1235)
    assert sha_a == sha_b
    assert sha_c != sha_a
    seed_x, sha_x = run(base)
    seed_y, sha_y = run(base)
    assert seed_x != seed_y  # a random seed is chosen and echoed
    assert sha_x != sha_y
    # replaying the echoed seed reproduces the same bytes
    assert run({**base, "seed": seed_x})[1] == sha_x
    ledger = sim.ledger()
    assert len(ledger["duplicates"]) == 2  # {seed 1234} ×2 and the seedless input ×2
    assert all(e["encode_seconds"] is not None for e in ledger["entries"])  # rendering is timed


def _png(width: int, height: int) -> bytes:
    return base64.b64decode(png_data_uri(width, height).split(",", 1)[1])


def _upload(client: httpx.Client, sim: SimulatorHandle, data: bytes, name: str) -> dict[str, Any]:
    """fal's two-step upload of a PNG: the ``initiate`` answer (``upload_url``, ``file_url``)."""
    init: dict[str, Any] = client.post(
        f"{sim.url}/storage/upload/initiate",
        params={"storage_type": "gcs"},
        json={"file_name": name, "content_type": "image/png"},
    ).json()
    put = httpx.put(init["upload_url"], content=data, headers={"content-type": "image/png"})
    assert put.status_code == 200
    return init


def _video_sha256(client: httpx.Client, sim: SimulatorHandle, payload: dict[str, Any]) -> str:
    sub = submit(client, sim, "fal-ai/wan-i2v", payload)
    wait_completed(client, sub["status_url"])
    result = client.get(sub["response_url"])
    assert result.status_code == 200, result.text
    return hashlib.sha256(httpx.get(result.json()["video"]["url"]).content).hexdigest()


def test_aspect_ratio_follows_uploaded_image(sim: SimulatorHandle, client: httpx.Client) -> None:
    png = _png(400, 700)
    init = _upload(client, sim, png, "tall.png")
    got = httpx.get(init["file_url"])
    assert got.content == png
    assert got.headers["content-type"] == "image/png"
    sub = submit(client, sim, "fal-ai/wan-i2v", {**INPUTS["fal-ai/wan-i2v"], "image_url": init["file_url"]})
    wait_completed(client, sub["status_url"])
    video = httpx.get(client.get(sub["response_url"]).json()["video"]["url"]).content
    with av.open(io.BytesIO(video)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (480, 854)
    # a simulator URL that names no stored file is a download error at the model
    missing = init["file_url"].replace(init["file_url"].split("/")[-2], "0" * 32)
    sub = submit(client, sim, "fal-ai/wan-i2v", {**INPUTS["fal-ai/wan-i2v"], "image_url": missing})
    wait_completed(client, sub["status_url"])
    result = client.get(sub["response_url"])
    assert result.status_code == 422
    assert result.json()["detail"][0]["type"] == "file_download_error"
    # data URIs are accepted
    sub = submit(client, sim, "fal-ai/wan-i2v", {**INPUTS["fal-ai/wan-i2v"], "image_url": png_data_uri()})
    wait_completed(client, sub["status_url"])
    assert client.get(sub["response_url"]).status_code == 200


def test_an_image_counts_by_its_content_not_its_url(
    make_sim: Callable[..., SimulatorHandle], client: httpx.Client
) -> None:
    """The model works on the bytes it downloads: the same image uploaded again (another URL,
    as each ``--simulate`` run uploads it to a simulator of its own) or sent inline gives the
    same video for the same seed; other bytes give another."""
    first, second = make_sim(), make_sim()
    png, other = _png(400, 400), _png(410, 410)
    base = {**INPUTS["fal-ai/wan-i2v"], "seed": 7}
    urls = [
        _upload(client, first, png, "a.png")["file_url"],
        _upload(client, second, png, "a.png")["file_url"],
        _upload(client, second, png, "b.png")["file_url"],
    ]
    assert len(set(urls)) == 3
    same = {
        _video_sha256(client, sim, {**base, "image_url": url})
        for sim, url in zip((first, second, second), urls, strict=True)
    }
    same.add(_video_sha256(client, first, {**base, "image_url": png_data_uri(400, 400)}))
    assert len(same) == 1
    (sha,) = same
    other_url = _upload(client, second, other, "a.png")["file_url"]
    assert _video_sha256(client, second, {**base, "image_url": other_url}) != sha
    assert _video_sha256(client, second, {**base, "image_url": urls[2], "seed": 8}) != sha


def test_cdn_v3_upload_flow(sim: SimulatorHandle, client: httpx.Client) -> None:
    token = client.post(
        f"{sim.url}/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={}
    ).json()
    assert {"token", "token_type", "base_url", "expires_at"} <= set(token)
    up = httpx.post(
        f"{sim.url}/files/upload",
        content=b"hello",
        headers={
            "Authorization": f"{token['token_type']} {token['token']}",
            "Content-Type": "text/plain",
            "X-Fal-File-Name": "hi.txt",
        },
    )
    assert up.status_code == 200
    assert httpx.get(up.json()["access_url"]).content == b"hello"


def test_cancel_semantics(make_sim: Callable[..., SimulatorHandle], client: httpx.Client) -> None:
    # The one slot held for a minute (the running one is cancelled below): the other stays queued.
    sim = make_sim(concurrency_limit=1, latency_seconds=60.0)
    running = submit(client, sim, "fal-ai/wan-22", {**INPUTS["fal-ai/wan-22"], "seed": 1})
    queued = submit(client, sim, "fal-ai/wan-22", {**INPUTS["fal-ai/wan-22"], "seed": 2})
    wait_in_progress(client, running["status_url"])
    cancel = client.put(queued["cancel_url"])
    assert cancel.status_code == 202
    assert cancel.json() == {"status": "CANCELLATION_REQUESTED"}
    status = client.get(queued["status_url"])
    assert status.status_code == 200
    assert status.json()["error_type"] == "client_cancelled"
    result = client.get(queued["response_url"])
    assert result.status_code == 499
    assert result.json()["error_type"] == "client_cancelled"
    assert client.put(running["cancel_url"]).status_code == 202
    done = wait_completed(client, running["status_url"])
    assert done["error_type"] == "client_cancelled"
    again = client.put(running["cancel_url"])
    assert again.status_code == 400
    assert again.json() == {"status": "ALREADY_COMPLETED"}
    unknown = client.put(f"{sim.url}/fal-ai/wan-22/requests/nope/cancel")
    assert unknown.status_code == 404
    assert unknown.json() == {"status": "NOT_FOUND"}
    entries = {e["request_id"]: e for e in sim.ledger()["entries"]}
    assert entries[queued["request_id"]]["billed"] is False  # never ran
    assert entries[queued["request_id"]]["started_at"] is None
    assert entries[running["request_id"]]["billed"] is True  # the runner had started


def test_cancel_in_progress_can_be_ignored(
    make_sim: Callable[..., SimulatorHandle], client: httpx.Client
) -> None:
    # Cancelled once seen running, with 2 s of its run left (a guessed 0.05 s of 0.2 s found it
    # queued, or completed, on a loaded machine).
    sim = make_sim(cancel_stops_running=False, latency_seconds=2.0)
    sub = submit(client, sim, "fal-ai/wan-22", INPUTS["fal-ai/wan-22"])
    wait_in_progress(client, sub["status_url"])
    assert client.put(sub["cancel_url"]).status_code == 202
    done = wait_completed(client, sub["status_url"])
    assert "error" not in done
    assert client.get(sub["response_url"]).status_code == 200


def test_sse_stream(make_sim: Callable[..., SimulatorHandle], client: httpx.Client) -> None:
    sim = make_sim(concurrency_limit=1, latency_seconds=0.4, sse_keepalive_seconds=0.1)
    submit(client, sim, "fal-ai/wan-22", {**INPUTS["fal-ai/wan-22"], "seed": 1})
    sub = submit(client, sim, "fal-ai/wan-22", {**INPUTS["fal-ai/wan-22"], "seed": 2})
    import json

    events: list[dict[str, Any]] = []
    comments = 0
    with client.stream("GET", sub["status_url"] + "/stream", params={"logs": 1}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
            elif line.startswith(":"):
                comments += 1
    statuses = [e["status"] for e in events]
    assert statuses[0] == "IN_QUEUE"
    assert "IN_PROGRESS" in statuses
    assert statuses[-1] == "COMPLETED"
    assert comments >= 1  # keep-alives while nothing changed
    all_logs = [line for e in events if e.get("logs") for line in e["logs"]]
    messages = [x["message"] for x in all_logs]
    assert len(messages) == len(set(messages))  # each event carries only new lines


def test_start_timeout_while_queued(make_sim: Callable[..., SimulatorHandle], client: httpx.Client) -> None:
    sim = make_sim(concurrency_limit=1, latency_seconds=1.0)
    submit(client, sim, "fal-ai/wan-22", {**INPUTS["fal-ai/wan-22"], "seed": 1})
    sub = submit(
        client,
        sim,
        "fal-ai/wan-22",
        {**INPUTS["fal-ai/wan-22"], "seed": 2},
        headers={"X-Fal-Request-Start-Timeout": "0.2"},
    )
    done = wait_completed(client, sub["status_url"], timeout=3)
    assert done["error_type"] == "request_timeout"
    result = client.get(sub["response_url"])
    assert result.status_code == 504
    assert result.headers["x-fal-request-timeout-type"] == "user"
    bad = client.post(f"{sim.url}/fal-ai/wan-22", json={}, headers={"X-Fal-Request-Timeout": "0.05"})
    assert bad.status_code == 400


def test_a_request_past_its_start_timeout_is_never_started_even_before_its_timer_fires() -> None:
    """The engine alone, no server: a busy loop delays the start-deadline timer, and a slot
    freed meanwhile must not go to a request whose start timeout has passed — fal times it out
    (never started, not billed) and gives the slot to the next one."""

    async def scenario() -> None:
        engine = Engine(SimulatorOptions(concurrency_limit=0, latency_seconds=60.0, rng_seed=7))
        engine.start("http://sim.invalid")
        try:
            spec = get_endpoint("fal-ai/wan-22")
            overdue = engine.submit(spec, {**INPUTS["fal-ai/wan-22"], "seed": 1}, start_timeout=0.2)
            patient = engine.submit(spec, {**INPUTS["fal-ai/wan-22"], "seed": 2}, start_timeout=600)
            untimed = engine.submit(spec, {**INPUTS["fal-ai/wan-22"], "seed": 3})
            await asyncio.sleep(0)  # the submits' own dispatch: no slot yet
            time.sleep(0.3)  # the loop is busy past the start timeout: its timer cannot fire
            engine.update_options({"concurrency_limit": 1})  # a slot frees before the timer runs

            assert overdue.state == COMPLETED
            assert overdue.started is None
            assert overdue.outcome is not None
            assert overdue.outcome.error_type == "request_timeout"
            assert engine.result(overdue)[0] == 504
            assert patient.state == IN_PROGRESS  # the slot went to the next one
            assert untimed.state not in (IN_PROGRESS, COMPLETED)  # one slot: it waits
            entries = {e["request_id"]: e for e in engine.ledger.snapshot()["entries"]}
            timed_out = entries[overdue.request_id]
            assert timed_out["started_at"] is None
            assert timed_out["outcome"] == "timeout"
            assert not timed_out["billed"]
            await asyncio.sleep(0.3)  # the late timer fires now: it finds the request ended
            assert engine.ledger.snapshot()["completed"] == 1
        finally:
            await engine.stop()

    asyncio.run(scenario())


def _until_gone(get: Callable[[], httpx.Response], timeout: float = 60.0) -> httpx.Response:
    """Ask until the answer is a 404 (a generous cap): an expiry is waited for, never slept
    through by a guess that a loaded machine can outlast."""
    deadline = time.monotonic() + timeout
    while True:
        resp = get()
        if resp.status_code == 404:
            return resp
        assert resp.status_code == 200, resp.text
        assert time.monotonic() < deadline, f"still there after {timeout:.0f}s"
        time.sleep(0.05)


def test_result_retention(make_sim: Callable[..., SimulatorHandle], client: httpx.Client) -> None:
    # Retention long enough that no load can outlast it: fetched after completion, it is there.
    sim = make_sim(large_result_ttl_seconds=0.1)  # the 1 h default for a small result
    long = submit(client, sim, "fal-ai/wan-22", INPUTS["fal-ai/wan-22"], headers={"X-Fal-Store-IO": "0"})
    wait_completed(client, long["status_url"])
    assert client.get(long["response_url"]).status_code == 200
    # A short retention, for the requests completed from now on: the result without payload
    # storage expires (waited for), the one with it is kept (for the storage period), and the
    # earlier result keeps the retention it completed with.
    assert client.post(f"{sim.url}/_sim/options", json={"result_ttl_seconds": 0.3}).status_code == 200
    kept = submit(client, sim, "fal-ai/wan-22", INPUTS["fal-ai/wan-22"])  # payload storage on: kept
    short = submit(client, sim, "fal-ai/wan-22", INPUTS["fal-ai/wan-22"], headers={"X-Fal-Store-IO": "0"})
    wait_completed(client, kept["status_url"])
    wait_completed(client, short["status_url"])
    gone = _until_gone(lambda: client.get(short["response_url"]))
    assert "expired" in gone.json()["detail"]
    assert client.get(kept["response_url"]).status_code == 200
    assert client.get(long["response_url"]).status_code == 200
    assert client.get(short["status_url"]).json()["status"] == "COMPLETED"


def test_output_lifecycle_expires_media(sim: SimulatorHandle, client: httpx.Client) -> None:
    def media(seconds: float) -> str:
        sub = submit(
            client,
            sim,
            "fal-ai/wan-22",
            INPUTS["fal-ai/wan-22"],
            headers={"X-Fal-Object-Lifecycle-Preference": f'{{"expiration_duration_seconds": {seconds}}}'},
        )
        wait_completed(client, sub["status_url"])
        return str(client.get(sub["response_url"]).json()["video"]["url"])

    # An hour: no load outlasts it, so the file is served when fetched. A fifth of a second:
    # the file goes (waited for, not slept through), while the other is still served.
    kept = media(3600.0)
    assert httpx.get(kept).status_code == 200
    short = media(0.2)
    _until_gone(lambda: httpx.get(short))
    assert httpx.get(kept).status_code == 200


def test_concurrency_limit_priority_and_ledger(
    make_sim: Callable[..., SimulatorHandle], client: httpx.Client
) -> None:
    sim = make_sim(concurrency_limit=0, latency_seconds=0.1)  # nothing runs until the limit is raised
    subs = [submit(client, sim, "fal-ai/wan-22", {**INPUTS["fal-ai/wan-22"], "seed": i}) for i in range(5)]
    low = submit(
        client,
        sim,
        "fal-ai/wan-22",
        {**INPUTS["fal-ai/wan-22"], "seed": 99},
        headers={"X-Fal-Queue-Priority": "low"},
    )
    late = submit(client, sim, "fal-ai/wan-22", {**INPUTS["fal-ai/wan-22"], "seed": 100})
    assert client.get(late["status_url"]).json()["queue_position"] == 5  # normal priority jumps the low one
    assert client.get(low["status_url"]).json()["queue_position"] == 6
    sim.update_options(concurrency_limit=2)
    for s in [*subs, low, late]:
        wait_completed(client, s["status_url"])
    ledger = sim.ledger()
    assert ledger["max_in_progress"] == 2
    assert ledger["max_outstanding"] == 7
    assert ledger["outstanding"] == 0
    assert ledger["accepted"] == ledger["completed"] == ledger["billed_count"] == 7
    # fal-ai/wan-22 at 480p, 81 frames: 81/16 s × $0.04 (the registry's assumed price)
    assert ledger["entries"][0]["billing_units"] == "5.0625"
    assert sum(ledger["submits_per_second"].values()) == 7
    assert ledger["max_submits_per_second"] >= 1
    by_id = {e["request_id"]: e for e in ledger["entries"]}
    late_start, low_start = by_id[late["request_id"]]["started_at"], by_id[low["request_id"]]["started_at"]
    assert late_start is not None
    assert low_start is not None
    assert late_start <= low_start


def test_control_api_over_http(sim: SimulatorHandle, client: httpx.Client) -> None:
    r = httpx.post(f"{sim.url}/_sim/faults", json={"submit_429": {"next": 1}})
    assert r.status_code == 200
    assert r.json()["rules"]["submit_429"]["next"] == 1
    assert httpx.post(f"{sim.url}/_sim/faults", json={"nope": {}}).status_code == 400
    assert client.post(f"{sim.url}/fal-ai/wan-22", json=INPUTS["fal-ai/wan-22"]).status_code == 429
    submit(client, sim, "fal-ai/wan-22", INPUTS["fal-ai/wan-22"])
    ledger = httpx.get(f"{sim.url}/_sim/ledger").json()
    assert ledger["accepted"] == 1
    assert ledger["rejections"][0]["status_code"] == 429
    opts = httpx.post(f"{sim.url}/_sim/options", json={"concurrency_limit": 40}).json()
    assert opts["concurrency_limit"] == 40
    assert httpx.post(f"{sim.url}/_sim/options", json={"bogus": 1}).status_code == 400
    assert httpx.post(f"{sim.url}/_sim/reset").status_code == 200
    assert httpx.get(f"{sim.url}/_sim/ledger").json()["accepted"] == 0


@pytest.mark.slow
def test_two_hundred_jobs_complete(make_sim: Callable[..., SimulatorHandle]) -> None:
    sim = make_sim(concurrency_limit=40, latency_seconds=0.05, latency_jitter=0.5)
    endpoints = sorted(INPUTS)
    with httpx.Client(headers=AUTH, timeout=10) as c:
        subs = [submit(c, sim, endpoints[i % 5], INPUTS[endpoints[i % 5]]) for i in range(200)]
        for s in subs:
            wait_completed(c, s["status_url"], timeout=60)
        assert all(c.get(s["response_url"]).status_code == 200 for s in subs)
    ledger = sim.ledger()
    assert ledger["completed"] == 200
    assert ledger["max_in_progress"] <= 40


def test_module_entry_point_serves_until_terminated() -> None:
    """``wanbatch simulator`` serves real requests until terminated."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from cli import main; main()",
            "simulator",
            "--port",
            "0",
            "--latency",
            "0.05",
            "--fault",
            "submit_429=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("fal simulator listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1].strip()
        with httpx.Client(headers=AUTH, timeout=10) as c:
            # Options the command has no flag for are set at runtime, through the control API.
            changes = {"locked_keys": ["broke", "empty"], "cancel_stops_running": False}
            c.post(f"{url}/_sim/options", json=changes).raise_for_status()
            assert c.post(f"{url}/fal-ai/wan-22", json=INPUTS["fal-ai/wan-22"]).status_code == 429
            sub = c.post(f"{url}/fal-ai/wan-22", json=INPUTS["fal-ai/wan-22"]).json()
            wait_completed(c, sub["status_url"])
            locked = c.post(f"{url}/fal-ai/wan-22", json={}, headers={"Authorization": "Key empty"})
            assert locked.status_code == 403
            opts = c.get(f"{url}/_sim/options").json()
        assert opts["cancel_stops_running"] is False
        assert opts["locked_keys"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown


def test_bad_cli_faults_are_refused() -> None:
    from click.testing import CliRunner

    from cli import cli

    assert CliRunner().invoke(cli, ["simulator", "--fault", "no_such_fault=1"]).exit_code == 2


def test_a_client_gone_while_its_body_is_read_is_no_traceback(sim: SimulatorHandle) -> None:
    """A client under load gives up after sending a submit's headers: the simulator used to log
    ``Exception in ASGI application`` and a ``ClientDisconnect`` traceback; now a debug line."""
    import logging
    import socket
    from urllib.parse import urlsplit

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    seen = Records()
    # uvicorn's loggers do not propagate to the root (its logging config): listen on them.
    loggers = [logging.getLogger(name) for name in ("falsim", "uvicorn.error", "uvicorn")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(seen)
    loggers[0].setLevel(logging.DEBUG)
    try:
        url = urlsplit(sim.url)
        assert url.hostname is not None
        assert url.port is not None
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            sock.sendall(
                b"POST /fal-ai/wan-22 HTTP/1.1\r\nHost: sim\r\nAuthorization: Key k\r\n"
                b'Content-Type: application/json\r\nContent-Length: 4096\r\n\r\n{"prompt"'
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(
            "went away" in r.getMessage() or r.levelno >= logging.ERROR for r in seen.records
        ):
            time.sleep(0.05)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(seen)
            logger.setLevel(level)
    errors = [r for r in seen.records if r.levelno >= logging.WARNING or r.exc_info]
    assert errors == [], [(r.getMessage(), r.exc_info) for r in errors]
    assert any("went away" in r.getMessage() for r in seen.records)
