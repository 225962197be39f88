"""FAL_KEY never reaches a log record, an error message or a repr."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from jobs.errors import ProviderError
from worker.fal.client import FalClient
from worker.fal.http import FalKeyAuth, RetryPolicy
from worker.fal.models import RequestHandle
from worker.fal.redact import KeyRedactionFilter, install_redaction, redact_text, uninstall_redaction

KEY = "7d3f9a10-aaaa-bbbb-cccc-ddddeeeeffff:5e1f2a3b4c5d6e7f8091a2b3c4d5e6f7"
SECRET_PART = KEY.split(":")[1]


class Handler(BaseHTTPRequestHandler):
    """A real HTTP server, so httpx and httpcore run their full (DEBUG-logging) code paths."""

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def _answer(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/locked"):
            # A hostile or buggy server echoing the Authorization header back.
            echo = self.headers.get("Authorization", "")
            self._answer(403, f'{{"detail": "User is locked. You sent {echo}"}}'.encode())
        elif self.path.startswith("/reset"):
            self.close_connection = True
            self.connection.shutdown(2)
        elif self.path.startswith("/slow"):
            time.sleep(0.6)
            self._answer(200, b"{}")
        else:
            self._answer(502, b"<html><center>nginx</center></html>", {"Content-Type": "text/html"})

    def do_GET(self) -> None:
        self._answer(
            500,
            b'{"detail": "Key ' + KEY.encode() + b' rejected", "error_type": "internal_error"}',
            {"X-Fal-Error-Type": "internal_error", "x-fal-request-id": "r"},
        )

    def do_PUT(self) -> None:
        self._answer(418, b"teapot")


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def redaction() -> Iterator[None]:
    install_redaction(KEY)
    try:
        yield
    finally:
        uninstall_redaction()


def all_text(err: BaseException) -> str:
    """Every rendering of an exception and its chain a log or a user could ever see."""
    parts = ["".join(traceback.format_exception(err))]
    seen: BaseException | None = err
    while seen is not None:
        parts += [str(seen), repr(seen), repr(getattr(seen, "detail", None)), repr(seen.args)]
        request = getattr(seen, "_request", None)
        if request is not None:
            parts.append(repr(request))
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


@pytest.mark.usefixtures("redaction")
def test_no_key_in_logs_errors_or_reprs(server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "worker", "hpack"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    client = FalClient(
        queue_url=server,
        rest_url=server,
        key=KEY,
        timeout=httpx.Timeout(0.3),
        retry=RetryPolicy(attempts=2, base_delay=0.0),
    )
    handle = RequestHandle.from_request_id(server, "fal-ai/wan-i2v", "rid")
    errors: list[ProviderError] = []
    with client:
        for endpoint in ("locked/x", "reset/x", "slow/x", "gateway/x"):
            with pytest.raises(ProviderError) as info:
                client.submit(endpoint, {"prompt": "p"})
            errors.append(info.value)
        for call in (client.status, client.result, client.cancel):
            with pytest.raises(ProviderError) as info:
                call(handle)
            errors.append(info.value)
        log = logging.getLogger("worker.fal.test")
        log.debug("the key is %s", KEY)
        log.info("headers: %r", {"Authorization": f"Key {KEY}"})
        try:
            raise RuntimeError(f"boom with {KEY}")
        except RuntimeError:
            log.exception("failed")
        logging.getLogger("httpx").debug("raw Authorization: Key %s", KEY)
        assert KEY not in repr(client)
        assert KEY not in repr(client.http.auth)

    captured = caplog.text + "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records
    )
    assert "httpx" in {r.name for r in caplog.records}  # the scenario really logged through httpx
    assert "the key is ***" in captured
    assert SECRET_PART not in captured
    assert KEY not in captured
    for err in errors:
        text = all_text(err)
        assert SECRET_PART not in text, text
    assert any("***" in str(e) for e in errors)  # the echoed key was scrubbed, not absent


def test_redact_text_shapes() -> None:
    assert redact_text(f"x {KEY} y", [KEY]) == "x *** y"
    assert redact_text("Authorization: Key abc.def") == "Authorization: Key ***"
    assert redact_text("{'authorization': 'Bearer tok123'}") == "{'authorization': 'Bearer ***'}"
    assert redact_text("(b'Authorization', b'Key zzz')") == "(b'Authorization', b'Key ***')"
    assert SECRET_PART not in redact_text(f"Key {KEY}")
    assert redact_text("Key collisions happen") == "Key collisions happen"  # prose is left alone


def test_filter_rewrites_records_even_without_the_factory() -> None:
    flt = KeyRedactionFilter(["only-this-secret-value"])
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token=%s", ("only-this-secret-value",), None)
    assert flt.filter(record) is True
    assert record.getMessage() == "token=***"
    assert "only-this-secret-value" not in repr(flt)


def test_auth_repr_hides_key() -> None:
    auth = FalKeyAuth(KEY, ["https://queue.fal.run"])
    assert KEY not in repr(auth)
    assert SECRET_PART not in repr(auth)


def test_uninstall_restores_plain_records() -> None:
    before = logging.getLogRecordFactory()
    install_redaction("temporary-secret-value")
    assert logging.getLogRecordFactory() is not before
    uninstall_redaction()
    assert logging.getLogRecordFactory() is before
    record = logging.getLogger("x").makeRecord(
        "x", logging.INFO, __file__, 1, "v=%s", ("temporary-secret-value",), None
    )
    assert record.args == ("temporary-secret-value",)


def test_the_pre_check_never_skips_a_text_a_rule_would_change() -> None:
    """redact_text returns a text unchanged when no rule could match it; over texts built from
    the pieces every rule looks for (the key, cuts of it, an ellipsis, Authorization in odd
    cases and with a dotless ı, Key/Bearer shapes), it must agree with running every rule."""
    import random

    from worker.fal import redact

    short = "k3y"
    words = "…| |:|'|\"|=|\n|Authorization|AUTHORIZATION|authorızation|AuThOrIzAtIoN|Key |Bearer |key "
    words += "|abcdefgh:ijklmnop|xxxxxxxxx|status|IN_QUEUE|https://example.test/v.mp4"
    pieces = [KEY, KEY[:8], KEY[:7], KEY[:20], SECRET_PART, SECRET_PART[:12], short, *words.split("|")]
    rng = random.Random(11)
    changed = 0
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        expected = redact._apply_rules(text, {v for k in (KEY, short) for v in redact.key_variants(k)})
        assert redact_text(text, [KEY, short]) == expected, text
        changed += expected != text
    assert 500 < changed < 4500  # both kinds of text were tried
