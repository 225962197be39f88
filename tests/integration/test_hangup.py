"""SIGHUP (the terminal or SSH session closed, ``kill -HUP`` from a process manager) stops
``wanbatch serve`` and ``wanbatch worker`` as SIGTERM does, as it stops ``run``; ignored by the
parent (``nohup``), it stays ignored.

Before: uvicorn handles SIGINT and SIGTERM only, so ``serve`` died on the spot, requests in
progress cut short. Celery restarted a worker detached from a terminal (``execv`` of
``sys.argv``: a surprise in a container, and under ``nohup`` too) and left one in a terminal to
die outright, its prefork children (reset to the default by Celery) along with it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.e2e_helpers import wanbatch_command

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")

#: The start of a timestamped text log line (``worker.logs.TIMESTAMPED_TEXT_FORMAT``).
TIMESTAMPED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ ")

#: What `nohup` does before it starts the command: SIGHUP ignored, then exec.
NOHUP = (
    "import signal, os, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def _serve(tmp_path: Path, *, nohup: bool) -> tuple[subprocess.Popen[bytes], Path]:
    """``wanbatch serve --port 0`` in a session of its own, its output in a file; started."""
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_")}
    env.update(
        WANBATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'serve.db'}",
        WANBATCH_OUTPUT_DIR=str(tmp_path / "outputs"),
        PYTHONUNBUFFERED="1",
    )
    argv = [*wanbatch_command(), "serve", "--port", "0"]
    if nohup:
        argv = [sys.executable, "-c", NOHUP, *argv]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 60  # only so that a server that never starts fails the test
    while "Application startup complete" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.05)
    return proc, log


def _ended(proc: subprocess.Popen[bytes], log: Path) -> int:
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        pytest.fail(f"still running 60 s after the signal:\n{log.read_text(errors='replace')}")


def test_serve_stops_on_sighup_as_on_sigterm(tmp_path: Path) -> None:
    proc, log = _serve(tmp_path, nohup=False)
    os.killpg(proc.pid, signal.SIGHUP)  # as a closed terminal does: the whole process group
    code = _ended(proc, log)
    said = log.read_text(errors="replace")
    # uvicorn's graceful shutdown, then the signal ends the process, as SIGTERM does.
    assert "Shutting down" in said, said
    assert "Application shutdown complete" in said, said
    assert "Finished server process" in said, said
    assert code == -signal.SIGHUP
    assert "Traceback" not in said
    # A long-running process's log says when: every line starts with its time in UTC.
    untimed = [line for line in said.splitlines() if line and not TIMESTAMPED.match(line)]
    assert untimed == [], said


def test_serve_under_nohup_goes_on_serving(tmp_path: Path) -> None:
    proc, log = _serve(tmp_path, nohup=True)
    try:
        os.killpg(proc.pid, signal.SIGHUP)
        time.sleep(1.0)  # room for a hangup to act, were it not ignored
        assert proc.poll() is None, log.read_text(errors="replace")
        assert "Shutting down" not in log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    _ended(proc, log)
    assert "Shutting down" in log.read_text(errors="replace")


#: A real Celery worker (kombu's in-memory transport) that gets SIGHUP while a task runs: sent
#: to its whole process group, prefork children included, as a closed terminal sends it.
_WORKER = """
import json, os, signal, sys, threading, time
from pathlib import Path
from celery.signals import worker_ready
from worker.app import make_app, run_worker

pool, out, nohup = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "nohup"
if nohup:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
app = make_app(None)
seen = {}
started, done = out.with_suffix(".started"), out.with_suffix(".done")

@app.task(name="slow")
def slow():
    started.touch()
    time.sleep(1.5)
    done.touch()

def hang_up():
    while not started.exists():
        time.sleep(0.01)
    os.killpg(0, signal.SIGHUP)
    if nohup:
        seen["hangup_ignored"] = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        time.sleep(0.5)  # room for a hangup to act, were it not ignored
        os.kill(os.getpid(), signal.SIGTERM)  # what stops it then

@worker_ready.connect(weak=False)
def _ready(sender, **_):
    slow.delay()
    threading.Thread(target=hang_up, daemon=True).start()

code = run_worker(app, pool=pool, concurrency=2, loglevel="INFO", quiet=True)
seen["task_finished"] = done.exists()
out.write_text(json.dumps({**seen, "exit": code}))  # not stdout: the worker redirects it
"""


@pytest.mark.parametrize(("pool", "nohup"), [("threads", False), ("prefork", False), ("threads", True)])
def test_a_worker_stops_warmly_on_sighup_and_is_never_restarted(
    tmp_path: Path, pool: str, nohup: bool
) -> None:
    out = tmp_path / "seen.json"
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, pool, str(out), "nohup" if nohup else "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        start_new_session=True,  # the SIGHUP to its process group reaches nothing else
    )
    said = done.stdout + done.stderr
    assert "Restarting celery worker" not in said  # Celery's execv of sys.argv
    assert done.returncode == 0, said
    seen = json.loads(out.read_text())
    assert seen["exit"] == 0
    assert said.count("Warm shutdown") == 1, said
    assert seen["task_finished"] is True  # the warm shutdown let it end, in a prefork child too
    if nohup:
        assert seen["hangup_ignored"] is True
    # A prefork child killed by the hangup is "lost" (WorkerLostError) while the parent stops.
    assert "WorkerLostError" not in said, said
    assert "SIGHUP" not in said, said


def test_a_prefork_child_ignores_sighup_from_its_first_signal_reset() -> None:
    """Celery's child initializer resets SIGHUP to the default first thing and only later sends
    ``worker_process_init``, where the child ignored it: a hangup in between (a child still
    starting on a loaded machine) killed it, ``exited with 'signal 1 (SIGHUP)'``. The worker
    class moves SIGHUP from the initializer's resets to its ignores."""
    from celery.concurrency import prefork

    from worker.app import _stopping_on_hangup

    _stopping_on_hangup(object)
    assert "SIGHUP" not in prefork.WORKER_SIGRESET
    assert "SIGHUP" in prefork.WORKER_SIGIGNORE
