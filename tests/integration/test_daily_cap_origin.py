"""Where the day's cap that cancelled a batch's jobs is set, read from the workers' records on
Redis (:func:`cli.output.daily_cap_origin`): with a broker the workers dispatch, and their
``WANBATCH_DAILY_BUDGET_USD`` applied, not the one of the ``run`` or ``status`` that reports."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from cli.output import daily_cap_origin
from jobs.batches import BatchReport
from jobs.settings import Settings
from worker.doctor import database_id
from worker.peers import peers_key

pytestmark = [pytest.mark.redis]


def _report(**fields: Any) -> BatchReport:
    return cast(BatchReport, {"cancelled_for_daily_budget": 30, "simulated": False, **fields})


def test_the_workers_published_daily_cap_is_named(redis_db: str, tmp_path: Path) -> None:
    settings = Settings(
        broker_url=redis_db, database_url=f"sqlite:///{tmp_path / 'x.db'}", daily_budget_usd=Decimal(100)
    )
    client = redis.Redis.from_url(redis_db)
    try:
        seconds, micros = client.time()
        now_us = int(seconds) * 1_000_000 + int(micros)
        body = {"settings": {"WANBATCH_DAILY_BUDGET_USD": "3.00"}, "output_real": None}
        client.hset(peers_key(database_id(settings)), "host-a:12:", f"{now_us} {json.dumps(body)}")
    finally:
        client.close()

    where = daily_cap_origin(settings, _report())
    assert where is not None
    assert "not this process's (100): 3.00 on worker pid 12@host-a" in where
    # Nothing cancelled by the day's cap, a simulation, or no broker: nothing read or said.
    assert daily_cap_origin(settings, _report(cancelled_for_daily_budget=0)) is None
    assert daily_cap_origin(settings, _report(simulated=True)) is None
    assert daily_cap_origin(Settings(broker_url=None, daily_budget_usd=Decimal(100)), _report()) is None
