"""One definition of a URL's origin (:mod:`worker.fal.origin`), and it is httpx's.

The key's scoping, the status URLs a submit answer may name, the trusted download origins, the
upload cache's key and the queue origin a request records (``Job.fal_origin``, compared by
``status`` and the dashboard, which load no httpx) all take their origin from that one module.
Its parsing is a copy of httpx's: over a grid of URL forms it must give what ``httpx.URL``
says (scheme, host, port, the default port made explicit for http and https), and refuse what
httpx refuses.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest

from worker.fal.http import FalKeyAuth, origin
from worker.fal.models import RequestHandle
from worker.fal.origin import Origin, origin_text, url_origin, url_origin_text
from worker.here import queue_origin

SCHEMES = ("http", "https", "HTTPS", "wss")
HOSTS = (
    "fal.run",
    "QUEUE.Fal.Run",  # upper case
    "example.com.",  # a trailing dot
    "127.0.0.1",
    "[::1]",  # IPv6 literals
    "[2001:DB8::1]",
    "[::ffff:192.168.0.1]",
    "[fe80::1%eth0]",  # with a zone
    "bücher.example",  # non-ASCII: IDNA-encoded, then decoded back (its encoding starts xn--)
    "BÜCHER.example",
    "xn--bcher-kva.example",  # the same host, already encoded
    "www.bücher.example",  # encoded, and not decoded back (httpx decodes only an xn-- start)
    "中国.icom.museum",
    "a b.example",  # percent-encoded by httpx
    "",  # no host at all
)
PORTS = ("", ":", ":80", ":443", ":8443", ":08443", ":0")
USERINFO = ("", "user:s3cret@", "key@", "a@b@")
TAILS = ("", "/", "/v1/fal-ai/wan?key=x#frag", "?q=1", "#f", "/%7Euser/../x")


def httpx_origin(url: str) -> Origin:
    """The origin as httpx gives it, computed here from ``httpx.URL`` alone."""
    parsed = httpx.URL(url)
    port = parsed.port if parsed.port is not None else {"http": 80, "https": 443}.get(parsed.scheme)
    return (parsed.scheme, parsed.host, port)


def refuses(parse: Callable[[str], Origin], url: str, *errors: type[Exception]) -> bool:
    """Whether ``parse`` refuses ``url`` with a ValueError (or one of ``errors``)."""
    try:
        parse(url)
    except Exception as exc:
        if isinstance(exc, (ValueError, *errors)):
            return True
        raise
    return False


def test_the_origin_is_httpx_s_over_a_grid_of_url_forms() -> None:
    """10,080 URLs: each scheme, host, port, userinfo and tail together."""
    wrong = []
    for scheme, host, port, userinfo, tail in itertools.product(SCHEMES, HOSTS, PORTS, USERINFO, TAILS):
        url = f"{scheme}://{userinfo}{host}{port}{tail}"
        expected = httpx_origin(url)
        found = (url_origin(url), origin(url), origin(httpx.URL(url)))
        if found != (expected, expected, expected):
            wrong.append(f"{url}: httpx {expected}, here {found}")
    assert wrong == []


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("https://queue.fal.run", "https://queue.fal.run:443"),
        ("https://queue.fal.run:443/fal-ai/wan", "https://queue.fal.run:443"),
        ("HTTP://Example.COM:80/x", "http://example.com:80"),
        ("http://127.0.0.1:8787", "http://127.0.0.1:8787"),
        ("https://user:s3cret@REST.fal.ai/v1/?key=x", "https://rest.fal.ai:443"),
        ("http://[::1]/", "http://[::1]:80"),
        ("https://[2001:DB8::1]:8443/x", "https://[2001:db8::1]:8443"),
        ("https://bücher.example/", "https://bücher.example:443"),
        ("https://xn--bcher-kva.example:8443", "https://bücher.example:8443"),
        ("https://www.BÜCHER.example/", "https://www.xn--bcher-kva.example:443"),
        ("wss://stream.example:443/", "wss://stream.example"),
        ("ws://stream.example:8080/", "ws://stream.example:8080"),
    ],
)
def test_the_origin_s_text_is_what_the_queue_and_the_upload_cache_record(url: str, text: str) -> None:
    assert url_origin_text(url) == text
    assert origin_text(httpx_origin(url)) == text
    assert queue_origin(url) == text  # status, run and the dashboard: the same text


@pytest.mark.parametrize(
    "url",
    [
        "http://999.1.1.1/",  # not an IPv4 address
        "http://01.2.3.4/",
        "http://[::g]/",  # not an IPv6 address
        "http://host:abc/",  # not a port
        "http://host:80x/",
        "http://ho\tst/",  # a control character
        "https://☃.example/",  # not a name IDNA 2008 allows
        "https://xn--zz.example/",  # no valid Punycode: httpx parses it, its host raises
        "//:x",
    ],
)
def test_what_httpx_refuses_is_refused(url: str) -> None:
    assert refuses(httpx_origin, url, httpx.InvalidURL)  # or its host, an idna error (a ValueError)
    assert refuses(url_origin, url)  # a ValueError, always
    assert queue_origin(url) == url  # kept as written: compared as text, never followed
    assert not FalKeyAuth("k", ["https://queue.fal.run"]).trusts(url)


def test_a_status_url_whose_host_idna_cannot_decode_is_not_followed() -> None:
    """fal's answer names the status URLs; one on a host httpx parses but cannot decode
    (``xn--zz``) is not on the queue's origin: the URLs are derived, nothing raises."""
    queue = "https://queue.fal.run"
    odd = "https://xn--zz.example/fal-ai/wan/requests/r-1"
    handle = RequestHandle.trusted(
        queue, "fal-ai/wan", "r-1", status_url=f"{odd}/status", response_url=odd, cancel_url=f"{odd}/cancel"
    )
    assert handle == RequestHandle.from_request_id(queue, "fal-ai/wan", "r-1")


def test_a_non_ascii_queue_host_loads_no_http_client() -> None:
    """``status`` computes its queue's origin without httpx, whatever the host."""
    probe = (
        "import json, sys\n"
        "from worker.here import queue_origin\n"
        "origin = queue_origin('https://bücher.example:8443/q')\n"
        "http = sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'httpcore'))\n"
        "print(json.dumps([origin, http]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == ["https://bücher.example:8443", []]
