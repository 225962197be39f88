"""A cancel tells the jobs it ends at once apart: never sent, sent before, outcome unknown.

Audit: ``wanbatch cancel NAME`` printed ``cancel: 1 job(s) cancelled at once (never sent)`` for
a job in ``retry_wait`` that had been sent (its first attempt had a request id; ``status --json``
said ``"sent": true``), and the dashboard's **Cancel batch** said "1 job(s) never sent are
cancelled": both counted every job fal holds no request of (``store.cancel_unsent_jobs``) as
never sent. They are counted apart now, as ``status`` counts them (``submitted_at``).
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

import cli
from cli import startup
from jobs import batches, db, store
from jobs.models import Job, utcnow
from jobs.settings import get_settings
from jobs.states import JobState
from tests.web.web_helpers import JSON, TOKEN, app_for, client, cookie_name, cookie_value, settings_for

S = JobState
T2V = "fal-ai/wan-22"
RID = "2c4e6a8b-0d1f-4a3b-8c5d-7e9f1a2b3c4d"


def _batch(engine: Engine, name: str, plan: list[tuple[JobState, bool]]) -> str:
    """A batch of one job per ``(state, sent before)`` of ``plan``; its id."""
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session, name=name, manifest_path=f"{name}.yaml", manifest_sha256="0" * 64, budget_max_usd=None
        )
        store.add_jobs(
            session,
            batch.id,
            [
                store.NewJob(
                    key=f"{i:064x}",
                    item_index=i,
                    endpoint=T2V,
                    input={"prompt": f"take {i}"},
                    est_billing_units=Decimal(1),
                    est_usd=Decimal(1),
                )
                for i in range(len(plan))
            ],
        )
        for job, (state, sent) in zip(store.jobs_of_batch(session, batch.id), plan, strict=True):
            values: dict[str, object] = {"state": state}
            if sent:  # its first attempt went to fal (and failed there, or its answer was lost)
                values |= {"attempts": 1, "submitted_at": utcnow()}
                if state != S.SUBMIT_UNKNOWN:
                    values |= {
                        "request_id": RID,
                        "error": "HTTP 503: runner busy",
                        "error_type": "runner_busy",
                    }
            session.execute(update(Job).where(Job.id == job.id).values(**values))
        return batch.id


MIXED = [
    (S.PENDING, False),
    (S.RETRY_WAIT, False),
    (S.RETRY_WAIT, True),
    (S.PENDING, True),
    (S.SUBMIT_UNKNOWN, True),
]


def test_the_store_counts_them_apart(engine: Engine, session: Session) -> None:
    batch_id = _batch(engine, "mixed", MIXED)
    cancelled = store.cancel_unsent(
        session, [batch_id], reason="batch cancelled", error="cancelled by user", error_type="cancelled"
    )
    session.commit()
    assert (cancelled.never_sent, cancelled.sent_before, cancelled.outcome_unknown) == (2, 2, 1)
    assert cancelled.total == 5
    assert store.counts_by_state(session, batch_id)[S.CANCELLED.value] == 5
    # And as ``status`` tells sent jobs from the others: the same split.
    groups = store.failure_reasons(session, batch_id)
    assert sorted((g.sent, g.count) for g in groups) == [(False, 2), (True, 3)]


def test_the_words() -> None:
    words = batches.cancelled_at_once
    assert words(store.UnsentCancelled(never_sent=5)) == "5 job(s) cancelled at once (never sent)"
    assert words(store.UnsentCancelled(sent_before=1)) == (
        "1 job(s) cancelled at once (1 sent before, waiting to be sent again, not at fal now)"
    )
    assert words(store.UnsentCancelled(never_sent=2, sent_before=2, outcome_unknown=1)) == (
        "5 job(s) cancelled at once (2 never sent; 2 sent before, waiting to be sent again, not at fal now; "
        "1 sent with the outcome unknown, which fal may have accepted and billed)"
    )


def _cancel(
    engine: Engine, ref: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    """``wanbatch cancel REF --json`` in process; its stderr."""
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.delenv("WANBATCH_BROKER_URL", raising=False)
    get_settings.cache_clear()
    monkeypatch.setattr(startup, "pause", lambda: None)
    monkeypatch.setattr(sys, "argv", ["wanbatch", "cancel", ref, "--json", "--no-progress"])
    try:
        with pytest.raises(SystemExit):
            cli.main()
    finally:
        get_settings.cache_clear()
    out, err = capsys.readouterr()
    assert json.loads(out)["phase"] == "cancelled"
    return err


def test_the_cli_does_not_call_a_job_sent_before_never_sent(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The audit's case: one job, in ``retry_wait`` after its first attempt was at fal."""
    _batch(engine, "resend-wait", [(S.RETRY_WAIT, True)])
    err = _cancel(engine, "resend-wait", monkeypatch, capsys)
    assert "never sent" not in err
    assert (
        "cancel: 1 job(s) cancelled at once (1 sent before, waiting to be sent again, not at fal now); "
        "0 at fal being cancelled there"
    ) in err


def test_the_cli_counts_each_kind(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _batch(engine, "mixed", MIXED)
    err = _cancel(engine, "mixed", monkeypatch, capsys)
    assert "cancel: 5 job(s) cancelled at once (2 never sent; 2 sent before" in err
    assert "1 sent with the outcome unknown, which fal may have accepted and billed)" in err


def test_jobs_never_sent_read_as_before(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _batch(engine, "fresh", [(S.PENDING, False), (S.RETRY_WAIT, False)])
    err = _cancel(engine, "fresh", monkeypatch, capsys)
    assert "cancel: 2 job(s) cancelled at once (never sent); 0 at fal being cancelled there" in err


def test_the_dashboard_counts_them_apart(engine: Engine, tmp_path: Path) -> None:
    batch_id = _batch(engine, "mixed", MIXED)
    app = app_for(engine, settings_for(engine, tmp_path, token=TOKEN))
    browser = client(app)
    browser.cookies.set(cookie_name(browser), cookie_value(browser))
    answer = browser.post(f"/batches/{batch_id}/cancel", headers={**JSON, "Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert "never sent are cancelled" not in body["message"]
    assert "5 job(s) cancelled at once (2 never sent; 2 sent before" in body["message"]
    assert {
        k: body[k] for k in ("cancelled_at_once", "never_sent", "sent_before", "outcome_unknown", "at_fal")
    } == {
        "cancelled_at_once": 5,
        "never_sent": 2,
        "sent_before": 2,
        "outcome_unknown": 1,
        "at_fal": 0,
    }
