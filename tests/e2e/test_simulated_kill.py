"""`kill -9` of a `wanbatch run --simulate`, then the same command again.

The bug (audit): the second run sat on `submitting:3` with no reason shown until the dead run's
leases expired (`WANBATCH_LEASE_SECONDS`), then failed those jobs `submit_unknown` — "fal may
have accepted (and billed) it" — and `cost` printed "simulated: nothing was paid" beside
"possibly billed: up to $0.20". A `--simulate` run's simulator lives in its own process: a POST
the dead run left in flight was never at fal, and its simulator is gone. Now the next run takes a
dead process's leases back at once and sends such a job again to its own simulator; nothing of a
simulation is ever "possibly billed".

The first run stops itself right after a POST (the chaos suite's ``after_post`` stop point, so
a job is reliably `submitting` with its POST gone out), and is then killed with SIGKILL.
"""

from __future__ import annotations

import json
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, update

from jobs.models import Job
from tests.e2e.e2e_helpers import (
    Background,
    MakeManifest,
    db_rows,
    subprocess_env,
    wait_for,
    wanbatch_command,
)

JOBS = 4
MANIFEST = "name: simk\nendpoint: fal-ai/wan-22\nitems:\n" + "".join(
    f"  - prompt: killed simulation item {i}\n" for i in range(JOBS)
)
IN_FLIGHT = "state = 'submitting' AND submitted_input IS NOT NULL"


def _count(db: str, where: str) -> int:
    return int(db_rows(db, f"SELECT count(*) FROM jobs WHERE {where}")[0][0])


def _in_flight(db: str) -> int:
    try:
        return _count(db, IN_FLIGHT)
    except Exception:  # not migrated yet
        return 0


def _kill_midway(env: dict[str, str], cwd: Path, argv: list[str]) -> None:
    """Run ``argv`` until it stops itself right after a POST, then SIGKILL it (and reap it)."""
    db = env["WANBATCH_DATABASE_URL"]
    first = Background(argv, {**env, "WANBATCH_CHAOS_STOP_POINTS": "after_post:1"}, cwd, "first")
    try:
        wait_for("a POST in flight", lambda: _in_flight(db) >= 1, first, step=0.1)
        first.popen.send_signal(signal.SIGKILL)
        first.popen.wait(10)
    finally:
        first.kill()
    assert _in_flight(db) >= 1, "no submit was left in flight: the test did not kill the run midway"


def test_a_killed_simulated_run_leaves_nothing_possibly_billed_and_no_silent_wait(
    manifest: MakeManifest, e2e_env: Path
) -> None:
    # The lease outlasts the second run's safety timeout: waiting it out fails the test.
    env = subprocess_env("http://127.0.0.1:9", LEASE_SECONDS="300", EMBEDDED_CONCURRENCY="3")
    argv = ["run", str(manifest("simk", MANIFEST)), "--simulate", "--no-progress"]
    _kill_midway(env, e2e_env, argv)

    second = Background(argv, env, e2e_env, "second")
    code = second.wait(90)
    out = second.stdout() + second.stderr()
    assert code == 0, out
    _nothing_possibly_billed(env, e2e_env, out)


def test_leases_it_cannot_tell_gone_are_waited_for_aloud_then_sent_again_unbilled(
    manifest: MakeManifest, e2e_env: Path
) -> None:
    """A holder not known to be gone (here: another host's) is waited for, and the progress line
    says whose leases and until when; once they lapse, the submit left in flight is sent again
    to the run's simulator, not failed as possibly billed."""
    env = subprocess_env("http://127.0.0.1:9", LEASE_SECONDS="300", EMBEDDED_CONCURRENCY="3")
    db = env["WANBATCH_DATABASE_URL"]
    argv = ["run", str(manifest("simk", MANIFEST)), "--simulate"]
    _kill_midway(env, e2e_env, argv)
    # Long enough for a loaded machine to start the second run and print its note (10 s was not).
    _lease_elsewhere(db, until=datetime.now(UTC) + timedelta(seconds=25))

    second = Background(argv, {**env, "COLUMNS": "200"}, e2e_env, "second")
    code = second.wait(90)
    out = second.stdout() + second.stderr()
    assert code == 0, out
    assert "leased to elsewhere:1:1 (another process) until" in out
    _nothing_possibly_billed(env, e2e_env, out)


def _lease_elsewhere(db: str, *, until: datetime) -> None:
    """Make the killed run's leases another host's, lapsing at ``until``: none can be told gone."""
    engine = create_engine(db)
    try:
        with engine.begin() as conn:
            conn.execute(
                update(Job)
                .where(Job.lease_owner.is_not(None))
                .values(lease_owner="elsewhere:1:1", lease_expires_at=until)
            )
    finally:
        engine.dispose()


def _nothing_possibly_billed(env: dict[str, str], cwd: Path, out: str) -> None:
    """Every job succeeded, and nothing anywhere says a simulation was possibly billed."""
    db = env["WANBATCH_DATABASE_URL"]
    assert _count(db, "state = 'succeeded'") == JOBS
    assert "possibly billed" not in out
    assert _count(db, "ambiguous_usd > 0 OR possible_duplicate_charges > 0") == 0

    cost = subprocess.run(
        [*wanbatch_command(), "cost", "simk", "--json"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cost.returncode == 0, cost.stderr
    report = json.loads(cost.stdout)
    assert "possibly billed" not in cost.stdout
    assert all(not float(str(line.get("possibly_billed_usd") or 0)) for line in _lines(report)), report


def _lines(report: object) -> list[dict[str, object]]:
    """Every object in ``cost --json`` that carries ``possibly_billed_usd`` (totals and lines)."""
    found: list[dict[str, object]] = []
    stack = [report]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "possibly_billed_usd" in item:
                found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found
