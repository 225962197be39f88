"""A reverse proxy that does not strip its prefix delivers fal's webhooks to
``/PREFIX/webhooks/fal``, where nothing listens.

Before: the dashboard's guard took such a POST for a page request, refused it 403 "(no token
configured)" and pointed the user at WANBATCH_SERVE_TOKEN; /healthz counted nothing. Now it is a
404 saying where the receiver listens, one warning line naming the prefix to strip, and counted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.web.web_helpers import REMOTE, app_for, client, settings_for
from web.connections import LOG_INTERVAL
from web.receiver import NOT_THE_RECEIVER


def test_a_webhook_under_an_unstripped_prefix_is_a_404_that_says_so(
    sqlite_engine: Engine, output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))  # no token: loopback only
    with client(app, peer=REMOTE) as remote, caplog.at_level(logging.WARNING):
        hook = remote.post("/wanbatch/webhooks/fal?job_id=j&attempt=1&token=t", content=b"{}")
        health = remote.get("/healthz")
    assert hook.status_code == 404
    assert hook.json() == {"ok": False, "error": NOT_THE_RECEIVER}
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert (
        "a webhook reached /wanbatch/webhooks/fal: the receiver listens at /webhooks/fal; "
        "make the proxy strip its prefix /wanbatch"
    ) in line
    assert "WANBATCH_SERVE_TOKEN" not in line
    assert "no token" not in line
    assert (health.json()["misrouted"], health.json()["rejected"]) == (1, 1)


def test_the_receiver_and_the_dashboard_keep_their_own_answers(
    sqlite_engine: Engine, output_dir: Path
) -> None:
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    with client(app, peer=REMOTE) as remote:
        unsigned = remote.post("/webhooks/fal?job_id=j&attempt=1", content=b"{}")
        page = remote.post("/batches/b1/pause")
        health = remote.get("/healthz")
    assert unsigned.status_code in (400, 401, 403)  # the receiver's own refusal of an unsigned body
    assert page.status_code == 403  # the dashboard's guard, as before
    assert health.json()["misrouted"] == 0


def test_a_flood_of_misrouted_webhooks_warns_once_a_minute_and_counts_them_all(
    sqlite_engine: Engine, output_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fal retries each delivery up to 10 times and a batch sends thousands: every misrouted POST
    was one warning line, a flood of them. Now the first warns; the others within
    :data:`web.connections.LOG_INTERVAL` are told at INFO (still counted), and the first after it
    warns again, saying how many came meanwhile."""
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    now = [1000.0]
    monkeypatch.setattr(app.state.counts, "_clock", lambda: now[0])
    with client(app, peer=REMOTE) as remote, caplog.at_level(logging.INFO, logger="web.app"):
        for _ in range(5):
            assert remote.post("/wanbatch/webhooks/fal?job_id=j&attempt=1", content=b"{}").status_code == 404
            now[0] += 10.0  # all five within a minute of the first
        now[0] = 1000.0 + LOG_INTERVAL + 1
        assert remote.post("/wanbatch/webhooks/fal?job_id=j&attempt=1", content=b"{}").status_code == 404
        health = remote.get("/healthz").json()
    misrouted = [r for r in caplog.records if getattr(r, "event", None) == "webhook.misrouted"]
    assert [r.levelno for r in misrouted] == [logging.WARNING, *[logging.INFO] * 4, logging.WARNING]
    first, *quiet, again = (" ".join(r.getMessage().split()) for r in misrouted)
    assert "make the proxy strip its prefix /wanbatch" in first
    assert "make the proxy strip its prefix /wanbatch" in again
    assert all("strip its prefix /wanbatch" in line for line in quiet)  # said, at INFO
    assert "4 more misrouted" in again
    assert (health["misrouted"], health["rejected"]) == (6, 6)
