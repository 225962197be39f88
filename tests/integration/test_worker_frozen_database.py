"""A ``wanbatch worker`` whose PostgreSQL server freezes (SIGSTOP on the postmaster and its
backends: the kernel still acknowledges every packet, so neither TCP keepalives nor
``tcp_user_timeout`` ever fire, and psycopg waits for an answer for ever), then is asked to stop.

The bug: SIGTERM (or Ctrl-C, twice) never ended the worker, and it said nothing. Celery's warm
shutdown waited for the running task, whose write of the request id fal had just accepted never
returned; then the ticker's heartbeat delete, and Python's exit joining the pool's threads, on
the same frozen server. Killed at last (``docker stop``'s SIGKILL), the worker took that request
id with it: the next tick found the job ``submitting`` with no request id (``submit_unknown``,
which a resend policy may pay for twice). Now a stop still under way a few seconds after the
signal asks the database, on a connection of its own, whether it answers at all, and when it does
not, keeps the accepted submission in the journal of :mod:`worker.steps.unrecorded`, ends in one
line saying what becomes of its jobs, and the next worker on this host records it: the job
finishes, sent and paid for once.

The PostgreSQL server is this test's own (never the shared one), thawed and stopped in a
``finally``; the broker is a Redis database claimed for the test and flushed afterwards.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bench.distributed import Scenario, environment, start_workers, stop_processes, tail
from bench.distributed import wanbatch_command as wanbatch
from falsim import SimulatorOptions, running_simulator
from tests import probe_budget
from tests.chaos.chaos_harness import PostgresServer, _process_state, migrated_postgres
from worker.steps.unrecorded import PREFIX, SUFFIX, read_journal

pytestmark = [pytest.mark.slow, pytest.mark.redis]

MANIFEST = """\
name: frozen-worker
endpoint: fal-ai/wan-22
items:
  - prompt: a lighthouse at dusk
"""

#: Generous caps: a condition polled for, never a duration asserted.
CAP_SECONDS = 120.0


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, migrated; thawed and stopped by it whatever happens."""
    with migrated_postgres() as server:
        yield server


def _job(url: str) -> dict[str, Any]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute("SELECT state, request_id, attempts FROM jobs").fetchone()
    assert row is not None
    return {"state": row[0], "request_id": row[1], "attempts": row[2]}


def _until(what: str, check: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + CAP_SECONDS
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{tail(log, 60)}")
        time.sleep(0.1)


def _ended(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


@pytest.mark.parametrize(
    "signals",
    [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]],
    ids=["SIGTERM", "SIGINT-twice"],
)
def test_a_worker_whose_database_froze_stops_on_a_signal_and_keeps_what_fal_accepted(
    signals: list[signal.Signals], own_postgres: PostgresServer, redis_db: str, tmp_path: Path
) -> None:
    (tmp_path / "manifest.yaml").write_text(MANIFEST)
    logs = tmp_path / "logs"
    logs.mkdir()
    journals = tmp_path / "tmp"  # the worker's temporary folder: where its journal goes
    journals.mkdir()
    scenario = Scenario(jobs=1, workers=1, concurrency=2, cap=4, latency=0.2, sim_concurrency=4)
    url = own_postgres.url
    with running_simulator(SimulatorOptions(latency_seconds=0.2, latency_jitter=0.0)) as sim:
        env = environment(scenario, url, redis_db, sim.url, tmp_path / "outputs")
        env["TMPDIR"] = str(journals)
        done = subprocess.run(
            [*wanbatch(), "submit", str(tmp_path / "manifest.yaml"), "--json"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["total"] == 1

        # The worker stops itself right after fal accepted the job's submit, before its request
        # id is recorded (worker.chaos's stop point); the server is frozen meanwhile, and the
        # worker goes on into a write that never returns.
        # Its probe of the frozen server gives up on the connect sooner than the product's 30 s
        # (tests.probe_budget): a frozen server never completes it, however long it is given.
        first = start_workers(
            scenario,
            {**env, "WANBATCH_CHAOS_STOP_POINTS": "after_post:1"},
            tmp_path,
            logs,
            command=probe_budget.wanbatch_command(),
        )
        log = logs / "worker-0.log"
        worker = first[0]
        try:
            stopped = "the worker to stop after fal accepted the submit"
            _until(stopped, lambda: _process_state(worker.pid) == "T", log)
            assert len(sim.ledger()["entries"]) == 1  # fal has it
            own_postgres.freeze()
            worker.send_signal(signal.SIGCONT)
            for sig in signals:
                worker.send_signal(sig)
                time.sleep(0.5)  # two separate Ctrl-C, not one burst
            _until("the worker to end", lambda: _ended(worker), log)
        finally:
            stop_processes(first, grace=5)
            own_postgres.thaw()
        text = log.read_text(errors="replace")
        assert worker.returncode == 1, text  # not the warm shutdown's 0: its leases stay
        assert "Traceback" not in text, text
        last = [line for line in text.splitlines() if line.strip()][-1]
        assert "the database is not answering" in last, text
        assert "accepted submission" in last, text
        kept = list(journals.glob(f"{PREFIX}*{SUFFIX}"))
        assert len(kept) == 1, text
        entries = read_journal(kept[0])
        assert entries is not None
        assert len(entries) == 1
        assert str(kept[0]) in last
        assert _job(url)["request_id"] is None  # the database never got it

        # Once the database answers, the next worker on this host records the kept submission
        # and follows it: the job succeeds on that very request, sent (and paid for) once.
        again = tmp_path / "again"
        again.mkdir()
        second = start_workers(scenario, env, tmp_path, again)
        try:
            _until("the job to succeed", lambda: _job(url)["state"] == "succeeded", again / "worker-0.log")
        finally:
            stop_processes(second)
        job = _job(url)
        assert job["request_id"] == entries[0].request_id
        assert job["attempts"] == 1
        assert len(sim.ledger()["entries"]) == 1
        assert not list(journals.glob(f"{PREFIX}*{SUFFIX}"))
