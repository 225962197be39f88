"""The project's own habits, enforced by the test suite: ruff (lint and format) and mypy are clean.

Running them here means CI's one command (the README's) checks them too. They cover the tests and
benchmarks as well as the product: ruff checks the whole tree, and mypy (strict) the packages
listed in ``pyproject.toml`` — every top-level package, ``tests`` and ``bench`` included.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_lint_is_clean() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_covers_every_package_tests_and_benchmarks() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    checked = set(config["tool"]["mypy"]["packages"])
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"migrations"}
    assert packages <= checked, f"mypy does not check {sorted(packages - checked)}"
    assert {"tests", "bench"} <= checked


def test_mypy_strict_is_clean() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
