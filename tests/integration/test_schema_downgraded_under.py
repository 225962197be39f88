"""A schema downgraded under a running process of a newer wanbatch (``alembic downgrade`` with
the workers left running), on SQLite and PostgreSQL.

Before: the conductor's every round failed on the missing column (``UndefinedColumn: column
jobs.not_in_manifest does not exist``; on SQLite "no such column", taken for an outage), logged
"conductor round failed; going on after a pause" with its traceback about once a second, and
its batches stalled silently. Now it reads the schema's revision as the start-up does, says in one
line that the database is at an older schema, and works on it no more: the run's loop ends with
that line (exit 2), and a worker's ticker stops the worker, which exits 2 with it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from jobs.db import SCHEMA_HEAD, downgrade, make_engine, migrate
from jobs.errors import SchemaBehindError
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker import ticker as ticker_module
from worker.conductor import Conductor
from worker.ticker import Ticker

URL = "https://queue.test"
KEY = "downgraded-key-7a2c"
#: Below 0039, ``jobs.not_in_manifest`` (which the conductor reads) is gone; a downgrade of one
#: step from the head may drop only what it never reads (0040's dashboard sessions).
_PREVIOUS = "0038"


@pytest.fixture(params=["sqlite", "postgresql"])
def downgraded(
    request: pytest.FixtureRequest, tmp_path: Path, new_pg_database: Callable[[], str]
) -> Iterator[Engine]:
    """A database of its own with a batch to work on, migrated by this version and then taken
    down one revision (as ``alembic downgrade`` by hand would, the processes still running)."""
    url = f"sqlite:///{tmp_path / 'd.db'}" if request.param == "sqlite" else new_pg_database()
    engine = make_engine(url)
    migrate(engine, from_models=False)
    add_batch(engine, "downgraded", [("fal-ai/wan-22", {"prompt": "p"})])
    yield engine
    engine.dispose()


def _said(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_workers_conductor_stops_in_one_line_on_a_schema_downgraded_under_it(
    downgraded: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    rt = make_runtime(downgraded, settings_for(URL, KEY))
    conductor = Conductor(rt, stream=False)
    downgrade(downgraded, _PREVIOUS)
    stopping = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            conductor.run(stopping, resilient=True)
        except BaseException as exc:
            failure.append(exc)

    runner = threading.Thread(target=run)
    with caplog.at_level(logging.INFO):
        runner.start()
        runner.join(30)  # only so that a conductor that goes on for ever fails the test
        stopping.set()
        runner.join(20)
    conductor.close()
    assert [type(e) for e in failure] == [SchemaBehindError], _said(caplog)
    said = str(failure[0])
    assert "\n" not in said
    assert said.startswith(
        f"the database is at schema {_PREVIOUS}, older than this wanbatch's {SCHEMA_HEAD} "
    )
    assert "stop the newer processes before a downgrade" in said
    assert not [r for r in _said(caplog) if r.exc_info or "conductor round failed" in r.getMessage()]


def test_a_workers_ticker_stops_the_worker_with_that_line(
    downgraded: Engine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ticker (a worker's conductor thread) says it in one warning line and stops its worker
    as SIGTERM does; ``wanbatch worker`` exits 2 with :attr:`Ticker.failure`."""
    stops: list[int] = []
    monkeypatch.setattr(ticker_module, "stop_this_worker", lambda: stops.append(1))
    rt = make_runtime(downgraded, settings_for(URL, KEY))
    downgrade(downgraded, _PREVIOUS)
    ticker = Ticker(lambda: rt, rt.settings.tick_interval)
    with caplog.at_level(logging.INFO):
        ticker.start()
        ticker.join(30)  # only so that a ticker that goes on for ever fails the test
        ticker.shutdown()
    assert stops == [1]
    assert isinstance(ticker.failure, SchemaBehindError)
    (line,) = [r for r in _said(caplog) if r.name == "worker.ticker"]
    assert line.getMessage() == f"{ticker.failure}; this worker stops"
    assert line.exc_info is None
    assert not [r for r in _said(caplog) if r.exc_info]
