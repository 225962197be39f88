"""``python -m cli`` is the ``wanbatch`` command: same output, same exit codes, same early Ctrl-C.

It used to fail with "No module named cli.__main__" (exit 1), so a machine without the console
script on its PATH (a container's ``python -m``, a virtualenv not activated) had no command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WANBATCH = Path(sys.executable).with_name("wanbatch")
ROOT = Path(__file__).resolve().parents[2]

MANIFEST = 'name: by-module\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "a red kite"\n'


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_") and k != "FAL_KEY"}
    env["WANBATCH_DATABASE_URL"] = f"sqlite:///{tmp_path / 'wanbatch.db'}"
    env["WANBATCH_OUTPUT_DIR"] = str(tmp_path / "outputs")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "100"
    return env


def _run(command: list[str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path),
        cwd=tmp_path,
        check=False,
    )


def _by_module(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "cli"], tmp_path, *args)


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ((), 0),
        (("--version",), 0),
        (("status", "--help"), 0),
        (("bogus",), 2),  # a usage mistake
        (("status", "nosuch"), 2),  # bad input
        (("status", "nosuch", "--json"), 2),
        (("validate", "missing.yaml"), 2),
    ],
)
def test_python_m_cli_answers_as_the_console_script(args: tuple[str, ...], code: int, tmp_path: Path) -> None:
    done = _by_module(tmp_path, *args)
    assert "No module named" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    if WANBATCH.exists():
        script = _run([str(WANBATCH)], tmp_path, *args)
        assert (done.returncode, done.stdout, done.stderr) == (
            script.returncode,
            script.stdout,
            script.stderr,
        )


def test_python_m_cli_runs_a_batch_and_says_so_in_json(tmp_path: Path) -> None:
    """A whole command, through the database: ``validate`` then ``run --simulate``, exit 0."""
    (tmp_path / "one.yaml").write_text(MANIFEST)
    assert _by_module(tmp_path, "validate", "one.yaml").returncode == 0
    done = _by_module(tmp_path, "run", "one.yaml", "--simulate", "--no-progress", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["phase"] == "done"


_HANDLER_PROBE = """
import json, signal, sys
sys.argv, sys.orig_argv = json.loads(sys.argv[1])
import cli
print(json.dumps([signal.getsignal(signal.SIGINT) is cli._exit_interrupted, cli._launched_as_command()]))
"""


@pytest.mark.parametrize(
    ("argv", "orig_argv", "early"),
    [
        # What runpy shows the package while it imports it for ``python -m cli status``
        (["-m", "status"], ["python", "-m", "cli", "status"], True),
        (["-m"], ["python", "-X", "dev", "-mcli"], True),
        (["-m", "x"], ["python", "-m", "cli.__main__", "x"], True),
        (["wanbatch", "status"], ["/venv/bin/python", "/venv/bin/wanbatch", "status"], True),
        # Another module run with -m that happens to import cli, or ``python -c``: main() does it
        (["-m", "status"], ["python", "-m", "cli.output", "status"], False),
        (["-c", "status"], ["python", "-c", "import cli", "status"], False),
    ],
)
def test_the_early_interrupt_handling_is_installed_for_the_command_only(
    argv: list[str], orig_argv: list[str], early: bool
) -> None:
    """The console script's early Ctrl-C handling (one line, exit 130, during the imports: see
    tests/e2e/test_early_sigint.py) is installed as ``python -m cli`` imports the package too."""
    done = subprocess.run(
        [sys.executable, "-c", _HANDLER_PROBE, json.dumps([argv, orig_argv])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [early, early]
