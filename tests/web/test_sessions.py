"""The dashboard's login sessions (:mod:`web.auth`): each login its own value, signed, carrying
its issue time; refused once 30 days old, once logged out (by any ``serve`` of the database), or
once changed by a single character.

The value was one fixed HMAC of the token: every login gave the same value, ``POST /logout``
only asked the browser to forget it, and a copy kept (a shared machine, a proxy's log) read and
acted for ever, until the token itself changed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from starlette.testclient import TestClient

from jobs import db, store
from jobs.db import session_factory
from jobs.models import DashboardSessionRevocation, utcnow
from tests.web.web_helpers import HTML, JSON, REMOTE, TOKEN, app_for, client, mixed_batch, settings_for
from web.app import create_app
from web.auth import SESSION_MAX_AGE, TokenGate, cookie_secret, session_cookie

HOST = "dash.example.com"
ORIGIN = f"http://{HOST}"


class Wall:
    """A wall clock the test moves (seconds since the epoch)."""

    def __init__(self, now: float = 1_900_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def batch_id(sqlite_engine: Engine) -> str:
    with session_factory(sqlite_engine)() as session:
        return mixed_batch(session, items=10).batch.id


def _browser(engine: Engine, output_dir: Path, *, wall: Wall | None = None, token: str = TOKEN) -> TestClient:
    settings = settings_for(engine, output_dir, token=token)
    app_for(engine, settings)  # opens the settings' engine for the actions
    gate = TokenGate(token, wall_clock=wall) if wall is not None else TokenGate(token)
    return client(create_app(settings, engine=engine, gate=gate), peer=REMOTE, host=HOST)


def _log_in(browser: TestClient, token: str = TOKEN) -> dict[str, str]:
    """Log in through the form: the ``Cookie`` header the browser then sends."""
    answer = browser.post("/login", data={"token": token, "next": "/"}, headers={**HTML, "Origin": ORIGIN})
    assert answer.status_code == 303, answer.text
    browser.cookies.clear()  # the test sends the cookie itself, as a copied one would be
    return {"Cookie": answer.headers["set-cookie"].split(";")[0]}


def _reads(browser: TestClient, cookie: dict[str, str]) -> int:
    return browser.get("/", headers={**HTML, **cookie}).status_code


def _pause(browser: TestClient, cookie: dict[str, str], batch_id: str) -> int:
    return browser.post(
        f"/batches/{batch_id}/pause", headers={**JSON, **cookie, "Origin": ORIGIN}
    ).status_code


def _paused(engine: Engine, batch_id: str) -> bool:
    with session_factory(engine)() as session:
        return store.get_batch(session, batch_id).paused_by_user


def test_two_logins_give_two_values_each_good(sqlite_engine: Engine, output_dir: Path) -> None:
    browser = _browser(sqlite_engine, output_dir)
    first, second = _log_in(browser), _log_in(browser)
    assert first != second
    assert first["Cookie"].split("=")[0] == second["Cookie"].split("=")[0]  # one name, as before
    assert TOKEN not in first["Cookie"] + second["Cookie"]
    assert _reads(browser, first) == 200
    assert _reads(browser, second) == 200


def test_a_logged_out_value_is_refused_for_reading_and_acting(
    sqlite_engine: Engine, output_dir: Path, batch_id: str
) -> None:
    browser = _browser(sqlite_engine, output_dir)
    kept, other = _log_in(browser), _log_in(browser)
    out = browser.post("/logout", headers={**HTML, **kept, "Origin": ORIGIN})
    assert out.status_code == 303
    assert f'{kept["Cookie"].split("=")[0]}=""' in out.headers["set-cookie"]
    # The copy kept after the logout is no credential any more: pages, /metrics, actions.
    page = browser.get("/", headers={**HTML, **kept})
    assert page.status_code == 303
    assert page.headers["location"].startswith("/login")
    assert browser.get("/metrics", headers=kept).status_code == 401
    assert _pause(browser, kept, batch_id) == 401
    assert not _paused(sqlite_engine, batch_id)
    # Another login (another browser) is untouched, and a new login works again.
    assert _reads(browser, other) == 200
    assert _reads(browser, _log_in(browser)) == 200
    assert _pause(browser, other, batch_id) == 200
    assert _paused(sqlite_engine, batch_id)


def test_a_logout_holds_for_every_serve_of_the_database(engine: Engine, output_dir: Path) -> None:
    """Two ``serve`` processes of one database (behind one proxy): a logout through one ends the
    session for the other too — the revocation is in the database, not in a process."""
    one, two = _browser(engine, output_dir), _browser(engine, output_dir)
    cookie = _log_in(one)
    assert _reads(two, cookie) == 200
    assert one.post("/logout", headers={**HTML, **cookie, "Origin": ORIGIN}).status_code == 303
    assert _reads(two, cookie) == 303
    assert _reads(one, cookie) == 303
    # A second logout of the same value (a double click) is no error.
    assert two.post("/logout", headers={**HTML, **cookie, "Origin": ORIGIN}).status_code == 303


def test_a_value_older_than_30_days_is_refused(
    sqlite_engine: Engine, output_dir: Path, batch_id: str
) -> None:
    wall = Wall()
    browser = _browser(sqlite_engine, output_dir, wall=wall)
    cookie = _log_in(browser)
    wall.now += SESSION_MAX_AGE - 60
    assert _reads(browser, cookie) == 200
    wall.now += 61
    assert _reads(browser, cookie) == 303
    assert browser.get("/metrics", headers=cookie).status_code == 401
    assert _pause(browser, cookie, batch_id) == 401
    assert not _paused(sqlite_engine, batch_id)
    # Nor is a value issued ahead of the server's clock (beyond a few minutes of skew) good.
    ahead = _log_in(browser)
    wall.now -= 3600
    assert _reads(browser, ahead) == 303


def test_a_tampered_value_is_refused(sqlite_engine: Engine, output_dir: Path) -> None:
    browser = _browser(sqlite_engine, output_dir)
    name, value = _log_in(browser)["Cookie"].split("=", 1)
    issued, session_id, mac = value.split(".")
    flipped = "0" if mac[-1] != "0" else "1"
    for changed in (
        f"{issued}.{session_id}.{mac[:-1]}{flipped}",  # the signature
        f"{int(issued) + 10**6}.{session_id}.{mac}",  # a later issue time, to outlive the 30 days
        f"{issued}.{'0' * len(session_id)}.{mac}",  # another session id (one never logged out)
        f"{issued}.{session_id}",
        "",
    ):
        assert _reads(browser, {"Cookie": f"{name}={changed}"}) == 303, changed


def test_a_value_of_another_token_or_database_is_refused(sqlite_engine: Engine, output_dir: Path) -> None:
    """Changing the token still ends every session: the key the values are signed with is the
    token's (and the database's secret's), so even under the old name the old value fails."""
    cookie = _log_in(_browser(sqlite_engine, output_dir))
    renewed = _browser(sqlite_engine, output_dir, token="renewed-dash-token-0a9f3c")
    assert _reads(renewed, cookie) == 303
    old_value = cookie["Cookie"].split("=", 1)[1]
    named = {
        "Cookie": f"{session_cookie('renewed-dash-token-0a9f3c', cookie_secret(sqlite_engine))}={old_value}"
    }
    assert _reads(renewed, named) == 303


def test_a_value_of_before_the_upgrade_is_refused_and_never_waits(
    sqlite_engine: Engine, output_dir: Path
) -> None:
    """A browser still holding the fixed value of before (an HMAC of the token, under the same
    name) is sent to log in again, at once: it is no guess to pace a second for."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    settings = settings_for(sqlite_engine, output_dir, token=TOKEN)
    app_for(sqlite_engine, settings)
    browser = client(create_app(settings, engine=sqlite_engine, gate=TokenGate(TOKEN, sleep=sleep)))
    secret = cookie_secret(sqlite_engine)
    fixed = hmac.new(secret, b"wanbatch dashboard session v2\0" + TOKEN.encode(), hashlib.sha256).hexdigest()
    old = {"Cookie": f"{session_cookie(TOKEN, secret)}={fixed}"}
    assert browser.get("/", headers={**HTML, **old}).status_code == 303
    assert browser.get("/metrics", headers=old).status_code == 401
    assert waits == []
    # A value of the new shape that is wrong is still a guess, paced.
    assert (
        browser.get("/metrics", headers={"Cookie": f"{session_cookie(TOKEN, secret)}=1.2.3"}).status_code
        == 401
    )
    assert waits != []


def test_revocations_are_kept_until_their_session_would_have_expired(engine: Engine) -> None:
    """The table only grows by logouts, and a revocation goes once its session is past its 30
    days anyway (refused by its age then): the next logout clears those."""
    now = utcnow()
    later, earlier = now + timedelta(days=29), now - timedelta(seconds=1)
    with db.session_scope(engine) as session:
        store.revoke_dashboard_session(session, "a" * 32, expires_at=earlier, now=now)
        store.revoke_dashboard_session(session, "b" * 32, expires_at=later, now=now)
        store.revoke_dashboard_session(session, "b" * 32, expires_at=later, now=now)  # twice: no error
    with db.read_scope(engine) as session:
        assert store.dashboard_session_revoked(session, "b" * 32)
        assert not store.dashboard_session_revoked(session, "c" * 32)
        kept = session.execute(select(DashboardSessionRevocation.session_id)).scalars().all()
        assert kept == ["b" * 32]  # "a" was past its time: cleared by the next logout


def test_a_cookie_checked_on_a_schema_downgraded_under_serve_names_the_schema(
    tmp_path: Path, output_dir: Path
) -> None:
    """``alembic downgrade`` one step under a running serve drops the sessions' table: a
    logged-in browser was told "the database is unavailable … try again in a moment" on every
    page and could not log out, while the token (Bearer) read on. The schema is named, as the
    pages name it, with what to do."""
    from jobs.db import SCHEMA_HEAD, downgrade, make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'd.db'}")
    try:
        migrate(engine)
        browser = _browser(engine, output_dir)
        cookie = _log_in(browser)
        assert _reads(browser, cookie) == 200
        downgrade(engine, "0039")
        for answer in (
            browser.get("/", headers={**HTML, **cookie}),
            browser.post("/logout", headers={**HTML, **cookie, "Origin": ORIGIN}),
        ):
            assert answer.status_code == 503, answer.text
            assert f"the database is at schema 0039, older than this wanbatch's {SCHEMA_HEAD}" in answer.text
            assert "try again in a moment" not in answer.text
    finally:
        engine.dispose()


def test_logout_on_a_serve_whose_database_role_cannot_write_deletes_the_cookie(
    new_pg_database: Callable[[], str], output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A serve whose role may only read (the heartbeat says so and serves on): the login
    worked only once the cookie's secret existed, and it inserted it again at every start (a
    traceback for a role that may not write); a logout, which records the session's end, was a
    500 with a traceback and kept the browser's cookie. Now the secret already made is only
    read, and a logout that cannot be recorded still deletes the cookie, with one warning."""
    import logging
    import secrets as token_bits

    from sqlalchemy import text

    from jobs.db import make_engine, migrate

    url = new_pg_database()
    owner = make_engine(url)
    role = f"ro_{token_bits.token_hex(4)}"
    try:
        migrate(owner)
        cookie_secret(owner)  # made by an earlier serve that could write
        with owner.begin() as conn:
            conn.execute(text(f"CREATE ROLE {role} LOGIN"))
            conn.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"))
        reader = make_engine(owner.url.set(username=role).render_as_string(hide_password=False))
        try:
            browser = _browser(reader, output_dir)
            cookie = _log_in(browser)
            assert _reads(browser, cookie) == 200
            with caplog.at_level(logging.WARNING):
                answer = browser.post("/logout", headers={**HTML, **cookie, "Origin": ORIGIN})
            assert answer.status_code == 303, answer.text
            assert (
                "Max-Age=0" in answer.headers["set-cookie"]
                or "expires=" in answer.headers["set-cookie"].lower()
            )
            warned = [r for r in caplog.records if r.__dict__.get("event") == "dashboard.logout_not_recorded"]
            assert len(warned) == 1
            assert warned[0].exc_info is None
        finally:
            reader.dispose()
    finally:
        with owner.begin() as conn:
            conn.execute(text(f"REASSIGN OWNED BY {role} TO postgres"))
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        owner.dispose()
