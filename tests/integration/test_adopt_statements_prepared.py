"""An embedded run's scan for requests sent to another fal queue builds its statements once.

``DeadLeases.take_back`` asks :func:`jobs.store.adopt_requests_sent_elsewhere` every
``SCAN_SECONDS`` of a run. It built its count and its update (an alias of the jobs table, a
correlated ``EXISTS``) on every call: ~10 M instructions, about ten times running them. They are
built once (``store._prepared``) and bound at execution: a later call with another batch, origin
and time must still adopt exactly what the rule says."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from jobs import db, store
from jobs.models import Job, utcnow
from tests.step_runtime import add_batch

HERE = "http://127.0.0.1:7001"
GONE = "http://127.0.0.1:9"
ALSO_GONE = "http://127.0.0.1:10"


def _at_fal(engine: Engine, batch_id: str, origin: str, request_prefix: str) -> None:
    with engine.begin() as conn:
        ids = list(conn.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.id)))
        for n, job_id in enumerate(ids):
            conn.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(state="queued", request_id=f"{request_prefix}-{n}", fal_origin=origin)
            )


def _origins(engine: Engine, batch_id: str) -> list[str]:
    with engine.connect() as conn:
        return sorted(str(o) for o in conn.scalars(select(Job.fal_origin).where(Job.batch_id == batch_id)))


def test_adoption_builds_its_statements_once_and_binds_each_call(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Any] = []
    # Looked up where the adoption is built (jobs.store.leases), not on the package.
    rule = store.core._same_request_elsewhere

    def counting(*args: Any) -> Any:
        built.append(args)
        return rule(*args)

    monkeypatch.setattr(store.leases, "_same_request_elsewhere", counting)
    first = add_batch(engine, "adopt-once-a", [("fal-ai/wan-22", {"prompt": f"a {i}"}) for i in range(2)])
    second = add_batch(engine, "adopt-once-b", [("fal-ai/wan-22", {"prompt": f"b {i}"}) for i in range(3)])
    _at_fal(engine, first, GONE, "req-a")
    _at_fal(engine, second, ALSO_GONE, "req-b")

    for expected in ({GONE: 2}, {}, {}):
        with db.session_scope(engine) as session:
            assert store.adopt_requests_sent_elsewhere(session, first, HERE, now=utcnow()) == expected
    with db.session_scope(engine) as session:  # another batch, another origin: bound, not baked in
        assert store.adopt_requests_sent_elsewhere(session, second, GONE, now=utcnow()) == {ALSO_GONE: 3}

    assert _origins(engine, first) == [HERE, HERE]
    assert _origins(engine, second) == [GONE, GONE, GONE]
    assert len(built) <= 1  # built at most once in this process (maybe before this test)
