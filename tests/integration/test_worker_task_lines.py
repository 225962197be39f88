"""A worker at its default ``--loglevel INFO`` logs no line of Celery's per task.

Celery logs two ``INFO`` lines for every task ("Task …[id] received", "Task …[id] succeeded in
…s: …"): four a job, which said again, by task id, what wanbatch's own ``job.submit`` and
``job.download`` lines say by job, and cost the worker's consumer loop their formatting
(:func:`worker.logs.celery_task_lines_from_debug`). They are kept at ``--loglevel DEBUG``, and
what Celery says of a task that raised is logged at any level.

A real Celery worker (:func:`worker.app.run_worker`) on kombu's in-memory transport, in a child
process, runs one task that returns and one that raises; every record it logs is collected.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_WORKER = """
import json, logging, os, signal, sys
from celery.signals import task_postrun, worker_ready
from worker.app import make_app, run_worker

records = []

class Collect(logging.Handler):
    def emit(self, record):
        records.append([record.name, record.levelname, record.getMessage()])

logging.getLogger().addHandler(Collect())
app = make_app(None)  # kombu's in-memory transport: a real worker, no broker to run

@app.task(name="wanbatch.test_ok")
def ok(job_id):
    return "submitted"

@app.task(name="wanbatch.test_fails")
def fails(job_id):
    raise RuntimeError("a bug")

done = []

@worker_ready.connect(weak=False)
def _ready(sender, **_):
    ok.delay("job-1")
    fails.delay("job-2")

@task_postrun.connect(weak=False)
def _ran(**_):
    done.append(1)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # a warm shutdown, as an operator's

code = run_worker(app, pool="threads", concurrency=1, loglevel=sys.argv[1], quiet=True)
with open(sys.argv[2], "w") as out:  # not stdout: the worker redirects it to its log
    json.dump({"records": records, "exit": code}, out)
"""


def _records(loglevel: str, tmp_path: Path) -> list[list[str]]:
    out = tmp_path / "records.json"
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, loglevel, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    assert seen["exit"] == 0
    records: list[list[str]] = seen["records"]
    return records


def _task_lines(records: list[list[str]]) -> list[tuple[str, str, str]]:
    return [(name, level, message) for name, level, message in records if "wanbatch.test_" in message]


def test_a_worker_at_info_logs_no_line_of_celery_per_task_but_a_task_that_raised(tmp_path: Path) -> None:
    records = _records("INFO", tmp_path)
    assert any(name == "celery.apps.worker" and "ready" in msg for name, _, msg in records)  # it did log
    lines = _task_lines(records)
    assert [(name, level) for name, level, _ in lines] == [("celery.app.trace", "ERROR")], lines
    assert "RuntimeError" in lines[0][2]


def test_a_worker_at_debug_logs_celery_s_received_and_succeeded_lines(tmp_path: Path) -> None:
    lines = _task_lines(_records("DEBUG", tmp_path))
    received = [msg for name, level, msg in lines if name == "celery.worker.strategy" and level == "INFO"]
    succeeded = [msg for name, level, msg in lines if name == "celery.app.trace" and "succeeded" in msg]
    assert len(received) == 2, lines
    assert len(succeeded) == 1, lines
    assert any(name == "celery.app.trace" and level == "ERROR" for name, level, _ in lines)


def test_a_worker_at_error_logs_no_warning_of_those_loggers(tmp_path: Path) -> None:
    celery = [(name, level) for name, level, _ in _records("ERROR", tmp_path) if name.startswith("celery.")]
    assert all(level in ("ERROR", "CRITICAL") for _, level in celery), celery
