"""A real ``wanbatch worker``: every log line says when, in one format; and two workers on one
host have two node names.

Celery's worker logs through the root logger's handler (``wanbatch``'s: text or JSON), except
for two loggers it gives handlers of its own: ``celery.task`` (task loggers) and billiard's
``multiprocessing``, in Celery's format (local time without a zone, and plain text even under
``WANBATCH_LOG_FORMAT=json``). Its shutdown notice ("worker: Warm shutdown") is written past
logging altogether. All of them are wanbatch's lines now, the time first.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from bench.distributed import claimed_redis_db
from tests.ports import unused_port
from worker.app import make_app

#: ``2026-05-01T22:14:03.512Z LEVEL logger: message``.
STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")

#: ``wanbatch worker ARGS``, which logs on the two loggers Celery handles itself once it is
#: ready, then stops as an operator stops it (SIGTERM: a warm shutdown).
_PROBE = """
import logging, os, signal, sys
from celery.signals import worker_ready

@worker_ready.connect(weak=False)
def _ready(**_):
    logging.getLogger("celery.task.probe").warning("a task logger's line")
    logging.getLogger("multiprocessing").error("billiard's line")
    os.kill(os.getpid(), signal.SIGTERM)

sys.argv = ["wanbatch", "worker", *sys.argv[1:]]
from cli import main
main()
"""


@pytest.fixture
def broker(redis_url: str) -> Iterator[str]:
    """A Redis database of this test's own on the shared Redis (Celery's queue name is fixed)."""
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as url:
        yield url


def _env(tmp_path: Path, broker: str, **settings: str) -> dict[str, str]:
    nowhere = f"http://127.0.0.1:{unused_port()}"  # an idle worker calls no fal; if it did, not the real one
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_")},
        "WANBATCH_BROKER_URL": broker,
        "WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'wanbatch.db'}",
        "WANBATCH_OUTPUT_DIR": str(tmp_path / "out"),
        "WANBATCH_FAL_QUEUE_URL": nowhere,
        "WANBATCH_FAL_REST_URL": nowhere,
        "FAL_KEY": "k-worker-log-test",
        **settings,
    }


def _probe(tmp_path: Path, broker: str, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        env=_env(tmp_path, broker, **settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def _line(stderr: str, phrase: str) -> str:
    (found,) = [line for line in stderr.splitlines() if phrase in line]
    return found


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_every_line_of_a_worker_starts_with_its_time_celerys_too(
    tmp_path: Path, broker: str, pool: str
) -> None:
    done = _probe(tmp_path, broker, "--pool", pool, "-c", "1", "-n", "alpha@%h")
    host = socket.gethostname()
    for phrase in (
        "Connected to redis://",  # Celery's own line, through our handler
        f"alpha@{host} ready.",  # the node name --name gave
        "a task logger's line",  # celery.task: Celery's handler and format before
        "billiard's line",  # multiprocessing: likewise
        "Warm shutdown",  # written past logging by Celery's signal handler before
    ):
        line = _line(done.stderr + done.stdout, phrase)  # Celery says "Warm shutdown" on stdout
        assert STAMPED.match(line), line
    assert "[20" not in done.stderr  # no line in Celery's format ("[2026-05-01 22:14:03,512: …")


def test_under_json_every_line_of_a_worker_is_one_json_object(tmp_path: Path, broker: str) -> None:
    done = _probe(tmp_path, broker, "-c", "1", "--name", "beta@%h", WANBATCH_LOG_FORMAT="json")
    said = done.stderr + done.stdout  # Celery says "Warm shutdown" on stdout
    records = [json.loads(line) for line in said.splitlines() if line.strip()]
    messages = [r["message"] for r in records]
    assert "a task logger's line" in messages
    assert "billiard's line" in messages
    assert f"beta@{socket.gethostname()} ready." in messages
    assert "worker: Warm shutdown (MainProcess)" in messages
    assert all(r["ts"].endswith("Z") for r in records)


def test_two_workers_on_one_host_have_two_node_names(tmp_path: Path, broker: str) -> None:
    """Both were ``celery@HOST``: Celery warned of the duplicate at every ping, and nothing
    could tell them apart. Without ``--name`` each is ``wanbatch-PID@HOST`` now."""
    env = _env(tmp_path, broker)
    workers: list[subprocess.Popen[bytes]] = []
    app = make_app(broker)
    try:
        for _ in range(2):
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-c", "from cli import main; main()", "worker", "-c", "1"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            names = _pinged(app, len(workers), workers)
        host = socket.gethostname()
        assert sorted(names) == sorted(f"wanbatch-{w.pid}@{host}" for w in workers)
    finally:
        app.close()
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=60)


def _pinged(app: Celery, count: int, workers: list[subprocess.Popen[bytes]]) -> list[str]:
    """The node names of the workers answering a ping, once ``count`` of them answer."""
    deadline = time.monotonic() + 90
    while True:
        for worker in workers:
            assert worker.poll() is None, f"a worker ended with {worker.returncode}"
        replies = app.control.ping(timeout=1.0) or []
        names = [name for reply in replies for name in reply]
        if len(names) >= count or time.monotonic() > deadline:
            return names
