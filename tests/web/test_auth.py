"""Who may read the dashboard and who may act on it (:mod:`web.auth`), through the real app.

The webhook receiver and ``/healthz`` never need the token; every other path needs it
from every client, loopback included, once it is configured (without one: loopback clients
read, nobody else); actions need it always (read-only without one configured); a logged-in
browser's actions must come from the dashboard's own origin.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from starlette.testclient import TestClient

from jobs import store
from jobs.db import make_engine, session_factory
from tests.ports import unused_port
from tests.web.web_helpers import (
    FAL_KEY,
    HTML,
    JSON,
    LOOPBACK,
    REMOTE,
    TOKEN,
    app_for,
    client,
    cookie_name,
    cookie_value,
    mixed_batch,
    settings_for,
)
from web.app import create_app
from web.auth import (
    ForwardedHeaders,
    SessionClaim,
    TokenGate,
    cookie_secret,
    read_session,
    safe_next,
    session_cookie,
    session_key,
    session_value,
    trusted_peer,
)


@pytest.fixture
def batch_id(sqlite_engine: Engine) -> str:
    with session_factory(sqlite_engine)() as session:
        return mixed_batch(session, items=10).batch.id


def _paused(engine: Engine, batch_id: str) -> bool:
    with session_factory(engine)() as session:
        return store.get_batch(session, batch_id).paused_by_user


def test_without_a_token_loopback_reads_and_nobody_acts(
    sqlite_engine: Engine, output_dir: Path, batch_id: str
) -> None:
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    local = client(app)
    page = local.get("/", headers=HTML)
    assert page.status_code == 200
    assert "mixed" in page.text
    assert "read-only" in page.text
    assert local.get(f"/batches/{batch_id}", headers=HTML).status_code == 200
    assert local.get("/metrics").status_code == 200
    refused = local.post(f"/batches/{batch_id}/pause", headers={**HTML, "Origin": "http://127.0.0.1:8788"})
    assert refused.status_code == 403
    assert "set WANBATCH_SERVE_TOKEN" in refused.text
    assert not _paused(sqlite_engine, batch_id)
    # The batch page says so where the buttons are, and disables them.
    batch_page = local.get(f"/batches/{batch_id}", headers=HTML).text
    assert "disabled" in batch_page
    assert "WANBATCH_SERVE_TOKEN" in batch_page


def test_a_refused_action_answers_json_to_a_script(
    sqlite_engine: Engine, output_dir: Path, batch_id: str
) -> None:
    """The README: an action answers one JSON object, a refusal `{"ok": false, "error": …}`.
    The token's refusals (403 read-only, 401 no token, 403 cross-origin) were plain text."""
    read_only = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir)))
    refused = read_only.post(f"/batches/{batch_id}/pause", headers=JSON)
    assert refused.status_code == 403
    assert refused.headers["content-type"].startswith("application/json")
    assert refused.json()["ok"] is False
    assert "set WANBATCH_SERVE_TOKEN" in refused.json()["error"]

    guarded = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN)))
    no_token = guarded.post(f"/batches/{batch_id}/pause")  # curl's default Accept: */*
    assert no_token.status_code == 401
    assert no_token.json()["ok"] is False
    assert no_token.headers["www-authenticate"] == 'Bearer realm="wanbatch"'
    cookie = {"Cookie": f"{cookie_name(guarded)}={cookie_value(guarded)}"}
    cross = guarded.post(f"/batches/{batch_id}/pause", headers={**cookie, "Origin": "https://evil.example"})
    assert cross.status_code == 403
    assert cross.json()["ok"] is False
    assert not _paused(sqlite_engine, batch_id)
    # A browser's form (HTML) still gets the page text, and pages are not actions.
    assert (
        read_only.post(f"/batches/{batch_id}/pause", headers=HTML)
        .headers["content-type"]
        .startswith("text/plain")
    )


def test_without_a_token_other_hosts_get_nothing_but_the_receiver(
    sqlite_engine: Engine, output_dir: Path, batch_id: str
) -> None:
    # /healthz fetches fal's keys when it has none: from a closed loopback port, not the internet.
    keys_nowhere = f"http://127.0.0.1:{unused_port()}/jwks.json"
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, webhook_jwks_url=keys_nowhere))
    remote = client(app, peer=REMOTE, host="dash.example.com")
    for path in ("/", f"/batches/{batch_id}", "/metrics", "/login", "/static/dashboard.css"):
        answer = remote.get(path, headers=HTML)
        assert answer.status_code == 403, path
        assert "loopback clients only" in answer.text
    assert remote.post(f"/batches/{batch_id}/pause").status_code == 403
    health = remote.get("/healthz")
    assert health.status_code == 200
    assert health.json()["ok"] is True
    assert health.json()["can_verify_signatures"] is False  # it says so, to anyone
    # The receiver answers for itself (a bad signature is its 4xx, never the dashboard's 403).
    hook = remote.post("/webhooks/fal?job_id=x&attempt=1", content=b"{}")
    assert hook.status_code in (400, 401)
    assert "ok" in hook.json()


@pytest.mark.parametrize(
    ("peer", "headers"),
    [
        (LOOPBACK, {"X-Forwarded-For": "198.51.100.4"}),  # a local reverse proxy passing a remote client on
        (LOOPBACK, {"Forwarded": "for=198.51.100.4"}),
        (LOOPBACK, {"Host": "attacker.example:8788"}),  # DNS rebinding: a foreign name pointed at 127.0.0.1
        (("10.0.0.5", 4000), {}),  # a private address is not loopback
    ],
)
def test_loopback_means_this_machine_by_a_loopback_name(
    sqlite_engine: Engine, output_dir: Path, peer: tuple[str, int], headers: dict[str, str]
) -> None:
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    assert client(app, peer=peer).get("/", headers={**HTML, **headers}).status_code == 403


@pytest.mark.parametrize("host", ["localhost:8788", "[::1]:8788", "127.0.0.2"])
def test_loopback_names(sqlite_engine: Engine, output_dir: Path, host: str) -> None:
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    peer = ("::1", 4000) if "::1" in host else ("::ffff:127.0.0.1", 4000) if "2" in host else LOOPBACK
    assert client(app, peer=peer, host=host).get("/", headers=HTML).status_code == 200


def test_with_a_token_remote_clients_log_in_and_act(
    sqlite_engine: Engine, output_dir: Path, batch_id: str
) -> None:
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))
    origin = "http://dash.example.com"
    remote = client(app, peer=REMOTE, host="dash.example.com")
    # No token: browsers are sent to the login form, other clients get 401.
    first = remote.get(f"/batches/{batch_id}?state=failed", headers=HTML)
    assert first.status_code == 303
    assert first.headers["location"] == f"/login?next=%2Fbatches%2F{batch_id}%3Fstate%3Dfailed"
    assert remote.get("/metrics").status_code == 401
    assert remote.get("/", headers=JSON).headers["www-authenticate"].startswith("Bearer")
    assert remote.get("/login", headers=HTML).status_code == 200
    # A wrong token is refused (after a pause) and sets no cookie.
    wrong = remote.post("/login", data={"token": "guess", "next": "/"}, headers={**HTML, "Origin": origin})
    assert wrong.status_code == 401
    assert cookie_name(remote) not in wrong.cookies
    assert "not the token" in wrong.text
    # The right one: a cookie holding an HMAC of the token, never the token.
    right = remote.post(
        "/login", data={"token": TOKEN, "next": f"/batches/{batch_id}"}, headers={**HTML, "Origin": origin}
    )
    assert right.status_code == 303
    assert right.headers["location"] == f"/batches/{batch_id}"
    cookie = right.cookies[cookie_name(remote)]
    assert cookie != cookie_value(remote)  # each login its own value
    assert TOKEN not in cookie
    set_cookie = right.headers["set-cookie"].lower()
    assert "httponly" in set_cookie
    assert "samesite=strict" in set_cookie
    remote.cookies.set(cookie_name(remote), cookie)
    page = remote.get(f"/batches/{batch_id}", headers=HTML)
    assert page.status_code == 200
    assert "signed in" in page.text
    assert TOKEN not in page.text
    assert FAL_KEY not in page.text
    # Acting needs the dashboard's own origin (CSRF): none, or another site's, is refused.
    assert remote.post(f"/batches/{batch_id}/pause", headers=HTML).status_code == 403
    evil = remote.post(f"/batches/{batch_id}/pause", headers={**HTML, "Origin": "https://evil.example"})
    assert evil.status_code == 403
    assert "Origin" in evil.text
    by_referer = remote.post(
        f"/batches/{batch_id}/pause", headers={**HTML, "Referer": "https://evil.example/dash.example.com/"}
    )
    assert by_referer.status_code == 403
    assert not _paused(sqlite_engine, batch_id)
    done = remote.post(f"/batches/{batch_id}/pause", headers={**HTML, "Origin": origin})
    assert done.status_code == 303
    assert done.headers["location"] == f"/batches/{batch_id}"
    assert _paused(sqlite_engine, batch_id)
    # Logging out forgets the cookie.
    out = remote.post("/logout", headers={**HTML, "Origin": origin})
    assert out.status_code == 303
    assert f'{cookie_name(remote)}=""' in out.headers["set-cookie"]


def test_a_bearer_token_needs_no_cookie_and_no_origin(
    sqlite_engine: Engine, output_dir: Path, batch_id: str
) -> None:
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))
    remote = client(app, peer=REMOTE, host="dash.example.com")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert remote.get("/metrics", headers=bearer).status_code == 200
    paused = remote.post(f"/batches/{batch_id}/pause", headers={**bearer, **JSON})
    assert paused.status_code == 200
    assert paused.json()["paused_by_user"] is True
    assert remote.get("/", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert remote.get("/", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401


def test_with_a_token_loopback_must_log_in_to_read_and_to_act(
    sqlite_engine: Engine, output_dir: Path, batch_id: str
) -> None:
    """Once a token is configured every client needs it, loopback included: a loopback browser
    is sent to the login form like any other, and reads once logged in (the cookie lasts)."""
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))
    local = client(app)
    first = local.get(f"/batches/{batch_id}", headers=HTML)
    assert first.status_code == 303
    assert first.headers["location"].startswith("/login?next=")
    assert local.get("/metrics").status_code == 401
    assert local.get("/login", headers=HTML).status_code == 200  # the form itself is open
    refused = local.post(f"/batches/{batch_id}/pause", headers={**HTML, "Origin": "http://127.0.0.1:8788"})
    assert refused.status_code == 401
    assert "log in at /login" in refused.text
    assert not _paused(sqlite_engine, batch_id)
    logged = local.post(
        "/login", data={"token": TOKEN, "next": "/"}, headers={**HTML, "Origin": "http://127.0.0.1:8788"}
    )
    assert logged.status_code == 303
    local.cookies.set(cookie_name(local), logged.cookies[cookie_name(local)])
    assert local.get(f"/batches/{batch_id}", headers=HTML).status_code == 200
    assert local.get("/metrics").status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1:8788", "localhost:8788", "127.0.0.1"])
def test_with_a_token_a_default_reverse_proxy_exposes_nothing(
    sqlite_engine: Engine, output_dir: Path, batch_id: str, host: str
) -> None:
    """nginx's default ``proxy_pass http://127.0.0.1:8788;`` (HAProxy without ``option
    forwardfor`` alike) connects from 127.0.0.1, sends ``Host: 127.0.0.1:8788`` and no
    forwarding header: every request it passes on looks like loopback. With a token set none of
    them may read without it (they used to read the dashboard, videos and /metrics)."""
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))
    proxied = client(app, peer=LOOPBACK, host=host)
    for path in ("/", f"/batches/{batch_id}", "/metrics", "/jobs/anything/video"):
        assert proxied.get(path, headers=JSON).status_code == 401, path
        assert proxied.get(path, headers=HTML).status_code == 303, path


def test_login_without_a_configured_token_says_so(sqlite_engine: Engine, output_dir: Path) -> None:
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    answer = client(app).post("/login", data={"token": "x"}, headers=HTML)
    assert answer.status_code == 403
    assert "WANBATCH_SERVE_TOKEN is not set" in answer.text


def test_cross_origin_login_is_refused(sqlite_engine: Engine, output_dir: Path) -> None:
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))
    answer = client(app).post("/login", data={"token": TOKEN}, headers={"Origin": "https://evil.example"})
    assert answer.status_code == 403
    assert cookie_name(app) not in answer.cookies


#: The token of a second dashboard on the same host (another `serve`, another port).
OTHER_TOKEN = "other-dash-token-5e9b13d0aa"


def _logged_in_cookie(
    browser: TestClient, origin: str, token: str, extra: dict[str, str] | None = None
) -> tuple[str, str, str]:
    """Log ``browser`` in with ``token``: the cookie's name and value, and its whole Set-Cookie."""
    headers = {**HTML, "Origin": origin, **(extra or {})}
    answer = browser.post("/login", data={"token": token, "next": "/"}, headers=headers)
    assert answer.status_code == 303, answer.text
    set_cookie = answer.headers["set-cookie"]
    name, _, value = set_cookie.split(";")[0].partition("=")
    return name, value, set_cookie


def _attributes(set_cookie: str) -> set[str]:
    """A Set-Cookie's attributes but its lifetime (``Max-Age``, ``Expires``)."""
    parts = (part.strip().lower() for part in set_cookie.split(";")[1:])
    return {part for part in parts if not part.startswith(("max-age", "expires"))}


def test_two_dashboards_on_one_host_keep_a_cookie_each(sqlite_engine: Engine, output_dir: Path) -> None:
    """Browsers scope cookies by host, not port: two ``serve`` on one host (each its own token)
    set one fixed cookie name, so logging into the second overwrote the first's cookie (and the
    first then took the second's for a wrong guess). Each dashboard's cookie is named its own."""
    first = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN)))
    second_app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=OTHER_TOKEN))
    second = client(second_app, host="127.0.0.1:8789")
    jar: dict[str, str] = {}  # the browser's: one per name, whatever the port
    for browser, origin, token in (
        (first, "http://127.0.0.1:8788", TOKEN),
        (second, "http://127.0.0.1:8789", OTHER_TOKEN),
    ):
        name, value, _ = _logged_in_cookie(browser, origin, token)
        assert name.startswith("wanbatch_session")
        assert token not in name
        assert token not in value
        jar[name] = value
    assert len(jar) == 2
    cookies = {"Cookie": "; ".join(f"{name}={value}" for name, value in jar.items())}
    for browser in (first, second):
        browser.cookies.clear()
        assert browser.get("/", headers={**HTML, **cookies}).status_code == 200
        assert browser.get("/metrics", headers=cookies).status_code == 200


def test_the_login_cookie_lasts_until_the_token_changes(sqlite_engine: Engine, output_dir: Path) -> None:
    """The README: a browser logs in once, "the cookie lasts" — but the cookie had no Max-Age, so
    closing the browser logged it out. It lasts 30 days; a new token still logs everyone out."""
    browser = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN)))
    name, value, set_cookie = _logged_in_cookie(browser, "http://127.0.0.1:8788", TOKEN)
    assert "max-age=2592000" in set_cookie.lower()
    cookie = {"Cookie": f"{name}={value}"}
    browser.cookies.clear()
    assert browser.get("/", headers={**HTML, **cookie}).status_code == 200
    renewed = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=OTHER_TOKEN)))
    assert renewed.get("/", headers={**HTML, **cookie}).status_code == 303
    # Under its own name too the old value is refused: the value is bound to the token.
    renamed = {"Cookie": f"{cookie_name(renewed, OTHER_TOKEN)}={value}"}
    assert renewed.get("/metrics", headers=renamed).status_code == 401


def test_logging_out_from_another_site_is_refused(sqlite_engine: Engine, output_dir: Path) -> None:
    """``POST /logout`` from another site's page (no credential needed) answered 303 and cleared
    the cookie: a CSRF logout. Its Origin is checked as the login's; the deletion then carries the
    attributes the cookie was set with (it said SameSite=lax, the cookie is Strict)."""
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))
    remote = client(app, peer=REMOTE, host="dash.example.com")
    for origin in ("http://evil.example", "null", "http://dash.example.com:8080"):
        evil = remote.post("/logout", headers={**HTML, "Origin": origin})
        assert evil.status_code == 403, origin
        assert "set-cookie" not in evil.headers
        assert "Origin/Referer" in evil.text
    https = {"X-Forwarded-Proto": "https"}
    name, value, set_cookie = _logged_in_cookie(remote, "http://dash.example.com", TOKEN, https)
    # The browser sends it back (the test client keeps a Secure cookie off plain http).
    mine = {"Cookie": f"{name}={value}"}
    out = remote.post("/logout", headers={**HTML, "Origin": "http://dash.example.com", **https, **mine})
    assert out.status_code == 303
    deleted = out.headers["set-cookie"]
    assert deleted.startswith(f'{name}=""')
    assert "max-age=0" in deleted.lower()
    assert _attributes(deleted) == _attributes(set_cookie)
    assert {"httponly", "samesite=strict", "path=/", "secure"} <= _attributes(deleted)


def test_safe_next_stays_on_this_site() -> None:
    assert safe_next("/batches/x?state=failed") == "/batches/x?state=failed"
    for bad in (None, "", "https://evil.example", "//evil.example/x", "/\\evil.example", "batches"):
        assert safe_next(bad) == "/"


def test_the_session_key_depends_on_the_token_and_the_secret() -> None:
    secret, other_secret = bytes(range(32)), bytes(32)
    key = session_key(TOKEN, secret)
    assert key == session_key(TOKEN, secret)  # the same after a restart
    assert key != session_key(TOKEN + "x", secret)  # a new token logs everyone out
    assert key != session_key(OTHER_TOKEN, secret)
    assert key != session_key(TOKEN, other_secret)  # never verifies under another secret
    value = session_value(key, issued=1_900_000_000, session_id="ab" * 16)
    assert read_session(key, value) == SessionClaim(1_900_000_000, "ab" * 16)
    for other in (session_key(OTHER_TOKEN, secret), session_key(TOKEN, other_secret)):
        assert read_session(other, value) is None
    # Not keyed by the token alone (an offline check of guesses).
    by_token = hmac.new(TOKEN.encode(), b"wanbatch dashboard session key v3\0", hashlib.sha256).digest()
    assert read_session(by_token, value) is None


def test_the_login_cookies_value_is_keyed_by_the_databases_secret(
    sqlite_engine: Engine, request: pytest.FixtureRequest, tmp_path: Path, output_dir: Path
) -> None:
    """Browsers send a host's cookies to every port of it: another web app on this host receives
    the login cookie. Its value was an HMAC keyed by the token alone, so whoever received it
    could test token guesses offline, at no pace, and a dashboard of another database with the
    same token took it. It is keyed by the database's secret too: it works on its own database
    (after a restart too), not on another's with the same token, and not after a new token."""
    other_path = tmp_path / "other.db"
    shutil.copyfile(request.getfixturevalue("_sqlite_template"), other_path)
    other_engine = make_engine(f"sqlite:///{other_path}")
    try:
        settings = settings_for(sqlite_engine, output_dir, token=TOKEN)
        browser = client(app_for(sqlite_engine, settings))
        name, value, _ = _logged_in_cookie(browser, "http://127.0.0.1:8788", TOKEN)
        assert read_session(session_key(TOKEN, cookie_secret(sqlite_engine)), value) is not None
        assert read_session(session_key(TOKEN, cookie_secret(other_engine)), value) is None
        browser.cookies.clear()
        restarted = client(app_for(sqlite_engine, settings))
        assert restarted.get("/", headers={**HTML, "Cookie": f"{name}={value}"}).status_code == 200
        # Another database's dashboard with the same token: the value is no credential there,
        # under that dashboard's own name either.
        elsewhere = client(app_for(other_engine, settings_for(other_engine, output_dir, token=TOKEN)))
        carried = {"Cookie": f"{cookie_name(elsewhere)}={value}"}
        assert elsewhere.get("/metrics", headers=carried).status_code == 401
        # A new token: another value (and name), the old one refused under the new name.
        renewed = client(app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=OTHER_TOKEN)))
        new_name, new_value, _ = _logged_in_cookie(renewed, "http://127.0.0.1:8788", OTHER_TOKEN)
        assert new_name != name
        assert new_value != value
        renewed.cookies.clear()
        assert renewed.get("/metrics", headers={"Cookie": f"{new_name}={value}"}).status_code == 401
    finally:
        other_engine.dispose()


FORGED = "/x%0AWARNING%20web.app:%20webhook%20accepted%0D%1B[2J"


@pytest.mark.parametrize("token", [None, TOKEN])
def test_a_refused_path_is_logged_on_one_line(
    sqlite_engine: Engine, output_dir: Path, caplog: pytest.LogCaptureFixture, token: str | None
) -> None:
    """The decoded path is the client's text: a ``%0A`` in it wrote a second, forged log line
    (``WARNING web.app: webhook accepted``). It is logged escaped, on the refusal's one line."""
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=token))
    remote = client(app, peer=REMOTE, host="dash.example.com")
    if token is not None:  # a logged-in browser's action from another site: refused and logged
        remote.cookies.set(cookie_name(remote), cookie_value(remote))
    with caplog.at_level(logging.WARNING, logger="web.auth"):
        if token is None:
            remote.get(FORGED, headers=HTML)
        else:
            remote.post(f"/batches{FORGED}/pause", headers={**HTML, "Origin": "https://evil.example"})
    (record,) = [r for r in caplog.records if r.name == "web.auth"]
    line = record.getMessage()
    assert not any(ch in line for ch in "\n\r\x1b")
    assert "x\\nWARNING web.app: webhook accepted\\x0d\\x1b[2J" in line


@pytest.mark.parametrize(
    ("headers", "secure"),
    [
        ({}, False),
        ({"X-Forwarded-Proto": "https"}, True),
        ({"X-Forwarded-Proto": "https, http"}, True),  # the first hop's, the browser's
        ({"Forwarded": 'for=198.51.100.4;proto="https";host=dash.example.com'}, True),
        ({"X-Forwarded-Proto": "http"}, False),
    ],
)
def test_the_login_cookie_is_secure_when_a_proxy_says_https(
    sqlite_engine: Engine, output_dir: Path, headers: dict[str, str], secure: bool
) -> None:
    """Over HTTPS behind a proxy that uvicorn does not trust (another container, a remote load
    balancer: uvicorn believes ``X-Forwarded-Proto`` from 127.0.0.1 only) the request's scheme
    is ``http``, and the cookie lacked ``Secure``. A proxy saying HTTPS is believed for it from
    anyone: ``Secure`` only narrows where the cookie goes."""
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))
    remote = client(app, peer=("172.18.0.1", 40000), host="dash.example.com")
    answer = remote.post(
        "/login", data={"token": TOKEN}, headers={**HTML, "Origin": "http://dash.example.com", **headers}
    )
    assert answer.status_code == 303
    assert ("; secure" in answer.headers["set-cookie"].lower()) is secure


#: What the README's nginx example sends: the browser's host and scheme, on a loopback connection
#: (``proxy_pass http://127.0.0.1:8788;`` keeps ``Host: 127.0.0.1:8788``), with the browser's
#: address in X-Forwarded-For (which hides the proxy's own from the app's routes).
PUBLIC = "http://wanbatch.example.test:8080"
VIA_PROXY = {
    "X-Forwarded-Host": "wanbatch.example.test:8080",
    "X-Forwarded-Proto": "http",
    "X-Forwarded-For": "198.51.100.23",
}


@pytest.fixture
def no_env_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)


@pytest.mark.parametrize(
    ("peer", "allow_ips", "forwarded"),
    [
        (LOOPBACK, None, VIA_PROXY),  # nginx on this host: trusted by default
        (("::1", 40000), None, VIA_PROXY),
        (("172.18.0.1", 40000), "172.18.0.0/16", VIA_PROXY),  # another container, named
        # The same, as a dual-stack listener (`serve --host ::`) reports IPv4 peers.
        (("::ffff:127.0.0.1", 40000), None, VIA_PROXY),
        (("::ffff:172.18.0.1", 40000), "172.18.0.0/16", VIA_PROXY),
        (("::ffff:172.18.0.1", 40000), "172.18.0.1", VIA_PROXY),
        # The port from X-Forwarded-Port, else the default one of the browser's scheme.
        (LOOPBACK, None, {"X-Forwarded-Host": "wanbatch.example.test", "X-Forwarded-Port": "8080"}),
    ],
)
def test_behind_a_trusted_proxy_its_forwarded_host_is_the_dashboards_origin(
    sqlite_engine: Engine,
    output_dir: Path,
    batch_id: str,
    no_env_proxies: None,
    peer: tuple[str, int],
    allow_ips: str | None,
    forwarded: dict[str, str],
) -> None:
    """Behind nginx as the README advised (``Host`` left at ``127.0.0.1:8788``), the browser's
    login and every action were refused 403 (Origin/Referer check): the Origin was compared
    with the ``Host`` only. A trusted proxy's ``X-Forwarded-Host`` names the host too."""
    extra = {"serve_forwarded_allow_ips": allow_ips} if allow_ips else {}
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN, **extra))
    proxied = client(app, peer=peer, host="127.0.0.1:8788")
    headers = {**HTML, **forwarded, "Origin": PUBLIC}
    login = proxied.post("/login", data={"token": TOKEN, "next": f"/batches/{batch_id}"}, headers=headers)
    assert login.status_code == 303, login.text
    proxied.cookies.set(cookie_name(proxied), login.cookies[cookie_name(proxied)])
    done = proxied.post(f"/batches/{batch_id}/pause", headers=headers)
    assert done.status_code == 303, done.text
    assert _paused(sqlite_engine, batch_id)
    # As the page's own Referer (no Origin) too.
    referred = {**HTML, **forwarded, "Referer": f"{PUBLIC}/batches/{batch_id}"}
    assert proxied.post(f"/batches/{batch_id}/resume", headers=referred).status_code == 303
    assert not _paused(sqlite_engine, batch_id)


@pytest.mark.parametrize("allow_ips", ["10.1.2.3", "10.1.2.0/24", "::ffff:10.1.2.3", "::ffff:10.1.2.0/120"])
def test_an_ipv4_mapped_peer_is_the_ipv4_proxy_it_is(allow_ips: str) -> None:
    """A dual-stack listener reports an IPv4 peer as ``::ffff:10.1.2.3``, and uvicorn's
    ProxyHeadersMiddleware never matched that against ``10.1.2.3`` or ``10.1.2.0/24``: behind
    such a proxy every request was the proxy's own (its address in every log line and
    per-client check, its X-Forwarded-Host ignored by the Origin check). Through the real
    middleware on a real ASGI scope, the mapped peer is trusted like the IPv4 one, in either
    spelling of the setting; an X-Forwarded-For entry a proxy writes mapped is matched too."""
    seen: list[tuple[Any, ...]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["client"], scope["scheme"], scope["state"]["via_trusted_proxy"]))

    def request(peer: str, forwarded_for: str) -> tuple[Any, ...]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/",
            "raw_path": b"/",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"10.1.2.4:8788"),
                (b"x-forwarded-for", forwarded_for.encode()),
                (b"x-forwarded-proto", b"https"),
            ],
            "client": (peer, 40000),
            "server": ("::ffff:10.1.2.4", 8788),
        }

        async def nothing() -> Any:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def ignored(message: Any) -> None:
            return None

        asyncio.run(ForwardedHeaders(app, allow_ips)(scope, nothing, ignored))
        return seen[-1]

    for peer in ("10.1.2.3", "::ffff:10.1.2.3"):
        assert request(peer, "198.51.100.23") == (("198.51.100.23", 0), "https", True), peer
        assert trusted_peer(allow_ips)(peer)  # the connection cap's exemption (web.connections)
        # A chain: the browser, then a proxy of ours that wrote its peer mapped.
        assert request(peer, "198.51.100.23, ::ffff:10.1.2.3")[0] == ("198.51.100.23", 0)
    for stranger in ("10.9.9.9", "::ffff:10.9.9.9", "2001:db8::1"):
        assert request(stranger, "198.51.100.23") == ((stranger, 40000), "http", False), stranger
        assert not trusted_peer(allow_ips)(stranger)


@pytest.mark.parametrize("peer", [REMOTE, ("172.18.0.1", 40000)])
def test_an_untrusted_clients_forwarded_host_is_ignored(
    sqlite_engine: Engine, output_dir: Path, batch_id: str, no_env_proxies: None, peer: tuple[str, int]
) -> None:
    """``X-Forwarded-Host`` is believed only from the proxies WANBATCH_SERVE_FORWARDED_ALLOW_IPS
    names (this host's loopback by default): from anyone else the Origin must name the Host."""
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))
    untrusted = client(app, peer=peer, host="127.0.0.1:8788")
    headers = {**HTML, **VIA_PROXY, "Origin": PUBLIC}
    login = untrusted.post("/login", data={"token": TOKEN}, headers=headers)
    assert login.status_code == 403
    assert cookie_name(untrusted) not in login.cookies
    assert "ignored" in login.text
    untrusted.cookies.set(cookie_name(untrusted), cookie_value(untrusted))
    refused = untrusted.post(f"/batches/{batch_id}/pause", headers=headers)
    assert refused.status_code == 403
    assert "WANBATCH_SERVE_FORWARDED_ALLOW_IPS" in refused.text
    assert not _paused(sqlite_engine, batch_id)


@pytest.mark.parametrize("allow_ips", [None, "*"])
@pytest.mark.parametrize(
    "forwarded",
    [{}, VIA_PROXY, {"X-Forwarded-Host": "127.0.0.1:8788"}],
    ids=["host-only", "forwarded-host", "forwarded-loopback"],
)
def test_a_foreign_origin_is_refused_through_any_proxy(
    sqlite_engine: Engine,
    output_dir: Path,
    batch_id: str,
    no_env_proxies: None,
    allow_ips: str | None,
    forwarded: dict[str, str],
) -> None:
    """Whatever a proxy or client forwards, and whoever is trusted (``*``: any peer), an Origin
    (or Referer) that is not the dashboard's — another site, another port, another scheme — is
    refused: the login and every action."""
    extra = {"serve_forwarded_allow_ips": allow_ips} if allow_ips else {}
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN, **extra))
    for peer in (LOOPBACK, REMOTE):
        browser = client(app, peer=peer, host="127.0.0.1:8788")
        for origin in (
            "https://evil.example",
            "http://wanbatch.example.test:8081",
            "https://wanbatch.example.test",
        ):
            headers = {**HTML, **forwarded, "Origin": origin}
            login = browser.post("/login", data={"token": TOKEN}, headers=headers)
            assert login.status_code == 403
            assert cookie_name(browser) not in login.cookies
            browser.cookies.set(cookie_name(browser), cookie_value(browser))
            refused = browser.post(f"/batches/{batch_id}/pause", headers=headers)
            assert refused.status_code == 403
            assert f"Origin {origin!r}" in refused.text  # the refusal names what it saw
            referred = {**HTML, **forwarded, "Referer": f"{origin}/batches/{batch_id}"}
            assert browser.post(f"/batches/{batch_id}/pause", headers=referred).status_code == 403
    assert not _paused(sqlite_engine, batch_id)


def test_the_refusal_says_what_was_seen_and_what_to_set(
    sqlite_engine: Engine,
    output_dir: Path,
    batch_id: str,
    no_env_proxies: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """nginx's default passes neither the browser's ``Host`` nor an ``X-Forwarded-Host`` on: the
    request cannot be told from a foreign page's, so it stays refused, with one line naming the
    Origin and Host seen and the proxy setting that fixes it."""
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))
    proxied = client(app, peer=LOOPBACK, host="127.0.0.1:8788")
    proxied.cookies.set(cookie_name(proxied), cookie_value(proxied))
    with caplog.at_level(logging.WARNING, logger="web.auth"):
        refused = proxied.post(f"/batches/{batch_id}/pause", headers={**HTML, "Origin": PUBLIC})
    assert refused.status_code == 403
    line = refused.text
    assert "\n" not in line
    assert "Origin 'http://wanbatch.example.test:8080'" in line
    assert "Host '127.0.0.1:8788'" in line
    assert "proxy_set_header Host $http_host;" in line
    assert "X-Forwarded-Host" in line
    assert any("cross-origin" in record.getMessage() for record in caplog.records)
    as_json = proxied.post(f"/batches/{batch_id}/pause", headers={**JSON, "Origin": PUBLIC})
    assert as_json.status_code == 403
    assert "proxy_set_header" in as_json.json()["error"]


#: A token that passes the 16-character rule but a person chose: a guesser's word list has it.
WEAK = "correct-horse-battery-staple"


def _names_it(answer: Any, name: str) -> bool:
    """Whether an answer names the cookie ``name`` anywhere: a header (a deletion) or the body."""
    return name in str(answer.headers) or name in answer.text


def test_a_caller_without_the_cookie_never_learns_its_name(sqlite_engine: Engine, output_dir: Path) -> None:
    """The review's proof: ``POST /logout`` (no credential, no Origin: curl) sent a deletion
    naming the cookie, ``wanbatch_session_`` and 8 hex of an HMAC keyed by the token alone: an
    offline check of token guesses (10,000 in 56 ms) past the one-a-second pace. A caller who
    does not send the cookie gets its name from no answer; and the name, keyed by the
    database's secret, tests no guess anyway."""
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=WEAK))
    name = cookie_name(app, WEAK)
    stranger = client(app, peer=REMOTE, host="dash.example.com")
    origin = {"Origin": "http://dash.example.com"}
    answers = [
        stranger.post("/logout"),
        stranger.post("/logout", headers={**HTML, **origin}),
        stranger.post("/logout", headers={**HTML, "Origin": "http://evil.example"}),
        stranger.post("/logout", headers={"Cookie": "wanbatch_session_00000000=x"}),
        stranger.post("/login", data={"token": "correct-horse-battery-stapler"}, headers={**HTML, **origin}),
        stranger.post("/login", data={"token": WEAK}, headers={**HTML, "Origin": "http://evil.example"}),
        stranger.get("/login", headers=HTML),
        stranger.get("/", headers=HTML),
        stranger.get("/", headers=JSON),
        stranger.get("/metrics"),
        stranger.post("/batches/x/pause", headers=JSON),
        stranger.post("/batches/x/pause", headers={**HTML, **origin}),
        stranger.get("/", headers={"Authorization": "Bearer nope"}),
    ]
    assert [a.status_code for a in answers] == [
        303,
        303,
        403,
        303,
        401,
        403,
        200,
        303,
        401,
        401,
        401,
        401,
        401,
    ]
    for answer in answers:
        assert not _names_it(answer, name), (answer.request.method, answer.request.url, answer.headers)
        assert "set-cookie" not in answer.headers
    # Offline: were the name an HMAC keyed by the token, this list would find it.
    parts = ["correct", "horse", "battery", "staple", "wanbatch", "dashboard", "token", "secret", "admin"]
    words = [f"{a}-{b}-{c}-{d}" for a in parts for b in parts for c in parts for d in parts]
    by_token = {
        "wanbatch_session_"
        + hmac.new(w.encode(), b"wanbatch dashboard cookie name v1", hashlib.sha256).hexdigest()[:8]
        for w in words
    }
    assert WEAK in words
    assert name not in by_token
    # Its own browser still gets the name (and the deletion, once it sends the cookie back).
    login = stranger.post("/login", data={"token": WEAK}, headers={**HTML, **origin})
    assert login.status_code == 303
    assert login.headers["set-cookie"].startswith(f"{name}=")
    out = stranger.post("/logout", headers={**HTML, **origin})
    assert out.headers["set-cookie"].startswith(f'{name}=""')


def test_the_cookies_name_is_keyed_by_the_databases_secret(sqlite_engine: Engine, output_dir: Path) -> None:
    """Two dashboards of one database: the same name for one token (and after a restart), another
    for another token; another database (another secret) names the same token's cookie apart."""
    settings = settings_for(sqlite_engine, output_dir, token=TOKEN)
    first, again = (
        cookie_name(app_for(sqlite_engine, settings)),
        cookie_name(app_for(sqlite_engine, settings)),
    )
    assert first == again
    assert first.startswith("wanbatch_session_")
    assert len(first) == len("wanbatch_session_") + 8
    other = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=OTHER_TOKEN))
    assert cookie_name(other, OTHER_TOKEN) != first
    secret = cookie_secret(sqlite_engine)
    assert session_cookie(TOKEN, secret) == first
    assert session_cookie(TOKEN, bytes(32)) != first


def test_a_cookie_of_before_its_value_was_keyed_is_no_credential_and_never_waits(
    sqlite_engine: Engine, output_dir: Path
) -> None:
    """A browser still holding a cookie of the earlier scheme (a value keyed by the token alone)
    is told to log in again, and never paced for it: under its old name it would have been a
    wrong cookie of this dashboard, holding every request of that browser (each page's refresh)
    and every other check back a second. Its name is another dashboard's now."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    settings = settings_for(sqlite_engine, output_dir, token=TOKEN)
    gate = TokenGate(TOKEN, sleep=sleep)
    app_for(sqlite_engine, settings)
    browser = client(create_app(settings, engine=sqlite_engine, gate=gate))
    secret = cookie_secret(sqlite_engine)
    named = hmac.new(secret, b"wanbatch dashboard cookie name v2\0" + TOKEN.encode(), hashlib.sha256)
    old_name = "wanbatch_session_" + named.hexdigest()[:8]
    old_value = hmac.new(TOKEN.encode(), b"wanbatch dashboard session v1", hashlib.sha256).hexdigest()
    old = {"Cookie": f"{old_name}={old_value}"}
    assert browser.get("/", headers={**HTML, **old}).status_code == 303
    assert browser.get("/metrics", headers=old).status_code == 401
    assert browser.get("/login", headers={**HTML, **old}).status_code == 200
    assert waits == []
    name, value, _ = _logged_in_cookie(browser, "http://127.0.0.1:8788", TOKEN)
    assert name != old_name
    browser.cookies.clear()
    both = {"Cookie": f"{old_name}={old_value}; {name}={value}"}
    assert browser.get("/metrics", headers=both).status_code == 200
    assert waits == []


def test_a_login_cookie_meeting_no_database_is_answered_503(
    sqlite_engine: Engine, output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cookie's name needs the database's secret, read by the first request that carries a
    login cookie: with no database to read it from, that request is told so (503, one line, one
    warning), not failed (500); requests with no cookie, or a bearer token, are untouched."""

    def unreachable() -> bytes:
        raise OperationalError("SELECT value FROM instance_secrets", {}, Exception("connection refused"))

    settings = settings_for(sqlite_engine, output_dir, token=TOKEN)
    app = create_app(settings, engine=sqlite_engine, gate=TokenGate(TOKEN, secret=unreachable))
    browser = client(app, peer=REMOTE, host="dash.example.com")
    with caplog.at_level(logging.WARNING, logger="web.auth"):
        carried = browser.get("/", headers={**HTML, "Cookie": "wanbatch_session_0123abcd=x"})
    assert carried.status_code == 503
    assert "database is unavailable" in carried.text
    assert [r.getMessage() for r in caplog.records if "cannot be checked" in r.getMessage()]
    assert browser.get("/", headers=HTML).status_code == 303
    assert browser.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert "set-cookie" not in browser.post("/logout").headers
