"""``wanbatch serve`` against hostile or unlucky requests: odd digits, unparsable origins, token
guessing, a locked database, and a flood of deliveries — each answered on purpose (4xx/503, one
log line), never an internal error, and never at the dashboard's expense.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.datastructures import Headers

import web.auth
from falsim.webhooks import WebhookSigner, webhook_body
from jobs import db
from jobs.db import make_engine, session_factory
from jobs.settings import Settings, get_settings
from tests.web.web_helpers import (
    HTML,
    JSON,
    LOOPBACK,
    REMOTE,
    TOKEN,
    app_for,
    cookie_name,
    cookie_value,
    mixed_batch,
    settings_for,
)
from tests.web.web_helpers import client as sync_client
from web.app import DATABASE_UNAVAILABLE, RECEIVER_THREADS, create_app
from web.auth import TokenGate, same_origin
from worker.fal.webhooks import JwksKeys
from worker.steps.webhooks import database_fingerprint, webhook_secret

#: Longest a blocked thread of these tests waits for the test to let it go: only so that broken
#: code fails the test instead of hanging it; never reached when the code is right.
SAFETY = 5.0
REMOTE_ORIGIN = "http://dash.example.com"


def _keys(signer: WebhookSigner) -> JwksKeys:
    doc = signer.jwks()
    return JwksKeys(
        "http://jwks.test/", transport=httpx.MockTransport(lambda _r: httpx.Response(200, json=doc))
    )


def _app(
    engine: Engine, settings: Settings, *, keys: JwksKeys | None = None, gate: TokenGate | None = None
) -> Starlette:
    db.open_engine(settings)  # the use cases the actions call open the URL's own engine
    return create_app(settings, engine=engine, keys=keys, gate=gate)


def _client(
    app: Starlette, peer: tuple[str, int] = LOOPBACK, host: str = "127.0.0.1:8788"
) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=peer)
    return httpx.AsyncClient(transport=transport, base_url=f"http://{host}", follow_redirects=False)


def _delivery(signer: WebhookSigner, request_id: str = "req-1") -> tuple[bytes, dict[str, str]]:
    body = webhook_body(request_id, request_id, True, {"video": {"url": "https://x/v.mp4"}}, None)
    return body, signer.headers(request_id, "user-1", body)


@pytest.fixture
def batch_id(sqlite_engine: Engine) -> str:
    with session_factory(sqlite_engine)() as session:
        return mixed_batch(session, items=10).batch.id


# ----------------------------------------------------------------------------- digits, origins


def test_odd_digits_in_queries_and_headers_are_ignored_or_refused(
    sqlite_engine: Engine, output_dir: Path, batch_id: str
) -> None:
    """``"²".isdigit()`` is True and ``int("²")`` raises: each of these was an internal error."""
    signer = WebhookSigner()
    app = _app(sqlite_engine, settings_for(sqlite_engine, output_dir), keys=_keys(signer))

    async def main() -> list[httpx.Response]:
        async with _client(app) as client:
            body, headers = _delivery(signer)
            stamp = [(k.encode(), v.encode()) for k, v in headers.items() if k != "X-Fal-Webhook-Timestamp"]
            stamp.append((b"X-Fal-Webhook-Timestamp", "²".encode("latin-1")))  # as a raw socket sends it
            return [
                await client.get("/?page=²", headers=HTML),
                await client.get(f"/batches/{batch_id}?after=².0.abc", headers=HTML),
                await client.get(f"/batches/{batch_id}?before=1.².abc", headers=HTML),
                await client.post("/webhooks/fal?job_id=nojob&attempt=²", content=body, headers=headers),
                await client.post("/webhooks/fal?job_id=nojob&attempt=1", content=body, headers=stamp),
            ]

    page, after, before, attempt, stamp = asyncio.run(main())
    assert (page.status_code, after.status_code, before.status_code) == (200, 200, 200)
    assert attempt.status_code == 403  # no attempt read, so no token of ours can match: refused
    assert stamp.status_code == 401
    assert stamp.json()["error"] == "the timestamp is not unix seconds"
    assert app.state.counts.rejected == 2  # counted, as every rejection is


def test_a_content_length_of_other_digits_is_not_a_crash(sqlite_engine: Engine, output_dir: Path) -> None:
    """Sent raw: an HTTP client would not send it, an attacker's socket would."""
    app = _app(sqlite_engine, settings_for(sqlite_engine, output_dir))
    answer: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        answer.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/webhooks/fal",
        "raw_path": b"/webhooks/fal",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8788"), (b"content-length", b"\xb2")],
        "client": LOOPBACK,
        "server": ("127.0.0.1", 8788),
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert answer[0]["status"] == 401  # on to the signature check, which it fails


@pytest.mark.parametrize(
    "headers",
    [
        {"host": "dash.example.com", "origin": "http://["},
        {"host": "dash.example.com", "referer": "http://[oops/"},
        {"host": "dash.example.com", "origin": "http://[::1"},
    ],
)
def test_an_unparsable_origin_is_not_the_same_origin(headers: dict[str, str]) -> None:
    assert same_origin({"type": "http"}, Headers(headers)) is False


def test_unparsable_origins_are_refused_not_crashed_on(
    sqlite_engine: Engine, output_dir: Path, batch_id: str
) -> None:
    app = _app(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))
    cookie = {"Cookie": f"{cookie_name(app)}={cookie_value(app)}"}

    async def main() -> list[httpx.Response]:
        async with _client(app, REMOTE, "dash.example.com") as client:
            return [
                await client.post("/login", data={"token": TOKEN}, headers={"Origin": "http://["}),
                await client.post(
                    f"/batches/{batch_id}/pause", headers={**cookie, "Referer": "http://[oops/"}
                ),
            ]

    for answer in asyncio.run(main()):
        assert answer.status_code == 403
        assert "Origin/Referer" in answer.text
        assert cookie_name(app) not in answer.cookies


# ----------------------------------------------------------------------------- token guessing


class VirtualTime:
    """The gate's clock and sleep, in virtual time: a sleep ends only when the test moves the
    clock past its end (:meth:`advance`); nothing waits for real time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.now + seconds, woken))
        await woken

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [entry for entry in self.sleepers if entry[0] <= self.now]
        self.sleepers = [entry for entry in self.sleepers if entry[0] > self.now]
        for _, woken in due:
            woken.set_result(None)
        await settle()


async def settle() -> None:
    """Let every task run until it waits (the app runs in this loop: no thread, no socket)."""
    for _ in range(200):
        await asyncio.sleep(0)


@pytest.fixture
def virtual_time(monkeypatch: pytest.MonkeyPatch) -> tuple[VirtualTime, list[float]]:
    """The virtual time, and the (virtual) moment of every token comparison made."""
    fake, checks = VirtualTime(), []
    compare = web.auth.token_matches

    def noted(given: str, token: str) -> bool:
        checks.append(fake.now)
        return compare(given, token)

    monkeypatch.setattr(web.auth, "token_matches", noted)
    return fake, checks


def test_guesses_sent_at_once_are_checked_one_a_second_in_all(
    sqlite_engine: Engine, output_dir: Path, virtual_time: tuple[VirtualTime, list[float]]
) -> None:
    """Bearer headers and the login form share one pace: of guesses that all arrive at once,
    one is compared, then the next only a delay later, and so on."""
    fake, checks = virtual_time
    gate = TokenGate(TOKEN, clock=fake.clock, sleep=fake.sleep)
    app = _app(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN), gate=gate)

    async def main() -> list[httpx.Response]:
        async with _client(app, REMOTE, "dash.example.com") as client:
            bearer = [
                client.get("/metrics", headers={"Authorization": f"Bearer guess-{i:02d}"}) for i in range(12)
            ]
            form = [
                client.post("/login", data={"token": f"form-{i}"}, headers={**HTML, "Origin": REMOTE_ORIGIN})
                for i in range(6)
            ]
            guesses = [asyncio.ensure_future(g) for g in (*bearer, *form)]
            await settle()
            assert len(checks) == 1
            await fake.advance(gate.delay / 2)
            assert len(checks) == 1
            for compared in range(2, 19):
                await fake.advance(gate.delay / 2 if compared == 2 else gate.delay)
                assert len(checks) == compared
            await fake.advance(gate.delay)
            return await asyncio.gather(*guesses)

    answers = asyncio.run(main())
    assert [a.status_code for a in answers] == [401] * 18
    assert checks == [gate.delay * n for n in range(18)]


def test_a_wrong_cookie_takes_its_turn_and_no_credential_never_waits(
    sqlite_engine: Engine, output_dir: Path, virtual_time: tuple[VirtualTime, list[float]]
) -> None:
    fake, checks = virtual_time
    gate = TokenGate(TOKEN, clock=fake.clock, sleep=fake.sleep)
    app = _app(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN), gate=gate)
    stale = {"Cookie": f"{cookie_name(app)}=stale"}

    async def main() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        async with _client(app, REMOTE, "dash.example.com") as client:
            # Refused by the middleware itself, in this loop: answered before any time passes.
            refused = [
                *(asyncio.ensure_future(client.get("/metrics")) for _ in range(10)),
                *(asyncio.ensure_future(client.get("/", headers=HTML)) for _ in range(5)),
            ]
            await settle()
            assert all(task.done() for task in refused)
            # Served on threads: awaited (SAFETY only turns a wrongful virtual sleep into a failure).
            served = [
                await asyncio.wait_for(client.get("/login", headers=HTML), SAFETY),
                await asyncio.wait_for(client.get("/static/dashboard.css", headers=stale), SAFETY),
            ]
            assert fake.sleepers == []
            wrong = [asyncio.ensure_future(client.get("/metrics", headers=stale)) for _ in range(2)]
            await settle()
            right = asyncio.ensure_future(
                client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            )
            await settle()
            assert not any(task.done() for task in wrong)  # held back
            await fake.advance(gate.delay)
            assert [task.done() for task in wrong] == [True, False]  # one after the other
            assert checks == []  # the right token waits for the wrong cookies' turns to end
            await fake.advance(gate.delay)
            return [task.result() for task in refused] + served, await wrong[1], await right

    bare, wrong, right = asyncio.run(main())
    assert [a.status_code for a in bare] == [401] * 10 + [303] * 5 + [200, 200]
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert checks == [2 * gate.delay]


def test_another_dashboards_cookie_is_no_guess(
    sqlite_engine: Engine, output_dir: Path, virtual_time: tuple[VirtualTime, list[float]]
) -> None:
    """A browser logged into a second dashboard on this host (another port, another token) sends
    its cookie here too: cookies are scoped by host, not port. It was taken for a wrong guess,
    paced a second each, and a right bearer token (a /metrics scrape) waited behind them. It is
    no credential here: answered at once, as no cookie is, and the pace stays untouched."""
    fake, checks = virtual_time
    other = "other-dash-token-5e9b13d0aa"
    theirs_app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=other))
    browser = sync_client(theirs_app, host="127.0.0.1:8789")
    login = browser.post("/login", data={"token": other}, headers={**HTML, "Origin": "http://127.0.0.1:8789"})
    assert login.status_code == 303
    theirs = {"Cookie": login.headers["set-cookie"].split(";")[0]}
    checks.clear()
    gate = TokenGate(TOKEN, clock=fake.clock, sleep=fake.sleep)
    app = _app(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN), gate=gate)
    # The first request carrying a login cookie reads the key of this dashboard's cookie name
    # from the database (on a thread), once per process: done here, as a running server has.
    mine = cookie_name(app)
    assert mine not in theirs["Cookie"]

    async def main() -> tuple[list[httpx.Response], httpx.Response]:
        async with _client(app) as client:
            tabs = [
                *(asyncio.ensure_future(client.get("/", headers={**HTML, **theirs})) for _ in range(5)),
                *(asyncio.ensure_future(client.get("/metrics", headers=theirs)) for _ in range(5)),
            ]
            await settle()
            assert all(task.done() for task in tabs)  # no virtual time passed: nothing waited
            assert fake.sleepers == []
            scrape = asyncio.ensure_future(
                client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            )
            await settle()
            assert checks == [0.0]  # the right token is checked at once
            return [task.result() for task in tabs], await asyncio.wait_for(scrape, SAFETY)

    tabs, scrape = asyncio.run(main())
    assert [a.status_code for a in tabs] == [303] * 5 + [401] * 5
    assert scrape.status_code == 200
    assert fake.sleepers == []


# ----------------------------------------------------------------------------- the token setting


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.usefixtures("fresh_settings")
def test_an_empty_token_is_no_token(
    sqlite_engine: Engine, output_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_SERVE_TOKEN", "")  # what docker-compose passes when none is set
    monkeypatch.setenv("WANBATCH_DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(output_dir))
    settings = get_settings()
    assert settings.serve_token is None
    app = _app(sqlite_engine, settings)

    async def main() -> httpx.Response:
        async with _client(app) as client:
            return await client.post(
                "/login", data={"token": ""}, headers={**HTML, "Origin": "http://127.0.0.1:8788"}
            )

    login = asyncio.run(main())
    assert login.status_code == 403
    assert "WANBATCH_SERVE_TOKEN is not set" in login.text
    assert cookie_name(app) not in login.cookies


# ----------------------------------------------------------------------------- a locked database


@pytest.fixture
def quick_lock_engine(
    tmp_path: Path, _sqlite_template: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Engine]:
    """A database whose connections give up on a lock after 50 ms, not 30 s."""
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 50)
    path = tmp_path / "locked.db"
    shutil.copyfile(_sqlite_template, path)
    engine = make_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


def test_a_locked_database_is_a_503_and_one_warning(
    quick_lock_engine: Engine, output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with session_factory(quick_lock_engine)() as session:
        batch_id = mixed_batch(session, items=10).batch.id
    signer = WebhookSigner()
    settings = settings_for(quick_lock_engine, output_dir, token=TOKEN)
    app = _app(quick_lock_engine, settings, keys=_keys(signer))
    assert quick_lock_engine.url.database is not None
    locker = sqlite3.connect(quick_lock_engine.url.database, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    async def main() -> list[httpx.Response]:
        async with _client(app) as client:
            body, headers = _delivery(signer)
            return [
                await client.post("/webhooks/fal?job_id=nojob&attempt=1", content=body, headers=headers),
                await client.post(f"/batches/{batch_id}/pause", headers={**bearer, **JSON}),
                await client.post(f"/batches/{batch_id}/cancel", headers={**bearer, **HTML}),
            ]

    try:
        with caplog.at_level(logging.WARNING):
            hook, paused, cancelled = asyncio.run(main())
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert hook.status_code == 503  # fal delivers it again
    assert hook.json() == {"ok": False, "error": hook.json()["error"]}
    assert "database is unavailable" in hook.json()["error"]
    assert app.state.counts.rejected == 1
    assert paused.status_code == 503  # a script's action: one JSON object, as its every answer
    assert paused.headers["content-type"].startswith("application/json")
    assert paused.json() == {"ok": False, "error": DATABASE_UNAVAILABLE}
    assert cancelled.status_code == 503
    assert "database is unavailable" in cancelled.text
    assert "<html" in cancelled.text
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 3
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in warnings)
    assert all("database is locked" in r.getMessage() for r in warnings)


def test_healthz_says_which_database_it_serves_or_that_it_cannot_tell(
    quick_lock_engine: Engine, output_dir: Path
) -> None:
    """``wanbatch doctor`` compares ``database`` with its own (a receiver of another database
    refuses every delivery); a locked database is said, in words that name neither its file nor
    its host, never waited on for long, and never an internal error."""
    signer = WebhookSigner()
    app = _app(quick_lock_engine, settings_for(quick_lock_engine, output_dir), keys=_keys(signer))
    assert quick_lock_engine.url.database is not None
    locker = sqlite3.connect(quick_lock_engine.url.database, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")

    async def healthz() -> httpx.Response:
        async with _client(app, peer=REMOTE) as client:
            return await client.get("/healthz")

    try:
        locked = asyncio.run(healthz())
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert locked.status_code == 200
    assert (locked.json()["database"], locked.json()["database_error"]) == (None, DATABASE_UNAVAILABLE)
    answer = asyncio.run(healthz()).json()
    assert answer["database"] == database_fingerprint(webhook_secret(quick_lock_engine))
    assert answer["database_error"] is None
    assert answer["can_verify_signatures"] is True


# ----------------------------------------------------------------------------- a flood of deliveries


class StuckKeys(JwksKeys):
    """Keys whose every verification blocks until the test lets it go, counting how many at once."""

    def __init__(self) -> None:
        super().__init__("http://unused.test/")
        self.lock = threading.Lock()
        self.inside = self.most = self.finished = 0
        self.full = threading.Event()
        self.release = threading.Event()

    def verify(self, message: bytes, signature: bytes) -> bool:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            if self.inside >= RECEIVER_THREADS:
                self.full.set()
        self.release.wait(SAFETY)
        with self.lock:
            self.inside -= 1
            self.finished += 1
        return False


def test_a_flood_of_deliveries_leaves_the_dashboard_its_threads(
    sqlite_engine: Engine, output_dir: Path, batch_id: str
) -> None:
    """More deliveries than Starlette's default thread pool (40) hang in verification: the
    receiver runs at most RECEIVER_THREADS of them at once, and the dashboard's pages, which run
    on the default pool, still answer meanwhile."""
    keys = StuckKeys()
    app = _app(sqlite_engine, settings_for(sqlite_engine, output_dir), keys=keys)
    headers = {
        "X-Fal-Webhook-Request-Id": "r",
        "X-Fal-Webhook-User-Id": "u",
        "X-Fal-Webhook-Timestamp": str(int(time.time())),
        "X-Fal-Webhook-Signature": "ab" * 64,
    }

    async def main() -> tuple[httpx.Response, int, list[httpx.Response]]:
        async with _client(app) as client:
            flood = [
                asyncio.ensure_future(client.post("/webhooks/fal", content=b"{}", headers=headers))
                for _ in range(48)
            ]
            try:
                for _ in range(int(SAFETY / 0.005)):
                    if keys.full.is_set():
                        break
                    await asyncio.sleep(0.005)
                page = await client.get("/", headers=HTML)
                finished_before_the_page = keys.finished
            finally:
                keys.release.set()
            return page, finished_before_the_page, await asyncio.gather(*flood)

    page, finished, answers = asyncio.run(main())
    assert page.status_code == 200
    assert finished == 0  # the page did not wait for the deliveries
    assert keys.most == RECEIVER_THREADS
    assert {a.status_code for a in answers} == {401}
