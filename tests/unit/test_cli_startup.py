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


#: What only a command that reads or writes the database needs.
DATABASE_MODULES = ("sqlalchemy", "alembic", "jobs.db", "jobs.models", "jobs.store", "jobs.batches")


@pytest.mark.parametrize("command", ["validate", "estimate"])
def test_validate_and_estimate_load_nothing_of_the_database(tmp_path: Path, command: str) -> None:
    """They read the manifest, the settings and the endpoint registry, never the database
    (:mod:`jobs.estimates`): SQLAlchemy, the models and the store were half their start-up CPU."""
    manifest = tmp_path / "one.yaml"
    manifest.write_text('name: estimate-probe\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "a red kite"\n')
    loaded = _modules_loaded_for(command, str(manifest), env=_clean_env(tmp_path))
    assert {"jobs.manifest", "jobs.pricing"} <= loaded  # it did check and price the manifest
    database = sorted(m for m in loaded if any(m == d or m.startswith(d + ".") for d in DATABASE_MODULES))
    assert database == [], f"wanbatch {command} imported {database[:10]}"


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


def _gc_after(args: tuple[str, ...], env: dict[str, str], *, as_command: bool = True) -> dict[str, object]:
    """The GC's state after ``main()`` ran ``args`` in a process that is the ``wanbatch`` command
    (:data:`_PROBE`), or else a program calling :func:`cli.main` (argv[0] another program's)."""
    probe = _PROBE if as_command else _PROBE.replace('["wanbatch",', '["a-program",')
    done = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(args)],
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


def _frozen_at_start(env: dict[str, str]) -> int:
    """What a bare interpreter of this Python reports frozen before any code runs: 0, but CPython
    3.12 counts objects of its own in the permanent generation from the start (375 on 3.12.1)."""
    done = subprocess.run(
        [sys.executable, "-c", "import gc; print(gc.get_freeze_count())"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return int(done.stdout)


def test_a_short_command_runs_without_the_gc_its_start_up_set_aside(tmp_path: Path) -> None:
    """`validate` ends long before the safety timer: the collector stayed off. The ``wanbatch``
    process froze what its start-up built before the command ran (:func:`cli.startup.set_aside`),
    so its exit no longer walks those objects (a tenth of the CPU of a short command); a program
    that calls :func:`cli.main` itself freezes nothing (the permanent generation holds what it
    held in a bare interpreter; a freeze adds tens of thousands)."""
    manifest = tmp_path / "one.yaml"
    manifest.write_text('name: gc-probe\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "a red kite"\n')
    env = _clean_env(tmp_path)
    at_start = _frozen_at_start(env)
    seen = _gc_after(("validate", str(manifest)), env)
    assert seen["enabled"] is False
    assert isinstance(seen["frozen"], int)
    assert seen["frozen"] > at_start + 10_000
    assert _gc_after(("validate", str(manifest)), env, as_command=False) == {
        "enabled": False,
        "frozen": at_start,
    }


def test_a_command_still_closes_what_it_opened_at_exit(tmp_path: Path) -> None:
    """Only the start-up is set aside, not what the command opens after it: ``status`` on a
    SQLite database in WAL mode still closes its connections as the process ends, the last one
    removing the ``-wal`` and ``-shm`` files (frozen, the engine was never collected: both stayed).
    So does a ``run``, whose engine is held to the end (its last transactions stayed in the
    ``-wal`` file, missing from a copy of ``wanbatch.db`` alone)."""
    manifest = tmp_path / "one.yaml"
    manifest.write_text('name: wal-probe\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "a red kite"\n')
    simulated = tmp_path / "sim.yaml"
    simulated.write_text('name: wal-run\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "a blue kite"\n')
    env = {**_clean_env(tmp_path), "FAL_KEY": "k-startup-test", "WANBATCH_OUTPUT_DIR": str(tmp_path / "out")}
    database = tmp_path / "wanbatch.db"
    runs = (("submit", str(manifest)), ("status",), ("run", "--simulate", "--no-progress", str(simulated)))
    for args in runs:
        done = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert database.exists()
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("wanbatch.db-"))
        assert left == [], f"wanbatch {args[0]} left {left}"


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


# --------------------------------------------------------------------------- the command's own process


def _modules_at_end(args: tuple[str, ...], env: dict[str, str], *, as_command: bool = True) -> set[str]:
    """The modules loaded at its end by a process that is the ``wanbatch`` command (argv[0] says
    so, as the console script's does: :data:`_PROBE`), or else by a program that calls
    :func:`cli.main` (argv[0] another program's)."""
    probe = _PROBE if as_command else _PROBE.replace('["wanbatch",', '["a-program",')
    done = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    line = next((x for x in done.stderr.splitlines() if x.startswith("MODULES ")), None)
    assert line is not None, done.stderr
    return set(json.loads(line.removeprefix("MODULES ")))


def test_the_command_itself_does_without_trio_and_a_program_calling_main_keeps_it(tmp_path: Path) -> None:
    """trio (httpcore's, when installed: a sixteenth of a run's start-up) is not imported by the
    ``wanbatch`` process, where nothing runs under trio; a process that calls :func:`cli.main`
    and goes on (a test, a script) gets it as httpcore wants, since httpcore binds ``trio = None``
    for good (:data:`cli.startup.COMMAND_ONLY_UNUSED_MODULES`)."""
    import importlib.util

    manifest = tmp_path / "one.yaml"
    manifest.write_text('name: trio-probe\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "a red kite"\n')
    args = ("run", str(manifest), "--simulate", "--no-progress", "--json")
    loaded = _modules_at_end(args, _clean_env(tmp_path))
    assert {"httpx", "httpcore", "worker.conductor"} <= loaded  # it did talk HTTP
    assert sorted(m for m in loaded if m.split(".")[0] in ("trio", "attr", "outcome")) == []
    elsewhere = _modules_at_end(args, _clean_env(tmp_path), as_command=False)
    assert {"httpx", "httpcore", "worker.conductor"} <= elsewhere
    assert ("trio" in elsewhere) == (importlib.util.find_spec("trio") is not None)


#: A ``sitecustomize`` for the command's process: its exit handlers and its teardown each leave a
#: line in ``EXIT_PROBE``'s file (the object is freed when the interpreter tears the modules down).
_EXIT_PROBE = """
import atexit, os

class _Probe:
    # What it writes with is kept: the teardown takes modules' names (open, os…) away first.
    def __init__(self):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        self.fd, self.write = os.open(os.environ["EXIT_PROBE"], flags), os.write

    def say(self, what):
        self.write(self.fd, what.encode() + b"\\n")

    def __del__(self):
        self.say("torn down")

probe = _Probe()
atexit.register(probe.say, "exit handlers")
"""


def _ended(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """``python -m cli ARGS`` with :data:`_EXIT_PROBE` loaded; the process and its probe's lines."""
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(_EXIT_PROBE)
    said = tmp_path / "exit-probe.txt"
    said.unlink(missing_ok=True)
    env = _clean_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(probe_dir), env.get("PYTHONPATH", "")) if p)
    env["EXIT_PROBE"] = str(said)
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    return done, said.read_text().splitlines() if said.exists() else []


def test_the_command_ends_without_tearing_down_its_heap(tmp_path: Path) -> None:
    """The ``wanbatch`` process ends once its exit handlers ran and its output is flushed
    (:func:`cli.startup.end_process`): no module teardown freeing the start-up's objects one by
    one (30–50 ms of a ``run``'s CPU), whatever the exit status; its output whole."""
    manifest = tmp_path / "many.yaml"
    items = "".join(f'  - prompt: "kite number {n}"\n' for n in range(3))
    manifest.write_text(f"name: exit-probe\nendpoint: fal-ai/wan-22\nitems:\n{items}")
    done, said = _ended(tmp_path, "validate", "--json", str(manifest))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True
    assert said == ["exit handlers"]
    done, said = _ended(tmp_path, "status", "no-such-batch")
    assert done.returncode == 2
    assert done.stderr.startswith("error: no batch 'no-such-batch'")
    assert said == ["exit handlers"]


def test_a_program_calling_main_keeps_its_process(tmp_path: Path) -> None:
    """A program that calls :func:`cli.main` itself (argv[0] ``wanbatch`` included) goes on after
    it: the command's exit status is its ``SystemExit``, and its interpreter ends as usual."""
    manifest = tmp_path / "one.yaml"
    manifest.write_text('name: exit-probe\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "a red kite"\n')
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(_EXIT_PROBE)
    said = tmp_path / "exit-probe.txt"
    env = _clean_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(probe_dir), env.get("PYTHONPATH", "")) if p)
    env["EXIT_PROBE"] = str(said)
    program = (
        f"import sys\nsys.argv = ['wanbatch', 'validate', {str(manifest)!r}]\nfrom cli import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    print('after', exc.code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "after 0"
    assert said.read_text().splitlines() == ["exit handlers", "torn down"]


# --------------------------------------------------------------------------- dataclasses' methods


def _sample(make: object) -> dict[str, object]:
    """What a few dataclasses built now do: their methods' behaviour and annotations."""
    import dataclasses
    import inspect

    @dataclasses.dataclass(frozen=True)
    class Point:
        x: int
        y: list[int] = dataclasses.field(default_factory=list)
        label: str = "p"

    @dataclasses.dataclass(order=True, kw_only=True)
    class Job:
        id: str
        tries: int = 0

    p, q = Point(1, [2]), Point(1, [2])
    try:
        p.x = 3  # type: ignore[misc]
        frozen = False
    except dataclasses.FrozenInstanceError:
        frozen = True
    return {
        "repr": repr(p),
        "eq": p == q,
        "hash": hash(Point(1, ())),  # type: ignore[arg-type]
        "frozen": frozen,
        "order": Job(id="a") < Job(id="b"),
        "init": inspect.get_annotations(Point.__init__),
        "job_init": str(inspect.signature(Job.__init__)),
        "job": repr(Job(id="j", tries=2)),
    }


def _installed(cache: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cache`` installed, taken out again after the test (dataclasses has no ``exec`` of its own)."""
    import builtins
    import dataclasses

    from cli.startup import MethodCache

    assert isinstance(cache, MethodCache)
    monkeypatch.setattr(dataclasses, "exec", builtins.exec, raising=False)
    cache.install()


def test_dataclasses_built_through_the_method_cache_are_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.startup import MethodCache

    plain = _sample(None)
    first = MethodCache(tmp_path / "methods.marshal")
    _installed(first, monkeypatch)
    assert _sample(first) == plain  # compiled now, as exec compiles (no __future__ flag inherited)
    assert first.compiled > 0
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    first.save()
    second = MethodCache(tmp_path / "methods.marshal")
    _installed(second, monkeypatch)
    assert _sample(second) == plain  # from the file
    assert second.compiled == 0


def test_the_method_cache_writes_as_python_writes_bytecode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not under PYTHONDONTWRITEBYTECODE; a file of another Python or a damaged one is ignored;
    a folder it cannot write to fails nothing."""
    from importlib.util import MAGIC_NUMBER

    from cli.startup import MethodCache

    path = tmp_path / "cache" / "methods.marshal"
    cache = MethodCache(path)
    cache.code("x = 1\n")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    cache.save()
    assert not path.exists()
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    cache.save()
    assert path.exists()
    assert MethodCache(path).code("x = 1\n").co_code == compile("x = 1\n", "<string>", "exec").co_code
    for damaged in (
        b"\x00\x01\x02\x03garbage",
        path.read_bytes()[:-9],
        b"abcd" + path.read_bytes()[len(MAGIC_NUMBER) :],
    ):
        path.write_bytes(damaged)
        again = MethodCache(path)
        namespace: dict[str, object] = {}
        again.exec_source("x = 1\n", namespace, namespace)
        assert namespace["x"] == 1
        assert again.compiled == 1
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    unwritable = MethodCache(blocked / "methods.marshal")
    unwritable.code("y = 2\n")
    unwritable.save()  # no error: the next process compiles again


def test_the_command_keeps_its_dataclass_methods_for_the_next_start(tmp_path: Path) -> None:
    """The first command writes the file in the user's cache folder (here $XDG_CACHE_HOME), not
    beside the package's bytecode (and removes the one an older wanbatch left there); the next one
    finds every method there and writes nothing."""
    from cli import startup

    tag = sys.implementation.cache_tag
    env = {k: v for k, v in _clean_env(tmp_path).items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    manifest = tmp_path / "one.yaml"
    manifest.write_text('name: methods-probe\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "a red kite"\n')
    args = ("validate", str(manifest))
    # Where earlier builds kept it, inside the install: removed once the new file is written.
    package = Path(startup.__file__).absolute().parent
    legacy = tmp_path / "pycache" / package.relative_to(package.anchor) / f"dataclass-methods.{tag}.marshal"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(b"left by an earlier build")
    _modules_at_end(args, env)
    (written,) = (tmp_path / "cache" / "wanbatch").glob("dataclass-methods.*.marshal")
    assert list((tmp_path / "pycache").rglob("*.marshal")) == []  # nothing beside the bytecode
    before = written.stat()
    assert before.st_size > 10_000
    assert before.st_mode & 0o777 == 0o600
    assert (tmp_path / "cache" / "wanbatch").stat().st_mode & 0o777 == 0o700
    _modules_at_end(args, env)
    after = written.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_the_method_cache_goes_to_the_user_cache_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$XDG_CACHE_HOME/wanbatch, else ~/.cache/wanbatch (a relative XDG_CACHE_HOME is ignored, as
    the XDG spec says); none, so nothing read or written, when neither can be written."""
    from cli import startup

    home, xdg = tmp_path / "home", tmp_path / "xdg"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))  # not there: never made, the home's used
    assert startup.method_cache_path() is not None
    assert startup.method_cache_path().parent == home / ".cache" / "wanbatch"  # type: ignore[union-attr]
    xdg.mkdir()  # there: wanbatch/ in it is made at the first save
    path = startup.method_cache_path()
    assert path is not None
    assert path.parent == xdg / "wanbatch"
    assert path.name.startswith(f"dataclass-methods.{sys.implementation.cache_tag}.")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert startup.method_cache_path() == home / ".cache" / "wanbatch" / path.name
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert startup.method_cache_path() == home / ".cache" / "wanbatch" / path.name
    if os.geteuid() != 0:  # root writes anywhere
        xdg.chmod(0o500)
        home.chmod(0o500)
        monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
        try:
            assert startup.method_cache_path() is None
        finally:
            xdg.chmod(0o700)
            home.chmod(0o700)
    unwritable = tmp_path / "a-file"
    unwritable.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(unwritable))  # a file: no folder can be made in it
    monkeypatch.setenv("HOME", str(unwritable))
    assert startup.method_cache_path() is None
    cache = startup.MethodCache(None)
    cache.code("z = 3\n")
    cache.save()  # nowhere to write: nothing written, no error
    assert unwritable.read_text() == ""


def test_the_cache_folder_is_made_only_below_a_home_or_xdg_cache_that_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``HOME=/nonexistent/deep`` (a service user's made-up home): as root, for whom every folder
    is writable, the cache walked up to ``/`` and made ``/nonexistent/deep/.cache/wanbatch`` at
    the first save. The home, the XDG cache folder and their parents are never made; folders
    below one that is there are."""
    from cli import startup

    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    home = tmp_path / "nonexistent" / "deep"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "nowhere" / "cache"))
    assert startup.method_cache_path() is None
    cache = startup.MethodCache(startup.method_cache_path())
    cache.code("w = 4\n")
    cache.save()  # nowhere to write: nothing made
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    home.mkdir(parents=True)  # the home is there: ~/.cache/wanbatch below it may be made
    path = startup.method_cache_path()
    assert path is not None
    assert path.parent == home / ".cache" / "wanbatch"
    cache = startup.MethodCache(path)
    cache.code("w = 5\n")
    cache.save()
    assert path.exists()
    assert not (tmp_path / "nowhere").exists()


def test_two_installs_never_share_the_method_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is keyed by the package's location and version: another install's (or a file
    whose key does not match) is not read, and is replaced, not added to."""
    from cli import startup

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    here = startup.install_key()
    site = tmp_path / "site-packages"
    (site / "wanbatch-1.2.3.dist-info").mkdir(parents=True)
    other_version = startup.install_key(site)
    (site / "wanbatch-1.2.3.dist-info").rename(site / "wanbatch-1.2.4.dist-info")
    upgraded = startup.install_key(site)
    elsewhere = startup.install_key(tmp_path / "elsewhere")
    assert len({here, other_version, upgraded, elsewhere}) == 4
    assert "1.2.3" in other_version
    assert "1.2.4" in upgraded
    paths = {startup.method_cache_path(key) for key in (here, other_version, upgraded, elsewhere)}
    assert len(paths) == 4

    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    path = tmp_path / "shared.marshal"  # two keys on one file: what a clash of names would do
    theirs = startup.MethodCache(path, owner=other_version)
    theirs.code("a = 1\n")
    theirs.save()
    ours = startup.MethodCache(path, owner=upgraded)
    ours.code("a = 1\n")
    assert ours.compiled == 1  # their code was not taken
    ours.save()
    again = startup.MethodCache(path, owner=upgraded)
    again.code("a = 1\n")
    assert again.compiled == 0  # ours is in the file now
    before_them = startup.MethodCache(path, owner=other_version)
    before_them.code("a = 1\n")
    assert before_them.compiled == 1  # and theirs is gone, not merged into it


def test_a_method_cache_file_others_can_write_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file holds code the command runs: one that others could have replaced is ignored."""
    from cli.startup import MethodCache

    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    path = tmp_path / "methods.marshal"
    first = MethodCache(path)
    first.code("c = 3\n")
    first.save()
    trusted = MethodCache(path)
    trusted.code("c = 3\n")
    assert trusted.compiled == 0
    for mode in (0o620, 0o602):
        path.chmod(mode)
        shared = MethodCache(path)
        shared.code("c = 3\n")
        assert shared.compiled == 1, oct(mode)
