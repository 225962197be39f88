"""`--help` and `--version` load none of the heavy libraries, and `simulator --help` lists the faults.

Start-up time is measured in ``bench/`` (no timed assertion here); what these tests pin down is
its cause: the modules that cost the time (SQLAlchemy, Alembic, Celery, httpx, pydantic-settings,
the simulator) are not imported for help; and the cyclic GC is paused over a command's imports
and resumed, past them, by the commands that go on working (:mod:`cli.startup`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli import _only_help
from cli.service_commands import fault_kinds
from falsim.faults import FAULT_KINDS, FAULTS

WANBATCH = str(Path(sys.executable).with_name("wanbatch"))
HEAVY = ("sqlalchemy", "alembic", "celery", "kombu", "httpx", "pydantic_settings", "falsim", "uvicorn")

_PROBE = """
import gc, json, sys
sys.argv = ["wanbatch", *json.loads(sys.argv[1])]
from cli import main
try:
    main()
except SystemExit:
    pass
print("MODULES " + json.dumps(sorted(m for m in sys.modules)), file=sys.stderr)
print("GC " + json.dumps({"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}), file=sys.stderr)
"""


def _modules_loaded_for(*args: str, env: dict[str, str] | None = None) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**(os.environ if env is None else env), "FAL_KEY": "k-startup-test"},
        check=False,
    )
    line = next(x for x in done.stderr.splitlines() if x.startswith("MODULES "))
    return set(json.loads(line.removeprefix("MODULES ")))


@pytest.mark.parametrize(
    "args", [(), ("--help",), ("--version",), ("status", "--help"), ("simulator", "--help"), ("doctor", "-h")]
)
def test_help_and_version_load_nothing_heavy(args: tuple[str, ...]) -> None:
    loaded = _modules_loaded_for(*args)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert heavy == [], f"wanbatch {' '.join(args)} imported {heavy[:10]}"


def test_a_command_that_talks_to_no_one_loads_no_http_client(tmp_path: Path) -> None:
    """With ``FAL_KEY`` set (as it is for anyone who renders), every command installs the key's
    redaction; that must not bring fal's client, httpx and PyAV with it (``worker.fal`` imports
    nothing of its own): about a quarter of ``wanbatch status``'s start-up before."""
    loaded = _modules_loaded_for("status", env=_clean_env(tmp_path))
    assert "worker.fal.redact" in loaded  # the key is redacted from every log line
    assert "jobs.store" in loaded  # it did read the database
    network = sorted(m for m in loaded if m.split(".")[0] in ("httpx", "httpcore", "av", "celery"))
    assert network == []
    assert not {"worker.fal.client", "worker.fal.storage", "worker.steps"} & loaded


def test_only_help_sees_help_anywhere_before_a_double_dash() -> None:
    assert _only_help([])
    assert _only_help(["--help"])
    assert _only_help(["run", "-h"])
    assert _only_help(["--version"])
    assert not _only_help(["status"])
    assert not _only_help(["run", "--", "--help"])  # after "--" it is an argument


def test_simulator_help_lists_every_fault_kind_from_the_simulator_itself() -> None:
    assert fault_kinds() == FAULTS
    assert set(FAULTS) == FAULT_KINDS
    done = subprocess.run(
        [WANBATCH, "simulator", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    for kind in FAULT_KINDS:
        assert f"  {kind} " in done.stdout or f"  {kind}\n" in done.stdout, kind
    assert "POST /_sim/faults" in done.stdout
    assert "--fault KIND=VALUE" in done.stdout


# --------------------------------------------------------------------------- the GC at start-up


def _gc_after(args: tuple[str, ...], env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    line = next((x for x in done.stderr.splitlines() if x.startswith("GC ")), None)
    assert line is not None, done.stderr
    found: dict[str, object] = json.loads(line[3:])
    return found


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_") and k != "FAL_KEY"}
    env["WANBATCH_DATABASE_URL"] = f"sqlite:///{tmp_path / 'wanbatch.db'}"
    env["WANBATCH_OUTPUT_DIR"] = str(tmp_path / "outputs")
    return env


def test_a_run_collects_again_once_its_machinery_is_loaded(tmp_path: Path) -> None:
    """`run` resumes the GC before it processes, with the start-up's objects frozen out of it."""
    manifest = tmp_path / "one.yaml"
    manifest.write_text('name: gc-probe\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "a red kite"\n')
    seen = _gc_after(("run", str(manifest), "--simulate", "--no-progress", "--json"), _clean_env(tmp_path))
    assert seen["enabled"] is True
    assert isinstance(seen["frozen"], int)
    assert seen["frozen"] > 10_000


_RESUME_PROBE = """
import json, sys
sys.argv = ["wanbatch", *json.loads(sys.argv[1])]
from cli import main, startup
resume = startup.resume
def recording_resume():
    print("AT-RESUME " + json.dumps(sorted(sys.modules)), file=sys.stderr)
    resume()
startup.resume = recording_resume
try:
    main()
except SystemExit:
    pass
print("MODULES " + json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def _run_probe(tmp_path: Path) -> dict[str, set[str]]:
    """The modules a one-job ``run --simulate`` had loaded when the GC came back, and at its end."""
    manifest = tmp_path / "one.yaml"
    manifest.write_text('name: gc-probe\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "a red kite"\n')
    args = ("run", str(manifest), "--simulate", "--no-progress", "--json")
    done = subprocess.run(
        [sys.executable, "-c", _RESUME_PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path),
        timeout=300,
        check=False,
    )
    seen = {}
    for line in done.stderr.splitlines():
        tag, _, rest = line.partition(" ")
        if tag in ("AT-RESUME", "MODULES"):
            seen[tag] = set(json.loads(rest))
    assert set(seen) == {"AT-RESUME", "MODULES"}, done.stderr
    return seen


def test_a_run_loads_its_machinery_before_the_gc_comes_back(tmp_path: Path) -> None:
    """The conductor, its steps and the libraries they bring (httpx, httpcore, PyAV) are imported
    while the GC is still paused, and frozen with the rest of the start-up: imported after
    :func:`cli.startup.resume`, over a hundred modules were built under the collector and then
    traversed by every full collection of the run."""
    seen = _run_probe(tmp_path)
    machinery = {"worker.conductor", "worker.embedded", "worker.steps.download", "httpcore", "av"}
    assert machinery <= seen["MODULES"]
    assert sorted(machinery - seen["AT-RESUME"]) == []
    late = sorted(m for m in seen["MODULES"] - seen["AT-RESUME"] if m.split(".")[0] in ("worker", "jobs"))
    assert late == [], f"imported after the GC came back: {late}"


def test_a_run_does_not_load_httpx_command_line(tmp_path: Path) -> None:
    """httpx's own command-line client (Rich, Pygments) is never loaded: wanbatch does not use it
    (:data:`cli.startup.UNUSED_OPTIONAL_MODULES`)."""
    loaded = _run_probe(tmp_path)["MODULES"]
    assert {"httpx", "httpcore"} <= loaded  # it did talk HTTP
    assert sorted({"httpx._main", "pygments.lexers"} & loaded) == []


def test_a_sqlite_database_loads_no_postgresql_dialect(tmp_path: Path) -> None:
    """SQLAlchemy's PostgreSQL dialect (its asyncpg, pg8000 and psycopg modules with it, about
    20 ms of CPU) is imported by a process that uses PostgreSQL only: not by the JSON columns'
    type (``jobs.models.JSONDoc``), the partial indexes' predicates or the store's upserts."""
    for loaded in (_modules_loaded_for("status", env=_clean_env(tmp_path)), _run_probe(tmp_path)["MODULES"]):
        assert {"jobs.store", "sqlalchemy.dialects.sqlite"} <= loaded  # it did use the database
        assert sorted(m for m in loaded if m.startswith("sqlalchemy.dialects.postgresql")) == []


def test_unused_modules_are_stood_in_for_while_a_command_runs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """An import of one fails as "not installed" inside the block; afterwards nothing is left
    behind, and a module already imported is never touched."""
    from cli import startup

    stand_in = "wanbatch_test_unused_module"
    monkeypatch.setattr(startup, "UNUSED_OPTIONAL_MODULES", (stand_in, "json"))
    with startup.without_unused_modules():
        assert sys.modules[stand_in] is None
        with pytest.raises(ImportError):
            __import__(stand_in)
        assert sys.modules["json"] is json
    assert stand_in not in sys.modules
    assert sys.modules["json"] is json


def test_a_short_command_runs_without_the_gc_and_freezes_nothing(tmp_path: Path) -> None:
    """`validate` ends long before the safety timer: the collector stayed off, nothing frozen."""
    manifest = tmp_path / "one.yaml"
    manifest.write_text('name: gc-probe\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "a red kite"\n')
    seen = _gc_after(("validate", str(manifest)), _clean_env(tmp_path))
    assert seen == {"enabled": False, "frozen": 0}


def test_resume_freezes_and_enables_once_and_pause_leaves_a_disabled_gc_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc

    from cli import startup

    monkeypatch.setattr(startup, "RESUME_AFTER_SECONDS", 3600.0)
    assert gc.isenabled()
    try:
        startup.pause()
        assert not gc.isenabled()
        startup.resume()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        startup.resume()  # a second resume changes nothing
        assert gc.get_freeze_count() == 0

        gc.disable()  # somebody else's choice: pause must not turn it on later
        startup.pause()
        startup.resume()
        assert not gc.isenabled()
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.enable()


def test_the_safety_timer_turns_the_gc_back_on_when_no_command_does(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc
    import time

    from cli import startup

    monkeypatch.setattr(startup, "RESUME_AFTER_SECONDS", 0.05)
    try:
        startup.pause()
        assert not gc.isenabled()
        deadline = time.monotonic() + 10
        while not gc.isenabled() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
