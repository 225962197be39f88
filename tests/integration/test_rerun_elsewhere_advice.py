"""``status PARENT`` names the machine an unfinished rerun was made on, when it is another one.

On a database several machines share, ``status clip`` on Bob's laptop advised "3 job(s) are
being rerun in clip-rerun-1: `wanbatch run clip-rerun-1` goes on" of a rerun Alice made on hers,
without a word of where: the advice reads as "run it here". It now names the machine the rerun's
manifest is on, as the "belongs to alice-laptop:… (another machine)" refusal does; on that
machine nothing more is said. ``--json`` gives the machine as the rerun's ``machine``.

SQLite and PostgreSQL; the real CLI in process (``run_main``); two machines played by
:data:`jobs.machine.TEST_MACHINE_ENV`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update

from jobs import db
from jobs.machine import TEST_MACHINE_ENV
from jobs.models import Batch, Job
from jobs.settings import get_settings
from jobs.states import JobState
from tests.in_process import run_main
from tests.step_runtime import add_batch, job_ids

T2V = "fal-ai/wan-22"
ALICE = "alice-laptop@" + "a1" * 16
BOB = "bob-laptop@" + "b2" * 16


@pytest.fixture
def cli_env(engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("FAL_KEY", "rerun-elsewhere-test-key")
    monkeypatch.setenv("COLUMNS", "400")  # one line per sentence
    monkeypatch.delenv("WANBATCH_BROKER_URL", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _change(engine: Engine, model: Any, ids: list[str], **values: Any) -> None:
    with db.session_scope(engine) as session:
        session.execute(update(model).where(model.id.in_(ids)).values(**values))


def _status(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert run_main(["status", *args], monkeypatch) == 0
    return " ".join(capsys.readouterr().out.split())


def test_status_names_the_machine_an_unfinished_rerun_was_made_on(
    engine: Engine, cli_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = [(T2V, {"prompt": f"clip {i}", "seed": i}) for i in range(3)]
    clip = add_batch(engine, "clip", inputs)
    failed = job_ids(engine, clip)
    _change(engine, Job, failed, state=JobState.FAILED, error="boom", error_type="model")
    rerun = add_batch(engine, "clip-rerun-1", inputs)  # its jobs pending: the rerun is unfinished
    _change(engine, Batch, [clip], manifest_host=BOB)  # a project both share: Bob submitted it
    _change(engine, Batch, [rerun], parent_batch_id=clip, manifest_host=ALICE)  # Alice made the rerun
    for repeat, of in zip(job_ids(engine, rerun), failed, strict=True):
        _change(engine, Job, [repeat], rerun_of=of)

    monkeypatch.setenv(TEST_MACHINE_ENV, BOB)
    said = _status(["clip"], monkeypatch, capsys)
    assert (
        "3 job(s) are being rerun in clip-rerun-1: `wanbatch run clip-rerun-1` on alice-laptop "
        "(another machine) goes on"
    ) in said
    (pending,) = json.loads(_status(["clip", "--json"], monkeypatch, capsys))["rerun_pending"]["reruns"]
    assert pending["command"] == "`wanbatch run clip-rerun-1`"  # the command alone, as before
    assert pending["machine"] == "alice-laptop"

    # On Alice's machine, where it is run, nothing more is said.
    monkeypatch.setenv(TEST_MACHINE_ENV, ALICE)
    said = _status(["clip"], monkeypatch, capsys)
    assert "3 job(s) are being rerun in clip-rerun-1: `wanbatch run clip-rerun-1` goes on" in said
    assert "another machine" not in said.partition("being rerun")[2]
    (pending,) = json.loads(_status(["clip", "--json"], monkeypatch, capsys))["rerun_pending"]["reruns"]
    assert pending["machine"] == ""
