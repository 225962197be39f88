"""No column that says why a job or a batch is where it is can hold FAL_KEY, whoever wrote it.

Those texts are built from what a provider answered on many paths (an error's detail, a
redirect's location), and a download's errors never passed through the fal client's scrubbing:
``http://x:<key>/`` as a video's redirect stored the key as the job's error. The columns' type
(:class:`jobs.models.KeyFreeText`) masks every value as it is written: the key in every form this
process knows, a fal-shaped key and an ``Authorization`` value whatever it knows.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from sqlalchemy import Engine, text

from jobs import db, store
from jobs.key_forms import forget_keys, remember_key
from jobs.models import BatchState
from jobs.states import JobState
from tests.sample_inputs import INPUTS
from tests.step_runtime import add_batch

S = JobState
T2V = "fal-ai/wan-22"
#: The key this process knows (FAL_KEY: the CLI remembers it at start-up).
KNOWN = "0b5c2d4e-aaaa-bbbb-cccc-444455556666:abcdef0123456789abcdef0123456789"
#: A key of fal's shape this process does not know: masked by its shape.
OTHER = "5d1e0f2a-3b4c-4d5e-8f60-718293a4b5c6:c0ffee00deadbeef0123456789abcdef"
SECRET = KNOWN.split(":")[1]


@pytest.fixture
def known_key() -> Iterator[str]:
    remember_key(KNOWN)
    yield KNOWN
    forget_keys()


def leaky(where: str) -> str:
    return (
        f"{where}: Invalid port: '{KNOWN}'; as sent {quote(KNOWN, safe='')}; "
        f"encoded {base64.b64encode(SECRET.encode()).decode()}; other {OTHER}; "
        f"Authorization: Key not-a-fal-shape"
    )


def test_errors_reasons_and_pause_reasons_are_stored_without_the_key(engine: Engine, known_key: str) -> None:
    batch_id = add_batch(engine, "leaky", [(T2V, INPUTS[T2V])] * 2)
    plain = add_batch(engine, "plain", [(T2V, INPUTS[T2V])])
    said = "fal result: HTTP 404 (Key point: the result expired; see https://fal.ai/docs?a=1&b=2)"
    with db.session_scope(engine) as session:
        first, _ = store.jobs_of_batch(session, batch_id)
        # the one compare-and-set every verb goes through (error and the event's reason)
        assert store.transition(
            session, first.id, S.PENDING, S.CANCELLED, reason=leaky("reason"), error=leaky("error")
        )
        # a bulk UPDATE of its own (the other job)
        bulk = {"reason": leaky("bulk reason"), "error": leaky("bulk error")}
        store.cancel_unsent_jobs(session, [batch_id], error_type="cancelled", **bulk)
        store.set_batch_state(session, batch_id, BatchState.PAUSED, leaky("pause"))
        (kept,) = store.jobs_of_batch(session, plain)
        assert store.transition(session, kept.id, S.PENDING, S.CANCELLED, reason=said, error=said)
    with db.read_scope(engine) as session:
        # a text without a key is stored as it is
        kept_error = session.execute(text("SELECT error FROM jobs WHERE batch_id = :b"), {"b": plain})
        assert kept_error.scalar() == said
        rows = list(session.execute(text("SELECT error FROM jobs")).scalars())
        rows += session.execute(text("SELECT reason FROM job_events")).scalars()
        rows += session.execute(text("SELECT pause_reason FROM batches")).scalars()
    stored = "\n".join(r for r in rows if r)
    for what in ("error", "reason", "bulk reason", "bulk error", "pause"):
        assert f"{what}: Invalid port: '***'" in stored, stored
    for secret in (KNOWN, SECRET, quote(KNOWN, safe=""), OTHER, OTHER.split(":")[1], "not-a-fal-shape"):
        assert secret not in stored
    assert base64.b64encode(SECRET.encode()).decode()[4:-4] not in stored


def test_a_key_stored_before_the_masking_is_masked_as_it_is_read(engine: Engine) -> None:
    """A row an earlier version wrote (its error, its event's reason, its batch's pause reason
    holding a fal-shaped key) shows no key to ``status``, the dashboard or an export: the type
    masks what it reads as well as what it writes."""
    from jobs.models import JobEvent

    batch_id = add_batch(engine, "before", [(T2V, INPUTS[T2V])])
    with db.session_scope(engine) as session:
        (job,) = store.jobs_of_batch(session, batch_id)
        assert store.transition(session, job.id, S.PENDING, S.CANCELLED, reason="stopped", error="stopped")
    old = f"fal said: bad key {OTHER}"
    with engine.begin() as conn:  # as an earlier version stored them: no type in between
        conn.execute(text("UPDATE jobs SET error = :t"), {"t": old})
        conn.execute(text("UPDATE job_events SET reason = :t"), {"t": old})
        conn.execute(text("UPDATE batches SET pause_reason = :t"), {"t": old})
    with db.read_scope(engine) as session:
        (read,) = store.jobs_of_batch(session, batch_id)
        reasons = list(session.query(JobEvent.reason).filter(JobEvent.job_id == read.id).all())
        shown = [read.error, store.get_batch(session, batch_id).pause_reason, *(r for (r,) in reasons)]
    assert len(shown) >= 3
    assert all(s == "fal said: bad key ***" for s in shown), shown
