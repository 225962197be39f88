"""A PostgreSQL server that is frozen (SIGSTOP on the postmaster and its backends) while its
kernel still acknowledges every packet: neither TCP keepalives nor ``tcp_user_timeout`` ever
fire, and psycopg waits for an answer for ever.

The bug: SIGTERM (or Ctrl-C) to a ``wanbatch run`` against it never ended the process. The
signal was handled (psycopg's wait runs Python's signal handlers every 100 ms), but the stop
then gave the leases back on the main thread — database calls that never returned. Now a stop
that the database holds back asks it, on a connection of its own, whether it answers at all,
and when it does not, ends (exit 130) with one line saying so and what becomes of the jobs;
the next run, once the database answers, finishes the batch without sending any job twice.

The server is this test's own (never the shared one), thawed and stopped in a ``finally``.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from tests import probe_budget
from tests.chaos.chaos_harness import PostgresServer, migrated_postgres
from tests.e2e.e2e_helpers import Background, MakeManifest, subprocess_env, wait_for
from tests.ports import unused_port
from worker import running

JOBS = 6


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, migrated; thawed and stopped by it whatever happens."""
    with migrated_postgres() as server:
        yield server


@pytest.fixture
def slow_sim() -> Iterator[SimulatorHandle]:
    """Requests stay queued at "fal" for a while: the run is stopped with some there."""
    with running_simulator(
        SimulatorOptions(latency_seconds=1.5, latency_jitter=0.0, concurrency_limit=40, rng_seed=11)
    ) as handle:
        yield handle


class _QuickProbe(Background):
    """``wanbatch`` whose stop watch gives up on connecting to a frozen server sooner
    (:mod:`tests.probe_budget`): it never completes the connect, however long it is given."""

    def command(self) -> list[str]:
        return probe_budget.wanbatch_command()


def _count(url: str, where: str) -> int:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            row = conn.execute(f"SELECT count(*) FROM jobs WHERE {where}").fetchone()
    except psycopg.Error:
        return 0
    return int(row[0]) if row else 0


@pytest.mark.slow
def test_sigterm_ends_a_run_whose_database_is_frozen_and_the_next_run_finishes_it(
    own_postgres: PostgresServer, slow_sim: SimulatorHandle, manifest: MakeManifest, e2e_env: Path
) -> None:
    items = "\n".join(f"  - prompt: frozen database item {i}" for i in range(JOBS))
    path = manifest("frozen", f"name: frozen\nendpoint: fal-ai/wan-22\nitems:\n{items}\n")
    env = subprocess_env(
        slow_sim.url, own_postgres.url, MAX_OUTSTANDING="3", EMBEDDED_CONCURRENCY="3", LEASE_SECONDS="120"
    )
    url = own_postgres.url
    first = _QuickProbe(["run", str(path), "--no-progress"], env, e2e_env, "frozen-first")
    try:
        wait_for(
            "requests at fal",
            lambda: _count(url, "state IN ('queued', 'running') AND request_id IS NOT NULL") >= 2,
            first,
            step=0.1,
        )
        own_postgres.freeze()
        first.popen.send_signal(signal.SIGTERM)
        first.wait(90)  # fails the test, with its stderr, when it does not end
    finally:
        first.kill()
        own_postgres.thaw()
    err = first.stderr()
    assert first.popen.returncode == running.EXIT_INTERRUPTED, err
    assert "Traceback" not in err + first.stdout()
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert "the database is not answering" in last, err
    assert "the jobs are safe in the database" in last
    assert "never resent blindly" in last
    assert "run the same command again to resume" in last

    # Once the database answers, the next run finishes the batch: the jobs the stopped run held
    # are taken back (its process has ended), what was at fal is collected, nothing sent twice.
    second = Background(["run", str(path), "--no-progress"], env, e2e_env, "frozen-second")
    try:
        assert second.wait(180) == 0, second.stderr()
    finally:
        second.kill()
    assert _count(url, "state = 'succeeded'") == JOBS
    assert _count(url, "attempts = 1") == JOBS
    assert len(slow_sim.engine.ledger.entries) == JOBS


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A PostgreSQL URL whose server accepts connections and never says a word (what a frozen
    server looks like to a client): a listening socket nobody reads."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"postgresql://postgres@127.0.0.1:{listener.getsockname()[1]}/silent"


def test_a_database_that_never_answers_is_told_from_one_that_refuses(silent_server: str) -> None:
    said = running.database_silence(silent_server, within=1.0, connecting=1.0)
    assert said == "no answer within 1s (no connection)"
    # A closed port refuses at once: an answer, and the callers' own calls fail rather than hang.
    assert running.database_silence(f"postgresql://postgres@127.0.0.1:{unused_port()}/gone", within=5) is None


def test_a_run_says_when_its_database_stops_answering(
    silent_server: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The silence watch: no progress read for a while, and no answer to its own question,
    is one warning line (never a silent hang); a read that completes again is said too."""
    # A server that never says a word never completes the connect, however long it is given:
    # the watch's question need not wait the product's 30 s for it (tests.probe_budget).
    monkeypatch.setattr(running, "DATABASE_CONNECT_SECONDS", probe_budget.CONNECT_SECONDS)
    watch = running._SilenceWatch(silent_server, silence=0.0)
    with caplog.at_level(logging.INFO, logger="worker.running"):
        watch.check()
        assert watch._asking is not None
        watch._asking.join(running.DATABASE_CONNECT_SECONDS + 60)
        watch.check()  # said once per silence
        silent = [r for r in caplog.records if r.__dict__.get("event") == "database.silent"]
        assert len(silent) == 1
        message = silent[0].getMessage()
        assert "the database is not answering" in message
        assert "postgresql://postgres@127.0.0.1" in message
        assert "Ctrl-C stops the run" in message
        watch.answered()
    assert [r.__dict__.get("event") for r in caplog.records][-1] == "database.answers"


def test_a_submission_being_recorded_is_journalled_when_the_process_ends_without_the_database(
    tmp_path: Path,
) -> None:
    """fal accepted it and its write went out to a database that never answers: neither recorded
    nor refused, it would be lost with the process; ending now keeps it in the journal."""
    from dataclasses import replace
    from datetime import UTC, datetime

    from worker.steps.unrecorded import Accepted, Journal, Unrecorded, read_journal

    url = "postgresql://postgres@127.0.0.1:5999/x"
    unrecorded = Unrecorded(url, Journal(url, folders=[tmp_path]))
    accepted = Accepted(
        job_id="j1",
        attempt=1,
        request_id="0f3c2a9e-1d2b-4c5d-8e7f-9a0b1c2d3e4f",
        gateway_request_id=None,
        status_url=None,
        response_url=None,
        cancel_url=None,
        running=False,
        submitted_at=datetime(2026, 1, 2, tzinfo=UTC),
    )
    with unrecorded.recording(accepted):
        assert unrecorded.waiting() == []  # the usual path writes nothing
        kept = unrecorded.keep_all()
    assert kept == [accepted]
    assert unrecorded.journal.path is not None
    assert read_journal(unrecorded.journal.path) == [accepted]
    # Kept for good: a later save while the process ends (another step's keep) still has it.
    assert unrecorded.keep_all() == [accepted]
    done = replace(accepted, job_id="j2", request_id="1f3c2a9e-1d2b-4c5d-8e7f-9a0b1c2d3e4f")
    with unrecorded.recording(done):
        pass
    assert unrecorded.keep_all() == [accepted]  # a write done before the end is not held
