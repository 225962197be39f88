"""A run behind a corporate proxy that cannot reach fal (its ``CONNECT`` answered 502, as Squid
does) or wants credentials (407): the jobs wait, uncounted, as for any outage of fal's.

Before: each submit was a counted retry, and with ``WANBATCH_MAX_ATTEMPTS`` spent the whole
batch failed ``network_error`` within seconds (``3 failed (network_error): after 3 attempt(s):
fal submit: not sent, could not connect (ProxyError): 502 Bad Gateway``), while a proxy that
refused the connection held it. The proxy is a stand-in on loopback; fal's host is only named.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import Engine

from jobs import db, store
from jobs.models import Job
from jobs.states import JobState
from tests.hostile import HostileProvider, json_reply
from tests.loopback_proxy import AUTH_REQUIRED, BAD_GATEWAY, loopback_proxy
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.steps import dispatch, submit

KEY = "8d3c1f0e-5a6b-4c7d-9e8f-0a1b2c3d4e5f:0f1e2d3c4b5a69788796a5b4c3d2e1f0"
T2V = "fal-ai/wan-22"
I2V = "fal-ai/wan-i2v"
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _job(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        found = store.get_job(session, job_id)
        session.expunge(found)
        return found


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ("502 Bad Gateway", "answered 502 Bad Gateway: it could not reach fal.corp.example:443"),
        (
            "407 Proxy Authentication Required",
            "answered 407 Proxy Authentication Required: set its user:password in HTTPS_PROXY",
        ),
    ],
    ids=["502", "407"],
)
def test_a_proxy_that_cannot_tunnel_to_fal_holds_the_submits_and_fails_no_job(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, answer: str, said: str
) -> None:
    for name in list(os.environ):
        if name.lower() in _PROXY_VARIABLES:
            monkeypatch.delenv(name)
    with loopback_proxy(answer) as proxy:
        where = proxy.url.split("://", 1)[1]
        monkeypatch.setenv("HTTPS_PROXY", f"http://corp:pr0xy-s3cret@{where}")
        settings = settings_for("https://fal.corp.example", KEY).model_copy(update={"max_attempts": 1})
        rt = make_runtime(engine, settings)
        try:
            add_batch(engine, "behind-proxy", [(T2V, {"prompt": "a"}), (T2V, {"prompt": "b"})])
            first, second = dispatch(rt)
            assert submit(rt, first) == "fal-unreachable"
            assert rt.fal_reach.down
            assert submit(rt, second) == "fal-unreachable"  # held: not even tried
            note = rt.fal_reach.note() or ""
        finally:
            rt.client.close()
    assert len(proxy.requests) == 1  # the one submit; the second was held
    for job_id in (first, second):
        after = _job(engine, job_id)
        assert after.state == JobState.PENDING  # not failed, though max_attempts is 1
        assert after.attempts == 0
        assert (after.possible_duplicate_charges, after.ambiguous_usd) == (0, Decimal(0))
    error = _job(engine, first).error or ""
    assert _job(engine, first).error_type == "fal_unreachable"
    assert f"the proxy {where} (HTTPS_PROXY) {said}" in error
    assert note.startswith("fal unreachable since ")
    assert f"the proxy {where} (HTTPS_PROXY) {said}" in note, note
    assert "pr0xy-s3cret" not in error + note


def _image_job(engine: Engine, tmp_path: Path) -> None:
    image = tmp_path / "still.png"
    Image.new("RGB", (640, 480), (20, 90, 160)).save(image)
    add_batch(
        engine, "upload-behind-proxy", [(I2V, {"prompt": "p", "image_url": str(image), "resolution": "480p"})]
    )


def _held_uncounted(engine: Engine, job_id: str) -> str:
    after = _job(engine, job_id)
    assert after.state == JobState.PENDING  # not failed, though max_attempts is 1
    assert after.attempts == 0
    assert after.error_type == "fal_unreachable"
    assert (after.submitted_at, after.request_id) == (None, None)
    return after.error or ""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("answer", [BAD_GATEWAY, AUTH_REQUIRED], ids=["502", "407"])
def test_a_proxy_that_refuses_the_upload_initiates_tunnel_holds_the_submit(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, answer: str
) -> None:
    """The image's upload goes first (fal's storage, through HTTPS_PROXY): a proxy that refuses
    its tunnel sent nothing to fal, as for a submit."""
    for name in list(os.environ):
        if name.lower() in _PROXY_VARIABLES:
            monkeypatch.delenv(name)
    with loopback_proxy(answer) as proxy:
        where = proxy.url.split("://", 1)[1]
        monkeypatch.setenv("HTTPS_PROXY", f"http://corp:pr0xy-s3cret@{where}")
        settings = settings_for("https://fal.corp.example", KEY, inline_max_bytes=0, max_attempts=1)
        rt = make_runtime(engine, settings)
        try:
            _image_job(engine, tmp_path)
            (job_id,) = dispatch(rt)
            assert submit(rt, job_id) == "fal-unreachable"
            assert rt.fal_reach.down
        finally:
            rt.client.close()
    # the initiate's tunnel, asked again by the client's bounded retry; no submit ever
    assert set(proxy.request_lines()) == {"CONNECT fal.corp.example:443 HTTP/1.1"}
    error = _held_uncounted(engine, job_id)
    assert f"the proxy {where} (HTTPS_PROXY) answered {answer}" in error
    assert "pr0xy-s3cret" not in error


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_download_proxy_that_refuses_the_upload_put_holds_the_submit(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, scheme: str
) -> None:
    """The PUT of the image goes through WANBATCH_DOWNLOAD_PROXY: its refused tunnel (https) or
    its own 502 to a forwarded PUT (http) sent nothing to fal either."""
    hostile.route(
        "POST",
        r"/storage/upload/initiate",
        json_reply(
            {"upload_url": f"{scheme}://cdn.corp.example/up", "file_url": "https://cdn.corp.example/f.png"}
        ),
    )
    with loopback_proxy(BAD_GATEWAY) as proxy:
        settings = settings_for(
            hostile.url, KEY, inline_max_bytes=0, max_attempts=1, download_proxy=proxy.url
        )
        rt = make_runtime(engine, settings)
        try:
            _image_job(engine, tmp_path)
            (job_id,) = dispatch(rt)
            assert submit(rt, job_id) == "fal-unreachable"
        finally:
            rt.client.close()
    assert proxy.request_lines(), "the PUT went to the proxy"
    assert hostile.count("POST", r"/fal-ai/.*") == 0  # nothing submitted
    error = _held_uncounted(engine, job_id)
    assert "502" in error
    assert proxy.url.split("://", 1)[1] in error  # the proxy named
    assert "it could not reach cdn.corp.example" in error
