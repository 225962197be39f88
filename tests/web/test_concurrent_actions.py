"""Concurrent calls of one action on one batch answer as the same calls one after the other.

Six scripts (or six clicks) cancelling or pausing the same batch at once on PostgreSQL: exactly
one changes it; the others get what a second call gets in turn (409 "already cancelled", or
``changed: false``). The race is made certain, not left to timing: every call reads the batch
(:func:`jobs.store.get_batch`) before any of them goes on, as the audit's six ``curl``s
sometimes did, so a check-then-act without the batch's row lock lets all six through.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from jobs import store
from jobs.db import session_factory
from jobs.models import BatchState
from tests.web.web_helpers import JSON, TOKEN, app_for, client, mixed_batch, settings_for

BEARER = {"Authorization": f"Bearer {TOKEN}"}
CALLS = 6
#: Only a guard against a hang: every call reaches the barrier long before it.
BARRIER_WAIT_S = 60


def _all_read_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call's first read of the batch waits until every call has read it: none of them has
    changed it yet when any of them decides what to do."""
    start = threading.Barrier(CALLS)
    seen = threading.local()
    read = store.get_batch

    def get_batch(session: Session, ref: str) -> Any:
        found = read(session, ref)
        if not getattr(seen, "read", False):
            seen.read = True
            start.wait(BARRIER_WAIT_S)
        return found

    # Where get_batch is looked up: the package (callers outside the store) and the store's parts
    # that call it themselves (lock_batch, which the changes read first; the simulated results).
    for where in (store, store.batches, store.reading):
        monkeypatch.setattr(where, "get_batch", get_batch)


def _at_once(engine: Engine, output_dir: Path, path: str) -> list[Any]:
    """The answers of :data:`CALLS` clients posting ``path`` at once."""
    app = app_for(engine, settings_for(engine, output_dir, token=TOKEN))

    def call(_: int) -> Any:
        return client(app).post(path, headers={**BEARER, **JSON})

    with ThreadPoolExecutor(CALLS) as pool:
        return list(pool.map(call, range(CALLS)))


def _batch(engine: Engine, batch_id: str) -> tuple[str, bool]:
    """The batch's state and pause as stored (read without the barrier)."""
    with session_factory(engine)() as session:
        batch = store.get_batch(session, batch_id)
        return BatchState(batch.state).value, batch.paused_by_user


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_concurrent_cancels_cancel_once_and_the_others_are_told_it_is_cancelled(
    engine: Engine, session: Session, output_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_id = mixed_batch(session, items=10).batch.id
    session.commit()
    _all_read_first(monkeypatch)
    answers = _at_once(engine, output_dir, f"/batches/{batch_id}/cancel")
    monkeypatch.undo()
    done = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code != 200]
    assert len(done) == 1, [a.text for a in answers]
    assert done[0].json()["cancelled_at_once"] > 0
    assert [a.status_code for a in refused] == [409] * (CALLS - 1), [a.text for a in refused]
    for answer in refused:
        assert answer.json()["ok"] is False
        assert "is already cancelled" in answer.json()["error"]
    assert _batch(engine, batch_id)[0] == "cancelled"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("action", ["pause", "resume"])
def test_concurrent_pauses_or_resumes_change_the_batch_once(
    action: str, engine: Engine, session: Session, output_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_id = mixed_batch(session, items=10).batch.id
    if action == "resume":
        store.set_paused_by_user(session, batch_id, True)
    session.commit()
    _all_read_first(monkeypatch)
    answers = _at_once(engine, output_dir, f"/batches/{batch_id}/{action}")
    monkeypatch.undo()
    assert [a.status_code for a in answers] == [200] * CALLS, [a.text for a in answers]
    assert sum(a.json()["changed"] for a in answers) == 1, [a.json()["message"] for a in answers]
    for answer in answers:
        assert answer.json()["paused_by_user"] is (action == "pause")
    assert _batch(engine, batch_id) == ("active", action == "pause")
