"""A schedule that can never send anything: refused by every command that reads the manifest.

Its deadline has passed, or passes before the daily window (after ``not_before``) next opens:
the batch could only end cancelled, so `validate`, `estimate`, `submit` and `run` say why in one
located line, exit 2 and store nothing. A batch already stored is resumed all the same (its
interrupted run left work at fal to collect), and `resume` / `run BATCH` of a batch whose
schedule is over say so rather than promising jobs that will never be sent.

The instants are fixed (2020, 2099): the answers hold whatever the clock says in between.
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from jobs import db, store
from jobs.schedule import Schedule
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import MakeManifest, Wb, counts

HEAD = "name: night\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a city at night\n  - prompt: a harbour\n"

#: Lines 6-10: tonight's 22:00-23:00 window has closed by not_before (23:30); the next opens
#: tomorrow at 22:00, after the 06:00 deadline.
NEVER = (
    "schedule:\n"  # 6
    "  not_before: 2099-12-01T23:30:00+01:00\n"  # 7
    "  deadline: 2099-12-02T06:00:00+01:00\n"  # 8
    '  window: "22:00-23:00"\n'  # 9
    "  timezone: Europe/Berlin\n"  # 10
)
NEVER_WHY = (
    "schedule deadline 2099-12-02T06:00+01:00 passes before the window 22:00-23:00 (Europe/Berlin) "
    "first opens after not_before, at 2099-12-02T22:00+01:00"
)
PAST = "schedule:\n  deadline: 2020-12-02T06:00:00+01:00\n"  # line 7
#: Opens at 22:00; the deadline ends the night at 01:00, across midnight.
IN_TIME = (
    "schedule:\n"
    "  not_before: 2099-12-01T12:00:00+01:00\n"
    "  deadline: 2099-12-02T01:00:00+01:00\n"
    '  window: "22:00-06:00"\n'
    "  timezone: Europe/Berlin\n"
)


def _database() -> str:
    return get_settings().database_url


def _set_schedule(name: str, schedule: Schedule) -> None:
    """What editing the schedule behind wanbatch's back (or the clock moving on) leaves stored."""
    with db.session_scope(db.open_engine(get_settings())) as session:
        batch = store.get_batch(session, name)
        store.set_batch_schedule(session, batch.id, schedule, batch.priority)


@pytest.mark.parametrize(
    ("schedule", "line", "why"),
    [(NEVER, 8, NEVER_WHY), (PAST, 7, "schedule deadline 2020-12-02T06:00:00+01:00 has already passed")],
    ids=["window-after-deadline", "deadline-past"],
)
@pytest.mark.parametrize("command", ["validate", "estimate", "submit", "run"])
def test_a_schedule_that_never_sends_is_refused_in_one_located_line(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, command: str, schedule: str, line: int, why: str
) -> None:
    path = manifest("night", HEAD + schedule)
    refused = wb(command, path, "--no-progress") if command == "run" else wb(command, path)
    assert refused.code == 2, refused.stderr
    errors = [text for text in refused.stderr.splitlines() if text.startswith("error ")]
    assert len(errors) == 1, refused.stderr
    assert errors[0].startswith(f"error {path}:{line}: field 'schedule.deadline': {why}")
    assert "nothing was submitted" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert refused.stdout == ""
    if Path(_database().removeprefix("sqlite:///")).exists():
        assert counts(_database()) == (0, 0)
    assert sim.ledger()["entries"] == []


def test_json_says_the_same_with_the_line(wb: Wb, manifest: MakeManifest) -> None:
    path = manifest("night", HEAD + NEVER)
    refused = wb("validate", path, "--json")
    assert refused.code == 2
    [issue] = refused.json()["issues"]
    assert (issue["line"], issue["field"], issue["severity"]) == (8, "schedule.deadline", "error")
    assert issue["message"] == f"{NEVER_WHY}: nothing could ever be sent"


def test_a_window_across_midnight_that_opens_before_the_deadline_is_valid(
    wb: Wb, manifest: MakeManifest
) -> None:
    path = manifest("night", HEAD + IN_TIME)
    valid = wb("validate", path)
    assert valid.code == 0, valid.stderr
    assert "2 job(s), all valid" in valid.stdout
    submitted = wb("submit", path, "--json")
    assert submitted.code == 0, submitted.stderr
    assert submitted.json()["schedule"]["window"] == "22:00-06:00"


def test_a_stored_batch_whose_window_no_longer_opens_in_time_is_resumed_with_a_warning(
    wb: Wb, manifest: MakeManifest
) -> None:
    """As for a deadline that passed: a run interrupted in the window left work at fal to collect."""
    path = manifest("night", HEAD + IN_TIME)
    assert wb("submit", path).code == 0
    path.write_text(HEAD + NEVER, encoding="utf-8")  # the night moved on past the last window
    again = wb("submit", path)
    assert again.code == 0, again.stderr
    assert f"warning {path}:8: field 'schedule.deadline': {NEVER_WHY}: nothing more is sent; " in again.stderr
    assert "what fal made is collected, the rest cancelled\n" in again.stderr
    stored = wb("status", "night", "--json").json()["schedule"]
    assert stored["window"] == "22:00-23:00"  # stored, for the batch to end as it says
    # A new batch with that schedule is still refused.
    other = manifest("other", (HEAD + NEVER).replace("name: night", "name: other"))
    assert wb("submit", other).code == 2


def _paused_batch(wb: Wb, manifest: MakeManifest) -> None:
    assert wb("submit", manifest("night", HEAD + IN_TIME)).code == 0
    assert wb("pause", "night").code == 0


def test_resume_of_a_batch_past_its_deadline_says_nothing_will_be_sent(
    wb: Wb, manifest: MakeManifest
) -> None:
    _paused_batch(wb, manifest)
    _set_schedule("night", Schedule(deadline=datetime(2020, 12, 2, 5, tzinfo=UTC), timezone="Europe/Berlin"))
    resumed = wb("resume", "night")
    assert resumed.code == 0, resumed.stderr
    lines = resumed.stdout.strip().splitlines()
    assert len(lines) == 1, resumed.stdout
    assert lines[0].startswith("resumed batch night (")
    assert lines[0].endswith(
        ", but its deadline 2020-12-02 06:00 +01:00 has passed: its 2 waiting job(s) will never be "
        "sent; `wanbatch run night` (or the workers, with a broker) cancels them"
    )
    assert "may be sent again" not in resumed.stdout


def test_resume_of_a_batch_whose_window_opens_only_after_its_deadline_says_so(
    wb: Wb, manifest: MakeManifest
) -> None:
    _paused_batch(wb, manifest)
    never = Schedule(
        not_before=datetime(2099, 12, 1, 22, 30, tzinfo=UTC),  # 23:30 in Berlin
        deadline=datetime(2099, 12, 2, 5, tzinfo=UTC),
        window=(time(22), time(23)),
        timezone="Europe/Berlin",
    )
    _set_schedule("night", never)
    message = wb("resume", "night", "--json").json()["message"]
    assert message.endswith(
        ", but nothing opens before its deadline 2099-12-02 06:00 +01:00: its 2 waiting job(s) will "
        "never be sent; `wanbatch run night` (or the workers, with a broker) cancels them"
    )


def test_run_of_a_stored_batch_past_its_deadline_warns_and_cancels_what_was_never_sent(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    assert wb("submit", manifest("night", HEAD + IN_TIME)).code == 0
    _set_schedule("night", Schedule(deadline=datetime(2020, 12, 2, 5, tzinfo=UTC), timezone="Europe/Berlin"))
    ran = wb("run", "night", "--json", "--no-progress")
    assert ran.code == 1, ran.stderr  # cancelled jobs
    assert (
        "warning batch night: its deadline 2020-12-02 06:00 +01:00 has passed: nothing more is sent; "
        "what fal made is collected, the rest cancelled"
    ) in ran.stderr
    assert ran.json()["counts"]["cancelled"] == 2
    assert sim.ledger()["entries"] == []


@pytest.mark.timeout(60)  # without the fix the run waits for the deadline in 2099
def test_run_of_a_stored_batch_whose_window_opens_only_after_its_deadline_ends_now(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """Nothing can be sent before the deadline (2099): the run ends the unsent jobs at once, as
    the deadline would, instead of waiting for it (it would wait for decades)."""
    assert wb("submit", manifest("night", HEAD + IN_TIME)).code == 0
    never = Schedule(
        not_before=datetime(2099, 12, 1, 22, 30, tzinfo=UTC),  # 23:30 in Berlin
        deadline=datetime(2099, 12, 2, 5, tzinfo=UTC),
        window=(time(22), time(23)),
        timezone="Europe/Berlin",
    )
    _set_schedule("night", never)
    ran = wb("run", "night", "--json", "--no-progress")
    assert ran.code == 1, ran.stderr  # cancelled jobs
    assert "nothing opens before its deadline 2099-12-02 06:00 +01:00" in ran.stderr
    report = ran.json()
    assert report["counts"]["cancelled"] == 2
    [why] = [f for f in wb("status", "night", "--json").json()["failures"] if f["state"] == "cancelled"]
    assert why["error_type"] == "deadline"
    assert why["example"] == (
        "not sent before the batch's deadline (2099-12-02 06:00 +01:00): the last window "
        "(22:00-23:00 Europe/Berlin) closed and none opens before it"
    )
    assert sim.ledger()["entries"] == []
