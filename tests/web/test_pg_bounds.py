"""PostgreSQL connections are bounded in time, and a database that hangs is an outage, said in
one line: every connection carries a connect timeout, client TCP keepalives, a TCP user
timeout and the server's own keepalives (so a partitioned session, and the advisory lock it
holds, ends within about a minute); a pool with every connection taken is "unavailable" (503),
never a 500 with a traceback; and ``/healthz`` asks the database each time, so a stopped
server is reported, not the database it served a while ago.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from jobs import db
from jobs.db import make_engine, migrate
from tests.chaos.chaos_harness import PostgresServer
from tests.ports import unused_port
from tests.web.web_helpers import TOKEN, app_for, client, logged_in, settings_for
from web.app import DATABASE_UNAVAILABLE, create_app
from worker.steps.webhooks import database_fingerprint, webhook_secret

pytestmark = pytest.mark.postgres

BEARER = {"Authorization": f"Bearer {TOKEN}"}
SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}


def test_every_pooled_connection_carries_the_time_bounds(pg_url: str) -> None:
    """The client's bounds as libpq was given them; no statement_timeout (exports and
    migrations run long), and no startup ``options`` of ours (poolers refuse it): the URL's own
    are passed as they are. A bound the URL sets itself wins."""
    url = f"{pg_url}?options=-c%20search_path%3Dpublic&connect_timeout=4"
    engine = make_engine(url, connect_args={"keepalives_idle": 25})
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW search_path")).scalar() == "public"
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "0"
            params = conn.connection.driver_connection.info.get_parameters()  # type: ignore[union-attr]
    finally:
        engine.dispose()
    assert params["connect_timeout"] == "4"
    assert params["keepalives"] == "1"
    assert params["keepalives_idle"] == "25"
    assert params["keepalives_interval"] == "10"
    assert params["keepalives_count"] == "3"
    assert params["tcp_user_timeout"] == "30000"

    plain = make_engine(pg_url)
    try:
        with plain.connect() as conn:
            params = conn.connection.driver_connection.info.get_parameters()  # type: ignore[union-attr]
        lock = db.AdvisoryLock(plain, 0x5EE5_0000_0000_0001)
        assert lock.acquire()
        try:  # the leader's session: the server probes it too, so a cut-off leader's lock ends
            assert lock._conn is not None
            shown = {name: lock._conn.execute(text(f"SHOW {name}")).scalar() for name in SERVER_KEEPALIVES}
            assert shown == SERVER_KEEPALIVES
        finally:
            lock.release()
    finally:
        plain.dispose()
    assert "options" not in params
    assert params["connect_timeout"] == str(db.PG_CONNECT_TIMEOUT_SECONDS)
    assert params["keepalives_idle"] == "30"
    assert params["tcp_user_timeout"] == str(db.PG_TCP_USER_TIMEOUT_MS)


def test_the_listening_connection_carries_them_too(pg_url: str) -> None:
    conn = db.listen_events(pg_url, connect_timeout=3)
    assert conn is not None
    try:
        params = conn.info.get_parameters()
    finally:
        conn.close()
    assert params["connect_timeout"] == "3"
    assert params["tcp_user_timeout"] == "30000"
    assert params["keepalives_count"] == "3"


@pytest.mark.usefixtures("_pg_engine")  # migrated
def test_every_connection_taken_is_unavailable_not_a_500(
    pg_url: str, output_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pool whose connections are all held by work the database does not finish (a hang):
    SQLAlchemy's pool timeout is no DBAPIError, but the same outage."""
    small = make_engine(pg_url, pool_size=1, max_overflow=0, pool_timeout=0.3)
    try:
        browser = logged_in(client(app_for(small, settings_for(small, output_dir, token=TOKEN))))
        assert browser.get("/", headers=BEARER).status_code == 200
        with small.connect() as held:
            held.execute(text("SELECT 1"))
            with pytest.raises(PoolTimeoutError) as raised:
                small.connect()
            assert db.is_unavailable(raised.value)
            with caplog.at_level(logging.INFO):
                answer = browser.get("/", headers=BEARER)
        assert answer.status_code == 503, answer.text
        assert "Traceback" not in answer.text
        assert DATABASE_UNAVAILABLE.split(":")[0] in answer.text
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.__dict__.get("event") for r in errors] == ["dashboard.database_unavailable"]
        assert all(r.exc_info is None and "\n" not in r.getMessage() for r in errors)
    finally:
        small.dispose()


async def _healthz(engine: Engine, output_dir: Path) -> dict[str, object]:
    app = create_app(settings_for(engine, output_dir), engine=engine)
    transport = httpx.ASGITransport(app=app, client=("203.0.113.5", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8788") as http:
        answer = await http.get("/healthz")
    assert answer.status_code == 200
    found: dict[str, object] = answer.json()
    return found


def test_healthz_at_a_closed_port_says_the_database_is_unavailable(output_dir: Path) -> None:
    engine = make_engine(f"postgresql://postgres@127.0.0.1:{unused_port()}/gone")
    try:
        found = asyncio.run(_healthz(engine, output_dir))
    finally:
        engine.dispose()
    assert found["database"] is None
    assert found["database_error"] == DATABASE_UNAVAILABLE


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, stopped by it (never the shared one)."""
    server = PostgresServer()
    server.init()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.mark.slow
def test_healthz_asks_every_time_so_a_stopped_server_is_reported(
    own_postgres: PostgresServer, output_dir: Path
) -> None:
    """The fingerprint is known from the first ``/healthz`` on (the secret is read once per
    process), yet a server stopped since is said to be unavailable, within the 2 s wait."""
    engine = make_engine(own_postgres.url)
    try:
        migrate(engine, from_models=False)
        first = asyncio.run(_healthz(engine, output_dir))
        assert first["database"] == database_fingerprint(webhook_secret(engine))
        assert first["database_error"] is None
        own_postgres.crash()
        found = asyncio.run(_healthz(engine, output_dir))
    finally:
        engine.dispose()
    assert found["database"] is None
    assert found["database_error"] == DATABASE_UNAVAILABLE
