"""``rerun --failed-only`` never pays twice for a video a rerun of the batch already rendered.

The audit: a budget cap cancelled jobs of ``budget1``; ``wanbatch rerun budget1 --failed-only
--max-usd 5``, run again from the shell history, made ``budget1-rerun-2``, ``-3``, … each
rendering (and paying for) the same pinned-seed inputs, and ``status budget1`` kept advising
that rerun. A plain ``rerun`` stays a reproducibility run: it pays again on purpose.
"""

from __future__ import annotations

import json
import os
from decimal import Decimal
from typing import Any

import pytest

from falsim.server import SimulatorHandle
from jobs.rerun import rerun_batch
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import MakeManifest, Wb, db_rows, processed

# 6 pinned-seed jobs × $0.20: a $0.60 cap lets 3 through and cancels 3.
SIX_JOBS = """\
name: budget1
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  num_frames: 81
matrix:
  seed: [1, 2, 3, 4, 5, 6]
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
budget:
  max_usd: 0.60
"""


def _capped_batch(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest) -> str:
    """``budget1``: 3 jobs succeeded, 3 cancelled by the cap; 3 renders paid."""
    first = wb("run", manifest("budget1", SIX_JOBS), "--json", "--no-progress")
    report: dict[str, Any] = first.json()
    assert report["counts"]["succeeded"] == 3
    assert report["cancelled_for_budget"] == 3
    assert sim.ledger()["accepted"] == 3
    return str(report["batch"])


def _status(wb: Wb, batch: str) -> str:
    """``status BATCH`` as one line of words (the table wraps it)."""
    done = wb("status", batch)
    assert done.code == 0, done.stderr
    return " ".join(done.stdout.split())


@pytest.mark.slow
def test_failed_only_again_pays_nothing_and_status_names_the_rerun(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    parent = _capped_batch(wb, sim, manifest)
    first = processed(wb, "rerun", "budget1", "--failed-only", "--max-usd", "5")
    assert first["name"] == "budget1-rerun-1"
    assert first["counts"]["succeeded"] == 3
    assert sim.ledger()["accepted"] == 6

    status = _status(wb, "budget1")
    assert "to run them" not in status  # no rerun advised for what is rendered
    assert "3 failed or cancelled job(s) rendered since by a rerun: budget1-rerun-1" in status
    assert "`wanbatch export budget1-rerun-1` lists their videos" in status
    rendered = wb("status", "budget1", "--json").json()["rerun_rendered"]
    assert rendered["jobs"] == rendered["cancelled_for_budget"] == 3
    assert [r["name"] for r in rendered["reruns"]] == ["budget1-rerun-1"]

    again = wb("rerun", "budget1", "--failed-only", "--max-usd", "5", "--json", "--no-progress")

    assert again.code == 0, again.stderr
    nothing = again.json()
    assert nothing["batch"] is None
    message = " ".join(nothing["message"].split())
    assert "already rendered with the same input by budget1-rerun-1" in message
    assert "--pay-again" in message
    assert sim.ledger()["accepted"] == 6  # nothing paid twice
    names = [b["name"] for b in wb("status", "--json").json()["batches"]]
    assert sorted(names) == ["budget1", "budget1-rerun-1"]  # no batch was created

    # Asked for in so many words, it renders (and pays for) them again.
    forced = processed(wb, "rerun", "budget1", "--failed-only", "--max-usd", "5", "--pay-again")
    assert forced["counts"]["succeeded"] == 3
    assert sim.ledger()["accepted"] == 9
    # A plain rerun compares whole runs: every job is rendered again, on purpose.
    sweep = processed(wb, "rerun", parent, "--max-usd", "5")
    assert sweep["total"] == 6
    assert sim.ledger()["accepted"] == 15


def _seeds(batch: str, state: str) -> set[int]:
    """The seeds of the jobs of ``batch`` (by name) in ``state``."""
    rows = db_rows(
        os.environ["WANBATCH_DATABASE_URL"],
        "SELECT j.input FROM jobs j JOIN batches b ON b.id = j.batch_id "
        f"WHERE b.name = '{batch}' AND j.state = '{state}'",
    )
    return {int((data if isinstance(data, dict) else json.loads(data))["seed"]) for (data,) in rows}


@pytest.mark.slow
def test_a_sibling_made_before_the_batch_rendered_its_jobs_already_not_since(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """``budget1-rerun-2``'s own summary said its cancelled jobs were "rendered since by a
    rerun: budget1-rerun-1", a sibling made (and finished) before it: it had rendered them
    already. Said as ``rerun`` says it; ``--json`` marks each rerun ``since`` or not.

    CI: the line was missing now and then. ``--vary seed=1..12`` over jobs of seeds 1 to 6 made
    each of its twelve jobs a repeat of the seed-1 job, and only that job's repeats were asked
    which inputs they rendered: the seed-1 job found, the others never. Whether the line came
    hung on which 3 jobs the cap let through (the seed-1 job or not), and it named 1 job at most
    — and ``rerun budget1-rerun-2 --failed-only`` paid again for the videos of seeds 2 to 6.
    Whichever jobs the cap lets through, every cancelled one of seeds 1 to 6 is counted now."""
    _capped_batch(wb, sim, manifest)
    assert processed(wb, "rerun", "budget1", "--max-usd", "5")["counts"]["succeeded"] == 6  # seeds 1..6
    second = wb("rerun", "budget1", "--vary", "seed=1..12", "--max-usd", "0.60", "--no-progress")

    assert second.code == 1, second.stderr  # the cap cancelled 9 of the 12
    assert sim.ledger()["accepted"] == 3 + 6 + 3
    rendered_seeds = _seeds("budget1-rerun-1", "succeeded")
    assert rendered_seeds == {1, 2, 3, 4, 5, 6}
    cancelled = _seeds("budget1-rerun-2", "cancelled")
    assert len(cancelled) == 9
    covered = cancelled & rendered_seeds  # 3 to 6 of them, as the cap chose
    assert len(covered) >= 3
    summary = " ".join(second.stdout.split())
    assert (
        f"{len(covered)} failed or cancelled job(s) already rendered with the same input by budget1-rerun-1"
        in summary
    ), summary
    assert f"to run the other {9 - len(covered)}:" in summary, summary
    assert "rendered since" not in summary
    rendered = wb("status", "budget1-rerun-2", "--json").json()["rerun_rendered"]
    assert rendered["jobs"] == rendered["cancelled_for_budget"] == len(covered)
    assert [(r["name"], r["since"]) for r in rendered["reruns"]] == [("budget1-rerun-1", False)]
    # The parent's own status still says "since": budget1-rerun-1 came after budget1.
    parent = wb("status", "budget1", "--json").json()["rerun_rendered"]
    assert [(r["name"], r["since"]) for r in parent["reruns"]] == [("budget1-rerun-1", True)]
    assert "rendered since by a rerun: budget1-rerun-1" in _status(wb, "budget1")
    # ``status`` with no batch reads every lineage at once (another query): the same count.
    everything = wb("status", "--json").json()["batches"]
    assert [b["rerun_rendered"]["jobs"] for b in everything if b["name"] == "budget1-rerun-2"] == [
        len(covered)
    ]

    # What the summary advises pays only for what nothing rendered: seeds 7 to 12 not let through.
    third = processed(wb, "rerun", "budget1-rerun-2", "--failed-only", "--max-usd", "5")
    assert third["total"] == 9 - len(covered)
    assert sim.ledger()["accepted"] == 3 + 6 + 3 + 9 - len(covered)


@pytest.mark.slow
def test_failed_only_leaves_out_only_what_a_rerun_rendered_in_any_generation(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    _capped_batch(wb, sim, manifest)
    # A cap of $0.20 renders one of the three; the other two are cancelled again.
    child = wb("rerun", "budget1", "--failed-only", "--max-usd", "0.20", "--json", "--no-progress")
    assert child.code == 1, child.stderr  # jobs cancelled: exit 1
    assert child.json()["counts"]["succeeded"] == 1
    status = _status(wb, "budget1")
    assert "to run the other 2: raise budget.max_usd in its manifest" in status
    assert "`wanbatch rerun budget1 --failed-only --max-usd AMOUNT`" in status
    assert "1 failed or cancelled job(s) rendered since by a rerun: budget1-rerun-1" in status

    second = wb("rerun", "budget1", "--failed-only", "--max-usd", "0.20", "--json", "--no-progress")

    assert second.code == 1, second.stderr  # one of the two cancelled by the cap
    assert second.json()["total"] == 2  # the rendered one is left out, with a warning
    warning = " ".join(second.stderr.split())
    assert "1 failed or cancelled job(s) of batch budget1 left out" in warning
    assert "budget1-rerun-1" in warning
    assert second.json()["counts"]["succeeded"] == 1
    assert sim.ledger()["accepted"] == 5

    # The last one, rendered by a rerun of a rerun, counts as rendered too.
    grandchild = processed(wb, "rerun", second.json()["name"], "--failed-only", "--max-usd", "1")
    assert grandchild["counts"]["succeeded"] == 1
    assert sim.ledger()["accepted"] == 6

    last = wb("rerun", "budget1", "--failed-only", "--max-usd", "5", "--no-progress")

    assert last.code == 0, last.stderr
    said = " ".join(last.stdout.split())
    assert "nothing to rerun: the 3 failed or cancelled jobs of batch budget1 were already rendered" in said
    assert "budget1-rerun-1 (1 job), budget1-rerun-2 (1 job) and budget1-rerun-2-rerun-1 (1 job)" in said
    assert sim.ledger()["accepted"] == 6
    assert "--max-usd AMOUNT" not in _status(wb, "budget1")


@pytest.mark.slow
def test_failed_only_again_before_the_first_rerun_ran_pays_once(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """The hole the audit found: a rerun stored but not run yet (the dashboard's button, or a
    rerun Ctrl-C stopped) did not count, so the same command stored ``budget1-rerun-2`` with the
    same jobs, and running both paid twice."""
    _capped_batch(wb, sim, manifest)
    # Stored, not run: what the dashboard's "Rerun failed" button does without workers.
    stored = rerun_batch("budget1", failed_only=True, max_usd=Decimal("5"), settings=get_settings())
    assert (stored.name, stored.added) == ("budget1-rerun-1", 3)

    again = wb("rerun", "budget1", "--failed-only", "--max-usd", "5", "--json", "--no-progress")

    assert again.code == 0, again.stderr
    nothing = again.json()
    assert nothing["batch"] is None
    message = " ".join(nothing["message"].split())
    assert "the 3 failed or cancelled jobs of batch budget1 are being rerun with the same input" in message
    assert "in budget1-rerun-1 (`wanbatch run budget1-rerun-1` goes on)" in message
    assert "--pay-again" in message
    assert sim.ledger()["accepted"] == 3  # nothing sent
    names = [b["name"] for b in wb("status", "--json").json()["batches"]]
    assert sorted(names) == ["budget1", "budget1-rerun-1"]  # no batch was created

    status = _status(wb, "budget1")
    assert "to run them" not in status  # no other rerun advised
    assert "3 job(s) are being rerun in budget1-rerun-1: `wanbatch run budget1-rerun-1` goes on" in status
    pending = wb("status", "budget1", "--json").json()["rerun_pending"]
    assert pending["jobs"] == pending["cancelled_for_budget"] == 3
    assert [(r["name"], r["jobs"]) for r in pending["reruns"]] == [("budget1-rerun-1", 3)]

    # Cancelled, that rerun renders nothing: its jobs cover nothing any more.
    assert wb("cancel", "budget1-rerun-1").code == 1  # its 3 jobs end cancelled: exit 1
    advised = _status(wb, "budget1")
    assert "to run them: raise budget.max_usd in its manifest" in advised
    assert "`wanbatch rerun budget1 --failed-only --max-usd AMOUNT`" in advised
    second = processed(wb, "rerun", "budget1", "--failed-only", "--max-usd", "5")
    assert (second["name"], second["counts"]["succeeded"]) == ("budget1-rerun-2", 3)
    assert sim.ledger()["accepted"] == 6
