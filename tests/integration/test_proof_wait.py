"""A job whose submit's outcome is unknown waits for fal's webhook proof: the views say so.

An audit (a receiver configured but unreachable, the simulator's ``submit_drop``): a 3-job
``run`` showed "2/3 … ~0:00:15 left · submit_unknown:1", then "~0:00:45 left" a minute later,
while the job waited ``WANBATCH_SUBMIT_UNKNOWN_DEADLINE`` (600 s) for proof that could not
come; ``status`` showed only "submit_unknown 1". Nothing said that a job waited for proof, until
when, or what then. Now ``status`` (text and ``--json``), ``run``'s progress line
(:func:`jobs.batches.batch_progress`) and the dashboard (``tests/web/test_batch_page_words.py``)
say it in one wording (:func:`jobs.listing.proof_wait_text`), and the time left never ends
before that wait does.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, update

from jobs import db, listing, store
from jobs.batches import batch_progress, batch_report
from jobs.models import Job, utcnow
from jobs.settings import get_settings
from jobs.states import JobState
from tests.in_process import run_main
from tests.step_runtime import add_batch

T2V = "fal-ai/wan-22"
#: What the audit saw: 2 of 3 done within half a minute, one waiting 9m30s more for proof.
WAIT = timedelta(seconds=570)


def _audited(engine: Engine, now: datetime, wait: timedelta = WAIT) -> str:
    """The audit's batch at ``now``: two jobs succeeded (sent 31 s ago), the third in
    ``submit_unknown`` until ``now + wait``, its run beating."""
    batch_id = add_batch(engine, "proof", [(T2V, {"prompt": p}) for p in "abc"])
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "run-host:42:", [batch_id], now)
        jobs = sorted(store.jobs_of_batch(session, batch_id), key=lambda j: j.item_index)
        for job in jobs[:2]:
            session.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(
                    state=JobState.SUCCEEDED.value,
                    submitted_at=now - timedelta(seconds=31),
                    finished_at=now - timedelta(seconds=5),
                )
            )
        session.execute(
            update(Job)
            .where(Job.id == jobs[2].id)
            .values(
                state=JobState.SUBMIT_UNKNOWN.value,
                submitted_at=now - timedelta(seconds=30),
                next_attempt_at=now + wait,
                error_type="submit_unknown",
            )
        )
    return batch_id


def test_the_forecast_never_ends_before_the_wait_for_proof(engine: Engine) -> None:
    now = utcnow().replace(hour=12)  # the wait ends the same UTC day: its time alone
    batch_id = _audited(engine, now)
    with db.read_scope(engine) as session:
        current = batch_progress(session, batch_id, now=now)
        report = batch_report(session, batch_id, now=now)

    # At the pace of the two done (2 in 31 s) the third was "~0:00:15 left"; it waits 9m30s.
    assert current["eta_seconds"] == report["eta_seconds"] == WAIT.total_seconds()
    until = now + WAIT
    note = (
        f"1 job(s) wait for fal's webhook proof of their submit until {until:%H:%M:%S} UTC, then fail "
        "(WANBATCH_SUBMIT_UNKNOWN_POLICY=fail: submission outcome unknown; a later proof still "
        "fetches its video)"
    )
    assert current["proof_wait_note"] == report["proof_wait_note"] == note
    assert (report["proof_waiting"], report["proof_wait_until"]) == (1, until.isoformat())

    # Once the wait has ended the job is the reconciler's to settle: no longer said to wait.
    later = now + WAIT + timedelta(seconds=1)
    with db.read_scope(engine) as session:
        store.record_heartbeat(session, "run-host:42:", [batch_id], later)
        over = batch_report(session, batch_id, now=later)
    assert (over["proof_waiting"], over["proof_wait_until"], over["proof_wait_note"]) == (0, None, "")


def test_the_policy_named_is_the_one_configured() -> None:
    wait = listing.ProofWait(2, datetime.fromisoformat("2026-12-02T14:02:11+00:00"))
    now = datetime.fromisoformat("2026-12-02T13:00:00+00:00")
    assert listing.proof_wait_text(wait, policy="resubmit", now=now) == (
        "2 job(s) wait for fal's webhook proof of their submit until 14:02:11 UTC, then are sent "
        "again while attempts remain (WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit: a possible duplicate "
        "charge), else fail"
    )
    assert listing.proof_wait_text(None, policy="fail", now=now) == ""


def test_a_wait_that_ends_on_another_day_names_its_date() -> None:
    """An overnight render read the next morning: "until 01:02:11 UTC" did not say which day's
    (``WANBATCH_SUBMIT_UNKNOWN_DEADLINE`` can be hours). The date is named when the wait ends on
    another UTC day than ``now``'s; the time alone when it ends the same day."""
    wait = listing.ProofWait(1, datetime.fromisoformat("2026-12-06T01:02:11+00:00"))
    evening = datetime.fromisoformat("2026-12-05T23:40:00+00:00")
    said = "1 job(s) wait for fal's webhook proof of their submit until 2026-12-06 01:02:11 UTC, then fail"
    assert listing.proof_wait_text(wait, policy="fail", now=evening).startswith(said)
    # The day is UTC's, whatever offset ``now`` is given in (00:40 in Berlin is still the 5th in UTC).
    berlin = datetime.fromisoformat("2026-12-06T00:40:00+01:00")
    assert listing.proof_wait_text(wait, policy="fail", now=berlin).startswith(said)
    morning = datetime.fromisoformat("2026-12-06T00:10:00+00:00")
    assert listing.proof_wait_text(wait, policy="fail", now=morning).startswith(
        "1 job(s) wait for fal's webhook proof of their submit until 01:02:11 UTC, then fail"
    )
    assert listing.utc_clock(wait.until, now=morning) == "01:02:11 UTC"
    assert listing.utc_clock(wait.until, now=evening) == "2026-12-06 01:02:11 UTC"


def test_status_and_run_name_the_date_of_a_wait_past_midnight(engine: Engine) -> None:
    """``status`` (:func:`jobs.batches.batch_report`) and ``run``'s progress line
    (:func:`jobs.batches.batch_progress`) at 23:55 UTC of a job that waits for proof until
    00:04:30 UTC the next day: both name the date, in the same words."""
    now = utcnow().replace(hour=23, minute=55, second=0, microsecond=0)
    batch_id = _audited(engine, now)
    with db.read_scope(engine) as session:
        current = batch_progress(session, batch_id, now=now)
        report = batch_report(session, batch_id, now=now)
    until = now + WAIT
    said = f"wait for fal's webhook proof of their submit until {until:%Y-%m-%d} 00:04:30 UTC, then fail"
    assert current["proof_wait_note"] == report["proof_wait_note"], current["proof_wait_note"]
    assert report["proof_wait_note"].startswith(f"1 job(s) {said}"), report["proof_wait_note"]


def _status(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> str:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("WANBATCH_SUBMIT_UNKNOWN_POLICY", "resubmit")
    monkeypatch.delenv("WANBATCH_BROKER_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "400")
    get_settings.cache_clear()
    capsys.readouterr()
    try:
        assert run_main(["status", *args], monkeypatch) == 0
    finally:
        get_settings.cache_clear()
    return capsys.readouterr().out


def test_status_says_which_jobs_wait_for_proof_until_when_and_what_then(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    now = utcnow()
    batch_id = _audited(engine, now)
    until = listing.utc_clock(now + WAIT, now=now)  # its date too when it ends after midnight
    said = f"1 job(s) wait for fal's webhook proof of their submit until {until}, then are sent again"

    found = json.loads(_status(engine, monkeypatch, capsys, batch_id, "--json"))
    assert found["proof_waiting"] == 1
    assert found["proof_wait_note"].startswith(said), found["proof_wait_note"]
    assert "WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit" in found["proof_wait_note"]
    assert found["eta_seconds"] is not None
    assert found["eta_seconds"] >= WAIT.total_seconds() - 60

    text = " ".join(_status(engine, monkeypatch, capsys, batch_id).split())
    assert said in text, text
    left = re.search(r"~(\d+)m(\d\d)s left", text)
    assert left is not None, text
    assert int(left.group(1)) * 60 + int(left.group(2)) >= WAIT.total_seconds() - 60, text

    every = " ".join(_status(engine, monkeypatch, capsys).split())  # every batch: the note too
    assert said in every, every


def test_status_names_the_date_of_a_wait_that_ends_tomorrow(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``wanbatch status`` (text and ``--json``) of a job whose wait for proof ends at 00:30 UTC
    tomorrow: the date is named, not a bare "00:30:00 UTC" that reads as tonight's or tomorrow's."""
    now = utcnow()
    ends = (now + timedelta(days=1)).replace(hour=0, minute=30, second=0, microsecond=0)
    batch_id = _audited(engine, now, wait=ends - now)
    said = f"1 job(s) wait for fal's webhook proof of their submit until {ends:%Y-%m-%d} 00:30:00 UTC, then"

    found = json.loads(_status(engine, monkeypatch, capsys, batch_id, "--json"))
    assert found["proof_wait_note"].startswith(said), found["proof_wait_note"]
    text = " ".join(_status(engine, monkeypatch, capsys, batch_id).split())
    assert said in text, text
