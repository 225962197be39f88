"""`wanbatch doctor [--json]`: each piece of the setup checked for real, with what to fix.

Everything is real: the simulator stands in for fal (it answers the key check exactly as fal
does: 404 for a request id that does not exist, 401 for a refused key, 403 for a locked
account), PostgreSQL, Redis and a `wanbatch worker` are the shared services, the receiver is the
real web app on a loopback port. The key never appears in what the doctor prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from rich.cells import cell_len
from sqlalchemy import create_engine, text

from bench.distributed import Scenario, claimed_redis_db, environment, start_workers, stop_processes, tail
from falsim.server import SimulatorHandle
from jobs.db import SCHEMA_HEAD, _engine_for, close_engines
from jobs.settings import Settings, get_settings
from tests.e2e.e2e_helpers import FAL_KEY, Wb, wanbatch, without_read_override, write_manifest
from tests.hostile import HostileProvider, Recorded, gzip_bomb, json_reply, raw_reply, traced_peak
from tests.loopback_proxy import BAD_GATEWAY, loopback_proxy
from tests.ports import unused_port
from web.app import create_app
from worker.doctor import Check, _serves_this_database, healthz_url
from worker.running import _WorkerWatch
from worker.steps.webhooks import binding_token, database_fingerprint, webhook_secret

#: A batch of one job: what the first command that stores one stores.
FIRST_MANIFEST = """\
name: first
endpoint: fal-ai/wan-i2v
items:
  - {prompt: a first job, image_url: images/landscape.jpg, seed: 1}
"""
NAMES = [
    "configuration",
    "database",
    "clock",
    "broker",
    "provider",
    "downloads",
    "output storage",
    "receiver",
    "limiter",
]


def _doctor(wb: Wb) -> tuple[int, dict[str, dict[str, Any]], dict[str, Any]]:
    run = wb("doctor", "--json")
    body = run.json()
    assert [c["name"] for c in body["checks"]] == NAMES
    assert FAL_KEY not in run.stdout + run.stderr
    assert body["ok"] is (run.code == 0)
    return run.code, {c["name"]: c for c in body["checks"]}, body


@contextlib.contextmanager
def _serving(settings: Settings) -> Iterator[str]:
    """`wanbatch serve`'s app for ``settings`` on a free loopback port; its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive(), "the receiver did not start"
        assert time.monotonic() < deadline, "the receiver did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _sim_jwks(sim: SimulatorHandle) -> str:
    """The simulator's JWKS: fal's signing keys, as far as these tests go."""
    return f"{sim.url}/.well-known/jwks.json"


@pytest.fixture
def receiver(sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`wanbatch serve`'s app on a free loopback port, its keys the simulator's; its base URL."""
    monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", _sim_jwks(sim))
    get_settings.cache_clear()
    with _serving(get_settings()) as url:
        yield url


def test_all_well_embedded_with_the_simulator(wb: Wb, sim: SimulatorHandle) -> None:
    code, checks, _body = _doctor(wb)
    assert code == 0, checks
    assert {n: c["status"] for n, c in checks.items()} == {
        "configuration": "ok",
        "database": "ok",
        "clock": "skip",
        "broker": "skip",
        "provider": "ok",
        "downloads": "ok",
        "output storage": "ok",
        "receiver": "skip",
        "limiter": "skip",
    }
    assert "embedded" in checks["broker"]["detail"]
    assert "share the submit rate and the outstanding caps through it" in checks["limiter"]["detail"]
    assert "accepted the key" in checks["provider"]["detail"]
    # What an embedded run does without a receiver: it follows fal's status streams.
    assert "completions come from fal's status streams" in checks["receiver"]["detail"]
    assert "found by polling" not in checks["receiver"]["detail"]
    assert all(c["fix"] is None for c in checks.values())
    assert sim.ledger()["accepted"] == 0  # nothing was submitted, so nothing billed
    # The database is only read: doctor on a new SQLite file creates no schema, nor the file.
    assert "not created yet: the first command creates it" in checks["database"]["detail"]
    human = wb("doctor")
    assert human.code == 0
    assert "all well" in human.stdout


@pytest.fixture
def strict_sim(sim: SimulatorHandle) -> Iterator[SimulatorHandle]:
    """The session's simulator, given back as it was: key options survive its ``reset``."""
    yield sim
    sim.update_options(accepted_keys=None, locked_keys=[])


def test_a_refused_key_a_locked_account_and_no_key(
    wb: Wb, strict_sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = strict_sim
    sim.update_options(accepted_keys=["some-other-key"])
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert checks["provider"]["status"] == "fail"
    assert "refused the key (401" in checks["provider"]["detail"]
    assert "FAL_KEY" in checks["provider"]["fix"]

    sim.update_options(accepted_keys=None, locked_keys=[FAL_KEY])
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert "refused the account (403" in checks["provider"]["detail"]
    assert "Exhausted balance" in checks["provider"]["detail"]
    assert "billing" in checks["provider"]["fix"]

    monkeypatch.delenv("FAL_KEY")
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert checks["provider"]["detail"] == "FAL_KEY is not set"
    assert "export FAL_KEY" in checks["provider"]["fix"]


def test_a_simulation_needs_no_key_and_doctor_says_so(wb: Wb, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quickstart's setup (`--simulate`, no FAL_KEY): plain `doctor` still fails the
    provider (a batch for fal needs the key) but says that `--simulate` needs none, and
    `doctor --simulate` checks that setup: all well, exit 0."""
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert checks["provider"]["detail"] == "FAL_KEY is not set"
    assert "`--simulate` needs no key" in checks["provider"]["fix"]

    run = wb("doctor", "--simulate", "--json")
    assert run.code == 0, run.stdout
    body = run.json()
    assert body["ok"] is True
    checks = {c["name"]: c for c in body["checks"]}
    assert [c["name"] for c in body["checks"]] == NAMES
    assert {n: c["status"] for n, c in checks.items()} == {
        "configuration": "ok",
        "database": "ok",
        "clock": "skip",
        "broker": "skip",
        "provider": "skip",
        "downloads": "skip",
        "output storage": "ok",
        "receiver": "skip",
        "limiter": "skip",
    }
    assert "no FAL_KEY needed" in checks["provider"]["detail"]
    assert "all well" in wb("doctor", "--simulate").stdout

    # `--simulate` is refused with a broker: doctor --simulate says so.
    monkeypatch.setenv("WANBATCH_BROKER_URL", "redis://127.0.0.1:6379/0")
    refused = wb("doctor", "--simulate", "--json")
    assert refused.code == 1
    broker = next(c for c in refused.json()["checks"] if c["name"] == "broker")
    assert (broker["status"], broker["fix"]) == ("fail", "unset WANBATCH_BROKER_URL to simulate")


@pytest.mark.redis
def test_the_limiter_is_checked_where_run_and_worker_would_use_it(
    wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """`run` and `worker` refuse to start without the limiter's Redis: doctor says so first,
    naming the setting in use (password masked), for `--simulate` runs too."""
    port = unused_port()
    monkeypatch.setenv("WANBATCH_LIMITS_URL", f"redis://:hunter2-secret@127.0.0.1:{port}/0")
    for simulate in ((), ("--simulate",)):
        run = wb("doctor", "--json", *simulate)
        assert run.code == 1
        limiter = next(c for c in run.json()["checks"] if c["name"] == "limiter")
        assert limiter["status"] == "fail"
        assert limiter["detail"].startswith(
            f"cannot reach the submit-rate limiter's Redis at redis://:**@127.0.0.1:{port}/0 "
            "(WANBATCH_LIMITS_URL): Error 111"
        )
        assert "WANBATCH_LIMITS_URL" in limiter["fix"]
        assert "hunter2-secret" not in run.stdout + run.stderr

    monkeypatch.setenv("WANBATCH_LIMITS_URL", redis_url)
    code, checks, _ = _doctor(wb)
    assert code == 0, checks
    assert checks["limiter"] == {
        "name": "limiter",
        "status": "ok",
        "detail": f"{redis_url} (WANBATCH_LIMITS_URL) answers",
        "fix": None,
    }


def test_provider_unreachable(wb: Wb, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", f"http://127.0.0.1:{unused_port()}")
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert checks["provider"]["detail"].startswith("cannot reach http://127.0.0.1:")
    assert "WANBATCH_FAL_QUEUE_URL" in checks["provider"]["fix"]


#: A key of fal's shape (``<uuid>:<hex secret>``), echoed back by the provider below.
FAL_SHAPED_KEY = "5d1e0f2a-3b4c-4d5e-8f60-718293a4b5c6:c0ffee00deadbeef0123456789abcdef"


@pytest.mark.parametrize("code", [401, 403, 500])
def test_a_provider_echoing_the_key_in_its_detail_is_masked(
    wb: Wb, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def echo(req: Recorded, sock: socket.socket) -> None:
        sent = req.headers["authorization"]  # "Key <key>"
        key = sent.split(" ", 1)[1]
        detail = f"refused {sent}; bare {key}; secret {key.split(':')[1]}"
        json_reply({"detail": detail}, status=code)(req, sock)

    hostile.route("GET", r"/.*", echo)
    monkeypatch.setenv("FAL_KEY", FAL_SHAPED_KEY)
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", hostile.url)
    run = wb("doctor", "--json")
    provider = next(c for c in run.json()["checks"] if c["name"] == "provider")
    assert provider["status"] == "fail"
    assert "refused Key ***; bare ***; secret ***" in provider["detail"]  # fal's words, masked
    secret = FAL_SHAPED_KEY.split(":")[1]
    assert secret[:8] not in run.stdout + run.stderr
    human = wb("doctor")
    assert secret[:8] not in human.stdout + human.stderr


@pytest.mark.parametrize("code", [401, 403, 500])
def test_a_providers_detail_cannot_drive_the_terminal_or_break_the_line(
    wb: Wb, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """fal's (or a proxy's) ``detail`` was printed as it came: a window title set, the screen
    cleared, the text reversed, a line of its own. Now shown escaped, as ``run`` and ``status``
    show fal's words."""
    detail = "bad key\x1b]0;PWNED\x07\x1b[2J\u202e\nline2"
    hostile.route("GET", r"/.*", json_reply({"detail": detail}, status=code))
    monkeypatch.setenv("FAL_KEY", FAL_SHAPED_KEY)
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", hostile.url)
    run = wb("doctor", "--json")
    provider = next(c for c in run.json()["checks"] if c["name"] == "provider")
    assert provider["status"] == "fail"
    assert f"{code}: bad key\\x1b]0;PWNED\\x07\\x1b[2J\\u202e\\nline2" in provider["detail"]
    human = wb("doctor")
    for unsafe in ("\x1b", "\x07", "\u202e"):
        assert unsafe not in human.stdout + human.stderr
    (line,) = [line for line in human.stdout.splitlines() if "PWNED" in line]
    assert "line2" in line  # the detail's line break is shown, not obeyed
    assert not any(line.startswith("line2") for line in human.stdout.splitlines())


def test_database_checks(
    wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch, new_pg_database: Callable[[], str]
) -> None:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", "postgresql://doctor:s3cret-pw@127.0.0.1:1/none")
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert checks["database"]["status"] == "fail"
    assert "cannot connect" in checks["database"]["detail"]
    assert "s3cret-pw" not in checks["database"]["detail"]
    assert "WANBATCH_DATABASE_URL" in checks["database"]["fix"]

    url = new_pg_database()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", url)
    code, checks, _ = _doctor(wb)
    assert (code, checks["database"]["status"]) == (0, "ok")
    assert "empty" in checks["database"]["detail"]
    assert wb("status").code == 0  # any command migrates
    code, checks, _ = _doctor(wb)
    assert f"schema {SCHEMA_HEAD} (current)" in checks["database"]["detail"]

    # A schema this wanbatch does not know (a newer one migrated it): a failure with the fix.
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert "9999 is not one this wanbatch knows" in checks["database"]["detail"]
    assert "upgrade wanbatch" in checks["database"]["fix"]


def test_a_database_whose_tables_were_dropped_is_not_called_current(
    wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch, new_pg_database: Callable[[], str]
) -> None:
    """Was "reachable, schema … (current)", while every other command failed on a missing table."""
    url = new_pg_database()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", url)
    assert wb("status").code == 0  # migrated: stamped at the head
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE jobs, batches CASCADE"))
    finally:
        engine.dispose()
    code, checks, _ = _doctor(wb)
    assert (code, checks["database"]["status"]) == (1, "fail")
    assert (
        "not a wanbatch database, or its tables were dropped (no table batches, jobs)"
        in (checks["database"]["detail"])
    )
    assert "point WANBATCH_DATABASE_URL at wanbatch's database" in checks["database"]["fix"]
    close_engines()  # a new process opens the database afresh
    status = wb("status")
    assert status.code == 2
    assert status.stderr.startswith(f"error: WANBATCH_DATABASE_URL {url} is not a wanbatch database")
    assert "or its tables were dropped (no table batches, jobs)" in status.stderr


def test_output_storage_that_cannot_take_files(wb: Wb, sim: SimulatorHandle, tmp_path: Path) -> None:
    (tmp_path / "outputs").write_text("a file where the folder should be")
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert checks["output storage"]["status"] == "fail"
    assert "WANBATCH_OUTPUT_DIR" in checks["output storage"]["detail"]
    assert "writable" in checks["output storage"]["fix"]


def test_receiver_checks(
    wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch, receiver: str
) -> None:
    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{receiver}/webhooks/fal")
    code, checks, _ = _doctor(wb)
    assert (code, checks["receiver"]["status"]) == (0, "ok"), checks["receiver"]
    assert f"{receiver}/healthz answers" in checks["receiver"]["detail"]
    assert f"fal's signing keys fetched from {_sim_jwks(sim)}" in checks["receiver"]["detail"]

    # Something answers there, but it is not wanbatch serve (the simulator: 401 on /healthz).
    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{sim.url}/webhooks/fal")
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert "not as `wanbatch serve` does" in checks["receiver"]["detail"]

    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"http://127.0.0.1:{unused_port()}/webhooks/fal")
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert checks["receiver"]["detail"].startswith("cannot reach")
    assert "wanbatch serve" in checks["receiver"]["fix"]

    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{receiver}/somewhere-else")
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert "does not end in /webhooks/fal" in checks["receiver"]["detail"]


def test_the_receiver_check_follows_no_redirect_and_reads_a_bounded_answer(
    wb: Wb, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/healthz`` was fetched following redirects: httpx read each redirect's body whole (a
    few hundred bytes of ``gzip, gzip`` took the doctor to 200 MiB), and the check went on to a
    host nobody configured. Now a redirect is the answer, told by its Location's host only, and
    the answer is read to a small cap."""
    target = f"http://someone:hunter2@127.0.0.1:{hostile.port}/elsewhere/healthz?token=s3cret"
    bomb = gzip_bomb(200 << 20)  # made before memory is traced
    headers = {"Location": target, "Content-Encoding": "gzip, gzip", "Content-Type": "application/json"}
    hostile.route("GET", r"/moved/healthz", raw_reply(bomb, 302, headers))
    hostile.route("GET", r"/elsewhere/healthz", json_reply({"ok": True}))
    hostile.route("GET", r"/big/healthz", json_reply({"ok": True, "pad": "x" * (200 << 10)}))
    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{hostile.url}/moved/webhooks/fal")
    with traced_peak() as peak:
        run = wb("doctor", "--json")
    assert peak() < 32 << 20, f"{peak() >> 20} MiB held at once"
    receiver = next(c for c in run.json()["checks"] if c["name"] == "receiver")
    assert receiver["status"] == "fail"
    assert receiver["detail"] == (
        f"{hostile.url}/moved/healthz redirects (302) to 127.0.0.1:{hostile.port}; not followed"
    )
    assert "not at one that redirects" in receiver["fix"]
    assert hostile.count("GET", r"/elsewhere/healthz") == 0
    human = wb("doctor")
    for secret in ("hunter2", "s3cret", "someone"):
        assert secret not in run.stdout + run.stderr + human.stdout + human.stderr

    # A relative Location names the receiver's own host.
    hostile.route("GET", r"/relative/healthz", raw_reply(b"", 307, {"Location": "/elsewhere/healthz"}))
    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{hostile.url}/relative/webhooks/fal")
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert checks["receiver"]["detail"].endswith(f"redirects (307) to 127.0.0.1:{hostile.port}; not followed")

    # wanbatch serve's /healthz is a few hundred bytes: 200 KiB is not read, nor taken for it.
    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{hostile.url}/big/webhooks/fal")
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert checks["receiver"]["detail"] == (
        f"{hostile.url}/big/healthz: HTTP 200 with an answer over 65536 bytes; not read"
    )


def test_the_receiver_check_fails_while_fal_s_signing_keys_cannot_be_fetched(
    wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver without keys answers /healthz but refuses every delivery (503): that was "all
    well". Now the doctor fetches the keys itself, and reads the receiver's own word on them."""
    nowhere = f"http://127.0.0.1:{unused_port()}/jwks.json"  # nothing listens there
    monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", nowhere)
    get_settings.cache_clear()
    with _serving(get_settings()) as receiver:
        monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{receiver}/webhooks/fal")
        code, checks, _ = _doctor(wb)
        assert (code, checks["receiver"]["status"]) == (1, "fail")
        assert checks["receiver"]["detail"] == (
            f"{receiver}/healthz answers, but cannot verify fal's signatures (fal's signing keys "
            "could not be fetched: ConnectError: [Errno 111] Connection refused): it refuses every "
            f"delivery (503); this host could not fetch them either from {nowhere}: fal's signing "
            "keys could not be fetched: ConnectError: [Errno 111] Connection refused"
        )
        assert "fix WANBATCH_WEBHOOK_JWKS_URL here and for `wanbatch serve`" in checks["receiver"]["fix"]

        # This host fetches the keys; the receiver, with its own setting, still cannot, and says so.
        monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", _sim_jwks(sim))
        code, checks, _ = _doctor(wb)
        assert (code, checks["receiver"]["status"]) == (1, "fail")
        detail = checks["receiver"]["detail"]
        assert detail.startswith(
            f"{receiver}/healthz answers, but cannot verify fal's signatures "
            "(fal's signing keys could not be fetched: ConnectError"
        )
        assert detail.endswith(
            f"it refuses every delivery (503); this host fetched them from {_sim_jwks(sim)}"
        )
        assert "give `wanbatch serve` the WANBATCH_WEBHOOK_JWKS_URL above" in checks["receiver"]["fix"]


def test_the_receiver_check_names_the_proxy_that_keeps_the_keys_away_not_the_url(
    wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a proxy that cannot reach fal's JWKS (it answers 502), the receiver's /healthz and
    the doctor said ``could not be fetched: ProxyError`` and "fix WANBATCH_WEBHOOK_JWKS_URL",
    which is not at fault. The JWKS host is only named to the stand-in proxy."""
    jwks = "https://jwks.corp.example/.well-known/jwks.json"
    monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", jwks)
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    with loopback_proxy(BAD_GATEWAY) as proxy:
        where = proxy.url.split("://", 1)[1]
        monkeypatch.setenv("HTTPS_PROXY", f"http://corp:pr0xy-s3cret@{where}")
        get_settings.cache_clear()
        with _serving(get_settings()) as receiver:
            monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{receiver}/webhooks/fal")
            code, checks, _ = _doctor(wb)
    said = (
        f"fal's signing keys could not be fetched: ProxyError: the proxy {where} (HTTPS_PROXY) "
        "answered 502 Bad Gateway: it could not reach jwks.corp.example:443"
    )
    assert (code, checks["receiver"]["status"]) == (1, "fail"), checks["receiver"]
    assert checks["receiver"]["detail"] == (
        f"{receiver}/healthz answers, but cannot verify fal's signatures ({said}): it refuses every "
        f"delivery (503); this host could not fetch them either from {jwks}: {said}"
    ), checks["receiver"]["detail"]
    fix = checks["receiver"]["fix"]
    assert "WANBATCH_WEBHOOK_JWKS_URL" not in fix, fix
    assert fix.startswith("fix the proxy named above, or the variable naming it, not the URL"), fix
    assert "pr0xy-s3cret" not in json.dumps(checks)


def test_the_receiver_check_says_the_receiver_holds_its_keys_when_only_this_host_cannot_fetch_them(
    wb: Wb, sim: SimulatorHandle, hostile: HostileProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An audit: the doctor's own fetch of the JWKS failed (HTTP 500) and it said "the receiver
    refuses every delivery (503) while it has no keys" of a receiver that held its keys and
    accepted every delivery. It reads the receiver's own word (its /healthz) and says that."""
    hostile.route("GET", r"/jwks\.json", json_reply({"detail": "boom"}, status=500))
    broken = f"{hostile.url}/jwks.json"
    monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", _sim_jwks(sim))
    get_settings.cache_clear()
    with _serving(get_settings()) as receiver:  # it fetches fal's keys from the simulator
        monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{receiver}/webhooks/fal")
        monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", broken)  # this host's fetch: HTTP 500
        code, checks, _ = _doctor(wb)
    assert (code, checks["receiver"]["status"]) == (1, "fail"), checks["receiver"]
    detail = checks["receiver"]["detail"]
    assert detail == (
        f"this host could not fetch fal's signing keys from WANBATCH_WEBHOOK_JWKS_URL {broken}: "
        f"fal's signing keys could not be fetched: HTTP 500; {receiver}/healthz says it can verify "
        "fal's signatures now (keys it holds), so it accepts deliveries; it refuses them (503) if it "
        "must fetch the keys again (they age, or fal changes them) and cannot"
    ), detail
    assert "refuses every delivery" not in detail


def test_a_receiver_on_another_database_fails_the_check(
    wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A receiver serving another database answers /healthz and holds fal's keys, yet refuses
    every delivery (403: the webhook token's secret is the database's): that was "all well".
    Its /healthz now says which database it serves (a fingerprint), and the doctor compares."""
    monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", _sim_jwks(sim))
    here = os.environ["WANBATCH_DATABASE_URL"]
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    get_settings.cache_clear()
    with _serving(get_settings()) as receiver:
        monkeypatch.setenv("WANBATCH_DATABASE_URL", here)
        monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{receiver}/webhooks/fal")
        fix = (
            f"the receiver at {receiver}/webhooks/fal serves another database: start `wanbatch "
            "serve` with this WANBATCH_DATABASE_URL"
        )
        # This database not even created yet: the receiver cannot be serving it.
        code, checks, _ = _doctor(wb)
        assert (code, checks["receiver"]["status"]) == (1, "fail"), checks["receiver"]
        assert checks["receiver"]["detail"].startswith(
            f"{receiver}/healthz answers, but serves another database"
        )
        assert checks["receiver"]["fix"].startswith(fix)
        # This database in use (its own webhook secret made, as a run with webhooks makes it).
        webhook_secret(_engine_for(here))
        code, checks, _ = _doctor(wb)
        assert (code, checks["receiver"]["status"]) == (1, "fail"), checks["receiver"]
        assert checks["receiver"]["fix"].startswith(fix)
        # The fingerprint it shows is none of the secret's bytes, and no webhook token.
        shown = httpx.get(f"{receiver}/healthz").json()["database"]
        assert isinstance(shown, str)
        assert len(shown) == 16
        with sqlite3.connect(tmp_path / "elsewhere.db") as conn:
            (secret,) = conn.execute("SELECT value FROM instance_secrets WHERE name = 'webhook'").fetchone()
        assert shown not in secret
        assert shown == database_fingerprint(bytes.fromhex(secret))
        assert shown != binding_token(bytes.fromhex(secret), "j", 1)[:16]

    # The same database on both sides: all well (test_receiver_checks), and its fingerprint matches.
    get_settings.cache_clear()
    with _serving(get_settings()) as receiver:
        monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{receiver}/webhooks/fal")
        code, checks, _ = _doctor(wb)
        assert (code, checks["receiver"]["status"]) == (0, "ok"), checks["receiver"]
        assert "serves this database" in checks["receiver"]["detail"]


def test_a_receiver_on_a_read_only_database_fails_the_check(
    wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver whose database is read-only (``mode=ro``) refuses every delivery (503), though
    it serves this very database and holds fal's keys: that was "serves this database … all
    well". Its /healthz says so, and the doctor fails naming the cause."""
    monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", _sim_jwks(sim))
    here = os.environ["WANBATCH_DATABASE_URL"]
    assert here.startswith("sqlite:///")
    webhook_secret(_engine_for(here))  # the database in use, its secret made (as a run makes it)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"{here}?mode=ro")
    get_settings.cache_clear()
    with _serving(get_settings()) as receiver:
        monkeypatch.setenv("WANBATCH_DATABASE_URL", here)
        monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{receiver}/webhooks/fal")
        code, checks, _ = _doctor(wb)
    assert (code, checks["receiver"]["status"]) == (1, "fail"), checks["receiver"]
    assert checks["receiver"]["detail"].startswith(
        f"{receiver}/healthz answers, but its database is read-only: it refuses every delivery (503)"
    )
    assert "WANBATCH_DATABASE_URL it may write" in checks["receiver"]["fix"]


def test_a_prefix_no_proxy_strips_is_named_in_the_fix(
    wb: Wb, monkeypatch: pytest.MonkeyPatch, receiver: str
) -> None:
    """A proxy that keeps its prefix hands serve /wanbatch/healthz, which the dashboard answers."""
    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{receiver}/wanbatch/webhooks/fal")
    code, checks, _ = _doctor(wb)
    assert (code, checks["receiver"]["status"]) == (1, "fail"), checks["receiver"]
    assert "a reverse proxy serving it under /wanbatch must strip that prefix" in checks["receiver"]["fix"]


def test_a_receiver_that_cannot_read_its_database_or_does_not_say_which(wb: Wb) -> None:
    """What the receiver's /healthz says of its database, as the doctor reads it."""
    settings = get_settings()
    probe = "http://127.0.0.1:1/healthz"
    unavailable = {"ok": True, "database": None, "database_error": "the database is unavailable"}
    verdict = _serves_this_database(settings, unavailable, probe)
    assert isinstance(verdict, Check)
    assert verdict.status == "fail"
    assert verdict.detail == (
        f"{probe} answers, but cannot use its database (the database is unavailable): it refuses "
        "every delivery (503)"
    )
    # An older wanbatch says nothing of its database: taken at its word, as before.
    assert _serves_this_database(settings, {"ok": True}, probe) == ""


def test_healthz_url_keeps_a_path_prefix() -> None:
    assert healthz_url("https://example.com/webhooks/fal") == "https://example.com/healthz"
    assert healthz_url("https://example.com/wb/webhooks/fal/") == "https://example.com/wb/healthz"
    assert healthz_url("https://example.com/hooks") is None
    assert healthz_url("ftp://example.com/webhooks/fal") is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WANBATCH_SUBMIT_RATE", "fast"),
        # Was "✓ configuration", then "the check itself failed (InvalidURL …); please report it".
        ("WANBATCH_WEBHOOK_URL", "https://\N{SNOWMAN}.example/webhooks/fal"),
    ],
    ids=["rate", "webhook-host"],
)
def test_invalid_configuration_skips_the_rest(
    variable: str, value: str, wb: Wb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert checks["configuration"]["status"] == "fail"
    assert variable in checks["configuration"]["detail"]
    assert [checks[n]["status"] for n in NAMES[1:]] == ["skip"] * 8


def test_human_output_fits_80_columns_and_names_each_fix(
    wb: Wb, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", f"http://127.0.0.1:{unused_port()}")
    monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"http://127.0.0.1:{unused_port()}/webhooks/fal")
    (tmp_path / "outputs").write_text("not a folder")
    run = wb("doctor")
    assert run.code == 1
    assert "Traceback" not in run.stdout + run.stderr
    assert FAL_KEY not in run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert all(cell_len(line) <= 80 for line in lines), run.stdout
    assert sum(1 for line in lines if line.strip().startswith("fix:")) == 3
    assert lines[-1] == "3 problem(s): see the fix lines above"
    for name in NAMES:
        assert any(name in line for line in lines), name


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_broker_with_and_without_workers(
    wb: Wb,
    sim: SimulatorHandle,
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    new_pg_database: Callable[[], str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("WANBATCH_BROKER_URL", f"redis://127.0.0.1:{unused_port()}/0")
    code, checks, _ = _doctor(wb)
    assert code == 1
    assert "cannot reach the broker" in checks["broker"]["detail"]
    assert "WANBATCH_BROKER_URL" in checks["broker"]["fix"]

    database = new_pg_database()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", database)
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as broker:
        monkeypatch.setenv("WANBATCH_BROKER_URL", broker)
        code, checks, _ = _doctor(wb)
        assert code == 1
        assert "no `wanbatch worker` does" in checks["broker"]["detail"]
        assert "start `wanbatch worker`" in checks["broker"]["fix"]

        logs = tmp_path / "logs"
        logs.mkdir()
        scenario = Scenario(jobs=1, workers=1, concurrency=1)
        env = environment(scenario, database, broker, sim.url, tmp_path / "outputs")
        workers = start_workers(scenario, env, tmp_path, logs)
        try:
            deadline = time.monotonic() + 90
            while True:
                code, checks, _ = _doctor(wb)
                # Its beat writes both its heartbeat in the database and its record in Redis.
                if checks["broker"]["status"] == "ok" and "(last seen" in checks["broker"]["detail"]:
                    break
                assert workers[0].poll() is None, tail(logs / "worker-0.log")
                assert time.monotonic() < deadline, tail(logs / "worker-0.log")
                time.sleep(1.0)
            # The same broker, another database (staging and production sharing one Redis, a
            # typo in one host's URL): the worker answers the ping, but works on the first one.
            other = new_pg_database()
            monkeypatch.setenv("WANBATCH_DATABASE_URL", other)
            elsewhere_code, elsewhere, _ = _doctor(wb)
            said: list[str] = []
            spoke = threading.Event()

            def say(line: str) -> None:
                said.append(line)
                spoke.set()

            watch = _WorkerWatch(get_settings(), say, every=60.0, grace=0.0)  # what `run` does
            watch.start()
            try:
                assert spoke.wait(30), tail(logs / "worker-0.log")
                assert watch.seen_elsewhere()
            finally:
                watch.stopping.set()
                watch.join(15)
        finally:
            stop_processes(workers)
        assert code == 0, checks
        assert "1 worker(s) answer a ping, and work on this database" in checks["broker"]["detail"]
        # Which worker, by its node name, and when its beat last wrote its record.
        node = f"wanbatch-{workers[0].pid}@{socket.gethostname()}"
        assert re.search(
            rf"; the workers: {re.escape(node)} \(last seen \d+s ago\)$", checks["broker"]["detail"]
        )
        (listed,) = checks["broker"]["workers"]
        assert listed["node"] == node
        assert 0 <= listed["last_seen_seconds_ago"] < 30, listed
        # The other database has no record of it: named, not seen there.
        assert f"{node} (no record on the limiter's Redis for this database)" in elsewhere["broker"]["detail"]
        assert elsewhere_code == 1, elsewhere
        assert "1 worker(s) answer a ping, but none works on this database" in elsewhere["broker"]["detail"]
        assert "another WANBATCH_DATABASE_URL" in elsewhere["broker"]["fix"]
        assert [line.split(",")[0] for line in said] == [
            f"warning: 1 wanbatch worker(s) answer on the broker {broker}"
        ]


#: Credentials that must never be printed, in every URL setting the doctor names.
PASSWORD, TOKEN = "pw-4f9c1e", "tok-8d2b7a"


def _with_credentials(setting: str) -> str:
    """A value of ``setting`` with a password and a secret query value, pointing nowhere."""
    port = unused_port()
    return {
        # A queue URL has no query (it is refused: every request's path is appended to it).
        "WANBATCH_FAL_QUEUE_URL": f"http://u:{PASSWORD}@127.0.0.1:{port}/q",
        "WANBATCH_WEBHOOK_URL": f"http://u:{PASSWORD}@127.0.0.1:{port}/webhooks/fal?token={TOKEN}",
        "WANBATCH_LIMITS_URL": f"redis://:{PASSWORD}@127.0.0.1:{port}/0?token={TOKEN}",
        "WANBATCH_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:{port}/0?token={TOKEN}",
        "WANBATCH_DATABASE_URL": f"postgresql://u:{PASSWORD}@127.0.0.1:{port}/db?sslpassword={TOKEN}",
        "WANBATCH_OUTPUT_DIR": f"s3://AKIA{TOKEN}:{PASSWORD}@bucket/outputs",
    }[setting]


@pytest.mark.parametrize(
    "setting",
    [
        "WANBATCH_FAL_QUEUE_URL",
        "WANBATCH_WEBHOOK_URL",
        "WANBATCH_LIMITS_URL",
        "WANBATCH_BROKER_URL",
        "WANBATCH_DATABASE_URL",
        "WANBATCH_OUTPUT_DIR",
    ],
)
def test_no_password_or_token_of_a_url_is_printed(
    setting: str, wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue URL's password and every ``?token=`` were printed as written."""
    monkeypatch.setenv(setting, _with_credentials(setting))
    for args in (["doctor"], ["doctor", "--json"], ["status"]):
        run = wb(*args)
        said = run.stdout + run.stderr
        assert PASSWORD not in said, said
        assert TOKEN not in said, said
    code, checks, _ = _doctor(wb)
    assert code == 1
    failed = [c for c in checks.values() if c["status"] == "fail"]
    assert failed, checks
    if setting != "WANBATCH_OUTPUT_DIR":  # refused as a whole: no URL is shown
        assert any(":**@" in c["detail"] or ":***@" in c["detail"] for c in failed), failed


def test_the_jwks_url_s_credentials_are_not_printed(
    wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = f"http://u:{PASSWORD}@127.0.0.1:{unused_port()}/jwks.json?sig={TOKEN}"
    monkeypatch.setenv("WANBATCH_WEBHOOK_JWKS_URL", nowhere)
    get_settings.cache_clear()
    with _serving(get_settings()) as receiver:
        monkeypatch.setenv("WANBATCH_WEBHOOK_URL", f"{receiver}/webhooks/fal")
        code, checks, _ = _doctor(wb)
        assert (code, checks["receiver"]["status"]) == (1, "fail")
        detail = checks["receiver"]["detail"]
        assert "cannot verify fal's signatures" in detail, detail
        assert nowhere.replace(PASSWORD, "**").replace(TOKEN, "**") in detail, detail
        assert PASSWORD not in detail, detail
        assert TOKEN not in detail, detail
        human = wb("doctor")
        assert PASSWORD not in human.stdout + human.stderr
        assert TOKEN not in human.stdout + human.stderr


# --------------------------------------------------------------------------- doctor creates nothing


def _tree(root: Path) -> dict[str, tuple[str, int, bytes | None]]:
    """Everything under ``root``: each file's and folder's kind, permission bits and (files)
    bytes. Equal before and after: nothing was created, removed or changed."""
    found: dict[str, tuple[str, int, bytes | None]] = {}
    for folder, folders, files in os.walk(root):
        for entry in [*folders, *files]:
            path = Path(folder) / entry
            info = path.lstat()
            kind = "folder" if stat.S_ISDIR(info.st_mode) else "file"
            content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
            found[str(path.relative_to(root))] = (kind, stat.S_IMODE(info.st_mode), content)
    return found


#: Every form of the doctor: each must leave the folders exactly as they were.
DOCTOR_FORMS = (
    ("doctor",),
    ("doctor", "--simulate"),
    ("doctor", "--json"),
    ("doctor", "--simulate", "--json"),
)


def _doctor_changes_nothing(wb: Wb, root: Path) -> dict[str, dict[str, Any]]:
    """Run every form of the doctor; the tree under ``root`` is the same after each. The checks
    of ``doctor --simulate --json``."""
    before = _tree(root)
    for form in DOCTOR_FORMS:
        wb(*form)
        assert _tree(root) == before, f"`wanbatch {' '.join(form)}` changed the files"
    return {c["name"]: c for c in wb("doctor", "--simulate", "--json").json()["checks"]}


def test_doctor_creates_nothing_with_the_default_database_and_output_folder(
    wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, e2e_env: Path
) -> None:
    """In a new folder with neither WANBATCH_DATABASE_URL nor WANBATCH_OUTPUT_DIR, the doctor
    left ./.wanbatch/wanbatch.db (and its folder) and ./outputs/ behind. It says instead that
    the first command creates them, and creates nothing."""
    monkeypatch.delenv("WANBATCH_DATABASE_URL")
    monkeypatch.delenv("WANBATCH_OUTPUT_DIR")
    work = e2e_env.resolve()
    checks = _doctor_changes_nothing(wb, tmp_path)
    assert list(work.iterdir()) == []
    db = work / ".wanbatch" / "wanbatch.db"
    assert checks["database"] == {
        "name": "database",
        "status": "ok",
        "detail": f"sqlite:///.wanbatch/wanbatch.db: not created yet: the first command creates it at {db}",
        "fix": None,
    }
    assert checks["output storage"] == {
        "name": "output storage",
        "status": "ok",
        "detail": f"{work / 'outputs'}: not created yet: the first run creates it ({work} is writable)",
        "fix": None,
    }
    code, plain, _ = _doctor(wb)
    assert code == 0, plain
    # As a user runs it: the console script, in the folder.
    done = wanbatch("doctor", "--simulate")
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(work.iterdir()) == []
    # And the first command that stores a batch does create the database where the doctor said
    # (one that only reads, such as status, creates no empty one: jobs.database_home).
    assert wb("status").code == 0
    assert not db.exists()
    manifest = write_manifest(tmp_path / "proj", "first", FIRST_MANIFEST)
    assert wb("submit", manifest).code == 0
    assert db.is_file()


def test_doctor_creates_nothing_at_a_database_and_output_folder_not_there_yet(
    wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = tmp_path.resolve()
    db = root / "state" / "deep" / "wanbatch.db"
    out = root / "renders" / "deep"
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(out))
    checks = _doctor_changes_nothing(wb, tmp_path)
    assert (checks["database"]["status"], checks["database"]["detail"]) == (
        "ok",
        f"sqlite:///{db}: not created yet: the first command creates it at {db}",
    )
    assert (checks["output storage"]["status"], checks["output storage"]["detail"]) == (
        "ok",
        f"{out}: not created yet: the first run creates it ({root} is writable)",
    )
    assert not (root / "state").exists()
    assert not (root / "renders").exists()

    # SQLite's URI form creates the file, not its folder: a missing folder fails, says why.
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///file:{db}")
    checks = _doctor_changes_nothing(wb, tmp_path)
    assert checks["database"]["status"] == "fail"
    assert checks["database"]["detail"].endswith(
        f"its folder {db.parent} does not exist (SQLite creates no folder)"
    )
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///file:{root / 'uri.db'}")
    checks = _doctor_changes_nothing(wb, tmp_path)
    assert checks["database"]["status"] == "ok"
    assert checks["database"]["detail"].endswith(
        f"not created yet: the first command creates it at {root / 'uri.db'}"
    )

    # A read-only URL never creates the file: a missing one is a failure.
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{root / 'ro.db'}?mode=ro")
    checks = _doctor_changes_nothing(wb, tmp_path)
    assert checks["database"]["status"] == "fail"
    assert "does not exist, and mode=ro" in checks["database"]["detail"]
    assert "WANBATCH_DATABASE_URL" in checks["database"]["fix"]


def test_doctor_changes_nothing_in_an_existing_database_and_output_folder(
    wb: Wb, sim: SimulatorHandle, tmp_path: Path
) -> None:
    """An existing database is read, not written: no -wal/-shm left, its permissions as they
    were (the doctor tightened a world-readable one), its bytes the same; the output folder's
    probe file is removed again."""
    assert wb("status").code == 0  # creates and migrates the database
    db = tmp_path / "wanbatch.db"
    db.chmod(0o644)
    (tmp_path / "outputs").mkdir()
    checks = _doctor_changes_nothing(wb, tmp_path)
    assert checks["database"]["detail"].endswith(f"reachable, schema {SCHEMA_HEAD} (current)")
    assert checks["output storage"]["detail"] == f"{(tmp_path / 'outputs').resolve()} is writable"
    assert stat.S_IMODE(db.stat().st_mode) == 0o644


def test_a_database_or_output_folder_that_could_not_be_created_fails(
    wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = tmp_path.resolve()
    blocker = root / "blocker"
    blocker.write_text("a file where a folder should be")
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{blocker / 'state' / 'wanbatch.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(blocker / "outputs"))
    checks = _doctor_changes_nothing(wb, tmp_path)
    database, storage = checks["database"], checks["output storage"]
    assert database["status"] == storage["status"] == "fail"
    assert database["detail"].endswith(f"cannot be created: {blocker} is a file, not a folder")
    assert "WANBATCH_DATABASE_URL" in database["fix"]
    assert storage["detail"] == (
        f"WANBATCH_OUTPUT_DIR '{blocker / 'outputs'}' cannot be created: {blocker} is a file, not a folder"
    )
    assert "WANBATCH_OUTPUT_DIR" in storage["fix"]


def test_a_folder_this_user_may_not_write_fails(
    wb: Wb, sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not created yet, under a folder this user may not write to: the first command would
    fail, so the doctor does. Run as a user sees it (root without its override, see
    :func:`without_read_override`)."""
    locked = tmp_path.resolve() / "locked"
    locked.mkdir()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{locked / 'state' / 'wanbatch.db'}")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(locked / "outputs"))
    locked.chmod(0o555)
    try:
        before = _tree(tmp_path)
        done = wanbatch("doctor", "--simulate", "--json", prefix=without_read_override())
        assert _tree(tmp_path) == before
    finally:
        locked.chmod(0o755)
    assert done.returncode == 1, done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["database"]["status"] == checks["output storage"]["status"] == "fail"
    assert checks["database"]["detail"].endswith(f"cannot be created: {locked}: permission denied")
    assert checks["output storage"]["detail"].endswith(f"cannot be created: {locked}: permission denied")


def test_a_doctor_with_a_broker_runs_every_check_in_its_own_process(
    sim: SimulatorHandle, new_pg_database: Callable[[], str], redis_db: str
) -> None:
    """Audit (the operator's view): ``wanbatch doctor`` with a broker and PostgreSQL failed its
    downloads and limiter checks every time with ``ImportError: cannot import name 'poll' from
    partially initialized module 'worker.steps.poll'``: the checks run side by side and each
    imported ``worker.steps`` for the first time at once. The in-process tests never saw it (the
    modules were loaded already); a fresh process runs each check."""
    done = wanbatch(
        "doctor", "--json", env={"WANBATCH_DATABASE_URL": new_pg_database(), "WANBATCH_BROKER_URL": redis_db}
    )
    body = json.loads(done.stdout)
    failed = {c["name"]: c["detail"] for c in body["checks"] if "the check itself failed" in c["detail"]}
    assert failed == {}, failed
    checks = {c["name"]: c for c in body["checks"]}
    assert checks["downloads"]["status"] == "ok", checks["downloads"]
    assert checks["limiter"]["status"] in ("ok", "warn"), checks["limiter"]


def test_a_read_only_sqlite_database_fails_the_database_check(
    wb: Wb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that answers but refuses every write was "✓ reachable, schema … (current)":
    then `submit`, `run`, the workers and the receiver each refused. The check fails naming why."""
    here = os.environ["WANBATCH_DATABASE_URL"]
    assert here.startswith("sqlite:///")
    webhook_secret(_engine_for(here))  # the database made, at the current schema
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"{here}?mode=ro")
    get_settings.cache_clear()
    code, checks, _ = _doctor(wb)
    database = checks["database"]
    assert (code, database["status"]) == (1, "fail"), database
    assert (
        f"schema {SCHEMA_HEAD} (current), but read-only: WANBATCH_DATABASE_URL has mode=ro"
        in database["detail"]
    )
    assert "submit, run, the workers and the webhook receiver refuse to write" in database["detail"]
    assert "a database this user may write" in database["fix"]


@pytest.mark.postgres
def test_a_read_only_postgresql_database_fails_the_database_check(
    wb: Wb, monkeypatch: pytest.MonkeyPatch, new_pg_database: Callable[[], str]
) -> None:
    """The same on PostgreSQL: ``default_transaction_read_only`` on for the database (as on a
    replica, or a database an administrator froze): an empty one cannot even be given its schema."""
    url = new_pg_database()
    name = url.rsplit("/", 1)[1]
    with create_engine(
        url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT"
    ).connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
    monkeypatch.setenv("WANBATCH_DATABASE_URL", url)
    get_settings.cache_clear()
    code, checks, _ = _doctor(wb)
    database = checks["database"]
    assert (code, database["status"]) == (1, "fail"), database
    assert (
        "reachable, schema none yet, but read-only: PostgreSQL's transaction_read_only is on"
        in database["detail"]
    )


def test_a_read_only_database_of_a_newer_schema_fails_on_its_schema_first(
    wb: Wb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only database a newer wanbatch migrated: every command of this one refuses it,
    writable or not. The check said only "but read-only" and its fix (a database this user may
    write), which fixed nothing; it names the newer schema and its fix, as on a writable one."""
    here = os.environ["WANBATCH_DATABASE_URL"]
    assert here.startswith("sqlite:///")
    engine = _engine_for(here)
    webhook_secret(engine)  # the database made, at the current schema
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"{here}?mode=ro")
    get_settings.cache_clear()
    code, checks, _ = _doctor(wb)
    database = checks["database"]
    assert (code, database["status"]) == (1, "fail"), database
    assert "9999 is not one this wanbatch knows" in database["detail"]
    assert "upgrade wanbatch" in database["fix"]
