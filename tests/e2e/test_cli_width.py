"""`status`, `status BATCH`, `cost BATCH` and `run`'s progress line read well at 80 columns (issue #14).

A new user's terminal is 80 columns wide. At that width no line may be longer; ids are never
shorter than the 8-character prefix commands accept; names and endpoints give way before money
does (money is never cut); the done/total count and the elapsed time are always on the progress
line. The batches are made as hard as they come: long and wide-character names, five endpoints,
failures with long messages, a budget cap that cancels, a paused batch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.cells import cell_len

from falsim.server import SimulatorHandle
from jobs.money import usd_text
from tests.e2e.e2e_helpers import MakeManifest, Wb

WIDTH = 80

LONG_NAME = "東京の夜景-an-overnight-sweep-with-a-name-far-too-long-for-any-terminal-column"

MIXED = """\
name: {name}
defaults:
  resolution: 480p
items:
  - {{endpoint: fal-ai/wan-i2v, prompt: a lake at dawn, image_url: images/landscape.jpg}}
  - {{endpoint: fal-ai/wan-flf2v, prompt: day to night, start_image_url: images/landscape.jpg,
      end_image_url: images/night.jpg}}
  - {{endpoint: fal-ai/wan-22, prompt: a paper boat in the rain}}
  - {{endpoint: fal-ai/wan-25-preview/image-to-video, prompt: clouds, image_url: images/landscape.jpg}}
  - {{endpoint: wan/v2.6/image-to-video, prompt: a slow pan, image_url: images/landscape.jpg,
      resolution: 720p}}
  - {{endpoint: fal-ai/wan-i2v, prompt: night falls, image_url: images/night.jpg}}
budget:
  max_usd: {cap}
"""


def assert_fits(text: str, what: str) -> None:
    for line in text.splitlines():
        assert cell_len(line.rstrip()) <= WIDTH, f"{what}: {cell_len(line.rstrip())} cells:\n{line}"


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))


def test_reports_fit_80_columns(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, narrow: None) -> None:
    # A batch of five endpoints whose cap cancels some jobs, with model errors that fail others.
    sim.set_faults(model_error={"next": 2, "error_type": "content_policy_violation"})
    mixed = manifest("mixed", MIXED.format(name=LONG_NAME, cap="1.20"))
    run = wb("run", mixed, "--json", "--no-progress")
    assert run.code == 1, run.stderr
    mixed_report = run.json()
    assert mixed_report["counts"]["failed"] >= 1
    assert mixed_report["cancelled_for_budget"] >= 1
    # A plain batch with its progress on (stderr is not a terminal: plain lines, the last at the end).
    plain = manifest("plain", MIXED.format(name="plain", cap="100"))
    shown = wb("run", plain)
    assert shown.code == 0, shown.stderr
    plain_report = wb("status", "plain", "--json").json()
    # A paused batch that has not started.
    paused = manifest("paused", MIXED.format(name="waiting-for-the-morning", cap="100"))
    assert wb("submit", paused).code == 0
    assert wb("pause", "waiting-for-the-morning").code == 0

    reports = {r["batch"]: r for r in wb("status", "--json").json()["batches"]}
    assert len(reports) == 3

    listing = wb("status")
    assert listing.code == 0, listing.stderr
    assert_fits(listing.stdout, "status")
    for batch_id, report in reports.items():
        row = next(line for line in listing.stdout.splitlines() if line.startswith(batch_id[:8]))
        assert usd_text(report["spent_usd"]) in row
        assert usd_text(report["estimated_usd"]) in row
        assert f"{report['finished']}/{report['total']}" in row
    assert re.search(r"^\S{8}\s.*\bpaused\b", listing.stdout, re.MULTILINE)

    for batch_id, report in reports.items():
        one = wb("status", batch_id[:8])
        assert one.code == 0, one.stderr
        assert_fits(one.stdout, f"status {report['name']}")
        assert batch_id[:8] in one.stdout
        assert f"estimated {usd_text(report['estimated_usd'])}" in one.stdout
        assert f"spent {usd_text(report['spent_usd'])}" in one.stdout
        assert f"{report['finished']}/{report['total']} done" in one.stdout

        cost = wb("cost", batch_id)
        assert cost.code == 0, cost.stderr
        assert_fits(cost.stdout, f"cost {report['name']}")
        assert batch_id[:8] in cost.stdout
        total = next(line for line in cost.stdout.splitlines() if line.startswith("total"))
        data = wb("cost", batch_id, "--json").json()["total"]
        for key in ("estimated_usd", "actual_usd", "wasted_usd"):
            assert usd_text(data[key]) in total, (key, total)

    # Five endpoints, each on one line of its own (shortened, never wrapped).
    table = wb("cost", mixed_report["batch"]).stdout
    for endpoint in ("wan-i2v", "wan-flf2v", "wan-22", "wan-25-preview", "wan/v2.6/image-to-video"):
        assert endpoint in table, endpoint
    # Why jobs failed and the budget advice: on lines of their own, the advice whole.
    long_status = wb("status", mixed_report["batch"]).stdout
    assert "content_policy_violation" in long_status
    # The name is no shell word: the advice names the batch by 12 characters of its id.
    assert f"wanbatch rerun {mixed_report['batch'][:12]} --failed-only --max-usd AMOUNT" in long_status

    # run's progress, into a file: plain lines, one each, never wrapped (a log is grepped, not
    # read at a width; the line drawn in a terminal fits it: tests/unit/test_progress_line.py),
    # with the whole count, money and elapsed time.
    progress = [x for x in shown.stderr.splitlines() if " jobs: " in x]
    assert_fits("\n".join(x for x in shown.stderr.splitlines() if x not in progress), "run's other lines")
    line = progress[-1]
    assert f"{plain_report['total']}/{plain_report['total']}" in line
    money = f"{usd_text(plain_report['spent_usd'])}/{usd_text(plain_report['estimated_usd'])}"
    assert money in line
    assert re.search(r"\b\d+:\d\d:\d\d\b", line), line
    assert_fits(shown.stdout, "run summary")


#: ``COLUMNS`` values that are no width: 0 was ``range() arg 3 must not be zero`` (exit 70), a
#: billion a layout that never ended, ``²`` (a digit to ``str.isdigit``) and 5,000 digits a
#: traceback before any command ran; the others were fine and must stay so.
ODD_COLUMNS = ["0", "000", "-3", "junk", "²", " 80 ", "1", "1000000000", "9" * 5000]


@pytest.mark.parametrize("columns", ODD_COLUMNS, ids=lambda columns: repr(columns[:12]))
def test_any_columns_value_lays_out_or_is_ignored(columns: str, manifest: MakeManifest, wb: Wb) -> None:
    # One case per value (three processes each), not one test of 27 processes: the suite's two
    # workers share them out.
    path = manifest("columns", MIXED.format(name="columns-of-any-width", cap="100"))
    assert wb("submit", path).code == 0
    wanbatch = str(Path(sys.executable).with_name("wanbatch"))  # a process of its own: rich reads
    for args in (["status"], ["status", "columns-of-any-width"], ["cost", "columns-of-any-width"]):
        env = {**os.environ, "COLUMNS": columns, "LINES": columns}  # when the consoles are made
        done = subprocess.run(
            [wanbatch, *args], capture_output=True, text=True, timeout=60, check=False, env=env
        )
        said = f"COLUMNS={columns[:12]!r} wanbatch {' '.join(args)}: {done.stderr}"
        assert done.returncode == 0, said
        assert done.stderr == "", said
        if columns != "1":  # one column is a width, and it is used: a letter a line
            assert "columns" in done.stdout, said
