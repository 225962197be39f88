"""A process short of file descriptors: `run` refuses up front in one line when its open-file
limit is far too low (after raising its soft limit toward the hard one), and the bundled
simulator's accept loop says it is out of them in one line now and then, never a traceback per
try (27 MB of stderr in 6.6 s under `ulimit -n 20` before)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _limited(soft: int, hard: int | None = None) -> Callable[[], None]:
    def limit() -> None:
        _soft, real_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, real_hard if hard is None else hard))

    return limit


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_") and k != "FAL_KEY"}
    env.update(
        PYTHONPATH=str(ROOT),
        WANBATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'wb.db'}",
        WANBATCH_OUTPUT_DIR=str(tmp_path / "out"),
        TMPDIR=str(tmp_path),
    )
    return env


def _manifest(tmp_path: Path) -> Path:
    items = "".join(f"  - prompt: a lighthouse number {i}\n" for i in range(12))
    path = tmp_path / "m.yaml"
    path.write_text(f"name: fds\nendpoint: fal-ai/wan-22\ndefaults:\n  resolution: 480p\nitems:\n{items}")
    return path


def _wanbatch(tmp_path: Path, *args: str, limit: Callable[[], None]) -> subprocess.CompletedProcess[str]:
    code = "import sys, cli; sys.argv[0] = 'wanbatch'; sys.exit(cli.main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_run_refuses_an_open_file_limit_far_too_low_in_one_line(tmp_path: Path) -> None:
    done = _wanbatch(tmp_path, "run", "--simulate", str(_manifest(tmp_path)), limit=_limited(20, 20))
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: the open-file limit of this process is 20 (`ulimit -n`)")
    assert "ulimit -n 4096" in line
    assert not (tmp_path / "out").exists()  # nothing was stored or sent


def test_run_raises_its_soft_limit_toward_the_hard_one(tmp_path: Path) -> None:
    manifest = str(_manifest(tmp_path))
    done = _wanbatch(tmp_path, "run", "--simulate", "--no-progress", manifest, limit=_limited(20))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""


def test_the_simulators_accept_loop_out_of_files_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import socket, time
        from falsim import SimulatorOptions, running_simulator
        from worker.logs import configure_logging

        configure_logging("text")  # chosen now: no module to import once no descriptor is left
        with running_simulator(SimulatorOptions()) as sim:
            host, port = sim.url.removeprefix("http://").rstrip("/").rsplit(":", 1)
            held = []
            try:
                while True:  # until this process has no descriptor left: the server cannot accept
                    held.append(socket.create_connection((host, int(port))))
            except OSError:
                pass
            time.sleep(3)  # the accept loop tries again every second
            for sock in held:
                sock.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(tmp_path),
        preexec_fn=_limited(64, 64),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr[:3000]
    said = [line for line in done.stderr.splitlines() if "cannot accept connections" in line]
    assert len(said) == 1, done.stderr[:3000]
    assert "this process ran out of file descriptors" in said[0]
    assert len(done.stderr.splitlines()) <= 3, done.stderr[:3000]


def test_a_run_with_more_requests_at_fal_than_its_limit_has_room_for_streams_polls_the_rest(
    tmp_path: Path,
) -> None:
    """``WANBATCH_MAX_OUTSTANDING=30`` under ``ulimit -n 64``, which the start-up check accepts for 4
    threads: a status stream per request at fal (two descriptors each with the bundled
    simulator) took the last descriptors, and the database's own files then failed to open
    (``EMFILE``) — "a bug: … Too many open files", an accepted submit not recorded, a job failed
    ``submit_unknown`` after its lease. Now only the streams that fit are opened (said once), the
    other requests are polled, and every job succeeds."""
    items = "".join(f"  - prompt: a lighthouse number {i}\n" for i in range(40))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: fds\nendpoint: fal-ai/wan-22\ndefaults:\n  resolution: 480p\nitems:\n{items}")
    code = "import sys, cli; sys.argv[0] = 'wanbatch'; sys.exit(cli.main())"
    done = subprocess.run(
        [sys.executable, "-c", code, "run", "--simulate", "--no-progress", "--json", str(manifest)],
        cwd=tmp_path,
        env=_env(tmp_path) | {"WANBATCH_MAX_OUTSTANDING": "30", "WANBATCH_SUBMIT_RATE": "50"},
        preexec_fn=_limited(64, 64),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Too many open files" not in done.stderr, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "leaves room for" in line]
    assert len(said) == 1, done.stderr[-3000:]
    assert "the open-file limit (64, `ulimit -n`) leaves room for 8 fal status stream(s)" in said[0]
    assert "ulimit -n 4096" in said[0]
    import json

    assert json.loads(done.stdout)["counts"]["succeeded"] == 40
