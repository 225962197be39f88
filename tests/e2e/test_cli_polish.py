"""The CLI as a new user finds it (issue #14): one money rounding, budget warnings, paused batches,
an empty rerun, case-insensitive formats and readable Unicode folder names."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from falsim.server import SimulatorHandle
from jobs import db, estimates, store
from jobs.models import BatchState, Job, utcnow
from jobs.rerun import NothingToRerun, rerun_batch
from jobs.settings import get_settings
from jobs.states import JobState
from tests.e2e.e2e_helpers import TWO_JOBS, MakeManifest, Wb, counts, export_jsonl
from tests.in_process import run_main

FOUR_JOBS = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  num_frames: 81
  image_url: images/landscape.jpg
matrix:
  seed: [1, 2, 3, 4]
items:
  - prompt: Clouds drifting past the peak
"""


def _money_values(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every value under a key that names USD, anywhere in a JSON document."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            here = f"{path}.{key}"
            if "usd" in key and not isinstance(value, dict | list):
                yield here, value
            yield from _money_values(value, here)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _money_values(value, f"{path}[{i}]")


def _set_jobs(batch: str, **values: Any) -> None:
    engine = db.open_engine(get_settings())
    with db.session_scope(engine) as session:
        batch_id = store.get_batch(session, batch).id
        session.execute(update(Job).where(Job.batch_id == batch_id).values(**values))


def test_money_is_rounded_half_up_the_same_way_everywhere(wb: Wb, manifest: MakeManifest) -> None:
    path = manifest("money", FOUR_JOBS.format(name="money").replace("seed: [1, 2, 3, 4]", "seed: [1, 2, 3]"))
    submitted = wb("submit", path, "--json")
    assert submitted.code == 0, submitted.stderr
    _set_jobs("money", est_usd=Decimal("0.945"))  # 3 × 0.945 = 2.835: $2.84 half up, $2.83 as a float

    status = wb("status", "money")
    assert "estimated $2.84" in status.stdout
    assert "$2.83" not in status.stdout
    listing = wb("status").stdout
    assert "$2.84" in listing
    assert "$2.83" not in listing
    cost = wb("cost", "money").stdout
    total = next(line for line in cost.splitlines() if line.startswith("total"))
    assert "$2.84" in total

    # JSON money: one type (a number) everywhere, the exact amount once read back.
    documents = {
        "status": wb("status", "money", "--json").json(),
        "status (all)": wb("status", "--json").json(),
        "cost": wb("cost", "money", "--json").json(),
        "estimate": wb("estimate", path, "--json").json(),
        "submit": submitted.json(),
    }
    assert documents["status"]["estimated_usd"] == 2.835
    assert documents["cost"]["total"]["estimated_usd"] == 2.835
    assert Decimal(str(documents["cost"]["total"]["estimated_usd"])) == Decimal("2.835")
    for name, document in documents.items():
        found = list(_money_values(document))
        assert found, name
        for where, value in found:
            assert value is None or isinstance(value, int | float), f"{name}{where} = {value!r}"
            assert not isinstance(value, bool)


def test_validate_and_estimate_warn_about_the_budget(wb: Wb, manifest: MakeManifest) -> None:
    over = manifest("over", FOUR_JOBS.format(name="over") + "budget:\n  max_usd: 0.50\n")
    for command in ("validate", "estimate"):
        human = wb(command, over)
        assert human.code == 0, human.stderr
        assert "exceeds budget.max_usd $0.50" in human.stderr
        assert "about 2 of 4 job(s) will run" in human.stderr
    issues = wb("validate", over, "--json").json()["issues"]
    (warning,) = [i for i in issues if i["field"] == "budget.max_usd"]
    assert warning["severity"] == "warning"
    assert "the estimate $0.80 exceeds budget.max_usd $0.50" in warning["message"]
    estimate = wb("estimate", over, "--json").json()
    assert estimate["budget_max_usd"] == 0.5
    assert len(estimate["budget_warnings"]) == 1

    # A large batch (over estimates.LARGE_BATCH_JOBS) with no budget at all: warned.
    seeds = ", ".join(str(n) for n in range(1, estimates.LARGE_BATCH_JOBS + 2))
    large = manifest("large", FOUR_JOBS.format(name="large").replace("1, 2, 3, 4", seeds))
    warned = wb("estimate", large, "--json").json()
    assert warned["jobs"] == estimates.LARGE_BATCH_JOBS + 1
    (text,) = warned["budget_warnings"]
    assert f"{estimates.LARGE_BATCH_JOBS + 1} jobs" in text
    assert "no budget" in text
    assert "no budget" in wb("validate", large).stderr
    # At the threshold, or with a cap the estimate fits under: nothing to say.
    at = manifest("at", FOUR_JOBS.format(name="at").replace("1, 2, 3, 4", seeds.rsplit(",", 1)[0]))
    assert wb("estimate", at, "--json").json()["budget_warnings"] == []
    capped = manifest("capped", large.read_text() + "budget:\n  max_usd: 1000\n")
    assert wb("estimate", capped, "--json").json()["budget_warnings"] == []
    fits = manifest("fits", FOUR_JOBS.format(name="fits") + "budget:\n  max_usd: 5\n")
    assert "budget" not in wb("validate", fits).stderr


def test_validate_and_estimate_warn_about_the_daily_budget(
    wb: Wb, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An estimate over ``WANBATCH_DAILY_BUDGET_USD`` (or what is left of it today) was said
    only once ``run`` had cancelled the jobs; now ``validate`` and ``estimate`` warn, in run's
    words for that cap, and still exit 0 (a warning, as budget.max_usd's)."""
    over = manifest("daily", FOUR_JOBS.format(name="daily"))  # 4 jobs, $0.80
    monkeypatch.setenv("WANBATCH_DAILY_BUDGET_USD", "0.50")
    get_settings.cache_clear()
    whole = "the estimate $0.80 exceeds today's $0.50 cap (WANBATCH_DAILY_BUDGET_USD): only about 2 of 4"
    advice = "the rest end cancelled (daily budget); raise it, or wait for the next UTC day"
    for command in ("validate", "estimate"):
        human = wb(command, over)
        assert human.code == 0, human.stderr
        assert whole in human.stderr
        assert advice in human.stderr
    (warning,) = [i for i in wb("validate", over, "--json").json()["issues"] if "DAILY" in i["message"]]
    assert warning["severity"] == "warning"
    (text,) = wb("estimate", over, "--json").json()["budget_warnings"]
    assert whole in text
    # Today's spend is read only where a database is: none is made to read it.
    database = Path(os.environ["WANBATCH_DATABASE_URL"].removeprefix("sqlite:///"))
    assert not database.exists()

    # Under the cap: nothing to say, until other batches committed most of it today.
    monkeypatch.setenv("WANBATCH_DAILY_BUDGET_USD", "1.00")
    get_settings.cache_clear()
    assert "DAILY" not in wb("validate", over).stderr
    assert wb("submit", manifest("spent", FOUR_JOBS.format(name="spent"))).code == 0
    _set_jobs("spent", state=JobState.QUEUED, submitted_at=utcnow())  # at fal: $0.80 committed
    # Whose it is, as run's refusals say it: the cap counts every batch of the database.
    left = (
        "the estimate $0.80 exceeds the $0.20 left of today's $1.00 cap (WANBATCH_DAILY_BUDGET_USD; "
        "$0.80 committed today by other batches: spent): only about 1 of 4 job(s) will run today"
    )
    for command in ("validate", "estimate"):
        human = wb(command, over)
        assert human.code == 0, human.stderr
        assert left in " ".join(human.stderr.split())

    # The manifest's own batch, stored and partly at fal already, is not "other batches".
    assert wb("submit", over).code == 0
    _set_jobs("spent", state=JobState.QUEUED, submitted_at=utcnow(), est_usd=Decimal("0.10"))
    _set_jobs("daily", state=JobState.QUEUED, submitted_at=utcnow(), est_usd=Decimal("0.15"))
    mine = "nothing is left of today's $1.00 cap (WANBATCH_DAILY_BUDGET_USD; $1.00 committed today, "
    mine += "$0.40 of it by other batches: spent)"
    assert mine in " ".join(wb("estimate", over).stderr.split())


def test_status_shows_a_paused_batch_as_paused_and_no_eta_when_nothing_works_on_it(
    wb: Wb, manifest: MakeManifest
) -> None:
    assert wb("submit", manifest("night", FOUR_JOBS.format(name="night"))).code == 0
    engine = db.open_engine(get_settings())
    started = utcnow() - timedelta(seconds=60)
    with db.session_scope(engine) as session:
        batch_id = store.get_batch(session, "night").id
        jobs = list(store.jobs_of_batch(session, batch_id))
        done, running = [j.id for j in jobs[:2]], jobs[2].id
        session.execute(
            update(Job)
            .where(Job.id.in_(done))
            .values(state=JobState.SUCCEEDED, submitted_at=started, finished_at=utcnow())
        )

    # Half done, nothing in flight, no process working on it: no forecast, and what goes on.
    report = wb("status", "night", "--json").json()
    assert (report["finished"], report["in_flight"], report["eta_seconds"]) == (2, 0, None)
    assert (report["processing"], report["processed_at"]) == (False, None)
    human = wb("status", "night").stdout
    assert "nothing is processing it: `wanbatch run night`, or a worker, goes on" in " ".join(human.split())
    listed = wb("status").stdout.splitlines()  # the batch list says it too, under the table
    assert any(line.startswith(batch_id[:8]) and "nothing is processing it" in line for line in listed)

    # A job at fal, but the run that sent it was stopped five minutes ago (a closed SSH
    # session): still no forecast — nothing will collect it — and since when.
    with db.session_scope(engine) as session:
        session.execute(
            update(Job).where(Job.id == running).values(state=JobState.RUNNING, submitted_at=started)
        )
        store.record_heartbeat(session, "gone:1:", [batch_id], utcnow() - timedelta(minutes=5))
    report = wb("status", "night", "--json").json()
    assert (report["in_flight"], report["eta_seconds"], report["processing"]) == (1, None, False)
    assert report["processed_at"] is not None
    assert "nothing is processing it (last seen 5m ago)" in " ".join(wb("status", "night").stdout.split())

    # A process works on it (the distributed workers' leader: every batch): a forecast at the
    # pace so far, and no word about processing.
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "worker:2:", ["*"], utcnow())
    report = wb("status", "night", "--json").json()
    assert (report["in_flight"], report["processing"]) == (1, True)
    assert report["eta_seconds"] is not None
    assert report["eta_seconds"] > 0
    human = wb("status", "night").stdout
    assert "left" in human
    assert "nothing is processing" not in human
    assert "nothing is processing" not in wb("status").stdout

    # Paused by the user: shown as paused, no forecast though a job is still in flight.
    assert wb("pause", "night").code == 0
    report = wb("status", "night", "--json").json()
    assert (report["paused_by_user"], report["eta_seconds"]) == (True, None)
    human = wb("status", "night").stdout
    assert human.splitlines()[0].endswith("· paused")
    assert "no ETA: paused" in human
    assert "left" not in human
    assert "schedule: paused by user (`wanbatch resume night` goes on)" in human
    row = next(line for line in wb("status").stdout.splitlines() if line.startswith(batch_id[:8]))
    assert " paused " in row
    assert wb("resume", "night").code == 0

    # Paused because fal refused the account: paused, with the reason and what to do.
    reason = "fal refused the account (403): User is locked. Reason: Exhausted balance."
    with db.session_scope(engine) as session:
        store.set_batch_state(session, batch_id, BatchState.PAUSED, reason=reason)
    report = wb("status", "night", "--json").json()
    assert (report["state"], report["pause_reason"], report["eta_seconds"]) == ("paused", reason, None)
    assert (report["phase"], report["phase_reason"]) == ("paused", reason)
    human = wb("status", "night").stdout
    assert human.splitlines()[0].endswith("· paused")
    assert "paused: fal refused the account (403)" in human
    assert "`wanbatch run night` goes on" in human
    listing = wb("status").stdout
    assert f"{batch_id[:8]} paused: fal refused the account (403)" in listing


def test_rerun_failed_only_with_nothing_to_rerun_says_so_and_creates_nothing(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    run = wb("run", manifest("fine", TWO_JOBS.format(name="fine")), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    done = wb("status", "fine", "--json").json()  # what a script polling for the end reads
    assert (done["state"], done["phase"], done["phase_reason"]) == ("active", "done", None)
    url = get_settings().database_url
    before = counts(url)
    again = wb("rerun", "fine", "--failed-only", "--no-progress")
    assert again.code == 0, again.stderr
    said = " ".join(again.stdout.split())
    assert said.startswith("nothing to rerun: batch fine (")
    assert "has no failed or cancelled job (all 2 succeeded); no batch was created" in said
    as_json = wb("rerun", "fine", "--failed-only", "--json", "--no-progress")
    assert as_json.code == 0
    body = as_json.json()
    assert (body["ok"], body["batch"], body["total"]) == (True, None, 0)
    assert "nothing to rerun" in body["message"]
    assert counts(url) == before  # no empty batch
    with pytest.raises(NothingToRerun):
        rerun_batch("fine", failed_only=True, settings=get_settings())
    assert counts(url) == before


def test_format_is_case_insensitive_and_a_unicode_name_makes_a_readable_folder(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    name = "東京の夜景 night"
    run = wb("run", manifest("tokyo", TWO_JOBS.format(name=name)), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    folder = tmp_path / "outputs" / "東京の夜景-night"
    assert len(sorted(folder.glob("*.mp4"))) == 2
    records = export_jsonl(wb, name)
    assert all(str(r["video_path"]).startswith("東京の夜景-night/") for r in records)

    upper = wb("export", name, "--format", "JSONL")
    assert upper.code == 0, upper.stderr
    assert [json.loads(line)["job_id"] for line in upper.stdout.splitlines()] == [
        r["job_id"] for r in records
    ]
    csv = wb("export", name, "--format", "Csv")
    assert csv.code == 0, csv.stderr
    assert csv.stdout.startswith("job_id,")
    bad = wb("export", name, "--format", "xml")
    assert bad.code == 2


def test_rerun_with_nothing_to_rerun_needs_no_key_and_one_with_jobs_asks_before_storing(
    manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """After the quickstart's way (`run --simulate`, no FAL_KEY), `rerun BATCH --failed-only` of a
    batch with nothing failed answers "nothing to rerun" (exit 0), as its `--help` says: it sent
    nothing, so it needs no key. It said "FAL_KEY is not set" (exit 2) instead, and the answer
    was only to be had with `--simulate`. A rerun with jobs to send still asks for the key, and
    before anything is stored."""
    assert "FAL_KEY" not in os.environ  # e2e_env took it away
    path = manifest("keyless", TWO_JOBS.format(name="keyless"))
    assert run_main(["run", str(path), "--simulate", "--json", "--no-progress"], monkeypatch) == 0
    url = get_settings().database_url
    before = counts(url)
    capsys.readouterr()

    assert run_main(["rerun", "keyless", "--failed-only", "--no-progress"], monkeypatch) == 0
    printed = capsys.readouterr()
    said = " ".join(printed.out.split())
    assert said.startswith("nothing to rerun: batch keyless ("), printed.err
    assert "has no failed or cancelled job (all 2 succeeded); no batch was created" in said
    assert "FAL_KEY" not in printed.err

    assert run_main(["rerun", "keyless", "--failed-only", "--json", "--no-progress"], monkeypatch) == 0
    body = json.loads(capsys.readouterr().out)
    assert (body["ok"], body["batch"], body["total"]) == (True, None, 0)

    assert run_main(["rerun", "keyless", "--no-progress"], monkeypatch) == 2  # two jobs to send to fal
    refused = capsys.readouterr()
    assert "FAL_KEY is not set" in refused.err
    assert "rerun --simulate" in refused.err  # the way without a key
    assert counts(url) == before  # no keyless-rerun-1, not even an empty one
