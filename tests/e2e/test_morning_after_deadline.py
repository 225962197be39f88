"""The morning after a deadline: the jobs it cancelled get a next step in `status`, and a rerun
can send them at once (`--now`) instead of waiting for the parent's window the next night.

The parent's schedule is set behind wanbatch's back (as the clock moving on would leave it): a
deadline long past and a daily window that opens in two hours, so it is closed now.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from falsim.server import SimulatorHandle
from jobs import db, store
from jobs.schedule import Schedule
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import TWO_JOBS, MakeManifest, Wb, processed

#: Never reached by the parent: it is only submitted, then given the past deadline below.
LATER = "schedule:\n  not_before: 2099-12-01T12:00:00+00:00\n  timezone: UTC\n"


def _closed_window() -> tuple[str, Schedule]:
    """A window opening in two hours and lasting one (UTC), with a deadline long past."""
    now = datetime.now(UTC)
    start = (now + timedelta(hours=2)).time().replace(second=0, microsecond=0)
    end = (now + timedelta(hours=3)).time().replace(second=0, microsecond=0)
    window = f"{start:%H:%M}-{end:%H:%M}"
    return window, Schedule(
        deadline=datetime(2020, 12, 2, 5, tzinfo=UTC), window=(start, end), timezone="UTC"
    )


def _cancelled_at_the_deadline(wb: Wb, manifest: MakeManifest) -> str:
    """A batch of two jobs that its deadline cancelled, never sent; returns the window it keeps."""
    assert wb("submit", manifest("night", TWO_JOBS.format(name="night") + LATER)).code == 0
    window, schedule = _closed_window()
    with db.session_scope(db.open_engine(get_settings())) as session:
        batch = store.get_batch(session, "night")
        store.set_batch_schedule(session, batch.id, schedule, batch.priority)
    ran = wb("run", "night", "--json", "--no-progress")
    assert ran.code == 1, ran.stderr
    assert ran.json()["counts"]["cancelled"] == 2
    return window


def test_status_advises_a_rerun_and_the_option_that_sends_it_now(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    window = _cancelled_at_the_deadline(wb, manifest)

    shown = wb("status", "night")
    assert shown.code == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "2 job(s) cancelled: not sent before the deadline" in text
    assert (
        "to run them: `wanbatch rerun night --failed-only --now` sends them now; "
        f"`wanbatch rerun night --failed-only` keeps the window {window} (UTC) and waits for it"
    ) in text
    assert wb("status", "night", "--json").json()["cancelled_for_deadline"] == 2


def test_rerun_now_sends_the_jobs_the_deadline_cancelled_at_once(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    _cancelled_at_the_deadline(wb, manifest)

    rerun = processed(wb, "rerun", "night", "--failed-only", "--now")

    assert rerun["counts"]["succeeded"] == 2
    status = wb("status", rerun["batch"], "--json").json()
    assert status["schedule"] is None
    # The parent's jobs a rerun rendered are not advised again.
    assert "to run them" not in wb("status", "night").stdout


def test_a_rerun_that_keeps_a_closed_window_says_it_waits_and_how_to_send_it_now(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli import batch_commands

    window = _cancelled_at_the_deadline(wb, manifest)
    # Processing it would wait for the window (hours): what is said before that is the point.
    monkeypatch.setattr(batch_commands, "_run_and_report", lambda *_args, **_kwargs: 1)

    rerun = wb("rerun", "night", "--failed-only", "--no-progress")

    assert rerun.code == 1, rerun.stderr
    said = " ".join(rerun.stderr.split())
    assert f"batch night-rerun-1 waits for its window: opens {window[:5]} UTC, in " in said
    assert "`--now` sends it now" in said
    status = wb("status", "night-rerun-1", "--json").json()
    assert status["schedule"]["window"] == window
