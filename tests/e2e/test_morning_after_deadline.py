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
    assert f"batch night-rerun-1 waits for its window (opens {window[:5]} UTC, in " in said
    assert "`--now` sends it now" in said
    status = wb("status", "night-rerun-1", "--json").json()
    assert status["schedule"]["window"] == window


def test_rerun_now_beside_a_rerun_waiting_for_its_window_says_to_cancel_it_first(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli import batch_commands

    window = _cancelled_at_the_deadline(wb, manifest)
    # The first rerun keeps the closed window; the user stops its wait (Ctrl-C) and asks for --now.
    processing = batch_commands._run_and_report
    monkeypatch.setattr(batch_commands, "_run_and_report", lambda *_args, **_kwargs: 1)
    assert wb("rerun", "night", "--failed-only", "--no-progress").code == 1
    monkeypatch.setattr(batch_commands, "_run_and_report", processing)

    now = wb("rerun", "night", "--failed-only", "--now", "--no-progress")

    # Not "nothing to rerun … `wanbatch run night-rerun-1` goes on" (exit 0): that run waits hours,
    # and the --pay-again it advised would send them now and again when night-rerun-1's window opens.
    assert now.code == 2, now.stderr
    said = " ".join(now.stderr.split())
    assert (
        "not sent now: the 2 failed or cancelled jobs of batch night are being rerun with the same "
        f"input in night-rerun-1, which waits for its window (opens {window[:5]} UTC, in "
    ) in said
    assert "to send them now: `wanbatch cancel night-rerun-1`, then this command again" in said
    assert "--pay-again" not in said
    refused = wb("rerun", "night", "--failed-only", "--now", "--no-progress", "--json")
    assert refused.code == 2
    assert refused.json()["ok"] is False
    assert "`wanbatch cancel night-rerun-1`" in refused.json()["error"]
    with db.session_scope(db.open_engine(get_settings())) as session:
        assert sorted(b.name for b in store.list_batches(session)) == ["night", "night-rerun-1"]

    # The way out it gives works: cancelled, night-rerun-1 covers nothing, and --now sends them.
    assert wb("cancel", "night-rerun-1").code == 1  # its jobs ended cancelled
    sent = processed(wb, "rerun", "night", "--failed-only", "--now")
    assert sent["counts"]["succeeded"] == 2
