"""The status ETA: the batch's pace so far, projected over what is left."""

from __future__ import annotations

from datetime import timedelta

from cli.output import eta_text
from jobs.batches import _eta_seconds
from jobs.models import utcnow


def test_eta_projects_the_pace_so_far() -> None:
    started = utcnow() - timedelta(seconds=100)
    eta = _eta_seconds(started, finished=20, total=100)  # 5 s a job, 80 to go
    assert eta is not None
    assert 399 <= eta <= 401


def test_no_eta_before_the_first_finish_and_zero_when_done() -> None:
    assert _eta_seconds(None, 0, 10) is None
    assert _eta_seconds(utcnow(), 0, 10) is None
    assert _eta_seconds(utcnow() - timedelta(seconds=5), 10, 10) == 0.0


def test_eta_text() -> None:
    assert eta_text(None) == ""
    assert eta_text(0) == ""
    assert eta_text(200) == "~3m20s left"
    assert eta_text(3 * 3600 + 65) == "~3h01m left"
