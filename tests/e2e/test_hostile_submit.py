"""The real CLI against a fal that echoes the key, drops answers, or names foreign hosts.

* The key never reaches the database, ``status --json`` or an export, whatever a provider
  echoes (a list-shaped 422 ``detail``, an upload error); a key pasted with a trailing
  ``\\r`` or space is cleaned, and one with inner whitespace is refused in one line.
* Submit answers lost after fal accepted them (10 % of 60) end the run promptly: without a
  webhook receiver nothing can prove the outcome, so the policy applies at once.
* ``cancel`` says how many jobs ended at once and how many are being cancelled at fal.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import FAST_ENV, MakeManifest, Wb, export_jsonl
from tests.hostile import HostileProvider, json_reply

KEY = "5f0c1d9a-7e2b-4c3d-8a9b-0c1d2e3f4a5b:4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b"

ECHOES = """\
name: echoes
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
items:
  - prompt: submitted, and refused with the key in a field error
    image_url: https://images.example/cat.png
  - prompt: uploaded, and refused with the key in the error
    image_url: images/landscape.jpg
"""


@pytest.fixture
def fal(e2e_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileProvider]:
    """A hostile fal as wanbatch's queue and REST API, with a key pasted with a CRLF and a space."""
    with HostileProvider() as provider:
        monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", provider.url)
        monkeypatch.setenv("WANBATCH_FAL_REST_URL", provider.url)
        monkeypatch.setenv("FAL_KEY", f"  {KEY} \r\n")
        for name, value in FAST_ENV.items():
            monkeypatch.setenv(name, value)
        yield provider


def _all_text_in_database(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return "\n".join(
                repr(tuple(row))
                for table in inspect(conn).get_table_names()
                for row in conn.execute(text(f'SELECT * FROM "{table}"'))
            )
    finally:
        engine.dispose()


def test_an_echoed_key_is_stored_nowhere(
    wb: Wb, fal: HostileProvider, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WANBATCH_INLINE_MAX_BYTES", "0")  # every local image is uploaded
    field_error = {
        "detail": [
            {
                "loc": ["body", "image_url"],
                "msg": f"not allowed for key {KEY}",
                "type": "value_error",
                "ctx": {"authorization": f"Key {KEY}", "seen": [KEY]},
            }
        ]
    }
    fal.route("POST", r"/fal-ai/wan-i2v", json_reply(field_error, 422))
    fal.route(
        "POST",
        r"/storage/upload/initiate",
        json_reply({"detail": [{"loc": ["body"], "msg": f"upload refused for {KEY}", "input": KEY}]}, 400),
    )
    run = wb("run", manifest("echoes", ECHOES), "--json", "--no-progress")
    assert run.code == 1, run.stdout + run.stderr
    report = run.json()
    assert report["counts"]["failed"] == 2

    # The key as sent: stripped of the CRLF and spaces it was pasted with.
    assert {r.headers.get("authorization") for r in fal.requests} == {f"Key {KEY}"}
    assert fal.count("POST", r"/fal-ai/wan-i2v") == 1
    assert fal.count("POST", r"/storage/upload/initiate") >= 1

    records = export_jsonl(wb, report["batch"])
    errors = sorted(r["error"] for r in records)
    assert all("***" in e for e in errors), errors  # the echoes reached us, scrubbed
    assert any("not allowed for key" in e for e in errors)
    assert any("upload refused" in e for e in errors)

    status = wb("status", report["batch"], "--json")
    csv = wb("export", report["batch"], "--format", "csv")
    jsonl = wb("export", report["batch"], "--format", "jsonl")
    for shown in (run, status, csv, jsonl):
        assert KEY not in shown.stdout + shown.stderr
    assert KEY not in _all_text_in_database(f"sqlite:///{tmp_path / 'wanbatch.db'}")
    assert KEY[:20] not in _all_text_in_database(f"sqlite:///{tmp_path / 'wanbatch.db'}")


def test_a_key_with_inner_whitespace_is_refused_in_one_line(
    wb: Wb, fal: HostileProvider, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = KEY[:10] + " " + KEY[10:]
    monkeypatch.setenv("FAL_KEY", broken)
    run = wb("run", manifest("echoes", ECHOES), "--no-progress")
    assert run.code == 2
    assert "FAL_KEY" in run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert KEY[:10] not in run.stdout + run.stderr
    assert len([line for line in run.stderr.splitlines() if line.strip()]) == 1
    assert fal.requests == []


def _many(name: str, n: int) -> str:
    items = "\n".join(f"  - prompt: harbour at dusk, take {i}" for i in range(n))
    return f"name: {name}\nendpoint: fal-ai/wan-22\ndefaults:\n  resolution: 480p\nitems:\n{items}\n"


@pytest.mark.parametrize("policy", ["fail", "resubmit"])
def test_answers_lost_after_acceptance_end_the_run_promptly(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    monkeypatch.setenv("WANBATCH_SUBMIT_UNKNOWN_POLICY", policy)
    monkeypatch.setenv("WANBATCH_SUBMIT_UNKNOWN_DEADLINE", "600")  # no receiver: never waited for
    assert "WANBATCH_WEBHOOK_URL" not in os.environ
    sim.set_faults(submit_drop={"next": 6})  # 10 %: accepted, then the answer is lost
    started = time.monotonic()
    run = wb("run", manifest(f"drops-{policy}", _many(f"drops-{policy}", 60)), "--json", "--no-progress")
    took = time.monotonic() - started
    report = run.json()
    assert report["finished"] == report["total"] == 60  # every job terminal
    ledger = sim.ledger()
    dropped = sum(1 for e in ledger["entries"] if not e["client_saw_response"])
    print(f"60 jobs, {dropped} answers lost after acceptance, policy {policy}: {took:.1f}s")
    assert dropped == 6
    assert took < 300  # the 600 s deadline was not waited out (generous: seconds in practice)
    records = export_jsonl(wb, report["batch"])
    if policy == "fail":
        assert run.code == 1
        assert report["counts"]["failed"] == dropped
        assert report["counts"]["succeeded"] == 60 - dropped
        failed = [r for r in records if r["status"] == "failed"]
        assert all("WANBATCH_WEBHOOK_URL" in r["error"] for r in failed)
        assert all(r["error_type"] == "submit_unknown" for r in failed)
    else:
        assert run.code == 0, run.stderr
        assert report["counts"]["succeeded"] == 60
        assert report["possible_duplicate_charges"] == dropped
        assert len(ledger["duplicates"]) <= dropped  # every paid duplicate was reported


def test_cancel_says_what_ended_at_once(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest) -> None:
    submitted = wb("submit", manifest("to-cancel", _many("to-cancel", 5)), "--json")
    assert submitted.code == 0, submitted.stderr
    cancel = wb("cancel", submitted.json()["batch"], "--json", "--no-progress")
    assert cancel.code == 1
    assert cancel.json()["counts"]["cancelled"] == 5
    assert "5 job(s) cancelled at once" in cancel.stderr
    assert "0 at fal being cancelled" in cancel.stderr
    assert sim.ledger()["accepted"] == 0


def test_cancel_summary_names_the_reason_once(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest) -> None:
    """It read "5 cancelled (cancelled): cancelled by user"."""
    assert wb("submit", manifest("to-cancel", _many("to-cancel", 5))).code == 0
    cancel = wb("cancel", "to-cancel", "--no-progress")
    assert cancel.code == 1
    assert "5 cancelled: cancelled by user" in cancel.stdout
    assert "(cancelled)" not in cancel.stdout + wb("status", "to-cancel").stdout


def test_cancel_of_a_finished_batch_leaves_it_done(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    from tests.e2e.e2e_helpers import TWO_JOBS

    assert wb("run", manifest("fin", TWO_JOBS.format(name="fin")), "--no-progress").code == 0
    before = sim.ledger()["accepted"]

    done = wb("cancel", "fin", "--json", "--no-progress")

    assert done.code == 0, done.stderr
    assert "nothing to cancel: batch fin" in done.stderr
    assert done.json()["counts"]["succeeded"] == 2
    status = wb("status", "fin", "--json").json()
    assert (status["phase"], status["state"]) == ("done", "active")  # not relabelled `cancelled`
    assert sim.ledger()["accepted"] == before
