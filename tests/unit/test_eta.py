"""The status ETA's words (the forecast itself is the dashboard's pace: tests/web/test_listing.py)."""

from __future__ import annotations

from jobs.schedule import eta_text


def test_eta_text() -> None:
    assert eta_text(None) == ""
    assert eta_text(0) == ""
    assert eta_text(200) == "~3m20s left"
    assert eta_text(3 * 3600 + 65) == "~3h01m left"
