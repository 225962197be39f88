"""Jobs whose request was sent with another API key, or to another fal queue, wait for a process
that has them: this process asks nothing about them (their 404s and refusals are not final), so
they stay queued/running and its run never ends. ``status`` (text and ``--json``'s
``elsewhere_waiting``/``elsewhere_waiting_note``) and ``run``'s progress line
(:func:`jobs.batches.batch_progress`) now say so in one wording
(:func:`jobs.listing.elsewhere_wait_text`), naming the key by its id (a hash), never the key."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import Engine, update

from jobs import db
from jobs.batches import batch_progress
from jobs.models import Job
from jobs.settings import get_settings
from jobs.states import JobState
from tests.in_process import run_main
from tests.step_runtime import add_batch, job_ids, settings_for
from worker.here import process_here, queue_origin
from worker.limits import api_key_id

KEY = "test-key-elsewhere-mine-71c2"
OTHER_KEY = "test-key-elsewhere-other-0b9e"
QUEUE = "http://127.0.0.1:18788"
OTHER_QUEUE = "http://127.0.0.1:18789"


def _sent(engine: Engine, job_id: str, *, key: str, queue: str, state: JobState = JobState.QUEUED) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state=state,
                attempts=1,
                request_id=f"req-{job_id}",
                api_key_id=api_key_id(settings_for(queue, key)),
                fal_origin=queue_origin(queue),
            )
        )


def _batch(engine: Engine) -> str:
    """Five jobs: two sent with another key to this queue, one running at another queue, one
    sent with this key to this queue (followed here), one never sent."""
    batch_id = add_batch(engine, "elsewhere", [("fal-ai/wan-22", {"prompt": p}) for p in "abcde"])
    a, b, c, d, _e = job_ids(engine, batch_id)
    _sent(engine, a, key=OTHER_KEY, queue=QUEUE)
    _sent(engine, b, key=OTHER_KEY, queue=QUEUE, state=JobState.RUNNING)
    _sent(engine, c, key=KEY, queue=OTHER_QUEUE, state=JobState.RUNNING)
    _sent(engine, d, key=KEY, queue=QUEUE)
    return batch_id


def _status(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> str:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("FAL_KEY", KEY)
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", QUEUE)
    monkeypatch.delenv("WANBATCH_BROKER_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "400")
    get_settings.cache_clear()
    capsys.readouterr()
    try:
        assert run_main(["status", *args], monkeypatch) == 0
    finally:
        get_settings.cache_clear()
    return capsys.readouterr().out


def test_status_says_which_requests_wait_for_another_key_or_queue(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    batch_id = _batch(engine)
    other_id = api_key_id(settings_for(QUEUE, OTHER_KEY))
    origin = queue_origin(OTHER_QUEUE)
    key_note = (
        f"2 request(s) were sent with another API key (key id {other_id}) "
        "and wait for a process with that key"  # fal refused none to this key: no way to write off
    )
    queue_note = (
        f"1 request(s) were sent to another fal queue ({origin}) and wait for the process that follows it"
    )

    found = json.loads(_status(engine, monkeypatch, capsys, batch_id, "--json"))
    assert found["elsewhere_waiting"] == [
        {"reason": "api_key", "key_id": other_id, "jobs": 2, "refused": 0},
        {"reason": "fal_queue", "origin": origin, "jobs": 1},
    ]
    assert found["elsewhere_waiting_note"] == f"{key_note}; {queue_note}"

    text = " ".join(_status(engine, monkeypatch, capsys, batch_id).split())
    assert key_note in text
    assert queue_note in text
    every = " ".join(_status(engine, monkeypatch, capsys).split())  # every batch: the note too
    assert key_note in every
    assert queue_note in every
    for shown in (text, every, json.dumps(found)):
        assert OTHER_KEY not in shown  # the key itself is never shown
        assert KEY not in shown

    # run's progress line says the same words, with this run's key and queue
    with db.read_scope(engine) as session:
        here = process_here(settings_for(QUEUE, KEY))
        current = batch_progress(session, batch_id, here=here)
    assert current["elsewhere_waiting_note"] == found["elsewhere_waiting_note"]


def test_nothing_is_said_when_every_request_is_this_process_s(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    batch_id = add_batch(engine, "mine", [("fal-ai/wan-22", {"prompt": p}) for p in "ab"])
    a, _b = job_ids(engine, batch_id)
    _sent(engine, a, key=KEY, queue=QUEUE)
    found = json.loads(_status(engine, monkeypatch, capsys, batch_id, "--json"))
    assert found["elsewhere_waiting"] == []
    assert found["elsewhere_waiting_note"] == ""
    assert "another API key" not in _status(engine, monkeypatch, capsys, batch_id)


def test_a_status_without_fal_key_names_no_other_key(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``status`` needs no FAL_KEY (an operator's shell, the dashboard's host): without one it
    cannot tell whose key a request went with, so no request is said to wait for another key
    (every one would have been); another queue is still named."""
    batch_id = _batch(engine)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.delenv("FAL_KEY", raising=False)
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", QUEUE)
    monkeypatch.delenv("WANBATCH_BROKER_URL", raising=False)
    get_settings.cache_clear()
    capsys.readouterr()
    try:
        assert run_main(["status", batch_id, "--json"], monkeypatch) == 0
    finally:
        get_settings.cache_clear()
    found = json.loads(capsys.readouterr().out)
    assert found["elsewhere_waiting"] == [
        {"reason": "fal_queue", "origin": queue_origin(OTHER_QUEUE), "jobs": 1}
    ]
