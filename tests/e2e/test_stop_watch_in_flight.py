"""The stop watch of a ``wanbatch worker`` (:func:`worker.running.worker_stop_watch`) against a
database of the test's own (a :class:`PostgresServer` on a free port) and a submit POST held at
"fal" (the simulator's ``submit_slow`` fault).

* A database that answers every statement but is slow to accept a NEW connection
  (``pre_auth_delay``: a loaded server, a pooler queueing clients, a slow name lookup of its
  host) is not frozen: the worker's warm shutdown waits for its task and exits 0. It used to be
  judged "not answering" (the watch's probe opens a new connection, 4 s budget) and the worker
  exited 1 mid-task, the POST's answer lost.
* A database that is frozen (SIGSTOP) while a submit POST is in flight: the worker waits for the
  POST's answer before ending, keeps it in the journal, and the next worker records it — the
  job at fal once, never sent again. It used to end at once, and the answer that arrived after
  the journal was written was lost: the job ``submitting`` without a request id, outcome unknown.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from bench.distributed import Scenario, claimed_redis_db, environment, start_workers, stop_processes
from bench.distributed import wanbatch_command as wanbatch
from falsim import FaultRule, SimulatorOptions, running_simulator
from falsim.server import SimulatorHandle
from jobs.settings import Settings
from tests import probe_budget
from tests.chaos.chaos_harness import PostgresServer, migrated_postgres
from worker import running

pytestmark = pytest.mark.slow

#: A generous cap on a wait for a condition the product sets no bound to (a worker started,
#: the kept answer recorded by the next one): never a timed assertion.
CAP = 240.0
#: What a loaded machine adds to a wait the product bounds (a process's start-up and exit, the
#: simulator's and PostgreSQL's threads starved of CPU): never a timed assertion either.
LOAD_SLACK = 120.0


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, migrated; thawed and stopped by it whatever happens."""
    with migrated_postgres() as server:
        yield server


@pytest.fixture
def broker(redis_url: str) -> Iterator[str]:
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as url:
        yield url


def _wait(what: str, condition: Callable[[], bool], cap: float = CAP) -> None:
    end = time.monotonic() + cap
    while not condition():
        assert time.monotonic() < end, f"never: {what}"
        time.sleep(0.2)


def _job(url: str) -> tuple[str, str | None, int]:
    with psycopg.connect(url, autocommit=True, connect_timeout=30) as conn:
        row = conn.execute("SELECT state, request_id, attempts FROM jobs").fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def _start(
    tmp_path: Path, server: PostgresServer, broker: str, sim: SimulatorHandle
) -> tuple[Scenario, dict[str, str]]:
    manifest = "name: inflight\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a lighthouse\n"
    (tmp_path / "m.yaml").write_text(manifest)
    (tmp_path / "logs").mkdir()
    (tmp_path / "tmp").mkdir()
    scenario = Scenario(jobs=1, workers=1, concurrency=2, cap=4, latency=0.2, sim_concurrency=4)
    env = environment(scenario, server.url, broker, sim.url, tmp_path / "out")
    env["TMPDIR"] = str(tmp_path / "tmp")  # where the journal of accepted submissions goes
    env["WANBATCH_READ_TIMEOUT"] = "120"
    done = subprocess.run(
        [*wanbatch(), "submit", str(tmp_path / "m.yaml"), "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return scenario, env


def _post_deadline(env: dict[str, str]) -> float:
    """The longest a submit POST of the worker takes, by its own HTTP deadline: connect, then
    twice the read timeout (:func:`worker.running.say_sends_awaited`), from its environment."""
    fields = Settings.model_fields
    connect = float(env.get("WANBATCH_CONNECT_TIMEOUT", fields["connect_timeout"].default))
    read = float(env.get("WANBATCH_READ_TIMEOUT", fields["read_timeout"].default))
    return connect + 2 * read


def _warm_stop_bound(env: dict[str, str]) -> float:
    """How long a warm shutdown may wait for the task whose POST is in flight: its deadline."""
    return _post_deadline(env) + LOAD_SLACK


def _hung_stop_bound(env: dict[str, str]) -> float:
    """How long a worker whose database is frozen may take to end, by the product's bounds: the
    stop watch's grace, its probe's connect (:mod:`tests.probe_budget`'s), then the wait for the
    answers of the POSTs in flight (:func:`worker.running.wait_for_sends`: their deadline and a
    margin). CI, loaded: the test's fixed 240 s was shorter than that 263 s."""
    watch = running.STOP_HANG_GRACE_SECONDS + probe_budget.CONNECT_SECONDS
    return watch + _post_deadline(env) + running.SEND_ANSWER_MARGIN_SECONDS + LOAD_SLACK


def _held_at_fal(sim: SimulatorHandle) -> bool:
    return bool(sim.engine.faults.fired.get("submit_slow"))


def test_a_database_slow_to_accept_new_connections_is_not_taken_for_a_frozen_one(
    tmp_path: Path, own_postgres: PostgresServer, broker: str
) -> None:
    options = SimulatorOptions(
        latency_seconds=0.2,
        latency_jitter=0.0,
        faults={"submit_slow": FaultRule(next=1, params={"delay": 20})},
    )
    with running_simulator(options) as sim:
        scenario, env = _start(tmp_path, own_postgres, broker, sim)
        worker = start_workers(scenario, env, tmp_path, tmp_path / "logs")[0]
        try:
            _wait("the submit POST held at fal", lambda: _held_at_fal(sim))
            with psycopg.connect(own_postgres.url, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET pre_auth_delay = '6s'")
                conn.execute("SELECT pg_reload_conf()")
            time.sleep(1.0)  # the reload reaches the postmaster (no timing asserted)
            worker.send_signal(signal.SIGTERM)
            _wait("the worker ends", lambda: worker.poll() is not None, _warm_stop_bound(env))
        finally:
            stop_processes([worker], grace=2)
        with psycopg.connect(own_postgres.url, autocommit=True, connect_timeout=30) as conn:
            conn.execute("ALTER SYSTEM RESET pre_auth_delay")
            conn.execute("SELECT pg_reload_conf()")
        log = (tmp_path / "logs" / "worker-0.log").read_text(errors="replace")
        assert "the database is not answering" not in log, log
        assert worker.returncode == 0, log
        state, request_id, attempts = _job(own_postgres.url)
        assert request_id is not None, (state, log)
        assert attempts == 1
        assert len(sim.ledger()["entries"]) == 1


def test_a_frozen_database_waits_for_the_submit_in_flight_and_the_next_worker_records_it(
    tmp_path: Path, own_postgres: PostgresServer, broker: str
) -> None:
    # Held at fal past the watch's whole probe (running.STOP_HANG_GRACE_SECONDS, then the
    # connect's budget: the product's 30 s, here tests.probe_budget's, a frozen server never
    # completing the connect however long it is given), so that the answer comes only while the
    # worker is about to end. As much room after the probe as the product's 30 s had with 50.
    delay = running.STOP_HANG_GRACE_SECONDS + probe_budget.CONNECT_SECONDS + 17
    options = SimulatorOptions(
        latency_seconds=0.2,
        latency_jitter=0.0,
        faults={"submit_slow": FaultRule(next=1, params={"delay": delay})},
    )
    with running_simulator(options) as sim:
        scenario, env = _start(tmp_path, own_postgres, broker, sim)
        logs = tmp_path / "logs"
        first = start_workers(scenario, env, tmp_path, logs, command=probe_budget.wanbatch_command())[0]
        try:
            _wait("the submit POST held at fal", lambda: _held_at_fal(sim))
            own_postgres.freeze()
            first.send_signal(signal.SIGTERM)
            _wait("the first worker ends", lambda: first.poll() is not None, _hung_stop_bound(env))
        finally:
            stop_processes([first], grace=2)
            own_postgres.thaw()
        log = (logs / "worker-0.log").read_text(errors="replace")
        assert "Traceback" not in log, log
        assert first.returncode == running.WORKER_HUNG_EXIT, log
        assert "the database is not answering" in log, log
        assert "waited for 1 submit(s) in flight at fal" in log, log
        assert "kept in" in log, log
        assert len(sim.ledger()["entries"]) == 1

        # The next worker on this host records the kept answer: the job at fal once, never resent.
        (logs / "worker-0.log").rename(logs / "first.log")
        second = start_workers(scenario, env, tmp_path, logs)[0]
        try:
            _wait("the kept request id recorded", lambda: _job(own_postgres.url)[1] is not None)
        finally:
            stop_processes([second], grace=20)
        state, request_id, attempts = _job(own_postgres.url)
        assert attempts == 1, (state, request_id)
        assert state != "submit_unknown"
        assert len(sim.ledger()["entries"]) == 1
