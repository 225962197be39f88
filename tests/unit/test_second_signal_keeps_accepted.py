"""A second Ctrl-C exits on the spot, and still keeps the submissions fal accepted.

The first signal starts the stop; a stop held back by a database that does not answer waits
for it, then for the submit POSTs in flight at fal (``worker.running.HangWatch``), which can
take minutes — so a second Ctrl-C is the natural reaction. It exits at once (130), and before
that it writes the journal of accepted submissions whose record had not landed: without it, the
next run found such a job ``submitting`` without its request id, which a resend policy pays
for twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import os, signal, threading, time
    from datetime import UTC, datetime
    from worker import running
    from worker.steps.unrecorded import Accepted, Unrecorded

    class Settings:
        connect_timeout = 10.0
        read_timeout = 60.0
        lease_seconds = 120.0

    class Runtime:
        pass

    rt = Runtime()
    rt.settings = Settings()
    rt.unrecorded = Unrecorded(os.environ["URL"])
    accepted = Accepted(
        job_id="job-paid-1", attempt=1, request_id="0a1b2c3d-0000-4000-8000-000000000001",
        gateway_request_id=None, status_url=None, response_url=None, cancel_url=None,
        running=False, submitted_at=datetime.now(UTC),
    )
    stuck = threading.Event()

    def record():  # fal accepted it; its record is on its way to a database that never answers
        with rt.unrecorded.recording(accepted):
            stuck.set()
            threading.Event().wait()

    threading.Thread(target=record, daemon=True).start()
    stuck.wait(10)
    with running.stop_on_signals():
        running._stopping.runtime = rt
        running._waiting.set()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)  # interrupted again: exits on the spot
        time.sleep(30)
    """
)


def _journals(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.is_dir() for p in folder.glob("wanbatch-accepted-*")]


def test_a_second_ctrl_c_keeps_the_accepted_submissions_before_it_exits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'never-opened.db'}"
    shm = Path("/dev/shm")
    before = set(_journals(shm))
    env = {**os.environ, "TMPDIR": str(tmp_path), "URL": url, "WANBATCH_DATABASE_URL": url}
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 130, done.stderr
        assert "interrupted again: exiting now" in done.stderr
        assert "Traceback" not in done.stderr
        new = [p for p in _journals(tmp_path, shm) if p not in before]
        kept = "".join(p.read_text() for p in new)
        assert "job-paid-1" in kept, (new, done.stderr)
        assert "0a1b2c3d-0000-4000-8000-000000000001" in kept
        assert "the next run on this host records them" in done.stderr
    finally:
        for p in _journals(tmp_path, shm):
            if p not in before:
                p.unlink(missing_ok=True)
