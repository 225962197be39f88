"""Coming back to a moved or edited project: a missing input pauses, an edited manifest is said.

Audit (bundled simulator):

1. ``submit`` in ``projB``, ``mv projB projB-renamed``, ``run moved1``: every unsent job failed
   for good (``input_file``: "media files '/…/projB/images/…' do not exist"), exit 1, no hint;
   ``run projB-renamed/m.yaml`` then said the batch moved, but its jobs stayed failed with the old
   paths. Nothing had been sent or paid: now the batch pauses (exit 2) with one line naming the
   missing folder (or file) and the ways on, and the run from the new place sends every job from
   there. Jobs an older version failed that way are pending again once their manifest is
   submitted with their files.
2. ``run NAME`` of a batch whose manifest file was edited (a lowered ``max_usd``) spent under the
   stored cap without a word: it still uses the stored manifest, and now says so first.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import create_engine, text

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import EXAMPLES, db_rows
from tests.in_process import run_main

MANIFEST = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults: {{resolution: 480p}}
{budget}items:
  - {{prompt: a landscape, image_url: images/landscape.jpg, seed: 4}}
  - {{prompt: a night, image_url: images/night.jpg, seed: 5}}
"""
JUST_LANDSCAPE = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults: {{resolution: 480p}}
items:
  - {{prompt: a landscape, image_url: images/landscape.jpg, seed: 4}}
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The database the commands use: the e2e SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'wanbatch.db'}"
    make: Callable[[], str] = request.getfixturevalue("new_pg_database")
    made = make()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", made)
    return made.replace("postgresql://", "postgresql+psycopg://", 1)


def _project(work: Path, name: str, folder: str = "projB", budget: str = "") -> Path:
    """``work/FOLDER/m.yaml`` beside a copy of the example images; its path."""
    shutil.copytree(EXAMPLES / "images", work / folder / "images")
    path = work / folder / "m.yaml"
    path.write_text(MANIFEST.format(name=name, budget=budget), encoding="utf-8")
    return path


def _jobs(url: str, batch: str) -> list[tuple[str, str | None, str]]:
    """The batch's jobs in item order: state, error_type, the image path stored."""
    rows = db_rows(
        url,
        "SELECT j.state, j.error_type, j.input FROM jobs j JOIN batches b ON b.id = j.batch_id "
        f"WHERE b.name = '{batch}' ORDER BY j.item_index",
    )
    return [(state, kind, _input(given)["image_url"]) for state, kind, given in rows]


def _input(given: object) -> dict[str, str]:
    """A stored ``input``: JSON text (SQLite) or already a mapping (PostgreSQL's JSONB)."""
    if isinstance(given, str):
        found: dict[str, str] = json.loads(given)
        return found
    return dict(cast("dict[str, str]", given))


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_a_moved_project_pauses_and_runs_from_its_new_place(
    sim: SimulatorHandle,
    e2e_env: Path,
    url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _project(e2e_env, "moved1")
    assert run_main(["submit", "projB/m.yaml"], monkeypatch) == 0
    (e2e_env / "projB").rename(e2e_env / "projB-renamed")
    capsys.readouterr()

    assert run_main(["run", "moved1", "--no-progress", "--json"], monkeypatch) == 2
    out = capsys.readouterr()
    body = json.loads(out.out)
    assert (body["phase"], body["counts"].get("pending"), body["counts"].get("failed", 0)) == ("paused", 2, 0)
    gone = e2e_env / "projB"
    assert body["error"].startswith(
        f"batch moved1 is paused: input missing: the manifest's folder {gone} is gone"
    ), body["error"]
    assert "`wanbatch run NEW-FOLDER/m.yaml` gives the batch its new place" in body["error"]
    assert "`wanbatch run moved1` goes on" in body["error"]
    assert "FAL_KEY" not in body["error"]  # not fal's refusal of the key
    assert sim.ledger()["accepted"] == 0
    assert [(s, k) for s, k, _ in _jobs(url, "moved1")] == [("pending", None), ("pending", None)]

    # The human run says it on one line, and `status` shows the same reason.
    assert run_main(["run", "moved1", "--no-progress"], monkeypatch) == 2
    err = capsys.readouterr().err
    paused = [line for line in _lines(err) if "input missing" in line]
    assert len(paused) >= 1, err
    assert "fix it, then" not in err
    assert run_main(["status", "moved1"], monkeypatch) == 0
    assert f"paused: input missing: the manifest's folder {gone} is gone" in capsys.readouterr().out

    # Given its new place, the batch goes on from there.
    assert run_main(["run", "projB-renamed/m.yaml", "--no-progress"], monkeypatch) == 0
    capsys.readouterr()
    new = e2e_env / "projB-renamed" / "images"
    assert _jobs(url, "moved1") == [
        ("succeeded", None, str(new / "landscape.jpg")),
        ("succeeded", None, str(new / "night.jpg")),
    ]
    assert sim.ledger()["accepted"] == 2


def test_one_missing_file_pauses_the_batch_naming_it(
    sim: SimulatorHandle, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One file of many deleted (on purpose?): nothing is lost by waiting, so the batch pauses,
    naming that file; taking its item out of the manifest goes on without it."""
    path = _project(e2e_env, "onegone")
    assert run_main(["submit", "projB/m.yaml"], monkeypatch) == 0
    (e2e_env / "projB" / "images" / "night.jpg").unlink()
    capsys.readouterr()

    assert run_main(["run", "onegone", "--no-progress", "--json"], monkeypatch) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error.startswith(
        "batch onegone is paused: input missing: media file 'images/night.jpg' does not exist"
    ), error
    assert "take its item out of the manifest" in error
    url = f"sqlite:///{e2e_env.parent / 'wanbatch.db'}"
    states = dict((image.rsplit("/", 1)[1], (state, kind)) for state, kind, image in _jobs(url, "onegone"))
    assert states["night.jpg"] == ("pending", None)  # not failed: never sent, nothing paid

    path.write_text(JUST_LANDSCAPE.format(name="onegone"), encoding="utf-8")
    assert run_main(["run", "projB/m.yaml", "--no-progress"], monkeypatch) == 0
    states = dict((image.rsplit("/", 1)[1], (state, kind)) for state, kind, image in _jobs(url, "onegone"))
    assert states == {"landscape.jpg": ("succeeded", None), "night.jpg": ("cancelled", "not_in_manifest")}


def test_jobs_failed_for_a_missing_file_before_are_sent_from_the_new_place(
    sim: SimulatorHandle,
    e2e_env: Path,
    url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The older version failed them for good (``input_file``, never sent, billed 0): submitting
    the manifest from its new folder makes them pending again, and they are sent from there.
    ``status`` said how to go on meanwhile."""
    _project(e2e_env, "oldfail")
    assert run_main(["submit", "projB/m.yaml"], monkeypatch) == 0
    (e2e_env / "projB").rename(e2e_env / "projB-renamed")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:  # what fail_unsent left, as the older version ran it
            conn.execute(
                text(
                    "UPDATE jobs SET state = 'failed', error_type = 'input_file', actual_usd = 0, "
                    "actual_billing_units = 0, error = 'media file ''/x/projB/images/a.jpg'' does not exist'"
                )
            )
    finally:
        engine.dispose()
    capsys.readouterr()

    assert run_main(["status", "oldfail"], monkeypatch) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "sends them again" in shown, shown

    assert run_main(["run", "projB-renamed/m.yaml", "--no-progress"], monkeypatch) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "2 job(s) of batch oldfail that failed before being sent" in err, err
    assert [(s, k) for s, k, _ in _jobs(url, "oldfail")] == [("succeeded", None), ("succeeded", None)]
    assert sim.ledger()["accepted"] == 2


def test_run_name_says_the_manifest_was_edited_and_which_budget_it_uses(
    sim: SimulatorHandle, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _project(e2e_env, "capedit", budget="budget: {max_usd: 5}\n")
    assert run_main(["submit", "projB/m.yaml"], monkeypatch) == 0
    capsys.readouterr()
    path.write_text(MANIFEST.format(name="capedit", budget="budget: {max_usd: 0.40}\n"), encoding="utf-8")

    assert run_main(["run", "capedit", "--no-progress"], monkeypatch) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (
        f"{path} changed since batch capedit was submitted; this run uses the stored version "
        f"(budget $5.00); `wanbatch run {path}` applies the file"
    ) in err, err


def test_run_name_is_silent_when_the_manifest_is_unchanged_or_gone(
    sim: SimulatorHandle, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _project(e2e_env, "same")
    assert run_main(["submit", "projB/m.yaml"], monkeypatch) == 0
    capsys.readouterr()
    assert run_main(["run", "same", "--no-progress"], monkeypatch) == 0
    assert "changed since batch" not in capsys.readouterr().err
    path.unlink()
    assert run_main(["run", "same", "--no-progress"], monkeypatch) == 0
    assert "changed since batch" not in capsys.readouterr().err
