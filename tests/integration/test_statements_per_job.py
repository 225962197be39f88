"""What an embedded ``run`` on SQLite asks the database per job, counted on SQLite's own side.

Issue #11: every statement and transaction a job costs is CPU (and a ``fdatasync`` per commit)
that a hand-written script without a database does not pay. A job's four durable moves —
claimed (``submitting``), its POST fenced before it leaves, its request recorded, its video
stored — each commit on their own, and the statuses fal streams commit with the dispatch round
they free a slot for; what rides along with them is what these tests pin.

Review: the move out of the states in which a job waits on fal (its video stored) ran
``DELETE FROM key_refusals WHERE job_id = ?`` for every job, though nearly none has a refusal:
a statement per job for nothing. The UPDATE of the move now says whether the job has any, and
the DELETE runs only then (:data:`jobs.store.transitions._REFUSALS_HELD`;
``tests/integration/test_key_refusals_go.py`` checks that refusals still go).
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, event

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import batches
from jobs.settings import Settings, get_settings
from worker.running import process_batch

JOBS = 6
MANIFEST = "name: counted\nendpoint: fal-ai/wan-22\ndefaults:\n  resolution: 480p\nitems:\n" + "".join(
    f"  - prompt: A paper boat, take {i}\n" for i in range(JOBS)
)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorHandle]:
    with running_simulator(
        SimulatorOptions(latency_seconds=0.1, latency_jitter=0.0, concurrency_limit=4, rng_seed=5)
    ) as handle:
        yield handle


@pytest.fixture
def settings(
    sim: SimulatorHandle, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    sim.reset()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    yield Settings(
        database_url=sqlite_url,
        FAL_KEY=SecretStr("counted-key-5e1b"),
        fal_queue_url=sim.url,
        fal_rest_url=sim.url,
        output_dir=tmp_path / "outputs",
        poll_min_interval=0.05,
        poll_max_interval=0.2,
        tick_interval=0.05,
        submit_rate=100,
        max_outstanding=4,
    )
    get_settings.cache_clear()


class _Traced:
    """Every statement SQLite runs on the connections opened meanwhile (``sqlite3``'s trace
    callback: the statements the store runs straight on the driver's cursor too), by its first
    three words. (Commits are not pinned: the run's ticks renew leases and mark the clock as
    often as the machine's speed makes them.)"""

    def __init__(self) -> None:
        self.statements: Counter[str] = Counter()
        self._lock = threading.Lock()

    def connect(self, dbapi_connection: Any, _record: Any) -> None:
        def seen(sql: str) -> None:
            kind = " ".join(sql.split()[:3]).upper()
            with self._lock:
                self.statements[kind] += 1

        dbapi_connection.set_trace_callback(seen)

    def count(self, pattern: str) -> int:
        return sum(n for kind, n in self.statements.items() if re.match(pattern, kind))


@pytest.fixture
def traced() -> Iterator[_Traced]:
    traced = _Traced()
    event.listen(Engine, "connect", traced.connect)
    try:
        yield traced
    finally:
        event.remove(Engine, "connect", traced.connect)


def test_a_job_leaving_fal_runs_no_delete_of_refusals_it_does_not_have(
    settings: Settings, tmp_path: Path, traced: _Traced
) -> None:
    manifest = tmp_path / "batch.yaml"
    manifest.write_text(MANIFEST, encoding="utf-8")
    submitted = batches.submit_manifest(manifest, settings)
    report, _stats = process_batch(submitted.batch_id, settings, show_progress=False, serve_metrics=False)
    assert report["finished"] == report["total"] == JOBS
    assert report["counts"].get("succeeded") == JOBS, report["counts"]

    # Before: one per job (its move to ``succeeded``), though no job had a refusal.
    assert traced.count(r"DELETE FROM KEY_REFUSALS") == 0
    # Each job's moves, each an UPDATE, and their event rows: nothing more rides on them.
    moves = traced.count(r"INSERT INTO JOB_EVENTS")
    assert JOBS * 4 <= moves <= JOBS * 5, (
        traced.statements
    )  # submitting, queued, (running,) downloading, succeeded
