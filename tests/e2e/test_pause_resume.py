"""`wanbatch pause BATCH` / `wanbatch resume BATCH` and the schedule state `status` shows (issue #12).

Embedded SQLite mode, the real click group in process. Pause is a flag beside the batch's state:
it never hides or clears a pause fal's refusal of the account caused, and pausing what cannot
send any more (a cancelled or finished batch) is a usage error (exit 2) in one line.
"""

from __future__ import annotations

import re
import shlex
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from falsim.server import SimulatorHandle
from jobs import db, store
from jobs.models import utcnow
from jobs.schedule import Schedule
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import MakeManifest, Wb

TWO_JOBS = """\
name: night
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  num_frames: 81
matrix:
  seed: [1, 2]
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
{extra}"""

SCHEDULED = """\
priority: low
schedule:
  not_before: 2099-12-01T22:00:00+01:00
  deadline: 2099-12-02T06:00:00+01:00
  window: "22:00-06:00"
  timezone: Europe/Berlin
"""


def _submitted(wb: Wb, path: Path) -> str:
    run = wb("submit", path, "--json")
    assert run.code == 0, run.stderr
    batch: str = run.json()["batch"]
    return batch


def _execute(sql: str) -> None:
    """A change behind wanbatch's back (what a worker would record), on the test's database."""
    engine = create_engine(get_settings().database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def test_pause_and_resume_by_name_and_id_prefix(wb: Wb, manifest: MakeManifest) -> None:
    batch = _submitted(wb, manifest("night", TWO_JOBS.format(extra="")))

    paused = wb("pause", "night")
    assert paused.code == 0, paused.stderr
    assert paused.stdout.startswith("paused batch night")
    assert len(paused.stdout.strip().splitlines()) == 1
    report = wb("status", "night", "--json").json()
    assert (report["paused_by_user"], report["schedule_state"], report["state"]) == (
        True,
        "paused by user",
        "active",
    )
    assert (report["phase"], report["phase_reason"]) == ("paused", "by its user")
    assert "schedule: paused by user" in wb("status", "night").stdout

    again = wb("pause", batch[:8], "--json")
    assert again.code == 0, again.stderr
    body = again.json()
    assert (body["batch"], body["paused_by_user"], body["changed"]) == (batch, True, False)
    assert (body["waiting"], body["in_flight"]) == (2, 0)
    assert "already paused" in body["message"]

    resumed = wb("resume", batch, "--json")
    assert resumed.code == 0, resumed.stderr
    assert (resumed.json()["paused_by_user"], resumed.json()["changed"]) == (False, True)
    # Nothing runs: the line names what sends the jobs (it said they "will be sent").
    message = resumed.json()["message"]
    assert message.startswith("resumed batch night (")
    assert message.endswith(
        "2 waiting job(s) may be sent again; `wanbatch run night` (or the workers, with a broker) sends them"
    )
    report = wb("status", "night", "--json").json()
    assert (report["paused_by_user"], report["schedule_state"]) == (False, "")
    assert (report["phase"], report["phase_reason"]) == ("active", None)
    assert "schedule:" not in wb("status", "night").stdout

    noop = wb("resume", "night")
    assert noop.code == 0, noop.stderr
    assert "nothing changed" in noop.stdout


def test_unknown_batch_is_a_usage_error(wb: Wb) -> None:
    for command in ("pause", "resume"):
        run = wb(command, "no-such-batch", "--json")
        assert run.code == 2
        assert run.json()["ok"] is False
        assert "no batch 'no-such-batch'" in run.json()["error"]


def test_a_cancelled_batch_cannot_be_paused_or_resumed(wb: Wb, manifest: MakeManifest) -> None:
    _submitted(wb, manifest("night", TWO_JOBS.format(extra="")))
    assert wb("cancel", "night", "--json").code == 1  # every job cancelled
    for command in ("pause", "resume"):
        run = wb(command, "night")
        assert run.code == 2
        assert run.stdout == ""
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1, run.stderr
        assert "is cancelled" in lines[0]
        assert "Traceback" not in run.stderr
    assert wb("status", "night", "--json").json()["paused_by_user"] is False


def test_a_finished_batch_cannot_be_paused(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest) -> None:
    path = manifest("night", TWO_JOBS.format(extra=""))
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 0, run.stderr
    assert run.json()["counts"]["succeeded"] == 2
    paused = wb("pause", "night", "--json")
    assert paused.code == 2
    assert "is finished (all 2 jobs are done)" in paused.json()["error"]


def test_a_batch_that_finished_while_paused_reads_as_done(wb: Wb, manifest: MakeManifest) -> None:
    """Paused while every job was at fal, the batch then finished: `status` said "schedule: paused
    by user (`wanbatch resume night` goes on)" under a heading that said done."""
    _submitted(wb, manifest("night", TWO_JOBS.format(extra="")))
    assert wb("pause", "night").code == 0
    _execute("UPDATE jobs SET state = 'succeeded'")  # what the run collecting them recorded
    human = wb("status", "night")
    assert human.code == 0, human.stderr
    assert human.stdout.splitlines()[0].endswith("· done")
    assert "paused by user" not in human.stdout
    assert "goes on" not in human.stdout
    report = wb("status", "night", "--json").json()
    assert (report["phase"], report["phase_reason"], report["schedule_state"]) == ("done", None, "")
    assert report["paused_by_user"] is True  # the flag is still set: `resume` clears it


def test_a_batch_paused_past_its_deadline_says_the_deadline_passed(wb: Wb, manifest: MakeManifest) -> None:
    """The morning status of a batch paused overnight said "schedule: paused by user (`wanbatch
    resume night` goes on)" and nothing of the deadline: resuming sends nothing, and its unsent
    jobs end cancelled."""
    batch = _submitted(wb, manifest("night", TWO_JOBS.format(extra=SCHEDULED)))
    assert wb("pause", "night").code == 0
    engine = db.open_engine(get_settings())
    with db.session_scope(engine) as session:  # the night is over
        past = Schedule(deadline=utcnow() - timedelta(hours=1))
        store.set_batch_schedule(session, batch, past, "low")
    human = wb("status", "night")
    assert human.code == 0, human.stderr
    text = " ".join(human.stdout.split())
    assert human.stdout.splitlines()[0].endswith("· deadline")
    assert "`wanbatch resume night` goes on" not in text
    assert (
        "schedule: past deadline: 0 cancelled · paused by user, but resuming sends nothing: "
        "its 2 unsent job(s) end cancelled when a run or a worker processes it"
    ) in text
    report = wb("status", "night", "--json").json()
    assert (report["phase"], report["phase_reason"]) == ("deadline", "past deadline: 0 cancelled")
    assert (report["schedule_state"], report["paused_by_user"]) == ("past deadline: 0 cancelled", True)


def _past_deadline(batch: str) -> None:
    """The night is over: the batch's deadline passed an hour ago."""
    engine = db.open_engine(get_settings())
    with db.session_scope(engine) as session:
        store.set_batch_schedule(session, batch, Schedule(deadline=utcnow() - timedelta(hours=1)), "low")


def test_a_run_of_a_batch_paused_past_its_deadline_ends_it_instead_of_asking_for_resume(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """`status` said "after `wanbatch resume night`, `wanbatch run night` … goes on" and `run night`
    was refused ("nothing of it is sent until `wanbatch resume night`"): past the deadline resuming
    changes nothing, and the run only ends the batch. Now `status` says what a run does, and the
    run does it: what fal made collected, the unsent jobs cancelled (reason `deadline`)."""
    batch = _submitted(wb, manifest("night", TWO_JOBS.format(extra=SCHEDULED)))
    assert wb("pause", "night").code == 0
    _past_deadline(batch)

    said = " ".join(wb("status", "night").stdout.split())
    assert "`wanbatch resume night`" not in said
    assert (
        "nothing is processing it: `wanbatch run night`, or a worker, cancels its 2 unsent job(s) (deadline)"
        in said
    )

    run = wb("run", "night", "--no-progress", "--json")
    assert run.code == 1, run.stderr  # jobs were cancelled
    body = run.json()
    assert "ok" not in body
    assert (body["phase"], body["counts"]["cancelled"]) == ("done", 2)
    assert [f["error_type"] for f in body["failures"]] == ["deadline"]
    assert "wanbatch resume" not in run.stderr
    assert sim.ledger()["accepted"] == 0
    # Finished, it is held back by nothing: no "paused by user, but resuming sends nothing".
    assert "paused by user" not in wb("status", "night").stdout


def test_a_batch_fal_refused_past_its_deadline_says_the_deadline_passed(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """Paused because fal refused the account, the batch's deadline then passed: `status` said
    "paused: …; fix it, then `wanbatch run night` goes on" (and "or a worker", which leaves such a
    batch alone), `resume` that `run` "resumes that". Nothing is sent any more: they say the
    deadline passed and that a run cancels the unsent jobs."""
    batch = _submitted(wb, manifest("night", TWO_JOBS.format(extra="")))
    _execute("UPDATE batches SET state = 'paused', pause_reason = 'fal refused the account (403)'")
    _past_deadline(batch)

    shown = wb("status", "night")
    said = " ".join(shown.stdout.split())
    assert shown.stdout.splitlines()[0].endswith("· deadline")
    assert (
        "paused: fal refused the account (403); but its deadline has passed, so nothing more is sent: "
        "`wanbatch run night` cancels its 2 unsent job(s) (deadline)"
    ) in said
    assert "goes on" not in said
    assert "or a worker" not in said
    report = wb("status", "night", "--json").json()
    assert (report["phase"], report["state"]) == ("deadline", "paused")

    resumed = " ".join(wb("resume", "night").stdout.split())
    assert "has passed: its 2 waiting job(s) will never be sent; `wanbatch run night` cancels them" in resumed
    assert "resumes that" not in resumed

    run = wb("run", "night", "--no-progress", "--json")
    assert run.code == 1, run.stderr
    assert run.json()["counts"]["cancelled"] == 2
    assert sim.ledger()["accepted"] == 0


def test_resume_leaves_an_account_pause_alone_and_says_so(wb: Wb, manifest: MakeManifest) -> None:
    _submitted(wb, manifest("night", TWO_JOBS.format(extra="")))
    assert wb("pause", "night").code == 0
    _execute("UPDATE batches SET state = 'paused', pause_reason = 'fal refused the account (403)'")

    resumed = wb("resume", "night")
    assert resumed.code == 0, resumed.stderr
    line = resumed.stdout.strip()
    assert "resumed batch night" in line
    assert "still paused (fal refused the account (403))" in line
    assert "`wanbatch run night`" in line
    report = wb("status", "night", "--json").json()
    assert (report["state"], report["paused_by_user"]) == ("paused", False)


def test_the_commands_said_of_a_paused_simulation_go_on_with_simulate(wb: Wb, manifest: MakeManifest) -> None:
    """A simulation is processed by `--simulate` commands only: "`wanbatch run night` goes on",
    as `resume` and `status` said of one paused for its outputs or by fal, was refused when copied."""
    _submitted(wb, manifest("night", TWO_JOBS.format(extra="")))
    assert wb("pause", "night").code == 0
    _execute(
        "UPDATE batches SET simulated = true, state = 'paused', "
        "pause_reason = 'outputs cannot be written here'"
    )

    resumed = wb("resume", "night")
    assert resumed.code == 0, resumed.stderr
    assert "`wanbatch run night --simulate` or submitting its manifest again" in resumed.stdout
    shown = wb("status", "night")
    assert shown.code == 0, shown.stderr
    said = " ".join(shown.stdout.split())
    assert "cannot be written here; fix it, then `wanbatch run night --simulate` goes on" in said


def test_submitting_again_keeps_the_pause_and_applies_the_schedule(wb: Wb, manifest: MakeManifest) -> None:
    path = manifest("night", TWO_JOBS.format(extra=SCHEDULED))
    first = wb("submit", path, "--json")
    assert first.code == 0, first.stderr
    body = first.json()
    assert body["priority"] == "low"
    assert body["schedule"]["window"] == "22:00-06:00"
    assert body["schedule"]["timezone"] == "Europe/Berlin"
    assert body["schedule_changed"] is None

    report = wb("status", "night", "--json").json()
    assert report["schedule"] == body["schedule"]
    assert report["schedule_state"].startswith("waiting until 2099-12-01 22:00 +01:00")
    assert "schedule: waiting until 2099-12-01 22:00 +01:00" in wb("status", "night").stdout

    assert wb("pause", "night").code == 0
    path.write_text(TWO_JOBS.format(extra=""), encoding="utf-8")  # schedule and priority removed
    second = wb("submit", path, "--json")
    assert second.code == 0, second.stderr
    changed = second.json()["schedule_changed"]
    assert changed["from"]["priority"] == "low"
    assert changed["to"] == {"schedule": None, "priority": "normal"}
    assert (second.json()["schedule"], second.json()["priority"]) == (None, "normal")

    report = wb("status", "night", "--json").json()
    assert (report["paused_by_user"], report["schedule_state"], report["schedule"]) == (
        True,
        "paused by user",
        None,
    )
    resumed = wb("resume", "night", "--json").json()
    assert (resumed["paused_by_user"], resumed["schedule_state"]) == (False, "")


PAUSED_LINE = (
    "batch night is paused (`wanbatch pause`): nothing of it is sent until `wanbatch resume night`; "
    "then run this command again to go on"
)


def test_run_of_a_paused_batch_is_refused_before_anything_changes(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """`run NAME` of a batch its user paused sent nothing and exited 1 (CONTRACT: some jobs failed
    or were cancelled; none had). Now it says it is paused and how to go on: exit 2, one line."""
    path = manifest("night", TWO_JOBS.format(extra=""))
    _submitted(wb, path)
    assert wb("pause", "night").code == 0

    by_name = wb("run", "night", "--no-progress")
    assert by_name.code == 2
    assert by_name.stderr.strip().splitlines() == [f"error: {PAUSED_LINE}"]

    # `run MANIFEST` too, and an edited manifest's new job is not stored.
    path.write_text(TWO_JOBS.format(extra="").replace("seed: [1, 2]", "seed: [1, 2, 3]"), encoding="utf-8")
    by_manifest = wb("run", path, "--no-progress", "--json")
    assert by_manifest.code == 2
    assert by_manifest.json() == {"ok": False, "error": PAUSED_LINE}

    report = wb("status", "night", "--json").json()
    assert (report["paused_by_user"], report["total"], report["counts"]["pending"]) == (True, 2, 2)
    assert sim.ledger()["accepted"] == 0

    # Resumed, the same command goes on.
    assert wb("resume", "night").code == 0
    done = wb("run", path, "--no-progress", "--json")
    assert done.code == 0, done.stderr
    assert done.json()["counts"]["succeeded"] == 3


def test_a_run_stopped_by_a_pause_exits_2_not_1(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`wanbatch pause` while `run` works: the run ends once nothing is at fal. No job failed or
    was cancelled, so not exit 1: exit 2, with the same words as a run of a paused batch."""
    import cli.batch_commands as commands

    def pause_now(batch_id: str, settings: object) -> None:  # the user, in another terminal
        _execute(f"UPDATE batches SET paused_by_user = true WHERE id = '{batch_id}'")

    monkeypatch.setattr(commands, "_resume_at_simulator", pause_now)
    run = wb("run", manifest("night", TWO_JOBS.format(extra="")), "--no-progress", "--json")

    assert run.code == 2, run.stderr
    body = run.json()
    assert (body["ok"], body["error"]) == (False, PAUSED_LINE)
    assert (body["paused_by_user"], body["counts"]["pending"], body["counts"]["failed"]) == (True, 2, 0)
    assert "`wanbatch resume night`, then run the same command again to go on" in run.stderr
    assert sim.ledger()["accepted"] == 0


def test_status_of_a_paused_batch_says_resume_goes_on(wb: Wb, manifest: MakeManifest) -> None:
    """It said "`wanbatch run night`, or a worker, goes on", which sends nothing while paused."""
    _submitted(wb, manifest("night", TWO_JOBS.format(extra="")))
    assert wb("pause", "night").code == 0
    hint = (
        "nothing is processing it: after `wanbatch resume night`, `wanbatch run night`, or a worker, goes on"
    )
    assert hint in " ".join(wb("status", "night").stdout.split())
    # The list of batches cuts the line at 80 columns, after the part that says to resume first.
    assert "nothing is processing it: after `wanbatch resume night`, `wanbatch run" in wb("status").stdout
    assert wb("resume", "night").code == 0
    assert "after `wanbatch resume" not in wb("status", "night").stdout


ONE_JOB = """\
name: {name}
endpoint: fal-ai/wan-i2v
items:
  - {{prompt: a, image_url: images/landscape.jpg, resolution: 480p, seed: 1}}
"""


@pytest.mark.parametrize(
    "name",
    # An option (help; "Missing argument"), a folder ("not a regular file"), a manifest file
    # beside it (it ran that file), an items suffix, a name the shell splits, a folder of that name.
    ["-h", "--json", "..", ".", "base.yaml", "rows.jsonl", "my batch", "images"],
)
def test_the_commands_hints_suggest_work_for_any_batch_name(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, name: str
) -> None:
    """Copied from `status`, `run` and `resume`, each suggested command acts on the batch, not
    on a file of that name (`base.yaml`, another batch's manifest, is never sent)."""
    manifest("base", ONE_JOB.format(name="decoy"))
    (manifest("m", "").parent / "rows.jsonl").write_text('{"prompt": "b"}\n', encoding="utf-8")
    batch = _submitted(wb, manifest("m", ONE_JOB.format(name=f"{name!r}".replace("'", '"'))))
    assert wb("pause", batch).code == 0

    hint = re.search(r"`wanbatch resume ([^`]+)` goes on", " ".join(wb("status", batch).stdout.split()))
    assert hint is not None
    ref = shlex.split(hint.group(1))
    refused = wb("run", *ref, "--no-progress")
    assert refused.code == 2, refused.stderr
    assert f"nothing of it is sent until `wanbatch resume {hint.group(1)}`" in refused.stderr

    resumed = wb("resume", *ref)
    assert resumed.code == 0, resumed.stderr
    assert resumed.stdout.startswith(f"resumed batch {name} ({batch[:12]})")
    run_hint = re.search(r"`wanbatch run ([^`]+)` \(or the workers", " ".join(resumed.stdout.split()))
    assert run_hint is not None
    done = wb("run", *shlex.split(run_hint.group(1)), "--no-progress", "--json")
    assert done.code == 0, done.stderr
    assert (done.json()["batch"], done.json()["counts"]["succeeded"]) == (batch, 1)
    assert sim.ledger()["accepted"] == 1


_NO_KEY = (
    "error: FAL_KEY is not set: export FAL_KEY=<your fal API key>, or use the bundled simulator "
    "(`--simulate`: wanbatch run --simulate …, rerun --simulate …), which needs no key"
)


def test_a_run_past_its_deadline_with_only_unsent_jobs_needs_no_key(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status` and `resume` advise `wanbatch run night` to cancel the unsent jobs of a batch past
    its deadline; without FAL_KEY that run said "FAL_KEY is not set" (exit 2), though it sends
    nothing and nothing of the batch is at fal. It now ends them (reason `deadline`) keyless.
    Before the deadline, or with a request at fal to collect, cancel or look up (or a video to
    download), the key is still required: refused as ever, nothing changed."""
    batch = _submitted(wb, manifest("night", TWO_JOBS.format(extra=SCHEDULED)))
    assert wb("pause", "night").code == 0
    monkeypatch.delenv("FAL_KEY")
    assert wb("resume", "night").code == 0
    before = wb("run", "night", "--no-progress")  # the deadline is still ahead
    assert (before.code, before.stderr.strip().splitlines()) == (2, [_NO_KEY])
    assert wb("pause", "night").code == 0
    _past_deadline(batch)
    for state in ("queued", "downloading", "submit_unknown", "submitting"):
        _execute(
            f"UPDATE jobs SET state = '{state}', request_id = 'req-1', submitted_at = '2020-01-01 00:00:00' "
            "WHERE id = (SELECT min(id) FROM jobs)"
        )
        held = wb("run", "night", "--no-progress")
        assert (held.code, held.stderr.strip().splitlines()) == (2, [_NO_KEY]), state
        counts = wb("status", "night", "--json").json()["counts"]
        assert (counts["pending"], counts[state]) == (1, 1), state
    _execute("UPDATE jobs SET state = 'pending', request_id = NULL, submitted_at = NULL")
    resumed = " ".join(wb("resume", "night").stdout.split())
    assert "its 2 waiting job(s) will never be sent; `wanbatch run night`" in resumed

    run = wb("run", "night", "--no-progress", "--json")

    assert run.code == 1, run.stdout + run.stderr  # jobs were cancelled
    body = run.json()
    assert (body["phase"], body["counts"]["cancelled"], body["finished"]) == ("done", 2, 2)
    assert [f["error_type"] for f in body["failures"]] == ["deadline"]
    assert sim.ledger()["accepted"] == 0


def _window_closed(batch: str) -> Schedule:
    """The batch's window ended while it was paused: it opens again in two hours."""
    opens = (utcnow() + timedelta(hours=2)).replace(second=0, microsecond=0)
    window = Schedule(window=(opens.time(), (opens + timedelta(hours=1)).time()), timezone="UTC")
    engine = db.open_engine(get_settings())
    with db.session_scope(engine) as session:
        store.set_batch_schedule(session, batch, window, "normal")
    return window


#: What the schedule adds to a user's pause when its window is closed (the countdown varies).
WINDOW_CLOSED = r"its window is closed \(opens \d\d:\d\d UTC, in \dh\d*m?\)"


def test_status_of_a_paused_batch_says_its_window_is_closed(wb: Wb, manifest: MakeManifest) -> None:
    """Paused, then its window closed: `status` said only "paused by user (`wanbatch resume night`
    goes on)", and the user learnt after resuming that nothing is sent until the window opens
    again. The phase stays `paused`; the schedule is said beside it (and in `--json`)."""
    batch = _submitted(wb, manifest("night", TWO_JOBS.format(extra="")))
    assert wb("pause", "night").code == 0
    _window_closed(batch)

    said = " ".join(wb("status", "night").stdout.split())
    assert re.search(
        rf"schedule: paused by user; {WINDOW_CLOSED}: `wanbatch resume night` goes on once it opens", said
    ), said
    listed = " ".join(wb("status").stdout.split())
    assert re.search(rf"paused: by its user; {WINDOW_CLOSED}", listed), listed
    report = wb("status", "night", "--json").json()
    assert (report["phase"], report["phase_reason"], report["schedule_state"]) == (
        "paused",
        "by its user",
        "paused by user",
    )
    assert re.fullmatch(
        r"waiting for window \(opens \d\d:\d\d UTC, in \dh\d*m?\)", report["paused_schedule_state"]
    )

    assert wb("resume", "night").code == 0
    assert wb("status", "night", "--json").json()["paused_schedule_state"] == ""


def test_a_run_stopped_by_a_pause_says_the_window_closed_meanwhile(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's closing line said only "`wanbatch resume night`, then … to go on" of a batch
    whose window had closed while it was paused: it says the schedule too, as `status` does."""
    import cli.batch_commands as commands

    def pause_now(batch_id: str, settings: object) -> None:  # the user, in another terminal
        _execute(f"UPDATE batches SET paused_by_user = true WHERE id = '{batch_id}'")
        _window_closed(batch_id)

    monkeypatch.setattr(commands, "_resume_at_simulator", pause_now)
    run = wb("run", manifest("night", TWO_JOBS.format(extra="")), "--no-progress")

    assert run.code == 2, run.stderr
    said = " ".join(run.stderr.split())
    assert re.search(
        rf"batch paused by its user; {WINDOW_CLOSED}: `wanbatch resume night`, then run the same command "
        "again to go on",
        said,
    ), said
    assert sim.ledger()["accepted"] == 0
