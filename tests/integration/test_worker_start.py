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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


#: A threads worker (concurrency 2) on the broker ``sys.argv[1]`` with one extra task that runs
#: until the file ``sys.argv[2]/release`` exists, saying it started in ``sys.argv[2]/started``.
_BLOCKING_WORKER = """
import sys, time
from pathlib import Path
from worker.app import make_app, run_worker

app = make_app(sys.argv[1])
here = Path(sys.argv[2])

@app.task(name="tests.blocking")
def blocking():
    (here / "started").write_text("1")
    end = time.monotonic() + 120
    while not (here / "release").exists() and time.monotonic() < end:
        time.sleep(0.05)

sys.exit(run_worker(app, pool="threads", concurrency=2, loglevel="INFO", quiet=False, hostname="w1@test"))
"""


def _poll(condition: Any, what: str, cap: float = 60.0) -> None:
    """Wait until ``condition()`` holds (at most ``cap`` s: a generous cap, not a timing check)."""
    end = time.monotonic() + cap
    while not condition():
        assert time.monotonic() < end, f"not reached within {cap} s: {what}"
        time.sleep(0.05)


@pytest.mark.timeout(240)
def test_a_threads_worker_refuses_revoke_terminate_and_its_cold_shutdown_is_one_line(
    tmp_path: Path, redis_url: str
) -> None:
    """The pool's "kill" of a running thread, made a no-op for the cold shutdown, was a no-op for
    every caller: ``revoke --terminate`` answered ok while the task ran on (hidden from
    ``inspect active``), with the cold-shutdown warning though nothing was shutting down; and the
    pool's class in worker.app made the banner say ``(app)`` and ``inspect stats``
    ``worker.app:Pool``."""
    from worker.app import QUEUE, make_app

    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as broker:
        env = _env(
            WANBATCH_BROKER_URL=broker,
            WANBATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'wanbatch.db'}",
            WANBATCH_OUTPUT_DIR=str(tmp_path / "out"),
            FAL_KEY="k-worker-test",
        )
        log = tmp_path / "worker.log"
        with log.open("w") as out:
            worker = subprocess.Popen(
                [sys.executable, "-c", _BLOCKING_WORKER, broker, str(tmp_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        app = make_app(broker)
        try:
            _poll(lambda: "ready." in log.read_text(errors="replace"), "the worker is ready")
            banner = [line for line in log.read_text().splitlines() if "concurrency:" in line]
            assert len(banner) == 1, banner
            assert banner[0].endswith(".> concurrency: 2 (thread)"), banner
            task_id = app.send_task("tests.blocking", queue=QUEUE).id
            _poll(lambda: (tmp_path / "started").exists(), "the task runs")
            inspect = app.control.inspect(destination=["w1@test"], timeout=10)
            stats = inspect.stats() or {}
            assert stats["w1@test"]["pool"]["implementation"] == "celery.concurrency.thread:TaskPool"

            # revoke --terminate: refused as Celery refuses it for its threads pool
            replies = app.control.revoke(task_id, terminate=True, reply=True, timeout=10)
            assert len(replies) == 1, replies
            reply = replies[0]["w1@test"]
            assert "ok" not in reply, reply
            assert "NotImplementedError" in reply["error"], reply
            active = inspect.active() or {}
            assert [t["id"] for t in active["w1@test"]] == [task_id]
            assert "cannot be cut short" not in log.read_text(errors="replace")

            # cold shutdown: one warning line, no traceback; the worker ends once the task has
            before = len(log.read_text(errors="replace"))
            worker.send_signal(signal.SIGQUIT)
            _poll(lambda: "cannot be cut short" in log.read_text(errors="replace"), "the warning")
            (tmp_path / "release").write_text("1")
            worker.wait(timeout=120)
            after = log.read_text(errors="replace")[before:]
            assert "Traceback" not in after, after
            assert "NotImplementedError" not in after, after
            assert after.count("cold shutdown: a task running on a thread cannot be cut short") == 1, after
        finally:
            (tmp_path / "release").write_text("1")
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=60)
            app.close()
