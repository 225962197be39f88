"""httpx's lines of status polls and status streams name their job, as submit and result lines do.

README › Logs: "A line about a job carries ``job_id``, and ``batch_id`` and ``request_id`` once
they are known, even when the line is httpx's". An observability audit found every
``GET …/requests/<id>/status`` and ``…/status/stream`` line without any of them: the poll step
and the watcher's reading threads never set the job's log context (:func:`worker.logs.job_context`),
only the per-job steps did. Each is checked here on httpx's own records, formatted as JSON lines
in the thread that logs them (where the context lives), against the simulator.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import Engine

from falsim.options import SimulatorOptions
from falsim.server import running_simulator
from jobs import db, store
from tests.hostile import wait_for
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for
from worker.conductor import Conductor
from worker.logs import JOB_FIELDS, JsonFormatter
from worker.steps import dispatch, submit
from worker.steps.context import Runtime
from worker.steps.poll import poll

KEY = "status-log-context-key-4e2b"
T2V = "fal-ai/wan-22"


class _Lines(logging.Handler):
    """Every record, formatted as a JSON line in the thread that logged it, parsed back."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.records: list[dict[str, Any]] = []
        self._lines_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        line = json.loads(self.format(record))
        with self._lines_lock:
            self.records.append(line)

    def about(self, path_end: str) -> list[dict[str, Any]]:
        """httpx's lines of GETs whose URL's path ends in ``path_end``."""
        with self._lines_lock:
            return [r for r in self.records if r["logger"] == "httpx" and _get_path(r).endswith(path_end)]


def _get_path(record: dict[str, Any]) -> str:
    """The path of httpx's ``HTTP Request: GET <url> "HTTP/1.1 200 OK"`` line ('' for another)."""
    words = str(record["message"]).split()
    if len(words) < 4 or words[:3] != ["HTTP", "Request:", "GET"]:
        return ""
    return urlsplit(words[3]).path


@pytest.fixture
def httpx_lines() -> Iterator[_Lines]:
    logger = logging.getLogger("httpx")
    handler = _Lines()
    level = logger.level
    logger.setLevel(logging.INFO)  # httpx logs each request at INFO
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _submitted(engine: Engine, rt: Runtime, n: int) -> tuple[str, list[str]]:
    batch_id = add_batch(
        engine, "logctx", [(T2V, {"prompt": f"fog {i}", "resolution": "480p"}) for i in range(n)]
    )
    jobs = job_ids(engine, batch_id)
    assert sorted(dispatch(rt)) == sorted(jobs)
    for job in jobs:
        assert submit(rt, job) == "submitted"
    return batch_id, jobs


def _request_ids(engine: Engine, jobs: list[str]) -> dict[str, str]:
    with db.read_scope(engine) as session:
        found = {job: store.get_job(session, job).request_id for job in jobs}
    return {job: request_id for job, request_id in found.items() if request_id is not None}


def test_each_poll_status_line_names_its_job_batch_and_request(engine: Engine, httpx_lines: _Lines) -> None:
    with running_simulator(SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0)) as sim:
        rt = make_runtime(engine, settings_for(sim.url, KEY))
        batch_id, jobs = _submitted(engine, rt, 3)
        requests = _request_ids(engine, jobs)
        assert len(requests) == 3
        time.sleep(0.1)  # past the first poll's time (poll_min_interval)
        assert poll(rt) == 3
        logging.getLogger("httpx").info("after the poll")
    lines = httpx_lines.about("/status")
    assert len(lines) == 3
    by_request = {line["request_id"]: line for line in lines if "request_id" in line}
    assert set(by_request) == set(requests.values()), lines
    for job, request_id in requests.items():
        line = by_request[request_id]
        assert (line["job_id"], line["batch_id"]) == (job, batch_id)
        assert _get_path(line).endswith(f"/requests/{request_id}/status")
    (after,) = [r for r in httpx_lines.records if r["message"] == "after the poll"]
    assert set(JOB_FIELDS).isdisjoint(after)  # the context ended with each job's call


@pytest.mark.parametrize("how", ["catch-up", "accepted"])
def test_each_status_stream_line_names_its_job_batch_and_request(
    engine: Engine, httpx_lines: _Lines, how: str
) -> None:
    """Streams the conductor opens from the jobs it reads (``catch-up``), and those the submit
    step hands it the moment fal accepts (``accepted``, the embedded run's way)."""
    with running_simulator(SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0)) as sim:
        rt = make_runtime(engine, settings_for(sim.url, KEY))
        conductor = Conductor(rt, stream=True)
        watcher = conductor.watcher
        assert watcher is not None
        if how == "accepted":
            rt.on_accepted = conductor.watch_accepted
        try:
            batch_id, jobs = _submitted(engine, rt, 3)
            if how == "catch-up":
                conductor._watch(set(jobs))
            assert wait_for(lambda: len(httpx_lines.about("/status/stream")) == 3, timeout=20)
            assert wait_for(lambda: not watcher.watching(), timeout=20)  # read to their ends
        finally:
            conductor.close()
        requests = _request_ids(engine, jobs)
    lines = httpx_lines.about("/status/stream")
    by_request = {line["request_id"]: line for line in lines if "request_id" in line}
    assert set(by_request) == set(requests.values()), lines
    for job, request_id in requests.items():
        line = by_request[request_id]
        assert (line["job_id"], line["batch_id"]) == (job, batch_id)
        assert _get_path(line).endswith(f"/requests/{request_id}/status/stream")
