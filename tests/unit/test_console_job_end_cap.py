"""The console's cap on job-ending step lines (:func:`worker.logs.console_job_end_cap`): the first
few reach the terminal, then one line says how many more; every other sink gets every line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from worker import logs
from worker.logs import CONSOLE_JOB_END_LINES, console_job_end_cap, step_done

LOG = logging.getLogger("worker.embedded")


class _Collect(logging.Handler):
    """Another sink: a log file, an embedding application's handler."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def sinks(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[io.StringIO, io.StringIO, _Collect]]:
    """The console as :func:`worker.logs.configure_logging` makes it (text), a JSON console, and
    another handler, all on the root logger."""
    caplog.set_level(logging.INFO)
    text, as_json = io.StringIO(), io.StringIO()
    console = logs._ConsoleHandler(text)
    console.setFormatter(logs.formatter_for("text"))
    json_console = logs._ConsoleHandler(as_json)
    json_console.setFormatter(logs.formatter_for("json"))
    other = _Collect()
    root = logging.getLogger()
    for handler in (console, json_console, other):
        root.addHandler(handler)
    try:
        yield text, as_json, other
    finally:
        for handler in (console, json_console, other):
            root.removeHandler(handler)


def _fail_jobs(count: int, outcome: str = "failed") -> None:
    def one(i: int) -> None:
        step_done(LOG, "submit", f"job-{i:03d}", outcome, error="HTTP 422: no such file", error_type="422")

    with ThreadPoolExecutor(4) as pool:  # the step pools log them from their threads
        list(pool.map(one, range(count)))


def test_the_console_gets_the_first_lines_then_one_note(
    sinks: tuple[io.StringIO, io.StringIO, _Collect],
) -> None:
    text, as_json, other = sinks
    with console_job_end_cap(lambda n: f"{n} more not shown: `wanbatch export B` lists them"):
        _fail_jobs(25)
        _fail_jobs(3, outcome="cancelled")
        step_done(LOG, "submit", "job-retry", "retry", error="HTTP 503", error_type="503")  # not an end
        LOG.warning("some other warning")
    lines = text.getvalue().splitlines()
    ended = [line for line in lines if " submit failed " in line or " submit cancelled " in line]
    assert len(ended) == CONSOLE_JOB_END_LINES
    assert (
        lines[-1]
        == f"WARNING worker.logs: {28 - CONSOLE_JOB_END_LINES} more not shown: `wanbatch export B` lists them"
    )
    assert any("job-retry: submit retry" in line for line in lines)  # other lines all go through
    assert "WARNING worker.embedded: some other warning" in lines
    # Every other sink: every line, and no note.
    records = [json.loads(line) for line in as_json.getvalue().splitlines()]
    assert len([r for r in records if r.get("outcome") in ("failed", "cancelled")]) == 28
    assert not [r for r in records if r["event"] == "log.job_lines_held_back"]
    assert len([r for r in other.records if logs.is_job_end_line(r)]) == 28
    assert not [r for r in other.records if "more not shown" in r.getMessage()]


def test_the_cap_is_per_run_and_gone_after_it(sinks: tuple[io.StringIO, io.StringIO, _Collect]) -> None:
    text, _as_json, _other = sinks
    with console_job_end_cap(lambda n: f"{n} more"):
        _fail_jobs(CONSOLE_JOB_END_LINES)  # as many as shown: no note
    assert "more" not in text.getvalue()
    _fail_jobs(CONSOLE_JOB_END_LINES + 5)  # outside a run: no cap
    with console_job_end_cap(lambda n: f"{n} more", limit=2):
        _fail_jobs(5)
    lines = text.getvalue().splitlines()
    assert len([line for line in lines if " submit failed " in line]) == 2 * CONSOLE_JOB_END_LINES + 5 + 2
    assert lines[-1] == "WARNING worker.logs: 3 more"


def test_the_note_comes_when_the_run_is_interrupted_too(
    sinks: tuple[io.StringIO, io.StringIO, _Collect],
) -> None:
    text, _as_json, _other = sinks

    def interrupted_run() -> None:
        with console_job_end_cap(lambda n: f"{n} more", limit=1):
            _fail_jobs(4)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted_run()
    assert text.getvalue().splitlines()[-1] == "WARNING worker.logs: 3 more"
