"""A run fal's refusal of the key or the account stopped: exit 2 and what to fix, not exit 1.

The bug: fal answering a submit with 403 ("User is locked": exhausted balance, or a key without
access) paused the batch — right: every job would meet the same refusal — and `run` then ended
with exit 1, which the contract keeps for "some jobs ended failed or cancelled". None had: every
job was still pending. A script scheduling overnight renders read it as "the batch is over,
rerun what failed", and `--json` said nothing of why. Now such a run exits 2 (as a missing
FAL_KEY, or a run of a batch `wanbatch pause` holds, does: something to fix before running it
again), `--json` adds `ok: false` and an `error` saying what to fix and how to go on, and running
the same command once fal accepts the key finishes the batch.

A `rerun` stopped that way named "run the same command again", which stores another rerun
batch: it names `wanbatch run NAME-rerun-N` instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import FAL_KEY, MakeManifest, Wb

MANIFEST = "name: broke\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: one\n  - prompt: two\n"


@pytest.fixture
def locked(sim: SimulatorHandle) -> Iterator[SimulatorHandle]:
    """The simulator answering the tests' FAL_KEY with 403 "User is locked" (given back unlocked:
    key options survive its ``reset``)."""
    sim.update_options(locked_keys=[FAL_KEY])
    yield sim
    sim.update_options(locked_keys=[])


def test_a_run_fal_refused_exits_2_says_what_to_fix_and_goes_on_once_fixed(
    wb: Wb, locked: SimulatorHandle, manifest: MakeManifest
) -> None:
    path = manifest("broke", MANIFEST)

    run = wb("run", path, "--no-progress", "--json")

    assert run.code == 2, run.stderr
    body = run.json()
    assert (body["ok"], body["phase"], body["counts"]["pending"], body["counts"]["failed"]) == (
        False,
        "paused",
        2,
        0,
    )
    assert body["error"].startswith("batch broke is paused: fal submit: the account is refused (HTTP 403)")
    assert "fix FAL_KEY or the fal account (`wanbatch doctor` checks both)" in body["error"]
    assert body["error"].endswith("then run this command again to go on")
    assert "fix it, then run the same command again to resume" in " ".join(run.stderr.split())
    assert locked.ledger()["accepted"] == 0

    human = wb("run", path, "--no-progress")  # still refused: the same, said for a person
    assert human.code == 2, human.stderr
    assert "the account is refused (HTTP 403)" in human.stderr

    locked.update_options(locked_keys=[])  # the balance is topped up
    done = wb("run", path, "--no-progress", "--json")
    assert done.code == 0, done.stderr
    assert done.json()["counts"]["succeeded"] == 2


def test_a_rerun_fal_refused_names_the_run_that_goes_on_with_it(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """Running `rerun` again would store `broke-rerun-2`: the same jobs in a second batch."""
    assert wb("run", manifest("broke", MANIFEST), "--no-progress").code == 0
    sim.update_options(locked_keys=[FAL_KEY])
    try:
        rerun = wb("rerun", "broke", "--no-progress", "--json")
    finally:
        sim.update_options(locked_keys=[])

    assert rerun.code == 2, rerun.stderr
    body = rerun.json()
    assert body["name"] == "broke-rerun-1"
    assert body["error"].endswith("then run `wanbatch run broke-rerun-1` to go on")
    said = " ".join(rerun.stderr.split())
    assert "fix it, then run `wanbatch run broke-rerun-1` to resume" in said
    assert "run the same command again" not in said

    again = wb("run", "broke-rerun-1", "--no-progress", "--json")
    assert again.code == 0, again.stderr
    assert again.json()["counts"]["succeeded"] == 2
    assert "broke-rerun-2" not in wb("status").stdout
