"""`--help` and `--version` load none of the heavy libraries, and `simulator --help` lists the faults.

Start-up time is measured in ``bench/`` (no timed assertion here); what these tests pin down is
its cause: the modules that cost the time (SQLAlchemy, Alembic, Celery, httpx, pydantic-settings,
the simulator) are not imported for help.
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
import json, sys
sys.argv = ["wanbatch", *json.loads(sys.argv[1])]
from cli import main
try:
    main()
except SystemExit:
    pass
print("MODULES " + json.dumps(sorted(m for m in sys.modules)), file=sys.stderr)
"""


def _modules_loaded_for(*args: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FAL_KEY": "k-startup-test"},
        check=False,
    )
    line = next(x for x in done.stderr.splitlines() if x.startswith("MODULES "))
    return set(json.loads(line.removeprefix("MODULES ")))


@pytest.mark.parametrize(
    "args", [("--help",), ("--version",), ("status", "--help"), ("simulator", "--help"), ("doctor", "-h")]
)
def test_help_and_version_load_nothing_heavy(args: tuple[str, ...]) -> None:
    loaded = _modules_loaded_for(*args)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert heavy == [], f"wanbatch {' '.join(args)} imported {heavy[:10]}"


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
