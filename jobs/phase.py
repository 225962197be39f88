"""A batch's phase: what a person reads as its state (``status``'s ``state`` column, ``phase`` in
``status --json``, the progress line's heading).

Apart from :mod:`jobs.batches` because the CLI's output module needs it at import time, and
``jobs.batches`` brings SQLAlchemy along: every command, ``--help`` included, would pay for it.
The stored batch states are compared as their string values for the same reason
(:class:`jobs.models.BatchState` is a ``StrEnum``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def batch_phase(
    *,
    state: str,
    total: int,
    finished: int,
    pause_reason: str | None,
    paused_by_user: bool,
    schedule_state: str,
) -> tuple[str, str | None]:
    """What a person should read as a batch's state, and why when it is held back.

    The stored ``state`` says only whether jobs may be sent, so a batch whose every job
    finished is still ``active`` there; a script polling ``status --json`` needs ``done``.
    ``paused`` covers both a batch fal's refusal paused (its ``pause_reason``) and a user's
    ``wanbatch pause``; ``waiting`` a schedule that is closed now; ``deadline`` a schedule whose
    deadline passed; ``done`` every job finished.
    """
    if state == "cancelled":
        return "cancelled", None
    if total and finished >= total:
        return "done", None
    if state == "paused":
        return "paused", pause_reason or "see the log"
    if paused_by_user:
        return "paused", "by its user"
    if schedule_state.startswith("past deadline"):
        return "deadline", schedule_state
    if schedule_state and not schedule_state.startswith("open"):
        return "waiting", schedule_state
    return "active", None


def phase_of(report: Mapping[str, Any]) -> tuple[str, str | None]:
    """:func:`batch_phase` of a ``BatchReport`` or a ``BatchProgress`` (:mod:`jobs.batches`,
    which imports this module: named here only in words, so the two make no cycle)."""
    return batch_phase(
        state=report["state"],
        total=report["total"],
        finished=report["finished"],
        pause_reason=report["pause_reason"],
        paused_by_user=report["paused_by_user"],
        schedule_state=report["schedule_state"],
    )
