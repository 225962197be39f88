"""The hostile test server misbehaves exactly as advertised (other tests rely on it)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.hostile import (
    HostileProvider,
    drip,
    endless,
    json_reply,
    nested_json,
    raw_reply,
    redirect,
    reset,
    sequence,
)


def test_routes_record_and_count(hostile: HostileProvider) -> None:
    hostile.route("POST", r"/fal-ai/wan/.*", json_reply({"request_id": "r1"}, status=200))
    hostile.route("POST", r"/fal-ai/wan/special", json_reply({"which": "later route wins"}, status=201))
    with httpx.Client(base_url=hostile.url) as http:
        first = http.post("/fal-ai/wan/i2v?fal_webhook=x", json={"prompt": "p"})
        later = http.post("/fal-ai/wan/special")
        missing = http.get("/nothing")
    assert first.json() == {"request_id": "r1"}
    assert later.status_code == 201
    assert later.json() == {"which": "later route wins"}
    assert missing.status_code == 404
    assert hostile.count("POST", r"/fal-ai/wan/.*") == 2
    assert hostile.count("GET", r"/fal-ai/.*") == 0
    recorded = hostile.requests[0]
    assert recorded.query == "fal_webhook=x"
    assert json.loads(recorded.body) == {"prompt": "p"}
    assert recorded.headers["content-type"] == "application/json"


def test_sequence_reset_and_lies(hostile: HostileProvider) -> None:
    hostile.route(
        "GET",
        r"/r",
        sequence(reset(), raw_reply(b"<html>bad gateway</html>", 502), json_reply({"ok": True})),
    )
    hostile.route("GET", r"/short", raw_reply(b"abc", content_length=10))
    with httpx.Client(base_url=hostile.url, timeout=5) as http:
        with pytest.raises(httpx.TransportError):
            http.get("/r")
        assert http.get("/r").status_code == 502
        assert http.get("/r").json() == {"ok": True}
        assert http.get("/r").json() == {"ok": True}  # the last behaviour repeats
        with pytest.raises(httpx.RemoteProtocolError):
            http.get("/short")  # the server promised 10 bytes and sent 3


def test_drip_endless_redirect_nested(hostile: HostileProvider) -> None:
    hostile.route("GET", r"/drip", drip(b"abcd", chunk=2, every=0.2))
    hostile.route("GET", r"/endless", endless(chunk=1024))
    hostile.route("GET", r"/moved", redirect("/drip"))
    hostile.route("GET", r"/deep", nested_json(depth=50_000))
    with httpx.Client(base_url=hostile.url, timeout=5) as http:
        started = time.monotonic()
        assert http.get("/moved", follow_redirects=True).content == b"abcd"
        assert time.monotonic() - started >= 0.35  # two chunks, 0.2 s apart
        with http.stream("GET", "/endless") as response:
            received = 0
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received > 200_000:
                    break
        assert received > 200_000
        with pytest.raises(RecursionError):
            json.loads(http.get("/deep").content)
