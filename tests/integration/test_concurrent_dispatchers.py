"""Two dispatchers at once keep the outstanding cap and the budget, on both databases.

The caps are checked in the claim's transaction against what is committed. That holds only if
one round at a time does it: two rounds side by side each read the other's claims as not there
(uncommitted), and each filled the cap and the budget again. Two dispatchers meet on
PostgreSQL when a ``wanbatch run`` without a broker shares the database with the workers (its
conductor dispatches its batch, the workers' tick leader every batch). On SQLite the write lock
already made them take turns; on PostgreSQL a transaction-level advisory lock now does.
"""

from __future__ import annotations

import threading
from decimal import Decimal

from sqlalchemy import Engine

from jobs import db, store
from jobs.states import JobState
from tests.sample_inputs import INPUTS
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.steps import dispatch, dispatch_in

WAN = ("fal-ai/wan-22", INPUTS["fal-ai/wan-22"])


def test_a_round_waits_for_the_one_in_progress(engine: Engine) -> None:
    settings = settings_for("http://127.0.0.1:9", "key", max_outstanding=2, submit_rate=1000)
    batch_id = add_batch(engine, "clip", [WAN] * 8, est_usd=Decimal("0.25"))
    with db.session_scope(engine) as session:
        store.set_batch_budget(session, batch_id, Decimal("0.75"))
    embedded = make_runtime(engine, settings, batch_ids=frozenset({batch_id}))
    leader = make_runtime(engine, settings)  # the workers' tick leader: every batch

    first = db.session_factory(engine)()
    try:
        assert len(dispatch_in(first, embedded).sent) == 2  # the cap, not yet committed
        second: list[list[str]] = []
        other = threading.Thread(target=lambda: second.append(dispatch(leader)))
        other.start()
        other.join(timeout=2.0)  # a round that does not wait would be done by now
        waited = other.is_alive()
        first.commit()
    finally:
        first.close()
    other.join(timeout=30)
    assert not other.is_alive()
    with db.session_scope(engine) as session:
        counts = store.counts_by_state(session, batch_id)
    assert (counts[JobState.SUBMITTING.value], counts[JobState.PENDING.value]) == (2, 6)
    assert second == [[]]  # it found the cap full, and sent nothing more
    assert waited
