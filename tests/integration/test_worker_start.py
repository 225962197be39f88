"""``wanbatch worker`` starts Celery's worker itself, not through Celery's command line.

Importing ``celery.bin.celery`` brings every Celery subcommand, ``click_repl`` and
``prompt_toolkit`` among them: about a tenth of a worker's start-up CPU for a shell nobody
opens. :func:`worker.app.run_worker` does what ``celery worker`` does without it. These tests
pin down that the worker it starts is the one ``celery worker -Q wanbatch --without-gossip
--without-mingle`` started (a real Celery worker on kombu's in-memory transport), that a
bad ``--pool``, ``--loglevel`` or ``--concurrency`` is one line naming what is allowed, and that a
worker that cannot start is one line and exit 2, not restarted (and failing) forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.distributed import claimed_redis_db

WANBATCH = str(Path(sys.executable).with_name("wanbatch"))

_WORKER = """
import json, os, signal, sys
from celery.signals import worker_ready
from worker.app import make_app, run_worker

app = make_app(None)  # kombu's in-memory transport: a real worker, no broker to run
seen = {}

@worker_ready.connect(weak=False)
def _ready(sender, **_):
    controller = sender.controller
    seen["queues"] = sorted(q.name for q in sender.task_consumer.queues)
    # Celery's pool class (the threads pool's is a subclass of it: worker.app._cold_shutdown_safe)
    pools = type(controller.pool).__mro__
    seen["pool"] = next(c.__module__ for c in pools if c.__module__.startswith("celery."))
    seen["concurrency"] = controller.concurrency
    seen["steps"] = sorted(s.name for s in sender.steps)
    seen["loglevel"] = controller.loglevel
    seen["celery_cli_imported"] = sorted(m for m in sys.modules if m.startswith(("celery.bin", "click_repl")))
    os.kill(os.getpid(), signal.SIGTERM)  # a warm shutdown, as an operator's

code = run_worker(app, pool=sys.argv[1], concurrency=3, loglevel="WARNING", quiet=True)
with open(sys.argv[2], "w") as out:  # not stdout: the worker redirects it to its log
    json.dump({**seen, "exit": code}, out)
"""


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_run_worker_starts_the_worker_celery_worker_would_without_its_command_line(
    pool: str, tmp_path: Path
) -> None:
    out = tmp_path / "seen.json"
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, pool, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    assert seen["queues"] == ["wanbatch"]
    assert seen["pool"] == {"threads": "celery.concurrency.thread", "solo": "celery.concurrency.solo"}[pool]
    assert seen["concurrency"] == 3
    assert seen["loglevel"] == 30  # WARNING, as a number: what Celery's ``-l`` option made of it
    assert not {"Gossip", "Mingle"} & {name.rsplit(".", 1)[-1] for name in seen["steps"]}
    assert seen["celery_cli_imported"] == []
    assert seen["exit"] == 0


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("--pool", "gevnet", "'threads', 'prefork', 'processes', 'solo'"),
        ("--loglevel", "LOUD", "'debug', 'info'"),
    ],
)
def test_a_bad_pool_or_log_level_is_one_line_naming_the_choices(
    option: str, value: str, allowed: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_")}
    done = subprocess.run(
        [WANBATCH, "worker", option, value], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"Invalid value for {option!r}" in done.stderr.replace('"', "'")
    assert allowed in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def _env(**settings: str) -> dict[str, str]:
    """This process's environment without its WANBATCH_* settings, plus ``settings``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_")}, **settings}


@pytest.mark.parametrize("value", ["-1", "0", "1025", "100000000", "x"])
def test_a_concurrency_out_of_range_is_one_line_before_anything_connects(value: str) -> None:
    """-1 was a Celery traceback at every restart (prefork) or an internal error (threads), 0
    the CPU count, 100000000 threads taken; WANBATCH_EMBEDDED_CONCURRENCY's bound (1 to 1,024)
    holds here too. Nothing listens on the broker's port: the option is refused before anything
    tries it (the limiter's Redis, the broker's, used to be what was refused)."""
    env = _env(WANBATCH_BROKER_URL="redis://127.0.0.1:1/0", FAL_KEY="k-worker-test")
    done = subprocess.run(
        [WANBATCH, "worker", "--pool", "prefork", "-c", value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Invalid value for '--concurrency'" in done.stderr.replace('"', "'")
    assert "1<=x<=1024" in done.stderr or "not a valid integer" in done.stderr


#: ``wanbatch worker`` with Celery's thread pool unable to start (as a pool Celery refuses a value
#: of), and a restart (``os.execv``) that ends the process with 99 instead of starting it again.
_UNSTARTABLE = """
import os, sys
from celery.concurrency import thread

def _refuse(self):
    raise ValueError("the pool refuses to start")

thread.TaskPool.on_start = _refuse
os.execv = lambda *_: os._exit(99)
sys.argv = ["wanbatch", "worker", "--pool", "threads", "-c", "2"]
from cli import main
main()
"""


def test_a_worker_that_cannot_start_says_why_once_and_is_not_restarted(
    tmp_path: Path, redis_url: str
) -> None:
    """It printed Celery's traceback, "restarting it", and again every few seconds, forever."""
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as broker:  # a Redis DB of its own
        _unstartable(tmp_path, broker)


def _unstartable(tmp_path: Path, broker: str) -> None:
    env = _env(
        WANBATCH_BROKER_URL=broker,
        WANBATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'wanbatch.db'}",
        WANBATCH_OUTPUT_DIR=str(tmp_path / "out"),
        FAL_KEY="k-worker-test",
    )
    done = subprocess.run(
        [sys.executable, "-c", _UNSTARTABLE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert done.returncode == 2, done.stderr  # 99: it was restarted
    assert "Traceback" not in done.stderr
    assert "restarting it\n" not in done.stderr  # "the Celery worker stopped on its own; restarting it"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the Celery worker could not start (ValueError: the pool refuses to start); "
        "not restarting it, as the same start would fail the same way"
    ], done.stderr
