"""wanbatch's processes keep glibc's malloc to two arenas (:func:`cli.startup.fewer_malloc_arenas`).

Each thread glibc sees allocate gets an arena of its own (up to eight per core), and an arena
never gives its free space back: a run's dozens of step threads made its peak memory grow with
every job. The probe runs a wanbatch command in a fresh interpreter, then has eight threads
allocate at once, and counts the heaps glibc's ``malloc_info`` describes. No memory figure is
asserted (that is the benchmark's business), only the arena count the cap decides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_PROBE = r"""
import ctypes, json, re, sys, tempfile, threading
sys.argv = ["wanbatch", "--version"]
from cli import main
try:
    main()
except SystemExit:
    pass
go = threading.Barrier(8)
kept = []
def allocate():
    go.wait()
    kept.append([bytes(3000) for _ in range(50)])  # above pymalloc's 512 bytes: malloc's own
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
with tempfile.NamedTemporaryFile("r", suffix=".xml") as out:
    fp = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    heaps = len(re.findall(r"<heap nr=", out.read()))
print("HEAPS " + json.dumps(heaps), file=sys.stderr)
"""


def _heaps(**env: str) -> int:
    base = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **env},
        check=False,
    )
    line = next((x for x in done.stderr.splitlines() if x.startswith("HEAPS ")), None)
    assert line is not None, done.stderr
    return int(json.loads(line.removeprefix("HEAPS ")))


def test_a_wanbatch_process_keeps_to_two_malloc_arenas_however_many_threads_allocate() -> None:
    assert _heaps() <= 2


def test_malloc_arena_max_in_the_environment_decides_instead() -> None:
    """glibc's own tunable wins: a user who set it gets what they set (here more than two)."""
    assert _heaps(MALLOC_ARENA_MAX="6") > 2


def test_glibc_tunables_arena_max_decides_too() -> None:
    assert _heaps(GLIBC_TUNABLES="glibc.malloc.arena_max=6") > 2


def test_a_python_without_ctypes_still_runs_wanbatch(tmp_path: Path) -> None:
    """No cap then, but the command runs (an interpreter built without libffi has no ctypes)."""
    probe = (
        "import sys; sys.modules['_ctypes'] = None; sys.modules['ctypes'] = None\n"
        "sys.argv = ['wanbatch', 'validate', sys.argv[1]]\n"
        "from cli import main\n"
        "main()\n"
    )
    manifest = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "quickstart.yaml"
    env = {**os.environ, "WANBATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}"}
    done = subprocess.run(
        [sys.executable, "-c", probe, str(manifest)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout
