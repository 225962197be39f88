"""``WANBATCH_SUBMIT_RATE`` is one cap for every process that dispatches from one database.

Each process paced its dispatch with a token bucket in its own memory, so two ``wanbatch run``
side by side (or one beside the workers' tick leader) claimed, and sent, twice the rate. Their
rounds take turns (``lock_dispatch``) and now take their tokens from one bucket in the database.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.steps import Runtime, dispatch

KEY = "shared-rate-key-4c2d"


def _runtime(engine: Engine, tmp_path: Path, owner: str) -> Runtime:
    settings = settings_for(
        # Slow enough that no token grows back between two dispatches, however loaded the machine.
        "http://127.0.0.1:9",
        KEY,
        output_dir=tmp_path / "out",
        submit_rate=0.05,
        max_outstanding=100,
    )
    rt = make_runtime(engine, settings)
    rt.owner = owner  # another process
    return rt


def test_two_processes_share_one_submit_rate(engine: Engine, tmp_path: Path) -> None:
    add_batch(
        engine, "many", [("fal-ai/wan-22", {"prompt": f"p{i}", "resolution": "480p"}) for i in range(20)]
    )
    first = _runtime(engine, tmp_path, "host-a:1:")
    second = _runtime(engine, tmp_path, "host-b:2:")
    assert first.bucket is not None
    assert second.bucket is not None
    burst = int(first.bucket.capacity)

    sent_first = dispatch(first)
    sent_second = dispatch(second)  # its own bucket is full; the shared one was just emptied

    assert len(sent_first) == burst
    assert sent_second == []
    assert second.bucket.short  # it waits for the rate, and knows how long: until the shared
    assert second.bucket.until_next() > 10.0  # bucket grows a token (20 s), not its own full one
    # What the shared bucket refused stays in the second's own: it is not lost for later.
    assert second.bucket.tokens >= burst - 0.01


def test_a_round_gives_back_what_it_did_not_use(engine: Engine, tmp_path: Path) -> None:
    """A run whose jobs are all sent still dispatches at each completion: the submits it is
    granted and cannot use go back to the shared bucket, or it would starve the other run."""
    idle = _runtime(engine, tmp_path, "host-a:1:")
    add_batch(
        engine, "other", [("fal-ai/wan-22", {"prompt": f"p{i}", "resolution": "480p"}) for i in range(5)]
    )
    busy = _runtime(engine, tmp_path, "host-b:2:")
    idle.batch_ids = frozenset({"no-such-batch"})  # nothing of its own to send
    assert idle.bucket is not None
    assert busy.bucket is not None

    assert dispatch(idle) == []  # granted the whole bucket, claimed nothing: all given back

    assert len(dispatch(busy)) == int(busy.bucket.capacity)
