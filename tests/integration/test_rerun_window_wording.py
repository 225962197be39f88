"""What ``status`` and ``run`` say of a batch whose schedule holds it back, in the one wording.

Two gaps:

* ``status BATCH`` said of the failed jobs an unfinished rerun repeats "`wanbatch run
  night-rerun-1` goes on", while that rerun (which keeps its parent's daily window) waited for
  the window to open and nothing of it was sent for hours. It now says that it waits, and until
  when, in the words the batch's own ``schedule:`` line uses ("opens 22:00 Europe/Berlin, in
  23h57m"); ``--json`` gives it as the rerun's ``waits``.
* ``run`` of a batch its user paused was refused with "nothing of it is sent until `wanbatch
  resume`", while ``status`` said its window was closed too: resuming sent nothing either. The
  refusal now says the window, as ``status`` does.

SQLite and PostgreSQL; the real CLI in process (``run_main``), one frozen ``now``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update

from jobs import batches, db, store
from jobs.models import Batch, Job
from jobs.schedule import Schedule
from jobs.settings import get_settings
from jobs.states import JobState
from tests.in_process import run_main
from tests.step_runtime import add_batch, job_ids

T2V = "fal-ai/wan-22"


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """One ``now`` for the commands (a whole minute, so the window's times are exact)."""
    now = datetime.fromisoformat("2031-03-04T09:30:00+00:00")
    monkeypatch.setattr(batches, "utcnow", lambda: now)
    return now


@pytest.fixture
def cli_env(engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)  # `run night`: no file of that name here, so the stored batch
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("FAL_KEY", "rerun-window-test-key")
    monkeypatch.setenv("COLUMNS", "400")  # one line per sentence
    monkeypatch.delenv("WANBATCH_BROKER_URL", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _closed_window(now: datetime) -> Schedule:
    """A daily window that opens two hours after ``now``, in UTC."""
    opens = (now + timedelta(hours=2)).time()
    return Schedule(window=(opens, time((opens.hour + 3) % 24, opens.minute)), timezone="UTC")


def _change(engine: Engine, model: Any, ids: list[str], **values: Any) -> None:
    with db.session_scope(engine) as session:
        session.execute(update(model).where(model.id.in_(ids)).values(**values))


def _run(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    capsys.readouterr()
    code = run_main(args, monkeypatch)
    got = capsys.readouterr()
    return code, " ".join((got.out + got.err).split())


def test_status_says_a_rerun_waiting_for_its_window_waits(
    engine: Engine,
    frozen: datetime,
    cli_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inputs = [(T2V, {"prompt": f"night {i}", "seed": i}) for i in range(3)]
    night = add_batch(engine, "night", inputs)
    failed = job_ids(engine, night)
    _change(engine, Job, failed, state=JobState.FAILED, error="boom", error_type="model", finished_at=frozen)
    rerun = add_batch(engine, "night-rerun-1", inputs)  # its jobs pending: the rerun is unfinished
    _change(engine, Batch, [rerun], parent_batch_id=night)
    for repeat, of in zip(job_ids(engine, rerun), failed, strict=True):
        _change(engine, Job, [repeat], rerun_of=of)
    window = _closed_window(frozen)
    with db.session_scope(engine) as session:
        store.set_batch_schedule(session, rerun, window, "normal")  # kept from its parent: closed now
    opens = f"opens {frozen + timedelta(hours=2):%H:%M} UTC, in 2h"

    code, said = _run(["status", "night"], monkeypatch, capsys)

    assert code == 0, said
    assert (
        f"3 job(s) are being rerun in night-rerun-1: it waits for its window ({opens}); "
        "then `wanbatch run night-rerun-1` sends them"
    ) in said
    assert "`wanbatch run night-rerun-1` goes on" not in said
    # The rerun's own line says its window in the same words.
    _, own = _run(["status", "night-rerun-1"], monkeypatch, capsys)
    assert f"schedule: waiting for window ({opens})" in own
    # --json: the rerun with until when it waits.
    capsys.readouterr()
    assert run_main(["status", "night", "--json"], monkeypatch) == 0
    (pending,) = json.loads(capsys.readouterr().out)["rerun_pending"]["reruns"]
    assert pending["waits"] == f"waits for its window ({opens})"
    assert pending["command"] == "`wanbatch run night-rerun-1`"

    # Once its window is open, it goes on as ever.
    with db.session_scope(engine) as session:
        store.set_batch_schedule(session, rerun, None, "normal")
    code, said = _run(["status", "night"], monkeypatch, capsys)
    assert "3 job(s) are being rerun in night-rerun-1: `wanbatch run night-rerun-1` goes on" in said


def test_run_of_a_paused_batch_whose_window_is_closed_says_so(
    engine: Engine,
    frozen: datetime,
    cli_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    night = add_batch(engine, "night", [(T2V, {"prompt": f"night {i}", "seed": i}) for i in range(2)])
    window = _closed_window(frozen)
    with db.session_scope(engine) as session:
        store.set_batch_schedule(session, night, window, "normal")
        store.set_paused_by_user(session, night, True)
    closed = f"its window is closed (opens {frozen + timedelta(hours=2):%H:%M} UTC, in 2h)"
    _, status = _run(["status", "night"], monkeypatch, capsys)
    assert f"schedule: paused by user; {closed}: `wanbatch resume night` goes on once it opens" in status

    code, said = _run(["run", "night", "--no-progress"], monkeypatch, capsys)

    assert code == 2, said
    assert said == (
        f"error: batch night is paused (`wanbatch pause`); {closed}: nothing of it is sent until "
        "`wanbatch resume night` and its schedule opens; then run this command again to go on"
    )
    # Without a schedule, as ever.
    with db.session_scope(engine) as session:
        store.set_batch_schedule(session, night, None, "normal")
    code, said = _run(["run", "night", "--no-progress"], monkeypatch, capsys)
    assert code == 2, said
    assert re.fullmatch(
        r"error: batch night is paused \(`wanbatch pause`\): nothing of it is sent until "
        r"`wanbatch resume night`; then run this command again to go on",
        said,
    ), said
