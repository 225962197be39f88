"""Work every job repeats, counted in Python calls (issue #11's CPU line): the machine is shared
and timings are noisy, a call count is not. Each bound holds with the work done once per job,
not once per value (or per character) of it; each result is the one it always was."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from decimal import Decimal
from types import FrameType
from typing import Any, cast

import pytest
from sqlalchemy import Table, bindparam, update
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.exc import ArgumentError

from jobs.models import Job
from jobs.outputs import slug
from jobs.store.direct import _direct_form
from worker.probe import MediaInfo

JOBS = cast(Table, Job.__table__)


def _calls(work: Callable[[], object]) -> int:
    """Python and built-in function calls made while ``work()`` runs (``work`` itself not counted)."""
    count = -1

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(None)
    return count - 1  # sys.setprofile(None) is a call too


def test_media_info_as_json_is_asdict_without_its_deep_copy() -> None:
    info = MediaInfo(width=854, height=480, frames=81, fps=16.0, duration_s=5.062, codec="h264")
    assert info.as_json() == asdict(info)
    assert list(info.as_json()) == list(asdict(info))  # the same order of keys (the sidecar's)
    assert _calls(info.as_json) == 0


def test_a_batch_folder_name_is_made_once_per_name() -> None:
    name = "bench-drain Été/東京 ../ nuit"
    first = slug(name)
    assert first == "bench-drain-Été-東京-..-nuit"
    assert _calls(lambda: slug(name)) <= 1
    assert slug(name) == first


#: A move's shape: every value given, none expanding, a few with a type's processor.
MOVE = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("w_id"), JOBS.c.version == bindparam("w_version"))
    .values(
        state=bindparam("v_state", type_=JOBS.c.state.type),
        next_attempt_at=bindparam("v_next", type_=JOBS.c.next_attempt_at.type),
        actual_usd=bindparam("v_usd", type_=JOBS.c.actual_usd.type),
        seed=bindparam("v_seed", type_=JOBS.c.seed.type),
        lease_owner=bindparam("v_owner"),
        version=JOBS.c.version + 1,
    )
)


def test_a_kept_statements_arguments_cost_no_call_per_value() -> None:
    dialect = SQLiteDialect_pysqlite()
    params = {
        "w_id": "j1",
        "w_version": 3,
        "v_state": "succeeded",
        "v_next": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "v_usd": Decimal("0.2025"),
        "v_seed": 7,
        "v_owner": None,
    }
    direct = _direct_form(MOVE, dialect, params)
    assert direct is not None
    fast = direct.arguments(params)
    plain, direct.plain = direct.plain, None  # the general path, value by value
    try:
        assert direct.arguments(params) == fast
    finally:
        direct.plain = plain
    processed = sum(1 for _key, process in plain or [] if process is not None)
    calls = _calls(lambda: direct.arguments(params))
    # the processors' own calls, plus a few: no append (or lookup) per value
    assert calls <= _calls(lambda: [p(params[k]) for k, p in plain or [] if p is not None]) + 4, processed
    # a value left out is refused as before (the general path says which)
    with pytest.raises(ArgumentError, match="v_owner"):
        direct.arguments({k: v for k, v in params.items() if k != "v_owner"})
