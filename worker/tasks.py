"""Thin Celery tasks: a job id in, one step of the state machine out.

The logic is in :mod:`worker.steps`; a task only finds this process's runtime and calls the
step. The runtime is built lazily, in the process that runs the task — after a prefork worker
has forked — so no database connection or HTTP pool is ever shared across processes.
"""

from __future__ import annotations

import logging
import threading

from worker import steps
from worker.app import app
from worker.runtime import build_runtime
from worker.steps import Runtime

log = logging.getLogger(__name__)

_runtime: Runtime | None = None
_lock = threading.Lock()
#: Cleared when this process is stopping (Ctrl-C in embedded mode): a task that starts then does
#: nothing, so no lease is taken after the process gave its leases back.
_accepting = threading.Event()
_accepting.set()


def runtime() -> Runtime:
    """This process's runtime, created on first use."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = build_runtime(
                enqueue_submit=lambda job_id: submit_job.delay(job_id),
                enqueue_download=lambda job_id: download_job.delay(job_id),
            )
        return _runtime


def set_runtime(rt: Runtime | None) -> None:
    """Install a runtime (embedded mode shares the one its loop built)."""
    global _runtime
    with _lock:
        _runtime = rt


def stop_accepting() -> None:
    """From now on tasks return at once without touching their job (the process is stopping)."""
    _accepting.clear()


def accept_again() -> None:
    """Undo :func:`stop_accepting` (a new embedded run in the same process)."""
    _accepting.set()


@app.task(name="wanbatch.submit_job")
def submit_job(job_id: str) -> str:
    """POST one claimed job to fal, once."""
    if not _accepting.is_set():
        return "stopping"
    outcome = steps.submit(runtime(), job_id)
    log.debug("submit %s: %s", job_id, outcome)
    return outcome


@app.task(name="wanbatch.download_job")
def download_job(job_id: str) -> str:
    """Fetch the result and video of one completed job."""
    if not _accepting.is_set():
        return "stopping"
    outcome = steps.download(runtime(), job_id)
    log.debug("download %s: %s", job_id, outcome)
    return outcome
