"""A retried job keeps its money counted while its video is fetched, so the budget cap holds.

A job whose first attempt failed at fal (a model error: billed nothing) and whose second one
fal finished is ``downloading``: fal bills that attempt, but the job's actual cost is written
only once the video is stored. It counted $0 meanwhile (its actual cost, that of the failed
attempt), and the next job a freed slot let through fitted under the batch's cap: three jobs
at $0.2025 each ran under a $0.41 cap that had room for two.
"""

from __future__ import annotations

import importlib
import time
from decimal import Decimal
from typing import Any

import pytest

from falsim.server import SimulatorHandle
from jobs import db, store
from jobs.states import JobState
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl

# 3 jobs × $0.2025 (wan-22, 480p): a $0.41 cap has room for two.
THREE_JOBS = """\
name: retried
endpoint: fal-ai/wan-22
budget:
  max_usd: 0.41
defaults:
  resolution: 480p
items:
  - prompt: A paper boat drifting down a rainy street
  - prompt: A red kite over a green hill
  - prompt: A lighthouse in the fog at dusk
"""
CAP = Decimal("0.41")
#: The download step's module (``worker.steps.download`` is also the step's name in its package).
download_step = importlib.import_module("worker.steps.download")


@pytest.mark.slow
def test_a_retried_job_being_downloaded_keeps_the_budget_cap(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One request at fal at a time. Job 0's first attempt fails at once (a model error, billed
    # nothing) and waits 0.1 s to be sent again; job 1, sent meanwhile, runs for a second at
    # fal, so job 0's resend is due when job 1 finishes, and goes before job 2 (oldest first).
    # When job 0's second attempt finishes, the slot frees while its video is fetched: dispatch
    # then decides on job 2, with job 1's $0.2025 spent and job 0's being billed.
    monkeypatch.setenv("WANBATCH_MAX_OUTSTANDING", "1")
    monkeypatch.setenv("WANBATCH_MAX_DOWNLOAD_BACKLOG", "5")
    monkeypatch.setenv("WANBATCH_RETRY_BASE_DELAY", "0.1")
    sim.set_faults(model_error={"next": 1})
    latency = sim.engine.options.latency_seconds
    sim.update_options(latency_seconds=1.0)

    # The retried job's download waits until dispatch has decided on job 2 (sent or cancelled):
    # the decision is taken while the job is ``downloading``, whatever the download's speed.
    fetch = download_step._download_video
    held: list[str] = []

    def fetch_when_decided(rt: Any, job_id: str, claim: Any, *args: Any, **kwargs: Any) -> Any:
        if claim.job.attempts >= 2:
            held.append(job_id)
            for _ in range(300):
                with db.read_scope(rt.engine) as session:
                    counts = store.counts_by_state(session, claim.batch_id)
                if not counts[JobState.PENDING.value]:
                    break
                time.sleep(0.05)
        return fetch(rt, job_id, claim, *args, **kwargs)

    monkeypatch.setattr(download_step, "_download_video", fetch_when_decided)
    try:
        run = wb("run", manifest("retried", THREE_JOBS), "--json", "--no-progress")
    finally:
        sim.update_options(latency_seconds=latency)
    report = run.json()
    ledger = sim.ledger()
    assert Decimal(ledger["billed_usd"]) <= CAP, ledger["billed_usd"]
    assert Decimal(str(report["spent_usd"])) <= CAP
    assert Decimal(str(report["spent_usd"])) == Decimal(ledger["billed_usd"])
    assert ledger["accepted"] == 3  # job 0 twice, job 1; job 2 never sent
    records = {r["item_index"]: r for r in export_jsonl(wb, report["batch"])}
    # The scenario happened: job 0 sent twice, held while dispatch decided on job 2.
    assert (records[0]["status"], records[0]["attempts"]) == ("succeeded", 2)
    assert len(held) == 1
    assert records[1]["status"] == "succeeded"
    assert (records[2]["status"], records[2]["error_type"]) == ("cancelled", "budget")
    assert report["counts"]["succeeded"] == 2
    assert report["cancelled_for_budget"] == 1
    assert run.code == 1, run.stderr  # a job cancelled for the budget
