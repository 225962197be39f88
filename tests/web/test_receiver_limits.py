"""``wanbatch serve`` against senders that never finish, vanish mid-body or knock on the wrong
method, and its access log: a silent body is cut off (408), a vanished client is one line and a
counted rejection, the bodies held at once have a budget (503), other methods on the public
paths are 405, and the webhook token never reaches the access log.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.types import Message

import web.bodies
from cli.service_commands import SERVE_LIMIT_CONCURRENCY, AccessLogMasking, mask_access_log
from jobs.settings import get_settings
from tests.ports import unused_port
from tests.web.web_helpers import LOOPBACK, REMOTE, TOKEN, app_for, client, settings_for
from web.bodies import BUSY, DISCONNECTED, TOO_SLOW

SECRET = "aa3b5c0ffee0123456789"
WEBHOOK = f"/webhooks/fal?job_id=j1&attempt=1&token={SECRET}"
#: Longest a socket of these tests waits for an answer: only so that broken code fails the test
#: instead of hanging it; never reached when the code is right.
SAFETY = 30.0


def _scope(
    method: str, path: str, peer: tuple[str, int] = LOOPBACK, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> dict[str, Any]:
    target, _, query = path.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": target,
        "raw_path": target.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8788"), (b"content-type", b"application/json"), *headers],
        "client": peer,
        "server": ("127.0.0.1", 8788),
    }


def _call(
    app: Starlette, method: str, path: str, *, then: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> list[Message]:
    """Send ``app`` one byte of body, then either disconnect (``then="disconnect"``) or go silent
    for ever (``"silence"``); what the app sent back."""
    sent: list[Message] = []
    messages = [{"type": "http.request", "body": b"{", "more_body": True}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        if then == "disconnect":
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # silent: never another byte
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    async def run() -> None:
        # The safety timeout only stops broken code from hanging the test; it is never reached.
        await asyncio.wait_for(app(_scope(method, path, headers=headers), receive, send), timeout=30)

    asyncio.run(run())
    return sent


def _status(sent: list[Message]) -> int:
    return int(next(m["status"] for m in sent if m["type"] == "http.response.start"))


@pytest.fixture
def app(sqlite_engine: Engine, output_dir: Path) -> Starlette:
    return app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))


# ----------------------------------------------------------------------------- slow and vanishing


def test_a_body_that_goes_silent_is_cut_off_with_408_and_counted(
    app: Starlette, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(web.bodies, "BODY_DEADLINE", 0.01)
    with caplog.at_level(logging.WARNING):
        sent = _call(app, "POST", WEBHOOK, then="silence")
    assert _status(sent) == 408
    assert app.state.counts.rejected == 1
    assert any(TOO_SLOW in r.getMessage() for r in caplog.records)


def test_a_login_form_that_goes_silent_is_cut_off_with_408(
    app: Starlette, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web.bodies, "BODY_DEADLINE", 0.01)
    assert _status(_call(app, "POST", "/login", then="silence")) == 408


@pytest.mark.parametrize("path", [WEBHOOK, "/login"])
@pytest.mark.parametrize(
    "length", [b"9" * 20, b"1" + b"0" * 40, b"2" * 5000], ids=["20 digits", "41 digits", "5000 digits"]
)
def test_a_content_length_of_many_digits_is_413_at_once(
    app: Starlette, monkeypatch: pytest.MonkeyPatch, path: str, length: bytes
) -> None:
    """A length of 19 digits or more was read as "no length": the body was waited on until the
    deadline (10 s) and answered 408. It declares more than any cap: 413 before reading."""
    monkeypatch.setattr(web.bodies, "BODY_DEADLINE", 0.01)  # a wait ends at once, as a 408
    sent = _call(app, "POST", path, then="silence", headers=((b"content-length", length),))
    assert _status(sent) == 413


def test_a_content_length_with_leading_zeros_is_its_value() -> None:
    assert not web.bodies.declares_more_than("0" * 30 + "4096", 4096)
    assert web.bodies.declares_more_than("0" * 30 + "4097", 4096)
    assert not web.bodies.declares_more_than("²", 4096)  # not digits: the cap applies as it arrives
    assert not web.bodies.declares_more_than(None, 4096)


@pytest.mark.parametrize("path", [WEBHOOK, "/login"])
def test_a_client_gone_mid_body_is_one_warning_not_a_traceback(
    app: Starlette, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    with caplog.at_level(logging.DEBUG):
        sent = _call(app, "POST", path, then="disconnect")
    assert _status(sent) == 400
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    (line,) = [r for r in caplog.records if DISCONNECTED in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert "\n" not in line.getMessage()
    if path == WEBHOOK:
        assert app.state.counts.rejected == 1


def test_bodies_beyond_the_budget_are_answered_503_and_the_budget_is_given_back(app: Starlette) -> None:
    app.state.body_budget.limit = 10
    with client(app) as http:
        refused = http.post(WEBHOOK, content=b"x" * 11)
        small = http.post(WEBHOOK, content=b"{}")  # fits: read, then refused for its signature
    assert refused.status_code == 503
    assert refused.json()["error"] == BUSY
    assert small.status_code != 503
    assert app.state.body_budget.held == 0
    assert app.state.counts.rejected == 2


# ----------------------------------------------------------------------------- methods


@pytest.mark.parametrize("token", [None, TOKEN])
@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/webhooks/fal", {"POST"}),
        ("DELETE", "/healthz", {"GET", "HEAD"}),
        ("POST", "/healthz", {"GET", "HEAD"}),
    ],
)
def test_other_methods_on_the_public_paths_are_405_with_allow(
    sqlite_engine: Engine, output_dir: Path, token: str | None, method: str, path: str, allowed: set[str]
) -> None:
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=token))
    with client(app, peer=REMOTE) as http:
        answer = http.request(method, path)
    assert answer.status_code == 405
    assert {m.strip() for m in answer.headers["allow"].split(",")} == allowed


# ----------------------------------------------------------------------------- access log


@pytest.fixture
def access_logger(caplog: pytest.LogCaptureFixture) -> Iterator[logging.Logger]:
    """uvicorn's access logger, its records going to caplog's handler directly: a uvicorn started
    earlier in the session (its default logging config) leaves ``uvicorn.access`` and ``uvicorn``
    not propagating, so records never reached caplog on the root logger."""
    logger = logging.getLogger("uvicorn.access")
    filters, propagate, disabled = logger.filters[:], logger.propagate, logger.disabled
    logger.propagate, logger.disabled = False, False
    logger.addHandler(caplog.handler)
    try:
        yield logger
    finally:
        logger.removeHandler(caplog.handler)
        logger.filters[:] = filters
        logger.propagate, logger.disabled = propagate, disabled


def test_the_access_log_masks_the_webhook_token_in_args(
    access_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    mask_access_log()
    mask_access_log()  # once, however often called
    assert sum(isinstance(f, AccessLogMasking) for f in access_logger.filters) == 1
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        access_logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "POST", WEBHOOK, "1.1", 200)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert SECRET not in line
    assert line == '127.0.0.1:5000 - "POST /webhooks/fal?job_id=j1&attempt=1&token=** HTTP/1.1" 200'


def test_the_access_log_masks_a_line_rendered_already() -> None:
    """Under the key redaction every record is rendered when made: no args left to mask."""
    rendered = f'127.0.0.1:5000 - "POST {WEBHOOK} HTTP/1.1" 200'
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, rendered, (), None)
    assert AccessLogMasking().filter(record)
    assert (
        record.getMessage()
        == '127.0.0.1:5000 - "POST /webhooks/fal?job_id=j1&attempt=1&token=** HTTP/1.1" 200'
    )


@pytest.mark.parametrize(
    ("given", "trusted"), [(None, None), ("172.16.0.0/12, 10.0.0.7", "172.16.0.0/12,10.0.0.7")]
)
def test_serve_trusts_the_proxies_it_is_told_to(
    access_logger: logging.Logger,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    given: str | None,
    trusted: str | None,
) -> None:
    """WANBATCH_SERVE_FORWARDED_ALLOW_IPS names the proxies the app believes (uvicorn's
    ``forwarded_allow_ips``, applied by the app itself, uvicorn's own rewrite off): unset,
    uvicorn's default (this host's loopback), which a proxy in another container or on another
    host is not."""
    import sys

    import uvicorn

    import cli
    from cli import startup
    from web.auth import ForwardedHeaders

    seen: dict[str, Any] = {}

    def run(server: uvicorn.Server, sockets: list[Any]) -> None:
        seen["uvicorn_rewrites"] = server.config.proxy_headers
        from starlette.applications import Starlette

        app = server.config.app
        assert isinstance(app, Starlette)
        (believing,) = [m for m in app.user_middleware if getattr(m, "cls", None) is ForwardedHeaders]
        seen["trusted"] = believing.kwargs["allow_ips"]
        for sock in sockets:
            sock.close()

    monkeypatch.setattr(startup, "pause", lambda: None)
    monkeypatch.setattr(sys, "argv", ["wanbatch", "serve", "--port", "0"])
    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'serve.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path))
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    if given is None:
        monkeypatch.delenv("WANBATCH_SERVE_FORWARDED_ALLOW_IPS", raising=False)
    else:
        monkeypatch.setenv("WANBATCH_SERVE_FORWARDED_ALLOW_IPS", given)
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 0
    assert seen["uvicorn_rewrites"] is False  # the app does, and notes which peer was trusted
    if trusted is None:  # uvicorn's own default: this host's loopback only
        assert set(seen["trusted"].split(",")) <= {"127.0.0.1", "::1"}
    else:
        assert seen["trusted"] == trusted


@pytest.mark.parametrize("entry", ["proxy.local", "10.0.0.1/8", "10.0.0.300"])
def test_a_proxy_that_is_no_address_is_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str
) -> None:
    """uvicorn takes such an entry as a literal no peer matches: the proxy would stay distrusted
    without a word."""
    import sys

    import uvicorn

    import cli
    from cli import startup

    monkeypatch.setattr(startup, "pause", lambda: None)
    monkeypatch.setattr(sys, "argv", ["wanbatch", "serve", "--port", "0"])
    # Were it not refused, it would serve: it must not serve for ever.
    monkeypatch.setattr(uvicorn.Server, "run", lambda _server, sockets: [s.close() for s in sockets])
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'serve.db'}")
    monkeypatch.setenv("WANBATCH_SERVE_FORWARDED_ALLOW_IPS", f"127.0.0.1,{entry}")
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert "WANBATCH_SERVE_FORWARDED_ALLOW_IPS" in err
    assert entry in err


def test_serve_bounds_its_connections_and_masks_its_access_log(
    access_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn

    import cli
    from cli import startup

    seen: dict[str, Any] = {}

    def run(server: uvicorn.Server, sockets: list[Any]) -> None:
        seen["limit"] = server.config.limit_concurrency
        for sock in sockets:
            sock.close()

    import sys

    monkeypatch.setattr(startup, "pause", lambda: None)
    monkeypatch.setattr(sys, "argv", ["wanbatch", "serve", "--port", "0"])
    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'serve.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 0
    assert seen["limit"] == SERVE_LIMIT_CONCURRENCY
    assert any(isinstance(f, AccessLogMasking) for f in access_logger.filters)


# ----------------------------------------------------------------------------- the real server


def _ask(port: int, request: bytes) -> bytes:
    """``request`` sent over a raw socket to ``127.0.0.1:port``; all it answered, up to the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=SAFETY) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_the_real_server_refuses_a_length_over_20_digits_before_the_app_sees_it(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The ASGI tests above call the app directly; ``wanbatch serve`` runs it under uvicorn's h11
    parser, which refuses a ``Content-Length`` of more than 20 digits itself (h11's
    ``CONTENT_LENGTH_MAX_DIGITS``): a 400 the app never sees, neither counted nor logged as a
    rejection of the receiver's (uvicorn logs its own warning). Up to 20 digits: the app's 413,
    counted. What the README says, pinned against the server `serve` really starts."""
    import sys

    import uvicorn

    import cli
    from cli import startup

    started: dict[str, Any] = {}
    real_run = uvicorn.Server.run

    def capture(server: uvicorn.Server, sockets: list[Any]) -> None:
        started["server"], started["sockets"] = server, sockets

    monkeypatch.setattr(startup, "pause", lambda: None)
    monkeypatch.setattr(sys, "argv", ["wanbatch", "serve", "--port", "0"])
    monkeypatch.setattr(uvicorn.Server, "run", capture)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'serve.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", f"http://127.0.0.1:{unused_port()}/jwks.json")
    get_settings.cache_clear()
    with pytest.raises(SystemExit) as ended:
        cli.main()
    get_settings.cache_clear()
    assert ended.value.code == 0
    server: uvicorn.Server = started["server"]
    (sock,) = started["sockets"]
    port = sock.getsockname()[1]
    thread = threading.Thread(target=real_run, args=(server,), kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15  # only so that a server that never starts fails the test
        while not server.started:
            assert thread.is_alive(), "`wanbatch serve` did not start"
            assert time.monotonic() < deadline, "`wanbatch serve` did not start"
            time.sleep(0.01)
        app = server.config.app
        assert isinstance(app, Starlette)  # the app `serve` made, as uvicorn runs it
        counts = app.state.counts

        def post(length: bytes) -> bytes:
            head = (
                b"POST " + WEBHOOK.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: "
                + length
                + b"\r\n\r\n"
            )
            return _ask(port, head)

        with caplog.at_level(logging.WARNING):
            twenty = post(b"9" * 20)
            assert twenty.startswith(b"HTTP/1.1 413 "), twenty
            assert counts.rejected == 1
            for length in (b"9" * 21, b"1" + b"0" * 40):
                refused = post(length)
                assert refused.startswith(b"HTTP/1.1 400 "), refused
                assert refused.endswith(b"Invalid HTTP request received."), refused
            assert counts.rejected == 1  # never reached the app
        assert len([r for r in caplog.records if "webhook rejected" in r.getMessage()]) == 1
        # uvicorn's own warning, on its own handler (its logger does not propagate): one each.
        assert capfd.readouterr().err.count("Invalid HTTP request received.") == 2
    finally:
        server.should_exit = True
        thread.join(timeout=10)
