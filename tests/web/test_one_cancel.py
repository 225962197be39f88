"""``wanbatch cancel`` and the dashboard's **Cancel batch** are one operation
(:func:`jobs.batches.cancel_batch`): the same batch cancelled either way ends the same.

Audit: they were two copies. A batch whose cancel had been recorded but not finished (a
``wanbatch cancel`` stopped between recording the batch cancelled and ending its unsent jobs,
which it did in two transactions) was finished by the CLI — its pending, ``retry_wait`` and
``submit_unknown`` jobs ended ``cancelled`` — while the dashboard answered 409 "already
cancelled" and left them waiting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from jobs import batches, store
from jobs.db import session_factory
from jobs.errors import ConfigError, UsageError
from jobs.models import BatchState, utcnow
from jobs.settings import Settings, get_settings
from jobs.states import JobState
from tests.in_process import run_main
from tests.web.web_helpers import (
    JSON,
    TOKEN,
    app_for,
    client,
    logged_in,
    make_batch,
    new_job,
    set_job,
    settings_for,
)

S = JobState
ORIGIN = "http://127.0.0.1:8788"

#: One job per entry: its state, and whether a request of it went to fal before.
PLAN: list[tuple[JobState, bool]] = [
    (S.PENDING, False),
    (S.PENDING, True),
    (S.RETRY_WAIT, False),
    (S.RETRY_WAIT, True),
    (S.SUBMIT_UNKNOWN, True),
    (S.SUCCEEDED, True),
    (S.FAILED, True),
]


def _batch(session: Session, name: str, *, cancel_recorded: bool) -> str:
    """A batch of :data:`PLAN`; ``cancel_recorded``: already marked cancelled, its jobs not yet
    ended (what a cancel stopped half-way left)."""
    batch = make_batch(session, name, [new_job(i, endpoint="fal-ai/wan-22") for i in range(len(PLAN))])
    for job, (state, sent) in zip(store.jobs_of_batch(session, batch.id), PLAN, strict=True):
        values: dict[str, Any] = {"state": state}
        if sent:
            values |= {"attempts": 1, "submitted_at": utcnow()}
        set_job(session, job.id, **values)
    if cancel_recorded:
        store.set_batch_state(session, batch.id, BatchState.CANCELLED, reason="cancelled by user")
    session.commit()
    return batch.id


def _outcome(engine: Engine, batch_id: str) -> tuple[str, str | None, dict[str, int], list[tuple[Any, ...]]]:
    """The batch's state and reason, its counts, and each job's state and error, in item order."""
    with session_factory(engine)() as session:
        batch = store.get_batch(session, batch_id)
        jobs = sorted(store.jobs_of_batch(session, batch_id), key=lambda j: j.item_index)
        return (
            BatchState(batch.state).value,
            batch.pause_reason,
            store.counts_by_state(session, batch_id),
            [(j.state, j.error, j.error_type, j.actual_usd) for j in jobs],
        )


def _by_cli(
    engine: Engine,
    name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    said: list[str],
) -> int:
    """``wanbatch cancel NAME --json`` in process; its exit code (its stderr added to ``said``)."""
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.delenv("WANBATCH_BROKER_URL", raising=False)
    monkeypatch.delenv("FAL_KEY", raising=False)
    get_settings.cache_clear()
    try:
        code = run_main(["cancel", name, "--json", "--no-progress"], monkeypatch)
    finally:
        get_settings.cache_clear()
    out, err = capsys.readouterr()
    assert json.loads(out)["phase"] == "cancelled", out
    said.append(err)
    return code


def _by_dashboard(engine: Engine, batch_id: str, output_dir: Path) -> Any:
    browser = logged_in(client(app_for(engine, settings_for(engine, output_dir, token=TOKEN))))
    return browser.post(f"/batches/{batch_id}/cancel", headers={**JSON, "Origin": ORIGIN})


@pytest.mark.parametrize("cancel_recorded", [False, True], ids=["active", "cancel-left-half-done"])
def test_the_cli_and_the_dashboard_end_a_batch_the_same(
    engine: Engine,
    session: Session,
    output_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cancel_recorded: bool,
) -> None:
    by_cli = _batch(session, "by-cli", cancel_recorded=cancel_recorded)
    by_dashboard = _batch(session, "by-dashboard", cancel_recorded=cancel_recorded)

    said: list[str] = []
    assert _by_cli(engine, "by-cli", monkeypatch, capsys, said) == 1  # jobs ended cancelled
    answer = _by_dashboard(engine, by_dashboard, output_dir)

    assert answer.status_code == 200, answer.text
    assert _outcome(engine, by_dashboard) == _outcome(engine, by_cli)
    state, reason, counts, _ = _outcome(engine, by_cli)
    assert (state, reason) == ("cancelled", "cancelled by user")
    assert {k: v for k, v in counts.items() if v} == {"cancelled": 5, "succeeded": 1, "failed": 1}
    body = answer.json()
    assert (body["never_sent"], body["sent_before"], body["outcome_unknown"], body["at_fal"]) == (2, 2, 1, 0)
    assert body["already_cancelled"] is cancel_recorded
    assert "5 job(s) cancelled at once (2 never sent; 2 sent before" in said[0]
    if cancel_recorded:
        assert "was already cancelled" in body["message"]
        assert "already cancelled: this finishes that cancel" in said[0]
    # Once done, a cancel again changes nothing, either way: the dashboard says so with a 409.
    again = _by_dashboard(engine, by_dashboard, output_dir)
    assert again.status_code == 409
    assert "is already cancelled" in again.json()["error"]
    assert _by_cli(engine, "by-cli", monkeypatch, capsys, said) == 1
    assert "nothing to cancel: batch by-cli" in said[1]
    assert "was already cancelled" in said[1]
    assert _outcome(engine, by_cli)[2] == counts


def test_a_batch_still_being_cancelled_at_fal_is_already_cancelled_with_who_finishes_it(
    engine: Engine, session: Session, output_dir: Path
) -> None:
    batch_id = _batch(session, "at-fal", cancel_recorded=True)
    job = next(iter(store.jobs_of_batch(session, batch_id)))
    set_job(session, job.id, state=S.QUEUED, request_id="r-1", submitted_at=utcnow())
    store.cancel_unsent(session, [batch_id], reason="batch cancelled", error="e", error_type="cancelled")
    session.commit()
    answer = _by_dashboard(engine, batch_id, output_dir)
    assert answer.status_code == 409
    assert answer.json()["error"] == (
        f"batch at-fal ({batch_id[:12]}) is already cancelled; 1 job(s) fal holds are still being "
        "cancelled there by the `wanbatch run` processing it, or by `wanbatch cancel at-fal`"
    )


def test_the_use_case_refuses_before_it_changes_anything(
    engine: Engine, session: Session, output_dir: Path
) -> None:
    """Processed here (the CLI) with a request at fal and no key: refused, the batch untouched;
    recorded only (the dashboard): done, the request left to whatever processes the batch."""
    batch_id = _batch(session, "keyless", cancel_recorded=False)
    job = next(iter(store.jobs_of_batch(session, batch_id)))
    set_job(session, job.id, state=S.QUEUED, request_id="r-1", submitted_at=utcnow())
    session.commit()
    settings = Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        output_dir=output_dir,
        FAL_KEY=SecretStr(""),
    )
    before = _outcome(engine, batch_id)
    with pytest.raises(ConfigError, match="FAL_KEY is not set"):
        batches.cancel_batch(batch_id, settings, by="cli", simulate=False)
    with pytest.raises(UsageError, match="is sent to fal"):
        batches.cancel_batch(batch_id, settings, by="cli", simulate=True)
    assert _outcome(engine, batch_id) == before
    done = batches.cancel_batch(batch_id, settings, by="dashboard")
    assert (done.already_cancelled, done.at_once.total, done.at_fal) == (False, 4, 1)
    assert _outcome(engine, batch_id)[0] == "cancelled"
