"""The S3 output store behind ``HTTP_PROXY``: an endpoint on loopback is reached directly, and a
proxy that fails an endpoint beyond it is named.

Before: ``WANBATCH_OUTPUT_DIR=s3://…`` with ``AWS_ENDPOINT_URL=http://127.0.0.1:…`` (a MinIO or
moto beside wanbatch) went through ``HTTP_PROXY`` (botocore bypasses only ``NO_PROXY``'s hosts):
the proxy saw every request's SigV4 ``Authorization``, and ``run`` refused to start with
``cannot take the outputs: 502: Bad Gateway`` — not a word of the proxy.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.output_store import S3OutputStore
from jobs.outputs import OutputWriteError
from tests.loopback_proxy import AUTH_REQUIRED, BAD_GATEWAY, loopback_proxy
from tests.s3_helpers import ACCESS_KEY, MotoS3, aws_env, keys

pytestmark = pytest.mark.s3

BUCKET = "wanbatch-proxied"
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    for name in list(os.environ):
        if name.lower() in _PROXY_VARIABLES:
            monkeypatch.delenv(name)
    with MotoS3() as server:
        aws_env(monkeypatch, server.url)
        server.client().create_bucket(Bucket=BUCKET)  # before any proxy is set
        yield server


def _store(tmp_path: Path) -> S3OutputStore:
    return S3OutputStore(bucket=BUCKET, prefix="p", staging=tmp_path / "staging")


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_an_endpoint_on_loopback_never_goes_through_the_proxy(
    tmp_path: Path, s3: MotoS3, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    with loopback_proxy(BAD_GATEWAY) as proxy:
        monkeypatch.setenv(variable, proxy.url)
        _store(tmp_path).check_writable()  # raised "502: Bad Gateway"
        video = tmp_path / "v.mp4"
        video.write_bytes(b"\0" * 1000)
        digest = hashlib.sha256(video.read_bytes()).hexdigest()
        _store(tmp_path).put_file(video, bucket=BUCKET, key="p/v.mp4", sha256=digest, size=1000)
    assert proxy.requests == []
    assert ACCESS_KEY not in proxy.text()
    monkeypatch.delenv(variable)  # the test's own client reads it
    assert keys(s3.client(), BUCKET, "p/") == ["p/v.mp4"]


def test_a_proxy_that_answers_502_for_an_endpoint_beyond_loopback_is_named(
    tmp_path: Path, s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint is only named to the proxy, which answers 502 as a proxy that cannot reach it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.corp.example:9000")
    with loopback_proxy(BAD_GATEWAY) as proxy:
        where = proxy.url.split("://", 1)[1]
        monkeypatch.setenv("HTTP_PROXY", f"http://corp:pr0xy-s3cret@{where}")
        with pytest.raises(OutputWriteError) as info:
            _store(tmp_path).check_writable()
    assert proxy.requests  # it did go through the proxy
    assert proxy.requests[0][0].startswith("PUT http://s3.corp.example:9000/")
    text = str(info.value)
    assert text == (
        f"WANBATCH_OUTPUT_DIR 's3://{BUCKET}/p' cannot take the outputs: the proxy {where} "
        "(HTTP_PROXY) answered 502 Bad Gateway: it could not reach http://s3.corp.example:9000"
    ), text


def test_a_proxy_that_refuses_the_tunnel_to_an_https_endpoint_is_named(
    tmp_path: Path, s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.corp.example")
    with loopback_proxy(AUTH_REQUIRED) as proxy:
        where = proxy.url.split("://", 1)[1]
        monkeypatch.setenv("HTTPS_PROXY", f"http://corp:pr0xy-s3cret@{where}")
        with pytest.raises(OutputWriteError) as info:
            _store(tmp_path).check_writable()
    assert proxy.requests[0][0].startswith("CONNECT s3.corp.example:443 ")
    text = str(info.value)
    assert f"the proxy {where} (HTTPS_PROXY) could not be reached, or refused the tunnel to" in text, text
    assert "pr0xy-s3cret" not in text
