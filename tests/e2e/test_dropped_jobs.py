"""Jobs no longer in their manifest, after it was edited and run again under the same name.

The audit's cases: a typo fixed (or items cut) after a Ctrl-C left jobs pending, never sent —
the next run sent and billed the old spellings too; and an item that failed (422), fixed in the
manifest — the run of the fixed manifest exited 1 for ever on the old failure, ``status`` kept
reporting it, and ``rerun --failed-only`` paid for the rejected prompt again."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.engine import Engine

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl

HEAD = (
    "name: {name}\nendpoint: fal-ai/wan-i2v\n"
    "defaults: {{resolution: 480p, image_url: images/landscape.jpg}}\nitems:\n"
)


def _body(name: str, prompts: list[str]) -> str:
    """Each item's seed follows from its prompt: an item keeps its job (its key) wherever it is."""
    items = "".join(f"  - {{prompt: {p}, seed: {sum(map(ord, p))}}}\n" for p in prompts)
    return HEAD.format(name=name) + items


@pytest.fixture
def any_db(db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both dialects; through ``engine``, which empties the shared PostgreSQL database after."""
    monkeypatch.setenv("WANBATCH_DATABASE_URL", db_url)
    return db_url


def _by_prompt(wb: Wb, batch: str) -> dict[str, dict[str, Any]]:
    return {r["input"]["prompt"]: r for r in export_jsonl(wb, batch)}


def test_left_out_jobs_never_sent_are_dropped_sent_ones_stay_and_one_brought_back_is_sent_once(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, any_db: str
) -> None:
    path = manifest("typo", _body("typo", ["item A", "item B"]))
    assert wb("run", path, "--no-progress").code == 0
    # Four more items stored, never sent (what a Ctrl-C leaves pending); item F has a typo.
    path.write_text(_body("typo", ["item A", "item B", "item C", "item D", "item E", "item F rian"]))
    assert wb("submit", path).code == 0
    assert sim.ledger()["accepted"] == 2

    # The typo fixed, and item A (sent, paid for) cut.
    fixed = _body("typo", ["item B", "item C", "item D", "item E", "item F rain"])
    path.write_text(fixed)
    submitted = wb("submit", path, "--json")
    assert submitted.code == 0, submitted.stderr
    report = submitted.json()
    assert (report["not_in_manifest"], report["dropped"], report["restored"]) == (2, 1, 0)
    assert (
        "2 job(s) of batch typo are no longer in its manifest: 1 never sent are dropped (cancelled); "
        "1 already sent stay in the batch (they may have been paid for)"
    ) in submitted.stderr
    run = wb("run", path, "--no-progress")
    assert run.code == 0, run.stderr  # the dropped job is no job of the manifest: no failure
    assert sim.ledger()["accepted"] == 6  # A, B, then C, D, E and "rain": never "rian"
    assert "2 ended job(s) are no longer in the manifest (1 succeeded, 1 cancelled)" in run.stdout
    jobs = _by_prompt(wb, "typo")
    assert (jobs["item F rian"]["status"], jobs["item F rian"]["attempts"]) == ("cancelled", 0)
    assert "no longer in its manifest" in jobs["item F rian"]["error"]
    assert jobs["item A"]["status"] == "succeeded"
    status = wb("status", "typo", "--json").json()
    assert status["failures"] == []
    assert status["estimated_usd"] == pytest.approx(6 * 0.2)  # the dropped job's estimate is not counted

    # "rian" was right after all: brought back, it is the same job, sent once.
    path.write_text(_body("typo", ["item B", "item C", "item D", "item E", "item F rian"]))
    back = wb("run", path, "--json", "--no-progress")
    assert back.code == 0, back.stderr
    assert sim.ledger()["accepted"] == 7
    jobs = _by_prompt(wb, "typo")
    assert len(jobs) == 7
    assert (jobs["item F rian"]["status"], jobs["item F rian"]["attempts"]) == ("succeeded", 1)


def test_a_failed_job_whose_item_was_fixed_no_longer_fails_the_run_nor_is_rerun(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, any_db: str
) -> None:
    path = manifest("cp", _body("cp", ["item zero bad", "item one"]))
    sim.set_faults(model_error={"next": 2, "error_type": "content_policy_violation", "status": 422})
    first = wb("run", path, "--no-progress")
    assert first.code == 1, first.stderr
    assert sim.ledger()["accepted"] == 2

    # Item 0 fixed: its new job succeeds; item 1, still in the manifest, still failed.
    path.write_text(_body("cp", ["item zero good", "item one"]))
    second = wb("run", path, "--json", "--no-progress")
    assert second.code == 1, second.stderr  # item 1 failed, and is in the manifest
    assert [(f["state"], f["count"]) for f in second.json()["failures"]] == [("failed", 1)]
    assert second.json()["not_in_manifest"]["ended"] == 1

    rerun = wb("rerun", "cp", "--failed-only", "--json", "--no-progress")
    assert rerun.code == 0, rerun.stderr
    assert "1 failed or cancelled job(s) of batch cp are no longer in its manifest: left out" in rerun.stderr
    assert rerun.json()["total"] == 1
    assert sim.ledger()["accepted"] == 4  # "item zero good", then item 1 again: never "item zero bad"

    # Item 1 fixed too: nothing of the manifest failed any more.
    path.write_text(_body("cp", ["item zero good", "item one fixed"]))
    third = wb("run", path, "--no-progress")
    assert third.code == 0, third.stderr
    assert "2 ended job(s) are no longer in the manifest (2 failed)" in third.stdout
    status = wb("status", "cp")
    assert "failed (content_policy_violation)" not in status.stdout + status.stderr
    assert "2 ended job(s) are no longer in the manifest" in status.stdout + status.stderr
    ledger = sim.ledger()["accepted"]
    nothing = wb("rerun", "cp", "--failed-only")
    assert nothing.code == 0, nothing.stderr
    assert "has no failed or cancelled job in its manifest (2 no longer in it are left out)" in nothing.stdout
    assert sim.ledger()["accepted"] == ledger


def test_a_plain_rerun_leaves_out_the_jobs_a_resubmit_dropped(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, any_db: str
) -> None:
    """A dropped job was never sent: a rerun has nothing of it to repeat. A plain rerun (no
    ``--failed-only``) sent and billed it, item C, which the user had removed."""
    path = manifest("t1", _body("t1", ["item A", "item B", "item C"]))
    assert wb("submit", path).code == 0
    path.write_text(_body("t1", ["item A", "item B"]))
    assert wb("submit", path).code == 0  # item C: dropped, never sent
    assert wb("run", "t1", "--no-progress").code == 0
    assert sim.ledger()["accepted"] == 2

    rerun = wb("rerun", "t1", "--json", "--no-progress")
    assert rerun.code == 0, rerun.stderr
    assert (
        "1 job(s) of batch t1 were dropped from its manifest, never sent: left out "
        "(nothing of them to repeat)"
    ) in rerun.stderr
    assert rerun.json()["total"] == 2
    assert sim.ledger()["accepted"] == 4  # A and B again: never C
    records = export_jsonl(wb, "t1-rerun-1")
    assert sorted((r["input"]["prompt"], r["in_manifest"]) for r in records) == [
        ("item A", True),
        ("item B", True),
    ]


def test_a_kept_job_that_ended_without_being_sent_is_not_said_to_be_paid_for(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, any_db: str
) -> None:
    """A job a budget cancelled before its first POST, then removed from the manifest, ended
    without being sent: it stays as it is, and the warning does not call it "already sent"."""
    prompts = ["item A", "item B", "item C"]
    budget = "budget: {max_usd: 0.45}\n"
    path = manifest("b3", _body("b3", prompts) + budget)
    assert wb("run", path, "--no-progress").code == 1  # one job cancelled by the budget
    assert sim.ledger()["accepted"] == 2
    (cut,) = [p for p, r in _by_prompt(wb, "b3").items() if r["status"] == "cancelled"]
    assert _by_prompt(wb, "b3")[cut]["attempts"] == 0

    path.write_text(_body("b3", [p for p in prompts if p != cut]) + budget)
    submitted = wb("submit", path, "--json")
    assert submitted.code == 0, submitted.stderr
    report = submitted.json()
    assert (report["not_in_manifest"], report["dropped"], report["ended_unsent"]) == (1, 0, 1)
    assert (
        "1 job(s) of batch b3 are no longer in its manifest: 1 ended without being sent stay as they are; "
        "numbered after its 2 item(s)"
    ) in submitted.stderr
    assert "already sent" not in submitted.stderr
    assert "paid for" not in submitted.stderr
