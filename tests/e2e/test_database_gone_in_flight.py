"""A ``wanbatch run`` whose database goes away for longer than a lease while a submit POST is on
its way to fal: the stop waits for fal's answer and keeps it in the journal, and the next run
adopts it — the job at fal once, never sent again, never ``submit_unknown``.

It ended at once, before: only Ctrl-C's stop waited for the answers of submits already sent.
The run stopped by the database gave what it could back and ended (exit 2) while fal held the
accepted and billed request; its answer was never read, and the next run found the job without a
request id and settled it ``submit_unknown`` after the lease (``rerun --failed-only`` then paid a
second time, the ``resubmit`` policy too).

A real ``wanbatch run`` subprocess against a PostgreSQL of the test's own (a
:class:`PostgresServer` on a free port, stopped by the test: never the shared one) and the
simulator holding the one submit POST (its ``submit_slow`` fault).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from falsim import FaultRule, SimulatorOptions, running_simulator
from tests.chaos.chaos_harness import PostgresServer, migrated_postgres
from tests.e2e.e2e_helpers import Background, subprocess_env, wait_for
from worker.steps.unrecorded import PREFIX, read_journal

pytestmark = pytest.mark.slow

MANIFEST = "name: gone-in-flight\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a lighthouse in a gale\n"
#: The lease, which is also how long the run waits for its database before it stops.
LEASE = 3
#: How long fal takes to answer the submit: the database is gone before, and the run stopped
#: (past the lease) before the answer comes.
ANSWER_DELAY = LEASE + 8


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, migrated; stopped and removed by it whatever happens."""
    with migrated_postgres() as server:
        yield server


def _job(url: str) -> tuple[str, str | None, int, str | None]:
    with psycopg.connect(url, autocommit=True, connect_timeout=30) as conn:
        row = conn.execute("SELECT state, request_id, attempts, error_type FROM jobs").fetchone()
    assert row is not None
    return row[0], row[1], row[2], row[3]


def test_a_run_whose_database_went_away_keeps_the_answer_of_its_submit_in_flight(
    e2e_env: Path, tmp_path: Path, own_postgres: PostgresServer
) -> None:
    (e2e_env / "m.yaml").write_text(MANIFEST)
    journals = tmp_path / "tmp"  # where the journal of accepted submissions goes (PostgreSQL)
    journals.mkdir()
    options = SimulatorOptions(
        latency_seconds=0.1,
        latency_jitter=0.0,
        faults={"submit_slow": FaultRule(next=1, params={"delay": ANSWER_DELAY})},
    )
    with running_simulator(options) as sim:
        env = {
            **subprocess_env(sim.url, own_postgres.url, LEASE_SECONDS=str(LEASE), READ_TIMEOUT="60"),
            "TMPDIR": str(journals),
        }
        first = Background(["run", "m.yaml", "--no-progress"], env, e2e_env, "first")
        try:
            wait_for(
                "the submit POST held at fal",
                lambda: bool(sim.engine.faults.fired.get("submit_slow")),
                first,
                timeout=120,
            )
            own_postgres.crash()  # the database goes away, for longer than a lease
            code = first.wait(timeout=ANSWER_DELAY + 120)
        finally:
            first.kill()
        err = " ".join(first.stderr().split())
        assert code == 2, err
        assert "Traceback" not in err, err
        assert err.count("waiting for 1 submit(s) already sent to fal to be answered (up to 60s;") == 1, err
        (journal,) = journals.glob(f"{PREFIX}*")
        (kept,) = read_journal(journal) or []
        assert kept.request_id in err, err
        lost = "1 accepted submission(s) could not be recorded (fal has them, and bills them)"
        assert f"{lost}: job {kept.job_id}" in err, err
        assert f"kept in {journal}: the next run on this host records them (none is sent again)" in err, err
        assert "run the same command again once the database answers, to resume" in err, err
        assert len(sim.ledger()["entries"]) == 1

        # The database is back: the next run records the kept request id and finishes the job
        # from it, without a second POST.
        own_postgres.start()
        second = Background(["run", "m.yaml", "--no-progress"], env, e2e_env, "second")
        try:
            assert second.wait(timeout=180) == 0, second.stderr()
        finally:
            second.kill()
        state, request_id, attempts, error_type = _job(own_postgres.url)
        assert (state, request_id, attempts, error_type) == ("succeeded", kept.request_id, 1, None)
        assert len(sim.ledger()["entries"]) == 1
        assert not list(journals.glob(f"{PREFIX}*"))  # recorded: the journal is gone
