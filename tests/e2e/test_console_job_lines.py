"""A batch that fails wholesale does not flood the terminal: `run` writes the first
:data:`worker.logs.CONSOLE_JOB_END_LINES` lines of jobs that failed, then one line saying how many
more and which command lists them; a JSON log still has every line.

Before, every job fal refused (here: a 422, its image cannot be fetched) was one WARNING line on
stderr, beside the progress bar and the grouped failure summary.
"""

from __future__ import annotations

import json

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, subprocess_env, wanbatch
from worker.logs import CONSOLE_JOB_END_LINES

JOBS = CONSOLE_JOB_END_LINES + 4


def _refused_batch(sim: SimulatorHandle, manifest: MakeManifest, name: str, jobs: int = JOBS) -> str:
    """A batch fal refuses job by job with a 422: every image is a file its storage does not
    hold, each another one (jobs sharing a URL fal could not download are not sent again: they
    would end ``input_unreachable``, unsent, instead of each with fal's 422)."""
    items = "".join(
        f"  - prompt: a refused kite number {i}\n    image_url: {sim.url}/files/nope/missing-{i}.png\n"
        for i in range(jobs)
    )
    body = f"name: {name}\nendpoint: fal-ai/wan-i2v\ndefaults:\n  resolution: 480p\nitems:\n{items}"
    return str(manifest(name, body))


def test_run_shows_the_first_failed_jobs_then_how_many_more_and_where(
    sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    path = _refused_batch(sim, manifest, "refused-all")
    done = wanbatch("run", path, "--no-progress", env=subprocess_env(sim.url), timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    failed = [line for line in lines if line.startswith("WARNING") and " failed (" in line]
    assert len(failed) == CONSOLE_JOB_END_LINES, done.stderr
    assert all("422" in line for line in failed), failed
    notes = [line for line in lines if "more job(s) failed or were cancelled" in line]
    assert len(notes) == 1, done.stderr
    assert notes[0].startswith(f"WARNING worker.logs: {JOBS - CONSOLE_JOB_END_LINES} more job(s)"), notes
    assert "`wanbatch export refused-all` lists every job" in notes[0]
    # The note comes after the last job line, before the summary (which groups the reasons).
    assert lines.index(notes[0]) > lines.index(failed[-1])
    assert f"{JOBS} failed" in done.stdout, done.stdout


def test_a_json_log_gets_every_failed_jobs_line(sim: SimulatorHandle, manifest: MakeManifest) -> None:
    path = _refused_batch(sim, manifest, "refused-json")
    env = subprocess_env(sim.url, LOG_FORMAT="json")
    done = wanbatch("run", path, "--no-progress", env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    ended = [r for r in records if r["event"].startswith("job.") and r.get("outcome") == "failed"]
    assert len({r["job_id"] for r in ended}) == len(ended) == JOBS
    assert not [r for r in records if r["event"] == "log.job_lines_held_back"]


def test_a_few_failed_jobs_are_all_shown_without_a_note(sim: SimulatorHandle, manifest: MakeManifest) -> None:
    path = _refused_batch(sim, manifest, "three", jobs=3)
    done = wanbatch("run", path, "--no-progress", env=subprocess_env(sim.url))
    assert done.returncode == 1, done.stderr
    assert len([line for line in done.stderr.splitlines() if " failed (" in line]) == 3, done.stderr
    assert "more job(s)" not in done.stderr
