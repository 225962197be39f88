"""`run` into a file (nohup, CI, `2> run.log`): progress as plain lines, not nothing until the end.

The progress bar is redrawn in place, which only a terminal can show: into a file it printed
nothing at all until the run ended. There ``run`` now prints plain lines (no colours, no carriage
returns) as it goes; ``--no-progress`` still silences them. The CLI runs in process here, its
stderr a buffer: not a terminal, as under ``nohup``.

``run --json 2> run.log`` wrote no progress at all: ``--json`` silenced it, though the contract
says that with ``--json`` progress and logs go to stderr, and only ``--no-progress`` silences it.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import EXAMPLES, MakeManifest, Wb, wanbatch
from worker import running
from worker.progress_line import PlainProgress

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ jobs: (\d+)/3 \(\d+%\) · \$\d+\.\d\d/\$\d+\.\d\d · elapsed "
)


def _progress_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " jobs: " in line]


def test_run_into_a_file_prints_plain_progress_lines_as_it_goes(
    wb: Wb, sim: SimulatorHandle, examples_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A line at every refresh (the cadence itself is tested on a clock of its own, in
    # tests/unit/test_progress_line.py): the lines come while the batch runs, not only at the end.
    monkeypatch.setattr(running, "PlainProgress", lambda: PlainProgress(step_percent=1, min_gap=0, every=0))
    run = wb("run", examples_copy / "quickstart.yaml")
    assert run.code == 0, run.stderr
    assert not {"\x1b", "\r", "━"} & set(run.stderr), repr(run.stderr)
    lines = _progress_lines(run.stderr)
    assert len(lines) >= 2, run.stderr
    assert all(LINE.match(line) for line in lines), lines
    done = [int(m.group(1)) for line in lines if (m := LINE.match(line))]
    assert done == sorted(done)
    assert done[-1] == 3
    assert lines[-1].endswith(" · succeeded:3"), lines[-1]


def test_run_into_a_file_starts_and_ends_with_a_line_and_no_progress_silences_them(
    wb: Wb, sim: SimulatorHandle, examples_copy: Path
) -> None:
    run = wb("run", examples_copy / "quickstart.yaml")
    assert run.code == 0, run.stderr
    lines = _progress_lines(run.stderr)
    assert lines, run.stderr
    assert LINE.match(lines[-1]), lines
    assert "jobs: 3/3 (100%)" in lines[-1]

    again = wb("run", examples_copy / "quickstart.yaml", "--no-progress")
    assert again.code == 0, again.stderr
    assert _progress_lines(again.stderr) == [], again.stderr


def _one_json_object(stdout: str) -> dict[str, object]:
    """stdout is exactly one JSON object (one line), nothing else."""
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    report: dict[str, object] = json.loads(lines[0])
    return report


@pytest.mark.parametrize("command", ["run", "rerun"])
def test_json_keeps_stdout_for_the_object_and_the_progress_on_stderr(
    command: str, manifest: MakeManifest
) -> None:
    """A real process, its stderr a pipe (not a terminal): the plain progress lines go there
    with `--json` as without it, stdout holds the one object; `--no-progress` silences them."""
    body = (EXAMPLES / "quickstart.yaml").read_text()
    first = manifest("first", body.replace("name: quickstart", "name: first"))
    second = manifest("second", body.replace("name: quickstart", "name: second"))
    if command == "run":
        shown = wanbatch("run", first, "--simulate", "--json", timeout=120)
        silent = wanbatch("run", second, "--simulate", "--json", "--no-progress", timeout=120)
    else:
        assert wanbatch("run", first, "--simulate", "--no-progress", timeout=120).returncode == 0
        shown = wanbatch("rerun", "first", "--simulate", "--json", timeout=120)
        silent = wanbatch("rerun", "first", "--simulate", "--json", "--no-progress", timeout=120)

    assert shown.returncode == 0, shown.stderr
    assert _one_json_object(shown.stdout)["total"] == 3
    lines = _progress_lines(shown.stderr)
    assert lines, shown.stderr
    assert all(LINE.match(line) for line in lines), lines
    assert "jobs: 3/3 (100%)" in lines[-1]
    assert not {"\x1b", "\r", "━"} & set(shown.stderr), repr(shown.stderr)

    assert silent.returncode == 0, silent.stderr
    assert _one_json_object(silent.stdout)["total"] == 3
    assert _progress_lines(silent.stderr) == [], silent.stderr


def test_the_lines_forecast_what_status_forecasts(
    wb: Wb, sim: SimulatorHandle, examples_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line's time left came from rich's own pace (``task.speed``, sampled over 30 seconds):
    two jobs finishing within a second promised "~0:00:18 left" while `status` said "~1m36s left
    at this pace, but the window closes first (in 41s)". It shows the forecast the batch's
    progress carries now — `status`'s, by the same pace and rules (tests/integration/
    test_batch_schedule.py checks that they agree) — here a fixed one, whatever the jobs do."""
    from jobs.batches import BatchProgress, batch_progress

    note = "the window closes first (in 41s): the rest waits for the next one"

    def as_status_says(
        session: Session,
        batch_id: str,
        *,
        now: datetime | None = None,
        policy: str = "fail",
        here: Any = None,
        shown: bool = True,
    ) -> BatchProgress:
        current = batch_progress(session, batch_id, now=now, policy=policy, here=here, shown=shown)
        current["eta_seconds"], current["eta_note"] = 94.0, note
        return current

    monkeypatch.setattr(running, "batch_progress", as_status_says)
    monkeypatch.setattr(running, "PlainProgress", lambda: PlainProgress(step_percent=1, min_gap=0, every=0))
    run = wb("run", examples_copy / "quickstart.yaml")
    assert run.code == 0, run.stderr
    unfinished = [line for line in _progress_lines(run.stderr) if "jobs: 3/3" not in line]
    assert unfinished, run.stderr
    assert all(f" · ~0:01:34 left · {note} · " in line for line in unfinished), unfinished
