"""The project's own habits, enforced by the test suite: ruff (lint and format) and mypy are clean.

Running them here means CI's one command (the README's) checks them too. They cover the tests and
benchmarks as well as the product: ruff checks the whole tree, and mypy (strict) the packages
listed in ``pyproject.toml`` — every top-level package, ``migrations``, ``tests`` and ``bench``
included (the migrations are frozen, not exempt: see ``migrations/__init__.py``).
"""

from __future__ import annotations

import re
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
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages <= checked, f"mypy does not check {sorted(packages - checked)}"
    assert {"migrations", "tests", "bench"} <= checked


def test_ruff_leaves_out_nothing_of_the_tree() -> None:
    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["ruff"]
    assert ruff.get("exclude", []) == ruff.get("extend-exclude", []) == []


def test_mypy_strict_is_clean() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_test_names_a_redis_database_of_the_shared_redis_by_number() -> None:
    """The rule of ``tests/conftest.py``: a test's keys live on database 0 under a prefix of its
    own, or on a database it claimed (``redis_db``, ``bench.distributed.claimed_redis_db``).
    A database named by number (13, 14…) is one a claim may hold meanwhile, and flush, under
    ``pytest -n 2``: the tests writing there failed now and then."""
    named = re.compile(r"(?:127\.0\.0\.1|localhost):6379/(\d+)")
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(int(number) != 0 for number in named.findall(line))
    ]
    assert found == [], "claim a Redis database instead (tests/conftest.py's redis_db):\n" + "\n".join(found)
