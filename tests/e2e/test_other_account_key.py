"""FAL_KEY rotated to a key of another fal account, the old key revoked, while requests sent with
the old one are at fal (keys audit, t2): fal answers the new key "not found" about each of them.

Before: ``run`` repeated "not taken as final" warnings every 30 s for ever; ``cancel`` recorded
"cancel requested at fal: not_found" (as if cancelled) and waited for ever too; and no command
could write the requests off. Now ``run`` and ``cancel`` end (exit 2) naming the key id and the
ways out, a "not found" to another key's cancel is not recorded as a cancel, and
``cancel --abandon-other-key`` ends those jobs failed, their estimate counted as possibly billed.

The simulator plays fal for the new key's account: it never had the old key's requests, so it
answers 404 about them, as fal answers a key of another account (the audit's per-account
stand-in in front of the simulator gave the same answers).
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, text

from falsim.server import SimulatorHandle
from jobs.settings import Settings
from tests.e2e.e2e_helpers import FAL_KEY, TWO_JOBS, MakeManifest, Wb, db_rows
from worker.here import queue_origin
from worker.limits import api_key_id

OLD_KEY = "test-key-other-account-old-9d41"

pytestmark = pytest.mark.timeout(120)


def _key_id(key: str) -> str:
    from pydantic import SecretStr

    return api_key_id(Settings(FAL_KEY=SecretStr(key)))


def _sent_with_old_key(url: str, sim: SimulatorHandle) -> None:
    """Every job of the database as a run with OLD_KEY left it: queued at fal, under the old
    key's account (requests this simulator, the new key's fal, never had)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE jobs SET state = 'queued', attempts = 1, request_id = 'old-account-' || id, "
                    "api_key_id = :key, fal_origin = :origin, submitted_at = CURRENT_TIMESTAMP, "
                    "sent_at = CURRENT_TIMESTAMP"
                ),
                {"key": _key_id(OLD_KEY), "origin": queue_origin(sim.url)},
            )
    finally:
        engine.dispose()


def test_run_and_cancel_end_and_abandon_writes_the_other_keys_requests_off(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    url = os.environ["WANBATCH_DATABASE_URL"]
    assert wb("submit", manifest("rot", TWO_JOBS.format(name="rot")), "--json").code == 0
    _sent_with_old_key(url, sim)
    old_id, new_id = _key_id(OLD_KEY), _key_id(FAL_KEY)

    ran = wb("run", "rot", "--json", "--no-progress")
    assert ran.code == 2, ran.stdout + ran.stderr
    report = ran.json()
    assert report["ok"] is False
    said = report["error"]
    assert f"2 request(s) of this batch were sent with another API key (2 with key id {old_id})" in said
    assert f"this FAL_KEY (key id {new_id})" in said
    assert "`wanbatch cancel rot --abandon-other-key`" in said
    assert {o["key_id"] for o in report["other_key"]} == {old_id}
    assert report["counts"]["queued"] == 2  # left as they were: fal may still run them
    shown = ran.stdout + ran.stderr
    assert OLD_KEY not in shown
    assert FAL_KEY not in shown

    cancelled = wb("cancel", "rot", "--json", "--no-progress")
    assert cancelled.code == 2, cancelled.stdout + cancelled.stderr
    assert "--abandon-other-key" in cancelled.json()["error"]
    # fal's "not found" to the new key's cancel is not a cancel: nothing became cancelling
    assert db_rows(url, "SELECT state, count(*) FROM jobs GROUP BY state") == [("queued", 2)]
    reasons = [r[0] or "" for r in db_rows(url, "SELECT reason FROM job_events")]
    assert not [r for r in reasons if "cancel requested at fal" in r], reasons

    abandoned = wb("cancel", "rot", "--abandon-other-key", "--json", "--no-progress")
    assert abandoned.code == 1, abandoned.stdout + abandoned.stderr
    final = abandoned.json()
    assert final["counts"]["failed"] == 2
    assert "2 request(s) sent with another API key" in abandoned.stderr
    rows = db_rows(url, "SELECT error_type, ambiguous_usd, est_usd FROM jobs")
    assert {r[0] for r in rows} == {"abandoned_other_key"}
    assert all(float(r[1]) == float(r[2]) > 0 for r in rows)  # counted as possibly billed
    assert float(final["estimated_usd"]) > 0
    assert float(final["possibly_billed_usd"]) == pytest.approx(float(final["estimated_usd"]))


def test_abandon_other_key_needs_a_key(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert wb("submit", manifest("nokey", TWO_JOBS.format(name="nokey")), "--json").code == 0
    monkeypatch.delenv("FAL_KEY")
    refused = wb("cancel", "nokey", "--abandon-other-key", "--no-progress")
    assert refused.code == 2
    assert "FAL_KEY is not set: --abandon-other-key" in refused.stderr
    url = os.environ["WANBATCH_DATABASE_URL"]
    assert db_rows(url, "SELECT state FROM batches") != [("cancelled",)]  # nothing was cancelled
