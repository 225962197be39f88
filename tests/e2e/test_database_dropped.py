"""A PostgreSQL connection dropped under an embedded `wanbatch run` is ridden out, not fatal.

The bug (audit "pgdrop"): `pg_terminate_backend` on the run's database mid-run ended the run with
exit 70, "internal error … please report it", after a step's full traceback: the conductor
re-raised every database error but a conflict, and the steps logged theirs as bugs. The jobs the
run held stayed leased, so the next run stalled on them for the length of a lease. Yet every job
ends terminal "whatever happens to … PostgreSQL", and a restarted server "leaves connections that
each fail one statement, which the steps survive".

Now the run pauses, says so in one warning line, and goes on: every job succeeds, none is paid
for twice. A database that stays away longer than a lease ends the run with one `error:` line and
exit 2 (the environment's problem, never "internal error"); the next run finishes the batch.

`wanbatch run` runs as a real subprocess against a simulator in this test process (its ledger
is what fal accepted) and a PostgreSQL database of this test's own: only that database's
connections are killed, and only it is closed to new ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from tests.conftest import PG_ADMIN_DSN
from tests.e2e.e2e_helpers import Background, MakeManifest, subprocess_env, wait_for

JOBS = 30


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    # Each request runs a while and ten at once: the run lasts some seconds, with requests at
    # fal, submits and downloads going on whenever the connections are killed.
    with running_simulator(
        SimulatorOptions(latency_seconds=0.3, latency_jitter=0.0, concurrency_limit=10, rng_seed=11)
    ) as handle:
        yield handle


@pytest.fixture
def database(new_pg_database: Callable[[], str]) -> Iterator[str]:
    """A PostgreSQL database of this test's own (its URL); open to connections again afterwards."""
    url = new_pg_database()
    yield url
    _admin(f'ALTER DATABASE "{_name(url)}" WITH ALLOW_CONNECTIONS true')


@pytest.fixture
def env(e2e_env: Path, sim: SimulatorHandle, database: str) -> dict[str, str]:
    return subprocess_env(sim.url, database, MAX_OUTSTANDING="10")


def _name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _admin(sql: str, params: tuple[Any, ...] | None = None) -> int:
    """Run ``sql`` on the server's admin database; its first value (0: no rows)."""
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        cursor = conn.execute(sql, params)
        row = cursor.fetchone() if cursor.description else None
    return int(row[0]) if row else 0


def _kill_connections(url: str) -> int:
    """Terminate every backend connected to this test's database (no other); how many."""
    return _admin(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        (_name(url),),
    )


def _manifest(manifest: MakeManifest, name: str) -> Path:
    items = "\n".join(f"  - prompt: a paper boat on a rainy street, take {i}" for i in range(JOBS))
    body = f"name: {name}\nendpoint: fal-ai/wan-22\ndefaults:\n  resolution: 480p\nitems:\n{items}\n"
    return manifest(name, body)


class Run(Background):
    """`wanbatch run MANIFEST [OPTIONS]` in the background (:class:`Background`)."""

    def __init__(self, path: Path, env: dict[str, str], cwd: Path, name: str, *options: str) -> None:
        super().__init__(["run", path, *options], env, cwd, name)

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self.out.read_text())
        return report

    def wait_for_accepted(self, sim: SimulatorHandle, accepted: int) -> None:
        """Until fal (the simulator) has accepted that many submits; the run must still be going."""
        wait_for(
            f"{accepted} accepted submits",
            lambda: sim.ledger()["accepted"] >= accepted,
            self,
            timeout=120,
            step=0.02,
        )

    def wait_for_error_line(self) -> None:
        """Until the run has printed its ``error:`` line (or an internal error's, or ended)."""
        deadline = time.monotonic() + 120
        while not any(line.startswith(("error:", "internal error:")) for line in self.stderr().splitlines()):
            if self.popen.poll() is not None:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"the run never said that the database is gone:\n{self.stderr()}")
            time.sleep(0.05)


def _assert_paid_once(sim: SimulatorHandle) -> None:
    ledger = sim.ledger()
    assert ledger["accepted"] == JOBS  # each job sent once
    assert ledger["duplicates"] == []  # nothing paid twice


def test_connections_killed_mid_run_are_ridden_out_and_every_job_succeeds(
    manifest: MakeManifest, sim: SimulatorHandle, env: dict[str, str], e2e_env: Path
) -> None:
    database = env["WANBATCH_DATABASE_URL"]
    run = Run(_manifest(manifest, "pgdrop"), env, e2e_env, "run", "--json")
    try:
        # Three times mid-run, every connection of the run (its pool, its listener) is killed:
        # each meets the conductor or a step in the middle of its work.
        for accepted in (5, 15, 25):
            run.wait_for_accepted(sim, accepted)
            assert _kill_connections(database) >= 1
        code = run.wait(240)
    finally:
        run.kill()
    err = run.stderr()
    assert "internal error" not in err
    assert "Traceback" not in err
    assert code == 0, err
    # The outage was met and said so, in one line each time (not a traceback).
    assert "the database is unavailable" in err or "database unreachable" in err, err
    report = run.report()
    assert (report["total"], report["counts"]["succeeded"]) == (JOBS, JOBS), report
    _assert_paid_once(sim)
    assert len(list((Path(env["WANBATCH_OUTPUT_DIR"]) / "pgdrop").glob("*.mp4"))) == JOBS


def test_a_database_gone_longer_than_a_lease_ends_the_run_in_one_line_and_the_next_run_finishes(
    manifest: MakeManifest, sim: SimulatorHandle, env: dict[str, str], e2e_env: Path
) -> None:
    database = env["WANBATCH_DATABASE_URL"]
    path = _manifest(manifest, "pgdrop-gone")
    short = {**env, "WANBATCH_LEASE_SECONDS": "3"}  # how long an outage is ridden out
    first = Run(path, short, e2e_env, "first", "--no-progress")
    try:
        first.wait_for_accepted(sim, 5)
        # Closed to new connections, then every connection dropped: gone until reopened.
        _admin(f'ALTER DATABASE "{_name(database)}" WITH ALLOW_CONNECTIONS false')
        assert _kill_connections(database) >= 1
        first.wait_for_error_line()
        # Back: a submission fal accepted during the outage is recorded now, before the run
        # exits (it never became "outcome unknown").
        _admin(f'ALTER DATABASE "{_name(database)}" WITH ALLOW_CONNECTIONS true')
        code = first.wait(240)
    finally:
        first.kill()
        _admin(f'ALTER DATABASE "{_name(database)}" WITH ALLOW_CONNECTIONS true')
    err = first.stderr()
    assert "internal error" not in err
    assert "Traceback" not in err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "the database stopped answering" in errors[0]
    assert "WANBATCH_LEASE_SECONDS" in errors[0]
    assert "run the same command again once the database answers" in errors[0]

    second = Run(path, env, e2e_env, "second", "--json")
    try:
        code = second.wait(240)
    finally:
        second.kill()
    assert code == 0, second.stderr()
    again = second.report()
    assert (again["total"], again["counts"]["succeeded"]) == (JOBS, JOBS), again
    _assert_paid_once(sim)
